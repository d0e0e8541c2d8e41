"""Client admission against a real, in-process HTTP server that behaves like Headscale's ``/verify``.

The server is trio + h11 on loopback (plain and TLS with a trustme CA). Failure modes are
modes of that server: slow, HTTP 500, malformed JSON, ``{"Allow":"yes"}``, closing without an
answer, and a port where nothing listens. Cache expiry uses an injected clock, never sleeps.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h11
import pytest
import trio
import trio.testing
import trustme

from derpd.proto.keys import public_key_text
from derpd.server.admission import (
    Admission,
    AdmissionError,
    Verdict,
    VerifyURL,
    decode_admit_response,
    normalize_ip,
    parse_allowlist,
    request_body,
    source_bucket,
)

TIMEOUT = 0.3  # the verify timeout in these tests; only the slow-server tests wait for it
GUARD = 5.0  # trio.fail_after around anything that talks to a socket

KEY_A = bytes(range(32))
KEY_B = bytes(range(1, 33))
KEY_C = bytes(range(2, 34))


@dataclass
class Recorded:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes


class VerifyServer:
    """Headscale's ``POST /verify``: POST only (405), body <= 4 KiB, ``{"Allow": bool}`` by NodePublic.

    ``mode`` selects a misbehaviour: "slow" never answers, "500", "malformed", "allow-yes",
    "close" (hang up after reading the request), "short-body" (a 200 whose body stops early),
    "raw" (answer ``raw_status``/``raw_body``/``raw_headers``).
    ``gate``, when set, holds every answer until it is set.
    """

    def __init__(self) -> None:
        self.allowed: set[str] = set()
        self.mode = "normal"
        self.raw_status = 200
        self.raw_body = b""
        self.raw_headers: list[tuple[str, str]] = []
        self.gate: trio.Event | None = None
        self.requests: list[Recorded] = []
        self.port = 0
        self.scheme = "http"

    def allow(self, *keys: bytes) -> None:
        self.allowed.update(public_key_text(k) for k in keys)

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/verify"

    async def handle(self, stream: trio.abc.Stream) -> None:
        try:
            await self._serve(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError, OSError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def _serve(self, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER)
        request: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                return
        assert request is not None
        headers = {k.decode(): v.decode() for k, v in request.headers}
        self.requests.append(Recorded(request.method.decode(), request.target.decode(), headers, bytes(body)))
        if self.mode == "close":
            return
        if self.mode == "slow":
            await trio.sleep_forever()
        if self.gate is not None:
            await self.gate.wait()
        if self.mode == "short-body":  # promise 100 bytes, send a few, hang up
            await stream.send_all(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"Allow":')
            return
        status, answer, extra = self._answer(request.method, bytes(body))
        hdrs = [("Content-Type", "application/json"), ("Content-Length", str(len(answer))), *extra]
        out = conn.send(h11.Response(status_code=status, headers=hdrs))
        if answer:
            out += conn.send(h11.Data(data=answer))
        await stream.send_all(out + conn.send(h11.EndOfMessage()))

    def _answer(self, method: bytes, body: bytes) -> tuple[int, bytes, list[tuple[str, str]]]:
        if self.mode == "raw":
            return self.raw_status, self.raw_body, self.raw_headers
        if method != b"POST":
            return 405, b"", []
        if self.mode == "500":
            return 500, b"internal error", []
        if self.mode == "malformed":
            return 200, b'{"Allow": tru', []
        if self.mode == "allow-yes":
            return 200, b'{"Allow":"yes"}', []
        if len(body) > 4096:
            return 400, b"", []
        try:
            req = json.loads(body)
            node = req["NodePublic"]
        except (ValueError, KeyError, TypeError):
            return 400, b"", []
        return 200, json.dumps({"Allow": node in self.allowed}).encode(), []


async def start_verify_server(nursery: trio.Nursery, ssl_context: ssl.SSLContext | None = None) -> VerifyServer:
    server = VerifyServer()
    listeners: list[trio.abc.Listener[trio.abc.Stream]] = list(await trio.open_tcp_listeners(0, host="127.0.0.1"))
    server.port = listeners[0].socket.getsockname()[1]  # type: ignore[attr-defined]
    if ssl_context is not None:
        server.scheme = "https"
        listeners = [trio.SSLListener(lis, ssl_context, https_compatible=True) for lis in listeners]
    nursery.start_soon(trio.serve_listeners, server.handle, listeners)
    return server


@pytest.fixture
async def verify(nursery: trio.Nursery) -> VerifyServer:
    return await start_verify_server(nursery)


@pytest.fixture
def refused_url() -> Iterator[str]:
    """A loopback port that is bound but not listening: connecting is refused, and no race."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/verify"
    sock.close()


@pytest.fixture
def logs() -> Iterator[list[logging.LogRecord]]:
    """Every derpd log record, whatever handlers other tests configured."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("derpd")
    handler = Keep(logging.DEBUG)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def log_text(records: list[logging.LogRecord]) -> str:
    return "\n".join(f"{r.getMessage()} {getattr(r, 'fields', {})}" for r in records)


async def check(adm: Admission, key: bytes = KEY_A, ip: str = "192.0.2.7", **kw: bool) -> Verdict:
    with trio.fail_after(GUARD):
        return await adm.check(key, ip, **kw)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- the Headscale-like server itself ---------------------------------------------------------


async def test_fixture_behaves_like_headscale_verify(verify: VerifyServer) -> None:
    async def raw(request: bytes) -> bytes:
        with trio.fail_after(GUARD):
            stream = await trio.open_tcp_stream("127.0.0.1", verify.port)
            async with stream:
                await stream.send_all(request)
                return await stream.receive_some(65536)

    assert (await raw(b"GET /verify HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")).startswith(b"HTTP/1.1 405")
    big = b"x" * 5000
    head = b"POST /verify HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(big)
    assert (await raw(head + big)).startswith(b"HTTP/1.1 400")


# --- verify URL answers ----------------------------------------------------------------------


async def test_allow(verify: VerifyServer) -> None:
    verify.allow(KEY_A)
    adm = Admission(verify_url=verify.url, timeout=TIMEOUT)
    assert adm.enabled
    assert await check(adm) == Verdict(True, "verify-url allow")
    assert len(verify.requests) == 1
    assert adm.stats.results == {"allowed": 1, "denied": 0, "error": 0}
    assert adm.stats.requests == 1


async def test_deny(verify: VerifyServer) -> None:
    verify.allow(KEY_B)
    adm = Admission(verify_url=verify.url, timeout=TIMEOUT)
    assert await check(adm) == Verdict(False, "verify-url deny")
    assert adm.stats.results == {"allowed": 0, "denied": 1, "error": 0}


@pytest.mark.parametrize("fail_open", [True, False])
async def test_non_200_always_denies_and_is_not_cached(verify: VerifyServer, fail_open: bool) -> None:
    verify.mode = "500"
    adm = Admission(verify_url=verify.url, timeout=TIMEOUT, fail_open=fail_open)
    assert await check(adm) == Verdict(False, "verify-url: HTTP 500")
    assert (await check(adm)).cached is False
    assert len(verify.requests) == 2
    assert adm.stats.denied == 2 and adm.stats.error == 0


async def test_redirect_is_not_followed(verify: VerifyServer) -> None:
    verify.mode = "raw"
    verify.raw_status = 308
    verify.raw_headers = [("Location", "https://elsewhere.example/verify")]
    adm = Admission(verify_url=verify.url, timeout=TIMEOUT)
    v = await check(adm)
    assert (v.allowed, v.reason) == (False, "verify-url: HTTP 308")
    assert "redirect" in v.detail
    assert len(verify.requests) == 1


@pytest.mark.parametrize(
    ("mode", "reason"),
    [("malformed", "verify-url: malformed JSON"), ("allow-yes", "verify-url: Allow is not a bool")],
)
async def test_bad_answers_deny_even_fail_open(verify: VerifyServer, mode: str, reason: str) -> None:
    verify.mode = mode
    verify.allow(KEY_A)
    adm = Admission(verify_url=verify.url, timeout=TIMEOUT, fail_open=True)
    assert await check(adm) == Verdict(False, reason)
    assert adm.stats.results == {"allowed": 0, "denied": 1, "error": 0}


async def test_4kib_body_limit(verify: VerifyServer) -> None:
    """Go's LimitReader(4 KiB) + Decoder: a verdict inside the first 4 KiB counts, one after it cannot."""
    verify.mode = "raw"
    adm = Admission(verify_url=verify.url, timeout=TIMEOUT, cache_ttl=0)
    verify.raw_body = b'{"Allow":true}' + b" " * 10_000
    assert await check(adm) == Verdict(True, "verify-url allow")
    verify.raw_body = b" " * 5000 + b'{"Allow":true}'
    assert await check(adm) == Verdict(False, "verify-url: malformed JSON")


@pytest.mark.parametrize(
    ("body", "allowed", "reason"),
    [
        (b'{"Allow":true}', True, "verify-url allow"),
        (b'  \n{"Allow": true, "Extra": [1, {"x": null}]}', True, "verify-url allow"),
        (b'{"allow":true}', True, "verify-url allow"),  # encoding/json matches names case-insensitively
        (b'{"ALLOW":true}', True, "verify-url allow"),
        (b'{"Allow":true} trailing garbage', True, "verify-url allow"),  # a Decoder reads one value
        (b'{"Allow":true,"allow":false}', False, "verify-url deny"),  # the last match wins
        (b'{"Allow":false,"allow":true}', True, "verify-url allow"),
        (b'{"Allow":true,"Allow":null}', True, "verify-url allow"),  # null leaves the field alone
        (b'{"Allow":false}', False, "verify-url deny"),
        (b"{}", False, "verify-url deny"),
        (b"null", False, "verify-url deny"),
        (b'{"Allow":"yes"}', False, "verify-url: Allow is not a bool"),
        (b'{"Allow":1}', False, "verify-url: Allow is not a bool"),
        (b'{"Allow":"yes","Allow":true}', False, "verify-url: Allow is not a bool"),
        (b'{"Allow":true,"n":NaN}', False, "verify-url: malformed JSON"),
        (b'{"Allow": tru', False, "verify-url: malformed JSON"),
        (b"", False, "verify-url: malformed JSON"),
        (b"\xef\xbb\xbf{}", False, "verify-url: malformed JSON"),  # Go rejects a BOM
        (b"[true]", False, "verify-url: answer is not a JSON object"),
        (b"true", False, "verify-url: answer is not a JSON object"),
        (b'{"Allow":true,"x":' + b"[" * 3000, False, "verify-url: malformed JSON"),
    ],
)
def test_decode_admit_response(body: bytes, allowed: bool, reason: str) -> None:
    assert decode_admit_response(body) == (allowed, reason)


# --- transport failures ------------------------------------------------------------------------


@pytest.mark.parametrize("fail_open", [True, False])
async def test_timeout(verify: VerifyServer, fail_open: bool) -> None:
    verify.mode = "slow"
    adm = Admission(verify_url=verify.url, timeout=TIMEOUT, fail_open=fail_open)
    v = await check(adm)
    assert v.allowed is fail_open
    assert v.reason == ("verify-url unreachable (fail-open)" if fail_open else "verify-url unreachable (fail-closed)")
    assert "timeout" in v.detail
    assert adm.stats.results == {"allowed": 0, "denied": 0, "error": 1}
    assert adm.cache_size == 0


@pytest.mark.parametrize("fail_open", [True, False])
async def test_connection_refused(refused_url: str, fail_open: bool) -> None:
    adm = Admission(verify_url=refused_url, timeout=TIMEOUT, fail_open=fail_open)
    v = await check(adm)
    assert (v.allowed, v.detail) == (fail_open, "connection refused")
    assert adm.stats.error == 1


@pytest.mark.parametrize("fail_open", [True, False])
async def test_closed_before_answer(verify: VerifyServer, fail_open: bool) -> None:
    verify.mode = "close"
    adm = Admission(verify_url=verify.url, timeout=TIMEOUT, fail_open=fail_open)
    v = await check(adm)
    assert v.allowed is fail_open
    assert "unreachable" in v.reason
    assert len(verify.requests) == 1


async def test_body_cut_short_after_200_denies(verify: VerifyServer) -> None:
    """Once a 200 head arrived the controller was reachable: an unusable body is a deny, as in Go."""
    verify.mode = "short-body"
    adm = Admission(verify_url=verify.url, timeout=TIMEOUT, fail_open=True)
    v = await check(adm)
    assert (v.allowed, v.reason) == (False, "verify-url: malformed JSON")
    assert "cut short" in v.detail


async def test_failures_are_never_cached(refused_url: str) -> None:
    adm = Admission(verify_url=refused_url, timeout=TIMEOUT, fail_open=True)
    for _ in range(3):
        assert (await check(adm)).cached is False
    assert adm.stats.requests == 3
    assert adm.cache_size == 0


async def test_unreachable_warning_is_throttled(refused_url: str, logs: list[logging.LogRecord]) -> None:
    clock = FakeClock()
    adm = Admission(verify_url=refused_url, timeout=TIMEOUT, clock=clock)
    for _ in range(5):
        await check(adm)
    clock.now += 60
    await check(adm)
    warnings = [r for r in logs if r.getMessage() == "admission_verify_unreachable"]
    assert len(warnings) == 2
    assert warnings[1].fields["suppressed"] == 4  # type: ignore[attr-defined]


# --- cache -------------------------------------------------------------------------------------


async def test_cache_hit(verify: VerifyServer) -> None:
    verify.allow(KEY_A)
    adm = Admission(verify_url=verify.url, timeout=TIMEOUT)
    assert await check(adm) == Verdict(True, "verify-url allow", cached=False)
    assert await check(adm) == Verdict(True, "verify-url allow", cached=True)
    assert len(verify.requests) == 1
    assert (adm.stats.cache_hits, adm.stats.cache_misses, adm.stats.allowed) == (1, 1, 2)


async def test_negative_cache(verify: VerifyServer) -> None:
    adm = Admission(verify_url=verify.url, timeout=TIMEOUT)
    assert not (await check(adm)).allowed
    verify.allow(KEY_A)  # Headscale learns the node, but the deny is cached until the TTL ends
    assert await check(adm) == Verdict(False, "verify-url deny", cached=True)
    assert len(verify.requests) == 1


async def test_cache_ttl_expiry(verify: VerifyServer) -> None:
    clock = FakeClock()
    verify.allow(KEY_A)
    adm = Admission(verify_url=verify.url, timeout=TIMEOUT, cache_ttl=30, clock=clock)
    await check(adm)
    clock.now += 29.9
    assert (await check(adm)).cached
    clock.now += 0.1
    assert not (await check(adm)).cached
    assert len(verify.requests) == 2


async def test_cache_is_per_key_and_source(verify: VerifyServer) -> None:
    verify.allow(KEY_A, KEY_B)
    adm = Admission(verify_url=verify.url, timeout=TIMEOUT)
    await check(adm, KEY_A, "192.0.2.1")
    await check(adm, KEY_A, "192.0.2.2")
    await check(adm, KEY_B, "192.0.2.1")
    assert len(verify.requests) == 3
    assert (await check(adm, KEY_A, "::ffff:192.0.2.1")).cached  # the same address, mapped


async def test_cache_disabled(verify: VerifyServer) -> None:
    verify.allow(KEY_A)
    adm = Admission(verify_url=verify.url, timeout=TIMEOUT, cache_ttl=0)
    await check(adm)
    assert not (await check(adm)).cached
    assert len(verify.requests) == 2
    assert adm.cache_size == 0


async def test_cache_is_bounded(verify: VerifyServer) -> None:
    verify.allow(KEY_A, KEY_B, KEY_C)
    adm = Admission(verify_url=verify.url, timeout=TIMEOUT, max_cache_entries=2)
    for key in (KEY_A, KEY_B, KEY_C):
        await check(adm, key)
    assert adm.cache_size == 2
    assert (await check(adm, KEY_C)).cached
    assert not (await check(adm, KEY_A)).cached  # the oldest was evicted
    assert len(verify.requests) == 4


async def test_concurrent_checks_share_one_request(verify: VerifyServer) -> None:
    verify.allow(KEY_A)
    verify.gate = trio.Event()
    adm = Admission(verify_url=verify.url, timeout=GUARD)
    verdicts: list[Verdict] = []

    async def one() -> None:
        verdicts.append(await check(adm))

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as n:
            n.start_soon(one)
            n.start_soon(one)
            while len(verify.requests) < 1 or adm.stats.coalesced < 1:
                await trio.sleep(0.001)
            verify.gate.set()
    assert len(verify.requests) == 1
    assert sorted(v.cached for v in verdicts) == [False, True]
    assert all(v.allowed for v in verdicts)


async def test_cancelled_owner_hands_over(verify: VerifyServer) -> None:
    """If the check that owns the request is cancelled, a waiting check asks for itself."""
    verify.allow(KEY_A)
    verify.gate = trio.Event()
    adm = Admission(verify_url=verify.url, timeout=GUARD)
    verdicts: list[Verdict] = []

    async def waiter() -> None:
        verdicts.append(await check(adm))

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as n:
            owner = trio.CancelScope()

            async def owner_task() -> None:
                with owner:
                    await adm.check(KEY_A, "192.0.2.7")

            n.start_soon(owner_task)
            while not verify.requests:
                await trio.sleep(0.001)
            n.start_soon(waiter)
            while adm.stats.coalesced < 1:
                await trio.sleep(0.001)
            owner.cancel()
            while len(verify.requests) < 2:
                await trio.sleep(0.001)
            verify.gate.set()
    assert verdicts == [Verdict(True, "verify-url allow")]


@pytest.mark.parametrize("fail_open", [True, False])
async def test_no_free_slot_decides_by_policy_at_once(verify: VerifyServer, fail_open: bool) -> None:
    """A busy webhook never queues a login: with every slot taken the policy answers at once."""
    verify.allow(KEY_A, KEY_B)
    verify.gate = trio.Event()
    adm = Admission(verify_url=verify.url, timeout=GUARD, max_concurrent=1, fail_open=fail_open)
    how = "fail-open" if fail_open else "fail-closed"
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as n:
            n.start_soon(adm.check, KEY_A, "192.0.2.7")
            while not verify.requests:
                await trio.sleep(0.001)
            start = trio.current_time()
            verdict = await adm.check(KEY_B, "198.51.100.1")  # another source, but no slot at all
            assert trio.current_time() - start < GUARD / 2  # not queued behind the hung request
            assert verdict == Verdict(fail_open, f"verify-url busy ({how})", detail=verdict.detail)
            assert "all 1 verify requests busy" in verdict.detail
            verify.gate.set()
    assert len(verify.requests) == 1
    assert adm.stats.overflow == {"slots_full": 1, "source_busy": 0}
    assert adm.stats.error == 1 and adm.stats.allowed == 1
    assert adm.cache_size == 1  # the real answer is cached; the policy's stand-in is not


async def test_one_source_gets_only_its_share_of_slots(verify: VerifyServer) -> None:
    """Per-source fairness: one address (or IPv6 /64) holds at most max_per_source slots."""
    keys = [bytes([i]) * 32 for i in range(1, 6)]
    verify.allow(*keys)
    verify.gate = trio.Event()
    adm = Admission(verify_url=verify.url, timeout=GUARD, max_concurrent=8, max_per_source=2, fail_open=False)
    assert source_bucket("2001:db8:1:2::99") == source_bucket("2001:db8:1:2:ffff::1") == "2001:db8:1:2::/64"
    verdicts: dict[bytes, Verdict] = {}

    async def login(key: bytes, ip: str) -> None:
        verdicts[key] = await adm.check(key, ip)

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as n:
            n.start_soon(login, keys[0], "2001:db8:1:2::1")
            n.start_soon(login, keys[1], "2001:db8:1:2::2")
            while len(verify.requests) < 2:
                await trio.sleep(0.001)
            await login(keys[2], "2001:db8:1:2::3")  # the same /64: refused at once (fail-closed)
            v = verdicts[keys[2]]
            assert (v.allowed, v.reason, v.cached) == (False, "verify-url busy (fail-closed)", False)
            n.start_soon(login, keys[3], "2001:db8:9::1")  # another /64 still gets a slot
            while len(verify.requests) < 3:
                await trio.sleep(0.001)
            verify.gate.set()
    assert [verdicts[k].allowed for k in (keys[0], keys[1], keys[3])] == [True, True, True]
    assert adm.stats.overflow == {"slots_full": 0, "source_busy": 1}


# --- the request on the wire -------------------------------------------------------------------


async def test_exact_request(verify: VerifyServer) -> None:
    verify.allow(KEY_A)
    url = f"http://127.0.0.1:{verify.port}/admit/derp?tailnet=home"
    adm = Admission(verify_url=url, timeout=TIMEOUT)
    await check(adm, KEY_A, "::ffff:198.51.100.9")
    [req] = verify.requests
    assert req.method == "POST"
    assert req.target == "/admit/derp?tailnet=home"
    expected = b'{"NodePublic":"nodekey:' + KEY_A.hex().encode() + b'","Source":"198.51.100.9"}'
    assert req.body == expected == request_body(KEY_A, "198.51.100.9")
    assert req.headers["host"] == f"127.0.0.1:{verify.port}"
    assert req.headers["content-type"] == "application/json"
    assert req.headers["content-length"] == str(len(expected))
    assert req.headers["connection"] == "close"
    assert "authorization" not in req.headers
    decoded = json.loads(req.body)
    assert decoded == {"NodePublic": public_key_text(KEY_A), "Source": "198.51.100.9"}


async def test_userinfo_becomes_basic_auth_and_is_never_logged(
    verify: VerifyServer, logs: list[logging.LogRecord]
) -> None:
    verify.allow(KEY_A)
    url = f"http://derp:s3cret%21@127.0.0.1:{verify.port}/verify?token=t0ken"
    adm = Admission(verify_url=url, timeout=TIMEOUT)
    assert (await check(adm)).allowed
    assert verify.requests[0].headers["authorization"] == "Basic ZGVycDpzM2NyZXQh"  # derp:s3cret!
    adm.reload()
    verify.mode = "close"
    await check(adm, KEY_B)
    text = log_text(logs) + repr(adm.url) + repr(adm.summary())
    assert "s3cret" not in text and "t0ken" not in text
    assert "admission_verify_unreachable" in text


def test_source_ip_formatting() -> None:
    assert normalize_ip("2001:DB8:0:0::1") == "2001:db8::1"
    assert normalize_ip("::ffff:10.1.2.3") == "10.1.2.3"
    assert normalize_ip("10.1.2.3") == "10.1.2.3"
    assert normalize_ip("not-an-ip") == "not-an-ip"


def test_verify_url_parsing() -> None:
    u = VerifyURL.parse("https://hs.example.com/verify")
    assert (u.host, u.port, u.target, u.host_header) == ("hs.example.com", 443, "/verify", "hs.example.com")
    u = VerifyURL.parse("http://[::1]:8080")
    assert (u.host, u.port, u.target, u.host_header) == ("::1", 8080, "/", "[::1]:8080")
    assert VerifyURL.parse("https://u:p@hs.example.com:8443/v?k=1").display == "https://hs.example.com:8443/v?…"
    for bad in ("ftp://x/verify", "http:///verify", "http://x:99999/", "hs.example.com/verify", "http://x/a b"):
        with pytest.raises(AdmissionError):
            Admission(verify_url=bad)
    with pytest.raises(AdmissionError):
        Admission(verify_url="http://x/", timeout=0)
    with pytest.raises(AdmissionError):
        Admission(verify_url="http://x/", cache_ttl=-1)


# --- https ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def start_https(nursery: trio.Nursery, ca: trustme.CA) -> VerifyServer:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    return await start_verify_server(nursery, ctx)


async def test_https_verify_server(nursery: trio.Nursery, ca: trustme.CA) -> None:
    verify = await start_https(nursery, ca)
    verify.allow(KEY_A)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    adm = Admission(verify_url=verify.url, timeout=TIMEOUT, ssl_context=client_ctx)
    assert await check(adm) == Verdict(True, "verify-url allow")
    assert not (await check(adm, KEY_B)).allowed
    assert verify.requests[0].headers["host"] == f"127.0.0.1:{verify.port}"


@pytest.mark.parametrize("fail_open", [True, False])
async def test_https_untrusted_certificate_is_a_transport_failure(
    nursery: trio.Nursery, ca: trustme.CA, fail_open: bool
) -> None:
    verify = await start_https(nursery, ca)
    verify.allow(KEY_A)
    adm = Admission(verify_url=verify.url, timeout=TIMEOUT, fail_open=fail_open)  # system CAs only
    v = await check(adm)
    assert v.allowed is fail_open
    assert "unreachable" in v.reason and "TLS" in v.detail
    assert not verify.requests


# --- allowlist -----------------------------------------------------------------------------------


def test_parse_allowlist() -> None:
    text = (
        "\ufeff# my tailnet\n"
        "\n"
        f"   nodekey:{KEY_A.hex()}   \r\n"
        f"nodekey:{KEY_B.hex().upper()}  # laptop\n"
        "   # indented comment\n"
        f"\tnodekey:{KEY_A.hex()}\n"
    ).lstrip("\ufeff")
    assert parse_allowlist(text) == frozenset({KEY_A, KEY_B})
    assert parse_allowlist("") == frozenset()


@pytest.mark.parametrize(
    "bad",
    [
        "nodekey:abcd",
        f"{KEY_A.hex()}",
        f"nodekey:{KEY_A.hex()} nodekey:{KEY_B.hex()}",
        f"NODEKEY:{KEY_A.hex()}",
        f"nodekey:{'zz' * 32}",
    ],
)
def test_allowlist_bad_line_names_the_line(bad: str) -> None:
    text = f"# ok\nnodekey:{KEY_A.hex()}\n{bad}\n"
    with pytest.raises(AdmissionError, match=r"line 3: expected nodekey:<64 hex digits>"):
        parse_allowlist(text, "keys.txt")


def test_allowlist_never_echoes_a_private_key() -> None:
    secret = "privkey:" + "ab" * 32
    with pytest.raises(AdmissionError) as info:
        parse_allowlist(f"\n{secret}\n")
    assert "line 2" in str(info.value) and "private key" in str(info.value)
    assert "ab" * 32 not in str(info.value)


async def test_allowlist(tmp_path: Path) -> None:
    path = tmp_path / "allow.txt"
    path.write_text(f"# home\nnodekey:{KEY_A.hex()}\n")
    adm = Admission(allow_keys_file=str(path))
    assert adm.enabled
    assert await check(adm) == Verdict(False, "allowlist not loaded")  # fail closed if load() was skipped
    adm.load()
    assert adm.allowlist_size == 1
    assert await check(adm, KEY_A) == Verdict(True, "allowlist")
    assert await check(adm, KEY_B) == Verdict(False, "not in allowlist")


def test_allowlist_load_errors(tmp_path: Path) -> None:
    with pytest.raises(AdmissionError, match="cannot read allowlist"):
        Admission(allow_keys_file=str(tmp_path / "missing")).load()
    bad = tmp_path / "bad.txt"
    bad.write_text(f"nodekey:{KEY_A.hex()}\nhello\n")
    with pytest.raises(AdmissionError, match=r"bad\.txt: line 2"):
        Admission(allow_keys_file=str(bad)).load()
    bad.write_bytes(b"nodekey:\xff\n")
    with pytest.raises(AdmissionError, match="not UTF-8"):
        Admission(allow_keys_file=str(bad)).load()


async def test_allowlist_reload(tmp_path: Path, logs: list[logging.LogRecord]) -> None:
    path = tmp_path / "allow.txt"
    path.write_text(f"nodekey:{KEY_A.hex()}\n")
    adm = Admission(allow_keys_file=str(path))
    adm.load()
    path.write_text(f"nodekey:{KEY_B.hex()}\nnodekey:{KEY_C.hex()}\n")
    assert adm.reload() is True
    assert not (await check(adm, KEY_A)).allowed
    assert (await check(adm, KEY_B)).allowed
    path.write_text(f"nodekey:{KEY_A.hex()}\noops\n")
    assert adm.reload() is False  # the old list stays in force
    assert (await check(adm, KEY_B)).allowed
    assert not (await check(adm, KEY_A)).allowed
    path.unlink()
    assert adm.reload() is False
    assert (await check(adm, KEY_C)).allowed
    assert (adm.stats.reloads, adm.stats.reload_failures) == (3, 2)
    failed = [r for r in logs if r.getMessage() == "admission_allowlist_reload_failed"]
    assert len(failed) == 2 and "line 2" in failed[0].fields["error"]  # type: ignore[attr-defined]


async def test_reload_forgets_cached_answers(verify: VerifyServer) -> None:
    adm = Admission(verify_url=verify.url, timeout=TIMEOUT)
    assert not (await check(adm)).allowed
    verify.allow(KEY_A)
    assert adm.reload() is True
    assert (await check(adm)).allowed
    assert len(verify.requests) == 2


# --- mechanisms together, and none --------------------------------------------------------------


async def test_both_mechanisms_must_admit(verify: VerifyServer, tmp_path: Path) -> None:
    path = tmp_path / "allow.txt"
    path.write_text(f"nodekey:{KEY_A.hex()}\nnodekey:{KEY_B.hex()}\n")
    verify.allow(KEY_A, KEY_C)
    adm = Admission(verify_url=verify.url, allow_keys_file=str(path), timeout=TIMEOUT)
    adm.load()
    assert await check(adm, KEY_C) == Verdict(False, "not in allowlist")
    assert verify.requests == []  # a key the allowlist refuses never costs an HTTP request
    assert await check(adm, KEY_B) == Verdict(False, "verify-url deny")
    assert await check(adm, KEY_A) == Verdict(True, "allowlist + verify-url allow")
    assert len(verify.requests) == 2
    assert adm.stats.results == {"allowed": 1, "denied": 2, "error": 0}


async def test_nothing_configured_admits_everyone() -> None:
    adm = Admission()
    assert not adm.enabled
    adm.load()
    assert adm.reload() is True
    assert await check(adm) == Verdict(True, "no admission configured")


async def test_mesh_peers_are_never_checked(verify: VerifyServer, tmp_path: Path) -> None:
    path = tmp_path / "allow.txt"
    path.write_text("")
    adm = Admission(verify_url=verify.url, allow_keys_file=str(path), timeout=TIMEOUT, fail_open=False)
    adm.load()
    assert await check(adm, KEY_A, mesh_peer=True) == Verdict(True, "mesh peer")
    assert verify.requests == []
    assert adm.stats.mesh_bypass == 1
    assert adm.stats.results == {"allowed": 0, "denied": 0, "error": 0}
    assert not (await check(adm, KEY_A)).allowed


async def test_key_length_is_checked() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        await Admission().check(b"short", "192.0.2.7")
