"""DERP maps: Tailscale's ``tailcfg.DERPMap`` as data, its JSON, Headscale's YAML, and their pitfalls.

One model (:class:`DerpMap` / :class:`DerpRegion` / :class:`DerpNode`, field for field the Go structs)
with two encodings:

* Tailscale JSON: Go field names, ``omitempty`` where tailcfg has it (``derpmap.go``);
* Headscale YAML: the same fields under yaml.v3's default names, the Go name lower-cased
  (``regionid``, ``hostname``, ``stunport`` ...), as ``derp.paths`` files are read.

Reading is strict where the Go decoders are (a quoted ``"443"`` for an int is an error in both) and
louder than them where they are silent: a key they would ignore (``RegionID`` in YAML, a typo) is
reported as a problem, because an ignored ``regionid`` is exactly the node-without-RegionID mistake
that breaks clients (tailscale#9526). YAML syntax itself (the block-style subset DERP maps use, read
and written scalar by scalar as yaml.v3 does) is :mod:`derpd.tools.blockyaml`; this module decides
what the keys and values mean, and lays out the document it writes.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from derpd import __version__
from derpd.base.errors import ConfigurationError
from derpd.base.text import clip
from derpd.net.addr import is_ip
from derpd.net.tls import PIN_PREFIX, PIN_RE, CertError, cert_name_pin, verify_hostname
from derpd.proto import gojson
from derpd.proto.gojson import INT64_MAX, INT64_MIN
from derpd.tools import blockyaml

DEFAULT_STUN_PORT = 3478  # what STUNPort 0 means
DEFAULT_DERP_PORT = 443  # what DERPPort 0 means
CUSTOM_REGION_IDS = range(900, 1000)  # tailcfg: reserved for users' own DERP nodes
MAX_REGION_ID = 999
HEADSCALE_EMBEDDED_REGION_ID = 999  # headscale's derp.server.region_id default
HEADSCALE_YAML = "headscale-yaml"
TAILSCALE_JSON = "tailscale-json"
FORMATS = (HEADSCALE_YAML, TAILSCALE_JSON)

_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")
# What the operator may type around a value: ASCII white space only. str.strip() would also eat
# U+0085, U+001C-U+001F and U+2028, which are then silently gone instead of refused.
_SPACE = " \t\r\n"


class DerpMapError(ConfigurationError, ValueError):
    """A map that cannot be built or read; the message is one line for the operator."""


# --- the model -------------------------------------------------------------------------------------


@dataclass
class DerpNode:
    """``tailcfg.DERPNode``. Zero values mean what they mean in Go (0 ports are the defaults)."""

    name: str = ""
    region_id: int = 0
    host_name: str = ""
    cert_name: str = ""
    ipv4: str = ""
    ipv6: str = ""
    stun_port: int = 0
    stun_only: bool = False
    derp_port: int = 0
    insecure_for_tests: bool = False
    stun_test_ip: str = ""
    can_port80: bool = False

    @property
    def effective_derp_port(self) -> int:
        return self.derp_port or DEFAULT_DERP_PORT

    @property
    def effective_stun_port(self) -> int:
        """The UDP port clients STUN; -1 when STUN is off for this node."""
        return -1 if self.stun_port < 0 else self.stun_port or DEFAULT_STUN_PORT


@dataclass
class DerpRegion:
    """``tailcfg.DERPRegion``."""

    region_id: int = 0
    region_code: str = ""
    region_name: str = ""
    latitude: float = 0.0
    longitude: float = 0.0
    avoid: bool = False
    no_measure_no_home: bool = False
    nodes: list[DerpNode] = field(default_factory=list)


@dataclass
class DerpMap:
    """``tailcfg.DERPMap``. A ``None`` region is an explicit ``null``: Headscale drops that region."""

    regions: dict[int, DerpRegion | None] = field(default_factory=dict)
    omit_default_regions: bool = False
    region_score: dict[int, float] | None = None  # HomeParams.RegionScore

    def live_regions(self) -> list[DerpRegion]:
        return [r for _, r in sorted(self.regions.items()) if r is not None]


@dataclass(frozen=True)
class _Field:
    attr: str
    go: str  # the Go (and JSON) name; yaml.v3 uses go.lower()
    kind: type
    always: bool = False  # no omitempty in tailcfg

    @property
    def yaml(self) -> str:
        return self.go.lower()


# Declaration order of tailcfg/derpmap.go, which is also Go's JSON output order.
NODE_FIELDS = (
    _Field("name", "Name", str, always=True),
    _Field("region_id", "RegionID", int, always=True),
    _Field("host_name", "HostName", str, always=True),
    _Field("cert_name", "CertName", str),
    _Field("ipv4", "IPv4", str),
    _Field("ipv6", "IPv6", str),
    _Field("stun_port", "STUNPort", int),
    _Field("stun_only", "STUNOnly", bool),
    _Field("derp_port", "DERPPort", int),
    _Field("insecure_for_tests", "InsecureForTests", bool),
    _Field("stun_test_ip", "STUNTestIP", str),
    _Field("can_port80", "CanPort80", bool),
)
REGION_FIELDS = (
    _Field("region_id", "RegionID", int, always=True),
    _Field("region_code", "RegionCode", str, always=True),
    _Field("region_name", "RegionName", str, always=True),
    _Field("latitude", "Latitude", float),
    _Field("longitude", "Longitude", float),
    _Field("avoid", "Avoid", bool),
    _Field("no_measure_no_home", "NoMeasureNoHome", bool),
)
# Nodes ([]*DERPNode, no omitempty) follows the region fields; the map has HomeParams, Regions and
# OmitDefaultRegions (JSON name "omitDefaultRegions").


# --- checks ----------------------------------------------------------------------------------------


def _family_problem(value: str, version: int) -> str | None:
    """Why an IPv4/IPv6 field value would be ignored by clients, or None if it is usable."""
    if value in ("", "none"):
        return None
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        return f"{value!r} is not an IP address (use 'none' to disable IPv{version}, or leave it empty for DNS)"
    if ip.version != version:
        other = "ipv6" if version == 4 else "ipv4"
        return f"{value!r} is an IPv{ip.version} address; it belongs in {other}"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return f"{value!r} is an IPv4-mapped address; put {ip.ipv4_mapped} in ipv4"
    return None


def check_map(m: DerpMap) -> list[str]:
    """Everything in ``m`` that will not work as the operator meant; empty when all is well."""
    problems: list[str] = []
    names: dict[str, int] = {}
    if not m.live_regions():
        problems.append("the map has no regions")
    for rid, region in sorted(m.regions.items()):
        if region is None:
            continue
        where = f"region {rid}"
        if rid < 1:
            problems.append(f"{where}: region ids must be positive")
        if region.region_id != rid:
            problems.append(f"{where}: its regionid is {region.region_id}, not the key {rid}")
        if not region.region_code:
            problems.append(f"{where}: no regioncode")
        if not region.nodes:
            problems.append(f"{where}: no nodes")
        for i, node in enumerate(region.nodes):
            label = f"{where} node {node.name or i}"
            if not node.name:
                problems.append(f"{label}: no name")
            elif node.name in names:
                problems.append(f"{label}: name {node.name!r} is already used in region {names[node.name]}")
            else:
                names[node.name] = rid
            if node.region_id == 0:
                problems.append(f"{label}: no regionid; every node needs its region's id (tailscale#9526)")
            elif node.region_id != rid:
                problems.append(f"{label}: regionid {node.region_id} differs from its region's {rid}")
            if not node.host_name:
                problems.append(f"{label}: no hostname")
            for value, version in ((node.ipv4, 4), (node.ipv6, 6)):
                why = _family_problem(value, version)
                if why:
                    problems.append(f"{label}: ipv{version} {why}")
            if not -1 <= node.stun_port <= 65535:
                problems.append(f"{label}: stunport {node.stun_port} is out of range (-1 disables, 0 = 3478)")
            if not 0 <= node.derp_port <= 65535:
                problems.append(f"{label}: derpport {node.derp_port} is out of range (0 = 443)")
            if node.stun_only and node.stun_port < 0:
                problems.append(f"{label}: stunonly with stunport -1 serves nothing")
            if node.stun_only and node.derp_port:
                problems.append(f"{label}: stunonly node has a derpport; clients never use it")
            if node.cert_name.startswith(PIN_PREFIX) and not PIN_RE.fullmatch(node.cert_name):
                problems.append(f"{label}: certname pin must be {PIN_PREFIX} followed by 64 lowercase hex digits")
            if node.insecure_for_tests:
                problems.append(f"{label}: insecurefortests is for Tailscale's unit tests only")
    return problems


# --- building a map for this node (derpd derpmap) --------------------------------------------------


def check_region_id(region_id: int) -> list[str]:
    """Refuse ids outside 1-999; warnings (returned) for ids that collide with someone else's."""
    if not 1 <= region_id <= MAX_REGION_ID:
        raise DerpMapError(
            f"region id {region_id} is out of range: use 900-999, the ids Tailscale reserves for your own regions"
        )
    warnings = []
    if region_id not in CUSTOM_REGION_IDS:
        warnings.append(
            f"region id {region_id} is one of Tailscale's own region ids (1-899): merged with Tailscale's default "
            "map it replaces that region; 900-999 are reserved for your own"
        )
    if region_id == HEADSCALE_EMBEDDED_REGION_ID:
        warnings.append(
            f"region id {region_id} is the default id of Headscale's embedded DERP (derp.server.region_id), "
            "which overrides a map region with the same id when enabled"
        )
    return warnings


def check_region_code(code: str) -> str:
    code = check_text("--region-code", code.strip(_SPACE))
    if not code:
        raise DerpMapError("--region-code is empty: give a short code such as 'fra' or 'home'")
    if any(c.isspace() for c in code):
        raise DerpMapError(
            f"--region-code {code!r} has spaces: it is a short code such as 'fra'; use --region-name for the long name"
        )
    return code


def text_problem(value: str) -> str | None:
    """What makes ``value`` unfit for any text field of a DERP map, or None.

    Refused everywhere: controls (C0, DEL, C1 with NEL), the line and paragraph separators, the byte
    order mark, noncharacters (U+FFFE, U+FFFF, U+FDD0-U+FDEF, ...) and lone surrogates. None of them
    is part of a name people read; yaml.v3 refuses most of them raw in a file and folds NEL into a
    space, and a lone surrogate is not a character at all (Go's decoders turn it into U+FFFD; yaml.v3
    refuses even its escape). Other format characters (ZWJ in emoji, direction marks) are allowed
    in names: the writer escapes them, and they read back unchanged.
    """
    for c in value:
        n = ord(c)
        category = unicodedata.category(c)
        if category == "Cs":
            return f"U+{n:04X}, half of a UTF-16 surrogate pair: not a character (is the input UTF-8?)"
        if category == "Cc":
            return f"the control character U+{n:04X}"
        if category in ("Zl", "Zp"):
            return f"the line separator U+{n:04X}"
        if n == 0xFEFF:
            return "U+FEFF, a byte order mark"
        if 0xFDD0 <= n <= 0xFDEF or n & 0xFFFE == 0xFFFE:
            return f"the noncharacter U+{n:04X}"
    return None


def check_text(what: str, value: str) -> str:
    problem = text_problem(value)
    if problem:
        raise DerpMapError(f"{what} {value!r} contains {problem}")
    return value


def check_cert_name(value: str) -> str:
    """--cert-name: the TLS name clients verify (a DNS name, in its ASCII form) or a sha256-raw pin.

    Stricter than the free-text fields: a certificate name is ASCII (IDNA ``xn--`` labels), and any
    other character can only make every client's TLS check fail.
    """
    name = check_text("--cert-name", value.strip(_SPACE))
    if not name.isascii() or any(c.isspace() for c in name):
        raise DerpMapError(
            f"--cert-name {name!r}: a certificate name is a DNS name or IP address in ASCII, without spaces "
            f"(internationalized names as xn--...), or a {PIN_PREFIX} pin"
        )
    if name.startswith(PIN_PREFIX) and not PIN_RE.fullmatch(name):
        raise DerpMapError(f"--cert-name pin must be {PIN_PREFIX} followed by 64 lowercase hex digits")
    return name


def check_hostname(host: str) -> str:
    """The DERP host: a DNS name or an IP literal, never a URL or host:port."""
    host = host.strip(_SPACE)
    if not host:
        raise DerpMapError("missing --hostname: the DNS name (or IP address) clients dial for this node")
    if "://" in host or "/" in host:
        raise DerpMapError(f"--hostname {host!r} looks like a URL: give only the host name, e.g. derp.example.com")
    if host.startswith("["):
        raise DerpMapError(f"--hostname {host!r}: write IPv6 addresses without brackets")
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    if host.count(":") == 1:
        raise DerpMapError(f"--hostname {host!r} has a port: give the port with --derp-port")
    name = host.removesuffix(".")
    if len(name) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in name.split(".")):
        raise DerpMapError(f"--hostname {host!r} is not a valid DNS name or IP address")
    return host


def check_family(option: str, value: str | None, version: int) -> str:
    """An --ipv4/--ipv6 value: a literal of that family, 'none', or empty (DNS)."""
    if value is None:
        return ""
    value = value.strip(_SPACE)
    if value.lower() == "none":
        return "none"
    why = _family_problem(value, version)
    if why:
        raise DerpMapError(f"{option} {why}")
    ip = ipaddress.ip_address(value)
    if ip.version == 6 and "%" in value:
        raise DerpMapError(f"{option} {value!r} has a zone; clients elsewhere cannot use it")
    return str(ip)


def check_port(option: str, value: int | None, default: int, *, allow_off: bool = False) -> int:
    """A port for the map; None (option omitted) is 0, the default. 0 itself is refused: it reads as 'any'."""
    if value is None:
        return 0
    if value == 0:
        raise DerpMapError(
            f"{option} 0: in a DERP map 0 means the default port {default}; omit {option} for that, or give the port"
        )
    if allow_off and value == -1:
        return -1
    if not 1 <= value <= 65535:
        extra = " (or -1 to disable STUN)" if allow_off else ""
        raise DerpMapError(f"{option} {value} is out of range: 1-65535{extra}")
    return value


def pin_from_cert_file(path: str | Path, hostname: str, *, now: datetime | None = None) -> tuple[str, list[str]]:
    """The ``sha256-raw:`` CertName for the leaf in a PEM (or DER) file, and warnings about pinning it.

    Refuses a certificate that does not cover ``hostname`` (clients check that too) or has expired.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DerpMapError(f"--cert-file {path}: {e.strerror or e}") from None
    try:
        certs = (
            x509.load_pem_x509_certificates(data) if b"-----BEGIN" in data else [x509.load_der_x509_certificate(data)]
        )
    except ValueError:
        raise DerpMapError(f"--cert-file {path}: not a PEM or DER certificate") from None
    leaf = certs[0]
    try:
        verify_hostname(leaf, hostname)
    except CertError as e:
        raise DerpMapError(f"--cert-file {path}: {e}") from None
    t = now or datetime.now(UTC)
    if t > leaf.not_valid_after_utc:
        raise DerpMapError(f"--cert-file {path}: the certificate expired {leaf.not_valid_after_utc:%Y-%m-%d}")
    warnings = []
    if leaf.issuer != leaf.subject or len(certs) > 1:
        warnings.append(
            "--cert-file is CA-issued: a pin stops working at the next renewal; CA certificates need no CertName"
        )
    return cert_name_pin(leaf.public_bytes(Encoding.DER)), warnings


@dataclass
class NodeSpec:
    """One node as the operator describes it on the command line (None = option not given)."""

    hostname: str | None = None
    name: str | None = None
    ipv4: str | None = None
    ipv6: str | None = None
    derp_port: int | None = None
    stun_port: int | None = None
    cert_name: str | None = None
    cert_file: str | None = None
    can_port80: bool = False
    stun_only: bool = False


NODE_SPEC_KEYS = (
    "hostname",
    "name",
    "ipv4",
    "ipv6",
    "derp-port",
    "stun-port",
    "cert-name",
    "cert-file",
    "can-port80",
    "stun-only",
)


def parse_node_spec(text: str) -> NodeSpec:
    """``hostname=derp2.example.com,ipv4=198.51.100.2,derp-port=8443,can-port80`` as a NodeSpec."""
    spec = NodeSpec()
    for raw in text.split(","):
        part = raw.strip(_SPACE)
        if not part:
            continue
        key, sep, value = part.partition("=")
        key = key.strip(_SPACE).lower().replace("_", "-")
        if key not in NODE_SPEC_KEYS:
            raise DerpMapError(f"--node {text!r}: unknown key {key!r} (known: {', '.join(NODE_SPEC_KEYS)})")
        if key in ("can-port80", "stun-only"):
            if sep and value.strip(_SPACE).lower() not in ("true", "1", "yes"):
                raise DerpMapError(f"--node {text!r}: {key} is a flag; write it without a value")
            setattr(spec, key.replace("-", "_"), True)
            continue
        if not sep:
            raise DerpMapError(f"--node {text!r}: {key} needs a value ({key}=...)")
        value = value.strip(_SPACE)
        if key in ("derp-port", "stun-port"):
            try:
                setattr(spec, key.replace("-", "_"), int(value))
            except ValueError:
                raise DerpMapError(f"--node {text!r}: {key} {value!r} is not a number") from None
        else:
            setattr(spec, key.replace("-", "_"), value)
    return spec


def build_node(spec: NodeSpec, region_id: int, default_name: str) -> tuple[DerpNode, list[str]]:
    """A DerpNode from a NodeSpec, refusing what clients would choke on; returns warnings too."""
    warnings: list[str] = []
    host = check_hostname(spec.hostname or "")
    name = check_text("node name", (spec.name or default_name).strip(_SPACE))
    if not name or any(c.isspace() for c in name):
        raise DerpMapError(f"node name {name!r} must be a non-empty word such as '{region_id}a'")
    ipv4 = check_family("--ipv4", spec.ipv4, 4)
    ipv6 = check_family("--ipv6", spec.ipv6, 6)
    if ipv4 == "none" and ipv6 == "none":
        raise DerpMapError("--ipv4 none and --ipv6 none leave clients no way to reach the node")
    for value in (ipv4, ipv6):
        if value and value != "none":
            ip = ipaddress.ip_address(value)
            if ip.is_loopback or ip.is_unspecified or ip.is_link_local:
                warnings.append(f"{value} is a loopback/unspecified/link-local address: other machines cannot use it")
    derp_port = check_port("--derp-port", spec.derp_port, DEFAULT_DERP_PORT)
    stun_port = check_port("--stun-port", spec.stun_port, DEFAULT_STUN_PORT, allow_off=True)
    if spec.cert_name and spec.cert_file:
        raise DerpMapError("give --cert-name or --cert-file, not both")
    cert_name = check_cert_name(spec.cert_name or "")
    if spec.cert_file:
        cert_name, more = pin_from_cert_file(spec.cert_file, host)
        warnings += more
    if spec.stun_only:
        if spec.derp_port is not None:
            raise DerpMapError("--stun-only with --derp-port: a STUN-only node serves no DERP; drop one of them")
        if stun_port == -1:
            raise DerpMapError("--stun-only with --stun-port -1 leaves the node serving nothing")
        if spec.can_port80:
            raise DerpMapError("--stun-only with --can-port80: port 80 is only checked on DERP nodes")
        if cert_name:
            raise DerpMapError("--stun-only with a certificate: STUN-only nodes speak no TLS")
    elif not cert_name and is_ip(host):
        warnings.append(
            f"hostname {host} is an IP address: unless its certificate is CA-issued for that IP, pin it with "
            "--cert-file (derpd's self-signed IP certificate is <certdir>/<ip>.crt)"
        )
    node = DerpNode(
        name=name,
        region_id=region_id,
        host_name=host,
        cert_name=cert_name,
        ipv4=ipv4,
        ipv6=ipv6,
        stun_port=stun_port,
        stun_only=spec.stun_only,
        derp_port=derp_port,
        can_port80=spec.can_port80,
    )
    return node, warnings



def build_region(
    region_id: int, region_code: str, region_name: str | None, specs: list[NodeSpec]
) -> tuple[DerpRegion, list[str]]:
    """A region with one node per spec (names default to 900a, 900b, ...), refusing duplicate names."""
    warnings = check_region_id(region_id)
    code = check_region_code(region_code)
    name = check_text("--region-name", (region_name or "").strip(_SPACE) or code)
    if not specs:
        raise DerpMapError("missing --hostname: the DNS name (or IP address) clients dial for this node")
    nodes: list[DerpNode] = []
    seen: set[str] = set()
    for i, spec in enumerate(specs):
        default = f"{region_id}{_suffix(i)}"
        node, more = build_node(spec, region_id, default)
        if node.name in seen:
            raise DerpMapError(f"duplicate node name {node.name!r}: every node needs its own name")
        seen.add(node.name)
        nodes.append(node)
        warnings += more
    return DerpRegion(region_id=region_id, region_code=code, region_name=name, nodes=nodes), warnings


def _suffix(i: int) -> str:
    """a, b, ..., z, aa, ab, ... (Tailscale names nodes 1a, 1b, ...)."""
    out = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        out = chr(ord("a") + r) + out
    return out


def merge(base: DerpMap, region: DerpRegion) -> DerpMap:
    """``base`` with ``region`` added or replacing the same id (Headscale's own merge rule)."""
    regions = dict(base.regions)
    regions[region.region_id] = region
    return DerpMap(regions=regions, omit_default_regions=base.omit_default_regions, region_score=base.region_score)


# --- Tailscale JSON ------------------------------------------------------------------------------


def _omitted(value: Any) -> bool:
    return value in ("", 0, False) or value == 0.0


def _struct_json(obj: Any, fields: Iterable[_Field]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields:
        value = getattr(obj, f.attr)
        if f.always or not _omitted(value):
            out[f.go] = value
    return out


def to_json_obj(m: DerpMap) -> dict[str, Any]:
    """The DERPMap as Go's encoding/json writes it (omitempty fields left out when zero)."""
    out: dict[str, Any] = {}
    if m.region_score is not None:
        out["HomeParams"] = {"RegionScore": {str(k): v for k, v in sorted(m.region_score.items())}}
    regions: dict[str, Any] = {}
    for rid, region in sorted(m.regions.items()):
        if region is None:
            regions[str(rid)] = None
            continue
        r = _struct_json(region, REGION_FIELDS)
        r["Nodes"] = [_struct_json(n, NODE_FIELDS) for n in region.nodes]
        regions[str(rid)] = r
    out["Regions"] = regions
    if m.omit_default_regions:
        out["omitDefaultRegions"] = True
    return out


def to_json(m: DerpMap) -> str:
    _check_writable(m)
    return json.dumps(to_json_obj(m), indent=2, ensure_ascii=False) + "\n"


# --- Headscale YAML (writing) ------------------------------------------------------------------------


def _surrogate_problem(value: str) -> str | None:
    for c in value:
        if 0xD800 <= ord(c) <= 0xDFFF:
            return (
                f"{value!r} contains U+{ord(c):04X}, half of a UTF-16 surrogate pair: not a character, and "
                "Headscale's YAML reader (yaml.v3) refuses even its escape"
            )
    return None


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    try:
        return blockyaml.write_float(value) if isinstance(value, float) else blockyaml.write_str(str(value))
    except blockyaml.YamlError as e:  # NaN or an infinity (a surrogate is refused with its field first)
        raise DerpMapError(str(e)) from None


def _written_strings(m: DerpMap) -> Iterator[tuple[str, str]]:
    """(where, value) for every string field of ``m``."""
    for rid, region in sorted(m.regions.items()):
        if region is None:
            continue
        for f in REGION_FIELDS:
            if f.kind is str:
                yield f"region {rid} {f.yaml}", getattr(region, f.attr)
        for i, node in enumerate(region.nodes):
            for f in NODE_FIELDS:
                if f.kind is str:
                    yield f"region {rid} node {node.name or i} {f.yaml}", getattr(node, f.attr)


def _check_writable(m: DerpMap) -> None:
    """Refuse what no encoding can carry to Headscale or Tailscale: lone surrogates (from a --merge
    file's escapes, or command-line bytes that are not UTF-8)."""
    for where, value in _written_strings(m):
        problem = _surrogate_problem(value)
        if problem:
            raise DerpMapError(f"{where}: {problem}")


_PORT_NOTES = {
    "stunport": {0: f"0 = default {DEFAULT_STUN_PORT}", -1: "-1 = no STUN"},
    "derpport": {0: f"0 = default {DEFAULT_DERP_PORT}"},
}
# The node fields written even when zero, as Headscale's derp-example.yaml does; others only when set.
_YAML_NODE_EXPLICIT = {"name", "regionid", "hostname", "stunport", "stunonly", "derpport", "canport80"}


def to_headscale_yaml(m: DerpMap, *, header: bool = True) -> str:
    """Headscale's ``derp.paths`` YAML for ``m`` (lower-cased tailcfg field names, as yaml.v3 reads)."""
    _check_writable(m)
    lines: list[str] = []
    if header:
        lines += [
            f"# Headscale DERP map, written by derpd {__version__} ('derpd derpmap').",
            "# Save it (e.g. /etc/headscale/derp.yaml) and list it under derp.paths in Headscale's config.yaml.",
            f"# Ports: 0 means the default (stunport {DEFAULT_STUN_PORT}, derpport {DEFAULT_DERP_PORT});"
            " stunport -1 disables STUN.",
        ]
    if m.omit_default_regions:
        lines.append("omitdefaultregions: true")
    if m.region_score is not None:
        lines.append("homeparams:")
        lines.append("  regionscore:" + ("" if m.region_score else " {}"))
        for rid, score in sorted(m.region_score.items()):
            lines.append(f"    {rid}: {_yaml_scalar(float(score))}")
    lines.append("regions:" + ("" if m.regions else " {}"))
    for rid, region in sorted(m.regions.items()):
        if region is None:
            lines.append(f"  {rid}: null")
            continue
        lines.append(f"  {rid}:")
        for f in REGION_FIELDS:
            value = getattr(region, f.attr)
            if f.always or not _omitted(value):
                lines.append(f"    {f.yaml}: {_yaml_scalar(float(value) if f.kind is float else value)}")
        lines.append("    nodes:" + ("" if region.nodes else " []"))
        for node in region.nodes:
            first = True
            for f in NODE_FIELDS:
                value = getattr(node, f.attr)
                if f.yaml not in _YAML_NODE_EXPLICIT and _omitted(value):
                    continue
                line = f"{'      - ' if first else '        '}{f.yaml}: {_yaml_scalar(value)}"
                note = _PORT_NOTES.get(f.yaml, {}).get(value)
                lines.append(f"{line}  # {note}" if note else line)
                first = False
    return "\n".join(lines) + "\n"


def render(m: DerpMap, fmt: str) -> str:
    if fmt == TAILSCALE_JSON:
        return to_json(m)
    if fmt == HEADSCALE_YAML:
        return to_headscale_yaml(m)
    raise ValueError(f"unknown format {fmt!r}")


# --- typed decoding (shared by JSON and YAML) ---------------------------------------------------


class _Decoder:
    """Fills the model from a parsed JSON value or YAML tree with Go's decoding rules."""

    def __init__(self, yaml: bool) -> None:
        self.yaml = yaml
        self.problems: list[str] = []

    def _where(self, path: str, obj: Any, key: str | None = None) -> str:
        if not self.yaml:
            return path
        if key is not None and isinstance(obj, blockyaml.MappingNode):
            line = obj.lines.get(key)
        else:
            line = getattr(obj, "line", None)
        return f"{path} (line {line})" if line else path

    def _is_null(self, v: Any) -> bool:
        return blockyaml.is_null(v) if self.yaml else v is None

    def _fail(self, where: str, expected: str, v: Any) -> DerpMapError:
        if isinstance(v, blockyaml.ScalarNode):
            got = f"{'string' if not v.plain else 'value'} {clip(v.text)!r}"
        elif isinstance(v, dict):
            got = "a mapping"
        elif isinstance(v, list):
            got = "a list"
        else:
            got = clip(json.dumps(v))
        return DerpMapError(f"{where}: expected {expected}, got {got}")

    def scalar(self, v: Any, kind: type, where: str) -> Any:
        if self._is_null(v):
            return kind()
        if not self.yaml:
            if kind is bool and isinstance(v, bool):
                return v
            if kind is int and isinstance(v, int) and not isinstance(v, bool):
                return v
            if kind is float and isinstance(v, int | float) and not isinstance(v, bool):
                return self._finite(float(v), where, json.dumps(v))
            if kind is str and isinstance(v, str):
                return v
            raise self._fail(where, _KIND_NAMES[kind], v)
        if not isinstance(v, blockyaml.ScalarNode):
            raise self._fail(where, _KIND_NAMES[kind], v)
        if kind is str:
            return v.text  # yaml.v3 stores any scalar's text in a string field
        if v.plain:  # yaml.v3's rules for a Go field of this type (a quoted "443" is no int)
            value = _AS_KIND[kind](v.text)
            if value is not None:
                # .inf and .nan resolve as floats, but Headscale cannot send them to clients in JSON.
                return self._finite(value, where, v.text) if kind is float else value
        raise self._fail(where, _KIND_NAMES[kind], v)

    @staticmethod
    def _finite(value: float, where: str, text: str) -> float:
        if not math.isfinite(value):
            raise DerpMapError(f"{where}: {text} is not a finite number; Headscale cannot send it to clients")
        return value

    def _items(self, obj: Any, names: Iterable[str], path: str) -> Iterator[tuple[str, Any]]:
        """(canonical name, value) for each known key of ``obj``; unknown keys become problems."""
        known = {n: n for n in names}
        folded = {n.lower(): n for n in names}
        for key, value in obj.items():
            name = known.get(key)
            if name is None and not self.yaml:
                name = folded.get(key.lower())  # encoding/json matches field names case-insensitively
            if name is None:
                hint = ""
                if self.yaml and key.lower() in folded:
                    hint = f"; Headscale's YAML keys are lower-case: {key.lower()}"
                self.problems.append(f"{self._where(path, obj, key)}: unknown key {clip(key)!r} is ignored{hint}")
                continue
            yield name, value

    def _mapping(self, v: Any, where: str) -> Any:
        if not isinstance(v, dict):
            raise self._fail(where, "a mapping", v)
        return v

    def _name(self, f: _Field) -> str:
        return f.yaml if self.yaml else f.go

    def _struct(self, obj: Any, v: Any, fields: Iterable[_Field], extra: str, path: str) -> Iterator[tuple[str, Any]]:
        """Set ``obj``'s scalar fields from mapping ``v``; yields the ``extra`` (collection) key's value."""
        by_name = {self._name(f): f for f in fields}
        mapping = self._mapping(v, path)
        for name, value in self._items(mapping, [*by_name, extra], path):
            f = by_name.get(name)
            if f is None:
                yield name, value
            else:
                setattr(obj, f.attr, self.scalar(value, f.kind, self._where(f"{path}.{name}", mapping, name)))

    def node(self, v: Any, path: str) -> DerpNode:
        node = DerpNode()
        for _ in self._struct(node, v, NODE_FIELDS, "", path):
            pass
        return node

    def region(self, v: Any, path: str) -> DerpRegion:
        region = DerpRegion()
        nodes_key = "nodes" if self.yaml else "Nodes"
        for _, value in self._struct(region, v, REGION_FIELDS, nodes_key, path):
            if self._is_null(value):
                continue
            if not isinstance(value, list):
                raise self._fail(f"{path}.{nodes_key}", "a list of nodes", value)
            region.nodes = [self.node(n, f"{path}.{nodes_key}[{i}]") for i, n in enumerate(value)]
        return region

    def region_id(self, key: str, where: str) -> int:
        # Go reads a map[int] key with ParseInt(key, 10, 64); the length bound keeps int() cheap.
        if re.fullmatch(r"[-+]?[0-9]{1,19}", key.strip()) and INT64_MIN <= int(key) <= INT64_MAX:
            return int(key)
        raise DerpMapError(f"{where}: region key is not an integer id")

    def derp_map(self, v: Any) -> DerpMap:
        if self._is_null(v) or v is None:
            raise DerpMapError("the DERP map is empty")
        names = (
            ("regions", "omitdefaultregions", "homeparams")
            if self.yaml
            else ("Regions", "omitDefaultRegions", "HomeParams")
        )
        top = self._mapping(v, "the DERP map")
        m = DerpMap()
        for name, value in self._items(top, names, "map"):
            if name == names[1]:
                m.omit_default_regions = self.scalar(value, bool, name)
            elif name == names[2]:
                m.region_score = self.home_params(value, name)
            else:
                if self._is_null(value):
                    continue
                regions = self._mapping(value, self._where(name, top, name))
                for key, rv in regions.items():
                    path = f"regions.{clip(str(key))}"
                    rid = self.region_id(str(key), self._where(path, regions, key))
                    if rid in m.regions:
                        raise DerpMapError(f"{self._where(path, regions, key)}: region {rid} appears twice")
                    m.regions[rid] = None if self._is_null(rv) else self.region(rv, path)
        if not any(k.lower() == "regions" for k in top):
            self.problems.append("the map has no regions key")
        return m

    def home_params(self, v: Any, where: str) -> dict[int, float] | None:
        if self._is_null(v):
            return None
        scores: dict[int, float] = {}
        key_name = "regionscore" if self.yaml else "RegionScore"
        for _, value in self._items(self._mapping(v, where), [key_name], where):
            if self._is_null(value):
                continue
            for key, score in self._mapping(value, f"{where}.{key_name}").items():
                scores[self.region_id(str(key), where)] = self.scalar(score, float, f"{where}.{key_name}.{key}")
        return scores


_KIND_NAMES = {int: "an integer", bool: "true or false", str: "a string", float: "a number"}
_AS_KIND: dict[type, Callable[[str], Any]] = {int: blockyaml.as_int, bool: blockyaml.as_bool, float: blockyaml.as_float}


def from_json(text: str) -> tuple[DerpMap, list[str]]:
    """A Tailscale DERPMap JSON document, with the problems :func:`check_map` and the decoder found."""
    try:  # a map may come from a URL (derpd probe --derp-map): bounded depth, Go's number rules
        obj = gojson.to_python(gojson.parse(text))
    except gojson.GoJSONError as e:
        raise DerpMapError(f"not valid JSON: {e}") from None
    dec = _Decoder(yaml=False)
    m = dec.derp_map(obj)
    return m, dec.problems + check_map(m)


def from_headscale_yaml(text: str) -> tuple[DerpMap, list[str]]:
    """A Headscale ``derp.paths`` YAML file (the block-style subset DERP maps are written in)."""
    try:
        tree = blockyaml.read(text)
    except blockyaml.YamlError as e:
        raise DerpMapError(str(e)) from None
    dec = _Decoder(yaml=True)
    m = dec.derp_map(tree)
    return m, dec.problems + check_map(m)


def parse(text: str) -> tuple[DerpMap, list[str]]:
    """JSON when the document is a JSON object, Headscale YAML otherwise."""
    if text.lstrip("\ufeff \t\r\n").startswith("{"):
        return from_json(text)
    return from_headscale_yaml(text)


def load(path: str | Path) -> tuple[DerpMap, list[str]]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DerpMapError(f"{path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        return parse(text)
    except DerpMapError as e:
        raise DerpMapError(f"{path}: {e}") from None


__all__ = [
    "CUSTOM_REGION_IDS",
    "DEFAULT_DERP_PORT",
    "DEFAULT_STUN_PORT",
    "FORMATS",
    "HEADSCALE_YAML",
    "NODE_FIELDS",
    "REGION_FIELDS",
    "TAILSCALE_JSON",
    "DerpMap",
    "DerpMapError",
    "DerpNode",
    "DerpRegion",
    "NodeSpec",
    "build_node",
    "build_region",
    "check_map",
    "from_headscale_yaml",
    "from_json",
    "load",
    "merge",
    "parse",
    "parse_node_spec",
    "pin_from_cert_file",
    "render",
    "to_headscale_yaml",
    "to_json",
    "to_json_obj",
]
