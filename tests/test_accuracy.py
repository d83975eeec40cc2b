"""Accuracy of the bundled demo model on a freshly generated synthetic slide (scaled-down
``benchmarks/accuracy.py``): the specimen viable % through the real pipeline, and tile-level
held-out metrics. The slide's seed is used nowhere in training, model selection or the benchmark.

The bounds are looser than the targets of issue 13 (balanced accuracy >= 0.95; specimen viable %
within 2 pp) because one 12000 x 9000 px slide has only ~35 scored tiles (8 of fibrosis: one tile is
12.5 % of its recall) and a ~1.5 mm² tumor bed where the cells on region borders matter. This is a
floor against a broken model or pipeline (wrong pixels, stain map, normalisation or class order,
which drive some class's recall towards 0), not the model's selection target (``models/README.md``).
The bundled model (trained with domain randomisation, partial annotations) scores this slide's tiles
at balanced accuracy 0.906 with fibrosis recall 0.62 (5 of 8; 3 called necrosis or viable); the
model it replaced (20 default-setting slides, full annotations) scored 1.00 here and 0.57 on the
unseen lab-c setting, against 0.88 for the bundled one.
"""
from __future__ import annotations

import pytest

from wsi_response.classifier import default_model_path, load_classifier
from wsi_response.config import Config, load_config
from wsi_response.pipeline import run_specimen
from wsi_response.synth import synth_specimen
from wsi_response.train import evaluate_annotated

SEED = 611
VIABLE_FRACTION = 0.3
MAX_ERROR_PP = 6.0            # |measured - true| specimen viable %, percentage points
MIN_BALANCED_ACCURACY = 0.85  # non-overlapping grid tiles inside the full annotations
MIN_RECALL = 0.6              # every class


@pytest.fixture(scope="module")
def specimen(tmp_path_factory):
    return synth_specimen(tmp_path_factory.mktemp("acc"), "ACC", 1, seed=SEED, size_px=(12000, 9000), mpp=0.25,
                          viable_fraction=VIABLE_FRACTION)


@pytest.fixture(scope="module")
def classifier():
    return load_classifier(default_model_path())


def test_pipeline_measures_the_true_viable_percent(specimen, classifier, tmp_path):
    cfg = load_config(overrides=["tiling.stride_px=112", "inference.num_workers=0"])
    result = run_specimen([s.slide_path for s in specimen.slides], "ACC", tmp_path, classifier, cfg, quiet=True)
    assert result["status"] == "ok"
    assert abs(result["viable_percent"] - specimen.viable_percent) <= MAX_ERROR_PP, (
        result["viable_percent"], specimen.viable_percent)


def test_held_out_tile_metrics(specimen, classifier):
    truth = specimen.slides[0]
    m = evaluate_annotated(classifier, [(truth.slide_path, truth.annotations_path)], Config(), device="cpu")
    assert m["n_tiles"] >= 30 and all(m["support"][c] >= 3 for c in m["support"])
    assert m["balanced_accuracy"] >= MIN_BALANCED_ACCURACY, m["confusion_matrix"]
    assert min(m["recall"].values()) >= MIN_RECALL, m["recall"]
