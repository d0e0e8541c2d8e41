"""The trio STUN responder over real loopback sockets, with real third-party clients.

"No reply" is checked without waiting for a timeout: the test sends the bad packet, then
a valid marker request from the same socket; the server handles datagrams in order, so
the next datagram back must be the marker's reply. ``HANG_GUARD`` only stops a broken
build from hanging; no test measures speed.
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

from stun import codec
from stun.codec import RequestKind, StunError
from stun.server import StunServer, StunStats

from .conftest import load_vector
from .test_stun_codec import DERPD_VERDICT

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


async def start(nursery: trio.Nursery, host: str = "127.0.0.1", **kwargs: Any) -> StunServer:
    server = StunServer(host, 0, **kwargs)
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


async def marker(sock: trio.socket.SocketType, dest: tuple[str, int]) -> list[bytes]:
    """Send a fresh Tailscale request; return every other datagram that came back before its reply."""
    txid = codec.new_txid()
    await sock.sendto(codec.binding_request(txid), dest)
    others = []
    for _ in range(10_000):
        reply, _ = await receive(sock)
        if codec.parse_response(reply).txid == txid:
            return others
        others.append(reply)
    raise AssertionError("marker reply never arrived")


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
    assert stats.requests() == {"success": answered + markers, "not_stun": dropped, "read_error": 0, "write_error": 0}
    assert stats.addrfamily() == {"ipv4": answered + markers, "ipv6": 0}
    assert stats.by_kind == {"tailscale": 4 + markers, "rfc5389": 5, "rfc3489": 2}


async def test_live_server_exchanges(nursery: trio.Nursery, udp_client: MakeClient) -> None:
    """Replay Go derper's recorded exchanges; from its recorded port, we answer byte-identically."""
    server = await start(nursery)
    dest = ("127.0.0.1", server.port)
    recorded_host, recorded_port = VECTORS["live_server"]["client_addr"].rsplit(":", 1)
    try:
        client = await udp_client(recorded_host, int(recorded_port))
    except OSError:  # port taken on this machine: compare with stun.Response for our own address
        client = await udp_client()
    host, port = local(client)
    on_recorded_port = port == int(recorded_port)
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
    assert server.stats.requests() == {"success": 1, "not_stun": 0, "read_error": 0, "write_error": 1}
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
    expected_answers = 0
    for dgram in datagrams:
        try:
            codec.parse_binding_request(dgram)
            expected_answers += 1
        except StunError:
            pass
    expected_drops = len(datagrams) - expected_answers
    assert expected_drops > 1500  # the flood is mostly garbage

    answers = 0
    markers = 0
    chunk = 50  # bounded bursts, so neither side's receive buffer overflows
    for start_at in range(0, len(datagrams), chunk):
        for dgram in datagrams[start_at : start_at + chunk]:
            await client.sendto(dgram, dest)
        for reply in await marker(client, dest):
            parsed = codec.parse_response(reply)
            assert (str(parsed.address), parsed.port) == (host, port)
            answers += 1
        markers += 1
    assert answers == expected_answers
    stats = server.stats
    assert stats.not_stun == expected_drops
    assert stats.success == expected_answers + markers
    assert stats.read_error == stats.write_error == 0

    drop_lines = [r for r in stun_log if r.getMessage() == "stun_dropped"]
    assert sum(r.levelno == logging.DEBUG for r in drop_lines) == expected_drops
    info_lines = [r for r in drop_lines if r.levelno >= logging.INFO]
    assert 1 <= len(info_lines) < 5, "a garbage flood must not flood the log"


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
    assert server.stats.requests() == {"success": 21, "not_stun": 0, "read_error": 0, "write_error": 0}


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
