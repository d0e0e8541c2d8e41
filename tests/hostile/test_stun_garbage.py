"""Attack 5: STUN garbage, over 20,000 datagrams of every class.

Random bytes, truncated headers, wrong cookies, lying attribute lengths, bad FINGERPRINTs,
attributes after FINGERPRINT, unknown comprehension-required attributes, empty and 65,507-byte
datagrams, classic RFC 3489 requests, responses and indications instead of requests, random
mutations of valid requests. Every reply that comes back must answer a request we sent and be at
most 2.2 times its size (no amplification for a spoofed source); afterwards a Tailscale request
still gets its answer and the DERP side is healthy.
"""

from __future__ import annotations

import random
import socket
import struct
import zlib
from collections.abc import Callable

import pytest
import trio

from stun import codec

from .conftest import Derpd, assert_healthy

pytestmark = pytest.mark.hostile

COOKIE = codec.MAGIC_COOKIE.to_bytes(4, "big")
MAX_RATIO = 2.2
MAX_UDP = 65507
SOFTWARE, FINGERPRINT, CHANGE_REQUEST = codec.ATTR_SOFTWARE, codec.ATTR_FINGERPRINT, codec.ATTR_CHANGE_REQUEST


def _attr(t: int, value: bytes, length: int | None = None) -> bytes:
    n = len(value) if length is None else length
    return struct.pack("!HH", t, n) + value + b"\x00" * (-len(value) % 4)


def _message(msg_type: int, body: bytes, *, txid: bytes, cookie: bytes = COOKIE, length: int | None = None) -> bytes:
    return struct.pack("!HH", msg_type, len(body) if length is None else length) + cookie + txid + body


def _with_fingerprint(msg: bytes, *, good: bool = True) -> bytes:
    """``msg`` with a FINGERPRINT appended (header length adjusted first, as RFC 5389 §15.5)."""
    msg = msg[:2] + struct.pack("!H", len(msg) - 20 + 8) + msg[4:]
    crc = (zlib.crc32(msg) ^ 0x5354554E) & 0xFFFFFFFF
    return msg + struct.pack("!HHI", FINGERPRINT, 4, crc if good else crc ^ 1)


def datagrams(rng: random.Random) -> list[tuple[str, bytes]]:
    """(class, datagram) for every class of garbage, about 21,000 in all."""
    txid = lambda: rng.randbytes(12)  # noqa: E731
    valid = lambda: codec.binding_request(txid())  # noqa: E731  # Tailscale's own form
    out: list[tuple[str, bytes]] = []

    def add(kind: str, n: int, make: Callable[[], bytes]) -> None:
        out.extend((kind, make()) for _ in range(n))

    add("random", 2500, lambda: rng.randbytes(rng.randint(1, 600)))
    add("random_stun_type", 1000, lambda: b"\x00\x01" + rng.randbytes(rng.randint(18, 200)))
    add("truncated_header", 1000, lambda: valid()[: rng.randint(1, 19)])
    add("empty", 500, lambda: b"")

    def wrong_cookie() -> bytes:
        m = bytearray(valid())
        m[4:8] = rng.randbytes(4)
        return bytes(m)

    add("wrong_cookie", 1500, wrong_cookie)

    def lying_attr_len() -> bytes:
        body = _attr(SOFTWARE, b"tailnode", rng.choice([0, 3, 9, 12, 200, 0xFFFF, rng.randrange(1 << 16)]))
        return (
            _with_fingerprint(_message(1, body, txid=txid())) if rng.random() < 0.5 else _message(1, body, txid=txid())
        )

    add("lying_attribute_length", 1500, lying_attr_len)
    add(
        "bad_fingerprint",
        1000,
        lambda: _with_fingerprint(_message(1, _attr(SOFTWARE, b"tailnode"), txid=txid()), good=False),
    )

    def after_fingerprint() -> bytes:
        msg = valid() + _attr(rng.choice([SOFTWARE, 0x0777, CHANGE_REQUEST]), rng.randbytes(4))
        return msg[:2] + struct.pack("!H", len(msg) - 20) + msg[4:]

    add("attribute_after_fingerprint", 1000, after_fingerprint)

    def unknown_required() -> bytes:
        attrs = b"".join(
            _attr(rng.randrange(0x0030, 0x7FFF), rng.randbytes(rng.choice([0, 1, 4, 8])))
            for _ in range(rng.randint(1, 60))
        )
        cookie = COOKIE if rng.random() < 0.7 else rng.randbytes(4)  # classic ones too
        msg = _message(1, attrs, txid=txid(), cookie=cookie)
        return _with_fingerprint(msg) if rng.random() < 0.3 else msg

    add("unknown_comprehension_required", 1500, unknown_required)

    def unknown_at_max_size() -> bytes:
        n = (MAX_UDP - 20) // 4  # 0-length unknown attributes, as many as fit: the most a reply could list
        body = b"".join(_attr(0x0030 + i % 0x7000, b"") for i in range(n))
        return _message(1, body, txid=txid())

    add("max_size_unknown_attributes", 10, unknown_at_max_size)
    add("max_size_random", 20, lambda: rng.randbytes(MAX_UDP))
    add(
        "max_size_one_attribute",
        20,
        lambda: _message(1, _attr(SOFTWARE, rng.randbytes(MAX_UDP - 24 - 3)[: MAX_UDP - 24]), txid=txid()),
    )
    add("max_size_lying_length", 10, lambda: _message(1, rng.randbytes(MAX_UDP - 20), txid=txid(), length=0xFFFF))

    def classic() -> bytes:
        body = _attr(CHANGE_REQUEST, struct.pack("!I", rng.choice([0, 2, 4, 6]))) if rng.random() < 0.5 else b""
        return struct.pack("!HH", 1, len(body)) + rng.randbytes(16) + body

    add("classic_rfc3489", 1000, classic)
    add(
        "responses_and_indications",
        1000,
        lambda: _message(
            rng.choice([0x0101, 0x0111, 0x0011, 0x0002, 0x0003, 0x0102]), _attr(0x0020, rng.randbytes(8)), txid=txid()
        ),
    )
    add("top_bits_set", 300, lambda: bytes([0xC0 | rng.randrange(64)]) + valid()[1:])
    add("header_length_lies", 1000, lambda: _message(1, b"", txid=txid(), length=rng.randrange(1, 1 << 16)))

    def mutated() -> bytes:
        m = bytearray(valid() if rng.random() < 0.7 else classic())
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(3) if m else 2
            if op == 0:
                m[rng.randrange(len(m))] ^= 1 << rng.randrange(8)
            elif op == 1:
                del m[rng.randrange(len(m)) :]
            else:
                at = rng.randrange(len(m) + 1)
                m[at:at] = rng.randbytes(rng.randint(1, 12))
        return bytes(m)

    add("mutated_valid", 5000, mutated)
    add("valid_rfc5389", 300, lambda: _message(1, b"", txid=txid()))
    add("valid_rfc5389_fingerprint", 300, lambda: _with_fingerprint(_message(1, b"", txid=txid())))
    add("valid_tailscale", 300, valid)
    rng.shuffle(out)
    return out


def _txid_keys(d: bytes) -> list[bytes]:
    """Every transaction id a reply to ``d`` could carry: 12 bytes after a cookie, or 16 classic."""
    if len(d) < 20:
        return []
    keys = [b"c" + d[4:20]]
    if d[4:8] == COOKIE:
        keys.append(b"m" + d[8:20])
    return keys


def _reply_key(r: bytes) -> bytes:
    return b"m" + r[8:20] if r[4:8] == COOKIE else b"c" + r[4:20]


async def test_stun_garbage(server: Derpd) -> None:
    rng = random.Random(0x57C9)
    sent = datagrams(rng)
    assert len(sent) >= 20_000
    smallest: dict[bytes, int] = {}
    for _, d in sent:
        for k in _txid_keys(d):
            smallest[k] = min(smallest.get(k, 1 << 20), len(d))

    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    await sock.bind(("127.0.0.1", 0))
    target = ("127.0.0.1", server.stun_port)
    replies: list[bytes] = []
    done = trio.Event()

    async def receive() -> None:
        while True:
            with trio.move_on_after(1.0 if done.is_set() else 30):
                replies.append(await sock.recv(1 << 16))
                continue
            return

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            for i, (_, d) in enumerate(sent):
                await sock.sendto(d, target)
                if len(d) > 10_000:
                    await trio.sleep(0.002)  # let the server drain its socket: big ones fill it fast
                elif i % 200 == 199:
                    await trio.sleep(0.002)
            done.set()

    over, strangers = [], []
    for r in replies:
        size = smallest.get(_reply_key(r))
        if size is None:
            strangers.append(r[:40])
        elif len(r) > MAX_RATIO * size:
            over.append((len(r), size, r[:24].hex()))
    assert not strangers, f"{len(strangers)} replies to nothing we sent: {strangers[:3]}"
    assert not over, f"{len(over)} replies over {MAX_RATIO}x their request: {over[:5]}"
    answerable = sum(1 for kind, _ in sent if kind.startswith(("valid_", "classic")))
    # UDP may drop some under load; far fewer answers than valid requests means the garbage starved them.
    assert len(replies) >= answerable * 0.5, f"only {len(replies)} replies for {answerable} valid requests"
    print(f"{len(sent)} datagrams, {len(replies)} replies")

    # A Tailscale client still gets its address.
    probe = codec.binding_request()
    await sock.sendto(probe, target)
    with trio.fail_after(5):
        while True:
            reply = await sock.recv(2048)
            if reply[8:20] == probe[8:20]:
                break
    assert codec.parse_response(reply).port == sock.getsockname()[1]
    sock.close()
    await assert_healthy(server)
