"""Folder locks: one writer per specimen folder and per slide folder, across processes and hosts.

A lock is a POSIX record lock (``fcntl.lockf``, whole file, exclusive) on ``LOCK_NAME`` inside
the folder. The kernel (or, on NFS, the lock manager: NLM/lockd for NFSv3, the protocol itself for
NFSv4) releases it when the holding process ends in any way, SIGKILL included, so a lock of a dead
process is simply taken by the next one; nothing is ever deleted or broken by hand. ``flock`` is
not used: on some NFS mounts (``local_lock=flock``) it only locks on the local host. On NFSv4 a
lock of a host that crashed is freed when its lease expires (about 90 s).

The file holds who locked it (pid, host, command, since when) for the message another process
prints; it stays in the folder (it is no output, and aggregation never reads it). Acquiring never
blocks: a lock held by a long writer (a ``run``, a slide being computed) fails at once with
:class:`FolderBusyError`; one held by a short one (an aggregation, marked ``brief``) is waited for
up to ``BRIEF_WAIT_S`` seconds.

Who locks what (see the README, "Concurrent writers"):

- ``run``: the specimen folder and each of its slides' folders, for its whole duration;
- a ``batch`` worker: the slide folder of the slide it computes (held by another: skipped as
  "in progress elsewhere");
- an aggregation (``aggregate``, the end of a batch task, ``--aggregate-only``): the specimen
  folder and the folders of the slides it reads, briefly.

POSIX locks belong to a process, and closing any descriptor of the file drops them, so the locks a
process holds are counted here and a folder locked twice in one process (``run`` then its own
aggregation) is locked once.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import OutputError

__all__ = ["LOCK_NAME", "BRIEF_WAIT_S", "FolderBusyError", "folder_lock", "folder_locks", "specimen_locks"]

LOCK_NAME = ".wsi-response.lock"
BRIEF_WAIT_S = 30.0  # longest wait for a brief holder (an aggregation), s
_POLL_S = 0.1


class FolderBusyError(OutputError):
    """Another live process holds the lock of an output folder (``.holder``: what its lock file says)."""

    def __init__(self, path: str | os.PathLike, holder: dict[str, Any] | None) -> None:
        self.holder = holder
        super().__init__(path, f"is being written by {describe_holder(holder)}; wait for it or stop it")

    def __reduce__(self) -> tuple:
        return (type(self), (self.path, self.holder))


def describe_holder(holder: dict[str, Any] | None) -> str:
    """``pid 123 on host X (wsi-response run, since 2025-01-31 14:02:11+0100)``."""
    if not holder:
        return "another process (not yet recorded in its lock file)"
    return (f"pid {holder.get('pid')} on host {holder.get('host')} "
            f"({holder.get('command')}, since {holder.get('since')})")


@dataclass
class _Held:
    fd: int
    count: int


_held: dict[str, _Held] = {}   # lock file path -> descriptor holding it in this process


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, *, brief: bool = False) -> Iterator[None]:
    """Hold the lock of ``folder`` (created if missing) for the ``with`` block.

    ``brief``: this hold lasts seconds (other processes wait for it, up to ``BRIEF_WAIT_S``).
    Raises :class:`FolderBusyError` when another process holds it, :class:`OutputError` when the
    lock file cannot be created or locked.
    """
    key = str(Path(os.path.abspath(folder)) / LOCK_NAME)
    if key in _held:
        _held[key].count += 1
        try:
            yield
        finally:
            _held[key].count -= 1
        return
    fd = _acquire(Path(key), brief)
    _held[key] = _Held(fd, 1)
    try:
        yield
    finally:
        del _held[key]
        os.close(fd)   # releases the lock


@contextlib.contextmanager
def folder_locks(folders: Iterable[str | os.PathLike], *, brief: bool = False) -> Iterator[None]:
    """Hold the locks of all ``folders``, taken in the order given, for the ``with`` block."""
    with contextlib.ExitStack() as stack:
        for folder in folders:
            stack.enter_context(folder_lock(folder, brief=brief))
        yield


def _acquire(path: Path, brief: bool) -> int:
    """A descriptor of ``path`` holding its lock, with this process recorded in the file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise OutputError(path.parent, f"cannot open the lock file {LOCK_NAME} ({exc.strerror or exc})") from None
    deadline = time.monotonic() + BRIEF_WAIT_S
    try:
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EAGAIN):
                    raise OutputError(path.parent, f"cannot lock {LOCK_NAME} ({exc.strerror or exc})") from None
            holder = _read_holder(fd)
            # the holder's record may not be written yet: wait for it as for a brief holder
            if (holder and not holder.get("brief")) or time.monotonic() >= deadline:
                raise FolderBusyError(path.parent, holder)
            time.sleep(_POLL_S)
        _write_holder(fd, brief)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_holder(fd: int) -> dict[str, Any] | None:
    try:
        value = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _write_holder(fd: int, brief: bool) -> None:
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": _command(),
              "since": time.strftime("%Y-%m-%d %H:%M:%S%z"), "brief": brief, "argv": sys.argv[:20]}
    data = (json.dumps(holder, ensure_ascii=False, default=str) + "\n").encode("utf-8")
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
    except OSError as exc:   # a full disk: the lock holds, only the message of others is poorer
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise


def _command() -> str:
    """``wsi-response run`` for the CLI (also in its spawned workers, which get its argv), else the program."""
    argv = sys.argv
    program = Path(argv[0]).name if argv and argv[0] else "python"
    if program in ("wsi-response", "cli.py") and len(argv) > 1:
        return f"wsi-response {argv[1]}"
    return program


def specimen_locks(specimen_dir: str | os.PathLike, slide_ids: Iterable[str], *,
                   brief: bool = False) -> contextlib.AbstractContextManager[None]:
    """The locks of a specimen folder and of the folders ``slides/<id>`` of ``slide_ids`` (in that order)."""
    specimen_dir = Path(specimen_dir)
    return folder_locks([specimen_dir, *(specimen_dir / "slides" / sid for sid in slide_ids)], brief=brief)
