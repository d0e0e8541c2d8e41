"""derpd.server.outbox: one connection's output, on a fake transport, with trio's autojump clock."""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing

from derpd.proto.frames import KEEP_ALIVE_FRAME, health_frame, pong_frame, recv_packet_frame
from derpd.server.outbox import RECV_PREFIX_LEN, ConnectionClosed, Outbox, WriteTimeout
from derpd.server.relay import RelayStats

SRC = b"s" * 32


class FakeTransport:
    """Takes ``room`` bytes at once (None: everything); the rest only through send_all, which
    blocks while ``stuck``."""

    remote: tuple[str, int] | None = None

    def __init__(self, room: int | None = None) -> None:
        self.room = room
        self.sent: list[bytes] = []
        self.handed: list[object] = []  # what try_send was given, as given
        self.stuck = False
        self.unstuck = trio.Event()
        self.fail: OSError | None = None
        self.stats = RelayStats()  # what the outbox counts
        self.reasons: list[str] = []  # why it closed the connection

    @property
    def has_backlog(self) -> bool:
        return False

    def try_send(self, data: bytes | bytearray | memoryview) -> int:
        if self.fail is not None:
            raise self.fail
        self.handed.append(data)
        n = len(data) if self.room is None else min(self.room, len(data))
        self.sent.append(bytes(data[:n]))
        return n

    async def send_all(self, data: bytes | memoryview) -> None:
        while self.stuck:
            await self.unstuck.wait()
        self.sent.append(bytes(data))

    async def receive_some(self, max_bytes: int = 0) -> bytes:
        await trio.sleep_forever()
        return b""

    async def aclose(self) -> None:
        pass


def outbox(t: FakeTransport, *, keepalive: float = math.inf, counts_sent: bool = True) -> Outbox:
    return Outbox(t, t.stats, t.reasons.append, write_timeout=2.0, keepalive=keepalive, counts_sent=counts_sent)


def packet(tag: bytes, n: int = 100) -> bytes:
    return recv_packet_frame(SRC, tag * n)


def test_a_batch_keeps_its_order_and_counts() -> None:
    t = FakeTransport()
    box = outbox(t)
    run = bytearray(packet(b"r") + packet(b"r"))
    box.q_other.append(packet(b"q"))
    box.express.append(run)
    box.express_pkts, box.express_bytes = 2, 200
    box.q_disco.append(packet(b"d"))
    box.pong = pong_frame(b"12345678")
    box.ctrl.append(health_frame("h"))
    box.kick()
    assert t.sent == [health_frame("h") + pong_frame(b"12345678") + packet(b"d") + bytes(run) + packet(b"q")]
    st = t.stats
    assert (st.packets_sent, st.bytes_sent, st.sent_pong) == (4, 400, 1)
    assert not box.has_output() and box.bytes_out == len(t.sent[0])


def test_one_run_is_written_without_a_copy() -> None:
    t = FakeTransport()
    box = outbox(t)
    run = bytearray(packet(b"r") * 3)
    box.express.append(run)
    box.express_pkts, box.express_bytes = 3, 300
    box.kick()
    assert t.handed[0] is run


def test_a_mesh_links_packets_are_not_counted_twice() -> None:
    t = FakeTransport()
    box = outbox(t, counts_sent=False)
    box.q_other.append(packet(b"f"))
    box.kick()
    assert t.stats.packets_sent == 0 and box.bytes_out > 0


async def test_the_writer_task_finishes_what_the_kernel_did_not_take(autojump_clock: trio.testing.MockClock) -> None:
    t = FakeTransport(room=10)
    box = outbox(t)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(box.run)
        box.q_other.append(packet(b"a"))
        box.kick()
        assert box.writing and box.has_output()
        box.q_other.append(packet(b"b"))
        box.kick()  # the writer task owns the output now: nothing happens
        assert len(t.sent) == 1
        with trio.fail_after(1):
            await box.flushed()
        assert not box.writing
        assert b"".join(t.sent) == packet(b"a") + packet(b"b")
        st = t.stats
        assert (st.packets_sent, st.bytes_sent) == (2, 200)
        nursery.cancel_scope.cancel()


async def test_a_stuck_write_times_out_and_drops_the_flight(autojump_clock: trio.testing.MockClock) -> None:
    t = FakeTransport(room=0)
    t.stuck = True
    box = outbox(t)
    box.q_other.append(packet(b"a"))
    box.q_disco.append(packet(b"d"))
    box.kick()
    start = trio.current_time()
    with pytest.raises(WriteTimeout, match="write timeout after 2s"):
        await box.run()
    assert trio.current_time() - start == pytest.approx(2.0)
    st = t.stats
    assert st.dropped_packets[("write_error", "other")] == 1
    assert st.dropped_bytes[("write_error", "disco")] == 100
    assert issubclass(WriteTimeout, ConnectionClosed)


async def test_keepalives_follow_the_interval(autojump_clock: trio.testing.MockClock) -> None:
    t = FakeTransport()
    box = outbox(t, keepalive=60.0)
    with trio.move_on_after(130):
        await box.run()
    assert t.sent == [KEEP_ALIVE_FRAME, KEEP_ALIVE_FRAME]
    silent = FakeTransport()
    with trio.move_on_after(1e6):
        await outbox(silent).run()  # math.inf: an outbound mesh link sends none
    assert silent.sent == []


async def test_close_wakes_flushed_and_stops_kicks(autojump_clock: trio.testing.MockClock) -> None:
    t = FakeTransport(room=0)
    t.stuck = True
    box = outbox(t)
    box.q_other.append(packet(b"a"))
    box.kick()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(box.flushed)  # the writer task never finishes: only close() ends the wait
            await trio.sleep(1)
            box.close()
    box.q_other.append(packet(b"b"))
    box.kick()
    assert b"".join(t.sent) == b""


def test_a_write_error_closes_the_connection_and_counts_the_loss() -> None:
    t = FakeTransport()
    t.fail = ConnectionResetError(104, "Connection reset by peer")
    box = outbox(t)
    box.q_other.append(packet(b"a"))
    box.kick()
    assert t.reasons == ["write error: Connection reset by peer"]
    assert t.stats.dropped_packets[("write_error", "other")] == 1


def test_discard_counts_what_never_left() -> None:
    t = FakeTransport()
    box = outbox(t)
    box.q_disco.append(packet(b"d"))
    box.q_other.extend([packet(b"a"), packet(b"b", 50)])
    box.express.append(bytearray(packet(b"r")))
    box.express_pkts, box.express_bytes = 1, 100
    box.ctrl.append(health_frame("x"))
    box.discard("gone_disconnected")
    st = t.stats
    assert st.dropped_packets[("gone_disconnected", "other")] == 3
    assert st.dropped_bytes[("gone_disconnected", "other")] == 250
    assert st.dropped_packets[("gone_disconnected", "disco")] == 1
    assert not box.has_output()
    assert RECV_PREFIX_LEN == 37
