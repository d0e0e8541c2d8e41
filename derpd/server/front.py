"""The HTTP front: request heads, probe endpoints, and the upgrade into DERP.

Parses with h11, answers the small set of endpoints derper serves, and hands an
upgraded connection (plus any bytes the client sent after its request head) to a
``DerpHandler``. It knows nothing of routing. Every request head must arrive within
``head_timeout`` and fit in ``max_head`` bytes (slowloris and memory protection).
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Awaitable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Protocol

import h11
import trio

from derpd.base import log
from derpd.base.text import Peer
from derpd.net.transport import Transport, format_addr
from derpd.net.websocket import WebSocketError, WebSocketTransport, wants_derp
from derpd.proto.frames import PROTOCOL_VERSION

MAX_HEAD = 8 * 1024
MAX_BODY = 64 * 1024  # bodies are never used; small ones are drained for keep-alive
MAX_CONTENT_LENGTH_DIGITS = 18  # Go parses Content-Length as an int63: 19+ digits is a bad request
HEAD_TIMEOUT = 10.0
WRITE_TIMEOUT = 10.0

CHALLENGE_RE = re.compile(rb"[A-Za-z0-9._:-]{1,64}")
NO_CACHE = b"no-cache, no-store, must-revalidate, no-transform, max-age=0"

HOME_PAGE = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>derpd</title></head>
<body>
<h1>DERP</h1>
<p>This is a <a href="https://tailscale.com/kb/1232/derp-servers">DERP</a> relay server
(<a href="https://github.com/">derpd</a>) for Tailscale and Headscale tailnets.</p>
<p>Clients connect to <code>/derp</code>. Health checks: <code>/derp/probe</code>,
<code>/derp/latency-check</code>, <code>/generate_204</code>.</p>
</body></html>
"""


class DerpHandler(Protocol):
    def __call__(
        self, transport: Transport, *, initial: bytes, preamble: bytes, not_ideal: bool
    ) -> Awaitable[None]: ...


@dataclass
class HttpConfig:
    home: str = ""  # "" = default page, "blank" = empty 200, http(s) URL = 302 redirect
    head_timeout: float = HEAD_TIMEOUT
    max_head: int = MAX_HEAD
    derp_enabled: bool = True
    https_redirect: str | None = None  # port 80 beside TLS: redirect to https://<this host>
    write_timeout: float = WRITE_TIMEOUT  # a response not taken within this closes the connection


class _Close(Exception):
    """End this HTTP connection (after a response, or silently)."""


# What h11 accepts as a request line (RFC 9112 §3: method SP request-target SP HTTP-version).
_REQUEST_LINE = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+ [^\x00-\x20\x7f]+ HTTP/[0-9]\.[0-9]\r?")


def check_request_line(pending: bytes | bytearray) -> bool:
    """Whether the request line in ``pending`` (unparsed bytes of a head) is complete and checked;
    raises h11.RemoteProtocolError(400) at once for a line h11 would refuse once the head is whole."""
    end = pending.find(b"\n")
    if end < 0:
        return False
    if not _REQUEST_LINE.fullmatch(pending, 0, end):  # h11 allows no empty line before it either
        raise h11.RemoteProtocolError("illegal request line", error_status_hint=400)
    return True


def request_path(target: bytes) -> bytes:
    """The path of a request target, origin-form (``/derp?x``) or absolute-form
    (``http://host/derp``, which proxies send and HTTP/1.1 servers must accept)."""
    if target[:1] != b"/":
        scheme, sep, rest = target.partition(b"://")
        if sep and scheme.lower() in (b"http", b"https"):
            slash = rest.find(b"/")
            target = rest[slash:] if slash >= 0 else b"/"
    return target.split(b"?", 1)[0]


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for k, v in headers:
        if k == name:
            return v
    return None


def _date() -> bytes:
    return email.utils.formatdate(usegmt=True).encode()


class HttpFront:
    """Serves one accepted connection: zero or more HTTP requests, maybe an upgrade."""

    def __init__(self, derp: DerpHandler | None, public_key: bytes, config: HttpConfig | None = None) -> None:
        self.derp = derp
        # derper's exact 101 (Derp-Public-Key: bare lowercase hex). Written as bytes, not through h11,
        # which refuses a 101 while the client is still (in its view) sending a body.
        self.switching_protocols = (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n"
            b"Derp-Version: %d\r\nDerp-Public-Key: %s\r\n\r\n" % (PROTOCOL_VERSION, public_key.hex().encode())
        )
        self.config = config or HttpConfig()
        self.requests = 0
        self.bad_requests = 0
        self.websocket_accepts = 0

    async def handle(self, transport: Transport, initial: bytes = b"") -> None:
        """Serve ``transport`` to the end and close it; ``initial`` = bytes already read from it."""
        handed_off = False
        try:
            handed_off = await self._serve(transport, initial)
        except _Close:
            pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            log.debug("http_connection_error", remote=_remote(transport), reason=str(e))
        except h11.ProtocolError as e:  # a peer h11 refuses at a point no handler expected: close, quietly
            self.bad_requests += 1
            log.info("http_bad_request", remote=_remote(transport), reason=Peer(str(e)))
        finally:
            if not handed_off:
                with trio.CancelScope(shield=True):
                    await transport.aclose()

    async def _serve(self, transport: Transport, initial: bytes) -> bool:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.config.max_head)
        if initial:
            conn.receive_data(initial)
        while True:
            request = await self._read_head(conn, transport)
            if request is None:
                return False
            self.requests += 1
            if await self._dispatch(conn, transport, request):
                return True
            if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                conn.start_next_cycle()
            else:
                return False

    async def _next_event(self, conn: h11.Connection, transport: Transport, limit: int = 0) -> object:
        """The next h11 event; with ``limit``, the bytes it may take (h11 itself only
        bounds an event that is still incomplete, not one that arrives whole).

        While a head is incomplete, its request line is checked as soon as it has arrived (h11
        waits for the whole head): a client that opens with garbage gets its 400 at once, as
        from Go's line-by-line reader, not at the head deadline."""
        line_checked = False
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                if limit and isinstance(event, h11.Request):
                    head = sum(len(k) + len(v) + 4 for k, v in event.headers) + len(event.target) + 16
                    if head > limit:
                        raise h11.RemoteProtocolError("request head too long", error_status_hint=431)
                return event
            if not line_checked and conn.their_state is h11.IDLE:
                line_checked = check_request_line(conn.trailing_data[0])
            data = await transport.receive_some()
            conn.receive_data(data)

    async def _read_head(self, conn: h11.Connection, transport: Transport) -> h11.Request | None:
        timeout = self.config.head_timeout
        event: object = None
        with trio.move_on_after(timeout) as scope:
            try:
                event = await self._next_event(conn, transport, self.config.max_head)
            except h11.RemoteProtocolError as e:
                await self._bad_request(conn, transport, e)
        if scope.cancelled_caught:
            if conn.their_state is h11.IDLE and not conn.trailing_data[0]:
                return None  # an idle keep-alive connection: close quietly
            self.bad_requests += 1
            log.info("http_bad_request", remote=_remote(transport), reason=f"request head not complete in {timeout:g}s")
            await self._try_respond(conn, transport, 408, b"request timeout\n", close=True)
            return None
        if isinstance(event, h11.Request):
            return event
        return None  # ConnectionClosed or similar

    async def _bad_request(self, conn: h11.Connection, transport: Transport, err: h11.RemoteProtocolError) -> None:
        self.bad_requests += 1
        status = err.error_status_hint
        if status == 400 and conn.their_state is h11.IDLE and len(conn.trailing_data[0]) > self.config.max_head:
            status = 431  # h11's "Receive buffer too long": an incomplete head over the limit
        log.info("http_bad_request", remote=_remote(transport), status=status, reason=Peer(str(err)))
        await self._try_respond(conn, transport, status, HTTPStatus(status).phrase.encode() + b"\n", close=True)
        raise _Close

    async def _try_respond(
        self, conn: h11.Connection, transport: Transport, status: int, body: bytes, *, close: bool = False
    ) -> None:
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        try:
            await self._respond(conn, transport, status, body=body, close=close)
        except (h11.LocalProtocolError, trio.BrokenResourceError, OSError):
            pass

    async def _drain_body(self, conn: h11.Connection, transport: Transport) -> None:
        """Read the rest of the request so the connection can be reused."""
        total = 0
        with trio.move_on_after(self.config.head_timeout) as scope:
            while True:
                try:
                    event = await self._next_event(conn, transport)
                except h11.RemoteProtocolError as e:
                    await self._bad_request(conn, transport, e)
                if isinstance(event, h11.Data):
                    total += len(event.data)
                    if total > MAX_BODY:
                        await self._try_respond(conn, transport, 413, b"request body too large\n", close=True)
                        raise _Close
                elif isinstance(event, h11.EndOfMessage):
                    return
                else:
                    raise _Close
        if scope.cancelled_caught:
            raise _Close

    async def _respond(
        self,
        conn: h11.Connection,
        transport: Transport,
        status: int,
        headers: list[tuple[bytes, bytes]] | None = None,
        body: bytes = b"",
        *,
        head: bool = False,
        close: bool = False,
    ) -> None:
        hdrs = list(headers or [])
        if body and not any(k.lower() == b"content-type" for k, _ in hdrs):
            hdrs.append((b"Content-Type", b"text/plain; charset=utf-8"))
            hdrs.append((b"X-Content-Type-Options", b"nosniff"))
        hdrs.append((b"Date", _date()))
        if status not in (204, 304):
            hdrs.append((b"Content-Length", str(len(body)).encode()))
        if close:
            hdrs.append((b"Connection", b"close"))
        out = conn.send(h11.Response(status_code=status, headers=hdrs, reason=HTTPStatus(status).phrase.encode()))
        if body and not head:
            out += conn.send(h11.Data(data=body))
        out += conn.send(h11.EndOfMessage())
        with trio.move_on_after(self.config.write_timeout) as scope:
            await transport.send_all(out)
        if scope.cancelled_caught:  # a client that does not read its answers gets no more of them
            raise _Close

    async def _dispatch(self, conn: h11.Connection, transport: Transport, req: h11.Request) -> bool:
        """Answer one request; True when the connection was handed to DERP."""
        path = request_path(req.target)
        method = req.method
        headers = list(req.headers)  # names are lower-cased by h11
        if not req.http_version.startswith(b"1."):  # e.g. the h2 preface "PRI * HTTP/2.0"
            await self._reject(conn, transport, 505, "unsupported protocol version")
        length = _header(headers, b"content-length")
        if length is not None and len(length) > MAX_CONTENT_LENGTH_DIGITS:  # Go: must fit an int63
            await self._reject(conn, transport, 400, "bad Content-Length")
        if length is not None and _header(headers, b"transfer-encoding") is not None and path != b"/derp":
            # Two framings: a request-smuggling attempt (RFC 9112 §6.1), refused and closed rather than
            # answered and kept alive. (An upgrade is never framed: its body is ignored, as by derper.)
            await self._reject(conn, transport, 400, "both Content-Length and Transfer-Encoding")
        if length is not None and int(length) > MAX_BODY and path != b"/derp":
            await self._reject(conn, transport, 413, "request body too large")
        if self.config.https_redirect and path != b"/generate_204":
            await self._drain_body(conn, transport)
            if method in (b"GET", b"HEAD"):
                location = b"https://" + self.config.https_redirect.encode() + req.target
                await self._respond(conn, transport, 302, [(b"Location", location)], head=method == b"HEAD")
            else:
                await self._respond(conn, transport, 400, body=b"Use HTTPS\n")
            return False
        if path == b"/derp":
            return await self._derp(conn, transport, req, headers)
        await self._drain_body(conn, transport)
        is_head = method == b"HEAD"
        if path in (b"/derp/probe", b"/derp/latency-check"):
            if method in (b"GET", b"HEAD"):
                await self._respond(conn, transport, 200, [(b"Access-Control-Allow-Origin", b"*")], head=is_head)
            else:
                await self._respond(conn, transport, 405, body=b"bogus probe method\n")
        elif path == b"/generate_204":
            hdrs = [(b"Cache-Control", NO_CACHE)]
            challenge = _header(headers, b"x-tailscale-challenge")
            if challenge is not None and CHALLENGE_RE.fullmatch(challenge):
                hdrs.append((b"X-Tailscale-Response", b"response " + challenge))
            await self._respond(conn, transport, 204, hdrs)
        elif path == b"/robots.txt":
            await self._respond(conn, transport, 200, body=b"User-agent: *\nDisallow: /\n", head=is_head)
        elif path == b"/":
            home = self.config.home
            if home == "blank":
                await self._respond(conn, transport, 200, head=is_head)
            elif home.startswith(("http://", "https://")):
                await self._respond(conn, transport, 302, [(b"Location", home.encode())], head=is_head)
            else:
                html = [(b"Content-Type", b"text/html; charset=utf-8")]
                await self._respond(conn, transport, 200, html, body=HOME_PAGE, head=is_head)
        else:
            await self._respond(conn, transport, 404, body=b"404 page not found\n", head=is_head)
        shown = {"method": Peer(method.decode("latin-1")), "path": Peer(path.decode("latin-1"))}
        log.debug("http_request", remote=_remote(transport), **shown)
        return False

    async def _reject(self, conn: h11.Connection, transport: Transport, status: int, reason: str) -> None:
        """Answer a request that cannot be served with ``status`` and close, without reading its body."""
        self.bad_requests += 1
        log.info("http_bad_request", remote=_remote(transport), status=status, reason=reason)
        await self._try_respond(conn, transport, status, reason.encode() + b"\n", close=True)
        raise _Close

    async def _derp(
        self, conn: h11.Connection, transport: Transport, req: h11.Request, headers: list[tuple[bytes, bytes]]
    ) -> bool:
        upgrade = (_header(headers, b"upgrade") or b"").strip().lower()
        if self.derp is None or not self.config.derp_enabled:
            await self._drain_body(conn, transport)
            await self._respond(conn, transport, 404, body=b"derp server disabled\n")
            return False
        if upgrade not in (b"derp", b"websocket"):
            await self._drain_body(conn, transport)
            await self._respond(conn, transport, 426, body=b"DERP requires connection upgrade\n")
            return False
        websocket = upgrade == b"websocket" and wants_derp(_header(headers, b"sec-websocket-protocol") or b"")
        # Everything after the head is the new protocol's. A body announced on an upgrade request is
        # not waited for (nor framed): its bytes are the first DERP bytes, as after Go's Hijack.
        initial, _closed = conn.trailing_data
        not_ideal = _header(headers, b"ideal-node") is not None
        if websocket:
            try:
                ws = await WebSocketTransport.accept(transport, req.target, headers, bytes(initial))
            except WebSocketError as e:
                self.bad_requests += 1
                log.info("http_bad_request", remote=_remote(transport), status=400, reason=Peer(str(e)))
                await self._respond(conn, transport, 400, body=str(e).encode() + b"\n", close=True)
                return False
            if ws is None:
                log.info("websocket_refused", remote=_remote(transport), reason="no derp subprotocol")
                return False
            self.websocket_accepts += 1
            await self.derp(ws, initial=b"", preamble=b"", not_ideal=not_ideal)
            return True
        fast_start = _header(headers, b"derp-fast-start") == b"1"
        preamble = b"" if fast_start else self.switching_protocols
        await self.derp(transport, initial=bytes(initial), preamble=preamble, not_ideal=not_ideal)
        return True


def _remote(transport: Transport) -> str:
    return format_addr(transport.remote)
