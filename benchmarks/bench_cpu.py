"""CPU benchmark of the whole slide pipeline: stage rates, end to end, peak memory, in one run.

    python benchmarks/bench_cpu.py [--sizes 40000x30000,80000x60000] [--work .cache/bench]

For each size (a synthetic 0.25 µm/px SVS with a ×4 pyramid, generated once and cached) a fresh
process times: tissue detection, the tile grid, a bare OpenSlide ``read_region`` of the grid's
tiles (the baseline), our tile reader, the CNN alone on in-memory tiles, and the real
``process_slide`` end to end (read + CNN + zarr store + areas + regions + GeoJSON + PNGs). It
prints tiles/s per stage, the reader's ratio to bare OpenSlide, the share of the run spent
outside the CNN, and the process's peak RSS (flat in slide size is the goal).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def one_size(size: tuple[int, int], work: Path, model: Path | None, workers: int) -> dict:
    import torch

    from _common import slide_and_grid
    from tiles import openslide_tiles
    from wsi_response.classifier import default_model_path, load_classifier, to_unit_float
    from wsi_response.config import load_config
    from wsi_response.pipeline import process_slide
    from wsi_response.tiling import TileReader, tile_grid
    from wsi_response.tissue import detect_tissue

    slide, _ = slide_and_grid(work, size)  # generation (cached) is not timed
    cfg = load_config(None, [f"inference.num_workers={workers}", "inference.device=cpu"])
    out: dict = {"size": f"{size[0]}x{size[1]}", "levels": len(slide.levels)}

    t = time.perf_counter()
    mask = detect_tissue(slide, cfg.tissue)
    out["tissue_s"] = time.perf_counter() - t
    t = time.perf_counter()
    grid = tile_grid(slide, mask, cfg.tiling)
    out["grid_s"] = time.perf_counter() - t
    out["tiles"] = n = len(grid)

    sample = np.arange(min(n, 2000))
    t = time.perf_counter()
    openslide_tiles(slide.path, grid, sample)
    out["openslide_tiles_per_s"] = len(sample) / (time.perf_counter() - t)
    reader = TileReader(slide, grid)
    out["reader_backend"] = reader.backend
    t = time.perf_counter()
    read = sum(len(i) for i, _ in reader.iter_chunks())
    out["reader_tiles_per_s"] = read / (time.perf_counter() - t)

    classifier = load_classifier(model or default_model_path(), cfg.tiling)
    batch = torch.from_numpy(np.concatenate([t for _, t in reader.iter_chunks(range(min(3, grid.n_chunks)))])[:64])
    net = classifier.model.eval()
    with torch.inference_mode():
        net(classifier.normalise(to_unit_float(batch)))  # warm-up
        t = time.perf_counter()
        reps = max(1, 256 // len(batch))
        for _ in range(reps):
            net(classifier.normalise(to_unit_float(batch)))
        out["cnn_tiles_per_s"] = reps * len(batch) / (time.perf_counter() - t)

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        record = process_slide(slide.path, slide.slide_id, Path(tmp) / "slide", classifier, cfg)
        out["end_to_end_s"] = time.perf_counter() - t
    out["end_to_end_tiles_per_s"] = n / out["end_to_end_s"]
    out["stage_timing"] = record["timing"]
    cnn_s = n / out["cnn_tiles_per_s"]
    out["non_cnn_share"] = max(0.0, 1 - cnn_s / out["end_to_end_s"])
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["model"] = f"{classifier.arch} ({classifier.path.name})"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="40000x30000,80000x60000")
    parser.add_argument("--work", type=Path, default=Path(".cache/bench"))
    parser.add_argument("--model", type=Path, default=None, help="model file (default: the bundled demo model)")
    parser.add_argument("--workers", type=int, default=2, help="tile-reading worker processes")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.one:
        w, h = (int(v) for v in args.one.split("x"))
        print(json.dumps(one_size((w, h), args.work, args.model, args.workers)))
        return
    print(f"machine: {os.cpu_count()} CPUs; one fresh process per slide size", file=sys.stderr)
    rows = []
    for size in args.sizes.split(","):
        cmd = [sys.executable, __file__, "--one", size, "--work", str(args.work), "--workers", str(args.workers)]
        if args.model:
            cmd += ["--model", str(args.model)]
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]))
    for r in rows:
        print(f"\nslide {r['size']} px ({r['levels']} levels), {r['tiles']} tiles of 224 px at 1.0 µm/px; model {r['model']}")
        print(f"  tissue mask        {r['tissue_s']:8.2f} s")
        print(f"  tile grid          {r['grid_s']:8.2f} s")
        print(f"  OpenSlide read     {r['openslide_tiles_per_s']:8.0f} tiles/s (baseline, one process)")
        print(f"  tile reader        {r['reader_tiles_per_s']:8.0f} tiles/s = {r['reader_tiles_per_s'] / r['openslide_tiles_per_s']:.2f}x "
              f"OpenSlide ({r['reader_backend']})")
        print(f"  CNN alone          {r['cnn_tiles_per_s']:8.0f} tiles/s")
        print(f"  end to end         {r['end_to_end_tiles_per_s']:8.0f} tiles/s ({r['end_to_end_s']:.1f} s; stages {r['stage_timing']})")
        print(f"  outside the CNN    {100 * r['non_cnn_share']:8.1f} % of the run")
        print(f"  peak RSS           {r['peak_rss_mb']:8.0f} MB")


if __name__ == "__main__":
    main()
