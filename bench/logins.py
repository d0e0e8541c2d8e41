"""Logins per second against any DERP URL: connect (TCP, TLS), upgrade or fast start, DERP login, close.

What a relay pays per client that (re)connects: after a restart every node of a tailnet does this at
once. Each of ``--concurrency`` loops logs in with a fresh key, waits for ServerInfo (the login is then
complete: ``DerpClient.connect`` returns), closes, and starts again, for ``--duration`` seconds.

    .venv/bin/python -m bench.logins --url https://derp.test:3443/derp --dial 127.0.0.1:3443 \\
        --ca-file ca.pem --server-pid $PID --concurrency 8 --duration 5

stdout: one JSON line ({"target", "concurrency", "duration_s", "logins", "logins_per_s", "errors",
"latency_ms": {"p50", "p90", "p99", "max"}, "server_cpu_s", "server_ms_per_login", "tls"}); stderr: a
table. The load generator is Python too: pin it to other cores than the server (``taskset``) and check
that the server's CPU, not the generator's, is what saturates (``server_ms_per_login``).
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
import time

import trio

from bench.relay import tree_cpu_seconds
from derpd.net.client import DerpClient
from derpd.proto.keys import NodePrivate


def _percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(p / 100 * len(sorted_values)))]


async def _run(args: argparse.Namespace) -> dict[str, object]:
    ctx: ssl.SSLContext | None = None
    if args.url.startswith("https://") and not args.cert_name:
        ctx = ssl.create_default_context(cafile=args.ca_file)
        if args.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
    dial = None
    if args.dial:
        host, _, port = args.dial.rpartition(":")
        dial = (host.strip("[]"), int(port))
    keys = [NodePrivate.generate() for _ in range(256)]  # NaCl key generation is not what is measured
    latencies: list[float] = []
    errors: dict[str, int] = {}
    fast = {"fast_start": 0, "upgrade": 0}

    async def loop(index: int) -> None:
        n = 0
        while True:
            key = keys[(index * 31 + n) % len(keys)]
            n += 1
            t = time.perf_counter()
            try:
                with trio.fail_after(10):
                    client = await DerpClient.connect(
                        args.url, key, ssl_context=ctx, dial=dial, cert_name=args.cert_name
                    )
            except Exception as e:
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                await trio.sleep(0.01)
                continue
            latencies.append(time.perf_counter() - t)
            fast["fast_start" if getattr(client, "fast_start", False) else "upgrade"] += 1
            await client.aclose()

    cpu0, t0 = tree_cpu_seconds(args.server_pid), time.perf_counter()
    with trio.move_on_after(args.duration):
        async with trio.open_nursery() as nursery:
            for i in range(args.concurrency):
                nursery.start_soon(loop, i)
    elapsed = time.perf_counter() - t0
    cpu1 = tree_cpu_seconds(args.server_pid)
    lat = sorted(latencies)
    cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
    return {
        "target": args.url,
        "concurrency": args.concurrency,
        "duration_s": round(elapsed, 3),
        "logins": len(lat),
        "logins_per_s": round(len(lat) / elapsed, 1),
        "errors": errors,
        "latency_ms": {k: round(_percentile(lat, p) * 1e3, 2) for k, p in (("p50", 50), ("p90", 90), ("p99", 99))}
        | {"max": round(lat[-1] * 1e3, 2) if lat else None},
        "server_cpu_s": None if cpu is None else round(cpu, 3),
        "server_ms_per_login": None if cpu is None or not lat else round(cpu / len(lat) * 1e3, 3),
        "tls": "on" if args.url.startswith("https://") else "off",
        "logins_by_path": fast,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.logins", description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True, help="the DERP URL, http:// or https://")
    ap.add_argument("--dial", help="HOST:PORT to connect to instead of the URL's host (TLS still uses its name)")
    ap.add_argument("--cert-name", help="the node's CertName: a sha256-raw:<hex> pin, or the name to verify")
    ap.add_argument("--ca-file", help="PEM of CAs to trust for https:// instead of the system's")
    ap.add_argument("--insecure", action="store_true", help="do not verify the certificate at all")
    ap.add_argument("--server-pid", type=int, help="the server's PID, for its CPU time per login")
    ap.add_argument("--concurrency", type=int, default=8, help="logins in flight at once (default 8)")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds (default 5)")
    args = ap.parse_args(argv)
    if not 1 <= args.concurrency <= 1024 or not 0 < args.duration <= 600:
        ap.error("--concurrency must be 1..1024 and --duration 0..600 s")
    result = trio.run(_run, args)
    print(json.dumps(result), flush=True)
    lat = result["latency_ms"]
    assert isinstance(lat, dict)
    print(
        f"{'target':<40} {'conc':>4} {'logins/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'srv ms/login':>12} errors\n"
        f"{result['target']:<40} {result['concurrency']:>4} {result['logins_per_s']:>9} {lat['p50']:>7} "
        f"{lat['p99']:>7} {result['server_ms_per_login'] or '-':>12} {result['errors'] or 0}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
