"""Exact polygons of the tissue mask and of each class's tile cells, in level-0 px (x right, y down).

A class region is the union of its tiles' *cells* clipped to the tissue mask, so its area is
exactly the tissue-fraction-weighted area that :mod:`wsi_response.quantify` reports (the overlay a
pathologist sees in QuPath and the numbers agree). Regions are not built with polygon overlay
(a union of 10⁵ boxes takes GEOS tens of seconds); they are traced on a label grid:

1. The *refined grid*: the mask's pixel edges plus the cells' edges (cells rarely align with
   mask pixels). Every refined pixel lies in one mask pixel and one cell, so it has one label:
   the class of its cell where the mask is tissue, none elsewhere.
2. Band by band (bounded memory), the pixel edges between a class and anything else become
   directed boundary segments (maximal straight runs), class on the right-hand side.
3. Segments are linked end to start into rings with vectorised pointer jumping. Where two
   diagonal pixels of a label meet at a vertex, the ring turns towards the pixel it bounds (the
   pixels stay apart), unless both are in one 4-connected piece: then it joins them, so no ring
   ever passes a vertex twice. Positive-area rings are shells, negative ones holes.
4. Each hole joins the smallest shell containing the centre of a labelled pixel beside it.

The result is valid (simple rings; shells and holes touch at most at isolated vertices) and
pixel-exact: area = sum of the label's refined pixel areas, holes kept, vertices only at
corners. A 5000 × 3750 noisy mask takes about 0.6 s; 100,000 tiles on a 12,800 × 10,000 mask
about 4–5 s and 220 MB above the mask.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import shapely
from shapely.geometry import MultiPolygon

from .classes import CLASSES
from .tiling import TileGrid
from .tissue import TissueMask

__all__ = ["tissue_polygons", "class_regions", "subtract_bounds_offset"]

_BAND_PIXELS = 1 << 22      # refined-grid pixels per band of rows (bounds temporary memory)
_SNAP_MASK_PX = 1e-6        # cell edges this close to a mask pixel edge are that edge, mask px
_E, _S, _W, _N = 0, 1, 2, 3  # segment directions (x right, y down); a right turn is +1
# By direction: the labelled pixel on a segment's right, as (column, row) offset from its start.
_RIGHT_PIXEL = np.array([[0, 0], [-1, 0], [-1, -1], [0, -1]])


def tissue_polygons(mask: TissueMask) -> MultiPolygon:
    """The tissue mask as polygons in level-0 px; area == ``mask.sum() * downsample**2`` exactly.

    Only the bounding box of the tissue pixels is traced (a sparse mask costs little).
    """
    rows, cols = np.flatnonzero(mask.mask.any(axis=1)), np.flatnonzero(mask.mask.any(axis=0))
    if len(rows) == 0:
        return MultiPolygon()
    box = mask.mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    h, w = box.shape
    band = max(1, _BAND_PIXELS // w)
    bands = (box[r:r + band].astype(np.int16) - 1 for r in range(0, h, band))  # tissue: 0
    edges_x = np.arange(cols[0], cols[-1] + 2) * mask.downsample
    edges_y = np.arange(rows[0], rows[-1] + 2) * mask.downsample
    return _trace(bands, 1, w, edges_x, edges_y)[0]


def class_regions(grid: TileGrid, labels: np.ndarray, mask: TissueMask,
                  class_names: Sequence[str] = CLASSES) -> dict[str, MultiPolygon]:
    """Per class, the union of its tiles' cells clipped to the tissue mask, in level-0 px.

    ``labels`` (N,) are indices into ``class_names`` in grid order (``TilePredictions.labels``).
    Every class of ``class_names`` is a key (an empty MultiPolygon when it has no tile). The area
    in µm² is ``region.area * slide_mpp**2``.
    """
    labels = np.asarray(labels)
    if labels.shape != (len(grid),):
        raise ValueError(f"{labels.shape} labels for a grid of {len(grid)} tiles")
    empty = {name: MultiPolygon() for name in class_names}
    if len(grid) == 0:
        return empty
    cell_px = grid.stride_l0 / mask.downsample  # cell side in mask px
    cols, rows = grid.cols_rows[:, 0].astype(np.int64), grid.cols_rows[:, 1].astype(np.int64)
    h, w = mask.mask.shape
    x_edges, x_mask, x_cell = _refined_axis(w, cell_px, int(cols.min()), int(cols.max()) + 1)
    y_edges, y_mask, y_cell = _refined_axis(h, cell_px, int(rows.min()), int(rows.max()) + 1)
    if len(x_mask) == 0 or len(y_mask) == 0:
        return empty
    cell_label = np.full((int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1), -1, np.int16)
    cell_label[rows - rows.min(), cols - cols.min()] = labels
    band = max(1, _BAND_PIXELS // len(x_mask))
    cell_cols = cell_label[:, x_cell] + np.int16(1)  # per cell row and refined column: label + 1, 0 for none

    def bands() -> Iterable[np.ndarray]:
        for r in range(0, len(y_mask), band):
            labels = cell_cols.take(y_cell[r:r + band], axis=0)
            labels *= mask.mask.take(y_mask[r:r + band], axis=0).take(x_mask, axis=1)  # 0 off tissue
            labels -= 1
            yield labels

    polygons = _trace(bands(), len(class_names), len(x_mask),
                      x_edges * mask.downsample, y_edges * mask.downsample)
    return dict(zip(class_names, polygons))


def subtract_bounds_offset(geometry: shapely.Geometry, bounds_offset_l0: tuple[int, int]) -> shapely.Geometry:
    """``geometry`` moved by minus OpenSlide's bounds-x/bounds-y (level-0 px), as QuPath shows it."""
    dx, dy = bounds_offset_l0
    if dx == 0 and dy == 0:
        return geometry
    return shapely.transform(geometry, lambda xy: xy - np.array([dx, dy], np.float64))


def _refined_axis(n_mask: int, cell_px: float, first: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One axis of the refined grid over cells ``first..stop-1`` inside ``[0, n_mask)`` mask px.

    Returns the refined edges (mask px), and for each refined pixel its mask pixel index and its
    cell index relative to ``first``.
    """
    lo, hi = first * cell_px, min(stop * cell_px, float(n_mask))
    if hi <= lo:
        return np.zeros(1), np.zeros(0, np.int64), np.zeros(0, np.int64)
    cells = np.arange(first, stop + 1) * cell_px
    nearest = np.rint(cells)
    cells = np.where(np.abs(cells - nearest) < _SNAP_MASK_PX, nearest, cells)
    inner = np.arange(np.floor(lo) + 1, np.ceil(hi))
    edges = np.unique(np.concatenate([cells[(cells > lo) & (cells < hi)], inner, [lo, hi]]))
    mid = 0.5 * (edges[:-1] + edges[1:])
    return edges, np.floor(mid).astype(np.int64), np.floor(mid / cell_px).astype(np.int64) - first


def _trace(bands: Iterable[np.ndarray], n_labels: int, width: int,
           edges_x: np.ndarray, edges_y: np.ndarray) -> list[MultiPolygon]:
    """Polygons of labels ``0..n_labels-1`` of a label grid fed as int row bands (-1: none).

    Pixel ``[r, c]`` covers ``[edges_x[c], edges_x[c+1]] × [edges_y[r], edges_y[r+1]]``.
    """
    boundaries = _Boundaries(width)
    for band in bands:
        boundaries.add(band)
    segments = boundaries.finish()
    return [_polygons(segments[segments[:, 5] == k, :5], width, edges_x, edges_y) for k in range(n_labels)]


class _Boundaries:
    """Directed boundary segments (maximal straight runs) of a label grid fed top to bottom."""

    def __init__(self, width: int) -> None:
        self._width = width
        self._prev = np.full((1, width), -1, np.int16)
        self._row = 0
        self._horizontal: list[np.ndarray] = []  # (k, 6): x0, y0, x1, y1, direction, label
        self._vertical: list[np.ndarray] = []    # (k, 5): label, direction, x, row start, row stop

    def add(self, band: np.ndarray) -> None:
        band = band.astype(np.int16, copy=False)
        w = self._width
        # Horizontal unit edges between a row and the one above: E for the label below, W above.
        label, direction, flat = _unit_edges(band, np.concatenate([self._prev, band[:-1]]), (_E, _W))
        row, col = np.divmod(flat, w)
        row += self._row
        first, last = _runs([label, direction, row], col, col + 1)
        x_lo, x_hi = col[first], col[last] + 1
        east = direction[first] == _E
        self._horizontal.append(np.stack([np.where(east, x_lo, x_hi), row[first], np.where(east, x_hi, x_lo),
                                          row[first], direction[first], label[first]], axis=1))
        # Vertical unit edges at vertex column x: N for the label on the right, S on the left.
        padded = np.full((band.shape[0], w + 2), -1, np.int16)
        padded[:, 1:-1] = band
        label, direction, flat = _unit_edges(padded[:, 1:], padded[:, :-1], (_N, _S))
        row, x = np.divmod(flat, w + 1)
        row += self._row
        self._vertical.append(np.stack([label, direction, x, row, row + 1], axis=1))
        self._prev = band[-1:]
        self._row += band.shape[0]

    def finish(self) -> np.ndarray:
        """All segments (k, 6): x0, y0, x1, y1, direction, label, in vertex indices."""
        self.add(np.full_like(self._prev, -1))  # closes the bottom row
        label, direction, x, start, stop = np.concatenate(self._vertical).T
        first, last = _runs([label, direction, x], start, stop)
        south = direction[first] == _S
        y_lo, y_hi = start[first], stop[last]
        vertical = np.stack([x[first], np.where(south, y_lo, y_hi), x[first], np.where(south, y_hi, y_lo),
                             direction[first], label[first]], axis=1)
        return np.concatenate(self._horizontal + [vertical]).astype(np.int64)


def _unit_edges(a: np.ndarray, b: np.ndarray, directions: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Label, direction and flat index of the unit edges where same-shape ``a`` and ``b`` differ:
    one for the label in ``a`` (``directions[0]``), one for the label in ``b``; none for -1."""
    flat = np.flatnonzero(a != b)
    label = np.concatenate([a.ravel()[flat], b.ravel()[flat]])
    direction = np.repeat(np.array(directions), len(flat))
    keep = label >= 0
    return label[keep], direction[keep], np.tile(flat, 2)[keep]


def _runs(keys: list[np.ndarray], start: np.ndarray, stop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the first and last piece of each run: pieces ``[start, stop)`` with equal keys,
    each starting where the one before stopped."""
    order = np.lexsort([start] + keys[::-1])
    start, stop = start[order], stop[order]
    new = np.ones(len(order), bool)
    new[1:] = start[1:] != stop[:-1]
    for key in keys:
        key = key[order]
        new[1:] |= key[1:] != key[:-1]
    first = np.flatnonzero(new)
    last = np.r_[first[1:] - 1, len(order) - 1][:len(first)]
    return order[first], order[last]


def _polygons(segments: np.ndarray, width: int, edges_x: np.ndarray, edges_y: np.ndarray) -> MultiPolygon:
    """Link segments into rings, group holes with shells; coordinates through the edge arrays."""
    if len(segments) == 0:
        return MultiPolygon()
    x0, y0, x1, y1, direction = segments.T
    start_id = y0 * (width + 1) + x0
    by_start = np.argsort(start_id, kind="stable")
    sorted_start = start_id[by_start]
    end_id = y1 * (width + 1) + x1
    lo = np.searchsorted(sorted_start, end_id)
    two = np.searchsorted(sorted_start, end_id, side="right") - lo == 2  # segment ends at a diagonal vertex
    # At a vertex where two diagonal pixels of the label meet, two segments leave: turn right
    # (towards the pixel just bounded) so the pixels stay apart ...
    diagonal = np.flatnonzero(sorted_start[1:] == sorted_start[:-1])
    first_out, second_out = by_start[diagonal], by_start[diagonal + 1]
    succ = by_start[lo]
    is_right_turn = direction[succ] == (direction + 1) % 4
    succ = np.where(two & ~is_right_turn, by_start[np.minimum(lo + 1, len(lo) - 1)], succ)
    head, rank = _cycles(succ)
    # ... unless both pixels belong to one 4-connected piece (then one ring would pass the vertex
    # twice, touching itself): there join them, so the ring splits into a shell and a hole that
    # touch at the vertex. Every ring is then simple.
    pinched = head[first_out] == head[second_out]
    if pinched.any():
        pred = np.empty_like(succ)
        pred[succ] = np.arange(len(succ))
        out_a, out_b = first_out[pinched], second_out[pinched]
        succ[pred[out_a]], succ[pred[out_b]] = out_b, out_a
        head, rank = _cycles(succ)
    order = np.lexsort((-rank, head))  # ring by ring, each in walking order
    new_ring = np.r_[True, head[order][1:] != head[order][:-1]]
    ring_start = np.flatnonzero(new_ring)
    n_rings = len(ring_start)

    vx, vy = x0[order], y0[order]
    nxt = np.arange(1, len(order) + 1)
    nxt[np.append(ring_start[1:], len(order)) - 1] = ring_start
    area2 = np.add.reduceat(vx * vy[nxt] - vx[nxt] * vy, ring_start)  # twice the signed area, px²
    rings = shapely.linearrings(np.column_stack([edges_x[vx], edges_y[vy]]),
                                indices=np.repeat(np.arange(n_rings), np.diff(np.r_[ring_start, len(order)])))

    shells = np.flatnonzero(area2 > 0)
    holes = np.flatnonzero(area2 < 0)
    polygon_of = np.empty(n_rings, np.int64)
    polygon_of[shells] = np.arange(len(shells))
    if len(holes):
        polygon_of[holes] = _enclosing_shell(rings, shells, area2, holes,
                                             order[ring_start[holes]], segments, edges_x, edges_y)
    by_polygon = np.lexsort((area2 < 0, polygon_of))
    return shapely.multipolygons(shapely.polygons(rings[by_polygon], indices=polygon_of[by_polygon]))


def _cycles(succ: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For a permutation made of cycles: each element's cycle head (its smallest index) and its
    number of steps forward to that head (0 for the head), by pointer jumping."""
    head, jump = np.arange(len(succ)), succ
    while True:  # head = min over a window of 2^k successors; stable once it is the cycle minimum
        new = np.minimum(head, head[jump])
        if np.array_equal(new, head):
            break
        head, jump = new, jump[jump]
    is_head = head == np.arange(len(succ))
    jump = np.where(is_head, np.arange(len(succ)), succ)
    rank = (~is_head).astype(np.int64)
    while not np.array_equal(jump, head):  # rank = steps from i to jump[i]
        rank = rank + rank[jump]
        jump = jump[jump]
    return head, rank


def _enclosing_shell(rings: np.ndarray, shells: np.ndarray, area2: np.ndarray, holes: np.ndarray,
                     first_segment: np.ndarray, segments: np.ndarray,
                     edges_x: np.ndarray, edges_y: np.ndarray) -> np.ndarray:
    """Polygon index (into ``shells``) of each hole: the smallest shell containing the centre of
    the labelled pixel on the right of the hole's first segment."""
    pixel = segments[first_segment, :2] + _RIGHT_PIXEL[segments[first_segment, 4]]
    c, r = pixel[:, 0], pixel[:, 1]
    px = 0.5 * (edges_x[c] + edges_x[c + 1])
    py = 0.5 * (edges_y[r] + edges_y[r + 1])
    shell_polygons = shapely.polygons(rings[shells])
    shapely.prepare(shell_polygons)
    hole_i, shell_i = shapely.STRtree(shell_polygons).query(shapely.points(px, py))
    inside = shapely.contains_xy(shell_polygons[shell_i], px[hole_i], py[hole_i])
    hole_i, shell_i = hole_i[inside], shell_i[inside]
    best = np.lexsort((area2[shells][shell_i], hole_i))
    hole_i, shell_i = hole_i[best], shell_i[best]
    first = np.r_[True, hole_i[1:] != hole_i[:-1]]
    if first.sum() != len(holes):
        raise AssertionError("a hole without an enclosing shell")
    return shell_i[first]
