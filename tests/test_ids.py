"""Ids and output paths: every refused id kind from every entry point, slide-id collisions by their
numbers, the same file listed twice, and outputs that a symbolic link would send elsewhere."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from _batch_data import cli as cli_subprocess
from wsi_response import cli
from wsi_response.batch import SUMMARY_NAME, read_manifest
from wsi_response.errors import ConfigError
from wsi_response.ids import RESERVED_NAMES, check_specimen_id, unique_slide_ids

RUN = ["--device", "cpu", "--quiet", "inference.num_workers=0"]
RESERVED = "is a name the tool writes itself (batch-summary.json, logs, report.html, slides, specimen.json)"
WINDOWS = "not allowed in file names on Windows and SMB shares"
DEVICE = "is a device name on Windows (CON, PRN, AUX, NUL, COM1-9, LPT1-9)"
CONTROL = "contains the control or invisible character"

# (id, the problem after "<origin>: specimen id <repr>")
BAD_IDS = [
    ("", "is empty"),
    ("/abs/S", "is an absolute path"),
    ("C:\\S", "is an absolute path"),
    ("a/b", "contains a path separator '/'"),
    ("a\\b", "contains a path separator '\\\\'"),
    (".", "is a relative folder reference, not a name"),
    ("..", "is a relative folder reference, not a name"),
    ("a\x00b", f"{CONTROL} U+0000"),
    ("a\nb", f"{CONTROL} U+000A"),
    ("a\rb", f"{CONTROL} U+000D"),
    ("a\tb", f"{CONTROL} U+0009"),
    ("a\x7fb", f"{CONTROL} U+007F"),
    ("a\x85b", f"{CONTROL} U+0085"),
    ("\u202eS", f"{CONTROL} U+202E"),
    ("a\u200bb", f"{CONTROL} U+200B"),
    (" S", "starts or ends with whitespace"),
    ("S ", "starts or ends with whitespace"),
    (".S", "starts with '.' (hidden and temporary names are the tool's own)"),
    (".write-test-1", "starts with '.' (hidden and temporary names are the tool's own)"),
    ("S.partial", "ends with '.partial' (the tool's temporary-file suffix)"),
    ("tiles.zarr.PARTIAL", "ends with '.partial' (the tool's temporary-file suffix)"),
    ("S.", "ends with '.' (Windows and SMB shares drop it)"),
    ("batch-summary.json", RESERVED),
    ("logs", RESERVED),
    ("LOGS", RESERVED),
    ("slides", RESERVED),
    ("specimen.json", RESERVED),
    ("report.html", RESERVED),
    ("S:1", f"contains ':', {WINDOWS}"),
    ("a*b", f"contains '*', {WINDOWS}"),
    ('a"b', f"contains '\"', {WINDOWS}"),
    ("CON", DEVICE),
    ("nul.txt", DEVICE),
    ("x" * 256, "is 256 bytes long in UTF-8 (at most 255)"),
    ("é" * 128, "is 256 bytes long in UTF-8 (at most 255)"),
]
TRIMMED = {" S", "S "}   # a manifest cell is trimmed of spaces (CSV padding): these are "S" there


def _ids(cases):
    return [repr(v)[:24] for v, _ in cases]


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three different small synthetic slides renamed ``a.svs``, ``sub/a.svs`` and ``a-2.svs``."""
    from wsi_response.synth import synth_specimen

    root = tmp_path_factory.mktemp("ids")
    truth = synth_specimen(root / "synth", "C", 3, seed=5, size_px=(2000, 1500), mpp=0.5, viable_fraction=0.3)
    names = {"a": root / "d" / "a.svs", "sub/a": root / "d" / "sub" / "a.svs", "a-2": root / "d" / "a-2.svs"}
    for slide, target in zip(truth.slides, names.values()):
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(slide.slide_path, target)
    return names


def test_reserved_names_are_the_ones_written() -> None:
    assert SUMMARY_NAME in RESERVED_NAMES and {"logs", "slides", "specimen.json", "report.html"} <= RESERVED_NAMES


@pytest.mark.parametrize("value, problem", BAD_IDS, ids=_ids(BAD_IDS))
def test_bad_specimen_id_is_refused_by_run_and_synth(slides, tmp_path, capsys, value, problem) -> None:
    before = _tree(tmp_path)
    message = f"wsi-response: error: --specimen: specimen id {value!r} {problem}\n"
    assert cli.main(["run", str(slides["a"]), "--specimen", value, "--out", str(tmp_path / "out"), *RUN]) == 2
    assert capsys.readouterr().err == message
    assert cli.main(["synth", "--out", str(tmp_path / "out"), "--specimen", value, "--slides", "1",
                     "--size", "256x256"]) == 2
    assert capsys.readouterr().err == message
    assert _tree(tmp_path) == before   # nothing under --out (not even --out), nothing beside it


CSV_CASES = [(v, p) for v, p in BAD_IDS if v not in TRIMMED and v != ""]


@pytest.mark.parametrize("value, problem", CSV_CASES, ids=_ids(CSV_CASES))
def test_bad_specimen_id_is_refused_in_a_manifest(slides, tmp_path, capsys, value, problem) -> None:
    manifest = tmp_path / "m.csv"
    text = io.StringIO(newline="")
    csv.writer(text).writerows([("specimen_id", "slide_path"), ("OK", slides["a"]), (value, slides["a-2"])])
    manifest.write_text(text.getvalue(), encoding="utf-8", newline="")
    before = _tree(tmp_path)
    assert cli.main(["batch", str(manifest), "--out", str(tmp_path / "out"), *RUN]) == 2
    assert capsys.readouterr().err == f"wsi-response: error: {manifest}: line 3: specimen id {value!r} {problem}\n"
    assert _tree(tmp_path) == before


def test_empty_and_padded_manifest_ids(tmp_path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("specimen_id,slide_path\n S ,a.svs\n", encoding="utf-8")
    assert [t.specimen_id for t in read_manifest(manifest)] == ["S"]
    manifest.write_text("specimen_id,slide_path\n  ,a.svs\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        read_manifest(manifest)
    assert str(info.value) == f"{manifest}: line 2: empty specimen_id or slide_path"


def test_manifest_ids_differing_only_in_case_are_refused(tmp_path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("specimen_id,slide_path\nS-1,a.svs\nT,b.svs\ns-1,c.svs\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        read_manifest(manifest)
    assert str(info.value) == (f"{manifest}: line 4: specimen id 's-1' differs from 'S-1' (line 2) only in letter "
                               "case or Unicode form; they would share a folder on many file systems")


def test_bad_ids_through_the_real_command_line(slides, tmp_path) -> None:
    """A subprocess each: what a shell passes, including a name that is not valid UTF-8."""
    out = tmp_path / "out"
    proc = cli_subprocess("run", slides["a"], "--specimen", "../S", "--out", out, *RUN, timeout=120)
    assert (proc.returncode, proc.stderr) == (2, "wsi-response: error: --specimen: specimen id '../S' contains a "
                                                 "path separator '/'\n")
    proc = cli_subprocess("synth", "--out", out, "--specimen", "a\nb", "--slides", "1", timeout=120)
    assert (proc.returncode, proc.stderr) == (2, "wsi-response: error: --specimen: specimen id 'a\\nb' contains "
                                                 "the control or invisible character U+000A\n")
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "wsi_response.cli", "run", str(slides["a"]), "--specimen",
                           b"S\xff", "--out", str(out), *RUN], capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stderr) == (2, "wsi-response: error: --specimen: specimen id 'S\\udcff' "
                                                 "contains an undecodable byte (0xFF)\n")
    manifest = tmp_path / "m.csv"
    manifest.write_text(f'specimen_id,slide_path\n"S\nT",{slides["a"]}\n', encoding="utf-8")
    proc = cli_subprocess("batch", manifest, "--out", out, *RUN, timeout=120)
    assert (proc.returncode, proc.stderr) == (2, f"wsi-response: error: {manifest}: line 2: specimen id 'S\\nT' "
                                                 "contains the control or invisible character U+000A\n")
    assert not out.exists()


def test_aggregate_refuses_folder_names_it_cannot_trust(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    (out / "a\nb" / "slides").mkdir(parents=True)
    assert cli.main(["aggregate", str(out)]) == 2
    assert capsys.readouterr().err == (f"wsi-response: error: aggregate {out}: specimen id 'a\\nb' contains the "
                                       "control or invisible character U+000A\n")
    shutil.rmtree(out / "a\nb")
    (out / "S" / "slides" / ".x").mkdir(parents=True)
    (out / "S" / "slides" / ".x" / "slide.json").write_text("{}")
    assert cli.main(["aggregate", str(out)]) == 2
    assert capsys.readouterr().err == (f"wsi-response: error: {out}/S/slides: slide id '.x' starts with '.' "
                                       "(hidden and temporary names are the tool's own)\n")
    shutil.rmtree(out / "S" / "slides" / ".x")
    (out / "S" / "slides" / "x").mkdir()
    (out / "S" / "slides" / "x" / "slide.json").write_text(json.dumps({"slide_id": "../../y"}))
    assert cli.main(["aggregate", str(out)]) == 2
    assert capsys.readouterr().err == (f"wsi-response: error: {out}/S/slides/x/slide.json: slide_id '../../y' is not "
                                       "the name of its folder 'x' (moved or renamed by hand?); run the slide again\n")
    assert [p for p in _tree(out) if not p.endswith(".wsi-response.lock")] == [
        "S", "S/slides", "S/slides/x", "S/slides/x/slide.json"]   # the folders' locks were taken to read them


# --------------------------------------------------------------------------- one slide, one id, one count


def test_slide_ids_skip_ids_taken_by_other_stems() -> None:
    assert unique_slide_ids(["a.svs", "sub/a.svs", "a-2.svs"]) == ["a", "a-3", "a-2"]
    assert unique_slide_ids(["x/a.svs", "y/a.svs", "a-2.svs", "a-3.tif", "z/a.svs"]) == ["a", "a-4", "a-2", "a-3", "a-5"]
    assert unique_slide_ids(["A.svs", "a.svs", "Ä.svs", "A\u0308.svs"]) == ["A", "a-2", "Ä", "A\u0308-2"]


def test_slide_ids_from_odd_file_names_are_sanitised() -> None:
    names = ["..svs", ".svs", "logs.svs", "Slides.tif", "CON.svs", "a\nb.svs", "a_b.svs", " x .svs", "a\\b.svs",
             "a:b*c.svs", "\u202eevil.svs", "b\udcff.svs", "é" * 130 + ".svs"]
    assert unique_slide_ids(names) == ["slide", "slide-2", "logs_", "Slides_", "CON_", "a_b", "a_b-2", "x", "a_b-3",
                                       "a_b_c", "_evil", "b_", "é" * 120]


def test_manifest_and_run_name_slides_alike(slides, tmp_path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("specimen_id,slide_path\n" + "".join(f"C,{p}\n" for p in slides.values()), encoding="utf-8")
    assert [t.slide_id for t in read_manifest(manifest)] == unique_slide_ids(list(slides.values())) == ["a", "a-3", "a-2"]


def test_colliding_names_are_three_slides_by_their_numbers(slides, tmp_path, demo_classifier) -> None:
    """``a.svs``, ``sub/a.svs``, ``a-2.svs``: three folders, and the bed is the sum of three beds."""
    from wsi_response.config import load_config
    from wsi_response.pipeline import run_specimen

    out = tmp_path / "out"
    proc = cli_subprocess("run", *slides.values(), "--specimen", "C", "--out", out, "--json", *RUN, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert [(s["slide_id"], s["path"]) for s in result["slides"]] == [
        ("a", str(slides["a"])), ("a-3", str(slides["sub/a"])), ("a-2", str(slides["a-2"]))]
    assert sorted(p.name for p in (out / "C" / "slides").iterdir()) == ["a", "a-2", "a-3"]
    beds = [json.loads((out / "C" / "slides" / sid / "slide.json").read_text())["tumor_bed_area_mm2"]
            for sid in ("a", "a-3", "a-2")]
    assert min(beds) > 0 and len(set(beds)) == 3, beds   # three different slides: a lost one would show
    assert result["tumor_bed_area_mm2"] == pytest.approx(sum(beds), rel=1e-9)
    cfg = load_config(None, ["inference.num_workers=0", "inference.device=cpu"])
    alone = [run_specimen([path], f"ONE-{i}", tmp_path / "alone", demo_classifier, cfg, quiet=True)
             for i, path in enumerate(slides.values())]
    assert [r["tumor_bed_area_mm2"] for r in alone] == pytest.approx(beds, rel=1e-9)
    assert result["tumor_bed_area_mm2"] == pytest.approx(sum(r["tumor_bed_area_mm2"] for r in alone), rel=1e-9)


def test_same_file_twice_in_run_is_a_usage_error(slides, tmp_path, capsys) -> None:
    a = slides["a"]
    link, hard = tmp_path / "link.svs", tmp_path / "hard.svs"
    link.symlink_to(a)
    os.link(a, hard)
    spellings = [a, a.parent / "." / "a.svs", link, a.parent / "sub" / ".." / "a.svs", hard]
    before = _tree(tmp_path)
    assert cli.main(["run", *map(str, spellings), "--specimen", "S", "--out", str(tmp_path / "out"), *RUN]) == 2
    assert capsys.readouterr().err == (
        "wsi-response: error: the same slide file is listed twice: "
        f"slide 2 ('{a.parent}/a.svs') is slide 1 ('{a}'); slide 3 ('{link}') is slide 1 ('{a}'); "
        f"slide 4 ('{a.parent}/sub/../a.svs') is slide 1 ('{a}'); slide 5 ('{hard}') is slide 1 ('{a}')\n")
    assert _tree(tmp_path) == before


def test_same_file_twice_in_a_manifest_is_a_usage_error(slides, tmp_path) -> None:
    a = slides["a"]
    (tmp_path / "link.svs").symlink_to(a)
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"specimen_id,slide_path\nS,{a}\nS,link.svs\nT,link.svs\nS,{a.parent}/sub/../a.svs\n",
                        encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        read_manifest(manifest)
    assert str(info.value) == (f"{manifest}: 2 duplicated row(s): line 3 repeats line 2 (S, '{tmp_path}/link.svs'); "
                               f"line 5 repeats line 2 (S, '{a}')")


# --------------------------------------------------------------------------- outputs stay inside --out


def test_a_symlinked_specimen_folder_cannot_send_outputs_elsewhere(slides, tmp_path, capsys) -> None:
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    out.mkdir()
    (out / "S").symlink_to(elsewhere)
    refused = (f"wsi-response: error: {out}/S: resolves to {elsewhere.resolve()}, outside the output folder "
               f"{out.resolve()} (through a symbolic link); refusing to write there\n")
    assert cli.main(["run", str(slides["a"]), "--specimen", "S", "--out", str(out), *RUN]) == 1
    assert capsys.readouterr().err == refused
    assert cli.main(["synth", "--out", str(out), "--specimen", "S", "--slides", "1", "--size", "256x256"]) == 1
    assert capsys.readouterr().err == refused
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"specimen_id,slide_path\nS,{slides['a']}\n", encoding="utf-8")
    assert cli.main(["batch", str(manifest), "--out", str(out), *RUN]) == 1
    assert capsys.readouterr().err == refused
    assert cli.main(["batch", str(manifest), "--out", str(out), "--aggregate-only", *RUN]) == 1
    assert capsys.readouterr().err == refused
    (elsewhere / "slides").mkdir()
    assert cli.main(["aggregate", str(out)]) == 1
    assert capsys.readouterr().err == refused
    assert _tree(elsewhere) == ["slides"] and _tree(out) == ["S"]


def test_a_symlink_inside_a_slide_folder_is_refused(slides, tmp_path, capsys) -> None:
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / "S" / "slides" / "a").mkdir(parents=True)
    (out / "S" / "slides" / "a" / "tiles.zarr").symlink_to(elsewhere)
    assert cli.main(["run", str(slides["a"]), "--specimen", "S", "--out", str(out), *RUN]) == 1
    assert capsys.readouterr().err == (
        f"wsi-response: error: {out}/S/slides/a/tiles.zarr: resolves to {elsewhere.resolve()}, outside the output "
        f"folder {out.resolve()} (through a symbolic link); refusing to write there\n")
    assert _tree(elsewhere) == [] and _tree(out) == ["S", "S/slides", "S/slides/a", "S/slides/a/tiles.zarr"]


def test_a_symlinked_output_folder_itself_is_fine(slides, tmp_path) -> None:
    """``--out`` may itself be a link (a results share): only what is below it must stay below it."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "out").symlink_to(real)
    assert check_specimen_id("S-1", "--specimen") == "S-1"
    from wsi_response.ids import check_inside

    check_inside(tmp_path / "out", tmp_path / "out" / "S", tmp_path / "out" / "S" / "slides" / "a")
