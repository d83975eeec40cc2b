"""Areas at sub-tile resolution (tiling.refine=dense): the oracle's grid error bound, and predict's
sub-cell probabilities through the resumable tile store."""
from __future__ import annotations

import numpy as np
import pytest

from wsi_response.classifier import default_model_path, load_classifier
from wsi_response.config import TilingConfig
from wsi_response.inference import predict
from wsi_response.oracle import oracle_slide_areas
from wsi_response.slide import open_slide
from wsi_response.store import read_tile_store
from wsi_response.synth import synth_slide
from wsi_response.tiling import TileReader, tile_grid
from wsi_response.tissue import detect_tissue

DENSE = TilingConfig(refine="dense", subcells=7)


@pytest.fixture(scope="module")
def truth(tmp_path_factory):
    """A 8000 x 6000 px slide at 0.25 µm/px (2 x 1.5 mm), 30 % viable."""
    return synth_slide(tmp_path_factory.mktemp("subtile") / "s.svs", size_px=(8000, 6000), mpp=0.25, seed=602,
                       viable_fraction=0.3)


def test_oracle_grid_error_of_subcells_is_within_0_3_pp(truth):
    dense = oracle_slide_areas(truth, DENSE)
    whole = oracle_slide_areas(truth, TilingConfig(refine="none"))
    assert abs(dense.viable_percent - truth.viable_percent) <= 0.3
    assert abs(whole.viable_percent - truth.viable_percent) > abs(dense.viable_percent - truth.viable_percent)
    # both schemes count the same tissue (the cells over the true tissue), within float rounding
    assert dense.tissue_area_mm2 == pytest.approx(whole.tissue_area_mm2, rel=1e-6)
    assert dense.tissue_area_mm2 == pytest.approx(truth.tissue_area_mm2, rel=0.01)


def test_subcell_probabilities_resume_from_the_store(truth, tmp_path, monkeypatch):
    slide = open_slide(truth.slide_path)
    cfg = TilingConfig(refine="dense", read_region_px=512)  # one tile per chunk
    grid = tile_grid(slide, detect_tissue(slide), cfg)
    clf = load_classifier(default_model_path(), cfg)
    full = predict(slide, grid, clf, num_workers=0, device="cpu")
    assert full.subcell_probs.shape == (len(grid), 49, 4)
    np.testing.assert_allclose(full.subcell_probs.sum(axis=2), 1.0, atol=1e-5)
    none_grid = tile_grid(slide, detect_tissue(slide), TilingConfig(refine="none", read_region_px=512))
    np.testing.assert_array_equal(none_grid.cols_rows, grid.cols_rows)
    plain = predict(slide, none_grid, clf, num_workers=0, device="cpu")
    np.testing.assert_allclose(full.probs, plain.probs, atol=1e-5)  # the tiles' own classes are unchanged

    store = tmp_path / "tiles.zarr"
    read = []
    original = TileReader.read_chunk

    def stop_after_three(self, k):
        if len(read) == 3:
            raise KeyboardInterrupt
        read.append(k)
        return original(self, k)

    monkeypatch.setattr(TileReader, "read_chunk", stop_after_three)
    with pytest.raises(KeyboardInterrupt):
        predict(slide, grid, clf, batch_size=1, num_workers=0, device="cpu", store=store, store_every_s=0.0)
    import zarr
    done = np.asarray(zarr.open_group(str(tmp_path / "tiles.zarr.partial"), mode="r")["chunk_done"][:]).astype(bool)
    assert 1 <= done.sum() <= 3
    read.clear()
    monkeypatch.setattr(TileReader, "read_chunk", lambda self, k: (read.append(k), original(self, k))[1])
    resumed = predict(slide, grid, clf, num_workers=0, device="cpu", store=store)
    assert sorted(read) == np.flatnonzero(~done).tolist()  # the finished chunks were not recomputed
    np.testing.assert_allclose(resumed.subcell_probs, full.subcell_probs, atol=1e-5)
    stored = read_tile_store(store)
    np.testing.assert_allclose(stored.predictions.subcell_probs, full.subcell_probs, atol=1e-5)
    np.testing.assert_array_equal(stored.subcell_tissue_fraction, grid.subcell_fraction.reshape(len(grid), 49))
    assert stored.metadata["refine"] == "dense" and stored.metadata["subcells"] == 7
    assert stored.metadata["format"] == "wsi-response-tiles/2"

    read.clear()  # the same cells without sub-cells: the store does not match and is recomputed
    predict(slide, none_grid, clf, num_workers=0, device="cpu", store=store)
    assert len(read) == none_grid.n_chunks and read_tile_store(store).predictions.subcell_probs is None
    slide.close()
