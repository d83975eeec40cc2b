"""predict(): equals the in-memory reference, batch/worker invariant, resumes after SIGKILL."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from wsi_response.classifier import default_model_path, load_classifier
from wsi_response.config import TilingConfig, TissueConfig
from wsi_response.errors import ConfigError, ModelError
from wsi_response.inference import predict, resolve_device
from wsi_response.slide import open_slide
from wsi_response.store import read_tile_store
from wsi_response.synth import synth_slide
from wsi_response.stain import grid_stain
from wsi_response.tiling import TileReader, tile_grid
from wsi_response.tissue import detect_tissue, read_overview
from wsi_response.train import predict_tiles

TILING = TilingConfig(read_region_px=512)  # one tile per chunk: many chunks to resume


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    truth = synth_slide(tmp_path_factory.mktemp("inf") / "s.svs", size_px=(4000, 3000), mpp=0.5, seed=5)
    slide = open_slide(truth.slide_path)
    grid = tile_grid(slide, detect_tissue(slide), TILING)
    return truth, slide, grid, load_classifier(default_model_path(), TILING)


def test_predict_matches_reference_and_is_batch_and_worker_invariant(setup):
    _, slide, grid, clf = setup
    assert grid.n_chunks > 10
    a = predict(slide, grid, clf, batch_size=7, num_workers=0, device="cpu")
    b = predict(slide, grid, clf, batch_size=64, num_workers=2, device="cpu")
    assert a.probs.shape == (len(grid), 4) and a.probs.dtype == np.float32
    np.testing.assert_allclose(a.probs.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(a.probs, b.probs, atol=1e-5)
    reader = TileReader(slide, grid)
    stain = grid_stain(slide, grid, read_overview(slide, TissueConfig().mask_mpp).glass)  # as a run estimates it
    ref = predict_tiles(clf.for_slide(stain), reader.read_tiles(np.arange(len(grid))), torch.device("cpu"))
    np.testing.assert_allclose(a.probs, ref, atol=1e-5)


def test_device_and_grid_errors(setup):
    _, slide, _, clf = setup
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="'cuda' requested but torch sees no CUDA GPU"):
            resolve_device("cuda")
    other = tile_grid(slide, detect_tissue(slide), TilingConfig(target_mpp=2.0))
    with pytest.raises(ModelError, match="grid read_mpp 2 µm/px vs model target_mpp 1"):
        predict(slide, other, clf, device="cpu")


def test_killed_run_resumes_without_recomputing(setup, tmp_path, monkeypatch):
    truth, slide, grid, clf = setup
    store = tmp_path / "tiles.zarr"
    script = textwrap.dedent(f"""
        import os, signal
        from wsi_response.classifier import default_model_path, load_classifier
        from wsi_response.config import TilingConfig
        from wsi_response.inference import predict
        from wsi_response.slide import open_slide
        from wsi_response.tiling import tile_grid
        from wsi_response.tissue import detect_tissue
        cfg = TilingConfig(read_region_px=512)
        slide = open_slide({str(truth.slide_path)!r})
        grid = tile_grid(slide, detect_tissue(slide), cfg)
        def progress(done, total):
            if done >= 8:
                os.kill(os.getpid(), signal.SIGKILL)
        predict(slide, grid, load_classifier(default_model_path()), batch_size=1, num_workers=0,
                device="cpu", store={str(store)!r}, store_every_s=0.0, progress=progress)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-500:]
    partial = tmp_path / "tiles.zarr.partial"
    assert partial.is_dir() and not store.exists()
    import zarr
    done_before = np.asarray(zarr.open_group(str(partial), mode="r")["chunk_done"][:]).astype(bool)
    assert 8 <= done_before.sum() < grid.n_chunks

    read = []
    original = TileReader.read_chunk
    monkeypatch.setattr(TileReader, "read_chunk", lambda self, k: (read.append(k), original(self, k))[1])
    resumed = predict(slide, grid, clf, num_workers=0, device="cpu", store=store)
    assert sorted(read) == np.flatnonzero(~done_before).tolist()  # finished chunks were not recomputed
    full = predict(slide, grid, clf, num_workers=0, device="cpu")
    np.testing.assert_allclose(resumed.probs, full.probs, atol=1e-5)
    contents = read_tile_store(store)
    stored, attrs = contents.predictions, contents.metadata
    np.testing.assert_allclose(stored.probs, full.probs, atol=1e-5)
    assert attrs["model_sha256"] == clf.sha256 and attrs["n_tiles"] == len(grid)

    read.clear()  # complete and matching: nothing is read
    predict(slide, grid, clf, num_workers=0, device="cpu", store=store)
    assert read == []


def test_a_failed_read_keeps_the_finished_chunks(setup, tmp_path, monkeypatch):
    """Chunks are stored together every few seconds; a read that fails stores what had finished."""
    from wsi_response.errors import SlideReadError

    truth, slide, grid, clf = setup
    store = tmp_path / "tiles.zarr"
    failing = grid.n_chunks - 3
    original = TileReader.read_chunk

    def read_chunk(self, k):
        if k == failing:
            raise SlideReadError(slide.path, "corrupt image data (test)")
        return original(self, k)

    monkeypatch.setattr(TileReader, "read_chunk", read_chunk)
    with pytest.raises(SlideReadError, match="corrupt image data"):
        predict(slide, grid, clf, batch_size=1, num_workers=0, device="cpu", store=store)
    import zarr
    partial = zarr.open_group(str(tmp_path / "tiles.zarr.partial"), mode="r")
    done = np.asarray(partial["chunk_done"][:]).astype(bool)
    # every chunk before the failing one had finished (the last batch in flight is lost with the error)
    assert done[:failing - 1].all() and not done[failing:].any()
    monkeypatch.setattr(TileReader, "read_chunk", original)
    full = predict(slide, grid, clf, num_workers=0, device="cpu")
    rows = np.repeat(done, np.diff(grid.chunk_starts))
    np.testing.assert_allclose(np.asarray(partial["probs"][:])[rows], full.probs[rows], atol=1e-5)


def test_the_stored_probabilities_are_calibrated_by_the_model_temperature(setup, tmp_path):
    from dataclasses import replace

    _, slide, grid, clf = setup
    plain = replace(clf, temperature=1.0, sha256="uncalibrated")
    plain = predict(slide, grid, plain, num_workers=0, device="cpu", store=tmp_path / "t1.zarr")
    hot = replace(clf, temperature=2.0, sha256="another-model")  # another model: its own store
    predict(slide, grid, hot, num_workers=0, device="cpu", store=tmp_path / "t2.zarr")
    stored = read_tile_store(tmp_path / "t2.zarr").predictions.probs
    # softmax(z / 2) is the square root of softmax(z), renormalised
    expected = np.sqrt(plain.probs) / np.sqrt(plain.probs).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(stored, expected, atol=1e-5)
    assert np.abs(stored - plain.probs).max() > 0.05
    assert np.array_equal(stored.argmax(axis=1), plain.probs.argmax(axis=1))
