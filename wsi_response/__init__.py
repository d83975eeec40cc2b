"""wsi-response: viable tumor percentage of treated sarcoma resections from whole-slide images.

The public surface is small; each stage lives in a module named after its job (see DESIGN.md).
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
from .slide import Slide, open_slide
from .tiling import TileGrid, TileReader, tile_grid
from .tissue import TissueMask, detect_tissue

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
