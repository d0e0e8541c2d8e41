"""sd_notify against real unix datagram sockets, LISTEN_FDS with real inherited descriptors in a
child process, and the shipped units through `systemd-analyze verify`."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from derpd.net.addr import InheritedSocket
from derpd.ops import sdnotify

from .conftest import child_env

REPO = Path(__file__).resolve().parents[1]
SERVICE = REPO / "systemd" / "derpd.service"
SOCKET = REPO / "systemd" / "derpd.socket"
SHIPPED_EXEC = "/opt/derpd/venv/bin/derpd"


# -- sd_notify -------------------------------------------------------------------------------------


@pytest.fixture
def notify_sock(tmp_path: Path) -> Iterator[tuple[socket.socket, dict[str, str]]]:
    """A bound unix datagram socket standing in for systemd's, and the env naming it."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        s.settimeout(5)
        yield s, {"NOTIFY_SOCKET": str(path)}


def test_notify_messages(notify_sock: tuple[socket.socket, dict[str, str]]) -> None:
    s, env = notify_sock
    assert sdnotify.ready(env=env)
    assert s.recv(4096) == b"READY=1"
    assert sdnotify.ready(status="serving; 0 clients", env=env)
    assert s.recv(4096) == b"READY=1\nSTATUS=serving; 0 clients"
    assert sdnotify.status("3 clients\nsecond line", env=env)
    assert s.recv(4096) == b"STATUS=3 clients second line"
    assert sdnotify.stopping(env=env)
    assert s.recv(4096) == b"STOPPING=1"
    assert sdnotify.watchdog(env=env)
    assert s.recv(4096) == b"WATCHDOG=1"
    assert sdnotify.notify("EXTEND_TIMEOUT_USEC=5000000", env=env)
    assert s.recv(4096) == b"EXTEND_TIMEOUT_USEC=5000000"


def test_reloading_carries_monotonic_usec(notify_sock: tuple[socket.socket, dict[str, str]]) -> None:
    s, env = notify_sock
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert sdnotify.reloading(env=env)
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    m = re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=(\d+)", s.recv(4096))
    assert m is not None
    assert before <= int(m.group(1)) <= after


def test_notify_abstract_socket() -> None:
    name = f"derpd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(b"\0" + name.encode())
        s.settimeout(5)
        assert sdnotify.ready(status="up", env={"NOTIFY_SOCKET": f"@{name}"})
        assert s.recv(4096) == b"READY=1\nSTATUS=up"


def test_notify_without_systemd_is_a_noop(tmp_path: Path) -> None:
    assert sdnotify.notify("READY=1", env={}) is False
    assert sdnotify.ready(env={"NOTIFY_SOCKET": ""}) is False
    assert sdnotify.stopping(env={"NOTIFY_SOCKET": str(tmp_path / "missing")}) is False
    assert sdnotify.watchdog(env={"NOTIFY_SOCKET": "vsock:2:1234"}) is False
    assert sdnotify.status("x", env={"NOTIFY_SOCKET": "/" + "x" * 200}) is False  # longer than sun_path


# -- watchdog ----------------------------------------------------------------------------------------


def test_watchdog_interval() -> None:
    pid = str(os.getpid())
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": pid}) == 0.2
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getppid())}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "nope"}) is None
    for bad in ("", "0", "-5", "abc"):
        assert sdnotify.watchdog_interval({"WATCHDOG_USEC": bad}) is None
    assert sdnotify.watchdog_interval({}) is None


def _notify_listener(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.setblocking(False)
    return s


async def _recv(s: socket.socket) -> bytes:
    while True:
        try:
            return s.recv(4096)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(s)


def _drain(s: socket.socket) -> int:
    n = 0
    while True:
        try:
            s.recv(4096)
        except BlockingIOError:
            return n
        n += 1


# The watchdog in virtual time: trio's MockClock (the autojump_clock fixture) jumps to the next
# deadline whenever every task waits, so the shipped WatchdogSec is tested to the exact second, in
# milliseconds, over a real unix datagram socket (send and receive happen in this process).
SHIPPED_WATCHDOG_SEC = int(re.search(r"^WatchdogSec=(\d+)$", SERVICE.read_text(), re.M).group(1))  # type: ignore[union-attr]


async def _pings_until(sock: socket.socket, t0: float, until: float, out: list[tuple[float, bytes]]) -> None:
    """(seconds after ``t0``, datagram) for each datagram on ``sock`` until virtual time ``until``."""
    with trio.move_on_at(until):
        while True:
            data = await _recv(sock)
            out.append((trio.current_time() - t0, data))


def _watchdog_env(path: Path, usec: int, **extra: str) -> dict[str, str]:
    return {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": str(usec), **extra}


async def test_watchdog_pings_at_half_the_shipped_interval(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """WatchdogSec=30 (systemd/derpd.service): WATCHDOG=1 at once, then every 15 s exactly, with the
    status as it is at each ping; none after cancellation, however long we wait."""
    assert SHIPPED_WATCHDOG_SEC == 30
    with _notify_listener(tmp_path / "notify") as sock:
        env = _watchdog_env(tmp_path / "notify", SHIPPED_WATCHDOG_SEC * 1_000_000, WATCHDOG_PID=str(os.getpid()))
        clients = 0

        def status() -> str:
            return f"{clients} clients"

        t0 = trio.current_time()
        got: list[tuple[float, bytes]] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_pings_until, sock, t0, t0 + 100, got)
            nursery.start_soon(lambda: sdnotify.watchdog_loop(status, env=env))
            await trio.sleep(20)
            clients = 7
            await trio.sleep(80)  # t0 + 100: pings at 0, 15, ... 90
            nursery.cancel_scope.cancel()
        assert got == [(0.0, b"WATCHDOG=1\nSTATUS=0 clients"), (15.0, b"WATCHDOG=1\nSTATUS=0 clients")] + [
            (15.0 * k, b"WATCHDOG=1\nSTATUS=7 clients") for k in range(2, 7)
        ]
        await trio.sleep(3600)
        assert _drain(sock) == 0, "watchdog_loop kept pinging after cancellation"


@pytest.mark.parametrize("usec", [200_000, 3_000_000, 90_000_000])
async def test_watchdog_period_follows_watchdog_usec(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, usec: int
) -> None:
    """Without a status: plain WATCHDOG=1, every WATCHDOG_USEC / 2, as many as fit."""
    with _notify_listener(tmp_path / "notify") as sock:
        period = usec / 2_000_000
        t0 = trio.current_time()
        got: list[tuple[float, bytes]] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_pings_until, sock, t0, t0 + 10.5 * period, got)
            nursery.start_soon(lambda: sdnotify.watchdog_loop(env=_watchdog_env(tmp_path / "notify", usec)))
            await trio.sleep(10.5 * period)
            nursery.cancel_scope.cancel()
        assert [data for _, data in got] == [b"WATCHDOG=1"] * 11
        assert [t for t, _ in got] == pytest.approx([k * period for k in range(11)], abs=1e-9)


async def test_watchdog_loop_survives_a_failing_status(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A status function that raises costs the status, not the pings: WATCHDOG=1 every 15 s, and
    one warning, not one per ping."""
    with _notify_listener(tmp_path / "notify") as sock:

        def broken() -> str:
            raise RuntimeError("bug")

        t0 = trio.current_time()
        got: list[tuple[float, bytes]] = []
        env = _watchdog_env(tmp_path / "notify", SHIPPED_WATCHDOG_SEC * 1_000_000)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_pings_until, sock, t0, t0 + 50, got)
            nursery.start_soon(lambda: sdnotify.watchdog_loop(broken, env=env))
            await trio.sleep(50)
            nursery.cancel_scope.cancel()
        assert got == [(15.0 * k, b"WATCHDOG=1") for k in range(4)]
        assert sum("sd_status_failed" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize(
    "watchdog",
    [{"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getppid())}, {}],
    ids=["for-another-pid", "no-watchdog-usec"],
)
async def test_watchdog_loop_off_returns_at_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, watchdog: dict[str, str]
) -> None:
    """Off (meant for another process, or not asked for): returns without waiting, pings never."""
    with _notify_listener(tmp_path / "notify") as sock:
        t0 = trio.current_time()
        await sdnotify.watchdog_loop(env={"NOTIFY_SOCKET": str(tmp_path / "notify"), **watchdog})
        assert trio.current_time() == t0
        await trio.sleep(3600)
        assert _drain(sock) == 0


# -- socket activation: real inherited descriptors ---------------------------------------------------

# Runs in the child after exec: the descriptors sit at 3, 4, ... exactly as systemd leaves them.
CHILD = textwrap.dedent(
    """
    import json, os, socket, sys
    from derpd.ops import sdnotify

    derp_port, http_port = (int(p) if p != "-" else None for p in sys.argv[1:3])
    count = int(os.environ.get("LISTEN_FDS", "0"))
    got = sdnotify.listen_fds()
    report = {
        "pid": os.getpid(),
        "fds": [s.fd for s in got],
        "filenos": [s.sock.fileno() for s in got],
        "names": [s.name for s in got],
        "types": [s.type for s in got],
        "inheritable": [os.get_inheritable(fd) for fd in range(3, 3 + count)],
        "env_left": sorted(k for k in os.environ if k.startswith("LISTEN_")),
    }
    roles = sdnotify.assign_sockets(got, derp_port=derp_port, http_port=http_port)
    report["roles"] = {r: [s.getsockname()[1] for s in getattr(roles, r)] for r in ("derp", "http", "stun")}
    print(json.dumps(report), flush=True)
    for role in ("derp", "http", "stun"):
        for s in getattr(roles, role):
            s.settimeout(10)
            if s.type == socket.SOCK_STREAM:
                conn, _ = s.accept()
                with conn:
                    conn.sendall(role.encode() + b":" + conn.recv(100))
            else:
                data, peer = s.recvfrom(100)
                s.sendto(role.encode() + b":" + data, peer)
    """
)

# Moves the passed descriptors to 3, 4, ... and sets LISTEN_PID to the pid that exec keeps.
TRAMPOLINE = textwrap.dedent(
    """
    import os, sys
    fds = [int(x) for x in sys.argv[1].split(",")]
    for i, fd in enumerate(fds):
        os.dup2(fd, 3 + i)
    for fd in fds:
        os.close(fd)
    os.environ["LISTEN_PID"] = str(os.getppid() if os.environ.pop("WRONG_PID", "") else os.getpid())
    os.execv(sys.executable, [sys.executable, "-c", sys.argv[2], *sys.argv[3:]])
    """
)


def _spawn_activated(
    socks: list[socket.socket],
    fdnames: str | None,
    *,
    derp_port: int | None = None,
    http_port: int | None = None,
    wrong_pid: bool = False,
) -> subprocess.Popen[str]:
    """A child that inherits ``socks`` at fds 3.. the way systemd passes them; ours are closed."""
    high = [fcntl.fcntl(s.fileno(), fcntl.F_DUPFD_CLOEXEC, 10) for s in socks]  # clear of 3, 4, ...
    env = child_env(derpd_settings=True)
    env["PYTHONPATH"] = str(REPO)
    env["LISTEN_FDS"] = str(len(socks))
    if fdnames is not None:
        env["LISTEN_FDNAMES"] = fdnames
    if wrong_pid:
        env["WRONG_PID"] = "1"
    ports = ["-" if p is None else str(p) for p in (derp_port, http_port)]
    try:
        args = [sys.executable, "-c", TRAMPOLINE, ",".join(map(str, high)), CHILD, *ports]
        proc = subprocess.Popen(args, env=env, pass_fds=high, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        for fd in high:
            os.close(fd)
        for s in socks:
            s.close()  # from here on only the child holds the sockets
    return proc


@contextlib.contextmanager
def _child(proc: subprocess.Popen[str]) -> Iterator[subprocess.Popen[str]]:
    """Never leaves the child running; shows its stderr when the test fails on our side."""
    try:
        yield proc
    except BaseException:
        proc.kill()
        print("child stderr:", proc.communicate(timeout=15)[1])
        raise
    finally:
        proc.kill()
        proc.wait()


def _finish(proc: subprocess.Popen[str]) -> dict[str, object]:
    out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    return json.loads(out.splitlines()[0])  # type: ignore[no-any-return]


def _tcp_exchange(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(payload)
        return c.recv(100)


def _udp_exchange(port: int, payload: bytes) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.settimeout(10)
        u.sendto(payload, ("127.0.0.1", port))
        return u.recv(100)


def _tcp_listener() -> socket.socket:
    return socket.create_server(("127.0.0.1", 0), backlog=16)


def _udp_socket() -> socket.socket:
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("127.0.0.1", 0))
    return u


@pytest.mark.parametrize("fdnames", ["derp:stun", None, "derpd.socket:derpd.socket"])
def test_listen_fds_inherited_sockets_serve(fdnames: str | None) -> None:
    tcp, udp = _tcp_listener(), _udp_socket()
    tport, uport = tcp.getsockname()[1], udp.getsockname()[1]
    proc = _spawn_activated([tcp, udp], fdnames)
    with _child(proc):
        assert _tcp_exchange(tport, b"hello") == b"derp:hello"
        assert _udp_exchange(uport, b"ping") == b"stun:ping"
        report = _finish(proc)
    assert report["fds"] == report["filenos"] == [3, 4]
    assert report["names"] == (fdnames.split(":") if fdnames else ["unknown", "unknown"])
    assert report["types"] == [socket.SOCK_STREAM, socket.SOCK_DGRAM]
    assert report["inheritable"] == [False, False], "FD_CLOEXEC must be set on inherited fds"
    assert report["env_left"] == [], "LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES must be unset"
    assert report["roles"] == {"derp": [tport], "http": [], "stun": [uport]}


def test_listen_fds_shipped_socket_unit_layout() -> None:
    """derpd.socket's three sockets all arrive named "derpd.socket": TCP on http-port is port 80's."""
    derp, http, stun = _tcp_listener(), _tcp_listener(), _udp_socket()
    dport, hport, sport = derp.getsockname()[1], http.getsockname()[1], stun.getsockname()[1]
    proc = _spawn_activated([derp, http, stun], ":".join(["derpd.socket"] * 3), derp_port=dport, http_port=hport)
    with _child(proc):
        assert _tcp_exchange(dport, b"a") == b"derp:a"
        assert _tcp_exchange(hport, b"b") == b"http:b"
        assert _udp_exchange(sport, b"c") == b"stun:c"
        report = _finish(proc)
    assert report["fds"] == [3, 4, 5]
    assert report["roles"] == {"derp": [dport], "http": [hport], "stun": [sport]}


def test_listen_fds_for_another_pid_inherits_nothing() -> None:
    proc = _spawn_activated([_tcp_listener(), _udp_socket()], "derp:stun", wrong_pid=True)
    with _child(proc):
        report = _finish(proc)
    assert report["fds"] == []
    assert report["inheritable"] == [True, True], "descriptors meant for another process are left alone"
    assert report["env_left"] == []
    assert report["roles"] == {"derp": [], "http": [], "stun": []}


def test_listen_fds_environment_rules() -> None:
    other = str(os.getppid())
    env = {"LISTEN_PID": other, "LISTEN_FDS": "2", "LISTEN_FDNAMES": "derp:stun"}
    assert sdnotify.listen_fds(env) == []
    assert env == {}
    env = {"LISTEN_PID": other, "LISTEN_FDS": "2"}
    assert sdnotify.listen_fds(env, unset=False) == []
    assert env == {"LISTEN_PID": other, "LISTEN_FDS": "2"}
    assert sdnotify.listen_fds({}) == []
    assert sdnotify.listen_fds({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}) == []
    # Malformed variables are refused before any descriptor is touched.
    me = str(os.getpid())
    for bad in (
        {"LISTEN_PID": me, "LISTEN_FDS": "two"},
        {"LISTEN_PID": "x", "LISTEN_FDS": "1"},
        {"LISTEN_PID": me, "LISTEN_FDS": "-1"},
        {"LISTEN_PID": me, "LISTEN_FDS": "2", "LISTEN_FDNAMES": "derp"},
    ):
        with pytest.raises(sdnotify.ListenFdsError):
            sdnotify.listen_fds(bad)
        assert bad == {}, "variables are unset even when refused"


def _inherited(s: socket.socket, name: str) -> InheritedSocket:
    return InheritedSocket(s.fileno(), name, s)


def test_assign_sockets_rules() -> None:
    a, b, u = _tcp_listener(), _tcp_listener(), _udp_socket()
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b, u, unix:
        pa, pb = a.getsockname()[1], b.getsockname()[1]
        unnamed = [_inherited(a, "derpd.socket"), _inherited(b, "derpd.socket"), _inherited(u, "derpd.socket")]
        roles = sdnotify.assign_sockets(unnamed, derp_port=pa, http_port=pb)
        assert (roles.derp, roles.http, roles.stun) == ([a], [b], [u])
        roles = sdnotify.assign_sockets(unnamed)  # no ports to tell them apart: all TCP is DERP
        assert (roles.derp, roles.http, roles.stun) == ([a, b], [], [u])
        with pytest.raises(sdnotify.ListenFdsError, match=f"port {pb}.*neither"):
            sdnotify.assign_sockets(unnamed, derp_port=pa)  # port 80 socket but http-port off
        # Chosen names win over ports; unknown names are the caller's.
        named = [_inherited(a, "http"), _inherited(b, "derp"), _inherited(u, "stun"), _inherited(unix, "metrics")]
        roles = sdnotify.assign_sockets(named, derp_port=pa, http_port=pb)
        assert (roles.derp, roles.http, roles.stun) == ([b], [a], [u])
        assert [s.sock for s in roles.other["metrics"]] == [unix]
        assert roles and not sdnotify.assign_sockets([])
        with pytest.raises(sdnotify.ListenFdsError, match="named stun must be UDP"):
            sdnotify.assign_sockets([_inherited(a, "stun")])
        with pytest.raises(sdnotify.ListenFdsError, match="named derp must be TCP"):
            sdnotify.assign_sockets([_inherited(u, "derp")])
        with pytest.raises(sdnotify.ListenFdsError, match="IPv4/IPv6 only"):
            sdnotify.assign_sockets([_inherited(unix, "unknown")])


# -- the shipped units ------------------------------------------------------------------------------


def _directives(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) in file order; repeated keys (ListenStream=) all kept."""
    section, out = "", []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def test_service_unit_directives() -> None:
    found = _directives(SERVICE)
    values = {(s, k): v for s, k, v in found}
    required = {
        "Type": "notify",
        "NotifyAccess": "main",
        "ExecStart": f"{SHIPPED_EXEC} serve --config /etc/derpd/derpd.toml",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "Restart": "always",
        "WatchdogSec": "30",
        "DynamicUser": "yes",
        "StateDirectory": "derpd",
        "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "SystemCallFilter": "@system-service",
        "LimitNOFILE": "1048576",
    }
    for key, want in required.items():
        assert values.get(("Service", key)) == want, key
    assert 5 < int(values[("Service", "TimeoutStopSec")]) <= 30, "a bit above derpd's ~5 s graceful shutdown"
    assert values[("Install", "WantedBy")] == "multi-user.target"
    assert len(found) == len(values), "no directive repeated in the service"


def test_socket_unit_directives() -> None:
    found = _directives(SOCKET)
    listens = [(k, v) for s, k, v in found if s == "Socket" and k.startswith("Listen")]
    # The order is the fd order; sdnotify.assign_sockets relies on type and port, not order.
    assert listens == [("ListenStream", "443"), ("ListenStream", "80"), ("ListenDatagram", "3478")]
    values = {(s, k): v for s, k, v in found}
    assert values[("Socket", "Service")] == "derpd.service"
    assert values[("Socket", "ReusePort")] == "no"
    assert values[("Socket", "BindIPv6Only")] == "both"
    assert int(values[("Socket", "Backlog")]) >= 1024
    assert ("Socket", "Accept") not in values or values[("Socket", "Accept")] == "no"
    # One FileDescriptorName= would name all three sockets alike; derpd goes by type and port.
    assert ("Socket", "FileDescriptorName") not in values
    assert values[("Install", "WantedBy")] == "sockets.target"


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` on the shipped units. verify insists that ExecStart's binary exists,
    so the service is checked as a copy whose only change is that path (pointing at this venv's
    derpd); the socket unit is checked verbatim, next to it so Service=derpd.service resolves."""
    analyze = shutil.which("systemd-analyze") or (
        "/usr/bin/systemd-analyze" if Path("/usr/bin/systemd-analyze").exists() else None
    )
    if analyze is None:
        pytest.fail("systemd-analyze not found: apt-get install systemd")
    real_exec = Path(sys.executable).with_name("derpd")
    if not os.access(real_exec, os.X_OK):
        real_exec = Path(sys.executable)
    shipped = SERVICE.read_text()
    assert shipped.count(SHIPPED_EXEC) == 1 and f"ExecStart={SHIPPED_EXEC} " in shipped
    copy = shipped.replace(f"ExecStart={SHIPPED_EXEC} ", f"ExecStart={real_exec} ")
    diff = [(x, y) for x, y in zip(shipped.splitlines(), copy.splitlines(), strict=True) if x != y]
    assert len(diff) == 1 and diff[0][0].startswith("ExecStart=")
    (tmp_path / "derpd.service").write_text(copy)
    shutil.copyfile(SOCKET, tmp_path / "derpd.socket")
    proc = subprocess.run(
        [analyze, "verify", "--man=no", str(tmp_path / "derpd.service"), str(tmp_path / "derpd.socket")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    # verify only warns (exit 0) about unknown keys or bad values: any line about our units fails.
    ours = [line for line in output.splitlines() if "derpd." in line]
    assert ours == [], output
