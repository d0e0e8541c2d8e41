"""A real `derpd serve` process the way systemd runs it: sd_notify on a unix datagram socket, a
watchdog, SIGHUP and SIGTERM, and sockets inherited through LISTEN_FDS (socket activation)."""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import trio

from derpd.net.client import DerpClient
from stun import codec as stun_codec

from .conftest import child_env, send_until_delivered

REPO = Path(__file__).resolve().parents[1]

# Moves the passed descriptors to 3, 4, ... and sets LISTEN_PID to the pid exec keeps, as systemd does.
TRAMPOLINE = textwrap.dedent(
    """
    import os, sys
    fds = [int(x) for x in sys.argv[1].split(",") if x]
    for i, fd in enumerate(fds):
        os.dup2(fd, 3 + i)
    for fd in fds:
        os.close(fd)
    if fds:
        os.environ["LISTEN_FDS"] = str(len(fds))
        os.environ["LISTEN_PID"] = str(os.getpid())
    os.execv(sys.executable, [sys.executable, "-m", "derpd", *sys.argv[2:]])
    """
)


async def notifications(sock: trio.socket.SocketType, want: bytes, limit: float = 20.0) -> list[bytes]:
    """Datagrams until one contains ``want`` (bounded)."""
    got: list[bytes] = []
    with trio.fail_after(limit):
        while True:
            data = await sock.recv(4096)
            got.append(data)
            if want in data:
                return got


def spawn(tmp_path: Path, notify_path: Path, inherit: list[socket.socket], args: list[str]) -> subprocess.Popen[bytes]:
    high = [fcntl.fcntl(s.fileno(), fcntl.F_DUPFD_CLOEXEC, 10) for s in inherit]
    env = child_env(derpd_settings=True)
    env.update(NOTIFY_SOCKET=str(notify_path), WATCHDOG_USEC="300000", PYTHONPATH=str(REPO))
    try:
        cmd = [sys.executable, "-c", TRAMPOLINE, ",".join(map(str, high)), *args]
        return subprocess.Popen(cmd, env=env, pass_fds=high, cwd=tmp_path, stderr=subprocess.PIPE)
    finally:
        for fd in high:
            os.close(fd)
        for s in inherit:
            s.close()


async def reload_then_stop(proc: subprocess.Popen[bytes], notify: trio.socket.SocketType) -> list[bytes]:
    """SIGHUP (RELOADING=1, then READY=1), then SIGTERM (STOPPING=1) and a clean exit; the reload's
    notifications are returned."""
    proc.send_signal(signal.SIGHUP)
    reload = await notifications(notify, b"RELOADING=1")
    await notifications(notify, b"READY=1")
    proc.send_signal(signal.SIGTERM)
    await notifications(notify, b"STOPPING=1")
    with trio.fail_after(20):
        while proc.poll() is None:
            await trio.sleep(0.05)
    assert proc.returncode == 0
    return reload


async def test_serve_under_systemd_with_socket_activation(tmp_path: Path) -> None:
    notify_path = tmp_path / "notify.sock"
    notify = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await notify.bind(str(notify_path))
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(16)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    derp_port, stun_port = tcp.getsockname()[1], udp.getsockname()[1]
    args = ["serve", "--dev", "--addr", f"127.0.0.1:{derp_port}", "--stun-port", str(stun_port)]
    args += ["--key-file", str(tmp_path / "k"), "--shutdown-timeout", "2s"]
    proc = spawn(tmp_path, notify_path, [tcp, udp], args)
    try:
        ready = await notifications(notify, b"READY=1")
        assert b"STATUS=0 clients" in ready[-1]
        await notifications(notify, b"WATCHDOG=1")  # pinged from the event loop

        # DERP and STUN are served on the inherited sockets (this process closed its copies).
        url = f"http://127.0.0.1:{derp_port}/derp"
        async with await DerpClient.connect(url) as a, await DerpClient.connect(url) as b:
            await a.send(b.public_key, b"via systemd's socket")
            with trio.fail_after(5):
                assert (await b.recv_packet()).data == b"via systemd's socket"
            probe = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            await probe.bind(("127.0.0.1", 0))
            await probe.sendto(stun_codec.binding_request(), ("127.0.0.1", stun_port))
            with trio.fail_after(5):
                reply, _ = await probe.recvfrom(2048)
            assert stun_codec.parse_response(reply).port == probe.getsockname()[1]
            probe.close()
            status = await notifications(notify, b"STATUS=2 clients")
            assert status

            reload = await reload_then_stop(proc, notify)
            assert b"MONOTONIC_USEC=" in reload[-1]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        notify.close()
    log = proc.stderr.read().decode() if proc.stderr else ""
    assert "event=socket_activation sockets=2" in log and "event=clients_closed count=2" in log


async def test_without_systemd_nothing_is_sent_and_it_binds_itself(tmp_path: Path) -> None:
    """No NOTIFY_SOCKET and no LISTEN_FDS: derpd runs exactly as before."""
    env = child_env(derpd_settings=True)
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "derpd", "serve", "--dev", "--addr", "127.0.0.1:0", "--stun-port", "-1"],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    buf = b""
    with trio.fail_after(20):
        while b"event=serving" not in buf:
            chunk = await proc.stderr.receive_some(4096)
            assert chunk, buf
            buf += chunk
    proc.send_signal(signal.SIGTERM)
    with trio.fail_after(20):
        await proc.wait()
    assert proc.returncode == 0 and b"socket_activation" not in buf


async def test_workers_under_systemd(tmp_path: Path) -> None:
    """`--workers 2` as systemd runs it: the main process takes the sockets, says READY=1 once both
    workers serve, answers the watchdog, and passes SIGHUP and SIGTERM on to its workers."""
    notify_path = tmp_path / "notify.sock"
    notify = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await notify.bind(str(notify_path))
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(16)
    derp_port = tcp.getsockname()[1]
    args = ["serve", "--dev", "--addr", f"127.0.0.1:{derp_port}", "--stun-port", "-1", "--workers", "2"]
    args += ["--key-file", str(tmp_path / "k"), "--shutdown-timeout", "2s"]
    proc = spawn(tmp_path, notify_path, [tcp], args)
    try:
        ready = await notifications(notify, b"READY=1")
        assert b"STATUS=2/2 workers up" in ready[-1]
        await notifications(notify, b"WATCHDOG=1")
        url = f"http://127.0.0.1:{derp_port}/derp"
        clients = [await DerpClient.connect(url) for _ in range(6)]
        for a, b in zip(clients, clients[1:] + clients[:1], strict=True):  # wherever each landed
            await send_until_delivered(a, b, b"through systemd's socket")
        await reload_then_stop(proc, notify)
        for c in clients:
            await c.aclose()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        notify.close()
    log = proc.stderr.read().decode() if proc.stderr else ""
    assert "event=socket_activation sockets=1" in log
    for worker in (0, 1):  # each worker reloaded and said goodbye to its own clients
        assert f"event=reloading worker={worker}" in log, log
        assert f"event=clients_closed worker={worker}" in log, log
