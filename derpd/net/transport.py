"""Byte transports the relay runs on: what it needs from a connection, nothing more.

``SocketTransport`` drives a plain non-blocking TCP socket directly with trio's
readiness waits, so a sender's reader can hand bytes to a receiver's socket at once
(``try_send``) and only park when the kernel buffer is full: the batched design of
``hot-path.md``. ``StreamTransport`` adapts any ``trio.abc.Stream`` (TLS, WebSocket)
and always goes through the writer task.
"""

from __future__ import annotations

import errno
import mmap
import socket
import ssl
from typing import Protocol, cast

import trio

from derpd.net.addr import remote_of

RECV_SIZE = 256 * 1024

_SOFT_ERRORS = (BlockingIOError, InterruptedError)
_GONE_ERRNOS = (errno.ECONNRESET, errno.ETIMEDOUT, errno.EPIPE, errno.ENOTCONN)


# One receive buffer per process (trio runs every task on one thread, and nothing awaits between
# filling it and copying out of it). ``sock.recv(RECV_SIZE)`` would malloc 256 KiB for every read,
# however few bytes came: with many small reads, glibc's large-chunk path showed as ~6 % of the
# relay's CPU. Copying out what arrived (``bytes(view[:n])``) is a memcpy of the data itself.
# Anonymous mmap, not ``bytearray`` (which zero-fills, so all 256 KiB would be resident at start): a
# page becomes resident when a read first reaches it, so an idle or lightly loaded relay pays for the
# reads it has had, not for the largest it could have. Private (mmap's default is MAP_SHARED), so a
# forked child would get its own copy, as it would of a bytearray.
_SCRATCH = memoryview(mmap.mmap(-1, RECV_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))


async def _recv_into_scratch(sock: socket.socket, max_bytes: int, drained: bool) -> int:
    """Read at most ``max_bytes`` into ``_SCRATCH`` (waiting until there is something); 0 at EOF
    or when the peer is gone.

    ``drained``: the caller's last read was short, so the socket was empty then. Waiting for
    readiness first saves the recv that would fail with EAGAIN (one syscall per wake-up at light
    load); when the socket may still hold data, it tries at once and yields once for fairness.
    Either way the caller's task yields exactly once per read: a flooding peer cannot starve the
    others, and a packet arriving alone costs one readiness wait and one recv.
    """
    if drained:
        await trio.lowlevel.wait_readable(sock)
    else:
        await trio.lowlevel.checkpoint()
    while True:
        try:
            return sock.recv_into(_SCRATCH, max_bytes)
        except _SOFT_ERRORS:
            await trio.lowlevel.wait_readable(sock)
        except OSError as e:
            if e.errno in _GONE_ERRNOS:
                return 0
            raise


class Transport(Protocol):
    """A duplex byte stream as the relay sees it."""

    remote: tuple[str, int] | None

    async def receive_some(self, max_bytes: int = RECV_SIZE) -> bytes:
        """Some bytes (at most ``max_bytes``), or b"" at end of stream."""
        ...

    def try_send(self, data: bytes | bytearray | memoryview) -> int:
        """Write what the kernel takes right now without waiting; 0 if nothing."""
        ...

    @property
    def has_backlog(self) -> bool:
        """Bytes try_send accepted that are not on the wire yet (send_all(b"") flushes them)."""
        ...

    async def send_all(self, data: bytes | bytearray | memoryview) -> None: ...

    async def aclose(self) -> None: ...


class SocketTransport:
    """A connected TCP socket used with non-blocking calls and trio readiness waits."""

    __slots__ = ("_closed", "_drained", "_waited", "remote", "sock")

    def __init__(self, sock: socket.socket, remote: tuple[str, int] | None = None, *, nodelay: bool = True) -> None:
        """``nodelay=False``: the caller sees to TCP_NODELAY (an accepted socket inherits it from
        its listener on Linux: one setsockopt less per connection)."""
        sock.setblocking(False)
        if nodelay:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self.sock = sock
        self.remote = remote if remote is not None else remote_of(sock)
        self._closed = False
        self._drained = False  # the last read was short: wait for readiness before the next
        # Whether trio may know this fd (a readiness wait in receive_some or send_all): only then
        # does close() need trio's notify_closing. A login that never waited (the usual case
        # under load: every read finds its bytes) is spared its 3 µs and a failing epoll_ctl.
        self._waited = False

    @classmethod
    def from_trio(cls, tsock: trio.socket.SocketType) -> SocketTransport:
        fd = tsock.detach()
        transport = cls(socket.socket(tsock.family, tsock.type, tsock.proto, fileno=fd))
        transport._waited = True  # the trio socket may have waited already (a connect does)
        return transport

    async def receive_some(self, max_bytes: int = RECV_SIZE) -> bytes:
        max_bytes = min(max_bytes, RECV_SIZE)
        self._waited = True
        n = await _recv_into_scratch(self.sock, max_bytes, self._drained)
        self._drained = n < max_bytes
        return bytes(_SCRATCH[:n])

    def read_ready(self) -> bytes | None:
        """What the kernel has now, without waiting (for ``ReadPump`` members): b"" at EOF or
        when the peer is gone, None if nothing."""
        try:
            n = self.sock.recv_into(_SCRATCH, RECV_SIZE)
        except _SOFT_ERRORS:
            self._drained = True  # a receive_some now waits for readiness before its recv
            return None
        except OSError as e:
            if e.errno in _GONE_ERRNOS:
                return b""
            raise
        return bytes(_SCRATCH[:n])

    def try_send(self, data: bytes | bytearray | memoryview) -> int:
        try:
            return self.sock.send(data)
        except _SOFT_ERRORS:
            return 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
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
            self._waited = True
            await trio.lowlevel.wait_writable(sock)
        await trio.lowlevel.checkpoint()

    has_backlog = False

    def shutdown_write(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        """Close now (nothing to wait for)."""
        if not self._closed:
            self._closed = True
            if self._waited:  # a task may wait on it: it wakes with ClosedResourceError
                trio.lowlevel.notify_closing(self.sock)
            self.sock.close()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()


class TLSTransport:
    """TLS driven by hand (ssl.SSLObject and memory BIOs) over a non-blocking socket.

    Unlike trio.SSLStream it decrypts every record a read brought in before returning (so
    one wake-up handles many small packets), and it can encrypt and send without waiting
    (``try_send``), which keeps TLS connections on the relay's direct-write path. Ciphertext
    the kernel did not take stays in a backlog that ``send_all`` (the writer task) flushes.
    """

    __slots__ = ("_backlog", "_closed", "_drained", "_incoming", "_outgoing", "remote", "sock", "ssl")

    def __init__(self, raw: SocketTransport, context: ssl.SSLContext, initial: bytes = b"") -> None:
        self.sock = raw.sock
        self.remote = raw.remote
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        if initial:
            self._incoming.write(initial)
        self.ssl = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._backlog = bytearray()  # ciphertext not yet taken by the kernel
        self._closed = False
        self._drained = raw._drained

    def version(self) -> str | None:
        return self.ssl.version()

    @property
    def has_backlog(self) -> bool:
        return bool(self._backlog or self._outgoing.pending)

    async def handshake(self) -> None:
        """Server handshake; on failure OpenSSL's alert still goes out before the error is raised.
        (The caller bounds it with its own deadline.)"""
        while True:
            try:
                self.ssl.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    raise ConnectionResetError(errno.ECONNRESET, "peer closed during the TLS handshake") from None
                continue
            except ssl.SSLError:
                with trio.move_on_after(1.0):
                    try:
                        await self._flush()
                    except OSError:
                        pass
                raise
            await self._flush()
            return

    async def _fill(self) -> bool:
        """Read what the kernel has (waiting if nothing) into the TLS engine; False at EOF."""
        n = await _recv_into_scratch(self.sock, RECV_SIZE, self._drained)
        self._drained = n < RECV_SIZE
        if not n:
            self._incoming.write_eof()
            return False
        self._incoming.write(_SCRATCH[:n])
        return True

    def _decrypt(self, max_bytes: int) -> bytes:
        """Plaintext of the buffered records, at most ``max_bytes`` (b"" if no record is complete).

        Each ``SSLObject.read`` yields one record's plaintext; reading into the scratch buffer
        (not ``read(n)``, which allocates ``n`` bytes per call) keeps a read full of small
        records from costing a large allocation per record. What does not fit stays in
        OpenSSL for the next call, which comes before any wait. It reads only while bytes wait
        in the BIO or in OpenSSL (OpenSSL reads records from the BIO one by one), so the usual
        read ends without the cost of raising SSLWantReadError.
        """
        read = self.ssl.read
        buffered = self.ssl.pending
        incoming = self._incoming
        view = _SCRATCH
        got = 0
        while got < max_bytes and (incoming.pending or buffered()):
            try:
                # With a buffer, read() returns a count (typeshed says bytes).
                n = cast("int", read(max_bytes - got, view[got:]))
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                break
            if not n:
                break
            got += n
        if self._outgoing.pending:  # e.g. a KeyUpdate answer: send with the next write
            self._backlog += self._outgoing.read()
        return bytes(view[:got])

    async def receive_some(self, max_bytes: int = RECV_SIZE) -> bytes:
        max_bytes = min(max_bytes, RECV_SIZE)
        while True:
            data = self._decrypt(max_bytes)
            if data:
                return data
            if self._incoming.eof or not await self._fill():
                return b""

    def read_ready(self, *, recv: bool = True) -> bytes | None:
        """The plaintext of every whole record there is now, without waiting (for ``ReadPump``
        members, whose epoll sees only the socket): what OpenSSL holds, plus (``recv``) what
        the kernel has. b"" at EOF or when the peer is gone, None if no whole record yet.

        Every whole record is decrypted each time, so nothing is left in OpenSSL where the
        epoll cannot see it; at EOF there is nothing more to decrypt (as ``receive_some``).
        """
        if self._incoming.eof:
            return b""
        if recv:
            try:
                n = self.sock.recv_into(_SCRATCH, RECV_SIZE)
            except _SOFT_ERRORS:
                n = -1
            except OSError as e:
                if e.errno not in _GONE_ERRNOS:
                    raise
                n = 0
            if n == 0:
                self._incoming.write_eof()
                return b""
            if n > 0:
                self._incoming.write(_SCRATCH[:n])
        data = self._decrypt(RECV_SIZE)
        if len(data) == RECV_SIZE:  # one read of ciphertext plus a partial record can exceed it
            parts = [data]
            while more := self._decrypt(RECV_SIZE):
                parts.append(more)
            data = b"".join(parts)
        return data or None

    def try_send(self, data: bytes | bytearray | memoryview) -> int:
        """Encrypt all of ``data`` and send what the kernel takes now; the rest is backlog."""
        if self._backlog or self._closed:
            return 0  # keep the byte order: the writer flushes the backlog first
        self.ssl.write(data)
        cipher = self._outgoing.read()
        try:
            sent = self.sock.send(cipher)
        except _SOFT_ERRORS:
            sent = 0
        if sent < len(cipher):
            self._backlog += memoryview(cipher)[sent:]
        return len(data)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if data:
            self.ssl.write(data)
        await self._flush()
        await trio.lowlevel.checkpoint()

    async def _flush(self) -> None:
        if self._outgoing.pending:
            self._backlog += self._outgoing.read()
        sock = self.sock
        backlog = self._backlog
        while backlog:
            try:
                sent = sock.send(backlog)
            except _SOFT_ERRORS:
                await trio.lowlevel.wait_writable(sock)
                continue
            del backlog[:sent]

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()

    def close(self) -> None:
        """Close now: a close_notify if the kernel takes it at once, never waiting."""
        if not self._closed:
            self._closed = True
            try:  # a close_notify, best effort, never waiting
                self.ssl.unwrap()
            except (ssl.SSLError, ValueError):
                pass
            if self._outgoing.pending:
                try:
                    self.sock.send(self._outgoing.read())
                except OSError:
                    pass
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()


async def close_transport(transport: Transport) -> None:
    """Close ``transport``, even inside a cancelled scope. A socket or TLS transport closes at once:
    no shielded scope and no trip through the scheduler, which every login and logout would pay
    for; any other (WebSocket) gets a shielded ``aclose``."""
    if isinstance(transport, SocketTransport | TLSTransport):
        transport.close()
    else:
        with trio.CancelScope(shield=True):
            await transport.aclose()


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

    def try_send(self, data: bytes | bytearray | memoryview) -> int:
        return 0

    has_backlog = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)
