"""Seeded fuzz of the command line against a finished specimen: random hostile inputs, fixed outcomes.

The exact-message corpora live beside this file (``test_cli_errors.py`` for arguments, configs and
special files, ``test_ids.py`` for ids, ``test_refuse.py`` for slides and models the model cannot
judge, ``test_bad_inputs.py`` for broken slide files, ``test_locks.py`` for concurrent writers).
This test draws a few hundred *combinations* of such inputs from a seeded generator (ids built from
forbidden pieces at random places, argument values, YAML that must not parse, special files as
slides, configs and models) and checks, for every one, the invariants that must hold whatever the
input: the exit code of its kind (2 usage, 1 input), exactly one line on stderr that starts with
``wsi-response:`` and names the offending value or file, no traceback and no internal-error log,
nothing written outside ``--out`` (or anywhere, for a usage error), and the finished specimen's
``slide.json`` and ``specimen.json`` byte-identical afterwards.

The commands run in this process (``cli.main``), so the few hundred cases take seconds, not the
minutes that one Python start-up per case would cost.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from _hostile import special_files
from wsi_response import cli
from wsi_response.config import Config, config_to_dict

SPECIMEN = "S"
RUN = ["--device", "cpu", "--quiet", "inference.num_workers=0"]
N_CASES = 240
SEED = 20261203

# Pieces that make any id invalid wherever they stand in it (ids.py's rule).
ID_POISON = ["/", "\\", "\x00", "\n", "\r", "\t", "\x1b", "\x7f", "\u0085", "\u202e", "\u200b", ":", "*", "?",
             '"', "<", ">", "|"]
# Whole ids that are invalid as they are.
ID_WHOLE = ["", ".", "..", "logs", "LOGS", "slides", "specimen.json", "report.html", "batch-summary.json",
            "CON", "nul.txt", "x" * 256, "é" * 128, " S", "S ", ".hidden", "S.", "S.partial", "/abs"]
BAD_MPP = ["0", "-0.5", "nan", "-inf", "inf", "1e400", "abc", "", "0x10", "25", "0.001", "1e-320", "1,5", " "]
# Override values that no key accepts: YAML that does not parse or is refused before typing.
BAD_YAML = ["[1", "{a: 1", "!!python/object/apply:os.system ['touch pwned']", "[&a [1], *a]",
            "[" * 40 + "]" * 40, "'unclosed", "!!binary AAAA"]


@dataclass(frozen=True)
class Finished:
    root: Path        # cwd of every case: a relative path wrongly written would land here
    slide: Path
    out: Path
    specials: dict[str, Path]   # kind -> a special file (fifo, loop, folder, ...)


@dataclass(frozen=True)
class Case:
    argv: list[str]
    code: int
    names: str        # what the one line must mention (the bad value or file)
    new_specimen: str | None = None   # a slide error is recorded under this specimen, inside --out


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Finished:
    from wsi_response.synth import synth_specimen

    root = tmp_path_factory.mktemp("fuzz")
    truth = synth_specimen(root / "in", SPECIMEN, 1, seed=5, size_px=(2000, 1500), mpp=0.25)
    out = root / "out"
    assert cli.main(["run", str(truth.slides[0].slide_path), "--specimen", SPECIMEN, "--out", str(out), *RUN]) == 0
    special = root / "special"
    special_files(special)
    (special / "empty.svs").write_bytes(b"")
    (special / "text.svs").write_text("not a slide\n")
    (special / "header-only.tif").write_bytes(b"II*\x00" + b"\xff" * 60)
    (special / "random.yaml").write_bytes(random.Random(1).randbytes(512))
    (special / "bomb.yaml").write_text("a: &a [x, x]\nb: &b [*a, *a]\nc: [*b, *b]\n")
    (special / "deep.yaml").write_text("a: " + "[" * 500 + "]" * 500 + "\n")
    specials = {p.name: p for p in special.iterdir()}
    specials["missing"] = special / "missing.svs"
    return Finished(root, truth.slides[0].slide_path, out, specials)


def _bad_id(rng: random.Random) -> str:
    if rng.random() < 0.4:
        return rng.choice(ID_WHOLE)
    base = "".join(rng.choice("ABCxyz019-_é") for _ in range(rng.randint(1, 8)))
    cut = rng.randint(0, len(base))
    return base[:cut] + rng.choice(ID_POISON) + base[cut:]


def _config_keys() -> list[str]:
    """Every config key but those RUN sets after the fuzzed override (the last value of a key wins)."""
    return [f"{section}.{key}" for section, values in config_to_dict(Config()).items() for key in values
            if f"{section}.{key}" not in ("inference.device", "inference.num_workers")]


def _generators(f: Finished) -> list[Callable[[random.Random], Case]]:
    keys = _config_keys()
    run = ["run", str(f.slide), "--out", str(f.out)]

    def bad_specimen(rng: random.Random) -> Case:
        specimen = _bad_id(rng)
        return Case([*run, f"--specimen={specimen}", *RUN], 2, "specimen id")   # `=`: ids may start with "-"

    def bad_mpp(rng: random.Random) -> Case:
        option, value = rng.choice(["--mpp", "--force-mpp"]), rng.choice(BAD_MPP)
        return Case([*run, "--specimen", SPECIMEN, *RUN, f"{option}={value}"], 2, f"argument {option}")

    def bad_override(rng: random.Random) -> Case:
        if rng.random() < 0.25:
            key = rng.choice(["nosection.key", f"{rng.choice(keys).split('.')[0]}.no_such_key"])
            named = "nosection: unknown key" if key.startswith("nosection") else f"{key}: unknown key"
            return Case([*run, "--specimen", SPECIMEN, *RUN, f"{key}=1"], 2, named)
        key = rng.choice(keys)
        return Case([*run, "--specimen", SPECIMEN, *RUN, f"{key}={rng.choice(BAD_YAML)}"], 2, key)

    def bad_config(rng: random.Random) -> Case:
        name = rng.choice(["fifo", "loop-a", "folder", "latin1.yaml", "random.yaml", "bomb.yaml", "deep.yaml",
                           "missing"])
        path = str(f.specials[name])
        return Case([*run, "--specimen", SPECIMEN, *RUN, "--config", path], 2, path)

    def bad_model(rng: random.Random) -> Case:
        name = rng.choice(["fifo", "loop-a", "folder", "empty.svs", "text.svs", "missing"])
        path = str(f.specials[name])
        return Case([*run, "--specimen", SPECIMEN, *RUN, "--model", path], 1, path)

    def bad_slide(rng: random.Random) -> Case:
        name = rng.choice(["fifo", "loop-a", "folder", "empty.svs", "text.svs", "header-only.tif", "missing"])
        path = str(f.specials[name])
        specimen = f"F{rng.randint(0, 10**6)}"
        return Case(["run", path, "--out", str(f.out), "--specimen", specimen, *RUN], 1, path, specimen)

    return [bad_specimen, bad_mpp, bad_override, bad_config, bad_model, bad_slide]


def _cases(f: Finished) -> list[Case]:
    rng = random.Random(SEED)
    generators = _generators(f)
    return [rng.choice(generators)(rng) for _ in range(N_CASES)]


def _tree(root: Path, skip: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every entry below ``root`` outside ``skip``; links not followed."""
    entries = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if Path(folder) / d != skip]
        for name in dirs + files:
            st = (Path(folder) / name).lstat()
            entries[str((Path(folder) / name).relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return entries


def test_fuzzed_inputs_keep_every_invariant(finished: Finished, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    f = finished
    monkeypatch.chdir(f.root)
    monkeypatch.setenv("XDG_CACHE_HOME", str(f.root / "cache"))   # internal-error logs (there must be none)
    done = {p: p.read_bytes() for p in (f.out / SPECIMEN).rglob("*.json")}
    outside = _tree(f.root, f.out)
    cases = _cases(f)
    assert {c.code for c in cases} == {1, 2} and {c.new_specimen is None for c in cases} == {True, False}
    for i, case in enumerate(cases):
        before_out = _tree(f.out, f.out / "_never")
        code = cli.main(case.argv)
        captured = capsys.readouterr()
        what = f"case {i}: {case.argv[1:]!r}: {captured.err!r}"
        lines = captured.err.splitlines()
        assert code == case.code, what
        assert len(lines) == 1 and lines[0].startswith("wsi-response: "), what
        assert "Traceback" not in captured.err and "internal error" not in captured.err, what
        assert case.names in lines[0], what
        assert _tree(f.root, f.out) == outside, f"{what}: wrote outside --out"
        if case.new_specimen is None:
            assert _tree(f.out, f.out / "_never") == before_out, f"{what}: a usage error wrote into --out"
        else:   # the failed slide is recorded inside --out, under its own specimen, and scored nothing
            spec = json.loads((f.out / case.new_specimen / "specimen.json").read_text(encoding="utf-8"))
            assert spec["status"] == "failed" and spec["viable_percent"] is None, what
            assert spec["eortc"]["tier"] is None, what
        assert {p: p.read_bytes() for p in done} == done, f"{what}: finished results changed"
    assert not (f.root / "cache").exists()
