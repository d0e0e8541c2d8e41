"""A ``derpd serve --certmode letsencrypt`` subprocess for the ACME end-to-end tests, and what the tests
observe of it: its key=value log (stderr, to a file), its /metrics, TLS handshakes on its port, systemd
notifications, DERP clients."""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from derpd.net.client import DerpClient
from derpd.net.httpclient import start_tls

from ..conftest import child_env
from .pebble import stop_process, tail

DERPD_CMD = [sys.executable, "-m", "derpd"]
REPO = Path(__file__).resolve().parents[2]
LINE_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def parse_line(line: str) -> dict[str, str]:
    """One ``key=value`` log line as a dict (quoted values unquoted)."""
    out = {}
    for k, raw in LINE_FIELD.findall(line):
        quoted = raw.startswith('"') and raw.endswith('"') and len(raw) >= 2
        out[k] = raw[1:-1].replace('\\"', '"') if quoted else raw
    return out


def parse_time(value: str) -> float:
    """A log field holding a time, as Unix seconds: a number, or RFC 3339 / ISO 8601."""
    try:
        return float(value)
    except ValueError:
        pass
    t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return t.timestamp()


def parse_seconds(value: str) -> float:
    """A duration field: a number of seconds, or a Go-style duration (1m30s, 500ms, 12.5s)."""
    try:
        return float(value)
    except ValueError:
        return _go_duration(value)


def _go_duration(value: str) -> float:
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
    parts = re.findall(r"([\d.]+)(ms|us|µs|ns|h|m|s)", value)
    if not parts or "".join(n + u for n, u in parts) != value:
        raise ValueError(f"not a duration: {value!r}")
    return sum(float(n) * units[u] for n, u in parts)


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = child_env()
    env["PYTHONPATH"] = str(REPO)
    env.update(extra or {})
    return env


class AcmeDerpd:
    """``derpd serve`` with ``--certmode letsencrypt`` on 127.0.0.1: DERP/TLS on ``tls_port``, plain HTTP on
    ``http_port`` (-1: none), metrics on ``metrics_port``; debug log to ``<name>-<start>.log``.

    ``args`` are appended after the standard ones; ``certdir=None`` leaves --certdir out (the default,
    ``certs`` beside the key file); ``acme=False`` leaves out --acme-directory/--acme-ca-file (given
    through the environment or a --config file instead)."""

    def __init__(
        self,
        workdir: Path,
        *,
        tls_port: int,
        http_port: int,
        metrics_port: int,
        directory_url: str,
        ca_file: Path,
        hostname: str = "derp.test",
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        certdir: Path | None = None,
        acme_flags: bool = True,
        name: str = "derpd",
        certmode: str = "letsencrypt",
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.tls_port = tls_port
        self.http_port = http_port
        self.metrics_port = metrics_port
        self.directory_url = directory_url
        self.ca_file = ca_file
        self.hostname = hostname
        self.args = list(args)
        self.env = dict(env or {})
        self.key_file = workdir / "derper.key"
        self.certdir = certdir
        self.acme_flags = acme_flags
        self.name = name
        self.certmode = certmode
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.log_path = workdir / f"{name}-0.log"
        self.started_at = 0.0  # time.time() of the last start

    @property
    def effective_certdir(self) -> Path:
        return self.certdir if self.certdir is not None else self.key_file.parent / "certs"

    def command(self) -> list[str]:
        cmd = [*DERPD_CMD, "serve", "--addr", f"127.0.0.1:{self.tls_port}", "--http-port", str(self.http_port)]
        cmd += ["--stun-port", "-1", "--metrics-addr", f"127.0.0.1:{self.metrics_port}"]
        cmd += ["--key-file", str(self.key_file), "--certmode", self.certmode, "--hostname", self.hostname]
        if self.certdir is not None:
            cmd += ["--certdir", str(self.certdir)]
        if self.acme_flags:
            cmd += ["--acme-directory", self.directory_url, "--acme-ca-file", str(self.ca_file)]
        cmd += ["--log-level", "debug", "--shutdown-timeout", "1s", *self.args]
        return cmd

    def start(self) -> None:
        self.starts += 1
        self.log_path = self.workdir / f"{self.name}-{self.starts}.log"
        self.started_at = time.time()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                cwd=self.workdir,
                env=clean_env(self.env),
                start_new_session=True,
            )

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, a bounded wait, SIGKILL if needed; the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        return self.proc.returncode

    def kill(self) -> None:
        stop_process(self.proc, 1.0)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # the log

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def mark(self) -> int:
        """Where the log ends now (an offset for ``events(since=...)``)."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def lines(self, since: int = 0) -> list[str]:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                data = f.read()
        except FileNotFoundError:
            return []
        return data.decode("utf-8", "replace").split("\n")

    def events(self, name: str, since: int = 0, **match: str) -> list[dict[str, str]]:
        """Parsed lines with ``event=name`` (and the given field values), oldest first."""
        out = []
        for line in self.lines(since):
            if f"event={name}" not in line:
                continue
            fields = parse_line(line)
            if fields.get("event") == name and all(fields.get(k) == v for k, v in match.items()):
                out.append(fields)
        return out

    def tail(self, n: int = 40) -> str:
        return tail(self.log_path, n)

    async def wait_event(
        self, name: str, timeout: float, *, since: int = 0, count: int = 1, **match: str
    ) -> list[dict[str, str]]:
        """Wait (bounded) until the log has ``count`` such events; fails at once if the process exits."""
        deadline = trio.current_time() + timeout
        while True:
            found = self.events(name, since, **match)
            if len(found) >= count:
                return found
            if not self.alive():
                rc = self.proc.returncode if self.proc else None
                raise AssertionError(f"{self.name} exited ({rc}) before {count}x event={name} {match}:\n{self.tail()}")
            if trio.current_time() > deadline:
                raise AssertionError(
                    f"no {count}x event={name} {match} within {timeout:g}s "
                    f"(got {len(found)}); {self.name} log:\n{self.tail()}"
                )
            await trio.sleep(0.05)

    def problems(self) -> list[str]:
        """Lines that should never appear: tracebacks and error-level lines."""
        return [ln for ln in self.lines() if "Traceback" in ln or " exc=" in ln or "level=critical" in ln]

    # metrics

    def metrics_text(self, timeout: float = 2.0) -> str:
        with _NO_PROXY.open(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=timeout) as resp:
            return str(resp.read().decode())

    def metrics(self, timeout: float = 2.0) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        samples = {}
        for family in text_string_to_metric_families(self.metrics_text(timeout)):
            for s in family.samples:
                samples[(s.name, frozenset(s.labels.items()))] = s.value
        return samples

    def metric(self, name: str, **labels: str) -> float | None:
        return self.metrics().get((name, frozenset(labels.items())))

    async def ametric(self, name: str, **labels: str) -> float | None:
        return await trio.to_thread.run_sync(lambda: self.metric(name, **labels))

    async def wait_metrics(self, timeout: float = 20.0) -> None:
        """Until /metrics answers (derpd binds its listeners at start, before any certificate)."""
        with trio.move_on_after(timeout):
            while True:
                if not self.alive():
                    raise AssertionError(f"{self.name} exited:\n{self.tail()}")
                try:
                    await trio.to_thread.run_sync(lambda: self.metrics_text(0.5))
                    return
                except OSError:
                    await trio.sleep(0.05)
        raise AssertionError(f"/metrics not answering within {timeout:g}s:\n{self.tail()}")

    # TLS and DERP

    @property
    def url(self) -> str:
        host = f"[{self.hostname}]" if ":" in self.hostname else self.hostname
        return f"https://{host}:{self.tls_port}/derp"

    async def handshake(
        self, ctx: ssl.SSLContext, server_hostname: str | None = None, timeout: float = 5.0
    ) -> trio.SSLStream[trio.SocketStream]:
        """A TLS handshake on the DERP port (ALPN http/1.1); the caller closes the stream."""
        with trio.fail_after(timeout):
            stream = await trio.open_tcp_stream("127.0.0.1", self.tls_port)
            ctx.set_alpn_protocols(["http/1.1"])
            return await start_tls(stream, ctx, server_hostname or self.hostname)  # type: ignore[return-value]

    async def served_leaf(
        self, ctx: ssl.SSLContext, server_hostname: str | None = None, timeout: float = 5.0
    ) -> x509.Certificate:
        """The certificate a verified handshake gets now."""
        tls = await self.handshake(ctx, server_hostname, timeout)
        try:
            der = tls.getpeercert(binary_form=True)
            assert der
            return x509.load_der_x509_certificate(der)
        finally:
            await trio.aclose_forcefully(tls)

    async def connect(self, ctx: ssl.SSLContext, **kw: Any) -> DerpClient:
        return await DerpClient.connect(self.url, ssl_context=ctx, dial=("127.0.0.1", self.tls_port), **kw)


def unverified_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def handshake_outcome(port: int, server_hostname: str, timeout: float = 10.0) -> tuple[str, float]:
    """Try a TLS handshake (not verifying) to 127.0.0.1:port: ("ok" | "ssl: <error>" | "closed: ..." |
    "refused" | "timeout", seconds it took)."""
    t0 = trio.current_time()
    try:
        with trio.fail_after(timeout):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            try:
                tls = await start_tls(stream, unverified_context(), server_hostname)
                await trio.aclose_forcefully(tls)
                outcome = "ok"
            except ssl.SSLError as e:
                outcome = f"ssl: {e}"
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                outcome = f"closed: {e!r}"
    except OSError:
        outcome = "refused"
    except trio.TooSlowError:
        outcome = "timeout"
    return outcome, trio.current_time() - t0


# --- systemd notifications --------------------------------------------------------------------------


class NotifySocket:
    """A unix datagram socket standing in for systemd's NOTIFY_SOCKET (a short path: sun_path is small)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="derpd-acme-"))
        self.path = self.dir / "notify"
        self.sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.got: list[tuple[float, bytes]] = []

    async def bind(self) -> NotifySocket:
        await self.sock.bind(str(self.path))
        return self

    async def wait_for(self, want: bytes, timeout: float) -> float:
        """Wait until a datagram containing ``want`` arrives; its arrival time (time.time())."""
        for t, d in self.got:
            if want in d:
                return t
        with trio.fail_after(timeout):
            while True:
                data = await self.sock.recv(4096)
                self.got.append((time.time(), data))
                if want in data:
                    return self.got[-1][0]

    async def collect(self, seconds: float) -> None:
        """Take whatever arrives for ``seconds``."""
        with trio.move_on_after(seconds):
            while True:
                data = await self.sock.recv(4096)
                self.got.append((time.time(), data))

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(OSError):
            self.path.unlink()
            self.dir.rmdir()


@contextlib.asynccontextmanager
async def notify_socket() -> AsyncIterator[NotifySocket]:
    n = await NotifySocket().bind()
    try:
        yield n
    finally:
        n.close()
