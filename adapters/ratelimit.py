"""Rate limiting for the engine: token buckets in "debt" form.

Each transfer takes tokens for the bytes it just received from every bucket that applies
(its job's, its priority's, the global one); a bucket in debt makes the taker sleep
until the debt is paid at the bucket's current rate. Over any window longer than a few
chunks the mean rate is the limit, and a changed limit applies to the next chunk.
Rates come from ``core.bandwidth.effective_rate``; this module only enforces them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable

import attrs

BURST_SECONDS = 0.25  # a bucket holds at most this many seconds of its rate
STEP = 0.1  # longest sleep before the rates are read again


@attrs.define
class Bucket:
    rate: float | None = None  # bytes per second; None = unlimited
    tokens: float = 0.0
    stamp: float = attrs.field(factory=time.monotonic)

    def refill(self, now: float) -> None:
        if self.rate is None:
            self.tokens = 0.0  # unlimited: any debt is forgiven
        else:
            cap = self.rate * BURST_SECONDS
            self.tokens = min(cap, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_for(self) -> float:
        if self.rate is None or self.tokens >= 0:
            return 0.0
        return -self.tokens / max(self.rate, 1.0)


class RateLimiter:
    """Buckets by name ("global", "priority:2", "job:<id>"), rates set by the engine."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._buckets: dict[str, Bucket] = {}
        self._clock = clock
        self.rates: dict[str, float] = {}  # measured, for `monitor`
        self._window: dict[str, tuple[float, int]] = {}

    def set_rate(self, name: str, rate: float | None) -> None:
        bucket = self._buckets.setdefault(name, Bucket(stamp=self._clock()))
        bucket.refill(self._clock())
        bucket.rate = rate

    def rate(self, name: str) -> float | None:
        bucket = self._buckets.get(name)
        return bucket.rate if bucket else None

    def forget(self, name: str) -> None:
        self._buckets.pop(name, None)
        self._window.pop(name, None)
        self.rates.pop(name, None)

    def limited(self, names: Iterable[str]) -> bool:
        """Whether any of these buckets has a rate (else ``take`` need not be called)."""
        buckets = self._buckets
        return any((b := buckets.get(n)) is not None and b.rate is not None for n in names)

    async def take(self, names: Iterable[str], amount: int) -> None:
        """Charge ``amount`` bytes to every named bucket, then wait while any is in debt.
        The wait re-reads the rates every step, so a raised (or removed) limit frees a
        waiting transfer at once instead of after a debt priced at the old rate."""
        now = self._clock()
        buckets = []
        for name in names:
            bucket = self._buckets.setdefault(name, Bucket(stamp=now))
            bucket.refill(now)
            bucket.tokens -= amount
            buckets.append(bucket)
            self._measure(name, now, amount)
        while True:
            now = self._clock()
            delay = 0.0
            for bucket in buckets:
                bucket.refill(now)
                delay = max(delay, bucket.wait_for())
            if delay <= 0:
                return
            await asyncio.sleep(min(delay, STEP))

    def _measure(self, name: str, now: float, amount: int) -> None:
        start, total = self._window.get(name, (now, 0))
        total += amount
        if now - start >= 2.0:
            self.rates[name] = total / (now - start)
            start, total = now, 0
        self._window[name] = (start, total)
