"""Training a tile classifier from slides and QuPath annotations; evaluation by slide.

Sampling. Candidate tiles form a dense ``TileGrid`` (step ``training.sample_stride_um``) at the
run's ``tiling.target_mpp``/``tile_px``, so training reads pixels exactly as inference does
(same pyramid level, same resampling, via ``TileReader``). A candidate is a sample of class c
when its centre lies inside c's annotations and at least ``training.min_inside_fraction`` of
the tile does; centres inside two classes' annotations are ambiguous and dropped. At most
``training.max_tiles_per_class_per_slide`` per class and slide are drawn at random; tiles are
held in memory as uint8 (about 150 KB per 224 px tile), which that cap bounds.

Training. Each epoch draws every class equally often (rare classes oversampled with
replacement), augments with the 8 flips/90° rotations, HED stain jitter and brightness/contrast
jitter (:func:`hed_jitter`, :func:`light_jitter`, both scaled by ``training.hed_jitter``), and optimises
cross-entropy with AdamW and a cosine schedule: float32 on CPU, bf16/fp16 autocast on CUDA
(GradScaler for fp16). Validation holds out whole SLIDES (``training.val_split``), never tiles.
After the last epoch, the validation tiles calibrate the model (:mod:`wsi_response.calibration`):
a temperature fitted by validation NLL and the validation confusion matrix go into the checkpoint;
the report gets the reliability bins and ECE before/after, and ``<out>.reliability.png``.
Everything random flows from ``training.seed``: the same inputs and seed give the same weights
(on the same device and thread count).
"""
from __future__ import annotations

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
from .config import Config, TilingConfig, config_to_dict
from .errors import ConfigError
from .inference import autocast_dtype, resolve_device
from .qupath import Annotation, read_annotations
from .slide import Slide, open_slide
from .tiling import TileGrid, TileReader, tile_grid
from .tissue import TissueMask

__all__ = [
    "TileSet",
    "TrainResult",
    "pair_annotations",
    "sample_annotated_tiles",
    "load_tileset",
    "split_by_slide",
    "hed_jitter",
    "light_jitter",
    "classification_metrics",
    "predict_logits",
    "predict_tiles",
    "evaluate_annotated",
    "train_classifier",
]

Log = Callable[[str], None]


@dataclass(frozen=True)
class TileSet:
    """Labelled tiles: uint8 ``(n, tile_px, tile_px, 3)``, class index ``(n,)``, slide index ``(n,)``."""

    tiles: np.ndarray
    labels: np.ndarray
    slide_index: np.ndarray
    slide_names: tuple[str, ...]
    ignored: dict[str, int]  # annotation names/kinds not used, with counts (all files)

    def subset(self, slides: np.ndarray) -> "TileSet":
        keep = np.isin(self.slide_index, slides)
        return TileSet(self.tiles[keep], self.labels[keep], self.slide_index[keep], self.slide_names, self.ignored)

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(CLASSES))
        return {c: int(counts[i]) for i, c in enumerate(CLASSES)}


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


def _full_mask(slide: Slide, cell_l0: float) -> TissueMask:
    """An all-tissue mask (annotations, not tissue detection, decide what is sampled)."""
    w, h = slide.dimensions_px
    ds = max(1.0, cell_l0)
    return TissueMask(mask=np.ones((math.ceil(h / ds), math.ceil(w / ds)), bool), downsample=ds, mpp=ds * slide.mpp)


def sample_annotated_tiles(slide: Slide, annotations: Sequence[Annotation], tiling: TilingConfig,
                           stride_um: float, min_inside_fraction: float, cap_per_class: int,
                           rng: np.random.Generator) -> tuple[TileGrid, np.ndarray, np.ndarray]:
    """Tiles inside annotated polygons: ``(grid, tile indices (n,), class indices (n,))``, indices sorted.

    Annotation coordinates are level-0 px minus ``slide.bounds_offset_l0`` (QuPath's view).
    """
    import shapely

    stride_px = int(min(tiling.tile_px, max(8, round(stride_um / tiling.target_mpp))))
    cfg = TilingConfig(target_mpp=tiling.target_mpp, tile_px=tiling.tile_px, stride_px=stride_px,
                       min_tissue_fraction=0.0, read_region_px=tiling.read_region_px)
    grid = tile_grid(slide, _full_mask(slide, stride_px * tiling.target_mpp / slide.mpp), cfg)
    size = grid.size_l0
    corners = grid.origins_l0 - np.asarray(slide.bounds_offset_l0, np.float64)
    cx, cy = corners[:, 0] + size / 2, corners[:, 1] + size / 2
    geoms = [shapely.union_all([a.geometry for a in annotations if a.class_id == c]) for c in CLASSES]
    inside = np.stack([shapely.contains_xy(g, cx, cy) if not g.is_empty else np.zeros(len(cx), bool)
                       for g in geoms])
    unique = inside.sum(axis=0) == 1
    picked_idx, picked_cls = [], []
    for ci, geom in enumerate(geoms):
        candidates = np.flatnonzero(inside[ci] & unique)
        candidates = candidates[rng.permutation(len(candidates))]
        shapely.prepare(geom)
        chosen: list[np.ndarray] = []
        n_chosen = 0
        for start in range(0, len(candidates), max(64, 2 * cap_per_class)):
            batch = candidates[start:start + max(64, 2 * cap_per_class)]
            boxes = shapely.box(corners[batch, 0], corners[batch, 1], corners[batch, 0] + size, corners[batch, 1] + size)
            frac = shapely.area(shapely.intersection(boxes, geom)) / (size * size)
            ok = batch[frac >= min_inside_fraction][:cap_per_class - n_chosen]
            chosen.append(ok)
            n_chosen += len(ok)
            if n_chosen >= cap_per_class:
                break
        if chosen:
            idx = np.concatenate(chosen)
            picked_idx.append(idx)
            picked_cls.append(np.full(len(idx), ci, np.int64))
    if not picked_idx:
        return grid, np.zeros(0, np.int64), np.zeros(0, np.int64)
    idx, cls = np.concatenate(picked_idx), np.concatenate(picked_cls)
    order = np.argsort(idx, kind="stable")
    return grid, idx[order], cls[order]


def load_tileset(pairs: Sequence[tuple[Path, Path]], cfg: Config, *, stride_um: float | None = None,
                 cap_per_class: int | None = None, seed: int | None = None, log: Log | None = None) -> TileSet:
    """Sample and read the labelled tiles of every (slide, annotation file) pair."""
    tr = cfg.training
    seeds = np.random.SeedSequence([tr.seed if seed is None else seed, 1]).spawn(len(pairs))
    tiles, labels, slide_index, names = [], [], [], []
    ignored: dict[str, int] = {}
    for i, ((slide_path, ann_path), ss) in enumerate(zip(pairs, seeds)):
        annotations, skipped = read_annotations(ann_path, cfg.annotations.name_map)
        for k, v in skipped.items():
            ignored[k] = ignored.get(k, 0) + v
        with open_slide(slide_path) as slide:
            grid, idx, cls = sample_annotated_tiles(
                slide, annotations, cfg.tiling, tr.sample_stride_um if stride_um is None else stride_um,
                tr.min_inside_fraction, tr.max_tiles_per_class_per_slide if cap_per_class is None else cap_per_class,
                np.random.default_rng(ss))
            reader = TileReader(slide, grid)
            try:
                tiles.append(reader.read_tiles(idx))
            finally:
                reader.close()
        labels.append(cls)
        slide_index.append(np.full(len(idx), i, np.int64))
        names.append(Path(slide_path).name)
        if log:
            counts = np.bincount(cls, minlength=len(CLASSES))
            log(f"{slide_path}: {len(idx)} tiles ({', '.join(f'{c} {n}' for c, n in zip(CLASSES, counts))})")
    px = cfg.tiling.tile_px
    return TileSet(tiles=np.concatenate(tiles) if tiles else np.zeros((0, px, px, 3), np.uint8),
                   labels=np.concatenate(labels) if labels else np.zeros(0, np.int64),
                   slide_index=np.concatenate(slide_index) if slide_index else np.zeros(0, np.int64),
                   slide_names=tuple(names), ignored=ignored)


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


def _hed_matrices() -> tuple[torch.Tensor, torch.Tensor]:
    from skimage.color import hed_from_rgb, rgb_from_hed

    return torch.from_numpy(hed_from_rgb).float(), torch.from_numpy(rgb_from_hed).float()


_HED_FROM_RGB, _RGB_FROM_HED = _hed_matrices()
_LOG_ADJUST = math.log(1e-6)


def hed_jitter(x: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """HED stain augmentation of RGB in [0, 1] ``(n, 3, h, w)`` (skimage rgb2hed/hed2rgb in torch).

    Per tile, each stain concentration is scaled by U(1-sigma, 1+sigma) and shifted by
    U(-sigma, sigma) / 20. Stain concentrations of H&E tissue are about 0.01-0.07 in skimage's
    units (median haematoxylin of tumour ~0.03, of necrosis ~0.015), so the shift stays small
    (±0.01 at sigma 0.2) and does not wash out the stain difference between classes, while the
    scale covers the per-region stain variation of slides (synthetic: ±18 %).
    """
    n = x.shape[0]
    alpha = 1 + (torch.rand(n, 3, generator=generator) * 2 - 1) * sigma
    beta = (torch.rand(n, 3, generator=generator) * 2 - 1) * sigma / 20
    hed_from_rgb, rgb_from_hed = _HED_FROM_RGB.to(x.device), _RGB_FROM_HED.to(x.device)
    od = torch.log(x.clamp_min(1e-6)) / _LOG_ADJUST
    stains = torch.einsum("nchw,cd->ndhw", od, hed_from_rgb).clamp_min(0)
    stains = stains * alpha.to(x.device)[:, :, None, None] + beta.to(x.device)[:, :, None, None]
    rgb = torch.exp(torch.einsum("nchw,cd->ndhw", stains * _LOG_ADJUST, rgb_from_hed))
    return rgb.clamp(0, 1)


def light_jitter(x: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """Brightness and contrast jitter of RGB in [0, 1] ``(n, 3, h, w)`` (scanner/illumination).

    Per tile: contrast about the tile's mean grey scaled by U(1-sigma/2, 1+sigma/2), then
    brightness scaled by U(1-sigma/2, 1+sigma/2).
    """
    n = x.shape[0]
    contrast = (1 + (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1) * sigma / 2).to(x.device)
    brightness = (1 + (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1) * sigma / 2).to(x.device)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * contrast + mean).mul_(brightness).clamp_(0, 1)


def _dihedral(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each tile of ``(n, c, h, w)`` in one of the 8 flips/90° rotations, drawn per tile."""
    ops = torch.randint(0, 8, (x.shape[0],), generator=generator)
    out = torch.empty_like(x)
    for op in range(8):
        sel = (ops == op).nonzero().flatten().to(x.device)
        if len(sel):
            t = torch.rot90(x[sel], op % 4, dims=(2, 3))
            out[sel] = torch.flip(t, dims=(3,)) if op >= 4 else t
    return out


def classification_metrics(true: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    """Confusion matrix (rows true, columns predicted), per-class precision/recall/support,
    accuracy and balanced accuracy (mean recall over classes present)."""
    c = len(CLASSES)
    confusion = np.zeros((c, c), np.int64)
    np.add.at(confusion, (true, pred), 1)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    diag = np.diag(confusion)
    recall = {cls: float(diag[i] / support[i]) if support[i] else None for i, cls in enumerate(CLASSES)}
    precision = {cls: float(diag[i] / predicted[i]) if predicted[i] else None for i, cls in enumerate(CLASSES)}
    present = [r for r in recall.values() if r is not None]
    return {
        "n_tiles": int(len(true)),
        "accuracy": float(diag.sum() / max(1, len(true))),
        "balanced_accuracy": float(np.mean(present)) if present else None,
        "recall": recall,
        "precision": precision,
        "support": {cls: int(support[i]) for i, cls in enumerate(CLASSES)},
        "confusion_matrix": confusion.tolist(),
        "confusion_axes": "rows: true class, columns: predicted class, order: " + ", ".join(CLASSES),
    }


def predict_logits(classifier: Classifier, tiles: np.ndarray, device: torch.device, batch_size: int = 64) -> np.ndarray:
    """Logits ``(n, C)`` float32 of in-memory uint8 tiles ``(n, h, w, 3)``."""
    model = classifier.model.to(device).eval()
    amp = autocast_dtype(device)
    out = np.zeros((len(tiles), len(classifier.class_names)), np.float32)
    with torch.inference_mode():
        for s in range(0, len(tiles), batch_size):
            x = classifier.normalise(to_unit_float(torch.from_numpy(tiles[s:s + batch_size]).to(device)))
            with torch.autocast(device_type=device.type, dtype=amp, enabled=amp is not None):
                out[s:s + batch_size] = model(x).float().cpu().numpy()
    return out


def predict_tiles(classifier: Classifier, tiles: np.ndarray, device: torch.device, batch_size: int = 64) -> np.ndarray:
    """Calibrated probabilities ``(n, C)`` float32 of in-memory uint8 tiles ``(n, h, w, 3)``."""
    logits = torch.from_numpy(predict_logits(classifier, tiles, device, batch_size))
    return classifier.probabilities(logits).numpy()


def evaluate_annotated(classifier: Classifier, pairs: Sequence[tuple[Path, Path]], cfg: Config,
                       device: str = "auto", cap_per_class: int = 100_000) -> dict[str, Any]:
    """Tile-level metrics on annotated slides: every non-overlapping grid tile inside an annotation."""
    classifier.check_compatible(cfg.tiling)
    data = load_tileset(pairs, cfg, stride_um=cfg.tiling.tile_px * cfg.tiling.target_mpp, cap_per_class=cap_per_class)
    probs = predict_tiles(classifier, data.tiles, resolve_device(device))
    return {**classification_metrics(data.labels, probs.argmax(axis=1)), "slides": list(data.slide_names)}


def _balanced_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One epoch: each present class ``max(count)`` times (rare classes drawn with replacement), shuffled."""
    counts = np.bincount(labels, minlength=len(CLASSES))
    n = int(counts.max())
    parts = []
    for ci in np.flatnonzero(counts):
        members = np.flatnonzero(labels == ci)
        if counts[ci] == n:
            parts.append(rng.permutation(members))
        else:
            parts.append(np.concatenate([rng.permutation(members)] * (n // counts[ci])
                                        + [rng.choice(members, n % counts[ci], replace=False)]))
    order = np.concatenate(parts)
    return order[rng.permutation(len(order))]


def _is_synthetic(slide_path: Path) -> bool:
    return slide_path.with_suffix(".truth.json").is_file()


def train_classifier(slides: Sequence[str | os.PathLike], annotations: Sequence[str | os.PathLike],
                     out: str | os.PathLike, cfg: Config = Config(), *, weights: str | os.PathLike | None = None,
                     device: str = "auto", weights_dtype: str = "float32", log: Log | None = None) -> TrainResult:
    """Train ``cfg.training.arch`` on the annotated slides; write ``out`` and ``out.report.json``."""
    started = time.perf_counter()
    tr = cfg.training
    out = Path(out)
    dev = resolve_device(device)
    if tr.num_threads:
        torch.set_num_threads(tr.num_threads)
    pairs = pair_annotations([Path(s) for s in slides], [Path(a) for a in annotations])
    train_ids, val_ids = split_by_slide(len(pairs), tr.val_split,
                                        np.random.default_rng(np.random.SeedSequence([tr.seed, 2])))
    data = load_tileset(pairs, cfg, log=log)
    train, val = data.subset(train_ids), data.subset(val_ids)
    missing = [c for c, n in train.class_counts().items() if n == 0]
    if missing:
        raise ConfigError(f"training: no training tiles of class {', '.join(missing)} in the annotations of "
                          f"{len(train_ids)} training slides (check annotations.name_map; ignored names: "
                          f"{data.ignored or 'none'})")

    torch.manual_seed(tr.seed)
    model = build_model(tr.arch, len(CLASSES), weights).to(dev)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        model = model.to(memory_format=torch.channels_last)
    clf = Classifier(model=model, arch=tr.arch, class_names=CLASSES, target_mpp=cfg.tiling.target_mpp,
                     tile_px=cfg.tiling.tile_px, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    amp = autocast_dtype(dev) if tr.amp_dtype == "bf16" else (torch.float16 if dev.type == "cuda" else None)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    opt = torch.optim.AdamW(model.parameters(), lr=tr.learning_rate, weight_decay=tr.weight_decay)
    order_rng = np.random.default_rng(np.random.SeedSequence([tr.seed, 3]))
    aug = torch.Generator().manual_seed(tr.seed)
    steps_per_epoch = math.ceil(len(CLASSES) * max(train.class_counts().values()) / tr.batch_size)
    total_steps = steps_per_epoch * tr.epochs
    warmup = max(1, total_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total_steps))))
    loss_fn = nn.CrossEntropyLoss()
    history = []
    for epoch in range(tr.epochs):
        model.train()
        order = _balanced_order(train.labels, order_rng)
        losses = []
        for s in range(0, len(order), tr.batch_size):
            batch = order[s:s + tr.batch_size]
            x = to_unit_float(torch.from_numpy(train.tiles[batch]).to(dev, non_blocking=True))
            x = _dihedral(x, aug)
            if tr.hed_jitter > 0:
                x = light_jitter(hed_jitter(x, tr.hed_jitter, aug), tr.hed_jitter, aug)
            x = clf.normalise(x)
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
        entry: dict[str, Any] = {"epoch": epoch + 1, "train_loss": float(np.mean(losses))}
        if len(val.labels):
            vm = classification_metrics(val.labels, predict_tiles(clf, val.tiles, dev).argmax(axis=1))
            entry.update(val_balanced_accuracy=vm["balanced_accuracy"], val_recall=vm["recall"])
        history.append(entry)
        if log:
            log(json.dumps(entry))

    model.eval()
    metrics: dict[str, Any] = {"train_slides": len(train_ids), "val_slides": len(val_ids)}
    calibration: dict[str, Any] | None = None
    if len(val.labels):
        val_logits = predict_logits(clf, val.tiles, dev)
        metrics["val"] = classification_metrics(val.labels, val_logits.argmax(axis=1))
        temperature, validation, calibration = calibrate(val_logits, val.labels, val.slide_index)
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
        "annotations": [Path(a).name for _, a in pairs],
    }, "metrics": metrics})
    model.to("cpu")
    sha = save_classifier(clf, out, weights_dtype)
    clf = with_provenance(clf, out, sha)
    report = {
        "model": str(out), "sha256": sha, "software_version": __version__, "torch_version": torch.__version__,
        "device": str(dev), "autocast": str(amp) if amp else "float32", "train_seconds": time.perf_counter() - started,
        "config": {"tiling": config_to_dict(cfg.tiling), "training": config_to_dict(tr)},
        "weights": str(weights) if weights else None, "ignored_annotations": data.ignored,
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
