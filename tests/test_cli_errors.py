"""Hostile input to the ``wsi-response`` command: every case is one exact line on stderr and exit code.

A finished run is made once; then each bad argument, config, override, FIFO, link loop, folder,
deep GeoJSON, read-only or full output folder is tried against it, and the test asserts the exit
code, the one-line message, that no traceback was printed, that nothing was written anywhere in
the test folder (the finished results are byte-identical) and that no internal-error log appeared.
Signals and a closed stdout end the command with one line (or none) and no child left running.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from _batch_data import cli as cli_subprocess
from _hostile import special_files
from wsi_response import cli

RUN = ["--device", "cpu", "--quiet", "inference.num_workers=0"]
REPO = Path(__file__).resolve().parent.parent
SPECIMEN = "S1"


@dataclass(frozen=True)
class Finished:
    root: Path      # the test folder: inputs below "in", results below "out"
    slide: Path
    out: Path
    inputs: Path    # bad inputs: fifo, loop, folder, bad configs, deep GeoJSON


def _env(root: Path) -> dict[str, str]:
    """This checkout first on the path; internal-error logs (there must be none) go below ``root``."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "XDG_CACHE_HOME": str(root / "cache")}


def run_cli(f: Finished, *args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """The command run in ``f.root`` (a relative path the tool wrongly wrote would land there)."""
    return cli_subprocess(*args, env=_env(f.root), cwd=f.root, timeout=timeout)


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every entry below ``root``: relative path -> (size, mtime_ns), links not followed."""
    entries = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            st = (Path(folder) / name).lstat()
            entries[str((Path(folder) / name).relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return entries


def assert_one_line(proc: subprocess.CompletedProcess, code: int, message: str) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert (proc.returncode, proc.stderr.strip()) == (code, message)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Finished:
    from wsi_response.synth import synth_specimen

    root = tmp_path_factory.mktemp("cli errors")
    truth = synth_specimen(root / "in", SPECIMEN, 1, seed=3, size_px=(2000, 1500), mpp=0.25)
    f = Finished(root, truth.slides[0].slide_path, root / "out", root / "bad")
    proc = run_cli(f, "run", f.slide, "--specimen", SPECIMEN, "--out", f.out, *RUN)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((f.out / SPECIMEN / "slides" / "S1_1" / "slide.json").read_text())["status"] == "ok"
    bad = f.inputs
    special_files(bad)
    (bad / "laughs.yaml").write_text("a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
                                     + "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n"
                                               for p, c in zip("abcdefgh", "bcdefghi")))
    (bad / "alias.yaml").write_text("tiling:\n  tile_px: &side 224\n  stride_px: *side\n")
    (bad / "deep.geojson").write_text("[" * 200_000 + "]" * 200_000)
    return f


def _bad(f: Finished, name: str) -> str:
    return str(f.inputs / name)


# (arguments after `run SLIDE --specimen S1 --out OUT`, exit code, message; "{bad}" is the bad-inputs folder)
RUN_CASES = [
    (["--mpp", "0"], 2, "argument --mpp: 0 µm/px is outside the plausible range 0.05-20 µm/px (see "
                        "`wsi-response run --help`)"),
    (["--mpp", "-1"], 2, "argument --mpp: -1 µm/px is outside the plausible range 0.05-20 µm/px (see "
                         "`wsi-response run --help`)"),
    (["--mpp", "nan"], 2, "argument --mpp: 'nan' is not a finite number (see `wsi-response run --help`)"),
    (["--mpp", "inf"], 2, "argument --mpp: 'inf' is not a finite number (see `wsi-response run --help`)"),
    (["--mpp", "abc"], 2, "argument --mpp: 'abc' is not a number (see `wsi-response run --help`)"),
    (["--config", "{bad}/latin1.yaml"], 2, "{bad}/latin1.yaml: not UTF-8 text (byte 0xe9 at offset 13)"),
    (["--config", "{bad}/laughs.yaml"], 2, "{bad}/laughs.yaml: not valid YAML (line 1, column 4: anchors and "
                                           "aliases (&name, *name) are not allowed in a config)"),
    (["--config", "{bad}/alias.yaml"], 2, "{bad}/alias.yaml: not valid YAML (line 2, column 12: anchors and "
                                          "aliases (&name, *name) are not allowed in a config)"),
    (["--config", "{bad}/fifo"], 2, "{bad}/fifo: is a FIFO, not a regular file"),
    (["--config", "{bad}/loop-a"], 2, "{bad}/loop-a: is a symbolic link loop (too many levels of symbolic links)"),
    (["--config", "{bad}/folder"], 2, "{bad}/folder: is a folder, not a config file"),
    (["--config", "{bad}/missing.yaml"], 2, "{bad}/missing.yaml: no such config file"),
    (["tiling.stride_px=[1"], 2, "override 'tiling.stride_px=[1': not a valid YAML value (line 1, column 3: "
                                 "expected ',' or ']', but got '<stream end>')"),
    (["tiling.stride_px=!!python/object/apply:os.system ['touch pwned']"], 2,
     "override \"tiling.stride_px=!!python/object/apply:os.system ['touch pwned']\": not a valid YAML value "
     "(line 1, column 1: could not determine a constructor for the tag "
     "'tag:yaml.org,2002:python/object/apply:os.system')"),
    (["tiling.stride_px=[&a [1, 1, 1], *a, *a]"], 2,
     "override 'tiling.stride_px=[&a [1, 1, 1], *a, *a]': not a valid YAML value (line 1, column 2: anchors "
     "and aliases (&name, *name) are not allowed in a config)"),
    (["tiling.stride_px=" + "[" * 50_000 + "]" * 50_000], 2,
     "override 'tiling.stride_px=" + "[" * 61 + "…: not a valid YAML value (line 1, column 17: nested more than 16 "
     "levels deep)"),
    (["tiling.stride_px=.nan"], 2, "tiling.stride_px: nan is not a finite number"),
    (["tiling.stride_px=1" + "0" * 5000], 2,
     "override 'tiling.stride_px=1" + "0" * 60 + "…: not a valid YAML value (Exceeds the limit (4300 digits) for "
     "integer string conversion: value has 5001 digits)"),
    (["--model", "{bad}/fifo"], 1, "{bad}/fifo: is a FIFO, not a regular file"),
    (["--model", "{bad}/loop-a"], 1, "{bad}/loop-a: is a symbolic link loop (too many levels of symbolic links)"),
    (["--model", "{bad}/folder"], 1, "{bad}/folder: is a folder, not a model file"),
]


@pytest.mark.parametrize("args, code, message", RUN_CASES, ids=[" ".join(c[0])[:40] for c in RUN_CASES])
def test_a_bad_argument_changes_nothing(finished: Finished, args: list[str], code: int, message: str) -> None:
    before = tree(finished.root)
    slide_json = (finished.out / SPECIMEN / "slides" / "S1_1" / "slide.json").read_bytes()
    specimen_json = (finished.out / SPECIMEN / "specimen.json").read_bytes()
    args = [a.replace("{bad}", str(finished.inputs)) for a in args]
    proc = run_cli(finished, "run", finished.slide, "--specimen", SPECIMEN, "--out", finished.out, *RUN, *args,
                   timeout=120)
    assert_one_line(proc, code, f"wsi-response: error: {message.replace('{bad}', str(finished.inputs))}")
    assert tree(finished.root) == before  # nothing written anywhere: results, inputs, working folder, logs
    assert (finished.out / SPECIMEN / "slides" / "S1_1" / "slide.json").read_bytes() == slide_json
    assert (finished.out / SPECIMEN / "specimen.json").read_bytes() == specimen_json


def test_a_device_this_machine_lacks_changes_nothing(finished: Finished) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    before = tree(finished.root)
    proc = run_cli(finished, "run", finished.slide, "--specimen", SPECIMEN, "--out", finished.out,
                   "--device", "cuda", "--quiet", timeout=120)
    assert_one_line(proc, 2, f"wsi-response: error: device: 'cuda' requested but torch sees no CUDA GPU (torch "
                             f"{torch.__version__}, CUDA build {torch.version.cuda}); use --device cpu")
    assert tree(finished.root) == before


# (command line, exit code, message); "{bad}" is the bad-inputs folder, "{slide}" the good slide
OTHER_CASES = [
    (["info", "{bad}/fifo"], 1, "{bad}/fifo: is a FIFO, not a regular file"),
    (["info", "{bad}/loop-a"], 1, "{bad}/loop-a: is a symbolic link loop (too many levels of symbolic links)"),
    (["info", "{bad}/folder"], 1, "{bad}/folder: is a folder, not a slide file"),
    (["info", "{bad}/missing.svs"], 1, "{bad}/missing.svs: no such file"),
    (["info", "{slide}", "--mpp", "0"], 2, "argument --mpp: 0 µm/px is outside the plausible range 0.05-20 µm/px "
                                           "(see `wsi-response info --help`)"),
    (["batch", "{bad}/fifo", "--out", "{bad}/never"], 2, "{bad}/fifo: is a FIFO, not a regular file"),
    (["batch", "{bad}/loop-a", "--out", "{bad}/never"], 2,
     "{bad}/loop-a: is a symbolic link loop (too many levels of symbolic links)"),
    (["batch", "{bad}/folder", "--out", "{bad}/never"], 2, "{bad}/folder: is a folder, not a manifest"),
    (["batch", "{bad}/missing.csv", "--out", "{bad}/never"], 2, "{bad}/missing.csv: no such manifest"),
    (["batch", "{bad}/missing.csv", "--out", "{bad}/never", "--workers", "0"], 2,
     "argument --workers: 0 is less than 1 (see `wsi-response batch --help`)"),
    (["batch", "{bad}/missing.csv", "--out", "{bad}/never", "--task-index", "-1"], 2,
     "argument --task-index: -1 is less than 0 (see `wsi-response batch --help`)"),
    (["batch", "{bad}/missing.csv", "--out", "{bad}/never", "--gpus", "none"], 2,
     "argument --gpus: 'none' is not a whole number (see `wsi-response batch --help`)"),
    (["slurm", "{bad}/missing.csv", "--out", "{bad}/never", "--tasks", "0"], 2,
     "argument --tasks: 0 is less than 1 (see `wsi-response slurm --help`)"),
    (["synth", "--out", "{bad}/never", "--specimen", "X", "--slides", "0"], 2,
     "argument --slides: 0 is less than 1 (see `wsi-response synth --help`)"),
    (["synth", "--out", "{bad}/never", "--specimen", "X", "--seed", "-1"], 2,
     "argument --seed: -1 is less than 0 (see `wsi-response synth --help`)"),
    (["synth", "--out", "{bad}/never", "--specimen", "X", "--viable-fraction", "2"], 2,
     "argument --viable-fraction: 2 is not between 0 and 1 (see `wsi-response synth --help`)"),
    (["aggregate", "{bad}/missing"], 2, "aggregate: {bad}/missing is not a folder"),
    *[(["train", "--slides", "{slide}", "--annotations", f"{{bad}}/{name}", "--out", "{bad}/never/model.safetensors",
        "--val-split", "0", "--epochs", "1", "--device", "cpu", "--quiet"], 1, f"{{bad}}/{name}: {problem}")
      for name, problem in (("fifo", "is a FIFO, not a regular file"),
                            ("loop-a", "is a symbolic link loop (too many levels of symbolic links)"),
                            ("folder", "is a folder, not an annotation file"),
                            ("deep.geojson", "arrays or objects nested too deeply to be GeoJSON"))],
]


@pytest.mark.parametrize("args, code, message", OTHER_CASES, ids=[" ".join(c[0])[:60] for c in OTHER_CASES])
def test_bad_input_of_every_command_is_one_line(finished: Finished, args: list[str], code: int,
                                                message: str) -> None:
    def fill(text: str) -> str:
        return text.replace("{bad}", str(finished.inputs)).replace("{slide}", str(finished.slide))

    before = tree(finished.root)
    proc = run_cli(finished, *map(fill, args), timeout=120)
    assert_one_line(proc, code, f"wsi-response: error: {fill(message)}")
    assert tree(finished.root) == before


def test_a_fifo_slide_fails_alone_in_run(finished: Finished, tmp_path: Path) -> None:
    proc = run_cli(finished, "run", finished.inputs / "fifo", "--specimen", "F", "--out", tmp_path / "out", *RUN,
                   timeout=120)
    assert_one_line(proc, 1, f"wsi-response: slide failed: {finished.inputs}/fifo: is a FIFO, not a regular file")
    record = json.loads((tmp_path / "out" / "F" / "slides" / "fifo" / "slide.json").read_text())
    assert (record["status"], record["error"]) == ("failed", f"{finished.inputs}/fifo: is a FIFO, not a regular file")


@pytest.mark.parametrize("as_json", [False, True])
def test_a_closed_stdout_ends_quietly(finished: Finished, as_json: bool) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "wsi_response.cli", "info", str(finished.slide),
                             *(["--json"] if as_json else [])], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=_env(finished.root), cwd=finished.root)
    proc.stdout.close()  # the reader is gone before the first line, as `| head -0` would
    err = proc.stderr.read().decode()
    assert (proc.wait(timeout=120), err) == (141, "")


def _children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            found.append(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc to see child processes")
@pytest.mark.parametrize("signum, code, message", [(signal.SIGTERM, 143, "wsi-response: terminated"),
                                                   (signal.SIGINT, 130, "wsi-response: interrupted")])
def test_a_signal_says_so_and_ends_every_child(finished: Finished, tmp_path: Path, signum: int, code: int,
                                               message: str) -> None:
    """SIGTERM to the command, SIGINT to its process group (Ctrl-C), while its tile readers run."""
    proc = subprocess.Popen([sys.executable, "-m", "wsi_response.cli", "run", str(finished.slide), "--specimen", "T",
                             "--out", str(tmp_path / "out"), "--device", "cpu", "--quiet", "inference.num_workers=2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(finished.root),
                            start_new_session=True)
    deadline = time.monotonic() + 240
    children: list[int] = []
    while not children and proc.poll() is None and time.monotonic() < deadline:
        children = _children(proc.pid)
        time.sleep(0.01)
    assert children, f"no child process started: {proc.poll()}"
    if signum == signal.SIGINT:
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    err = proc.stderr.read()
    assert (proc.wait(timeout=60), err.strip()) == (code, message)
    time.sleep(0.5)
    assert [c for c in children if Path(f"/proc/{c}").exists() and "Z" not in _state(c)] == []


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _mount_tmpfs(folder: Path, size: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (a real full or read-only disk) needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")


def _remount_read_only(folder: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True, capture_output=True)


@pytest.fixture
def mount_point(tmp_path: Path):
    folder = tmp_path / "disk"
    yield folder
    subprocess.run(["umount", str(folder)], capture_output=True)


def _copy(source: Path, target: Path, skip: tuple[str, ...] = ()) -> None:
    import shutil

    shutil.copytree(source, target, ignore=lambda folder, names: [n for n in names if n in skip])


def test_aggregate_in_a_read_only_folder(finished: Finished, mount_point: Path) -> None:
    _mount_tmpfs(mount_point, "8m")
    _copy(finished.out / SPECIMEN, mount_point / SPECIMEN)
    _remount_read_only(mount_point)
    before = tree(mount_point)
    proc = run_cli(finished, "aggregate", mount_point, timeout=120)
    assert_one_line(proc, 1, f"wsi-response: error: {mount_point}/{SPECIMEN}: output folder is not writable "
                             "(Read-only file system)")
    assert tree(mount_point) == before


@pytest.mark.parametrize("old_report", [False, True])
def test_a_full_disk_while_the_report_is_written(finished: Finished, mount_point: Path, old_report: bool) -> None:
    """The disk fills up at ``report.html``: one line naming it; no partial file, earlier files intact."""
    source = finished.out / SPECIMEN
    report = (source / "report.html").stat().st_size
    used = sum(p.stat().st_blocks * 512 for p in source.rglob("*") if p.is_file()) - (0 if old_report else report)
    _mount_tmpfs(mount_point, f"{(used + report // 2) // 1024 + 64}k")  # room for all but a new report
    _copy(source, mount_point / SPECIMEN, skip=() if old_report else ("report.html",))
    slides_before = {p: p.read_bytes() for p in (mount_point / SPECIMEN / "slides").rglob("*")
                     if p.is_file() and p.name != ".wsi-response.lock"}   # the lock names its latest holder
    proc = run_cli(finished, "aggregate", mount_point, timeout=120)
    target = mount_point / SPECIMEN / "report.html"
    assert_one_line(proc, 1, f"wsi-response: error: {target}: cannot write (No space left on device)")
    assert sorted(p.name for p in (mount_point / SPECIMEN).iterdir() if p.name != ".wsi-response.lock") == (
        ["report.html", "slides", "specimen.json"] if old_report else ["slides", "specimen.json"])
    if old_report:
        assert target.read_bytes() == (source / "report.html").read_bytes()
    assert (mount_point / SPECIMEN / "specimen.json").read_bytes() == (source / "specimen.json").read_bytes()
    assert {p: p.read_bytes() for p in slides_before} == slides_before
    assert not list(mount_point.rglob("*.partial"))


def test_an_internal_error_is_one_line_and_a_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A bug (here: an exception no code expects) prints one line naming the log with the traceback."""
    def broken(args: object) -> int:
        raise RuntimeError("unexpected\nstate")

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(cli, "_cmd_info", broken)
    monkeypatch.setattr(cli, "_cmd_aggregate", broken)
    assert cli.main(["info", "any.svs"]) == 70
    (log,) = (tmp_path / "cache" / "wsi-response" / "logs").iterdir()
    assert capsys.readouterr().err == (f"wsi-response: internal error: RuntimeError: unexpected state; "
                                       f"traceback in {log}\n")
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "in broken" in text and "RuntimeError: unexpected" in text

    (tmp_path / "results").mkdir()  # a command with an output folder keeps the log there
    assert cli.main(["aggregate", str(tmp_path / "results")]) == 70
    (log,) = (tmp_path / "results" / "logs").iterdir()
    assert capsys.readouterr().err == (f"wsi-response: internal error: RuntimeError: unexpected state; "
                                       f"traceback in {log}\n")


@pytest.mark.parametrize("text, problem", [
    ('{"slide_id": "x", "status": "o', "unreadable slide record (JSONDecodeError); run the slide again"),
    ("\udcff", "unreadable slide record (UnicodeDecodeError); run the slide again"),
    ('["x"]', "not a slide record of wsi-response (no status ok, ok_empty or failed); run the slide again"),
    ('{"slide_id": "x"}', "not a slide record of wsi-response (no status ok, ok_empty or failed); run the slide "
                          "again"),
])
def test_aggregate_names_a_broken_slide_record(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str,
                                               problem: str) -> None:
    record = tmp_path / "out" / "S" / "slides" / "x" / "slide.json"
    record.parent.mkdir(parents=True)
    record.write_bytes(text.encode("utf-8", "surrogateescape"))
    assert cli.main(["aggregate", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err == f"wsi-response: error: {record}: {problem}\n"
    assert not (tmp_path / "out" / "S" / "specimen.json").exists()
