"""Shared helpers of the benchmark scripts: a synthetic slide, its grid, timing of raw tile reads,
random-weight classifiers."""
from __future__ import annotations

import time
from pathlib import Path

from wsi_response.classes import CLASSES
from wsi_response.classifier import IMAGENET_MEAN, IMAGENET_STD, Classifier, build_model, load_classifier, save_classifier
from wsi_response.config import TilingConfig
from wsi_response.slide import Slide, open_slide
from wsi_response.synth import synth_slide
from wsi_response.tiling import TileGrid, TileReader, tile_grid
from wsi_response.tissue import detect_tissue

TILING = TilingConfig(target_mpp=1.0, tile_px=224, stride_px=224)  # the benchmarks' tiles


def bench_slide(folder: Path, size_px: tuple[int, int], seed: int = 1) -> Path:
    """Path of a synthetic 0.25 µm/px SVS of ``size_px`` (level-0 px), written once into ``folder``."""
    path = folder / (f"bench-{size_px[0]}x{size_px[1]}.svs" if seed == 1 else
                     f"bench-{size_px[0]}x{size_px[1]}-seed{seed}.svs")
    if not path.with_suffix(".truth.json").is_file():
        synth_slide(path, size_px=size_px, mpp=0.25, seed=seed)
    return path


def slide_and_grid(folder: Path, size_px: tuple[int, int], tiling: TilingConfig = TilingConfig()
                   ) -> tuple[Slide, TileGrid]:
    """A synthetic 0.25 µm/px slide of ``size_px`` (cached in ``folder``) and its tile grid."""
    slide = open_slide(bench_slide(folder, size_px))
    return slide, tile_grid(slide, detect_tissue(slide), tiling)


def read_rate(slide: Slide, grid: TileGrid) -> float:
    """Tiles/s of reading every chunk of ``grid`` in this process (no model)."""
    reader = TileReader(slide, grid)
    start = time.perf_counter()
    n = sum(len(indices) for indices, _ in reader.iter_chunks())
    rate = n / (time.perf_counter() - start)
    reader.close()
    return rate


def saved_classifier(arch: str, folder: Path) -> Classifier:
    """A random-weight timm ``arch`` (224 px at 1.0 µm/px) saved to ``folder`` and loaded back as
    the pipeline loads models."""
    import torch

    torch.manual_seed(0)
    clf = Classifier(model=build_model(arch), arch=arch, class_names=CLASSES, target_mpp=TILING.target_mpp,
                     tile_px=TILING.tile_px, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    path = folder / f"{arch}-random.safetensors"
    save_classifier(clf, path)
    return load_classifier(path, TILING)
