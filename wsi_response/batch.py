"""Batch runs over a manifest: sharding, resume, per-slide status, isolated worker processes.

Manifest: a CSV with the header ``specimen_id,slide_path`` (more columns are ignored); relative
slide paths are relative to the manifest's folder. Specimen ids follow :mod:`~wsi_response.ids`
(cells are trimmed of spaces first). A slide file listed twice for a specimen (by any spelling or
link) is a usage error; rows whose file is missing are reported up front and recorded as failed
slides, so the rest still runs.

- **Unit of work**: one slide (one row). Task ``i`` of ``N`` takes rows ``i, i+N, i+2N, ...`` of
  the manifest as given (round-robin, so every task gets a similar mix). Slide ids come from
  :func:`~wsi_response.ids.unique_slide_ids` over *all* rows of a specimen, in manifest order, so
  every task names every slide the same way (and as ``run`` does).
- **Done**: a ``slide.json`` with status ``ok``/``ok_empty`` whose ``path``, ``source`` (file size
  and mtime), model sha256 and ``config_sha256`` match the current ones. Done slides are skipped;
  changed ones are redone; failed ones are retried on every run (a lost mount gets another
  chance; a corrupt file fails again in seconds). A slide's old ``slide.json`` is removed before it
  is redone, and the pipeline writes the new one last and atomically, so an abandoned slide never
  counts as done (its finished tile chunks are kept in the tile store and reused).
- **Isolation**: slides run in worker processes (``spawn``), one slide at a time each; the
  classifier is loaded once per worker. Each worker leads its own process group (its tile readers
  are in it) and is ended with SIGKILL to that group. A worker that dies (a segfault in a codec,
  the OOM killer) has its slide recorded as failed and is replaced; the next slide is unaffected.
- **Watchdog**: a worker reports each stage of a slide and each chunk of tiles it finishes. One
  that reports nothing for ``stall_timeout_s`` seconds (default 1800) is killed with its
  processes and its slide recorded as failed (``no progress for N s``); the next slide gets a
  fresh worker, so one stuck slide (a hung file system, a deadlock) never stalls the task. A
  worker that does not start within that time ends the run (exit 1).
- **Devices**: ``gpus`` (``"all"`` or a count) pins one worker per visible GPU through
  ``CUDA_VISIBLE_DEVICES``; ``workers`` sets the number of worker processes (default: one per
  GPU, else one). CPU threads are split evenly between workers.
- **Signals**: SIGUSR1 (SLURM's time-limit warning), SIGTERM and SIGINT abandon the slides in
  progress at once, keep every finished slide and end the run (exit 128 + signal number); running
  the same command again continues.
- **Concurrent writers** (:mod:`~wsi_response.locks`): a worker computes a slide only while it
  holds the slide folder's lock; a slide whose folder another process holds (another batch task,
  a ``run``) is skipped as ``busy``, "in progress elsewhere": neither done nor failed, and the exit
  status does not count it. Under the lock a slide finished meanwhile by another process is not
  redone. A slide whose tile store is damaged is not done (it is redone, the store rebuilt).
- **Aggregation**: at the end of a task, every specimen of its shard whose slides all have a
  current ``slide.json`` (ok or failed) is aggregated, under the specimen's locks; one that another
  process holds is left to it (the last writer aggregates; ``busy`` in the summary). :func:`finalize_batch` (``--aggregate-only``,
  the SLURM follow-up job, and the end of an unsharded run) aggregates every complete specimen
  and writes ``DIR/batch-summary.json``.
"""
from __future__ import annotations

import csv
import io
import json
import multiprocessing
import os
import signal
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from .atomic import write_json_atomic
from .children import STOP_SIGNALS, die_with_parent, end_process, exit_reason
from .config import Config
from .errors import ConfigError, OutputError, SlideReadError, WsiResponseError
from .ids import check_inside, check_specimen_id, folder_key, same_file_pairs, unique_slide_ids
from .inputs import UnreadableInput, read_regular_file
from .locks import FolderBusyError, folder_lock, specimen_locks
from .pipeline import (aggregate_specimen, check_writable, config_sha256, current_slide_record, damaged_store,
                       process_slide, raise_if_environment, record_failure)

__all__ = ["SlideTask", "BatchResult", "read_manifest", "missing_slides", "shard", "task_from_env",
           "worker_devices", "run_batch", "finalize_batch", "SUMMARY_NAME", "STALL_TIMEOUT_S"]

MANIFEST_COLUMNS = ("specimen_id", "slide_path")
SUMMARY_NAME = "batch-summary.json"
BUSY = "busy"   # status of a slide (or specimen) whose folder another process holds: in progress elsewhere
STALL_TIMEOUT_S = 1800.0  # default: seconds without a sign of progress after which a worker is killed
_POLL_S = 0.5


@dataclass(frozen=True)
class SlideTask:
    """One manifest row: a slide of a specimen, with its (specimen-unique) slide id."""

    specimen_id: str
    slide_id: str
    path: Path   # absolute
    line: int    # line in the manifest (the header is line 1)

    def slide_dir(self, out_dir: Path) -> Path:
        return out_dir / self.specimen_id / "slides" / self.slide_id


@dataclass
class BatchResult:
    """What one ``run_batch`` call did; ``statuses`` maps each slide it ran to ok/ok_empty/failed, or
    ``busy`` when another process held its folder (in progress elsewhere: not run, not failed)."""

    tasks: list[SlideTask]
    skipped: list[SlideTask] = field(default_factory=list)
    statuses: dict[SlideTask, str] = field(default_factory=dict)
    aggregated: list[str] = field(default_factory=list)
    summary: dict[str, Any] | None = None   # batch-summary.json, written by an unsharded run
    stopped_by: int | None = None           # signal number that ended the run early

    @property
    def failed(self) -> list[SlideTask]:
        return [t for t, s in self.statuses.items() if s == "failed"]

    @property
    def busy(self) -> list[SlideTask]:
        return [t for t, s in self.statuses.items() if s == BUSY]


# --------------------------------------------------------------------------- manifest and shards


def read_manifest(path: str | os.PathLike) -> list[SlideTask]:
    """Rows of a manifest CSV as :class:`SlideTask` (absolute paths, specimen-unique slide ids).

    Raises :class:`ConfigError` (one line naming the file) for a missing header, empty fields, a
    specimen id that breaks :mod:`~wsi_response.ids`' rule, specimen ids that differ only in letter
    case, or a slide file listed twice for one specimen (all of them named).
    """
    path = Path(path)
    try:
        text = read_regular_file(path, "manifest").decode("utf-8-sig")   # Excel writes a BOM; newlines inside quotes are kept
    except UnreadableInput as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: cannot read the manifest ({exc})") from None
    rows = csv.reader(io.StringIO(text, newline=""))
    header = [h.strip() for h in next(rows, [])]
    if not set(MANIFEST_COLUMNS) <= set(header):
        raise ConfigError(f"{path}: the first line must be the header 'specimen_id,slide_path' (got {','.join(header)!r})")
    ispec, ipath = header.index("specimen_id"), header.index("slide_path")
    entries: list[tuple[str, Path, int]] = []
    spellings: dict[str, tuple[str, int]] = {}   # case-folded specimen id -> (id, first line)
    start = rows.line_num + 1
    for row in rows:
        line, start = start, rows.line_num + 1   # a row's first line (a quoted newline spans lines)
        if not any(cell.strip() for cell in row):
            continue
        specimen = row[ispec].strip(" ") if ispec < len(row) else ""
        slide = row[ipath].strip() if ipath < len(row) else ""
        if not specimen or not slide:
            raise ConfigError(f"{path}: line {line}: empty specimen_id or slide_path")
        check_specimen_id(specimen, f"{path}: line {line}")
        other, first_line = spellings.setdefault(folder_key(specimen), (specimen, line))
        if other != specimen:
            raise ConfigError(f"{path}: line {line}: specimen id {specimen!r} differs from {other!r} (line "
                              f"{first_line}) only in letter case or Unicode form; they would share a folder on many file systems")
        entries.append((specimen, Path(os.path.abspath(path.parent / Path(slide).expanduser())), line))
    if not entries:
        raise ConfigError(f"{path}: the manifest lists no slide")
    by_specimen: dict[str, list[int]] = {}
    for i, (specimen, _, _) in enumerate(entries):
        by_specimen.setdefault(specimen, []).append(i)
    duplicates = []
    slide_ids: dict[int, str] = {}
    for indices in by_specimen.values():
        files = [entries[i][1] for i in indices]
        duplicates += [(entries[indices[i]], entries[indices[j]]) for i, j in same_file_pairs(files)]
        slide_ids.update(zip(indices, unique_slide_ids(files)))
    if duplicates:
        raise ConfigError(f"{path}: {len(duplicates)} duplicated row(s): " + "; ".join(
            f"line {row[2]} repeats line {first[2]} ({row[0]}, {str(row[1])!r})"
            for row, first in sorted(duplicates, key=lambda d: d[0][2])))
    return [SlideTask(specimen, slide_ids[i], slide, line) for i, (specimen, slide, line) in enumerate(entries)]


def missing_slides(tasks: Iterable[SlideTask]) -> list[SlideTask]:
    """Rows whose slide file (or folder, for DICOM) does not exist."""
    return [t for t in tasks if not t.path.exists()]


def shard(tasks: Sequence[SlideTask], index: int, count: int) -> list[SlideTask]:
    """Rows ``index, index+count, ...``: task ``index`` (0-based) of ``count`` (round-robin)."""
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"task index {index} is not in 0..{count - 1} (task count {count})")
    return list(tasks[index::count])


def task_from_env(environ: Mapping[str, str] = os.environ) -> tuple[int, int] | None:
    """``(index, count)`` of this SLURM array task (0-based, minus ``SLURM_ARRAY_TASK_MIN``,
    divided by the step), or None outside a job array."""
    if "SLURM_ARRAY_TASK_ID" not in environ:
        return None
    try:
        task_id = int(environ["SLURM_ARRAY_TASK_ID"])
        count = int(environ["SLURM_ARRAY_TASK_COUNT"])
        first = int(environ.get("SLURM_ARRAY_TASK_MIN", "0"))
        step = int(environ.get("SLURM_ARRAY_TASK_STEP", "1") or 1)
    except (KeyError, ValueError):
        raise ConfigError("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT/MIN are missing or not numbers; "
                          "pass --task-index and --task-count") from None
    index, rest = divmod(task_id - first, step)
    if rest or not 0 <= index < count:
        raise ConfigError(f"SLURM array task {task_id} (min {first}, step {step}, count {count}) is not a "
                          "contiguous index; pass --task-index and --task-count")
    return index, count


def worker_devices(gpus: str | None, workers: int | None, visible: Sequence[str]) -> list[str | None]:
    """``CUDA_VISIBLE_DEVICES`` of each worker process (None: not pinned, the config's device).

    ``gpus``: None (no pinning), ``"all"`` (every id in ``visible``) or a count; ``workers``
    defaults to the number of GPUs used (1 without GPUs); workers share GPUs round-robin.
    """
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers {workers}: need at least 1")
    if gpus is None:
        return [None] * (workers or 1)
    if gpus == "all":
        ids = list(visible)
    else:
        try:
            n = int(gpus)
        except ValueError:
            raise ConfigError(f"--gpus {gpus!r}: expected 'all' or a number") from None
        if n < 1 or n > len(visible):
            raise ConfigError(f"--gpus {n}: {len(visible)} GPU(s) visible (CUDA_VISIBLE_DEVICES="
                              f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
        ids = list(visible[:n])
    if not ids:
        raise ConfigError("--gpus all: no GPU is visible (CUDA_VISIBLE_DEVICES="
                          f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); use --device cpu --workers N")
    return [ids[i % len(ids)] for i in range(workers or len(ids))]


def _visible_gpus() -> list[str]:
    """GPU ids this process may use: ``CUDA_VISIBLE_DEVICES`` when set (SLURM sets it), else torch's count."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


# --------------------------------------------------------------------------- status and resume


def _done_record(out_dir: Path, task: SlideTask, model_sha256: str | None, cfg_sha256: str) -> dict[str, Any] | None:
    """The current ``slide.json`` of a done slide (ok/ok_empty, intact tile store), else None."""
    record = current_slide_record(task.slide_dir(out_dir), task.path, model_sha256, cfg_sha256)
    ok = record is not None and record["status"] in ("ok", "ok_empty")
    return record if ok and damaged_store(task.slide_dir(out_dir), record) is None else None


def _is_done(out_dir: Path, task: SlideTask, model_sha256: str | None, cfg_sha256: str) -> bool:
    return _done_record(out_dir, task, model_sha256, cfg_sha256) is not None


def _aggregate_complete(tasks: Sequence[SlideTask], specimens: Iterable[str], out_dir: Path,
                        model_sha256: str | None, cfg_sha256: str) -> dict[str, str | None]:
    """Aggregate each of ``specimens`` whose every slide has a current record, under the specimen's
    locks (checked under them). Returns those specimens: None if aggregated, else the one-line
    message of the process holding a lock (it is in progress elsewhere; the last writer aggregates)."""
    complete: dict[str, str | None] = {}
    for specimen in dict.fromkeys(specimens):
        rows = [t for t in tasks if t.specimen_id == specimen]
        try:
            with specimen_locks(out_dir / specimen, [t.slide_id for t in rows], brief=True):
                if all(current_slide_record(t.slide_dir(out_dir), t.path, model_sha256, cfg_sha256) for t in rows):
                    aggregate_specimen(out_dir / specimen, specimen, slide_ids=[t.slide_id for t in rows])
                    complete[specimen] = None
        except FolderBusyError as busy:
            complete[specimen] = str(busy)
            print(f"wsi-response: specimen {specimen} not aggregated by this task: {busy}", file=sys.stderr)
    return complete


# --------------------------------------------------------------------------- worker processes


def _worker_main(conn: Connection, model_path: Path, model_sha256: str | None, cfg: Config,
                 cuda_visible: str | None, threads: int, out_dir: Path) -> None:
    """Worker process: load the classifier once, then run the slides the parent sends, one at a time,
    reporting each stage and chunk (the parent's watchdog)."""
    os.setpgid(0, 0)              # a group of its own: the parent ends it with its tile readers
    for sig in STOP_SIGNALS:      # the parent decides when to stop; a handler, not SIG_IGN, which children inherit
        signal.signal(sig, _ignore)
    die_with_parent()
    if cuda_visible is not None:  # before torch initialises CUDA
        os.environ["CUDA_VISIBLE_DEVICES"] = cuda_visible
    try:
        import torch

        from .classifier import load_classifier

        torch.set_num_threads(threads)
        classifier = load_classifier(model_path, cfg.tiling)
        if classifier.sha256 != model_sha256:
            raise OutputError(model_path, "the model file changed while the batch was starting")
    except Exception as exc:
        conn.send(("setup_error", str(exc)))
        return
    conn.send(("ready", None))

    def alive(*_: object) -> None:   # each stage and chunk of tiles: a sign of life for the watchdog
        conn.send(("progress", None))

    while True:
        try:
            task: SlideTask | None = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        try:
            with folder_lock(task.slide_dir(out_dir)):   # held by another process: in progress elsewhere
                message = _worker_slide(task, out_dir, classifier, cfg, alive)
        except FolderBusyError as busy:
            message = (BUSY, str(busy))
        except OutputError as env:
            message = ("environment", (str(env.path), env.problem))
        conn.send(message)
        if message[0] == "environment":
            return


def _worker_slide(task: SlideTask, out_dir: Path, classifier: Any, cfg: Config,
                  alive: Callable[..., None]) -> tuple[str, Any]:
    """Run one slide under its folder's lock (unless another process finished it meanwhile);
    ``alive`` is called at each stage and chunk (the watchdog's sign of life)."""
    slide_dir = task.slide_dir(out_dir)
    record = _done_record(out_dir, task, classifier.sha256, config_sha256(cfg))
    if record is None:
        try:
            record = process_slide(task.path, task.slide_id, slide_dir, classifier, cfg, progress=alive, stage=alive)
        except Exception as exc:
            raise_if_environment(exc, out_dir)
            record = record_failure(task.path, task.slide_id, slide_dir, classifier, cfg, exc)
    return "done", {k: record.get(k) for k in ("status", "error", "n_tiles", "timing")}


def _ignore(signum: int, frame: Any) -> None:
    """A stop signal in a worker: nothing (the parent stops the run and kills the worker)."""


@dataclass
class _Worker:
    process: Any
    conn: Connection
    task: SlideTask | None = None
    ready: bool = False
    heard_at: float = field(default_factory=time.monotonic)   # last message (or start, or task sent)


class _Pool:
    """Worker processes, one slide in flight each; replaces a worker that dies."""

    def __init__(self, devices: Sequence[str | None], model_path: Path, model_sha256: str | None, cfg: Config,
                 out_dir: Path) -> None:
        self._ctx = multiprocessing.get_context("spawn")
        threads = max(1, _cpu_count() // len(devices))
        self._args = [(model_path, model_sha256, _pinned(cfg, d), d, threads, out_dir) for d in devices]
        self.workers = [self._start(i) for i in range(len(devices))]

    def _start(self, slot: int) -> _Worker:
        parent, child = self._ctx.Pipe()
        process = self._ctx.Process(target=_worker_main, args=(child, *self._args[slot]), name=f"wsi-response-worker-{slot}")
        process.start()
        child.close()
        return _Worker(process, parent)

    def restart(self, slot: int) -> None:
        self._stop(self.workers[slot])
        self.workers[slot] = self._start(slot)

    def wait(self, timeout: float) -> list[int]:
        """Slots with a message or a dead process."""
        handles = {}
        for slot, w in enumerate(self.workers):
            handles[w.conn] = slot
            handles[w.process.sentinel] = slot
        return sorted({handles[h] for h in wait(list(handles), timeout)})

    @staticmethod
    def _stop(worker: _Worker) -> None:
        end_process(worker.process)
        worker.conn.close()

    def close(self) -> None:
        for w in self.workers:
            self._stop(w)


def _pinned(cfg: Config, cuda_visible: str | None) -> Config:
    return cfg if cuda_visible is None else replace(cfg, inference=replace(cfg.inference, device="cuda"))


def _cpu_count() -> int:
    """CPUs this process may use (SLURM's allocation where it says so)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return min(n, int(slurm)) if slurm.isdigit() and int(slurm) > 0 else n


# --------------------------------------------------------------------------- running a batch


class _StopFlag:
    """Records the first stop signal; installs and restores the handlers."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def run_batch(tasks: Sequence[SlideTask], out_dir: Path, classifier: Any, cfg: Config, *, task_index: int = 0,
              task_count: int = 1, gpus: str | None = None, workers: int | None = None,
              manifest: Path | None = None, quiet: bool = False,
              stall_timeout_s: float = STALL_TIMEOUT_S) -> BatchResult:
    """Run shard ``task_index`` of ``task_count`` of ``tasks`` into ``out_dir`` (see the module doc).

    Then aggregates the shard's complete specimens; an unsharded run (``task_count == 1``) also
    writes the batch summary (:func:`finalize_batch`). ``classifier`` must have been loaded from a
    file (``classifier.path``); workers reload it. Raises :class:`OutputError` when the output
    cannot be written (the run stops).
    """
    out_dir = Path(out_dir)
    mine = shard(tasks, task_index, task_count)
    if gpus is not None and cfg.inference.device == "cpu":
        raise ConfigError(f"--gpus {gpus} with device cpu; leave out --gpus (use --workers N for CPU workers)")
    if not stall_timeout_s > 0:
        raise ConfigError(f"--stall-timeout {stall_timeout_s:g}: need a number of seconds above 0")
    check_inside(out_dir, *_output_folders(tasks, out_dir))
    check_writable(out_dir)
    model_sha, cfg_sha = classifier.sha256, config_sha256(cfg)
    result = BatchResult(tasks=mine)
    todo = []
    for task in mine:
        (result.skipped if _is_done(out_dir, task, model_sha, cfg_sha) else todo).append(task)
    log = _Log(len(mine), len(result.skipped), quiet)
    if todo:
        devices = worker_devices(gpus, workers, _visible_gpus() if gpus is not None else [])
        with _StopFlag() as stop:
            _run_pool(todo, out_dir, classifier, cfg, devices[:len(todo)], result, stop, log, stall_timeout_s)
            result.stopped_by = stop.signum
    log.close()
    if result.stopped_by is not None:
        return result
    if task_count == 1:
        result.summary = finalize_batch(tasks, out_dir, model_sha, cfg, manifest)
        result.aggregated = [s["specimen_id"] for s in result.summary["specimens"] if s["status"] != "incomplete"]
    else:
        complete = _aggregate_complete(tasks, (t.specimen_id for t in mine), out_dir, model_sha, cfg_sha)
        result.aggregated = [s for s, busy in complete.items() if busy is None]
    return result


def _output_folders(tasks: Sequence[SlideTask], out_dir: Path) -> list[Path]:
    """Every specimen and slide folder ``tasks`` write (each must resolve inside ``out_dir``)."""
    return [*dict.fromkeys(out_dir / t.specimen_id for t in tasks), *(t.slide_dir(out_dir) for t in tasks)]


def _run_pool(todo: list[SlideTask], out_dir: Path, classifier: Any, cfg: Config, devices: list[str | None],
              result: BatchResult, stop: _StopFlag, log: _Log, stall_timeout_s: float) -> None:
    pending = list(reversed(todo))
    pool = _Pool(devices, Path(classifier.path), classifier.sha256, cfg, out_dir)
    try:
        while (pending or any(w.task for w in pool.workers)) and stop.signum is None:
            for w in pool.workers:
                if w.ready and w.task is None and pending:
                    w.task = pending.pop()
                    w.conn.send(w.task)
                    w.heard_at = time.monotonic()
            for slot in pool.wait(_POLL_S):
                w = pool.workers[slot]
                while w.conn.poll():
                    try:
                        kind, payload = w.conn.recv()
                    except EOFError:
                        break
                    w.heard_at = time.monotonic()
                    if kind == "ready":
                        w.ready = True
                    elif kind == "setup_error":
                        raise WsiResponseError(f"worker process could not start: {payload}")
                    elif kind == "environment":
                        raise OutputError(*payload)
                    elif kind == BUSY:
                        result.statuses[w.task] = BUSY
                        log.busy(w.task, payload)
                        w.task = None
                    elif kind == "done":
                        result.statuses[w.task] = payload["status"]
                        log.slide(w.task, payload)
                        w.task = None
                if not w.process.is_alive() and stop.signum is None:
                    if not w.ready:
                        raise WsiResponseError(f"the worker process {exit_reason(w.process.exitcode)} while starting")
                    if w.task is not None:
                        _record_lost(w.task, f"the worker process {exit_reason(w.process.exitcode)} while processing "
                                     "this slide", out_dir, classifier, cfg, result, log)
                        w.task = None
                    pool.restart(slot)
            for slot, w in enumerate(pool.workers):
                if time.monotonic() - w.heard_at > stall_timeout_s and (w.task or not w.ready) and stop.signum is None:
                    if not w.ready:
                        raise WsiResponseError(f"the worker process made no progress for {stall_timeout_s:g} s "
                                               "while starting")
                    pool.restart(slot)   # kills it, and its tile readers, first
                    _record_lost(w.task, f"no progress for {stall_timeout_s:g} s; its worker process was killed",
                                 out_dir, classifier, cfg, result, log)
    finally:
        pool.close()


def _record_lost(task: SlideTask, problem: str, out_dir: Path, classifier: Any, cfg: Config,
                 result: BatchResult, log: _Log) -> None:
    """Record the slide of a worker that died or was killed as failed with ``problem``
    (unless it finished just before)."""
    if _is_done(out_dir, task, classifier.sha256, config_sha256(cfg)):   # died after writing slide.json
        result.statuses[task] = "ok"
        return
    try:
        with folder_lock(task.slide_dir(out_dir)):   # the dead worker's lock is free again
            record = record_failure(task.path, task.slide_id, task.slide_dir(out_dir), classifier, cfg,
                                    SlideReadError(task.path, problem))
    except FolderBusyError as busy:   # another process took the slide over meanwhile
        result.statuses[task] = BUSY
        log.busy(task, str(busy))
        return
    except OSError as exc:
        raise_if_environment(exc, out_dir)
        raise
    result.statuses[task] = "failed"
    log.slide(task, record)


class _Log:
    """Slides-per-task progress bar (on a terminal) and one stderr line per finished slide."""

    def __init__(self, total: int, skipped: int, quiet: bool) -> None:
        from tqdm import tqdm

        self.quiet, self.total, self.n = quiet, total, skipped
        self.bar = tqdm(total=total, initial=skipped, desc="slides", unit="slide", file=sys.stderr,
                        disable=quiet or not sys.stderr.isatty())
        if skipped and not quiet:
            self._write(f"{skipped} of {total} slides already done (same slide file, model and config): skipped")

    def slide(self, task: SlideTask, record: Mapping[str, Any]) -> None:
        self.n += 1
        self.bar.update(1)
        where = f"[{self.n}/{self.total}] {task.specimen_id}/{task.slide_id}"
        if record["status"] == "failed":
            self._write(f"{where}: FAILED: {record['error']}")
        elif not self.quiet:
            total_s = (record.get("timing") or {}).get("total_s")
            self._write(f"{where}: {record['status']}, {record.get('n_tiles')} tiles"
                        + (f", {total_s:.1f} s" if total_s is not None else ""))

    def busy(self, task: SlideTask, message: str) -> None:
        self.n += 1
        self.bar.update(1)
        self._write(f"[{self.n}/{self.total}] {task.specimen_id}/{task.slide_id}: skipped, in progress elsewhere: "
                    f"{message}")

    def _write(self, line: str) -> None:
        self.bar.write(f"wsi-response: {line}", file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


# --------------------------------------------------------------------------- summary


def finalize_batch(tasks: Sequence[SlideTask], out_dir: Path, model_sha256: str | None, cfg: Config,
                   manifest: Path | None = None) -> dict[str, Any]:
    """Aggregate every complete specimen and write ``out_dir/batch-summary.json``; returns it.

    Slides are ``ok``/``ok_empty``/``failed`` by their current ``slide.json``, else ``not_done``
    (never run, abandoned, or outdated by a changed slide file, model or config).
    """
    out_dir = Path(out_dir)
    check_inside(out_dir, *_output_folders(tasks, out_dir))
    check_writable(out_dir)
    cfg_sha = config_sha256(cfg)
    complete = _aggregate_complete(tasks, (t.specimen_id for t in tasks), out_dir, model_sha256, cfg_sha)
    slides, timings, tiles = [], [], []
    for t in tasks:
        record = current_slide_record(t.slide_dir(out_dir), t.path, model_sha256, cfg_sha)
        status = record["status"] if record else "not_done"
        slides.append({"specimen_id": t.specimen_id, "slide_id": t.slide_id, "path": str(t.path),
                       "status": status, "error": record.get("error") if record else None})
        if record and (record.get("timing") or {}).get("total_s") is not None:
            timings.append(float(record["timing"]["total_s"]))
            tiles.append(int(record.get("n_tiles") or 0))
    specimens = []
    for specimen in dict.fromkeys(t.specimen_id for t in tasks):
        entry: dict[str, Any] = {"specimen_id": specimen, "status": "incomplete"}
        if complete.get(specimen):   # another process holds one of its folders
            entry.update(status=BUSY, error=complete[specimen])
        elif specimen in complete:
            result = json.loads((out_dir / specimen / "specimen.json").read_text(encoding="utf-8"))
            entry.update(status=result["status"], viable_percent=result["viable_percent"],
                         eortc_tier=(result.get("eortc") or {}).get("tier"))
        specimens.append(entry)
    summary = {
        "manifest": str(manifest) if manifest else None,
        "out": str(out_dir),
        "model_sha256": model_sha256,
        "config_sha256": cfg_sha,
        "n_slides": len(tasks),
        "counts": dict(Counter(s["status"] for s in slides)),
        "failed": [s for s in slides if s["status"] == "failed"],
        "not_done": [s for s in slides if s["status"] == "not_done"],
        "specimens": specimens,
        "timing": _timing_stats(timings, tiles),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json_atomic(out_dir / SUMMARY_NAME, summary)
    return summary


def _timing_stats(seconds: list[float], tiles: list[int]) -> dict[str, Any] | None:
    """Per-slide wall time (s) and tiles of the finished slides, for sizing SLURM tasks."""
    if not seconds:
        return None
    ordered = sorted(seconds)
    return {
        "slides": len(seconds),
        "slide_total_s": {"median": round(statistics.median(seconds), 2),
                          "p95": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 2),
                          "max": round(ordered[-1], 2), "sum": round(sum(seconds), 2)},
        "n_tiles": {"median": statistics.median(tiles), "max": max(tiles)},
        "tiles_per_s": round(sum(tiles) / sum(seconds), 1) if sum(seconds) > 0 else None,
    }
