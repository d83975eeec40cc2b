"""wsi-response: viable tumor percentage of treated sarcoma resections from whole-slide images.

The public surface is small; each stage lives in a module named after its job (see DESIGN.md).
``predict`` and ``load_classifier`` need torch and are imported on first use, so that
``import wsi_response`` stays light.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .classes import CLASSES, COLORS_RGB, QUPATH_NAMES, TUMOR_BED
from .config import Config, load_config
from .errors import (
    AnnotationError,
    ConfigError,
    MissingMppError,
    ModelError,
    OutputError,
    SlideError,
    SlideFormatError,
    SlideNotFoundError,
    SlideReadError,
    WsiResponseError,
)
from .pipeline import aggregate_specimen, run_specimen
from .quantify import SlideAreas, SpecimenAreas, eortc_tier, slide_areas, specimen_areas
from .regions import class_regions, tissue_polygons
from .slide import Slide, open_slide
from .store import TilePredictions
from .synth import synth_slide, synth_specimen
from .tiling import TileGrid, TileReader, tile_grid
from .tissue import TissueMask, detect_tissue

_LAZY = {"predict": "inference", "load_classifier": "classifier", "Classifier": "classifier"}


def __getattr__(name: str):
    """Torch-backed names, imported on first use."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "__version__",
    "CLASSES",
    "COLORS_RGB",
    "QUPATH_NAMES",
    "TUMOR_BED",
    "Config",
    "load_config",
    "Slide",
    "open_slide",
    "TissueMask",
    "detect_tissue",
    "TileGrid",
    "TileReader",
    "tile_grid",
    "TilePredictions",
    "predict",
    "load_classifier",
    "Classifier",
    "SlideAreas",
    "SpecimenAreas",
    "slide_areas",
    "specimen_areas",
    "eortc_tier",
    "class_regions",
    "tissue_polygons",
    "run_specimen",
    "aggregate_specimen",
    "synth_slide",
    "synth_specimen",
    "WsiResponseError",
    "SlideError",
    "SlideNotFoundError",
    "SlideFormatError",
    "MissingMppError",
    "SlideReadError",
    "ConfigError",
    "ModelError",
    "AnnotationError",
    "OutputError",
]
