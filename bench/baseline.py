"""The no-protocol baseline: a minimal trio packet relay, for a same-box reference.

derpd's overhead is only meaningful as a ratio against what a trivial Python relay
reaches on the same machine under the same load. This forwarder does the least a packet
relay must do and nothing DERP-specific: each connection starts with a 37-byte hello
(magic, role, 32-byte key); receivers register under their key; a sender's stream is
split into the very same SendPacket frames the load generator writes to a DERP server
(type, length, destination key, payload), and every frame goes, unchanged, to the
receiver registered under its destination key. No handshake, no crypto, no queues,
drop policy or statistics.

It uses the fastest design from ``hot-path.md``: plain non-blocking socket calls,
256 KiB reads, every whole frame walked by offset, one ``send`` per destination per
read, and a trio readiness wait only when a socket would block (plus one checkpoint
per read, as derpd's transport does, for fairness). Unlike DERP it never drops: a
slow receiver back-pressures its sender through TCP. Frames to an unknown key are
discarded.

Run: ``python -m bench.baseline --addr 127.0.0.1:0``; it prints ``listening HOST:PORT``.
"""

from __future__ import annotations

import argparse
import socket
import struct
import sys

import trio

HELLO = struct.Struct(">4sB32s")  # magic, role, key
MAGIC = b"BSL2"
FRAME_HEADER = struct.Struct(">BI")
KEY_LEN = 32
ROLE_RECEIVER = 0
ROLE_SENDER = 1
RECV_SIZE = 256 * 1024
_SOFT = (BlockingIOError, InterruptedError)
_GONE = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, TimeoutError)


def hello(role: int, key: bytes) -> bytes:
    """The first bytes a baseline client writes (a receiver's key is its address)."""
    return HELLO.pack(MAGIC, role, key)


async def _recv(sock: socket.socket) -> bytes:
    """Some bytes (b"" at EOF or reset), waiting only when nothing is buffered."""
    while True:
        try:
            data = sock.recv(RECV_SIZE)
        except _SOFT:
            await trio.lowlevel.wait_readable(sock)
            continue
        except _GONE:
            return b""
        await trio.lowlevel.checkpoint()
        return data


async def _send_all(sock: socket.socket, data: bytes) -> None:
    """Write now if the kernel takes it; park on writability only for the rest."""
    try:
        sent = sock.send(data)
    except _SOFT:
        sent = 0
    if sent == len(data):
        return
    view = memoryview(data)
    while sent < len(data):
        await trio.lowlevel.wait_writable(sock)
        try:
            sent += sock.send(view[sent:])
        except _SOFT:
            pass


class Forwarder:
    """Receiver registry plus one task per connection."""

    def __init__(self) -> None:
        self.receivers: dict[bytes, socket.socket] = {}

    async def handle(self, tsock: trio.socket.SocketType) -> None:
        sock = socket.socket(tsock.family, tsock.type, tsock.proto, fileno=tsock.detach())
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            head = b""
            while len(head) < HELLO.size:
                data = await _recv(sock)
                if not data:
                    return
                head += data
            magic, role, key = HELLO.unpack_from(head)
            if magic != MAGIC:
                return
            rest = head[HELLO.size :]
            if role == ROLE_RECEIVER:
                await self._receiver(sock, key)
            elif role == ROLE_SENDER:
                await self._sender(sock, rest)
        except _GONE:
            pass
        finally:
            trio.lowlevel.notify_closing(sock)
            sock.close()

    async def _receiver(self, sock: socket.socket, key: bytes) -> None:
        self.receivers[key] = sock
        try:
            while await _recv(sock):  # receivers never talk; wait for EOF
                pass
        finally:
            if self.receivers.get(key) is sock:
                del self.receivers[key]

    async def _sender(self, sock: socket.socket, data: bytes) -> None:
        unpack = FRAME_HEADER.unpack_from
        receivers = self.receivers
        while True:
            out: dict[bytes, list[bytes]] = {}
            pos, end = 0, len(data)
            while end - pos >= 5:
                _type, length = unpack(data, pos)
                stop = pos + 5 + length
                if stop > end:
                    break
                dst = data[pos + 5 : pos + 5 + KEY_LEN]
                parts = out.get(dst)
                if parts is None:
                    out[dst] = [data[pos:stop]]
                else:
                    parts.append(data[pos:stop])
                pos = stop
            for dst, parts in out.items():
                dsock = receivers.get(dst)
                if dsock is not None:
                    try:
                        await _send_all(dsock, b"".join(parts))
                    except OSError:
                        pass  # the receiver went away
            more = await _recv(sock)
            if not more:
                return
            data = data[pos:] + more if pos < end else more


async def serve(host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Listen and forward until cancelled; reports the bound port through task_status."""
    listener = trio.socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    await listener.bind((host, port))
    listener.listen(1024)
    fwd = Forwarder()
    task_status.started(listener.getsockname()[1])
    async with trio.open_nursery() as nursery:
        with listener:
            while True:
                conn, _ = await listener.accept()
                nursery.start_soon(fwd.handle, conn)


async def _main(host: str, port: int) -> None:
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(serve, host, port)
        print(f"listening {host}:{bound}", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.baseline", description=__doc__.splitlines()[0])
    ap.add_argument("--addr", default="127.0.0.1:0", help="HOST:PORT to listen on (port 0 = any)")
    args = ap.parse_args(argv)
    host, _, port = args.addr.rpartition(":")
    try:
        trio.run(_main, host.strip("[]") or "127.0.0.1", int(port))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
