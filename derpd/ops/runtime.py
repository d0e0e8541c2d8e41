"""The one runtime loop: start a service, tell systemd, reload on SIGHUP, stop gracefully on SIGTERM/SIGINT.

``derpd serve`` runs one of two services through ``run``: a ``NodeService`` (this process relays:
the node, its metrics listener) or, with ``--workers N``, the ``derpd.ops.workers.Supervisor`` of N
such processes. Both speak to systemd the same way: READY=1 with a status line once every listener
is up, WATCHDOG=1 from the event loop, RELOADING=1 around a reload, STOPPING=1 and a graceful stop.
"""

from __future__ import annotations

import ctypes
import gc
import math
import signal
import sys
from typing import TYPE_CHECKING, Any, Protocol

import trio

from derpd.base import log
from derpd.net.tls import follow_certificate
from derpd.ops import sdnotify
from derpd.ops.metrics import registry_for, serve_metrics
from derpd.ops.workers import READY_LINE
from derpd.proto.keys import NodePrivate
from derpd.server.node import DerpServer, ServerSettings

if TYPE_CHECKING:
    from derpd.ops.acme import CertManager  # imported only with --certmode letsencrypt (derpd.config)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Service(Protocol):
    """What ``run`` runs."""

    async def start(self, nursery: trio.Nursery) -> None:
        """Start everything in ``nursery``; return once it all serves (every listener bound)."""

    async def until_ready(self) -> None:
        """Return once the service can do its job (a certificate is served, with ACME)."""

    def waiting_status(self) -> str:
        """STATUS= while ``until_ready`` waits."""

    def status(self) -> str:
        """One line for systemd's STATUS= (``systemctl status``)."""

    def reload(self) -> None:
        """SIGHUP: re-read what can change; keep the old state of anything that fails."""

    async def stop(self) -> None:
        """Graceful stop, bounded by the service's own shutdown timeout."""

    def stop_fields(self) -> dict[str, Any]:
        """Extra fields for the ``shutting_down`` line."""


async def run(service: Service) -> None:
    """Run ``service`` until SIGTERM or SIGINT, reloading it on SIGHUP."""
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(*STOP_SIGNALS, signal.SIGHUP) as signals:
            await service.start(nursery)
            settle_startup_objects()
            ready = trio.Event()
            nursery.start_soon(_announce_ready, service, ready)
            nursery.start_soon(sdnotify.watchdog_loop, service.status)
            async for signum in signals:
                if signum == signal.SIGHUP:
                    sdnotify.reloading()
                    service.reload()
                    if ready.is_set():
                        sdnotify.ready(status=service.status())
                    else:
                        sdnotify.status(service.waiting_status())
                    continue
                sdnotify.stopping()
                log.info("shutting_down", signal=signal.Signals(signum).name, **service.stop_fields())
                await service.stop()
                nursery.cancel_scope.cancel()
                break


def settle_startup_objects() -> None:
    """Once every listener is up: move what start-up made (modules, settings, listeners) out of the
    garbage collector's sight (``gc.freeze``: it lives as long as the process, and rescanning it on
    every full collection cost ~5 % of the CPU of a login storm), then return freed heap pages."""
    gc.collect()
    gc.freeze()
    release_free_memory()


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the kernel (glibc's ``malloc_trim``); elsewhere, nothing.

    Start-up (imports above all: each module's .pyc is read whole, then unmarshalled) leaves ~1 MB of
    freed memory between live blocks of glibc's heap, which ``free`` never returns by itself because
    it is not at the heap's top. Called once every listener is up; the call takes about a millisecond.
    """
    try:
        trim = ctypes.CDLL(None).malloc_trim  # this process's own symbols: glibc's where it is linked in
    except (OSError, AttributeError):  # musl, macOS: no malloc_trim, and nothing lost
        return
    trim(0)


READY_WAIT_EXTEND = 60.0  # seconds of start-up time asked of systemd at a time while not ready


async def _announce_ready(service: Service, ready: trio.Event) -> None:
    """READY=1 once the service is ready. Until then (an ACME certificate on its way) systemd is asked
    for more start-up time every while, and STATUS= says what is awaited."""
    async with trio.open_nursery() as waiting:

        async def extend() -> None:
            await trio.sleep(1.0)  # the common case: ready at once, and nothing else is said
            said, extended_at = "", -math.inf
            while True:
                if trio.current_time() - extended_at >= READY_WAIT_EXTEND / 3:
                    sdnotify.notify(f"EXTEND_TIMEOUT_USEC={int(READY_WAIT_EXTEND * 1.5 * 1e6)}")
                    extended_at = trio.current_time()
                status = service.waiting_status()
                if status != said:  # e.g. the last ACME error, as soon as it changes
                    sdnotify.status(status)
                    said = status
                await trio.sleep(1.0)

        waiting.start_soon(extend)
        await service.until_ready()
        waiting.cancel_scope.cancel()
    ready.set()
    sdnotify.ready(status=service.status())


class NodeService:
    """This process relays: the DERP node (listeners, relay, STUN) and its metrics listener."""

    def __init__(
        self,
        key: NodePrivate,
        settings: ServerSettings,
        metrics_addr: tuple[str, int] | None,
        *,
        worker: bool = False,
        acme: CertManager | None = None,
        follow_certificate: bool = False,
    ) -> None:
        self.key = key
        self.settings = settings
        self.metrics_addr = metrics_addr
        self.acme = acme  # --certmode letsencrypt: obtains and renews the certificate
        self.follow = follow_certificate  # a --workers worker: serves what the supervisor's manager writes
        self.worker = worker  # started by a --workers supervisor: report readiness on stdout too
        self._server: DerpServer | None = None  # made in start(): it reads trio's clock

    @property
    def server(self) -> DerpServer:
        if self._server is None:
            raise RuntimeError("NodeService.start() has not run")
        return self._server

    async def start(self, nursery: trio.Nursery) -> None:
        self._server = DerpServer(self.key, self.settings)
        await nursery.start(self._server.run)
        if self.follow and self.settings.tls is not None:
            nursery.start_soon(follow_certificate, self.settings.tls)
        elif self.acme is not None:
            nursery.start_soon(self.acme.run)  # after the listeners: the CA's validation connects to them
        if self.metrics_addr is not None:
            acme = None if self.follow else self.acme
            await nursery.start(serve_metrics, *self.metrics_addr, registry_for(self._server, acme=acme))
        if self.worker:
            sys.stdout.buffer.write(READY_LINE)
            sys.stdout.flush()

    async def until_ready(self) -> None:
        if self.acme is not None and not self.follow:
            await self.acme.ready.wait()
        await trio.lowlevel.checkpoint()

    def waiting_status(self) -> str:
        return self.acme.status() if self.acme is not None else "starting"

    def status(self) -> str:
        return f"{self.server.relay.stats.current_connections} clients"

    def reload(self) -> None:
        self.server.reload()

    async def stop(self) -> None:
        with trio.move_on_after(self.settings.shutdown_timeout + 1.0):
            await self.server.shutdown()

    def stop_fields(self) -> dict[str, Any]:
        return {}
