"""Held-out tile-level metrics of demo models.

    evaluate_demo.py --held-out DIR [--held-out DIR ...] MODEL [MODEL ...]   > metrics.json

Truth: every non-overlapping grid tile (224 px at 1.0 µm/px) lying at least half inside a
full-region annotation (``<stem>.annotations.geojson``) of the synthetic slides ``DIR/*/*.svs``
(specimens never used in training). Metrics pooled over all folders (``held_out``) and per folder
(``by_folder``). Tiles are read once (once more stain-normalised for models that read normalised
tiles) and scored by every model.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from wsi_response.classifier import load_classifier
from wsi_response.config import Config
from wsi_response.inference import resolve_device
from wsi_response.train import classification_metrics, predict_tiles
from wsi_response.train_sampling import load_grid_tileset


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--held-out", type=Path, action="append", required=True, help="folder of held-out specimens")
    p.add_argument("models", nargs="+")
    args = p.parse_args(argv)
    cfg = Config()
    slides = [s for d in args.held_out for s in sorted(d.glob("*/*.svs"))]
    folder = np.array([next(i for i, d in enumerate(args.held_out) if s.is_relative_to(d)) for s in slides])
    pairs = [(s, s.with_suffix(".annotations.geojson")) for s in slides]
    loaded = {}
    out = {}
    for path in args.models:
        clf = load_classifier(path, cfg.tiling)
        normalise = clf.stain_normalisation is not None
        if normalise not in loaded:
            loaded[normalise] = load_grid_tileset(pairs, cfg, normalise=normalise)
        data = loaded[normalise]
        tile_folder = folder[data.slide_index]
        pred = predict_tiles(clf, data.tiles, resolve_device("cpu")).argmax(axis=1)
        out[Path(path).name] = {
            "sha256": clf.sha256,
            "trained_on": {"annotations": clf.trained_on["annotations"][0].split(".", 1)[1],
                           "n_slides": clf.trained_on["n_slides"],
                           "train_tiles_per_class": clf.trained_on["train_tiles_per_class"]},
            "held_out": {**classification_metrics(data.labels, pred, data.names), "slides": list(data.slide_names)},
            "by_folder": {str(d): classification_metrics(data.labels[tile_folder == i], pred[tile_folder == i])
                          for i, d in enumerate(args.held_out)},
        }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
