"""The engine: an asyncio loop that runs jobs over the store with the core's policies.

Each tick the engine
1. follows the log from its position (its own appends and anyone else's): it reloads
   jobs changed by others, stops transfers whose job left CONNECTING/TRANSFERRING, and
   dispatches notifications;
2. fires the due timers (retry, NoProgressTimeout, MaximumDownloadTime);
3. asks ``core.policy.plan`` which jobs start and which yield their turn.

A transfer task runs one job's files in order through its transport. Data goes to the
temp file with ``pwrite``; every ``checkpoint_interval`` seconds (or
``checkpoint_bytes``) the file is fdatasync'ed *in a worker thread while the transfer
goes on*, and only then is a checkpoint event appended that claims the synced bytes.
After a crash the job resumes from the last checkpoint and the bytes after it are
discarded (truncated), so nothing unsynced is ever trusted.

Writes to the log are group-committed: tasks queue commands; one writer decides them
against the engine's own copy of each job and appends everything queued in ONE
transaction (in a worker thread, so transfers keep flowing). When another writer got
there first (``ConcurrentAppend``), the job is reloaded and its queued commands are
decided again; a command that is no longer legal (the job was suspended or cancelled
meanwhile) stops that job's transfer.

This module holds the loop, the log, notifications, policies, scheduling and the writer.
A job's run is in mixins of ``Engine``, one module each: adapters/download.py (whole files
and ranges), adapters/fill.py (on-demand jobs), adapters/upload.py (uploads and replies);
what they share is in adapters/jobrun.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from itertools import count, pairwise
from typing import Any, Final

import attrs

from backhaul.adapters import localfile, registry
from backhaul.adapters.download import Downloads, FileRun
from backhaul.adapters.fill import Fills
from backhaul.adapters.jobrun import JobGone, StoreDown
from backhaul.adapters.jobtable import JobTable, timer_deadline, wake_at
from backhaul.adapters.manager import FileInfo, TransferJob, TransferManager, file_info
from backhaul.adapters.network import network_up, system_cost
from backhaul.adapters.notify import (
    CALLBACK_RETRY_INTERVAL,
    Callback,
    Callbacks,
    command_line_due,
    wants,
)
from backhaul.adapters.projection import job_of
from backhaul.adapters.ratelimit import RateLimiter
from backhaul.adapters.secret import SealedUnreadable
from backhaul.adapters.store import (
    STORE_ERRORS,
    AdvisoryLock,
    ConcurrentAppend,
    EngineLock,
    EventStore,
    Recorded,
    StoreUnavailable,
    engine_lock,
)
from backhaul.adapters.upload import Uploads
from backhaul.adapters.view import ViewRow, due_text, queue_key
from backhaul.adapters.yielding import YieldController, congestion_controls, set_congestion
from backhaul.core import command as cmd
from backhaul.core import event as ev
from backhaul.core import hresult
from backhaul.core import job as jobs
from backhaul.core.bandwidth import EngineSettings, cost_allows, current_limit, policy_blocks
from backhaul.core.error import BitsError, TransferError
from backhaul.core.event import POLICY_STREAM
from backhaul.core.failure import is_transient
from backhaul.core.job import FileState, Job
from backhaul.core.policy import Candidate, Timer, next_timer, plan, why_waiting
from backhaul.core.port import (
    PlainCredentials,
    RequestOptions,
    ServerCertificateValidator,
    Transport,
    Uploader,
    UploadSession,
)
from backhaul.core.projection import job_error
from backhaul.core.url import declare_secret_parameters, one_line
from backhaul.core.value import JobError
from backhaul.core.vocabulary import ErrorContext, JobPriority, JobState, JobType

log = logging.getLogger("backhaul.engine")

KiB = 1024
MiB = 1024 * 1024


UrlRefresher = Callable[[TransferJob, FileInfo, int], "str | Awaitable[str | None] | None"]
URL_REFRESH_STATUSES: Final = (401, 403, 410)  # refusals an expired signed URL gets


@attrs.define
class _Queued:
    job_id: str
    command: cmd.Command
    at: datetime
    future: asyncio.Future[list[ev.Event]]
    basis: int = 0  # the job copy's basis when decided (see Engine._basis)


STORE_RETRY_MAX = 5.0  # seconds: the longest wait between two tries while the log fails
STORE_REPORT_EVERY = 60.0  # seconds: at most one line a minute about a failing log


class _Outage:
    """The log failing one kind of call (appends, reads): how long to wait before the
    next try (0.1 s, doubling to ``STORE_RETRY_MAX``) and what to log. One line for an
    outage, not one traceback per failed call, and at most one a minute while the log keeps
    failing now and then (a disk that is just full takes some appends); the end of an
    outage that was reported gets its own line."""

    def __init__(self, failing: str, working: str) -> None:
        self.failing, self.working = failing, working
        self.count = 0  # failures since the last call that worked
        self.retry_in = 0.0
        self.told: tuple[float, int] | None = None  # when the last line was, failures since

    def failed(self, exc: BaseException) -> float:
        """Count a failure; the seconds to wait before the next try."""
        self.count += 1
        self.retry_in = min(max(0.1, self.retry_in * 2), STORE_RETRY_MAX)
        now = time.monotonic()
        if self.told is None or now - self.told[0] >= STORE_REPORT_EVERY:
            since = "" if self.told is None else f" ({self.told[1]} failed since the last report)"
            log.error(
                "%s: %s%s; the transfers that need it stop, and the engine tries again",
                self.failing,
                exc,
                since,
                exc_info=log.isEnabledFor(logging.DEBUG),
            )
            self.told = (now, 0)
        self.told = (self.told[0], self.told[1] + 1)
        return self.retry_in

    def ended(self) -> None:
        """A call worked."""
        if not self.count:
            return
        if self.told is not None and self.told[1] == self.count:  # this outage was reported
            log.warning("%s (%d failed)", self.working, self.count)
        self.count, self.retry_in = 0, 0.0


class MemoryStoreLock:
    """The engine lock of a memory store: held on the store object itself, in this process
    (the only one that can reach the store), so that two engines on one ``memory:`` manager
    are kept apart as on SQLite. The same counting as ``store.EngineLock``: ``acquire``
    takes it (True) or finds another holder (False), never waiting; the last ``release``
    gives it back. ``shared``: a worker's (workers share it, an engine without leases
    holds it alone)."""

    _guard: Final = threading.Lock()
    # Per store: whether its holders share the lock, and how many hold it.
    _held: Final[weakref.WeakKeyDictionary[EventStore, tuple[bool, int]]] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, store: EventStore, *, shared: bool = False) -> None:
        self.store = store
        self.shared = shared
        self._count = 0

    def acquire(self) -> bool:
        with self._guard:
            if not self._count:
                shared, holders = self._held.get(self.store, (self.shared, 0))
                if holders and not (shared and self.shared):
                    return False
                self._held[self.store] = (self.shared, holders + 1)
            self._count += 1
            return True

    def release(self) -> None:
        with self._guard:
            if not self._count:
                return
            self._count -= 1
            if not self._count:
                shared, holders = self._held.get(self.store, (self.shared, 1))
                if holders <= 1:
                    self._held.pop(self.store, None)
                else:
                    self._held[self.store] = (shared, holders - 1)

    def holder(self) -> str:
        return "an engine of this process"


StoreLock = EngineLock | AdvisoryLock | MemoryStoreLock


def default_transports() -> Mapping[str, Transport]:
    """Every installed transport (entry-point group ``backhaul.transports``), each built the
    first time a job needs its scheme (adapters/registry.py)."""
    return registry.default_registry().lazy()


REPLY_DATA_MAX = 1024 * 1024  # GetReplyData keeps at most 1 MiB in memory (bits-core.md §3)


class Engine(Downloads, Fills, Uploads):
    """Runs the jobs of ``manager``'s store. One engine per store at a time, unless each is
    a ``worker`` that leases the jobs it runs: ``run`` holds the store's engine lock (on
    SQLite the file ``serve`` takes, ``store.EngineLock``; on PostgreSQL an advisory lock,
    ``store.AdvisoryLock``) and refuses to start while another engine holds it, in this
    process or another (ERROR_SERVICE_ALREADY_RUNNING). Workers share the lock, so no engine
    without leases runs beside them. ``store_lock``: the lock a command already took to
    decide to run this engine (``backhaul serve``, ``get``)."""

    def __init__(
        self,
        manager: TransferManager,
        *,
        transports: Mapping[str, Transport] | None = None,
        uploaders: Mapping[str, Uploader] | None = None,
        max_background: int = 1,
        slice_length: timedelta = timedelta(minutes=5),
        checkpoint_interval: float = 1.0,
        checkpoint_bytes: int = 512 * MiB,
        poll_interval: float = 0.2,
        max_connections: int = 16,
        yield_bandwidth: bool = True,
        worker: str | None = None,
        lease_seconds: float = 30.0,
        inactivity_timeout: timedelta = timedelta(days=90),
        idle_scan_interval: float = 60.0,
        store_lock: StoreLock | None = None,
        callback_retry_interval: float = CALLBACK_RETRY_INTERVAL,
    ) -> None:
        self.manager = manager
        self.store = manager.store
        self.clock = manager.clock
        # Not copied: a registry's lazy mapping must not build every transport up front.
        self._transports = transports
        self._uploaders = uploaders
        self.upload_fragment = 4 * MiB  # one fragment's worth is resent after a failure
        self.max_background = max_background
        self.slice_length = slice_length
        self.checkpoint_interval = checkpoint_interval
        self.checkpoint_bytes = checkpoint_bytes
        self.poll_interval = poll_interval
        self.callbacks = Callbacks(self.clock.monotonic)
        self.callback_retry_interval = callback_retry_interval
        # Callbacks registered while the engine runs, for its loop to take (``_catch_up``);
        # ``_on_guard`` orders a registration against the start of ``run``.
        self._late: deque[tuple[str, Callback]] = deque()
        self._on_guard = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None  # while ``run`` runs
        self._ran: bool | None = None  # None: never ran; False: runs; True: ran and stopped
        self._connections = asyncio.Semaphore(max_connections)
        # The jobs that can move: SUSPENDED jobs are loaded when an event of theirs is read.
        self._jobs = JobTable(deadline=timer_deadline)
        self._idle_scan = float("-inf")  # clock.monotonic() of the last look at unloaded jobs
        self._gone: dict[str, None] = {}  # jobs seen final (oldest first; a bounded set)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        # Each job's last turn: when it began or ended, and the count of turns begun or ended
        # then (``Candidate.turn``: the order among jobs a pass started or stopped together).
        self._turn_since: dict[str, tuple[datetime, int]] = {}
        self._turns = count(1)
        self._queue: list[_Queued] = []
        self._position = 0
        self._wake: asyncio.Event | None = None
        self._writer_wake: asyncio.Event | None = None
        self._flush_lock: asyncio.Lock | None = None
        self._in_flight = 0
        self._appends = _Outage("appending to the log failed", "the log takes appends again")
        self._reads = _Outage("reading the log failed", "the log can be read again")
        self._in_flight_jobs: set[str] = set()
        # Bumped whenever the engine's copy of a job is replaced from the log rather than
        # derived from the copy before it: a decision queued against an older basis may rest
        # on decisions the log refused, so it is decided again before it is appended.
        self._basis: dict[str, int] = {}
        self._logged: dict[str, Job] = {}  # each job as of the events read back
        # The events this engine appended, by log position, with the job as its copy had it
        # after the last event of each command: observed from here instead of read back and
        # folded again (``_follow``), when no other writer's event lies between.
        self._appended: dict[int, tuple[Recorded, Job | None]] = {}
        self._stopping = False
        self._cmdlines: dict[str, asyncio.Task[None]] = {}
        # Seconds ``stop()`` waits for notify command lines still running, to record their
        # exits; those that run on are ended (SIGTERM, then SIGKILL) and their runs are not
        # recorded: the next engine runs them again. Nothing the engine started outlives it.
        self.command_line_grace = 3.0
        # A file's bytes received and its size while the engine's copy does not show them
        # yet (a checkpoint is up to a second behind; a finished file's event, its
        # claiming): what a progress display adds to ``current``. Forgotten when the log
        # shows the file transferred (_observe), or when it will not (_forget_live_of).
        self.live_progress: dict[tuple[str, int], int] = {}
        self.live_sizes: dict[tuple[str, int], int] = {}
        self.settings = EngineSettings()
        self.limiter = RateLimiter()
        self.yielder = YieldController() if yield_bandwidth else None
        # Linux's low-priority TCP congestion control, for background sockets, where the
        # kernel offers it (checked here, reported by `congestion_report`).
        self.low_priority_tcp = yield_bandwidth and "lp" in congestion_controls()
        # Several engines on one store: each takes a lease on the jobs it runs (None: this
        # is the only engine, as the SQLite lock file makes sure).
        self.worker = worker
        self.lease_seconds = lease_seconds
        self.store_lock: StoreLock | None = store_lock
        # JobInactivityTimeout (bits-core.md §16): a job nobody touched for this long is
        # cancelled by the engine (JobScavenged), its temp files deleted.
        self.inactivity_timeout = inactivity_timeout
        # Seconds between looks at the jobs the engine has not loaded: those whose time
        # (a retry, a notify command line) comes within two intervals are loaded, and jobs
        # whose time is further away than four are let go (``_scan_unloaded``).
        self.idle_scan_interval = idle_scan_interval
        self._lazy = True  # False: hold every job with a time (``run(until_idle=True)``)
        # Background QUEUED jobs: the engine holds the longest-waiting ones by priority (a
        # window), and reads more from the read model as they run (``_queue_head``).
        self._queue_beyond = False  # the read model may hold queued jobs not loaded
        self._queue_after: tuple[int, str, str] | None = None  # the last queue row read
        # Jobs let go of while running (``_release_far``): when each is next due and when it
        # last changed. The read model is not caught up while the engine runs (that would
        # cost a fold per changed job), so their rows may be stale: the scans use these.
        self._released: dict[str, tuple[datetime | None, datetime]] = {}
        self._renewed = 0.0
        self._bg_sockets: set[Any] = set()
        self._rated_jobs: set[str] = set()  # jobs whose "job:<id>" bucket has a rate
        self._reply_sessions: dict[str, UploadSession] = {}
        self._validators: dict[str, ServerCertificateValidator] = {}
        self._finishing: dict[str, asyncio.Task[None]] = {}  # each job's claimer
        self._order: dict[str, FileRun] = {}  # each downloading job's files in flight
        self.file_window = 8  # small files of one job in flight at once
        # Files that finish together are synced together (one syncfs per batch).
        self.group_sync = localfile.GroupSync()
        self.small_file = 1 * MiB
        self.buffer_body = 256 * KiB  # small bodies of a known size: written by the claimer
        # No new file starts while a job's finished bodies waiting in memory for the claimer
        # pass this (a claimer slower than the transfers: ACL reads, a slow disk).
        self.held_bodies = 16 * MiB
        self._stale: set[str] = set()  # jobs to reload from the log
        self.network_probe: Callable[[], bool] = network_up
        self.cost_probe: Callable[[], int] = system_cost
        self.network_check_interval = 1.0
        self._network: tuple[float, bool, int] | None = None
        # Expiring (signed) URLs: see set_url_refresher.
        self.url_refresher: UrlRefresher | None = None
        self.url_refresh_codes = _refresh_codes(URL_REFRESH_STATUSES)
        self.url_refreshes = 3  # new URLs tried per file before its error stands

    # -- public --------------------------------------------------------------------------

    def on(self, kind: str, callback: Callable[..., Any]) -> None:
        """Register a callback: job_transferred(job), job_error(job, error),
        job_modification(job), file_transferred(job, file_info),
        file_ranges_transferred(job, file_info, ranges) (adapters/notify.py). Any thread may
        register, before or while the engine runs.

        Callbacks run on the engine's event loop (an ``EngineThread``'s thread), one at a
        time: while one runs, every transfer of the engine waits. Keep them quick; long work
        (a Complete of many files, a digest, a network call) belongs in a thread of the
        application's, or in an ``async def`` callback, which the engine awaits as a task of
        its loop (``await asyncio.to_thread(job.complete)``). Each job's callbacks come in
        the order of its events, an async one's awaited before the next is called.

        A job_transferred or job_error callback is due at least once: registered while the
        engine runs, it is called on the engine's next pass for the jobs already waiting in
        TRANSFERRED or ERROR (their notify flags permitting), as those registered before
        ``run`` are at start. One that raises is logged, and job_transferred, job_error and
        file_transferred are called again every ``callback_retry_interval`` seconds while
        the job is still in that state and neither completed nor cancelled."""
        with self._on_guard:
            if self._loop is None:  # not running: the start-up pass tells it
                self.callbacks.register(kind, callback)
                return
            self.callbacks.check(kind)
            self._late.append((kind, callback))
            loop = self._loop
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nothing to tell
            if _running_loop() is loop:
                self.wake()
            else:
                loop.call_soon_threadsafe(self.wake)

    @property
    def callback_retry_interval(self) -> float:
        """Seconds after which a job_transferred, job_error or file_transferred callback that
        raised is called again (60; BITS re-invokes a callback that failed)."""
        return self.callbacks.retry_interval

    @callback_retry_interval.setter
    def callback_retry_interval(self, seconds: float) -> None:
        self.callbacks.retry_interval = seconds

    def set_url_refresher(
        self, refresher: UrlRefresher | None, statuses: Iterable[int] = URL_REFRESH_STATUSES
    ) -> None:
        """Beyond BITS: when a server refuses a file's URL with one of ``statuses``
        (an expired pre-signed or CDN-signed URL), call ``refresher(job, file, hresult)``
        (a TransferJob, its FileInfo, the HTTP error's HRESULT). A new URL it returns (or an
        awaitable's result) is recorded as SetRemoteName records it, and the file goes on
        from its checkpoint at once (If-Range keeps the resume safe). An upload's new URL
        must name the same file (only its login and query may change): its session goes on
        from the offset the server holds. None, the same URL, or
        an exception leaves the error to the retry rules as before. At most
        ``url_refreshes`` (3) new URLs per file and attempt. It runs in the engine's loop:
        make it quick, or a coroutine. Like the certificate callback, it is not persisted."""
        self.url_refresher = refresher
        self.url_refresh_codes = _refresh_codes(statuses)

    def stop(self) -> None:
        self._stopping = True
        if self._wake is not None:
            self._wake.set()

    def wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def run(self, *, until_idle: bool = False) -> None:
        """Run until ``stop()``; with ``until_idle``, also return once no job is queued,
        connecting, transferring or waiting for a retry. Raises BitsError
        (ERROR_SERVICE_ALREADY_RUNNING) when another engine holds the store's lock, or when
        this engine runs already. An engine runs once: when it stops it closes its
        transports, and ``run`` again raises BitsError RPC_E_DISCONNECTED (make a new
        ``Engine`` over the manager; one refused by the lock may try again)."""
        if self._ran is not None:
            raise _ran_already(running=not self._ran)
        lock = self._lock_store()
        self._ran = False
        with self._on_guard:
            self._loop = asyncio.get_running_loop()
        try:
            await self._run(until_idle=until_idle)
        except Exception as exc:
            if self.manager.closed:  # whatever the closed store raised on the way out
                raise _closed_under() from exc
            raise
        finally:
            with self._on_guard:
                self._loop = None
                while self._late:  # registered as it stopped: kept, as before ``run``
                    self.callbacks.register(*self._late.popleft())
            self._ran = True
            if lock is not None:
                lock.release()

    def _lock_store(self) -> StoreLock:
        """The store's engine lock, held: two engines without leases would transfer the
        same jobs into the same temp files. Workers (fenced by their leases) share it; an
        engine without leases holds it alone. A memory store's is held on the store object
        (``MemoryStoreLock``): its engines are all in this process."""
        shared = self.worker is not None
        lock = self.store_lock or engine_lock(self.store, shared=shared)
        if lock is None:
            lock = MemoryStoreLock(self.store, shared=shared)
        if not lock.acquire():
            raise BitsError(
                hresult.hresult_from_win32(hresult.ERROR_SERVICE_ALREADY_RUNNING),
                f"another engine runs on the store {self.store.location} ({lock.holder()}); "
                "one engine per store at a time, unless each is a worker that leases "
                "the jobs it runs: stop it, or leave the jobs to it",
            )
        return lock

    async def _run(self, *, until_idle: bool) -> None:
        self._wake = asyncio.Event()
        self._writer_wake = asyncio.Event()
        self._flush_lock = asyncio.Lock()
        writer = asyncio.create_task(self._writer(), name="backhaul-writer")
        try:
            self._lazy = not until_idle  # until idle: every waiting job counts, so hold them
            await self._start()
            while not self._stopping:
                if self.manager.closed:
                    raise _closed_under()
                try:
                    await self._follow()
                    if self._late:
                        await self._catch_up()
                    await self._apply_policies()
                    await self._fire_timers()
                    await self._schedule()
                except (*STORE_ERRORS, StoreUnavailable) as exc:
                    # The log cannot be read (its server is gone), directly or through the
                    # manager (which reports the same failure as StoreUnavailable): retried.
                    await self._sleep(self._reads.failed(exc))
                    continue
                self._reads.ended()
                self._run_command_lines()
                self._tell_held_modifications()
                self._call_again()
                if until_idle and self._idle():
                    break
                await self._sleep()
        finally:
            await self._shutdown(writer)

    def job(self, job_id: str) -> TransferJob:
        return TransferJob(self.manager, job_id)

    def current(self, job_id: str) -> Job | None:
        """This engine's copy of a job with its own decisions folded in before the group
        commit that appends them (CONNECTING to TRANSFERRING as the first response comes,
        a file transferred as it is claimed), or None when it does not hold the job: for a
        display. What the log says is ``logged``; callbacks go by the log. A decision the
        log refuses is undone when the job is read again."""
        return self._jobs.get(job_id)

    def logged(self, job_id: str) -> Job | None:
        """This engine's copy of a job as of the events it has read back from the log (what
        a reload would give, without the store read), or None when it does not hold the
        job. ``live_progress`` adds the bytes received since the last checkpoint."""
        return self._logged.get(job_id)

    # -- start and stop ------------------------------------------------------------------

    async def _start(self) -> None:
        await asyncio.to_thread(self.manager.finish_discards)
        self.settings = await asyncio.to_thread(self.manager.settings)
        declare_secret_parameters(self.settings.secret_parameters)
        await asyncio.to_thread(self.manager.refresh_views)
        self._position = self.store.views.position()
        now = self.clock.now()
        await self._abort_cancelled_uploads(now)
        # Only the jobs whose time is near: 100,000 jobs waiting for a retry, SUSPENDED or
        # TRANSFERRED do not make start-up slow. The others come in with their next event,
        # or when a scan finds their time near (read model's next_due, jobtable.wake_at).
        rows = await self._rows_to_hold(now, with_doc=True)
        if self.callbacks:  # due at start for the jobs waiting in these states (below)
            rows += await self._live_rows(with_doc=True, states=_NOTIFIED)
        for row in rows:
            self._jobs[row.job_id] = self._logged[row.job_id] = job_of(row)
        await self._follow()
        for job in list(self._jobs.values()):
            if job.state in (JobState.CONNECTING, JobState.TRANSFERRING) and not (
                job.leased_by_other(self.worker, now)
            ):
                # Left running by a previous engine (or a worker whose lease ran out): it ran
                # until its last event, not until now (MaximumDownloadTime, §5).
                self._enqueue(job.id, cmd.EndSlice(job.last_active_at))
            if job.state in (JobState.TRANSFERRED, JobState.ERROR):
                self._notify_state(job)
        await self._flush()

    async def _shutdown(self, writer: asyncio.Task[None]) -> None:
        self._stopping = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for job_id in list(self._jobs):
            job = self._jobs[job_id]
            mine = self.worker is None or job.lease_worker == self.worker
            if job.state in (JobState.CONNECTING, JobState.TRANSFERRING) and mine:
                self._enqueue(job_id, cmd.EndSlice())
            if self.worker is not None and job.lease_worker == self.worker:
                with contextlib.suppress(BitsError, JobGone):
                    self._enqueue(job_id, cmd.ReleaseLease(self.worker))
        await self._end_command_lines()  # their exits go in with the last batch
        await self._flush()  # waits for a batch the writer has in flight, too
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
        with contextlib.suppress(Exception):
            await self._follow()  # notify what our last appends caused
        # Async callbacks still awaited get the command lines' grace, then are cancelled.
        await self.callbacks.settle(self.command_line_grace)
        for task in self._cmdlines.values():
            task.cancel()  # the clean-ups (discard, abort): the next engine does them again
        for mapping in (self._transports, self._uploaders):
            if mapping is not None:
                await registry.close_all(mapping)  # each built instance once

    async def _end_command_lines(self) -> None:
        """At stop: the notify programs still running get ``command_line_grace`` seconds to
        exit (their exits are recorded); those still running then are ended (``_command_line``
        ends its program when cancelled, and records nothing)."""
        running = [t for t in self._cmdlines.values() if t.get_name().startswith(_NOTIFY_TASK)]
        if not running:
            return
        _done, late = await asyncio.wait(running, timeout=self.command_line_grace)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)

    def _idle(self) -> bool:
        if self._tasks or self._queue or self._cmdlines or self._in_flight:
            return False
        if self._position < self.store.head():
            return False  # our last events are not read back (and notified) yet
        if any(self._jobs.count(state) for state in _UNBLOCKED):
            return False
        # Waiting for a retry is not idle; blocked by a policy is.
        return self._jobs.count(JobState.TRANSIENT_ERROR) == self._jobs.count_blocked()

    async def _sleep(self, at_least: float = 0.0) -> None:
        assert self._wake is not None
        if at_least:  # no pass before then, whatever wakes the engine
            await asyncio.sleep(at_least)
            self._wake.clear()
            return
        timeout = self.poll_interval
        due = self._jobs.next_due()
        if due is not None:
            timeout = min(timeout, max((due - self.clock.now()).total_seconds(), 0.0))
        held = self.callbacks.next_held_modification()
        if held is not None:
            timeout = min(timeout, max(held - self.clock.monotonic(), 0.0))
        again = self.callbacks.next_again()
        if again is not None:
            timeout = min(timeout, max(again - self.clock.monotonic(), 0.0))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)
        self._wake.clear()

    # -- the log -------------------------------------------------------------------------

    async def _follow(self) -> None:
        for job_id in list(self._stale):
            if not self._has_queued(job_id):
                await self._reload(job_id)  # a log that cannot be read: it stays stale
            self._stale.discard(job_id)
        self._observe_appended()
        limit = self._read_limit()
        records = await asyncio.to_thread(self.store.read, self._position, limit)
        while records:
            await self._load_unknown(records)
            for rec in records:
                mine = self._appended.pop(rec.position, None)
                self._observe(rec, mine[1] if mine is not None else None)
            self._position = records[-1].position
            self._observe_appended()
            if len(records) < limit:
                break
            limit = self._read_limit()
            records = await asyncio.to_thread(self.store.read, self._position, limit)

    def _read_limit(self) -> int:
        """How many records to read after the engine's position: when one of its own events
        is known to come later, only the gap before it (another writer's events), so that
        its own events after the gap are observed from memory, not read back and decoded."""
        if self._appended:
            gap = next(iter(self._appended)) - self._position - 1
            if gap > 0:
                return min(gap, _READ_BATCH)
        return _READ_BATCH

    def _observe_appended(self) -> None:
        """Observe this engine's own events that come next in the log from memory: the same
        records a read would give, without decoding them or folding the job again. A gap
        (another writer's event, a position the database skipped) ends it: ``store.read``
        reads from there."""
        appended = self._appended
        while appended:
            mine = appended.get(self._position + 1)
            if mine is None:
                if len(appended) > _APPENDED_KEPT:  # never read back: the read covers them
                    appended.clear()
                return
            if mine[0].job_id not in self._jobs:
                return  # let go of meanwhile: the read path loads it first (_load_unknown)
            del appended[self._position + 1]
            self._observe(*mine)
            self._position += 1

    async def _load_unknown(self, records: Sequence[Recorded]) -> None:
        """Load the jobs these records change that the engine has not loaded (SUSPENDED at
        start-up), each as it was just before its first record here, so that observing the
        records then works as for any other job."""
        first: dict[str, int] = {}
        created: set[str] = set()
        for rec in records:
            job_id = rec.job_id
            if isinstance(rec.event, ev.JobCreated):
                created.add(job_id)
            elif not (
                job_id == POLICY_STREAM
                or job_id in self._jobs
                or job_id in first
                or job_id in created
                or job_id in self._gone
            ):
                first[job_id] = rec.version
        for job_id, version in first.items():
            job = await asyncio.to_thread(self._load_before, job_id, version)
            self._released.pop(job_id, None)
            if job is None or job.is_final:
                self._gone[job_id] = None  # final before the engine started
                continue
            self._jobs[job_id] = self._logged[job_id] = job

    def _load_before(self, job_id: str, version: int) -> Job | None:
        """The job as of ``version - 1``: its read-model snapshot (when not newer) and the
        events after it."""
        return self._fold_after(job_id, self.store.views.get(job_id), version)

    def _load_latest(self, job_ids: Sequence[str]) -> dict[str, Job | None]:
        """These jobs as the log has them now: their snapshots in a few queries, then each
        job's events after its snapshot."""
        rows = self.store.views.get_many(job_ids)
        return {j: self._fold_after(j, rows.get(j), sys.maxsize) for j in job_ids}

    def _fold_after(self, job_id: str, row: ViewRow | None, version: int) -> Job | None:
        job = job_of(row) if row is not None and row.version < version else None
        tail = self.store.stream(job_id, job.version if job is not None else 0)
        return jobs.fold((a.event for a in tail if a.version < version), job) or job

    def _observe(self, rec: Recorded, folded: Job | None = None) -> None:
        """React to one event of the log. ``folded``: the job after it, when this engine
        appended it and its copy already holds that fold."""
        if rec.job_id == POLICY_STREAM:
            if isinstance(rec.event, ev.PolicyChanged):
                self.settings = self.settings.evolve(rec.event.name, rec.event.value)
                declare_secret_parameters(self.settings.secret_parameters)
                self._network = None  # re-read the cost now
            return
        before = self._jobs.get(rec.job_id)
        if isinstance(rec.event, ev.JobCreated):
            if before is None:
                self._jobs[rec.job_id] = self._logged[rec.job_id] = jobs.start(rec.event)
            return
        if before is None:
            return  # a job that was final when we started
        logged = self._logged.get(rec.job_id)
        if logged is not None and rec.version == logged.version + 1:
            if folded is None or folded.version != rec.version:
                folded = jobs.evolve(logged, rec.event)
            logged = self._logged[rec.job_id] = folded
            if isinstance(rec.event, ev.FileTransferred):
                self._forget_live(rec.job_id, rec.event.file_index)  # the log shows it now
        if rec.version > before.version and not self._has_queued(rec.job_id):
            # Someone else's event: the log's own fold is the truth (our copy may hold
            # decisions whose append is failing right now; the writer reconciles those).
            if logged is not None and logged.version == rec.version:
                after = logged
            else:
                after = before
                self._stale.add(rec.job_id)
            self._jobs[rec.job_id] = after
            self._rebased(rec.job_id)
        else:
            after = before  # ours (already folded) or the writer will meet the conflict
        if logged is not None and logged.version == rec.version:
            self._dispatch(rec, None, logged)  # as of this very event
        if (
            isinstance(rec.event, ev.LeaseTaken)
            and rec.event.worker != self.worker
            and rec.job_id in self._tasks
        ):
            self._tasks[rec.job_id].cancel()  # fenced: another worker owns the job now
        if after.is_final or (logged is not None and logged.is_final):
            self._finished(logged if logged is not None and logged.is_final else after)
        elif rec.job_id in self._tasks and after.state not in (
            JobState.CONNECTING,
            JobState.TRANSFERRING,
        ):
            self._tasks[rec.job_id].cancel()

    def _finished(self, job: Job) -> None:
        """A job reached a final state: stop its transfer; a cancelled upload also
        cancels its sessions on the server (Cancel-Session)."""
        task = self._tasks.get(job.id)
        self._forget(job.id)
        stopped_late = job.state is JobState.ACKNOWLEDGED and task is not None
        if job.job_type is JobType.DOWNLOAD and (job.state is JobState.CANCELLED or stopped_late):
            # Cancelled by the client, or scavenged by JobInactivityTimeout: no temp file
            # may stay (the engine deletes them once the transfer stopped). Completed while
            # this engine still ran a transfer of it (a worker that stalled past its lease
            # and woke up after another finished the job): what it still wrote is garbage.
            self._clean_up(f"discard-{job.id}", lambda: self._discard_after(task, job))
        if job.state is JobState.CANCELLED and any(f.upload_token for f in job.files):
            self._clean_up(f"abort-{job.id}", lambda: self._abort_uploads(job))

    def _clean_up(self, key: str, work: Callable[[], Awaitable[None]]) -> None:
        """Run a clean-up (a job's temp files, its server sessions) as a task of its own,
        once per ``key``: ``_cmdlines`` holds it while it runs (the engine is not idle)."""
        if key in self._cmdlines:
            return
        task = asyncio.ensure_future(work())
        self._cmdlines[key] = task
        task.add_done_callback(lambda _t: self._cmdlines.pop(key, None))

    async def _abort_cancelled_uploads(self, now: datetime) -> None:
        """Uploads cancelled in the last ``CANCEL_SESSION_WINDOW`` (24 h, or their
        NoProgressTimeout if shorter, as BITS keeps telling the server): their server
        sessions are cancelled again (Cancel-Session, an SMB temp deleted). A Cancel made
        while no engine ran, or whose Cancel-Session failed, was never sent again before;
        for a session already gone the server's refusal ends it."""
        rows = await asyncio.to_thread(
            self.store.views.select,
            None,
            include_final=True,
            with_doc=True,
            states=[int(JobState.CANCELLED)],
            job_types=[int(JobType.UPLOAD), int(JobType.UPLOAD_REPLY)],
            modified_since=(now - CANCEL_SESSION_WINDOW).astimezone(UTC).isoformat(),
        )  # the rows of these few only: a store of 100,000 finished downloads reads none
        for row in rows:
            job = job_of(row)
            window = min(CANCEL_SESSION_WINDOW, timedelta(seconds=job.no_progress_timeout or 0))
            if any(f.upload_token for f in job.files) and now - job.modified_at < window:
                self._clean_up(f"abort-{job.id}", lambda job=job: self._abort_uploads(job))

    async def _discard_after(self, task: asyncio.Task[None] | None, job: Job) -> None:
        """Cancel deletes temp files; a transfer still running may have made one after
        the client's Cancel looked, so the engine deletes them again once it stopped."""
        if task is not None:
            with contextlib.suppress(BaseException):
                await task
        localfile.discard(job)

    def _forget(self, job_id: str) -> None:
        if len(self._gone) >= 100_000:
            del self._gone[next(iter(self._gone))]
        self._gone[job_id] = None
        self._released.pop(job_id, None)
        self._turn_since.pop(job_id, None)  # a final job has no more turns
        self.callbacks.forget(job_id)
        task = self._tasks.get(job_id)
        if task is not None:
            task.cancel()
        self._unload(job_id)

    def _unload(self, job_id: str) -> None:
        """Drop the engine's copies of a job (it is final, or let go of)."""
        self._jobs.pop(job_id, None)
        self._logged.pop(job_id, None)
        self._basis.pop(job_id, None)
        self._forget_live_of(job_id)

    def _has_queued(self, job_id: str) -> bool:
        """Decisions of this job not yet in the log: queued, or in a batch being appended
        (the engine's copy is ahead of the log; nothing may be decided from the log's)."""
        return job_id in self._in_flight_jobs or any(q.job_id == job_id for q in self._queue)

    # -- notifications -------------------------------------------------------------------

    def _dispatch(self, rec: Recorded, _before: Job | None, job: Job) -> None:
        """The callbacks ``rec`` is due, ``job`` being the job as of it. Their arguments come
        from that copy, not from the store: as of the event, and no read that can fail (an
        error here would lose the notification, or stop the engine)."""
        event = rec.event
        if isinstance(event, _TOLD) and log.isEnabledFor(logging.INFO):
            self._tell(job, event)
        if not self.callbacks:
            return
        handle = self.job(rec.job_id)
        if (
            isinstance(event, ev.FileTransferred)
            and job.files[event.file_index].ranges
            and wants(job, "file_ranges_transferred")
        ):
            # The ranges after the file's last checkpoint: told with the held ones, below.
            index = event.file_index
            self.callbacks.hold(
                job.id, index, self.callbacks.arrived(job, index, event.bytes_total)
            )
        if not isinstance(event, ev.RangesFilled | ev.BytesCheckpointed):
            # Ranges held back by the notification interval go before anything else of the
            # job (its RangesDone, its FileTransferred, an error; not the next fill or
            # checkpoint, which are the ranges' own progress): "the ranges since the last
            # callback".
            for index, ranges in self.callbacks.held_ranges(rec.job_id):
                if ranges and wants(job, "file_ranges_transferred"):
                    info = file_info(job, index)
                    self.callbacks.call(
                        "file_ranges_transferred", job.id, handle, info, list(ranges)
                    )
        if isinstance(event, ev.FileTransferred) and wants(job, "file_transferred"):
            index = event.file_index
            info = file_info(job, index)
            self.callbacks.call("file_transferred", job.id, handle, info, index=index)
        if job.state in _NOTIFIED and job.state_since_version == rec.version:
            # The move to TRANSFERRED or ERROR: its own callback, never JobModification
            # (bits-core.md §9), whatever the flags; nor one held for the changes before it.
            self.callbacks.drop_held_modification(rec.job_id)
            self._notify_state(job, handle)
            return
        if isinstance(event, ev.FileRestarted):
            self.callbacks.restarted(rec.job_id, event.file_index)
        if wants(job, "file_ranges_transferred"):
            self._ranges_came(handle, job, event)
        if wants(job, "job_modification") and self.callbacks.modification_due(
            job, self.clock.monotonic()
        ):
            self.callbacks.call("job_modification", job.id, handle)

    def _tell_held_modifications(self) -> None:
        """JobModification for the jobs changed within their notification interval, once
        it has run out: told as of the engine's logged copy (the log's latest)."""
        for job_id in self.callbacks.held_modifications(self.clock.monotonic()):
            job = self._logged.get(job_id)
            if job is not None and not job.is_final and wants(job, "job_modification"):
                self.callbacks.call("job_modification", job_id, self.job(job_id))

    def _ranges_came(self, handle: TransferJob, job: Job, event: ev.Event) -> None:
        """IBackgroundCopyCallback3::FileRangesTransferred: the ranges that came since the
        file's last one (a checkpoint of a file with ranges, an on-demand fill), at most once
        per MINIMUM_NOTIFICATION_INTERVAL_MS."""
        now = self.clock.monotonic()
        if isinstance(event, ev.BytesCheckpointed) and job.files[event.file_index].ranges:
            index = event.file_index
            came = self.callbacks.arrived(job, index, event.bytes_transferred)
            due = self.callbacks.ranges_filled(job, index, came, now) if came else None
        elif isinstance(event, ev.RangesFilled):
            index = event.file_index
            due = self.callbacks.ranges_filled(job, index, event.ranges, now)
        else:
            return
        if due:
            info = file_info(job, index)
            self.callbacks.call("file_ranges_transferred", job.id, handle, info, list(due))

    def _tell(self, job: Job, event: ev.Event) -> None:
        """A line in the log (``serve`` prints them): a job transferred, failed, or ended."""
        who = f'job {job.id} "{one_line(job.display_name)}"'
        if isinstance(event, ev.JobTransferred):
            size = sum(f.bytes_transferred for f in job.files)
            log.info("%s: TRANSFERRED, %d file(s), %d byte(s)", who, len(job.files), size)
        elif isinstance(event, ev.JobCancelled | ev.JobCompleted):
            log.info("%s: %s", who, job.state.name)
        elif (error := job_error(job)) is None:
            return
        elif job.state is JobState.ERROR:
            log.info("%s: ERROR: %s", who, one_line(str(error)))
        else:
            waiting = why_waiting(job, self.clock.now())
            when = waiting[1] if waiting else None
            after = f"; next try at {when.isoformat(timespec='seconds')}" if when else ""
            log.info("%s: transient error: %s%s", who, one_line(str(error)), after)

    def _notify_state(
        self,
        job: Job,
        handle: TransferJob | None = None,
        only: Sequence[Callback] | None = None,
    ) -> None:
        """job_transferred or job_error for a job in TRANSFERRED or ERROR (its flags
        permitting): as it moves there, and at least once for the jobs waiting there when
        the engine starts or a callback is registered (``only`` that one: ``_catch_up``)."""
        if not self.callbacks:
            return
        if handle is None:
            handle = self.job(job.id)
        if job.state is JobState.TRANSFERRED and wants(job, "job_transferred"):
            self.callbacks.call("job_transferred", job.id, handle, only=only)
        elif job.state is JobState.ERROR and wants(job, "job_error"):
            self.callbacks.call("job_error", job.id, handle, job_error(job), only=only)

    async def _catch_up(self) -> None:
        """Take the callbacks registered while the engine runs. A job_transferred or
        job_error callback is due at least once, even when registered after the event
        (bits-core.md §9): it is called for the jobs waiting in TRANSFERRED or ERROR, as the
        start-up pass calls those registered before ``run``; the engine loads those it has
        not loaded (or let go of) first. Taken between two reads of the log: a move the
        engine read before is told here, one it reads after by ``_dispatch``."""
        late = list(self._late)
        told = [(k, c) for k, c in late if k in ("job_transferred", "job_error")]
        if told:
            rows = await self._live_rows(states=_NOTIFIED)
            await self._adopt([r.job_id for r in rows])
            # Let go of while the engine had no callback: their rows may be stale.
            await self._adopt(list(self._released), released=True)
        for _ in late:
            self.callbacks.register(*self._late.popleft())
        if not told:
            return
        for kind, callback in told:
            state = JobState.TRANSFERRED if kind == "job_transferred" else JobState.ERROR
            for held in self._jobs.in_states([state]):
                job = self._logged.get(held.id)
                if job is not None and job.state is state:
                    self._notify_state(job, only=[callback])

    def _call_again(self) -> None:
        """The job_transferred, job_error and file_transferred callbacks that raised, once
        ``callback_retry_interval`` has passed (bits-core.md §9: BITS re-invokes a callback
        that did not return S_OK): each called again while its job is still in that state
        (the file still transferred), neither completed nor cancelled, and its flags still
        ask for it; else it is dropped."""
        for (job_id, kind, index), callbacks in self.callbacks.due_again(self.clock.monotonic()):
            job = self._logged.get(job_id)
            if job is None or job.is_final or not wants(job, kind):
                continue
            if kind == "file_transferred":
                if index < len(job.files) and job.files[index].transferred:
                    info = file_info(job, index)
                    handle = self.job(job_id)
                    self.callbacks.call(kind, job_id, handle, info, index=index, only=callbacks)
            elif job.state is (
                JobState.TRANSFERRED if kind == "job_transferred" else JobState.ERROR
            ):
                self._notify_state(job, only=callbacks)

    def _run_command_lines(self) -> None:
        now = self.clock.now()
        for job in self._jobs.in_states(_NOTIFIED):
            if job.notify_cmdline is None or job.id in self._cmdlines:
                continue
            reason = command_line_due(job, now)
            if reason is not None:
                self._cmdlines[job.id] = asyncio.create_task(
                    self._command_line(job, reason), name=f"{_NOTIFY_TASK}{job.id}"
                )

    async def _command_line(self, job: Job, reason: str) -> None:
        assert job.notify_cmdline is not None
        try:
            try:
                proc = await asyncio.create_subprocess_exec(
                    job.notify_cmdline.program,
                    *job.notify_cmdline.parameters,
                    stdin=asyncio.subprocess.DEVNULL,
                    env={
                        **os.environ,
                        "BACKHAUL_JOB_ID": job.id,
                        "BACKHAUL_JOB_STATE": job.state.name,
                    },
                    start_new_session=True,  # a process group of its own: ended whole at stop
                )
            except OSError as exc:
                log.warning("notify command line of %s failed to start: %s", job.id, exc)
                code = -1
            else:
                try:
                    code = await proc.wait()
                except asyncio.CancelledError:  # the engine stops, and the program runs on
                    log.warning(
                        "stopping: the notify command line of %s still runs; it is ended, "
                        "and runs again with the next engine",
                        job.id,
                    )
                    await _end_program(proc)
                    raise  # not recorded: it did not complete
            # For the state entry the run was started for: the job may have left it and come
            # back while the program ran (the program itself may resume the job), and the
            # new entry is due a run of its own.
            record = cmd.RecordNotification(reason, code, job.state_since_version)
            with contextlib.suppress(BitsError, JobGone, StoreDown):
                # Refused: the program completed or cancelled the job itself (or the log is
                # down: the run is not recorded, and runs again).
                await self._enqueue(job.id, record)
        finally:
            self._cmdlines.pop(job.id, None)

    # -- policies: bandwidth, cost, network ----------------------------------------------

    def _buckets(self, job: Job) -> list[str]:
        """The rate buckets this job takes from (a bucket without a rate costs nothing)."""
        names = [f"job:{job.id}"]
        if job.priority is not JobPriority.FOREGROUND:
            names += ["global", f"priority:{int(job.priority)}", "yield"]
        return names

    def _yields(self, job: Job, download: Any) -> bool:
        """Whether this transfer yields to other traffic (a background job while the
        engine measures idle bandwidth): its socket is counted as ours, and uses the
        kernel's low-priority congestion control where there is one. ``_run_download``'s
        and ``_fill_range``'s ``finally`` take the socket out again."""
        if self.yielder is None or job.priority is JobPriority.FOREGROUND:
            return False
        sock = getattr(download, "socket", None)
        if sock is not None:
            self._bg_sockets.add(sock)
            self.yielder.loopback = _is_loopback(sock)
            if self.low_priority_tcp:
                set_congestion(sock, b"lp")
        return True

    def network_state(self) -> tuple[bool, int]:
        """(network up, BITS_COST_STATE_* of the current network), re-read every second."""
        now = time.monotonic()
        if self._network is None or now - self._network[0] >= self.network_check_interval:
            up = self.network_probe()
            cost = self.settings.network_cost
            if cost is None:
                cost = self.cost_probe()
            self._network = (now, up, cost)
        return self._network[1], self._network[2]

    @staticmethod
    def why_blocked(
        job: Job, up: bool, cost: int, by_priority: Mapping[JobPriority, bool]
    ) -> int | None:
        """The BITS code that holds this job back now, if any (None: it may run).
        ``by_priority``: whether the bandwidth policy blocks each priority now (one pass
        over thousands of jobs asks the policy once per priority, not once per job). Of the
        job it reads only the cost flags and the priority: a pass asks once per such pair."""
        if not up:
            return hresult.BG_E_NETWORK_DISCONNECTED
        if not cost_allows(job.cost_flags, cost):
            return hresult.BG_E_BLOCKED_BY_COST_TRANSFER_POLICY
        if by_priority[job.priority]:
            return hresult.BG_E_BLOCKED_BY_POLICY
        return None

    def _holds(self, up: bool, cost: int, local: datetime) -> Callable[[Job], int | None]:
        """``why_blocked`` for any job in one pass: the bandwidth policy is asked once per
        priority, and each verdict kept per cost flags and priority."""
        policy = self.settings.bandwidth
        by_priority = {p: policy_blocks(policy, p, local) for p in JobPriority}
        verdicts: dict[tuple[int, JobPriority], int | None] = {}

        def verdict(job: Job) -> int | None:
            key = (job.cost_flags, job.priority)
            if key not in verdicts:
                verdicts[key] = self.why_blocked(job, up, cost, by_priority)
            return verdicts[key]

        return verdict

    def _hold(self, job_id: str, code: int) -> None:
        """Move a QUEUED or running job a condition holds back to TRANSIENT_ERROR with the
        condition's code: it waits for the condition, with no timer and no error counted."""
        command = (
            cmd.LoseNetwork() if code == hresult.BG_E_NETWORK_DISCONNECTED else cmd.Block(code)
        )
        with contextlib.suppress(BitsError, JobGone):
            self._enqueue(job_id, command)

    def _sync_rate(self, job: Job) -> None:
        """The job's own rate bucket (``job:<id>``) as its MaxRate says now."""
        rated = self._rated_jobs
        if job.max_rate is not None or job.id in rated:
            self.limiter.set_rate(f"job:{job.id}", job.max_rate)
            if job.max_rate is None:
                rated.discard(job.id)
            else:
                rated.add(job.id)

    async def _apply_policies(self) -> None:
        up, cost = self.network_state()
        now = self.clock.now()
        local = now.astimezone()
        policy = self.settings.bandwidth
        if self.yielder is not None:
            active = bool(self._jobs.background_among(self._tasks))
            allowed = self.yielder.update(active, _queued(self._bg_sockets))
            self.limiter.set_rate("yield", allowed)
        # A rate of 0 blocks (below); the buckets only enforce positive rates.
        self.limiter.set_rate("global", current_limit(policy.global_limits, local) or None)
        for priority in (JobPriority.HIGH, JobPriority.NORMAL, JobPriority.LOW):
            limits = policy.priority_limits.get(int(priority), ())
            self.limiter.set_rate(f"priority:{int(priority)}", current_limit(limits, local) or None)
        verdict = self._holds(up, cost, local)
        # While the network is up, a TRANSIENT_ERROR job matters only if a policy blocks it:
        # one waiting for its retry is checked when the retry would start it (``_schedule``).
        waiting = self._jobs.in_states([JobState.TRANSIENT_ERROR]) if not up else []
        for job in self._jobs.in_states(_UNBLOCKED) + waiting + self._jobs.blocked():
            state = job.state
            if state is JobState.TRANSIENT_ERROR and job.blocked_by is None and up:
                continue  # nothing to block or release
            self._sync_rate(job)
            code = verdict(job)
            if code is not None and state in (
                JobState.QUEUED,
                JobState.CONNECTING,
                JobState.TRANSFERRING,
            ):
                await self._stop_task(job.id)
                self._hold(job.id, code)
            elif state is JobState.TRANSIENT_ERROR and job.blocked_by is not None:
                if code == job.blocked_by:
                    continue
                if code is None or code != job.blocked_by:
                    release: cmd.Command = (
                        cmd.RestoreNetwork()
                        if job.blocked_by == hresult.BG_E_NETWORK_DISCONNECTED
                        else cmd.Unblock()
                    )
                    with contextlib.suppress(BitsError, JobGone):
                        self._enqueue(job.id, release)
            elif state is JobState.TRANSIENT_ERROR and code == hresult.BG_E_NETWORK_DISCONNECTED:
                with contextlib.suppress(BitsError, JobGone):
                    self._enqueue(job.id, cmd.LoseNetwork())

    # -- timers and scheduling -----------------------------------------------------------

    async def _fire_timers(self) -> None:
        now = self.clock.now()
        await self._scavenge(now)
        again = []
        for job in self._jobs.due_before(now):
            if self._jobs.get(job.id) is not job:
                continue  # scavenged above
            due = next_timer(job, now)
            if due is None or due[1] > now:
                continue
            timer = due[0]
            if timer is Timer.MAX_DOWNLOAD_TIME:
                await self._stop_task(job.id)
            command = {
                Timer.RETRY: cmd.Retry,
                Timer.NO_PROGRESS: cmd.TimeOutNoProgress,
                Timer.MAX_DOWNLOAD_TIME: cmd.ExceedMaxDownloadTime,
            }[timer]()
            try:
                self._enqueue(job.id, command)
            except (BitsError, JobGone):
                again.append(job)  # tried again next loop, as long as it is due
        for job in again:
            if self._jobs.get(job.id) is job:
                self._jobs.remind_timer(job)

    async def _scavenge(self, now: datetime) -> None:
        """JobInactivityTimeout: cancel the jobs nobody changed for that long (BITS's
        abandoned jobs). Loaded jobs come from the table's heap; the jobs the engine has not
        loaded are looked up in the read model now and then."""
        cutoff = now - self.inactivity_timeout
        if self.clock.monotonic() - self._idle_scan >= self.idle_scan_interval:
            self._idle_scan = self.clock.monotonic()
            await self._scan_unloaded(now, cutoff)
        again = []
        for job in self._jobs.idle_before(cutoff):
            if job.leased_by_other(self.worker, now):
                again.append(job)  # its holder's events will move it on
                continue
            await self._stop_task(job.id)
            try:
                self._enqueue(job.id, cmd.Scavenge())
            except (BitsError, JobGone):
                if job.id in self._jobs:
                    again.append(self._jobs[job.id])
        for job in again:
            if self._jobs.get(job.id) is job:
                self._jobs.remind(job)

    def _horizon(self, now: datetime) -> str:
        """``due_by`` for the jobs to hold now: those whose time comes before the next scan
        but one (every job with a time, when not lazy)."""
        if not self._lazy:
            return "9999"  # after every due_text
        return due_text(now + timedelta(seconds=2 * self.idle_scan_interval))

    def queue_window(self) -> int:
        """How many background QUEUED jobs the engine holds at most (beyond those it runs):
        the longest waiting by priority; more are read as these start."""
        return max(32, 4 * self.max_background)

    async def _rows_to_hold(self, now: datetime, *, with_doc: bool = False) -> list[ViewRow]:
        """The read model's rows of the jobs to hold now: those whose time is near, every
        FOREGROUND QUEUED job, and the head of the background queue (``queue_window``)."""
        if not self._lazy:
            return await self._live_rows(due_by=self._horizon(now), with_doc=with_doc)
        rows = await self._live_rows(
            due_by=self._horizon(now), exclude_states=[JobState.QUEUED], with_doc=with_doc
        )
        rows += await self._live_rows(
            states=[JobState.QUEUED], priorities=[JobPriority.FOREGROUND], with_doc=with_doc
        )
        return rows + await self._queue_head(with_doc=with_doc)

    async def _queue_head(self, *, with_doc: bool = False) -> list[ViewRow]:
        """The next ``queue_window`` background QUEUED rows, after the last ones read. The
        rows of jobs the engine has not loaded are as of start-up (an event of such a job
        loads it), so walking the queue in its order once finds each of them once."""
        window = self.queue_window()
        rows = await self._live_rows(
            states=[JobState.QUEUED],
            priorities=_BACKGROUND,
            longest_waiting=window,
            after=self._queue_after,
            with_doc=with_doc,
        )
        if rows:
            self._queue_after = queue_key(rows[-1])
        self._queue_beyond = len(rows) >= window
        return rows

    async def _refill_queue(self) -> None:
        """Hold the next background QUEUED jobs once half of the window has started."""
        if not (self._lazy and self._queue_beyond):
            return
        waiting = sum(
            1
            for job in self._jobs.in_states([JobState.QUEUED])
            if job.priority is not JobPriority.FOREGROUND and job.id not in self._tasks
        )
        if waiting >= self.queue_window() // 2:
            return
        await self._adopt([r.job_id for r in await self._queue_head()])

    async def _adopt(self, job_ids: Iterable[str], *, released: bool = False) -> None:
        """Load these jobs unless the engine holds them, each as its read-model snapshot and
        the events after it. Rows are stale for released jobs: those are loaded only from
        ``_released`` (``released=True``)."""
        wanted = [
            job_id
            for job_id in dict.fromkeys(job_ids)
            if job_id not in self._jobs
            and job_id not in self._gone
            and (released or job_id not in self._released)
        ]
        if not wanted:
            return
        loaded = await asyncio.to_thread(self._load_latest, wanted)
        for job_id, job in loaded.items():
            if job_id in self._jobs:
                continue  # loaded meanwhile (an event of its own)
            self._released.pop(job_id, None)
            if job is None or job.is_final:
                self._forget(job_id)  # final: never again from a stale row
                continue
            self._jobs[job_id] = self._logged[job_id] = job

    async def _scan_unloaded(self, now: datetime, cutoff: datetime) -> None:
        """Load the jobs not loaded whose time is near, or that nobody changed since
        ``cutoff`` (JobInactivityTimeout); let go of loaded jobs whose time is far. The rows
        of jobs never loaded are as of start-up, which is current for them (an event would
        have loaded them); released jobs are looked up in ``_released``."""
        horizon = self._horizon(now)
        queued = [JobState.QUEUED] if self._lazy else []  # the queue is read in order
        rows = await self._live_rows(due_by=horizon, exclude_states=queued)
        rows += await self._live_rows(modified_before=cutoff.astimezone(UTC).isoformat())
        await self._adopt([r.job_id for r in rows])
        due = [
            job_id
            for job_id, (when, modified) in self._released.items()
            if modified <= cutoff or (when is not None and due_text(when) <= horizon)
        ]
        await self._adopt(due, released=True)
        if self._lazy:
            self._release_far(now + timedelta(seconds=4 * self.idle_scan_interval), cutoff)

    def _release_far(self, far: datetime, cutoff: datetime) -> None:
        """Let go of the jobs that wait for a time after ``far`` (or for nothing) and that
        the engine is doing nothing with: its copy is the log's, no decision or task or
        command line of theirs is pending. An event of theirs, or a scan, loads them
        again from the read model."""
        states = [JobState.TRANSIENT_ERROR]
        if not self.callbacks:
            states += _NOTIFIED
        for job in self._jobs.in_states(states):
            job_id = job.id
            when = wake_at(job)
            if when is not None and when <= far:
                continue
            if job.modified_at <= cutoff or job.lease_worker is not None:
                continue  # about to be scavenged, or leased (its holder may be us)
            logged = self._logged.get(job_id)
            if logged is None or logged.version != job.version or self._busy(job_id):
                continue
            self._unload(job_id)
            self._released[job_id] = (when, job.modified_at)

    def _busy(self, job_id: str) -> bool:
        return (
            job_id in self._tasks
            or job_id in self._cmdlines
            or job_id in self._stale
            or job_id in self._finishing
            or self._has_queued(job_id)
            or self.callbacks.busy(job_id)
        )

    async def _live_rows(self, **filters: Any) -> list[ViewRow]:
        """The read model's live rows (every owner) matching ``filters`` (JobViews.select)."""
        return await asyncio.to_thread(
            self.store.views.select, None, include_final=False, **filters
        )

    async def _schedule(self) -> None:
        await self._refill_queue()
        now = self.clock.now()
        self._renew_leases(now)
        elsewhere = []
        tasks = self._tasks
        for job in self._jobs.in_states(_RUNNING):
            if job.id in tasks and job.lease_worker in (None, self.worker):
                continue  # running here, and nobody else's: nothing to note or requeue
            if job.leased_by_other(self.worker, now):
                elsewhere.append(job.priority)  # another worker runs it
                continue
            if job.id not in tasks and not self._has_queued(job.id):
                # Its transfer ended without a verdict (the log refused a write), or the
                # worker that ran it lost its lease (it ran until its last event): requeue.
                lost = job.lease_worker not in (None, self.worker)
                until = job.last_active_at if lost else None
                with contextlib.suppress(BitsError, JobGone):
                    self._enqueue(job.id, cmd.EndSlice(until))
        candidates = []
        # A job is checked against the policies as it would start, not only by
        # ``_apply_policies`` earlier in the pass: a retry that came due and the jobs
        # ``_refill_queue`` loaded became QUEUED after it.
        verdict = self._holds(*self.network_state(), now.astimezone())
        # A FOREGROUND job that runs has nothing to gain or lose from a plan (foreground
        # jobs are never pre-empted nor sliced): with thousands of them running, a pass
        # considers only the queued jobs and the background jobs that run.
        jobs_now = self._jobs
        for job in jobs_now.ordered(
            [j.id for j in jobs_now.in_states([JobState.QUEUED]) if j.id not in tasks]
            + jobs_now.background_among(tasks)
        ):
            running = job.id in tasks
            if not running:
                if job.leased_by_other(self.worker, now):
                    continue
                if (code := verdict(job)) is not None:
                    self._hold(job.id, code)
                    continue
                self._sync_rate(job)  # one loaded by this pass has no bucket yet
            since, turn = self._turn_since.get(job.id, (job.modified_at, 0))
            candidates.append(Candidate(job.id, job.priority, running, since, turn))
        decision = plan(
            candidates,
            now,
            max_background=self.max_background,
            slice_length=self.slice_length,
            elsewhere=elsewhere,
        )
        for job_id in decision.stop:  # in the order their turns began
            await self._stop_task(job_id)
            self._turn_since[job_id] = (now, next(self._turns))
            with contextlib.suppress(BitsError, JobGone):
                self._enqueue(job_id, cmd.EndSlice())
        for job_id in decision.start:
            self._turn_since[job_id] = (now, next(self._turns))
            self._tasks[job_id] = asyncio.create_task(self._run_job(job_id), name=job_id)

    def _renew_leases(self, now: datetime) -> None:
        """Renew the leases of the jobs this worker runs, every third of their length; a
        transfer whose lease ran out (this worker stalled) stops: another may own it."""
        if self.worker is None:
            return
        for job_id in list(self._tasks):
            job = self._jobs.get(job_id)
            if (
                job is not None
                and job.lease_worker == self.worker
                and job.lease_expires is not None
                and job.lease_expires <= now
            ):
                self._tasks[job_id].cancel()
        self._extend_leases()

    def _extend_leases(self) -> None:
        if self.worker is None or time.monotonic() - self._renewed < self.lease_seconds / 3:
            return
        self._renewed = time.monotonic()
        now = self.clock.now()
        for job_id in list(self._tasks):
            job = self._jobs.get(job_id)
            # A lease that ran out is not renewed: another worker may hold the job now (its
            # transfer stops, _renew_leases), and this copy must keep saying so.
            if (
                job is not None
                and job.lease_worker == self.worker
                and (job.lease_expires is None or job.lease_expires > now)
            ):
                with contextlib.suppress(BitsError, JobGone):
                    self._post(job_id, cmd.TakeLease(self.worker, self.lease_seconds))

    async def _stop_task(self, job_id: str) -> None:
        task = self._tasks.get(job_id)
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(BaseException):
            await task

    # -- the writer ----------------------------------------------------------------------

    def _job(self, job_id: str) -> Job:
        """The engine's copy of a job a transfer is working on; JobGone once it is not held
        any more (a client completed or cancelled it while the transfer awaited something)."""
        job = self._jobs.get(job_id)
        if job is None:
            raise JobGone(job_id)
        return job

    def _enqueue(self, job_id: str, command: cmd.Command) -> asyncio.Future[list[ev.Event]]:
        """Decide now against the engine's copy; append with the next group commit."""
        job = self._job(job_id)
        if (
            self.worker is not None
            and isinstance(command, _TRANSFER_COMMANDS)
            and job.lease_worker != self.worker
        ):
            # The copy already shows another worker's lease (read from the log while this
            # transfer, or a file finishing behind it, had not yet seen its cancellation).
            raise JobGone(f"job {job_id} is leased by {job.lease_worker}")
        now = self.clock.now()
        events = cmd.decide(job, command, now, self.manager.limits)
        folded = self._jobs[job_id] = jobs.fold(events, job) or job
        future: asyncio.Future[list[ev.Event]] = asyncio.get_running_loop().create_future()
        # Fire-and-forget decisions (checkpoints, lease renewals, timers) are not awaited:
        # their failure is handled by the writer, so mark it seen here, once, for all.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._queue.append(_Queued(job_id, command, now, future, self._basis.get(job_id, 0)))
        future.events = events  # type: ignore[attr-defined]
        future.after = job.version  # type: ignore[attr-defined]
        future.folded = folded  # type: ignore[attr-defined]
        if self._writer_wake is not None:
            self._writer_wake.set()
        return future

    async def _writer(self) -> None:
        assert self._writer_wake is not None
        while True:
            await self._writer_wake.wait()
            self._writer_wake.clear()
            try:
                await self._flush()
            except Exception:  # the writer must outlive any failure (a reload during an outage)
                log.exception("the log writer failed; it goes on")

    async def _flush(self) -> None:
        """Append everything queued; one batch at a time, so versions never race."""
        assert self._flush_lock is not None
        async with self._flush_lock:
            while self._queue:
                batch, self._queue = self._queue, []
                self._in_flight += 1
                try:
                    await self._append(batch)
                finally:
                    self._in_flight -= 1
                if self._appends.retry_in:  # the log refused that batch: no loop of refusals
                    await asyncio.sleep(self._appends.retry_in)

    async def _append(self, batch: list[_Queued]) -> None:
        jobs_in_batch = {q.job_id for q in batch}
        self._in_flight_jobs |= jobs_in_batch
        try:
            await self._append_batch(batch)
        finally:
            self._in_flight_jobs -= jobs_in_batch

    async def _append_batch(self, batch: list[_Queued]) -> None:
        stale = {q.job_id for q in batch if q.basis != self._basis.get(q.job_id, 0)}
        if stale:
            await self._append_one_by_one([q for q in batch if q.job_id in stale])
            batch = [q for q in batch if q.job_id not in stale]
        streams: dict[str, tuple[int, list[ev.Event]]] = {}
        for q in batch:
            after = q.future.after  # type: ignore[attr-defined]
            if q.job_id not in streams:
                streams[q.job_id] = (after, [])
            streams[q.job_id][1].extend(q.future.events)  # type: ignore[attr-defined]
        try:
            positions = await asyncio.to_thread(
                self.store.append_many, [(j, a, e) for j, (a, e) in streams.items() if e]
            )
        except ConcurrentAppend:
            await self._append_one_by_one(batch)
            return
        except Exception as exc:  # the store is down: fail the waiters, keep running
            self._appends.failed(exc)
            for q in batch:
                if not q.future.done():
                    refused = StoreDown(f"the log refused an append: {exc}")
                    refused.__cause__ = exc
                    q.future.set_exception(refused)
            for job_id in streams:
                try:
                    await self._reload(job_id)
                except Exception:  # the log cannot be read either: reloaded by a later pass
                    self._stale.add(job_id)
            return
        self._appends.ended()
        self._keep_appended(batch, streams, positions)
        for q in batch:
            if not q.future.done():
                q.future.set_result(q.future.events)  # type: ignore[attr-defined]

    def _keep_appended(
        self,
        batch: list[_Queued],
        streams: dict[str, tuple[int, list[ev.Event]]],
        positions: Sequence[int],
    ) -> None:
        """Keep what ``_observe_appended`` needs of a batch the log took: each event at its
        position (the store gives them in the order appended: by stream, then version),
        and the engine's fold after each command's last event."""
        appended = [
            (job_id, after + i, event)
            for job_id, (after, events) in streams.items()
            for i, event in enumerate(events, 1)
        ]
        if len(positions) != len(appended) or any(a >= b for a, b in pairwise(positions)):
            return  # a store that does not tell them in order: read them back
        folds = {}
        for q in batch:
            folded: Job = q.future.folded  # type: ignore[attr-defined]
            folds[(q.job_id, folded.version)] = folded
        for position, (job_id, version, event) in zip(positions, appended, strict=True):
            rec = Recorded(position, job_id, version, event)
            self._appended[position] = (rec, folds.get((job_id, version)))

    async def _append_one_by_one(self, batch: list[_Queued]) -> None:
        by_job: dict[str, list[_Queued]] = {}
        for q in batch:
            by_job.setdefault(q.job_id, []).append(q)
        # Decisions queued for these jobs while the batch was in flight were based on the
        # same stale copy: they are decided again here too, after the batch's, in order.
        later = [q for q in self._queue if q.job_id in by_job]
        if later:
            self._queue = [q for q in self._queue if q.job_id not in by_job]
            for q in later:
                by_job[q.job_id].append(q)
        for job_id, items in by_job.items():
            for _attempt in range(5):
                job = await self._reload(job_id)
                decided: list[tuple[_Queued, list[ev.Event]]] = []
                events: list[ev.Event] = []
                current = job
                for q in items:
                    if current is None or self._fenced(current, q.command):
                        if not q.future.done():
                            q.future.set_exception(JobGone(job_id))
                        continue
                    try:
                        new = cmd.decide(current, q.command, q.at, self.manager.limits)
                    except BitsError as exc:
                        if not q.future.done():
                            q.future.set_exception(exc)
                        continue
                    decided.append((q, new))
                    events.extend(new)
                    current = jobs.fold(new, current)
                if not events or job is None:
                    break
                try:
                    await asyncio.to_thread(self.store.append, job_id, job.version, events)
                except ConcurrentAppend:
                    continue
                if current is not None:
                    self._jobs[job_id] = current
                    self._rebased(job_id)
                for q, new in decided:
                    if not q.future.done():
                        q.future.set_result(new)
                break
            for q in items:
                if not q.future.done():
                    q.future.set_exception(JobGone(job_id))

    def _fenced(self, job: Job, command: cmd.Command) -> bool:
        """With leases, only the lease holder's engine decisions may be appended."""
        if self.worker is None or isinstance(command, cmd.TakeLease):
            return False
        return job.lease_worker != self.worker

    async def _reload(self, job_id: str) -> Job | None:
        """The job as the log has it now: this engine's logged copy (the fold of the log up
        to its version) and the events after it. Another writer's event (a client's
        SetDescription, another engine's lease) must not make the engine decode a job of
        5,000 files again from its first event: that stalled every transfer of the job."""
        base = self._logged.get(job_id)
        after = base.version if base is not None else 0
        stream = await asyncio.to_thread(self.store.stream, job_id, after)
        job = jobs.fold((a.event for a in stream), base)
        if job is None or job.is_final:
            if job is not None and job_id in self._jobs:
                self._finished(job)
            self._jobs.pop(job_id, None)
            return None
        self._jobs[job_id] = job
        self._rebased(job_id)
        # The logged copy stays as of the events read back: those between it and the head
        # (the engine's own among them) are still to be observed, each notified as of itself.
        self._logged.setdefault(job_id, job)
        return job

    def _rebased(self, job_id: str) -> None:
        self._basis[job_id] = self._basis.get(job_id, 0) + 1

    def _post(self, job_id: str, command: cmd.Command) -> None:
        """Queue a command without waiting for its commit (checkpoints in a loop)."""
        try:
            self._enqueue(job_id, command)
        except BitsError as exc:
            raise JobGone(str(exc)) from exc

    async def _commit(self, job_id: str, command: cmd.Command) -> list[ev.Event]:
        try:
            return await self._enqueue(job_id, command)
        except BitsError as exc:
            raise JobGone(str(exc)) from exc

    # -- transfers -----------------------------------------------------------------------

    def transport_for(self, remote_name: str) -> Transport:
        if self._transports is None:
            self._transports = default_transports()
        return registry.transport_for(self._transports, remote_name)

    def _url(self, f: FileState) -> str:
        """The URL to request for ``f``: its remote name with the password and the signed
        query that came in it (sealed in the log: ``FileSpec.password``, ``.query``)."""
        spec = f.spec
        if spec.password is None and spec.query is None:
            return spec.remote_name
        return self.store.secrets.open_url(spec.remote_name, spec.password, spec.query)

    def _options(self, job: Job) -> RequestOptions:
        secrets = self.store.secrets
        headers: list[tuple[str, str]] = []
        if job.custom_headers is not None:
            for line in secrets.open(job.custom_headers).split("\r\n"):
                if ":" in line:
                    name, value = line.split(":", 1)
                    headers.append((name.strip(), value.strip()))
        creds = tuple(
            PlainCredentials(
                c.target,
                c.scheme,
                c.user_name,
                secrets.open(c.password) if c.password is not None else None,
            )
            for c in job.credentials
        )
        identity = None
        if job.client_certificate is not None:
            identity = self.manager.certificates.identity(job.client_certificate)
        return RequestOptions(
            custom_headers=tuple(headers),
            credentials=creds,
            proxy=job.proxy,
            security_flags=job.security_flags,
            client_certificate=job.client_certificate,
            http_method=job.http_method,
            dynamic=job.dynamic_content,
            ca_bundle=job.ca_bundle,
            server_certificate_validator=self._validators.get(job.id),
            client_identity=identity,
        )

    def set_server_certificate_validator(
        self, job_id: str, validator: ServerCertificateValidator | None
    ) -> None:
        """SetServerCertificateValidationInterface: called with (host, port, DER chain)
        after the OS validation; a non-S_OK answer refuses the server (TRANSIENT_ERROR,
        context SERVER_CERTIFICATE_CALLBACK). Like BITS's, it is not persisted."""
        if validator is None:
            self._validators.pop(job_id, None)
        else:
            self._validators[job_id] = validator

    async def _run_job(self, job_id: str) -> None:
        try:
            if self.worker is not None:
                # The fence: whoever appends this first runs the job; the other's append
                # conflicts, and re-deciding it finds the job leased.
                await self._commit(job_id, cmd.TakeLease(self.worker, self.lease_seconds))
            await self._commit(job_id, cmd.StartTransfer())
            job = self._job(job_id)
            try:
                if job.job_type is JobType.DOWNLOAD:
                    await self._recheck_transferred(job_id)
                    job = self._job(job_id)
                    if job.on_demand:
                        await self._fill_requested(job_id, job.pending_files)
                    else:
                        await self._download_files(job_id, job.pending_files)
                else:
                    for index in job.pending_files:
                        await self._upload_file(job_id, index)
            except BaseException:
                with contextlib.suppress(BaseException):
                    await self._finished_files(job_id)  # the first error is the one told
                raise
            await self._finished_files(job_id)
            if job.job_type is JobType.UPLOAD_REPLY:
                await self._fetch_reply(job_id)
            if job.on_demand and self._job(job_id).pending_files:
                # Every requested range is in, but a file is not whole: SUSPENDED until the
                # application requests more and resumes (RequestFileRanges page).
                await self._commit(job_id, cmd.FinishRanges())
            else:
                await self._commit(job_id, cmd.FinishJob())
        except TransferError as exc:
            await self._fail(job_id, exc)
        except SealedUnreadable as exc:  # a store moved without its key: no retry helps
            context = ErrorContext.GENERAL_QUEUE_MANAGER
            await self._fail(
                job_id, TransferError(exc.hresult, exc.message, context=context, transient=False)
            )
        except (JobGone, StoreDown):
            pass  # StoreDown: nothing can be recorded now; the job runs again later
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must not kill the engine: record it on the job
            log.exception("transfer of %s failed unexpectedly", job_id)
            await self._fail(
                job_id,
                TransferError(hresult.E_FAIL, f"internal error: {exc!r}", transient=True),
            )
        finally:
            self._tasks.pop(job_id, None)
            job = self._jobs.get(job_id)
            self._forget_live_of(job_id, unless_in=job)
            if self.worker is not None and job is not None and job.lease_worker == self.worker:
                with contextlib.suppress(BitsError, JobGone):
                    self._post(job_id, cmd.ReleaseLease(self.worker))
            if self._wake is not None:
                self._wake.set()

    def _forget_live(self, job_id: str, index: int) -> None:
        self.live_progress.pop((job_id, index), None)
        self.live_sizes.pop((job_id, index), None)

    def _forget_live_of(self, job_id: str, unless_in: Job | None = None) -> None:
        """Forget the live progress of the job's files, but for those ``unless_in`` (the
        engine's copy as a run ends) shows transferred: their FileTransferred is on its way
        to the log, and ``_observe`` forgets them as it reads it back."""
        if unless_in is None:  # no copy left to list the files: look at every entry
            keys = {*self.live_progress, *self.live_sizes}
            stale = [i for j, i in keys if j == job_id]
        else:  # the job's own files: a run of one of 1,000 jobs scans none of the others'
            stale = [i for i, f in enumerate(unless_in.files) if not f.transferred]
        for index in stale:
            self._forget_live(job_id, index)

    async def _fail(self, job_id: str, exc: TransferError, index: int | None = None) -> None:
        error = JobError(
            exc.context,
            exc.hresult,
            exc.message,
            getattr(exc, "file_index", index),
            getattr(exc, "protocol", None),
        )
        # A refusal by the application's certificate callback is transient whatever its
        # code (BITS: TRANSIENT_ERROR, context SERVER_CERTIFICATE_CALLBACK).
        callback = exc.context is ErrorContext.SERVER_CERTIFICATE_CALLBACK
        # E_ACCESSDENIED raised as transient is a missing privilege for the ACL flags:
        # TRANSIENT_ERROR in BITS (bits-core.md §13), though a plain denial is fatal.
        privilege = exc.hresult == hresult.E_ACCESSDENIED
        transient = exc.transient and (callback or privilege or is_transient(exc.hresult))
        # The failed response's header block is the file's HTTP_RESPONSE_HEADERS from now.
        block = exc.response_headers if error.file_index is not None else None
        failed = cmd.Fail(
            error,
            transient,
            exc.retry_after,
            self._recorded_headers(block, job_id, error.file_index),
        )
        with contextlib.suppress(JobGone, BitsError, StoreDown):
            await self._commit(job_id, failed)


def _ran_already(*, running: bool) -> BitsError:
    """``run`` on an engine that runs, or that ran and stopped."""
    if running:
        return BitsError(
            hresult.hresult_from_win32(hresult.ERROR_SERVICE_ALREADY_RUNNING),
            "this engine runs already: one run() per engine",
        )
    return BitsError(
        hresult.RPC_E_DISCONNECTED,
        "this engine ran and stopped (its transports are closed): an engine runs once; "
        "make a new Engine over the manager to run again",
    )


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _closed_under() -> BitsError:
    """The manager was closed while its engine ran: the engine stops, telling why."""
    return BitsError(
        hresult.RPC_E_DISCONNECTED,
        "the TransferManager was closed while its engine ran: stop the engine first",
    )


_RUNNING = (JobState.CONNECTING, JobState.TRANSFERRING)
# The events whose job gets a line in the log (Engine._tell).
_TOLD = (
    ev.JobTransferred,
    ev.ErrorOccurred,
    ev.FileRejected,
    ev.NoProgressTimedOut,
    ev.MaxDownloadTimeExceeded,
    ev.JobCancelled,
    ev.JobCompleted,
)
_BACKGROUND = (JobPriority.HIGH, JobPriority.NORMAL, JobPriority.LOW)


# The decisions of a transfer: with leases, only the lease holder's copy may make them.
_TRANSFER_COMMANDS = (
    cmd.StartTransfer,
    cmd.Connect,
    cmd.Checkpoint,
    cmd.FinishFile,
    cmd.RestartFile,
    cmd.FinishJob,
    cmd.Fail,
    cmd.OpenUploadSession,
    cmd.LocateReply,
    cmd.ProgressReply,
)
_NOTIFIED = (JobState.TRANSFERRED, JobState.ERROR)  # the states a notify command line is for
_NOTIFY_TASK: Final = "notify-"  # the name of a notify command line's task: + the job id
# How long after Cancel an upload's server session is still cancelled again (bits-core.md §5).
CANCEL_SESSION_WINDOW: Final = timedelta(hours=24)
COMMAND_LINE_KILL_WAIT: Final = 2.0  # seconds from SIGTERM to SIGKILL for a notify program
# States a policy can block (a blocked job waits in TRANSIENT_ERROR with blocked_by set).
_UNBLOCKED = (JobState.QUEUED, *_RUNNING)

_APPENDED_KEPT: Final = 100_000  # own events kept for observing at most (Engine._appended)
_READ_BATCH: Final = 5000  # records per read of the log


async def _end_program(proc: asyncio.subprocess.Process) -> None:
    """End a notify program and whatever it started (its process group): SIGTERM, then
    SIGKILL after ``COMMAND_LINE_KILL_WAIT`` seconds; and reap it."""
    for sig, wait in ((signal.SIGTERM, COMMAND_LINE_KILL_WAIT), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), wait)
            return


def congestion_report() -> str:
    """What background sockets get here: the kernel's 'lp', or the engine's controller."""
    available = congestion_controls()
    if "lp" in available:
        return "background sockets use TCP lp (low priority) and the engine's yield controller"
    listed = " ".join(available) or "unknown"
    return (
        f"the kernel offers no TCP lp (it has: {listed}); background jobs yield through the "
        "engine's controller only"
    )


def _is_loopback(sock: Any) -> bool:
    import ipaddress

    try:
        host = sock.getpeername()[0]
        return ipaddress.ip_address(host).is_loopback
    except (OSError, ValueError, IndexError, TypeError):
        return False


def _queued(sockets: set[Any]) -> int:
    """Bytes waiting in the kernel's receive buffers of these sockets (FIONREAD)."""
    import fcntl
    import struct
    import termios

    total = 0
    for sock in list(sockets):
        try:
            raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
            total += struct.unpack("i", raw)[0]
        except (OSError, ValueError):
            sockets.discard(sock)
    return total


def _refresh_codes(statuses: Iterable[int]) -> frozenset[int]:
    return frozenset(hresult.http_status_hresult(s) for s in statuses)


def run_until_idle(manager: TransferManager, **options: Any) -> None:
    """Run an engine over ``manager``'s store until nothing is left to do."""
    asyncio.run(Engine(manager, **options).run(until_idle=True))


def command_refresher(argv: Sequence[str], timeout: float = 30.0) -> UrlRefresher:
    """A URL refresher that runs a program (an argument vector, never through a shell): it
    gets one JSON object on stdin (``job_id``, ``file_index``, ``remote_name``,
    ``local_name``, ``hresult`` as "0x80190193", ``http_status``) and prints the new URL on
    its first line of output. Exit status non-zero, no output, or ``timeout`` seconds without
    an answer: no new URL. The URL travels on stdin, not in the argument list, where other
    users of the machine could read a signature."""
    program = list(argv)
    if not program:
        raise ValueError("the URL refresher needs a program to run")

    async def refresh(job: TransferJob, file: FileInfo, code: int) -> str | None:
        request = {
            "job_id": job.id,
            "file_index": file.index,
            "remote_name": file.remote_name,
            "local_name": file.local_name,
            "hresult": hresult.format_hresult(code),
            "http_status": hresult.http_status_of(code),
        }
        try:
            proc = await asyncio.create_subprocess_exec(
                *program,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                env={**os.environ, "BACKHAUL_JOB_ID": job.id},
            )
        except OSError as exc:
            log.warning("the URL refresher %s failed to start: %s", program[0], exc)
            return None
        try:
            out, _ = await asyncio.wait_for(
                proc.communicate(json.dumps(request).encode() + b"\n"), timeout
            )
        except TimeoutError:
            proc.kill()
            await proc.wait()
            log.warning("the URL refresher %s gave no answer in %s s", program[0], timeout)
            return None
        lines = out.decode("utf-8", "replace").splitlines()
        if proc.returncode != 0 or not lines or not lines[0].strip():
            return None
        return lines[0].strip()

    return refresh


class EngineThread:
    """An engine in a background thread with its own event loop, for applications that
    have no asyncio loop. Callbacks run in that thread, on the engine's loop: while one
    runs, no transfer moves (see ``Engine.on``).

        with EngineThread(manager) as engine:
            engine.on("job_transferred", lambda job: job.complete())
            ...
    """

    def __init__(self, manager: TransferManager, **options: Any) -> None:
        import threading

        self.engine = Engine(manager, **options)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="backhaul-engine", daemon=True)
        self.error: BaseException | None = None

    def on(self, kind: str, callback: Callable[..., Any]) -> None:
        """``Engine.on``, from any thread, before or after ``start()``: the callback runs in
        the engine's thread and must be quick (long work goes to a thread of its own, or
        into an ``async def`` callback). Registered after ``start()``, a job_transferred or
        job_error callback is called on the engine's next pass for the jobs already in
        TRANSFERRED or ERROR."""
        self.engine.on(kind, callback)

    def set_url_refresher(
        self, refresher: UrlRefresher | None, statuses: Iterable[int] = URL_REFRESH_STATUSES
    ) -> None:
        """``Engine.set_url_refresher``; the refresher runs in the engine's thread."""
        self.engine.set_url_refresher(refresher, statuses)

    def _main(self) -> None:
        self._loop = asyncio.new_event_loop()
        lock = None
        try:
            # The store's engine lock before start() returns: refused (another engine
            # runs), start() raises at once rather than stop() at the end of the block.
            lock = self.engine.store_lock = self.engine._lock_store()
            self._loop.call_soon(self._ready.set)
            self._loop.run_until_complete(self.engine.run())
        except BaseException as exc:  # reported by start() or stop()
            self.error = exc
        finally:
            if lock is not None:
                lock.release()
            self._ready.set()
            self._loop.close()

    def start(self) -> EngineThread:
        """Start the thread; raises what stopped the engine before it ran (BitsError
        ERROR_SERVICE_ALREADY_RUNNING: another engine runs on the store)."""
        self._thread.start()
        self._ready.wait()
        if self.error is not None:  # set before ready only when the engine did not run
            self._thread.join()
            raise self.error
        return self

    def wake(self) -> None:
        """Tell the engine the store changed (it also polls)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.engine.wake)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the engine and wait up to ``timeout`` seconds for its thread to end.
        Raises TimeoutError when the thread still runs then (a callback that blocks, a
        notify program in its grace period): the engine stops once the callback returns,
        and still holds the store's engine lock until then; call ``stop`` again to wait
        longer. Raises what stopped the engine if it did not stop by ``stop`` (BitsError
        RPC_E_DISCONNECTED: the manager was closed under it)."""
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self.engine.stop)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(
                f"the engine thread did not stop within {timeout:g} s (a callback still "
                "runs?); it stops once its loop gets control back"
            )
        if self.error is not None:
            raise self.error

    def __enter__(self) -> EngineThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
