"""derpd behind a TLS-terminating reverse proxy, reached with derpd's client over https://.

This is the deployment the README describes until derpd terminates TLS itself: the proxy
here is a few lines of trio (standing in for nginx), the TLS and the sockets are real.
"""

from __future__ import annotations

import ssl

import pytest
import trio
import trustme

from derpd.net.client import DerpClient
from derpd.server.node import DerpServer


async def _pump(src: trio.abc.Stream, dst: trio.abc.Stream) -> None:
    try:
        while data := await src.receive_some(65536):
            await dst.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def start_tls_proxy(nursery: trio.Nursery, backend_port: int, ca: trustme.CA) -> int:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    ctx.set_alpn_protocols(["http/1.1"])

    async def handle(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, ctx, server_side=True, https_compatible=True)
        backend = await trio.open_tcp_stream("127.0.0.1", backend_port)
        async with tls, backend, trio.open_nursery() as pumps:
            pumps.start_soon(_pump, backend, tls)
            await _pump(tls, backend)
            pumps.cancel_scope.cancel()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(trio.serve_listeners, handle, listeners)
    return listeners[0].socket.getsockname()[1]


async def test_https_clients_through_a_tls_proxy(nursery: trio.Nursery, server: DerpServer) -> None:
    ca = trustme.CA()
    port = await start_tls_proxy(nursery, server.port, ca)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    url = f"https://127.0.0.1:{port}/derp"
    a = await DerpClient.connect(url, ssl_context=client_ctx)
    b = await DerpClient.connect(url, ssl_context=client_ctx)
    async with a, b:
        assert a.server_key == b.server_key == server.key.public
        assert a.http_response is not None and a.http_response.status_code == 101
        await a.send(b.public_key, b"over TLS")
        got = await b.recv_packet()
        assert (got.src, got.data) == (a.public_key, b"over TLS")
        await b.ping()


async def test_https_client_refuses_an_untrusted_certificate(nursery: trio.Nursery, server: DerpServer) -> None:
    port = await start_tls_proxy(nursery, server.port, trustme.CA())
    other = ssl.create_default_context()
    trustme.CA().configure_trust(other)  # trusts some other CA
    with pytest.raises(ssl.SSLCertVerificationError):
        await DerpClient.connect(f"https://127.0.0.1:{port}/derp", ssl_context=other)
