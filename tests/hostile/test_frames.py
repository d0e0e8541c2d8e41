"""Attack 1: mutated, lying and truncated DERP frames, before and after login (> 1000 connections).

Before login every fault must end the connection at once (or, when the bytes merely stop short,
as soon as the client goes away) with one info line. After login the server either keeps framing
(a Ping sent after the hostile bytes is answered) or closes the connection; it never stalls,
leaks, logs an error or a traceback. Unknown frame types of any length up to 4 MiB are skipped
and the connection keeps relaying.
"""

from __future__ import annotations

import os
import random
import socket
from collections import Counter

import pytest
import trio

from derpd.net.client import DerpClient
from derpd.proto.frames import (
    DISCO_MAGIC,
    MAX_CLIENT_INFO_LEN,
    MAX_PACKET_SIZE,
    FrameReader,
    FrameType,
    close_peer_frame,
    encode_frame,
    forward_packet_frame,
    note_preferred_frame,
    pack_header,
    ping_frame,
    pong_frame,
    send_packet_frame,
)
from derpd.proto.keys import KEY_LEN, NodePrivate

from .conftest import (
    Derpd,
    abort_on_close,
    assert_healthy,
    read_to_eof,
    run_bounded,
    send_quietly,
    upgrade_to_client_info,
    valid_client_info,
)

pytestmark = pytest.mark.hostile

CONNECTIONS = Counter[str]()  # per test; the module opens well over 1000 in all
CONCURRENCY = 50


# --- before login -------------------------------------------------------------------------------


async def _pre_login(server: Derpd, hostile: bytes, *, half_close: bool, expect_closed_in: float = 3.0) -> str:
    """Send ``hostile`` where ClientInfo belongs; the server must close the connection (at once,
    or right after our FIN when the bytes only stop short)."""
    CONNECTIONS["pre_login"] += 1
    stream, _rest = await upgrade_to_client_info(server)
    try:
        sent = await send_quietly(stream, hostile)
        if half_close and sent:
            try:
                await stream.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        data, closed = await read_to_eof(stream, expect_closed_in)
        assert closed, f"server kept the connection open {expect_closed_in}s after {hostile[:40]!r}…"
        assert data == b"", f"server answered {data[:100]!r} to {hostile[:40]!r}…"
        return "closed"
    finally:
        await trio.aclose_forcefully(stream)


def _pre_login_cases(server: Derpd, rng: random.Random) -> list[tuple[bytes, bool]]:
    """(bytes, half_close): half_close for those that are only incomplete, not wrong."""
    key = NodePrivate.generate()
    good = valid_client_info(key, server.public_key)
    cases: list[tuple[bytes, bool]] = [
        (pack_header(FrameType.CLIENT_INFO, 0xFFFFFFFF), False),  # lying length, far over the cap
        (pack_header(FrameType.CLIENT_INFO, MAX_CLIENT_INFO_LEN + 1), False),
        (pack_header(FrameType.CLIENT_INFO, 300 * 1024) + os.urandom(300 * 1024), False),  # 300 KiB ClientInfo
        (pack_header(FrameType.CLIENT_INFO, 1000) + os.urandom(10), True),  # length bigger than what follows
        (encode_frame(FrameType.CLIENT_INFO, b""), False),
        (encode_frame(FrameType.CLIENT_INFO, key.public + os.urandom(10)), False),  # short
        (encode_frame(FrameType.CLIENT_INFO, key.public + os.urandom(200)), False),  # does not open
        (encode_frame(FrameType.CLIENT_INFO, NodePrivate.generate().public + good[5 + KEY_LEN :]), False),  # wrong key
        (encode_frame(FrameType.CLIENT_INFO, bytes(KEY_LEN) + good[5 + KEY_LEN :]), False),  # all-zero key
        (send_packet_frame(key.public, b"before login"), False),
        (ping_frame(b"12345678"), False),
        (encode_frame(0x7F, b"unknown before login"), False),
        (pack_header(0xFF, 0xFFFFFFFF), False),
        (good[: len(good) // 2], True),  # truncated ClientInfo
        (good[:3], True),  # truncated header
        (b"GET / HTTP/1.1\r\n\r\n", False),  # HTTP again after the 101
    ]
    for _ in range(40):  # garbage instead of ClientInfo
        cases.append((rng.randbytes(rng.choice([1, 4, 5, 6, 60, 600, 3000])), True))
    return cases


async def test_garbage_lies_and_truncation_before_login(server: Derpd) -> None:
    rng = random.Random(0xDE59)
    cases = _pre_login_cases(server, rng)
    jobs = [lambda h=h, hc=hc: _pre_login(server, h, half_close=hc) for h, hc in cases]
    await run_bounded(jobs, CONCURRENCY)
    await assert_healthy(server)


async def _early_close(server: Derpd, read: int, rst: bool) -> None:
    """Read only ``read`` bytes of the 101 + ServerKey (or none), then FIN or RST."""
    CONNECTIONS["early_close"] += 1
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    await stream.send_all(b"GET /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: DERP\r\n\r\n")
    if read:
        with trio.move_on_after(2):
            await stream.receive_some(read)
    if rst:
        abort_on_close(stream)
    await stream.aclose()


async def test_truncated_server_key_reads_and_resets(server: Derpd) -> None:
    cases = [(read, rst) for read in (0, 1, 12, 100, 150, 170) for rst in (False, True)] * 4
    await run_bounded([lambda r=r, x=x: _early_close(server, r, x) for r, x in cases], CONCURRENCY)
    await assert_healthy(server)


async def test_client_info_cut_anywhere_then_reset(server: Derpd) -> None:
    """A correct ClientInfo cut off at every third offset by a reset: never half a login."""
    key = NodePrivate.generate()
    good = valid_client_info(key, server.public_key)

    async def cut(at: int) -> None:
        CONNECTIONS["cut"] += 1
        stream, _ = await upgrade_to_client_info(server)
        await send_quietly(stream, good[:at])
        abort_on_close(stream)
        await stream.aclose()

    await run_bounded([lambda at=at: cut(at) for at in range(0, len(good), 3)], CONCURRENCY)
    await assert_healthy(server)


# --- after login --------------------------------------------------------------------------------


async def _probe(c: DerpClient, timeout: float = 0.5) -> str:
    """After the hostile bytes: 'pong' if the server still frames this connection, 'closed' if it
    closed it, 'silent' if it is waiting for the rest of a (lying) frame."""
    data = os.urandom(8)
    if not await send_quietly(c.stream, ping_frame(data)):  # type: ignore[arg-type]
        return "closed"
    reader = FrameReader(max_frame_len=1 << 24)
    with trio.move_on_after(timeout):
        while True:
            try:
                chunk = await c.stream.receive_some(65536)
            except trio.BrokenResourceError:
                return "closed"
            if not chunk:
                return "closed"
            reader.feed(chunk)
            for ftype, _payload in reader.read_frames():
                if ftype == FrameType.PONG:  # ours, or the hostile bytes' own Ping's (one pong at a time)
                    return "pong"
    return "silent"


async def _after_login(server: Derpd, hostile: bytes, what: str, probe_timeout: float = 0.5) -> str:
    CONNECTIONS["after_login"] += 1
    c = await server.connect()
    try:
        if not await send_quietly(c.stream, hostile):  # type: ignore[arg-type]
            return "closed"
        return await _probe(c, probe_timeout)
    finally:
        await c.aclose()


def _every_type_wrong_lengths(dst: bytes) -> list[tuple[bytes, str]]:
    out = []
    lengths = [0, 1, 7, 8, 9, 31, 32, 33, 50, 51, 52, 64, 65, 1000, 1001, KEY_LEN + MAX_PACKET_SIZE + 1, 1 << 20]
    for ftype in [*range(0x00, 0x17), 0x7F, 0xFF]:
        for n in lengths:
            payload = (dst + os.urandom(n))[:n] if n >= KEY_LEN else os.urandom(n)
            out.append((encode_frame(ftype, payload), f"type 0x{ftype:02x} len {n}"))
    return out


def _lying_and_truncated(dst: bytes) -> list[tuple[bytes, str]]:
    valid = [
        send_packet_frame(dst, b"x" * 100),
        send_packet_frame(dst, DISCO_MAGIC + os.urandom(80)),
        ping_frame(b"abcdefgh"),
        note_preferred_frame(True),
        forward_packet_frame(os.urandom(32), dst, b"fwd"),
        close_peer_frame(dst),
        encode_frame(FrameType.WATCH_CONNS),
        pong_frame(b"abcdefgh"),
    ]
    out = []
    for frame in valid:
        ftype = frame[0]
        for length in (len(frame) + 100, 0xFFFFFFFF, 0x7FFFFFFF, (1 << 20) + 1):
            out.append((pack_header(ftype, length) + frame[5:], f"lying 0x{ftype:02x} {length}"))
        for cut in (1, 4, 5, 6, len(frame) - 1):
            out.append((frame[:cut], f"truncated 0x{ftype:02x} at {cut}"))
    return out


def _mutations(rng: random.Random, dst: bytes, n: int) -> list[tuple[bytes, str]]:
    """Hypothesis-style random mutations of valid frames (deterministic by seed)."""
    bases = [
        lambda: send_packet_frame(dst, rng.randbytes(rng.randint(0, 1400))),
        lambda: send_packet_frame(dst, DISCO_MAGIC + rng.randbytes(rng.randint(56, 200))),
        lambda: send_packet_frame(NodePrivate.generate().public, rng.randbytes(100)),
        lambda: ping_frame(rng.randbytes(8)),
        lambda: note_preferred_frame(rng.random() < 0.5),
        lambda: forward_packet_frame(rng.randbytes(32), dst, rng.randbytes(rng.randint(0, 300))),
        lambda: close_peer_frame(dst),
        lambda: encode_frame(FrameType.WATCH_CONNS),
        lambda: encode_frame(rng.randint(0x16, 0xFF), rng.randbytes(rng.randint(0, 500))),
    ]

    def mutate(b: bytearray) -> bytearray:
        op = rng.randrange(7)
        if op == 0 and b:  # flip bits
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif op == 1 and len(b) >= 5:  # lie in the length field
            length = rng.choice([0, 1, 0xFFFFFFFF, rng.randrange(1 << 32), len(b) - 5 + rng.randint(-40, 40)])
            b[1:5] = max(0, min(length, 0xFFFFFFFF)).to_bytes(4, "big")
        elif op == 2 and b:  # another type byte
            b[0] = rng.randrange(256)
        elif op == 3 and b:  # truncate
            del b[rng.randrange(len(b)) :]
        elif op == 4:  # insert garbage
            at = rng.randint(0, len(b))
            b[at:at] = rng.randbytes(rng.randint(1, 40))
        elif op == 5 and b:  # duplicate a slice
            i = rng.randrange(len(b))
            b += b[i : i + rng.randint(1, 64)]
        else:  # glue on another valid frame
            b += rng.choice(bases)()
        return b

    out = []
    for i in range(n):
        frames = bytearray(b"".join(rng.choice(bases)() for _ in range(rng.randint(1, 3))))
        for _ in range(rng.randint(1, 3)):
            frames = mutate(frames)
        out.append((bytes(frames), f"mutation {i}"))
    return out


async def _drain(c: DerpClient) -> None:
    """Keep a receiver reading whatever garbage is relayed to it, so no write deadline hits."""
    try:
        while True:
            if not await c.stream.receive_some(1 << 16):
                return
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return


@pytest.mark.parametrize("kind", ["every_type_wrong_lengths", "lying_and_truncated", "mutations"])
async def test_hostile_frames_after_login(server: Derpd, kind: str) -> None:
    receiver = await server.connect()
    rng = random.Random(0xF7A3E)
    if kind == "every_type_wrong_lengths":
        cases = _every_type_wrong_lengths(receiver.public_key)
    elif kind == "lying_and_truncated":
        cases = _lying_and_truncated(receiver.public_key)
    else:
        cases = _mutations(rng, receiver.public_key, 450)
    # Whole frames are answered or refused at once: "silent" there is a failure, so give it time.
    # Lying or mutated ones may rightly leave the server waiting for more: half a second tells.
    probe_timeout = 3.0 if kind == "every_type_wrong_lengths" else 0.5
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_drain, receiver)
        outcomes = await run_bounded(
            [lambda h=h, w=w: _after_login(server, h, w, probe_timeout) for h, w in cases], CONCURRENCY, timeout=90
        )
        nursery.cancel_scope.cancel()
    await receiver.aclose()
    tally = Counter(outcomes)
    print(f"{kind}: {len(cases)} connections: {dict(tally)}")
    assert set(tally) <= {"pong", "closed", "silent"}
    if kind == "every_type_wrong_lengths":  # whole frames: each is handled, skipped or refused
        assert tally["silent"] == 0, [w for (_, w), o in zip(cases, outcomes, strict=True) if o == "silent"]
    await assert_healthy(server)


async def test_every_handled_type_with_a_wrong_length_is_refused(server: Derpd) -> None:
    """The frames the server parses must be exactly right or close the connection: a malformed
    NotePreferred, Ping, WatchConns or SendPacket is not silently half-understood."""
    bad = [
        encode_frame(FrameType.NOTE_PREFERRED, b""),
        encode_frame(FrameType.NOTE_PREFERRED, b"\x01\x01"),
        encode_frame(FrameType.PING, b"1234567"),
        encode_frame(FrameType.PING, b"x" * 1001),
        encode_frame(FrameType.WATCH_CONNS, b"x"),
        encode_frame(FrameType.SEND_PACKET, b"k" * 31),
        encode_frame(FrameType.SEND_PACKET, b"k" * (KEY_LEN + MAX_PACKET_SIZE + 1)),
        encode_frame(FrameType.FORWARD_PACKET, b"k" * 63),
        encode_frame(FrameType.CLOSE_PEER, b"k" * 31),
        encode_frame(FrameType.CLOSE_PEER, b"k" * 32),  # not a mesh peer
    ]
    outcomes = await run_bounded([lambda h=h: _after_login(server, h, "") for h in bad], CONCURRENCY)
    assert outcomes == ["closed"] * len(bad), list(zip(outcomes, [b[:8] for b in bad], strict=True))
    await assert_healthy(server)


UNKNOWN_SIZES = [0, 1, 65536, (1 << 20) + 1, 2 << 20, 4 << 20]


@pytest.mark.parametrize("ftype", [FrameType.CLIENT_INFO, FrameType.PONG, 0x16, 0x7F, 0xFF])
async def test_unknown_frames_up_to_4mib_are_skipped(server: Derpd, ftype: int) -> None:
    """derper reads and discards frame types it does not handle, whatever their length (a newer
    client's frames): after an unknown frame of up to 4 MiB the connection still relays."""
    b = await server.connect()
    try:
        for size in UNKNOWN_SIZES:
            CONNECTIONS["unknown"] += 1
            a = await server.connect()
            try:
                a.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)  # type: ignore[attr-defined]
                marker = f"after {size} bytes of type 0x{ftype:02x}".encode()
                with trio.fail_after(10):
                    await a.send_raw(pack_header(ftype, size) + bytes(size))
                    await a.send(b.public_key, marker)
                    got = await b.recv_packet()
                assert (got.src, got.data) == (a.public_key, marker), size
            finally:
                await a.aclose()
    finally:
        await b.aclose()
    await assert_healthy(server)


async def test_connection_count(server: Derpd) -> None:
    """The module as a whole opened over 1000 hostile connections (when run in full)."""
    if len(CONNECTIONS) < 5:
        pytest.skip(f"only part of the module ran: {dict(CONNECTIONS)}")
    total = sum(CONNECTIONS.values())
    print(f"hostile frame connections: {total} {dict(CONNECTIONS)}")
    assert total >= 1000, dict(CONNECTIONS)
