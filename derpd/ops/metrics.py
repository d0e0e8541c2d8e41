"""Prometheus metrics: a collector over derpd's live counters, the text exposition, and a small
``/metrics`` listener.

The relay, STUN, HTTP, limit and admission code keep plain integer counters (added per
batch on the hot path). Nothing here runs until Prometheus scrapes: ``DerpCollector``
reads those integers at scrape time and turns them into metric families, so metrics cost
the relay nothing beyond the increments it already does. Names follow derper's expvar
names (``derp_*``, ``stun_*``, ``tls_listener_*``) where one exists; counters get ``_total``
as Prometheus conventions want. No key or secret is ever a label.

The text format (0.0.4) is written here, byte for byte as ``prometheus_client.generate_latest``
writes the same families (``tests/test_metrics.py`` compares the two), and so are the standard
``process_*``, ``python_info`` and ``python_gc_*`` families of that library's collectors: the
library and what it imports (``http.server``, ``wsgiref``, ``urllib.request``, ...) cost every
node ~2.5 MB of RSS for the few lines of formatting a scrape needs.

Integration::

    registry = registry_for(server)          # once, at start (before or after server.run)
    port = await nursery.start(serve_metrics, "127.0.0.1", 9464, registry)
"""

from __future__ import annotations

import gc
import math
import os
import platform
import resource
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Literal, Protocol

import h11
import trio

from derpd import __version__
from derpd.base import log
from derpd.net.addr import bind_sockets, format_addr, parse_hostport
from derpd.net.httpserver import HttpServerConnection, Limits, Refused, accept_forever, request_path
from derpd.net.transport import SocketTransport
from derpd.server.relay import DROP_REASONS, KINDS

if TYPE_CHECKING:
    from derpd.ops.acme import CertManager
    from derpd.server.node import DerpServer

DEFAULT_METRICS_ADDR = "127.0.0.1:9464"
MAX_HEAD = 8 * 1024  # request line + headers
MAX_BODY = 8 * 1024  # GET/HEAD bodies are never used; small ones are drained for keep-alive
HEAD_TIMEOUT = 10.0  # a request head must arrive within this (its body within as long again); idle keep-alive ends
MAX_CONNECTIONS = 64  # concurrent scrapers; more are closed at once
INDEX_BODY = b"derpd metrics exporter: Prometheus metrics are at /metrics\n"
NO_STORE = [(b"Cache-Control", b"no-store")]
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"  # prometheus_client's CONTENT_TYPE_PLAIN_0_0_4


# --- metric families and the text format --------------------------------------------------------


@dataclass
class Family:
    """One metric family: its samples are ``(label values, value)``, in the order of ``labels``.

    ``name`` is the family name; a counter's samples and HELP/TYPE lines add ``_total`` to it.
    """

    name: str
    doc: str
    kind: Literal["counter", "gauge"]
    labels: tuple[str, ...] = ()
    samples: list[tuple[tuple[str, ...], float]] = field(default_factory=list)

    def add(self, values: Iterable[str], value: float) -> None:
        values = tuple(values)
        if len(values) != len(self.labels):
            raise ValueError(f"{self.name}: {len(self.labels)} label values wanted, got {len(values)}")
        self.samples.append((values, value))


class Collector(Protocol):
    """Anything that yields families when scraped."""

    def collect(self) -> Iterable[Family]: ...


class Registry:
    """The collectors one ``/metrics`` listener serves, in the order they were registered."""

    def __init__(self) -> None:
        self.collectors: list[Collector] = []

    def register(self, collector: Collector) -> None:
        self.collectors.append(collector)

    def collect(self) -> Iterator[Family]:
        for collector in self.collectors:
            yield from collector.collect()


def go_float(value: float) -> str:
    """A sample value as Prometheus' Go code (and prometheus_client's floatToGoString) writes it."""
    d = float(value)
    if d == math.inf:
        return "+Inf"
    if d == -math.inf:
        return "-Inf"
    if math.isnan(d):
        return "NaN"
    s = repr(d)
    dot = s.find(".")
    if d > 0 and dot > 6:  # Go switches to exponents sooner than Python
        mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return s


def _escape_label(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def render(families: Iterable[Family]) -> bytes:
    """The text exposition format 0.0.4 of ``families`` (UTF-8), e.g. ``render(registry.collect())``."""
    out: list[str] = []
    for family in families:
        name = family.name + "_total" if family.kind == "counter" else family.name
        doc = family.doc.replace("\\", r"\\").replace("\n", r"\n")
        out.append(f"# HELP {name} {doc}\n# TYPE {name} {family.kind}\n")
        for values, value in family.samples:
            labels = ""
            if values:
                pairs = sorted(zip(family.labels, values, strict=True))
                labels = "{" + ",".join(f'{k}="{_escape_label(v)}"' for k, v in pairs) + "}"
            out.append(f"{name}{labels} {go_float(value)}\n")
    return "".join(out).encode()


# --- the collector ------------------------------------------------------------------------------


def _counter(name: str, doc: str, value: float) -> Family:
    return Family(name, doc, "counter", samples=[((), value)])


def _gauge(name: str, doc: str, value: float) -> Family:
    return Family(name, doc, "gauge", samples=[((), value)])


def _labelled(family: Family, samples: Iterable[tuple[tuple[str, ...], float]]) -> Family:
    for labels, value in samples:
        family.add(labels, value)
    return family


def _counters(name: str, doc: str, *, labels: list[str]) -> Family:
    return Family(name, doc, "counter", tuple(labels))


def _gauges(name: str, doc: str, *, labels: list[str]) -> Family:
    return Family(name, doc, "gauge", tuple(labels))


def tls_version_label(version: str) -> str:
    """derper labels versions ``1.2``/``1.3``; Python says ``TLSv1.3``."""
    return version.removeprefix("TLSv")


class DerpCollector:
    """Reads one ``DerpServer``'s counters at scrape time (no per-packet work, no copies kept)."""

    def __init__(self, server: DerpServer, *, start_time: float | None = None, acme: CertManager | None = None) -> None:
        self.server = server
        self.acme = acme
        self.start_time = time.time() if start_time is None else start_time

    def collect(self) -> Iterator[Family]:
        yield from self._relay()
        yield from self._rate_limit()
        yield from self._admission()
        yield from self._stun()
        yield from self._front()
        yield from self._certificate()
        build = _gauges("derpd_build_info", "derpd build; always 1", labels=["version"])
        build.add([__version__], 1)
        yield build
        yield _gauge("derpd_start_time_seconds", "When this derpd started, in Unix seconds", self.start_time)

    def _relay(self) -> Iterator[Family]:
        relay = self.server.relay
        st = relay.stats
        yield _gauge("derp_current_connections", "DERP client connections now open", st.current_connections)
        yield _gauge(
            "derp_current_home_connections",
            "Connections now open whose client calls this node its home (NotePreferred)",
            st.current_home_connections,
        )
        yield _gauge(
            "derp_current_notideal_connections",
            "Connections now open that the client says are to a non-ideal node",
            st.current_notideal_connections,
        )
        remote = sum(1 for k in relay.forwarders if k not in relay.keys)
        yield _gauge(
            "derp_clients_total",
            "Distinct client keys in the region (here or at a mesh peer)",
            len(relay.keys) + remote,
        )
        yield _gauge("derp_clients_local", "Distinct client keys connected to this node", len(relay.keys))
        yield _gauge("derp_clients_remote", "Client keys reachable only through a mesh peer", remote)
        yield _labelled(
            _gauges("derp_mesh_peer_up", "1 while the link to a --mesh-with peer is up", labels=["peer"]),
            [((name,), 0 if link is None else 1) for name, link in sorted(relay.mesh_links.items())],
        )
        yield _counter("derp_mesh_connects", "Mesh links established (reconnects included)", st.mesh_connects)
        yield _gauge(
            "derp_watchers", "Connections subscribed to peer presence (WatchConns, mesh peers)", len(relay.watchers)
        )
        yield _gauge(
            "derp_current_dup_client_keys", "Client keys now connected more than once", st.current_dup_client_keys
        )
        yield _gauge(
            "derp_current_dup_client_conns",
            "Connections now open that belong to a key connected more than once",
            st.current_dup_client_conns,
        )
        yield _counter(
            "derp_total_dup_client_conns", "Connections that joined an already-connected key", st.total_dup_client_conns
        )
        yield _counter("derp_accepts", "Connections upgraded to DERP (before the DERP handshake)", st.accepts)
        yield _counter("derp_handshake_failures", "DERP handshakes that failed or timed out", st.handshake_failures)
        yield _counter(
            "derp_protocol_errors", "Connections closed for breaking the DERP protocol after login", st.protocol_errors
        )
        yield _counter("derp_packets_received", "Data packets received from clients (SendPacket)", st.packets_received)
        yield _counter("derp_bytes_received", "Payload bytes of data packets received from clients", st.bytes_received)
        yield _counter("derp_packets_sent", "Data packets written to clients (RecvPacket)", st.packets_sent)
        yield _counter("derp_bytes_sent", "Payload bytes of data packets written to clients", st.bytes_sent)
        disco = st.packets_received_disco
        yield _labelled(
            _counters(
                "derp_packets_received_kind", "Data packets received from clients, by kind", labels=["kind"]
            ),
            [(("disco",), disco), (("other",), st.packets_received - disco)],
        )
        dropped_packets, dropped_bytes = st.dropped_packets, st.dropped_bytes
        every = [(reason, kind) for reason in DROP_REASONS for kind in KINDS]
        every += sorted(set(dropped_packets) - set(every))  # a reason added in relay.py still shows up
        yield _labelled(
            _counters(
                "derp_packets_dropped", "Data packets dropped, by reason and kind", labels=["reason", "kind"]
            ),
            [(k, dropped_packets.get(k, 0)) for k in every],
        )
        yield _labelled(
            _counters(
                "derp_bytes_dropped",
                "Payload bytes of data packets dropped, by reason and kind",
                labels=["reason", "kind"],
            ),
            [(k, dropped_bytes.get(k, 0)) for k in every],
        )
        yield _counter(
            "derp_peer_gone_disconnected_frames",
            "PeerGone(disconnected) frames queued to clients",
            st.peer_gone_disconnected_frames,
        )
        yield _counter(
            "derp_peer_gone_not_here_frames",
            "PeerGone(not here) frames sent for disco packets to unknown keys",
            st.peer_gone_not_here_frames,
        )
        yield _counter("derp_got_ping", "Ping frames received from clients", st.got_ping)
        yield _counter("derp_sent_pong", "Pong frames written to clients", st.sent_pong)
        yield _counter(
            "derp_home_moves_in", "Clients that made this node their home after connecting", st.home_moves_in
        )
        yield _counter("derp_home_moves_out", "Clients that stopped calling this node their home", st.home_moves_out)
        yield _counter(
            "derp_sclient_write_timeouts",
            "Connections closed because a write missed its deadline",
            st.sclient_write_timeouts,
        )
        yield _counter("derp_unknown_frames", "Frames of unknown type received and skipped", st.unknown_frames)
        yield _counter(
            "derp_packets_forwarded_in", "ForwardPacket frames received from mesh peers", st.packets_forwarded_in
        )
        yield _counter(
            "derp_packets_forwarded_out", "Packets sent on to a mesh peer as ForwardPacket", st.packets_forwarded_out
        )

    def _rate_limit(self) -> Iterator[Family]:
        rate = self.server.relay.config.rate
        if not rate.enabled:  # as derper: only with a rate config
            return
        yield _gauge(
            "derp_rate_limit_per_client_bytes_per_second",
            "Per-client receive rate limit in bytes per second (mesh peers exempt)",
            rate.bytes_per_second,
        )
        yield _gauge(
            "derp_rate_limit_per_client_burst_bytes", "Per-client receive rate limit burst in bytes", rate.burst_bytes
        )
        yield _counter(
            "derp_rate_limit_per_client_waited",
            "Times a client's reads were paused to hold it to the rate limit",
            self.server.relay.stats.rate_limit_waited,
        )

    def _admission(self) -> Iterator[Family]:
        admission = self.server.settings.admission
        stats = getattr(admission, "stats", None)
        if stats is None:
            return
        yield _labelled(
            _counters(
                "derp_admission",
                "Admission checks of non-mesh clients, by result (error = verify URL unreachable)",
                labels=["result"],
            ),
            [((result,), n) for result, n in stats.results.items()],
        )
        yield _counter("derp_admission_mesh_bypass", "Mesh peers admitted without a check", stats.mesh_bypass)
        yield _counter("derp_admission_cache_hits", "Admission checks answered from the verify cache", stats.cache_hits)
        yield _counter("derp_admission_cache_misses", "Admission checks not in the verify cache", stats.cache_misses)
        yield _counter("derp_admission_verify_requests", "HTTP requests sent to the verify URL", stats.requests)
        yield _labelled(
            _counters(
                "derp_admission_overflow",
                "Checks decided by the fail-open/fail-closed policy at once because no verify request slot was "
                "free (all busy, or the client's source already held its share); also counted as result=error",
                labels=["reason"],
            ),
            [((reason,), n) for reason, n in stats.overflow.items()],
        )

    def _stun(self) -> Iterator[Family]:
        stun = self.server.stun
        if stun is None:
            return
        st = stun.stats
        yield _labelled(
            _counters("stun_requests", "STUN datagrams received, by disposition", labels=["disposition"]),
            [((d,), n) for d, n in st.requests().items()],
        )
        yield _labelled(
            _counters(
                "stun_addrfamily", "STUN requests answered, by the address family replied", labels=["family"]
            ),
            [((f,), n) for f, n in st.addrfamily().items()],
        )
        yield _labelled(
            _counters("stun_request_kind", "STUN requests answered, by request dialect", labels=["kind"]),
            [((k,), n) for k, n in st.by_kind.items()],
        )

    def _front(self) -> Iterator[Family]:
        server = self.server
        yield _counter(
            "tls_listener_accepted_connections",
            "Connections the accept limiter let through on the main listener",
            server.accept_limiter.accepted,
        )
        yield _counter(
            "tls_listener_rejected_connections",
            "Connections closed at once by the accept limiter",
            server.accept_limiter.rejected,
        )
        yield _labelled(
            _counters(
                "derper_tls_request_version", "TLS handshakes completed, by negotiated version", labels=["version"]
            ),
            [((tls_version_label(v),), n) for v, n in sorted(server.tls_versions.items())],
        )
        yield _counter("derp_websocket_accepts", "WebSocket DERP connections accepted", server.http.websocket_accepts)
        listeners = [("main", server.http)]
        if server.http_addrs or server.settings.http_port >= 0:  # bound, inherited (systemd) or configured
            listeners.append(("port80", server.http80))
        yield _labelled(
            _counters("derpd_http_requests", "HTTP requests read, by listener", labels=["listener"]),
            [((name,), front.requests) for name, front in listeners],
        )
        yield _labelled(
            _counters(
                "derpd_http_bad_requests",
                "HTTP requests refused as malformed, too big or too slow",
                labels=["listener"],
            ),
            [((name,), front.bad_requests) for name, front in listeners],
        )
        yield _gauge(
            "derpd_connected_addresses", "Distinct client IP addresses with open connections", len(server.per_ip.active)
        )
        yield _labelled(
            _counters(
                "derpd_connections_refused", "Connections refused before relaying, by reason", labels=["reason"]
            ),
            [
                (("accept_limit",), server.accept_limiter.rejected),
                (("per_ip_limit",), server.per_ip.rejected),
                (("admission",), server.relay.stats.admission_rejected),
                (("proxy_header",), server.proxy_refused),
                (("tls_handshake",), server.tls_handshake_failures),
            ],
        )


    def _certificate(self) -> Iterator[Family]:
        store = self.server.tls
        if store is not None and store.not_after is not None and store.not_before is not None:
            yield _gauge(
                "derpd_tls_cert_not_after_seconds",
                "When the served certificate expires (notAfter), in Unix seconds",
                store.not_after.timestamp(),
            )
            yield _gauge(
                "derpd_tls_cert_not_before_seconds",
                "When the served certificate became valid (notBefore), in Unix seconds",
                store.not_before.timestamp(),
            )
        acme = self.acme
        if acme is None:
            return
        yield _labelled(
            _counters(
                "derpd_acme_failures",
                "Failed attempts to get a certificate from the ACME CA, by reason",
                labels=["reason"],
            ),
            [((reason,), n) for reason, n in acme.failures.items()],
        )
        yield _counter("derpd_acme_certificates_issued", "Certificates the ACME CA issued to this process", acme.issued)
        if acme.next_renewal is not None:
            yield _gauge(
                "derpd_acme_next_renewal_seconds",
                "When the next order (renewal or retry) is planned, in Unix seconds",
                acme.next_renewal,
            )
        book = acme.book
        yield _labelled(
            _counters(
                "derpd_acme_challenges_answered",
                "ACME validation requests answered, by challenge type",
                labels=["type"],
            ),
            [(("http-01",), book.http01_answered), (("tls-alpn-01",), book.tls_alpn01_answered)],
        )


class ProcessCollector:
    """``process_*`` from ``/proc/self``, as prometheus_client's ProcessCollector names and computes them
    (Linux; elsewhere, or without /proc, it yields nothing)."""

    def __init__(self, proc: str = "/proc") -> None:
        self.proc = proc
        self.ticks = float(os.sysconf("SC_CLK_TCK"))
        self.pagesize = resource.getpagesize()
        self.btime = 0.0  # boot time; 0 = /proc cannot be read
        try:
            with open(os.path.join(proc, "stat"), "rb") as f:
                for line in f:
                    if line.startswith(b"btime "):
                        self.btime = float(line.split()[1])
        except OSError:
            pass

    def collect(self) -> Iterator[Family]:
        if not self.btime:
            return
        me = os.path.join(self.proc, "self")
        try:
            with open(os.path.join(me, "stat"), "rb") as f:
                parts = f.read().split(b")")[-1].split()
        except OSError:
            pass
        else:
            yield _gauge("process_virtual_memory_bytes", "Virtual memory size in bytes.", float(parts[20]))
            yield _gauge(
                "process_resident_memory_bytes", "Resident memory size in bytes.", float(parts[21]) * self.pagesize
            )
            yield _gauge(
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                float(parts[19]) / self.ticks + self.btime,
            )
            yield _counter(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds.",
                (float(parts[11]) + float(parts[12])) / self.ticks,
            )
        try:
            max_fds = None
            with open(os.path.join(me, "limits"), "rb") as f:
                for line in f:
                    if line.startswith(b"Max open file"):
                        max_fds = float(line.split()[3])
                        break
            open_fds = len(os.listdir(os.path.join(me, "fd")))
        except OSError:
            return
        yield _gauge("process_open_fds", "Number of open file descriptors.", open_fds)
        if max_fds is not None:
            yield _gauge("process_max_fds", "Maximum number of open file descriptors.", max_fds)


class PlatformCollector:
    """``python_info``, as prometheus_client's PlatformCollector labels it."""

    def __init__(self) -> None:
        major, minor, patchlevel = platform.python_version_tuple()
        labels = ["version", "implementation", "major", "minor", "patchlevel"]
        self.info = _gauges("python_info", "Python platform information", labels=labels)
        self.info.add([platform.python_version(), platform.python_implementation(), major, minor, patchlevel], 1)

    def collect(self) -> Iterator[Family]:
        yield self.info


class GCCollector:
    """``python_gc_*`` per generation, as prometheus_client's GCCollector names them."""

    def collect(self) -> Iterator[Family]:
        collected = _counters("python_gc_objects_collected", "Objects collected during gc", labels=["generation"])
        uncollectable = _counters(
            "python_gc_objects_uncollectable", "Uncollectable objects found during GC", labels=["generation"]
        )
        collections = _counters(
            "python_gc_collections", "Number of times this generation was collected", labels=["generation"]
        )
        for gen, stat in enumerate(gc.get_stats()):
            collected.add([str(gen)], stat["collected"])
            uncollectable.add([str(gen)], stat["uncollectable"])
            collections.add([str(gen)], stat["collections"])
        yield from (collected, uncollectable, collections)


def registry_for(
    server: DerpServer, *, start_time: float | None = None, process: bool = True, acme: CertManager | None = None
) -> Registry:
    """A registry of its own (so several servers in one process don't clash) with derpd's collector
    and, unless ``process`` is False, the ``process_*``/``python_*`` ones."""
    registry = Registry()
    registry.register(DerpCollector(server, start_time=start_time, acme=acme))
    if process:
        registry.register(ProcessCollector())
        registry.register(PlatformCollector())
        if platform.python_implementation() == "CPython":  # gc.get_stats means CPython's collector
            registry.register(GCCollector())
    return registry


def parse_metrics_addr(text: str) -> tuple[str, int] | None:
    """``--metrics-addr``: ``HOST:PORT``, ``[V6]:PORT`` or ``:PORT``; ``-1`` (or empty) disables."""
    text = text.strip()
    if text in ("-1", ""):
        return None
    return parse_hostport(text)


# --- the listener -------------------------------------------------------------------------------


async def serve_metrics(
    host: str,
    port: int,
    registry: Registry,
    *,
    head_timeout: float = HEAD_TIMEOUT,
    max_connections: int = MAX_CONNECTIONS,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``GET /metrics`` on its own listener until cancelled; ``task_status`` gets the port.

    Binding errors raise (the operator should hear at start); after that, nothing a scraper
    does (or a bug in one request) ends this task, so it can share the relay's nursery.
    """
    socks = [trio.socket.from_stdlib_socket(s) for s in await bind_sockets(host, port, socket.SOCK_STREAM)]
    try:
        for s in socks:
            s.listen(128)
        bound = socks[0].getsockname()[1]
        server = _MetricsHTTP(registry, head_timeout, max_connections)
        async with trio.open_nursery() as nursery:
            for s in socks:
                nursery.start_soon(server.listen, s, nursery)
            log.info("metrics_serving", addr=",".join(format_addr(s.getsockname()[:2]) for s in socks), path="/metrics")
            task_status.started(bound)
    finally:
        for s in socks:
            s.close()


class _MetricsHTTP:
    """The endpoints of the metrics listener over the shared HTTP server core, and its connection cap."""

    def __init__(self, registry: Registry, head_timeout: float, max_connections: int) -> None:
        self.registry = registry
        self.limits = Limits(max_head=MAX_HEAD, max_body=MAX_BODY, head_timeout=head_timeout)
        self.max_connections = max_connections
        self.active = 0
        self.refused = log.Sampled("metrics_connection_refused", 60.0)

    async def listen(self, listener: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        def start(transport: SocketTransport) -> None:
            self.active += 1
            nursery.start_soon(self.serve_connection, transport)

        while True:  # never let the exporter end the relay: an error of the listener itself is waited out
            try:
                await accept_forever(listener, start, admit=self._admit, event="metrics_accept_failed")
            except OSError as e:
                log.error("metrics_accept_failed", reason=str(e), action="backing off 1s")
                await trio.sleep(1.0)

    def _admit(self) -> bool:
        if self.active < self.max_connections:
            return True
        self.refused.note(reason="too many metrics connections")
        return False

    async def serve_connection(self, transport: SocketTransport) -> None:
        http = HttpServerConnection(transport, self.limits)
        try:
            await http.serve(partial(self._dispatch, http))
        except Refused as e:
            log.debug("metrics_bad_request", status=e.status, reason=e.reason)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, h11.ProtocolError) as e:
            log.debug("metrics_connection_error", reason=str(e))
        except Exception:
            log.exception("metrics_internal_error")  # one connection's bug stays in that connection
        finally:
            self.active -= 1
            await transport.aclose()

    async def _dispatch(self, http: HttpServerConnection, request: h11.Request) -> bool:
        await http.drain_body()
        method = request.method
        if method not in (b"GET", b"HEAD"):
            await http.respond(405, [*NO_STORE, (b"Allow", b"GET, HEAD")], b"method not allowed\n")
            return False
        head = method == b"HEAD"
        path = request_path(request.target)
        if path == b"/metrics":
            try:
                body = render(self.registry.collect())
            except Exception:
                log.exception("metrics_collect_failed")
                await http.respond(500, NO_STORE, b"collecting metrics failed; see the log\n", head=head)
                return False
            content_type = (b"Content-Type", CONTENT_TYPE)
            await http.respond(200, [content_type, *NO_STORE], body, head=head)
        elif path == b"/":
            await http.respond(200, NO_STORE, INDEX_BODY, head=head)
        else:
            await http.respond(404, NO_STORE, b"not found; metrics are at /metrics\n", head=head)
        return False
