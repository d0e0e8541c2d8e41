"""A TLS ClientHello reader (TLS 1.0 to 1.3), sans I/O.

derpd's TLS listener answers an ACME CA's TLS-ALPN-01 validation (RFC 8737) with a special
certificate, chosen by the SNI, whenever the client offers ALPN ``acme-tls/1``. That choice has to
be made before Python's ssl module sees the connection: ssl offers no hook that runs between reading
the ClientHello and picking the certificate with the ALPN list in hand. So the listener reads the
first bytes itself, asks :class:`ClientHelloReader` what they offer, and then replays every byte it
read (:attr:`ClientHelloReader.buffered`) into the ssl engine it picked, unchanged.

Nothing here touches a socket, a clock or trio: the reader is fed bytes and answers "need more",
"here is the ClientHello", or raises :class:`ClientHelloError`. It validates the record layer
(RFC 8446 §5.1, the same framing since TLS 1.0) and the ClientHello's structure (RFC 8446 §4.1.2,
RFC 5246 §7.4.1.2) far enough to trust the two extensions it reports, server_name (RFC 6066 §3)
and ALPN (RFC 7301 §3.1); everything else (cipher suites, versions, key shares) is left to the TLS
engine, which sees the very same bytes.

Decisions where the RFCs leave room:

* The ClientHello's body may be at most ``max_size`` bytes, 65536 by default: Go's crypto/tls
  (``maxHandshake``, what Tailscale's derper runs on) refuses larger handshake messages too. Real
  hellos are 200 bytes to 2 KiB (a post-quantum key share included).
* The handshake message may be spread over any number of records of any size, but their 5-byte
  headers may at most double what is buffered: more than ``2 * (4 + max_size)`` bytes without a
  complete hello is refused, so 1-byte records cannot make the reader hold six times its limit.
* Record versions 0x0300 to 0x0304 are accepted; the hello's own ``legacy_version`` must have major
  version 3 (any minor: version negotiation is the TLS engine's business) and is reported as sent.
* server_name: each entry is a name type and a 16-bit length (as Go reads it); entries of other
  name types are skipped, a second host_name is an error (RFC 6066: one name per type). The
  host_name must be visible ASCII (0x21 to 0x7E): no spaces, controls or NUL. It is reported exactly
  as sent: no case folding, a final dot kept.
* An empty extensions block and no extensions block at all (an SSLv3/TLS 1.0 style hello) are both
  accepted and mean no SNI and no ALPN.
* Bytes after the ClientHello's handshake message (the rest of its record, more records such as
  TLS 1.3 early data) are not looked at; they stay in :attr:`ClientHelloReader.buffered`.
"""

from __future__ import annotations

from dataclasses import dataclass

ACME_TLS_1 = b"acme-tls/1"  # the ALPN protocol name a TLS-ALPN-01 validation offers (RFC 8737)

RECORD_HEADER_LEN = 5  # content type, legacy record version (2), length (2)
MAX_RECORD_LEN = 1 << 14  # RFC 8446 §5.1: a TLSPlaintext fragment is at most 2^14 bytes
HANDSHAKE_HEADER_LEN = 4  # msg_type, 24-bit length
MAX_CLIENT_HELLO = 1 << 16  # default bound on the ClientHello body (Go's crypto/tls maxHandshake)
MAX_SESSION_ID_LEN = 32

CONTENT_HANDSHAKE = 22
HANDSHAKE_CLIENT_HELLO = 1
EXT_SERVER_NAME = 0
EXT_ALPN = 16
NAME_TYPE_HOST_NAME = 0

_MIN_BODY = 2 + 32 + 1 + 2 + 2 + 1 + 1  # version, random, empty session id, one cipher suite, one compression method
_MAX_BODY = (1 << 24) - 1
_EAGER_BODY = 1024  # body bytes checked on every feed; past them, each time the body has doubled
_CONTENT_TYPES = {20: "change_cipher_spec", 21: "alert", 23: "application_data", 24: "heartbeat"}


class ClientHelloError(ValueError):
    """Not a TLS ClientHello, or a malformed or oversized one; the message says why, on one short line."""


@dataclass(frozen=True, slots=True)
class ClientHello:
    """What a ClientHello offers that derpd decides on before the TLS engine runs."""

    server_name: str | None  # the SNI host_name, ASCII, exactly as sent; None without a server_name extension
    alpn: tuple[bytes, ...]  # the ALPN protocol names offered, in order; () without an ALPN extension
    legacy_version: int  # the hello's client_version, e.g. 0x0303 (TLS 1.3 puts its versions in an extension)

    @property
    def acme_tls_alpn(self) -> bool:
        """Whether the client offers ``acme-tls/1``: a CA validating a TLS-ALPN-01 challenge."""
        return ACME_TLS_1 in self.alpn


def _preview(data: bytes | bytearray) -> str:
    return repr(bytes(data[:16])) + ("..." if len(data) > 16 else "")


class _NeedMore(Exception):
    """Internal: the bytes so far hold no error, but the hello goes on past them."""


class ClientHelloReader:
    """Incremental reader of the ClientHello at the start of a TLS connection.

    :meth:`feed` bytes as they arrive, in chunks of any size. It returns ``None`` while more bytes
    are needed, the :class:`ClientHello` once its whole handshake message is in (however many
    records it spans), or raises :class:`ClientHelloError`. The record layer and handshake header
    are checked byte by byte, so an HTTP request, an SSLv2 hello or an alert fails on its first
    byte and an oversized length as soon as its first byte is in. The hello's body is checked as it
    arrives (its first KiB on every feed, then each time the buffered part has doubled), and
    completely once it is all there.

    Every byte fed is kept, in order, in :attr:`buffered`, to be replayed into the TLS engine.
    After a hello was returned, :meth:`feed` keeps buffering and returns that same hello. After an
    error the reader stays failed: :meth:`feed` raises the same error and buffers nothing more.
    """

    def __init__(self, max_size: int = MAX_CLIENT_HELLO) -> None:
        """``max_size`` bounds the ClientHello's body (its 24-bit length), record headers aside."""
        if not _MIN_BODY <= max_size <= _MAX_BODY:
            raise ValueError(f"max_size must be between {_MIN_BODY} and {_MAX_BODY}, got {max_size}")
        self.max_size = max_size
        self.max_buffer = 2 * (HANDSHAKE_HEADER_LEN + max_size)  # bytes held without a complete hello
        self._buf = bytearray()
        self._pos = 0  # where in _buf the record layer reader stands
        self._record_left = 0  # bytes of the current record's fragment not yet taken into _msg
        self._msg = bytearray()  # the handshake message so far, reassembled from the records
        self._body_len: int | None = None  # the hello's 24-bit length, once it is in
        self._tried = 0  # body bytes at the last attempt to parse an incomplete body
        self._hello: ClientHello | None = None
        self._error: ClientHelloError | None = None

    @property
    def buffered(self) -> bytes:
        """Everything fed so far, in order (to replay into the TLS engine)."""
        return bytes(self._buf)

    @property
    def hello(self) -> ClientHello | None:
        """The ClientHello once :meth:`feed` has returned it, else None."""
        return self._hello

    def feed(self, data: bytes) -> ClientHello | None:
        """None while more bytes are needed; the ClientHello once the whole handshake message is in;
        raises ClientHelloError."""
        if self._error is not None:
            raise self._error
        self._buf += data
        if self._hello is not None:
            return self._hello
        try:
            self._hello = self._advance()
        except ClientHelloError as exc:
            self._error = exc
            raise
        return self._hello

    # -- the record layer ---------------------------------------------------------------------------

    def _advance(self) -> ClientHello | None:
        buf = self._buf
        while True:
            if self._body_len is not None and len(self._msg) == HANDSHAKE_HEADER_LEN + self._body_len:
                return _parse_body(bytes(self._msg[HANDSHAKE_HEADER_LEN:]), self._body_len)
            if self._record_left == 0:
                header = buf[self._pos : self._pos + RECORD_HEADER_LEN]
                _check_record_header(header, buf if self._pos == 0 else None)
                if len(header) < RECORD_HEADER_LEN:
                    break
                self._record_left = int.from_bytes(header[3:5], "big")
                self._pos += RECORD_HEADER_LEN
            want = (
                HANDSHAKE_HEADER_LEN - len(self._msg)
                if self._body_len is None
                else HANDSHAKE_HEADER_LEN + self._body_len - len(self._msg)
            )
            take = min(want, self._record_left, len(buf) - self._pos)
            if take == 0:
                break
            self._msg += buf[self._pos : self._pos + take]
            self._pos += take
            self._record_left -= take
            if self._body_len is None:
                self._body_len = self._check_handshake_header()
        self._try_partial_body()
        if len(buf) > self.max_buffer:
            raise ClientHelloError(f"no complete ClientHello in {len(buf)} bytes: spread over too many small records")
        return None

    def _check_handshake_header(self) -> int | None:
        """Check the handshake header as far as it is in; its body length once it is all there."""
        msg = self._msg
        if msg[0] != HANDSHAKE_CLIENT_HELLO:
            raise ClientHelloError(f"handshake message type {msg[0]}, expected a ClientHello (1)")
        known = msg[1:HANDSHAKE_HEADER_LEN]
        least = int.from_bytes(known, "big") << (8 * (3 - len(known)))  # the length can be no smaller
        if least > self.max_size:
            what = f"{least}" if len(known) == 3 else f"at least {least}"
            raise ClientHelloError(f"ClientHello of {what} bytes is over the limit of {self.max_size}")
        if len(known) < 3:
            return None
        if least < _MIN_BODY:
            raise ClientHelloError(f"ClientHello of {least} bytes is shorter than the smallest possible ({_MIN_BODY})")
        return least

    def _try_partial_body(self) -> None:
        """Look for an error in the body so far: on every feed for its first bytes (where the fixed
        fields are), then each time it has doubled, so that feeding a byte at a time stays linear."""
        if self._body_len is None:
            return
        have = len(self._msg) - HANDSHAKE_HEADER_LEN
        if have == self._tried or (have > _EAGER_BODY and have < 2 * self._tried):
            return
        self._tried = have
        try:
            _parse_body(bytes(self._msg[HANDSHAKE_HEADER_LEN:]), self._body_len)
        except _NeedMore:
            pass


def _check_record_header(header: bytes | bytearray, stream: bytearray | None) -> None:
    """Check a record header as far as it is in (it may be cut anywhere); ``stream`` is the whole
    input when this is the first record (to quote in an error), None for a later one."""
    if not header:
        return
    kind = header[0]
    if kind != CONTENT_HANDSHAKE:
        if stream is None:
            raise ClientHelloError(f"a record of content type {kind} in the middle of the ClientHello")
        if kind & 0x80:
            raise ClientHelloError(
                f"an SSLv2-style ClientHello (not supported): starts with {_preview(stream or header)}"
            )
        if kind in _CONTENT_TYPES:
            raise ClientHelloError(f"TLS record of type {_CONTENT_TYPES[kind]} ({kind}), expected a handshake (22)")
        raise ClientHelloError(f"not a TLS handshake record: starts with {_preview(stream or header)}")
    if len(header) >= 2 and header[1] != 3:
        raise ClientHelloError(f"not a TLS handshake record: starts with {_preview(stream or header)}")
    if len(header) >= 3 and header[2] > 4:
        raise ClientHelloError(f"unknown TLS record version 0x03{header[2]:02x}")
    if len(header) >= 4 and header[3] > MAX_RECORD_LEN >> 8:
        raise ClientHelloError(f"TLS record of at least {header[3] << 8} bytes is over the limit of {MAX_RECORD_LEN}")
    if len(header) >= 5:
        length = int.from_bytes(header[3:5], "big")
        if length == 0:
            raise ClientHelloError("empty TLS handshake record")
        if length > MAX_RECORD_LEN:
            raise ClientHelloError(f"TLS record of {length} bytes is over the limit of {MAX_RECORD_LEN}")


# -- the ClientHello body -----------------------------------------------------------------------------


class _Cursor:
    """Reads a vector of declared extent ``[pos, end)`` out of ``data``, which may stop short of it.

    Going past ``end`` means a length lied: an error. Going past the bytes that are there (but not
    past ``end``) raises :class:`_NeedMore`.
    """

    __slots__ = ("data", "end", "pos", "what")

    def __init__(self, data: bytes, pos: int, end: int, what: str) -> None:
        self.data, self.pos, self.end, self.what = data, pos, end, what

    @property
    def left(self) -> int:
        return self.end - self.pos

    def take(self, n: int, field: str) -> bytes:
        if n > self.left:
            raise ClientHelloError(f"{field} needs {n} bytes, only {self.left} left in the {self.what}")
        if self.pos + n > len(self.data):
            raise _NeedMore
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def take_all(self) -> bytes:
        return self.take(self.left, self.what)

    def uint(self, n: int, field: str) -> int:
        return int.from_bytes(self.take(n, field), "big")

    def vector(self, length_bytes: int, field: str, low: int = 0, high: int | None = None) -> _Cursor:
        """A length-prefixed vector of ``low..high`` bytes, as a cursor over its contents (not yet read)."""
        n = self.uint(length_bytes, f"{field} length")
        if n > self.left:
            raise ClientHelloError(f"{field} length {n} is over the {self.left} bytes left in the {self.what}")
        if n < low or (high is not None and n > high):
            bound = f"{low}..{high}" if high is not None else f"at least {low}"
            raise ClientHelloError(f"{field} of {n} bytes, must be {bound}")
        sub = _Cursor(self.data, self.pos, self.pos + n, field)
        self.pos += n
        return sub

    def done(self) -> None:
        """The vector must be used up exactly."""
        if self.left:
            raise ClientHelloError(f"{self.left} stray byte(s) at the end of the {self.what}")


def _parse_body(body: bytes, total: int) -> ClientHello:
    """Parse the ClientHello body; ``body`` may be its first bytes only (of ``total``), then
    :class:`_NeedMore` unless an error shows already."""
    c = _Cursor(body, 0, total, "ClientHello")
    version = c.uint(2, "legacy_version")
    if version >> 8 != 3:
        raise ClientHelloError(f"ClientHello version 0x{version:04x} is not SSLv3/TLS")
    c.take(32, "random")
    c.vector(1, "legacy_session_id", 0, MAX_SESSION_ID_LEN)
    suites = c.vector(2, "cipher_suites", 2)
    if suites.left % 2:
        raise ClientHelloError(f"cipher_suites of {suites.left} bytes, must be an even number")
    c.vector(1, "legacy_compression_methods", 1)
    if c.left == 0:
        return ClientHello(None, (), version)  # no extensions at all: an SSLv3/TLS 1.0 style hello
    extensions = c.vector(2, "extensions")
    c.done()
    seen: set[int] = set()
    server_name: str | None = None
    alpn: tuple[bytes, ...] = ()
    while extensions.left:
        kind = extensions.uint(2, "extension type")
        data = extensions.vector(2, f"extension {kind}")
        if kind in seen:
            raise ClientHelloError(f"extension {kind} appears twice")
        seen.add(kind)
        if kind == EXT_SERVER_NAME:
            server_name = _server_name(data)
        elif kind == EXT_ALPN:
            alpn = _alpn(data)
    return ClientHello(server_name, alpn, version)


def _server_name(ext: _Cursor) -> str | None:
    """RFC 6066 §3: ``ServerName server_name_list<1..2^16-1>``, each a name type and a 16-bit length."""
    names = ext.vector(2, "server_name_list", 1)
    ext.done()
    host: str | None = None
    while names.left:
        name_type = names.uint(1, "server name type")
        name = names.vector(2, "server name").take_all()
        if name_type != NAME_TYPE_HOST_NAME:
            continue
        if not name:
            raise ClientHelloError("server_name has an empty host_name")
        if host is not None:
            raise ClientHelloError("server_name has two host_name entries")
        bad = next((b for b in name if not 0x21 <= b <= 0x7E), None)
        if bad is not None:
            raise ClientHelloError(f"server_name host_name has a byte 0x{bad:02x} that is not visible ASCII")
        host = name.decode("ascii")
    return host


def _alpn(ext: _Cursor) -> tuple[bytes, ...]:
    """RFC 7301 §3.1: ``ProtocolName protocol_name_list<2..2^16-1>``, each ``opaque ProtocolName<1..2^8-1>``."""
    names = ext.vector(2, "ALPN protocol_name_list", 2)
    ext.done()
    out = []
    while names.left:
        out.append(names.vector(1, "ALPN protocol name", 1).take_all())
    return tuple(out)


def parse_client_hello(data: bytes) -> ClientHello:
    """The ClientHello at the start of ``data``, which must hold all of it (anything after it is ignored)."""
    hello = ClientHelloReader().feed(data)
    if hello is None:
        raise ClientHelloError(f"incomplete ClientHello: {len(data)} bytes are not all of it")
    return hello
