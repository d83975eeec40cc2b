"""Run configuration: frozen dataclasses, loaded from YAML with ``key=value`` overrides.

The dataclass defaults below are the defaults; ``configs/default.yaml`` documents every field with
its unit and is tested to match them. Each field's ``metadata`` holds its allowed range
(``range=(lo, hi)``, inclusive) or choices, checked by :func:`load_config`.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from .errors import ConfigError
from .inputs import UnreadableInput, read_regular_file

__all__ = [
    "TissueConfig",
    "TilingConfig",
    "InferenceConfig",
    "QcConfig",
    "TrainingConfig",
    "AnnotationConfig",
    "Config",
    "load_config",
    "config_to_dict",
]

MAX_CONFIG_BYTES = 1 << 20  # a config file is a few kB; larger ones are refused before parsing
MAX_YAML_DEPTH = 16         # nesting levels a config may have (it needs 4)


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
    refine: str = _f("dense", choices=("none", "dense"))      # class borders inside cells: none (a cell is one class) | dense (per sub-cell, from the CNN feature map)
    subcells: int = _f(7, range=(1, 64))                      # sub-cells per cell side with refine: dense (side stride_px / subcells px)


@dataclass(frozen=True)
class InferenceConfig:
    """Batched CNN inference."""

    batch_size: int = _f(64, range=(1, 4096))                 # tiles per forward pass (GPU: 512 recommended)
    num_workers: int = _f(2, range=(0, 128))                  # tile-reading processes, inference and focus QC (0: in-process)
    device: str = _f("auto", choices=("auto", "cpu", "cuda"))
    autocast: str = _f("bf16", choices=("bf16", "fp16", "fp32"))  # CUDA autocast dtype (fp32: none); CPU runs fp32
    compile: bool = _f(False)                                 # torch.compile the model on CUDA (eager fallback)
    decode: str = _f("workers", choices=("workers", "device"))  # where JPEG tiles are decoded


@dataclass(frozen=True)
class QcConfig:
    """Artefact detection (on the tissue mask's grid) and the QC flags and verdict."""

    ink_min_excess_od: float = _f(0.15, range=(0.0, 3.0))     # colour ink seed: OD excess out of the H&E gamut
    ink_grow_excess_od: float = _f(0.15, range=(0.0, 3.0))    # ... grows through px with this excess over surroundings
    ink_context_um: float = _f(40.0, range=(4.0, 1000.0))     # Gaussian sigma of the tissue around ink, µm
    black_min_od: float = _f(0.55, range=(0.0, 3.0))          # black ink seed: every channel's OD above this
    black_grow_od: float = _f(0.40, range=(0.0, 3.0))         # black ink grows through px above this flat OD
    black_max_spread: float = _f(0.40, range=(0.0, 2.0))      # black ink seed: (max - min) / mean channel OD
    focus_mpp: float = _f(1.0, range=(0.25, 8.0))             # µm/px the focus measure is computed at
    focus_smooth_um: float = _f(4.0, range=(1.0, 500.0))      # Gaussian sigma pooling the focus measure, µm
    blur_max_sharpness: float = _f(0.25, range=(0.0, 100.0))  # out of focus: fine / coarse detail energy below this
    blur_max_relative: float = _f(0.5, range=(0.0, 1.0))      # ... and below this x the slide's sharp tissue
    focus_reference_percentile: float = _f(75.0, range=(1.0, 99.0))  # of tissue sharpness: "sharp" for this slide
    fold_min_od_ratio: float = _f(1.9, range=(1.0, 10.0))     # fold: tissue OD >= this x its surroundings
    fold_context_um: float = _f(300.0, range=(10.0, 5000.0))  # Gaussian sigma of a fold's surroundings, µm
    fold_max_colour_shift: float = _f(0.15, range=(0.0, 2.0))  # fold: L1 distance of OD chromaticity to surroundings
    rim_min_od: float = _f(0.25, range=(0.0, 3.0))            # bubble rim / coverslip edge: every channel's OD above this
    rim_max_spread: float = _f(0.6, range=(0.0, 2.0))         # ... and (max - min) / mean channel OD below this
    rim_max_width_um: float = _f(16.0, range=(1.0, 200.0))    # dark lines thinner than this are rims or edges, µm
    bubble_max_od_ratio: float = _f(0.5, range=(0.0, 1.0))    # bubble interior OD <= this x the tissue median
    bubble_min_solidity: float = _f(0.9, range=(0.0, 1.0))    # bubble interior area / its convex hull's
    edge_min_length_um: float = _f(1000.0, range=(10.0, 100000.0))  # straight dark line this long: coverslip edge
    min_artefact_mm2: float = _f(0.002, range=(0.0, 100.0))   # smaller blur/fold/bubble pieces are dropped (not ink), mm²
    tile_white_min_grey: float = _f(230.0, range=(0.0, 255.0))  # tile mean grey above this: near-white tile
    tile_black_max_grey: float = _f(30.0, range=(0.0, 255.0))   # tile mean grey below this: near-black tile
    flag_artefact_fraction: float = _f(0.02, range=(0.0, 1.0))  # one kind above this fraction of tissue: caveat
    max_artefact_fraction: float = _f(0.25, range=(0.0, 1.0))   # all kinds above this fraction: not reportable
    min_tissue_mm2: float = _f(0.05, range=(0.0, 1000.0))       # less tissue than this: not reportable, mm²
    min_tumor_bed_mm2: float = _f(1.0, range=(0.0, 10000.0))    # smaller tumor bed: caveat, mm²
    mpp_power_tolerance: float = _f(0.3, range=(0.0, 1.0))      # |mpp / (10 / power) - 1| above this: caveat
    max_failed_slide_fraction: float = _f(0.25, range=(0.0, 1.0))  # more failed slides: specimen not reportable


@dataclass(frozen=True)
class TrainingConfig:
    """Training a tile classifier from annotated slides (``wsi-response train``)."""

    arch: str = _f("lcnet_050")                               # timm model name
    pretrained: bool = _f(False)                              # start from timm's published weights (downloaded once, cached)
    epochs: int = _f(20, range=(1, 1000))                     # passes of as many draws as there are training tiles; the best on validation is kept
    batch_size: int = _f(32, range=(1, 4096))                 # tiles per optimisation step
    learning_rate: float = _f(0.003, range=(1e-6, 1.0))       # AdamW peak learning rate (cosine decay)
    weight_decay: float = _f(0.0001, range=(0.0, 1.0))        # AdamW weight decay
    val_split: float = _f(0.25, range=(0.0, 0.9))             # fraction of SLIDES held out for validation
    seed: int = _f(0, range=(0, 2**31 - 1))                   # seeds sampling, split, init and augmentation
    sample_stride_um: float = _f(16.0, range=(1.0, 10000.0))  # lattice step of candidate tile centres in a region, µm
    min_tiles_per_region: int = _f(4, range=(1, 10000))       # finer lattice (down to 1 px) for regions with fewer centres
    max_tiles_per_region: int = _f(24, range=(1, 1_000_000))  # cap per annotated region, drawn at random
    stain_normalisation: bool = _f(True)                      # map each slide onto reference stains (Macenko) before the CNN, here and in every run of the model
    hed_jitter: float = _f(0.2, range=(0.0, 0.5))             # stain augmentation: HED scale half-range (shift 1/20 of it; 0: off)
    colour_jitter: float = _f(0.1, range=(0.0, 0.5))          # brightness/contrast/saturation half-range; hue ± this × 60° (0: off)
    blur_max_um: float = _f(1.0, range=(0.0, 10.0))           # half the tiles blurred, Gaussian sigma U(0, this) µm (0: off)
    scale_jitter: float = _f(0.2, range=(0.0, 0.5))           # crop side × U(1 - this, 1 + this), resized to tile_px
    jpeg_quality_min: int = _f(60, range=(0, 95))             # half the tiles re-encoded as JPEG, quality U(this, 95) (0: off)
    amp_dtype: str = _f("bf16", choices=("bf16", "fp16"))     # CUDA autocast dtype (CPU trains in float32)
    num_threads: int = _f(0, range=(0, 256))                  # CPU threads for torch (0: torch's default)


_DEFAULT_NAME_MAP: dict[str, str] = {
    "viable tumor": "viable_tumor", "viable tumour": "viable_tumor", "viable": "viable_tumor",
    "tumor": "viable_tumor", "tumour": "viable_tumor",
    "necrosis": "necrosis", "necrotic": "necrosis",
    "fibrosis": "fibrosis", "stroma": "fibrosis", "fibrous": "fibrosis", "hyalinization": "fibrosis",
    "other": "other", "normal": "other", "fat": "other", "muscle": "other", "blood": "other",
}


@dataclass(frozen=True)
class AnnotationConfig:
    """Reading QuPath annotations: classification name (case-insensitive) -> canonical class id."""

    name_map: dict[str, str] = field(default_factory=lambda: dict(_DEFAULT_NAME_MAP),
                                     metadata={"range": None, "choices": None})

    def __post_init__(self) -> None:
        from .classes import CLASSES

        for name, cls in self.name_map.items():
            if cls not in CLASSES:
                raise ConfigError(f"annotations.name_map: {name!r} maps to {cls!r}, "
                                  f"which is not one of {', '.join(CLASSES)}")
        # keys are matched case-insensitively (stored lower-case)
        object.__setattr__(self, "name_map", {k.strip().lower(): v for k, v in self.name_map.items()})


@dataclass(frozen=True)
class Config:
    """Everything a run depends on, apart from the slides and the model file."""

    tissue: TissueConfig = field(default_factory=TissueConfig)
    tiling: TilingConfig = field(default_factory=TilingConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    qc: QcConfig = field(default_factory=QcConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    annotations: AnnotationConfig = field(default_factory=AnnotationConfig)

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
            raw = read_regular_file(path, "config file", MAX_CONFIG_BYTES)
        except UnreadableInput as exc:
            raise ConfigError(f"{path}: {exc}") from None
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None
        loaded = _parse_yaml(text, f"{path}: not valid YAML") or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a config file must be a mapping of sections")
        values = loaded
    for item in overrides:
        key, sep, raw_value = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"override {_shown(item)}: expected section.key=value, e.g. tiling.target_mpp=0.5")
        section, _, name = key.strip().partition(".")
        values.setdefault(section, {})
        if not isinstance(values[section], dict):
            raise ConfigError(f"{section}: must be a mapping")
        values[section][name] = _parse_yaml(raw_value, f"override {_shown(item)}: not a valid YAML value")
    return _build(Config, values, "")


class _ConfigLoader(yaml.SafeLoader):
    """YAML's safe loader without anchors and aliases and with at most ``MAX_YAML_DEPTH`` levels of nesting.

    A config needs neither; aliases are what "billion laughs" documents multiply, and deep
    nesting exhausts the recursion of the composer.
    """

    depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(None, None, "anchors and aliases (&name, *name) are not allowed in a "
                                              "config", event.start_mark)
        if self.depth >= MAX_YAML_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_YAML_DEPTH} levels deep",
                                              event.start_mark)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _parse_yaml(text: str, what: str) -> Any:
    """``text`` parsed by :class:`_ConfigLoader`; a ``ConfigError`` starting with ``what`` if it is not valid."""
    try:
        return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 (a SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{what} ({where}{_cut(exc.problem or exc.context or '', 200)})") from None
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: e.g. an integer of more digits than Python reads
        raise ConfigError(f"{what} ({_cut(str(exc).split(';')[0], 200)})") from None


def _shown(value: Any) -> str:
    """``repr(value)`` for a message: one line, at most 80 characters (never a whole document)."""
    return _cut(repr(value), 80)


def _cut(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else f"{text[:limit - 1]}…"


def _build(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise ConfigError(f"{prefix}{_cut(str(key), 80)}: unknown key (known: {', '.join(known)})")
    kwargs: dict[str, Any] = {}
    for name, fld in known.items():
        if name not in values:
            continue
        kind = hints[name]
        value = values[name]
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{prefix}{name}: must be a mapping of keys, got {_shown(value)}")
            kwargs[name] = _build(kind, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _check(f"{prefix}{name}", kind, value, fld.metadata)
    return cls(**kwargs)


def _check(key: str, kind: Any, value: Any, meta: Mapping[str, Any]) -> Any:
    if isinstance(kind, types.GenericAlias) or typing.get_origin(kind) is not None:
        origin = typing.get_origin(kind)
        if origin is dict and isinstance(value, dict):
            return {str(k): str(v) for k, v in value.items()}
        raise ConfigError(f"{key}: {_shown(value)} is not a {kind}")
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: {_shown(value)} is not true/false")
        return value
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: {_shown(value)} is not a number")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}: {value!r} is not a finite number")
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{key}: {value!r} is not a whole number")
        lo_hi = meta.get("range")
        if lo_hi is not None and not (lo_hi[0] <= value <= lo_hi[1]):
            raise ConfigError(f"{key}: {_shown(value)} is out of range [{lo_hi[0]}, {lo_hi[1]}]")
        return kind(value)
    if kind is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):  # bytes (!!binary), lists, dates, null
            raise ConfigError(f"{key}: {_shown(value)} is not text")
        value = str(value)
        choices = meta.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"{key}: {_shown(value)} is not one of {', '.join(choices)}")
        return value
    raise ConfigError(f"{key}: unsupported type {kind}")
