"""Generator settings ("domains") of the synthetic slides: what differs between real labs.

A :class:`Domain` fixes the staining (stain vectors, haematoxylin and eosin concentration), the
scanner (glass white point, gamma, colour cast, sensor noise, defocus or sharpening, JPEG
quality), the morphology (nuclear size, cellularity) and the tissue sub-types drawn in each
class with their typical shares. Every slide draws its own jitter around its domain (stain
vectors, concentrations, white point, gamma, sub-type shares) from its seed, so no two slides of a
domain look alike and a classifier trained on one domain can be judged on another.

The ``default`` domain is the original generator: one texture per class ("other" a mix of fat,
muscle and blood), no scanner model, the same bytes as before domains existed.

``random`` (:func:`random_domain`) is domain randomisation for training data: every slide draws its
own setting, each factor uniformly over a range that real labs span (stain hue and strength, glass
colour, gamma, colour cast, sensor noise, defocus or sharpening, JPEG quality, nuclear size,
cellularity), and the shares of every sub-type of each class from a flat Dirichlet, so a rare
sub-type of one slide is the main one of another.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .classes import CLASSES
from .synth_textures import SUBTYPE_BY_NAME, SUBTYPES, smooth_noise

__all__ = ["Domain", "DOMAINS", "RANDOM", "domain_names", "resolve_domain", "random_domain", "Scanner",
           "draw_scanner", "split_subtypes"]

SHARPEN_SIGMA_PX = 1.0   # unsharp-mask radius, level-0 px (the scanner sharpens sensor pixels)


@dataclass(frozen=True)
class Domain:
    """One generator setting. Concentration and colour factors are relative to the default."""

    name: str
    stains: tuple[tuple[float, float, float], ...]  # OD vectors (R, G, B): H, E, red cells
    h_conc: float = 1.0               # haematoxylin concentration factor
    e_conc: float = 1.0               # eosin (and red cell) concentration factor
    jitter: float = 0.0               # per-slide sd: log concentrations, stain vector components
    white_rgb: tuple[float, float, float] = (240.0, 240.0, 240.0)   # glass colour, 8-bit
    gamma: float = 1.0                # output = 255 * (input / 255) ** gamma
    gain_rgb: tuple[float, float, float] = (1.0, 1.0, 1.0)          # colour cast
    noise_sd: float = 0.0             # sensor noise at level 0, 8-bit levels
    blur_um: float = 0.0              # defocus, Gaussian sigma in µm
    sharpen: float = 0.0              # unsharp-mask amount (radius SHARPEN_SIGMA_PX)
    jpeg_quality: int = 90
    nuc_scale: float = 1.0            # nuclear size factor
    density: float = 1.0              # cellularity factor
    subtypes: tuple[tuple[str, float], ...] = ()  # (sub-type name, typical share in its class)

    @property
    def legacy(self) -> bool:
        """True for the original generator (one texture per class, no scanner model)."""
        return not self.subtypes


_LEGACY_STAINS = ((0.60, 0.74, 0.31), (0.17, 0.86, 0.49), (0.12, 0.74, 0.66))

DOMAINS: dict[str, Domain] = {d.name: d for d in (
    Domain("default", _LEGACY_STAINS),
    # lab B: strong, purple haematoxylin and magenta eosin, warm light, soft focus, JPEG 80;
    # spindle-cell sarcomas, smaller nuclei, cellular
    Domain("lab-b", ((0.52, 0.80, 0.30), (0.22, 0.93, 0.29), (0.10, 0.75, 0.65)),
           h_conc=1.15, e_conc=1.2, jitter=0.08, white_rgb=(246.0, 241.0, 232.0), gamma=0.92,
           gain_rgb=(1.0, 0.98, 0.96), noise_sd=2.0, blur_um=0.35, jpeg_quality=80,
           nuc_scale=0.9, density=1.15,
           subtypes=(("Spindle-cell fascicles", 0.55), ("Pleomorphic sheets", 0.25),
                     ("Myxoid", 0.15), ("Small round cells", 0.05),
                     ("Coagulative necrosis", 0.5), ("Karyorrhectic debris", 0.3),
                     ("Haemorrhagic necrosis", 0.2),
                     ("Hyalinised fibrosis", 0.4), ("Collagenous fibrosis", 0.3),
                     ("Loose oedematous fibrosis", 0.2), ("Granulation tissue", 0.1),
                     ("Fat", 0.6), ("Skeletal muscle", 0.25), ("Blood", 0.1), ("Nerve", 0.05))),
    # lab C: pale, blue haematoxylin and orange-red eosin, cool light, sharpened and noisy,
    # JPEG 70; round-cell and pleomorphic sarcomas, larger nuclei, less cellular
    Domain("lab-c", ((0.70, 0.66, 0.27), (0.10, 0.82, 0.56), (0.14, 0.72, 0.68)),
           h_conc=0.8, e_conc=0.75, jitter=0.12, white_rgb=(234.0, 239.0, 247.0), gamma=1.12,
           gain_rgb=(0.97, 1.0, 1.03), noise_sd=3.5, sharpen=0.6, jpeg_quality=70,
           nuc_scale=1.2, density=0.8,
           subtypes=(("Small round cells", 0.35), ("Pleomorphic sheets", 0.35),
                     ("Myxoid", 0.2), ("Spindle-cell fascicles", 0.1),
                     ("Karyorrhectic debris", 0.45), ("Haemorrhagic necrosis", 0.35),
                     ("Coagulative necrosis", 0.2),
                     ("Loose oedematous fibrosis", 0.35), ("Granulation tissue", 0.3),
                     ("Collagenous fibrosis", 0.2), ("Hyalinised fibrosis", 0.15),
                     ("Fat", 0.5), ("Blood", 0.25), ("Skeletal muscle", 0.2), ("Nerve", 0.05))),
)}
"""Every domain by name; ``default`` first."""

RANDOM = "random"


def domain_names() -> tuple[str, ...]:
    """The names ``synth --domain`` takes: :data:`DOMAINS` and :data:`RANDOM`."""
    return (*DOMAINS, RANDOM)


def resolve_domain(name: str, seed: int) -> Domain:
    """The domain ``name``; for :data:`RANDOM` the one slide ``seed`` draws (ValueError if unknown)."""
    if name == RANDOM:
        return random_domain(np.random.default_rng(np.random.SeedSequence([int(seed), 7300])))
    if name not in DOMAINS:
        raise ValueError(f"unknown domain {name!r}; choose from {', '.join(domain_names())}")
    return DOMAINS[name]


def random_domain(rng: np.random.Generator) -> Domain:
    """One slide's randomised generator setting (see the module docstring); every range is wide
    enough to hold the named domains' values."""
    def u(lo: float, hi: float) -> float:
        return float(rng.uniform(lo, hi))

    stains = np.abs(np.array(_LEGACY_STAINS) + rng.normal(0, 0.08, (3, 3)))
    stains /= np.linalg.norm(stains, axis=1, keepdims=True)
    focus = rng.integers(3)  # defocus, sharpening or neither
    return Domain(
        RANDOM, tuple(tuple(round(float(v), 4) for v in row) for row in stains),
        h_conc=math.exp(u(math.log(0.7), math.log(1.3))), e_conc=math.exp(u(math.log(0.7), math.log(1.3))),
        jitter=0.05, white_rgb=(u(228, 250), u(228, 250), u(228, 250)), gamma=u(0.85, 1.2),
        gain_rgb=(u(0.95, 1.05), 1.0, u(0.95, 1.05)), noise_sd=u(0.0, 4.0),
        blur_um=u(0.1, 0.5) if focus == 0 else 0.0, sharpen=u(0.2, 0.8) if focus == 1 else 0.0,
        jpeg_quality=int(rng.integers(65, 96)), nuc_scale=u(0.8, 1.3), density=u(0.7, 1.3),
        subtypes=tuple((t.name, float(w)) for t, w in zip(SUBTYPES, rng.dirichlet(np.ones(len(SUBTYPES))))))


@dataclass(frozen=True)
class Scanner:
    """One slide's drawn staining and scanner: what the renderer applies to every tile."""

    stains: np.ndarray        # (3, 3) float32 OD per unit concentration (H, E, red cells)
    glass_od: np.ndarray      # (3,) float32 OD added to every pixel (white point vs 240 grey)
    gamma: float              # light out = (light in) ** gamma, i.e. OD × gamma
    gain: np.ndarray          # (3,) float32 colour cast, light × gain
    noise_sd: float           # level 0, 8-bit levels
    blur_l0: float            # defocus sigma, level-0 px
    sharpen: float
    seed: int                 # noise stream

    def record(self) -> dict:
        """The drawn values for ``truth.json``."""
        return {"stain_od": [[round(float(v), 5) for v in row] for row in self.stains],
                "white_rgb": [round(float(240.0 * 10 ** -v), 2) for v in self.glass_od],
                "gamma": round(self.gamma, 4), "gain_rgb": [round(float(g), 4) for g in self.gain],
                "noise_sd": self.noise_sd, "blur_px": round(self.blur_l0, 3),
                "sharpen": self.sharpen}

    def expose(self, od: np.ndarray) -> None:
        """White point, gamma and colour cast applied in place to optical density ``od``."""
        od += self.glass_od
        od *= np.float32(self.gamma)
        od -= np.log10(self.gain).astype(np.float32)

    def focus(self, atlas: np.ndarray) -> np.ndarray:
        """A level-0 texture atlas as the scanner's optics image it: defocus blur or
        sharpening (periodic, so it is done once per atlas instead of per tile)."""
        from scipy import ndimage

        sigma = self.blur_l0 if self.blur_l0 > 0 else SHARPEN_SIGMA_PX * (self.sharpen > 0)
        if not sigma:
            return atlas
        soft = ndimage.gaussian_filter(atlas, sigma=(sigma, sigma, 0), mode="wrap")
        if self.blur_l0 > 0:
            return soft
        return np.maximum(atlas + np.float32(self.sharpen) * (atlas - soft), 0.0)

    def noise(self, rgb: np.ndarray, f: int, ty: int, tx: int) -> None:
        """Add sensor (luminance) noise to tile ``(ty, tx)`` of level ``f`` in place; chroma
        noise would be lost to JPEG 4:2:0 anyway. Level ``f`` averages ``f²`` sensor px."""
        if self.noise_sd > 0:
            rng = np.random.default_rng([self.seed, f, ty, tx])
            noise = rng.standard_normal(rgb.shape[:2], dtype=np.float32)
            rgb += noise[:, :, None] * np.float32(self.noise_sd / f)


def draw_scanner(domain: Domain, rng: np.random.Generator, mpp: float) -> Scanner:
    """The slide's staining and scanner: ``domain`` plus per-slide jitter from ``rng``."""
    j = domain.jitter
    stains = np.array(domain.stains, np.float64) + rng.normal(0, 0.4 * j, (3, 3))
    stains = np.abs(stains) / np.linalg.norm(stains, axis=1, keepdims=True)
    conc = np.exp(rng.normal(0, j, 2)) * (domain.h_conc, domain.e_conc)
    stains = stains * np.array([conc[0], conc[1], conc[1]])[:, None]
    white = np.clip(np.array(domain.white_rgb) + rng.normal(0, 30 * j, 3), 200, 254)
    return Scanner(
        stains=stains.astype(np.float32),
        glass_od=np.log10(240.0 / white).astype(np.float32),
        gamma=float(domain.gamma * math.exp(rng.normal(0, 0.5 * j))),
        gain=np.asarray(domain.gain_rgb, np.float32),
        noise_sd=float(domain.noise_sd),
        blur_l0=float(domain.blur_um / mpp),
        sharpen=float(domain.sharpen),
        seed=int(rng.integers(2**31)),
    )


def split_subtypes(rng: np.random.Generator, labels: np.ndarray, domain: Domain,
                   region_px: float) -> np.ndarray:
    """Sub-type raster (texture ids) from the class ``labels``: each class's area is cut into
    its domain's sub-types by quantiles of smooth fields, shares jittered per slide (every
    sub-type keeps some area when its class has enough pixels)."""
    tex = np.zeros(labels.shape, np.uint8)
    for ci, cls in enumerate(CLASSES):
        region = labels == ci + 1
        subs = [(SUBTYPE_BY_NAME[n].tid, w) for n, w in domain.subtypes
                if SUBTYPE_BY_NAME[n].cls == cls]
        if not region.any() or not subs:
            continue
        share = np.array([w for _, w in subs]) * np.exp(rng.normal(0, 0.5, len(subs)))
        share = share / share.sum()
        order = rng.permutation(len(subs))
        left = region.copy()
        left_share = 1.0
        for k in order[:-1]:
            field = smooth_noise(rng, labels.shape, region_px * rng.uniform(0.5, 1.0))
            vals = field[left]
            take = int(round(vals.size * min(1.0, share[k] / left_share)))
            if take > 0:
                thr = np.sort(vals)[vals.size - take]
                pick = left & (field >= thr)
                tex[pick] = subs[k][0]
                left &= ~pick
            left_share -= share[k]
        tex[left] = subs[order[-1]][0]
    return tex
