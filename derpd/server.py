"""Composition: listeners, the HTTP front, the relay core and the STUN responder.

``DerpServer`` owns sockets and tasks; each concern it wires together lives in its
own module and knows nothing of the others.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass, field

import trio

from stun.server import StunServer

from . import log
from .http import HttpConfig, HttpFront
from .keys import NodePrivate, public_key_text
from .relay import RelayConfig, RelayServer
from .transport import SocketTransport, format_addr

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


def _prepare(s: trio.socket.SocketType, sock_type: int, *, dual_stack: bool) -> None:
    if s.family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual_stack else 1)
    if sock_type == socket.SOCK_STREAM:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)


@dataclass
class ServerSettings:
    addr: tuple[str, int] = ("", 3340)
    stun_port: int = 3478  # -1 disables
    stun_host: str | None = None  # None = the host of addr; "" = every interface, dual-stack
    home: str = ""
    mesh_key: bytes | None = None
    relay: RelayConfig = field(default_factory=RelayConfig)


class DerpServer:
    """A DERP node: HTTP/DERP listeners plus the STUN responder, under one nursery."""

    def __init__(self, key: NodePrivate, settings: ServerSettings) -> None:
        self.key = key
        self.settings = settings
        settings.relay.mesh_key = settings.mesh_key
        self.relay = RelayServer(key, settings.relay)
        self.http = HttpFront(self.relay.serve_connection, key.public, HttpConfig(home=settings.home))
        self.stun: StunServer | None = None
        self.derp_addrs: list[tuple[str, int]] = []
        self.stun_addrs: list[tuple[str, int]] = []

    @property
    def port(self) -> int:
        return self.derp_addrs[0][1]

    async def run(self, *, task_status: trio.TaskStatus[DerpServer] = trio.TASK_STATUS_IGNORED) -> None:
        host, port = self.settings.addr
        listeners = await bind_sockets(host, port, socket.SOCK_STREAM)
        for s in listeners:
            s.listen(4096)
            self.derp_addrs.append(tuple(s.getsockname()[:2]))  # type: ignore[arg-type]
        try:
            async with trio.open_nursery() as nursery:
                for s in listeners:
                    nursery.start_soon(self._accept_loop, s, nursery)
                if self.settings.stun_port >= 0:
                    stun_host = host if self.settings.stun_host is None else self.settings.stun_host
                    stun = StunServer(stun_host, self.settings.stun_port)
                    self.stun = stun
                    await nursery.start(stun.serve)
                    self.stun_addrs = list(stun.addresses)
                log.info(
                    "serving",
                    derp=",".join(format_addr(a) for a in self.derp_addrs),
                    stun=",".join(format_addr(a) for a in self.stun_addrs) or "off",
                    public_key=public_key_text(self.key.public),
                    mesh_key="configured" if self.settings.mesh_key else "none",
                )
                task_status.started(self)
        finally:
            for s in listeners:
                s.close()

    async def _accept_loop(self, lsock: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        handle = self.http.handle
        while True:
            try:
                sock, _addr = await lsock.accept()
            except OSError as e:
                if e.errno in ACCEPT_BACKOFF_ERRNOS:
                    log.warning("accept_failed", reason=e.strerror, action="backing off 100ms")
                    await trio.sleep(0.1)
                    continue
                if e.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue
                raise
            try:
                transport = SocketTransport.from_trio(sock)
            except OSError:
                sock.close()
                continue
            nursery.start_soon(handle, transport)
