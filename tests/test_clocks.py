"""The relay's keepalive in virtual time: trio's MockClock jumps to the next deadline whenever every
task waits (the ``autojump_clock`` fixture), so the real interval (KEEPALIVE_SECONDS, 60 s, plus up
to 5 s of jitter per connection, as derper) is tested to the exact second in a few milliseconds.
The sockets are real: loopback, server and clients in this process, so the clock only jumps when
no byte is in flight. (The sd_notify watchdog's timing is tested the same way in test_systemd.py.)
"""

from __future__ import annotations

import math
import random

import pytest
import trio
import trio.testing

from derpd.net.client import DerpClient, KeepAliveMessage
from derpd.proto.frames import KEEPALIVE_SECONDS

from .conftest import start_server, url_of

JITTER = 5.0  # derper: KeepAlive + rand.N(5s), drawn once per connection
WINDOW = 600.0  # ten minutes of virtual time


async def keepalive_times(c: DerpClient, until: float) -> list[float]:
    """When (virtual time) each frame reached ``c`` before ``until``; every one must be a KeepAlive."""
    times: list[float] = []
    with trio.move_on_at(until):
        while True:
            message = await c.recv()
            assert isinstance(message, KeepAliveMessage), message
            times.append(trio.current_time())
    return times


async def test_keepalives_every_interval_with_jitter_per_connection(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Three idle clients: each gets a KeepAlive every 60 s + its own jitter in [0, 5), exactly
    periodic, as many as fit in ten minutes, and nothing else."""
    server = await start_server(nursery)  # the default RelayConfig: KEEPALIVE_SECONDS
    clients = [await DerpClient.connect(url_of(server)) for _ in range(3)]
    t0 = trio.current_time()  # the logins took no virtual time: nothing waited
    got: dict[int, list[float]] = {}

    async def collect(i: int) -> None:
        got[i] = await keepalive_times(clients[i], t0 + WINDOW)

    async with trio.open_nursery() as inner:
        for i in range(len(clients)):
            inner.start_soon(collect, i)
    for i, times in got.items():
        interval = times[0] - t0
        assert KEEPALIVE_SECONDS <= interval < KEEPALIVE_SECONDS + JITTER, (i, interval)
        assert len(times) == math.floor(WINDOW / interval), (i, interval, times)
        for k, t in enumerate(times, 1):
            assert t - t0 == pytest.approx(k * interval, abs=1e-9), (i, k, times)
    assert len({round(times[0], 9) for times in got.values()}) > 1, "the same jitter for every connection"
    for c in clients:
        await c.aclose()


async def test_keepalive_interval_is_60s_plus_the_drawn_jitter(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the jitter drawn as 2.5 s: KeepAlives at exactly 62.5, 125, ..., 562.5 s (nine in ten
    minutes), from a draw of uniform(0, 5) made once for the connection."""
    draws: list[tuple[float, float]] = []

    def uniform(a: float, b: float) -> float:
        draws.append((a, b))
        return 2.5

    monkeypatch.setattr(random, "uniform", uniform)
    server = await start_server(nursery)
    t0 = trio.current_time()
    async with await DerpClient.connect(url_of(server)) as c:
        times = await keepalive_times(c, t0 + WINDOW)
    assert [t - t0 for t in times] == pytest.approx([62.5 * k for k in range(1, 10)], abs=1e-9)
    assert draws == [(0.0, JITTER)]
