"""Inputs the model cannot judge are refused, never scored: each case with its exact exit code and line.

Non-RGB images (greyscale, grey + alpha, palette, CMYK, multi-channel), anisotropic pixels, MPP
metadata that is not a usable number, an ``--mpp`` that disagrees with the slide's own (exit 2:
``--force-mpp`` overrides), an MPP that would make a stage up-sample into more memory than
``MAX_ARRAY_BYTES``, and models whose outputs cannot be numbers (NaN/inf weights, bad
normalisation metadata, non-finite probabilities at inference). Every slide is a small tiled
pyramid written here with tifffile.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from _batch_data import cli as cli_subprocess
from wsi_response import cli
from wsi_response.classes import CLASSES
from wsi_response.classifier import IMAGENET_MEAN, IMAGENET_STD, Classifier, build_model, load_classifier, \
    save_classifier
from wsi_response.config import Config
from wsi_response.errors import ModelError
from wsi_response.footprint import largest_arrays
from wsi_response.slide import Level, Slide, open_slide

RUN = ["--device", "cpu", "--quiet", "inference.num_workers=0"]
CM = "CENTIMETER"
NOT_RGB = ", not RGB colour: the model judges the colours of RGB brightfield (H&E) slides and cannot score it"


def _tissue(size: int = 512) -> np.ndarray:
    rgb = np.full((size, size, 3), 235, np.uint8)
    rgb[size // 6:size - size // 6, size // 6:size - size // 6] = (170, 70, 150)
    return rgb


def _pyramid(path: Path, image: np.ndarray, resolution: tuple[Any, Any] = (1e4, 1e4), **kw: Any) -> Path:
    """``image`` (``[y, x(, s)]``, or ``[s, y, x]`` with planarconfig separate) as a tiled two-level
    pyramid (level 1 in a SubIFD) with resolution tags (default 1 µm/px)."""
    half = image[:, ::2, ::2] if kw.get("planarconfig") == "separate" else image[::2, ::2]
    with tifffile.TiffWriter(path) as tw:
        tw.write(image, tile=(256, 256), subifds=1, resolution=resolution, resolutionunit=CM, **kw)
        tw.write(half, tile=(256, 256), subfiletype=1, **kw)
    return path


@dataclass(frozen=True)
class Case:
    path: Path
    problem: str   # the exact text after "<path>: "


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from wsi_response.synth import synth_slide

    folder = tmp_path_factory.mktemp("refuse") / "slides ü"
    folder.mkdir()
    rgb = _tissue()
    grey = rgb[..., 1]
    out: dict[str, Any] = {"folder": folder}
    out["rgb"] = _pyramid(folder / "rgb.tif", rgb, photometric="rgb")
    out["ycbcr"] = _pyramid(folder / "ycbcr.tif", rgb, photometric="rgb", compression="jpeg")  # stored as YCbCr
    out["nearly square"] = _pyramid(folder / "nearly square.tif", rgb, (1e4, 1e4 / 1.005), photometric="rgb")
    out["no mpp"] = folder / "no mpp.tif"
    with tifffile.TiffWriter(out["no mpp"]) as tw:
        tw.write(rgb, tile=(256, 256), photometric="rgb")
    cases = {
        "grey": Case(_pyramid(folder / "grey.tif", grey, photometric="minisblack"),
                     "level 0 holds greyscale (1 sample per pixel)" + NOT_RGB),
        "grey alpha": Case(_pyramid(folder / "grey alpha.tif", np.stack([grey, np.full_like(grey, 255)], -1),
                                    photometric="minisblack", extrasamples=["unassalpha"]),
                           "level 0 holds greyscale with alpha (2 samples per pixel)" + NOT_RGB),
        "palette": Case(_pyramid(folder / "palette.tif", grey, photometric="palette",
                                 colormap=np.tile(np.arange(256, dtype=np.uint16) * 257, (3, 1))),
                        "level 0 holds palette (indexed) colour" + NOT_RGB),
        "cmyk": Case(_pyramid(folder / "cmyk.tif", np.concatenate([255 - rgb, np.zeros_like(grey)[..., None]], -1),
                              photometric="separated"),
                     "level 0 holds CMYK (photometric SEPARATED)" + NOT_RGB),
        "fluorescence": Case(_pyramid(folder / "fluorescence.tif", np.stack([grey] * 5), photometric="minisblack",
                                      planarconfig="separate"),
                             "level 0 holds 5 separate channels (a multi-channel, fluorescence-like image)" + NOT_RGB),
        "rgb plus two": Case(_pyramid(folder / "rgb plus two.tif", np.concatenate([rgb, rgb[..., :2]], -1),
                                      photometric="rgb", extrasamples=["unspecified", "unspecified"]),
                             "level 0 holds 5 samples per pixel (RGB and 2 that are not an alpha channel)" + NOT_RGB),
        "anisotropic": Case(_pyramid(folder / "anisotropic.tif", rgb, (1e4, 0.5e4), photometric="rgb"),
                            "anisotropic pixels: 1 µm/px wide but 2 µm/px high (TIFF resolution tags; more than 1% "
                            "apart); wsi-response measures square pixels; if the file is wrong, pass --force-mpp UM"),
        "zero resolution": Case(_pyramid(folder / "zero resolution.tif", rgb, ((0, 1), (0, 1)), photometric="rgb"),
                                "unusable microns-per-pixel in the file (TIFF XResolution = 0 px per centimeter: not "
                                "positive); pass --mpp UM"),
        "100 um": Case(_pyramid(folder / "100 um.tif", rgb, (100, 100), photometric="rgb"),
                       "unusable microns-per-pixel in the file (TIFF XResolution = 100 px per centimeter (100 µm/px): "
                       "outside the plausible range 0.05-20 µm/px); pass --mpp UM"),
    }
    good = synth_slide(folder / "aperio.svs", size_px=(512, 512), mpp=1.0, seed=2).slide_path
    out["aperio"] = good
    data = good.read_bytes()
    for value, problem in (("abc", "aperio.MPP = 'abc': not a number"), ("", "aperio.MPP = '': not a number"),
                           ("-0.5", "openslide.mpp-x = '-0.5': not positive"),
                           ("0", "openslide.mpp-x = '0': not positive"), ("inf", "openslide.mpp-x = 'inf': not finite"),
                           ("nan", "aperio.MPP = 'nan': not finite"), ("1e400", "aperio.MPP = '1e400': not finite"),
                           ("25", "openslide.mpp-x = '25': outside the plausible range 0.05-20 µm/px")):
        path = folder / f"aperio mpp {value or 'blank'}.svs"
        path.write_bytes(data.replace(b"MPP = 1.0000", f"MPP = {value}".encode().ljust(12)))
        cases[f"aperio {value}"] = Case(path, f"unusable microns-per-pixel in the file ({problem}); pass --mpp UM")
    out["cases"] = cases
    return out


# --------------------------------------------------------------------------- slides refused at open


def test_info_refuses_each_case_in_one_line(slides: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    for name, case in slides["cases"].items():
        assert cli.main(["info", str(case.path)]) == 1, name
        captured = capsys.readouterr()
        assert captured.err == f"wsi-response: error: {case.path}: {case.problem}\n", name
        assert captured.out == ""


def test_rgb_ycbcr_and_nearly_square_pixels_are_accepted(slides: dict[str, Any]) -> None:
    with tifffile.TiffFile(slides["ycbcr"]) as tif:
        assert tif.pages[0].photometric == tifffile.PHOTOMETRIC.YCBCR and len(tif.series[0].levels) == 2
    for key in ("rgb", "ycbcr", "aperio"):
        for backend in ("openslide", "tiffslide"):
            slide = open_slide(slides[key], backend=backend)
            assert slide.mpp == pytest.approx(1.0), (key, backend)
            if key != "aperio":  # the synthetic H&E has its own texture
                assert slide.read_level(0, (256, 256), (1, 1))[0, 0].tolist() == pytest.approx([170, 70, 150], abs=3)
    slide = open_slide(slides["nearly square"])  # 0.5 % apart: within the tolerance, mpp-x is used
    assert (slide.mpp, slide.mpp_source) == (1.0, "tiff-resolution")


def test_metadata_mpp_problems_are_the_same_through_tiffslide(slides: dict[str, Any]) -> None:
    from wsi_response.errors import MissingMppError

    with pytest.raises(MissingMppError) as err:
        open_slide(slides["cases"]["aperio abc"].path, backend="tiffslide")
    assert str(err.value).endswith("(tiffslide.mpp-x = 'abc': not a number); pass --mpp UM")


def test_a_broken_own_mpp_counts_as_none_and_mpp_stands_in(slides: dict[str, Any],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("aperio abc", "aperio nan", "zero resolution"):
        assert cli.main(["info", str(slides["cases"][name].path), "--mpp", "0.5", "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert (info["mpp"], info["mpp_source"]) == (0.5, "override"), name
    # --mpp does not make anisotropic pixels square; only --force-mpp replaces the file's MPP
    aniso = slides["cases"]["anisotropic"]
    assert cli.main(["info", str(aniso.path), "--mpp", "1"]) == 1
    assert capsys.readouterr().err == f"wsi-response: error: {aniso.path}: {aniso.problem}\n"
    assert cli.main(["info", str(aniso.path), "--force-mpp", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mpp_source"] == "override"


# --------------------------------------------------------------------------- --mpp and --force-mpp


def test_info_mpp_must_agree_with_the_slides_own(slides: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    path = slides["aperio"]
    assert cli.main(["info", str(path), "--mpp", "0.5"]) == 2
    assert capsys.readouterr().err == (
        f"wsi-response: error: {path}: --mpp 0.5 disagrees with the slide's own MPP 1 µm/px (vendor metadata; more "
        "than 1% apart); to measure it at 0.5 µm/px anyway pass --force-mpp 0.5 instead\n")
    for args, expected in ((["--mpp", "1.008"], (1.0, "metadata")), (["--force-mpp", "0.5"], (0.5, "override"))):
        assert cli.main(["info", str(path), *args, "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert (info["mpp"], info["mpp_source"]) == expected, args
    for value in ("0", "-1", "nan", "inf", "100", "0.01"):
        for flag in ("--mpp", "--force-mpp"):
            assert cli.main(["info", str(path), f"{flag}={value}"]) == 2
            problem = (f"{value!r} is not a finite number" if value in ("nan", "inf") else
                       f"{value} µm/px is outside the plausible range 0.05-20 µm/px")
            assert capsys.readouterr().err == (f"wsi-response: error: argument {flag}: {problem} "
                                               "(see `wsi-response info --help`)\n")
    assert cli.main(["info", str(path), "--mpp", "1", "--force-mpp", "1"]) == 2
    assert capsys.readouterr().err == ("wsi-response: error: argument --force-mpp: not allowed with argument --mpp "
                                       "(see `wsi-response info --help`)\n")


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_run_refuses_a_disagreeing_mpp_before_anything_is_touched(slides: dict[str, Any], tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    path = slides["aperio"]
    assert cli.main(["run", str(path), "--specimen", "S", "--out", str(tmp_path), "--mpp", "1.005", *RUN]) == 0
    capsys.readouterr()
    record = json.loads((tmp_path / "S" / "slides" / "aperio" / "slide.json").read_text(encoding="utf-8"))
    assert (record["status"], record["mpp"], record["mpp_source"]) == ("ok", 1.0, "metadata")
    area_at_own_mpp = record["tissue_area_mm2"]
    before = _files(tmp_path)

    assert cli.main(["run", str(path), "--specimen", "S", "--out", str(tmp_path), "--mpp", "0.5", *RUN]) == 2
    assert capsys.readouterr().err == (
        f"wsi-response: error: {path}: --mpp 0.5 disagrees with the slide's own MPP 1 µm/px (vendor metadata; more "
        "than 1% apart); to measure it at 0.5 µm/px anyway pass --force-mpp 0.5 instead\n")
    assert cli.main(["run", str(path), "--specimen", "S", "--out", str(tmp_path), "--mpp", "0", *RUN]) == 2
    assert capsys.readouterr().err == ("wsi-response: error: argument --mpp: 0 µm/px is outside the plausible range "
                                       "0.05-20 µm/px (see `wsi-response run --help`)\n")
    assert _files(tmp_path) == before   # nothing finished was lost or rewritten

    assert cli.main(["run", str(path), "--specimen", "S", "--out", str(tmp_path), "--force-mpp", "0.5", *RUN]) == 0
    capsys.readouterr()
    record = json.loads((tmp_path / "S" / "slides" / "aperio" / "slide.json").read_text(encoding="utf-8"))
    assert (record["status"], record["mpp"], record["mpp_source"]) == ("ok", 0.5, "override")
    assert record["tissue_area_mm2"] == pytest.approx(area_at_own_mpp / 4, rel=0.1)  # px half as wide and high


def test_run_mpp_on_a_slide_without_mpp_is_kept_and_reused(slides: dict[str, Any], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    path = slides["no mpp"]
    for _ in range(2):
        assert cli.main(["run", str(path), "--specimen", "S", "--out", str(tmp_path), "--mpp", "1", *RUN]) == 0
        capsys.readouterr()
        slide_json = tmp_path / "S" / "slides" / "no mpp" / "slide.json"
        record = json.loads(slide_json.read_text(encoding="utf-8"))
        assert (record["status"], record["mpp"], record["mpp_source"]) == ("ok", 1.0, "override")
        first = slide_json.stat().st_mtime_ns if _ == 0 else first
    assert slide_json.stat().st_mtime_ns == first  # the rerun kept the finished slide


# --------------------------------------------------------------------------- memory


def _fake_slide(size: tuple[int, int], mpp: float) -> Slide:
    return Slide(path=Path("fake.svs"), backend="openslide", backend_reason="", vendor="aperio",
                 levels=(Level(size, 1.0),), mpp=mpp, mpp_source="override", bounds_offset_l0=(0, 0),
                 objective_power=None, properties={})


def test_largest_arrays_of_the_stages() -> None:
    """The issue's case (a 512 px slide at 100 µm/px) and a real-sized 0.25 µm/px slide (one level)."""
    tiny = {a.stage: a.nbytes for a in largest_arrays(_fake_slide((512, 512), 100.0), Config())}
    # focus: 8 x 8 cells of 64 x 100 focus px + 2 x 16 px halo, float32, in one chunk
    assert tiny["focus measure"] == 4 * 64 * 6432 ** 2
    # tiles: 229 x 229 cells of 224 px at 1 µm/px, all in one chunk, uint8 RGB
    assert tiny["tiles"] == 229 ** 2 * 224 ** 2 * 3
    big = {a.stage: a.nbytes for a in largest_arrays(_fake_slide((200_000, 100_000), 0.25), Config())}
    assert big == {"tissue mask": 4 * 12500 * 6250, "tile grid": 8 * 224 * 112,
                   "focus measure": 4 * 4 * 288 ** 2, "tiles": 4 * 224 ** 2 * 3, "model input": 4 * 64 * 224 ** 2 * 3}
    assert max(big.values()) < 0.5e9


def test_an_mpp_that_would_need_too_much_memory_is_refused_up_front(slides: dict[str, Any], tmp_path: Path) -> None:
    folder = slides["folder"]
    big = _pyramid(folder / "coarse.tif", _tissue(2048), (500, 500), photometric="rgb")  # its own MPP: 20 µm/px
    plain = _pyramid(folder / "plain.tif", _tissue(2048), photometric="rgb")             # 1 µm/px
    need = ("the focus measure (qc.focus_mpp 1 µm/px) would need about 7.1 GB in one array (limit 2.0 GB, "
            "wsi_response.slide.MAX_ARRAY_BYTES) for this 2048 x 2048 px slide at 20 µm/px ({}, up-sampled 20x); "
            "check its MPP")
    proc = cli_subprocess("run", plain, "--specimen", "M", "--out", tmp_path / "forced", "--force-mpp", "20", *RUN)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == f"wsi-response: error: {plain}: --force-mpp 20: {need.format('override')}\n"
    assert not (tmp_path / "forced" / "M").exists()   # refused before anything was written

    proc = cli_subprocess("run", big, "--specimen", "M", "--out", tmp_path / "own", *RUN)
    assert proc.returncode == 1
    assert f"wsi-response: slide failed: {big}: {need.format('tiff-resolution')}\n" in proc.stderr
    specimen = json.loads((tmp_path / "own" / "M" / "specimen.json").read_text(encoding="utf-8"))
    assert [(s["status"], s["viable_percent"]) for s in specimen["slides"]] == [("failed", None)]
    assert specimen["viable_percent"] is None and specimen["eortc"]["tier"] is None


# --------------------------------------------------------------------------- run: refused slides get no number


def test_run_records_refused_slides_as_failed_without_a_number(slides: dict[str, Any], tmp_path: Path) -> None:
    cases = [slides["cases"][name] for name in ("grey", "cmyk", "fluorescence", "anisotropic", "aperio abc")]
    proc = cli_subprocess("run", *(c.path for c in cases), "--specimen", "R", "--out", tmp_path, *RUN)
    assert proc.returncode == 1, proc.stderr
    failed = [line for line in proc.stderr.splitlines() if line.startswith("wsi-response: slide failed: ")]
    assert failed == [f"wsi-response: slide failed: {c.path}: {c.problem}" for c in cases]
    specimen = json.loads((tmp_path / "R" / "specimen.json").read_text(encoding="utf-8"))
    assert specimen["status"] == "failed" and specimen["viable_percent"] is None
    assert specimen["eortc"]["tier"] is None and specimen["qc"]["reportable"] is False
    assert [(s["status"], s["error"], s["viable_percent"]) for s in specimen["slides"]] == [
        ("failed", f"{c.path}: {c.problem}", None) for c in cases]
    assert "viable tumor" not in proc.stdout and "EORTC" not in proc.stdout


# --------------------------------------------------------------------------- models whose outputs are not numbers


def _tiny_model(path: Path) -> Path:
    torch.manual_seed(0)
    save_classifier(Classifier(model=build_model("resnet10t").eval(), arch="resnet10t", class_names=CLASSES,
                               target_mpp=1.0, tile_px=224, mean=IMAGENET_MEAN, std=IMAGENET_STD), path)
    return path


def _rewrite(source: Path, target: Path, tensors: dict[str, float] | None = None,
             meta: dict[str, Any] | None = None, raw_meta: str | None = None) -> Path:
    """``source`` with tensors filled with a value and metadata keys replaced (None: deleted)."""
    with safe_open(str(source), "pt") as f:
        header = dict(f.metadata())
    state = load_file(str(source))
    for name, value in (tensors or {}).items():
        state[name] = torch.full_like(state[name], value)
    if meta is not None:
        fields = json.loads(header["wsi_response"])
        for key, value in meta.items():
            if value is None:
                fields.pop(key)
            else:
                fields[key] = value
        header["wsi_response"] = json.dumps(fields)
    if raw_meta is not None:
        header["wsi_response"] = raw_meta
    save_file(state, str(target), metadata=header)
    return target


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_model(tmp_path_factory.mktemp("models") / "tiny.safetensors")


@pytest.mark.parametrize("edit, problem", [
    (dict(tensors={"conv1.0.weight": float("nan")}),
     "weights hold NaN or inf in 1 tensor(s) (first: conv1.0.weight); the model's outputs would not be numbers: a "
     "corrupt file or a diverged training"),
    (dict(tensors={"fc.bias": float("inf"), "bn1.running_var": float("-inf")}),
     "weights hold NaN or inf in 2 tensor(s) (first: bn1.running_var); the model's outputs would not be numbers: a "
     "corrupt file or a diverged training"),
    (dict(meta={"std": [0.229, 0.0, 0.225]}),
     "checkpoint metadata: std must be 3 positive finite numbers (RGB), got [0.229, 0.0, 0.225]"),
    (dict(meta={"std": [0.229, -0.2, 0.225]}),
     "checkpoint metadata: std must be 3 positive finite numbers (RGB), got [0.229, -0.2, 0.225]"),
    (dict(raw_meta=json.dumps({"format": "wsi-response-classifier/1", "arch": "resnet10t",
                               "class_names": list(CLASSES), "target_mpp": 1.0, "tile_px": 224,
                               "mean": list(IMAGENET_MEAN), "std": [0.229, float("nan"), 0.225]})),
     "checkpoint metadata: std must be 3 positive finite numbers (RGB), got [0.229, NaN, 0.225]"),
    (dict(meta={"mean": [0.5, 1e400, 0.5]}),
     "checkpoint metadata: mean must be 3 finite numbers (RGB), got [0.5, Infinity, 0.5]"),
    (dict(meta={"mean": "0.5"}), "checkpoint metadata: mean must be 3 finite numbers (RGB), got \"0.5\""),
    (dict(meta={"target_mpp": "1.0"}),
     "checkpoint metadata: target_mpp must be a positive finite number (µm/px), got \"1.0\""),
    (dict(meta={"tile_px": None}), "checkpoint metadata: tile_px must be a positive whole number (px), got missing"),
    (dict(meta={"tile_px": 224.5}), "checkpoint metadata: tile_px must be a positive whole number (px), got 224.5"),
    (dict(meta={"class_names": 4}), "checkpoint metadata: class_names must be a list of names, got 4"),
    (dict(meta={"arch": ["resnet10t"]}), "checkpoint metadata: arch must be a timm model name, got [\"resnet10t\"]"),
    (dict(meta={"trained_on": "synthetic"}), "checkpoint metadata: trained_on must be a mapping, got \"synthetic\""),
    (dict(raw_meta="{not json"),
     "checkpoint metadata is not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 "
     "(char 1))"),
    (dict(raw_meta="[1, 2]"), "checkpoint metadata is a JSON list, not an object (not a wsi-response model)"),
])
def test_models_whose_outputs_cannot_be_trusted_are_refused_at_load(tiny_model: Path, tmp_path: Path,
                                                                    edit: dict[str, Any], problem: str) -> None:
    bad = _rewrite(tiny_model, tmp_path / "bad model.safetensors", **edit)
    with pytest.raises(ModelError) as err:
        load_classifier(bad)
    assert str(err.value) == f"{bad}: {problem}"


def test_run_with_a_nan_model_fails_before_anything_is_written(slides: dict[str, Any], tiny_model: Path,
                                                               tmp_path: Path) -> None:
    bad = _rewrite(tiny_model, tmp_path / "nan.safetensors", tensors={"fc.weight": float("nan")})
    proc = cli_subprocess("run", slides["rgb"], "--specimen", "N", "--out", tmp_path / "out", "--model", bad, *RUN)
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr == (f"wsi-response: error: {bad}: weights hold NaN or inf in 1 tensor(s) (first: fc.weight); "
                           "the model's outputs would not be numbers: a corrupt file or a diverged training\n")
    assert not (tmp_path / "out").exists()


def test_non_finite_probabilities_fail_the_slide_instead_of_a_percentage(slides: dict[str, Any], tiny_model: Path,
                                                                         tmp_path: Path) -> None:
    """Finite weights so large that the logits overflow: the load check passes, inference catches it."""
    huge = _rewrite(tiny_model, tmp_path / "huge.safetensors", tensors={"fc.weight": 3e38})
    load_classifier(huge)
    proc = cli_subprocess("run", slides["rgb"], "--specimen", "H", "--out", tmp_path / "out", "--model", huge, *RUN)
    assert proc.returncode == 1, proc.stderr
    error = (f"{huge}: gave class probabilities that are not numbers (NaN or inf) for 4 of 4 tiles of a batch of "
             f"{slides['rgb']}; the slide gets no result")
    assert f"wsi-response: slide failed: {error}\n" in proc.stderr
    specimen = json.loads((tmp_path / "out" / "H" / "specimen.json").read_text(encoding="utf-8"))
    assert [(s["status"], s["error"], s["viable_percent"]) for s in specimen["slides"]] == [("failed", error, None)]
    assert specimen["viable_percent"] is None and specimen["eortc"]["tier"] is None
    assert not (tmp_path / "out" / "H" / "slides" / "rgb" / "tiles.zarr").exists()  # nothing stored to resume from
