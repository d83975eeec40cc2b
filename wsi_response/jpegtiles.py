"""Direct decoding of a tiled JPEG TIFF/SVS level: raw tile bytes -> libjpeg-turbo -> region.

The fast read path of :class:`~wsi_response.tiling.TileReader`. For each region it fetches the
compressed tiles it needs in one sorted pass over the file (``read_segments`` merges adjacent
reads) and decodes each with the page's shared JPEG tables and colour space
(tifffile's per-tile decoder over imagecodecs' libjpeg-turbo), skipping tiffslide's zarr layer.
With ``reduce=2`` it asks libjpeg-turbo for a half-size DCT decode (simplejpeg), which is how a
0.5 µm/px tile is read from a 0.25 µm/px level at a fraction of the cost.

Only levels that are tiled, JPEG-compressed, 8-bit, 3-sample and contiguous are served; the
caller checks on a probe region that the pixels match OpenSlide's before trusting it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .slide import Level, read_clipped

__all__ = ["JpegTileReader", "open_jpeg_tile_reader"]

_JPEG = 7  # TIFF Compression tag value of "new-style" JPEG


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
        for data, index in self._tif.filehandle.read_segments(offsets, counts, indices=indices, sort=True):
            tile = self._decode(page, data, index, reduce)
            ty, tx = index // across - ty0, index % across - tx0
            canvas[ty * th:(ty + 1) * th, tx * tw:(tx + 1) * tw] = tile[:th, :tw]
        oy, ox = y0 - ty0 * th, x0 - tx0 * tw
        return canvas[oy:oy + size[1], ox:ox + size[0]]

    @staticmethod
    def _decode(page: Any, data: bytes, index: int, reduce: int) -> np.ndarray:
        if reduce == 1:
            segment = page.decode(data, index, jpegtables=page.jpegtables)[0]
            return segment.reshape(segment.shape[-3:])
        import simplejpeg

        tables = page.jpegtables
        stream = tables[:-2] + data[2:] if tables else data  # abbreviated stream + shared tables
        out = simplejpeg.decode_jpeg(stream, colorspace="RGB", min_height=page.tilelength // reduce,
                                     min_width=page.tilewidth // reduce, min_factor=reduce)
        return out

    def close(self) -> None:
        self._tif.close()


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
