"""Attack 3: hostile WebSocket frames on ``/derp`` (subprotocol ``derp``), before and after login.

Unmasked client frames, text frames, 2^63-byte lengths, fragmented and oversized control frames,
reserved opcodes and bits, close frames with codes no one may send, and random garbage. Each ends
that connection promptly (or, when the bytes merely stop short, at our FIN) and nothing else.
"""

from __future__ import annotations

import os
import random
import struct

import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, Request

from derpd.proto.frames import FrameReader, FrameType, send_packet_frame
from derpd.proto.keys import NodePrivate

from .conftest import Derpd, assert_healthy, open_tcp, read_to_eof, run_bounded, send_quietly, valid_client_info

pytestmark = pytest.mark.hostile

PROMPT = 3.0
BINARY, TEXT, CONT, CLOSE, PING, PONG = 0x2, 0x1, 0x0, 0x8, 0x9, 0xA


def ws_frame(
    opcode: int, payload: bytes = b"", *, fin: bool = True, mask: bool = True, rsv: int = 0, length: int | None = None
) -> bytes:
    """One raw WebSocket frame, valid or not (wsproto would refuse to write the invalid ones)."""
    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    bit = 0x80 if mask else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 1 << 16:
        head += bytes([bit | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([bit | 127]) + n.to_bytes(8, "big")
    if mask:
        key = os.urandom(4)
        head += key
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return head + payload


def close_frame(code: int | None, reason: bytes = b"") -> bytes:
    return ws_frame(CLOSE, (b"" if code is None else struct.pack(">H", code)) + reason)


class WsConn:
    """A raw WebSocket connection past the upgrade; the DERP stream inside is ours to drive."""

    def __init__(self, stream: trio.SocketStream, ws: WSConnection) -> None:
        self.stream = stream
        self.ws = ws
        self.derp = b""  # DERP bytes received so far

    @classmethod
    async def open(cls, server: Derpd) -> WsConn:
        stream = await open_tcp(server)
        ws = WSConnection(ConnectionType.CLIENT)
        await stream.send_all(ws.send(Request(host="127.0.0.1", target="/derp", subprotocols=["derp"])))
        with trio.fail_after(5):
            while True:
                data = await stream.receive_some(65536)
                assert data, "closed during the WebSocket upgrade"
                ws.receive_data(data)
                for event in ws.events():
                    assert isinstance(event, AcceptConnection) and event.subprotocol == "derp", event
                    return cls(stream, ws)

    async def read_derp(self, n: int) -> bytes:
        with trio.fail_after(5):
            while True:
                for event in self.ws.events():  # including what came with the 101
                    if isinstance(event, BytesMessage):
                        self.derp += event.data
                if len(self.derp) >= n:
                    return self.derp
                data = await self.stream.receive_some(65536)
                assert data, "server closed"
                self.ws.receive_data(data)

    async def login(self, server: Derpd) -> NodePrivate:
        await self.read_derp(45)  # ServerKey
        key = NodePrivate.generate()
        await self.stream.send_all(self.ws.send(BytesMessage(data=valid_client_info(key, server.public_key))))
        await self.read_derp(45 + 5)
        reader = FrameReader(max_frame_len=1 << 20)
        reader.feed(self.derp)
        with trio.fail_after(5):
            while [t for t, _ in reader.read_frames()][-1:] != [FrameType.SERVER_INFO]:
                n = len(self.derp)
                await self.read_derp(n + 1)
                reader.feed(self.derp[n:])
        return key


def hostile_frames(rng: random.Random) -> list[tuple[str, bytes, bool]]:
    """(name, bytes, complete): ``complete`` is False for bytes that only stop short of a frame,
    which the server may rightly wait for until our FIN."""
    derp = send_packet_frame(os.urandom(32), b"x")
    cases: list[tuple[str, bytes, bool]] = [
        ("unmasked_binary", ws_frame(BINARY, derp, mask=False), True),
        ("unmasked_close", ws_frame(CLOSE, b"\x03\xe8", mask=False), True),
        ("text", ws_frame(TEXT, b"hello"), True),
        ("text_invalid_utf8", ws_frame(TEXT, b"\xff\xfe"), True),
        ("length_2^63", ws_frame(BINARY, length=1 << 63), True),
        ("length_2^64-1", ws_frame(BINARY, length=(1 << 64) - 1), True),
        ("length_2^63-1", ws_frame(BINARY, length=(1 << 63) - 1), False),
        ("length_2^40", ws_frame(BINARY, length=1 << 40), False),
        ("length_126_form_for_small", bytes([0x82, 0x80 | 126, 0, 5]) + os.urandom(4) + b"abcde", True),
        ("fragmented_ping", ws_frame(PING, b"p", fin=False), True),
        ("fragmented_close", ws_frame(CLOSE, b"\x03\xe8", fin=False), True),
        ("ping_over_125", ws_frame(PING, b"p" * 126), True),
        ("close_over_125", ws_frame(CLOSE, b"\x03\xe8" + b"r" * 124), True),
        ("continuation_without_start", ws_frame(CONT, b"orphan"), True),
        ("binary_inside_fragmented_binary", ws_frame(BINARY, b"a", fin=False) + ws_frame(BINARY, b"b"), True),
        ("text_continuing_binary", ws_frame(BINARY, b"a", fin=False) + ws_frame(TEXT, b"b"), True),
        ("close_1_byte", ws_frame(CLOSE, b"\x03"), True),
        ("close_bad_utf8_reason", close_frame(1000, b"\xc3\x28"), True),
        ("ping_flood", ws_frame(PING, b"ping") * 2000, False),
        ("pong_unsolicited", ws_frame(PONG, b"pong") * 10, False),
        ("empty_binary_messages", ws_frame(BINARY) * 1000, False),
    ]
    for opcode in (0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF):
        cases.append((f"opcode_{opcode:x}", ws_frame(opcode, b"x"), True))
    for rsv in (1, 2, 4, 7):
        cases.append((f"rsv_{rsv}", ws_frame(BINARY, derp, rsv=rsv), True))
    for code in (0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535):
        cases.append((f"close_code_{code}", close_frame(code, b"\x1b[31mreason"), True))
    for code in (None, 1000, 1001, 4000):  # legal closes: the server answers and closes
        cases.append((f"close_ok_{code}", close_frame(code), True))
    for i in range(40):
        cases.append((f"garbage_{i}", rng.randbytes(rng.choice([1, 2, 14, 100, 2000])), False))
    return cases


async def _attack(server: Derpd, name: str, data: bytes, complete: bool, after_login: bool) -> None:
    ws = await WsConn.open(server)
    try:
        if after_login:
            await ws.login(server)
        if await send_quietly(ws.stream, data) and not complete:
            try:
                await ws.stream.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        _, closed = await read_to_eof(ws.stream, PROMPT)
        assert closed, f"{name}: connection still open {PROMPT}s after the hostile frame"
    finally:
        await trio.aclose_forcefully(ws.stream)


@pytest.mark.parametrize("after_login", [False, True], ids=["before_login", "after_login"])
async def test_hostile_websocket_frames(server: Derpd, after_login: bool) -> None:
    cases = hostile_frames(random.Random(0x3E5))
    jobs = [lambda c=c: _attack(server, *c, after_login) for c in cases]
    await run_bounded(jobs, 25)
    await assert_healthy(server)


async def test_websocket_client_still_relays_after_pings_between_fragments(server: Derpd) -> None:
    """Control frames may come between the fragments of a message (RFC 6455 §5.4): the DERP bytes
    split across fragments with pings in between still arrive as one stream."""
    dst = await server.connect()
    try:
        ws = await WsConn.open(server)
        try:
            await ws.login(server)
            frame = send_packet_frame(dst.public_key, b"fragmented")
            await ws.stream.send_all(
                ws_frame(BINARY, frame[:3], fin=False)
                + ws_frame(PING, b"1")
                + ws_frame(CONT, frame[3:10], fin=False)
                + ws_frame(PING, b"2")
                + ws_frame(CONT, frame[10:])
            )
            with trio.fail_after(5):
                assert (await dst.recv_packet()).data == b"fragmented"
        finally:
            await trio.aclose_forcefully(ws.stream)
    finally:
        await dst.aclose()
    await assert_healthy(server)
