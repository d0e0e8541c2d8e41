"""The regional mesh: this node watches its peers' clients and forwards packets to them.

For every ``--mesh-with`` peer a task keeps one outbound DERP connection presenting the
mesh key: it sends WatchConns, learns from the PeerPresent/PeerGone stream which keys the
peer serves (the relay's forwarders), and carries ForwardPacket frames to it. This is
Tailscale's own mesh protocol, so derpd meshes with Go derper nodes too. Forwarding is
one hop: packets a peer forwards to us are only delivered locally (the relay's rule).
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

import trio

from . import log
from .client import ConnectionLost, DerpClient, DerpHTTPError
from .keys import NodePrivate, short_key
from .protocol import (
    MAX_FRAME_LEN,
    NONCE_LEN,
    ClientInfo,
    FrameReader,
    FrameType,
    HandshakeError,
    ProtocolError,
    parse_peer_gone,
    parse_peer_present,
    parse_ping,
    pong_frame,
)
from .relay import ClientConn, ConnectionClosed, RelayServer, _touch
from .transport import SocketTransport, StreamTransport, Transport

LINK_QUEUE_DEPTH = 4096  # ForwardPackets waiting for one peer (all its clients' traffic from us)
BACKOFF_MIN = 0.5
BACKOFF_MAX = 5.0  # derper retries every 5 s


class MeshError(ValueError):
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
    """``--mesh-with``: comma-separated ``host``, ``host/dialhost``, full ``http(s)://`` URLs, or
    ``unix:/path`` (a local node). Bare hosts use https://host/derp in TLS mode, else plain HTTP
    on ``default_port`` (our own DERP port), as derper's --dev does."""
    targets: list[MeshTarget] = []
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            continue
        if item.startswith("unix:"):
            path = item[len("unix:") :]
            if not path.startswith("/"):
                raise MeshError(f"--mesh-with {item!r}: unix sockets need an absolute path")
            targets.append(MeshTarget(item, "http://localhost/derp", path))
        elif item.startswith(("http://", "https://")):
            parts = urlsplit(item)
            if not parts.hostname:
                raise MeshError(f"--mesh-with {item!r}: no host")
            targets.append(MeshTarget(item, item if parts.path else item + "/derp"))
        else:
            host, _, dial_host = item.partition("/")
            if not host or (any(c in host for c in " :@") and not _is_ip(host)):
                raise MeshError(f"--mesh-with {item!r}: expected host, host/dialhost or a URL")
            shown = f"[{host}]" if ":" in host else host
            if tls:
                url = f"https://{shown}/derp"
                port = 443
            else:
                url = f"http://{shown}:{default_port}/derp"
                port = default_port
            targets.append(MeshTarget(item, url, (dial_host, port) if dial_host else None))
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        raise MeshError("--mesh-with lists a peer twice")
    return targets


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class MeshLink(ClientConn):
    """The outbound connection to one peer: ForwardPackets out, PeerPresent/PeerGone in.

    It reuses ClientConn's queue, direct-write and writer-task machinery for the outgoing
    side; only what it reads differs (a server's frames, not a client's).
    """

    SENDS_KEEPALIVES = False
    __slots__ = ("name", "parsed")

    def __init__(
        self,
        server: RelayServer,
        transport: Transport,
        peer_key: bytes,
        conn_id: int,
        name: str,
        *,
        internal: bool = False,
    ) -> None:
        super().__init__(
            server, transport, peer_key, ClientInfo(), conn_id, can_mesh=True, not_ideal=False, internal=internal
        )
        self.name = name
        self.parsed: list[tuple[int, bytes]] = []  # frames the handshake already read

    def forward(self, frame: bytes, disco: bool, touched: list[ClientConn]) -> None:
        """Queue one ForwardPacket (the relay calls this while routing a read)."""
        q = self.q_other
        if len(q) >= LINK_QUEUE_DEPTH:
            if not self.writing:
                self.kick()
            if len(q) >= LINK_QUEUE_DEPTH:
                self.server.stats.drop("queue_head", False, len(q.popleft()))
        q.append(frame)
        _touch(self, touched)

    def _batch_done(self, nbytes: int) -> None:
        self.flight = (0, 0, 0, 0)  # forwarded packets were counted when routed
        self.bytes_out += nbytes

    async def _read_loop(self, reader: FrameReader) -> None:
        relay = self.server
        own = relay.public_key
        receive = self.transport.receive_some
        frames = self.parsed
        self.parsed = []
        while True:
            frames += reader.read_frames()
            for ftype, payload in frames:
                if ftype == FrameType.PEER_PRESENT:
                    key = parse_peer_present(payload).key
                    if key != own:  # our own link, as the peer sees it
                        relay.add_forwarder(key, self, payload)
                elif ftype == FrameType.PEER_GONE:
                    key, _reason = parse_peer_gone(payload)
                    relay.remove_forwarder(key, self)
                elif ftype == FrameType.PING:
                    if self.pong is None:
                        self.pong = pong_frame(parse_ping(payload))
                        self.kick()
                elif ftype == FrameType.RESTARTING:
                    log.info("mesh_peer_restarting", peer=self.name)
                elif ftype == FrameType.HEALTH and payload:
                    log.warning("mesh_peer_health", peer=self.name, problem=payload.decode("utf-8", "replace"))
            frames = []
            data = await receive()
            if not data:
                raise ConnectionClosed("mesh peer closed the connection")
            self.bytes_in += len(data)
            reader.feed(data)


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
    timeout: float = 10.0,
) -> tuple[MeshLink, FrameReader]:
    """Dial, log in with the mesh key, WatchConns, and turn the connection into a MeshLink.
    ``internal``: the peer is a sibling worker, which shares our server key."""
    client = await DerpClient.connect(
        target.url,
        client_key,
        mesh_key=mesh_key,
        can_ack_pings=True,
        ssl_context=ssl_context,
        dial=target.dial,
        fast_start=False,
        timeout=timeout,
    )
    try:
        if client.server_key == relay.public_key and not internal:
            raise SelfPeer
        await client.watch_conns()
    except BaseException:
        await client.aclose()
        raise
    stream, frames, leftover = client.detach()
    transport: Transport
    if isinstance(stream, trio.SocketStream):
        remote = _peer_of(stream)
        transport = SocketTransport.from_trio(stream.socket)
        transport.remote = remote
    else:
        transport = StreamTransport(stream, None)
    reader = FrameReader(max_frame_len=NONCE_LEN + MAX_FRAME_LEN)
    reader.feed(leftover)
    link = MeshLink(relay, transport, client.server_key, -1, target.label, internal=internal)
    link.parsed = frames
    return link, reader


def _peer_of(stream: trio.SocketStream) -> tuple[str, int] | None:
    try:
        peer = stream.socket.getpeername()
    except OSError:
        return None
    return (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) else None


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
            link, reader = await connect_link(
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
            log.info(
                "mesh_connected", peer=target.label, key=short_key(link.key), remote=link.remote and link.remote[0]
            )
            try:
                await link.run(reader)
            finally:
                relay.remove_link(link)  # derper's MeshConnBroke: routes come back with the next flood
                relay.mesh_links[target.label] = None
                with trio.CancelScope(shield=True):
                    await link.transport.aclose()
                log.info("mesh_disconnected", peer=target.label, reason=link.close_reason or "server shutdown")
        await trio.sleep(backoff)
        backoff = min(backoff * 2, BACKOFF_MAX)
