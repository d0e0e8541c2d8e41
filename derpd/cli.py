"""The ``derpd`` command: serve, check-config, genkey, pubkey, derpmap, probe.

Every flag has an environment twin ``DERPD_<NAME>``. Any bad flag or file ends in
one ``derpd: error: ...`` line and exit status 2 before anything is started.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
import trio

from derpd import __version__, config
from derpd.base import log
from derpd.base.errors import ConfigurationError
from derpd.net.tls import PIN_PREFIX, CertError, pinned_context
from derpd.ops import runtime, sdnotify
from derpd.ops.keyfiles import load_key_file, load_mesh_key_file, write_key_file
from derpd.ops.workers import Supervisor, WorkerError, configure_worker, worker_identity
from derpd.proto.keys import InvalidKeyError, public_key_text
from derpd.proto.keys import NodePrivate as _NodePrivate

if TYPE_CHECKING:
    from derpd.tools.probe import ProbeOptions, ProbeReport

# derpd.tools (derpmap, probe) is imported by the two commands that use it, not here: with cryptography
# and the rest of what it imports, ~9 MB of RSS that `derpd serve` never needs (tests/test_layers.py
# lists these lazy imports). The choices of `derpmap --format`, which click needs before the command
# runs, are spelled out here; tests/test_cli.py checks they are derpd.tools.derpmap.FORMATS.
MAP_FORMATS = ("headscale-yaml", "tailscale-json")

F = TypeVar("F", bound=Callable[..., Any])
CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True}


class ConfigError(click.UsageError):
    """A bad flag value or file: reported as one line, exit status 2."""


def _key_file_option(help_text: str, *, required: bool) -> Callable[[F], F]:
    return click.option(
        "--key-file",
        envvar="DERPD_KEY_FILE",
        show_envvar=True,
        type=click.Path(dir_okay=False),
        required=required,
        help=help_text,
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, "--version", prog_name="derpd", message="%(prog)s %(version)s")
def cli() -> None:
    """derpd: a DERP relay and STUN server for Tailscale and Headscale tailnets."""


def _opt(flag: str, help_text: str, *name: str, **kw: Any) -> Callable[[F], F]:
    """An option with its DERPD_<NAME> environment twin; ``name`` renames the parameter."""
    env = "DERPD_" + flag.split("/", 1)[0][2:].upper().replace("-", "_")
    return click.option(flag, *name, envvar=env, show_envvar=True, help=help_text, **kw)


def _bad_value(text: str) -> click.UsageError:
    """A bad value or file: one ``derpd: error:`` line without the '--help' hint, exit status 2."""
    return ConfigError(text)


def _warn(text: str) -> None:
    click.echo(f"derpd: warning: {text}", err=True)


class Duration(click.ParamType):  # type: ignore[type-arg]  # click >= 8.2: ParamType is generic
    """Go-style durations as derper takes them: 2s, 500ms, 10m, 1h30m; a bare number is seconds."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            return config.parse_duration(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


def _load_config(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--config FILE (TOML): its keys become defaults, below flags and DERPD_* variables."""
    if value is None:
        return None
    try:
        doc = config.read_config_file(value)
    except ConfigurationError as e:
        raise ConfigError(str(e)) from None
    options = {p.opts[0][2:]: p for p in ctx.command.params if isinstance(p, click.Option) and p.name != "config"}
    defaults: dict[str, Any] = {}
    for key, item in doc.items():
        opt = options.get(key)
        if opt is None or opt.name is None or opt.name == "help":
            raise ConfigError(f"config file {value}: unknown key {key!r}")
        defaults[opt.name] = _config_value(ctx, value, key, opt, item)
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def _config_value(ctx: click.Context, path: str, key: str, opt: click.Option, item: Any) -> Any:
    """TOML's own types must fit the option: no "3478" for a port, no 1 for a switch."""
    if opt.is_flag:
        ok = isinstance(item, bool)
        want = "true or false"
    elif isinstance(opt.type, click.types.IntParamType):
        ok = isinstance(item, int) and not isinstance(item, bool)
        want = "an integer"
    elif isinstance(opt.type, click.types.FloatParamType):
        ok = isinstance(item, int | float) and not isinstance(item, bool)
        want = "a number"
    elif isinstance(opt.type, Duration):
        ok = isinstance(item, str | int | float) and not isinstance(item, bool)
        want = 'a duration such as "2s" or a number of seconds'
    else:
        ok = isinstance(item, str)
        want = "a string"
    if not ok:
        raise ConfigError(f"config file {path}: key {key!r} must be {want}, not {type(item).__name__}")
    try:
        return item if opt.is_flag else opt.type.convert(item, opt, ctx)
    except click.BadParameter as e:
        raise ConfigError(f"config file {path}: key {key!r}: {e.format_message()}") from None


@cli.command()
@_opt(
    "--config",
    "TOML file whose keys are these options' names (e.g. stun-port = 3478); flags and DERPD_* variables override it.",
    type=click.Path(dir_okay=False),
    default=None,
    is_eager=True,
    expose_value=False,
    callback=_load_config,
)
@_opt(
    "--addr",
    f"DERP listen address HOST:PORT, [IPv6]:PORT or :PORT (all interfaces, dual-stack). "
    f"Default {config.DEFAULT_ADDR}, or {config.DEV_ADDR} with --dev.",
    default=None,
)
@_opt(
    "--stun-port",
    "UDP port for STUN on the same host as --addr; -1 disables STUN.",
    type=click.IntRange(-1, 65535),
    default=3478,
)
@_opt(
    "--stun-host",
    "Host for the STUN socket when it should differ from --addr's (e.g. DERP on 127.0.0.1 behind a "
    "TLS proxy, STUN public); '*' or '::' for every interface.",
    default=None,
)
@_opt(
    "--stun-generic/--no-stun-generic",
    "Answer any STUN client's binding requests (RFC 5389/8489 and classic RFC 3489, e.g. stunclient, pion, "
    "pystun3), not only Tailscale's. --no-stun-generic answers only Tailscale's own requests, as Go derper does.",
    default=True,
)
@_key_file_option(
    f"Server private key in derper's JSON format; created (mode 0600) if missing. "
    f"Default $STATE_DIRECTORY/derper.key under systemd, {config.ROOT_KEY_FILE} as root, "
    f"{config.DEV_KEY_FILE} with --dev.",
    required=False,
)
@_opt(
    "--dev",
    f"Safe local defaults: DERP on {config.DEV_ADDR}, STUN on 127.0.0.1, key in {config.DEV_KEY_FILE}.",
    is_flag=True,
)
@_opt(
    "--mesh-psk-file",
    "File with the region's 64-hex-digit mesh key; clients presenting it may watch "
    "connections and forward packets. Must not be readable by others.",
    type=click.Path(dir_okay=False),
    default=None,
)
@_opt(
    "--mesh-with",
    "Other nodes of this region to mesh with, comma-separated, in derper's forms: host, host:port, "
    "[ipv6]:port, host/dialhost, host:port/dialhost; or http(s):// URLs, unix:/path "
    "(derpd or Go derper; this node's own name may be listed). Needs --mesh-psk-file.",
    default="",
)
@_opt(
    "--home",
    "What / serves: empty for the built-in page, 'blank' for an empty page, or an http(s) URL to redirect to.",
    default="",
)
@_opt(
    "--certmode",
    "TLS on --addr: 'letsencrypt' (alias 'acme') gets a certificate for HOSTNAME from an ACME CA and keeps it "
    "renewed; 'manual' loads CERTDIR/HOSTNAME.crt and .key (or creates a self-signed certificate when HOSTNAME "
    "is an IP address). Empty for plain HTTP.",
    type=click.Choice(["", "manual", "letsencrypt", "acme"]),
    default="",
)
@_opt(
    "--certdir",
    "Certificates: HOSTNAME.crt/.key for manual; the ACME account key and HOSTNAME.pem for letsencrypt. "
    "Default: 'certs' beside the key file.",
    type=click.Path(file_okay=False),
    default=None,
)
@_opt(
    "--acme-directory",
    "The ACME CA's directory URL (any RFC 8555 CA: ZeroSSL, Google, a private one); 'letsencrypt' (the default) "
    "or 'staging' for Let's Encrypt's.",
    default="letsencrypt",
)
@_opt("--acme-email", "Contact address for the ACME account (expiry notices, CA announcements).", default="")
@_opt("--acme-eab-kid", "External Account Binding key ID, for CAs that require one (ZeroSSL, Google).", default="")
@_opt(
    "--acme-eab-key",
    "External Account Binding HMAC key (base64url). A secret: prefer DERPD_ACME_EAB_KEY or the config file.",
    default="",
)
@_opt(
    "--acme-ca-file",
    "PEM bundle to trust for the ACME CA's own HTTPS (a private CA); default: the system's trust store.",
    type=click.Path(dir_okay=False),
    default=None,
)
@_opt(
    "--acme-challenge",
    "How the CA validates: tls-alpn-01 (on the TLS port), http-01 (on --http-port), or auto (TLS-ALPN-01, "
    "then HTTP-01 when the port-80 listener is on).",
    type=click.Choice(["auto", "tls-alpn-01", "http-01"]),
    default="auto",
)
@_opt("--hostname", "The server's name (or IP) for TLS: certificate name, SNI check, https redirects.", default="")
@_opt(
    "--http-port",
    "Plain-HTTP port on the same host in TLS mode (/generate_204, redirects to https); -1 disables. "
    "Default 80 with --certmode, else -1.",
    type=click.IntRange(-1, 65535),
    default=None,
)
@_opt(
    "--verify-client-url",
    "Admission webhook (e.g. Headscale's https://headscale.example/verify): POST {NodePublic, Source}, "
    'admit only on 200 with {"Allow": true}.',
    default=None,
)
@_opt(
    "--verify-client-url-fail-open/--no-verify-client-url-fail-open",
    "Whether clients are admitted while the --verify-client-url server is unreachable (transport errors "
    "only; a non-200 or Allow=false always refuses).",
    default=True,
)
@_opt("--verify-cache-ttl", "How long admission answers are cached; 0 disables.", type=Duration(), default="30s")
@_opt(
    "--allow-keys",
    "File of allowed nodekey:<hex> lines (# comments); reloaded on SIGHUP. All configured checks must admit.",
    type=click.Path(dir_okay=False),
    default=None,
)
@_opt(
    "--accept-connection-limit",
    "New connections per second on the DERP listener; beyond it sockets are closed at once. Default unlimited.",
    type=click.FloatRange(min=0, min_open=True),
    default=math.inf,
)
@_opt(
    "--accept-connection-burst",
    "Burst for --accept-connection-limit (default: one second's worth).",
    type=click.IntRange(min=0),
    default=0,
)
@_opt(
    "--max-conns-per-ip",
    "Concurrent connections from one IP address; 0 = no cap.",
    type=click.IntRange(min=0),
    default=0,
)
@_opt(
    "--rate-config",
    'JSON {"PerClientRateLimitBytesPerSec": N, "PerClientRateBurstBytes": M}: per-client receive limit '
    "(reads are delayed, nothing dropped; mesh peers exempt); reloaded on SIGHUP.",
    type=click.Path(dir_okay=False),
    default=None,
)
@_opt(
    "--tcp-keepalive-time", "TCP keepalive on client connections; 0 = kernel default.", type=Duration(), default="10m"
)
@_opt(
    "--tcp-user-timeout", "TCP_USER_TIMEOUT on client connections; 0 = kernel default.", type=Duration(), default="15s"
)
@_opt(
    "--tcp-write-timeout",
    "How long a client may take to accept each 64 KiB queued for it before it is disconnected; 0 disables. "
    "Mesh peers get 30 s.",
    type=Duration(),
    default="2s",
)
@_opt(
    "--proxy-protocol",
    "Expect a HAProxy PROXY v1/v2 header on every connection, from --trusted-proxies only (others are dropped).",
    is_flag=True,
)
@_opt("--trusted-proxies", "Comma-separated CIDRs or IPs allowed to send PROXY headers.", default="")
@_opt(
    "--workers",
    "Processes relaying in parallel behind the same ports, meshed with each other: a number, or 'auto' "
    "for one per CPU core. With N > 1, worker i serves metrics on --metrics-addr's port + i.",
    default="1",
)
@_opt(
    "--metrics-addr",
    "Prometheus /metrics on its own listener HOST:PORT (keep it off the public DERP port); -1 disables.",
    default="127.0.0.1:9464",
)
@_opt(
    "--shutdown-timeout",
    "On SIGTERM/SIGINT: stop accepting, send clients a Restarting frame, and close within this long.",
    type=Duration(),
    default="5s",
)
@_opt(
    "--restart-reconnect-in",
    "The Restarting frame's advice: reconnect after this long.",
    type=Duration(),
    default="1s",
)
@_opt("--restart-try-for", "The Restarting frame's advice: keep trying this long.", type=Duration(), default="30s")
@_opt(
    "--log-format",
    "'text' (key=value lines, for journald) or 'json' (one object per line, for log shippers).",
    type=click.Choice(["text", "json"]),
    default="text",
)
@_opt(
    "--log-level",
    "Minimum level of the key=value log lines written to stderr.",
    type=click.Choice(config.LOG_LEVELS, case_sensitive=False),
    default="info",
)
def serve(**opts: Any) -> None:
    """Run the DERP relay and STUN server."""
    # Logging first: building the settings reads certificates and keys, and says so (an expired
    # certificate's warning included). click has already checked both values (flag, env or file).
    log.setup(opts.get("log_level") or "info", json_lines=opts.get("log_format") == "json")
    cfg = _build(opts)
    settings = cfg.settings
    try:
        inherited = sdnotify.listen_fds()
        if inherited:
            http_port = settings.http_port if settings.http_port >= 0 else None
            settings.activated = sdnotify.assign_sockets(inherited, derp_port=settings.addr[1], http_port=http_port)
    except ConfigurationError as e:
        raise ConfigError(f"sockets from systemd: {e}") from None
    log.setup(cfg.log_level, json_lines=cfg.log_format == "json")
    if settings.activated:
        cfg.notes.append(config.Note(logging.INFO, "socket_activation", {"sockets": len(inherited)}))
    identity = worker_identity()
    metrics_addr = cfg.metrics_addr
    if identity is not None:
        index, count = identity
        configure_worker(settings, index, count)
        if metrics_addr is not None and metrics_addr[1]:
            metrics_addr = (metrics_addr[0], metrics_addr[1] + index)
        cfg.notes.clear()  # the supervisor said it all
    for note in cfg.notes:
        log.event(note.level, note.event, **note.fields)
    if cfg.acme is not None and identity is not None:
        cfg.acme.load_cached()  # a worker: the supervisor orders; this process serves what it writes
    elif cfg.acme is not None:
        try:
            cfg.acme.prepare()  # the cert dir, the account key, a cached certificate: logged as found
        except ConfigurationError as e:
            raise ConfigError(str(e)) from None
    service: runtime.Service
    if identity is None and cfg.workers > 1:
        service = Supervisor(cfg.workers, settings, sys.argv[1:], acme=cfg.acme)
    else:
        service = runtime.NodeService(
            cfg.key,
            settings,
            metrics_addr,
            worker=identity is not None,
            acme=cfg.acme,
            follow_certificate=identity is not None and cfg.acme is not None,
        )
    try:
        trio.run(runtime.run, service)
    except KeyboardInterrupt:
        pass
    except BaseExceptionGroup as group:
        matched, rest = group.split((OSError, WorkerError))
        if matched is None or rest is not None:
            raise
        for leaf in _leaves(matched):
            reason = f"{leaf.strerror or leaf}" if isinstance(leaf, OSError) else str(leaf)
            log.error("startup_failed", reason=reason)
        sys.exit(1)


def _build(opts: dict[str, Any], *, dry_run: bool = False) -> config.Config:
    """serve's options as typed settings (derpd.config), every problem one ``derpd: error:`` line."""
    try:
        return config.build(config.ServeOptions(**opts), dry_run=dry_run)
    except ConfigurationError as e:
        raise ConfigError(str(e)) from None


def _check_config(**opts: Any) -> None:
    """Validate flags, environment and --config without starting anything; exit 2 on the first problem."""
    cfg = _build(opts, dry_run=True)
    for note in cfg.notes:
        click.echo(f"note: {note.event} " + " ".join(f"{k}={v}" for k, v in note.fields.items() if v is not None))
    host, port = cfg.settings.addr
    tls = "on" if cfg.settings.tls else "off"
    click.echo(f"config OK: derp on {host or '*'}:{port}, tls={tls}, workers={cfg.workers}")


cli.add_command(
    click.Command(
        "check-config",
        callback=_check_config,
        params=serve.params,
        help="Check serve's flags, DERPD_* variables and --config file without starting anything.",
    )
)


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out


@cli.command()
@_key_file_option("Where to write the new key file (mode 0600); an existing file is never overwritten.", required=True)
def genkey(key_file: str) -> None:
    """Create a server key file and print its public key."""
    if Path(key_file).exists():
        raise ConfigError(f"{key_file} already exists; refusing to overwrite a key")
    key = _NodePrivate.generate()
    try:
        write_key_file(key_file, key)
    except InvalidKeyError as e:
        raise ConfigError(str(e)) from None
    click.echo(public_key_text(key.public))


@cli.command()
@_key_file_option("The server key file to read.", required=True)
def pubkey(key_file: str) -> None:
    """Print the public key (nodekey:<hex>) of a key file."""
    try:
        key = load_key_file(key_file)
    except InvalidKeyError as e:
        raise ConfigError(str(e)) from None
    click.echo(public_key_text(key.public))




# --- derpd derpmap ---------------------------------------------------------------------------------


@click.command("derpmap", context_settings=CONTEXT)
@_opt(
    "--region-id",
    "Region id; 900-999 are reserved for your own regions (1-899 are Tailscale's).",
    type=int,
    required=True,
)
@_opt("--region-code", "Short region code, e.g. 'fra' or 'home'.", required=True)
@_opt("--region-name", "Long region name shown in clients (default: the region code).", default=None)
@_opt("--hostname", "The node's DNS name (or IP address) clients dial: TLS name and SNI.", default=None)
@_opt("--node-name", "Node name, unique across the map (default: REGIONID + a, b, ...).", default=None)
@_opt("--ipv4", "IPv4 address clients use instead of DNS; 'none' disables IPv4 for this node.", default=None)
@_opt("--ipv6", "IPv6 address clients use instead of DNS; 'none' disables IPv6 for this node.", default=None)
@_opt("--derp-port", "DERP (HTTPS) port when not 443; omit for 443.", type=int, default=None)
@_opt("--stun-port", "STUN (UDP) port when not 3478; omit for 3478; -1 = the node has no STUN.", type=int, default=None)
@_opt(
    "--cert-name",
    "CertName: the certificate name to expect, or a sha256-raw:<hex> pin of a self-signed certificate.",
    default=None,
)
@_opt(
    "--cert-file",
    "Certificate (PEM) to pin: CertName becomes its sha256-raw pin, as for derpd's self-signed IP certificate "
    "(<certdir>/<ip>.crt).",
    type=click.Path(dir_okay=False),
    default=None,
)
@_opt("--can-port80", "The node answers plain HTTP on port 80 (/generate_204 captive-portal checks).", is_flag=True)
@_opt("--stun-only", "The node only does STUN, no DERP.", is_flag=True)
@_opt(
    "--node",
    "Another node of the region, as comma-separated key=value: hostname=…,name=…,ipv4=…,ipv6=…,derp-port=…,"
    "stun-port=…,cert-name=…,cert-file=…,can-port80,stun-only. Repeatable; --hostname etc. describe the first node.",
    "node_specs",
    multiple=True,
)
@_opt(
    "--format",
    "headscale-yaml for Headscale's derp.paths; tailscale-json for a DERPMap (derp.urls, Tailscale ACL derpMap).",
    "fmt",
    type=click.Choice(MAP_FORMATS),
    default=MAP_FORMATS[0],
)
@_opt(
    "--merge",
    "Existing map (JSON or Headscale YAML) to add this region to, replacing a region with the same id; "
    "comments in it are not kept.",
    type=click.Path(dir_okay=False),
    default=None,
)
def derpmap(**o: Any) -> None:
    """Print a ready-to-use DERP map for this node (Headscale YAML or Tailscale JSON)."""
    import derpd.tools.derpmap as dm  # noqa: PLC0415 (weight: see MAP_FORMATS)

    first = dm.NodeSpec(
        hostname=o["hostname"],
        name=o["node_name"],
        ipv4=o["ipv4"],
        ipv6=o["ipv6"],
        derp_port=o["derp_port"],
        stun_port=o["stun_port"],
        cert_name=o["cert_name"],
        cert_file=o["cert_file"],
        can_port80=o["can_port80"],
        stun_only=o["stun_only"],
    )
    try:
        specs = [first] if o["hostname"] is not None or not o["node_specs"] else []
        if not specs:
            stray = [
                f for f in ("node_name", "ipv4", "ipv6", "derp_port", "stun_port", "cert_name", "cert_file") if o[f]
            ]
            stray += [f for f in ("can_port80", "stun_only") if o[f]]
            if stray:
                flag = "--" + stray[0].replace("_", "-")
                raise dm.DerpMapError(f"{flag} describes the first node, which needs --hostname")
        specs += [dm.parse_node_spec(text) for text in o["node_specs"]]
        region, warnings = dm.build_region(o["region_id"], o["region_code"], o["region_name"], specs)
        result = dm.DerpMap(regions={region.region_id: region})
        if o["merge"]:
            base, problems = dm.load(o["merge"])
            old = [p for p in problems if not p.startswith(f"region {region.region_id}")]
            warnings += [f"{o['merge']}: {p}" for p in old]
            result = dm.merge(base, region)
            clash = [p for p in dm.check_map(result) if "already used" in p]
            if clash:
                raise dm.DerpMapError(f"after merging into {o['merge']}: {clash[0]}")
        text = dm.render(result, o["fmt"])  # may refuse what no reader can take back (a lone surrogate)
    except dm.DerpMapError as e:
        raise _bad_value(str(e)) from None
    for w in warnings:
        _warn(w)
    click.echo(text, nl=False)


# --- derpd probe -----------------------------------------------------------------------------------


@click.command("probe", context_settings=CONTEXT)
@click.argument("url", required=False)
@_opt("--derp-map", "DERP map to probe: a file or http(s) URL, Tailscale JSON or Headscale YAML.", default=None)
@_opt("--region", "Only this region of --derp-map (id or region code).", default=None)
@_opt(
    "--cert-name",
    "Expected certificate: a sha256-raw:<hex> pin or a name; overrides the map's CertName.",
    default=None,
)
@_opt("--insecure", "Skip certificate verification (a pin is still compared and reported, not enforced).", is_flag=True)
@_opt("--ca-file", "Trust this CA bundle (PEM) instead of the system's.", type=click.Path(dir_okay=False), default=None)
@_opt("--timeout", "Seconds each network step may take.", type=click.FloatRange(min=0, min_open=True), default=5.0)
@_opt("--count", "Pings and relayed packets per node.", type=click.IntRange(1, 10000), default=10)
@_opt("--json", "Print the report as JSON (for monitoring) instead of a table.", "as_json", is_flag=True)
@_opt(
    "--stun-port",
    "STUN port for a URL probe (a map gives its own); -1 skips STUN.",
    type=click.IntRange(-1, 65535),
    default=None,
)
@_opt(
    "--can-port80", "For a URL probe: also check http://HOST/generate_204 (a map says so with CanPort80).", is_flag=True
)
@_opt(
    "--http-port",
    "Port of the /generate_204 check (80 unless forwarded elsewhere).",
    type=click.IntRange(1, 65535),
    default=80,
)
@_opt(
    "--mesh-psk-file",
    "Log in with the region's mesh key, so a relay with admission control (--verify-client-url, "
    "--allow-keys) admits the probe.",
    type=click.Path(dir_okay=False),
    default=None,
)
def probe(url: str | None, **o: Any) -> None:
    """Check a DERP relay: TLS, DERP login, relaying, STUN, port 80, key consistency.

    URL is https://host[:port]/derp (http:// for a dev server); or probe every node of --derp-map.
    Exits 0 only when every check passed.
    """
    from derpd.tools.derpmap import DerpMapError  # noqa: PLC0415 (weight: see MAP_FORMATS)
    from derpd.tools.probe import ProbeOptions, format_table, target_from_url  # noqa: PLC0415

    if (url is None) == (o["derp_map"] is None):
        raise click.UsageError("give either a URL (https://host[:port]/derp) or --derp-map FILE|URL")
    if o["derp_map"] is not None:
        # Only a command-line flag is a mistake here: DERPD_STUN_PORT may be set for `derpd serve`.
        ctx = click.get_current_context()
        given = [f"--{n.replace('_', '-')}" for n in ("stun_port", "can_port80") if _from_command_line(ctx, n)]
        if given:
            raise click.UsageError(f"{given[0]} is for a URL probe; a DERP map says it per node")
    if url is not None and o["region"] is not None:
        raise click.UsageError("--region only applies with --derp-map")
    mesh_key = None
    if o["mesh_psk_file"]:
        try:
            mesh_key = load_mesh_key_file(o["mesh_psk_file"])
        except InvalidKeyError as e:
            raise _bad_value(str(e)) from None
    if o["cert_name"] and o["cert_name"].startswith(PIN_PREFIX):
        try:
            pinned_context(o["cert_name"])  # only to check the pin's form before any network
        except CertError as e:
            raise _bad_value(f"--cert-name: {e}") from None
    opts = ProbeOptions(
        timeout=o["timeout"],
        count=o["count"],
        insecure=o["insecure"],
        ca_file=o["ca_file"],
        cert_name=o["cert_name"],
        http_port=o["http_port"],
        mesh_key=mesh_key,
    )
    if url is not None:
        try:
            target_from_url(url)
        except ValueError as e:
            raise _bad_value(str(e)) from None
    try:
        report = trio.run(_run_probe, url, o, opts)
    except DerpMapError as e:
        raise _bad_value(str(e)) from None
    if o["as_json"]:
        click.echo(json.dumps(report.to_json(), indent=2, ensure_ascii=False))
    else:
        click.echo(format_table(report), nl=False)
    for line in report.failures():
        click.echo(f"derpd: probe failed: {line}", err=True)
    sys.stdout.flush()
    if not report.ok:
        click.get_current_context().exit(1)


def _from_command_line(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE


async def _run_probe(url: str | None, o: dict[str, Any], opts: ProbeOptions) -> ProbeReport:
    import derpd.tools.derpmap as dm  # noqa: PLC0415 (weight: see MAP_FORMATS)
    from derpd.tools.probe import load_map, probe_map, probe_url  # noqa: PLC0415

    if url is not None:
        stun_port = o["stun_port"] if o["stun_port"] is not None else dm.DEFAULT_STUN_PORT
        return await probe_url(url, opts, stun_port=stun_port, can_port80=o["can_port80"])
    loaded = None
    with trio.move_on_after(opts.timeout):
        loaded = await load_map(o["derp_map"])
    if loaded is None:
        raise dm.DerpMapError(f"{o['derp_map']}: no answer within {opts.timeout:g} s")
    m, problems = loaded
    return await probe_map(m, opts, region=o["region"], source=o["derp_map"], problems=problems)


__all__ = ["derpmap", "probe"]


cli.add_command(derpmap)
cli.add_command(probe)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: click without its multi-line usage dump on errors."""
    try:
        code = cli.main(args=argv, prog_name="derpd", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as e:
        click.echo(e.format_message(), err=True)
        sys.exit(2)
    except ConfigurationError as e:
        click.echo(f"derpd: error: {e}", err=True)
        sys.exit(2)
    except click.UsageError as e:
        hint = ""
        if e.ctx is not None and not isinstance(e, ConfigError):
            hint = f" (see '{e.ctx.command_path} --help')"
        click.echo(f"derpd: error: {e.format_message()}{hint}", err=True)
        sys.exit(2)
    except click.ClickException as e:
        click.echo(f"derpd: error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except click.Abort:
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
