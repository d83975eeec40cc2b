"""Atomic file writes: write to a temporary name in the same folder, fsync, rename into place.

A reader (or a rerun after a kill) sees either the old file or the complete new one, never a
partial file under the final name. Temporary names start with ``.`` and end with ``.partial``.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

__all__ = ["atomic_open", "write_atomic", "write_json_atomic", "remove_partials", "PARTIAL_SUFFIX"]

PARTIAL_SUFFIX = ".partial"


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str]) -> Iterator[IO[bytes]]:
    """A binary file handle whose content replaces ``path`` only if the block ends without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = ""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; results are shared files
        os.close(fd)
        with open(tmp, "wb") as fh:  # a named handle (some writers, e.g. tifffile, need the name)
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if isinstance(exc, OSError) and _about_this_write(exc, path):  # name the file, not its temporary
            exc.filename = str(path)
        raise


def _about_this_write(error: OSError, path: Path) -> bool:
    """Whether ``error`` came from writing ``path`` (no file named, or its temporary file named)."""
    return error.filename is None or os.path.basename(os.fsdecode(error.filename)).startswith(f".{path.name}.")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path) as fh:
        fh.write(data)


def write_json_atomic(path: str | os.PathLike[str], value: Any) -> None:
    """Write ``value`` as indented UTF-8 JSON (keys in insertion order) atomically."""
    write_atomic(path, (json.dumps(value, indent=2, ensure_ascii=False, default=_jsonable) + "\n").encode("utf-8"))


def remove_partials(folder: str | os.PathLike[str]) -> None:
    """Delete the temporary files that writers killed mid-write left in ``folder`` (not below it)."""
    for stale in Path(folder).glob(f".*{PARTIAL_SUFFIX}"):
        if stale.is_file():
            stale.unlink(missing_ok=True)


def _jsonable(value: Any) -> Any:
    """numpy scalars/arrays and paths as plain JSON values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
