"""Attack 2: hostile HTTP request heads on the DERP port.

Oversized lines and header blocks, request smuggling pairs, HTTP/0.9 and the HTTP/2 preface,
pipelining, absolute-form targets, absurd Content-Lengths, bodies on the upgrade request,
control characters. Each gets a prompt, correct answer (or a prompt close), one info line at
most, and leaves the server healthy.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import pytest
import trio

from derpd.proto.frames import FrameReader, FrameType
from derpd.proto.keys import NodePrivate

from .conftest import (
    Derpd,
    abort_on_close,
    assert_healthy,
    level_of,
    local_port,
    open_tcp,
    own_lines,
    read_to_eof,
    read_until,
    send_quietly,
    valid_client_info,
)

pytestmark = pytest.mark.hostile

PROMPT = 3.0  # "at once": far below the 10 s head deadline; a behaviour check, not a benchmark
STATUS_LINE = re.compile(rb"HTTP/1\.1 (\d{3}) ")


@dataclass
class Reply:
    data: bytes
    closed: bool
    elapsed: float
    port: int

    @property
    def statuses(self) -> list[int]:
        return [int(m.group(1)) for m in STATUS_LINE.finditer(self.data) if self._at_line_start(m.start())]

    def _at_line_start(self, at: int) -> bool:
        return at == 0 or self.data[at - 2 : at] == b"\r\n" or self.data[at - 1 : at] == b"\n"


async def exchange(server: Derpd, request: bytes, *, eof: bool, timeout: float = 5.0) -> Reply:
    """Send ``request`` (then our FIN when ``eof``); what comes back until the server closes."""
    stream = await open_tcp(server)
    port = local_port(stream)
    start = time.monotonic()
    try:
        received = b""
        closed = False

        async def reader() -> None:
            nonlocal received, closed
            received, closed = await read_to_eof(stream, timeout)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)  # read while sending: the server may answer before it all arrives
            if await send_quietly(stream, request) and eof:
                try:
                    await stream.send_eof()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
        return Reply(received, closed, time.monotonic() - start, port)
    finally:
        await trio.aclose_forcefully(stream)


def _upgrade(extra: bytes = b"", target: bytes = b"/derp", method: bytes = b"GET") -> bytes:
    return (
        method + b" " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: DERP\r\n" + extra
    ) + b"\r\n"


# --- size ---------------------------------------------------------------------------------------

OVERSIZED = {
    "1MB_request_line": b"GET /" + b"a" * (1 << 20) + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "10k_headers": b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 10_000 + b"\r\n",
    "64KB_header_value": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: " + b"v" * 65536 + b"\r\n\r\n",
    "1MB_no_newline": b"G" * (1 << 20),
    "10k_headers_on_derp": _upgrade(b"X-A: b\r\n" * 10_000),
}


@pytest.mark.parametrize("name", OVERSIZED)
async def test_oversized_heads_get_431_and_close(server: Derpd, name: str) -> None:
    reply = await exchange(server, OVERSIZED[name], eof=False)
    assert reply.closed and reply.elapsed < PROMPT, reply
    # The server closes with our bytes unread, so a reset may beat its answer to us; if one came, it says 431.
    assert set(reply.statuses) <= {431}, reply.data[:200]
    await assert_healthy(server)


# --- smuggling ----------------------------------------------------------------------------------

SMUGGLE_PROBE = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
REFUSED_FRAMING = {
    "two_different_content_lengths": (
        b"POST /derp/probe HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 30\r\n\r\n" + SMUGGLE_PROBE,
        400,
    ),
    "content_length_list": (
        b"POST /derp/probe HTTP/1.1\r\nHost: x\r\nContent-Length: 1, 30\r\n\r\nx" + SMUGGLE_PROBE,
        400,
    ),
    "content_length_signed": (
        b"POST /derp/probe HTTP/1.1\r\nHost: x\r\nContent-Length: +1\r\n\r\nx" + SMUGGLE_PROBE,
        400,
    ),
    "chunked_bad_chunk_size": (
        b"POST /derp/probe HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
        + SMUGGLE_PROBE,
        400,
    ),
    "chunked_size_overflow": (
        b"POST /derp/probe HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"f" * 40
        + b"\r\nx\r\n"
        + SMUGGLE_PROBE,
        400,
    ),
    "space_before_colon": (
        b"POST /derp/probe HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n" + SMUGGLE_PROBE,
        400,
    ),
    "te_not_chunked_last": (
        b"POST /derp/probe HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n"
        + SMUGGLE_PROBE,
        501,
    ),
    "te_xchunked": (
        b"POST /derp/probe HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n" + SMUGGLE_PROBE,
        501,
    ),
}


@pytest.mark.parametrize("name", REFUSED_FRAMING)
async def test_ambiguous_body_framing_is_refused_and_closed(server: Derpd, name: str) -> None:
    request, status = REFUSED_FRAMING[name]
    reply = await exchange(server, request, eof=False)
    assert reply.closed and reply.elapsed < PROMPT, reply
    assert reply.statuses == [status], reply.data[:300]
    await assert_healthy(server)


@pytest.mark.parametrize(
    "headers",
    [
        b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: chunked\r\nContent-Length: 60\r\n",
    ],
    ids=["CL_then_TE", "TE_then_CL"],
)
async def test_content_length_with_transfer_encoding_is_not_kept_alive(server: Derpd, headers: bytes) -> None:
    """RFC 9112 §6.1: a request with both Content-Length and Transfer-Encoding may be refused or
    read as chunked, but "regardless, the server MUST close the connection after responding"; a
    proxy in front that frames by Content-Length would otherwise smuggle the next request."""
    request = b"POST /derp/probe HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n0\r\n\r\n" + SMUGGLE_PROBE
    reply = await exchange(server, request, eof=False, timeout=2.0)
    assert len(reply.statuses) == 1 and reply.closed, (
        f"answered {reply.statuses} (the second is the smuggled GET /smuggled), "
        f"closed={reply.closed}: {reply.data[-120:]!r}"
    )
    await assert_healthy(server)


# --- other protocols and versions ---------------------------------------------------------------


async def test_http09_request_then_fin_is_refused(server: Derpd) -> None:
    """``GET /`` with no version: nothing to answer until the head ends; at our FIN, a 400."""
    reply = await exchange(server, b"GET /\r\n", eof=True)
    assert reply.closed and reply.elapsed < PROMPT and reply.statuses == [400], reply
    await assert_healthy(server)


async def test_h2_preface_is_refused(server: Derpd) -> None:
    reply = await exchange(server, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", eof=False)
    assert reply.closed and reply.elapsed < PROMPT, reply
    assert reply.statuses and all(s >= 400 for s in reply.statuses), reply.data[:300]
    await assert_healthy(server)


async def test_h2_preface_then_frames(server: Derpd) -> None:
    settings = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # an empty SETTINGS frame, as h2 clients send next
    reply = await exchange(server, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + settings * 50, eof=False)
    assert reply.closed and reply.elapsed < PROMPT, reply
    assert all(s >= 400 for s in reply.statuses), reply.data[:300]
    await assert_healthy(server)


# --- pipelining ---------------------------------------------------------------------------------


async def test_pipelined_requests_are_answered_in_order(server: Derpd) -> None:
    paths = [b"/derp/probe", b"/robots.txt", b"/nope", b"/generate_204", b"/derp/latency-check", b"/", b"/derp"]
    request = b"".join(b"GET " + p + b" HTTP/1.1\r\nHost: x\r\n\r\n" for p in paths) * 20
    reply = await exchange(server, request, eof=True)
    assert reply.closed and reply.elapsed < PROMPT, reply
    assert reply.statuses == [200, 200, 404, 204, 200, 200, 426] * 20
    await assert_healthy(server)


async def test_pipelined_probe_upgrade_and_login_in_one_write(server: Derpd) -> None:
    """A probe, then the upgrade, then ClientInfo, all in one write: 200, 101, ServerKey, ServerInfo."""
    key = NodePrivate.generate()
    login = valid_client_info(key, server.public_key)
    stream = await open_tcp(server)
    try:
        await stream.send_all(b"GET /derp/probe HTTP/1.1\r\nHost: x\r\n\r\n" + _upgrade() + login)
        buf = await read_until(stream, b"", lambda b: b.count(b"\r\n\r\n") >= 2)
        assert STATUS_LINE.findall(buf) == [b"200", b"101"], buf[:400]
        rest = buf[buf.index(b"HTTP/1.1 101") :].partition(b"\r\n\r\n")[2]
        reader = FrameReader()
        reader.feed(rest)
        frames: list[tuple[int, bytes]] = []
        with trio.fail_after(5):
            while len(frames) < 2:
                frames += reader.read_frames()
                if len(frames) < 2:
                    reader.feed(await stream.receive_some(65536))
        assert [f[0] for f in frames[:2]] == [FrameType.SERVER_KEY, FrameType.SERVER_INFO]
    finally:
        await stream.aclose()
    await assert_healthy(server)


# --- targets, lengths and methods ---------------------------------------------------------------


async def test_absolute_form_target_upgrades(server: Derpd) -> None:
    """RFC 9112 §3.2.2: a server MUST accept the absolute form; the path is /derp."""
    target = f"http://127.0.0.1:{server.port}/derp".encode()
    reply = await exchange(server, _upgrade(target=target), eof=False, timeout=1.0)
    assert reply.statuses[:1] == [101], reply.data[:300]
    await assert_healthy(server)


BAD_AT_ONCE = {
    "20_digit_content_length": b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n",
    "20_digit_content_length_probe": (
        b"POST /derp/probe HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n"
    ),
    "non_token_method": b"G@T / HTTP/1.1\r\nHost: x\r\n\r\n",
    "escape_in_method": b"GET\x1b[2J / HTTP/1.1\r\nHost: x\r\n\r\n",
    "nul_in_target": b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
    "escape_in_target": b"GET /\x1b]0;pwned\x07 HTTP/1.1\r\nHost: x\r\n\r\n",
    "missing_host": b"GET / HTTP/1.1\r\n\r\n",
    "header_without_colon": b"GET / HTTP/1.1\r\nHost: x\r\nNoColon\x1b[31m\r\n\r\n",
    "nul_in_header_name": b"GET / HTTP/1.1\r\nHost: x\r\nX-\x00: y\r\n\r\n",
}


@pytest.mark.parametrize("name", BAD_AT_ONCE)
async def test_bad_heads_get_400_at_once(server: Derpd, name: str) -> None:
    """Without waiting for a body that cannot come or for the head deadline (10 s)."""
    reply = await exchange(server, BAD_AT_ONCE[name], eof=False, timeout=PROMPT)
    assert reply.statuses == [400] and reply.closed and reply.elapsed < PROMPT, reply
    lines = own_lines(server.lines_for(reply.port))
    assert len(lines) == 1 and level_of(lines[0]) in ("debug", "info"), lines
    await assert_healthy(server)


@pytest.mark.parametrize("framing", [b"Content-Length: 5\r\n", b"Transfer-Encoding: chunked\r\n"])
@pytest.mark.parametrize("how", ["fin", "reset"])
async def test_upgrade_request_with_a_body_header_gets_101_at_once(server: Derpd, framing: bytes, how: str) -> None:
    """The bytes after the head of an upgrade request are DERP, not a body: 101 at once; and a
    client that then goes away is one info line, never an internal error."""
    stream = await open_tcp(server)
    buf = b""
    try:
        await stream.send_all(_upgrade(framing))
        with trio.move_on_after(PROMPT):
            while len(buf) < 12:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                buf += chunk
    finally:
        if how == "reset":
            abort_on_close(stream)
        else:
            await stream.send_eof()
            await read_to_eof(stream, 2)
        await stream.aclose()
    await trio.sleep(0.2)
    errors = [line for line in server.log_since().decode().splitlines() if "level=error" in line]
    assert not errors, errors[0][:600]
    assert buf.startswith(b"HTTP/1.1 101 "), f"no 101 within {PROMPT}s for an upgrade with {framing!r}: {buf[:200]!r}"
    await assert_healthy(server)


# --- other odd heads ----------------------------------------------------------------------------

ACCEPTED = {
    "bare_lf_line_endings": (b"GET /robots.txt HTTP/1.1\nHost: x\n\n", [200]),
    "obs_fold": (b"GET /robots.txt HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n", [200]),
    "escape_in_header_value": (b"GET /robots.txt HTTP/1.1\r\nHost: x\r\nX-A: a\x1b[2J\x1b]0;t\x07b\r\n\r\n", [200]),
    "two_identical_content_lengths": (
        b"POST /derp/probe HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /robots.txt HTTP/1.1\r\nHost: x\r\n\r\n",
        [405, 200],
    ),
    "body_over_64k_is_refused": (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n" + b"a" * 1000000,
        [413],
    ),
    "websocket_without_key": (
        _upgrade(b"Sec-WebSocket-Protocol: derp\r\n").replace(b"Upgrade: DERP", b"Upgrade: websocket"),
        [400],
    ),
    "challenge_with_escapes": (
        b"GET /generate_204 HTTP/1.1\r\nHost: x\r\nX-Tailscale-Challenge: \x1b[31m" + b"c" * 100 + b"\r\n\r\n",
        [204],
    ),
}


@pytest.mark.parametrize("name", ACCEPTED)
async def test_odd_but_answerable_heads(server: Derpd, name: str) -> None:
    request, statuses = ACCEPTED[name]
    reply = await exchange(server, request, eof=True)
    assert reply.closed and reply.elapsed < PROMPT and reply.statuses == statuses, reply
    assert b"\x1b" not in reply.data  # nothing a client sent is echoed raw
    await assert_healthy(server)
