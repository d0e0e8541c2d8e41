"""Operator tools: ``derpd derpmap`` (write this node's DERP map) and ``derpd probe`` (check a relay).

Plain click commands, attached to the ``derpd`` group by ``cli.add_command``; this module does not
import ``derpd.cli`` so that it can be imported from there. As everywhere in derpd, every option has
an environment twin ``DERPD_<NAME>``, and a bad flag or file is one ``derpd: error: ...`` line with
exit status 2 (``click.UsageError``). ``probe`` exits 1 when any check fails.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click
import trio

from . import derpmap as dm
from .keys import InvalidKeyError, load_mesh_key_file
from .probe import ProbeOptions, ProbeReport, format_table, load_map, probe_map, probe_url, target_from_url
from .tls import PIN_PREFIX, CertError, pinned_context

F = TypeVar("F", bound=Callable[..., Any])
CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True}


def _opt(flag: str, help_text: str, *name: str, **kw: Any) -> Callable[[F], F]:
    """An option with its DERPD_<NAME> environment twin (as derpd.cli does it); ``name`` renames the parameter."""
    env = "DERPD_" + flag.split("/", 1)[0][2:].upper().replace("-", "_")
    return click.option(flag, *name, envvar=env, show_envvar=True, help=help_text, **kw)


def _bad_value(text: str) -> click.UsageError:
    """A bad value or file: derpd.cli's ConfigError, a UsageError reported without the '--help' hint."""
    from .cli import ConfigError  # noqa: PLC0415 - imported late: derpd.cli imports this module

    return ConfigError(text)


def _warn(text: str) -> None:
    click.echo(f"derpd: warning: {text}", err=True)


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
    type=click.Choice(dm.FORMATS),
    default=dm.HEADSCALE_YAML,
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
    except dm.DerpMapError as e:
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
    if url is not None:
        stun_port = o["stun_port"] if o["stun_port"] is not None else dm.DEFAULT_STUN_PORT
        return await probe_url(url, opts, stun_port=stun_port, can_port80=o["can_port80"])
    m, problems = await load_map(o["derp_map"], timeout=opts.timeout)
    return await probe_map(m, opts, region=o["region"], source=o["derp_map"], problems=problems)


__all__ = ["derpmap", "probe"]
