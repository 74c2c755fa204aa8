"""The engine's job table (adapters/jobtable.py) against a plain dict: after any sequence of
assignments and removals, its state index and its inactivity heap say what a full scan of the
dict says."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backhaul.adapters.jobtable import JobTable
from backhaul.core import event as ev
from backhaul.core import job as jobs
from backhaul.core.job import Job
from backhaul.core.vocabulary import JobState, JobType

T0 = datetime(2026, 1, 1, tzinfo=UTC)
IDS = [f"00000000-0000-0000-0000-{i:012d}" for i in range(12)]


def a_job(job_id: str, state: JobState, minute: int) -> Job:
    created = jobs.start(ev.JobCreated(T0, job_id, JobType.DOWNLOAD, "j", "owner"))
    return attrs.evolve(created, state=state, modified_at=T0 + timedelta(minutes=minute))


ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("set"),
            st.sampled_from(IDS),
            st.sampled_from(list(JobState)),
            st.integers(0, 30),
        ),
        st.tuples(st.just("pop"), st.sampled_from(IDS)),
        st.tuples(st.just("idle"), st.integers(0, 30)),
    ),
    max_size=80,
)


@settings(max_examples=500, deadline=None)
@given(ops, st.integers(0, 30), st.sampled_from([0, 4, 1024]))
def test_the_indexes_agree_with_a_scan_of_the_jobs(
    operations: list[tuple], cutoff_minute: int, slack: int
) -> None:
    table = JobTable()
    table.stale_slack = slack
    model: dict[str, Job] = {}
    first_seen: list[str] = []
    reported: dict[str, datetime] = {}  # jobs idle_before returned, as of that modified_at
    for op in operations:
        if op[0] == "set":
            _, job_id, state, minute = op
            job = a_job(job_id, state, minute)
            old = model.get(job_id)
            if old is None:
                first_seen.append(job_id)
            if old is None or old.modified_at != job.modified_at:
                reported.pop(job_id, None)  # a change puts it back in the heap
            table[job_id] = model[job_id] = job
        elif op[0] == "pop":
            _, job_id = op
            assert table.pop(job_id, None) is model.pop(job_id, None)
            if job_id in first_seen:
                first_seen.remove(job_id)
            reported.pop(job_id, None)
        else:
            cutoff = T0 + timedelta(minutes=op[1])
            due = table.idle_before(cutoff)
            expected = {
                j for j, job in model.items() if job.modified_at <= cutoff and j not in reported
            }
            assert {j.id for j in due} == expected
            assert len(due) == len({j.id for j in due}), "a job came up twice"
            for job in due:
                reported[job.id] = job.modified_at
        assert dict(table) == model
    for state in JobState:
        assert [j.id for j in table.in_states([state])] == [
            j for j in first_seen if model[j].state is state
        ]
        assert table.count(state) == sum(1 for j in model.values() if j.state is state)
    both = [JobState.QUEUED, JobState.TRANSFERRING]
    assert [j.id for j in table.in_states(both)] == [
        j for j in first_seen if model[j].state in both
    ]
    for job_id in reported:  # remind puts a reported job back
        table.remind(model[job_id])
    cutoff = T0 + timedelta(minutes=cutoff_minute)
    assert {j.id for j in table.idle_before(cutoff)} == {
        j for j, job in model.items() if job.modified_at <= cutoff
    }


def test_the_table_refuses_bulk_changes_that_would_bypass_its_indexes() -> None:
    table = JobTable()
    with pytest.raises(TypeError):
        table.update({IDS[0]: a_job(IDS[0], JobState.QUEUED, 0)})
    with pytest.raises(TypeError):
        table.setdefault(IDS[0], a_job(IDS[0], JobState.QUEUED, 0))
    table[IDS[0]] = a_job(IDS[0], JobState.QUEUED, 0)
    table.clear()
    assert table.in_states(list(JobState)) == [] and table.idle_before(T0) == []
