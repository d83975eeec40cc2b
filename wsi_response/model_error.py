"""The classifier's validated error, propagated into the specimen viable % (method in :mod:`quantify`).

Inputs: the validation confusion counts ``M[t, k]`` (tiles of true class t predicted k, on
held-out slides; :mod:`wsi_response.calibration`), with the same counts per validation slide, and
the specimen's tiles grouped by spatial block (squares of ``BLOCK_MM``) and predicted class.
Units: areas in mm², percentages 0–100.

Between-slide spread (:func:`slide_concentration`): a slide's error rates differ from the pooled
ones (its own stain, textures, tumor). The intraclass correlation rho of "tile classified right"
within validation slides is estimated per true class by one-way ANOVA over the per-slide counts
(slides with >= ``MIN_SLIDE_TILES`` tiles of the class; classes with >= 2 such slides), averaged
weighted by tiles, and kept in [``RHO_MIN``, ``RHO_MAX``]; where no class has 2 such slides it is
``RHO_DEFAULT``. A specimen's rates are then Dirichlet(tau × the rates) per
true class, tau = 1 / rho - 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .classes import CLASSES, TUMOR_BED

__all__ = ["PRIOR", "BLOCK_MM", "BLOCK_CONCENTRATION", "METHOD_VALIDATED", "METHOD_TILE_PROBABILITIES",
           "RHO_DEFAULT", "ErrorGroups", "confusion_counts", "slide_concentration", "block_ids", "error_groups",
           "true_shares", "corrected_areas", "confusion_draws"]

PRIOR = 0.5                 # Dirichlet pseudo-count per confusion cell (Jeffreys prior)
BLOCK_MM = 1.0              # side of the square blocks whose tiles share one error mix, mm
BLOCK_CONCENTRATION = 10.0  # κ: a block's mix of true classes ~ Dirichlet(κ × the specimen's mix)
RHO_MIN, RHO_MAX = 0.01, 0.5  # bounds of the between-slide correlation of errors
RHO_DEFAULT = 0.1           # used when it cannot be estimated (< 2 validation slides per class)
MIN_SLIDE_TILES = 10        # a slide's tiles of a class count towards rho from this many
EM_MAX_ITERATIONS = 2000    # (accelerated) EM of the true shares stops after this many steps or a
EM_TOLERANCE = 1e-10        # change below this
METHOD_VALIDATED = "validated_confusion"
METHOD_TILE_PROBABILITIES = "tile_probabilities_only"
_VIABLE = CLASSES.index("viable_tumor")
_BED = np.array([c in TUMOR_BED for c in CLASSES])
_BLOCK_ELEMENTS = 1 << 21   # draws × groups × classes per chunk of draws


def confusion_counts(validation_error: Mapping[str, Any]) -> np.ndarray:
    """The ``(C, C)`` float64 confusion counts (rows true, columns predicted) of a checkpoint's
    ``validation_error`` block."""
    return np.asarray(validation_error["confusion_matrix"], np.float64)


def slide_concentration(validation_error: Mapping[str, Any]) -> float:
    """tau of the between-slide spread of the error rates (see the module docstring)."""
    rhos, weights = [], []
    per_slide = np.asarray(validation_error.get("per_slide", []), np.float64)
    for t in range(per_slide.shape[1] if per_slide.ndim == 3 else 0):
        n = per_slide[:, t, :].sum(axis=1)
        kept = n >= MIN_SLIDE_TILES
        right, n = per_slide[kept, t, t], n[kept]
        k, total = len(n), float(n.sum())
        if k < 2:
            continue
        p_slide, p = right / n, float(right.sum()) / total
        between = float((n * (p_slide - p) ** 2).sum()) / (k - 1)
        within = float((n * p_slide * (1 - p_slide)).sum()) / (total - k)
        n0 = (total - float((n * n).sum()) / total) / (k - 1)
        if between + (n0 - 1) * within > 0:
            rhos.append((between - within) / (between + (n0 - 1) * within))
            weights.append(total)
    rho = float(np.clip(np.average(rhos, weights=weights), RHO_MIN, RHO_MAX)) if rhos else RHO_DEFAULT
    return 1.0 / rho - 1.0


def block_ids(cols_rows: np.ndarray, cell_area_mm2: float) -> np.ndarray:
    """(N,) int64 block of each grid cell ``(column, row)``: squares of about ``BLOCK_MM`` side."""
    cols_rows = np.asarray(cols_rows, np.int64).reshape(-1, 2)
    if not len(cols_rows) or cell_area_mm2 <= 0:
        return np.zeros(len(cols_rows), np.int64)
    cells = max(1, round(BLOCK_MM / float(np.sqrt(cell_area_mm2))))
    _, ids = np.unique(cols_rows // cells, axis=0, return_inverse=True)
    return ids.reshape(-1).astype(np.int64)


def true_shares(predicted: np.ndarray, rates: np.ndarray) -> np.ndarray:
    """Maximum-likelihood true-class shares ``(..., C)`` of a specimen whose predicted-class shares are
    ``predicted`` ``(C,)`` (summing to 1), given the classifier's rates ``P(pred k | true t)``
    ``(..., C, C)``: EM of the mixture weights (the specimen's class mix may differ from validation's),
    accelerated by SQUAREM (Varadhan & Roland 2008) where the extrapolation stays non-negative."""
    def em(shares: np.ndarray) -> np.ndarray:
        expected = (shares[..., None, :] @ rates)[..., 0, :]                    # predicted shares, (..., k)
        ratio = np.divide(predicted, expected, out=np.zeros_like(expected), where=expected > 0)
        return shares * (rates @ ratio[..., None])[..., 0]

    def log_likelihood(shares: np.ndarray) -> np.ndarray:
        expected = (shares[..., None, :] @ rates)[..., 0, :]
        return (predicted * np.log(np.maximum(expected, 1e-300))).sum(axis=-1, keepdims=True)

    shares = np.full(rates.shape[:-1], 1.0 / rates.shape[-1])
    for _ in range(EM_MAX_ITERATIONS):
        once = em(shares)
        twice = em(once)
        r, v = once - shares, twice - 2 * once + shares
        alpha = -np.sqrt((r * r).sum(axis=-1, keepdims=True)
                         / np.maximum((v * v).sum(axis=-1, keepdims=True), 1e-300))
        alpha = np.minimum(alpha, -1.0)
        jump = shares - 2 * alpha * r + alpha * alpha * v
        jump = np.where((jump < 0).any(axis=-1, keepdims=True), twice, jump)
        updated = em(jump / jump.sum(axis=-1, keepdims=True))
        plain = em(twice)  # the extrapolation is kept only where it does not lower the likelihood
        updated = np.where(log_likelihood(updated) >= log_likelihood(plain), updated, plain)
        if np.abs(updated - shares).max() < EM_TOLERANCE:
            return updated
        shares = updated
    return shares


def corrected_areas(predicted_areas_mm2: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Misclassification-corrected true areas per class (mm²) from the predicted areas and the
    confusion counts (posterior-mean rates with :data:`PRIOR`)."""
    total = float(np.sum(predicted_areas_mm2))
    if total <= 0:
        return np.zeros(len(CLASSES))
    rates = counts + PRIOR
    rates = rates / rates.sum(axis=1, keepdims=True)
    return true_shares(np.asarray(predicted_areas_mm2, np.float64) / total, rates) * total


@dataclass(frozen=True, eq=False)  # numpy fields
class ErrorGroups:
    """One slide's counted area grouped by (spatial block, predicted class): the units whose true
    classes the validated interval draws."""

    pred: np.ndarray      # (G,) int64 predicted class
    tiles: np.ndarray     # (G,) float64 tile-equivalents (a sub-cell is 1/k² of a tile)
    area_mm2: np.ndarray  # (G,) float64 tissue area, mm²


def error_groups(labels: np.ndarray, weights_mm2: np.ndarray, blocks: np.ndarray,
                 tile_share: float = 1.0) -> ErrorGroups:
    """Group area units (tiles, or sub-cells with ``tile_share`` = 1/k²) with tissue by block and
    predicted class: the same labels and areas as the reported class areas, so the interval is drawn
    around the areas it reports."""
    c = len(CLASSES)
    has = np.asarray(weights_mm2) > 0
    key = np.asarray(blocks, np.int64)[has] * c + np.asarray(labels, np.int64)[has]
    uniq, inverse = np.unique(key, return_inverse=True)
    inverse = inverse.reshape(-1)
    return ErrorGroups(pred=(uniq % c).astype(np.int64),
                       tiles=np.bincount(inverse, minlength=len(uniq)) * float(tile_share),
                       area_mm2=np.bincount(inverse, weights=np.asarray(weights_mm2, np.float64)[has],
                                            minlength=len(uniq)))


def confusion_draws(groups: Sequence[ErrorGroups], counts: np.ndarray, slide_tau: float, seed: int = 0,
                    draws: int = 1000) -> np.ndarray:
    """``draws`` seeded draws (float64) of the TRUE viable % of the bed given the validated confusion
    ``counts`` and the between-slide concentration ``slide_tau`` (:func:`slide_concentration`;
    steps 1-4 in :mod:`quantify`); NaN where a draw's bed is empty. ``groups``: one per slide
    (:func:`error_groups`); a group's tiles are drawn as its tile-equivalents rounded (at least 1),
    each with the group's mean area.
    """
    if not groups:
        return np.full(draws, np.nan)
    pred = np.concatenate([g.pred for g in groups])
    area = np.concatenate([g.area_mm2 for g in groups])
    n_tiles = np.maximum(1, np.rint(np.concatenate([g.tiles for g in groups]))).astype(np.int64)
    total = float(area.sum())
    if total <= 0:
        return np.full(draws, np.nan)
    predicted_shares = np.bincount(pred, weights=area, minlength=len(CLASSES)) / total
    mean_area = area / n_tiles
    rng = np.random.default_rng(seed)
    c = len(CLASSES)
    percents = []
    step = max(1, _BLOCK_ELEMENTS // (len(pred) * c))
    for start in range(0, draws, step):
        d = min(step, draws - start)
        rates = rng.standard_gamma(np.broadcast_to(counts + PRIOR, (d, c, c)))
        rates /= rates.sum(axis=2, keepdims=True)                           # P(pred k | true t), (d, t, k)
        rates = rng.standard_gamma(slide_tau * rates)                       # this specimen's rates
        rates /= rates.sum(axis=2, keepdims=True)
        shares = true_shares(predicted_shares, rates)                       # (d, t)
        joint = rates * shares[:, :, None]
        given_pred = np.swapaxes(joint / np.maximum(joint.sum(axis=1, keepdims=True), 1e-300), 1, 2)  # (d, k, t)
        block_mix = rng.standard_gamma(BLOCK_CONCENTRATION * given_pred[:, pred, :])          # (d, g, t)
        block_mix /= block_mix.sum(axis=2, keepdims=True)
        true_tiles = rng.multinomial(np.broadcast_to(n_tiles, (d, len(pred))), block_mix)   # (d, g, t)
        true_areas = np.einsum("dgt,g->dt", true_tiles, mean_area)
        viable, bed = true_areas[:, _VIABLE], true_areas[:, _BED].sum(axis=1)
        percents.append(np.divide(100.0 * viable, bed, out=np.full(d, np.nan), where=bed > 0))
    return np.concatenate(percents)
