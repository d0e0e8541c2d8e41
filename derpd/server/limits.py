"""Abuse limits: token buckets, the accept limiter, per-IP caps, the per-client rate config.

Pure bookkeeping with explicit clocks (no sockets, no trio), so every rule can be tested
exactly. The server and relay decide what to do with a "no".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from derpd.base.errors import ConfigurationError
from derpd.proto import gojson
from derpd.proto.frames import MAX_PACKET_SIZE
from derpd.proto.keys import KEY_LEN

MIN_RATE_BURST = MAX_PACKET_SIZE + KEY_LEN  # 65,568: one largest SendPacket payload
MAX_RATE_CONFIG = 64 * 1024  # bytes; the file is a two-field JSON object


class LimitError(ConfigurationError, ValueError):
    """A limit setting or rate-config file is unusable; the message says why."""


class TokenBucket:
    """``rate`` tokens per second up to ``burst``. ``try_take`` refuses when short;
    ``take`` lets the balance go negative and says how long to wait it off."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst <= 0:
            raise LimitError("token bucket rate and burst must be positive")
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def try_take(self, now: float, n: float = 1.0) -> bool:
        self._refill(now)
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False

    def take(self, now: float, n: float) -> float:
        """Spend ``n``, going into debt if need be; seconds until the balance is back to zero.
        (A reader that waits that long before reading again averages exactly ``rate``.)"""
        self._refill(now)
        self.tokens -= n
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class AcceptLimiter:
    """``--accept-connection-limit`` / ``--accept-connection-burst``: new connections per second."""

    def __init__(self, rate: float = math.inf, burst: int = 0, *, now: float = 0.0) -> None:
        # derper's default burst is MaxInt, which never limits; here it defaults to one second's worth.
        self.bucket = None if math.isinf(rate) else TokenBucket(rate, burst if burst > 0 else max(1.0, rate), now)
        self.accepted = 0
        self.rejected = 0

    def allow(self, now: float) -> bool:
        if self.bucket is None or self.bucket.try_take(now):
            self.accepted += 1
            return True
        self.rejected += 1
        return False


class PerIPLimiter:
    """``--max-conns-per-ip``: concurrent connections from one address (0 = no cap)."""

    def __init__(self, limit: int = 0) -> None:
        self.limit = limit
        self.active: dict[str, int] = {}
        self.rejected = 0

    def acquire(self, ip: str) -> bool:
        n = self.active.get(ip, 0)
        if self.limit and n >= self.limit:
            self.rejected += 1
            return False
        self.active[ip] = n + 1
        return True

    def release(self, ip: str) -> None:
        n = self.active.get(ip, 0) - 1
        if n > 0:
            self.active[ip] = n
        else:
            self.active.pop(ip, None)


@dataclass(frozen=True)
class RateConfig:
    """derper's ``--rate-config`` file: a per-client receive rate; 0 disables."""

    bytes_per_second: int = 0
    burst_bytes: int = 0

    @property
    def enabled(self) -> bool:
        return self.bytes_per_second > 0

    @classmethod
    def from_json(cls, text: str) -> RateConfig:
        names = ("PerClientRateLimitBytesPerSec", "PerClientRateBurstBytes")
        try:
            fields = gojson.decode(text, dict.fromkeys(names, int), "rate config", max_size=MAX_RATE_CONFIG)
        except gojson.GoJSONError as e:
            example = '{"PerClientRateLimitBytesPerSec": 1000000}'
            raise LimitError(f"{e} (expected a JSON object like {example})") from None
        rate, burst = (fields.get(name, 0) for name in names)
        for name, value in zip(names, (rate, burst), strict=True):
            if value < 0:
                raise LimitError(f"{name} must be a non-negative integer")
        if rate == 0:
            return cls()
        return cls(rate, max(burst, MIN_RATE_BURST))

    @classmethod
    def load(cls, path: str | Path) -> RateConfig:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise LimitError(f"cannot read rate config {path}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise LimitError(f"rate config {path} is not UTF-8 text") from None
        try:
            return cls.from_json(text)
        except LimitError as e:
            raise LimitError(f"rate config {path}: {e}") from None

    def bucket(self, now: float) -> TokenBucket | None:
        return TokenBucket(self.bytes_per_second, self.burst_bytes, now) if self.enabled else None
