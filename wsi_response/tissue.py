"""Tissue detection on a low-resolution overview of the slide.

The overview is read at ``TissueConfig.mask_mpp`` µm/px (from the nearest finer pyramid level,
in strips, box-filtered), so memory stays small whatever the slide size. A pixel is tissue when
it is stained relative to the glass: optical density above the glass's, or saturated colour.
Closing and hole filling keep pale tissue (fat vacuoles, necrosis) inside the section; tiny
objects (dust) and near-black scanner background are dropped.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .config import TissueConfig
from .slide import Slide

__all__ = ["Overview", "TissueMask", "read_overview", "detect_tissue", "glass_rgb"]

READ_BUDGET_BYTES = 64 << 20  # decoded level pixels (RGB bytes) per strip read, whatever the level's width


@dataclass(frozen=True)
class Overview:
    """The whole slide as RGB uint8 ``[y, x, 3]``; one pixel covers ``downsample`` level-0 px."""

    image: np.ndarray
    downsample: float  # level-0 px per overview px
    mpp: float         # µm per overview px


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
    a single-level slide is read in bounded memory too.
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
    for r0 in range(0, out_h, strip_rows):
        r1 = min(out_h, r0 + strip_rows)
        y0 = int(np.floor(r0 * factor))
        y1 = int(np.ceil(r1 * factor))
        strip = slide.read_level(level, (0, y0), (level_w, y1 - y0))
        box = (0.0, r0 * factor - y0, out_w * factor, r1 * factor - y0)
        image[r0:r1] = np.asarray(
            Image.fromarray(strip).resize((out_w, r1 - r0), Image.Resampling.BOX, box=box))
    return Overview(image=image, downsample=downsample, mpp=mpp)


def detect_tissue(slide: Slide, cfg: TissueConfig = TissueConfig(),
                  overview: Overview | None = None) -> TissueMask:
    """Tissue mask of ``slide`` at ``cfg.mask_mpp`` µm/px (pass ``overview`` to reuse a read)."""
    if overview is None:
        overview = read_overview(slide, cfg.mask_mpp)
    mask = tissue_from_rgb(overview.image, overview.mpp, cfg)
    return TissueMask(mask=mask, downsample=overview.downsample, mpp=overview.mpp)


def tissue_from_rgb(rgb: np.ndarray, mpp: float, cfg: TissueConfig) -> np.ndarray:
    """Boolean tissue mask of an RGB uint8 overview at ``mpp`` µm/px."""
    from scipy import ndimage
    from skimage import morphology

    glass = glass_rgb(rgb)
    # max over channels of the optical density above glass = -log10 of the smallest transmission
    # ratio; one float32 plane at a time keeps memory at a few bytes per overview pixel
    transmission = np.full(rgb.shape[:2], np.inf, np.float32)
    for c in range(3):
        np.minimum(transmission, (rgb[..., c].astype(np.float32) + 1.0) / (glass[c] + 1.0), out=transmission)
    od_max = -np.log10(np.clip(transmission, 1e-3, None, out=transmission), out=transmission)
    vmax = rgb.max(axis=2)
    saturation = (vmax - rgb.min(axis=2)).astype(np.float32) / np.maximum(vmax, 1).astype(np.float32)
    scanner_black = vmax < 40  # unscanned areas / slide edge, not stain
    stained = ((od_max > cfg.min_optical_density) | (saturation > cfg.min_saturation)) & ~scanner_black
    del transmission, od_max, saturation, vmax

    px_area_mm2 = (mpp / 1000.0) ** 2
    radius = int(round(cfg.closing_um / mpp))
    mask = stained
    if radius > 0:
        mask = ndimage.binary_closing(mask, structure=morphology.disk(radius), border_value=0)
        mask |= stained
    if cfg.max_hole_mm2 > 0:
        mask = morphology.remove_small_holes(mask, max_size=max(1, int(cfg.max_hole_mm2 / px_area_mm2)))
    if cfg.min_object_mm2 > 0:
        mask = morphology.remove_small_objects(mask, max_size=max(1, int(cfg.min_object_mm2 / px_area_mm2)))
    return mask


def glass_rgb(img: np.ndarray) -> np.ndarray:
    """The glass colour: the median of the brightest 10 % of pixels (white if the slide is full)."""
    lum = img.mean(axis=2, dtype=np.float32)
    cut = np.percentile(lum, 90)
    bright = img[lum >= cut]
    glass = np.median(bright, axis=0).astype(np.float32)
    if glass.mean() < 180:  # no glass visible: tissue everywhere; measure against white
        glass = np.full(3, 245.0, np.float32)
    return glass.astype(np.float32)
