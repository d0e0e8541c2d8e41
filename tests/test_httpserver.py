"""The h11 server core (``derpd.net.httpserver``) on its own, over a scripted transport, and the one
accept loop. The HTTP front and the metrics listener are tested over real sockets elsewhere
(test_http.py, test_metrics.py, hostile/test_http_heads.py); here each rule is pinned once, with
trio's autojump clock so that deadlines cost no real time and "at once" means "no time passed"."""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Iterable
from functools import partial

import h11
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from derpd.net.client import DerpClient
from derpd.net.httpserver import (
    ACCEPT_BATCH,
    Close,
    HttpServerConnection,
    Limits,
    Refused,
    accept_forever,
    header,
    http_date,
    read_first,
    request_path,
)
from derpd.net.transport import SocketTransport

from .conftest import start_server, url_of


class Scripted:
    """A transport that yields ``chunks`` one read at a time, then EOF (or silence with ``hang``)."""

    remote = None
    has_backlog = False

    def __init__(self, chunks: Iterable[bytes], *, hang: bool = False, stall_writes: bool = False) -> None:
        self.chunks = list(chunks)
        self.hang = hang
        self.stall_writes = stall_writes
        self.sent = bytearray()
        self.reads: list[int] = []

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        self.reads.append(max_bytes)
        await trio.lowlevel.checkpoint()
        if self.chunks:
            return self.chunks.pop(0)
        if self.hang:
            await trio.sleep_forever()
        return b""

    def try_send(self, data: bytes | memoryview) -> int:
        return 0

    async def send_all(self, data: bytes | memoryview) -> None:
        if self.stall_writes:
            await trio.sleep_forever()
        self.sent += data

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


LIMITS = Limits(max_head=1024, max_body=2048, head_timeout=10.0, write_timeout=10.0)


def responses(data: bytes, methods: list[bytes]) -> list[tuple[h11.Response, bytes]]:
    conn = h11.Connection(h11.CLIENT)
    conn.receive_data(bytes(data))
    conn.receive_data(b"")
    out = []
    for method in methods:
        conn.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
        conn.send(h11.EndOfMessage())
        resp = conn.next_event()
        assert isinstance(resp, h11.Response), resp
        body = b""
        while isinstance(ev := conn.next_event(), h11.Data):
            body += ev.data
        out.append((resp, body))
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
            break
        conn.start_next_cycle()
    return out


async def serve(transport: Scripted, limits: Limits = LIMITS) -> tuple[bool, list[bytes]]:
    """Serve with a handler that drains and answers 200 with the target; (handed off, targets)."""
    http = HttpServerConnection(transport, limits)
    seen: list[bytes] = []

    async def handle(request: h11.Request) -> bool:
        seen.append(request.target)
        if request.target == b"/upgrade":
            return True
        await http.drain_body()
        await http.respond(200, body=request.target, head=request.method == b"HEAD")
        return False

    return await http.serve(handle), seen


async def refused(transport: Scripted, limits: Limits = LIMITS) -> Refused:
    with pytest.raises(Refused) as e:
        await serve(transport, limits)
    return e.value


# --- heads ------------------------------------------------------------------------------------------


async def test_keep_alive_pipelining_and_the_headers_every_response_gets() -> None:
    t = Scripted([b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nHEAD /bb HTTP/1.1\r\nHost: x\r\n\r\n"])
    assert await serve(t) == (False, [b"/a", b"/bb"])  # then EOF: the end, quietly
    (a, body_a), (b, body_b) = responses(t.sent, [b"GET", b"HEAD"])
    assert (a.status_code, body_a, b.status_code, body_b) == (200, b"/a", 200, b"")
    assert header(b.headers, b"content-length") == b"3"  # what a GET would have had
    assert header(a.headers, b"date") is not None
    assert header(a.headers, b"content-type") == b"text/plain; charset=utf-8"
    assert header(a.headers, b"connection") is None


async def test_reads_are_bounded_by_the_head_limit() -> None:
    t = Scripted([b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"])
    await serve(t)
    assert set(t.reads) == {LIMITS.max_head}


async def test_upgrade_keeps_the_bytes_after_the_head() -> None:
    t = Scripted([b"GET /upgrade HTTP/1.1\r\nHost: x\r\n\r\nFIRST-FRAMES"])
    http = HttpServerConnection(t, LIMITS)

    async def handle(request: h11.Request) -> bool:
        return True

    assert await http.serve(handle) is True
    assert http.trailing_data == b"FIRST-FRAMES" and t.sent == b""


async def test_initial_bytes_count_as_received() -> None:
    t = Scripted([b"Host: x\r\n\r\n"])
    http = HttpServerConnection(t, LIMITS, b"GET /early HTTP/1.1\r\n")
    request = await http.next_request()
    assert request is not None and request.target == b"/early"


@pytest.mark.parametrize(
    ("chunks", "status"),
    [
        ([b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n"], 431),  # whole, in one read
        ([b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 600, b"a" * 600], 431),  # h11's own 431, still incomplete
        ([b"G" * 5000], 431),  # no line end at all
        ([b"GARBAGE\r\n\r\n"], 400),
        ([b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"], 505),
        ([b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1234567890123456789\r\n\r\n"], 400),
    ],
)
async def test_bad_heads_are_refused_with_a_status_and_close(
    chunks: list[bytes], status: int, autojump_clock: trio.testing.MockClock
) -> None:
    t = Scripted(chunks, hang=True)
    e = await refused(t)
    assert e.status == status
    assert t.sent.startswith(b"HTTP/1.1 %d " % status) and b"\r\nConnection: close\r\n" in t.sent
    assert trio.current_time() == 0  # at once, not at the head deadline


async def test_a_bad_request_line_is_refused_before_the_head_is_complete(
    autojump_clock: trio.testing.MockClock,
) -> None:
    e = await refused(Scripted([b"G@T / HTTP/1.1\r\n"], hang=True))
    assert (e.status, str(e.reason)) == (400, "illegal request line")
    assert trio.current_time() == 0


async def test_a_slow_head_gets_408_at_the_deadline(autojump_clock: trio.testing.MockClock) -> None:
    t = Scripted([b"GET / HTTP/1.1\r\nHost: x\r\n"], hang=True)
    e = await refused(t)
    assert e.status == 408 and trio.current_time() == LIMITS.head_timeout
    assert t.sent.startswith(b"HTTP/1.1 408 ") and t.sent.endswith(b"request timeout\n")


async def test_an_idle_connection_ends_quietly_at_the_deadline(autojump_clock: trio.testing.MockClock) -> None:
    t = Scripted([b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"], hang=True)
    assert await serve(t) == (False, [b"/"])  # the second head never starts: no 408
    assert trio.current_time() == LIMITS.head_timeout
    assert t.sent.count(b"HTTP/1.1 ") == 1


# --- bodies -----------------------------------------------------------------------------------------


async def test_a_small_body_is_drained_for_keep_alive() -> None:
    t = Scripted(
        [b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello", b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n"]
    )
    assert await serve(t) == (False, [b"/a", b"/b"])


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3000\r\n\r\n", 413),  # said, refused unread
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + b"801\r\n" + b"x" * 2049 + b"\r\n", 413),
    ],
)
async def test_bodies_framed_twice_or_too_large_are_refused(
    head: bytes, status: int, autojump_clock: trio.testing.MockClock
) -> None:
    t = Scripted([head, b"x" * 1024], hang=True)
    e = await refused(t)
    assert e.status == status and t.sent.startswith(b"HTTP/1.1 %d " % status)
    assert trio.current_time() == 0


async def test_a_slow_body_ends_the_connection_silently(autojump_clock: trio.testing.MockClock) -> None:
    t = Scripted([b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc"], hang=True)
    assert await serve(t) == (False, [b"/"])
    assert t.sent == b"" and trio.current_time() == LIMITS.head_timeout


# --- responses --------------------------------------------------------------------------------------


async def test_a_response_not_taken_in_time_closes(autojump_clock: trio.testing.MockClock) -> None:
    t = Scripted([b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"], stall_writes=True)
    http = HttpServerConnection(t, LIMITS)
    assert await http.next_request() is not None
    with pytest.raises(Close):
        await http.respond(200, body=b"never read")
    assert trio.current_time() == LIMITS.write_timeout


async def test_a_refusal_that_cannot_be_written_still_raises_refused(autojump_clock: trio.testing.MockClock) -> None:
    e = await refused(Scripted([b"GARBAGE\r\n\r\n"], stall_writes=True))
    assert e.status == 400


async def test_no_length_on_204_and_given_content_type_kept() -> None:
    t = Scripted([b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n"])
    http = HttpServerConnection(t, LIMITS)
    await http.next_request()
    await http.drain_body()
    await http.respond(204, [(b"X-A", b"1")])
    http.h11.start_next_cycle()
    await http.next_request()
    await http.drain_body()
    await http.respond(200, [(b"Content-Type", b"text/html")], b"<p>", close=True)
    (r204, _), (r200, body) = responses(t.sent, [b"GET", b"GET"])
    assert header(r204.headers, b"content-length") is None and header(r204.headers, b"x-a") == b"1"
    assert header(r200.headers, b"content-type") == b"text/html" and body == b"<p>"
    assert header(r200.headers, b"x-content-type-options") is None
    assert header(r200.headers, b"connection") == b"close"


@pytest.mark.parametrize(
    ("target", "path"),
    [(b"/derp?x=1", b"/derp"), (b"http://h/derp", b"/derp"), (b"HTTPS://h:443", b"/"), (b"*", b"*")],
)
def test_request_path(target: bytes, path: bytes) -> None:
    assert request_path(target) == path


# --- the accept loop --------------------------------------------------------------------------------


class FlakyListener:
    """Fails accept() with each errno in turn, then hands out ``socks``, then blocks."""

    def __init__(self, errnos: list[int], socks: list[trio.socket.SocketType]) -> None:
        self.errnos = errnos
        self.socks = socks

    async def accept(self) -> tuple[trio.socket.SocketType, object]:
        await trio.lowlevel.checkpoint()
        if self.errnos:
            code = self.errnos.pop(0)
            raise OSError(code, "simulated")
        if self.socks:
            return self.socks.pop(0), None
        await trio.sleep_forever()
        raise AssertionError("unreachable")


async def test_accept_backs_off_on_exhaustion_and_skips_dead_connections(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="derpd")
    ours, theirs = trio.socket.socketpair()
    listener = FlakyListener([errno.EMFILE, errno.ECONNABORTED, errno.ENOBUFS], [ours])
    started: list[SocketTransport] = []
    with trio.move_on_after(5):
        await accept_forever(listener, started.append, event="test_accept_failed")  # type: ignore[arg-type]
    assert len(started) == 1 and isinstance(started[0], SocketTransport)
    assert [r.getMessage() for r in caplog.records] == ["test_accept_failed"] * 2  # not the aborted one
    assert started[0].sock.fileno() >= 0
    await started[0].aclose()
    theirs.close()


async def test_accept_refused_by_admit_is_closed_at_once() -> None:
    ours, theirs = trio.socket.socketpair()
    started: list[SocketTransport] = []
    with trio.move_on_after(0.5):
        await accept_forever(FlakyListener([], [ours]), started.append, admit=lambda: False)  # type: ignore[arg-type]
    assert not started
    with trio.fail_after(5):
        assert await theirs.recv(10) == b""  # closed
    theirs.close()


async def test_accept_start_failing_with_oserror_closes_the_connection() -> None:
    ours, theirs = trio.socket.socketpair()

    def start(transport: SocketTransport) -> None:
        raise OSError(errno.EINVAL, "setsockopt refused")

    with trio.move_on_after(0.5):
        await accept_forever(FlakyListener([], [ours]), start)  # type: ignore[arg-type]
    with trio.fail_after(5):
        assert await theirs.recv(10) == b""
    theirs.close()


async def test_accept_raises_when_the_listener_itself_is_broken() -> None:
    with pytest.raises(OSError) as e:
        await accept_forever(FlakyListener([errno.EBADF], []), lambda t: None)  # type: ignore[arg-type]
    assert e.value.errno == errno.EBADF


async def test_accept_serves_a_real_listener() -> None:
    """End to end over loopback: the transport handed to ``start`` is connected to the client."""
    lsock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    await lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    got = trio.Event()
    started: list[SocketTransport] = []

    def start(transport: SocketTransport) -> None:
        started.append(transport)
        got.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept_forever, lsock, start)
        client = await trio.open_tcp_stream("127.0.0.1", lsock.getsockname()[1])
        with trio.fail_after(5):
            await got.wait()
            await client.send_all(b"hi")
            assert await started[0].receive_some(10) == b"hi"
        nursery.cancel_scope.cancel()
    await client.aclose()
    await started[0].aclose()
    lsock.close()


# --- the fast path's first read, and the plain-socket accept loop -----------------------------------


async def test_read_first_parses_a_whole_plain_head_without_h11(autojump_clock: trio.testing.MockClock) -> None:
    t = Scripted([b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\n\r\nDERP-BYTES"], hang=True)
    first = await read_first(t, LIMITS)
    assert first.head is not None and first.head.target == b"/derp" and not first.eof
    assert first.data[first.head.size :] == b"DERP-BYTES" and t.reads == [LIMITS.max_head]
    assert first.deadline == LIMITS.head_timeout


async def test_read_first_reads_nothing_when_initial_bytes_are_there() -> None:
    t = Scripted([])
    first = await read_first(t, LIMITS, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert first.head is not None and t.reads == []


async def test_read_first_reports_a_peer_that_closed_at_once() -> None:
    first = await read_first(Scripted([]), LIMITS)
    assert first.eof and first.head is None and first.data == b""


async def test_a_head_the_fast_path_declines_keeps_its_first_deadline(autojump_clock: trio.testing.MockClock) -> None:
    """Half a head, then silence: h11 gets it, and the 408 comes at the first read's deadline, not one
    head_timeout after h11 took over (a slow client gets no second budget)."""
    t = Scripted([b"GET / HTTP/1.1\r\nHost: x\r\n"], hang=True)
    await trio.sleep(3.0)
    first = await read_first(t, LIMITS)
    assert first.head is None and first.deadline == 3.0 + LIMITS.head_timeout
    await trio.sleep(4.0)
    http = HttpServerConnection(t, LIMITS, first.data, deadline=first.deadline)
    with pytest.raises(Refused) as e:
        await http.next_request()
    assert e.value.status == 408 and trio.current_time() == first.deadline


async def test_plain_listener_accepts_in_batches_with_the_peers_address() -> None:
    """A stdlib listener (the DERP listener's fast path): accept() gives the peer's address, so no
    getpeername; a queue longer than a batch is all accepted; refused ones are closed at once."""
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(64)
    lsock.setblocking(False)
    n = ACCEPT_BATCH * 2 + 3
    clients = [socket.create_connection(lsock.getsockname()) for _ in range(n)]
    started: list[SocketTransport] = []
    verdicts = iter([True, False] * n)
    done = trio.Event()

    def start(transport: SocketTransport) -> None:
        started.append(transport)
        if len(started) == n // 2 + 1:
            done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(accept_forever, lsock, start, admit=lambda: next(verdicts)))
        with trio.fail_after(5):
            await done.wait()
        nursery.cancel_scope.cancel()
    assert [t.remote for t in started] == [c.getsockname()[:2] for c in clients[::2]]
    for c in clients[1::2]:  # refused: closed at once
        c.settimeout(5)
        assert c.recv(10) == b""
    for t in started:
        assert not t.sock.getblocking()
        await t.aclose()
    for c in clients:
        c.close()
    lsock.close()


async def test_accepted_connections_carry_the_listeners_tcp_options(nursery: trio.Nursery) -> None:
    """The node sets keepalive, TCP_USER_TIMEOUT and TCP_NODELAY once, on its listener: each
    connection inherits them (and would get them one by one on a kernel that does not copy them)."""
    server = await start_server(nursery)
    client = await DerpClient.connect(url_of(server))
    await client.ping()
    (conn,) = [c for entry in server.relay.keys.values() for c in entry.conns]
    sock = conn.transport.sock  # type: ignore[attr-defined]
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 600
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 15_000
    assert server._tuned(sock)
    await client.aclose()


async def test_read_first_takes_what_a_socket_holds_already() -> None:
    """Over a real socket the request that is there is read without waiting; a peer that already
    closed is an end; nothing yet means a wait (the scripted tests above)."""
    ours, theirs = socket.socketpair()
    theirs.sendall(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\n\r\n\x02\x00")
    first = await read_first(SocketTransport(ours), LIMITS)
    assert first.head is not None and first.data[first.head.size :] == b"\x02\x00"
    theirs.close()
    assert (await read_first(SocketTransport(ours), LIMITS)).eof
    ours.close()


@given(st.floats(min_value=0, max_value=253402300799, allow_nan=False))
def test_http_date_is_what_email_utils_writes(t: float) -> None:
    import email.utils  # noqa: PLC0415  # the reference, loaded only by this test

    assert http_date(t).decode() == email.utils.formatdate(t, usegmt=True)
