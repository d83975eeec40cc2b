"""Accuracy of the bundled demo model on a freshly generated synthetic slide (scaled-down
``benchmarks/accuracy.py``): the specimen viable % through the real pipeline, and tile-level
held-out metrics. The slide's seed is used nowhere in training, model selection or the benchmark.

The bounds are looser than the targets of the model and the benchmark (held-out balanced accuracy
>= 0.95 over 342 tiles; specimen viable % within 2 pp on two 16000 x 12000 px slides per
specimen) because one 12000 x 9000 px slide has only ~35-40 scored tiles and a ~1.5 mm² tumor bed
with small viable regions, where the cells on region borders matter: with the bundled model, seeds
611, 612 and 614 at 30 % viable measured 26.8, 28.1 and 24.9 % (a 2-5 pp underestimate; tile
balanced accuracy 1.00, 0.98, 1.00). The previous demo model measures 19.9 % on this slide (fails
the first test) but also scores its 35 tiles perfectly: one slide is too few tiles for the tile test
to separate good from mediocre models, so it is a floor against a broken model or pipeline (wrong
pixels, normalisation or class order), not the model's selection target (``models/README.md``).
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
MIN_RECALL = 0.7              # every class


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
