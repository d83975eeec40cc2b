"""Gaussian means restricted to a mask (for the artefact and focus detectors)."""
from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["normalized_gauss"]


def normalized_gauss(values: np.ndarray, weight: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian mean of ``values`` over px where ``weight`` is true (0 where none are near).

    Wide kernels run on ``q`` x ``q`` block means (``q`` = sigma / 8) and are interpolated back.
    """
    from scipy import ndimage

    h, w = weight.shape
    q = max(1, int(sigma_px // 8))
    den = weight.astype(np.float32)
    num = values.astype(np.float32) * den
    if q > 1:
        ph, pw = -(-h // q) * q, -(-w // q) * q
        num, den = (np.pad(a, ((0, ph - h), (0, pw - w))).reshape(ph // q, q, pw // q, q).mean(axis=(1, 3))
                    for a in (num, den))
    num = ndimage.gaussian_filter(num, sigma_px / q, mode="constant")
    den = ndimage.gaussian_filter(den, sigma_px / q, mode="constant")
    out = np.where(den > 1e-3, num / np.maximum(den, 1e-3), 0.0).astype(np.float32)
    if q > 1:
        out = np.asarray(Image.fromarray(out).resize((out.shape[1] * q, out.shape[0] * q),
                                                     Image.Resampling.BILINEAR))[:h, :w]
    return out
