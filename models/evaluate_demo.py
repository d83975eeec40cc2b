"""Held-out tile-level metrics of demo models: ``evaluate_demo.py VAL_DIR MODEL...`` prints JSON.

Truth: every non-overlapping grid tile lying inside a full-region annotation of the held-out
synthetic slides (``<stem>.annotations.geojson``).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from wsi_response.classifier import load_classifier
from wsi_response.config import Config
from wsi_response.train import evaluate_annotated


def main(val_dir: str, *models: str) -> None:
    slides = sorted(Path(val_dir).glob("*/*.svs"))
    pairs = [(s, s.with_suffix(".annotations.geojson")) for s in slides]
    out = {}
    for path in models:
        clf = load_classifier(path)
        out[Path(path).name] = {"sha256": clf.sha256, "trained_on": clf.trained_on["annotations"][0],
                                "held_out": evaluate_annotated(clf, pairs, Config(), device="cpu")}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:])
