"""GPU benchmark (H100/H200) of the real pipeline beside its ceilings, in one run.

    python benchmarks/bench_gpu.py                          # GPU node: ~6 min (slides ~3 min, written in parallel)
    python benchmarks/bench_gpu.py --specimen-slides 20     # + wall time of a 20-slide specimen (~+2.5 min)
    python benchmarks/bench_gpu.py --device cpu --quick     # smoke test of the same code on a CPU (< 2 min)

Writes ``--distinct-slides`` synthetic 0.25 µm/px SVS slides of ``--size`` in parallel processes
(cached in ``--work``), builds random-weight timm classifiers (resnet18, resnet50; 224 px at
1.0 µm/px) and saves and loads them through the real checkpoint path. For each model it prints,
from the same run and the same slide:

- model only: ``ModelRunner`` (normalise, autocast, softmax, copy back) on uint8 tile batches
  already on the device, eager and ``torch.compile``;
- decode only: every tile of the grid to the device, decoded by the CPU worker processes
  (``decode=workers``) and by the device (``decode=device``: nvJPEG), no model;
- end to end: ``pipeline.process_slide`` (tissue, grid, inference with the zarr store, areas,
  GeoJSON, PNGs) for each decode x compile setting; tiles/s of its inference stage and of the
  whole slide. Compilation, nvJPEG's start and the page cache are warm by then (model only and
  decode only ran first, with the same batch shape). A 40,000 x 30,000 px slide has ~900 tiles,
  so its inference stage includes per-slide fixed costs (worker start, probes); the specimen
  shows them over 20 slides.

With ``--specimen-slides N``: ``run_specimen`` of N slides (links to the distinct slides, in
turn) with ``--specimen-arch`` and the fastest setting above, and its wall time.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import TILING, bench_slide, saved_classifier  # noqa: E402

from wsi_response.classifier import Classifier  # noqa: E402
from wsi_response.config import Config, load_config  # noqa: E402
from wsi_response.malloc_arenas import limit_malloc_arenas  # noqa: E402
from wsi_response.inference import (DeviceDecodeUnavailable, DeviceDecoder, ModelRunner, resolve_device,  # noqa: E402
                                    tile_chunks)
from wsi_response.pipeline import process_slide, run_specimen  # noqa: E402
from wsi_response.slide import Slide, open_slide  # noqa: E402
from wsi_response.tiling import TileGrid, TileReader, tile_grid  # noqa: E402
from wsi_response.tissue import detect_tissue  # noqa: E402

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_rate(clf: Classifier, device: torch.device, compile: bool, batch: int, steps: int) -> tuple[float, float]:
    """(tiles/s of the forward pass on device-resident uint8 batches, s of the first call incl. compile)."""
    runner = ModelRunner(clf, device, compile=compile, batch_size=batch)
    tiles = torch.randint(0, 256, (batch, TILING.tile_px, TILING.tile_px, 3), dtype=torch.uint8, device=device)
    start = time.perf_counter()
    runner(tiles)  # warm-up (and compilation)
    first = time.perf_counter() - start
    start = time.perf_counter()
    pending = [runner.launch(tiles) for _ in range(steps)]
    pending[-1]()  # one stream: the last result means all are done
    return batch * steps / (time.perf_counter() - start), first


def decode_rate(slide: Slide, grid: TileGrid, device: torch.device, workers: int, batch: int,
                on_device: bool) -> tuple[float | None, str]:
    """(tiles/s of getting every grid tile onto the device, no model; a note), the second of two passes."""
    reader = TileReader(slide, grid)
    try:
        decoder = DeviceDecoder.open(slide, grid, reader, device) if on_device else None
    except DeviceDecodeUnavailable as exc:
        reader.close()
        return None, f"unavailable: {exc}"
    note = f"probe MAD {decoder.probe_mad:.2f}" if decoder else reader.backend
    chunks = list(range(grid.n_chunks))
    for _ in range(2):
        start = time.perf_counter()
        n = sum(len(i) for _, i, _ in tile_chunks(reader, chunks, device, num_workers=workers, decoder=decoder,
                                                    group_tiles=batch))
        sync(device)
        seconds = time.perf_counter() - start
    reader.close()
    return n / seconds, note


def pipeline_config(device: str, workers: int, batch: int, decode: str, compile: bool) -> Config:
    return load_config(None, [f"inference.device={device}", f"inference.num_workers={workers}",
                              f"inference.batch_size={batch}", f"inference.decode={decode}",
                              f"inference.compile={str(compile).lower()}", f"tiling.target_mpp={TILING.target_mpp}",
                              f"tiling.tile_px={TILING.tile_px}", f"tiling.stride_px={TILING.stride_px}"])


def end_to_end(path: Path, clf: Classifier, cfg: Config, out: Path, label: str) -> dict:
    """``process_slide`` once into a fresh folder; its record (timings, n_tiles)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record = process_slide(path, path.stem, out / label, clf, cfg)
    for w in caught:
        print(f"    warning: {w.message}")
    return record


def main() -> None:
    limit_malloc_arenas()  # as the CLI does, before torch's threads
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    ap.add_argument("--quick", action="store_true", help="small slide, small batches (smoke test)")
    ap.add_argument("--size", default=None, help="level-0 WxH px at 0.25 µm/px (default 40000x30000; quick 6000x4000)")
    ap.add_argument("--distinct-slides", type=int, default=None, help="slides generated (default 4; quick 1)")
    ap.add_argument("--archs", default="resnet18,resnet50")
    ap.add_argument("--batch-size", type=int, default=None, help="tiles per forward pass (default 512; cpu 32)")
    ap.add_argument("--workers", type=int, default=None, help="reader worker processes (default: CPUs, at most 16)")
    ap.add_argument("--specimen-slides", type=int, default=0, help="also time run_specimen of this many slides")
    ap.add_argument("--specimen-arch", default="resnet18")
    ap.add_argument("--work", type=Path, default=Path(".cache/bench-gpu"), help="slide cache folder")
    args = ap.parse_args()
    device = resolve_device(args.device)
    on_cuda = device.type == "cuda"
    w, h = (int(v) for v in (args.size or ("6000x4000" if args.quick else "40000x30000")).split("x"))
    n_distinct = args.distinct_slides or (1 if args.quick else 4)
    batch = args.batch_size or (512 if on_cuda else 32)
    steps = 2 if args.quick else 50
    workers = args.workers if args.workers is not None else min(16, os.cpu_count() or 1)
    args.work.mkdir(parents=True, exist_ok=True)
    if "inference.decode" not in inspect.getsource(process_slide):
        print("NOTE: pipeline.process_slide does not pass inference.autocast/compile/decode to predict yet: "
              "its end-to-end rows all run the defaults (decode=workers, eager)")

    start = time.perf_counter()
    with ProcessPoolExecutor(min(n_distinct, os.cpu_count() or 1)) as pool:
        paths = list(pool.map(bench_slide, [args.work] * n_distinct, [(w, h)] * n_distinct, range(1, n_distinct + 1)))
    slide = open_slide(paths[0])
    grid = tile_grid(slide, detect_tissue(slide), TILING)
    name = torch.cuda.get_device_name(device) if on_cuda else "cpu"
    print(f"device {device} ({name}), torch {torch.__version__}, {os.cpu_count()} CPUs; {n_distinct} slide(s) "
          f"{w}x{h} px at 0.25 µm/px ready in {time.perf_counter() - start:.0f} s; slide 1: {len(grid)} tiles of "
          f"{TILING.tile_px} px at {TILING.target_mpp} µm/px, {grid.n_chunks} chunks; batch {batch}, "
          f"{workers} workers")

    decode_rows = {"workers": decode_rate(slide, grid, device, workers, batch, on_device=False),
                   "device": decode_rate(slide, grid, device, workers, batch, on_device=True)}
    for where, (rate, note) in decode_rows.items():
        print(f"decode only, {where:7s}: " + (f"{rate:9.0f} tiles/s ({note})" if rate else note))

    settings = [(decode, compile) for compile in ((False, True) if on_cuda else (False,))
                for decode in ("workers", "device")]
    best: dict[str, tuple[str, bool]] = {}
    with tempfile.TemporaryDirectory(prefix="wsi-bench-gpu-") as tmp:
        tmp_path = Path(tmp)
        for arch in args.archs.split(","):
            clf = saved_classifier(arch, tmp_path)
            print(f"\n{arch} ({clf.path.name}, sha256 {clf.sha256[:12]})")
            for compile in (False, True) if on_cuda else (False,):
                rate, first = model_rate(clf, device, compile, batch, steps)
                print(f"  model only, {'compiled' if compile else 'eager':8s}: {rate:9.0f} tiles/s "
                      f"(first call {first:.1f} s)")
            rates = {}
            for decode, compile in settings:
                label = f"{decode}{'+compile' if compile else ''}"
                cfg = pipeline_config(str(device), workers, batch, decode, compile)
                record = end_to_end(paths[0], clf, cfg, tmp_path / arch, label)
                n, t = record["n_tiles"], record["timing"]
                rates[decode, compile] = n / t["inference_s"]
                print(f"  end to end, decode={label:16s}: inference {n / t['inference_s']:9.0f} tiles/s, whole slide "
                      f"{n / t['total_s']:9.0f} tiles/s ({t['total_s']:.1f} s: {t})")
            best[arch] = max(rates, key=rates.get)

        if args.specimen_slides:
            decode, compile = best.get(args.specimen_arch, ("workers", False))
            clf = saved_classifier(args.specimen_arch, tmp_path)
            links = tmp_path / "specimen-slides"
            links.mkdir()
            specimen = []
            for i in range(args.specimen_slides):
                link = links / f"S-BENCH-{i + 1:02d}.svs"
                link.symlink_to(paths[i % len(paths)].resolve())
                specimen.append(link)
            cfg = pipeline_config(str(device), workers, batch, decode, compile)
            start = time.perf_counter()
            result = run_specimen(specimen, "S-BENCH", tmp_path / "specimen-out", clf, cfg, quiet=True)
            wall = time.perf_counter() - start
            n = sum(s.get("n_tiles") or 0 for s in _slide_records(tmp_path / "specimen-out" / "S-BENCH"))
            print(f"\nspecimen of {args.specimen_slides} slides ({args.specimen_arch}, decode={decode}, "
                  f"compile={compile}): {wall:.1f} s wall, {n} tiles, {n / wall:.0f} tiles/s, status {result['status']}")


def _slide_records(specimen_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(specimen_dir.glob("slides/*/slide.json"))]


if __name__ == "__main__":
    main()
