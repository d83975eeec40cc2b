"""QuPath GeoJSON: reading annotations (for training and edited regions) and writing overlays.

Reads every form QuPath 0.2–0.6 exports (see DESIGN.md §6): a ``FeatureCollection``, a single
``Feature``, or a plain array of Features; ``classification`` as ``{"name", "color"}``,
``{"name", "colorRGB"}`` or a plain string; ``objectType`` (older ``object_type``) missing or
unknown means annotation; ``measurements`` as a dict or a list of ``{name, value}``.

Coordinates are level-0 px **minus** the slide's bounds offset (QuPath's view of bounded
slides); add ``Slide.bounds_offset_l0`` back before reading pixels.

Writes (DESIGN.md §6): ``overlay.geojson``, a FeatureCollection of one locked MultiPolygon
annotation per class with ``classification {name, color}`` and measurements ("Area µm^2",
"Mean probability"); ``tiles.geojson.gz``, one classified ``tile`` object per grid cell with the
class probabilities as measurements, streamed chunk by chunk. Object ids are UUIDs derived from
the slide and cell, so a rerun writes the same bytes.
"""
from __future__ import annotations

import gzip
import json
import os
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import shapely
import shapely.affinity

from .atomic import atomic_open
from .classes import QUPATH_NAMES, qupath_classification
from .errors import AnnotationError
from .inputs import UnreadableInput, read_regular_file
from .tiling import TileGrid

__all__ = ["Annotation", "read_annotations", "read_features", "overlay_features", "write_overlay", "write_tiles"]

_NAMESPACE = uuid.UUID("6f1c3a52-8d0e-4f7b-9a21-5b3e2f0c9d41")  # wsi-response object ids

_COMPACT = (",", ":")  # json separators of the files written
_AREA_TYPES = ("Polygon", "MultiPolygon")
_OTHER_OBJECT_TYPES = ("detection", "tile", "cell", "tmacore", "tma_core")


@dataclass(frozen=True)
class Annotation:
    """One annotated region: canonical class id, valid (Multi)Polygon in level-0 px minus the bounds offset."""

    class_id: str
    geometry: Any  # shapely Polygon | MultiPolygon
    name: str      # the classification name as written in the file
    region_name: str | None = None  # the annotation's own name (QuPath ``properties.name``), often finer than its class


def read_features(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The Feature objects of a QuPath GeoJSON file (``.geojson`` or ``.geojson.gz``)."""
    path = Path(path)
    try:
        raw = read_regular_file(path, "annotation file")
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        doc = json.loads(raw.decode("utf-8-sig"))
    except UnreadableInput as exc:
        raise AnnotationError(path, str(exc)) from None
    except OSError as exc:  # gzip: a corrupt stream
        raise AnnotationError(path, f"cannot read ({exc.strerror or exc})") from None
    except (ValueError, EOFError) as exc:
        raise AnnotationError(path, f"not valid JSON ({' '.join(str(exc).split())[:150]})") from None
    except RecursionError:
        raise AnnotationError(path, "arrays or objects nested too deeply to be GeoJSON") from None
    if isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        features = doc.get("features")
        if not isinstance(features, list):
            raise AnnotationError(path, "FeatureCollection without a 'features' array")
    elif isinstance(doc, dict) and doc.get("type") == "Feature":
        features = [doc]
    elif isinstance(doc, list):
        features = doc
    else:
        kind = doc.get("type") if isinstance(doc, dict) else type(doc).__name__
        raise AnnotationError(path, f"expected a GeoJSON FeatureCollection, Feature or Feature array, got {kind!r}")
    for i, feature in enumerate(features):
        if not isinstance(feature, dict) or feature.get("type") != "Feature":
            raise AnnotationError(path, f"item {i} is not a GeoJSON Feature")
    return features


def read_annotations(path: str | os.PathLike, name_map: Mapping[str, str]
                     ) -> tuple[list[Annotation], dict[str, int]]:
    """Annotations of ``path`` whose classification maps onto a canonical class, and what was ignored.

    ``name_map`` maps lower-case classification names to canonical class ids (config section
    ``annotations.name_map``). Returns the annotations (file order) and ``ignored``: counts by
    reason, e.g. ``{"Stroma?": 2, "<unclassified>": 1, "<detection>": 40, "<LineString>": 1}``.
    """
    import shapely
    from shapely.geometry import shape

    path = Path(path)
    lookup = {k.strip().lower(): v for k, v in name_map.items()}
    out: list[Annotation] = []
    ignored: Counter[str] = Counter()
    for i, feature in enumerate(read_features(path)):
        props = feature.get("properties") or {}
        if not isinstance(props, dict):
            raise AnnotationError(path, f"feature {i}: 'properties' is not an object")
        object_type = str(props.get("objectType", props.get("object_type", "annotation"))).lower()
        if object_type in _OTHER_OBJECT_TYPES:
            ignored[f"<{object_type}>"] += 1
            continue
        name = read_classification_name(path, i, props.get("classification"))
        geometry = feature.get("geometry")
        if not isinstance(geometry, dict) or "type" not in geometry:
            raise AnnotationError(path, f"feature {i}: missing geometry")
        if geometry["type"] not in _AREA_TYPES:
            ignored[f"<{geometry['type']}>"] += 1
            continue
        if name is None:
            ignored["<unclassified>"] += 1
            continue
        class_id = lookup.get(name.strip().lower())
        if class_id is None:
            ignored[name] += 1
            continue
        try:
            geom = shapely.make_valid(shape(geometry))
        except Exception as exc:
            raise AnnotationError(path, f"feature {i}: bad {geometry['type']} coordinates "
                                  f"({' '.join(str(exc).split())[:120]})") from None
        geom = _areal_part(geom)
        if geom.is_empty:
            ignored["<empty polygon>"] += 1
            continue
        region_name = props.get("name")
        out.append(Annotation(class_id=class_id, geometry=geom, name=name,
                              region_name=region_name.strip() or None if isinstance(region_name, str) else None))
    return out, dict(ignored)


def read_classification_name(path: Path, index: int, value: Any) -> str | None:
    """The class name of a ``classification`` property in any QuPath form (None: unclassified)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value or None
    if isinstance(value, dict):
        name = value.get("name")
        if name is None or isinstance(name, str):
            return name or None
    raise AnnotationError(path, f"feature {index}: 'classification' must be a string or an object with a "
                          f"'name', got {json.dumps(value)[:80]}")


def _areal_part(geom: Any) -> Any:
    """The polygonal part of a ``make_valid`` result (drops stray lines and points)."""
    import shapely

    if geom.geom_type in _AREA_TYPES:
        return geom
    parts = [g for g in getattr(geom, "geoms", []) if g.geom_type in _AREA_TYPES]
    return shapely.union_all(parts) if parts else shapely.Polygon()


# --------------------------------------------------------------------------- writing

def overlay_features(regions: Mapping[str, Any], mean_probability: Mapping[str, float | None],
                     mpp: float, offset_l0: tuple[float, float]) -> Iterator[dict[str, Any]]:
    """One locked MultiPolygon annotation per class region, made as consumed (for :func:`write_overlay`).

    ``geometry`` is the shapely MultiPolygon in level-0 px minus the bounds offset (a GeoJSON-like
    object: it has ``__geo_interface__``); :func:`write_overlay` writes it as GeoJSON.
    """
    for class_id, geometry in regions.items():
        if geometry is None or geometry.is_empty:
            continue
        shifted = shapely.affinity.translate(geometry, -offset_l0[0], -offset_l0[1])
        measurements = {"Area µm^2": round(float(geometry.area) * mpp * mpp, 2)}
        if mean_probability.get(class_id) is not None:
            measurements["Mean probability"] = round(float(mean_probability[class_id]), 4)
        yield {
            "type": "Feature",
            "id": str(uuid.uuid5(_NAMESPACE, f"annotation/{class_id}")),
            "geometry": shifted if shifted.geom_type == "MultiPolygon" else shapely.MultiPolygon([shifted]),
            "properties": {
                "objectType": "annotation",
                "name": QUPATH_NAMES[class_id],
                "classification": qupath_classification(class_id),
                "isLocked": True,
                "measurements": measurements,
            },
        }


def write_overlay(path: Path, features: Iterable[Mapping[str, Any]]) -> None:
    """Write ``overlay.geojson`` (a FeatureCollection) atomically, one feature at a time.

    A shapely ``geometry`` is written by GEOS (``shapely.to_geojson``: the same numbers as
    ``shapely.geometry.mapping``, without building them as Python objects).
    """
    with atomic_open(path) as fh:
        fh.write(b'{"type":"FeatureCollection","features":[')
        for i, feature in enumerate(features):
            fh.write((b"," if i else b"") + _feature_json(feature).encode())
        fh.write(b"]}")


def _feature_json(feature: Mapping[str, Any]) -> str:
    """Compact JSON of a Feature, its members in order; a shapely value is written as GeoJSON."""
    return "{" + ",".join(
        json.dumps(key) + ":" + (shapely.to_geojson(value) if isinstance(value, shapely.Geometry)
                                 else json.dumps(value, separators=_COMPACT, default=float))
        for key, value in feature.items()) + "}"


def write_tiles(path: Path, slide_id: str, grid: TileGrid, probs: np.ndarray, class_names: Sequence[str],
                offset_l0: tuple[float, float], chunk: int = 4096) -> None:
    """Stream ``tiles.geojson.gz``: one classified ``tile`` object per grid cell with its probabilities.

    Each feature is the tile's *cell* (the non-overlapping stride box; corners in level-0 px minus
    the bounds offset, rounded to 0.01 px), probabilities and tissue fraction rounded to 1e-4.
    Features are formatted and compressed ``chunk`` at a time: memory does not grow with the grid.
    """
    template = _tile_template([QUPATH_NAMES[c] for c in class_names])
    classification = [json.dumps(qupath_classification(c), separators=_COMPACT) for c in class_names]
    n_cols, n_rows = (grid.cols_rows.max(axis=0) + 1).tolist() if len(grid) else (0, 0)
    x_text = _cell_edges_text(n_cols, grid.stride_l0, offset_l0[0])  # per column: left, right edge
    y_text = _cell_edges_text(n_rows, grid.stride_l0, offset_l0[1])  # per row: top, bottom edge
    with atomic_open(path) as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as gz:
        gz.write(b'{"type":"FeatureCollection","features":[')
        for start in range(0, len(grid), chunk):
            cols_rows = grid.cols_rows[start:start + chunk].tolist()
            labels = np.argmax(probs[start:start + chunk], axis=1).tolist()
            values = [[round(v, 4) for v in column] for column in
                      (*probs[start:start + chunk].T.tolist(), grid.tissue_fraction[start:start + chunk].tolist())]
            ids = (uuid.uuid5(_NAMESPACE, f"{slide_id}/tile/{c}/{r}") for c, r in cols_rows)
            features = ",".join(
                template % (i, x0, y0, x1, y0, x1, y1, x0, y1, x0, y0, classification[k], *m)
                for i, (x0, x1), (y0, y1), k, *m in zip(
                    ids, (x_text[c] for c, _ in cols_rows), (y_text[r] for _, r in cols_rows), labels, *values))
            gz.write((b"," if start else b"") + features.encode())
        gz.write(b"]}")


def _cell_edges_text(n: int, stride_l0: float, offset: float) -> list[tuple[str, str]]:
    """JSON text of the low and high edge (level-0 px minus ``offset``, rounded to 0.01) of cells 0..n-1."""
    low = [round(v, 2) for v in (np.arange(n, dtype=np.float64) * stride_l0 - offset).tolist()]
    return [(repr(v), repr(round(v + stride_l0, 2))) for v in low]


def _tile_template(names: Sequence[str]) -> str:
    """%-template of one tile Feature: id, the 5 polygon corners (x, y) and the classification as
    JSON text, then one probability per class name and the tissue fraction (``%r``: as JSON writes them)."""
    measurements = ",".join(json.dumps(f"{n} probability").replace("%", "%%") + ":%r" for n in names)
    corners = ",".join(["[%s,%s]"] * 5)
    return ('{"type":"Feature","id":"%s","geometry":{"type":"Polygon","coordinates":[[' + corners + ']]},'
            '"properties":{"objectType":"tile","classification":%s,"measurements":{'
            + measurements + ',"Tissue fraction":%r}}}')
