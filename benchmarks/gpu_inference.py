"""One prepared GPU benchmark (H100/H200): end-to-end ``predict`` tiles/s for resnet18 and resnet50,
beside the model-only throughput (synthetic tensor batches, autocast, channels_last) and the raw
tile-read rate of the same grid. Weights are random (throughput does not depend on them).

    python benchmarks/gpu_inference.py                      # on the GPU machine (~2 min synth + ~1 min runs)
    python benchmarks/gpu_inference.py --device cpu --quick # smoke test of the same code on a CPU
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from _common import read_rate, slide_and_grid

from wsi_response.classes import CLASSES
from wsi_response.classifier import IMAGENET_MEAN, IMAGENET_STD, Classifier, build_model
from wsi_response.inference import autocast_dtype, predict, resolve_device


def model_rate(model: torch.nn.Module, device: torch.device, batch: int, steps: int) -> float:
    """Images/s of the forward pass alone on random input already on ``device``."""
    amp = autocast_dtype(device)
    x = torch.randn(batch, 3, 224, 224, device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(device_type=device.type, dtype=amp, enabled=amp is not None):
        model(x)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--quick", action="store_true", help="small slide, small batches (smoke test)")
    ap.add_argument("--workers", type=int, default=None, help="reader workers (default: CPU count, max 16)")
    args = ap.parse_args()
    device = resolve_device(args.device)
    size = (4000, 3000) if args.quick else (20000, 15000)
    batch, steps = (8, 2) if args.quick else (256, 20)
    workers = args.workers if args.workers is not None else min(16, os.cpu_count() or 1)
    data = Path(tempfile.mkdtemp(prefix="wsi-bench-"))
    start = time.perf_counter()
    slide, grid = slide_and_grid(data, size)
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), "
          f"torch {torch.__version__}; slide {size[0]}x{size[1]} px written in {time.perf_counter() - start:.0f} s, "
          f"{len(grid)} tiles of 224 px at 1.0 µm/px, {grid.n_chunks} chunks")
    print(f"raw tile read (1 process): {read_rate(slide, grid):9.1f} tiles/s")
    for arch in ("resnet18", "resnet50"):
        torch.manual_seed(0)
        model = build_model(arch).eval().to(device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        clf = Classifier(model=model, arch=arch, class_names=CLASSES, target_mpp=1.0, tile_px=224,
                         mean=IMAGENET_MEAN, std=IMAGENET_STD)
        only = model_rate(model, device, batch, steps)
        predict(slide, grid, clf, batch_size=batch, num_workers=workers, device=str(device))  # warm caches
        start = time.perf_counter()
        predict(slide, grid, clf, batch_size=batch * 2 if device.type == "cuda" else batch,
                num_workers=workers, device=str(device))
        e2e = len(grid) / (time.perf_counter() - start)
        print(f"{arch:9s} model only {only:9.1f} tiles/s | predict end to end {e2e:9.1f} tiles/s "
              f"({workers} workers, autocast {autocast_dtype(device) or 'off (float32)'})")


if __name__ == "__main__":
    main()
