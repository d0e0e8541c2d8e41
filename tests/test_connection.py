"""derpd.proto.connection: the sans-IO DERP connection, both roles, in memory."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from derpd.net import client as net_client
from derpd.proto.connection import (
    NEED_DATA,
    ClientHello,
    DerpConnection,
    Event,
    Health,
    KeepAlive,
    NeedData,
    PeerGone,
    Ping,
    Pong,
    ReceivedPacket,
    Restarting,
    Role,
    ServerHello,
    State,
    Unknown,
    decode_server_frame,
)
from derpd.proto.frames import (
    CLIENT_FRAME_LIMITS,
    KEEP_ALIVE_FRAME,
    MAX_CLIENT_INFO_LEN,
    ClientInfo,
    FrameTooLarge,
    FrameType,
    HandshakeError,
    MalformedFrame,
    PeerGoneReason,
    PeerPresent,
    ServerInfo,
    client_info_frame,
    encode_frame,
    health_frame,
    open_client_info,
    pack_header,
    peer_gone_frame,
    peer_present_frame,
    ping_frame,
    pong_frame,
    recv_packet_frame,
    restarting_frame,
    send_packet_frame,
    server_info_frame,
    server_key_frame,
)
from derpd.proto.keys import NodePrivate

SERVER = NodePrivate.generate()
CLIENT = NodePrivate.generate()
INFO = ClientInfo(version=2, can_ack_pings=True, app_name="test")


def state(conn: DerpConnection) -> State:
    return conn.state  # (a call, so that type checkers do not keep a narrowed state across calls)


def logged_in_client() -> DerpConnection:
    c = DerpConnection(Role.CLIENT, CLIENT, client_info=INFO)
    c.receive_data(server_key_frame(SERVER.public) + server_info_frame(SERVER, CLIENT.public, ServerInfo()))
    assert c.next_event() == ServerHello(SERVER.public, ServerInfo())
    return c


# --- server role ------------------------------------------------------------------------------


def test_server_login_one_byte_at_a_time() -> None:
    s = DerpConnection(Role.SERVER, SERVER)
    assert s.data_to_send() == server_key_frame(SERVER.public)
    assert s.data_to_send() == b""
    after = send_packet_frame(os.urandom(32), b"early")  # a client may pipeline frames after ClientInfo
    stream = client_info_frame(CLIENT, SERVER.public, INFO) + after
    fed = 0
    event: Event | NeedData = NEED_DATA
    while event is NEED_DATA:
        assert state(s) is State.AWAIT_CLIENT_INFO
        s.receive_data(stream[fed : fed + 1])
        fed += 1
        event = s.next_event()
    assert event == ClientHello(CLIENT.public, INFO)
    assert fed < len(stream)  # the hello came before the pipelined frame was whole
    assert state(s) is State.AWAIT_ACCEPT and s.peer_key == CLIENT.public and s.client_info == INFO
    with pytest.raises(RuntimeError):
        s.next_event()  # the caller decides first
    with pytest.raises(RuntimeError):
        s.take_reader()
    frame = s.accept(ServerInfo(token_bucket_bytes_per_second=5))
    assert frame[0] == FrameType.SERVER_INFO
    assert frame == server_info_frame(SERVER, CLIENT.public, ServerInfo(token_bucket_bytes_per_second=5), frame[5:29])
    s.receive_data(stream[fed:])
    reader = s.take_reader()
    assert state(s) is State.HANDED_OFF
    buf, spans = reader.read_spans()
    assert [(t, buf[a:b]) for t, a, b, _ in spans] == [(FrameType.SEND_PACKET, after[5:])]
    assert reader.limit(FrameType.SEND_PACKET) == CLIENT_FRAME_LIMITS[FrameType.SEND_PACKET]
    with pytest.raises(RuntimeError):
        s.receive_data(b"x")


def test_server_info_is_what_each_login_was_given() -> None:
    """accept() writes each ServerInfo's JSON once and reuses it: never another login's, and not stale
    after more distinct values than it keeps (a rate limit changed by SIGHUP, again and again)."""
    nonce = bytes(range(24))
    infos = [None, ServerInfo(), *(ServerInfo(token_bucket_bytes_per_second=n, token_bucket_bytes_burst=2 * n)
                                   for n in range(1, 12))]  # fmt: skip
    for info in infos + infos[::-1]:
        s = DerpConnection(Role.SERVER, SERVER)
        s.receive_data(client_info_frame(CLIENT, SERVER.public, INFO))
        assert isinstance(s.next_event(), ClientHello)
        frame = s.accept(info, nonce=nonce)
        assert frame == server_info_frame(SERVER, CLIENT.public, info or ServerInfo(), nonce)
        c = DerpConnection(Role.CLIENT, CLIENT, client_info=INFO)
        c.receive_data(server_key_frame(SERVER.public) + frame)
        assert c.next_event() == ServerHello(SERVER.public, info or ServerInfo())


def test_server_accepts_fast_start_bytes_before_its_server_key_went_out() -> None:
    s = DerpConnection(Role.SERVER, SERVER)
    s.receive_data(client_info_frame(CLIENT, SERVER.public, INFO))  # came with the HTTP request
    assert s.next_event() == ClientHello(CLIENT.public, INFO)
    assert s.data_to_send() == server_key_frame(SERVER.public)  # still sent (the client checks it)


@pytest.mark.parametrize(
    ("stream", "error", "match"),
    [
        (KEEP_ALIVE_FRAME, HandshakeError, "first frame is type 0x06, want ClientInfo"),
        (encode_frame(FrameType.CLIENT_INFO, b"k" * 40), HandshakeError, "short client info"),
        (encode_frame(FrameType.CLIENT_INFO, CLIENT.public + os.urandom(60)), HandshakeError, "does not open"),
        (pack_header(FrameType.CLIENT_INFO, MAX_CLIENT_INFO_LEN + 1), FrameTooLarge, "exceeds limit"),
    ],
)
def test_server_refuses_a_bad_first_frame_for_good(stream: bytes, error: type[Exception], match: str) -> None:
    s = DerpConnection(Role.SERVER, SERVER)
    s.receive_data(stream)
    with pytest.raises(error, match=match):
        s.next_event()
    assert s.state is State.ERROR
    s.receive_data(client_info_frame(CLIENT, SERVER.public, INFO))
    with pytest.raises(error, match=match):  # the same error again: the connection is done
        s.next_event()


# --- client role ------------------------------------------------------------------------------


def test_client_login() -> None:
    c = DerpConnection(Role.CLIENT, CLIENT, client_info=INFO)
    assert not c.fast_start and c.data_to_send() == b""
    assert c.next_event() is NEED_DATA
    c.receive_data(server_key_frame(SERVER.public))
    assert c.next_event() is NEED_DATA
    assert c.state is State.AWAIT_SERVER_INFO and c.peer_key == SERVER.public
    out = c.data_to_send()
    assert out[0] == FrameType.CLIENT_INFO
    assert open_client_info(SERVER, out[5:]) == (CLIENT.public, INFO)
    info = ServerInfo(token_bucket_bytes_per_second=100, token_bucket_bytes_burst=200)
    c.receive_data(server_info_frame(SERVER, CLIENT.public, info) + KEEP_ALIVE_FRAME)
    assert c.next_event() == ServerHello(SERVER.public, info)
    assert state(c) is State.OPEN and c.server_info == info
    assert c.events() == [KeepAlive()]


def test_client_fast_start_sends_first_and_checks_the_key() -> None:
    c = DerpConnection(Role.CLIENT, CLIENT, client_info=INFO, server_key=SERVER.public)
    assert c.fast_start
    out = c.data_to_send()
    assert open_client_info(SERVER, out[5:]) == (CLIENT.public, INFO)
    c.receive_data(server_key_frame(SERVER.public) + server_info_frame(SERVER, CLIENT.public, ServerInfo()))
    assert c.next_event() == ServerHello(SERVER.public, ServerInfo())
    assert c.data_to_send() == b""  # nothing more to say

    wrong = DerpConnection(Role.CLIENT, CLIENT, client_info=INFO, server_key=os.urandom(32))
    wrong.receive_data(server_key_frame(SERVER.public))
    with pytest.raises(HandshakeError, match="server key differs"):
        wrong.next_event()


@pytest.mark.parametrize(
    ("stream", "match"),
    [
        (KEEP_ALIVE_FRAME, "expected ServerKey, got frame type 0x06"),
        (encode_frame(FrameType.SERVER_KEY, b"DERP" + b"k" * 36), "bad magic"),
        (encode_frame(FrameType.SERVER_KEY, server_key_frame(SERVER.public)[5:-1]), "too short"),
        (server_key_frame(SERVER.public) + KEEP_ALIVE_FRAME, "expected ServerInfo, got frame type 0x06"),
        (server_key_frame(SERVER.public) + encode_frame(FrameType.SERVER_INFO, os.urandom(40)), "does not open"),
    ],
)
def test_client_refuses_a_bad_login(stream: bytes, match: str) -> None:
    c = DerpConnection(Role.CLIENT, CLIENT, client_info=INFO)
    c.receive_data(stream)
    with pytest.raises(HandshakeError, match=match):
        c.next_event()
    assert c.state is State.ERROR


def test_roles_are_checked() -> None:
    with pytest.raises(ValueError):
        DerpConnection(Role.CLIENT, CLIENT)
    with pytest.raises(ValueError):
        DerpConnection(Role.SERVER, SERVER, client_info=INFO)
    c = logged_in_client()
    with pytest.raises(RuntimeError):
        c.accept()
    with pytest.raises(RuntimeError):
        c.take_reader()


@settings(max_examples=50, deadline=None)
@given(cuts=st.lists(st.integers(1, 200), max_size=30), fast=st.booleans())
def test_both_roles_talk_in_any_chunking(cuts: list[int], fast: bool) -> None:
    """A server-role and a client-role object log in to each other through arbitrary chunks."""
    s = DerpConnection(Role.SERVER, SERVER)
    c = DerpConnection(Role.CLIENT, CLIENT, client_info=INFO, server_key=SERVER.public if fast else None)
    to_client = s.data_to_send()
    to_server = c.data_to_send()
    hello: Event | None = None
    done: Event | None = None
    sizes = iter(cuts)
    for _ in range(10_000):
        if to_server:
            n = next(sizes, len(to_server))
            s.receive_data(to_server[:n])
            to_server = to_server[n:]
            if hello is None and (event := s.next_event()) is not NEED_DATA:
                hello = event
                to_client += s.accept(ServerInfo())
        if to_client:
            n = next(sizes, len(to_client))
            c.receive_data(to_client[:n])
            to_client = to_client[n:]
        if done is None and (event := c.next_event()) is not NEED_DATA:
            done = event
        to_server += c.data_to_send()
        if done is not None and not to_client and not to_server:
            break
    assert hello == ClientHello(CLIENT.public, INFO)
    assert done == ServerHello(SERVER.public, ServerInfo())


# --- server frames as events ------------------------------------------------------------------

PEER = os.urandom(32)
IP16 = bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 1])


@pytest.mark.parametrize(
    ("frame", "event"),
    [
        (recv_packet_frame(PEER, b"data"), ReceivedPacket(PEER, b"data")),
        (peer_gone_frame(PEER, PeerGoneReason.NOT_HERE), PeerGone(PEER, PeerGoneReason.NOT_HERE)),
        (encode_frame(FrameType.PEER_GONE, PEER), PeerGone(PEER, PeerGoneReason.DISCONNECTED)),  # legacy form
        (peer_present_frame(PEER, IP16, 41641, 1), PeerPresent(PEER, IP16, 41641, 1)),
        (encode_frame(FrameType.PEER_PRESENT, PEER), PeerPresent(PEER)),
        (KEEP_ALIVE_FRAME, KeepAlive()),
        (encode_frame(FrameType.PING, b"12345678" + b"x" * 992), Ping(b"12345678")),
        (pong_frame(b"abcdefgh"), Pong(b"abcdefgh")),
        (health_frame("trouble"), Health("trouble")),
        (health_frame(""), Health("")),
        (restarting_frame(500, 10_000), Restarting(500, 10_000)),
        (server_key_frame(SERVER.public), Unknown(FrameType.SERVER_KEY, server_key_frame(SERVER.public)[5:])),
        (encode_frame(0x7F, b"future"), Unknown(0x7F, b"future")),
    ],
)
def test_server_frames_become_events(frame: bytes, event: Event) -> None:
    c = logged_in_client()
    c.receive_data(frame[:3])
    assert c.next_event() is NEED_DATA
    c.receive_data(frame[3:] + KEEP_ALIVE_FRAME)
    assert c.events() == [event, KeepAlive()]
    assert decode_server_frame(frame[0], frame[5:]) == event


@pytest.mark.parametrize(
    ("frame", "error"),
    [
        (encode_frame(FrameType.PING, b"x" * 1001), FrameTooLarge),  # the 1000-byte cap applies to Ping
        (encode_frame(FrameType.PING, b"x" * 7), MalformedFrame),
        (encode_frame(FrameType.PONG, b"x" * 7), MalformedFrame),
        (encode_frame(FrameType.RECV_PACKET, b"k" * 31), MalformedFrame),
        (encode_frame(FrameType.RESTARTING, b"\x00" * 7), MalformedFrame),
    ],
)
def test_malformed_server_frames_are_protocol_errors(frame: bytes, error: type[Exception]) -> None:
    c = logged_in_client()
    c.receive_data(frame + KEEP_ALIVE_FRAME)
    with pytest.raises(error):
        c.next_event()
    with pytest.raises(error):
        c.next_event()


def test_ping_is_not_decoded_as_pong() -> None:
    """Regression: the client decoded Ping with the Pong parser, so the 1000-byte cap was never applied."""
    assert isinstance(decode_server_frame(FrameType.PING, ping_frame(b"12345678")[5:]), Ping)
    with pytest.raises(FrameTooLarge):
        net_client.decode_message(FrameType.PING, b"x" * 1001)


def test_peer_present_payload_keeps_its_form() -> None:
    for payload in (PEER, PEER + IP16 + b"\xa2\xa9", peer_present_frame(PEER, IP16, 41641, 2)[5:]):
        present = decode_server_frame(FrameType.PEER_PRESENT, payload)
        assert isinstance(present, PeerPresent) and present.payload() == payload
        assert present.present is present  # what PeerPresentMessage.present held


def test_client_module_keeps_its_names() -> None:
    """derpd.net.client's message names are the connection's events (probe and tests use them)."""
    assert net_client.ReceivedPacket is ReceivedPacket
    assert net_client.PeerGoneMessage is PeerGone
    assert net_client.PeerPresentMessage is PeerPresent
    assert net_client.KeepAliveMessage is KeepAlive
    assert net_client.PingMessage is Ping
    assert net_client.PongMessage is Pong
    assert net_client.HealthMessage is Health
    assert net_client.RestartingMessage is Restarting
    assert net_client.UnknownFrame is Unknown
    assert net_client.decode_message is decode_server_frame
