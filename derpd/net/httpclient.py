"""The one small HTTP/1.1 client (h11) for derpd's outgoing requests: the admission webhook, the
probe's captive-portal check, and the DERP client's upgrade.

It connects (TCP, then TLS with the caller's context), sends one request, and reads the response
head and a bounded body. It has no timeouts of its own: every deadline is the caller's cancel scope
(``trio.move_on_after`` / ``trio.fail_after``), which bounds the whole exchange, DNS to last byte.
``describe_error`` turns whatever such an exchange raised into one line for a log or a report.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import ssl
from collections.abc import Sequence
from types import TracebackType

import h11
import trio

MAX_HEAD = 16 * 1024  # a response head larger than this is a protocol error (h11's own default)
_RECV_SIZE = 64 * 1024

_Received = h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]


class NoResponse(Exception):
    """The server closed the connection before a response head arrived."""


async def open_tcp(host: str, port: int) -> trio.SocketStream:
    """A TCP connection; an IP literal is dialled directly, so that a failure is the socket's own
    error ("connection refused") rather than trio's "all attempts to connect failed"."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return await trio.open_tcp_stream(host, port)
    sock = trio.socket.socket(socket.AF_INET if ip.version == 4 else socket.AF_INET6, socket.SOCK_STREAM)
    try:
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def start_tls(
    stream: trio.abc.Stream, context: ssl.SSLContext, server_hostname: str
) -> trio.SSLStream[trio.abc.Stream]:
    """TLS over ``stream`` (closed on failure), checked against ``server_hostname`` as ``context`` says.

    A failed handshake raises the ``ssl.SSLError`` that says why (a bad certificate, a wrong pin),
    not trio's ``BrokenResourceError`` around it.
    """
    tls = trio.SSLStream(stream, context, server_hostname=server_hostname, https_compatible=True)
    try:
        await tls.do_handshake()
    except trio.BrokenResourceError as e:
        await trio.aclose_forcefully(stream)
        if isinstance(e.__cause__, ssl.SSLError):
            raise e.__cause__ from None
        raise
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return tls


class HttpClientConnection:
    """One request and its response over a stream, with h11's client state machine.

    An async context manager that closes the stream (forcefully: nothing is owed to the server)."""

    def __init__(self, stream: trio.abc.Stream, *, max_head: int = MAX_HEAD) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_head)

    async def __aenter__(self) -> HttpClientConnection:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await trio.aclose_forcefully(self.stream)

    async def send_request(
        self, method: str, target: str, headers: Sequence[tuple[str, str]], body: bytes = b"", *, then: bytes = b""
    ) -> None:
        """The whole request in one write: head, ``body`` (framed as ``headers`` say), end, and ``then``:
        the next protocol's first bytes after an upgrade request (a DERP fast-start login)."""
        conn = self.h11
        out = conn.send(h11.Request(method=method, target=target, headers=list(headers)))
        if body:
            out += conn.send(h11.Data(data=body))
        await self.stream.send_all(out + conn.send(h11.EndOfMessage()) + then)

    async def read_response(self) -> h11.Response | h11.InformationalResponse:
        """The response head: the final one, or the 101 that switched protocols when the request asked
        for an upgrade (then ``trailing_data`` holds the new protocol's first bytes). Interim 1xx
        responses are skipped. Raises ``NoResponse`` when the server hangs up first, and
        ``h11.RemoteProtocolError`` when it answers something that is not HTTP/1.1."""
        while True:
            event = await self._next_event()
            if isinstance(event, h11.Response):
                return event
            if not isinstance(event, h11.InformationalResponse):  # PAUSED: asked again after a 101
                raise NoResponse(f"no response head to read ({event!r})")
            if self.h11.their_state is h11.SWITCHED_PROTOCOL:
                return event

    async def receive_body(self, into: bytearray, limit: int) -> bool:
        """Append the response body to ``into`` until it ends (True) or ``into`` holds ``limit`` bytes
        (False; the rest is left unread). What arrived stays in ``into`` when reading raises or is
        cancelled, so a caller may still use a body cut short."""
        while len(into) < limit:
            event = await self._next_event()
            if not isinstance(event, h11.Data):
                return True  # EndOfMessage (a close before the promised end raises instead)
            into += event.data[: limit - len(into)]
        return False

    @property
    def trailing_data(self) -> bytes:
        """Bytes received after what h11 has parsed: after a 101, the new protocol's first bytes."""
        return bytes(self.h11.trailing_data[0])

    async def _next_event(self) -> _Received:
        conn = self.h11
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = bytes(await self.stream.receive_some(_RECV_SIZE))
            if not data and conn.their_state is h11.SEND_RESPONSE:  # h11 would call this a protocol error
                raise NoResponse("connection closed before the response")
            conn.receive_data(data)  # b"" tells h11 about EOF


def describe_error(exc: BaseException) -> str:
    """One line that says what went wrong in a network exchange, without a traceback: for the
    admission webhook's log lines and the probe's report. Peels trio's wrappers (a broken stream's
    cause; the one error per address of a failed connect) down to the error that says why."""
    if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ is not None:
        exc = exc.__cause__
    if isinstance(exc, OSError) and isinstance(exc.__cause__, BaseExceptionGroup) and exc.__cause__.exceptions:
        causes = exc.__cause__.exceptions  # trio.open_tcp_stream: one error per address tried
        if all(isinstance(c, ConnectionRefusedError) for c in causes):
            return "connection refused"
        exc = causes[-1]
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    verify_message = getattr(exc, "verify_message", None)
    if isinstance(exc, ssl.SSLCertVerificationError) and verify_message:
        return f"TLS certificate verify failed: {verify_message}"
    if isinstance(exc, ssl.SSLError) and type(exc).__module__ == "ssl":  # OpenSSL's own, not derpd's pin error
        text = re.sub(r"\s*\(_ssl\.c:\d+\)", "", str(exc))
        if exc.reason == "WRONG_VERSION_NUMBER":
            text += " (plain HTTP on this port? then use http://)"
        return f"TLS: {text}"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return " ".join(str(exc).split()) or type(exc).__name__
