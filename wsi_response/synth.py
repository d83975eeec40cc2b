"""Synthetic H&E whole-slide images with exact ground truth (tests, demo, benchmarks).

A synthetic slide is a real pyramidal, tiled (256 px), JPEG (YCbCr 4:2:0) TIFF that OpenSlide and
tiffslide open like a scanner's file:

- ``fmt="svs"``: Aperio layout (level 0, a stripped thumbnail, then the ×4 levels as following
  pages), Aperio ``ImageDescription`` with ``AppMag`` and ``MPP``; OpenSlide vendor ``aperio``.
- ``fmt="tiff"``: generic tiled TIFF whose microns-per-pixel live only in the
  ``XResolution``/``YResolution`` tags (``ResolutionUnit`` CENTIMETER); levels are following
  pages with ``NewSubfileType`` reduced-image. OpenSlide 4 (vendor ``generic-tiff``) reports
  ``openslide.mpp-x`` from those tags.

Ground truth is a low-resolution label raster (``LABEL_GLASS`` = 0 glass, ``1 + i`` the class
``classes.CLASSES[i]``); label pixel ``(j, i)`` covers level-0 pixels
``[i*d, (i+1)*d) x [j*d, (j+1)*d)`` with ``d = label_downsample``. Rendered pixels follow it
exactly: a level-0 pixel belongs to the class of the label pixel that contains it (textures are
blended over a few µm around borders, the owning class always keeps more than half the weight).
Areas are counted from the raster, so they are exact.

Files written beside ``<stem>.svs`` (each to a temporary name, then renamed)::

    <stem>.truth.json           mpp, dimensions, label downsample, areas_mm2, tissue_area_mm2, ...
    <stem>.labels.png           uint8 label raster (lossless)
    <stem>.annotations.geojson  QuPath FeatureCollection, one feature per region polygon
    <stem>.partial.geojson      what a pathologist draws: eroded partial polygons, some regions none
    <stem>.artefacts.png        only with ``artefacts=...``: uint8 bit raster at the label
                                resolution, bit ``1 << i`` = kind ``ARTEFACTS[i]``

Artefacts (``artefacts=("pen", "blur", "fold", "bubble")``, default none) follow their raster
exactly like classes do: pen strokes (blue, green, black or red marker ink over tissue and
glass), out-of-focus patches (Gaussian blur of the rendered pixels, sigma ``BLUR_SIGMA_UM`` at
every level), folds (tissue of double thickness: stain concentration × ``FOLD_THICKNESS``) and
air bubbles (pale interior, thin dark rim), the last two on tissue only.

Domains (``domain=``, :data:`DOMAINS` in ``synth_domains``) are generator settings as if from
other labs: staining, scanner, morphology and tissue sub-types per class (``synth_textures``).
Outside the ``default`` domain, ``<stem>.subtypes.png`` holds the sub-type raster (values: the
``tid`` of ``synth_textures.SUBTYPES``) and ``truth.json`` its exact areas per class and name.

Memory is bounded: level 0 is never held; tiles are rendered one at a time from per-class
texture atlases (``ATLAS_UM`` square, at level-0 resolution) and streamed to tifffile.
Same arguments and seed give a byte-identical slide.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

import numpy as np

from .atomic import atomic_open, write_atomic
from .classes import CLASSES, TUMOR_BED, qupath_classification
from .ids import check_inside, check_specimen_id
from .synth_domains import DOMAINS, Domain, Scanner, domain_names, draw_scanner, resolve_domain, split_subtypes
from .synth_textures import SUBTYPES, build_atlas, periodic_noise, smooth_noise

__all__ = [
    "LABEL_GLASS",
    "SlideTruth",
    "SpecimenTruth",
    "synth_slide",
    "synth_specimen",
    "load_slide_truth",
    "load_specimen_truth",
    "read_labels",
    "read_artefacts",
    "read_subtypes",
    "ARTEFACTS",
    "DOMAINS",
    "INK_RGB",
]

LABEL_GLASS = 0
"""Label raster value of glass; class ``CLASSES[i]`` has value ``1 + i``."""

SCHEMA_VERSION = 1
TILE_PX = 256
ATLAS_UM = 256.0           # texture atlas side (µm); in px a power of two in [512, 2048]
LABEL_UM = 4.0             # target label raster resolution (µm per label px)
MIN_LEVEL_LONG_PX = 1500   # add ×4 levels until the smallest long side is below this
PARTIAL_MARGIN_UM = 50.0   # partial annotations stay at least this far from region borders

ARTEFACTS: tuple[str, ...] = ("pen", "blur", "fold", "bubble")
"""Synthetic artefact kinds; kind ``ARTEFACTS[i]`` is bit ``1 << i`` of the artefact raster."""
INK_RGB: dict[str, tuple[int, int, int]] = {  # marker ink over glass (240 grey), RGB
    "blue": (30, 70, 160), "green": (30, 140, 95), "black": (45, 45, 50), "red": (225, 60, 25)}
BLUR_SIGMA_UM = 3.0        # Gaussian blur of out-of-focus patches, µm
FOLD_THICKNESS = 2.0       # stain concentration factor inside a fold (two layers of tissue)
BUBBLE_PALLOR = 0.7        # fraction of the stain lost under an air bubble
BUBBLE_RIM_UM = 8.0        # width of a bubble's dark rim, µm
BUBBLE_RIM_OD = 0.45       # neutral optical density added on the rim
_RIM_BIT = 1 << len(ARTEFACTS)  # render-only: the rim part of a bubble

# texture ids of the default domain ("other" is a mix of fat, muscle and blood); other domains
# use every id of synth_textures.SUBTYPES (the sub-type raster's values)
_T_GLASS, _T_VIABLE, _T_NECROSIS, _T_FIBROSIS, _T_FAT, _T_MUSCLE, _T_BLOOD = range(7)
_TEXTURE_CLASS = np.array([0] + [1 + CLASSES.index(s.cls) for s in SUBTYPES],
                          dtype=np.uint8)  # texture id -> label value

# Stain optical-density vectors (R, G, B), unit length: haematoxylin, eosin, red blood cells.
_STAINS = np.array(DOMAINS["default"].stains, dtype=np.float32)
_STAINS /= np.linalg.norm(_STAINS, axis=1, keepdims=True)
_GLASS_OD = float(np.log10(255.0 / 240.0))   # glass ~240 grey


# --------------------------------------------------------------------------- truth values


@dataclass(frozen=True)
class SlideTruth:
    """Ground truth of one synthetic slide. Areas in mm², coordinates in level-0 px."""

    slide_path: Path
    mpp: float
    dimensions_px: tuple[int, int]          # level-0 (width, height)
    tissue_area_mm2: float
    areas_mm2: dict[str, float]             # per canonical class
    label_path: Path
    label_downsample: float                 # level-0 px per label px
    annotations_path: Path
    partial_annotations_path: Path
    truth_path: Path
    artefacts_path: Path | None = None      # bit raster (see ARTEFACTS); None without artefacts
    artefact_areas_mm2: dict[str, float] = field(default_factory=dict)         # whole mask, per kind
    artefact_tissue_areas_mm2: dict[str, float] = field(default_factory=dict)  # on tissue, per kind
    domain: str = "default"
    subtypes_path: Path | None = None       # sub-type raster; None in the default domain
    subtype_areas_mm2: dict[str, dict[str, float]] = field(default_factory=dict)  # class -> name

    @property
    def tumor_bed_area_mm2(self) -> float:
        return float(sum(self.areas_mm2[c] for c in TUMOR_BED))

    @property
    def viable_percent(self) -> float:
        return _viable_percent(self.areas_mm2)


@dataclass(frozen=True)
class SpecimenTruth:
    """Ground truth of a synthetic specimen (several slides)."""

    specimen_id: str
    slides: tuple[SlideTruth, ...]
    areas_mm2: dict[str, float]
    tissue_area_mm2: float
    viable_percent: float
    truth_path: Path


def _viable_percent(areas: dict[str, float]) -> float:
    bed = sum(areas[c] for c in TUMOR_BED)
    return 100.0 * areas["viable_tumor"] / bed if bed > 0 else 0.0


# --------------------------------------------------------------------------- small helpers


def _write_png_atomic(path: Path, raster: np.ndarray) -> None:
    """A uint8 ``[y, x]`` raster as a lossless greyscale PNG."""
    from PIL import Image

    with atomic_open(path) as fh:
        Image.fromarray(raster, mode="L").save(fh, format="PNG")


# --------------------------------------------------------------------------- texture atlases


def _atlas_px(mpp: float) -> int:
    return int(2 ** int(np.clip(round(math.log2(ATLAS_UM / mpp)), 9, 11)))


def _build_atlases(rng: np.random.Generator, mpp: float, domain: Domain, tex: np.ndarray,
                   seed: int) -> list[np.ndarray | None]:
    """Per texture id, an (A, A, 3) float32 stain-concentration atlas (H, E, RBC), periodic.
    The default domain draws the original six from ``rng``; other domains draw the sub-types
    present in ``tex``, each from its own stream of ``seed``."""
    n = _atlas_px(mpp)
    um = 1.0 / mpp  # px per µm
    atl: list[np.ndarray | None] = [None] * (1 + len(SUBTYPES))
    if domain.legacy:
        for t in range(1, 7):
            atl[t] = build_atlas(t, rng, n, um, domain)
        return atl
    for t in np.unique(tex):
        if t != _T_GLASS:
            t_rng = np.random.default_rng(np.random.SeedSequence([int(seed), 7300, int(t)]))
            atl[t] = build_atlas(int(t), t_rng, n, um, domain)
    return atl


def _glass_atlas(rng: np.random.Generator, mpp: float) -> np.ndarray:
    """(A, A) float32 background optical density: glass ~240 with faint noise."""
    n = _atlas_px(mpp)
    return (_GLASS_OD + 0.0035 * periodic_noise(rng, n, 0.7)
            + 0.003 * periodic_noise(rng, n, 30 / mpp)).astype(np.float32)


def _downsample_atlas(a: np.ndarray, f: int) -> np.ndarray:
    if f == 1:  # level 0 uses the atlas itself (no copy: atlases are the largest arrays held)
        return a
    n = a.shape[0]
    f = min(f, n)
    m = n // f
    shp = (m, f, m, f) + a.shape[2:]
    return a[: m * f, : m * f].reshape(shp).mean(axis=(1, 3)).astype(np.float32)


# --------------------------------------------------------------------------- label raster


def _drop_small(mask: np.ndarray, min_px: int) -> np.ndarray:
    """``mask`` without its 4-connected components smaller than ``min_px`` pixels."""
    from skimage.measure import label as cc_label

    comps = cc_label(mask, connectivity=1)
    sizes = np.bincount(comps.ravel())
    keep = sizes >= min_px
    keep[0] = False
    return keep[comps]


def _region_px(shape: tuple[int, int], label_um: float) -> float:
    """Correlation length (label px) of the class regions of a label raster of ``shape``."""
    return float(np.clip(min(shape) / 5, 150 / label_um, 1200 / label_um))


def _subtype_truth(tex: np.ndarray, path: Path, px_mm2: float) -> dict:
    """Write the sub-type raster to ``path``; its ``truth.json`` entries (exact areas)."""
    _write_png_atomic(path, tex)
    counts = np.bincount(tex.ravel(), minlength=1 + len(SUBTYPES))
    areas: dict[str, dict[str, float]] = {c: {} for c in CLASSES}
    for s in SUBTYPES:
        if counts[s.tid]:
            areas[s.cls][s.name] = float(counts[s.tid]) * px_mm2
    return {
        "subtypes_path": path.name,
        "subtype_values": {str(s.tid): s.name for s in SUBTYPES},
        "subtype_pixel_counts": {s.name: int(counts[s.tid]) for s in SUBTYPES if counts[s.tid]},
        "subtype_areas_mm2": areas,
    }


def _build_labels(rng: np.random.Generator, shape: tuple[int, int], label_um: float,
                  viable_fraction: float) -> np.ndarray:
    """Texture-id raster (uint8, values ``_T_*``) at label resolution."""
    h, w = shape
    short = min(h, w)
    yy = (np.arange(h, dtype=np.float32)[:, None] + 0.5) / h
    xx = (np.arange(w, dtype=np.float32)[None, :] + 0.5) / w
    # tissue: 1-3 irregular pieces
    npieces = int(rng.choice([1, 1, 2, 3]))
    env = np.zeros((h, w), np.float32)
    centers_x = np.sort(rng.uniform(0.3, 0.7, npieces)) if npieces == 1 else \
        np.linspace(0.22, 0.78, npieces) + rng.uniform(-0.05, 0.05, npieces)
    for cx in centers_x:
        cy = rng.uniform(0.4, 0.6)
        rx = rng.uniform(0.30, 0.40) / npieces ** 0.8
        ry = rng.uniform(0.28, 0.38)
        th = rng.uniform(-0.5, 0.5)
        dx, dy = (xx - cx) * w / short, (yy - cy) * h / short
        u = (dx * math.cos(th) + dy * math.sin(th)) / (rx * w / short)
        v = (-dx * math.sin(th) + dy * math.cos(th)) / ry
        env = np.maximum(env, 1.0 - (u * u + v * v))
    field = env + 0.30 * smooth_noise(rng, shape, short / 6) + 0.08 * smooth_noise(
        rng, shape, short / 25)
    margin = max(2, int(0.03 * short))
    border = np.minimum(np.minimum(np.arange(h)[:, None], h - 1 - np.arange(h)[:, None]),
                        np.minimum(np.arange(w)[None, :], w - 1 - np.arange(w)[None, :]))
    field = np.where(border < margin, -10.0, field).astype(np.float32)
    frac = rng.uniform(0.36, 0.52)
    tissue = field > np.quantile(field, 1.0 - frac)
    n_t = int(tissue.sum())
    tissue = _drop_small(tissue, max(4, n_t // 200))
    tissue = ~_drop_small(~tissue, max(4, n_t // 500))
    del field, env

    # classes inside the tissue: quantile thresholds of smooth fields give exact fractions
    reg = _region_px(shape, label_um)
    o = smooth_noise(rng, shape, reg * 1.4)
    f_other = rng.uniform(0.15, 0.32)
    other = tissue & (o < np.quantile(o[tissue], f_other))
    del o
    bed = tissue & ~other
    tex = np.zeros(shape, np.uint8)
    v = smooth_noise(rng, shape, reg)
    vb = v[bed]
    if vb.size and viable_fraction > 0:
        k = int(round(viable_fraction * vb.size))
        thr = np.sort(vb)[vb.size - k] if k > 0 else np.inf
        viable = bed & (v >= thr)
    else:
        viable = np.zeros(shape, bool)
    del v, vb
    rest = bed & ~viable
    nf = smooth_noise(rng, shape, reg * 0.8)
    share = rng.uniform(0.3, 0.7)
    necrosis = rest & (nf > np.quantile(nf[rest], 1 - share)) if rest.any() else rest
    del nf
    tex[viable] = _T_VIABLE
    tex[necrosis] = _T_NECROSIS
    tex[rest & ~necrosis] = _T_FIBROSIS
    if other.any():
        s = smooth_noise(rng, shape, reg * 0.6)
        so = s[other]
        q1, q2 = np.quantile(so, [rng.uniform(0.4, 0.6), rng.uniform(0.75, 0.9)])
        tex[other & (s < q1)] = _T_FAT
        tex[other & (s >= q1) & (s < q2)] = _T_MUSCLE
        tex[other & (s >= q2)] = _T_BLOOD
    return tex


def _region_scales(rng: np.random.Generator, tex: np.ndarray, label_um: float
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Per-label-pixel haematoxylin and eosin intensity factors (per region + slow drift)."""
    from skimage.measure import label as cc_label

    comps, ncomp = cc_label(tex, background=_T_GLASS, connectivity=1, return_num=True)
    fh = rng.uniform(0.82, 1.18, ncomp + 1).astype(np.float32)
    fe = rng.uniform(0.82, 1.18, ncomp + 1).astype(np.float32)
    fh[0] = fe[0] = 1.0
    drift = 1.0 + 0.06 * smooth_noise(rng, tex.shape, 2000 / label_um)
    sh = fh[comps] * drift
    se = fe[comps] * (2.0 - drift)
    sh[comps == 0] = 1.0
    se[comps == 0] = 1.0
    return sh.astype(np.float32), se.astype(np.float32)


# --------------------------------------------------------------------------- artefact rasters


def _curve(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A thin smooth curve across the raster (bool), from one side to the opposite side."""
    from skimage.draw import line

    h, w = shape
    t = np.linspace(0.0, 1.0, 64)
    a, b = rng.uniform(0.15, 0.85, 2)
    wobble = rng.uniform(0.05, 0.15) * np.sin(2 * math.pi * (rng.uniform(0.5, 1.5) * t
                                                              + rng.uniform(0, 1)))
    across, along = t, a + (b - a) * t + wobble
    if rng.random() < 0.5:  # left to right, else top to bottom
        ys, xs = along * (h - 1), across * (w - 1)
    else:
        ys, xs = across * (h - 1), along * (w - 1)
    out = np.zeros(shape, bool)
    ys = np.clip(np.round(ys), 0, h - 1).astype(np.int64)
    xs = np.clip(np.round(xs), 0, w - 1).astype(np.int64)
    for y0, x0, y1, x1 in zip(ys[:-1], xs[:-1], ys[1:], xs[1:]):
        rr, cc = line(int(y0), int(x0), int(y1), int(x1))
        out[rr, cc] = True
    return out


def _within(mask: np.ndarray, radius_px: float) -> np.ndarray:
    """Pixels within ``radius_px`` of ``mask`` (Euclidean)."""
    from scipy import ndimage

    return ndimage.distance_transform_edt(~mask) <= radius_px


def _build_artefacts(rng: np.random.Generator, tissue: np.ndarray, label_um: float,
                     kinds: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Render raster (uint8: ``ARTEFACTS`` bits + ``_RIM_BIT``) and ink colour raster (uint8:
    0 none, ``1 + i`` the colour ``list(INK_RGB)[i]``) at label resolution."""
    from scipy import ndimage

    shape = tissue.shape
    art = np.zeros(shape, np.uint8)
    ink = np.zeros(shape, np.uint8)
    short_um = min(shape) * label_um
    bit = {k: np.uint8(1 << i) for i, k in enumerate(ARTEFACTS)}
    if "pen" in kinds:
        for colour in rng.permutation(len(INK_RGB))[:2]:
            half_um = float(np.clip(0.025 * short_um, 20.0, 250.0)) * rng.uniform(0.8, 1.2)
            stroke = _within(_curve(rng, shape), half_um / label_um)
            art[stroke] |= bit["pen"]
            ink[stroke] = colour + 1
    if "blur" in kinds:
        r_px = float(np.clip(0.15 * short_um, 80.0, 1500.0)) / label_um
        cy, cx = np.argwhere(tissue)[rng.integers(int(tissue.sum()))]
        yy, xx = np.ogrid[:shape[0], :shape[1]]
        d = np.hypot((yy - cy) / rng.uniform(0.7, 1.3), (xx - cx) / rng.uniform(0.7, 1.3)) / r_px
        art[d + 0.15 * smooth_noise(rng, shape, r_px) < 1.0] |= bit["blur"]
    if "fold" in kinds:
        half_um = float(np.clip(0.02 * short_um, 15.0, 100.0)) * rng.uniform(0.8, 1.2)
        art[_within(_curve(rng, shape), half_um / label_um) & tissue] |= bit["fold"]
    if "bubble" in kinds:
        depth = ndimage.distance_transform_edt(tissue)
        rim_px = max(1.0, BUBBLE_RIM_UM / label_um)
        for _ in range(int(rng.integers(1, 4))):
            r_px = float(np.clip(0.06 * short_um, 30.0, 300.0)) * rng.uniform(0.7, 1.3) / label_um
            inside = np.argwhere(depth > r_px + 2)
            if not len(inside):
                continue
            cy, cx = inside[rng.integers(len(inside))]
            yy, xx = np.ogrid[:shape[0], :shape[1]]
            d = np.hypot(yy - cy, xx - cx)
            art[d <= r_px] |= bit["bubble"]
            art[(d <= r_px) & (d > r_px - rim_px)] |= np.uint8(_RIM_BIT)
    return art, ink


# --------------------------------------------------------------------------- rendering


class _LevelRenderer:
    """Renders 256x256 RGB tiles of one pyramid level from atlases and the label raster."""

    def __init__(self, f: int, dims: tuple[int, int], ds: int, tex: np.ndarray, sh: np.ndarray,
                 se: np.ndarray, atlases: list[np.ndarray | None], glass: np.ndarray,
                 offsets: np.ndarray, art: np.ndarray | None = None, ink: np.ndarray | None = None,
                 blur_sigma_l0: float = 0.0, scanner: Scanner | None = None) -> None:
        self.f = f
        self.w, self.h = dims
        grids = [tex, sh, se] + ([art, ink] if art is not None else [None, None])
        if f < ds:
            self.scale = ds / f  # level px per grid px
        else:
            iy = np.minimum(((np.arange(self.h) + 0.5) * f / ds).astype(np.int64), tex.shape[0] - 1)
            ix = np.minimum(((np.arange(self.w) + 0.5) * f / ds).astype(np.int64), tex.shape[1] - 1)
            self.scale = 1.0
            grids = [None if g is None else g[np.ix_(iy, ix)] for g in grids]
        self.tex, self.sh, self.se, self.art, self.ink = grids
        self.blur_sigma = blur_sigma_l0 / f  # level px
        self.ink_od = np.log10(240.0 / np.array(list(INK_RGB.values()), np.float32))
        self.atlases = [None if a is None else _downsample_atlas(a, f) for a in atlases]
        self.glass = _downsample_atlas(glass, f)
        self.offsets = [(int(oy) // f, int(ox) // f) for oy, ox in offsets]
        self.scanner = scanner
        self.stain = _STAINS if scanner is None else scanner.stains

    @staticmethod
    def _interp(start: int, n_out: int, scale: float, n_grid: int):
        """Bilinear sampling of grid cells for output px ``start..start+n_out`` (1-D)."""
        u = (np.arange(start, start + n_out, dtype=np.float64) + 0.5) / scale - 0.5
        i0 = np.floor(u).astype(np.int64)
        t = (u - i0).astype(np.float32)
        a = np.clip(i0, 0, n_grid - 1)
        b = np.clip(i0 + 1, 0, n_grid - 1)
        lo, hi = int(a.min()), int(b.max()) + 1
        return lo, hi, a - lo, b - lo, 1.0 - t, t

    @staticmethod
    def _bilinear(grid: np.ndarray, iy, ix) -> np.ndarray:
        """Bilinear interpolation of a small 2-D float ``grid`` (gathers, no BLAS)."""
        ya, yb, wya, wyb = iy
        xa, xb, wxa, wxb = ix
        top = grid[ya]
        bot = grid[yb]
        return ((top[:, xa] * wxa + top[:, xb] * wxb) * wya[:, None]
                + (bot[:, xa] * wxa + bot[:, xb] * wxb) * wyb[:, None])

    @staticmethod
    def _gather(atlas: np.ndarray, y0: int, x0: int, th: int, tw: int) -> np.ndarray:
        n = atlas.shape[0]
        y0 %= n
        x0 %= n
        if y0 + th <= n and x0 + tw <= n:
            return atlas[y0:y0 + th, x0:x0 + tw]
        if th <= n and tw <= n:  # wraps at most once per axis: join slices
            ys = [(y0, min(n, y0 + th))] + ([(0, y0 + th - n)] if y0 + th > n else [])
            xs = [(x0, min(n, x0 + tw))] + ([(0, x0 + tw - n)] if x0 + tw > n else [])
            return np.concatenate([np.concatenate([atlas[a:b, c:d] for c, d in xs], axis=1)
                                   for a, b in ys], axis=0)
        ry = (np.arange(y0, y0 + th)) % n
        rx = (np.arange(x0, x0 + tw)) % n
        return atlas[np.ix_(ry, rx)]

    def tile(self, ty: int, tx: int) -> np.ndarray:
        """RGB uint8 tile ``(ty, tx)`` of this level."""
        T = TILE_PX
        y0, x0 = ty * T, tx * T
        halo = 0
        if self.art is not None and self.blur_sigma > 0:
            ylo, yhi, *_ = self._interp(y0, T, self.scale, self.art.shape[0])
            xlo, xhi, *_ = self._interp(x0, T, self.scale, self.art.shape[1])
            if (self.art[ylo:yhi, xlo:xhi] & (1 << ARTEFACTS.index("blur"))).any():
                halo = int(math.ceil(4 * self.blur_sigma))
        n = T + 2 * halo
        od = self._od(y0 - halo, x0 - halo, n, n)
        rgb = np.exp(od * np.float32(-math.log(10.0))) * np.float32(255.0)
        if halo:
            rgb = self._blur(rgb, y0 - halo, x0 - halo)[halo:halo + T, halo:halo + T]
        if self.scanner is not None:
            self.scanner.noise(rgb, self.f, ty, tx)
        rgb += np.float32(0.5)
        np.clip(rgb, 0, 255, out=rgb)
        return rgb.astype(np.uint8)

    def _blur(self, rgb: np.ndarray, y0: int, x0: int) -> np.ndarray:
        """``rgb`` (float, level px from ``(y0, x0)``) blurred where the blur raster says."""
        from scipy import ndimage

        n_y, n_x = rgb.shape[:2]
        ylo, yhi, *iy = self._interp(y0, n_y, self.scale, self.art.shape[0])
        xlo, xhi, *ix = self._interp(x0, n_x, self.scale, self.art.shape[1])
        block = (self.art[ylo:yhi, xlo:xhi] & (1 << ARTEFACTS.index("blur"))) > 0
        wgt = self._bilinear(block.astype(np.float32), iy, ix)[:, :, None]
        blurred = ndimage.gaussian_filter(rgb, sigma=(self.blur_sigma, self.blur_sigma, 0))
        return rgb + wgt * (blurred - rgb)

    def _od(self, y0: int, x0: int, th: int, tw: int) -> np.ndarray:
        """Optical density ``(th, tw, 3)`` float32 of level px from ``(y0, x0)``."""
        ylo, yhi, *iy = self._interp(y0, th, self.scale, self.tex.shape[0])
        xlo, xhi, *ix = self._interp(x0, tw, self.scale, self.tex.shape[1])
        block = self.tex[ylo:yhi, xlo:xhi]
        present = np.unique(block)
        conc = np.zeros((th, tw, 3), np.float32)
        for t in present:
            if t == _T_GLASS:
                continue
            oy, ox = self.offsets[t]
            patch = self._gather(self.atlases[t], y0 + oy, x0 + ox, th, tw)
            if len(present) == 1:
                conc += patch
            else:
                wgt = self._bilinear((block == t).astype(np.float32), iy, ix)
                conc += wgt[:, :, None] * patch
        if present.size > 1 or present[0] != _T_GLASS:
            shb = self.sh[ylo:yhi, xlo:xhi]
            seb = self.se[ylo:yhi, xlo:xhi]
            s_h = self._bilinear(shb, iy, ix)
            s_e = self._bilinear(seb, iy, ix)
            conc[:, :, 0] *= s_h
            conc[:, :, 1] *= s_e
            conc[:, :, 2] *= s_e
            art = None if self.art is None else self.art[ylo:yhi, xlo:xhi]
            if art is not None and art.any():
                conc *= self._thickness(art, iy, ix)[:, :, None]
            st = self.stain  # explicit sum: tiny BLAS calls are slow with threaded OpenBLAS
            od = conc[:, :, 0:1] * st[0] + conc[:, :, 1:2] * st[1] + conc[:, :, 2:3] * st[2]
        else:
            od = np.zeros((th, tw, 3), np.float32)
        od += self._gather(self.glass, y0, x0, th, tw)[:, :, None]
        if self.art is not None:
            self._add_dyes(od, self.art[ylo:yhi, xlo:xhi], self.ink[ylo:yhi, xlo:xhi], iy, ix)
        if self.scanner is not None:
            self.scanner.expose(od)
        return od

    def _thickness(self, art: np.ndarray, iy, ix) -> np.ndarray:
        """Stain factor per px: × ``FOLD_THICKNESS`` in folds, less under bubbles."""
        def weight(bit: int) -> np.ndarray:
            return self._bilinear(((art & bit) > 0).astype(np.float32), iy, ix)

        fold = weight(1 << ARTEFACTS.index("fold"))
        bubble = weight(1 << ARTEFACTS.index("bubble"))
        return (1.0 + (FOLD_THICKNESS - 1.0) * fold) * (1.0 - BUBBLE_PALLOR * bubble)

    def _add_dyes(self, od: np.ndarray, art: np.ndarray, ink: np.ndarray, iy, ix) -> None:
        """Add bubble rims (neutral) and marker ink to ``od`` in place."""
        if art.any() and (art & _RIM_BIT).any():
            od += BUBBLE_RIM_OD * self._bilinear(((art & _RIM_BIT) > 0).astype(np.float32),
                                                 iy, ix)[:, :, None]
        for colour in np.unique(ink):
            if colour:
                wgt = self._bilinear((ink == colour).astype(np.float32), iy, ix)
                od += wgt[:, :, None] * self.ink_od[colour - 1]

    def tiles(self) -> Iterator[np.ndarray]:
        nty = -(-self.h // TILE_PX)
        ntx = -(-self.w // TILE_PX)
        for ty in range(nty):
            for tx in range(ntx):
                yield self.tile(ty, tx)

    def array(self) -> np.ndarray:
        """Whole level as one array (only for small levels)."""
        out = np.zeros((self.h, self.w, 3), np.uint8)
        for ty in range(-(-self.h // TILE_PX)):
            for tx in range(-(-self.w // TILE_PX)):
                t = self.tile(ty, tx)
                y0, x0 = ty * TILE_PX, tx * TILE_PX
                hh, ww = min(TILE_PX, self.h - y0), min(TILE_PX, self.w - x0)
                out[y0:y0 + hh, x0:x0 + ww] = t[:hh, :ww]
        return out


def _app_mag(mpp: float) -> int:
    for mag in (80, 40, 20, 10, 5):
        if mpp <= 10.0 / mag * 1.2 + 1e-9:   # 40x: <= 0.3 µm/px, 20x: <= 0.6, ...
            return mag
    return max(1, int(round(10.0 / mpp)))


def _write_tiff(path: Path | BinaryIO, fmt: str, renderers: list[_LevelRenderer], W: int, H: int,
                mpp: float, jpeg_quality: int) -> None:
    import tifffile

    raw_bytes = W * H * 3
    jargs = dict(
        dtype=np.uint8, tile=(TILE_PX, TILE_PX), compression="jpeg",
        compressionargs={"level": int(jpeg_quality)}, photometric="rgb", subsampling=(2, 2),
        metadata=None, software=False, resolutionunit="CENTIMETER",
    )
    head = f"Aperio Image Library v12.0.0\r\n{W}x{H}"
    smallest = renderers[-1].array() if fmt == "svs" else None
    with tifffile.TiffWriter(path, bigtiff=raw_bytes > 3_000_000_000) as tw:
        for i, r in enumerate(renderers):
            res = 1e4 / (mpp * r.f)
            kw = dict(jargs, shape=(r.h, r.w, 3), resolution=(res, res))
            if fmt == "svs":
                if i == 0:
                    kw["description"] = (f"{head} [0,0 {W}x{H}] ({TILE_PX}x{TILE_PX}) JPEG/RGB "
                                         f"Q={int(jpeg_quality)}|AppMag = {_app_mag(mpp)}"
                                         f"|MPP = {mpp:.4f}")
                else:
                    kw["description"] = (f"{head} -> {r.w}x{r.h} JPEG/RGB "
                                         f"Q={int(jpeg_quality)}")
            elif i > 0:
                kw["subfiletype"] = 1
            if fmt == "svs" and i == len(renderers) - 1:
                tw.write(_iter_array_tiles(smallest), **kw)
            else:
                tw.write(r.tiles(), **kw)
            if fmt == "svs" and i == 0:
                # Aperio: page 1 is a stripped thumbnail (OpenSlide ignores it as a level)
                from PIL import Image

                th_w = max(1, int(round(W * min(1.0, 768 / max(W, H)))))
                th_h = max(1, int(round(H * min(1.0, 768 / max(W, H)))))
                thumb = np.asarray(Image.fromarray(smallest).resize((th_w, th_h),
                                                                    Image.BILINEAR))
                tw.write(thumb, photometric="rgb", compression="jpeg",
                         compressionargs={"level": 90}, subsampling=(2, 2), metadata=None,
                         software=False, rowsperstrip=16,
                         description=f"{head} -> {th_w}x{th_h} - |")


def _iter_array_tiles(a: np.ndarray) -> Iterator[np.ndarray]:
    for y in range(0, a.shape[0], TILE_PX):
        for x in range(0, a.shape[1], TILE_PX):
            yield a[y:y + TILE_PX, x:x + TILE_PX]


# --------------------------------------------------------------------------- annotations


def _class_geometry(labels: np.ndarray, value: int, ds: int):
    """Exact union of the label pixels equal to ``value``, in level-0 px (shapely geometry)."""
    import shapely

    m = labels == value
    if not m.any():
        return shapely.MultiPolygon()
    pad = np.zeros((m.shape[0], m.shape[1] + 2), bool)
    pad[:, 1:-1] = m
    d = np.diff(pad.astype(np.int8), axis=1)
    ys, xs = np.nonzero(d == 1)
    ye, xe = np.nonzero(d == -1)
    # runs come out row-major in the same order for starts and ends
    boxes = shapely.box(xs * ds, ys * ds, xe * ds, (ys + 1) * ds)
    geom = shapely.union_all(boxes)
    geom = shapely.make_valid(shapely.simplify(geom, 0.0))
    return geom


def _polygons(geom) -> list:
    if geom.is_empty:
        return []
    if geom.geom_type == "Polygon":
        return [geom]
    if geom.geom_type == "MultiPolygon":
        return list(geom.geoms)
    if geom.geom_type == "GeometryCollection":
        out = []
        for g in geom.geoms:
            out.extend(_polygons(g))
        return out
    return []


def _feature(geom, cls: str, name: str | None = None, locked: bool = False) -> dict:
    import shapely

    gj = json.loads(shapely.to_geojson(geom))
    props: dict = {"objectType": "annotation"}
    if name is not None:
        props["name"] = name
    props.update(classification=qupath_classification(cls), isLocked=locked)
    return {"type": "Feature", "geometry": gj, "properties": props}


def _annotations(rng: np.random.Generator, raster: np.ndarray, ds: int, mpp: float,
                 regions: Sequence[tuple[int, str, str | None]]) -> tuple[dict, dict]:
    """Full and partial annotations of the ``regions`` (raster value, class, name or None)."""
    import shapely

    full, partial = [], []
    for value, cls, name in regions:
        polys = _polygons(_class_geometry(raster, value, ds))
        for p in polys:
            full.append(_feature(p, cls, name))
        if not polys:
            continue
        largest = max(range(len(polys)), key=lambda i: polys[i].area)
        for i, p in enumerate(polys):
            if i != largest and rng.random() < 0.35:
                continue  # left unannotated
            d_px = (PARTIAL_MARGIN_UM + rng.uniform(1.0, 20.0)) / mpp
            core = p.buffer(-d_px, quad_segs=4)
            if core.is_empty or core.area <= 0:
                continue
            minx, miny, maxx, maxy = core.bounds
            pt = None
            for _ in range(50):
                q = shapely.Point(rng.uniform(minx, maxx), rng.uniform(miny, maxy))
                if core.contains(q):
                    pt = q
                    break
            if pt is None:
                pt = core.representative_point()
            rad = math.sqrt(core.area) * rng.uniform(0.3, 0.6)
            blob = shapely.affinity.scale(pt.buffer(rad, quad_segs=8), rng.uniform(0.6, 1.4),
                                          rng.uniform(0.6, 1.4))
            part = shapely.make_valid(core.intersection(blob))
            for q in _polygons(part):
                if q.area > 0:
                    partial.append(_feature(q, cls, name))
    return ({"type": "FeatureCollection", "features": full},
            {"type": "FeatureCollection", "features": partial})


# --------------------------------------------------------------------------- public API


def _level_factors(W: int, H: int) -> list[int]:
    fs = [1]
    while max(-(-W // fs[-1]), -(-H // fs[-1])) >= MIN_LEVEL_LONG_PX:
        fs.append(fs[-1] * 4)
    return fs


def synth_slide(
    path: str | os.PathLike,
    *,
    size_px: tuple[int, int] = (8000, 6000),
    mpp: float = 0.25,
    seed: int = 0,
    viable_fraction: float | None = None,
    fmt: str = "svs",
    tile_px: int = 256,
    jpeg_quality: int | None = None,
    artefacts: Sequence[str] = (),
    domain: str = "default",
) -> SlideTruth:
    """Write a synthetic H&E slide at ``path`` and its ground-truth files beside it.

    ``size_px`` is the level-0 (width, height) in px; ``mpp`` in µm per level-0 px;
    ``viable_fraction`` is the target viable / (viable + necrosis + fibrosis) in [0, 1]
    (``None``: drawn from ``seed``); ``fmt`` is ``"svs"`` (Aperio) or ``"tiff"`` (generic TIFF,
    MPP in resolution tags only); ``artefacts`` is a subset of :data:`ARTEFACTS`, drawn from
    ``seed`` (none: the same bytes as without the argument); ``domain`` names a generator
    setting of :data:`DOMAINS`, or "random" for one drawn from ``seed`` (staining, scanner,
    morphology, tissue sub-types; ``jpeg_quality`` ``None``: the domain's). Returns the
    :class:`SlideTruth` (areas exact, from the label and artefact rasters; per sub-type too outside
    the default domain).
    """
    dom = resolve_domain(domain, seed)
    if jpeg_quality is None:
        jpeg_quality = dom.jpeg_quality
    if fmt not in ("svs", "tiff"):
        raise ValueError(f"fmt must be 'svs' or 'tiff', not {fmt!r}")
    artefacts = tuple(artefacts)
    unknown = sorted(set(artefacts) - set(ARTEFACTS))
    if unknown:
        raise ValueError(f"unknown artefacts {unknown}; choose from {', '.join(ARTEFACTS)}")
    if int(tile_px) != TILE_PX:
        raise ValueError(f"tile_px must be {TILE_PX}")
    W, H = int(size_px[0]), int(size_px[1])
    if W < 256 or H < 256:
        raise ValueError(f"size_px must be at least 256 x 256, not {size_px}")
    mpp = float(mpp)
    if not mpp > 0:
        raise ValueError(f"mpp must be positive, not {mpp}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 7121]))
    if viable_fraction is None:
        viable_fraction = float(rng.uniform(0.02, 0.9))
    viable_fraction = float(np.clip(viable_fraction, 0.0, 1.0))

    ds = max(1, int(round(LABEL_UM / mpp)))
    label_um = ds * mpp
    lshape = (-(-H // ds), -(-W // ds))
    tex = _build_labels(rng, lshape, label_um, viable_fraction)
    labels = _TEXTURE_CLASS[tex]
    scanner = None
    if not dom.legacy:  # own random stream: the default domain is unchanged
        dom_rng = np.random.default_rng(np.random.SeedSequence([int(seed), 7200]))
        tex = split_subtypes(dom_rng, labels, dom, _region_px(lshape, label_um))
        scanner = draw_scanner(dom, dom_rng, mpp)
    sh, se = _region_scales(rng, tex, label_um)
    atlases = _build_atlases(rng, mpp, dom, tex, seed)
    for t, a in enumerate(atlases):  # in place: one atlas copy at a time
        if scanner is not None and a is not None:
            atlases[t] = scanner.focus(a)
    glass = _glass_atlas(rng, mpp)
    offsets = ((rng, 7) if dom.legacy else (dom_rng, len(atlases)))
    offsets = offsets[0].integers(0, _atlas_px(mpp) // TILE_PX, (offsets[1], 2)) * TILE_PX
    art = ink = None
    if artefacts:  # own random stream: the slide without artefacts is unchanged
        art_rng = np.random.default_rng(np.random.SeedSequence([int(seed), 9001]))
        art, ink = _build_artefacts(art_rng, labels > 0, label_um, artefacts)

    factors = _level_factors(W, H)
    renderers = [
        _LevelRenderer(f, (-(-W // f), -(-H // f)), ds, tex, sh, se, atlases, glass, offsets,
                       art, ink, BLUR_SIGMA_UM / mpp, scanner)
        for f in factors
    ]
    with atomic_open(path) as fh:
        _write_tiff(fh, fmt, renderers, W, H, mpp, jpeg_quality)
    del renderers, atlases

    stem = path.with_suffix("")
    label_path = Path(f"{stem}.labels.png")
    ann_path = Path(f"{stem}.annotations.geojson")
    part_path = Path(f"{stem}.partial.geojson")
    truth_path = Path(f"{stem}.truth.json")

    _write_png_atomic(label_path, labels)

    if dom.legacy:
        regions = [(i + 1, c, None) for i, c in enumerate(CLASSES)]
        full, partial = _annotations(rng, labels, ds, mpp, regions)
    else:
        regions = [(s.tid, s.cls, s.name) for c in CLASSES for s in SUBTYPES if s.cls == c]
        full, partial = _annotations(rng, tex, ds, mpp, regions)
    write_atomic(ann_path, json.dumps(full).encode())
    write_atomic(part_path, json.dumps(partial).encode())

    counts = np.bincount(labels.ravel(), minlength=1 + len(CLASSES))
    px_mm2 = (ds * mpp / 1000.0) ** 2
    areas = {c: float(counts[i + 1]) * px_mm2 for i, c in enumerate(CLASSES)}
    tissue = float(counts[1:].sum()) * px_mm2
    doc = {
        "schema_version": SCHEMA_VERSION,
        "kind": "slide",
        "slide_path": path.name,
        "format": fmt,
        "seed": int(seed),
        "mpp": mpp,
        "dimensions_px": [W, H],
        "level_downsamples": [float(f) for f in factors],
        "label_path": label_path.name,
        "label_downsample": float(ds),
        "label_values": {"0": "glass", **{str(i + 1): c for i, c in enumerate(CLASSES)}},
        "label_pixel_counts": {c: int(counts[i + 1]) for i, c in enumerate(CLASSES)},
        "annotations_path": ann_path.name,
        "partial_annotations_path": part_path.name,
        "areas_mm2": areas,
        "tissue_area_mm2": tissue,
        "tumor_bed_area_mm2": float(sum(areas[c] for c in TUMOR_BED)),
        "viable_percent": _viable_percent(areas),
        "viable_fraction_target": viable_fraction,
    }
    if scanner is not None:
        doc.update(_subtype_truth(tex, Path(f"{stem}.subtypes.png"), px_mm2))
        doc["domain"] = dom.name
        doc["jpeg_quality"] = int(jpeg_quality)
        doc["scanner"] = scanner.record()
        doc["morphology"] = {"nuc_scale": round(dom.nuc_scale, 4), "density": round(dom.density, 4)}
    if art is not None:
        truth_bits = art & np.uint8(_RIM_BIT - 1)
        art_path = Path(f"{stem}.artefacts.png")
        _write_png_atomic(art_path, truth_bits)
        layers = {k: (truth_bits & (1 << i)) > 0 for i, k in enumerate(ARTEFACTS)}
        doc["artefacts"] = list(artefacts)
        doc["artefacts_path"] = art_path.name
        doc["artefact_bits"] = {k: 1 << i for i, k in enumerate(ARTEFACTS)}
        doc["artefact_areas_mm2"] = {k: float(m.sum()) * px_mm2 for k, m in layers.items()}
        doc["artefact_tissue_areas_mm2"] = {k: float((m & (labels > 0)).sum()) * px_mm2
                                            for k, m in layers.items()}
    write_atomic(truth_path, json.dumps(doc, indent=2).encode())
    return load_slide_truth(truth_path)


def synth_specimen(
    out_dir: str | os.PathLike,
    specimen_id: str,
    n_slides: int,
    *,
    seed: int = 0,
    size_px: tuple[int, int] = (8000, 6000),
    mpp: float = 0.25,
    viable_fraction: float | None = None,
    fmt: str = "svs",
    artefacts: Sequence[str] = (),
    domain: str = "default",
) -> SpecimenTruth:
    """Write ``n_slides`` slides to ``out_dir/<specimen_id>/<specimen_id>_<k>.<fmt>`` (k = 1..n)
    with their truth files and ``specimen.truth.json``. Every slide gets the same target
    ``viable_fraction`` (``None``: drawn once from ``seed``), the same ``artefacts`` kinds and the
    same ``domain`` (each slide its own jitter within it); the truth records exact values."""
    if domain not in domain_names():
        raise ValueError(f"unknown domain {domain!r}; choose from {', '.join(domain_names())}")
    if int(n_slides) < 1:
        raise ValueError(f"n_slides must be >= 1, not {n_slides}")
    folder = Path(out_dir) / check_specimen_id(specimen_id, "specimen_id")
    check_inside(out_dir, folder)
    folder.mkdir(parents=True, exist_ok=True)
    if viable_fraction is None:
        viable_fraction = float(np.random.default_rng(
            np.random.SeedSequence([int(seed), 5501])).uniform(0.02, 0.9))
    ext = "svs" if fmt == "svs" else "tiff"
    slides = []
    for k in range(1, int(n_slides) + 1):
        slide_seed = int(np.random.SeedSequence([int(seed), k]).generate_state(1)[0])
        slides.append(synth_slide(folder / f"{specimen_id}_{k}.{ext}", size_px=size_px, mpp=mpp,
                                  seed=slide_seed, viable_fraction=viable_fraction, fmt=fmt,
                                  artefacts=artefacts, domain=domain))
    areas = {c: float(sum(s.areas_mm2[c] for s in slides)) for c in CLASSES}
    truth_path = folder / "specimen.truth.json"
    doc = {
        "schema_version": SCHEMA_VERSION,
        "kind": "specimen",
        "specimen_id": specimen_id,
        "seed": int(seed),
        "viable_fraction_target": viable_fraction,
        "slides": [s.truth_path.name for s in slides],
        "areas_mm2": areas,
        "tissue_area_mm2": float(sum(s.tissue_area_mm2 for s in slides)),
        "tumor_bed_area_mm2": float(sum(areas[c] for c in TUMOR_BED)),
        "viable_percent": _viable_percent(areas),
    }
    if domain != "default":
        doc["domain"] = domain
        doc["subtype_areas_mm2"] = {c: {} for c in CLASSES}
        for s in slides:
            for c, per_name in s.subtype_areas_mm2.items():
                for name, a in per_name.items():
                    doc["subtype_areas_mm2"][c][name] = doc["subtype_areas_mm2"][c].get(name, 0.0) + a
    write_atomic(truth_path, json.dumps(doc, indent=2).encode())
    return load_specimen_truth(truth_path)


def load_slide_truth(path: str | os.PathLike) -> SlideTruth:
    """Read ``<stem>.truth.json``; file names in it are relative to its folder."""
    path = Path(path)
    doc = json.loads(path.read_text(encoding="utf-8"))
    base = path.parent
    return SlideTruth(
        slide_path=base / doc["slide_path"],
        mpp=float(doc["mpp"]),
        dimensions_px=(int(doc["dimensions_px"][0]), int(doc["dimensions_px"][1])),
        tissue_area_mm2=float(doc["tissue_area_mm2"]),
        areas_mm2={c: float(doc["areas_mm2"][c]) for c in CLASSES},
        label_path=base / doc["label_path"],
        label_downsample=float(doc["label_downsample"]),
        annotations_path=base / doc["annotations_path"],
        partial_annotations_path=base / doc["partial_annotations_path"],
        truth_path=path,
        artefacts_path=base / doc["artefacts_path"] if "artefacts_path" in doc else None,
        artefact_areas_mm2=dict(doc.get("artefact_areas_mm2", {})),
        artefact_tissue_areas_mm2=dict(doc.get("artefact_tissue_areas_mm2", {})),
        domain=str(doc.get("domain", "default")),
        subtypes_path=base / doc["subtypes_path"] if "subtypes_path" in doc else None,
        subtype_areas_mm2={c: dict(v) for c, v in doc.get("subtype_areas_mm2", {}).items()},
    )


def load_specimen_truth(path: str | os.PathLike) -> SpecimenTruth:
    """Read ``specimen.truth.json`` (and the slide truth files it names)."""
    path = Path(path)
    doc = json.loads(path.read_text(encoding="utf-8"))
    slides = tuple(load_slide_truth(path.parent / name) for name in doc["slides"])
    return SpecimenTruth(
        specimen_id=str(doc["specimen_id"]),
        slides=slides,
        areas_mm2={c: float(doc["areas_mm2"][c]) for c in CLASSES},
        tissue_area_mm2=float(doc["tissue_area_mm2"]),
        viable_percent=float(doc["viable_percent"]),
        truth_path=path,
    )


def read_labels(truth: SlideTruth) -> np.ndarray:
    """The label raster as uint8 ``[y, x]`` (one px = ``truth.label_downsample`` level-0 px)."""
    from PIL import Image

    with Image.open(truth.label_path) as im:
        return np.asarray(im, dtype=np.uint8).copy()


def read_subtypes(truth: SlideTruth) -> np.ndarray:
    """The sub-type raster as uint8 ``[y, x]`` on the label grid (values: the ``tid`` of
    ``synth_textures.SUBTYPES``; 0 glass). The default domain has one texture per class: its
    label raster."""
    from PIL import Image

    if truth.subtypes_path is None:
        return read_labels(truth)
    with Image.open(truth.subtypes_path) as im:
        return np.asarray(im, dtype=np.uint8).copy()


def read_artefacts(truth: SlideTruth) -> dict[str, np.ndarray]:
    """Exact bool ``[y, x]`` mask per kind in :data:`ARTEFACTS`, on the label raster's grid
    (all False for a slide without artefacts)."""
    from PIL import Image

    if truth.artefacts_path is None:
        shape = read_labels(truth).shape
        return {k: np.zeros(shape, bool) for k in ARTEFACTS}
    with Image.open(truth.artefacts_path) as im:
        bits = np.asarray(im, dtype=np.uint8)
    return {k: (bits & (1 << i)) > 0 for i, k in enumerate(ARTEFACTS)}
