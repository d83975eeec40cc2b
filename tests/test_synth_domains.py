"""Synthetic-slide domains: the default unchanged, new domains open, exact truth per sub-type,
domains that differ in colour and texture, determinism."""
from __future__ import annotations

import hashlib
import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
from shapely.geometry import shape

from wsi_response import synth
from wsi_response.classes import CLASSES, QUPATH_NAMES
from wsi_response.synth_domains import DOMAINS
from wsi_response.synth_textures import SUBTYPE_BY_NAME, SUBTYPES

SIZE = (2000, 1500)
MPP = 0.5
NEW = [d for d in DOMAINS if d != "default"]

# sha256 of the files written by the generator before domains existed (commit 68ccc2f):
# synth_slide(a.svs, size_px=(2000, 1500), mpp=0.25, seed=3, viable_fraction=0.4)
BEFORE_DOMAINS = {
    "a.svs": "b755097f1ae32451800d9aca2eb3e5009f66ed8cf9b140854004cbdbd3514b2d",
    "a.labels.png": "380beb9be9d12ff8dc5c1b2bfcbbe32ad564f4b9851fdbc6b2c526e83370aeb1",
    "a.annotations.geojson": "270942fdcd3c517035f7437d39e4ee3cdddc916a26d8705ad8109307e8b1c604",
    "a.partial.geojson": "7d09e532fc380630caac6b4b1b5174a7a9f7a308f6544bcb79eefb97b1e12306",
    "a.truth.json": "ecd765c0c01204ef93e0d6f88c7d2c61ad861d5fbea1008950339609a6af9827",
}


def test_default_domain_writes_the_same_bytes_as_before(tmp_path):
    synth.synth_slide(tmp_path / "a.svs", size_px=(2000, 1500), mpp=0.25, seed=3,
                      viable_fraction=0.4, domain="default")
    got = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.iterdir()}
    assert got == BEFORE_DOMAINS


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> dict[str, synth.SlideTruth]:
    out = tmp_path_factory.mktemp("domains")
    return {d: synth.synth_slide(out / d / "s.svs", size_px=SIZE, mpp=MPP, seed=21,
                                 viable_fraction=0.5, domain=d) for d in DOMAINS}


@pytest.mark.parametrize("domain", list(DOMAINS))
def test_every_domain_opens_with_openslide(domain, slides):
    import openslide

    t = slides[domain]
    s = openslide.OpenSlide(str(t.slide_path))
    assert s.properties["openslide.vendor"] == "aperio"
    assert s.dimensions == SIZE
    assert float(s.properties["openslide.mpp-x"]) == pytest.approx(MPP)
    assert f"Q={DOMAINS[domain].jpeg_quality}|" in s.properties["tiff.ImageDescription"]
    assert np.asarray(s.read_region((0, 0), 1, s.level_dimensions[1])).shape == (375, 500, 4)


@pytest.mark.parametrize("domain", list(DOMAINS))
def test_truth_areas_are_exact_raster_counts(domain, slides):
    t = slides[domain]
    labels = synth.read_labels(t)
    sub = synth.read_subtypes(t)
    px_mm2 = (t.label_downsample * t.mpp / 1000) ** 2
    for i, c in enumerate(CLASSES):
        assert t.areas_mm2[c] == np.count_nonzero(labels == i + 1) * px_mm2
    assert t.domain == domain
    if domain == "default":
        assert t.subtypes_path is None and t.subtype_areas_mm2 == {}
        assert np.array_equal(sub, labels)
        return
    assert sub.shape == labels.shape
    class_of = np.array([0] + [1 + CLASSES.index(s.cls) for s in SUBTYPES], np.uint8)
    assert np.array_equal(class_of[sub], labels)  # every sub-type pixel lies in its class
    named = {n for per in t.subtype_areas_mm2.values() for n in per}
    assert named == {s.name for s in SUBTYPES if (sub == s.tid).any()}
    for c in CLASSES:
        for name, area in t.subtype_areas_mm2[c].items():
            st = SUBTYPE_BY_NAME[name]
            assert st.cls == c
            assert area == np.count_nonzero(sub == st.tid) * px_mm2 > 0
        assert sum(t.subtype_areas_mm2[c].values()) == pytest.approx(t.areas_mm2[c], rel=1e-12)
    # every sub-type of the domain is drawn on this 1 x 0.75 mm slide
    assert named == {n for n, _ in DOMAINS[domain].subtypes}


@pytest.mark.parametrize("domain", NEW)
def test_annotations_name_the_subtype_and_classify_the_class(domain, slides):
    t = slides[domain]
    names = {v: k for k, v in QUPATH_NAMES.items()}
    per_name: dict[str, float] = {}
    for f in json.loads(t.annotations_path.read_text())["features"]:
        p = f["properties"]
        st = SUBTYPE_BY_NAME[p["name"]]
        assert names[p["classification"]["name"]] == st.cls
        per_name[p["name"]] = per_name.get(p["name"], 0.0) + shape(f["geometry"]).area
    l0_mm2 = (t.mpp / 1000) ** 2
    truth = {n: a for per in t.subtype_areas_mm2.values() for n, a in per.items()}
    assert set(per_name) == set(truth)
    for n, a in truth.items():
        assert per_name[n] * l0_mm2 == pytest.approx(a, rel=1e-6)
    for f in json.loads(t.partial_annotations_path.read_text())["features"]:
        assert f["properties"]["name"] in truth


def _class_od(t: synth.SlideTruth) -> dict[int, np.ndarray]:
    """Mean optical density (R, G, B) of each class's label-pixel interiors, at level 0."""
    import openslide
    from scipy.ndimage import binary_erosion

    s = openslide.OpenSlide(str(t.slide_path))
    img = np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"), dtype=np.float32)
    od = -np.log10(np.maximum(img, 1.0) / 255.0)
    d = int(t.label_downsample)
    labels = synth.read_labels(t)
    h, w = (img.shape[0] // d) * d, (img.shape[1] // d) * d
    means = od[:h, :w].reshape(h // d, d, w // d, d, 3).mean(axis=(1, 3))
    labels = labels[: h // d, : w // d]
    return {v: means[binary_erosion(labels == v, np.ones((3, 3), bool))].mean(axis=0)
            for v in range(5)}


def test_domains_differ_in_colour(slides):
    od = {d: _class_od(t) for d, t in slides.items()}
    # glass: the default is neutral 240 grey; lab-b warm (blue absorbed), lab-c cool (red)
    assert np.ptp(od["default"][0]) < 0.003
    assert od["lab-b"][0][2] - od["lab-b"][0][0] > 0.01
    assert od["lab-c"][0][0] - od["lab-c"][0][2] > 0.01
    viable = {d: od[d][1] for d in DOMAINS}
    # viable tumor's mean OD differs between every pair of domains by more than 0.05 (L2 over
    # R, G, B; 0.09-0.25 measured) and in hue, the OD vector's direction, by more than 4 degrees
    # (5.8-12.2 measured)
    for a, b in itertools.combinations(DOMAINS, 2):
        x, y = viable[a], viable[b]
        degrees = np.degrees(np.arccos(np.dot(x, y) / np.linalg.norm(x) / np.linalg.norm(y)))
        assert np.linalg.norm(x - y) > 0.05 and degrees > 4.0, (a, b, x, y)


@pytest.mark.parametrize("domain", NEW)
def test_same_seed_same_bytes_other_seed_other_jitter(domain, tmp_path):
    kw = dict(size_px=(1200, 900), mpp=0.5, domain=domain)
    a = synth.synth_slide(tmp_path / "x" / "s.svs", seed=11, **kw)
    b = synth.synth_slide(tmp_path / "y" / "s.svs", seed=11, **kw)
    c = synth.synth_slide(tmp_path / "z" / "s.svs", seed=12, **kw)
    for attr in ("slide_path", "label_path", "subtypes_path", "annotations_path",
                 "partial_annotations_path", "truth_path"):
        assert getattr(a, attr).read_bytes() == getattr(b, attr).read_bytes(), attr
    ja, jc = (json.loads(t.truth_path.read_text())["scanner"] for t in (a, c))
    assert ja["stain_od"] != jc["stain_od"] and ja["white_rgb"] != jc["white_rgb"]


def test_specimen_sums_subtypes_and_unknown_domain_is_refused(tmp_path):
    spec = synth.synth_specimen(tmp_path, "S", 2, seed=2, size_px=(1000, 800), mpp=0.5,
                                domain="lab-b")
    doc = json.loads(spec.truth_path.read_text())
    assert doc["domain"] == "lab-b"
    for c in CLASSES:
        for name, area in doc["subtype_areas_mm2"][c].items():
            assert area == pytest.approx(sum(s.subtype_areas_mm2[c].get(name, 0.0)
                                             for s in spec.slides))
    with pytest.raises(ValueError, match=r"^unknown domain 'lab-z'; choose from default, "
                                         r"lab-b, lab-c, random$"):
        synth.synth_slide(tmp_path / "z.svs", domain="lab-z")


def test_cli_domain_option(tmp_path):
    cmd = [sys.executable, "-m", "wsi_response.cli", "synth", "--out", str(tmp_path),
           "--specimen", "S", "--slides", "1", "--size", "600x400", "--mpp", "0.5"]
    ok = subprocess.run(cmd + ["--domain", "lab-c"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert json.loads((tmp_path / "S" / "S_1.truth.json").read_text())["domain"] == "lab-c"
    bad = subprocess.run(cmd + ["--domain", "lab-z"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr == ("wsi-response: error: argument --domain: invalid choice: 'lab-z' (choose from "
                          "'default', 'lab-b', 'lab-c', 'random') (see `wsi-response synth --help`)\n")


def test_random_domain_draws_its_own_setting_per_slide(tmp_path):
    from wsi_response.synth_domains import RANDOM, resolve_domain

    drawn = [resolve_domain(RANDOM, seed) for seed in range(40)]
    assert resolve_domain(RANDOM, 7) == drawn[7]  # the seed fixes the draw
    nuc = np.array([d.nuc_scale for d in drawn])
    density = np.array([d.density for d in drawn])
    assert 0.8 <= nuc.min() and nuc.max() <= 1.3 and nuc.max() - nuc.min() > 0.3
    assert 0.7 <= density.min() and density.max() <= 1.3 and density.max() - density.min() > 0.4
    for name in ("lab-b", "lab-c"):  # the ranges hold the named domains' values
        assert 0.8 <= DOMAINS[name].nuc_scale <= 1.3 and 0.7 <= DOMAINS[name].density <= 1.3
    assert {n for n, _ in drawn[0].subtypes} == {s.name for s in SUBTYPES}
    main = {max((w, n) for n, w in d.subtypes if SUBTYPE_BY_NAME[n].cls == "viable_tumor")[1] for d in drawn}
    assert len(main) == 4  # every viable sub-type is the main one of some slide
    assert sum(d.blur_um > 0 for d in drawn) and sum(d.sharpen > 0 for d in drawn)

    a = synth.synth_slide(tmp_path / "r1.svs", size_px=SIZE, mpp=MPP, seed=5, domain=RANDOM)
    b = synth.synth_slide(tmp_path / "r2.svs", size_px=SIZE, mpp=MPP, seed=6, domain=RANDOM)
    docs = [json.loads(t.truth_path.read_text()) for t in (a, b)]
    assert [d["domain"] for d in docs] == [RANDOM, RANDOM]
    assert docs[0]["morphology"] == {"nuc_scale": round(resolve_domain(RANDOM, 5).nuc_scale, 4),
                                     "density": round(resolve_domain(RANDOM, 5).density, 4)}
    assert docs[0]["scanner"] != docs[1]["scanner"] and docs[0]["morphology"] != docs[1]["morphology"]
    with pytest.raises(ValueError, match="choose from default, lab-b, lab-c, random"):
        synth.synth_slide(tmp_path / "x.svs", size_px=SIZE, mpp=MPP, domain="lab-z")
