"""Per-slide stain normalisation: every slide's H&E mapped onto one reference before the CNN.

Labs differ in stain vectors (hue of haematoxylin and eosin), stain concentrations, the
scanner's white point, colour cast and gamma. In optical density (OD, natural log, relative to
the slide's own glass colour) all of these are linear, so one 3 × 3 matrix per slide removes
them:

1. **Estimate** (:func:`estimate_stain`, Macenko et al. 2009) from tissue tiles sampled evenly
   over the slide's tile grid at the run's µm/px (:func:`sample_grid_tiles`): pixels with OD above
   ``OD_MIN`` in any channel (eosin barely absorbs red light), the plane of their two main OD
   directions, the 1st and 99th percentile angles in it as the H and E vectors, a third axis
   orthogonal to both (red cells, residual), and each stain's 99th-percentile concentration.
2. **Map** (:meth:`SlideStain.matrix`): concentrations of H and E scaled to the reference's
   maxima, then rebuilt with the reference vectors (``REFERENCE_STAINS``, ``REFERENCE_MAX``:
   the reference of Macenko's method as commonly published); the residual axis is carried over
   unchanged, so the map is invertible and no tissue detail is lost.
3. **Apply** (:func:`apply_stain`): ``rgb_out = exp(-OD @ M)`` with white 1.0.

A slide with too few stained pixels (``MIN_PIXELS``) or degenerate stains keeps the identity
map and says so (``SlideStain.method``). A model trained with normalisation is only ever fed
normalised tiles (``Classifier.stain_normalisation``), in training and inference alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

    from .config import Config
    from .slide import Slide
    from .tiling import TileGrid

__all__ = ["OD_MIN", "MIN_PIXELS", "SAMPLE_TILES", "REFERENCE_STAINS", "REFERENCE_MAX", "SlideStain",
           "estimate_stain", "sample_grid_tiles", "grid_stain", "tissue_stain", "apply_stain", "normalise_uint8"]

OD_MIN = 0.15          # OD (natural log) above glass in any channel: a stained pixel
MIN_PIXELS = 2000      # stained pixels needed for an estimate
SAMPLE_TILES = 48      # grid tiles read for an estimate, spread evenly over the grid
_MAX_PIXELS = 400_000  # pixels an estimate uses (an even subsample beyond)
_PERCENTILE = 99.0

REFERENCE_STAINS = np.array([[0.5626, 0.7201, 0.4062], [0.2159, 0.8012, 0.5581]])  # OD per unit conc.: H, E (R, G, B)
REFERENCE_MAX = np.array([1.9705, 1.0308])                                        # 99th-pct. concentration: H, E


def _with_residual(stains: np.ndarray) -> np.ndarray:
    """(2, 3) H and E unit vectors -> (3, 3) rows H, E and their unit cross product."""
    h, e = stains / np.linalg.norm(stains, axis=1, keepdims=True)
    r = np.cross(h, e)
    return np.stack([h, e, r / np.linalg.norm(r)])


@dataclass(frozen=True)
class SlideStain:
    """One slide's stain estimate: glass colour (8-bit RGB), H and E OD unit vectors (2, 3) and
    their 99th-percentile concentrations (2,). ``method`` says how it was made."""

    glass: tuple[float, float, float]
    stains: tuple[tuple[float, float, float], tuple[float, float, float]]
    max_conc: tuple[float, float]
    method: str = "macenko"

    @classmethod
    def identity(cls, glass: np.ndarray, why: str) -> "SlideStain":
        """The map that changes nothing but the white point (used when no estimate can be made)."""
        return cls(tuple(float(v) for v in glass), tuple(map(tuple, REFERENCE_STAINS.tolist())),
                   tuple(REFERENCE_MAX.tolist()), f"none ({why})")

    def matrix(self) -> np.ndarray:
        """(3, 3) float32 ``M``: reference OD row vector = slide OD row vector @ ``M``."""
        s = _with_residual(np.asarray(self.stains, np.float64))
        scale = np.diag([*(REFERENCE_MAX / np.asarray(self.max_conc, np.float64)), 1.0])
        return (np.linalg.inv(s) @ scale @ _with_residual(REFERENCE_STAINS)).astype(np.float32)

    def record(self) -> dict:
        """For ``slide.json``: what the normalisation did to this slide."""
        return {"method": self.method, "glass_rgb": [round(v, 2) for v in self.glass],
                "stain_od": [[round(v, 4) for v in row] for row in self.stains],
                "max_concentration": [round(v, 4) for v in self.max_conc]}


def _optical_density(pixels: np.ndarray, glass: np.ndarray) -> np.ndarray:
    """uint8 RGB ``(n, 3)`` -> OD (natural log) above ``glass``, float64, at least 0."""
    return np.maximum(-np.log(np.maximum(pixels.astype(np.float64), 1.0) / glass), 0.0)


def estimate_stain(pixels: np.ndarray, glass: np.ndarray) -> SlideStain:
    """Macenko estimate from uint8 RGB pixels ``(n, 3)`` of a slide's tissue and its glass colour."""
    glass = np.asarray(glass, np.float64)
    pixels = pixels.reshape(-1, 3)
    if len(pixels) > _MAX_PIXELS:
        pixels = pixels[:: -(-len(pixels) // _MAX_PIXELS)]
    od = _optical_density(pixels, glass)
    od = od[(od > OD_MIN).any(axis=1)]
    if len(od) < MIN_PIXELS:
        return SlideStain.identity(glass, f"{len(od)} stained pixels, fewer than {MIN_PIXELS}")
    _, vecs = np.linalg.eigh(np.cov(od, rowvar=False))
    plane = vecs[:, [2, 1]]                      # the two main directions
    plane *= np.where(plane.sum(axis=0) < 0, -1.0, 1.0)  # pointing into positive OD
    proj = od @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [100 - _PERCENTILE, _PERCENTILE])
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    h, e = (v1, v2) if v1[0] > v2[0] else (v2, v1)  # haematoxylin absorbs more red light
    stains = np.stack([h, e])
    if (stains <= 0).any() or abs(float(np.dot(h, e)) / (np.linalg.norm(h) * np.linalg.norm(e))) > 0.995:
        return SlideStain.identity(glass, "degenerate stain vectors")
    full = _with_residual(stains)
    conc = od @ np.linalg.inv(full)
    max_conc = np.percentile(conc[:, :2], _PERCENTILE, axis=0)
    if (max_conc <= 1e-3).any():
        return SlideStain.identity(glass, "no stain concentration")
    return SlideStain(tuple(float(v) for v in glass), tuple(map(tuple, full[:2].tolist())),
                      tuple(float(v) for v in max_conc))


def sample_grid_tiles(n_tiles: int, k: int = SAMPLE_TILES) -> np.ndarray:
    """Indices of at most ``k`` tiles spread evenly over a grid of ``n_tiles`` (in grid order)."""
    return np.unique(np.linspace(0, n_tiles - 1, min(k, n_tiles)).round().astype(np.int64)) if n_tiles else \
        np.zeros(0, np.int64)


def grid_stain(slide: "Slide", grid: "TileGrid", glass: np.ndarray) -> SlideStain:
    """The stain of ``slide`` from :func:`sample_grid_tiles` of its tissue ``grid``, read as
    inference reads them, and its glass colour (8-bit RGB)."""
    from .tiling import TileReader

    if not len(grid):
        return SlideStain.identity(glass, "no tissue tile")
    reader = TileReader(slide, grid)
    try:
        tiles = reader.read_tiles(sample_grid_tiles(len(grid)))
    finally:
        reader.close()
    return estimate_stain(tiles, glass)


def tissue_stain(slide: "Slide", cfg: "Config") -> SlideStain:
    """The stain of ``slide`` as a run would estimate it: tissue found on the overview, the
    run's tile grid over it, :func:`grid_stain` (for slides read outside a run: training)."""
    from .tiling import tile_grid
    from .tissue import detect_tissue, read_overview

    overview = read_overview(slide, cfg.tissue.mask_mpp)
    return grid_stain(slide, tile_grid(slide, detect_tissue(slide, cfg.tissue, overview), cfg.tiling),
                      overview.glass)


def apply_stain(x: torch.Tensor, glass: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] ``(n, 3, h, w)`` of one slide with glass colour ``glass`` (3,) (8-bit) mapped
    with ``matrix`` (3, 3) onto the reference; RGB in [0, 1] out."""
    import torch

    g = glass.to(x.device, torch.float32).view(1, 3, 1, 1)
    od = torch.log(g / (x * 255.0).clamp_min(1.0)).clamp_min(0.0)
    out = torch.einsum("nchw,cd->ndhw", od, matrix.to(x.device, torch.float32))
    return torch.exp(-out).clamp_(0.0, 1.0)


def normalise_uint8(tiles: np.ndarray, stain: SlideStain, batch: int = 256) -> np.ndarray:
    """uint8 tiles ``(n, h, w, 3)`` of one slide mapped onto the reference (uint8, new array)."""
    import torch

    from .classifier import to_unit_float

    out = np.empty_like(tiles)
    glass, matrix = torch.tensor(stain.glass), torch.from_numpy(stain.matrix())
    for s in range(0, len(tiles), batch):
        y = apply_stain(to_unit_float(torch.from_numpy(np.ascontiguousarray(tiles[s:s + batch]))), glass, matrix)
        out[s:s + batch] = y.mul_(255.0).round_().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out
