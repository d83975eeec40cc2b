"""Writing QuPath GeoJSON (DESIGN.md §6): the overlay and tile files' contents, and that both stream."""
from __future__ import annotations

import gzip
import json
import tracemalloc
import uuid
from pathlib import Path

import numpy as np
import shapely
import shapely.affinity
import shapely.geometry

from wsi_response.classes import CLASSES, COLORS_RGB, QUPATH_NAMES
from wsi_response.qupath import _NAMESPACE, overlay_features, write_overlay, write_tiles
from wsi_response.tiling import TileGrid


def random_grid(n: int, seed: int = 0, side: int = 400) -> tuple[TileGrid, np.ndarray]:
    """``n`` distinct cells of a ``side`` x ``side`` grid (stride 192 px at 0.5 µm/px on a 0.2473 µm/px
    slide: fractional level-0 coordinates) and Dirichlet probabilities over :data:`CLASSES`."""
    rng = np.random.default_rng(seed)
    rows, cols = np.unravel_index(rng.choice(side * side, n, replace=False), (side, side))
    grid = TileGrid(cols_rows=np.stack([cols, rows], axis=1).astype(np.int32),
                    tissue_fraction=rng.random(n).astype(np.float32), chunk_starts=np.array([0, n]),
                    tile_px=224, stride_px=192, read_mpp=0.5, slide_mpp=0.2473, read_level=0,
                    level_downsample=1.0, chunk_cells=16)
    return grid, rng.dirichlet(np.ones(len(CLASSES)), n).astype(np.float32)


def test_tiles_are_classified_cells_with_rounded_probabilities(tmp_path: Path) -> None:
    grid, probs = random_grid(50)
    offset = (123, 45.5)
    write_tiles(tmp_path / "t.geojson.gz", "slide-1", grid, probs, CLASSES, offset, chunk=7)
    doc = json.loads(gzip.decompress((tmp_path / "t.geojson.gz").read_bytes()))
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == 50
    s = grid.stride_l0
    for i, feature in enumerate(doc["features"]):
        col, row = grid.cols_rows[i].tolist()
        assert feature["id"] == str(uuid.uuid5(_NAMESPACE, f"slide-1/tile/{col}/{row}"))
        x0, y0 = round(col * s - offset[0], 2), round(row * s - offset[1], 2)
        x1, y1 = round(x0 + s, 2), round(y0 + s, 2)
        assert feature["geometry"] == {"type": "Polygon",
                                       "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}
        props = feature["properties"]
        label = CLASSES[int(np.argmax(probs[i]))]
        assert props["objectType"] == "tile"
        assert props["classification"] == {"name": QUPATH_NAMES[label], "color": list(COLORS_RGB[label])}
        assert props["measurements"] == {**{f"{QUPATH_NAMES[c]} probability": round(float(p), 4)
                                            for c, p in zip(CLASSES, probs[i])},
                                         "Tissue fraction": round(float(grid.tissue_fraction[i]), 4)}
    write_tiles(tmp_path / "u.geojson.gz", "slide-1", grid, probs, CLASSES, offset)  # one chunk
    assert gzip.decompress((tmp_path / "u.geojson.gz").read_bytes()) == \
        gzip.decompress((tmp_path / "t.geojson.gz").read_bytes())


def test_empty_grid_writes_an_empty_collection(tmp_path: Path) -> None:
    grid, probs = random_grid(0)
    write_tiles(tmp_path / "t.geojson.gz", "s", grid, probs, CLASSES, (0, 0))
    assert json.loads(gzip.decompress((tmp_path / "t.geojson.gz").read_bytes())) == \
        {"type": "FeatureCollection", "features": []}


def test_100000_tiles_stream_in_bounded_memory(tmp_path: Path) -> None:
    """Python memory while writing stays far below the uncompressed JSON (~47 MB): features are
    formatted and compressed chunk by chunk, never all held."""
    grid, probs = random_grid(100_000, seed=1)
    path = tmp_path / "t.geojson.gz"
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        write_tiles(path, "big", grid, probs, CLASSES, (0, 0), chunk=2048)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    raw = gzip.decompress(path.read_bytes())
    assert len(raw) > 40e6 and raw.count(b'"objectType":"tile"') == 100_000
    assert peak < 10e6, f"{peak / 1e6:.1f} MB held while writing {len(raw) / 1e6:.0f} MB of features"


def big_region(seed: int) -> shapely.MultiPolygon:
    """A MultiPolygon of 400 jagged squares with holes (~36,000 vertices), level-0 px."""
    rng = np.random.default_rng(seed)
    boxes = []
    for x, y in rng.integers(0, 10**6, (400, 2)).tolist():
        t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        r = 500 + 50 * rng.random(40)
        hole = shapely.box(x - 100, y - 100, x + 100, y + 100).exterior.coords
        boxes.append(shapely.Polygon(np.column_stack([x + r * np.cos(t), y + r * np.sin(t)]), [hole]))
    return shapely.MultiPolygon(boxes)


def test_overlay_features_follow_the_contract(tmp_path: Path) -> None:
    regions = {"viable_tumor": big_region(0), "necrosis": shapely.MultiPolygon(),
               "fibrosis": shapely.box(0.5, 0.25, 100, 1000.125), "artefact": big_region(1)}
    offset = (7, -3.5)
    write_overlay(tmp_path / "o.geojson", overlay_features(regions, {"viable_tumor": 0.812345}, 0.25, offset))
    doc = json.loads((tmp_path / "o.geojson").read_text(encoding="utf-8"))
    assert doc["type"] == "FeatureCollection"
    assert [f["properties"]["name"] for f in doc["features"]] == ["Viable tumor", "Fibrosis", "Artefact"]
    for feature, class_id in zip(doc["features"], ["viable_tumor", "fibrosis", "artefact"]):
        props = feature["properties"]
        assert props["objectType"] == "annotation" and props["isLocked"] is True
        assert props["classification"] == {"name": QUPATH_NAMES[class_id], "color": list(COLORS_RGB[class_id])}
        assert props["measurements"]["Area µm^2"] == round(regions[class_id].area * 0.25 ** 2, 2)
        assert ("Mean probability" in props["measurements"]) == (class_id == "viable_tumor")
        assert feature["id"] == str(uuid.uuid5(_NAMESPACE, f"annotation/{class_id}"))
        geometry = shapely.geometry.shape(feature["geometry"])
        assert feature["geometry"]["type"] == "MultiPolygon" and geometry.is_valid
        shifted = shapely.affinity.translate(regions[class_id], -offset[0], -offset[1])
        multi = shifted if shifted.geom_type == "MultiPolygon" else shapely.MultiPolygon([shifted])
        assert feature["geometry"] == json.loads(json.dumps(shapely.geometry.mapping(multi)))
    assert doc["features"][0]["properties"]["measurements"]["Mean probability"] == 0.8123


def test_overlay_is_written_one_feature_at_a_time(tmp_path: Path) -> None:
    """Each feature is written before the next is made: memory holds about one feature's JSON
    (~0.7 MB here), not the whole file (~13 MB); GeoJSON dict geometries are written as well."""
    def features():
        for i in range(20):
            yield {"type": "Feature", "geometry": big_region(i),
                   "properties": {"objectType": "annotation", "name": f"r{i}"}}
        yield {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1.5, 2]}, "properties": {}}

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        write_overlay(tmp_path / "o.geojson", features())
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    size = (tmp_path / "o.geojson").stat().st_size
    assert size > 10e6
    assert peak < size / 4, f"{peak / 1e6:.1f} MB held while writing {size / 1e6:.0f} MB"
    doc = json.loads((tmp_path / "o.geojson").read_bytes())
    assert len(doc["features"]) == 21 and doc["features"][-1]["geometry"]["coordinates"] == [1.5, 2]
    assert shapely.geometry.shape(doc["features"][3]["geometry"]).equals_exact(big_region(3), 0)
