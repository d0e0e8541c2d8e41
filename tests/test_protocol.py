"""The sans-IO protocol core and keys: framing, limits, JSON, key files. No network."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.public import Box, PrivateKey, PublicKey

from derpd.ops.keyfiles import KeyFileOrigin, load_key_file, load_mesh_key_file, load_or_create_key_file
from derpd.proto import frames
from derpd.proto.frames import (
    CLIENT_FRAME_LIMITS,
    DISCO_MAGIC,
    MAX_CLIENT_INFO_LEN,
    MAX_FRAME_LEN,
    MAX_PACKET_SIZE,
    SERVER_HANDLED,
    ClientInfo,
    FrameReader,
    FrameTooLarge,
    FrameType,
    HandshakeError,
    MalformedFrame,
    PeerPresent,
    ProtocolError,
    ServerInfo,
    client_info_frame,
    encode_frame,
    encode_frames,
    forward_packet_frame,
    is_disco,
    open_client_info,
    open_server_info,
    pack_header,
    parse_close_peer,
    parse_forward_packet,
    parse_note_preferred,
    parse_peer_gone,
    parse_peer_present,
    parse_ping,
    parse_recv_packet,
    parse_restarting,
    parse_send_packet,
    parse_server_key,
    parse_watch_conns,
    peer_gone_frame,
    peer_present_frame,
    recv_packet_frame,
    reframe_run,
    restarting_frame,
    run_payloads,
    send_packet_frame,
    server_info_frame,
    server_key_frame,
)
from derpd.proto.keys import (
    InvalidKeyError,
    KeyFileError,
    MeshKeyError,
    NodePrivate,
    key_file_text,
    mesh_keys_equal,
    parse_mesh_key,
    parse_public_key,
    public_key_text,
)

keys32 = st.binary(min_size=32, max_size=32)
frame_st = st.tuples(st.integers(0, 255), st.binary(max_size=300))


def _frames(data: bytes, chunks: list[int] | None = None, **kw: object) -> list[tuple[int, bytes]]:
    reader = FrameReader(**kw)  # type: ignore[arg-type]
    out: list[tuple[int, bytes]] = []
    if chunks is None:
        reader.feed(data)
    else:
        pos = 0
        for size in chunks:
            reader.feed(data[pos : pos + size])
            pos += size
            out += reader.read_frames()
        reader.feed(data[pos:])
    out += reader.read_frames()
    return out


# --- framing properties ------------------------------------------------------------------


@given(st.lists(frame_st, max_size=20), st.lists(st.integers(1, 97), max_size=60))
def test_any_chunking_gives_the_same_frames(frames: list[tuple[int, bytes]], chunks: list[int]) -> None:
    data = encode_frames(frames)
    assert _frames(data) == frames
    assert _frames(data, chunks) == frames


@given(st.lists(frame_st, max_size=8))
def test_one_byte_at_a_time(frames: list[tuple[int, bytes]]) -> None:
    data = encode_frames(frames)
    assert _frames(data, [1] * len(data)) == frames


def test_one_mebibyte_chunk_of_many_frames() -> None:
    frames = [(FrameType.SEND_PACKET, bytes([i % 251]) * 1232) for i in range(850)]
    data = encode_frames(frames)
    assert len(data) > 1 << 20
    assert _frames(data, [1 << 20]) == frames


@given(st.lists(frame_st, max_size=20), st.frozensets(st.integers(0, 255)), st.lists(st.integers(1, 50), max_size=40))
def test_unwanted_types_are_skipped_in_any_chunking(
    frames: list[tuple[int, bytes]], wanted: frozenset[int], chunks: list[int]
) -> None:
    data = encode_frames(frames)
    expect = [f for f in frames if f[0] in wanted]
    assert _frames(data, chunks, wanted=wanted) == expect


def _expand(buf: bytes, spans: list) -> list[tuple[int, bytes]]:
    out = []
    for ftype, start, stop, run in spans:
        if run is None:
            out.append((ftype, buf[start:stop]))
            continue
        assert ftype in (FrameType.SEND_PACKET, FrameType.FORWARD_PACKET) and len(run) > 1
        klen = 32 if ftype == FrameType.SEND_PACKET else 64  # the destination; a ForwardPacket's source too
        assert run[0] == start - 5 and len({buf[at + 5 : at + 5 + klen] for at in run}) == 1
        for at in run:
            assert buf[at] == ftype
            length = int.from_bytes(buf[at + 1 : at + 5])
            payload = buf[at + 5 : at + 5 + length]
            assert not is_disco(payload, klen)
            out.append((ftype, payload))
        assert at + 5 + length == stop  # adjacent frames, nothing skipped in between
    return out


sends_st = st.lists(
    st.one_of(
        st.tuples(st.just(int(FrameType.SEND_PACKET)), st.sampled_from([b"A" * 32, b"B" * 32]), st.binary(max_size=80)),
        st.tuples(st.just(int(FrameType.SEND_PACKET)), st.just(b"A" * 32), st.just(DISCO_MAGIC + b"d" * 60)),
        st.tuples(
            st.just(int(FrameType.FORWARD_PACKET)),
            st.sampled_from([b"A" * 64, b"A" * 32 + b"B" * 32, b"B" * 64]),
            st.binary(max_size=80),
        ),
        st.tuples(st.just(int(FrameType.FORWARD_PACKET)), st.just(b"A" * 64), st.just(DISCO_MAGIC + b"d" * 60)),
        st.tuples(st.just(int(FrameType.FORWARD_PACKET)), st.just(b"A" * 16), st.binary(max_size=40)),
        st.tuples(st.sampled_from([int(FrameType.PING), 0x77]), st.just(b""), st.binary(min_size=8, max_size=8)),
    ),
    max_size=30,
)


@given(sends_st, st.lists(st.integers(1, 200), max_size=20))
def test_spans_with_runs_are_the_same_frames(items: list[tuple[int, bytes, bytes]], chunks: list[int]) -> None:
    """read_spans groups SendPackets (and a mesh peer's ForwardPackets) into runs, yet describes
    exactly read_frames' frames."""
    data = encode_frames((t, key + body) for t, key, body in items)
    wanted = frozenset({int(FrameType.SEND_PACKET), int(FrameType.FORWARD_PACKET), int(FrameType.PING)})
    expect = [(t, k + b) for t, k, b in items if t in wanted]
    reader = FrameReader(wanted=wanted)
    got: list[tuple[int, bytes]] = []
    pos = 0
    for size in [*chunks, len(data)]:
        reader.feed(data[pos : pos + size])
        pos += size
        got += _expand(*reader.read_spans())
    assert got == expect


@given(keys32, st.lists(st.tuples(keys32, st.binary(max_size=1300)), min_size=1, max_size=20), st.binary(max_size=9))
def test_reframe_run_equals_building_each_frame(src: bytes, packets: list[tuple[bytes, bytes]], before: bytes) -> None:
    """SendPackets -> ForwardPackets from src, and ForwardPackets -> RecvPackets, as a relay does
    with a run: the same bytes as building every frame on its own (sizes vary within the run)."""
    sends = [send_packet_frame(dst, pkt) for dst, pkt in packets]
    forwards = [forward_packet_frame(src, dst, pkt) for dst, pkt in packets]

    def offsets(frames: list[bytes]) -> list[int]:
        at, out = len(before), []
        for f in frames:
            out.append(at)
            at += len(f)
        return out

    buf = before + b"".join(sends)
    assert reframe_run(buf, offsets(sends), FrameType.FORWARD_PACKET, src, 0) == b"".join(forwards)
    assert run_payloads(buf, offsets(sends)) == [dst + pkt for dst, pkt in packets]
    buf = before + b"".join(forwards)
    want = b"".join(recv_packet_frame(src, pkt) for _, pkt in packets)
    assert reframe_run(buf, offsets(forwards), FrameType.RECV_PACKET, src, 64) == want


@pytest.mark.parametrize("length", [MAX_FRAME_LEN + 1, 4 << 20])
def test_unwanted_frames_of_any_length_are_skipped_as_they_stream(length: int) -> None:
    """derper's forward-compatibility rule: an unknown frame of any length is read and discarded,
    never held (the 1 MiB cap is for frames whose payload must be kept)."""
    reader = FrameReader(max_frame_len=MAX_FRAME_LEN, limits=CLIENT_FRAME_LIMITS, wanted=SERVER_HANDLED)
    reader.feed(pack_header(0x77, length))
    for _ in range(length >> 16):
        reader.feed(b"z" * (1 << 16))
        assert reader.read_frames() == [] and reader.buffered == 0
    reader.feed(b"z" * (length & 0xFFFF) + encode_frame(FrameType.PING, b"12345678"))
    assert reader.read_frames() == [(FrameType.PING, b"12345678")]
    assert reader.skipped == 1 and reader.error is None


def test_unwanted_frame_of_the_largest_length_is_accepted() -> None:
    reader = FrameReader(max_frame_len=MAX_FRAME_LEN, limits=CLIENT_FRAME_LIMITS, wanted=SERVER_HANDLED)
    assert reader.limit(0x77) == (1 << 32) - 1 and reader.limit(FrameType.PING) == 1000
    reader.feed(pack_header(0x77, (1 << 32) - 1) + b"x" * 100_000)
    assert reader.read_frames() == [] and reader.buffered == 0 and reader.error is None


def test_unwanted_frames_are_not_buffered() -> None:
    reader = FrameReader(wanted=SERVER_HANDLED)
    reader.feed(pack_header(0x77, 900_000) + b"x" * 1000)
    assert reader.read_frames() == []
    for _ in range(899):
        reader.feed(b"y" * 1000)
        assert reader.buffered == 0
    reader.feed(encode_frame(FrameType.PING, b"12345678"))
    assert reader.read_frames() == [(FrameType.PING, b"12345678")]
    assert reader.skipped == 1


@given(st.tuples(keys32, st.binary(max_size=2000)))
def test_send_recv_packet_roundtrip(kp: tuple[bytes, bytes]) -> None:
    key, pkt = kp
    assert parse_send_packet(send_packet_frame(key, pkt)[5:]) == (key, pkt)
    assert parse_recv_packet(recv_packet_frame(key, pkt)[5:]) == (key, pkt)


@given(keys32, keys32, st.binary(max_size=2000))
def test_forward_packet_roundtrip(src: bytes, dst: bytes, pkt: bytes) -> None:
    assert parse_forward_packet(forward_packet_frame(src, dst, pkt)[5:]) == (src, dst, pkt)


@given(keys32, st.sampled_from([0, 1]))
def test_peer_gone_roundtrip(key: bytes, reason: int) -> None:
    assert parse_peer_gone(peer_gone_frame(key, reason)[5:]) == (key, reason)
    assert parse_peer_gone(key) == (key, 0)  # the legacy 32-byte form


@given(keys32, st.binary(min_size=16, max_size=16), st.integers(0, 65535), st.integers(0, 15))
def test_peer_present_roundtrip(key: bytes, ip16: bytes, port: int, flags: int) -> None:
    frame = peer_present_frame(key, ip16, port, flags)
    assert len(frame) == 5 + 51
    assert parse_peer_present(frame[5:]) == PeerPresent(key, ip16, port, flags)


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_restarting_roundtrip(a: int, b: int) -> None:
    assert parse_restarting(restarting_frame(a, b)[5:]) == (a, b)


def test_server_key_roundtrip_and_errors() -> None:
    key = os.urandom(32)
    assert parse_server_key(server_key_frame(key)[5:]) == key
    assert parse_server_key(server_key_frame(key)[5:] + b"future") == key
    with pytest.raises(HandshakeError):
        parse_server_key(b"DERP\xf0\x9f\x94\x91" + b"short")
    with pytest.raises(HandshakeError):
        parse_server_key(b"X" * 40)


# --- limits ---------------------------------------------------------------------------


def test_oversized_send_packet_is_refused_at_the_header() -> None:
    reader = FrameReader(limits=CLIENT_FRAME_LIMITS)
    reader.feed(pack_header(FrameType.SEND_PACKET, 32 + MAX_PACKET_SIZE + 1))
    with pytest.raises(FrameTooLarge) as e:
        reader.read_frames()
    assert e.value.frame_type == FrameType.SEND_PACKET
    # A full-size packet is fine.
    ok = send_packet_frame(os.urandom(32), b"p" * MAX_PACKET_SIZE)
    assert _frames(ok, limits=CLIENT_FRAME_LIMITS)[0][1][32:] == b"p" * MAX_PACKET_SIZE


def test_frame_limits() -> None:
    for ftype, length, kw in [
        (FrameType.CLIENT_INFO, MAX_CLIENT_INFO_LEN + 1, {"max_frame_len": MAX_CLIENT_INFO_LEN}),
        (FrameType.PING, 1001, {"limits": CLIENT_FRAME_LIMITS}),
        (FrameType.FORWARD_PACKET, 64 + MAX_PACKET_SIZE + 1, {"limits": CLIENT_FRAME_LIMITS}),
    ]:
        reader = FrameReader(**kw)  # type: ignore[arg-type]
        reader.feed(pack_header(ftype, length))
        with pytest.raises(FrameTooLarge):
            reader.read_frames()


def test_frames_before_a_bad_header_are_delivered_then_the_error() -> None:
    good = encode_frame(FrameType.PING, b"12345678")
    reader = FrameReader(limits=CLIENT_FRAME_LIMITS)
    reader.feed(good + good + pack_header(FrameType.SEND_PACKET, 10_000_000))
    assert reader.read_frames() == [(FrameType.PING, b"12345678")] * 2
    assert isinstance(reader.error, FrameTooLarge)
    with pytest.raises(FrameTooLarge):
        reader.read_frames()


@settings(max_examples=300)
@given(st.binary(max_size=4000), st.lists(st.integers(1, 300), max_size=20))
def test_reader_never_raises_anything_but_protocol_errors(data: bytes, chunks: list[int]) -> None:
    reader = FrameReader(limits=CLIENT_FRAME_LIMITS, wanted=SERVER_HANDLED)
    pos = 0
    try:
        for size in [*chunks, len(data)]:
            reader.feed(data[pos : pos + size])
            pos += size
            for ftype, payload in reader.read_frames():
                assert ftype in SERVER_HANDLED
                assert len(payload) <= CLIENT_FRAME_LIMITS.get(ftype, MAX_FRAME_LEN)
    except ProtocolError:
        pass


@given(st.integers(0, 255), st.binary(max_size=1100))
def test_payload_parsers_raise_only_protocol_errors(ftype: int, payload: bytes) -> None:
    parsers = [
        parse_send_packet, parse_recv_packet, parse_forward_packet, parse_note_preferred, parse_ping,
        parse_watch_conns, parse_close_peer, parse_peer_gone, parse_peer_present, parse_restarting,
        parse_server_key,
    ]  # fmt: skip
    for parse in parsers:
        try:
            parse(payload)
        except ProtocolError:
            pass


def test_payload_rules() -> None:
    with pytest.raises(MalformedFrame):
        parse_note_preferred(b"\x01\x01")
    with pytest.raises(MalformedFrame):
        parse_note_preferred(b"")
    assert parse_note_preferred(b"\x01") is True and parse_note_preferred(b"\x00") is False
    with pytest.raises(MalformedFrame):
        parse_ping(b"1234567")
    assert parse_ping(b"12345678" + b"x" * 992) == b"12345678"
    with pytest.raises(FrameTooLarge):
        parse_ping(b"x" * 1001)
    with pytest.raises(MalformedFrame):
        parse_watch_conns(b"\x00")
    with pytest.raises(MalformedFrame):
        parse_close_peer(b"k" * 33)
    with pytest.raises(MalformedFrame):
        parse_send_packet(b"k" * 31)


def test_disco_detection() -> None:
    body = DISCO_MAGIC + b"k" * 32 + b"n" * 24
    assert is_disco(body)
    assert not is_disco(body[:-1])  # too short to be a disco message
    assert not is_disco(b"XX" + body[2:])
    assert is_disco(b"d" * 32 + body, 32)


# --- handshake JSON ----------------------------------------------------------------------


def test_client_info_json_like_go() -> None:
    assert ClientInfo(version=2, can_ack_pings=True).to_json() == b'{"version":2,"CanAckPings":true}'
    assert ClientInfo().to_json() == b'{"CanAckPings":false}'
    assert ClientInfo(app_name="<a&b>").to_json() == b'{"CanAckPings":false,"AppName":"\\u003ca\\u0026b\\u003e"}'
    # Go decodes keys case-insensitively and ignores unknown fields.
    info = ClientInfo.from_json(b'{"VERSION":2,"canackpings":true,"isprober":true,"appname":"x","Future":[1]}')
    assert info == ClientInfo(version=2, can_ack_pings=True, is_prober=True, app_name="x")
    # A field named twice (exactly or folded) takes the last value, as Go's decoder assigns in order;
    # null leaves a field as it is.
    assert ClientInfo.from_json(b'{"version":2,"Version":3}').version == 3
    assert ClientInfo.from_json(b'{"Version":3,"version":2}').version == 2
    assert ClientInfo.from_json(b'{"version":null}').version == 0
    assert ClientInfo.from_json(b'{"version":2,"version":null}').version == 2
    # Go folds names with Unicode simple folding: the long s and the Kelvin sign match s and k.
    assert ClientInfo.from_json('{"I\u017fProber":true,"mesh\u212aey":null}'.encode()).is_prober


@pytest.mark.parametrize("parse", [parse_public_key, NodePrivate.from_text, parse_mesh_key, "meshKey"])
def test_hex_keys_with_spaces_are_refused(parse: object) -> None:
    """bytes.fromhex skips spaces between digit pairs: 64 characters with spaces inside made a 31-byte
    key. Go's hex.DecodeString refuses them, and so does derpd (found by tests/fuzz)."""
    spaced = "ab" * 29 + " ab " + "ab"
    assert len(spaced) == 64
    if parse == "meshKey":
        with pytest.raises(HandshakeError, match="meshKey must be 64 hex digits"):
            ClientInfo.from_json(b'{"meshKey":"' + spaced.encode() + b'"}')
        return
    prefix = {parse_public_key: "nodekey:", NodePrivate.from_text: "privkey:"}.get(parse, "")  # type: ignore[call-overload]
    with pytest.raises(InvalidKeyError):
        parse(prefix + spaced)  # type: ignore[operator]
    assert len(bytes.fromhex(spaced)) == 31  # what the old code returned


@pytest.mark.parametrize(
    "text",
    [b"", b"[]", b"not json", b'{"version":"2"}', b'{"version":2.5}', b'{"CanAckPings":1}', b'{"meshKey":"abc"}',
     b'{"meshKey":5}', b"\xff\xfe"],
)  # fmt: skip
def test_bad_client_info_json(text: bytes) -> None:
    with pytest.raises(HandshakeError):
        ClientInfo.from_json(text)


def test_remembered_client_info_decodes_as_fresh() -> None:
    """Short ClientInfo documents are decoded once and remembered (every login of one client version
    sends the same bytes): a repeat gives the same value, a malformed one raises every time, and a
    long one (past what is remembered) still decodes."""
    text = b'{"version":2,"CanAckPings":true,"AppName":"remembered"}'
    first = ClientInfo.from_json(text)
    assert first == ClientInfo(version=2, can_ack_pings=True, app_name="remembered")
    assert ClientInfo.from_json(bytearray(text)) == first
    for _ in range(3):
        with pytest.raises(HandshakeError):
            ClientInfo.from_json(b'{"meshKey":"abc"}')
    long_text = b'{"AppName":"' + b"x" * 600 + b'","version":2}'
    assert ClientInfo.from_json(long_text) == ClientInfo(version=2, app_name="x" * 600)


@settings(max_examples=200)
@given(st.binary(max_size=80))
def test_remembered_client_info_agrees_with_a_fresh_decode(data: bytes) -> None:
    try:
        fresh: ClientInfo | str = frames._client_info(data)
    except HandshakeError as e:
        fresh = str(e)
    for _ in range(2):
        try:
            got: ClientInfo | str = ClientInfo.from_json(data)
        except HandshakeError as e:
            got = str(e)
        assert got == fresh


def test_server_info_json() -> None:
    assert ServerInfo().to_json() == b'{"version":2}'
    si = ServerInfo(token_bucket_bytes_per_second=1000000, token_bucket_bytes_burst=2000000)
    assert ServerInfo.from_json(si.to_json()) == si


def test_handshake_boxes_roundtrip_and_wrong_keys() -> None:
    server = NodePrivate.generate()
    client = NodePrivate.generate()
    info = ClientInfo(version=2, can_ack_pings=True, mesh_key=os.urandom(32))
    frame = client_info_frame(client, server.public, info)
    assert open_client_info(server, frame[5:]) == (client.public, info)
    with pytest.raises(HandshakeError):
        open_client_info(NodePrivate.generate(), frame[5:])  # sealed to another server
    forged = os.urandom(32) + frame[5 + 32 :]  # claims another client key
    with pytest.raises(HandshakeError):
        open_client_info(server, forged)
    reply = server_info_frame(server, client.public, ServerInfo())
    assert open_server_info(client, server.public, reply[5:]) == ServerInfo()
    with pytest.raises(HandshakeError):
        open_server_info(client, os.urandom(32), reply[5:])


@given(st.binary(max_size=400))
def test_open_client_info_raises_only_handshake_errors(data: bytes) -> None:
    server = NodePrivate.generate()
    with pytest.raises(HandshakeError):
        open_client_info(server, data)


# --- keys and key files --------------------------------------------------------------------


def test_key_text_forms() -> None:
    key = NodePrivate.generate()
    assert NodePrivate.from_text(key.to_text()).public == key.public
    assert parse_public_key(public_key_text(key.public)) == key.public
    assert "privkey" not in repr(key)
    for bad in ["nodekey:xyz", "privkey:" + "00" * 32, "nodekey:" + "zz" * 32, "nodekey:" + "00" * 31]:
        with pytest.raises(InvalidKeyError):
            parse_public_key(bad)


def test_key_file_created_0600_and_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "derper.key"
    key, origin = load_or_create_key_file(path)
    assert origin is KeyFileOrigin.CREATED
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.read_text() == key_file_text(key)
    again, origin = load_or_create_key_file(path)
    assert origin is KeyFileOrigin.LOADED and again.public == key.public


@pytest.mark.parametrize(
    ("content", "mode", "message"),
    [
        ('{"PrivateKey":"privkey:' + "11" * 32 + '"}', 0o644, "must not be accessible by group or others"),
        ('{"PrivateKey":"privkey:' + "11" * 32 + '"}', 0o640, "chmod 600"),
        ("not json", 0o600, "malformed JSON"),
        ('{"PrivateKey":"nodekey:' + "11" * 32 + '"}', 0o600, "bad PrivateKey"),
        ('{"Other":1}', 0o600, 'missing "PrivateKey"'),
        ("[1,2]", 0o600, "JSON object"),
    ],
)
def test_bad_key_files_are_refused(tmp_path: Path, content: str, mode: int, message: str) -> None:
    path = tmp_path / "k"
    path.write_text(content)
    path.chmod(mode)
    with pytest.raises(KeyFileError, match=message):
        load_key_file(path)


def test_unreadable_key_file(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="is not a regular file"):
        load_key_file(tmp_path)  # a directory
    with pytest.raises(KeyFileError, match="cannot read key file"):
        load_key_file(tmp_path / "missing")


def test_lowercase_field_name_accepted_like_go(tmp_path: Path) -> None:
    path = tmp_path / "k"
    key = NodePrivate.generate()
    path.write_text('{"privatekey": "' + key.to_text() + '"}')
    path.chmod(0o600)
    assert load_key_file(path).public == key.public


def test_mesh_key_file(tmp_path: Path) -> None:
    path = tmp_path / "mesh"
    path.write_text("ab" * 32 + "\n")
    path.chmod(0o640)
    assert load_mesh_key_file(path) == bytes.fromhex("ab" * 32)
    path.chmod(0o644)
    with pytest.raises(MeshKeyError, match="must not be accessible by others"):
        load_mesh_key_file(path)
    assert mesh_keys_equal(b"a" * 32, b"a" * 32)
    assert not mesh_keys_equal(b"a" * 32, b"b" * 32)
    assert not mesh_keys_equal(None, None)
    assert not mesh_keys_equal(bytes(32), bytes(32))


def test_boxes_match_nacl_for_more_peers_than_the_shared_key_cache_holds() -> None:
    """seal_to/open_from (the bindings' *_afternm calls on a cached shared key) are NaCl's Box exactly,
    also once the cache has been emptied and refilled; a key NaCl refuses opens nothing."""
    me = NodePrivate.generate()
    peers = [PrivateKey.generate() for _ in range(150)]
    for peer in peers + peers[:10]:
        box = Box(peer, PublicKey(bytes(me.public)))
        nonce = os.urandom(24)
        sealed = me.seal_to(bytes(peer.public_key), b"hello", nonce)
        assert sealed == nonce + bytes(box.encrypt(b"hello", nonce).ciphertext)
        assert me.open_from(bytes(peer.public_key), bytes(box.encrypt(b"back", nonce))) == b"back"
        assert me.open_from(bytes(peer.public_key), sealed[:-1] + bytes([sealed[-1] ^ 1])) is None
    assert me.open_from(bytes(32), os.urandom(64)) is None  # all-zero: a low-order point
