"""The memory a slide's stages would take, from its dimensions and MPP alone, checked before any pixel is read.

Each stage works at its own µm/px. Where the slide's level-0 px are coarser than that, the stage
up-samples: a 512 x 512 px slide said to be 100 µm/px is 51 x 51 mm, and the focus measure at
``qc.focus_mpp`` 1 µm/px would read it as 51,200 x 51,200 px in a handful of chunks of many GB.
:func:`largest_arrays` estimates the largest single array of each stage with the whole slide
taken as tissue (the worst case), from the same tile grids the stages lay out;
:func:`check_memory` refuses a slide when one exceeds :data:`~wsi_response.slide.MAX_ARRAY_BYTES`,
and :func:`check_mpp_argument` refuses an ``--mpp`` / ``--force-mpp`` that would, before a run
computes or writes anything.

================  ===================================  ==========================================
stage             setting                              largest array
================  ===================================  ==========================================
tissue mask       ``tissue.mask_mpp`` (never finer     a float32 plane of the overview (the focus
                  than level 0)                        measure's planes, the artefact layers)
tile grid         ``tiling.target_mpp``                the float64 tissue fraction of every cell
focus measure     ``qc.focus_mpp``                     one chunk of cells as float32 grey
tiles             ``tiling.target_mpp``                one chunk of uint8 RGB tiles
model input       ``inference.batch_size``             one batch as float32 RGB
================  ===================================  ==========================================
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from . import slide as slide_module
from .config import Config
from .errors import ConfigError, SlideError, SlideFormatError
from .focus import focus_cells_config, focus_k
from .slide import Slide, check_mpp_value, open_slide
from .tiling import TileGrid, tile_grid
from .tissue import TissueMask

__all__ = ["StageArray", "largest_arrays", "memory_problem", "check_memory", "check_mpp_argument"]


class StageArray(NamedTuple):
    """The largest array of one stage: what it is, the setting it follows, its µm/px and size."""

    stage: str
    setting: str
    mpp: float        # µm/px the stage works at
    nbytes: int


def largest_arrays(slide: Slide, cfg: Config) -> list[StageArray]:
    """The largest single array of each stage of ``slide`` under ``cfg``, bytes (module docstring).

    Stops after the first stage over :data:`~wsi_response.slide.MAX_ARRAY_BYTES` whose later
    stages could not even be laid out in bounded memory.
    """
    w0, h0 = slide.dimensions_px
    mask_mpp = max(cfg.tissue.mask_mpp, slide.mpp)  # as read_overview: never finer than level 0
    overview_px = math.ceil(w0 * slide.mpp / mask_mpp) * math.ceil(h0 * slide.mpp / mask_mpp)
    target = cfg.tiling.target_mpp
    cells = math.ceil(w0 * slide.mpp / (cfg.tiling.stride_px * target)) * \
        math.ceil(h0 * slide.mpp / (cfg.tiling.stride_px * target))
    out = [StageArray("tissue mask", f"tissue.mask_mpp {cfg.tissue.mask_mpp:g} µm/px", mask_mpp, 4 * overview_px),
           StageArray("tile grid", f"tiling.target_mpp {target:g} µm/px", target, 8 * cells)]
    if max(a.nbytes for a in out) > slide_module.MAX_ARRAY_BYTES:
        return out
    whole = _whole_slide(slide)
    k = focus_k(mask_mpp, cfg.qc.focus_mpp)
    focus = tile_grid(slide, whole, focus_cells_config(mask_mpp, k))
    out.append(StageArray("focus measure", f"qc.focus_mpp {cfg.qc.focus_mpp:g} µm/px", mask_mpp / k,
                          4 * _chunk_tiles(focus) * focus.tile_px ** 2))
    tiles = tile_grid(slide, whole, cfg.tiling)
    tile_bytes = 3 * tiles.tile_px ** 2
    out.append(StageArray("tiles", f"tiling.target_mpp {target:g} µm/px", target, _chunk_tiles(tiles) * tile_bytes))
    out.append(StageArray("model input", f"inference.batch_size {cfg.inference.batch_size}", target,
                          4 * min(cfg.inference.batch_size, len(tiles)) * tile_bytes))
    return out


def _whole_slide(slide: Slide) -> TissueMask:
    """A one-px mask that covers the whole slide: every cell of a grid on it is tissue."""
    side = float(max(slide.dimensions_px))
    return TissueMask(mask=np.ones((1, 1), bool), downsample=side, mpp=slide.mpp * side)


def _chunk_tiles(grid: TileGrid) -> int:
    """Tiles in the largest chunk of ``grid`` (a chunk is read and held at once)."""
    return int(np.diff(grid.chunk_starts).max()) if len(grid) else 0


def memory_problem(slide: Slide, cfg: Config) -> str | None:
    """Why ``slide`` cannot be processed in bounded memory under ``cfg`` (one line), or None."""
    limit = slide_module.MAX_ARRAY_BYTES
    for array in largest_arrays(slide, cfg):
        if array.nbytes > limit:
            w0, h0 = slide.dimensions_px
            upsampled = (f", up-sampled {slide.mpp / array.mpp:.3g}x" if slide.mpp > array.mpp * 1.001 else "")
            return (f"the {array.stage} ({array.setting}) would need about {array.nbytes / 1e9:.1f} GB in one array "
                    f"(limit {limit / 1e9:.1f} GB, wsi_response.slide.MAX_ARRAY_BYTES) for this {w0} x {h0} px "
                    f"slide at {slide.mpp:g} µm/px ({slide.mpp_source}{upsampled}); check its MPP")
    return None


def check_memory(slide: Slide, cfg: Config) -> None:
    """Raise :class:`SlideFormatError` naming the stage when :func:`memory_problem` finds one."""
    problem = memory_problem(slide, cfg)
    if problem is not None:
        raise SlideFormatError(slide.path, problem)


def check_mpp_argument(paths: Sequence[str | Path], mpp: float | None, cfg: Config, *, force: bool = False) -> None:
    """Refuse a ``--mpp`` (``force``: ``--force-mpp``) value with a :class:`ConfigError` before anything
    is computed or any result touched: implausible, disagreeing with a slide's own MPP (unless
    forced), or making a slide it applies to need an array over the limit (:func:`memory_problem`).
    Slides that cannot be opened for other reasons are left to fail on their own."""
    if mpp is None:
        return
    check_mpp_value(mpp, force)
    for path in paths:
        try:
            slide = open_slide(path, mpp=mpp, force_mpp=force)  # ConfigError where it disagrees
        except SlideError:
            continue
        with slide:
            problem = memory_problem(slide, cfg) if slide.mpp_source == "override" else None
        if problem is not None:
            raise ConfigError(f"{path}: {'--force-mpp' if force else '--mpp'} {mpp:g}: {problem}")
