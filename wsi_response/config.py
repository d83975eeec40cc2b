"""Run configuration: frozen dataclasses, loaded from YAML with ``key=value`` overrides.

The dataclass defaults below are the defaults; ``configs/default.yaml`` documents every field with
its unit and is tested to match them. Each field's ``metadata`` holds its allowed range
(``range=(lo, hi)``, inclusive) or choices, checked by :func:`load_config`.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from .errors import ConfigError

__all__ = [
    "TissueConfig",
    "TilingConfig",
    "InferenceConfig",
    "Config",
    "load_config",
    "config_to_dict",
]


def _f(default: Any, *, range: tuple[float, float] | None = None,
       choices: tuple[str, ...] | None = None) -> Any:
    return field(default=default, metadata={"range": range, "choices": choices})


@dataclass(frozen=True)
class TissueConfig:
    """Tissue detection on a low-resolution image of the slide."""

    mask_mpp: float = _f(4.0, range=(1.0, 64.0))           # µm/px of the tissue mask
    min_optical_density: float = _f(0.08, range=(0.0, 2.0))  # OD above glass that counts as stain
    min_saturation: float = _f(0.10, range=(0.0, 1.0))       # HSV saturation that counts as stain
    closing_um: float = _f(8.0, range=(0.0, 500.0))         # radius closing gaps inside tissue, µm
    max_hole_mm2: float = _f(0.01, range=(0.0, 100.0))       # holes up to this area become tissue, mm²
    min_object_mm2: float = _f(0.01, range=(0.0, 100.0))     # tissue pieces below this are dust, mm²


@dataclass(frozen=True)
class TilingConfig:
    """The tile grid the classifier sees."""

    target_mpp: float = _f(1.0, range=(0.1, 32.0))           # µm/px of the tiles fed to the CNN
    tile_px: int = _f(224, range=(32, 2048))                  # tile side at target_mpp, px
    stride_px: int = _f(224, range=(8, 2048))                 # grid step at target_mpp, px (<= tile_px)
    min_tissue_fraction: float = _f(0.02, range=(0.0, 1.0))   # of a grid cell; emptier cells are skipped
    read_region_px: int = _f(2048, range=(256, 16384))        # side of one batched read at the read level, px


@dataclass(frozen=True)
class InferenceConfig:
    """Batched CNN inference."""

    batch_size: int = _f(64, range=(1, 4096))                 # tiles per forward pass
    num_workers: int = _f(2, range=(0, 128))                  # tile-reading worker processes (0: in-process)
    device: str = _f("auto", choices=("auto", "cpu", "cuda"))


@dataclass(frozen=True)
class Config:
    """Everything a run depends on, apart from the slides and the model file."""

    tissue: TissueConfig = field(default_factory=TissueConfig)
    tiling: TilingConfig = field(default_factory=TilingConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)

    def __post_init__(self) -> None:
        if self.tiling.stride_px > self.tiling.tile_px:
            raise ConfigError(
                f"tiling.stride_px: {self.tiling.stride_px} is larger than tiling.tile_px "
                f"{self.tiling.tile_px}; gaps between tiles would leave tissue unmeasured")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested dicts (for JSON provenance)."""
    return dataclasses.asdict(cfg)


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Defaults, updated by the YAML file at ``path``, then by ``section.key=value`` overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a config file must be a mapping of sections")
        values = loaded
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"override {item!r}: expected section.key=value, e.g. tiling.target_mpp=0.5")
        section, _, name = key.strip().partition(".")
        values.setdefault(section, {})
        if not isinstance(values[section], dict):
            raise ConfigError(f"{section}: must be a mapping")
        values[section][name] = yaml.safe_load(raw)
    return _build(Config, values, "")


def _build(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise ConfigError(f"{prefix}{key}: unknown key (known: {', '.join(known)})")
    kwargs: dict[str, Any] = {}
    for name, fld in known.items():
        if name not in values:
            continue
        kind = hints[name]
        value = values[name]
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{prefix}{name}: must be a mapping of keys, got {value!r}")
            kwargs[name] = _build(kind, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _check(f"{prefix}{name}", kind, value, fld.metadata)
    return cls(**kwargs)


def _check(key: str, kind: Any, value: Any, meta: Mapping[str, Any]) -> Any:
    if isinstance(kind, types.GenericAlias) or typing.get_origin(kind) is not None:
        origin = typing.get_origin(kind)
        if origin is dict and isinstance(value, dict):
            return {str(k): str(v) for k, v in value.items()}
        raise ConfigError(f"{key}: {value!r} is not a {kind}")
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: {value!r} is not true/false")
        return value
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: {value!r} is not a number")
        if kind is int and float(value) != int(value):
            raise ConfigError(f"{key}: {value!r} is not a whole number")
        lo_hi = meta.get("range")
        if lo_hi is not None and not (lo_hi[0] <= value <= lo_hi[1]):
            raise ConfigError(f"{key}: {value!r} is out of range [{lo_hi[0]}, {lo_hi[1]}]")
        return kind(value)
    if kind is str:
        value = str(value)
        choices = meta.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}")
        return value
    raise ConfigError(f"{key}: unsupported type {kind}")
