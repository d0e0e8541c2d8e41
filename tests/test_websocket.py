"""DERP over WebSocket (subprotocol ``derp``): wsproto clients against derpd on loopback."""

from __future__ import annotations

import dataclasses
import os

import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Request, TextMessage

from derpd.net.client import DerpClient
from derpd.net.websocket import WebSocketError
from derpd.proto.frames import MAX_PACKET_SIZE, ClientInfo, FrameReader, FrameType, client_info_frame, send_packet_frame
from derpd.proto.keys import NodePrivate
from derpd.server.node import DerpServer

from .conftest import Clients


@pytest.mark.parametrize("size", [100, 1200, MAX_PACKET_SIZE])
async def test_websocket_client_relays_with_a_plain_client(clients: Clients, server: DerpServer, size: int) -> None:
    ws = await clients.connect(websocket=True)
    plain = await clients.connect()
    assert ws.server_key == server.key.public
    for src, dst in ((ws, plain), (plain, ws)):
        data = os.urandom(size)
        await src.send(dst.public_key, data)
        with trio.fail_after(5):
            got = await dst.recv_packet()
        assert (got.src, got.data) == (src.public_key, data)
    await ws.ping()
    assert server.http.websocket_accepts == 1
    assert server.relay.stats.current_connections == 2


class RawWebSocket:
    """A hand-driven wsproto client, for what DerpClient would never send."""

    def __init__(self, sock: trio.SocketStream, ws: WSConnection) -> None:
        self.sock = sock
        self.ws = ws

    @classmethod
    async def open(cls, port: int, subprotocols: list[str]) -> tuple[RawWebSocket, AcceptConnection]:
        sock = await trio.open_tcp_stream("127.0.0.1", port)
        ws = WSConnection(ConnectionType.CLIENT)
        await sock.send_all(ws.send(Request(host="x", target="/derp", subprotocols=subprotocols)))
        with trio.fail_after(5):
            while True:
                ws.receive_data(await sock.receive_some(65536))
                for event in ws.events():
                    assert isinstance(event, AcceptConnection), event
                    return cls(sock, ws), event

    async def send(self, message: BytesMessage | TextMessage) -> None:
        await self.sock.send_all(self.ws.send(message))

    async def events_until_close(self) -> tuple[bytes, CloseConnection | None]:
        data = b""
        with trio.fail_after(5):
            while True:
                chunk = await self.sock.receive_some(65536)
                self.ws.receive_data(chunk or None)
                for event in self.ws.events():
                    if isinstance(event, BytesMessage):
                        data += event.data
                    elif isinstance(event, CloseConnection):
                        return data, event
                if not chunk:
                    return data, None


async def test_frames_split_across_messages_any_way(server: DerpServer, clients: Clients) -> None:
    """WebSocket messages are a byte stream: ClientInfo one byte per message, packets glued together."""
    dst = await clients.connect()
    raw, accepted = await RawWebSocket.open(server.port, ["derp"])
    assert accepted.subprotocol == "derp"
    key = NodePrivate.generate()
    login = client_info_frame(key, server.key.public, ClientInfo(version=2))
    for i in range(len(login)):
        await raw.send(BytesMessage(data=login[i : i + 1]))
    stream = send_packet_frame(dst.public_key, b"one") + send_packet_frame(dst.public_key, b"two")
    await raw.send(BytesMessage(data=stream[:7]))
    await raw.send(BytesMessage(data=stream[7:]))
    with trio.fail_after(5):
        got = [(await dst.recv_packet()).data for _ in range(2)]
    assert got == [b"one", b"two"]
    await raw.sock.aclose()


async def test_wrong_subprotocol_is_closed_with_1008(server: DerpServer) -> None:
    # "derpx" contains "derp", so derper (and derpd) route it to WebSocket, then refuse it.
    raw, accepted = await RawWebSocket.open(server.port, ["derpx"])
    assert accepted.subprotocol is None
    _, close = await raw.events_until_close()
    assert close is not None and close.code == 1008
    assert close.reason == "client must speak the derp subprotocol"
    assert server.relay.stats.accepts == 0
    await raw.sock.aclose()


async def test_text_message_closes_only_that_connection(server: DerpServer, clients: Clients) -> None:
    bystander = await clients.connect(websocket=True)
    raw, _ = await RawWebSocket.open(server.port, ["derp"])
    await raw.send(TextMessage(data="hello"))
    data, close = await raw.events_until_close()
    reader = FrameReader()
    reader.feed(data)
    assert [t for t, _ in reader.read_frames()] == [FrameType.SERVER_KEY]
    assert close is None or close.code == 1003
    await bystander.ping()
    await raw.sock.aclose()


async def test_malformed_websocket_upgrade_gets_400(server: DerpServer) -> None:
    sock = await trio.open_tcp_stream("127.0.0.1", server.port)
    await sock.send_all(
        b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Protocol: derp\r\n\r\n"  # no Sec-WebSocket-Key or version
    )
    data = b""
    with trio.fail_after(5):
        while chunk := await sock.receive_some(4096):
            data += chunk
    assert data.startswith(b"HTTP/1.1 400 ")
    await sock.aclose()


async def test_websocket_client_reports_refusal(server: DerpServer) -> None:
    server.http.config = dataclasses.replace(server.http.config, derp_enabled=False)
    with pytest.raises(WebSocketError, match="HTTP 404"):
        await DerpClient.connect(f"http://127.0.0.1:{server.port}/derp", websocket=True)
