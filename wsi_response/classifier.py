"""The tile classifier: a timm CNN over RGB tiles, saved as one ``.safetensors`` file.

Checkpoint format (``FORMAT``): a safetensors file whose tensors are the model's state dict and
whose string metadata key ``"wsi_response"`` holds JSON::

    format, arch, class_names, target_mpp (µm/px), tile_px, mean, std (input normalisation of
    RGB in [0, 1]), weights_dtype, trained_on {...}, metrics {...}, software_version,
    temperature (probabilities are softmax(logits / temperature); absent: 1),
    validation_error {confusion_matrix, n_per_class, n_tiles, n_slides, axes} or absent
    (:mod:`wsi_response.calibration`; no validation: the model's error is unknown),
    stain_normalisation ("macenko": every slide's tiles are mapped onto the reference stains of
    :mod:`wsi_response.stain` before the model; absent or null: raw RGB)

safetensors never executes code on load (no pickle). A checkpoint whose metadata has a wrong
type or a value that is not finite (or a std that is not positive), or whose weights hold NaN or
inf, is refused at load with a one-line ``ModelError``: its outputs could not be trusted. The
file's sha256 identifies the model in every result. No creation time is stored, so the same training gives a byte-identical file.
Backbones come from timm by name, always with ``pretrained=False`` (no downloads); local
pretrained backbone weights can be given as a file.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from . import __version__
from .atomic import write_atomic
from .classes import CLASSES
from .config import TilingConfig
from .errors import ConfigError, ModelError
from .inputs import UnreadableInput, file_problem, read_regular_file
from .stain import SlideStain, apply_stain

__all__ = [
    "FORMAT",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Classifier",
    "build_model",
    "save_classifier",
    "load_classifier",
    "default_model_path",
    "with_provenance",
    "to_unit_float",
]

FORMAT = "wsi-response-classifier/1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STAIN_NORMALISATIONS = (None, "macenko")
_META_KEY = "wsi_response"
_MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class Classifier:
    """A model with everything needed to feed it and to describe it in results."""

    model: nn.Module
    arch: str
    class_names: tuple[str, ...]
    target_mpp: float                  # µm/px of the tiles it was trained on
    tile_px: int                       # tile side at target_mpp, px
    mean: tuple[float, float, float]   # per-channel mean of RGB in [0, 1]
    std: tuple[float, float, float]
    trained_on: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    software_version: str = __version__
    temperature: float = 1.0           # probabilities = softmax(logits / temperature)
    validation_error: Mapping[str, Any] | None = None  # confusion on held-out slides, or None
    stain_normalisation: str | None = None  # "macenko": fed per-slide stain-normalised tiles
    slide_stain: SlideStain | None = None   # the stain of the slide being read (not saved)
    path: Path | None = None           # file it was loaded from
    sha256: str | None = None          # of that file

    def metadata(self, weights_dtype: str = "float32") -> dict[str, Any]:
        """The JSON stored in the checkpoint."""
        return {
            "format": FORMAT,
            "arch": self.arch,
            "class_names": list(self.class_names),
            "target_mpp": self.target_mpp,
            "tile_px": self.tile_px,
            "mean": list(self.mean),
            "std": list(self.std),
            "weights_dtype": weights_dtype,
            "trained_on": dict(self.trained_on),
            "metrics": dict(self.metrics),
            "software_version": self.software_version,
            "temperature": self.temperature,
            "validation_error": None if self.validation_error is None else dict(self.validation_error),
            "stain_normalisation": self.stain_normalisation,
        }

    def describe(self) -> dict[str, Any]:
        """The ``model`` block of ``specimen.json``."""
        return {
            "name": self.path.name if self.path else self.arch,
            "sha256": self.sha256,
            "arch": self.arch,
            "classes": list(self.class_names),
            "target_mpp": self.target_mpp,
            "tile_px": self.tile_px,
            "trained_on": dict(self.trained_on),
            "temperature": self.temperature,
            "validation_error": None if self.validation_error is None else dict(self.validation_error),
            "stain_normalisation": self.stain_normalisation,
        }

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated class probabilities ``softmax(logits / temperature)`` over the last axis (the
        classes), float32: ``(n, C)``, or ``(n, 1 + k*k, C)`` with sub-cells."""
        return torch.softmax(logits.float() / self.temperature, dim=-1)

    def check_compatible(self, tiling: TilingConfig) -> None:
        """Raise ``ModelError`` naming every tiling field whose run value differs from the model's."""
        problems = []
        if not math.isclose(self.target_mpp, tiling.target_mpp, rel_tol=1e-6):
            problems.append(f"tiling.target_mpp: model {self.target_mpp:g} µm/px, run {tiling.target_mpp:g} µm/px")
        if self.tile_px != tiling.tile_px:
            problems.append(f"tiling.tile_px: model {self.tile_px} px, run {tiling.tile_px} px")
        if problems:
            raise ModelError(self.path or self.arch,
                             "does not match the run config (" + "; ".join(problems)
                             + "); set these in the config or use a model trained for them")

    def for_slide(self, stain: SlideStain | None) -> "Classifier":
        """This model reading one slide whose stain estimate is ``stain`` (used by :meth:`normalise`)."""
        return replace(self, slide_stain=stain)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1] ``(n, 3, h, w)`` -> the model's normalised input: mapped onto the reference
        stains when :attr:`slide_stain` is set (tiles held in memory are mapped when loaded), then
        standardised by ``mean``/``std``."""
        if self.slide_stain is not None:
            x = apply_stain(x, torch.tensor(self.slide_stain.glass), torch.from_numpy(self.slide_stain.matrix()))
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return x.sub_(mean).div_(std)


def build_model(arch: str, num_classes: int = len(CLASSES), weights: str | os.PathLike | None = None,
                pretrained: bool = False) -> nn.Module:
    """A timm ``arch`` with a ``num_classes`` head, random init unless told otherwise.

    ``weights``: a local ``.safetensors`` or ``.pth``/``.pt`` state dict of the backbone; its
    classifier head is dropped when its shape does not fit. ``pretrained``: timm's published
    weights, downloaded once into the Hugging Face cache (the only download wsi-response makes).
    Raises ``ConfigError`` for an unknown arch and ``ModelError`` for weights that do not fit the
    backbone or cannot be downloaded.
    """
    import timm

    if not timm.is_model(arch):
        raise ConfigError(f"arch {arch!r}: not a timm model name (e.g. resnet18, resnet50, efficientnet_b0)")
    if pretrained:
        return _create_pretrained(arch, num_classes)
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes)
    if weights is not None:
        _load_backbone_weights(model, Path(weights))
    return model


def _create_pretrained(arch: str, num_classes: int) -> nn.Module:
    """timm's published weights of ``arch`` (from the cache, else downloaded); one-line ModelError offline."""
    import urllib.error

    import timm
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return timm.create_model(arch, pretrained=True, num_classes=num_classes)
    except (LocalEntryNotFoundError, HfHubHTTPError, urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        raise ModelError(f"timm:{arch}", f"--pretrained: cannot download the published weights and none are cached "
                         f"({type(exc).__name__}: offline or hub unreachable); run once where the Hugging Face hub "
                         "is reachable (they are cached), or pass a local file with --weights PATH") from None
    except RuntimeError as exc:  # timm: the architecture has no published weights
        raise ModelError(f"timm:{arch}", f"--pretrained: {' '.join(str(exc).split())[:200]}") from None


def _load_backbone_weights(model: nn.Module, path: Path) -> None:
    problem = file_problem(path, "weights file")
    if problem is not None:
        raise ModelError(path, problem)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
                state = state["state_dict"]
    except Exception as exc:
        raise ModelError(path, f"cannot read weights ({' '.join(str(exc).split())[:200]})") from None
    if not isinstance(state, dict):
        raise ModelError(path, "weights file does not hold a state dict")
    own = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    head = {n for n, _ in model.named_parameters() if n.startswith(_head_prefix(model))}
    missing = [k for k in own if k not in fitting and k not in head and not k.endswith("num_batches_tracked")]
    if missing:
        raise ModelError(path, f"weights do not fit {type(model).__name__}: {len(missing)} backbone tensors "
                         f"missing or of another shape (first: {missing[0]})")
    model.load_state_dict(fitting, strict=False)


def _head_prefix(model: nn.Module) -> str:
    """State-dict prefix of the model's classifier head (timm's ``default_cfg['classifier']``)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("classifier", "fc"))


def save_classifier(classifier: Classifier, path: str | os.PathLike, weights_dtype: str = "float32") -> str:
    """Write ``classifier`` to ``path`` (temporary name, then rename); return the file's sha256.

    ``weights_dtype`` "float16" halves the file; floating tensors are cast back to float32 on load.
    """
    from safetensors.torch import save

    if weights_dtype not in ("float32", "float16"):
        raise ValueError(f"weights_dtype must be float32 or float16, not {weights_dtype!r}")
    dtype = getattr(torch, weights_dtype)
    state = {k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()).contiguous()
             for k, v in classifier.model.state_dict().items()}
    meta = json.dumps(classifier.metadata(weights_dtype), sort_keys=True, allow_nan=False)
    data = save(state, metadata={_META_KEY: meta})
    write_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


def load_classifier(path: str | os.PathLike, tiling: TilingConfig | None = None) -> Classifier:
    """Load a checkpoint written by :func:`save_classifier` (no pickle, no download).

    With ``tiling``, also :meth:`Classifier.check_compatible`. Every problem is a ``ModelError``
    naming the file.
    """
    from safetensors.torch import load

    path = Path(path)
    try:
        data = read_regular_file(path, "model file")
    except UnreadableInput as exc:
        raise ModelError(path, str(exc)) from None
    meta = _read_metadata(path, data)
    try:
        state = load(data)
    except Exception as exc:
        raise ModelError(path, f"corrupt safetensors data ({' '.join(str(exc).split())[:200]})") from None
    arch, class_names, target_mpp, tile_px, mean, std = _checked_fields(path, meta)
    if class_names != CLASSES:
        raise ModelError(path, f"model classes {list(class_names)} differ from {list(CLASSES)}")
    try:
        temperature = float(meta.get("temperature", 1.0))
        validation = _validation_error(meta.get("validation_error"), len(class_names))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(path, f"checkpoint metadata lacks or garbles {exc}") from None
    if not (math.isfinite(temperature) and temperature > 0):
        raise ModelError(path, f"checkpoint metadata: temperature {temperature!r} is not a positive number")
    stain_normalisation = meta.get("stain_normalisation")
    if stain_normalisation not in STAIN_NORMALISATIONS:
        raise ModelError(path, f"checkpoint metadata: stain_normalisation {json.dumps(stain_normalisation)[:60]} "
                         f"is not one of {', '.join(map(json.dumps, STAIN_NORMALISATIONS))}")
    try:
        model = build_model(arch, len(class_names))
    except ConfigError as exc:
        raise ModelError(path, str(exc)) from None
    own = model.state_dict()
    state = {k: v.to(own[k].dtype) if k in own else v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:300]
        raise ModelError(path, f"weights do not fit arch {arch!r}: {first}") from None
    broken = sorted(name for name, tensor in state.items()
                    if tensor.is_floating_point() and not torch.isfinite(tensor).all())
    if broken:
        raise ModelError(path, f"weights hold NaN or inf in {len(broken)} tensor(s) (first: {broken[0]}); the "
                         "model's outputs would not be numbers: a corrupt file or a diverged training")
    model.eval()
    clf = Classifier(model=model, arch=arch, class_names=class_names, target_mpp=target_mpp, tile_px=tile_px,
                     mean=mean, std=std, trained_on=meta["trained_on"], metrics=meta["metrics"],
                     software_version=meta["software_version"], temperature=temperature,
                     validation_error=validation, stain_normalisation=stain_normalisation, path=path,
                     sha256=hashlib.sha256(data).hexdigest())
    if tiling is not None:
        clf.check_compatible(tiling)
    return clf


def _checked_fields(path: Path, meta: dict[str, Any]
                    ) -> tuple[str, tuple[str, ...], float, int, tuple[float, ...], tuple[float, ...]]:
    """arch, class names, target_mpp, tile_px, mean and std of checkpoint metadata ``meta``, each
    checked for its type and range (a ``ModelError`` naming the first bad one)."""
    def bad(key: str, want: str) -> ModelError:
        shown = json.dumps(meta[key], allow_nan=True)[:60] if key in meta else "missing"
        return ModelError(path, f"checkpoint metadata: {key} must be {want}, got {shown}")

    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    def rgb(key: str, positive: bool) -> tuple[float, ...]:
        value = meta.get(key)
        if not (isinstance(value, list) and len(value) == 3 and all(number(v) and (v > 0 or not positive)
                                                                     for v in value)):
            raise bad(key, f"3 {'positive ' if positive else ''}finite numbers (RGB)")
        return tuple(float(v) for v in value)

    if not (isinstance(meta.get("arch"), str) and meta["arch"]):
        raise bad("arch", "a timm model name")
    if not (isinstance(meta.get("class_names"), list) and all(isinstance(c, str) for c in meta["class_names"])):
        raise bad("class_names", "a list of names")
    if not (number(meta.get("target_mpp")) and meta["target_mpp"] > 0):
        raise bad("target_mpp", "a positive finite number (µm/px)")
    if not (isinstance(meta.get("tile_px"), int) and not isinstance(meta["tile_px"], bool) and meta["tile_px"] > 0):
        raise bad("tile_px", "a positive whole number (px)")
    mean, std = rgb("mean", positive=False), rgb("std", positive=True)
    for key in ("trained_on", "metrics"):
        meta.setdefault(key, {})
        if not isinstance(meta[key], dict):
            raise bad(key, "a mapping")
    meta.setdefault("software_version", "")
    if not isinstance(meta["software_version"], str):
        raise bad("software_version", "a string")
    return (meta["arch"], tuple(meta["class_names"]), float(meta["target_mpp"]), int(meta["tile_px"]), mean, std)


def _read_metadata(path: Path, data: bytes) -> dict[str, Any]:
    """The JSON in the safetensors header's ``__metadata__``, checked for our format."""
    if len(data) < 8:
        raise ModelError(path, "not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", data[:8])
    if n <= 0 or n > min(_MAX_HEADER_BYTES, len(data) - 8):
        raise ModelError(path, "not a safetensors file (bad header length); .pth/.ckpt pickles are not loaded")
    try:
        header = json.loads(data[8:8 + n])
    except ValueError:
        raise ModelError(path, "not a safetensors file (its header is not JSON)") from None
    extra = header.get("__metadata__") if isinstance(header, dict) else None
    raw = extra.get(_META_KEY) if isinstance(extra, dict) else None
    if raw is None:
        raise ModelError(path, "safetensors file without wsi-response metadata (not a wsi-response model)")
    try:
        meta = json.loads(raw)
    except (ValueError, TypeError) as exc:
        raise ModelError(path, f"checkpoint metadata is not valid JSON ({' '.join(str(exc).split())[:120]})") from None
    if not isinstance(meta, dict):
        raise ModelError(path, f"checkpoint metadata is a JSON {type(meta).__name__}, not an object (not a "
                         "wsi-response model)")
    if meta.get("format") != FORMAT:
        raise ModelError(path, f"unsupported checkpoint format {meta.get('format')!r} (expected {FORMAT})")
    return meta


def _validation_error(block: Any, n_classes: int) -> dict[str, Any] | None:
    """The checkpoint's ``validation_error`` block, its confusion matrix checked to be
    ``n_classes`` × ``n_classes`` non-negative integer counts (ValueError otherwise)."""
    if block is None:
        return None
    counts = np.asarray(block["confusion_matrix"])
    if counts.shape != (n_classes, n_classes) or not np.issubdtype(counts.dtype, np.integer) or (counts < 0).any():
        raise ValueError(f"validation_error.confusion_matrix (need {n_classes}x{n_classes} counts)")
    return dict(block)


def with_provenance(classifier: Classifier, path: Path, sha256: str) -> Classifier:
    """``classifier`` as saved at ``path`` with file hash ``sha256``."""
    return replace(classifier, path=path, sha256=sha256)


def default_model_path() -> Path:
    """The bundled demonstration model (trained on synthetic slides only; not for clinical use)."""
    return Path(__file__).resolve().parent.parent / "models" / "demo-lcnet050-synthetic.safetensors"


def to_unit_float(tiles: torch.Tensor) -> torch.Tensor:
    """uint8 ``(n, h, w, 3)`` tiles -> float32 ``(n, 3, h, w)`` RGB in [0, 1] (same device)."""
    return tiles.permute(0, 3, 1, 2).float().div_(255.0)

