"""Smoke test of the relay benchmark: it runs end to end against a real derpd and the baseline.

No timing thresholds (CI boxes vary): only that the JSON is complete and that a low,
open-loop rate is relayed without loss. derpd runs as a subprocess, as in real use.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from bench.loadgen import hist_index, hist_lower, hist_percentiles

REPO = Path(__file__).resolve().parents[1]
KEYS = {
    "target", "mode", "pairs", "size", "window", "rate", "duration_s", "sent", "received", "lost",
    "loss_pct", "pps", "mbps", "latency_ms", "gaps", "out_of_order", "server", "loadgen",
}  # fmt: skip


@contextmanager
def _serve(
    tmp: Path, *args: str, ready: str = r"event=serving derp=127\.0\.0\.1:(\d+) tls=(\w+)"
) -> Iterator[tuple[subprocess.Popen[bytes], Path, re.Match[str]]]:
    """derpd serve on a kernel-chosen loopback port; yields once its log says it is serving."""
    cmd = [sys.executable, "-m", "derpd", "serve", "--addr", "127.0.0.1:0", "--stun-port", "-1", *args]
    cmd += ["--key-file", str(tmp / "derper.key")]
    log_path = tmp / "derpd.base.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=tmp, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while not (m := re.search(ready, log_path.read_text())):
            if proc.poll() is not None:
                pytest.fail(f"derpd exited with {proc.returncode}: {log_path.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail("derpd did not start listening within 15 s")
            time.sleep(0.05)
        yield proc, log_path, m
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="module")
def derpd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """A plain-HTTP derpd subprocess (port read from its log, no free-port race): (URL, pid)."""
    with _serve(tmp_path_factory.mktemp("derpd"), "--dev") as (proc, _, m):
        yield f"http://127.0.0.1:{m.group(1)}/derp", proc.pid


@pytest.fixture(scope="module")
def derpd_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, int]]:
    """derpd with TLS and a self-signed certificate for 127.0.0.1 it creates: (URL, pin, pid)."""
    tmp = tmp_path_factory.mktemp("derpd-tls")
    args = ("--certmode", "manual", "--hostname", "127.0.0.1", "--certdir", str(tmp / "certs"), "--http-port", "-1")
    with _serve(tmp, *args) as (proc, log_path, m):
        assert m.group(2) == "on"
        pin = re.search(r"event=self_signed_certificate .*cert_name=(sha256-raw:[0-9a-f]{64})", log_path.read_text())
        assert pin, log_path.read_text()
        yield f"https://127.0.0.1:{m.group(1)}/derp", pin.group(1), proc.pid


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench.relay", "--duration", "1", "--drain", "1", *args],
        cwd=REPO,
        check=False,
        capture_output=True,
        text=True,
        timeout=90,
    )


def _bench(*args: str) -> list[dict[str, Any]]:
    out = _run(*args)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def _module(module: str, *args: str, timeout: float = 60) -> tuple[dict[str, Any], str]:
    """Run ``python -m bench.<module> ARGS``: its one JSON line (it must exit 0), and its stderr (the table)."""
    out = subprocess.run(
        [sys.executable, "-m", f"bench.{module}", *args], cwd=REPO, check=False, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    (line,) = out.stdout.splitlines()
    return json.loads(line), out.stderr


def _target(tls: bool, derpd: tuple[str, int], derpd_tls: tuple[str, str, int]) -> tuple[str, int, list[str]]:
    """The plain or the pinned-TLS server: (URL, pid, the TLS options a bench needs for it)."""
    if tls:
        url, pin, pid = derpd_tls
        return url, pid, ["--cert-name", pin]
    url, pid = derpd
    return url, pid, []


def _check(r: dict[str, Any], target: str) -> None:
    assert r.keys() >= KEYS
    assert r["target"] == target
    if target.startswith("http:") or target == "baseline":
        assert r["tls"] is None
    assert r["sent"] > 0
    assert r["received"] == r["sent"]
    assert r["loss_pct"] == 0
    assert r["pps"] > 0
    assert set(r["latency_ms"]) >= {"p50", "p90", "p99"}
    assert r["latency_ms"]["p50"] > 0
    assert r["server"]["cpu_pct"] >= 0
    assert r["server"]["rss_mb"] > 0
    assert r["loadgen"]["cpu_pct"] >= 0


def test_compare_per_packet_low_rate(derpd: tuple[str, int]) -> None:
    url, pid = derpd
    base, derp = _bench("--compare", "--url", url, "--server-pid", str(pid), "--pairs", "2", "--rate", "200")
    _check(base, "baseline")
    _check(derp, url)
    assert derp["mode"] == "per-packet"
    assert derp["rate"] == 200
    assert derp["window"] is None
    assert "vs_baseline" in derp


def test_batched_window(derpd: tuple[str, int]) -> None:
    url, pid = derpd
    args = ("--mode", "batched", "--window", "4", "--pairs", "3", "--workers", "2", "--size", "64")
    (r,) = _bench("--url", url, "--server-pid", str(pid), *args, "--read-size", "50")  # frames split across reads
    _check(r, url)
    assert r["window"] == 4
    assert r["read_size"] == 50
    assert r["loadgen"]["workers"] == 2


def test_tls_pinned_fast_start(derpd_tls: tuple[str, str, int]) -> None:
    """https:// with the self-signed certificate's pin: TLS 1.3, every client logs in by fast start."""
    url, pin, pid = derpd_tls
    args = ("--pairs", "2", "--rate", "200", "--size", "6000", "--read-size", "4096")  # Tailscale's 4 KiB reads
    (r,) = _bench("--url", url, "--cert-name", pin, "--server-pid", str(pid), *args)
    _check(r, url)
    assert r["read_size"] == 4096
    tls = r["tls"]
    assert tls["version"] == "TLSv1.3"
    assert tls["alpn"] == "http/1.1"
    assert tls["verify"] == "pin"
    assert tls["connections"] == 4  # a sender and a receiver per pair
    assert tls["fast_start"] == 4  # derpd sends derper's meta certificate


def test_tls_batched_insecure_upgrade(derpd_tls: tuple[str, str, int]) -> None:
    """The batched path over TLS, logging in through the 101 upgrade, without verification (and saying so)."""
    url, _, pid = derpd_tls
    args = ("--mode", "batched", "--window", "4", "--pairs", "2", "--size", "64", "--insecure", "--no-fast-start")
    out = _run("--url", url, "--server-pid", str(pid), *args)
    assert out.returncode == 0, out.stderr
    assert "NOT verified" in out.stderr
    (r,) = (json.loads(line) for line in out.stdout.splitlines())
    _check(r, url)
    assert r["tls"]["version"] == "TLSv1.3"
    assert r["tls"]["verify"] == "insecure"
    assert r["tls"]["fast_start"] == 0


def test_tls_wrong_pin_refused(derpd_tls: tuple[str, str, int]) -> None:
    url, pin, _ = derpd_tls
    other = "sha256-raw:" + ("0" if pin[-1] != "0" else "1") * 64
    out = _run("--url", url, "--cert-name", other, "--pairs", "1", "--rate", "10")
    assert out.returncode == 1
    assert "does not match the pin" in out.stderr
    assert out.stdout == ""


def test_histogram_percentiles() -> None:
    for v in (0, 1, 63, 64, 65, 1000, 123_456, 10**9):
        idx = hist_index(v)
        assert hist_lower(idx) <= v < hist_lower(idx + 1)
    hist: dict[int, int] = {}
    for v in range(1_000, 101_000, 1_000):  # 1..100 µs, uniform
        hist[hist_index(v)] = hist.get(hist_index(v), 0) + 1
    p50, p99 = hist_percentiles(hist, (50, 99))
    assert p50 is not None and p99 is not None
    assert abs(p50 - 50_000) / 50_000 < 0.05
    assert abs(p99 - 99_000) / 99_000 < 0.05


def test_workers_cpu_per_process(tmp_path: Path) -> None:
    """--server-pid of a `--workers 2` supervisor: the sum covers every worker, each listed."""
    ready = r"event=workers_ready workers=2 derp=127\.0\.0\.1:(\d+)"
    with _serve(tmp_path, "--dev", "--workers", "2", ready=ready) as (proc, _, m):
        url = f"http://127.0.0.1:{m.group(1)}/derp"
        (r,) = _bench("--url", url, "--server-pid", str(proc.pid), "--pairs", "4", "--rate", "200")
    _check(r, url)
    procs = r["server"]["processes"]
    assert len(procs) == 3  # the supervisor and two workers
    assert procs[0]["pid"] == proc.pid
    assert r["server"]["cpu_pct"] == pytest.approx(sum(p["cpu_pct"] for p in procs), abs=0.5)


def test_receivers_on_another_node(tmp_path: Path) -> None:
    """--receiver-url: senders on one node, receivers on its mesh peer, so every packet crosses
    the mesh; --server-pid twice sums both nodes."""
    psk = tmp_path / "psk"
    psk.write_text(os.urandom(32).hex() + "\n")
    psk.chmod(0o600)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with _serve(tmp_path / "a", "--dev", "--mesh-psk-file", str(psk)) as (pa, _, ma):
        url_a = f"http://127.0.0.1:{ma.group(1)}/derp"
        mesh = ("--mesh-psk-file", str(psk), "--mesh-with", url_a)
        with _serve(tmp_path / "b", "--dev", *mesh) as (pb, _, mb):
            url_b = f"http://127.0.0.1:{mb.group(1)}/derp"
            pids = ("--server-pid", str(pb.pid), "--server-pid", str(pa.pid))
            (r,) = _bench("--url", url_b, "--receiver-url", url_a, *pids, "--pairs", "3", "--rate", "200")
    _check(r, url_b)
    assert r["receiver_target"] == url_a
    assert r["server"]["pid"] == [pb.pid, pa.pid]
    assert {p["pid"] for p in r["server"]["processes"]} == {pa.pid, pb.pid}
    assert r["server"]["cpu_pct"] == pytest.approx(sum(p["cpu_pct"] for p in r["server"]["processes"]), abs=0.5)


def test_receiver_url_refused_with_the_baseline() -> None:
    out = _run("--baseline", "--receiver-url", "http://127.0.0.1:1/derp")
    assert out.returncode == 1 and "--receiver-url goes with a plain --url run" in out.stderr


@pytest.mark.parametrize("tls", [False, True])
def test_logins(tls: bool, derpd: tuple[str, int], derpd_tls: tuple[str, str, int]) -> None:
    """bench.logins: complete logins over plain HTTP and pinned TLS, no errors, the server's CPU read."""
    url, pid, extra = _target(tls, derpd, derpd_tls)
    args = ("--url", url, "--server-pid", str(pid), "--duration", "1", "--concurrency", "2", *extra)
    r, table = _module("logins", *args)
    assert r["target"] == url and r["tls"] == ("on" if tls else "off")
    assert r["logins"] > 0 and r["errors"] == {}, r
    assert r["server_cpu_s"] is not None and r["latency_ms"]["p50"] > 0
    assert "logins/s" in table


def test_stun(tmp_path: Path) -> None:
    """bench.stun: a closed loop of binding requests against derpd's STUN port, answers counted."""
    ready = r"event=serving derp=127\.0\.0\.1:(\d+) tls=\w+ stun=127\.0\.0\.1:(\d+)"
    with _serve(tmp_path, "--dev", "--stun-port", "0", ready=ready) as (proc, _, m):
        r, table = _module(
            "stun", "--target", f"127.0.0.1:{m.group(2)}", "--server-pid", str(proc.pid), "--duration", "1",
            "--sockets", "4", "--inflight", "2",
        )  # fmt: skip
    assert r["answered"] > 0 and r["bad"] == 0 and r["answered"] <= r["sent"], r
    assert r["server_cpu_s"] is not None and "resp/s" in table


@pytest.mark.parametrize("engine", [["--engine", "raw", "--procs", "2"], ["--engine", "client"]])
def test_logins_engines(engine: list[str], derpd: tuple[str, int]) -> None:
    """bench.logins: the raw engine split over load processes, and derpd's own client, both complete
    logins (the 101 path over plain HTTP) and report what the load cost."""
    url, pid = derpd
    r, _ = _module("logins", "--url", url, "--server-pid", str(pid), "--duration", "1", "--concurrency", "3", *engine)
    assert r["engine"] == engine[1] and r["procs"] == (2 if engine[1] == "raw" else 1)
    assert r["logins"] > 0 and r["errors"] == {} and r["logins_by_path"] == {"fast_start": 0, "upgrade": r["logins"]}
    assert r["load_cpu_s"] > 0 and r["server_ms_per_login"] is not None


@pytest.mark.parametrize("tls", [False, True])
def test_idle(tls: bool, derpd: tuple[str, int], derpd_tls: tuple[str, str, int]) -> None:
    """bench.idle: idle clients logged in and held (plain and pinned TLS), the server's RSS read three
    times, everything closed; no memory threshold, only that the figures are there."""
    url, pid, extra = _target(tls, derpd, derpd_tls)
    r, table = _module(
        "idle", "--url", url, "--server-pid", str(pid), "--connections", "20", "--concurrency", "4", "--warmup", "2",
        "--settle", "0.2", "--timeout", "60", *extra, timeout=90,
    )  # fmt: skip
    assert r["target"] == url and r["tls"] == ("on" if tls else "off")
    assert r["held"] == 20 and r["errors"] == {}, r
    assert sum(r["logins_by_path"].values()) == 22
    server = r["server"]
    assert server["baseline_mb"] > 0 and server["loaded_mb"] > 0 and server["closed_mb"] > 0
    assert server["kb_per_connection"] is not None and server["processes"][0]["pid"] == pid
    assert "KB/conn" in table


def test_idle_refuses_a_remote_target() -> None:
    """Thousands of sockets go to loopback only: another host is refused before anything is opened."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.idle", "--url", "http://192.0.2.1:3340/derp", "--server-pid", "1"],
        cwd=REPO, check=False, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 2 and "loopback only" in out.stderr
