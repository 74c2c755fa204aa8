"""Bandwidth limits and schedules, and the network's cost (bits-core.md §4, §14, §16).

- A ``Limit`` is a rate in bytes per second (``0`` blocks background transfers:
  BG_E_BLOCKED_BY_POLICY, as MaxInternetBandwidth=0 does), optionally only inside a
  weekly ``Window`` (rclone-style timetables; BITS's work-hours schedules).
- A ``BandwidthPolicy`` has global limits and per-priority limits; inside each list the
  first limit whose window holds applies. The effective limit of a background job is the
  smallest of: the global limit, its priority's limit, and its own ``max_rate``
  (beyond BITS, as aria2's per-download limit). FOREGROUND jobs are never throttled by
  the policy (BITS exempts them); only their own ``max_rate`` applies.
- Cost: a job may run when the network's cost state bit is in its cost flags
  (BITS_JOB_PROPERTY_ID_COST_FLAGS), else it is blocked with
  BG_E_BLOCKED_BY_COST_TRANSFER_POLICY.
Times are local wall-clock times passed in by the caller; the core reads no clock.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from types import MappingProxyType
from typing import Any

import attrs

from backhaul.core import hresult
from backhaul.core.error import BitsError
from backhaul.core.url import is_parameter_name
from backhaul.core.vocabulary import CostFlags, JobPriority

_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_WEEK = frozenset(range(7))
DAY = 24 * 60  # minutes


@attrs.frozen
class Window:
    """Weekdays (0 = Monday) and a daily span in minutes [start, end); end < start wraps
    past midnight."""

    days: frozenset[int]
    start: int
    end: int

    def __attrs_post_init__(self) -> None:
        # Checked wherever a window is built (parsed, given to the API, read back from the
        # log): a day outside the week or a minute outside the day would never hold as
        # meant, and could not be shown (getbandwidth) or parsed back.
        if not self.days or not self.days <= _WEEK:
            raise BitsError(
                hresult.E_INVALIDARG, f"a window's days are 0 (Monday) to 6, not {self.days!r}"
            )
        if not (0 <= self.start < DAY and 0 <= self.end <= DAY):
            raise BitsError(
                hresult.E_INVALIDARG,
                f"a window's minutes are 0 to {DAY} (start before {DAY}), "
                f"not {self.start!r}-{self.end!r}",
            )

    def holds(self, at: datetime) -> bool:
        minute = at.hour * 60 + at.minute
        if self.start <= self.end:
            return at.weekday() in self.days and self.start <= minute < self.end
        if minute >= self.start:
            return at.weekday() in self.days
        return (at.weekday() - 1) % 7 in self.days and minute < self.end

    def __str__(self) -> str:
        days = ",".join(_DAYS[d] for d in sorted(self.days))
        return f"{days} {self.start // 60:02d}:{self.start % 60:02d}-{self.end // 60:02d}:{self.end % 60:02d}"


@attrs.frozen
class Limit:
    rate: int  # bytes per second; 0 blocks background jobs
    window: Window | None = None


def _frozen_mapping(
    value: Mapping[int, tuple[Limit, ...]],
) -> Mapping[int, tuple[Limit, ...]]:
    return MappingProxyType(dict(value))


@attrs.frozen
class BandwidthPolicy:
    global_limits: tuple[Limit, ...] = ()
    priority_limits: Mapping[int, tuple[Limit, ...]] = attrs.field(
        factory=dict, converter=_frozen_mapping
    )

    def to_data(self) -> dict[str, Any]:
        return {
            "global": [_limit_data(x) for x in self.global_limits],
            "priority": {
                str(p): [_limit_data(x) for x in limits]
                for p, limits in sorted(self.priority_limits.items())
            },
        }

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> BandwidthPolicy:
        return cls(
            tuple(_limit_of(x) for x in data.get("global", ())),
            {int(p): tuple(_limit_of(x) for x in v) for p, v in data.get("priority", {}).items()},
        )


def _limit_data(limit: Limit) -> dict[str, Any]:
    window = limit.window
    return {
        "rate": limit.rate,
        "window": None
        if window is None
        else {"days": sorted(window.days), "start": window.start, "end": window.end},
    }


def _limit_of(data: Mapping[str, Any]) -> Limit:
    w = data.get("window")
    window = None if w is None else Window(frozenset(w["days"]), w["start"], w["end"])
    return Limit(int(data["rate"]), window)


def current_limit(limits: tuple[Limit, ...], at: datetime) -> int | None:
    """The rate of the first limit whose window holds at ``at`` (None: no limit)."""
    for limit in limits:
        if limit.window is None or limit.window.holds(at):
            return limit.rate
    return None


def effective_rate(
    policy: BandwidthPolicy, priority: JobPriority, max_rate: int | None, at: datetime
) -> int | None:
    """Bytes per second the job may use now; None = unlimited; 0 = blocked."""
    rates: list[int | None] = [max_rate] if max_rate else []
    if priority is not JobPriority.FOREGROUND:
        rates.append(current_limit(policy.global_limits, at))
        rates.append(current_limit(policy.priority_limits.get(int(priority), ()), at))
    known = [r for r in rates if r is not None]
    return min(known) if known else None


def policy_blocks(policy: BandwidthPolicy, priority: JobPriority, at: datetime) -> bool:
    """A limit of 0 holds now for this background priority."""
    if priority is JobPriority.FOREGROUND:
        return False
    return 0 in (
        current_limit(policy.global_limits, at),
        current_limit(policy.priority_limits.get(int(priority), ()), at),
    )


def cost_allows(cost_flags: int, network_cost: int) -> bool:
    """BITS_COST_STATE_*: the network's state bit must be in the job's flags."""
    return bool(cost_flags & network_cost & ~int(CostFlags.IGNORE_CONGESTION))


# -- parsing, for the API and the CLI --------------------------------------------------------

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]?)(i?)(bits?|b)?(?:/s|ps)?\s*$", re.I)
_WINDOW = re.compile(
    r"^\s*(?P<days>[a-z,\-]+)\s+(?P<h1>\d{1,2}):(?P<m1>\d{2})-(?P<h2>\d{1,2}):(?P<m2>\d{2})\s*$",
    re.I,
)


def parse_rate(text: str | int) -> int:
    """'0', '500k', '1.5M', '10MiB', '100kB/s' -> bytes per second (k = 1000, Ki = 1024);
    'bit' and a lower-case 'b' are bits, as in '8Mbit', '500kbps' (the kilobits per second
    of BITS's MaxInternetBandwidth), '2Mb/s'. A positive rate below 1 B/s is 1 B/s, not 0:
    0 blocks background jobs, where BITS treats a tiny limit as a slow one (bits-core.md
    §4)."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise BitsError(hresult.E_INVALIDARG, "a rate cannot be negative")
        return text
    match = _RATE.match(str(text))
    if match is None:
        raise BitsError(hresult.E_INVALIDARG, f"{text!r} is not a rate such as 500k or 2MiB")
    number, prefix, binary, unit = match.groups()
    base = 1024 if binary else 1000
    scale = {"": 1, "k": base, "m": base**2, "g": base**3}[prefix.lower()]
    value = float(number) * scale
    if unit is not None and (unit == "b" or unit.lower().startswith("bit")):
        value /= 8
    return max(int(value), 1) if value > 0 else 0


def parse_window(text: str) -> Window:
    """'mon-fri 09:00-17:00', 'sat,sun 00:00-24:00', 'all 22:00-06:00'."""
    match = _WINDOW.match(text)
    if match is None:
        raise BitsError(
            hresult.E_INVALIDARG, f"{text!r} is not a window like 'mon-fri 09:00-17:00'"
        )
    days: set[int] = set()
    for part in match["days"].lower().split(","):
        if part in ("all", "daily", "*"):
            days.update(range(7))
        elif "-" in part:
            a, b = part.split("-", 1)
            i, j = _day(a), _day(b)
            days.update(range(i, j + 1) if i <= j else [*range(i, 7), *range(j + 1)])
        else:
            days.add(_day(part))
    m1, m2 = int(match["m1"]), int(match["m2"])
    start, end = int(match["h1"]) * 60 + m1, int(match["h2"]) * 60 + m2
    if max(m1, m2) > 59 or start > DAY or end > DAY or start == end:
        raise BitsError(
            hresult.E_INVALIDARG,
            f"{text!r}: times are 00:00 to 24:00 (minutes to 59), start != end",
        )
    return Window(frozenset(days), start % DAY, end)


def _day(name: str) -> int:
    try:
        return _DAYS.index(name[:3])
    except ValueError:
        raise BitsError(hresult.E_INVALIDARG, f"{name!r} is not a weekday") from None


@attrs.frozen
class EngineSettings:
    """The fold of the policy stream: what every engine on the store applies."""

    bandwidth: BandwidthPolicy = attrs.field(factory=BandwidthPolicy)
    network_cost: int | None = None  # None: read it from the system
    # Query parameters to keep out of the log as the built-in signature names are
    # (core.url.declare_secret_parameters).
    secret_parameters: tuple[str, ...] = ()
    version: int = 0

    def evolve(self, name: str, value: Any) -> EngineSettings:
        if name == "secret_parameters":
            # Names the setter checked; one that is not a name (a log edited by hand) is
            # left out rather than stop every manager and engine of the store from starting.
            names = tuple(n for n in value or () if is_parameter_name(n))
            return attrs.evolve(self, secret_parameters=names, version=self.version + 1)
        if name == "bandwidth":
            try:
                policy = BandwidthPolicy.from_data(value)
            except BitsError:
                # A window the setter did not check (a log from before it did, or edited by
                # hand): refused, as the setter refuses it now, rather than stop every
                # manager and engine of the store from starting; the previous policy stays.
                return attrs.evolve(self, version=self.version + 1)
            return attrs.evolve(self, bandwidth=policy, version=self.version + 1)
        if name == "network_cost":
            return attrs.evolve(self, network_cost=value, version=self.version + 1)
        return attrs.evolve(self, version=self.version + 1)


def check_network_cost(value: int | None) -> int | None:
    """One BITS_COST_STATE_* bit, or None for 'read it from the system'."""
    if value is None:
        return None
    states = [int(f) for f in CostFlags if f is not CostFlags.IGNORE_CONGESTION]
    if value not in states:
        raise BitsError(
            hresult.E_INVALIDARG, f"a network cost is one BITS_COST_STATE_* bit, not {value!r}"
        )
    return int(value)
