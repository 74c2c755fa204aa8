"""Background transfers that yield: the engine measures idle bandwidth, as BITS does.

BITS measures the traffic of the machine's network interface and gives background jobs
only what nobody else uses (bits-core.md §4; it adds LEDBAT on its HTTP connections).
This controller does the same from the interface counters (``/proc/net/dev``):

    others   = all bytes received on the machine's interfaces - bytes of our background jobs
    capacity = the highest total rate seen recently (decays slowly, so it follows the link)
    allowed  = capacity - others - a safety margin, never below a trickle; halved every
               period instead while the link is full (others grew into the margin)

re-estimated every ``period`` seconds and smoothed; the engine sets it as the rate of the
"yield" bucket that every background transfer takes from. FOREGROUND jobs never take from
it. What it guarantees: traffic of other programs on THIS machine gets the link back
within a second or two. What it does not: traffic of other machines that share a
bottleneck further away is invisible here (that needs delay-based congestion control in
the kernel: Linux's ``lp``, used when the kernel offers it, see ``congestion_controls``).
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import attrs

PROC_NET_DEV = Path("/proc/net/dev")
CONGESTION = Path("/proc/sys/net/ipv4/tcp_available_congestion_control")


def received_bytes(path: Path = PROC_NET_DEV, *, loopback: bool = False) -> int:
    """Bytes received so far on the interfaces that carry our transfers: loopback only
    when they go to this machine, else every other interface (local services talking
    over loopback do not compete for the network link)."""
    total = 0
    try:
        lines = path.read_text().splitlines()[2:]
    except OSError:
        return 0
    for line in lines:
        name, _, fields = line.partition(":")
        if (name.strip() == "lo") is not loopback:
            continue
        parts = fields.split()
        if parts:
            total += int(parts[0])
    return total


def congestion_controls(path: Path = CONGESTION) -> list[str]:
    """The kernel's TCP congestion controls; 'lp' is the low-priority one."""
    try:
        return path.read_text().split()
    except OSError:
        return []


def congestion_of(sock: Any) -> bytes | None:
    """The TCP congestion control of ``sock`` (None: no socket, or not TCP)."""
    if sock is None:
        return None
    try:
        name: bytes = sock.getsockopt(socket.IPPROTO_TCP, _TCP_CONGESTION, 16)
    except OSError:
        return None
    return name.rstrip(b"\0") or None


def set_congestion(sock: Any, name: bytes) -> None:
    """Give ``sock`` the TCP congestion control ``name`` (b"lp": the kernel's low-priority
    one, for a background transfer); a kernel without it leaves the socket as it is."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_CONGESTION, name)


_TCP_CONGESTION: Final = getattr(socket, "TCP_CONGESTION", 13)


@attrs.define
class YieldController:
    period: float = 0.25
    margin: float = 0.10  # of capacity: others above this means competition
    overhead: float = 0.06  # TCP/IP headers: interface bytes per payload byte, beyond 1
    trickle: float = 16 * 1024  # bytes/s: BITS always trickles a little
    floor: float = 128 * 1024  # bytes/s of others' traffic that never counts as competition
    decay: float = 0.998  # per period: the capacity estimate follows a slower link
    counter: Callable[..., int] = received_bytes
    loopback: bool = False  # our background transfers talk to this machine
    clock: Callable[[], float] = time.monotonic
    ours: int = 0  # payload bytes our background transfers received (the engine adds)
    capacity: float = 0.0
    allowed: float | None = None
    others: float = 0.0
    _last: tuple[float, int, int, bool] | None = None  # (time, total, ours, loopback)

    def add(self, amount: int) -> None:
        self.ours += amount

    def update(self, active: bool, queued: int = 0) -> float | None:
        """Re-estimate; returns the background rate to allow (None: unlimited).

        While others use the link, background jobs get the room they leave (less the
        margin kept for them to grow into); only while the link is full (others and we use
        the margin too: they want more than they get) the allowance is halved every period
        instead, so that they get the link back within a few periods, never below the
        trickle. When they stop: multiplicative increase (x2 per period until the limit is
        above the link: unlimited). ``queued``: bytes of our background connections still
        in the kernel's receive buffers (FIONREAD): the interface counted them, we have not
        read them yet."""
        now = self.clock()
        total = self.counter(loopback=self.loopback)
        ours = self.ours + queued
        if self._last is None or self._last[3] is not self.loopback:
            # First look, or the transfers moved between loopback and the other interfaces:
            # the counters are another interface's, so start measuring again (comparing them
            # would read as terabytes per second of others' traffic, throttling to a trickle).
            if self._last is not None:
                self.capacity, self.allowed = 0.0, None
            self._last = (now, total, ours, self.loopback)
            return self.allowed
        then, total_then, ours_then, _ = self._last
        elapsed = now - then
        if elapsed < self.period:
            return self.allowed
        self._last = (now, total, ours, self.loopback)
        total_rate = max(total - total_then, 0) / elapsed
        our_rate = max(ours - ours_then, 0) / elapsed
        self.others = max(total_rate - our_rate * (1 + self.overhead), 0.0)
        # The capacity decays to follow a slower link, but not while our transfers use all
        # they are allowed: the total is then lower by our own restraint, and reading that
        # as a slower link would shrink the room every period, down to the trickle.
        restrained = self.allowed is not None and our_rate >= self.allowed * (1 - self.margin)
        self.capacity = max(self.capacity * (1.0 if restrained else self.decay), total_rate)
        if not active or self.capacity <= 0:
            self.allowed = None
            return None
        if self.others > max(self.capacity * self.margin, self.floor):
            # The room is in interface bytes; the allowance is payload (the buckets count it).
            room = (self.capacity * (1 - self.margin) - self.others) / (1 + self.overhead)
            if total_rate >= self.capacity * (1 - self.margin / 2):
                current = self.allowed if self.allowed is not None else max(our_rate, self.trickle)
                room = min(room, current * 0.5)
            self.allowed = max(self.trickle, room)
        elif self.allowed is not None:
            self.allowed *= 2
            if self.allowed >= self.capacity:
                self.allowed = None
        return self.allowed
