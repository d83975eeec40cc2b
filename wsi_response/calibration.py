"""Calibration and validated error of a classifier, measured on its validation tiles (held-out slides).

- Temperature scaling: one scalar T > 0 such that ``softmax(logits / T)`` minimises the negative
  log-likelihood (NLL) of the validation labels. T > 1 softens over-confident probabilities; the
  argmax, hence every class area, is unchanged.
- Reliability: validation tiles binned by confidence (the top probability) into
  ``RELIABILITY_BINS`` equal-width bins; per bin the tile count, mean confidence and accuracy; the
  expected calibration error ECE = sum over bins of (n_bin / n) * |accuracy - confidence|.
- Validated error: the confusion matrix of the argmax on validation tiles (counts; rows true class,
  columns predicted, :data:`~wsi_response.classes.CLASSES` order) with its sample sizes, which
  :mod:`wsi_response.model_error` propagates into the specimen interval.
"""
from __future__ import annotations

import io
import math
from typing import Any

import numpy as np

from .classes import CLASSES

__all__ = ["RELIABILITY_BINS", "fit_temperature", "softmax", "reliability", "reliability_png",
           "validation_error", "calibrate"]

RELIABILITY_BINS = 10
_LOG_T_BOUNDS = (math.log(0.05), math.log(20.0))  # temperatures searched


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` ``(n, C)``, float64."""
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    z = np.asarray(logits, np.float64) / temperature
    m = z.max(axis=1, keepdims=True)
    log_norm = (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]
    return float(np.mean(log_norm - z[np.arange(len(z)), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature in [0.05, 20] minimising the mean NLL of ``labels`` (n,) under ``logits`` (n, C)."""
    from scipy.optimize import minimize_scalar

    if len(labels) == 0:
        raise ValueError("no validation tiles to fit a temperature on")
    res = minimize_scalar(lambda log_t: _nll(logits, labels, math.exp(log_t)), bounds=_LOG_T_BOUNDS,
                          method="bounded", options={"xatol": 1e-5})
    return float(math.exp(res.x))


def reliability(probs: np.ndarray, labels: np.ndarray, n_bins: int = RELIABILITY_BINS) -> dict[str, Any]:
    """Confidence bins of ``probs`` (n, C) against ``labels`` (n,) and the ECE (see the module docstring)."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    which = np.minimum((conf * n_bins).astype(np.int64), n_bins - 1)
    bins, ece = [], 0.0
    for b in range(n_bins):
        sel = which == b
        n = int(sel.sum())
        c = float(conf[sel].mean()) if n else None
        a = float(correct[sel].mean()) if n else None
        if n:
            ece += n / len(labels) * abs(a - c)
        bins.append({"lower": b / n_bins, "upper": (b + 1) / n_bins, "n": n, "confidence": c, "accuracy": a})
    return {"bins": bins, "ece": float(ece)}


def validation_error(labels: np.ndarray, predicted: np.ndarray, slide_index: np.ndarray) -> dict[str, Any]:
    """The checkpoint's ``validation_error`` block: confusion counts (all tiles, and per validation
    slide in ``slide_index`` order, for the between-slide spread of the error), tiles per true class,
    number of slides."""
    c = len(CLASSES)

    def confusion(sel: np.ndarray) -> np.ndarray:
        counts = np.zeros((c, c), np.int64)
        np.add.at(counts, (labels[sel], predicted[sel]), 1)
        return counts

    total = confusion(np.ones(len(labels), bool))
    slides = np.unique(slide_index)
    return {
        "confusion_matrix": total.tolist(),
        "n_per_class": {name: int(n) for name, n in zip(CLASSES, total.sum(axis=1))},
        "n_tiles": int(total.sum()),
        "n_slides": int(len(slides)),
        "per_slide": [confusion(slide_index == s).tolist() for s in slides],
        "axes": "rows: true class, columns: predicted class, order: " + ", ".join(CLASSES),
    }


def calibrate(logits: np.ndarray, labels: np.ndarray,
              slide_index: np.ndarray) -> tuple[float, dict[str, Any], dict[str, Any]]:
    """Fit the temperature on validation ``logits`` (n, C) and ``labels`` (n,) of the held-out slides
    ``slide_index`` (n,): ``(temperature, validation_error block, calibration report)``; the report
    holds the reliability bins, ECE and NLL before (T = 1) and after."""
    temperature = fit_temperature(logits, labels)
    block = validation_error(labels, np.asarray(logits).argmax(axis=1), slide_index)
    report: dict[str, Any] = {"method": "temperature scaling, minimum validation NLL", "temperature": temperature,
                              "n_tiles": int(len(labels)), "n_slides": block["n_slides"]}
    for key, t in (("before", 1.0), ("after", temperature)):
        report[key] = {**reliability(softmax(logits, t), labels), "nll": _nll(logits, labels, t)}
    return temperature, block, report


def reliability_png(report: dict[str, Any], size_px: int = 360) -> bytes:
    """A reliability diagram of :func:`calibrate`'s report: accuracy against mean confidence per bin,
    before (grey) and after (blue) temperature scaling, with the diagonal of perfect calibration."""
    from PIL import Image, ImageDraw

    margin = 40
    img = Image.new("RGB", (size_px + 2 * margin, size_px + 2 * margin), "white")
    draw = ImageDraw.Draw(img)

    def xy(conf: float, acc: float) -> tuple[float, float]:
        return margin + conf * size_px, margin + (1 - acc) * size_px

    draw.rectangle([xy(0, 1), xy(1, 0)], outline="black")
    draw.line([xy(0, 0), xy(1, 1)], fill=(160, 160, 160), width=1)
    for key, colour in (("before", (150, 150, 150)), ("after", (30, 90, 200))):
        points = [xy(b["confidence"], b["accuracy"]) for b in report[key]["bins"] if b["n"]]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    draw.text((margin, 8), f"reliability: ECE before {report['before']['ece']:.3f} (grey), after "
                           f"{report['after']['ece']:.3f} (blue), T = {report['temperature']:.2f}", fill="black")
    draw.text((margin, size_px + margin + 8), "confidence (x) vs accuracy (y)", fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
