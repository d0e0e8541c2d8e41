"""``--workers N``: one derpd process per core, behind the same ports, meshed with each other.

One Python process relays on one core. The supervisor binds the DERP, port-80 and STUN
sockets once (or takes them from systemd) and starts N workers that all accept on them;
each worker also listens on a private unix socket and links to every sibling with
DERP's own mesh protocol (WatchConns/PeerPresent/ForwardPacket), so a client reaches any
other client whichever worker the kernel gave it. A worker that dies is started again;
the others keep serving.

STUN: when the supervisor binds the STUN port itself, it binds one socket per worker per
address, all in one SO_REUSEPORT group (Linux), and gives worker i only its own: the kernel
spreads peers over the workers by address hash, and a datagram wakes one worker. One socket
shared by every worker (what systemd-activated STUN sockets are, and the fallback where
SO_REUSEPORT is refused) wakes every idle worker for each datagram, and measured a third more
CPU per answer (``bench/results/stun-issue11.txt``). The supervisor holds every socket, so the
port stays bound while a worker restarts; the requests that reach a restarting worker's socket
wait there (up to its receive buffer) until it is back.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from derpd.base import log
from derpd.base.errors import ConfigurationError
from derpd.net.addr import bind_sockets, format_addr
from derpd.proto.keys import NodePrivate, parse_mesh_key
from derpd.server.mesh import MeshTarget
from derpd.server.node import ServerSettings

if TYPE_CHECKING:
    from derpd.ops.acme import CertManager  # imported only with --certmode letsencrypt (derpd.config)

WORKER_ENV = "DERPD_WORKER"  # "i/N" inside a worker
DIR_ENV = "DERPD_WORKER_DIR"
FDS_ENV = "DERPD_WORKER_FDS"
NAMES_ENV = "DERPD_WORKER_FDNAMES"
READY_LINE = b"derpd-worker-ready\n"
RESTART_DELAY = 1.0
STOP_MARGIN = 3.0  # seconds beyond --shutdown-timeout for workers to exit before they are killed


class WorkerError(ConfigurationError, ValueError):
    """--workers cannot be used as given (or a worker could not be started)."""


def worker_count(text: str) -> int:
    """``auto`` = one per core; else a positive integer."""
    if text.strip().lower() == "auto":
        return max(1, os.cpu_count() or 1)
    try:
        n = int(text)
    except ValueError:
        raise WorkerError(f"--workers must be a number or 'auto', not {text!r}") from None
    if not 1 <= n <= 256:
        raise WorkerError("--workers must be between 1 and 256")
    return n


def worker_identity() -> tuple[int, int] | None:
    """(index, count) when this process is a worker started by the supervisor."""
    value = os.environ.get(WORKER_ENV)
    if not value:
        return None
    index, _, count = value.partition("/")
    return int(index), int(count)


def socket_path(workdir: str, index: int) -> str:
    return str(Path(workdir) / f"worker-{index}.sock")


def configure_worker(settings: ServerSettings, index: int, count: int) -> None:
    """A worker's part of the node: its unix socket, its siblings, the internal mesh key
    (one line on stdin from the supervisor, so it never shows in an environment)."""
    workdir = os.environ[DIR_ENV]
    key_hex = sys.stdin.readline().strip()
    # Not the region's key (that stays --mesh-psk-file's): a sibling is told apart from another
    # node by the key it presents, and another node's watcher must also hear of siblings' keys.
    settings.internal_mesh_key = parse_mesh_key(key_hex)
    settings.internal_socket = socket_path(workdir, index)
    settings.internal_client_key = NodePrivate.generate()
    settings.internal_peers = [
        MeshTarget(f"worker-{j}", f"http://worker-{j}/derp", socket_path(workdir, j))
        for j in range(count)
        if j != index
    ]
    log.set_context(worker=index)


def adopt_inherited_sockets() -> None:
    """In a worker a supervisor started: put the inherited sockets where LISTEN_FDS says, as systemd
    would have (``derpd/__main__.py`` calls this first; a no-op in any other process)."""
    if FDS_ENV not in os.environ:
        return
    fds = [int(x) for x in os.environ.pop(FDS_ENV, "").split(",") if x]
    for i, fd in enumerate(fds):
        os.dup2(fd, 3 + i)
    for fd in fds:
        if fd >= 3 + len(fds):
            os.close(fd)
    if fds:
        os.environ["LISTEN_FDS"] = str(len(fds))
        os.environ["LISTEN_FDNAMES"] = os.environ.pop(NAMES_ENV, "")
        os.environ["LISTEN_PID"] = str(os.getpid())


def reuse_port_group(first: list[socket.socket], count: int) -> dict[int, list[socket.socket]]:
    """One UDP socket per worker per address of ``first`` (worker 0's), in SO_REUSEPORT groups.

    ``first`` is already bound (``bind_sockets`` resolved the host and picked the port); Linux
    lets it join a group after the fact, and each sibling binds the same address with the
    option set. Where SO_REUSEPORT is missing or refused, nothing changes and {} is returned:
    the workers then share ``first``, which works everywhere.
    """
    reuse_port = getattr(socket, "SO_REUSEPORT", None)
    if reuse_port is None or sys.platform != "linux":
        return {}
    groups: dict[int, list[socket.socket]] = {0: list(first)}
    try:
        for s in first:
            s.setsockopt(socket.SOL_SOCKET, reuse_port, 1)
        for index in range(1, count):
            groups[index] = []
            for s in first:
                sibling = socket.socket(s.family, socket.SOCK_DGRAM)
                groups[index].append(sibling)
                if s.family == socket.AF_INET6:
                    v6only = s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
                    sibling.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
                sibling.setsockopt(socket.SOL_SOCKET, reuse_port, 1)
                sibling.bind(s.getsockname())
    except OSError as exc:
        for index, group in groups.items():
            for s in group if index else ():
                s.close()
        for s in first:
            try:
                s.setsockopt(socket.SOL_SOCKET, reuse_port, 0)
            except OSError:
                pass
        log.info("stun_reuse_port_unavailable", error=str(exc), action="workers share the STUN socket")
        return {}
    return groups


class Supervisor:
    """Binds once, starts N workers, restarts the ones that die, passes signals on."""

    def __init__(
        self, count: int, settings: ServerSettings, argv: list[str], *, acme: CertManager | None = None
    ) -> None:
        self.count = count
        self.acme = acme  # --certmode letsencrypt: the one ACME client; workers follow its files
        self.settings = settings
        self.argv = argv
        self.internal_key = os.urandom(32)  # the workers' own mesh key, new each start
        self.sockets: list[tuple[str, socket.socket]] = []
        # Worker i's own STUN sockets (SO_REUSEPORT siblings of the "stun" ones in self.sockets,
        # which are worker 0's); empty: every worker shares the "stun" ones.
        self.stun_by_worker: dict[int, list[socket.socket]] = {}
        self.procs: dict[int, trio.Process] = {}
        self.ready: set[int] = set()
        self.ready_event = trio.Event()
        self.all_exited = trio.Event()  # set once stopping and no worker process is left
        self.stopping = False
        self.restarts = 0
        self.workdir = ""

    async def bind(self) -> None:
        st = self.settings
        host, port = st.addr
        activated = st.activated
        if activated and activated.derp:
            self.sockets += [("derp", s) for s in activated.derp]
        else:
            for s in await bind_sockets(host, port, socket.SOCK_STREAM):
                s.listen(4096)
                self.sockets.append(("derp", s))
        if activated and activated.http:
            self.sockets += [("http", s) for s in activated.http]
        elif st.http_port >= 0:
            for s in await bind_sockets(host, st.http_port, socket.SOCK_STREAM):
                s.listen(1024)
                self.sockets.append(("http", s))
        if activated and activated.stun:
            self.sockets += [("stun", s) for s in activated.stun]
        elif st.stun_port >= 0:
            stun_host = host if st.stun_host is None else st.stun_host
            stun = await bind_sockets(stun_host, st.stun_port, socket.SOCK_DGRAM, dual_stack_any=True)
            self.sockets += [("stun", s) for s in stun]
            if self.count > 1:
                self.stun_by_worker = reuse_port_group(stun, self.count)

    def worker_sockets(self, index: int) -> list[tuple[str, socket.socket]]:
        """What worker ``index`` inherits: every socket, but only its own STUN ones if it has them."""
        own = self.stun_by_worker.get(index)
        if own is None:
            return list(self.sockets)
        return [(name, s) for name, s in self.sockets if name != "stun"] + [("stun", s) for s in own]

    async def run(self, *, task_status: trio.TaskStatus[Supervisor] = trio.TASK_STATUS_IGNORED) -> None:
        await self.bind()
        self.workdir = tempfile.mkdtemp(prefix="derpd-workers-", dir=os.environ.get("RUNTIME_DIRECTORY") or None)
        os.chmod(self.workdir, 0o700)
        try:
            async with trio.open_nursery() as nursery:
                for i in range(self.count):
                    nursery.start_soon(self._keep_worker, i)
                await self.ready_event.wait()
                log.info(
                    "workers_ready",
                    workers=self.count,
                    derp=self.addresses("derp"),
                    stun=self.addresses("stun") or "off",
                )
                task_status.started(self)
        finally:
            for _, s in self.sockets:
                s.close()
            for index, group in self.stun_by_worker.items():
                for s in group if index else ():  # worker 0's are the "stun" ones, closed above
                    s.close()
            shutil.rmtree(self.workdir, ignore_errors=True)

    def addresses(self, role: str) -> str:
        return ",".join(format_addr(s.getsockname()[:2]) for name, s in self.sockets if name == role)

    async def _keep_worker(self, index: int) -> None:
        while not self.stopping:
            code = await self._run_worker(index)
            started = index in self.ready
            self.ready.discard(index)
            if self.stopping:
                return
            if not started and not self.ready_event.is_set():
                # It never came up the first time: a restart loop would only hide the reason
                # (already in the worker's log) and keep systemd waiting for READY.
                raise WorkerError(f"worker {index} exited with code {code} before it was ready")
            self.restarts += 1
            log.warning("worker_exited", worker=index, code=code, action=f"restarting in {RESTART_DELAY:g}s")
            await trio.sleep(RESTART_DELAY)

    async def _run_worker(self, index: int) -> int | None:
        sockets = self.worker_sockets(index)
        high = [fcntl.fcntl(s.fileno(), fcntl.F_DUPFD_CLOEXEC, 10) for _, s in sockets]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_SOCKET", "WATCHDOG_"))}
        env.update(
            {
                WORKER_ENV: f"{index}/{self.count}",
                DIR_ENV: self.workdir,
                FDS_ENV: ",".join(map(str, high)),
                NAMES_ENV: ":".join(name for name, _ in sockets),
            }
        )
        try:
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "derpd", *self.argv],
                env=env,
                pass_fds=high,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
        finally:
            for fd in high:
                os.close(fd)
        self.procs[index] = proc
        assert proc.stdin is not None and proc.stdout is not None
        try:
            try:
                await proc.stdin.send_all(self.internal_key.hex().encode() + b"\n")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # it died at once; its exit code says the rest
            await proc.stdin.aclose()
            buf = b""
            while READY_LINE not in buf:
                chunk = await proc.stdout.receive_some(1024)
                if not chunk:
                    break
                buf += chunk
            if READY_LINE in buf:
                self.ready.add(index)
                log.info("worker_started", worker=index, pid=proc.pid)
                if len(self.ready) == self.count:
                    self.ready_event.set()
            return await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                with trio.CancelScope(shield=True):
                    await proc.wait()
            self.procs.pop(index, None)
            if self.stopping and not self.procs:
                self.all_exited.set()

    def signal_all(self, signum: int) -> None:
        for proc in list(self.procs.values()):
            if proc.returncode is None:
                proc.send_signal(signum)

    # --- the runtime's Service (derpd.ops.runtime.run) --------------------------------------------

    async def start(self, nursery: trio.Nursery) -> None:
        await nursery.start(self.run)
        if self.acme is not None:
            nursery.start_soon(self.acme.run)  # the workers listen: the CA's validation reaches them

    async def until_ready(self) -> None:
        if self.acme is not None:
            await self.acme.ready.wait()  # and the workers pick the certificate up within seconds
        await trio.lowlevel.checkpoint()  # start() returned once every worker said it is ready

    def waiting_status(self) -> str:
        return self.acme.status() if self.acme is not None else "starting workers"

    def status(self) -> str:
        return f"{len(self.ready)}/{self.count} workers up"

    def reload(self) -> None:
        self.signal_all(signal.SIGHUP)  # each worker reloads itself

    async def stop(self) -> None:
        """Pass SIGTERM on (each worker says goodbye to its clients), wait for them, then kill."""
        self.stopping = True
        self.signal_all(signal.SIGTERM)
        with trio.move_on_after(self.settings.shutdown_timeout + STOP_MARGIN):
            if self.procs:
                await self.all_exited.wait()
        self.signal_all(signal.SIGKILL)

    def stop_fields(self) -> dict[str, Any]:
        return {"workers": self.count}
