"""Tile-reader throughput against plain OpenSlide ``read_region`` of the same tiles, in one run.

    python benchmarks/tiles.py [--size 40000x30000] [--mpp 0.25] [--target-mpp 1.0] [--tiles 3000]

Generates (once, cached in --work) a synthetic pyramidal SVS, builds the tissue mask and tile grid,
then reads the same tiles (a contiguous run of whole chunks) three ways on one core, each once to
warm the file cache and then in ``--repeats`` alternating rounds (the median is reported):

- ``openslide``: one ``OpenSlide.read_region`` per tile (the baseline),
- ``reader/openslide``: our chunked reader forced onto OpenSlide (large regions cut into tiles),
- ``reader/fast``: our chunked reader on its fast path (tiffslide + libjpeg-turbo, verified).

Prints tiles/s, the ratio to the baseline, and the mean absolute pixel difference to it.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

from wsi_response.config import TilingConfig
from wsi_response.slide import open_slide
from wsi_response.synth import synth_slide
from wsi_response.tiling import TileReader, resample_tile, tile_grid
from wsi_response.tissue import detect_tissue


def openslide_tiles(path: Path, grid, indices: np.ndarray) -> np.ndarray:
    osr = openslide.OpenSlide(str(path))
    ds = osr.level_downsamples[grid.read_level]
    size = (grid.level_tile_px, grid.level_tile_px)
    white = Image.new("RGBA", size, (255, 255, 255, 255))
    out = np.empty((len(indices), grid.tile_px, grid.tile_px, 3), np.uint8)
    for i, (x, y) in enumerate(grid.level_origins()[indices]):
        rgba = osr.read_region((int(round(x * ds)), int(round(y * ds))), grid.read_level, size)
        tile = Image.alpha_composite(white, rgba).convert("RGB")  # transparent = glass, as the reader does
        out[i] = resample_tile(np.asarray(tile), grid.tile_px)
    return out


def reader_tiles(reader: TileReader, chunks: range) -> np.ndarray:
    return np.concatenate([tiles for _, tiles in reader.iter_chunks(chunks)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="40000x30000")
    parser.add_argument("--mpp", type=float, default=0.25)
    parser.add_argument("--target-mpp", type=float, default=1.0)
    parser.add_argument("--tiles", type=int, default=3000, help="tiles to read per method (whole chunks)")
    parser.add_argument("--work", type=Path, default=Path(".cache/bench"))
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per method (median reported)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    w, h = (int(v) for v in args.size.split("x"))
    path = args.work / f"bench_{w}x{h}_{args.mpp}.svs"
    if not path.exists():
        args.work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        synth_slide(path, size_px=(w, h), mpp=args.mpp, seed=11)
        print(f"generated {path} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    slide = open_slide(path)
    mask = detect_tissue(slide)
    grid = tile_grid(slide, mask, TilingConfig(target_mpp=args.target_mpp))
    starts = grid.chunk_starts
    n_chunks = int(np.searchsorted(starts, min(args.tiles, len(grid)), side="left"))
    chunks = range(max(1, n_chunks))
    indices = np.arange(starts[0], starts[chunks.stop])
    print(f"slide {w}x{h} px at {args.mpp} µm/px, {len(slide.levels)} levels; grid {len(grid)} tiles of "
          f"{grid.tile_px} px at {grid.read_mpp} µm/px from level {grid.read_level}; timing {len(indices)} tiles "
          f"({len(chunks)} chunks), one process")

    methods = {"openslide read_region per tile": lambda: openslide_tiles(path, grid, indices)}
    for name, fast in (("reader, OpenSlide regions", False), ("reader, fast path", True)):
        reader = TileReader(slide, grid, fast=fast)
        methods[f"{name} [{reader.backend.split(' ')[0]}]"] = lambda reader=reader: reader_tiles(reader, chunks)
    # every method once untimed (file cache warm for all), then args.repeats rounds in turn; median
    outputs = {name: read() for name, read in methods.items()}
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.repeats):
        for name, read in methods.items():
            t0 = time.perf_counter()
            read()
            seconds[name].append(time.perf_counter() - t0)
    baseline = outputs["openslide read_region per tile"]
    base_rate = len(indices) / float(np.median(seconds["openslide read_region per tile"]))
    print(f"{'method':45s} {'tiles/s':>9s} {'ratio':>7s} {'MAD':>6s}   (median of {args.repeats} rounds)")
    for name, times in seconds.items():
        rate = len(indices) / float(np.median(times))
        mad = float(np.abs(outputs[name].astype(np.int16) - baseline).mean())
        print(f"{name:45s} {rate:9.0f} {rate / base_rate:7.2f} {mad:6.3f}")

if __name__ == "__main__":
    main()
