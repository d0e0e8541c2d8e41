"""DERP over WebSocket: binary messages carrying the DERP byte stream (wsproto inside).

Frames need not align with messages in either direction; each write is one message.
The same class serves both ends: the server wraps an accepted connection after the
HTTP upgrade, and ``derpd.net.client`` wraps its dialled stream.
"""

from __future__ import annotations

from collections.abc import Sequence

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from derpd.net.transport import Transport

SUBPROTOCOL = "derp"
POLICY_VIOLATION = 1008  # RFC 6455: "client must speak the derp subprotocol"
UNSUPPORTED_DATA = 1003


class WebSocketError(Exception):
    """The WebSocket handshake or framing failed; the message says why."""


def wants_derp(protocols_header: bytes) -> bool:
    """derper routes to WebSocket when the header merely contains "derp" (strings.Contains)."""
    return b"derp" in protocols_header.lower()


class WebSocketTransport:
    """A byte stream over WebSocket binary messages, usable as a relay ``Transport``."""

    def __init__(self, inner: Transport, ws: WSConnection, initial: bytes = b"") -> None:
        self.inner = inner
        self.ws = ws
        self.remote = inner.remote
        self._pending = initial
        self._closed = False
        self._send_lock = trio.Lock()

    @classmethod
    async def accept(
        cls, inner: Transport, target: bytes, headers: Sequence[tuple[bytes, bytes]], initial: bytes
    ) -> WebSocketTransport | None:
        """Finish the server side of an upgrade whose request h11 has already parsed.

        Raises WebSocketError, with nothing sent, for a malformed upgrade request. If the
        client did not offer exactly ``derp``, the handshake completes, the connection is
        closed with 1008 as derper does, and None is returned."""
        ws = WSConnection(ConnectionType.SERVER)
        try:
            ws.initiate_upgrade_connection(list(headers), target)
        except RemoteProtocolError as e:
            raise WebSocketError(f"bad WebSocket upgrade: {e}") from None
        request = next(iter(ws.events()), None)
        if not isinstance(request, Request):
            raise WebSocketError("bad WebSocket upgrade request")
        chosen = SUBPROTOCOL if SUBPROTOCOL in request.subprotocols else None
        await inner.send_all(ws.send(AcceptConnection(subprotocol=chosen)))
        transport = cls(inner, ws, initial)
        if chosen is None:
            await transport.close(POLICY_VIOLATION, "client must speak the derp subprotocol")
            return None
        return transport

    @classmethod
    async def connect(cls, inner: Transport, host: str, target: str) -> WebSocketTransport:
        """Client side: the RFC 6455 handshake with subprotocol ``derp``."""
        ws = WSConnection(ConnectionType.CLIENT)
        await inner.send_all(ws.send(Request(host=host, target=target, subprotocols=[SUBPROTOCOL])))
        while True:
            data = await inner.receive_some()
            ws.receive_data(data or None)
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    if event.subprotocol != SUBPROTOCOL:
                        raise WebSocketError(f"server chose subprotocol {event.subprotocol!r}, not derp")
                    return cls(inner, ws)
                if isinstance(event, RejectConnection):
                    raise WebSocketError(f"WebSocket upgrade refused: HTTP {event.status_code}")
            if not data:
                raise WebSocketError("connection closed during the WebSocket handshake")

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """The next bytes of the DERP stream; b"" once the WebSocket or the socket closes.
        (``max_bytes`` is accepted for trio-stream callers; a whole message is returned.)"""
        ws = self.ws
        while True:
            if self._pending:
                data, self._pending = self._pending, b""
            else:
                if self._closed:
                    return b""
                data = await self.inner.receive_some()
            try:
                ws.receive_data(data or None)
                out = bytearray()
                for event in ws.events():
                    if isinstance(event, BytesMessage):
                        out += event.data
                    elif isinstance(event, Ping):
                        await self._send_raw(ws.send(event.response()))
                    elif isinstance(event, CloseConnection):
                        if ws.state not in (ConnectionState.CLOSED, ConnectionState.LOCAL_CLOSING):
                            await self._send_raw(ws.send(event.response()))
                        self._closed = True
                    elif isinstance(event, TextMessage):
                        await self.close(UNSUPPORTED_DATA, "DERP is binary")
                        return b""
            except (RemoteProtocolError, LocalProtocolError):
                self._closed = True
                return b""
            if out:
                return bytes(out)
            if self._closed or not data:
                self._closed = True
                return b""

    def try_send(self, data: bytes | bytearray | memoryview) -> int:
        return 0  # every write is a WebSocket message built by the writer task

    has_backlog = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise trio.ClosedResourceError("WebSocket closed")
        await self._send_raw(self.ws.send(BytesMessage(data=bytes(data))))

    async def _send_raw(self, data: bytes) -> None:
        async with self._send_lock:
            await self.inner.send_all(data)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if not self._closed:
            self._closed = True
            try:
                await self._send_raw(self.ws.send(CloseConnection(code=code, reason=reason)))
            except (LocalProtocolError, OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def aclose(self) -> None:
        with trio.move_on_after(1):
            await self.close()
        await self.inner.aclose()


__all__ = ["WebSocketError", "WebSocketTransport", "wants_derp"]
