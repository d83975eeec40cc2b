"""Nothing lost: a `wsi-response run` SIGKILLed while tiling, during inference and while writing
leaves only complete files under final names, and running it again finishes the specimen with the
numbers of an uninterrupted run, without redoing what was finished.

The kill points are observable, no hooks: the first slide's ``slide.json`` (the run has moved on to
the second slide's tissue detection and tiling), the second slide's first chunk flag in
``tiles.zarr.partial`` (inference), and its ``overlay.geojson`` (the export stage).
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from _batch_data import specimen_json, without_timing
from wsi_response.atomic import PARTIAL_SUFFIX
from wsi_response.classifier import default_model_path, load_classifier
from wsi_response.config import load_config
from wsi_response.locks import LOCK_NAME
from wsi_response.pipeline import run_specimen
from wsi_response.store import read_tile_store

# many small chunks (2 x 2 cells) inferred 2 tiles at a time: inference lasts long enough to be hit
OVERRIDES = ["inference.device=cpu", "inference.num_workers=0", "inference.batch_size=2", "tiling.read_region_px=448"]
SPECIMEN = "K-1"


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two slides (the same synthetic 1024 x 768 px slide at 1 µm/px, under two names)."""
    from wsi_response.synth import synth_slide

    folder = tmp_path_factory.mktemp("kill") / "slides ü"
    first = synth_slide(folder / "K_1.svs", size_px=(1024, 768), mpp=1.0, seed=5, viable_fraction=0.4).slide_path
    second = folder / "K_2.svs"
    shutil.copyfile(first, second)
    return [first, second]


def _complete_files(out: Path) -> list[str]:
    """Check every file under a final name below ``out``; returns their relative paths.

    Temporary names (``.name.xxx.partial``, ``tiles.zarr.partial``) are allowed; final names
    must be whole: JSON parses, GeoJSON decompresses and parses, PNGs decode, HTML ends, the
    tile store is complete.
    """
    checked = []
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out)
        if any(part.endswith(PARTIAL_SUFFIX) for part in rel.parts) or ".zarr" in str(rel.parent) \
                or path.name == LOCK_NAME:
            continue
        if path.name.endswith(".zarr"):
            stored = read_tile_store(path)
            assert stored.metadata["complete"] is True and not np.isnan(stored.predictions.probs).any(), rel
        elif path.suffix in (".json", ".geojson"):
            json.loads(path.read_text(encoding="utf-8"))
        elif path.name.endswith(".geojson.gz"):
            json.loads(gzip.decompress(path.read_bytes()))
        elif path.suffix == ".png":
            Image.open(path).load()
        elif path.suffix == ".html":
            assert path.read_text(encoding="utf-8").rstrip().endswith("</html>"), rel
        elif path.is_file():
            raise AssertionError(f"unexpected file {rel}")
        checked.append(str(rel))
    return checked


def _run_until(slides: list[Path], out: Path, marker: Path | None) -> subprocess.CompletedProcess | None:
    """Run `wsi-response run`; SIGKILL it as soon as ``marker`` exists (None: let it finish)."""
    command = [sys.executable, "-m", "wsi_response.cli", "run", *map(str, slides), "--specimen", SPECIMEN,
               "--out", str(out), "--quiet", *OVERRIDES]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if marker is None:
        stdout, stderr = proc.communicate(timeout=300)
        return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)
    deadline = time.monotonic() + 300
    try:
        while not marker.exists():
            assert proc.poll() is None, f"the run ended before {marker} appeared: {proc.communicate()}"
            assert time.monotonic() < deadline, f"{marker} did not appear"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    return None


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != LOCK_NAME}  # the lock file records each run that locks the folder


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_numbers(slides: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "out dir é"
    first, second = (out / SPECIMEN / "slides" / p.stem for p in slides)

    # 1. killed while tiling the second slide: the first is done, the second has no tile store yet
    _run_until(slides, out, first / "slide.json")
    _complete_files(out)
    assert not list(second.glob("tiles.zarr*")) and not (second / "slide.json").exists()
    finished = _mtimes(first)
    assert "slide.json" in finished and any(k.startswith("tiles.zarr/") for k in finished)

    # 2. killed during inference: some chunks of the second slide are flagged done, none under a final name
    _run_until(slides, out, second / "tiles.zarr.partial" / "chunk_done" / "c" / "0")
    _complete_files(out)
    assert not (second / "tiles.zarr").exists() and not (second / "slide.json").exists()
    flags = zarr.open_array(str(second / "tiles.zarr.partial" / "chunk_done"), mode="r")[:]
    assert 0 < flags.sum() < len(flags) >= 4, flags

    # 3. killed while writing the second slide's exports: its tile store is final, its slide.json is not there
    _run_until(slides, out, second / "overlay.geojson")
    written = _complete_files(out)
    assert f"{SPECIMEN}/slides/K_2/overlay.geojson" in written and not (second / "slide.json").exists()
    store = _mtimes(second / "tiles.zarr")

    # 4. the rerun finishes: same numbers as an uninterrupted run; nothing finished is recomputed
    done = _run_until(slides, out, None)
    assert done is not None and done.returncode == 0, done.stderr
    _complete_files(out)
    assert _mtimes(first) == finished
    assert _mtimes(second / "tiles.zarr") == store
    assert not [p for p in out.rglob(f"*{PARTIAL_SUFFIX}")], "temporary files left behind"

    cfg = load_config(None, OVERRIDES)
    reference = run_specimen(slides, SPECIMEN, tmp_path / "reference", load_classifier(default_model_path(), cfg.tiling),
                             cfg, quiet=True)
    assert without_timing(specimen_json(out, SPECIMEN)) == without_timing(json.loads(json.dumps(reference)))
    assert reference["status"] == "ok" and reference["slides"][0]["tumor_bed_area_mm2"] > 0
