"""Batched tile classification of one slide: ``predict(slide, grid, classifier) -> TilePredictions``.

Reading: a torch ``DataLoader`` over an ``IterableDataset`` of grid chunks; each chunk is one
region read cut into tiles (``TileReader.read_chunk``), and each worker takes a contiguous range
of chunks. The main process re-batches tiles to ``batch_size``, runs the model (float32 on CPU;
bf16, or fp16 where bf16 is unsupported, autocast on CUDA with pinned memory and
channels_last) under ``torch.inference_mode``, and keeps only the ``(N, C)`` float32
probabilities, so memory stays flat as slides grow. With a ``store`` path, finished chunks are
written to the resumable zarr tile store (:mod:`wsi_response.store`) and skipped on a rerun.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .classifier import Classifier, tiles_to_numpy_probs, to_unit_float
from .errors import ConfigError, ModelError
from .slide import Slide
from .store import TilePredictions, open_tile_store, store_metadata
from .tiling import TileGrid, TileReader

__all__ = ["predict", "resolve_device"]

Progress = Callable[[int, int], None]  # (tiles done, tiles total)


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cuda"`` without a GPU is a ``ConfigError``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' requested but torch sees no CUDA GPU "
                          f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); use --device cpu")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device: {device!r} is not one of auto, cpu, cuda")
    return torch.device(device)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 on GPUs that support it, else fp16; None (float32) on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


class ChunkDataset(IterableDataset):
    """Yields ``(chunk k, tile indices (n,), uint8 tiles (n, h, w, 3))`` for the given chunks.

    Worker ``w`` of ``W`` takes the ``w``-th contiguous slice of the chunk list (the reader
    reopens its files in each worker process).
    """

    def __init__(self, reader: TileReader, chunks: list[int]) -> None:
        self.reader = reader
        self.chunks = chunks

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        chunks = self.chunks
        if info is not None:
            bounds = np.linspace(0, len(chunks), info.num_workers + 1).round().astype(int)
            chunks = chunks[bounds[info.id]:bounds[info.id + 1]]
        for k in chunks:
            indices, tiles = self.reader.read_chunk(k)
            yield k, torch.from_numpy(indices), torch.from_numpy(tiles)


def predict(slide: Slide, grid: TileGrid, classifier: Classifier, *, batch_size: int = 64, num_workers: int = 2,
            device: str = "auto", store: str | os.PathLike | None = None,
            progress: Progress | None = None) -> TilePredictions:
    """Class probabilities of every tile of ``grid`` (rows in grid order).

    ``store``: path of the slide's ``tiles.zarr``; chunks already in it (same model, slide and
    grid) are not recomputed. ``progress(done, total)`` is called after each finished chunk.
    """
    _check_grid(grid, classifier)
    dev = resolve_device(device)
    n_classes = len(classifier.class_names)
    probs = np.full((len(grid), n_classes), np.nan, np.float32)
    chunk_sizes = np.diff(grid.chunk_starts)
    tile_store = None
    todo = list(range(grid.n_chunks))
    if store is not None:
        meta = store_metadata(slide, grid, classifier.sha256 or "unsaved", classifier.class_names)
        tile_store = open_tile_store(Path(store), meta, grid)
        done = tile_store.done
        if done.any():
            stored = tile_store.probs()
            rows = np.repeat(done, chunk_sizes)
            probs[rows] = stored[rows]
        todo = [k for k in todo if not done[k]]
    total = len(grid)
    n_done = int(total - chunk_sizes[todo].sum()) if todo else total
    if progress is not None:
        progress(n_done, total)

    if todo:
        model = classifier.model.to(dev).eval()
        if dev.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        reader = TileReader(slide, grid)
        try:
            loader = DataLoader(ChunkDataset(reader, todo), batch_size=None, num_workers=min(num_workers, len(todo)),
                                pin_memory=dev.type == "cuda", prefetch_factor=4 if num_workers > 0 else None)
            remaining = {k: int(chunk_sizes[k]) for k in todo}
            for chunk_ids, indices, tiles in _rebatch(loader, batch_size):
                probs[indices.numpy()] = _forward(classifier, model, tiles, dev)
                for k, n in zip(*np.unique(chunk_ids, return_counts=True)):
                    remaining[int(k)] -= int(n)
                    if remaining[int(k)] == 0:
                        if tile_store is not None:
                            s, e = grid.chunk_starts[k], grid.chunk_starts[k + 1]
                            tile_store.write_chunk(int(k), probs[s:e])
                        n_done += int(chunk_sizes[k])
                        if progress is not None:
                            progress(n_done, total)
        finally:
            reader.close()
    if tile_store is not None:
        tile_store.finalize()
    return TilePredictions(probs=probs, class_names=tuple(classifier.class_names))


def _check_grid(grid: TileGrid, classifier: Classifier) -> None:
    problems = []
    if abs(grid.read_mpp - classifier.target_mpp) > 1e-6 * classifier.target_mpp:
        problems.append(f"grid read_mpp {grid.read_mpp:g} µm/px vs model target_mpp {classifier.target_mpp:g}")
    if grid.tile_px != classifier.tile_px:
        problems.append(f"grid tile_px {grid.tile_px} vs model tile_px {classifier.tile_px}")
    if problems:
        raise ModelError(classifier.path or classifier.arch, "does not fit the tile grid: " + "; ".join(problems))


def _rebatch(loader: DataLoader, batch_size: int) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
    """Chunks in, batches of exactly ``batch_size`` tiles out (the last may be smaller).

    Yields ``(chunk id per tile (n,), tile indices (n,), uint8 tiles (n, h, w, 3))``.
    """
    ids: list[np.ndarray] = []
    idx: list[torch.Tensor] = []
    tiles: list[torch.Tensor] = []
    buffered = 0
    for k, indices, chunk_tiles in loader:
        ids.append(np.full(len(indices), int(k), np.int64))
        idx.append(indices)
        tiles.append(chunk_tiles)
        buffered += len(indices)
        while buffered >= batch_size:
            all_ids, all_idx, all_tiles = np.concatenate(ids), torch.cat(idx), torch.cat(tiles)
            yield all_ids[:batch_size], all_idx[:batch_size], all_tiles[:batch_size]
            ids, idx, tiles = [all_ids[batch_size:]], [all_idx[batch_size:]], [all_tiles[batch_size:]]
            buffered -= batch_size
    if buffered:
        yield np.concatenate(ids), torch.cat(idx), torch.cat(tiles)


def _forward(classifier: Classifier, model: torch.nn.Module, tiles: torch.Tensor, dev: torch.device) -> np.ndarray:
    """Softmax probabilities ``(n, C)`` float32 of uint8 tiles ``(n, h, w, 3)``."""
    amp = autocast_dtype(dev)
    with torch.inference_mode():
        x = classifier.normalise(to_unit_float(tiles.to(dev, non_blocking=True)))
        if dev.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=dev.type, dtype=amp, enabled=amp is not None):
            logits = model(x)
    return tiles_to_numpy_probs(logits)
