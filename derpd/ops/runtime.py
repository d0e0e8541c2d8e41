"""The one runtime loop: start a service, tell systemd, reload on SIGHUP, stop gracefully on SIGTERM/SIGINT.

``derpd serve`` runs one of two services through ``run``: a ``NodeService`` (this process relays:
the node, its metrics listener) or, with ``--workers N``, the ``derpd.ops.workers.Supervisor`` of N
such processes. Both speak to systemd the same way: READY=1 with a status line once every listener
is up, WATCHDOG=1 from the event loop, RELOADING=1 around a reload, STOPPING=1 and a graceful stop.
"""

from __future__ import annotations

import signal
import sys
from typing import Any, Protocol

import trio

from derpd.base import log
from derpd.ops import sdnotify
from derpd.ops.metrics import registry_for, serve_metrics
from derpd.ops.workers import READY_LINE
from derpd.proto.keys import NodePrivate
from derpd.server.node import DerpServer, ServerSettings

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Service(Protocol):
    """What ``run`` runs."""

    async def start(self, nursery: trio.Nursery) -> None:
        """Start everything in ``nursery``; return once it all serves (every listener bound)."""

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
            sdnotify.ready(status=service.status())
            nursery.start_soon(sdnotify.watchdog_loop, service.status)
            async for signum in signals:
                if signum == signal.SIGHUP:
                    sdnotify.reloading()
                    service.reload()
                    sdnotify.ready(status=service.status())
                    continue
                sdnotify.stopping()
                log.info("shutting_down", signal=signal.Signals(signum).name, **service.stop_fields())
                await service.stop()
                nursery.cancel_scope.cancel()
                break


class NodeService:
    """This process relays: the DERP node (listeners, relay, STUN) and its metrics listener."""

    def __init__(
        self,
        key: NodePrivate,
        settings: ServerSettings,
        metrics_addr: tuple[str, int] | None,
        *,
        worker: bool = False,
    ) -> None:
        self.key = key
        self.settings = settings
        self.metrics_addr = metrics_addr
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
        if self.metrics_addr is not None:
            await nursery.start(serve_metrics, *self.metrics_addr, registry_for(self._server))
        if self.worker:
            sys.stdout.buffer.write(READY_LINE)
            sys.stdout.flush()

    def status(self) -> str:
        return f"{self.server.relay.stats.current_connections} clients"

    def reload(self) -> None:
        self.server.reload()

    async def stop(self) -> None:
        with trio.move_on_after(self.settings.shutdown_timeout + 1.0):
            await self.server.shutdown()

    def stop_fields(self) -> dict[str, Any]:
        return {}
