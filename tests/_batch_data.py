"""Test data shared by test_batch.py and test_slurm.py: a two-specimen manifest and its reference run.

The slides are of ordinary size (6000 x 4500 px at 0.5 µm/px) and run with two tile-reading
processes, so every process pool the pipeline has starts (the focus measure's and the inference
DataLoader's: both need more than one chunk, checked by :func:`pool_chunks`); the small slides
of earlier tests started neither, and batch hung on every ordinary slide unnoticed. The slides
live under a folder whose name has a space and non-ASCII characters, so every path the batch
and SLURM code quote is a hard one. Built once per pytest session.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

OVERRIDES = ["inference.num_workers=2"]   # the pools start (see the module doc)
DEVICE = "cpu"
SLIDE_PX, SLIDE_MPP = (6000, 4500), 0.5   # 3 x 2.25 mm: ~100 tiles, 9-12 chunks
TIMING_KEYS = {"timing"}


@dataclass(frozen=True)
class BatchData:
    manifest: Path
    rows: list[tuple[str, Path]]          # (specimen_id, absolute slide path) in manifest order
    bad: Path                              # the truncated slide
    reference: dict[str, dict[str, Any]]   # specimen_id -> specimen.json of a plain local run
    reference_out: Path                    # the output folder of that run


_CACHE: dict[str, BatchData] = {}


def batch_data(factory: pytest.TempPathFactory) -> BatchData:
    """Specimen A (A_1, A_2 and a truncated copy ``bad.svs``) and B (B_1, B_2), plus a local ``run`` of each."""
    if "data" in _CACHE:
        return _CACHE["data"]
    from wsi_response.classifier import default_model_path, load_classifier
    from wsi_response.config import load_config
    from wsi_response.pipeline import run_specimen
    from wsi_response.synth import synth_specimen

    root = factory.mktemp("batch") / "slides ü, déjà vu"
    a = synth_specimen(root, "A", 2, seed=11, size_px=SLIDE_PX, mpp=SLIDE_MPP, viable_fraction=0.3)
    b = synth_specimen(root, "B", 2, seed=12, size_px=SLIDE_PX, mpp=SLIDE_MPP, viable_fraction=0.05)
    bad = root / "A" / "bad.svs"
    data = a.slides[0].slide_path.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    rows = [("A", a.slides[0].slide_path), ("A", a.slides[1].slide_path), ("A", bad),
            ("B", b.slides[0].slide_path), ("B", b.slides[1].slide_path)]
    manifest = root / "manifest.csv"
    manifest.write_text("specimen_id,slide_path\n" + "".join(
        f'{s},"{p.relative_to(root)}"\n' for s, p in rows), encoding="utf-8")

    cfg = load_config(None, [*OVERRIDES, f"inference.device={DEVICE}"])
    classifier = load_classifier(default_model_path(), cfg.tiling)
    out = root.parent / "reference"
    reference = {s: run_specimen([p for sid, p in rows if sid == s], s, out, classifier, cfg, quiet=True)
                 for s in ("A", "B")}
    _CACHE["data"] = BatchData(manifest, [(s, p.resolve()) for s, p in rows], bad.resolve(), reference, out)
    return _CACHE["data"]


def pool_chunks(path: Path) -> tuple[int, int]:
    """Chunks of the focus measure's grid and of the tile grid of slide ``path`` (the default
    config): each process pool starts only with more than one."""
    from wsi_response.config import load_config
    from wsi_response.focus import FocusJob
    from wsi_response.slide import open_slide
    from wsi_response.tiling import tile_grid
    from wsi_response.tissue import TissueMask, detect_tissue, possible_tissue, read_overview, stained_px

    cfg = load_config(None, [])
    slide = open_slide(path)
    try:
        overview = read_overview(slide, cfg.tissue.mask_mpp)
        stained = stained_px(overview.image, cfg.tissue, overview.glass)
        possible = possible_tissue(stained, overview.mpp, cfg.tissue)
        focus = FocusJob(slide, TissueMask(possible, overview.downsample, overview.mpp), cfg.qc.focus_mpp)
        focus.close()
        mask = detect_tissue(slide, cfg.tissue, overview, stained, possible)
        return focus.grid.n_chunks, tile_grid(slide, mask, cfg.tiling).n_chunks
    finally:
        slide.close()


def without_timing(value: Any) -> Any:
    """``value`` with every ``timing`` entry dropped (recursively)."""
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


def specimen_json(out: Path, specimen: str) -> dict[str, Any]:
    return json.loads((out / specimen / "specimen.json").read_text(encoding="utf-8"))


def slide_json(out: Path, specimen: str, slide_id: str) -> dict[str, Any]:
    return json.loads((out / specimen / "slides" / slide_id / "slide.json").read_text(encoding="utf-8"))


def cli(*args: str | Path, env: dict[str, str] | None = None, timeout: float = 300,
        cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m wsi_response.cli ARGS`` in a subprocess."""
    return subprocess.run([sys.executable, "-m", "wsi_response.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=cwd)


__all__ = ["BatchData", "batch_data", "pool_chunks", "without_timing", "specimen_json", "slide_json", "cli",
           "OVERRIDES", "DEVICE"]
