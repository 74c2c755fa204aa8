"""The engine's copy of the jobs it watches, indexed so that a loop of the engine costs what
the jobs that can move cost, not what the whole live set costs.

With 100,000 live jobs of which a handful run, walking every job several times a loop was the
engine's whole cost (RESULTS-scale.md §1). The table keeps:

* an index by BG_JOB_STATE, so the scheduler and the policies walk only the states they act on
  (``in_states``); ``ordered`` gives jobs in the order the table first saw them;
* the TRANSIENT_ERROR jobs that a policy blocks (``blocked``), the only ones of that state the
  policies look at while the network is up;
* the background jobs (``background``: any priority but FOREGROUND), so that a loop of an
  engine running 10,000 foreground jobs does not walk them to find the background ones;
* the timers (retry, no-progress, maximum download time) in a heap by due time (``due_before``,
  ``next_due``), computed by the ``deadline`` function the engine gives;
* the inactivity deadlines in a heap by ``modified_at`` (``idle_before``): JobInactivityTimeout
  is checked against the oldest jobs only.

Heap entries are lazy: a job's change pushes a new entry, and an entry whose job has changed
since is skipped when it comes up; a heap is rebuilt when stale entries outnumber the jobs.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable
from datetime import datetime

from backhaul.adapters.notify import command_line_due_at
from backhaul.core.job import Job
from backhaul.core.policy import next_timer
from backhaul.core.vocabulary import JobPriority, JobState

_Entry = tuple[datetime, int, str, int]  # (when, first-seen order, job id, job version)


def _no_deadline(_job: Job) -> datetime | None:
    return None


# States in which a job has timers (retry, no-progress, maximum download time).
_TIMED = frozenset({JobState.TRANSIENT_ERROR, JobState.CONNECTING, JobState.TRANSFERRING})
# States an engine acts on whatever the time: it always holds these jobs.
_ACTIVE = frozenset({JobState.QUEUED, JobState.CONNECTING, JobState.TRANSFERRING})


def timer_deadline(job: Job) -> datetime | None:
    """When the job's next timer fires. Constant between two events of the job: a running
    job's MaximumDownloadTime deadline is its active start plus the time it has left."""
    due = next_timer(job, job.modified_at) if job.state in _TIMED else None
    return None if due is None else due[1]


def wake_at(job: Job) -> datetime | None:
    """When an engine must next hold this job in memory (the read model's ``next_due``).

    QUEUED, CONNECTING, TRANSFERRING jobs and TRANSIENT_ERROR jobs a policy blocks: always
    (their ``modified_at``, which is past); of the background QUEUED jobs an engine holds only
    the longest waiting by priority (``Engine.queue_window``), and reads more as they start.
    Other TRANSIENT_ERROR jobs: at their first timer (the retry, or NoProgressTimeout).
    TRANSFERRED and ERROR jobs: when their notify command line is due, if they have one.
    SUSPENDED jobs and the rest: never (None): an event of theirs, or JobInactivityTimeout,
    brings them in. An engine with 100,000 jobs waiting for a retry thus loads only the ones
    whose time is near.
    """
    if job.state in _ACTIVE or (
        job.state is JobState.TRANSIENT_ERROR and job.blocked_by is not None
    ):
        return job.modified_at
    if job.state is JobState.TRANSIENT_ERROR:
        return timer_deadline(job)
    if job.state in (JobState.TRANSFERRED, JobState.ERROR):
        return command_line_due_at(job)
    return None


class JobTable(dict[str, Job]):
    """``job id -> Job`` with the indexes above. Only item assignment, ``del``, ``pop`` and
    ``clear`` change it (``update`` and ``setdefault`` are refused, so the indexes cannot be
    bypassed). ``deadline(job)``: when the job's next timer fires, or None."""

    stale_slack = 1024  # stale heap entries tolerated beyond one per job before a rebuild

    def __init__(self, deadline: Callable[[Job], datetime | None] = _no_deadline) -> None:
        super().__init__()
        self._deadline = deadline
        self._by_state: dict[JobState, dict[str, None]] = {s: {} for s in JobState}
        self._blocked: dict[str, None] = {}
        self._background: dict[str, None] = {}
        self._order: dict[str, int] = {}
        self._seq = itertools.count()
        self._idle: list[_Entry] = []
        self._timers: list[_Entry] = []

    # -- changes -----------------------------------------------------------------------

    def __setitem__(self, job_id: str, job: Job) -> None:
        old = dict.get(self, job_id)
        if old is None:
            self._order[job_id] = next(self._seq)
        elif old.state is not job.state:
            del self._by_state[old.state][job_id]
        self._by_state[job.state][job_id] = None
        if job.state is JobState.TRANSIENT_ERROR and job.blocked_by is not None:
            self._blocked[job_id] = None
        else:
            self._blocked.pop(job_id, None)
        if job.priority is JobPriority.FOREGROUND:
            self._background.pop(job_id, None)
        else:
            self._background[job_id] = None
        dict.__setitem__(self, job_id, job)
        if old is None or old.version != job.version:
            self.remind(job)
            self.remind_timer(job)

    def __delitem__(self, job_id: str) -> None:
        job = dict.pop(self, job_id)
        del self._by_state[job.state][job_id]
        self._blocked.pop(job_id, None)
        self._background.pop(job_id, None)
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
        self._blocked.clear()
        self._background.clear()
        self._order.clear()
        self._idle.clear()
        self._timers.clear()

    def update(self, *args: object, **kwargs: object) -> None:  # type: ignore[override]
        raise TypeError("JobTable: assign jobs one by one")

    def setdefault(self, *args: object, **kwargs: object) -> Job:  # type: ignore[override]
        raise TypeError("JobTable: assign jobs one by one")

    # -- states ------------------------------------------------------------------------

    def in_states(self, states: Iterable[JobState]) -> list[Job]:
        """The jobs in ``states`` (in no particular order: see ``ordered``)."""
        get = dict.__getitem__
        return [get(self, job_id) for state in states for job_id in self._by_state[state]]

    def ordered(self, job_ids: Iterable[str]) -> list[Job]:
        """These jobs, in the order the table first saw them."""
        return [dict.__getitem__(self, j) for j in sorted(job_ids, key=self._order.__getitem__)]

    def count(self, state: JobState) -> int:
        return len(self._by_state[state])

    def blocked(self) -> list[Job]:
        """The TRANSIENT_ERROR jobs a policy blocks (``blocked_by`` set)."""
        return [dict.__getitem__(self, job_id) for job_id in self._blocked]

    def count_blocked(self) -> int:
        return len(self._blocked)

    def background_among(self, job_ids: Iterable[str]) -> list[str]:
        """Those of ``job_ids`` (a dict or set: a membership test is cheap) whose job is a
        background one, walking the smaller of the two."""
        ids = job_ids if isinstance(job_ids, dict | set | frozenset) else set(job_ids)
        if len(self._background) < len(ids):
            return [j for j in self._background if j in ids]
        return [j for j in ids if j in self._background]

    # -- timers ------------------------------------------------------------------------

    def next_due(self) -> datetime | None:
        """When the earliest timer fires."""
        while self._timers and not self._current(self._timers[0]):
            heapq.heappop(self._timers)
        return self._timers[0][0] if self._timers else None

    def due_before(self, now: datetime) -> list[Job]:
        """The jobs whose timer fires at or before ``now``, each once: they leave the heap
        and come back with their next change (which firing a timer makes), or ``remind``."""
        return self._take(self._timers, now)

    def remind_timer(self, job: Job) -> None:
        """(Re)enter ``job`` in the timer heap (a timer that fired but could not act)."""
        due = self._deadline(job)
        if due is not None:
            self._push(self._timers, (due, self._order[job.id], job.id, job.version))

    # -- inactivity --------------------------------------------------------------------

    def idle_before(self, cutoff: datetime) -> list[Job]:
        """The jobs last modified at or before ``cutoff``, each once: they leave the heap and
        come back with their next change, or with ``remind``."""
        return self._take(self._idle, cutoff)

    def remind(self, job: Job) -> None:
        """(Re)enter ``job`` in the inactivity heap at its ``modified_at``."""
        self._push(self._idle, (job.modified_at, self._order[job.id], job.id, job.version))

    # -- the heaps ---------------------------------------------------------------------

    def _current(self, entry: _Entry) -> bool:
        job = dict.get(self, entry[2])
        return job is not None and job.version == entry[3]

    def _take(self, heap: list[_Entry], until: datetime) -> list[Job]:
        due: dict[str, Job] = {}  # a job may have several current entries (remind)
        while heap and heap[0][0] <= until:
            entry = heapq.heappop(heap)
            if self._current(entry):
                due[entry[2]] = dict.__getitem__(self, entry[2])
        return list(due.values())

    def _push(self, heap: list[_Entry], entry: _Entry) -> None:
        heapq.heappush(heap, entry)
        if len(heap) > 2 * len(self) + self.stale_slack:
            heap[:] = [e for e in heap if self._current(e)]
            heapq.heapify(heap)
