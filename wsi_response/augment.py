"""Training augmentation of tiles read with context: what differs between labs, scanners and slides.

:func:`augment` applies, per tile and in this order: JPEG re-compression (half the tiles, quality
U(``jpeg_quality_min``, 95); scanners store JPEG), a centred crop of ``tile_px × s`` px,
s ~ U(1 - ``scale_jitter``, 1 + ``scale_jitter``), resized to ``tile_px`` (magnification and
µm/px calibration differ between scanners), one of the 8 flips/90° rotations, HED stain jitter
(:func:`hed_jitter`), brightness, contrast, saturation and hue jitter (:func:`colour_jitter`) and
Gaussian blur (half the tiles, sigma U(0, ``blur_max_um``); focus). Every draw comes from the
given numpy and torch generators, so a seed fixes the augmentation.
"""
from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .classifier import to_unit_float
from .config import TrainingConfig

__all__ = ["augment", "centre_crop", "jpeg_recompress", "scale_crop", "dihedral", "hed_jitter",
           "colour_jitter", "gaussian_blur"]


def augment(tiles: np.ndarray, tile_px: int, target_mpp: float, tr: TrainingConfig, rng: np.random.Generator,
            gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """uint8 tiles with context ``(n, s, s, 3)`` -> augmented RGB in [0, 1] ``(n, 3, tile_px, tile_px)``."""
    if tr.jpeg_quality_min > 0:
        tiles = jpeg_recompress(tiles, tr.jpeg_quality_min, rng)
    x = to_unit_float(torch.from_numpy(tiles).to(device, non_blocking=True))
    x = dihedral(scale_crop(x, tile_px, tr.scale_jitter, gen), gen)
    if tr.hed_jitter > 0:
        x = hed_jitter(x, tr.hed_jitter, gen)
    if tr.colour_jitter > 0:
        x = colour_jitter(x, tr.colour_jitter, gen)
    if tr.blur_max_um > 0:
        x = gaussian_blur(x, tr.blur_max_um / target_mpp, gen)
    return x


def centre_crop(tiles: np.ndarray, tile_px: int) -> np.ndarray:
    """The centred ``tile_px`` square of tiles with context ``(n, s, s, 3)`` (a view)."""
    m = (tiles.shape[1] - tile_px) // 2
    return tiles[:, m:m + tile_px, m:m + tile_px]


def jpeg_recompress(tiles: np.ndarray, quality_min: int, rng: np.random.Generator) -> np.ndarray:
    """Half the tiles of uint8 ``(n, h, w, 3)`` JPEG-encoded and decoded at quality U(quality_min, 95)."""
    out = tiles.copy()
    for i in np.flatnonzero(rng.random(len(tiles)) < 0.5):
        buf = io.BytesIO()
        Image.fromarray(tiles[i]).save(buf, format="JPEG", quality=int(rng.integers(quality_min, 96)))
        out[i] = np.asarray(Image.open(buf).convert("RGB"))
    return out


def scale_crop(x: torch.Tensor, tile_px: int, jitter: float, gen: torch.Generator) -> torch.Tensor:
    """Per tile, the centred square of side ``tile_px × U(1 - jitter, 1 + jitter)`` px of
    ``(n, 3, s, s)`` (at most ``s``), resized to ``tile_px`` (bilinear)."""
    n, _, s, _ = x.shape
    side = tile_px * (1 + (torch.rand(n, generator=gen) * 2 - 1) * jitter)
    ratio = (side.clamp(max=s) / s).to(x.device)
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0] = ratio
    theta[:, 1, 1] = ratio
    grid = F.affine_grid(theta, [n, 3, tile_px, tile_px], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def dihedral(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each tile of ``(n, c, h, w)`` in one of the 8 flips/90° rotations, drawn per tile."""
    ops = torch.randint(0, 8, (x.shape[0],), generator=generator)
    out = torch.empty_like(x)
    for op in range(8):
        sel = (ops == op).nonzero().flatten().to(x.device)
        if len(sel):
            t = torch.rot90(x[sel], op % 4, dims=(2, 3))
            out[sel] = torch.flip(t, dims=(3,)) if op >= 4 else t
    return out


def _hed_matrices() -> tuple[torch.Tensor, torch.Tensor]:
    from skimage.color import hed_from_rgb, rgb_from_hed

    return torch.from_numpy(hed_from_rgb).float(), torch.from_numpy(rgb_from_hed).float()


_HED_FROM_RGB, _RGB_FROM_HED = _hed_matrices()
_LOG_ADJUST = math.log(1e-6)


def hed_jitter(x: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """HED stain augmentation of RGB in [0, 1] ``(n, 3, h, w)`` (skimage rgb2hed/hed2rgb in torch).

    Per tile, each stain concentration is scaled by U(1-sigma, 1+sigma) and shifted by
    U(-sigma, sigma) / 20. Stain concentrations of H&E tissue are about 0.01-0.07 in skimage's
    units (median haematoxylin of tumour ~0.03, of necrosis ~0.015), so the shift stays small
    (±0.01 at sigma 0.2) and does not wash out the stain difference between classes, while the
    scale covers the per-region stain variation of slides (synthetic: ±18 %).
    """
    n = x.shape[0]
    alpha = 1 + (torch.rand(n, 3, generator=generator) * 2 - 1) * sigma
    beta = (torch.rand(n, 3, generator=generator) * 2 - 1) * sigma / 20
    hed_from_rgb, rgb_from_hed = _HED_FROM_RGB.to(x.device), _RGB_FROM_HED.to(x.device)
    od = torch.log(x.clamp_min(1e-6)) / _LOG_ADJUST
    stains = torch.einsum("nchw,cd->ndhw", od, hed_from_rgb).clamp_min(0)
    stains = stains * alpha.to(x.device)[:, :, None, None] + beta.to(x.device)[:, :, None, None]
    rgb = torch.exp(torch.einsum("nchw,cd->ndhw", stains * _LOG_ADJUST, rgb_from_hed))
    return rgb.clamp(0, 1)


# RGB <-> YIQ (NTSC): hue is the angle of (I, Q), saturation their length
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


def colour_jitter(x: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and saturation of RGB in [0, 1] ``(n, 3, h, w)`` each scaled by
    U(1 - strength, 1 + strength) per tile (contrast about the tile's mean grey), and the hue
    rotated by U(-1, 1) × strength × 60°."""
    n = x.shape[0]
    u = (torch.rand(n, 4, generator=generator) * 2 - 1).to(x.device)
    brightness, contrast, saturation = (1 + u[:, :3] * strength).unbind(1)
    angle = u[:, 3] * strength * math.pi / 3
    cos, sin = torch.cos(angle) * saturation, torch.sin(angle) * saturation
    yiq = torch.einsum("dc,nchw->ndhw", _RGB_TO_YIQ.to(x.device), x)
    y = yiq[:, :1]
    y = (y - y.mean(dim=(2, 3), keepdim=True)) * contrast[:, None, None, None] + y.mean(dim=(2, 3), keepdim=True)
    i = yiq[:, 1] * cos[:, None, None] - yiq[:, 2] * sin[:, None, None]
    q = yiq[:, 1] * sin[:, None, None] + yiq[:, 2] * cos[:, None, None]
    yiq = torch.cat([y * brightness[:, None, None, None], (i * contrast[:, None, None])[:, None],
                     (q * contrast[:, None, None])[:, None]], dim=1)
    return torch.einsum("dc,nchw->ndhw", _YIQ_TO_RGB.to(x.device), yiq).clamp_(0, 1)


def gaussian_blur(x: torch.Tensor, max_sigma_px: float, generator: torch.Generator) -> torch.Tensor:
    """Half the tiles of ``(n, c, h, w)`` blurred with a Gaussian of sigma U(0, ``max_sigma_px``) px
    (separable, reflected edges); the others unchanged."""
    n, c, h, w = x.shape
    sigma = torch.rand(n, generator=generator) * max_sigma_px * (torch.rand(n, generator=generator) < 0.5)
    radius = max(1, math.ceil(3 * max_sigma_px))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t[None] / sigma.clamp_min(1e-3)[:, None]) ** 2)
    k = (k / k.sum(dim=1, keepdim=True)).to(x.device).repeat_interleave(c, dim=0)  # (n * c, taps)
    y = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=n * c)
    y = F.conv2d(y, k[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w).clamp_(0, 1)
