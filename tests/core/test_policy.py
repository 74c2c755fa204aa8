"""The scheduler's plan (core/policy.py): pure rules, bits-core.md §4."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from itertools import count

import pytest

from backhaul.core.policy import Candidate, plan
from backhaul.core.vocabulary import JobPriority

T0 = datetime(2026, 1, 1, tzinfo=UTC)
SLICE = timedelta(seconds=1)


def test_background_jobs_beyond_max_background_go_back_by_priority_then_longest_running() -> None:
    """A FOREGROUND job lowered next to the background job that runs: two run for one slot.
    The lower priority goes back first, then the one that has run longest."""
    running = [
        Candidate("a", JobPriority.NORMAL, True, T0),
        Candidate("b", JobPriority.NORMAL, True, T0 + timedelta(seconds=5)),
        Candidate("low", JobPriority.LOW, True, T0 + timedelta(seconds=8)),
    ]
    decision = plan(running, T0 + timedelta(seconds=10), max_background=1)
    assert set(decision.stop) == {"low", "a"}
    assert decision.start == ()
    # Two slots: only the lower priority goes.
    assert plan(running, T0 + timedelta(seconds=10), max_background=2).stop == ("low",)


@pytest.mark.parametrize(("jobs", "slots"), [(2, 1), (3, 1), (3, 2), (5, 2), (4, 3), (7, 3)])
def test_jobs_of_one_priority_get_equal_turns_when_their_slices_end_together(
    jobs: int, slots: int
) -> None:
    """Driven as Engine._schedule drives it: a job's ``since`` and ``turn`` are set when
    its turn begins or ends, ``turn`` counting in the plan's order. Over ``4 * jobs`` slices
    every job runs for ``4 * slots`` of them."""
    ids = [f"j{i}" for i in range(jobs)]
    last = dict.fromkeys(ids, (T0, 0))
    running: set[str] = set()
    share: Counter[str] = Counter()
    counter = count(1)
    for step in range(jobs * 4):
        now = T0 + step * SLICE
        candidates = [Candidate(j, JobPriority.NORMAL, j in running, *last[j]) for j in ids]
        decision = plan(candidates, now, max_background=slots, slice_length=SLICE)
        for j in decision.stop:
            running.discard(j)
            last[j] = (now, next(counter))
        for j in decision.start:
            running.add(j)
            last[j] = (now, next(counter))
        assert len(running) == slots
        share.update(running)
    assert set(share.values()) == {4 * slots}, share
