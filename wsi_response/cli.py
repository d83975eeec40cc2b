"""The ``wsi-response`` command: parse arguments, call the library, print. Nothing else.

Exit codes: 0 success, 1 a slide (or other input) failed, 2 usage or configuration error.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

from . import __version__
from .errors import ConfigError, WsiResponseError
from .malloc_arenas import limit_malloc_arenas

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
MAX_ARRAY_TASKS = 1000  # SLURM's default MaxArraySize is 1001


def _synth_domains() -> tuple[str, ...]:
    from .synth_domains import DOMAINS

    return tuple(DOMAINS)


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WxH, e.g. 8000x6000, got {text!r}") from None
    if w < 256 or h < 256:
        raise argparse.ArgumentTypeError(f"slide size {text} is too small (at least 256x256)")
    return w, h


def _cmd_info(args: argparse.Namespace) -> int:
    from .slide import open_slide

    slide = open_slide(args.slide, backend=args.backend, mpp=args.mpp)
    info = slide.info()
    if args.json:
        print(json.dumps(info, indent=2))
        return EXIT_OK
    print(f"{info['path']}")
    print(f"  format        {info['format']}")
    print(f"  backend       {info['backend']} ({info['backend_reason']})")
    print(f"  dimensions    {info['dimensions_px'][0]} x {info['dimensions_px'][1]} px (level 0)")
    print(f"  mpp           {info['mpp']:.4f} µm/px (source: {info['mpp_source']})")
    print(f"  objective     {info['objective_power'] if info['objective_power'] else 'unknown'}")
    print(f"  bounds offset {info['bounds_offset_l0'][0]}, {info['bounds_offset_l0'][1]} px")
    for i, level in enumerate(info["levels"]):
        w, h = level["dimensions_px"]
        print(f"  level {i}       {w} x {h} px, downsample {level['downsample']:.3f}, {level['mpp']:.3f} µm/px")
    return EXIT_OK


def _cmd_synth(args: argparse.Namespace) -> int:
    from .synth import ARTEFACTS, synth_specimen

    artefacts = tuple(k.strip() for k in (args.artefacts or "").split(",") if k.strip())
    unknown = [k for k in artefacts if k not in ARTEFACTS]
    if unknown:
        raise ConfigError(f"--artefacts: unknown {', '.join(unknown)} (choose from {','.join(ARTEFACTS)})")
    truth = synth_specimen(args.out, args.specimen, args.slides, seed=args.seed, size_px=args.size,
                           mpp=args.mpp, viable_fraction=args.viable_fraction, fmt=args.format,
                           artefacts=artefacts, domain=args.domain)
    for slide in truth.slides:
        print(f"{slide.slide_path}  tissue {slide.tissue_area_mm2:.2f} mm²")
    print(f"specimen {truth.specimen_id}: {len(truth.slides)} slides, true viable {truth.viable_percent:.2f} % "
          f"of the tumor bed; ground truth in {truth.truth_path}")
    return EXIT_OK


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .train import train_classifier

    overrides = list(args.overrides)
    for key, value in (("epochs", args.epochs), ("val_split", args.val_split), ("arch", args.arch),
                       ("seed", args.seed)):
        if value is not None:
            overrides.append(f"training.{key}={value}")
    if args.pretrained:
        overrides.append("training.pretrained=true")
    cfg = load_config(args.config, overrides)
    log = None if args.quiet else (lambda line: print(line, file=sys.stderr))
    result = train_classifier(args.slides, args.annotations, args.out, cfg, weights=args.weights,
                              device=args.device, weights_dtype=args.weights_dtype, log=log)
    val = result.report["metrics"].get("val")
    print(f"model {args.out} (sha256 {result.classifier.sha256})")
    if val:
        recall = ", ".join(f"{c} {r:.3f}" for c, r in val["recall"].items() if r is not None)
        print(f"validation ({result.report['metrics']['val_slides']} slides, {val['n_tiles']} tiles): "
              f"balanced accuracy {val['balanced_accuracy']:.3f} (epoch {result.report['metrics']['best_epoch']}); "
              f"recall {recall}")
        for warning in val["warnings"]:
            print(f"warning: {warning}", file=sys.stderr)
    print(f"report {result.report_path}")
    return EXIT_OK


def _split_overrides(items: Sequence[str]) -> tuple[list[Path], list[str]]:
    """Positional ``SLIDE...`` and ``section.key=value`` items, told apart by their shape."""
    slides, overrides = [], []
    for item in items:
        head, sep, _ = item.partition("=")
        is_override = bool(sep) and "." in head and "/" not in head and not Path(item).exists()
        (overrides if is_override else slides).append(item if is_override else Path(item))
    return slides, overrides


def _load_run_setup(args: argparse.Namespace, overrides: list[str]):
    """Config (with --device) and the classifier checked against it; says which model is used."""
    from .classifier import default_model_path, load_classifier
    from .config import load_config

    if args.device is not None:
        overrides = [*overrides, f"inference.device={args.device}"]
    cfg = load_config(args.config, overrides)
    model_path = args.model or default_model_path()
    classifier = load_classifier(model_path, cfg.tiling)
    if not args.quiet:
        trained = json.dumps(classifier.trained_on.get("description", classifier.trained_on))
        demo = " (DEMONSTRATION model, synthetic training data: not for clinical use)" \
            if args.model is None else ""
        print(f"model {model_path.name}{demo}; sha256 {classifier.sha256[:16]}…; trained on {trained}",
              file=sys.stderr)
    return cfg, classifier


def _print_specimen(result: dict, out: Path, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2))
        return
    specimen_dir = out / result["specimen_id"]
    viable = result["viable_percent"]
    ci = result["viable_percent_ci95"]
    tier = (result.get("eortc") or {}).get("tier")
    headline = (f"viable tumor {viable:.1f} % of the tumor bed (95 % interval {ci[0]:.1f}–{ci[1]:.1f} %), "
                f"EORTC-STBSG {tier}" if viable is not None else "no tumor bed found")
    print(f"specimen {result['specimen_id']} [{result['status']}]: {headline}")
    print(f"  QC verdict: {result['qc']['verdict']}")
    for flag in result["qc"]["flags"]:
        print(f"  QC {flag['severity']}: {flag['message']}")
    for slide in result["slides"]:
        if slide["status"] == "failed":
            print(f"  failed: {slide['error']}")
    print(f"report: {specimen_dir / 'report.html'}")
    print(f"results: {specimen_dir / 'specimen.json'}")


def _exit_code(result: dict) -> int:
    return EXIT_FAILED if any(s["status"] == "failed" for s in result["slides"]) else EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    from .pipeline import run_specimen

    slides, overrides = _split_overrides(args.items)
    if not slides:
        raise ConfigError("run: no slide given")
    cfg, classifier = _load_run_setup(args, overrides)
    result = run_specimen(slides, args.specimen, args.out, classifier, cfg, mpp=args.mpp, quiet=args.quiet)
    _print_specimen(result, args.out, args.json)
    return _exit_code(result)


def _cmd_aggregate(args: argparse.Namespace) -> int:
    from .locks import FolderBusyError
    from .pipeline import aggregate_specimen

    folders = [args.dir] if (args.dir / "slides").is_dir() else sorted(
        p for p in args.dir.iterdir() if (p / "slides").is_dir())
    if not folders:
        raise ConfigError(f"aggregate: {args.dir} holds no specimen folder (DIR/<specimen>/slides/)")
    code = EXIT_OK
    for folder in folders:
        previous = folder / "specimen.json"
        try:
            result = aggregate_specimen(folder, folder.name)
        except FolderBusyError as busy:   # the other specimens are still aggregated
            print(f"wsi-response: error: {busy}", file=sys.stderr)
            code = EXIT_FAILED
            continue
        if previous.exists() and not args.quiet:
            print(f"rebuilt {previous}", file=sys.stderr)
        _print_specimen(result, folder.parent, False)
        code = max(code, _exit_code(result))
    return code


def _read_batch_manifest(args: argparse.Namespace):
    """Manifest rows, and the config and classifier of a batch (``--model``, ``--config``, ``key=value``)."""
    from .batch import read_manifest

    tasks = read_manifest(args.manifest)
    cfg, classifier = _load_run_setup(args, list(args.overrides))
    return tasks, cfg, classifier


def _print_batch_summary(summary: dict) -> None:
    counts = ", ".join(f"{n} {status}" for status, n in sorted(summary["counts"].items()))
    print(f"batch: {summary['n_slides']} slides: {counts}")
    for s in summary["failed"]:
        print(f"  failed: {s['specimen_id']}/{s['slide_id']}: {s['error']}")
    for s in summary["not_done"]:
        print(f"  not done: {s['specimen_id']}/{s['slide_id']}: {s['path']}")
    for s in summary["specimens"]:
        viable = s.get("viable_percent")
        numbers = f": viable {viable:.1f} %, EORTC-STBSG {s.get('eortc_tier')}" if viable is not None else ""
        busy = f": {s['error']}" if s.get("error") else ""
        print(f"  specimen {s['specimen_id']} [{s['status']}]{numbers}{busy}")
    if summary["not_done"]:
        print("  run the same command again to finish the slides not done (finished ones are kept)")


def _cmd_batch(args: argparse.Namespace) -> int:
    import signal

    from .batch import SUMMARY_NAME, finalize_batch, missing_slides, run_batch, shard, task_from_env

    tasks, cfg, classifier = _read_batch_manifest(args)
    if args.aggregate_only:
        summary = finalize_batch(tasks, args.out, classifier.sha256, cfg, args.manifest.resolve())
        _print_batch_summary(summary)
        print(f"summary: {args.out / SUMMARY_NAME}")
        return EXIT_FAILED if summary["failed"] or summary["not_done"] else EXIT_OK
    if (args.task_index is None) != (args.task_count is None):
        raise ConfigError("batch: give both --task-index and --task-count, or neither")
    index, count = ((args.task_index, args.task_count) if args.task_index is not None
                    else task_from_env() or (0, 1))
    missing = missing_slides(shard(tasks, index, count))
    if missing:
        print(f"wsi-response: {len(missing)} slide file(s) in {args.manifest} do not exist; they are recorded as "
              "failed: " + "; ".join(f"line {t.line}: {t.path}" for t in missing), file=sys.stderr)
    result = run_batch(tasks, args.out, classifier, cfg, task_index=index, task_count=count, gpus=args.gpus,
                       workers=args.workers, manifest=args.manifest.resolve(), quiet=args.quiet)
    if result.stopped_by is not None:
        name = signal.Signals(result.stopped_by).name
        print(f"wsi-response: stopped by {name}: {len(result.statuses)} slides finished in this run, "
              f"{len(result.tasks) - len(result.skipped) - len(result.statuses)} left; finished slides are kept; "
              "run the same command again to continue", file=sys.stderr)
        return 128 + result.stopped_by
    if result.summary is not None:
        _print_batch_summary(result.summary)
        print(f"summary: {args.out / SUMMARY_NAME}")
    else:
        print(f"batch task {index} of {count}: {len(result.tasks)} slides, {len(result.skipped)} already done, "
              f"{len(result.failed)} failed, {len(result.busy)} in progress elsewhere; "
              f"aggregated: {', '.join(result.aggregated) or 'none yet'}")
    return EXIT_FAILED if result.failed else EXIT_OK


def _cmd_slurm(args: argparse.Namespace) -> int:
    from .slurm import SlurmOptions, submit

    if args.gpus_per_task and args.device == "cpu":
        raise ConfigError(f"slurm: --device cpu with --gpus-per-task {args.gpus_per_task}; pass --gpus-per-task 0")
    tasks, _, _ = _read_batch_manifest(args)   # usage, config and model errors before anything is queued
    n_tasks = min(args.tasks or MAX_ARRAY_TASKS, len(tasks))
    opts = SlurmOptions(tasks=n_tasks, max_parallel=args.max_parallel, partition=args.partition,
                        gpus_per_task=args.gpus_per_task, cpus_per_task=args.cpus_per_task, mem=args.mem,
                        time=args.time)
    batch_args = [*(["--model", str(args.model.resolve())] if args.model else []),
                  *(["--config", str(args.config.resolve())] if args.config else []),
                  *(["--device", args.device] if args.device else []),
                  *(["--workers", str(args.workers)] if args.workers else []),
                  *args.overrides]
    array_id, aggregate_id, jobs = submit(args.manifest, args.out, opts, batch_args, dry_run=args.dry_run)
    if args.dry_run:
        for job in jobs:
            print(job.shell())
        return EXIT_OK
    logs = args.out.resolve() / "logs"
    print(f"submitted array job {array_id}: {n_tasks} tasks over {len(tasks)} slides"
          + (f", at most {args.max_parallel} at once" if args.max_parallel else "") + f"; logs {logs}/{array_id}_<task>.out")
    print(f"submitted aggregate job {aggregate_id} (runs when {array_id} has ended); "
          f"summary {args.out.resolve() / 'batch-summary.json'}")
    print("after a time limit or a failure, run the same command again: finished slides are kept")
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from .pipeline import run_specimen
    from .synth import synth_specimen

    specimen_id = "DEMO-001"
    data = args.out / "slides"
    if not args.quiet:
        print(f"writing a synthetic specimen ({args.slides} slides) to {data} ...", file=sys.stderr)
    truth = synth_specimen(data, specimen_id, args.slides, seed=args.seed, size_px=(12000, 9000), mpp=0.25,
                           viable_fraction=0.2)
    cfg, classifier = _load_run_setup(args, [])
    result = run_specimen([s.slide_path for s in truth.slides], specimen_id, args.out / "results", classifier,
                          cfg, quiet=args.quiet)
    _print_specimen(result, args.out / "results", False)
    print(f"ground truth (synthetic): viable {truth.viable_percent:.1f} % of the tumor bed; {truth.truth_path}")
    print("The bundled model is a demonstration trained on synthetic slides only; not for clinical use.")
    return _exit_code(result)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsi-response",
        description="Viable tumor percentage of treated sarcoma resections from whole-slide images.")
    parser.add_argument("--version", action="version", version=f"wsi-response {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="format, backend, dimensions, levels and MPP of a slide")
    p.add_argument("slide", type=Path)
    p.add_argument("--json", action="store_true", help="print JSON (field names as in slide.json)")
    p.add_argument("--backend", choices=("auto", "openslide", "tiffslide"), default="auto")
    p.add_argument("--mpp", type=float, default=None, help="override the slide's µm per level-0 pixel")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("synth", help="write a synthetic H&E specimen with exact ground truth")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--specimen", required=True, help="specimen id (folder name under --out)")
    p.add_argument("--slides", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=_size, default=(8000, 6000), help="level-0 WxH px (default 8000x6000)")
    p.add_argument("--mpp", type=float, default=0.25, help="µm per level-0 pixel (default 0.25)")
    p.add_argument("--viable-fraction", type=float, default=None,
                   help="target viable / tumor bed (0-1); random per slide if omitted")
    p.add_argument("--format", choices=("svs", "tiff"), default="svs")
    p.add_argument("--artefacts", default="", metavar="KINDS",
                   help="comma-separated artefacts to add: pen,blur,fold,bubble (default none)")
    p.add_argument("--domain", choices=_synth_domains(), default="default",
                   help="generator setting: staining, scanner, morphology, tissue sub-types")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("train", help="train a tile classifier from slides and QuPath annotations")
    p.add_argument("--slides", type=Path, nargs="+", required=True)
    p.add_argument("--annotations", type=Path, nargs="+", required=True,
                   help="QuPath GeoJSON per slide (paired by stem, else by order)")
    p.add_argument("--out", type=Path, required=True, help="model file to write (.safetensors)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--val-split", type=float, default=None, help="fraction of slides held out (by slide)")
    p.add_argument("--arch", default=None, help="timm model name (default from training.arch: lcnet_050)")
    p.add_argument("--weights", type=Path, default=None, help="local pretrained backbone weights file")
    p.add_argument("--pretrained", action="store_true",
                   help="start from timm's published ImageNet weights (downloaded once, then cached)")
    p.add_argument("--weights-dtype", choices=("float32", "float16"), default="float32",
                   help="dtype of the stored weights (float16 halves the file)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--config", type=Path, default=None)
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. training.batch_size=16")
    p.set_defaults(func=_cmd_train)

    def run_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", type=Path, default=None,
                       help="model file (.safetensors); default: the bundled demonstration model")
        p.add_argument("--config", type=Path, default=None, help="YAML config (see configs/default.yaml)")
        p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None)
        p.add_argument("--quiet", action="store_true", help="no progress on stderr")

    p = sub.add_parser("run", help="score the slides of one specimen")
    p.add_argument("items", nargs="+", metavar="SLIDE|key=value", help="slide files, then config overrides")
    p.add_argument("--specimen", required=True, help="specimen id (folder name under --out)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--mpp", type=float, default=None, help="µm per level-0 px for slides without MPP")
    p.add_argument("--json", action="store_true", help="print specimen.json to stdout")
    run_options(p)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("aggregate", help="(re)build specimen.json and report.html from per-slide outputs")
    p.add_argument("dir", type=Path, help="an output folder (DIR/<specimen>/...) or one specimen folder")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_aggregate)

    def batch_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("manifest", type=Path, help="CSV with header specimen_id,slide_path")
        p.add_argument("--out", type=Path, required=True)
        p.add_argument("--workers", type=int, default=None,
                       help="worker processes, one slide each at a time (default: one per GPU, else 1)")
        run_options(p)
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")

    p = sub.add_parser("batch", help="score the slides of a manifest (resumable; one shard of a job array)")
    batch_options(p)
    p.add_argument("--task-index", type=int, default=None,
                   help="this task's shard, 0-based (default: from SLURM_ARRAY_TASK_ID, else 0)")
    p.add_argument("--task-count", type=int, default=None, help="number of shards (default: SLURM_ARRAY_TASK_COUNT, else 1)")
    p.add_argument("--gpus", default=None, metavar="all|N", help="spread slides over these GPUs, one worker each")
    p.add_argument("--aggregate-only", action="store_true",
                   help="run no slide: aggregate complete specimens, write DIR/batch-summary.json, list failures")
    p.set_defaults(func=_cmd_batch)

    p = sub.add_parser("slurm", help="submit a batch as a SLURM job array plus a follow-up aggregate job")
    batch_options(p)
    p.add_argument("--partition", default=None)
    p.add_argument("--tasks", type=int, default=None,
                   help=f"array tasks (default: one per slide, at most {MAX_ARRAY_TASKS})")
    p.add_argument("--max-parallel", type=int, default=None, help="array tasks running at once")
    p.add_argument("--gpus-per-task", type=int, default=1, help="GPUs per task (0: CPU only; default 1)")
    p.add_argument("--cpus-per-task", type=int, default=None)
    p.add_argument("--mem", default=None, help="memory per task, sbatch syntax (e.g. 16G)")
    p.add_argument("--time", default=None, help="time limit per task, sbatch syntax (e.g. 2:00:00)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch calls and scripts; submit nothing")
    p.set_defaults(func=_cmd_slurm)

    p = sub.add_parser("demo", help="make a synthetic specimen and score it with the bundled demo model")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--slides", type=int, default=3)
    p.add_argument("--seed", type=int, default=2024)
    run_options(p)
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    limit_malloc_arenas()  # before torch's threads; the batch's worker processes inherit it
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # key=value overrides may follow the options
    target = "items" if hasattr(args, "items") else "overrides"  # `run` takes slides and overrides together
    if extra and isinstance(getattr(args, target, None), list) and not any(e.startswith("-") for e in extra):
        setattr(args, target, getattr(args, target) + extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ConfigError as exc:
        print(f"wsi-response: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except WsiResponseError as exc:
        print(f"wsi-response: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("wsi-response: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
