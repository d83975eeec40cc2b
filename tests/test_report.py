"""The HTML report renders in a real headless browser (Debian's chromium) and is not blank."""
from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from wsi_response.report import box_thumbnail, render_report
from wsi_response.slide import open_slide
from wsi_response.tissue import read_overview

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path of chromium; installed from Debian's packages when missing and we are root."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], env=env, capture_output=True, timeout=900)
        found = shutil.which("chromium")
    if found is None:
        pytest.fail("chromium is needed for the report rendering test: apt-get install chromium")
    return found


def _browser(chromium: str, tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args],
                          capture_output=True, text=True, timeout=120)


def test_report_renders_in_headless_chromium(specimen_run, chromium, tmp_path):
    specimen_dir, result = specimen_run
    page = specimen_dir / "report.html"
    html = page.read_text()
    assert "data:image/png;base64," in html and "<script" not in html  # self-contained, static
    assert "Not for clinical use" in html

    dom = _browser(chromium, tmp_path, "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert f"{result['viable_percent']:.1f} % viable tumor" in dom.stdout
    assert f"EORTC-STBSG score {result['eortc']['tier']}" in dom.stdout
    for slide in result["slides"]:
        assert slide["slide_id"] in dom.stdout

    shot = tmp_path / "report.png"
    proc = _browser(chromium, tmp_path, "--window-size=1280,1600", f"--screenshot={shot}", page.as_uri())
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert pixels.shape[:2] == (1600, 1280)
    non_white = (pixels.min(axis=2) < 200).mean()
    assert non_white > 0.10, f"page looks blank: {non_white:.3f} of pixels are not white"
    assert pixels.std() > 30


def test_report_escapes_text_and_handles_an_empty_bed():
    specimen = {"specimen_id": "<script>x</script>", "status": "ok", "viable_percent": None,
                "viable_percent_ci95": None, "eortc": {"tier": None, "near_cutoff": None},
                "qc": {"flags": [{"code": "no_tissue", "severity": "fail", "message": "no tissue found", "value": 0.0}],
                       "verdict": "not_reportable", "reportable": False}, "slides": [],
                "model": {"name": "m", "trained_on": "real slides"}, "areas_mm2": {}}
    html = render_report(specimen, {})
    assert "<script>x</script>" not in html and "&lt;script&gt;" in html
    assert "No tumor bed found" in html and "not assessable" in html
    assert "QC verdict: <b>not reportable</b>" in html and "fail: no tissue found" in html
    assert "Not for clinical use" not in html


@pytest.mark.parametrize("downsample", [4.0, 6.5, 10.0, 15.9])
def test_box_thumbnail_equals_a_slide_read_from_the_overviews_level(synth_tiff_slide, downsample):
    """Box-filtering the in-memory overview gives the pixels a second read of the slide would."""
    slide = open_slide(synth_tiff_slide.slide_path)
    try:
        overview = read_overview(slide, slide.mpp * 4)  # exactly the ×4 pyramid level
        assert slide.level_for_mpp(slide.mpp * downsample) == slide.level_for_mpp(overview.mpp)
        read = read_overview(slide, slide.mpp * downsample).image
    finally:
        slide.close()
    np.testing.assert_array_equal(box_thumbnail(overview, slide.dimensions_px, downsample), read)
