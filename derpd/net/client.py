"""A trio DERP client: dial, upgrade, log in, then send frames and receive events.

It speaks what Tailscale's ``derphttp`` client speaks: ``GET /derp`` with ``Upgrade: DERP`` over
plain HTTP or TLS (fast start when the server key is known from derper's meta certificate, no
101 then), or DERP inside WebSocket. The protocol itself, login and decoding, is the client role
of ``derpd.proto.connection``; this module moves its bytes. Used by the mesh links, ``derpd
probe``, the tests and the bench.
"""

from __future__ import annotations

import contextlib
import os
import ssl
from collections import deque
from collections.abc import AsyncIterator, Iterable
from urllib.parse import urlsplit

import h11
import trio

from derpd.net.httpclient import HttpClientConnection, NoResponse, start_tls
from derpd.net.tls import PIN_PREFIX, fast_start_key, pinned_context
from derpd.net.transport import RECV_SIZE, StreamTransport
from derpd.proto.connection import (
    NEED_DATA,
    ClientHello,
    DerpConnection,
    Health,
    KeepAlive,
    PeerGone,
    Ping,
    Pong,
    ReceivedPacket,
    Restarting,
    Role,
    ServerEvent,
    ServerHello,
    Unknown,
    decode_server_frame,
)
from derpd.proto.frames import (
    PING_DATA_LEN,
    PROTOCOL_VERSION,
    WATCH_CONNS_FRAME,
    ClientInfo,
    PeerPresent,
    ProtocolError,
    ServerInfo,
    close_peer_frame,
    forward_packet_frame,
    note_preferred_frame,
    ping_frame,
    pong_frame,
    send_packet_frame,
)
from derpd.proto.keys import KEY_LEN, NodeKey, NodePrivate

MAX_ERROR_BODY = 64 * 1024  # of a refused upgrade's answer, kept for DerpHTTPError
CONNECT_TIMEOUT = 10.0  # seconds derphttp gives a whole connect; callers put it in their cancel scope


class DerpHTTPError(Exception):
    """The server answered the upgrade request with something other than 101."""

    def __init__(self, status: int, body: bytes) -> None:
        self.status = status
        self.body = body
        super().__init__(f"DERP upgrade failed: HTTP {status}: {body[:200]!r}")


class ConnectionLost(Exception):
    """The server closed the connection."""


# What recv() yields: derpd.proto.connection's events, under the names this module gave them first.
Message = ServerEvent
PeerGoneMessage = PeerGone
PeerPresentMessage = PeerPresent
KeepAliveMessage = KeepAlive
PingMessage = Ping
PongMessage = Pong
HealthMessage = Health
RestartingMessage = Restarting
UnknownFrame = Unknown
decode_message = decode_server_frame


async def _tls_connect(
    stream: trio.abc.Stream, host: str, cert_name: str | None, ssl_context: ssl.SSLContext | None
) -> trio.SSLStream[trio.abc.Stream]:
    """TLS with ALPN http/1.1, verifying the CertName pin or name when the DERP map gives one."""
    if ssl_context is not None:
        ctx = ssl_context
    elif cert_name and cert_name.startswith(PIN_PREFIX):
        ctx = pinned_context(cert_name)
    else:
        ctx = ssl.create_default_context()
    ctx.set_alpn_protocols(["http/1.1"])
    server_name = cert_name if cert_name and not cert_name.startswith(PIN_PREFIX) else host
    return await start_tls(stream, ctx, server_name)  # raises the ssl.SSLError that says why


def _split_url(url: str) -> tuple[str, str, int, str]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"DERP URL must be http:// or https://host[:port]/derp, got {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, parts.hostname, port, parts.path or "/derp"


class DerpClient:
    """One DERP connection. Create with ``await DerpClient.connect(url)``."""

    def __init__(self, stream: trio.abc.Stream, derp: DerpConnection, can_ack_pings: bool) -> None:
        self.stream = stream
        self.derp = derp  # the protocol state (client role)
        self.key = derp.key
        self.public_key = derp.key.public
        self.can_ack_pings = can_ack_pings
        self.server_key = NodeKey(b"")
        self.server_info = ServerInfo()
        self.http_response: h11.Response | h11.InformationalResponse | None = None  # the 101
        self.fast_start = derp.fast_start  # whether the login skipped the 101 (derper's meta certificate)
        self._pending: deque[Message] = deque()  # read by ping() while waiting for its pong
        self._pings: dict[bytes, trio.Event] = {}
        self._receiving = False
        self._send_lock = trio.Lock()
        self._closed = False

    # --- connecting -------------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        url: str,
        key: NodePrivate | None = None,
        *,
        mesh_key: bytes | None = None,
        can_ack_pings: bool = True,
        is_prober: bool = False,
        app_name: str = "",
        server_key: bytes | None = None,
        fast_start: bool | None = None,
        cert_name: str | None = None,
        headers: Iterable[tuple[str, str]] = (),
        ssl_context: ssl.SSLContext | None = None,
        websocket: bool = False,
        dial: tuple[str, int] | str | None = None,
        local_address: str | None = None,
    ) -> DerpClient:
        """Dial, upgrade and log in, as Tailscale's derphttp client does.

        It has no deadline of its own: the caller's cancel scope bounds it (derphttp uses 10 s,
        ``CONNECT_TIMEOUT``).
        ``fast_start``: None (the default) takes the fast path when a TLS 1.3 server sends
        derper's meta certificate; True forces it (needs ``server_key`` or the meta cert);
        False never. ``cert_name`` is a DERP node's CertName: a ``sha256-raw:<hex>`` pin of a
        self-signed certificate, or the name to verify instead of the URL's host.
        ``websocket`` speaks DERP inside WebSocket binary messages (subprotocol ``derp``).
        ``dial`` connects somewhere else than the URL's host (a (host, port), or a unix socket
        path) while TLS and HTTP still use the URL's name, as derper's ``host/dialhost``.
        ``local_address`` is the source IP to connect from (e.g. another loopback address)."""
        scheme, host, port, path = _split_url(url)
        key = key or NodePrivate.generate()
        stream: trio.abc.Stream
        if isinstance(dial, str):
            stream = await trio.open_unix_socket(dial)
        else:
            stream = await trio.open_tcp_stream(*(dial or (host, port)), local_address=local_address)
        try:
            if scheme == "https":
                tls = await _tls_connect(stream, host, cert_name, ssl_context)
                stream = tls
                if fast_start is not False and not websocket:
                    meta_key = fast_start_key(tls)
                    if meta_key is not None:
                        server_key = server_key or meta_key
                        fast_start = True
            if fast_start and server_key is None:
                raise ValueError("fast start needs the server's public key (or its meta certificate)")
            if websocket:
                from derpd.net.websocket import WebSocketTransport  # noqa: PLC0415 (weight: wsproto)

                stream = await WebSocketTransport.connect(StreamTransport(stream, None), host, path)  # type: ignore[assignment]
            info = ClientInfo(
                version=PROTOCOL_VERSION,
                mesh_key=mesh_key,
                can_ack_pings=can_ack_pings,
                is_prober=is_prober,
                app_name=app_name,
            )
            fast = bool(fast_start) and not websocket
            derp = DerpConnection(Role.CLIENT, key, client_info=info, server_key=server_key if fast else None)
            client = cls(stream, derp, can_ack_pings)
            if not websocket:
                await client._upgrade(host, port, path, headers)
            await client._login()
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return client

    async def _upgrade(self, host: str, port: int, path: str, headers: Iterable[tuple[str, str]]) -> None:
        shown = f"[{host}]" if ":" in host else host  # an IPv6 literal is bracketed in Host (RFC 9110 §7.2)
        hdrs = [("Host", shown if port in (80, 443) else f"{shown}:{port}")]
        hdrs += [("User-Agent", "derpd-client"), ("Connection", "Upgrade"), ("Upgrade", "DERP")]
        if self.fast_start:
            hdrs.append(("Derp-Fast-Start", "1"))
        hdrs += list(headers)
        http = HttpClientConnection(self.stream)  # not entered: the stream goes on as DERP
        if self.fast_start:
            # The whole login in one flight, no 101; the ServerKey frame arrives anyway and is checked.
            await http.send_request("GET", path, hdrs, then=self.derp.data_to_send())
            return
        await http.send_request("GET", path, hdrs)
        try:
            response = await http.read_response()
        except (h11.RemoteProtocolError, NoResponse) as e:
            raise ConnectionLost(f"bad or missing HTTP response to the upgrade: {e}") from None
        if response.status_code == 101:
            self.http_response = response
            if rest := http.trailing_data:
                self.derp.receive_data(rest)
            return
        body = bytearray()
        with contextlib.suppress(h11.RemoteProtocolError, NoResponse, trio.BrokenResourceError):
            await http.receive_body(body, MAX_ERROR_BODY)  # what arrived stays in body
        raise DerpHTTPError(response.status_code, bytes(body))

    async def _login(self) -> None:
        """ServerKey, ClientInfo (already sent on the fast path), ServerInfo."""
        derp = self.derp
        while (event := derp.next_event()) is NEED_DATA:
            out = derp.data_to_send()
            if out:
                await self.stream.send_all(out)
            await self._receive()
        assert isinstance(event, ServerHello)  # the only event a client's login ends with
        self.server_key = event.key
        self.server_info = event.info

    # --- frames ------------------------------------------------------------------------

    async def _receive(self) -> None:
        """Wait for bytes from the server and hand them to the protocol state."""
        try:
            data = await self.stream.receive_some(RECV_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            raise ConnectionLost(str(e)) from None
        if not data:
            raise ConnectionLost("server closed the connection")
        self.derp.receive_data(data)

    async def _send(self, data: bytes) -> None:
        async with self._send_lock:
            await self.stream.send_all(data)

    async def send(self, dst: bytes, packet: bytes) -> None:
        await self._send(send_packet_frame(dst, packet))

    async def send_many(self, packets: Iterable[tuple[bytes, bytes]]) -> None:
        """Many SendPacket frames in one write."""
        await self._send(b"".join(send_packet_frame(dst, pkt) for dst, pkt in packets))

    async def send_raw(self, data: bytes) -> None:
        """Arbitrary bytes (tests use this to send malformed frames)."""
        await self._send(data)

    async def forward_packet(self, src: bytes, dst: bytes, packet: bytes) -> None:
        await self._send(forward_packet_frame(src, dst, packet))

    async def note_preferred(self, preferred: bool) -> None:
        await self._send(note_preferred_frame(preferred))

    async def watch_conns(self) -> None:
        await self._send(WATCH_CONNS_FRAME)

    async def close_peer(self, peer: bytes) -> None:
        await self._send(close_peer_frame(peer))

    async def send_pong(self, data: bytes) -> None:
        await self._send(pong_frame(data))

    async def recv(self) -> Message:
        """The next message from the server. Pings are answered when ``can_ack_pings``."""
        if self._pending:
            return self._pending.popleft()
        while True:
            msg = await self._recv_one()
            if msg is not None:
                return msg

    async def _recv_one(self) -> Message | None:
        self._receiving = True
        try:
            while (event := self.derp.next_event()) is NEED_DATA:
                await self._receive()
        finally:
            self._receiving = False
        assert not isinstance(event, ClientHello | ServerHello)  # the login's, over by now
        if isinstance(event, Pong):
            waiter = self._pings.pop(event.data, None)
            if waiter is not None:
                waiter.set()
                return None
        elif isinstance(event, Ping) and self.can_ack_pings:
            await self.send_pong(event.data)
        return event

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Message]:
        while True:
            try:
                yield await self.recv()
            except ConnectionLost:
                return

    async def recv_packet(self) -> ReceivedPacket:
        """The next data packet, skipping keep-alives and other control messages."""
        while True:
            msg = await self.recv()
            if isinstance(msg, ReceivedPacket):
                return msg

    async def ping(self, data: bytes | None = None) -> bytes:
        """Send a Ping and wait for its Pong; other messages stay queued for recv()."""
        data = data or os.urandom(PING_DATA_LEN)
        event = trio.Event()
        self._pings[data] = event
        await self._send(ping_frame(data))
        while not event.is_set():
            if self._receiving:  # another task is reading; it will set the event
                await event.wait()
                break
            msg = await self._recv_one()
            if msg is not None:
                self._pending.append(msg)
        return data

    def detach(self) -> tuple[trio.abc.Stream, DerpConnection]:
        """Give up the connection to another reader: the stream, and the protocol state with
        whatever it has received and not yet decoded (the mesh takes links over this way)."""
        if self._pending:
            raise RuntimeError("cannot detach a client holding decoded messages")
        self._closed = True
        return self.stream, self.derp

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await trio.aclose_forcefully(self.stream)

    async def __aenter__(self) -> DerpClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


__all__ = [
    "KEY_LEN",
    "ConnectionLost",
    "DerpClient",
    "DerpHTTPError",
    "HealthMessage",
    "KeepAliveMessage",
    "Message",
    "PeerGoneMessage",
    "PeerPresentMessage",
    "PingMessage",
    "PongMessage",
    "ProtocolError",
    "ReceivedPacket",
    "RestartingMessage",
    "UnknownFrame",
    "decode_message",
]
