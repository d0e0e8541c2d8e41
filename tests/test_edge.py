"""The production edge end to end: TLS (fast start, 101, reload, pins), admission, limits,
PROXY protocol and the port-80 listener, with derpd's client and real sockets on loopback."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import trio
import trio.lowlevel
import trustme

from derpd.net.client import ConnectionLost, DerpClient, PeerPresentMessage, decode_message
from derpd.net.tls import CertStore, cert_name_pin
from derpd.proto.frames import ClientInfo, FrameReader, FrameType, client_info_frame
from derpd.proto.keys import NodePrivate
from derpd.proto.proxyproto import encode_v1, encode_v2, parse_trusted
from derpd.server.admission import Admission
from derpd.server.limits import RateConfig
from derpd.server.node import DerpServer, ServerSettings
from derpd.server.relay import RelayConfig

from .conftest import start_server, url_of, wait_for
from .test_admission import start_verify_server

HOST = "derp.test"


def issue(ca: trustme.CA, certdir: Path, name: str = HOST) -> None:
    leaf = ca.issue_cert(name)
    certdir.mkdir(exist_ok=True)
    (certdir / f"{name}.crt").write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    key = certdir / f"{name}.key"
    key.write_bytes(leaf.private_key_pem.bytes())
    key.chmod(0o600)


def trusting(ca: trustme.CA, *, tls12: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


async def tls_server(nursery: trio.Nursery, certdir: Path, hostname: str = HOST, **extra: object) -> DerpServer:
    key = NodePrivate.generate()
    store = CertStore(certdir, hostname, key.public)
    store.load()
    return await start_server(nursery, key, tls=store, hostname=hostname, **extra)  # type: ignore[arg-type]


def https_url(server: DerpServer) -> str:
    return f"https://127.0.0.1:{server.port}/derp"


async def tls13_and_tls12_clients(nursery: trio.Nursery, certdir: Path) -> tuple[DerpServer, DerpClient, DerpClient]:
    """A TLS server for HOST with a certificate from a fresh CA, and two clients of it: one over
    TLS 1.3 (fast start) and one held to TLS 1.2 (the 101 path)."""
    ca = trustme.CA()
    issue(ca, certdir)
    server = await tls_server(nursery, certdir)
    fast = await DerpClient.connect(https_url(server), cert_name=HOST, ssl_context=trusting(ca))
    slow = await DerpClient.connect(https_url(server), cert_name=HOST, ssl_context=trusting(ca, tls12=True))
    return server, fast, slow


async def relay_both_ways(a: DerpClient, b: DerpClient, payload: bytes = b"edge") -> None:
    with trio.fail_after(5):
        await a.send(b.public_key, payload)
        assert (await b.recv_packet()).data == payload
        await b.send(a.public_key, payload[::-1])
        assert (await a.recv_packet()).data == payload[::-1]


# --- TLS --------------------------------------------------------------------------------------


async def test_tls13_takes_fast_start_and_tls12_the_101_path(nursery: trio.Nursery, tmp_path: Path) -> None:
    server, fast, slow = await tls13_and_tls12_clients(nursery, tmp_path)
    async with fast, slow:
        assert fast.fast_start and fast.http_response is None  # the meta certificate was found
        assert not slow.fast_start and slow.http_response is not None and slow.http_response.status_code == 101
        assert fast.server_key == slow.server_key == server.key.public
        await relay_both_ways(fast, slow, os.urandom(1200))
    assert server.tls_versions == {"TLSv1.3": 1, "TLSv1.2": 1}


async def test_tls_bulk_transfer_and_a_stuck_reader(nursery: trio.Nursery, tmp_path: Path) -> None:
    """Over TLS too: large bursts arrive whole and in order (the ciphertext backlog path), and a
    client that stops reading is cut off by the write timeout without holding anyone back."""
    ca = trustme.CA()
    issue(ca, tmp_path)
    server = await tls_server(nursery, tmp_path, relay=RelayConfig(write_timeout=0.5))
    url = https_url(server)
    a = await DerpClient.connect(url, cert_name=HOST, ssl_context=trusting(ca))
    b = await DerpClient.connect(url, cert_name=HOST, ssl_context=trusting(ca))
    stuck = await DerpClient.connect(url, cert_name=HOST, ssl_context=trusting(ca))  # never reads again
    async with a, b, stuck:
        sent = [i.to_bytes(4, "big") * 15_000 for i in range(40)]  # 60 kB packets
        got: list[bytes] = []

        async def receive() -> None:
            while len(got) < len(sent):
                got.append((await b.recv_packet()).data)

        async with trio.open_nursery() as inner:
            inner.start_soon(receive)
            with trio.fail_after(30):
                for i in range(0, len(sent), 8):
                    await a.send_many([(b.public_key, p) for p in sent[i : i + 8]])
                    await a.send_many([(stuck.public_key, b"z" * 60_000)] * 8)
        assert got == sent
        # Keep offering the stuck client data until its kernel buffers are full and the deadline hits.
        with trio.fail_after(30):
            for _ in range(400):
                if server.relay.stats.sclient_write_timeouts:
                    break
                await a.send_many([(stuck.public_key, b"z" * 60_000)] * 4)
                await relay_both_ways(a, b)  # everyone else is unaffected meanwhile
                await trio.sleep(0.01)
        assert server.relay.stats.sclient_write_timeouts == 1
        await relay_both_ways(a, b)


async def test_websocket_over_tls(nursery: trio.Nursery, tmp_path: Path) -> None:
    ca = trustme.CA()
    issue(ca, tmp_path)
    server = await tls_server(nursery, tmp_path)
    ws = await DerpClient.connect(https_url(server), cert_name=HOST, ssl_context=trusting(ca), websocket=True)
    plain = await DerpClient.connect(https_url(server), cert_name=HOST, ssl_context=trusting(ca))
    async with ws, plain:
        await relay_both_ways(ws, plain)


async def test_wrong_sni_is_refused(nursery: trio.Nursery, tmp_path: Path) -> None:
    ca = trustme.CA()
    issue(ca, tmp_path)
    ca.issue_cert("other.test")
    server = await tls_server(nursery, tmp_path)
    ctx = trusting(ca)
    ctx.check_hostname = False  # the client would accept; the server must still refuse the name
    with pytest.raises(ssl.SSLError):
        await DerpClient.connect(https_url(server), cert_name="other.test", ssl_context=ctx)
    await wait_for(lambda: server.tls_handshake_failures == 1, what="the refused handshake to be counted")


async def test_certificate_reload_keeps_live_connections(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="derpd")
    old_ca, new_ca = trustme.CA(), trustme.CA()
    issue(old_ca, tmp_path)
    server = await tls_server(nursery, tmp_path)
    a = await DerpClient.connect(https_url(server), cert_name=HOST, ssl_context=trusting(old_ca))
    b = await DerpClient.connect(https_url(server), cert_name=HOST, ssl_context=trusting(old_ca))
    async with a, b:
        await relay_both_ways(a, b)
        issue(new_ca, tmp_path)
        server.reload()
        await relay_both_ways(a, b, b"still here after the reload")  # nothing dropped
        with pytest.raises(ssl.SSLCertVerificationError):
            await DerpClient.connect(https_url(server), cert_name=HOST, ssl_context=trusting(old_ca))
        c = await DerpClient.connect(https_url(server), cert_name=HOST, ssl_context=trusting(new_ca))
        async with c:
            await relay_both_ways(a, c)
        # A broken certificate keeps the current one and says why.
        (tmp_path / f"{HOST}.crt").write_text("not a certificate")
        server.reload()
        d = await DerpClient.connect(https_url(server), cert_name=HOST, ssl_context=trusting(new_ca))
        async with d:
            await relay_both_ways(a, d)
    await wait_for(lambda: server.relay.stats.current_connections == 0, what="clients to leave")
    assert any("reload" in r.getMessage() and r.levelno >= logging.WARNING for r in caplog.records)


async def test_self_signed_ip_certificate_and_pin(nursery: trio.Nursery, tmp_path: Path) -> None:
    server = await tls_server(nursery, tmp_path / "certs", hostname="127.0.0.1")
    store = server.tls
    assert store is not None and store.generated and store.pin is not None
    assert store.pin == cert_name_pin(store.leaf_der)  # type: ignore[arg-type]
    assert (tmp_path / "certs" / "127.0.0.1.key").stat().st_mode & 0o777 == 0o600
    a = await DerpClient.connect(https_url(server), cert_name=store.pin)
    b = await DerpClient.connect(https_url(server), cert_name=store.pin)
    async with a, b:
        await relay_both_ways(a, b)
    with pytest.raises(ssl.SSLError):
        await DerpClient.connect(https_url(server), cert_name="sha256-raw:" + "00" * 32)


async def test_port_80_listener(nursery: trio.Nursery, tmp_path: Path) -> None:
    ca = trustme.CA()
    issue(ca, tmp_path)
    server = await tls_server(nursery, tmp_path, http_port=0)
    port = server.http_addrs[0][1]

    async def get(req: bytes) -> bytes:
        s = await trio.open_tcp_stream("127.0.0.1", port)
        await s.send_all(req)
        data = b""
        with trio.fail_after(5):
            while chunk := await s.receive_some(4096):
                data += chunk
        await s.aclose()
        return data

    r = await get(b"GET /generate_204 HTTP/1.1\r\nHost: x\r\nX-Tailscale-Challenge: ts_1\r\nConnection: close\r\n\r\n")
    assert r.startswith(b"HTTP/1.1 204 ") and b"X-Tailscale-Response: response ts_1" in r
    r = await get(b"GET /derp/probe?x=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert r.startswith(b"HTTP/1.1 302 ") and b"Location: https://derp.test/derp/probe?x=1\r\n" in r
    r = await get(b"POST /derp HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    assert r.startswith(b"HTTP/1.1 400 ") and r.endswith(b"Use HTTPS\n")


# --- admission ---------------------------------------------------------------------------------


async def expect_refused_after_client_info(server: DerpServer, key: NodePrivate) -> None:
    """A refused client sees ServerKey and then the connection closing: no ServerInfo."""
    s = await trio.open_tcp_stream("127.0.0.1", server.port)
    await s.send_all(
        b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\n\r\n"
        + client_info_frame(key, server.key.public, ClientInfo(version=2))
    )
    data = b""
    with trio.fail_after(5):
        while chunk := await s.receive_some(4096):
            data += chunk
    await s.aclose()
    reader = FrameReader()
    reader.feed(data[data.index(b"\r\n\r\n") + 4 :])
    assert [t for t, _ in reader.read_frames()] == [FrameType.SERVER_KEY]


async def test_admission_with_a_verify_server(nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="derpd")
    verify = await start_verify_server(nursery)
    good, bad = NodePrivate.generate(), NodePrivate.generate()
    verify.allow(good.public)
    server = await start_server(nursery, admission=Admission(verify_url=verify.url))
    a = await DerpClient.connect(url_of(server), good)
    async with a:
        await expect_refused_after_client_info(server, bad)
        assert bad.public not in server.relay.keys
        # Nobody can reach the refused key, and it reached nobody.
        await a.send(bad.public, b"to the refused key")
        await a.ping()
        assert server.relay.stats.dropped("unknown_dest") == 1
    sources = {json.loads(r.body)["Source"] for r in verify.requests}
    assert sources == {"127.0.0.1"}
    assert server.relay.stats.admission_rejected == 1
    rejected = [r for r in caplog.records if r.getMessage() == "client_rejected"]
    # Sampled (anyone can send refused keys as often as they like): the first one is at info at once.
    assert rejected and rejected[0].fields["last_key"] == "nodekey:" + bad.public.hex()  # type: ignore[attr-defined]
    assert rejected[0].fields["count"] == 1  # type: ignore[attr-defined]


async def black_hole(nursery: trio.Nursery) -> str:
    """A webhook that accepts TCP and never answers (nor reads): the verify URL of a hung control plane."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    held: list[trio.SocketStream] = []

    async def accept_forever() -> None:
        async with listener:
            while True:
                held.append(await listener.accept())

    nursery.start_soon(accept_forever)
    return f"http://127.0.0.1:{listener.socket.getsockname()[1]}/verify"


@pytest.mark.parametrize("fail_open", [True, False])
async def test_a_hung_webhook_under_a_login_flood_stalls_no_login(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, fail_open: bool
) -> None:
    """200 random-key logins from one address against a webhook that never answers: a login from
    another address gets its answer within the webhook timeout (plus a margin), fail-open (admitted)
    and fail-closed (refused). Before the fix it queued behind the flood: 34 s at a 5 s timeout."""
    caplog.set_level(logging.INFO, logger="derpd")
    timeout = 1.0
    admission = Admission(verify_url=await black_hole(nursery), fail_open=fail_open, timeout=timeout)
    server = await start_server(nursery, admission=admission)
    url = url_of(server)
    flood_done = trio.Event()
    flooders: list[DerpClient] = []

    async def flood_login() -> None:
        with trio.move_on_after(30):
            try:
                flooders.append(await DerpClient.connect(url))
            except (ConnectionLost, OSError, trio.BrokenResourceError):
                pass  # refused (fail-closed)

    async def flood() -> None:
        async with trio.open_nursery() as n:
            for _ in range(200):
                n.start_soon(flood_login)
        flood_done.set()

    nursery.start_soon(flood)
    await wait_for(lambda: admission.stats.overflow_source_busy > 0, 10, "the flood to fill its share of slots")
    start = trio.current_time()
    legit = NodePrivate.generate()
    if fail_open:
        with trio.fail_after(10):
            client = await DerpClient.connect(url, legit, local_address="127.0.0.2")
        await client.aclose()
    else:
        with pytest.raises(ConnectionLost), trio.fail_after(10):
            await DerpClient.connect(url, legit, local_address="127.0.0.2")
    took = trio.current_time() - start
    assert took < timeout + 2.0, f"a login waited {took:.1f}s behind the flood"
    with trio.fail_after(20):
        await flood_done.wait()
    for c in flooders:
        await c.aclose()
    st = admission.stats
    assert st.requests <= 200 and st.overflow_source_busy + st.overflow_slots_full > 0
    assert st.error == 200 + 1 and (st.allowed, st.denied) == (0, 0)
    overflow_lines = [r for r in caplog.records if r.getMessage() == "admission_verify_overflow"]
    assert overflow_lines and overflow_lines[0].levelno == logging.INFO  # sampled: one info line per interval
    assert len([r for r in overflow_lines if r.levelno == logging.INFO]) <= 2


async def test_allowlist_and_mesh_peers(nursery: trio.Nursery, tmp_path: Path) -> None:
    good = NodePrivate.generate()
    allow = tmp_path / "allow"
    allow.write_text(f"# our tailnet\nnodekey:{good.public.hex()}\n")
    admission = Admission(allow_keys_file=str(allow))
    admission.load()
    mesh_key = os.urandom(32)
    server = await start_server(nursery, admission=admission, mesh_key=mesh_key)
    a = await DerpClient.connect(url_of(server), good)
    peer = await DerpClient.connect(url_of(server), mesh_key=mesh_key)  # not in the list, but a mesh peer
    async with a, peer:
        stranger = NodePrivate.generate()
        await expect_refused_after_client_info(server, stranger)
        allow.write_text(f"nodekey:{good.public.hex()}\nnodekey:{stranger.public.hex()}\n")
        server.reload()
        late = await DerpClient.connect(url_of(server), stranger)
        async with late:
            await relay_both_ways(a, late)


# --- limits ------------------------------------------------------------------------------------


async def test_accept_burst_is_enforced(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, accept_limit=0.001, accept_burst=2)
    clients = [await DerpClient.connect(url_of(server)) for _ in range(2)]
    with pytest.raises((ConnectionLost, OSError, trio.BrokenResourceError)), trio.fail_after(5):
        await DerpClient.connect(url_of(server))
    assert (server.accept_limiter.accepted, server.accept_limiter.rejected) == (2, 1)
    for c in clients:
        await c.ping()
        await c.aclose()


async def test_per_ip_cap(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, max_conns_per_ip=2)
    a = await DerpClient.connect(url_of(server))
    b = await DerpClient.connect(url_of(server))
    with pytest.raises((ConnectionLost, OSError, trio.BrokenResourceError)), trio.fail_after(5):
        await DerpClient.connect(url_of(server))
    await a.aclose()
    await wait_for(lambda: server.per_ip.active.get("127.0.0.1") == 1, what="the slot to be released")
    c = await DerpClient.connect(url_of(server))
    async with b, c:
        await relay_both_ways(b, c)


async def test_rate_config_throttles_one_sender_not_another(nursery: trio.Nursery, tmp_path: Path) -> None:
    rate = RateConfig(bytes_per_second=200_000, burst_bytes=70_000)
    path = tmp_path / "rate.json"
    path.write_text('{"PerClientRateLimitBytesPerSec": 200000, "PerClientRateBurstBytes": 70000}')
    server = await start_server(nursery, relay=RelayConfig(rate=rate), rate_config_path=str(path))
    url = url_of(server)
    heavy, light, sink_h, sink_l = [await DerpClient.connect(url) for _ in range(4)]
    assert heavy.server_info.token_bucket_bytes_per_second == 200_000
    assert heavy.server_info.token_bucket_bytes_burst == 70_000
    n = 12
    order: list[str] = []

    async def drain(sink: DerpClient, count: int, name: str) -> None:
        for _ in range(count):
            await sink.recv_packet()
        order.append(name)

    async with trio.open_nursery() as inner:
        inner.start_soon(drain, sink_h, n, "heavy")
        inner.start_soon(drain, sink_l, 5, "light")
        with trio.fail_after(30):
            await heavy.send_many([(sink_h.public_key, b"h" * 60_000)] * n)  # 720 kB at 200 kB/s
            await trio.lowlevel.checkpoint()
            for _ in range(5):
                await light.send(sink_l.public_key, b"small")
    assert order == ["light", "heavy"]  # the light sender was never held behind the heavy one
    assert server.relay.stats.rate_limit_waited > 0
    assert server.relay.stats.dropped("queue_head") == 0  # delayed reads, no drops
    path.write_text('{"PerClientRateLimitBytesPerSec": 0}')
    server.reload()
    assert not server.relay.config.rate.enabled and all(
        c.bucket is None for e in server.relay.keys.values() for c in e.conns
    )
    for c in (heavy, light, sink_h, sink_l):
        await c.aclose()


async def test_tcp_options_on_accepted_sockets() -> None:
    server = DerpServer(NodePrivate.generate(), ServerSettings())
    with socket.socket() as s:
        server._tune(s)
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 600
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 15_000


# --- PROXY protocol ------------------------------------------------------------------------------


async def proxied_login(port: int, header: bytes, server_pub: bytes) -> trio.SocketStream:
    s = await trio.open_tcp_stream("127.0.0.1", port)
    await s.send_all(
        header
        + b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\n\r\n"
        + client_info_frame(NodePrivate.generate(), server_pub, ClientInfo(version=2))
    )
    return s


@pytest.mark.parametrize("encode", [encode_v1, encode_v2], ids=["v1", "v2"])
async def test_proxy_protocol_from_a_trusted_proxy(nursery: trio.Nursery, encode: object) -> None:
    mesh_key = os.urandom(32)
    server = await start_server(
        nursery, mesh_key=mesh_key, proxy_protocol=True, trusted_proxies=parse_trusted("127.0.0.0/8")
    )
    header = encode(("203.0.113.7", 4242), ("192.0.2.1", 443))  # type: ignore[operator]
    s = await proxied_login(server.port, header, server.key.public)
    await wait_for(lambda: server.relay.stats.current_connections == 1, what="the proxied client")
    conn = next(iter(server.relay.clients.values()))
    assert conn.remote == ("203.0.113.7", 4242)  # admission, per-IP limits and PeerPresent see this
    assert server.per_ip.active == {"203.0.113.7": 1}
    await s.aclose()


async def test_proxy_protocol_refuses_untrusted_and_garbage(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="derpd")
    server = await start_server(nursery, proxy_protocol=True, trusted_proxies=parse_trusted("10.0.0.0/8"))
    s = await proxied_login(server.port, encode_v1(("203.0.113.7", 1), ("192.0.2.1", 443)), server.key.public)
    with trio.fail_after(5):
        assert await s.receive_some(4096) == b""  # 127.0.0.1 is not a trusted proxy: dropped unread
    await s.aclose()
    trusted = await start_server(nursery, proxy_protocol=True, trusted_proxies=parse_trusted("127.0.0.1"))
    s = await trio.open_tcp_stream("127.0.0.1", trusted.port)
    await s.send_all(b"GET /derp HTTP/1.1\r\nHost: x\r\n\r\n")  # no PROXY header at all
    with trio.fail_after(5):
        assert await s.receive_some(4096) == b""
    await s.aclose()
    assert [r for r in caplog.records if r.getMessage() == "proxy_header_refused"]
    assert trusted.relay.stats.accepts == 0
    assert (server.proxy_refused, trusted.proxy_refused) == (1, 1)


async def test_proxied_address_reaches_peer_present(nursery: trio.Nursery) -> None:
    mesh_key = os.urandom(32)
    server = await start_server(
        nursery, mesh_key=mesh_key, proxy_protocol=True, trusted_proxies=parse_trusted("127.0.0.1")
    )
    # A trusted local probe (LOCAL command) keeps the proxy's own address: the mesh watcher.
    watcher_sock = await trio.open_tcp_stream("127.0.0.1", server.port)
    watcher_key = NodePrivate.generate()
    await watcher_sock.send_all(
        encode_v2(None, None, command="LOCAL")
        + b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\n\r\n"
        + client_info_frame(watcher_key, server.key.public, ClientInfo(version=2, mesh_key=mesh_key))
        + bytes([FrameType.WATCH_CONNS, 0, 0, 0, 0])
    )
    client = await proxied_login(server.port, encode_v2(("2001:db8::7", 5555), ("2001:db8::1", 443)), server.key.public)
    reader = FrameReader()
    seen = {}
    with trio.fail_after(5):
        data = b""
        while b"\r\n\r\n" not in data:
            data += await watcher_sock.receive_some(4096)
        reader.feed(data[data.index(b"\r\n\r\n") + 4 :])
        while len(seen) < 2:
            for ftype, payload in reader.read_frames():
                if ftype == FrameType.PEER_PRESENT:
                    msg = decode_message(ftype, payload)
                    assert isinstance(msg, PeerPresentMessage)
                    seen[msg.present.key] = msg.present
            if len(seen) < 2:
                reader.feed(await watcher_sock.receive_some(4096))
    others = [p for k, p in seen.items() if k != watcher_key.public]
    assert len(others) == 1
    assert (socket.inet_ntop(socket.AF_INET6, others[0].ip16), others[0].port) == ("2001:db8::7", 5555)
    await client.aclose()
    await watcher_sock.aclose()


def test_cli_refuses_inconsistent_edge_flags(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "derpd", "serve", "--dev", "--stun-port", "-1", *args],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )

    for args, message in [
        (["--certmode", "manual"], "needs --hostname"),
        (["--certmode", "manual", "--hostname", "derp.test"], "derp.test.crt"),
        (["--proxy-protocol"], "needs --trusted-proxies"),
        (["--trusted-proxies", "10.0.0.1/8"], "host bits"),
        (["--verify-client-url", "ftp://x/verify"], "verify"),
        (["--allow-keys", str(tmp_path / "missing")], "missing"),
        (["--rate-config", str(tmp_path / "missing.json")], "rate config"),
        (["--tcp-user-timeout", "soon"], "duration"),
    ]:
        out = run(*args)
        assert out.returncode == 2, (args, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("derpd: error: ") and message in lines[0], (args, lines)
    shutil.rmtree(tmp_path / ".derpd", ignore_errors=True)
