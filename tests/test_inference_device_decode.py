"""Device decoding (run on the CPU device here) equals worker decoding; GPU-only options on the CPU.

``decode="device"`` is the same code on CPU (torchvision's libjpeg) as on CUDA (nvJPEG), so these
tests pin its geometry (regions, slide edges, resampling), its colour handling (Aperio RGB JPEG)
and its fallback. ``compile`` and ``autocast`` apply on CUDA only: on the CPU the results are
float32 eager.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from wsi_response.classifier import default_model_path, load_classifier
from wsi_response.config import TilingConfig
from wsi_response.errors import ConfigError
from wsi_response.inference import DeviceDecoder, ModelRunner, predict, resolve_device, tile_chunks
from wsi_response.slide import open_slide
from wsi_response.synth import synth_slide
from wsi_response.tiling import TileReader, tile_grid
from wsi_response.tissue import detect_tissue

CPU = torch.device("cpu")
MAX_MAD = 1.0  # grey levels


def _setup(path, tiling: TilingConfig):
    slide = open_slide(path)
    grid = tile_grid(slide, detect_tissue(slide), tiling)
    return slide, grid, load_classifier(default_model_path(), tiling)


@pytest.fixture(scope="module")
def resampled(tmp_path_factory):
    """0.5 µm/px slide read at 1.0 µm/px: level 0, tiles resampled 448 -> 224 px; one tile per chunk."""
    truth = synth_slide(tmp_path_factory.mktemp("dd") / "s.svs", size_px=(4000, 3000), mpp=0.5, seed=5)
    return _setup(truth.slide_path, TilingConfig(read_region_px=512))


@pytest.fixture(scope="module")
def exact(synth_specimen_small):
    """0.25 µm/px slide read at 1.0 µm/px: its ×4 level, no resampling; several tiles per chunk."""
    return _setup(synth_specimen_small.slides[0].slide_path, TilingConfig(read_region_px=1024))


def _assert_chunks_match(slide, grid) -> None:
    reader = TileReader(slide, grid)
    decoder = DeviceDecoder.open(slide, grid, reader, CPU)
    assert decoder.probe_mad is not None and decoder.probe_mad <= MAX_MAD
    seen = []
    for k, indices, tiles in tile_chunks(reader, list(range(grid.n_chunks)), CPU, num_workers=2, decoder=decoder,
                                         group_tiles=16):
        ref_indices, ref = reader.read_chunk(k)
        np.testing.assert_array_equal(indices, ref_indices)
        assert tiles.shape == ref.shape and tiles.dtype == torch.uint8
        assert float(np.abs(tiles.numpy().astype(np.int16) - ref).mean()) <= MAX_MAD, k
        seen.append(k)
    assert sorted(seen) == list(range(grid.n_chunks))
    reader.close()


@pytest.mark.parametrize("case, atol", [("resampled", 0.1), ("exact", 1e-5)])
def test_device_decode_equals_worker_decode(case, atol, request):
    """Same pixels where no resampling is needed. At half the level's resolution the workers use
    libjpeg-turbo's half-size DCT decode and the device averages 2 x 2 full-size pixels: under one
    grey level apart on average (checked per chunk), a few hundredths in probability."""
    slide, grid, clf = request.getfixturevalue(case)
    assert grid.n_chunks > 1 and (grid.level_tile_px != grid.tile_px) == (case == "resampled")
    _assert_chunks_match(slide, grid)
    workers = predict(slide, grid, clf, batch_size=16, num_workers=0, device="cpu", decode="workers")
    device = predict(slide, grid, clf, batch_size=16, num_workers=2, device="cpu", decode="device")
    np.testing.assert_allclose(device.probs, workers.probs, atol=atol)
    assert (device.labels == workers.labels).mean() >= 0.95


def test_aperio_rgb_jpeg_decodes_with_the_right_colours(cmu_slide_path):
    """Aperio stores RGB (not YCbCr) JPEG tiles; a plain decoder would shift every colour."""
    slide, grid, _ = _setup(cmu_slide_path, TilingConfig(read_region_px=1024))
    _assert_chunks_match(slide, grid)


def test_probe_mismatch_falls_back_to_workers_with_one_warning(resampled, monkeypatch):
    slide, grid, clf = resampled
    monkeypatch.setattr(TileReader, "MAX_PROBE_MAD", -1.0)
    expected = predict(slide, grid, clf, num_workers=0, device="cpu")
    with pytest.warns(RuntimeWarning, match="probe tiles differ .* decoding in the workers instead") as caught:
        got = predict(slide, grid, clf, num_workers=0, device="cpu", decode="device")
    assert len([w for w in caught if "inference.decode" in str(w.message)]) == 1
    np.testing.assert_array_equal(got.probs, expected.probs)


def test_gpu_options_on_cpu_give_float32_eager_results(resampled):
    slide, grid, clf = resampled
    tiles = torch.from_numpy(TileReader(slide, grid).read_tiles(np.arange(5)))
    plain = ModelRunner(clf, CPU, autocast="fp32")(tiles)
    for autocast in ("bf16", "fp16"):
        runner = ModelRunner(clf, CPU, autocast=autocast, compile=True, batch_size=8)
        assert runner.amp is None and runner.compiled is None  # CUDA only
        np.testing.assert_array_equal(runner(tiles), plain)
    assert plain.dtype == np.float32 and plain.shape == (5, 4)
    a = predict(slide, grid, clf, num_workers=0, device="cpu")
    b = predict(slide, grid, clf, num_workers=0, device="cpu", autocast="fp16", compile=True)
    np.testing.assert_array_equal(a.probs, b.probs)


def test_failing_compiled_model_falls_back_to_eager_once(resampled):
    _, _, clf = resampled
    runner = ModelRunner(clf, CPU)
    calls = []

    def broken(x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        raise RuntimeError("no working C compiler\nmore")

    tiles = torch.full((3, 224, 224, 3), 128, dtype=torch.uint8)
    expected = runner(tiles)
    runner.compiled = broken  # what torch.compile gives on a node without a working toolchain
    message = r"torch.compile failed \(RuntimeError: no working C compiler\); running eager"
    with pytest.warns(RuntimeWarning, match=message):
        first = runner._forward(clf.normalise(tiles.permute(0, 3, 1, 2).float().div(255)))
    np.testing.assert_allclose(clf.probabilities(first).detach().numpy(), expected, atol=1e-6)
    assert runner.compiled is None and calls == [3]


@pytest.mark.parametrize("device, words", [
    ("cuda:x", "is not one of auto, cpu, cuda, cuda:N"),
    ("cpu:0", "is not one of auto, cpu, cuda, cuda:N"),
    ("tpu", "is not one of auto, cpu, cuda, cuda:N"),
])
def test_device_strings(device, words):
    with pytest.raises(ConfigError, match=words):
        resolve_device(device)
    assert resolve_device("cpu") == CPU
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="'cuda:1' requested but torch sees no CUDA GPU"):
            resolve_device("cuda:1")


def test_bad_option_values(resampled):
    slide, grid, clf = resampled
    with pytest.raises(ConfigError, match="inference.decode: 'gpu' is not one of workers, device"):
        predict(slide, grid, clf, device="cpu", decode="gpu")
    with pytest.raises(ConfigError, match="inference.autocast: 'off' is not one of bf16, fp16, fp32"):
        ModelRunner(clf, CPU, autocast="off")


def test_a_stream_the_device_rejects_is_read_by_the_reader_which_names_the_corrupt_tile(resampled, tmp_path):
    import shutil

    import tifffile

    from wsi_response.errors import SlideReadError

    slide, grid, clf = resampled
    path = tmp_path / "corrupt.svs"
    shutil.copy(slide.path, path)
    x, y = (int(v) for v in grid.level_origins()[len(grid) // 2 - 2])  # not one of the probe tiles
    with tifffile.TiffFile(path) as tif:
        page = tif.series[0].levels[grid.read_level].pages[0]
        index = (max(y, 0) // page.tilelength) * -(-page.imagewidth // page.tilewidth) + max(x, 0) // page.tilewidth
        offset = page.dataoffsets[index]
    with open(path, "r+b") as f:  # zeros in the entropy-coded data: libjpeg stops with an error
        f.seek(offset + 600)
        f.write(bytes(200))
    corrupt = open_slide(path)
    with warnings.catch_warnings(), pytest.raises(SlideReadError, match="corrupt image data in level 0"):
        warnings.simplefilter("error", RuntimeWarning)  # the probe passed: device decoding was on
        predict(corrupt, grid, clf, num_workers=0, device="cpu", decode="device")
    corrupt.close()
