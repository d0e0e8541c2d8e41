"""The one HTTP/1.1 server core (h11) under the HTTP front and the metrics listener, and the one
accept loop under every listener.

``HttpServerConnection`` drives h11's server state machine over a ``Transport`` with derpd's limits,
so that both servers get the same protection from one implementation: a request head must arrive
within ``head_timeout`` and fit in ``max_head`` bytes (slowloris and memory), a request line h11
would refuse is refused as soon as it has arrived rather than at the deadline, a body is drained
(up to ``max_body``) only so the connection can be kept alive, and a response the peer does not
take within ``write_timeout`` ends the connection. Every refusal is a status with
``Connection: close`` and then ``Refused``, so each caller counts and logs refusals its own way.
What a request means is the caller's business (``derpd.server.front``, ``derpd.ops.metrics``).

``read_first`` is the DERP front's fast path: a connection's first bytes, read without h11, and the
head parsed by ``derpd.proto.httphead`` when it is a plain one (every DERP client's upgrade). What
it declines goes to ``HttpServerConnection`` within the same head deadline.

``accept_forever`` is the accept loop of the DERP, port-80, worker and metrics listeners: it rides
out descriptor and memory exhaustion instead of spinning or dying.
"""

from __future__ import annotations

import errno
import re
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import NoReturn

import h11
import trio

from derpd.base import log
from derpd.base.text import Peer
from derpd.net.transport import SocketTransport, TLSTransport, Transport
from derpd.proto.httphead import RequestHead, head_size, parse_simple_head

MAX_HEAD = 8 * 1024
MAX_BODY = 64 * 1024
MAX_CONTENT_LENGTH_DIGITS = 18  # Go parses Content-Length as an int63: 19+ digits is a bad request
HEAD_TIMEOUT = 10.0
WRITE_TIMEOUT = 10.0

# The process or the kernel is out of descriptors or buffers: back off instead of spinning on accept.
ACCEPT_BACKOFF_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_BACKOFF = 0.1  # seconds
# A connection that died (or a firewall refused) between the kernel's queue and accept(): skip it.
_ACCEPT_SKIP_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})

# What h11 accepts as a request line (RFC 9112 §3: method SP request-target SP HTTP-version).
_REQUEST_LINE = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+ [^\x00-\x20\x7f]+ HTTP/[0-9]\.[0-9]\r?")

Headers = Sequence[tuple[bytes, bytes]]
_Received = h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def http_date(now: float | None = None) -> bytes:
    """An IMF-fixdate (RFC 9110 5.6.7), as ``email.utils.formatdate(usegmt=True)`` writes it, without
    loading the email package (~0.6 MB of every process) for one header."""
    t = time.gmtime(now)
    return (
        f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year:04d} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT"
    ).encode()


@dataclass(frozen=True)
class Limits:
    """What one connection may cost the server."""

    max_head: int = MAX_HEAD  # bytes of request line and headers
    max_body: int = MAX_BODY  # bytes of a body that is drained, never used; more is a 413
    head_timeout: float = HEAD_TIMEOUT  # seconds for a whole head (and, again, for draining its body)
    write_timeout: float = WRITE_TIMEOUT  # seconds for the peer to take one response


class Close(Exception):
    """End this connection now, without another word: its answer was sent, or cannot be."""


class Refused(Exception):
    """A request refused: answered with ``status`` and ``Connection: close`` where a response could still
    be sent, and the connection ends. ``reason`` is for the caller's log line (``Peer`` where the peer
    chose the text)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason


def check_request_line(pending: bytes | bytearray) -> bool:
    """Whether the request line in ``pending`` (unparsed bytes of a head) is complete and checked;
    raises h11.RemoteProtocolError(400) at once for a line h11 would refuse once the head is whole."""
    end = pending.find(b"\n")
    if end < 0:
        return False
    if not _REQUEST_LINE.fullmatch(pending, 0, end):  # h11 allows no empty line before it either
        raise h11.RemoteProtocolError("illegal request line", error_status_hint=400)
    return True


def request_path(target: bytes) -> bytes:
    """The path of a request target, origin-form (``/derp?x``) or absolute-form
    (``http://host/derp``, which proxies send and HTTP/1.1 servers must accept)."""
    if target[:1] != b"/":
        scheme, sep, rest = target.partition(b"://")
        if sep and scheme.lower() in (b"http", b"https"):
            slash = rest.find(b"/")
            target = rest[slash:] if slash >= 0 else b"/"
    return target.split(b"?", 1)[0]


def header(headers: Headers, name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower-case, as h11 gives names), or None."""
    for k, v in headers:
        if k == name:
            return v
    return None


def _phrase(status: int) -> bytes:
    return HTTPStatus(status).phrase.encode() + b"\n"


@dataclass(frozen=True, slots=True)
class FirstRead:
    """What a connection sent first, as :func:`read_first` found it."""

    data: bytes  # every byte read so far (``initial`` included)
    head: RequestHead | None  # the first request's head when proto.httphead could read it; else h11's job
    deadline: float  # when the first head must be complete (trio clock)
    eof: bool  # the peer closed without sending anything


async def read_first(transport: Transport, limits: Limits, initial: bytes = b"") -> FirstRead:
    """The fast path's look at a new connection: one read (none when ``initial`` holds bytes already)
    within the head deadline, and the head parsed by ``proto.httphead`` if it is whole and plain.

    A DERP client's upgrade request is then answered without h11 (``server.front``). Anything else,
    or nothing in time, goes to :class:`HttpServerConnection` with ``data`` and ``deadline``: the
    same checks and answers as if it had read the bytes itself, within the same deadline.
    """
    deadline = trio.current_time() + limits.head_timeout
    data = initial
    eof = False
    if not data and isinstance(transport, SocketTransport | TLSTransport):
        # Usually the request is there already (it left with the client's connect, or with its TLS
        # Finished): take it without a cancel scope or a trip through the scheduler.
        ready = transport.read_ready()
        if ready is not None:
            data, eof = ready, not ready
    if not data and not eof:
        with trio.move_on_at(deadline):
            data = await transport.receive_some(limits.max_head)
            eof = not data
    head = parse_simple_head(data, limits.max_head) if data else None
    return FirstRead(data, head, deadline, eof)


class HttpServerConnection:
    """One server-side HTTP/1.1 connection: h11's state machine, a transport and ``Limits``.

    ``initial`` is bytes already read from the transport (after a PROXY header or a TLS handshake).
    """

    def __init__(
        self, transport: Transport, limits: Limits, initial: bytes = b"", *, deadline: float | None = None
    ) -> None:
        self.transport = transport
        self.limits = limits
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_head)
        self.request: h11.Request | None = None  # the one being answered
        # When the first head must be complete (trio clock), if the caller started that clock already
        # (read_first); later heads get head_timeout each.
        self._deadline = deadline
        if initial:
            self.h11.receive_data(initial)

    @property
    def trailing_data(self) -> bytes:
        """What arrived after the current request's head: after an upgrade, the new protocol's first
        bytes (a body announced on an upgrade request is never framed, as after Go's Hijack)."""
        return bytes(self.h11.trailing_data[0])

    async def serve(self, handle: Callable[[h11.Request], Awaitable[bool]]) -> bool:
        """Answer requests with ``handle`` while the connection stays alive (keep-alive, pipelining).

        ``handle`` answers one request and returns True when it took the connection over (an
        upgrade); then so does this, and the caller must not close the transport. False: the peer
        closed, went idle past the head deadline, or the connection must close after an answer.
        Raises ``Refused`` after an error answer.
        """
        conn = self.h11
        try:
            while True:
                request = await self.next_request()
                if request is None:
                    return False
                if await handle(request):
                    return True
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return False
                conn.start_next_cycle()
        except Close:
            return False

    async def next_request(self) -> h11.Request | None:
        """The next request's head, read within ``head_timeout``; None when the connection should just
        end (the peer closed it, or sent nothing on an idle keep-alive connection in time).

        Refuses a head that is malformed (400), not complete in time (408), too big (431), not HTTP/1
        (505, e.g. the h2 preface), or whose Content-Length Go could not parse (400).
        """
        conn = self.h11
        event: _Received | None = None
        error: h11.RemoteProtocolError | None = None
        deadline, self._deadline = self._deadline, None
        if deadline is None:
            deadline = trio.current_time() + self.limits.head_timeout
        with trio.move_on_at(deadline) as scope:
            try:
                event = await self._next_event()
            except h11.RemoteProtocolError as e:
                error = e  # answered below, under the write deadline alone
        if error is not None:
            await self._refuse_error(error)
        if scope.cancelled_caught:
            if conn.their_state is h11.IDLE and not conn.trailing_data[0]:
                return None  # an idle keep-alive connection: close quietly
            timeout = self.limits.head_timeout
            await self.refuse(408, f"request head not complete in {timeout:g}s", b"request timeout\n")
        if not isinstance(event, h11.Request):
            return None  # ConnectionClosed
        self.request = event
        if head_size(event.target, event.headers) > self.limits.max_head:
            await self.refuse(431, "request head too long", _phrase(431))
        if not event.http_version.startswith(b"1."):
            await self.refuse(505, "unsupported protocol version")
        length = header(event.headers, b"content-length")
        if length is not None and len(length) > MAX_CONTENT_LENGTH_DIGITS:
            await self.refuse(400, "bad Content-Length")
        return event

    async def drain_body(self) -> None:
        """Read and drop the rest of this request's body, so the connection can serve the next one.

        Refuses a body framed twice (400: Content-Length and Transfer-Encoding together are a
        request-smuggling attempt, RFC 9112 §6.1, closed rather than kept alive) or larger than
        ``max_body`` (413, at once when Content-Length says so). A body not complete within
        ``head_timeout``, or cut short, ends the connection.
        """
        assert self.request is not None
        headers = self.request.headers
        length = header(headers, b"content-length")
        if length is not None and header(headers, b"transfer-encoding") is not None:
            await self.refuse(400, "both Content-Length and Transfer-Encoding")
        max_body = self.limits.max_body
        if length is not None and int(length) > max_body:
            await self.refuse(413, "request body too large")
        total = 0
        error: h11.RemoteProtocolError | None = None
        with trio.move_on_after(self.limits.head_timeout):
            try:
                while total <= max_body:
                    event = await self._next_event()
                    if isinstance(event, h11.EndOfMessage):
                        return
                    if not isinstance(event, h11.Data):
                        raise Close  # the peer closed in the middle of the body
                    total += len(event.data)
            except h11.RemoteProtocolError as e:
                error = e
        if error is not None:
            await self._refuse_error(error)
        if total > max_body:
            await self.refuse(413, "request body too large")
        raise Close

    async def respond(
        self, status: int, headers: Headers = (), body: bytes = b"", *, head: bool = False, close: bool = False
    ) -> None:
        """One whole response, with Date and Content-Length (none on 204 and 304) added; a body without
        a Content-Type is plain text. ``head``: the answer to a HEAD request, the headers a GET would
        get and no body. ``close`` adds ``Connection: close``. Raises ``Close`` when the peer does not
        take the response within ``write_timeout``: a client that does not read gets no more answers.
        """
        hdrs = list(headers)
        if body and not any(k.lower() == b"content-type" for k, _ in hdrs):
            hdrs += [(b"Content-Type", b"text/plain; charset=utf-8"), (b"X-Content-Type-Options", b"nosniff")]
        hdrs.append((b"Date", http_date()))
        if status not in (204, 304):
            hdrs.append((b"Content-Length", str(len(body)).encode()))
        if close:
            hdrs.append((b"Connection", b"close"))
        conn = self.h11
        out = conn.send(h11.Response(status_code=status, headers=hdrs, reason=HTTPStatus(status).phrase.encode()))
        if body and not head:
            out += conn.send(h11.Data(data=body))
        out += conn.send(h11.EndOfMessage())
        with trio.move_on_after(self.limits.write_timeout) as scope:
            await self.transport.send_all(out)
        if scope.cancelled_caught:
            raise Close

    async def refuse(self, status: int, reason: str, body: bytes | None = None) -> NoReturn:
        """Answer ``status`` (with ``body``, else ``reason``) and ``Connection: close`` if an answer can
        still be sent, without reading any more of the request; then raise ``Refused``."""
        if self.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            try:
                await self.respond(status, body=reason.encode() + b"\n" if body is None else body, close=True)
            except (h11.LocalProtocolError, trio.BrokenResourceError, OSError, Close):
                pass  # the peer is gone or not reading: the refusal still counts
        raise Refused(status, reason)

    async def _refuse_error(self, error: h11.RemoteProtocolError) -> NoReturn:
        """h11's own verdict, including its 431 for a head still incomplete at ``max_head`` bytes."""
        status = error.error_status_hint
        await self.refuse(status, Peer(str(error)), _phrase(status))

    async def _next_event(self) -> _Received:
        """The next h11 event, reading as needed.

        While a head is incomplete, its request line is checked as soon as it has arrived (h11 waits
        for the whole head): a client that opens with garbage gets its 400 at once, as from Go's
        line-by-line reader, not at the head deadline.
        """
        conn = self.h11
        line_checked = False
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            if not line_checked and conn.their_state is h11.IDLE:
                line_checked = check_request_line(conn.trailing_data[0])
            conn.receive_data(await self.transport.receive_some(self.limits.max_head))


ACCEPT_BATCH = 16  # connections accepted from a busy listener between two yields to other tasks


async def accept_forever(
    listener: trio.socket.SocketType | socket.socket,
    start: Callable[[SocketTransport], None],
    *,
    admit: Callable[[], bool] | None = None,
    event: str = "accept_failed",
    nodelay: bool = True,
) -> NoReturn:
    """Accept connections on ``listener`` until cancelled and hand each to ``start``, which must not
    block (it starts the connection's task).

    A connection ``admit`` refuses is closed before any other work, so a flood costs little; one that
    ``start`` fails on with OSError (a socket option refused on a connection already reset) is closed
    too. When the process or the kernel is out of descriptors or memory, the loop logs ``event`` and
    backs off (the connections wait in the kernel's queue) instead of spinning or ending the server;
    a connection that died before it was accepted is skipped. Any other error is the listener's own
    and raises.

    A plain (non-blocking) ``socket.socket`` listener is the DERP listener's fast path: up to
    ``ACCEPT_BATCH`` connections per wake-up, each with the peer address accept() returned (no
    getpeername), and no trio socket wrapped around each one only to be unwrapped again.
    ``nodelay=False``: ``start`` sees to TCP_NODELAY (the DERP listener's connections inherit it).
    """
    accept = _batch_acceptor(listener) if isinstance(listener, socket.socket) else listener.accept
    while True:
        try:
            sock, addr = await accept()
        except OSError as e:
            if e.errno in ACCEPT_BACKOFF_ERRNOS:
                log.warning(event, reason=e.strerror, action=f"backing off {ACCEPT_BACKOFF * 1000:g}ms")
                await trio.sleep(ACCEPT_BACKOFF)
            elif e.errno not in _ACCEPT_SKIP_ERRNOS:
                raise
            continue
        if admit is not None and not admit():
            sock.close()
            continue
        try:
            if isinstance(sock, socket.socket):
                transport = SocketTransport(sock, _peer(addr), nodelay=nodelay)
            else:
                transport = SocketTransport.from_trio(sock)
        except OSError:
            sock.close()
            continue
        try:
            start(transport)
        except OSError:
            transport.sock.close()


def _batch_acceptor(listener: socket.socket) -> Callable[[], Awaitable[tuple[socket.socket, object]]]:
    """accept() on a non-blocking listener: at once while connections are queued, with a yield to
    other tasks every ``ACCEPT_BATCH``; a readiness wait when the queue is empty."""
    batch = 0

    async def accept() -> tuple[socket.socket, object]:
        nonlocal batch
        while True:
            if batch >= ACCEPT_BATCH:
                batch = 0
                await trio.lowlevel.checkpoint()
            try:
                got = listener.accept()
            except BlockingIOError:
                batch = 0
                await trio.lowlevel.wait_readable(listener)
                continue
            batch += 1
            return got

    return accept


def _peer(addr: object) -> tuple[str, int] | None:
    """The (host, port) of what accept() returned: None for a unix socket's peer."""
    if isinstance(addr, tuple) and len(addr) >= 2:
        return str(addr[0]), int(addr[1])
    return None
