"""The HTTP front: probe endpoints, the port-80 redirector, and the upgrade into DERP.

Answers the small set of endpoints derper serves and hands an upgraded connection (plus any
bytes the client sent after its request head) to a ``DerpHandler``. It knows nothing of
routing, nor of HTTP framing and limits: every request head must arrive within
``head_timeout`` and fit in ``max_head`` bytes, which ``derpd.net.httpserver`` (the one h11
server core, shared with the metrics listener) enforces. A DERP client's plain upgrade request
skips h11 (``read_first``: h11 and the layers around it were a fifth of a login's CPU); any
other request, and anything unusual, is answered through h11 exactly as before.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import cached_property, partial
from typing import Protocol

import h11
import trio

from derpd.base import log
from derpd.base.text import Peer
from derpd.net.addr import format_addr
from derpd.net.httpserver import (
    HEAD_TIMEOUT,
    MAX_HEAD,
    WRITE_TIMEOUT,
    Headers,
    HttpServerConnection,
    Limits,
    Refused,
    header,
    read_first,
    request_path,
)
from derpd.net.transport import Transport, close_transport
from derpd.proto.frames import PROTOCOL_VERSION
from derpd.proto.httphead import RequestHead

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


@dataclass(frozen=True)
class HttpConfig:
    home: str = ""  # "" = default page, "blank" = empty 200, http(s) URL = 302 redirect
    head_timeout: float = HEAD_TIMEOUT
    max_head: int = MAX_HEAD
    derp_enabled: bool = True
    https_redirect: str | None = None  # port 80 beside TLS: redirect to https://<this host>
    write_timeout: float = WRITE_TIMEOUT  # a response not taken within this closes the connection
    # --certmode letsencrypt: request path -> the key authorization an ACME CA's HTTP-01 check wants
    acme_http01: Callable[[bytes], bytes | None] | None = None

    @cached_property
    def limits(self) -> Limits:
        """Bodies are never used here; small ones (up to the core's 64 KiB) are drained for keep-alive.
        (Made once: every connection asks, and a config is frozen.)"""
        return Limits(max_head=self.max_head, head_timeout=self.head_timeout, write_timeout=self.write_timeout)


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
        """Serve ``transport`` to the end and close it; ``initial`` = bytes already read from it.

        A DERP client's plain upgrade request (``proto.httphead`` reads it whole) goes straight to
        the relay; every other request, and anything unusual, is h11's (``HttpServerConnection``).
        """
        handed_off = False
        limits = self.config.limits
        try:
            first = await read_first(transport, limits, initial)
            if first.eof:
                return
            head = first.head
            if head is not None and self._plain_derp_upgrade(head):
                self.requests += 1
                handed_off = True  # the relay closes it
                await self._hand_off(transport, head.headers, first.data[head.size :])
                return
            http = HttpServerConnection(transport, limits, first.data, deadline=first.deadline)
            handed_off = await http.serve(partial(self._dispatch, http))
        except Refused as e:
            self.bad_requests += 1
            log.info("http_bad_request", remote=_remote(transport), status=e.status, reason=e.reason)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            log.debug("http_connection_error", remote=_remote(transport), reason=str(e))
        except h11.ProtocolError as e:  # a peer h11 refuses at a point no handler expected: close, quietly
            self.bad_requests += 1
            log.info("http_bad_request", remote=_remote(transport), reason=Peer(str(e)))
        finally:
            if not handed_off:
                await close_transport(transport)

    async def _dispatch(self, http: HttpServerConnection, req: h11.Request) -> bool:
        """Answer one request; True when the connection was handed to DERP."""
        self.requests += 1
        path = request_path(req.target)
        method = req.method
        if self.config.acme_http01 is not None and path.startswith(b"/.well-known/acme-challenge/"):
            await http.drain_body()
            answer = self.config.acme_http01(path) if method in (b"GET", b"HEAD") else None
            if answer is None:
                await http.respond(404, body=b"no such challenge\n", head=method == b"HEAD")
            else:
                log.info("acme_http01_answered", remote=_remote(http.transport))
                await http.respond(200, body=answer, head=method == b"HEAD")
            return False
        if self.config.https_redirect and path != b"/generate_204":
            await http.drain_body()
            if method in (b"GET", b"HEAD"):
                location = b"https://" + self.config.https_redirect.encode() + req.target
                await http.respond(302, [(b"Location", location)], head=method == b"HEAD")
            else:
                await http.respond(400, body=b"Use HTTPS\n")
            return False
        if path == b"/derp":
            return await self._derp(http, req)
        await http.drain_body()
        is_head = method == b"HEAD"
        if path in (b"/derp/probe", b"/derp/latency-check"):
            if method in (b"GET", b"HEAD"):
                await http.respond(200, [(b"Access-Control-Allow-Origin", b"*")], head=is_head)
            else:
                await http.respond(405, body=b"bogus probe method\n")
        elif path == b"/generate_204":
            hdrs = [(b"Cache-Control", NO_CACHE)]
            challenge = header(req.headers, b"x-tailscale-challenge")
            if challenge is not None and CHALLENGE_RE.fullmatch(challenge):
                hdrs.append((b"X-Tailscale-Response", b"response " + challenge))
            await http.respond(204, hdrs)
        elif path == b"/robots.txt":
            await http.respond(200, body=b"User-agent: *\nDisallow: /\n", head=is_head)
        elif path == b"/":
            home = self.config.home
            if home == "blank":
                await http.respond(200, head=is_head)
            elif home.startswith(("http://", "https://")):
                await http.respond(302, [(b"Location", home.encode())], head=is_head)
            else:
                html = [(b"Content-Type", b"text/html; charset=utf-8")]
                await http.respond(200, html, body=HOME_PAGE, head=is_head)
        else:
            await http.respond(404, body=b"404 page not found\n", head=is_head)
        shown = {"method": Peer(method.decode("latin-1")), "path": Peer(path.decode("latin-1"))}
        log.debug("http_request", remote=_remote(http.transport), **shown)
        return False

    async def _derp(self, http: HttpServerConnection, req: h11.Request) -> bool:
        headers = req.headers  # names are lower-cased by h11
        if self.derp is None or not self.config.derp_enabled:
            await http.drain_body()
            await http.respond(404, body=b"derp server disabled\n")
            return False
        upgrade = (header(headers, b"upgrade") or b"").strip().lower()
        if upgrade not in (b"derp", b"websocket"):
            await http.drain_body()
            await http.respond(426, body=b"DERP requires connection upgrade\n")
            return False
        # Everything after the head is the new protocol's. A body announced on an upgrade request is
        # not waited for (nor framed): its bytes are the first DERP bytes, as after Go's Hijack.
        initial = http.trailing_data
        transport = http.transport
        if upgrade == b"websocket":
            # wsproto is loaded by the first WebSocket client, not by every relay (0.4 MB of RSS; the
            # import is one ~18 ms pause, once in a process's life).
            from derpd.net.websocket import WebSocketError, WebSocketTransport, wants_derp  # noqa: PLC0415 (weight)

            if wants_derp(header(headers, b"sec-websocket-protocol") or b""):
                try:
                    ws = await WebSocketTransport.accept(transport, req.target, list(headers), initial)
                except WebSocketError as e:
                    await http.refuse(400, Peer(str(e)))
                if ws is None:
                    log.info("websocket_refused", remote=_remote(transport), reason="no derp subprotocol")
                    return False
                self.websocket_accepts += 1
                not_ideal = header(headers, b"ideal-node") is not None
                await self.derp(ws, initial=b"", preamble=b"", not_ideal=not_ideal)
                return True
        await self._hand_off(transport, headers, initial)
        return True

    def _plain_derp_upgrade(self, head: RequestHead) -> bool:
        """Whether ``_dispatch`` would hand this request to the relay as a DERP upgrade (not WebSocket)."""
        config = self.config
        return (
            self.derp is not None
            and config.derp_enabled
            and not config.https_redirect
            and request_path(head.target) == b"/derp"
            and (header(head.headers, b"upgrade") or b"").strip().lower() == b"derp"
        )

    async def _hand_off(self, transport: Transport, headers: Headers, initial: bytes) -> None:
        """The 101 (none with fast start: the client already sent its ClientInfo) and the relay."""
        assert self.derp is not None
        not_ideal = header(headers, b"ideal-node") is not None
        fast_start = header(headers, b"derp-fast-start") == b"1"
        preamble = b"" if fast_start else self.switching_protocols
        await self.derp(transport, initial=initial, preamble=preamble, not_ideal=not_ideal)


def _remote(transport: Transport) -> str:
    return format_addr(transport.remote)
