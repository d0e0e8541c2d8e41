"""The regional mesh: derpd nodes watching each other and forwarding one hop."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import trio
from hypothesis import example, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from derpd.net.client import DerpClient, PeerGoneMessage, PeerPresentMessage, ReceivedPacket
from derpd.net.transport import SocketTransport
from derpd.ops.metrics import registry_for, render
from derpd.proto.connection import NEED_DATA, DerpConnection, Role, ServerHello
from derpd.proto.frames import (
    DISCO_MAGIC,
    ClientInfo,
    FrameReader,
    FrameType,
    PeerGoneReason,
    ServerInfo,
    parse_forward_packet,
    peer_present_frame,
    server_info_frame,
    server_key_frame,
)
from derpd.proto.keys import NodePrivate, parse_public_key
from derpd.server.mesh import LINK_QUEUE_DEPTH, MeshError, MeshLink, MeshTarget, keep_link, parse_targets
from derpd.server.node import DerpServer

from .conftest import load_vector, send_until_delivered, start_server, url_of, wait_for

MESH_KEY = os.urandom(32)


class Node:
    """One derpd and its mesh links in their own cancel scope, so a test can kill the node
    and start it again (as a process restart would, with the same --mesh-with peers)."""

    def __init__(self, nursery: trio.Nursery, name: str) -> None:
        self.nursery = nursery
        self.name = name
        self.key = NodePrivate.generate()
        self.server: DerpServer | None = None
        self.scope: trio.CancelScope | None = None
        self.inner: trio.Nursery | None = None
        self.port = 0

    async def start(self) -> DerpServer:
        async def run(task_status: trio.TaskStatus[DerpServer] = trio.TASK_STATUS_IGNORED) -> None:
            with trio.CancelScope() as scope:
                self.scope = scope
                async with trio.open_nursery() as inner:
                    self.inner = inner
                    server = await start_server(inner, self.key, mesh_key=MESH_KEY, addr=("127.0.0.1", self.port))
                    task_status.started(server)
                    await trio.sleep_forever()

        self.server = await self.nursery.start(run)
        self.port = self.server.port
        return self.server

    def link_to(self, other: Node) -> None:
        assert self.inner is not None
        target = MeshTarget(other.name, other.url)
        self.inner.start_soon(partial(keep_link, self.relay, target, client_key=self.key, mesh_key=MESH_KEY))

    def kill(self) -> None:
        assert self.scope is not None
        self.scope.cancel()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/derp"

    @property
    def relay(self):  # type: ignore[no-untyped-def]
        assert self.server is not None
        return self.server.relay


async def full_mesh(nodes: list[Node]) -> None:
    for a in nodes:
        for b in nodes:
            if a is not b:
                a.link_to(b)
    await wait_for(
        lambda: (
            all(all(link is not None for link in n.relay.mesh_links.values()) for n in nodes)
            and all(len(n.relay.mesh_links) == len(nodes) - 1 for n in nodes)
        ),
        timeout=15,
        what="every link up",
    )


async def three_nodes(nursery: trio.Nursery) -> tuple[Node, Node, Node]:
    a, b, c = (Node(nursery, n) for n in "abc")
    for n in (a, b, c):
        await n.start()
    await full_mesh([a, b, c])
    return a, b, c


async def recv_data(c: DerpClient) -> ReceivedPacket:
    with trio.fail_after(10):
        return await c.recv_packet()


async def recv_gone(c: DerpClient) -> PeerGoneMessage:
    with trio.fail_after(15):
        while True:
            m = await c.recv()
            if isinstance(m, PeerGoneMessage):
                return m


def knows(node: Node, *clients: DerpClient) -> bool:
    return all(c.public_key in node.relay.forwarders or c.public_key in node.relay.clients for c in clients)


async def test_three_nodes_relay_across_the_mesh(nursery: trio.Nursery) -> None:
    a, b, c = await three_nodes(nursery)
    ca = await DerpClient.connect(a.url)
    cb = await DerpClient.connect(b.url)
    cc = await DerpClient.connect(c.url)
    everyone = (ca, cb, cc)
    await wait_for(lambda: all(knows(n, *everyone) for n in (a, b, c)), timeout=15, what="routes everywhere")

    for src, dst in ((ca, cb), (cb, cc), (cc, ca), (cb, ca), (ca, cc), (cc, cb)):
        payload = os.urandom(1200)
        await src.send(dst.public_key, payload)
        got = await recv_data(dst)
        assert (got.src, got.data) == (src.public_key, payload)
    assert sum(n.relay.stats.packets_forwarded_out for n in (a, b, c)) == 6
    assert sum(n.relay.stats.packets_forwarded_in for n in (a, b, c)) == 6
    # What an operator sees: each node's /metrics text, as Prometheus would parse it.
    for n in (a, b, c):
        assert n.server is not None
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(render(registry_for(n.server).collect()).decode())
            for s in family.samples
        }
        for peer in {"a", "b", "c"} - {n.name}:
            assert samples[("derp_mesh_peer_up", (("peer", peer),))] == 1
        assert samples[("derp_watchers", ())] == 2  # the other two nodes' links
        assert samples[("derp_clients_local", ())] == 1 + 2  # its client and the two peers' links
        assert samples[("derp_clients_remote", ())] == 2  # the clients of the other two nodes
        assert samples[("derp_packets_forwarded_out_total", ())] == 2  # one to each other node's client
        assert samples[("derp_packets_forwarded_in_total", ())] == 2

    # cb leaves node B: only those that received from cb (ca and cc) hear PeerGone.
    await cb.aclose()
    for receiver in (ca, cc):
        assert await recv_gone(receiver) == PeerGoneMessage(cb.public_key, PeerGoneReason.DISCONNECTED)
    await wait_for(lambda: all(cb.public_key not in n.relay.forwarders for n in (a, c)), what="routes to cb gone")
    for cl in (ca, cc):
        await cl.aclose()


async def test_bursts_cross_the_mesh_whole_and_in_order(nursery: trio.Nursery) -> None:
    """Many SendPackets in one write to a client on another node: the sending node forwards
    them as one piece per run, the receiving node delivers them as one; nothing is lost,
    reordered or mislabelled, sizes change within runs, and every packet is counted once."""
    a, b = Node(nursery, "a"), Node(nursery, "b")
    for n in (a, b):
        await n.start()
    await full_mesh([a, b])
    ca = await DerpClient.connect(a.url)
    cb = await DerpClient.connect(b.url)
    cc = await DerpClient.connect(b.url)
    await wait_for(lambda: all(knows(n, ca, cb, cc) for n in (a, b)), timeout=15, what="routes everywhere")
    sent: dict[bytes, list[bytes]] = {cb.public_key: [], cc.public_key: []}
    batch = []
    for i in range(300):
        dst = cc.public_key if i % 40 >= 30 else cb.public_key
        pkt = i.to_bytes(2, "big") + os.urandom(1200 if i % 7 else 100 + i)
        batch.append((dst, pkt))
        sent[dst].append(pkt)
    await ca.send_many(batch)
    for c in (cb, cc):
        got = [await recv_data(c) for _ in sent[c.public_key]]
        assert all(g.src == ca.public_key for g in got)
        assert [g.data for g in got] == sent[c.public_key]
    assert a.relay.stats.packets_forwarded_out == 300
    assert b.relay.stats.packets_forwarded_in == 300
    assert b.relay.stats.packets_sent == 300
    for cl in (ca, cb, cc):
        await cl.aclose()


async def test_killed_node_comes_back_and_routes_are_rebuilt(nursery: trio.Nursery) -> None:
    a, b, c = await three_nodes(nursery)
    ca = await DerpClient.connect(a.url)
    cc = await DerpClient.connect(c.url)
    await wait_for(lambda: knows(a, cc) and knows(c, ca), timeout=15, what="routes")
    await cc.send(ca.public_key, b"before")
    assert (await recv_data(ca)).data == b"before"

    c.kill()  # node C dies with its client: A's receiver hears the key is gone from the region
    assert await recv_gone(ca) == PeerGoneMessage(cc.public_key, PeerGoneReason.DISCONNECTED)
    await wait_for(lambda: a.relay.mesh_links.get("c", 1) is None, what="A to notice C is down")

    await c.start()  # same port, same key: A and B reconnect, the flood rebuilds their routes
    c.link_to(a)
    c.link_to(b)
    cc2 = await DerpClient.connect(c.url)
    await wait_for(lambda: knows(a, cc2) and knows(c, ca), timeout=30, what="routes rebuilt")
    await cc2.send(ca.public_key, b"after")
    got = await recv_data(ca)
    assert (got.src, got.data) == (cc2.public_key, b"after")
    for cl in (ca, cc, cc2):
        await cl.aclose()


async def test_client_moving_between_nodes_keeps_receiving(nursery: trio.Nursery) -> None:
    a, b, c = await three_nodes(nursery)
    mover_key = NodePrivate.generate()
    on_a = await DerpClient.connect(a.url, mover_key)
    sender = await DerpClient.connect(c.url)
    await wait_for(lambda: knows(c, on_a), timeout=15, what="C to learn the mover")
    await sender.send(mover_key.public, b"1")
    assert (await recv_data(on_a)).data == b"1"
    on_b = await DerpClient.connect(b.url, mover_key)  # roams to B, then leaves A
    await wait_for(lambda: len(c.relay.forwarders.get(mover_key.public, [])) == 2, what="C to see it on both")
    await on_a.aclose()
    await wait_for(
        lambda: [link.name for link in c.relay.forwarders.get(mover_key.public, [])] == ["b"],  # type: ignore[attr-defined]
        what="only B left",
    )
    await sender.send(mover_key.public, b"2")
    assert (await recv_data(on_b)).data == b"2"
    await on_b.aclose()
    await sender.aclose()


async def test_recorded_watcher_stream_builds_routes(nursery: trio.Nursery) -> None:
    """derpd as the watcher, fed what Go's derper sent its watcher in the recorded session."""
    session = load_vector("derp-session-mesh.json")
    rec = next(c for c in session["connections"] if c["role"] == "watcher")
    s2c = b"".join(bytes.fromhex(ch["hex"]) for ch in rec["chunks"] if ch["d"] == "s2c" and "hex" in ch)
    frames = rec["frames"]["s2c"]
    after_login = frames[2]["offset"]  # past the 101, ServerKey and ServerInfo
    server = await start_server(nursery)
    ours, theirs = socket.socketpair()
    link = MeshLink(server.relay, SocketTransport(ours), logged_in(), "recorded")
    theirs.sendall(s2c[after_login:])
    theirs.shutdown(socket.SHUT_WR)
    with trio.fail_after(5):
        await link.run()  # reads to the end of the recording
    present = [parse_public_key(f["peer_key"]) for f in frames if f["name"] == "PeerPresent"]
    gone = [parse_public_key(f["peer_key"]) for f in frames if f["name"] == "PeerGone"]
    assert len(present) == 5 and len(gone) == 2  # A, B, the watcher itself; then C and D
    assert set(server.relay.forwarders) == set(present) - set(gone)  # C and D came and went
    server.relay.remove_link(link)  # the link broke: every route through it goes
    assert not server.relay.forwarders
    theirs.close()
    await link.conn.transport.aclose()


async def test_a_link_that_is_behind_keeps_order_and_drops_the_oldest(nursery: trio.Nursery) -> None:
    """A peer that stops reading: runs queue on its link up to LINK_QUEUE_DEPTH packets, then one
    by one with the oldest dropped and counted. What the peer reads afterwards is every packet
    that was not dropped, whole and in the order routed."""
    server = await start_server(nursery)
    ours, theirs = socket.socketpair()
    for s in (ours, theirs):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    link = MeshLink(server.relay, SocketTransport(ours), logged_in(), "slow peer")
    far = NodePrivate.generate().public
    theirs.sendall(peer_present_frame(far, bytes(16), 0, 0))
    nursery.start_soon(link.run)
    await wait_for(lambda: far in server.relay.forwarders, what="the peer's client")
    sender = await DerpClient.connect(url_of(server))
    total, pad = 3 * LINK_QUEUE_DEPTH, b"p" * 200
    for first in range(0, total, 64):
        await sender.send_many([(far, i.to_bytes(4, "big") + pad) for i in range(first, first + 64)])
    await sender.ping()  # every packet routed
    st = server.relay.stats
    dropped = st.dropped_packets[("queue_head", "other")]
    assert dropped > 0 and st.packets_forwarded_out == total
    reader = FrameReader()
    peer = trio.socket.from_stdlib_socket(theirs)
    disco_at = len(DISCO_MAGIC) + 56  # the sequence number, after the magic, key and nonce

    async def read_seqs(count: int) -> list[int]:
        seqs: list[int] = []
        with trio.fail_after(20):
            while len(seqs) < count:
                reader.feed(await peer.recv(1 << 16))
                for ftype, payload in reader.read_frames():
                    if ftype == FrameType.FORWARD_PACKET:
                        src, dst, pkt = parse_forward_packet(payload)
                        assert (src, dst) == (sender.public_key, far)
                        at = disco_at if pkt.startswith(DISCO_MAGIC) else 0
                        assert pkt[at + 4 :] == pad
                        seqs.append(int.from_bytes(pkt[at : at + 4], "big"))
        return seqs

    seqs = await read_seqs(total - dropped)
    assert seqs == sorted(seqs) and len(set(seqs)) == total - dropped
    assert seqs[-1] == total - 1  # the newest are kept

    # A disco packet waiting one by one (the link's writer busy): the runs after it wait behind it.
    await sender.send_many([(far, i.to_bytes(4, "big") + pad) for i in range(64)])
    await sender.send(far, DISCO_MAGIC + bytes(56) + (64).to_bytes(4, "big") + pad)
    await sender.send_many([(far, i.to_bytes(4, "big") + pad) for i in range(65, 129)])
    assert await read_seqs(129) == list(range(129))
    assert st.dropped_packets[("queue_head", "other")] == dropped
    await sender.aclose()
    theirs.close()


def logged_in() -> DerpConnection:
    """A client-role connection past its login with a made-up peer (the recording's watcher key
    is not in the vector, so its own login cannot be replayed)."""
    peer, me = NodePrivate.generate(), NodePrivate.generate()
    derp = DerpConnection(Role.CLIENT, me, client_info=ClientInfo(version=2))
    derp.receive_data(server_key_frame(peer.public))
    assert derp.next_event() is NEED_DATA
    assert derp.data_to_send()  # ClientInfo
    derp.receive_data(server_info_frame(peer, me.public, ServerInfo()))
    assert derp.next_event() == ServerHello(peer.public, ServerInfo())
    return derp


def test_mesh_with_parsing() -> None:
    t = parse_targets("derp1.example.com, derp2.example.com/10.0.0.2 ,https://x.example/derp,unix:/run/w.sock",
                      tls=True, default_port=443)  # fmt: skip
    assert [x.url for x in t] == [
        "https://derp1.example.com/derp",
        "https://derp2.example.com/derp",
        "https://x.example/derp",
        "http://localhost/derp",
    ]
    assert t[1].dial == ("10.0.0.2", 443) and t[3].dial == "/run/w.sock"
    assert parse_targets("10.0.0.1", tls=False, default_port=3340)[0].url == "http://10.0.0.1:3340/derp"
    for bad in ("a,a", "unix:relative", "http://"):
        with pytest.raises(MeshError):
            parse_targets(bad, tls=True, default_port=443)


# Every form of derper's -mesh-with (cmd/derper/mesh.go: "https://" + host + "/derp", dialhost on the
# URL's port) and derpd's extras: item -> (URL, dial) with TLS, and without TLS on our port 3340.
MESH_FORMS: list[tuple[str, tuple[str, object], tuple[str, object]]] = [
    ("derp1.example.com", ("https://derp1.example.com/derp", None), ("http://derp1.example.com:3340/derp", None)),
    ("localhost:8443", ("https://localhost:8443/derp", None), ("http://localhost:8443/derp", None)),
    ("derp1.example.com:443", ("https://derp1.example.com/derp", None), ("http://derp1.example.com:443/derp", None)),
    ("203.0.113.5", ("https://203.0.113.5/derp", None), ("http://203.0.113.5:3340/derp", None)),
    ("203.0.113.5:8443", ("https://203.0.113.5:8443/derp", None), ("http://203.0.113.5:8443/derp", None)),
    ("[::1]:8443", ("https://[::1]:8443/derp", None), ("http://[::1]:8443/derp", None)),
    ("[2001:db8::5]", ("https://[2001:db8::5]/derp", None), ("http://[2001:db8::5]:3340/derp", None)),
    ("2001:db8::5", ("https://[2001:db8::5]/derp", None), ("http://[2001:db8::5]:3340/derp", None)),  # bare IPv6
    ("::1", ("https://[::1]/derp", None), ("http://[::1]:3340/derp", None)),
    (
        "derp1.example.com/10.0.0.5",
        ("https://derp1.example.com/derp", ("10.0.0.5", 443)),
        ("http://derp1.example.com:3340/derp", ("10.0.0.5", 3340)),
    ),
    (
        "derp1.example.com:443/10.0.0.5",
        ("https://derp1.example.com/derp", ("10.0.0.5", 443)),
        ("http://derp1.example.com:443/derp", ("10.0.0.5", 443)),
    ),
    (
        "derp1.example.com:8443/fd00::5",  # derper joins dialhost and port: a bare IPv6 dialhost
        ("https://derp1.example.com:8443/derp", ("fd00::5", 8443)),
        ("http://derp1.example.com:8443/derp", ("fd00::5", 8443)),
    ),
    (
        "[2001:db8::5]:8443/[fd00::5]",
        ("https://[2001:db8::5]:8443/derp", ("fd00::5", 8443)),
        ("http://[2001:db8::5]:8443/derp", ("fd00::5", 8443)),
    ),
    (
        "derp1.example.com/10.0.0.5:9443",  # derpd's extra: the dialhost's own port
        ("https://derp1.example.com/derp", ("10.0.0.5", 9443)),
        ("http://derp1.example.com:3340/derp", ("10.0.0.5", 9443)),
    ),
    ("derp1.example.com.", ("https://derp1.example.com./derp", None), ("http://derp1.example.com.:3340/derp", None)),
    ("https://derp1.example.com", ("https://derp1.example.com/derp", None), ("https://derp1.example.com/derp", None)),
    ("http://127.0.0.1:3340/derp", ("http://127.0.0.1:3340/derp", None), ("http://127.0.0.1:3340/derp", None)),
    ("https://[::1]:8443/derp", ("https://[::1]:8443/derp", None), ("https://[::1]:8443/derp", None)),
    (
        "unix:/run/derpd/w1.sock",
        ("http://localhost/derp", "/run/derpd/w1.sock"),
        ("http://localhost/derp", "/run/derpd/w1.sock"),
    ),
]


@pytest.mark.parametrize(("item", "with_tls", "without_tls"), MESH_FORMS)
def test_mesh_with_accepts_derpers_forms(
    item: str, with_tls: tuple[str, object], without_tls: tuple[str, object]
) -> None:
    for tls, (url, dial) in ((True, with_tls), (False, without_tls)):
        (target,) = parse_targets(f" {item} ,", tls=tls, default_port=3340)
        assert (target.name, target.url, target.dial) == (item, url, dial), tls
        parts = urlsplit(target.url)  # as the client splits it
        assert parts.scheme in ("http", "https") and parts.hostname and parts.path == "/derp"


@pytest.mark.parametrize(
    ("item", "words"),
    [
        ("derp1.example.com:", "empty port"),
        ("derp1.example.com:0", "not a port number"),
        ("derp1.example.com:65536", "not a port number"),
        ("derp1.example.com:https", "not a port number"),
        ("derp1.example.com:+443", "not a port number"),
        ("a/b/c", "more than one '/'"),
        ("derp1.example.com:443/10.0.0.5/x", "more than one '/'"),
        ("/10.0.0.5", "empty host"),
        ("derp1.example.com/", "empty dialhost"),
        (":443", "empty host"),
        ("derp 1.example.com", "space"),
        ("derp1.exam\x7fple.com", "control character"),
        ("derp1\tderp2", "space"),
        ("2001:db8::5:8443:x", "[address]:port"),
        ("[2001:db8::5", "[IPv6 address]"),
        ("[203.0.113.5]:443", "brackets hold an IPv6 address"),
        ("[::1]x", "[IPv6 address]"),
        ("fe80::1%eth0", "zones"),
        ("1.2.3", "neither an IPv4 address"),
        ("derp..example.com", "not a host name"),
        ("-derp.example.com", "not a host name"),
        ("user@derp.example.com", "not a host name"),
        ("bücher.example", "xn--"),
        ("ftp://derp.example.com", "only http:// and https://"),
        ("https://", "empty host"),
        ("https://user@derp.example.com/derp", "no user, query or fragment"),
        ("https://derp.example.com/derp?x=1", "no user, query or fragment"),
        ("https://derp.example.com:99999/derp", "not a port number"),
        ("https://[::1]x/derp", "[IPv6 address]"),
        ("HTTP://::1/derp", "needs brackets"),
        ("unix:run/w.sock", "absolute path"),
    ],
)
def test_mesh_with_refuses_garbage_naming_the_item(item: str, words: str) -> None:
    with pytest.raises(MeshError) as e:
        parse_targets(f"derp9.example.com,{item}", tls=True, default_port=443)
    assert f"--mesh-with {item!r}" in str(e.value) and words in str(e.value)
    assert "\n" not in str(e.value)


def test_mesh_with_refuses_one_peer_twice() -> None:
    with pytest.raises(MeshError, match=r"'a\.example' twice"):
        parse_targets("a.example,b.example,a.example", tls=True, default_port=443)
    with pytest.raises(MeshError, match=re.escape("'a.example' and 'a.example:443' are both https://a.example/derp")):
        parse_targets("a.example,a.example:443", tls=True, default_port=443)
    # Without TLS a bare host means our own port, so a.example and a.example:443 are two peers.
    assert len(parse_targets("a.example,a.example:443", tls=False, default_port=3340)) == 2
    assert parse_targets(" , ,", tls=True, default_port=443) == []


_MESH_ALPHABET = st.sampled_from([*"ab1.:/[]%@-_ ,\t", "::1", "10.0.0.5", "https://", "http://", "unix:", "ü"])


@given(st.one_of(st.text(), st.lists(_MESH_ALPHABET, max_size=12).map("".join)), st.booleans())
@example("0.0.0.0]", False)  # a lone bracket once passed as an IP and built a URL urlsplit refuses
@example("[::1", True)
@settings(max_examples=1000, deadline=None)
def test_mesh_with_parse_raises_only_mesh_error(spec: str, tls: bool) -> None:
    try:
        targets = parse_targets(spec, tls=tls, default_port=3340)
    except MeshError as e:
        assert "\n" not in str(e)
        return
    for t in targets:
        if isinstance(t.dial, str):
            assert t.dial.startswith("/")
            continue
        parts = urlsplit(t.url)  # every URL we build is one the client can split
        assert parts.scheme in ("http", "https") and parts.hostname and 1 <= (parts.port or 443) <= 65535
        if t.dial is not None:
            assert t.dial[0] and 1 <= t.dial[1] <= 65535


async def test_two_nodes_mesh_with_the_host_port_form(nursery: trio.Nursery) -> None:
    """derper's `localhost:PORT` form, as `derpd serve --mesh-with` parses it, links two real nodes."""
    key_a, key_b = NodePrivate.generate(), NodePrivate.generate()
    b = await start_server(nursery, key_b, mesh_key=MESH_KEY)
    peers = parse_targets(f"localhost:{b.port}", tls=False, default_port=0)
    assert [(t.url, t.dial) for t in peers] == [(f"http://localhost:{b.port}/derp", None)]
    a = await start_server(nursery, key_a, mesh_key=MESH_KEY, mesh_with=peers)
    on_a = await DerpClient.connect(url_of(a))
    on_b = await DerpClient.connect(url_of(b))
    got = await send_until_delivered(on_a, on_b, b"via localhost:port")  # A forwards to B over the link
    assert got.src == on_a.public_key
    assert a.relay.mesh_links[f"localhost:{b.port}"] is not None
    assert a.relay.stats.packets_forwarded_out >= 1 and b.relay.stats.packets_forwarded_in >= 1
    await on_a.aclose()
    await on_b.aclose()


async def _spawn(tmp_path: Path, name: str, *args: str) -> tuple[trio.Process, int]:
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "derpd", "serve", "--addr", "127.0.0.1:0", "--stun-port", "-1", *args],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    buf = b""
    with trio.fail_after(20):
        while not (m := re.search(rb"event=serving derp=127\.0\.0\.1:(\d+)", buf)):
            chunk = await proc.stderr.receive_some(4096)
            assert chunk, buf.decode()
            buf += chunk
    return proc, int(m.group(1))


async def test_mesh_with_flag_between_two_processes(tmp_path: Path) -> None:
    """`derpd serve --mesh-with` end to end: B watches A and forwards to it."""
    psk = tmp_path / "mesh.key"
    psk.write_text(MESH_KEY.hex() + "\n")
    psk.chmod(0o600)
    a, port_a = await _spawn(tmp_path, "a", "--key-file", str(tmp_path / "a.key"), "--mesh-psk-file", str(psk))
    b, port_b = await _spawn(
        tmp_path, "b", "--key-file", str(tmp_path / "b.key"), "--mesh-psk-file", str(psk),
        "--mesh-with", f"http://127.0.0.1:{port_a}/derp",
    )  # fmt: skip
    try:
        on_a = await DerpClient.connect(f"http://127.0.0.1:{port_a}/derp")
        on_b = await DerpClient.connect(f"http://127.0.0.1:{port_b}/derp")
        await send_until_delivered(on_b, on_a, b"across processes")  # once B has A's PeerPresent flood
        await on_a.aclose()
        await on_b.aclose()
    finally:
        for p in (a, b):
            p.terminate()
            with trio.fail_after(20):
                await p.wait()


async def test_own_hostname_in_mesh_with_is_skipped(nursery: trio.Nursery) -> None:
    """One --mesh-with list for every node of a region: each node finds itself by key and skips it."""
    a, b = Node(nursery, "a"), Node(nursery, "b")
    await a.start()
    await b.start()
    with trio.fail_after(10):
        # keep_link returns (instead of retrying forever) once it sees its own server key.
        await keep_link(a.relay, MeshTarget("self", a.url), client_key=a.key, mesh_key=MESH_KEY)
    assert "self" not in a.relay.mesh_links
    a.link_to(b)
    await wait_for(lambda: a.relay.mesh_links.get("b") is not None, what="the real peer to link")
    assert list(a.relay.mesh_links) == ["b"]


async def test_sibling_workers_look_like_one_node(nursery: trio.Nursery, tmp_path: Path) -> None:
    """Two workers of one node (shared server key, internal mesh key, unix sockets), as
    `--workers 2` sets them up, watched by another node through worker 0 only."""
    node_key, internal_key = NodePrivate.generate(), os.urandom(32)
    socks = [str(tmp_path / f"w{i}.sock") for i in range(2)]
    workers = []
    for i in range(2):
        workers.append(
            await start_server(
                nursery, node_key, mesh_key=MESH_KEY, internal_mesh_key=internal_key,
                internal_socket=socks[i], internal_client_key=NodePrivate.generate(),
                internal_peers=[MeshTarget(f"worker-{1 - i}", "http://worker/derp", socks[1 - i])],
            )
        )  # fmt: skip
    w0, w1 = workers
    await wait_for(lambda: all(w.relay.mesh_links.get(f"worker-{1 - i}") for i, w in enumerate(workers)))
    watcher = await DerpClient.connect(url_of(w0), mesh_key=MESH_KEY)  # another node's view
    await watcher.watch_conns()

    async def next_presence() -> PeerPresentMessage | PeerGoneMessage:
        with trio.fail_after(10):
            while True:
                m = await watcher.recv()
                if isinstance(m, PeerPresentMessage) and m.present.key == watcher.public_key:
                    continue  # the flood includes the watcher itself, as derper's does
                if isinstance(m, PeerPresentMessage | PeerGoneMessage):
                    return m

    on_w1 = await DerpClient.connect(url_of(w1))
    m = await next_presence()  # a client of the sibling is announced to the other node
    assert isinstance(m, PeerPresentMessage) and m.present.key == on_w1.public_key
    # ... and the other node's ForwardPacket for it takes the internal hop.
    src = NodePrivate.generate().public
    await watcher.forward_packet(src, on_w1.public_key, b"via worker 0")
    got = await recv_data(on_w1)
    assert (got.src, got.data) == (src, b"via worker 0")

    # The same key also on worker 0, then gone from worker 0: still on the node, no PeerGone.
    again_on_w0 = await DerpClient.connect(url_of(w0), on_w1.key)
    await again_on_w0.aclose()
    await wait_for(lambda: on_w1.public_key not in w0.relay.keys)
    await on_w1.aclose()  # now gone from the whole node
    m = await next_presence()  # nothing in between: the local connect and leave were silent
    assert isinstance(m, PeerGoneMessage) and m.peer == on_w1.public_key
    assert w0.relay.sibling_present == {}
    await watcher.aclose()
