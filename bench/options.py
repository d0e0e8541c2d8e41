"""What the benches share on their command lines: the TLS options, the client context they ask
for, and ``--dial``. (``bench.relay`` checks its TLS options itself, in ``loadgen.parse_url``.)"""

from __future__ import annotations

import argparse
import ssl
from typing import Any
from urllib.parse import urlsplit


def add_tls_options(parser: argparse.ArgumentParser | Any) -> None:
    """``--cert-name``, ``--ca-file`` and ``--insecure`` on ``parser`` (or an argument group)."""
    parser.add_argument(
        "--cert-name",
        help="the DERP node's CertName: sha256-raw:<hex> pins the leaf (self-signed IP certificate), "
        "a name is verified (and sent as SNI) instead of the URL's host",
    )
    parser.add_argument("--ca-file", help="PEM file of CA certificates to trust instead of the system's")
    parser.add_argument("--insecure", action="store_true", help="do not verify the server's certificate at all")


def client_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """What DerpClient verifies with (None: plain HTTP, or DerpClient's own choice for
    ``--cert-name``: the pin or that name)."""
    if not args.url.startswith("https://") or args.cert_name:
        return None
    ctx = ssl.create_default_context(cafile=args.ca_file)
    if args.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def dial_address(args: argparse.Namespace) -> tuple[str, int]:
    """Where to connect: ``--dial HOST:PORT`` (brackets around an IPv6 host allowed), else the URL's host."""
    if args.dial:
        host, _, port = args.dial.rpartition(":")
        return host.strip("[]"), int(port)
    parts = urlsplit(args.url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
