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
    probs[10:] = [0.7, 0.1, 0.1, 0.1]
    resumed.write_chunks([0, 2], probs)  # one write spans chunk 1, still not done
    assert resumed.done.tolist() == [True, False, True]
    assert np.isnan(resumed.chunk_probs(1)).all()
    probs[5:10] = [0.0, 0.0, 0.0, 1.0]
    resumed.write_chunks([1], probs)
    assert resumed.finalize() == path and path.is_dir() and not (tmp_path / "tiles.zarr.partial").exists()
    stored = read_tile_store(path)
    preds, attrs = stored.predictions, stored.metadata
    assert preds.probs.shape == (15, 4) and attrs["complete"] is True and attrs["model_sha256"] == "abc"
    np.testing.assert_array_equal(preds.probs, probs)

    again = open_tile_store(path, META, grid)
    assert again.complete and again.done.all()

    stale = open_tile_store(path, {**META, "model_sha256": "other"}, grid)  # other model: recomputed
    assert not stale.complete and not stale.done.any() and not path.exists()


def test_subcells_fill_resume_and_read_back(tmp_path):
    grid, path = _Grid(subcells=2), tmp_path / "tiles.zarr"
    meta = {**META, "refine": "dense", "subcells": 2}
    store = open_tile_store(path, meta, grid)
    probs = np.full((15, 4), np.nan, np.float32)
    sub = np.full((15, 4, 4), np.nan, np.float32)
    rng = np.random.default_rng(0)
    raw = rng.random((5, 4, 4)).astype(np.float32)
    probs[:5], sub[:5] = 0.25, raw / raw.sum(axis=2, keepdims=True)
    store.write_chunks([0], probs, sub)

    resumed = open_tile_store(path, meta, grid)  # resumes with the sub-cells of chunk 0
    assert resumed.done.tolist() == [True, False, False]
    np.testing.assert_array_equal(resumed.subcell_probs()[:5], sub[:5])
    assert np.isnan(resumed.subcell_probs()[5:]).all()
    probs[5:], sub[5:] = 0.25, [0.1, 0.2, 0.3, 0.4]
    resumed.write_chunks([1, 2], probs, sub)
    resumed.finalize()
    stored = read_tile_store(path)
    np.testing.assert_array_equal(stored.predictions.subcell_probs, sub)
    np.testing.assert_array_equal(stored.subcell_tissue_fraction, grid.subcell_fraction.reshape(15, 4))
    assert stored.subcell_tissue_fraction.shape == (15, 4) and stored.predictions.probs.shape == (15, 4)


def test_store_without_subcells_has_none(tmp_path):
    grid, path = _Grid(), tmp_path / "tiles.zarr"
    store = open_tile_store(path, META, grid)
    store.write_chunks([0, 1, 2], np.full((15, 4), 0.25, np.float32))
    store.finalize()
    stored = read_tile_store(path)
    assert stored.predictions.subcell_probs is None and stored.subcell_tissue_fraction is None


# --------------------------------------------------------------------------- damaged stores

import json  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402

from wsi_response.store import TileStoreError  # noqa: E402

BIG = dict(n_chunks=4, per_chunk=4096)  # 16384 rows: two zarr chunks of probs (8192 rows each)


def _probs(n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    p = rng.random((n, 4)).astype(np.float32)
    return p / p.sum(axis=1, keepdims=True)


def _complete_store(path, grid):
    probs = _probs(len(grid))
    store = open_tile_store(path, META, grid)
    store.write_chunks(list(range(grid.n_chunks)), probs)
    store.finalize()
    return probs


def _truncate(file):
    file.write_bytes(file.read_bytes()[:10])


def _corrupt_json(file):
    file.write_text('{"zarr_format": 3, "node_type": "arr', encoding="utf-8")


def _wrong_shape(path):
    import zarr

    group = zarr.open_group(str(path), mode="r+")
    del group["tissue_fraction"]
    group.create_array("tissue_fraction", data=np.ones(100, np.float32))


# (damage, message after "<store>: tile store is damaged: ", grid chunks kept when resumed)
DAMAGES = {
    "probs chunk file deleted": (lambda p: (p / "probs" / "c" / "1" / "0").unlink(),
                                 "2 chunks flagged done have missing or invalid probabilities (first: chunk 2)",
                                 [True, True, False, False]),
    "probs chunk file truncated": (lambda p: _truncate(p / "probs" / "c" / "0" / "0"),
                                   "array probs has an unreadable chunk file at row 0 (RuntimeError) "
                                   "(and 1 more)", [False, False, True, True]),
    "chunk_done chunk file deleted": (lambda p: (p / "chunk_done" / "c" / "0").unlink(),
                                      "incomplete (0 of 4 chunks done)", [False] * 4),
    "probs zarr.json corrupt": (lambda p: _corrupt_json(p / "probs" / "zarr.json"),
                                "array probs is missing or unreadable (JSONDecodeError) (and 1 more)", [False] * 4),
    "probs array deleted": (lambda p: shutil.rmtree(p / "probs"),
                            "array probs is missing or unreadable (KeyError) (and 1 more)", [False] * 4),
    "group zarr.json corrupt": (lambda p: _corrupt_json(p / "zarr.json"),
                                "its metadata is unreadable or not of a tile store", None),
    "metadata inconsistent": (lambda p: (p / "zarr.json").write_text(json.dumps(
                                  {**json.loads((p / "zarr.json").read_text()), "attributes": {
                                      **json.loads((p / "zarr.json").read_text())["attributes"], "n_tiles": 7}})),
                              "array cols_rows is int32 (16384, 2), expected int32 (7, 2) (and 4 more)", None),
    "array of the wrong shape": (_wrong_shape, "array tissue_fraction is float32 (100,), expected float32 (16384,)",
                                 [True] * 4),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_store_is_named_then_rebuilt_from_its_intact_chunks(tmp_path, damage):
    grid, path = _Grid(**BIG), tmp_path / "tiles.zarr"
    probs = _complete_store(path, grid)
    harm, message, kept = DAMAGES[damage]
    harm(path)

    with pytest.raises(TileStoreError) as caught:
        read_tile_store(path)
    text = str(caught.value)
    assert text == f"{path}: tile store is damaged: {message} (the next run or batch redoes the slide)"
    assert "\n" not in text

    store = open_tile_store(path, META, grid)  # what is intact is kept, the rest is recomputed
    assert not path.exists() and not store.complete
    assert store.done.tolist() == (kept if kept is not None else [False] * 4)
    done_rows = np.repeat(store.done, np.diff(grid.chunk_starts))
    np.testing.assert_array_equal(store.probs()[done_rows], probs[done_rows])
    assert np.isnan(store.probs()[~done_rows]).all()
    store.write_chunks(np.flatnonzero(~store.done), probs)
    store.finalize()
    np.testing.assert_array_equal(read_tile_store(path).predictions.probs, probs)


def test_leftover_partial_beside_a_complete_store_is_removed(tmp_path):
    grid, path = _Grid(), tmp_path / "tiles.zarr"
    probs = _complete_store(path, grid)
    leftover = tmp_path / "tiles.zarr.partial"
    shutil.copytree(path, leftover)
    store = open_tile_store(path, META, grid)
    assert store.complete and not leftover.exists()
    np.testing.assert_array_equal(store.probs(), probs)


def test_missing_store_is_named(tmp_path):
    with pytest.raises(TileStoreError, match=r"tiles\.zarr: tile store is missing \(the next run or batch redoes"):
        read_tile_store(tmp_path / "tiles.zarr")
