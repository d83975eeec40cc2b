"""Re-measuring a trained model's error on a lab's own annotated slides (``wsi-response calibrate``).

A model's validated error (:mod:`wsi_response.model_error`) describes the slides it was validated
on. Slides from another lab, stain or scanner have another error, and no interval computed from
the training lab's validation can cover it. This module measures it where the model is used:
every non-overlapping grid tile lying at least half inside one class's annotations on the lab's
slides (:func:`~wsi_response.train.annotated_grid_logits`, the pixels a run reads, stain-
normalised where the model is) is classified; a temperature is fitted to these tiles and their
confusion counts (with per-slide counts for the between-slide spread) replace the checkpoint's
``temperature`` and ``validation_error``. The weights are unchanged, so every class area a run
measures is unchanged; the interval, ``viable_percent_corrected`` and the probabilities now
describe this lab's slides. ``validation_error.source`` names the command and the slides, and
the old block (without its own ``replaced``) is kept as ``validation_error.replaced``, so the file
says what it was before.

The slides used here must not be scored with the recalibrated model as if they were unseen: their
error is the one measured.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import __version__
from .atomic import write_atomic, write_json_atomic
from .calibration import calibrate, reliability_png
from .classifier import Classifier, load_classifier, save_classifier, with_provenance
from .config import Config
from .errors import ConfigError
from .train import annotated_grid_logits, classification_metrics, pair_annotations

__all__ = ["CalibrationResult", "recalibrate_model", "MIN_SLIDES"]

MIN_SLIDES = 2   # the between-slide spread of the error needs at least two slides


@dataclass(frozen=True)
class CalibrationResult:
    classifier: Classifier
    report: dict[str, Any]
    report_path: Path


def recalibrate_model(model: str | os.PathLike, slides: Sequence[str | os.PathLike],
                      annotations: Sequence[str | os.PathLike], out: str | os.PathLike, cfg: Config = Config(),
                      *, device: str = "auto") -> CalibrationResult:
    """Write ``out``: the model at ``model`` with the temperature and validated error measured on the
    annotated ``slides``; and ``out.calibration.json`` (metrics per class and annotation name,
    reliability before and after) with ``out.reliability.png``."""
    model, out = Path(model), Path(out)
    if out.resolve() == model.resolve():
        raise ConfigError(f"{out}: --out must be a new file, not the model being recalibrated")
    if len(slides) < MIN_SLIDES:
        raise ConfigError(f"calibrate needs at least {MIN_SLIDES} annotated slides (the error's spread between "
                          f"slides is part of the interval), got {len(slides)}")
    clf = load_classifier(model, cfg.tiling)
    pairs = pair_annotations([Path(s) for s in slides], [Path(a) for a in annotations])
    data, logits = annotated_grid_logits(clf, pairs, cfg, device)
    if not len(data.labels):
        raise ConfigError("calibrate: no grid tile lies at least half inside one class's annotations on "
                          f"{', '.join(data.slide_names)} (check annotations.name_map)")
    metrics = classification_metrics(data.labels, logits.argmax(axis=1), data.names)
    metrics["warnings"] += [f"no annotated tiles of {cls}: its error on these slides is unknown, and the interval "
                            f"takes any error for it" for cls, n in metrics["support"].items() if n == 0]
    temperature, validation, calibration = calibrate(logits, data.labels, data.slide_index)
    validation["source"] = {"command": "calibrate", "software_version": __version__,
                            "slides": list(data.slide_names), "annotations": [Path(a).name for _, a in pairs]}
    previous = None if clf.validation_error is None else \
        {k: v for k, v in clf.validation_error.items() if k != "replaced"}
    validation["replaced"] = {"temperature": clf.temperature, "validation_error": previous}
    new = replace(clf, temperature=temperature, validation_error=validation, path=None, sha256=None)
    sha = save_classifier(new, out)
    new = with_provenance(new, out, sha)
    png = out.with_name(out.name + ".reliability.png")
    write_atomic(png, reliability_png(calibration))
    report = {"model": str(out), "sha256": sha, "recalibrated_from": {"model": str(model), "sha256": clf.sha256},
              "software_version": __version__, "slides": list(data.slide_names), "metrics": metrics,
              "calibration": calibration, "reliability_png": png.name}
    report_path = out.with_name(out.name + ".calibration.json")
    write_json_atomic(report_path, report)
    return CalibrationResult(classifier=new, report=report, report_path=report_path)
