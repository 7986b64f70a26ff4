"""Disk space: free bytes, sizes of what is written, and one-line "no space left" messages.

A full disk shows up in many shapes: an OSError with errno ENOSPC (Python), a RuntimeError from torch's
C++ stream writer ("file write failed", "unexpected pos", "basic_ios::clear") that never names the cause,
or a safetensors error wrapping "os error 28". `is_no_space` recognises all of them (the C++ ones only when
the filesystem really is nearly full), so every writer can report the same one line.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

_NO_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_NO_SPACE_TEXT = ("no space left on device", "storagefull", "os error 28", "disk quota exceeded")
_STREAM_TEXT = ("file write failed", "unexpected pos", "basic_ios::clear", "failed writing",
                "requested and")  # numpy's tofile / write_array: "N requested and M written", no errno
NEARLY_FULL = 64 * 2**20  # a C++ stream error on a filesystem with less free space than this is a full disk


def existing_dir(path: str | Path) -> Path:
    """`path` or its nearest existing ancestor directory."""
    p = Path(path).absolute()
    while not p.is_dir() and p != p.parent:
        p = p.parent
    return p


def free_bytes(path: str | Path) -> int:
    """Free bytes (for this user) on the filesystem that holds `path` (or would hold it)."""
    return shutil.disk_usage(existing_dir(path)).free


def tree_size(path: str | Path) -> int:
    """Bytes of a file or of every file under a directory (0 if it does not exist)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    total = 0
    for root, _, files in os.walk(p):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def fmt_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def is_no_space(exc: BaseException, path: str | Path | None = None) -> bool:
    """Whether `exc` (or an exception it was raised from) means the disk holding `path` is full."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _NO_SPACE_ERRNOS:
            return True
        text = str(e).lower()
        if any(t in text for t in _NO_SPACE_TEXT):
            return True
        if path is not None and any(t in text for t in _STREAM_TEXT):
            try:
                return free_bytes(path) < NEARLY_FULL
            except OSError:
                return False
        e = e.__cause__ or e.__context__
    return False


NO_SPACE = "no space left on device"  # in every no_space_message


def write_problem(what: str, path: str | Path, exc: OSError) -> str:
    """The one line for a failed write `what` in `path`'s filesystem: `no_space_message` when it is full, else
    `WHAT: <the OS's reason>` (a read-only filesystem, a permission)."""
    return no_space_message(what, path, None) if is_no_space(exc, path) else f"{what}: {exc.strerror or exc}"


def no_space_message(what: str, path: str | Path, needed: int | None) -> str:
    """`WHAT: no space left on device (needed about X, free Y)`."""
    try:
        free = fmt_size(free_bytes(path))
    except OSError:
        free = "unknown"
    need = f"needed about {fmt_size(needed)}, " if needed else ""
    return f"{what}: {NO_SPACE} ({need}free {free})"
