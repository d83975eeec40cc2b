"""Tissue textures of the synthetic slides: one periodic stain-concentration atlas per sub-type.

An atlas is an ``(A, A, 3)`` float32 array of stain concentrations (haematoxylin, eosin, red
blood cells) at level-0 resolution, periodic in both axes, so tiles are cut from it anywhere.
:data:`SUBTYPES` lists every sub-type: its texture id (the value in the sub-type raster), its
canonical class and its name (the QuPath annotation name of its regions). Ids 1-6 are the
original textures (one per class, "other" a mix of fat, muscle and blood); the default domain
draws them exactly as before. Morphology follows a domain's ``nuc_scale`` (nuclear size factor)
and ``density`` (cellularity factor); 1.0 for both reproduces the original textures.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

__all__ = ["SubType", "SUBTYPES", "SUBTYPE_BY_NAME", "build_atlas", "periodic_noise", "smooth_noise",
           "stamp"]

f32 = np.float32


class Morphology(Protocol):
    nuc_scale: float   # nuclear size factor
    density: float     # cellularity factor (nuclei per area)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Zero-mean unit-std smooth noise of correlation length ~``scale`` pixels (float32)."""
    from skimage.transform import resize

    h, w = shape
    gh = max(3, int(math.ceil(h / max(scale, 1.0))) + 2)
    gw = max(3, int(math.ceil(w / max(scale, 1.0))) + 2)
    coarse = rng.standard_normal((gh, gw))
    up = resize(coarse, (h, w), order=3, mode="reflect", anti_aliasing=False).astype(np.float32)
    up -= up.mean()
    sd = float(up.std())
    return up / sd if sd > 0 else up


def periodic_noise(rng: np.random.Generator, n: int, scale_px: float) -> np.ndarray:
    """Tileable (periodic) smooth noise on an ``n x n`` grid, zero mean, unit std (float32)."""
    from scipy import fft as sfft

    white = rng.standard_normal((n, n), dtype=np.float32)
    fy = np.fft.fftfreq(n).astype(np.float32)
    fx = np.fft.rfftfreq(n).astype(np.float32)
    k2 = fy[:, None] ** 2 + fx[None, :] ** 2
    sigma = max(scale_px, 0.5)
    filt = np.exp(np.float32(-2.0 * math.pi**2 * sigma**2) * k2)
    out = sfft.irfft2(sfft.rfft2(white) * filt, s=(n, n)).astype(np.float32)
    out -= out.mean()
    sd = float(out.std())
    return out / sd if sd > 0 else out


def stamp(canvas: np.ndarray, cy: float, cx: float, ry: float, rx: float, theta: float,
          value: float, soft: float = 1.0, mode: str = "max") -> None:
    """Draw a soft-edged ellipse into a periodic 2-D ``canvas`` (wraps around the edges)."""
    n = canvas.shape[0]
    r = max(ry, rx) + 2.0 * soft + 1.0
    y0, y1 = int(math.floor(cy - r)), int(math.ceil(cy + r)) + 1
    x0, x1 = int(math.floor(cx - r)), int(math.ceil(cx + r)) + 1
    yy = np.arange(y0, y1, dtype=np.float32)[:, None] - cy
    xx = np.arange(x0, x1, dtype=np.float32)[None, :] - cx
    c, s = math.cos(theta), math.sin(theta)
    u = (xx * c + yy * s) / max(rx, 0.3)
    v = (-xx * s + yy * c) / max(ry, 0.3)
    d = np.sqrt(u * u + v * v)  # 1 on the ellipse border
    edge = soft / max(min(rx, ry), 0.3)
    a = np.clip((1.0 - d) / max(edge, 1e-3) + 0.5, 0.0, 1.0) * value
    rows = np.arange(y0, y1) % n
    cols = np.arange(x0, x1) % n
    sub = canvas[np.ix_(rows, cols)]
    if mode == "max":
        canvas[np.ix_(rows, cols)] = np.maximum(sub, a)
    else:  # "add"
        canvas[np.ix_(rows, cols)] = sub + a


def _stack(H: np.ndarray, E: np.ndarray, X: np.ndarray | None = None) -> np.ndarray:
    out = np.stack([H, E, np.zeros_like(H) if X is None else X], -1).astype(f32)
    np.clip(out, 0.0, 3.0, out=out)
    return out


def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:n, 0:n].astype(f32)
    return yy, xx


def _wave_vector(rng: np.random.Generator, n: int, um: float, period_um: tuple[float, float],
                 fallback: str) -> tuple[int, int]:
    """Integer (ky, kx) cycles across the atlas for stripes of the given period range (µm)."""
    ang = rng.uniform(0, math.pi)
    cyc = (n / um) / rng.uniform(*period_um)
    ky, kx = round(cyc * math.sin(ang)), round(cyc * math.cos(ang))
    if kx == 0 and ky == 0:
        if fallback == "x":
            kx = 1
        else:
            ky = 1
    return ky, kx


def _cells(canvas: np.ndarray, rng: np.random.Generator, count: int, r_um: tuple[float, float],
           nu: float, value: tuple[float, float], *, aspect: tuple[float, float] = (0.8, 1.0),
           theta: Callable[[float, float], float] | None = None, soft: float = 0.5) -> None:
    """Stamp ``count`` nuclei (major radius in ``r_um`` µm × ``nu`` px/µm) at random places."""
    n = canvas.shape[0]
    for _ in range(int(count)):
        cy, cx = rng.uniform(0, n), rng.uniform(0, n)
        rmaj = rng.uniform(*r_um) * nu
        th = rng.uniform(0, math.pi) if theta is None else theta(cy, cx)
        stamp(canvas, cy, cx, rmaj * rng.uniform(*aspect), rmaj, th, rng.uniform(*value),
              soft=soft * nu)


def _red_cells(canvas: np.ndarray, rng: np.random.Generator, count: int, um: float,
               crisp: float = 1.0) -> None:
    """Red blood cells (radius 3.2-3.9 µm) with central pallor; ``crisp`` < 1: lysed, faint."""
    n = canvas.shape[0]
    for _ in range(int(count)):
        r = rng.uniform(3.2, 3.9) * um
        cy, cx = rng.uniform(0, n), rng.uniform(0, n)
        stamp(canvas, cy, cx, r * rng.uniform(0.85, 1), r, rng.uniform(0, math.pi), 0.55 * crisp,
              soft=0.6 * um / crisp)
        stamp(canvas, cy, cx, 0.4 * r, 0.4 * r, 0.0, -0.15 * crisp, soft=0.8 * um, mode="add")


# --------------------------------------------------------------------------- original textures


def _pleomorphic(rng: np.random.Generator, n: int, um: float, mo: Morphology) -> np.ndarray:
    """Viable tumor: crowded, pleomorphic, hyperchromatic nuclei on purple-pink cytoplasm."""
    nu = um * mo.nuc_scale
    H = 0.16 + 0.04 * periodic_noise(rng, n, 4 * um)
    E = 0.30 + 0.05 * periodic_noise(rng, n, 2 * um) + 0.04 * periodic_noise(rng, n, 15 * um)
    nuc = np.zeros((n, n), f32)
    target = min(0.42 * n * n * mo.density * mo.nuc_scale ** 2, 0.8 * n * n)
    area = 0.0
    while area < target:
        big = rng.random() < 0.04
        rmaj = (rng.uniform(9, 14) if big else rng.uniform(3.2, 7.5)) * nu
        rmin = rmaj * rng.uniform(0.55, 1.0)
        val = rng.uniform(0.85, 1.5)
        stamp(nuc, rng.uniform(0, n), rng.uniform(0, n), rmin, rmaj, rng.uniform(0, math.pi),
              val, soft=0.6 * um)
        area += math.pi * rmaj * rmin * 0.8
    chrom = 1.0 + 0.25 * periodic_noise(rng, n, 0.6 * um)
    nucleoli = np.zeros((n, n), f32)
    for _ in range(int(0.15 * target / (math.pi * (4.5 * nu) ** 2))):
        stamp(nucleoli, rng.uniform(0, n), rng.uniform(0, n), 0.7 * um, 0.8 * um, 0.0, 0.6,
              soft=0.3 * um)
    nmask = np.clip(nuc / 0.8, 0, 1)
    H = H * (1 - nmask) + nuc * chrom + nucleoli * (nuc > 0.5)
    E = E * (1 - 0.5 * nmask)
    return _stack(H, E)


def _coagulative(rng: np.random.Generator, n: int, um: float, mo: Morphology) -> np.ndarray:
    """Necrosis: eosinophilic granular ghost-cell background, nuclear dust, no crisp nuclei."""
    nu = um * mo.nuc_scale
    E = (0.44 + 0.08 * periodic_noise(rng, n, 1.2 * um) + 0.06 * periodic_noise(rng, n, 10 * um))
    H = 0.07 + 0.02 * periodic_noise(rng, n, 6 * um)
    ghost = np.zeros((n, n), f32)
    for _ in range(int(0.5 * n * n / (math.pi * (6 * nu) ** 2) * mo.density)):
        r = rng.uniform(4, 7) * nu
        stamp(ghost, rng.uniform(0, n), rng.uniform(0, n), r * rng.uniform(0.7, 1), r,
              rng.uniform(0, math.pi), rng.uniform(0.5, 1.0), soft=1.5 * um)
    dust = np.zeros((n, n), f32)
    for _ in range(int(n * n / (30 * um) ** 2 * 6 * mo.density)):
        cy, cx = rng.uniform(0, n), rng.uniform(0, n)
        for _k in range(int(rng.integers(1, 5))):  # small clusters of fragments
            r = rng.uniform(0.4, 1.3) * um
            stamp(dust, cy + rng.normal(0, 2.5 * um), cx + rng.normal(0, 2.5 * um), r, r, 0.0,
                  rng.uniform(0.9, 1.6), soft=0.3 * um)
    H = H + 0.06 * ghost + dust
    E = E - 0.07 * ghost + 0.05 * np.clip(1 - ghost, 0, 1)
    return _stack(H, E)


def _collagen(rng: np.random.Generator, n: int, um: float, mo: Morphology) -> np.ndarray:
    """Fibrosis: wavy collagen bundles, sparse elongated nuclei along the fibres."""
    nu = um * mo.nuc_scale
    ky, kx = _wave_vector(rng, n, um, (5, 8), "x")          # bundle spacing 5-8 µm
    yy, xx = _grid(n)
    phase = (2 * math.pi * (kx * xx + ky * yy) / n + 3.0 * periodic_noise(rng, n, 30 * um)
             + 0.7 * periodic_noise(rng, n, 6 * um))
    fib = 0.5 + 0.5 * np.sin(phase)
    fine = 0.5 + 0.5 * np.sin(3 * phase + 1.2 * periodic_noise(rng, n, 3 * um))
    cleft = np.clip((np.sin(0.5 * phase + 1.0) - 0.93) / 0.07, 0, 1)
    E = (0.30 + 0.12 * fib + 0.07 * fine + 0.05 * periodic_noise(rng, n, 2 * um)
         + 0.04 * periodic_noise(rng, n, 20 * um)) * (1 - 0.6 * cleft)
    H = 0.04 + 0.02 * periodic_noise(rng, n, 6 * um)
    nuc = np.zeros((n, n), f32)
    fibre_dir = math.atan2(-kx, ky)  # along the stripes
    for _ in range(int(n * n / (45 * um) ** 2 * mo.density)):
        stamp(nuc, rng.uniform(0, n), rng.uniform(0, n), rng.uniform(0.9, 1.6) * nu,
              rng.uniform(5, 9) * nu, fibre_dir + rng.normal(0, 0.15), rng.uniform(0.8, 1.2),
              soft=0.5 * um)
    H = H + nuc
    E = E * (1 - 0.4 * np.clip(nuc, 0, 1))
    return _stack(H, E)


def _fat(rng: np.random.Generator, n: int, um: float, mo: Morphology) -> np.ndarray:
    """Fat: polygonal clear vacuoles with thin pink membranes (periodic Voronoi)."""
    cell = rng.uniform(28, 40) * um
    g = max(2, int(round(n / cell)))
    pts = (np.stack(np.meshgrid(np.arange(g), np.arange(g), indexing="ij"), -1).reshape(-1, 2)
           + 0.5 + rng.uniform(-0.35, 0.35, (g * g, 2))) * (n / g)
    d1 = np.full((n, n), np.inf, f32)
    d2 = np.full((n, n), np.inf, f32)
    ax = np.arange(n, dtype=f32)
    for py, px in pts:
        dy = np.abs(ax - py)
        dy = np.minimum(dy, n - dy)
        dx = np.abs(ax - px)
        dx = np.minimum(dx, n - dx)
        d = np.sqrt(dy[:, None] ** 2 + dx[None, :] ** 2)
        d2 = np.minimum(d2, np.maximum(d1, d))
        d1 = np.minimum(d1, d)
    t = 1.3 * um
    memb = np.exp(-(((d2 - d1) / (2 * t)) ** 2)).astype(f32)
    E = 0.05 + 0.55 * memb * (1 + 0.2 * periodic_noise(rng, n, 3 * um))
    H = 0.015 + 0.06 * memb
    nuc = np.zeros((n, n), f32)
    for py, px in pts[rng.random(len(pts)) < 0.15]:
        stamp(nuc, py + cell / 2, px, 1.0 * um, 4.0 * um, rng.uniform(0, math.pi), 0.9,
              soft=0.4 * um)
    H = H + nuc * memb
    return _stack(H, E)


def _muscle(rng: np.random.Generator, n: int, um: float, mo: Morphology) -> np.ndarray:
    """Skeletal muscle: deep pink fibres with cross striations and peripheral nuclei."""
    ky, kx = _wave_vector(rng, n, um, (18, 26), "y")        # fibre width ~20 µm
    yy, xx = _grid(n)
    m = max(1, round((n / um / 2.6) / max(math.hypot(kx, ky), 1)))  # striations ~2.6 µm
    band = np.sin(2 * math.pi * (kx * xx + ky * yy) / n + 0.8 * periodic_noise(rng, n, 40 * um))
    body = np.clip((band + 0.75) / 0.25, 0, 1)
    stri = 0.5 + 0.5 * np.sin(2 * math.pi * m * (-ky * xx + kx * yy) / n)
    E = 0.12 + body * (0.50 + 0.07 * stri + 0.04 * periodic_noise(rng, n, 5 * um))
    H = 0.03 + 0.02 * body
    nuc = np.zeros((n, n), f32)
    fibre_dir = math.atan2(kx, -ky) if (kx or ky) else 0.0
    edge = np.argwhere((np.abs(band + 0.6) < 0.05)[::8, ::8]) * 8
    if len(edge):
        for i in rng.choice(len(edge), size=min(len(edge), int(n * n / (40 * um) ** 2)),
                            replace=False):
            stamp(nuc, edge[i][0], edge[i][1], 1.2 * um, 5 * um, fibre_dir, 1.0, soft=0.5 * um)
    H = H + nuc
    return _stack(H, E)


def _blood(rng: np.random.Generator, n: int, um: float, mo: Morphology) -> np.ndarray:
    """Blood: packed red cells with central pallor, few leukocytes."""
    X = 0.25 + 0.05 * periodic_noise(rng, n, 8 * um)
    rbc = np.zeros((n, n), f32)
    _red_cells(rbc, rng, 0.9 * n * n / (math.pi * (3.6 * um) ** 2), um)
    X = X + np.clip(rbc, 0, None)
    H = 0.03 + 0.01 * periodic_noise(rng, n, 4 * um)
    nuc = np.zeros((n, n), f32)
    for _ in range(int(n * n / (60 * um) ** 2)):
        cy, cx = rng.uniform(0, n), rng.uniform(0, n)
        for _k in range(3):  # lobated leukocyte nucleus
            stamp(nuc, cy + rng.normal(0, 1.3 * um), cx + rng.normal(0, 1.3 * um), 1.5 * um,
                  1.8 * um, rng.uniform(0, math.pi), 1.1, soft=0.4 * um)
    H = H + nuc
    E = 0.06 + 0.2 * np.clip(rbc, 0, 1)
    return _stack(H, E, X)


# --------------------------------------------------------------------------- further sub-types


def _spindle(rng: np.random.Generator, n: int, um: float, mo: Morphology) -> np.ndarray:
    """Viable tumor: intersecting fascicles of spindle cells, cigar-shaped nuclei along them."""
    nu = um * mo.nuc_scale
    ky, kx = _wave_vector(rng, n, um, (60, 90), "x")         # fascicle direction drift
    angle = math.atan2(-kx, ky) + 0.9 * periodic_noise(rng, n, 50 * um)  # fascicle direction
    E = 0.30 + 0.04 * periodic_noise(rng, n, 1.5 * um) + 0.04 * periodic_noise(rng, n, 12 * um)
    H = 0.10 + 0.03 * periodic_noise(rng, n, 5 * um)
    nuc = np.zeros((n, n), f32)
    count = 0.30 * n * n * mo.density / (math.pi * 7.5 * 1.6 * nu * nu)
    _cells(nuc, rng, count, (6.0, 9.5), nu, (0.9, 1.4), aspect=(0.18, 0.28),
           theta=lambda cy, cx: float(angle[int(cy) % n, int(cx) % n]) + rng.normal(0, 0.12))
    chrom = 1.0 + 0.2 * periodic_noise(rng, n, 0.6 * um)
    nmask = np.clip(nuc / 0.8, 0, 1)
    return _stack(H * (1 - nmask) + nuc * chrom, E * (1 - 0.5 * nmask))


def _round_cell(rng: np.random.Generator, n: int, um: float, mo: Morphology) -> np.ndarray:
    """Viable tumor: sheets of small, round, uniform hyperchromatic nuclei, scant cytoplasm."""
    nu = um * mo.nuc_scale
    H = 0.14 + 0.03 * periodic_noise(rng, n, 4 * um)
    E = 0.17 + 0.04 * periodic_noise(rng, n, 3 * um)
    nuc = np.zeros((n, n), f32)
    count = min(0.60 * mo.density, 0.85) * n * n / (math.pi * (3.8 * nu) ** 2)
    _cells(nuc, rng, count, (3.2, 4.4), nu, (1.0, 1.35), aspect=(0.85, 1.0), soft=0.45)
    chrom = 1.0 + 0.3 * periodic_noise(rng, n, 0.5 * um)
    nmask = np.clip(nuc / 0.8, 0, 1)
    return _stack(H * (1 - nmask) + nuc * chrom, E * (1 - 0.6 * nmask))


def _myxoid(rng: np.random.Generator, n: int, um: float, mo: Morphology) -> np.ndarray:
    """Viable tumor: pale bluish myxoid matrix, sparse stellate cells, a delicate capillary net."""
    nu = um * mo.nuc_scale
    H = 0.09 + 0.025 * periodic_noise(rng, n, 10 * um) + 0.015 * periodic_noise(rng, n, 1.5 * um)
    E = 0.07 + 0.02 * periodic_noise(rng, n, 6 * um)
    wisp = np.clip(1.0 - np.abs(periodic_noise(rng, n, 4 * um)) / 0.12, 0, 1)
    E = E + 0.10 * wisp
    net = np.clip(1.0 - np.abs(periodic_noise(rng, n, 22 * um)) / 0.05, 0, 1)  # capillaries
    E = E + 0.18 * net
    X = 0.30 * net * np.clip(periodic_noise(rng, n, 6 * um), 0, 1)
    nuc = np.zeros((n, n), f32)
    _cells(nuc, rng, n * n / (28 * um) ** 2 * mo.density, (2.6, 4.5), nu, (0.9, 1.3),
           aspect=(0.4, 0.8))
    _cells(nuc, rng, n * n / (90 * um) ** 2, (3.0, 5.0), um, (0.8, 1.0), aspect=(0.2, 0.3))
    return _stack(H + nuc, E, X)


def _karyorrhectic(rng: np.random.Generator, n: int, um: float, mo: Morphology) -> np.ndarray:
    """Necrosis: granular debris with abundant nuclear dust, pyknotic nuclei, fibrin strands."""
    E = 0.34 + 0.08 * periodic_noise(rng, n, 1.0 * um) + 0.05 * periodic_noise(rng, n, 12 * um)
    H = 0.10 + 0.03 * periodic_noise(rng, n, 5 * um)
    dust = np.zeros((n, n), f32)
    for _ in range(int(n * n / (18 * um) ** 2 * 6 * mo.density)):
        cy, cx = rng.uniform(0, n), rng.uniform(0, n)
        for _k in range(int(rng.integers(2, 7))):
            r = rng.uniform(0.3, 1.1) * um
            stamp(dust, cy + rng.normal(0, 3.0 * um), cx + rng.normal(0, 3.0 * um), r, r, 0.0,
                  rng.uniform(1.0, 1.8), soft=0.3 * um)
    _cells(dust, rng, n * n / (25 * um) ** 2 * mo.density, (1.4, 2.4), um * mo.nuc_scale,
           (1.4, 1.9), aspect=(0.8, 1.0), soft=0.3)
    fibrin = np.clip(1.0 - np.abs(periodic_noise(rng, n, 5 * um)) / 0.06, 0, 1)
    return _stack(H + dust, E + 0.15 * fibrin)


def _haemorrhagic(rng: np.random.Generator, n: int, um: float, mo: Morphology) -> np.ndarray:
    """Necrosis: necrotic ghost cells flooded by extravasated, partly lysed red cells."""
    nu = um * mo.nuc_scale
    E = 0.30 + 0.07 * periodic_noise(rng, n, 1.5 * um) + 0.05 * periodic_noise(rng, n, 10 * um)
    H = 0.06 + 0.02 * periodic_noise(rng, n, 6 * um)
    ghost = np.zeros((n, n), f32)
    _cells(ghost, rng, 0.3 * n * n / (math.pi * (6 * nu) ** 2), (4, 7), nu, (0.5, 1.0),
           aspect=(0.7, 1.0), soft=1.5)
    rbc = np.zeros((n, n), f32)
    _red_cells(rbc, rng, 0.5 * n * n / (math.pi * (3.6 * um) ** 2), um, crisp=0.6)
    lake = np.clip(0.5 + 0.8 * periodic_noise(rng, n, 25 * um), 0, 1)
    X = (0.08 + 0.25 * lake) + np.clip(rbc, 0, None) * (0.4 + 0.6 * lake)
    dust = np.zeros((n, n), f32)
    _cells(dust, rng, n * n / (30 * um) ** 2 * 3, (0.4, 1.2), um, (0.9, 1.5), soft=0.3)
    return _stack(H + 0.05 * ghost + dust, E - 0.06 * ghost, X)


def _hyalinised(rng: np.random.Generator, n: int, um: float, mo: Morphology) -> np.ndarray:
    """Fibrosis: dense, glassy, homogeneous collagen in broad bands, very few thin nuclei."""
    ky, kx = _wave_vector(rng, n, um, (25, 45), "x")
    yy, xx = _grid(n)
    phase = 2 * math.pi * (kx * xx + ky * yy) / n + 2.0 * periodic_noise(rng, n, 60 * um)
    crack = np.clip((np.sin(phase) - 0.97) / 0.03, 0, 1)
    E = (0.52 + 0.04 * periodic_noise(rng, n, 25 * um) + 0.015 * periodic_noise(rng, n, 2 * um)
         ) * (1 - 0.7 * crack)
    H = 0.035 + 0.01 * periodic_noise(rng, n, 8 * um)
    nuc = np.zeros((n, n), f32)
    fibre_dir = math.atan2(-kx, ky)
    _cells(nuc, rng, n * n / (90 * um) ** 2 * mo.density, (4, 8), um * mo.nuc_scale, (1.0, 1.4),
           aspect=(0.12, 0.2), theta=lambda cy, cx: fibre_dir + rng.normal(0, 0.1))
    return _stack(H + nuc, E * (1 - 0.4 * np.clip(nuc, 0, 1)))


def _loose_fibrosis(rng: np.random.Generator, n: int, um: float, mo: Morphology) -> np.ndarray:
    """Fibrosis: loose oedematous stroma, thin wavy fibres with clear gaps, stellate fibroblasts."""
    ky, kx = _wave_vector(rng, n, um, (7, 12), "y")
    yy, xx = _grid(n)
    phase = (2 * math.pi * (kx * xx + ky * yy) / n + 6.0 * periodic_noise(rng, n, 18 * um)
             + 1.5 * periodic_noise(rng, n, 4 * um))
    fibre = np.clip((np.sin(phase) - 0.3 - 0.3 * periodic_noise(rng, n, 10 * um)) / 0.7, 0, 1)
    E = 0.06 + 0.30 * fibre + 0.03 * periodic_noise(rng, n, 15 * um)
    H = 0.03 + 0.012 * periodic_noise(rng, n, 10 * um)
    nuc = np.zeros((n, n), f32)
    _cells(nuc, rng, n * n / (40 * um) ** 2 * mo.density, (3.5, 6.5), um * mo.nuc_scale,
           (0.8, 1.2), aspect=(0.3, 0.55))
    return _stack(H + nuc, E)


def _granulation(rng: np.random.Generator, n: int, um: float, mo: Morphology) -> np.ndarray:
    """Fibrosis: granulation tissue, small capillaries with red cells in oedematous stroma,
    plump fibroblasts and scattered lymphocytes."""
    nu = um * mo.nuc_scale
    E = 0.14 + 0.05 * periodic_noise(rng, n, 3 * um) + 0.04 * periodic_noise(rng, n, 20 * um)
    H = 0.05 + 0.015 * periodic_noise(rng, n, 6 * um)
    wall = np.zeros((n, n), f32)
    lumen = np.zeros((n, n), f32)
    nuc = np.zeros((n, n), f32)
    for _ in range(int(n * n / (45 * um) ** 2)):
        cy, cx = rng.uniform(0, n), rng.uniform(0, n)
        r = rng.uniform(4, 10) * um
        th = rng.uniform(0, math.pi)
        asp = rng.uniform(0.5, 1.0)
        stamp(wall, cy, cx, (r + 2.5 * um) * asp, r + 2.5 * um, th, 1.0, soft=0.8 * um)
        stamp(lumen, cy, cx, r * asp, r, th, 1.0, soft=0.6 * um)
        for k in range(int(rng.integers(2, 5))):  # endothelial nuclei on the wall
            a = 2 * math.pi * (k + rng.uniform(0, 1)) / 4
            ey = cy + (r + 1.2 * um) * asp * math.sin(a)
            ex = cx + (r + 1.2 * um) * math.cos(a)
            stamp(nuc, ey, ex, 1.0 * nu, 3.5 * nu, a + math.pi / 2, 1.1, soft=0.4 * um)
    rbc = np.zeros((n, n), f32)
    _red_cells(rbc, rng, 0.8 * n * n / (math.pi * (3.6 * um) ** 2), um)
    X = np.clip(rbc, 0, None) * lumen
    _cells(nuc, rng, n * n / (22 * um) ** 2 * mo.density, (2.2, 2.8), nu, (1.2, 1.5))
    _cells(nuc, rng, n * n / (40 * um) ** 2 * mo.density, (3.5, 6.0), nu, (0.8, 1.1),
           aspect=(0.35, 0.6))
    ring = np.clip(wall - lumen, 0, 1)
    return _stack(H + nuc * (1 - lumen), (E + 0.30 * ring) * (1 - 0.8 * lumen) + 0.05 * X, X)


def _nerve(rng: np.random.Generator, n: int, um: float, mo: Morphology) -> np.ndarray:
    """Other: peripheral nerve, pale wavy fibres with clear myelin spaces, wavy thin nuclei."""
    ky, kx = _wave_vector(rng, n, um, (3, 5), "x")
    yy, xx = _grid(n)
    d = math.hypot(kx, ky) or 1.0
    along = 2 * math.pi * (-ky * xx + kx * yy) / n * (n / um / 18) / d  # waves every ~18 µm
    phase = 2 * math.pi * (kx * xx + ky * yy) / n + 1.4 * np.sin(along) \
        + 0.8 * periodic_noise(rng, n, 4 * um)
    fibre = 0.5 + 0.5 * np.sin(phase)
    bubbles = np.clip(periodic_noise(rng, n, 1.2 * um) - 0.8, 0, 1)
    E = (0.20 + 0.12 * fibre + 0.03 * periodic_noise(rng, n, 20 * um)) * (1 - 0.6 * bubbles)
    H = 0.04 + 0.01 * periodic_noise(rng, n, 6 * um)
    nuc = np.zeros((n, n), f32)
    fibre_dir = math.atan2(kx, -ky)
    for _ in range(int(n * n / (35 * um) ** 2 * mo.density)):  # S-shaped: two offset halves
        cy, cx = rng.uniform(0, n), rng.uniform(0, n)
        off = rng.uniform(1.0, 2.0) * um
        for sgn in (-1, 1):
            stamp(nuc, cy + sgn * 3 * um * math.sin(fibre_dir) + sgn * off * math.cos(fibre_dir),
                  cx + sgn * 3 * um * math.cos(fibre_dir) - sgn * off * math.sin(fibre_dir),
                  0.9 * um, 3.5 * um, fibre_dir + sgn * 0.35, 1.0, soft=0.4 * um)
    return _stack(H + nuc, E)


# --------------------------------------------------------------------------- sub-type table


@dataclass(frozen=True)
class SubType:
    """A tissue sub-type: texture id (sub-type raster value), canonical class, annotation name."""

    tid: int
    cls: str
    name: str
    build: Callable[[np.random.Generator, int, float, Morphology], np.ndarray]


SUBTYPES: tuple[SubType, ...] = (
    SubType(1, "viable_tumor", "Pleomorphic sheets", _pleomorphic),
    SubType(2, "necrosis", "Coagulative necrosis", _coagulative),
    SubType(3, "fibrosis", "Collagenous fibrosis", _collagen),
    SubType(4, "other", "Fat", _fat),
    SubType(5, "other", "Skeletal muscle", _muscle),
    SubType(6, "other", "Blood", _blood),
    SubType(7, "viable_tumor", "Spindle-cell fascicles", _spindle),
    SubType(8, "viable_tumor", "Small round cells", _round_cell),
    SubType(9, "viable_tumor", "Myxoid", _myxoid),
    SubType(10, "necrosis", "Karyorrhectic debris", _karyorrhectic),
    SubType(11, "necrosis", "Haemorrhagic necrosis", _haemorrhagic),
    SubType(12, "fibrosis", "Hyalinised fibrosis", _hyalinised),
    SubType(13, "fibrosis", "Loose oedematous fibrosis", _loose_fibrosis),
    SubType(14, "fibrosis", "Granulation tissue", _granulation),
    SubType(15, "other", "Nerve", _nerve),
)
"""Every sub-type; ``SUBTYPES[i].tid == i + 1`` (0 is glass)."""
SUBTYPE_BY_NAME: dict[str, SubType] = {s.name: s for s in SUBTYPES}


def build_atlas(tid: int, rng: np.random.Generator, n: int, um: float, mo: Morphology
                ) -> np.ndarray:
    """The ``(n, n, 3)`` float32 atlas of sub-type ``tid`` (``um``: px per µm)."""
    return SUBTYPES[tid - 1].build(rng, n, um, mo)
