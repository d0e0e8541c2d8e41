"""server.connlog: every connection's two lines while they are few, a summary a second when they are not."""

from __future__ import annotations

import logging

import pytest

from derpd.base import log
from derpd.server.connlog import ConnectionLog
from derpd.server.node import DerpServer

from .conftest import Clients, wait_for


@pytest.fixture
def records(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="derpd")
    return caplog


def churn(records: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [r.fields for r in records.records if r.getMessage() == "client_churn"]  # type: ignore[attr-defined]


def test_below_the_limit_every_line_is_written_and_no_summary(records: pytest.LogCaptureFixture) -> None:
    c = ConnectionLog(per_second=3)
    assert [c.connect_level(10.0) for _ in range(3)] == [logging.INFO] * 3
    assert [c.disconnect_level(10.5, "client closed the connection") for _ in range(3)] == [logging.INFO] * 3
    c.tick(11.0)
    c.tick(12.0)
    assert not churn(records)


def test_over_the_limit_lines_are_counted_and_summarised(records: pytest.LogCaptureFixture) -> None:
    c = ConnectionLog(per_second=2)
    assert [c.connect_level(5.0) for _ in range(5)] == [logging.INFO] * 2 + [None] * 3
    assert c.disconnect_level(5.1, "client closed the connection") == logging.INFO
    assert c.disconnect_level(5.2, "write timeout") == logging.INFO
    assert c.disconnect_level(5.3, "client closed the connection") is None
    assert c.disconnect_level(5.4, "client closed the connection") is None
    assert not churn(records)  # the window is still open
    c.tick(6.0)
    (summary,) = churn(records)
    assert summary == {
        "seconds": "1",
        "connected": 5,
        "disconnected": 4,
        "unlogged": 5,
        "reasons": "client closed the connection: 3; write timeout: 1",
        "other_reasons": None,
    }
    # A new window: full lines again, and nothing more to summarise.
    assert c.connect_level(6.1) == logging.INFO
    c.tick(7.2)
    assert len(churn(records)) == 1


def test_the_summary_names_the_top_reasons_and_counts_the_rest(records: pytest.LogCaptureFixture) -> None:
    c = ConnectionLog(per_second=0)
    for i, n in enumerate([5, 4, 3, 2, 1]):
        for _ in range(n):
            c.disconnect_level(1.0, f"reason {i}")
    c.tick(2.0)
    (summary,) = churn(records)
    assert summary["reasons"] == "reason 0: 5; reason 1: 4; reason 2: 3"
    assert summary["other_reasons"] == 3 and summary["unlogged"] == 15


def test_the_next_connection_also_ends_a_busy_window(records: pytest.LogCaptureFixture) -> None:
    c = ConnectionLog(per_second=1)
    c.connect_level(1.0)
    assert c.connect_level(1.5) is None
    assert c.connect_level(100.0) == logging.INFO  # no tick in between: the summary comes first
    assert [s["connected"] for s in churn(records)] == [2]


def test_mesh_peers_are_always_logged_and_counted(records: pytest.LogCaptureFixture) -> None:
    c = ConnectionLog(per_second=1)
    c.connect_level(1.0)
    assert c.connect_level(1.1) is None
    assert c.connect_level(1.2, always=True) == logging.INFO
    assert c.disconnect_level(1.3, "mesh peer closed", always=True) == logging.INFO
    c.tick(2.5)
    (summary,) = churn(records)
    assert summary["connected"] == 3 and summary["unlogged"] == 1


def test_at_debug_every_line_is_still_written(caplog: pytest.LogCaptureFixture) -> None:
    """An operator chasing one key turns debug on and sees every connection, summaries besides."""
    caplog.set_level(logging.DEBUG, logger="derpd")
    c = ConnectionLog(per_second=1)
    assert [c.connect_level(1.0) for _ in range(3)] == [logging.INFO, logging.DEBUG, logging.DEBUG]
    c.tick(2.0)
    assert len(churn(caplog)) == 1
    assert log.log.isEnabledFor(logging.DEBUG)


async def test_a_burst_of_logins_is_summarised_by_the_relay(
    server: DerpServer, clients: Clients, caplog: pytest.LogCaptureFixture
) -> None:
    """End to end: the relay asks before it formats a line, and its summary counts every connection."""
    caplog.set_level(logging.INFO, logger="derpd")
    relay = server.relay
    relay.conn_log = ConnectionLog(per_second=2, window=3600.0)  # one long window: no tick of the node's
    opened = [await clients.connect() for _ in range(5)]
    for c in opened:
        await c.ping()  # registered, so its line (if any) is out
    await wait_for(lambda: relay.stats.current_connections == 5, what="five logins")
    for c in opened:
        await c.aclose()
    await wait_for(lambda: relay.stats.current_connections == 0, what="five disconnections")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("client_")]
    assert lines.count("client_connected") == 2 and lines.count("client_disconnected") == 2
    relay.conn_log.tick(relay.clock() + 3600.0)
    (summary,) = churn(caplog)
    assert summary["connected"] == 5 and summary["disconnected"] == 5 and summary["unlogged"] == 6
    assert summary["reasons"] == "client closed the connection: 5"
