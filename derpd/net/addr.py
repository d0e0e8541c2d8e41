"""Addresses and listening sockets: ``HOST:PORT`` parsing, binding (dual-stack, every resolved address,
unix sockets), and the sockets a service manager hands over instead (``derpd.ops.sdnotify`` finds them)."""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass, field

import trio

# Names systemd gives descriptors nobody named: "unknown" when $LISTEN_FDNAMES is unset (sd_listen_fds
# semantics), else the socket unit's file name ("derpd.socket") when it has no FileDescriptorName=.
UNNAMED = "unknown"
ACCEPT_BACKOFF_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


class AddressError(ValueError):
    pass


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


async def bind_sockets(host: str, port: int, sock_type: int) -> list[trio.socket.SocketType]:
    """Bind every address ``host`` resolves to; an empty host means dual-stack ``::``."""
    if host in ("", "*"):
        targets = [(socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")]
        for family, addr in targets:
            try:
                s = trio.socket.socket(family, sock_type)
            except OSError:
                continue  # no IPv6 on this host: fall back to IPv4
            try:
                _prepare(s, sock_type, dual_stack=family == socket.AF_INET6)
                await s.bind((addr, port))
            except OSError:
                s.close()
                if family == socket.AF_INET6:
                    continue
                raise
            return [s]
        raise OSError(errno.EAFNOSUPPORT, "no usable address family")
    infos = await trio.socket.getaddrinfo(host, port, type=sock_type, flags=socket.AI_PASSIVE)
    socks: list[trio.socket.SocketType] = []
    seen: set[tuple[int, tuple[object, ...]]] = set()
    try:
        for family, stype, proto, _name, sockaddr in infos:
            if (family, sockaddr) in seen:
                continue
            seen.add((family, sockaddr))
            s = trio.socket.socket(family, stype, proto)
            socks.append(s)
            _prepare(s, sock_type, dual_stack=False)
            await s.bind(sockaddr)
            if port == 0:  # keep every family on the same ephemeral port
                port = s.getsockname()[1]
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


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


def _prepare(s: trio.socket.SocketType, sock_type: int, *, dual_stack: bool) -> None:
    if s.family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual_stack else 1)
    if sock_type == socket.SOCK_STREAM:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)


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
