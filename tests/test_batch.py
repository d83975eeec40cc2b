"""Batch runs: manifest, shards, device plan, resume, worker isolation, stop signals, SLURM scripts."""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _batch_data import DEVICE, OVERRIDES, batch_data, cli, pool_chunks, slide_json, specimen_json, without_timing
from wsi_response.batch import read_manifest, shard, task_from_env, worker_devices
from wsi_response.errors import ConfigError
from wsi_response.slurm import ARRAY_ID_PLACEHOLDER, SlurmOptions, aggregate_job, array_job

RUN = ["--device", DEVICE, *OVERRIDES]


# --------------------------------------------------------------------------- manifest, shards, devices


def _manifest(folder: Path, text: str) -> Path:
    path = folder / "m.csv"
    path.write_text(text, encoding="utf-8")
    return path


def test_manifest_paths_ids_and_bom(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    path = _manifest(tmp_path, "\ufeffslide_path,specimen_id,note\nx/S_1.svs,S,\n\n/abs/S_1.tiff,S,n\n"
                               "x/T.svs,T,\n")
    tasks = read_manifest(path)
    assert [(t.specimen_id, t.slide_id, t.line) for t in tasks] == [("S", "S_1", 2), ("S", "S_1-2", 4), ("T", "T", 5)]
    assert tasks[0].path == tmp_path / "x" / "S_1.svs" and tasks[1].path == Path("/abs/S_1.tiff")


@pytest.mark.parametrize("text, message", [
    ("specimen,path\nS,a.svs\n", "header 'specimen_id,slide_path'"),
    ("specimen_id,slide_path\n", "lists no slide"),
    ("specimen_id,slide_path\nS,\n", "line 2: empty"),
    ("specimen_id,slide_path\n../S,a.svs\n", "line 2: specimen id '../S' contains a path separator '/'"),
    ("specimen_id,slide_path\nS,a.svs\nS,b.svs\nS,./a.svs\nS,b.svs\n",
     "2 duplicated row(s): line 4 repeats line 2"),
])
def test_manifest_errors_name_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    path = _manifest(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        read_manifest(path)
    assert message in str(info.value) and str(path) in str(info.value) and "\n" not in str(info.value)


def test_duplicates_are_a_usage_error_before_any_work(tmp_path: Path) -> None:
    path = _manifest(tmp_path, "specimen_id,slide_path\nS,a.svs\nS,a.svs\n")
    proc = cli("batch", path, "--out", tmp_path / "out")
    assert proc.returncode == 2, proc.stderr
    assert "line 3 repeats line 2" in proc.stderr and not (tmp_path / "out").exists()


def test_shards_partition_the_manifest(tmp_path: Path) -> None:
    path = _manifest(tmp_path, "specimen_id,slide_path\n" + "".join(f"S{i % 3},s{i}.svs\n" for i in range(11)))
    tasks = read_manifest(path)
    shards = [shard(tasks, i, 4) for i in range(4)]
    assert sorted(t.line for s in shards for t in s) == [t.line for t in tasks]
    assert [len(s) for s in shards] == [3, 3, 3, 2] and shards[1] == shard(tasks, 1, 4)
    with pytest.raises(ConfigError):
        shard(tasks, 4, 4)


def test_task_from_slurm_environment() -> None:
    assert task_from_env({}) is None
    assert task_from_env({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}) == (3, 4)
    assert task_from_env({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "2"}) == (3, 4)
    assert task_from_env({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1",
                          "SLURM_ARRAY_TASK_STEP": "3"}) == (2, 3)
    with pytest.raises(ConfigError, match="--task-index"):
        task_from_env({"SLURM_ARRAY_TASK_ID": "6", "SLURM_ARRAY_TASK_COUNT": "3"})
    with pytest.raises(ConfigError, match="--task-index"):
        task_from_env({"SLURM_ARRAY_TASK_ID": "1"})


def test_worker_devices() -> None:
    assert worker_devices(None, None, []) == [None]
    assert worker_devices(None, 2, []) == [None, None]
    assert worker_devices("all", None, ["0", "1", "2"]) == ["0", "1", "2"]
    assert worker_devices("2", None, ["4", "5", "6"]) == ["4", "5"]
    assert worker_devices("all", 4, ["0", "1"]) == ["0", "1", "0", "1"]
    for gpus, visible in (("all", []), ("3", ["0", "1"]), ("x", ["0"])):
        with pytest.raises(ConfigError, match="--gpus"):
            worker_devices(gpus, None, visible)
    with pytest.raises(ConfigError, match="--workers"):
        worker_devices(None, 0, [])


# --------------------------------------------------------------------------- SLURM scripts (no SLURM needed)


def test_slurm_scripts_quote_hard_paths(tmp_path: Path) -> None:
    folder = tmp_path / "it's a \"dir\" $HOME ü 100%"
    manifest, out = folder / "m a.csv", folder / "out dir"
    opts = SlurmOptions(tasks=3, max_parallel=2, partition="gpu", gpus_per_task=2, mem="8G", time="1:00:00")
    job = array_job(manifest, out, opts, ["--model", str(folder / "m ü.safetensors"), "tiling.stride_px=200"])
    logs = str(out / "logs").replace("%", "%%")
    assert f"--output={logs}/%A_%a.out" in job.args and "--array=0-2%2" in job.args
    assert {"--gres=gpu:2", "--signal=B:USR1@120", "--partition=gpu", "--mem=8G", "--time=1:00:00"} <= set(job.args)
    # run the script's command line through bash, printing the arguments instead of executing Python
    line = job.script.splitlines()[-1].replace("exec ", "printf '%s\\n' ", 1)
    argv = subprocess.run(["bash", "-c", line], capture_output=True, text=True, check=True,
                          env={"SLURM_ARRAY_TASK_ID": "1", "HOME": "/nowhere"}).stdout.splitlines()
    assert argv[3:] == ["batch", str(manifest), "--out", str(out), "--task-index", "1", "--task-count", "3",
                        "--gpus", "all", "--model", str(folder / "m ü.safetensors"), "tiling.stride_px=200"]
    follow = aggregate_job(manifest, out, opts, [], "123")
    assert "--dependency=afterany:123" in follow.args and "--aggregate-only" in shlex.split(follow.script.splitlines()[-1])


def test_slurm_dry_run_prints_both_jobs(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, "specimen_id,slide_path\nS,a.svs\nS,b.svs\nT,c.svs\n")
    proc = cli("slurm", manifest, "--out", tmp_path / "out", "--dry-run", "--max-parallel", "2", "--gpus-per-task", "1",
               "--time", "30", "tissue.mask_mpp=8")
    assert proc.returncode == 0, proc.stderr
    assert "--array=0-2%2" in proc.stdout and "--dependency=afterany:<ARRAY_JOB_ID>" in proc.stdout
    assert "--gres=gpu:1" in proc.stdout and proc.stdout.count("tissue.mask_mpp=8") == 2
    assert not (tmp_path / "out").exists()


# a folder name that ends a fixed here-document and runs commands if anything is unquoted
HOSTILE = "it's \"q\" $(touch pwned) `touch pwned2` 100% $HOME \\\nWSI_RESPONSE_EOF\nWSI_RESPONSE_EOF_2\n#SBATCH --x\n"
# bash: sbatch records its arguments and stdin; `exec` records its arguments (the job script's last command)
RECORD = ('sbatch() { n=$((n + 1)); printf "%s\\0" "$@" > "args.$n"; cat > "stdin.$n"; }\n'
          'exec() { printf "%s\\0" "$@" > "$RECORD_TO"; }\n')


def _bash(code: str, cwd: Path, **env: str) -> None:
    subprocess.run(["bash", "-c", code], cwd=cwd, check=True, timeout=30, env={"PATH": os.environ["PATH"], **env})


def _nul_split(path: Path) -> list[str]:
    return path.read_bytes().decode().split("\0")[:-1]


def test_slurm_dry_run_is_safe_to_paste(tmp_path: Path) -> None:
    """The printed sbatch calls, run by bash, pass exactly the args and script; the scripts, run
    by bash, run exactly the batch commands; nothing in a path runs or ends a here-document."""
    folder = tmp_path / HOSTILE / f"b {HOSTILE}"
    folder.mkdir(parents=True)
    manifest, out = folder / f"m{HOSTILE}.csv", folder / f"out{HOSTILE}"
    manifest.write_text("specimen_id,slide_path\nS,a.svs\nS,b.svs\nT,c.svs\n", encoding="utf-8")
    proc = cli("slurm", manifest, "--out", out, "--dry-run", "--tasks", "2", "--gpus-per-task", "0",
               "--time", "30", "--stall-timeout", "90", "tissue.mask_mpp=8")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("<<'WSI_RESPONSE_EOF_3'\n") == 2   # the first free delimiter
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    _bash(RECORD + proc.stdout, sandbox)
    opts = SlurmOptions(tasks=2, gpus_per_task=0, time="30")
    batch_args = ["--stall-timeout", "90", "tissue.mask_mpp=8"]
    jobs = [array_job(manifest, out, opts, batch_args),
            aggregate_job(manifest, out, opts, batch_args, ARRAY_ID_PLACEHOLDER)]
    for n, job in enumerate(jobs, start=1):
        assert tuple(_nul_split(sandbox / f"args.{n}")) == job.args
        assert (sandbox / f"stdin.{n}").read_text(encoding="utf-8") == job.script
        _bash(RECORD + f". ./stdin.{n}", sandbox, RECORD_TO=f"argv.{n}", SLURM_ARRAY_TASK_ID="1")
    command = [sys.executable, "-m", "wsi_response.cli", "batch", str(manifest), "--out", str(out)]
    assert _nul_split(sandbox / "argv.1") == [*command, "--task-index", "1", "--task-count", "2", *batch_args]
    assert _nul_split(sandbox / "argv.2") == [*command, "--aggregate-only", *batch_args]
    assert sorted(p.name for p in sandbox.iterdir()) == ["args.1", "args.2", "argv.1", "argv.2", "stdin.1",
                                                         "stdin.2"]   # nothing else ran
    assert not out.exists()


# --------------------------------------------------------------------------- end to end


def _mtimes(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted(out.glob("*/slides/*/slide.json"))}


@pytest.mark.slow
def test_shards_two_workers_resume_and_change(tmp_path_factory: pytest.TempPathFactory) -> None:
    data = batch_data(tmp_path_factory)
    out = tmp_path_factory.mktemp("batch out") / "résultats 1"
    # shard 0 of 2 with two CPU workers, shard 1 from SLURM's variables (array 5-6), then the follow-up
    first = cli("batch", data.manifest, "--out", out, "--task-index", "0", "--task-count", "2", "--workers", "2", *RUN)
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "6", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "2"}
    second = cli("batch", data.manifest, "--out", out, *RUN, env=env)
    assert first.returncode == 1 and "A/bad: FAILED" in first.stderr and "truncated" in first.stderr.lower(), first.stderr
    assert second.returncode == 0, second.stderr
    finished = [line.split("] ")[1].split(":")[0] for p in (first, second) for line in p.stderr.splitlines()
                if line.startswith("wsi-response: [")]
    assert sorted(finished) == ["A/A_1", "A/A_2", "A/bad", "B/B_1", "B/B_2"]      # each slide exactly once
    follow = cli("batch", data.manifest, "--out", out, "--aggregate-only", *RUN)
    assert follow.returncode == 1 and "failed: A/bad" in follow.stdout, follow.stdout + follow.stderr
    for specimen in ("A", "B"):
        assert without_timing(specimen_json(out, specimen)) == without_timing(data.reference[specimen])
    assert slide_json(out, "A", "bad")["status"] == "failed"

    # resume: nothing done is redone (only the failed slide is retried); `aggregate` gives the same numbers
    before = _mtimes(out)
    again = cli("batch", data.manifest, "--out", out, "--quiet", *RUN)
    assert again.returncode == 1 and "4 ok" in again.stdout and "1 failed" in again.stdout, again.stdout
    after = _mtimes(out)
    assert {k: v for k, v in after.items() if "bad" not in k} == {k: v for k, v in before.items() if "bad" not in k}
    assert cli("aggregate", out / "B").returncode == 0
    assert without_timing(specimen_json(out, "B")) == without_timing(data.reference["B"])

    # a changed slide file is redone, the others are not
    b1 = next(p for s, p in data.rows if p.name == "B_1.svs")
    stat = b1.stat()
    os.utime(b1, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    try:
        changed = cli("batch", data.manifest, "--out", out, "--quiet", *RUN)
    finally:
        os.utime(b1, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert changed.returncode == 1
    redone = {k for k, v in _mtimes(out).items() if after[k] != v}
    assert redone == {"A/slides/bad/slide.json", "B/slides/B_1/slide.json"}


def _worker_pids(parent: int) -> list[int]:
    """Pids of the multiprocessing spawn children of ``parent``."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (proc / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and b"spawn_main" in cmdline:
            pids.append(int(proc.name))
    return pids


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(poll)


@pytest.mark.slow
def test_crashed_worker_and_stop_signal(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A worker killed by SIGSEGV fails only its slide; SIGUSR1 keeps finished slides; a rerun completes."""
    import sys

    data = batch_data(tmp_path_factory)
    out = tmp_path_factory.mktemp("batch stop") / "out"
    command = [sys.executable, "-m", "wsi_response.cli", "batch", str(data.manifest), "--out", str(out), *RUN]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # one worker, manifest order A_1, A_2, bad, B_1, B_2: kill the worker while it runs A_2
        # (its folder appears when its tissue and grid are done, before inference)
        _wait_for(out / "A/slides/A_2", proc, poll=0.005)
        [worker] = _worker_pids(proc.pid)
        os.kill(worker, signal.SIGSEGV)
        # then stop the batch (SLURM's time-limit warning) while B_2 runs
        _wait_for(out / "B/slides/B_2", proc, poll=0.005)
        proc.send_signal(signal.SIGUSR1)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGUSR1, stderr
    assert "stopped by SIGUSR1" in stderr and "run the same command again" in stderr
    crashed = slide_json(out, "A", "A_2")
    assert crashed["status"] == "failed" and "SIGSEGV" in crashed["error"], crashed["error"]
    assert slide_json(out, "A", "A_1")["status"] == slide_json(out, "B", "B_1")["status"] == "ok"
    assert not (out / "B/slides/B_2/slide.json").exists()            # abandoned: no record, so it is redone
    assert not (out / "B" / "specimen.json").exists()
    before = _mtimes(out)

    rerun = cli("batch", data.manifest, "--out", out, "--quiet", *RUN)
    assert rerun.returncode == 1 and "1 failed, 4 ok" in rerun.stdout, rerun.stdout + rerun.stderr
    after = _mtimes(out)
    assert after["A/slides/A_1/slide.json"] == before["A/slides/A_1/slide.json"]
    assert after["B/slides/B_1/slide.json"] == before["B/slides/B_1/slide.json"]
    for specimen in ("A", "B"):
        assert without_timing(specimen_json(out, specimen)) == without_timing(data.reference[specimen])


HANG_TIMEOUT_S = 600   # the batch below takes well under a minute on two cores; the unfixed code never ended


@pytest.mark.slow
def test_ordinary_slides_start_every_pool_and_never_hang(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Regression: the batch hung forever on ordinary slides (the focus measure's process pool,
    forked from a worker that ignored SIGTERM, could not be terminated). The slides start the
    focus pool and the inference DataLoader's workers; the batch must end with the local numbers."""
    data = batch_data(tmp_path_factory)
    good = [(s, p) for s, p in data.rows if p != data.bad]
    assert all(min(pool_chunks(p)) > 1 for _, p in good), [pool_chunks(p) for _, p in good]
    folder = tmp_path_factory.mktemp("no hang")
    manifest = folder / "good.csv"
    manifest.write_text("specimen_id,slide_path\n" + "".join(f'{s},"{p}"\n' for s, p in good), encoding="utf-8")
    out = folder / "out"
    proc = cli("batch", manifest, "--out", out, *RUN, timeout=HANG_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    assert "batch: 4 slides: 4 ok" in proc.stdout, proc.stdout
    for specimen, path in good:
        assert (without_timing(slide_json(out, specimen, path.stem))
                == without_timing(slide_json(data.reference_out, specimen, path.stem)))
    assert without_timing(specimen_json(out, "B")) == without_timing(data.reference["B"])


STALL_S = 30   # --stall-timeout of the test below: well above any pause of a working slide on two busy cores


def _processes() -> list[tuple[int, int, int, str]]:
    """``(pid, parent pid, process group, state)`` of every process."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            state, ppid, pgrp = (proc / "stat").read_text().rsplit(")", 1)[1].split()[:3]
            found.append((int(proc.name), int(ppid), int(pgrp), state))
        except (OSError, ValueError):
            continue
    return found


@pytest.mark.slow
def test_stalled_worker_is_killed_and_the_next_slide_runs(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A worker frozen (SIGSTOP) while its focus workers run is killed with them after
    --stall-timeout; its slide is failed with 'no progress for N s' and the next slide runs."""
    data = batch_data(tmp_path_factory)
    (_, a1), (_, b1) = data.rows[0], data.rows[3]
    folder = tmp_path_factory.mktemp("stall")
    manifest = folder / "m.csv"
    manifest.write_text(f'specimen_id,slide_path\nA,"{a1}"\nB,"{b1}"\n', encoding="utf-8")
    out = folder / "out"
    command = [sys.executable, "-m", "wsi_response.cli", "batch", str(manifest), "--out", str(out),
               "--stall-timeout", str(STALL_S), *RUN]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:   # the worker's first children are the focus measure's workers (A_1's tissue stage)
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            workers = _worker_pids(proc.pid)
            if workers and any(ppid == workers[0] for _, ppid, _, _ in _processes()):
                break
            time.sleep(0.005)
        [worker] = workers
        os.kill(worker, signal.SIGSTOP)
        frozen = time.monotonic()
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, stderr
    error = f"{a1}: no progress for {STALL_S} s; its worker process was killed"
    finished = [line for line in stderr.splitlines() if line.startswith("wsi-response: [")]
    assert finished[0] == f"wsi-response: [1/2] A/A_1: FAILED: {error}", stderr
    assert finished[1].startswith("wsi-response: [2/2] B/B_1: ok, "), stderr
    assert time.monotonic() - frozen > STALL_S
    assert slide_json(out, "A", "A_1")["status"] == "failed" and slide_json(out, "A", "A_1")["error"] == error
    assert without_timing(slide_json(out, "B", "B_1")) == without_timing(slide_json(data.reference_out, "B", "B_1"))
    assert "batch: 2 slides: 1 failed, 1 ok" in stdout and f"failed: A/A_1: {error}" in stdout, stdout
    assert [p for p in _processes() if p[2] == worker and p[3] not in "ZX"] == []   # none of its group is left


def test_unwritable_output_stops_with_one_line(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, "specimen_id,slide_path\nS,a.svs\n")
    (tmp_path / "file").write_text("")
    proc = cli("batch", manifest, "--out", tmp_path / "file" / "out", "--quiet", *RUN)
    assert proc.returncode == 1
    [line] = [ln for ln in proc.stderr.splitlines() if ln.startswith("wsi-response: error:")]
    assert "not writable" in line and str(tmp_path / "file" / "out") in line
