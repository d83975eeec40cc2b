"""CPU throughput of ``predict`` with the bundled demo model vs the raw tile-read rate of the same grid.

    .venv/bin/python benchmarks/inference.py [--size 16000x12000] [--workers 2] [--data .cache/bench]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from _common import read_rate, slide_and_grid

from wsi_response.classifier import default_model_path, load_classifier
from wsi_response.inference import predict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", default="16000x12000", help="level-0 WxH px of the synthetic slide (0.25 µm/px)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--data", type=Path, default=Path(".cache/bench"))
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    args.data.mkdir(parents=True, exist_ok=True)
    slide, grid = slide_and_grid(args.data, (w, h))
    clf = load_classifier(default_model_path())
    raw = read_rate(slide, grid)
    start = time.perf_counter()
    predict(slide, grid, clf, batch_size=args.batch_size, num_workers=args.workers, device="cpu")
    rate = len(grid) / (time.perf_counter() - start)
    print(f"slide {w}x{h} px, {len(grid)} tiles of {grid.tile_px} px at {grid.read_mpp} µm/px, "
          f"model {clf.arch} ({default_model_path().name})")
    print(f"raw tile read  {raw:8.1f} tiles/s (one process)")
    print(f"predict (cpu)  {rate:8.1f} tiles/s ({args.workers} workers)  = {rate / raw:.2f} x the read rate")


if __name__ == "__main__":
    main()
