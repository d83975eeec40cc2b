"""The tile grid at a target µm/px, and a tile reader that reads large regions and cuts them.

Geometry. The grid lives in *target* pixels (``tile_px`` side at ``target_mpp`` µm/px). Cells
of ``stride_px`` partition the slide from its level-0 origin; each tile is centred on its cell, so
with ``stride_px < tile_px`` tiles overlap but cells never do. A tile's ``tissue_fraction`` is the
tissue fraction of its *cell*, so ``sum(tissue_fraction) * cell_area_mm2`` is the tissue area
counted once. Tiles are read from the coarsest pyramid level at least as fine as the target
(a 0.25 µm/px slide with levels ×1, ×4, ×16 reads level 1 for 1.0 µm/px) and resampled to
``tile_px`` when that level is not exactly at the target.

Sub-cells (``cfg.refine = "dense"``). Each cell is also split into ``k`` × ``k`` sub-cells
(``k = cfg.subcells``, side ``stride_px / k``) with their own exact tissue fractions
(``subcell_fraction``); :meth:`TileGrid.subcell_grid` is the grid of those sub-cells, and
:func:`subcell_pool_weights` says which part of a tile's CNN feature map lies under each sub-cell.

Tiles are ordered chunk by chunk (a chunk is a block of cells read with one region read), so a
contiguous range of tile indices is a set of whole chunks: worker processes take contiguous
chunks and each chunk costs one read.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Any, Iterator

import numpy as np
from PIL import Image

from .config import TilingConfig
from .jpegtiles import MAX_PROBE_MAD, JpegTileReader, mean_abs_diff, open_jpeg_tile_reader, verified_jpeg_reader
from .slide import Slide
from .tissue import TissueMask

__all__ = ["TileGrid", "TileReader", "tile_grid", "cell_means", "resample_tile", "subcell_pool_weights"]


@dataclass(frozen=True)
class TileGrid:
    """Tiles of one slide; arrays are columnar, one row per tile, in chunk order."""

    cols_rows: np.ndarray        # (N, 2) int32 cell index (column, row)
    tissue_fraction: np.ndarray  # (N,) float32 tissue fraction of each tile's cell
    chunk_starts: np.ndarray     # (K+1,) int64; chunk k holds tiles chunk_starts[k]:chunk_starts[k+1]
    tile_px: int                 # tile side at read_mpp, px
    stride_px: int               # cell side at read_mpp, px (fractional in a sub-cell grid)
    read_mpp: float              # µm/px of the tiles
    slide_mpp: float             # µm per level-0 px
    read_level: int              # pyramid level the pixels come from
    level_downsample: float      # level-0 px per read-level px
    chunk_cells: int             # cells per chunk side
    subcell_fraction: np.ndarray | None = None  # (N, k, k) float32 tissue fraction of each sub-cell [row, col]; None: no sub-cells

    def __len__(self) -> int:
        return int(self.cols_rows.shape[0])

    @property
    def downsample(self) -> float:
        """Level-0 px per tile px."""
        return self.read_mpp / self.slide_mpp

    @property
    def size_l0(self) -> float:
        """Tile side in level-0 px."""
        return self.tile_px * self.downsample

    @property
    def stride_l0(self) -> float:
        """Cell side in level-0 px."""
        return self.stride_px * self.downsample

    @property
    def margin_px(self) -> int:
        """Tile px on each side of the cell ((tile_px - stride_px) // 2)."""
        return (self.tile_px - self.stride_px) // 2

    @property
    def origins_l0(self) -> np.ndarray:
        """(N, 2) float64 top-left of each tile in level-0 px (negative at the slide's edge)."""
        return (self.cols_rows.astype(np.float64) * self.stride_px - self.margin_px) * self.downsample

    @property
    def cell_origins_l0(self) -> np.ndarray:
        """(N, 2) float64 top-left of each tile's cell in level-0 px."""
        return self.cols_rows.astype(np.float64) * self.stride_l0

    @property
    def cell_area_mm2(self) -> float:
        """Area of one cell, mm²."""
        return (self.stride_px * self.read_mpp / 1000.0) ** 2

    @property
    def tile_area_mm2(self) -> float:
        """Area of one tile, mm²."""
        return (self.tile_px * self.read_mpp / 1000.0) ** 2

    @property
    def tissue_area_mm2(self) -> float:
        """Tissue area covered by the grid's cells, mm²."""
        return float(self.tissue_fraction.astype(np.float64).sum()) * self.cell_area_mm2

    @property
    def level_scale(self) -> float:
        """Read-level px per tile px (1.0 when the level is exactly at read_mpp)."""
        return self.downsample / self.level_downsample

    @property
    def level_tile_px(self) -> int:
        """Tile side at the read level, px."""
        return max(1, int(round(self.tile_px * self.level_scale)))

    def level_origins(self) -> np.ndarray:
        """(N, 2) int64 top-left of each tile in read-level px."""
        target = self.cols_rows.astype(np.float64) * self.stride_px - self.margin_px
        return np.round(target * self.level_scale).astype(np.int64)

    @property
    def n_chunks(self) -> int:
        return int(self.chunk_starts.shape[0] - 1)

    @property
    def subcells(self) -> int:
        """Sub-cells per cell side (1 without sub-cells)."""
        return 1 if self.subcell_fraction is None else int(self.subcell_fraction.shape[1])

    def subcell_grid(self) -> "TileGrid":
        """The grid whose cells are this grid's sub-cells (cell side ``stride_px / k``, tiles of the
        same size; for drawing and measuring regions, not for reading tiles), tile by tile
        and row-major inside each tile, so sub-cell ``i * k + j`` of tile ``t`` is row ``t * k² + i * k + j``."""
        if self.subcell_fraction is None:
            raise ValueError("the grid has no sub-cells (tiling.refine is none)")
        k = self.subcells
        i, j = np.divmod(np.arange(k * k), k)
        cols_rows = (self.cols_rows[:, None, :] * k + np.stack([j, i], axis=1)[None]).reshape(-1, 2)
        side = self.stride_px / k if self.stride_px % k else self.stride_px // k
        return replace(self, cols_rows=cols_rows.astype(np.int32), tissue_fraction=self.subcell_fraction.reshape(-1),
                       chunk_starts=self.chunk_starts * k * k, tile_px=side, stride_px=side,
                       chunk_cells=self.chunk_cells * k, subcell_fraction=None)

    def subset(self, keep: np.ndarray) -> "TileGrid":
        """The grid of the tiles where ``keep`` (N,) bool is True, chunk order kept."""
        cols_rows = self.cols_rows[keep]
        blocks = cols_rows // self.chunk_cells
        change = np.flatnonzero((np.diff(blocks, axis=0) != 0).any(axis=1)) + 1 if len(blocks) else []
        starts = np.concatenate([[0], change, [len(blocks)]]).astype(np.int64) if len(blocks) else np.zeros(1, np.int64)
        sub = None if self.subcell_fraction is None else self.subcell_fraction[keep]
        return replace(self, cols_rows=cols_rows, tissue_fraction=self.tissue_fraction[keep], chunk_starts=starts,
                       subcell_fraction=sub)


def tile_grid(slide: Slide, mask: TissueMask, cfg: TilingConfig = TilingConfig()) -> TileGrid:
    """Cells with at least ``cfg.min_tissue_fraction`` tissue, at ``cfg.target_mpp`` µm/px."""
    downsample = cfg.target_mpp / slide.mpp
    stride_l0 = cfg.stride_px * downsample
    w0, h0 = slide.dimensions_px
    n_cols = int(math.ceil(w0 / stride_l0))
    n_rows = int(math.ceil(h0 / stride_l0))

    # exact (fractional-pixel) tissue coverage of each cell, (n_rows, n_cols)
    fractions = np.clip(_box_means(mask.mask, stride_l0 / mask.downsample, n_rows, n_cols), 0.0, 1.0)

    keep = (fractions > 0) & (fractions >= cfg.min_tissue_fraction)
    level = slide.level_for_mpp(cfg.target_mpp)
    level_ds = slide.levels[level].downsample
    chunk_cells = max(1, int(cfg.read_region_px // max(1.0, cfg.stride_px * downsample / level_ds)))

    rows, cols = np.nonzero(keep)
    chunk_id = (rows // chunk_cells) * (n_cols // chunk_cells + 1) + cols // chunk_cells
    order = np.lexsort((cols, rows, chunk_id))
    rows, cols, chunk_id = rows[order], cols[order], chunk_id[order]
    boundaries = np.flatnonzero(np.diff(chunk_id)) + 1
    chunk_starts = np.concatenate([[0], boundaries, [len(rows)]]).astype(np.int64) if len(rows) else np.zeros(1, np.int64)
    subcell_fraction = None
    if cfg.refine != "none":
        k = cfg.subcells
        sub = np.clip(_box_means(mask.mask, stride_l0 / k / mask.downsample, n_rows * k, n_cols * k), 0.0, 1.0)
        subcell_fraction = sub.reshape(n_rows, k, n_cols, k)[rows, :, cols, :].astype(np.float32)
    return TileGrid(
        cols_rows=np.stack([cols, rows], axis=1).astype(np.int32),
        tissue_fraction=fractions[rows, cols].astype(np.float32),
        chunk_starts=chunk_starts,
        tile_px=cfg.tile_px,
        stride_px=cfg.stride_px,
        read_mpp=cfg.target_mpp,
        slide_mpp=slide.mpp,
        read_level=level,
        level_downsample=level_ds,
        chunk_cells=chunk_cells,
        subcell_fraction=subcell_fraction,
    )


def subcell_pool_weights(grid: TileGrid, feature_px: int) -> np.ndarray:
    """(k, feature_px) float32: along one axis, the share of sub-cell ``i`` covered by position
    ``p`` of a ``feature_px``-wide feature map that spans the whole tile (rows sum to 1).

    The cell is the tile's central ``stride_px``; sub-cell ``i`` spans tile px
    ``[margin + i * s, margin + (i + 1) * s)`` with ``s = stride_px / k``; position ``p`` spans
    ``[p, p + 1) * tile_px / feature_px``.
    """
    k = grid.subcells
    sub = grid.margin_px + np.arange(k + 1) * (grid.stride_px / k)
    pos = np.arange(feature_px + 1) * (grid.tile_px / feature_px)
    overlap = np.clip(np.minimum(sub[1:, None], pos[None, 1:]) - np.maximum(sub[:-1, None], pos[None, :-1]), 0, None)
    return (overlap / overlap.sum(axis=1, keepdims=True)).astype(np.float32)


def cell_means(grid: TileGrid, image: np.ndarray, downsample: float) -> np.ndarray:
    """(N,) mean of a ``[y, x]`` ``image`` (``downsample`` level-0 px per px) over each tile's cell.

    Exact fractional-pixel averaging; the part of a cell outside the image does not count.
    """
    if len(grid) == 0:
        return np.zeros(0, np.float64)
    cell_px = grid.stride_l0 / downsample
    n_cols, n_rows = (int(v) + 1 for v in grid.cols_rows.max(axis=0))
    sums = _box_means(image, cell_px, n_rows, n_cols)
    covered = _box_means(np.ones(image.shape, bool), cell_px, n_rows, n_cols)
    rows, cols = grid.cols_rows[:, 1], grid.cols_rows[:, 0]
    return sums[rows, cols] / np.maximum(covered[rows, cols], 1e-12)


def _box_means(image: np.ndarray, cell_px: float, n_rows: int, n_cols: int) -> np.ndarray:
    """(n_rows, n_cols) means of ``image`` over square cells of ``cell_px`` (fractional) px from
    its origin; px outside the image count 0. Whole-px cells are block sums, others come from the
    integral image."""
    if cell_px >= 1 and abs(cell_px - round(cell_px)) < 1e-9:
        c = int(round(cell_px))
        return _block_sums(image, c, n_rows, n_cols) / float(c * c)
    return _box_means_integral(image, np.arange(n_cols + 1) * cell_px, np.arange(n_rows + 1) * cell_px)


def _block_sums(image: np.ndarray, c: int, n_rows: int, n_cols: int) -> np.ndarray:
    """(n_rows, n_cols) float64 sums of ``image`` over ``c`` x ``c`` px blocks from the origin
    (px outside the image count 0): whole rows first, then columns of the much smaller result."""
    h, w = min(image.shape[0], n_rows * c), min(image.shape[1], n_cols * c)
    dtype = np.float64 if image.dtype.kind == "f" else np.int64
    rows = np.zeros((n_rows, w), dtype)
    whole = h // c
    if whole:
        rows[:whole] = image[:whole * c, :w].reshape(whole, c, w).sum(axis=1, dtype=dtype)
    if h > whole * c:
        rows[whole] = image[whole * c:h, :w].sum(axis=0, dtype=dtype)
    out = np.zeros((n_rows, n_cols), np.float64)
    cols = w // c
    if cols:
        out[:, :cols] = rows[:, :cols * c].reshape(n_rows, cols, c).sum(axis=2)
    if w > cols * c:
        out[:, cols] = rows[:, cols * c:w].sum(axis=1)
    return out


def _box_means_integral(mask: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Mean of ``mask`` over boxes [xs[j], xs[j+1]) × [ys[i], ys[i+1]) in fractional mask px: the integral of a pixel-constant image is bilinear inside
    each pixel, so interpolating the integral image gives exact fractional coverage."""
    h, w = mask.shape
    integral = np.zeros((h + 1, w + 1), np.float64)
    integral[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.float64), axis=1)

    def axis_weights(coords: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        c = np.clip(coords, 0, n)
        i0 = np.minimum(np.floor(c).astype(np.int64), n - 1) if n > 0 else np.zeros_like(c, np.int64)
        return i0, i0 + 1, c - i0

    x0, x1, fx = axis_weights(xs, w)
    y0, y1, fy = axis_weights(ys, h)
    # Interpolate along x for every needed row, then along y.
    along_x = integral[:, x0] * (1 - fx) + integral[:, x1] * fx          # (h+1, n_cols+1)
    corners = along_x[y0, :] * (1 - fy)[:, None] + along_x[y1, :] * fy[:, None]  # (n_rows+1, n_cols+1)
    sums = corners[1:, 1:] - corners[:-1, 1:] - corners[1:, :-1] + corners[:-1, :-1]
    area = np.diff(xs)[None, :] * np.diff(ys)[:, None]
    return sums / area


class TileReader:
    """Reads the tiles of a grid chunk by chunk: one region read per chunk, cut into tiles.

    ``fast=True`` decodes tiled-JPEG TIFF/SVS levels directly (:mod:`wsi_response.jpegtiles`),
    with a half-size DCT decode when the tiles are exactly half the level's resolution, once a
    probe of real tiles matched the slide's own backend (OpenSlide by default) within
    ``MAX_PROBE_MAD`` grey levels on average; otherwise it reads through the slide's backend.
    ``backend`` says which. Picklable (a worker process reopens the files) and fork-safe (a
    forked process reopens them before its first read instead of sharing handles and offsets).
    """

    MAX_PROBE_MAD = MAX_PROBE_MAD  # jpegtiles' bound (a class attribute, so a test can change it)
    PROBE_TILES = 4

    def __init__(self, slide: Slide, grid: TileGrid, fast: bool = True) -> None:
        self.slide = slide
        self.grid = grid
        self._level_origins = grid.level_origins()
        self._pid = os.getpid()
        self._fast: JpegTileReader | None = None
        self.reduce = 1
        self.backend = slide.backend
        if fast and len(grid):
            self._choose_fast_path()

    def _choose_fast_path(self) -> None:
        level = self.grid.read_level
        probe = np.linspace(0, len(self.grid) - 1, min(self.PROBE_TILES, len(self.grid))).astype(int)
        fast = verified_jpeg_reader(self.slide, level, lambda read: self._tiles(probe, read, 1), self.MAX_PROBE_MAD)
        if fast is None:
            return
        self._fast = fast
        self.backend = f"jpeg-tiles (matched {self.slide.backend} on {len(probe)} probe tiles)"
        if abs(self.grid.level_scale - 2.0) < 1e-9 and fast.supports(level, 2):
            reference = self._tiles(probe, self.slide.read_level, 1)
            halved = self._tiles(probe, lambda lv, o, sz: fast.read_level(lv, o, sz, reduce=2), 2)
            if mean_abs_diff(reference, halved) <= self.MAX_PROBE_MAD:
                self.reduce = 2
                self.backend += ", half-size DCT decode"

    def _tiles(self, indices: np.ndarray, read: Any, reduce: int) -> np.ndarray:
        """Tiles by index, one read each, through ``read(level, origin, size)`` at 1/``reduce``."""
        size = self.grid.level_tile_px // reduce
        out = np.empty((len(indices), self.grid.tile_px, self.grid.tile_px, 3), np.uint8)
        for i, index in enumerate(indices):
            x, y = (int(v) // reduce for v in self._level_origins[int(index)])
            out[i] = self._to_tile(read(self.grid.read_level, (x, y), (size, size)))
        return out

    def _read_fn(self) -> Any:
        """``read(level, origin, size)`` of the chosen path, reopened in a new process."""
        if os.getpid() != self._pid:
            self.slide = self.slide.reopen()
            if self._fast is not None:
                self._fast = open_jpeg_tile_reader(self.slide.path, self.slide.levels)
            self._pid = os.getpid()
        if self._fast is None:
            return self.slide.read_level
        fast, reduce = self._fast, self.reduce
        return lambda level, origin, size: fast.read_level(level, origin, size, reduce=reduce)

    def __reduce__(self) -> tuple:
        return (_rebuild_reader, (self.slide, self.grid, self._fast is not None, self.reduce, self.backend))

    def read_chunk(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Tile indices and RGB uint8 tiles ``(n, tile_px, tile_px, 3)`` of chunk ``k``."""
        start, stop = int(self.grid.chunk_starts[k]), int(self.grid.chunk_starts[k + 1])
        origins = self._level_origins[start:stop] // self.reduce
        size = self.grid.level_tile_px // self.reduce
        x0, y0 = origins.min(axis=0)
        x1, y1 = origins.max(axis=0) + size
        region = self._read_fn()(self.grid.read_level, (int(x0), int(y0)), (int(x1 - x0), int(y1 - y0)))
        tiles = np.empty((stop - start, self.grid.tile_px, self.grid.tile_px, 3), np.uint8)
        for i, (x, y) in enumerate(origins - (x0, y0)):
            tiles[i] = self._to_tile(region[y:y + size, x:x + size])
        return np.arange(start, stop), tiles

    def read_tiles(self, indices: np.ndarray) -> np.ndarray:
        """Tiles by index, one read each (for sampling; use chunks for whole grids)."""
        return self._tiles(np.asarray(indices), self._read_fn(), self.reduce)

    def iter_chunks(self, chunks: range | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``read_chunk`` over ``chunks`` (all by default)."""
        for k in chunks if chunks is not None else range(self.grid.n_chunks):
            yield self.read_chunk(k)

    def _to_tile(self, pixels: np.ndarray) -> np.ndarray:
        return resample_tile(pixels, self.grid.tile_px)

    def close(self) -> None:
        if self._fast is not None:
            self._fast.close()


def resample_tile(pixels: np.ndarray, n: int) -> np.ndarray:
    """RGB ``pixels`` as an ``n`` × ``n`` tile: a plain average of k × k pixels when shrinking by a
    whole factor k (what a half-size JPEG DCT decode approximates), antialiased bilinear otherwise."""
    if pixels.shape[0] == n and pixels.shape[1] == n:
        return pixels
    whole = pixels.shape[0] > n and pixels.shape[0] % n == 0
    image = Image.fromarray(np.ascontiguousarray(pixels))
    return np.asarray(image.resize((n, n), Image.Resampling.BOX if whole else Image.Resampling.BILINEAR))


def _rebuild_reader(slide: Slide, grid: TileGrid, fast: bool, reduce: int, backend: str) -> TileReader:
    """A reader in another process on the path its parent chose (no new probe)."""
    reader = TileReader(slide, grid, fast=False)
    if fast:
        reader._fast = open_jpeg_tile_reader(slide.path, slide.levels)
        reader.reduce, reader.backend = reduce, backend
    return reader
