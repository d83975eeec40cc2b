"""Specimen and slide ids, and where outputs may go: the one place for the rule.

An id names one folder: ``DIR/<specimen_id>/`` and ``DIR/<specimen_id>/slides/<slide_id>/``. An id
given by the user (``--specimen``, a manifest's ``specimen_id``, a folder name ``aggregate``
reads back) is refused with a :class:`~wsi_response.errors.ConfigError` (exit 2, one line naming
the id, where it came from and the problem) when it

- is empty, or longer than :data:`MAX_ID_BYTES` bytes in UTF-8;
- is absolute, or contains a path separator (``/`` or ``\\``), or is ``.`` or ``..``;
- contains a control or invisible character (NUL, newline, tab, DEL, C1 controls, bidirectional
  overrides, zero-width characters, line separators) or an undecodable byte of a file name;
- starts or ends with whitespace, or ends with ``.``;
- starts with ``.`` or ends with ``.partial`` (the tool's hidden, probe and temporary names);
- is a name the tool writes itself beside ids (:data:`RESERVED_NAMES`, in any letter case);
- cannot be a file name on Windows or an SMB share (``<>:"|?*``, ``CON``, ``NUL``, ``COM1``...).

A slide id is made from the slide's file name, which the user did not choose as an id: its stem
(the name up to the first ``.``) is *sanitised* rather than refused, so an oddly named slide is
still measured (its ``slide.json`` keeps the real path): each forbidden character becomes ``_``,
surrounding whitespace is dropped, an empty stem becomes ``slide``, a reserved name gets a
trailing ``_``, and a stem longer than :data:`MAX_STEM_BYTES` bytes is cut. Ids are unique
within a specimen, comparing letter case and Unicode normalisation folded (two ids must not
share a folder on a case-insensitive file system): :func:`unique_slide_ids`.

Every folder the tool writes into is checked to resolve (symbolic links followed) inside the
output folder first (:func:`check_inside`), so a link ``DIR/S -> /elsewhere`` cannot redirect
results.
"""
from __future__ import annotations

import os
import re
import unicodedata
from pathlib import Path
from typing import Sequence

from .errors import ConfigError, OutputError

__all__ = ["MAX_ID_BYTES", "MAX_STEM_BYTES", "RESERVED_NAMES", "id_problem", "check_specimen_id", "check_slide_id",
           "slide_id_base", "folder_key", "unique_slide_ids", "same_file_pairs", "check_inside"]

MAX_ID_BYTES = 255     # a folder name on ext4, XFS, NTFS and SMB
MAX_STEM_BYTES = 240   # a slide stem is cut to this, leaving room for a "-<n>" suffix
# Names the tool writes itself beside ids: DIR/batch-summary.json (batch), DIR/logs (slurm);
# DIR/<specimen>/{specimen.json, report.html, slides} (pipeline) – one set for both kinds of id.
RESERVED_NAMES = frozenset({"batch-summary.json", "logs", "specimen.json", "report.html", "slides"})
TEMPORARY_SUFFIX = ".partial"   # atomic.py's and store.py's temporary names (which also start with ".")
_WINDOWS_CHARS = '<>:"|?*'
_WINDOWS_DEVICES = re.compile(r"(CON|PRN|AUX|NUL|COM[0-9¹²³]|LPT[0-9¹²³])(\..*)?", re.IGNORECASE)
_INVISIBLE = {"Cc", "Cf", "Cs", "Zl", "Zp"}   # controls, format (bidi, zero-width), surrogates, separators


def _bad_char(ch: str) -> bool:
    return unicodedata.category(ch) in _INVISIBLE


def id_problem(value: str) -> str | None:
    """Why ``value`` cannot be an id (a phrase after the id), or None when it can."""
    if not value:
        return "is empty"
    bad = next((ch for ch in value if _bad_char(ch)), None)
    if bad is not None:
        return (f"contains an undecodable byte (0x{ord(bad) - 0xDC00:02X})" if 0xDC80 <= ord(bad) <= 0xDCFF
                else f"contains the control or invisible character U+{ord(bad):04X}")
    if value.startswith(("/", "\\")) or re.match(r"[A-Za-z]:[\\/]", value):
        return "is an absolute path"
    for sep in ("/", "\\"):
        if sep in value:
            return f"contains a path separator {sep!r}"
    if value in (".", ".."):
        return "is a relative folder reference, not a name"
    if value != value.strip():
        return "starts or ends with whitespace"
    if value.startswith("."):
        return "starts with '.' (hidden and temporary names are the tool's own)"
    if value.casefold().endswith(TEMPORARY_SUFFIX):
        return f"ends with {TEMPORARY_SUFFIX!r} (the tool's temporary-file suffix)"
    if value.endswith("."):
        return "ends with '.' (Windows and SMB shares drop it)"
    if value.casefold() in RESERVED_NAMES:
        return "is a name the tool writes itself (" + ", ".join(sorted(RESERVED_NAMES)) + ")"
    bad = next((ch for ch in value if ch in _WINDOWS_CHARS), None)
    if bad is not None:
        return f"contains {bad!r}, not allowed in file names on Windows and SMB shares"
    if _WINDOWS_DEVICES.fullmatch(value):
        return "is a device name on Windows (CON, PRN, AUX, NUL, COM1-9, LPT1-9)"
    size = len(value.encode("utf-8"))
    if size > MAX_ID_BYTES:
        return f"is {size} bytes long in UTF-8 (at most {MAX_ID_BYTES})"
    return None


def _check(value: str, kind: str, origin: str) -> str:
    problem = id_problem(value)
    if problem is not None:
        raise ConfigError(f"{origin}: {kind} {value!r} {problem}")
    return value


def check_specimen_id(value: str, origin: str) -> str:
    """``value`` if it is a usable specimen id, else :class:`ConfigError` naming ``origin``
    (e.g. ``--specimen`` or ``manifest.csv: line 3``)."""
    return _check(value, "specimen id", origin)


def check_slide_id(value: str, origin: str) -> str:
    """``value`` if it is a usable slide id (a folder name under ``slides/``), else :class:`ConfigError`."""
    return _check(value, "slide id", origin)


def slide_id_base(path: str | os.PathLike[str]) -> str:
    """The slide id a file name asks for: its stem, sanitised (see the module doc)."""
    stem = Path(path).name.split(".")[0]
    stem = "".join("_" if _bad_char(ch) or ch in _WINDOWS_CHARS or ch in "/\\" else ch for ch in stem).strip()
    encoded = stem.encode("utf-8")
    if len(encoded) > MAX_STEM_BYTES:
        stem = encoded[:MAX_STEM_BYTES].decode("utf-8", errors="ignore").rstrip()
    stem = stem or "slide"
    if stem.casefold() in RESERVED_NAMES or _WINDOWS_DEVICES.fullmatch(stem):
        stem += "_"
    return check_slide_id(stem, str(path))


def folder_key(name: str) -> str:
    """What a case-insensitive, normalising file system compares of two names."""
    return unicodedata.normalize("NFC", name).casefold()


def unique_slide_ids(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Slide ids of one specimen's slides, in order: each file's :func:`slide_id_base`; a base
    already used by an earlier slide gets the first suffix ``-2``, ``-3``... that is no slide's
    base and no earlier id, so ``a.svs``, ``sub/a.svs``, ``a-2.svs`` are ``a``, ``a-3``, ``a-2``.
    Depends only on the list (the same in ``run`` and every ``batch`` task)."""
    bases = [slide_id_base(p) for p in paths]
    claimed = {folder_key(b) for b in bases}
    first: set[str] = set()
    ids = []
    for base in bases:
        if folder_key(base) not in first:
            first.add(folder_key(base))
            ids.append(base)
            continue
        n = 2
        while folder_key(f"{base}-{n}") in claimed:
            n += 1
        ids.append(f"{base}-{n}")
        claimed.add(folder_key(ids[-1]))
    return ids


def _file_key(path: str | os.PathLike[str]) -> tuple:
    """The file ``path`` names: device and inode (links and spellings agree), else its resolved path."""
    try:
        st = os.stat(path)
        return ("inode", st.st_dev, st.st_ino)
    except (OSError, ValueError):
        pass
    try:
        return ("path", os.path.realpath(path))
    except ValueError:   # a NUL in the name: no such file
        return ("path", os.path.abspath(path))


def same_file_pairs(paths: Sequence[str | os.PathLike[str]]) -> list[tuple[int, int]]:
    """``(i, j)`` for each ``paths[i]`` that names the same file as the earlier ``paths[j]`` (its
    first listing): ``./a.svs``, an absolute path, a symbolic or hard link to ``a.svs`` all do."""
    first: dict[tuple, int] = {}
    pairs = []
    for i, path in enumerate(paths):
        key = _file_key(path)
        if key in first:
            pairs.append((i, first[key]))
        else:
            first[key] = i
    return pairs


def check_inside(root: str | os.PathLike[str], *folders: str | os.PathLike[str]) -> None:
    """Raise :class:`OutputError` unless each of ``folders``, and each symbolic link directly in
    it, resolves (links followed; missing parts as written) inside ``root`` resolved."""
    try:
        base = Path(root).resolve()
        for folder in map(Path, folders):
            links = [e for e in folder.iterdir() if e.is_symlink()] if folder.is_dir() else []
            for target in (folder, *links):
                resolved = target.resolve()
                if not resolved.is_relative_to(base):
                    raise OutputError(target, f"resolves to {resolved}, outside the output folder {base} "
                                              "(through a symbolic link); refusing to write there")
    except (OSError, RuntimeError, ValueError) as exc:   # a link loop, an unreadable folder, a NUL
        raise OutputError(getattr(exc, "filename", None) or root,
                          f"cannot resolve the output path ({getattr(exc, 'strerror', None) or exc})") from None
