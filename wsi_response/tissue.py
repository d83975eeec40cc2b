"""Tissue detection on a low-resolution overview of the slide.

The overview is read at ``TissueConfig.mask_mpp`` µm/px (from the nearest finer pyramid level,
in strips, box-filtered), so memory stays small whatever the slide size. A pixel is tissue when
it is stained relative to the glass: optical density above the glass's, or saturated colour.
Closing and hole filling keep pale tissue (fat vacuoles, necrosis) inside the section; tiny
objects (dust) and near-black scanner background are dropped.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from PIL import Image

from .config import TissueConfig
from .jpegtiles import JpegTileReader, verified_jpeg_reader
from .slide import Slide
from .smoothing import dilate, erode

__all__ = ["Overview", "TissueMask", "read_overview", "detect_tissue", "stained_px", "possible_tissue",
           "glass_rgb", "density_lut"]

READ_BUDGET_BYTES = 64 << 20  # decoded level pixels (RGB bytes) per strip read, whatever the level's width
_STRIP_ROWS = 256  # overview rows per pass of the per-px stain test
PROBE_PX = 512  # side of the central square on which a direct JPEG read must match the backend, level px


@dataclass(frozen=True)
class Overview:
    """The whole slide as RGB uint8 ``[y, x, 3]``; one pixel covers ``downsample`` level-0 px."""

    image: np.ndarray
    downsample: float  # level-0 px per overview px
    mpp: float         # µm per overview px

    @cached_property
    def glass(self) -> np.ndarray:
        """The glass colour, RGB float32 (3,): :func:`glass_rgb` of the image, computed once."""
        return glass_rgb(self.image)


@dataclass(frozen=True)
class TissueMask:
    """Boolean ``[y, x]`` tissue mask; one pixel covers ``downsample`` × ``downsample`` level-0 px."""

    mask: np.ndarray
    downsample: float  # level-0 px per mask px
    mpp: float         # µm per mask px

    @property
    def pixel_area_mm2(self) -> float:
        """Area of one mask pixel, mm²."""
        return (self.mpp / 1000.0) ** 2

    @property
    def area_mm2(self) -> float:
        """Tissue area, mm²."""
        return float(self.mask.sum()) * self.pixel_area_mm2

    @property
    def fraction(self) -> float:
        """Tissue fraction of the slide area."""
        return float(self.mask.mean())


def read_overview(slide: Slide, mpp: float) -> Overview:
    """The slide resampled to ``mpp`` µm/px, read in strips from the nearest finer level.

    Each strip is about :data:`READ_BUDGET_BYTES` of level pixels (at least one overview row), so
    a single-level slide is read in bounded memory too. Strips are decoded straight from the
    level's JPEG tiles where a probe region at the level's centre matches the slide's own backend
    (:func:`~wsi_response.jpegtiles.verified_jpeg_reader`), else read through that backend.
    """
    mpp = max(mpp, slide.mpp)
    downsample = mpp / slide.mpp
    level = slide.level_for_mpp(mpp)
    level_ds = slide.levels[level].downsample
    factor = downsample / level_ds  # level px per overview px (>= 1 up to rounding)
    w0, h0 = slide.dimensions_px
    out_w = max(1, int(np.ceil(w0 / downsample)))
    out_h = max(1, int(np.ceil(h0 / downsample)))
    level_w = int(np.ceil(out_w * factor))
    strip_rows = max(1, int(READ_BUDGET_BYTES // (3 * level_w * factor)))  # overview rows per read
    image = np.empty((out_h, out_w, 3), np.uint8)
    fast = _centre_verified_reader(slide, level)
    read = slide.read_level if fast is None else fast.read_level
    try:
        for r0 in range(0, out_h, strip_rows):
            r1 = min(out_h, r0 + strip_rows)
            y0 = int(np.floor(r0 * factor))
            y1 = int(np.ceil(r1 * factor))
            strip = read(level, (0, y0), (level_w, y1 - y0))
            box = (0.0, r0 * factor - y0, out_w * factor, r1 * factor - y0)
            image[r0:r1] = np.asarray(
                Image.fromarray(strip).resize((out_w, r1 - r0), Image.Resampling.BOX, box=box))
    finally:
        if fast is not None:
            fast.close()
    return Overview(image=image, downsample=downsample, mpp=mpp)


def _centre_verified_reader(slide: Slide, level: int) -> JpegTileReader | None:
    """The direct JPEG reader of ``level`` if it reads the level's central (up to)
    :data:`PROBE_PX` px square as the slide's backend does; else None."""
    lw, lh = slide.levels[level].dimensions_px
    w, h = min(PROBE_PX, lw), min(PROBE_PX, lh)
    origin = ((lw - w) // 2, (lh - h) // 2)
    return verified_jpeg_reader(slide, level, lambda read: read(level, origin, (w, h)))


def detect_tissue(slide: Slide, cfg: TissueConfig = TissueConfig(), overview: Overview | None = None,
                  stained: np.ndarray | None = None, possible: np.ndarray | None = None) -> TissueMask:
    """Tissue mask of ``slide`` at ``cfg.mask_mpp`` µm/px (pass ``overview`` to reuse a read, and
    its :func:`stained_px` and :func:`possible_tissue` when known)."""
    if overview is None:
        overview = read_overview(slide, cfg.mask_mpp)
    mask = tissue_from_rgb(overview.image, overview.mpp, cfg, overview.glass, stained, possible)
    return TissueMask(mask=mask, downsample=overview.downsample, mpp=overview.mpp)


def stained_px(rgb: np.ndarray, cfg: TissueConfig, glass: np.ndarray | None = None) -> np.ndarray:
    """Bool ``[y, x]``: px of an RGB uint8 overview stained relative to the glass (``glass``: its
    :func:`glass_rgb`, when known), before the mask's closing, hole filling and dust removal."""
    # OD above glass over the threshold in any channel, by table: memory is a few bool planes
    dense = density_lut(glass_rgb(rgb) if glass is None else glass) > cfg.min_optical_density
    min_spread = _min_saturated_spread(cfg.min_saturation)
    stained = np.empty(rgb.shape[:2], bool)

    def strip(r0: int) -> None:
        part = rgb[r0:r0 + _STRIP_ROWS]
        out = stained[r0:r0 + _STRIP_ROWS]
        np.take(dense[0], part[..., 0], out=out)
        for c in (1, 2):
            out |= dense[c].take(part[..., c])
        vmax = np.maximum(np.maximum(part[..., 0], part[..., 1]), part[..., 2])
        spread = vmax - np.minimum(np.minimum(part[..., 0], part[..., 1]), part[..., 2])
        out |= spread >= min_spread.take(vmax)  # HSV saturation
        out &= vmax >= 40  # darker: unscanned areas / slide edge, not stain

    with ThreadPoolExecutor(2) as threads:  # numpy runs without the GIL: strips on both cores
        list(threads.map(strip, range(0, rgb.shape[0], _STRIP_ROWS)))
    return stained


def possible_tissue(stained: np.ndarray, mpp: float, cfg: TissueConfig) -> np.ndarray:
    """Bool ``[y, x]``: the :func:`stained_px` ``stained`` grown by the closing radius, which holds
    every px of the final mask but those of holes it fills (known before the mask is finished)."""
    disk = _closing_disk(mpp, cfg)
    return stained.copy() if disk is None else dilate(stained, disk)


def _closing_disk(mpp: float, cfg: TissueConfig) -> np.ndarray | None:
    """The closing's bool disk footprint at ``mpp`` µm/px; None when its radius rounds to 0 px."""
    from skimage import morphology

    radius = int(round(cfg.closing_um / mpp))
    return morphology.disk(radius).astype(bool) if radius > 0 else None


def tissue_from_rgb(rgb: np.ndarray, mpp: float, cfg: TissueConfig, glass: np.ndarray | None = None,
                    stained: np.ndarray | None = None, possible: np.ndarray | None = None) -> np.ndarray:
    """Boolean tissue mask of an RGB uint8 overview at ``mpp`` µm/px (``glass``, ``stained`` and
    ``possible``: its :func:`glass_rgb`, :func:`stained_px` and :func:`possible_tissue`, when known)."""
    from skimage import morphology

    if stained is None:
        stained = stained_px(rgb, cfg, glass)
    px_area_mm2 = (mpp / 1000.0) ** 2
    mask = stained
    disk = _closing_disk(mpp, cfg)
    if disk is not None:  # closing: the stained px grown (the possible tissue), then shrunk
        mask = erode(possible_tissue(stained, mpp, cfg) if possible is None else possible, disk)
        mask |= stained
    if cfg.max_hole_mm2 > 0:
        mask = morphology.remove_small_holes(mask, max_size=max(1, int(cfg.max_hole_mm2 / px_area_mm2)))
    if cfg.min_object_mm2 > 0:
        mask = morphology.remove_small_objects(mask, max_size=max(1, int(cfg.min_object_mm2 / px_area_mm2)))
    return mask


def _min_saturated_spread(min_saturation: float) -> np.ndarray:
    """Per max channel value v (256,): the smallest max - min channel spread whose saturation
    (spread / v, float32) exceeds ``min_saturation``; 256 where none does."""
    v = np.maximum(np.arange(256, dtype=np.float32), 1.0)[:, None]
    saturated = np.arange(256, dtype=np.float32)[None, :] / v > np.float32(min_saturation)
    return np.where(saturated.any(axis=1), saturated.argmax(axis=1), 256).astype(np.uint16)


def density_lut(glass: np.ndarray) -> np.ndarray:
    """Optical density above ``glass`` of each uint8 value per channel, float32 ``[3, 256]``:
    ``-log10((v + 1) / (glass + 1))``, transmission clipped at 1e-3 (0 on glass)."""
    ratio = (np.arange(256, dtype=np.float32)[None, :] + 1.0) / (glass.astype(np.float32)[:, None] + 1.0)
    return -np.log10(np.clip(ratio, 1e-3, None))


def glass_rgb(img: np.ndarray) -> np.ndarray:
    """The glass colour: the median of the brightest 10 % of pixels (white if the slide is full).

    Exact percentiles of the uint8 data from histograms: no sort, no float planes.
    """
    lum = img[..., 0].astype(np.uint16)  # 3 x the mean grey
    lum += img[..., 1]
    lum += img[..., 2]
    bright = lum >= _quantile(np.bincount(lum.ravel(), minlength=766), 0.9)
    del lum
    glass = np.array([_quantile(np.bincount(img[..., c][bright], minlength=256), 0.5)
                      for c in range(3)], np.float32)
    if glass.mean() < 180:  # no glass visible: tissue everywhere; measure against white
        glass = np.full(3, 245.0, np.float32)
    return glass


def _quantile(counts: np.ndarray, q: float) -> float:
    """``np.quantile`` (linear interpolation) of the data whose value histogram is ``counts``."""
    ends = np.cumsum(counts)
    pos = q * (ends[-1] - 1)
    below = int(np.floor(pos))
    lo, hi = np.searchsorted(ends, [below, min(below + 1, ends[-1] - 1)], side="right")
    return float(lo + (pos - below) * (hi - lo))
