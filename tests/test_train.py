"""Training: pairing, sampling of every region, balance, split by slide, metrics per name, best epoch,
augmentation, determinism, CLI (--pretrained offline)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import shapely
import shapely.geometry
import torch

from wsi_response.classifier import load_classifier
from wsi_response.cli import main
from wsi_response.config import load_config
from wsi_response.errors import ConfigError
from wsi_response.qupath import read_annotations
from wsi_response.slide import open_slide
from wsi_response.synth import read_labels, synth_specimen
from wsi_response.train import classification_metrics, pair_annotations, split_by_slide, train_classifier
from wsi_response.train_sampling import epoch_weights, load_tileset, region_centres

TINY = ["tiling.target_mpp=2.0", "tiling.tile_px=32", "tiling.stride_px=32", "training.arch=resnet10t",
        "training.epochs=1", "training.batch_size=8", "training.max_tiles_per_region=6",
        "training.sample_stride_um=32", "training.num_threads=1"]


@pytest.fixture(scope="module")
def specimen(tmp_path_factory):
    return synth_specimen(tmp_path_factory.mktemp("syn"), "T", 2, seed=3, size_px=(4000, 3000), mpp=0.5)


@pytest.fixture(scope="module")
def named_specimen(tmp_path_factory):
    """Annotations named by sub-type (lab-b)."""
    return synth_specimen(tmp_path_factory.mktemp("synb"), "B", 2, seed=4, size_px=(4000, 3000), mpp=0.5,
                          domain="lab-b")


def test_pair_by_stem_then_by_order(tmp_path):
    slides = [Path("a/S1.svs"), Path("a/S2.svs")]
    assert pair_annotations(slides, [Path("b/S2.partial.geojson"), Path("b/S1.geojson")]) == [
        (slides[0], Path("b/S1.geojson")), (slides[1], Path("b/S2.partial.geojson"))]
    assert pair_annotations(slides, [Path("x.geojson"), Path("y.geojson")])[1] == (slides[1], Path("y.geojson"))
    with pytest.raises(ConfigError, match="1 files for 2 slides"):
        pair_annotations(slides, [Path("x.geojson")])


def test_sampled_centres_lie_inside_their_regions_and_the_truth_agrees(specimen):
    cfg = load_config(overrides=TINY)
    truth = specimen.slides[0]
    anns, _ = read_annotations(truth.annotations_path, cfg.annotations.name_map)
    labels = read_labels(truth)
    with open_slide(truth.slide_path) as slide:
        l0_per_px = 2.0 / slide.mpp
        centres = region_centres(anns, slide.bounds_offset_l0, l0_per_px, 8.0, 2, 50, np.random.default_rng(0))
    assert len(centres) == len(anns) and all(2 <= len(c) <= 50 for c in centres)
    ds = truth.label_downsample
    for ann, c in zip(anns, centres):
        xy = (c + 0.5) * l0_per_px
        assert shapely.contains_xy(ann.geometry, xy[:, 0], xy[:, 1]).all()
        cls = ["viable_tumor", "necrosis", "fibrosis", "other"].index(ann.class_id) + 1
        agree = labels[(xy[:, 1] // ds).astype(int), (xy[:, 0] // ds).astype(int)] == cls
        assert agree.mean() >= 0.95  # the raster and its polygons differ by at most a px at borders


def _write_geojson(path: Path, features: list[tuple[str, str | None, object]]) -> Path:
    doc = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": shapely.geometry.mapping(g),
         "properties": {"objectType": "annotation", "classification": {"name": cls},
                        **({"name": name} if name else {})}} for cls, name, g in features]}
    path.write_text(json.dumps(doc))
    return path


def test_every_region_gives_tiles_tiny_and_thin_ones_included(specimen, tmp_path):
    # level-0 px at 0.5 µm/px; tiles at 2 µm/px (TINY): a 1 µm square, a sketch 2 µm wide and 200 µm long
    ann = _write_geojson(tmp_path / "a.geojson", [
        ("Viable tumor", "Sheet", shapely.box(400, 400, 1600, 1400)),
        ("Other", "Blood", shapely.box(2000, 2000, 2002, 2002)),
        ("Fibrosis", "Streak", shapely.box(2400, 1001, 2800, 1005)),
        ("Necrosis", None, shapely.Polygon([(3000, 200), (3600, 200), (3000, 260)])),
    ])
    cfg = load_config(overrides=[*TINY, "training.min_tiles_per_region=4"])
    data = load_tileset([(specimen.slides[0].slide_path, ann)], cfg)
    per_region = np.bincount(data.region, minlength=4)
    # the cap; the tiny square repeated to 4; the cap; the wedge (1 lattice point at 16 px) refined to >= 4
    assert per_region.tolist() == [6, 4, 6, 4]
    assert [r.name for r in data.regions] == ["Sheet", "Blood", "Streak", "Necrosis"]
    assert data.labels[data.region == 1].tolist() == [3] * 4 and data.tiles.shape[1:] == (40, 40, 3)
    with open_slide(specimen.slides[0].slide_path) as slide:
        streak = region_centres(read_annotations(ann, cfg.annotations.name_map)[0][2:3], slide.bounds_offset_l0,
                                4.0, 8.0, 4, 1000, np.random.default_rng(0))[0]
    assert streak[:, 1].tolist() == [250] * 100  # the one row of 2 µm px whose centre is inside, every px


def test_epoch_weights_balance_classes_names_and_regions():
    from wsi_response.train_sampling import Region, TileSet

    regions = (Region(0, 3, "Fat"), Region(0, 3, "Fat"), Region(0, 3, "Blood"), Region(1, 0, "Sheet"))
    counts = [16, 4, 1, 10]
    region = np.repeat(np.arange(4), counts)
    data = TileSet(tiles=np.zeros((len(region), 2, 2, 3), np.uint8), labels=np.array([3, 3, 3, 0])[region],
                   region=region, regions=regions, slide_names=("a", "b"), ignored={})
    w = epoch_weights(data)
    per_region = np.array([w[region == r].sum() for r in range(4)])
    # classes 1/2 each; in "other" Fat and Blood 1/4 each; Fat's regions by sqrt(16) : sqrt(4) = 2 : 1
    assert per_region == pytest.approx([1 / 4 * 2 / 3, 1 / 4 * 1 / 3, 1 / 4, 1 / 2])
    assert w[region == 0] == pytest.approx(np.full(16, 1 / 6 / 16))  # tiles of a region equal
    drawn = np.random.default_rng(0).choice(len(w), 40_000, p=w)
    assert np.bincount(region[drawn], minlength=4) / 40_000 == pytest.approx(per_region, abs=0.01)


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
    assert "name_recall" not in m and len(m["warnings"]) == 4


def test_recall_per_annotation_name_and_low_count_warnings():
    true = np.array([3] * 40 + [3] * 10 + [0] * 30)
    pred = np.array([3] * 40 + [2] * 4 + [3] * 6 + [0] * 30)
    names = np.array(["Fat"] * 40 + ["Blood"] * 10 + ["Sheet"] * 30, object)
    m = classification_metrics(true, pred, names)
    assert m["recall"]["other"] == 46 / 50 and m["balanced_accuracy"] == pytest.approx((46 / 50 + 1) / 2)
    assert m["name_recall"] == {"viable_tumor": {"Sheet": 1.0}, "other": {"Blood": 0.6, "Fat": 1.0}}
    assert m["name_support"] == {"viable_tumor": {"Sheet": 30}, "other": {"Blood": 10, "Fat": 40}}
    assert m["warnings"] == ["only 10 validation tiles of other / Blood (< 30): its recall is not to be trusted"]


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
    # stain normalisation (the default): the model says so, the report holds every slide's estimate
    assert loaded.stain_normalisation == "macenko"
    assert set(report["stains"]) == {p.name for p in slides}
    assert all(st["method"] == "macenko" and len(st["stain_od"]) == 2 for st in report["stains"].values())
    data = load_tileset(list(zip(slides, anns)), cfg)
    val_index = [i for i, n in enumerate(data.slide_names) if n in trained_on["val_slides"]]
    assert data.subset(np.array(val_index)).class_counts() == trained_on["val_tiles_per_class"]


def test_best_epoch_on_validation_is_the_one_saved(named_specimen, tmp_path):
    from wsi_response.augment import centre_crop
    from wsi_response.classifier import load_classifier
    from wsi_response.train import predict_tiles

    s = named_specimen.slides
    cfg = load_config(overrides=[*TINY, "training.epochs=3", "training.val_split=0.5", "training.seed=1",
                                 "training.learning_rate=0.02", "training.min_tiles_per_region=1",
                                 "training.max_tiles_per_region=3",
                                 # raw tiles: the seed was chosen for a peak before the last epoch
                                 "training.stain_normalisation=false"])
    result = train_classifier([x.slide_path for x in s], [x.annotations_path for x in s],
                              tmp_path / "m.safetensors", cfg, device="cpu")
    history, metrics = result.report["history"], result.report["metrics"]
    scores = [h["val_balanced_accuracy"] for h in history]
    assert metrics["best_epoch"] == 1 + int(np.argmax(scores)) != len(scores)  # this seed peaks before the end
    assert metrics["val"]["balanced_accuracy"] == max(scores)
    # the file holds that epoch's weights: scoring the validation tiles again gives the same number
    clf = load_classifier(tmp_path / "m.safetensors")
    assert clf.metrics["best_epoch"] == metrics["best_epoch"]
    data = load_tileset([(x.slide_path, x.annotations_path) for x in s], cfg)
    val = data.subset(np.array([data.slide_names.index(n) for n in clf.trained_on["val_slides"]]))
    pred = predict_tiles(clf, centre_crop(val.tiles, 32), torch.device("cpu")).argmax(axis=1)
    assert classification_metrics(val.labels, pred)["balanced_accuracy"] == max(scores)
    # recall per annotation name (sub-types), and warnings where few validation tiles carry it
    val_metrics = metrics["val"]
    assert val_metrics["name_support"] == {c: n for c, n in val.name_counts().items() if n}
    assert set(val_metrics["name_recall"]["other"]) == set(val.name_counts()["other"])
    few = [f"{c} / {n}" for c, names in val.name_counts().items() for n, k in names.items() if k < 30]
    assert few and [w.split(" tiles of ")[1].split(" (<")[0] for w in val_metrics["warnings"]
                    if " / " in w] == few


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


def test_augmentation_is_sane(specimen):
    from wsi_response.augment import (
        augment, centre_crop, colour_jitter, gaussian_blur, hed_jitter, jpeg_recompress, scale_crop,
    )
    from wsi_response.classifier import to_unit_float

    s = specimen.slides[0]
    cfg = load_config(overrides=TINY)
    data = load_tileset([(s.slide_path, s.annotations_path)], cfg)
    ctx = to_unit_float(torch.from_numpy(data.tiles))
    x = to_unit_float(torch.from_numpy(np.ascontiguousarray(centre_crop(data.tiles, 32))))
    gen = torch.Generator().manual_seed(0)
    assert torch.allclose(scale_crop(ctx, 32, 0.0, gen), x, atol=1e-5)  # no jitter: the centre crop
    assert float((hed_jitter(x.clone(), 0.0, gen) - x).abs().mean()) < 2 / 255  # HED round trip ~ identity
    assert torch.allclose(colour_jitter(x.clone(), 0.0, gen), x, atol=1e-5)
    assert torch.allclose(gaussian_blur(x, 1e-9, gen), x, atol=1e-6)
    blurred = gaussian_blur(x, 2.0, gen)
    sharpness = (blurred[:, :, 1:] - blurred[:, :, :-1]).abs().mean(dim=(1, 2, 3))
    assert (sharpness < (x[:, :, 1:] - x[:, :, :-1]).abs().mean(dim=(1, 2, 3)) - 1e-3).float().mean() > 0.25
    rng = np.random.default_rng(0)
    jpeg = jpeg_recompress(data.tiles, 60, rng)
    changed = (jpeg != data.tiles).any(axis=(1, 2, 3))
    assert 0.2 < changed.mean() < 0.8 and np.abs(jpeg.astype(int) - data.tiles).mean() < 6
    y = augment(data.tiles, 32, 2.0, cfg.training, rng, gen, torch.device("cpu"))
    assert y.shape == (len(data.tiles), 3, 32, 32) and y.min() >= 0 and y.max() <= 1
    change = (y.mean(dim=(2, 3)) - x.mean(dim=(2, 3))).abs().mean(dim=1) * 255  # colour, not geometry
    assert float(change.max()) < 60 and float(change.mean()) > 1


def test_cli_pretrained_offline_fails_in_one_line(specimen, tmp_path):
    s = specimen.slides[0]
    cmd = [sys.executable, "-m", "wsi_response.cli", "train", "--slides", str(s.slide_path), "--annotations",
           str(s.annotations_path), "--out", str(tmp_path / "m.safetensors"), "--val-split", "0", "--quiet",
           "--device", "cpu", "--pretrained", *TINY]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # what a machine without network meets, without the retries
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr == ("wsi-response: error: timm:resnet10t: --pretrained: cannot download the published weights "
                          "and none are cached (LocalEntryNotFoundError: offline or hub unreachable); run once where "
                          "the Hugging Face hub is reachable (they are cached), or pass a local file with "
                          "--weights PATH\n")
    run = subprocess.run([*cmd, "--weights", str(tmp_path / "w.safetensors")], capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 2 and run.stderr == ("wsi-response: error: --pretrained and --weights: give one "
                                                  "(timm's published weights, or a local file)\n")
