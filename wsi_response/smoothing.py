"""Neighbourhood operators on the mask grid (for the tissue, artefact and focus detectors):
Gaussian means restricted to a mask, and binary morphology by disks."""
from __future__ import annotations

import numpy as np

__all__ = ["normalized_gauss", "MaskedGauss", "block_mean", "dilate", "erode"]

_BLOCK_SIGMA = 2.0  # Gaussians of sigma >= this x 2 px run on blocks of sigma / this px
_STRIP_BYTES = 4 << 20  # bytes (float32) per strip of the block means


def normalized_gauss(values: np.ndarray, weight: np.ndarray, sigma_px: float,
                     at: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Gaussian mean of ``values`` over px where ``weight`` is true (0 where none are near):
    :class:`MaskedGauss` for one plane."""
    return MaskedGauss(weight, sigma_px)(values, at)


class MaskedGauss:
    """Gaussian means of sigma ``sigma_px`` over the px where ``weight`` is true, for any number of
    planes on ``weight``'s grid: the normaliser (the Gaussian of ``weight``) is computed once.

    Kernels of ``sigma_px`` >= 4 px run on ``q`` x ``q`` block means (``q`` = sigma / 2 px) with
    a Gaussian of about 2 blocks, narrowed so that block averaging and the bilinear interpolation
    back to px (together a variance of q² / 4 px²) keep the total width at ``sigma_px``.
    Memory per call: the block grid's planes, and the output.
    """

    def __init__(self, weight: np.ndarray, sigma_px: float) -> None:
        self.weight = weight
        self.q = max(1, int(sigma_px // _BLOCK_SIGMA))
        self.sigma = sigma_px if self.q == 1 else np.sqrt(sigma_px ** 2 - self.q * self.q / 4.0) / self.q
        self.den = self._filtered(weight)
        self.valid = self.den > 1e-3
        np.maximum(self.den, 1e-3, out=self.den)

    def __call__(self, values: np.ndarray, at: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """The means of ``values``: float32 ``[y, x]``, or with ``at`` (row and column indices) only
        those at these px, float32 (n,), interpolated there alone."""
        h, w = self.weight.shape
        num = self._filtered(values, self.weight)
        num /= self.den
        num[~self.valid] = 0.0
        if at is not None:
            return num[at] if self.q == 1 else _sample(num, self.q, at)
        return num if self.q == 1 else _upsample(num, self.q)[:h, :w]

    def _filtered(self, values: np.ndarray, weight: np.ndarray | None = None) -> np.ndarray:
        """The Gaussian of ``values`` (times ``weight``), zero outside, on the block grid, float32;
        block means are taken strip by strip (no full-size temporary)."""
        from scipy import ndimage

        h, w = values.shape
        q = self.q
        if q == 1:
            plane = values.astype(np.float32) if weight is None else np.multiply(values, weight, dtype=np.float32)
        else:
            bh, bw = -(-h // q), -(-w // q)
            plane = np.empty((bh, bw), np.float32)
            rows = max(1, _STRIP_BYTES // (4 * q * q * bw))  # block rows per strip
            strip = np.zeros((rows * q, bw * q), np.float32)  # columns past w stay 0
            for b0 in range(0, bh, rows):
                y0, y1 = b0 * q, min(h, (b0 + rows) * q)
                part = strip[:-(-(y1 - y0) // q) * q]
                part[y1 - y0:] = 0.0  # the last strip's rows past h
                if weight is None:
                    part[:y1 - y0, :w] = values[y0:y1]
                else:
                    np.multiply(values[y0:y1], weight[y0:y1], out=part[:y1 - y0, :w])
                plane[b0:b0 + part.shape[0] // q] = block_mean(part, q)
        ndimage.gaussian_filter(plane, self.sigma, mode="constant", output=plane)
        return plane


def block_mean(a: np.ndarray, q: int) -> np.ndarray:
    """Means of the ``q`` x ``q`` blocks over the last two axes of float ``a`` (both multiples
    of ``q``), float32: whole rows added first, then strided columns (no reduction over a short
    inner axis, which numpy does slowly)."""
    *lead, h, w = a.shape
    rows = a.reshape(*lead, h // q, q, w).sum(axis=-2, dtype=np.float32)
    out = rows[..., 0::q].copy()
    for i in range(1, q):
        out += rows[..., i::q]
    out *= 1.0 / (q * q)
    return out


def _upsample(a: np.ndarray, q: int) -> np.ndarray:
    """Bilinear interpolation of ``a`` onto a ``q`` times finer grid, px centres aligned and edge
    values held (as PIL's BILINEAR resize), float32; one axis at a time."""
    for axis in (1, 0):
        n = a.shape[axis]
        src = np.pad(a, [(1, 1) if ax == axis else (0, 0) for ax in range(2)], mode="edge")
        shape = list(a.shape)
        shape[axis] *= q
        out = np.empty(shape, np.float32)
        for k in range(q):  # fine px k of each block lies t source px from the block's centre
            t = (k + 0.5) / q - 0.5
            lo = int(np.floor(t))
            f = np.float32(t - lo)
            near, far = (src[(slice(None),) * axis + (slice(1 + lo + i, 1 + lo + i + n),)] for i in (0, 1))
            out[(slice(None),) * axis + (slice(k, None, q),)] = near * (1 - f) + far * f
        a = out
    return a


def _sample(a: np.ndarray, q: int, at: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """``_upsample(a, q)[at]`` without the fine grid: bilinear weights of the px ``at`` alone."""
    corners = []
    for axis, index in enumerate(at):
        pos = (np.asarray(index, np.float64) + 0.5) / q - 0.5
        lo = np.floor(pos)
        n = a.shape[axis]
        corners.append((np.clip(lo, 0, n - 1).astype(np.intp), np.clip(lo + 1, 0, n - 1).astype(np.intp),
                        (pos - lo).astype(np.float32)))
    (y0, y1, fy), (x0, x1, fx) = corners
    top = a[y0, x0] * (1 - fx) + a[y0, x1] * fx
    bottom = a[y1, x0] * (1 - fx) + a[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def dilate(mask: np.ndarray, disk: np.ndarray) -> np.ndarray:
    """Binary dilation of bool ``mask`` by a disk footprint (as ``ndimage.binary_dilation``)."""
    return _by_rects(mask, disk, np.logical_or)


def erode(mask: np.ndarray, disk: np.ndarray) -> np.ndarray:
    """Binary erosion of bool ``mask`` by a disk footprint, px outside ``mask`` false (as
    ``ndimage.binary_erosion``)."""
    return _by_rects(mask, disk, np.logical_and)


def _by_rects(mask: np.ndarray, disk: np.ndarray, op: np.ufunc) -> np.ndarray:
    """Dilation (``op`` OR) or erosion (AND) by a symmetric footprint whose rows are centred runs
    narrowing away from the middle (a disk): the union of rectangles, each separable into runs of
    shifted bool operations (a few ms per 10⁶ px, whatever the contents)."""
    r = disk.shape[0] // 2
    half = disk.sum(axis=1)[r:] // 2  # run half-width per row offset 0..r
    out: np.ndarray | None = None
    for hx in np.unique(half):
        hy = int(np.flatnonzero(half >= hx).max())
        rect = _runs(_runs(mask, int(hx), 1, op), hy, 0, op)
        out = rect if out is None else op(out, rect, out=out)
    return out


def _runs(a: np.ndarray, h: int, axis: int, op: np.ufunc) -> np.ndarray:
    """``op`` over the 2 ``h`` + 1 px run centred on each px along ``axis`` (0 outside ``a``)."""
    n = a.shape[axis]

    def cut(start: int, stop: int) -> tuple[slice, ...]:
        return tuple(slice(start, stop) if ax == axis else slice(None) for ax in range(a.ndim))

    out = a.copy()
    for d in range(1, min(h, n - 1) + 1):
        op(out[cut(0, n - d)], a[cut(d, n)], out=out[cut(0, n - d)])
        op(out[cut(d, n)], a[cut(0, n - d)], out=out[cut(d, n)])
    if op is np.logical_and and h:
        out[cut(0, h)] = False
        out[cut(max(0, n - h), n)] = False
    return out
