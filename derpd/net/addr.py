"""Addresses and listening sockets: ``HOST:PORT`` parsing, binding (dual-stack, every resolved address,
unix sockets), and the sockets a service manager hands over instead (``derpd.ops.sdnotify`` finds them)."""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from derpd.base import log
from derpd.base.errors import ConfigurationError

# Names systemd gives descriptors nobody named: "unknown" when $LISTEN_FDNAMES is unset (sd_listen_fds
# semantics), else the socket unit's file name ("derpd.socket") when it has no FileDescriptorName=.
UNNAMED = "unknown"
# What binding "::" raises on a host without IPv6 (no such family; IPv6 disabled by sysctl).
_NO_IPV6_ERRNOS = (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL)


def lookup_name(host: str) -> str | bytes:
    """``host`` as ``getaddrinfo`` should get it: ASCII as bytes, anything else as it is.

    Python's ``socket.getaddrinfo`` encodes a ``str`` host with the ``idna`` codec, whose first use
    imports ``encodings.idna``, ``stringprep`` and ``unicodedata`` (~0.4 MB RSS for good) even for
    ``127.0.0.1``. ASCII needs no encoding; a non-ASCII name still gets trio's IDNA 2008 encoding.
    """
    return host.encode("ascii") if host.isascii() else host


def ip_or_none(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address ``text`` spells (``[v6]`` brackets allowed, as a pair), or None for a name."""
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return ipaddress.ip_address(text)  # a lone bracket ("0.0.0.0]") is no address
    except ValueError:
        return None


def is_ip(text: str) -> bool:
    return ip_or_none(text) is not None


def format_addr(addr: Sequence[Any] | None) -> str:
    """``host:port`` or ``[v6]:port`` of a socket address (extra IPv6 fields ignored), for logs; ``-``
    when unknown."""
    if addr is None:
        return "-"
    try:
        host, port = str(addr[0]), addr[1]
    except (TypeError, IndexError):
        return str(addr)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def remote_of(sock: socket.socket | trio.socket.SocketType) -> tuple[str, int] | None:
    """The peer's (host, port) of a connected IP socket; None for a unix socket or one that is gone."""
    if sock.family == socket.AF_UNIX:
        return None
    try:
        peer = sock.getpeername()
    except OSError:
        return None
    if isinstance(peer, tuple) and len(peer) >= 2:
        return str(peer[0]), int(peer[1])
    return None


class AddressError(ConfigurationError, ValueError):
    """A HOST:PORT that cannot be used; the message says why."""


def parse_hostport(text: str, *, default_port: int | None = None) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (all interfaces)."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise AddressError(f"bad address {text!r}: expected [IPv6]:PORT")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    elif ":" not in text and default_port is not None:
        host, port_text = text, str(default_port)
    else:
        raise AddressError(f"bad address {text!r}: expected HOST:PORT, [IPv6]:PORT or :PORT")
    try:
        port = int(port_text)
    except ValueError:
        raise AddressError(f"bad port in {text!r}") from None
    if not 0 <= port <= 65535:
        raise AddressError(f"port out of range in {text!r}")
    return host, port


async def bind_sockets(host: str, port: int, sock_type: int, *, dual_stack_any: bool = False) -> list[socket.socket]:
    """Bound (not yet listening) sockets of ``sock_type`` for ``host``: the one binding path for the
    DERP and port-80 listeners, the metrics listener, STUN and the ``--workers`` supervisor.

    ``""`` or ``"*"`` (every interface) is one dual-stack ``[::]`` socket, or ``0.0.0.0`` where the
    host has no IPv6 (logged); ``dual_stack_any`` makes ``"::"`` one dual-stack socket too (what
    STUN's ``--stun-host ::`` promises), without the fallback since IPv6 was asked for by name. Any
    other host binds every address it resolves to, one socket each (IPv6 ones IPv6-only), all on the
    same port even when ``port`` is 0. Stdlib sockets, so callers pick their own I/O (trio wraps them
    with ``trio.socket.from_stdlib_socket``; STUN drives them directly; workers pass them on).
    """
    if host in ("", "*") or (dual_stack_any and host == "::"):
        try:
            return [_bind_one(socket.AF_INET6, ("::", port), sock_type, v6only=False)]
        except OSError as e:
            if host == "::" or e.errno not in _NO_IPV6_ERRNOS:
                raise
            log.info("ipv6_unavailable", port=port, error=e.strerror or str(e), action="binding 0.0.0.0")
            return [_bind_one(socket.AF_INET, ("0.0.0.0", port), sock_type, v6only=True)]
    infos = await trio.socket.getaddrinfo(lookup_name(host), port, type=sock_type, flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    seen: set[tuple[int, tuple[object, ...]]] = set()
    try:
        for family, _type, _proto, _name, sockaddr in infos:
            if (family, sockaddr) in seen:
                continue
            seen.add((family, sockaddr))
            target = sockaddr
            if socks:  # every address on the first one's port (they would differ when port is 0)
                target = (sockaddr[0], socks[0].getsockname()[1], *sockaddr[2:])
            socks.append(_bind_one(family, target, sock_type, v6only=True))
    except BaseException:
        for s in socks:
            s.close()
        raise
    if not socks:
        raise OSError(errno.EADDRNOTAVAIL, f"{host!r} resolves to no address")
    return socks


def _bind_one(family: int, sockaddr: tuple[object, ...], sock_type: int, *, v6only: bool) -> socket.socket:
    s = socket.socket(family, sock_type)
    try:
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if v6only else 0)
        if sock_type == socket.SOCK_STREAM:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(sockaddr)
    except BaseException:
        s.close()
        raise
    return s


async def bind_unix(path: str) -> trio.socket.SocketType:
    """A listening unix socket at ``path`` (a stale one from a crashed worker is replaced)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    s = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await s.bind(path)
    s.listen(128)
    return s


@dataclass(frozen=True)
class InheritedSocket:
    """One descriptor passed by the service manager, wrapped as a stdlib socket."""

    fd: int
    name: str
    sock: socket.socket = field(repr=False)

    @property
    def family(self) -> int:
        return int(self.sock.family)

    @property
    def type(self) -> int:
        """``socket.SOCK_STREAM`` or ``socket.SOCK_DGRAM`` (flags like SOCK_NONBLOCK stripped)."""
        return int(self.sock.type)

    @property
    def port(self) -> int | None:
        """The bound port of an IPv4/IPv6 socket; None for other families."""
        if self.family not in (socket.AF_INET, socket.AF_INET6):
            return None
        return int(self.sock.getsockname()[1])

    @property
    def named(self) -> bool:
        """Whether someone chose the name (FileDescriptorName=) rather than systemd's default."""
        return self.name != UNNAMED and not self.name.endswith(".socket")


@dataclass
class ActivatedSockets:
    """Inherited sockets sorted by role; empty lists mean "bind this one yourself" (or it is off)."""

    derp: list[socket.socket] = field(default_factory=list)  # TCP, the DERP (TLS) listener(s)
    http: list[socket.socket] = field(default_factory=list)  # TCP, the port-80 side listener
    stun: list[socket.socket] = field(default_factory=list)  # UDP, the STUN responder
    other: dict[str, list[InheritedSocket]] = field(default_factory=dict)  # other names, e.g. "metrics"

    def __bool__(self) -> bool:
        return bool(self.derp or self.http or self.stun or self.other)
