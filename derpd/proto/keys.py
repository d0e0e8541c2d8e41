"""Node keys, sealed boxes, the derper key file and the mesh key.

Public keys travel through the relay as raw 32-byte ``bytes`` (hashable, cheap to
slice off a frame); the text forms ``nodekey:<hex>`` / ``privkey:<hex>`` exist only at
the edges (files, logs, CLI). Sealing is NaCl ``crypto_box`` exactly as Tailscale's
``key.NodePrivate.SealTo``: the 24-byte nonce followed by the box output.
"""

from __future__ import annotations

import hmac
import re
from typing import NewType

from nacl.bindings import crypto_box_beforenm, crypto_box_easy_afternm, crypto_box_open_easy_afternm
from nacl.exceptions import CryptoError
from nacl.public import PrivateKey
from nacl.utils import random as nacl_random

from derpd.base.errors import ConfigurationError
from derpd.proto import gojson

KEY_LEN = 32
NONCE_LEN = 24
PUBLIC_PREFIX = "nodekey:"
PRIVATE_PREFIX = "privkey:"
MAX_KEY_FILE = 64 * 1024  # a derper key file is 86 bytes; anything this big is not one


class InvalidKeyError(ConfigurationError, ValueError):
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


NodeKey = NewType("NodeKey", bytes)
"""A node's 32-byte Curve25519 public key (Tailscale's ``key.NodePublic``), as it travels on the wire.

Made where keys come from (parsing text, a private key, a login, a decoded frame) and named in every
API that takes one. The relay's hot path looks its registry up with raw frame slices: a ``NodeKey`` is
a ``bytes``, so those dicts are keyed by ``bytes`` and no per-packet conversion is made."""


def public_key_text(raw: NodeKey) -> str:
    """``nodekey:<64 lowercase hex>``, the form Tailscale prints and Headscale stores."""
    return PUBLIC_PREFIX + raw.hex()


def short_key(raw: NodeKey) -> str:
    """A log-friendly prefix of a public key; never used for private material."""
    return raw[:4].hex()


def parse_public_key(text: str) -> NodeKey:
    return NodeKey(_parse_hex_key(text.strip(), PUBLIC_PREFIX))


class NodePrivate:
    """A Curve25519 node private key (the server's identity, or a client's)."""

    __slots__ = ("_key", "_shared", "public")

    def __init__(self, raw: bytes) -> None:
        if len(raw) != KEY_LEN:
            raise InvalidKeyError(f"private key must be {KEY_LEN} bytes")
        self._key = PrivateKey(raw)
        self.public = NodeKey(bytes(self._key.public_key))
        # Peer public key -> the box's shared key (X25519 + HSalsa20, what NaCl's Box precomputes):
        # the one expensive step of a login, done once per peer. The boxes themselves are the
        # bindings' *_afternm calls, without a Box and EncryptedMessage object per message.
        self._shared: dict[bytes, bytes] = {}

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

    def _shared_key(self, peer: bytes) -> bytes:
        """Raises CryptoError for a key NaCl refuses (the caller's box then does not open)."""
        shared = self._shared.get(peer)
        if shared is None:
            if len(peer) != KEY_LEN:
                raise InvalidKeyError(f"public key must be {KEY_LEN} bytes")
            shared = crypto_box_beforenm(bytes(peer), bytes(self._key))
            # A tiny cache: a server sees each client once per login (sealing ServerInfo right after
            # opening ClientInfo), a client its one server.
            if len(self._shared) >= 64:
                self._shared.clear()
            self._shared[peer] = shared
        return shared

    def seal_to(self, peer: bytes, message: bytes, nonce: bytes | None = None) -> bytes:
        """nonce(24) || box(message), sealed from this key to ``peer``."""
        if nonce is None:
            nonce = nacl_random(NONCE_LEN)
        return nonce + crypto_box_easy_afternm(message, nonce, self._shared_key(peer))

    def open_from(self, peer: bytes, sealed: bytes) -> bytes | None:
        """The plaintext of a box ``peer`` sealed to us, or None if it does not open."""
        if len(sealed) < NONCE_LEN + 16:
            return None
        try:
            return crypto_box_open_easy_afternm(sealed[NONCE_LEN:], sealed[:NONCE_LEN], self._shared_key(peer))
        except CryptoError:
            return None


# --- key file (derper's format) ---------------------------------------------------


def key_file_text(key: NodePrivate) -> str:
    """What derper writes: ``json.MarshalIndent`` with a tab, no trailing newline."""
    return '{\n\t"PrivateKey": "' + key.to_text() + '"\n}'


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


def mesh_keys_equal(a: bytes | None, b: bytes | None) -> bool:
    """Constant-time comparison; a missing or all-zero key never matches."""
    if not a or not b or a == bytes(KEY_LEN) or b == bytes(KEY_LEN):
        return False
    return hmac.compare_digest(a, b)
