"""Token buckets and limit settings, with explicit clocks (no sleeping)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from derpd.server.limits import MIN_RATE_BURST, AcceptLimiter, LimitError, PerIPLimiter, RateConfig, TokenBucket


def test_token_bucket_try_take_refills_at_rate() -> None:
    b = TokenBucket(rate=2.0, burst=3.0, now=0.0)
    assert [b.try_take(0.0) for _ in range(4)] == [True, True, True, False]
    assert not b.try_take(0.4)  # 0.8 tokens
    assert b.try_take(0.5)  # 1.0 token
    assert b.try_take(100.0) and b.tokens == 2.0  # capped at the burst


@given(st.lists(st.tuples(st.floats(0, 5), st.integers(1, 200_000)), max_size=40))
def test_take_with_waits_never_exceeds_rate(steps: list[tuple[float, int]]) -> None:
    """A reader that sleeps as told never gets more than burst + rate × elapsed."""
    rate, burst = 100_000.0, float(MIN_RATE_BURST)
    b = TokenBucket(rate, burst, now=0.0)
    now = 0.0
    taken = 0
    for gap, n in steps:
        now += gap
        wait = b.take(now, n)
        taken += n
        now += wait
        assert taken <= burst + rate * now + 1e-6 * taken


def test_accept_limiter() -> None:
    unlimited = AcceptLimiter()
    assert all(unlimited.allow(0.0) for _ in range(10_000))
    lim = AcceptLimiter(rate=10, burst=5)
    assert sum(lim.allow(0.0) for _ in range(8)) == 5
    assert (lim.accepted, lim.rejected) == (5, 3)
    assert lim.allow(0.1) and not lim.allow(0.1)
    assert AcceptLimiter(rate=2).bucket.burst == 2  # type: ignore[union-attr]
    assert AcceptLimiter().bucket is None


def test_per_ip_limiter() -> None:
    lim = PerIPLimiter(2)
    assert lim.acquire("10.0.0.1") and lim.acquire("10.0.0.1")
    assert not lim.acquire("10.0.0.1") and lim.acquire("10.0.0.2")
    lim.release("10.0.0.1")
    assert lim.acquire("10.0.0.1")
    for _ in range(3):
        lim.release("10.0.0.1")
    assert "10.0.0.1" not in lim.active and lim.rejected == 1
    assert all(PerIPLimiter(0).acquire("x") for _ in range(100))


def test_rate_config_like_derper(tmp_path: Path) -> None:
    assert RateConfig.from_json('{"PerClientRateLimitBytesPerSec": 1000000}') == RateConfig(1_000_000, MIN_RATE_BURST)
    assert RateConfig.from_json('{"perclientratelimitbytespersec": 5, "PerClientRateBurstBytes": 9000000}') == (
        RateConfig(5, 9_000_000)
    )
    assert not RateConfig.from_json('{"PerClientRateLimitBytesPerSec": 0, "PerClientRateBurstBytes": 5}').enabled
    assert not RateConfig.from_json("{}").enabled
    for bad in ("[]", "nope", '{"PerClientRateLimitBytesPerSec": -1}', '{"PerClientRateLimitBytesPerSec": "1"}'):
        with pytest.raises(LimitError):
            RateConfig.from_json(bad)
    path = tmp_path / "rate.json"
    path.write_text('{"PerClientRateLimitBytesPerSec": 70000, "PerClientRateBurstBytes": 100000}')
    rc = RateConfig.load(path)
    assert rc == RateConfig(70_000, 100_000)
    assert rc.bucket(0.0) is not None and RateConfig().bucket(0.0) is None
    with pytest.raises(LimitError, match="cannot read rate config"):
        RateConfig.load(tmp_path / "missing.json")
