"""Calibration (temperature, reliability, confusion block) and the validated-error interval, by simulation."""
from __future__ import annotations

import numpy as np
import pytest

from wsi_response.calibration import calibrate, fit_temperature, reliability, softmax, validation_error
from wsi_response.classes import CLASSES
from wsi_response.model_error import (block_ids, confusion_draws, corrected_areas, error_groups, slide_concentration,
                                      true_shares)
from wsi_response.quantify import specimen_areas, slide_areas_from_tiles, viable_percent_ci95

V, N, F, O = range(4)
# P(pred k | true t), rows true: fibrosis is often called viable (a bias that inflates viable %)
RATES = np.array([[0.92, 0.03, 0.03, 0.02],
                  [0.04, 0.90, 0.04, 0.02],
                  [0.10, 0.02, 0.84, 0.04],
                  [0.01, 0.02, 0.05, 0.92]])
SIDE, PATCH, CELL_MM2 = 30, 5, 0.01  # a 3 x 3 mm specimen of 0.1 mm cells, regions of 0.5 mm


def simulated_specimen(rng: np.random.Generator, viable: float):
    """True labels in 0.5 mm patches, predicted labels drawn per tile through RATES, and validation
    counts of 3 slides of 50 tiles per class drawn through RATES:
    (true (n,), predicted (n,), cols_rows, per-slide counts (3, 4, 4))."""
    rest = 1.0 - viable
    coarse = rng.choice(4, size=(SIDE // PATCH,) * 2, p=[viable, 0.4 * rest, 0.4 * rest, 0.2 * rest])
    true = np.kron(coarse, np.ones((PATCH, PATCH), np.int64)).ravel()
    cum = RATES.cumsum(axis=1)[true]
    pred = (rng.random(len(true))[:, None] > cum).sum(axis=1)
    rows, cols = np.divmod(np.arange(SIDE * SIDE), SIDE)
    per_slide = np.stack([[rng.multinomial(50, RATES[t]) for t in range(4)] for _ in range(3)])
    return true, pred, np.stack([cols, rows], axis=1), per_slide


def block(per_slide: np.ndarray) -> dict:
    """The checkpoint's validation block of per-slide counts (3 slides, 50 tiles per class each)."""
    return {"confusion_matrix": per_slide.sum(axis=0).tolist(), "per_slide": per_slide.tolist()}


def percent(labels: np.ndarray) -> float:
    return 100.0 * float((labels == V).sum()) / float(np.isin(labels, [V, N, F]).sum())


def test_temperature_fitting_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(20000, 4))
    probs = softmax(logits, 2.5)
    labels = (rng.random(len(logits))[:, None] > probs.cumsum(axis=1)).sum(axis=1)
    assert fit_temperature(logits, labels) == pytest.approx(2.5, rel=0.04)
    temperature, counts, report = calibrate(logits, labels, np.arange(20000) % 3)
    assert report["after"]["ece"] < 0.02 < report["before"]["ece"]
    assert report["after"]["nll"] < report["before"]["nll"]
    assert sum(b["n"] for b in report["after"]["bins"]) == 20000 and len(report["after"]["bins"]) == 10
    assert counts["n_slides"] == 3 and counts["n_tiles"] == 20000 and len(counts["per_slide"]) == 3
    assert np.asarray(counts["confusion_matrix"]).sum(axis=1).tolist() == list(counts["n_per_class"].values())
    assert np.sum(counts["per_slide"], axis=0).tolist() == counts["confusion_matrix"]


def test_reliability_and_confusion_block_by_hand():
    probs = np.array([[0.95, 0.05, 0, 0], [0.55, 0.45, 0, 0], [0.3, 0.7, 0, 0]])
    rel = reliability(probs, np.array([0, 1, 1]))
    top = rel["bins"][9]
    assert (top["n"], top["confidence"], top["accuracy"]) == (1, 0.95, 1.0)
    assert rel["ece"] == pytest.approx((0.05 + 0.55 + 0.3) / 3)
    counts = validation_error(np.array([0, 0, 2, 3]), np.array([0, 1, 0, 3]), np.array([4, 7, 7, 7]))
    assert counts["confusion_matrix"] == [[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]]
    assert counts["per_slide"][0] == [[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert counts["n_per_class"] == {"viable_tumor": 2, "necrosis": 0, "fibrosis": 1, "other": 1}
    assert counts["n_slides"] == 2


def test_true_shares_invert_a_known_mixture():
    rates = np.array([[0.9, 0.1], [0.2, 0.8]])
    predicted = np.array([0.3, 0.7]) @ rates
    assert true_shares(predicted, rates) == pytest.approx([0.3, 0.7], abs=1e-6)


def test_blocks_are_one_mm_squares():
    cols_rows = np.array([[0, 0], [9, 9], [10, 0], [0, 10], [25, 25]])
    assert block_ids(cols_rows, 0.01).tolist() == [0, 0, 2, 1, 3]  # 0.1 mm cells: 10 per block side


def specimen(pred: np.ndarray, cols_rows: np.ndarray, confidence: float = 0.9):
    """Slide areas of predicted labels with ``confidence`` on the argmax class."""
    probs = np.where(np.eye(4)[pred] > 0, confidence, (1 - confidence) / 3).astype(np.float32)
    return slide_areas_from_tiles(probs, CLASSES, np.ones(len(pred), np.float32), CELL_MM2, cols_rows=cols_rows)


def test_correction_and_interval_move_against_the_known_bias():
    rng = np.random.default_rng(1)
    true, pred, cols_rows, per_slide = simulated_specimen(rng, viable=0.2)
    counts = per_slide.sum(axis=0)
    truth, measured = percent(true), percent(pred)
    assert measured > truth + 3  # fibrosis called viable inflates the measured viable %
    corrected = corrected_areas(np.bincount(pred, minlength=4) * CELL_MM2, counts)
    assert abs(100 * corrected[V] / corrected[:3].sum() - truth) < 0.6 * (measured - truth)
    tau = slide_concentration(block(per_slide))
    assert tau == pytest.approx(99.0)  # homogeneous slides: rho at its floor 0.01
    draws = confusion_draws([error_groups(pred, np.full(len(pred), CELL_MM2), block_ids(cols_rows, CELL_MM2))], counts, tau)
    assert draws.shape == (1000,) and not np.isnan(draws).any()
    result = specimen_areas([specimen(pred, cols_rows)], validation_error=block(per_slide))
    lo, hi = result.viable_percent_ci95
    assert result.viable_percent == pytest.approx(measured)
    assert lo <= truth <= hi and (lo + hi) / 2 < measured - 2  # centred below the inflated measurement
    plo, phi = specimen_areas([specimen(pred, cols_rows)]).viable_percent_ci95
    assert phi - plo < hi - lo and not plo <= truth <= phi  # the tile probabilities alone miss the truth


def test_interval_covers_the_truth_in_200_simulated_specimens():
    rng = np.random.default_rng(2)
    covered, widths, covered_probs = 0, [], 0
    for i in range(200):
        true, pred, cols_rows, per_slide = simulated_specimen(rng, viable=rng.uniform(0.0, 0.8))
        truth, slide = percent(true), specimen(pred, cols_rows)
        lo, hi = specimen_areas([slide], seed=i, draws=200, validation_error=block(per_slide)).viable_percent_ci95
        covered += lo <= truth <= hi
        widths.append(hi - lo)
        plo, phi = specimen_areas([slide], seed=i, draws=200).viable_percent_ci95
        covered_probs += plo <= truth <= phi
    assert covered / 200 >= 0.9, covered
    assert 4.0 < float(np.median(widths)) <= 14.0, np.median(widths)  # 13.4 pp: 900 tiles, 9 blocks, 88-92 % right
    assert covered_probs / 200 < 0.6  # the tile-probability interval misses the systematic error


def test_specimen_areas_methods():
    rng = np.random.default_rng(3)
    _, pred, cols_rows, per_slide = simulated_specimen(rng, viable=0.3)
    probs = np.eye(4, dtype=np.float32)[pred]
    slide = slide_areas_from_tiles(probs, CLASSES, np.ones(len(pred), np.float32), CELL_MM2, cols_rows=cols_rows)
    plain = specimen_areas([slide]).to_dict()
    assert plain["viable_percent_ci95_method"] == "tile_probabilities_only"
    assert plain["viable_percent_corrected"] is None
    validated = specimen_areas([slide], validation_error=block(per_slide)).to_dict()
    assert validated["viable_percent_ci95_method"] == "validated_confusion"
    assert validated["viable_percent"] == plain["viable_percent"]  # the measured areas stay the overlay's
    assert validated["viable_percent_corrected"] < validated["viable_percent"]
    lo, hi = validated["viable_percent_ci95"]
    assert lo <= validated["viable_percent_corrected"] <= hi and hi - lo > 2.0


def test_slide_concentration_from_per_slide_counts():
    # viable tumour right in 45/50, 25/50 and 40/50 of three slides: rho by one-way ANOVA
    per_slide = np.zeros((3, 4, 4))
    per_slide[:, V, V], per_slide[:, V, N] = [45, 25, 40], [5, 25, 10]
    p, n = np.array([0.9, 0.5, 0.8]), 50
    between = n * ((p - p.mean()) ** 2).sum() / 2
    within = n * (p * (1 - p)).sum() / 147
    rho = (between - within) / (between + 49 * within)
    assert slide_concentration({"per_slide": per_slide.tolist()}) == pytest.approx(1 / rho - 1)
    assert slide_concentration({"confusion_matrix": per_slide.sum(axis=0).tolist()}) == pytest.approx(9.0)  # 1 / 0.1 - 1


def test_validated_interval_is_drawn_around_the_sub_cell_areas_it_reports():
    """Tiles called fibrosis whose 3 x 3 sub-cells are mostly viable (a border the sub-cells
    resolve): the interval must be drawn from the sub-cells' areas, as the corrected estimate is."""
    rng = np.random.default_rng(4)
    _, pred, cols_rows, per_slide = simulated_specimen(rng, viable=0.1)
    n, kk = len(pred), 9
    probs = np.eye(4, dtype=np.float32)[pred]
    sub = np.repeat(probs[:, None, :], kk, axis=1)
    flip = np.flatnonzero(pred == F)[: (pred == F).sum() // 2]
    sub[flip, :6] = np.eye(4, dtype=np.float32)[V]  # 6 of 9 sub-cells of half the fibrosis tiles: viable
    slide = slide_areas_from_tiles(probs, CLASSES, np.ones(n, np.float32), CELL_MM2, sub,
                                   np.ones((n, kk), np.float32), cols_rows=cols_rows)
    tile_level = specimen_areas([specimen(pred, cols_rows)], validation_error=block(per_slide))
    result = specimen_areas([slide], validation_error=block(per_slide))
    assert result.viable_percent > tile_level.viable_percent + 5  # the sub-cells moved the areas
    lo, hi = result.viable_percent_ci95
    assert lo <= result.viable_percent_corrected <= hi
    assert abs((lo + hi) / 2 - result.viable_percent_corrected) < 0.25 * (hi - lo)
    assert not tile_level.viable_percent_ci95[0] <= result.viable_percent_corrected <= tile_level.viable_percent_ci95[1]
    assert slide.error_groups.tiles.sum() == pytest.approx(n)  # sub-cells count 1/9 tile each
