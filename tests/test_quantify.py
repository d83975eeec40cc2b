"""Areas, specimen aggregation, the Monte Carlo interval and EORTC tiers, by hand-computed cases."""
from __future__ import annotations

import numpy as np
import pytest

from wsi_response.classes import CLASSES
from wsi_response.quantify import (
    EortcScore,
    eortc_tier,
    slide_areas,
    specimen_areas,
    viable_percent_ci95,
)
from wsi_response.store import TilePredictions
from wsi_response.tiling import TileGrid

V, N, F, O = range(4)


def make_grid(fractions, stride_px=100, tile_px=100, read_mpp=1.0) -> TileGrid:
    n = len(fractions)
    return TileGrid(
        cols_rows=np.stack([np.arange(n), np.zeros(n)], axis=1).astype(np.int32),
        tissue_fraction=np.asarray(fractions, np.float32),
        chunk_starts=np.array([0, n], np.int64), tile_px=tile_px, stride_px=stride_px,
        read_mpp=read_mpp, slide_mpp=0.5, read_level=0, level_downsample=1.0, chunk_cells=8)


def one_hot(labels, confidence=1.0) -> np.ndarray:
    probs = np.full((len(labels), 4), (1.0 - confidence) / 3, np.float32)
    probs[np.arange(len(labels)), labels] = confidence
    return probs


def slide(fractions, labels, confidence=1.0, **grid_kw):
    return slide_areas(make_grid(fractions, **grid_kw), TilePredictions(one_hot(labels, confidence), CLASSES))


def test_three_tiles_exact_areas_and_percentages() -> None:
    # cells of 100 px at 1 µm/px: 0.01 mm² each; stride < tile must not change the cell area
    s = slide([1.0, 0.5, 0.25], [V, N, O], stride_px=100, tile_px=224)
    assert s.areas_mm2.tolist() == pytest.approx([0.01, 0.005, 0.0, 0.0025])
    assert s.tissue_area_mm2 == pytest.approx(0.0175)
    assert s.tumor_bed_area_mm2 == pytest.approx(0.015)
    assert s.viable_percent == pytest.approx(100 * 0.01 / 0.015)
    assert s.necrosis_percent == pytest.approx(100 * 0.005 / 0.015)
    assert s.fibrosis_percent == 0.0
    d = s.to_dict()
    assert d["areas_mm2"] == pytest.approx({"viable_tumor": 0.01, "necrosis": 0.005, "fibrosis": 0.0, "other": 0.0025})
    assert set(d) == {"areas_mm2", "tissue_area_mm2", "tumor_bed_area_mm2",
                      "viable_percent", "necrosis_percent", "fibrosis_percent"}


def test_class_columns_are_mapped_by_name() -> None:
    probs = np.array([[0.9, 0.1], [0.2, 0.8]], np.float32)  # columns: other, viable_tumor
    s = slide_areas(make_grid([1.0, 1.0]), TilePredictions(probs, ("other", "viable_tumor")))
    assert s.areas_mm2.tolist() == pytest.approx([0.01, 0.0, 0.0, 0.01])
    with pytest.raises(ValueError, match="unknown class"):
        slide_areas(make_grid([1.0]), TilePredictions(np.ones((1, 1), np.float32), ("tumour",)))


def test_specimen_sums_areas_not_percentages() -> None:
    big = slide([1.0] * 9 + [1.0], [V] * 1 + [N] * 9)   # 10 % viable of 0.10 mm²
    small = slide([1.0], [V])                              # 100 % viable of 0.01 mm²
    spec = specimen_areas([big, small])
    assert spec.viable_percent == pytest.approx(100 * 0.02 / 0.11)   # 18.18 %, tier D
    assert (big.viable_percent + small.viable_percent) / 2 == pytest.approx(55.0)  # averaging: E
    assert spec.eortc.tier == "D"
    assert spec.tissue_area_mm2 == pytest.approx(0.11)
    d = spec.to_dict()
    assert d["viable_percent_ci95"] == pytest.approx([100 * 0.02 / 0.11] * 2)  # confident tiles
    assert d["eortc"]["tier"] == "D" and "near_cutoff" in d["eortc"]


@pytest.mark.parametrize("percent, tier", [
    (0.0, "A"), (1e-12, "B"), (0.999, "B"), (1.0, "C"), (9.999, "C"), (10.0, "D"),
    (49.999, "D"), (50.0, "E"), (100.0, "E"),
])
def test_eortc_boundaries(percent: float, tier: str) -> None:
    assert eortc_tier(percent, (percent, percent)) == EortcScore(tier, False)


def test_eortc_near_cutoff() -> None:
    assert eortc_tier(9.5, (9.0, 10.0)).near_cutoff is True      # upper end reaches 10 % (tier D)
    assert eortc_tier(9.5, (9.0, 9.99)).near_cutoff is False
    assert eortc_tier(0.0, (0.0, 0.2)).near_cutoff is True       # A vs B
    assert eortc_tier(0.5, (0.6, 0.9)).near_cutoff is False      # interval misses the point, same tier
    assert eortc_tier(0.0, (0.3, 0.6)).near_cutoff is True       # point A, interval B
    assert eortc_tier(12.0, None) == EortcScore("D", None, "no confidence interval")
    with pytest.raises(ValueError):
        eortc_tier(100.5, (1.0, 2.0))


def test_empty_bed_has_no_percentages_and_no_tier() -> None:
    s = slide([1.0, 0.5], [O, O])
    assert s.tumor_bed_area_mm2 == 0.0 and s.viable_percent is None and s.fibrosis_percent is None
    spec = specimen_areas([s])
    assert spec.viable_percent is None and spec.viable_percent_ci95 is None
    assert spec.eortc.tier is None and "empty tumor bed" in spec.eortc.reason
    assert specimen_areas([]).eortc.tier is None


def test_ci_covers_narrows_and_is_deterministic() -> None:
    rng = np.random.default_rng(3)

    def tiles(n: int) -> tuple[np.ndarray, np.ndarray]:
        probs = np.zeros((n, 4), np.float32)
        probs[:, V], probs[:, N] = 0.3, 0.7     # expected viable 30 % of the bed
        return probs, rng.uniform(0.5, 1.0, n) * 0.05

    few, many = [tiles(40)], [tiles(2000), tiles(2000)]
    lo_few, hi_few = viable_percent_ci95(few)
    lo_many, hi_many = viable_percent_ci95(many)
    assert lo_few < 30.0 < hi_few and lo_many < 30.0 < hi_many
    assert hi_many - lo_many < 0.3 * (hi_few - lo_few)
    # binomial: sd of the viable share over 4000 equal-ish tiles ~ sqrt(.3*.7/4000) = 0.72 %
    assert 1.5 < hi_many - lo_many < 4.0
    assert viable_percent_ci95(many) == (lo_many, hi_many)
    assert viable_percent_ci95(many, seed=1) != (lo_many, hi_many)


def test_ci_of_confident_tiles_is_the_point_and_empty_draws_are_skipped() -> None:
    probs = one_hot([V, N, N, N])
    assert viable_percent_ci95([(probs, np.ones(4))]) == pytest.approx((25.0, 25.0))
    assert viable_percent_ci95([(one_hot([O, O]), np.ones(2))]) is None
    probs = np.array([[0.5, 0.0, 0.0, 0.5]], np.float32)  # bed empty in about half of the draws
    assert viable_percent_ci95([(probs, np.ones(1))]) == (100.0, 100.0)


def test_areas_from_stored_tile_arrays_equal_areas_from_the_grid() -> None:
    from wsi_response.quantify import slide_areas_from_tiles

    grid = make_grid([1.0, 0.5, 0.25])
    probs = one_hot([V, N, O], confidence=0.9)
    from_grid = slide_areas(grid, TilePredictions(probs, CLASSES))
    stored = slide_areas_from_tiles(probs, CLASSES, grid.tissue_fraction, grid.cell_area_mm2)
    assert np.array_equal(stored.areas_mm2, from_grid.areas_mm2)
    assert np.array_equal(stored.tile_weights_mm2, from_grid.tile_weights_mm2)
    empty = slide_areas_from_tiles(np.zeros((0, 4), np.float32), CLASSES, np.zeros(0, np.float32), 0.01)
    assert empty.tissue_area_mm2 == 0.0 and empty.viable_percent is None
