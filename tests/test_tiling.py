"""Tile grid geometry, tissue-fraction bookkeeping and the chunked tile reader."""
from __future__ import annotations

import multiprocessing as mp
import pickle

import numpy as np
import openslide
import pytest
from PIL import Image

from wsi_response.config import TilingConfig
from wsi_response.slide import open_slide
from wsi_response.tiling import TileReader, resample_tile, tile_grid
from wsi_response.tissue import detect_tissue


@pytest.fixture(scope="module")
def synth_slide_and_mask(synth_specimen_small):
    slide = open_slide(synth_specimen_small.slides[0].slide_path)
    return slide, detect_tissue(slide)


def test_read_level_is_nearest_below_target(synth_slide_and_mask):
    slide, mask = synth_slide_and_mask
    grid = tile_grid(slide, mask, TilingConfig(target_mpp=1.0))
    assert grid.read_level == 1 and grid.level_downsample == pytest.approx(4.0)
    assert grid.level_tile_px == 224 and grid.level_scale == pytest.approx(1.0)
    grid = tile_grid(slide, mask, TilingConfig(target_mpp=0.5, tile_px=256, stride_px=256))
    assert grid.read_level == 0 and grid.level_tile_px == 512


@pytest.mark.parametrize("tile_px, stride_px", [(224, 224), (256, 128), (224, 112)])
def test_tissue_fraction_sums_to_tissue_area(synth_slide_and_mask, tile_px, stride_px):
    slide, mask = synth_slide_and_mask
    exact = tile_grid(slide, mask, TilingConfig(tile_px=tile_px, stride_px=stride_px, min_tissue_fraction=0.0))
    assert exact.tissue_area_mm2 == pytest.approx(mask.area_mm2, rel=1e-6)
    default = tile_grid(slide, mask, TilingConfig(tile_px=tile_px, stride_px=stride_px))
    assert default.tissue_area_mm2 == pytest.approx(mask.area_mm2, rel=0.01)
    assert len(default) < len(exact)
    assert default.tissue_fraction.min() >= TilingConfig().min_tissue_fraction
    # cells partition the plane: no duplicate cell, tiles centred on their cells
    assert len(np.unique(default.cols_rows, axis=0)) == len(default)
    centre_tile = default.origins_l0 + default.size_l0 / 2
    centre_cell = default.cell_origins_l0 + default.stride_l0 / 2
    assert np.abs(centre_tile - centre_cell).max() <= default.downsample


def test_chunks_are_contiguous_blocks(synth_slide_and_mask):
    slide, mask = synth_slide_and_mask
    grid = tile_grid(slide, mask, TilingConfig(read_region_px=672))
    assert grid.chunk_cells == 3
    assert grid.chunk_starts[0] == 0 and grid.chunk_starts[-1] == len(grid)
    for k in range(grid.n_chunks):
        block = grid.cols_rows[grid.chunk_starts[k]:grid.chunk_starts[k + 1]] // grid.chunk_cells
        assert (block == block[0]).all()


def _openslide_tiles(path, grid, indices):
    """Reference: one plain OpenSlide read_region per tile, resized to tile_px."""
    osr = openslide.OpenSlide(str(path))
    ds = osr.level_downsamples[grid.read_level]
    out = []
    for x, y in grid.level_origins()[indices]:
        rgba = osr.read_region((int(round(x * ds)), int(round(y * ds))), grid.read_level,
                               (grid.level_tile_px, grid.level_tile_px))
        tile = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        out.append(resample_tile(np.asarray(tile), grid.tile_px))
    return np.stack(out)


def test_reader_matches_openslide_on_synthetic_slide(synth_slide_and_mask):
    slide, mask = synth_slide_and_mask
    grid = tile_grid(slide, mask, TilingConfig())
    reader = TileReader(slide, grid)
    assert reader.backend.startswith("jpeg-tiles")
    tiles = np.concatenate([t for _, t in reader.iter_chunks()])
    assert tiles.shape == (len(grid), 224, 224, 3)
    sample = np.linspace(0, len(grid) - 1, 25).astype(int)
    ref = _openslide_tiles(slide.path, grid, sample)
    assert np.abs(tiles[sample].astype(int) - ref).mean() <= 1.0


def test_reader_matches_openslide_with_resampling(cmu_slide_path):
    slide = open_slide(cmu_slide_path)
    grid = tile_grid(slide, detect_tissue(slide), TilingConfig(target_mpp=1.0))
    assert grid.read_level == 0 and grid.level_tile_px == round(224 * 1.0 / 0.499)
    tiles = np.concatenate([t for _, t in TileReader(slide, grid).iter_chunks()])
    ref = _openslide_tiles(slide.path, grid, np.arange(len(grid)))
    assert np.abs(tiles.astype(int) - ref).mean() <= 1.0


def _read_chunk_in_worker(args):
    reader, k = args
    return reader.read_chunk(k)


def test_reader_works_in_worker_processes(synth_slide_and_mask):
    slide, mask = synth_slide_and_mask
    grid = tile_grid(slide, mask, TilingConfig(read_region_px=672))
    reader = TileReader(slide, grid)
    pickle.loads(pickle.dumps(reader))
    with mp.get_context("spawn").Pool(2) as pool:
        results = pool.map(_read_chunk_in_worker, [(reader, k) for k in range(min(4, grid.n_chunks))])
    for k, (indices, tiles) in enumerate(results):
        local_indices, local_tiles = reader.read_chunk(k)
        assert np.array_equal(indices, local_indices) and np.array_equal(tiles, local_tiles)


def test_half_resolution_tiles_use_reduced_jpeg_decode(synth_slide_and_mask):
    slide, mask = synth_slide_and_mask
    grid = tile_grid(slide, mask, TilingConfig(target_mpp=0.5, tile_px=224, stride_px=224))
    assert grid.read_level == 0 and grid.level_scale == pytest.approx(2.0)
    reader = TileReader(slide, grid)
    assert reader.reduce == 2 and "half-size DCT" in reader.backend
    indices = np.linspace(0, len(grid) - 1, 12).astype(int)
    chunks = sorted({int(np.searchsorted(grid.chunk_starts, i, side="right") - 1) for i in indices})
    got = {int(i): t for k in chunks for i, t in zip(*reader.read_chunk(k))}
    ref = _openslide_tiles(slide.path, grid, indices)
    assert np.abs(np.stack([got[int(i)] for i in indices]).astype(int) - ref).mean() <= 1.0
    clone = pickle.loads(pickle.dumps(reader))
    assert clone.reduce == 2 and np.array_equal(clone.read_tiles(indices[:2]), reader.read_tiles(indices[:2]))


@pytest.mark.parametrize("shape,step,cells", [((100, 130), 7, (15, 19)), ((100, 130), 7, (10, 12)),
                                              ((168, 224), 56, (3, 4)), ((37, 41), 8, (6, 6))])
def test_whole_px_boxes_equal_the_integral_image(shape, step, cells):
    """Whole-px cells (the default grid on a 4 µm/px mask: 56 px) take block sums; they must equal
    the exact integral-image means, with cells past the image edge counting it as empty."""
    from wsi_response.tiling import _box_means, _box_means_integral

    rng = np.random.default_rng(step)
    ys, xs = (np.arange(n + 1) * float(step) for n in cells)
    for image in (rng.random(shape) > 0.5, rng.random(shape).astype(np.float32)):
        np.testing.assert_allclose(_box_means(image, float(step), *cells), _box_means_integral(image, xs, ys),
                                   atol=1e-9)
