"""proto.httphead: the upgrade request's fast path must agree with h11 on everything it accepts.

The property that keeps the fast path honest: whatever ``parse_simple_head`` returns a head for, h11
(fed the same bytes) returns the same request, with the same bytes after it, and the HTTP core's own
checks (head size, version, Content-Length) pass; and the heads real DERP clients send take the fast
path. Anything it declines goes to h11, as before, so every refusal stays h11's.
"""

from __future__ import annotations

import json
from pathlib import Path

import h11
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from derpd.net.httpserver import MAX_CONTENT_LENGTH_DIGITS, MAX_HEAD, header
from derpd.proto import httphead
from derpd.proto.httphead import RequestHead, head_size, parse_simple_head

VECTORS = Path(__file__).parent / "vectors"

# What Tailscale's Go client sends (recorded against derper: tests/vectors/derp-session-http.json) and
# what derpd's own client sends, with and without fast start.
GO_UPGRADE = b"GET /derp HTTP/1.1\r\nHost: 127.0.0.1:33341\r\nUser-Agent: Go-http-client/1.1\r\nConnection: Upgrade\r\nUpgrade: DERP\r\n\r\n"  # noqa: E501
DERPD_UPGRADE = b"GET /derp HTTP/1.1\r\nHost: derp.test:3443\r\nUser-Agent: derpd-client\r\nConnection: Upgrade\r\nUpgrade: DERP\r\nDerp-Fast-Start: 1\r\n\r\n"  # noqa: E501


def h11_view(data: bytes, max_head: int = MAX_HEAD) -> tuple[h11.Request, bytes] | None:
    """What the HTTP core gets from h11 for ``data`` as one read: the request and the bytes after it,
    or None when h11 refuses it, wants more, or the core's own checks would refuse it."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head)
    conn.receive_data(data)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return None
    if not isinstance(event, h11.Request):
        return None
    length = header(event.headers, b"content-length")
    if (
        head_size(event.target, event.headers) > max_head
        or not event.http_version.startswith(b"1.")
        or (length is not None and len(length) > MAX_CONTENT_LENGTH_DIGITS)
    ):
        return None
    return event, bytes(conn.trailing_data[0])


def assert_agrees(data: bytes, max_head: int = MAX_HEAD) -> RequestHead | None:
    """The property: a head the fast path reads is h11's request, byte for byte."""
    head = parse_simple_head(data, max_head)
    if head is None:
        return None
    seen = h11_view(data, max_head)
    assert seen is not None, f"fast path accepted what h11 or the core refuses: {data!r}"
    request, rest = seen
    assert head.method == request.method
    assert head.target == request.target
    assert head.http_version == request.http_version
    assert list(head.headers) == list(request.headers)
    assert data[head.size :] == rest
    return head


def test_the_go_clients_upgrade_takes_the_fast_path() -> None:
    recorded = json.loads((VECTORS / "derp-session-http.json").read_text())
    requests = {r.encode("latin-1") for c in recorded["connections"] for r in c["http"]["requests"]}
    assert GO_UPGRADE in requests
    for raw in [*requests, GO_UPGRADE, DERPD_UPGRADE]:
        head = assert_agrees(raw + b"\x00\x00\x00\x00\x2a" + b"x" * 42)  # DERP bytes may follow at once
        assert head is not None and head.size == len(raw)
        assert head.method == b"GET" and head.target == b"/derp"
        assert header(head.headers, b"upgrade") == b"DERP"


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\n", "incomplete"),
        (b"GET /derp HTTP/1.1\nHost: x\nUpgrade: DERP\n\n", "bare LF (h11 takes it)"),
        (b"GET /derp HTTP/1.1\r\nHost: x\r\n  folded\r\n\r\n", "obs-fold"),
        (b"GET /derp HTTP/1.1\r\nUpgrade: DERP\r\n\r\n", "no Host"),
        (b"GET /derp HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", "two Hosts"),
        (b"GET /derp HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello", "a body"),
        (b"GET /derp HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", "a body"),
        (b"GET /derp HTTP/1.0\r\nHost: x\r\n\r\n", "HTTP/1.0"),
        (b"GET /derp HTTP/2.0\r\nHost: x\r\n\r\n", "HTTP/2"),
        (b"GET /derp HTTP/1.1\r\nHost: x\r\nX: a\tb\r\n\r\n", "a tab inside a value"),
        (b"GET /derp HTTP/1.1\r\nHost: x\r\nX: caf\xc3\xa9\r\n\r\n", "obs-text"),
        (b"GET /derp HTTP/1.1\r\nHost: x\r\nX: a\rb\r\n\r\n", "a CR inside a line"),
        (b"GET /derp HTTP/1.1\r\nHost: x\r\nBad Name: a\r\n\r\n", "a space in a name"),
        (b"GET /derp HTTP/1.1\r\nHost: x\r\n: a\r\n\r\n", "an empty name"),
        (b"\r\nGET /derp HTTP/1.1\r\nHost: x\r\n\r\n", "an empty line first"),
        (b"GET  /derp HTTP/1.1\r\nHost: x\r\n\r\n", "two spaces"),
        (b"GET /derp HTTP/1.1\r\nHost: x\r\nX: " + b"a" * MAX_HEAD + b"\r\n\r\n", "too big"),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "the h2 preface"),
    ],
)
def test_anything_else_is_left_to_h11(raw: bytes, why: str) -> None:
    assert parse_simple_head(raw, MAX_HEAD) is None, why


def test_values_lose_only_surrounding_whitespace_and_names_are_lower_cased() -> None:
    head = assert_agrees(
        b"GET /derp?x=1 HTTP/1.1\r\nHOST:x\r\nUpgrade: \t DERP \t\r\nX-Empty:\r\nX-Sp: a b  c \r\n\r\n"
    )
    assert head is not None
    assert list(head.headers) == [(b"host", b"x"), (b"upgrade", b"DERP"), (b"x-empty", b""), (b"x-sp", b"a b  c")]


def test_the_size_limit_counts_as_the_core_counts() -> None:
    """Just over the limit by either measure (the bytes, or the core's estimate) is h11's to refuse."""
    raw = b"GET /derp HTTP/1.1\r\nHost: x\r\nA:b\r\nC:d\r\n\r\n"
    estimate = head_size(b"/derp", [(b"host", b"x"), (b"a", b"b"), (b"c", b"d")])
    assert estimate == len(raw) + 1  # each "A:b" costs the estimate a space it does not have on the wire
    assert assert_agrees(raw, estimate) is not None
    assert parse_simple_head(raw, estimate - 1) is None  # the bytes fit; the core would refuse it
    assert parse_simple_head(raw, len(raw) - 1) is None


# Heads built from parts that are mostly right, sometimes wrong in one of the ways h11 cares about.
_token = st.text(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-!#$%&'*+.^_`|~", min_size=1, max_size=12
)
_name = st.one_of(
    _token.map(str.encode),
    st.sampled_from([b"Host", b"host", b"HOST", b"Upgrade", b"Connection", b"Content-Length", b"Transfer-Encoding",
                     b"Derp-Fast-Start", b"Ideal-Node", b"", b"Bad Name", b"X\x00", b"\xff"]),
)  # fmt: skip
_value = st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20).map(str.encode),
    st.binary(max_size=8),
    st.sampled_from([b"DERP", b" DERP ", b"\tDERP", b"5", b"05", b"5, 5", b"chunked", b"1", b"a\tb", b"caf\xc3\xa9"]),
)
_line_end = st.sampled_from([b"\r\n"] * 12 + [b"\n", b"\r", b"\r\r\n", b" \r\n"])
_header_line = st.tuples(
    st.sampled_from([b"", b"", b"", b" ", b"\t"]),  # obs-fold
    _name,
    st.sampled_from([b":", b":", b": ", b" :", b":\t"]),
    _value,
    st.sampled_from([b"", b"", b" ", b"\t "]),
    _line_end,
).map(b"".join)
_request_line = st.tuples(
    st.one_of(st.sampled_from([b"GET", b"POST", b"HEAD", b"get"]), _token.map(str.encode), st.binary(max_size=4)),
    st.sampled_from([b" ", b" ", b"  ", b"\t"]),
    st.one_of(st.sampled_from([b"/derp", b"/derp?x", b"http://h/derp", b"*", b""]), st.binary(min_size=1, max_size=6)),
    st.sampled_from([b" HTTP/1.1", b" HTTP/1.1", b" HTTP/1.0", b" HTTP/2.0", b" HTTP/1.1 ", b" http/1.1", b""]),
    _line_end,
).map(b"".join)
heads = st.tuples(
    st.sampled_from([b"", b"", b"", b"\r\n"]),
    _request_line,
    st.lists(_header_line, max_size=6),
    st.sampled_from([b"\r\n", b"\r\n", b"\n", b""]),
    st.binary(max_size=16),
).map(lambda t: t[0] + t[1] + b"".join(t[2]) + t[3] + t[4])


_clean_name = _token.map(str.encode).filter(
    lambda n: n.lower() not in (b"host", b"content-length", b"transfer-encoding")
)
_clean_value = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=20).map(str.encode)
_clean_heads = st.tuples(st.lists(st.tuples(_clean_name, _clean_value), max_size=6), st.integers(0, 6)).map(
    lambda t: (
        b"GET /derp HTTP/1.1\r\n"
        + b"".join(k + b": " + v + b"\r\n" for k, v in [*t[0][: t[1]], (b"Host", b"x"), *t[0][t[1] :]])
        + b"\r\n"
    )
)
_bytes_h11_cares_about = st.sampled_from(b"\t\n\r :\x00\x7f\x80\xff/1.HTab-,")


@st.composite
def near_heads(draw: st.DrawFn) -> bytes:
    """A plain head (which the fast path reads) with one or two small changes, most of which h11 cares about."""
    raw = draw(_clean_heads)
    for _ in range(draw(st.integers(1, 2))):
        at = draw(st.integers(0, len(raw)))
        kind = draw(st.sampled_from(["replace", "insert", "delete", "line", "copy line"]))
        if kind == "replace" and at < len(raw):
            raw = raw[:at] + bytes([draw(_bytes_h11_cares_about)]) + raw[at + 1 :]
        elif kind == "insert":
            raw = raw[:at] + bytes([draw(_bytes_h11_cares_about)]) + raw[at:]
        elif kind == "delete":
            raw = raw[:at] + raw[at + 1 :]
        else:
            start = raw.find(b"\r\n", 0, at) + 2 if b"\r\n" in raw[:at] else 0
            line = draw(_header_line) if kind == "line" else raw[start : raw.find(b"\r\n", start) + 2]
            raw = raw[:start] + line + raw[start:]
    return raw + draw(st.binary(max_size=8))


@settings(max_examples=2000, deadline=None)
@given(st.one_of(heads, near_heads()), st.sampled_from([MAX_HEAD, MAX_HEAD, 64, 128]))
@example(GO_UPGRADE, MAX_HEAD)
@example(b"GET /derp HTTP/1.1\r\nHost: x\r\nHost: x\r\n\r\n", MAX_HEAD)
def test_fast_path_agrees_with_h11(data: bytes, max_head: int) -> None:
    assert_agrees(data, max_head)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    assert_agrees(data)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(_clean_name, _clean_value), max_size=8), st.integers(0, 8), st.binary(max_size=64))
def test_plain_heads_do_take_the_fast_path(headers: list[tuple[bytes, bytes]], host_at: int, after: bytes) -> None:
    """The subset is not empty in practice: any head of plain tokens and values, with one Host, is read."""
    headers.insert(min(host_at, len(headers)), (b"Host", b"derp.test"))
    raw = b"GET /derp HTTP/1.1\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in headers) + b"\r\n"
    head = assert_agrees(raw + after)
    assert head is not None and head.size == len(raw)


@settings(max_examples=1000, deadline=None)
@given(st.one_of(heads, near_heads()), st.sampled_from([MAX_HEAD, 64, 128]))
@example(GO_UPGRADE + GO_UPGRADE, MAX_HEAD)
@example(GO_UPGRADE, len(GO_UPGRADE))
@example(GO_UPGRADE, len(GO_UPGRADE) - 1)
def test_a_head_is_read_from_its_bytes_up_to_the_first_blank_line(data: bytes, max_head: int) -> None:
    """Heads are remembered by their bytes up to the first blank line: reading only those (as
    parse_simple_head does) gives the answer the regular expression gives on all of ``data``."""
    assert parse_simple_head(data, max_head) == httphead._parse_head(data, max_head)
    assert parse_simple_head(bytearray(data), max_head) == httphead._parse_head(data, max_head)


def test_a_remembered_head_is_the_same_answer_every_time() -> None:
    first = parse_simple_head(GO_UPGRADE + b"\x00\x00\x00\x01", MAX_HEAD)
    again = parse_simple_head(GO_UPGRADE + b"other bytes after the head", MAX_HEAD)
    assert first is not None and first == again and first.size == len(GO_UPGRADE)
    assert isinstance(first.headers, tuple)  # shared between logins: nothing can change it
    assert parse_simple_head(GO_UPGRADE, len(GO_UPGRADE) - 1) is None  # the limit is part of the key
    # A long head (past what is remembered) is read the same way, every time.
    long_head = GO_UPGRADE[:-2] + b"X-Long: " + b"v" * 1500 + b"\r\n\r\n"
    assert assert_agrees(long_head) == parse_simple_head(long_head, MAX_HEAD) is not None
