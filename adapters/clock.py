"""The system clock, and a settable one for tests and replays."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import attrs


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()


@attrs.define
class ManualClock:
    """A clock that moves only when told to."""

    current: datetime = attrs.field(factory=lambda: datetime(2026, 1, 1, tzinfo=UTC))
    ticks: float = 0.0

    def now(self) -> datetime:
        return self.current

    def monotonic(self) -> float:
        return self.ticks

    def advance(self, delta: timedelta | float) -> None:
        seconds = delta.total_seconds() if isinstance(delta, timedelta) else float(delta)
        self.current += timedelta(seconds=seconds)
        self.ticks += seconds
