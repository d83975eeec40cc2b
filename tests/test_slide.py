"""Slide reading through OpenSlide and tiffslide: metadata, MPP provenance, pixels, bad input."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import tifffile

from wsi_response import cli
from wsi_response.errors import ConfigError, MissingMppError, SlideFormatError, SlideNotFoundError
from wsi_response.slide import open_slide


def test_cmu_metadata_through_openslide(cmu_slide_path):
    slide = open_slide(cmu_slide_path)
    assert slide.backend == "openslide"
    assert "aperio" in slide.backend_reason
    assert slide.vendor == "aperio"
    assert slide.dimensions_px == (2220, 2967)
    assert slide.mpp == pytest.approx(0.499)
    assert slide.mpp_source == "metadata"
    assert slide.objective_power == 20.0
    assert slide.bounds_offset_l0 == (0, 0)
    assert len(slide.levels) == 1


@pytest.mark.parametrize("origin, size", [((0, 0), (512, 512)), ((1000, 1500), (700, 300)),
                                          ((2000, 2800), (400, 400)), ((-50, -20), (200, 100))])
def test_cmu_backends_return_same_pixels(cmu_slide_path, origin, size):
    a = open_slide(cmu_slide_path, backend="openslide").read_region(origin, 0, size)
    b = open_slide(cmu_slide_path, backend="tiffslide").read_region(origin, 0, size)
    assert a.shape == b.shape == (size[1], size[0], 3)
    assert a.dtype == np.uint8
    assert np.abs(a.astype(int) - b).mean() <= 1.0
    # outside the slide is white glass
    if origin[0] < 0:
        assert (a[:, : -origin[0]] == 255).all()


def test_synthetic_svs_levels_and_backends_agree(synth_specimen_small):
    truth = synth_specimen_small.slides[0]
    slide = open_slide(truth.slide_path)
    tslide = open_slide(truth.slide_path, backend="tiffslide")
    assert slide.dimensions_px == tuple(truth.dimensions_px)
    assert slide.mpp == pytest.approx(0.25) and slide.mpp_source == "metadata"
    assert [round(lv.downsample) for lv in slide.levels[:2]] == [1, 4]
    assert slide.level_for_mpp(1.0) == 1
    assert slide.level_for_mpp(0.9) == 0
    for level in range(len(slide.levels)):
        w, h = slide.levels[level].dimensions_px
        origin = (w // 3, h // 3)
        size = (min(600, w - origin[0]), min(400, h - origin[1]))
        a = slide.read_level(level, origin, size)
        b = tslide.read_level(level, origin, size)
        assert np.abs(a.astype(int) - b).mean() <= 1.0, f"level {level}"


def test_mpp_from_tiff_resolution_tags(synth_tiff_slide):
    slide = open_slide(synth_tiff_slide.slide_path)
    assert slide.mpp == pytest.approx(0.5, rel=1e-3)
    assert slide.mpp_source == "tiff-resolution"


def test_mpp_must_agree_with_the_slides_own_unless_forced(cmu_slide_path):
    with pytest.raises(ConfigError) as err:
        open_slide(cmu_slide_path, mpp=0.25)
    assert str(err.value) == (f"{cmu_slide_path}: --mpp 0.25 disagrees with the slide's own MPP 0.499 µm/px (vendor "
                              "metadata; more than 1% apart); to measure it at 0.25 µm/px anyway pass --force-mpp "
                              "0.25 instead")
    agreeing = open_slide(cmu_slide_path, mpp=0.5)  # within 1 %: the slide's own MPP is used
    assert agreeing.mpp == pytest.approx(0.499) and agreeing.mpp_source == "metadata"
    forced = open_slide(cmu_slide_path, mpp=0.25, force_mpp=True)
    assert forced.mpp == 0.25 and forced.mpp_source == "override"


def test_tiff_without_mpp_needs_override(tmp_path):
    path = tmp_path / "nompp.tif"
    tifffile.imwrite(path, np.full((512, 512, 3), 230, np.uint8), tile=(256, 256), photometric="rgb")
    with pytest.raises(MissingMppError) as err:
        open_slide(path)
    assert str(path) in str(err.value) and "--mpp" in str(err.value)
    slide = open_slide(path, mpp=0.5)
    assert slide.mpp == 0.5 and slide.mpp_source == "override"


def test_slide_pickles_and_reopens(cmu_slide_path):
    slide = open_slide(cmu_slide_path, backend="tiffslide", mpp=0.5, force_mpp=True)
    clone = pickle.loads(pickle.dumps(slide))
    assert clone.backend == "tiffslide" and clone.mpp == 0.5 and clone.mpp_source == "override" and clone.force_mpp
    assert np.array_equal(clone.read_region((10, 10), 0, (64, 64)), slide.read_region((10, 10), 0, (64, 64)))


def test_thumbnail_keeps_aspect(cmu_slide_path):
    thumb = open_slide(cmu_slide_path).thumbnail(500)
    assert max(thumb.shape[:2]) == 500
    assert thumb.shape[1] / thumb.shape[0] == pytest.approx(2220 / 2967, rel=0.01)


def test_info_json_uses_slide_json_names(cmu_slide_path, capsys):
    assert cli.main(["info", str(cmu_slide_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["dimensions_px"] == [2220, 2967]
    assert info["mpp"] == pytest.approx(0.499)
    assert info["mpp_source"] == "metadata"
    assert info["backend"] == "openslide"
    assert info["levels"] == [{"dimensions_px": [2220, 2967], "downsample": 1.0, "mpp": pytest.approx(0.499)}]


@pytest.mark.parametrize("make, error, words", [
    (lambda p: None, SlideNotFoundError, "no such file"),
    (lambda p: p.write_bytes(b""), SlideFormatError, "empty file"),
    (lambda p: p.write_text("patient,slide\n1,2\n" * 20), SlideFormatError, "text file"),
    (lambda p: p.write_bytes(b"\x00\x01binary junk" * 100), SlideFormatError, "not a whole-slide image"),
])
def test_bad_files_give_one_line_errors(tmp_path, make, error, words):
    path = tmp_path / "bad slide ü.svs"
    make(path)
    with pytest.raises(error) as err:
        open_slide(path)
    message = str(err.value)
    assert message.startswith(str(path)) and words in message and "\n" not in message


@pytest.mark.parametrize("fraction", [0.001, 0.3, 0.6, 0.95])
def test_truncated_slides_are_rejected_at_open(synth_specimen_small, tmp_path, fraction):
    data = synth_specimen_small.slides[0].slide_path.read_bytes()
    path = tmp_path / "truncated.svs"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(SlideFormatError) as err:
        open_slide(path)
    assert str(path) in str(err.value) and "truncated" in str(err.value)


def test_cli_reports_bad_slide_on_one_line(tmp_path, capsys):
    path = tmp_path / "notes.svs"
    path.write_text("this is not a slide\n")
    assert cli.main(["info", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"wsi-response: error: {path}: a text file, not a slide image"
