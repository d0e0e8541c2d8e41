"""``SocketTransport.close`` and trio: a task waiting on the socket wakes when another task closes it,
and a socket trio never waited on is closed without trio's ``notify_closing`` (the login path under
load), leaving nothing behind for the next socket that gets the same descriptor number."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from derpd.net.transport import SocketTransport


def _pair() -> tuple[SocketTransport, socket.socket]:
    a, b = socket.socketpair()
    return SocketTransport(a), b


@pytest.mark.parametrize("waiting_to", ["receive", "send"])
async def test_close_wakes_a_task_waiting_on_the_socket(waiting_to: str) -> None:
    transport, peer = _pair()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    woke: list[BaseException] = []

    async def waiter() -> None:
        try:
            if waiting_to == "receive":
                await transport.receive_some()
            else:
                await transport.send_all(b"x" * (8 << 20))  # far more than both buffers hold
        except trio.ClosedResourceError as e:
            woke.append(e)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            transport.close()
    assert len(woke) == 1
    peer.close()


@pytest.mark.parametrize("waited", [False, True])
async def test_the_next_socket_on_the_same_descriptor_waits_normally(waited: bool) -> None:
    """Closing with or without notify_closing: a later socket that reuses the descriptor number is
    waited on and woken as any other (nothing stale in trio's or the kernel's epoll)."""
    transport, peer = _pair()
    fd = transport.sock.fileno()
    if waited:
        peer.send(b"x")
        assert await transport.receive_some() == b"x"
    else:
        peer.send(b"x")
        assert transport.read_ready() == b"x"
    transport.close()
    peer.close()
    reused = [socket.socketpair() for _ in range(4)]  # the lowest free numbers: fd among them
    try:
        for a, b in reused:
            if fd not in (a.fileno(), b.fileno()):
                continue
            mine, other = (a, b) if a.fileno() == fd else (b, a)
            again = SocketTransport(mine)
            with trio.fail_after(5):
                async with trio.open_nursery() as nursery:
                    got: list[bytes] = []

                    async def read(t: SocketTransport = again, out: list[bytes] = got) -> None:
                        out.append(await t.receive_some())

                    nursery.start_soon(read)
                    await trio.testing.wait_all_tasks_blocked()
                    other.send(b"again")
            assert got == [b"again"]
            again.close()
            return
        pytest.skip("the descriptor number was not reused")
    finally:
        for a, b in reused:
            a.close()
            b.close()
