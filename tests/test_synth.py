"""Synthetic slides: real formats, exact truth, annotations, determinism, bounded memory."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import shapely
from shapely.geometry import shape

from wsi_response import synth
from wsi_response.classes import CLASSES, QUPATH_NAMES

SIZE = (3000, 2000)
MPP = 0.25


@pytest.fixture(scope="module")
def svs(tmp_path_factory) -> synth.SlideTruth:
    out = tmp_path_factory.mktemp("svs")
    return synth.synth_slide(out / "a.svs", size_px=SIZE, mpp=MPP, seed=3, viable_fraction=0.4)


@pytest.fixture(scope="module")
def tiff(tmp_path_factory) -> synth.SlideTruth:
    out = tmp_path_factory.mktemp("tiff")
    return synth.synth_slide(out / "b.tiff", size_px=SIZE, mpp=0.5, seed=4, fmt="tiff")


def test_files_written_beside_slide(svs):
    d = svs.slide_path.parent
    names = sorted(p.name for p in d.iterdir())
    assert names == ["a.annotations.geojson", "a.labels.png", "a.partial.geojson", "a.svs",
                     "a.truth.json"]
    assert synth.load_slide_truth(svs.truth_path) == svs


def test_svs_opens_as_aperio_with_levels(svs):
    import openslide

    s = openslide.OpenSlide(str(svs.slide_path))
    assert s.properties["openslide.vendor"] == "aperio"
    assert float(s.properties["openslide.mpp-x"]) == pytest.approx(MPP)
    assert float(s.properties["openslide.mpp-y"]) == pytest.approx(MPP)
    assert s.properties["openslide.objective-power"] == "40"
    assert s.dimensions == SIZE
    assert s.level_downsamples == pytest.approx((1.0, 4.0))
    assert s.level_dimensions[1] == (750, 500)


def test_tiff_mpp_only_in_resolution_tags(tiff):
    import openslide
    import tifffile
    import tiffslide

    with tifffile.TiffFile(tiff.slide_path) as tf:
        page = tf.pages[0]
        assert "ImageDescription" not in page.tags
        assert page.tags["ResolutionUnit"].value == 3  # CENTIMETER
        num, den = page.tags["XResolution"].value
        assert 1e4 / (num / den) == pytest.approx(0.5)
        assert page.is_tiled and page.compression == 7 and page.photometric == 6  # JPEG YCbCr
    s = openslide.OpenSlide(str(tiff.slide_path))
    assert s.properties["openslide.vendor"] == "generic-tiff"
    assert not any(k.startswith("aperio.") for k in s.properties)
    # OpenSlide 4 derives openslide.mpp-x from the TIFF resolution tags
    assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.5)
    assert s.level_downsamples == pytest.approx((1.0, 4.0))
    t = tiffslide.TiffSlide(str(tiff.slide_path))
    assert t.properties["tiffslide.mpp-x"] == pytest.approx(0.5)
    assert t.level_count == 2


@pytest.mark.parametrize("which", ["svs", "tiff"])
def test_openslide_and_tiffslide_pixels_agree(which, svs, tiff):
    import openslide
    import tiffslide

    truth = svs if which == "svs" else tiff
    a = openslide.OpenSlide(str(truth.slide_path))
    b = tiffslide.TiffSlide(str(truth.slide_path))
    assert b.level_count == a.level_count
    for lvl in range(a.level_count):
        w, h = a.level_dimensions[lvl]
        f = round(a.level_downsamples[lvl])
        loc = (w // 4 * f, h // 4 * f)  # a whole level-lvl pixel: no sub-pixel resampling
        size = (min(w // 2, 1024), min(h // 2, 1024))
        ra = np.asarray(a.read_region(loc, lvl, size).convert("RGB"), dtype=np.float32)
        rb = np.asarray(b.read_region(loc, lvl, size).convert("RGB"), dtype=np.float32)
        assert np.abs(ra - rb).mean() <= 1.0


def test_truth_areas_are_label_counts(svs):
    labels = synth.read_labels(svs)
    ds = svs.label_downsample
    assert labels.dtype == np.uint8
    assert labels.shape == (math.ceil(SIZE[1] / ds), math.ceil(SIZE[0] / ds))
    px_mm2 = (ds * svs.mpp / 1000) ** 2
    for i, c in enumerate(CLASSES):
        assert svs.areas_mm2[c] == pytest.approx(np.count_nonzero(labels == i + 1) * px_mm2)
    assert sum(svs.areas_mm2.values()) == pytest.approx(svs.tissue_area_mm2)
    assert svs.tissue_area_mm2 == pytest.approx(np.count_nonzero(labels) * px_mm2)
    slide_mm2 = SIZE[0] * SIZE[1] * (svs.mpp / 1000) ** 2
    assert 0.3 <= svs.tissue_area_mm2 / slide_mm2 <= 0.6
    assert all(svs.areas_mm2[c] > 0 for c in CLASSES)
    # tissue never touches the slide edge: every label pixel with tissue is inside the slide
    assert not labels[-1].any() and not labels[:, -1].any()


def test_viable_fraction_respected(svs):
    doc = json.loads(svs.truth_path.read_text())
    assert svs.viable_percent == pytest.approx(doc["viable_percent"])
    assert svs.viable_percent == pytest.approx(40.0, abs=2.0)


def test_annotations_match_truth(svs):
    doc = json.loads(svs.annotations_path.read_text())
    assert doc["type"] == "FeatureCollection"
    per_class = {c: 0.0 for c in CLASSES}
    names = {v: k for k, v in QUPATH_NAMES.items()}
    for f in doc["features"]:
        p = f["properties"]
        assert p["objectType"] == "annotation" and p["isLocked"] is False
        assert len(p["classification"]["color"]) == 3
        g = shape(f["geometry"])
        assert g.geom_type in ("Polygon", "MultiPolygon") and g.is_valid
        per_class[names[p["classification"]["name"]]] += g.area
    l0_mm2 = (svs.mpp / 1000) ** 2
    for c in CLASSES:
        assert per_class[c] * l0_mm2 == pytest.approx(svs.areas_mm2[c], rel=0.01)


def test_partial_annotations_stay_inside_eroded_regions(tiff):
    svs = tiff  # 1.5 x 1 mm: regions large enough to erode by 50 µm
    full = json.loads(svs.annotations_path.read_text())["features"]
    part = json.loads(svs.partial_annotations_path.read_text())["features"]
    assert part
    by_name: dict[str, list] = {}
    for f in full:
        by_name.setdefault(f["properties"]["classification"]["name"], []).append(
            shape(f["geometry"]))
    margin_px = 50 / svs.mpp
    total_full = sum(shape(f["geometry"]).area for f in full)
    total_part = 0.0
    for f in part:
        g = shape(f["geometry"])
        assert g.is_valid and g.area > 0
        region = shapely.union_all(by_name[f["properties"]["classification"]["name"]])
        core = region.buffer(-(margin_px - 1))
        assert core.contains(g)
        total_part += g.area
    assert total_part < 0.5 * total_full


def test_same_seed_same_bytes_different_seed_differs(tmp_path):
    kw = dict(size_px=(1200, 900), mpp=0.5)
    a = synth.synth_slide(tmp_path / "x" / "s.svs", seed=11, **kw)
    b = synth.synth_slide(tmp_path / "y" / "s.svs", seed=11, **kw)
    c = synth.synth_slide(tmp_path / "z" / "s.svs", seed=12, **kw)
    for attr in ("slide_path", "label_path", "annotations_path", "partial_annotations_path",
                 "truth_path"):
        assert getattr(a, attr).read_bytes() == getattr(b, attr).read_bytes(), attr
    assert a.slide_path.read_bytes() != c.slide_path.read_bytes()
    assert a.areas_mm2 != c.areas_mm2


def test_specimen_layout_and_totals(tmp_path):
    spec = synth.synth_specimen(tmp_path, "S-1", 2, seed=5, size_px=(1400, 1000), mpp=0.5,
                                viable_fraction=0.7)
    folder = tmp_path / "S-1"
    assert spec.truth_path == folder / "specimen.truth.json"
    assert [s.slide_path.name for s in spec.slides] == ["S-1_1.svs", "S-1_2.svs"]
    assert all(s.truth_path.exists() and s.label_path.exists() for s in spec.slides)
    for s in spec.slides:
        assert s.viable_percent == pytest.approx(70.0, abs=3.0)
    for c in CLASSES:
        assert spec.areas_mm2[c] == pytest.approx(sum(s.areas_mm2[c] for s in spec.slides))
    assert spec.tissue_area_mm2 == pytest.approx(sum(spec.areas_mm2.values()))
    bed = sum(spec.areas_mm2[c] for c in ("viable_tumor", "necrosis", "fibrosis"))
    assert spec.viable_percent == pytest.approx(100 * spec.areas_mm2["viable_tumor"] / bed)
    assert synth.load_specimen_truth(spec.truth_path) == spec
    assert spec.slides[0].slide_path.read_bytes() != spec.slides[1].slide_path.read_bytes()


def _label_pixel_means(truth: synth.SlideTruth) -> tuple[np.ndarray, np.ndarray]:
    """Mean RGB of each label pixel's level-0 block (read at level 0) and the labels."""
    import openslide

    s = openslide.OpenSlide(str(truth.slide_path))
    img = np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"), dtype=np.float32)
    labels = synth.read_labels(truth)
    d = int(truth.label_downsample)
    h, w = (img.shape[0] // d) * d, (img.shape[1] // d) * d
    means = img[:h, :w].reshape(h // d, d, w // d, d, 3).mean(axis=(1, 3))
    return means, labels[: h // d, : w // d]


def test_class_colours_and_tissue_contrast(svs):
    means, labels = _label_pixel_means(svs)
    from scipy.ndimage import binary_erosion

    interior = {}
    for v in range(5):
        m = binary_erosion(labels == v, np.ones((3, 3), bool))
        interior[v] = means[m]
    glass = interior[0]
    assert glass.mean() == pytest.approx(240, abs=3)
    grey = {v: interior[v].mean(axis=1) for v in range(5)}
    viable, necrosis, fibrosis = 1, 2, 3
    # viable tumor: darker and more haematoxylin (blue over red) than necrosis and fibrosis
    assert grey[viable].mean() < grey[necrosis].mean() - 10
    blue_minus_red = {v: (interior[v][:, 2] - interior[v][:, 0]).mean() for v in range(1, 5)}
    assert blue_minus_red[viable] > blue_minus_red[necrosis] + 5
    assert blue_minus_red[viable] > blue_minus_red[fibrosis] + 5
    # every tissue label pixel stands out from glass at 4 µm/px (pale fat included)
    def is_tissue(rgb):
        return (rgb.max(axis=-1) - rgb.min(axis=-1) > 12) | (rgb.mean(axis=-1) < 225)

    assert is_tissue(glass).mean() < 0.005
    tissue_px = means[labels > 0]
    assert is_tissue(tissue_px).mean() > 0.98


@pytest.mark.skipif(not os.environ.get("WSI_RESPONSE_SLOW"),
                    reason="~40 s; set WSI_RESPONSE_SLOW=1 (or run benchmarks/synth_memory.py)")
def test_level0_never_held_in_memory(tmp_path):
    """A 20000 x 15000 slide (900 MB as one RGB array) is written with far less memory."""
    code = textwrap.dedent(f"""
        import resource, sys, time
        from wsi_response import synth
        t = time.perf_counter()
        synth.synth_slide({str(tmp_path / 'big.svs')!r}, size_px=(20000, 15000), seed=1)
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(rss_mb, time.perf_counter() - t)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1])
    rss_mb, seconds = map(float, out.stdout.split())
    assert rss_mb < 450, f"peak RSS {rss_mb:.0f} MB for a 900 MB level 0"
