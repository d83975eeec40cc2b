"""Cap glibc's malloc arenas, so memory freed by worker threads goes back to the slide's next step.

glibc gives each thread that allocates its own arena (up to 8 per core) and keeps what is freed
there; the QC's threads and torch's would otherwise leave ~100-250 MB per process resident after
the QC (measured with ResNet-18 on 40k and 80k px slides: `benchmarks/RESULTS.md`), which the
tile-reading processes forked later inherit. Two arenas cost no measurable speed here.
"""
from __future__ import annotations

import ctypes
import os

__all__ = ["limit_malloc_arenas"]

ARENAS = 2
_M_ARENA_MAX = -8  # mallopt parameter number (glibc malloc.h)


def limit_malloc_arenas(n: int = ARENAS) -> bool:
    """Cap this process at ``n`` malloc arenas and set ``MALLOC_ARENA_MAX`` for the processes it
    starts, unless ``MALLOC_ARENA_MAX`` is already set (the user's choice stands). Call it before
    threads start. Returns whether this process was capped (False off glibc, or when set)."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    os.environ["MALLOC_ARENA_MAX"] = str(n)
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_ARENA_MAX, n))
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to cap
        return False
