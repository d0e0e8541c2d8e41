# ruff: noqa: PLC0415  (imports inside functions on purpose: the fuzzer instruments what they load)
"""Fuzz targets: one per sans-IO parser, each fed arbitrary bytes.

A target's ``build()`` imports the code it tests (so the fuzzer can instrument it first) and
returns ``one_input(data: bytes) -> None``. ``one_input`` returns normally whenever the parser
kept its contract, a result or its own typed error, and raises otherwise: the stray exception
itself, or :class:`Broken` when a result breaks an invariant (spans outside the buffer, frames
that do not add up to the input, a map that does not read back the same, ...).

This module imports nothing from derpd at import time; ``fuzz.py`` and the smoke test list
targets without loading (or instrumenting) the code under test.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import random
import re
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
DICTS = HERE / "dicts"

OneInput = Callable[[bytes], None]


class Broken(AssertionError):
    """A parser returned, but what it returned breaks one of its invariants."""


def check(ok: object, what: str) -> None:
    if not ok:
        raise Broken(what)


REFUSED = object()  # what only() returns when the parser raised its own typed error


def only(errors: type[BaseException] | tuple[type[BaseException], ...], fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, or REFUSED if it raised one of ``errors``; anything else propagates (a crash)."""
    try:
        return fn(*args)
    except errors:
        return REFUSED


REPEAT = b"\x00*"  # in text inputs: REPEAT n k unit[k] stands for unit * 8(n+1), see expand()
MAX_EXPANDED = 256 << 10


def expand(data: bytes) -> bytes:
    """Text inputs may abbreviate a run: ``\\x00*`` then a count byte n, a length byte k (1-4 after
    ``% 4 + 1``) and k bytes of unit stand for the unit repeated 8(n+1) times (up to 2048). So a few
    bytes the fuzzer can stumble on express 2000 brackets, a 5000-digit number or 500 levels of
    ``- ``, which plain byte mutations practically never build. Text seeds never hold NUL-star."""
    if REPEAT not in data:
        return data
    out = bytearray()
    i = 0
    while (j := data.find(REPEAT, i)) >= 0 and j + 4 <= len(data) and len(out) < MAX_EXPANDED:
        n, k = data[j + 2], data[j + 3] % 4 + 1
        out += data[i:j] + data[j + 4 : j + 4 + k] * (8 * (n + 1))
        i = j + 4 + k
    out += data[i:]
    return bytes(out[:MAX_EXPANDED])


def text_of(data: bytes) -> str:
    """Input bytes (runs expanded) as the text a loader would pass on (files are read as UTF-8)."""
    return expand(data).decode("utf-8", "replace")


def prng(data: bytes, salt: int = 0) -> random.Random:
    """Chunkings and modes derived from the input itself, so every run of one input is identical."""
    return random.Random(zlib.crc32(data) ^ salt)


def chunked(data: bytes, rng: random.Random) -> list[bytes]:
    out = []
    i = 0
    while i < len(data):
        n = rng.choice((1, 1, 2, 3, 4, 5, 6, 7, 13, 37, 64, 500, len(data)))
        out.append(data[i : i + n])
        i += n
    return out


# --- DERP frames --------------------------------------------------------------------------


def build_frame_reader() -> OneInput:
    from derpd.proto import frames as p

    header = struct.Struct(">BI")
    send, key_len = int(p.FrameType.SEND_PACKET), p.KEY_LEN
    forward = int(p.FrameType.FORWARD_PACKET)
    handshake = {"max_frame_len": p.MAX_CLIENT_INFO_LEN}  # relay._handshake, before ClientInfo
    login = {"max_frame_len": p.MAX_FRAME_LEN, "limits": p.CLIENT_FRAME_LIMITS, "wanted": p.SERVER_HANDLED}
    client = {"max_frame_len": p.NONCE_LEN + p.MAX_FRAME_LEN}  # derpd.net.client and mesh links
    rules = {
        name: (p.FrameReader(**cfg).limit, cfg.get("wanted"))
        for name, cfg in (("handshake", handshake), ("login", login), ("client", client))
    }
    # What the server does with each frame type it handles; only ProtocolError may come out.
    server_parsers = {
        p.FrameType.NOTE_PREFERRED: p.parse_note_preferred,
        p.FrameType.SEND_PACKET: p.parse_send_packet,
        p.FrameType.FORWARD_PACKET: p.parse_forward_packet,
        p.FrameType.WATCH_CONNS: p.parse_watch_conns,
        p.FrameType.CLOSE_PEER: p.parse_close_peer,
        p.FrameType.PING: p.parse_ping,
    }
    from derpd.net.client import decode_message

    def expect(stream: bytes, first: str, then: str) -> tuple[list[Any], int, bool, bytes | None]:
        """An independent reading of the whole stream: (frames, skipped, error, unread tail or
        None while an unwanted frame is being skipped)."""
        frames: list[tuple[int, bytes]] = []
        skipped = pos = 0
        limit, wanted = rules[first]
        while len(stream) - pos >= 5:
            ftype, length = header.unpack_from(stream, pos)
            if length > limit(ftype):
                return frames, skipped, True, None
            stop = pos + 5 + length
            if wanted is not None and ftype not in wanted:
                skipped += 1
                if stop > len(stream):
                    return frames, skipped, False, None
                pos = stop
                continue
            if stop > len(stream):
                break
            frames.append((ftype, stream[pos + 5 : stop]))
            pos = stop
            limit, wanted = rules[then]
        return frames, skipped, False, stream[pos:]

    def eligible(buf: bytes, hdr: int) -> tuple[int, bytes] | None:
        """(type, run key) when the frame at ``hdr`` could join a run: a SendPacket's destination,
        a ForwardPacket's source and destination; None for every other frame, disco or short."""
        ftype, length = header.unpack_from(buf, hdr)
        payload = buf[hdr + 5 : hdr + 5 + length]
        klen = {send: key_len, forward: 2 * key_len}.get(ftype)
        if klen is None or length < klen or p.is_disco(payload, klen):
            return None
        return ftype, payload[:klen]

    def from_spans(buf: bytes, spans: list[Any]) -> list[tuple[int, bytes]]:
        check(type(buf) is bytes, f"read_spans returned a {type(buf).__name__}, not immutable bytes")
        frames: list[tuple[int, bytes]] = []
        prev_end = 0
        prev_run_key: tuple[int, bytes] | None = None
        for ftype, start, stop, hdrs in spans:
            check(
                prev_end + 5 <= start <= stop <= len(buf),
                f"span {start}:{stop} outside the buffer ({len(buf)}) or overlapping ({prev_end})",
            )
            heads = [start - 5] if hdrs is None else hdrs
            check(heads, "a run span without headers")
            check(heads[0] == start - 5, "span does not start right after its first header")
            first_key = eligible(buf, heads[0])
            if hdrs is not None:
                check(ftype in (send, forward) and len(hdrs) >= 2, f"run span of type {ftype} with {len(hdrs)} headers")
                check(first_key is not None, "a run starts with a disco or short Send/ForwardPacket")
            check(
                not (prev_run_key is not None and first_key == prev_run_key and prev_end == heads[0]),
                "two adjacent Send/ForwardPackets with one run key came as separate spans (run not merged)",
            )
            at = heads[0]
            for hdr in heads:
                check(hdr == at, "headers of a run are not back to back")
                t, length = header.unpack_from(buf, hdr)
                check(t == ftype, f"header type {t} in a span of type {ftype}")
                if hdrs is not None:
                    check(eligible(buf, hdr) == first_key, "a run mixes destinations or includes disco/short frames")
                frames.append((t, buf[hdr + 5 : hdr + 5 + length]))
                at = hdr + 5 + length
            check(at == stop, f"span ends at {stop} but its frames end at {at}")
            prev_end = stop
            prev_run_key = eligible(buf, heads[-1])
        return frames

    def run(data: bytes, scenario: str, rng: random.Random) -> None:
        start_rules = {"relay": "handshake", "login": "login", "client": "client"}[scenario]
        then_rules = "client" if scenario == "client" else "login"
        reader = p.FrameReader(**{"handshake": handshake, "login": login, "client": client}[start_rules])
        phase = start_rules
        got: list[tuple[int, bytes]] = []

        def pump() -> bool:
            nonlocal phase
            if phase == "handshake":  # relay._handshake: read_frame until ClientInfo, then widen
                frame = reader.read_frame()
                if frame is None:
                    return False
                got.append(frame)
                reader.configure(**login)
                phase = "login"
                return True
            how = "spans" if scenario == "relay" else rng.choice(("frame", "frames", "spans"))
            if how == "frame":
                frame = reader.read_frame()
                new = [] if frame is None else [frame]
            elif how == "frames":
                new = reader.read_frames()
            else:
                buf, spans = reader.read_spans()
                new = from_spans(buf, spans)
            got.extend(new)
            return bool(new)

        error: Exception | None = None
        try:
            for chunk in chunked(data, rng):
                kind = rng.randrange(3)
                reader.feed(chunk if kind == 0 else bytearray(chunk) if kind == 1 else memoryview(chunk))
                if rng.random() < 0.8:
                    pump()
            while pump():
                pass
        except p.ProtocolError as e:
            error = e
        frames, skipped, want_error, tail = expect(data, start_rules, then_rules)
        check(got == frames, f"{scenario}: frames read {_frames(got)} != frames in the stream {_frames(frames)}")
        check((error is not None) == want_error, f"{scenario}: error {error!r}, expected one: {want_error}")
        check(reader.skipped == skipped, f"{scenario}: skipped {reader.skipped} frames, expected {skipped}")
        if error is None:
            rest = reader.take_buffered()
            check(rest == (tail or b""), f"{scenario}: unread bytes {rest[:16]!r}... != {(tail or b'')[:16]!r}...")
        for ftype, payload in got:
            if scenario == "client":
                only(p.ProtocolError, decode_message, ftype, payload)
            elif ftype in server_parsers:
                only(p.ProtocolError, server_parsers[ftype], payload)

    def one_input(data: bytes) -> None:
        rng = prng(data)
        for scenario in ("relay", "login", "client"):
            run(data, scenario, rng)

    return one_input


def _frames(frames: list[tuple[int, bytes]]) -> str:
    return "[" + ", ".join(f"{t}:{len(b)}" for t, b in frames[:8]) + (", ..." if len(frames) > 8 else "") + "]"


def build_frame_payloads() -> OneInput:
    from derpd.net.client import decode_message
    from derpd.proto import frames as p

    parsers = [
        p.parse_server_key,
        p.parse_send_packet,
        p.parse_recv_packet,
        p.parse_forward_packet,
        p.parse_note_preferred,
        p.parse_ping,
        p.parse_pong,
        p.parse_watch_conns,
        p.parse_close_peer,
        p.parse_peer_gone,
        p.parse_peer_present,
        p.parse_restarting,
    ]
    k = p.KEY_LEN

    def one_input(data: bytes) -> None:
        if not data:
            return
        ftype, payload = data[0], data[1:]
        for parse in parsers:
            only(p.ProtocolError, parse, payload)
        only(p.ProtocolError, decode_message, ftype, payload)
        p.is_disco(payload)
        p.is_disco(payload, k)
        r = only(p.ProtocolError, p.parse_send_packet, payload)
        if r is not REFUSED:
            check(len(r[0]) == k and r[0] + r[1] == payload, "parse_send_packet lost bytes")
        r = only(p.ProtocolError, p.parse_forward_packet, payload)
        if r is not REFUSED:
            check(len(r[0]) == len(r[1]) == k and b"".join(r) == payload, "parse_forward_packet lost bytes")
        r = only(p.ProtocolError, p.parse_peer_gone, payload)
        if r is not REFUSED:
            check(r[0] == payload[:k] and 0 <= r[1] <= 255, "parse_peer_gone")
        pp = only(p.ProtocolError, p.parse_peer_present, payload)
        if pp is not REFUSED:
            check(pp.key == payload[:k], "parse_peer_present key")
            if pp.ip16 is not None:
                check(len(pp.ip16) == 16 and 0 <= pp.port <= 0xFFFF and 0 <= pp.flags <= 255, "parse_peer_present")
                again = p.parse_peer_present(p.peer_present_frame(pp.key, pp.ip16, pp.port, pp.flags)[5:])
                check(again == pp, f"PeerPresent {pp} re-encoded reads back as {again}")
        r = only(p.ProtocolError, p.parse_ping, payload)
        if r is not REFUSED:
            check(r == payload[:8] and p.parse_pong(p.pong_frame(r)[5:]) == r, "ping/pong round trip")

    return one_input


# --- the sealed handshake -------------------------------------------------------------------


def build_client_info() -> OneInput:
    from derpd.proto import frames as p
    from derpd.proto.keys import NodePrivate

    server = NodePrivate(bytes(range(32)))
    client = NodePrivate(bytes(range(32, 64)))
    nonce = bytes(range(24))

    def valid(info: Any) -> None:
        check(type(info.version) is int, f"version {info.version!r}")
        if info.mesh_key is not None:
            check(type(info.mesh_key) is bytes, "meshKey is not bytes")
            check(len(info.mesh_key) == 32, f"ClientInfo.from_json returned a meshKey of {len(info.mesh_key)} bytes")
        check(type(info.can_ack_pings) is bool and type(info.is_prober) is bool, "bool fields")
        check(type(info.app_name) is str, "AppName")

    def one_input(data: bytes) -> None:
        data = expand(data)
        info = only(p.HandshakeError, p.ClientInfo.from_json, data)
        if info is not REFUSED:
            valid(info)
        only(p.HandshakeError, p.ServerInfo.from_json, data)
        # What the relay really runs: the JSON sealed to the server by a client, then opened.
        sealed = client.public + client.seal_to(server.public, data, nonce)
        opened = only(p.HandshakeError, p.open_client_info, server, sealed)
        if opened is not REFUSED:
            check(opened[0] == client.public, "open_client_info returned another key")
            check(opened[1] == info, "a sealed ClientInfo decodes differently from the same JSON in the clear")
        elif len(sealed) <= p.MAX_CLIENT_INFO_LEN:
            check(info is REFUSED, "from_json accepts JSON that open_client_info refuses")
        only(p.HandshakeError, p.open_client_info, server, data)  # random bytes as a payload
        boxed = server.seal_to(client.public, data, nonce)
        only(p.HandshakeError, p.open_server_info, client, server.public, boxed)

    return one_input


# --- PROXY protocol -------------------------------------------------------------------------


def build_proxyproto() -> OneInput:
    from derpd.proto import proxyproto as pp

    networks = pp.parse_trusted("10.0.0.0/8,192.0.2.7,::1/128,fd00::/8")

    def read(pieces: list[bytes], max_v2_len: int) -> Any:
        reader = pp.ProxyHeaderReader(max_v2_len=max_v2_len)
        try:
            for i, piece in enumerate(pieces):
                got = reader.feed(piece)
                if got is not None:
                    header, rest = got
                    check(type(rest) is bytes, "rest is not bytes")
                    return header, rest + b"".join(pieces[i + 1 :])
        except pp.ProxyProtocolError:
            try:
                reader.feed(b"x")
            except pp.ProxyProtocolError:
                return "error"
            raise Broken("a failed reader accepted more bytes") from None
        return "need more"

    def one_input(data: bytes) -> None:
        rng = prng(data)
        max_v2_len = rng.choice((216, 4096, 0xFFFF))
        whole = read([data], max_v2_len)
        pieces = read(chunked(data, rng), max_v2_len)
        check(whole == pieces, f"whole input gives {whole!r:.200}, the same in pieces {pieces!r:.200}")
        if isinstance(whole, tuple):
            header, rest = whole
            check(data.endswith(rest) and len(rest) < len(data), "rest is not a suffix of the input")
            check(header.version in (1, 2) and header.command in ("PROXY", "LOCAL"), f"{header}")
            for addr in (header.source, header.destination):
                if addr is not None:
                    check(0 <= addr[1] <= 0xFFFF, f"port {addr[1]}")
                    pp.is_trusted(addr[0], networks)
            if header.version == 1:
                again = pp.encode_v1(header.source, header.destination)
            else:
                again = pp.encode_v2(header.source, header.destination, command=header.command, tlvs=header.tlvs)
            back = read([again + b"tail"], 0xFFFF)
            check(back == (header, b"tail"), f"{header} re-encoded reads back as {back!r:.200}")
        text = text_of(data)
        pp.is_trusted(text, networks)
        only(ValueError, pp.parse_trusted, text)

    return one_input


def build_http_head() -> OneInput:
    import h11

    from derpd.net import httpserver
    from derpd.proto import httphead

    def one_input(data: bytes) -> None:
        data = expand(data)
        for max_head in (httpserver.MAX_HEAD, 64 + len(data) % 192):
            head = httphead.parse_simple_head(data, max_head)  # must never raise
            if head is None:
                continue
            # What the fast path reads, h11 reads the same way, and the HTTP core's checks pass.
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head)
            conn.receive_data(data)
            event = conn.next_event()  # a RemoteProtocolError here is a crash: h11 refuses what we took
            check(isinstance(event, h11.Request), f"h11 gives {event!r:.100} for an accepted head")
            assert isinstance(event, h11.Request)
            check(
                (head.method, head.target, head.http_version, list(head.headers))
                == (event.method, event.target, event.http_version, list(event.headers)),
                f"fast path {head!r:.300} differs from h11's {event!r:.300}",
            )
            check(data[head.size :] == bytes(conn.trailing_data[0]), "different bytes after the head")
            check(httphead.head_size(event.target, event.headers) <= max_head, "over the core's size limit")
            check(httpserver.header(event.headers, b"content-length") is None, "a Content-Length taken")

    return one_input


# --- TLS ClientHello ---------------------------------------------------------------------------


def _tls_vec(n: int, data: bytes) -> bytes:
    return len(data).to_bytes(n, "big") + data


def _tls_hello(server_name: str | None, alpn: tuple[bytes, ...], version: int) -> bytes:
    """A minimal ClientHello offering exactly this, in two records (an encoder independent of the reader)."""
    exts = b""
    if server_name is not None:
        exts += b"\x00\x00" + _tls_vec(2, _tls_vec(2, b"\x00" + _tls_vec(2, server_name.encode("ascii"))))
    if alpn:
        exts += b"\x00\x10" + _tls_vec(2, _tls_vec(2, b"".join(_tls_vec(1, n) for n in alpn)))
    body = version.to_bytes(2, "big") + bytes(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00" + _tls_vec(2, exts)
    message = b"\x01" + _tls_vec(3, body)
    return b"".join(b"\x16\x03\x01" + _tls_vec(2, part) for part in (message[:7], message[7:]) if part)


def build_tlshello() -> OneInput:
    from derpd.proto import tlshello as t

    def read(pieces: list[bytes], max_size: int) -> Any:
        reader = t.ClientHelloReader(max_size)
        fed = b""
        try:
            for piece in pieces:
                fed += piece
                got = reader.feed(piece)
                check(reader.buffered == fed, "buffered is not everything fed")
                if got is not None:
                    check(reader.feed(b"\x17\x03") is got and reader.buffered == fed + b"\x17\x03", "after the hello")
                    return got, len(fed)
        except t.ClientHelloError as e:
            message = str(e)
            check(message.isascii() and message.isprintable() and len(message) < 200, f"error text {message!r:.300}")
            try:
                reader.feed(b"\x16")
            except t.ClientHelloError as again:
                check(again is e and reader.buffered == fed, "a failed reader changed")
                return "error"
            raise Broken("a failed reader accepted more bytes") from None
        check(len(fed) <= reader.max_buffer, f"{len(fed)} bytes held without a hello, over {reader.max_buffer}")
        return "need more"

    def one_input(data: bytes) -> None:
        rng = prng(data)
        max_size = rng.choice((t.MAX_CLIENT_HELLO, t.MAX_CLIENT_HELLO, 41, 300, 1000))
        whole = read([data], max_size)
        if isinstance(whole, tuple):
            whole = whole[0]
        pieces = read(chunked(data, rng), max_size)
        bytewise = read([data[i : i + 1] for i in range(len(data))], max_size)
        check(
            whole == (pieces[0] if isinstance(pieces, tuple) else pieces),
            f"whole input gives {whole!r:.200}, the same in pieces {pieces!r:.200}",
        )
        check(
            whole == (bytewise[0] if isinstance(bytewise, tuple) else bytewise),
            f"whole input gives {whole!r:.200}, a byte at a time {bytewise!r:.200}",
        )
        if not isinstance(whole, t.ClientHello):
            only(t.ClientHelloError, t.parse_client_hello, data)
            return
        hello, end = bytewise
        check(t.parse_client_hello(data[:end]) == hello, "the hello's own bytes read differently")
        check(read([data[: end - 1]], max_size) == "need more", "a hello one byte early, or an error")
        name = hello.server_name
        check(name is None or (type(name) is str and name and all("!" <= c <= "~" for c in name)), f"SNI {name!r}")
        check(type(hello.alpn) is tuple and all(type(a) is bytes and 1 <= len(a) <= 255 for a in hello.alpn), "ALPN")
        check(hello.legacy_version >> 8 == 3, f"legacy_version 0x{hello.legacy_version:04x}")
        again = t.parse_client_hello(_tls_hello(name, hello.alpn, hello.legacy_version))
        check(again == hello, f"{hello} re-encoded reads back as {again}")

    return one_input


# --- STUN ----------------------------------------------------------------------------------


def build_stun() -> OneInput:
    import ipaddress

    from stun import codec as s

    peers = [("192.0.2.1", 3478), ("2001:db8::1", 41641), ("::ffff:198.51.100.7", 0), ("fe80::1%eth0", 65535)]
    expected = {h: ipaddress.ip_address(s.pack_address(h)) for h, _ in peers}
    extra = [getattr(s, name) for name in ("parse_error_response",) if hasattr(s, name)]

    fast = getattr(s, "tailscale_response", None)

    def one_input(data: bytes) -> None:
        req = only(s.StunError, s.parse_binding_request, data)
        if req is not REFUSED:
            check(len(req.txid) == (16 if req.classic else 12), f"txid of {len(req.txid)} bytes")
            for host, port in peers:
                reply = s.build_response(req, host, port)  # the server answers whatever it accepted
                got = s.parse_response(reply)
                check(
                    (got.txid, got.address, got.port) == (req.txid, expected[host], port),
                    f"reply to {req} for {host}:{port} reads back as {got}",
                )
        if fast is not None:  # the server's fast path: the codec's answer to a Tailscale request, or None
            buffer = bytearray(b"\xff" + data + b"\xff")
            for host, port in peers:
                quick = fast(buffer, 1, len(data), s.pack_address(host), port)
                if quick is not None:
                    check(req is not REFUSED and req.kind is s.RequestKind.TAILSCALE, f"fast path answered {data!r}")
                    check(quick == s.build_response(req, host, port), f"fast path reply to {data!r} differs")
        only(s.StunError, s.parse_response, data)
        for parse in extra:
            only(s.StunError, parse, data)

    return one_input


# --- DERP maps -------------------------------------------------------------------------------


def _plain_map(m: Any) -> Any:
    """A DerpMap as comparable data; floats compared to 12 digits (what the YAML writer keeps) and NaN == NaN."""

    def norm(v: Any) -> Any:
        if isinstance(v, float):
            return "nan" if math.isnan(v) else round(v, 12)
        if isinstance(v, dict):
            return {k: norm(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [norm(x) for x in v]
        return v

    return norm(dataclasses.asdict(m))


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _build_derpmap(yaml: bool) -> OneInput:
    from derpd.tools import derpmap as dm

    read = dm.from_headscale_yaml if yaml else dm.from_json

    def reads_back(m: Any, write: Callable[[Any], str], read: Callable[[str], Any], fmt: str) -> None:
        try:
            text = write(m)
        except dm.DerpMapError:
            return  # e.g. NaN cannot be written in YAML: refused, not crashed
        try:
            m2, _ = read(text)
        except dm.DerpMapError as e:
            raise Broken(f"derpd cannot read back the {fmt} it wrote: {e}\n{text}") from e
        check(_plain_map(m2) == _plain_map(m), f"{fmt} written and read back differs:\n{text}")
        if fmt == "JSON":  # Go's encoding/json (Tailscale clients, Headscale) refuses NaN and Infinity
            try:
                json.loads(text, parse_constant=_not_json)
            except ValueError as e:
                raise Broken(f"derpd wrote a JSON map that is not JSON ({e}):\n{text}") from None

    def one_input(data: bytes) -> None:
        text = text_of(data)
        got = only(dm.DerpMapError, read, text)
        only(dm.DerpMapError, dm.parse, text)
        if got is REFUSED:
            return
        m, problems = got
        check(isinstance(problems, list) and all(isinstance(x, str) for x in problems), "problems")
        reads_back(m, dm.to_headscale_yaml, dm.from_headscale_yaml, "YAML")
        reads_back(m, dm.to_json, dm.from_json, "JSON")

    return one_input


def build_derpmap_yaml() -> OneInput:
    return _build_derpmap(yaml=True)


def build_derpmap_json() -> OneInput:
    return _build_derpmap(yaml=False)


# --- JSON from outside ----------------------------------------------------------------------


def _depth(v: Any) -> int:
    if isinstance(v, dict):
        v = list(v.values())
    if isinstance(v, list):
        return 1 + max(map(_depth, v), default=0)
    return 0


def build_gojson() -> OneInput:
    import inspect

    from derpd.proto import gojson

    err = gojson.GoJSONError
    max_depth = getattr(gojson, "MAX_DEPTH", None)
    fields = {"version": int, "meshKey": str, "CanAckPings": bool, "Allow": bool, "Latitude": float}
    parse = getattr(gojson, "parse", None)
    decode = gojson.decode
    decode_takes_fields = len(inspect.signature(decode).parameters) > 1
    extras = {n: getattr(gojson, n) for n in ("to_python", "nesting_depth", "fold") if hasattr(gojson, n)}

    def reject(name: str) -> Any:
        raise ValueError(name)

    # Numbers kept as text: Python's 4300-digit int limit is not a JSON rule.
    std_json = json.JSONDecoder(parse_constant=reject, parse_int=str, parse_float=str)

    def one_input(data: bytes) -> None:
        data = expand(data)
        if decode_takes_fields:
            out = only(err, decode, data, fields, "fuzz")
            if out is not REFUSED:
                check(isinstance(out, dict) and set(out) <= set(fields), f"decode gave {out!r:.100}")
                for name, value in out.items():
                    check(type(value) is fields[name], f"{name} decoded as {type(value).__name__}")
        else:
            only(err, decode, data)
        if parse is None:
            return
        value = only(err, parse, data)
        if "first_value_only" in inspect.signature(parse).parameters:
            only(err, lambda: parse(data, first_value_only=True))
        text = text_of(data)
        if "nesting_depth" in extras:
            extras["nesting_depth"](text)
        if "fold" in extras:
            extras["fold"](text)
        if value is not REFUSED and "to_python" in extras:
            py = extras["to_python"](value)
            if max_depth is not None:
                check(_depth(py) <= max_depth, f"parse accepted nesting {_depth(py)} > MAX_DEPTH {max_depth}")
        # Against the standard library: gojson must not refuse plain JSON it has no reason to refuse,
        # and must not accept what is not JSON at all.
        try:
            std = std_json.decode(text)
            std_ok = True
        except (ValueError, RecursionError):
            std_ok, std = False, None
        if value is not REFUSED:
            check(std_ok, "gojson accepted a document that is not JSON")
        elif std_ok and (max_depth is None or _depth(std) <= max_depth) and not text.startswith("\ufeff"):
            raise Broken(f"gojson refused valid JSON of depth {_depth(std)}")

    return one_input


def build_admission() -> OneInput:
    from derpd.server import admission as a

    def one_input(data: bytes) -> None:
        data = expand(data)
        verdict = a.decode_admit_response(data)  # must never raise
        check(
            isinstance(verdict, tuple) and len(verdict) == 2 and type(verdict[0]) is bool and type(verdict[1]) is str,
            f"decode_admit_response returned {verdict!r:.100}",
        )
        text = text_of(data)
        keys = only(a.AdmissionError, a.parse_allowlist, text)
        if keys is not REFUSED:
            for k in keys:
                check(type(k) is bytes and len(k) == 32, f"parse_allowlist returned a {len(k)}-byte key")
        check(type(a.normalize_ip(text)) is str, "normalize_ip")

    return one_input


def build_rate_config() -> OneInput:
    from derpd.server import limits

    def one_input(data: bytes) -> None:
        cfg = only(limits.LimitError, limits.RateConfig.from_json, text_of(data))
        if cfg is REFUSED:
            return
        check(type(cfg.bytes_per_second) is int and cfg.bytes_per_second >= 0, f"{cfg}")
        if cfg.enabled:
            check(cfg.burst_bytes >= limits.MIN_RATE_BURST, f"{cfg}: burst under one packet")
            cfg.bucket(0.0)  # what the relay builds from it; must not refuse a config it accepted

    return one_input


def build_keys() -> OneInput:
    from derpd.proto import keys

    def one_input(data: bytes) -> None:
        text = text_of(data)
        key = only(keys.KeyFileError, keys.parse_key_file, text)
        if key is not REFUSED:
            again = keys.parse_key_file(keys.key_file_text(key))
            check(again.public == key.public, "key file does not round-trip")
        pub = only(keys.InvalidKeyError, keys.parse_public_key, text)
        if pub is not REFUSED:
            check(len(pub) == 32, f"parse_public_key returned a {len(pub)}-byte key for {text!r:.100}")
            check(keys.parse_public_key(keys.public_key_text(pub)) == pub, "nodekey text does not round-trip")
        only(keys.InvalidKeyError, keys.NodePrivate.from_text, text)
        mesh = only(keys.MeshKeyError, keys.parse_mesh_key, text)
        if mesh is not REFUSED:
            check(len(mesh) == 32, f"parse_mesh_key returned a {len(mesh)}-byte key for {text!r:.100}")

    return one_input


def build_meta_cert() -> OneInput:
    from derpd.net import tls

    def one_input(data: bytes) -> None:
        key = tls.parse_meta_certificate(data)  # a server's certificate: None unless it is a meta cert
        check(key is None or (type(key) is bytes and len(key) == 32), f"meta cert key {key!r:.80}")

    return one_input


# --- the registry ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str
    build: Callable[[], OneInput]
    doc: str
    max_len: int = 4096  # libFuzzer's -max_len: longest input it makes
    requires: str | None = None  # a module that may not exist yet: skip the target without it
    dict: str | None = None  # dicts/<name>: tokens for libFuzzer (and the hypothesis fallback)

    @property
    def corpus(self) -> Path:
        return CORPUS / self.name

    def available(self) -> bool:
        if self.requires is None:
            return True
        try:
            return importlib.util.find_spec(self.requires) is not None
        except ImportError:
            return False

    def seeds(self) -> Iterator[Path]:
        if self.corpus.is_dir():
            yield from sorted(p for p in self.corpus.iterdir() if p.is_file())


TARGETS = {
    t.name: t
    for t in (
        Target(
            "frame_reader",
            build_frame_reader,
            "FrameReader: handshake, then login limits; post-login only; client side. Arbitrary chunkings, "
            "read_frame/read_frames/read_spans, checked against an independent reading of the stream.",
            max_len=8192,
            dict="derp.dict",
        ),
        Target(
            "frame_payloads",
            build_frame_payloads,
            "Every parse_* payload parser and derpd.net.client.decode_message (first byte is the frame type).",
            dict="derp.dict",
        ),
        Target(
            "client_info",
            build_client_info,
            "ClientInfo/ServerInfo.from_json and open_client_info/open_server_info (input sealed with fixed keys).",
            max_len=8192,
            dict="json.dict",
        ),
        Target(
            "proxyproto",
            build_proxyproto,
            "ProxyHeaderReader (PROXY v1/v2) fed whole and in pieces; headers re-encoded and read back.",
            dict="proxyproto.dict",
        ),
        Target(
            "http_head",
            build_http_head,
            "proto.httphead.parse_simple_head (the DERP upgrade's fast path): what it reads, h11 reads the same "
            "(method, target, version, headers, bytes after the head), within the core's limits.",
            max_len=8192,
            dict="http.dict",
        ),
        Target(
            "tlshello",
            build_tlshello,
            "ClientHelloReader (TLS records and ClientHello) whole, in pieces and a byte at a time (same answer); "
            "hellos re-encoded and read back.",
            dict="tls.dict",
        ),
        Target(
            "stun",
            build_stun,
            "stun.codec.parse_binding_request (+ build_response read back by parse_response; tailscale_response "
            "equal to it or None), parse_response.",
            dict="stun.dict",
        ),
        Target(
            "derpmap_yaml",
            build_derpmap_yaml,
            "derpmap.from_headscale_yaml and parse; accepted maps are written as YAML and JSON and read back.",
            max_len=16384,
            dict="yaml.dict",
        ),
        Target(
            "derpmap_json",
            build_derpmap_json,
            "derpmap.from_json and parse; accepted maps are written as YAML and JSON and read back.",
            max_len=16384,
            dict="json.dict",
        ),
        Target(
            "gojson",
            build_gojson,
            "derpd.proto.gojson: decode/parse (only GoJSONError), checked against the standard json module.",
            max_len=16384,
            requires="derpd.proto.gojson",
            dict="json.dict",
        ),
        Target(
            "admission",
            build_admission,
            "admission.decode_admit_response (never raises), parse_allowlist, normalize_ip.",
            max_len=8192,
            dict="json.dict",
        ),
        Target(
            "rate_config",
            build_rate_config,
            "limits.RateConfig.from_json: only LimitError; an accepted config makes a token bucket.",
            max_len=8192,
            dict="json.dict",
        ),
        Target(
            "keys",
            build_keys,
            "keys.parse_key_file (only KeyFileError), parse_public_key, NodePrivate.from_text, parse_mesh_key.",
            max_len=8192,
            dict="json.dict",
        ),
        Target(
            "meta_cert",
            build_meta_cert,
            "tls.parse_meta_certificate on a server's DER certificate: None or a 32-byte key, never an exception.",
        ),
    )
}


# --- known crashes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Known:
    """A crash already reported and not fixed yet. Its reproducer lives in the target's corpus;
    ``fuzz.py`` replays it and then fuzzes on past it (unless --strict), and the smoke test
    expects it to reproduce (strict xfail), so fixing the bug fails that test until the entry
    is deleted here."""

    target: str
    seed: str  # file name in corpus/<target>/
    exception: str  # regular expression the exception's type name must match in full
    reason: str
    match: str = ""  # regular expression searched in str(exception)
    where: str = ""  # regular expression searched in the traceback's "file:function" lines
    also: tuple[str, ...] = ()  # other targets that reach the same bug (tolerated there too)

    def matches(self, exc: BaseException) -> bool:
        if not re.fullmatch(self.exception, type(exc).__name__) or not re.search(self.match, str(exc)):
            return False
        frames = []
        tb = exc.__traceback__
        while tb is not None:
            frames.append(f"{tb.tb_frame.f_code.co_filename}:{tb.tb_frame.f_code.co_name}")
            tb = tb.tb_next
        return re.search(self.where, "\n".join(frames)) is not None


# Open bugs the fuzzer is known to hit: each has its seed in corpus/<target>/ and is replayed as a strict
# xfail by test_fuzz_smoke.py, so its fix shows up as an XPASS. Empty: every crash found so far is fixed
# (hex keys with spaces, YAML nesting, 4300-digit integers, hostile certificates in parse_meta_certificate);
# their seeds stay in the corpus as regression inputs.
KNOWN: list[Known] = []


def known_for(target: str) -> list[Known]:
    return [k for k in KNOWN if k.target == target or target in k.also]
