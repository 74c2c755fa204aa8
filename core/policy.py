"""Retry timers and scheduling, as pure functions of jobs and the time passed in.

Timers (bits-core.md §5):
- a TRANSIENT_ERROR job is retried at ``error time + MinimumRetryDelay``, or later when
  the server asked for more with Retry-After (beyond BITS); jobs blocked by a condition
  (network lost, policy, cost) have no retry timer: they wait for the condition;
- NoProgressTimeout runs from the first transient error without progress since;
  whichever of the two comes first wins, so MinimumRetryDelay > NoProgressTimeout means
  the job goes to ERROR without another try. It does not run while a condition holds the
  job back either, and restarts from the end of the condition (the job's error then stays
  its last transient error: the condition's code never ends a job);
- MaximumDownloadTime counts only CONNECTING + TRANSFERRING time.

Scheduling (bits-core.md §4): every FOREGROUND job runs at once. Background jobs run by
priority class: a lower class gets nothing while a higher class has a queued or running
job. Inside the top class at most ``max_background`` run at once (beyond that, after a
FOREGROUND job is lowered next to them, the longest running go back to QUEUED), in
round-robin time slices: a job that has run for ``slice`` while others of its class wait
goes back to QUEUED, and the job that has waited longest starts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from enum import Enum

import attrs

from backhaul.core.job import Job
from backhaul.core.vocabulary import JobPriority, JobState


class Timer(Enum):
    RETRY = "retry"
    NO_PROGRESS = "no_progress_timeout"
    MAX_DOWNLOAD_TIME = "maximum_download_time"


def retry_due_at(job: Job) -> datetime | None:
    if job.state is not JobState.TRANSIENT_ERROR or job.blocked_by is not None:
        return None
    if job.error_at is None:
        return None
    due = job.error_at + timedelta(seconds=job.minimum_retry_delay)
    if job.retry_not_before is not None and job.retry_not_before > due:
        due = job.retry_not_before
    return due


def no_progress_deadline(job: Job) -> datetime | None:
    if job.state is not JobState.TRANSIENT_ERROR or job.no_progress_since is None:
        return None
    if job.blocked_by is not None:
        return None  # waits for a condition: restarted when it ends (core/job.py)
    return job.no_progress_since + timedelta(seconds=job.no_progress_timeout)


def max_download_deadline(job: Job, now: datetime) -> datetime | None:
    if job.state not in (JobState.CONNECTING, JobState.TRANSFERRING):
        return None
    left = timedelta(seconds=job.maximum_download_time) - job.elapsed_active(now)
    return now + left


def next_timer(job: Job, now: datetime) -> tuple[Timer, datetime] | None:
    """The timer that fires first for this job, if any. Ties go to the timeout."""
    candidates = [
        (Timer.NO_PROGRESS, no_progress_deadline(job)),
        (Timer.RETRY, retry_due_at(job)),
        (Timer.MAX_DOWNLOAD_TIME, max_download_deadline(job, now)),
    ]
    due = [(when, i, timer) for i, (timer, when) in enumerate(candidates) if when is not None]
    if not due:
        return None
    when, _, timer = min(due)
    return timer, when


@attrs.frozen
class Candidate:
    """What the scheduler knows about a job that may run."""

    job_id: str
    priority: JobPriority
    running: bool
    since: datetime  # running: when its turn began; waiting: when it last ran or queued
    # Orders jobs of equal ``since`` (those a pass started or stopped together): the count
    # of turns begun or ended, engine-wide, when this job's last began or ended. Jobs whose
    # slices end together thus queue again in the order they started, and every job of a
    # class gets its turn in order; a tie-break by id would favour the same jobs every time.
    turn: int = 0


@attrs.frozen
class Plan:
    start: tuple[str, ...] = ()
    stop: tuple[str, ...] = ()  # slice over or pre-empted: back to QUEUED


def plan(
    candidates: Iterable[Candidate],
    now: datetime,
    *,
    max_background: int = 1,
    slice_length: timedelta = timedelta(minutes=5),
    elsewhere: Iterable[JobPriority] = (),
) -> Plan:
    """``elsewhere``: priorities of jobs other workers run now (several engines on one
    store): they count for the priority rule, not for this worker's slots."""
    jobs = list(candidates)
    start = [c.job_id for c in jobs if c.priority is JobPriority.FOREGROUND and not c.running]
    background = [c for c in jobs if c.priority is not JobPriority.FOREGROUND]
    others: list[JobPriority] = [p for p in elsewhere if p is not JobPriority.FOREGROUND]
    if not background:
        return Plan(tuple(start), ())
    top = min([*(c.priority for c in background), *others])
    stop = [c.job_id for c in background if c.running and c.priority != top]
    tier = [c for c in background if c.priority == top]
    running = sorted((c for c in tier if c.running), key=lambda c: (c.since, c.turn))
    waiting = sorted((c for c in tier if not c.running), key=lambda c: (c.since, c.turn, c.job_id))
    expired = [c for c in running if now - c.since >= slice_length]
    # Round robin: each expired slice yields its place to a waiting job.
    yielding = expired[: len(waiting)]
    keep = [c for c in running if c not in yielding]
    # More run than there are slots (a FOREGROUND job lowered to a background priority next
    # to the background jobs that run, fewer slots set): the longest running go back.
    over = keep[: max(len(keep) - max_background, 0)]
    keep = keep[len(over) :]
    stop.extend(c.job_id for c in [*yielding, *over])
    free = max(max_background - len(keep), 0)
    start.extend(c.job_id for c in waiting[:free])
    return Plan(tuple(start), tuple(stop))


def runnable_states() -> Sequence[JobState]:
    return (JobState.QUEUED, JobState.CONNECTING, JobState.TRANSFERRING)


_BLOCKED = {
    0x80200010: "the network is down (BG_E_NETWORK_DISCONNECTED)",
    0x8020003E: "a bandwidth limit of 0 holds now (BG_E_BLOCKED_BY_POLICY)",
    0x80200059: "the network costs more than the job's cost flags allow "
    "(BG_E_BLOCKED_BY_COST_TRANSFER_POLICY)",
}


def why_waiting(job: Job, now: datetime) -> tuple[str, datetime | None] | None:
    """Why the job is not moving, and when it will next try (None: it is moving, or it
    waits for the application)."""
    from backhaul.core import hresult

    if job.state is JobState.TRANSIENT_ERROR:
        if job.blocked_by is not None:
            reason = _BLOCKED.get(job.blocked_by, hresult.name_of(job.blocked_by))
            return f"blocked: {reason}", None
        due = retry_due_at(job)
        deadline = no_progress_deadline(job)
        if due is not None and deadline is not None and deadline <= due:
            return "no progress: gives up at the NoProgressTimeout", deadline
        server_asked = job.retry_not_before is not None and due == job.retry_not_before
        if server_asked:
            return "the server asked to retry later (Retry-After)", due
        return "retry after MinimumRetryDelay", due
    waiting = {
        JobState.SUSPENDED: "suspended: waits for resume()",
        JobState.ERROR: "error: waits for the application (resume, complete or cancel)",
        JobState.TRANSFERRED: "transferred: waits for complete()",
        JobState.QUEUED: "queued: waits for its turn",
    }
    waits_for = waiting.get(job.state)
    return (waits_for, None) if waits_for else None
