"""Out-of-focus tissue: a focus measure read from the pyramid, pooled on the tissue mask's grid."""
from __future__ import annotations

import numpy as np
from PIL import Image

from .config import QcConfig
from .slide import Slide
from .smoothing import normalized_gauss
from .tissue import TissueMask

__all__ = ["blur_layer"]

_STRIP_ROWS = 64  # mask rows per focus-measure strip


def blur_layer(slide: Slide, mask: TissueMask, measured: np.ndarray, cfg: QcConfig) -> np.ndarray:
    """Tissue px whose sharpness is below ``blur_max_sharpness`` and ``blur_max_relative`` x
    the slide's sharp tissue (both: a slide scanned soft all over is not out of focus)."""
    fine, band = _focus_energies(slide, mask, cfg)
    sigma = cfg.focus_smooth_um / mask.mpp
    sharp = normalized_gauss(fine, measured, sigma) / np.maximum(
        normalized_gauss(band, measured, sigma), 1e-6)
    if not measured.any():
        return np.zeros_like(measured)
    reference = float(np.percentile(sharp[measured], cfg.focus_reference_percentile))
    return measured & (sharp < min(cfg.blur_max_sharpness, cfg.blur_max_relative * reference))


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
