"""The DERP wire format, sans I/O: frame types, limits, the frame reader, encoders, payload
parsers, and the sealed ClientInfo/ServerInfo of the login.

Nothing here touches a socket, a clock or trio. A frame is one type byte, a big-endian u32
payload length, and the payload (``derp/derp.go``). Frames are plain ``(type, payload)`` tuples,
and the relay reads spans of one immutable buffer (``FrameReader.read_spans``), so that its hot
path allocates as little as possible. The login's order of frames, for either side, and the
decoding of a server's frames into events are ``derpd.proto.connection``'s.
"""

from __future__ import annotations

import functools
import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from derpd.proto import gojson
from derpd.proto.keys import KEY_LEN, NONCE_LEN, NodeKey, NodePrivate, hex_key

MAGIC = b"DERP\xf0\x9f\x94\x91"  # "DERP🔑"
PROTOCOL_VERSION = 2
FRAME_HEADER_LEN = 5
MAX_PACKET_SIZE = 64 << 10  # data bytes after the key(s) in Send/Recv/Forward
MAX_INFO_LEN = 1 << 20  # a client accepts ServerInfo up to this (plus nonce)
MAX_CLIENT_INFO_LEN = 256 << 10  # before a client is authenticated
MAX_FRAME_LEN = 1 << 20  # any single frame from a client that must be held whole
MAX_U32 = (1 << 32) - 1  # the largest length a frame header can carry
MAX_PING_LEN = 1000
PING_DATA_LEN = 8
KEEPALIVE_SECONDS = 60.0
DISCO_MAGIC = "TS💬".encode()  # 54 53 f0 9f 92 ac
DISCO_MIN_LEN = len(DISCO_MAGIC) + KEY_LEN + NONCE_LEN


class FrameType(IntEnum):
    SERVER_KEY = 0x01
    CLIENT_INFO = 0x02
    SERVER_INFO = 0x03
    SEND_PACKET = 0x04
    RECV_PACKET = 0x05
    KEEP_ALIVE = 0x06
    NOTE_PREFERRED = 0x07
    PEER_GONE = 0x08
    PEER_PRESENT = 0x09
    FORWARD_PACKET = 0x0A
    WATCH_CONNS = 0x10
    CLOSE_PEER = 0x11
    PING = 0x12
    PONG = 0x13
    HEALTH = 0x14
    RESTARTING = 0x15


_SEND = int(FrameType.SEND_PACKET)
_FORWARD = int(FrameType.FORWARD_PACKET)
# By frame type: how many payload bytes make the key of a run (read_spans): a SendPacket's destination,
# a ForwardPacket's source and destination. 0: the type never joins a run.
_RUN_KEYS = tuple(KEY_LEN if t == _SEND else 2 * KEY_LEN if t == _FORWARD else 0 for t in range(256))
_NO_RUNS = (0,) * 256


class PeerGoneReason(IntEnum):
    DISCONNECTED = 0x00
    NOT_HERE = 0x01


class PeerPresentFlags(IntEnum):
    IS_REGULAR = 1
    IS_MESH_PEER = 2
    IS_PROBER = 4
    NOT_IDEAL = 8


Frame = tuple[int, bytes]
# Frame type, payload start, payload end (offsets into a buffer), and for a run of
# SendPackets the header offset of each of its frames (see FrameReader.read_spans).
Span = tuple[int, int, int, list[int] | None]

# Frame types a server acts on after the handshake; the rest are skipped unread.
SERVER_HANDLED = frozenset(
    {
        FrameType.NOTE_PREFERRED,
        FrameType.SEND_PACKET,
        FrameType.FORWARD_PACKET,
        FrameType.WATCH_CONNS,
        FrameType.CLOSE_PEER,
        FrameType.PING,
    }
)

# Per-type payload caps checked at the header, so nothing oversized is ever buffered.
CLIENT_FRAME_LIMITS: Mapping[int, int] = {
    FrameType.CLIENT_INFO: MAX_CLIENT_INFO_LEN,
    FrameType.SEND_PACKET: KEY_LEN + MAX_PACKET_SIZE,
    FrameType.FORWARD_PACKET: 2 * KEY_LEN + MAX_PACKET_SIZE,
    FrameType.PING: MAX_PING_LEN,
}


# --- errors ----------------------------------------------------------------------


class ProtocolError(Exception):
    """The peer broke the DERP protocol; the connection must be closed."""


class FrameTooLarge(ProtocolError):
    def __init__(self, frame_type: int, length: int, limit: int) -> None:
        self.frame_type = frame_type
        self.length = length
        self.limit = limit
        super().__init__(f"frame type {_type_name(frame_type)} length {length} exceeds limit {limit}")


class MalformedFrame(ProtocolError):
    def __init__(self, frame_type: int, reason: str) -> None:
        self.frame_type = frame_type
        self.reason = reason
        super().__init__(f"malformed {_type_name(frame_type)} frame: {reason}")


class HandshakeError(ProtocolError):
    """ServerKey, ClientInfo or ServerInfo was missing, malformed or did not open."""


def _type_name(t: int) -> str:
    try:
        return FrameType(t).name
    except ValueError:
        return f"0x{t:02x}"


# --- reading ---------------------------------------------------------------------

_HEADER = struct.Struct(">BI")
_unpack_header = _HEADER.unpack_from
pack_header = _HEADER.pack


_SKIP_ANY_LENGTH = ~MAX_U32  # a table entry: this type is skipped, whatever its length

# Every reader with the same rules shares one table (a relay has one per connection: 256 ints
# each would be ~11 KB per idle connection); a handful of rule sets exist, 64 are kept.
@functools.lru_cache(maxsize=64)
def _limit_table(
    max_frame_len: int, limits: tuple[tuple[int, int], ...], wanted: frozenset[int] | None
) -> tuple[int, ...]:
    """One lookup per frame: the payload limit of each type; for an unwanted type, bit-inverted
    and any u32 length, since it is skipped as it streams in and never held (derper's
    forward-compatibility rule: a newer client's frames of any size are read and discarded)."""
    by_type = dict(limits)
    lims = [by_type.get(t, max_frame_len) for t in range(256)]
    if wanted is not None:
        lims = [lim if t in wanted else _SKIP_ANY_LENGTH for t, lim in enumerate(lims)]
    return tuple(lims)


class FrameReader:
    """Turns arbitrary byte chunks into whole frames.

    ``feed`` buffers; ``read_frames`` returns every whole frame available, in order.
    Frames whose type is not in ``wanted`` are skipped without being buffered, whatever their
    length.
    A payload over its limit makes the stream invalid: the frames before it are still
    returned, ``error`` is set, and the next ``read_frames`` raises it.
    """

    __slots__ = ("_buf", "_need", "_pos", "_skip", "_table", "error", "skipped")

    def __init__(
        self,
        *,
        max_frame_len: int = MAX_FRAME_LEN,
        limits: Mapping[int, int] | None = None,
        wanted: frozenset[int] | None = None,
    ) -> None:
        self.error: ProtocolError | None = None
        self.skipped = 0  # frames discarded because their type is not wanted
        self._buf: bytes | bytearray = b""
        self._pos = 0
        self._need = 0  # bytes from _pos needed before another frame can complete
        self._skip = 0  # bytes of an unwanted frame still to discard
        self._table: tuple[int, ...] = ()
        self.configure(max_frame_len=max_frame_len, limits=limits, wanted=wanted)

    def configure(
        self,
        *,
        max_frame_len: int = MAX_FRAME_LEN,
        limits: Mapping[int, int] | None = None,
        wanted: frozenset[int] | None = None,
    ) -> None:
        """Set the rules for frames not yet read (a server widens them after the handshake)."""
        self._table = _limit_table(max_frame_len, tuple(sorted((limits or {}).items())), wanted)
        self._need = 0

    def limit(self, frame_type: int) -> int:
        lim = self._table[frame_type]
        return lim if lim >= 0 else ~lim

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def take_buffered(self) -> bytes:
        """Hand over the bytes not yet parsed (when another reader takes over the stream)."""
        data = bytes(memoryview(self._buf)[self._pos :])
        self._buf = b""
        self._pos = self._need = 0
        return data

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            if n == len(data):
                return
            data = memoryview(data)[n:]
        buf = self._buf
        if self._pos >= len(buf):
            self._buf = data if type(data) is bytes else bytes(data)
            self._pos = 0
        elif type(buf) is bytearray:
            buf += data
        else:
            acc = bytearray(memoryview(buf)[self._pos :])
            acc += data
            self._buf = acc
            self._pos = 0

    def read_frame(self) -> Frame | None:
        """At most one whole frame (for handshakes, where limits change after it)."""
        buf, spans = self._scan(single=True, runs=False)
        if not spans:
            return None
        ftype, start, stop, _ = spans[0]
        return ftype, buf[start:stop]

    def read_frames(self) -> list[Frame]:
        buf, spans = self._scan(single=False, runs=False)
        return [(ftype, buf[start:stop]) for ftype, start, stop, _ in spans]

    def read_spans(self) -> tuple[bytes, list[Span]]:
        """``read_frames`` for relays, without copying payloads: the (immutable) buffer the
        frames are in, and per frame its type and payload offsets. Consecutive SendPackets
        to one destination, none of them disco, come as a single span ``(SEND_PACKET,
        first payload start, last payload end, [header offset of each frame])`` so that
        they can be forwarded as a block; so do consecutive ForwardPackets (a mesh peer's)
        with one source and one destination, none of them disco, as ``(FORWARD_PACKET, ...)``.
        Every other span has ``None`` there."""
        return self._scan(single=False, runs=True)

    def _scan(self, *, single: bool, runs: bool) -> tuple[bytes, list[Span]]:
        if self.error is not None:
            raise self.error
        buf = self._buf
        pos = self._pos
        end = len(buf)
        if end - pos < self._need or end - pos < FRAME_HEADER_LEN:
            return b"", []
        if type(buf) is bytearray:
            buf = bytes(memoryview(buf)[pos:])
            end -= pos
            pos = 0
        self._need = 0
        out: list[Span] = []
        append = out.append
        table = self._table
        unpack = _unpack_header
        run: list[int] = []  # header offsets of the pending run of SendPackets (or ForwardPackets)
        run_type = _SEND
        run_key: bytes | bytearray = b""  # bytes: buf is by now
        run_start = run_stop = 0
        disco_min, disco_magic = DISCO_MIN_LEN, DISCO_MAGIC
        run_keys = _RUN_KEYS if runs else _NO_RUNS
        while end - pos >= FRAME_HEADER_LEN:
            ftype, length = unpack(buf, pos)
            lim = table[ftype]
            stop = pos + FRAME_HEADER_LEN + length
            if lim >= 0 and length <= lim:
                if stop > end:
                    self._need = stop - pos
                    break
                start = pos + FRAME_HEADER_LEN
                klen = run_keys[ftype]  # bytes of the run's key (see read_spans); 0: never in a run
                if klen and length >= klen and not (
                    length >= klen + disco_min
                    and buf[start + klen] == 0x54
                    and buf.startswith(disco_magic, start + klen)
                ):
                    if run and run_stop == pos and run_type == ftype and buf.startswith(run_key, start):
                        run.append(pos)
                        run_stop = stop
                    else:
                        if run:
                            append((run_type, run_start, run_stop, run if len(run) > 1 else None))
                        run = [pos]
                        run_type = ftype
                        run_key = buf[start : start + klen]
                        run_start = start
                        run_stop = stop
                    pos = stop
                    continue
                if run:
                    append((run_type, run_start, run_stop, run if len(run) > 1 else None))
                    run = []
                append((ftype, start, stop, None))
                pos = stop
                if single:
                    break
            elif lim < 0 and length <= ~lim:
                self.skipped += 1
                if stop > end:
                    self._skip = stop - end
                    pos = end
                    break
                pos = stop
            else:
                self.error = FrameTooLarge(ftype, length, self.limit(ftype))
                pos = end
                break
        if run:
            append((run_type, run_start, run_stop, run if len(run) > 1 else None))
        self._buf = buf
        self._pos = pos
        if self.error is not None and not out:
            raise self.error
        return buf, out  # type: ignore[return-value]  # buf is bytes here


# --- writing ---------------------------------------------------------------------


def encode_frame(ftype: int, payload: bytes = b"") -> bytes:
    return pack_header(ftype, len(payload)) + payload


def encode_frames(frames: Iterable[Frame]) -> bytes:
    """Many frames in one buffer, for a single write."""
    parts: list[bytes] = []
    for ftype, payload in frames:
        parts.append(pack_header(ftype, len(payload)))
        parts.append(payload)
    return b"".join(parts)


@functools.lru_cache(maxsize=8)
def server_key_frame(server_public: bytes) -> bytes:
    """The frame a server sends first at every login: the same bytes each time (remembered)."""
    return encode_frame(FrameType.SERVER_KEY, MAGIC + server_public)


def send_packet_frame(dst: bytes, packet: bytes) -> bytes:
    return pack_header(FrameType.SEND_PACKET, KEY_LEN + len(packet)) + dst + packet


def recv_packet_frame(src: bytes, packet: bytes) -> bytes:
    return pack_header(FrameType.RECV_PACKET, KEY_LEN + len(packet)) + src + packet


def forward_packet_frame(src: bytes, dst: bytes, packet: bytes) -> bytes:
    return pack_header(FrameType.FORWARD_PACKET, 2 * KEY_LEN + len(packet)) + src + dst + packet


def run_payloads(buf: bytes, run: list[int]) -> list[bytes]:
    """The payload of each frame at header offsets ``run`` of ``buf`` (a run from ``read_spans``),
    for a relay that takes a run one packet at a time."""
    out = []
    for at in run:
        body = at + FRAME_HEADER_LEN
        out.append(buf[body : body + int.from_bytes(buf[at + 1 : body])])
    return out


def reframe_run(buf: bytes, run: list[int], ftype: int, key: bytes, skip: int) -> bytes:
    """The frames at header offsets ``run`` of ``buf`` (a run from ``read_spans``), each rewritten as
    a ``ftype`` frame whose payload is ``key`` followed by its old payload less the first ``skip``
    bytes, all in one buffer. A relay turns a run of SendPackets into ForwardPackets with it (``key``
    the source, ``skip`` 0) and a mesh peer's run of ForwardPackets into RecvPackets (``key`` the
    source, ``skip`` both keys). The packets are copied once, by the join; every payload must be at
    least ``skip`` bytes long (a run's always are)."""
    view = memoryview(buf)
    parts: list[bytes | memoryview] = []
    append = parts.append
    extra = len(key) - skip
    size = -1
    prefix = b""
    for at in run:
        body = at + FRAME_HEADER_LEN
        end = body + int.from_bytes(buf[at + 1 : body])
        if end - body != size:  # the header (and key) shared by every payload of this size
            size = end - body
            prefix = pack_header(ftype, size + extra) + key
        append(prefix)
        append(view[body + skip : end])
    return b"".join(parts)


KEEP_ALIVE_FRAME = pack_header(FrameType.KEEP_ALIVE, 0)
WATCH_CONNS_FRAME = pack_header(FrameType.WATCH_CONNS, 0)


def note_preferred_frame(preferred: bool) -> bytes:
    return encode_frame(FrameType.NOTE_PREFERRED, b"\x01" if preferred else b"\x00")


def ping_frame(data: bytes) -> bytes:
    if len(data) != PING_DATA_LEN:
        raise ValueError("ping data must be 8 bytes")
    return encode_frame(FrameType.PING, data)


def pong_frame(data: bytes) -> bytes:
    return encode_frame(FrameType.PONG, data[:PING_DATA_LEN])


def peer_gone_frame(peer: bytes, reason: int = PeerGoneReason.DISCONNECTED) -> bytes:
    return encode_frame(FrameType.PEER_GONE, peer + bytes((reason,)))


def peer_present_frame(peer: bytes, ip16: bytes, port: int, flags: int) -> bytes:
    """51-byte PeerPresent: key, 16-byte IP (IPv4 as v4-mapped), BE port, flags."""
    return encode_frame(FrameType.PEER_PRESENT, peer + ip16 + port.to_bytes(2, "big") + bytes((flags,)))


def close_peer_frame(peer: bytes) -> bytes:
    return encode_frame(FrameType.CLOSE_PEER, peer)


def health_frame(problem: str) -> bytes:
    return encode_frame(FrameType.HEALTH, problem.encode())


def restarting_frame(reconnect_in_ms: int, try_for_ms: int) -> bytes:
    return encode_frame(FrameType.RESTARTING, struct.pack(">II", reconnect_in_ms, try_for_ms))


# --- payload parsers (one per frame type that carries structure) ------------------


def is_disco(packet: bytes, offset: int = 0) -> bool:
    """Whether a packet (starting at ``offset``) is a disco message (``disco/disco.go``)."""
    return len(packet) - offset >= DISCO_MIN_LEN and packet.startswith(DISCO_MAGIC, offset)


def parse_server_key(payload: bytes) -> NodeKey:
    if len(payload) < len(MAGIC) + KEY_LEN:
        raise HandshakeError("ServerKey frame too short")
    if not payload.startswith(MAGIC):
        raise HandshakeError("ServerKey frame has bad magic")
    return NodeKey(payload[len(MAGIC) : len(MAGIC) + KEY_LEN])


def parse_send_packet(payload: bytes) -> tuple[bytes, bytes]:
    """(destination key, packet)."""
    if len(payload) < KEY_LEN:
        raise MalformedFrame(FrameType.SEND_PACKET, "shorter than a key")
    if len(payload) - KEY_LEN > MAX_PACKET_SIZE:
        raise FrameTooLarge(FrameType.SEND_PACKET, len(payload), KEY_LEN + MAX_PACKET_SIZE)
    return payload[:KEY_LEN], payload[KEY_LEN:]


def parse_recv_packet(payload: bytes) -> tuple[NodeKey, bytes]:
    """(source key, packet) of a v2 RecvPacket."""
    if len(payload) < KEY_LEN:
        raise MalformedFrame(FrameType.RECV_PACKET, "shorter than a key")
    return NodeKey(payload[:KEY_LEN]), payload[KEY_LEN:]


def parse_forward_packet(payload: bytes) -> tuple[bytes, bytes, bytes]:
    """(source key, destination key, packet)."""
    if len(payload) < 2 * KEY_LEN:
        raise MalformedFrame(FrameType.FORWARD_PACKET, "shorter than two keys")
    if len(payload) - 2 * KEY_LEN > MAX_PACKET_SIZE:
        raise FrameTooLarge(FrameType.FORWARD_PACKET, len(payload), 2 * KEY_LEN + MAX_PACKET_SIZE)
    return payload[:KEY_LEN], payload[KEY_LEN : 2 * KEY_LEN], payload[2 * KEY_LEN :]


def parse_note_preferred(payload: bytes) -> bool:
    if len(payload) != 1:
        raise MalformedFrame(FrameType.NOTE_PREFERRED, f"length {len(payload)}, want 1")
    return payload[0] != 0


def parse_ping(payload: bytes) -> bytes:
    """The 8 bytes to echo; Ping may carry up to 1000 bytes for future use."""
    if len(payload) < PING_DATA_LEN:
        raise MalformedFrame(FrameType.PING, f"short ping: {len(payload)}")
    if len(payload) > MAX_PING_LEN:
        raise FrameTooLarge(FrameType.PING, len(payload), MAX_PING_LEN)
    return payload[:PING_DATA_LEN]


def parse_pong(payload: bytes) -> bytes:
    if len(payload) < PING_DATA_LEN:
        raise MalformedFrame(FrameType.PONG, f"short pong: {len(payload)}")
    return payload[:PING_DATA_LEN]


def parse_watch_conns(payload: bytes) -> None:
    if payload:
        raise MalformedFrame(FrameType.WATCH_CONNS, "must be empty")


def parse_close_peer(payload: bytes) -> NodeKey:
    if len(payload) != KEY_LEN:
        raise MalformedFrame(FrameType.CLOSE_PEER, f"length {len(payload)}, want {KEY_LEN}")
    return NodeKey(payload)


def parse_peer_gone(payload: bytes) -> tuple[NodeKey, int]:
    """(peer key, reason); the legacy 32-byte form means Disconnected."""
    if len(payload) < KEY_LEN:
        raise MalformedFrame(FrameType.PEER_GONE, "shorter than a key")
    reason = payload[KEY_LEN] if len(payload) > KEY_LEN else PeerGoneReason.DISCONNECTED
    return NodeKey(payload[:KEY_LEN]), reason


@dataclass(frozen=True, slots=True)
class PeerPresent:
    """A PeerPresent frame's payload (and the event ``derpd.proto.connection`` makes of one)."""

    key: NodeKey
    ip16: bytes | None = None  # 16 bytes, IPv4 as v4-mapped; None in the 32-byte legacy form
    port: int = 0
    flags: int = 0  # 0 = an old server that sent no flags

    @property
    def present(self) -> PeerPresent:
        """The record itself: what ``derpd.net.client.PeerPresentMessage.present`` used to hold."""
        return self

    def payload(self) -> bytes:
        """The payload again, in the form it came in: the key alone, with the IP and port, or
        with the flags too (``peer_present_frame`` always writes derper's 51 bytes)."""
        if self.ip16 is None:
            return self.key
        tail = bytes((self.flags,)) if self.flags else b""
        return self.key + self.ip16 + self.port.to_bytes(2, "big") + tail


def parse_peer_present(payload: bytes) -> PeerPresent:
    if len(payload) < KEY_LEN:
        raise MalformedFrame(FrameType.PEER_PRESENT, "shorter than a key")
    key = NodeKey(payload[:KEY_LEN])
    if len(payload) < KEY_LEN + 18:
        return PeerPresent(key)
    ip16 = payload[KEY_LEN : KEY_LEN + 16]
    port = int.from_bytes(payload[KEY_LEN + 16 : KEY_LEN + 18], "big")
    flags = payload[KEY_LEN + 18] if len(payload) > KEY_LEN + 18 else 0
    return PeerPresent(key, ip16, port, flags)


def parse_restarting(payload: bytes) -> tuple[int, int]:
    """(reconnect_in_ms, try_for_ms)."""
    if len(payload) < 8:
        raise MalformedFrame(FrameType.RESTARTING, "shorter than 8 bytes")
    a, b = struct.unpack_from(">II", payload)
    return a, b


# --- handshake JSON ----------------------------------------------------------------


def _go_json(obj: Mapping[str, Any]) -> bytes:
    """Compact JSON as Go's encoding/json writes it (HTML-safe escapes, raw UTF-8)."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    for raw, esc in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(raw, esc)
    return text.encode()


def _go_fields(data: bytes, fields: Mapping[str, type], what: str) -> dict[str, Any]:
    """A sealed JSON hello decoded as Go fills the struct (``derpd.proto.gojson``: bounded depth,
    case-insensitive names, last duplicate wins); any fault is a HandshakeError."""
    try:
        return gojson.decode(data, fields, what)
    except gojson.GoJSONError as e:
        raise HandshakeError(str(e)) from None


_CLIENT_INFO_FIELDS: Mapping[str, type] = {
    "meshKey": str,
    "version": int,
    "CanAckPings": bool,
    "IsProber": bool,
    "AppName": str,
}
_SERVER_INFO_FIELDS: Mapping[str, type] = {
    "version": int,
    "TokenBucketBytesPerSecond": int,
    "TokenBucketBytesBurst": int,
}


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """The client's sealed hello (``derp.ClientInfo``)."""

    version: int = 0
    mesh_key: bytes | None = None
    can_ack_pings: bool = False
    is_prober: bool = False
    app_name: str = ""

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {}
        if self.mesh_key and any(self.mesh_key):
            doc["meshKey"] = self.mesh_key.hex()
        if self.version:
            doc["version"] = self.version
        doc["CanAckPings"] = self.can_ack_pings
        if self.is_prober:
            doc["IsProber"] = True
        if self.app_name:
            doc["AppName"] = self.app_name
        return _go_json(doc)

    @classmethod
    def from_json(cls, data: bytes) -> ClientInfo:
        """The decoded JSON (as Go's client wrote it; HandshakeError if it cannot be).

        Clients of one version send the same few bytes at every login, so short ones are decoded
        once and the answer remembered (64 of them; a frozen value). A malformed one raises, and
        is never remembered."""
        if len(data) <= _REMEMBERED_INFO_LEN:
            return _remembered_client_info(bytes(data))
        return _client_info(data)


_REMEMBERED_INFO_LEN = 512  # bytes: a client's ClientInfo is ~40-140; a mesh peer's ~180


@functools.lru_cache(maxsize=64)
def _remembered_client_info(data: bytes) -> ClientInfo:
    return _client_info(data)


def _client_info(data: bytes) -> ClientInfo:
    f = _go_fields(data, _CLIENT_INFO_FIELDS, "ClientInfo")
    mesh: bytes | None = None
    if f.get("meshKey"):
        mesh = hex_key(f["meshKey"])
        if mesh is None:
            raise HandshakeError("ClientInfo: meshKey must be 64 hex digits")
    return ClientInfo(
        version=f.get("version", 0),
        mesh_key=mesh,
        can_ack_pings=f.get("CanAckPings", False),
        is_prober=f.get("IsProber", False),
        app_name=f.get("AppName", ""),
    )


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """The server's sealed reply (``derp.ServerInfo``); non-zero buckets ask the client to self-limit."""

    version: int = PROTOCOL_VERSION
    token_bucket_bytes_per_second: int = 0
    token_bucket_bytes_burst: int = 0

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {}
        if self.version:
            doc["version"] = self.version
        if self.token_bucket_bytes_per_second:
            doc["TokenBucketBytesPerSecond"] = self.token_bucket_bytes_per_second
        if self.token_bucket_bytes_burst:
            doc["TokenBucketBytesBurst"] = self.token_bucket_bytes_burst
        return _go_json(doc)

    @classmethod
    def from_json(cls, data: bytes) -> ServerInfo:
        f = _go_fields(data, _SERVER_INFO_FIELDS, "ServerInfo")
        return cls(
            version=f.get("version", 0),
            token_bucket_bytes_per_second=f.get("TokenBucketBytesPerSecond", 0),
            token_bucket_bytes_burst=f.get("TokenBucketBytesBurst", 0),
        )


def client_info_payload(
    client: NodePrivate, server_public: bytes, info: ClientInfo, nonce: bytes | None = None
) -> bytes:
    """ClientInfo frame payload: client key, then the JSON sealed to the server."""
    return client.public + client.seal_to(server_public, info.to_json(), nonce)


def client_info_frame(client: NodePrivate, server_public: bytes, info: ClientInfo, nonce: bytes | None = None) -> bytes:
    return encode_frame(FrameType.CLIENT_INFO, client_info_payload(client, server_public, info, nonce))


def open_client_info(server: NodePrivate, payload: bytes) -> tuple[NodeKey, ClientInfo]:
    """(client public key, ClientInfo) from a ClientInfo payload, or HandshakeError."""
    if len(payload) < KEY_LEN + NONCE_LEN:
        raise HandshakeError("short client info")
    if len(payload) > MAX_CLIENT_INFO_LEN:
        raise HandshakeError("long client info")
    client_key = payload[:KEY_LEN]
    msg = server.open_from(client_key, payload[KEY_LEN:])
    if msg is None:
        raise HandshakeError(f"client info of {len(payload) - KEY_LEN} bytes does not open with the client's key")
    return NodeKey(client_key), ClientInfo.from_json(msg)


def server_info_frame(server: NodePrivate, client_public: bytes, info: ServerInfo, nonce: bytes | None = None) -> bytes:
    return encode_frame(FrameType.SERVER_INFO, server.seal_to(client_public, info.to_json(), nonce))


def open_server_info(client: NodePrivate, server_public: bytes, payload: bytes) -> ServerInfo:
    if len(payload) > NONCE_LEN + MAX_INFO_LEN:
        raise HandshakeError("long server info")
    msg = client.open_from(server_public, payload)
    if msg is None:
        raise HandshakeError("server info does not open with the server's key")
    return ServerInfo.from_json(msg)
