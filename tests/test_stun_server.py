"""The trio STUN responder over real loopback sockets, with real third-party clients.

"No reply" is checked without waiting for a timeout: the test sends the bad packet, then
a valid marker request from the same socket; the server handles datagrams in order, so
the next datagram back must be the marker's reply. ``HANG_GUARD`` only stops a broken
build from hanging; no test measures speed.

Every reply any test here receives is also checked against the anti-amplification rule
(at most 2.2 times the size of the request it answers) where the request is known.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import random
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiostun
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from derpd import config
from derpd.cli import serve
from derpd.server.node import DerpServer
from derpd.server.stun import StunServer, StunStats
from stun import codec
from stun.codec import RequestKind, StunError

from .conftest import load_vector
from .test_stun_codec import (
    DERPD_VERDICT,
    check_derpd_reply,
    check_error_shape,
    derpd_reply,
    mutations,
    small_attributes,
    txids,
    within_ratio,
)

HANG_GUARD = 30.0
REPO = Path(__file__).resolve().parents[1]
PYSTUN3_DIR = REPO / ".venv" / "pystun3"
LINUX_ONLY = pytest.mark.skipif(sys.platform != "linux", reason="IP_PKTINFO replies are Linux-only")


VECTORS = load_vector("stun.json")


def ipv6_loopback_works() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


NEEDS_IPV6 = pytest.mark.skipif(not ipv6_loopback_works(), reason="no IPv6 loopback here")


# -- helpers -------------------------------------------------------------------------

# Every test that starts its server through start() runs twice: over recvmmsg/sendmmsg (where the
# platform has them, else this run repeats the other) and over one recvfrom/sendto per datagram.
IO_PATHS = {"batched": None, "per_datagram": False}
io_path: dict[str, bool | None] = {"batch_io": None}


@pytest.fixture(autouse=True, params=list(IO_PATHS))
def each_io_path(request: pytest.FixtureRequest) -> Iterator[None]:
    io_path["batch_io"] = IO_PATHS[request.param]
    yield
    io_path["batch_io"] = None


async def start(nursery: trio.Nursery, host: str = "127.0.0.1", **kwargs: Any) -> StunServer:
    server = StunServer(host, 0, **{**io_path, **kwargs})
    port = await nursery.start(server.serve)
    assert port == server.port
    return server


MakeClient = Callable[..., Awaitable[trio.socket.SocketType]]


@pytest.fixture
async def udp_client() -> AsyncIterator[MakeClient]:
    """Factory for bound UDP client sockets, all closed when the test ends."""
    made: list[trio.socket.SocketType] = []

    async def make(host: str = "127.0.0.1", port: int = 0) -> trio.socket.SocketType:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = trio.socket.socket(family, socket.SOCK_DGRAM)
        made.append(sock)
        await sock.bind((host, port))
        return sock

    yield make
    for sock in made:
        sock.close()


async def receive(sock: trio.socket.SocketType) -> tuple[bytes, Any]:
    with trio.fail_after(HANG_GUARD):
        return await sock.recvfrom(65536)


async def round_trip(sock: trio.socket.SocketType, dest: tuple[str, int], data: bytes) -> bytes:
    await sock.sendto(data, dest)
    reply, _ = await receive(sock)
    return reply


def reply_txid(reply: bytes) -> bytes:
    """The transaction id a reply echoes: 12 bytes after the cookie, or classic's 16."""
    return reply[8:20] if reply[4:8] == codec.COOKIE_BYTES else reply[4:20]


async def marker(sock: trio.socket.SocketType, dest: tuple[str, int]) -> list[bytes]:
    """Send a fresh Tailscale request; return every other datagram that came back before its reply."""
    txid = codec.new_txid()
    await sock.sendto(codec.binding_request(txid), dest)
    others = []
    for _ in range(10_000):
        reply, _ = await receive(sock)
        if reply[:2] == b"\x01\x01" and reply_txid(reply) == txid:
            return others
        others.append(reply)
    raise AssertionError("marker reply never arrived")


async def answer_or_none(sock: trio.socket.SocketType, dest: tuple[str, int], data: bytes) -> bytes | None:
    """The one reply to ``data``, or None when the server dropped it (proved by a marker)."""
    await sock.sendto(data, dest)
    others = await marker(sock, dest)
    assert len(others) <= 1, others
    return others[0] if others else None


def dispositions(**counts: int) -> dict[str, int]:
    """``StunStats.requests()`` with the given counts and every other disposition 0."""
    every = ("success", "unknown_attribute", "not_stun", "not_tailscale", "amplification", "read_error", "write_error")
    assert set(counts) <= set(every)
    return {d: counts.get(d, 0) for d in every}


async def assert_dropped(sock: trio.socket.SocketType, dest: tuple[str, int], data: bytes) -> None:
    await sock.sendto(data, dest)
    assert await marker(sock, dest) == [], f"got a reply to {data.hex()}"


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Poll a counter the server updates; bounded by HANG_GUARD."""
    for _ in range(int(HANG_GUARD / 0.005)):
        if predicate():
            return
        await trio.sleep(0.005)
    raise AssertionError("condition not reached")


def local(sock: trio.socket.SocketType) -> tuple[str, int]:
    name = sock.getsockname()
    return name[0], name[1]


@pytest.fixture
def stun_log() -> Iterator[list[logging.LogRecord]]:
    """Every record the ``derpd`` logger emits at DEBUG and above during the test."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("derpd")
    handler = Collect(logging.DEBUG)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


# -- golden vectors over the wire ----------------------------------------------------

# The cases derpd answers, and how (see test_stun_codec.DERPD_VERDICT for why).
DERPD_ANSWERS = {name: kind for name, kind in DERPD_VERDICT.items() if kind is not None}


async def test_go_verdict_cases_over_the_wire(nursery: trio.Nursery, udp_client: MakeClient) -> None:
    server = await start(nursery)
    dest = ("127.0.0.1", server.port)
    client = await udp_client()
    host, port = local(client)
    answered = dropped = 0
    for case in VECTORS["parse_binding_request_cases"]:
        data = bytes.fromhex(case["request_hex"])
        kind = DERPD_ANSWERS.get(case["name"])
        if kind is None:
            await assert_dropped(client, dest, data)
            dropped += 1
            continue
        reply = await round_trip(client, dest, data)
        request = codec.parse_binding_request(data)
        assert request.kind is kind
        assert reply == codec.build_response(request, host, port)
        if case["accepted"]:  # Go's own answer for our address, byte for byte
            assert reply == codec.binding_response(bytes.fromhex(case["txid"]), host, port)
        elif kind is RequestKind.RFC3489:
            assert reply[4:20] == data[4:20]
            assert reply[20:24] == b"\x00\x01\x00\x08"  # MAPPED-ADDRESS, never XOR-MAPPED
        parsed = codec.parse_response(reply)
        assert (str(parsed.address), parsed.port) == (host, port)
        answered += 1
    markers = dropped
    stats = server.stats
    assert stats.requests() == dispositions(success=answered + markers, not_stun=dropped)
    assert stats.addrfamily() == {"ipv4": answered + markers, "ipv6": 0}
    assert stats.by_kind == {"tailscale": 4 + markers, "rfc5389": 5, "rfc3489": 2}


RECORDED_HOST, _RECORDED_PORT = VECTORS["live_server"]["client_addr"].rsplit(":", 1)
RECORDED_PORT = int(_RECORDED_PORT)


async def recorded_port_client(udp_client: MakeClient) -> trio.socket.SocketType:
    """A client on the port Go's recorded exchanges came from, or any port if that one is taken
    (then replies are compared with stun.Response for our own address)."""
    try:
        return await udp_client(RECORDED_HOST, RECORDED_PORT)
    except OSError:
        return await udp_client()


async def test_live_server_exchanges(nursery: trio.Nursery, udp_client: MakeClient) -> None:
    """Replay Go derper's recorded exchanges; from its recorded port, we answer byte-identically."""
    server = await start(nursery)
    dest = ("127.0.0.1", server.port)
    client = await recorded_port_client(udp_client)
    host, port = local(client)
    on_recorded_port = port == RECORDED_PORT
    for exchange in VECTORS["live_server"]["exchanges"]:
        data = bytes.fromhex(exchange["request_hex"])
        if exchange["answered"]:
            reply = await round_trip(client, dest, data)
            assert reply == codec.binding_response(data[8:20], host, port)
            if on_recorded_port:
                assert reply.hex() == exchange["response_hex"] == exchange["expected_response_hex"]
        elif exchange["name"] == "bad_fingerprint":
            await assert_dropped(client, dest, data)
        else:
            # Go stays silent (non-Tailscale software / no FINGERPRINT); we answer on purpose.
            reply = await round_trip(client, dest, data)
            assert reply[20:32] == codec.binding_response(data[8:20], host, port)[20:32]
            has_fp = data[-8:-6] == b"\x80\x28"
            assert len(reply) == (40 if has_fp else 32)


# -- address families and sockets ----------------------------------------------------


@NEEDS_IPV6
async def test_ipv6_loopback(nursery: trio.Nursery, udp_client: MakeClient) -> None:
    server = await start(nursery, "::1")
    client = await udp_client("::1")
    txid = codec.new_txid()
    reply = await round_trip(client, ("::1", server.port), codec.binding_request(txid))
    assert reply == codec.binding_response(txid, "::1", local(client)[1])
    assert reply[25] == 2 and len(reply) == 44
    assert server.stats.addrfamily() == {"ipv4": 0, "ipv6": 1}


@NEEDS_IPV6
async def test_bursts_of_mixed_peers_each_reply_goes_to_its_sender(nursery: trio.Nursery) -> None:
    """Bursts bigger than one recvmmsg, on a dual-stack wildcard socket (pktinfo on): Tailscale,
    generic and 420-bound requests and garbage, from IPv4 and IPv6 peers, interleaved, all queued
    before the server reads (plain sends, no checkpoint between them). Every peer gets exactly the
    codec's answers to its own requests, in order, whichever batch slot each request landed in
    (garbage shifts the replies against the slots, IPv6 answers are longer)."""
    server = await start(nursery, "::")
    raw = [socket.socket(socket.AF_INET6 if ":" in h else socket.AF_INET, socket.SOCK_DGRAM) for h in HOSTS5]
    for sock, host in zip(raw, HOSTS5, strict=True):
        sock.bind((host, 0))
    clients = [trio.socket.from_stdlib_socket(sock) for sock in raw]
    dests = [(host, server.port) for host in HOSTS5]
    rng = random.Random(20261124)
    try:
        for _ in range(4):
            expected: list[list[bytes]] = [[] for _ in clients]
            for n in range(90):
                i = rng.randrange(len(clients))
                choice = rng.random()
                if choice < 0.5:
                    data = codec.binding_request(codec.new_txid())
                elif choice < 0.65:
                    data = codec.encode_message(codec.BINDING_REQUEST, codec.new_txid(), with_fingerprint=n % 2 == 0)
                elif choice < 0.75:
                    data = codec.encode_message(codec.BINDING_REQUEST, codec.new_txid(), [(0x24 + n % 3, b"")])
                else:
                    data = rng.randbytes(rng.choice([0, 19, 40, 41, 300]))
                try:
                    expected[i].append(derpd_reply(codec.parse_binding_request(data), *local(clients[i])))
                except StunError:
                    pass
                raw[i].sendto(data, dests[i])
            for i, client in enumerate(clients):
                assert await marker(client, dests[i]) == expected[i], i
        assert server.stats.requests()["not_stun"] > 0 and server.stats.addrfamily()["ipv6"] > 0
    finally:
        for client in clients:
            client.close()


HOSTS5 = ("127.0.0.1", "::1", "127.0.0.1", "::1", "127.0.0.1")


@NEEDS_IPV6
@pytest.mark.parametrize("host", ["", "::"])
async def test_dual_stack_answers_ipv4_as_family_1(nursery: trio.Nursery, host: str, udp_client: MakeClient) -> None:
    """Deliberate difference from Go: its dual-stack server answers ::ffff:127.0.0.1 as family 2."""
    server = await start(nursery, host)
    [sock] = server.sockets
    assert sock.family == socket.AF_INET6
    assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
    v4 = await udp_client("127.0.0.1")
    txid = codec.new_txid()
    reply = await round_trip(v4, ("127.0.0.1", server.port), codec.binding_request(txid))
    assert reply == codec.binding_response(txid, "127.0.0.1", local(v4)[1])
    assert reply[25] == 1 and len(reply) == 32
    v6 = await udp_client("::1")
    reply6 = await round_trip(v6, ("::1", server.port), codec.binding_request(txid))
    assert reply6 == codec.binding_response(txid, "::1", local(v6)[1])
    assert server.stats.addrfamily() == {"ipv4": 1, "ipv6": 1}


async def test_a_name_binds_every_address_it_resolves_to(nursery: trio.Nursery, udp_client: MakeClient) -> None:
    """Like derpd's TCP listeners: ``localhost`` may be 127.0.0.1 and ::1, one socket each, one port."""
    server = await start(nursery, "localhost")
    addresses = server.addresses
    assert addresses and {port for _, port in addresses} == {server.port}
    assert {host for host, _ in addresses} <= {"127.0.0.1", "::1"}
    for host, port in addresses:
        client = await udp_client(host)
        txid = codec.new_txid()
        reply = await round_trip(client, (host, port), codec.binding_request(txid))
        assert reply == codec.binding_response(txid, host, local(client)[1])
    assert server.stats.success == len(addresses)


@LINUX_ONLY
@pytest.mark.parametrize("host", ["0.0.0.0", pytest.param("", marks=NEEDS_IPV6)])
async def test_reply_comes_from_the_address_the_client_used(
    nursery: trio.Nursery, host: str, udp_client: MakeClient
) -> None:
    """A wildcard-bound server answers from the request's destination (IP_PKTINFO), not from
    whatever address routing picks: without it, this reply would come from 127.0.0.1."""
    server = await start(nursery, host)
    client = await udp_client("127.0.0.1")
    for dest_ip in ("127.0.0.2", "127.0.0.1", "127.0.0.3"):
        await client.sendto(codec.binding_request(), (dest_ip, server.port))
        reply, source = await receive(client)
        assert source == (dest_ip, server.port)
        assert codec.parse_response(reply).port == local(client)[1]


@LINUX_ONLY
async def test_write_error_is_counted_and_survived(
    nursery: trio.Nursery, stun_log: list[logging.LogRecord], udp_client: MakeClient
) -> None:
    """A request sent to the loopback broadcast address cannot be answered from that address."""
    server = await start(nursery, "0.0.0.0")
    client = await udp_client("127.0.0.1")
    client.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    await client.sendto(codec.binding_request(), ("127.255.255.255", server.port))
    await wait_until(lambda: server.stats.write_error == 1)
    assert await marker(client, ("127.0.0.1", server.port)) == []
    assert server.stats.requests() == dispositions(success=1, write_error=1)
    assert any(r.getMessage() == "stun_write_error" and r.levelno == logging.INFO for r in stun_log)


async def test_serves_a_socket_it_was_given_and_leaves_it_open(udp_client: MakeClient) -> None:
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    raw.bind(("127.0.0.1", 0))
    stats = StunStats()
    server = StunServer(sock=raw, stats=stats)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve)
        assert port == raw.getsockname()[1] == server.port
        client = await udp_client()
        txid = codec.new_txid()
        assert await round_trip(client, ("127.0.0.1", port), codec.binding_request(txid)) == codec.binding_response(
            txid, *local(client)
        )
        nursery.cancel_scope.cancel()
    assert server.sockets == [raw] and raw.fileno() != -1
    assert stats.success == 1
    raw.close()


async def test_owned_socket_is_closed_on_cancel() -> None:
    server = StunServer("127.0.0.1", 0)
    with pytest.raises(RuntimeError):
        _ = server.port  # nothing bound before serve()
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        [sock] = server.sockets
        assert server.addresses == [("127.0.0.1", server.port)]
        nursery.cancel_scope.cancel()
    assert sock.fileno() == -1 and server.sockets == []


# -- robustness ----------------------------------------------------------------------


def garbage(rng: random.Random, valid: list[bytes]) -> bytes:
    """Random bytes, STUN-looking noise, or a lightly mutated valid request."""
    choice = rng.random()
    if choice < 0.4:
        return rng.randbytes(rng.randrange(0, 200))
    if choice < 0.6:
        body = rng.randbytes(rng.randrange(0, 60))
        head = b"\x00\x01" + len(body).to_bytes(2, "big") + rng.choice([b"\x21\x12\xa4\x42", rng.randbytes(4)])
        return head + rng.randbytes(12) + body
    data = bytearray(rng.choice(valid))
    for _ in range(rng.randrange(1, 4)):
        pos = rng.randrange(len(data)) if data else 0
        op = rng.randrange(3)
        if op == 0 and data:
            data[pos] ^= 1 << rng.randrange(8)
        elif op == 1:
            del data[pos:]
        else:
            data[pos:pos] = rng.randbytes(rng.randrange(1, 9))
    return bytes(data)


async def test_garbage_flood_then_still_serving(
    nursery: trio.Nursery, stun_log: list[logging.LogRecord], udp_client: MakeClient
) -> None:
    server = await start(nursery)
    dest = ("127.0.0.1", server.port)
    client = await udp_client()
    host, port = local(client)
    rng = random.Random(20240611)
    valid = [bytes.fromhex(c["request_hex"]) for c in VECTORS["parse_binding_request_cases"]]
    datagrams = [garbage(rng, valid) for _ in range(2000)] + [b"", b"\x00" * 65507, rng.randbytes(60000)]
    # Garbage that happens to name an attribute we do not know gets a 420, by design.
    for i in range(0, 60, 3):
        datagrams[i] = codec.encode_message(codec.BINDING_REQUEST, rng.randbytes(12), [(0x24 + i, b"")])
    expected: list[bytes] = []
    for dgram in datagrams:
        try:
            expected.append(derpd_reply(codec.parse_binding_request(dgram), host, port))
        except StunError:
            pass
    expected_errors = sum(reply[:2] == b"\x01\x11" for reply in expected)
    expected_drops = len(datagrams) - len(expected)
    assert expected_drops > 1500  # the flood is mostly garbage
    assert expected_errors >= 20

    answers: list[bytes] = []
    markers = 0
    chunk = 50  # bounded bursts, so neither side's receive buffer overflows
    for start_at in range(0, len(datagrams), chunk):
        for dgram in datagrams[start_at : start_at + chunk]:
            await client.sendto(dgram, dest)
        answers += await marker(client, dest)
        markers += 1
    assert answers == expected
    stats = server.stats
    assert stats.requests() == dispositions(
        success=len(expected) - expected_errors + markers, unknown_attribute=expected_errors, not_stun=expected_drops
    )

    drop_lines = [r for r in stun_log if r.getMessage() == "stun_dropped"]
    assert sum(r.levelno == logging.DEBUG for r in drop_lines) == expected_drops
    info_lines = [r for r in drop_lines if r.levelno >= logging.INFO]
    assert 1 <= len(info_lines) < 5, "a garbage flood must not flood the log"
    assert [r for r in stun_log if r.levelno > logging.INFO or r.exc_info] == []


async def test_clients_gone_before_reply_do_not_hurt(nursery: trio.Nursery, udp_client: MakeClient) -> None:
    """Replies to closed ports bounce as ICMP errors; the server must not count or sleep on them."""
    server = await start(nursery)
    dest = ("127.0.0.1", server.port)
    for _ in range(20):
        gone = await udp_client()
        await gone.sendto(codec.binding_request(), dest)
        gone.close()
    await wait_until(lambda: server.stats.success == 20)
    client = await udp_client()
    assert await marker(client, dest) == []
    assert server.stats.requests() == dispositions(success=21)


async def test_yields_to_other_tasks_between_batches(nursery: trio.Nursery) -> None:
    """With datagrams queued beyond one batch, other tasks run before the queue is drained."""
    server = await start(nursery, batch=4)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sender:
        sender.bind(("127.0.0.1", 0))
        for _ in range(40):  # queued before the server task is scheduled again
            sender.sendto(b"junk", ("127.0.0.1", server.port))
        seen: list[int] = []
        for _ in range(1000):
            await trio.lowlevel.checkpoint()
            seen.append(server.stats.not_stun)
            if server.stats.not_stun == 40:
                break
    assert seen[-1] == 40
    assert any(0 < n < 40 for n in seen), seen


# -- real third-party clients --------------------------------------------------------


async def _aiostun_query(host: str, port: int, family: int, classic: bool) -> tuple[dict[str, Any], Any]:
    client = aiostun.Client(host, port=port, family=family, timeout=HANG_GUARD)
    await client.connect()
    try:
        local_addr = client.get_local_addr()
        mapped = await client.get_mapped_address(use_classicstun=classic)
    finally:
        client.close()
    return mapped, local_addr


@pytest.mark.parametrize(
    ("host", "classic"),
    [
        ("127.0.0.1", False),
        ("127.0.0.1", True),
        pytest.param("::1", False, marks=NEEDS_IPV6),
        pytest.param("::1", True, marks=NEEDS_IPV6),
    ],
)
async def test_aiostun_gets_its_address(nursery: trio.Nursery, host: str, classic: bool) -> None:
    server = await start(nursery, host)
    family = aiostun.IP6 if ":" in host else aiostun.IP4
    query = functools.partial(asyncio.run, _aiostun_query(host, server.port, family, classic))
    mapped, local_addr = await trio.to_thread.run_sync(query)
    assert mapped == {"family": "IPv6" if family == aiostun.IP6 else "IPv4", "ip": host, "port": local_addr[1]}
    assert server.stats.by_kind["rfc3489" if classic else "rfc5389"] == 1


PYSTUN3_SCRIPT = """
import json, sys
import stun
nat_type, ip, port = stun.get_ip_info(
    source_ip="127.0.0.1", source_port=int(sys.argv[2]), stun_host="127.0.0.1", stun_port=int(sys.argv[1])
)
print(json.dumps({"file": stun.__file__, "version": stun.__version__, "nat": nat_type, "ip": ip, "port": port}))
"""


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_pystun3_classic_client(nursery: trio.Nursery, tmp_path: Path) -> None:
    """pystun3 speaks RFC 3489: test 1 is a bare request, test 2 asks to change IP and port.
    We have one address and answer both from it, so it reports "Open Internet"."""
    if not (PYSTUN3_DIR / "stun" / "__init__.py").is_file():
        pytest.fail(
            f"pystun3 is not installed at {PYSTUN3_DIR}; run `make test`, or "
            "`.venv/bin/pip install --no-deps --target .venv/pystun3 pystun3==2.0.0`"
        )
    server = await start(nursery)
    source_port = free_udp_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(PYSTUN3_DIR)
    with trio.fail_after(HANG_GUARD):
        done = await trio.run_process(
            [sys.executable, "-c", PYSTUN3_SCRIPT, str(server.port), str(source_port)],
            capture_stdout=True,
            capture_stderr=True,
            env=env,
            cwd=tmp_path,
            check=False,
        )
    assert done.returncode == 0, done.stderr.decode()
    result = json.loads(done.stdout)
    assert Path(result["file"]).resolve().is_relative_to(PYSTUN3_DIR.resolve()), "imported the wrong `stun`"
    assert result["version"] == "2.0.0"
    assert (result["ip"], result["port"]) == ("127.0.0.1", source_port)
    assert result["nat"] == "Open Internet"
    assert server.stats.by_kind == {"tailscale": 0, "rfc5389": 0, "rfc3489": 2}
    assert server.stats.success == 2


# -- unknown comprehension-required attributes: 420 ----------------------------------

UNKNOWN_CASES = [
    # (id, txid length, attributes, FINGERPRINT, listed types)
    ("rfc5389_priority", 12, [(0x0024, b"\0\0\0\1")], False, (0x0024,)),
    ("rfc5389_fp_two", 12, [(0x0026, b""), (0x8022, b"x"), (0x0002, bytes(8)), (0x0026, b"")], True, (0x26, 0x02)),
    (
        "classic_three",
        16,
        [(0x0024, b""), (0x0003, bytes(4)), (0x0025, b"ab"), (0x0027, b"")],
        False,
        (0x24, 0x25, 0x27),
    ),
]


@pytest.mark.parametrize(
    ("host", "case"),
    [
        *[pytest.param("127.0.0.1", c, id=f"v4-{c[0]}") for c in UNKNOWN_CASES],
        *[pytest.param("::1", c, id=f"v6-{c[0]}", marks=NEEDS_IPV6) for c in UNKNOWN_CASES],
    ],
)
async def test_unknown_comprehension_required_attribute_gets_420(
    nursery: trio.Nursery, udp_client: MakeClient, host: str, case: tuple[Any, ...]
) -> None:
    _name, txid_len, attrs, with_fp, listed = case
    server = await start(nursery, host)
    client = await udp_client(host)
    txid = os.urandom(txid_len)
    data = codec.encode_message(codec.BINDING_REQUEST, txid, attrs, with_fingerprint=with_fp)
    reply = await round_trip(client, (host, server.port), data)
    assert reply[:2] == b"\x01\x11"  # binding error response
    assert reply_txid(reply) == (txid[-12:] if txid_len == 12 else txid)
    error = codec.parse_error_response(reply)
    assert error.code == 420
    if txid_len == 16 and len(listed) % 2:
        assert error.unknown_attributes == (*listed, listed[-1])  # RFC 3489's even list
    else:
        assert error.unknown_attributes == listed
    assert (reply[-8:-4] == b"\x80\x28\x00\x04") is with_fp
    check_error_shape(codec.parse_binding_request(data), reply)
    assert within_ratio(reply, data)
    assert server.stats.requests() == dispositions(unknown_attribute=1)
    assert server.stats.addrfamily() == {"ipv4": 0, "ipv6": 0}  # only binding successes count there
    assert server.stats.by_kind == {"tailscale": 0, "rfc5389": 0, "rfc3489": 0}


@pytest.mark.parametrize("txid_len", [12, 16])
@pytest.mark.parametrize("with_fp", [False, True])
async def test_only_optional_unknown_attributes_get_success(
    nursery: trio.Nursery, udp_client: MakeClient, txid_len: int, with_fp: bool
) -> None:
    """Types >= 0x8000 (ICE-CONTROLLED, anything up to 0xFFFF) and the understood ones are no reason for a 420."""
    server = await start(nursery)
    client = await udp_client()
    host, port = local(client)
    attrs = [(0x8000, b""), (0x8029, bytes(8)), (0xC0DE, b"xyz"), (0x0006, b"user"), (0x0014, b"realm"), (0xFFFF, b"")]
    data = codec.encode_message(codec.BINDING_REQUEST, os.urandom(txid_len), attrs, with_fingerprint=with_fp)
    request = codec.parse_binding_request(data)
    assert request.unknown_attributes == ()
    reply = await round_trip(client, ("127.0.0.1", server.port), data)
    assert reply == codec.build_response(request, host, port)
    check_derpd_reply(request, data, host, port)
    assert server.stats.requests() == dispositions(success=1)
    assert server.stats.by_kind == {"tailscale": 0, "rfc5389": int(txid_len == 12), "rfc3489": int(txid_len == 16)}


async def test_tailscale_request_with_unknown_attribute_is_answered_like_go(
    nursery: trio.Nursery, udp_client: MakeClient
) -> None:
    """Go answers a Tailscale request whatever else it carries (vector extra_attr_before_software)."""
    server = await start(nursery)
    client = await udp_client()
    txid = codec.new_txid()
    data = codec.encode_message(
        codec.BINDING_REQUEST, txid, [(0x0024, b"\0\0\0\1"), (codec.ATTR_SOFTWARE, b"tailnode")], with_fingerprint=True
    )
    reply = await round_trip(client, ("127.0.0.1", server.port), data)
    assert reply == codec.binding_response(txid, *local(client))
    assert server.stats.requests() == dispositions(success=1)


# -- --no-stun-generic: exactly what Go derper answers --------------------------------


async def test_no_stun_generic_answers_exactly_what_go_answers(
    nursery: trio.Nursery, udp_client: MakeClient, stun_log: list[logging.LogRecord]
) -> None:
    server = await start(nursery, generic=False)
    assert server.generic is False
    dest = ("127.0.0.1", server.port)
    client = await recorded_port_client(udp_client)
    host, port = local(client)
    answered = not_tailscale = not_stun = 0

    async def expect(data: bytes, go_answers: bool, go_reply: bytes | None = None) -> None:
        nonlocal answered, not_tailscale, not_stun
        reply = await answer_or_none(client, dest, data)
        if not go_answers:
            assert reply is None, f"answered {data.hex()}"
            try:
                codec.parse_binding_request(data)
                not_tailscale += 1
            except StunError:
                not_stun += 1
            return
        assert reply == codec.binding_response(data[8:20], host, port)
        if go_reply is not None and port == RECORDED_PORT:
            assert reply == go_reply
        answered += 1

    for case in VECTORS["binding_requests"]:
        await expect(bytes.fromhex(case["request_hex"]), True)
    for case in VECTORS["parse_binding_request_cases"]:
        await expect(bytes.fromhex(case["request_hex"]), case["accepted"])
    for exchange in VECTORS["live_server"]["exchanges"]:
        go_reply = bytes.fromhex(exchange["response_hex"]) if exchange["answered"] else None
        await expect(bytes.fromhex(exchange["request_hex"]), exchange["answered"], go_reply)
    # Generic requests, even ones that would get a 420, are dropped; so is classic RFC 3489.
    await expect(codec.encode_message(codec.BINDING_REQUEST, codec.new_txid(), [(0x0024, b"")]), False)
    await expect(codec.encode_message(codec.BINDING_REQUEST, os.urandom(16)), False)
    await expect(codec.encode_message(codec.BINDING_REQUEST, os.urandom(16), [(0x0024, b"")]), False)

    assert not_tailscale >= 10 and not_stun >= 10
    markers = answered + not_tailscale + not_stun
    stats = server.stats
    assert stats.requests() == dispositions(success=answered + markers, not_tailscale=not_tailscale, not_stun=not_stun)
    assert stats.by_kind == {"tailscale": answered + markers, "rfc5389": 0, "rfc3489": 0}
    lines = [r for r in stun_log if r.getMessage() == "stun_not_tailscale"]
    assert sum(r.levelno == logging.DEBUG for r in lines) == not_tailscale
    assert len([r for r in lines if r.levelno == logging.INFO]) == 1  # sampled: one a minute
    assert [r for r in stun_log if r.levelno > logging.INFO or r.exc_info] == []


async def test_stun_generic_flag_env_and_file_reach_the_stun_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, udp_client: MakeClient
) -> None:
    """--no-stun-generic / DERPD_STUN_GENERIC / stun-generic in TOML → ServerSettings → StunServer."""
    base = ["--dev", "--key-file", str(tmp_path / "k" / "derper.key"), "--addr", "127.0.0.1:0", "--stun-port", "0"]
    cfg = tmp_path / "d.toml"
    cfg.write_text("stun-generic = false\n")

    def generic_of(args: list[str]) -> bool:
        params = serve.make_context("serve", [*base, *args]).params
        settings = config.build(config.ServeOptions(**params), dry_run=True).settings
        assert settings.stun_generic is params["stun_generic"]
        return settings.stun_generic

    assert generic_of([]) is True
    assert generic_of(["--no-stun-generic"]) is False
    assert generic_of(["--config", str(cfg)]) is False
    assert generic_of(["--config", str(cfg), "--stun-generic"]) is True
    monkeypatch.setenv("DERPD_STUN_GENERIC", "false")
    assert generic_of([]) is False
    assert generic_of(["--stun-generic"]) is True

    cfg = config.build(config.ServeOptions(**serve.make_context("serve", base).params), dry_run=True)
    key, settings = cfg.key, cfg.settings
    assert not (tmp_path / "k").exists()
    async with trio.open_nursery() as nursery:
        server = DerpServer(key, settings)
        await nursery.start(server.run)
        assert server.stun is not None and server.stun.generic is False
        client = await udp_client()
        dest = server.stun_addrs[0]
        await assert_dropped(client, dest, codec.encode_message(codec.BINDING_REQUEST, codec.new_txid()))
        assert server.stun.stats.requests() == dispositions(success=1, not_tailscale=1)
        nursery.cancel_scope.cancel()

    check = await trio.run_process(
        [sys.executable, "-m", "derpd", "check-config", *base, "--no-stun-generic"],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        cwd=tmp_path,
    )
    assert check.returncode == 0, check.stderr.decode()
    assert b"config OK" in check.stdout


# -- anti-amplification over the wire -------------------------------------------------


async def test_reply_over_the_ratio_is_dropped_and_counted(
    nursery: trio.Nursery, udp_client: MakeClient, stun_log: list[logging.LogRecord]
) -> None:
    """The guard itself, exercised with a tighter ratio than derpd's 2.2 (no real reply exceeds that)."""
    server = await start(nursery, max_reply_ratio=1.5)
    client = await udp_client()
    dest = ("127.0.0.1", server.port)
    await assert_dropped(client, dest, codec.encode_message(codec.BINDING_REQUEST, codec.new_txid()))  # 20 → 32
    smallest_420 = codec.encode_message(codec.BINDING_REQUEST, codec.new_txid(), [(0x0024, b"")])  # 24 → 48
    await assert_dropped(client, dest, smallest_420)
    txid = codec.new_txid()
    assert await round_trip(client, dest, codec.binding_request(txid)) == codec.binding_response(txid, *local(client))
    assert server.stats.requests() == dispositions(success=3, amplification=2)
    lines = [r for r in stun_log if r.getMessage() == "stun_reply_too_large"]
    assert sum(r.levelno == logging.DEBUG for r in lines) == 2
    assert [r for r in stun_log if r.levelno > logging.INFO or r.exc_info] == []
    with pytest.raises(ValueError):
        StunServer("127.0.0.1", 0, max_reply_ratio=0)


RATIO_HOSTS = ["127.0.0.1", "::1"] if ipv6_loopback_works() else ["127.0.0.1"]
generated_requests = st.one_of(
    st.builds(
        lambda txid, attrs, fp: codec.encode_message(codec.BINDING_REQUEST, txid, attrs, with_fingerprint=fp),
        st.one_of(txids, st.binary(min_size=16, max_size=16)),
        small_attributes,
        st.booleans(),
    ),
    mutations(),
    st.binary(max_size=48),
)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(RATIO_HOSTS), st.lists(generated_requests, min_size=1, max_size=30))
async def test_every_reply_on_the_wire_is_within_the_ratio(host: str, requests: list[bytes]) -> None:
    """reply_len <= 2.2 x request_len for every reply a real server socket sends, over at most
    20 x 30 generated requests; and every request the codec accepts is answered."""
    async with trio.open_nursery() as nursery:  # each example runs in its own event loop
        server = await start(nursery, host)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with trio.socket.socket(family, socket.SOCK_DGRAM) as client:
            await client.bind((host, 0))
            client_host, client_port = local(client)
            for data in requests:
                reply = await answer_or_none(client, (host, server.port), data)
                try:
                    request = codec.parse_binding_request(data)
                except StunError:
                    assert reply is None
                    continue
                assert reply is not None
                assert within_ratio(reply, data), (len(reply), len(data), data.hex())
                assert reply == derpd_reply(request, client_host, client_port)
        assert server.stats.amplification == 0
        nursery.cancel_scope.cancel()
