"""End to end: `run` on a synthetic specimen writes the contract's output tree, numbers agree."""
from __future__ import annotations

import gzip
import json
import shutil

import numpy as np
import pytest
import shapely.geometry

from wsi_response import cli
from wsi_response.classes import ARTEFACT, CLASSES, QUPATH_NAMES
from wsi_response.config import load_config
from wsi_response.ids import unique_slide_ids
from wsi_response.pipeline import aggregate_specimen, run_specimen

CFG = load_config(None, ["inference.num_workers=0"])


def test_output_tree_follows_the_contract(specimen_run):
    specimen_dir, result = specimen_run
    assert (specimen_dir / "specimen.json").is_file() and (specimen_dir / "report.html").is_file()
    for slide in result["slides"]:
        folder = specimen_dir / "slides" / slide["slide_id"]
        for name in ("slide.json", "overlay.geojson", "tiles.geojson.gz", "overlay.png"):
            assert (folder / name).is_file(), name
        assert (folder / "tiles.zarr").is_dir()
    assert not list(specimen_dir.rglob("*.partial")), "a temporary file was left under the output"


def test_specimen_json_fields(specimen_run, demo_classifier):
    specimen_dir, result = specimen_run
    on_disk = json.loads((specimen_dir / "specimen.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    for key in ("specimen_id", "status", "schema_version", "software", "model", "config", "classes", "areas_mm2",
                "tissue_area_mm2", "tumor_bed_area_mm2", "viable_percent", "necrosis_percent", "fibrosis_percent",
                "viable_percent_ci95", "eortc", "qc", "slides"):
        assert key in on_disk, key
    assert on_disk["status"] == "ok" and on_disk["schema_version"] == 1
    assert on_disk["model"]["sha256"] == demo_classifier.sha256
    assert on_disk["model"]["target_mpp"] == 1.0 and on_disk["model"]["tile_px"] == 224
    assert "synthetic" in json.dumps(on_disk["model"]["trained_on"]).lower()
    assert any("synthetic" in flag["message"] and flag["severity"] == "caveat" for flag in on_disk["qc"]["flags"])
    assert on_disk["qc"]["verdict"] == "reportable_with_caveats" and on_disk["qc"]["reportable"] is True
    assert on_disk["classes"] == list(CLASSES)
    for slide in on_disk["slides"]:
        for key in ("slide_id", "path", "status", "error", "backend", "mpp", "mpp_source", "dimensions_px",
                    "tissue_area_mm2", "areas_mm2", "tumor_bed_area_mm2", "viable_percent", "qc", "outputs"):
            assert key in slide, key
    # specimen totals are sums of slide areas; percentages are of the summed bed
    for name in CLASSES:
        assert on_disk["areas_mm2"][name] == pytest.approx(sum(s["areas_mm2"][name] for s in on_disk["slides"]))
    bed = sum(on_disk["areas_mm2"][n] for n in ("viable_tumor", "necrosis", "fibrosis"))
    assert on_disk["tumor_bed_area_mm2"] == pytest.approx(bed)
    assert on_disk["viable_percent"] == pytest.approx(100 * on_disk["areas_mm2"]["viable_tumor"] / bed)
    lo, hi = on_disk["viable_percent_ci95"]
    assert 0 <= lo <= hi <= 100
    assert on_disk["eortc"]["tier"] in "ABCDE"


def test_tissue_area_matches_truth(specimen_run, synth_specimen_small):
    _, result = specimen_run
    assert result["tissue_area_mm2"] == pytest.approx(synth_specimen_small.tissue_area_mm2, rel=0.03)


def test_overlay_polygons_equal_reported_areas(specimen_run):
    specimen_dir, result = specimen_run
    for slide in result["slides"]:
        folder = specimen_dir / "slides" / slide["slide_id"]
        overlay = json.loads((folder / "overlay.geojson").read_text())
        assert overlay["type"] == "FeatureCollection"
        seen = set()
        for feature in overlay["features"]:
            props = feature["properties"]
            assert props["objectType"] == "annotation" and props["isLocked"] is True
            assert set(props["classification"]) == {"name", "color"}
            name = next(c for c in QUPATH_NAMES if QUPATH_NAMES[c] == props["classification"]["name"])
            geometry = shapely.geometry.shape(feature["geometry"])
            assert feature["geometry"]["type"] == "MultiPolygon" and geometry.is_valid
            area_mm2 = geometry.area * slide["mpp"] ** 2 / 1e6
            assert props["measurements"]["Area µm^2"] == pytest.approx(area_mm2 * 1e6, rel=1e-6)
            seen.add(name)
            if name == ARTEFACT:
                continue
            assert area_mm2 == pytest.approx(slide["areas_mm2"][name], rel=0.005)
            assert 0 < props["measurements"]["Mean probability"] <= 1
        assert seen - {ARTEFACT} == {c for c in CLASSES if slide["areas_mm2"][c] > 0}


def test_tiles_geojson_carries_probabilities(specimen_run):
    specimen_dir, result = specimen_run
    slide = result["slides"][0]
    record = json.loads((specimen_dir / "slides" / slide["slide_id"] / "slide.json").read_text())
    with gzip.open(specimen_dir / "slides" / slide["slide_id"] / "tiles.geojson.gz") as fh:
        tiles = json.load(fh)
    assert len(tiles["features"]) == record["n_tiles"]
    first = tiles["features"][0]["properties"]
    assert first["objectType"] == "tile"
    probs = [first["measurements"][f"{QUPATH_NAMES[c]} probability"] for c in CLASSES]
    assert sum(probs) == pytest.approx(1.0, abs=2e-3)
    assert first["classification"]["name"] == QUPATH_NAMES[CLASSES[int(np.argmax(probs))]]


def test_aggregate_rebuilds_the_same_numbers(specimen_run, tmp_path):
    specimen_dir, result = specimen_run
    copy = tmp_path / "S-TEST"
    shutil.copytree(specimen_dir, copy)
    (copy / "specimen.json").unlink()
    rebuilt = aggregate_specimen(copy, "S-TEST")
    assert json.loads(json.dumps(rebuilt)) == json.loads(json.dumps(result))


def test_rerun_reuses_finished_tile_stores(specimen_run, demo_classifier, synth_specimen_small):
    specimen_dir, result = specimen_run
    store = specimen_dir / "slides" / result["slides"][0]["slide_id"] / "tiles.zarr"
    before = {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}
    again = run_specimen([s.slide_path for s in synth_specimen_small.slides], "S-TEST", specimen_dir.parent,
                         demo_classifier, CFG, quiet=True)
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()} == before
    assert again["viable_percent"] == result["viable_percent"]


def test_bad_slide_is_recorded_and_the_rest_complete(synth_specimen_small, tmp_path, capsys):
    bad = tmp_path / "broken slide.svs"
    bad.write_text("not a slide")
    good = synth_specimen_small.slides[0].slide_path
    code = cli.main(["run", str(good), str(bad), "--specimen", "S-BAD", "--out", str(tmp_path / "out"),
                     "--quiet", "inference.num_workers=0"])
    assert code == 1
    specimen = json.loads((tmp_path / "out" / "S-BAD" / "specimen.json").read_text())
    assert specimen["status"] == "partial"
    statuses = {s["slide_id"]: s["status"] for s in specimen["slides"]}
    assert statuses == {good.stem: "ok", "broken slide": "failed"}
    failed = next(s for s in specimen["slides"] if s["status"] == "failed")
    assert failed["error"] == f"{bad}: a text file, not a slide image"
    assert "specimen has 1 failed slide of 2" in [f["message"] for f in specimen["qc"]["flags"]]
    assert "failed slide" in capsys.readouterr().out


def test_unwritable_output_fails_before_compute(synth_specimen_small, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code = cli.main(["run", str(synth_specimen_small.slides[0].slide_path), "--specimen", "X",
                     "--out", str(blocker / "out"), "--quiet"])
    assert code == 1
    err = capsys.readouterr().err
    assert "not writable" in err and str(blocker) in err


def test_model_config_mismatch_is_a_usage_error(synth_specimen_small, tmp_path, capsys):
    code = cli.main(["run", str(synth_specimen_small.slides[0].slide_path), "--specimen", "X",
                     "--out", str(tmp_path), "--quiet", "tiling.target_mpp=0.5"])
    assert code == 1
    assert "tiling.target_mpp: model 1 µm/px, run 0.5 µm/px" in capsys.readouterr().err


def test_unique_slide_ids():
    assert unique_slide_ids(["a/x.svs", "b/x.svs", "c/y.ome.tiff", "x.tif"]) == ["x", "x-2", "y", "x-3"]


def test_artefacts_are_excluded_counted_and_drawn(demo_classifier, tmp_path):
    from wsi_response.synth import synth_slide

    truth = synth_slide(tmp_path / "inked.svs", size_px=(4000, 3000), mpp=0.5, seed=4, artefacts=("pen", "blur"))
    result = run_specimen([truth.slide_path], "S-ART", tmp_path / "out", demo_classifier, CFG, quiet=True)
    record = json.loads((tmp_path / "out" / "S-ART" / "slides" / "inked" / "slide.json").read_text())
    found = record["artefacts"]["areas_mm2"]
    # ink over glass is found as "tissue" and excluded too: between the ink over tissue and all ink
    assert 0.85 * truth.artefact_tissue_areas_mm2["pen"] <= found["pen"] <= 1.15 * truth.artefact_areas_mm2["pen"]
    assert found["blur"] == pytest.approx(truth.artefact_tissue_areas_mm2["blur"], rel=0.15)
    # excluded from numerator and denominator: measured tissue + artefacts = tissue found
    assert record["tissue_area_mm2"] + found["any"] == pytest.approx(record["tissue_mask_area_mm2"], rel=0.01)
    assert sum(record["areas_mm2"].values()) == pytest.approx(record["tissue_area_mm2"], rel=1e-6)
    overlay = json.loads((tmp_path / "out" / "S-ART" / "slides" / "inked" / "overlay.geojson").read_text())
    drawn = {f["properties"]["classification"]["name"]: shapely.geometry.shape(f["geometry"]).area
             for f in overlay["features"]}
    assert drawn["Artefact"] * record["mpp"] ** 2 / 1e6 == pytest.approx(found["any"], rel=0.005)
    flags = {f["code"] for f in record["qc"]["flags"]}
    assert {"artefact_pen", "artefact_blur"} <= flags and record["qc"]["verdict"] != "reportable"
    assert result["qc"]["verdict"] in ("reportable_with_caveats", "not_reportable")


def test_aggregate_with_and_without_a_validated_model(specimen_run, tmp_path):
    specimen_dir, result = specimen_run
    flags = [f["code"] for f in result["qc"]["flags"]]
    assert result["viable_percent_ci95_method"] == "validated_confusion"  # the bundled model carries its validation
    assert result["viable_percent_corrected"] is not None and "model_error_unknown" not in flags
    copy = tmp_path / "S-TEST"
    shutil.copytree(specimen_dir, copy)
    for path in copy.glob("slides/*/slide.json"):
        record = json.loads(path.read_text())
        record["model"]["validation_error"] = None  # as a model trained without validation records it
        path.write_text(json.dumps(record))
    plain = aggregate_specimen(copy, "S-TEST")
    assert plain["viable_percent_ci95_method"] == "tile_probabilities_only"
    assert plain["viable_percent"] == result["viable_percent"] and plain["viable_percent_corrected"] is None
    assert "model_error_unknown" in [f["code"] for f in plain["qc"]["flags"]]
    (lo, hi), (plo, phi) = result["viable_percent_ci95"], plain["viable_percent_ci95"]
    assert hi - lo > phi - plo  # the validated error widens the interval
