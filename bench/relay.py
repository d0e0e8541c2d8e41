"""Relay benchmark: N sender→receiver pairs through a DERP server (or the baseline forwarder).

    python -m bench.relay --url http://127.0.0.1:3340/derp --pairs 10 --size 1200 --window 32
    python -m bench.relay --baseline --pairs 10 --size 1200 --mode batched
    python -m bench.relay --compare --url http://127.0.0.1:3340/derp --server-pid PID
    python -m bench.relay --sweep --url http://127.0.0.1:3340/derp --server-pid PID
    python -m bench.relay --url https://127.0.0.1:3340/derp --cert-name sha256-raw:<hex> --server-pid PID

Each run prints one JSON line on stdout (a sweep prints one per run) and a human table
on stderr. Load comes from ``--workers`` separate processes (``bench.loadgen``), each
owning whole pairs; the parent only coordinates and samples ``/proc`` of the server.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from derpd.proto.frames import MAX_PACKET_SIZE

from .loadgen import MIN_SIZE, RECV_BUF, Target, WorkerConfig, hist_lower, hist_percentiles, parse_url, worker_main
from .options import add_tls_options

MODES = ("per-packet", "batched")
REPO_ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """The benchmark could not run (server unreachable, a worker failed, ...)."""


@dataclass(frozen=True)
class RunSpec:
    pairs: int = 10
    size: int = 1200
    mode: str = "per-packet"
    window: int | None = 32
    rate: float | None = None
    duration: float = 5.0
    drain: float = 1.0
    workers: int | None = None  # default min(pairs, cpu_count)
    batch_max: int = 256
    connect_timeout: float = 10.0
    read_size: int = RECV_BUF  # receivers' bytes per read (Tailscale's client: a 4 KiB bufio.Reader)


# --- /proc sampling -------------------------------------------------------------


@dataclass(frozen=True)
class ProcSample:
    cpu_s: float  # utime + stime of all threads
    rss_mb: float
    hwm_mb: float


def sample_proc(pid: int) -> ProcSample:
    """CPU seconds and resident memory of a process, from /proc (Linux only)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError as e:
        raise BenchError(f"cannot read /proc/{pid}: {e.strerror} (is --server-pid right?)") from None
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may contain spaces
    cpu = _schedstat_cpu(pid)
    if cpu is None:
        cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)
    mem = {}
    for line in status.splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            mem[name] = int(value.split()[0]) / 1024
    return ProcSample(cpu, mem.get("VmRSS", 0.0), mem.get("VmHWM", 0.0))


def process_tree(pid: int) -> list[int]:
    """``pid`` and every live descendant (a ``--workers`` supervisor's workers), via /proc's children lists."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except OSError:
            continue  # gone in between, or no children file (old kernel): count what we have
    return out


def sample_tree(pid: int) -> dict[int, ProcSample]:
    """One sample per process of the tree; a process that exits mid-sample is left out."""
    samples = {pid: sample_proc(pid)}
    for p in process_tree(pid)[1:]:
        try:
            samples[p] = sample_proc(p)
        except BenchError:
            pass
    return samples


def sample_trees(pids: Sequence[int]) -> dict[int, ProcSample]:
    """``sample_tree`` of each pid, merged (two nodes of a region measured as one)."""
    samples: dict[int, ProcSample] = {}
    for pid in pids:
        samples.update(sample_tree(pid))
    return samples


def tree_cpu_seconds(pid: int | None) -> float | None:
    """CPU seconds of ``pid`` and its children (a ``--workers`` supervisor's workers); None without a pid
    or when it cannot be read (the other benches report no server CPU then)."""
    if pid is None:
        return None
    try:
        return sum(s.cpu_s for s in sample_tree(pid).values())
    except BenchError:
        return None


def _schedstat_cpu(pid: int) -> float | None:
    """On-CPU seconds of all threads in ns precision (stat's clock ticks are 10 ms)."""
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            total += int((task / "schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return total / 1e9


def sample_host() -> tuple[int, ...]:
    """Whole-box CPU ticks (user nice system idle iowait irq softirq steal) from /proc/stat.

    Per-process CPU misses softirq time, which is where loopback TCP's receive path is
    mostly accounted; on a 2-core box that is a large share, so it is reported separately.
    """
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return ()
    return tuple(int(x) for x in first[1:9])


def host_usage(before: tuple[int, ...], after: tuple[int, ...]) -> dict[str, Any] | None:
    """Box-wide CPU use between two samples, in % of one core (like the per-process numbers)."""
    if len(before) < 8 or len(after) < 8:
        return None
    d = [b - a for a, b in zip(before, after, strict=True)]
    total = sum(d)
    if total <= 0:
        return None
    cpus = os.cpu_count() or 1
    user, nice, system, idle, iowait, irq, softirq, steal = d

    def pct(x: int) -> float:
        return round(100 * cpus * x / total, 1)

    return {
        "cpus": cpus,
        "busy_pct": pct(total - idle - iowait),
        "user_pct": pct(user + nice),
        "system_pct": pct(system),
        "softirq_pct": pct(irq + softirq),
        "steal_pct": pct(steal),
    }


# --- one run --------------------------------------------------------------------


def _wait_all(conns: list[Connection], want: str, timeout: float) -> list[Any]:
    """One ``(want, value)`` message from every worker, or BenchError."""
    out: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    while len(out) < len(conns):
        left = deadline - time.monotonic()
        if left <= 0:
            raise BenchError(f"{len(conns) - len(out)} worker(s) did not report {want!r} within {timeout:g}s")
        for c in wait([c for i, c in enumerate(conns) if i not in out], left):
            i = conns.index(c)  # type: ignore[arg-type]
            try:
                kind, value = c.recv()  # type: ignore[union-attr]
            except EOFError:
                raise BenchError(f"worker {i} exited without reporting {want!r}") from None
            if kind == "error":
                raise BenchError(f"worker {i} failed: {value}")
            out[i] = value
    return [out[i] for i in range(len(conns))]


def check_spec(spec: RunSpec) -> None:
    """Reject a load that cannot run, before any process is started."""
    if spec.size < MIN_SIZE:
        raise BenchError(f"--size must be at least {MIN_SIZE} (sequence number + timestamp)")
    if spec.size > MAX_PACKET_SIZE:
        raise BenchError(f"--size must be at most {MAX_PACKET_SIZE} (DERP's packet limit)")
    if (spec.window is None) == (spec.rate is None):
        raise BenchError("exactly one of window and rate must be set")
    if spec.window is not None and spec.window < 1:
        raise BenchError("--window must be at least 1")
    if spec.rate is not None and spec.rate <= 0:
        raise BenchError("--rate must be positive")
    if spec.pairs < 1 or spec.duration <= 0 or spec.drain < 0:
        raise BenchError("--pairs must be at least 1, --duration positive, --drain not negative")
    if spec.mode not in MODES:
        raise BenchError(f"--mode must be one of {', '.join(MODES)}")


def run_load(
    target: Target, spec: RunSpec, server_pids: Sequence[int] = (), recv_target: Target | None = None
) -> dict[str, Any]:
    """Run one timed load against ``target``; the result dict is what gets printed as JSON.

    ``recv_target``: the receivers log in to this other node of the same region (``--mesh-with``),
    so every packet crosses the mesh; ``server_pids`` then names both nodes, and CPU per packet is
    the region's: the sender's node and the receiver's together."""
    check_spec(spec)
    nworkers = max(1, min(spec.workers or os.cpu_count() or 1, spec.pairs))
    slices = [list(range(i, spec.pairs, nworkers)) for i in range(nworkers)]
    ctx = mp.get_context("spawn")
    conns: list[Connection] = []
    procs = []
    for ids in slices:
        parent, child = ctx.Pipe()
        cfg = WorkerConfig(
            target=target,
            pair_ids=ids,
            size=spec.size,
            mode=spec.mode,
            window=spec.window,
            rate=spec.rate,
            duration=spec.duration,
            drain=spec.drain,
            batch_max=spec.batch_max,
            connect_timeout=spec.connect_timeout,
            total_pairs=spec.pairs,
            read_size=spec.read_size,
            recv_target=recv_target,
        )
        proc = ctx.Process(target=worker_main, args=(child, cfg), daemon=True)
        proc.start()
        child.close()
        conns.append(parent)
        procs.append(proc)
    try:
        _wait_all(conns, "ready", spec.connect_timeout + 30)
        start_at = time.monotonic() + 0.1
        for c in conns:
            c.send(("go", start_at))
        time.sleep(max(0.0, start_at - time.monotonic()))
        before = sample_trees(server_pids) if server_pids else None
        host0 = sample_host()
        t0 = time.monotonic()
        time.sleep(max(0.0, start_at + spec.duration - time.monotonic()))
        after = sample_trees(server_pids) if server_pids else None
        host1 = sample_host()
        wall = time.monotonic() - t0
        results = _wait_all(conns, "result", spec.duration + spec.drain + 30)
    finally:
        for c in conns:
            c.close()
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
    out = _summarize(target, spec, nworkers, results, before, after, wall, server_pids)
    if recv_target is not None:
        out["receiver_target"] = recv_target.label
    host = out["host"] = host_usage(host0, host1)
    if host and out["server"]:  # what neither side nor the network stack used: other processes
        known = out["server"]["cpu_pct"] + out["loadgen"]["cpu_pct"] + host["softirq_pct"]
        host["other_pct"] = round(max(0.0, host["busy_pct"] - known), 1)
    return out


def _summarize(
    target: Target,
    spec: RunSpec,
    nworkers: int,
    results: list[dict[str, Any]],
    before: dict[int, ProcSample] | None,
    after: dict[int, ProcSample] | None,
    wall: float,
    server_pids: Sequence[int],
) -> dict[str, Any]:
    def total(key: str) -> int:
        return sum(r[key] for r in results)

    sent, received = total("sent"), total("received")
    duration = max(r["elapsed_s"] for r in results)
    pps = total("received_timed") / duration
    hist: dict[int, int] = {}
    for r in results:
        for idx, n in r["hist"].items():
            hist[int(idx)] = hist.get(int(idx), 0) + n
    p50, p90, p99 = hist_percentiles(hist, (50, 90, 99))
    tls = _tls_summary(target, [r["tls"] for r in results if r.get("tls")])
    per_pair = [n / duration for r in results for n in r["pair_received"]]

    def ms(ns: float | None) -> float | None:
        return None if ns is None else round(ns / 1e6, 3)

    out: dict[str, Any] = {
        "target": target.label or target.kind,
        "mode": spec.mode,
        "pairs": spec.pairs,
        "size": spec.size,
        "window": spec.window,
        "read_size": spec.read_size,
        "rate": spec.rate,
        "duration_s": round(duration, 3),
        "sent": sent,
        "received": received,
        "lost": sent - received,
        "loss_pct": round(100 * (sent - received) / sent, 4) if sent else 0.0,
        "pps": round(pps, 1),
        "mbps": round(pps * spec.size / 1e6, 3),
        "latency_ms": {
            "p50": ms(p50),
            "p90": ms(p90),
            "p99": ms(p99),
            "max": ms(hist_lower(max(hist) + 1)) if hist else None,
        },
        "gaps": total("gaps"),
        "out_of_order": total("late"),
        "window_stalls": total("stalls"),
        "pair_pps": {"min": round(min(per_pair), 1), "max": round(max(per_pair), 1)} if per_pair else None,
        "drain_s": round(max(r["drain_s"] for r in results), 3),
        "server": None,
        "loadgen": {"cpu_pct": round(100 * total("cpu_s") / duration, 1), "workers": nworkers},
        "tls": tls,
    }
    if spec.rate:
        out["offered_pps"] = spec.rate * spec.pairs
    if server_pids and before and after:
        # Processes alive at both samples (a worker restarted mid-run would skew the sum).
        both = [p for p in after if p in before]
        cpu = {p: after[p].cpu_s - before[p].cpu_s for p in both}
        cpu_s = sum(cpu.values())
        out["server"] = {
            "pid": server_pids[0] if len(server_pids) == 1 else list(server_pids),
            "cpu_pct": round(100 * cpu_s / wall, 1),
            "us_per_pkt": round(1e6 * cpu_s / (pps * wall), 2) if pps else None,
            "rss_mb": round(sum(after[p].rss_mb for p in both), 1),
            "rss_peak_mb": round(sum(after[p].hwm_mb for p in both), 1),
        }
        if len(both) > 1:  # a supervisor and its workers: CPU of each, so imbalance shows
            out["server"]["processes"] = [
                {"pid": p, "cpu_pct": round(100 * cpu[p] / wall, 1), "rss_mb": round(after[p].rss_mb, 1)} for p in both
            ]
    return out


def _tls_summary(target: Target, parts: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The workers' TLS counts merged: one value per field when all connections agree, else "a,b"."""
    if not target.tls:
        return None

    def merged(field: str) -> str | None:
        names = sorted({name for part in parts for name in part[field]})
        return ",".join(names) if names else None

    return {
        "version": merged("versions"),
        "cipher": merged("ciphers"),
        "alpn": merged("alpn"),
        "verify": target.verify,
        "fast_start": sum(part["fast_start"] for part in parts),
        "connections": sum(part["connections"] for part in parts),
    }


# --- the baseline forwarder -------------------------------------------------------


@contextmanager
def baseline_server(host: str = "127.0.0.1", timeout: float = 15.0) -> Iterator[tuple[Target, int]]:
    """Start ``bench.baseline`` in a subprocess; yields its target and pid, stops it afterwards."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.baseline", "--addr", f"{host}:0"],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline() if ready else ""
        if not line.startswith("listening "):
            raise BenchError(f"baseline forwarder did not start (exit code {proc.poll()}, said {line!r})")
        port = int(line.rsplit(":", 1)[1])
        yield Target("baseline", host, port, label="baseline"), proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# --- output ---------------------------------------------------------------------

_COLUMNS = (
    ("target", 10),
    ("mode", 10),
    ("pairs", 5),
    ("size", 5),
    ("win/rate", 8),
    ("pkts/s", 9),
    ("MB/s", 7),
    ("loss%", 6),
    ("p50ms", 7),
    ("p90ms", 7),
    ("p99ms", 7),
    ("srvCPU%", 7),
    ("µs/pkt", 6),
    ("srvMB", 6),
    ("genCPU%", 7),
    ("sirq%", 5),
    ("tls", 7),
    ("pps×b", 6),
    ("cpu×b", 6),
)


def _fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _tls_cell(tls: dict[str, Any] | None) -> str:
    """``1.3+fs`` (TLS 1.3, every connection used fast start), ``1.2``, ``1.3!`` (not verified), ``-``."""
    if not tls:
        return "-"
    cell = ",".join(v.removeprefix("TLSv") for v in (tls["version"] or "?").split(","))
    if tls["fast_start"]:
        cell += "+fs" if tls["fast_start"] == tls["connections"] else f"+fs{tls['fast_start']}"
    return cell + ("!" if tls["verify"] == "insecure" else "")


def table(results: list[dict[str, Any]]) -> str:
    """A fixed-width table of results, one row per run."""
    lines = [" ".join(name.rjust(w) for name, w in _COLUMNS)]
    for r in results:
        target = r["target"] if r["target"] == "baseline" else "derp"
        srv = r["server"] or {}
        lat = r["latency_ms"]
        cells = (
            target,
            r["mode"],
            str(r["pairs"]),
            str(r["size"]),
            f"w{r['window']}" if r["window"] else f"r{r['rate']:g}",
            f"{r['pps']:.0f}",
            _fmt(r["mbps"], 1),
            _fmt(r["loss_pct"], 2),
            _fmt(lat["p50"]),
            _fmt(lat["p90"]),
            _fmt(lat["p99"]),
            _fmt(srv.get("cpu_pct"), 0),
            _fmt(srv.get("us_per_pkt"), 1),
            _fmt(srv.get("rss_mb"), 0),
            _fmt(r["loadgen"]["cpu_pct"], 0),
            _fmt((r.get("host") or {}).get("softirq_pct"), 0),
            _tls_cell(r.get("tls")),
            _fmt(r.get("vs_baseline"), 2),
            _fmt(r.get("cpu_per_pkt_vs_baseline"), 2),
        )
        lines.append(" ".join(c.rjust(w) for c, (_, w) in zip(cells, _COLUMNS, strict=True)))
    return "\n".join(lines)


def emit(result: dict[str, Any]) -> None:
    print(json.dumps(result, separators=(",", ":")), flush=True)


# --- CLI ------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m bench.relay",
        description="Benchmark a DERP relay with sender→receiver pairs; prints one JSON line per run.",
    )
    tgt = ap.add_argument_group("target")
    tgt.add_argument("--url", help="DERP server URL, e.g. http://127.0.0.1:3340/derp")
    tgt.add_argument("--baseline", action="store_true", help="start bench.baseline and load it")
    tgt.add_argument("--compare", action="store_true", help="run the baseline, then --url; report the ratio")
    tgt.add_argument("--sweep", action="store_true", help="pairs × size × mode matrix, baseline and --url")
    tgt.add_argument(
        "--receiver-url",
        help="receivers log in here instead: another node meshed with --url's, so every packet takes the mesh hop",
    )
    tgt.add_argument(
        "--server-pid",
        type=int,
        action="append",
        help="CPU and RSS of this process and its children, from /proc (repeat for each node of --receiver-url)",
    )
    tls = ap.add_argument_group("TLS (https:// URLs)")
    add_tls_options(tls)
    tls.add_argument(
        "--no-fast-start",
        action="store_true",
        help="always log in through the 101 upgrade, even when the server sends derper's meta certificate",
    )
    load = ap.add_argument_group("load")
    load.add_argument("--pairs", type=int, default=10)
    load.add_argument("--size", type=int, default=1200, help="packet bytes after the 32-byte key (>= 16)")
    load.add_argument("--mode", choices=MODES, default="per-packet")
    pace = load.add_mutually_exclusive_group()
    pace.add_argument("--window", type=int, help="max packets in flight per pair (default 32)")
    pace.add_argument("--rate", type=float, help="packets/s per pair, open loop")
    load.add_argument("--duration", type=float, help="timed seconds per run (default 5; 3 in a sweep)")
    load.add_argument("--drain", type=float, default=1.0, help="max seconds to wait for in-flight packets")
    load.add_argument("--workers", type=int, help="load-generator processes (default min(pairs, cpus))")
    load.add_argument("--batch-max", type=int, default=256, help="max frames per write in batched rate mode")
    load.add_argument(
        "--read-size",
        type=int,
        default=RECV_BUF,
        help="receivers' bytes per read (4096: Tailscale's client, a 4 KiB bufio.Reader; default 256 KiB)",
    )
    sw = ap.add_argument_group("sweep")
    sw.add_argument("--sweep-pairs", type=_int_list, default=[1, 10, 100])
    sw.add_argument("--sweep-sizes", type=_int_list, default=[64, 1200])
    sw.add_argument("--sweep-modes", type=lambda s: s.split(","), default=list(MODES))
    sw.add_argument("--no-baseline", action="store_true", help="sweep: skip the baseline runs")
    return ap


def _ratio(result: dict[str, Any], base: dict[str, Any] | None) -> None:
    """Throughput and server CPU per packet relative to the baseline under the same load."""
    if base and base["pps"]:
        result["vs_baseline"] = round(result["pps"] / base["pps"], 3)
    ours, theirs = (result.get("server") or {}).get("us_per_pkt"), (base or {}).get("server") or {}
    if ours and theirs.get("us_per_pkt"):
        result["cpu_per_pkt_vs_baseline"] = round(ours / theirs["us_per_pkt"], 3)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not (args.url or args.baseline):
        print("error: give --url, --baseline, or both", file=sys.stderr)
        return 2
    if (args.compare or args.sweep) and not args.url:
        print("error: --compare and --sweep need --url", file=sys.stderr)
        return 2
    window = args.window if args.window is not None or args.rate is not None else 32
    duration = args.duration if args.duration is not None else (3.0 if args.sweep else 5.0)
    spec = RunSpec(
        pairs=args.pairs,
        size=args.size,
        mode=args.mode,
        window=window,
        rate=args.rate,
        duration=duration,
        drain=args.drain,
        workers=args.workers,
        batch_max=args.batch_max,
        read_size=args.read_size,
    )
    def target_of(url: str) -> Target:
        return parse_url(
            url,
            cert_name=args.cert_name,
            ca_file=args.ca_file,
            insecure=args.insecure,
            fast_start=not args.no_fast_start,
        )

    try:
        url_target = None
        if args.url:
            url_target = target_of(args.url)
        elif args.cert_name or args.ca_file or args.insecure:
            raise ValueError("--cert-name, --ca-file and --insecure need an https:// --url")
        recv_target = None
        if args.receiver_url:
            if args.baseline or args.compare or args.sweep or not url_target:
                raise ValueError("--receiver-url goes with a plain --url run (not --baseline, --compare or --sweep)")
            recv_target = target_of(args.receiver_url)
            if recv_target.tls != url_target.tls:
                raise ValueError("--url and --receiver-url must both be http:// or both https://")
        server_pids = tuple(args.server_pid or ())
        if url_target is not None and url_target.insecure:
            print("warning: --insecure: the server's certificate is NOT verified", file=sys.stderr, flush=True)
        specs = [spec]
        if args.sweep:
            specs = [
                replace(spec, pairs=n, size=s, mode=m)
                for n in args.sweep_pairs
                for s in args.sweep_sizes
                for m in args.sweep_modes
            ]
        for s in specs:
            check_spec(s)
        if args.sweep:
            results = _sweep(url_target, specs, server_pids, with_baseline=not args.no_baseline)
        elif args.compare or (args.baseline and url_target):
            results = _sweep(url_target, [spec], server_pids, with_baseline=True)
        elif args.baseline:
            results = _sweep(None, [spec], (), with_baseline=True)
        else:
            assert url_target is not None
            results = [run_load(url_target, spec, server_pids, recv_target)]
            emit(results[0])
    except (BenchError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(table(results), file=sys.stderr)
    return 0


def _sweep(
    url_target: Target | None, specs: list[RunSpec], server_pids: Sequence[int], *, with_baseline: bool
) -> list[dict[str, Any]]:
    """Every spec on the baseline (first, so ratios can be computed), then on the URL."""
    results: list[dict[str, Any]] = []
    base: dict[RunSpec, dict[str, Any]] = {}
    if with_baseline:
        with baseline_server() as (target, pid):
            for spec in specs:
                _progress(target, spec)
                r = run_load(target, spec, (pid,))
                base[spec] = r
                results.append(r)
                emit(r)
    if url_target is not None:
        for spec in specs:
            _progress(url_target, spec)
            r = run_load(url_target, spec, server_pids)
            _ratio(r, base.get(spec))
            results.append(r)
            emit(r)
    return results


def _progress(target: Target, spec: RunSpec) -> None:
    pace = f"window {spec.window}" if spec.window else f"rate {spec.rate:g}/s"
    print(
        f"# {target.label or target.kind}: {spec.pairs} pairs × {spec.size} B, {spec.mode}, {pace}, {spec.duration:g}s",
        file=sys.stderr,
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
