"""Special files a hospital share can hold where a regular file is expected (shared by the hostile-input tests)."""
from __future__ import annotations

import os
from pathlib import Path


def special_files(folder: Path) -> None:
    """Make ``folder`` with a FIFO ``fifo``, a symbolic link loop ``loop-a``/``loop-b``, a folder
    ``folder`` and ``latin1.yaml`` (a config that is not UTF-8)."""
    folder.mkdir()
    os.mkfifo(folder / "fifo")
    (folder / "loop-a").symlink_to("loop-b")
    (folder / "loop-b").symlink_to("loop-a")
    (folder / "folder").mkdir()
    (folder / "latin1.yaml").write_bytes(b"tiling:\n  # r\xe9sum\xe9\n  tile_px: 224\n")


__all__ = ["special_files"]
