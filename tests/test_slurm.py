"""A real SLURM job array on this machine (scripts/slurm-localhost.sh): shards, failures, stop, resume.

The slides are of ordinary size and start every process pool of the pipeline (tests/_batch_data.py),
so an array task that hangs on a real slide fails this test (by the wait's time limit).

The session fixture installs (apt-get, as root) and starts a single-node SLURM; when that is not
possible the test FAILS with the script's message: it is never skipped.
"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from _batch_data import DEVICE, OVERRIDES, batch_data, cli, slide_json, specimen_json, without_timing

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "slurm-localhost.sh"


@pytest.fixture(scope="session")
def slurm() -> None:
    """A running single-node SLURM (started here, and stopped again, unless it was already up)."""
    try:
        proc = subprocess.run([str(SCRIPT), "start"], capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"cannot start a local SLURM with {SCRIPT}: {exc}", pytrace=False)
    if proc.returncode != 0:
        pytest.fail(f"cannot start a local SLURM with {SCRIPT} start (exit {proc.returncode}): "
                    f"{proc.stderr.strip()[-2000:]}", pytrace=False)
    started = proc.stdout.strip().splitlines()[-1:] == ["started"]
    yield
    if started:
        subprocess.run([str(SCRIPT), "stop"], capture_output=True, timeout=60)


def _queued(job_ids: list[str]) -> list[str]:
    """Lines of squeue for these jobs (empty once all have ended)."""
    proc = subprocess.run(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i %T"], capture_output=True, text=True)
    return proc.stdout.split("\n") if proc.returncode == 0 and proc.stdout.strip() else []


def _wait_jobs(job_ids: list[str], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while _queued(job_ids):
        assert time.monotonic() < deadline, f"SLURM jobs {job_ids} still queued after {timeout} s: {_queued(job_ids)}"
        time.sleep(0.5)


def _submit(manifest: Path, out: Path) -> tuple[str, str]:
    proc = cli("slurm", manifest, "--out", out, "--tasks", "2", "--max-parallel", "2", "--gpus-per-task", "0",
               "--cpus-per-task", "1", "--mem", "2G", "--time", "10", "--device", DEVICE, *OVERRIDES)
    assert proc.returncode == 0, proc.stderr
    array_id = proc.stdout.split("submitted array job ")[1].split(":")[0]
    aggregate_id = proc.stdout.split("submitted aggregate job ")[1].split()[0]
    return array_id, aggregate_id


@pytest.mark.slow
def test_job_array_failure_stop_and_resume(slurm: None, tmp_path_factory: pytest.TempPathFactory) -> None:
    data = batch_data(tmp_path_factory)
    out = tmp_path_factory.mktemp("slurm") / "out dir ü"
    jobs: list[str] = []
    try:
        # 1. submit; when the first slide is finished, send the time-limit warning and cancel the rest
        jobs += _submit(data.manifest, out)
        deadline = time.monotonic() + 600
        while not list(out.glob("*/slides/*/slide.json")):
            assert time.monotonic() < deadline, f"no slide finished in 600 s; logs: {_logs(out)}"
            time.sleep(0.1)
        subprocess.run(["scancel", "--batch", "--signal=USR1", jobs[0]], check=True)
        subprocess.run(["scancel", "--state=PENDING", jobs[0]], check=True)
        _wait_jobs(jobs)
        first = json.loads((out / "batch-summary.json").read_text())   # written by the aggregate job
        assert first["counts"].get("not_done", 0) >= 1, first["counts"]
        assert "stopped by SIGUSR1" in _logs(out), _logs(out)
        finished = {p: p.stat().st_mtime_ns for p in out.glob("*/slides/*/slide.json")
                    if json.loads(p.read_text())["status"] == "ok"}

        # 2. the same command again continues: nothing finished is recomputed
        jobs += _submit(data.manifest, out)
        _wait_jobs(jobs)
    finally:
        subprocess.run(["scancel", *jobs], capture_output=True)
    summary = json.loads((out / "batch-summary.json").read_text())
    assert summary["counts"] == {"ok": 4, "failed": 1}, summary["counts"]
    assert [(s["specimen_id"], s["slide_id"]) for s in summary["failed"]] == [("A", "bad")]
    assert "truncated" in summary["failed"][0]["error"]
    assert {p: p.stat().st_mtime_ns for p in finished} == finished
    aggregate_log = (out / "logs" / f"{jobs[-1]}-aggregate.out").read_text()
    assert "failed: A/bad" in aggregate_log and "1 failed, 4 ok" in aggregate_log, aggregate_log
    assert slide_json(out, "A", "bad")["status"] == "failed"
    for specimen in ("A", "B"):
        assert without_timing(specimen_json(out, specimen)) == without_timing(data.reference[specimen])
    assert sorted(p.name for p in (out / "logs").glob(f"{jobs[2]}_*.out")) == [f"{jobs[2]}_0.out", f"{jobs[2]}_1.out"]


def _logs(out: Path) -> str:
    return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')}" for p in sorted((out / "logs").glob("*.out")))
