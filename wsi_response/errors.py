"""The one exception family of wsi-response.

Every error a user can cause is a ``WsiResponseError`` whose ``str()`` is one line that names
the file (or config key) and the problem::

    WsiResponseError
    ├── SlideError              a slide file cannot be used          (.path)
    │   ├── SlideNotFoundError      no such file
    │   ├── SlideFormatError        not a slide, empty, truncated, unsupported layout
    │   ├── MissingMppError         no microns-per-pixel in the file and none given
    │   └── SlideReadError          pixels could not be decoded (corrupt tile, dead handle)
    ├── ConfigError             a config key has a bad value or does not exist
    ├── ModelError              a checkpoint is unreadable or does not match the run
    ├── AnnotationError         a QuPath GeoJSON file cannot be used
    └── OutputError             the output folder cannot be written

The CLI prints ``str(error)`` on one line and exits non-zero; nothing else is caught.
"""
from __future__ import annotations

from pathlib import Path

__all__ = [
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


class WsiResponseError(Exception):
    """Base of every error wsi-response raises on purpose."""


class _PathError(WsiResponseError):
    """An error about one file: ``str()`` is ``"<path>: <problem>"``."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = " ".join(str(problem).split())  # always one line
        super().__init__(f"{self.path}: {self.problem}")

    def __reduce__(self) -> tuple:  # survives pickling from worker processes
        return (type(self), (self.path, self.problem))


class SlideError(_PathError):
    """A slide file cannot be used."""


class SlideNotFoundError(SlideError):
    """The slide path does not exist."""


class SlideFormatError(SlideError):
    """The file is not a readable whole-slide image (empty, text, truncated, unsupported)."""


class MissingMppError(SlideError):
    """The slide has no microns-per-pixel and none was given with ``--mpp``."""


class SlideReadError(SlideError):
    """Pixels of an opened slide could not be read (corrupt tile, truncated data)."""


class ConfigError(WsiResponseError):
    """A configuration key is unknown or its value is out of range."""


class ModelError(_PathError):
    """A model checkpoint is unreadable or does not match the run configuration."""


class AnnotationError(_PathError):
    """A QuPath GeoJSON annotation file cannot be used."""


class OutputError(_PathError):
    """The output location cannot be written."""
