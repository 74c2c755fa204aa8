"""The engine's copy of the jobs it watches, indexed so that a loop of the engine costs what
the jobs that can move cost, not what the whole live set costs.

With 100,000 live jobs of which a handful run, walking every job several times a loop was the
engine's whole cost (RESULTS-scale.md §1). The table keeps:

* an index by BG_JOB_STATE, so the scheduler, the timers and the policies walk only the states
  they act on (``in_states``), in the order the table first saw the jobs;
* the inactivity deadlines in a heap by ``modified_at`` (``idle_before``): JobInactivityTimeout
  is checked against the oldest jobs only. Entries are lazy: a job's new ``modified_at`` pushes
  a new entry and the old one is skipped when it comes up; the heap is rebuilt when stale
  entries outnumber the jobs.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable
from datetime import datetime

from backhaul.core.job import Job
from backhaul.core.vocabulary import JobState


class JobTable(dict[str, Job]):
    """``job id -> Job`` with a state index and an inactivity heap. Only item assignment,
    ``del``, ``pop`` and ``clear`` change it (``update`` and ``setdefault`` are refused, so the
    indexes cannot be bypassed)."""

    stale_slack = 1024  # stale heap entries tolerated beyond one per job before a rebuild

    def __init__(self) -> None:
        super().__init__()
        self._by_state: dict[JobState, dict[str, None]] = {s: {} for s in JobState}
        self._order: dict[str, int] = {}
        self._seq = itertools.count()
        self._idle: list[tuple[datetime, int, str]] = []

    def __setitem__(self, job_id: str, job: Job) -> None:
        old = dict.get(self, job_id)
        if old is None:
            self._order[job_id] = next(self._seq)
        elif old.state is not job.state:
            del self._by_state[old.state][job_id]
        self._by_state[job.state][job_id] = None
        dict.__setitem__(self, job_id, job)
        if old is None or old.modified_at != job.modified_at:
            self.remind(job)

    def __delitem__(self, job_id: str) -> None:
        job = dict.pop(self, job_id)
        del self._by_state[job.state][job_id]
        del self._order[job_id]

    def pop(self, job_id: str, *default: Job | None) -> Job | None:  # type: ignore[override]
        if job_id in self:
            job = dict.__getitem__(self, job_id)
            del self[job_id]
            return job
        if default:
            return default[0]
        raise KeyError(job_id)

    def clear(self) -> None:
        dict.clear(self)
        for ids in self._by_state.values():
            ids.clear()
        self._order.clear()
        self._idle.clear()

    def update(self, *args: object, **kwargs: object) -> None:  # type: ignore[override]
        raise TypeError("JobTable: assign jobs one by one")

    def setdefault(self, *args: object, **kwargs: object) -> Job:  # type: ignore[override]
        raise TypeError("JobTable: assign jobs one by one")

    def in_states(self, states: Iterable[JobState]) -> list[Job]:
        """The jobs in ``states``, in the order the table first saw them."""
        return self.ordered([job_id for state in states for job_id in self._by_state[state]])

    def ordered(self, job_ids: Iterable[str]) -> list[Job]:
        """These jobs, in the order the table first saw them."""
        return [dict.__getitem__(self, j) for j in sorted(job_ids, key=self._order.__getitem__)]

    def count(self, state: JobState) -> int:
        return len(self._by_state[state])

    def idle_before(self, cutoff: datetime) -> list[Job]:
        """The jobs last modified at or before ``cutoff``, each once: they leave the heap and
        come back with their next change, or with ``remind``."""
        due: dict[str, Job] = {}  # a job whose time went back and forth has two entries
        while self._idle and self._idle[0][0] <= cutoff:
            at, _, job_id = heapq.heappop(self._idle)
            job = dict.get(self, job_id)
            if job is not None and job.modified_at == at:
                due[job_id] = job
        return list(due.values())

    def remind(self, job: Job) -> None:
        """(Re)enter ``job`` in the inactivity heap at its ``modified_at``."""
        heapq.heappush(self._idle, (job.modified_at, self._order[job.id], job.id))
        if len(self._idle) > 2 * len(self) + self.stale_slack:
            self._idle = [(j.modified_at, self._order[j.id], j.id) for j in dict.values(self)]
            heapq.heapify(self._idle)
