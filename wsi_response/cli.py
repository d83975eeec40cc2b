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
