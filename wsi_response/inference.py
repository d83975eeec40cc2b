"""Batched tile classification of one slide: ``predict(slide, grid, classifier) -> TilePredictions``.

Reading: a torch ``DataLoader`` over an ``IterableDataset`` of grid chunks; each worker process
takes a contiguous range of chunks. Where the JPEG tiles are decoded is ``decode``:

- ``"workers"``: each worker reads a chunk's region, decodes it and cuts it into tiles
  (``TileReader.read_chunk``); the uint8 tiles come back through pinned memory and are copied to
  the device asynchronously.
- ``"device"``: the workers only fetch each chunk's compressed JPEG tiles
  (``JpegTileReader.level_streams``); the main process decodes a batch of them on the inference
  device (``torchvision.io.decode_jpeg``: nvJPEG on CUDA, libjpeg on CPU), assembles each chunk's
  region there and cuts (and, off the level's resolution, resamples) the tiles there
  (:class:`DeviceDecoder`). All decoding is on the device, none shared with the workers: the
  workers' share would need a balance that depends on the GPU, the model and the CPU count, while
  all-device decoding keeps one path whose cost is measured (``benchmarks/bench_gpu.py``). It
  serves tiled-JPEG levels whose device-decoded probe tiles match the reader's own (OpenSlide or
  its verified fast path) within ``TileReader.MAX_PROBE_MAD``; anything else falls back to
  ``"workers"`` with a one-line warning. A group of streams the device rejects is read by the
  reader instead, which raises ``SlideReadError`` naming a corrupt tile; data that libjpeg and
  nvJPEG decode with a warning only (the workers' strict decoder refuses it) goes through.

The main process re-batches tiles on the device to ``batch_size`` and runs :class:`ModelRunner`:
normalisation on the device, channels_last, autocast on CUDA (bf16 / fp16; CPU stays float32),
optionally ``torch.compile`` (CUDA), under ``torch.inference_mode``; each batch's ``(N, C)``
float32 probabilities are copied to pinned host memory asynchronously and read one batch later,
so the GPU is never idle while the host fetches the next batch. A batch whose probabilities are
not all finite fails the slide (``ModelError``): it is never stored or counted. Memory stays flat
as slides grow. With a ``store`` path, finished chunks are written to the resumable zarr tile store
(:mod:`wsi_response.store`) and skipped on a rerun: the first at once, then together every
``STORE_EVERY_S`` seconds, at the end and when reading or the model fails (a write per chunk,
about 10 ms, would cap a GPU run at a few thousand tiles/s), so a killed run loses at most about
two seconds of work.

Sub-cells (a grid with ``subcell_fraction``, ``tiling.refine: dense``): the same forward pass
also classifies each of a tile's k × k sub-cells (:class:`SubcellHead`): the backbone's feature map
is smoothed over 3 × 3 positions (one position is 32 px on a stride-32 CNN; the smoothing gives
each sub-cell about 96 px of context), averaged over the part under each sub-cell
(:func:`~wsi_response.tiling.subcell_pool_weights`) and fed to the model's own head, exactly as
the whole tile's pooled features are. Timm CNNs only (``forward_features`` giving ``(n, C, h, w)``).

Several GPUs: one process per GPU, each pinned through ``CUDA_VISIBLE_DEVICES``, is
:mod:`wsi_response.batch` (``--gpus all``); ``device="cuda:N"`` picks a GPU in one process.
"""
from __future__ import annotations

import contextlib
import os
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .children import as_child
from .classifier import Classifier, to_unit_float
from .config import TissueConfig
from .errors import ConfigError, ModelError, WsiResponseError
from .jpegtiles import JpegTileReader, open_jpeg_tile_reader
from .slide import Level, Slide
from .store import TilePredictions, open_tile_store, store_metadata
from .tiling import TileGrid, TileReader, subcell_pool_weights

__all__ = ["AUTOCAST_DTYPES", "DECODE_CHOICES", "predict", "resolve_device", "autocast_dtype", "ModelRunner",
           "SubcellHead", "DeviceDecoder", "DeviceDecodeUnavailable", "tile_chunks"]

Progress = Callable[[int, int], None]  # (tiles done, tiles total)
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
DECODE_CHOICES = ("workers", "device")
STORE_EVERY_S = 2.0  # finished chunks go to the tile store together about this often (and at the end), s
# (chunk k, tile indices (n,), payload): uint8 tiles (n, h, w, 3), or the chunk's compressed JPEG
# tiles as (concatenated streams uint8 (bytes,), stream lengths (m,), tile positions (m, 2))
ChunkItem = tuple[int, np.ndarray, "torch.Tensor | tuple[torch.Tensor, np.ndarray, np.ndarray]"]


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cuda"`` / ``"cuda:N"`` must name a visible GPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
        raise ConfigError(f"device: {device!r} is not one of auto, cpu, cuda, cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {device!r} requested but torch sees no CUDA GPU "
                          f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); use --device cpu")
    if index and int(index) >= torch.cuda.device_count():
        raise ConfigError(f"device: {device!r}: torch sees {torch.cuda.device_count()} GPU(s) "
                          f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    return torch.device(device)


def autocast_dtype(device: torch.device, autocast: str = "bf16") -> torch.dtype | None:
    """The CUDA autocast dtype of ``autocast`` (bf16 | fp16 | fp32); None (float32) on CPU.

    bf16 on a GPU without bf16 support runs fp16.
    """
    if autocast not in AUTOCAST_DTYPES:
        raise ConfigError(f"inference.autocast: {autocast!r} is not one of {', '.join(AUTOCAST_DTYPES)}")
    dtype = AUTOCAST_DTYPES[autocast]
    if device.type != "cuda" or dtype is None:
        return None
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        return torch.float16
    return dtype


class SubcellHead(torch.nn.Module):
    """A timm CNN returning logits ``(n, 1 + k*k, C)``: the tile's (``model(x)``), then its sub-cells'
    (the head on the 3 × 3-smoothed feature map averaged under each sub-cell; module docstring)."""

    def __init__(self, classifier: Classifier, grid: TileGrid, device: torch.device) -> None:
        super().__init__()
        self.model = classifier.model
        with torch.inference_mode():
            probe = self.model.forward_features(torch.zeros(1, 3, grid.tile_px, grid.tile_px, device=device))
        if probe.ndim != 4:
            raise ModelError(classifier.path or classifier.arch, f"tiling.refine=dense needs a CNN feature map "
                             f"(n, C, h, w); {classifier.arch} gives shape {tuple(probe.shape)}; use tiling.refine=none")
        self.register_buffer("weights_y", torch.from_numpy(subcell_pool_weights(grid, probe.shape[2])).to(device))
        self.register_buffer("weights_x", torch.from_numpy(subcell_pool_weights(grid, probe.shape[3])).to(device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.model.forward_features(x)
        tile = self.model.forward_head(features)
        smooth = torch.nn.functional.avg_pool2d(features, 3, 1, 1, count_include_pad=False)
        n, c = features.shape[:2]
        under = torch.einsum("nchw,ih,jw->nijc", smooth, self.weights_y.to(smooth.dtype),
                             self.weights_x.to(smooth.dtype)).reshape(-1, c, 1, 1)
        sub = self.model.forward_head(under).reshape(n, -1, tile.shape[1])
        return torch.cat([tile[:, None], sub], dim=1)


class ModelRunner:
    """The classifier's forward pass on one device: uint8 tiles ``(n, h, w, 3)`` in, ``(n, C)`` probabilities out.

    ``subcells_of``: a grid with sub-cells; the probabilities are then ``(n, 1 + k*k, C)``, the
    tile's and its sub-cells' (:class:`SubcellHead`).

    ``autocast`` (bf16 | fp16 | fp32) and ``compile`` (``torch.compile``, default mode) apply on
    CUDA only; CPU runs float32 eager. A compiled model sees every batch padded to
    ``batch_size`` tiles (one graph); if compiling or running it fails, one warning and eager from
    then on. :meth:`launch` queues a batch and returns a function that waits for its result.
    ``busy_s``: seconds the host spent launching batches and waiting for their results (on the
    CPU: the forward passes), so a run can report its share outside the model.
    """

    def __init__(self, classifier: Classifier, device: torch.device, *, autocast: str = "bf16",
                 compile: bool = False, batch_size: int = 64, subcells_of: TileGrid | None = None) -> None:
        self.classifier = classifier
        self.device = device
        self.amp = autocast_dtype(device, autocast)
        self.model = classifier.model.to(device).eval()
        if subcells_of is not None and subcells_of.subcell_fraction is not None:
            self.model = SubcellHead(classifier, subcells_of, device).eval()
        self.batch_size = batch_size
        self.compiled: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.busy_s = 0.0
        if device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
            if compile:  # re-wrapping the same module reuses dynamo's compiled graph (no recompile per slide)
                self.compiled = torch.compile(self.model, dynamic=False)

    def launch(self, tiles: torch.Tensor) -> Callable[[], np.ndarray]:
        """Queue the forward pass of uint8 ``tiles`` (on the device); the returned call gives float32
        ``(n, C)`` (with sub-cells ``(n, 1 + k*k, C)``)."""
        start = time.perf_counter()
        wait = self._launch(tiles)
        self.busy_s += time.perf_counter() - start

        def result() -> np.ndarray:
            start = time.perf_counter()
            probs = wait()
            self.busy_s += time.perf_counter() - start
            return probs
        return result

    def _launch(self, tiles: torch.Tensor) -> Callable[[], np.ndarray]:
        n = len(tiles)
        with torch.inference_mode():
            x = self.classifier.normalise(to_unit_float(tiles))
            if self.device.type != "cuda":
                probs = self.classifier.probabilities(self.model(x))  # calibrated: softmax(logits / T)
                return lambda: probs.numpy()
            x = x.contiguous(memory_format=torch.channels_last)
            if self.compiled is not None and n < self.batch_size:
                x = torch.cat([x, x.new_zeros((self.batch_size - n, *x.shape[1:]))])
            with torch.autocast(device_type="cuda", dtype=self.amp, enabled=self.amp is not None):
                logits = self._forward(x)[:n]
            probs = self.classifier.probabilities(logits.float())
            host = torch.empty(probs.shape, dtype=torch.float32, pin_memory=True)
            host.copy_(probs, non_blocking=True)
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
        return lambda: (done.synchronize(), host.numpy())[1]

    def __call__(self, tiles: torch.Tensor) -> np.ndarray:
        """Probabilities float32 ``(n, C)`` of uint8 ``tiles`` ``(n, h, w, 3)`` on the device (waits)."""
        return self.launch(tiles)()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compiled is not None:
            try:
                return self.compiled(x)
            except Exception as exc:  # inductor/triton missing or failing: eager is always possible
                first = (str(exc).strip().splitlines() or [""])[0][:200]
                warnings.warn(f"inference.compile: torch.compile failed ({type(exc).__name__}: {first}); "
                              "running eager", RuntimeWarning, stacklevel=3)
                self.compiled = None
        return self.model(x)


class DeviceDecodeUnavailable(Exception):
    """Device decoding does not serve this slide (the reason is the message)."""


class _StreamReader:
    """Worker side of device decoding: each chunk's compressed JPEG tiles, not decoded.

    Picklable; a worker process (spawned or forked) opens the file itself before its first read.
    """

    def __init__(self, path: Path, levels: tuple[Level, ...], grid: TileGrid) -> None:
        self.path, self.levels, self.grid = path, levels, grid
        self.origins = grid.level_origins()  # (N, 2) int64 top-left of each tile, read-level px
        self._jpeg: JpegTileReader | None = None
        self._pid = -1

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_jpeg": None, "_pid": -1}

    def read_chunk(self, k: int) -> tuple[np.ndarray, tuple[torch.Tensor, np.ndarray, np.ndarray]]:
        """Tile indices of chunk ``k`` and its region's tiles as (streams, lengths, positions)."""
        start, stop = int(self.grid.chunk_starts[k]), int(self.grid.chunk_starts[k + 1])
        return np.arange(start, stop), self.streams(self.origins[start:stop])

    def streams(self, origins: np.ndarray) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """The stored tiles under tiles at ``origins`` ``(n, 2)`` (read-level px): concatenated
        streams (uint8), stream lengths (bytes) and tile top-left positions ``(m, 2)`` (read-level px)."""
        if self._pid != os.getpid():
            self._jpeg = open_jpeg_tile_reader(self.path, self.levels)
            self._pid = os.getpid()
        assert self._jpeg is not None  # the main process checked that the level is tiled JPEG
        size = self.grid.level_tile_px
        x0, y0 = origins.min(axis=0)
        x1, y1 = origins.max(axis=0) + size
        streams, positions = self._jpeg.level_streams(self.grid.read_level, (int(x0), int(y0)),
                                                      (int(x1 - x0), int(y1 - y0)))
        data = torch.frombuffer(bytearray(b"".join(streams)), dtype=torch.uint8)
        return data, np.array([len(s) for s in streams], np.int64), positions

    def close(self) -> None:
        if self._jpeg is not None:
            self._jpeg.close()
        self._jpeg, self._pid = None, -1


class DeviceDecoder:
    """Main-process side of device decoding: compressed tiles -> RGB uint8 tiles on ``device``.

    ``source`` (picklable) fetches each chunk's compressed tiles in the workers; :meth:`decode`
    decodes many chunks in one batched ``decode_jpeg`` call, lays each chunk's stored tiles out
    as its region (white outside the level, like ``read_clipped``), gathers the grid tiles from it
    and resamples them (with the filters of ``tiling.resample_tile``) when the level is
    not at the grid's resolution. Use :meth:`open`, which checks the slide first.
    """

    def __init__(self, slide: Slide, grid: TileGrid, device: torch.device) -> None:
        self.grid = grid
        self.device = device
        self.source = _StreamReader(slide.path, slide.levels, grid)
        self.level_dims = slide.levels[grid.read_level].dimensions_px
        jpeg = open_jpeg_tile_reader(slide.path, slide.levels)
        if jpeg is None or not jpeg.supports(grid.read_level):
            if jpeg is not None:
                jpeg.close()
            raise DeviceDecodeUnavailable(f"pyramid level {grid.read_level} is not tiled 8-bit RGB JPEG")
        self.tile_wh = jpeg.tile_size_px(grid.read_level)
        jpeg.close()
        self.probe_mad: float | None = None

    @classmethod
    def open(cls, slide: Slide, grid: TileGrid, reader: TileReader, device: torch.device) -> DeviceDecoder:
        """A decoder for ``grid`` whose probe tiles match ``reader``'s; else ``DeviceDecodeUnavailable``.

        The probe tiles are those ``TileReader`` itself checks against the slide's backend; the
        reference is what ``reader`` reads (OpenSlide, or its fast path verified against it).
        """
        decoder = cls(slide, grid, device)
        probe = np.linspace(0, len(grid) - 1, min(TileReader.PROBE_TILES, len(grid))).astype(int)
        origins = decoder.source.origins
        try:
            ours = torch.cat(decoder.decode([(origins[[i]], decoder.source.streams(origins[[i]])) for i in probe]))
        except Exception as exc:  # no nvJPEG, a stream it cannot read, ...
            raise DeviceDecodeUnavailable(f"decode_jpeg on {device} failed ({type(exc).__name__}: "
                                          f"{(str(exc).strip().splitlines() or [''])[0][:200]})") from None
        finally:
            decoder.source.close()
        reference = reader.read_tiles(probe)
        decoder.probe_mad = float(np.abs(ours.cpu().numpy().astype(np.int16) - reference).mean())
        if decoder.probe_mad > TileReader.MAX_PROBE_MAD:
            raise DeviceDecodeUnavailable(f"probe tiles differ from {reader.backend.split(' (')[0]} by "
                                          f"{decoder.probe_mad:.2f} grey levels on average "
                                          f"(> {TileReader.MAX_PROBE_MAD:g})")
        return decoder

    def decode(self, items: list[tuple[np.ndarray, tuple[torch.Tensor, np.ndarray, np.ndarray]]]
               ) -> list[torch.Tensor]:
        """Tiles uint8 ``(n, tile_px, tile_px, 3)`` on the device for each ``(origins (n, 2), streams)`` item.

        ``origins``: top-left of each grid tile in read-level px; ``streams``: what
        ``source`` returned for them.
        """
        from torchvision.io import ImageReadMode, decode_jpeg

        streams = [s for _, (data, lengths, _) in items for s in torch.split(data, lengths.tolist())]
        with warnings.catch_warnings():  # torchvision >= 0.29 deprecates its codecs for TorchCodec (not a dependency)
            warnings.filterwarnings("ignore", "The image decoding and encoding capabilities of TorchVision",
                                    DeprecationWarning)
            images = decode_jpeg(streams, mode=ImageReadMode.RGB, device=self.device) if streams else []
        out, used = [], 0
        for origins, (_, lengths, positions) in items:
            out.append(self._cut(origins, images[used:used + len(lengths)], positions))
            used += len(lengths)
        return out

    def _cut(self, origins: np.ndarray, images: list[torch.Tensor], positions: np.ndarray) -> torch.Tensor:
        """Grid tiles at ``origins`` from decoded stored tiles ``(3, th, tw)`` at ``positions`` (read-level px).

        As ``TileReader.read_chunk``: the region under all tiles (white outside the level), then
        the tiles cut from it.
        """
        dev, size = self.device, self.grid.level_tile_px
        tw, th = self.tile_wh
        lw, lh = self.level_dims
        x0, y0 = (int(v) for v in origins.min(axis=0))
        x1, y1 = (int(v) for v in origins.max(axis=0) + size)
        region = torch.full((y1 - y0, x1 - x0, 3), 255, dtype=torch.uint8, device=dev)
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, lw), min(y1, lh)  # the region inside the level
        if images:  # stored tiles -> the span of whole tiles over (cx0, cy0, cx1, cy1) -> the region
            tx0, ty0 = cx0 // tw, cy0 // th
            nx, ny = (cx1 - 1) // tw - tx0 + 1, (cy1 - 1) // th - ty0 + 1
            span = torch.full((ny, nx, th, tw, 3), 255, dtype=torch.uint8, device=dev)
            rows = torch.as_tensor(positions[:, 1] // th - ty0, device=dev)
            cols = torch.as_tensor(positions[:, 0] // tw - tx0, device=dev)
            span[rows, cols] = torch.stack(images).permute(0, 2, 3, 1)  # tiles stored empty stay white
            span = span.permute(0, 2, 1, 3, 4).reshape(ny * th, nx * tw, 3)
            region[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0] = span[cy0 - ty0 * th:cy1 - ty0 * th,
                                                                cx0 - tx0 * tw:cx1 - tx0 * tw]
        steps = torch.arange(size, device=dev)
        rel = torch.as_tensor(origins - (x0, y0), device=dev)
        tiles = region[(rel[:, 1, None] + steps)[:, :, None], (rel[:, 0, None] + steps)[:, None, :]]  # one gather
        n = self.grid.tile_px
        if size == n:
            return tiles
        pixels = tiles.permute(0, 3, 1, 2).float()
        if size > n and size % n == 0:  # the filters of tiling.resample_tile
            resized = torch.nn.functional.interpolate(pixels, size=(n, n), mode="area")
        else:
            resized = torch.nn.functional.interpolate(pixels, size=(n, n), mode="bilinear", align_corners=False,
                                                      antialias=True)
        return resized.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


class ChunkDataset(IterableDataset):
    """Yields ``(chunk k, tile indices (n,), payload)`` for the given chunks (see ``ChunkItem``).

    ``reader`` is a ``TileReader`` (decoded tiles) or a device decoder's ``source`` (compressed
    tiles). Worker ``w`` of ``W`` takes the ``w``-th contiguous slice of the chunk list (the
    reader reopens its files in each worker process).
    """

    def __init__(self, reader: TileReader | _StreamReader, chunks: list[int]) -> None:
        self.reader = reader
        self.chunks = chunks

    def __iter__(self) -> Iterator[ChunkItem]:
        info = get_worker_info()
        chunks = self.chunks
        if info is not None:
            bounds = np.linspace(0, len(chunks), info.num_workers + 1).round().astype(int)
            chunks = chunks[bounds[info.id]:bounds[info.id + 1]]
        for k in chunks:
            try:
                indices, payload = self.reader.read_chunk(k)
            except WsiResponseError as exc:  # sent to the main process as it is (torch would flatten it)
                yield k, None, exc
                return
            yield k, indices, torch.from_numpy(payload) if isinstance(payload, np.ndarray) else payload


def _raising(items: Iterable[ChunkItem]) -> Iterator[ChunkItem]:
    """The loader's items; a worker's error is raised here, in the main process, as it was raised."""
    for item in items:
        if isinstance(item[2], WsiResponseError):
            raise item[2]
        yield item


def tile_chunks(reader: TileReader, chunks: list[int], device: torch.device, *, num_workers: int = 2,
                decoder: DeviceDecoder | None = None, group_tiles: int = 512
                ) -> Iterator[tuple[int, np.ndarray, torch.Tensor]]:
    """``(chunk k, tile indices (n,), uint8 tiles (n, h, w, 3) on device)`` for ``chunks``.

    Without ``decoder`` the workers decode; with it the device decodes, ``group_tiles`` stored
    tiles or more per ``decode_jpeg`` call; a group it cannot decode is read by ``reader`` in this
    process, which decodes what is readable and raises ``SlideReadError`` naming a corrupt tile.
    """
    on_cuda = device.type == "cuda"
    loader = DataLoader(ChunkDataset(reader if decoder is None else decoder.source, chunks), batch_size=None,
                        num_workers=min(num_workers, len(chunks)), pin_memory=on_cuda and decoder is None,
                        prefetch_factor=4 if num_workers > 0 else None, collate_fn=_as_is,
                        worker_init_fn=as_child)  # workers end on SIGTERM whatever this process ignores
    if decoder is None:
        for k, indices, tiles in _raising(loader):
            yield k, indices, tiles.to(device, non_blocking=True)
        return
    group: list[ChunkItem] = []
    try:
        for item in _then_end(_raising(loader)):
            if item is not None:
                group.append(item)
            if group and (item is None or sum(len(p[1]) for _, _, p in group) >= group_tiles):
                try:
                    decoded = decoder.decode([(decoder.source.origins[indices], payload)
                                              for _, indices, payload in group])
                except Exception:  # a stream the device rejects: the reader decodes it (and names a corrupt tile)
                    decoded = [torch.from_numpy(reader.read_chunk(k)[1]).to(device) for k, _, _ in group]
                yield from ((k, indices, tiles) for (k, indices, _), tiles in zip(group, decoded))
                group = []
    finally:
        decoder.source.close()  # opened here when num_workers is 0


def _as_is(item: ChunkItem) -> ChunkItem:
    """The loader's per-item conversion: none (tile indices and stream lengths stay numpy)."""
    return item


def _then_end(items: Iterable) -> Iterator:
    """``items``, then None."""
    yield from items
    yield None


def predict(slide: Slide, grid: TileGrid, classifier: Classifier, *, batch_size: int = 64, num_workers: int = 2,
            device: str = "auto", autocast: str = "bf16", compile: bool = False, decode: str = "workers",
            store: str | os.PathLike | None = None, store_every_s: float = STORE_EVERY_S,
            progress: Progress | None = None, timings: dict[str, float] | None = None) -> TilePredictions:
    """Class probabilities of every tile of ``grid`` (rows in grid order).

    ``autocast`` (bf16 | fp16 | fp32) and ``compile`` apply on CUDA; ``decode`` (workers | device)
    says where JPEG tiles are decoded (module docstring). ``store``: path of the slide's
    ``tiles.zarr``; chunks already in it (same model, slide and grid) are not recomputed; finished
    chunks are written to it the first at once, then together every ``store_every_s`` seconds, at
    the end, and when reading or the model fails.
    With sub-cells in ``grid`` (``tiling.refine: dense``) the predictions also hold each tile's
    sub-cell probabilities, from the same forward pass (:class:`SubcellHead`).
    ``progress(done, total)`` is called after each finished chunk. ``timings`` gets ``model_s``,
    the seconds spent in the model (:attr:`ModelRunner.busy_s`; 0 when every chunk was stored).
    A model that reads stain-normalised tiles is given the slide's stain estimated from ``grid``
    as a run does (:func:`~wsi_response.stain.grid_stain`, glass from the default overview) unless
    :meth:`Classifier.for_slide` already gave it one.
    """
    _check_grid(grid, classifier)
    if classifier.stain_normalisation and classifier.slide_stain is None:
        from .stain import grid_stain
        from .tissue import read_overview

        classifier = classifier.for_slide(grid_stain(slide, grid, read_overview(slide, TissueConfig().mask_mpp).glass))
    if decode not in DECODE_CHOICES:
        raise ConfigError(f"inference.decode: {decode!r} is not one of {', '.join(DECODE_CHOICES)}")
    dev = resolve_device(device)
    n_classes = len(classifier.class_names)
    probs = np.full((len(grid), n_classes), np.nan, np.float32)
    sub = (None if grid.subcell_fraction is None else
           np.full((len(grid), grid.subcells ** 2, n_classes), np.nan, np.float32))
    chunk_sizes = np.diff(grid.chunk_starts)
    tile_store = None
    todo = list(range(grid.n_chunks))
    if store is not None:
        meta = store_metadata(slide, grid, classifier.sha256 or "unsaved", classifier.class_names)
        tile_store = open_tile_store(Path(store), meta, grid)
        done = tile_store.done
        if done.any():
            stored, stored_sub = tile_store.probs(), tile_store.subcell_probs()
            rows = np.repeat(done, chunk_sizes)
            probs[rows] = stored[rows]
            if sub is not None:
                sub[rows] = stored_sub[rows]
        todo = [k for k in todo if not done[k]]
    total = len(grid)
    n_done = int(total - chunk_sizes[todo].sum()) if todo else total
    if progress is not None:
        progress(n_done, total)

    if todo:
        runner = ModelRunner(classifier, dev, autocast=autocast, compile=compile, batch_size=batch_size,
                             subcells_of=grid)
        reader = TileReader(slide, grid)
        remaining = {k: int(chunk_sizes[k]) for k in todo}

        unsaved: list[int] = []  # finished chunks not yet in the store
        last_save = -np.inf  # the first finished chunk is stored at once

        def save() -> None:
            nonlocal last_save
            if tile_store is not None:
                tile_store.write_chunks(unsaved, probs, sub)
            unsaved.clear()
            last_save = time.monotonic()

        def finish(chunk_ids: np.ndarray, indices: np.ndarray, result: Callable[[], np.ndarray]) -> None:
            nonlocal n_done
            out = _finite(result(), classifier, slide)
            if sub is None:
                probs[indices] = out
            else:
                probs[indices], sub[indices] = out[:, 0], out[:, 1:]
            finished = []
            for k, n in zip(*np.unique(chunk_ids, return_counts=True)):
                remaining[int(k)] -= int(n)
                if remaining[int(k)] == 0:
                    finished.append(int(k))
            unsaved.extend(finished)
            if unsaved and time.monotonic() - last_save >= store_every_s:
                save()
            for k in finished:
                n_done += int(chunk_sizes[k])
                if progress is not None:
                    progress(n_done, total)

        try:
            with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
                decoder = _device_decoder(slide, grid, reader, dev) if decode == "device" else None
                chunks = tile_chunks(reader, todo, dev, num_workers=num_workers, decoder=decoder,
                                     group_tiles=batch_size)
                pending = None
                for chunk_ids, indices, tiles in _rebatch(chunks, batch_size):
                    result = runner.launch(tiles)  # queued before the previous batch is read back
                    if pending is not None:
                        finish(*pending)
                    pending = (chunk_ids, indices, result)
                if pending is not None:
                    finish(*pending)
        finally:
            save()  # what finished is kept, also when reading or the model failed
            reader.close()
            if timings is not None:
                timings["model_s"] = runner.busy_s
    if tile_store is not None:
        tile_store.finalize()
    return TilePredictions(probs=probs, class_names=tuple(classifier.class_names), subcell_probs=sub)


def _device_decoder(slide: Slide, grid: TileGrid, reader: TileReader, dev: torch.device) -> DeviceDecoder | None:
    """``DeviceDecoder.open``, or None after a one-line warning saying why the workers decode instead."""
    try:
        return DeviceDecoder.open(slide, grid, reader, dev)
    except DeviceDecodeUnavailable as exc:
        warnings.warn(f"inference.decode=device: {slide.path.name}: {exc}; decoding in the workers instead",
                      RuntimeWarning, stacklevel=3)
        return None


def _finite(batch: np.ndarray, classifier: Classifier, slide: Slide) -> np.ndarray:
    """``batch`` of probabilities ``(n, C)`` (or ``(n, 1 + k*k, C)`` with sub-cells), or a
    ``ModelError`` when any is NaN or inf."""
    finite = np.isfinite(batch.reshape(len(batch), -1)).all(axis=1)
    if not finite.all():
        raise ModelError(classifier.path or classifier.arch,
                         f"gave class probabilities that are not numbers (NaN or inf) for {int((~finite).sum())} "
                         f"of {len(batch)} tiles of a batch of {slide.path}; the slide gets no result")
    return batch


def _check_grid(grid: TileGrid, classifier: Classifier) -> None:
    problems = []
    if abs(grid.read_mpp - classifier.target_mpp) > 1e-6 * classifier.target_mpp:
        problems.append(f"grid read_mpp {grid.read_mpp:g} µm/px vs model target_mpp {classifier.target_mpp:g}")
    if grid.tile_px != classifier.tile_px:
        problems.append(f"grid tile_px {grid.tile_px} vs model tile_px {classifier.tile_px}")
    if problems:
        raise ModelError(classifier.path or classifier.arch, "does not fit the tile grid: " + "; ".join(problems))


def _rebatch(chunks: Iterable[tuple[int, np.ndarray, torch.Tensor]], batch_size: int
             ) -> Iterator[tuple[np.ndarray, np.ndarray, torch.Tensor]]:
    """Chunks in, batches of exactly ``batch_size`` tiles out (the last may be smaller), on the chunks' device.

    Yields ``(chunk id per tile (n,), tile indices (n,), uint8 tiles (n, h, w, 3))``.
    """
    ids: list[np.ndarray] = []
    idx: list[np.ndarray] = []
    tiles: list[torch.Tensor] = []
    buffered = 0
    for k, indices, chunk_tiles in chunks:
        ids.append(np.full(len(indices), int(k), np.int64))
        idx.append(np.asarray(indices))
        tiles.append(chunk_tiles)
        buffered += len(indices)
        while buffered >= batch_size:
            all_ids, all_idx, all_tiles = np.concatenate(ids), np.concatenate(idx), torch.cat(tiles)
            yield all_ids[:batch_size], all_idx[:batch_size], all_tiles[:batch_size]
            ids, idx, tiles = [all_ids[batch_size:]], [all_idx[batch_size:]], [all_tiles[batch_size:]]
            buffered -= batch_size
    if buffered:
        yield np.concatenate(ids), np.concatenate(idx), torch.cat(tiles)
