"""Concurrent writers, with real processes: two `run`s at once, a killed holder, `run` + `aggregate`,
`run` + `batch`, and tile stores damaged in every way (named in one line, then rebuilt).

A process is caught holding its lock without hooks: its pid appears in the folder's lock file, and
it is then paused (SIGSTOP) so that the other one meets the lock for sure, and resumed (SIGCONT).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _batch_data import cli, slide_json, specimen_json, without_timing
from wsi_response.locks import LOCK_NAME, FolderBusyError, folder_lock

SPECIMEN = "L-1"
OVERRIDES = ["inference.device=cpu", "inference.num_workers=0"]
RUN = ["--device", "cpu", "--quiet", "inference.num_workers=0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two small slides of specimen L-1 and one of M-1, and a plain run of L-1 (the reference)."""
    from wsi_response.classifier import default_model_path, load_classifier
    from wsi_response.config import load_config
    from wsi_response.pipeline import run_specimen
    from wsi_response.synth import synth_specimen

    root = tmp_path_factory.mktemp("locks")
    slides = [s.slide_path for s in synth_specimen(root / "slides", SPECIMEN, 2, seed=5, size_px=(2000, 1500),
                                                   mpp=0.25, viable_fraction=0.3).slides]
    other = synth_specimen(root / "slides", "M-1", 1, seed=6, size_px=(2000, 1500), mpp=0.25).slides[0].slide_path
    cfg = load_config(None, OVERRIDES)
    reference = root / "reference"
    run_specimen(slides, SPECIMEN, reference, load_classifier(default_model_path(), cfg.tiling), cfg, quiet=True)
    return {"slides": slides, "other": other, "reference": reference, "cfg": cfg}


def _popen(*args: str | Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "wsi_response.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _holder(folder: Path, procs: list[subprocess.Popen], timeout: float = 180) -> tuple[subprocess.Popen, dict]:
    """The process of ``procs`` whose pid the lock file of ``folder`` names, paused (SIGSTOP), and its record."""
    deadline = time.monotonic() + timeout
    by_pid = {p.pid: p for p in procs}
    while time.monotonic() < deadline:
        try:
            holder = json.loads((folder / LOCK_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            holder = {}
        if holder.get("pid") in by_pid:
            proc = by_pid[holder["pid"]]
            os.kill(proc.pid, signal.SIGSTOP)
            return proc, holder
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.005)
    raise AssertionError(f"no process locked {folder}")


def _busy_line(folder: Path, holder: dict) -> str:
    return (f"wsi-response: error: {folder}: is being written by pid {holder['pid']} on host {holder['host']} "
            f"({holder['command']}, since {holder['since']}); wait for it or stop it")


def _same_results(out: Path, reference: Path, specimen: str = SPECIMEN) -> None:
    """specimen.json and every slide.json equal the reference's, field by field, timing excluded."""
    expected = without_timing(specimen_json(reference, SPECIMEN))
    assert without_timing(specimen_json(out, specimen)) == {**expected, "specimen_id": specimen}
    for slide in expected["slides"]:
        assert without_timing(slide_json(out, specimen, slide["slide_id"])) == \
            without_timing(slide_json(reference, SPECIMEN, slide["slide_id"]))


# --------------------------------------------------------------------------- the lock itself


HOLD = """
import sys, time
from wsi_response.locks import folder_lock
with folder_lock(sys.argv[1], brief=sys.argv[2] == "brief"):
    print("held", flush=True)
    time.sleep(float(sys.argv[3]))
"""


def _hold(tmp_path: Path, folder: Path, brief: bool, seconds: float) -> subprocess.Popen:
    script = tmp_path / "hold.py"
    script.write_text(HOLD, encoding="utf-8")
    proc = subprocess.Popen([sys.executable, str(script), str(folder), "brief" if brief else "long", str(seconds)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def test_held_lock_is_named_and_a_killed_holder_is_taken_over(tmp_path: Path) -> None:
    folder = tmp_path / "spec"
    proc = _hold(tmp_path, folder, brief=False, seconds=120)
    holder = json.loads((folder / LOCK_NAME).read_text(encoding="utf-8"))
    assert holder["pid"] == proc.pid and holder["command"] == "hold.py" and holder["brief"] is False
    started = time.monotonic()
    with pytest.raises(FolderBusyError) as caught:
        with folder_lock(folder):
            pass
    assert time.monotonic() - started < 1.0, "a long holder is not waited for"
    assert f"wsi-response: error: {caught.value}" == _busy_line(folder, holder)

    proc.send_signal(signal.SIGKILL)   # the kernel releases the lock of the dead process
    proc.wait()
    with folder_lock(folder):
        assert json.loads((folder / LOCK_NAME).read_text(encoding="utf-8"))["pid"] == os.getpid()


def test_brief_holder_is_waited_for(tmp_path: Path) -> None:
    folder = tmp_path / "spec"
    proc = _hold(tmp_path, folder, brief=True, seconds=1.5)
    started = time.monotonic()
    with folder_lock(folder):
        assert time.monotonic() - started > 1.0   # it held the lock 1.5 s after saying so
    proc.wait()


def test_a_folder_locked_twice_in_one_process_stays_locked(tmp_path: Path) -> None:
    folder = tmp_path / "spec"
    probe = [sys.executable, "-c", f"from wsi_response.locks import folder_lock\nwith folder_lock({str(folder)!r}): pass"]
    with folder_lock(folder):
        with folder_lock(folder):
            pass
        assert subprocess.run(probe, capture_output=True).returncode != 0, "the inner release dropped the lock"
    assert subprocess.run(probe, capture_output=True).returncode == 0


# --------------------------------------------------------------------------- commands at once


@pytest.mark.slow
def test_two_runs_at_once_one_runs_the_other_is_refused(data: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    procs = [_popen("run", *data["slides"], "--specimen", SPECIMEN, "--out", out, *RUN) for _ in range(2)]
    winner, holder = _holder(out / SPECIMEN, procs)
    loser = procs[1 - procs.index(winner)]
    _, err = loser.communicate(timeout=180)
    assert loser.returncode == 1 and err.strip() == _busy_line(out / SPECIMEN, holder), err
    assert holder["command"] == "wsi-response run"
    os.kill(winner.pid, signal.SIGCONT)
    _, err = winner.communicate(timeout=180)
    assert winner.returncode == 0, err
    _same_results(out, data["reference"])


@pytest.mark.slow
def test_lock_of_a_killed_run_is_taken_over(data: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _popen("run", *data["slides"], "--specimen", SPECIMEN, "--out", out, *RUN)
    _holder(out / SPECIMEN, [proc])
    proc.kill()   # SIGKILL, while paused holding the locks
    proc.wait()
    done = cli("run", *data["slides"], "--specimen", SPECIMEN, "--out", out, *RUN)
    assert done.returncode == 0, done.stderr
    _same_results(out, data["reference"])


@pytest.mark.slow
def test_run_and_aggregate_at_once(data: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(data["reference"], out)
    run = _popen("run", *data["slides"], "--specimen", SPECIMEN, "--out", out, *RUN)
    _, holder = _holder(out / SPECIMEN, [run])
    refused = cli("aggregate", out)
    assert refused.returncode == 1 and refused.stdout == "" and refused.stderr.strip() == \
        _busy_line(out / SPECIMEN, holder), refused.stderr
    os.kill(run.pid, signal.SIGCONT)
    assert run.wait(timeout=180) == 0
    again = cli("aggregate", out, "--quiet")
    assert again.returncode == 0, again.stderr
    _same_results(out, data["reference"])


@pytest.mark.slow
def test_batch_skips_the_slides_a_run_is_writing(data: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("specimen_id,slide_path\n" + "".join(f"{SPECIMEN},{p}\n" for p in data["slides"])
                        + f"M-1,{data['other']}\n", encoding="utf-8")
    run = _popen("run", *data["slides"], "--specimen", SPECIMEN, "--out", out, *RUN)
    _, holder = _holder(out / SPECIMEN, [run])
    batch = cli("batch", manifest, "--out", out, *RUN)
    assert batch.returncode == 0, batch.stderr
    slide_dirs = [out / SPECIMEN / "slides" / p.stem for p in data["slides"]]
    busy = [line for line in batch.stderr.splitlines() if "in progress elsewhere" in line]
    assert busy == [f"wsi-response: [{i}/3] {SPECIMEN}/{d.name}: skipped, in progress elsewhere: {d}: is being "
                    f"written by pid {holder['pid']} on host {holder['host']} (wsi-response run, since "
                    f"{holder['since']}); wait for it or stop it" for i, d in enumerate(slide_dirs, start=1)]
    assert f"  specimen {SPECIMEN} [busy]: {out / SPECIMEN}: is being written by pid {holder['pid']}" in batch.stdout
    assert "  specimen M-1 [ok]" in batch.stdout
    os.kill(run.pid, signal.SIGCONT)
    assert run.wait(timeout=180) == 0
    again = cli("batch", manifest, "--out", out, *RUN)   # everything done: L-1 is aggregated by the batch
    assert again.returncode == 0 and "batch: 3 slides: 3 ok" in again.stdout, again.stdout + again.stderr
    _same_results(out, data["reference"])


# --------------------------------------------------------------------------- damaged tile stores


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:10])


# (damage done to the first slide's tiles.zarr, the store's one-line problem)
DAMAGES = {
    "chunk file deleted": (lambda s: (s / "probs" / "c" / "0" / "0").unlink(),
                           "tile store is damaged: {k} chunks flagged done have missing or invalid probabilities "
                           "(first: chunk 0)"),
    "chunk file truncated": (lambda s: _truncate(s / "probs" / "c" / "0" / "0"),
                             "tile store is damaged: array probs has an unreadable chunk file at row 0 (RuntimeError) "
                             "(and 1 more)"),
    "metadata corrupt": (lambda s: (s / "zarr.json").write_text('{"zarr_format": 3, "attri', encoding="utf-8"),
                         "tile store is damaged: its metadata is unreadable or not of a tile store"),
    "probs deleted": (lambda s: shutil.rmtree(s / "probs"),
                      "tile store is damaged: array probs is missing or unreadable (KeyError) (and 1 more)"),
    "only a .partial left": (lambda s: s.rename(s.with_name("tiles.zarr.partial")), "tile store is missing"),
}


@pytest.mark.slow
def test_damaged_stores_are_named_by_aggregate_then_rebuilt_by_run(data: dict, tmp_path: Path, capsys) -> None:
    import zarr

    from wsi_response.classifier import default_model_path, load_classifier
    from wsi_response.pipeline import run_specimen

    out = tmp_path / "out"
    first = data["slides"][0].stem
    expected = {}
    for i, (name, (harm, problem)) in enumerate(DAMAGES.items()):
        specimen = f"D{i}"
        shutil.copytree(data["reference"] / SPECIMEN, out / specimen)
        store = out / specimen / "slides" / first / "tiles.zarr"
        k = zarr.open_group(str(store), mode="r").attrs["n_chunks"]
        harm(store)
        expected[specimen] = f"{store}: {problem.format(k=k)} (the next run or batch redoes the slide)"

    agg = cli("aggregate", out, "--quiet")
    assert agg.returncode == 1 and "Traceback" not in agg.stderr, agg.stderr
    failed = [line.strip() for line in agg.stdout.splitlines() if line.strip().startswith("failed: ")]
    assert failed == [f"failed: {expected[s]}" for s in sorted(expected)]
    for specimen in expected:
        result = specimen_json(out, specimen)
        assert result["status"] == "partial" and [s["status"] for s in result["slides"]] == ["failed", "ok"]

    classifier = load_classifier(default_model_path(), data["cfg"].tiling)
    for specimen, line in expected.items():
        capsys.readouterr()
        run_specimen(data["slides"], specimen, out, classifier, data["cfg"], quiet=True)
        assert capsys.readouterr().err == f"wsi-response: {line}\n"
        _same_results(out, data["reference"], specimen)
        assert not list((out / specimen).rglob("*.partial")), "a partial store was left"
