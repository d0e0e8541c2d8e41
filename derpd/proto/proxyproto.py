"""The HAProxy PROXY protocol (v1 text and v2 binary), sans I/O.

A stream proxy in front of derpd (HAProxy ``send-proxy``/``send-proxy-v2``, nginx
``proxy_protocol on``) prepends one header naming the real client, so admission,
per-IP limits and PeerPresent can see the client rather than the proxy. Only
connections from trusted proxy addresses may carry it (see :func:`is_trusted`);
anyone else could simply claim to be any address.

Nothing here touches a socket, a clock or trio: :class:`ProxyHeaderReader` is fed
bytes and answers "need more", "here is the header and what followed it", or raises
:class:`ProxyProtocolError`. Spec: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt

Decisions where the spec leaves room:

* v2 ``PROXY`` over ``DGRAM`` is rejected: a datagram flow cannot arrive on derpd's
  TCP listener, so it means a misconfigured proxy.
* v2 ``UNSPEC`` family or transport and ``AF_UNIX`` are accepted with ``source=None``
  (the spec lets the receiver use the real endpoints); the server then keeps the
  proxy's own address.
* v2 ``LOCAL`` (the proxy's own health checks) gives ``source=None`` whatever the
  family byte says; a known family's address block is skipped as the spec requires,
  an unknown one means the whole block is discarded.
* IPv4-mapped IPv6 addresses are reported as sent (``"::ffff:10.0.0.1"``, formatted
  the same way on every Python), not folded to IPv4; :func:`is_trusted` matches both.
* TLVs are returned raw; ``PP2_TYPE_CRC32C`` is not verified (optional in the spec,
  and the header comes from a trusted proxy over TCP).
"""

from __future__ import annotations

import ipaddress
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass

V1_PREFIX = b"PROXY "
V1_MAX_LEN = 107  # whole line including CRLF
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER_LEN = 16  # signature, ver/cmd, fam/proto, u16 length
V2_MAX_LEN = 0xFFFF

# v2 TLV types (section 2.2), for callers and tests; the reader does not interpret them.
PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_TYPE_NETNS = 0x30

_CMD_LOCAL = 0x0
_CMD_PROXY = 0x1
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0, 1, 2, 3
_T_UNSPEC, _T_STREAM, _T_DGRAM = 0, 1, 2
_ADDR_LEN = {_AF_UNSPEC: 0, _AF_INET: 12, _AF_INET6: 36, _AF_UNIX: 216}
_MIN_CAP = _ADDR_LEN[_AF_UNIX]  # a smaller cap would refuse valid headers outright

_V1_PROTOS = (b"TCP4 ", b"TCP6 ", b"UNKNOWN ")
_V1_NOT_PRINTABLE = re.compile(rb"[^\x20-\x7e]")
_V1_TCP = re.compile(rb"(TCP4|TCP6) ([^ ]+) ([^ ]+) (0|[1-9][0-9]{0,4}) (0|[1-9][0-9]{0,4})")


class ProxyProtocolError(ValueError):
    """The bytes are not a valid PROXY protocol header; the message says why, on one line."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """One parsed header. ``source`` is the real client, or None when the proxy gave no usable address."""

    version: int  # 1 or 2
    command: str  # "PROXY" or "LOCAL"
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    tlvs: tuple[tuple[int, bytes], ...] = ()  # v2 only, in wire order


def _preview(data: bytes | bytearray) -> str:
    return repr(bytes(data[:16])) + ("..." if len(data) > 16 else "")


class ProxyHeaderReader:
    """Incremental parser for exactly one header at the start of a connection.

    :meth:`feed` bytes as they arrive. It returns ``(header, rest)`` once a whole
    header is buffered (``rest`` is everything after it, e.g. the start of the HTTP
    request), ``None`` while more bytes are needed, or raises
    :class:`ProxyProtocolError`. Every check runs as soon as the bytes it needs are
    there, so a plain HTTP request or a TLS ClientHello fails on its first byte, and
    no more than ``V1_MAX_LEN`` (v1) or ``16 + max_v2_len`` (v2) bytes are ever
    buffered without a complete header. After an error the reader stays failed.
    """

    def __init__(self, *, max_v2_len: int = 4096) -> None:
        if not _MIN_CAP <= max_v2_len <= V2_MAX_LEN:
            raise ValueError(f"max_v2_len must be between {_MIN_CAP} and {V2_MAX_LEN}, got {max_v2_len}")
        self.max_v2_len = max_v2_len
        self._buf = bytearray()
        self._error: ProxyProtocolError | None = None
        self._done = False

    def feed(self, data: bytes) -> tuple[ProxyHeader, bytes] | None:
        """Add ``data``; return ``(header, rest)``, ``None`` for "need more", or raise ProxyProtocolError."""
        if self._error is not None:
            raise self._error
        if self._done:
            raise RuntimeError("ProxyHeaderReader already returned a header; it reads only one")
        self._buf += data
        try:
            result = self._parse()
        except ProxyProtocolError as exc:
            self._error = exc
            self._buf.clear()
            raise
        if result is not None:
            self._done = True
            self._buf.clear()
        return result

    def _parse(self) -> tuple[ProxyHeader, bytes] | None:
        buf = self._buf
        if buf[:1] == V1_PREFIX[:1]:
            return self._parse_v1()
        if buf[:1] == V2_SIGNATURE[:1]:
            return self._parse_v2()
        if buf:
            raise ProxyProtocolError(f"not a PROXY protocol header: starts with {_preview(buf)}")
        return None

    # -- v1 ---------------------------------------------------------------------------------------

    def _parse_v1(self) -> tuple[ProxyHeader, bytes] | None:
        head = bytes(self._buf[:V1_MAX_LEN])
        n = min(len(head), len(V1_PREFIX))
        if head[:n] != V1_PREFIX[:n]:
            raise ProxyProtocolError(f"not a PROXY protocol header: starts with {_preview(head)}")
        # Find the end of the line, rejecting anything that is not printable ASCII on the way.
        end = None
        cut = len(head)
        bad = _V1_NOT_PRINTABLE.search(head)
        if bad is not None:
            i = cut = bad.start()
            if head[i] == 0x0A:
                raise ProxyProtocolError("v1 header line ends in a bare LF, not CRLF")
            if head[i] != 0x0D:
                raise ProxyProtocolError(f"v1 header has a non-printable or non-ASCII byte 0x{head[i]:02x}")
            if i + 2 > V1_MAX_LEN:
                raise ProxyProtocolError(f"v1 header longer than {V1_MAX_LEN} bytes")
            if i + 1 < len(head):
                if head[i + 1] != 0x0A:
                    raise ProxyProtocolError("v1 header has a CR not followed by LF")
                end = i
        elif len(head) >= V1_MAX_LEN:
            raise ProxyProtocolError(f"v1 header has no CRLF within {V1_MAX_LEN} bytes")
        # Reject an unknown protocol word as soon as it cannot become TCP4, TCP6 or UNKNOWN.
        body = head[len(V1_PREFIX) : cut]
        if body != b"UNKNOWN" and not any(body[: len(p)] == p[: len(body)] for p in _V1_PROTOS):
            raise ProxyProtocolError(f"v1 protocol must be TCP4, TCP6 or UNKNOWN: {_preview(body)}")
        if end is None:
            return None
        rest = bytes(self._buf[end + 2 :])
        return _parse_v1_line(body), rest

    # -- v2 ---------------------------------------------------------------------------------------

    def _parse_v2(self) -> tuple[ProxyHeader, bytes] | None:
        buf = self._buf
        n = min(len(buf), len(V2_SIGNATURE))
        if buf[:n] != V2_SIGNATURE[:n]:
            raise ProxyProtocolError(f"not a PROXY protocol header: starts with {_preview(buf)}")
        if len(buf) <= 12:
            return None
        ver, cmd = buf[12] >> 4, buf[12] & 0x0F
        if ver != 2:
            raise ProxyProtocolError(f"v2 header has version {ver}, expected 2")
        if cmd not in (_CMD_LOCAL, _CMD_PROXY):
            raise ProxyProtocolError(f"v2 header has unknown command 0x{cmd:x}")
        if len(buf) <= 13:
            return None
        addr_len = _v2_address_len(cmd, buf[13])
        if len(buf) < V2_HEADER_LEN:
            return None
        (length,) = struct.unpack_from("!H", buf, 14)
        if length > self.max_v2_len:
            raise ProxyProtocolError(f"v2 header length {length} is over the limit of {self.max_v2_len}")
        if addr_len is not None and length < addr_len:
            raise ProxyProtocolError(f"v2 header length {length} is too short for its {addr_len}-byte address block")
        total = V2_HEADER_LEN + length
        if len(buf) < total:
            return None
        header = _parse_v2_block(cmd, buf[13], addr_len, bytes(buf[V2_HEADER_LEN:total]))
        return header, bytes(buf[total:])


def _parse_v1_line(body: bytes) -> ProxyHeader:
    """``body`` is the line between ``PROXY `` and CRLF, already known to be printable ASCII."""
    if body == b"UNKNOWN" or body.startswith(b"UNKNOWN "):
        return ProxyHeader(1, "PROXY", None, None)  # the rest of the line is to be ignored
    m = _V1_TCP.fullmatch(body)
    if m is None:
        raise ProxyProtocolError(f"v1 header is not 'PROXY TCP4|TCP6 src dst sport dport': {body[:80]!r}")
    proto, src, dst, sport, dport = (g.decode("ascii") for g in m.groups())
    ports = int(sport), int(dport)
    for p in ports:
        if p > 0xFFFF:
            raise ProxyProtocolError(f"v1 header port {p} is out of range")
    version = 4 if proto == "TCP4" else 6
    return ProxyHeader(1, "PROXY", (_v1_address(src, version), ports[0]), (_v1_address(dst, version), ports[1]))


def _v1_address(text: str, version: int) -> str:
    try:
        addr = ipaddress.IPv4Address(text) if version == 4 else ipaddress.IPv6Address(text)
    except ValueError:
        raise ProxyProtocolError(f"v1 header address {text!r} is not a valid IPv{version} address") from None
    if isinstance(addr, ipaddress.IPv6Address) and addr.scope_id is not None:
        raise ProxyProtocolError(f"v1 header address {text!r} has a zone id")
    return _format(addr)


def _v2_address_len(cmd: int, fam: int) -> int | None:
    """Bytes of address block for this family/protocol byte; None = LOCAL with an unknown family (discard it all)."""
    family, transport = fam >> 4, fam & 0x0F
    if cmd == _CMD_LOCAL:
        return _ADDR_LEN.get(family)
    if family not in _ADDR_LEN:
        raise ProxyProtocolError(f"v2 header has unknown address family 0x{family:x}")
    if transport not in (_T_UNSPEC, _T_STREAM, _T_DGRAM):
        raise ProxyProtocolError(f"v2 header has unknown transport protocol 0x{transport:x}")
    if transport == _T_DGRAM:
        raise ProxyProtocolError("v2 header is for a DGRAM (UDP) flow, but this is a stream listener")
    return _ADDR_LEN[family]


def _parse_v2_block(cmd: int, fam: int, addr_len: int | None, block: bytes) -> ProxyHeader:
    if addr_len is None:  # LOCAL with a family we do not know: the spec says discard the whole block
        return ProxyHeader(2, "LOCAL", None, None)
    tlvs = _parse_tlvs(block[addr_len:])
    if cmd == _CMD_LOCAL:
        return ProxyHeader(2, "LOCAL", None, None, tlvs)
    family, transport = fam >> 4, fam & 0x0F
    if transport != _T_STREAM or family not in (_AF_INET, _AF_INET6):
        return ProxyHeader(2, "PROXY", None, None, tlvs)  # UNSPEC or AF_UNIX: no IP address to report
    size = 4 if family == _AF_INET else 16
    src_ip, dst_ip = block[:size], block[size : 2 * size]
    sport, dport = struct.unpack_from("!HH", block, 2 * size)
    src = _format(ipaddress.ip_address(src_ip))
    dst = _format(ipaddress.ip_address(dst_ip))
    return ProxyHeader(2, "PROXY", (src, sport), (dst, dport), tlvs)


def _parse_tlvs(data: bytes) -> tuple[tuple[int, bytes], ...]:
    tlvs = []
    i = 0
    while i < len(data):
        if i + 3 > len(data):
            raise ProxyProtocolError(f"v2 header has a truncated TLV at offset {i}: {len(data) - i} stray byte(s)")
        kind, length = data[i], int.from_bytes(data[i + 1 : i + 3], "big")
        if i + 3 + length > len(data):
            raise ProxyProtocolError(
                f"v2 header TLV 0x{kind:02x} claims {length} bytes, only {len(data) - i - 3} remain"
            )
        tlvs.append((kind, data[i + 3 : i + 3 + length]))
        i += 3 + length
    return tuple(tlvs)


def _format(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """Canonical text; IPv4-mapped IPv6 as ``::ffff:a.b.c.d`` (what sockets report) on every Python version."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return f"::ffff:{addr.ipv4_mapped}"
    return str(addr)


# -- encoding (tests and tools) -------------------------------------------------------------------

Address = tuple[str, int]


def _encode_pair(
    source: Address | None, destination: Address | None
) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int, ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    if source is None or destination is None:
        raise ValueError("source and destination must both be given or both be None")
    addrs = []
    for host, port in (source, destination):
        addr = ipaddress.ip_address(host)
        if isinstance(addr, ipaddress.IPv6Address) and addr.scope_id is not None:
            raise ValueError(f"address {host!r} has a zone id, which the PROXY protocol cannot carry")
        if not isinstance(port, int) or not 0 <= port <= 0xFFFF:
            raise ValueError(f"port {port!r} is not in 0-65535")
        addrs.append((addr, port))
    (src, sport), (dst, dport) = addrs
    if src.version != dst.version:
        raise ValueError(f"source {src} and destination {dst} are different address families")
    return src, sport, dst, dport


def encode_v1(source: Address | None, destination: Address | None) -> bytes:
    """A v1 text header; ``None`` for both addresses gives ``PROXY UNKNOWN``."""
    if source is None and destination is None:
        return b"PROXY UNKNOWN\r\n"
    src, sport, dst, dport = _encode_pair(source, destination)
    proto = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {proto} {src} {dst} {sport} {dport}\r\n".encode("ascii")


def encode_v2(
    source: Address | None,
    destination: Address | None,
    *,
    command: str = "PROXY",
    tlvs: Iterable[tuple[int, bytes]] = (),
) -> bytes:
    """A v2 binary header. ``None`` addresses give the UNSPEC family; LOCAL may still carry addresses."""
    if command not in ("PROXY", "LOCAL"):
        raise ValueError(f"command must be 'PROXY' or 'LOCAL', got {command!r}")
    cmd = _CMD_PROXY if command == "PROXY" else _CMD_LOCAL
    if source is None and destination is None:
        fam, block = 0x00, b""
    else:
        src, sport, dst, dport = _encode_pair(source, destination)
        fam = 0x11 if src.version == 4 else 0x21
        block = src.packed + dst.packed + struct.pack("!HH", sport, dport)
    for kind, value in tlvs:
        if not 0 <= kind <= 0xFF or len(value) > 0xFFFF:
            raise ValueError(f"TLV type {kind} must fit a byte and its value 65535 bytes")
        block += bytes([kind]) + struct.pack("!H", len(value)) + bytes(value)
    if len(block) > V2_MAX_LEN:
        raise ValueError(f"v2 header body of {len(block)} bytes is over {V2_MAX_LEN}")
    return V2_SIGNATURE + bytes([0x20 | cmd, fam]) + struct.pack("!H", len(block)) + block


# -- trusted proxies ------------------------------------------------------------------------------

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_trusted(cidrs: str) -> list[Network]:
    """Parse ``"10.0.0.0/8,::1/128,192.0.2.7"`` (comma-separated; single IPs allowed; empty string = nobody).

    Host bits set (``10.0.0.1/8``) are an error rather than silently widened or narrowed:
    a trust list is a security boundary, so a typo should stop the server, not guess.
    """
    networks: list[Network] = []
    for raw in cidrs.split(","):
        item = raw.strip()
        if not item:
            continue
        if "%" in item:
            raise ValueError(f"trusted proxy {item!r}: zone ids are not supported, give the address alone")
        try:
            networks.append(ipaddress.ip_network(item, strict=True))
        except ValueError as exc:
            if "host bits set" in str(exc):
                net = ipaddress.ip_network(item, strict=False)
                raise ValueError(f"trusted proxy {item!r} has host bits set; did you mean {net}?") from None
            raise ValueError(f"trusted proxy {item!r} is not an IP address or CIDR network") from None
    return networks


def is_trusted(ip: str, networks: Iterable[Network]) -> bool:
    """Whether a peer address (as a socket reports it) is inside one of ``networks``.

    IPv4-mapped IPv6 (``::ffff:10.0.0.1``, what a dual-stack socket reports for IPv4
    peers) matches IPv4 networks and vice versa; a zone id (``fe80::1%eth0``) is
    ignored. Anything that is not an IP address is untrusted.
    """
    host = ip.removeprefix("[").removesuffix("]").split("%", 1)[0]
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [addr]
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            candidates.append(addr.ipv4_mapped)
    else:
        candidates.append(ipaddress.IPv6Address(f"::ffff:{addr}"))
    return any(a.version == net.version and a in net for net in networks for a in candidates)
