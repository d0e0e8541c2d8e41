"""Addresses and listening sockets: ``HOST:PORT`` parsing and binding (dual-stack, every resolved
address, unix sockets)."""

from __future__ import annotations

import errno
import os
import socket

import trio

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
