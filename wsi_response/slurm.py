"""SLURM job-array submission of a batch, and the follow-up aggregate job.

One array job of ``tasks`` tasks runs ``wsi-response batch MANIFEST --out DIR --task-index
$SLURM_ARRAY_TASK_ID --task-count N`` (each task a round-robin shard of the manifest's slides),
at most ``max_parallel`` at once. A second job, ``--dependency=afterany:<array job>``, runs after
every task has ended (failed or not) and runs ``batch --aggregate-only``: it aggregates each
complete specimen, writes ``DIR/batch-summary.json`` and lists the failed and unfinished slides.

Every sbatch option goes on sbatch's command line (an argument list, no shell), and the job script
quotes every path with :func:`shlex.quote`, so spaces, quotes, ``$``, backticks, newlines and
non-ASCII characters survive; ``--dry-run`` prints each call as a bash here-document whose
delimiter is no line of the script (:meth:`Submission.shell`), so it is safe to paste. Every batch
call gets ``--stall-timeout`` (the batch's no-progress watchdog). Tasks get
SIGUSR1 ``signal_s`` seconds before their time limit (``--signal=B:USR1@...``); the script
``exec``\\s Python, so the signal reaches the batch, which abandons the slides in progress and
exits, keeping every finished slide. Submitting the same command again continues (resume).
Logs: ``DIR/logs/<array job>_<task>.out`` and ``DIR/logs/<job>-aggregate.out``.
"""
from __future__ import annotations

import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .errors import ConfigError, WsiResponseError
from .ids import check_inside
from .pipeline import check_writable

__all__ = ["SlurmOptions", "Submission", "batch_command", "array_job", "aggregate_job", "submit"]

ARRAY_ID_PLACEHOLDER = "<ARRAY_JOB_ID>"
HEREDOC_DELIMITER = "WSI_RESPONSE_EOF"  # of --dry-run's scripts; _2, _3 ... while a line of the script equals it


@dataclass(frozen=True)
class SlurmOptions:
    """Resources of each array task; None leaves the cluster's default."""

    tasks: int                          # array size; each task a shard of the slides
    max_parallel: int | None = None     # tasks running at once (%K)
    partition: str | None = None
    gpus_per_task: int = 0              # GPUs per task (--gres=gpu:N); the batch uses all of them
    cpus_per_task: int | None = None
    mem: str | None = None              # per task, sbatch syntax (e.g. 16G)
    time: str | None = None             # per task, sbatch syntax (e.g. 4:00:00)
    signal_s: int = 120                 # seconds before the time limit the batch is told to stop
    job_name: str = "wsi-response"


@dataclass(frozen=True)
class Submission:
    """An sbatch call: its arguments and the script fed on stdin."""

    args: tuple[str, ...]
    script: str

    def shell(self) -> str:
        """The call as a bash command that feeds exactly ``script`` (which ends with a newline) to
        ``sbatch args`` (for --dry-run): a quoted here-document (no expansion) whose delimiter is
        no line of the script, whatever the paths in it."""
        lines = set(self.script.split("\n"))
        delimiter, n = HEREDOC_DELIMITER, 1
        while delimiter in lines:
            n += 1
            delimiter = f"{HEREDOC_DELIMITER}_{n}"
        return f"sbatch {shlex.join(self.args)} <<'{delimiter}'\n{self.script}{delimiter}\n"


def batch_command(manifest: Path, out_dir: Path, extra: Sequence[str]) -> list[str]:
    """``python -m wsi_response.cli batch MANIFEST --out DIR *extra`` with this interpreter and absolute paths."""
    return [sys.executable, "-m", "wsi_response.cli", "batch", str(manifest.resolve()), "--out", str(out_dir.resolve()),
            *extra]


def _common(opts: SlurmOptions) -> list[str]:
    args = ["--parsable", "--ntasks=1"]
    if opts.partition:
        args.append(f"--partition={opts.partition}")
    if opts.time:
        args.append(f"--time={opts.time}")
    return args


def _log(out_dir: Path, pattern: str) -> str:
    """``--output`` path: sbatch expands ``%`` patterns, so a literal ``%`` in the folder is doubled."""
    return f"--output={str(out_dir.resolve() / 'logs').replace('%', '%%')}/{pattern}"


def _script(title: str, command_line: str) -> str:
    """A bash job script that replaces itself with ``command_line`` (so signals reach Python)."""
    return f"#!/bin/bash\n# {title}\nexec {command_line}\n"


def array_job(manifest: Path, out_dir: Path, opts: SlurmOptions, batch_args: Sequence[str]) -> Submission:
    """The job array: task ``$SLURM_ARRAY_TASK_ID`` runs its shard of the manifest."""
    if opts.tasks < 1:
        raise ConfigError(f"--tasks {opts.tasks}: need at least 1")
    if opts.max_parallel is not None and opts.max_parallel < 1:
        raise ConfigError(f"--max-parallel {opts.max_parallel}: need at least 1")
    array = f"0-{opts.tasks - 1}" + (f"%{opts.max_parallel}" if opts.max_parallel else "")
    args = [*_common(opts), f"--job-name={opts.job_name}", f"--array={array}", _log(out_dir, "%A_%a.out"),
            f"--signal=B:USR1@{opts.signal_s}"]
    if opts.cpus_per_task:
        args.append(f"--cpus-per-task={opts.cpus_per_task}")
    if opts.mem:
        args.append(f"--mem={opts.mem}")
    if opts.gpus_per_task:
        args.append(f"--gres=gpu:{opts.gpus_per_task}")
    gpus = ["--gpus", "all"] if opts.gpus_per_task else []
    line = (shlex.join(batch_command(manifest, out_dir, [])) + ' --task-index "$SLURM_ARRAY_TASK_ID" '
            + shlex.join(["--task-count", str(opts.tasks), *gpus, *batch_args]))
    return Submission(tuple(args), _script("wsi-response batch: one shard of the manifest per array task", line))


def aggregate_job(manifest: Path, out_dir: Path, opts: SlurmOptions, batch_args: Sequence[str],
                  array_job_id: str) -> Submission:
    """The follow-up job: after the array ends (any outcome), aggregate and summarise."""
    args = [*_common(opts), f"--job-name={opts.job_name}-aggregate",
            f"--dependency=afterany:{array_job_id}", "--kill-on-invalid-dep=no", _log(out_dir, "%j-aggregate.out"),
            "--cpus-per-task=1"]
    if opts.mem:
        args.append(f"--mem={opts.mem}")
    line = shlex.join(batch_command(manifest, out_dir, ["--aggregate-only", *batch_args]))
    return Submission(tuple(args), _script(f"wsi-response: aggregate after array job {array_job_id}", line))


def submit(manifest: Path, out_dir: Path, opts: SlurmOptions, batch_args: Sequence[str], *,
           dry_run: bool = False) -> tuple[str, str, list[Submission]]:
    """Submit the array job and its aggregate job; returns ``(array id, aggregate id, submissions)``.

    ``batch_args`` are passed to every ``batch`` call (model, config, device, ``key=value``).
    With ``dry_run`` nothing is submitted and the ids are placeholders.
    """
    first = array_job(manifest, out_dir, opts, batch_args)
    if dry_run:
        return ARRAY_ID_PLACEHOLDER, "<AGGREGATE_JOB_ID>", [
            first, aggregate_job(manifest, out_dir, opts, batch_args, ARRAY_ID_PLACEHOLDER)]
    check_inside(out_dir, out_dir / "logs")
    check_writable(out_dir / "logs")
    array_id = _sbatch(first)
    second = aggregate_job(manifest, out_dir, opts, batch_args, array_id)
    return array_id, _sbatch(second), [first, second]


def _sbatch(job: Submission) -> str:
    """Run sbatch; returns the job id."""
    try:
        proc = subprocess.run(["sbatch", *job.args], input=job.script, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise WsiResponseError("sbatch: not found; run this on a SLURM login node (or start one: "
                               "scripts/slurm-localhost.sh start)") from None
    except subprocess.TimeoutExpired:
        raise WsiResponseError("sbatch: no answer within 120 s (is slurmctld up?)") from None
    if proc.returncode != 0:
        raise WsiResponseError(f"sbatch failed ({proc.returncode}): {' '.join(proc.stderr.split())}")
    return proc.stdout.strip().split(";")[0]
