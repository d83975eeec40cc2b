"""Tile predictions, and their per-slide zarr store (resumable).

``TilePredictions`` rows follow the ``TileGrid`` order of the slide they were computed on.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["TilePredictions"]


@dataclass(frozen=True)
class TilePredictions:
    """Class probabilities ``(N, C)`` float32 for the N tiles of a grid, classes in column order."""

    probs: np.ndarray
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.probs.shape[0])

    @property
    def labels(self) -> np.ndarray:
        """(N,) int64 index of the most probable class of each tile."""
        return np.argmax(self.probs, axis=1)
