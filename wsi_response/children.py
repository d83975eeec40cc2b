"""Child processes that can always be ended: default stop signals, death with the parent, bounded stops.

A signal set to ``SIG_IGN`` is inherited across ``fork`` and ``exec``, and a Python handler across
``fork``: a process started from one that ignores SIGTERM would ignore it too, and anything that
stops it with SIGTERM and then waits (``multiprocessing.Pool.terminate``) would wait forever. So
every process the package forks (the focus measure's workers, the inference DataLoader's workers)
first calls :func:`as_child`, and processes are ended with :func:`end_process`: SIGKILL, then a wait
of at most ``wait_s`` seconds.
"""
from __future__ import annotations

import os
import signal
from typing import Any

__all__ = ["STOP_SIGNALS", "END_WAIT_S", "as_child", "die_with_parent", "end_process", "exit_reason"]

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
END_WAIT_S = 10.0  # seconds to wait for a killed process to be reaped (longer only in uninterruptible I/O)


def as_child(*_: object) -> None:
    """First call of a forked child process: the default action for SIGUSR1, SIGTERM and SIGINT
    (whatever the parent set), and SIGKILL when the parent dies. Arguments are ignored (a
    DataLoader passes its worker id)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    die_with_parent()


def die_with_parent() -> None:
    """Linux: SIGKILL this process when the thread that started it ends (no orphan keeps computing)."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def end_process(process: Any, wait_s: float = END_WAIT_S) -> bool:
    """SIGKILL a started ``multiprocessing`` process, and the process group it leads if it made one
    (its own children), then reap it, waiting at most ``wait_s`` s. Returns whether it has ended."""
    if process.exitcode is None:   # not reaped yet, so its pid (and group id) is still its own
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):   # it leads no group
            pass
        process.kill()
    process.join(wait_s)
    return process.exitcode is not None


def exit_reason(exitcode: int | None) -> str:
    """How a process ended, e.g. ``died by SIGSEGV (a crash in a slide codec?)``."""
    if exitcode is None:
        return "did not end"
    if exitcode is not None and exitcode < 0:
        hint = "out of memory?" if -exitcode == signal.SIGKILL else "a crash in a slide codec?"
        return f"died by {signal.Signals(-exitcode).name} ({hint})"
    return f"exited with code {exitcode}"
