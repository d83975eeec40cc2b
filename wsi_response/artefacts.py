"""Slide artefacts that must not be measured: marker ink, blur, folds, bubbles, blank tiles.

Every layer lives on the tissue mask's grid (one px = ``downsample`` level-0 px, ``mpp`` µm) and
holds only tissue-mask pixels, so the pipeline can subtract it from the tissue it measures:
usable tissue of a cell = tissue fraction - :func:`cell_artefact_fraction` (clip at 0).

- ``pen``: marker ink, by colour on the overview (optical density, OD, relative to the glass).
  Haematoxylin, eosin and blood all absorb green at least as much as red and more than blue:
  ink that absorbs red more than green (green, blue) or blue more than green (red, orange) is
  outside that gamut; black ink is dark in every channel with a flat spectrum. Clear seeds grow
  (hysteresis) through px where the excess is weaker because tissue lies under the ink.
- ``blur``: out of focus, from a focus measure read in strips at ``focus_mpp`` µm/px: the energy
  of the finest detail (grey minus its Gaussian, sigma 1 px) over that of a coarser band
  (Gaussians of sigma 2 and 4 px), pooled over ``focus_smooth_um``. Contrast cancels out; it is compared with the slide's own
  tissue (``focus_reference_percentile``), so it finds regions, not a slide wholly out of focus.
- ``fold``: tissue whose OD is ``fold_min_od_ratio`` times that of its surroundings (double
  thickness), not ink.
- ``bubble``: thin dark neutral rims (narrower than ``rim_max_width_um``) closing around a pale
  interior, and long thin dark lines (coverslip edges).
- Near-white / near-black tiles: :func:`tile_intensity_flags` on tiles as read.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .config import QcConfig
from .slide import Slide
from .tiling import TileGrid, _box_means
from .tissue import Overview, TissueMask, _glass_rgb, read_overview

__all__ = ["KINDS", "ArtefactMask", "detect_artefacts", "cell_artefact_fraction",
           "tile_intensity_flags"]

KINDS: tuple[str, ...] = ("pen", "blur", "fold", "bubble")
_STRIP_ROWS = 64  # mask rows per focus-measure strip


@dataclass(frozen=True)
class ArtefactMask:
    """Bool ``[y, x]`` layer per kind in :data:`KINDS`, inside the tissue mask.

    One px covers ``downsample`` x ``downsample`` level-0 px (the tissue mask's grid).
    """

    layers: dict[str, np.ndarray]
    downsample: float        # level-0 px per mask px
    mpp: float               # µm per mask px
    tissue_area_mm2: float   # of the tissue mask the layers were cut from

    @property
    def any(self) -> np.ndarray:
        """Pixels with any artefact."""
        return np.logical_or.reduce([self.layers[k] for k in KINDS])

    @property
    def areas_mm2(self) -> dict[str, float]:
        """Artefact area per kind, mm² (kinds may overlap)."""
        px_mm2 = (self.mpp / 1000.0) ** 2
        return {k: float(self.layers[k].sum()) * px_mm2 for k in KINDS}

    @property
    def area_mm2(self) -> float:
        """Area with any artefact, mm²."""
        return float(self.any.sum()) * (self.mpp / 1000.0) ** 2

    @property
    def tissue_fractions(self) -> dict[str, float]:
        """Artefact area per kind and ``"any"`` as a fraction of the tissue area."""
        areas = {**self.areas_mm2, "any": self.area_mm2}
        if self.tissue_area_mm2 <= 0:
            return {k: 0.0 for k in areas}
        return {k: v / self.tissue_area_mm2 for k, v in areas.items()}


def detect_artefacts(slide: Slide, mask: TissueMask, cfg: QcConfig = QcConfig(),
                     overview: Overview | None = None) -> ArtefactMask:
    """Artefact layers of ``slide`` on ``mask``'s grid (pass ``overview`` read at ``mask.mpp``
    to reuse it). Reads the overview and, in strips, a ``cfg.focus_mpp`` µm/px image."""
    from scipy import ndimage

    if overview is None:
        overview = read_overview(slide, mask.mpp)
    tissue = mask.mask
    if overview.image.shape[:2] != tissue.shape:
        raise ValueError(f"overview {overview.image.shape[:2]} and mask {tissue.shape} differ in shape")
    px_um = mask.mpp
    od = _optical_density(overview.image)
    pen = _ink(od, cfg) & tissue
    if cfg.ink_grow_um > 0:
        pen = ndimage.binary_dilation(pen, _disk(cfg.ink_grow_um / px_um)) & tissue
    measured = tissue & ~pen
    od_sum = od.sum(axis=2)
    layers = {
        "pen": pen,
        "blur": _blur(slide, mask, measured, cfg),
        "fold": _fold(od_sum, measured, px_um, cfg),
        "bubble": _bubble(od, od_sum, measured, px_um, cfg) & tissue,
    }
    min_px = int(cfg.min_artefact_mm2 / (px_um / 1000.0) ** 2)
    if min_px > 1:
        from skimage import morphology

        layers = {k: morphology.remove_small_objects(v, max_size=min_px) for k, v in layers.items()}
    return ArtefactMask(layers=layers, downsample=mask.downsample, mpp=mask.mpp,
                        tissue_area_mm2=mask.area_mm2)


def cell_artefact_fraction(grid: TileGrid, artefacts: ArtefactMask) -> np.ndarray:
    """(N,) float32 exact fraction of each tile's cell covered by any artefact (0-1)."""
    if len(grid) == 0:
        return np.zeros(0, np.float32)
    cell_px = grid.stride_l0 / artefacts.downsample  # cell side in mask px
    n_cols, n_rows = (int(v) + 1 for v in grid.cols_rows.max(axis=0))
    fractions = _box_means(artefacts.any, np.arange(n_cols + 1) * cell_px,
                           np.arange(n_rows + 1) * cell_px)
    return fractions[grid.cols_rows[:, 1], grid.cols_rows[:, 0]].astype(np.float32)


def tile_intensity_flags(tiles: np.ndarray, cfg: QcConfig = QcConfig()) -> tuple[np.ndarray, np.ndarray]:
    """Near-white and near-black flags, each (n,) bool, of RGB uint8 tiles ``(n, h, w, 3)``."""
    grey = tiles.reshape(len(tiles), -1).mean(axis=1, dtype=np.float64)
    return grey > cfg.tile_white_min_grey, grey < cfg.tile_black_max_grey


# --------------------------------------------------------------------------- detectors


def _optical_density(rgb: np.ndarray) -> np.ndarray:
    """OD ``[y, x, 3]`` float32 relative to the slide's glass colour (0 on glass)."""
    img = rgb.astype(np.float32)
    glass = _glass_rgb(img)
    return (-np.log10(np.clip((img + 1.0) / (glass + 1.0), 1e-3, None))).astype(np.float32)


def _disk(radius_px: float) -> np.ndarray:
    r = max(0, int(round(radius_px)))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return xx * xx + yy * yy <= r * r + r


def _ink(od: np.ndarray, cfg: QcConfig) -> np.ndarray:
    """Marker ink px: colour out of the H&E gamut, or black (hysteresis from clear seeds)."""
    from skimage.filters import apply_hysteresis_threshold

    r, g, b = od[..., 0], od[..., 1], od[..., 2]
    colour = np.maximum(r - g, b - g)  # red or blue absorbed more than green: not H, E or blood
    ink = apply_hysteresis_threshold(colour, cfg.ink_grow_excess_od, cfg.ink_min_excess_od)
    lo, hi = od.min(axis=2), od.max(axis=2)
    flat = (hi - lo) <= cfg.black_max_spread * np.maximum(od.mean(axis=2), 1e-3)
    flat_od = lo - 0.5 * (hi - lo)  # the spectrum's flat part
    seeds = flat & (lo >= cfg.black_min_od)
    from scipy import ndimage

    grown = flat_od >= cfg.black_grow_od
    labels, n = ndimage.label(grown)
    keep = np.zeros(n + 1, bool)
    keep[np.unique(labels[seeds & grown])] = True
    keep[0] = False
    return ink | keep[labels]


def _fold(od_sum: np.ndarray, measured: np.ndarray, px_um: float, cfg: QcConfig) -> np.ndarray:
    """Tissue px (smoothed) ``fold_min_od_ratio`` times as dense as their surroundings."""
    local = _normalized_gauss(od_sum, measured, 2.0)
    context = _normalized_gauss(od_sum, measured, cfg.fold_context_um / px_um)
    return measured & (local >= cfg.fold_min_od_ratio * context)


def _bubble(od: np.ndarray, od_sum: np.ndarray, measured: np.ndarray, px_um: float,
            cfg: QcConfig) -> np.ndarray:
    """Thin dark neutral rims around pale interiors, and long thin dark lines."""
    from scipy import ndimage

    lo, hi = od.min(axis=2), od.max(axis=2)
    dark = (lo >= cfg.rim_min_od) & ((hi - lo) <= cfg.black_max_spread * np.maximum(od.mean(axis=2), 1e-3))
    width_px = cfg.rim_max_width_um / px_um
    thin = dark & ~ndimage.binary_opening(dark, _disk(width_px / 2))
    thin = ndimage.binary_closing(thin, _disk(width_px / 4), border_value=0)  # bridge gaps in rims
    filled = ndimage.binary_fill_holes(thin)
    interiors, n = ndimage.label(filled & ~thin)
    out = np.zeros_like(measured)
    reference = float(np.median(od_sum[measured])) if measured.any() else 0.0
    if n:
        idx = np.arange(1, n + 1)
        mean_od = ndimage.mean(od_sum, interiors, idx)
        pale = np.concatenate([[False], mean_od <= cfg.bubble_max_od_ratio * reference])
        out |= ndimage.binary_dilation(pale[interiors], _disk(width_px)) & filled
    lines, n = ndimage.label(thin & ~out)
    if n:
        spans = np.array([max(s[0].stop - s[0].start, s[1].stop - s[1].start)
                          for s in ndimage.find_objects(lines)])
        long = np.concatenate([[False], spans * px_um >= cfg.edge_min_length_um])
        out |= ndimage.binary_dilation(long[lines], _disk(1))
    return out


def _normalized_gauss(values: np.ndarray, weight: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian mean of ``values`` over px where ``weight`` is true (0 where none are near)."""
    from scipy import ndimage

    w = weight.astype(np.float32)
    num = ndimage.gaussian_filter(values * w, sigma_px, mode="constant")
    den = ndimage.gaussian_filter(w, sigma_px, mode="constant")
    return np.where(den > 1e-3, num / np.maximum(den, 1e-3), 0.0).astype(np.float32)


def _blur(slide: Slide, mask: TissueMask, measured: np.ndarray, cfg: QcConfig) -> np.ndarray:
    """Tissue px whose focus measure is below ``focus_min_ratio`` x the slide's sharp tissue."""
    fine, band = _focus_energies(slide, mask, cfg)
    sigma = cfg.focus_smooth_um / mask.mpp
    sharp = _normalized_gauss(fine, measured, sigma) / np.maximum(
        _normalized_gauss(band, measured, sigma), 1e-6)
    if not measured.any():
        return np.zeros_like(measured)
    reference = float(np.percentile(sharp[measured], cfg.focus_reference_percentile))
    return measured & (sharp < cfg.focus_min_ratio * reference)


def _focus_energies(slide: Slide, mask: TissueMask, cfg: QcConfig) -> tuple[np.ndarray, np.ndarray]:
    """Mean squared fine detail and coarser-band detail per mask px (grey levels²).

    Reads the pyramid level at or finer than ``cfg.focus_mpp`` in strips of ``_STRIP_ROWS``
    mask rows (memory: one strip), bins it by an integer factor to about ``focus_mpp``.
    """
    from scipy import ndimage

    level = slide.level_for_mpp(cfg.focus_mpp)
    k = max(1, int(round(cfg.focus_mpp / slide.level_mpp(level))))
    per_mask = mask.downsample / (slide.levels[level].downsample * k)  # focus px per mask px
    h, w = mask.mask.shape
    fw = int(np.ceil(w * per_mask))
    halo = 16  # focus px: covers the band-pass filter's reach (4 sigma)
    fine = np.zeros((h, w), np.float32)
    band = np.zeros((h, w), np.float32)
    for r0 in range(0, h, _STRIP_ROWS):
        r1 = min(h, r0 + _STRIP_ROWS)
        if not mask.mask[r0:r1].any():
            continue
        y0 = int(np.floor(r0 * per_mask)) - halo
        y1 = int(np.ceil(r1 * per_mask)) + halo
        rgb = slide.read_level(level, (0, y0 * k), (fw * k, (y1 - y0) * k))
        grey = rgb.reshape(y1 - y0, k, fw, k, 3).mean(axis=(1, 3, 4), dtype=np.float32)
        g2 = ndimage.gaussian_filter(grey, 2.0)
        box = (0.0, r0 * per_mask - y0, w * per_mask, r1 * per_mask - y0)
        for energy, out in (((grey - ndimage.gaussian_filter(grey, 1.0)) ** 2, fine),
                            ((g2 - ndimage.gaussian_filter(g2, 2.0 * 3 ** 0.5)) ** 2, band)):
            out[r0:r1] = np.asarray(Image.fromarray(energy).resize(
                (w, r1 - r0), Image.Resampling.BOX, box=box))
    return fine, band
