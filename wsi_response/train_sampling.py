"""Which tiles training reads from annotated slides, and how often each is drawn.

Regions. Every annotation (one QuPath object) is a *region*; its *name* is QuPath's annotation
name (``properties.name``, e.g. "Blood" inside class Other), else its classification name. Tile
centres are candidates on a lattice of step ``training.sample_stride_um`` over the region
(centre-inside rule: a candidate counts when its centre lies inside the polygon, so a sketch
thinner than a tile still yields tiles). Where a region gives fewer than
``training.min_tiles_per_region`` centres the step is halved, down to one target px; a sliver
with none even then gets its representative point. Centres inside another class's annotation are
ambiguous and dropped. A region with fewer than ``min_tiles_per_region`` centres at
one px (smaller than that many px) has them repeated up to it. At most ``training.max_tiles_per_region`` centres are drawn at random.

Context. A training tile is read with context, ``context_px(tiling, scale_jitter)`` px around
its centre at the run's µm/px through :class:`TileReader` (the pyramid level and resampling of
inference), so that scale augmentation can crop ``tile_px × s`` px and resize it to ``tile_px``.

Balance (:func:`epoch_weights`). Each class gets the same share of an epoch, each name within a
class the same share of its class, each region within a name a share proportional to the square
root of its tile count (a 100-tile region counts 5 times a 4-tile one, not 25 times), and the
tiles of a region equal shares.

Evaluation tiles (:func:`load_grid_tileset`) are different: every non-overlapping grid tile (the
inference grid) whose centre lies in exactly one class's annotations and that lies at least half
inside them, labelled with the region holding its centre.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .classes import CLASSES
from .config import Config, TilingConfig
from .qupath import Annotation, read_annotations
from .slide import Slide, open_slide
from .stain import SlideStain, normalise_uint8, tissue_stain
from .tiling import TileGrid, TileReader, tile_grid
from .tissue import TissueMask

__all__ = ["Region", "TileSet", "context_px", "region_centres", "load_tileset", "load_grid_tileset",
           "epoch_weights"]

Log = Callable[[str], None]


@dataclass(frozen=True)
class Region:
    """One annotated region: its slide (index), class index and name."""

    slide: int
    class_index: int
    name: str


@dataclass(frozen=True)
class TileSet:
    """Labelled tiles: uint8 ``(n, px, px, 3)`` (px: tile or context side), class, region and slide index ``(n,)``."""

    tiles: np.ndarray
    labels: np.ndarray
    region: np.ndarray            # index into ``regions``
    regions: tuple[Region, ...]
    slide_names: tuple[str, ...]
    ignored: dict[str, int]       # annotation names/kinds not used, with counts (all files)
    stains: tuple[SlideStain | None, ...] = ()  # per slide: the stain its tiles were mapped from (None: raw)

    @property
    def slide_index(self) -> np.ndarray:
        return np.array([r.slide for r in self.regions], np.int64)[self.region] if len(self.region) \
            else np.zeros(0, np.int64)

    @property
    def names(self) -> np.ndarray:
        """Region name of every tile ``(n,)`` (object array)."""
        return np.array([r.name for r in self.regions], object)[self.region] if len(self.region) \
            else np.zeros(0, object)

    def subset(self, slides: np.ndarray) -> "TileSet":
        keep = np.isin(self.slide_index, slides)
        return replace(self, tiles=self.tiles[keep], labels=self.labels[keep], region=self.region[keep])

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(CLASSES))
        return {c: int(counts[i]) for i, c in enumerate(CLASSES)}

    def name_counts(self) -> dict[str, dict[str, int]]:
        """Tiles per class and region name."""
        out: dict[str, dict[str, int]] = {c: {} for c in CLASSES}
        for label, name in zip(self.labels.tolist(), self.names.tolist()):
            out[CLASSES[label]][name] = out[CLASSES[label]].get(name, 0) + 1
        return {c: dict(sorted(v.items())) for c, v in out.items()}


def context_px(tiling: TilingConfig, scale_jitter: float) -> int:
    """Side of a training tile read with context for crops of up to ``tile_px * (1 + scale_jitter)`` px."""
    return int(math.ceil(tiling.tile_px * (1 + scale_jitter) / 2)) * 2


def region_centres(annotations: Sequence[Annotation], offset_l0: tuple[float, float], l0_per_px: float,
                   step_px: float, min_tiles: int, max_tiles: int, rng: np.random.Generator
                   ) -> list[np.ndarray]:
    """Per annotation, tile centres ``(k, 2)`` int64 in target px (column, row of a 1-px lattice).

    ``offset_l0`` is the slide's bounds offset (annotation coordinates are level-0 px minus it),
    ``l0_per_px`` level-0 px per target px, ``step_px`` the lattice step in target px.
    """
    import shapely
    import shapely.affinity

    def to_px(geom):
        return shapely.affinity.affine_transform(
            geom, [1 / l0_per_px, 0, 0, 1 / l0_per_px, offset_l0[0] / l0_per_px, offset_l0[1] / l0_per_px])

    others = {c: to_px(shapely.union_all([a.geometry for a in annotations if a.class_id != c])) for c in CLASSES}
    for g in others.values():
        shapely.prepare(g)
    out = []
    for ann in annotations:
        geom = to_px(ann.geometry)
        shapely.prepare(geom)
        step, centres = float(step_px), np.zeros((0, 2), np.int64)
        while True:
            centres = _lattice_inside(geom, step, others[ann.class_id])
            if len(centres) >= min_tiles or step <= 1:
                break
            step = max(1.0, step / 2)
        if not len(centres):
            p = geom.representative_point()
            pt = np.array([[math.floor(p.x), math.floor(p.y)]], np.int64)
            centres = pt if not others[ann.class_id].contains(shapely.Point(pt[0] + 0.5)) else centres
        if 0 < len(centres) < min_tiles:  # smaller than min_tiles px: its centres repeated (augmented apart)
            centres = np.resize(centres, (min_tiles, 2))
        if len(centres) > max_tiles:
            centres = centres[np.sort(rng.choice(len(centres), max_tiles, replace=False))]
        out.append(centres)
    return out


def _lattice_inside(geom, step: float, ambiguous) -> np.ndarray:
    """Integer px ``(k, 2)`` whose centres (px + 0.5) lie in ``geom`` and not in ``ambiguous``, on a
    lattice of ``step`` px anchored half a step inside the bounds."""
    import shapely

    x0, y0, x1, y1 = geom.bounds
    xs = np.unique(np.floor(np.arange(x0 + step / 2, x1, step)).astype(np.int64))
    ys = np.unique(np.floor(np.arange(y0 + step / 2, y1, step)).astype(np.int64))
    if not len(xs) or not len(ys):
        return np.zeros((0, 2), np.int64)
    gx, gy = (a.ravel() for a in np.meshgrid(xs, ys))
    inside = shapely.contains_xy(geom, gx + 0.5, gy + 0.5)
    if not ambiguous.is_empty:
        inside &= ~shapely.contains_xy(ambiguous, gx + 0.5, gy + 0.5)
    return np.stack([gx[inside], gy[inside]], axis=1)


def _grid_at(slide: Slide, tiling: TilingConfig, tile_px: int, stride_px: int, cols_rows: np.ndarray) -> TileGrid:
    """A TileGrid of the given cells (stride ``stride_px``, tiles ``tile_px``) at the run's µm/px."""
    cfg = TilingConfig(target_mpp=tiling.target_mpp, tile_px=tile_px, stride_px=stride_px,
                       min_tissue_fraction=0.0, read_region_px=tiling.read_region_px)
    empty = tile_grid(slide, TissueMask(mask=np.zeros((1, 1), bool), downsample=1.0, mpp=slide.mpp), cfg)
    return replace(empty, cols_rows=cols_rows.astype(np.int32), tissue_fraction=np.ones(len(cols_rows), np.float32),
                   chunk_starts=np.array([0, len(cols_rows)], np.int64))


def _read(slide: Slide, grid: TileGrid) -> np.ndarray:
    reader = TileReader(slide, grid)
    try:
        return reader.read_tiles(np.arange(len(grid)))
    finally:
        reader.close()


def _load(pairs: Sequence[tuple[Path, Path]], cfg: Config, sample: Callable, tile_side: int,
          normalise: bool, log: Log | None) -> TileSet:
    """Shared loop: ``sample(slide, annotations, slide_no) -> (grid, region ids within slide)`` per
    pair; with ``normalise``, each slide's tiles are mapped onto the reference stains
    (:func:`~wsi_response.stain.tissue_stain`, as a run maps them)."""
    tiles, region, regions, names, stains = [], [], [], [], []
    ignored: dict[str, int] = {}
    for i, (slide_path, ann_path) in enumerate(pairs):
        annotations, skipped = read_annotations(ann_path, cfg.annotations.name_map)
        for k, v in skipped.items():
            ignored[k] = ignored.get(k, 0) + v
        with open_slide(slide_path) as slide:
            grid, rid = sample(slide, annotations, i)
            read = _read(slide, grid) if len(grid) else np.zeros((0, tile_side, tile_side, 3), np.uint8)
            stains.append(tissue_stain(slide, cfg) if normalise else None)
            tiles.append(normalise_uint8(read, stains[-1]) if normalise else read)
        region.append(rid + len(regions))
        regions.extend(Region(i, CLASSES.index(a.class_id), a.region_name or a.name) for a in annotations)
        names.append(Path(slide_path).name)
        if log:
            counts = np.bincount([regions[r].class_index for r in region[-1]], minlength=len(CLASSES))
            log(f"{slide_path}: {len(rid)} tiles from {len(np.unique(rid))} of {len(annotations)} regions "
                f"({', '.join(f'{c} {n}' for c, n in zip(CLASSES, counts))})")
    region_all = np.concatenate(region).astype(np.int64) if region else np.zeros(0, np.int64)
    labels = np.array([r.class_index for r in regions], np.int64)[region_all] if len(region_all) \
        else np.zeros(0, np.int64)
    return TileSet(tiles=np.concatenate(tiles) if tiles else np.zeros((0, tile_side, tile_side, 3), np.uint8),
                   labels=labels, region=region_all, regions=tuple(regions), slide_names=tuple(names),
                   ignored=ignored, stains=tuple(stains))


def load_tileset(pairs: Sequence[tuple[Path, Path]], cfg: Config, log: Log | None = None) -> TileSet:
    """Training tiles of every (slide, annotation file) pair, read with context (:func:`context_px`),
    stain-normalised when ``training.stain_normalisation``."""
    tr = cfg.training
    side = context_px(cfg.tiling, tr.scale_jitter)
    seeds = np.random.SeedSequence([tr.seed, 1]).spawn(len(pairs))

    def sample(slide: Slide, annotations: Sequence[Annotation], i: int) -> tuple[TileGrid, np.ndarray]:
        l0_per_px = cfg.tiling.target_mpp / slide.mpp
        per_region = region_centres(annotations, slide.bounds_offset_l0, l0_per_px,
                                    tr.sample_stride_um / cfg.tiling.target_mpp, tr.min_tiles_per_region,
                                    tr.max_tiles_per_region, np.random.default_rng(seeds[i]))
        rid = np.concatenate([np.full(len(c), r, np.int64) for r, c in enumerate(per_region)]) \
            if per_region else np.zeros(0, np.int64)
        cells = np.concatenate(per_region) if per_region else np.zeros((0, 2), np.int64)
        return _grid_at(slide, cfg.tiling, side, 1, cells), rid

    return _load(pairs, cfg, sample, side, tr.stain_normalisation, log)


def load_grid_tileset(pairs: Sequence[tuple[Path, Path]], cfg: Config, min_inside_fraction: float = 0.5,
                      normalise: bool = False, log: Log | None = None) -> TileSet:
    """Evaluation tiles: every non-overlapping ``tile_px`` grid tile lying at least
    ``min_inside_fraction`` inside exactly one class's annotations (centre included), stain-normalised
    with ``normalise`` (for a model that reads normalised tiles)."""
    import shapely

    px = cfg.tiling.tile_px

    def sample(slide: Slide, annotations: Sequence[Annotation], i: int) -> tuple[TileGrid, np.ndarray]:
        ds = px * cfg.tiling.target_mpp / slide.mpp  # one mask px per cell: every cell is whole
        w, h = slide.dimensions_px
        full = TissueMask(mask=np.ones((math.ceil(h / ds), math.ceil(w / ds)), bool), downsample=ds, mpp=ds * slide.mpp)
        grid = tile_grid(slide, full, replace(cfg.tiling, stride_px=px, min_tissue_fraction=0.0))
        size = grid.size_l0
        corners = grid.origins_l0 - np.asarray(slide.bounds_offset_l0, np.float64)
        cx, cy = corners[:, 0] + size / 2, corners[:, 1] + size / 2
        holder = np.full(len(grid), -1, np.int64)
        for r, a in reversed(list(enumerate(annotations))):  # the first annotation holding a centre wins
            holder[shapely.contains_xy(a.geometry, cx, cy)] = r
        keep = holder >= 0
        geoms = [shapely.union_all([a.geometry for a in annotations if a.class_id == c]) for c in CLASSES]
        centre_in = np.stack([shapely.contains_xy(g, cx, cy) for g in geoms])
        keep &= centre_in.sum(axis=0) == 1
        idx = np.flatnonzero(keep)
        cls = np.array([CLASSES.index(annotations[r].class_id) for r in holder[idx]], np.int64)
        boxes = shapely.box(corners[idx, 0], corners[idx, 1], corners[idx, 0] + size, corners[idx, 1] + size)
        inside = np.array([shapely.area(shapely.intersection(b, geoms[c])) for b, c in zip(boxes, cls)]) \
            / (size * size) if len(idx) else np.zeros(0)
        idx = idx[inside >= min_inside_fraction]
        return grid.subset(np.isin(np.arange(len(grid)), idx)), holder[idx]

    return _load(pairs, cfg, sample, px, normalise, log)


def epoch_weights(data: TileSet) -> np.ndarray:
    """Draw probability of every tile ``(n,)`` (sums to 1): classes equal, names within a class
    equal, regions within a name ∝ sqrt(tiles), tiles within a region equal."""
    n = len(data.labels)
    w = np.zeros(n, np.float64)
    if not n:
        return w
    names = data.names
    classes = np.unique(data.labels)
    for c in classes:
        in_class = data.labels == c
        class_names = np.unique(names[in_class])
        for name in class_names:
            members = in_class & (names == name)
            regions, counts = np.unique(data.region[members], return_counts=True)
            share = np.sqrt(counts) / np.sqrt(counts).sum() / len(class_names) / len(classes)
            for r, k, s in zip(regions, counts, share):
                w[members & (data.region == r)] = s / k
    return w / w.sum()
