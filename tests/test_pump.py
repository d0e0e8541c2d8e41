"""The read pump: one task reads every busy plain and TLS client connection.

Unit tests drive ``ReadPump`` over real socket pairs; the end-to-end tests check that a
node's client connections are pump members, that a rate limit arriving by reload hands a
connection back to its own reader (and back again when the limit goes), and that nothing
is lost on the way.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trustme

from derpd.net.client import DerpClient
from derpd.net.pump import ReadPump, Released
from derpd.proto.frames import FrameType, pack_header
from derpd.server.node import DerpServer

from .conftest import start_server, url_of, wait_for
from .test_edge import HOST, https_url, issue, relay_both_ways, tls13_and_tls12_clients, tls_server, trusting

# --- ReadPump over socket pairs ------------------------------------------------------------


async def test_members_are_called_when_readable_and_errors_reach_their_task() -> None:
    pump = ReadPump()
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    for s in (a, b, c, d):
        s.setblocking(False)
    got: list[bytes] = []

    def read_a() -> int:
        got.append(a.recv(100))
        return len(got[-1])

    def read_c() -> int:
        raise ValueError(f"bad input: {c.recv(100)!r}")

    failed: list[BaseException] = []

    async def member_c() -> None:
        try:
            await pump.serve(c.fileno(), read_c)
        except ValueError as e:
            failed.append(e)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump.run)
        await wait_for(lambda: pump.running, what="the pump to run")
        nursery.start_soon(pump.serve, a.fileno(), read_a)
        nursery.start_soon(member_c)
        await wait_for(lambda: len(pump) == 2, what="two members")
        b.send(b"one")
        d.send(b"boom")
        await wait_for(lambda: got == [b"one"] and failed, what="both reads")
        assert str(failed[0]) == "bad input: b'boom'"
        assert len(pump) == 1  # the failed member left; the other stays
        b.send(b"two")
        await wait_for(lambda: got == [b"one", b"two"], what="the second read")
        nursery.cancel_scope.cancel()
    assert len(pump) == 0
    for s in (a, b, c, d):
        s.close()


async def test_release_and_stop_hand_members_back() -> None:
    pump = ReadPump()
    a, b = socket.socketpair()
    a.setblocking(False)
    outcomes: list[str] = []

    async def member() -> None:
        try:
            await pump.serve(a.fileno(), lambda: 0)
        except Released:
            outcomes.append("released")

    async with trio.open_nursery() as outer:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump.run)
            await wait_for(lambda: pump.running, what="the pump to run")
            nursery.start_soon(member)
            await wait_for(lambda: len(pump) == 1, what="a member")
            pump.release(a.fileno())
            await wait_for(lambda: outcomes == ["released"], what="the release")
            outer.start_soon(member)  # outlives the pump
            await wait_for(lambda: len(pump) == 1, what="the member again")
            nursery.cancel_scope.cancel()  # the pump stops: its members read by themselves
        await wait_for(lambda: outcomes == ["released", "released"], what="the hand-back at stop")
    assert not pump.running
    with pytest.raises(Released):  # a stopped pump takes no one
        await pump.serve(a.fileno(), lambda: 0)
    a.close()
    b.close()


async def test_end_wakes_a_member_with_its_error_even_from_its_own_on_readable() -> None:
    """``end`` is how a connection's close() reaches a reader parked in the pump: from another
    task, or from the member's own ``on_readable`` (a routing step that closes its own
    connection), which may then raise as well: the first error wins and the pump goes on."""
    pump = ReadPump()
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    e, f = socket.socketpair()
    for s in (a, b, c, d, e, f):
        s.setblocking(False)
    outcomes: dict[str, str] = {}

    def read_c() -> int:
        c.recv(100)
        pump.end(c.fileno(), ConnectionError("closed while routing"))
        raise ValueError("and then failed")

    async def member(name: str, sock: socket.socket, on_readable: Callable[[], int]) -> None:
        try:
            await pump.serve(sock.fileno(), on_readable)
        except (ConnectionError, ValueError) as err:
            outcomes[name] = f"{type(err).__name__}: {err}"

    got: list[bytes] = []

    def read_e() -> int:
        got.append(e.recv(100))
        return len(got[-1])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump.run)
        await wait_for(lambda: pump.running, what="the pump to run")
        nursery.start_soon(member, "a", a, lambda: 0)
        nursery.start_soon(member, "c", c, read_c)
        nursery.start_soon(member, "e", e, read_e)
        await wait_for(lambda: len(pump) == 3, what="three members")
        pump.end(a.fileno(), ConnectionError("closed by another task"))
        pump.end(a.fileno(), ConnectionError("a second close"))  # already ended: nothing
        d.send(b"x")
        await wait_for(lambda: len(outcomes) == 2, what="both ends")
        assert outcomes == {
            "a": "ConnectionError: closed by another task",
            "c": "ConnectionError: closed while routing",
        }
        f.send(b"still served")
        await wait_for(lambda: got == [b"still served"], what="the pump to go on")
        assert len(pump) == 1
        nursery.cancel_scope.cancel()
    for s in (a, b, c, d, e, f):
        s.close()


# --- a node's clients ----------------------------------------------------------------------


async def _pumped(server: DerpServer, n: int) -> None:
    await wait_for(lambda: len(server.relay.pump) == n, what=f"{n} pump members")


async def test_plain_clients_are_read_by_the_pump(nursery: trio.Nursery) -> None:
    server = await start_server(nursery)
    a = await DerpClient.connect(url_of(server))
    b = await DerpClient.connect(url_of(server))
    await _pumped(server, 2)
    reads = server.relay.pump.reads
    async with b:
        async with a:
            await relay_both_ways(a, b, b"pumped")
            await a.send_many([(b.public_key, bytes([i]) * 1200) for i in range(64)])
            with trio.fail_after(5):
                for i in range(64):
                    assert (await b.recv_packet()).data == bytes([i]) * 1200
        assert server.relay.pump.reads > reads
        await _pumped(server, 1)  # a left: its member went with it


async def test_tls_clients_are_read_by_the_pump(nursery: trio.Nursery, tmp_path: Path) -> None:
    server, fast, slow = await tls13_and_tls12_clients(nursery, tmp_path)
    async with fast, slow:
        await _pumped(server, 2)
        await relay_both_ways(fast, slow, b"x" * 1200)
        big = [(slow.public_key, bytes([i]) * 16000) for i in range(40)]  # records across reads
        await fast.send_many(big)
        with trio.fail_after(5):
            for _, data in big:
                assert (await slow.recv_packet()).data == data


async def test_a_rate_limit_by_reload_takes_a_client_out_of_the_pump_and_back(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    path = tmp_path / "rate.json"
    path.write_text('{"PerClientRateLimitBytesPerSec": 0}')
    server = await start_server(nursery, rate_config_path=str(path))
    heavy = await DerpClient.connect(url_of(server))
    sink = await DerpClient.connect(url_of(server))
    async with heavy, sink:
        await _pumped(server, 2)
        path.write_text('{"PerClientRateLimitBytesPerSec": 100000, "PerClientRateBurstBytes": 70000}')
        server.reload()
        burst = [(sink.public_key, bytes([i]) * 30_000) for i in range(8)]  # 240 kB at 100 kB/s
        await heavy.send_many(burst)
        with trio.fail_after(20):
            for _, data in burst:
                assert (await sink.recv_packet()).data == data
        assert server.relay.stats.rate_limit_waited > 0  # read by its own task, under the limit
        assert len(server.relay.pump) < 2
        path.write_text('{"PerClientRateLimitBytesPerSec": 0}')
        server.reload()
        await relay_both_ways(heavy, sink, b"unlimited again")
        await relay_both_ways(sink, heavy, b"and pumped")
        await _pumped(server, 2)
        assert server.relay.stats.dropped("queue_head") == 0


# --- hostile input through the pump ----------------------------------------------------------


def _quiet_close(caplog: pytest.LogCaptureFixture, key: bytes) -> str:
    """The one client_disconnected line of ``key``; and nothing at error level, no traceback anywhere."""
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], caplog.text
    closes = [
        r
        for r in caplog.records
        if r.getMessage() == "client_disconnected" and r.fields["key"] == key[:4].hex()  # type: ignore[attr-defined]
    ]
    assert len(closes) == 1
    reason: str = closes[0].fields["reason"]  # type: ignore[attr-defined]
    assert len(reason) < 1100 and reason.isprintable()
    return reason


async def test_a_lying_length_read_by_the_pump_closes_only_that_client(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="derpd")
    server = await start_server(nursery)
    a, b, bad = [await DerpClient.connect(url_of(server)) for _ in range(3)]
    async with a, b, bad:
        await _pumped(server, 3)
        await bad.send_raw(pack_header(FrameType.SEND_PACKET, 0xFFFFFFFF) + b"k" * 100)  # claims 4 GiB
        await wait_for(lambda: len(server.relay.pump) == 2, what="the liar's member to go")
        await relay_both_ways(a, b, b"unaffected")
    assert "protocol error" in _quiet_close(caplog, bad.public_key)


async def test_a_forged_tls_record_read_by_the_pump_closes_only_that_client(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="derpd")
    ca = trustme.CA()
    issue(ca, tmp_path)
    server = await tls_server(nursery, tmp_path)
    url = https_url(server)
    a, b, bad = [await DerpClient.connect(url, cert_name=HOST, ssl_context=trusting(ca)) for _ in range(3)]
    async with a, b:
        await _pumped(server, 3)
        tls = bad.stream
        assert isinstance(tls, trio.SSLStream)
        # An application-data record the server cannot authenticate: OpenSSL's bad record MAC.
        await tls.transport_stream.send_all(b"\x17\x03\x03\x00\x40" + b"\x00" * 64)
        await wait_for(lambda: len(server.relay.pump) == 2, what="the forger's member to go")
        await relay_both_ways(a, b, b"unaffected")
    await trio.aclose_forcefully(tls)
    assert "socket error" in _quiet_close(caplog, bad.public_key)
