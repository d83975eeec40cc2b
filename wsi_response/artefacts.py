"""Slide artefacts that must not be measured: marker ink, blur, folds, bubbles, blank tiles.

Every layer lives on the tissue mask's grid (one px = ``downsample`` level-0 px, ``mpp`` µm) and
holds only tissue-mask pixels, so the pipeline can subtract it from the tissue it measures: the
tile grid is laid on ``tissue & ~artefacts.any``, so artefact area leaves both the numerator and
the denominator of every area and percentage, and the overlay's class polygons exclude it too.

- ``pen``: marker ink, by colour on the overview (optical density, OD, relative to the glass).
  Haematoxylin, eosin and blood all absorb green at least as much as red and more than blue:
  ink that absorbs red more than green (green, blue) or blue more than green (red, orange) is
  outside that gamut; black ink is dark in every channel with a flat spectrum. Clear seeds grow
  (hysteresis) through px where the excess is weaker because tissue lies under the ink.
- ``blur``: out of focus, from a focus measure read in strips at ``focus_mpp`` µm/px: the energy
  of the finest detail (grey minus its Gaussian, sigma 1 px) over that of a coarser band
  (Gaussians of sigma 2 and 4 px), pooled over ``focus_smooth_um``. Contrast and stain cancel
  out. A region is out of focus when its sharpness is low in absolute terms and relative to the
  slide's own tissue (``focus_reference_percentile``): a slide scanned soft all over is not.
- ``fold``: tissue whose OD is ``fold_min_od_ratio`` times that of its surroundings in the same
  colour (double thickness of the same tissue), not ink.
- ``bubble``: thin dark neutral rims (narrower than ``rim_max_width_um``) closing around a pale,
  convex interior, and long straight thin dark lines (coverslip edges).
- Near-white / near-black tiles: :func:`cell_intensity_flags`, the mean grey of each tile's cell.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import QcConfig
from .slide import Slide
from .focus import blur_layer
from .smoothing import normalized_gauss
from .tiling import TileGrid, cell_means
from .tissue import Overview, TissueMask, glass_rgb, read_overview

__all__ = ["KINDS", "ArtefactMask", "detect_artefacts",
           "cell_intensity_flags"]

KINDS: tuple[str, ...] = ("pen", "blur", "fold", "bubble")
_FOLD_LOCAL_UM = 16.0  # Gaussian sigma smoothing tissue OD before the fold test, µm
_EDGE_UM = 4.0  # px this close to ink or a bubble are not tested for blur, µm


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
    pen = _ink(od, px_um, cfg) & tissue
    od_sum = od.sum(axis=2)
    bubble = _bubble(od, od_sum, tissue & ~pen, px_um, cfg) & tissue
    measured = tissue & ~pen & ~bubble
    near = ndimage.binary_dilation(pen | bubble, _disk(_EDGE_UM / px_um))  # their edges look smooth
    layers = {
        "pen": pen,
        "blur": blur_layer(slide, mask, measured, cfg) & ~near,
        "fold": _fold(od, measured, px_um, cfg),
        "bubble": bubble,
    }
    min_px = int(cfg.min_artefact_mm2 / (px_um / 1000.0) ** 2)
    if min_px > 1:  # ink is found by colour alone and kept however small
        from skimage import morphology

        layers = {k: v if k == "pen" else morphology.remove_small_objects(v, max_size=min_px)
                  for k, v in layers.items()}
    return ArtefactMask(layers=layers, downsample=mask.downsample, mpp=mask.mpp,
                        tissue_area_mm2=mask.area_mm2)


def cell_intensity_flags(grid: TileGrid, overview: Overview, tissue: TissueMask, cfg: QcConfig = QcConfig()
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Near-white and near-black tiles, each (N,) bool: the mean grey of the *tissue* in each cell.

    The overview is box-filtered from the slide, so the mean there is the mean at the tiles'
    resolution; no tile has to be read. Glass around the tissue does not count (an edge cell is
    mostly glass, not a blank tile); ``tissue`` must be on the overview's grid.
    """
    grey = overview.image.mean(axis=2) * tissue.mask
    amount = cell_means(grid, tissue.mask, overview.downsample)
    mean_grey = cell_means(grid, grey, overview.downsample) / np.maximum(amount, 1e-12)
    has_tissue = amount > 0
    return has_tissue & (mean_grey > cfg.tile_white_min_grey), has_tissue & (mean_grey < cfg.tile_black_max_grey)


# --------------------------------------------------------------------------- detectors


def _optical_density(rgb: np.ndarray) -> np.ndarray:
    """OD ``[y, x, 3]`` float32 relative to the slide's glass colour (0 on glass)."""
    glass = glass_rgb(rgb)
    od = np.empty(rgb.shape, np.float32)
    for c in range(3):  # one channel at a time: no full-size float temporaries
        plane = od[..., c]
        np.divide(rgb[..., c].astype(np.float32) + 1.0, glass[c] + 1.0, out=plane)
        np.log10(np.clip(plane, 1e-3, None, out=plane), out=plane)
        np.negative(plane, out=plane)
    return od


def _disk(radius_px: float) -> np.ndarray:
    r = max(0, int(round(radius_px)))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return xx * xx + yy * yy <= r * r + r


def _ink(od: np.ndarray, px_um: float, cfg: QcConfig) -> np.ndarray:
    """Marker ink px: colour out of the H&E gamut, or black; grown from clear seeds."""
    r, g, b = od[..., 0], od[..., 1], od[..., 2]
    excess = np.maximum(r - g, b - g)  # red or blue absorbed more than green: not H, E or blood
    # under ink, the tissue's own (negative) excess remains: measure against the surroundings
    plain = excess < 0.0  # H&E and glass; ink over tissue has a positive excess
    local = excess - np.minimum(normalized_gauss(excess, plain, cfg.ink_context_um / px_um), 0.0)
    colour = _grow(local >= cfg.ink_grow_excess_od, excess >= cfg.ink_min_excess_od)
    lo, hi = od.min(axis=2), od.max(axis=2)
    flat = (hi - lo) <= cfg.black_max_spread * np.maximum(od.mean(axis=2), 1e-3)
    black = _grow(lo - 0.5 * (hi - lo) >= cfg.black_grow_od, flat & (lo >= cfg.black_min_od))
    return colour | black


def _grow(candidates: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Connected components of ``candidates | seeds`` that hold a seed."""
    from scipy import ndimage

    labels, n = ndimage.label(candidates | seeds)
    keep = np.zeros(n + 1, bool)
    keep[labels[seeds]] = True
    keep[0] = False
    return keep[labels]


def _fold(od: np.ndarray, measured: np.ndarray, px_um: float, cfg: QcConfig) -> np.ndarray:
    """Tissue px ``fold_min_od_ratio`` times as dense as their surroundings, in the same colour
    (two layers of the same tissue; denser tissue of another kind has another colour)."""
    # per-channel planes, never a stack of them: memory stays at a few planes of the overview
    local = [normalized_gauss(od[..., c], measured, _FOLD_LOCAL_UM / px_um) for c in range(3)]
    context = [normalized_gauss(od[..., c], measured, cfg.fold_context_um / px_um) for c in range(3)]
    local_sum, context_sum = local[0] + local[1] + local[2], context[0] + context[1] + context[2]
    dense = measured & (local_sum >= cfg.fold_min_od_ratio * context_sum)
    np.maximum(local_sum, 1e-3, out=local_sum)
    np.maximum(context_sum, 1e-3, out=context_sum)
    shift = np.zeros_like(local_sum)
    for lc, cc in zip(local, context):  # L1 distance of the OD chromaticities
        shift += np.abs(lc / local_sum - cc / context_sum)
    return dense & (shift <= cfg.fold_max_colour_shift)


def _bubble(od: np.ndarray, od_sum: np.ndarray, measured: np.ndarray, px_um: float,
            cfg: QcConfig) -> np.ndarray:
    """Thin dark neutral rims around pale, convex interiors, and long straight dark lines."""
    from scipy import ndimage
    from skimage.measure import regionprops

    lo, hi = od.min(axis=2), od.max(axis=2)
    spread = (hi - lo) / np.maximum(od.mean(axis=2), 1e-3)
    dark = (lo >= cfg.rim_min_od) & (spread <= cfg.rim_max_spread)
    width_px = cfg.rim_max_width_um / px_um
    thin = dark & ~ndimage.binary_opening(dark, _disk(width_px / 2))
    thin = ndimage.binary_closing(thin, _disk(width_px / 2), border_value=0)  # bridge gaps in rims
    filled = ndimage.binary_fill_holes(thin)
    interiors, n = ndimage.label(filled & ~thin)
    out = np.zeros_like(measured)
    reference = float(np.median(od_sum[measured])) if measured.any() else 0.0
    if n:
        idx = np.arange(1, n + 1)
        mean_od = ndimage.mean(od_sum, interiors, idx)
        solid = np.array([r.solidity >= cfg.bubble_min_solidity for r in regionprops(interiors)])
        rims = ndimage.grey_dilation(interiors, footprint=_disk(width_px)) * thin
        neutral = ndimage.median(spread, rims, idx) <= cfg.black_max_spread  # grey as a whole
        pale = np.concatenate([[False], (mean_od <= cfg.bubble_max_od_ratio * reference) & solid & neutral])
        out |= ndimage.binary_dilation(pale[interiors], _disk(width_px)) & filled
    lines, n = ndimage.label(thin & ~out)
    if n:  # coverslip edges: long and straight (second moments of a thin line)
        straight = [r.axis_major_length * px_um >= cfg.edge_min_length_um
                    and r.axis_minor_length <= 2 * width_px for r in regionprops(lines)]
        out |= ndimage.binary_dilation(np.concatenate([[False], straight])[lines], _disk(1))
    return out
