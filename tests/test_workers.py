"""`derpd serve --workers N`: processes sharing the ports, meshed, supervised."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from derpd.net.client import ConnectionLost, DerpClient, PeerGoneMessage
from derpd.ops.workers import WorkerError, worker_count
from derpd.proto.frames import PeerGoneReason
from stun import codec as stun_codec

from .conftest import send_until_delivered


class Derpd:
    """A real `derpd serve --workers N` process and what its log says."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.log = b""

    async def read_until(self, pattern: bytes, limit: float = 30.0) -> re.Match[bytes]:
        assert self.proc.stderr is not None
        with trio.fail_after(limit):
            while not (m := re.search(pattern, self.log)):
                chunk = await self.proc.stderr.receive_some(65536)
                assert chunk, self.log.decode()
                self.log += chunk
        return m

    async def drain_log(self) -> None:
        assert self.proc.stderr is not None
        with trio.move_on_after(0.2):
            while chunk := await self.proc.stderr.receive_some(65536):
                self.log += chunk

    def worker_pids(self) -> dict[int, int]:
        return {int(w): int(p) for w, p in re.findall(rb"event=worker_started worker=(\d+) pid=(\d+)", self.log)}


async def start(tmp_path: Path, workers: int) -> tuple[Derpd, int, int]:
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "derpd", "serve", "--dev", "--addr", "127.0.0.1:0", "--stun-port", "0",
         "--workers", str(workers), "--key-file", str(tmp_path / "k")],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    d = Derpd(proc)
    m = await d.read_until(rb"event=workers_ready workers=\d+ derp=127\.0\.0\.1:(\d+) stun=127\.0\.0\.1:(\d+)")
    return d, int(m.group(1)), int(m.group(2))


async def stop(d: Derpd) -> None:
    if d.proc.returncode is None:
        d.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            await d.proc.wait()
    await d.drain_log()


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            return r.read().decode()

    text = await trio.to_thread.run_sync(get)
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_worker_count() -> None:
    assert worker_count("auto") == (os.cpu_count() or 1)
    assert worker_count("3") == 3
    for bad in ("0", "-1", "many", "1000"):
        with pytest.raises(WorkerError):
            worker_count(bad)


async def test_fifty_pairs_across_two_workers(tmp_path: Path) -> None:
    d, port, stun_port = await start(tmp_path, 2)
    url = f"http://127.0.0.1:{port}/derp"
    try:
        clients = [await DerpClient.connect(url) for _ in range(100)]
        senders, receivers = clients[:50], clients[50:]
        await d.read_until(rb"(?s)client_connected worker=0.*client_connected worker=1|"
                           rb"client_connected worker=1.*client_connected worker=0")  # fmt: skip
        counts: dict[int, int] = {}

        async def receive(i: int, c: DerpClient) -> None:
            for _ in range(10):
                got = await c.recv_packet()
                assert got.src == senders[i].public_key
                counts[i] = counts.get(i, 0) + 1

        with trio.fail_after(60):
            # Wait until every worker knows every receiver (the mesh floods PeerPresent).
            for s, r in zip(senders, receivers, strict=True):
                await send_until_delivered(s, r, b"probe")
            async with trio.open_nursery() as nursery:
                for i, r in enumerate(receivers):
                    nursery.start_soon(receive, i, r)
                for _ in range(10):
                    for s, r in zip(senders, receivers, strict=True):
                        await s.send(r.public_key, os.urandom(200))
                    await trio.sleep(0.01)  # a moderate rate: 5,000 packets/s
        assert sum(counts.values()) == 500  # no loss
        # STUN is answered whichever worker reads the datagram.
        udp = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        await udp.bind(("127.0.0.1", 0))
        for _ in range(4):
            await udp.sendto(stun_codec.binding_request(), ("127.0.0.1", stun_port))
            with trio.fail_after(5):
                reply, _ = await udp.recvfrom(2048)
            assert stun_codec.parse_response(reply).port == udp.getsockname()[1]
        udp.close()

        # Each worker is its own scrape target on the metrics port it logged.
        await d.drain_log()
        ports = dict(re.findall(rb"event=metrics_serving worker=(\d) addr=127\.0\.0\.1:(\d+)", d.log))
        assert set(ports) == {b"0", b"1"}
        metrics = [await scrape(int(ports[w])) for w in (b"0", b"1")]
        for i, m in enumerate(metrics):
            assert m[("derp_mesh_peer_up", (("peer", f"worker-{1 - i}"),))] == 1
        where = {k: w for w, k in re.findall(rb"client_connected worker=(\d) conn=\d+ key=([0-9a-f]+)", d.log)}
        crossing = sum(where[s.public_key[:4].hex().encode()] != where[r.public_key[:4].hex().encode()]
                       for s, r in zip(senders, receivers, strict=True))  # fmt: skip
        forwarded = sum(m[("derp_packets_forwarded_out_total", ())] for m in metrics)
        assert forwarded >= 11 * crossing  # every crossing packet took the internal hop (probes included)
        for c in clients:
            await c.aclose()
    finally:
        await stop(d)
    assert d.proc.returncode == 0


async def stun_from_many_sockets(stun_port: int, sockets: int = 32) -> None:
    """One Tailscale request from each of ``sockets`` fresh UDP sockets; every one answered."""
    for _ in range(sockets):
        with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as udp:
            await udp.bind(("127.0.0.1", 0))
            txid = stun_codec.new_txid()
            await udp.sendto(stun_codec.binding_request(txid), ("127.0.0.1", stun_port))
            with trio.fail_after(10):
                reply, _ = await udp.recvfrom(2048)
            assert reply == stun_codec.binding_response(txid, "127.0.0.1", udp.getsockname()[1])


async def stun_answered_by_worker(d: Derpd) -> dict[bytes, float]:
    """stun_requests_total{disposition="success"} of each worker's own metrics listener."""
    await d.drain_log()
    ports = dict(re.findall(rb"event=metrics_serving worker=(\d) addr=127\.0\.0\.1:(\d+)", d.log))
    return {w: (await scrape(int(p)))[("stun_requests_total", (("disposition", "success"),))] for w, p in ports.items()}


@pytest.mark.skipif(sys.platform != "linux", reason="one SO_REUSEPORT STUN socket per worker is Linux's")
async def test_every_worker_answers_stun_on_its_own_socket(tmp_path: Path) -> None:
    """Each worker has its own socket in one SO_REUSEPORT group on the STUN port: the kernel spreads
    peers over them by address, so 32 client sockets reach both workers (all on one: odds 2^-31),
    each worker counts what it answered, and a restarted worker is given its socket back."""
    d, _, stun_port = await start(tmp_path, 2)
    try:
        await stun_from_many_sockets(stun_port)
        answered = await stun_answered_by_worker(d)
        assert set(answered) == {b"0", b"1"} and sum(answered.values()) == 32
        assert min(answered.values()) > 0, answered
        # Each worker holds one socket bound to the STUN port, its own.
        held = [stun_sockets_of(pid, stun_port) for pid in d.worker_pids().values()]
        assert [len(h) for h in held] == [1, 1] and held[0] != held[1]

        os.kill(d.worker_pids()[0], signal.SIGKILL)
        await d.read_until(rb"(?s)event=worker_exited worker=0.*event=worker_started worker=0")
        await d.read_until(rb"(?s)event=worker_started worker=0.*event=metrics_serving worker=0")
        await stun_from_many_sockets(stun_port)  # the port never closed; both workers answer again
        again = await stun_answered_by_worker(d)
        assert again[b"1"] >= answered[b"1"] and sum(again.values()) - answered[b"1"] == 32
        assert again[b"0"] > 0, again
    finally:
        await stop(d)
    assert d.proc.returncode == 0


def stun_sockets_of(pid: int, port: int) -> set[int]:
    """Inodes of the UDP sockets bound to ``port`` that process ``pid`` holds (Linux's /proc)."""
    table = Path(f"/proc/{pid}/net/udp").read_text().splitlines()[1:]
    bound = {int(f[9]) for f in map(str.split, table) if int(f[1].rpartition(":")[2], 16) == port}
    held = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:[") and int(link[8:-1]) in bound:
            held.add(int(link[8:-1]))
    return held


async def test_killed_worker_loses_only_its_clients_and_comes_back(tmp_path: Path) -> None:
    d, port, _ = await start(tmp_path, 2)
    url = f"http://127.0.0.1:{port}/derp"
    try:
        # The kernel hands each accept to whichever worker wakes first: connect until both hold some.
        clients: list[DerpClient] = []
        on_victim: set[bytes] = set()
        while len(clients) < 64 and not (2 <= len(on_victim) <= len(clients) - 2):
            clients.append(await DerpClient.connect(url))
            await clients[-1].ping()  # the server has registered it, so the log line is out
            await d.drain_log()
            ours = {c.public_key[:4].hex().encode() for c in clients}
            # Worker 0 also accepts its sibling's mesh link; only our test clients count.
            on_victim = ours & set(re.findall(rb"client_connected worker=0 conn=\d+ key=([0-9a-f]+)", d.log))
        assert 2 <= len(on_victim) <= len(clients) - 2, d.log.decode()
        victim_pid = d.worker_pids()[0]
        os.kill(victim_pid, signal.SIGKILL)

        lost, alive = [], []
        for c in clients:
            try:
                with trio.fail_after(0.5):
                    await c.ping()
                alive.append(c)
            except (ConnectionLost, trio.TooSlowError, trio.BrokenResourceError, OSError):
                lost.append(c)
        assert {c.public_key[:4].hex().encode() for c in lost} == on_victim  # exactly the dead worker's clients
        await d.read_until(rb"event=worker_exited worker=0")
        await d.read_until(rb"(?s)event=worker_exited worker=0.*event=worker_started worker=0")
        # They reconnect (to whichever worker) and relay with everyone again.
        back = [await DerpClient.connect(url, c.key) for c in lost]
        peers = alive + back
        for a, b in zip(peers, peers[1:] + peers[:1], strict=True):
            await send_until_delivered(a, b, b"after the crash")
        for c in clients + back:
            await c.aclose()
    finally:
        await stop(d)


async def test_workers_node_meshed_with_another_node(tmp_path: Path) -> None:
    """Node A (--workers 2) and node B mesh: to B, A is one node. B's single watcher connection
    lands on one of A's workers, yet B reaches clients on both, and hears PeerGone for each."""
    psk = tmp_path / "mesh.key"
    psk.write_text(os.urandom(32).hex() + "\n")
    psk.chmod(0o600)
    with socket.socket() as s:  # A's port, known before A starts, for B's --mesh-with
        s.bind(("127.0.0.1", 0))
        port_a = s.getsockname()[1]
    b = await trio.lowlevel.open_process(
        [sys.executable, "-m", "derpd", "serve", "--dev", "--addr", "127.0.0.1:0", "--stun-port", "-1",
         "--key-file", str(tmp_path / "b.key"), "--mesh-psk-file", str(psk),
         "--mesh-with", f"http://127.0.0.1:{port_a}/derp"],
        cwd=tmp_path, stderr=subprocess.PIPE,
    )  # fmt: skip
    node_b = Derpd(b)
    port_b = int((await node_b.read_until(rb"event=serving derp=127\.0\.0\.1:(\d+)")).group(1))
    a = await trio.lowlevel.open_process(
        [sys.executable, "-m", "derpd", "serve", "--dev", "--addr", f"127.0.0.1:{port_a}", "--stun-port", "-1",
         "--workers", "2", "--key-file", str(tmp_path / "a.key"), "--mesh-psk-file", str(psk),
         "--mesh-with", f"http://127.0.0.1:{port_b}/derp"],
        cwd=tmp_path, stderr=subprocess.PIPE,
    )  # fmt: skip
    node_a = Derpd(a)
    try:
        await node_a.read_until(rb"event=workers_ready")
        url_a = f"http://127.0.0.1:{port_a}/derp"
        on_a: list[DerpClient] = []
        workers: dict[bytes, bytes] = {}
        while len(on_a) < 4 or (len(on_a) < 64 and len(set(workers.values())) < 2):
            on_a.append(await DerpClient.connect(url_a))
            await on_a[-1].ping()
            await node_a.drain_log()
            mine = {c.public_key[:4].hex().encode() for c in on_a}
            found = re.findall(rb"client_connected worker=(\d) conn=\d+ key=([0-9a-f]+)", node_a.log)
            workers = {key: w for w, key in found if key in mine}
        assert set(workers.values()) == {b"0", b"1"}, node_a.log.decode()
        on_b = await DerpClient.connect(f"http://127.0.0.1:{port_b}/derp")

        for c in on_a:  # both ways, once both nodes' routes are in place (PeerPresent floods)
            await send_until_delivered(c, on_b, b"a to b")
            await send_until_delivered(on_b, c, b"b to a")

        # Each A client leaving, whichever worker it was on, reaches B's client as PeerGone.
        gone = set()
        for c in on_a:
            await c.aclose()
        with trio.fail_after(30):
            while len(gone) < len(on_a):
                m = await on_b.recv()
                if isinstance(m, PeerGoneMessage):
                    assert m.reason == PeerGoneReason.DISCONNECTED
                    gone.add(m.peer)
        assert gone == {c.public_key for c in on_a}
        await on_b.aclose()
    finally:
        for node in (node_a, node_b):
            await stop(node)
