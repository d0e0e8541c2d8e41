"""The standing hostile-input suite: a real ``derpd serve`` process attacked over loopback.

Each module is one class of attack (``test_*.py``); every test ends with ``assert_healthy``:

* the process is alive and a fresh pair of clients logs in and relays a packet both ways;
* its log (stderr, at debug level so that every line the attack provoked is checked) has, since
  the test began, no ``level=error`` line, no ``Traceback`` and no ``exc=``; every line is at most
  ``MAX_LOG_LINE`` bytes of valid UTF-8 with no raw control or line-separator character in it
  (client strings must appear escaped);
* ``/proc/<pid>/fd`` is back to the count taken after start (within ``FD_TOLERANCE``), polled
  for a bounded time;
* VmRSS and the peak VmHWM stay under the start baseline plus ``RSS_MARGIN_KB``.

The main server is session-scoped (attacks are sequential and each cleans up after itself); a test
that leaves it dead or leaking gets it restarted for the next test, so one failure does not cascade.
Run the suite alone with ``.venv/bin/pytest tests/hostile -q`` or ``-m hostile``.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

from derpd.net.client import DerpClient
from derpd.proto.frames import FRAME_HEADER_LEN, ClientInfo, FrameType, client_info_frame, encode_frame
from derpd.proto.keys import KEY_LEN, NodePrivate

from ..conftest import child_env

PYTHON = [sys.executable]
DERPD_CMD = [*PYTHON, "-m", "derpd"]
START_TIMEOUT = 30.0
FD_TOLERANCE = 2
# Nothing an attack sends is ever held whole beyond 1 MiB (frame cap) or 256 KiB (ClientInfo);
# 300 slow connections and 50 concurrent logins cost a few MB of Python objects: the whole suite
# peaks about 10 MB over the start size (~46 MB). A server that buffered an attacker's megabytes
# (a 4 MiB unknown frame, a 1 MB request line, 40 MB offered to a stuck reader) would not stay
# within 32 MB of its start, peak (VmHWM) included.
RSS_MARGIN_KB = 32 * 1024
MAX_LOG_LINE = 2048  # bytes; the logger clips any value to 1 KiB and client text to 64 chars
LOG_PROBLEMS = re.compile(r"level=(?:error|critical)\b|Traceback|\bexc=")
# Characters that must never appear raw in a log line: C0 (tab included: text.escape writes \t),
# DEL, C1, line/paragraph separators, bidi embeddings/overrides/isolates and the BOM.
RAW_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ufeff]")

UPGRADE_REQUEST = b"GET /derp HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: DERP\r\n\r\n"
SERVER_KEY_FRAME_LEN = FRAME_HEADER_LEN + 8 + KEY_LEN

T = TypeVar("T")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "hostile: attacks on a real derpd process (run alone: pytest tests/hostile or -m hostile)"
    )


# --- the server process -------------------------------------------------------------------------


class Derpd:
    """One ``derpd serve`` subprocess on 127.0.0.1 (ephemeral DERP and STUN ports), stderr to a file."""

    def __init__(
        self,
        workdir: Path,
        *,
        name: str = "derpd",
        tls: bool = False,
        log_level: str = "debug",
        args: Sequence[str] = (),
    ) -> None:
        self.workdir = workdir
        self.name = name
        self.tls = tls
        self.log_level = log_level
        self.args = list(args)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"{name}.log"
        self.starts = 0
        self.port = 0
        self.stun_port = 0
        self.public_key = b""
        self.pin: str | None = None
        self.baseline_fds = 0
        self.baseline_rss_kb = 0
        self.mark = 0  # log offset where the current test began
        self.restarts: list[str] = []  # why the fixture had to restart it

    # lifecycle

    def command(self) -> list[str]:
        cmd = [*DERPD_CMD, "serve", "--addr", "127.0.0.1:0", "--stun-port", "0"]
        cmd += ["--key-file", str(self.workdir / "derper.key"), "--metrics-addr", "-1"]
        cmd += ["--log-level", self.log_level, "--shutdown-timeout", "1s", *self.args]
        if self.tls:
            cmd += ["--certmode", "manual", "--certdir", str(self.workdir / "certs"), "--hostname", "127.0.0.1"]
            cmd += ["--http-port", "-1"]
        return cmd

    def start(self) -> None:
        self.starts += 1
        self.log_path = self.workdir / f"{self.name}-{self.starts}.log"
        env = child_env()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                cwd=self.workdir,
                env=env,
                start_new_session=True,
            )
        try:
            self._await_serving()
        except BaseException:
            self.proc.kill()  # never leave a half-started server behind
            self.proc.wait(10)
            raise

    def _await_serving(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while b"event=serving" not in self.log():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start:\n{self.tail()}")
            time.sleep(0.02)
        text = self.log().decode("utf-8", "replace")
        serving = next(line for line in text.splitlines() if "event=serving" in line)
        derp = re.search(r"\bderp=127\.0\.0\.1:(\d+)", serving)
        stun = re.search(r"\bstun=127\.0\.0\.1:(\d+)", serving)
        key = re.search(r"\bpublic_key=nodekey:([0-9a-f]{64})", serving)
        assert derp and stun and key, serving
        self.port, self.stun_port = int(derp.group(1)), int(stun.group(1))
        self.public_key = bytes.fromhex(key.group(1))
        if self.tls:
            pin = re.search(r"\bcert_name=(sha256-raw:[0-9a-f]{64})", text)
            assert pin, text
            self.pin = pin.group(1)
        _run_in_thread(relay_pair, self)  # warm up every code path a login touches, then take the baselines
        time.sleep(0.2)
        self.baseline_fds = self.fds()
        self.baseline_rss_kb = self.memory_kb()[0]
        self.mark = len(self.log())

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def restart(self, why: str) -> None:
        self.restarts.append(why)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.start()

    def prepare(self) -> None:
        """Before a test: a live server at its fd baseline (restarted otherwise), log mark set."""
        if not self.alive():
            self.restart(f"exited with status {self.proc.returncode if self.proc else None}")
        else:
            deadline = time.monotonic() + 3.0
            while self.fds() > self.baseline_fds + FD_TOLERANCE and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.fds() > self.baseline_fds + FD_TOLERANCE:
                self.restart(f"{self.fds()} fds open, baseline {self.baseline_fds}")
        self.mark = len(self.log())

    # observation

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/derp"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def memory_kb(self) -> tuple[int, int]:
        """(VmRSS, VmHWM) in kB."""
        fields = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in ("VmRSS", "VmHWM"):
                    fields[name] = int(value.split()[0])
        return fields["VmRSS"], fields["VmHWM"]

    def log(self) -> bytes:
        return self.log_path.read_bytes()

    def log_since(self, offset: int | None = None) -> bytes:
        with open(self.log_path, "rb") as f:
            f.seek(self.mark if offset is None else offset)
            return f.read()

    def tail(self, n: int = 30) -> str:
        try:
            lines = self.log().decode("utf-8", "replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:])

    def lines_for(self, local_port: int, since: int | None = None) -> list[str]:
        """Log lines about the connection from our 127.0.0.1:``local_port``: its own lines
        (`` remote=``) and any sampled summary that names it last (`` last_remote=``)."""
        rx = re.compile(rf"\b(?:last_)?remote=127\.0\.0\.1:{local_port}(?!\d)")
        text = self.log_since(since).decode("utf-8", "replace")
        # "\n" is the logger's only line end; splitlines() would also cut at a raw \r, \x1c or \u2028.
        return [line for line in text.split("\n") if rx.search(line)]

    async def connect(self, **kw: Any) -> DerpClient:
        if self.tls:
            kw.setdefault("cert_name", self.pin)
        return await DerpClient.connect(self.url, **kw)


def own_lines(lines: list[str]) -> list[str]:
    """Of ``lines_for``'s lines, the connection's own (not a sampled summary naming it last)."""
    return [line for line in lines if " last_remote=" not in line]


def event_of(line: str) -> str:
    m = re.search(r"\bevent=(\S+)", line)
    return m.group(1) if m else ""


def level_of(line: str) -> str:
    m = re.search(r"\blevel=(\S+)", line)
    return m.group(1) if m else ""


def _run_in_thread(fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
    """``trio.run`` in a thread of its own: works whether or not the caller is inside a trio run."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            trio.run(fn, *args)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if errors:
        raise errors[0]


def _session_server(tmp_path_factory: pytest.TempPathFactory, name: str, **kw: Any) -> Iterator[Derpd]:
    d = Derpd(tmp_path_factory.mktemp(name), name=name, **kw)
    try:
        d.start()
        yield d
    finally:
        if d.alive():
            rss, hwm = d.memory_kb()
            print(f"\n{name}: VmRSS {rss} kB, peak VmHWM {hwm} kB, start {d.baseline_rss_kb} kB", file=sys.stderr)
        d.stop()
        if d.restarts:
            print(f"\n{name} was restarted during the hostile suite: {d.restarts}", file=sys.stderr)


@pytest.fixture(scope="session")
def derpd_main(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Derpd]:
    """The shared plain-HTTP server: debug log, STUN on, a 1 s write timeout (slow receivers)."""
    yield from _session_server(tmp_path_factory, "derpd-main", args=["--tcp-write-timeout", "1s"])


@pytest.fixture
def server(derpd_main: Derpd) -> Derpd:
    derpd_main.prepare()
    return derpd_main


@pytest.fixture(scope="session")
def derpd_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Derpd]:
    """A TLS server (self-signed certificate for 127.0.0.1, clients pin it), started when first needed."""
    yield from _session_server(tmp_path_factory, "derpd-tls", tls=True)


@pytest.fixture
def tls_server(derpd_tls: Derpd) -> Derpd:
    derpd_tls.prepare()
    return derpd_tls


# --- health -------------------------------------------------------------------------------------


async def relay_pair(server: Derpd, timeout: float = 10.0) -> None:
    """A fresh pair logs in and relays one packet each way."""
    with trio.fail_after(timeout):
        a = await server.connect()
        try:
            b = await server.connect()
            try:
                token = os.urandom(24)
                await a.send(b.public_key, token)
                got = await b.recv_packet()
                assert (got.src, got.data) == (a.public_key, token)
                await b.send(a.public_key, token[::-1])
                got = await a.recv_packet()
                assert (got.src, got.data) == (b.public_key, token[::-1])
            finally:
                await b.aclose()
        finally:
            await a.aclose()


def log_problems(data: bytes) -> list[str]:
    """What is wrong with these log bytes (empty when nothing is)."""
    problems: list[str] = []
    for n, raw in enumerate(data.split(b"\n")):
        if not raw:
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            problems.append(f"line {n}: not UTF-8 ({e}): {raw[:300]!r}")
            continue
        if len(raw) > MAX_LOG_LINE:
            problems.append(f"line {n}: {len(raw)} bytes (max {MAX_LOG_LINE}): {line[:300]!r}…")
        if LOG_PROBLEMS.search(line):
            problems.append(f"line {n}: {line[:1500]!r}")
        if m := RAW_CONTROL.search(line):
            problems.append(f"line {n}: raw {m.group()!r} at {m.start()}: {line[:300]!r}")
    return problems


async def wait_fds(server: Derpd, timeout: float = 10.0) -> None:
    with trio.move_on_after(timeout):
        while server.fds() > server.baseline_fds + FD_TOLERANCE:
            await trio.sleep(0.05)
    fds = server.fds()
    assert fds <= server.baseline_fds + FD_TOLERANCE, (
        f"{fds} fds open after {timeout:g}s, baseline {server.baseline_fds}: {sorted(_fd_kinds(server))}"
    )


def _fd_kinds(server: Derpd) -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{server.pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{server.pid}/fd/{fd}").split(":")[0])
        except OSError:
            pass
    return out


def check_memory(server: Derpd, margin_kb: int = RSS_MARGIN_KB) -> None:
    rss, hwm = server.memory_kb()
    bound = server.baseline_rss_kb + margin_kb
    assert rss <= bound and hwm <= bound, (
        f"VmRSS {rss} kB / peak VmHWM {hwm} kB over {bound} kB (start {server.baseline_rss_kb} kB + {margin_kb} kB)"
    )


def check_log(server: Derpd, since: int | None = None) -> None:
    problems = log_problems(server.log_since(since))
    assert not problems, "log problems since the test began:\n" + "\n".join(problems[:20])


async def assert_healthy(server: Derpd, *, settle: float = 10.0) -> None:
    """Alive, relays for a fresh pair, clean log, fds back to the baseline, memory bounded."""
    assert server.alive(), f"{server.name} exited with {server.proc.returncode if server.proc else None}:\n" + (
        server.tail()
    )
    await relay_pair(server)
    await wait_fds(server, settle)
    check_memory(server)
    check_log(server)


async def wait_for_log(server: Derpd, pattern: str, timeout: float = 10.0, since: int | None = None) -> str:
    """The first log line since the test began matching ``pattern`` (regex), waiting for it."""
    rx = re.compile(pattern)
    with trio.move_on_after(timeout):
        while True:
            for line in server.log_since(since).decode("utf-8", "replace").split("\n"):
                if rx.search(line):
                    return line
            await trio.sleep(0.05)
    raise AssertionError(f"no log line matching {pattern!r} within {timeout:g}s:\n{server.tail()}")


# --- raw connections ----------------------------------------------------------------------------


async def open_tcp(server: Derpd) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", server.port)


def local_port(stream: trio.SocketStream) -> int:
    return int(stream.socket.getsockname()[1])


def abort_on_close(stream: trio.SocketStream) -> None:
    """Make the coming close a TCP RST instead of a FIN."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")


async def send_quietly(stream: trio.SocketStream, data: bytes) -> bool:
    """Send; False when the server already closed (which is often the right answer)."""
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return False
    return True


async def read_to_eof(stream: trio.SocketStream, timeout: float = 5.0, limit: int = 1 << 20) -> tuple[bytes, bool]:
    """What the server sends until it closes: (bytes, closed). ``closed`` is False when it kept
    the connection open for ``timeout`` seconds; a reset counts as closed."""
    data = b""
    with trio.move_on_after(timeout):
        try:
            while len(data) < limit:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return data, True
                data += chunk
        except trio.BrokenResourceError:
            return data, True
    return data, False


async def read_until(
    stream: trio.SocketStream, buf: bytes, need: Callable[[bytes], bool], timeout: float = 5.0
) -> bytes:
    with trio.fail_after(timeout):
        while not need(buf):
            chunk = await stream.receive_some(65536)
            if not chunk:
                raise EOFError(f"server closed after {len(buf)} bytes: {buf[:200]!r}")
            buf += chunk
    return buf


async def upgrade(server: Derpd, request: bytes = UPGRADE_REQUEST) -> tuple[trio.SocketStream, bytes]:
    """A plain connection through the 101: (stream, bytes after the response head)."""
    stream = await open_tcp(server)
    try:
        await stream.send_all(request)
        buf = await read_until(stream, b"", lambda b: b"\r\n\r\n" in b)
        head, _, rest = buf.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 "), head
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream, rest


async def upgrade_to_client_info(server: Derpd) -> tuple[trio.SocketStream, bytes]:
    """Through the 101 and the ServerKey frame: the server now waits for ClientInfo."""
    stream, rest = await upgrade(server)
    try:
        rest = await read_until(stream, rest, lambda b: len(b) >= SERVER_KEY_FRAME_LEN)
        assert rest[0] == FrameType.SERVER_KEY and rest[13:SERVER_KEY_FRAME_LEN] == server.public_key
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream, rest[SERVER_KEY_FRAME_LEN:]


def sealed_client_info(key: NodePrivate, server_public: bytes, plaintext: bytes) -> bytes:
    """A ClientInfo frame around any plaintext, sealed correctly (anyone can make one)."""
    return encode_frame(FrameType.CLIENT_INFO, key.public + key.seal_to(server_public, plaintext))


def valid_client_info(key: NodePrivate, server_public: bytes) -> bytes:
    return client_info_frame(key, server_public, ClientInfo(version=2, can_ack_pings=True))


async def run_bounded(jobs: Sequence[Callable[[], Awaitable[T]]], limit: int = 50, timeout: float = 60.0) -> list[T]:
    """Run every job, at most ``limit`` at a time, all within ``timeout``; results in order."""
    results: list[Any] = [None] * len(jobs)
    sem = trio.Semaphore(limit)

    async def one(i: int) -> None:
        try:
            results[i] = await jobs[i]()
        finally:
            sem.release()

    with trio.fail_after(timeout):
        async with trio.open_nursery() as nursery:
            for i in range(len(jobs)):
                await sem.acquire()
                nursery.start_soon(one, i)
    return results
