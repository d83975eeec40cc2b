"""`wsi-response calibrate`: a model's error re-measured on another lab's annotated slides."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from wsi_response.classifier import default_model_path, load_classifier
from wsi_response.config import Config
from wsi_response.errors import ConfigError
from wsi_response.quantify import slide_areas_from_tiles, specimen_areas
from wsi_response.recalibrate import recalibrate_model
from wsi_response.synth import synth_specimen
from wsi_response.train import evaluate_annotated


@pytest.fixture(scope="module")
def lab_b(tmp_path_factory):
    """Two 4000 x 3000 px slides at 0.5 µm/px of the lab-b setting (the demo model never saw it),
    with their full annotations."""
    truth = synth_specimen(tmp_path_factory.mktemp("lab_b"), "LB", 2, seed=41, size_px=(4000, 3000), mpp=0.5,
                           domain="lab-b")
    return [s.slide_path for s in truth.slides], [s.slide_path.with_suffix(".annotations.geojson")
                                                  for s in truth.slides]


def test_calibrate_replaces_the_error_and_temperature_not_the_weights(lab_b, tmp_path):
    slides, annotations = lab_b
    out = tmp_path / "demo.lab-b.safetensors"
    proc = subprocess.run([sys.executable, "-m", "wsi_response.cli", "calibrate", "--model", str(default_model_path()),
                           "--slides", *map(str, slides), "--annotations", *map(str, annotations), "--out", str(out),
                           "--device", "cpu"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    old, new = load_classifier(default_model_path()), load_classifier(out)
    for (k, a), b in zip(old.model.state_dict().items(), new.model.state_dict().values()):
        assert torch.equal(a, b), k  # the weights, hence every class area, are unchanged

    measured = evaluate_annotated(old, list(zip(slides, annotations)), Config(), device="cpu")
    block = new.validation_error
    assert block["confusion_matrix"] == measured["confusion_matrix"]  # this lab's tiles, counted independently
    assert block["n_slides"] == 2 and len(block["per_slide"]) == 2
    assert np.sum(block["per_slide"], axis=0).tolist() == block["confusion_matrix"]
    assert block["source"]["command"] == "calibrate" and block["source"]["slides"] == [p.name for p in slides]
    assert block["replaced"]["validation_error"]["confusion_matrix"] == old.validation_error["confusion_matrix"]
    assert block["replaced"]["validation_error"]["source"]["command"] == "train"
    assert block["replaced"]["temperature"] == old.temperature
    assert new.describe()["validation_error"]["source"]["command"] == "calibrate"  # specimen.json says so

    report = json.loads(out.with_name(out.name + ".calibration.json").read_text())
    assert report["metrics"]["balanced_accuracy"] == pytest.approx(measured["balanced_accuracy"])
    assert report["calibration"]["after"]["nll"] <= report["calibration"]["before"]["nll"] + 1e-9
    assert new.temperature == pytest.approx(report["calibration"]["temperature"])
    assert out.with_name(out.name + ".reliability.png").stat().st_size > 1000
    assert "balanced accuracy" in proc.stdout and str(out) in proc.stdout

    # the same tiles now get this lab's interval and corrected estimate; the areas stay
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 4, 400)
    cols_rows = np.stack(np.divmod(np.arange(400), 20), axis=1)
    slide = slide_areas_from_tiles(np.eye(4, dtype=np.float32)[pred], old.class_names, np.ones(400, np.float32),
                                   0.05, cols_rows=cols_rows)
    before = specimen_areas([slide], validation_error=old.validation_error)
    after = specimen_areas([slide], validation_error=block)
    assert after.viable_percent == before.viable_percent
    assert after.viable_percent_ci95_method == before.viable_percent_ci95_method == "validated_confusion"
    assert after.viable_percent_corrected != before.viable_percent_corrected
    assert after.viable_percent_ci95 != before.viable_percent_ci95


def test_calibrate_refuses_to_overwrite_the_model_or_judge_one_slide(lab_b, tmp_path):
    slides, annotations = lab_b
    with pytest.raises(ConfigError, match="a new file"):
        recalibrate_model(default_model_path(), slides, annotations, default_model_path())
    with pytest.raises(ConfigError, match="at least 2 annotated slides"):
        recalibrate_model(default_model_path(), slides[:1], annotations[:1], tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_a_class_without_annotated_tiles_is_named_unknown(lab_b, tmp_path):
    slides, annotations = lab_b
    kept = []
    for a in annotations:  # the lab annotated no necrosis
        doc = json.loads(a.read_text())
        doc["features"] = [f for f in doc["features"] if f["properties"]["classification"]["name"] != "Necrosis"]
        kept.append(tmp_path / a.name)
        kept[-1].write_text(json.dumps(doc))
    result = recalibrate_model(default_model_path(), slides, kept, tmp_path / "m.safetensors", device="cpu")
    assert result.classifier.validation_error["n_per_class"]["necrosis"] == 0
    assert any(w.startswith("no annotated tiles of necrosis") for w in result.report["metrics"]["warnings"])
