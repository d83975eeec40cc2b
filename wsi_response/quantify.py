"""Areas per class (mm²), viable % of the tumor bed, its 95 % interval and the EORTC-STBSG tier.

Areas. A tile's class is the argmax of its probabilities. The area of class c on a slide is
``sum(tissue_fraction[tile] for tiles of class c) * cell_area_mm2``: a tile counts the tissue of
its *cell* (cells partition the slide, so overlapping tiles never count area twice). With
sub-cells (``tiling.refine: dense``, the default) every cell is split into k × k sub-cells, each
with its own class (the argmax of its probabilities from the tile's feature map, see
:mod:`wsi_response.inference`) and its own tissue fraction, and the areas are summed over
sub-cells: a class border inside a cell costs at most a strip of sub-cells (32 µm by default), not
the whole 224 µm cell. Measured with true labels instead of the model's on three synthetic
3 × 2.25 mm slides (``benchmarks/subtile.py``, :mod:`wsi_response.oracle`: every cell or sub-cell
given its true majority class), this discretisation moves the viable % by +0.71, +2.89, +1.39 pp
with whole cells and −0.05, +0.11, +0.13 pp with 7 × 7 sub-cells. It does not remove the
classifier's own error, which dominates the real error (the sub-cells' classes come from the same
model, seeing 96 µm of context each). The validated interval below draws the same units' classes
(sub-cells grouped by block and class, counted as tile-equivalents), so it is drawn around the
areas reported.
These are exactly the areas of the class regions drawn by :mod:`wsi_response.regions` (which
draws the sub-cells). The tumor bed is
viable_tumor + necrosis + fibrosis; percentages are of the bed, ``None`` when the bed is empty.
A specimen sums the areas of all its slides and takes the percentages of the summed bed (never
an average of slide percentages).

Interval (``viable_percent_ci95``) and its method (``viable_percent_ci95_method``).

*With a validated model* (its checkpoint carries the confusion counts of held-out validation
slides, :mod:`wsi_response.calibration`): method ``"validated_confusion"``
(:mod:`wsi_response.model_error`). The interval is for the TRUE viable % of the bed given the
classifier's validated error; it brackets ``viable_percent_corrected`` and need not contain the
measured ``viable_percent``. Each of ``CI_DRAWS`` seeded draws of the specimen:

1. draws the classifier's rates ``P(pred k | true t)`` from their posterior: each row
   Dirichlet(validation counts + 0.5), so a class with few validation tiles gets wide rates;
   then this specimen's rates around them, each row Dirichlet(tau × rates), tau from the
   spread of the error between validation slides (``model_error.slide_concentration``): a new
   slide's error differs from the pooled validation error as much as validation slides differ;
2. estimates the specimen's true class mix from its predicted areas under those rates (EM of the
   mixture weights), so a specimen's mix may differ from the validation's (a 0 % specimen is not
   credited with the validation's viable tumor), and from it ``P(true t | pred k)``;
3. groups the counted area (the tiles, or their sub-cells, with the classes and areas that make
   the reported areas) by slide, spatial block (squares of ``BLOCK_MM`` = 1 mm) and predicted
   class, and draws each group's mix of true classes once, Dirichlet(``BLOCK_CONCENTRATION`` (10) ×
   ``P(true | pred)``): neighbouring tiles are wrong together, so errors do not average away
   within a block (a block's error rate has a standard deviation of about 1/3.3 of its
   ``sqrt(rate (1 - rate))``: rates of 5 % vary between blocks from about 0 to 20 %);
4. draws each group's tiles' true classes from that mix (multinomial over its tile-equivalents,
   sub-cells counting 1/k² of a tile, each with the group's mean tissue area): the per-tile sampling, with validated probabilities in
   place of the model's own;
5. adds the spread of the tile-probability draws below (each draw minus their mean), so the
   interval is never narrower than the model's own stated uncertainty (ambiguous tiles of a small
   bed). Steps 4 and 5 both sample tiles: a deliberate, conservative double count.

The 2.5th and 97.5th percentiles of ``100 × V / B`` over the draws form the interval.
``viable_percent_corrected`` is step 2 with the posterior-mean rates: the misclassification-
corrected estimate (true areas = predicted areas × P(true | predicted), the latter for this
specimen's mix). It is an extra number; ``viable_percent`` stays the measured areas, which equal
the overlay polygons.

*Without validation* (no confusion in the checkpoint, e.g. trained with ``--val-split 0``):
method ``"tile_probabilities_only"`` and a QC caveat ``model_error_unknown``. Each tile's true
class is treated as an independent categorical draw from its (calibrated, where a temperature was
fitted) probability vector, weighted by its tissue area (``tissue_fraction * cell_area_mm2``).
One draw of every tile of every slide gives a viable area V and a bed area B; ``CI_DRAWS`` such
draws give the 2.5th and 97.5th percentiles of ``100 * V / B`` (draws with an empty bed are
left out). Draws are made in blocks of tiles, slide by slide, so memory stays at a few tens of
MB whatever the specimen size; time grows with tiles × draws (about 3 s per 100,000 tiles on 2
CPU cores). This describes only the classifier's own stated uncertainty: it does not cover
spatially correlated errors (too narrow for large beds) nor any validated error.

Neither interval covers:

- error the validation slides did not show: domain shift (stain, scanner, a tumor subtype or
  tissue unlike the validation slides), and the validation tiles' own spatial correlation (the
  counts are taken as independent tiles, so a few validation slides overstate what is known);
- tiles mixing classes at region borders (validation tiles lie mostly inside one annotated
  region; the grid's border error is not in the confusion matrix);
- tissue-detection and tiling error, the area below ``min_tissue_fraction`` that is not counted,
- sampling of the specimen: blocks that do not represent the whole tumor bed.

No floor is put under the probabilities of the fallback: mixing towards uniform widens the
interval only by biasing it (a 0 % specimen would get an interval near 1 %). Because the point
estimate uses the argmax, the interval need not contain it; ``near_cutoff`` therefore looks at
the point estimate as well as both ends of the interval.

EORTC-STBSG score of the specimen viable %: A no viable tumor (viable area exactly 0),
B < 1 %, C 1 to < 10 %, D 10 to < 50 %, E >= 50 %. ``near_cutoff`` is True when the point
estimate and the two ends of the interval do not all fall in the same tier, i.e. when the
interval (or the point estimate) lies on both sides of one of the cut-offs 0, 1, 10, 50 %.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .classes import CLASSES, TUMOR_BED
from .model_error import (METHOD_TILE_PROBABILITIES, METHOD_VALIDATED, ErrorGroups, block_ids, confusion_counts,
                          confusion_draws, corrected_areas, error_groups, slide_concentration)
from .store import TilePredictions
from .tiling import TileGrid

__all__ = [
    "SlideAreas",
    "SpecimenAreas",
    "EortcScore",
    "slide_areas",
    "slide_areas_from_tiles",
    "specimen_areas",
    "viable_percent_ci95",
    "viable_percent_draws",
    "eortc_tier",
    "EORTC_CUTOFFS_PERCENT",
    "CI_DRAWS",
]

EORTC_CUTOFFS_PERCENT: tuple[float, ...] = (1.0, 10.0, 50.0)  # B|C, C|D, D|E; A|B is "> 0"
CI_DRAWS = 1000              # Monte Carlo draws of the specimen for the interval
_BLOCK_ELEMENTS = 1 << 21    # tiles × draws per block (two 8 MB float32 buffers)
_VIABLE = CLASSES.index("viable_tumor")
_BED = np.array([c in TUMOR_BED for c in CLASSES])


@dataclass(frozen=True, eq=False)  # numpy fields: compare the arrays explicitly
class _BedAreas:
    """Areas per class in :data:`CLASSES` order (mm²) and the tissue area (mm²)."""

    areas_mm2: np.ndarray  # (len(CLASSES),) float64, mm²
    tissue_area_mm2: float

    @property
    def tumor_bed_area_mm2(self) -> float:
        """viable_tumor + necrosis + fibrosis, mm²."""
        return float(self.areas_mm2[_BED].sum())

    def _percent_of_bed(self, name: str) -> float | None:
        bed = self.tumor_bed_area_mm2
        return None if bed <= 0 else 100.0 * float(self.areas_mm2[CLASSES.index(name)]) / bed

    @property
    def viable_percent(self) -> float | None:
        """100 × viable / tumor bed; None when the bed is empty."""
        return self._percent_of_bed("viable_tumor")

    @property
    def necrosis_percent(self) -> float | None:
        """100 × necrosis / tumor bed; None when the bed is empty."""
        return self._percent_of_bed("necrosis")

    @property
    def fibrosis_percent(self) -> float | None:
        """100 × fibrosis / tumor bed; None when the bed is empty."""
        return self._percent_of_bed("fibrosis")

    def to_dict(self) -> dict[str, Any]:
        """The area fields of slide.json / specimen.json (DESIGN §5)."""
        return {
            "areas_mm2": {name: float(a) for name, a in zip(CLASSES, self.areas_mm2)},
            "tissue_area_mm2": float(self.tissue_area_mm2),
            "tumor_bed_area_mm2": self.tumor_bed_area_mm2,
            "viable_percent": self.viable_percent,
            "necrosis_percent": self.necrosis_percent,
            "fibrosis_percent": self.fibrosis_percent,
        }


@dataclass(frozen=True, eq=False)  # numpy fields: compare the arrays explicitly
class SlideAreas(_BedAreas):
    """Class areas of one slide, with its tiles' probabilities and areas and its area units grouped
    by block and class for the interval."""

    tile_probs: np.ndarray = field(repr=False)         # (N, len(CLASSES)) float32
    tile_weights_mm2: np.ndarray = field(repr=False)   # (N,) float64 tissue area, mm²
    error_groups: ErrorGroups = field(repr=False)      # the counted areas by block (model_error.BLOCK_MM) and class


@dataclass(frozen=True)
class EortcScore:
    """EORTC-STBSG response tier ("A".."E"), or None with the reason."""

    tier: str | None
    near_cutoff: bool | None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"tier": self.tier, "near_cutoff": self.near_cutoff, "reason": self.reason}


@dataclass(frozen=True, eq=False)  # numpy fields: compare the arrays explicitly
class SpecimenAreas(_BedAreas):
    """Areas summed over the slides of a specimen, the viable % interval and the EORTC tier."""

    n_slides: int
    viable_percent_ci95: tuple[float, float] | None
    eortc: EortcScore
    viable_percent_ci95_method: str = METHOD_TILE_PROBABILITIES
    viable_percent_corrected: float | None = None  # misclassification-corrected; validated models only

    def to_dict(self) -> dict[str, Any]:
        """The area, interval and tier fields of specimen.json (DESIGN §5)."""
        out = super().to_dict()
        ci = self.viable_percent_ci95
        out["viable_percent_ci95"] = None if ci is None else [float(ci[0]), float(ci[1])]
        out["viable_percent_ci95_method"] = self.viable_percent_ci95_method
        out["viable_percent_corrected"] = self.viable_percent_corrected
        out["eortc"] = self.eortc.to_dict()
        return out


def slide_areas(grid: TileGrid, predictions: TilePredictions) -> SlideAreas:
    """Per-class areas (mm²) of one slide from its grid and the tiles' (or sub-cells') argmax classes."""
    if len(grid) != len(predictions):
        raise ValueError(f"{len(grid)} tiles in the grid but {len(predictions)} predictions")
    sub_fraction = None if grid.subcell_fraction is None else grid.subcell_fraction.reshape(len(grid), grid.subcells ** 2)
    return slide_areas_from_tiles(predictions.probs, predictions.class_names, grid.tissue_fraction,
                                  grid.cell_area_mm2, predictions.subcell_probs, sub_fraction,
                                  cols_rows=grid.cols_rows)


def slide_areas_from_tiles(probs: np.ndarray, class_names: Sequence[str], tissue_fraction: np.ndarray,
                           cell_area_mm2: float, subcell_probs: np.ndarray | None = None,
                           subcell_fraction: np.ndarray | None = None, *,
                           cols_rows: np.ndarray | None = None) -> SlideAreas:
    """Per-class areas (mm²) from stored tile arrays: probabilities (N, C) with their class ids,
    each tile's cell tissue fraction (N,), and the cell area (mm²). With sub-cells, the areas
    (and the tissue area) come from their probabilities ``(N, k*k, C)`` and tissue fractions
    ``(N, k*k)`` instead, each sub-cell ``cell_area_mm2 / k²``; the interval's rows stay the tiles.
    ``cols_rows``: each tile's grid cell ``(column, row)`` (N, 2) for the interval's spatial blocks
    (None: every tile its own block)."""
    probs = _canonical_probs(np.asarray(probs), tuple(class_names))
    weights_mm2 = np.asarray(tissue_fraction, np.float64) * cell_area_mm2
    if len(weights_mm2) != len(probs):
        raise ValueError(f"{len(probs)} probability rows but {len(weights_mm2)} tissue fractions")
    blocks = np.arange(len(probs), dtype=np.int64) if cols_rows is None else block_ids(cols_rows, cell_area_mm2)
    labels, area_weights_mm2, area_blocks, kk = np.argmax(probs, axis=1), weights_mm2, blocks, 1
    if subcell_probs is not None:
        kk = subcell_probs.shape[1]
        if subcell_fraction is None or subcell_fraction.shape != (len(probs), kk):
            raise ValueError(f"sub-cell tissue fractions of shape {getattr(subcell_fraction, 'shape', None)} "
                             f"for {len(probs)} tiles of {kk} sub-cells")
        sub = _canonical_probs(np.asarray(subcell_probs).reshape(-1, subcell_probs.shape[2]), tuple(class_names))
        labels = np.argmax(sub, axis=1)
        area_weights_mm2 = np.asarray(subcell_fraction, np.float64).reshape(-1) * (cell_area_mm2 / kk)
        area_blocks = np.repeat(blocks, kk)
    areas = np.bincount(labels, weights=area_weights_mm2, minlength=len(CLASSES))
    return SlideAreas(areas_mm2=areas.astype(np.float64), tissue_area_mm2=float(area_weights_mm2.sum()),
                      tile_probs=probs, tile_weights_mm2=weights_mm2,
                      error_groups=error_groups(labels, area_weights_mm2, area_blocks, 1.0 / kk))


def specimen_areas(slides: Sequence[SlideAreas], seed: int = 0, draws: int = CI_DRAWS,
                   validation_error: Mapping[str, Any] | None = None) -> SpecimenAreas:
    """Sum of the slides' areas, percentages of the summed bed, its interval and EORTC tier.

    ``validation_error``: the model's block of validation confusion counts (the checkpoint's
    ``validation_error``); None falls back to the tile-probability interval."""
    totals = _BedAreas(
        areas_mm2=np.sum([s.areas_mm2 for s in slides], axis=0) if slides else np.zeros(len(CLASSES)),
        tissue_area_mm2=float(sum(s.tissue_area_mm2 for s in slides)))
    viable = totals.viable_percent
    corrected, ci = None, None
    tile_probs = [(s.tile_probs, s.tile_weights_mm2) for s in slides]
    if validation_error is None:
        method = METHOD_TILE_PROBABILITIES
        if viable is not None:
            ci = viable_percent_ci95(tile_probs, seed, draws)
    else:
        method = METHOD_VALIDATED
        counts = confusion_counts(validation_error)
        if viable is not None:
            validated = confusion_draws([s.error_groups for s in slides], counts,
                                        slide_concentration(validation_error), seed + 1, draws)
            spread = viable_percent_draws(tile_probs, seed, draws)
            if not np.isnan(spread).all():
                validated = validated + (spread - np.nanmean(spread))
            ci = _ci95(validated)
            true_areas = corrected_areas(totals.areas_mm2, counts)
            bed = float(true_areas[_BED].sum())
            corrected = 100.0 * float(true_areas[_VIABLE]) / bed if bed > 0 else None
    return SpecimenAreas(areas_mm2=totals.areas_mm2, tissue_area_mm2=totals.tissue_area_mm2,
                         n_slides=len(slides), viable_percent_ci95=ci, eortc=eortc_tier(viable, ci),
                         viable_percent_ci95_method=method, viable_percent_corrected=corrected)


def viable_percent_ci95(tile_sets: Sequence[tuple[np.ndarray, np.ndarray]], seed: int = 0,
                        draws: int = CI_DRAWS) -> tuple[float, float] | None:
    """95 % Monte Carlo interval of the viable % of the bed from the tiles' own probabilities (see
    the module docstring); None when every draw has an empty bed.

    ``tile_sets``: one ``(probs (N, len(CLASSES)), weights_mm2 (N,))`` pair per slide, classes in
    :data:`CLASSES` order.
    """
    return _ci95(viable_percent_draws(tile_sets, seed, draws))


def viable_percent_draws(tile_sets: Sequence[tuple[np.ndarray, np.ndarray]], seed: int = 0,
                         draws: int = CI_DRAWS) -> np.ndarray:
    """``draws`` seeded draws of the viable % with every tile's class drawn from its probabilities
    (arguments as :func:`viable_percent_ci95`); NaN where a draw's bed is empty."""
    rng = np.random.default_rng(seed)
    viable = np.zeros(draws, np.float64)
    bed = np.zeros(draws, np.float64)
    rows = max(1, _BLOCK_ELEMENTS // draws)
    u = np.empty((rows, draws), np.float32)    # uniforms, one per tile and draw
    hit = np.empty((rows, draws), np.float32)  # 1.0 where the draw lands in the class set
    for probs, weights in tile_sets:
        p_viable = probs[:, _VIABLE].astype(np.float32)
        p_bed = probs[:, _BED].sum(axis=1, dtype=np.float32)  # viable is the first class of the bed
        w = np.asarray(weights, np.float32)  # float32 gemv; sums of one block, then float64
        for start in range(0, len(w), rows):
            m = min(rows, len(w) - start)
            rng.random(out=u[:m], dtype=np.float32)
            for p, total in ((p_viable, viable), (p_bed, bed)):
                np.less(u[:m], p[start:start + m, None], out=hit[:m])
                total += w[start:start + m] @ hit[:m]
    return np.divide(100.0 * viable, bed, out=np.full(draws, np.nan), where=bed > 0)


def _ci95(percent: np.ndarray) -> tuple[float, float] | None:
    """2.5th and 97.5th percentiles of the draws (NaN left out, clipped to [0, 100]); None if none."""
    ok = percent[~np.isnan(percent)]
    if not len(ok):
        return None
    lo, hi = np.percentile(np.clip(ok, 0.0, 100.0), [2.5, 97.5])  # V <= B per draw; clip rounding
    return float(lo), float(hi)


def eortc_tier(viable_percent: float | None, ci95: tuple[float, float] | None = None) -> EortcScore:
    """EORTC-STBSG tier of a specimen viable % (0–100) and whether it lies near a cut-off."""
    if viable_percent is None:
        return EortcScore(tier=None, near_cutoff=None, reason="empty tumor bed: no viable %, necrosis or fibrosis found")
    tier = _tier(viable_percent)
    if ci95 is None:
        return EortcScore(tier=tier, near_cutoff=None, reason="no confidence interval")
    tiers = {tier, _tier(ci95[0]), _tier(ci95[1])}
    return EortcScore(tier=tier, near_cutoff=len(tiers) > 1)


def _tier(percent: float) -> str:
    if not 0.0 <= percent <= 100.0:
        raise ValueError(f"viable percent {percent!r} is outside [0, 100]")
    if percent == 0.0:
        return "A"
    for tier, cutoff in zip("BCD", EORTC_CUTOFFS_PERCENT):
        if percent < cutoff:
            return tier
    return "E"


def _canonical_probs(probs: np.ndarray, class_names: tuple[str, ...]) -> np.ndarray:
    """(N, len(CLASSES)) float32 probabilities in CLASSES order (absent classes get 0)."""
    unknown = [n for n in class_names if n not in CLASSES]
    if unknown:
        raise ValueError(f"unknown class ids {unknown}; expected some of {list(CLASSES)}")
    if class_names == CLASSES:
        return probs.astype(np.float32, copy=False)
    out = np.zeros((len(probs), len(CLASSES)), np.float32)
    out[:, [CLASSES.index(n) for n in class_names]] = probs
    return out
