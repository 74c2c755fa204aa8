"""The yield controller (adapters/yielding.py) against scripted interface counters and clock."""

from __future__ import annotations

import itertools

import pytest

from backhaul.adapters.yielding import YieldController, received_bytes

MiB = 1024 * 1024


class Link:
    """Interface counters: loopback and the other interfaces count separately."""

    def __init__(self) -> None:
        # Loopback carries far more than the real interface on a machine whose services
        # talk to each other locally (terabytes over an uptime).
        self.lo = 5_000_000_000_000
        self.other = 40_000_000
        self.now = 0.0

    def counter(self, *, loopback: bool = False) -> int:
        return self.lo if loopback else self.other

    def clock(self) -> float:
        return self.now


def controller(link: Link) -> YieldController:
    return YieldController(counter=link.counter, clock=link.clock)


def tick(y: YieldController, link: Link, *, ours: int, others: int, lo: bool) -> float | None:
    """One period in which our background transfers received ``ours`` bytes and other
    programs ``others`` on the interface the transfers use."""
    link.now += y.period
    y.add(ours)
    moved = int(ours * (1 + y.overhead)) + others
    if lo:
        link.lo += moved
    else:
        link.other += moved
    return y.update(True)


def test_alone_on_the_link_a_background_job_is_not_throttled() -> None:
    link = Link()
    y = controller(link)
    y.update(True)
    for _ in range(20):
        assert tick(y, link, ours=16 * MiB, others=0, lo=False) is None


def test_others_traffic_halves_the_allowance_then_it_doubles_back_to_unlimited() -> None:
    link = Link()
    y = controller(link)
    y.update(True)
    for _ in range(4):
        tick(y, link, ours=16 * MiB, others=0, lo=False)  # capacity: ~64 MiB/s
    allowed = [tick(y, link, ours=2 * MiB, others=12 * MiB, lo=False) for _ in range(3)]
    assert all(a is not None for a in allowed)
    assert allowed[0] is not None and allowed[0] < 64 * MiB
    assert allowed[2] is not None and allowed[2] < allowed[0]  # backs off while others run
    after = [tick(y, link, ours=1 * MiB, others=0, lo=False) for _ in range(20)]
    assert after[-1] is None  # they stopped: back to unlimited
    assert any(a is not None for a in after[:3])  # not at once: doubling per period


def shared(y: YieldController, link: Link, allowed: float | None, others: float) -> float | None:
    """One period on a link of 64 MiB/s of payload where other programs take ``others``
    bytes/s first: our background transfers get what is allowed of the rest."""
    free = 64 * MiB - others
    ours = free if allowed is None else min(allowed, free)
    return tick(y, link, ours=int(ours * y.period), others=int(others * y.period), lo=False)


def test_steady_other_traffic_leaves_background_jobs_the_room_it_leaves() -> None:
    """Another program's 16 MiB/s on a 64 MiB/s link leaves ~40 MiB/s (less the margin):
    the allowance settles there and stays, rather than halving every period down to the
    trickle while 48 MiB/s are idle."""
    link = Link()
    y = controller(link)
    allowed = y.update(True)
    for _ in range(8):
        allowed = shared(y, link, allowed, 0)  # alone: the capacity is learnt
    assert allowed is None
    seen = []
    for _ in range(120):  # 30 s
        allowed = shared(y, link, allowed, 16 * MiB)
        seen.append(allowed)
    assert all(a is not None for a in seen)
    room = (y.capacity * (1 - y.margin) - y.others) / (1 + y.overhead)
    assert seen[-1] == pytest.approx(room)
    assert room > 40 * MiB
    assert len(set(seen[-100:])) == 1  # steady: the capacity did not decay either


def test_on_a_full_link_the_allowance_halves_every_period_down_to_the_trickle() -> None:
    """Others that want the whole link (a download of theirs): whatever we leave, they take,
    so the link stays full; we back off multiplicatively and keep a trickle."""
    link = Link()
    y = controller(link)
    allowed = y.update(True)
    for _ in range(8):
        allowed = shared(y, link, allowed, 0)
    seen = []
    for _ in range(40):
        ours = 64 * MiB / 2 if allowed is None else min(allowed, 64 * MiB)
        greedy = 64 * MiB * (1 + y.overhead) - ours * (1 + y.overhead)
        allowed = tick(y, link, ours=int(ours * y.period), others=int(greedy * y.period), lo=False)
        seen.append(allowed)
    assert all(a is not None for a in seen)
    backing = [a for a in seen if a is not None and a > y.trickle] + [y.trickle]
    assert len(backing) >= 3
    assert all(b <= a * 0.5 for a, b in itertools.pairwise(backing))  # at least halved
    assert seen[-1] == y.trickle


def test_moving_to_loopback_starts_measuring_again() -> None:
    """The engine learns from the first socket that the transfers go to this machine and
    switches the counter to loopback. The two interfaces' totals must never be compared:
    that read as terabytes per second of others' traffic and held a lone background job
    to the trickle, then to doubling from it (1,000 x 64 KiB from a local server: 5.6 s
    instead of 1.3 s)."""
    link = Link()
    y = controller(link)
    y.update(True)  # measured on the other interfaces
    tick(y, link, ours=0, others=0, lo=False)
    y.loopback = True
    for _ in range(12):
        assert tick(y, link, ours=16 * MiB, others=0, lo=True) is None
    assert y.capacity < 1024 * MiB  # a loopback rate, not the difference of two counters
    # ... and it still yields to others on loopback.
    for _ in range(3):
        last = tick(y, link, ours=2 * MiB, others=12 * MiB, lo=True)
    assert last is not None


def test_received_bytes_reads_the_chosen_interfaces(tmp_path) -> None:
    dev = tmp_path / "dev"
    dev.write_text(
        "Inter-|   Receive\n"
        " face |bytes    packets\n"
        "    lo: 1000 10 0 0 0 0 0 0 1000 10 0 0 0 0 0 0\n"
        "  eth0: 200 2 0 0 0 0 0 0 300 3 0 0 0 0 0 0\n"
        "  eth1: 30 1 0 0 0 0 0 0 0 0 0 0 0 0 0 0\n"
    )
    assert received_bytes(dev, loopback=True) == 1000
    assert received_bytes(dev) == 230
    assert received_bytes(tmp_path / "missing") == 0
