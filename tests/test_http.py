"""The HTTP front over real sockets: endpoints, upgrade, and broken or slow requests."""

from __future__ import annotations

import logging
import socket

import h11
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from derpd.net.client import DerpClient, DerpHTTPError
from derpd.net.httpserver import check_request_line
from derpd.net.transport import SocketTransport
from derpd.proto.frames import ClientInfo, FrameReader, FrameType, client_info_frame, send_packet_frame
from derpd.proto.keys import NodePrivate
from derpd.server.front import HttpConfig, HttpFront
from derpd.server.node import DerpServer

from .conftest import Clients, start_server


async def raw(port: int) -> trio.socket.SocketType:
    s = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    await s.connect(("127.0.0.1", port))
    return s


async def read_all(s: trio.socket.SocketType, timeout: float = 5.0) -> bytes:
    data = b""
    with trio.fail_after(timeout):
        while chunk := await s.recv(65536):
            data += chunk
    return data


def parse_responses(data: bytes, methods: list[bytes] | None = None) -> list[tuple[h11.Response, bytes]]:
    """Every response in ``data``, parsed by h11 acting as the client."""
    out = []
    conn = h11.Connection(h11.CLIENT)
    conn.receive_data(data)
    conn.receive_data(b"")
    for method in methods or [b"GET"]:
        conn.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
        conn.send(h11.EndOfMessage())
        resp = conn.next_event()
        assert isinstance(resp, h11.Response), resp
        body = b""
        while not isinstance(ev := conn.next_event(), h11.EndOfMessage):
            body += ev.data  # type: ignore[union-attr]
        out.append((resp, body))
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
            break
        conn.start_next_cycle()
    return out


async def request(
    port: int, raw_request: bytes, methods: list[bytes] | None = None
) -> list[tuple[h11.Response, bytes]]:
    s = await raw(port)
    await s.send(raw_request)
    s.shutdown(socket.SHUT_WR)
    data = await read_all(s)
    s.close()
    return parse_responses(data, methods)


def hdr(resp: h11.Response, name: bytes) -> bytes | None:
    return dict(resp.headers).get(name.lower())


async def get(port: int, path: str, method: str = "GET", extra: str = "") -> tuple[h11.Response, bytes]:
    req = f"{method} {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode()
    return (await request(port, req, [method.encode()]))[0]


@pytest.mark.parametrize("path", ["/derp/probe", "/derp/latency-check"])
async def test_probe_endpoints(server: DerpServer, path: str) -> None:
    for method in ("GET", "HEAD"):
        resp, body = await get(server.port, path, method)
        assert resp.status_code == 200 and body == b""
        assert hdr(resp, b"Access-Control-Allow-Origin") == b"*"
    resp, body = await get(server.port, path, "POST", "Content-Length: 0\r\n")
    assert resp.status_code == 405


async def test_generate_204_challenge(server: DerpServer) -> None:
    resp, _ = await get(server.port, "/generate_204?t=123", extra="X-Tailscale-Challenge: ts_derp.example-1:2\r\n")
    assert resp.status_code == 204
    assert hdr(resp, b"X-Tailscale-Response") == b"response ts_derp.example-1:2"
    assert hdr(resp, b"Cache-Control") == b"no-cache, no-store, must-revalidate, no-transform, max-age=0"
    for bad in ("a b", "x" * 65, "evil<script>"):
        resp, _ = await get(server.port, "/generate_204", extra=f"X-Tailscale-Challenge: {bad}\r\n")
        assert resp.status_code == 204 and hdr(resp, b"X-Tailscale-Response") is None
    resp, _ = await get(server.port, "/generate_204")
    assert resp.status_code == 204 and hdr(resp, b"X-Tailscale-Response") is None


async def test_plain_endpoints(server: DerpServer) -> None:
    resp, body = await get(server.port, "/robots.txt")
    assert (resp.status_code, body) == (200, b"User-agent: *\nDisallow: /\n")
    resp, body = await get(server.port, "/")
    assert resp.status_code == 200 and b"DERP" in body
    assert hdr(resp, b"Content-Type") == b"text/html; charset=utf-8"
    resp, body = await get(server.port, "/nope")
    assert (resp.status_code, body) == (404, b"404 page not found\n")
    resp, body = await get(server.port, "/derp")
    assert (resp.status_code, body) == (426, b"DERP requires connection upgrade\n")
    resp, body = await get(server.port, "/derp", extra="Upgrade: h2c\r\n")
    assert resp.status_code == 426


@pytest.mark.parametrize(("home", "status"), [("blank", 200), ("https://example.com/", 302)])
async def test_home_page_options(nursery: trio.Nursery, home: str, status: int) -> None:
    server = await start_server(nursery, home=home)
    resp, body = await get(server.port, "/")
    assert resp.status_code == status
    if home == "blank":
        assert body == b""
    else:
        assert hdr(resp, b"Location") == home.encode()


async def test_keep_alive_serves_several_requests(server: DerpServer) -> None:
    req = b"".join(f"GET {p} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for p in ("/derp/probe", "/generate_204", "/derp"))
    responses = await request(server.port, req, [b"GET"] * 3)
    assert [r.status_code for r, _ in responses] == [200, 204, 426]


async def test_upgrade_101_is_exact_and_keeps_pipelined_bytes(server: DerpServer) -> None:
    """Bytes sent right after the request head (here ClientInfo and a packet) are not lost."""
    dst = await DerpClient.connect(f"http://127.0.0.1:{server.port}/derp")
    key = NodePrivate.generate()
    s = await raw(server.port)
    head = b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: dErP\r\n\r\n"
    await s.send(
        head
        + client_info_frame(key, server.key.public, ClientInfo(version=2))
        + send_packet_frame(dst.public_key, b"pipelined")
    )
    got = await dst.recv_packet()
    assert (got.src, got.data) == (key.public, b"pipelined")
    data = b""
    with trio.fail_after(5):
        while data.count(b"\r\n\r\n") < 1 or len(data) < 200:
            data += await s.recv(4096)
    expected = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\nDerp-Version: 2\r\n"
        b"Derp-Public-Key: " + server.key.public.hex().encode() + b"\r\n\r\n"
    )
    assert data.startswith(expected)
    reader = FrameReader()
    reader.feed(data[len(expected) :])
    assert [t for t, _ in reader.read_frames()][:2] == [FrameType.SERVER_KEY, FrameType.SERVER_INFO]
    s.close()
    await dst.aclose()


async def test_legacy_websocket_upgrade_value_speaks_raw_derp(server: DerpServer, clients: Clients) -> None:
    c = await clients.connect(headers=[("Upgrade", "websocket")])  # an old client's header, raw DERP bytes
    assert c.server_key == server.key.public


async def test_upgrade_refused_reports_status_to_client(server: DerpServer) -> None:
    with pytest.raises(DerpHTTPError) as e:
        await DerpClient.connect(f"http://127.0.0.1:{server.port}/nope")
    assert e.value.status == 404


@pytest.mark.parametrize(
    ("raw_request", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
        (b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64, 400),  # a TLS hello to the plain port
    ],
)
async def test_broken_requests_get_a_status_and_a_close(
    server: DerpServer, clients: Clients, raw_request: bytes, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="derpd")
    s = await raw(server.port)
    await s.send(raw_request)
    data = await read_all(s)
    s.close()
    assert data.startswith(b"HTTP/1.1 %d " % status)
    assert b"Connection: close" in data
    assert [r for r in caplog.records if r.getMessage() == "http_bad_request"]
    a = await clients.connect()  # the server is fine
    await a.ping()


async def test_slow_request_head_is_cut_off(nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="derpd")
    server = await start_server(nursery)
    server.http.config = HttpConfig(head_timeout=0.2)
    s = await raw(server.port)
    await s.send(b"GET /derp HTTP/1.1\r\nHost: x\r\n")  # ...and never the end of the head
    data = await read_all(s)
    s.close()
    assert data.startswith(b"HTTP/1.1 408 ")
    assert [r for r in caplog.records if r.getMessage() == "http_bad_request"]
    # An idle keep-alive connection is closed quietly, without a 408.
    s = await raw(server.port)
    assert await read_all(s) == b""
    s.close()


async def test_body_on_probe_is_drained_for_keep_alive(server: DerpServer) -> None:
    req = b"POST /derp/probe HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello" + (
        b"GET /derp/probe HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    responses = await request(server.port, req, [b"POST", b"GET"])
    assert [r.status_code for r, _ in responses] == [405, 200]


# --- hostile and unusual heads (issue 8) ------------------------------------------------------------


async def read_until(s: trio.socket.SocketType, marker: bytes, timeout: float = 3.0) -> bytes:
    """Bytes up to ``marker``, well before any server deadline (a behaviour check, not a benchmark)."""
    data = b""
    with trio.fail_after(timeout):
        while marker not in data:
            chunk = await s.recv(65536)
            if not chunk:
                break
            data += chunk
    return data


@pytest.mark.parametrize(
    "body_header",
    ["Content-Length: 5\r\n", "Transfer-Encoding: chunked\r\n", "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n"],
)
async def test_upgrade_with_a_body_gets_101_at_once(
    server: DerpServer, caplog: pytest.LogCaptureFixture, body_header: str
) -> None:
    """derper ignores a body on the upgrade: 101 without waiting for it, then DERP. The body's bytes
    (if any arrive) are the first DERP bytes, as after Go's Hijack. A client that then closes leaves
    no error line (this used to hang, then log an h11 traceback as internal_error)."""
    caplog.set_level(logging.DEBUG, logger="derpd")
    s = await raw(server.port)
    await s.send(f"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n{body_header}\r\n".encode())
    data = await read_until(s, server.key.public)  # the 101, then the ServerKey frame
    assert data.startswith(b"HTTP/1.1 101 ")
    s.close()
    await wait_for_log(caplog, "handshake_failed")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_upgrade_with_a_body_still_logs_in(server: DerpServer) -> None:
    """The announced body is never framed: a client may send ClientInfo right after the head."""
    key = NodePrivate.generate()
    s = await raw(server.port)
    await s.send(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nContent-Length: 99\r\n\r\n")
    data = await read_until(s, server.key.public)
    await s.send(client_info_frame(key, server.key.public, ClientInfo(version=2)))
    reader = FrameReader()
    reader.feed(data[data.index(b"\r\n\r\n") + 4 :])
    with trio.fail_after(5):
        while len(frames := reader.read_frames()) < 1 or frames[-1][0] != FrameType.SERVER_INFO:
            reader.feed(await s.recv(65536))
    assert key.public in server.relay.keys
    s.close()


async def wait_for_log(caplog: pytest.LogCaptureFixture, event: str) -> None:
    with trio.fail_after(5):
        while not any(r.getMessage() == event for r in caplog.records):
            await trio.sleep(0.01)


@pytest.mark.parametrize("target", ["http://127.0.0.1/derp", "HTTPS://derp.example.com:443/derp?x=1"])
async def test_absolute_form_targets_route_like_origin_form(server: DerpServer, target: str) -> None:
    s = await raw(server.port)
    await s.send(f"GET {target} HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n".encode())
    assert (await read_until(s, b"\r\n\r\n")).startswith(b"HTTP/1.1 101 ")
    s.close()
    resp, _ = await get(server.port, "http://127.0.0.1/derp/probe")
    assert resp.status_code == 200


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 12345678901234567890\r\n\r\n", 400),
        (b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nContent-Length: 1234567890123456789\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 70000\r\n\r\n", 413),  # not drained first
        (b"G@T / HTTP/1.1\r\nHost: x\r\n", 400),  # a non-token method, head not even complete
        (b"GET / HTTP/1.1 x\r\n", 400),
        (b"GET /\r\n", 400),  # HTTP/0.9
        (b"\r\nGET / HTTP/1.1\r\n", 400),  # h11 takes no empty line before the request line
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n", 400),  # a TLS ClientHello on plain HTTP
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),  # the h2 preface
    ],
)
async def test_obviously_bad_heads_are_refused_at_once(server: DerpServer, head: bytes, status: int) -> None:
    """Refused as soon as the bad part has arrived, not at the 10 s head deadline (the socket stays
    open on our side, so only the server can end this exchange early)."""
    s = await raw(server.port)
    await s.send(head)
    data = await read_until(s, b"\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 %d " % status), data[:80]
    assert b"connection: close" in data.lower()
    s.close()


async def test_a_good_request_line_is_not_refused_early(server: DerpServer) -> None:
    """The early check accepts every line h11 accepts: a head sent in pieces still gets its answer."""
    s = await raw(server.port)
    for piece in (b"GET /robots", b".txt?a=b HTTP/1.1\r\n", b"Host: x\r\n", b"\r\n"):
        await s.send(piece)
        await trio.sleep(0.01)
    assert (await read_until(s, b"Disallow")).startswith(b"HTTP/1.1 200 ")
    s.close()


request_lines = st.one_of(
    st.binary(max_size=40),
    st.tuples(
        st.sampled_from([b"GET", b"G@T", b"", b"PO ST", b"get", b"M-SEARCH", b"\x00"]),
        st.sampled_from([b" ", b"  ", b"\t"]),
        st.sampled_from([b"/", b"/derp?x", b"http://h/derp", b"*", b"/a b", b"/\x7f", b""]),
        st.sampled_from([b" HTTP/1.1", b" HTTP/1.0", b" HTTP/2.0", b" HTTP/1", b" http/1.1", b"", b" HTTP/1.1 "]),
        st.sampled_from([b"\r", b""]),
    ).map(b"".join),
).filter(lambda line: b"\n" not in line)


@settings(max_examples=400)
@given(request_lines)
def test_early_request_line_check_agrees_with_h11(line: bytes) -> None:
    """The early check refuses exactly the request lines h11 would refuse once the head is whole."""
    try:
        checked = check_request_line(line + b"\n")
        early_refused = False
    except h11.RemoteProtocolError:
        early_refused = True
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(line + b"\nHost: x\r\n\r\n")
    try:
        h11_refused = not isinstance(conn.next_event(), h11.Request)
    except h11.RemoteProtocolError:
        h11_refused = True
    assert early_refused == h11_refused
    assert early_refused or checked
    assert check_request_line(line) is False or b"\n" in line  # no verdict before the line ends


async def test_client_brackets_an_ipv6_host_header(nursery: trio.Nursery) -> None:
    """derpd's client (mesh links, probe) sends ``Host: [::1]:PORT``, not the ambiguous ``::1:PORT``."""
    try:
        listener = (await trio.open_tcp_listeners(0, host="::1"))[0]
    except OSError:
        pytest.skip("no IPv6 loopback here")
    port = listener.socket.getsockname()[1]

    async def dial() -> None:
        with pytest.raises((ConnectionError, OSError, trio.BrokenResourceError, DerpHTTPError)):
            with trio.fail_after(5):
                await DerpClient.connect(f"http://[::1]:{port}/derp")

    nursery.start_soon(dial)
    async with listener, await listener.accept() as conn:
        head = b""
        with trio.fail_after(5):
            while b"\r\n\r\n" not in head:
                head += await conn.receive_some(4096)
    assert f"\r\nHost: [::1]:{port}\r\n".encode() in head


async def test_a_client_that_never_reads_its_answers_is_closed(nursery: trio.Nursery) -> None:
    """Pipelined requests whose answers are never read: once a response is not taken within the write
    timeout the connection is closed, instead of waiting out TCP_USER_TIMEOUT response by response."""
    front = HttpFront(None, NodePrivate.generate().public, HttpConfig(write_timeout=0.3))
    done = trio.Event()

    async def serve(stream: trio.SocketStream) -> None:
        await front.handle(SocketTransport.from_trio(stream.socket))
        done.set()

    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    nursery.start_soon(trio.serve_listeners, serve, [listener])
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", listener.socket.getsockname()[1]))
    s.setblocking(False)
    request = b"GET /robots.txt HTTP/1.1\r\nHost: x\r\n\r\n"
    with trio.fail_after(10):
        while not done.is_set():
            try:
                s.send(request * 64)
            except BlockingIOError:
                await trio.sleep(0.01)
            except OSError:
                break  # closed by the server: what the test waits for
    await done.wait()
    s.close()
