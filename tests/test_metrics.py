"""Prometheus metrics end to end: real traffic through an in-process derpd, scraped over HTTP
and parsed with prometheus_client's parser; a real Prometheus scraping it on loopback; the
``/metrics`` listener's edge cases; and the shipped dashboard, scrape config and alert rules
checked against what derpd really exposes (and by promtool).

Counters are compared as exact deltas after traffic whose effect is known; the only waits are
bounded polls for a condition (never a timing threshold).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import prometheus_client
import pytest
import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

import derpd
from derpd.net.acme import AcmeSettings
from derpd.net.client import ConnectionLost, DerpClient, PeerGoneMessage
from derpd.net.tls import CertStore
from derpd.ops.acme import AcmeConfig, CertManager
from derpd.ops.metrics import (
    CONTENT_TYPE,
    Family,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    Registry,
    parse_metrics_addr,
    registry_for,
    render,
    serve_metrics,
)
from derpd.proto.frames import DISCO_MAGIC, DISCO_MIN_LEN, HandshakeError
from derpd.proto.keys import NodePrivate
from derpd.server.admission import Admission
from derpd.server.challenges import ChallengeBook
from derpd.server.limits import RateConfig
from derpd.server.node import DerpServer
from derpd.server.relay import DROP_REASONS, KINDS, RelayConfig
from stun.codec import binding_request, parse_response

from .conftest import start_server, url_of, wait_for

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
GRAFANA = DOCS / "grafana-dashboard.json"
PROM_CONFIG = DOCS / "prometheus" / "prometheus.yml"
PROM_ALERTS = DOCS / "prometheus" / "derpd-alerts.yml"
METRICS_DOC = DOCS / "metrics.md"

GUARD = 30.0  # only stops a broken build from hanging
PROMETHEUS_READY_BUDGET = 20.0
PROMETHEUS_QUERY_BUDGET = 30.0
OUR_PREFIXES = ("derp_", "derper_", "derpd_", "stun_", "tls_")
NAME_RE = re.compile(r"\b((?:derp|derper|derpd|stun|tls|process|python)_[A-Za-z0-9_]+)")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# --- helpers ----------------------------------------------------------------------------------


def need_tool(name: str) -> str:
    """Prometheus' binaries; missing is a failure (CI installs them), never a skip."""
    path = shutil.which(name) or (f"/usr/bin/{name}" if os.access(f"/usr/bin/{name}", os.X_OK) else None)
    if path is None:
        pytest.fail(f"{name} not found: apt-get install prometheus (the Debian package ships prometheus and promtool)")
    return path


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback never goes through a proxy


def _get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with _NO_PROXY.open(url, timeout=10) as resp:
            return resp.status, dict(resp.headers.items()), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers.items()), e.read()


async def http_get(url: str) -> tuple[int, dict[str, str], bytes]:
    return await trio.to_thread.run_sync(_get, url)


async def scrape(port: int) -> str:
    status, headers, body = await http_get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return body.decode()


def samples_of(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def names_in_scrape(text: str) -> set[str]:
    """Sample names (``derp_accepts_total``) and family names (``derp_accepts``) of a scrape."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(s.name for s in family.samples)
        if family.type == "counter":
            names.add(family.name + "_total")
    return names


async def raw_http(port: int, data: bytes) -> bytes:
    """Send raw bytes, read until the server closes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        out = b""
        with trio.fail_after(GUARD):
            while chunk := await stream.receive_some(65536):
                out += chunk
    return out


async def full_server(nursery: trio.Nursery, tmp_path: Path, allowed: list[NodePrivate]) -> DerpServer:
    """derpd with every optional metric source on: STUN, admission (allowlist), a rate config."""
    allow = tmp_path / "allow-keys"
    allow.write_text("".join(f"nodekey:{k.public.hex()}\n" for k in allowed))
    admission = Admission(allow_keys_file=str(allow))
    admission.load()
    rate = RateConfig(bytes_per_second=10**9, burst_bytes=10**9)  # on, but never reached here
    return await start_server(nursery, stun_port=0, admission=admission, relay=RelayConfig(rate=rate))


async def stun_exchange(server: DerpServer) -> None:
    """One datagram that is not STUN, then a binding request; the reply proves both were handled."""
    addr = server.stun_addrs[0]
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.bind(("127.0.0.1", 0))
        await sock.sendto(b"not a STUN message at all", addr)
        await sock.sendto(binding_request(), addr)
        with trio.fail_after(GUARD):
            data, _ = await sock.recvfrom(2048)
        assert parse_response(data).port == sock.getsockname()[1]


# --- the collector under real traffic ---------------------------------------------------------


async def test_counters_follow_real_traffic(nursery: trio.Nursery, tmp_path: Path) -> None:
    a_key, b_key, stranger, nobody = (NodePrivate.generate() for _ in range(4))
    server = await full_server(nursery, tmp_path, [a_key, b_key])
    port = await nursery.start(serve_metrics, "127.0.0.1", 0, registry_for(server))
    before = samples_of(await scrape(port))

    n, size = 5, 100
    disco = DISCO_MAGIC + bytes(DISCO_MIN_LEN - len(DISCO_MAGIC)) + b"disco"
    a = await DerpClient.connect(url_of(server), a_key)
    b = await DerpClient.connect(url_of(server), b_key)
    async with b:
        async with a:
            with pytest.raises((ConnectionLost, HandshakeError, OSError, trio.BrokenResourceError)):
                await DerpClient.connect(url_of(server), stranger)  # not in the allowlist
            await b.note_preferred(True)
            for i in range(n):
                await a.send(b.public_key, bytes([i]) * size)
            for _ in range(n):
                assert (await b.recv_packet()).src == a.public_key
            await a.send(nobody.public, b"x" * 50)  # unknown_dest, other
            await a.send(nobody.public, disco)  # unknown_dest, disco, and a PeerGone(not here) back
            await a.ping()  # after the two sends: when the pong is back, both were routed
            st = server.relay.stats
            await wait_for(lambda: st.packets_sent == n and st.current_home_connections == 1, what="the writes")
            await stun_exchange(server)
            during = await scrape(port)
        await wait_for(lambda: server.relay.stats.current_connections == 1, what="a to leave")
        assert isinstance(await b.recv(), PeerGoneMessage)
        after = await scrape(port)

    now = samples_of(during)

    def delta(name: str, **labels: str) -> float:
        return value(now, name, **labels) - value(before, name, **labels)

    assert value(now, "derp_current_connections") == 2
    assert value(now, "derp_clients_local") == value(now, "derp_clients_total") == 2
    assert value(now, "derp_current_home_connections") == 1
    assert delta("derp_accepts_total") == 3
    assert delta("tls_listener_accepted_connections_total") == 3
    assert delta("derpd_http_requests_total", listener="main") == 3
    assert delta("derp_admission_total", result="allowed") == 2
    assert delta("derp_admission_total", result="denied") == 1
    assert delta("derp_admission_total", result="error") == 0
    assert delta("derpd_connections_refused_total", reason="admission") == 1
    assert delta("derp_packets_received_total") == n + 2
    assert delta("derp_bytes_received_total") == n * size + 50 + len(disco)
    assert delta("derp_packets_received_kind_total", kind="disco") == 1
    assert delta("derp_packets_received_kind_total", kind="other") == n + 1
    assert delta("derp_packets_sent_total") == n
    assert delta("derp_bytes_sent_total") == n * size
    assert delta("derp_packets_dropped_total", reason="unknown_dest", kind="other") == 1
    assert delta("derp_packets_dropped_total", reason="unknown_dest", kind="disco") == 1
    assert delta("derp_bytes_dropped_total", reason="unknown_dest", kind="other") == 50
    assert delta("derp_bytes_dropped_total", reason="unknown_dest", kind="disco") == len(disco)
    assert delta("derp_peer_gone_not_here_frames_total") == 1
    assert delta("derp_got_ping_total") == 1
    assert delta("derp_sent_pong_total") == 1
    assert delta("stun_requests_total", disposition="success") == 1
    assert delta("stun_requests_total", disposition="not_stun") == 1
    assert delta("stun_addrfamily_total", family="ipv4") == 1
    assert delta("stun_request_kind_total", kind="tailscale") == 1
    assert value(now, "derp_rate_limit_per_client_bytes_per_second") == 10**9
    assert value(now, "derp_rate_limit_per_client_waited_total") == 0
    # Every reason x kind is there, from the very first scrape.
    for reason in DROP_REASONS:
        for kind in KINDS:
            for name in ("derp_packets_dropped_total", "derp_bytes_dropped_total"):
                assert (name, frozenset({("reason", reason), ("kind", kind)})) in before

    gone = samples_of(after)
    assert value(gone, "derp_current_connections") == 1
    assert (
        value(gone, "derp_peer_gone_disconnected_frames_total") - value(now, "derp_peer_gone_disconnected_frames_total")
        == 1
    )
    assert value(gone, "derpd_build_info", version=derpd.__version__) == 1
    assert value(gone, "process_resident_memory_bytes") > 0

    # No key and no secret, in any form, anywhere in the exposition.
    for text in (during, after):
        lowered = text.lower()
        for k in (a_key, b_key, stranger, nobody, server.key):
            assert k.public.hex() not in lowered
            assert k.to_text().lower().partition(":")[2] not in lowered
        assert "privkey" not in lowered and "nodekey:" not in lowered
        assert not re.search(r'"[0-9a-f]{16,}"', lowered), "a label value looks like a key"


async def test_minimal_server_still_exposes_the_core_set(nursery: trio.Nursery) -> None:
    """No STUN, no admission, no rate config: those families are simply absent, the rest is there."""
    server = await start_server(nursery)
    registry = registry_for(server, start_time=1234.5, process=False)
    port = await nursery.start(serve_metrics, "127.0.0.1", 0, registry)
    text = await scrape(port)
    names = names_in_scrape(text)
    assert {
        "derp_current_connections",
        "derp_packets_dropped_total",
        "tls_listener_rejected_connections_total",
    } <= names
    assert not names & {"stun_requests_total", "derp_admission_total", "derp_rate_limit_per_client_waited_total"}
    assert not any(n.startswith(("process_", "python_")) for n in names)
    assert value(samples_of(text), "derpd_start_time_seconds") == 1234.5


def test_metrics_addr_parsing() -> None:
    assert parse_metrics_addr("-1") is None
    assert parse_metrics_addr("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_metrics_addr("[::1]:9464") == ("::1", 9464)
    assert parse_metrics_addr(":9464") == ("", 9464)


# --- the text format, as prometheus_client writes it ----------------------------------------------


class _Fixed:
    """prometheus_client's view of families derpd collected once (so both render the same values)."""

    def __init__(self, families: list[Family]) -> None:
        self.families = families

    def collect(self) -> list[CounterMetricFamily | GaugeMetricFamily]:
        out: list[CounterMetricFamily | GaugeMetricFamily] = []
        for f in self.families:
            kind = CounterMetricFamily if f.kind == "counter" else GaugeMetricFamily
            metric = kind(f.name, f.doc, labels=list(f.labels))
            for values, v in f.samples:
                metric.add_metric(list(values), v)
            out.append(metric)
        return out


def _library_render(families: list[Family]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(families))
    return generate_latest(registry)


class _Odd:
    """Label values and help text that need escaping, and values at the edges of Go's float format."""

    def collect(self) -> list[Family]:
        odd = Family("derpd_test_odd", 'help with \\ and a\nnewline and "quotes"', "gauge", ("b", "a"))
        for i, value in enumerate(
            [0, 1, -1, 0.1, 1e-9, 123456.0, 1234567.0, 1e21, 2.5e9, -2.5e9, 2**63, math.inf, -math.inf, math.nan]
        ):
            odd.add([f'v"{i}', "x\\y\nz ü"], value)
        plain = Family("derpd_test_plain", "a counter", "counter", samples=[((), 7)])
        return [odd, plain, Family("derpd_test_empty", "no samples", "gauge", ("l",))]


async def test_exposition_is_byte_for_byte_prometheus_clients(nursery: trio.Nursery, tmp_path: Path) -> None:
    """derpd writes the text format itself (prometheus_client is ~2.5 MB of RSS): the same families,
    rendered by the library, must give the same bytes, for a fully configured node under traffic."""
    a_key, b_key = NodePrivate.generate(), NodePrivate.generate()
    server = await full_server(nursery, tmp_path, [a_key, b_key])
    registry = registry_for(server)
    registry.register(_Odd())
    async with await DerpClient.connect(url_of(server), a_key) as a:
        await a.ping()
        await stun_exchange(server)
        families = list(registry.collect())
    assert render(families) == _library_render(families)
    cert_families = list((await _certificate_registry(nursery, tmp_path)).collect())
    assert render(cert_families) == _library_render(cert_families)
    assert CONTENT_TYPE.decode() == prometheus_client.exposition.CONTENT_TYPE_PLAIN_0_0_4


def _shape(families: list[Family] | list[prometheus_client.Metric]) -> list[tuple[str, str, str, list[object]]]:
    out: list[tuple[str, str, str, list[object]]] = []
    for f in families:
        if isinstance(f, Family):
            name = f.name + "_total" if f.kind == "counter" else f.name
            out.append((f.name, f.kind, f.doc, [(name, sorted(f.labels)) for _ in f.samples]))
        else:
            out.append((f.name, f.type, f.documentation, [(s.name, sorted(s.labels)) for s in f.samples]))
    return out


def test_process_and_python_families_are_the_librarys() -> None:
    """process_*, python_info and python_gc_* as prometheus_client's own collectors name and fill them."""
    lib = CollectorRegistry(auto_describe=False)
    prometheus_client.ProcessCollector(registry=lib)
    prometheus_client.PlatformCollector(registry=lib)
    prometheus_client.GCCollector(registry=lib)
    theirs = list(lib.collect())
    ours = [f for c in (ProcessCollector(), PlatformCollector(), GCCollector()) for f in c.collect()]
    assert _shape(ours) == _shape(theirs)
    by_name = {m.name: m for m in theirs}
    for f in ours:
        if f.name in ("python_info", "process_max_fds", "process_start_time_seconds"):
            want = {(tuple(s.labels[k] for k in f.labels), s.value) for s in by_name[f.name].samples}
            assert set(f.samples) == want, f.name


# --- the /metrics listener --------------------------------------------------------------------


class _Exploding:
    def collect(self) -> list[Family]:
        raise RuntimeError("a collector bug")


async def test_listener_edge_cases(nursery: trio.Nursery) -> None:
    server = await start_server(nursery)
    port = await nursery.start(serve_metrics, "127.0.0.1", 0, registry_for(server, process=False))

    status, _, body = await http_get(f"http://127.0.0.1:{port}/")
    assert status == 200 and b"/metrics" in body
    status, _, _ = await http_get(f"http://127.0.0.1:{port}/nope")
    assert status == 404
    status, _, body = await http_get(f"http://127.0.0.1:{port}/metrics?name[]=x")  # query strings are ignored
    assert status == 200 and b"derp_accepts_total" in body

    reply = await raw_http(
        port, b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi"
    )
    assert reply.startswith(b"HTTP/1.1 405 ") and b"allow: get, head" in reply.lower()

    reply = await raw_http(port, b"\x16\x03\x01 this is not HTTP\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400 ")

    reply = await raw_http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 12000 + b"\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 431 ")

    reply = await raw_http(port, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, rest = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and rest == b""
    assert int(re.search(rb"(?i)content-length: (\d+)", head).group(1)) > 0  # type: ignore[union-attr]

    # Keep-alive: two pipelined requests on one connection, the second closes it.
    reply = await raw_http(
        port,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    assert reply.count(b"HTTP/1.1 200 ") == 2

    # After all that, it still serves.
    assert "derp_accepts_total" in await scrape(port)


async def test_a_collector_bug_is_a_500_not_an_outage(nursery: trio.Nursery) -> None:
    registry = Registry()
    registry.register(_Exploding())
    port = await nursery.start(serve_metrics, "127.0.0.1", 0, registry)
    for _ in range(2):
        status, _, _ = await http_get(f"http://127.0.0.1:{port}/metrics")
        assert status == 500
    status, _, _ = await http_get(f"http://127.0.0.1:{port}/")
    assert status == 200


async def test_idle_keepalive_and_slow_heads_end_at_the_head_deadline(nursery: trio.Nursery) -> None:
    """A head deadline (tiny here so the test is quick; no timing is asserted, only the outcome)."""
    port = await nursery.start(functools.partial(serve_metrics, head_timeout=0.05), "127.0.0.1", 0, Registry())
    assert (await raw_http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n")).startswith(b"HTTP/1.1 408 ")
    assert await raw_http(port, b"") == b""  # an idle connection just closes


# --- a real Prometheus ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _stop(proc: trio.Process) -> None:
    with trio.CancelScope(shield=True):
        if proc.returncode is None:
            proc.terminate()
            with trio.move_on_after(10):
                await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@asynccontextmanager
async def running_prometheus(config: Path, workdir: Path) -> AsyncIterator[str]:
    """Prometheus on a free loopback port; yields its base URL. The port is picked by
    bind-and-release, which can race with another process: on "address already in use"
    it tries again with a new port (a few times)."""
    binary = need_tool("prometheus")
    last_log = ""
    for attempt in range(5):
        port = _free_port()
        logfile = workdir / f"prometheus-{attempt}.log"
        with open(logfile, "wb") as out:
            proc = await trio.lowlevel.open_process(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={workdir / f'tsdb-{attempt}'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--web.enable-lifecycle",
                    "--log.level=info",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
            )
        base = f"http://127.0.0.1:{port}"
        try:
            ready = False
            with trio.move_on_after(PROMETHEUS_READY_BUDGET):
                while proc.poll() is None:
                    try:
                        status, _, _ = await http_get(base + "/-/ready")
                    except OSError:
                        status = 0
                    if status == 200:
                        ready = True
                        break
                    await trio.sleep(0.1)
            if ready:
                yield base
                return
            await _stop(proc)
            last_log = logfile.read_text(errors="replace")
            if "address already in use" not in last_log.lower():
                break
        finally:
            await _stop(proc)
    pytest.fail(f"Prometheus did not become ready; its log:\n{last_log[-3000:]}")


async def prom_query(base: str, query: str) -> list[tuple[dict[str, str], float]]:
    status, _, body = await http_get(base + "/api/v1/query?" + urllib.parse.urlencode({"query": query}))
    assert status == 200, body[:500]
    doc = json.loads(body)
    assert doc["status"] == "success", doc
    return [(r["metric"], float(r["value"][1])) for r in doc["data"]["result"]]


async def test_a_real_prometheus_scrapes_the_relay(nursery: trio.Nursery, tmp_path: Path) -> None:
    server = await start_server(nursery, stun_port=0)
    metrics_port = await nursery.start(serve_metrics, "127.0.0.1", 0, registry_for(server))
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: derpd\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{metrics_port}']\n"
    )
    async with running_prometheus(config, tmp_path) as prometheus:
        n = 7
        a = await DerpClient.connect(url_of(server))
        b = await DerpClient.connect(url_of(server))
        async with a, b:
            for i in range(n):
                await a.send(b.public_key, bytes([i]) * 64)
            for _ in range(n):
                await b.recv_packet()
            await wait_for(lambda: server.relay.stats.packets_sent == n, what="the writes")
            sent = up = drops = conns = -1.0
            with trio.move_on_after(PROMETHEUS_QUERY_BUDGET):
                while True:
                    got = await prom_query(prometheus, "derp_packets_sent_total")
                    sent = got[0][1] if got else -1.0
                    got = await prom_query(prometheus, 'up{job="derpd"}')
                    up = got[0][1] if got else -1.0
                    got = await prom_query(prometheus, "count(derp_packets_dropped_total)")
                    drops = got[0][1] if got else -1.0
                    got = await prom_query(prometheus, "derp_current_connections")
                    conns = got[0][1] if got else -1.0
                    if sent == n and up == 1 and conns == 2:
                        break
                    await trio.sleep(0.2)
            assert (sent, up, conns) == (n, 1, 2), "Prometheus never saw the relayed packets"
            assert drops == len(DROP_REASONS) * len(KINDS)
            targets = json.loads((await http_get(prometheus + "/api/v1/targets"))[2])
            active = targets["data"]["activeTargets"]
            assert [t["health"] for t in active] == ["up"], active


# --- the shipped docs -------------------------------------------------------------------------


def _exprs(node: object) -> list[str]:
    if isinstance(node, dict):
        found = [v for k, v in node.items() if k in ("expr", "query") and isinstance(v, str)]
        for v in node.values():
            found += _exprs(v)
        return found
    if isinstance(node, list):
        return [e for v in node for e in _exprs(v)]
    return []


@pytest.fixture
async def exposed(nursery: trio.Nursery, tmp_path: Path) -> set[str]:
    """Every name a fully configured derpd exposes, from a live scrape after a little traffic."""
    a_key, b_key = NodePrivate.generate(), NodePrivate.generate()
    server = await full_server(nursery, tmp_path, [a_key, b_key])
    port = await nursery.start(serve_metrics, "127.0.0.1", 0, registry_for(server))
    async with await DerpClient.connect(url_of(server), a_key) as a:
        await a.ping()
        await stun_exchange(server)
        names = names_in_scrape(await scrape(port))
    return names | await _certificate_names(nursery, tmp_path)


async def _certificate_registry(nursery: trio.Nursery, tmp_path: Path) -> Registry:
    """What a TLS node with --certmode letsencrypt adds: a certificate served (the self-signed IP one
    stands in for the CA's) and the ACME manager's counters (not run: no CA here; tests/acme runs it)."""
    key = NodePrivate.generate()
    store = CertStore(tmp_path / "certs", "127.0.0.1", key.public)
    store.load()
    settings = AcmeSettings(directory="https://127.0.0.1:9/dir")
    manager = CertManager(AcmeConfig("127.0.0.1", tmp_path / "certs", settings), store, ChallengeBook())
    manager.next_renewal = 0.0
    server = await start_server(nursery, key, tls=store, challenges=manager.book)
    return registry_for(server, acme=manager, process=False)


async def _certificate_names(nursery: trio.Nursery, tmp_path: Path) -> set[str]:
    port = await nursery.start(serve_metrics, "127.0.0.1", 0, await _certificate_registry(nursery, tmp_path))
    return names_in_scrape(await scrape(port))


async def test_grafana_dashboard_queries_exist(exposed: set[str]) -> None:
    dashboard = json.loads(GRAFANA.read_text())
    exprs = _exprs(dashboard)
    assert exprs, "no panel queries found"
    used = {name for e in exprs for name in NAME_RE.findall(e)}
    assert used - exposed == set(), f"the dashboard queries metrics derpd does not expose: {sorted(used - exposed)}"
    for wanted in (
        "derp_current_connections",
        "derp_packets_sent_total",
        "derp_bytes_sent_total",
        "derp_packets_dropped_total",
        "stun_requests_total",
        "derp_admission_total",
    ):
        assert wanted in used, f"the dashboard has no panel for {wanted}"
    titles = [p.get("title") for p in dashboard["panels"]]
    assert len(titles) == len(set(titles))
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


async def test_alert_rules_and_scrape_config(exposed: set[str]) -> None:
    promtool = need_tool("promtool")
    for args in (["check", "rules", str(PROM_ALERTS)], ["check", "config", str(PROM_CONFIG)]):
        result = await trio.run_process([promtool, *args], capture_stdout=True, capture_stderr=True, check=False)
        out = (result.stdout + result.stderr).decode(errors="replace")
        assert result.returncode == 0, f"promtool {' '.join(args)}:\n{out}"
    alerts = PROM_ALERTS.read_text()
    used = set(NAME_RE.findall(alerts))
    assert used - exposed == set(), f"alert rules use metrics derpd does not expose: {sorted(used - exposed)}"
    for needle in ('up{job="derpd"} == 0', "derp_packets_dropped_total", "stun_requests_total", "derp_admission_total"):
        assert needle in alerts


async def test_metrics_doc_lists_exactly_what_is_exposed(exposed: set[str]) -> None:
    """Every derpd metric is in docs/metrics.md's table, and every name there exists."""
    rows = [line for line in METRICS_DOC.read_text().splitlines() if line.startswith("| `")]
    documented = {re.match(r"\| `([^`]+)`", row).group(1) for row in rows}  # type: ignore[union-attr]
    ours = {n for n in exposed if n.startswith(OUR_PREFIXES)}
    sample_names = {n for n in ours if not _is_family_alias(n, ours)}
    assert documented - exposed == set(), f"documented but not exposed: {sorted(documented - exposed)}"
    missing = {n for n in sample_names if n not in documented}
    assert missing == set(), f"exposed but not documented: {sorted(missing)}"


def _is_family_alias(name: str, names: set[str]) -> bool:
    """``derp_accepts`` when ``derp_accepts_total`` is there: the parser's family name for a counter."""
    return name + "_total" in names
