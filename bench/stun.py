"""STUN responses per second against any STUN server: a closed loop over many UDP sockets.

Each of ``--procs`` load processes opens ``--sockets`` UDP sockets, keeps ``--inflight`` Tailscale-style
binding requests outstanding on each, and sends a new one for every answer (a request unanswered for
``--resend`` seconds is counted lost and replaced, so a dropped datagram never stalls a socket). Works
against derpd, Go derper or any RFC 5389 server (Tailscale's request is a valid RFC 5389 request).

    .venv/bin/python -m bench.stun --target 127.0.0.1:3478 --server-pid $PID --sockets 64 --inflight 4

On Linux each ready socket is read with one ``recvmmsg`` and answered with one ``sendmmsg`` (through
ctypes), so the load costs about the kernel's work per request and little Python; ``--io plain`` uses a
``recv``/``send`` per datagram (the only way elsewhere), which on a 2-core machine is slower than derpd.

stdout: one JSON line ({"target", "procs", "sockets", "inflight", "duration_s", "sent", "answered",
"lost", "responses_per_s", "bad", "server_cpu_s", "server_us_per_response", "loadgen_cpu_pct",
"io"}); stderr: a table. Pin the server and the load to different cores (``taskset``) and check that
the server is the one saturated: ``loadgen_cpu_pct`` near 100 × ``--procs`` means the load is the limit.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import multiprocessing as mp
import select
import socket
import sys
import time
from multiprocessing.connection import Connection
from typing import Any

from bench.relay import tree_cpu_seconds
from derpd.net.mmsg import MMSG, IOVec, MMsgHdr
from stun.codec import BINDING_SUCCESS, binding_request

SLOT = 2048  # a reply is 32-100 bytes; anything longer is counted bad anyway
SUCCESS = BINDING_SUCCESS.to_bytes(2, "big")


class _Batch:
    """Buffers for up to ``slots`` replies in (one recvmmsg) and as many requests out (one sendmmsg).

    The sockets are connected, so no addresses: every outgoing message is the same request."""

    def __init__(self, slots: int, request: bytes, mmsg: tuple[Any, Any]) -> None:
        self.recvmmsg, self.sendmmsg = mmsg
        self.slots = slots
        self.data = ctypes.create_string_buffer(slots * SLOT)
        self.view = memoryview(self.data).cast("B")
        self.request = ctypes.create_string_buffer(request, len(request))
        self.iov = (IOVec * (slots + 1))()
        self.rx = (MMsgHdr * slots)()
        self.tx = (MMsgHdr * slots)()
        base = ctypes.addressof(self.data)
        self.iov[slots].iov_base, self.iov[slots].iov_len = ctypes.addressof(self.request), len(request)
        for i in range(slots):
            self.iov[i].iov_base, self.iov[i].iov_len = base + i * SLOT, SLOT
            self.rx[i].msg_hdr.msg_iov, self.rx[i].msg_hdr.msg_iovlen = ctypes.addressof(self.iov[i]), 1
            self.tx[i].msg_hdr.msg_iov, self.tx[i].msg_hdr.msg_iovlen = ctypes.addressof(self.iov[slots]), 1
        self.rx_at, self.tx_at = ctypes.addressof(self.rx), ctypes.addressof(self.tx)
        size = ctypes.sizeof(MMsgHdr)
        assert size % 4 == 0 and MMsgHdr.msg_len.offset % 4 == 0
        self.lengths = memoryview(self.rx).cast("B").cast("I")[MMsgHdr.msg_len.offset // 4 :: size // 4]

    def receive(self, fd: int) -> int:
        """Replies read now (0: none waiting, or the socket reported an ICMP error)."""
        got: int = self.recvmmsg(fd, self.rx_at, self.slots, socket.MSG_DONTWAIT, None)
        return max(got, 0)

    def good(self, got: int) -> int:
        """How many of the ``got`` replies just read are binding successes."""
        view = self.view
        return sum(
            n >= 20 and view[i * SLOT : i * SLOT + 2] == SUCCESS for i, n in enumerate(self.lengths[:got].tolist())
        )

    def send(self, fd: int, count: int) -> int:
        """Send ``count`` requests; how many the kernel took."""
        sent = 0
        while sent < count:
            n: int = self.sendmmsg(fd, self.tx_at + sent * ctypes.sizeof(MMsgHdr), count - sent, socket.MSG_DONTWAIT)
            if n <= 0:
                if ctypes.get_errno() == errno.EINTR:
                    continue
                break
            sent += n
        return sent


class _Flight:
    """One socket's requests in flight, as [send time, count] runs, oldest first.

    Answers come back in the order the requests went (one server socket, one client socket), so
    an answer settles the oldest; a run older than ``--resend`` was dropped somewhere (a full
    socket buffer), counts as lost and is sent again, so the socket keeps ``--inflight`` going."""

    __slots__ = ("count", "runs")

    def __init__(self) -> None:
        self.runs: list[list[float]] = []
        self.count = 0

    def sent(self, now: float, n: int) -> None:
        if n > 0:
            self.runs.append([now, n])
            self.count += n

    def answered(self, n: int) -> None:
        n = min(n, self.count)
        self.count -= n
        runs = self.runs
        while n:
            run = runs[0]
            if run[1] > n:
                run[1] -= n
                return
            n -= int(run[1])
            del runs[0]

    def expire(self, before: float) -> int:
        """Forget the runs sent before ``before``; how many requests they held."""
        n = 0
        runs = self.runs
        while runs and runs[0][0] < before:
            n += int(runs.pop(0)[1])
        self.count -= n
        return n


def _load(
    target: tuple[str, int],
    sockets: int,
    inflight: int,
    duration: float,
    resend: float,
    io: str,
    out: Connection,
) -> None:
    """One load process: counts of (sent, answered, lost, bad, own CPU seconds)."""
    family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
    socks: dict[int, socket.socket] = {}
    flights: dict[int, _Flight] = {}
    ep = select.epoll()
    sent = answered = lost = bad = 0
    request = binding_request()  # the same bytes each time: the server does not track transactions
    mmsg = MMSG if io == "mmsg" else None
    batch = _Batch(min(64, inflight), request, mmsg) if mmsg is not None else None
    cpu0 = time.process_time()

    def send_some(fd: int, n: int, now: float) -> int:
        s = socks[fd]
        took = 0
        for _ in range(n):
            try:
                s.send(request)
            except (BlockingIOError, ConnectionRefusedError):
                break
            took += 1
        flights[fd].sent(now, took)
        return took

    for _ in range(sockets):
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.connect(target)
        s.setblocking(False)
        socks[s.fileno()] = s
        flights[s.fileno()] = _Flight()
        ep.register(s.fileno(), select.EPOLLIN)
    now = time.monotonic()
    for fd in socks:
        sent += send_some(fd, inflight, now)
    end = now + duration
    next_check = now + resend
    while (now := time.monotonic()) < end:
        for fd, _ in ep.poll(min(0.05, max(0.0, end - now))):
            flight = flights[fd]
            if batch is not None:
                while got := batch.receive(fd):
                    good = batch.good(got)
                    answered += good
                    bad += got - good
                    flight.answered(got)
                    took = batch.send(fd, got)
                    flight.sent(now, took)
                    sent += took
                    if got < batch.slots:
                        break
                continue
            s = socks[fd]
            while True:
                try:
                    data = s.recv(SLOT)
                except (BlockingIOError, ConnectionRefusedError):
                    break
                if len(data) >= 20 and data[:2] == SUCCESS:
                    answered += 1
                else:
                    bad += 1
                flight.answered(1)
                sent += send_some(fd, 1, now)
        if now >= next_check:  # requests (or answers) dropped: count them lost, send as many again
            next_check = now + resend
            for fd, flight in flights.items():
                if gone := flight.expire(now - resend):
                    lost += gone
                if flight.count < inflight:
                    sent += send_some(fd, inflight - flight.count, now)
    out.send((sent, answered, lost, bad, time.process_time() - cpu0))
    out.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.stun", description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", required=True, help="HOST:PORT of the STUN server ([v6]:port for IPv6)")
    ap.add_argument("--server-pid", type=int, help="the server's PID, for its CPU time per response")
    ap.add_argument("--procs", type=int, default=1, help="load processes (default 1)")
    ap.add_argument("--sockets", type=int, default=64, help="UDP sockets per load process (default 64)")
    ap.add_argument("--inflight", type=int, default=4, help="requests outstanding per socket (default 4)")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds (default 5)")
    ap.add_argument("--resend", type=float, default=0.2, help="seconds without an answer before a socket's "
                    "requests count as lost and are sent again (default 0.2)")  # fmt: skip
    ap.add_argument("--io", choices=["mmsg", "plain"], default="mmsg" if MMSG else "plain",
                    help="mmsg: one recvmmsg + one sendmmsg per ready socket (Linux, the default there); "
                    "plain: one recv + one send per datagram")  # fmt: skip
    args = ap.parse_args(argv)
    if not (1 <= args.procs <= 64 and 1 <= args.sockets <= 4096 and 1 <= args.inflight <= 64):
        ap.error("--procs 1..64, --sockets 1..4096, --inflight 1..64")
    if not 0 < args.duration <= 600 or not 0 < args.resend <= 10:
        ap.error("--duration must be 0..600 s and --resend 0..10 s")
    if args.io == "mmsg" and MMSG is None:
        ap.error("--io mmsg needs Linux's recvmmsg/sendmmsg")
    host, _, port = args.target.rpartition(":")
    target = (host.strip("[]"), int(port))
    ctx = mp.get_context("fork")
    pipes, procs = [], []
    cpu0, t0 = tree_cpu_seconds(args.server_pid), time.perf_counter()
    for _ in range(args.procs):
        recv, send = ctx.Pipe(duplex=False)
        p = ctx.Process(
            target=_load, args=(target, args.sockets, args.inflight, args.duration, args.resend, args.io, send)
        )
        p.start()
        pipes.append(recv)
        procs.append(p)
    totals = [0.0] * 5
    for recv, p in zip(pipes, procs, strict=True):
        if recv.poll(args.duration + 30):
            for i, v in enumerate(recv.recv()):
                totals[i] += v
        p.join(10)
    elapsed = time.perf_counter() - t0
    cpu1 = tree_cpu_seconds(args.server_pid)
    sent, answered, lost, bad = (int(v) for v in totals[:4])
    cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
    result = {
        "target": args.target,
        "procs": args.procs,
        "sockets": args.sockets,
        "inflight": args.inflight,
        "duration_s": round(elapsed, 3),
        "sent": sent,
        "answered": answered,
        "lost": lost,
        "bad": bad,
        "responses_per_s": round(answered / args.duration, 1),
        "server_cpu_s": None if cpu is None else round(cpu, 3),
        "server_us_per_response": None if cpu is None or not answered else round(cpu / answered * 1e6, 2),
        "loadgen_cpu_pct": round(totals[4] / args.duration * 100, 1),
        "io": args.io,
    }
    print(json.dumps(result), flush=True)
    print(
        f"{'target':<22} {'procs':>5} {'socks':>5} {'infl':>4} {'resp/s':>10} {'lost':>7} {'srv µs/resp':>11}\n"
        f"{args.target:<22} {args.procs:>5} {args.sockets:>5} {args.inflight:>4} {result['responses_per_s']:>10} "
        f"{lost:>7} {result['server_us_per_response'] or '-':>11}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
