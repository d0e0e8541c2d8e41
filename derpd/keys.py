"""Node keys, sealed boxes, the derper key file and the mesh key.

Public keys travel through the relay as raw 32-byte ``bytes`` (hashable, cheap to
slice off a frame); the text forms ``nodekey:<hex>`` / ``privkey:<hex>`` exist only at
the edges (files, logs, CLI). Sealing is NaCl ``crypto_box`` exactly as Tailscale's
``key.NodePrivate.SealTo``: the 24-byte nonce followed by the box output.
"""

from __future__ import annotations

import enum
import hmac
import os
import re
import stat
from pathlib import Path

from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey
from nacl.utils import random as nacl_random

from . import gojson
from .files import is_empty_file, write_atomic

KEY_LEN = 32
NONCE_LEN = 24
PUBLIC_PREFIX = "nodekey:"
PRIVATE_PREFIX = "privkey:"
MAX_KEY_FILE = 64 * 1024  # a derper key file is 86 bytes; anything this big is not one


class InvalidKeyError(ValueError):
    """A key in text form or a key file is unusable; the message says why."""


class KeyFileError(InvalidKeyError):
    """The key file cannot be used (unreadable, malformed, or too permissive)."""


_HEX_KEY = re.compile(r"[0-9A-Fa-f]{64}")


def hex_key(text: str) -> bytes | None:
    """32 bytes from exactly 64 hex digits, as Go's ``hex.DecodeString`` reads them; None otherwise.
    (``bytes.fromhex`` alone would skip spaces between digit pairs and return a short key.)"""
    return bytes.fromhex(text) if _HEX_KEY.fullmatch(text) else None


def _parse_hex_key(text: str, prefix: str) -> bytes:
    if not text.startswith(prefix):
        raise InvalidKeyError(f"key must start with {prefix!r}")
    body = text[len(prefix) :]
    if len(body) != 2 * KEY_LEN:
        raise InvalidKeyError(f"key must be {prefix} followed by {2 * KEY_LEN} hex digits")
    key = hex_key(body)
    if key is None:
        raise InvalidKeyError(f"key is not hexadecimal: {prefix}…")
    return key


def public_key_text(raw: bytes) -> str:
    """``nodekey:<64 lowercase hex>``, the form Tailscale prints and Headscale stores."""
    return PUBLIC_PREFIX + raw.hex()


def short_key(raw: bytes) -> str:
    """A log-friendly prefix of a public key; never used for private material."""
    return raw[:4].hex()


def parse_public_key(text: str) -> bytes:
    return _parse_hex_key(text.strip(), PUBLIC_PREFIX)


class NodePrivate:
    """A Curve25519 node private key (the server's identity, or a client's)."""

    __slots__ = ("_boxes", "_key", "public")

    def __init__(self, raw: bytes) -> None:
        if len(raw) != KEY_LEN:
            raise InvalidKeyError(f"private key must be {KEY_LEN} bytes")
        self._key = PrivateKey(raw)
        self.public: bytes = bytes(self._key.public_key)
        self._boxes: dict[bytes, Box] = {}

    @classmethod
    def generate(cls) -> NodePrivate:
        return cls(bytes(PrivateKey.generate()))

    @classmethod
    def from_text(cls, text: str) -> NodePrivate:
        return cls(_parse_hex_key(text.strip(), PRIVATE_PREFIX))

    def to_text(self) -> str:
        return PRIVATE_PREFIX + bytes(self._key).hex()

    def __repr__(self) -> str:  # never print private material
        return f"NodePrivate(public={public_key_text(self.public)})"

    def _box(self, peer: bytes) -> Box:
        box = self._boxes.get(peer)
        if box is None:
            if len(peer) != KEY_LEN:
                raise InvalidKeyError(f"public key must be {KEY_LEN} bytes")
            box = Box(self._key, PublicKey(peer))
            if len(self._boxes) > 64:  # a tiny cache; handshakes are rare
                self._boxes.clear()
            self._boxes[peer] = box
        return box

    def seal_to(self, peer: bytes, message: bytes, nonce: bytes | None = None) -> bytes:
        """nonce(24) || box(message), sealed from this key to ``peer``."""
        if nonce is None:
            nonce = nacl_random(NONCE_LEN)
        return bytes(self._box(peer).encrypt(message, nonce))

    def open_from(self, peer: bytes, sealed: bytes) -> bytes | None:
        """The plaintext of a box ``peer`` sealed to us, or None if it does not open."""
        if len(sealed) < NONCE_LEN + 16:
            return None
        try:
            return bytes(self._box(peer).decrypt(sealed[NONCE_LEN:], sealed[:NONCE_LEN]))
        except CryptoError:
            return None


# --- key file (derper's format) ---------------------------------------------------


def key_file_text(key: NodePrivate) -> str:
    """What derper writes: ``json.MarshalIndent`` with a tab, no trailing newline."""
    return '{\n\t"PrivateKey": "' + key.to_text() + '"\n}'


def _check_private_mode(path: Path, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"{path} is not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise KeyFileError(
            f"{path} has mode {mode:04o}; a private key must not be accessible by group or others "
            f"(run: chmod 600 {path})"
        )


def parse_key_file(text: str) -> NodePrivate:
    try:
        fields = gojson.decode(text, {"PrivateKey": str}, "key file", max_size=MAX_KEY_FILE)
    except gojson.GoJSONError as e:
        raise KeyFileError(f'{e} (expected a JSON object like {{"PrivateKey": "privkey:<hex>"}})') from None
    value = fields.get("PrivateKey")
    if value is None:
        raise KeyFileError('missing "PrivateKey" string')
    try:
        return NodePrivate.from_text(value)
    except InvalidKeyError as e:
        raise KeyFileError(f"bad PrivateKey: {e}") from None


def load_key_file(path: str | os.PathLike[str]) -> NodePrivate:
    """Read a derper key file, refusing one that others could read."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise KeyFileError(f"cannot read key file {p}: {e.strerror}") from None
    try:
        _check_private_mode(p, os.fstat(fd))
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

    A crash at any instant leaves no file or the whole file (``derpd.files``). An existing file is
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


# --- mesh key ------------------------------------------------------------------


class MeshKeyError(InvalidKeyError):
    pass


def parse_mesh_key(text: str) -> bytes:
    """Like ``key.ParseDERPMesh``: surrounding whitespace trimmed, exactly 64 hex digits."""
    body = text.strip()
    if len(body) != 2 * KEY_LEN:
        raise MeshKeyError("invalid mesh key: must be 64-digit hexadecimal number")
    key = hex_key(body)
    if key is None:
        raise MeshKeyError("invalid mesh key: not hexadecimal")
    return key


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


def mesh_keys_equal(a: bytes | None, b: bytes | None) -> bool:
    """Constant-time comparison; a missing or all-zero key never matches."""
    if not a or not b or a == bytes(KEY_LEN) or b == bytes(KEY_LEN):
        return False
    return hmac.compare_digest(a, b)
