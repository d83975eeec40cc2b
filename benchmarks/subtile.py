"""Areas at sub-tile resolution: oracle (discretisation) error, real-model error and model time of
``tiling.refine=none`` (today's whole cells) against ``dense`` (7 × 7 sub-cells), on the same slides.

    .venv/bin/python benchmarks/subtile.py [--out .cache/subtile] [--size 12000x9000] [--repeats 2]

Synthetic slides at 0.25 µm/px (viable fractions 10, 30, 60 %, seeds 601-603, cached in ``--out``).
Per slide: the oracle error (every cell or sub-cell given its true majority class,
:mod:`wsi_response.oracle`), the error with the bundled demo model (``inference.predict`` on the
grid over the detected tissue, areas by ``quantify.slide_areas``), and the model time of each scheme
(``timings["model_s"]``, the best of ``--repeats`` interleaved runs, CPU, 2 threads). Errors are
percentage points (pp) of the viable % of the tumor bed.
"""
from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SLIDES = ((0.10, 601), (0.30, 602), (0.60, 603))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / ".cache" / "subtile")
    p.add_argument("--size", default="12000x9000", help="level-0 WxH px of each slide at 0.25 µm/px")
    p.add_argument("--repeats", type=int, default=2, help="interleaved timing runs per scheme (best counts)")
    args = p.parse_args()

    import torch

    from wsi_response.classifier import default_model_path, load_classifier
    from wsi_response.config import TilingConfig
    from wsi_response.inference import predict
    from wsi_response.oracle import oracle_slide_areas
    from wsi_response.quantify import slide_areas
    from wsi_response.slide import open_slide
    from wsi_response.synth import load_slide_truth, synth_slide
    from wsi_response.tiling import tile_grid
    from wsi_response.tissue import detect_tissue

    torch.set_num_threads(2)
    w, h = (int(v) for v in args.size.lower().split("x"))
    schemes = {"none": TilingConfig(refine="none"), "dense": TilingConfig(refine="dense")}
    classifier = load_classifier(default_model_path())
    print(f"slides {w}x{h} px at 0.25 µm/px; cells 224 µm; dense: 7 x 7 sub-cells of 32 µm; model {classifier.arch}")
    print("| slide | true viable % | oracle none | oracle dense | model none | model dense | tiles | "
          "model s none | model s dense |")
    print("|---|---|---|---|---|---|---|---|---|")
    totals = {name: 0.0 for name in schemes}
    for viable_fraction, seed in SLIDES:
        path = args.out / f"{w}x{h}" / f"S{seed}.svs"
        if not path.with_suffix(".truth.json").is_file():
            synth_slide(path, size_px=(w, h), mpp=0.25, seed=seed, viable_fraction=viable_fraction)
        truth = load_slide_truth(path.with_suffix(".truth.json"))
        oracle = {name: oracle_slide_areas(truth, cfg).viable_percent - truth.viable_percent
                  for name, cfg in schemes.items()}
        slide = open_slide(path)
        mask = detect_tissue(slide)
        grids = {name: tile_grid(slide, mask, cfg) for name, cfg in schemes.items()}
        best = {name: float("inf") for name in schemes}
        model = {}
        for _ in range(args.repeats):
            for name, grid in grids.items():
                timings: dict[str, float] = {}
                predictions = predict(slide, grid, classifier, device="cpu", num_workers=0, timings=timings)
                best[name] = min(best[name], timings["model_s"])
                model[name] = slide_areas(grid, predictions).viable_percent - truth.viable_percent
        slide.close()
        for name in schemes:
            totals[name] += best[name]
        print(f"| S{seed} | {truth.viable_percent:.2f} | {oracle['none']:+.2f} | {oracle['dense']:+.2f} "
              f"| {model['none']:+.2f} | {model['dense']:+.2f} | {len(grids['none'])} "
              f"| {best['none']:.2f} | {best['dense']:.2f} |", flush=True)
    print(f"\nmodel time dense / none: {totals['dense']:.2f} s / {totals['none']:.2f} s = "
          f"{totals['dense'] / totals['none']:.2f}x")


if __name__ == "__main__":
    main()
