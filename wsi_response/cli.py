"""The ``wsi-response`` command: parse arguments, call the library, print. Nothing else.

Exit codes: 0 success, 1 a slide (or other input, or the output disk) failed, 2 usage or
configuration error, 70 internal error (a bug: one line, the traceback in a log file), 130
interrupted (SIGINT), 141 stdout closed by its reader (``| head``), 143 terminated (SIGTERM).
Every error is one line on stderr (:func:`main`).
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import select
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NoReturn, Sequence

from . import __version__
from .batch import STALL_TIMEOUT_S
from .errors import ConfigError, WsiResponseError
from .malloc_arenas import limit_malloc_arenas

__all__ = ["main", "Terminated"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERNAL = 70                      # sysexits' EX_SOFTWARE: a bug; the traceback is in a log file
EXIT_INTERRUPTED, EXIT_BROKEN_PIPE, EXIT_TERMINATED = 130, 141, 143  # 128 + SIGINT, SIGPIPE, SIGTERM
MAX_ARRAY_TASKS = 1000  # SLURM's default MaxArraySize is 1001
_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)  # the output disk refuses a write
_ACCESS_ERRNOS = (errno.EACCES, errno.EPERM, errno.EIO)


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, ``wsi-response: error: PROBLEM (see ...)``, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"wsi-response: error: {' '.join(message.split())} (see `{self.prog} --help`)\n")


def _number(text: str) -> float:
    """A finite float (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _mpp(text: str) -> float:
    """µm per level-0 px within the plausible range of :data:`~wsi_response.slide.MPP_RANGE` (argparse type)."""
    from .slide import MPP_RANGE

    value = _number(text)
    if not MPP_RANGE[0] <= value <= MPP_RANGE[1]:
        raise argparse.ArgumentTypeError(f"{text} µm/px is outside the plausible range "
                                         f"{MPP_RANGE[0]:g}-{MPP_RANGE[1]:g} µm/px")
    return value


def _fraction(text: str) -> float:
    """A number in [0, 1] (argparse type)."""
    value = _number(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


def _at_least(low: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{text} is less than {low}")
        return value
    return parse


def _gpus(text: str) -> str:
    """``all`` or a number of GPUs >= 1 (argparse type; batch checks it against the GPUs visible)."""
    return text if text == "all" else str(_at_least(1)(text))


def _synth_domains() -> tuple[str, ...]:
    from .synth_domains import domain_names

    return domain_names()


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WxH, e.g. 8000x6000, got {text!r}") from None
    if w < 256 or h < 256:
        raise argparse.ArgumentTypeError(f"slide size {text} is too small (at least 256x256)")
    return w, h


def _mpp_args(args: argparse.Namespace) -> tuple[float | None, bool]:
    """The ``--mpp`` or ``--force-mpp`` value (µm/px, None if neither) and whether it is forced."""
    return (args.force_mpp, True) if args.force_mpp is not None else (args.mpp, False)


def _add_mpp_options(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--mpp", type=_mpp, default=None, metavar="UM",
                       help="µm per level-0 px of slides without their own MPP (where a slide has one, they must "
                            "agree within 1 %%)")
    group.add_argument("--force-mpp", type=_mpp, default=None, metavar="UM",
                       help="µm per level-0 px replacing every slide's own MPP (recorded as mpp_source override)")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text}: need a number of seconds above 0")
    return value


def _cmd_info(args: argparse.Namespace) -> int:
    from .slide import open_slide

    mpp, force = _mpp_args(args)
    slide = open_slide(args.slide, backend=args.backend, mpp=mpp, force_mpp=force)
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
    from .ids import check_specimen_id
    from .synth import ARTEFACTS, synth_specimen

    check_specimen_id(args.specimen, "--specimen")
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
        recall = _recall_text(val)
        print(f"validation ({result.report['metrics']['val_slides']} slides, {val['n_tiles']} tiles): "
              f"balanced accuracy {val['balanced_accuracy']:.3f} (epoch {result.report['metrics']['best_epoch']}); "
              f"recall {recall}")
        for warning in val["warnings"]:
            print(f"warning: {warning}", file=sys.stderr)
    print(f"report {result.report_path}")
    return EXIT_OK


def _recall_text(metrics: Mapping[str, Any]) -> str:
    """``viable_tumor 0.981, necrosis ...`` of a metrics block (classes without tiles left out)."""
    return ", ".join(f"{c} {r:.3f}" for c, r in metrics["recall"].items() if r is not None)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from .config import load_config
    from .recalibrate import recalibrate_model

    cfg = load_config(args.config, list(args.overrides))
    result = recalibrate_model(args.model, args.slides, args.annotations, args.out, cfg, device=args.device)
    m, cal = result.report["metrics"], result.report["calibration"]
    recall = _recall_text(m)
    print(f"model {args.out} (sha256 {result.classifier.sha256}): {args.model.name} with its error measured on "
          f"{cal['n_slides']} slides, {m['n_tiles']} tiles")
    print(f"balanced accuracy {m['balanced_accuracy']:.3f}; recall {recall}; temperature {cal['temperature']:.3f} "
          f"(ECE {cal['before']['ece']:.3f} -> {cal['after']['ece']:.3f})")
    for warning in m["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"report {result.report_path}")
    return EXIT_OK


def _split_overrides(items: Sequence[str]) -> tuple[list[Path], list[str]]:
    """Positional ``SLIDE...`` and ``section.key=value`` items, told apart by their shape."""
    slides, overrides = [], []
    for item in items:
        head, sep, _ = item.partition("=")
        is_override = bool(sep) and "." in head and "/" not in head and not _exists(item)
        (overrides if is_override else slides).append(item if is_override else Path(item))
    return slides, overrides


def _exists(path: str) -> bool:
    """Whether ``path`` names anything (False, not an error, for names too long or in a link loop)."""
    try:
        os.lstat(path)
    except (OSError, ValueError):
        return False
    return True


def _load_run_setup(args: argparse.Namespace, overrides: list[str], *, device_here: bool = True):
    """Config (with --device) and the classifier checked against it; says which model is used.

    ``device_here``: the config's device must exist on this machine (not so for ``slurm``).
    """
    from .config import load_config

    if args.device is not None:
        overrides = [*overrides, f"inference.device={args.device}"]
    cfg = load_config(args.config, overrides)  # before importing torch: a bad config fails at once
    from .classifier import default_model_path, load_classifier
    from .inference import resolve_device

    if device_here:
        resolve_device(cfg.inference.device)  # a GPU this machine lacks: usage error before any slide
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
    corrected = result.get("viable_percent_corrected")
    validated = f"; corrected for the validated error {corrected:.1f} %" if corrected is not None else ""
    headline = (f"viable tumor {viable:.1f} % of the tumor bed (95 % interval {ci[0]:.1f}–{ci[1]:.1f} %{validated}), "
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
    from .ids import check_specimen_id
    from .pipeline import run_specimen

    check_specimen_id(args.specimen, "--specimen")   # before the model loads
    slides, overrides = _split_overrides(args.items)
    if not slides:
        raise ConfigError("run: no slide given")
    cfg, classifier = _load_run_setup(args, overrides)
    mpp, force = _mpp_args(args)
    result = run_specimen(slides, args.specimen, args.out, classifier, cfg, mpp=mpp, force_mpp=force,
                          quiet=args.quiet)
    _print_specimen(result, args.out, args.json)
    return _exit_code(result)


def _cmd_aggregate(args: argparse.Namespace) -> int:
    from .ids import check_inside, check_specimen_id
    from .locks import FolderBusyError
    from .pipeline import aggregate_specimen, check_writable

    if not args.dir.is_dir():
        raise ConfigError(f"aggregate: {args.dir} is not a folder")
    folders = [args.dir] if (args.dir / "slides").is_dir() else sorted(
        p for p in args.dir.iterdir() if (p / "slides").is_dir())
    if not folders:
        raise ConfigError(f"aggregate: {args.dir} holds no specimen folder (DIR/<specimen>/slides/)")
    ids = [check_specimen_id(Path(os.path.abspath(f)).name, f"aggregate {args.dir}") for f in folders]
    check_inside(args.dir, *folders)
    code = EXIT_OK
    for folder, specimen_id in zip(folders, ids):
        check_writable(folder)
        previous = folder / "specimen.json"
        try:
            result = aggregate_specimen(folder, specimen_id)
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
    cfg, classifier = _load_run_setup(args, list(args.overrides),
                                      device_here=args.command == "batch" and args.gpus is None)
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
                       workers=args.workers, manifest=args.manifest.resolve(), quiet=args.quiet,
                       stall_timeout_s=args.stall_timeout)
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
                  "--stall-timeout", f"{args.stall_timeout:g}",
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
    cfg, classifier = _load_run_setup(args, [])
    if not args.quiet:
        print(f"writing a synthetic specimen ({args.slides} slides) to {data} ...", file=sys.stderr)
    truth = synth_specimen(data, specimen_id, args.slides, seed=args.seed, size_px=(12000, 9000), mpp=0.25,
                           viable_fraction=0.2)
    result = run_specimen([s.slide_path for s in truth.slides], specimen_id, args.out / "results", classifier,
                          cfg, quiet=args.quiet)
    _print_specimen(result, args.out / "results", False)
    print(f"ground truth (synthetic): viable {truth.viable_percent:.1f} % of the tumor bed; {truth.truth_path}")
    print("The bundled model is a demonstration trained on synthetic slides only; not for clinical use.")
    return _exit_code(result)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="wsi-response",
        description="Viable tumor percentage of treated sarcoma resections from whole-slide images.")
    parser.add_argument("--version", action="version", version=f"wsi-response {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="format, backend, dimensions, levels and MPP of a slide")
    p.add_argument("slide", type=Path)
    p.add_argument("--json", action="store_true", help="print JSON (field names as in slide.json)")
    p.add_argument("--backend", choices=("auto", "openslide", "tiffslide"), default="auto")
    _add_mpp_options(p)
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("synth", help="write a synthetic H&E specimen with exact ground truth")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--specimen", required=True, help="specimen id (folder name under --out)")
    p.add_argument("--slides", type=_at_least(1), default=3)
    p.add_argument("--seed", type=_at_least(0), default=0)
    p.add_argument("--size", type=_size, default=(8000, 6000), help="level-0 WxH px (default 8000x6000)")
    p.add_argument("--mpp", type=_mpp, default=0.25, help="µm per level-0 pixel (default 0.25)")
    p.add_argument("--viable-fraction", type=_fraction, default=None,
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
    p.add_argument("--epochs", type=_at_least(1), default=None)
    p.add_argument("--val-split", type=_fraction, default=None, help="fraction of slides held out (by slide)")
    p.add_argument("--arch", default=None, help="timm model name (default from training.arch: lcnet_050)")
    p.add_argument("--weights", type=Path, default=None, help="local pretrained backbone weights file")
    p.add_argument("--pretrained", action="store_true",
                   help="start from timm's published ImageNet weights (downloaded once, then cached)")
    p.add_argument("--weights-dtype", choices=("float32", "float16"), default="float32",
                   help="dtype of the stored weights (float16 halves the file)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--seed", type=_at_least(0), default=None)
    p.add_argument("--config", type=Path, default=None)
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. training.batch_size=16")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("calibrate", help="measure a model's error on this lab's annotated slides and write a "
                                         "copy whose intervals use it")
    p.add_argument("--model", type=Path, required=True, help="the trained model file (.safetensors)")
    p.add_argument("--slides", type=Path, nargs="+", required=True)
    p.add_argument("--annotations", type=Path, nargs="+", required=True,
                   help="QuPath GeoJSON per slide (paired by stem, else by order)")
    p.add_argument("--out", type=Path, required=True, help="the recalibrated model file to write (a new file)")
    p.add_argument("--config", type=Path, default=None, help="YAML config (see configs/default.yaml)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=_cmd_calibrate)

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
    _add_mpp_options(p)
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
        p.add_argument("--workers", type=_at_least(1), default=None,
                       help="worker processes, one slide each at a time (default: one per GPU, else 1)")
        p.add_argument("--stall-timeout", type=_seconds, default=STALL_TIMEOUT_S, metavar="SECONDS",
                       help="kill a worker that reports no progress (a stage, a chunk of tiles) for this long and "
                            f"record its slide as failed (default {STALL_TIMEOUT_S:g})")
        run_options(p)
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")

    p = sub.add_parser("batch", help="score the slides of a manifest (resumable; one shard of a job array)")
    batch_options(p)
    p.add_argument("--task-index", type=_at_least(0), default=None,
                   help="this task's shard, 0-based (default: from SLURM_ARRAY_TASK_ID, else 0)")
    p.add_argument("--task-count", type=_at_least(1), default=None, help="number of shards (default: SLURM_ARRAY_TASK_COUNT, else 1)")
    p.add_argument("--gpus", type=_gpus, default=None, metavar="all|N", help="spread slides over these GPUs, one worker each")
    p.add_argument("--aggregate-only", action="store_true",
                   help="run no slide: aggregate complete specimens, write DIR/batch-summary.json, list failures")
    p.set_defaults(func=_cmd_batch)

    p = sub.add_parser("slurm", help="submit a batch as a SLURM job array plus a follow-up aggregate job")
    batch_options(p)
    p.add_argument("--partition", default=None)
    p.add_argument("--tasks", type=_at_least(1), default=None,
                   help=f"array tasks (default: one per slide, at most {MAX_ARRAY_TASKS})")
    p.add_argument("--max-parallel", type=_at_least(1), default=None, help="array tasks running at once")
    p.add_argument("--gpus-per-task", type=_at_least(0), default=1, help="GPUs per task (0: CPU only; default 1)")
    p.add_argument("--cpus-per-task", type=_at_least(1), default=None)
    p.add_argument("--mem", default=None, help="memory per task, sbatch syntax (e.g. 16G)")
    p.add_argument("--time", default=None, help="time limit per task, sbatch syntax (e.g. 2:00:00)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch calls and scripts; submit nothing")
    p.set_defaults(func=_cmd_slurm)

    p = sub.add_parser("demo", help="make a synthetic specimen and score it with the bundled demo model")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--slides", type=_at_least(1), default=3)
    p.add_argument("--seed", type=_at_least(0), default=2024)
    run_options(p)
    p.set_defaults(func=_cmd_demo)
    return parser


class Terminated(BaseException):
    """SIGTERM arrived: raised in the main process, so every ``finally`` and context manager runs
    (process pools and tile readers end their children) before :func:`main` says so and exits 143."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code (see the module doc).

    The one place where errors become messages: usage and config errors exit 2, slide, input and
    output-disk errors exit 1, each with one line naming the file; anything else is a bug, printed
    as one line naming a log file that holds the traceback (:func:`_report_internal_error`).
    """
    limit_malloc_arenas()  # before torch's threads; the batch's worker processes inherit it
    parser = build_parser()
    try:
        args = _parse(parser, argv)
    except SystemExit as exc:  # --help, --version, usage errors (one line, see _Parser)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    func: Callable[[argparse.Namespace], int] = args.func
    with _signals_raise():
        try:
            code = func(args)
            sys.stdout.flush()  # a reader that went away shows here, not in the interpreter's exit
            return code
        except ConfigError as exc:
            return _say(f"error: {exc}", EXIT_USAGE)
        except WsiResponseError as exc:
            return _say(f"error: {exc}", EXIT_FAILED)
        except BrokenPipeError as exc:
            if not _stdout_closed():
                return _report_internal_error(exc, args)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the rest of the output goes nowhere
            return EXIT_BROKEN_PIPE
        except OSError as exc:
            if exc.filename is None or exc.errno not in (*_NO_SPACE_ERRNOS, *_ACCESS_ERRNOS):
                return _report_internal_error(exc, args)
            problem = f"cannot write ({exc.strerror})" if exc.errno in _NO_SPACE_ERRNOS else exc.strerror
            return _say(f"error: {os.fsdecode(exc.filename)}: {problem}", EXIT_FAILED)
        except KeyboardInterrupt:
            _end_children()
            return _say("interrupted", EXIT_INTERRUPTED)
        except Terminated:
            _end_children()
            return _say("terminated", EXIT_TERMINATED)
        except Exception as exc:  # a bug: one line here, the traceback in a log file
            return _report_internal_error(exc, args)


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    args, extra = parser.parse_known_args(argv)  # key=value overrides may follow the options
    target = "items" if hasattr(args, "items") else "overrides"  # `run` takes slides and overrides together
    if extra and isinstance(getattr(args, target, None), list) and not any(e.startswith("-") for e in extra):
        setattr(args, target, getattr(args, target) + extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _say(message: str, code: int) -> int:
    print(f"wsi-response: {message}", file=sys.stderr)
    return code


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` (once) and SIGINT ``KeyboardInterrupt`` in this process.

    A process forked from this one (the focus measure's pool) inherits the handler; there it
    dies of the signal at once, as without a handler, instead of printing a traceback.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pid, terminating = os.getpid(), []

    def handle(signum: int, frame: Any) -> None:
        if os.getpid() != pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not terminating:  # a second SIGTERM must not break the cleanup of the first
            terminating.append(signum)
            raise Terminated

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _end_children(grace_s: float = 5.0) -> None:
    """Terminate the child processes still running (tile readers, pools), then kill those that stay."""
    import multiprocessing

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)   # torch's DataLoader handler would raise as its workers end
    children = multiprocessing.active_children()
    for child in children:
        child.terminate()
    deadline = time.monotonic() + grace_s
    for child in children:
        child.join(max(0.0, deadline - time.monotonic()))
        if child.is_alive():  # a child ignoring SIGTERM
            child.kill()
            child.join(1.0)


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (``| head``), as opposed to any other broken pipe."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), 0)  # POLLERR is always reported
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll() (Windows) or no stdout: assume it was stdout
        return True


def _report_internal_error(error: BaseException, args: argparse.Namespace) -> int:
    """One line naming the error and the log file with its traceback; exit code 70."""
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    log = _write_log(text, args)
    summary = " ".join(f"{type(error).__name__}: {error}".split())[:300]
    where = f"traceback in {log}" if log else "no log could be written; traceback:\n" + text.rstrip()
    return _say(f"internal error: {summary}; {where}", EXIT_INTERNAL)


def _log_folders(args: argparse.Namespace) -> list[Path]:
    """Where the traceback of an internal error is written, first writable wins: ``OUT/logs`` when
    the command's output folder (``--out``, ``aggregate DIR``) exists, then
    ``$XDG_CACHE_HOME/wsi-response/logs`` (default ``~/.cache/...``), then the temp folder."""
    folders = [Path(d) / "logs" for d in (getattr(args, "out", None), getattr(args, "dir", None))
               if d is not None and Path(d).is_dir()]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return [*folders, Path(cache) / "wsi-response" / "logs", Path(tempfile.gettempdir())]


def _write_log(text: str, args: argparse.Namespace) -> Path | None:
    name = f"wsi-response-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    header = f"wsi-response {__version__}, python {sys.version.split()[0]}\ncommand: {' '.join(sys.argv)}\n\n"
    for folder in _log_folders(args):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(header + text, encoding="utf-8", errors="replace")
            return folder / name
        except OSError:
            continue
    return None


if __name__ == "__main__":
    sys.exit(main())
