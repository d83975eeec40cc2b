"""Training a tile classifier from slides and QuPath annotations; evaluation by slide.

Sampling (:mod:`.train_sampling`): tiles from every annotated region, small regions and thin
sketches included (a fine lattice of centres inside each polygon, at least
``training.min_tiles_per_region`` and at most ``training.max_tiles_per_region`` per region), read
with context at the run's ``tiling.target_mpp`` through ``TileReader`` (the pixels inference
reads). Tiles are held in memory as uint8 (about 230 KB each at 224 px with 20 % scale jitter).

Training. Each epoch draws as many tiles as the training set holds (rounded up to whole
batches), with replacement, classes
equal, annotation names within a class equal and regions ∝ sqrt(tiles)
(:func:`.train_sampling.epoch_weights`), augments them (:mod:`.augment`: JPEG, scale, flips and
rotations, HED stain, colour, blur) and optimises cross-entropy with AdamW and a cosine schedule:
float32 on CPU, bf16/fp16 autocast on CUDA (GradScaler for fp16). Validation holds out whole
SLIDES (``training.val_split``), never tiles; after every epoch the model is scored on them and
the epoch of the best balanced accuracy is the one saved. The report gives recall per class and
per annotation name, and warns where fewer than ``MIN_TRUSTED_TILES`` validation tiles carry a
recall. The best epoch's validation tiles then calibrate the model (:mod:`wsi_response.calibration`):
a temperature fitted by validation NLL and the validation confusion matrix go into the checkpoint;
the report gets the reliability bins and ECE before/after, and ``<out>.reliability.png``.
Everything random flows from ``training.seed``: the same inputs and seed give the same
weights (on the same device and thread count).
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from . import __version__
from .atomic import write_atomic, write_json_atomic
from .augment import augment, centre_crop
from .calibration import calibrate, reliability_png
from .classes import CLASSES
from .classifier import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Classifier,
    build_model,
    save_classifier,
    to_unit_float,
    with_provenance,
)
from .config import Config, config_to_dict
from .errors import ConfigError
from .inference import autocast_dtype, resolve_device
from .train_sampling import TileSet, epoch_weights, load_grid_tileset, load_tileset

__all__ = [
    "MIN_TRUSTED_TILES",
    "TrainResult",
    "pair_annotations",
    "split_by_slide",
    "classification_metrics",
    "predict_logits",
    "predict_tiles",
    "annotated_grid_logits",
    "evaluate_annotated",
    "train_classifier",
]

Log = Callable[[str], None]

MIN_TRUSTED_TILES = 30
"""Validation tiles below which a class's or name's recall is flagged as not to be trusted: at
30 tiles and a measured recall of 0.9, the 95 % (Wilson) interval is 0.74-0.97; tiles of one
region are correlated, so the real uncertainty is larger still."""


@dataclass(frozen=True)
class TrainResult:
    classifier: Classifier
    report: dict[str, Any]
    report_path: Path


def pair_annotations(slides: Sequence[Path], annotations: Sequence[Path]) -> list[tuple[Path, Path]]:
    """Pair each slide with its annotation file: by stem (``S1.svs`` <-> ``S1*.geojson``), else by order."""
    by_stem: dict[Path, Path] = {}
    for slide in slides:
        hits = [a for a in annotations if a.name == slide.stem or a.name.startswith(slide.stem + ".")]
        if len(hits) == 1:
            by_stem[slide] = hits[0]
    if len(by_stem) == len(slides) and len(set(by_stem.values())) == len(slides):
        return [(s, by_stem[s]) for s in slides]
    if len(slides) != len(annotations):
        raise ConfigError(f"--annotations: {len(annotations)} files for {len(slides)} slides, and their names "
                          "do not start with the slide stems; give one annotation file per slide, in order")
    return list(zip(slides, annotations))


def split_by_slide(n_slides: int, val_split: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Slide indices ``(train, val)``: ``round(n * val_split)`` whole slides held out (at least one if > 0)."""
    if val_split <= 0:
        return np.arange(n_slides), np.zeros(0, np.int64)
    if n_slides < 2:
        raise ConfigError(f"training.val_split: {val_split} needs at least 2 slides (validation is split by "
                          f"slide), got {n_slides}; pass --val-split 0 to train without validation")
    n_val = min(n_slides - 1, max(1, round(n_slides * val_split)))
    order = rng.permutation(n_slides)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def classification_metrics(true: np.ndarray, pred: np.ndarray, names: np.ndarray | None = None) -> dict[str, Any]:
    """Confusion matrix (rows true, columns predicted), per-class precision/recall/support,
    accuracy, balanced accuracy (mean recall over classes present) and, with ``names`` (the
    annotation name of every tile), recall and support per class and name. ``warnings`` names
    every class and name present with fewer than ``MIN_TRUSTED_TILES`` tiles."""
    c = len(CLASSES)
    confusion = np.zeros((c, c), np.int64)
    np.add.at(confusion, (true, pred), 1)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    diag = np.diag(confusion)
    recall = {cls: float(diag[i] / support[i]) if support[i] else None for i, cls in enumerate(CLASSES)}
    precision = {cls: float(diag[i] / predicted[i]) if predicted[i] else None for i, cls in enumerate(CLASSES)}
    present = [r for r in recall.values() if r is not None]
    few = [(cls, None, int(support[i])) for i, cls in enumerate(CLASSES) if 0 < support[i] < MIN_TRUSTED_TILES]
    out: dict[str, Any] = {
        "n_tiles": int(len(true)),
        "accuracy": float(diag.sum() / max(1, len(true))),
        "balanced_accuracy": float(np.mean(present)) if present else None,
        "recall": recall,
        "precision": precision,
        "support": {cls: int(support[i]) for i, cls in enumerate(CLASSES)},
        "confusion_matrix": confusion.tolist(),
        "confusion_axes": "rows: true class, columns: predicted class, order: " + ", ".join(CLASSES),
    }
    if names is not None:
        name_recall: dict[str, dict[str, float]] = {}
        name_support: dict[str, dict[str, int]] = {}
        for i, cls in enumerate(CLASSES):
            for name in sorted(set(names[true == i].tolist())):
                sel = (true == i) & (names == name)
                name_recall.setdefault(cls, {})[name] = float((pred[sel] == i).mean())
                name_support.setdefault(cls, {})[name] = int(sel.sum())
                if name_support[cls][name] < MIN_TRUSTED_TILES:
                    few.append((cls, name, name_support[cls][name]))
        out.update(name_recall=name_recall, name_support=name_support)
    out["warnings"] = [f"only {n} validation tiles of {cls}{f' / {name}' if name else ''} "
                       f"(< {MIN_TRUSTED_TILES}): its recall is not to be trusted" for cls, name, n in few]
    return out


def predict_logits(classifier: Classifier, tiles: np.ndarray, device: torch.device, batch_size: int = 64) -> np.ndarray:
    """Logits ``(n, C)`` float32 of in-memory uint8 tiles ``(n, h, w, 3)``."""
    model = classifier.model.to(device).eval()
    amp = autocast_dtype(device)
    out = np.zeros((len(tiles), len(classifier.class_names)), np.float32)
    with torch.inference_mode():
        for s in range(0, len(tiles), batch_size):
            x = classifier.normalise(to_unit_float(torch.from_numpy(
                np.ascontiguousarray(tiles[s:s + batch_size])).to(device)))
            with torch.autocast(device_type=device.type, dtype=amp, enabled=amp is not None):
                out[s:s + batch_size] = model(x).float().cpu().numpy()
    return out


def predict_tiles(classifier: Classifier, tiles: np.ndarray, device: torch.device, batch_size: int = 64) -> np.ndarray:
    """Calibrated probabilities ``(n, C)`` float32 of in-memory uint8 tiles ``(n, h, w, 3)``."""
    logits = torch.from_numpy(predict_logits(classifier, tiles, device, batch_size))
    return classifier.probabilities(logits).numpy()


def annotated_grid_logits(classifier: Classifier, pairs: Sequence[tuple[Path, Path]], cfg: Config,
                          device: str = "auto") -> tuple[TileSet, np.ndarray]:
    """The evaluation tiles of annotated slides (every non-overlapping grid tile at least half inside
    one class's annotations, stain-normalised where the model reads normalised tiles) and the
    model's logits for them ``(n, C)``."""
    classifier.check_compatible(cfg.tiling)
    data = load_grid_tileset(pairs, cfg, normalise=classifier.stain_normalisation is not None)
    return data, predict_logits(classifier, data.tiles, resolve_device(device))


def evaluate_annotated(classifier: Classifier, pairs: Sequence[tuple[Path, Path]], cfg: Config,
                       device: str = "auto") -> dict[str, Any]:
    """Tile-level metrics on annotated slides (:func:`annotated_grid_logits`), with recall per
    annotation name (the temperature does not move the argmax)."""
    data, logits = annotated_grid_logits(classifier, pairs, cfg, device)
    return {**classification_metrics(data.labels, logits.argmax(axis=1), data.names), "slides": list(data.slide_names)}


def _validate(clf: Classifier, val: TileSet, dev: torch.device) -> dict[str, Any]:
    """Metrics on the validation tiles (centre ``tile_px`` of each tile read with context)."""
    probs = predict_tiles(clf, centre_crop(val.tiles, clf.tile_px), dev)
    return classification_metrics(val.labels, probs.argmax(axis=1), val.names)


def _is_synthetic(slide_path: Path) -> bool:
    return slide_path.with_suffix(".truth.json").is_file()


def train_classifier(slides: Sequence[str | os.PathLike], annotations: Sequence[str | os.PathLike],
                     out: str | os.PathLike, cfg: Config = Config(), *, weights: str | os.PathLike | None = None,
                     device: str = "auto", weights_dtype: str = "float32", log: Log | None = None) -> TrainResult:
    """Train ``cfg.training.arch`` on the annotated slides; write ``out`` and ``out.report.json``."""
    started, cpu_started = time.perf_counter(), time.process_time()
    tr = cfg.training
    out = Path(out)
    dev = resolve_device(device)
    if tr.num_threads:
        torch.set_num_threads(tr.num_threads)
    if tr.pretrained and weights is not None:
        raise ConfigError("--pretrained and --weights: give one (timm's published weights, or a local file)")
    pairs = pair_annotations([Path(s) for s in slides], [Path(a) for a in annotations])
    train_ids, val_ids = split_by_slide(len(pairs), tr.val_split,
                                        np.random.default_rng(np.random.SeedSequence([tr.seed, 2])))
    torch.manual_seed(tr.seed)
    model = build_model(tr.arch, len(CLASSES), weights, pretrained=tr.pretrained).to(dev)
    data = load_tileset(pairs, cfg, log=log)
    train, val = data.subset(train_ids), data.subset(val_ids)
    missing = [c for c, n in train.class_counts().items() if n == 0]
    if missing:
        raise ConfigError(f"training: no training tiles of class {', '.join(missing)} in the annotations of "
                          f"{len(train_ids)} training slides (check annotations.name_map; ignored names: "
                          f"{data.ignored or 'none'})")

    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        model = model.to(memory_format=torch.channels_last)
    clf = Classifier(model=model, arch=tr.arch, class_names=CLASSES, target_mpp=cfg.tiling.target_mpp,
                     tile_px=cfg.tiling.tile_px, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                     stain_normalisation="macenko" if tr.stain_normalisation else None)
    amp = autocast_dtype(dev) if tr.amp_dtype == "bf16" else (torch.float16 if dev.type == "cuda" else None)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    opt = torch.optim.AdamW(model.parameters(), lr=tr.learning_rate, weight_decay=tr.weight_decay)
    draw_rng = np.random.default_rng(np.random.SeedSequence([tr.seed, 3]))
    aug = torch.Generator().manual_seed(tr.seed)
    weights_per_tile = epoch_weights(train)
    steps_per_epoch = math.ceil(len(train.labels) / tr.batch_size)
    total_steps = steps_per_epoch * tr.epochs
    warmup = max(1, total_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total_steps))))
    loss_fn = nn.CrossEntropyLoss()
    history: list[dict[str, Any]] = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    for epoch in range(tr.epochs):
        model.train()
        order = draw_rng.choice(len(train.labels), steps_per_epoch * tr.batch_size, p=weights_per_tile)
        losses = []
        for s in range(0, len(order), tr.batch_size):
            batch = np.sort(order[s:s + tr.batch_size])
            x = clf.normalise(augment(train.tiles[batch], clf.tile_px, clf.target_mpp, tr, draw_rng, aug, dev))
            if dev.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            y = torch.from_numpy(train.labels[batch]).to(dev)
            with torch.autocast(device_type=dev.type, dtype=amp, enabled=amp is not None):
                loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            losses.append(float(loss.detach()))
        entry: dict[str, Any] = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)),
                                 "seconds": round(time.perf_counter() - started, 1)}
        if len(val.labels):
            vm = _validate(clf, val, dev)
            entry.update(val_balanced_accuracy=vm["balanced_accuracy"], val_recall=vm["recall"])
            if best is None or vm["balanced_accuracy"] > best[0]:
                best = (vm["balanced_accuracy"], epoch + 1, copy.deepcopy(model.state_dict()))
        history.append(entry)
        if log:
            log(json.dumps(entry))

    model.eval()
    metrics: dict[str, Any] = {"train_slides": len(train_ids), "val_slides": len(val_ids),
                               "best_epoch": best[1] if best else tr.epochs,
                               "selected_by": "validation balanced accuracy" if best else "last epoch (no validation)"}
    calibration: dict[str, Any] | None = None
    if best is not None:
        model.load_state_dict(best[2])
        metrics["val"] = _validate(clf, val, dev)   # before calibration: the temperature keeps the argmax
        val_logits = predict_logits(clf, centre_crop(val.tiles, clf.tile_px), dev)
        temperature, validation, calibration = calibrate(val_logits, val.labels, val.slide_index)
        validation["source"] = {"command": "train", "software_version": __version__,
                                "slides": [data.slide_names[i] for i in val_ids]}
        clf = Classifier(**{**clf.__dict__, "temperature": temperature, "validation_error": validation})
    synthetic = all(_is_synthetic(p) for p, _ in pairs)
    clf = Classifier(**{**clf.__dict__, "trained_on": {
        "synthetic": synthetic,
        "description": ("synthetic H&E slides from wsi_response.synth (not real tissue)" if synthetic
                        else "annotated slides supplied by the user"),
        "n_slides": len(pairs),
        "train_slides": [data.slide_names[i] for i in train_ids],
        "val_slides": [data.slide_names[i] for i in val_ids],
        "train_tiles_per_class": train.class_counts(),
        "val_tiles_per_class": val.class_counts(),
        "train_tiles_per_name": train.name_counts(),
        "annotations": [Path(a).name for _, a in pairs],
    }, "metrics": metrics})
    model.to("cpu")
    sha = save_classifier(clf, out, weights_dtype)
    clf = with_provenance(clf, out, sha)
    report = {
        "model": str(out), "sha256": sha, "software_version": __version__, "torch_version": torch.__version__,
        "device": str(dev), "autocast": str(amp) if amp else "float32",
        "train_seconds": time.perf_counter() - started, "train_cpu_seconds": time.process_time() - cpu_started,
        "config": {"tiling": config_to_dict(cfg.tiling), "training": config_to_dict(tr)},
        "weights": str(weights) if weights else ("timm published" if tr.pretrained else None),
        "ignored_annotations": data.ignored,
        "stains": {name: st.record() if st else None for name, st in zip(data.slide_names, data.stains)},
        "trained_on": dict(clf.trained_on), "history": history, "metrics": metrics,
        "calibration": calibration, "reliability_png": None,
    }
    if calibration is not None:
        png = out.with_name(out.name + ".reliability.png")
        write_atomic(png, reliability_png(calibration))
        report["reliability_png"] = png.name
    report_path = out.with_name(out.name + ".report.json")
    write_json_atomic(report_path, report)
    return TrainResult(classifier=clf, report=report, report_path=report_path)
