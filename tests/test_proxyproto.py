"""PROXY protocol v1/v2 reader, encoders and trusted-proxy matching.

Golden headers are written out by hand from the spec
(https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt), not produced by the
encoders, so the encoders and the reader cannot agree on a shared mistake.
"""

from __future__ import annotations

import ipaddress
import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from derpd.proto.proxyproto import (
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_NOOP,
    PP2_TYPE_UNIQUE_ID,
    V1_MAX_LEN,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderReader,
    ProxyProtocolError,
    encode_v1,
    encode_v2,
    is_trusted,
    parse_trusted,
)

REQUEST = b"GET /derp HTTP/1.1\r\nHost: derp.example.com\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n"
FFFF6 = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
SIG = V2_SIGNATURE
CLIENT_HELLO = bytes.fromhex("16030100f4010000f00303") + bytes(32)


def parse(data: bytes, **kw: int) -> tuple[ProxyHeader, bytes]:
    result = ProxyHeaderReader(**kw).feed(data)
    assert result is not None, "expected a complete header"
    return result


def parse_bytewise(data: bytes, **kw: int) -> tuple[ProxyHeader, bytes] | None:
    reader = ProxyHeaderReader(**kw)
    for i in range(len(data)):
        result = reader.feed(data[i : i + 1])
        if result is not None:
            header, rest = result
            return header, rest + data[i + 1 :]
    return None


def outcome(chunks: list[bytes]) -> object:
    """Feed chunks until a result or error; returns (header, rest-with-unfed-bytes), None, or the error type."""
    reader = ProxyHeaderReader()
    for n, chunk in enumerate(chunks):
        try:
            result = reader.feed(chunk)
        except ProxyProtocolError:
            return ProxyProtocolError
        if result is not None:
            return result[0], result[1] + b"".join(chunks[n + 1 :])
    return None


def v2(ver_cmd: int, fam: int, body: bytes) -> bytes:
    return SIG + bytes([ver_cmd, fam]) + struct.pack("!H", len(body)) + body


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


# -- golden headers ------------------------------------------------------------------------------

V4_BLOCK = bytes.fromhex("c0a80001 c0a8000b dc04 01bb")  # 192.168.0.1:56324 -> 192.168.0.11:443
V6_BLOCK = bytes.fromhex("20010db8000000000000000000000001 20010db8000000000000000000000002 3039 01bb")
TLVS = tlv(PP2_TYPE_ALPN, b"h2") + tlv(PP2_TYPE_AUTHORITY, b"derp.example.com") + tlv(PP2_TYPE_NOOP, b"")
TLVS_PARSED = ((PP2_TYPE_ALPN, b"h2"), (PP2_TYPE_AUTHORITY, b"derp.example.com"), (PP2_TYPE_NOOP, b""))

GOLDEN = [
    pytest.param(
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
        ProxyHeader(1, "PROXY", ("192.168.0.1", 56324), ("192.168.0.11", 443)),
        id="v1-tcp4-spec",
    ),
    pytest.param(
        b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
        ProxyHeader(1, "PROXY", ("255.255.255.255", 65535), ("255.255.255.255", 65535)),
        id="v1-tcp4-worst",
    ),
    pytest.param(
        b"PROXY TCP4 0.0.0.0 0.0.0.0 0 0\r\n",
        ProxyHeader(1, "PROXY", ("0.0.0.0", 0), ("0.0.0.0", 0)),
        id="v1-tcp4-zero-ports",
    ),
    pytest.param(
        f"PROXY TCP6 {FFFF6} {FFFF6} 65535 65535\r\n".encode(),
        ProxyHeader(1, "PROXY", (FFFF6, 65535), (FFFF6, 65535)),
        id="v1-tcp6-worst",
    ),
    pytest.param(
        b"PROXY TCP6 2001:DB8::1 2001:db8:0:0:0:0:0:2 12345 443\r\n",
        ProxyHeader(1, "PROXY", ("2001:db8::1", 12345), ("2001:db8::2", 443)),
        id="v1-tcp6-normalised",
    ),
    pytest.param(
        b"PROXY TCP6 ::ffff:10.1.2.3 ::1 1 2\r\n",
        ProxyHeader(1, "PROXY", ("::ffff:10.1.2.3", 1), ("::1", 2)),
        id="v1-tcp6-v4-mapped-as-is",
    ),
    pytest.param(b"PROXY UNKNOWN\r\n", ProxyHeader(1, "PROXY", None, None), id="v1-unknown"),
    pytest.param(
        f"PROXY UNKNOWN {FFFF6} {FFFF6} 65535 65535\r\n".encode(),
        ProxyHeader(1, "PROXY", None, None),
        id="v1-unknown-worst-107",
    ),
    pytest.param(b"PROXY UNKNOWN whatever  at all!\r\n", ProxyHeader(1, "PROXY", None, None), id="v1-unknown-junk"),
    pytest.param(
        v2(0x21, 0x11, V4_BLOCK),
        ProxyHeader(2, "PROXY", ("192.168.0.1", 56324), ("192.168.0.11", 443)),
        id="v2-tcp4",
    ),
    pytest.param(
        v2(0x21, 0x11, V4_BLOCK + TLVS),
        ProxyHeader(2, "PROXY", ("192.168.0.1", 56324), ("192.168.0.11", 443), TLVS_PARSED),
        id="v2-tcp4-tlvs",
    ),
    pytest.param(
        v2(0x21, 0x21, V6_BLOCK + tlv(PP2_TYPE_UNIQUE_ID, b"\x01" * 32)),
        ProxyHeader(2, "PROXY", ("2001:db8::1", 12345), ("2001:db8::2", 443), ((PP2_TYPE_UNIQUE_ID, b"\x01" * 32),)),
        id="v2-tcp6-tlv",
    ),
    pytest.param(
        v2(0x21, 0x21, bytes(10) + b"\xff\xff\x0a\x00\x00\x01" + bytes(15) + b"\x01" + b"\x00\x50\x00\x51"),
        ProxyHeader(2, "PROXY", ("::ffff:10.0.0.1", 80), ("::1", 81)),
        id="v2-tcp6-v4-mapped-as-is",
    ),
    pytest.param(v2(0x20, 0x00, b""), ProxyHeader(2, "LOCAL", None, None), id="v2-local-health-check"),
    pytest.param(
        v2(0x20, 0x11, V4_BLOCK + TLVS), ProxyHeader(2, "LOCAL", None, None, TLVS_PARSED), id="v2-local-skips-addresses"
    ),
    pytest.param(v2(0x20, 0x12, V4_BLOCK), ProxyHeader(2, "LOCAL", None, None), id="v2-local-ignores-dgram"),
    pytest.param(v2(0x20, 0x99, b"anything"), ProxyHeader(2, "LOCAL", None, None), id="v2-local-unknown-family"),
    pytest.param(v2(0x21, 0x00, TLVS), ProxyHeader(2, "PROXY", None, None, TLVS_PARSED), id="v2-unspec-tlvs"),
    pytest.param(
        v2(0x21, 0x31, b"/run/haproxy.sock".ljust(108, b"\0") + b"/run/derpd.sock".ljust(108, b"\0")),
        ProxyHeader(2, "PROXY", None, None),
        id="v2-unix-stream",
    ),
    pytest.param(v2(0x21, 0x10, V4_BLOCK), ProxyHeader(2, "PROXY", None, None), id="v2-inet-unspec-transport"),
]


@pytest.mark.parametrize(("data", "expected"), GOLDEN)
def test_golden(data: bytes, expected: ProxyHeader) -> None:
    assert parse(data) == (expected, b"")
    assert parse(data + REQUEST) == (expected, REQUEST)
    assert parse_bytewise(data + REQUEST) == (expected, REQUEST)


def test_v1_worst_case_is_exactly_the_limit() -> None:
    assert len(f"PROXY UNKNOWN {FFFF6} {FFFF6} 65535 65535\r\n") == V1_MAX_LEN


def test_rest_preserved_exactly_whatever_follows() -> None:
    tail = REQUEST + b"\x00\xff" * 100 + b"PROXY TCP4 1.1.1.1 2.2.2.2 1 2\r\n" + SIG
    for header in (encode_v1(("1.2.3.4", 5), ("5.6.7.8", 9)), encode_v2(("::1", 5), ("::2", 9))):
        reader = ProxyHeaderReader()
        assert reader.feed(header[:3]) is None
        result = reader.feed(header[3:] + tail)
        assert result is not None
        assert result[1] == tail


def test_reader_reads_one_header_only_and_stays_failed() -> None:
    reader = ProxyHeaderReader()
    assert reader.feed(b"PROXY UNKNOWN\r\n") is not None
    with pytest.raises(RuntimeError):
        reader.feed(b"PROXY UNKNOWN\r\n")
    bad = ProxyHeaderReader()
    with pytest.raises(ProxyProtocolError):
        bad.feed(b"X")
    with pytest.raises(ProxyProtocolError):
        bad.feed(b"PROXY UNKNOWN\r\n")


def test_empty_feed_needs_more() -> None:
    reader = ProxyHeaderReader()
    assert reader.feed(b"") is None
    assert reader.feed(b"PROXY UNKNOWN\r") is None
    assert reader.feed(b"") is None
    assert reader.feed(b"\n") == (ProxyHeader(1, "PROXY", None, None), b"")


# -- early rejection ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "fails_at"),
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 1, id="http-request"),
        pytest.param(b"POST / HTTP/1.1\r\n", 2, id="http-post-shares-P"),
        pytest.param(b"PRI * HTTP/2.0\r\n", 3, id="http2-preface"),
        pytest.param(CLIENT_HELLO, 1, id="tls-client-hello"),
        pytest.param(b"proxy TCP4 1.2.3.4 1.2.3.4 1 2\r\n", 1, id="v1-lowercase"),
        pytest.param(b"PROXY  TCP4 1.2.3.4 1.2.3.4 1 2\r\n", 7, id="v1-double-space"),
        pytest.param(b"PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n", 10, id="v1-bad-proto"),
        pytest.param(b"PROXY UDP4 1.2.3.4 1.2.3.4 1 2\r\n", 8, id="v1-udp"),
        pytest.param(b"PROXY UNKNOWNX\r\n", 14, id="v1-unknown-glued"),
        pytest.param(b"PROXY TCP4\t1.2.3.4 1.2.3.4 1 2\r\n", 11, id="v1-tab"),
        pytest.param(b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\n", 31, id="v1-bare-lf"),
        pytest.param(b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\rX", 32, id="v1-cr-without-lf"),
        pytest.param(b"PROXY TCP4 1.2.3.\xc4\xb0 1.2.3.4 1 2\r\n", 18, id="v1-non-ascii"),
        pytest.param(b"\r\n\r\n\x00\r\nQUIX\n", 11, id="v2-bad-signature"),
        pytest.param(b"\r\n\r\n\r\n", 5, id="v2-blank-lines"),
        pytest.param(SIG + b"\x11\x11\x00\x0c", 13, id="v2-version-1"),
        pytest.param(SIG + b"\x31\x11\x00\x0c", 13, id="v2-version-3"),
        pytest.param(SIG + b"\x22\x11\x00\x0c", 13, id="v2-command-2"),
        pytest.param(SIG + b"\x2f\x11\x00\x0c", 13, id="v2-command-f"),
        pytest.param(SIG + b"\x21\x12\x00\x0c", 14, id="v2-tcp4-dgram"),
        pytest.param(SIG + b"\x21\x22\x00\x24", 14, id="v2-tcp6-dgram"),
        pytest.param(SIG + b"\x21\x32\x00\xd8", 14, id="v2-unix-dgram"),
        pytest.param(SIG + b"\x21\x41\x00\x00", 14, id="v2-family-4"),
        pytest.param(SIG + b"\x21\x13\x00\x0c", 14, id="v2-transport-3"),
        pytest.param(SIG + b"\x21\x11\x00\x0b" + bytes(11), 16, id="v2-length-short-for-tcp4"),
        pytest.param(SIG + b"\x21\x21\x00\x0c" + bytes(12), 16, id="v2-length-short-for-tcp6"),
        pytest.param(SIG + b"\x21\x31\x00\x24" + bytes(36), 16, id="v2-length-short-for-unix"),
        pytest.param(SIG + b"\x21\x11\x10\x01", 16, id="v2-length-over-default-cap"),
        pytest.param(SIG + b"\x20\x00\xff\xff", 16, id="v2-local-length-over-cap"),
    ],
)
def test_rejected_as_soon_as_it_cannot_be_a_header(data: bytes, fails_at: int) -> None:
    reader = ProxyHeaderReader()
    for i in range(fails_at - 1):
        assert reader.feed(data[i : i + 1]) is None, f"rejected too early, at byte {i + 1}"
    with pytest.raises(ProxyProtocolError) as info:
        reader.feed(data[fails_at - 1 : fails_at])
    assert "\n" not in str(info.value)
    with pytest.raises(ProxyProtocolError):
        ProxyHeaderReader().feed(data)


def test_v2_cap_is_configurable() -> None:
    big = encode_v2(("1.2.3.4", 1), ("5.6.7.8", 2), tlvs=[(PP2_TYPE_NOOP, bytes(5000))])
    with pytest.raises(ProxyProtocolError, match="over the limit"):
        ProxyHeaderReader().feed(big[:16])  # refused before the body is buffered
    header, rest = parse(big + b"x", max_v2_len=0xFFFF)
    assert header.tlvs == ((PP2_TYPE_NOOP, bytes(5000)),)
    assert rest == b"x"
    at_cap = encode_v2(None, None, tlvs=[(PP2_TYPE_NOOP, bytes(300 - 3))])
    assert parse(at_cap, max_v2_len=300)[0].tlvs == ((PP2_TYPE_NOOP, bytes(297)),)
    with pytest.raises(ProxyProtocolError):
        ProxyHeaderReader(max_v2_len=299).feed(at_cap)
    for bad in (0, 215, 0x10000):
        with pytest.raises(ValueError, match="max_v2_len"):
            ProxyHeaderReader(max_v2_len=bad)


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 1.2.3.4 1.2.3.4 65536 1",
        b"PROXY TCP4 1.2.3.4 1.2.3.4 1 99999",
        b"PROXY TCP4 1.2.3.4 1.2.3.4 080 1",
        b"PROXY TCP4 1.2.3.4 1.2.3.4 00 1",
        b"PROXY TCP4 1.2.3.4 1.2.3.4 -1 1",
        b"PROXY TCP4 1.2.3.4 1.2.3.4 +1 1",
        b"PROXY TCP4 1.2.3.4 1.2.3.4 0x10 1",
        b"PROXY TCP4 1.2.3.4 1.2.3.4 100000 1",
        b"PROXY TCP4 1.2.3.4 1.2.3.4 1",
        b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 3",
        b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 ",
        b"PROXY TCP4 1.2.3.4  1.2.3.4 1 2",
        b"PROXY TCP4 1.2.3.4 1.2.3.4 1  2",
        b"PROXY TCP4",
        b"PROXY TCP4 ",
        b"PROXY ",
        b"PROXY",
        b"PROXY UNKNOWNX",
        b"PROXY TCP4 1.2.3 1.2.3.4 1 2",
        b"PROXY TCP4 1.2.3.256 1.2.3.4 1 2",
        b"PROXY TCP4 01.2.3.4 1.2.3.4 1 2",
        b"PROXY TCP4 localhost 1.2.3.4 1 2",
        b"PROXY TCP4 ::1 ::1 1 2",
        b"PROXY TCP4 ::ffff:1.2.3.4 1.2.3.4 1 2",
        b"PROXY TCP6 1.2.3.4 ::1 1 2",
        b"PROXY TCP6 ::1 1.2.3.4 1 2",
        b"PROXY TCP6 fe80::1%eth0 ::1 1 2",
        b"PROXY TCP6 [::1] ::1 1 2",
        b"PROXY TCP6 1::2::3 ::1 1 2",
    ],
)
def test_v1_bad_lines(line: bytes) -> None:
    with pytest.raises(ProxyProtocolError):
        ProxyHeaderReader().feed(line + b"\r\n")
    with pytest.raises(ProxyProtocolError):
        parse_bytewise(line + b"\r\n")


def test_v1_overlong() -> None:
    line = f"PROXY UNKNOWN {FFFF6} {FFFF6} 65535 655350\r\n".encode()  # 108 bytes
    with pytest.raises(ProxyProtocolError, match="107"):
        ProxyHeaderReader().feed(line)
    reader = ProxyHeaderReader()
    with pytest.raises(ProxyProtocolError, match="107"):
        for i in range(len(line)):
            reader.feed(line[i : i + 1])
    assert i == V1_MAX_LEN - 1  # CR at offset 106 cannot be followed by LF within the limit
    with pytest.raises(ProxyProtocolError, match="107"):
        ProxyHeaderReader().feed(b"PROXY UNKNOWN " + b"a" * 200)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(v2(0x21, 0x11, V4_BLOCK + b"\x04"), id="tlv-1-stray-byte"),
        pytest.param(v2(0x21, 0x11, V4_BLOCK + b"\x04\x00"), id="tlv-2-stray-bytes"),
        pytest.param(v2(0x21, 0x11, V4_BLOCK + b"\x01\x00\x03h2"), id="tlv-value-short"),
        pytest.param(v2(0x21, 0x00, TLVS + b"\x05\xff\xff"), id="unspec-tlv-value-missing"),
        pytest.param(v2(0x20, 0x00, b"\x04\x00\x01"), id="local-tlv-value-missing"),
    ],
)
def test_v2_truncated_tlvs(data: bytes) -> None:
    with pytest.raises(ProxyProtocolError, match="TLV"):
        ProxyHeaderReader().feed(data + REQUEST)


def test_v2_truncated_header_just_waits() -> None:
    data = v2(0x21, 0x21, V6_BLOCK + TLVS)
    for n in range(len(data)):
        assert ProxyHeaderReader().feed(data[:n]) is None


# -- encoders -------------------------------------------------------------------------------------


def test_encoders_match_golden() -> None:
    assert encode_v1(("192.168.0.1", 56324), ("192.168.0.11", 443)) == (
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    )
    assert encode_v1(None, None) == b"PROXY UNKNOWN\r\n"
    assert encode_v2(("192.168.0.1", 56324), ("192.168.0.11", 443)) == v2(0x21, 0x11, V4_BLOCK)
    assert encode_v2(("2001:db8::1", 12345), ("2001:db8::2", 443)) == v2(0x21, 0x21, V6_BLOCK)
    assert encode_v2(None, None, command="LOCAL") == v2(0x20, 0x00, b"")
    assert encode_v2(None, None, tlvs=TLVS_PARSED) == v2(0x21, 0x00, TLVS)


@pytest.mark.parametrize(
    ("source", "destination", "kw"),
    [
        (("1.2.3.4", 1), ("::1", 2), {}),
        (("1.2.3.4", 1), None, {}),
        (("1.2.3.4", 65536), ("1.2.3.4", 2), {}),
        (("1.2.3.4", -1), ("1.2.3.4", 2), {}),
        (("fe80::1%eth0", 1), ("::1", 2), {}),
        (("example.com", 1), ("1.2.3.4", 2), {}),
        (None, None, {"command": "HEALTH"}),
        (None, None, {"tlvs": [(256, b"")]}),
        (None, None, {"tlvs": [(1, bytes(0x10000))]}),
        (None, None, {"tlvs": [(1, bytes(0x8000)), (1, bytes(0x8000))]}),
    ],
)
def test_encoders_refuse_bad_input(source: object, destination: object, kw: dict[str, object]) -> None:
    if not kw:
        with pytest.raises(ValueError):
            encode_v1(source, destination)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        encode_v2(source, destination, **kw)  # type: ignore[arg-type]


# -- properties -----------------------------------------------------------------------------------

ports = st.integers(0, 0xFFFF)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
endpoints = st.one_of(
    st.tuples(st.tuples(ipv4, ports), st.tuples(ipv4, ports)),
    st.tuples(st.tuples(ipv6, ports), st.tuples(ipv6, ports)),
)
tlv_lists = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=5)


@st.composite
def chunked(draw: st.DrawFn, data: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def canonical(host: str) -> str:
    addr = ipaddress.ip_address(host)
    if addr.version == 6 and addr.ipv4_mapped is not None:
        return f"::ffff:{addr.ipv4_mapped}"
    return str(addr)


@settings(max_examples=150, deadline=None)
@given(ends=endpoints, tlvs=tlv_lists, version=st.sampled_from([1, 2]), tail=st.binary(max_size=64), data=st.data())
def test_round_trip_any_chunking(
    ends: tuple[tuple[str, int], tuple[str, int]],
    tlvs: list[tuple[int, bytes]],
    version: int,
    tail: bytes,
    data: st.DataObject,
) -> None:
    (src, sport), (dst, dport) = ends
    wire = encode_v1(ends[0], ends[1]) if version == 1 else encode_v2(ends[0], ends[1], tlvs=tlvs)
    expected = ProxyHeader(
        version,
        "PROXY",
        (canonical(src), sport),
        (canonical(dst), dport),
        tuple(tlvs) if version == 2 else (),
    )
    chunks = data.draw(chunked(wire + tail))
    assert outcome(chunks) == (expected, tail)
    assert outcome([wire + tail]) == (expected, tail)


# Arbitrary bytes, and arbitrary bytes behind each valid-looking prefix so the fuzz reaches deep states.
fuzz_inputs = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda b: b"PROXY " + b, st.binary(max_size=120)),
    st.builds(lambda b: b"PROXY TCP4 " + b, st.binary(max_size=100)),
    st.builds(
        lambda t, b: b"PROXY " + t + b,
        st.sampled_from([b"TCP4 ", b"TCP6 ", b"UNKNOWN"]),
        st.text("0123456789abcdefABCDEF.: \r\n%", max_size=110).map(str.encode),
    ),
    st.builds(lambda b: SIG + b, st.binary(max_size=300)),
    st.builds(
        lambda vc, f, body, extra: v2(vc, f, body) + extra,
        st.sampled_from([0x20, 0x21, 0x22, 0x11]),
        st.integers(0, 255),
        st.binary(max_size=260),
        st.binary(max_size=8),
    ),
)


@settings(max_examples=400, deadline=None)
@given(blob=fuzz_inputs, data=st.data())
def test_arbitrary_bytes_only_raise_protocol_error_and_chunking_never_matters(blob: bytes, data: st.DataObject) -> None:
    whole = outcome([blob])  # any exception other than ProxyProtocolError fails the test here
    assert outcome(data.draw(chunked(blob))) == whole
    if isinstance(whole, tuple):
        header, rest = whole
        assert header.version in (1, 2) and header.command in ("PROXY", "LOCAL")
        assert blob.endswith(rest)


@settings(max_examples=200, deadline=None)
@given(ends=endpoints, tlvs=tlv_lists, pos=st.integers(0, 10_000), byte=st.integers(0, 255))
def test_corrupted_v2_header_parses_or_raises_protocol_error(
    ends: tuple[tuple[str, int], tuple[str, int]], tlvs: list[tuple[int, bytes]], pos: int, byte: int
) -> None:
    wire = bytearray(encode_v2(ends[0], ends[1], tlvs=tlvs))
    wire[pos % len(wire)] = byte
    outcome([bytes(wire) + REQUEST])
    outcome([bytes(wire[:-1])])


# -- trusted proxies ------------------------------------------------------------------------------


def test_parse_trusted() -> None:
    nets = parse_trusted(" 10.0.0.0/8, ::1/128,192.0.2.7 , 2001:db8::/32,")
    assert nets == [
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
        ipaddress.ip_network("192.0.2.7/32"),
        ipaddress.ip_network("2001:db8::/32"),
    ]
    assert parse_trusted("") == []
    assert parse_trusted(" , ") == []


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("10.0.0.1/8", "host bits set; did you mean 10.0.0.0/8"),
        ("10.0.0.0/33", "not an IP address or CIDR"),
        ("proxy.example.com", "not an IP address or CIDR"),
        ("10.0.0.0/8;192.0.2.0/24", "not an IP address or CIDR"),
        ("10.0.0.0/8 192.0.2.0/24", "not an IP address or CIDR"),
        ("fe80::1%eth0", "zone"),
        ("::1/129", "not an IP address or CIDR"),
        ("010.0.0.1", "not an IP address or CIDR"),
    ],
)
def test_parse_trusted_errors(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        parse_trusted(f"127.0.0.1,{text}")
    assert repr(text) in str(info.value)


@pytest.mark.parametrize(
    ("ip", "trusted"),
    [
        ("10.1.2.3", True),
        ("11.0.0.1", False),
        ("::ffff:10.0.0.1", True),  # dual-stack socket view of an IPv4 peer
        ("::ffff:a00:1", True),
        ("::ffff:11.0.0.1", False),
        ("::1", True),
        ("::2", False),
        ("fe80::1%eth0", True),
        ("[fe80::2%2]", True),
        ("fe81::1", True),
        ("2001:db8::1", False),
        ("192.0.2.1", True),  # via the mapped IPv6 network in the list
        ("::ffff:192.0.2.1", True),
        ("", False),
        ("not-an-ip", False),
        ("10.0.0.1:443", False),
    ],
)
def test_is_trusted(ip: str, trusted: bool) -> None:
    nets = parse_trusted("10.0.0.0/8,::1,fe80::/10,::ffff:192.0.2.0/120")
    assert is_trusted(ip, nets) is trusted


def test_is_trusted_nobody() -> None:
    assert not is_trusted("127.0.0.1", parse_trusted(""))
    assert is_trusted("127.0.0.1", iter(parse_trusted("127.0.0.0/8")))
