"""Out-of-focus tissue: a focus measure read tile by tile, pooled on the tissue mask's grid.

The measure at about ``focus_mpp`` µm/px: the energy of the finest detail (grey minus its
binomial Gaussian, sigma 1 px) over that of a coarser band (Gaussians of sigma 2 and 4 px, taken on the
2 × 2-binned grey, where that band is well inside the Nyquist limit). Defocus removes fine detail
first, so the ratio drops; stain and contrast cancel out. Only cells holding measured tissue are
read, through the tile reader (tile-aligned regions, direct JPEG decode where verified), chunk
by chunk, in ``workers`` processes: memory is a chunk per process plus two float32 planes of the
mask's size, and the work is proportional to the tissue, not to the slide.
"""
from __future__ import annotations

import multiprocessing
from typing import Iterator

import numpy as np

from .config import QcConfig, TilingConfig
from .slide import Slide
from .smoothing import block_mean
from .tiling import TileGrid, TileReader, tile_grid
from .tissue import TissueMask

__all__ = ["blur_layer", "focus_energies", "detail_energies"]

_CELL_MASK_PX = 64  # mask px per side of one read cell
_HALO_PX = 12       # focus px read around each cell: the filters' reach (3 sigma), so cells join seamlessly
_BINOMIAL = np.array([1, 4, 6, 4, 1], np.float32) / 16  # the Gaussian of sigma 1 px, 5 taps


def blur_layer(slide: Slide, mask: TissueMask, measured: np.ndarray, cfg: QcConfig,
               workers: int = 0) -> np.ndarray:
    """Tissue px whose sharpness is below ``blur_max_sharpness`` and ``blur_max_relative`` x
    the slide's sharp tissue (both: a slide scanned soft all over is not out of focus)."""
    if not measured.any():
        return np.zeros_like(measured)
    from scipy import ndimage

    fine, band = focus_energies(slide, TissueMask(measured, mask.downsample, mask.mpp), cfg.focus_mpp, workers)
    # the ratio of the two Gaussian means over measured px: their common normaliser cancels
    sigma = cfg.focus_smooth_um / mask.mpp
    for energy in (fine, band):
        energy *= measured
        ndimage.gaussian_filter(energy, sigma, mode="constant", truncate=3.0, output=energy)
    sharp = fine
    sharp /= np.maximum(band, 1e-6)
    del band
    reference = float(np.percentile(sharp[measured], cfg.focus_reference_percentile))
    return measured & (sharp < min(cfg.blur_max_sharpness, cfg.blur_max_relative * reference))


def focus_energies(slide: Slide, mask: TissueMask, focus_mpp: float,
                   workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Fine and coarse detail energy per mask px (float32 ``[y, x]`` on ``mask``'s grid; 0 off
    tissue), grey levels² (grey = R + G + B). ``workers`` > 1 reads and filters in that many processes.

    Focus px are ``mask.mpp / k`` µm, ``k`` the even number of focus px per mask px closest to
    ``mask.mpp / focus_mpp``, so a cell of ``_CELL_MASK_PX`` mask px is a whole number of both.
    """
    k = 2 * max(1, int(round(mask.mpp / focus_mpp / 2)))
    side = _CELL_MASK_PX * k
    grid = tile_grid(slide, mask, TilingConfig(target_mpp=mask.mpp / k, tile_px=side + 2 * _HALO_PX,
                                                stride_px=side, min_tissue_fraction=0.0))
    h, w = mask.mask.shape
    fine = np.zeros((h, w), np.float32)
    band = np.zeros((h, w), np.float32)
    for indices, tile_fine, tile_band in _chunk_energies(slide, grid, k, workers):
        for (col, row), f, b in zip(grid.cols_rows[indices], tile_fine, tile_band):
            y0, x0 = row * _CELL_MASK_PX, col * _CELL_MASK_PX
            y1, x1 = min(h, y0 + _CELL_MASK_PX), min(w, x0 + _CELL_MASK_PX)
            fine[y0:y1, x0:x1] = f[:y1 - y0, :x1 - x0]
            band[y0:y1, x0:x1] = b[:y1 - y0, :x1 - x0]
    return fine, band


def _chunk_energies(slide: Slide, grid: TileGrid, k: int, workers: int
                    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(tile indices, fine, band) per chunk of ``grid``, in this process or ``workers`` processes."""
    reader = TileReader(slide, grid)
    try:
        if workers <= 1 or grid.n_chunks < 2:
            for k_chunk in range(grid.n_chunks):
                yield _energies_of_chunk(reader, k, k_chunk)
            return
        context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        with context.Pool(min(workers, grid.n_chunks), initializer=_set_reader, initargs=(reader, k)) as pool:
            yield from pool.imap_unordered(_energies_in_worker, range(grid.n_chunks))
    finally:
        reader.close()


_WORKER: tuple[TileReader, int] | None = None  # the reader and k of this worker process


def _set_reader(reader: TileReader, k: int) -> None:
    global _WORKER
    _WORKER = (reader, k)


def _energies_in_worker(k_chunk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    assert _WORKER is not None
    return _energies_of_chunk(_WORKER[0], _WORKER[1], k_chunk)


def _energies_of_chunk(reader: TileReader, k: int, k_chunk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    indices, tiles = reader.read_chunk(k_chunk)
    return (indices, *detail_energies(tiles, k, _HALO_PX))


def detail_energies(tiles: np.ndarray, k: int, halo: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean fine and coarse detail energy per ``k`` × ``k`` block of RGB uint8 ``tiles``
    ``(n, T, T, 3)`` whose outer ``halo`` px (even) only feed the filters. Returns two float32
    ``(n, S, S)`` (``S = (T - 2 halo) / k``), grey levels² (grey = R + G + B)."""
    from scipy import ndimage

    n, size = tiles.shape[:2]
    grey = tiles[..., 0].astype(np.float32)
    grey += tiles[..., 1]
    grey += tiles[..., 2]
    fine = grey - ndimage.correlate1d(ndimage.correlate1d(grey, _BINOMIAL, axis=1), _BINOMIAL, axis=2)
    fine = fine[:, halo:size - halo, halo:size - halo]
    fine *= fine
    # sigma 2 and 4 focus px = 1 and 2 px of the 2 x 2-binned grey (4 = 2 then 2 * sqrt(3))
    low = ndimage.gaussian_filter(block_mean(grey, 2), (0, 1, 1), truncate=3.0)
    band = low - ndimage.gaussian_filter(low, (0, 3 ** 0.5, 3 ** 0.5), truncate=3.0)
    hb, half = halo // 2, size // 2
    band = band[:, hb:half - hb, hb:half - hb]
    band *= band
    return block_mean(fine, k), block_mean(band, k // 2)
