"""Typed settings: from ``derpd serve``'s options (flags, ``DERPD_*`` variables, a TOML file) to what
the node runs with, checked before anything starts.

``derpd.cli`` turns the command line into a ``ServeOptions`` (click does flags and environment, and
reads the ``--config`` file through ``read_config_file``); ``build`` checks every value and reads
every file it names, and returns a ``Config``. Anything unusable raises a
``derpd.base.errors.ConfigurationError`` naming the setting, which the command prints as one
``derpd: error:`` line with exit status 2. ``build(dry_run=True)`` (``derpd check-config``) creates
nothing: a key file or self-signed certificate that would be created is only noted.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from derpd.base.errors import ConfigurationError
from derpd.base.files import is_empty_file
from derpd.net.addr import AddressError, ip_or_none, parse_hostport
from derpd.net.tls import CertStore
from derpd.ops.keyfiles import KeyFileOrigin, load_mesh_key_file, load_or_create_key_file
from derpd.ops.metrics import parse_metrics_addr
from derpd.ops.workers import worker_count
from derpd.proto.keys import NodePrivate, parse_mesh_key, public_key_text
from derpd.proto.proxyproto import parse_trusted
from derpd.server.admission import Admission
from derpd.server.challenges import ChallengeBook
from derpd.server.limits import RateConfig
from derpd.server.mesh import parse_targets
from derpd.server.node import ServerSettings
from derpd.server.relay import RelayConfig

if TYPE_CHECKING:
    from derpd.ops.acme import CertManager

DEV_ADDR = "127.0.0.1:3340"
DEV_KEY_FILE = ".derpd/derper.key"
DEFAULT_ADDR = ":3340"
ROOT_KEY_FILE = "/var/lib/derpd/derper.key"
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")


def parse_duration(value: str | float) -> float:
    """Go-style durations as derper takes them (``2s``, ``500ms``, ``10m``, ``1h30m``), in seconds; a
    bare number is seconds. Raises ValueError (the caller names the setting)."""
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            parts = _DURATION_PART.findall(text)
            if not parts or "".join(n + u for n, u in parts) != text:
                raise ValueError(f"{value!r} is not a duration like 2s, 500ms, 10m or 1h") from None
            seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    if seconds < 0 or math.isnan(seconds):
        raise ValueError(f"{value!r} is negative")
    return seconds


def read_config_file(path: str) -> dict[str, Any]:
    """``--config FILE``: its TOML keys (``_`` read as ``-``, so ``stun_port`` is ``stun-port``) and
    values, as TOML typed them. Which keys exist and what type each takes is the command's business."""
    import tomllib  # noqa: PLC0415 (weight: ~0.1 MB of RSS that a node without --config never needs)

    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise ConfigurationError(f"cannot read config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigurationError(f"config file {path}: {e}") from None
    out: dict[str, Any] = {}
    for raw_key, item in doc.items():
        key = raw_key.replace("_", "-")
        if key in out:
            raise ConfigurationError(f"config file {path}: key {raw_key!r} given twice")
        out[key] = item
    return out


@dataclass(frozen=True)
class ServeOptions:
    """``derpd serve``'s options, one field per flag (``--stun-port`` is ``stun_port``), already
    converted by the command line (durations in seconds, ports as ints)."""

    addr: str | None = None
    stun_port: int = 3478
    stun_host: str | None = None
    stun_generic: bool = True
    key_file: str | None = None
    dev: bool = False
    mesh_psk_file: str | None = None
    mesh_with: str = ""
    home: str = ""
    certmode: str = ""
    certdir: str | None = None
    hostname: str = ""
    http_port: int | None = None
    acme_directory: str = "letsencrypt"
    acme_email: str = ""
    acme_eab_kid: str = ""
    acme_eab_key: str = ""
    acme_ca_file: str | None = None
    acme_challenge: str = "auto"
    verify_client_url: str | None = None
    verify_client_url_fail_open: bool = True
    verify_cache_ttl: float = 30.0
    allow_keys: str | None = None
    accept_connection_limit: float = math.inf
    accept_connection_burst: int = 0
    max_conns_per_ip: int = 0
    rate_config: str | None = None
    tcp_keepalive_time: float = 600.0
    tcp_user_timeout: float = 15.0
    tcp_write_timeout: float = 2.0
    proxy_protocol: bool = False
    trusted_proxies: str = ""
    workers: str = "1"
    metrics_addr: str = "127.0.0.1:9464"
    shutdown_timeout: float = 5.0
    restart_reconnect_in: float = 1.0
    restart_try_for: float = 30.0
    log_format: str = "text"
    log_level: str = "info"


@dataclass(frozen=True)
class Note:
    """Something the start-up log (or ``check-config``) should say: a created key, the pin to publish."""

    level: int
    event: str
    fields: dict[str, Any]


@dataclass
class Config:
    """Everything ``derpd serve`` runs with."""

    key: NodePrivate
    settings: ServerSettings
    metrics_addr: tuple[str, int] | None
    workers: int
    log_level: str
    log_format: str
    notes: list[Note] = field(default_factory=list)
    acme: CertManager | None = None  # --certmode letsencrypt


def default_key_file() -> str | None:
    """Where the key lives without ``--key-file``: systemd's StateDirectory, else /var/lib/derpd as root."""
    state = os.environ.get("STATE_DIRECTORY")  # systemd StateDirectory=
    if state:
        return str(Path(state.split(":")[0]) / "derper.key")
    if os.geteuid() == 0:
        return ROOT_KEY_FILE
    return None


def build(o: ServeOptions, *, dry_run: bool = False) -> Config:
    """Check every option and read every file before anything starts; ConfigurationError otherwise."""
    notes: list[Note] = []
    workers = worker_count(o.workers)
    try:
        host, port = parse_hostport(o.addr or (DEV_ADDR if o.dev else DEFAULT_ADDR))
    except AddressError as e:
        raise ConfigurationError(f"--addr: {e}") from None
    if o.dev and o.addr is None:
        host = "127.0.0.1"
    try:
        metrics_addr = parse_metrics_addr(o.metrics_addr)
    except AddressError as e:
        raise ConfigurationError(f"--metrics-addr: {e}") from None
    if o.home and o.home != "blank" and not o.home.startswith(("http://", "https://")):
        raise ConfigurationError("--home must be empty, 'blank', or an http:// or https:// URL")

    key_path = o.key_file or (DEV_KEY_FILE if o.dev else default_key_file())
    if key_path is None:
        raise ConfigurationError("--key-file is required when not running as root, under systemd, or with --dev")
    key = _node_key(key_path, notes, dry_run=dry_run)
    mesh_key = None
    if o.mesh_psk_file:
        mesh_key = load_mesh_key_file(o.mesh_psk_file)
    elif o.dev and os.environ.get("TAILSCALE_DERPER_MESH_KEY"):
        mesh_key = parse_mesh_key(os.environ["TAILSCALE_DERPER_MESH_KEY"])

    stun_host = o.stun_host
    if stun_host is not None:
        stun_host = stun_host.strip("[]")
        stun_host = "" if stun_host in ("*", "::") else stun_host

    hostname = o.hostname.strip()
    acme: CertManager | None = None
    if o.certmode in ("letsencrypt", "acme"):
        http_port = o.http_port if o.http_port is not None else 80
        acme = _acme(o, hostname, key, key_path, http_port, notes, shared_challenges=workers > 1)
        tls: CertStore | None = acme.store
    else:
        tls = _cert_store(o, hostname, key, key_path, notes, dry_run=dry_run)
        http_port = o.http_port if o.http_port is not None else (80 if tls is not None else -1)
    mesh_with = parse_targets(o.mesh_with, tls=tls is not None, default_port=port)
    if mesh_with and mesh_key is None:
        raise ConfigurationError("--mesh-with needs the region's mesh key (--mesh-psk-file)")

    admission = Admission(
        verify_url=o.verify_client_url or None,
        fail_open=o.verify_client_url_fail_open,
        cache_ttl=o.verify_cache_ttl,
        allow_keys_file=o.allow_keys,
    )
    admission.load()
    if admission.enabled:
        notes.append(Note(logging.INFO, "admission", admission.summary()))
    rate = RateConfig.load(o.rate_config) if o.rate_config else RateConfig()
    try:
        trusted = parse_trusted(o.trusted_proxies)
    except ValueError as e:
        raise ConfigurationError(f"--trusted-proxies: {e}") from None
    if o.proxy_protocol and not trusted:
        raise ConfigurationError("--proxy-protocol needs --trusted-proxies (the proxies' addresses)")

    settings = ServerSettings(
        addr=(host, port),
        stun_port=o.stun_port,
        stun_host=stun_host,
        stun_generic=o.stun_generic,
        home=o.home,
        mesh_key=mesh_key,
        relay=RelayConfig(write_timeout=o.tcp_write_timeout, rate=rate),
        tls=tls,
        hostname=hostname,
        http_port=http_port,
        accept_limit=o.accept_connection_limit,
        accept_burst=o.accept_connection_burst,
        max_conns_per_ip=o.max_conns_per_ip,
        proxy_protocol=o.proxy_protocol,
        trusted_proxies=trusted,
        tcp_keepalive=o.tcp_keepalive_time,
        tcp_user_timeout=o.tcp_user_timeout,
        admission=admission if admission.enabled else None,
        challenges=acme.book if acme is not None else None,
        rate_config_path=o.rate_config,
        mesh_with=mesh_with,
        shutdown_timeout=o.shutdown_timeout,
        restart_reconnect_in=o.restart_reconnect_in,
        restart_try_for=o.restart_try_for,
    )
    return Config(key, settings, metrics_addr, workers, o.log_level, o.log_format, notes, acme)


def _node_key(path: str, notes: list[Note], *, dry_run: bool) -> NodePrivate:
    if dry_run and (not Path(path).exists() or is_empty_file(path)):
        notes.append(Note(logging.INFO, "key_will_be_created", {"path": path}))
        return NodePrivate.generate()
    key, origin = load_or_create_key_file(path)
    if origin is KeyFileOrigin.CREATED:
        notes.append(Note(logging.INFO, "key_created", {"path": path, "public_key": public_key_text(key.public)}))
    elif origin is KeyFileOrigin.REPLACED_EMPTY:
        why = "a 0-byte key file (an interrupted write) holds no key; a new one was written"
        fields = {"path": path, "public_key": public_key_text(key.public), "why": why}
        notes.append(Note(logging.WARNING, "key_file_empty_replaced", fields))
    return key


_DNS_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


def check_certificate_name(hostname: str) -> str:
    """The name to ask a CA for: an IP address, or a DNS name of LDH labels (RFC 1123), lower-cased."""
    if not hostname:
        raise ConfigurationError("--certmode letsencrypt needs --hostname (the DNS name or IP address clients dial)")
    ip = ip_or_none(hostname)
    if ip is not None:
        return str(ip)
    name = hostname.lower().removesuffix(".")
    labels = name.split(".")
    if len(name) > 253 or len(labels) < 2 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise ConfigurationError(
            f"--hostname {hostname!r} is neither an IP address nor a DNS name a CA can issue for "
            "(dot-separated labels of letters, digits and inner hyphens, each at most 63 characters)"
        )
    return name


def _acme(
    o: ServeOptions,
    hostname: str,
    key: NodePrivate,
    key_path: str,
    http_port: int,
    notes: list[Note],
    *,
    shared_challenges: bool,
) -> CertManager:
    # Imported here, not at the top: the acme library and requests cost every other mode ~9 MB of RSS
    # and ~0.2 s of start-up (tests/test_layers.py lists this as the one deliberate lazy import).
    from derpd.net.acme import AcmeSettings, directory_url  # noqa: PLC0415 (weight, see above)
    from derpd.ops.acme import CHALLENGE_CHOICES, AcmeConfig, CertManager, bundle_name  # noqa: PLC0415

    name = check_certificate_name(hostname)
    if o.acme_challenge not in CHALLENGE_CHOICES:
        raise ConfigurationError("--acme-challenge must be auto, tls-alpn-01 or http-01")
    if o.acme_challenge == "http-01" and http_port < 0:
        raise ConfigurationError("--acme-challenge http-01 needs the port-80 listener (--http-port)")
    if bool(o.acme_eab_kid) != bool(o.acme_eab_key):
        raise ConfigurationError("--acme-eab-kid and --acme-eab-key go together")
    if o.acme_eab_key and not re.fullmatch(r"[A-Za-z0-9_-]+={0,2}", o.acme_eab_key):
        raise ConfigurationError("--acme-eab-key must be the base64url HMAC key the CA gave")
    directory = directory_url(o.acme_directory)
    if not directory.startswith("https://"):
        raise ConfigurationError(f"--acme-directory must be an https:// URL or 'staging', not {o.acme_directory!r}")
    if o.acme_ca_file is not None and not Path(o.acme_ca_file).is_file():
        raise ConfigurationError(f"--acme-ca-file {o.acme_ca_file}: no such file")
    certdir = Path(o.certdir or Path(key_path).resolve().parent / "certs")
    settings = AcmeSettings(
        directory=directory,
        email=o.acme_email.strip(),
        eab_kid=o.acme_eab_kid.strip(),
        eab_key=o.acme_eab_key.strip(),
        ca_file=o.acme_ca_file,
    )
    config = AcmeConfig(name, certdir, settings, challenge=o.acme_challenge, http01=http_port >= 0)
    store = CertStore(certdir, name, key.public, bundle=bundle_name(name))
    # --workers: the supervisor orders, every worker answers the CA, through files in the cert dir.
    book = ChallengeBook(certdir / "acme-challenges" if shared_challenges else None)
    manager = CertManager(config, store, book)
    # The cert dir, the account key and a cached certificate are read by ``CertManager.prepare``, which
    # ``derpd serve`` calls once logging is set up (it logs what it finds); check-config only notes them.
    notes.append(Note(logging.INFO, "acme", {"hostname": name, "directory": directory, "certdir": str(certdir)}))
    return manager


def _cert_store(
    o: ServeOptions, hostname: str, key: NodePrivate, key_path: str, notes: list[Note], *, dry_run: bool
) -> CertStore | None:
    if o.certmode != "manual":
        if o.certdir:
            raise ConfigurationError("--certdir only applies with --certmode manual or letsencrypt")
        return None
    if not hostname:
        raise ConfigurationError("--certmode manual needs --hostname (the certificate's name or IP address)")
    certdir = o.certdir or str(Path(key_path).resolve().parent / "certs")
    tls = CertStore(certdir, hostname, key.public)
    if dry_run and tls.ip is not None and (not tls.cert_path.exists() or is_empty_file(tls.cert_path)):
        notes.append(Note(logging.INFO, "self_signed_certificate_will_be_created", {"certdir": certdir}))
        return tls
    tls.load()
    if tls.generated or tls.pin:
        notes.append(Note(logging.INFO, "self_signed_certificate", {"certdir": certdir, "cert_name": tls.pin}))
        notes.append(Note(logging.INFO, "derp_node", {"json": json.dumps(tls.derp_node(), separators=(",", ":"))}))
    return tls
