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
- ``blur``: out of focus, from a focus measure read cell by cell at ``focus_mpp`` µm/px: the energy
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

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .config import QcConfig
from .focus import FocusJob, blur_layer
from .slide import Slide
from .smoothing import MaskedGauss, dilate, erode, normalized_gauss
from .tiling import TileGrid, cell_means
from .tissue import Overview, TissueMask, density_lut, read_overview

__all__ = ["KINDS", "ArtefactMask", "detect_artefacts",
           "cell_intensity_flags"]

KINDS: tuple[str, ...] = ("pen", "blur", "fold", "bubble")
_FOLD_LOCAL_UM = 16.0  # Gaussian sigma smoothing tissue OD before the fold test, µm
_EDGE_UM = 4.0  # px this close to ink or a bubble are not tested for blur, µm
_STRIP_ROWS = 128  # overview rows per pass of the per-px colour tests (bounds their temporaries)
# threads for the detectors' steps that add little memory (numpy and scipy's filters release the GIL)
_THREADS = 2


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
                     overview: Overview | None = None, workers: int = 0,
                     focus: FocusJob | None = None) -> ArtefactMask:
    """Artefact layers of ``slide`` on ``mask``'s grid (pass ``overview`` read at ``mask.mpp``
    to reuse it). Reads the overview and the tissue's cells at ``cfg.focus_mpp`` µm/px (in
    ``workers`` processes when > 1; :mod:`wsi_response.focus`), or takes the energies of
    ``focus``, a :class:`FocusJob` at ``cfg.focus_mpp`` started earlier on the same grid (it is
    closed here)."""
    if overview is None:
        overview = read_overview(slide, mask.mpp)
    tissue = mask.mask
    if overview.image.shape[:2] != tissue.shape:
        raise ValueError(f"overview {overview.image.shape[:2]} and mask {tissue.shape} differ in shape")
    if focus is None:
        focus = FocusJob(slide, mask, cfg.focus_mpp, workers)  # in worker processes while the rest runs here
    try:
        layers, measured = _overview_layers(overview, tissue, mask.mpp, cfg)
        near = _dilate(layers["pen"] | layers["bubble"], _EDGE_UM / mask.mpp)  # their edges look smooth
        layers["blur"] = blur_layer(focus.result(mask), mask, measured, cfg) & ~near
    finally:
        focus.close()
    min_px = int(cfg.min_artefact_mm2 / (mask.mpp / 1000.0) ** 2)
    if min_px > 1:  # ink is found by colour alone and kept however small
        layers = {k: v if k == "pen" else _drop_small(v, min_px) for k, v in layers.items()}
    return ArtefactMask(layers={k: layers[k] for k in KINDS}, downsample=mask.downsample, mpp=mask.mpp,
                        tissue_area_mm2=mask.area_mm2)


def _overview_layers(overview: Overview, tissue: np.ndarray, px_um: float, cfg: QcConfig
                     ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The ``pen``, ``bubble`` and ``fold`` layers, from the overview alone, and the tissue left
    for the colour and focus tests (neither ink nor bubble)."""
    rgb = overview.image
    lut = density_lut(overview.glass)
    excess, od = _density(rgb, lut, cfg)
    pen = _ink(excess, od, px_um, cfg) & tissue
    del excess
    bubble = _bubble(od, rgb, lut, tissue & ~pen, px_um, cfg) & tissue
    measured = tissue & ~pen & ~bubble
    return {"pen": pen, "fold": _fold(od.total, rgb, lut, measured, px_um, cfg), "bubble": bubble}, measured


def cell_intensity_flags(grid: TileGrid, overview: Overview, tissue: TissueMask, cfg: QcConfig = QcConfig()
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Near-white and near-black tiles, each (N,) bool: the mean grey of the *tissue* in each cell.

    The overview is box-filtered from the slide, so the mean there is the mean at the tiles'
    resolution; no tile has to be read. Glass around the tissue does not count (an edge cell is
    mostly glass, not a blank tile); ``tissue`` must be on the overview's grid.
    """
    rgb = overview.image
    grey = (rgb[..., 0].astype(np.float32) + rgb[..., 1] + rgb[..., 2]) * (tissue.mask / np.float32(3.0))
    amount = cell_means(grid, tissue.mask, overview.downsample)
    mean_grey = cell_means(grid, grey, overview.downsample) / np.maximum(amount, 1e-12)
    has_tissue = amount > 0
    return has_tissue & (mean_grey > cfg.tile_white_min_grey), has_tissue & (mean_grey < cfg.tile_black_max_grey)


# --------------------------------------------------------------------------- detectors


@dataclass(frozen=True)
class _Density:
    """Per-px optical density (OD) tests of the overview, ``[y, x]`` on the mask grid."""

    total: np.ndarray       # OD summed over the channels, float32
    black_seed: np.ndarray  # every channel's OD >= black_min_od, flat spectrum
    black_grow: np.ndarray  # lowest OD minus half the spread >= black_grow_od
    dark: np.ndarray        # every channel's OD >= rim_min_od, spread / mean <= rim_max_spread


def _density(rgb: np.ndarray, lut: np.ndarray, cfg: QcConfig) -> tuple[np.ndarray, _Density]:
    """Ink colour excess (max(red, blue) OD minus green OD, float32 ``[y, x]``) and the other
    per-px OD tests of ``rgb`` (uint8 ``[y, x, 3]``; ``lut`` from :func:`density_lut`).

    Computed in strips of :data:`_STRIP_ROWS` rows, in threads: the channel planes never exist at
    full size.
    """
    h, w = rgb.shape[:2]
    excess, total = np.empty((h, w), np.float32), np.empty((h, w), np.float32)
    black_seed, black_grow, dark = (np.empty((h, w), bool) for _ in range(3))

    def strip(r0: int) -> None:
        rows = slice(r0, r0 + _STRIP_ROWS)
        r, g, b = (lut[c].take(rgb[rows, :, c]) for c in range(3))
        hi, lo = np.maximum(r, b), np.minimum(r, b)
        np.subtract(hi, g, out=excess[rows])  # > 0: red or blue absorbed more than green
        np.maximum(hi, g, out=hi)
        np.minimum(lo, g, out=lo)
        np.add(r, g, out=total[rows])
        total[rows] += b
        spread = np.subtract(hi, lo, out=hi)
        mean = np.maximum(total[rows] / 3.0, 1e-3, out=r)
        black_seed[rows] = (spread <= cfg.black_max_spread * mean) & (lo >= cfg.black_min_od)
        black_grow[rows] = lo - 0.5 * spread >= cfg.black_grow_od
        dark[rows] = (lo >= cfg.rim_min_od) & (spread / mean <= cfg.rim_max_spread)

    with ThreadPoolExecutor(_THREADS) as threads:  # numpy runs without the GIL: strips on every core
        list(threads.map(strip, range(0, h, _STRIP_ROWS)))
    return excess, _Density(total=total, black_seed=black_seed, black_grow=black_grow, dark=dark)


def _disk(radius_px: float) -> np.ndarray:
    r = max(0, int(round(radius_px)))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return xx * xx + yy * yy <= r * r + r


def _bbox(mask: np.ndarray, pad: int = 0) -> tuple[slice, slice] | None:
    """Bounding box of the true px of ``mask`` grown by ``pad`` px (clipped); None if none."""
    from scipy import ndimage

    found = ndimage.find_objects(mask.view(np.uint8))
    if not found:
        return None
    return tuple(slice(max(0, s.start - pad), min(n, s.stop + pad))  # type: ignore[return-value]
                 for s, n in zip(found[0], mask.shape))


def _dilate(mask: np.ndarray, radius_px: float) -> np.ndarray:
    """Binary dilation by :func:`_disk` ``(radius_px)``, computed on the true px' bounding box."""
    disk = _disk(radius_px)
    out = np.zeros_like(mask)
    box = _bbox(mask, disk.shape[0] // 2)
    if box is not None:
        out[box] = dilate(mask[box], disk)
    return out


def _drop_small(mask: np.ndarray, max_px: int) -> np.ndarray:
    """``mask`` without its 4-connected pieces of at most ``max_px`` px."""
    from skimage import morphology

    out = np.zeros_like(mask)
    box = _bbox(mask)
    if box is not None:
        out[box] = morphology.remove_small_objects(mask[box], max_size=max_px)
    return out


def _ink(excess: np.ndarray, od: _Density, px_um: float, cfg: QcConfig) -> np.ndarray:
    """Marker ink px: colour out of the H&E gamut (``excess`` > 0), or black; grown from clear seeds."""
    # under ink, the tissue's own (negative) excess remains: measure against the surroundings
    plain = excess < 0.0  # H&E and glass; ink over tissue has a positive excess
    local = normalized_gauss(excess, plain, cfg.ink_context_um / px_um)
    del plain
    np.minimum(local, 0.0, out=local)
    np.subtract(excess, local, out=local)
    colour = _grow(local >= cfg.ink_grow_excess_od, excess >= cfg.ink_min_excess_od)
    del local
    colour |= _grow(od.black_grow, od.black_seed)
    return colour


def _grow(candidates: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Connected components of ``candidates | seeds`` that hold a seed."""
    from scipy import ndimage

    if not seeds.any():
        return np.zeros_like(seeds)
    labels, n = ndimage.label(candidates | seeds)
    keep = np.zeros(n + 1, bool)
    keep[labels[seeds]] = True
    keep[0] = False
    return keep[labels]


def _fold(total: np.ndarray, rgb: np.ndarray, lut: np.ndarray, measured: np.ndarray, px_um: float,
          cfg: QcConfig) -> np.ndarray:
    """Tissue px ``fold_min_od_ratio`` times as dense as their surroundings, in the same colour
    (two layers of the same tissue; denser tissue of another kind has another colour).

    ``total``: the OD summed over the channels; the channels' own OD (from ``rgb`` and ``lut``)
    is smoothed only when some px are dense, and read only there.
    """
    with ThreadPoolExecutor(_THREADS) as threads:
        means = list(threads.map(lambda s: MaskedGauss(measured, s), (_FOLD_LOCAL_UM / px_um,
                                                                        cfg.fold_context_um / px_um)))
        local, context = (mean(total) for mean in means)  # Gaussians are linear; one full plane at a time
        dense = measured & (local >= cfg.fold_min_od_ratio * context)
        at = np.nonzero(dense)
        if not at[0].size:
            return dense
        sums = (local[at], context[at])
        del local, context
        parts = []  # per channel: its local and context OD at the dense px
        for c in (0, 1):  # the third channel's is the sum less these two
            plane = lut[c].take(rgb[..., c])
            parts.append(list(threads.map(lambda mean: mean(plane, at), means)))
            del plane
    parts.append([s - p0 - p1 for s, p0, p1 in zip(sums, *parts)])
    norm = [np.maximum(s, 1e-3) for s in sums]
    shift = sum(np.abs(lc / norm[0] - cc / norm[1]) for lc, cc in parts)  # L1 of the chromaticities
    dense[at] = shift <= cfg.fold_max_colour_shift
    return dense


def _bubble(od: _Density, rgb: np.ndarray, lut: np.ndarray, measured: np.ndarray, px_um: float,
            cfg: QcConfig) -> np.ndarray:
    """Thin dark neutral rims around pale, convex interiors, and long straight dark lines."""
    from scipy import ndimage
    from skimage.morphology import convex_hull_image

    width_px = cfg.rim_max_width_um / px_um
    half = _disk(width_px / 2)
    thin = od.dark & ~dilate(erode(od.dark, half), half)  # less its opening
    thin = erode(dilate(thin, half), half)  # closing: bridges gaps in rims
    # interiors: the holes in the rims, background pieces (4-connected) clear of the border
    background, n = ndimage.label(~thin)
    hole = np.ones(n + 1, bool)
    hole[0] = False
    hole[np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]])] = False
    interiors = (np.cumsum(hole, dtype=np.int32) * hole)[background]  # numbered 1.. in scan order
    del background
    n = int(hole.sum())
    filled = thin | (interiors > 0)
    out = np.zeros_like(measured)
    if n:
        reference = float(np.median(od.total[measured])) if measured.any() else 0.0
        mean_od = ndimage.mean(od.total, interiors, np.arange(1, n + 1))
        boxes = ndimage.find_objects(interiors)
        rim = _disk(width_px)
        reach = 2 * (rim.shape[0] // 2)  # the rim's disk, and that of any label it competes with
        pale = np.zeros(n + 1, bool)
        for i in np.flatnonzero(mean_od <= cfg.bubble_max_od_ratio * reference):
            inside = interiors[boxes[i]] == i + 1
            if inside.sum() < cfg.bubble_min_solidity * convex_hull_image(inside).sum():
                continue
            # its rim: thin px whose disk holds it as the highest label (grey dilation of labels)
            box = tuple(slice(max(0, s.start - reach), s.stop + reach) for s in boxes[i])
            ys, xs = np.nonzero((ndimage.grey_dilation(interiors[box], footprint=rim) == i + 1)
                                & thin[box])
            od_rim = lut[np.arange(3), rgb[box][ys, xs]]  # [px, channel]
            spread = np.ptp(od_rim, axis=1) / np.maximum(od_rim.mean(axis=1), 1e-3)
            pale[i + 1] = ys.size > 0 and np.median(spread) <= cfg.black_max_spread  # grey as a whole
        if pale.any():
            out |= _dilate(pale[interiors], width_px) & filled
    lines, n = ndimage.label(thin & ~out)
    straight = np.zeros(n + 1, bool)
    for i, box in enumerate(ndimage.find_objects(lines)):  # coverslip edges: long and straight
        # a line's length (4 sd along its axis) is at most twice its bounding box's diagonal
        if 2 * np.hypot(*(s.stop - s.start for s in box)) * px_um < cfg.edge_min_length_um:
            continue
        major, minor = _axis_lengths(np.nonzero(lines[box] == i + 1))
        straight[i + 1] = major * px_um >= cfg.edge_min_length_um and minor <= 2 * width_px
    if straight.any():
        out |= _dilate(straight[lines], 1)
    return out


def _axis_lengths(coords: tuple[np.ndarray, np.ndarray]) -> tuple[float, float]:
    """Major and minor axis lengths (4 sd along the principal axes, px) of a px set."""
    if coords[0].size < 2:
        return 0.0, 0.0
    eig = np.linalg.eigvalsh(np.cov(np.stack(coords).astype(np.float64), bias=True))
    minor, major = 4.0 * np.sqrt(np.maximum(eig, 0.0))
    return float(major), float(minor)
