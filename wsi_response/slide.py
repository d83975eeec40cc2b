"""Open whole-slide images through OpenSlide or tiffslide, with MPP and its provenance.

Coordinates are ``(x, y)`` in level-0 pixels unless a name says ``_level`` (pixels of one pyramid
level); sizes are ``(width, height)``; arrays are ``[y, x, rgb]`` uint8. Transparent or
out-of-slide pixels are returned as white (255), like glass.

Bad input is refused at open time with a one-line :class:`SlideFormatError` where the file's
structure shows it (empty, text, truncated, samples other than 8-bit, colour other than RGB or
YCbCr with at most an alpha channel, a level whose smallest decodable unit needs more than
:data:`MAX_DECODE_BYTES`, pixels whose width and height differ by more than
:data:`MPP_TOLERANCE`), and at read time with a :class:`SlideReadError` naming the level and the
stored tile whose data is corrupt. OpenSlide's handle is unusable after a decode error; the
backend handle replaces it before raising.

MPP: the file's own (vendor metadata, else TIFF resolution tags) unless ``force_mpp``. A value in
the file that is not a number, not finite, not positive or outside :data:`MPP_RANGE` counts as
none (:class:`MissingMppError` naming it). ``mpp`` given without ``force_mpp`` stands in for a
missing MPP only: where the file has its own, the two must agree within :data:`MPP_TOLERANCE`
(else a :class:`ConfigError`: the argument is wrong, or must be forced) and the file's is used.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .errors import ConfigError, MissingMppError, SlideFormatError, SlideNotFoundError, SlideReadError
from .inputs import file_problem

__all__ = ["Slide", "Level", "open_slide", "check_mpp_value", "corrupt_tile_error", "BACKENDS", "MPP_RANGE",
           "MPP_TOLERANCE", "MAX_DECODE_BYTES", "MAX_ARRAY_BYTES"]

BACKENDS = ("auto", "openslide", "tiffslide")
# Plausible µm per level-0 px of a brightfield slide: 100x oil objectives give about 0.06-0.1, 40x
# 0.25, 20x 0.5, 10x 1.0; coarser than 20 µm a pixel is larger than a cell.
MPP_RANGE = (0.05, 20.0)
MPP_TOLERANCE = 0.01  # relative: mpp-x vs mpp-y, and --mpp vs the slide's own MPP, may differ this much
# Most memory, bytes, that decoding one strip or tile of a slide level may need. The backends decode
# a whole strip to read any pixel of it, so a level stored as one huge strip would be OOM-killed.
MAX_DECODE_BYTES = 1_000_000_000
# Most memory, bytes, that one array of a stage may take (wsi_response.footprint): a slide whose
# level-0 px are much coarser than a stage's µm/px would make that stage up-sample it into many GB.
MAX_ARRAY_BYTES = 2_000_000_000


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
    mpp_source: str                   # "override" (--mpp for a slide without one, or --force-mpp) | "metadata" | "tiff-resolution"
    bounds_offset_l0: tuple[int, int]  # OpenSlide bounds-x/-y (0, 0 when the slide has none)
    objective_power: float | None
    properties: Mapping[str, str] = field(repr=False)
    mpp_override: float | None = field(default=None, repr=False)
    force_mpp: bool = field(default=False, repr=False)
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
        return open_slide(self.path, self.backend, self.mpp_override, self.force_mpp)

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, ...]:
        return (open_slide, (self.path, self.backend, self.mpp_override, self.force_mpp))


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


def open_slide(path: str | os.PathLike[str], backend: str = "auto", mpp: float | None = None,
               force_mpp: bool = False) -> Slide:
    """Open ``path`` with ``backend`` ("auto", "openslide" or "tiffslide").

    ``mpp`` (µm per level-0 pixel): the MPP of a slide that has none; where the slide has its
    own, it must agree with it (:data:`MPP_TOLERANCE`), unless ``force_mpp`` makes it replace the
    slide's. "auto" prefers OpenSlide, the reference reader for every format, and falls back to
    tiffslide for TIFFs OpenSlide rejects. Raises :class:`SlideError` subclasses with one-line
    messages naming the file, and :class:`ConfigError` for an ``mpp`` that is implausible or
    disagrees with the slide's own.
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
    if mpp is not None:
        check_mpp_value(mpp, force_mpp)

    _check_tiff(path)
    handle, chosen, reason = _open_handle(path, backend)
    try:
        mpp_value, mpp_source = _resolve_mpp(path, handle.properties, mpp, force_mpp)
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
        force_mpp=force_mpp,
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
    every level of the main image is RGB (:func:`_colour_problem`), has 8-bit samples and decodes
    in bounded memory. OpenSlide hands every image out as RGBA whatever it holds, so only the
    file's own tags tell."""
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
                colour = _colour_problem(level.keyframe)
                if colour is not None:
                    raise SlideFormatError(path, f"level {index} holds {colour}, not RGB colour: the model judges "
                                           "the colours of RGB brightfield (H&E) slides and cannot score it")
                _check_level_layout(path, index, level.keyframe)
    except SlideFormatError:
        raise
    except Exception as exc:
        raise SlideFormatError(path, f"a TIFF whose structure cannot be read (truncated or corrupt?): {exc}") from None


_ALPHA_EXTRASAMPLES = (1, 2)  # TIFF ExtraSamples: associated and unassociated alpha


def _colour_problem(page: Any) -> str | None:
    """What a TIFF page holds when it is not RGB (or YCbCr, as JPEG stores RGB) with at most an
    alpha channel, e.g. "greyscale (1 sample per pixel)"; None for RGB."""
    import tifffile

    photometric = tifffile.PHOTOMETRIC
    samples = int(page.samplesperpixel)
    extras = [int(e) for e in page.extrasamples]
    alpha = len(extras) == 1 and extras[0] in _ALPHA_EXTRASAMPLES
    kind = int(page.photometric)
    if kind in (photometric.RGB, photometric.YCBCR):
        if samples == 3 or (samples == 4 and alpha):
            return None
        return f"{samples} samples per pixel (RGB and {samples - 3} that are not an alpha channel)"
    if kind in (photometric.MINISBLACK, photometric.MINISWHITE):
        if samples == 1:
            return "greyscale (1 sample per pixel)"
        if samples == 2 and alpha:
            return "greyscale with alpha (2 samples per pixel)"
        return f"{samples} separate channels (a multi-channel, fluorescence-like image)"
    if kind == photometric.PALETTE:
        return "palette (indexed) colour"
    if kind == photometric.SEPARATED:
        ink = page.tags.get("InkSet")
        if (ink is None or int(ink.value) == 1) and samples - len(extras) == 4:
            return "CMYK (photometric SEPARATED)"
        return f"{samples} separated ink channels"
    name = photometric(kind).name if kind in photometric._value2member_map_ else str(kind)
    return f"photometric {name} with {samples} samples per pixel"


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


def check_mpp_value(mpp: float, force: bool = False) -> None:
    """Raise :class:`ConfigError` when a ``--mpp`` (``--force-mpp``) value is not in :data:`MPP_RANGE`."""
    if not (MPP_RANGE[0] <= mpp <= MPP_RANGE[1]):  # False for NaN too
        raise ConfigError(f"{'--force-mpp' if force else '--mpp'} {mpp:g}: outside the plausible range "
                          f"{MPP_RANGE[0]:g}-{MPP_RANGE[1]:g} µm/px of a brightfield slide")


def _agree(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=MPP_TOLERANCE)


def _resolve_mpp(path: Path, props: Mapping[str, str], mpp: float | None, force: bool) -> tuple[float, str]:
    """MPP in µm/px and its source: ``mpp`` forced > the file's own (checked against ``mpp``) >
    ``mpp`` for a file without a usable one."""
    if mpp is not None and force:
        return float(mpp), "override"
    try:
        own = _own_mpp(path, props)
    except MissingMppError:
        if mpp is None:
            raise
        own = None  # an unusable value in the file counts as none: --mpp stands in for it
    if own is None:
        if mpp is None:
            raise MissingMppError(path, "no microns-per-pixel in the file (no vendor MPP, no TIFF resolution "
                                  "tags); pass --mpp UM")
        return float(mpp), "override"
    (mpp_x, mpp_y), source = own
    if not _agree(mpp_x, mpp_y):
        raise SlideFormatError(path, f"anisotropic pixels: {mpp_x:g} µm/px wide but {mpp_y:g} µm/px high "
                               f"({_SOURCE_NAMES[source]}; more than {MPP_TOLERANCE:.0%} apart); wsi-response "
                               "measures square pixels; if the file is wrong, pass --force-mpp UM")
    if mpp is not None and not _agree(mpp, mpp_x):
        raise ConfigError(f"{path}: --mpp {mpp:g} disagrees with the slide's own MPP {mpp_x:g} µm/px "
                          f"({_SOURCE_NAMES[source]}; more than {MPP_TOLERANCE:.0%} apart); to measure it at "
                          f"{mpp:g} µm/px anyway pass --force-mpp {mpp:g} instead")
    return mpp_x, source


_SOURCE_NAMES = {"metadata": "vendor metadata", "tiff-resolution": "TIFF resolution tags"}


def _own_mpp(path: Path, props: Mapping[str, str]) -> tuple[tuple[float, float], str] | None:
    """The file's (mpp-x, mpp-y) µm/px and their source ("metadata" | "tiff-resolution"); None if
    it has none. Raises :class:`MissingMppError` for a value there that cannot be used."""
    vendor = props.get("openslide.vendor") or props.get("tiffslide.vendor")
    # OpenSlide reads vendor MPP for every vendor format; for generic TIFF (tiffslide: no vendor)
    # it only echoes the resolution tags, which we read ourselves to name the source honestly.
    # OpenSlide leaves out openslide.mpp-x where it cannot parse the vendor's value: aperio.MPP shows it.
    if vendor not in (None, "generic-tiff"):
        for prefix in ("openslide", "tiffslide"):
            x, y = props.get(f"{prefix}.mpp-x"), props.get(f"{prefix}.mpp-y")
            if x not in (None, "") or y not in (None, ""):
                return (_metadata_mpp(path, f"{prefix}.mpp-x", x), _metadata_mpp(path, f"{prefix}.mpp-y", y)), \
                    "metadata"
        if props.get("aperio.MPP") is not None:
            value = _metadata_mpp(path, "aperio.MPP", props["aperio.MPP"])
            return (value, value), "metadata"
    tags = _tiff_resolution(path)
    if tags is None:
        return None
    um_per_unit, unit = tags[0]
    return tuple(_tag_mpp(path, name, px_per_unit, um_per_unit, unit)  # type: ignore[return-value]
                 for name, px_per_unit in tags[1:]), "tiff-resolution"


def _metadata_mpp(path: Path, key: str, raw: Any) -> float:
    """The vendor metadata value ``raw`` of ``key`` as µm/px, else :class:`MissingMppError` saying why not."""
    what = f"{key} = {str(raw).strip()[:40]!r}"
    try:
        number = float(raw)
    except (TypeError, ValueError, OverflowError):
        raise _unusable_mpp(path, what, "not a number") from None
    return _plausible_mpp(path, what, number)


def _tag_mpp(path: Path, name: str, px_per_unit: float, um_per_unit: float, unit: str) -> float:
    """µm/px of a TIFF resolution tag of ``px_per_unit`` px per ``unit``, else :class:`MissingMppError`."""
    what = f"TIFF {name} = {px_per_unit:g} px per {unit}"
    if math.isfinite(px_per_unit) and px_per_unit > 0:
        return _plausible_mpp(path, f"{what} ({um_per_unit / px_per_unit:g} µm/px)", um_per_unit / px_per_unit)
    return _plausible_mpp(path, what, px_per_unit)


def _plausible_mpp(path: Path, what: str, mpp: float) -> float:
    if not math.isfinite(mpp):
        raise _unusable_mpp(path, what, "not finite")
    if mpp <= 0:
        raise _unusable_mpp(path, what, "not positive")
    if not (MPP_RANGE[0] <= mpp <= MPP_RANGE[1]):
        raise _unusable_mpp(path, what, f"outside the plausible range {MPP_RANGE[0]:g}-{MPP_RANGE[1]:g} µm/px")
    return mpp


def _unusable_mpp(path: Path, what: str, reason: str) -> MissingMppError:
    return MissingMppError(path, f"unusable microns-per-pixel in the file ({what}: {reason}); pass --mpp UM")


def _tiff_resolution(path: Path) -> list[tuple[Any, ...]] | None:
    """``[(µm per unit, unit name), ("XResolution", px per unit), ("YResolution", px per unit)]``
    of a TIFF's level 0; None where the tags or a length unit (centimeter, inch) are absent."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            tags = tif.pages[0].tags
            unit, xres, yres = tags.get("ResolutionUnit"), tags.get("XResolution"), tags.get("YResolution")
            if unit is None or xres is None:
                return None
            um_per_unit = {2: (25_400.0, "inch"), 3: (10_000.0, "centimeter")}.get(int(unit.value))
            if um_per_unit is None:
                return None
            return [um_per_unit, ("XResolution", _px_per_unit(xres.value)),
                    ("YResolution", _px_per_unit((yres or xres).value))]
    except Exception:
        return None


def _px_per_unit(value: Any) -> float:
    """A resolution tag's px per unit: a rational ``(num, den)`` or a number (NaN when unreadable)."""
    try:
        num, den = (float(v) for v in (value if isinstance(value, tuple) and len(value) == 2 else (value, 1)))
        return num / den if den else math.nan
    except (TypeError, ValueError, OverflowError):
        return math.nan
