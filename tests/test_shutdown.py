"""Graceful shutdown: stop accepting, tell clients (Restarting), flush, close."""

from __future__ import annotations

import io
import json
import logging

import pytest
import trio

from derpd.base import log
from derpd.net.client import ConnectionLost, DerpClient, RestartingMessage

from .conftest import start_server, url_of, wait_for


async def test_shutdown_tells_every_client_flushes_and_closes(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, restart_reconnect_in=0.5, restart_try_for=10.0, shutdown_timeout=3.0)
    url = url_of(server)
    a = await DerpClient.connect(url)
    b = await DerpClient.connect(url)
    await a.send_many([(b.public_key, i.to_bytes(2, "big") * 500) for i in range(20)])
    await a.ping()  # the server has routed them
    with trio.fail_after(10):
        await server.shutdown()
    got = []
    restarting = []
    with trio.fail_after(5):
        for client, sink in ((a, None), (b, got)):
            try:
                while True:
                    msg = await client.recv()
                    if isinstance(msg, RestartingMessage):
                        restarting.append(msg)
                    elif sink is not None and hasattr(msg, "data") and len(msg.data) == 1000:  # type: ignore[union-attr]
                        sink.append(msg.data)  # type: ignore[union-attr]
            except ConnectionLost:
                pass
    assert restarting == [RestartingMessage(500, 10_000)] * 2
    assert got == [i.to_bytes(2, "big") * 500 for i in range(20)]  # queued packets were still delivered
    with pytest.raises(OSError):
        with trio.fail_after(5):
            await DerpClient.connect(url)  # no longer accepting
    await wait_for(lambda: server.relay.stats.current_connections == 0, what="every client to be closed")
    await a.aclose()
    await b.aclose()


def test_json_log_lines() -> None:
    stream = io.StringIO()
    log.setup("info", stream, json_lines=True)
    try:
        log.info("client_connected", key="0514fc4a", remote="[::1]:5", n=3, skipped=None)
        log.warning("odd value", obj=object.__name__, text='quote " and = sign')
    finally:
        logging.getLogger("derpd").handlers.clear()
        logging.getLogger("derpd").propagate = True
    lines = stream.getvalue().splitlines()
    first, second = (json.loads(line) for line in lines)
    assert first["event"] == "client_connected" and first["level"] == "info" and first["n"] == 3
    assert first["remote"] == "[::1]:5" and "skipped" not in first and first["ts"].endswith("Z")
    assert second["text"] == 'quote " and = sign'
