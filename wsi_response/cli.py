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

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


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
    from .synth import synth_specimen

    truth = synth_specimen(args.out, args.specimen, args.slides, seed=args.seed, size_px=args.size,
                           mpp=args.mpp, viable_fraction=args.viable_fraction, fmt=args.format)
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
    cfg = load_config(args.config, overrides)
    log = None if args.quiet else (lambda line: print(line, file=sys.stderr))
    result = train_classifier(args.slides, args.annotations, args.out, cfg, weights=args.weights,
                              device=args.device, weights_dtype=args.weights_dtype, log=log)
    val = result.report["metrics"].get("val")
    print(f"model {args.out} (sha256 {result.classifier.sha256})")
    if val:
        recall = ", ".join(f"{c} {r:.3f}" for c, r in val["recall"].items() if r is not None)
        print(f"validation ({result.report['metrics']['val_slides']} slides, {val['n_tiles']} tiles): "
              f"balanced accuracy {val['balanced_accuracy']:.3f}; recall {recall}")
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
    for flag in result["qc"]["flags"]:
        print(f"  QC: {flag}")
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
    from .pipeline import aggregate_specimen

    folders = [args.dir] if (args.dir / "slides").is_dir() else sorted(
        p for p in args.dir.iterdir() if (p / "slides").is_dir())
    if not folders:
        raise ConfigError(f"aggregate: {args.dir} holds no specimen folder (DIR/<specimen>/slides/)")
    code = EXIT_OK
    for folder in folders:
        previous = folder / "specimen.json"
        result = aggregate_specimen(folder, folder.name)
        if previous.exists() and not args.quiet:
            print(f"rebuilt {previous}", file=sys.stderr)
        _print_specimen(result, folder.parent, False)
        code = max(code, _exit_code(result))
    return code


def _cmd_demo(args: argparse.Namespace) -> int:
    from .pipeline import run_specimen
    from .synth import synth_specimen

    specimen_id = "DEMO-001"
    data = args.out / "slides"
    if not args.quiet:
        print(f"writing a synthetic specimen ({args.slides} slides) to {data} ...", file=sys.stderr)
    truth = synth_specimen(data, specimen_id, args.slides, seed=args.seed, size_px=(8000, 6000), mpp=0.25,
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
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("train", help="train a tile classifier from slides and QuPath annotations")
    p.add_argument("--slides", type=Path, nargs="+", required=True)
    p.add_argument("--annotations", type=Path, nargs="+", required=True,
                   help="QuPath GeoJSON per slide (paired by stem, else by order)")
    p.add_argument("--out", type=Path, required=True, help="model file to write (.safetensors)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--val-split", type=float, default=None, help="fraction of slides held out (by slide)")
    p.add_argument("--arch", default=None, help="timm model name (default from training.arch: resnet18)")
    p.add_argument("--weights", type=Path, default=None, help="local pretrained backbone weights (never downloaded)")
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

    p = sub.add_parser("demo", help="make a synthetic specimen and score it with the bundled demo model")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--slides", type=int, default=3)
    p.add_argument("--seed", type=int, default=2024)
    run_options(p)
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
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
