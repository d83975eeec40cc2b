"""Checkpoints: round trip, metadata, sha256, compatibility messages, no pickle."""
from __future__ import annotations

import hashlib
import pickle

import pytest
import torch
from safetensors.torch import save_file

from wsi_response.classes import CLASSES
from wsi_response.classifier import (
    IMAGENET_MEAN, IMAGENET_STD, Classifier, build_model, default_model_path, load_classifier, save_classifier,
)
from wsi_response.config import TilingConfig
from wsi_response.errors import ConfigError, ModelError


def _tiny(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(model=build_model("resnet10t").eval(), arch="resnet10t", class_names=CLASSES, target_mpp=1.0,
                      tile_px=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                      trained_on={"synthetic": True, "n_slides": 2}, metrics={"val": {"balanced_accuracy": 0.5}})


def test_round_trip_is_bit_exact_and_sha256_is_the_files(tmp_path):
    clf = _tiny()
    path = tmp_path / "m.safetensors"
    sha = save_classifier(clf, path)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = load_classifier(path)
    assert loaded.sha256 == sha and loaded.path == path
    a, b = clf.model.state_dict(), loaded.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(clf.model(x), loaded.model(x))
    assert loaded.metadata() == clf.metadata()
    assert loaded.trained_on == {"synthetic": True, "n_slides": 2}
    # no creation time: saving again gives the same bytes
    assert save_classifier(loaded, tmp_path / "again.safetensors") == sha


def test_float16_weights_halve_the_file_and_load_as_float32(tmp_path):
    clf = _tiny()
    save_classifier(clf, tmp_path / "32.safetensors")
    save_classifier(clf, tmp_path / "16.safetensors", weights_dtype="float16")
    assert (tmp_path / "16.safetensors").stat().st_size < 0.55 * (tmp_path / "32.safetensors").stat().st_size
    loaded = load_classifier(tmp_path / "16.safetensors")
    w = loaded.model.state_dict()["conv1.0.weight"]
    assert w.dtype == torch.float32
    assert torch.allclose(w, clf.model.state_dict()["conv1.0.weight"], atol=1e-3)


def test_mismatch_names_field_model_and_run_values(tmp_path):
    path = tmp_path / "m.safetensors"
    save_classifier(_tiny(), path)
    with pytest.raises(ModelError) as info:
        load_classifier(path, TilingConfig(target_mpp=0.5, tile_px=256, stride_px=256))
    msg = str(info.value)
    assert msg.startswith(str(path))
    assert "tiling.target_mpp: model 1 µm/px, run 0.5 µm/px" in msg
    assert "tiling.tile_px: model 224 px, run 256 px" in msg
    load_classifier(path, TilingConfig())  # defaults match


def test_pickles_are_never_loaded(tmp_path):
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps({"model": Evil()}))
    with pytest.raises(ModelError, match="not a safetensors file"):
        load_classifier(path)
    assert not marker.exists()
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ModelError, match="without wsi-response metadata"):
        load_classifier(plain)
    with pytest.raises(ModelError, match="no such model file"):
        load_classifier(tmp_path / "missing.safetensors")


def test_unknown_arch_and_local_backbone_weights(tmp_path):
    with pytest.raises(ConfigError, match="not a timm model name"):
        build_model("resnet_does_not_exist")
    torch.manual_seed(1)
    donor = build_model("resnet10t", num_classes=10)  # other head shape: dropped
    save_file({k: v.contiguous() for k, v in donor.state_dict().items()}, str(tmp_path / "bb.safetensors"))
    model = build_model("resnet10t", weights=tmp_path / "bb.safetensors")
    assert torch.equal(model.state_dict()["conv1.0.weight"], donor.state_dict()["conv1.0.weight"])
    assert model.state_dict()["fc.weight"].shape == (4, 512)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ModelError, match="backbone tensors missing"):
        build_model("resnet10t", weights=tmp_path / "wrong.safetensors")


def test_bundled_demo_model_loads_and_fits_the_default_config():
    clf = load_classifier(default_model_path(), TilingConfig())
    assert clf.class_names == CLASSES and clf.trained_on["synthetic"] is True
    assert default_model_path().stat().st_size < 50e6


def test_calibration_and_validation_error_round_trip(tmp_path):
    from dataclasses import replace

    block = {"confusion_matrix": [[9, 1, 0, 0], [0, 8, 2, 0], [0, 0, 10, 0], [1, 0, 0, 9]],
             "n_per_class": {"viable_tumor": 10, "necrosis": 10, "fibrosis": 10, "other": 10},
             "n_tiles": 40, "n_slides": 2, "axes": "rows: true class"}
    clf = replace(_tiny(), temperature=1.7, validation_error=block)
    save_classifier(clf, tmp_path / "m.safetensors")
    loaded = load_classifier(tmp_path / "m.safetensors")
    assert loaded.temperature == 1.7 and loaded.validation_error == block
    assert loaded.describe()["temperature"] == 1.7 and loaded.describe()["validation_error"] == block
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(loaded.probabilities(logits), torch.softmax(logits / 1.7, dim=1))
    plain = _tiny()
    save_classifier(plain, tmp_path / "p.safetensors")
    assert load_classifier(tmp_path / "p.safetensors").describe()["validation_error"] is None
    for bad, message in ((replace(clf, temperature=-1.0), "temperature -1.0 is not a positive number"),
                         (replace(clf, validation_error={"confusion_matrix": [[1, 2], [3, 4]]}),
                          r"lacks or garbles validation_error.confusion_matrix \(need 4x4 counts\)")):
        save_classifier(bad, tmp_path / "bad.safetensors")
        with pytest.raises(ModelError, match=message):
            load_classifier(tmp_path / "bad.safetensors")
