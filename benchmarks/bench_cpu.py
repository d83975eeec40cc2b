"""CPU benchmark of the whole slide pipeline: stage rates, end to end, peak memory, in one run.

    python benchmarks/bench_cpu.py [--sizes 40000x30000,80000x60000] [--models demo,resnet18]

For each size (a synthetic 0.25 µm/px SVS with a ×4 pyramid, generated once and cached in
``--work``) and each model (``demo``: the bundled lcnet_050; a timm name: random weights, saved
and loaded through the real checkpoint path; or a model file) a fresh process times: the
overview and tissue mask, artefact QC (ink, folds, bubbles, the focus measure), the tile grid, a
bare OpenSlide ``read_region`` of the grid's tiles (the baseline), our tile reader, a tile-store
write of one chunk and of all chunks at once, the CNN alone on in-memory tiles; then a second fresh process runs the real ``process_slide`` on a small
warm-up slide (imports and first calls, as a batch worker pays them once) and then, timed, end to
end (QC + read + CNN + zarr store + areas + regions + GeoJSON + PNGs). It prints tiles/s per
stage, the reader's ratio to bare OpenSlide, the share of the end-to-end run spent outside the
CNN (1 - seconds in the model during that run / its wall time; the model's seconds are
``ModelRunner.busy_s``, so a CPU that runs faster or slower meanwhile does not skew the share),
and the peak RSS of the end-to-end process and of its largest worker (flat in slide size is the
goal).
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

from wsi_response.malloc_arenas import limit_malloc_arenas  # noqa: E402

WARM_UP_PX = (8000, 6000)  # the slide each end-to-end process runs first, untimed


def one_size(size: tuple[int, int], work: Path, model: str, workers: int) -> dict:
    import torch

    from _common import slide_and_grid
    from tiles import openslide_tiles
    from wsi_response.artefacts import detect_artefacts
    from wsi_response.classifier import to_unit_float
    from wsi_response.config import load_config
    from wsi_response.tiling import TileReader, tile_grid
    from wsi_response.tissue import detect_tissue, read_overview

    slide, _ = slide_and_grid(work, size)  # generation (cached) is not timed
    cfg = load_config(None, [f"inference.num_workers={workers}", "inference.device=cpu"])
    out: dict = {"size": f"{size[0]}x{size[1]}", "levels": len(slide.levels)}

    t = time.perf_counter()
    overview = read_overview(slide, cfg.tissue.mask_mpp)
    mask = detect_tissue(slide, cfg.tissue, overview)
    out["tissue_s"] = time.perf_counter() - t
    t = time.perf_counter()
    detect_artefacts(slide, mask, cfg.qc, overview, workers)
    out["artefacts_s"] = time.perf_counter() - t
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

    out.update(store_write_costs(slide, grid, Path(tempfile.mkdtemp(dir=work))))

    classifier = _classifier(model, cfg)
    batch = torch.from_numpy(np.concatenate([t for _, t in reader.iter_chunks(range(min(3, grid.n_chunks)))])[:64])
    net = classifier.model.eval()
    with torch.inference_mode():
        net(classifier.normalise(to_unit_float(batch)))  # warm-up
        t = time.perf_counter()
        reps = max(1, 256 // len(batch))
        for _ in range(reps):
            net(classifier.normalise(to_unit_float(batch)))
        out["cnn_tiles_per_s"] = reps * len(batch) / (time.perf_counter() - t)

    e2e = json.loads(subprocess.run(
        [sys.executable, __file__, "--end-to-end", f"{out['size']},{model}", "--work", str(work), "--workers", str(workers)],
        check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    out.update(e2e)
    out["end_to_end_tiles_per_s"] = n / out["end_to_end_s"]
    out["non_cnn_s"] = out["end_to_end_s"] - out["stage_timing"]["model_s"]
    out["non_cnn_share"] = out["non_cnn_s"] / out["end_to_end_s"]
    out["model_arg"] = model
    out["model"] = f"{classifier.arch} ({'bundled demo' if model == 'demo' else model if Path(model).is_file() else 'random weights'})"
    return out


def store_write_costs(slide: object, grid: object, folder: Path) -> dict:
    """Seconds per ``TileStore.write_chunks`` call writing one chunk, and writing every chunk at
    once, on ``grid``'s store: why ``predict`` stores finished chunks together (a GPU node finishes
    hundreds of chunks a second)."""
    import shutil

    from wsi_response.store import open_tile_store, store_metadata

    try:
        store = open_tile_store(folder / "tiles.zarr", store_metadata(slide, grid, "bench", ("a", "b", "c", "d")), grid)
        probs = np.random.default_rng(0).random((len(grid), 4)).astype(np.float32)
        n = min(grid.n_chunks, 50)
        t = time.perf_counter()
        for k in range(n):
            store.write_chunks([k], probs)
        one = (time.perf_counter() - t) / n
        t = time.perf_counter()
        store.write_chunks(range(grid.n_chunks), probs)
        return {"store_write_one_s": one, "store_write_all_s": time.perf_counter() - t,
                "tiles_per_chunk": len(grid) / grid.n_chunks}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _classifier(model: str, cfg: object) -> object:
    """The bundled demo model, a model file, or a random-weight timm ``model``."""
    from _common import saved_classifier
    from wsi_response.classifier import default_model_path, load_classifier

    if model == "demo":
        return load_classifier(default_model_path(), cfg.tiling)
    if Path(model).is_file():
        return load_classifier(Path(model), cfg.tiling)
    with tempfile.TemporaryDirectory() as tmp:
        return saved_classifier(model, Path(tmp))


def end_to_end(size: tuple[int, int], work: Path, model: str, workers: int) -> dict:
    """``process_slide`` in this (fresh) process after one small warm-up slide: wall time, stage
    timing, peak RSS."""
    from _common import bench_slide
    from wsi_response.config import load_config
    from wsi_response.pipeline import process_slide

    path = bench_slide(work, size)
    cfg = load_config(None, [f"inference.num_workers={workers}", "inference.device=cpu"])
    classifier = _classifier(model, cfg)
    with tempfile.TemporaryDirectory() as tmp:
        warm = bench_slide(work, WARM_UP_PX)  # imports and first calls, paid once per batch worker
        process_slide(warm, warm.stem, Path(tmp) / "warm-up", classifier, cfg)
        t = time.perf_counter()
        record = process_slide(path, path.stem, Path(tmp) / "slide", classifier, cfg)
        seconds = time.perf_counter() - t
    return {"end_to_end_s": seconds, "stage_timing": record["timing"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_rss_worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def main() -> None:
    limit_malloc_arenas()  # as the CLI does, before torch's threads
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="40000x30000,80000x60000")
    parser.add_argument("--models", default="demo,resnet18",
                        help="comma-separated: demo (bundled), a timm name (random weights) or a model file")
    parser.add_argument("--work", type=Path, default=Path(".cache/bench"))
    parser.add_argument("--workers", type=int, default=2, help="tile-reading worker processes")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--end-to-end", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.end_to_end:
        size, model = args.end_to_end.split(",")
        w, h = (int(v) for v in size.split("x"))
        print(json.dumps(end_to_end((w, h), args.work, model, args.workers)))
        return
    if args.one:
        size, model = args.one.split(",")
        w, h = (int(v) for v in size.split("x"))
        print(json.dumps(one_size((w, h), args.work, model, args.workers)))
        return
    print(f"machine: {os.cpu_count()} CPUs; one fresh process per slide size and model", file=sys.stderr)
    rows = []
    for model in args.models.split(","):
        for size in args.sizes.split(","):
            cmd = [sys.executable, __file__, "--one", f"{size},{model}", "--work", str(args.work),
                   "--workers", str(args.workers)]
            rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]))
            _print_row(rows[-1])
    for model in args.models.split(","):
        same = [r for r in rows if r["model_arg"] == model]
        if len(same) > 1:
            peaks = " -> ".join(f"{r['peak_rss_mb']:.0f}" for r in same)
            print(f"\n{model}: peak RSS {peaks} MB for {' -> '.join(r['size'] for r in same)} px slides "
                  f"(x{same[-1]['peak_rss_mb'] / same[0]['peak_rss_mb']:.2f} for x{same[-1]['tiles'] / same[0]['tiles']:.1f} tiles)")


def _print_row(r: dict) -> None:
    print(f"\nslide {r['size']} px ({r['levels']} levels), {r['tiles']} tiles of 224 px at 1.0 µm/px; model {r['model']}")
    print(f"  overview + tissue  {r['tissue_s']:8.2f} s")
    print(f"  artefact QC        {r['artefacts_s']:8.2f} s (ink, folds, bubbles, focus)")
    print(f"  tile grid          {r['grid_s']:8.2f} s")
    print(f"  OpenSlide read     {r['openslide_tiles_per_s']:8.0f} tiles/s (baseline, one process)")
    print(f"  tile reader        {r['reader_tiles_per_s']:8.0f} tiles/s = {r['reader_tiles_per_s'] / r['openslide_tiles_per_s']:.2f}x "
          f"OpenSlide ({r['reader_backend']})")
    print(f"  tile store         {1000 * r['store_write_one_s']:8.1f} ms to write one chunk "
          f"({r['tiles_per_chunk']:.0f} tiles: alone, at most {r['tiles_per_chunk'] / r['store_write_one_s']:.0f} tiles/s), "
          f"{1000 * r['store_write_all_s']:.1f} ms all {r['tiles']} tiles at once")
    print(f"  CNN alone          {r['cnn_tiles_per_s']:8.0f} tiles/s (float32, {r['tiles'] / r['cnn_tiles_per_s']:.1f} s for the slide)")
    print(f"  end to end         {r['end_to_end_tiles_per_s']:8.0f} tiles/s ({r['end_to_end_s']:.1f} s; stages {r['stage_timing']})")
    print(f"  outside the CNN    {100 * r['non_cnn_share']:8.1f} % of the run ({r['non_cnn_s']:.1f} s; "
          f"{r['stage_timing']['model_s']:.1f} s in the model)")
    print(f"  peak RSS           {r['peak_rss_mb']:8.0f} MB end-to-end process, {r['peak_rss_worker_mb']:.0f} MB its largest worker")


if __name__ == "__main__":
    main()
