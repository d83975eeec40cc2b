"""Oracle areas: what a tiling scheme reports when every cell (or sub-cell) gets its TRUE class.

On a synthetic slide (:mod:`wsi_response.synth`) the label raster gives each cell's and each
sub-cell's true majority class. Scoring them with the pipeline's own area code
(:func:`~wsi_response.quantify.slide_areas_from_tiles`), on the grid laid over the true tissue,
leaves only the scheme's discretisation error: the area a class border costs when a cell (or
sub-cell) can hold one class. The classifier's and the tissue detector's errors are not in it.
"""
from __future__ import annotations

import numpy as np

from .classes import CLASSES
from .config import TilingConfig
from .quantify import SlideAreas, slide_areas_from_tiles
from .slide import open_slide
from .synth import SlideTruth, read_labels
from .tiling import TileGrid, _box_means, tile_grid
from .tissue import TissueMask

__all__ = ["oracle_slide_areas", "oracle_grid"]


def oracle_grid(truth: SlideTruth, tiling: TilingConfig) -> tuple[TileGrid, np.ndarray]:
    """The grid of ``tiling`` over the slide's true tissue and its label raster (uint8 ``[y, x]``)."""
    labels = read_labels(truth)
    ds = truth.label_downsample
    mask = TissueMask(labels > 0, ds, truth.mpp * ds)
    slide = open_slide(truth.slide_path)
    try:
        return tile_grid(slide, mask, tiling), labels
    finally:
        slide.close()


def oracle_slide_areas(truth: SlideTruth, tiling: TilingConfig) -> SlideAreas:
    """Class areas (mm²) of ``tiling``'s scheme with each cell's (or sub-cell's) true majority class."""
    grid, labels = oracle_grid(truth, tiling)
    probs = _majority(grid, labels, truth.label_downsample, 1).reshape(len(grid), len(CLASSES))
    if grid.subcell_fraction is None:
        return slide_areas_from_tiles(probs, CLASSES, grid.tissue_fraction, grid.cell_area_mm2)
    k = grid.subcells
    sub = _majority(grid, labels, truth.label_downsample, k)
    return slide_areas_from_tiles(probs, CLASSES, grid.tissue_fraction, grid.cell_area_mm2,
                                  sub, grid.subcell_fraction.reshape(len(grid), k * k))


def _majority(grid: TileGrid, labels: np.ndarray, downsample: float, k: int) -> np.ndarray:
    """(N, k*k, C) one-hot of the most frequent true class in each tile's k × k sub-cells (k=1: cells)."""
    n_cols, n_rows = (int(v) + 1 for v in grid.cols_rows.max(axis=0))
    side = grid.stride_l0 / k / downsample  # sub-cell side in label px
    shares = np.stack([_box_means(labels == 1 + c, side, n_rows * k, n_cols * k) for c in range(len(CLASSES))], -1)
    cells = shares.reshape(n_rows, k, n_cols, k, len(CLASSES))[grid.cols_rows[:, 1], :, grid.cols_rows[:, 0]]
    best = np.argmax(cells.reshape(len(grid), k * k, len(CLASSES)), axis=-1)
    return np.eye(len(CLASSES), dtype=np.float32)[best]
