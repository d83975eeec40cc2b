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

Whatever left a store damaged (a crash of the disk or host, a copy cut short, a hand that deleted
or truncated a file), it is never trusted: every open reads and checks it whole (arrays present
with the grid's shapes, chunk files readable, the probabilities of every chunk flagged done finite
and summing to 1). A damaged store being resumed keeps its intact chunks and recomputes the others;
:func:`read_tile_store` raises :class:`TileStoreError`, one line naming the store.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import OutputError

__all__ = ["TilePredictions", "StoredTiles", "TileStore", "TileStoreError", "store_metadata", "open_tile_store",
           "read_tile_store"]

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

    def __init__(self, final_path: Path, contents: _Contents, complete: bool) -> None:
        self.final_path = final_path
        self._group = contents.group
        self.complete = complete
        self._starts = contents.starts  # this writer alone changes the store (it holds the slide
        self._done = contents.done      # folder's lock): starts, flags and probabilities are kept
        self._probs = contents.probs    # here, not re-read
        self._subcell_probs = contents.subcell_probs

    @property
    def metadata(self) -> dict[str, Any]:
        return dict(self._group.attrs)

    @property
    def done(self) -> np.ndarray:
        """(K,) bool: chunks whose probabilities are stored."""
        return self._done.copy()

    def chunk_probs(self, k: int) -> np.ndarray:
        return self._probs[int(self._starts[k]):int(self._starts[k + 1])].copy()

    def probs(self) -> np.ndarray:
        """(N, C) float32 of every tile (rows of chunks not done are NaN)."""
        return self._probs.copy()

    def subcell_probs(self) -> np.ndarray | None:
        """(N, k*k, C) float32 of every tile's sub-cells (NaN where not done); None without sub-cells."""
        return None if self._subcell_probs is None else self._subcell_probs.copy()

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
        rows = probs[start:stop].astype(np.float32, copy=False)
        self._group["probs"][start:stop] = rows
        self._probs[start:stop] = rows
        if subcell_probs is not None:
            sub_rows = subcell_probs[start:stop].astype(np.float32, copy=False)
            self._group["subcell_probs"][start:stop] = sub_rows
            self._subcell_probs[start:stop] = sub_rows
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
        if self.final_path.exists():  # a damaged store left there (open_tile_store removes it; never reused)
            shutil.rmtree(self.final_path)
        os.replace(_partial(self.final_path), self.final_path)
        import zarr

        self._group = zarr.open_group(str(self.final_path), mode="r")
        self.complete = True
        return self.final_path


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def open_tile_store(path: str | os.PathLike, metadata: Mapping[str, Any], grid: Any) -> TileStore:
    """The store for ``grid`` at ``path``: complete, resumed, or new; stale or damaged ones are replaced.

    ``metadata`` comes from :func:`store_metadata`. A complete, intact store at ``path`` whose
    metadata matches is returned as is (``.complete``; a ``<path>.partial`` left beside it is
    removed). Otherwise an intact matching ``<path>.partial`` is resumed. A store (final or partial)
    with matching metadata but damage (:func:`_inspect`: missing or unreadable arrays or chunk
    files, invalid probabilities, arrays not of the grid) is replaced by a new partial store holding
    its intact done chunks, so only the damaged ones are recomputed; anything else is removed and
    started afresh. The caller holds the slide folder's lock (:mod:`wsi_response.locks`).
    """
    path = Path(path)
    want = dict(metadata)
    partial = _partial(path)
    salvage: _Contents | None = None
    for candidate in (path, partial):
        if not candidate.exists():
            continue
        contents = _inspect(candidate, want, grid)
        if contents is not None and not contents.problems:
            if candidate == path and contents.complete:
                _remove(partial)
                return TileStore(path, contents, complete=True)
            if candidate == partial:
                for stale in partial.rglob("*.partial"):  # zarr's temporary files of a write that was killed
                    stale.unlink()
                return TileStore(path, _reopen(partial, contents), complete=False)
        if contents is not None and (salvage is None or contents.done.sum() > salvage.done.sum()):
            salvage = contents
        _remove(candidate)
    store = TileStore(path, _fresh(partial, want, grid), complete=False)
    if salvage is not None and salvage.done.any():
        store.write_chunks(np.flatnonzero(salvage.done), salvage.probs, salvage.subcell_probs)
    return store


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _reopen(path: Path, contents: _Contents) -> _Contents:
    import zarr

    return replace(contents, group=zarr.open_group(str(path), mode="r+"))


def _fresh(path: Path, metadata: Mapping[str, Any], grid: Any) -> _Contents:
    group = _create(path, metadata, grid)
    n, k, c = len(grid), int(grid.n_chunks), len(metadata["class_names"])
    sub = None if grid.subcell_fraction is None else np.full((n, grid.subcells ** 2, c), np.nan, np.float32)
    return _Contents(group, np.asarray(grid.chunk_starts, np.int64), np.full((n, c), np.nan, np.float32),
                     np.zeros(k, bool), complete=False, problems=[], subcell_probs=sub)


@dataclass(frozen=True)
class StoredTiles:
    """What a complete store holds: predictions, each tile's cell and tissue fraction, metadata."""

    predictions: TilePredictions
    cols_rows: np.ndarray        # (N, 2) int32
    tissue_fraction: np.ndarray  # (N,) float32, of each tile's cell
    metadata: dict[str, Any]
    subcell_tissue_fraction: np.ndarray | None = None  # (N, k*k) float32; None without sub-cells


def read_tile_store(path: str | os.PathLike) -> StoredTiles:
    """The contents of a complete store; :class:`TileStoreError` (one line naming the store) when it
    is missing, incomplete or damaged (:func:`_inspect`)."""
    path = Path(path)
    if not path.is_dir():
        raise TileStoreError(path, f"tile store is missing {_REDO}")
    contents = _inspect(path, None, None)
    problems = contents.problems if contents is not None else ["its metadata is unreadable or not of a tile store"]
    if not problems and not contents.complete:
        problems = [f"incomplete ({int(contents.done.sum())} of {len(contents.done)} chunks done)"]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise TileStoreError(path, f"tile store is damaged: {problems[0]}{more} {_REDO}")
    group = contents.group
    attrs = dict(group.attrs)
    return StoredTiles(predictions=TilePredictions(contents.probs, tuple(attrs["class_names"]), contents.subcell_probs),
                       cols_rows=np.asarray(group["cols_rows"][:]),
                       tissue_fraction=np.asarray(group["tissue_fraction"][:]),
                       metadata=attrs,
                       subcell_tissue_fraction=(np.asarray(group["subcell_tissue_fraction"][:])
                                                if contents.subcell_probs is not None else None))


class TileStoreError(OutputError):
    """A tile store is missing, incomplete or damaged."""


_REDO = "(the next run or batch redoes the slide)"


@dataclass(frozen=True)
class _Contents:
    """What :func:`_inspect` could read of a store: probabilities ``(N, C)`` (NaN where not done or
    unreadable), the chunks ``done`` whose probabilities are intact, and the ``problems`` found."""

    group: Any
    starts: np.ndarray   # (K+1,) int64
    probs: np.ndarray    # (N, C) float32
    done: np.ndarray     # (K,) bool
    complete: bool
    problems: list[str]
    subcell_probs: np.ndarray | None = None  # (N, k*k, C) float32 with sub-cells


def _inspect(path: Path, want: Mapping[str, Any] | None, grid: Any) -> _Contents | None:
    """Read and check a store; None when it is not one of ``want`` (other metadata) or has no
    readable metadata. ``want``/``grid`` None: checked against its own metadata (reading).

    Problems: an array missing, unreadable or of the wrong shape or dtype; grid arrays other than
    ``grid``'s; unreadable chunk files; a chunk flagged done whose probabilities are missing, not
    finite, outside [0, 1] or not summing to 1. A done chunk with a problem is no longer done.
    """
    import zarr

    try:
        group = zarr.open_group(str(path), mode="r")
        attrs = dict(group.attrs)
        n, k, c = int(attrs["n_tiles"]), int(attrs["n_chunks"]), len(attrs["class_names"])
    except Exception:  # no group, unreadable zarr.json, or not our metadata
        return None
    if attrs.get("format") != STORE_FORMAT or (want is not None and any(attrs.get(key) != v for key, v in want.items())):
        return None
    if grid is not None and (n, k) != (len(grid), int(grid.n_chunks)):
        return None
    problems: list[str] = []
    arrays = {}
    kk = int(attrs.get("subcells", 1)) ** 2 if attrs.get("refine") == "dense" else 0
    expected = [("cols_rows", (n, 2), "int32"), ("origins_l0", (n, 2), "float64"),
                ("tissue_fraction", (n,), "float32"), ("chunk_starts", (k + 1,), "int64"),
                ("probs", (n, c), "float32"), ("chunk_done", (k,), "uint8")]
    if kk:
        expected += [("subcell_tissue_fraction", (n, kk), "float32"), ("subcell_probs", (n, kk, c), "float32")]
    for name, shape, dtype in expected:
        try:
            array = group[name]
            found = (tuple(array.shape), str(array.dtype))
        except Exception as exc:
            problems.append(f"array {name} is missing or unreadable ({type(exc).__name__})")
            continue
        if found != (shape, dtype):
            problems.append(f"array {name} is {found[1]} {found[0]}, expected {dtype} {shape}")
            continue
        arrays[name] = array
    values = {}
    for name in ("cols_rows", "origins_l0", "tissue_fraction", "chunk_starts", "chunk_done", "subcell_tissue_fraction"):
        if name in arrays:
            try:
                values[name] = np.asarray(arrays[name][:])
            except Exception as exc:
                problems.append(f"array {name} has an unreadable chunk file ({type(exc).__name__})")
    if grid is not None:
        for name, expected in (("cols_rows", grid.cols_rows), ("origins_l0", grid.origins_l0),
                               ("tissue_fraction", grid.tissue_fraction), ("chunk_starts", grid.chunk_starts)):
            if name in values and not np.array_equal(values[name], expected):
                problems.append(f"array {name} is not that of the tile grid")
        if kk and "subcell_tissue_fraction" in values and not np.array_equal(
                values["subcell_tissue_fraction"], np.asarray(grid.subcell_fraction, np.float32).reshape(n, kk)):
            problems.append("array subcell_tissue_fraction is not that of the tile grid")
        starts = np.asarray(grid.chunk_starts, np.int64)
    elif "chunk_starts" in values and values["chunk_starts"][0] == 0 and values["chunk_starts"][-1] == n \
            and (np.diff(values["chunk_starts"]) >= 0).all():
        starts = values["chunk_starts"]
    else:
        starts = np.linspace(0, n, k + 1).astype(np.int64)  # only to report: nothing is done without chunk_starts
        values.pop("chunk_done", None)
        problems.append("array chunk_starts is not a partition of the tiles")
    probs = _read_rows(arrays, "probs", (n, c), problems)
    subcell_probs = _read_rows(arrays, "subcell_probs", (n, kk, c), problems) if kk else None
    done = values["chunk_done"].astype(bool) if "chunk_done" in values else np.zeros(k, bool)
    valid = _valid_rows(probs)
    if subcell_probs is not None:
        valid &= _valid_rows(subcell_probs.reshape(n * kk, c)).reshape(n, kk).all(axis=1)
    bad = [i for i in np.flatnonzero(done) if not valid[starts[i]:starts[i + 1]].all()]
    if bad:
        problems.append(f"{len(bad)} chunks flagged done have missing or invalid probabilities (first: chunk {bad[0]})")
        done[bad] = False
    complete = bool(attrs.get("complete")) and bool(done.all())
    return _Contents(group, starts, probs, done, complete, problems, subcell_probs)


def _read_rows(arrays: Mapping[str, Any], name: str, shape: tuple[int, ...], problems: list[str]) -> np.ndarray:
    """Array ``name`` read zarr chunk by zarr chunk (NaN where missing or unreadable; noted in ``problems``)."""
    values = np.full(shape, np.nan, np.float32)
    if name in arrays:
        step = max(1, int(arrays[name].chunks[0]))
        for row in range(0, shape[0], step):
            try:
                values[row:row + step] = arrays[name][row:row + step]
            except Exception as exc:
                problems.append(f"array {name} has an unreadable chunk file at row {row} ({type(exc).__name__})")
    return values


def _valid_rows(probs: np.ndarray) -> np.ndarray:
    """(N,) bool: rows that are probabilities (finite, in [0, 1], summing to 1 within 1e-3)."""
    finite = np.isfinite(probs).all(axis=1)
    with np.errstate(invalid="ignore"):
        return finite & ((probs >= 0) & (probs <= 1)).all(axis=1) & (np.abs(probs.sum(axis=1) - 1) <= 1e-3)


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
    group.attrs.update({"format": STORE_FORMAT, "n_tiles": n, "n_chunks": k, **metadata, "complete": False})
    return group
