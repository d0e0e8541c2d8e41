"""Check a DERP node from the outside, the way Tailscale clients will use it.

For each node: TCP and TLS over IPv4 and IPv6 (version, ALPN, the CertName pin, derper's meta
certificate for fast start, certificate expiry), the HTTP upgrade and DERP login, Ping/Pong and
packets relayed between two clients with RTT percentiles, STUN over both families with the mapped
address, ``/generate_204`` with its challenge when CanPort80, and whether every connection saw one
server key (several mean a load balancer in front of unmeshed servers, which breaks relaying).

Everything is an async function returning dataclasses, so the ``derpd probe`` command and the tests
share one implementation. Every network step is bounded by ``ProbeOptions.timeout``; a failing step
becomes a ``fail`` check with a one-line reason, never an exception.
"""

from __future__ import annotations

import math
import os
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import h11
import trio
from cryptography import x509

from derpd import __version__
from derpd.net.addr import ip_or_none
from derpd.net.client import ConnectionLost, DerpClient, DerpHTTPError
from derpd.net.httpclient import HttpClientConnection, NoResponse, describe_error, open_tcp, start_tls
from derpd.net.tls import PIN_PREFIX, CertError, cert_name_pin, fast_start_key, parse_meta_certificate, peer_chain_der
from derpd.net.tls import pinned_context as _pinned_context
from derpd.proto.frames import HandshakeError, ProtocolError
from derpd.proto.keys import NodeKey, parse_public_key, public_key_text
from derpd.tools.derpmap import DEFAULT_STUN_PORT, DerpMap, DerpMapError, DerpNode, DerpRegion, load, parse
from stun.codec import StunError, binding_request, new_txid, parse_response

OK, FAIL, SKIP = "ok", "fail", "skip"
MAX_MAP_BYTES = 4 * 1024 * 1024
STUN_RESEND = 1.0  # seconds between binding requests while no answer has come
CERT_WARN_DAYS = 14


@dataclass
class ProbeOptions:
    """How to probe. ``timeout`` bounds each network step (connect, handshake, one packet, one STUN)."""

    timeout: float = 5.0
    count: int = 10  # pings and relayed packets
    logins: int = 5  # DERP logins for the server key check (tailscale debug derp also makes 5)
    insecure: bool = False  # no certificate verification (the pin is still compared and reported)
    ca_file: str | None = None  # trust this CA (private PKI, tests) instead of the system store
    cert_name: str | None = None  # overrides the nodes' CertName
    http_port: int = 80  # where the CanPort80 check goes (80 unless port-forwarded or in tests)
    mesh_key: bytes | None = None  # log in as a mesh peer, which admission control lets through


@dataclass
class Check:
    """One line of the report: ``name`` is stable (for monitoring), ``detail`` is for people."""

    name: str
    status: str
    detail: str
    ms: float | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "status": self.status, "detail": self.detail}
        if self.ms is not None:
            out["ms"] = round(self.ms, 3)
        out.update(self.data)
        return out


@dataclass
class NodeReport:
    region_id: int
    region_code: str
    node: str
    host: str
    port: int
    checks: list[Check] = field(default_factory=list)
    server_keys: list[str] = field(default_factory=list)  # distinct, in the order seen

    @property
    def ok(self) -> bool:
        return all(c.status != FAIL for c in self.checks)

    def check(self, name: str) -> Check | None:
        return next((c for c in self.checks if c.name == name), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "region_id": self.region_id,
            "region_code": self.region_code,
            "node": self.node,
            "host": self.host,
            "port": self.port,
            "ok": self.ok,
            "server_keys": self.server_keys,
            "checks": [c.to_json() for c in self.checks],
        }


@dataclass
class ProbeReport:
    source: str
    nodes: list[NodeReport] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # in the DERP map itself
    started: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @property
    def ok(self) -> bool:
        return not self.problems and all(n.ok for n in self.nodes)

    def failures(self) -> list[str]:
        """One line per failure: map problems first, then ``node check: reason``."""
        out = [f"map: {p}" for p in self.problems]
        for n in self.nodes:
            out += [f"{n.node} {c.name}: {c.detail}" for c in n.checks if c.status == FAIL]
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "time": self.started,
            "ok": self.ok,
            "problems": self.problems,
            "nodes": [n.to_json() for n in self.nodes],
            "prober": f"derpd {__version__}",
        }


# --- helpers ---------------------------------------------------------------------------------------


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50, p90 (nearest rank) and max of ``samples`` in milliseconds."""
    s = sorted(samples) or [math.nan]

    def rank(p: float) -> float:
        return s[max(0, math.ceil(p * len(s)) - 1)]

    return {"p50_ms": round(rank(0.5), 3), "p90_ms": round(rank(0.9), 3), "max_ms": round(s[-1], 3)}


def _ms(t0: float) -> float:
    return (trio.current_time() - t0) * 1000


def _fmt_ms(v: float) -> str:
    return f"{v:.1f} ms" if v >= 1 else f"{v:.2f} ms"


_NET_ERRORS = (
    OSError,
    ssl.SSLError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
    DerpHTTPError,
    ConnectionLost,
    HandshakeError,
    ProtocolError,
    CertError,
    ValueError,
    h11.ProtocolError,
)


def _host_in_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host



# --- what to probe ---------------------------------------------------------------------------------


@dataclass
class Target:
    """A node to probe; ``scheme`` is https for DERP map nodes, http only for dev URLs."""

    node: DerpNode
    region_code: str = ""
    scheme: str = "https"
    path: str = "/derp"

    @property
    def port(self) -> int:
        return self.node.effective_derp_port


def target_from_url(url: str, *, stun_port: int = DEFAULT_STUN_PORT, can_port80: bool = False) -> Target:
    """``https://host[:port]/derp`` (or http:// for a dev server) as a one-node target."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected https://host[:port]/derp (or http:// for a dev server), got {url!r}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ValueError(f"bad port in {url!r}") from None
    host = parts.hostname
    node = DerpNode(
        name=host, host_name=host, derp_port=port, stun_port=stun_port if stun_port else 0, can_port80=can_port80
    )
    return Target(node, scheme=parts.scheme, path=parts.path or "/derp")


def targets_from_map(m: DerpMap, region: str | None = None) -> list[Target]:
    """Every node of ``m`` (or of one region, by id or code), in map order."""
    regions: list[DerpRegion] = m.live_regions()
    if region is not None:
        wanted = [r for r in regions if str(r.region_id) == region.strip() or r.region_code == region.strip()]
        if not wanted:
            have = ", ".join(f"{r.region_id} ({r.region_code})" for r in regions) or "none"
            raise DerpMapError(f"no region {region!r} in the map (regions: {have})")
        regions = wanted
    return [Target(n, region_code=r.region_code) for r in regions for n in r.nodes]


async def _fetch(url: str) -> str:
    """GET a DERP map over http(s) with derpd's own client (no thread; the caller's cancel scope bounds it)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    stream: trio.abc.Stream = await open_tcp(host, port)
    if https:
        stream = await start_tls(stream, ssl.create_default_context(), host)
    shown = _host_in_url(host) if port == (443 if https else 80) else f"{_host_in_url(host)}:{port}"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    headers = [("Host", shown), ("User-Agent", f"derpd-probe/{__version__}"), ("Connection", "close")]
    body = bytearray()
    async with HttpClientConnection(stream) as http:
        await http.send_request("GET", target, headers)
        response = await http.read_response()
        if response.status_code != 200:
            raise DerpMapError(f"{url}: HTTP {response.status_code} (expected 200 and a DERP map)")
        complete = await http.receive_body(body, MAX_MAP_BYTES + 1)
    if not complete or len(body) > MAX_MAP_BYTES:
        raise DerpMapError(f"{url}: more than {MAX_MAP_BYTES} bytes; not a DERP map")
    return body.decode("utf-8")


async def load_map(source: str) -> tuple[DerpMap, list[str]]:
    """A DERP map (Tailscale JSON or Headscale YAML) from a file or an http(s) URL, with its problems.
    A URL is fetched under the caller's cancel scope (``derpd probe`` gives it ``--timeout``)."""
    if not source.startswith(("http://", "https://")):
        return load(source)  # a small local file
    try:
        text = await _fetch(source)
    except (*_NET_ERRORS, ValueError) as e:  # ValueError: bad UTF-8
        raise DerpMapError(f"{source}: {describe_error(e)}") from None
    try:
        return parse(text)
    except DerpMapError as e:
        raise DerpMapError(f"{source}: {e}") from None


# --- addresses -------------------------------------------------------------------------------------

_FAMILIES = ((4, socket.AF_INET), (6, socket.AF_INET6))


async def addresses(node: DerpNode, version: int, *, for_stun: bool = False) -> tuple[list[str], str]:
    """Where clients reach ``node`` over IPv4 or IPv6, as tailcfg says: the literal, else DNS.

    Returns (addresses, why there are none). ``none`` in the map disables the family; STUNTestIP
    replaces the STUN address of its family.
    """
    label = f"IPv{version}"
    if for_stun and node.stun_test_ip:
        ip = ip_or_none(node.stun_test_ip)
        if ip is not None and ip.version == version:
            return [str(ip)], ""
    value = node.ipv4 if version == 4 else node.ipv6
    if value == "none":
        return [], f"skipped: {label} disabled in the map (ipv{version}: none)"
    if value:
        ip = ip_or_none(value)
        if ip is None or ip.version != version:
            return [], f"skipped: ipv{version} {value!r} is not an {label} address, so clients do not use {label}"
        return [str(ip)], ""
    host_ip = ip_or_none(node.host_name)
    if host_ip is not None:
        if host_ip.version == version:
            return [str(host_ip)], ""
        return [], f"skipped: no {label} address ({node.host_name} is an IPv{host_ip.version} address)"
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    try:
        infos = await trio.socket.getaddrinfo(node.host_name, None, family, socket.SOCK_STREAM)
    except socket.gaierror as e:
        return [], f"skipped: no {label} address for {node.host_name} ({e.strerror})"
    found: list[str] = []
    for info in infos:
        addr = str(info[4][0])
        if addr not in found:
            found.append(addr)
    return found, "" if found else f"skipped: no {label} address for {node.host_name}"


# --- TLS ---------------------------------------------------------------------------------------------


def tls_context(target: Target, opts: ProbeOptions) -> tuple[ssl.SSLContext, str]:
    """The client context and TLS server name Tailscale's derphttp would use for this node.

    A ``sha256-raw:`` CertName pins the leaf (no CA); another CertName is the name to verify; without
    one the HostName is verified against the system CAs (or ``--ca-file``).
    """
    node = target.node
    cert_name = opts.cert_name if opts.cert_name is not None else node.cert_name
    pin = cert_name if cert_name.startswith(PIN_PREFIX) else ""
    if opts.insecure or node.insecure_for_tests:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif pin:
        ctx = _pinned_context(pin)
    else:
        ctx = ssl.create_default_context(cafile=opts.ca_file)
    ctx.set_alpn_protocols(["http/1.1"])
    server_name = cert_name if cert_name and not pin else node.host_name
    return ctx, server_name


def _leaf(chain: list[bytes]) -> bytes | None:
    """The first certificate that is not derper's meta certificate."""
    return next((der for der in chain if parse_meta_certificate(der) is None), None)


def _cert_facts(tls: trio.SSLStream[Any], pin: str) -> tuple[dict[str, Any], list[str]]:
    """What the handshake showed: version, ALPN, leaf, pin, meta certificate; plus notes."""
    data: dict[str, Any] = {
        "tls_version": tls.version(),
        "alpn": tls.selected_alpn_protocol(),
        "cipher": (tls.cipher() or ("",))[0],
    }
    notes = [str(data["tls_version"]), f"ALPN {data['alpn'] or 'none'}"]
    chain = peer_chain_der(tls)
    leaf_der = _leaf(chain)
    meta = fast_start_key(tls)
    data["fast_start_offered"] = meta is not None
    if meta is not None:
        data["meta_key"] = public_key_text(meta)
    if leaf_der is not None:
        leaf = x509.load_der_x509_certificate(leaf_der)
        leaf_pin = cert_name_pin(leaf_der)
        days = (leaf.not_valid_after_utc - datetime.now(UTC)).total_seconds() / 86400
        data.update(
            cert_pin=leaf_pin,
            cert_subject=leaf.subject.rfc4514_string(),
            cert_not_after=leaf.not_valid_after_utc.isoformat(),
            cert_days_left=math.floor(days),
        )
        if pin:
            data["pin_match"] = leaf_pin == pin
            notes.append("pin ok" if leaf_pin == pin else f"pin MISMATCH (server has {leaf_pin})")
        notes.append(f"cert until {leaf.not_valid_after_utc:%Y-%m-%d} ({math.floor(days)} days)")
    notes.append("fast start offered" if meta is not None else "no meta certificate (no fast start)")
    return data, notes


async def _connect_check(target: Target, version: int, addrs: list[str], opts: ProbeOptions) -> list[Check]:
    """TCP connect and (for https) TLS handshake over one family: checks ``tcp vN`` and ``tls vN``."""
    addr, port = addrs[0], target.port
    where = f"{_host_in_url(addr)}:{port}"
    t0 = trio.current_time()
    try:
        with trio.fail_after(opts.timeout):
            stream = await open_tcp(addr, port)
    except _NET_ERRORS as e:
        checks = [Check(f"tcp v{version}", FAIL, f"{where}: {describe_error(e)}", data={"address": where})]
        if target.scheme == "https":
            checks.append(Check(f"tls v{version}", SKIP, "not attempted: no TCP connection"))
        return checks
    tcp = Check(f"tcp v{version}", OK, f"connected to {where}", _ms(t0), {"address": where})
    if target.scheme != "https":
        await trio.aclose_forcefully(stream)
        return [tcp]
    ctx, server_name = tls_context(target, opts)
    cert_name = opts.cert_name if opts.cert_name is not None else target.node.cert_name
    pin = cert_name if cert_name.startswith(PIN_PREFIX) else ""
    t0 = trio.current_time()
    try:
        with trio.fail_after(opts.timeout):
            tls = await start_tls(stream, ctx, server_name)
        try:
            data, notes = _cert_facts(tls, pin)
        finally:
            await trio.aclose_forcefully(tls)
    except _NET_ERRORS as e:
        why = describe_error(e)
        if "self-signed" in why or "self signed" in why:
            why += " (pin it: --cert-name sha256-raw:<hex>, or CertName in the map; --insecure shows the pin)"
        return [tcp, Check(f"tls v{version}", FAIL, f"handshake with {where}: {why}")]
    status = OK
    if pin and not data.get("pin_match", False):
        status = FAIL if not opts.insecure else OK
    if opts.insecure and "cert_pin" in data:
        notes.append(f"pin {data['cert_pin']}")
    if data.get("cert_days_left", CERT_WARN_DAYS) < CERT_WARN_DAYS:
        notes.append("RENEW SOON")
    return [tcp, Check(f"tls v{version}", status, ", ".join(notes), _ms(t0), data)]


# --- DERP ----------------------------------------------------------------------------------------


async def _login(target: Target, dial: str, opts: ProbeOptions) -> DerpClient:
    url = f"{target.scheme}://{_host_in_url(dial)}:{target.port}{target.path}"
    kw: dict[str, Any] = {}
    if target.scheme == "https":
        ctx, server_name = tls_context(target, opts)
        kw = {"ssl_context": ctx, "cert_name": server_name if server_name != dial else None}
    with trio.fail_after(opts.timeout):
        return await DerpClient.connect(url, mesh_key=opts.mesh_key, is_prober=True, app_name="derpd-probe", **kw)


def _login_failure(e: BaseException) -> str:
    if isinstance(e, DerpHTTPError):
        text = f"HTTP upgrade refused: HTTP {e.status} {e.body[:80].decode('utf-8', 'replace').strip()}".rstrip()
    else:
        text = describe_error(e)
    if isinstance(e, ConnectionLost):
        text += " (during login: admission control refusing the probe's key? try --mesh-psk-file)"
    return text


async def _derp_checks(target: Target, dial: str, opts: ProbeOptions, report: NodeReport, keys: list[NodeKey]) -> int:
    """``derp`` (upgrade + login), ``ping`` and ``relay`` (two clients); returns the logins made.

    Each login's server key is appended to ``keys``.
    """
    t0 = trio.current_time()
    try:
        a = await _login(target, dial, opts)
    except _NET_ERRORS as e:
        report.checks.append(Check("derp", FAIL, f"login to {dial}: {_login_failure(e)}"))
        for name in ("ping", "relay"):
            report.checks.append(Check(name, SKIP, "not attempted: no DERP login"))
        return 0
    async with a:
        keys.append(a.server_key)
        how = "fast start (meta certificate, no 101)" if a.fast_start else "HTTP 101 upgrade"
        key_text = public_key_text(a.server_key)
        data = {"server_key": key_text, "fast_start": a.fast_start}
        report.checks.append(Check("derp", OK, f"{how}, server key {key_text[:20]}…", _ms(t0), data))
        report.checks.append(await _ping_check(a, opts))
        try:
            b = await _login(target, dial, opts)
        except _NET_ERRORS as e:
            report.checks.append(Check("relay", FAIL, f"second client's login: {_login_failure(e)}"))
            return 1
        async with b:
            keys.append(b.server_key)
            report.checks.append(await _relay_check(a, b, opts))
    return 2


async def _ping_check(a: DerpClient, opts: ProbeOptions) -> Check:
    rtts: list[float] = []
    try:
        for _ in range(opts.count):
            t0 = trio.current_time()
            with trio.fail_after(opts.timeout):
                await a.ping()
            rtts.append(_ms(t0))
    except _NET_ERRORS as e:
        return Check("ping", FAIL, f"pong {len(rtts) + 1} of {opts.count}: {describe_error(e)}")
    stats = percentiles(rtts)
    return Check("ping", OK, _stats_text(f"{len(rtts)} pings", stats), data={"count": len(rtts), **stats})


def _stats_text(what: str, stats: dict[str, float]) -> str:
    return f"{what}: p50 {_fmt_ms(stats['p50_ms'])}, p90 {_fmt_ms(stats['p90_ms'])}, max {_fmt_ms(stats['max_ms'])}"


async def _relay_check(a: DerpClient, b: DerpClient, opts: ProbeOptions) -> Check:
    """A sends to B through the server, B echoes back; each round trip (two relays) is timed."""
    rtts: list[float] = []
    nonce = os.urandom(8)
    failure = ""
    echo_error: list[str] = []

    async def echo() -> None:
        try:
            for _ in range(opts.count):
                pkt = await b.recv_packet()
                if pkt.src == a.public_key:
                    await b.send(a.public_key, pkt.data)
        except _NET_ERRORS as e:
            echo_error.append(describe_error(e))

    async def came_back(payload: bytes) -> None:
        while True:  # bounded by the caller's fail_after
            if (await a.recv_packet()).data == payload:
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(echo)
        try:
            for seq in range(opts.count):
                payload = b"derpd-probe " + nonce + seq.to_bytes(4, "big") + bytes(32)
                t0 = trio.current_time()
                with trio.fail_after(opts.timeout):
                    await a.send(b.public_key, payload)
                    await came_back(payload)
                rtts.append(_ms(t0))
        except trio.TooSlowError:
            failure = f"packet {len(rtts) + 1} of {opts.count} did not come back within {opts.timeout:g} s" + (
                f" (the echoing client: {echo_error[0]})" if echo_error else " (clients on different servers?)"
            )
        except _NET_ERRORS as e:
            failure = f"after {len(rtts)} of {opts.count} packets: {describe_error(e)}"
        nursery.cancel_scope.cancel()
    if failure:
        return Check("relay", FAIL, failure, data={"count": len(rtts)})
    stats = percentiles(rtts)
    return Check("relay", OK, _stats_text(f"{len(rtts)} packets A→B→A", stats), data={"count": len(rtts), **stats})


async def _keys_check(
    target: Target, dial: str, opts: ProbeOptions, keys: list[NodeKey], logins: int, metas: int
) -> Check:
    """Log in until ``opts.logins`` logins were made; every connection (and meta cert) must show one key."""
    errors: list[str] = []
    for _ in range(max(0, opts.logins - logins)):
        try:
            client = await _login(target, dial, opts)
        except _NET_ERRORS as e:
            errors.append(_login_failure(e))
            continue
        async with client:
            keys.append(client.server_key)
    distinct = list(dict.fromkeys(keys))
    data = {"connections": len(keys), "server_keys": [public_key_text(k) for k in distinct]}
    seen = f"{len(keys)} connections" + (f" ({len(keys) - metas} logins, {metas} meta certificate(s))" if metas else "")
    if len(distinct) > 1:
        return Check(
            "keys",
            FAIL,
            f"multiple server public keys ({len(distinct)}) over {seen}; behind a load balancer? "
            "each DERP server needs its own node in the map",
            data=data,
        )
    if errors:
        return Check("keys", FAIL, f"{len(errors)} of {opts.logins} logins failed: {errors[0]}", data=data)
    return Check("keys", OK, f"{seen}: one server key", data=data)


# --- STUN and port 80 --------------------------------------------------------------------------------


async def stun_check(addr: str, port: int, version: int) -> Check:
    """A binding request, resent every STUN_RESEND seconds until a matching answer comes (the caller's
    cancel scope decides how long: see ``_within``); the mapped address back."""
    name = f"stun v{version}"
    where = f"{_host_in_url(addr)}:{port}"
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    txid = new_txid()
    request = binding_request(txid)
    try:
        with trio.socket.socket(family, socket.SOCK_DGRAM) as sock:
            await sock.connect((addr, port))
            while True:
                t0 = trio.current_time()
                await sock.send(request)
                with trio.move_on_after(STUN_RESEND):
                    while True:
                        data = await sock.recv(2048)
                        try:
                            resp = parse_response(data)
                        except StunError:
                            continue
                        if resp.txid == txid:
                            mapped = f"{_host_in_url(str(resp.address))}:{resp.port}"
                            data_out = {"server": where, "mapped": mapped}
                            return Check(name, OK, f"{where} says we are {mapped}", _ms(t0), data_out)
    except ConnectionRefusedError:
        return Check(
            name, FAIL, f"{where}: port unreachable (nothing listening on that UDP port?)", data={"server": where}
        )
    except OSError as e:
        return Check(name, FAIL, f"{where}: {describe_error(e)}", data={"server": where})


async def captive_portal_check(addr: str, host: str, port: int) -> Check:
    """``GET /generate_204`` with Tailscale's challenge header, as clients' captive-portal detection does
    (under the caller's cancel scope: see ``_within``)."""
    name = "port80"
    challenge = "ts_" + os.urandom(6).hex()
    url = f"http://{_host_in_url(addr)}:{port}/generate_204"
    headers = [
        ("Host", _host_in_url(host) if port == 80 else f"{_host_in_url(host)}:{port}"),
        ("User-Agent", f"derpd-probe/{__version__}"),
        ("X-Tailscale-Challenge", challenge),
        ("Cache-Control", "no-cache, no-store, must-revalidate, no-transform, max-age=0"),
        ("Connection", "close"),
    ]
    t0 = trio.current_time()
    try:
        async with HttpClientConnection(await open_tcp(addr, port)) as http:
            await http.send_request("GET", "/generate_204", headers)
            response = await http.read_response()
    except NoResponse:
        return Check(name, FAIL, f"{url}: no HTTP response", data={"url": url})
    except _NET_ERRORS as e:
        return Check(name, FAIL, f"{url}: {describe_error(e)} (is port 80 blocked?)", data={"url": url})
    answer = dict((k.lower(), v) for k, v in response.headers).get(b"x-tailscale-response", b"").decode("latin-1")
    data = {"url": url, "status": response.status_code, "challenge_ok": answer == f"response {challenge}"}
    if response.status_code != 204:
        return Check(name, FAIL, f"{url}: HTTP {response.status_code}, expected 204", _ms(t0), data)
    if not data["challenge_ok"]:
        return Check(name, FAIL, f"{url}: 204 without the X-Tailscale-Response challenge answer", _ms(t0), data)
    return Check(name, OK, f"{url}: 204 with the challenge answered", _ms(t0), data)


# --- one node, many nodes ----------------------------------------------------------------------------


async def probe_target(target: Target, opts: ProbeOptions) -> NodeReport:
    """Every check for one node; independent groups (DERP, STUN, port 80) run concurrently."""
    node = target.node
    report = NodeReport(node.region_id, target.region_code, node.name, node.host_name, target.port)
    stun_checks: list[Check] = []
    port80: list[Check] = []

    async def derp_group() -> None:
        if node.stun_only:
            report.checks.append(Check("derp", SKIP, "stunonly node: no DERP"))
            return
        found = {v: await addresses(node, v) for v, _ in _FAMILIES}
        if not found[4][0] and not found[6][0]:
            why = "; ".join(found[v][1].removeprefix("skipped: ") for v in (4, 6))
            report.checks.append(Check("tcp", FAIL, f"no address to connect to: {why}"))
            for name in ("derp", "ping", "relay", "keys"):
                report.checks.append(Check(name, SKIP, "not attempted: no address"))
            return
        dial = ""
        for version, _ in _FAMILIES:
            addrs, why = found[version]
            if not addrs:
                report.checks.append(Check(f"tcp v{version}", SKIP, why))
                continue
            checks = await _connect_check(target, version, addrs, opts)
            report.checks += checks
            if not dial and all(c.status == OK for c in checks):
                dial = addrs[0]
        if not dial:
            for name in ("derp", "ping", "relay", "keys"):
                report.checks.append(Check(name, SKIP, "not attempted: no working TCP/TLS connection"))
            return
        keys = [parse_public_key(c.data["meta_key"]) for c in report.checks if "meta_key" in c.data]
        metas = len(keys)
        logins = await _derp_checks(target, dial, opts, report, keys)
        if logins == 0:
            report.checks.append(Check("keys", SKIP, "not attempted: no DERP login"))
            return
        keys_check = await _keys_check(target, dial, opts, keys, logins, metas)
        report.server_keys = keys_check.data["server_keys"]
        report.checks.append(keys_check)

    async def stun_group() -> None:
        port = node.effective_stun_port
        for version, _ in _FAMILIES:
            name = f"stun v{version}"
            if port < 0:
                stun_checks.append(Check(name, SKIP, "STUN disabled (stunport -1)"))
                continue
            addrs, why = await addresses(node, version, for_stun=True)
            if not addrs:
                stun_checks.append(Check(name, SKIP, why))
                continue
            where = f"{_host_in_url(addrs[0])}:{port}"
            why = f"{where}: no STUN answer within {opts.timeout:g} s (UDP blocked?)"
            slow = Check(name, FAIL, why, data={"server": where})
            stun_checks.append(await _within(opts.timeout, slow, stun_check, addrs[0], port, version))

    async def port80_group() -> None:
        if not node.can_port80:
            return
        v4, _ = await addresses(node, 4)
        v6, _ = await addresses(node, 6)
        addr = (v4 or v6 or [node.host_name])[0]
        url = f"http://{_host_in_url(addr)}:{opts.http_port}/generate_204"
        why = f"{url}: no answer within {opts.timeout:g} s (is port 80 blocked?)"
        slow = Check("port80", FAIL, why, data={"url": url})
        port80.append(await _within(opts.timeout, slow, captive_portal_check, addr, node.host_name, opts.http_port))

    async with trio.open_nursery() as nursery:
        for group in (derp_group, stun_group, port80_group):
            nursery.start_soon(_contained, group, report)
    report.checks += stun_checks + port80
    return report


async def _within(seconds: float, timed_out: Check, check: Callable[..., Awaitable[Check]], *args: Any) -> Check:
    """``check(*args)``, or ``timed_out`` when it has not finished within ``seconds``."""
    with trio.move_on_after(seconds):
        return await check(*args)
    return timed_out


async def _contained(fn: Callable[[], Awaitable[None]], report: NodeReport) -> None:
    """A bug in one group of checks becomes a failed check, not a crashed probe."""
    try:
        await fn()
    except Exception as e:
        report.checks.append(Check("internal", FAIL, f"probe error: {type(e).__name__}: {describe_error(e)}"))


async def probe_targets(targets: list[Target], opts: ProbeOptions, *, source: str = "") -> ProbeReport:
    """All targets concurrently; the report keeps their order."""
    reports: list[NodeReport | None] = [None] * len(targets)

    async def one(i: int, t: Target) -> None:
        reports[i] = await probe_target(t, opts)

    async with trio.open_nursery() as nursery:
        for i, t in enumerate(targets):
            nursery.start_soon(one, i, t)
    return ProbeReport(source=source, nodes=[r for r in reports if r is not None])


async def probe_url(
    url: str, opts: ProbeOptions | None = None, *, stun_port: int = DEFAULT_STUN_PORT, can_port80: bool = False
) -> ProbeReport:
    """Probe one DERP server by URL (``https://host[:port]/derp``; ``http://`` for dev servers)."""
    target = target_from_url(url, stun_port=stun_port, can_port80=can_port80)
    return await probe_targets([target], opts or ProbeOptions(), source=url)


async def probe_map(
    m: DerpMap,
    opts: ProbeOptions | None = None,
    *,
    region: str | None = None,
    source: str = "",
    problems: list[str] | None = None,
) -> ProbeReport:
    """Probe every node of a DERP map (or of one region); the map's own problems fail the report too."""
    report = await probe_targets(targets_from_map(m, region), opts or ProbeOptions(), source=source)
    report.problems = list(problems or [])
    return report


# --- the human table --------------------------------------------------------------------------------


def format_table(report: ProbeReport) -> str:
    """One block per node, one line per check; failures marked so a person scanning sees them."""
    lines: list[str] = []
    for p in report.problems:
        lines.append(f"FAIL  map       {p}")
    for n in report.nodes:
        if lines:
            lines.append("")
        region = f"region {n.region_id} ({n.region_code}) " if n.region_id else ""
        head = f"{region}node {n.node}: {_host_in_url(n.host)}:{n.port}"
        if n.server_keys:
            head += f"  key {n.server_keys[0]}"
        lines.append(head)
        for c in n.checks:
            status = {OK: "ok", FAIL: "FAIL", SKIP: "skip"}.get(c.status, c.status)
            timing = f"  [{_fmt_ms(c.ms)}]" if c.ms is not None else ""
            lines.append(f"  {status:<5} {c.name:<9} {c.detail}{timing}")
    failed = report.failures()
    lines.append("")
    if failed:
        lines.append(f"{len(failed)} check(s) failed")
    else:
        total = sum(1 for n in report.nodes for c in n.checks if c.status == OK)
        lines.append(f"all {total} checks passed")
    return "\n".join(lines) + "\n"


__all__ = [
    "FAIL",
    "OK",
    "SKIP",
    "Check",
    "NodeReport",
    "ProbeOptions",
    "ProbeReport",
    "Target",
    "addresses",
    "captive_portal_check",
    "format_table",
    "load_map",
    "percentiles",
    "probe_map",
    "probe_target",
    "probe_targets",
    "probe_url",
    "stun_check",
    "target_from_url",
    "targets_from_map",
    "tls_context",
]
