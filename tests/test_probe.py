"""derpd probe against real derpd servers on loopback: plain HTTP and TLS (pins, fast start), dead ports,
multi-node maps, IPv6 STUN, a load balancer in front of two servers, admission, port 80, the CLI."""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from click.testing import CliRunner

from derpd.cli import probe
from derpd.net.tls import CertStore
from derpd.proto.keys import NodePrivate, public_key_text
from derpd.server.admission import Admission
from derpd.server.node import DerpServer
from derpd.tools import derpmap as dm
from derpd.tools.probe import (
    FAIL,
    OK,
    SKIP,
    ProbeOptions,
    ProbeReport,
    captive_portal_check,
    format_table,
    load_map,
    percentiles,
    probe_map,
    probe_url,
    targets_from_map,
)

from .conftest import start_server, url_of

DERPD = [sys.executable, "-m", "derpd"]
OPTS = ProbeOptions(count=4)
WRONG_PIN = "sha256-raw:" + "00" * 32


def checks(report: ProbeReport, node: int = 0) -> dict[str, Any]:
    return {c.name: c for c in report.nodes[node].checks}


async def tls_server(nursery: trio.Nursery, certdir: Path, host: str = "127.0.0.1", **extra: Any) -> DerpServer:
    """derpd with its self-signed IP certificate, as ``serve --certmode manual --hostname <ip>`` runs it."""
    key = NodePrivate.generate()
    store = CertStore(certdir, host, key.public)
    store.load()
    return await start_server(nursery, key, tls=store, hostname=host, addr=(host, 0), **extra)


def node_for(server: DerpServer, name: str = "900a", **kw: Any) -> dm.DerpNode:
    assert server.tls is not None and server.tls.pin is not None
    host = server.derp_addrs[0][0]
    stun = server.stun_addrs[0][1] if server.stun_addrs else -1
    return dm.DerpNode(name, 900, host, cert_name=server.tls.pin, derp_port=server.port, stun_port=stun, **kw)


def one_region(*nodes: dm.DerpNode) -> dm.DerpMap:
    return dm.DerpMap(regions={900: dm.DerpRegion(900, "test", "Test", nodes=list(nodes))})


def closed_port(kind: int = socket.SOCK_STREAM) -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


# --- single servers ----------------------------------------------------------------------------------


async def test_plain_http_derpd_with_stun_passes(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, stun_port=0)
    report = await probe_url(url_of(server), OPTS, stun_port=server.stun_addrs[0][1])
    assert report.ok and report.failures() == [], format_table(report)
    c = checks(report)
    assert [n for n, v in c.items() if v.status == OK] == ["tcp v4", "derp", "ping", "relay", "keys", "stun v4"]
    assert c["tcp v6"].status == SKIP and "no IPv6 address" in c["tcp v6"].detail
    assert c["stun v6"].status == SKIP and "no IPv6 address" in c["stun v6"].detail
    doc = json.loads(json.dumps(report.to_json()))  # everything is JSON-serialisable
    assert doc["ok"] is True and doc["problems"] == []
    (node,) = doc["nodes"]
    assert node["server_keys"] == [public_key_text(server.key.public)] and node["port"] == server.port
    by_name = {c["name"]: c for c in node["checks"]}
    for check in node["checks"]:
        assert {"name", "status", "detail"} <= set(check)
    assert (
        by_name["derp"]["server_key"] == public_key_text(server.key.public) and by_name["derp"]["fast_start"] is False
    )
    for name in ("ping", "relay"):
        stats = by_name[name]
        assert stats["count"] == OPTS.count and 0 < stats["p50_ms"] <= stats["p90_ms"] <= stats["max_ms"]
    assert by_name["stun v4"]["mapped"].startswith("127.0.0.1:") and "ms" in by_name["stun v4"]
    assert by_name["keys"]["connections"] == ProbeOptions().logins and by_name["tcp v4"]["address"]
    assert "all 6 checks passed" in format_table(report)


async def test_tls_with_the_right_pin_takes_fast_start(nursery: trio.Nursery, tmp_path: Path) -> None:
    server = await tls_server(nursery, tmp_path, stun_port=0)
    report = await probe_map(one_region(node_for(server)), OPTS)
    assert report.ok, format_table(report)
    tls = checks(report)["tls v4"].data
    assert tls["tls_version"] == "TLSv1.3" and tls["alpn"] == "http/1.1"
    assert tls["pin_match"] is True and tls["cert_pin"] == server.tls.pin  # type: ignore[union-attr]
    assert tls["fast_start_offered"] is True and tls["meta_key"] == public_key_text(server.key.public)
    assert tls["cert_days_left"] > 300
    assert checks(report)["derp"].data["fast_start"] is True
    assert "1 meta certificate" in checks(report)["keys"].detail
    # The same node without the pin: the self-signed certificate is not trusted by the system CAs.
    report = await probe_map(one_region(node_for(server)), ProbeOptions(count=1, cert_name=""))
    assert not report.ok and "certificate verify failed" in checks(report)["tls v4"].detail


async def test_wrong_pin_fails_through_the_cli(nursery: trio.Nursery, tmp_path: Path) -> None:
    server = await tls_server(nursery, tmp_path)
    url = f"https://127.0.0.1:{server.port}/derp"
    base = [*DERPD, "probe", url, "--stun-port", "-1", "--count", "2"]
    bad = await trio.run_process(
        [*base, "--cert-name", WRONG_PIN], capture_stdout=True, capture_stderr=True, check=False
    )
    assert bad.returncode == 1
    assert b"FAIL  tls v4" in bad.stdout and b"check(s) failed" in bad.stdout
    (line,) = bad.stderr.decode().splitlines()
    assert line.startswith("derpd: probe failed: 127.0.0.1 tls v4: handshake with 127.0.0.1:")
    assert f"does not match the pin {WRONG_PIN}" in line
    good = await trio.run_process(
        [*base, "--cert-name", server.tls.pin, "--json"],  # type: ignore[union-attr]
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["ok"] is True


async def test_dead_port_fails_clearly() -> None:
    report = await probe_url(f"http://127.0.0.1:{closed_port()}/derp", OPTS, stun_port=closed_port(socket.SOCK_DGRAM))
    assert not report.ok
    failures = report.failures()
    assert len(failures) == 2, failures
    assert failures[0].endswith(": connection refused") and failures[0].startswith("127.0.0.1 tcp v4: ")
    assert "port unreachable" in failures[1]
    c = checks(report)
    assert all(c[name].status == SKIP for name in ("derp", "ping", "relay", "keys"))


async def test_two_node_map_with_one_node_down(nursery: trio.Nursery, tmp_path: Path) -> None:
    server = await tls_server(nursery, tmp_path, stun_port=0)
    up = node_for(server, "900a")
    down = dm.DerpNode("900b", 900, "127.0.0.1", derp_port=closed_port(), stun_port=closed_port(socket.SOCK_DGRAM))
    path = tmp_path / "derp.json"
    path.write_text(dm.to_json(one_region(up, down)))
    m, problems = await load_map(str(path))
    assert problems == []
    report = await probe_map(m, OPTS, problems=problems)
    assert [n.node for n in report.nodes] == ["900a", "900b"]
    assert report.nodes[0].ok and not report.nodes[1].ok and not report.ok
    assert report.failures() and all(f.startswith("900b ") for f in report.failures())
    table = format_table(report)
    assert "region 900 (test) node 900a" in table and "region 900 (test) node 900b" in table
    assert "FAIL  tcp v4" in table


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback")
async def test_ipv6_stun_and_tls_on_loopback(nursery: trio.Nursery, tmp_path: Path) -> None:
    plain = await start_server(nursery, addr=("::1", 0), stun_port=0)
    report = await probe_url(url_of(plain), OPTS, stun_port=plain.stun_addrs[0][1])
    assert report.ok, format_table(report)
    c = checks(report)
    assert c["stun v6"].status == OK and c["stun v6"].data["mapped"].startswith("[::1]:")
    assert c["tcp v6"].status == OK and c["tcp v4"].status == SKIP and "no IPv4 address" in c["tcp v4"].detail
    # Over TLS from a map whose node has IPv4 switched off.
    server = await tls_server(nursery, tmp_path, host="::1", stun_port=0)
    report = await probe_map(one_region(node_for(server, ipv4="none", ipv6="::1")), OPTS)
    assert report.ok, format_table(report)
    c = checks(report)
    assert c["tls v6"].data["pin_match"] is True and c["stun v6"].status == OK
    assert "ipv4: none" in c["tcp v4"].detail and "ipv4: none" in c["stun v4"].detail


async def test_load_balancer_in_front_of_two_servers_is_detected(nursery: trio.Nursery) -> None:
    a, b = await start_server(nursery), await start_server(nursery)
    counter = itertools.count()

    async def pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
        try:
            async for chunk in src:
                await dst.send_all(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def balance(client: trio.SocketStream) -> None:
        # The probe's first three connections (TCP check, relay clients A and B) reach server a, so relaying
        # works; its further logins alternate b, a, b: what round-robin balancing of unmeshed servers does.
        n = next(counter)
        backend = b if n >= 3 and n % 2 else a
        upstream = await trio.open_tcp_stream("127.0.0.1", backend.port)
        async with client, upstream, trio.open_nursery() as pipes:
            for src, dst in ((client, upstream), (upstream, client)):
                pipes.start_soon(_pump_then_cancel, pump, src, dst, pipes.cancel_scope)

    listeners = await nursery.start(partial(trio.serve_tcp, balance, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    report = await probe_url(f"http://127.0.0.1:{port}/derp", OPTS, stun_port=-1)
    c = checks(report)
    assert c["relay"].status == OK
    assert c["keys"].status == FAIL and "multiple server public keys (2)" in c["keys"].detail
    assert "load balancer" in c["keys"].detail
    assert set(report.nodes[0].server_keys) == {public_key_text(a.key.public), public_key_text(b.key.public)}


async def _pump_then_cancel(pump: Any, src: Any, dst: Any, scope: trio.CancelScope) -> None:
    await pump(src, dst)
    scope.cancel()  # one direction ended: the connection is over


async def test_admission_refuses_the_probe_unless_it_has_the_mesh_key(nursery: trio.Nursery, tmp_path: Path) -> None:
    allow = tmp_path / "allow"
    allow.write_text("# nobody\n")
    admission = Admission(allow_keys_file=str(allow))
    admission.load()
    mesh_key = os.urandom(32)
    server = await start_server(nursery, admission=admission, mesh_key=mesh_key)
    report = await probe_url(url_of(server), OPTS, stun_port=-1)
    c = checks(report)
    assert c["derp"].status == FAIL and "--mesh-psk-file" in c["derp"].detail
    assert c["keys"].status == SKIP
    report = await probe_url(url_of(server), ProbeOptions(count=2, mesh_key=mesh_key), stun_port=-1)
    assert report.ok, format_table(report)


async def test_port_80_check(nursery: trio.Nursery) -> None:
    server = await start_server(nursery)  # derpd answers /generate_204 (with the challenge) on its main port too
    report = await probe_url(
        url_of(server), ProbeOptions(count=1, http_port=server.port), stun_port=-1, can_port80=True
    )
    c = checks(report)["port80"]
    assert c.status == OK and c.data["challenge_ok"] is True and c.data["status"] == 204
    closed = closed_port()
    report = await probe_url(url_of(server), ProbeOptions(count=1, http_port=closed), stun_port=-1, can_port80=True)
    c = checks(report)["port80"]
    assert c.status == FAIL and "connection refused (is port 80 blocked?)" in c.detail


async def test_port_80_check_against_a_listener_that_hangs_up(nursery: trio.Nursery) -> None:
    """A middlebox that takes the connection and closes it unanswered: a failure that says so."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")

    async def hang_up(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.aclose()

    nursery.start_soon(trio.serve_listeners, hang_up, listeners)
    port = listeners[0].socket.getsockname()[1]
    with trio.fail_after(5):
        c = await captive_portal_check("127.0.0.1", "derp.example.com", port)
    assert c.status == FAIL and c.detail == f"http://127.0.0.1:{port}/generate_204: no HTTP response"


async def test_map_problems_fail_the_report(nursery: trio.Nursery, tmp_path: Path) -> None:
    server = await tls_server(nursery, tmp_path)
    node = node_for(server)
    text = dm.to_headscale_yaml(one_region(node)).replace("        regionid: 900", "        RegionID: 900")
    path = tmp_path / "derp.yaml"
    path.write_text(text)
    m, problems = await load_map(str(path))
    report = await probe_map(m, ProbeOptions(count=1), problems=problems)
    assert report.nodes[0].ok and not report.ok  # the node works, the map does not
    failures = report.failures()
    assert any("unknown key 'RegionID'" in f and "lower-case" in f for f in failures)
    assert any("no regionid" in f for f in failures)
    assert all(f.startswith("map: ") for f in failures)


async def test_derp_map_from_a_url(nursery: trio.Nursery) -> None:
    body = dm.to_json(one_region(dm.DerpNode("900a", 900, "derp.example.com"))).encode()

    async def serve(stream: trio.SocketStream) -> None:
        async with stream:
            request = b""
            while b"\r\n\r\n" not in request and len(request) < 8192:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                request += chunk
            if request.startswith(b"GET /derpmap "):
                head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                await stream.send_all(head + body)
            else:
                await stream.send_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
    base = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    with trio.fail_after(5):
        m, problems = await load_map(base + "/derpmap")
    assert problems == [] and [t.node.host_name for t in targets_from_map(m)] == ["derp.example.com"]
    with pytest.raises(dm.DerpMapError, match="404"):
        await load_map(base + "/missing")


# --- pieces ------------------------------------------------------------------------------------------


def test_percentiles_nearest_rank() -> None:
    assert percentiles([5.0, 1.0, 3.0, 2.0, 4.0, 6.0, 7.0, 8.0, 9.0, 10.0]) == {
        "p50_ms": 5.0,
        "p90_ms": 9.0,
        "max_ms": 10.0,
    }
    assert percentiles([2.0]) == {"p50_ms": 2.0, "p90_ms": 2.0, "max_ms": 2.0}


def test_region_selection() -> None:
    m = dm.DerpMap(
        regions={
            900: dm.DerpRegion(900, "a", "A", nodes=[dm.DerpNode("900a", 900, "a.example.com")]),
            901: dm.DerpRegion(901, "b", "B", nodes=[dm.DerpNode("901a", 901, "b.example.com")]),
            1: None,
        }
    )
    assert [t.node.name for t in targets_from_map(m)] == ["900a", "901a"]
    assert [t.node.name for t in targets_from_map(m, "901")] == ["901a"]
    assert [t.node.name for t in targets_from_map(m, "a")] == ["900a"]
    with pytest.raises(dm.DerpMapError, match=r"no region '902' in the map \(regions: 900 \(a\), 901 \(b\)\)"):
        targets_from_map(m, "902")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ([], "give either a URL"),
        (["http://x/derp", "--derp-map", "m.yaml"], "give either a URL"),
        (["--derp-map", "missing.yaml"], "missing.yaml: No such file or directory"),
        (["ftp://x/derp"], "expected https://host[:port]/derp"),
        (["--derp-map", "m.yaml", "--can-port80"], "--can-port80 is for a URL probe"),
        (["http://x/derp", "--region", "900"], "--region only applies"),
        (["http://x/derp", "--cert-name", "sha256-raw:00"], "64 lowercase hex"),
        (["http://x/derp", "--count", "0"], "--count"),
    ],
)
def test_cli_refusals(args: list[str], words: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("m.yaml").write_text("regions: {}\n")
    result = CliRunner().invoke(probe, args)
    assert result.exit_code == 2 and words in " ".join(result.stderr.split()), result.stderr


def test_cli_error_is_one_line(tmp_path: Path) -> None:
    out = subprocess.run(
        [*DERPD, "probe", "--derp-map", "missing.yaml"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        cwd=tmp_path,
    )
    assert out.returncode == 2 and out.stderr.splitlines() == ["derpd: error: missing.yaml: No such file or directory"]


def test_env_twins_shared_with_serve_do_not_break_a_map_probe(tmp_path: Path) -> None:
    path = tmp_path / "derp.yaml"
    path.write_text("regions:\n  900:\n    regionid: 900\n    regioncode: x\n    regionname: x\n    nodes: []\n")
    env = {"DERPD_STUN_PORT": "3478", "DERPD_CAN_PORT80": "1"}  # as a `derpd serve` environment file may set
    result = CliRunner().invoke(probe, ["--derp-map", str(path), "--json"], env=env)
    assert result.exit_code == 1 and json.loads(result.stdout)["problems"] == ["region 900: no nodes"]
    result = CliRunner().invoke(probe, ["--derp-map", str(path), "--stun-port", "3478"])
    assert result.exit_code == 2 and "--stun-port is for a URL probe" in result.stderr
