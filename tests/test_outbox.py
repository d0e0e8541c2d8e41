"""derpd.server.outbox: one connection's output, on a fake transport, with trio's autojump clock."""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing

from derpd.proto.frames import KEEP_ALIVE_FRAME, health_frame, pong_frame, recv_packet_frame
from derpd.server.outbox import RECV_PREFIX_LEN, ConnectionClosed, KeepaliveTimer, Outbox, WriteTimeout
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


class Timed(FakeTransport):
    """Notes when (trio time, from ``t0``) each write came."""

    def __init__(self, t0: float) -> None:
        super().__init__()
        self.t0 = t0
        self.at: list[float] = []

    def try_send(self, data: bytes | bytearray | memoryview) -> int:
        self.at.append(trio.current_time() - self.t0)
        return super().try_send(data)


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


async def test_keepalives_follow_each_outboxs_interval(autojump_clock: trio.testing.MockClock) -> None:
    """One timer, each outbox on its own grid; an outbound mesh link (math.inf) is not scheduled."""
    t0 = trio.current_time()
    a, b, silent = Timed(t0), Timed(t0), Timed(t0)
    timer = KeepaliveTimer()
    timer.add(outbox(a, keepalive=60.0), t0)
    timer.add(outbox(b, keepalive=62.5), t0)
    timer.add(outbox(silent), t0)
    assert len(timer) == 2
    with trio.move_on_after(200):
        await timer.run()
    assert a.sent == [KEEP_ALIVE_FRAME] * 3 and b.sent == [KEEP_ALIVE_FRAME] * 3
    assert a.at == [60.0, 120.0, 180.0] and b.at == [62.5, 125.0, 187.5]
    assert silent.sent == [] and timer.sent == 6


def test_keepalive_ticks_stay_on_the_grid_and_skip_what_was_missed() -> None:
    t = FakeTransport()
    timer = KeepaliveTimer()
    box = outbox(t, keepalive=10.0)
    timer.add(box, 0.0)
    assert timer.fire(9.9) == 0 and t.sent == []
    assert timer.fire(10.3) == 1  # late by 0.3 s: the next is still due at 20
    assert timer.fire(19.99) == 0
    assert timer.fire(20.0) == 1
    assert timer.fire(55.0) == 1  # 30 and 40 were missed: one KeepAlive, the next at 65
    assert timer.fire(64.9) == 0 and timer.fire(65.0) == 1
    assert t.sent == [KEEP_ALIVE_FRAME] * 4


def test_a_keepalive_behind_a_full_kernel_goes_out_with_the_writer() -> None:
    t = FakeTransport(room=0)
    timer = KeepaliveTimer()
    box = outbox(t, keepalive=10.0)
    started: list[bool] = []
    box.start_writer = lambda: started.append(True)
    box.q_other.append(packet(b"a"))
    box.kick()  # nothing fits: the writer task is started, once
    timer.add(box, 0.0)
    assert timer.fire(10.0) == 1
    assert started == [True] and box.start_writer is None
    assert box.ctrl == [KEEP_ALIVE_FRAME]  # queued behind the flight, for the writer


def test_an_ended_connection_gets_no_keepalive_and_leaves_the_heap() -> None:
    timer = KeepaliveTimer()
    boxes = [outbox(FakeTransport(), keepalive=10.0) for _ in range(2000)]
    for box in boxes:
        timer.add(box, 0.0)
    timer.add(boxes[0], 0.0)  # already scheduled: once only
    assert len(timer) == 2000
    for box in boxes[:1500]:
        timer.discard(box)
        timer.discard(box)
    # a reconnect storm: marked entries became most of the heap, which was rebuilt
    assert len(timer) == 500 and len(timer._heap) < 2000
    closed = boxes[1999]
    closed.close()
    fired = 0
    while f := timer.fire(10.0):
        fired += f
    assert fired == 500 and timer.sent == 499
    assert all(t.transport.sent == [KEEP_ALIVE_FRAME] for t in boxes[1500:1999])  # type: ignore[attr-defined]
    assert closed.transport.sent == [] and len(timer) == 499  # type: ignore[attr-defined]
    for box in boxes[:1500]:
        assert box.transport.sent == []  # type: ignore[attr-defined]


async def test_an_earlier_keepalive_wakes_the_waiting_timer(autojump_clock: trio.testing.MockClock) -> None:
    t = Timed(trio.current_time())
    timer = KeepaliveTimer()
    timer.add(outbox(FakeTransport(), keepalive=1000.0), trio.current_time())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timer.run)
        await trio.sleep(1)  # the timer waits for 1000 s
        timer.add(outbox(t, keepalive=5.0), trio.current_time())
        await trio.sleep(7)
        nursery.cancel_scope.cancel()
    assert t.at == [6.0]


async def test_the_writer_task_starts_only_when_the_kernel_is_full(autojump_clock: trio.testing.MockClock) -> None:
    t = FakeTransport(room=150)
    box = outbox(t)
    async with trio.open_nursery() as nursery:
        starts: list[int] = []

        def start_writer() -> None:
            starts.append(1)
            nursery.start_soon(box.run)

        box.start_writer = start_writer
        box.q_other.append(packet(b"a"))
        box.kick()  # fits: no task
        assert starts == [] and not box.writing
        t.room = 10
        box.q_other.append(packet(b"b"))
        box.kick()
        assert starts == [1] and box.writing
        with trio.fail_after(1):
            await box.flushed()
        box.q_other.append(packet(b"c"))
        box.kick()  # the writer task stays: woken, not started again
        with trio.fail_after(1):
            await box.flushed()
        assert starts == [1]
        assert b"".join(t.sent) == packet(b"a") + packet(b"b") + packet(b"c")
        nursery.cancel_scope.cancel()


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
