"""Ports: the small interfaces through which the pure core meets the world.

Adapters implement them; the core and the transports only see these Protocols.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol


class Clock(Protocol):
    """Where time comes from. ``now`` is aware (UTC); ``monotonic`` is for timers."""

    def now(self) -> datetime: ...

    def monotonic(self) -> float: ...
