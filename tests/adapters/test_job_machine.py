"""Random command sequences through the REAL API, checked against the transition table.

A hypothesis ``RuleBasedStateMachine`` creates jobs of every type and drives them with the
client's calls (``TransferJob``: add_file / add_files with valid and invalid names, resume,
suspend, cancel, complete, the setters) and the engine's reports (``manager.execute`` with
core.command engine commands), legal and illegal alike. The model keeps a few facts per
job (type, files and which are transferred, NoProgressTimeout, MinimumRetryDelay,
on-demand mode) and asks ``core.transition.next_state`` what must happen; it never
restates the table.

Rules: ``create_job``; ``add_file`` (every remote/local name kind); ``add_two_files_at_once``;
``change_setting`` (priority, description, display name, NoProgressTimeout incl. 0,
MinimumRetryDelay, on-demand mode; too-long strings included); ``engine_checkpoints`` and
``engine_finishes_file`` (any file index); ``validate_file`` (SetValidationState TRUE or
FALSE of any file index); ``triggers_in_states``: for a few (goal state,
trigger) pairs, drive the job towards the goal along the happy path, then issue the call
or engine report carrying the trigger (Resume, Suspend, Cancel, Complete, AddFile,
SetValidationState(FALSE), StartTransfer, Connect, Checkpoint, FinishJob, Fail transient/fatal, Retry,
TimeOutNoProgress, ExceedMaxDownloadTime, LoseNetwork, RestoreNetwork, Block, Unblock,
EndSlice, Scavenge, FinishRanges) so that every cell of the table is reached in a few
steps; ``rebuild_views``.

Checked on every call: a refused call raised ``BitsError`` with exactly the table's HRESULT
(BG_E_INVALID_STATE, the rule's refusal such as BG_E_EMPTY, or the per-call code such as
BG_E_TOO_MANY_FILES) and appended nothing; an accepted one appended and left the job in
the table's target. Checked after every step:
- each job's state equals the model's, and an error object exists exactly in ERROR and
  TRANSIENT_ERROR; final states are absorbing;
- replay equals live: ``fold(store.stream(id))`` == ``TransferJob.snapshot()``, and a cold
  manager (loading from the read model) agrees;
- the read-model row equals ``view_row(fold)`` and ``job_of(row) == fold`` (also after
  ``rebuild``), and ``jobs()`` lists exactly the non-final jobs.
The same machine runs on the in-memory store, on SQLite and on PostgreSQL.
Reference: bits-core.md §2 (states), §3 (job types), §7.1 (files), §14, §16 (limits).
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import attrs
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)
from peers.postgres import PostgresServer, create_database, drop_database, unique_database_name

from backhaul.adapters import localfile
from backhaul.adapters.clock import ManualClock
from backhaul.adapters.manager import TransferJob, TransferManager
from backhaul.adapters.projection import job_of, rebuild, view_row
from backhaul.adapters.store import EventStore, open_store
from backhaul.core import byteranges, hresult
from backhaul.core import command as cmd
from backhaul.core.error import BitsError
from backhaul.core.job import DEFAULT_MINIMUM_RETRY_DELAY, DEFAULT_NO_PROGRESS_TIMEOUT, fold
from backhaul.core.limit import DESCRIPTION_MAX, DISPLAY_NAME_MAX, MINIMUM_RETRY_DELAY_FLOOR
from backhaul.core.transition import (
    FINAL_STATES,
    IllegalTransition,
    JobFacts,
    Trigger,
    next_state,
)
from backhaul.core.value import ByteRange, JobError
from backhaul.core.vocabulary import ErrorContext, JobPriority, JobPropertyId, JobState, JobType

OWNER = "machine-owner"
TRANSIENT_ERROR = JobError(ErrorContext.GENERAL_TRANSPORT, hresult.BG_E_CONNECT_FAILURE)
FATAL_ERROR = JobError(ErrorContext.REMOTE_FILE, hresult.E_ACCESSDENIED)

# The engine report that carries each engine trigger (what happened, not where it leads);
# DATA_RECEIVED, ALL_FILES_DONE and the failures have rules of their own.
ENGINE_REPORTS: dict[Trigger, cmd.Command] = {
    Trigger.SCHEDULED: cmd.StartTransfer(),
    Trigger.CONNECTED: cmd.Connect(),
    Trigger.SLICE_ENDED: cmd.EndSlice(),
    Trigger.RETRY_DUE: cmd.Retry(),
    Trigger.NO_PROGRESS_TIMEOUT: cmd.TimeOutNoProgress(),
    Trigger.MAX_DOWNLOAD_TIME_EXCEEDED: cmd.ExceedMaxDownloadTime(),
    Trigger.NETWORK_LOST: cmd.LoseNetwork(),
    Trigger.NETWORK_RESTORED: cmd.RestoreNetwork(),
    Trigger.BLOCKED: cmd.Block(hresult.BG_E_BLOCKED_BY_POLICY),
    Trigger.UNBLOCKED: cmd.Unblock(),
    Trigger.INACTIVITY_TIMEOUT: cmd.Scavenge(),
    Trigger.RANGES_DONE: cmd.FinishRanges(),
}

# Remote names: (name, which job types accept it).
ALL_TYPES = frozenset(JobType)
REMOTE_NAMES: tuple[tuple[str, frozenset[JobType]], ...] = (
    ("https://example.com/files/data.bin", ALL_TYPES),
    ("http://example.com/upload/target", ALL_TYPES),
    ("\\\\fileserver\\share\\data.bin", frozenset({JobType.DOWNLOAD, JobType.UPLOAD})),
    ("gopher://example.com/data.bin", frozenset()),  # no transport for the scheme
    ("gopher:/nothing", frozenset()),  # neither a URL nor a UNC path
    ("https://example.com/files/*.bin", frozenset()),  # wildcard
    ("", frozenset()),
)
DISPLAY_NAMES = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=20)
GOALS = (
    JobState.TRANSFERRING,
    JobState.TRANSIENT_ERROR,
    JobState.ERROR,
    JobState.TRANSFERRED,
    JobState.QUEUED,
    JobState.CONNECTING,
    JobState.SUSPENDED,
)
SETTING_CHANGES = st.one_of(
    st.tuples(st.just("priority"), st.sampled_from(JobPriority)),
    st.tuples(
        st.just("description"), st.sampled_from([0, 12, DESCRIPTION_MAX, DESCRIPTION_MAX + 1])
    ),
    st.tuples(
        st.just("display_name"), st.sampled_from([0, 7, DISPLAY_NAME_MAX, DISPLAY_NAME_MAX + 1])
    ),
    st.tuples(
        st.just("no_progress_timeout"),
        st.sampled_from([0, 1, 600, DEFAULT_NO_PROGRESS_TIMEOUT, -1]),
    ),
    st.tuples(
        st.just("minimum_retry_delay"), st.sampled_from([0, 3, 600, 1_209_600, 2_000_000, -1])
    ),
    st.tuples(st.just("on_demand_mode"), st.booleans()),
)
MAX_JOBS = 3  # a few jobs driven deep rather than many left SUSPENDED
# Local names: kinds the rule turns into real paths.
LOCAL_KINDS = ("fresh", "fresh", "fresh", "relative", "missing_dir", "directory", "duplicate")


def name_of(code: int) -> str:
    return f"{hresult.name_of(code)} ({hresult.format_hresult(code)})"


@attrs.define
class ModelJob:
    """The facts the model keeps about one job."""

    job_type: JobType
    state: JobState = JobState.SUSPENDED
    transferred: list[bool] = attrs.field(factory=list)
    local_names: list[str] = attrs.field(factory=list)
    no_progress_timeout: int = DEFAULT_NO_PROGRESS_TIMEOUT
    minimum_retry_delay: int = DEFAULT_MINIMUM_RETRY_DELAY
    on_demand: bool = False
    ever_resumed: bool = False
    # Per file, for IBackgroundCopyFile6: is the remote name HTTP(S), the size the log
    # knows, and the ranges requested so far.
    http: list[bool] = attrs.field(factory=list)
    sizes: list[int | None] = attrs.field(factory=list)
    requested: list[list[ByteRange]] = attrs.field(factory=list)

    def new_files(self, *remote_names: str, local_names: list[str]) -> None:
        self.transferred += [False] * len(remote_names)
        self.local_names += local_names
        self.http += [n.lower().startswith(("http://", "https://")) for n in remote_names]
        self.sizes += [None] * len(remote_names)
        self.requested += [[] for _ in remote_names]

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_STATES

    def facts(self) -> JobFacts:
        return JobFacts(
            job_type=self.job_type,
            has_files=bool(self.transferred),
            # BITS retries a transient error only while NoProgressTimeout is not 0 and
            # MinimumRetryDelay is below it (bits-core.md §2.2, §5).
            retries_allowed=self.no_progress_timeout > 0
            and self.minimum_retry_delay < self.no_progress_timeout,
            on_demand=self.on_demand,
        )

    def outcome(self, trigger: Trigger) -> tuple[JobState | None, int | None]:
        """(target, None) when the table allows ``trigger``, else (None, the refusal)."""
        try:
            return next_state(self.state, trigger, self.facts()), None
        except IllegalTransition as refused:
            return None, refused.hresult


class JobMachine(RuleBasedStateMachine):
    """Subclasses set ``open_store(tmp) -> (store, close)``."""

    open_store: ClassVar[Callable[[Path], tuple[EventStore, Callable[[], None]]]]

    jobs = Bundle("jobs")

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="bh-machine-"))
        self.store, self._close_store = type(self).open_store(self.tmp)
        self.clock = ManualClock()
        self.manager = TransferManager(self.store, owner=OWNER, clock=self.clock)
        self.model: dict[str, ModelJob] = {}
        self.final_seen: dict[str, JobState] = {}
        self.counter = itertools.count()
        self.downloads = self.tmp / "downloads"
        self.downloads.mkdir()
        self.upload_source = self.tmp / "upload-source.bin"
        self.upload_source.write_bytes(b"upload payload\n")

    def teardown(self) -> None:
        try:
            self.manager.close()
            self._close_store()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- the call checker --------------------------------------------------------------

    def handle(self, job_id: str) -> TransferJob:
        return TransferJob(self.manager, job_id)

    def attempt(
        self,
        job_id: str | None,
        call: Callable[[], Any],
        target: JobState | None,
        refusal: int | None,
    ) -> Any:
        """Run ``call``; it must be refused with exactly ``refusal`` (appending nothing),
        or succeed (appending something) and leave the job in ``target``."""
        self.clock.advance(1)
        head = self.store.head()
        if refusal is not None:
            with pytest.raises(BitsError) as refused:
                call()
            assert name_of(refused.value.hresult) == name_of(refusal), refused.value.message
            assert self.store.head() == head, "a refused call appended events"
            if job_id is not None:
                assert self.handle(job_id).state is self.model[job_id].state
            return None
        result = call()
        assert self.store.head() > head, "an accepted call appended nothing"
        if job_id is not None and target is not None:
            self.model[job_id].state = target
            assert self.handle(job_id).state is target
        return result

    def transition(self, job_id: str, trigger: Trigger, call: Callable[[], Any]) -> Any:
        target, refusal = self.model[job_id].outcome(trigger)
        return self.attempt(job_id, call, target, refusal)

    # -- IBackgroundCopyManager ----------------------------------------------------------

    @precondition(lambda self: len(self.model) < MAX_JOBS)
    @rule(
        target=jobs,
        job_type=st.sampled_from(JobType),
        name=DISPLAY_NAMES | st.just("n" * (DISPLAY_NAME_MAX + 1)),
    )
    def create_job(self, job_type: JobType, name: str) -> Any:
        call = lambda: self.manager.create_job(name, job_type)  # noqa: E731
        if len(name) > DISPLAY_NAME_MAX:
            self.attempt(None, call, None, hresult.BG_E_STRING_TOO_LONG)
            return multiple()
        head = self.store.head()
        job = self.attempt(None, call, None, None)
        assert self.store.head() == head + 1
        assert job.state is JobState.SUSPENDED
        self.model[job.id] = ModelJob(job_type)
        return job.id

    @precondition(lambda self: len(self.model) < MAX_JOBS)
    @rule(target=jobs)
    def create_on_demand_job(self) -> Any:
        """A download job in on-demand mode with one HTTPS file: the calls of its own rules
        (ON_DEMAND_MODE, AddFile), so that random access is met in every state."""
        job_id = self.create_job(JobType.DOWNLOAD, "on demand")
        self.set_on_demand_mode(job_id, True)
        self.add_file(job_id, REMOTE_NAMES[0], "fresh")
        return job_id

    # -- files ---------------------------------------------------------------------------

    def local_name(self, job_id: str, kind: str) -> tuple[str, bool]:
        """A local name of ``kind`` and whether the API's name checks accept it."""
        m = self.model[job_id]
        upload = m.job_type is not JobType.DOWNLOAD
        n = next(self.counter)
        if kind == "relative":
            return f"relative/file-{n}.bin", False
        if kind == "missing_dir":
            return str(self.tmp / f"no-such-dir-{n}" / "file.bin"), False
        if kind == "directory":
            return str(self.downloads), False
        if kind == "duplicate" and m.local_names:
            return m.local_names[0], True
        if upload:
            return str(self.upload_source), True
        return str(self.downloads / f"file-{n}.bin"), True

    @rule(
        job_id=jobs,
        remote=st.sampled_from(REMOTE_NAMES),
        kind=st.sampled_from(LOCAL_KINDS),
    )
    def add_file(self, job_id: str, remote: tuple[str, frozenset[JobType]], kind: str) -> None:
        m = self.model[job_id]
        remote_name, accepted_by = remote
        local, local_ok = self.local_name(job_id, kind)
        duplicate = local in m.local_names and m.job_type is JobType.DOWNLOAD
        call = lambda: self.handle(job_id).add_file(remote_name, local)  # noqa: E731
        if not local_ok or m.job_type not in accepted_by:
            refusal: int | None = hresult.E_INVALIDARG  # names are checked first, in any state
        elif m.is_final:
            refusal = hresult.BG_E_INVALID_STATE
        elif m.job_type is not JobType.DOWNLOAD and m.transferred:
            refusal = hresult.BG_E_TOO_MANY_FILES  # upload jobs hold exactly one file
        elif duplicate:
            refusal = hresult.E_INVALIDARG
        else:
            refusal = None
        if refusal is not None:
            self.attempt(job_id, call, None, refusal)
            return
        target, table_refusal = m.outcome(Trigger.ADD_FILE)
        self.attempt(job_id, call, target, table_refusal)
        if table_refusal is None:
            m.new_files(remote_name, local_names=[local])

    @rule(job_id=jobs)
    def add_two_files_at_once(self, job_id: str) -> None:
        """AddFileSet of two: uploads refuse both (BG_E_TOO_MANY_FILES), downloads take both."""
        m = self.model[job_id]
        names = [self.local_name(job_id, "fresh")[0] for _ in range(2)]
        specs = [(f"https://example.com/set/{i}", name) for i, name in enumerate(names)]
        call = lambda: self.handle(job_id).add_files(specs)  # noqa: E731
        if m.is_final:
            self.attempt(job_id, call, None, hresult.BG_E_INVALID_STATE)
        elif m.job_type is not JobType.DOWNLOAD:
            self.attempt(job_id, call, None, hresult.BG_E_TOO_MANY_FILES)
        else:
            target, refusal = m.outcome(Trigger.ADD_FILE)
            self.attempt(job_id, call, target, refusal)
            if refusal is None:
                m.new_files(*(remote for remote, _ in specs), local_names=names)

    # -- the four state-changing calls ---------------------------------------------------

    def resume(self, job_id: str) -> None:
        m = self.model[job_id]
        target, refusal = m.outcome(Trigger.RESUME)
        self.attempt(job_id, self.handle(job_id).resume, target, refusal)
        m.ever_resumed |= refusal is None

    def suspend(self, job_id: str) -> None:
        self.transition(job_id, Trigger.SUSPEND, self.handle(job_id).suspend)

    def cancel(self, job_id: str) -> None:
        m = self.model[job_id]
        result = self.transition(job_id, Trigger.CANCEL, self.handle(job_id).cancel)
        if m.state is JobState.CANCELLED and result is not None:
            assert result == hresult.S_OK
            for i, local in enumerate(m.local_names):
                assert not localfile.temp_path(job_id, i, local).exists()

    def complete(self, job_id: str) -> None:
        m = self.model[job_id]
        kept = [i for i, done in enumerate(m.transferred) if done]
        was_final = m.is_final
        result = self.transition(job_id, Trigger.COMPLETE, self.handle(job_id).complete)
        if was_final or m.state is not JobState.ACKNOWLEDGED:
            return
        if m.job_type is JobType.DOWNLOAD:
            partial = len(kept) < len(m.transferred)
            assert result == (hresult.BG_S_PARTIAL_COMPLETE if partial else hresult.S_OK)
            for i, local in enumerate(m.local_names):
                assert not localfile.temp_path(job_id, i, local).exists()
                assert Path(local).is_file() == (i in kept)
        else:
            assert result == hresult.S_OK

    # -- settings ------------------------------------------------------------------------

    def set_value(self, job_id: str, call: Callable[[], Any], invalid: int | None) -> bool:
        """A setter: BG_E_INVALID_STATE in a final state, else ``invalid`` or accepted."""
        m = self.model[job_id]
        refusal = hresult.BG_E_INVALID_STATE if m.is_final else invalid
        self.attempt(job_id, call, m.state, refusal)
        return refusal is None

    def set_priority(self, job_id: str, priority: JobPriority) -> None:
        job = self.handle(job_id)
        if self.set_value(job_id, lambda: setattr(job, "priority", priority), None):
            assert job.priority is priority

    def set_description(self, job_id: str, length: int) -> None:
        job = self.handle(job_id)
        text = "d" * length
        too_long = hresult.BG_E_STRING_TOO_LONG if length > DESCRIPTION_MAX else None
        if self.set_value(job_id, lambda: setattr(job, "description", text), too_long):
            assert job.description == text

    def set_display_name(self, job_id: str, length: int) -> None:
        job = self.handle(job_id)
        text = "n" * length
        too_long = hresult.BG_E_STRING_TOO_LONG if length > DISPLAY_NAME_MAX else None
        if self.set_value(job_id, lambda: setattr(job, "display_name", text), too_long):
            assert job.display_name == text

    def set_no_progress_timeout(self, job_id: str, seconds: int) -> None:
        job = self.handle(job_id)
        invalid = hresult.E_INVALIDARG if seconds < 0 else None
        if self.set_value(job_id, lambda: setattr(job, "no_progress_timeout", seconds), invalid):
            self.model[job_id].no_progress_timeout = seconds
            assert job.no_progress_timeout.total_seconds() == seconds

    def set_minimum_retry_delay(self, job_id: str, seconds: int) -> None:
        job = self.handle(job_id)
        invalid = hresult.E_INVALIDARG if seconds < 0 else None
        if self.set_value(job_id, lambda: setattr(job, "minimum_retry_delay", seconds), invalid):
            stored = max(seconds, MINIMUM_RETRY_DELAY_FLOOR)
            self.model[job_id].minimum_retry_delay = stored
            assert job.minimum_retry_delay.total_seconds() == stored

    def set_on_demand_mode(self, job_id: str, enable: bool) -> None:
        m = self.model[job_id]
        job = self.handle(job_id)
        if m.job_type is not JobType.DOWNLOAD:
            invalid: int | None = hresult.BG_E_PROPERTY_SUPPORTED_FOR_DOWNLOAD_JOBS_ONLY
        elif m.ever_resumed:
            invalid = hresult.BG_E_READ_ONLY_PROPERTY_AFTER_RESUME
        else:
            invalid = None
        call = lambda: job.set_property(JobPropertyId.ON_DEMAND_MODE, enable)  # noqa: E731
        if self.set_value(job_id, call, invalid):
            m.on_demand = enable
            assert job.get_property(JobPropertyId.ON_DEMAND_MODE) is enable

    @rule(job_id=jobs, change=SETTING_CHANGES)
    def change_setting(self, job_id: str, change: tuple[str, Any]) -> None:
        setter, value = change
        getattr(self, f"set_{setter}")(job_id, value)

    @rule(job_id=jobs)
    def take_ownership(self, job_id: str) -> None:
        """TakeOwnership (the tests run as root): BG_E_INVALID_STATE in a final state, else
        the job is the caller's and holds no credentials or headers; the state stays."""
        job = self.handle(job_id)
        if self.set_value(job_id, job.take_ownership, None):
            assert job.owner == self.manager.owner
            assert job.credentials == [] and job.custom_headers is None

    # -- the engine ----------------------------------------------------------------------

    def execute(self, job_id: str, command: cmd.Command) -> Callable[[], Any]:
        return lambda: self.manager.execute(job_id, command)

    def engine_reports(self, job_id: str, trigger: Trigger) -> None:
        self.transition(job_id, trigger, self.execute(job_id, ENGINE_REPORTS[trigger]))

    @rule(job_id=jobs, index=st.integers(0, 2), done=st.integers(0, 100))
    def engine_checkpoints(self, job_id: str, index: int, done: int) -> None:
        m = self.model[job_id]
        if index < len(m.transferred) and m.transferred[index]:
            # The engine checkpoints a file only while it fetches it; new bytes of a
            # transferred file come whole, as a FileTransferred (DATA_RECEIVED too).
            self.engine_finishes_file(job_id, index, done)
            return
        call = self.execute(job_id, cmd.Checkpoint(index, done, 100))
        if index >= len(m.transferred):
            self.attempt(job_id, call, None, hresult.BG_E_FILE_NOT_FOUND)
        elif self.transition(job_id, Trigger.DATA_RECEIVED, call) is not None:
            m.sizes[index] = 100

    @rule(job_id=jobs, index=st.integers(0, 2), size=st.integers(0, 64))
    def engine_finishes_file(self, job_id: str, index: int, size: int) -> None:
        m = self.model[job_id]
        call = self.execute(job_id, cmd.FinishFile(index, size))
        if index >= len(m.transferred):
            self.attempt(job_id, call, None, hresult.BG_E_FILE_NOT_FOUND)
            return
        target, refusal = m.outcome(Trigger.DATA_RECEIVED)
        if refusal is None and m.job_type is JobType.DOWNLOAD:
            # What the engine would have written: the whole file in its temp name.
            localfile.temp_path(job_id, index, m.local_names[index]).write_bytes(b"x" * size)
        self.attempt(job_id, call, target, refusal)
        if refusal is None:
            m.transferred[index] = True
            m.sizes[index] = size

    @rule(job_id=jobs, index=st.integers(0, 2), valid=st.booleans())
    def validate_file(self, job_id: str, index: int, valid: bool) -> None:
        """SetValidationState: TRUE changes nothing but the file's flag; FALSE is the
        VALIDATION_FAILED cell, and the file is pending again."""
        m = self.model[job_id]
        call = lambda: self.handle(job_id).set_validation_state(index, valid)  # noqa: E731
        refusal = None
        if m.is_final:
            refusal = hresult.BG_E_INVALID_STATE
        elif m.job_type is not JobType.DOWNLOAD:
            refusal = hresult.E_NOTIMPL
        elif index >= len(m.transferred):
            refusal = hresult.BG_E_FILE_NOT_FOUND
        elif not m.transferred[index]:
            refusal = hresult.E_PENDING
        if refusal is not None or valid:
            self.attempt(job_id, call, None if refusal else m.state, refusal)
            if refusal is None:
                assert self.handle(job_id).validation_state(index)
            return
        self.transition(job_id, Trigger.VALIDATION_FAILED, call)
        m.transferred[index] = False
        m.sizes[index] = None  # the file starts over: its size is not known any more
        assert not self.handle(job_id).validation_state(index)
        error = self.handle(job_id).error
        assert error is not None
        assert (error.hresult, error.file_index) == (hresult.BG_E_VALIDATION_FAILED, index)
        assert self.handle(job_id).file(index).progress.bytes_transferred == 0

    @rule(
        job_id=jobs,
        index=st.integers(0, 2),
        ranges=st.sampled_from(
            [((0, 10),), ((50, None),), ((0, None), (5, 5)), ((90, 20),), ((0, 0),), ((-1, 4),)]
        ),
        position=st.sampled_from([0, 50, 150]),
    )
    def request_ranges(
        self,
        job_id: str,
        index: int,
        ranges: tuple[tuple[int, int | None], ...],
        position: int,
    ) -> None:
        """RequestFileRanges, then UpdateDownloadPosition: refused unless the job is a live
        on-demand download and the file an HTTP(S) one; a range outside a file of known
        size, or an empty one, is BG_E_INVALID_RANGE. Neither changes the state."""
        m = self.model[job_id]
        job = self.handle(job_id)
        wanted = [ByteRange(o, n) for o, n in ranges]
        if m.is_final:
            refusal: int | None = hresult.BG_E_INVALID_STATE
        elif index >= len(m.transferred):
            refusal = hresult.BG_E_FILE_NOT_FOUND
        elif m.job_type is not JobType.DOWNLOAD or not m.on_demand or not m.http[index]:
            refusal = hresult.BG_E_RANDOM_ACCESS_NOT_SUPPORTED
        else:
            refusal = None
        access = refusal
        size = m.sizes[index] if index < len(m.sizes) else None
        if refusal is None and any(
            r.offset < 0
            or r.length == 0
            or (size is not None and (r.offset >= size or (r.end or 0) > size))
            for r in wanted
        ):
            refusal = hresult.BG_E_INVALID_RANGE
        stays = m.state  # neither call moves the job
        asked = lambda: job.request_file_ranges(index, ranges)  # noqa: E731
        self.attempt(job_id, asked, None if refusal else stays, refusal)
        if refusal is None:
            m.requested[index] = list(byteranges.merge([*m.requested[index], *wanted]))
            assert list(job.snapshot().files[index].requested) == m.requested[index]
        if access is None and size is not None and position >= size:
            access = hresult.BG_E_INVALID_RANGE
        moved = lambda: job.update_download_position(index, position)  # noqa: E731
        self.attempt(job_id, moved, None if access else stays, access)
        if access is None:
            assert job.snapshot().files[index].position == position

    def reject_a_file(self, job_id: str) -> None:
        """SetValidationState(FALSE) of the first transferred file (of file 0 if none is)."""
        done = self.model[job_id].transferred
        self.validate_file(job_id, done.index(True) if True in done else 0, valid=False)

    def engine_finishes_job(self, job_id: str) -> None:
        m = self.model[job_id]
        call = self.execute(job_id, cmd.FinishJob())
        if not all(m.transferred):
            self.attempt(job_id, call, None, hresult.BG_E_INVALID_STATE)  # files pending
        else:
            self.transition(job_id, Trigger.ALL_FILES_DONE, call)

    def engine_fails(self, job_id: str, transient: bool) -> None:
        error = TRANSIENT_ERROR if transient else FATAL_ERROR
        trigger = Trigger.TRANSIENT_FAILURE if transient else Trigger.FATAL_FAILURE
        self.transition(job_id, trigger, self.execute(job_id, cmd.Fail(error, transient)))

    def drive_job_towards(self, job_id: str, goal: JobState, size: int) -> None:
        """The calls of the happy path (plus one failure, for the error states) until the
        job is in ``goal``, so that the other rules see the deep states too. Every call is
        still checked against the table like any other."""
        for _ in range(12):
            m = self.model[job_id]
            if m.is_final or m.state is goal:
                return
            pending = [i for i, done in enumerate(m.transferred) if not done]
            if not m.transferred:
                self.add_file(job_id, REMOTE_NAMES[0], "fresh")
            elif goal is JobState.SUSPENDED:
                self.suspend(job_id)
            elif m.state in (JobState.SUSPENDED, JobState.ERROR, JobState.TRANSIENT_ERROR):
                self.resume(job_id)
            elif m.state is JobState.QUEUED:
                self.engine_reports(job_id, Trigger.SCHEDULED)
            elif m.state is JobState.CONNECTING:
                self.engine_reports(job_id, Trigger.CONNECTED)
            elif m.state is JobState.TRANSFERRING and goal in (
                JobState.ERROR,
                JobState.TRANSIENT_ERROR,
            ):
                self.engine_fails(job_id, transient=goal is JobState.TRANSIENT_ERROR)
                return  # a transient failure may be fatal: whatever the table says
            elif m.state is JobState.TRANSFERRING and pending:
                self.engine_finishes_file(job_id, pending[0], size)
            elif m.state is JobState.TRANSFERRING:
                self.engine_finishes_job(job_id)
            else:
                return  # TRANSFERRED: Complete or Cancel is the application's call

    @rule(
        job_id=jobs,
        cells=st.lists(st.tuples(st.sampled_from(GOALS), st.sampled_from(Trigger)), max_size=6),
        size=st.integers(0, 64),
    )
    def triggers_in_states(
        self, job_id: str, cells: list[tuple[JobState, Trigger]], size: int
    ) -> None:
        """For each (goal, trigger): drive the job towards ``goal``, then the call or engine
        report that carries ``trigger`` (one cell of the table, legal or not)."""
        for goal, trigger in cells:
            self.drive_job_towards(job_id, goal, size)
            self.any_trigger(job_id, trigger)

    def any_trigger(self, job_id: str, trigger: Trigger) -> None:
        """The call or engine report that carries ``trigger``, whatever the job's state."""
        calls: dict[Trigger, Callable[[], None]] = {
            Trigger.RESUME: lambda: self.resume(job_id),
            Trigger.SUSPEND: lambda: self.suspend(job_id),
            Trigger.CANCEL: lambda: self.cancel(job_id),
            Trigger.COMPLETE: lambda: self.complete(job_id),
            Trigger.ADD_FILE: lambda: self.add_file(job_id, REMOTE_NAMES[0], "fresh"),
            Trigger.DATA_RECEIVED: lambda: self.engine_checkpoints(job_id, 0, 50),
            Trigger.ALL_FILES_DONE: lambda: self.engine_finishes_job(job_id),
            Trigger.TRANSIENT_FAILURE: lambda: self.engine_fails(job_id, transient=True),
            Trigger.FATAL_FAILURE: lambda: self.engine_fails(job_id, transient=False),
            Trigger.VALIDATION_FAILED: lambda: self.reject_a_file(job_id),
        }
        if trigger in calls:
            calls[trigger]()
        else:
            self.engine_reports(job_id, trigger)

    # -- read models ---------------------------------------------------------------------

    @precondition(lambda self: bool(self.model))
    @rule()
    def rebuild_views(self) -> None:
        rebuild(self.store)
        for job_id in self.model:
            replayed = fold(a.event for a in self.store.stream(job_id))
            assert replayed is not None
            row = self.store.views.get(job_id)
            assert row == view_row(replayed)
            assert job_of(row) == replayed

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def every_job_matches_the_model_the_log_and_the_views(self) -> None:
        if not self.model:
            return
        self.manager.refresh_views()
        cold = TransferManager(self.store, owner=OWNER, clock=self.clock)
        for job_id, m in self.model.items():
            live = self.handle(job_id).snapshot()
            assert live.state is m.state
            assert live.files_transferred == sum(m.transferred)
            # GetError: an error object exactly in ERROR and TRANSIENT_ERROR (§2.3, §6.1).
            has_error = self.handle(job_id).error is not None
            assert has_error == (m.state in (JobState.ERROR, JobState.TRANSIENT_ERROR))
            # Held back by a condition (policy, network) only while waiting in TRANSIENT_ERROR.
            held = live.blocked_by is not None
            assert not held or m.state is JobState.TRANSIENT_ERROR, "blocked_by outlived its wait"
            replayed = fold(a.event for a in self.store.stream(job_id))
            assert replayed == live, "replay differs from the live job"
            row = self.store.views.get(job_id)
            assert row is not None
            assert row == view_row(replayed), "the read-model row differs from the fold"
            assert job_of(row) == replayed
            assert cold.get_job(job_id, include_final=True).snapshot() == replayed
            if job_id in self.final_seen:
                assert live.state is self.final_seen[job_id], "a final state was left"
            elif live.state in FINAL_STATES:
                self.final_seen[job_id] = live.state
        listed = {job.id for job in self.manager.jobs()}
        assert listed == {job_id for job_id, m in self.model.items() if not m.is_final}


# -- the stores ----------------------------------------------------------------------------

StoreOpener = Callable[[Path], tuple[EventStore, Callable[[], None]]]


def run_machine(opener: StoreOpener, *, examples: int, steps: int) -> None:
    machine = type("JobMachineOnStore", (JobMachine,), {"open_store": staticmethod(opener)})
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=examples,
            stateful_step_count=steps,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )


def open_memory(tmp: Path) -> tuple[EventStore, Callable[[], None]]:
    store = open_store("memory:")
    return store, store.close


def open_sqlite(tmp: Path) -> tuple[EventStore, Callable[[], None]]:
    store = open_store(f"sqlite://{tmp / 'store' / 'backhaul.db'}")
    return store, store.close


def test_job_machine_on_memory_store() -> None:
    run_machine(open_memory, examples=200, steps=30)


def test_job_machine_on_sqlite_store() -> None:
    run_machine(open_sqlite, examples=25, steps=30)


@pytest.mark.peer
def test_job_machine_on_postgresql_store(postgres_server: PostgresServer) -> None:
    def open_postgres(tmp: Path) -> tuple[EventStore, Callable[[], None]]:
        name = unique_database_name("machine")
        store = open_store(create_database(postgres_server, name), tmp)

        def close() -> None:
            store.close()
            drop_database(postgres_server, name)

        return store, close

    run_machine(open_postgres, examples=10, steps=30)
