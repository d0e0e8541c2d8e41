"""The HTTP front over real sockets: endpoints, upgrade, and broken or slow requests."""

from __future__ import annotations

import logging
import socket

import h11
import pytest
import trio

from derpd.client import DerpClient, DerpHTTPError
from derpd.http import HttpConfig
from derpd.keys import NodePrivate
from derpd.protocol import ClientInfo, FrameReader, FrameType, client_info_frame, send_packet_frame
from derpd.server import DerpServer

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
