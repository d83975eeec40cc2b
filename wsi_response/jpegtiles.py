"""Direct decoding of a tiled JPEG TIFF/SVS level: raw tile bytes -> libjpeg-turbo -> region.

The fast read path of :class:`~wsi_response.tiling.TileReader`. For each region it fetches the
compressed tiles it needs in one sorted pass over the file (``read_segments`` merges adjacent
reads) and decodes each, merged with the page's shared JPEG tables and colour space, with
libjpeg-turbo (simplejpeg), skipping tiffslide's zarr layer. With ``reduce=2`` it asks for a
half-size DCT decode, which is how a 0.5 µm/px tile is read from a 0.25 µm/px level at a fraction
of the cost. Decoding is strict: a tile libjpeg reports as corrupt (even by a warning, as OpenSlide
treats them) raises :class:`~wsi_response.errors.SlideReadError` naming the level and the tile.
``level_streams`` returns a region's tiles still compressed, as complete JPEG streams, for a
decoder elsewhere (nvJPEG on the GPU: :mod:`wsi_response.inference`).

Only levels that are tiled, JPEG-compressed, 8-bit, 3-sample and contiguous are served; the
caller checks on a probe region that the pixels match OpenSlide's before trusting it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import simplejpeg

from .slide import Level, Slide, corrupt_tile_error, read_clipped

__all__ = ["JpegTileReader", "open_jpeg_tile_reader", "verified_jpeg_reader", "mean_abs_diff", "MAX_PROBE_MAD"]

MAX_PROBE_MAD = 1.0  # mean absolute difference from the slide's own backend a fast read may show, grey levels
ReadFn = Callable[[int, tuple[int, int], tuple[int, int]], np.ndarray]  # read(level, origin, size) -> RGB

_JPEG = 7  # TIFF Compression tag value of "new-style" JPEG
_RGB = 2   # TIFF PhotometricInterpretation: components stored as RGB (Aperio), not YCbCr
# APP14 "Adobe" segment with transform 0: tells a JPEG decoder the 3 components are RGB, not YCbCr
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"


class JpegTileReader:
    """Regions of a tiled-JPEG slide's levels, decoded tile by tile (``reduce`` 1 or 2)."""

    def __init__(self, path: Path, pages: list[Any], levels: tuple[Level, ...], tif: Any) -> None:
        self.path = path
        self._tif = tif
        self._pages = pages
        self.levels = levels

    def supports(self, level: int, reduce: int = 1) -> bool:
        """Whether ``level`` can be read here (and with DCT reduction ``reduce``)."""
        page = self._pages[level]
        if page is None:
            return False
        if reduce == 1:
            return True
        tables = page.jpegtables or b""
        return reduce == 2 and page.tilewidth % 16 == 0 and page.tilelength % 16 == 0 and (
            not tables or (tables[:2] == b"\xff\xd8" and tables[-2:] == b"\xff\xd9"))

    def read_level(self, level: int, origin: tuple[int, int], size_px: tuple[int, int],
                   reduce: int = 1) -> np.ndarray:
        """RGB uint8 ``[h, w, 3]``; ``origin``/``size_px`` in px of ``level`` divided by ``reduce``."""
        w, h = self.levels[level].dimensions_px
        dims = (-(-w // reduce), -(-h // reduce))
        return read_clipped(lambda lv, o, s: self._read(lv, o, s, reduce), dims, level, origin, size_px)

    def tile_size_px(self, level: int) -> tuple[int, int]:
        """(width, height) of the stored tiles of ``level``, px (edge tiles are stored padded to it)."""
        page = self._pages[level]
        return int(page.tilewidth), int(page.tilelength)

    def level_streams(self, level: int, origin: tuple[int, int], size_px: tuple[int, int]
                      ) -> tuple[list[bytes], np.ndarray]:
        """The stored tiles of ``level`` that overlap a region, as complete JPEG streams, undecoded.

        ``origin``/``size_px``: the region in px of ``level``; the part outside the level is
        ignored. Returns the streams, row by row, and the ``(n, 2)`` int64 top-left ``(x, y)`` of
        each tile in px of ``level`` (tiles are ``tile_size_px(level)``). Each stream is
        self-contained: the page's shared tables merged into the abbreviated tile stream (as
        ``tables[:-2] + data[2:]``: tables without their end marker, tile data without its start
        marker) and, where the page stores RGB rather than YCbCr (Aperio), an
        Adobe marker saying so, so that any JPEG decoder gets the colours right. Tiles stored
        empty (sparse files) are left out.
        """
        page = self._pages[level]
        lw, lh = self.levels[level].dimensions_px
        tw, th = self.tile_size_px(level)
        across = -(-page.imagewidth // tw)
        x0, y0 = max(int(origin[0]), 0), max(int(origin[1]), 0)
        x1, y1 = min(int(origin[0]) + int(size_px[0]), lw), min(int(origin[1]) + int(size_px[1]), lh)
        if x0 >= x1 or y0 >= y1:
            return [], np.zeros((0, 2), np.int64)
        indices = [ty * across + tx for ty in range(y0 // th, (y1 - 1) // th + 1)
                   for tx in range(x0 // tw, (x1 - 1) // tw + 1) if page.databytecounts[ty * across + tx] > 0]
        head = _stream_head(page)
        found: dict[int, bytes] = {}
        offsets = [page.dataoffsets[i] for i in indices]
        counts = [page.databytecounts[i] for i in indices]
        for data, index in self._tif.filehandle.read_segments(offsets, counts, indices=indices, sort=True):
            found[index] = head + data[2:]
        positions = np.array([((i % across) * tw, (i // across) * th) for i in indices], np.int64).reshape(-1, 2)
        return [found[i] for i in indices], positions

    def _read(self, level: int, origin: tuple[int, int], size: tuple[int, int], reduce: int) -> np.ndarray:
        page = self._pages[level]
        tw, th = page.tilewidth // reduce, page.tilelength // reduce
        across = -(-page.imagewidth // page.tilewidth)
        x0, y0 = origin
        tx0, ty0 = x0 // tw, y0 // th
        tx1, ty1 = (x0 + size[0] - 1) // tw, (y0 + size[1] - 1) // th
        indices = [ty * across + tx for ty in range(ty0, ty1 + 1) for tx in range(tx0, tx1 + 1)]
        canvas = np.empty(((ty1 - ty0 + 1) * th, (tx1 - tx0 + 1) * tw, 3), np.uint8)
        offsets = [page.dataoffsets[i] for i in indices]
        counts = [page.databytecounts[i] for i in indices]
        head = _stream_head(page)
        for data, index in self._tif.filehandle.read_segments(offsets, counts, indices=indices, sort=True):
            try:
                tile = simplejpeg.decode_jpeg(head + data[2:], colorspace="RGB", min_height=th, min_width=tw,
                                              min_factor=reduce)
            except ValueError as exc:  # simplejpeg is strict: corrupt data raises, never decodes to garbage
                raise corrupt_tile_error(self.path, level, (index % across, index // across),
                                         (page.tilewidth, page.tilelength), exc) from None
            ty, tx = index // across - ty0, index % across - tx0
            canvas[ty * th:(ty + 1) * th, tx * tw:(tx + 1) * tw] = tile[:th, :tw]
        oy, ox = y0 - ty0 * th, x0 - tx0 * tw
        return canvas[oy:oy + size[1], ox:ox + size[0]]

    def close(self) -> None:
        self._tif.close()


def _stream_head(page: Any) -> bytes:
    """What goes before a tile's data (without its SOI) to make a complete JPEG stream: SOI, an Adobe
    marker where the page stores RGB, and the page's shared tables without their SOI and EOI."""
    tables = page.jpegtables[2:-2] if page.jpegtables else b""
    return b"\xff\xd8" + (_ADOBE_RGB if page.photometric == _RGB else b"") + tables


def open_jpeg_tile_reader(path: str | os.PathLike[str], levels: tuple[Level, ...]) -> JpegTileReader | None:
    """A reader for the slide levels stored as tiled 8-bit RGB JPEG, or None if no level is."""
    import tifffile

    path = Path(path)
    try:
        tif = tifffile.TiffFile(path)
    except Exception:
        return None
    series = tif.series[0] if tif.series else None
    pages: list[Any] = []
    for index, level in enumerate(levels):
        page = None
        if series is not None and index < len(series.levels):
            candidate = series.levels[index].pages[0]
            shape_ok = (candidate.imagewidth, candidate.imagelength) == level.dimensions_px
            if (shape_ok and candidate.is_tiled and candidate.compression == _JPEG and candidate.bitspersample == 8
                    and candidate.samplesperpixel == 3 and candidate.planarconfig == 1):
                page = candidate
        pages.append(page)
    if not any(p is not None for p in pages):
        tif.close()
        return None
    return JpegTileReader(path, pages, levels, tif)


def verified_jpeg_reader(slide: Slide, level: int, probe: Callable[[ReadFn], np.ndarray],
                         max_mad: float = MAX_PROBE_MAD) -> JpegTileReader | None:
    """A :class:`JpegTileReader` for ``slide``, if it serves ``level`` and the pixels ``probe(read)``
    reads through it match those it reads through the slide's own backend (``Slide.read_level``)
    within ``max_mad`` grey levels on average; else None."""
    fast = open_jpeg_tile_reader(slide.path, slide.levels)
    if fast is None:
        return None
    if fast.supports(level):
        if mean_abs_diff(probe(slide.read_level), probe(fast.read_level)) <= max_mad:
            return fast
    fast.close()
    return None


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two uint8 images of one shape, grey levels."""
    return float(np.abs(a.astype(np.int16) - b).mean())
