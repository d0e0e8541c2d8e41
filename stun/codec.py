"""STUN message codec for the binding method, sans-IO (no sockets, no clocks).

Server side: :func:`parse_binding_request` classifies a datagram as a Tailscale request
(what Go's ``stun.ParseBindingRequest`` accepts), a generic RFC 5389/8489 request, or a
classic RFC 3489 request, or raises :class:`StunError`; it also lists the unknown
comprehension-required attributes it saw (:attr:`BindingRequest.unknown_attributes`).
:func:`build_response` writes the binding success answer and
:func:`unknown_attributes_response` the 420 (Unknown Attribute) error answer; which one
is sent, if any, is the server's decision. Tailscale requests get exactly the bytes Go's
``stun.Response`` writes, with one deliberate difference: an IPv4-mapped IPv6 client
address (``::ffff:a.b.c.d``, seen on a dual-stack socket) is answered as plain IPv4
(family 1), which every STUN parser understands, where Go writes family 2.

Every reply this module builds is at most :data:`MAX_REPLY_RATIO` (2.2) times the size of
the smallest request it can answer (see :func:`unknown_attributes_response` for the
tightest case), so a spoofed source address gains an attacker little.

The fast path: :func:`tailscale_response` (and :func:`tailscale_response_into`, which writes into
the caller's buffer) recognises the one request shape Tailscale's clients send (40 bytes, byte for
byte Go's ``stun.Request`` but for its transaction id and fingerprint) with a few whole-field
comparisons and one CRC, and answers it from a template. It decides nothing of its own: for any
datagram it either returns exactly what ``build_response(parse_binding_request(datagram), ...)``
returns, or None, meaning "ask the full codec", which stays the single source of truth
(``tests/test_stun_codec.py`` proves the two agree on every input).

Client side (tests and tools): :func:`binding_request` builds Go's ``stun.Request``,
:func:`parse_response` extracts the mapped address like Go's ``stun.ParseResponse``, and
:func:`parse_error_response` reads a binding error response.

No function here raises anything but :class:`StunError` on malformed input bytes.
"""

from __future__ import annotations

import enum
import ipaddress
import os
import socket
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "ATTR_CHANGE_REQUEST",
    "ATTR_ERROR_CODE",
    "ATTR_FINGERPRINT",
    "ATTR_MAPPED_ADDRESS",
    "ATTR_MESSAGE_INTEGRITY",
    "ATTR_MESSAGE_INTEGRITY_SHA256",
    "ATTR_RESPONSE_ADDRESS",
    "ATTR_SOFTWARE",
    "ATTR_UNKNOWN_ATTRIBUTES",
    "ATTR_XOR_MAPPED_ADDRESS",
    "ATTR_XOR_MAPPED_ADDRESS_ALT",
    "BINDING_ERROR",
    "BINDING_REQUEST",
    "BINDING_SUCCESS",
    "HEADER_LEN",
    "MAGIC_COOKIE",
    "MAX_REPLY_RATIO",
    "MAX_UNKNOWN_LISTED",
    "TAILSCALE_SOFTWARE",
    "UNDERSTOOD_ATTRIBUTES",
    "UNKNOWN_ATTRIBUTE_REASON",
    "BindingRequest",
    "BindingResponse",
    "ErrorResponse",
    "RequestKind",
    "StunError",
    "binding_request",
    "binding_response",
    "build_response",
    "classic_binding_response",
    "encode_message",
    "fingerprint",
    "new_txid",
    "pack_address",
    "parse_binding_request",
    "parse_error_response",
    "parse_response",
    "tailscale_response",
    "tailscale_response_into",
    "unknown_attributes_response",
]

HEADER_LEN = 20
MAGIC_COOKIE = 0x2112A442
COOKIE_BYTES = MAGIC_COOKIE.to_bytes(4, "big")
TXID_LEN = 12
CLASSIC_TXID_LEN = 16

BINDING_REQUEST = 0x0001
BINDING_SUCCESS = 0x0101
BINDING_ERROR = 0x0111

ATTR_MAPPED_ADDRESS = 0x0001
ATTR_RESPONSE_ADDRESS = 0x0002  # RFC 3489 only: "send the reply there"; never honoured
ATTR_CHANGE_REQUEST = 0x0003
ATTR_SOURCE_ADDRESS = 0x0004  # RFC 3489, response-only
ATTR_CHANGED_ADDRESS = 0x0005  # RFC 3489, response-only
ATTR_USERNAME = 0x0006
ATTR_PASSWORD = 0x0007  # RFC 3489, shared-secret response only
ATTR_MESSAGE_INTEGRITY = 0x0008
ATTR_ERROR_CODE = 0x0009
ATTR_UNKNOWN_ATTRIBUTES = 0x000A
ATTR_REFLECTED_FROM = 0x000B  # RFC 3489, response-only
ATTR_REALM = 0x0014
ATTR_NONCE = 0x0015
ATTR_MESSAGE_INTEGRITY_SHA256 = 0x001C  # RFC 8489
ATTR_PASSWORD_ALGORITHM = 0x001D  # RFC 8489
ATTR_USERHASH = 0x001E  # RFC 8489
ATTR_XOR_MAPPED_ADDRESS = 0x0020
# Not in any RFC, but servers send it (a slip into the comprehension-optional range); Go accepts it too.
ATTR_XOR_MAPPED_ADDRESS_ALT = 0x8020
ATTR_SOFTWARE = 0x8022
ATTR_FINGERPRINT = 0x8028

FINGERPRINT_XOR = 0x5354554E
TAILSCALE_SOFTWARE = b"tailnode"

# Comprehension-required attributes (type < 0x8000) a request may carry without getting a 420.
# "Understood" means: answering with our one binding success response is the right reply to
# a request carrying it. The authentication attributes are accepted unverified (the binding
# usage for NAT discovery has no credentials, so there is nothing to check them against);
# RFC 3489's response-only attributes ask nothing of the server, so ignoring them in a
# request changes no answer; CHANGE-REQUEST is parsed and answered from our one address
# (classic NAT testers such as pystun3 rely on an answer). Deliberately NOT understood:
# RESPONSE-ADDRESS (0x0002), because we never send a reply anywhere but to the datagram's
# source (that would make us a reflector; RFC 5389 dropped it), and everything else below
# 0x8000 (ICE's PRIORITY/USE-CANDIDATE, RFC 5780's PADDING/RESPONSE-PORT, TURN's, ...).
UNDERSTOOD_ATTRIBUTES: frozenset[int] = frozenset(
    {
        ATTR_MAPPED_ADDRESS,
        ATTR_CHANGE_REQUEST,
        ATTR_SOURCE_ADDRESS,
        ATTR_CHANGED_ADDRESS,
        ATTR_USERNAME,
        ATTR_PASSWORD,
        ATTR_MESSAGE_INTEGRITY,
        ATTR_ERROR_CODE,
        ATTR_UNKNOWN_ATTRIBUTES,
        ATTR_REFLECTED_FROM,
        ATTR_REALM,
        ATTR_NONCE,
        ATTR_MESSAGE_INTEGRITY_SHA256,
        ATTR_PASSWORD_ALGORITHM,
        ATTR_USERHASH,
        ATTR_XOR_MAPPED_ADDRESS,
    }
)
_INTEGRITY_ATTRIBUTES = frozenset({ATTR_MESSAGE_INTEGRITY, ATTR_MESSAGE_INTEGRITY_SHA256})
# At most this many distinct unknown types are collected and listed in a 420 (a client needs
# one to know; a few help it; a 64 KiB datagram could name thousands).
MAX_UNKNOWN_LISTED = 16
# The 420's reason phrase. RFC 5389 suggests "Unknown Attribute" (17 bytes, padded to 20);
# this 12-byte phrase keeps the reply to the smallest such request (20-byte header + one
# empty attribute = 24 bytes) at 48 bytes, 2.0x, under MAX_REPLY_RATIO, and is a multiple of
# 4 bytes as RFC 3489 requires of a reason phrase.
UNKNOWN_ATTRIBUTE_REASON = b"Unknown Attr"
# Anti-amplification: no reply may be larger than this many times the request it answers.
MAX_REPLY_RATIO = 2.2

FAMILY_IPV4 = 1
FAMILY_IPV6 = 2

_V4MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"
_BINDING_REQUEST_TYPE = BINDING_REQUEST.to_bytes(2, "big")
_BINDING_SUCCESS_TYPE = BINDING_SUCCESS.to_bytes(2, "big")
_BINDING_ERROR_TYPE = BINDING_ERROR.to_bytes(2, "big")
_FINGERPRINT_ATTR_HEADER = struct.pack("!HH", ATTR_FINGERPRINT, 4)
_HH = struct.Struct("!HH")
_HEADER = struct.Struct("!HHI12s")
_CLASSIC_HEADER = struct.Struct("!HH16s")
_ADDR_ATTR_V4 = struct.Struct("!HHBBH4s")
_ADDR_ATTR_V6 = struct.Struct("!HHBBH16s")

# The fast path's templates. Go's stun.Request is always these 40 bytes: the header (binding
# request, body length 20, magic cookie), the 12-byte transaction id, SOFTWARE "tailnode", and
# the FINGERPRINT header and value (a CRC over bytes 0..32, which the txid makes per-request).
_TS_REQUEST_LEN = 40
_TS_REQUEST_HEAD = _BINDING_REQUEST_TYPE + (20).to_bytes(2, "big") + COOKIE_BYTES
_TS_SOFTWARE_ATTR = _HH.pack(ATTR_SOFTWARE, len(TAILSCALE_SOFTWARE)) + TAILSCALE_SOFTWARE
_TS_REQUEST_ATTRS = _TS_SOFTWARE_ATTR + _FINGERPRINT_ATTR_HEADER
_TS_HEAD_CRC = zlib.crc32(_TS_REQUEST_HEAD)
_TS_REQUEST = struct.Struct("!8s12s16sI")  # head, txid, attributes up to the CRC, CRC
# Go's stun.Response: header, txid, XOR-MAPPED-ADDRESS (reserved byte, family, port, address).
_TS_REPLY_V4_HEAD = _BINDING_SUCCESS_TYPE + (12).to_bytes(2, "big") + COOKIE_BYTES
_TS_REPLY_V6_HEAD = _BINDING_SUCCESS_TYPE + (24).to_bytes(2, "big") + COOKIE_BYTES
_TS_XOR_V4_HEAD = _HH.pack(ATTR_XOR_MAPPED_ADDRESS, 8) + bytes((0, FAMILY_IPV4))
_TS_XOR_V6_HEAD = _HH.pack(ATTR_XOR_MAPPED_ADDRESS, 20) + bytes((0, FAMILY_IPV6))
_TS_REPLY_V4 = struct.Struct("!8s12s6sHI")
_TS_REPLY_V6 = struct.Struct("!8s12s6sH16s")
_PORT_XOR = MAGIC_COOKIE >> 16
# Bound once: each attribute lookup saved is a measurable share of the fast path's ~0.5 µs.
_crc32 = zlib.crc32
_unpack_ts_request = _TS_REQUEST.unpack_from
_pack_ts_reply_v4 = _TS_REPLY_V4.pack_into
_pack_ts_reply_v6 = _TS_REPLY_V6.pack_into
_TS_REPLY_V4_SIZE = _TS_REPLY_V4.size  # 32
_TS_REPLY_V6_SIZE = _TS_REPLY_V6.size  # 44


class StunError(ValueError):
    """A datagram is not a STUN message we answer (or a response we can read).

    The only exception the parsers raise on input bytes; the server drops the
    datagram and counts it as ``not_stun``.
    """


class RequestKind(enum.StrEnum):
    """Which flavour of binding request arrived; decides the shape of the answer."""

    TAILSCALE = "tailscale"  # SOFTWARE "tailnode" + FINGERPRINT last: Go's exact reply
    RFC5389 = "rfc5389"  # magic cookie, any other well-formed binding request
    RFC3489 = "rfc3489"  # classic: no magic cookie, 16-byte transaction id


@dataclass(frozen=True, slots=True)
class BindingRequest:
    """A binding request worth answering."""

    txid: bytes  # 12 bytes; 16 for classic requests (the cookie field is part of the id)
    kind: RequestKind
    has_fingerprint: bool
    software: bytes | None = None  # first SOFTWARE attribute value, if any
    change_request: int | None = None  # CHANGE-REQUEST flags (classic NAT tests); never honoured
    # Distinct comprehension-required types (< 0x8000) not in UNDERSTOOD_ATTRIBUTES, in order
    # of appearance, at most MAX_UNKNOWN_LISTED; those after MESSAGE-INTEGRITY(-SHA256) are
    # ignored, as RFC 5389 §15.4 says. Filled for every kind; the server decides what to do.
    unknown_attributes: tuple[int, ...] = ()

    @property
    def classic(self) -> bool:
        return self.kind is RequestKind.RFC3489


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    """What a client learns from a binding error response."""

    txid: bytes  # 12 bytes, or 16 for a classic response
    code: int  # e.g. 420
    reason: str
    unknown_attributes: tuple[int, ...] = ()  # UNKNOWN-ATTRIBUTES, as listed (may repeat in classic)


@dataclass(frozen=True, slots=True)
class BindingResponse:
    """What a client learns from a binding success response."""

    txid: bytes  # 12 bytes, or 16 for a classic response
    address: ipaddress.IPv4Address | ipaddress.IPv6Address  # v4-mapped IPv6 is unmapped
    port: int


def fingerprint(data: bytes) -> int:
    """FINGERPRINT value (RFC 5389 §15.5) for the message bytes that precede the attribute."""
    return zlib.crc32(data) ^ FINGERPRINT_XOR


def new_txid() -> bytes:
    """A random 12-byte transaction id, as RFC 5389 asks (cryptographically random)."""
    return os.urandom(TXID_LEN)


def parse_binding_request(data: bytes) -> BindingRequest:
    """Classify one datagram; raise :class:`StunError` unless it is a binding request we answer.

    Attributes are walked over the whole datagram with 4-byte padding, as Go does. A
    FINGERPRINT, when present, must have length 4, be the last attribute and carry the
    right CRC; it is computed over the bytes on the wire before it, whose header length
    already counts the FINGERPRINT when it is last (that is the RFC's "adjusted" length).
    The header length field is not cross-checked for Tailscale requests (Go does not,
    and its live server answers such packets); every other kind must have it right.
    """
    n = len(data)
    if n < HEADER_LEN:
        raise StunError("shorter than a STUN header")
    if data[0] & 0xC0:
        raise StunError("top two bits of the message type are set")
    if data[0:2] != _BINDING_REQUEST_TYPE:
        raise StunError("not a binding request")

    software: bytes | None = None
    tailnode = False
    change_request: int | None = None
    unknown: list[int] = []
    after_integrity = False
    fp_at = -1
    pos = HEADER_LEN
    unpack_hh = _HH.unpack_from
    while pos < n:
        if fp_at >= 0:
            raise StunError("attribute after FINGERPRINT")
        if n - pos < 4:
            raise StunError("truncated attribute header")
        attr_type, attr_len = unpack_hh(data, pos)
        start = pos + 4
        end = start + attr_len
        padded_end = start + ((attr_len + 3) & ~3)
        if padded_end > n:
            raise StunError("attribute runs past the end of the datagram")
        if attr_type == ATTR_SOFTWARE:
            value = bytes(data[start:end])
            if software is None:
                software = value
            if value == TAILSCALE_SOFTWARE:
                tailnode = True
        elif attr_type == ATTR_FINGERPRINT:
            if attr_len != 4:
                raise StunError("FINGERPRINT attribute length is not 4")
            fp_at = pos
        elif attr_type == ATTR_CHANGE_REQUEST:
            if attr_len != 4:
                raise StunError("CHANGE-REQUEST attribute length is not 4")
            change_request = int.from_bytes(data[start:end], "big")
        elif attr_type < 0x8000 and not after_integrity:
            if attr_type in _INTEGRITY_ATTRIBUTES:
                after_integrity = True
            elif (
                attr_type not in UNDERSTOOD_ATTRIBUTES
                and attr_type not in unknown
                and len(unknown) < MAX_UNKNOWN_LISTED
            ):
                unknown.append(attr_type)
        pos = padded_end

    has_fp = fp_at >= 0
    cookie = data[4:8] == COOKIE_BYTES
    # FINGERPRINT is an RFC 5389 attribute: without the magic cookie the request is classic
    # RFC 3489, where 0x8028 is just an unknown comprehension-optional attribute.
    if has_fp and cookie and int.from_bytes(data[fp_at + 4 : fp_at + 8], "big") != fingerprint(data[:fp_at]):
        raise StunError("bad FINGERPRINT")

    if cookie:
        if tailnode and has_fp:
            return BindingRequest(
                bytes(data[8:20]), RequestKind.TAILSCALE, True, software, change_request, tuple(unknown)
            )
        kind = RequestKind.RFC5389
        txid = bytes(data[8:20])
    else:
        kind = RequestKind.RFC3489
        txid = bytes(data[4:20])
    if int.from_bytes(data[2:4], "big") != n - HEADER_LEN:
        raise StunError("header length field does not match the datagram")
    return BindingRequest(txid, kind, has_fp, software, change_request, tuple(unknown))


def tailscale_response(
    data: bytes | bytearray | memoryview, offset: int, length: int, packed: bytes, port: int
) -> bytes | None:
    """Go's answer to Go's own binding request, built from a template; None for anything else.

    The datagram is ``data[offset:offset + length]``; ``packed`` is the peer's address as
    :func:`pack_address` gives it (4 bytes, or 16, v4-mapped included) and ``port`` its port.
    When the datagram is exactly Go's ``stun.Request`` (the 40 bytes Tailscale's clients send,
    with a correct FINGERPRINT) the result is byte for byte what :func:`build_response` writes
    for it; for every other datagram, address or port, including requests the codec answers in
    other shapes and ones it refuses, the result is None and the caller asks the full codec.
    Never raises. It exists for speed: the codec's general walk costs several times more.
    """
    out = bytearray(_TS_REPLY_V6.size)
    size = tailscale_response_into(out, 0, data, offset, length, packed, port)
    return bytes(out[:size]) if size else None


def tailscale_response_into(
    out: bytearray | memoryview,
    at: int,
    data: bytes | bytearray | memoryview,
    offset: int,
    length: int,
    packed: bytes,
    port: int,
) -> int:
    """:func:`tailscale_response` written into ``out[at:]`` (44 bytes must fit); its size, or 0.

    For a server that sends from a buffer of its own (``derpd.server.stun``'s sendmmsg), this
    saves making the reply and copying it. On 0 nothing was written.
    """
    if length != _TS_REQUEST_LEN or not 0 <= port <= 0xFFFF:
        return 0
    try:
        head, txid, attrs, crc = _unpack_ts_request(data, offset)
        if (
            head != _TS_REQUEST_HEAD
            or attrs != _TS_REQUEST_ATTRS
            or crc != _crc32(_TS_SOFTWARE_ATTR, _crc32(txid, _TS_HEAD_CRC)) ^ FINGERPRINT_XOR
        ):
            return 0
        size = len(packed)
        if size == 4:
            ip = int.from_bytes(packed, "big") ^ MAGIC_COOKIE
            _pack_ts_reply_v4(out, at, _TS_REPLY_V4_HEAD, txid, _TS_XOR_V4_HEAD, port ^ _PORT_XOR, ip)
            return _TS_REPLY_V4_SIZE
        if size == 16:
            if packed[:12] == _V4MAPPED_PREFIX:
                ip = int.from_bytes(packed[12:], "big") ^ MAGIC_COOKIE
                _pack_ts_reply_v4(out, at, _TS_REPLY_V4_HEAD, txid, _TS_XOR_V4_HEAD, port ^ _PORT_XOR, ip)
                return _TS_REPLY_V4_SIZE
            key = int.from_bytes(COOKIE_BYTES + txid, "big")
            xored = (int.from_bytes(packed, "big") ^ key).to_bytes(16, "big")
            _pack_ts_reply_v6(out, at, _TS_REPLY_V6_HEAD, txid, _TS_XOR_V6_HEAD, port ^ _PORT_XOR, xored)
            return _TS_REPLY_V6_SIZE
    except (struct.error, TypeError, ValueError):
        pass  # a buffer shorter than it says (checked before any write): the codec's to judge
    return 0


def pack_address(host: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    """Packed address of a peer: 4 bytes for IPv4 *and* v4-mapped IPv6, else 16; zone dropped.

    Accepts what ``recvfrom`` returns (``"::ffff:127.0.0.1"``, ``"fe80::1%eth0"``).
    """
    if isinstance(host, ipaddress.IPv4Address | ipaddress.IPv6Address):
        packed = host.packed
    else:
        try:
            if ":" in host:
                packed = socket.inet_pton(socket.AF_INET6, host.partition("%")[0])
            else:
                packed = socket.inet_pton(socket.AF_INET, host)
        except (OSError, ValueError, TypeError) as exc:
            raise StunError(f"not an IP address: {host!r}") from exc
    if len(packed) == 16 and packed[:12] == _V4MAPPED_PREFIX:
        return packed[12:]
    return packed


def _check_port(port: int) -> None:
    if not 0 <= port <= 0xFFFF:
        raise StunError(f"port out of range: {port}")


def _xor_mapped_attr(txid: bytes, packed: bytes, port: int) -> bytes:
    if len(packed) == 4:
        return _ADDR_ATTR_V4.pack(
            ATTR_XOR_MAPPED_ADDRESS,
            8,
            0,
            FAMILY_IPV4,
            port ^ (MAGIC_COOKIE >> 16),
            (int.from_bytes(packed, "big") ^ MAGIC_COOKIE).to_bytes(4, "big"),
        )
    key = int.from_bytes(COOKIE_BYTES + txid, "big")
    return _ADDR_ATTR_V6.pack(
        ATTR_XOR_MAPPED_ADDRESS,
        20,
        0,
        FAMILY_IPV6,
        port ^ (MAGIC_COOKIE >> 16),
        (int.from_bytes(packed, "big") ^ key).to_bytes(16, "big"),
    )


def binding_response(
    txid: bytes,
    host: str | ipaddress.IPv4Address | ipaddress.IPv6Address,
    port: int,
    *,
    with_fingerprint: bool = False,
) -> bytes:
    """RFC 5389 binding success response with one XOR-MAPPED-ADDRESS (Go's ``stun.Response``).

    Without ``with_fingerprint`` the bytes equal Go's, except that v4-mapped IPv6 is
    written as family 1. With it, a FINGERPRINT is appended (for clients that sent one).
    """
    if len(txid) != TXID_LEN:
        raise StunError("transaction id must be 12 bytes")
    _check_port(port)
    attr = _xor_mapped_attr(txid, pack_address(host), port)
    body_len = len(attr) + (8 if with_fingerprint else 0)
    msg = _HEADER.pack(BINDING_SUCCESS, body_len, MAGIC_COOKIE, txid) + attr
    if with_fingerprint:
        msg += _FINGERPRINT_ATTR_HEADER + fingerprint(msg).to_bytes(4, "big")
    return msg


def classic_binding_response(
    txid16: bytes, host: str | ipaddress.IPv4Address | ipaddress.IPv6Address, port: int
) -> bytes:
    """RFC 3489 binding response: only MAPPED-ADDRESS, echoing the 16-byte transaction id.

    Classic clients know nothing of XOR-MAPPED-ADDRESS (RFC 5389 §12). An IPv6 peer gets
    family 2, the RFC 5389 MAPPED-ADDRESS layout; RFC 3489 itself only defined IPv4.
    """
    if len(txid16) != CLASSIC_TXID_LEN:
        raise StunError("classic transaction id must be 16 bytes")
    _check_port(port)
    packed = pack_address(host)
    if len(packed) == 4:
        attr = _ADDR_ATTR_V4.pack(ATTR_MAPPED_ADDRESS, 8, 0, FAMILY_IPV4, port, packed)
    else:
        attr = _ADDR_ATTR_V6.pack(ATTR_MAPPED_ADDRESS, 20, 0, FAMILY_IPV6, port, packed)
    return _CLASSIC_HEADER.pack(BINDING_SUCCESS, len(attr), txid16) + attr


def build_response(
    request: BindingRequest, host: str | ipaddress.IPv4Address | ipaddress.IPv6Address, port: int
) -> bytes:
    """The reply the server sends to ``request`` from the peer at ``host``/``port``.

    Tailscale: Go's bytes. RFC 5389: XOR-MAPPED-ADDRESS, plus FINGERPRINT if the request
    had one. Classic: MAPPED-ADDRESS only. No SOFTWARE anywhere (keeps replies small).
    """
    if request.kind is RequestKind.RFC3489:
        return classic_binding_response(request.txid, host, port)
    if request.kind is RequestKind.TAILSCALE:
        return binding_response(request.txid, host, port)
    return binding_response(request.txid, host, port, with_fingerprint=request.has_fingerprint)


def unknown_attributes_response(request: BindingRequest) -> bytes:
    """RFC 5389 §7.3.1 binding error response 420 (Unknown Attribute) for ``request``.

    ERROR-CODE (class 4, number 20, reason :data:`UNKNOWN_ATTRIBUTE_REASON`), then
    UNKNOWN-ATTRIBUTES listing ``request.unknown_attributes``; a FINGERPRINT last when the
    request had one (as the success answer does). A classic request gets RFC 3489's form:
    its 16-byte transaction id, no FINGERPRINT, and an odd list made even by repeating its
    last type, because RFC 3489 has no attribute padding. Sizes: 48 bytes for one or two
    listed types (56 with FINGERPRINT), 4 more per further pair; the request carried at least
    4 bytes per listed type, so the reply stays under :data:`MAX_REPLY_RATIO` of it.
    Raises :class:`StunError` when the request lists no unknown attribute.
    """
    types = request.unknown_attributes
    if not types:
        raise StunError("no unknown attributes to report")
    if len(types) > MAX_UNKNOWN_LISTED or not all(0 <= t < 0x8000 for t in types):
        raise StunError("unknown attribute list out of range")
    reason = UNKNOWN_ATTRIBUTE_REASON
    error_code = b"\x00\x00\x04\x14" + reason  # 21 reserved bits, class 4, number 20
    if request.kind is RequestKind.RFC3489:
        listed = types + types[-1:] if len(types) % 2 else types
        return encode_message(
            BINDING_ERROR,
            request.txid,
            [(ATTR_ERROR_CODE, error_code), (ATTR_UNKNOWN_ATTRIBUTES, struct.pack(f"!{len(listed)}H", *listed))],
        )
    return encode_message(
        BINDING_ERROR,
        request.txid,
        [(ATTR_ERROR_CODE, error_code), (ATTR_UNKNOWN_ATTRIBUTES, struct.pack(f"!{len(types)}H", *types))],
        with_fingerprint=request.has_fingerprint,
    )


def encode_message(
    msg_type: int,
    txid: bytes,
    attributes: Iterable[tuple[int, bytes]] = (),
    *,
    with_fingerprint: bool = False,
) -> bytes:
    """Encode any STUN message: a 12-byte txid gets the magic cookie, a 16-byte one is classic.

    Attribute values are padded to 4 bytes; FINGERPRINT, if asked for, goes last with
    the header length already counting it, as RFC 5389 §15.5 requires.
    """
    if len(txid) not in (TXID_LEN, CLASSIC_TXID_LEN):
        raise StunError("transaction id must be 12 or 16 bytes")
    body = bytearray()
    for attr_type, value in attributes:
        body += _HH.pack(attr_type, len(value)) + value + b"\x00" * (-len(value) % 4)
    body_len = len(body) + (8 if with_fingerprint else 0)
    if len(txid) == TXID_LEN:
        msg = _HEADER.pack(msg_type, body_len, MAGIC_COOKIE, txid) + body
    else:
        msg = _CLASSIC_HEADER.pack(msg_type, body_len, txid) + body
    if with_fingerprint:
        msg += _FINGERPRINT_ATTR_HEADER + fingerprint(msg).to_bytes(4, "big")
    return msg


def binding_request(txid: bytes | None = None) -> bytes:
    """A Tailscale-style binding request (Go's ``stun.Request``): SOFTWARE tailnode + FINGERPRINT."""
    return encode_message(
        BINDING_REQUEST,
        new_txid() if txid is None else txid,
        [(ATTR_SOFTWARE, TAILSCALE_SOFTWARE)],
        with_fingerprint=True,
    )


def _address_attr(value: bytes) -> tuple[int, int, bytes]:
    """(family, port, packed address) of a (XOR-)MAPPED-ADDRESS value, still XORed."""
    if len(value) < 4:
        raise StunError("address attribute too short")
    family = value[1]
    addr_len = 4 if family == FAMILY_IPV4 else 16 if family == FAMILY_IPV6 else 0
    if addr_len == 0:
        raise StunError(f"unknown address family {family}")
    if len(value) < 4 + addr_len:
        raise StunError("address attribute too short for its family")
    return family, int.from_bytes(value[2:4], "big"), bytes(value[4 : 4 + addr_len])


def _ip(packed: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if len(packed) == 16 and packed[:12] == _V4MAPPED_PREFIX:
        packed = packed[12:]
    return ipaddress.IPv4Address(packed) if len(packed) == 4 else ipaddress.IPv6Address(packed)


def _response_attributes(data: bytes, msg_type: bytes, what: str) -> tuple[bool, bytes, list[tuple[int, bytes]]]:
    """(classic, txid, [(type, value)]) of a response of ``msg_type``; bytes past the header length
    are ignored. Without the magic cookie a response is classic: 16-byte txid."""
    if len(data) < HEADER_LEN or data[0] & 0xC0:
        raise StunError("not a STUN message")
    if data[0:2] != msg_type:
        raise StunError(f"not a {what}")
    classic = data[4:8] != COOKIE_BYTES
    txid = bytes(data[4:20]) if classic else bytes(data[8:20])
    body_end = HEADER_LEN + int.from_bytes(data[2:4], "big")
    if body_end > len(data):
        raise StunError("header length exceeds the datagram")
    attrs: list[tuple[int, bytes]] = []
    pos = HEADER_LEN
    while pos < body_end:
        if body_end - pos < 4:
            raise StunError("truncated attribute header")
        attr_type, attr_len = _HH.unpack_from(data, pos)
        start = pos + 4
        if start + attr_len > body_end:
            raise StunError("attribute runs past the message")
        attrs.append((attr_type, bytes(data[start : start + attr_len])))
        pos = start + ((attr_len + 3) & ~3)
    return classic, txid, attrs


def parse_response(data: bytes) -> BindingResponse:
    """Mapped address from a binding success response, following Go's ``stun.ParseResponse``.

    XOR-MAPPED-ADDRESS (0x0020 or 0x8020) wins over MAPPED-ADDRESS; v4-mapped IPv6 is
    unmapped; bytes past the header length are ignored; FINGERPRINT is not checked.
    A response without the magic cookie is read as classic: 16-byte txid, MAPPED-ADDRESS.
    """
    classic, txid, attrs = _response_attributes(data, _BINDING_SUCCESS_TYPE, "binding success response")
    xor_found: tuple[bytes, int] | None = None
    plain_found: tuple[bytes, int] | None = None
    for attr_type, value in attrs:
        if attr_type in (ATTR_XOR_MAPPED_ADDRESS, ATTR_XOR_MAPPED_ADDRESS_ALT) and not classic:
            _, xport, xaddr = _address_attr(value)
            key = COOKIE_BYTES + txid
            addr = bytes(a ^ b for a, b in zip(xaddr, key, strict=False))
            xor_found = (addr, xport ^ (MAGIC_COOKIE >> 16))
        elif attr_type == ATTR_MAPPED_ADDRESS:
            _, mport, maddr = _address_attr(value)
            plain_found = (maddr, mport)
    found = xor_found or plain_found
    if found is None:
        raise StunError("no address attribute")
    return BindingResponse(txid, _ip(found[0]), found[1])


def parse_error_response(data: bytes) -> ErrorResponse:
    """Code, reason and UNKNOWN-ATTRIBUTES of a binding error response (client side).

    Without the magic cookie it is read as classic (16-byte txid). FINGERPRINT is not
    checked; bytes past the header length are ignored.
    """
    _, txid, attrs = _response_attributes(data, _BINDING_ERROR_TYPE, "binding error response")
    code: int | None = None
    reason = ""
    unknown: tuple[int, ...] = ()
    for attr_type, value in attrs:
        if attr_type == ATTR_ERROR_CODE and code is None:
            if len(value) < 4:
                raise StunError("ERROR-CODE too short")
            code = (value[2] & 0x07) * 100 + value[3]
            reason = value[4:].decode("utf-8", errors="replace")
        elif attr_type == ATTR_UNKNOWN_ATTRIBUTES and not unknown:
            unknown = tuple(t for (t,) in struct.iter_unpack("!H", value[: len(value) & ~1]))
    if code is None:
        raise StunError("no ERROR-CODE attribute")
    return ErrorResponse(txid, code, reason, unknown)
