"""Load-generator worker: one process driving a slice of sender→receiver pairs.

Both ends of a pair live in the same process, so the receiver's count doubles as the
sender's acknowledgement (``--window``) and the send timestamp embedded in each packet
is on the same clock as the receive time (one-way latency without clock sync).

The worker must not be the bottleneck, so the data path avoids per-packet Python
overhead where it can: a single ``epoll`` loop over raw non-blocking sockets (no
coroutine or event-loop machinery per packet), frames stamped in place in a
pre-built template (``send_packet_frame``), ``recv_into`` a fixed 256 KiB buffer and
frames walked by offset (only the 16-byte stamp of each payload is ever looked at,
so payloads are never copied). The handshake uses derpd's sans-IO protocol module.

``https://`` targets: the TLS handshake and the DERP login happen on a blocking
``ssl.SSLSocket``, which then goes non-blocking into the same epoll loop. A plain-TCP
worker never touches the TLS code: the worker binds TLS variants of its receive, send
and discard methods only when the target is TLS (see :class:`Worker`).

Packet payload (the ``size`` bytes after the 32-byte key): u64 sequence number, u64
``perf_counter_ns`` send time, then zero padding. Probe packets (readiness checks
before the timed phase) have the top bit of the sequence number set.
"""

from __future__ import annotations

import select
import socket
import ssl
import struct
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any
from urllib.parse import urlsplit

from derpd.net.tls import PIN_PREFIX, CertError, fast_start_key, pinned_context
from derpd.proto.frames import (
    FRAME_HEADER_LEN,
    PROTOCOL_VERSION,
    ClientInfo,
    FrameReader,
    FrameType,
    client_info_frame,
    open_server_info,
    parse_server_key,
    send_packet_frame,
)
from derpd.proto.keys import KEY_LEN, NodePrivate

from . import baseline

STAMP = struct.Struct(">QQ")  # sequence number, send time (perf_counter_ns)
MIN_SIZE = STAMP.size
STAMP_OFFSET = FRAME_HEADER_LEN + KEY_LEN  # same offset in SendPacket and RecvPacket frames
PROBE_FLAG = 1 << 63
RECV_BUF = 256 * 1024
_HEADER = struct.Struct(">BI")  # derpd.proto.frames's frame header, unpacked by offset here
_DATA_TYPES = (FrameType.SEND_PACKET, FrameType.RECV_PACKET)  # baseline echoes SendPacket bytes
_SOFT = (BlockingIOError, InterruptedError)
# A non-blocking SSLSocket's "try again": not BlockingIOError subclasses. Either one from a
# send means OpenSSL may already have taken part of the buffer (SSL_write is all-or-nothing
# per call, but it commits records as it goes): the retry must pass the same bytes again.
_TLS_SOFT = (ssl.SSLWantReadError, ssl.SSLWantWriteError)
ALPN = ["http/1.1"]

# Latency histogram: log-linear (HDR-style) buckets over nanoseconds, 32 per power of two
# (about 3 % wide), exactly mergeable across workers and bounded in memory.
HIST_SUB_BITS = 5
HIST_SIZE = 64 << HIST_SUB_BITS


def hist_index(v: int) -> int:
    """Bucket of a latency in ns (the receive loop inlines this)."""
    if v < 64:
        return v if v > 0 else 0
    sh = v.bit_length() - 6
    return (sh << HIST_SUB_BITS) + (v >> sh)


def hist_lower(idx: int) -> int:
    """Smallest value (ns) that falls in bucket ``idx``."""
    if idx < 64:
        return idx
    sh = (idx >> HIST_SUB_BITS) - 1
    return (idx - (sh << HIST_SUB_BITS)) << sh


def hist_percentiles(hist: dict[int, int], qs: tuple[float, ...]) -> list[float | None]:
    """Percentiles (ns, bucket midpoints) of a sparse histogram."""
    total = sum(hist.values())
    if not total:
        return [None for _ in qs]
    items = sorted(hist.items())
    out: list[float | None] = []
    for q in qs:
        rank = q / 100 * total
        acc = 0
        for idx, n in items:
            acc += n
            if acc >= rank:
                lo, hi = hist_lower(idx), hist_lower(idx + 1)
                out.append((lo + hi) / 2)
                break
    return out


# --- targets and connecting ------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Where the load goes: a DERP server URL, or the baseline forwarder.

    TLS options (``https://`` only): ``cert_name`` is a DERP node's CertName, either a
    ``sha256-raw:<hex>`` pin of the leaf (self-signed IP certificates) or the name to verify
    instead of the URL's host; ``ca_file`` a PEM bundle to trust instead of the system's;
    ``insecure`` skips verification; ``fast_start`` logs in without the 101 round trip when
    the server sends derper's meta certificate (TLS 1.3), as Tailscale clients do.
    """

    kind: str  # "derp" | "baseline"
    host: str
    port: int
    path: str = "/derp"
    tls: bool = False
    label: str = ""
    cert_name: str | None = None
    ca_file: str | None = None
    insecure: bool = False
    fast_start: bool = True

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.tls else 80
        return host if self.port == default else f"{host}:{self.port}"

    @property
    def pinned(self) -> bool:
        return bool(self.cert_name and self.cert_name.startswith(PIN_PREFIX))

    @property
    def server_hostname(self) -> str:
        """SNI and the name to verify: ``cert_name`` when it is a name, else the URL's host."""
        return self.cert_name if self.cert_name and not self.pinned else self.host

    @property
    def verify(self) -> str | None:
        """How the server's certificate is checked: pin, ca-file, system, insecure (None: no TLS)."""
        if not self.tls:
            return None
        if self.insecure:
            return "insecure"
        if self.pinned:
            return "pin"
        return "ca-file" if self.ca_file else "system"


def parse_url(
    url: str,
    *,
    cert_name: str | None = None,
    ca_file: str | None = None,
    insecure: bool = False,
    fast_start: bool = True,
) -> Target:
    """A DERP target from a URL and the TLS options; a bad pin or CA file fails here, not in a worker."""
    u = urlsplit(url)
    if u.scheme not in ("http", "https"):
        raise ValueError(f"unsupported URL scheme {u.scheme!r}: want http:// or https://")
    if not u.hostname:
        raise ValueError(f"no host in URL {url!r}")
    tls = u.scheme == "https"
    if not tls and (cert_name or ca_file or insecure):
        raise ValueError("--cert-name, --ca-file and --insecure apply to https:// URLs only")
    target = Target(
        "derp",
        u.hostname,
        u.port or (443 if tls else 80),
        u.path or "/derp",
        tls,
        url,
        cert_name=cert_name or None,
        ca_file=ca_file or None,
        insecure=insecure,
        fast_start=fast_start,
    )
    if tls:
        client_context(target)
    return target


def client_context(target: Target) -> ssl.SSLContext:
    """The client SSLContext for ``target``: pinned, CA file, system CAs, or no verification.

    ALPN ``http/1.1`` as derphttp. A pinned context checks the pin itself when the handshake
    completes (``derpd.net.tls.pinned_context``: its socket class runs ``check_pin``).
    """
    if target.insecure and (target.pinned or target.ca_file):
        raise ValueError("--insecure contradicts a sha256-raw: --cert-name or --ca-file")
    if target.pinned and target.ca_file:
        raise ValueError("give either a sha256-raw: --cert-name (a pin) or --ca-file, not both")
    if target.insecure:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif target.pinned:
        assert target.cert_name is not None
        try:
            ctx = pinned_context(target.cert_name)
        except CertError as e:
            raise ValueError(f"--cert-name: {e}") from None
    else:
        try:
            ctx = ssl.create_default_context(cafile=target.ca_file)
        except (OSError, ssl.SSLError) as e:  # only a --ca-file can fail here
            raise ValueError(f"--ca-file {target.ca_file}: {e.strerror or e}") from None
    ctx.set_alpn_protocols(ALPN)
    return ctx


class HandshakeFailed(Exception):
    """The server refused the upgrade or the DERP handshake did not complete."""


def dial(target: Target, timeout: float, context: ssl.SSLContext | None = None) -> socket.socket:
    """A connected blocking socket with a timeout: TCP, or for TLS an SSLSocket after its handshake.

    ``context`` (TLS only) is reused across a worker's connections; built from the target if None.
    A certificate or pin mismatch raises ``ssl.SSLCertVerificationError``.
    """
    sock = socket.create_connection((target.host, target.port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if not target.tls:
        return sock
    try:
        ctx = context or client_context(target)
        return ctx.wrap_socket(sock, server_hostname=target.server_hostname)
    except BaseException:
        sock.close()
        raise


def _read_frame(sock: socket.socket, reader: FrameReader, want: int) -> bytes:
    """Payload of the next frame of type ``want``, skipping KeepAlive and anything else."""
    while True:
        frame = reader.read_frame()
        if frame is not None:
            if frame[0] == want:
                return frame[1]
            continue
        data = sock.recv(65536)
        if not data:
            raise HandshakeFailed(f"server closed the connection while waiting for {FrameType(want).name}")
        reader.feed(data)


def derp_handshake(sock: socket.socket, target: Target, key: NodePrivate, meta_key: bytes | None = None) -> bytes:
    """HTTP upgrade plus ServerKey/ClientInfo/ServerInfo on a blocking socket; the server's key.

    With ``meta_key`` (the server key from derper's meta certificate, TLS 1.3 only) the
    request carries ``Derp-Fast-Start: 1`` and the ClientInfo in the same write, and there is
    no 101: the server answers with ServerKey (checked against the meta key) and ServerInfo.
    """
    fast = "Derp-Fast-Start: 1\r\n" if meta_key else ""
    req = (
        f"GET {target.path} HTTP/1.1\r\nHost: {target.host_header}\r\n"
        f"Connection: Upgrade\r\nUpgrade: DERP\r\n{fast}\r\n"
    ).encode()
    info = ClientInfo(version=PROTOCOL_VERSION, can_ack_pings=True)
    if meta_key:
        sock.sendall(req + client_info_frame(key, meta_key, info))
        reader = FrameReader()
        server_pub = parse_server_key(_read_frame(sock, reader, FrameType.SERVER_KEY))
        if server_pub != meta_key:
            raise HandshakeFailed("fast start: ServerKey differs from the meta certificate's key")
        return _finish_login(sock, reader, key, server_pub)
    sock.sendall(req)
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise HandshakeFailed(f"server closed the connection during the HTTP upgrade: {buf[:200]!r}")
        buf += data
        if len(buf) > 64 * 1024:
            raise HandshakeFailed("HTTP response headers too long")
    head, _, rest = buf.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0]
    parts = status.split()
    if len(parts) < 2 or parts[1] != b"101":
        raise HandshakeFailed(f"upgrade refused: {status.decode(errors='replace')}")
    reader = FrameReader()
    reader.feed(rest)
    server_pub = parse_server_key(_read_frame(sock, reader, FrameType.SERVER_KEY))
    sock.sendall(client_info_frame(key, server_pub, info))
    return _finish_login(sock, reader, key, server_pub)


def _finish_login(sock: socket.socket, reader: FrameReader, key: NodePrivate, server_pub: bytes) -> bytes:
    open_server_info(key, server_pub, _read_frame(sock, reader, FrameType.SERVER_INFO))
    reader.read_frames()  # anything whole after ServerInfo is control traffic, not ours
    if reader.buffered:
        raise HandshakeFailed("unexpected partial frame right after ServerInfo")
    return server_pub


# --- the worker ------------------------------------------------------------------


@dataclass
class WorkerConfig:
    target: Target
    pair_ids: list[int]
    size: int
    mode: str  # "per-packet" | "batched"
    window: int | None
    rate: float | None  # packets/s per pair
    duration: float
    drain: float = 1.0
    batch_max: int = 256  # frames per write in batched rate mode
    stall_timeout: float = 0.2  # window mode: in-flight packets written off after this long
    connect_timeout: float = 10.0
    total_pairs: int = 1
    read_size: int = RECV_BUF  # at most this many bytes per receiver read (one recv, or one SSL read)
    recv_target: Target | None = None  # receivers dial this node of the region instead (a mesh hop per packet)


@dataclass
class Pair:
    """One sender→receiver pair and all its counters (hot fields are plain attributes)."""

    pid: int
    ssock: socket.socket
    rsock: socket.socket
    tmpl: bytearray  # one whole SendPacket frame, stamped in place
    t0: float = 0.0  # rate mode: this pair's first send time (phases are staggered)
    sent: int = 0
    received: int = 0
    received_timed: int = 0
    next_seq: int = 0  # receiver: one past the highest sequence number seen
    gaps: int = 0  # sequence numbers skipped and not (yet) seen: dropped by the relay
    late: int = 0  # arrived after a higher sequence number (out of order, or duplicate)
    written_off: int = 0  # window mode: presumed lost after a stall
    stalls: int = 0
    last_progress: float = 0.0
    pending: bytes | bytearray | None = None  # tail of a partially written frame (TLS: a whole refused write)
    blocked: bool = False  # waiting for the sender socket to become writable
    probe_seen: bool = False
    rbuf: bytearray = field(default_factory=lambda: bytearray(RECV_BUF))
    rfill: int = 0


class Worker:
    """Both ends of some pairs in one epoll loop.

    For a TLS target, ``__init__`` shadows ``_on_readable``, ``_send`` and ``_discard`` with
    their ``_tls`` variants (instance attributes), so the plain-TCP data path runs exactly the
    code it always did and pays nothing for TLS.
    """

    def __init__(self, cfg: WorkerConfig) -> None:
        self.cfg = cfg
        self.pairs: list[Pair] = []
        self.recv_fds: dict[int, Pair] = {}
        self.send_fds: dict[int, Pair] = {}
        self.ep = select.epoll()
        self.hist = [0] * HIST_SIZE
        self.timed = False
        self.sending = False
        self.tls = cfg.target.tls
        self.context: ssl.SSLContext | None = None
        self.soft: tuple[type[OSError], ...] = _SOFT  # "try again" on the cold paths
        self.tls_versions: dict[str, int] = {}
        self.tls_ciphers: dict[str, int] = {}
        self.tls_alpn: dict[str, int] = {}
        self.fast_starts = 0
        self.recv_target = cfg.recv_target or cfg.target
        self.recv_context: ssl.SSLContext | None = None
        if self.tls:
            self.context = client_context(cfg.target)
            self.recv_context = client_context(self.recv_target) if cfg.recv_target else self.context
            self.soft = _SOFT + _TLS_SOFT
            self._on_readable = self._on_readable_tls  # type: ignore[method-assign]
            self._send = self._send_tls  # type: ignore[method-assign]
            self._discard = self._discard_tls  # type: ignore[method-assign]

    # --- setup

    def _open(self, pair_id: int, role: int, key: NodePrivate) -> socket.socket:
        cfg = self.cfg
        if role == baseline.ROLE_RECEIVER:
            target, context = self.recv_target, self.recv_context
        else:
            target, context = cfg.target, self.context
        sock = dial(target, cfg.connect_timeout, context)
        try:
            if target.kind == "baseline":
                sock.sendall(baseline.hello(role, key.public))
            else:
                meta_key = None
                if isinstance(sock, ssl.SSLSocket):
                    self._note_tls(sock)
                    if target.fast_start:
                        meta_key = fast_start_key(sock)
                derp_handshake(sock, target, key, meta_key)
                self.fast_starts += meta_key is not None
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    def _note_tls(self, sock: ssl.SSLSocket) -> None:
        for counts, value in (
            (self.tls_versions, sock.version()),
            (self.tls_ciphers, (sock.cipher() or ("?",))[0]),
            (self.tls_alpn, sock.selected_alpn_protocol()),
        ):
            name = value or "none"
            counts[name] = counts.get(name, 0) + 1

    def tls_summary(self) -> dict[str, Any] | None:
        """What the worker's TLS connections negotiated (counts per value), or None for plain TCP."""
        if not self.tls:
            return None
        return {
            "versions": self.tls_versions,
            "ciphers": self.tls_ciphers,
            "alpn": self.tls_alpn,
            "fast_start": self.fast_starts,
            "connections": sum(self.tls_versions.values()),
        }

    def connect(self) -> None:
        """Connect and hand-shake every receiver, then every sender (blocking, with timeouts)."""
        cfg = self.cfg
        keys = [(NodePrivate.generate(), NodePrivate.generate()) for _ in cfg.pair_ids]
        ids = cfg.pair_ids
        rsocks = [self._open(pid, baseline.ROLE_RECEIVER, rk) for pid, (_, rk) in zip(ids, keys, strict=True)]
        for pid, (sk, rk), rsock in zip(ids, keys, rsocks, strict=True):
            ssock = self._open(pid, baseline.ROLE_SENDER, sk)
            tmpl = bytearray(send_packet_frame(rk.public, bytes(cfg.size)))
            p = Pair(pid, ssock, rsock, tmpl)
            self.pairs.append(p)
            self.recv_fds[rsock.fileno()] = p
            self.send_fds[ssock.fileno()] = p
            self.ep.register(rsock.fileno(), select.EPOLLIN)
            self.ep.register(ssock.fileno(), select.EPOLLIN)

    def probe(self, timeout: float = 5.0) -> None:
        """Resend a probe per pair until its receiver sees one: the relay knows every receiver."""
        deadline = time.monotonic() + timeout
        n = 0
        while True:
            waiting = [p for p in self.pairs if not p.probe_seen]
            if not waiting:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{len(waiting)} of {len(self.pairs)} receivers never got a probe packet within "
                    f"{timeout:g}s; is the server relaying?"
                )
            for p in waiting:
                if p.blocked:
                    continue
                frame = bytearray(p.tmpl)
                STAMP.pack_into(frame, STAMP_OFFSET, PROBE_FLAG | n, time.perf_counter_ns())
                try:
                    sent = p.ssock.send(frame)
                except self.soft:
                    if self.tls:  # OpenSSL may hold part of it: resend the same bytes
                        p.pending = bytes(frame)
                        self._want_write(p)
                    sent = 0
                if 0 < sent < len(frame):  # keep the stream framed
                    p.pending = bytes(frame[sent:])
                    self._want_write(p)
            n += 1
            self._poll_until(time.monotonic() + 0.05)
        self._poll_until(time.monotonic() + 0.05)  # swallow duplicate probes

    def _poll_until(self, t: float) -> None:
        while (left := t - time.monotonic()) > 0:
            self._dispatch(self.ep.poll(left))

    # --- sending

    def _want_write(self, p: Pair) -> None:
        p.blocked = True
        self.ep.modify(p.ssock.fileno(), select.EPOLLIN | select.EPOLLOUT)

    def _send(self, p: Pair, k: int) -> None:
        """Send up to ``k`` new packets; stop early (and wait for writability) if the socket is full."""
        if k <= 0 or p.blocked:
            return
        tmpl = p.tmpl
        flen = len(tmpl)
        seq = p.sent
        pack_into = STAMP.pack_into
        send = p.ssock.send
        clock = time.perf_counter_ns
        if self.cfg.mode == "per-packet":
            for _ in range(k):
                pack_into(tmpl, STAMP_OFFSET, seq, clock())
                try:
                    n = send(tmpl)
                except _SOFT:
                    self._want_write(p)
                    break
                seq += 1
                if n != flen:
                    p.pending = bytes(tmpl[n:])
                    self._want_write(p)
                    break
        else:
            buf = tmpl * k
            ts = clock()
            for i in range(k):
                pack_into(buf, STAMP_OFFSET + i * flen, seq + i, ts)
            try:
                n = send(buf)
            except _SOFT:
                n = 0
            whole, part = divmod(n, flen)
            seq += whole
            if n != len(buf):
                if part:  # finish the frame we started; frames never begun are simply not sent
                    p.pending = bytes(buf[n : (whole + 1) * flen])
                    seq += 1
                self._want_write(p)
        p.sent = seq

    def _send_tls(self, p: Pair, k: int) -> None:
        """``_send`` over an SSLSocket: one TLS record (one ``SSL_write``) per packet, or per burst.

        ``SSL_write`` either takes the whole buffer or raises SSLWant*Error after possibly
        committing part of it (records already encrypted, some maybe in the kernel); the retry
        must offer the same bytes (Python's SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER allows another
        buffer object). So a refused buffer becomes ``pending`` whole and its packets count as
        sent: they will be, once the socket drains.
        """
        if k <= 0 or p.blocked:
            return
        tmpl = p.tmpl
        flen = len(tmpl)
        seq = p.sent
        pack_into = STAMP.pack_into
        send = p.ssock.send
        clock = time.perf_counter_ns
        if self.cfg.mode == "per-packet":
            for _ in range(k):
                pack_into(tmpl, STAMP_OFFSET, seq, clock())
                try:
                    n = send(tmpl)
                except _TLS_SOFT:
                    p.pending = bytes(tmpl)
                    seq += 1
                    self._want_write(p)
                    break
                seq += 1
                if n != flen:  # not with OpenSSL's default modes; kept framed all the same
                    p.pending = bytes(tmpl[n:])
                    self._want_write(p)
                    break
        else:
            buf = tmpl * k
            ts = clock()
            for i in range(k):
                pack_into(buf, STAMP_OFFSET + i * flen, seq + i, ts)
            seq += k
            try:
                n = send(buf)
            except _TLS_SOFT:
                p.pending = buf  # a fresh bytearray that nothing writes to again
                self._want_write(p)
            else:
                if n != len(buf):
                    p.pending = bytes(buf[n:])
                    self._want_write(p)
        p.sent = seq

    def _on_writable(self, p: Pair) -> None:
        if p.pending is not None:
            try:
                n = p.ssock.send(p.pending)
            except self.soft:  # TLS: pending stays whole, as the retry rule wants
                return
            if n != len(p.pending):
                p.pending = p.pending[n:]
                return
            p.pending = None
        p.blocked = False
        self.ep.modify(p.ssock.fileno(), select.EPOLLIN)
        if self.sending and self.cfg.window:
            self._fill(p)

    def _fill(self, p: Pair) -> None:
        """Window mode: top the pair up to ``window`` packets in flight.

        A relay keeps each pair's packets in order (one TCP stream each way), so a skipped
        sequence number is a drop and frees its slot at once; only drops at the tail of a
        burst need the stall timeout.
        """
        inflight = p.sent - p.received - p.gaps - p.written_off
        if inflight < 0:  # written-off packets arrived after all
            p.written_off += inflight
            inflight = 0
        credit = (self.cfg.window or 0) - inflight
        if credit > 0:
            self._send(p, credit)

    def _send_due(self, now: float) -> float:
        """Rate mode: send every packet that is due; seconds until the next one is."""
        rate = self.cfg.rate
        assert rate
        cap = self.cfg.batch_max if self.cfg.mode == "batched" else 64
        nxt = float("inf")
        for p in self.pairs:
            if not p.blocked:
                due = int((now - p.t0) * rate) + 1 - p.sent
                if due > 0:
                    self._send(p, min(due, cap))
            t = p.t0 + p.sent / rate
            nxt = min(nxt, t)
        return max(0.0, nxt - time.monotonic())

    def _check_stalls(self, now: float) -> None:
        """Window mode: a relay that drops packets would otherwise freeze the window forever."""
        window = self.cfg.window or 0
        limit = self.cfg.stall_timeout
        for p in self.pairs:
            inflight = p.sent - p.received - p.gaps - p.written_off
            if inflight >= window and not p.blocked and now - p.last_progress > limit:
                p.written_off += inflight
                p.stalls += 1
                p.last_progress = now
                self._fill(p)

    # --- receiving

    def _on_readable(self, p: Pair) -> None:
        fill = p.rfill
        try:
            n = p.rsock.recv_into(memoryview(p.rbuf)[fill : fill + self.cfg.read_size])
        except _SOFT:
            return
        if n == 0:
            raise ConnectionError(f"pair {p.pid}: the server closed the receiver's connection")
        self._walk(p, fill + n)

    def _on_readable_tls(self, p: Pair) -> None:
        """``_on_readable`` over an SSLSocket: read until OpenSSL wants more from the kernel.

        Each ``recv_into`` returns at most one TLS record (16 KiB), and decrypted bytes can stay
        buffered inside OpenSSL (``pending()``) where epoll cannot see them, so one EPOLLIN means
        reading until SSLWantReadError, walking the frames whenever the buffer fills up.
        """
        view = memoryview(p.rbuf)
        recv_into = p.rsock.recv_into
        step = self.cfg.read_size
        while True:
            fill = start = p.rfill
            more = True
            while fill < RECV_BUF:
                try:
                    n = recv_into(view[fill : fill + step])
                except _TLS_SOFT:
                    more = False
                    break
                if n == 0:
                    raise ConnectionError(f"pair {p.pid}: the server closed the receiver's connection")
                fill += n
            if fill != start:
                self._walk(p, fill)
            if not more:
                return

    def _walk(self, p: Pair, end: int) -> None:
        """Count the whole frames in ``p.rbuf[:end]``, keep a partial one at the start of the buffer."""
        buf = p.rbuf
        now = time.perf_counter_ns()
        pos = 0
        cnt = 0
        nxt = p.next_seq
        hist = self.hist
        unpack_header = _HEADER.unpack_from
        unpack_stamp = STAMP.unpack_from
        data_types = _DATA_TYPES
        while end - pos >= FRAME_HEADER_LEN:
            ftype, length = unpack_header(buf, pos)
            stop = pos + FRAME_HEADER_LEN + length
            if stop > end:
                if stop - pos > RECV_BUF:
                    raise ConnectionError(f"pair {p.pid}: frame of {length} bytes is larger than the buffer")
                break
            if ftype in data_types:
                seq, ts = unpack_stamp(buf, pos + STAMP_OFFSET)
                if seq != nxt:
                    if seq >= PROBE_FLAG:
                        p.probe_seen = True
                        pos = stop
                        continue
                    if seq > nxt:
                        p.gaps += seq - nxt
                    else:  # counted as a gap when skipped; it was only late
                        p.late += 1
                        p.gaps -= 1
                        seq = nxt - 1
                nxt = seq + 1
                cnt += 1
                lat = now - ts
                if lat < 64:
                    hist[lat if lat > 0 else 0] += 1
                else:
                    sh = lat.bit_length() - 6
                    hist[(sh << HIST_SUB_BITS) + (lat >> sh)] += 1
            pos = stop
        if pos:
            rest = end - pos
            if rest:
                buf[:rest] = buf[pos:end]
            p.rfill = rest
        else:
            p.rfill = end
        if cnt:
            p.next_seq = nxt
            p.received += cnt
            if self.timed:
                p.received_timed += cnt
            p.last_progress = time.monotonic()
            if self.sending and self.cfg.window:
                self._fill(p)

    def _discard(self, p: Pair) -> None:
        """Sender sockets only get control frames (keepalives); read and drop them."""
        try:
            data = p.ssock.recv(65536)
        except _SOFT:
            return
        if not data:
            raise ConnectionError(f"pair {p.pid}: the server closed the sender's connection")

    def _discard_tls(self, p: Pair) -> None:
        while True:  # until OpenSSL has nothing buffered either
            try:
                data = p.ssock.recv(65536)
            except _TLS_SOFT:
                return
            if not data:
                raise ConnectionError(f"pair {p.pid}: the server closed the sender's connection")

    def _dispatch(self, events: list[tuple[int, int]]) -> None:
        recv_fds = self.recv_fds
        for fd, ev in events:
            p = recv_fds.get(fd)
            if p is not None:
                self._on_readable(p)
                continue
            p = self.send_fds[fd]
            if ev & select.EPOLLOUT:
                self._on_writable(p)
            if ev & (select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP):
                self._discard(p)

    # --- the timed run

    def run(self, start_at: float) -> dict[str, Any]:
        cfg = self.cfg
        ep = self.ep
        delay = start_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        self.hist = [0] * HIST_SIZE
        cpu0 = time.process_time()
        t0 = time.monotonic()
        end = t0 + cfg.duration
        self.timed = self.sending = True
        for p in self.pairs:
            p.last_progress = t0
            if cfg.rate:  # stagger pairs evenly over one inter-packet gap
                p.t0 = t0 + (p.pid / max(cfg.total_pairs, 1)) / cfg.rate
        if cfg.window:
            for p in self.pairs:
                self._fill(p)
        next_check = t0 + 0.05
        while (now := time.monotonic()) < end:
            if cfg.rate:
                timeout = min(self._send_due(now), end - now)
            else:
                if now >= next_check:
                    self._check_stalls(now)
                    next_check = now + 0.05
                timeout = min(0.05, end - now)
            self._dispatch(ep.poll(timeout))
        self.sending = False
        cpu1 = time.process_time()
        t1 = time.monotonic()
        self.timed = False
        # Drain: stop sending, wait for in-flight packets (TCP keeps order, so a pair is done
        # once its last sequence number arrived, whether or not the relay dropped some).
        deadline = t1 + cfg.drain
        while time.monotonic() < deadline:
            if all(p.next_seq >= p.sent and p.pending is None for p in self.pairs):
                break
            self._dispatch(ep.poll(0.01))
        drained = time.monotonic() - t1
        return {
            "pairs": len(self.pairs),
            "sent": sum(p.sent for p in self.pairs),
            "received": sum(p.received for p in self.pairs),
            "received_timed": sum(p.received_timed for p in self.pairs),
            "gaps": sum(p.gaps for p in self.pairs),
            "late": sum(p.late for p in self.pairs),
            "stalls": sum(p.stalls for p in self.pairs),
            "pair_received": [p.received_timed for p in self.pairs],
            "elapsed_s": t1 - t0,
            "drain_s": drained,
            "cpu_s": cpu1 - cpu0,
            "hist": {i: n for i, n in enumerate(self.hist) if n},
            "tls": self.tls_summary(),
        }

    def close(self) -> None:
        for p in self.pairs:
            p.ssock.close()
            p.rsock.close()
        self.ep.close()


def worker_main(conn: Connection, cfg: WorkerConfig) -> None:
    """Process entry: connect, report ready, wait for ("go", start_at), run, report the result."""
    w: Worker | None = None
    try:
        w = Worker(cfg)
        w.connect()
        w.probe()
        conn.send(("ready", len(w.pairs)))
        msg = conn.recv()
        if msg[0] != "go":
            return
        conn.send(("result", w.run(msg[1])))
    except (OSError, HandshakeFailed, RuntimeError) as e:  # expected failures: one line
        try:
            conn.send(("error", f"{type(e).__name__}: {e}"))
        except OSError:
            pass
    except BaseException as e:  # anything else is a bug here: report it with the traceback
        try:
            conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        except OSError:
            pass
    finally:
        if w is not None:
            w.close()
        conn.close()
