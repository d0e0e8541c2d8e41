"""Byte transports the relay runs on: what it needs from a connection, nothing more.

``SocketTransport`` drives a plain non-blocking TCP socket directly with trio's
readiness waits, so a sender's reader can hand bytes to a receiver's socket at once
(``try_send``) and only park when the kernel buffer is full: the batched design of
``hot-path.md``. ``StreamTransport`` adapts any ``trio.abc.Stream`` (TLS, WebSocket)
and always goes through the writer task.
"""

from __future__ import annotations

import errno
import socket
from typing import Protocol

import trio

RECV_SIZE = 256 * 1024

_SOFT_ERRORS = (BlockingIOError, InterruptedError)


class Transport(Protocol):
    """A duplex byte stream as the relay sees it."""

    remote: tuple[str, int] | None

    async def receive_some(self, max_bytes: int = RECV_SIZE) -> bytes:
        """Some bytes (at most ``max_bytes``), or b"" at end of stream."""
        ...

    def try_send(self, data: bytes | memoryview) -> int:
        """Write what the kernel takes right now without waiting; 0 if nothing."""
        ...

    async def send_all(self, data: bytes | memoryview) -> None: ...

    async def aclose(self) -> None: ...


def format_addr(addr: tuple[str, int] | None) -> str:
    """``host:port`` or ``[v6]:port`` for logs; ``-`` when unknown."""
    if addr is None:
        return "-"
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def remote_of(sock: socket.socket) -> tuple[str, int] | None:
    try:
        peer = sock.getpeername()
    except OSError:
        return None
    if isinstance(peer, tuple) and len(peer) >= 2:
        return str(peer[0]), int(peer[1])
    return None


class SocketTransport:
    """A connected TCP socket used with non-blocking calls and trio readiness waits."""

    __slots__ = ("_closed", "remote", "sock")

    def __init__(self, sock: socket.socket, remote: tuple[str, int] | None = None) -> None:
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self.sock = sock
        self.remote = remote if remote is not None else remote_of(sock)
        self._closed = False

    @classmethod
    def from_trio(cls, tsock: trio.socket.SocketType) -> SocketTransport:
        fd = tsock.detach()
        return cls(socket.socket(tsock.family, tsock.type, tsock.proto, fileno=fd))

    async def receive_some(self, max_bytes: int = RECV_SIZE) -> bytes:
        sock = self.sock
        while True:
            try:
                data = sock.recv(max_bytes)
            except _SOFT_ERRORS:
                await trio.lowlevel.wait_readable(sock)
                continue
            except OSError as e:
                if e.errno in (errno.ECONNRESET, errno.ETIMEDOUT, errno.EPIPE, errno.ENOTCONN):
                    return b""
                raise
            # A flooding peer must not starve everyone else: yield once per read.
            await trio.lowlevel.checkpoint()
            return data

    def try_send(self, data: bytes | memoryview) -> int:
        try:
            return self.sock.send(data)
        except _SOFT_ERRORS:
            return 0

    async def send_all(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        sock = self.sock
        sent = 0
        total = len(view)
        while sent < total:
            try:
                sent += sock.send(view[sent:])
                continue
            except _SOFT_ERRORS:
                pass
            await trio.lowlevel.wait_writable(sock)
        await trio.lowlevel.checkpoint()

    def shutdown_write(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()
        await trio.lowlevel.checkpoint()


class StreamTransport:
    """Any trio stream (TLS, WebSocket adapter): no non-blocking path, always awaited."""

    __slots__ = ("remote", "stream")

    def __init__(self, stream: trio.abc.Stream, remote: tuple[str, int] | None) -> None:
        self.stream = stream
        self.remote = remote

    async def receive_some(self, max_bytes: int = RECV_SIZE) -> bytes:
        try:
            return bytes(await self.stream.receive_some(max_bytes))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return b""

    def try_send(self, data: bytes | memoryview) -> int:
        return 0

    async def send_all(self, data: bytes | memoryview) -> None:
        await self.stream.send_all(data)

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)
