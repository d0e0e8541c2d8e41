"""The relay core: who is connected, where packets go, and the relay's side of each connection.

Knows nothing of HTTP or TLS: it is handed a ``Transport`` that already carries DERP frames.
The login is ``derpd.proto.connection``'s (server role); after it, the hot path is one reader
task per client that reads big chunks, takes every whole frame as spans of one buffer
(``FrameReader.read_spans``), routes each into the destination's ``Outbox``, and then, once per
chunk, asks each touched destination to write everything it has queued in one non-blocking
``send``. A destination whose kernel buffer is full is handed to its own writer task
(``derpd.server.outbox``), which waits (with the write deadline) so that no reader ever waits
for a slow receiver.
"""

from __future__ import annotations

import ipaddress
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from itertools import count
from typing import Protocol

import trio

from derpd.base import log
from derpd.base.text import Peer
from derpd.net.addr import format_addr
from derpd.net.pump import ReadPump, Released
from derpd.net.transport import SocketTransport, TLSTransport, Transport, close_transport
from derpd.proto.connection import NEED_DATA, ClientHello, DerpConnection, Event, NeedData, Role
from derpd.proto.frames import (
    DISCO_MAGIC,
    DISCO_MIN_LEN,
    FRAME_HEADER_LEN,
    KEEPALIVE_SECONDS,
    ClientInfo,
    FrameReader,
    FrameType,
    HandshakeError,
    MalformedFrame,
    PeerGoneReason,
    PeerPresent,
    PeerPresentFlags,
    ProtocolError,
    ServerInfo,
    Span,
    encode_frame,
    forward_packet_frame,
    health_frame,
    is_disco,
    pack_header,
    parse_close_peer,
    parse_forward_packet,
    parse_note_preferred,
    parse_ping,
    parse_watch_conns,
    peer_gone_frame,
    peer_present_frame,
    pong_frame,
    reframe_run,
    restarting_frame,
    run_payloads,
)
from derpd.proto.keys import KEY_LEN, NodeKey, NodePrivate, mesh_keys_equal, public_key_text, short_key
from derpd.server.admission import Verdict
from derpd.server.connlog import ConnectionLog
from derpd.server.limits import RateConfig, TokenBucket
from derpd.server.outbox import RECV_PREFIX_LEN, ConnectionClosed, KeepaliveTimer, Outbox, WriteTimeout

DROP_REASONS = (
    "unknown_dest",
    "unknown_dest_on_fwd",
    "gone_disconnected",
    "queue_head",
    "queue_tail",  # kept for derper's label set; a single-threaded enqueue can always evict the head
    "write_error",
    "dup_client",
)
KINDS = ("disco", "other")

SEND = FrameType.SEND_PACKET
RECV = int(FrameType.RECV_PACKET)
PING = FrameType.PING
NOTE_PREFERRED = FrameType.NOTE_PREFERRED
FORWARD = FrameType.FORWARD_PACKET
WATCH_CONNS = FrameType.WATCH_CONNS
CLOSE_PEER = FrameType.CLOSE_PEER

HANDSHAKE_TIMEOUT = 10.0
SAMPLED_LOG_INTERVAL = 10.0  # seconds between info lines for failed handshakes and refused keys
MESH_WRITE_TIMEOUT = 30.0
KEEPALIVE_JITTER = 5.0  # derper: a fixed random extra in [0, 5 s) per connection


@dataclass
class RelayConfig:
    write_timeout: float = 2.0  # 0 disables; mesh peers get MESH_WRITE_TIMEOUT
    queue_depth: int = 32
    keepalive: float = KEEPALIVE_SECONDS
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    mesh_key: bytes | None = None
    # --workers: the key sibling workers of this node present (never the region's; see RelayServer).
    internal_mesh_key: bytes | None = None
    rate: RateConfig = field(default_factory=RateConfig)  # per-client receive limit; mesh peers exempt


class Forwarder(Protocol):
    """A link to another node of the region (derpd.server.mesh.MeshLink) that carries ForwardPackets."""

    @property
    def internal(self) -> bool:
        """A sibling worker of this node, not another node."""
        ...

    def forward(self, frame: bytes, disco: bool, touched: list[Outbox]) -> None: ...

    def forward_run(self, src: bytes, buf: bytes, run: list[int], touched: list[Outbox]) -> None:
        """SendPackets in ``buf`` (header offsets ``run``, one destination, none disco) as
        ForwardPackets from ``src``."""
        ...


class Admitter(Protocol):
    """Decides whether a (non-mesh) client key may use the relay: derpd.server.admission.Admission, kept
    behind this protocol so that the relay needs none of admission's machinery (HTTP, caches) to run."""

    @property
    def enabled(self) -> bool: ...

    async def check(self, key: NodeKey, source_ip: str) -> Verdict: ...

    def reload(self) -> bool:
        """SIGHUP: re-read what can change (an allowlist); keep the old state on error."""
        ...


class RelayStats:
    """Plain integer counters; the metrics module reads them, the hot path adds per batch."""

    def __init__(self) -> None:
        self.accepts = 0
        self.current_connections = 0
        self.current_home_connections = 0
        self.current_notideal_connections = 0
        self.packets_received = 0
        self.bytes_received = 0
        self.packets_received_disco = 0
        self.packets_sent = 0
        self.bytes_sent = 0
        self.packets_forwarded_in = 0
        self.got_ping = 0
        self.sent_pong = 0
        self.home_moves_in = 0
        self.home_moves_out = 0
        self.peer_gone_disconnected_frames = 0
        self.peer_gone_not_here_frames = 0
        self.current_dup_client_keys = 0
        self.current_dup_client_conns = 0
        self.total_dup_client_conns = 0
        self.sclient_write_timeouts = 0
        self.unknown_frames = 0
        self.handshake_failures = 0
        self.protocol_errors = 0
        self.admission_rejected = 0
        self.rate_limit_waited = 0
        self.packets_forwarded_out = 0
        self.mesh_connects = 0
        self.dropped_packets: dict[tuple[str, str], int] = {(r, k): 0 for r in DROP_REASONS for k in KINDS}
        self.dropped_bytes: dict[tuple[str, str], int] = {(r, k): 0 for r in DROP_REASONS for k in KINDS}

    def drop(self, reason: str, disco: bool, nbytes: int, packets: int = 1) -> None:
        k = (reason, "disco" if disco else "other")
        self.dropped_packets[k] += packets
        self.dropped_bytes[k] += nbytes

    def dropped(self, reason: str) -> int:
        return self.dropped_packets[(reason, "disco")] + self.dropped_packets[(reason, "other")]


def ip16_of(remote: tuple[str, int] | None) -> tuple[bytes, int]:
    """The 16-byte IP (IPv4 as v4-mapped) and port PeerPresent carries."""
    if remote is None:
        return bytes(16), 0
    host, port = remote
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return bytes(16), 0
    if ip.version == 4:
        return b"\x00" * 10 + b"\xff\xff" + ip.packed, port
    return ip.packed, port


class _KeyConns:
    """Every connection of one public key, and which one gets its packets."""

    __slots__ = ("conns", "history", "last")

    def __init__(self, conn: ClientConn) -> None:
        self.conns: list[ClientConn] = [conn]
        self.last: ClientConn | None = conn  # the active one under last-writer-is-active
        self.history: list[ClientConn] = []  # who spoke, adjacent duplicates removed


class ClientConn:
    """One logged-in DERP connection as the relay sees it: who it is, what routing knows of it,
    its reader (``read_loop``) and its output (``outbox``, with the writer task).

    ``outbound``: the connection this node opened to a mesh peer (a MeshLink's): it sends no
    keepalives (the peer's server does) and its ForwardPackets were counted when routed.
    """

    __slots__ = (
        "bucket",
        "bytes_in",
        "can_mesh",
        "cancel_scope",
        "close_reason",
        "conn_id",
        "connected_at",
        "info",
        "internal",
        "is_dup",
        "key",
        "not_ideal",
        "outbox",
        "preferred",
        "pump_fd",
        "recv_prefixes",
        "remote",
        "saw_src",
        "server",
        "tokens",
        "tokens_at",
        "transport",
        "writer_scope",
    )

    def __init__(
        self,
        server: RelayServer,
        transport: Transport,
        key: NodeKey,
        info: ClientInfo,
        conn_id: int,
        *,
        can_mesh: bool,
        not_ideal: bool,
        internal: bool = False,
        outbound: bool = False,
    ) -> None:
        config = server.config
        # Fixed at login.
        self.server = server
        self.transport = transport
        self.key = key
        self.info = info
        self.conn_id = conn_id
        self.remote = transport.remote
        self.can_mesh = can_mesh
        self.internal = internal  # a sibling worker's mesh connection (--workers)
        self.not_ideal = not_ideal
        self.connected_at = server.clock()
        self.outbox = Outbox(
            transport,
            server.stats,
            self.close,
            write_timeout=MESH_WRITE_TIMEOUT if can_mesh else config.write_timeout,
            keepalive=math.inf if outbound else config.keepalive + random.uniform(0.0, KEEPALIVE_JITTER),
            counts_sent=not outbound,
        )
        # Routing state, changed by the task routing a batch (the read pump, or a reader task).
        self.is_dup = False  # another connection has the same key
        self.saw_src: set[bytes] = set()  # keys this connection received from (they owe it a PeerGone)
        # What this connection sent: changed only while its own reads are routed.
        self.preferred = False
        self.recv_prefixes: dict[int, bytes] = {}  # RecvPacket header + our key, by payload size
        self.tokens = 3.0  # PeerGone(NotHere) limiter: 1/s, burst 3
        self.tokens_at = self.connected_at
        self.bytes_in = 0
        self.bucket: TokenBucket | None = None  # the receive rate limit, when configured (set_rate too)
        # Lifecycle: close() (any task) ends the reader and the writer, once, with the reason. The
        # reader is woken through the pump while it is a member (pump_fd), else its scope is
        # cancelled (cancel_scope: run()'s, or _read_here's); write_loop() sets the writer's.
        self.close_reason = ""
        self.cancel_scope: trio.CancelScope | None = None
        self.pump_fd: int | None = None
        self.writer_scope: trio.CancelScope | None = None

    def __repr__(self) -> str:
        return f"<ClientConn {self.conn_id} {short_key(self.key)} {format_addr(self.remote)}>"

    @property
    def closed(self) -> bool:
        return self.outbox.closed

    @property
    def present_flags(self) -> int:
        f = 0
        if self.info.is_prober:
            f |= PeerPresentFlags.IS_PROBER
        if self.can_mesh:
            f |= PeerPresentFlags.IS_MESH_PEER
        if self.not_ideal:
            f |= PeerPresentFlags.NOT_IDEAL
        return f or PeerPresentFlags.IS_REGULAR

    def close(self, reason: str) -> None:
        """Ask this connection to end (from any task); cleanup runs in its own task."""
        if self.outbox.closed:
            return
        self.outbox.close()
        self.close_reason = reason
        if self.cancel_scope is not None:
            self.cancel_scope.cancel()
        elif self.pump_fd is not None:
            self.server.pump.end(self.pump_fd, ConnectionClosed(reason))
        if self.writer_scope is not None:
            self.writer_scope.cancel()

    def note_not_here(self, dst: bytes) -> bool:
        """Queue PeerGone(NotHere) for a disco packet to an unknown key, 1/s burst 3."""
        now = self.server.clock()
        self.tokens = min(3.0, self.tokens + (now - self.tokens_at))
        self.tokens_at = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        self.outbox.ctrl.append(peer_gone_frame(dst, PeerGoneReason.NOT_HERE))
        self.server.stats.peer_gone_not_here_frames += 1
        return True

    # --- lifecycle ----------------------------------------------------------------

    async def run(self, read_loop: Callable[[], Awaitable[None]], *, ends_on_close: bool = False) -> None:
        """Run ``read_loop`` (this connection's reader) until it ends or close() is called; the
        reason is in ``close_reason`` ("" when cancelled from outside).

        ``ends_on_close``: ``read_loop`` is this class's own (``read_loop``), which ends by itself
        when close() is called, so no cancel scope is opened for it: a client's reader spends its
        life in the pump, which close() wakes directly (a scope per connection was ~2 % of a login).

        The outbox's writer task, once it is needed (``Outbox.start_writer``), runs in the relay's
        nursery (``write_loop``), not in one of this connection's own: most connections never need
        it, and a nursery per connection, with the trip through the scheduler its exit takes, was
        a good part of what a login cost. It ends with the connection (close() cancels it)."""
        outbox = self.outbox
        reason: str | None = None
        try:
            outbox.start_writer = self._start_writer
            if outbox.writing:  # the login's frames did not fit already
                self._start_writer()
            if ends_on_close:
                reason = await self._guard(read_loop)
            else:
                with trio.CancelScope() as scope:
                    self.cancel_scope = scope
                    if self.closed:
                        scope.cancel()
                    reason = await self._guard(read_loop)
        finally:
            self.cancel_scope = None  # the scope is gone: close() must not cancel it again
            outbox.start_writer = None
            self.close(reason or "")  # ends the writer task too

    def _start_writer(self) -> None:
        self.server.start_writer(self)

    async def write_loop(self) -> None:
        """The outbox's writer task, in the relay's nursery (``RelayServer.start_writer``): until
        the connection closes, or a write fails (which closes it)."""
        reason: str | None = None
        server = self.server
        server.writer_tasks += 1
        with trio.CancelScope() as scope:
            self.writer_scope = scope
            if self.closed:
                scope.cancel()
            try:
                reason = await self._guard(self.outbox.run)
            except Exception:  # a bug: it ends this connection, never the relay's other tasks
                log.exception("internal_error", **_who(self))
                reason = "internal error"
            finally:
                self.writer_scope = None
                server.writer_tasks -= 1
        if reason is not None:
            self.close(reason)

    async def _guard(self, task: Callable[[], Awaitable[None]]) -> str | None:
        """Run ``task``; the reason the connection ends when it raises what a connection's
        end raises (counted here), None when it returns."""
        try:
            await task()
        except WriteTimeout as e:
            self.server.stats.sclient_write_timeouts += 1
            return str(e)
        except ConnectionClosed as e:
            return str(e)
        except ProtocolError as e:
            self.server.stats.protocol_errors += 1
            return f"protocol error: {e}"
        except OSError as e:
            return f"socket error: {e.strerror or e}"
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            return f"connection broken: {e.__cause__ or e or 'closed'}"
        return None

    async def read_loop(self, reader: FrameReader) -> None:
        """A client's reader (the hot path: read big, route every whole frame at once).

        A plain or TLS socket without a receive rate limit is read by the relay's ``ReadPump``
        (one task for every busy connection: no per-read task switch or epoll re-arm); anything
        else, or while a rate limit applies, reads in this task. Both route through
        ``_route_buffered``, and errors surface here either way.

        It ends when close() is called (``run(..., ends_on_close=True)``): a pump member is woken
        with ConnectionClosed, and the reads in this task run in a scope close() cancels.
        """
        outbox = self.outbox
        while not outbox.closed:
            if self._pumpable():
                try:
                    await self._read_in_pump(reader)
                except Released:
                    pass
                if outbox.closed:
                    return
            with trio.CancelScope() as scope:
                self.cancel_scope = scope
                try:
                    await self._read_here(reader)
                finally:
                    self.cancel_scope = None

    def _pumpable(self) -> bool:
        return (
            self.bucket is None
            and self.server.pump.running
            and isinstance(self.transport, (SocketTransport, TLSTransport))
        )

    async def _read_in_pump(self, reader: FrameReader) -> None:
        """Route what is buffered already, then let the pump read; raises ``Released`` when a
        rate limit arrives (``set_rate``) or the pump stops."""
        transport = self.transport
        assert isinstance(transport, (SocketTransport, TLSTransport))
        pump = self.server.pump
        fd = transport.sock.fileno()
        read_ready = transport.read_ready
        route = self._route_buffered

        def on_readable() -> int:
            if self.outbox.closed:  # closed by another connection's routing: its task ends it
                return 0
            if self.bucket is not None:
                pump.release(fd)
                return 0
            data = read_ready()
            if data is None:
                return 0
            if not data:
                raise ConnectionClosed("client closed the connection")
            return take(data)

        def take(data: bytes) -> int:
            self.bytes_in += len(data)
            reader.feed(data)
            route(reader)
            return len(data)

        route(reader)  # frames that came with the login
        # Records OpenSSL already holds (they came with the login): the epoll cannot see them.
        if isinstance(transport, TLSTransport) and (data := transport.read_ready(recv=False)):
            take(data)
        if self.outbox.closed:  # by what was routed: nothing to wait for
            return
        self.pump_fd = fd
        try:
            await pump.serve(fd, on_readable)
        finally:
            self.pump_fd = None

    def _route_buffered(self, reader: FrameReader) -> None:
        """Route every whole frame ``reader`` holds; raise its protocol error after the frames before it."""
        buf, spans = reader.read_spans()
        if spans:
            self.server.handle_frames(self, buf, spans)
        if reader.skipped:  # frame types a server ignores (forward compatibility)
            self.server.stats.unknown_frames += reader.skipped
            reader.skipped = 0
        if reader.error is not None:
            raise reader.error

    async def _read_here(self, reader: FrameReader) -> None:
        """Read in this task: for transports the pump does not serve, and under a rate limit
        (not reading is TCP back-pressure: nothing is dropped). Returns when the pump can
        take over again."""
        receive = self.transport.receive_some
        wait = 0.0
        while True:
            self._route_buffered(reader)
            if wait > 0:  # over the rate limit
                self.server.stats.rate_limit_waited += 1
                await trio.sleep(wait)
            bucket = self.bucket
            if bucket is None and self._pumpable():
                return
            data = await receive() if bucket is None else await receive(int(bucket.burst))
            if not data:
                raise ConnectionClosed("client closed the connection")
            self.bytes_in += len(data)
            reader.feed(data)
            wait = 0.0 if bucket is None else bucket.take(trio.current_time(), len(data))


DISCO_SEND_MIN = KEY_LEN + DISCO_MIN_LEN
MAX_CACHED_PREFIXES = 64


def _cache_prefix(prefixes: dict[int, bytes], size: int, src: bytes) -> bytes:
    """The RecvPacket header and source key for a SendPacket payload of ``size`` bytes."""
    if len(prefixes) >= MAX_CACHED_PREFIXES:
        prefixes.clear()
    prefix = prefixes[size] = pack_header(RECV, size) + src
    return prefix


_PLAIN_SERVER_INFO = ServerInfo()  # what a client without a rate limit is told (its JSON is cached)


def _take_login_bytes(login: DerpConnection, data: bytes) -> Event | NeedData:
    """What a read during the login brought (b"": the client left before its ClientInfo)."""
    if not data:
        raise ConnectionClosed("client closed before sending ClientInfo")
    login.receive_data(data)
    return login.next_event()


def _who(conn: ClientConn) -> dict[str, object]:
    """The fields both lines of a connection carry, so that they can be paired."""
    return {"conn": conn.conn_id, "key": short_key(conn.key), "remote": format_addr(conn.remote)}


DUP_KEY_HEALTH = (
    "this node key has {n} connections to this DERP server; only the one that spoke last gets packets "
    "(is the same node key in use on more than one device?)"
)
CLEAR_HEALTH_FRAME = health_frame("")
DUP_HEALTH_FANOUT = 8  # connections of one key that each hear about a new duplicate


class RelayServer:
    """Registry, routing and peer presence for one DERP node."""

    def __init__(
        self,
        private_key: NodePrivate,
        config: RelayConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.private_key = private_key
        self.public_key = private_key.public
        self.config = config or RelayConfig()
        self.clock = clock
        self.stats = RelayStats()
        # Reads every busy plain/TLS client connection in one task, and sends every connection's
        # KeepAlives from another, once ``run_tasks`` runs.
        self.pump = ReadPump()
        self.keepalives = KeepaliveTimer()
        self._tasks: trio.Nursery | None = None  # while run_tasks runs: where writer tasks start
        self.writer_tasks = 0  # connections' writer tasks running now (most connections have none)
        self.clients: dict[bytes, ClientConn] = {}  # key -> the connection that gets its packets
        self.keys: dict[bytes, _KeyConns] = {}
        self.watchers: set[ClientConn] = set()
        self.seen_by: dict[bytes, set[ClientConn]] = {}  # src key -> receivers it sent to
        self.admission: Admitter | None = None
        self.closing = False  # shutting down: no new logins
        # Keys connected to other nodes of the region, and the mesh links (first announcer first)
        # that reach them. ForwardPacket goes one hop: what arrives from a peer is never re-forwarded.
        self.forwarders: dict[bytes, list[Forwarder]] = {}
        self.mesh_links: dict[str, Forwarder | None] = {}  # peer name -> its link while connected
        # With --workers, N processes are one node to the rest of the region: a watcher from
        # another node also hears of the keys on sibling workers (their PeerPresent frames, kept
        # here), and a packet it forwards for a sibling's key takes one more, internal, hop.
        # Siblings themselves only ever hear of local keys, so nothing loops.
        self.sibling_present: dict[bytes, bytes] = {}
        self._conn_ids = count(1)
        # Anyone can fail a handshake or send a key admission refuses, as often as they like: each one
        # is a debug line, and at most one info line per interval says how many (log.Sampled).
        self._handshake_failed = log.Sampled("handshake_failed", SAMPLED_LOG_INTERVAL)
        self._rejected = log.Sampled("client_rejected", SAMPLED_LOG_INTERVAL)
        self.conn_log = ConnectionLog()  # client_connected/_disconnected, summarised in reconnect storms

    # --- connection lifecycle -------------------------------------------------------

    async def serve_connection(
        self,
        transport: Transport,
        *,
        initial: bytes = b"",
        preamble: bytes = b"",
        not_ideal: bool = False,
    ) -> None:
        """Run one upgraded DERP connection to the end. Never raises for client faults."""
        conn_id = next(self._conn_ids)
        self.stats.accepts += 1
        try:
            try:
                login, hello = await self._login(transport, initial, preamble)
            except (
                HandshakeError,
                ProtocolError,
                ConnectionClosed,
                OSError,
                trio.BrokenResourceError,
                trio.ClosedResourceError,
            ) as e:
                self.stats.handshake_failures += 1
                reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                self._handshake_failed.note(conn=conn_id, remote=format_addr(transport.remote), reason=reason)
                return
            key, info = hello.key, hello.info
            internal = mesh_keys_equal(self.config.internal_mesh_key, info.mesh_key)
            can_mesh = internal or mesh_keys_equal(self.config.mesh_key, info.mesh_key)
            if not can_mesh and not await self._admit(key, transport, conn_id):
                return
            if self.closing:
                remote = format_addr(transport.remote)
                log.info("handshake_failed", conn=conn_id, remote=remote, reason="server shutting down")
                return
            conn = ClientConn(
                self, transport, key, info, conn_id, can_mesh=can_mesh, not_ideal=not_ideal, internal=internal
            )
            rate = self.config.rate
            server_info = _PLAIN_SERVER_INFO
            if rate.enabled and not can_mesh:
                conn.bucket = rate.bucket(trio.current_time())
                server_info = ServerInfo(
                    token_bucket_bytes_per_second=rate.bytes_per_second, token_bucket_bytes_burst=rate.burst_bytes
                )
            conn.outbox.ctrl.append(login.accept(server_info))
            self._register(conn)
            # Every connection gets both lines while they are few; in a reconnect storm most are only
            # counted, in one client_churn line a second (server.connlog). Mesh peers always get both.
            level = self.conn_log.connect_level(conn.connected_at, always=can_mesh)
            if level is not None:
                app = Peer(info.app_name) if info.app_name else None
                log.event(level, "client_connected", **_who(conn), mesh=can_mesh or None, app=app)
            try:
                conn.outbox.kick()
                self.keepalives.add(conn.outbox, trio.current_time())
                await conn.run(partial(conn.read_loop, login.take_reader()), ends_on_close=True)
            finally:
                self.keepalives.discard(conn.outbox)
                self._unregister(conn)
                reason = conn.close_reason or "server shutdown"
                now = self.clock()
                level = self.conn_log.disconnect_level(now, reason, always=can_mesh)
                if level is not None:
                    log.event(
                        level,
                        "client_disconnected",
                        **_who(conn),
                        reason=reason,
                        duration=f"{now - conn.connected_at:.1f}s",
                        bytes_in=conn.bytes_in,
                        bytes_out=conn.outbox.bytes_out,
                    )
        finally:
            await close_transport(transport)

    async def _admit(self, key: NodeKey, transport: Transport, conn_id: int) -> bool:
        """Mesh peers never get here; everyone else passes every configured check or is closed."""
        admission = self.admission
        if admission is None or not admission.enabled:
            return True
        source = transport.remote[0] if transport.remote else ""
        verdict = await admission.check(key, source)
        if verdict.allowed:
            return True
        self.stats.admission_rejected += 1
        self._rejected.note(conn=conn_id, key=public_key_text(key), source=source, reason=verdict.reason)
        return False

    async def close_all(self, restarting: tuple[float, float] | None = None, grace: float = 5.0) -> None:
        """Graceful shutdown: refuse new logins, tell every client (Restarting frame: reconnect in,
        try for, in seconds), give writers up to ``grace`` seconds to flush what is queued, then
        close every connection (after the grace period as well: it bounds the flush, not this call)."""
        self.closing = True
        conns = [c for entry in self.keys.values() for c in entry.conns]
        if restarting is not None:
            reconnect_in, try_for = restarting
            frame = restarting_frame(int(reconnect_in * 1000), int(try_for * 1000))
            for c in conns:
                c.outbox.control(frame)
        with trio.move_on_after(grace):
            for c in conns:  # every writer flushes at once; this waits for the slowest
                await c.outbox.flushed()
        for c in conns:
            c.close("server shutting down")
        log.info("clients_closed", count=len(conns), restarting=restarting is not None)

    # --- the mesh: keys on other nodes of the region -------------------------------------------

    def add_forwarder(self, key: NodeKey, link: Forwarder, present: PeerPresent | None = None) -> None:
        """A mesh peer announced ``key`` (``present``: what its PeerPresent said)."""
        links = self.forwarders.get(key)
        if links is None:
            self.forwarders[key] = [link]
        elif link not in links:
            links.append(link)
        if link.internal and key not in self.sibling_present:
            # As the sibling said it (the 32-byte legacy form when the caller has no more).
            frame = encode_frame(FrameType.PEER_PRESENT, key if present is None else present.payload())
            self.sibling_present[key] = frame
            if key not in self.keys:  # new on this node: tell the other nodes' watchers
                self._tell_node_watchers(frame)

    def remove_forwarder(self, key: bytes, link: Forwarder) -> None:
        """A mesh peer says ``key`` left it (PeerGone), or the link to that peer broke."""
        links = self.forwarders.get(key)
        if links is None or link not in links:
            return
        links.remove(link)
        if link.internal and not any(other.internal for other in links):
            self.sibling_present.pop(key, None)
            if key not in self.keys:  # gone from this node (it may still be on another)
                self._tell_node_watchers(peer_gone_frame(key, PeerGoneReason.DISCONNECTED))
        if links:
            return
        del self.forwarders[key]
        if key not in self.keys:  # gone from the whole region
            self._peer_gone_from_region(key)

    def remove_link(self, link: Forwarder) -> None:
        """Forget every route through ``link`` (its connection broke)."""
        for key in [k for k, links in self.forwarders.items() if link in links]:
            self.remove_forwarder(key, link)

    async def run_tasks(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The relay's own tasks, until cancelled (the node starts this before it accepts): the
        read pump, the KeepAlive timer, and every connection's writer task once it needs one."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.pump.run)
            nursery.start_soon(self.keepalives.run)
            self._tasks = nursery
            try:
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._tasks = None

    def start_writer(self, conn: ClientConn) -> None:
        """Start ``conn``'s writer task (``ClientConn.write_loop``) in the relay's nursery."""
        nursery = self._tasks
        if nursery is None:  # not running (yet, or any more): nothing can finish this write
            conn.close("no writer task: the relay is not running")
            return
        nursery.start_soon(conn.write_loop)

    def set_rate(self, rate: RateConfig) -> None:
        """A new per-client receive limit for everyone connected and everyone to come."""
        self.config.rate = rate
        now = trio.current_time()
        for entry in self.keys.values():
            for conn in entry.conns:
                conn.bucket = None if conn.can_mesh else rate.bucket(now)

    async def _login(self, transport: Transport, initial: bytes, preamble: bytes) -> tuple[DerpConnection, ClientHello]:
        """The server's side of the login, up to the opened ClientInfo (``derpd.proto.connection``):
        ServerKey out (after ``preamble``, the 101), then ClientInfo in, both within the handshake
        timeout (one deadline, as derper's). ``initial``: bytes that came with the HTTP request (fast
        start)."""
        timeout = self.config.handshake_timeout
        login = DerpConnection(Role.SERVER, self.private_key)
        if initial:
            login.receive_data(initial)
        # The socket's buffer is empty: the kernel takes these few bytes at once, without a wait or
        # a trip through the scheduler. (A TLS or WebSocket transport may keep some back.)
        out = preamble + login.data_to_send()
        sent = transport.try_send(out)
        writing = sent < len(out) or transport.has_backlog
        hello = login.next_event()
        if not writing and isinstance(hello, ClientHello):
            return login, hello  # fast start: the whole login came with the request, no deadline needed
        if not writing and isinstance(transport, SocketTransport | TLSTransport):
            # The ClientInfo is the client's answer to the ServerKey: one round trip away. Under
            # load, one turn of the scheduler is usually that long, and a look then finds it
            # without the deadline's cancel scope (8 µs of a ~200 µs login) or a readiness wait.
            await trio.lowlevel.checkpoint()
            data = transport.read_ready()
            if data is not None:
                hello = _take_login_bytes(login, data)
                if isinstance(hello, ClientHello):
                    return login, hello
        with trio.move_on_after(timeout):
            if writing:
                await transport.send_all(memoryview(out)[sent:])
                writing = False
            while hello is NEED_DATA:
                hello = _take_login_bytes(login, await transport.receive_some())
        if writing:
            raise ConnectionClosed(f"timed out writing ServerKey after {timeout:g}s")
        if not isinstance(hello, ClientHello):
            raise ConnectionClosed(f"no ClientInfo within {timeout:g}s")
        return login, hello

    def _register(self, conn: ClientConn) -> None:
        st = self.stats
        key = conn.key
        entry = self.keys.get(key)
        if entry is None:
            self.keys[key] = _KeyConns(conn)
        else:
            if len(entry.conns) == 1:
                st.current_dup_client_keys += 1
                st.current_dup_client_conns += 2
                entry.history = [entry.conns[0]]
                entry.conns[0].is_dup = True
            else:
                st.current_dup_client_conns += 1
                entry.history.append(conn)
            st.total_dup_client_conns += 1
            conn.is_dup = True
            entry.conns.append(conn)
            entry.last = conn
            log.info("duplicate_client", key=short_key(key), conns=len(entry.conns), conn=conn.conn_id)
            # The reference's TODO (tailscale#2746): tell every connection of the key, so the user
            # sees a DERP health warning instead of silently losing packets on one device.
            # Beyond a handful (real duplicates are two or three devices) only the newcomer hears it, so
            # that n logins with one key cost O(n) frames, not O(n²).
            problem = health_frame(DUP_KEY_HEALTH.format(n=len(entry.conns)))
            told = entry.conns if len(entry.conns) <= DUP_HEALTH_FANOUT else [conn]
            for c in told:
                if c is conn:  # the newcomer's writes start with its ServerInfo
                    c.outbox.ctrl.append(problem)
                else:
                    c.outbox.control(problem)
        self.clients[key] = conn
        st.current_connections += 1
        if conn.not_ideal:
            st.current_notideal_connections += 1
        if self.watchers and not conn.internal:  # a sibling's link is plumbing, not a peer
            ip16, port = ip16_of(conn.remote)
            frame = peer_present_frame(key, ip16, port, conn.present_flags)
            on_sibling = key in self.sibling_present  # other nodes know it through us already
            for w in self.watchers:
                if w.internal or not on_sibling:
                    w.outbox.control(frame)

    def _unregister(self, conn: ClientConn) -> None:
        st = self.stats
        key = conn.key
        conn.outbox.close()
        conn.outbox.discard("gone_disconnected")  # packets still queued will never be written
        for src in conn.saw_src:
            receivers = self.seen_by.get(src)
            if receivers is not None:
                receivers.discard(conn)
                if not receivers:
                    del self.seen_by[src]
        conn.saw_src.clear()
        self.watchers.discard(conn)
        st.current_connections -= 1
        if conn.preferred:
            st.current_home_connections -= 1
        if conn.not_ideal:
            st.current_notideal_connections -= 1

        entry = self.keys.get(key)
        if entry is None or conn not in entry.conns:
            return
        entry.conns.remove(conn)
        if not entry.conns:
            del self.keys[key]
            self.clients.pop(key, None)
            if not conn.internal:
                self._tell_watchers_gone(key)
            if key not in self.forwarders:  # still reachable through a mesh peer: not gone yet
                self._peer_gone_from_region(key)
            return
        st.current_dup_client_conns -= 1
        if entry.last is conn:
            entry.last = None
        trimmed: list[ClientConn] = []
        for c in entry.history:
            if c is not conn and (not trimmed or trimmed[-1] is not c):
                trimmed.append(c)
        entry.history = trimmed
        if entry.last is None and trimmed:
            entry.last = trimmed[-1]
        if len(entry.conns) == 1:
            remain = entry.conns[0]
            st.current_dup_client_conns -= 1
            st.current_dup_client_keys -= 1
            remain.is_dup = False
            entry.last = remain
            entry.history = []
            remain.outbox.control(CLEAR_HEALTH_FRAME)  # the warning no longer applies
        if entry.last is not None:
            self.clients[key] = entry.last
        else:
            self.clients.pop(key, None)

    def _peer_gone_from_region(self, key: bytes) -> None:
        """``key`` is reachable nowhere in the region: everyone it sent to hears PeerGone."""
        st = self.stats
        receivers = self.seen_by.pop(key, None)
        if receivers:
            frame = peer_gone_frame(key, PeerGoneReason.DISCONNECTED)
            for r in receivers:
                r.saw_src.discard(key)
                if not r.closed:
                    st.peer_gone_disconnected_frames += 1
                    r.outbox.control(frame)

    def _tell_watchers_gone(self, key: bytes) -> None:
        """Mesh watchers track our local clients: the last local connection of ``key`` left
        (a watcher from another node keeps it while a sibling worker still has it)."""
        if self.watchers:
            frame = peer_gone_frame(key, PeerGoneReason.DISCONNECTED)
            on_sibling = key in self.sibling_present
            for w in self.watchers:
                if w.internal or not on_sibling:
                    self.stats.peer_gone_disconnected_frames += 1
                    w.outbox.control(frame)

    def _tell_node_watchers(self, frame: bytes) -> None:
        """A key appeared on or left a sibling worker: only other nodes' watchers care."""
        for w in self.watchers:
            if not w.internal:
                if frame[0] == FrameType.PEER_GONE:
                    self.stats.peer_gone_disconnected_frames += 1
                w.outbox.control(frame)

    def _note_activity(self, conn: ClientConn) -> None:
        """Last writer is active: a duplicate that speaks gets the key's packets."""
        entry = self.keys.get(conn.key)
        if entry is None or len(entry.conns) < 2:
            return
        entry.last = conn
        self.clients[conn.key] = conn
        if not entry.history or entry.history[-1] is not conn:
            entry.history.append(conn)

    def close_key(self, key: NodeKey, reason: str) -> int:
        """Close every connection of ``key``; returns how many."""
        entry = self.keys.get(key)
        if entry is None:
            return 0
        conns = list(entry.conns)
        for c in conns:
            c.close(reason)
        return len(conns)

    # --- the hot path ----------------------------------------------------------------

    def handle_frames(self, conn: ClientConn, buf: bytes, spans: list[Span]) -> None:
        """Route one read's worth of frames, then write once per touched destination.

        The hot path: the reader hands over consecutive SendPackets to one destination as
        a run. For a destination that is keeping up, the run becomes its RecvPackets by
        patching one copy of the run's bytes (frames keep their length; only the type byte
        and the key change). A destination that is already behind gets the packets one by
        one through its bounded queue and the reference's drop policy.
        """
        if conn.is_dup:
            self._note_activity(conn)
        clients = self.clients
        touched: list[Outbox] = []
        n_pkts = n_bytes = n_disco = 0
        try:
            for ftype, start, stop, run in spans:
                if ftype == SEND:
                    if run is not None:
                        frames = run
                        n_pkts += len(run)
                        n_bytes += stop - start - len(run) * RECV_PREFIX_LEN + FRAME_HEADER_LEN
                    else:  # a single packet
                        if stop - start < KEY_LEN:
                            raise MalformedFrame(SEND, "shorter than a key")
                        n_pkts += 1
                        n_bytes += stop - start - KEY_LEN
                        if stop - start >= DISCO_SEND_MIN and buf.startswith(DISCO_MAGIC, start + KEY_LEN):
                            n_disco += 1
                            self._send_one(conn, buf[start:stop], True, touched)
                            continue
                        frames = [start - FRAME_HEADER_LEN]
                    dst = buf[start : start + KEY_LEN]
                    d = clients.get(dst)
                    if d is not None and (o := d.outbox).keeping_up:
                        self._emit_run(d, o, conn.key, buf, frames, stop, touched)
                    elif d is None and (links := self.forwarders.get(dst)) and dst not in self.keys:
                        self._forward_run(links[0], conn.key, buf, frames, touched)
                    else:
                        for payload in run_payloads(buf, frames):
                            self._send_one(conn, payload, False, touched)
                    continue
                if ftype == FORWARD and run is not None:
                    self._receive_forward_run(conn, buf, run, touched)
                    continue
                payload = buf[start:stop]
                if ftype == PING:
                    self.stats.got_ping += 1
                    data = parse_ping(payload)
                    out = conn.outbox
                    if out.pong is None:  # one pending pong; pings beyond it are ignored
                        out.pong = pong_frame(data)
                        out.touch(touched)
                elif ftype == NOTE_PREFERRED:
                    self._set_preferred(conn, parse_note_preferred(payload))
                elif ftype == FORWARD:
                    self._handle_forward(conn, payload, touched)
                elif ftype == WATCH_CONNS:
                    parse_watch_conns(payload)
                    self._add_watcher(conn)
                elif ftype == CLOSE_PEER:
                    target = parse_close_peer(payload)
                    if not conn.can_mesh:
                        raise ProtocolError("insufficient permissions for ClosePeer")
                    n = self.close_key(target, f"closed by mesh peer {short_key(conn.key)}")
                    log.info("close_peer", by=short_key(conn.key), target=short_key(target), conns=n)
        finally:
            st = self.stats
            st.packets_received += n_pkts
            st.bytes_received += n_bytes
            st.packets_received_disco += n_disco
            for o in touched:
                o.dirty = False
                o.kick()

    def _emit_run(
        self, d: ClientConn, o: Outbox, src: bytes, buf: bytes, run: list[int], stop: int, touched: list[Outbox]
    ) -> None:
        """Turn adjacent SendPackets (header offsets ``run``) into RecvPackets from ``src`` for ``d``,
        written straight through its outbox ``o``."""
        base = run[0]
        seg = bytearray(buf[base:stop])
        for offset in run:
            at = offset - base
            seg[at] = RECV
            seg[at + FRAME_HEADER_LEN : at + RECV_PREFIX_LEN] = src
        self._express(d, o, seg, len(run), src, touched)

    def _express(
        self, d: ClientConn, o: Outbox, seg: bytes | bytearray, n: int, src: bytes, touched: list[Outbox]
    ) -> None:
        """``n`` RecvPackets from ``src`` in ``seg``, written straight through ``d``'s outbox ``o``
        (which is keeping up)."""
        o.add_run(seg, n, len(seg) - n * RECV_PREFIX_LEN, touched)
        if src not in d.saw_src:
            self._note_seen(d, src)

    def _forward_run(self, link: Forwarder, src: bytes, buf: bytes, run: list[int], touched: list[Outbox]) -> None:
        """SendPackets (header offsets ``run``) to a key on another node: ForwardPackets on the link
        that reaches it, found once for the run. (_send_one does the same for one packet.)"""
        link.forward_run(src, buf, run, touched)
        self.stats.packets_forwarded_out += len(run)

    def _send_one(self, conn: ClientConn, payload: bytes, disco: bool, touched: list[Outbox]) -> None:
        """One SendPacket payload through the destination's queue, a mesh peer, or a counted drop."""
        dst = payload[:KEY_LEN]
        d = self.clients.get(dst)
        if d is None and dst not in self.keys:
            links = self.forwarders.get(dst)
            if links:
                self.stats.packets_forwarded_out += 1
                links[0].forward(forward_packet_frame(conn.key, dst, payload[KEY_LEN:]), disco, touched)
                return
        if d is None or d.outbox.closed:
            self._drop_undeliverable(conn, dst, len(payload) - KEY_LEN, disco, d, "unknown_dest", touched)
            return
        src = conn.key
        prefix = conn.recv_prefixes.get(len(payload))
        if prefix is None:
            prefix = _cache_prefix(conn.recv_prefixes, len(payload), src)
        self._deliver(d, prefix + payload[KEY_LEN:], disco, src, touched)

    def _deliver(self, d: ClientConn, frame: bytes, disco: bool, src: bytes, touched: list[Outbox]) -> None:
        """Queue a RecvPacket frame for ``d``, evicting the oldest packet when the queue is full."""
        o = d.outbox
        q = o.q_disco if disco else o.q_other
        if len(q) >= self.config.queue_depth:
            if not o.writing:
                # A full queue within one read is no reason to drop: the receiver's socket
                # may take it all now. Only a receiver that is already behind loses packets.
                o.kick()
            if len(q) >= self.config.queue_depth:
                self.stats.drop("queue_head", disco, len(q.popleft()) - RECV_PREFIX_LEN)
        q.append(frame)
        if src not in d.saw_src:
            self._note_seen(d, src)
        if not o.dirty:
            o.dirty = True
            touched.append(o)

    def _note_seen(self, d: ClientConn, src: bytes) -> None:
        """``d`` received from ``src``, so it hears PeerGone when ``src`` leaves the region."""
        d.saw_src.add(src)
        receivers = self.seen_by.get(src)
        if receivers is None:
            self.seen_by[src] = {d}
        else:
            receivers.add(d)

    def _drop_undeliverable(
        self,
        conn: ClientConn,
        dst: bytes,
        size: int,
        disco: bool,
        d: ClientConn | None,
        unknown_reason: str,
        touched: list[Outbox],
    ) -> None:
        if d is not None:  # closing, not yet unregistered
            self.stats.drop("gone_disconnected", disco, size)
            return
        entry = self.keys.get(dst)
        if entry is not None and len(entry.conns) > 1:
            self.stats.drop("dup_client", disco, size)
            return
        self.stats.drop(unknown_reason, disco, size)
        if disco and conn.note_not_here(dst):
            conn.outbox.touch(touched)

    def _receive_forward_run(self, conn: ClientConn, buf: bytes, run: list[int], touched: list[Outbox]) -> None:
        """ForwardPackets from a mesh peer with one source and one destination, none disco
        (header offsets ``run``): for a local destination that is keeping up, its RecvPackets
        in one piece (each frame loses the destination key; the packets are copied once, by the
        join); otherwise frame by frame, as ``_handle_forward``."""
        if not conn.can_mesh:
            raise ProtocolError("insufficient permissions for ForwardPacket")
        keys = run[0] + FRAME_HEADER_LEN
        dst = buf[keys + KEY_LEN : keys + 2 * KEY_LEN]
        d = self.clients.get(dst)
        if d is None or not (o := d.outbox).keeping_up:
            for payload in run_payloads(buf, run):
                self._handle_forward(conn, payload, touched)
            return
        src = buf[keys : keys + KEY_LEN]
        seg = reframe_run(buf, run, RECV, src, 2 * KEY_LEN)
        self.stats.packets_forwarded_in += len(run)
        self._express(d, o, seg, len(run), src, touched)

    def _handle_forward(self, conn: ClientConn, payload: bytes, touched: list[Outbox]) -> None:
        if not conn.can_mesh:
            raise ProtocolError("insufficient permissions for ForwardPacket")
        src, dst, packet = parse_forward_packet(payload)
        self.stats.packets_forwarded_in += 1
        disco = is_disco(packet)
        d = self.clients.get(dst)
        if d is None and not conn.internal and dst not in self.keys:
            # Another node sent it to us for a key on a sibling worker: the node's internal hop.
            for link in self.forwarders.get(dst, ()):
                if link.internal:
                    self.stats.packets_forwarded_out += 1
                    link.forward(pack_header(FORWARD, len(payload)) + payload, disco, touched)
                    return
        if d is None or d.outbox.closed:
            self._drop_undeliverable(conn, dst, len(packet), disco, d, "unknown_dest_on_fwd", touched)
        else:  # delivered locally only, never forwarded to another node
            self._deliver(d, pack_header(RECV, KEY_LEN + len(packet)) + src + packet, disco, src, touched)

    def _set_preferred(self, conn: ClientConn, preferred: bool) -> None:
        if conn.preferred == preferred:
            return
        conn.preferred = preferred
        st = self.stats
        st.current_home_connections += 1 if preferred else -1
        # Moves right after connecting are the client's initial report, not a move.
        if self.clock() - conn.connected_at > 5.0:
            if preferred:
                st.home_moves_in += 1
            else:
                st.home_moves_out += 1

    def _add_watcher(self, conn: ClientConn) -> None:
        if not conn.can_mesh:
            raise ProtocolError("insufficient permissions for WatchConns")
        if conn.key == self.public_key:
            return  # a mesh client that is ourselves
        ctrl = conn.outbox.ctrl
        for key, c in self.clients.items():
            if not c.internal:
                ip16, port = ip16_of(c.remote)
                ctrl.append(peer_present_frame(key, ip16, port, c.present_flags))
        if not conn.internal:
            ctrl.extend(frame for key, frame in self.sibling_present.items() if key not in self.clients)
        self.watchers.add(conn)
        log.info("watcher_added", key=short_key(conn.key), peers=len(self.clients))
        conn.outbox.kick()
