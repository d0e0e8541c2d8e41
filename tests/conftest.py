"""Shared fixtures: golden vectors, an in-process derpd on loopback, DERP clients."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from derpd.net.client import DerpClient, ReceivedPacket
from derpd.proto.keys import NodePrivate
from derpd.server.node import DerpServer, ServerSettings
from derpd.server.relay import RelayConfig

REPO = Path(__file__).resolve().parents[1]

# What a derpd child must not inherit from the process running the tests: systemd's socket, notify and
# watchdog variables.
SYSTEMD_ENV_PREFIXES = ("LISTEN_", "NOTIFY_", "WATCHDOG_")


def child_env(*, derpd_settings: bool = False) -> dict[str, str]:
    """This process's environment for a derpd child, without systemd's variables and (unless
    ``derpd_settings``) without any DERPD_ setting, the suite's own DERPD_METRICS_ADDR included."""
    drop = SYSTEMD_ENV_PREFIXES if derpd_settings else (*SYSTEMD_ENV_PREFIXES, "DERPD_")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}
# The golden vectors live in the repo (copied from Tailscale-generated ../shared/vectors) so a
# fresh clone anywhere can run the suite; DERPD_VECTORS points elsewhere if wanted.
VECTORS = Path(os.environ.setdefault("DERPD_VECTORS", str(REPO / "tests" / "vectors")))
# derpd processes started by tests must not fight over the default metrics port 9464.
os.environ.setdefault("DERPD_METRICS_ADDR", "127.0.0.1:0")


def load_vector(name: str) -> dict[str, Any]:
    with open(VECTORS / name, encoding="utf-8") as f:
        return json.load(f)


async def start_server(
    nursery: trio.Nursery,
    key: NodePrivate | None = None,
    *,
    stun_port: int = -1,
    home: str = "",
    mesh_key: bytes | None = None,
    relay: RelayConfig | None = None,
    addr: tuple[str, int] = ("127.0.0.1", 0),
    **extra: Any,
) -> DerpServer:
    """An in-process derpd on loopback; ``extra`` sets any other ServerSettings field."""
    settings = ServerSettings(
        addr=addr, stun_port=stun_port, home=home, mesh_key=mesh_key, relay=relay or RelayConfig(), **extra
    )
    server = DerpServer(key or NodePrivate.generate(), settings)
    await nursery.start(server.run)
    return server


def url_of(server: DerpServer) -> str:
    host, port = server.derp_addrs[0]
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}/derp"


@pytest.fixture
async def server(nursery: trio.Nursery) -> DerpServer:
    return await start_server(nursery)


@pytest.fixture
def url(server: DerpServer) -> str:
    return url_of(server)


class Clients:
    """Opens DerpClients and closes them all at the end of a test."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.opened: list[DerpClient] = []

    async def connect(self, key: NodePrivate | None = None, **kw: Any) -> DerpClient:
        c = await DerpClient.connect(kw.pop("url", self.url), key, **kw)
        self.opened.append(c)
        return c


@pytest.fixture
async def clients(url: str) -> AsyncIterator[Clients]:
    cs = Clients(url)
    yield cs
    for c in cs.opened:
        await c.aclose()


async def wait_for(predicate: Any, timeout: float = 5.0, what: str = "condition") -> None:
    """Poll ``predicate`` until true; fails the test (not a timing assertion) if it never is."""
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.005)
        return
    raise AssertionError(f"timed out waiting for {what}")


async def send_until_delivered(src: DerpClient, dst: DerpClient, data: bytes, limit: float = 30.0) -> ReceivedPacket:
    """Send until ``dst`` gets one: routes across a mesh exist only once the PeerPresent flood
    has arrived, and packets before that are (rightly) dropped as unknown_dest."""
    with trio.fail_after(limit):
        while True:
            await src.send(dst.public_key, data)
            with trio.move_on_after(0.3):
                got = await dst.recv_packet()
                assert (got.src, got.data) == (src.public_key, data)
                return got


@contextmanager
def derpd_logger(caplog: pytest.LogCaptureFixture, level: int) -> Iterator[pytest.LogCaptureFixture]:
    """Capture the "derpd" logger at ``level`` even if something set propagate=False on it (log.setup
    does), and put the logger back as it was."""
    logger = logging.getLogger("derpd")
    old_level = logger.level
    logger.addHandler(caplog.handler)
    logger.setLevel(level)
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)
        logger.setLevel(old_level)
