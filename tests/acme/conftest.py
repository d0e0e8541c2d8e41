"""Fixtures for the ACME suite: pebble (a real RFC 8555 CA) and the FaultProxy in front of it.

``make_pebble(http_port=..., tls_port=..., **options)`` gives a started ``Pebble`` (``start=False`` for
one that is down at first); ``make_proxy(pebble)`` a ``FaultProxy``; ``make_derpd(...)`` an ``AcmeDerpd``
(a ``derpd serve --certmode letsencrypt`` process, not started); ``make_stack(...)`` all three wired
together. Everything is stopped at teardown (derpd first), whatever the test did. See ``pebble.py`` for
what pebble 2.4 does and how the proxy misbehaves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .derpd_proc import AcmeDerpd
from .pebble import FaultProxy, Pebble, free_port, free_ports

MakePebble = Callable[..., Pebble]
MakeProxy = Callable[[Pebble], FaultProxy]


@pytest.fixture
def make_pebble(tmp_path: Path) -> Iterator[MakePebble]:
    made: list[Pebble] = []

    def make(*, http_port: int | None = None, tls_port: int | None = None, start: bool = True, **kw: Any) -> Pebble:
        ports = free_ports(2)
        p = Pebble(
            tmp_path / f"pebble-{len(made)}",
            http_port=ports[0] if http_port is None else http_port,
            tls_port=ports[1] if tls_port is None else tls_port,
            **kw,
        )
        made.append(p)
        if start:
            p.start()
        return p

    try:
        yield make
    finally:
        for p in made:
            p.close()


@pytest.fixture
def make_proxy(tmp_path: Path) -> Iterator[MakeProxy]:
    made: list[FaultProxy] = []

    def make(pebble: Pebble) -> FaultProxy:
        proxy = FaultProxy(pebble, tmp_path)
        made.append(proxy)
        return proxy

    try:
        yield make
    finally:
        for proxy in made:
            proxy.close()


# --- derpd with ACME in front of pebble ---------------------------------------------------------------


@dataclass
class Stack:
    """One test's pebble (+ FaultProxy) and derpd (not started: ``stack.derpd.start()``)."""

    pebble: Pebble
    proxy: FaultProxy | None
    derpd: AcmeDerpd
    tls_port: int
    http_port: int
    metrics_port: int

    @property
    def directory_url(self) -> str:
        return self.proxy.directory_url if self.proxy is not None else self.pebble.directory_url


MakeDerpd = Callable[..., AcmeDerpd]
MakeStack = Callable[..., Stack]


@pytest.fixture
def make_derpd(tmp_path: Path) -> Iterator[MakeDerpd]:
    """``make_derpd(directory_url=..., ca_file=..., tls_port=..., http_port=..., **AcmeDerpd options)``:
    not started; stopped (SIGTERM, then SIGKILL, bounded) at teardown. ``certdir``: True for
    ``--certdir <workdir>/certs``, False to leave the flag out (derpd's default), or a path."""
    made: list[AcmeDerpd] = []

    def make(*, metrics_port: int | None = None, certdir: Path | bool = True, **kw: Any) -> AcmeDerpd:
        workdir = tmp_path / f"derpd-{len(made)}"
        d = AcmeDerpd(
            workdir,
            metrics_port=free_port() if metrics_port is None else metrics_port,
            certdir=workdir / "certs" if certdir is True else (certdir if isinstance(certdir, Path) else None),
            **kw,
        )
        made.append(d)
        return d

    try:
        yield make
    finally:
        for d in made:
            d.stop()


@pytest.fixture
def make_stack(make_pebble: MakePebble, make_proxy: MakeProxy, make_derpd: MakeDerpd) -> MakeStack:
    """``make_stack(challenge=None, http=True, proxy=False, start_pebble=True, dead_tls_port=False,
    hostname="derp.test", args=(), env=None, certdir=True, acme_flags=True, certmode="letsencrypt",
    **pebble options)``. ``challenge``: --acme-challenge (None: derpd's default, auto); ``http``: a
    port-80 listener (else --http-port -1); ``dead_tls_port``: pebble validates TLS-ALPN-01 on a port
    nobody listens on."""

    def make(
        *,
        challenge: str | None = None,
        http: bool = True,
        proxy: bool = False,
        start_pebble: bool = True,
        dead_tls_port: bool = False,
        hostname: str = "derp.test",
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        certdir: bool = True,
        acme_flags: bool = True,
        certmode: str = "letsencrypt",
        **pebble_kw: Any,
    ) -> Stack:
        tls_port, http_port, metrics_port, dead_port = free_ports(4)
        pebble = make_pebble(
            http_port=http_port, tls_port=dead_port if dead_tls_port else tls_port, start=start_pebble, **pebble_kw
        )
        fault = make_proxy(pebble) if proxy else None
        all_args = list(args)
        if challenge is not None:
            all_args += ["--acme-challenge", challenge]
        derpd = make_derpd(
            tls_port=tls_port,
            http_port=http_port if http else -1,
            metrics_port=metrics_port,
            directory_url=fault.directory_url if fault is not None else pebble.directory_url,
            ca_file=pebble.ca_file,
            hostname=hostname,
            args=all_args,
            env=env,
            certdir=certdir,
            acme_flags=acme_flags,
            certmode=certmode,
        )
        return Stack(pebble, fault, derpd, tls_port, http_port, metrics_port)

    return make
