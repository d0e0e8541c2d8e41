"""The output side of one connection: what waits to be written, and the task that writes it.

The relay routes where it reads (the read pump, or a connection's own reader task): while it routes
a read's worth of frames (``RelayServer.handle_frames``), it appends to the outboxes of the destinations, marks
each one it touched, and at the end of that batch asks each to ``kick``: write everything queued
in one non-blocking send. A destination whose kernel buffer is full hands the rest to its own
writer task (``run``), which waits, under the write deadline, so that no reader ever waits for a
slow receiver. The writer task starts the first time it is needed (most connections never fill
their kernel buffer, and starting a task per connection was a good part of what a login cost),
then stays for the connection. KeepAlive frames come from one ``KeepaliveTimer`` for the whole
relay, which queues them and kicks like any other writer. Everything runs on one trio thread; who
"owns" a field below means who may change it, knowing that nobody else does until it next awaits
(derper's ``sclient`` says the same of its fields, for goroutines).

The order of a batch is fixed: control frames, the pong, disco packets, packets written straight
through (runs, ``express``), then the queue. Queues are bounded by the caller (the relay's drop
policy); control frames are never dropped.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable
from itertools import count
from typing import Final, Protocol

import trio

from derpd.net.transport import Transport
from derpd.proto.frames import FRAME_HEADER_LEN, KEEP_ALIVE_FRAME
from derpd.proto.keys import KEY_LEN

RECV_PREFIX_LEN = FRAME_HEADER_LEN + KEY_LEN  # a RecvPacket's header and source key
WRITE_SLICE = 64 * 1024  # each slice of a batch must be accepted within the write timeout


class ConnectionClosed(Exception):
    """A connection ends; the message is the reason logged."""


class WriteTimeout(ConnectionClosed):
    pass


class Counters(Protocol):
    """The relay-wide counters an outbox adds to (``derpd.server.relay.RelayStats``)."""

    sent_pong: int
    packets_sent: int
    bytes_sent: int

    def drop(self, reason: str, disco: bool, nbytes: int, packets: int = 1) -> None: ...


class Flight:
    """The batch being written: its unsent tail, and the packets it carries (disco and other,
    count and data bytes), counted as sent once it is on the wire or as dropped if it is lost.
    One per outbox, reused: taking a batch must not allocate more than the batch itself."""

    __slots__ = ("data", "disco_bytes", "disco_packets", "other_bytes", "other_packets")

    def __init__(self) -> None:
        self.data: memoryview | None = None  # what the kernel did not take yet (the writer's)
        self.disco_packets = 0
        self.disco_bytes = 0
        self.other_packets = 0
        self.other_bytes = 0


class Outbox:
    """Everything waiting to be written to one connection, and its writer task (``run``).

    ``keepalive``: seconds between KeepAlive frames, sent by the relay's ``KeepaliveTimer``
    (``math.inf``: none, for an outbound mesh link, whose peer sends them). ``counts_sent``: add
    packets written to ``packets_sent`` (a mesh link's ForwardPackets were counted when routed).
    ``close``: ends the connection (a write error in ``kick``).
    """

    __slots__ = (
        "_close",
        "_idle",
        "_lot",
        "bytes_out",
        "closed",
        "counts_sent",
        "ctrl",
        "dirty",
        "express",
        "express_bytes",
        "express_pkts",
        "flight",
        "keepalive",
        "keepalive_scheduled",
        "pong",
        "q_disco",
        "q_other",
        "start_writer",
        "stats",
        "transport",
        "write_timeout",
        "writing",
    )

    def __init__(
        self,
        transport: Transport,
        stats: Counters,
        close: Callable[[str], None],
        *,
        write_timeout: float,
        keepalive: float,
        counts_sent: bool = True,
    ) -> None:
        # Fixed at creation.
        self.transport = transport
        self.stats = stats
        self._close = close
        self.write_timeout = write_timeout  # per slice of a write; 0: none
        self.keepalive = keepalive
        self.counts_sent = counts_sent

        # Queued by whichever task routes (RelayServer.handle_frames and what it calls),
        # and by the relay's bookkeeping (PeerGone, PeerPresent, Health, Restarting); taken all at
        # once by whoever writes next: kick() in that same task, or the writer task while `writing`.
        self.ctrl: list[bytes | bytearray] = []  # PeerGone, PeerPresent, KeepAlive, ServerInfo, Health: never dropped
        self.pong: bytes | None = None  # one pending pong, as the reference's 1-slot channel
        self.q_disco: deque[bytes] = deque()  # RecvPacket frames, bounded by the relay
        self.q_other: deque[bytes] = deque()
        # RecvPacket runs written straight through for a receiver that is keeping up.
        self.express: list[bytes | bytearray] = []
        self.express_pkts = 0
        self.express_bytes = 0

        # The routing task, within one handle_frames call (set when touched, cleared at its kick).
        self.dirty = False

        # Set by kick() (the routing task) when the kernel is full; cleared only by the writer task
        # once nothing is left. While set, the writer task owns the transport's output and
        # `flight`; kick() writes nothing.
        self.writing = False
        # Starts the writer task (``run``, in the relay's nursery): set by the connection while it
        # runs, and called (then forgotten) by the first kick() that needs it. Until then the
        # connection has no writer task; afterwards kick() wakes the one it has.
        self.start_writer: Callable[[], None] | None = None
        # In the KeepaliveTimer's schedule (the timer's, and the connection's when it ends).
        self.keepalive_scheduled = False
        # Whoever owns the output: kick() while not `writing`, the writer task while it is.
        self.flight = Flight()
        self.bytes_out = 0

        # Set once, by the connection's close() (any task): nothing more is written.
        self.closed = False

        # Made by the first that needs one (most connections never do): the writer task waits
        # in `_lot` for work, flushed() in `_idle` for the writer to finish.
        self._lot: trio.lowlevel.ParkingLot | None = None
        self._idle: trio.lowlevel.ParkingLot | None = None

    # --- queueing (the routing task) --------------------------------------------------------

    def touch(self, touched: list[Outbox]) -> None:
        """Mark this outbox to be kicked once the current batch is routed."""
        if not self.dirty:
            self.dirty = True
            touched.append(self)

    @property
    def keeping_up(self) -> bool:
        """Nothing waits and nothing is being written: a run can go straight through (``add_run``)
        without passing the queues' drop policy."""
        return not (self.closed or self.writing or self.q_other)

    def add_run(self, seg: bytes | bytearray, packets: int, packet_bytes: int, touched: list[Outbox]) -> None:
        """Queue ``seg``, ``packets`` whole frames (``packet_bytes`` of packets in them), to be
        written as they are, after what is queued one by one before it (see ``_take_batch``)."""
        self.express.append(seg)
        self.express_pkts += packets
        self.express_bytes += packet_bytes
        if not self.dirty:
            self.dirty = True
            touched.append(self)

    def control(self, frame: bytes) -> None:
        """Queue a control frame (never dropped) and write it now if the output is idle."""
        self.ctrl.append(frame)
        self.kick()

    def has_output(self) -> bool:
        """Anything still to be written (queued, or a batch in flight)."""
        return bool(self.writing or self.ctrl or self.pong or self.q_disco or self.q_other or self.express)

    def discard(self, reason: str) -> None:
        """The connection is gone: count the packets still queued as dropped, forget the frames."""
        st = self.stats
        for q, disco in ((self.q_disco, True), (self.q_other, False)):
            if q:
                st.drop(reason, disco, sum(map(len, q)) - len(q) * RECV_PREFIX_LEN, len(q))
                q.clear()
        if self.express_pkts:
            st.drop(reason, False, self.express_bytes, self.express_pkts)
            self.express.clear()
            self.express_pkts = self.express_bytes = 0
        self.ctrl.clear()

    def close(self) -> None:
        """Write nothing more (the connection's close() calls this); wakes flushed()."""
        self.closed = True
        self._wake_idle()

    def _wake_idle(self) -> None:
        if self._idle is not None:
            self._idle.unpark_all()

    # --- writing ------------------------------------------------------------------------------

    def _take_batch(self) -> bytes | bytearray | None:
        """Everything waiting as one buffer: control frames, the pong, disco packets, packets
        written straight through, then the queue, in that order; its packets become the flight."""
        qd = self.q_disco
        qo = self.q_other
        express = self.express
        if not (express or self.ctrl or self.pong or qd or qo):
            return None
        nd = len(qd)
        no = len(qo) + self.express_pkts
        f = self.flight
        f.disco_packets = nd
        f.disco_bytes = sum(map(len, qd)) - nd * RECV_PREFIX_LEN if nd else 0
        f.other_packets = no
        f.other_bytes = self.express_bytes + (sum(map(len, qo)) - len(qo) * RECV_PREFIX_LEN if qo else 0)
        if len(express) == 1 and not (self.ctrl or self.pong or qd or qo):
            data: bytes | bytearray = express[0]  # the common case: one run, no copy
        else:
            parts = self.ctrl
            self.ctrl = []
            if self.pong is not None:
                parts.append(self.pong)
                self.pong = None
                self.stats.sent_pong += 1
            parts.extend(qd)
            parts.extend(express)
            parts.extend(qo)
            data = b"".join(parts)
            qd.clear()
            qo.clear()
        express.clear()
        self.express_pkts = self.express_bytes = 0
        return data

    def _batch_done(self, nbytes: int) -> None:
        f = self.flight
        if f.disco_packets or f.other_packets:
            if self.counts_sent:
                st = self.stats
                st.packets_sent += f.disco_packets + f.other_packets
                st.bytes_sent += f.disco_bytes + f.other_bytes
            f.disco_packets = f.other_packets = 0
        self.bytes_out += nbytes

    def _batch_failed(self, reason: str = "write_error") -> None:
        f = self.flight
        st = self.stats
        if f.disco_packets:
            st.drop(reason, True, f.disco_bytes, f.disco_packets)
        if f.other_packets:
            st.drop(reason, False, f.other_bytes, f.other_packets)
        f.disco_packets = f.other_packets = 0

    def kick(self) -> None:
        """Write what is queued now, without waiting; leave the rest to the writer task."""
        if self.writing or self.closed:
            return
        data = self._take_batch()
        if data is None:
            return
        try:
            n = self.transport.try_send(data)
        except OSError as e:
            self._batch_failed()
            self._close(f"write error: {e.strerror or e}")
            return
        if n == len(data) and not self.transport.has_backlog:
            self._batch_done(n)
            return
        # The kernel is full: the writer task finishes this batch (and any TLS backlog).
        self.bytes_out += n
        self.flight.data = memoryview(data)[n:]
        self.writing = True
        start = self.start_writer
        if start is not None:
            self.start_writer = None
            start()
        elif self._lot is not None:
            self._lot.unpark()

    async def _send(self, data: bytes | bytearray | memoryview) -> None:
        timeout = self.write_timeout
        view = memoryview(data)
        send_all = self.transport.send_all
        for start in range(0, max(len(view), 1), WRITE_SLICE):  # an empty write flushes a backlog
            piece = view[start : start + WRITE_SLICE]
            if timeout > 0:
                with trio.move_on_after(timeout) as scope:
                    await send_all(piece)
                if scope.cancelled_caught:
                    raise WriteTimeout(f"write timeout after {timeout:g}s")
            else:
                await send_all(piece)

    async def run(self) -> None:
        """The writer task: finishes what kick() could not write, then waits for the next such
        batch. Started on the first one (``start_writer``). Raises WriteTimeout, or the
        transport's error, when a write fails."""
        lot = self._lot = trio.lowlevel.ParkingLot()
        flight = self.flight
        try:
            while True:
                if not self.writing:
                    await lot.park()
                    continue
                try:
                    while True:
                        data: bytes | bytearray | memoryview | None = flight.data
                        flight.data = None
                        if data is None:
                            data = self._take_batch()
                            if data is None:
                                break
                        await self._send(data)
                        self._batch_done(len(data))
                except trio.Cancelled:
                    self._batch_failed("gone_disconnected")
                    raise
                except BaseException:
                    self._batch_failed()
                    raise
                self.writing = False
                self._wake_idle()
        finally:
            self._wake_idle()

    async def flushed(self) -> None:
        """Wait until the writer task has written everything it had (or the connection closed).
        What kick() could write at once never waits; bound this with the caller's cancel scope."""
        while self.writing and not self.closed:
            if self._idle is None:
                self._idle = trio.lowlevel.ParkingLot()
            await self._idle.park()


KEEPALIVE_BATCH: Final = 512  # KeepAlives sent before the timer yields to the rest of the relay


class KeepaliveTimer:
    """Every connection's KeepAlive frames, from one task (``run``) for the whole relay.

    Why: a timer per connection means a task per connection waiting on it, a few KB each and
    the cost of starting one at every login. Here each outbox has one entry in a heap ordered
    by when its next KeepAlive is due. A KeepAlive is queued as a control frame and kicked, so
    it is written at once, or by the writer task behind what is already waiting. Each outbox
    keeps its own interval (the relay draws its jitter once per connection), and its ticks
    stay on its own grid (due, due + interval, ...) as a Go ticker's do; a tick the timer is
    late for by more than an interval is skipped, not sent twice.

    A connection that ends is only marked (``discard``); its entry leaves when it comes up,
    or when marked entries are most of the heap (a reconnect storm), which rebuilds it.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Outbox]] = []
        self._seq = count()  # ties never compare outboxes
        self._discarded = 0  # entries in the heap whose outbox was discarded
        self._wake: trio.CancelScope | None = None  # the run task's wait, while it waits
        self.sent = 0  # KeepAlive frames queued

    def __len__(self) -> int:
        """Outboxes scheduled."""
        return len(self._heap) - self._discarded

    def add(self, box: Outbox, now: float) -> None:
        """Schedule ``box``'s KeepAlives, the first one ``box.keepalive`` seconds after ``now``
        (once per connection: at login, before anything can discard it)."""
        if box.keepalive == math.inf or box.keepalive_scheduled:
            return
        box.keepalive_scheduled = True
        self._push(now + box.keepalive, box)

    def discard(self, box: Outbox) -> None:
        """``box``'s connection ended: send it nothing more."""
        if not box.keepalive_scheduled:
            return
        box.keepalive_scheduled = False
        self._discarded += 1
        heap = self._heap
        if self._discarded > KEEPALIVE_BATCH and self._discarded * 2 > len(heap):
            heap[:] = [entry for entry in heap if entry[2].keepalive_scheduled]
            heapq.heapify(heap)
            self._discarded = 0

    def _push(self, due: float, box: Outbox) -> None:
        heapq.heappush(self._heap, (due, next(self._seq), box))
        wake = self._wake
        if wake is not None and due < wake.deadline:
            wake.deadline = due

    def fire(self, now: float) -> int:
        """Queue the KeepAlives due at ``now`` (at most KEEPALIVE_BATCH); how many were due."""
        heap = self._heap
        fired = 0
        while heap and heap[0][0] <= now and fired < KEEPALIVE_BATCH:
            due, _, box = heapq.heappop(heap)
            if not box.keepalive_scheduled:
                self._discarded -= 1
                continue
            fired += 1
            if box.closed:
                box.keepalive_scheduled = False
                continue
            box.ctrl.append(KEEP_ALIVE_FRAME)
            self.sent += 1
            box.kick()
            interval = box.keepalive
            due += interval
            if due <= now:  # late by a whole interval (a stalled process): skip, as a Go ticker does
                due = now + interval
            heapq.heappush(heap, (due, next(self._seq), box))
        return fired

    async def run(self) -> None:
        """Send KeepAlives as they fall due, until cancelled."""
        heap = self._heap
        while True:
            with trio.CancelScope(deadline=heap[0][0] if heap else math.inf) as wait:
                self._wake = wait
                await trio.sleep_forever()
            self._wake = None
            self.fire(trio.current_time())
