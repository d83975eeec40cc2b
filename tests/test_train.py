"""Training: pairing, sampling inside polygons, split by slide, metrics, determinism, CLI."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import shapely

from wsi_response.classifier import load_classifier
from wsi_response.cli import main
from wsi_response.config import load_config
from wsi_response.errors import ConfigError
from wsi_response.qupath import read_annotations
from wsi_response.slide import open_slide
from wsi_response.synth import read_labels, synth_specimen
from wsi_response.train import (
    classification_metrics, load_tileset, pair_annotations, sample_annotated_tiles, split_by_slide, train_classifier,
)

TINY = ["tiling.target_mpp=2.0", "tiling.tile_px=32", "tiling.stride_px=32", "training.arch=resnet10t",
        "training.epochs=1", "training.batch_size=8", "training.max_tiles_per_class_per_slide=6",
        "training.sample_stride_um=32", "training.num_threads=1"]


@pytest.fixture(scope="module")
def specimen(tmp_path_factory):
    return synth_specimen(tmp_path_factory.mktemp("syn"), "T", 2, seed=3, size_px=(4000, 3000), mpp=0.5)


def test_pair_by_stem_then_by_order(tmp_path):
    slides = [Path("a/S1.svs"), Path("a/S2.svs")]
    assert pair_annotations(slides, [Path("b/S2.partial.geojson"), Path("b/S1.geojson")]) == [
        (slides[0], Path("b/S1.geojson")), (slides[1], Path("b/S2.partial.geojson"))]
    assert pair_annotations(slides, [Path("x.geojson"), Path("y.geojson")])[1] == (slides[1], Path("y.geojson"))
    with pytest.raises(ConfigError, match="1 files for 2 slides"):
        pair_annotations(slides, [Path("x.geojson")])


def test_sampled_tiles_lie_inside_their_class_polygons(specimen):
    cfg = load_config(overrides=TINY)
    truth = specimen.slides[0]
    anns, _ = read_annotations(truth.annotations_path, cfg.annotations.name_map)
    labels = read_labels(truth)
    with open_slide(truth.slide_path) as slide:
        grid, idx, cls = sample_annotated_tiles(slide, anns, cfg.tiling, 16.0, 0.5, 50, np.random.default_rng(0))
    assert len(idx) > 50 and np.all(np.diff(idx) > 0)
    counts = np.bincount(cls, minlength=4)
    assert counts.max() <= 50
    ds = truth.label_downsample
    for i, c in zip(idx, cls):
        x0, y0 = grid.origins_l0[i]
        box = shapely.box(x0, y0, x0 + grid.size_l0, y0 + grid.size_l0)
        geom = shapely.union_all([a.geometry for a in anns if a.class_id == ["viable_tumor", "necrosis",
                                                                             "fibrosis", "other"][c]])
        assert geom.contains(box.centroid)
        assert shapely.intersection(box, geom).area >= 0.5 * box.area - 1e-6
        # and the ground-truth raster agrees: the tile is mostly its class
        sub = labels[int(max(0, y0) // ds):int((y0 + grid.size_l0) // ds), int(max(0, x0) // ds):int((x0 + grid.size_l0) // ds)]
        assert (sub == c + 1).mean() >= 0.45


def test_split_is_by_slide():
    rng = np.random.default_rng(0)
    train, val = split_by_slide(8, 0.25, rng)
    assert len(val) == 2 and not set(train) & set(val) and sorted([*train, *val]) == list(range(8))
    with pytest.raises(ConfigError, match="at least 2 slides"):
        split_by_slide(1, 0.5, rng)


def test_metrics_from_a_known_confusion():
    true = np.array([0, 0, 0, 0, 1, 1, 2, 2, 3, 3])
    pred = np.array([0, 0, 0, 1, 1, 1, 2, 3, 3, 3])
    m = classification_metrics(true, pred)
    assert m["recall"] == {"viable_tumor": 0.75, "necrosis": 1.0, "fibrosis": 0.5, "other": 1.0}
    assert m["precision"]["necrosis"] == pytest.approx(2 / 3)
    assert m["balanced_accuracy"] == pytest.approx((0.75 + 1 + 0.5 + 1) / 4)
    assert m["confusion_matrix"][0] == [3, 1, 0, 0]


def test_training_is_deterministic_and_validates_on_held_out_slides(specimen, tmp_path):
    slides = [s.slide_path for s in specimen.slides]
    anns = [s.annotations_path for s in specimen.slides]
    cfg = load_config(overrides=[*TINY, "training.val_split=0.5"])
    a = train_classifier(slides, anns, tmp_path / "a.safetensors", cfg, device="cpu")
    b = train_classifier(slides, anns, tmp_path / "b.safetensors", cfg, device="cpu")
    assert a.classifier.sha256 == b.classifier.sha256  # identical weights and metadata
    trained_on = a.classifier.trained_on
    assert trained_on["synthetic"] is True
    assert set(trained_on["train_slides"]).isdisjoint(trained_on["val_slides"]) and len(trained_on["val_slides"]) == 1
    val = a.report["metrics"]["val"]
    assert val["n_tiles"] == sum(trained_on["val_tiles_per_class"].values()) > 0
    report = json.loads((tmp_path / "a.safetensors.report.json").read_text())
    assert report["sha256"] == hashlib.sha256((tmp_path / "a.safetensors").read_bytes()).hexdigest()
    # validation tiles come only from the held-out slide
    # calibration on the validation tiles: temperature, confusion counts, reliability bins and diagram
    block = a.classifier.validation_error
    assert block["n_slides"] == 1 and block["n_tiles"] == val["n_tiles"]
    assert block["confusion_matrix"] == val["confusion_matrix"]
    calibration = report["calibration"]
    assert calibration["temperature"] == a.classifier.temperature > 0
    assert calibration["after"]["nll"] <= calibration["before"]["nll"]
    assert sum(b["n"] for b in calibration["before"]["bins"]) == val["n_tiles"]
    assert (tmp_path / report["reliability_png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loaded = load_classifier(tmp_path / "a.safetensors")
    assert loaded.temperature == a.classifier.temperature and loaded.validation_error == block
    data = load_tileset(list(zip(slides, anns)), cfg)
    val_index = trained_on["train_slides"] and [i for i, n in enumerate(data.slide_names) if n in trained_on["val_slides"]]
    assert data.subset(np.array(val_index)).class_counts() == trained_on["val_tiles_per_class"]


def test_cli_train_on_partial_annotations(specimen, tmp_path, capsys):
    s = specimen.slides
    out = tmp_path / "m.safetensors"
    rc = main(["train", "--slides", str(s[0].slide_path), str(s[1].slide_path),
               "--annotations", str(s[1].partial_annotations_path), str(s[0].partial_annotations_path),
               "--out", str(out), "--val-split", "0", "--device", "cpu", "--quiet", *TINY,
               "training.sample_stride_um=8"])
    assert rc == 0 and out.is_file() and out.with_name("m.safetensors.report.json").is_file()
    no_val = load_classifier(out)  # no held-out slides: no temperature, error unknown
    assert no_val.temperature == 1.0 and no_val.validation_error is None
    assert "model " in capsys.readouterr().out
    rc = main(["train", "--slides", str(s[0].slide_path), "--annotations", str(s[0].annotations_path),
               "--out", str(out), "--device", "cpu", "--quiet", *TINY, "training.val_split=0.5"])
    assert rc == 2 and "needs at least 2 slides" in capsys.readouterr().err


def test_training_reads_the_pixels_inference_reads(specimen):
    from wsi_response.tiling import TileReader, tile_grid
    from wsi_response.tissue import detect_tissue

    cfg = load_config(overrides=TINY)
    with open_slide(specimen.slides[0].slide_path) as slide:
        grid = tile_grid(slide, detect_tissue(slide), cfg.tiling)
        reader = TileReader(slide, grid)
        indices, chunk = reader.read_chunk(grid.n_chunks // 2)
        assert np.array_equal(reader.read_tiles(indices), chunk)  # sampling path == inference path
        reader.close()


def test_colour_augmentation_is_sane(specimen):
    import torch

    from wsi_response.classifier import to_unit_float
    from wsi_response.train import hed_jitter, light_jitter

    s = specimen.slides[0]
    data = load_tileset([(s.slide_path, s.annotations_path)], load_config(overrides=TINY), cap_per_class=4)
    x = to_unit_float(torch.from_numpy(data.tiles))
    gen = torch.Generator().manual_seed(0)
    assert float((hed_jitter(x.clone(), 0.0, gen) - x).abs().mean()) < 2 / 255  # HED round trip ~ identity
    assert torch.allclose(light_jitter(x.clone(), 0.0, gen), x, atol=1e-6)
    y = light_jitter(hed_jitter(x.clone(), 0.2, gen), 0.2, gen)
    change = (y - x).abs().mean(dim=(1, 2, 3)) * 255
    assert y.min() >= 0 and y.max() <= 1 and float(change.max()) < 60 and float(change.mean()) > 1
