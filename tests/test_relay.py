"""The relay over real sockets on loopback: derpd's own client against its server."""

from __future__ import annotations

import io
import logging
import os
import socket
import struct
from collections.abc import Callable

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from derpd.base import log as derpd_log
from derpd.net.client import (
    ConnectionLost,
    DerpClient,
    HealthMessage,
    PeerGoneMessage,
    PeerPresentMessage,
    ReceivedPacket,
)
from derpd.net.transport import SocketTransport
from derpd.proto.frames import (
    DISCO_MAGIC,
    MAX_PACKET_SIZE,
    ClientInfo,
    FrameReader,
    FrameType,
    PeerGoneReason,
    PeerPresentFlags,
    client_info_frame,
    encode_frame,
    forward_packet_frame,
    pack_header,
    send_packet_frame,
)
from derpd.proto.keys import NodePrivate
from derpd.server.node import DerpServer
from derpd.server.relay import DUP_HEALTH_FANOUT, RelayConfig

from .conftest import Clients, start_server, url_of, wait_for

DISCO = DISCO_MAGIC + b"k" * 32 + b"n" * 24 + b"payload"


async def recv_data(c: DerpClient, timeout: float = 5.0) -> ReceivedPacket:
    with trio.fail_after(timeout):
        return await c.recv_packet()


async def recv_type(c: DerpClient, cls: type, timeout: float = 5.0) -> object:
    with trio.fail_after(timeout):
        while True:
            m = await c.recv()
            if isinstance(m, cls):
                return m


async def expect_closed(c: DerpClient) -> None:
    """The server closes ``c``'s connection (after whatever it still had to say)."""
    with pytest.raises(ConnectionLost), trio.fail_after(5):
        while True:
            await c.recv()


async def assert_relays(a: DerpClient, b: DerpClient) -> None:
    """A bystander pair still works: one packet each way."""
    token = os.urandom(16)
    await a.send(b.public_key, token)
    assert (await recv_data(b)).data == token
    await b.send(a.public_key, token[::-1])
    assert (await recv_data(a)).data == token[::-1]


# --- relaying -----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [100, 1200, MAX_PACKET_SIZE])
async def test_two_clients_relay_both_ways(clients: Clients, server: DerpServer, size: int) -> None:
    a = await clients.connect()
    b = await clients.connect()
    assert a.server_key == server.key.public
    assert a.server_info.version == 2
    for src, dst in ((a, b), (b, a)):
        payload = os.urandom(size)
        await src.send(dst.public_key, payload)
        got = await recv_data(dst)
        assert got.src == src.public_key and got.data == payload
    st = server.relay.stats
    assert st.packets_received == 2 and st.packets_sent == 2
    assert st.bytes_received == st.bytes_sent == 2 * size


async def test_many_packets_batched_arrive_in_order(clients: Clients, server: DerpServer) -> None:
    a = await clients.connect()
    b = await clients.connect()
    sent = [i.to_bytes(4, "big") * 300 for i in range(30)]  # within one queue's depth
    await a.send_many((b.public_key, p) for p in sent)
    got = [(await recv_data(b)).data for _ in sent]
    assert got == sent
    assert server.relay.stats.dropped("queue_head") == 0


async def test_burst_beyond_queue_depth_to_a_reading_peer_loses_nothing(clients: Clients, server: DerpServer) -> None:
    """200 packets in one write: the queue limit is for receivers that fall behind, not bursts."""
    a = await clients.connect()
    b = await clients.connect()
    sent = [i.to_bytes(4, "big") * 300 for i in range(200)]
    await a.send_many((b.public_key, p) for p in sent)
    got = [(await recv_data(b)).data for _ in sent]
    assert got == sent
    assert server.relay.stats.dropped("queue_head") == 0


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.tuples(st.sampled_from(["b", "c", "nobody"]), st.booleans(), st.integers(0, 1500)),
        min_size=1,
        max_size=60,
    ),
    st.lists(st.integers(1, 4000), max_size=6),
)
async def test_any_mix_in_one_write_reaches_each_receiver_in_order(
    sends: list[tuple[str, bool, int]], cuts: list[int]
) -> None:
    """Interleaved destinations, disco packets, unknown keys and pings, written in one go or
    cut anywhere: every receiver gets exactly its packets, each kind in order, nothing dropped."""
    async with trio.open_nursery() as nursery:  # each example runs in its own event loop
        server = await start_server(nursery)
        await _mix_example(server, sends, cuts)
        nursery.cancel_scope.cancel()


async def _mix_example(server: DerpServer, sends: list[tuple[str, bool, int]], cuts: list[int]) -> None:
    url = url_of(server)
    a, b, c = [await DerpClient.connect(url) for _ in range(3)]
    keys = {"b": b.public_key, "c": c.public_key, "nobody": NodePrivate.generate().public}
    wire = b""
    expect: dict[str, list[bytes]] = {"b": [], "c": []}
    for i, (who, disco, size) in enumerate(sends):
        body = (DISCO + i.to_bytes(2, "big")) if disco else i.to_bytes(2, "big") + b"p" * size
        wire += send_packet_frame(keys[who], body)
        if i % 7 == 3:
            wire += encode_frame(FrameType.PING, b"pingpong") + encode_frame(0x77, b"future")
        if who in expect:
            expect[who].append(body)
    pos = 0
    for cut in sorted(cuts):
        await a.send_raw(wire[pos:cut])
        pos = max(pos, min(cut, len(wire)))
    await a.send_raw(wire[pos:])
    for who, receiver in (("b", b), ("c", c)):
        packets = [await recv_data(receiver) for _ in expect[who]]
        assert {p.src for p in packets} <= {a.public_key}
        got = [p.data for p in packets]
        assert all(g.startswith(DISCO_MAGIC) or g[2:] == b"p" * (len(g) - 2) for g in got)
        assert [g for g in got if g.startswith(DISCO_MAGIC)] == [e for e in expect[who] if e.startswith(DISCO_MAGIC)]
        assert [g for g in got if not g.startswith(DISCO_MAGIC)] == [
            e for e in expect[who] if not e.startswith(DISCO_MAGIC)
        ]
    assert server.relay.stats.dropped("queue_head") == 0
    for cl in (a, b, c):
        await cl.aclose()


async def test_peer_gone_disconnected_reaches_everyone_who_received(clients: Clients, server: DerpServer) -> None:
    a = await clients.connect()
    b = await clients.connect()
    c = await clients.connect()
    await a.send(b.public_key, b"to b")
    await recv_data(b)
    await a.send(c.public_key, b"to c")
    await recv_data(c)
    await a.aclose()
    for receiver in (b, c):
        msg = await recv_type(receiver, PeerGoneMessage)
        assert msg == PeerGoneMessage(a.public_key, PeerGoneReason.DISCONNECTED)
    # c never received from b, so b leaving tells nobody; a single PeerGone per (src, receiver).
    assert server.relay.stats.peer_gone_disconnected_frames == 2
    assert not server.relay.seen_by.get(a.public_key)


async def test_not_here_for_disco_to_unknown_key_is_rate_limited(clients: Clients, server: DerpServer) -> None:
    now = 1000.0
    server.relay.clock = lambda: now  # a frozen clock makes the 1/s burst-3 limiter exact
    a = await clients.connect()
    b = await clients.connect()
    nobody = NodePrivate.generate().public
    await a.send_many([(nobody, DISCO)] * 5 + [(nobody, b"not disco")] * 2)
    for _ in range(3):
        assert await recv_type(a, PeerGoneMessage) == PeerGoneMessage(nobody, PeerGoneReason.NOT_HERE)
    await a.ping()  # everything the server had queued for a before its pong has arrived
    assert server.relay.stats.peer_gone_not_here_frames == 3
    st = server.relay.stats
    assert st.dropped_packets[("unknown_dest", "disco")] == 5
    assert st.dropped_packets[("unknown_dest", "other")] == 2
    now += 1.0
    await a.send(nobody, DISCO)
    assert await recv_type(a, PeerGoneMessage) == PeerGoneMessage(nobody, PeerGoneReason.NOT_HERE)
    await assert_relays(a, b)


async def test_ping_pong(clients: Clients, server: DerpServer) -> None:
    a = await clients.connect()
    data = await a.ping(b"\x01\x02\x03\x04\x05\x06\x07\x08")
    assert data == b"\x01\x02\x03\x04\x05\x06\x07\x08"
    # A ping with extra bytes (allowed up to 1000) is answered with its first 8.
    await a.send_raw(encode_frame(FrameType.PING, b"ABCDEFGH" + b"x" * 500))
    msg = await recv_type(a, object)
    assert getattr(msg, "data", None) == b"ABCDEFGH"
    assert server.relay.stats.got_ping == 2 and server.relay.stats.sent_pong == 2


async def test_note_preferred_tracks_home(clients: Clients, server: DerpServer) -> None:
    a = await clients.connect()
    await a.note_preferred(True)
    await a.ping()
    assert server.relay.stats.current_home_connections == 1
    await a.note_preferred(False)
    await a.note_preferred(False)
    await a.ping()
    assert server.relay.stats.current_home_connections == 0


async def test_unknown_frame_types_are_skipped(clients: Clients, server: DerpServer) -> None:
    a = await clients.connect()
    b = await clients.connect()
    await a.send_raw(encode_frame(0x77, b"future" * 1000) + encode_frame(FrameType.PONG, b"12345678"))
    await assert_relays(a, b)
    assert server.relay.stats.unknown_frames == 2


@pytest.mark.parametrize("size", [2 << 20, 4 << 20])
async def test_unknown_frames_of_any_size_are_skipped(clients: Clients, server: DerpServer, size: int) -> None:
    """derper's forward-compatibility rule: a frame type the server does not know is read and thrown
    away as it streams, whatever its length (it used to close the connection over 1 MiB)."""
    a = await clients.connect()
    b = await clients.connect()
    await a.send_raw(pack_header(0x77, size))
    for _ in range(size // (256 << 10)):
        await a.send_raw(b"\xaa" * (256 << 10))
    await assert_relays(a, b)
    assert server.relay.stats.unknown_frames == 1 and server.relay.stats.protocol_errors == 0


async def test_fast_start_path(clients: Clients, server: DerpServer) -> None:
    a = await clients.connect(fast_start=True, server_key=server.key.public)
    b = await clients.connect()
    assert a.http_response is None  # no 101 on the fast path
    await assert_relays(a, b)


# --- duplicate keys ---------------------------------------------------------------------------


async def test_duplicate_key_last_writer_is_active(clients: Clients, server: DerpServer) -> None:
    key = NodePrivate.generate()
    old = await clients.connect(key)
    new = await clients.connect(key)
    sender = await clients.connect()
    st = server.relay.stats
    assert (st.current_dup_client_keys, st.current_dup_client_conns, st.total_dup_client_conns) == (1, 2, 1)
    for c in (old, new):  # both are told, as a DERP region health warning
        health = await recv_type(c, HealthMessage)
        assert "2 connections" in health.problem  # type: ignore[attr-defined]
    await sender.send(key.public, b"first")
    assert (await recv_data(new)).data == b"first"  # the newest connection is active
    await old.ping()  # the old one speaks, so it becomes active again
    await sender.send(key.public, b"second")
    assert (await recv_data(old)).data == b"second"
    await old.aclose()
    await wait_for(lambda: st.current_dup_client_keys == 0, what="dup set to shrink")
    assert await recv_type(new, HealthMessage) == HealthMessage("")  # cleared when alone again
    await sender.send(key.public, b"third")
    assert (await recv_data(new)).data == b"third"
    assert st.current_dup_client_conns == 0
    # One of two connections leaving is not "gone from the region".
    assert st.peer_gone_disconnected_frames == 0


async def test_many_duplicates_of_one_key_tell_only_the_newcomer(clients: Clients, server: DerpServer) -> None:
    """Up to DUP_HEALTH_FANOUT connections each hear of every new duplicate; beyond that only the
    newcomer does, so n logins with one key cost O(n) Health frames (an attacker's loop), not O(n²)."""
    key = NodePrivate.generate()
    conns = [await clients.connect(key) for _ in range(DUP_HEALTH_FANOUT + 3)]
    first = conns[0]
    seen = [(await recv_type(first, HealthMessage)).problem for _ in range(DUP_HEALTH_FANOUT - 1)]  # type: ignore[attr-defined]
    assert [int(p.split()[4]) for p in seen] == list(range(2, DUP_HEALTH_FANOUT + 1))
    last = await recv_type(conns[-1], HealthMessage)
    assert f"{DUP_HEALTH_FANOUT + 3} connections" in last.problem  # type: ignore[attr-defined]
    await first.ping()  # frames are written in order: whatever came before the pong is queued now
    with trio.move_on_after(0.1):
        extra = await first.recv()
        pytest.fail(f"the first connection heard of duplicates beyond the fan-out: {extra}")
    assert server.relay.stats.current_dup_client_conns == DUP_HEALTH_FANOUT + 3


# --- slow and vanished peers -----------------------------------------------------------------------


async def raw_login(port: int, server_pub: bytes, key: NodePrivate | None = None, rcvbuf: int = 0) -> socket.socket:
    """A hand-driven DERP client: upgrade and ClientInfo, then whatever the test does."""
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.setblocking(False)
    ts = trio.socket.from_stdlib_socket(s)
    await ts.connect(("127.0.0.1", port))
    key = key or NodePrivate.generate()
    req = b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n"
    await ts.send(req + client_info_frame(key, server_pub, ClientInfo(version=2)))
    return s


async def read_until_closed(s: socket.socket, timeout: float = 5.0) -> bytes:
    ts = trio.socket.from_stdlib_socket(s)
    data = b""
    with trio.fail_after(timeout):
        while True:
            try:
                chunk = await ts.recv(65536)
            except ConnectionResetError:
                return data
            if not chunk:
                return data
            data += chunk


async def test_stuck_reader_does_not_delay_others_and_is_dropped(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="derpd")
    server = await start_server(nursery, relay=RelayConfig(write_timeout=0.3))
    url = url_of(server)
    stuck_key = NodePrivate.generate()
    stuck = await raw_login(server.port, server.key.public, stuck_key, rcvbuf=4096)
    a = await DerpClient.connect(url)
    b = await DerpClient.connect(url)
    flooder = await DerpClient.connect(url)
    async with a, b, flooder:
        await wait_for(lambda: stuck_key.public in server.relay.clients, what="stuck client registered")
        blob = b"z" * 60000
        # Fill the stuck client's socket buffers and queue, interleaved with a->b traffic
        # that must all arrive while the stuck one is still connected.
        for i in range(20):
            await flooder.send_many([(stuck_key.public, blob)] * 4)
            await a.send(b.public_key, i.to_bytes(2, "big"))
            assert (await recv_data(b)).data == i.to_bytes(2, "big")
        assert server.relay.writer_tasks >= 1  # the stuck client's, in the relay's nursery
        await wait_for(lambda: server.relay.stats.sclient_write_timeouts == 1, what="write timeout")
        await wait_for(lambda: stuck_key.public not in server.relay.clients, what="stuck client dropped")
        await wait_for(lambda: server.relay.writer_tasks == 0, what="its writer task ended with it")
        await assert_relays(a, b)
    stuck.close()
    assert any(
        "write timeout" in r.getMessage() or "write timeout" in str(getattr(r, "fields", "")) for r in caplog.records
    )
    st = server.relay.stats
    lost = st.dropped("gone_disconnected") + st.dropped("queue_head") + st.dropped("write_error")
    assert lost > 0  # what the stuck client never read is accounted for, not silently lost


async def flood_until(sender: DerpClient, dst: bytes, done: Callable[[], bool]) -> None:
    """Send 240 KB bursts to ``dst`` (a client that never reads) until ``done()``: its writer task
    starts once the kernel's buffers for it are full (a few MB). At most 100 bursts."""
    for _ in range(100):
        await sender.send_many([(dst, b"z" * 60000)] * 4)
        if done():
            return


async def test_a_writer_waiting_on_a_full_kernel_ends_when_its_client_leaves(nursery: trio.Nursery) -> None:
    server = await start_server(nursery)
    full_key = NodePrivate.generate()
    full = await raw_login(server.port, server.key.public, full_key, rcvbuf=4096)
    async with await DerpClient.connect(url_of(server)) as flooder:
        await wait_for(lambda: full_key.public in server.relay.clients, what="client registered")
        await flood_until(flooder, full_key.public, lambda: server.relay.writer_tasks > 0)  # kernel full
        await wait_for(lambda: server.relay.writer_tasks == 1, what="a writer task waiting on the kernel")
        full.close()
        await wait_for(lambda: full_key.public not in server.relay.clients, what="client gone")
        await wait_for(lambda: server.relay.writer_tasks == 0, what="its writer task ended")
        # The batch it was writing is counted as lost: as gone_disconnected when the reader saw the
        # reset first (the writer is cancelled), as write_error when the writer's send did.
        st = server.relay.stats
        assert st.dropped("gone_disconnected") + st.dropped("write_error") > 0


async def test_a_bug_in_a_writer_task_ends_only_its_connection(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The writer tasks share the relay's nursery: an unexpected error in one is logged and ends
    its connection, not the relay."""
    caplog.set_level(logging.INFO, logger="derpd")
    server = await start_server(nursery)
    victim_key = NodePrivate.generate()
    victim = await raw_login(server.port, server.key.public, victim_key, rcvbuf=4096)
    victim_port = victim.getsockname()[1]
    real_send_all = SocketTransport.send_all

    async def send_all(self: SocketTransport, data: bytes | bytearray | memoryview) -> None:
        if self.remote is not None and self.remote[1] == victim_port:
            raise RuntimeError("a bug in the writer")
        await real_send_all(self, data)

    monkeypatch.setattr(SocketTransport, "send_all", send_all)
    async with await DerpClient.connect(url_of(server)) as a, await DerpClient.connect(url_of(server)) as b:
        await wait_for(lambda: victim_key.public in server.relay.clients, what="victim registered")
        await flood_until(a, victim_key.public, lambda: victim_key.public not in server.relay.clients)
        await wait_for(lambda: victim_key.public not in server.relay.clients, what="victim closed")
        assert server.relay.writer_tasks == 0
        await assert_relays(a, b)
    victim.close()
    assert any("internal_error" in r.getMessage() for r in caplog.records)


async def test_vanished_peer_times_out_in_handshake(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, relay=RelayConfig(handshake_timeout=0.2))
    s = socket.socket()
    s.setblocking(False)
    ts = trio.socket.from_stdlib_socket(s)
    await ts.connect(("127.0.0.1", server.port))
    await ts.send(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\n\r\n")
    data = await read_until_closed(s)
    assert data.startswith(b"HTTP/1.1 101")
    s.close()
    assert server.relay.stats.handshake_failures == 1
    assert server.relay.stats.current_connections == 0


UPGRADE = b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n"


async def upgraded(port: int) -> trio.socket.SocketType:
    """A raw client that has sent the upgrade and read the 101 and the ServerKey frame."""
    ts = trio.socket.socket()
    await ts.connect(("127.0.0.1", port))
    await ts.send(UPGRADE)
    got = b""
    with trio.fail_after(5):
        while not (got.count(b"\r\n\r\n") and len(got) >= got.index(b"\r\n\r\n") + 4 + 5 + 8 + 32):
            chunk = await ts.recv(4096)
            assert chunk, f"closed before the ServerKey: {got!r}"
            got += chunk
    assert got.startswith(b"HTTP/1.1 101")
    return ts


@pytest.mark.parametrize("first_part", [0, 3, 40])
async def test_a_client_info_that_comes_late_or_in_pieces_still_logs_in(first_part: int, nursery: trio.Nursery) -> None:
    """The login looks for the ClientInfo once, a scheduler turn after the ServerKey, with no
    deadline armed; a ClientInfo not whole by then (late, or its first bytes only) is waited for
    under the handshake deadline, as before."""
    server = await start_server(nursery)
    key = NodePrivate.generate()
    ts = await upgraded(server.port)
    frame = client_info_frame(key, server.key.public, ClientInfo(version=2))
    await trio.sleep(0.05)  # many scheduler turns: the look found nothing
    if first_part:
        await ts.send(frame[:first_part])
        await trio.sleep(0.05)
    await ts.send(frame[first_part:])
    await wait_for(lambda: key.public in server.relay.clients, what="login")
    assert server.relay.stats.handshake_failures == 0
    ts.close()
    await wait_for(lambda: server.relay.stats.current_connections == 0, what="logout")


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_a_client_leaving_before_its_client_info_is_a_handshake_failure(how: str, nursery: trio.Nursery) -> None:
    server = await start_server(nursery)
    ts = await upgraded(server.port)
    if how == "reset":
        ts.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    ts.close()
    await wait_for(lambda: server.relay.stats.handshake_failures == 1, what="the handshake failure")
    assert server.relay.stats.accepts == 1 and server.relay.stats.current_connections == 0


# --- malformed input closes only the offending connection -----------------------------------------

MALFORMED = {
    "note_preferred_two_bytes": encode_frame(FrameType.NOTE_PREFERRED, b"\x01\x01"),
    "send_packet_short": encode_frame(FrameType.SEND_PACKET, b"k" * 31),
    "send_packet_oversized": pack_header(FrameType.SEND_PACKET, 32 + MAX_PACKET_SIZE + 1),
    "known_frame_over_1mib": pack_header(FrameType.NOTE_PREFERRED, (1 << 20) + 1),
    "ping_short": encode_frame(FrameType.PING, b"1234"),
    "ping_too_long": pack_header(FrameType.PING, 1001),
    "watch_conns_without_mesh_key": encode_frame(FrameType.WATCH_CONNS),
    "watch_conns_with_payload": encode_frame(FrameType.WATCH_CONNS, b"x"),
    "close_peer_without_mesh_key": encode_frame(FrameType.CLOSE_PEER, b"k" * 32),
    "forward_without_mesh_key": encode_frame(FrameType.FORWARD_PACKET, b"k" * 70),
    "forward_run_without_mesh_key": encode_frame(FrameType.FORWARD_PACKET, b"k" * 70) * 3,
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
async def test_malformed_frame_closes_only_that_connection(
    name: str, clients: Clients, server: DerpServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="derpd")
    a = await clients.connect()
    b = await clients.connect()
    bad = await clients.connect()
    await a.send(bad.public_key, b"hello")  # so bad leaving sends a PeerGone to nobody it received from
    await recv_data(bad)
    await bad.send_raw(MALFORMED[name])
    await expect_closed(bad)
    await assert_relays(a, b)
    assert server.relay.stats.current_connections == 2
    closes = [
        r
        for r in caplog.records
        if r.getMessage() == "client_disconnected" and r.fields["key"] == bad.public_key[:4].hex()
    ]  # type: ignore[attr-defined]
    assert len(closes) == 1
    reason = closes[0].fields["reason"]  # type: ignore[attr-defined]
    assert "protocol error" in reason or "insufficient permissions" in reason
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], caplog.text


HANDSHAKE_FAULTS = {
    "bad_json": lambda srv, key: encode_frame(FrameType.CLIENT_INFO, key.public + key.seal_to(srv, b"{not json")),
    "wrong_server_key": lambda srv, key: client_info_frame(key, NodePrivate.generate().public, ClientInfo(version=2)),
    "first_frame_not_client_info": lambda srv, key: send_packet_frame(key.public, b"x"),
    "client_info_too_long": lambda srv, key: pack_header(FrameType.CLIENT_INFO, (256 << 10) + 1),
    "client_info_short": lambda srv, key: encode_frame(FrameType.CLIENT_INFO, b"k" * 40),
    "json_wrong_type": lambda srv, key: encode_frame(
        FrameType.CLIENT_INFO, key.public + key.seal_to(srv, b'{"version":"two"}')
    ),
    "json_nested_2000": lambda srv, key: encode_frame(
        FrameType.CLIENT_INFO, key.public + key.seal_to(srv, b"[" * 2000 + b"]" * 2000)
    ),
    "json_nested_in_unknown_field": lambda srv, key: encode_frame(
        FrameType.CLIENT_INFO, key.public + key.seal_to(srv, b'{"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    ),
}


@pytest.mark.parametrize("name", sorted(HANDSHAKE_FAULTS))
async def test_bad_handshake_is_refused(
    name: str, clients: Clients, server: DerpServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="derpd")
    a = await clients.connect()
    b = await clients.connect()
    key = NodePrivate.generate()
    s = socket.socket()
    s.setblocking(False)
    ts = trio.socket.from_stdlib_socket(s)
    await ts.connect(("127.0.0.1", server.port))
    req = b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\n\r\n"
    await ts.send(req + HANDSHAKE_FAULTS[name](server.key.public, key))
    data = await read_until_closed(s)
    s.close()
    reader = FrameReader()
    reader.feed(data[data.index(b"\r\n\r\n") + 4 :])
    assert [t for t, _ in reader.read_frames()] == [FrameType.SERVER_KEY]  # no ServerInfo
    assert server.relay.stats.handshake_failures == 1
    assert key.public not in server.relay.clients
    [line] = [r for r in caplog.records if r.getMessage() == "handshake_failed"]
    assert line.levelno == logging.INFO and not line.exc_info  # one line, never a traceback
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    await assert_relays(a, b)


async def test_hostile_client_info_costs_one_sampled_line(
    server: DerpServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A flood of ClientInfo boxes anyone can seal ([ x2000, a 200 KB AppName of control characters):
    one info line per interval with the count, the rest at debug, every line short and escaped. (Before:
    a 2.9 KB error-level traceback per nested attempt, and the AppName raw in a 200,110-byte line.)"""
    caplog.set_level(logging.DEBUG, logger="derpd")
    stream = io.StringIO()
    derpd_log.setup("debug", stream)
    try:
        app = "\x00\x1b[2J\r\n" + "A" * 200_000
        for i in range(40):
            key = NodePrivate.generate()
            if i % 2:
                hello = client_info_frame(key, server.key.public, ClientInfo(version=2, app_name=app))
            else:
                hello = encode_frame(
                    FrameType.CLIENT_INFO, key.public + key.seal_to(server.key.public, b"[" * 2000 + b"]" * 2000)
                )
            s = await trio.open_tcp_stream("127.0.0.1", server.port)
            await s.send_all(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\n\r\n" + hello)
            if i % 2:
                await wait_for(lambda k=key.public: k in server.relay.keys, what="the AppName client")  # type: ignore[misc]
            await s.aclose()
        await wait_for(lambda: server.relay.stats.handshake_failures == 20, what="20 failed handshakes")
    finally:
        derpd_log.setup("info")
    text = stream.getvalue()
    lines = text.splitlines()
    assert max(map(len, lines)) < 600 and not any(c in text for c in "\x00\x1b\r")
    assert "level=error" not in text and "Traceback" not in text
    infos = [line for line in lines if "level=info event=handshake_failed" in line]
    assert len(infos) == 1  # sampled: one info line in the interval, the other 19 at debug
    assert len([line for line in lines if "event=handshake_failed" in line]) == 20 + 1
    assert len(text) / 40 < 1000  # bytes of log per hostile login, debug level included
    [connected] = [line for line in lines if "event=client_connected" in line][:1]
    assert "app=\\x00\\x1b[2J\\r\\nAAAA" in connected and connected.endswith("A…[+199943]")


# --- mesh-key clients -------------------------------------------------------------------------------


async def test_mesh_watcher_forward_and_close_peer(nursery: trio.Nursery) -> None:
    mesh_key = os.urandom(32)
    server = await start_server(nursery, mesh_key=mesh_key)
    url = url_of(server)
    a = await DerpClient.connect(url)
    watcher = await DerpClient.connect(url, mesh_key=mesh_key)
    await watcher.watch_conns()
    flood = {(await recv_type(watcher, PeerPresentMessage)).present for _ in range(2)}  # type: ignore[attr-defined]
    assert {p.key for p in flood} == {a.public_key, watcher.public_key}
    flags = {p.key: p.flags for p in flood}
    assert flags[a.public_key] == PeerPresentFlags.IS_REGULAR
    assert flags[watcher.public_key] == PeerPresentFlags.IS_MESH_PEER
    ip = {p.key: p for p in flood}[a.public_key]
    assert ip.ip16 == b"\x00" * 10 + b"\xff\xff" + bytes([127, 0, 0, 1])

    c = await DerpClient.connect(url, is_prober=True)
    present = (await recv_type(watcher, PeerPresentMessage)).present  # type: ignore[attr-defined]
    assert present.key == c.public_key and present.flags == PeerPresentFlags.IS_PROBER
    await c.aclose()
    assert await recv_type(watcher, PeerGoneMessage) == PeerGoneMessage(c.public_key, PeerGoneReason.DISCONNECTED)

    fake_src = NodePrivate.generate().public
    await watcher.forward_packet(fake_src, a.public_key, b"via mesh")
    got = await recv_data(a)
    assert (got.src, got.data) == (fake_src, b"via mesh")
    assert server.relay.stats.packets_forwarded_in == 1

    nobody = NodePrivate.generate().public
    await watcher.forward_packet(fake_src, nobody, b"lost")
    await watcher.ping()
    assert server.relay.stats.dropped_packets[("unknown_dest_on_fwd", "other")] == 1

    await watcher.close_peer(a.public_key)
    await expect_closed(a)
    assert await recv_type(watcher, PeerGoneMessage) == PeerGoneMessage(a.public_key, PeerGoneReason.DISCONNECTED)
    await watcher.aclose()


async def test_runs_of_forwarded_packets_arrive_whole_and_in_order(nursery: trio.Nursery) -> None:
    """A mesh peer's ForwardPackets in one write: runs with one source and destination (packet
    sizes changing within them), a disco packet, other sources and an unknown destination among
    them. The receiver gets every packet with its source, in order (disco has its own queue, as
    in the reference), and every ForwardPacket is counted."""
    mesh_key = os.urandom(32)
    server = await start_server(nursery, mesh_key=mesh_key)
    url = url_of(server)
    a = await DerpClient.connect(url)
    watcher = await DerpClient.connect(url, mesh_key=mesh_key)
    s1, s2, nobody = (NodePrivate.generate().public for _ in range(3))
    frames: list[tuple[bytes, bytes, bytes]] = []
    for i in range(200):
        src = s2 if 80 <= i < 90 else s1
        dst = nobody if 120 <= i < 125 else a.public_key
        size = 1200 if i % 50 < 30 else 64 + i
        frames.append((src, dst, i.to_bytes(2, "big") + bytes([i % 251]) * size))
        if i == 40:
            frames.append((s1, a.public_key, DISCO))
    await watcher.send_raw(b"".join(forward_packet_frame(*f) for f in frames))
    expect = [(src, pkt) for src, dst, pkt in frames if dst == a.public_key]
    got = [await recv_data(a) for _ in expect]
    got_pairs = [(g.src, g.data) for g in got]
    assert [p for p in got_pairs if p[1] == DISCO] == [(s1, DISCO)]
    assert [p for p in got_pairs if p[1] != DISCO] == [p for p in expect if p[1] != DISCO]
    await watcher.ping()
    st = server.relay.stats
    assert st.packets_forwarded_in == len(frames)
    assert st.dropped_packets[("unknown_dest_on_fwd", "other")] == 5
    assert st.packets_sent == len(expect)
    await a.aclose()
    await watcher.aclose()


async def test_runs_forwarded_to_a_receiver_that_is_behind_are_queued_and_dropped_oldest(nursery: trio.Nursery) -> None:
    """A mesh peer's runs for a receiver that stopped reading go through its bounded queue,
    one packet at a time, and the oldest are dropped and counted, as for local senders."""
    mesh_key = os.urandom(32)
    server = await start_server(nursery, mesh_key=mesh_key)
    watcher = await DerpClient.connect(url_of(server), mesh_key=mesh_key)
    key = NodePrivate.generate()
    stuck = await raw_login(server.port, server.key.public, key, rcvbuf=4096)
    await wait_for(lambda: key.public in server.relay.clients, what="registration")
    src = NodePrivate.generate().public
    blob = b"q" * 60000
    for _ in range(10):
        await watcher.send_raw(forward_packet_frame(src, key.public, blob) * 10)
    await watcher.ping()
    st = server.relay.stats
    assert st.packets_forwarded_in == 100
    assert st.dropped_packets[("queue_head", "other")] > 0
    assert st.dropped_bytes[("queue_head", "other")] == 60000 * st.dropped_packets[("queue_head", "other")]
    assert len(server.relay.clients[key.public].outbox.q_other) <= 32
    stuck.close()
    await watcher.aclose()


async def test_wrong_mesh_key_is_not_a_mesh_peer(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, mesh_key=os.urandom(32))
    c = await DerpClient.connect(url_of(server), mesh_key=os.urandom(32))
    async with c:
        await c.watch_conns()
        await expect_closed(c)


async def test_queue_overflow_drops_oldest(clients: Clients, server: DerpServer) -> None:
    """Beyond 32 queued packets for one destination, the oldest are dropped and counted."""
    a = await clients.connect()
    key = NodePrivate.generate()
    stuck = await raw_login(server.port, server.key.public, key, rcvbuf=4096)
    await wait_for(lambda: key.public in server.relay.clients, what="registration")
    blob = b"q" * 60000
    for _ in range(10):
        await a.send_many([(key.public, blob)] * 10)
    await a.ping()
    st = server.relay.stats
    assert st.dropped_packets[("queue_head", "other")] > 0
    assert st.dropped_bytes[("queue_head", "other")] == 60000 * st.dropped_packets[("queue_head", "other")]
    conn = server.relay.clients[key.public]
    assert len(conn.outbox.q_other) <= 32
    stuck.close()


async def test_churn_of_bad_and_vanishing_clients_leaks_nothing(server: DerpServer) -> None:
    """Sockets, tasks and registry entries all come back after every kind of bad ending."""
    url = url_of(server)
    anchor = await DerpClient.connect(url)
    fds_before = len(os.listdir("/proc/self/fd"))
    tasks_before = len(trio.lowlevel.current_root_task().child_nurseries[0].child_tasks)
    for i in range(12):
        c = await DerpClient.connect(url)
        await c.send(anchor.public_key, b"x")
        kind = i % 4
        if kind == 0:  # vanish with a TCP reset in the middle of a frame
            await c.send_raw(pack_header(FrameType.SEND_PACKET, 1000) + b"partial")
            c.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            await c.aclose()
        elif kind == 1:  # malformed frame
            await c.send_raw(encode_frame(FrameType.NOTE_PREFERRED, b""))
            await expect_closed(c)
            await c.aclose()
        elif kind == 2:  # plain close
            await c.aclose()
        else:  # a handshake sealed to the wrong key
            await c.aclose()
            s = await raw_login(server.port, NodePrivate.generate().public)
            await read_until_closed(s)
            s.close()
    await wait_for(lambda: server.relay.stats.current_connections == 1, what="connections to unwind")
    await wait_for(lambda: len(os.listdir("/proc/self/fd")) <= fds_before, what="file descriptors to be closed")
    root = trio.lowlevel.current_root_task().child_nurseries[0]
    await wait_for(lambda: len(root.child_tasks) <= tasks_before, what="connection tasks to finish")
    relay = server.relay
    assert set(relay.clients) == set(relay.keys) == {anchor.public_key}
    assert set(relay.seen_by) <= {anchor.public_key} and not relay.watchers
    await anchor.ping()
    await anchor.aclose()
