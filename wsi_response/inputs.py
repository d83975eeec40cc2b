"""Input files the user names: a regular file, or one line saying what the path is instead.

Slides, configs, manifests, models and annotation files pass through here before they are read,
so a FIFO (whose open or read would block forever), a folder, a symbolic-link loop, a broken link
or a device is named as such instead of hanging the run or ending it in a traceback.
"""
from __future__ import annotations

import errno
import os
import stat

__all__ = ["UnreadableInput", "file_problem", "read_regular_file"]

_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"))


class UnreadableInput(Exception):
    """``path`` cannot be read as a regular file; ``str()`` is the problem, e.g. "is a FIFO, not a regular file"."""


def file_problem(path: str | os.PathLike[str], what: str = "file") -> str | None:
    """Why ``path`` is not a readable regular file (``what`` names it: "no such model file"), or None.

    Follows symbolic links; opens nothing, so a FIFO or device is never touched.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return _os_problem(path, exc, what)
    return _mode_problem(mode, what)


def read_regular_file(path: str | os.PathLike[str], what: str = "file", max_bytes: int | None = None) -> bytes:
    """The bytes of the regular file ``path``, at most ``max_bytes`` of them; raises :class:`UnreadableInput`.

    The file is opened without blocking and checked on the open handle, so a FIFO put in its
    place after a check is refused too, never read.
    """
    problem = file_problem(path, what)  # before opening: opening a device can have side effects
    if problem is not None:
        raise UnreadableInput(problem)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise UnreadableInput(_os_problem(path, exc, what)) from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        problem = _mode_problem(st.st_mode, what)
        if problem is None and max_bytes is not None and st.st_size > max_bytes:
            problem = f"is {st.st_size:,} bytes; {_a(what)} has at most {max_bytes:,}"
        if problem is not None:
            raise UnreadableInput(problem)
        try:
            return fh.read()
        except OSError as exc:
            raise UnreadableInput(f"cannot read ({exc.strerror or exc})") from None


def _mode_problem(mode: int, what: str) -> str | None:
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return f"is a folder, not {_a(what)}"
    kind = next((name for test, name in _KINDS if test(mode)), "an unknown kind of file")
    return f"is {kind}, not a regular file"


def _os_problem(path: str | os.PathLike[str], exc: OSError, what: str) -> str:
    if exc.errno == errno.ELOOP:
        return "is a symbolic link loop (too many levels of symbolic links)"
    if exc.errno == errno.ENOENT:
        return "is a broken symbolic link" if os.path.islink(path) else f"no such {what}"
    if exc.errno == errno.ENAMETOOLONG:
        return "file name too long"
    return f"cannot read ({exc.strerror or exc})"


def _a(noun: str) -> str:
    return f"{'an' if noun[:1] in 'aeiou' else 'a'} {noun}"
