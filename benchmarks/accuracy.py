"""End-to-end accuracy on synthetic specimens with known truth: the real pipeline, the bundled model.

    .venv/bin/python benchmarks/accuracy.py [--out .cache/accuracy] [--slides 2] [--size 16000x12000]
                                            [--stride-px 112] [--model PATH] [--workers 2]

Writes synthetic specimens (viable fractions near 0.5 %, 5 %, 20 %, 60 %; seeds 501-504, never used
for training or model selection) into ``--out`` (kept as a cache: a second run skips the synthesis),
runs ``pipeline.run_specimen`` on each with the default config except ``tiling.stride_px``, and prints
one row per specimen and a summary against the targets:

- specimen viable % within 2 percentage points (pp) of the truth;
- the EORTC tier right wherever the truth is more than 2 pp from a cut-off (0, 1, 10, 50 %);
- how many 95 % intervals contain the truth (the interval only describes the model's own tile
  probabilities, see ``quantify``: it is not expected to cover systematic error).

Exit status 0 whether or not the targets are met (this is a measurement, not a test); 1 when a slide
fails in the pipeline.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPECIMENS = (("ACC-0.5", 0.005, 501), ("ACC-5", 0.05, 502), ("ACC-20", 0.20, 503), ("ACC-60", 0.60, 504))
CUTOFFS = (0.0, 1.0, 10.0, 50.0)
TOLERANCE_PP = 2.0


def _synth(args: tuple[Path, str, int, int, tuple[int, int], float]) -> str:
    from wsi_response.synth import synth_specimen

    out, specimen_id, n_slides, seed, size_px, viable_fraction = args
    if not (out / specimen_id / "specimen.truth.json").is_file():
        synth_specimen(out, specimen_id, n_slides, seed=seed, size_px=size_px, mpp=0.25,
                       viable_fraction=viable_fraction)
    return specimen_id


def true_tier(percent: float) -> str:
    from wsi_response.quantify import eortc_tier

    return eortc_tier(percent).tier


def near_cutoff(percent: float, tolerance_pp: float = TOLERANCE_PP) -> bool:
    """Truth within ``tolerance_pp`` of an EORTC cut-off (there a 2 pp error may change the tier)."""
    return any(abs(percent - c) <= tolerance_pp for c in CUTOFFS)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / ".cache" / "accuracy")
    p.add_argument("--slides", type=int, default=2, help="slides per specimen")
    p.add_argument("--size", default="16000x12000", help="level-0 WxH px of each slide at 0.25 µm/px")
    p.add_argument("--stride-px", type=int, default=112, help="tiling.stride_px (tile_px is 224)")
    p.add_argument("--model", type=Path, default=None, help="default: the bundled demo model")
    p.add_argument("--workers", type=int, default=2, help="processes for the synthesis")
    args = p.parse_args(argv)

    from wsi_response.classifier import default_model_path, load_classifier
    from wsi_response.config import load_config
    from wsi_response.pipeline import run_specimen
    from wsi_response.synth import load_specimen_truth

    w, h = (int(v) for v in args.size.lower().split("x"))
    data = args.out / f"slides-{w}x{h}-{args.slides}"
    started = time.perf_counter()
    jobs = [(data, sid, args.slides, seed, (w, h), vf) for sid, vf, seed in SPECIMENS]
    with ProcessPoolExecutor(max_workers=max(1, args.workers)) as pool:
        list(pool.map(_synth, jobs))
    synth_s = time.perf_counter() - started

    cfg = load_config(overrides=[f"tiling.stride_px={args.stride_px}"])
    model = args.model or default_model_path()
    classifier = load_classifier(model, cfg.tiling)
    results = args.out / f"results-{w}x{h}-{args.slides}-s{args.stride_px}"
    shutil.rmtree(results, ignore_errors=True)  # measure afresh: no tile store is resumed
    rows = []
    t_run = time.perf_counter()
    for sid, _, _ in SPECIMENS:
        truth = load_specimen_truth(data / sid / "specimen.truth.json")
        result = run_specimen([s.slide_path for s in truth.slides], sid, results, classifier, cfg, quiet=True)
        if result["status"] != "ok":
            print(f"{sid}: specimen status {result['status']}: "
                  + "; ".join(str(s["error"]) for s in result["slides"] if s["error"]), file=sys.stderr)
            return 1
        measured = result["viable_percent"]
        ci = result["viable_percent_ci95"]
        rows.append({
            "specimen": sid, "slides": len(truth.slides), "bed_mm2": sum(s.tumor_bed_area_mm2 for s in truth.slides),
            "true": truth.viable_percent, "measured": measured,
            "error": None if measured is None else measured - truth.viable_percent,
            "ci": ci, "covered": ci is not None and ci[0] <= truth.viable_percent <= ci[1],
            "true_tier": true_tier(truth.viable_percent), "tier": result["eortc"]["tier"],
            "near": near_cutoff(truth.viable_percent), "flag_near": result["eortc"]["near_cutoff"],
        })
    run_s = time.perf_counter() - t_run

    print(f"model {model.name} (sha256 {classifier.sha256[:12]}); {args.slides} slides/specimen of {w}x{h} px at "
          f"0.25 µm/px; tiles 224 px at 1.0 µm/px, stride {args.stride_px} px; synth {synth_s:.0f} s, "
          f"pipeline {run_s:.0f} s")
    print()
    print("| specimen | bed mm² | true viable % | measured % | error (pp) | 95 % interval | covered? "
          "| true tier | measured tier | truth near cut-off | pipeline near_cutoff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ci = "–" if r["ci"] is None else f"{r['ci'][0]:.2f}–{r['ci'][1]:.2f}"
        meas = "–" if r["measured"] is None else f"{r['measured']:.2f}"
        err = "–" if r["error"] is None else f"{r['error']:+.2f}"
        print(f"| {r['specimen']} | {r['bed_mm2']:.1f} | {r['true']:.2f} | {meas} | {err} | {ci} "
              f"| {'yes' if r['covered'] else 'no'} | {r['true_tier']} | {r['tier']} "
              f"| {'yes' if r['near'] else 'no'} | {r['flag_near']} |")
    within = sum(r["error"] is not None and abs(r["error"]) <= TOLERANCE_PP for r in rows)
    judged = [r for r in rows if not r["near"]]
    tiers_ok = sum(r["tier"] == r["true_tier"] for r in judged)
    covered = sum(r["covered"] for r in rows)
    print()
    print(f"within {TOLERANCE_PP:g} pp of the truth: {within}/{len(rows)}; "
          f"tier correct where the truth is > {TOLERANCE_PP:g} pp from a cut-off: {tiers_ok}/{len(judged)}; "
          f"95 % interval covers the truth: {covered}/{len(rows)}; "
          f"max |error| {max(abs(r['error']) for r in rows if r['error'] is not None):.2f} pp")
    return 0


if __name__ == "__main__":
    sys.exit(main())
