"""Attack 7: a logged-in client that never reads while a peer floods it.

Bounded at 50 MB or 10 s of 60 KB packets. Its queue stays bounded (packets beyond it are
dropped), the sender is never blocked, a third pair relays without delay all along, and once
the kernel buffers are full the write deadline (``--tcp-write-timeout 1s`` on the test server)
disconnects it; its descriptors are given back.
"""

from __future__ import annotations

import os
import re
import time

import pytest
import trio

from derpd.proto.keys import short_key

from .conftest import Derpd, assert_healthy, wait_for_log

pytestmark = pytest.mark.hostile

FLOOD_BYTES = 50 << 20
FLOOD_SECONDS = 10.0
PACKET = 60_000
MAX_DELAY = 1.0  # seconds: any relay hop or send on the bystanders' side (normally ~1 ms)


async def test_slow_receiver_is_cut_off_without_delaying_anyone(server: Derpd) -> None:
    slow = await server.connect()  # from here on, never read
    sender = await server.connect()
    sender_peer = await server.connect()
    c, d = await server.connect(), await server.connect()
    delays: dict[str, float] = {"sender_send": 0.0, "sender_to_peer": 0.0, "third_pair_round_trip": 0.0}
    sent = 0
    flood_done = trio.Event()
    disconnected_after: float | None = None
    pattern = rf"event=client_disconnected .*key={short_key(slow.public_key)} .*reason=\"?write timeout"
    start = time.monotonic()

    def note(what: str, seconds: float) -> None:
        delays[what] = max(delays[what], seconds)

    async def flood() -> None:
        nonlocal sent, disconnected_after
        packets = [(slow.public_key, os.urandom(PACKET))] * 8
        while sent < FLOOD_BYTES and time.monotonic() - start < FLOOD_SECONDS:
            t = time.monotonic()
            await sender.send_many(packets)
            note("sender_send", time.monotonic() - t)
            sent += 8 * PACKET
            token = os.urandom(16)
            t = time.monotonic()
            await sender.send(sender_peer.public_key, token)
            with trio.fail_after(5):
                assert (await sender_peer.recv_packet()).data == token
            note("sender_to_peer", time.monotonic() - t)
            if re.search(pattern, server.log_since().decode("utf-8", "replace")):
                disconnected_after = time.monotonic() - start
                break
            await trio.sleep(0.01)
        flood_done.set()

    async def third_pair() -> None:
        while not flood_done.is_set():
            token = os.urandom(16)
            t = time.monotonic()
            with trio.fail_after(5):
                await c.send(d.public_key, token)
                assert (await d.recv_packet()).data == token
                await d.send(c.public_key, token)
                assert (await c.recv_packet()).data == token
            note("third_pair_round_trip", time.monotonic() - t)
            await trio.sleep(0.02)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood)
            nursery.start_soon(third_pair)
        line = await wait_for_log(server, pattern, timeout=5)
        print(f"flooded {sent >> 20} MB; cut off after {disconnected_after}s; worst delays {delays}: {line}")
        assert all(v < MAX_DELAY for v in delays.values()), delays
        assert sent < FLOOD_BYTES, "the write deadline never hit within the flood"
    finally:
        for client in (slow, sender, sender_peer, c, d):
            await client.aclose()
    await assert_healthy(server)
