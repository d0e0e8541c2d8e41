"""systemd integration without libsystemd: sd_notify, the watchdog and socket activation.

The protocols are small enough to speak directly (no new dependency):

* sd_notify: one datagram of ``KEY=value`` lines to the unix socket named by ``$NOTIFY_SOCKET``
  (a path, or ``@name`` for the abstract namespace). Outside systemd the variable is unset and
  every call is a cheap no-op returning False, so callers never need to check first.
* The watchdog: ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``, when set, naming us) asks for
  ``WATCHDOG=1`` more often than that. :func:`watchdog_loop` pings from the trio event loop on
  purpose: a loop that stops running stops the pings, and systemd restarts the relay.
* Socket activation (sd_listen_fds): ``$LISTEN_PID``/``$LISTEN_FDS``/``$LISTEN_FDNAMES`` hand us
  already-bound sockets from fd 3 on. systemd keeps its own copy of each, so they survive a
  restart of derpd and connections arriving meanwhile wait in the kernel's backlog.

Everything but :func:`watchdog_loop` is plain synchronous code usable before ``trio.run``.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence

import trio

from derpd.base import log
from derpd.base.errors import ConfigurationError
from derpd.base.text import one_line
from derpd.net.addr import UNNAMED, ActivatedSockets, InheritedSocket

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START: the first inherited descriptor
SEND_TIMEOUT = 1.0  # seconds; a wedged service manager must not hold the event loop for long

_send_failure_logged = False


# -- sd_notify ---------------------------------------------------------------------------------


def _notify_address(value: str) -> str | bytes | None:
    """``$NOTIFY_SOCKET`` as a socket address; None for kinds we do not speak (e.g. ``vsock:``)."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()  # Linux abstract namespace
    return None


def notify(message: str, *, env: Mapping[str, str] = os.environ) -> bool:
    """Send ``message`` (newline-separated ``KEY=value`` assignments) to the service manager.

    False when not under systemd or when sending failed; never raises, because telling systemd
    is best effort and must not take the relay down. The first failure is logged at debug.
    """
    global _send_failure_logged
    target = env.get("NOTIFY_SOCKET", "")
    if not target:
        return False
    address = _notify_address(target)
    if address is None:
        reason = "unsupported NOTIFY_SOCKET address"
    else:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.settimeout(SEND_TIMEOUT)
                s.sendto(message.encode(), address)
            return True
        except OSError as e:
            reason = e.strerror or str(e)
    if not _send_failure_logged:
        _send_failure_logged = True
        log.debug("sd_notify_failed", socket=target, reason=reason, action="continuing without systemd notifications")
    return False



def ready(status: str | None = None, *, env: Mapping[str, str] = os.environ) -> bool:
    """``READY=1``: every listener is up (again, after a reload); optionally with a status line."""
    return notify("READY=1" if status is None else f"READY=1\nSTATUS={one_line(status)}", env=env)


def status(text: str, *, env: Mapping[str, str] = os.environ) -> bool:
    """``STATUS=``: the one line ``systemctl status`` shows (e.g. the connection count)."""
    return notify(f"STATUS={one_line(text)}", env=env)


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock systemd compares MONOTONIC_USEC against."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def reloading(*, env: Mapping[str, str] = os.environ) -> bool:
    """``RELOADING=1`` with ``MONOTONIC_USEC`` (systemd >= 253 requires both); send :func:`ready` when done."""
    return notify(f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec()}", env=env)


def stopping(*, env: Mapping[str, str] = os.environ) -> bool:
    """``STOPPING=1``: shutting down on purpose, so systemd does not treat the exit as a crash."""
    return notify("STOPPING=1", env=env)


def watchdog(*, env: Mapping[str, str] = os.environ) -> bool:
    """``WATCHDOG=1``: the keep-alive ping."""
    return notify("WATCHDOG=1", env=env)


# -- watchdog ----------------------------------------------------------------------------------


def watchdog_interval(env: Mapping[str, str] = os.environ) -> float | None:
    """The watchdog timeout in seconds, or None when it is off or meant for another process."""
    pid = env.get("WATCHDOG_PID", "")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 1_000_000 if usec > 0 else None


async def watchdog_loop(status_fn: Callable[[], str] | None = None, *, env: Mapping[str, str] = os.environ) -> None:
    """Ping ``WATCHDOG=1`` at half the watchdog interval until cancelled; return at once when off.

    The pings are sent from the trio event loop so that a blocked or spinning loop stops them.
    ``status_fn`` (e.g. "N clients") rides along as ``STATUS=`` in the same datagram.
    """
    interval = watchdog_interval(env)
    if interval is None:
        return
    period = interval / 2
    status_failed = False
    while True:
        message = "WATCHDOG=1"
        if status_fn is not None:
            try:
                message += f"\nSTATUS={one_line(status_fn())}"
            except Exception as e:  # a status bug must not stop the keep-alive
                if not status_failed:
                    status_failed = True
                    log.warning("sd_status_failed", reason=repr(e), action="pinging without STATUS")
        notify(message, env=env)
        await trio.sleep(period)


# -- socket activation ---------------------------------------------------------------------------


class ListenFdsError(ConfigurationError, ValueError):
    """The inherited descriptors do not fit: malformed variables, or a socket we cannot use."""


def _parse_int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise ListenFdsError(f"${key} is not a number: {env[key]!r}") from None


def listen_fds(env: MutableMapping[str, str] = os.environ, *, unset: bool = True) -> list[InheritedSocket]:
    """sd_listen_fds_with_names: the sockets systemd passed us, from fd 3 on, in unit order.

    Empty when ``$LISTEN_PID`` is missing or names another process (the variables leaked from a
    parent). Each descriptor gets FD_CLOEXEC so it does not leak further. With ``unset`` the three
    variables are removed in every case, as libsystemd does, so nothing we start inherits them.
    Raises :class:`ListenFdsError` on malformed variables or a descriptor that is not a socket.
    """
    try:
        if "LISTEN_PID" not in env or "LISTEN_FDS" not in env:
            return []
        if _parse_int(env, "LISTEN_PID") != os.getpid():
            return []
        count = _parse_int(env, "LISTEN_FDS")
        if count < 0:
            raise ListenFdsError(f"$LISTEN_FDS is negative: {count}")
        if count == 0:
            return []
        raw_names = env.get("LISTEN_FDNAMES")
        names = raw_names.split(":") if raw_names is not None else [UNNAMED] * count
        if len(names) != count:
            raise ListenFdsError(f"$LISTEN_FDNAMES has {len(names)} names for {count} descriptors")
        out: list[InheritedSocket] = []
        for fd, name in zip(range(LISTEN_FDS_START, LISTEN_FDS_START + count), names, strict=True):
            try:
                os.set_inheritable(fd, False)
                sock = socket.socket(fileno=fd)
            except OSError as e:
                for got in out:  # leave every descriptor as we found it
                    got.sock.detach()
                raise ListenFdsError(f"inherited fd {fd} ({name}) is not a usable socket: {e.strerror or e}") from None
            out.append(InheritedSocket(fd, name or UNNAMED, sock))
        return out
    finally:
        if unset:
            for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
                env.pop(key, None)


_ROLE_TYPES = {"derp": socket.SOCK_STREAM, "http": socket.SOCK_STREAM, "stun": socket.SOCK_DGRAM}


def _describe(s: InheritedSocket) -> str:
    kind = {int(socket.SOCK_STREAM): "TCP", int(socket.SOCK_DGRAM): "UDP"}.get(s.type, f"type {s.type}")
    return f"fd {s.fd} ({s.name}, {kind} port {s.port})"


def assign_sockets(
    inherited: Sequence[InheritedSocket], *, derp_port: int | None = None, http_port: int | None = None
) -> ActivatedSockets:
    """Give each inherited socket its role: by name first, else by type and port.

    Names ``derp``, ``http`` and ``stun`` (``FileDescriptorName=``) decide outright. systemd applies
    one name to every socket of a unit, so a single ``derpd.socket`` with ports 443, 80 and 3478
    passes them all as "derpd.socket"; those unnamed ones go by type: UDP is STUN, TCP on
    ``http_port`` is the port-80 listener and other TCP is DERP. With ``derp_port`` given, an
    unnamed TCP socket on neither port is refused rather than silently served as DERP.
    Other chosen names land in ``other`` for the caller.
    """
    out = ActivatedSockets()
    for s in inherited:
        if s.named:
            role = s.name if s.name in _ROLE_TYPES else None
            if role is None:
                out.other.setdefault(s.name, []).append(s)
                continue
            if s.type != _ROLE_TYPES[role]:
                want = "TCP (ListenStream=)" if _ROLE_TYPES[role] == socket.SOCK_STREAM else "UDP (ListenDatagram=)"
                raise ListenFdsError(f"{_describe(s)}: a socket named {role} must be {want}")
        elif s.type == socket.SOCK_DGRAM:
            role = "stun"
        elif s.type == socket.SOCK_STREAM:
            if http_port is not None and http_port >= 0 and s.port == http_port:
                role = "http"
            elif derp_port is None or s.port == derp_port:
                role = "derp"
            else:
                http = "off" if http_port is None or http_port < 0 else str(http_port)
                raise ListenFdsError(
                    f"{_describe(s)} matches neither the DERP port {derp_port} nor the HTTP port ({http}); "
                    "make the configured ports match the socket unit, or name it with FileDescriptorName="
                )
        else:
            raise ListenFdsError(f"{_describe(s)}: only stream and datagram sockets can be served")
        if s.family not in (socket.AF_INET, socket.AF_INET6):
            raise ListenFdsError(f"{_describe(s)}: derpd serves {role} over IPv4/IPv6 only")
        getattr(out, role).append(s.sock)
    return out
