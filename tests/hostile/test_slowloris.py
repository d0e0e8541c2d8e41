"""Attack 6: slowloris. Hundreds of connections drip their HTTP head, their ClientInfo or their TLS
ClientHello one byte every half second. Meanwhile a legitimate client logs in and relays at once,
over plain HTTP and over TLS; then the server's own 10 s deadlines (head, handshake, TLS; there is
no flag to shorten them) cut every drip off, and everything they held is given back.

One test, about 12 s: every drip runs at the same time.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Awaitable, Callable

import pytest
import trio

from derpd.proto.keys import NodePrivate

from .conftest import Derpd, assert_healthy, open_tcp, relay_pair, upgrade_to_client_info, valid_client_info

pytestmark = pytest.mark.hostile

DEADLINE = 10.0  # derpd's head, handshake and TLS deadlines (HEAD_TIMEOUT, HANDSHAKE_TIMEOUT)
DRIP_EVERY = 0.5
CUT_OFF_BY = DEADLINE + 3.0  # from connect: the deadline plus scheduling slack on a loaded 2-core box
LEGIT_WITHIN = 5.0
HEAD_DRIPS, CLIENT_INFO_DRIPS, TLS_HELLO_DRIPS, TLS_HEAD_DRIPS = 200, 50, 30, 20

HEAD = b"GET /derp HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: DERP\r\n\r\n"


def _insecure() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_hello() -> bytes:
    """A real TLS ClientHello, as the first flight of any client."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = _insecure().wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


class Drip:
    """One slow connection: ``open`` connects (and does whatever must come first), then ``data``
    goes out a byte at a time until the server closes the connection."""

    def __init__(self, name: str, open_: Callable[[], Awaitable[trio.abc.Stream]], data: bytes) -> None:
        self.name = name
        self.open = open_
        self.data = data
        self.sent = 0
        self.cut_after: float | None = None  # seconds from connect to the server's close
        self.error: BaseException | None = None

    async def run(self) -> None:
        try:
            stream = await self.open()
        except Exception as e:
            self.error = e
            return
        start = time.monotonic()
        try:
            async with trio.open_nursery() as nursery:

                async def drip() -> None:
                    for i in range(len(self.data)):
                        try:
                            await stream.send_all(self.data[i : i + 1])
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            return
                        self.sent = i + 1
                        await trio.sleep(DRIP_EVERY)

                nursery.start_soon(drip)
                with trio.move_on_after(CUT_OFF_BY + 2):
                    try:
                        while await stream.receive_some(65536):
                            pass
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
                    self.cut_after = time.monotonic() - start
                nursery.cancel_scope.cancel()
        finally:
            await trio.aclose_forcefully(stream)


async def _tls_connect(server: Derpd) -> trio.SSLStream[trio.SocketStream]:
    tls = trio.SSLStream(await open_tcp(server), _insecure(), server_hostname="127.0.0.1", https_compatible=True)
    await tls.do_handshake()
    return tls


async def test_slowloris_head_client_info_and_client_hello(server: Derpd, tls_server: Derpd) -> None:
    key = NodePrivate.generate()
    login = valid_client_info(key, server.public_key)

    async def after_101() -> trio.SocketStream:
        stream, _ = await upgrade_to_client_info(server)
        return stream

    drips = [Drip("http_head", lambda: open_tcp(server), HEAD) for _ in range(HEAD_DRIPS)]
    drips += [Drip("client_info", after_101, login) for _ in range(CLIENT_INFO_DRIPS)]
    drips += [Drip("tls_client_hello", lambda: open_tcp(tls_server), client_hello()) for _ in range(TLS_HELLO_DRIPS)]
    drips += [Drip("tls_http_head", lambda: _tls_connect(tls_server), HEAD) for _ in range(TLS_HEAD_DRIPS)]

    legit: dict[str, float] = {}
    with trio.fail_after(CUT_OFF_BY + 10):
        async with trio.open_nursery() as nursery:
            for d in drips:
                nursery.start_soon(d.run)
            await trio.sleep(2 * DRIP_EVERY + 1)  # every drip is open and has sent a little
            assert not [d for d in drips if d.cut_after is not None], "drips cut off before any deadline"
            for s in (server, tls_server):
                t = time.monotonic()
                await relay_pair(s, timeout=LEGIT_WITHIN)
                legit[s.name] = time.monotonic() - t

    failed = [(d.name, d.error) for d in drips if d.error is not None]
    assert not failed, failed[:5]
    by_name: dict[str, list[float]] = {}
    for d in drips:
        assert d.cut_after is not None, f"{d.name}: not cut off within {CUT_OFF_BY + 2}s ({d.sent} bytes sent)"
        assert d.sent < len(d.data), f"{d.name}: the whole {len(d.data)} bytes went out before the deadline"
        by_name.setdefault(d.name, []).append(d.cut_after)
    late = {n: max(ts) for n, ts in by_name.items() if max(ts) > CUT_OFF_BY}
    assert not late, f"cut off later than {CUT_OFF_BY}s after connect: {late}"
    print(f"legitimate logins: {legit}; cut off after (min, max) s:", {n: (min(t), max(t)) for n, t in by_name.items()})
    await assert_healthy(server)
    await assert_healthy(tls_server)
