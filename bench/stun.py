"""STUN responses per second against any STUN server: a closed loop over many UDP sockets.

Each of ``--procs`` load processes opens ``--sockets`` UDP sockets, keeps ``--inflight`` Tailscale-style
binding requests outstanding on each, and sends a new one for every answer (a request unanswered for
``--resend`` seconds is counted lost and replaced, so a dropped datagram never stalls a socket). Works
against derpd, Go derper or any RFC 5389 server (Tailscale's request is a valid RFC 5389 request).

    .venv/bin/python -m bench.stun --target 127.0.0.1:3478 --server-pid $PID --sockets 64 --inflight 4

stdout: one JSON line ({"target", "procs", "sockets", "inflight", "duration_s", "sent", "answered",
"lost", "responses_per_s", "bad", "server_cpu_s", "server_us_per_response"}); stderr: a table. Pin the
server and the load to different cores (``taskset``) and check that the server is the one saturated.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import select
import socket
import sys
import time
from multiprocessing.connection import Connection

from bench.relay import tree_cpu_seconds
from stun.codec import BINDING_SUCCESS, binding_request


def _load(
    target: tuple[str, int], sockets: int, inflight: int, duration: float, resend: float, out: Connection
) -> None:
    """One load process: counts of (sent, answered, lost, bad)."""
    family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
    socks: dict[int, socket.socket] = {}
    last_answer: dict[int, float] = {}
    outstanding: dict[int, int] = {}
    ep = select.epoll()
    sent = answered = lost = bad = 0
    request = binding_request()  # the same bytes each time: the server does not track transactions
    for _ in range(sockets):
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.connect(target)
        s.setblocking(False)
        socks[s.fileno()] = s
        ep.register(s.fileno(), select.EPOLLIN)
    now = time.monotonic()
    for fd, s in socks.items():
        for _ in range(inflight):
            try:
                s.send(request)
                sent += 1
            except BlockingIOError:
                break
        outstanding[fd] = inflight
        last_answer[fd] = now
    end = now + duration
    next_check = now + resend
    while (now := time.monotonic()) < end:
        for fd, _ in ep.poll(min(0.05, max(0.0, end - now))):
            s = socks[fd]
            while True:
                try:
                    data = s.recv(2048)
                except (BlockingIOError, ConnectionRefusedError):
                    break
                if len(data) >= 20 and int.from_bytes(data[:2], "big") == BINDING_SUCCESS:
                    answered += 1
                else:
                    bad += 1
                try:
                    s.send(request)
                    sent += 1
                except (BlockingIOError, ConnectionRefusedError):
                    outstanding[fd] -= 1
            last_answer[fd] = now
        if now >= next_check:
            next_check = now + resend
            for fd, s in socks.items():
                if now - last_answer[fd] >= resend:  # its requests (or answers) were dropped: start again
                    lost += outstanding[fd]
                    outstanding[fd] = 0
                    for _ in range(inflight):
                        try:
                            s.send(request)
                            sent += 1
                            outstanding[fd] += 1
                        except (BlockingIOError, ConnectionRefusedError):
                            break
                    last_answer[fd] = now
    out.send((sent, answered, lost, bad))
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
    args = ap.parse_args(argv)
    if not (1 <= args.procs <= 64 and 1 <= args.sockets <= 4096 and 1 <= args.inflight <= 64):
        ap.error("--procs 1..64, --sockets 1..4096, --inflight 1..64")
    if not 0 < args.duration <= 600 or not 0 < args.resend <= 10:
        ap.error("--duration must be 0..600 s and --resend 0..10 s")
    host, _, port = args.target.rpartition(":")
    target = (host.strip("[]"), int(port))
    ctx = mp.get_context("fork")
    pipes, procs = [], []
    cpu0, t0 = tree_cpu_seconds(args.server_pid), time.perf_counter()
    for _ in range(args.procs):
        recv, send = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_load, args=(target, args.sockets, args.inflight, args.duration, args.resend, send))
        p.start()
        pipes.append(recv)
        procs.append(p)
    totals = [0, 0, 0, 0]
    for recv, p in zip(pipes, procs, strict=True):
        if recv.poll(args.duration + 30):
            for i, v in enumerate(recv.recv()):
                totals[i] += v
        p.join(10)
    elapsed = time.perf_counter() - t0
    cpu1 = tree_cpu_seconds(args.server_pid)
    sent, answered, lost, bad = totals
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
