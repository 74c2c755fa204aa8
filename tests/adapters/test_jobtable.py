"""The engine's job table (adapters/jobtable.py) against a plain dict: after any sequence of
assignments and removals, its state index, its blocked index, its background index, its timer
heap and its inactivity heap say what a full scan of the dict says."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backhaul.adapters.jobtable import JobTable
from backhaul.core import event as ev
from backhaul.core import hresult
from backhaul.core import job as jobs
from backhaul.core.job import Job
from backhaul.core.vocabulary import JobState

T0 = datetime(2026, 1, 1, tzinfo=UTC)
IDS = [f"00000000-0000-0000-0000-{i:012d}" for i in range(10)]
BLOCKED = hresult.BG_E_BLOCKED_BY_POLICY


def minutes(n: int) -> datetime:
    return T0 + timedelta(minutes=n)


def deadline(job: Job) -> datetime | None:
    """A stand-in for the engine's timers: a function of the job alone."""
    if job.state not in (JobState.TRANSIENT_ERROR, JobState.TRANSFERRING):
        return None
    return job.modified_at + timedelta(minutes=job.priority.value * 7 % 11)


BASE = jobs.start(ev.JobCreated(T0, IDS[0], jobs.JobType.DOWNLOAD, "j", "owner"))
versions = itertools.count(2)


def a_job(job_id: str, state: JobState, minute: int, blocked: bool, priority: int) -> Job:
    return attrs.evolve(
        BASE,
        id=job_id,
        state=state,
        modified_at=minutes(minute),
        version=next(versions),  # every assignment stands for an event
        blocked_by=BLOCKED if blocked else None,
        priority=jobs.JobPriority(priority),
    )


ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("set"),
            st.sampled_from(IDS),
            st.sampled_from(list(JobState)),
            st.integers(0, 30),
            st.booleans(),
            st.integers(0, 3),
        ),
        st.tuples(st.just("again"), st.sampled_from(IDS)),  # the same job assigned again
        st.tuples(st.just("pop"), st.sampled_from(IDS)),
        st.tuples(st.just("idle"), st.integers(0, 30)),
        st.tuples(st.just("due"), st.integers(0, 40)),
    ),
    max_size=80,
)


@settings(max_examples=500, deadline=None)
@given(ops, st.integers(0, 40), st.sampled_from([0, 4, 1024]), st.sets(st.sampled_from(IDS)))
def test_the_indexes_agree_with_a_scan_of_the_jobs(
    operations: list[tuple], cutoff_minute: int, slack: int, running: set[str]
) -> None:
    table = JobTable(deadline=deadline)
    table.stale_slack = slack
    model: dict[str, Job] = {}
    first_seen: list[str] = []
    idle_taken: set[str] = set()  # returned by idle_before since their last change
    due_taken: set[str] = set()  # returned by due_before since their last change
    for op in operations:
        if op[0] == "set":
            _, job_id, state, minute, blocked, priority = op
            if job_id not in model:
                first_seen.append(job_id)
            idle_taken.discard(job_id)
            due_taken.discard(job_id)
            table[job_id] = model[job_id] = a_job(job_id, state, minute, blocked, priority)
        elif op[0] == "again":
            if op[1] in model:
                table[op[1]] = model[op[1]]  # no change: nothing comes back
        elif op[0] == "pop":
            _, job_id = op
            assert table.pop(job_id, None) is model.pop(job_id, None)
            if job_id in first_seen:
                first_seen.remove(job_id)
            idle_taken.discard(job_id)
            due_taken.discard(job_id)
        elif op[0] == "idle":
            cutoff = minutes(op[1])
            got = [j.id for j in table.idle_before(cutoff)]
            assert len(got) == len(set(got)), "a job came up twice"
            assert set(got) == {
                j for j, job in model.items() if job.modified_at <= cutoff and j not in idle_taken
            }
            idle_taken |= set(got)
        else:
            now = minutes(op[1])
            timed = {j: deadline(job) for j, job in model.items() if deadline(job) is not None}
            pending = {j: d for j, d in timed.items() if j not in due_taken}
            assert table.next_due() == (min(pending.values()) if pending else None)
            got = [j.id for j in table.due_before(now)]
            assert len(got) == len(set(got)), "a job came up twice"
            assert set(got) == {j for j, d in pending.items() if d <= now}
            due_taken |= set(got)
        assert dict(table) == model
    for state in JobState:
        assert {j.id for j in table.in_states([state])} == {
            j for j, job in model.items() if job.state is state
        }
        assert table.count(state) == sum(1 for j in model.values() if j.state is state)
    assert [j.id for j in table.ordered(list(model))] == first_seen
    assert {j.id for j in table.blocked()} == {
        j
        for j, job in model.items()
        if job.state is JobState.TRANSIENT_ERROR and job.blocked_by is not None
    }
    assert table.count_blocked() == len(table.blocked())
    background = {
        j for j in running if j in model and model[j].priority is not jobs.JobPriority.FOREGROUND
    }
    for ids in (running, dict.fromkeys(running), sorted(running)):  # a set, a dict, a list
        got = table.background_among(ids)
        assert sorted(got) == sorted(background), ids
    for job_id in idle_taken:  # remind puts a taken job back
        table.remind(model[job_id])
    for job_id in due_taken:
        table.remind_timer(model[job_id])
    cutoff = minutes(cutoff_minute)
    assert {j.id for j in table.idle_before(cutoff)} == {
        j for j, job in model.items() if job.modified_at <= cutoff
    }
    assert {j.id for j in table.due_before(cutoff)} == {
        j for j, job in model.items() if (d := deadline(job)) is not None and d <= cutoff
    }


def test_the_table_refuses_bulk_changes_that_would_bypass_its_indexes() -> None:
    table = JobTable(deadline=deadline)
    job = a_job(IDS[0], JobState.TRANSIENT_ERROR, 0, True, 1)
    with pytest.raises(TypeError):
        table.update({IDS[0]: job})
    with pytest.raises(TypeError):
        table.setdefault(IDS[0], job)
    table[IDS[0]] = job
    table.clear()
    assert table.in_states(list(JobState)) == [] and table.blocked() == []
    assert table.idle_before(minutes(99)) == [] and table.next_due() is None
