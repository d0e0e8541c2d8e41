"""Memory per idle connection: N logged-in DERP clients held open, the server's RSS before and after.

What a relay pays to keep a tailnet's nodes connected when they are quiet, which is most of the
time: each of ``--connections`` clients connects (TCP, TLS, upgrade or fast start, the DERP login up to
ServerInfo, as ``bench.logins`` does: ``DerpClient.connect``) with a key of its own and then sends
nothing. Once all are in and ``--settle`` seconds have passed, the server's resident memory is read
again; the difference over the number held is the cost of one idle connection. Then everything is
closed and the RSS read a third time (what the server gives back).

    .venv/bin/python -m bench.idle --url http://127.0.0.1:3340/derp --server-pid $PID --connections 10000

``--warmup`` logins (opened and closed) come before the first reading, so that one-time costs (the
first TLS handshake, the first login's buffers) are not charged to the connections. The RSS is
``/proc/<pid>/status`` VmRSS of the server and its children (a ``--workers`` supervisor's workers).
Loopback only (the URL's host, or ``--dial``'s, must be a loopback address or ``localhost``): this
opens thousands of sockets. The soft RLIMIT_NOFILE is raised to the hard one; the server's own limit
(``/proc/<pid>/limits``) must allow the connections too, or the run stops before opening any.

stdout: one JSON line ({"target", "tls", "connections", "held", "errors", "warmup_errors", "open_s",
"logins_by_path", "server": {"baseline_mb", "loaded_mb", "closed_mb", "hwm_mb", "kb_per_connection",
"processes", "threads"}, "client_rss_mb"}); stderr: a table.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import trio

from bench.options import add_tls_options, client_context, dial_address
from bench.relay import BenchError, sample_tree
from derpd.net.client import DerpClient
from derpd.proto.keys import NodePrivate

MAX_CONNECTIONS = 50_000  # a bound on what one run may open (each is a socket here and one at the server)
FD_MARGIN = 64  # descriptors besides the connections (listeners, logs, the event loop)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def raise_nofile(want: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit; the soft limit now in force.

    Raises BenchError if even the hard limit is below ``want`` (the run could not open its sockets)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if soft != resource.RLIM_INFINITY and soft < want:
        raise BenchError(f"RLIMIT_NOFILE hard limit {soft} < {want}: raise it (ulimit -Hn) or open fewer connections")
    return soft


def server_nofile(pid: int) -> int | None:
    """The server's soft open-files limit from /proc/<pid>/limits (None: unlimited or unreadable)."""
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                value = line.split()[3]
                return None if value == "unlimited" else int(value)
    except (OSError, ValueError, IndexError):
        return None
    return None


def server_rss(pid: int) -> tuple[float, float, list[dict[str, Any]]]:
    """(VmRSS MB, VmHWM MB, per process) summed over the server's process tree."""
    samples = sample_tree(pid)
    procs = [{"pid": p, "rss_mb": round(s.rss_mb, 2)} for p, s in samples.items()]
    return sum(s.rss_mb for s in samples.values()), sum(s.hwm_mb for s in samples.values()), procs


def threads_of(pid: int) -> int | None:
    """The server's thread count (trio's worker threads for DNS or files show up here), None if unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def own_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Opener:
    """Logs clients in with ``concurrency`` loops until ``count`` are held (or the keys run out)."""

    def __init__(self, args: argparse.Namespace, keys: list[NodePrivate]) -> None:
        self.url = args.url
        self.cert_name = args.cert_name
        self.ctx = client_context(args)
        self.dial = dial_address(args) if args.dial else None
        self.keys = keys
        self.next_key = 0
        self.errors: dict[str, int] = {}
        self.by_path = {"fast_start": 0, "upgrade": 0}

    async def login(self) -> DerpClient | None:
        key = self.keys[self.next_key % len(self.keys)]
        self.next_key += 1
        try:
            with trio.fail_after(10):
                client = await DerpClient.connect(
                    self.url, key, ssl_context=self.ctx, dial=self.dial, cert_name=self.cert_name
                )
        except Exception as e:
            self.errors[type(e).__name__] = self.errors.get(type(e).__name__, 0) + 1
            return None
        self.by_path["fast_start" if client.fast_start else "upgrade"] += 1
        return client

    async def open(self, count: int, concurrency: int, held: list[DerpClient]) -> None:
        """Open until ``count`` are in ``held``; more than ``count`` failures in all ends it early."""
        budget = count  # failures tolerated before giving up (a server refusing everyone)

        async def loop() -> None:
            nonlocal budget
            while len(held) + pending[0] < count and budget > 0:
                pending[0] += 1
                client = await self.login()
                pending[0] -= 1
                if client is None:
                    budget -= 1
                    await trio.sleep(0.01)
                else:
                    held.append(client)

        pending = [0]
        async with trio.open_nursery() as nursery:
            for _ in range(min(concurrency, count)):
                nursery.start_soon(loop)


async def _close_all(clients: list[DerpClient]) -> None:
    async def close(chunk: list[DerpClient]) -> None:
        for c in chunk:
            with trio.move_on_after(2):
                await c.aclose()

    async with trio.open_nursery() as nursery:
        for i in range(0, len(clients), 256):
            nursery.start_soon(close, clients[i : i + 256])
    clients.clear()


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    n = args.connections
    keys = [NodePrivate.generate() for _ in range(n + args.warmup)]  # every held client a key of its own
    opener = Opener(args, keys)
    held: list[DerpClient] = []
    with trio.fail_after(args.timeout):
        if args.warmup:
            await opener.open(args.warmup, min(args.concurrency, args.warmup), held)
            await _close_all(held)
            await trio.sleep(args.settle)
        warm_errors = dict(opener.errors)
        opener.errors.clear()
        base_mb, _, _ = server_rss(args.server_pid)
        t0 = time.perf_counter()
        await opener.open(n, args.concurrency, held)
        open_s = time.perf_counter() - t0
        await trio.sleep(args.settle)
        loaded_mb, hwm_mb, procs = server_rss(args.server_pid)
        threads = threads_of(args.server_pid)
        client_mb = own_rss_mb()
        count = len(held)
        await _close_all(held)
        await trio.sleep(args.settle)
        closed_mb, _, _ = server_rss(args.server_pid)
    return {
        "target": args.url,
        "tls": "on" if args.url.startswith("https://") else "off",
        "connections": n,
        "held": count,
        "errors": opener.errors,
        "warmup_errors": warm_errors,
        "open_s": round(open_s, 2),
        "logins_by_path": opener.by_path,
        "server": {
            "baseline_mb": round(base_mb, 2),
            "loaded_mb": round(loaded_mb, 2),
            "closed_mb": round(closed_mb, 2),
            "hwm_mb": round(hwm_mb, 2),
            "kb_per_connection": round((loaded_mb - base_mb) * 1024 / count, 2) if count else None,
            "processes": procs,
            "threads": threads,
        },
        "client_rss_mb": round(client_mb, 1),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.idle", description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True, help="the DERP URL, http:// or https:// (a loopback host)")
    ap.add_argument("--dial", help="HOST:PORT to connect to instead of the URL's host (loopback)")
    add_tls_options(ap)
    ap.add_argument("--server-pid", type=int, required=True, help="the server's PID (its RSS is what is measured)")
    ap.add_argument("--connections", type=int, default=1000, help=f"idle clients to hold (1..{MAX_CONNECTIONS})")
    ap.add_argument("--concurrency", type=int, default=32, help="logins in flight at once (default 32)")
    ap.add_argument("--warmup", type=int, default=50, help="logins opened and closed before the baseline")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds to wait before each RSS reading")
    ap.add_argument("--timeout", type=float, default=300.0, help="the whole run's bound in seconds (<= 600)")
    args = ap.parse_args(argv)
    if not 1 <= args.connections <= MAX_CONNECTIONS or not 1 <= args.concurrency <= 1024:
        ap.error(f"--connections must be 1..{MAX_CONNECTIONS} and --concurrency 1..1024")
    if not 0 <= args.warmup <= 1000 or not 0 <= args.settle <= 60 or not 0 < args.timeout <= 600:
        ap.error("--warmup must be 0..1000, --settle 0..60 s, --timeout 0..600 s")
    host = dial_address(args)[0]
    if not _is_loopback(host):
        ap.error(f"loopback only: {host!r} is not a loopback address (give --dial 127.0.0.1:PORT)")
    try:
        raise_nofile(args.connections + FD_MARGIN)
        limit = server_nofile(args.server_pid)
        if limit is not None and limit < args.connections + FD_MARGIN:
            raise BenchError(f"the server's open-files limit is {limit}: it cannot hold {args.connections} connections")
        result = trio.run(_run, args)
    except BenchError as e:
        print(f"bench.idle: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result), flush=True)
    s = result["server"]
    print(
        f"{'target':<40} {'tls':>3} {'held':>6} {'errors':>6} {'open s':>6} {'base MB':>8} {'loaded MB':>9} "
        f"{'closed MB':>9} {'KB/conn':>8}\n"
        f"{result['target']:<40} {result['tls']:>3} {result['held']:>6} {sum(result['errors'].values()):>6} "
        f"{result['open_s']:>6} {s['baseline_mb']:>8} {s['loaded_mb']:>9} {s['closed_mb']:>9} "
        f"{s['kb_per_connection'] if s['kb_per_connection'] is not None else '-':>8}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
