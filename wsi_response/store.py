"""Tile predictions, and their per-slide zarr store (resumable).

``TilePredictions`` rows follow the ``TileGrid`` order of the slide they were computed on.

Store layout (zarr v3 folder ``tiles.zarr``)::

    cols_rows        (N, 2) int32    grid cell (column, row) of each tile
    origins_l0       (N, 2) float64  tile top-left, level-0 px
    tissue_fraction  (N,)   float32
    chunk_starts     (K+1,) int64    grid chunk k holds rows chunk_starts[k]:chunk_starts[k+1]
    probs            (N, C) float32  class probabilities, columns in attrs["class_names"]
    subcell_tissue_fraction (N, k*k) float32  only with sub-cells (attrs["subcells"] = k > 1):
                     tissue fraction of each tile's sub-cells, row-major
    subcell_probs    (N, k*k, C) float32  ... and their class probabilities
    chunk_done       (K,)   uint8    1 once chunk k's probabilities are written
    attrs            metadata: model sha256, class names, grid parameters, slide path/size/mtime,
                     software version (see :func:`store_metadata`)

Format 2 added the sub-cells (``refine`` and ``subcells`` in the metadata); a format-1 store
does not match and is recomputed.

Crash safety, the choice made: work happens in ``<path>.partial``; the finished store is renamed
to ``<path>`` only when every chunk is done, so a store at its final name is always complete.
Inside the partial store a chunk's probabilities (tile and sub-cell) are written first and its ``chunk_done`` flag
second (finished chunks are written together every few seconds:
:func:`~wsi_response.inference.predict`); zarr's local store writes each chunk file to a
temporary name and renames it, so a killed run leaves every flagged chunk intact. On restart, a
store (final or partial) whose metadata differs from the current run's is deleted and
recomputed, never reused.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["TilePredictions", "StoredTiles", "TileStore", "store_metadata", "open_tile_store", "read_tile_store"]

STORE_FORMAT = "wsi-response-tiles/2"
_ROWS_PER_ZARR_CHUNK = 8192


@dataclass(frozen=True)
class TilePredictions:
    """Class probabilities ``(N, C)`` float32 for the N tiles of a grid, classes in column order,
    and with sub-cells those of each tile's k × k sub-cells ``(N, k*k, C)`` (row-major)."""

    probs: np.ndarray
    class_names: tuple[str, ...]
    subcell_probs: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.probs.shape[0])

    @property
    def labels(self) -> np.ndarray:
        """(N,) int64 index of the most probable class of each tile."""
        return np.argmax(self.probs, axis=1)


def store_metadata(slide: Any, grid: Any, model_sha256: str, class_names: tuple[str, ...]) -> dict[str, Any]:
    """What a store's contents depend on; a store is reused only when this matches exactly.

    ``slide`` is a :class:`~wsi_response.slide.Slide`, ``grid`` a :class:`~wsi_response.tiling.TileGrid`.
    """
    from . import __version__

    stat = Path(slide.path).stat()
    grid_hash = hashlib.sha256()
    for arr in (grid.cols_rows, grid.chunk_starts, grid.tissue_fraction, grid.subcell_fraction):
        if arr is not None:
            grid_hash.update(np.ascontiguousarray(arr).tobytes())
    return {
        "format": STORE_FORMAT,
        "software_version": __version__,
        "model_sha256": model_sha256,
        "class_names": list(class_names),
        "slide_path": str(Path(slide.path).resolve()),
        "slide_size_bytes": int(stat.st_size),
        "slide_mtime_ns": int(stat.st_mtime_ns),
        "slide_mpp": float(slide.mpp),
        "tile_px": int(grid.tile_px),
        "stride_px": int(grid.stride_px),
        "read_mpp": float(grid.read_mpp),
        "read_level": int(grid.read_level),
        "refine": "none" if grid.subcell_fraction is None else "dense",
        "subcells": int(grid.subcells),
        "n_tiles": len(grid),
        "n_chunks": int(grid.n_chunks),
        "grid_sha256": grid_hash.hexdigest(),
    }


class TileStore:
    """An open tile store being filled chunk by chunk (use :func:`open_tile_store`)."""

    def __init__(self, final_path: Path, group: Any, complete: bool) -> None:
        self.final_path = final_path
        self._group = group
        self.complete = complete
        self._starts = np.asarray(group["chunk_starts"][:])  # this writer alone changes the store:
        self._done = np.asarray(group["chunk_done"][:]).astype(bool)  # both are kept here, not re-read

    @property
    def metadata(self) -> dict[str, Any]:
        return dict(self._group.attrs)

    @property
    def done(self) -> np.ndarray:
        """(K,) bool: chunks whose probabilities are stored."""
        return self._done.copy()

    def chunk_probs(self, k: int) -> np.ndarray:
        return np.asarray(self._group["probs"][int(self._starts[k]):int(self._starts[k + 1])])

    def probs(self) -> np.ndarray:
        """(N, C) float32 of every tile (rows of chunks not done are NaN)."""
        return np.asarray(self._group["probs"][:])

    def subcell_probs(self) -> np.ndarray | None:
        """(N, k*k, C) float32 of every tile's sub-cells (NaN where not done); None without sub-cells."""
        return np.asarray(self._group["subcell_probs"][:]) if "subcell_probs" in self._group else None

    def write_chunks(self, chunks: Sequence[int], probs: np.ndarray, subcell_probs: np.ndarray | None = None) -> None:
        """Store the probabilities of the finished ``chunks`` from ``probs`` ``(N, C)`` (every tile
        of the grid, in grid order) and ``subcell_probs`` ``(N, k*k, C)`` (with sub-cells), then
        flag them done (in that order). One write of the rows from the first to the last of them:
        rows of other chunks in between are written as the arrays hold them (NaN, or what this
        store already held for them)."""
        if not len(chunks):
            return
        ks = np.asarray(chunks, np.int64)
        start, stop = int(self._starts[ks.min()]), int(self._starts[ks.max() + 1])
        self._group["probs"][start:stop] = probs[start:stop].astype(np.float32, copy=False)
        if subcell_probs is not None:
            self._group["subcell_probs"][start:stop] = subcell_probs[start:stop].astype(np.float32, copy=False)
        done = self._done.copy()
        done[ks] = True
        self._group["chunk_done"][:] = done.astype(np.uint8)
        self._done = done

    def finalize(self) -> Path:
        """Rename the partial store to its final name once every chunk is done; return that path."""
        if self.complete:
            return self.final_path
        missing = int((~self.done).sum())
        if missing:
            raise RuntimeError(f"{self.final_path}: {missing} chunks not done yet")
        self._group.attrs["complete"] = True
        os.replace(_partial(self.final_path), self.final_path)
        import zarr

        self._group = zarr.open_group(str(self.final_path), mode="r")
        self.complete = True
        return self.final_path


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def open_tile_store(path: str | os.PathLike, metadata: Mapping[str, Any], grid: Any) -> TileStore:
    """The store for ``grid`` at ``path``: complete, resumed, or new; stale ones are deleted.

    ``metadata`` comes from :func:`store_metadata`. A complete store at ``path`` whose metadata
    matches is returned as is (``.complete``). Otherwise a matching ``<path>.partial`` is resumed,
    and anything else is removed and started afresh.
    """
    import zarr

    path = Path(path)
    want = dict(metadata)
    if path.exists():
        group = _open_existing(path)
        if group is not None and _matches(group, want) and group.attrs.get("complete"):
            return TileStore(path, group, complete=True)
        shutil.rmtree(path)
    partial = _partial(path)
    if partial.exists():
        group = _open_existing(partial)
        if group is not None and _matches(group, want):
            for stale in partial.rglob("*.partial"):  # zarr's temporary files of a write that was killed
                stale.unlink()
            return TileStore(path, zarr.open_group(str(partial), mode="r+"), complete=False)
        shutil.rmtree(partial)
    return TileStore(path, _create(partial, want, grid), complete=False)


@dataclass(frozen=True)
class StoredTiles:
    """What a complete store holds: predictions, each tile's cell and tissue fraction, metadata."""

    predictions: TilePredictions
    cols_rows: np.ndarray        # (N, 2) int32
    tissue_fraction: np.ndarray  # (N,) float32, of each tile's cell
    metadata: dict[str, Any]
    subcell_tissue_fraction: np.ndarray | None = None  # (N, k*k) float32; None without sub-cells


def read_tile_store(path: str | os.PathLike) -> StoredTiles:
    """The contents of a complete store."""
    import zarr

    group = zarr.open_group(str(path), mode="r")
    attrs = dict(group.attrs)
    sub = "subcell_probs" in group
    return StoredTiles(predictions=TilePredictions(np.asarray(group["probs"][:]), tuple(attrs["class_names"]),
                                                   np.asarray(group["subcell_probs"][:]) if sub else None),
                       cols_rows=np.asarray(group["cols_rows"][:]),
                       tissue_fraction=np.asarray(group["tissue_fraction"][:]),
                       metadata=attrs,
                       subcell_tissue_fraction=np.asarray(group["subcell_tissue_fraction"][:]) if sub else None)


def _open_existing(path: Path) -> Any:
    import zarr

    try:
        return zarr.open_group(str(path), mode="r")
    except Exception:  # not a zarr group (or a broken one): recompute
        return None


def _matches(group: Any, want: Mapping[str, Any]) -> bool:
    attrs = dict(group.attrs)
    return all(attrs.get(k) == v for k, v in want.items())


def _create(path: Path, metadata: Mapping[str, Any], grid: Any) -> Any:
    import zarr

    n, k, c = len(grid), int(grid.n_chunks), len(metadata["class_names"])
    rows = max(1, min(n, _ROWS_PER_ZARR_CHUNK))
    group = zarr.open_group(str(path), mode="w")
    group.create_array("cols_rows", data=np.ascontiguousarray(grid.cols_rows, np.int32), chunks=(rows, 2))
    group.create_array("origins_l0", data=np.ascontiguousarray(grid.origins_l0, np.float64), chunks=(rows, 2))
    group.create_array("tissue_fraction", data=np.ascontiguousarray(grid.tissue_fraction, np.float32),
                       chunks=(rows,))
    group.create_array("chunk_starts", data=np.ascontiguousarray(grid.chunk_starts, np.int64))
    group.create_array("probs", shape=(n, c), chunks=(rows, c), dtype="float32", fill_value=np.nan)
    if grid.subcell_fraction is not None:
        kk = grid.subcells ** 2
        sub_rows = max(1, min(n, _ROWS_PER_ZARR_CHUNK // kk))
        group.create_array("subcell_tissue_fraction", data=np.ascontiguousarray(grid.subcell_fraction.reshape(n, kk)),
                           chunks=(sub_rows, kk))
        group.create_array("subcell_probs", shape=(n, kk, c), chunks=(sub_rows, kk, c), dtype="float32",
                           fill_value=np.nan)
    group.create_array("chunk_done", shape=(k,), chunks=(max(1, k),), dtype="uint8", fill_value=0)
    group.attrs.update({**metadata, "complete": False})
    return group
