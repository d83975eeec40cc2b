"""Config loading, overrides, validation, and configs/default.yaml == the built-in defaults."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from wsi_response.config import Config, config_to_dict, load_config
from wsi_response.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_default_yaml_documents_every_field_with_the_default_value():
    documented = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    assert documented == config_to_dict(Config())
    text = (ROOT / "configs" / "default.yaml").read_text()
    for section, fields in documented.items():
        for name in fields:
            line = next(l for l in text.splitlines() if l.strip().startswith(f"{name}:"))
            assert "#" in line, f"{section}.{name} has no comment"


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("tiling:\n  target_mpp: 0.5\n  tile_px: 256\n")
    cfg = load_config(path, ["tiling.stride_px=128", "inference.device=cpu"])
    assert cfg.tiling.target_mpp == 0.5 and cfg.tiling.tile_px == 256 and cfg.tiling.stride_px == 128
    assert cfg.inference.device == "cpu"
    assert cfg.tissue == Config().tissue
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.tiling.tile_px = 1  # type: ignore[misc]


@pytest.mark.parametrize("override, words", [
    ("tiling.tile_px=5", "tiling.tile_px: 5 is out of range"),
    ("tiling.target_mpp=0", "tiling.target_mpp: 0 is out of range"),
    ("tiling.target_mpp=fast", "tiling.target_mpp: 'fast' is not a number"),
    ("tiling.tile_px=100.5", "not a whole number"),
    ("tiling.colour=red", "tiling.colour: unknown key"),
    ("nosection.x=1", "nosection: unknown key"),
    ("inference.device=tpu", "inference.device: 'tpu' is not one of"),
    ("training.arch=!!binary AAAA", "training.arch: b'\\x00\\x00\\x00' is not text"),
    ("training.arch=[resnet18]", "training.arch: ['resnet18'] is not text"),
    ("tiling.stride_px=300", "larger than tiling.tile_px"),
    ("justtext", "expected section.key=value"),
])
def test_bad_values_name_key_and_value(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert words in str(err.value)


def test_bad_yaml_file_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("tiling: [unclosed\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value)
