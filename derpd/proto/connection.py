"""One DERP connection, sans I/O: the login for either side, then the server's frames as events.

Like h11's ``Connection``: hand it the bytes that arrived (``receive_data``), take what they
decode to (``next_event``, until ``NEED_DATA``), and write what it asks to send
(``data_to_send``, before waiting for more bytes). It never touches a socket, a clock or trio:
deadlines are the caller's cancel scopes, and every fault the peer commits is a
:class:`~derpd.proto.frames.ProtocolError` (a :class:`~derpd.proto.frames.HandshakeError` during
the login), after which the connection stays broken.

Server role (``derp/derpserver``): the ServerKey frame is ready to send at once; the client's
first frame must be ClientInfo (at most 256 KiB before it is authenticated), which opens into a
:class:`ClientHello`. The caller decides (admission); ``accept`` returns the ServerInfo frame, and
``take_reader`` hands the :class:`~derpd.proto.frames.FrameReader`, holding whatever the client
sent after ClientInfo and already set to the limits of a logged-in client, to the relay. The
relay's hot path reads spans and runs from it (``FrameReader.read_spans``), never events.

Client role (``derp/derp_client.go``): ServerKey in (the magic, then the server's key), ClientInfo
out, ServerInfo in, and a :class:`ServerHello`. With fast start (the server key known from the meta
certificate) the ClientInfo is ready before anything arrives and the ServerKey frame that still
comes must carry that key. From then on every server frame is an event (:func:`decode_server_frame`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Final

from derpd.proto.frames import (
    CLIENT_FRAME_LIMITS,
    MAX_CLIENT_INFO_LEN,
    MAX_FRAME_LEN,
    SERVER_HANDLED,
    ClientInfo,
    Frame,
    FrameReader,
    FrameType,
    HandshakeError,
    PeerPresent,
    ProtocolError,
    ServerInfo,
    client_info_frame,
    encode_frame,
    open_client_info,
    open_server_info,
    parse_peer_gone,
    parse_peer_present,
    parse_ping,
    parse_pong,
    parse_recv_packet,
    parse_restarting,
    parse_server_key,
    server_key_frame,
)
from derpd.proto.keys import NONCE_LEN, NodeKey, NodePrivate


class Role(Enum):
    CLIENT = "client"
    SERVER = "server"


class State(Enum):
    AWAIT_SERVER_KEY = "await ServerKey"  # client: the server speaks first
    AWAIT_CLIENT_INFO = "await ClientInfo"  # server: the client's first frame
    AWAIT_SERVER_INFO = "await ServerInfo"  # client: ClientInfo is out
    AWAIT_ACCEPT = "await accept"  # server: ClientHello is out; the caller admits or closes
    OPEN = "open"  # logged in
    HANDED_OFF = "handed off"  # server: the relay reads from the FrameReader now
    ERROR = "error"  # the peer broke the protocol; the error is raised again


class NeedData(Enum):
    """The type of ``NEED_DATA`` (a one-member enum, so that type checkers narrow ``is`` tests)."""

    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = NeedData.NEED_DATA
"""``next_event``: nothing more to decode until more bytes arrive."""


# --- events --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientHello:
    """Server role: the client's ClientInfo, opened. ``key`` is the client's public key."""

    key: NodeKey
    info: ClientInfo


@dataclass(frozen=True, slots=True)
class ServerHello:
    """Client role: the login is done; ``key`` is the server's public key, ``info`` its ServerInfo."""

    key: NodeKey
    info: ServerInfo


@dataclass(frozen=True, slots=True)
class ReceivedPacket:
    src: NodeKey
    data: bytes


@dataclass(frozen=True, slots=True)
class PeerGone:
    peer: NodeKey
    reason: int  # a PeerGoneReason, or a value a newer server sends


# PeerPresent (key, ip16, port, flags) is frames.PeerPresent: the record parse_peer_present builds.


@dataclass(frozen=True, slots=True)
class KeepAlive:
    pass


@dataclass(frozen=True, slots=True)
class Ping:
    data: bytes  # the 8 bytes a Pong echoes


@dataclass(frozen=True, slots=True)
class Pong:
    data: bytes


@dataclass(frozen=True, slots=True)
class Health:
    problem: str  # empty: the problem is gone


@dataclass(frozen=True, slots=True)
class Restarting:
    reconnect_in_ms: int
    try_for_ms: int


@dataclass(frozen=True, slots=True)
class Unknown:
    """A frame type a client does not act on (forward compatibility: ignore it)."""

    frame_type: int
    payload: bytes


ServerEvent = ReceivedPacket | PeerGone | PeerPresent | KeepAlive | Ping | Pong | Health | Restarting | Unknown
Event = ClientHello | ServerHello | ServerEvent

_RECV_PACKET = int(FrameType.RECV_PACKET)
_KEEP_ALIVE = KeepAlive()


def decode_server_frame(ftype: int, payload: bytes) -> ServerEvent:
    """One frame a server sent after the login, as an event; a malformed one is a ProtocolError."""
    if ftype == _RECV_PACKET:
        src, data = parse_recv_packet(payload)
        return ReceivedPacket(src, data)
    if ftype == FrameType.PEER_GONE:
        peer, reason = parse_peer_gone(payload)
        return PeerGone(peer, reason)
    if ftype == FrameType.PEER_PRESENT:
        return parse_peer_present(payload)
    if ftype == FrameType.KEEP_ALIVE:
        return _KEEP_ALIVE
    if ftype == FrameType.PING:
        return Ping(parse_ping(payload))
    if ftype == FrameType.PONG:
        return Pong(parse_pong(payload))
    if ftype == FrameType.HEALTH:
        return Health(payload.decode("utf-8", "replace"))
    if ftype == FrameType.RESTARTING:
        return Restarting(*parse_restarting(payload))
    return Unknown(ftype, payload)


_NO_LIMITS = ServerInfo()
_SERVER_INFO_JSON: dict[ServerInfo, bytes] = {}


def _server_info_json(info: ServerInfo) -> bytes:
    """What ``info`` says, as Go's JSON: the same few values for every login of a node (one per rate
    limit configured), so written once each rather than per login."""
    data = _SERVER_INFO_JSON.get(info)
    if data is None:
        if len(_SERVER_INFO_JSON) >= 8:  # a SIGHUP'd rate limit replaces the old value
            _SERVER_INFO_JSON.clear()
        data = _SERVER_INFO_JSON[info] = info.to_json()
    return data


# --- the connection --------------------------------------------------------------------------


class DerpConnection:
    """The DERP protocol state of one connection, for either role (see the module docstring).

    ``key`` is our own private key: the server's long-term key, or the client's node key.
    Client role: ``client_info`` is what to send; ``server_key`` (known from derper's meta
    certificate) makes it a fast start, with ClientInfo ready before the server says anything.
    """

    __slots__ = (
        "_error",
        "_frames",
        "_out",
        "_reader",
        "_server_key",
        "client_info",
        "key",
        "peer_key",
        "role",
        "server_info",
        "state",
    )

    def __init__(
        self,
        role: Role,
        key: NodePrivate,
        *,
        client_info: ClientInfo | None = None,
        server_key: bytes | None = None,
    ) -> None:
        self.role = role
        self.key = key
        self.peer_key = NodeKey(b"")  # the other side's public key, once it is known
        self.client_info = client_info  # ours (client role) or the client's (server role, once opened)
        self.server_info: ServerInfo | None = None  # client role: the server's, once opened
        self._server_key = server_key  # client role: the key a fast start expects
        self._out: list[bytes] = []
        self._frames: deque[Frame] = deque()  # read from the stream, not yet decoded
        self._error: ProtocolError | None = None
        if role is Role.SERVER:
            if client_info is not None or server_key is not None:
                raise ValueError("client_info and server_key are the client role's")
            self.state = State.AWAIT_CLIENT_INFO
            self._reader = FrameReader(max_frame_len=MAX_CLIENT_INFO_LEN)
            self._out.append(server_key_frame(key.public))
        else:
            if client_info is None:
                raise ValueError("the client role needs the ClientInfo to send")
            self.state = State.AWAIT_SERVER_KEY
            self._reader = FrameReader(max_frame_len=NONCE_LEN + MAX_FRAME_LEN)
            if server_key is not None:
                self._out.append(client_info_frame(key, server_key, client_info))

    def __repr__(self) -> str:
        return f"<DerpConnection {self.role.value} {self.state.value}>"

    @property
    def fast_start(self) -> bool:
        """Client role: ClientInfo went out before the server's ServerKey arrived."""
        return self._server_key is not None

    # --- bytes in, bytes out ---------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes that arrived from the peer (an end of stream is the caller's to report)."""
        if self.state is State.HANDED_OFF:
            raise RuntimeError("the FrameReader was handed off; feed it instead")
        self._reader.feed(data)

    def data_to_send(self) -> bytes:
        """What the login wants written now (ServerKey, ClientInfo); b"" when nothing.
        Write it before waiting for more bytes."""
        out = b"".join(self._out)
        self._out.clear()
        return out

    def next_event(self) -> Event | NeedData:
        """The next event, or ``NEED_DATA``. A ProtocolError is raised, and raised again by
        every later call: the connection must be closed."""
        if self._error is not None:
            raise self._error
        try:
            return self._next_event()
        except ProtocolError as e:
            self._error = e
            self.state = State.ERROR
            raise

    def events(self) -> list[Event]:
        """Every event the bytes received so far decode to (``next_event`` until ``NEED_DATA``)."""
        out: list[Event] = []
        while (event := self.next_event()) is not NEED_DATA:
            out.append(event)
        return out

    # --- server role -----------------------------------------------------------------------

    def accept(self, info: ServerInfo | None = None, *, nonce: bytes | None = None) -> bytes:
        """Server role, after :class:`ClientHello`: let the client in. Returns the ServerInfo
        frame to send (``nonce``: for tests that need fixed bytes)."""
        if self.state is not State.AWAIT_ACCEPT:
            raise RuntimeError(f"accept() in state {self.state.value}")
        self.state = State.OPEN
        sealed = self.key.seal_to(self.peer_key, _server_info_json(info or _NO_LIMITS), nonce)
        return encode_frame(FrameType.SERVER_INFO, sealed)

    def take_reader(self) -> FrameReader:
        """Server role, once accepted: the FrameReader for the relay's hot path, with the bytes
        the client sent after ClientInfo and the limits of a logged-in client."""
        if self.role is not Role.SERVER or self.state is not State.OPEN:
            raise RuntimeError(f"take_reader() in state {self.state.value}")
        self.state = State.HANDED_OFF
        return self._reader

    # --- the state machine -------------------------------------------------------------------

    def _frame(self) -> Frame | None:
        """The next whole frame: one at a time during the login (limits change after it)."""
        if self._frames:
            return self._frames.popleft()
        if self.state is State.OPEN:
            frames = self._reader.read_frames()
            if not frames:
                return None
            self._frames.extend(frames)
            return self._frames.popleft()
        return self._reader.read_frame()

    def _next_event(self) -> Event | NeedData:
        while True:
            state = self.state
            if state is State.OPEN and self.role is Role.CLIENT:
                frame = self._frame()
                return NEED_DATA if frame is None else decode_server_frame(*frame)
            if state is State.AWAIT_CLIENT_INFO:
                return self._read_client_info()
            if state is State.AWAIT_SERVER_KEY:
                if not self._read_server_key():
                    return NEED_DATA
                continue
            if state is State.AWAIT_SERVER_INFO:
                return self._read_server_info()
            raise RuntimeError(f"next_event() in state {state.value}")

    def _read_client_info(self) -> ClientHello | NeedData:
        frame = self._frame()
        if frame is None:
            return NEED_DATA
        ftype, payload = frame
        if ftype != FrameType.CLIENT_INFO:
            raise HandshakeError(f"first frame is type 0x{ftype:02x}, want ClientInfo")
        key, info = open_client_info(self.key, payload)
        # Authenticated: what follows is read with the limits of a logged-in client.
        self._reader.configure(max_frame_len=MAX_FRAME_LEN, limits=CLIENT_FRAME_LIMITS, wanted=SERVER_HANDLED)
        self.peer_key = key
        self.client_info = info
        self.state = State.AWAIT_ACCEPT
        return ClientHello(key, info)

    def _read_server_key(self) -> bool:
        frame = self._frame()
        if frame is None:
            return False
        ftype, payload = frame
        if ftype != FrameType.SERVER_KEY:
            raise HandshakeError(f"expected ServerKey, got frame type 0x{ftype:02x}")
        server_key = parse_server_key(payload)
        if self._server_key is not None:
            if server_key != self._server_key:
                raise HandshakeError("server key differs from the expected one")
        else:
            assert self.client_info is not None
            self._out.append(client_info_frame(self.key, server_key, self.client_info))
        self.peer_key = server_key
        self.state = State.AWAIT_SERVER_INFO
        return True

    def _read_server_info(self) -> ServerHello | NeedData:
        frame = self._frame()
        if frame is None:
            return NEED_DATA
        ftype, payload = frame
        if ftype != FrameType.SERVER_INFO:
            raise HandshakeError(f"expected ServerInfo, got frame type 0x{ftype:02x}")
        self.server_info = open_server_info(self.key, self.peer_key, payload)
        self.state = State.OPEN
        return ServerHello(self.peer_key, self.server_info)


__all__ = [
    "NEED_DATA",
    "ClientHello",
    "DerpConnection",
    "Event",
    "Health",
    "KeepAlive",
    "NeedData",
    "PeerGone",
    "PeerPresent",
    "Ping",
    "Pong",
    "ReceivedPacket",
    "Restarting",
    "Role",
    "ServerEvent",
    "ServerHello",
    "State",
    "Unknown",
    "decode_server_frame",
]
