"""Notifications, driven from the log (bits-core.md §9).

In-process callbacks (IBackgroundCopyCallback 1-3) are registered on the engine and
called for the events the engine reads from the log, whoever appended them:
- ``job_transferred(job)`` when a job enters TRANSFERRED (flag JOB_TRANSFERRED);
- ``job_error(job, error)`` when a job enters ERROR (flag JOB_ERROR), never for
  TRANSIENT_ERROR;
- ``file_transferred(job, file_info)`` for each finished file (flag FILE_TRANSFERRED),
  before ``job_transferred``;
- ``job_modification(job)`` for any other change (flag JOB_MODIFICATION), at most once
  per MINIMUM_NOTIFICATION_INTERVAL_MS per job, and not for the moves to ERROR or
  TRANSFERRED (as in BITS); changes within the interval are told once, when it ends (so
  that an application never keeps a stale view of the job);
- ``file_ranges_transferred(job, file_info, ranges)`` with the ranges that arrived since
  the file's last one (flag FILE_RANGES_TRANSFERRED): the parts of a file with ranges
  (AddFileWithRanges) that its checkpoints claimed since, and the ranges an on-demand
  file's temp file got. At most once per MINIMUM_NOTIFICATION_INTERVAL_MS per file: ranges
  that come sooner are held and told, merged, with the next ones due, or before the job's
  next other event (its RangesDone, its FileTransferred, an error), so that none is lost
  and none is told twice (a restarted engine may tell a file's ranges from its start).
``NotifyFlags.DISABLE`` silences all of them. Callbacks run on the engine's event loop
(an ``EngineThread``'s thread): each must return quickly, for every transfer of the engine
waits while one runs. An ``async def`` callback is awaited as a task of that loop (long
work goes there: ``await asyncio.to_thread(job.complete)``), and the callbacks of one job
stay in the order of its events: one called while an earlier one of its job is still
awaited waits for it. A callback that raises (or whose coroutine raises) is logged; it
never stops the engine. As BITS re-invokes a callback that did not return S_OK,
``job_transferred``, ``job_error`` and ``file_transferred`` that raised are called again
(that callback only) every ``Engine.callback_retry_interval`` seconds (60) while the job is
still in that state (the file still transferred) and neither completed nor cancelled;
``job_modification`` and ``file_ranges_transferred`` are not (BITS may drop them too).
Callbacks are not persisted (as in BITS): they are due "at least once", so a
``job_transferred`` or ``job_error`` callback registered after its job reached TRANSFERRED
or ERROR is called for it: at start for those registered before the engine runs, and on
the engine's next pass for one registered while it runs (the state is in the log).

The notify command line runs as an argument vector (never through a shell) when a job
is in TRANSFERRED or ERROR and has no successful run recorded since it got there. Its
exit is recorded as a ``CommandLineNotified`` event, for the entry into the state the run
was started for; a non-zero exit while the job is still in that state runs it again after
MinimumRetryDelay (SetNotifyCmdLine page). When the engine stops, a program still running
gets ``Engine.command_line_grace`` seconds (3) to exit, and its exit is recorded; one still
running then is ended (SIGTERM to its process group, SIGKILL 2 s later) and its run is not
recorded: the next engine runs it again. Nothing the engine started outlives it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from backhaul.core import byteranges
from backhaul.core.job import Job
from backhaul.core.value import ByteRange
from backhaul.core.vocabulary import JobState, NotifyFlags

log = logging.getLogger("backhaul.notify")

KINDS = (
    "job_transferred",
    "job_error",
    "job_modification",
    "file_transferred",
    "file_ranges_transferred",
)
FLAG_OF = {
    "job_transferred": NotifyFlags.JOB_TRANSFERRED,
    "job_error": NotifyFlags.JOB_ERROR,
    "job_modification": NotifyFlags.JOB_MODIFICATION,
    "file_transferred": NotifyFlags.FILE_TRANSFERRED,
    "file_ranges_transferred": NotifyFlags.FILE_RANGES_TRANSFERRED,
}
REASON_OF_STATE = {JobState.TRANSFERRED: "transferred", JobState.ERROR: "error"}
# The notifications called again while a callback of theirs fails (bits-core.md §9).
CALLED_AGAIN = frozenset({"job_transferred", "job_error", "file_transferred"})
CALLBACK_RETRY_INTERVAL = 60.0  # seconds: the default of Engine.callback_retry_interval

Callback = Callable[..., Any]
# A notification called again: (job id, kind, file index or -1).
Again = tuple[str, str, int]


def wants(job: Job, kind: str) -> bool:
    flags = NotifyFlags(job.notify_flags)
    return NotifyFlags.DISABLE not in flags and FLAG_OF[kind] in flags


class Callbacks:
    """The registered in-process callbacks, called safely: one that raises is logged, and
    the notifications of ``CALLED_AGAIN`` are called again later (``due_again``); a
    coroutine is awaited as a task, each job's in the order of its events. ``clock``: the
    engine's monotonic clock (when a failed callback is due again)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._callbacks: dict[str, list[Callback]] = {k: [] for k in KINDS}
        self._clock = clock
        self.retry_interval = CALLBACK_RETRY_INTERVAL
        # Callbacks that raised, by job: when each notification is due again, and for whom.
        self._again: dict[str, dict[tuple[str, int], tuple[float, list[Callback]]]] = {}
        # Each job's last callback task (an async callback, or one waiting behind it).
        self._chains: dict[str, asyncio.Task[None]] = {}
        self._running: set[asyncio.Task[None]] = set()
        self._last_modification: dict[str, float] = {}
        # Jobs changed within their interval: when their one JobModification is due.
        self._modification_held: dict[str, float] = {}
        # On-demand files' filled ranges not told yet, and when each file's were last told.
        self._held: dict[str, dict[int, list[ByteRange]]] = {}
        self._last_ranges: dict[str, dict[int, float]] = {}
        # Files with ranges: how many of their bytes the ranges told so far cover.
        self._told_to: dict[str, dict[int, int]] = {}

    @staticmethod
    def check(kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown notification {kind!r}; one of {', '.join(KINDS)}")

    def register(self, kind: str, callback: Callback) -> None:
        self.check(kind)
        self._callbacks[kind].append(callback)

    def __bool__(self) -> bool:
        return any(self._callbacks.values())

    def call(
        self,
        kind: str,
        job_id: str,
        *args: Any,
        index: int = -1,
        only: Sequence[Callback] | None = None,
    ) -> None:
        """Call the ``kind`` callbacks (``only`` these) with ``args``: those of job
        ``job_id`` (file ``index``). Must run on the engine's loop."""
        again = (job_id, kind, index) if kind in CALLED_AGAIN else None
        for callback in list(self._callbacks[kind] if only is None else only):
            before = self._chains.get(job_id)
            if before is not None:  # an async callback of the job runs: this one after it
                self._chain(job_id, self._after(before, kind, callback, args, again))
                continue
            try:
                result = callback(*args)
            except Exception:
                self._failed(kind, callback, again)
                continue
            if inspect.isawaitable(result):
                self._chain(job_id, self._awaited(kind, callback, result, again))
            elif again is not None and job_id in self._again:
                self._succeeded(callback, again)

    def _chain(self, job_id: str, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._chains[job_id] = task
        self._running.add(task)

        def done(task: asyncio.Task[None]) -> None:
            self._running.discard(task)
            if self._chains.get(job_id) is task:
                del self._chains[job_id]

        task.add_done_callback(done)

    async def _after(
        self,
        before: asyncio.Task[None],
        kind: str,
        callback: Callback,
        args: Sequence[Any],
        again: Again | None,
    ) -> None:
        """Call ``callback`` once ``before`` (the job's callback task before it) ended."""
        await asyncio.wait([before])
        try:
            result = callback(*args)
        except Exception:
            self._failed(kind, callback, again)
            return
        if inspect.isawaitable(result):
            await self._awaited(kind, callback, result, again)
        elif again is not None:
            self._succeeded(callback, again)

    async def _awaited(
        self, kind: str, callback: Callback, result: Awaitable[Any], again: Again | None
    ) -> None:
        try:
            await result
        except Exception:
            self._failed(kind, callback, again)
        else:
            if again is not None:
                self._succeeded(callback, again)

    def _failed(self, kind: str, callback: Callback, again: Again | None) -> None:
        if again is None:
            log.exception("%s callback %r raised; the engine goes on", kind, callback)
            return
        job_id, _, index = again
        due = self._clock() + self.retry_interval
        waiting = self._again.setdefault(job_id, {})
        _, callbacks = waiting.get((kind, index), (due, []))
        if callback not in callbacks:
            callbacks.append(callback)
        waiting[(kind, index)] = (due, callbacks)
        log.error(
            "%s callback %r raised; the engine goes on, and calls it again in %g s",
            kind,
            callback,
            self.retry_interval,
            exc_info=True,
        )

    def _succeeded(self, callback: Callback, again: Again) -> None:
        """A callback returned: it is not due again for this notification."""
        job_id, kind, index = again
        waiting = self._again.get(job_id)
        entry = waiting.get((kind, index)) if waiting else None
        if waiting is None or entry is None or callback not in entry[1]:
            return
        entry[1].remove(callback)
        if not entry[1]:
            del waiting[(kind, index)]
            if not waiting:
                del self._again[job_id]

    def due_again(self, ticks: float) -> list[tuple[Again, list[Callback]]]:
        """The notifications whose failed callbacks are due again now, taken (a callback
        that fails again is due again later), each job's files first, in file order."""
        due: list[tuple[Again, list[Callback]]] = []
        if not self._again:
            return due
        for job_id, waiting in list(self._again.items()):
            ready = [key for key, (at, _) in waiting.items() if at <= ticks]
            for kind, index in sorted(ready, key=lambda k: (k[0] != "file_transferred", k[1])):
                due.append(((job_id, kind, index), waiting.pop((kind, index))[1]))
            if not waiting:
                del self._again[job_id]
        return due

    def next_again(self) -> float | None:
        """When the next failed callback is due again (monotonic seconds), if any."""
        if not self._again:
            return None
        return min(at for waiting in self._again.values() for at, _ in waiting.values())

    def busy(self, job_id: str) -> bool:
        """A callback of the job runs (a task) or is due again."""
        return job_id in self._chains or job_id in self._again

    async def settle(self, grace: float) -> None:
        """Wait up to ``grace`` seconds for the callback tasks still running; cancel the
        rest (the engine stops)."""
        if not self._running:
            return
        _done, late = await asyncio.wait(set(self._running), timeout=grace)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)

    def ranges_filled(
        self, job: Job, index: int, ranges: Iterable[ByteRange], ticks: float
    ) -> tuple[ByteRange, ...] | None:
        """Hold ``ranges`` of file ``index``; the file's held ranges (merged) when they are
        due now, else None (at most one FileRangesTransferred per notification interval)."""
        self.hold(job.id, index, ranges)
        if index not in self._held.get(job.id, {}):
            return None  # nothing came: nothing to tell
        told = self._last_ranges.setdefault(job.id, {})
        last = told.get(index)
        if last is not None and ticks - last < job.minimum_notification_interval_ms / 1000:
            return None
        told[index] = ticks
        held = self._held[job.id].pop(index)
        if not self._held[job.id]:
            del self._held[job.id]
        return byteranges.merge(held)

    def hold(self, job_id: str, index: int, ranges: Iterable[ByteRange]) -> None:
        """Ranges of file ``index`` to tell with the next ones due, or before the job's
        next other event (``held_ranges``). No ranges: nothing is held (a callback is never
        told an empty list)."""
        came = [r for r in ranges if r.length != 0]
        if came:
            self._held.setdefault(job_id, {}).setdefault(index, []).extend(came)

    def arrived(self, job: Job, index: int, done: int) -> tuple[ByteRange, ...]:
        """A file with ranges has ``done`` of its bytes (a checkpoint, or the whole file):
        the parts of its ranges that came since the ones already taken here."""
        told = self._told_to.setdefault(job.id, {})
        start = told.get(index, 0)
        if done < start:
            start = 0  # the file started over
        told[index] = done
        return byteranges.within(job.files[index].ranges, start, done)

    def restarted(self, job_id: str, index: int) -> None:
        """File ``index`` starts over: its ranges will be told again as they come."""
        self._told_to.get(job_id, {}).pop(index, None)

    def held_ranges(self, job_id: str) -> list[tuple[int, tuple[ByteRange, ...]]]:
        """Take every range set held for the job (told before its next other event)."""
        held = self._held.pop(job_id, None)
        if not held:
            return []
        return [(index, byteranges.merge(ranges)) for index, ranges in sorted(held.items())]

    def forget(self, job_id: str) -> None:
        """A final job: drop its interval clocks (a long-running engine sees many jobs)."""
        self._last_modification.pop(job_id, None)
        self._modification_held.pop(job_id, None)
        self._last_ranges.pop(job_id, None)
        self._held.pop(job_id, None)
        self._told_to.pop(job_id, None)
        self._again.pop(job_id, None)  # nothing is due again for a final job

    def modification_due(self, job: Job, ticks: float) -> bool:
        """A change of the job: is its JobModification due now? If not (the interval since
        the last one runs), it is held, and told once when the interval ends
        (``held_modifications``)."""
        last = self._last_modification.get(job.id)
        interval = job.minimum_notification_interval_ms / 1000
        if last is not None and ticks - last < interval:
            self._modification_held[job.id] = last + interval
            return False
        self._last_modification[job.id] = ticks
        self._modification_held.pop(job.id, None)
        return True

    def held_modifications(self, ticks: float) -> list[str]:
        """The jobs whose held JobModification is due now (each told then, once)."""
        due = [job_id for job_id, at in self._modification_held.items() if at <= ticks]
        for job_id in due:
            del self._modification_held[job_id]
            self._last_modification[job_id] = ticks
        return due

    def drop_held_modification(self, job_id: str) -> None:
        """The job moved to TRANSFERRED or ERROR: that callback tells the change."""
        self._modification_held.pop(job_id, None)

    def next_held_modification(self) -> float | None:
        """When the next held JobModification is due (monotonic seconds), if any."""
        return min(self._modification_held.values(), default=None)


def command_line_due_at(job: Job) -> datetime | None:
    """When the job's notify command line is next due: as it enters TRANSFERRED or ERROR,
    and MinimumRetryDelay after a run that did not exit 0. None when the job has no command
    line, its flags leave this state out, or a run started since the job entered this state
    exited 0 (a run started for an earlier entry counts for that one only)."""
    reason = REASON_OF_STATE.get(job.state)
    if reason is None or job.notify_cmdline is None:
        return None
    flag = NotifyFlags.JOB_TRANSFERRED if reason == "transferred" else NotifyFlags.JOB_ERROR
    flags = NotifyFlags(job.notify_flags)
    if NotifyFlags.DISABLE in flags or flag not in flags:
        return None
    runs = [n for n in job.notified if n[0] == reason and n[1] >= job.state_since_version]
    if any(code == 0 for _, _, code in runs):
        return None
    if runs:
        last = job.notified_at or job.modified_at
        return last + timedelta(seconds=job.minimum_retry_delay)  # after a failed run
    return job.modified_at


def command_line_due(job: Job, now: datetime) -> str | None:
    """The reason to run the job's notify command line now, if it is due."""
    due = command_line_due_at(job)
    return REASON_OF_STATE[job.state] if due is not None and now >= due else None
