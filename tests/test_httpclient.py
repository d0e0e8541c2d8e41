"""The one h11 client helper (``derpd.net.httpclient``) on its own: a scripted server over trio's
in-memory streams, so that every byte boundary is ours; and ``describe_error`` on each error that
admission and the probe report. Real servers (a Headscale-like webhook with TLS, derpd's port 80)
are in test_admission.py and test_probe.py."""

from __future__ import annotations

import errno
import ssl

import h11
import pytest
import trio
import trio.testing

from derpd.net.httpclient import HttpClientConnection, NoResponse, describe_error, open_tcp

GET = [("Host", "x"), ("Connection", "close")]


async def exchange(answer: bytes, *, close: bool = True) -> tuple[HttpClientConnection, bytes]:
    """A client whose server answers ``answer`` (then hangs up, with ``close``); and what it was sent."""
    client, server = trio.testing.memory_stream_pair()
    http = HttpClientConnection(client)
    await http.send_request("GET", "/x", GET)
    request = await server.receive_some()
    await server.send_all(answer)
    if close:
        await server.send_eof()
    return http, bytes(request)


async def test_one_request_in_one_write_and_a_bounded_body() -> None:
    http, request = await exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789")
    assert request == b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    head = await http.read_response()
    assert isinstance(head, h11.Response) and head.status_code == 200
    body = bytearray()
    assert await http.receive_body(body, 4) is False  # the limit, not the end
    assert body == b"0123"


async def test_body_with_content_length_is_sent_framed() -> None:
    client, server = trio.testing.memory_stream_pair()
    http = HttpClientConnection(client)
    await http.send_request("POST", "/v", [("Host", "x"), ("Content-Length", "2")], b"{}")
    assert await server.receive_some() == b"POST /v HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"


async def test_interim_responses_are_skipped() -> None:
    http, _ = await exchange(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n")
    head = await http.read_response()
    assert isinstance(head, h11.Response) and head.status_code == 204
    body = bytearray()
    assert await http.receive_body(body, 100) is True and body == b""


async def test_a_101_to_an_upgrade_request_returns_with_the_new_protocols_bytes() -> None:
    client, server = trio.testing.memory_stream_pair()
    http = HttpClientConnection(client)
    await http.send_request("GET", "/derp", [("Host", "x"), ("Connection", "Upgrade"), ("Upgrade", "DERP")])
    await server.receive_some()
    await server.send_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\nFRAMES")
    head = await http.read_response()
    assert isinstance(head, h11.InformationalResponse) and head.status_code == 101
    assert http.trailing_data == b"FRAMES"


async def test_a_hang_up_before_the_head_is_no_response() -> None:
    http, _ = await exchange(b"")
    with pytest.raises(NoResponse):
        await http.read_response()


async def test_a_body_cut_short_keeps_what_arrived() -> None:
    http, _ = await exchange(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"Allow":')
    await http.read_response()
    body = bytearray()
    with pytest.raises(h11.RemoteProtocolError):
        await http.receive_body(body, 4096)
    assert body == b'{"Allow":'


async def test_the_deadline_is_the_callers() -> None:
    http, _ = await exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nsome", close=False)
    await http.read_response()
    body = bytearray()
    with trio.move_on_after(0.05):
        await http.receive_body(body, 4096)
    assert body == b"some"


async def test_a_head_over_the_limit_is_a_protocol_error() -> None:
    client, server = trio.testing.memory_stream_pair()
    http = HttpClientConnection(client, max_head=1024)
    await http.send_request("GET", "/", GET)
    await server.send_all(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 4096)
    with pytest.raises(h11.RemoteProtocolError):
        await http.read_response()


async def test_the_context_closes_the_stream() -> None:
    client, server = trio.testing.memory_stream_pair()
    async with HttpClientConnection(client):
        pass
    assert await server.receive_some() == b""


async def test_open_tcp_to_a_literal_reports_the_sockets_own_error() -> None:
    with trio.socket.socket() as s:
        await s.bind(("127.0.0.1", 0))  # bound, not listening: refused
        with pytest.raises(ConnectionRefusedError) as e:
            await open_tcp("127.0.0.1", s.getsockname()[1])
    assert describe_error(e.value) == "connection refused"


def _ssl_error(cls: type[ssl.SSLError], text: str, **attrs: str) -> ssl.SSLError:
    e = cls(1, text)
    for k, v in attrs.items():
        setattr(e, k, v)
    return e


def _wrapped(cause: BaseException, outer: BaseException) -> BaseException:
    outer.__cause__ = cause
    return outer


@pytest.mark.parametrize(
    ("exc", "text"),
    [
        (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), "connection refused"),
        (
            _wrapped(
                ExceptionGroup("x", [ConnectionRefusedError(errno.ECONNREFUSED, "a")]),
                OSError("all attempts to connect to h:1 failed"),
            ),
            "connection refused",
        ),
        (
            _wrapped(
                ExceptionGroup("x", [ConnectionRefusedError(), OSError(errno.ENETUNREACH, "Network is unreachable")]),
                OSError("all attempts failed"),
            ),
            "Network is unreachable",
        ),
        (trio.TooSlowError(), "timed out"),
        (
            _ssl_error(ssl.SSLCertVerificationError, "verify failed", verify_message="self-signed certificate"),
            "TLS certificate verify failed: self-signed certificate",
        ),
        (
            _wrapped(
                _ssl_error(
                    ssl.SSLError,
                    "[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)",
                    reason="WRONG_VERSION_NUMBER",
                ),
                trio.BrokenResourceError(),
            ),
            "TLS: [SSL: WRONG_VERSION_NUMBER] wrong version number (plain HTTP on this port? then use http://)",
        ),
        (OSError(errno.EHOSTUNREACH, "No route to host"), "No route to host"),
        (h11.RemoteProtocolError("illegal status line:\r\n b'x'"), "illegal status line: b'x'"),
        (NoResponse(), "NoResponse"),
    ],
)
def test_describe_error(exc: BaseException, text: str) -> None:
    assert describe_error(exc) == text
