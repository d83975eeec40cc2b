"""Out-of-focus tissue: a focus measure read cell by cell, pooled on the tissue mask's grid.

The measure at about ``focus_mpp`` µm/px: the energy of the finest detail (grey minus its
Gaussian of sigma 1 px) over that of a coarser band (Gaussians of sigma 2 and 4 px, taken on the
2 × 2-binned grey, where that band is well inside the Nyquist limit), both pooled over
``focus_smooth_um``. Defocus removes fine detail first, so the ratio drops; stain and contrast
cancel out. Only cells holding tissue are read, through the tile reader (tile-aligned regions,
direct JPEG decode where verified), in worker processes while the caller computes the other
artefact layers (:class:`FocusJob`): memory is a chunk per process plus two float32 planes of
the mask's size, and the work is proportional to the tissue, not to the slide.
"""
from __future__ import annotations

import multiprocessing
import threading
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection, wait
from typing import Any, Iterable, Iterator

import numpy as np

from .children import END_WAIT_S, as_child, end_process, exit_reason
from .config import QcConfig, TilingConfig
from .errors import SlideReadError
from .slide import Slide
from .smoothing import block_mean
from .tiling import TileGrid, TileReader, tile_grid
from .tissue import TissueMask

__all__ = ["FocusJob", "blur_layer", "detail_energies", "focus_k", "focus_cells_config"]

_CELL_MASK_PX = 64  # mask px per side of one read cell
_HALO_PX = 16       # focus px read around each cell: the filters' reach, so cells join seamlessly


def blur_layer(energies: tuple[np.ndarray, np.ndarray], mask: TissueMask, measured: np.ndarray,
               cfg: QcConfig) -> np.ndarray:
    """Tissue px whose sharpness is below ``blur_max_sharpness`` and ``blur_max_relative`` x
    the slide's sharp tissue (both: a slide scanned soft all over is not out of focus), from the
    :class:`FocusJob` ``energies`` (pooled in place) of the tissue that includes ``measured``."""
    if not measured.any():
        return np.zeros_like(measured)
    from scipy import ndimage

    fine, band = energies
    # the ratio of the two Gaussian means over measured px: their common normaliser cancels
    sigma = cfg.focus_smooth_um / mask.mpp

    def pool(energy: np.ndarray) -> None:
        energy *= measured
        ndimage.gaussian_filter(energy, sigma, mode="constant", truncate=3.0, output=energy)

    with ThreadPoolExecutor(2) as threads:  # scipy's filters release the GIL: a plane per core
        list(threads.map(pool, energies))
    sharp = fine
    sharp /= np.maximum(band, 1e-6)
    reference = float(np.percentile(sharp[measured], cfg.focus_reference_percentile))
    return measured & (sharp < min(cfg.blur_max_sharpness, cfg.blur_max_relative * reference))


class FocusJob:
    """Fine and coarse detail energy per mask px of ``mask``'s tissue, float32 ``[y, x]`` on its
    grid (0 outside the cells read), grey levels² (grey = R + G + B): :meth:`result`.

    With ``workers`` > 1 the cells are read and filtered in that many processes from the moment
    the job is made, and a thread of this process files each finished chunk into the two planes,
    so the caller can compute other things meanwhile; otherwise :meth:`result` does the work.
    Focus px are ``mask.mpp / k`` µm, ``k`` the even number of focus px per mask px closest to
    ``mask.mpp / focus_mpp``, so a cell of ``_CELL_MASK_PX`` mask px is a whole number of both.
    """

    def __init__(self, slide: Slide, mask: TissueMask, focus_mpp: float, workers: int = 0) -> None:
        self.slide = slide
        self.k = focus_k(mask.mpp, focus_mpp)
        self.grid = self._cells(mask)
        self.fine = np.zeros(mask.mask.shape, np.float32)
        self.band = np.zeros(mask.mask.shape, np.float32)
        self._reader = TileReader(slide, self.grid)
        self._workers: list[tuple[Any, Connection]] = []
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        if workers > 1 and self.grid.n_chunks > 1:
            context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods()
                                                  else "spawn")
            next_chunk = context.Value("q", 0)  # the next chunk to take, shared by the workers
            for _ in range(min(workers, self.grid.n_chunks)):
                receiver, sender = context.Pipe(duplex=False)
                process = context.Process(target=_work, args=(sender, self._reader, self.k, next_chunk,
                                                              self.grid.n_chunks), daemon=True)
                process.start()
                sender.close()  # the worker holds the only sending end: its end is the pipe's end
                self._workers.append((process, receiver))
            self._thread = threading.Thread(target=self._file_all, args=(_received(self._workers, slide),),
                                            daemon=True)
            self._thread.start()

    def _cells(self, mask: TissueMask) -> TileGrid:
        """The cells holding any px of ``mask``, read with their halo at ``mask.mpp / k`` µm/px."""
        return tile_grid(self.slide, mask, focus_cells_config(mask.mpp, self.k))

    def result(self, mask: TissueMask | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``(fine, band)`` planes, once every cell is done (re-raises a worker's error).

        ``mask``: the tissue the planes must cover when the job was started on another mask of
        the same grid (the tissue's possible extent, before the mask was finished); its cells the
        job did not read are read here.
        """
        try:
            if self._thread is None:
                self._file_all(_energies_of_chunk(self._reader, self.k, c) for c in range(self.grid.n_chunks))
            else:
                self._thread.join()
            if self._error is None and mask is not None:
                self._cover(mask)
        finally:
            self.close()
        if self._error is not None:
            raise self._error
        planes, self.fine, self.band = (self.fine, self.band), None, None  # the caller's now (pooled in place)
        return planes

    def _cover(self, mask: TissueMask) -> None:
        """Read the cells of ``mask`` that this job's grid lacks (in this process)."""
        if mask.mask.shape != self.fine.shape:
            raise ValueError(f"mask {mask.mask.shape} is not on the focus job's grid {self.fine.shape}")
        needed = self._cells(mask)
        missing = needed.subset(~_is_in(needed.cols_rows, self.grid.cols_rows))
        if len(missing):
            reader = TileReader(self.slide, missing)
            try:
                self._file_all((_energies_of_chunk(reader, self.k, c) for c in range(missing.n_chunks)), missing)
            finally:
                reader.close()

    def close(self) -> None:
        """Stop the workers (if still running; bounded waits) and close the reader."""
        for process, _ in self._workers:
            end_process(process)
        if self._thread is not None:
            self._thread.join(END_WAIT_S)  # its workers have ended: it stops at once
        for _, receiver in self._workers:
            receiver.close()
        self._workers = []
        self._reader.close()

    def _file_all(self, chunks: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
                  grid: TileGrid | None = None) -> None:
        """File each chunk's cells of ``grid`` (this job's by default) into the planes."""
        h, w = self.fine.shape
        cols_rows = (self.grid if grid is None else grid).cols_rows
        try:
            for indices, tile_fine, tile_band in chunks:
                for (col, row), f, b in zip(cols_rows[indices], tile_fine, tile_band):
                    y0, x0 = row * _CELL_MASK_PX, col * _CELL_MASK_PX
                    y1, x1 = min(h, y0 + _CELL_MASK_PX), min(w, x0 + _CELL_MASK_PX)
                    self.fine[y0:y1, x0:x1] = f[:y1 - y0, :x1 - x0]
                    self.band[y0:y1, x0:x1] = b[:y1 - y0, :x1 - x0]
        except BaseException as exc:  # handed to result() in the caller's thread
            self._error = exc


def focus_k(mask_mpp: float, focus_mpp: float) -> int:
    """Focus px per mask px: the even number closest to ``mask_mpp / focus_mpp`` (at least 2)."""
    return 2 * max(1, int(round(mask_mpp / focus_mpp / 2)))


def focus_cells_config(mask_mpp: float, k: int) -> TilingConfig:
    """The read cells of the focus measure: ``_CELL_MASK_PX`` mask px each, with their halo, at
    ``mask_mpp / k`` µm/px."""
    side = _CELL_MASK_PX * k
    return TilingConfig(target_mpp=mask_mpp / k, tile_px=side + 2 * _HALO_PX, stride_px=side, min_tissue_fraction=0.0)


def _is_in(cols_rows: np.ndarray, among: np.ndarray) -> np.ndarray:
    """(N,) bool: which (column, row) pairs of ``cols_rows`` occur in ``among``."""
    def key(a: np.ndarray) -> np.ndarray:
        return a[:, 0].astype(np.int64) << 32 | a[:, 1].astype(np.int64)

    return np.isin(key(cols_rows), key(among))


def _work(results: Connection, reader: TileReader, k: int, next_chunk: Any, n_chunks: int) -> None:
    """Worker process: the energies of the chunks it takes from the shared counter ``next_chunk``,
    sent one by one, then its end of the pipe closes; an error is sent in place of a chunk."""
    as_child()
    try:
        while True:
            with next_chunk.get_lock():
                chunk = next_chunk.value
                next_chunk.value += 1
            if chunk >= n_chunks:
                return
            results.send(_energies_of_chunk(reader, k, chunk))
    except Exception as exc:
        try:
            results.send(exc)
        except Exception:  # an error that does not pickle: its text
            results.send(RuntimeError(f"{type(exc).__name__}: {exc}"))


def _received(workers: list[tuple[Any, Connection]], slide: Slide
              ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The chunks ``workers`` send, as they come; raises a worker's error, or
    :class:`SlideReadError` when a worker dies (never waits for a dead one)."""
    live = list(workers)
    while live:
        wait([handle for process, receiver in live for handle in (receiver, process.sentinel)])
        for process, receiver in list(live):
            ended = not process.is_alive()  # checked first: all it sent is in the pipe by now
            try:
                while receiver.poll():
                    item = receiver.recv()
                    if isinstance(item, BaseException):
                        raise item
                    yield item
            except EOFError:
                ended = True
            if ended:
                live.remove((process, receiver))
                process.join(END_WAIT_S)
                if process.exitcode != 0:
                    raise SlideReadError(slide.path, f"a focus measure worker process {exit_reason(process.exitcode)}")


def _energies_of_chunk(reader: TileReader, k: int, k_chunk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    indices, tiles = reader.read_chunk(k_chunk)
    return (indices, *detail_energies(tiles, k, _HALO_PX))


def detail_energies(tiles: np.ndarray, k: int, halo: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean fine and coarse detail energy per ``k`` × ``k`` block of RGB uint8 ``tiles``
    ``(n, T, T, 3)`` whose outer ``halo`` px (a multiple of 4, at least 16: the filters' reach)
    only feed the filters. Returns two float32 ``(n, S, S)`` (``S = (T - 2 halo) / k``), grey
    levels² (grey = R + G + B). Every filter is a binomial (a Gaussian of exactly its variance)
    computed by shifted adds over valid px only, so cells join without seams."""
    n, size = tiles.shape[:2]
    grey = tiles[..., 0].astype(np.float32)
    grey += tiles[..., 1]
    grey += tiles[..., 2]
    inner = slice(halo, size - halo)
    fine = grey[:, inner, inner] - _binomial(grey[:, halo - 2:size - halo + 2, halo - 2:size - halo + 2], 4)
    fine *= fine
    # sigma 2 and 4 focus px = 1 and 2 px of the 2 x 2-binned grey (variance 4 = 1 + 3: orders 4 and 12)
    hb, half = halo // 2, size // 2
    low = _binomial(block_mean(grey, 2)[:, hb - 8:half - hb + 8, hb - 8:half - hb + 8], 4)
    band = low[:, 6:-6, 6:-6] - _binomial(low, 12)
    band *= band
    return block_mean(fine, k), block_mean(band, k // 2)


def _binomial(a: np.ndarray, order: int) -> np.ndarray:
    """``a`` ``(n, H, W)`` filtered by the binomial of ``order`` (even; variance order / 4 px²) along
    both image axes, valid px only: ``(n, H - order, W - order)``."""
    for axis in (1, 2):
        for _ in range(order):
            a = a[:, 1:, :] + a[:, :-1, :] if axis == 1 else a[:, :, 1:] + a[:, :, :-1]
    a *= np.float32(0.5 ** (2 * order))
    return a
