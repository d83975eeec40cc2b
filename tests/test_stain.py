"""Per-slide stain normalisation: the estimate recovers known stains, two labs' renderings of the
same tissue map onto the same pixels, real slides, the identity fallback, and a normalising model
given no stain estimate by its caller estimates it as a run does."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from wsi_response.classes import CLASSES
from wsi_response.classifier import IMAGENET_MEAN, IMAGENET_STD, Classifier, build_model, load_classifier, \
    save_classifier
from wsi_response.config import Config
from wsi_response.errors import ModelError
from wsi_response.slide import open_slide
from wsi_response.stain import REFERENCE_MAX, REFERENCE_STAINS, estimate_stain, normalise_uint8, tissue_stain


def _unit(v) -> np.ndarray:
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v)


def _concentrations(seed: int, shape=(64, 256, 256)) -> np.ndarray:
    """H and E concentration fields ``(*shape, 2)``: nuclei-like H blobs over an E background,
    with some H-only and E-only pixels (the extremes Macenko's angles find)."""
    rng = np.random.default_rng(seed)
    h = rng.gamma(2.0, 0.25, shape) * (rng.random(shape) < 0.3)
    e = rng.gamma(3.0, 0.15, shape) * (rng.random(shape) < 0.9)
    return np.stack([h, e], axis=-1)


def _render(conc: np.ndarray, h, e, glass, gamma: float = 1.0) -> np.ndarray:
    """uint8 RGB of concentrations under stains ``h``, ``e`` (OD unit vectors), glass colour and gamma."""
    od = (conc @ np.stack([_unit(h), _unit(e)])) * gamma
    return np.clip(np.round(np.asarray(glass) * np.exp(-od)), 0, 255).astype(np.uint8)


LAB_A = dict(h=(0.65, 0.70, 0.29), e=(0.07, 0.99, 0.11), glass=(240, 238, 245))
LAB_B = dict(h=(0.52, 0.80, 0.30), e=(0.22, 0.93, 0.29), glass=(250, 240, 226), gamma=1.25)


def test_estimate_recovers_known_stains_and_maps_onto_the_reference():
    conc = _concentrations(1)
    tiles = _render(conc, **LAB_A)
    stain = estimate_stain(tiles, np.array(LAB_A["glass"], np.float64))
    assert stain.method == "macenko"
    assert float(np.dot(stain.stains[0], _unit(LAB_A["h"]))) > 0.99
    assert float(np.dot(stain.stains[1], _unit(LAB_A["e"]))) > 0.99
    out = normalise_uint8(tiles, stain)
    od = -np.log(np.maximum(out.reshape(-1, 3).astype(np.float64), 1.0) / 255.0)
    stained = (-np.log(np.maximum(tiles.reshape(-1, 3), 1.0) / np.array(LAB_A["glass"])) > 0.15).any(axis=1)
    ref = np.stack([*(_unit(v) for v in REFERENCE_STAINS), _unit(np.cross(*REFERENCE_STAINS))])
    mapped = od[stained] @ np.linalg.inv(ref)
    # the normalised slide's 99th-percentile H and E concentrations are the reference's
    assert np.allclose(np.percentile(mapped[:, :2], 99, axis=0), REFERENCE_MAX, rtol=0.08)


def test_two_labs_same_tissue_map_onto_the_same_pixels():
    conc = _concentrations(2)
    a, b = _render(conc, **LAB_A), _render(conc, **LAB_B)
    raw = np.abs(a.astype(float) - b).mean()
    na = normalise_uint8(a, estimate_stain(a, np.array(LAB_A["glass"], float)))
    nb = normalise_uint8(b, estimate_stain(b, np.array(LAB_B["glass"], float)))
    normalised = np.abs(na.astype(float) - nb).mean()
    assert raw > 15 and normalised < 3, (raw, normalised)


def test_glass_only_keeps_the_identity_and_says_why():
    glass = np.full((4, 64, 64, 3), 238, np.uint8)
    stain = estimate_stain(glass, np.array([238.0, 238.0, 238.0]))
    assert stain.method.startswith("none (") and "stained pixels" in stain.method
    out = normalise_uint8(glass, stain)
    assert (out == 255).all()  # the slide's glass is the reference white


def test_real_aperio_slide(cmu_slide_path):
    cfg = Config()
    with open_slide(cmu_slide_path) as slide:
        stain = tissue_stain(slide, cfg)
    assert stain.method == "macenko"
    h, e = np.asarray(stain.stains)
    assert h[0] > e[0] and e[1] > h[1]  # haematoxylin absorbs red, eosin green light
    assert all(1.0 < m < 8.0 for m in stain.max_conc)
    record = stain.record()
    assert json.loads(json.dumps(record)) == record


def _normalising(tmp_path) -> Classifier:
    clf = Classifier(model=build_model("resnet10t").eval(), arch="resnet10t", class_names=CLASSES, target_mpp=1.0,
                     tile_px=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, stain_normalisation="macenko")
    save_classifier(clf, tmp_path / "m.safetensors")
    return load_classifier(tmp_path / "m.safetensors")


def test_checkpoint_keeps_the_normalisation_and_refuses_unknown_ones(tmp_path):
    from safetensors.torch import load_file, save_file

    clf = _normalising(tmp_path)
    assert clf.stain_normalisation == "macenko" and clf.describe()["stain_normalisation"] == "macenko"
    path = tmp_path / "m.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["wsi_response"])
    meta["stain_normalisation"] = "reinhard"
    save_file(load_file(str(path)), str(tmp_path / "bad.safetensors"), metadata={"wsi_response": json.dumps(meta)})
    with pytest.raises(ModelError, match='stain_normalisation "reinhard" is not one of'):
        load_classifier(tmp_path / "bad.safetensors")


def test_a_normalising_model_reads_every_slide_with_its_stain(tmp_path, synth_tiff_slide):
    from wsi_response.inference import predict
    from wsi_response.tiling import tile_grid
    from wsi_response.tissue import detect_tissue, read_overview

    clf = _normalising(tmp_path)
    cfg = Config()
    with open_slide(synth_tiff_slide.slide_path) as slide:
        grid = tile_grid(slide, detect_tissue(slide), cfg.tiling)
        stain = tissue_stain(slide, cfg)
        plain = predict(slide, grid, clf.for_slide(stain), num_workers=0, device="cpu").probs
        estimated = predict(slide, grid, clf, num_workers=0, device="cpu").probs  # no stain given: the run's
        # the map is applied: the same model without it sees other pixels and gives other numbers
        raw = predict(slide, grid, Classifier(**{**clf.__dict__, "stain_normalisation": None}),
                      num_workers=0, device="cpu").probs
    assert np.isfinite(plain).all() and not np.allclose(plain, raw, atol=1e-4)
    assert np.array_equal(estimated, plain)
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(clf.normalise(x.clone()), Classifier(**{**clf.__dict__, "stain_normalisation": None})
                       .normalise(x.clone()))  # no slide stain: mean/std only (tiles mapped when loaded)


def test_a_run_records_the_stain_it_used(tmp_path, synth_tiff_slide):
    from wsi_response.pipeline import process_slide

    clf = _normalising(tmp_path)
    record = process_slide(synth_tiff_slide.slide_path, "s", tmp_path / "s", clf, Config())
    assert record["status"] == "ok" and record["n_tiles"] > 0
    stain = record["stain_normalisation"]
    assert stain["method"] == "macenko" and len(stain["stain_od"]) == 2
    assert json.loads((tmp_path / "s" / "slide.json").read_text())["stain_normalisation"] == stain
    assert record["model"]["stain_normalisation"] == "macenko"
