"""``client_connected`` and ``client_disconnected``: one line each per connection, until there are more
than anyone can read.

A restart of a busy node, or a tailnet reconnecting at once, brings thousands of logins a second. Two
lines of ~150 bytes each is then megabytes of log a second: journald drops most of it anyway (its
default rate limit is 10,000 lines per 30 s per service), and formatting and writing it cost the relay
more CPU than the logins themselves. So each of the two events is logged in full for the first
``per_second`` connections of every one-second window; the others are counted (and logged in full at
debug, for an operator chasing one key), and the window ends with one ``client_churn`` info line that
says how many connected and disconnected, how many lines were not written, and why clients left.

Mesh peers and sibling workers are always logged in full: they are few and each one matters. Sans I/O
apart from the log itself: the caller passes the clock.
"""

from __future__ import annotations

import logging

from derpd.base import log

PER_SECOND = 100  # full lines of each event per one-second window
WINDOW = 1.0  # seconds
TOP_REASONS = 3  # disconnect reasons named in a summary line; the rest are counted together


class ConnectionLog:
    """Decides, per connection event, whether its line is written at info, at debug, or only counted."""

    __slots__ = ("connected", "disconnected", "per_second", "reasons", "started", "unlogged", "window")

    def __init__(self, per_second: int = PER_SECOND, window: float = WINDOW) -> None:
        self.per_second = per_second
        self.window = window
        self.started = float("-inf")  # when the current window began
        self.connected = 0  # in the current window, logged or not
        self.disconnected = 0
        self.unlogged = 0  # lines of the current window not written at info
        self.reasons: dict[str, int] = {}  # why the current window's clients left

    def connect_level(self, now: float, *, always: bool = False) -> int | None:
        """The level to log a ``client_connected`` line at (None: do not format it at all)."""
        self._roll(now)
        self.connected += 1
        return self._level(self.connected, always)

    def disconnect_level(self, now: float, reason: str, *, always: bool = False) -> int | None:
        """The level to log a ``client_disconnected`` line at (None: do not format it at all)."""
        self._roll(now)
        self.disconnected += 1
        reasons = self.reasons
        reasons[reason] = reasons.get(reason, 0) + 1
        return self._level(self.disconnected, always)

    def tick(self, now: float) -> None:
        """Called about once a window, so that the summary of the last busy window is not held back
        until the next connection comes."""
        self._roll(now)

    def _level(self, n: int, always: bool) -> int | None:
        if always or n <= self.per_second:
            return logging.INFO
        self.unlogged += 1
        return logging.DEBUG if log.log.isEnabledFor(logging.DEBUG) else None

    def _roll(self, now: float) -> None:
        if now - self.started < self.window:
            return
        if self.unlogged:
            self._summary(now)
        self.started = now
        self.connected = self.disconnected = self.unlogged = 0
        self.reasons = {}

    def _summary(self, now: float) -> None:
        ranked = sorted(self.reasons.items(), key=lambda kv: -kv[1])
        shown = "; ".join(f"{reason}: {n}" for reason, n in ranked[:TOP_REASONS])
        others = sum(n for _, n in ranked[TOP_REASONS:])
        log.info(
            "client_churn",
            seconds=f"{self.window:g}",
            connected=self.connected,
            disconnected=self.disconnected,
            unlogged=self.unlogged,
            reasons=shown or None,
            other_reasons=others or None,
        )
