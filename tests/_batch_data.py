"""Test data shared by test_batch.py and test_slurm.py: a small two-specimen manifest and its reference run.

The slides live under a folder whose name has a space and non-ASCII characters, so every path
the batch and SLURM code quote is a hard one. Built once per pytest session.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

OVERRIDES = ["inference.num_workers=0"]   # spare the two shared CPUs
DEVICE = "cpu"
SLIDE_PX = (3000, 2000)                   # 0.75 x 0.5 mm at 0.25 µm/px: ~10 tiles
TIMING_KEYS = {"timing"}


@dataclass(frozen=True)
class BatchData:
    manifest: Path
    rows: list[tuple[str, Path]]          # (specimen_id, absolute slide path) in manifest order
    bad: Path                              # the truncated slide
    reference: dict[str, dict[str, Any]]   # specimen_id -> specimen.json of a plain local run


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
    a = synth_specimen(root, "A", 2, seed=11, size_px=SLIDE_PX, mpp=0.25, viable_fraction=0.3)
    b = synth_specimen(root, "B", 2, seed=12, size_px=SLIDE_PX, mpp=0.25, viable_fraction=0.05)
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
    _CACHE["data"] = BatchData(manifest, [(s, p.resolve()) for s, p in rows], bad.resolve(), reference)
    return _CACHE["data"]


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


__all__ = ["BatchData", "batch_data", "without_timing", "specimen_json", "slide_json", "cli", "OVERRIDES",
           "DEVICE"]
