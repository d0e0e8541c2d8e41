"""Composition: listeners, the HTTP front, the relay core and the STUN responder.

``DerpServer`` owns sockets and tasks; each concern it wires together lives in its
own module and knows nothing of the others.
"""

from __future__ import annotations

import math
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial

import trio

from derpd.base import log
from derpd.base.text import Peer
from derpd.net.addr import ActivatedSockets, bind_sockets, bind_unix, format_addr
from derpd.net.httpserver import HEAD_TIMEOUT, accept_forever
from derpd.net.tls import CertStore
from derpd.net.transport import SocketTransport, TLSTransport, Transport, close_transport
from derpd.proto.keys import NodePrivate, public_key_text
from derpd.proto.proxyproto import Network, ProxyHeaderReader, ProxyProtocolError, is_trusted
from derpd.proto.tlshello import ClientHello, ClientHelloError, ClientHelloReader
from derpd.server.challenges import ChallengeBook
from derpd.server.front import HttpConfig, HttpFront
from derpd.server.limits import AcceptLimiter, LimitError, PerIPLimiter, RateConfig
from derpd.server.mesh import MeshTarget, keep_link
from derpd.server.relay import Admitter, RelayConfig, RelayServer
from derpd.server.stun import StunServer

# A fatal TLS alert record, internal_error (80), as TLS 1.0-1.3 all read it: what a ClientHello gets
# while --certmode letsencrypt has no certificate yet (Go's autocert answers the same way).
TLS_ALERT_INTERNAL_ERROR = bytes([21, 3, 1, 0, 2, 2, 80])


@dataclass
class ServerSettings:
    addr: tuple[str, int] = ("", 3340)
    stun_port: int = 3478  # -1 disables
    stun_host: str | None = None  # None = the host of addr; "" = every interface, dual-stack
    stun_generic: bool = True  # False (--no-stun-generic): answer only Tailscale's STUN requests, as derper
    home: str = ""
    mesh_key: bytes | None = None
    relay: RelayConfig = field(default_factory=RelayConfig)
    tls: CertStore | None = None  # TLS on the main listener (--certmode manual)
    hostname: str = ""  # where the port-80 listener redirects to
    http_port: int = -1  # plain-HTTP side listener on the same host; -1 = none
    accept_limit: float = math.inf  # new connections per second on the main listener
    accept_burst: int = 0
    max_conns_per_ip: int = 0
    proxy_protocol: bool = False
    trusted_proxies: list[Network] = field(default_factory=list)
    tcp_keepalive: float = 600.0  # seconds; 0 leaves the kernel default
    tcp_user_timeout: float = 15.0  # seconds; 0 leaves the kernel default
    admission: Admitter | None = None
    challenges: ChallengeBook | None = None  # --certmode letsencrypt: answers to the CA's validation
    rate_config_path: str | None = None
    head_timeout: float = HEAD_TIMEOUT
    activated: ActivatedSockets | None = None  # sockets inherited from systemd (socket activation)
    mesh_with: list[MeshTarget] = field(default_factory=list)  # --mesh-with peers (needs mesh_key)
    # --workers: this worker's private unix socket, its sibling workers, and the key its links use
    # (not the node key, which every worker shares: a watcher with our own key would be ignored).
    internal_socket: str | None = None
    internal_peers: list[MeshTarget] = field(default_factory=list)
    internal_client_key: NodePrivate | None = None
    internal_mesh_key: bytes | None = None  # what siblings present; never the region's mesh key
    mesh_ssl_context: ssl.SSLContext | None = None  # how to verify https:// mesh peers
    shutdown_timeout: float = 5.0  # graceful shutdown: at most this long to flush and close
    restart_reconnect_in: float = 1.0  # the Restarting frame: when clients should reconnect
    restart_try_for: float = 30.0  # ... and for how long they should keep trying


class DerpServer:
    """A DERP node: listeners, the HTTP front, the relay and the STUN responder, under one nursery.

    Each accepted connection goes: accept limit → PROXY header (only from trusted proxies,
    when enabled) → per-IP cap → TLS (when configured) → HTTP front → DERP relay.
    """

    def __init__(self, key: NodePrivate, settings: ServerSettings) -> None:
        self.key = key
        self.settings = settings
        settings.relay.mesh_key = settings.mesh_key
        settings.relay.internal_mesh_key = settings.internal_mesh_key
        self.relay = RelayServer(key, settings.relay)
        self.relay.admission = settings.admission
        self.challenges = settings.challenges
        http01 = self.challenges.http01 if self.challenges is not None else None
        self.http = HttpFront(
            self.relay.serve_connection,
            key.public,
            HttpConfig(home=settings.home, head_timeout=settings.head_timeout, acme_http01=http01),
        )
        redirect = HttpConfig(
            head_timeout=settings.head_timeout, https_redirect=settings.hostname or None, acme_http01=http01
        )
        self.http80 = HttpFront(None, key.public, redirect)
        self.tls = settings.tls
        self.accept_limiter = AcceptLimiter(settings.accept_limit, settings.accept_burst, now=trio.current_time())
        self.per_ip = PerIPLimiter(settings.max_conns_per_ip)
        self.tls_versions: dict[str, int] = {}
        self.tls_handshake_failures = 0
        self.proxy_refused = 0  # PROXY header from an untrusted address, missing, malformed or late
        self.stun: StunServer | None = None
        self.derp_addrs: list[tuple[str, int]] = []
        self.http_addrs: list[tuple[str, int]] = []
        self.stun_addrs: list[tuple[str, int]] = []
        self._accept_scopes: list[trio.CancelScope] = []
        self._listeners: list[socket.socket] = []
        self._refused = log.Sampled("connection_refused", 10.0)
        self._tls_failed = log.Sampled("tls_handshake_failed", 10.0)
        self._no_cert = log.Sampled("tls_refused_no_certificate_yet", 10.0)
        self._alpn_refused = log.Sampled("acme_tls_alpn_refused", 10.0)

    @property
    def port(self) -> int:
        return self.derp_addrs[0][1]

    async def run(self, *, task_status: trio.TaskStatus[DerpServer] = trio.TASK_STATUS_IGNORED) -> None:
        settings = self.settings
        host, port = settings.addr
        activated = settings.activated or ActivatedSockets()
        # Socket activation: systemd holds the sockets across restarts.
        # Plain non-blocking sockets: the accept loop's fast path (net.httpserver.accept_forever).
        listeners = activated.derp or await bind_sockets(host, port, socket.SOCK_STREAM)
        side: list[socket.socket] = []
        internal: trio.socket.SocketType | None = None
        try:
            if activated.http:
                side = activated.http
            elif settings.http_port >= 0:
                side = await bind_sockets(host, settings.http_port, socket.SOCK_STREAM)
            for s in listeners:
                s.setblocking(False)
                self._tune(s)  # accepted connections inherit these (checked on the first one)
                s.listen(4096)
                self.derp_addrs.append(tuple(s.getsockname()[:2]))
            for s in side:
                s.setblocking(False)
                self._tune(s)
                s.listen(1024)
                self.http_addrs.append(tuple(s.getsockname()[:2]))
            self._listeners = listeners + side
            async with trio.open_nursery() as nursery:
                await nursery.start(self.relay.run_tasks)
                for s in listeners:
                    nursery.start_soon(self._accept_loop, s, nursery, self._serve_main, True)
                for s in side:
                    nursery.start_soon(self._accept_loop, s, nursery, self._serve_port80, False)
                if settings.internal_socket:
                    internal = await bind_unix(settings.internal_socket)
                    nursery.start_soon(self._accept_loop, internal, nursery, self._serve_internal, False)
                nursery.start_soon(self._tick_conn_log)
                if settings.internal_peers and settings.internal_mesh_key and settings.internal_client_key:
                    for target in settings.internal_peers:
                        nursery.start_soon(
                            partial(
                                keep_link,
                                self.relay,
                                target,
                                client_key=settings.internal_client_key,
                                mesh_key=settings.internal_mesh_key,
                                internal=True,
                            )
                        )
                if settings.mesh_with and settings.mesh_key:
                    for target in settings.mesh_with:
                        nursery.start_soon(
                            partial(
                                keep_link,
                                self.relay,
                                target,
                                client_key=self.key,  # as derper: the node's own key, so peers see "self"
                                mesh_key=settings.mesh_key,
                                ssl_context=settings.mesh_ssl_context,
                            )
                        )
                if activated.stun or settings.stun_port >= 0:
                    stun_host = host if settings.stun_host is None else settings.stun_host
                    if activated.stun:
                        stun = StunServer(sock=activated.stun, generic=settings.stun_generic)
                    else:
                        stun = StunServer(stun_host, settings.stun_port, generic=settings.stun_generic)
                    self.stun = stun
                    await nursery.start(stun.serve)
                    self.stun_addrs = list(stun.addresses)
                log.info(
                    "serving",
                    derp=",".join(format_addr(a) for a in self.derp_addrs),
                    tls="on" if self.tls else "off",
                    http=",".join(format_addr(a) for a in self.http_addrs) or None,
                    stun=",".join(format_addr(a) for a in self.stun_addrs) or "off",
                    public_key=public_key_text(self.key.public),
                    mesh_key="configured" if settings.mesh_key else "none",
                )
                task_status.started(self)
        finally:
            for s in listeners + side:
                _close_listener(s)
            if internal is not None:
                internal.close()

    async def shutdown(self) -> None:
        """Stop accepting, send every client a Restarting frame, flush and close them within the
        shutdown timeout. The caller then cancels ``run``; STUN answers until then."""
        for scope in self._accept_scopes:
            scope.cancel()
        for s in self._listeners:
            _close_listener(s)
        st = self.settings
        await self.relay.close_all((st.restart_reconnect_in, st.restart_try_for), st.shutdown_timeout)

    def reload(self) -> None:
        """SIGHUP: certificates, the allowlist and the rate config; each keeps its old value on error."""
        log.info("reloading")
        if self.tls is not None:
            self.tls.reload()
        if self.settings.admission is not None:
            self.settings.admission.reload()
        path = self.settings.rate_config_path
        if path:
            try:
                rate = RateConfig.load(path)
            except LimitError as e:
                log.warning("reload_failed", what="rate config", reason=str(e), action="keeping the old one")
            else:
                self.relay.set_rate(rate)
                log.info("rate_config_loaded", bytes_per_second=rate.bytes_per_second, burst=rate.burst_bytes)

    async def _accept_loop(
        self,
        lsock: trio.socket.SocketType | socket.socket,
        nursery: trio.Nursery,
        serve: Callable[[SocketTransport], Awaitable[None]],
        limited: bool,
    ) -> None:
        # Whether each connection needs its own socket options: unknown until the first one shows whether
        # the listener's carried over (Linux copies them all; other kernels may not).
        tune_each: bool | None = None

        def start(transport: SocketTransport) -> None:
            nonlocal tune_each
            if tune_each is None:
                tune_each = not self._tuned(transport.sock)
            if tune_each:
                self._tune(transport.sock)
            nursery.start_soon(serve, transport)

        scope = trio.CancelScope()
        self._accept_scopes.append(scope)
        with scope:
            # TCP_NODELAY is one of the wanted options: inherited, or set by start() with the others.
            await accept_forever(lsock, start, admit=self._admit if limited else None, nodelay=False)

    async def _tick_conn_log(self) -> None:
        """The client_churn summary of a busy second comes out within a second or so, even when no
        connection comes after it."""
        conn_log = self.relay.conn_log
        while True:
            await trio.sleep(conn_log.window)
            conn_log.tick(self.relay.clock())

    def _admit(self) -> bool:
        """--accept-connection-limit: over it, a connection is closed at once, as derper does."""
        if self.accept_limiter.allow(trio.current_time()):
            return True
        self._refused.note(reason="accept limit")
        return False

    def _wanted_options(self, sock: socket.socket) -> list[tuple[int, int, int]]:
        """(level, option, value) of TCP keepalive and TCP_USER_TIMEOUT as derper sets them on accepted
        sockets, and TCP_NODELAY; none for a unix socket (a worker's)."""
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return []
        options = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
        keepalive = self.settings.tcp_keepalive
        if keepalive > 0:
            options.append((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1))
            if hasattr(socket, "TCP_KEEPIDLE"):
                secs = max(1, int(keepalive))
                options.append((socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, secs))
                options.append((socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, secs))
        user_timeout = self.settings.tcp_user_timeout
        if user_timeout > 0 and hasattr(socket, "TCP_USER_TIMEOUT"):
            options.append((socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(user_timeout * 1000)))
        return options

    def _tune(self, sock: socket.socket) -> None:
        """Set the wanted options on a listener (its connections inherit them) or on one connection."""
        for level, option, value in self._wanted_options(sock):
            sock.setsockopt(level, option, value)

    def _tuned(self, sock: socket.socket) -> bool:
        """Whether an accepted socket already has every wanted option (inherited from its listener)."""
        try:
            return all(sock.getsockopt(level, option) == value for level, option, value in self._wanted_options(sock))
        except OSError:
            return False

    async def _serve_main(self, transport: SocketTransport) -> None:
        try:
            await self._serve_connection(transport)
        except Exception:
            # A bug in handling one connection must not take down everyone else's.
            log.exception("internal_error", remote=format_addr(transport.remote))
        finally:
            if transport.sock.fileno() >= 0:  # not closed already by whoever took the connection over
                await close_transport(transport)

    async def _serve_connection(self, transport: SocketTransport) -> None:
        initial = b""
        if self.settings.proxy_protocol:
            got = await self._read_proxy_header(transport)
            if got is None:
                return
            initial = got
        ip = transport.remote[0] if transport.remote else ""
        if not self.per_ip.acquire(ip):
            self._refused.note(reason="per-IP connection cap", remote=format_addr(transport.remote))
            return
        try:
            conn: Transport = transport
            if self.tls is not None:
                tls = await self._tls_handshake(transport, initial)
                if tls is None:
                    return
                conn, initial = tls, b""
            await self.http.handle(conn, initial=initial)
        finally:
            self.per_ip.release(ip)

    async def _serve_internal(self, transport: SocketTransport) -> None:
        """A sibling worker's mesh link over the private unix socket: no PROXY, limits or TLS."""
        try:
            await self.http.handle(transport)
        except Exception:
            log.exception("internal_error", remote="unix")

    async def _serve_port80(self, transport: SocketTransport) -> None:
        try:
            await self.http80.handle(transport)
        except Exception:
            log.exception("internal_error", remote=format_addr(transport.remote))

    async def _read_proxy_header(self, transport: SocketTransport) -> bytes | None:
        """The bytes after a PROXY header from a trusted proxy, with the real client as the
        transport's remote; None (and the connection dropped) for anything else."""
        peer = transport.remote
        if peer is None or not is_trusted(peer[0], self.settings.trusted_proxies):
            self.proxy_refused += 1
            self._refused.note(reason="PROXY header from an untrusted address", remote=format_addr(peer))
            return None
        reader = ProxyHeaderReader()
        with trio.move_on_after(self.settings.head_timeout):
            while True:
                data = await transport.receive_some()
                if not data:
                    return None
                try:
                    got = reader.feed(data)
                except ProxyProtocolError as e:
                    self.proxy_refused += 1
                    log.info("proxy_header_refused", remote=format_addr(peer), reason=str(e))
                    return None
                if got is not None:
                    header, rest = got
                    if header.source is not None:
                        transport.remote = header.source
                    return rest
        self.proxy_refused += 1
        log.info("proxy_header_refused", remote=format_addr(peer), reason="no PROXY header in time")
        return None

    async def _read_client_hello(
        self, transport: SocketTransport, initial: bytes, deadline: float
    ) -> tuple[bytes, ClientHello | None]:
        """The bytes of the ClientHello (to replay into TLS) and what it offers; None if it is no
        well-formed ClientHello (OpenSSL then refuses it as it always would) or not by ``deadline``."""
        reader = ClientHelloReader()
        hello: ClientHello | None = None
        try:
            hello = reader.feed(initial) if initial else None
            with trio.move_on_at(deadline):
                while hello is None:
                    data = await transport.receive_some()
                    if not data:
                        break
                    hello = reader.feed(data)
        except ClientHelloError:
            hello = None
        return reader.buffered, hello

    async def _tls_handshake(self, transport: SocketTransport, initial: bytes) -> TLSTransport | None:
        assert self.tls is not None
        deadline = trio.current_time() + self.settings.head_timeout  # the hello and the handshake, together
        if self.challenges is not None:  # --certmode letsencrypt: the CA's validation, or no certificate yet
            initial, hello = await self._read_client_hello(transport, initial, deadline)
            if hello is not None and hello.acme_tls_alpn:
                await self._answer_tls_alpn01(transport, initial, hello, deadline)
                return None
            if not self.tls.has_certificate:
                self.tls_handshake_failures += 1
                self._no_cert.note(remote=format_addr(transport.remote), why="no certificate from the ACME CA yet")
                await _send_alert(transport)
                return None
        tls = TLSTransport(transport, self.tls.context, initial)
        with trio.move_on_at(deadline) as scope:
            try:
                await tls.handshake()
            except (ssl.SSLError, OSError) as e:
                self.tls_handshake_failures += 1
                self._tls_failed.note(remote=format_addr(transport.remote), reason=str(e) or type(e).__name__)
                return None
        if scope.cancelled_caught:
            self.tls_handshake_failures += 1
            self._tls_failed.note(remote=format_addr(transport.remote), reason="handshake not done in time")
            return None
        version = tls.version() or "unknown"
        self.tls_versions[version] = self.tls_versions.get(version, 0) + 1
        return tls

    async def _answer_tls_alpn01(
        self, transport: SocketTransport, initial: bytes, hello: ClientHello, deadline: float
    ) -> None:
        """A CA validating TLS-ALPN-01 (RFC 8737): complete the handshake with the challenge
        certificate, then close; nothing else is ever said on such a connection."""
        assert self.challenges is not None
        context = self.challenges.tls_alpn01(hello.server_name)
        remote = format_addr(transport.remote)
        sni = Peer(hello.server_name) if hello.server_name is not None else None
        if context is None:  # anyone may offer acme-tls/1: sampled, like other refused handshakes
            self._alpn_refused.note(remote=remote, sni=sni, why="no challenge pending for it")
            await _send_alert(transport)
            return
        tls = TLSTransport(transport, context, initial)
        with trio.move_on_at(deadline):
            try:
                await tls.handshake()
            except (ssl.SSLError, OSError) as e:
                self._alpn_refused.note(remote=remote, sni=sni, why=Peer(str(e) or type(e).__name__))
                return
            log.info("acme_tls_alpn_answered", remote=remote, sni=sni)


async def _send_alert(transport: SocketTransport) -> None:
    """A fatal internal_error alert for a handshake we will not do, within a second (the caller closes)."""
    with trio.move_on_after(1.0):
        await transport.send_all(TLS_ALERT_INTERNAL_ERROR)


def _close_listener(sock: socket.socket) -> None:
    if sock.fileno() >= 0:
        trio.lowlevel.notify_closing(sock)  # an accept loop still waiting on it wakes with an error
        sock.close()
