"""The STUN responder: one trio task per UDP socket.

Speed comes from plain non-blocking socket calls: the task drains the socket
(``recvfrom`` → parse → ``sendto``) until it would block and only then awaits
readability; trio's own socket wrappers would add tens of microseconds per call.
After every ``batch`` datagrams it checkpoints, so a flood cannot starve the other
tasks of the process.

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
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
import sys
from collections.abc import Sequence
from fractions import Fraction
from typing import Any, Final

import trio

from derpd.base import log
from derpd.net.addr import bind_sockets, format_addr
from stun.codec import (
    MAX_REPLY_RATIO,
    RequestKind,
    StunError,
    build_response,
    parse_binding_request,
    unknown_attributes_response,
)

__all__ = ["DEFAULT_PORT", "StunServer", "StunStats"]

DEFAULT_PORT: Final = 3478
RECV_BUFFER_SIZE: Final = 64 * 1024
DEFAULT_BATCH: Final = 128
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

# What one pass over the socket ended with.
_WOULD_BLOCK: Final = 0
_BUDGET_SPENT: Final = 1
_READ_ERROR: Final = 2
_SEND_BLOCKED: Final = 3

_logger = logging.getLogger(log.LOGGER_NAME)

# A reply waiting for send-buffer space: (bytes, peer address, ancillary data or None,
# whether it is a 420 error rather than a binding success).
_Pending = tuple[bytes, Any, list[tuple[int, int, bytes]] | None, bool]


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
    rfc3489 requests.
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



def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.partition("%")[0]).is_unspecified
    except ValueError:
        return False


class StunServer:
    """Answers STUN binding requests on its UDP socket(s) until cancelled.

    ``host`` ``""``, ``"*"`` or ``"::"`` binds one dual-stack ``[::]`` socket (IPV6_V6ONLY
    off; ``""``/``"*"`` fall back to ``0.0.0.0`` where IPv6 is unavailable); ``"0.0.0.0"``
    is IPv4 only; any other literal or name binds every address it resolves to (one
    socket each, all on the same port), like derpd's TCP listeners. Or pass already-bound
    stdlib UDP sockets as ``sock`` (e.g. from systemd socket activation); they stay the
    caller's to close. ``pktinfo`` None means "reply from the datagram's destination
    address when bound to a wildcard on Linux". ``generic`` False answers only Tailscale
    requests (``--no-stun-generic``). ``max_reply_ratio`` caps every reply's size relative
    to its request's. Binding happens in :meth:`serve` (``derpd.net.addr.bind_sockets``, the
    one binding path, which the ``--workers`` supervisor uses for STUN too), so construction
    does no I/O.
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
    ) -> None:
        if batch < 1:
            raise ValueError("batch must be at least 1")
        if not max_reply_ratio > 0:
            raise ValueError("max_reply_ratio must be positive")
        self.generic = generic
        # Compared in integers: reply * den > request * num means too large (2.2 -> 11/5).
        ratio = Fraction(str(max_reply_ratio)).limit_denominator(1000)
        self._ratio_num, self._ratio_den = ratio.numerator, ratio.denominator
        self.host = host
        self.requested_port = port
        self.stats = stats if stats is not None else StunStats()
        self._pktinfo_wanted = pktinfo
        self._batch = batch
        self._read_error_backoff = read_error_backoff
        given = [] if sock is None else [sock] if isinstance(sock, socket.socket) else list(sock)
        self._owns_socks = sock is None
        self._socks: list[socket.socket] = given
        # One receive buffer for all sockets: _drain never awaits, so no two tasks share it at once.
        self._buf = bytearray(RECV_BUFFER_SIZE)
        self._view = memoryview(self._buf)
        self._cmsg_cache: dict[bytes, list[tuple[int, int, bytes]]] = {}
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
                    pktinfo = self._enable_pktinfo(sock)
                    log.info("stun_listening", addr=format_addr(sock.getsockname()), pktinfo=pktinfo)
                    nursery.start_soon(self._serve_socket, sock, pktinfo)
                task_status.started(self.port)
        finally:
            if self._owns_socks:
                for sock in socks:
                    sock.close()
                self._socks = []

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
        by_kind = stats.by_kind
        buf, view = self._buf, self._view
        generic = self.generic
        num, den = self._ratio_num, self._ratio_den
        ancdata: list[tuple[int, int, bytes]] = []
        for _ in range(self._batch):
            try:
                if pktinfo:
                    n, ancdata, _flags, addr = sock.recvmsg_into([buf], _CMSG_SPACE)
                else:
                    n, addr = sock.recvfrom_into(buf)
            except BlockingIOError:
                return _WOULD_BLOCK, None
            except OSError as exc:
                stats.read_error += 1
                log.warning("stun_read_error", error=str(exc))
                return _READ_ERROR, None
            try:
                request = parse_binding_request(bytes(view[:n]))
                kind = request.kind
                if kind is not _TAILSCALE and not generic:
                    stats.not_tailscale += 1
                    self._not_tailscale.note(remote=format_addr(addr), kind=str(kind))
                    continue
                # A Tailscale request gets Go's success whatever else it carries, as Go answers it.
                is_error = kind is not _TAILSCALE and bool(request.unknown_attributes)
                reply = unknown_attributes_response(request) if is_error else build_response(request, addr[0], addr[1])
            except StunError as exc:
                stats.not_stun += 1
                self._drops.note(remote=format_addr(addr), reason=str(exc))
                continue
            if len(reply) * den > n * num:
                stats.amplification += 1
                self._too_large.note(remote=format_addr(addr), request_len=n, reply_len=len(reply))
                continue
            if is_error:
                if _logger.isEnabledFor(logging.DEBUG):
                    types = ",".join(f"0x{t:04x}" for t in request.unknown_attributes)
                    log.debug("stun_unknown_attribute", remote=format_addr(addr), types=types)
            else:
                if reply[_FAMILY_OFFSET] == 1:
                    stats.ipv4 += 1
                else:
                    stats.ipv6 += 1
                by_kind[kind] += 1
            cmsg = self._reply_cmsg(ancdata) if pktinfo else None
            try:
                if cmsg:
                    sock.sendmsg([reply], cmsg, 0, addr)
                else:
                    sock.sendto(reply, addr)
            except BlockingIOError:
                return _SEND_BLOCKED, (reply, addr, cmsg, is_error)
            except OSError as exc:
                stats.write_error += 1
                self._write_errors.note(remote=format_addr(addr), reason=str(exc))
                continue
            if is_error:
                stats.unknown_attribute += 1
            else:
                stats.success += 1
        return _BUDGET_SPENT, None

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

    def _reply_cmsg(self, ancdata: list[tuple[int, int, bytes]]) -> list[tuple[int, int, bytes]] | None:
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
