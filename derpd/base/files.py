"""Files derpd creates itself (the node key, a self-signed certificate): written so that a crash at any
instant leaves either the old state or the complete new file, never a part of one.

The recipe is derper's (``atomicfile.WriteFile``) plus a directory sync: write a temporary file in the
same directory with its final mode from the first byte (a private key is never briefly readable by
others), ``fsync`` it, give it its name, ``fsync`` the directory so the name survives a power cut.
Naming uses ``link`` when an existing file must not be replaced (it fails if one appeared meanwhile)
and ``rename`` when it must.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path

TEMP_PREFIX = ".tmp-"  # .tmp-<name>-XXXX beside the target; left only by a crash, removed later
STALE_AFTER = 60.0  # seconds


def write_atomic(path: str | os.PathLike[str], data: bytes, mode: int = 0o600, *, replace: bool = False) -> None:
    """Give ``path`` the content ``data`` and permissions ``mode`` in one step.

    Without ``replace``, an existing ``path`` is never touched: ``FileExistsError`` is raised.
    The directory is created with mode 0700 when missing. Raises ``OSError`` on any failure,
    leaving ``path`` as it was.
    """
    p = Path(path)
    p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    remove_stale_temps(p)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f"{TEMP_PREFIX}{p.name}-")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, p)
        else:
            os.link(tmp, p)
        sync_dir(p.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def sync_dir(directory: Path) -> None:
    """Make the directory's entries (a new or renamed file) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temps(path: Path, *, min_age: float = STALE_AFTER) -> None:
    """Temporary files a killed process left beside ``path`` (they hold nothing anyone uses). Only
    ones older than ``min_age`` seconds: a younger one may belong to a process writing right now."""
    now = time.time()
    with contextlib.suppress(OSError):
        for stale in path.parent.glob(f"{TEMP_PREFIX}{path.name}-*"):
            with contextlib.suppress(OSError):
                if now - stale.lstat().st_mtime >= min_age:
                    stale.unlink()


def is_empty_file(path: str | os.PathLike[str]) -> bool:
    """True for an existing regular file of 0 bytes (what a crash mid-write left before derpd wrote
    atomically); never follows a symlink."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return st.st_size == 0 and (st.st_mode & 0o170000) == 0o100000
