"""TLS ClientHello reader: real hellos from Python's ssl module, hand-built ones, hostile ones.

Real hellos come from OpenSSL (the ssl module's client over memory BIOs), so the reader is checked
against bytes it did not help make; hand-built ones come from the small encoder below, written
from RFC 8446 §4.1.2, RFC 6066 §3 and RFC 7301 §3.1, not from the reader.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable, Iterator

import pytest
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from derpd.proto.tlshello import (
    ACME_TLS_1,
    MAX_CLIENT_HELLO,
    ClientHello,
    ClientHelloError,
    ClientHelloReader,
    parse_client_hello,
)

Outcome = ClientHello | type[ClientHelloError] | None
HOST = "derp.example.com"

# -- encoding -------------------------------------------------------------------------------------


def vec(n: int, data: bytes) -> bytes:
    """A TLS vector: ``data`` behind an ``n``-byte big-endian length."""
    return len(data).to_bytes(n, "big") + data


def ext(kind: int, data: bytes) -> bytes:
    return kind.to_bytes(2, "big") + vec(2, data)


def sni_ext(*names: bytes, name_type: int = 0) -> bytes:
    return ext(0, vec(2, b"".join(bytes([name_type]) + vec(2, n) for n in names)))


def alpn_ext(*names: bytes) -> bytes:
    return ext(16, vec(2, b"".join(vec(1, n) for n in names)))


def body(
    extensions: bytes | None = b"",
    *,
    version: int = 0x0303,
    random: bytes = bytes(range(32)),
    session_id: bytes = b"",
    suites: bytes = b"\x13\x01\x13\x02",
    compression: bytes = b"\x00",
) -> bytes:
    """A ClientHello body; ``extensions`` is the raw contents of the extensions block, None for no block."""
    out = version.to_bytes(2, "big") + random + vec(1, session_id) + vec(2, suites) + vec(1, compression)
    return out if extensions is None else out + vec(2, extensions)


def handshake(hello_body: bytes, msg_type: int = 1) -> bytes:
    return bytes([msg_type]) + vec(3, hello_body)


def records(message: bytes, sizes: Iterable[int] = (), version: int = 0x0301, content_type: int = 22) -> bytes:
    """``message`` in handshake records of the given fragment sizes (cycled), the rest in 2^14 pieces."""
    out = []
    sizes = list(sizes) or [1 << 14]
    i = n = 0
    while i < len(message):
        size = min(sizes[n % len(sizes)], 1 << 14)
        fragment = message[i : i + size]
        out.append(bytes([content_type]) + version.to_bytes(2, "big") + vec(2, fragment))
        i += size
        n += 1
    return b"".join(out)


def tls(hello_body: bytes) -> bytes:
    """A whole hello in one record."""
    return records(handshake(hello_body))


def unrecord(data: bytes) -> bytes:
    """The handshake bytes carried by a stream of records (the inverse of :func:`records`)."""
    out = b""
    while data:
        length = int.from_bytes(data[3:5], "big")
        out += data[5 : 5 + length]
        data = data[5 + length :]
    return out


# -- real hellos ----------------------------------------------------------------------------------


def real_hello(
    alpn: list[str] | None = None,
    server_name: str | None = None,
    tls12: bool = False,
    ctx: ssl.SSLContext | None = None,
) -> bytes:
    """The first flight of an OpenSSL client (Python's ssl module over memory BIOs)."""
    if ctx is None:
        ctx = ssl.create_default_context()
        if tls12:
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        if alpn:
            ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


REAL = [
    pytest.param(
        tls12, alpn, sni, id=f"{'tls12' if tls12 else 'tls13'}-{sni or 'nosni'}-{'+'.join(alpn or ['noalpn'])}"
    )
    for tls12 in (False, True)
    for sni in (None, HOST, "Mixed.Case.Example.", "xn--bcher-kva.example")
    for alpn in (None, ["acme-tls/1"], ["h2", "http/1.1"])
]


def outcome(chunks: Iterable[bytes], max_size: int = MAX_CLIENT_HELLO) -> Outcome:
    """Feed chunks until a result or an error: the ClientHello, None (need more) or ClientHelloError."""
    reader = ClientHelloReader(max_size)
    fed = b""
    try:
        for chunk in chunks:
            fed += chunk
            result = reader.feed(chunk)
            assert reader.buffered == fed
            if result is not None:
                return result
    except ClientHelloError as e:
        message = str(e)
        assert message and "\n" not in message and len(message) < 200, message
        assert message.isascii() and message.isprintable(), message
        return ClientHelloError
    return None


def bytewise(data: bytes) -> Iterator[bytes]:
    return (data[i : i + 1] for i in range(len(data)))


@pytest.mark.parametrize(("tls12", "alpn", "sni"), REAL)
def test_real_hellos(tls12: bool, alpn: list[str] | None, sni: str | None) -> None:
    data = real_hello(alpn, sni, tls12)
    expected = ClientHello(sni, tuple(a.encode() for a in alpn or ()), 0x0303)
    assert parse_client_hello(data) == expected
    assert expected.acme_tls_alpn == (alpn == ["acme-tls/1"])
    reader = ClientHelloReader()
    for i in range(len(data) - 1):
        assert reader.feed(data[i : i + 1]) is None, f"a hello after {i + 1} of {len(data)} bytes"
        assert reader.buffered == data[: i + 1]
    assert reader.feed(data[-1:]) == expected
    assert reader.buffered == data
    assert reader.hello == expected


def test_ip_address_sends_no_sni() -> None:
    """RFC 6066: no IP literals in server_name; OpenSSL leaves the extension out."""
    assert parse_client_hello(real_hello(["acme-tls/1"], "192.0.2.1")) == ClientHello(None, (ACME_TLS_1,), 0x0303)


@pytest.mark.parametrize(("tls12", "alpn", "sni"), REAL[::5])
@pytest.mark.parametrize("sizes", [[1], [2, 3], [7], [100, 1], [4], [5, 200]], ids=str)
def test_real_hellos_in_other_records(tls12: bool, alpn: list[str] | None, sni: str | None, sizes: list[int]) -> None:
    data = real_hello(alpn, sni, tls12)
    expected = parse_client_hello(data)
    message = unrecord(data)
    assert len(message) == int.from_bytes(message[1:4], "big") + 4
    for version in (0x0300, 0x0301, 0x0303, 0x0304):
        again = records(message, sizes, version)
        assert parse_client_hello(again) == expected
        assert outcome(bytewise(again)) == expected
        assert outcome([again[:9], again[9:]]) == expected


def test_bytes_after_the_hello_are_kept() -> None:
    data = real_hello(["h2"], HOST)
    expected = parse_client_hello(data)
    after = b"\x14\x03\x03\x00\x01\x01" + b"\x17\x03\x03\x00\x05early" + b"\x80garbage"
    reader = ClientHelloReader()
    assert reader.feed(data[:-1]) is None
    assert reader.feed(data[-1:] + after[:3]) == expected
    assert reader.feed(after[3:]) == expected  # the same hello again, still buffering
    assert reader.feed(b"") == expected
    assert reader.buffered == data + after
    # A record longer than the hello: its rest is not looked at either.
    message = unrecord(data)
    one = b"\x16\x03\x01" + vec(2, message + b"\x02\x00\x00\x00\xff")
    assert parse_client_hello(one) == expected


# -- replay into a real server --------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def _pump(client: ssl.SSLObject, server: ssl.SSLObject, bios: tuple[ssl.MemoryBIO, ...]) -> None:
    """Move bytes both ways until both ends finish the handshake."""
    c_in, c_out, s_in, s_out = bios
    done = [False, False]
    for _ in range(20):
        for n, end in enumerate((client, server)):
            if not done[n]:
                try:
                    end.do_handshake()
                    done[n] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done):
            return
    raise AssertionError("handshake did not finish")


@pytest.mark.parametrize("tls12", [False, True], ids=["tls13", "tls12"])
@pytest.mark.parametrize("alpn", [["acme-tls/1"], ["h2", "http/1.1"], None], ids=str)
@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_replay_into_a_real_server(ca: trustme.CA, tls12: bool, alpn: list[str] | None, chunk: int) -> None:
    """What the TLS listener does: read the hello, pick a context by its ALPN, replay the bytes."""
    contexts = {}
    for name, protocols in (("acme", ["acme-tls/1"]), ("derp", ["h2", "http/1.1"])):
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(HOST, common_name=f"{name} certificate").configure_cert(ctx)
        ctx.set_alpn_protocols(protocols)
        contexts[name] = ctx
    seen_sni: list[str | None] = []

    def sni_callback(_obj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        seen_sni.append(name)

    for ctx in contexts.values():
        ctx.sni_callback = sni_callback  # type: ignore[assignment]

    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    if tls12:
        client_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if alpn:
        client_ctx.set_alpn_protocols(alpn)
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=HOST)
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    first = c_out.read()

    reader = ClientHelloReader()
    hello = None
    for i in range(0, len(first), chunk):
        hello = reader.feed(first[i : i + chunk])
    assert hello is not None
    assert hello.server_name == HOST
    ctx = contexts["acme" if hello.acme_tls_alpn else "derp"]
    server = ctx.wrap_bio(s_in, s_out, server_side=True)
    s_in.write(reader.buffered)
    _pump(client, server, (c_in, c_out, s_in, s_out))

    assert seen_sni == [hello.server_name]  # OpenSSL read the same SNI from the replayed bytes
    assert client.selected_alpn_protocol() == server.selected_alpn_protocol() == (alpn[0] if alpn else None)
    subject = dict(x[0] for x in client.getpeercert()["subject"])
    assert subject["commonName"] == ("acme certificate" if alpn == ["acme-tls/1"] else "derp certificate")
    client.write(b"ping")
    s_in.write(c_out.read())
    assert server.read(4) == b"ping"


# -- hand-built hellos ----------------------------------------------------------------------------


def test_old_style_hello_without_extensions() -> None:
    for version in (0x0300, 0x0301):
        data = records(handshake(body(None, version=version, suites=b"\x00\x2f")), version=version)
        assert parse_client_hello(data) == ClientHello(None, (), version)
        assert outcome(bytewise(data)) == ClientHello(None, (), version)


def test_empty_extensions_block_and_unknown_extensions() -> None:
    assert parse_client_hello(tls(body(b""))) == ClientHello(None, (), 0x0303)
    exts = ext(0xFAFA, b"") + ext(43, b"\x02\x03\x04") + sni_ext(b"a.b") + ext(0x0A0A, b"\x00") + alpn_ext(b"x")
    assert parse_client_hello(tls(body(exts))) == ClientHello("a.b", (b"x",), 0x0303)


def test_sni_and_alpn_are_reported_as_sent() -> None:
    names = (b"acme-tls/1", b"h2", b"\x00\xff binary", b"x" * 255, b"h2")  # duplicates and binary names: as sent
    data = tls(body(sni_ext(b"EXAMPLE.com.") + alpn_ext(*names)))
    assert parse_client_hello(data) == ClientHello("EXAMPLE.com.", names, 0x0303)
    longest = 0xFFFF - 4 - 2 - 3  # what an extensions block of at most 2^16-1 bytes leaves for one host_name
    assert ClientHelloReader(1 << 17).feed(tls(body(sni_ext(b"~" * longest)))) == ClientHello("~" * longest, (), 0x0303)


def test_other_server_name_types_are_skipped() -> None:
    other = ext(0, vec(2, b"\x01" + vec(2, b"\xff\x00 whatever") + b"\x00" + vec(2, b"host") + b"\x07" + vec(2, b"x")))
    assert parse_client_hello(tls(body(other))).server_name == "host"
    assert parse_client_hello(tls(body(sni_ext(b"\xff\xfe", name_type=9)))).server_name is None


def test_limits_at_their_edges() -> None:
    assert parse_client_hello(tls(body(session_id=bytes(32)))).legacy_version == 0x0303
    assert parse_client_hello(tls(body(suites=b"\x00\xff" * 1000, compression=bytes(255))))
    smallest = body(None, suites=b"\x00\x2f")
    assert len(smallest) == 41
    assert parse_client_hello(tls(smallest)) == ClientHello(None, (), 0x0303)
    # A hello exactly at max_size passes; one byte more does not.
    padding = ext(21, bytes(MAX_CLIENT_HELLO - len(body(b"")) - 4))
    at_limit = body(padding)
    assert len(at_limit) == MAX_CLIENT_HELLO
    assert parse_client_hello(records(handshake(at_limit))) == ClientHello(None, (), 0x0303)
    over = body(ext(21, bytes(MAX_CLIENT_HELLO - len(body(b"")) - 3)))
    with pytest.raises(ClientHelloError, match="over the limit"):
        parse_client_hello(records(handshake(over)))
    reader = ClientHelloReader(max_size=100)
    assert reader.feed(tls(body(ext(99, bytes(100 - len(body(b"")) - 4))))) is not None


def test_acme_property() -> None:
    assert ClientHello("x", (b"h2", ACME_TLS_1), 0x0303).acme_tls_alpn
    assert not ClientHello("x", (b"acme-tls/2",), 0x0303).acme_tls_alpn


def test_max_size_must_be_sane() -> None:
    for bad in (0, 40, 1 << 24):
        with pytest.raises(ValueError, match="max_size"):
            ClientHelloReader(bad)
    assert ClientHelloReader(41).max_size == 41


# -- malformed ------------------------------------------------------------------------------------

GOOD_EXTS = sni_ext(b"derp.example.com") + alpn_ext(b"acme-tls/1", b"h2") + ext(43, b"\x02\x03\x04")
GOOD = body(GOOD_EXTS, session_id=bytes(range(32)))

MALFORMED = {
    "duplicate-unknown-extension": body(ext(43, b"") + ext(99, b"") + ext(43, b"")),
    "duplicate-sni": body(sni_ext(b"a") + sni_ext(b"b")),
    "duplicate-alpn": body(alpn_ext(b"h2") + alpn_ext(b"h2")),
    "alpn-empty-list": body(ext(16, b"\x00\x00")),
    "alpn-no-list": body(ext(16, b"")),
    "alpn-zero-length-name": body(alpn_ext(b"h2", b"")),
    "alpn-list-stray-byte": body(ext(16, vec(2, vec(1, b"h2")) + b"\x00")),
    "alpn-name-past-list": body(ext(16, vec(2, b"\x05h2"))),
    "sni-non-ascii": body(sni_ext("bücher.example".encode())),
    "sni-nul": body(sni_ext(b"derp.example.com\x00.evil")),
    "sni-space": body(sni_ext(b"derp example")),
    "sni-control": body(sni_ext(b"derp\x1b[31m")),
    "sni-del": body(sni_ext(b"derp\x7f")),
    "sni-empty-name": body(sni_ext(b"")),
    "sni-empty-list": body(ext(0, b"\x00\x00")),
    "sni-no-list": body(ext(0, b"")),
    "sni-two-host-names": body(sni_ext(b"a", b"b")),
    "sni-truncated-entry": body(ext(0, vec(2, b"\x00\x00"))),
    "sni-list-stray-byte": body(ext(0, vec(2, b"\x00" + vec(2, b"a")) + b"\x00")),
    "session-id-33": body(session_id=bytes(33)),
    "no-cipher-suites": body(suites=b""),
    "odd-cipher-suites": body(suites=b"\x13\x01\x13"),
    "no-compression-methods": body(compression=b""),
    "version-2": body(version=0x0200),
    "version-0xfefd-dtls": body(version=0xFEFD),
    "trailing-byte-after-extensions": body(b"") + b"\x00",
    "trailing-bytes-after-extensions": body(GOOD_EXTS) + b"\x00\x00\x00\x00",
    "one-byte-extensions-length": body(None) + b"\x00",
    "extension-header-cut": body(b"\x00\x2b\x00"),
    "extension-past-block": body(b"\x00\x2b\x00\x05abc"),
    "too-short": bytes(40),
}


@pytest.mark.parametrize("hello_body", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed(hello_body: bytes) -> None:
    data = tls(hello_body)
    with pytest.raises(ClientHelloError):
        parse_client_hello(data)
    assert outcome(bytewise(data)) is ClientHelloError
    assert outcome([data + b"\x16\x03\x01\x00\x01\x00"]) is ClientHelloError


def _length_fields(hello_body: bytes) -> Iterator[tuple[str, int, int]]:
    """(name, offset, size) of every length field of a body built by :func:`body` from GOOD_EXTS."""
    i = 34
    yield "legacy_session_id", i, 1
    i += 1 + hello_body[i]
    yield "cipher_suites", i, 2
    i += 2 + int.from_bytes(hello_body[i : i + 2], "big")
    yield "legacy_compression_methods", i, 1
    i += 1 + hello_body[i]
    yield "extensions", i, 2
    i += 2
    while i < len(hello_body):
        kind = int.from_bytes(hello_body[i : i + 2], "big")
        size = int.from_bytes(hello_body[i + 2 : i + 4], "big")
        yield f"extension-{kind}", i + 2, 2
        if kind == 0:
            yield "server_name_list", i + 4, 2
            yield "host_name", i + 7, 2
        if kind == 16:
            yield "protocol_name_list", i + 4, 2
            yield "protocol_name-1", i + 6, 1
            yield "protocol_name-2", i + 7 + hello_body[i + 6], 1
        i += 4 + size


def _lies() -> Iterator[object]:
    for name, offset, size in _length_fields(GOOD):
        for delta in (-1, 1, 2, 255):
            value = int.from_bytes(GOOD[offset : offset + size], "big") + delta
            if 0 <= value < 1 << (8 * size):
                lie = GOOD[:offset] + value.to_bytes(size, "big") + GOOD[offset + size :]
                yield pytest.param(lie, id=f"{name}{delta:+d}")


def test_the_lies_are_where_they_should_be() -> None:
    assert [n for n, _, _ in _length_fields(GOOD)] == [
        "legacy_session_id",
        "cipher_suites",
        "legacy_compression_methods",
        "extensions",
        "extension-0",
        "server_name_list",
        "host_name",
        "extension-16",
        "protocol_name_list",
        "protocol_name-1",
        "protocol_name-2",
        "extension-43",
    ]
    assert parse_client_hello(tls(GOOD)) == ClientHello("derp.example.com", (ACME_TLS_1, b"h2"), 0x0303)


@pytest.mark.parametrize("lie", list(_lies()))
def test_lying_inner_length(lie: bytes) -> None:
    """Every length inside the hello, one too small or too big, is an error (the hello's own length is right)."""
    assert outcome([tls(lie)]) is ClientHelloError
    assert outcome(bytewise(tls(lie))) is ClientHelloError


def test_lying_outer_lengths() -> None:
    message = handshake(GOOD)
    # The handshake length one short: the extensions block runs past the end of the hello.
    short = b"\x01" + (len(GOOD) - 1).to_bytes(3, "big") + GOOD
    assert outcome([records(short)]) is ClientHelloError
    # One too long: a byte after the extensions block, an error even before that byte is in.
    long = b"\x01" + (len(GOOD) + 1).to_bytes(3, "big") + GOOD
    assert outcome([records(long)]) is ClientHelloError
    assert outcome([records(long + b"\x00")]) is ClientHelloError
    # The record one byte short: what follows is read as the next record's header.
    data = tls(GOOD)
    cut = data[:3] + (len(message) - 1).to_bytes(2, "big") + data[5:]
    assert outcome([cut]) is ClientHelloError  # the hello's last byte (0x02) is no content type
    assert outcome([data[:3] + b"\x00\x00" + data[5:]]) is ClientHelloError  # an empty record
    # The record one byte long: the hello is complete anyway, the record's tail is not looked at.
    assert outcome([data[:3] + (len(message) + 1).to_bytes(2, "big") + data[5:]]) == parse_client_hello(data)


EARLY = {
    "http": (b"GET / HTTP/1.1\r\nHost: derp.example.com\r\n\r\n", 1),
    "http-connect": (b"CONNECT derp.example.com:443 HTTP/1.1\r\n\r\n", 1),
    "sslv2-hello": (bytes.fromhex("80 2e 01 0002 0015 0000 0010") + bytes(37), 1),
    "sslv2-3byte-header": (b"\x00\x2e\x00\x01\x03\x01", 1),
    "alert": (b"\x15\x03\x03\x00\x02\x02\x28", 1),
    "change-cipher-spec": (b"\x14\x03\x03\x00\x01\x01", 1),
    "application-data": (b"\x17\x03\x03\x00\x10" + bytes(16), 1),
    "proxy-v1": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", 1),
    "proxy-v2": (b"\r\n\r\n\x00\r\nQUIT\n!\x11\x00\x0c", 1),
    "record-version-2": (b"\x16\x02\x00\x00\x10", 2),
    "record-version-0x0305": (b"\x16\x03\x05\x00\x10", 3),
    "record-length-over-2^14": (b"\x16\x03\x01\x41\x00", 4),
    "record-length-2^14+1": (b"\x16\x03\x01\x40\x01", 5),
    "record-length-0": (b"\x16\x03\x01\x00\x00\x16\x03\x01", 5),
    "server-hello": (b"\x16\x03\x03\x00\x40\x02\x00\x00\x3c", 6),
    "handshake-length-16MiB": (b"\x16\x03\x03\x40\x00\x01\xff\xff\xff", 7),
    "handshake-length-65537": (b"\x16\x03\x03\x40\x00\x01\x01\x00\x01", 9),
    "handshake-length-40": (b"\x16\x03\x03\x40\x00\x01\x00\x00\x28", 9),
    "hello-version-0x0200": (b"\x16\x03\x03\x00\x30\x01\x00\x00\x2c\x02\x00", 11),
    "session-id-33": (b"\x16\x03\x03\x00\x30\x01\x00\x00\x2c\x03\x03" + bytes(32) + b"\x21", 44),
}


@pytest.mark.parametrize(("data", "proof"), EARLY.values(), ids=EARLY.keys())
def test_refused_as_soon_as_the_bytes_prove_it(data: bytes, proof: int) -> None:
    """Not TLS, or not a hello derpd can read: refused at byte ``proof``, not after waiting for more."""
    reader = ClientHelloReader()
    for i in range(proof - 1):
        assert reader.feed(data[i : i + 1]) is None, f"refused after {i + 1} bytes, expected {proof}"
    with pytest.raises(ClientHelloError) as info:
        reader.feed(data[proof - 1 : proof])
    assert outcome([data]) is ClientHelloError
    # It stays failed and stops buffering.
    with pytest.raises(ClientHelloError) as again:
        reader.feed(b"\x16\x03\x01")
    assert again.value is info.value
    assert reader.buffered == data[:proof]


def test_error_messages_are_one_escaped_line() -> None:
    for data in (b"\x1b[2J\r\nEvil\x00\xff" * 4, b"\x16\x03\x03\x00\x01\x17", b"\x16\x03\x03\x00\x01\x01\x00"):
        with pytest.raises(ClientHelloError) as info:
            parse_client_hello(data + bytes(100))
        message = str(info.value)
        assert message.isascii() and message.isprintable() and len(message) < 200, message
    with pytest.raises(ClientHelloError, match="GET / H"):
        parse_client_hello(b"GET / HTTP/1.1\r\n")


def test_continuation_record_of_another_type() -> None:
    message = handshake(GOOD)
    data = records(message[:50]) + records(message[50:], content_type=23)
    with pytest.raises(ClientHelloError, match="content type 23 in the middle"):
        parse_client_hello(data)
    data = records(message[:50]) + b"\x16\x02\x00" + records(message[50:])[3:]
    with pytest.raises(ClientHelloError):
        parse_client_hello(data)


def test_incomplete() -> None:
    data = tls(GOOD)
    for cut in (0, 1, 5, 9, 44, len(data) - 1):
        with pytest.raises(ClientHelloError, match="incomplete"):
            parse_client_hello(data[:cut])
        assert ClientHelloReader().feed(data[:cut]) is None


def test_oversized_hello_is_refused_without_buffering_it() -> None:
    """A length over max_size is refused on its first byte, whatever follows."""
    reader = ClientHelloReader()
    header = b"\x16\x03\x01\x40\x00" + b"\x01\x01\x00\x01"  # a hello of 65537 bytes
    assert reader.feed(header[:7]) is None
    with pytest.raises(ClientHelloError, match="over the limit of 65536"):
        reader.feed(header[7:] + bytes(4096))
    with pytest.raises(ClientHelloError):
        reader.feed(bytes(1 << 20))
    assert len(reader.buffered) == len(header) + 4096
    # A smaller max_size refuses a real hello.
    with pytest.raises(ClientHelloError, match="over the limit of 100"):
        ClientHelloReader(100).feed(real_hello(["h2"], HOST))


def test_tiny_records_cannot_make_it_buffer_much_more() -> None:
    """1-byte records make six bytes of every hello byte; the reader stops at 2 x (4 + max_size)."""
    reader = ClientHelloReader(max_size=1000)
    message = handshake(body(ext(21, bytes(1000 - len(body(b"")) - 4))))
    data = records(message, [1])
    fed = 0
    with pytest.raises(ClientHelloError, match="too many small records"):
        for i in range(0, len(data), 64):
            reader.feed(data[i : i + 64])
            fed = i + 64
    assert fed <= reader.max_buffer == 2008
    # The same hello in 50-byte records is fine, and so is a small hello in 1-byte records.
    assert ClientHelloReader(max_size=1000).feed(records(message, [50])) is not None
    assert parse_client_hello(records(handshake(GOOD), [1])) == parse_client_hello(tls(GOOD))


def test_byte_at_a_time_of_a_large_hello_is_linear() -> None:
    """Past its first KiB the body is re-checked each time it doubles, not on every byte: 64 KiB fed a
    byte at a time takes a fraction of a second."""
    data = records(handshake(body(ext(21, bytes(MAX_CLIENT_HELLO - len(body(b"")) - 4)))))
    assert outcome(bytewise(data)) == ClientHello(None, (), 0x0303)


# -- properties -----------------------------------------------------------------------------------

visible = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
host_names = st.text(visible, min_size=1, max_size=300)
protocol_names = st.binary(min_size=1, max_size=255)


@st.composite
def generated(draw: st.DrawFn) -> tuple[bytes, ClientHello]:
    """A valid hello in records, and what it offers."""
    version = draw(st.sampled_from([0x0300, 0x0301, 0x0302, 0x0303]) | st.integers(0x0300, 0x03FF))
    mode = draw(st.sampled_from(["none", "empty", "some", "some"]))
    server_name = alpn = None
    exts: list[bytes] = []
    if mode == "some":
        server_name = draw(st.none() | host_names)
        alpn = draw(st.none() | st.lists(protocol_names, min_size=1, max_size=6))
        others = draw(st.lists(st.tuples(st.integers(1, 255), st.binary(max_size=20)), max_size=2))
        if server_name is not None or others:
            entries = [bytes([t]) + vec(2, n) for t, n in others]
            if server_name is not None:
                entries.insert(draw(st.integers(0, len(entries))), b"\x00" + vec(2, server_name.encode()))
            exts.append(ext(0, vec(2, b"".join(entries))))
        if alpn is not None:
            exts.append(alpn_ext(*alpn))
        unknown = draw(st.dictionaries(st.integers(1, 0xFFFF).filter(lambda t: t != 16), st.binary(max_size=64)))
        exts += [ext(t, d) for t, d in unknown.items()]
        exts = draw(st.permutations(exts))
    hello_body = body(
        None if mode == "none" else b"".join(exts),
        version=version,
        random=draw(st.binary(min_size=32, max_size=32)),
        session_id=draw(st.binary(max_size=32)),
        suites=b"".join(s.to_bytes(2, "big") for s in draw(st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=50))),
        compression=draw(st.binary(min_size=1, max_size=4)),
    )
    sizes = draw(st.lists(st.integers(1, 1 << 14), max_size=6))
    data = records(handshake(hello_body), sizes, draw(st.integers(0x0300, 0x0304)))
    return data, ClientHello(server_name, tuple(alpn or ()), version)


def chunks_of(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hello=generated(), cuts=st.lists(st.integers(0, 1 << 16), max_size=12), tail=st.binary(max_size=64))
def test_generated_round_trip(hello: tuple[bytes, ClientHello], cuts: list[int], tail: bytes) -> None:
    data, expected = hello
    assert parse_client_hello(data) == expected
    assert parse_client_hello(data + tail) == expected
    assert outcome(chunks_of(data + tail, cuts)) == expected
    reader = ClientHelloReader()
    for piece in chunks_of(data, cuts):
        reader.feed(piece)
    assert reader.feed(tail) == expected
    assert reader.buffered == data + tail


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hello=generated(), cut=st.integers(0, 1 << 16))
def test_truncated_hello_needs_more(hello: tuple[bytes, ClientHello], cut: int) -> None:
    """Every strict prefix of a valid hello is "need more", never an error or a wrong answer."""
    data, expected = hello
    reader = ClientHelloReader()
    for i in range(len(data) - 1):
        assert reader.feed(data[i : i + 1]) is None
    assert reader.feed(data[-1:]) == expected
    prefix = data[: cut % len(data)]
    assert ClientHelloReader().feed(prefix) is None
    assert outcome(bytewise(prefix)) is None


@settings(max_examples=500, deadline=None)
@given(blob=st.binary(max_size=600) | st.binary(max_size=600).map(lambda b: b"\x16\x03\x01" + b), cuts=st.data())
def test_arbitrary_bytes_only_clienthelloerror(blob: bytes, cuts: st.DataObject) -> None:
    whole = outcome([blob])
    assert whole is None or whole is ClientHelloError or isinstance(whole, ClientHello)
    assert outcome(chunks_of(blob, cuts.draw(st.lists(st.integers(0, 1000), max_size=8)))) == whole
    assert outcome(bytewise(blob)) == whole


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    hello=generated(),
    edits=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=4),
    cuts=st.lists(st.integers(0, 1 << 16), max_size=8),
)
def test_mutated_hellos(hello: tuple[bytes, ClientHello], edits: list[tuple[int, int]], cuts: list[int]) -> None:
    """A valid hello with bytes changed: any outcome but a stray exception, the same however it is fed."""
    data = bytearray(hello[0])
    for where, value in edits:
        data[where % len(data)] = value
    whole = outcome([bytes(data)])
    assert whole is None or whole is ClientHelloError or isinstance(whole, ClientHello)
    assert outcome(chunks_of(bytes(data), cuts)) == whole
    assert outcome(bytewise(bytes(data))) == whole
