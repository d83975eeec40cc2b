"""Reading QuPath GeoJSON in every exported form (golden fixtures in tests/data/qupath/)."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from wsi_response.config import AnnotationConfig
from wsi_response.errors import AnnotationError
from wsi_response.qupath import read_annotations

DATA = Path(__file__).parent / "data" / "qupath"
NAMES = AnnotationConfig().name_map


def test_feature_collection_maps_names_and_ignores_detections_and_unknown_names():
    anns, ignored = read_annotations(DATA / "feature_collection_v05.geojson", NAMES)
    assert [(a.class_id, a.name) for a in anns] == [("viable_tumor", "Tumor"), ("necrosis", "Necrosis")]
    assert anns[0].geometry.area == pytest.approx(400 * 300)
    assert anns[1].geometry.geom_type == "MultiPolygon" and anns[1].geometry.area == pytest.approx(200 * 200 + 100 * 100)
    assert ignored == {"<detection>": 1, "Immune cells": 1}


def test_plain_feature_array_case_insensitive_names_lines_points_unclassified():
    anns, ignored = read_annotations(DATA / "feature_array_v04.geojson", NAMES)
    assert [a.class_id for a in anns] == ["fibrosis", "other"]  # "Stroma", "FAT"
    assert ignored == {"<LineString>": 1, "<MultiPoint>": 1, "<unclassified>": 1}


def test_single_feature_keeps_fractional_coordinates():
    anns, ignored = read_annotations(DATA / "single_feature.geojson", NAMES)
    assert len(anns) == 1 and anns[0].class_id == "viable_tumor" and not ignored
    assert anns[0].geometry.bounds == (10.5, 20.25, 210.5, 220.25)


def test_legacy_colorrgb_object_type_and_measurement_lists():
    anns, ignored = read_annotations(DATA / "legacy_v02.geojson", NAMES)
    assert [a.class_id for a in anns] == ["fibrosis", "necrosis"]
    assert ignored == {"<detection>": 1}


def test_string_classification_unknown_object_type_and_self_intersection_made_valid():
    anns, ignored = read_annotations(DATA / "string_classification.geojson", NAMES)
    assert [a.class_id for a in anns] == ["other", "viable_tumor", "necrosis"]
    bowtie = anns[2].geometry
    assert bowtie.is_valid and bowtie.geom_type == "MultiPolygon"
    assert bowtie.area == pytest.approx(2 * 0.5 * 200 * 100)  # two triangles
    assert ignored == {"<tile>": 1}


def test_custom_name_map_and_gzip(tmp_path):
    gz = tmp_path / "a.geojson.gz"
    gz.write_bytes(gzip.compress((DATA / "feature_collection_v05.geojson").read_bytes()))
    anns, ignored = read_annotations(gz, {"immune CELLS": "other"})
    assert [a.class_id for a in anns] == ["other"]
    assert ignored == {"<detection>": 1, "Tumor": 1, "Necrosis": 1}


@pytest.mark.parametrize("content, problem", [
    ("{not json", "not valid JSON"),
    (json.dumps({"type": "Polygon", "coordinates": []}), "expected a GeoJSON FeatureCollection"),
    (json.dumps({"type": "FeatureCollection"}), "without a 'features' array"),
    (json.dumps([{"type": "Feature", "properties": {"classification": "Tumor"}}]), "feature 0: missing geometry"),
    (json.dumps([1]), "item 0 is not a GeoJSON Feature"),
    (json.dumps([{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 0]]]},
                  "properties": {"classification": 5}}]), "'classification' must be a string"),
    (json.dumps([{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": "x"},
                  "properties": {"classification": "Tumor"}}]), "feature 0: bad Polygon coordinates"),
])
def test_bad_files_raise_one_line_annotation_error(tmp_path, content, problem):
    path = tmp_path / "bad.geojson"
    path.write_text(content)
    with pytest.raises(AnnotationError) as info:
        read_annotations(path, NAMES)
    message = str(info.value)
    assert message.startswith(str(path)) and problem in message and "\n" not in message


def test_missing_file(tmp_path):
    with pytest.raises(AnnotationError, match="no such annotation file"):
        read_annotations(tmp_path / "nope.geojson", NAMES)
