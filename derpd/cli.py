"""The ``derpd`` command: serve, genkey, pubkey.

Every flag has an environment twin ``DERPD_<NAME>``. Any bad flag or file ends in
one ``derpd: error: ...`` line and exit status 2 before anything is started.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import trio

from . import __version__, log
from .keys import (
    InvalidKeyError,
    load_key_file,
    load_mesh_key_file,
    load_or_create_key_file,
    parse_mesh_key,
    public_key_text,
    write_key_file,
)
from .keys import NodePrivate as _NodePrivate
from .relay import RelayConfig
from .server import AddressError, DerpServer, ServerSettings, parse_hostport

DEV_ADDR = "127.0.0.1:3340"
DEV_KEY_FILE = ".derpd/derper.key"
DEFAULT_ADDR = ":3340"
ROOT_KEY_FILE = "/var/lib/derpd/derper.key"
LOG_LEVELS = ("debug", "info", "warning", "error")


F = TypeVar("F", bound=Callable[..., Any])


class ConfigError(click.UsageError):
    """A bad flag value or file: reported as one line, exit status 2."""


def _default_key_file() -> str | None:
    state = os.environ.get("STATE_DIRECTORY")  # systemd StateDirectory=
    if state:
        return str(Path(state.split(":")[0]) / "derper.key")
    if os.geteuid() == 0:
        return ROOT_KEY_FILE
    return None


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


@cli.command()
@click.option(
    "--addr",
    envvar="DERPD_ADDR",
    show_envvar=True,
    default=None,
    help=f"DERP/HTTP listen address HOST:PORT, [IPv6]:PORT or :PORT (all interfaces, dual-stack). "
    f"Default {DEFAULT_ADDR}, or {DEV_ADDR} with --dev.",
)
@click.option(
    "--stun-port",
    envvar="DERPD_STUN_PORT",
    show_envvar=True,
    type=click.IntRange(-1, 65535),
    default=3478,
    help="UDP port for STUN on the same host as --addr; -1 disables STUN.",
)
@click.option(
    "--stun-host",
    envvar="DERPD_STUN_HOST",
    show_envvar=True,
    default=None,
    help="Host for the STUN socket when it should differ from --addr's (e.g. DERP on 127.0.0.1 behind a "
    "TLS proxy, STUN public); '*' or '::' for every interface.",
)
@_key_file_option(
    f"Server private key in derper's JSON format; created (mode 0600) if missing. "
    f"Default $STATE_DIRECTORY/derper.key under systemd, {ROOT_KEY_FILE} as root, {DEV_KEY_FILE} with --dev.",
    required=False,
)
@click.option(
    "--dev",
    envvar="DERPD_DEV",
    show_envvar=True,
    is_flag=True,
    help=f"Safe local defaults: DERP on {DEV_ADDR}, STUN on 127.0.0.1, key in {DEV_KEY_FILE}.",
)
@click.option(
    "--mesh-psk-file",
    envvar="DERPD_MESH_PSK_FILE",
    show_envvar=True,
    type=click.Path(dir_okay=False),
    default=None,
    help="File with the region's 64-hex-digit mesh key; clients presenting it may watch "
    "connections and forward packets. Must not be readable by others.",
)
@click.option(
    "--home",
    envvar="DERPD_HOME",
    show_envvar=True,
    default="",
    help="What / serves: empty for the built-in page, 'blank' for an empty page, or an http(s) URL to redirect to.",
)
@click.option(
    "--tcp-write-timeout",
    envvar="DERPD_TCP_WRITE_TIMEOUT",
    show_envvar=True,
    type=click.FloatRange(min=0),
    default=2.0,
    help="Seconds a client may take to accept each 64 KiB of queued data before it is "
    "disconnected; 0 disables. Mesh peers get 30 s.",
)
@click.option(
    "--log-level",
    envvar="DERPD_LOG_LEVEL",
    show_envvar=True,
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    default="info",
    help="Minimum level of the key=value log lines written to stderr.",
)
def serve(
    addr: str | None,
    stun_port: int,
    stun_host: str | None,
    key_file: str | None,
    dev: bool,
    mesh_psk_file: str | None,
    home: str,
    tcp_write_timeout: float,
    log_level: str,
) -> None:
    """Run the DERP relay and STUN server."""
    try:
        host, port = parse_hostport(addr or (DEV_ADDR if dev else DEFAULT_ADDR))
    except AddressError as e:
        raise ConfigError(f"--addr: {e}") from None
    if dev and addr is None:
        host = "127.0.0.1"
    if home and home != "blank" and not home.startswith(("http://", "https://")):
        raise ConfigError("--home must be empty, 'blank', or an http:// or https:// URL")

    key_path = key_file or (DEV_KEY_FILE if dev else _default_key_file())
    if key_path is None:
        raise ConfigError("--key-file is required when not running as root, under systemd, or with --dev")
    try:
        key, created = load_or_create_key_file(key_path)
    except InvalidKeyError as e:
        raise ConfigError(str(e)) from None

    mesh_key: bytes | None = None
    try:
        if mesh_psk_file:
            mesh_key = load_mesh_key_file(mesh_psk_file)
        elif dev and os.environ.get("TAILSCALE_DERPER_MESH_KEY"):
            mesh_key = parse_mesh_key(os.environ["TAILSCALE_DERPER_MESH_KEY"])
    except InvalidKeyError as e:
        raise ConfigError(str(e)) from None

    log.setup(log_level)
    if created:
        log.info("key_created", path=key_path, public_key=public_key_text(key.public))
    if stun_host is not None:
        stun_host = stun_host.strip("[]")
        stun_host = "" if stun_host in ("*", "::") else stun_host
    settings = ServerSettings(
        addr=(host, port),
        stun_port=stun_port,
        stun_host=stun_host,
        home=home,
        mesh_key=mesh_key,
        relay=RelayConfig(write_timeout=tcp_write_timeout),
    )
    try:
        trio.run(_serve, key, settings)
    except KeyboardInterrupt:
        pass
    except BaseExceptionGroup as group:
        matched, rest = group.split(OSError)
        if matched is None or rest is not None:
            raise
        for e in _leaves(matched):
            log.error("startup_failed", reason=f"{e.strerror or e}" if isinstance(e, OSError) else str(e))
        sys.exit(1)


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out


async def _serve(key: _NodePrivate, settings: ServerSettings) -> None:
    server = DerpServer(key, settings)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("shutting_down", signal=signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


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


def main(argv: list[str] | None = None) -> None:
    """Console entry point: click without its multi-line usage dump on errors."""
    try:
        code = cli.main(args=argv, prog_name="derpd", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as e:
        click.echo(e.format_message(), err=True)
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
