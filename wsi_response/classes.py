"""The four canonical tissue classes, their QuPath names and display colours.

Tumor bed = viable_tumor + necrosis + fibrosis; ``other`` (normal tissue, fat, muscle, blood,
debris) lies outside it.
"""
from __future__ import annotations

__all__ = ["CLASSES", "TUMOR_BED", "ARTEFACT", "QUPATH_NAMES", "COLORS_RGB", "class_index",
           "qupath_classification"]

CLASSES: tuple[str, ...] = ("viable_tumor", "necrosis", "fibrosis", "other")
TUMOR_BED: tuple[str, ...] = ("viable_tumor", "necrosis", "fibrosis")
ARTEFACT = "artefact"  # excluded area (ink, blur, folds, bubbles, blank tiles): a layer, not a class
QUPATH_NAMES: dict[str, str] = {
    "viable_tumor": "Viable tumor",
    "necrosis": "Necrosis",
    "fibrosis": "Fibrosis",
    "other": "Other",
    ARTEFACT: "Artefact",
}
COLORS_RGB: dict[str, tuple[int, int, int]] = {
    "viable_tumor": (200, 30, 40),
    "necrosis": (240, 200, 40),
    "fibrosis": (60, 120, 220),
    "other": (140, 140, 140),
    ARTEFACT: (20, 20, 20),
}


def class_index(name: str) -> int:
    """Index of a canonical class id in :data:`CLASSES`."""
    return CLASSES.index(name)


def qupath_classification(class_id: str) -> dict[str, object]:
    """QuPath's ``classification`` object of a class: its name and, always, its colour."""
    return {"name": QUPATH_NAMES[class_id], "color": list(COLORS_RGB[class_id])}
