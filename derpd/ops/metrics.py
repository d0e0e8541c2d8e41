"""Prometheus metrics: a collector over derpd's live counters, and a small ``/metrics`` listener.

The relay, STUN, HTTP, limit and admission code keep plain integer counters (added per
batch on the hot path). Nothing here runs until Prometheus scrapes: ``DerpCollector``
reads those integers at scrape time and turns them into metric families, so metrics cost
the relay nothing beyond the increments it already does. Names follow derper's expvar
names (``derp_*``, ``stun_*``, ``tls_listener_*``) where one exists; the library adds
``_total`` to counters as Prometheus conventions want. No key or secret is ever a label.

Integration::

    registry = registry_for(server)          # once, at start (before or after server.run)
    port = await nursery.start(serve_metrics, "127.0.0.1", 9464, registry)
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterable, Iterator
from functools import partial
from typing import TYPE_CHECKING

import h11
import trio
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector

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


# --- the collector ------------------------------------------------------------------------------


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _labelled(
    family: CounterMetricFamily | GaugeMetricFamily, samples: Iterable[tuple[tuple[str, ...], float]]
) -> CounterMetricFamily | GaugeMetricFamily:
    for labels, value in samples:
        family.add_metric(list(labels), value)
    return family


def tls_version_label(version: str) -> str:
    """derper labels versions ``1.2``/``1.3``; Python says ``TLSv1.3``."""
    return version.removeprefix("TLSv")


class DerpCollector(Collector):
    """Reads one ``DerpServer``'s counters at scrape time (no per-packet work, no copies kept)."""

    def __init__(self, server: DerpServer, *, start_time: float | None = None, acme: CertManager | None = None) -> None:
        self.server = server
        self.acme = acme
        self.start_time = time.time() if start_time is None else start_time

    def describe(self) -> Iterable[Metric]:
        # Nothing to check at registration (the registry is ours alone), and a server that is
        # not running yet must not be read then.
        return []

    def collect(self) -> Iterator[Metric]:
        yield from self._relay()
        yield from self._rate_limit()
        yield from self._admission()
        yield from self._stun()
        yield from self._front()
        yield from self._certificate()
        build = GaugeMetricFamily("derpd_build_info", "derpd build; always 1", labels=["version"])
        build.add_metric([__version__], 1)
        yield build
        yield _gauge("derpd_start_time_seconds", "When this derpd started, in Unix seconds", self.start_time)

    def _relay(self) -> Iterator[Metric]:
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
            GaugeMetricFamily("derp_mesh_peer_up", "1 while the link to a --mesh-with peer is up", labels=["peer"]),
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
            CounterMetricFamily(
                "derp_packets_received_kind", "Data packets received from clients, by kind", labels=["kind"]
            ),
            [(("disco",), disco), (("other",), st.packets_received - disco)],
        )
        dropped_packets, dropped_bytes = st.dropped_packets, st.dropped_bytes
        every = [(reason, kind) for reason in DROP_REASONS for kind in KINDS]
        every += sorted(set(dropped_packets) - set(every))  # a reason added in relay.py still shows up
        yield _labelled(
            CounterMetricFamily(
                "derp_packets_dropped", "Data packets dropped, by reason and kind", labels=["reason", "kind"]
            ),
            [(k, dropped_packets.get(k, 0)) for k in every],
        )
        yield _labelled(
            CounterMetricFamily(
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

    def _rate_limit(self) -> Iterator[Metric]:
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

    def _admission(self) -> Iterator[Metric]:
        admission = self.server.settings.admission
        stats = getattr(admission, "stats", None)
        if stats is None:
            return
        yield _labelled(
            CounterMetricFamily(
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
            CounterMetricFamily(
                "derp_admission_overflow",
                "Checks decided by the fail-open/fail-closed policy at once because no verify request slot was "
                "free (all busy, or the client's source already held its share); also counted as result=error",
                labels=["reason"],
            ),
            [((reason,), n) for reason, n in stats.overflow.items()],
        )

    def _stun(self) -> Iterator[Metric]:
        stun = self.server.stun
        if stun is None:
            return
        st = stun.stats
        yield _labelled(
            CounterMetricFamily("stun_requests", "STUN datagrams received, by disposition", labels=["disposition"]),
            [((d,), n) for d, n in st.requests().items()],
        )
        yield _labelled(
            CounterMetricFamily(
                "stun_addrfamily", "STUN requests answered, by the address family replied", labels=["family"]
            ),
            [((f,), n) for f, n in st.addrfamily().items()],
        )
        yield _labelled(
            CounterMetricFamily("stun_request_kind", "STUN requests answered, by request dialect", labels=["kind"]),
            [((k,), n) for k, n in st.by_kind.items()],
        )

    def _front(self) -> Iterator[Metric]:
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
            CounterMetricFamily(
                "derper_tls_request_version", "TLS handshakes completed, by negotiated version", labels=["version"]
            ),
            [((tls_version_label(v),), n) for v, n in sorted(server.tls_versions.items())],
        )
        yield _counter("derp_websocket_accepts", "WebSocket DERP connections accepted", server.http.websocket_accepts)
        listeners = [("main", server.http)]
        if server.http_addrs or server.settings.http_port >= 0:  # bound, inherited (systemd) or configured
            listeners.append(("port80", server.http80))
        yield _labelled(
            CounterMetricFamily("derpd_http_requests", "HTTP requests read, by listener", labels=["listener"]),
            [((name,), front.requests) for name, front in listeners],
        )
        yield _labelled(
            CounterMetricFamily(
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
            CounterMetricFamily(
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


    def _certificate(self) -> Iterator[Metric]:
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
            CounterMetricFamily(
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
            CounterMetricFamily(
                "derpd_acme_challenges_answered",
                "ACME validation requests answered, by challenge type",
                labels=["type"],
            ),
            [(("http-01",), book.http01_answered), (("tls-alpn-01",), book.tls_alpn01_answered)],
        )


def registry_for(
    server: DerpServer, *, start_time: float | None = None, process: bool = True, acme: CertManager | None = None
) -> CollectorRegistry:
    """A dedicated registry (not the global one, so several servers in one process don't clash)
    with derpd's collector and, unless ``process`` is False, the ``process_*``/``python_*`` ones."""
    registry = CollectorRegistry()
    registry.register(DerpCollector(server, start_time=start_time, acme=acme))
    if process:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
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
    registry: CollectorRegistry,
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

    def __init__(self, registry: CollectorRegistry, head_timeout: float, max_connections: int) -> None:
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
                body = generate_latest(self.registry)
            except Exception:
                log.exception("metrics_collect_failed")
                await http.respond(500, NO_STORE, b"collecting metrics failed; see the log\n", head=head)
                return False
            content_type = (b"Content-Type", CONTENT_TYPE_PLAIN_0_0_4.encode())
            await http.respond(200, [content_type, *NO_STORE], body, head=head)
        elif path == b"/":
            await http.respond(200, NO_STORE, INDEX_BODY, head=head)
        else:
            await http.respond(404, NO_STORE, b"not found; metrics are at /metrics\n", head=head)
        return False
