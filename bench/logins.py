"""Logins per second against any DERP URL: connect (TCP, TLS), upgrade or fast start, DERP login, close.

What a relay pays per client that (re)connects: after a restart every node of a tailnet does this at
once. Each of ``--concurrency`` slots logs in with a key of its own, waits for ServerInfo (the login is
then complete), closes, and starts again, for ``--duration`` seconds.

    .venv/bin/python -m bench.logins --url https://derp.test:3443/derp --dial 127.0.0.1:3443 \\
        --ca-file ca.pem --server-pid $PID --concurrency 8 --duration 5

Two engines. ``raw`` (the default) is built to cost the load as little as possible, so that the
server is what saturates: non-blocking sockets in one epoll loop per process (``--procs``), every
ClientInfo frame sealed before the clock starts, the server's replies checked by their bytes (the 101,
the ServerKey frame with the key a first login learnt, a ServerInfo frame) but not opened. That first
login, and the discovery of fast start (derper's meta certificate), go through derpd's own client with
the full TLS verification asked for (``--cert-name`` pin, ``--ca-file``); the raw logins then verify
what ``--ca-file`` asks, and a pinned certificate only on that first login. ``client`` logs in through
``derpd.net.client.DerpClient`` every time (trio, h11, the login opened and checked): much slower,
the real client's work.

stdout: one JSON line ({"target", "engine", "procs", "concurrency", "duration_s", "logins",
"logins_per_s", "errors", "latency_ms": {"p50", "p90", "p99", "max"}, "server_cpu_s",
"server_ms_per_login", "load_cpu_s", "tls", "logins_by_path"}); stderr: a table. The load generator is
Python too: pin it to other cores than the server (``taskset``) and check that the server's CPU, not
the generator's (``load_cpu_s``), is what saturates; ``server_ms_per_login`` is the robust figure.
"""

from __future__ import annotations

import argparse
import errno
import heapq
import json
import os
import select
import socket
import ssl
import struct
import sys
import time
from array import array
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import trio

from bench.options import add_tls_options, client_context, dial_address
from bench.relay import tree_cpu_seconds
from derpd.net.client import DerpClient
from derpd.proto.frames import PROTOCOL_VERSION, ClientInfo, FrameType, client_info_frame
from derpd.proto.keys import KEY_LEN, NodePrivate

LOGIN_TIMEOUT = 10.0  # seconds, as derphttp's connect timeout
RETRY_AFTER = 0.01  # seconds before a slot tries again after an error
KEYS_PER_SLOT = 4  # a slot's logins rotate over its own keys: no two slots ever share one
MAGIC = b"DERP\xf0\x9f\x94\x91"
SERVER_KEY_FRAME_LEN = 5 + len(MAGIC) + KEY_LEN
_HEADER = struct.Struct(">BI")


def _percentile(sorted_values: list[float] | array[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(p / 100 * len(sorted_values)))]


# --- the client engine: derpd's own DerpClient for every login ------------------------------------


async def _run_client(args: argparse.Namespace) -> dict[str, object]:
    ctx = client_context(args)
    dial = dial_address(args) if args.dial else None
    keys = [NodePrivate.generate() for _ in range(KEYS_PER_SLOT * args.concurrency)]  # not measured
    latencies: list[float] = []
    errors: dict[str, int] = {}
    paths = {"fast_start": 0, "upgrade": 0}

    async def loop(index: int) -> None:
        n = 0
        while True:
            key = keys[index * KEYS_PER_SLOT + n % KEYS_PER_SLOT]
            n += 1
            t = time.perf_counter()
            try:
                with trio.fail_after(LOGIN_TIMEOUT):
                    client = await DerpClient.connect(
                        args.url, key, ssl_context=ctx, dial=dial, cert_name=args.cert_name
                    )
            except Exception as e:
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                await trio.sleep(RETRY_AFTER)
                continue
            latencies.append(time.perf_counter() - t)
            paths["fast_start" if client.fast_start else "upgrade"] += 1
            await client.aclose()

    cpu0, load0, t0 = tree_cpu_seconds(args.server_pid), _own_cpu(), time.perf_counter()
    with trio.move_on_after(args.duration):
        async with trio.open_nursery() as nursery:
            for i in range(args.concurrency):
                nursery.start_soon(loop, i)
    elapsed = time.perf_counter() - t0
    cpu1, load1 = tree_cpu_seconds(args.server_pid), _own_cpu()
    return _result(args, "client", 1, elapsed, latencies, errors, paths, cpu0, cpu1, load1 - load0)


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


# --- the raw engine: non-blocking sockets in an epoll loop --------------------------------------


async def _probe(args: argparse.Namespace) -> tuple[bytes, bool]:
    """The server's key and whether it offers fast start, from one login with the full verification."""
    dial = dial_address(args) if args.dial else None
    with trio.fail_after(LOGIN_TIMEOUT):
        client = await DerpClient.connect(
            args.url, NodePrivate.generate(), ssl_context=client_context(args), dial=dial, cert_name=args.cert_name
        )
    try:
        return bytes(client.server_key), bool(client.fast_start)
    finally:
        await client.aclose()


@dataclass
class _Plan:
    """What every login of a run sends: fixed before the clock starts."""

    address: tuple[str, int]
    family: int
    request: bytes  # the upgrade request, or (fast start) the request and the ClientInfo frame
    fast_start: bool
    server_key_frame: bytes  # the ServerKey frame the server must send
    ssl_context: ssl.SSLContext | None
    server_hostname: str | None


def _plan(args: argparse.Namespace, server_key: bytes, fast_start: bool) -> _Plan:
    parts = urlsplit(args.url)
    host = parts.hostname or ""
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    shown = f"[{host}]" if ":" in host else host
    host_header = shown if port in (80, 443) else f"{shown}:{port}"
    lines = [f"GET {parts.path or '/derp'} HTTP/1.1", f"Host: {host_header}", "User-Agent: derpd-client",
             "Connection: Upgrade", "Upgrade: DERP"]  # fmt: skip
    if fast_start:
        lines.append("Derp-Fast-Start: 1")
    request = ("\r\n".join(lines) + "\r\n\r\n").encode()
    address = dial_address(args)
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    ctx: ssl.SSLContext | None = None
    name: str | None = None
    if https:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.set_alpn_protocols(["http/1.1"])
        if args.ca_file and not args.insecure and not args.cert_name:
            ctx.load_verify_locations(cafile=args.ca_file)
            name = host
        else:  # a pin was checked by the probe's login; the raw logins do not repeat it
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if args.cert_name and not args.cert_name.startswith("sha256-raw:"):
            name = args.cert_name
    server_key_frame = _HEADER.pack(FrameType.SERVER_KEY, len(MAGIC) + KEY_LEN) + MAGIC + server_key
    return _Plan(address, family, request, fast_start, server_key_frame, ctx, name or (host if https else None))


# Slot states
_CONNECTING, _HANDSHAKE, _HEAD, _SERVER_KEY, _SERVER_INFO = range(5)


@dataclass
class _Slot:
    index: int
    frames: list[bytes]  # this slot's ClientInfo frames, one per key
    n: int = 0
    sock: socket.socket | None = None
    tls: ssl.SSLObject | None = None
    incoming: ssl.MemoryBIO | None = None
    outgoing: ssl.MemoryBIO | None = None
    state: int = _CONNECTING
    started: float = 0.0
    buf: bytearray = field(default_factory=bytearray)


class _Engine:
    """One process's logins: every slot's socket in one epoll, edge-triggered, no tasks and no locks."""

    def __init__(self, plan: _Plan, slots: list[_Slot]) -> None:
        self.plan = plan
        self.slots = slots
        self.epoll = select.epoll()
        self.by_fd: dict[int, _Slot] = {}
        self.latencies = array("d")
        self.errors: dict[str, int] = {}
        self.paths = {"fast_start": 0, "upgrade": 0}
        self.retry: list[tuple[float, int]] = []  # (when, slot index)

    def run(self, until: float) -> None:
        for slot in self.slots:
            self._start(slot)
        poll = self.epoll.poll
        by_fd = self.by_fd
        next_sweep = time.monotonic() + 1.0
        while True:
            now = time.monotonic()
            if now >= until:
                break
            timeout = min(until - now, 0.1)
            if self.retry:
                timeout = max(0.0, min(timeout, self.retry[0][0] - now))
            for fd, ev in poll(timeout):
                ready = by_fd.get(fd)
                if ready is not None:
                    self._event(ready, ev)
            now = time.monotonic()
            while self.retry and self.retry[0][0] <= now:
                self._start(self.slots[heapq.heappop(self.retry)[1]])
            if now >= next_sweep:
                next_sweep = now + 1.0
                for slot in self.slots:
                    if slot.sock is not None and now - slot.started > LOGIN_TIMEOUT:
                        self._fail(slot, "TimeoutError")
        for slot in self.slots:
            self._close(slot)
        self.epoll.close()

    def _start(self, slot: _Slot) -> None:
        plan = self.plan
        sock = socket.socket(plan.family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        slot.sock = sock
        slot.started = time.monotonic()
        slot.buf.clear()
        fd = sock.fileno()
        self.by_fd[fd] = slot
        self.epoll.register(fd, select.EPOLLIN | select.EPOLLOUT | select.EPOLLET)
        err = sock.connect_ex(plan.address)
        slot.state = _CONNECTING
        if err == 0:
            self._connected(slot)
        elif err != errno.EINPROGRESS:
            self._fail(slot, errno.errorcode.get(err, "OSError"))

    def _connected(self, slot: _Slot) -> None:
        plan = self.plan
        if plan.ssl_context is None:
            self._send_request(slot)
            return
        slot.incoming, slot.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        slot.tls = plan.ssl_context.wrap_bio(slot.incoming, slot.outgoing, server_hostname=plan.server_hostname)
        slot.state = _HANDSHAKE
        self._handshake(slot)

    def _handshake(self, slot: _Slot) -> None:
        assert slot.tls is not None
        try:
            slot.tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush_tls(slot)
            return
        self._flush_tls(slot)
        self._send_request(slot)

    def _send_request(self, slot: _Slot) -> None:
        plan = self.plan
        frame = slot.frames[slot.n % len(slot.frames)]
        slot.n += 1
        if plan.fast_start:  # the whole login in one flight; the ServerKey frame still comes first
            self._send(slot, plan.request + frame)
            slot.state = _SERVER_KEY
        else:  # the ClientInfo frame waits for the 101 and the ServerKey
            self._send(slot, plan.request)
            slot.state = _HEAD

    def _send(self, slot: _Slot, data: bytes) -> None:
        """Small writes into an empty socket buffer: the kernel takes them whole."""
        assert slot.sock is not None
        if slot.tls is not None:
            slot.tls.write(data)
            self._flush_tls(slot)
        else:
            slot.sock.send(data)

    def _flush_tls(self, slot: _Slot) -> None:
        assert slot.outgoing is not None and slot.sock is not None
        if slot.outgoing.pending:
            slot.sock.send(slot.outgoing.read())

    def _event(self, slot: _Slot, ev: int) -> None:
        sock = slot.sock
        if sock is None:
            return
        try:
            if slot.state == _CONNECTING:
                if ev & (select.EPOLLERR | select.EPOLLHUP):
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    self._fail(slot, errno.errorcode.get(err, "ConnectionError"))
                    return
                if ev & select.EPOLLOUT:
                    self._connected(slot)
                return
            if not ev & (select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP):
                return
            data = sock.recv(65536)
            if not data:
                self._fail(slot, "ConnectionClosed")
                return
            if slot.tls is not None:
                assert slot.incoming is not None
                slot.incoming.write(data)
                if slot.state == _HANDSHAKE:
                    self._handshake(slot)
                    if slot.state == _HANDSHAKE:
                        return
                data = self._decrypt(slot)
                if not data:
                    return
            self._received(slot, data)
        except (OSError, ssl.SSLError) as e:
            self._fail(slot, type(e).__name__)

    def _decrypt(self, slot: _Slot) -> bytes:
        assert slot.tls is not None
        out = bytearray()
        while True:
            try:
                chunk = slot.tls.read(65536)
            except ssl.SSLWantReadError:
                break
            if not chunk:
                break
            out += chunk
        return bytes(out)

    def _received(self, slot: _Slot, data: bytes) -> None:
        plan = self.plan
        buf = slot.buf
        buf += data
        if slot.state == _HEAD:
            head_end = buf.find(b"\r\n\r\n")
            if head_end < 0:
                return
            if not buf.startswith(b"HTTP/1.1 101 "):
                self._fail(slot, "NotSwitchingProtocols")
                return
            del buf[: head_end + 4]
            slot.state = _SERVER_KEY
        if slot.state == _SERVER_KEY:
            if len(buf) < SERVER_KEY_FRAME_LEN:
                return
            if buf[:SERVER_KEY_FRAME_LEN] != plan.server_key_frame:
                self._fail(slot, "WrongServerKey")
                return
            del buf[:SERVER_KEY_FRAME_LEN]
            if not plan.fast_start:
                self._send(slot, slot.frames[(slot.n - 1) % len(slot.frames)])
            slot.state = _SERVER_INFO
        if slot.state == _SERVER_INFO:
            if len(buf) < 5:
                return
            ftype, length = _HEADER.unpack_from(buf)
            if ftype != FrameType.SERVER_INFO:
                self._fail(slot, f"UnexpectedFrame{ftype:#04x}")
                return
            if len(buf) < 5 + length:
                return
            self.latencies.append(time.monotonic() - slot.started)
            self.paths["fast_start" if plan.fast_start else "upgrade"] += 1
            self._close(slot)
            self._start(slot)

    def _fail(self, slot: _Slot, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1
        self._close(slot)
        heapq.heappush(self.retry, (time.monotonic() + RETRY_AFTER, slot.index))

    def _close(self, slot: _Slot) -> None:
        sock = slot.sock
        if sock is None:
            return
        self.by_fd.pop(sock.fileno(), None)
        sock.close()  # closing the descriptor takes it out of the epoll set
        slot.sock = slot.tls = slot.incoming = slot.outgoing = None


def _slots(server_key: bytes, count: int) -> list[_Slot]:
    """``count`` slots, each with ClientInfo frames sealed (as DerpClient's) for keys of its own."""
    info = ClientInfo(version=PROTOCOL_VERSION, can_ack_pings=True)
    out = []
    for i in range(count):
        keys = [NodePrivate.generate() for _ in range(KEYS_PER_SLOT)]
        out.append(_Slot(i, [client_info_frame(k, server_key, info) for k in keys]))
    return out


def _worker(plan: _Plan, server_key: bytes, count: int, go: int, report: int, duration: float) -> None:
    """One load process: seal its frames, wait for the go byte, log in for ``duration``, report."""
    engine = _Engine(plan, _slots(server_key, count))
    os.write(report, b"r")
    if os.read(go, 1) != b"g":
        return
    engine.run(time.monotonic() + duration)
    doc = {"errors": engine.errors, "paths": engine.paths, "latencies": engine.latencies.tobytes().hex()}
    data = json.dumps(doc).encode()
    view = memoryview(data)
    while view:
        n = os.write(report, view)
        view = view[n:]
    os.close(report)


def _run_raw(args: argparse.Namespace) -> dict[str, object]:
    server_key, fast_start = trio.run(_probe, args)
    if args.fast_start == "off":
        fast_start = False
    elif args.fast_start == "on":
        fast_start = True
    plan = _plan(args, server_key, fast_start)
    procs = min(args.procs, args.concurrency)
    shares = [args.concurrency // procs + (i < args.concurrency % procs) for i in range(procs)]
    children: list[tuple[int, int, int]] = []  # pid, go fd, report fd
    for share in shares:
        go_r, go_w = os.pipe()
        rep_r, rep_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns into the parent's code
            code = 0
            try:
                os.close(go_w)
                os.close(rep_r)
                _worker(plan, server_key, share, go_r, rep_w, args.duration)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        os.close(go_r)
        os.close(rep_w)
        children.append((pid, go_w, rep_r))
    for _, _, rep in children:
        if os.read(rep, 1) != b"r":
            raise SystemExit("bench.logins: a load process failed to start")
    cpu0, load0, t0 = tree_cpu_seconds(args.server_pid), _own_cpu(), time.perf_counter()
    for _, go, _ in children:
        os.write(go, b"g")
    reports = []
    for pid, go, rep in children:
        chunks = []
        while chunk := os.read(rep, 1 << 20):
            chunks.append(chunk)
        os.close(rep)
        os.close(go)
        os.waitpid(pid, 0)
        if chunks:
            reports.append(json.loads(b"".join(chunks)))
    elapsed = time.perf_counter() - t0
    cpu1, load1 = tree_cpu_seconds(args.server_pid), _own_cpu()
    latencies: list[float] = []
    errors: dict[str, int] = {}
    paths = {"fast_start": 0, "upgrade": 0}
    for r in reports:
        latencies.extend(array("d", bytes.fromhex(r["latencies"])))
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
        for k, v in r["paths"].items():
            paths[k] += v
    if len(reports) < len(children):
        errors["LoadProcessFailed"] = len(children) - len(reports)
    return _result(args, "raw", procs, elapsed, latencies, errors, paths, cpu0, cpu1, load1 - load0)


def _result(
    args: argparse.Namespace,
    engine: str,
    procs: int,
    elapsed: float,
    latencies: list[float],
    errors: dict[str, int],
    paths: dict[str, int],
    cpu0: float | None,
    cpu1: float | None,
    load_cpu: float,
) -> dict[str, object]:
    lat = sorted(latencies)
    cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
    return {
        "target": args.url,
        "engine": engine,
        "procs": procs,
        "concurrency": args.concurrency,
        "duration_s": round(elapsed, 3),
        "logins": len(lat),
        "logins_per_s": round(len(lat) / elapsed, 1),
        "errors": errors,
        "latency_ms": {k: round(_percentile(lat, p) * 1e3, 2) for k, p in (("p50", 50), ("p90", 90), ("p99", 99))}
        | {"max": round(lat[-1] * 1e3, 2) if lat else None},
        "server_cpu_s": None if cpu is None else round(cpu, 3),
        "server_ms_per_login": None if cpu is None or not lat else round(cpu / len(lat) * 1e3, 3),
        "load_cpu_s": round(load_cpu, 3),
        "tls": "on" if args.url.startswith("https://") else "off",
        "logins_by_path": paths,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.logins", description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True, help="the DERP URL, http:// or https://")
    ap.add_argument("--dial", help="HOST:PORT to connect to instead of the URL's host (TLS still uses its name)")
    add_tls_options(ap)
    ap.add_argument("--server-pid", type=int, help="the server's PID, for its CPU time per login")
    ap.add_argument("--concurrency", type=int, default=8, help="logins in flight at once (default 8)")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds (default 5)")
    ap.add_argument("--engine", choices=("raw", "client"), default="raw", help="see above (default raw)")
    ap.add_argument("--procs", type=int, default=1, help="raw engine: load processes sharing the slots (default 1)")
    ap.add_argument(
        "--fast-start", choices=("auto", "on", "off"), default="auto",
        help="raw engine: skip the 101 as derphttp does when the server sends a meta certificate (auto)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    if not 1 <= args.concurrency <= 4096 or not 0 < args.duration <= 600 or not 1 <= args.procs <= 64:
        ap.error("--concurrency must be 1..4096, --duration 0..600 s and --procs 1..64")
    result = trio.run(_run_client, args) if args.engine == "client" else _run_raw(args)
    print(json.dumps(result), flush=True)
    lat = result["latency_ms"]
    assert isinstance(lat, dict)
    print(
        f"{'target':<40} {'conc':>4} {'logins/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'srv ms/login':>12} "
        f"{'load cpu s':>10} errors\n"
        f"{result['target']:<40} {result['concurrency']:>4} {result['logins_per_s']:>9} {lat['p50']:>7} "
        f"{lat['p99']:>7} {result['server_ms_per_login'] or '-':>12} {result['load_cpu_s']:>10} "
        f"{result['errors'] or 0}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
