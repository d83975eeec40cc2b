"""Tissue and class polygons: pixel-exact, valid, and equal in area to the quantified areas."""
from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import shapely
from scipy import ndimage

from wsi_response.classes import CLASSES
from wsi_response.config import TilingConfig
from wsi_response.quantify import slide_areas
from wsi_response.regions import class_regions, subtract_bounds_offset, tissue_polygons
from wsi_response.slide import Level
from wsi_response.store import TilePredictions
from wsi_response.tiling import tile_grid
from wsi_response.tissue import TissueMask


def pixel_union(mask: np.ndarray, ds: float) -> shapely.Geometry:
    rows, cols = np.nonzero(mask)
    return shapely.union_all(shapely.box(cols * ds, rows * ds, (cols + 1) * ds, (rows + 1) * ds))


@pytest.mark.parametrize("seed", range(40))
def test_tissue_polygons_equal_the_union_of_pixels(seed: int) -> None:
    rng = np.random.default_rng(seed)
    mask = rng.random((rng.integers(1, 30), rng.integers(1, 30))) < rng.random()  # saddles galore
    ds = 1.0 + seed % 3 * 0.75
    poly = tissue_polygons(TissueMask(mask=mask, downsample=ds, mpp=ds * 0.25))
    assert poly.geom_type == "MultiPolygon" and shapely.is_valid(poly)
    assert poly.area == mask.sum() * ds * ds
    if mask.any():
        assert shapely.symmetric_difference(poly, pixel_union(mask, ds)).area == 0.0


def test_tissue_polygons_keep_holes_and_islands() -> None:
    mask = np.zeros((12, 12), bool)
    mask[1:11, 1:11] = True
    mask[3:9, 3:9] = False   # lake
    mask[5:7, 5:7] = True    # island in the lake
    mask[2, 2] = False       # pinhole touching nothing
    poly = tissue_polygons(TissueMask(mask=mask, downsample=4.0, mpp=1.0))
    assert len(poly.geoms) == 2 and sum(len(p.interiors) for p in poly.geoms) == 2
    assert poly.area == mask.sum() * 16.0 and shapely.is_valid(poly)
    assert tissue_polygons(TissueMask(np.zeros((3, 4), bool), 2.0, 1.0)).is_empty


def blob_mask(shape: tuple[int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal(shape), 4)
    mask = field > 0.02
    mask[rng.random(shape) < 0.01] = False  # pinholes and ragged edges
    return mask


def fake_slide(dimensions_px: tuple[int, int], mpp: float) -> SimpleNamespace:
    """The attributes tile_grid reads from a Slide (one pyramid level)."""
    return SimpleNamespace(mpp=mpp, dimensions_px=dimensions_px, levels=(Level(dimensions_px, 1.0),),
                           level_for_mpp=lambda target: 0)


@pytest.mark.parametrize("slide_mpp, stride_px, tile_px", [(0.2527, 112, 224), (0.25, 64, 64)])
def test_class_region_areas_match_quantified_areas(slide_mpp: float, stride_px: int, tile_px: int) -> None:
    mask_mpp = 4.0
    mask = TissueMask(mask=blob_mask((300, 400), seed=5), downsample=mask_mpp / slide_mpp, mpp=mask_mpp)
    dims = (int(400 * mask.downsample) - 7, int(300 * mask.downsample) - 3)
    grid = tile_grid(fake_slide(dims, slide_mpp), mask,
                     TilingConfig(target_mpp=1.0, tile_px=tile_px, stride_px=stride_px, min_tissue_fraction=0.02))
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), size=len(grid)).astype(np.float32)
    cols, rows = grid.cols_rows.T
    probs[(cols // 3 + rows // 2) % 4 == 0, 0] = 1.0  # patches of whole cells, so neighbours merge
    predictions = TilePredictions(probs, CLASSES)

    regions = class_regions(grid, predictions.labels, mask)
    areas = slide_areas(grid, predictions)
    assert list(regions) == list(CLASSES)
    for k, name in enumerate(CLASSES):
        region = regions[name]
        assert shapely.is_valid(region) and region.geom_type == "MultiPolygon"
        area_mm2 = region.area * slide_mpp ** 2 / 1e6
        assert area_mm2 == pytest.approx(areas.areas_mm2[k], rel=1e-5)  # contract: 0.5 %
    union = shapely.union_all(list(regions.values()))
    assert union.area == pytest.approx(sum(r.area for r in regions.values()), rel=1e-9)  # disjoint
    outside = shapely.difference(union, tissue_polygons(mask)).area
    assert outside < 1e-6 * union.area


def test_cells_of_one_class_merge_into_one_polygon() -> None:
    mask = TissueMask(mask=np.ones((50, 60), bool), downsample=16.0, mpp=4.0)  # 960 x 800 px
    grid = tile_grid(fake_slide((960, 800), 0.25), mask, TilingConfig(target_mpp=1.0, tile_px=32, stride_px=16))
    assert len(grid) == 15 * 13  # 64 px cells; the last row half outside the slide
    regions = class_regions(grid, np.zeros(len(grid), np.int64), mask)
    viable = regions["viable_tumor"]
    assert len(viable.geoms) == 1 and shapely.get_num_coordinates(viable) == 5
    assert viable.area == 960 * 800 and regions["other"].is_empty


@pytest.mark.parametrize("seed", range(6))
def test_class_regions_of_one_pixel_cells_equal_the_union_of_their_pixels(seed: int) -> None:
    """Cells of exactly one mask pixel, random labels on noisy tissue: diagonal contacts everywhere."""
    rng = np.random.default_rng(seed)
    mask = TissueMask(mask=rng.random((25, 30)) < 0.6, downsample=32.0, mpp=8.0)
    grid = tile_grid(fake_slide((30 * 32, 25 * 32), 0.25), mask, TilingConfig(target_mpp=1.0, tile_px=8, stride_px=8))
    labels = rng.integers(0, 4, len(grid))
    regions = class_regions(grid, labels, mask)
    for k, name in enumerate(CLASSES):
        cols, rows = grid.cols_rows[labels == k].T
        expected = np.zeros(mask.mask.shape, bool)
        expected[rows, cols] = True
        assert shapely.is_valid(regions[name])
        assert shapely.symmetric_difference(regions[name], pixel_union(expected, 32.0)).area == 0.0


def test_class_regions_of_an_empty_grid_and_bad_labels() -> None:
    mask = TissueMask(mask=np.zeros((20, 20), bool), downsample=8.0, mpp=2.0)
    grid = tile_grid(fake_slide((160, 160), 0.25), mask, TilingConfig(target_mpp=1.0, tile_px=32, stride_px=32))
    assert len(grid) == 0
    assert all(r.is_empty for r in class_regions(grid, np.zeros(0, np.int64), mask).values())
    with pytest.raises(ValueError):
        class_regions(grid, np.zeros(3, np.int64), mask)


def test_subtract_bounds_offset() -> None:
    square = shapely.MultiPolygon([shapely.box(100, 200, 110, 220)])
    moved = subtract_bounds_offset(square, (100, 50))
    assert moved.bounds == (0.0, 150.0, 10.0, 170.0) and moved.area == square.area
    assert subtract_bounds_offset(square, (0, 0)) is square


@pytest.mark.parametrize("stride_px, tile_px, subcells", [(112, 224, 7), (64, 64, 7), (224, 224, 4)])
def test_subcell_region_areas_match_quantified_areas(stride_px: int, tile_px: int, subcells: int) -> None:
    """tiling.refine=dense: the overlay draws the sub-cells (fractional ones for 64 / 7 px) and
    their areas are the reported ones."""
    slide_mpp, mask_mpp = 0.2527, 4.0
    mask = TissueMask(mask=blob_mask((300, 400), seed=6), downsample=mask_mpp / slide_mpp, mpp=mask_mpp)
    dims = (int(400 * mask.downsample) - 7, int(300 * mask.downsample) - 3)
    grid = tile_grid(fake_slide(dims, slide_mpp), mask,
                     TilingConfig(tile_px=tile_px, stride_px=stride_px, refine="dense", subcells=subcells))
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(4), size=len(grid)).astype(np.float32)
    sub = rng.dirichlet(np.ones(4), size=(len(grid), subcells ** 2)).astype(np.float32)
    predictions = TilePredictions(probs, CLASSES, sub)
    cells = grid.subcell_grid()
    regions = class_regions(cells, sub.reshape(-1, 4).argmax(axis=1), mask)
    areas = slide_areas(grid, predictions)
    assert grid.subcell_fraction.shape == (len(grid), subcells, subcells)
    np.testing.assert_allclose(grid.subcell_fraction.mean(axis=(1, 2)), grid.tissue_fraction, atol=1e-6)
    assert areas.tissue_area_mm2 == pytest.approx(grid.tissue_area_mm2, rel=1e-6)
    whole = slide_areas(replace(grid, subcell_fraction=None), TilePredictions(probs, CLASSES))
    assert not np.allclose(areas.areas_mm2, whole.areas_mm2)  # the sub-cells' classes count, not the tiles'
    for k, name in enumerate(CLASSES):
        assert shapely.is_valid(regions[name])
        assert regions[name].area * slide_mpp ** 2 / 1e6 == pytest.approx(areas.areas_mm2[k], rel=1e-5)
    union = shapely.union_all(list(regions.values()))
    assert union.area == pytest.approx(sum(r.area for r in regions.values()), rel=1e-9)  # disjoint
