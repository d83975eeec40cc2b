"""The zarr tile store: create, fill, finalize, resume, reject stale metadata."""
from __future__ import annotations

import numpy as np

from wsi_response.store import open_tile_store, read_tile_store


class _Grid:  # the attributes the store reads from a TileGrid
    def __init__(self, n_chunks: int = 3, per_chunk: int = 5, subcells: int = 1) -> None:
        self.chunk_starts = np.arange(n_chunks + 1, dtype=np.int64) * per_chunk
        n = n_chunks * per_chunk
        self.cols_rows = np.stack([np.arange(n), np.zeros(n)], 1).astype(np.int32)
        self.origins_l0 = self.cols_rows * 10.0
        self.tissue_fraction = np.ones(n, np.float32)
        self.n_chunks = n_chunks
        self.subcells = subcells
        self.subcell_fraction = (None if subcells == 1 else
                                 np.arange(n * subcells ** 2, dtype=np.float32).reshape(n, subcells, subcells) / 100)

    def __len__(self) -> int:
        return len(self.cols_rows)


META = {"model_sha256": "abc", "class_names": ["a", "b", "c", "d"], "tile_px": 224}


def test_fill_resume_finalize_and_stale(tmp_path):
    grid, path = _Grid(), tmp_path / "tiles.zarr"
    store = open_tile_store(path, META, grid)
    assert not store.complete and not store.done.any()
    probs = np.full((15, 4), np.nan, np.float32)
    probs[:5] = 0.25
    store.write_chunks([0], probs)
    assert (tmp_path / "tiles.zarr.partial").is_dir() and not path.exists()

    resumed = open_tile_store(path, META, grid)  # same metadata: resumes
    assert resumed.done.tolist() == [True, False, False]
    np.testing.assert_array_equal(resumed.chunk_probs(0), probs[:5])
    probs[10:] = 2.0
    resumed.write_chunks([0, 2], probs)  # one write spans chunk 1, still not done
    assert resumed.done.tolist() == [True, False, True]
    assert np.isnan(resumed.chunk_probs(1)).all()
    probs[5:10] = 1.0
    resumed.write_chunks([1], probs)
    assert resumed.finalize() == path and path.is_dir() and not (tmp_path / "tiles.zarr.partial").exists()
    stored = read_tile_store(path)
    preds, attrs = stored.predictions, stored.metadata
    assert preds.probs.shape == (15, 4) and attrs["complete"] is True and attrs["model_sha256"] == "abc"
    np.testing.assert_array_equal(preds.probs[10:], 2.0)

    again = open_tile_store(path, META, grid)
    assert again.complete and again.done.all()

    stale = open_tile_store(path, {**META, "model_sha256": "other"}, grid)  # other model: recomputed
    assert not stale.complete and not stale.done.any() and not path.exists()


def test_subcells_fill_resume_and_read_back(tmp_path):
    grid, path = _Grid(subcells=2), tmp_path / "tiles.zarr"
    store = open_tile_store(path, META, grid)
    probs = np.full((15, 4), np.nan, np.float32)
    sub = np.full((15, 4, 4), np.nan, np.float32)
    probs[:5], sub[:5] = 0.25, np.arange(80, dtype=np.float32).reshape(5, 4, 4)
    store.write_chunks([0], probs, sub)

    resumed = open_tile_store(path, META, grid)  # resumes with the sub-cells of chunk 0
    assert resumed.done.tolist() == [True, False, False]
    np.testing.assert_array_equal(resumed.subcell_probs()[:5], sub[:5])
    assert np.isnan(resumed.subcell_probs()[5:]).all()
    probs[5:], sub[5:] = 0.5, 7.0
    resumed.write_chunks([1, 2], probs, sub)
    resumed.finalize()
    stored = read_tile_store(path)
    np.testing.assert_array_equal(stored.predictions.subcell_probs, sub)
    np.testing.assert_array_equal(stored.subcell_tissue_fraction, grid.subcell_fraction.reshape(15, 4))
    assert stored.subcell_tissue_fraction.shape == (15, 4) and stored.predictions.probs.shape == (15, 4)


def test_store_without_subcells_has_none(tmp_path):
    grid, path = _Grid(), tmp_path / "tiles.zarr"
    store = open_tile_store(path, META, grid)
    store.write_chunks([0, 1, 2], np.ones((15, 4), np.float32))
    store.finalize()
    stored = read_tile_store(path)
    assert stored.predictions.subcell_probs is None and stored.subcell_tissue_fraction is None
