"""Open whole-slide images through OpenSlide or tiffslide, with MPP and its provenance.

Coordinates are ``(x, y)`` in level-0 pixels unless a name says ``_level`` (pixels of one pyramid
level); sizes are ``(width, height)``; arrays are ``[y, x, rgb]`` uint8. Transparent or
out-of-slide pixels are returned as white (255), like glass.

Bad input is refused at open time with a one-line :class:`SlideFormatError` where the file's
structure shows it (empty, text, truncated, samples other than 8-bit, a level whose smallest
decodable unit needs more than :data:`MAX_DECODE_BYTES`), and at read time with a
:class:`SlideReadError` naming the level and the stored tile whose data is corrupt. OpenSlide's
handle is unusable after a decode error; the backend handle replaces it before raising.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .errors import MissingMppError, SlideFormatError, SlideNotFoundError, SlideReadError
from .inputs import file_problem

__all__ = ["Slide", "Level", "open_slide", "corrupt_tile_error", "BACKENDS", "MPP_RANGE", "MAX_DECODE_BYTES"]

BACKENDS = ("auto", "openslide", "tiffslide")
MPP_RANGE = (0.05, 100.0)  # plausible microns per level-0 pixel
# Most memory, bytes, that decoding one strip or tile of a slide level may need. The backends decode
# a whole strip to read any pixel of it, so a level stored as one huge strip would be OOM-killed.
MAX_DECODE_BYTES = 1_000_000_000


@dataclass(frozen=True)
class Level:
    """One pyramid level: its size in its own pixels and its level-0 px per level px."""

    dimensions_px: tuple[int, int]
    downsample: float


@dataclass(frozen=True)
class Slide:
    """An opened slide. Picklable: a worker process that unpickles it reopens the file."""

    path: Path
    backend: str                      # "openslide" | "tiffslide"
    backend_reason: str               # why "auto" chose this backend (or "asked for")
    vendor: str                       # OpenSlide/tiffslide vendor string, e.g. "aperio", "generic-tiff"
    levels: tuple[Level, ...]
    mpp: float                        # µm per level-0 pixel
    mpp_source: str                   # "override" | "metadata" | "tiff-resolution"
    bounds_offset_l0: tuple[int, int]  # OpenSlide bounds-x/-y (0, 0 when the slide has none)
    objective_power: float | None
    properties: Mapping[str, str] = field(repr=False)
    mpp_override: float | None = field(default=None, repr=False)
    _handle: Any = field(default=None, repr=False, compare=False)

    @property
    def dimensions_px(self) -> tuple[int, int]:
        """Level-0 ``(width, height)`` in pixels."""
        return self.levels[0].dimensions_px

    @property
    def slide_id(self) -> str:
        """The file name without its extension."""
        return self.path.stem

    def level_mpp(self, level: int) -> float:
        """µm per pixel of ``level``."""
        return self.mpp * self.levels[level].downsample

    def level_for_mpp(self, target_mpp: float) -> int:
        """The coarsest level whose resolution is at least as fine as ``target_mpp`` (µm/px).

        A 0.25 µm/px slide with levels ×1, ×4, ×16 reads level 1 for 1.0 µm/px. A tiny tolerance
        keeps a level of 1.0002 µm/px eligible for a 1.0 µm/px target.
        """
        best = 0
        for index in range(len(self.levels)):
            if self.level_mpp(index) <= target_mpp * 1.001:
                best = index
        return best

    def read_region(self, origin_l0: tuple[int, int], level: int, size_px: tuple[int, int]) -> np.ndarray:
        """RGB uint8 ``[h, w, 3]`` of ``size_px`` level pixels whose top-left is ``origin_l0``."""
        ds = self.levels[level].downsample
        origin_level = (int(math.floor(origin_l0[0] / ds)), int(math.floor(origin_l0[1] / ds)))
        return self.read_level(level, origin_level, size_px)

    def read_level(self, level: int, origin_level: tuple[int, int], size_px: tuple[int, int]) -> np.ndarray:
        """RGB uint8 ``[h, w, 3]`` of ``level`` pixels from ``origin_level`` (pixels of that level).

        Parts outside the level are white.
        """
        try:
            return read_clipped(self._handle.read, self.levels[level].dimensions_px, level, origin_level, size_px)
        except Exception as exc:  # the backends raise assorted types on corrupt data
            raise self._corrupt_tile(level, origin_level, size_px, exc) from None

    def _corrupt_tile(self, level: int, origin_level: tuple[int, int], size_px: tuple[int, int],
                      exc: Exception) -> SlideReadError:
        """The error of a failed read, naming the first stored tile of the region that fails alone."""
        tile_px = self._stored_tile_px(level)
        if tile_px is not None:
            tw, th = tile_px
            lw, lh = self.levels[level].dimensions_px
            x0, y0 = max(int(origin_level[0]), 0), max(int(origin_level[1]), 0)
            x1, y1 = min(int(origin_level[0]) + int(size_px[0]), lw), min(int(origin_level[1]) + int(size_px[1]), lh)
            for row in range(y0 // th, (y1 - 1) // th + 1):
                for col in range(x0 // tw, (x1 - 1) // tw + 1):
                    try:
                        self._handle.read(level, (col * tw, row * th), (min(tw, lw - col * tw), min(th, lh - row * th)))
                    except Exception as tile_exc:
                        return corrupt_tile_error(self.path, level, (col, row), (tw, th), tile_exc)
        return SlideReadError(self.path, f"cannot read level {level} at {tuple(origin_level)}, "
                              f"{size_px[0]} x {size_px[1]} px: {exc}")

    def _stored_tile_px(self, level: int) -> tuple[int, int] | None:
        """(width, height) px of the stored tiles of ``level`` as the backend reports them; None if untiled."""
        for prefix in ("openslide", "tiffslide"):
            w, h = (self.properties.get(f"{prefix}.level[{level}].tile-{side}") for side in ("width", "height"))
            if w and h:
                return int(w), int(h)
        return None

    def thumbnail(self, max_px: int = 1024) -> np.ndarray:
        """RGB uint8 image of the whole slide whose long side is at most ``max_px``."""
        from PIL import Image

        w0, h0 = self.dimensions_px
        scale = max(w0, h0) / max_px
        level = max((i for i, lv in enumerate(self.levels) if lv.downsample <= max(scale, 1.0)), default=0)
        lw, lh = self.levels[level].dimensions_px
        image = self.read_level(level, (0, 0), (lw, lh))
        target = (max(1, round(w0 / max(scale, 1.0))), max(1, round(h0 / max(scale, 1.0))))
        if target == (lw, lh):
            return image
        return np.asarray(Image.fromarray(image).resize(target, Image.Resampling.BOX))

    def info(self) -> dict[str, Any]:
        """Everything ``wsi-response info`` prints (field names as in ``slide.json``)."""
        return {
            "path": str(self.path),
            "slide_id": self.slide_id,
            "format": self.vendor,
            "backend": self.backend,
            "backend_reason": self.backend_reason,
            "dimensions_px": list(self.dimensions_px),
            "mpp": self.mpp,
            "mpp_source": self.mpp_source,
            "objective_power": self.objective_power,
            "bounds_offset_l0": list(self.bounds_offset_l0),
            "file_size_bytes": self.path.stat().st_size,
            "levels": [
                {"dimensions_px": list(lv.dimensions_px), "downsample": lv.downsample,
                 "mpp": self.mpp * lv.downsample}
                for lv in self.levels
            ],
        }

    def close(self) -> None:
        """Release the file handle."""
        if self._handle is not None:
            self._handle.close()

    def reopen(self) -> "Slide":
        """A fresh handle on the same file (after OpenSlide's handle died on a corrupt tile)."""
        return open_slide(self.path, backend=self.backend, mpp=self.mpp_override)

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, ...]:
        return (open_slide, (self.path, self.backend, self.mpp_override))


def corrupt_tile_error(path: Path, level: int, col_row: tuple[int, int], tile_px: tuple[int, int],
                       exc: Exception) -> SlideReadError:
    """The one-line error for a stored tile that cannot be decoded: file, level, tile and level px."""
    (col, row), (tw, th) = col_row, tile_px
    detail = " ".join(str(exc).split()) or type(exc).__name__
    return SlideReadError(path, f"corrupt image data in level {level}, tile column {col}, row {row} "
                          f"(level px {col * tw}, {row * th}): {detail}")


def read_clipped(read: Any, level_dims: tuple[int, int], level: int, origin: tuple[int, int],
                 size_px: tuple[int, int]) -> np.ndarray:
    """``read(level, origin, size)`` for the part inside the level; white (glass) elsewhere."""
    w, h = int(size_px[0]), int(size_px[1])
    if w <= 0 or h <= 0:
        raise ValueError(f"size_px must be positive, got {size_px}")
    lw, lh = level_dims
    x0, y0 = int(origin[0]), int(origin[1])
    cx0, cy0 = max(x0, 0), max(y0, 0)
    cx1, cy1 = min(x0 + w, lw), min(y0 + h, lh)
    if cx0 >= cx1 or cy0 >= cy1:
        return np.full((h, w, 3), 255, np.uint8)
    inner = read(level, (cx0, cy0), (cx1 - cx0, cy1 - cy0))
    if (cx0, cy0, cx1, cy1) == (x0, y0, x0 + w, y0 + h):
        return inner
    out = np.full((h, w, 3), 255, np.uint8)
    out[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0] = inner
    return out


class _OpenSlideHandle:
    """OpenSlide behind the small interface Slide needs."""

    def __init__(self, path: Path) -> None:
        import openslide

        self._path = path
        self._slide = openslide.OpenSlide(str(path))
        self.properties = dict(self._slide.properties)
        self.vendor = self.properties.get("openslide.vendor", "unknown")
        self.levels = tuple(
            Level((int(w), int(h)), float(ds))
            for (w, h), ds in zip(self._slide.level_dimensions, self._slide.level_downsamples)
        )

    def read(self, level: int, origin_level: tuple[int, int], size_px: tuple[int, int]) -> np.ndarray:
        ds = self.levels[level].downsample
        # OpenSlide takes level-0 coordinates and divides by the downsample; round to hit the pixel.
        origin_l0 = (int(round(origin_level[0] * ds)), int(round(origin_level[1] * ds)))
        try:
            rgba = np.asarray(self._slide.read_region(origin_l0, level, size_px))
        except Exception:  # after a decode error every later read fails: never reuse the dead handle
            import openslide

            self._slide.close()
            self._slide = openslide.OpenSlide(str(self._path))
            raise
        return _rgba_on_white(rgba)

    def close(self) -> None:
        self._slide.close()


class _TiffSlideHandle:
    """tiffslide (tifffile + imagecodecs) behind the small interface Slide needs."""

    def __init__(self, path: Path) -> None:
        import tiffslide

        self._slide = tiffslide.TiffSlide(str(path))
        props = self._slide.properties
        self.properties = {k: str(v) for k, v in props.items() if v is not None}
        self.vendor = str(props.get("tiffslide.vendor") or "unknown")
        self.levels = tuple(
            Level((int(w), int(h)), float(ds))
            for (w, h), ds in zip(self._slide.level_dimensions, self._slide.level_downsamples)
        )
        self._arrays = [self._slide.zarr_group[str(i)] for i in range(len(self.levels))]

    def read(self, level: int, origin_level: tuple[int, int], size_px: tuple[int, int]) -> np.ndarray:
        x, y = origin_level
        w, h = size_px
        arr = np.asarray(self._arrays[level][y:y + h, x:x + w])
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        if arr.shape[2] == 4:
            return _rgba_on_white(arr)
        return np.ascontiguousarray(arr[..., :3])

    def close(self) -> None:
        self._slide.close()


def _rgba_on_white(rgba: np.ndarray) -> np.ndarray:
    """Composite non-premultiplied RGBA onto white; RGB uint8 out."""
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    a = alpha[..., None].astype(np.uint16)
    rgb = rgba[..., :3].astype(np.uint16)
    return ((rgb * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def open_slide(path: str | os.PathLike[str], backend: str = "auto", mpp: float | None = None) -> Slide:
    """Open ``path`` with ``backend`` ("auto", "openslide" or "tiffslide").

    ``mpp`` (µm per level-0 pixel) overrides what the file says. "auto" prefers OpenSlide, the
    reference reader for every format, and falls back to tiffslide for TIFFs OpenSlide rejects.
    Raises :class:`SlideError` subclasses with one-line messages naming the file.
    """
    path = Path(path)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not os.path.lexists(path):
        raise SlideNotFoundError(path, "no such file")
    problem = file_problem(path, "slide file")  # a folder, FIFO, device, link loop or broken link
    if problem is not None:
        raise SlideFormatError(path, problem)
    size = path.stat().st_size
    if size == 0:
        raise SlideFormatError(path, "empty file (0 bytes)")
    if mpp is not None and not (MPP_RANGE[0] <= mpp <= MPP_RANGE[1]):
        raise SlideFormatError(path, f"--mpp {mpp} is outside the plausible range {MPP_RANGE} µm/px")

    _check_tiff(path)
    handle, chosen, reason = _open_handle(path, backend)
    try:
        mpp_value, mpp_source = _resolve_mpp(path, handle.properties, mpp)
    except Exception:
        handle.close()
        raise
    props = handle.properties
    offset = (int(props.get("openslide.bounds-x", 0) or 0), int(props.get("openslide.bounds-y", 0) or 0))
    power = props.get("openslide.objective-power") or props.get("tiffslide.objective-power")
    return Slide(
        path=path,
        backend=chosen,
        backend_reason=reason,
        vendor=handle.vendor,
        levels=handle.levels,
        mpp=mpp_value,
        mpp_source=mpp_source,
        bounds_offset_l0=offset,
        objective_power=float(power) if power not in (None, "") else None,
        properties=props,
        mpp_override=mpp,
        _handle=handle,
    )


def _open_handle(path: Path, backend: str) -> tuple[Any, str, str]:
    import openslide

    if backend in ("auto", "openslide"):
        try:
            detected = openslide.OpenSlide.detect_format(str(path))
        except openslide.OpenSlideError as exc:
            detected, detect_error = None, str(exc)
        else:
            detect_error = ""
        if detected is not None:
            try:
                handle = _OpenSlideHandle(path)
            except openslide.OpenSlideError as exc:
                raise SlideFormatError(path, f"OpenSlide cannot open this {detected} file "
                                       f"(truncated or corrupt?): {exc}") from None
            reason = "asked for" if backend == "openslide" else f"OpenSlide recognises the format ({detected})"
            return handle, "openslide", reason
        if backend == "openslide":
            raise SlideFormatError(path, _not_a_slide(path, detect_error or "OpenSlide does not recognise the format"))
    try:
        handle = _TiffSlideHandle(path)
    except Exception as exc:
        raise SlideFormatError(path, _not_a_slide(path, f"tiffslide cannot open it: {exc}")) from None
    if backend == "tiffslide":
        return handle, "tiffslide", "asked for"
    return handle, "tiffslide", "OpenSlide does not recognise the format; tiffslide reads it as TIFF"


def _not_a_slide(path: Path, detail: str) -> str:
    with path.open("rb") as fh:
        head = fh.read(512)
    if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "a text file, not a slide image"
    if head[:4] in _TIFF_MAGIC:
        return f"a TIFF that cannot be read as a slide (truncated or corrupt?): {detail}"
    return f"not a whole-slide image OpenSlide or tiffslide can read: {detail}"


_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _check_tiff(path: Path) -> None:
    """For TIFF-based files: every image tile/strip lies inside the file (catches truncation), and
    every level of the main image has 8-bit samples and decodes in bounded memory."""
    import logging

    import tifffile

    with path.open("rb") as fh:
        if fh.read(4) not in _TIFF_MAGIC:
            return
    size = path.stat().st_size
    logging.getLogger("tifffile").setLevel(logging.ERROR)
    try:
        with tifffile.TiffFile(path) as tif:
            if len(tif.pages) == 0 or not tif.series:
                raise SlideFormatError(path, f"a TIFF with no readable image directory ({size} bytes; "
                                       "truncated or corrupt?)")
            for series in tif.series:
                for level in series.levels:
                    for page in level.pages:
                        if page is None:
                            continue
                        ends = np.asarray(page.dataoffsets, np.int64) + np.asarray(page.databytecounts, np.int64)
                        if ends.size and int(ends.max()) > size:
                            raise SlideFormatError(path, f"truncated: image data runs to byte {int(ends.max())} "
                                                   f"but the file has {size} bytes")
            for index, level in enumerate(tif.series[0].levels):
                _check_level_layout(path, index, level.keyframe)
    except SlideFormatError:
        raise
    except Exception as exc:
        raise SlideFormatError(path, f"a TIFF whose structure cannot be read (truncated or corrupt?): {exc}") from None


def _check_level_layout(path: Path, index: int, page: Any) -> None:
    """8-bit unsigned samples, and one strip or tile decodes within :data:`MAX_DECODE_BYTES`."""
    if page.dtype is None or page.dtype.kind != "u" or page.dtype.itemsize != 1:
        raise SlideFormatError(path, f"level {index} has {page.bitspersample}-bit samples "
                               f"({page.dtype or 'unknown type'}); wsi-response reads 8-bit RGB brightfield "
                               "slides: convert it to 8-bit RGB first")
    if page.is_tiled:
        unit, cols, rows = "tiles", page.tilewidth, page.tilelength * max(1, page.tiledepth)
    else:
        unit, cols, rows = "strips", page.imagewidth, min(page.rowsperstrip or page.imagelength, page.imagelength)
    need = cols * rows * (page.samplesperpixel if page.planarconfig == 1 else 1)  # bytes: 1 per sample
    if need > MAX_DECODE_BYTES:
        raise SlideFormatError(path, f"level {index} is stored in {unit} of {cols} x {rows} px that need about "
                               f"{need / 1e9:.1f} GB each to decode (limit {MAX_DECODE_BYTES / 1e9:.1f} GB, "
                               "wsi_response.slide.MAX_DECODE_BYTES); convert it to a tiled pyramid (e.g. "
                               "`vips tiffsave in.tif out.tif --tile --pyramid --compression jpeg`)")


def _resolve_mpp(path: Path, props: Mapping[str, str], override: float | None) -> tuple[float, str]:
    """MPP in µm/px and its source: override > vendor metadata > TIFF resolution tags."""
    if override is not None:
        return float(override), "override"
    vendor = props.get("openslide.vendor") or props.get("tiffslide.vendor")
    # OpenSlide reads vendor MPP for every vendor format; for generic TIFF it only echoes the
    # resolution tags, which we read ourselves to name the source honestly.
    if vendor != "generic-tiff":
        for key in ("openslide.mpp-x", "aperio.MPP"):
            if props.get(key):
                return _checked_mpp(path, float(props[key]), "metadata"), "metadata"
    tiff_mpp = _mpp_from_tiff_tags(path)
    if tiff_mpp is not None:
        return _checked_mpp(path, tiff_mpp, "TIFF resolution tags"), "tiff-resolution"
    raise MissingMppError(path, "no microns-per-pixel in the file (no vendor MPP, no TIFF resolution "
                          "tags); pass --mpp UM")


def _checked_mpp(path: Path, value: float, source: str) -> float:
    if not (MPP_RANGE[0] <= value <= MPP_RANGE[1]) or not math.isfinite(value):
        raise MissingMppError(path, f"implausible MPP {value} from {source}; pass --mpp UM")
    return value


def _mpp_from_tiff_tags(path: Path) -> float | None:
    """µm/px from level-0 XResolution/ResolutionUnit (centimeter or inch); None if absent."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            unit = page.tags.get("ResolutionUnit")
            xres = page.tags.get("XResolution")
            if unit is None or xres is None:
                return None
            num, den = xres.value
            if num == 0 or den == 0:
                return None
            per_unit = num / den
            um_per_unit = {2: 25_400.0, 3: 10_000.0}.get(int(unit.value))
            if um_per_unit is None:
                return None
            return um_per_unit / per_unit
    except Exception:
        return None
