"""A real ACME CA for the tests: Debian's ``pebble`` (Let's Encrypt's RFC 8555 test CA, 2.4) behind its
mock DNS ``pebble-challtestsrv``, and ``FaultProxy``, an HTTPS reverse proxy in front of pebble's ACME API
that can misbehave on demand.

Everything listens on 127.0.0.1 ephemeral ports. Pebble's own HTTPS certificate comes from a ``trustme``
CA written to ``Pebble.ca_file`` (what derpd's ``--acme-ca-file`` takes); the FaultProxy's certificate
comes from the same CA, so one CA file trusts both. Pebble validates challenges by connecting to
``127.0.0.1:http_port`` (HTTP-01) and ``127.0.0.1:tls_port`` (TLS-ALPN-01): the test picks those ports
(``free_port``), tells pebble, then starts derpd on them.

What pebble 2.4.0 (Debian 2.4.0+ds1) really does, checked by ``test_harness.py``:

* ``pebble-challtestsrv -defaultIPv6 ""`` answers AAAA queries with no records (NOERROR, an SOA in the
  authority section), so pebble's validation only ever dials 127.0.0.1, never ::1.
* IP identifiers (RFC 8738) are accepted: an order for ``127.0.0.1`` offers ``tls-alpn-01`` and
  ``http-01`` (no ``dns-01``); the certificate has an IP-address subjectAltName.
* The TLS-ALPN-01 validation for an IP sends the reverse-DNS name as SNI (``1.0.0.127.in-addr.arpa``
  for 127.0.0.1, as RFC 8738 §6 says), for a DNS name the name itself; ALPN offers only ``acme-tls/1``.
  Each validation connects more than once (three times here).
* ``certificateValidityPeriod`` N gives notBefore = issuance time and notAfter = notBefore + N - 1 s.
* Pebble builds its URLs from the request's Host header, and checks a JWS ``url`` against them, so a
  proxy that passes Host through is served URLs on its own base (the proxy rewrites pebble's base too,
  in case).
* Pebble forgets everything when it restarts (accounts, orders) and makes a new root and intermediate:
  ``root_pem()`` is fetched again after each start.
* By default pebble rejects 5% of good nonces and reuses valid authorizations 50% of the time; this
  harness sets both to 0 (``nonce_reject``, ``authz_reuse``) so that runs are repeatable, and sets
  ``PEBBLE_VA_NOSLEEP=1`` (pebble otherwise sleeps up to 15 s before each validation).
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import random
import re
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509

PEBBLE = "pebble"
CHALLTESTSRV = "pebble-challtestsrv"
READY_TIMEOUT = 20.0  # seconds for pebble or challtestsrv to answer after start
STOP_TIMEOUT = 5.0  # seconds after SIGTERM before SIGKILL
HANG_LIMIT = 120.0  # a "hang" request is dropped after this long even if nobody changes the mode
UPSTREAM_TIMEOUT = 30.0
ADDR_IN_USE = re.compile(r"address already in use", re.IGNORECASE)


def need_tool(name: str) -> str:
    """pebble's binaries; missing is a failure (scripts/ensure-test-tools installs them), never a skip."""
    path = shutil.which(name) or (f"/usr/bin/{name}" if os.access(f"/usr/bin/{name}", os.X_OK) else None)
    if path is None:
        pytest.fail(
            f"{name} not found: apt-get install pebble (the Debian package ships pebble and pebble-challtestsrv; "
            "scripts/ensure-test-tools installs it)"
        )
    return path


# --- ports ----------------------------------------------------------------------------------------


_HANDED_OUT: set[int] = set()  # never hand the same port out twice in one test session


def _below_ephemeral_range() -> range:
    """Ports the kernel never picks for an outgoing connection or a bind to port 0: below
    ip_local_port_range. A port chosen for a listener that starts later (derpd, pebble) cannot then be
    taken meanwhile by some process's outgoing connection."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return range(max(1025, low - 12000), low)


def free_ports(n: int, *, udp_too: bool = False) -> list[int]:
    """``n`` distinct loopback TCP ports that are free now (with ``udp_too`` for UDP as well: a DNS
    server binds both), chosen below the ephemeral range and never handed out before in this session."""
    candidates = list(_below_ephemeral_range())
    random.shuffle(candidates)
    ports: list[int] = []
    for port in candidates:
        if len(ports) == n:
            break
        if port in _HANDED_OUT:
            continue
        kinds = [socket.SOCK_STREAM, socket.SOCK_DGRAM] if udp_too else [socket.SOCK_STREAM]
        try:
            for kind in kinds:
                with socket.socket(socket.AF_INET, kind) as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        _HANDED_OUT.add(port)
        ports.append(port)
    if len(ports) < n:
        raise RuntimeError(f"no {n} free loopback ports below the ephemeral range")
    return ports


def free_port(*, udp_too: bool = False) -> int:
    """One loopback TCP port that was free a moment ago."""
    return free_ports(1, udp_too=udp_too)[0]


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# --- processes ------------------------------------------------------------------------------------


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM, a bounded wait, then SIGKILL and another bounded wait."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no output)"


def https_get(
    url: str, context: ssl.SSLContext, *, method: str = "GET", timeout: float = 5.0, body: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One HTTPS request with ``http.client``: (status, headers with lower-case names, body)."""
    m = re.fullmatch(r"https://([^/:]+|\[[^]]+\]):(\d+)(/.*)?", url)
    assert m, url
    conn = http.client.HTTPSConnection(m.group(1).strip("[]"), int(m.group(2)), timeout=timeout, context=context)
    try:
        conn.request(method, m.group(3) or "/", body=body)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


class ChallTestSrv:
    """``pebble-challtestsrv`` as pebble's DNS only: every A query is answered with 127.0.0.1, AAAA with
    nothing; its own HTTP-01/HTTPS-01/TLS-ALPN-01 responders are off (derpd answers the challenges)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.dns_port = 0
        self.management_port = 0
        self.log_path = workdir / "challtestsrv.log"
        self.starts = 0

    def start(self) -> None:
        binary = need_tool(CHALLTESTSRV)
        for _attempt in range(5):
            self.starts += 1
            self.dns_port = free_port(udp_too=True)
            self.management_port = free_port()
            self.log_path = self.workdir / f"challtestsrv-{self.starts}.log"
            cmd = [binary, "-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""]
            cmd += ["-dns01", f"127.0.0.1:{self.dns_port}", "-http01", "", "-https01", "", "-tlsalpn01", ""]
            cmd += ["-management", f"127.0.0.1:{self.management_port}"]
            with open(self.log_path, "wb") as out:
                self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
            deadline = time.monotonic() + READY_TIMEOUT
            while time.monotonic() < deadline and self.proc.poll() is None:
                if port_open(self.management_port) and dns_query(self.dns_port, "ready.test", timeout=0.5) is not None:
                    return
                time.sleep(0.05)
            stop_process(self.proc)
            if not ADDR_IN_USE.search(tail(self.log_path)):
                break
        pytest.fail(f"pebble-challtestsrv did not start; its output:\n{tail(self.log_path)}")

    def stop(self) -> None:
        stop_process(self.proc)


def dns_query(port: int, name: str, qtype: int = 1, timeout: float = 2.0) -> list[bytes] | None:
    """A DNS query over UDP to 127.0.0.1:``port`` (qtype 1 = A, 28 = AAAA): the answers' RDATA, or None
    when nothing came back. Built and parsed by hand (no DNS library in the venv)."""
    ident = int.from_bytes(os.urandom(2), "big")
    question = b"".join(bytes([len(label)]) + label.encode() for label in name.rstrip(".").split(".")) + b"\0"
    question += struct.pack(">HH", qtype, 1)
    query = struct.pack(">HHHHHH", ident, 0x0100, 1, 0, 0, 0) + question
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.sendto(query, ("127.0.0.1", port))
            reply = s.recv(4096)
        except OSError:
            return None
    rid, flags, qd, an, _ns, _ar = struct.unpack(">HHHHHH", reply[:12])
    if rid != ident or not flags & 0x8000 or flags & 0xF:
        return None
    pos = 12
    for _ in range(qd):
        pos = _skip_name(reply, pos) + 4
    answers = []
    for _ in range(an):
        pos = _skip_name(reply, pos)
        rtype, _cls, _ttl, rdlen = struct.unpack(">HHIH", reply[pos : pos + 10])
        pos += 10
        if rtype == qtype:
            answers.append(reply[pos : pos + rdlen])
        pos += rdlen
    return answers


def _skip_name(msg: bytes, pos: int) -> int:
    while True:
        n = msg[pos]
        if n == 0:
            return pos + 1
        if n & 0xC0 == 0xC0:  # a compression pointer ends the name
            return pos + 2
        pos += 1 + n


# --- pebble ---------------------------------------------------------------------------------------


class Pebble:
    """Pebble on 127.0.0.1 with challtestsrv as its DNS. Not started by the constructor: the ports (and
    so ``directory_url``) are fixed at once, so that a test can give derpd the URL of a CA that is down.

    ``http_port``/``tls_port``: where pebble validates HTTP-01 and TLS-ALPN-01 (derpd's ports).
    ``validity_seconds``: ``certificateValidityPeriod`` (None: pebble's default, about 5 years).
    ``eab_keys``: kid -> base64url HMAC key; ``eab_required``: externalAccountBindingRequired.
    ``nonce_reject``: PEBBLE_WFE_NONCEREJECT percent; ``authz_reuse``: PEBBLE_AUTHZREUSE percent.
    ``env``: more environment for pebble (e.g. {"PEBBLE_VA_ALWAYS_VALID": "1"}).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        http_port: int,
        tls_port: int,
        validity_seconds: int | None = None,
        eab_required: bool = False,
        eab_keys: Mapping[str, str] | None = None,
        nonce_reject: int = 0,
        authz_reuse: int = 0,
        env: Mapping[str, str] | None = None,
        ca: trustme.CA | None = None,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.http_port = http_port
        self.tls_port = tls_port
        self.validity_seconds = validity_seconds
        self.eab_required = eab_required
        self.eab_keys = dict(eab_keys or {})
        self.nonce_reject = nonce_reject
        self.authz_reuse = authz_reuse
        self.env = dict(env or {})
        self.ca = ca or trustme.CA()
        self.ca_file = workdir / "pebble-https-ca.pem"  # derpd's --acme-ca-file
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        server = self.ca.issue_cert("127.0.0.1", "localhost")
        self.cert_file = workdir / "pebble-https-cert.pem"
        self.key_file = workdir / "pebble-https-key.pem"
        self.cert_file.write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
        server.private_key_pem.write_to_path(str(self.key_file))
        self.dns = ChallTestSrv(workdir)
        self.proc: subprocess.Popen[bytes] | None = None
        self.port, self.management_port = free_ports(2)
        self.starts = 0
        self.log_path = workdir / "pebble-0.log"
        self._url_handed_out = False
        self._root: bytes | None = None

    # addresses

    @property
    def base_url(self) -> str:
        """``https://127.0.0.1:PORT``: the ACME API's origin (every URL pebble hands out starts with it)."""
        self._url_handed_out = True
        return f"https://127.0.0.1:{self.port}"

    @property
    def directory_url(self) -> str:
        return self.base_url + "/dir"

    @property
    def management_url(self) -> str:
        return f"https://127.0.0.1:{self.management_port}"

    def client_context(self) -> ssl.SSLContext:
        """A client context trusting the trustme CA: pebble's and the FaultProxy's HTTPS."""
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        return ctx

    # lifecycle

    def config(self) -> dict[str, Any]:
        conf: dict[str, Any] = {
            "listenAddress": f"127.0.0.1:{self.port}",
            "managementListenAddress": f"127.0.0.1:{self.management_port}",
            "certificate": str(self.cert_file),
            "privateKey": str(self.key_file),
            "httpPort": self.http_port,
            "tlsPort": self.tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": self.eab_required,
        }
        if self.eab_keys:
            conf["externalAccountMACKeys"] = self.eab_keys
        if self.validity_seconds is not None:
            conf["certificateValidityPeriod"] = self.validity_seconds
        return {"pebble": conf}

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start (challtestsrv first, if it is not running) and wait until the directory and the
        management API answer. Blocking: from trio, ``await trio.to_thread.run_sync(pebble.start)``."""
        binary = need_tool(PEBBLE)
        if self.running():
            return
        if self.dns.proc is None or self.dns.proc.poll() is not None:
            self.dns.start()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PEBBLE_")}
        env.update(
            PEBBLE_VA_NOSLEEP="1",
            PEBBLE_WFE_NONCEREJECT=str(self.nonce_reject),
            PEBBLE_AUTHZREUSE=str(self.authz_reuse),
        )
        env.update(self.env)
        for _attempt in range(5):
            self.starts += 1
            self._root = None
            config_path = self.workdir / f"pebble-{self.starts}.json"
            config_path.write_text(json.dumps(self.config(), indent=2))
            self.log_path = self.workdir / f"pebble-{self.starts}.log"
            cmd = [binary, "-config", str(config_path), "-dnsserver", f"127.0.0.1:{self.dns.dns_port}"]
            with open(self.log_path, "wb") as out:
                self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env)
            if self._await_ready():
                return
            stop_process(self.proc)
            if not ADDR_IN_USE.search(tail(self.log_path)) or self._url_handed_out:
                break
            self.port, self.management_port = free_ports(2)  # nobody was told the old ones yet
        pytest.fail(f"pebble did not become ready; its output ({self.log_path}):\n{tail(self.log_path)}")

    def _await_ready(self) -> bool:
        assert self.proc is not None
        ctx = self.client_context()
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                status, _, body = https_get(f"https://127.0.0.1:{self.port}/dir", ctx, timeout=1.0)
                if status == 200 and "newOrder" in json.loads(body):
                    status, _, _ = https_get(self.management_url + "/roots/0", ctx, timeout=1.0)
                    if status == 200:
                        return True
            except (OSError, ValueError, http.client.HTTPException):
                pass
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        """Stop pebble (the CA goes down; challtestsrv keeps running). Its state is gone for good."""
        stop_process(self.proc)
        self._root = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop both processes (bounded; idempotent)."""
        try:
            stop_process(self.proc)
        finally:
            self.dns.stop()

    def __enter__(self) -> Pebble:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    # the issuing CA

    def root_pem(self) -> bytes:
        """The root of this run's issuing chain, from the management API's ``/roots/0`` (new on each start)."""
        if self._root is None:
            status, _, body = https_get(self.management_url + "/roots/0", self.client_context())
            assert status == 200, (status, body[:300])
            self._root = body
        return self._root

    def root_cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.root_pem())

    def intermediate_pem(self) -> bytes:
        status, _, body = https_get(self.management_url + "/intermediates/0", self.client_context())
        assert status == 200, (status, body[:300])
        return body

    def ssl_context_for_issued(self) -> ssl.SSLContext:
        """A client context that trusts only pebble's current root: for clients of a server whose
        certificate pebble issued (verify with ``server_hostname`` the certified name)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cadata=self.root_pem().decode())
        return ctx


# --- the fault proxy ------------------------------------------------------------------------------

MODES = ("pass", "refuse", "hang", "error500", "bad_json", "rate_limited", "ari")
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "content-length",
}


@dataclass(frozen=True)
class Seen:
    """One request the proxy received: monotonic time, method, path (no query), what it answered."""

    at: float
    method: str
    path: str
    status: int  # 0: no answer (hang, refuse, upstream unreachable with the connection dropped)
    mode: str


def rfc3339(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


class FaultProxy:
    """An HTTPS reverse proxy in front of pebble's ACME API (thread-based, ``http.server``).

    A client that starts at ``directory_url`` stays on the proxy: the Host header is passed through
    (pebble builds its URLs from it), and pebble's own ``https://127.0.0.1:PORT`` is rewritten to
    ``base_url`` in bodies and in Location/Link headers. The certificate is from the pebble's trustme
    CA, so ``pebble.ca_file`` trusts it too. When pebble is down the proxy answers 502 (text/plain).

    Modes (``set_mode``, thread-safe, take effect for the next request, also on kept-alive connections):

    * ``pass``: forward.
    * ``refuse``: stop listening (connection refused) and cut open connections.
    * ``hang``: read the request, never answer; the connection is closed when the mode changes, the
      proxy closes, or after ``HANG_LIMIT`` seconds.
    * ``error500``: 500 with an HTML body (a load balancer's error page), nothing forwarded.
    * ``bad_json``: forward, then replace the body with one that is not JSON (status 200, headers such
      as Replay-Nonce and Location kept); only for paths containing ``path`` if given, else every request.
    * ``rate_limited``: POSTs to newOrder answer 429 ``urn:ietf:params:acme:error:rateLimited`` with
      ``Retry-After: retry_after`` and a fresh Replay-Nonce from pebble; everything else is forwarded.
    * ``ari``: forward, adding ``"renewalInfo": "<base>/renewal-info"`` to the directory and answering
      ``GET /renewal-info/<id>`` with the window from ``set_mode("ari", start=..., end=...)``
      (``Retry-After: 3600``).

    ``seen`` lists every request; ``count(path_part, method)`` counts them; ``new_order_path`` is
    pebble's newOrder path (``/order-plz`` in 2.4).
    """

    def __init__(self, pebble: Pebble, workdir: Path | None = None) -> None:
        self.pebble = pebble
        self.upstream_port = pebble.port
        self.upstream_base = f"https://127.0.0.1:{pebble.port}"
        cert = pebble.ca.issue_cert("127.0.0.1", "localhost")
        self._server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._server_ctx.set_alpn_protocols(["http/1.1"])
        chain = (workdir or pebble.workdir) / f"fault-proxy-{id(self):x}.pem"
        chain.write_bytes(cert.private_key_pem.bytes() + b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        self._server_ctx.load_cert_chain(str(chain))
        self._client_ctx = pebble.client_context()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._mode = "pass"
        self._generation = 0  # bumped on every mode change: a hanging request ends when it moves
        self._closed = False
        self.bad_json_path: str | None = None
        self.retry_after = 5
        self.ari_window: tuple[datetime, datetime] | None = None
        self.seen: list[Seen] = []
        self._conns: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port = free_port()
        self._listen()

    # addresses

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def directory_url(self) -> str:
        return self.base_url + "/dir"

    @property
    def new_order_path(self) -> str:
        return "/order-plz"

    # control

    @property
    def mode(self) -> str:
        with self._lock:
            return self._mode

    def set_mode(
        self,
        mode: str,
        *,
        path: str | None = None,
        retry_after: int | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
    ) -> None:
        """Switch mode (see the class doc). ``path``: bad_json's path filter; ``retry_after``: seconds
        for rate_limited; ``start``/``end``: the ARI window (aware datetimes) for ari."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; one of {MODES}")
        if mode == "ari" and (start is None or end is None):
            raise ValueError("ari needs start and end")
        with self._changed:
            old = self._mode
            self._mode = mode
            self._generation += 1
            self.bad_json_path = path if mode == "bad_json" else None
            if retry_after is not None:
                self.retry_after = retry_after
            if mode == "ari":
                assert start is not None and end is not None
                self.ari_window = (start, end)
            self._changed.notify_all()
            conns = list(self._conns) if mode == "refuse" else []
        if mode == "refuse" and old != "refuse":
            self._unlisten()
            for c in conns:
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)
        elif old == "refuse" and mode != "refuse":
            self._listen()

    def count(self, path_part: str = "", method: str | None = None, since: float = 0.0) -> int:
        with self._lock:
            return sum(
                1 for s in self.seen if path_part in s.path and (method is None or s.method == method) and s.at >= since
            )

    def paths(self) -> Counter[str]:
        with self._lock:
            return Counter(f"{s.method} {s.path}" for s in self.seen)

    def new_orders(self, since: float = 0.0) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if s.method == "POST" and s.path == self.new_order_path and s.at >= since]

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._generation += 1
            self._changed.notify_all()
            conns = list(self._conns)
        self._unlisten()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # listening

    def _listen(self) -> None:
        server = _Server(("127.0.0.1", self.port), _Handler)
        server.proxy = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fault-proxy", daemon=True
        )
        self._thread.start()

    def _unlisten(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    # used by the handler

    def _record(self, method: str, path: str, status: int, mode: str) -> None:
        with self._lock:
            self.seen.append(Seen(time.monotonic(), method, path, status, mode))

    def _snapshot(self) -> tuple[str, int, bool]:
        with self._lock:
            return self._mode, self._generation, self._closed

    def _hang(self, generation: int) -> None:
        deadline = time.monotonic() + HANG_LIMIT
        with self._changed:
            while self._generation == generation and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._changed.wait(left)

    def _rewrite(self, data: bytes) -> bytes:
        return data.replace(self.upstream_base.encode(), self.base_url.encode())

    def upstream(
        self, method: str, path: str, headers: list[tuple[str, str]], body: bytes | None
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPSConnection(
            "127.0.0.1", self.upstream_port, timeout=UPSTREAM_TIMEOUT, context=self._client_ctx
        )
        try:
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for k, v in headers:
                conn.putheader(k, v)
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.getheaders(), data
        finally:
            conn.close()

    def fresh_nonce(self, host: str) -> str | None:
        try:
            _, headers, _ = self.upstream("HEAD", "/nonce-plz", [("Host", host)], None)
        except (OSError, http.client.HTTPException):
            return None
        return next((v for k, v in headers if k.lower() == "replay-nonce"), None)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    proxy: FaultProxy

    def finish_request(self, request: Any, client_address: Any) -> None:
        # TLS in the connection's own thread: a slow or silent client never blocks accept().
        raw: socket.socket = request
        proxy = self.proxy
        raw.settimeout(10)
        try:
            tls = proxy._server_ctx.wrap_socket(raw, server_side=True)  # raw is detached into tls
        except (OSError, ssl.SSLError):
            return
        with proxy._lock:
            proxy._conns.add(tls)
        try:
            tls.settimeout(None)
            super().finish_request(tls, client_address)
        finally:
            with proxy._lock:
                proxy._conns.discard(tls)
            with contextlib.suppress(OSError):
                tls.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hung up: nothing to report


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def _read_body(self) -> bytes | None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = self.headers.get("Content-Length")
        return self.rfile.read(int(length)) if length else None

    def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_response(status)
        for k, v in headers:
            if k.lower() not in HOP_BY_HOP and k.lower() not in ("date", "server"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _handle(self) -> None:
        proxy = self.server.proxy
        method, path = self.command, self.path.split("?", 1)[0]
        body = self._read_body()
        mode, generation, closed = proxy._snapshot()
        host = self.headers.get("Host") or proxy.base_url.removeprefix("https://")
        if closed or mode == "refuse":
            proxy._record(method, path, 0, mode)
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        if mode == "hang":
            proxy._record(method, path, 0, mode)
            proxy._hang(generation)
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        if mode == "error500":
            page = b"<html><head><title>500 Internal Server Error</title></head><body>nginx</body></html>\n"
            proxy._record(method, path, 500, mode)
            self._reply(500, [("Content-Type", "text/html")], page)
            return
        if mode == "ari" and method == "GET" and path.startswith("/renewal-info/"):
            window = proxy.ari_window
            assert window is not None
            doc = {"suggestedWindow": {"start": rfc3339(window[0]), "end": rfc3339(window[1])}}
            proxy._record(method, path, 200, mode)
            self._reply(200, [("Content-Type", "application/json"), ("Retry-After", "3600")], json.dumps(doc).encode())
            return
        if mode == "rate_limited" and method == "POST" and path == proxy.new_order_path:
            problem = {"type": "urn:ietf:params:acme:error:rateLimited", "detail": "too many certificates"}
            headers = [("Content-Type", "application/problem+json"), ("Retry-After", str(proxy.retry_after))]
            headers.append(("Link", f'<{proxy.directory_url}>;rel="index"'))
            if nonce := proxy.fresh_nonce(host):
                headers.append(("Replay-Nonce", nonce))
            proxy._record(method, path, 429, mode)
            self._reply(429, headers, json.dumps(problem).encode())
            return
        forward = [(k, v) for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP]
        try:
            status, headers, data = proxy.upstream(method, self.path, forward, body)
        except (OSError, http.client.HTTPException) as e:
            proxy._record(method, path, 502, mode)
            self._reply(502, [("Content-Type", "text/plain")], f"fault proxy: pebble unreachable: {e}\n".encode())
            return
        data = proxy._rewrite(data)
        headers = [
            (k, proxy._rewrite(v.encode()).decode()) if k.lower() in ("location", "link") else (k, v)
            for k, v in headers
        ]
        if mode == "ari" and path == "/dir" and status == 200:
            doc = json.loads(data)
            doc["renewalInfo"] = proxy.base_url + "/renewal-info"
            data = json.dumps(doc, indent=3).encode()
        if mode == "bad_json" and (proxy.bad_json_path is None or proxy.bad_json_path in path):
            status = 200
            data = b"<html>this is not JSON {\n"
            headers = [(k, v) for k, v in headers if k.lower() != "content-type"] + [
                ("Content-Type", "application/json")
            ]
        proxy._record(method, path, status, mode)
        self._reply(status, headers, data)


@contextlib.contextmanager
def running(pebble: Pebble) -> Iterator[Pebble]:
    """``with running(Pebble(...)) as p:``: started, and stopped (bounded) however the block ends."""
    try:
        pebble.start()
        yield pebble
    finally:
        pebble.close()
