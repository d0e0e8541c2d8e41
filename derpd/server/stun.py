"""The STUN responder: one trio task per UDP socket.

Speed comes from three things, measured in ``bench/results/stun-issue11.txt``:

* Plain non-blocking socket calls: the task drains the socket until it would block and only
  then awaits readability; trio's own socket wrappers would add tens of microseconds per call.
  After every ``batch`` datagrams it checkpoints, so a flood cannot starve the other tasks.
* On Linux, one ``recvmmsg`` takes up to 32 datagrams and one ``sendmmsg`` sends all their
  answers (:class:`_BatchIO`, through ctypes: Python's socket module has neither call). The
  kernel's per-datagram work stays, but the per-call overhead, the peer address as a string
  and back, and a Python call each way go: about a quarter of the CPU per answer. Elsewhere, or
  with ``batch_io=False``, ``recvfrom_into``/``sendto`` (``recvmsg_into``/``sendmsg``) per datagram.
* Go's own request, the only one Tailscale's clients send, is recognised and answered from a
  template (``stun.codec.tailscale_response``); anything else goes through the full codec. Counters
  are kept in local integers and added to :class:`StunStats` once per batch.

When bound to a wildcard address on Linux the responder asks the kernel for each
datagram's destination address (IP_PKTINFO / IPV6_PKTINFO) and answers *from* that
address, as Go's stunserver does: otherwise a multi-homed host may reply from another
of its addresses, which NATs and connected client sockets discard.

What is answered, and how (the codec builds the bytes, this module decides):

* Tailscale requests (SOFTWARE "tailnode" + a valid FINGERPRINT, what Go derper answers):
  always Go's binding success, even when they carry attributes we do not understand
  (Go answers those too, and Tailscale's clients never send any).
* Generic RFC 5389/8489 and classic RFC 3489 requests (only with ``generic``, the
  default): a binding success, or, when they carry a comprehension-required attribute we
  do not understand, the 420 (Unknown Attribute) error response listing it. Without
  ``generic`` they are dropped as ``not_tailscale``, exactly the set Go derper ignores.
* Anything else is dropped as ``not_stun``.
* No reply is ever sent that is more than ``max_reply_ratio`` (2.2) times the size of the
  datagram it answers; one that would be is dropped as ``amplification`` (none of the
  replies the codec builds can be, so this is a guard, not a policy).

Dropped datagrams are logged at debug, and at most once a minute at info with a count.

With ``--workers N`` every worker serves the same inherited socket(s) (``derpd.ops.workers``):
the kernel hands each datagram to whichever worker reads first, the port stays bound while a
worker restarts, and each worker counts what it answered in its own ``StunStats``.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import logging
import math
import mmap
import os
import socket
import struct
import sys
from collections.abc import Sequence
from typing import Any, Final

import trio

from derpd.base import log
from derpd.net.addr import bind_sockets, format_addr
from derpd.net.mmsg import MMSG, IOVec, MMsgHdr, MsgHdr
from stun.codec import (
    MAX_REPLY_RATIO,
    RequestKind,
    StunError,
    build_response,
    pack_address,
    parse_binding_request,
    tailscale_response,
    tailscale_response_into,
    unknown_attributes_response,
)

__all__ = ["DEFAULT_PORT", "StunServer", "StunStats"]

DEFAULT_PORT: Final = 3478
RECV_BUFFER_SIZE: Final = 64 * 1024  # every UDP datagram fits: nothing is ever truncated
DEFAULT_BATCH: Final = 128
SOCKET_RECEIVE_BUFFER: Final = 1 << 20  # SO_RCVBUF asked for: ~2,700 queued requests where allowed
BATCH_SLOTS: Final = 32  # datagrams per recvmmsg/sendmmsg call
READ_ERROR_BACKOFF: Final = 1.0  # seconds, as derper
LOG_EVERY: Final = 60.0  # at most one info line per kind of trouble per minute

# Python 3.11 does not export IP_PKTINFO; 8 is Linux's value.
_IP_PKTINFO: Final[int | None] = getattr(socket, "IP_PKTINFO", 8 if sys.platform == "linux" else None)
_CMSG_SPACE: Final = socket.CMSG_SPACE(64) if hasattr(socket, "CMSG_SPACE") else 0
_IN_PKTINFO: Final = struct.Struct("@i4s4s")  # ifindex, spec_dst, addr
_IN6_IFINDEX: Final = struct.Struct("@I")
_FAMILY_OFFSET: Final = 25  # every success reply we build starts with its address attribute
_TAILSCALE: Final = RequestKind.TAILSCALE
_MAX_CMSG_CACHE: Final = 256
_LARGEST_FAST_REPLY: Final = 44  # tailscale_response's IPv6 answer, to a 40-byte request
_FAST_REQUEST_LEN: Final = 40

# What one pass over the socket ended with.
_WOULD_BLOCK: Final = 0
_BUDGET_SPENT: Final = 1
_READ_ERROR: Final = 2
_SEND_BLOCKED: Final = 3

_logger = logging.getLogger(log.LOGGER_NAME)

# A reply waiting for send-buffer space: (bytes, peer address, ancillary data or None,
# whether it is a 420 error rather than a binding success).
_Pending = tuple[bytes, Any, list[tuple[int, int, bytes]] | None, bool]
_Cmsg = list[tuple[int, int, bytes]]


class StunStats:
    """Counters named after derper's expvars; a metrics exporter reads them.

    ``stun_requests{disposition=...}`` → derper's ``success`` (binding success sent),
    ``not_stun`` (malformed, or not a binding request), ``read_error``, ``write_error``,
    and ours: ``unknown_attribute`` (420 error response sent), ``not_tailscale`` (a
    well-formed generic or classic request, dropped because generic STUN is off),
    ``amplification`` (reply dropped: larger than the ratio allows). Every datagram read
    lands in exactly one. ``stun_addrfamily{family=...}`` → ``ipv4``, ``ipv6`` (counted, as
    in derper, for every binding success we send, before the write; by the family in the
    reply). ``by_kind`` is ours: how many binding successes answered tailscale / rfc5389 /
    rfc3489 requests. The responder adds to them once per batch of datagrams (at most
    ``batch``), so a scrape may trail the socket by that many.
    """

    __slots__ = (
        "amplification",
        "by_kind",
        "ipv4",
        "ipv6",
        "not_stun",
        "not_tailscale",
        "read_error",
        "success",
        "unknown_attribute",
        "write_error",
    )

    def __init__(self) -> None:
        self.success = 0
        self.unknown_attribute = 0
        self.not_stun = 0
        self.not_tailscale = 0
        self.amplification = 0
        self.read_error = 0
        self.write_error = 0
        self.ipv4 = 0
        self.ipv6 = 0
        self.by_kind: dict[str, int] = {"tailscale": 0, "rfc5389": 0, "rfc3489": 0}

    def requests(self) -> dict[str, int]:
        """``stun_requests`` by ``disposition`` label."""
        return {
            "success": self.success,
            "unknown_attribute": self.unknown_attribute,
            "not_stun": self.not_stun,
            "not_tailscale": self.not_tailscale,
            "amplification": self.amplification,
            "read_error": self.read_error,
            "write_error": self.write_error,
        }

    def addrfamily(self) -> dict[str, int]:
        """``stun_addrfamily`` by ``family`` label."""
        return {"ipv4": self.ipv4, "ipv6": self.ipv6}

    def add_fast(self, v4: int, v6: int) -> None:
        """Fold in a batch's fast-path answers (Tailscale requests, queued for sending)."""
        self.ipv4 += v4
        self.ipv6 += v6
        self.by_kind["tailscale"] += v4 + v6


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.partition("%")[0]).is_unspecified
    except ValueError:
        return False


def _grow_receive_buffer(sock: socket.socket) -> None:
    """Ask for a receive buffer of at least ``SOCKET_RECEIVE_BUFFER`` (the kernel caps it at
    ``net.core.rmem_max``; never shrinks one an operator set larger, e.g. systemd's ReceiveBuffer=).

    Linux's default (about 200 KiB) holds only some 280 small datagrams, since each costs its
    kernel bookkeeping (~770 bytes), not its 40 bytes; a burst of requests beyond that while the
    responder is busy is dropped. The memory is used only while datagrams wait.
    """
    try:
        # Linux reports (and charges) twice what was asked for.
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) < SOCKET_RECEIVE_BUFFER:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_RECEIVE_BUFFER)
    except OSError as exc:
        log.debug("stun_receive_buffer", error=str(exc))


# -- recvmmsg / sendmmsg (derpd.net.mmsg) ----------------------------------------------------

_MMSG: Final = MMSG
_WORD: Final = ctypes.sizeof(ctypes.c_ulong)
_MSG_SIZE: Final = ctypes.sizeof(MMsgHdr)
_MSG_U32: Final = _MSG_SIZE // 4  # a message's stride in the uint32 view
_MSG_WORDS: Final = _MSG_SIZE // _WORD  # and in the unsigned long view
_MSGLEN: Final = MMsgHdr.msg_len.offset // 4
_NAME: Final = MsgHdr.msg_name.offset // _WORD
_CONTROLLEN: Final = MsgHdr.msg_controllen.offset // _WORD
_NAME_SIZE: Final = 32  # sockaddr_in6 (28 bytes), rounded up
_REPLY_SIZE: Final = 256  # the largest reply the codec builds is under 100 bytes
_USUAL_REPLY: Final = 32  # Go's answer to a Tailscale request from IPv4
_CMSG_HEADER: Final = socket.CMSG_LEN(0) if hasattr(socket, "CMSG_LEN") else 0
_CMSG_HDR: Final = struct.Struct("@" + ("Q" if _WORD == 8 else "I") + "ii")  # cmsg_len, level, type
_PEER_V4: Final = struct.Struct("!2xH4s")  # sockaddr_in: family, port, address
_PEER_V6: Final = struct.Struct("!2xH4x16s")  # sockaddr_in6: family, port, flowinfo, address


class _BatchIO:
    """One socket's ``recvmmsg``/``sendmmsg`` buffers: ``slots`` datagrams in, their replies out.

    Received datagram ``i`` lies at ``data[i * RECV_BUFFER_SIZE:]`` (an anonymous mapping, so
    only the pages datagrams reach are ever resident), its length at ``rx32[i * _MSG_U32 +
    _MSGLEN]`` and its peer's ``sockaddr`` at ``names[i * _NAME_SIZE:]``. Reply ``j`` goes in
    ``replies[j * _REPLY_SIZE:]``, its length in ``iovw[tx_iov_len + 2 * j]``, and its message
    points back at the request's ``sockaddr`` (``txw[j * _MSG_WORDS + _NAME]``), so the kernel
    gets the peer exactly as it gave it, scope id included. The server's drain loop fills these
    directly (a method call per datagram costs as much as the rest of its work). Per socket,
    because a reply that meets a full send buffer waits in these buffers while the task awaits
    and another socket's task runs.
    """

    def __init__(self, sock: socket.socket, slots: int, pktinfo: bool) -> None:
        assert _MMSG is not None
        self.recvmmsg, self.sendmmsg = _MMSG
        self.fd = sock.fileno()
        self.family = sock.family
        self.slots = slots
        self.pktinfo = pktinfo
        v6 = sock.family == socket.AF_INET6
        self.peer = (_PEER_V6 if v6 else _PEER_V4).unpack_from
        name_len = 28 if v6 else 16  # sockaddr_in6 or sockaddr_in: what every peer's is
        self.data_map = mmap.mmap(-1, slots * RECV_BUFFER_SIZE)
        self.data = memoryview(self.data_map)
        self.names = bytearray(slots * _NAME_SIZE)
        self.replies = bytearray(slots * _REPLY_SIZE)
        self.control_size = _CMSG_SPACE if pktinfo else 0
        self.rx_control = bytearray(max(1, slots * self.control_size))
        self.tx_control = bytearray(max(1, slots * self.control_size))
        self.rx_msgs = bytearray(slots * _MSG_SIZE)
        self.tx_msgs = bytearray(slots * _MSG_SIZE)
        self.iovecs = bytearray(2 * slots * ctypes.sizeof(IOVec))
        # The kernel gets raw addresses of these buffers: each stays exported (so it cannot be
        # resized or closed, and never moves) for as long as this object lives.
        self._pins: list[ctypes.Array[ctypes.c_char]] = []
        data_at, names_at = self._address(self.data_map), self._address(self.names)
        replies_at = self._address(self.replies)
        self._address(self.iovecs)
        rx_control_at, tx_control_at = self._address(self.rx_control), self._address(self.tx_control)
        self.rx_at, self.tx_at = self._address(self.rx_msgs), self._address(self.tx_msgs)
        self.names_at = names_at
        iov = (IOVec * (2 * slots)).from_buffer(self.iovecs)
        rx = (MMsgHdr * slots).from_buffer(self.rx_msgs)
        tx = (MMsgHdr * slots).from_buffer(self.tx_msgs)
        for i in range(slots):
            iov[i].iov_base, iov[i].iov_len = data_at + i * RECV_BUFFER_SIZE, RECV_BUFFER_SIZE
            iov[slots + i].iov_base, iov[slots + i].iov_len = replies_at + i * _REPLY_SIZE, _USUAL_REPLY
            for msgs, io_index, control_at in ((rx, i, rx_control_at), (tx, slots + i, tx_control_at)):
                hdr = msgs[i].msg_hdr
                hdr.msg_name, hdr.msg_namelen = names_at + i * _NAME_SIZE, name_len
                hdr.msg_iov, hdr.msg_iovlen = ctypes.addressof(iov[io_index]), 1
                if pktinfo:
                    hdr.msg_control = control_at + i * self.control_size
            rx[i].msg_hdr.msg_controllen = self.control_size
        # The kernel overwrites the in/out fields (address and ancillary lengths) of every message
        # it fills; a copy of the headers as set up puts them back, one copy per receive.
        self.rx_template = memoryview(bytes(self.rx_msgs))
        self.rx32 = memoryview(self.rx_msgs).cast("I")
        self.rxw = memoryview(self.rx_msgs).cast("L")
        self.txw = memoryview(self.tx_msgs).cast("L")
        self.iovw = memoryview(self.iovecs).cast("L")
        self.reply_view = memoryview(self.replies)
        self.tx_iov_len = 2 * slots + 1  # iovw index of reply 0's length; reply j's is 2 j further
        self.used = 0  # slots the last receive filled
        # Reply j usually answers datagram j and is 32 bytes (Go's answer to IPv4): that is how the
        # buffers start, so the common case writes neither. A batch that differs (a datagram
        # dropped, a longer reply) writes them, and sets ``dirty`` to the slots to set back.
        self.dirty = 0
        # Replies queued and not yet handed to the kernel: [sent, queued); 420s marked in errors.
        self.sent = 0
        self.queued = 0
        self.errors = bytearray(slots)
        self.errors_queued = 0

    def _address(self, buf: bytearray | mmap.mmap) -> int:
        pin = (ctypes.c_char * len(buf)).from_buffer(buf)
        self._pins.append(pin)
        return ctypes.addressof(pin)

    def receive(self) -> int:
        """Read up to ``slots`` datagrams; 0 when none is waiting. OSError on a read error."""
        if self.used:
            end = self.used * _MSG_SIZE
            self.rx_msgs[:end] = self.rx_template[:end]
            self.used = 0
        while True:
            got: int = self.recvmmsg(self.fd, self.rx_at, self.slots, socket.MSG_DONTWAIT, None)
            if got >= 0:
                self.used = got
                return got
            err = ctypes.get_errno()
            if err in (errno.EAGAIN, errno.EWOULDBLOCK):
                return 0
            if err != errno.EINTR:
                raise OSError(err, os.strerror(err))

    def lengths(self, got: int) -> list[int]:
        """The sizes of the ``got`` datagrams just received."""
        return self.rx32[_MSGLEN : got * _MSG_U32 : _MSG_U32].tolist()

    def control(self, i: int) -> bytes:
        """The ancillary data received with datagram ``i``."""
        size = self.rxw[i * _MSG_WORDS + _CONTROLLEN]
        at = i * self.control_size
        return bytes(self.rx_control[at : at + min(size, self.control_size)])

    def set_control(self, j: int, control: bytes | None) -> None:
        """Reply ``j`` leaves with this ancillary data (None: none)."""
        if control:
            at = j * self.control_size
            self.tx_control[at : at + len(control)] = control
        self.txw[j * _MSG_WORDS + _CONTROLLEN] = len(control) if control else 0

    def send(self) -> tuple[int, int, list[tuple[int, OSError]]]:
        """Hand the queued replies to the kernel until done or it would block.

        Returns (successes, 420s sent, [(reply index, error)] for replies the kernel refused);
        ``pending()`` says whether some still wait for send-buffer space.
        """
        ok = errs = 0
        failed: list[tuple[int, OSError]] = []
        while self.sent < self.queued:
            start = self.sent
            n: int = self.sendmmsg(self.fd, self.tx_at + start * _MSG_SIZE, self.queued - start, socket.MSG_DONTWAIT)
            if n > 0:
                e = sum(self.errors[start : start + n]) if self.errors_queued else 0
                ok += n - e
                errs += e
                self.sent = start + n
                continue
            err = ctypes.get_errno()
            if n == 0 or err in (errno.EAGAIN, errno.EWOULDBLOCK):
                break
            if err == errno.EINTR:
                continue
            # sendmmsg reports an error only for the first message it could not send: skip that one.
            failed.append((start, OSError(err, os.strerror(err))))
            self.sent = start + 1
        if self.sent == self.queued:
            self._reset()
        return ok, errs, failed

    def _reset(self) -> None:
        self.sent = self.queued = 0
        if self.errors_queued:
            self.errors[:] = bytes(self.slots)
            self.errors_queued = 0
        for j in range(self.dirty):
            self.txw[j * _MSG_WORDS + _NAME] = self.names_at + j * _NAME_SIZE
            self.iovw[self.tx_iov_len + 2 * j] = _USUAL_REPLY
        self.dirty = 0

    def pending(self) -> bool:
        return self.sent < self.queued

    def drop_pending(self) -> list[int]:
        """Give up on the replies still queued; their indices (for the count and the log)."""
        dropped = list(range(self.sent, self.queued))
        self._reset()
        return dropped

    def peer_of_reply(self, j: int) -> tuple[str, int]:
        """(host, port) a queued reply goes to, for log lines."""
        name_at = self.txw[j * _MSG_WORDS + _NAME] - self.names_at
        port, packed = self.peer(self.names, name_at)
        return socket.inet_ntop(self.family, packed), port


class StunServer:
    """Answers STUN binding requests on its UDP socket(s) until cancelled.

    ``host`` ``""``, ``"*"`` or ``"::"`` binds one dual-stack ``[::]`` socket (IPV6_V6ONLY
    off; ``""``/``"*"`` fall back to ``0.0.0.0`` where IPv6 is unavailable); ``"0.0.0.0"``
    is IPv4 only; any other literal or name binds every address it resolves to (one
    socket each, all on the same port), like derpd's TCP listeners. Or pass already-bound
    stdlib UDP sockets as ``sock`` (e.g. from systemd socket activation or the ``--workers``
    supervisor); they stay the caller's to close. ``pktinfo`` None means "reply from the
    datagram's destination address when bound to a wildcard on Linux". ``generic`` False
    answers only Tailscale requests (``--no-stun-generic``). ``max_reply_ratio`` caps every
    reply's size relative to its request's. ``batch_io`` None uses recvmmsg/sendmmsg where
    available (Linux), False always the per-datagram calls. Binding happens in :meth:`serve`
    (``derpd.net.addr.bind_sockets``, the one binding path, which the ``--workers`` supervisor
    uses for STUN too), so construction does no I/O.
    """

    def __init__(
        self,
        host: str = "",
        port: int = DEFAULT_PORT,
        *,
        sock: socket.socket | Sequence[socket.socket] | None = None,
        stats: StunStats | None = None,
        pktinfo: bool | None = None,
        batch: int = DEFAULT_BATCH,
        read_error_backoff: float = READ_ERROR_BACKOFF,
        generic: bool = True,
        max_reply_ratio: float = MAX_REPLY_RATIO,
        batch_io: bool | None = None,
    ) -> None:
        if batch < 1:
            raise ValueError("batch must be at least 1")
        if not max_reply_ratio > 0:
            raise ValueError("max_reply_ratio must be positive")
        self.generic = generic
        # Compared in integers: reply * den > request * num means too large (2.2 -> 11/5), to a
        # thousandth (no fractions module: ~0.45 MB of every process for one division).
        num = round(max_reply_ratio * 1000)
        if num < 1:
            raise ValueError("max_reply_ratio must be at least 0.001")
        common = math.gcd(num, 1000)
        self._ratio_num, self._ratio_den = num // common, 1000 // common
        # The fast path skips the size check, so it is used only where every answer it gives fits.
        self._fast = _LARGEST_FAST_REPLY * self._ratio_den <= _FAST_REQUEST_LEN * self._ratio_num
        self.host = host
        self.requested_port = port
        self.stats = stats if stats is not None else StunStats()
        self._pktinfo_wanted = pktinfo
        self._batch = batch
        self._batch_io = _MMSG is not None if batch_io is None else batch_io and _MMSG is not None
        self._read_error_backoff = read_error_backoff
        given = [] if sock is None else [sock] if isinstance(sock, socket.socket) else list(sock)
        self._owns_socks = sock is None
        self._socks: list[socket.socket] = given
        # One receive buffer for all sockets on the per-datagram path: _drain never awaits, so no
        # two tasks share it at once. The batch path has its own per socket (_BatchIO).
        self._buf = bytearray(RECV_BUFFER_SIZE)
        self._view = memoryview(self._buf)
        self._cmsg_cache: dict[bytes, _Cmsg] = {}
        self._control_cache: dict[bytes, bytes] = {}
        self._drops = log.Sampled("stun_dropped", LOG_EVERY)
        self._not_tailscale = log.Sampled("stun_not_tailscale", LOG_EVERY)
        self._too_large = log.Sampled("stun_reply_too_large", LOG_EVERY)
        self._write_errors = log.Sampled("stun_write_error", LOG_EVERY)

    # -- addresses -----------------------------------------------------------------

    @property
    def sockets(self) -> list[socket.socket]:
        """The UDP sockets being served (empty before :meth:`serve` binds them)."""
        return list(self._socks)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """``(host, port)`` of every bound socket."""
        return [(str(name[0]), int(name[1])) for name in (s.getsockname() for s in self._socks)]

    @property
    def port(self) -> int:
        """The bound UDP port (useful after binding port 0)."""
        if not self._socks:
            raise RuntimeError("STUN server is not bound yet")
        return int(self._socks[0].getsockname()[1])

    def _enable_pktinfo(self, sock: socket.socket) -> bool:
        wanted = self._pktinfo_wanted
        if wanted is None:
            wanted = sys.platform == "linux" and _is_wildcard(str(sock.getsockname()[0]))
        if not wanted or _CMSG_SPACE == 0 or (sock.family == socket.AF_INET and _IP_PKTINFO is None):
            return False
        if sock.family == socket.AF_INET6:
            # On a dual-stack socket Linux reports IPv4 destinations as v4-mapped here too,
            # and accepts them back in IPV6_PKTINFO when sending to a v4-mapped peer.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        elif _IP_PKTINFO is not None:
            sock.setsockopt(socket.IPPROTO_IP, _IP_PKTINFO, 1)
        return True

    # -- serving -------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind (unless given sockets), report the bound port via ``task_status``, answer forever.

        Never returns on its own; cancel the enclosing scope to stop. Bad datagrams,
        read errors and write errors are counted and survived. Sockets it bound itself
        are closed on the way out.
        """
        if not self._socks:
            self._socks = await bind_sockets(self.host, self.requested_port, socket.SOCK_DGRAM, dual_stack_any=True)
        socks = list(self._socks)
        try:
            async with trio.open_nursery() as nursery:
                for sock in socks:
                    sock.setblocking(False)
                    _grow_receive_buffer(sock)
                    pktinfo = self._enable_pktinfo(sock)
                    batch_io = self._batch_io and sock.family in (socket.AF_INET, socket.AF_INET6)
                    log.info("stun_listening", addr=format_addr(sock.getsockname()), pktinfo=pktinfo, batch_io=batch_io)
                    if batch_io:
                        io = _BatchIO(sock, min(self._batch, BATCH_SLOTS), pktinfo)
                        nursery.start_soon(self._serve_batched, sock, io)
                    else:
                        nursery.start_soon(self._serve_socket, sock, pktinfo)
                task_status.started(self.port)
        finally:
            if self._owns_socks:
                for sock in socks:
                    sock.close()
                self._socks = []

    # -- deciding (both paths) -----------------------------------------------------------

    def _answer(self, data: bytes, host: str, port: int, addr: Any) -> tuple[bytes, bool] | None:
        """The full codec's answer to one datagram and whether it is a 420, counted; None: dropped.

        ``addr`` is only for log lines. Counts drops, and for a binding success its family and
        kind (before the write, as derper); success/unknown_attribute are counted once sent.
        """
        stats = self.stats
        n = len(data)
        try:
            request = parse_binding_request(data)
            kind = request.kind
            if kind is not _TAILSCALE and not self.generic:
                stats.not_tailscale += 1
                self._not_tailscale.note(remote=format_addr(addr), kind=str(kind))
                return None
            # A Tailscale request gets Go's success whatever else it carries, as Go answers it.
            is_error = kind is not _TAILSCALE and bool(request.unknown_attributes)
            reply = unknown_attributes_response(request) if is_error else build_response(request, host, port)
        except StunError as exc:
            stats.not_stun += 1
            self._drops.note(remote=format_addr(addr), reason=str(exc))
            return None
        if len(reply) * self._ratio_den > n * self._ratio_num:
            stats.amplification += 1
            self._too_large.note(remote=format_addr(addr), request_len=n, reply_len=len(reply))
            return None
        if is_error:
            if _logger.isEnabledFor(logging.DEBUG):
                types = ",".join(f"0x{t:04x}" for t in request.unknown_attributes)
                log.debug("stun_unknown_attribute", remote=format_addr(addr), types=types)
        else:
            if reply[_FAMILY_OFFSET] == 1:
                stats.ipv4 += 1
            else:
                stats.ipv6 += 1
            stats.by_kind[kind] += 1
        return reply, is_error

    # -- one datagram per call (any platform) --------------------------------------------

    async def _serve_socket(self, sock: socket.socket, pktinfo: bool) -> None:
        while True:
            outcome, pending = self._drain(sock, pktinfo)
            if outcome == _WOULD_BLOCK:
                await trio.lowlevel.wait_readable(sock)
            elif outcome == _BUDGET_SPENT:
                await trio.lowlevel.checkpoint()
            elif outcome == _READ_ERROR:
                await trio.sleep(self._read_error_backoff)
            elif pending is not None:
                await trio.lowlevel.wait_writable(sock)
                self._send_pending(sock, pending)

    def _drain(self, sock: socket.socket, pktinfo: bool) -> tuple[int, _Pending | None]:
        """Answer up to ``batch`` queued datagrams without awaiting; say why it stopped.

        A reply that meets a full send buffer comes back as pending, to be sent once
        the socket is writable.
        """
        stats = self.stats
        buf, view = self._buf, self._view
        fast = tailscale_response if self._fast else None
        recvfrom_into, sendto = sock.recvfrom_into, sock.sendto
        ancdata: _Cmsg = []
        fast_v4 = fast_v6 = sent_ok = 0
        try:
            for _ in range(self._batch):
                try:
                    if pktinfo:
                        n, ancdata, _flags, addr = sock.recvmsg_into([buf], _CMSG_SPACE)
                    else:
                        n, addr = recvfrom_into(buf)
                except BlockingIOError:
                    return _WOULD_BLOCK, None
                except OSError as exc:
                    stats.read_error += 1
                    log.warning("stun_read_error", error=str(exc))
                    return _READ_ERROR, None
                reply = None
                if fast is not None and n == _FAST_REQUEST_LEN:
                    try:
                        packed = pack_address(addr[0])
                    except StunError:
                        packed = b""
                    reply = fast(buf, 0, n, packed, addr[1])
                if reply is not None:
                    is_error = False
                    if len(reply) == 32:
                        fast_v4 += 1
                    else:
                        fast_v6 += 1
                else:
                    answer = self._answer(bytes(view[:n]), addr[0], addr[1], addr)
                    if answer is None:
                        continue
                    reply, is_error = answer
                cmsg = self._reply_cmsg(ancdata) if pktinfo else None
                try:
                    if cmsg:
                        sock.sendmsg([reply], cmsg, 0, addr)
                    else:
                        sendto(reply, addr)
                except BlockingIOError:
                    return _SEND_BLOCKED, (reply, addr, cmsg, is_error)
                except OSError as exc:
                    stats.write_error += 1
                    self._write_errors.note(remote=format_addr(addr), reason=str(exc))
                    continue
                if is_error:
                    stats.unknown_attribute += 1
                else:
                    sent_ok += 1
            return _BUDGET_SPENT, None
        finally:
            # Counted once per pass: the fast answers' family and kind, and every success sent.
            if fast_v4 or fast_v6:
                stats.add_fast(fast_v4, fast_v6)
            stats.success += sent_ok

    def _send_pending(self, sock: socket.socket, pending: _Pending) -> None:
        """Second and last try for a reply that met a full send buffer."""
        reply, addr, cmsg, is_error = pending
        try:
            if cmsg:
                sock.sendmsg([reply], cmsg, 0, addr)
            else:
                sock.sendto(reply, addr)
        except OSError as exc:
            self.stats.write_error += 1
            self._write_errors.note(remote=format_addr(addr), reason=str(exc) or type(exc).__name__)
            return
        if is_error:
            self.stats.unknown_attribute += 1
        else:
            self.stats.success += 1

    def _reply_cmsg(self, ancdata: _Cmsg) -> _Cmsg | None:
        """Ancillary data that makes the reply leave from the request's destination address."""
        for level, kind, data in ancdata:
            cached = self._cmsg_cache.get(data)
            if cached is not None:
                return cached
            if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and len(data) >= 16:
                # in6_pktinfo: destination address, then ifindex (0: let routing choose, as Go).
                cmsg = [(level, socket.IPV6_PKTINFO, bytes(data[:16]) + _IN6_IFINDEX.pack(0))]
            elif level == socket.IPPROTO_IP and kind == _IP_PKTINFO and len(data) >= _IN_PKTINFO.size:
                _ifindex, _spec_dst, dst = _IN_PKTINFO.unpack_from(data)
                cmsg = [(level, _IP_PKTINFO, _IN_PKTINFO.pack(0, dst, b"\x00" * 4))]
            else:
                continue
            if len(self._cmsg_cache) >= _MAX_CMSG_CACHE:
                self._cmsg_cache.clear()
            self._cmsg_cache[bytes(data)] = cmsg
            return cmsg
        return None

    # -- recvmmsg/sendmmsg (Linux) -------------------------------------------------------

    async def _serve_batched(self, sock: socket.socket, io: _BatchIO) -> None:
        while True:
            outcome = self._drain_batched(io)
            if outcome == _WOULD_BLOCK:
                await trio.lowlevel.wait_readable(sock)
            elif outcome == _BUDGET_SPENT:
                await trio.lowlevel.checkpoint()
            elif outcome == _READ_ERROR:
                await trio.sleep(self._read_error_backoff)
            else:
                # Replies wait in io's buffers (nothing is read meanwhile); one more try each once
                # the socket is writable, and those the kernel still will not take are dropped.
                await trio.lowlevel.wait_writable(sock)
                self._flush(io)
                for j in io.drop_pending():
                    self.stats.write_error += 1
                    self._write_errors.note(remote=format_addr(io.peer_of_reply(j)), reason="send buffer full")

    def _drain_batched(self, io: _BatchIO) -> int:
        """Answer up to ``batch`` queued datagrams, a recvmmsg and a sendmmsg at a time."""
        stats = self.stats
        fast = tailscale_response_into if self._fast else None
        data, names, peer, names_at = io.data, io.names, io.peer, io.names_at
        replies, iovw, txw, tx_iov_len = io.reply_view, io.iovw, io.txw, io.tx_iov_len
        pktinfo = io.pktinfo
        budget = self._batch
        while budget > 0:
            try:
                got = io.receive()
            except OSError as exc:
                stats.read_error += 1
                log.warning("stun_read_error", error=str(exc))
                return _READ_ERROR
            if not got:
                return _WOULD_BLOCK
            budget -= got
            fast_v4 = fast_v6 = 0
            j = 0  # the previous batch was all sent (or dropped) before this receive
            for i, n in enumerate(io.lengths(got)):
                port, packed = peer(names, i * _NAME_SIZE)
                at = j * _REPLY_SIZE
                size = 0 if fast is None else fast(replies, at, data, i * RECV_BUFFER_SIZE, n, packed, port)
                if size == _USUAL_REPLY:
                    fast_v4 += 1
                elif size:
                    fast_v6 += 1
                else:
                    host = socket.inet_ntop(io.family, packed)
                    start = i * RECV_BUFFER_SIZE
                    answer = self._answer(bytes(data[start : start + n]), host, port, (host, port))
                    if answer is None:
                        continue
                    reply, is_error = answer
                    if is_error:
                        io.errors[j] = 1
                        io.errors_queued += 1
                    size = len(reply)
                    if size > _REPLY_SIZE:  # none the codec builds is near; a slot must never spill
                        stats.write_error += 1
                        self._write_errors.note(remote=format_addr((host, port)), reason="reply too large")
                        continue
                    replies[at : at + size] = reply
                if size != _USUAL_REPLY or i != j:
                    iovw[tx_iov_len + 2 * j] = size
                    txw[j * _MSG_WORDS + _NAME] = names_at + i * _NAME_SIZE
                    io.dirty = j + 1
                if pktinfo:
                    io.set_control(j, self._reply_control(io.control(i)))
                j += 1
            io.queued = j
            if fast_v4 or fast_v6:
                stats.add_fast(fast_v4, fast_v6)
            if not self._flush(io):
                return _SEND_BLOCKED
        return _BUDGET_SPENT

    def _flush(self, io: _BatchIO) -> bool:
        """Send what ``io`` holds, counting each outcome; False when some still wait for space."""
        ok, errs, failed = io.send()
        stats = self.stats
        stats.success += ok
        stats.unknown_attribute += errs
        for j, exc in failed:
            stats.write_error += 1
            self._write_errors.note(remote=format_addr(io.peer_of_reply(j)), reason=str(exc))
        return not io.pending()

    def _reply_control(self, received: bytes) -> bytes | None:
        """The ancillary data (cmsghdr and all) that makes a reply leave from the destination
        address of the request that came with ``received``; None when it carried none."""
        cached = self._control_cache.get(received)
        if cached is not None:
            return cached
        ancdata: _Cmsg = []
        at = 0
        while at + _CMSG_HDR.size <= len(received):
            length, level, kind = _CMSG_HDR.unpack_from(received, at)
            if length < _CMSG_HEADER or at + length > len(received):
                break
            ancdata.append((level, kind, received[at + _CMSG_HEADER : at + length]))
            at += socket.CMSG_SPACE(length - _CMSG_HEADER)
        cmsg = self._reply_cmsg(ancdata)
        if not cmsg:
            return None
        level, kind, value = cmsg[0]
        control = _CMSG_HDR.pack(socket.CMSG_LEN(len(value)), level, kind) + value
        control += bytes(socket.CMSG_SPACE(len(value)) - len(control))
        if len(self._control_cache) >= _MAX_CMSG_CACHE:
            self._control_cache.clear()
        self._control_cache[received] = control
        return control
