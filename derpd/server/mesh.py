"""The regional mesh: this node watches its peers' clients and forwards packets to them.

For every ``--mesh-with`` peer (and, with ``--workers``, every sibling worker) a task keeps one
outbound DERP connection presenting the mesh key: it logs in with ``derpd.net.client``, sends
WatchConns, learns from the PeerPresent/PeerGone stream which keys the peer serves (the relay's
forwarders; the stream is decoded by the client role of ``derpd.proto.connection``), and carries
ForwardPacket frames to it through an ``Outbox``. This is Tailscale's own mesh protocol, so derpd
meshes with Go derper nodes too. Forwarding is one hop: packets a peer forwards to us are only
delivered locally (the relay's rule).
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import trio

from derpd.base import log
from derpd.base.errors import ConfigurationError
from derpd.net.addr import is_ip, remote_of
from derpd.net.client import CONNECT_TIMEOUT, ConnectionLost, DerpClient, DerpHTTPError
from derpd.net.transport import SocketTransport, StreamTransport, Transport
from derpd.proto.connection import NEED_DATA, DerpConnection, Health, PeerGone, PeerPresent, Ping, Restarting
from derpd.proto.frames import (
    FRAME_HEADER_LEN,
    ClientInfo,
    FrameType,
    HandshakeError,
    ProtocolError,
    pack_header,
    pong_frame,
    reframe_run,
    run_payloads,
)
from derpd.proto.keys import KEY_LEN, NodeKey, NodePrivate, short_key
from derpd.server.outbox import ConnectionClosed, Outbox
from derpd.server.relay import ClientConn, RelayServer

FORWARD = FrameType.FORWARD_PACKET
# ForwardPackets waiting for one peer (all its clients' traffic from us): up to this many in runs
# (Outbox.express) while none wait one by one, and up to this many one by one (Outbox.q_other, the
# oldest dropped beyond it) once runs no longer fit.
LINK_QUEUE_DEPTH = 4096
BACKOFF_MIN = 0.5
BACKOFF_MAX = 5.0  # derper retries every 5 s


class MeshError(ConfigurationError, ValueError):
    """A --mesh-with entry is unusable."""


@dataclass(frozen=True)
class MeshTarget:
    """One peer: the URL whose name TLS and HTTP use, and where to dial."""

    name: str
    url: str
    dial: tuple[str, int] | str | None = None  # another host:port (host/dialhost), or a unix socket

    @property
    def label(self) -> str:
        return self.name


def parse_targets(spec: str, *, tls: bool, default_port: int) -> list[MeshTarget]:
    """``--mesh-with``: a comma-separated list of peers, every form derper's ``-mesh-with`` takes
    plus derpd's own.

    derper's forms (``cmd/derper/mesh.go``): ``host`` or ``host/dialhost``, where ``host`` may carry
    a port (``localhost:8443``, ``[2001:db8::1]:8443``); derper builds ``https://host/derp`` and, with
    a dialhost, connects to ``dialhost`` on that URL's port while TLS and HTTP still use ``host``.
    A bare IPv6 address (``2001:db8::1``) is a host without a port; give a port with brackets.
    derpd's extras: full ``http(s)://`` URLs, ``unix:/path`` (a local node), a port on the dialhost
    (``host/10.0.0.5:8443``), and plain HTTP when this node serves no TLS: ``http://host:PORT/derp``
    with the item's own port, or ``default_port`` (our own DERP port) when it gives none, as for
    derper --dev. Anything else is a :class:`MeshError` naming the item."""
    targets: list[MeshTarget] = []
    for raw in spec.split(","):
        item = raw.strip()
        if item:
            targets.append(_parse_target(item, tls=tls, default_port=default_port))
    seen: dict[tuple[str, tuple[str, int] | str | None], str] = {}
    for t in targets:
        first = seen.get((t.url, t.dial))
        if first is not None:
            if first == t.name:
                raise MeshError(f"--mesh-with lists {t.name!r} twice")
            raise MeshError(f"--mesh-with lists one peer twice: {first!r} and {t.name!r} are both {t.url}")
        seen[(t.url, t.dial)] = t.name
    return targets


def _parse_target(item: str, *, tls: bool, default_port: int) -> MeshTarget:
    def bad(why: str) -> MeshError:
        return MeshError(f"--mesh-with {item!r}: {why}")

    if any(c.isspace() or not c.isprintable() for c in item):
        raise bad("has a space or control character; separate peers with commas only")
    if item.startswith("unix:"):
        path = item[len("unix:") :]
        if not path.startswith("/"):
            raise bad("unix sockets need an absolute path (unix:/run/derpd/w.sock)")
        return MeshTarget(item, "http://localhost/derp", path)
    scheme = item.partition("://")[0].lower() if "://" in item else None
    if scheme is not None:
        if scheme not in ("http", "https"):
            raise bad("only http:// and https:// URLs can name a peer")
        return MeshTarget(item, _peer_url(item, bad))
    parts = item.split("/")
    if len(parts) > 2:
        raise bad("more than one '/': expected host, host:port, host/dialhost or a URL")
    host, port = _host_port(parts[0], "host", bad)
    dial: tuple[str, int] | None = None
    if port is None:
        port = 443 if tls else default_port
    if len(parts) == 2:
        dial_host, dial_port = _host_port(parts[1], "dialhost", bad)
        dial = (dial_host, dial_port or port)
    shown = f"[{host}]" if ":" in host else host
    if tls:
        url = f"https://{shown}/derp" if port == 443 else f"https://{shown}:{port}/derp"
    else:
        url = f"http://{shown}:{port}/derp"
    return MeshTarget(item, url, dial)


_PORT = re.compile(r"[0-9]{1,5}")
_HOST_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def _host_port(text: str, what: str, bad: Callable[[str], MeshError]) -> tuple[str, int | None]:
    """``name``, ``name:port``, ``IPv4[:port]``, ``[IPv6][:port]`` or a bare IPv6 address."""
    if not text:
        raise bad(f"empty {what}")
    port_text: str | None = None
    if text.startswith("["):
        inner, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise bad(f"{what} {text!r}: expected [IPv6 address] or [IPv6 address]:port")
        if not is_ip(inner) or ":" not in inner:
            raise bad(f"{what} {text!r}: brackets hold an IPv6 address")
        host = inner
        port_text = rest[1:] if rest else None
    elif is_ip(text):
        host = text  # IPv4, or a bare IPv6 address: every colon is the address's own
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif ":" in text:
        raise bad(f"{what} {text!r}: write an IPv6 address with a port as [address]:port")
    else:
        host = text
    if not host:
        raise bad(f"empty {what} in {text!r}")
    if "%" in host and ":" in host:
        raise bad(f"{what} {text!r}: IPv6 zones (%) are not supported")
    if not is_ip(host):
        if not host.isascii():
            raise bad(f"{what} {host!r}: write an internationalized name in its xn-- (IDNA) form")
        name = host.removesuffix(".")
        labels = name.split(".")
        if not name or len(name) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
            raise bad(f"{what} {host!r} is not a host name or IP address")
        if labels[-1].isdigit():
            raise bad(f"{what} {host!r} is neither an IPv4 address nor a host name")
    if port_text is None:
        return host, None
    if not port_text:
        raise bad(f"{what} {text!r}: empty port after ':'")
    if not _PORT.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
        raise bad(f"port {port_text!r} in {text!r} is not a port number (1-65535)")
    return host, int(port_text)


def _peer_url(item: str, bad: Callable[[str], MeshError]) -> str:
    """A full ``http(s)://host[:port][/path]`` URL, with ``/derp`` when it has no path."""
    try:
        parts = urlsplit(item)
    except ValueError as e:
        raise bad(f"not a valid URL ({e})") from None
    if "@" in parts.netloc or parts.query or parts.fragment or item.endswith(("?", "#")):
        raise bad("a peer's URL has no user, query or fragment: https://host[:port]/derp")
    host, _ = _host_port(parts.netloc, "host", bad)  # the same host[:port] rules as the short forms
    if ":" in host and not parts.netloc.startswith("["):
        raise bad("an IPv6 address in a URL needs brackets: https://[address]:port/derp")
    return item if parts.path else item + "/derp"



class MeshLink:
    """The outbound connection to one peer: ForwardPackets out, PeerPresent/PeerGone in.

    Composed of the relay's own pieces: a ClientConn (``conn``) runs it, with the write deadline
    of a mesh peer, no keepalives (the peer's server sends them) and sent packets not counted
    again (they were counted as forwarded when routed); its Outbox (``outbox``) carries the
    ForwardPackets; and the logged-in client side of the protocol (``derp``) decodes what the
    peer's server sends.
    """

    __slots__ = ("conn", "derp", "name", "outbox")

    def __init__(
        self,
        relay: RelayServer,
        transport: Transport,
        derp: DerpConnection,
        name: str,
        *,
        internal: bool = False,
    ) -> None:
        self.conn = ClientConn(
            relay,
            transport,
            derp.peer_key,
            ClientInfo(),
            -1,
            can_mesh=True,
            not_ideal=False,
            internal=internal,
            outbound=True,
        )
        self.outbox = self.conn.outbox
        self.derp = derp
        self.name = name

    def __repr__(self) -> str:
        return f"<MeshLink {self.name} {short_key(self.key)}>"

    @property
    def key(self) -> NodeKey:
        """The peer's server key."""
        return self.conn.key

    @property
    def internal(self) -> bool:
        """The peer is a sibling worker of this node (--workers), not another node."""
        return self.conn.internal

    def forward(self, frame: bytes, disco: bool, touched: list[Outbox]) -> None:
        """Queue one ForwardPacket (the relay calls this while routing a read)."""
        out = self.outbox
        q = out.q_other
        if len(q) >= LINK_QUEUE_DEPTH:
            if not out.writing:
                out.kick()
            if len(q) >= LINK_QUEUE_DEPTH:
                self.conn.server.stats.drop("queue_head", False, len(q.popleft()))
        q.append(frame)
        out.touch(touched)

    def forward_run(self, src: bytes, buf: bytes, run: list[int], touched: list[Outbox]) -> None:
        """SendPackets in ``buf`` (header offsets ``run``, one destination, none disco) as
        ForwardPackets from ``src``, in one piece: each frame the SendPacket with ``src`` put in
        after its header (the packets are copied once, by the join). Unlike a client's, a link's
        runs also queue while its writer task is busy (a peer on a loaded machine is behind much of
        the time, and its link carries every client's traffic), up to LINK_QUEUE_DEPTH packets; past
        that, and until the queue has drained, they go one by one through the bounded queue, which
        drops the oldest, so the order stays as routed."""
        out = self.outbox
        if out.q_other or out.express_pkts + len(run) > LINK_QUEUE_DEPTH:
            for payload in run_payloads(buf, run):  # the destination key, then the packet
                self.forward(pack_header(FORWARD, KEY_LEN + len(payload)) + src + payload, False, touched)
            return
        seg = reframe_run(buf, run, FORWARD, src, 0)
        n = len(run)
        out.add_run(seg, n, len(seg) - n * (FRAME_HEADER_LEN + 2 * KEY_LEN), touched)  # the packets alone

    async def run(self) -> None:
        """Until the link breaks (the reason is in ``conn.close_reason``) or is cancelled."""
        await self.conn.run(self._read_loop)

    async def _read_loop(self) -> None:
        relay = self.conn.server
        own = relay.public_key
        receive = self.conn.transport.receive_some
        derp = self.derp
        out = self.outbox
        while True:
            while (event := derp.next_event()) is not NEED_DATA:
                if isinstance(event, PeerPresent):
                    if event.key != own:  # our own link, as the peer sees it
                        relay.add_forwarder(event.key, self, event)
                elif isinstance(event, PeerGone):
                    relay.remove_forwarder(event.peer, self)
                elif isinstance(event, Ping):
                    if out.pong is None:
                        out.pong = pong_frame(event.data)
                        out.kick()
                elif isinstance(event, Restarting):
                    log.info("mesh_peer_restarting", peer=self.name)
                elif isinstance(event, Health) and event.problem:
                    log.warning("mesh_peer_health", peer=self.name, problem=event.problem)
            data = await receive()
            if not data:
                raise ConnectionClosed("mesh peer closed the connection")
            self.conn.bytes_in += len(data)
            derp.receive_data(data)


class SelfPeer(Exception):
    """The peer is this very server (its key is ours): nothing to mesh with."""


async def connect_link(
    relay: RelayServer,
    target: MeshTarget,
    *,
    client_key: NodePrivate,
    mesh_key: bytes,
    ssl_context: ssl.SSLContext | None,
    internal: bool = False,
) -> MeshLink:
    """Dial, log in with the mesh key, WatchConns, and turn the connection into a MeshLink.
    ``internal``: the peer is a sibling worker, which shares our server key. The whole connect
    is bounded as derphttp bounds it (CONNECT_TIMEOUT, 10 s)."""
    with trio.fail_after(CONNECT_TIMEOUT):
        client = await DerpClient.connect(
            target.url,
            client_key,
            mesh_key=mesh_key,
            can_ack_pings=True,
            ssl_context=ssl_context,
            dial=target.dial,
            fast_start=False,
        )
        try:
            if client.server_key == relay.public_key and not internal:
                raise SelfPeer
            await client.watch_conns()
        except BaseException:
            await client.aclose()
            raise
    stream, derp = client.detach()
    transport: Transport
    if isinstance(stream, trio.SocketStream):
        remote = remote_of(stream.socket)
        transport = SocketTransport.from_trio(stream.socket)
        transport.remote = remote
    else:
        transport = StreamTransport(stream, None)
    return MeshLink(relay, transport, derp, target.label, internal=internal)



async def keep_link(
    relay: RelayServer,
    target: MeshTarget,
    *,
    client_key: NodePrivate,
    mesh_key: bytes,
    ssl_context: ssl.SSLContext | None = None,
    internal: bool = False,
) -> None:
    """Keep one peer linked for as long as the server runs: reconnect with backoff, and on
    every reconnect rebuild that peer's routes from its fresh PeerPresent flood."""
    backoff = BACKOFF_MIN
    relay.mesh_links[target.label] = None
    while True:
        try:
            link = await connect_link(
                relay, target, client_key=client_key, mesh_key=mesh_key, ssl_context=ssl_context, internal=internal
            )
        except SelfPeer:
            log.info("mesh_peer_is_self", peer=target.label, action="not meshing with it")
            relay.mesh_links.pop(target.label, None)
            return
        except (
            OSError,
            ssl.SSLError,
            DerpHTTPError,
            HandshakeError,
            ProtocolError,
            ConnectionLost,
            trio.TooSlowError,
        ) as e:
            log.info(
                "mesh_connect_failed", peer=target.label, reason=str(e) or type(e).__name__, retry_in=f"{backoff:g}s"
            )
        else:
            backoff = BACKOFF_MIN
            relay.mesh_links[target.label] = link
            relay.stats.mesh_connects += 1
            remote = link.conn.remote
            log.info("mesh_connected", peer=target.label, key=short_key(link.key), remote=remote and remote[0])
            try:
                await link.run()
            finally:
                relay.remove_link(link)  # derper's MeshConnBroke: routes come back with the next flood
                relay.mesh_links[target.label] = None
                with trio.CancelScope(shield=True):
                    await link.conn.transport.aclose()
                log.info("mesh_disconnected", peer=target.label, reason=link.conn.close_reason or "server shutdown")
        await trio.sleep(backoff)
        backoff = min(backoff * 2, BACKOFF_MAX)
