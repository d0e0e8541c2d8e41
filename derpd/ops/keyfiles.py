"""The node's key files on disk: derper's JSON key file (read, created atomically, refused when others
could read it) and the region's mesh key file. The formats themselves are ``derpd.proto.keys``."""

from __future__ import annotations

import enum
import os
import stat
from pathlib import Path

from derpd.base.files import is_empty_file, write_atomic
from derpd.proto.keys import (
    MAX_KEY_FILE,
    KeyFileError,
    MeshKeyError,
    NodePrivate,
    key_file_text,
    parse_key_file,
    parse_mesh_key,
)


def check_private_mode(path: Path, st: os.stat_result) -> None:
    """KeyFileError unless ``path`` is a regular file only its owner can access (a private key)."""
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"{path} is not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise KeyFileError(
            f"{path} has mode {mode:04o}; a private key must not be accessible by group or others "
            f"(run: chmod 600 {path})"
        )


def load_key_file(path: str | os.PathLike[str]) -> NodePrivate:
    """Read a derper key file, refusing one that others could read."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise KeyFileError(f"cannot read key file {p}: {e.strerror}") from None
    try:
        check_private_mode(p, os.fstat(fd))
        with os.fdopen(fd, "r", encoding="utf-8", closefd=False) as f:
            text = f.read(MAX_KEY_FILE + 1)
    except UnicodeDecodeError:
        raise KeyFileError(f"key file {p} is not UTF-8 text") from None
    finally:
        os.close(fd)
    try:
        return parse_key_file(text)
    except KeyFileError as e:
        raise KeyFileError(f"key file {p}: {e}") from None


def write_key_file(path: str | os.PathLike[str], key: NodePrivate, *, replace: bool = False) -> None:
    """Write ``path`` atomically with mode 0600 (its directory 0700 when created).

    A crash at any instant leaves no file or the whole file (``derpd.base.files``). An existing file is
    never overwritten unless ``replace`` (used only for the empty file an old version's crash left).
    """
    p = Path(path)
    try:
        write_atomic(p, key_file_text(key).encode(), 0o600, replace=replace)
    except FileExistsError:
        raise KeyFileError(f"cannot create key file {p}: it already exists") from None
    except OSError as e:
        raise KeyFileError(f"cannot create key file {p}: {e.strerror or e}") from None


class KeyFileOrigin(enum.StrEnum):
    """Where ``load_or_create_key_file``'s key came from."""

    LOADED = "loaded"
    CREATED = "created"
    REPLACED_EMPTY = "replaced_empty"  # a 0-byte file (an interrupted write by an older version)


def load_or_create_key_file(path: str | os.PathLike[str]) -> tuple[NodePrivate, KeyFileOrigin]:
    """The key in ``path``, creating a fresh one when the file does not exist or is empty.

    An empty file holds no key anyone could depend on: earlier derpd versions wrote key files in place, so a
    crash right after creating one left 0 bytes, and refusing it would turn ``Restart=`` into a crash
    loop. It is replaced (the caller logs a warning). Any other malformed file is refused.
    """
    p = Path(path)
    if is_empty_file(p):
        key = NodePrivate.generate()
        write_key_file(p, key, replace=True)
        return key, KeyFileOrigin.REPLACED_EMPTY
    if not p.exists() and not p.is_symlink():
        key = NodePrivate.generate()
        try:
            write_key_file(p, key)
        except KeyFileError:
            if not p.exists():
                raise
            return load_key_file(p), KeyFileOrigin.LOADED  # another process created it meanwhile
        return key, KeyFileOrigin.CREATED
    return load_key_file(p), KeyFileOrigin.LOADED


def load_mesh_key_file(path: str | os.PathLike[str]) -> bytes:
    p = Path(path)
    try:
        st = p.stat()
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise MeshKeyError(f"cannot read mesh key file {p}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise MeshKeyError(f"mesh key file {p} is not UTF-8 text") from None
    if stat.S_IMODE(st.st_mode) & 0o007:
        raise MeshKeyError(
            f"{p} has mode {stat.S_IMODE(st.st_mode):04o}; the mesh key must not be accessible by others "
            f"(run: chmod 600 {p})"
        )
    try:
        return parse_mesh_key(text)
    except MeshKeyError as e:
        raise MeshKeyError(f"mesh key file {p}: {e}") from None


