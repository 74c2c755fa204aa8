"""The Python API: ``TransferManager`` (IBackgroundCopyManager) and ``TransferJob``
(IBackgroundCopyJob with its Http options, properties and files).

Every call is decided by the pure core against the latest state of the job's stream and
appended to the log with optimistic concurrency; a refused call raises ``BitsError``
carrying the BITS HRESULT and appends nothing. Reads fold the events the handle has not
seen yet, so a handle always shows the live job, whichever process changed it.
Python names map to BITS names in specs/names.md.
"""

from __future__ import annotations

import contextlib
import functools
import getpass
import itertools
import json
import os
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import attrs

from backhaul.adapters import localfile, registry
from backhaul.adapters.clock import SystemClock
from backhaul.adapters.projection import catch_up, job_of
from backhaul.adapters.store import (
    STORE_ERRORS,
    ConcurrentAppend,
    EventStore,
    default_home,
    file_work,
    open_store,
)
from backhaul.core import command as cmd
from backhaul.core import event as ev
from backhaul.core import hresult
from backhaul.core import job as jobs
from backhaul.core import projection as proj
from backhaul.core.bandwidth import BandwidthPolicy, EngineSettings, check_network_cost
from backhaul.core.error import BitsError, TransferError
from backhaul.core.event import POLICY_STREAM, Event, JobCreated, PolicyChanged
from backhaul.core.job import Job
from backhaul.core.limit import DEFAULT_LIMITS, UNLIMITED, Limits
from backhaul.core.port import Clock
from backhaul.core.setting import JOB_PROPERTIES, SETTINGS, check_setting, is_utf8
from backhaul.core.url import (
    check_secret_parameter_name,
    declare_secret_parameters,
    split_url_password,
)
from backhaul.core.value import (
    ByteRange,
    ClientCertificate,
    FileSpec,
    NotifyCommandLine,
    ProxySettings,
    Sealed,
)
from backhaul.core.vocabulary import (
    LENGTH_TO_EOF,
    AuthScheme,
    AuthTarget,
    CertStoreLocation,
    FilePropertyId,
    JobPriority,
    JobPropertyId,
    JobState,
    JobType,
    ProxyUsage,
)

if TYPE_CHECKING:
    from backhaul.adapters.certstore import CertificateStores

BUILTIN_SCHEMES = frozenset({"http", "https", "smb", "file"})
"""backhaul's own schemes. The manager's default is every installed one (adapters/registry)."""
_RETRIES = 8
CACHE_FROM_CATCH_UP = 20_000  # jobs a refresh_views keeps as copies, at most
CACHE_TRIM_AT = 1024  # copies of jobs a manager keeps before it drops the final ones
CACHE_MAX = 50_000  # copies of jobs kept at most (the oldest dropped first)


def current_owner() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid:{os.getuid()}"


def _is_admin() -> bool:
    return os.geteuid() == 0


@attrs.frozen
class FileInfo:
    """One file of a job (IBackgroundCopyFile) with its live progress."""

    index: int
    remote_name: str
    local_name: str
    ranges: tuple[ByteRange, ...]
    progress: proj.FileProgress
    temporary_name: str | None
    validator: str | None
    digest: str | None
    validated: bool = False


class BatchConflict(BitsError, ConcurrentAppend):
    """A group commit (``TransferManager.batch``) lost a race: another writer changed one of
    its jobs after the batch read it, and nothing of the batch was recorded. A BitsError
    (E_FAIL, as a single call that keeps losing its race), and a ConcurrentAppend."""


def _batch_conflict() -> BatchConflict:
    return BatchConflict(
        hresult.E_FAIL,
        "another writer changed a job of this batch after the batch read it; "
        "nothing of the batch was recorded (read the jobs and call again)",
    )


def _marks(folder: Path | None) -> list[Path]:
    """The marks of Completes in ``folder`` (none when there is no folder)."""
    if folder is None:
        return []
    try:
        return sorted(folder.glob("*.json"))
    except OSError:
        return []


def _unmark(marks: Iterable[Path]) -> None:
    """Remove the marks of Completes that ended (recorded, or failed and left as BITS
    leaves them)."""
    for mark in marks:
        mark.unlink(missing_ok=True)


_Method = TypeVar("_Method", bound=Callable[..., Any])


def _store_call(method: _Method) -> _Method:
    """A TransferManager step that reads or writes the store. One thread at a time (the
    manager's lock, which a group commit holds for its whole block); the store's own errors
    under it (a full disk, a lost database server) come out as StoreUnavailable with their
    HRESULT, as every other refusal is a BitsError; a closed manager refuses at once."""

    @functools.wraps(method)
    def call(self: TransferManager, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            if self.closed:
                raise BitsError(hresult.RPC_E_DISCONNECTED, "this TransferManager is closed")
            try:
                return method(self, *args, **kwargs)
            except STORE_ERRORS as exc:
                raise self.store.failure(exc) from exc

    return cast(_Method, call)


class TransferManager:
    """Opens the store and creates, finds and enumerates jobs.

    ``store``: a URL (see adapters/store.py) or an open ``EventStore``; ``home``: the
    backhaul home for the default SQLite store (a relative one is taken from the current
    directory); ``owner``: recorded on every new job (default: the current user);
    ``schemes``: the URL schemes its jobs may name, as a collection of names.
    """

    def __init__(
        self,
        store: str | EventStore | None = None,
        *,
        home: str | Path | None = None,
        owner: str | None = None,
        limits: Limits = DEFAULT_LIMITS,
        clock: Clock | None = None,
        schemes: Iterable[str] | None = None,
    ) -> None:
        # Checked before the store is opened: a refused manager leaves nothing behind.
        if not isinstance(store, EventStore | str | None):
            raise BitsError(
                hresult.E_INVALIDARG,
                f"the store must be a URL, an open EventStore or None, not {_kind(store)}",
            )
        if isinstance(store, str):
            _string(store, "the store URL")
        home_path = _home(home)
        if owner is not None:
            _string(owner, "the owner")
        if schemes is not None:
            schemes = [_string(s, "a scheme") for s in _collection(schemes, "the schemes")]
        if isinstance(store, EventStore):
            self.store = store
            self._owns_store = False
        else:
            self.store = open_store(store, home_path)
            self._owns_store = True
        self.closed = False
        # An application's threads share a manager (an EngineThread's callbacks complete jobs
        # while the main thread adds more): its store steps take turns, and a group commit
        # holds the lock for its whole block, so no other thread's call lands in it.
        self._lock = threading.RLock()
        self._batch_thread: int | None = None
        self.owner = owner or current_owner()
        self.home = home_path if home_path is not None else default_home()
        self._certificates: CertificateStores | None = None
        self.limits = limits
        self.clock: Clock = clock or SystemClock()
        # None: every scheme an installed transport (uploader, for upload jobs) serves
        self.schemes = None if schemes is None else frozenset(s.lower() for s in schemes)
        self._cache: dict[str, Job] = {}
        self._trim_at = CACHE_TRIM_AT  # the cache's size that makes it drop final jobs
        # This manager's last appends, while they are one run of log positions: (the
        # position before them, the last one, each job's version after them). The next
        # refresh_views saves their rows from the copies, without reading them back.
        self._appended: tuple[int, int, dict[str, int]] | None = None
        # The copies the last refresh_views folded, and the log position they are as of: a
        # batch that finds the log still there takes them as they are (see ``_load``).
        self._caught_up: tuple[int, dict[str, Job]] = (0, {})
        self._log_unmoved: bool | None = None  # in a batch: is the log still there?
        self._views_caught_up: bool | None = None  # in a batch: are the rows current?
        self._pending: list[tuple[str, int, list[Event]]] | None = None
        self._pending_index: dict[str, int] = {}  # job id -> its last entry in _pending
        self._fresh: set[str] = set()  # in a batch: jobs read, or changed, in it
        self._listings: dict[str, list[str]] = {}  # temp files by directory, per batch
        self._good_dirs: set[str] = set()  # destination directories checked, per batch
        self._secrets_read = False  # the secret query parameters read, in this batch
        self._renamed_dirs: set[str] = set()  # directories a batch's Completes renamed in
        # The store's files (resolved), by their base names: looked up once.
        self._own_files: dict[str, set[str]] | None = None
        self._own_dirs: set[str] = set()  # the store's folders of marks (discards...)
        self._before_commit: list[Callable[[], object]] = []
        self._after_commit: list[Callable[[], object]] = []
        self._discarded: list[str] = []  # in a batch: jobs whose temps go after the commit
        self._completing: list[str] = []  # in a batch: jobs whose files move at the commit
        self._undeleted: list[str] = []  # in a batch: jobs whose temps could not be deleted
        self._completing_now: set[str] | None = None  # in a batch: jobs marks name (read once)
        # Set when the policy stream cannot be read (an undecodable event): the manager still
        # opens, so that `audit verify` can report that event, but makes no job, since a job
        # named after a URL could record a parameter the store declared secret in plain text;
        # a call that reads the policy (a URL added to a job, an engine) meets it again.
        self._policy_unreadable: str | None = None
        try:
            self.declare_secret_parameters()  # before this manager names a job after a URL
        except BitsError:
            raise  # the store cannot be used
        except Exception as exc:  # an undecodable event in the policy stream
            self._policy_unreadable = f"{type(exc).__name__}: {exc}"

    @property
    def certificates(self) -> CertificateStores:
        """The client-certificate stores (adapters/certstore.py), opened on first use."""
        if self._certificates is None:
            from backhaul.adapters import certstore  # loads cryptography: only when used

            self._certificates = certstore.CertificateStores.for_home(self.home, self.store.secrets)
        return self._certificates

    @certificates.setter
    def certificates(self, stores: CertificateStores) -> None:
        self._certificates = stores

    def __enter__(self) -> TransferManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the store (when this manager opened it); later calls raise
        RPC_E_DISCONNECTED, as a released BITS interface does."""
        with self._lock:  # after the call another thread is in
            self.closed = True
            if self._owns_store:
                self.store.close()

    # -- IBackgroundCopyManager --------------------------------------------------------

    def create_job(self, display_name: str, job_type: JobType = JobType.DOWNLOAD) -> TransferJob:
        """CreateJob: a new job, SUSPENDED, owned by this manager's owner."""
        job_type = _enum(JobType, job_type, "job type")
        if not isinstance(display_name, str):
            raise BitsError(hresult.E_INVALIDARG, "the display name must be a string")
        SETTINGS["display_name"].check(display_name, None)  # type: ignore[arg-type]
        if self._policy_unreadable is not None:
            raise BitsError(
                hresult.E_FAIL,
                "the store's engine settings cannot be read (`backhaul audit verify` names the "
                f"event: {self._policy_unreadable}); no job is made while its secret query "
                "parameters are unknown",
            )
        self._check_job_limits()
        job_id = str(uuid.uuid4())
        created = JobCreated(self.clock.now(), job_id, job_type, display_name, self.owner)
        self._record(job_id, 0, [created])
        self._cache[job_id] = jobs.start(created)
        return TransferJob(self, job_id)

    @_store_call
    def caller_limits(self) -> Limits:
        """The limits this process's calls are held to: ``limits``, or none for an
        administrator (root), whom BITS exempts from its job, file and range limits (as it
        exempts service accounts; bits-core.md §16)."""
        return UNLIMITED if _is_admin() else self.limits

    def _check_job_limits(self) -> None:
        limits = self.caller_limits()
        if limits.max_jobs_per_owner is None and limits.max_jobs is None:
            return
        self.refresh_views()
        views = self.store.views
        per_owner = limits.max_jobs_per_owner
        if per_owner is not None and (
            views.count_live(self.owner) + self._pending_creations(self.owner) >= per_owner
        ):
            raise BitsError(
                hresult.BG_E_TOO_MANY_JOBS_PER_USER,
                f"{self.owner} already has {per_owner} jobs (the limit)",
            )
        total = limits.max_jobs
        if total is not None and views.count_live(None) + self._pending_creations(None) >= total:
            raise BitsError(
                hresult.BG_E_TOO_MANY_JOBS_PER_MACHINE, f"the store already holds {total} jobs"
            )

    def get_job(self, job_id: str, *, include_final: bool = False) -> TransferJob:
        """GetJob: BG_E_NOT_FOUND for unknown ids and, as in BITS, for jobs that were
        completed or cancelled (``include_final=True`` reads those too)."""
        job = self._load(str(job_id))
        self._check_access(job)
        if job.is_final and not include_final:
            raise BitsError(hresult.BG_E_NOT_FOUND, f"job {job_id} is {job.state.name}")
        return TransferJob(self, job.id)

    def jobs(
        self, *, all_owners: bool = False, include_final: bool = False
    ) -> Iterator[TransferJob]:
        """EnumJobs: a snapshot of which jobs exist, with live values on each handle."""
        if all_owners and not _is_admin():
            raise BitsError(
                hresult.E_ACCESSDENIED, "only an administrator lists every owner's jobs"
            )
        for job_id in self._job_ids(None if all_owners else self.owner, include_final):
            yield TransferJob(self, job_id)

    @_store_call
    def _job_ids(self, owner: str | None, include_final: bool) -> list[str]:
        self.refresh_views()
        return [row.job_id for row in self.store.views.select(owner, include_final=include_final)]

    @_store_call
    def refresh_views(self) -> int:
        """Bring the read models up to date with the log (also done by every listing).
        The jobs it folded are kept as this manager's copies (a later ``_load`` reads only
        their newer events, not their rows), up to ``CACHE_FROM_CATCH_UP`` jobs a call."""
        folded: dict[str, Job] = {}
        run, self._appended = self._appended, None
        known = None
        if run is not None and self._pending is None:
            copies = {job_id: self._cache.get(job_id) for job_id in run[2]}
            if all(
                job is not None and job.version == run[2][job_id] for job_id, job in copies.items()
            ):
                known = (run[0], run[1], cast(dict[str, Job], copies))
        position = catch_up(self.store, folded, known)
        if self._pending is None and len(folded) <= CACHE_FROM_CATCH_UP:
            cache = self._cache
            for job_id, job in folded.items():
                cached = cache.get(job_id)
                if cached is None or cached.version < job.version:
                    cache[job_id] = job
            self._caught_up = (position, {j: job for j, job in folded.items() if cache[j] is job})
        return position

    @staticmethod
    def get_error_description(code: int, language_id: int = 0) -> str:
        """IBackgroundCopyManager::GetErrorDescription: what an HRESULT means, in English
        whatever ``language_id`` asks for (BITS falls back to the system's language too).
        Every code gets a description: HTTP statuses (0x8019xxxx), Win32 errors and
        unregistered codes are named as such; E_INVALIDARG for what is no 32-bit value."""
        _integer(code, "an HRESULT")
        _integer(language_id, "a language id")
        try:
            return hresult.describe(code)
        except ValueError as exc:  # not a 32-bit value
            raise BitsError(hresult.E_INVALIDARG, str(exc)) from None

    # -- engine-wide policy (one stream of its own) ------------------------------------

    @_store_call
    def settings(self) -> EngineSettings:
        """The bandwidth policy and network cost every engine on this store applies."""
        result = EngineSettings()
        for appended in self.store.stream(POLICY_STREAM):
            event = appended.event
            assert isinstance(event, PolicyChanged)
            result = result.evolve(event.name, event.value)
        return result

    @_store_call
    def _set_policy(self, name: str, value: Any) -> None:
        for _ in range(_RETRIES):
            version = self.settings().version
            try:
                self.store.append(
                    POLICY_STREAM, version, [PolicyChanged(self.clock.now(), name, value)]
                )
                return
            except ConcurrentAppend:
                continue
        raise BitsError(hresult.E_FAIL, "the policy kept changing under this call")

    def set_bandwidth_policy(self, policy: BandwidthPolicy) -> None:
        """Global and per-priority limits with windows; takes effect in running jobs."""
        if not _is_admin() and self.owner != current_owner():
            raise BitsError(hresult.E_ACCESSDENIED, "only the machine's owner sets policy")
        if not isinstance(policy, BandwidthPolicy):
            raise BitsError(
                hresult.E_INVALIDARG, f"the policy must be a BandwidthPolicy, not {_kind(policy)}"
            )
        for limits in (policy.global_limits, *policy.priority_limits.values()):
            for limit in limits:
                if limit.rate < 0:
                    raise BitsError(hresult.E_INVALIDARG, "a rate cannot be negative")
        for priority in policy.priority_limits:
            if priority not in (1, 2, 3):
                raise BitsError(
                    hresult.E_INVALIDARG, "limits apply to HIGH, NORMAL and LOW priorities"
                )
        self._set_policy("bandwidth", policy.to_data())

    def set_network_cost(self, cost: int | None) -> None:
        """Declare the network's BITS_COST_STATE_* (None: read it from the system)."""
        self._set_policy("network_cost", check_network_cost(cost))

    def set_secret_parameters(self, names: Iterable[str]) -> None:
        """Keep these query parameters out of the log, as the built-in signature names are
        (``?h=...`` of a signed URL whose parameter has no secret word): every manager and
        engine of this store seals their values from now on. Replaces the list; URLs
        recorded before stay as they were recorded."""
        if not _is_admin() and self.owner != current_owner():
            raise BitsError(hresult.E_ACCESSDENIED, "only the machine's owner sets policy")
        unique: dict[str, str] = {}  # compared without case: the first spelling given
        try:
            for name in _collection(names, "the secret parameter names"):
                unique.setdefault(check_secret_parameter_name(name).lower(), name)
        except ValueError as exc:
            raise BitsError(hresult.E_INVALIDARG, str(exc)) from None
        checked = sorted(unique.values(), key=str.lower)
        declare_secret_parameters(checked)
        self._set_policy("secret_parameters", checked)

    def declare_secret_parameters(self) -> None:
        """Read the store's secret query parameters into this process (core.url): once per
        group commit, inside one."""
        if self._in_batch() and self._secrets_read:
            return
        declare_secret_parameters(self.settings().secret_parameters)
        self._secrets_read = self._in_batch()

    def _before_sealing(self, remote_names: Iterable[str]) -> None:
        """Before URLs are sealed for the log: a URL with a query may hold a parameter that
        another process declared secret since this one last read the list."""
        if any("?" in name for name in remote_names):
            self.declare_secret_parameters()

    def _in_batch(self) -> bool:
        """Is this thread inside a group commit (``batch``)?"""
        return self._pending is not None and self._batch_thread == threading.get_ident()

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        with self._lock, self._batch():  # other threads' calls wait for the whole block
            yield

    @contextlib.contextmanager
    def _batch(self) -> Iterator[None]:
        """Group commit: every call inside the block is decided at once but appended in
        ONE transaction at the end (nothing is appended if the block raises).

        Inside the block a job is read from the store once, at its first use (not at all
        when the last refresh_views folded it and the log has not moved since); later
        reads see that state plus the block's own calls. A change another process appends
        meanwhile fails the commit as it would have anyway: ``BatchConflict`` (E_FAIL), and
        nothing of the block is recorded."""
        if self._pending is not None:
            yield
            return
        pending: list[tuple[str, int, list[Event]]] = []
        self._batch_thread = threading.get_ident()
        self._pending, self._before_commit, self._after_commit = pending, [], []
        self._discarded, self._completing, self._undeleted = [], [], []
        self._completing_now = None
        self._pending_index, self._listings, self._renamed_dirs = {}, {}, set()
        self._good_dirs, self._secrets_read = set(), False
        self._fresh = set()
        self._log_unmoved = None
        self._views_caught_up = None
        head = self.store.head()  # before the block reads any job
        try:
            yield
            before, after = self._before_commit, self._after_commit
            self._pending = None
            # Files to move or delete (a Complete, a Cancel): the turn of Complete and
            # Cancel on the store, and no job of the batch changed since it was read.
            turn = file_work(self.store) if before or after else contextlib.nullcontext()
            with turn:
                if before or after:
                    self._check_unmoved(pending, head)
                # Killed while its Completes rename files, the batch leaves their jobs
                # marked: Cancel refuses them, Complete again finishes the renames.
                marks = self._mark_completing(self._completing)
                try:
                    for action in before:
                        action()  # Complete publishes its files before its event is appended
                    localfile.sync_dirs(self._renamed_dirs)  # once per directory for the batch
                    # A process killed between the commit and the deletions would leave the
                    # temp files of jobs no engine looks at again: the journal names them.
                    journal = self._journal_discards(self._discarded) if pending else None
                    if pending:
                        try:
                            self._append_many(pending)
                        except ConcurrentAppend as exc:  # one transaction: none appended
                            if journal is not None:
                                journal.unlink(missing_ok=True)
                            raise _batch_conflict() from exc
                except Exception:
                    # A failed commit, not a kill: its jobs stay TRANSFERRED with the files
                    # renamed so far, as a failed Complete alone leaves them, Cancel allowed.
                    _unmark(marks)
                    raise
                _unmark(marks)
                if marks:
                    self._prune_marks()  # a killed Complete's, which this batch finished
                for action in after:
                    action()  # Cancel deletes temp files once its event is appended
                if journal is not None:
                    if self._undeleted:  # left for the next engine to start (finish_discards)
                        self._journal_discards(self._undeleted)
                    journal.unlink(missing_ok=True)
        except BaseException:
            for job_id, _, _ in pending:
                self._cache.pop(job_id, None)
            raise
        finally:
            self._pending = None
            self._trim_cache()
            self._pending_index, self._listings, self._renamed_dirs = {}, {}, set()
            self._good_dirs, self._secrets_read = set(), False
            self._fresh = set()
            self._log_unmoved = None
            self._views_caught_up = None
            self._before_commit, self._after_commit = [], []
            self._discarded, self._completing, self._undeleted = [], [], []
            self._completing_now = None

    def _discard_journal(self) -> Path | None:
        """Where batches note the jobs whose temp files they delete after their commit: in
        the store's home, beside the SQLite file or the secret key (an in-memory store
        keeps nothing over a crash)."""
        if self.store.kind == "sqlite":
            return Path(self.store.location).parent / "discards"
        key = self.store.secrets.file
        return None if key is None else Path(key).parent / "discards"

    def _journal_discards(self, job_ids: Sequence[str]) -> Path | None:
        folder = self._discard_journal()
        if not job_ids or folder is None:
            return None
        path = folder / f"{uuid.uuid4()}.json"
        tmp = path.with_suffix(".tmp")
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp.write_text(json.dumps(sorted(set(job_ids))), encoding="utf-8")
            os.replace(tmp, path)
        except OSError:  # best effort: without it the batch commits as it always did
            tmp.unlink(missing_ok=True)
            return None
        return path

    def _completing_folder(self) -> Path | None:
        """Where Complete marks the jobs whose files it renames into place (beside the
        batches' discard journal): one file per Complete, or per batch, naming its jobs.
        Killed half-way, the mark stays, and Cancel refuses to end those jobs with part of
        their files published; Complete again finishes them."""
        folder = self._discard_journal()
        return None if folder is None else folder.parent / "completing"

    def _mark_completing(self, job_ids: Sequence[str]) -> list[Path]:
        """Mark these jobs as completing, durably (written, synced, renamed into place and
        the folder synced) before any of their files is renamed: one file for a batch of
        10,000 jobs, not 10,000. Best effort: without a mark Complete works as it always
        did."""
        folder = self._completing_folder()
        if folder is None or not job_ids:
            return []
        mark = folder / f"{uuid.uuid4()}.json"
        tmp = mark.with_suffix(".tmp")
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as file:
                json.dump(list(job_ids), file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, mark)
            localfile.sync_dirs([folder])
        except OSError:
            _unmark([tmp, mark])
            return []
        return [mark]

    def _completing_jobs(self) -> set[str]:
        """The jobs the marks of Completes still running, or killed, name. Read once per
        batch (a batch that cancels 10,000 jobs lists the folder once)."""
        if self._in_batch() and self._completing_now is not None:
            return self._completing_now
        named: set[str] = set()
        folder = self._completing_folder()
        for mark in _marks(folder):
            with contextlib.suppress(OSError, ValueError, TypeError):
                named.update(json.loads(mark.read_text(encoding="utf-8")))
        if self._in_batch():
            self._completing_now = named
        return named

    def _discard(
        self, job: Job, listings: dict[str, list[str]] | None = None, *, batched: bool = False
    ) -> list[Path]:
        """Delete a final job's temp files (``localfile.discard``). Those that cannot be
        deleted now (a read-only or immutable directory) are noted in the discard journal,
        and the next engine to start tries again (``finish_discards``)."""
        left = localfile.discard(job, listings)
        if left and batched:
            self._undeleted.append(job.id)  # journaled once the batch's deletions are done
        elif left:
            self._journal_discards([job.id])
        return left

    def finish_discards(self) -> int:
        """Delete the temp files a batch's Cancel or Complete committed but was killed
        before deleting (its journal still names the jobs); a job the journal names that
        is not final (the batch never committed) keeps its files. The engine calls this as
        it starts. Returns how many journals were done."""
        folder = self._discard_journal()
        if folder is None:
            return 0
        try:
            journals = sorted(folder.glob("*.json"))
        except OSError:
            return 0
        for journal in journals:
            try:
                job_ids = json.loads(journal.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # gone meanwhile (another process did it), or not ours
            left = []
            for job_id in job_ids:
                with contextlib.suppress(BitsError, KeyError):
                    job = self._load(job_id)
                    if job.is_final and localfile.discard(job):
                        left.append(job_id)  # still undeletable: tried again next time
            if not left:
                journal.unlink(missing_ok=True)
            elif len(left) < len(job_ids):
                self._journal_discards(left)
                journal.unlink(missing_ok=True)
        self._prune_marks()
        return len(journals)

    def _prune_marks(self) -> None:
        """Remove the marks of killed Completes whose jobs have all ended since (Complete
        called again, or the batch recorded before its process died)."""
        for mark in _marks(self._completing_folder()):
            try:
                job_ids = json.loads(mark.read_text(encoding="utf-8"))
                if all(self._is_final_or_gone(job_id) for job_id in job_ids):
                    mark.unlink(missing_ok=True)
            except (OSError, ValueError, TypeError):
                continue

    def _is_final_or_gone(self, job_id: str) -> bool:
        try:
            return self._load(job_id).is_final
        except (BitsError, KeyError):
            return True

    # -- the command path --------------------------------------------------------------

    @_store_call
    def _check_unmoved(self, pending: list[tuple[str, int, list[Event]]], head: int) -> None:
        """Before a batch moves or deletes files: BatchConflict if a job of it changed since
        the batch read it (a Cancel another process made would have its files published
        anyway, the commit failing only after). Nothing appended since the batch began: no
        look at each job."""
        if self.store.head() == head:
            return
        for job_id, after, _ in pending:
            if after and self.store.stream(job_id, after):
                raise _batch_conflict()

    @_store_call
    def _append_many(self, pending: list[tuple[str, int, list[Event]]]) -> None:
        self._note_appended(self.store.append_many(pending), pending)

    @_store_call
    def _record(self, job_id: str, after: int, events: list[Event]) -> None:
        if self._pending is not None:
            # Indexed: a batch of 10,000 jobs must not scan its pending list per call.
            i = self._pending_index.get(job_id)
            if i is not None:
                _, pafter, pevents = self._pending[i]
                if pafter + len(pevents) == after:
                    pevents.extend(events)
                    return
            self._pending_index[job_id] = len(self._pending)
            self._pending.append((job_id, after, list(events)))
            self._fresh.add(job_id)
            return
        positions = self.store.append(job_id, after, events)
        self._note_appended(positions, [(job_id, after, events)])

    def _note_appended(
        self, positions: Sequence[int], appended: Sequence[tuple[str, int, Sequence[Event]]]
    ) -> None:
        """Remember an append for ``refresh_views``, while this manager's appends make one
        run of positions (another writer in between, or a gap, ends it)."""
        run = self._appended
        if not positions or positions[-1] - positions[0] + 1 != len(positions):
            self._appended = None
            return
        if run is None or run[1] + 1 != positions[0]:
            run = (positions[0] - 1, positions[-1], {})
        versions = run[2]
        for job_id, after, events in appended:
            versions[job_id] = max(versions.get(job_id, 0), after + len(events))
        self._appended = (run[0], positions[-1], versions)

    @_store_call
    def _load(self, job_id: str) -> Job:
        job = self._cache.get(job_id)
        from_row = job is None
        if job is None:
            row = self.store.views.get(job_id)
            job = job_of(row) if row is not None else None
        if job is not None and job_id in self._fresh:
            return job  # inside a batch: read once, then ahead of the store
        if (
            job is not None
            and self._pending is not None
            and (self._as_caught_up(job_id, job) or (from_row and self._views_current()))
        ):
            self._fresh.add(job_id)
            self._cache[job_id] = job
            return job  # the log has not moved since this copy was folded
        after = job.version if job else 0
        newer = self.store.stream(job_id, after)
        job = jobs.fold((a.event for a in newer), job)
        if job is None:
            raise BitsError(hresult.BG_E_NOT_FOUND, f"no job {job_id}")
        self._cache[job_id] = job
        if self._pending is not None:
            self._fresh.add(job_id)
        else:
            self._trim_cache()
        return job

    def _trim_cache(self) -> None:
        """The copies of jobs this manager read or changed make its next reads cheap; a
        manager open for months (an application's) must not keep every job it ever saw.
        Past ``_trim_at`` copies, those of final jobs are dropped (read again, from their
        rows, if ever asked for), then the oldest beyond ``CACHE_MAX``; the next trim
        comes at twice what is left. Never inside a batch, whose copies are ahead of the
        store."""
        cache = self._cache
        if len(cache) <= self._trim_at or self._pending is not None:
            return
        for job_id in [j for j, job in cache.items() if job.is_final]:
            del cache[job_id]
        for job_id in list(itertools.islice(cache, max(len(cache) - CACHE_MAX, 0))):
            del cache[job_id]
        self._trim_at = max(CACHE_TRIM_AT, 2 * len(cache))

    def _as_caught_up(self, job_id: str, job: Job) -> bool:
        """Inside a batch: ``job`` is the copy the last refresh_views folded, and the log
        has not moved since (asked once per batch). Completing 10,000 jobs right after a
        refresh then reads none of them again; a change another process appends later
        fails the batch's commit, as for any job the batch read."""
        position, folded = self._caught_up
        if folded.get(job_id) is not job:
            return False
        if self._log_unmoved is None:
            self._log_unmoved = self.store.head() == position
        return self._log_unmoved

    def _views_current(self) -> bool:
        """Inside a batch: do the read model's rows hold every event of the log (asked once
        per batch)? Then a row read in the batch is its job as the log has it, and Completing
        10,000 jobs after an engine that kept the rows current reads no stream (a query per
        job); a change another process appends later fails the batch's commit, as for any
        job the batch read."""
        if self._views_caught_up is None:
            self._views_caught_up = self.store.views.position() == self.store.head()
        return self._views_caught_up

    def _pending_creations(self, owner: str | None) -> int:
        return sum(
            1
            for _, _, events in self._pending or []
            for e in events
            if isinstance(e, JobCreated) and (owner is None or e.owner == owner)
        )

    def _check_not_the_store(self, local_names: Iterable[str]) -> None:
        """A download (or a reply) is renamed over its local name at Complete: never over
        one of the store's own files (its database, the secret key), which would lose every
        job or every sealed secret."""
        real = _RealDirs()
        if self._own_files is None:
            self._own_files = {}
            for f in self.store.files:
                self._own_files.setdefault(f.name, set()).add(real(str(f)))
            home = self._discard_journal()
            if home is not None:  # the folders of the marks Complete and Cancel leave
                for folder in (home, home.parent / "completing"):
                    self._own_dirs.add(os.path.realpath(folder))
        for name in local_names:
            same_base = self._own_files.get(os.path.basename(name))
            if same_base and real(name) in same_base:
                raise BitsError(
                    hresult.E_INVALIDARG,
                    f"{name} is a file of this store itself: a download renamed over it "
                    "would destroy the store",
                )
            if self._own_dirs and real.directory(name) in self._own_dirs:
                raise BitsError(
                    hresult.E_INVALIDARG,
                    f"{name} is in a folder of this store itself, which it empties",
                )

    def _check_aliases(self, job: Job, local_names: Sequence[str]) -> None:
        """Two files of a download job must not name one file, even through a link to a
        directory (/d/link/x and /d/real/x): Complete would publish one over the other. The
        core refuses the same name spelled twice; this resolves each directory once."""
        real = _RealDirs()
        seen = {real(f.local_name): f.local_name for f in job.files}
        for name in local_names:
            other = seen.setdefault(real(name), name)
            if other != name:
                raise BitsError(
                    hresult.E_INVALIDARG,
                    f"{name} and {other} name the same file: one would be published over the other",
                )

    def _check_access(self, job: Job) -> None:
        if job.owner != self.owner and not _is_admin():
            raise BitsError(hresult.E_ACCESSDENIED, f"job {job.id} belongs to {job.owner}")

    def execute(self, job_id: str, command: cmd.Command) -> list[Event]:
        """Decide ``command`` against the latest job and append its events."""
        for _ in range(_RETRIES):
            job = self._load(job_id)
            events = cmd.decide(job, command, self.clock.now(), self.caller_limits())
            if not events:
                return events
            try:
                self._record(job_id, job.version, events)
            except ConcurrentAppend:
                # The cached copy is still the log's fold up to its version: the next load
                # reads only the events after it (a job of 5,000 files is not decoded again).
                continue
            self._cache[job_id] = jobs.fold(events, job) or job
            self._trim_cache()
            return events
        raise BitsError(hresult.E_FAIL, f"job {job_id} kept changing under this call")

    def seal(self, secret: str) -> Any:
        return self.store.secrets.seal(secret)


class _RealDirs:
    """Names with their directory's links resolved (the names themselves may not exist
    yet), each directory resolved once."""

    def __init__(self) -> None:
        self._dirs: dict[str, str] = {}

    def directory(self, name: str) -> str:
        directory = os.path.dirname(name)
        real = self._dirs.get(directory)
        if real is None:
            real = self._dirs[directory] = os.path.realpath(directory)
        return real

    def __call__(self, name: str) -> str:
        return os.path.join(self.directory(name), os.path.basename(name))


def _enum(kind: Any, value: Any, what: str) -> Any:
    try:
        return kind(_integer(value, f"the {what}"))
    except ValueError:
        raise BitsError(hresult.E_INVALIDARG, f"unknown {what} {value!r}") from None


# The API's arguments are checked for their type here, before the core sees them, and never
# converted: int(2.9) made 2 and int("3") made 3 of values the core refuses, and a wrong
# type raised TypeError or ValueError where every refused call raises BitsError.


def _kind(value: Any) -> str:
    return type(value).__name__  # never the value: it may be a password


def _integer(value: Any, what: str) -> int:
    """``value``, an int (IntEnum and IntFlag members are ints; a bool is not one here)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise BitsError(hresult.E_INVALIDARG, f"{what} must be an integer, not {_kind(value)}")
    return value


def _index(value: Any) -> int:
    """A file index: an integer (whether the job has that file is the caller's check)."""
    return _integer(value, "a file index")


def _string(value: Any, what: str, *, optional: bool = False) -> Any:
    """``value``, a string without NUL that can be stored (or None, when ``optional``)."""
    if value is None and optional:
        return None
    if not isinstance(value, str):
        either = "a string or None" if optional else "a string"
        raise BitsError(hresult.E_INVALIDARG, f"{what} must be {either}, not {_kind(value)}")
    if "\x00" in value or not is_utf8(value):
        raise BitsError(
            hresult.E_INVALIDARG, f"{what} must be valid Unicode without NUL characters"
        )
    return value


def _path(value: Any, what: str) -> str:
    """A local path given as a string or a path object, as a string (checked by the core)."""
    text = os.fspath(value) if isinstance(value, os.PathLike) else value
    if not isinstance(text, str):
        raise BitsError(
            hresult.E_INVALIDARG, f"{what} must be a string or a Path, not {_kind(value)}"
        )
    return text


def _collection(value: Any, what: str) -> Iterable[Any]:
    """An iterable of items; a single string is refused, not taken letter by letter."""
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise BitsError(
            hresult.E_INVALIDARG, f"{what} must be a list or another collection, not {_kind(value)}"
        )
    return value


def _seconds(value: Any, what: str) -> float:
    """A timer: seconds (int or float) or a timedelta; the core checks its range."""
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BitsError(
            hresult.E_INVALIDARG,
            f"{what} must be a number of seconds or a timedelta, not {_kind(value)}",
        )
    return value


def _home(home: Any) -> Path | None:
    """The home as an absolute path. A relative one is taken from the current directory
    now (the command's ``--home`` may be relative), as the store's files are."""
    if home is None:
        return None
    text = _string(_path(home, "the home"), "the home")
    if not text:
        raise BitsError(hresult.E_INVALIDARG, "the home must not be empty")
    return Path(os.path.abspath(os.path.expanduser(text)))


def file_info(job: Job, i: int) -> FileInfo:
    f = job.files[i]
    temp = None
    if job.job_type is JobType.DOWNLOAD and not f.completed:
        temp = str(localfile.file_temp(job, i))
    return FileInfo(
        i,
        f.remote_name,
        f.local_name,
        f.ranges,
        proj.file_progress(job, i),
        temp,
        f.validator,
        f.digest,
        f.validated,
    )


class TransferJob:
    """A handle on one job. Reads are live; every setter is a recorded, checked call."""

    def __init__(self, manager: TransferManager, job_id: str) -> None:
        self._manager = manager
        self.id = job_id

    def __repr__(self) -> str:
        """Its id, name and state; a handle whose job cannot be read (its manager closed,
        the job gone) still shows its id and why, since a repr must not raise (a log line
        or a traceback that shows the handle would fail in turn)."""
        try:
            job = self.snapshot()
        except BitsError as exc:
            return f"<TransferJob {self.id} ({hresult.name_of(exc.hresult)})>"
        return f"<TransferJob {self.id} {job.display_name!r} {job.state.name}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TransferJob) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def snapshot(self) -> Job:
        """The folded job as of now (the core's immutable ``Job``)."""
        return self._manager._load(self.id)

    def _do(self, command: cmd.Command) -> list[Event]:
        self._manager._check_access(self.snapshot())
        return self._manager.execute(self.id, command)

    def _set(self, name: str, value: Any) -> None:
        self._do(cmd.SetSetting(name, value))

    # -- identity and state ------------------------------------------------------------

    @property
    def job_type(self) -> JobType:
        return self.snapshot().job_type

    @property
    def owner(self) -> str:
        return self.snapshot().owner

    @property
    def state(self) -> JobState:
        return self.snapshot().state

    @property
    def progress(self) -> proj.JobProgress:
        return proj.job_progress(self.snapshot())

    @property
    def reply_progress(self) -> proj.ReplyProgress:
        """GetReplyProgress: E_NOTIMPL for a job that is no upload-reply job (BITS)."""
        job = self.snapshot()
        if job.job_type is not JobType.UPLOAD_REPLY:
            raise BitsError(hresult.E_NOTIMPL, "only upload-reply jobs have a reply")
        return proj.reply_progress(job)

    @property
    def times(self) -> proj.JobTimes:
        return proj.job_times(self.snapshot())

    @property
    def error(self) -> proj.ErrorInfo | None:
        """GetError: the error object, or None when the job is not in (TRANSIENT_)ERROR."""
        return proj.job_error(self.snapshot())

    @property
    def error_count(self) -> int:
        return self.snapshot().error_count

    # -- settings ----------------------------------------------------------------------

    @property
    def display_name(self) -> str:
        return self.snapshot().display_name

    @display_name.setter
    def display_name(self, value: str) -> None:
        self._set("display_name", value)

    @property
    def description(self) -> str:
        return self.snapshot().description

    @description.setter
    def description(self, value: str) -> None:
        self._set("description", value)

    @property
    def priority(self) -> JobPriority:
        return self.snapshot().priority

    @priority.setter
    def priority(self, value: JobPriority) -> None:
        self._set("priority", _integer(value, "the priority"))

    @property
    def minimum_retry_delay(self) -> timedelta:
        return timedelta(seconds=self.snapshot().minimum_retry_delay)

    @minimum_retry_delay.setter
    def minimum_retry_delay(self, value: timedelta | float) -> None:
        self._set("minimum_retry_delay", _seconds(value, "the minimum retry delay"))

    @property
    def no_progress_timeout(self) -> timedelta:
        return timedelta(seconds=self.snapshot().no_progress_timeout)

    @no_progress_timeout.setter
    def no_progress_timeout(self, value: timedelta | float) -> None:
        self._set("no_progress_timeout", _seconds(value, "the no-progress timeout"))

    @property
    def maximum_download_time(self) -> timedelta:
        return timedelta(seconds=self.snapshot().maximum_download_time)

    @maximum_download_time.setter
    def maximum_download_time(self, value: timedelta | float) -> None:
        self._set("maximum_download_time", _seconds(value, "the maximum download time"))

    @property
    def notify_flags(self) -> int:
        return self.snapshot().notify_flags

    @notify_flags.setter
    def notify_flags(self, value: int) -> None:
        self._set("notify_flags", value)  # the core refuses what is no integer bit mask

    @property
    def notify_cmdline(self) -> NotifyCommandLine | None:
        return self.snapshot().notify_cmdline

    def set_notify_cmdline(self, program: str | None, *parameters: str) -> None:
        """SetNotifyCmdLine: run ``program`` with ``parameters`` (no shell); None removes."""
        if program is None:
            if parameters:
                raise BitsError(hresult.E_INVALIDARG, "parameters need a program")
            self._set("notify_cmdline", None)
        else:
            self._set("notify_cmdline", NotifyCommandLine(program, tuple(parameters)))

    @property
    def proxy_settings(self) -> ProxySettings:
        return self.snapshot().proxy

    def set_proxy_settings(
        self,
        usage: ProxyUsage,
        proxy_list: str | None = None,
        bypass_list: str | None = None,
    ) -> None:
        proxy = ProxySettings(
            _integer(usage, "the proxy usage"),
            _string(proxy_list, "the proxy list", optional=True),
            _string(bypass_list, "the bypass list", optional=True),
        )
        self._set("proxy", proxy)

    @property
    def http_method(self) -> str:
        job = self.snapshot()
        return job.http_method or jobs.DEFAULT_HTTP_METHOD[job.job_type]

    @http_method.setter
    def http_method(self, value: str) -> None:
        self._set("http_method", value)

    @property
    def security_flags(self) -> int:
        return self.snapshot().security_flags

    @security_flags.setter
    def security_flags(self, value: int) -> None:
        self._set("security_flags", value)

    @property
    def acl_flags(self) -> int:
        return self.snapshot().acl_flags

    @acl_flags.setter
    def acl_flags(self, value: int) -> None:
        self._set("acl_flags", value)

    @property
    def max_rate(self) -> int | None:
        """Beyond BITS (aria2's per-download limit): bytes per second, None = unlimited."""
        return self.snapshot().max_rate

    @max_rate.setter
    def max_rate(self, value: int | str | None) -> None:
        from backhaul.core.bandwidth import parse_rate

        if value is not None and not isinstance(value, str):  # parse_rate takes str | int
            _integer(value, "the maximum rate (bytes per second, or a rate such as '500k')")
        self._set("max_rate", None if value is None else parse_rate(value))

    @property
    def reply_file_name(self) -> str | None:
        """The reply file: SetReplyFileName's, else the generated one (upload-reply), named
        after the file to upload (None before it is added)."""
        job = self.snapshot()
        if job.job_type is not JobType.UPLOAD_REPLY or not (job.reply_file_name or job.files):
            return None
        return str(localfile.reply_path(job))

    @reply_file_name.setter
    def reply_file_name(self, value: str | None) -> None:
        """SetReplyFileName: refused as a download's local name is at AddFile (a missing or
        unwritable directory, a directory or a device at the name)."""
        if isinstance(value, str):
            self._manager._check_not_the_store([value])
            if value.startswith("/"):  # the core refuses a relative name, naming it so
                cmd.check_local_name(value)
                localfile.check_destination(value)
        self._set("reply_file_name", value)

    def set_property(self, prop: JobPropertyId, value: Any) -> None:
        """IBackgroundCopyJob5::SetProperty."""
        name = JOB_PROPERTIES.get(_prop(prop))
        if name is None:
            raise BitsError(hresult.BG_E_UNKNOWN_PROPERTY_ID, f"unknown property {prop!r}")
        self._set(name, int(value) if isinstance(value, AuthTarget) else value)

    def get_property(self, prop: JobPropertyId) -> Any:
        name = JOB_PROPERTIES.get(_prop(prop))
        if name is None:
            raise BitsError(hresult.BG_E_UNKNOWN_PROPERTY_ID, f"unknown property {prop!r}")
        return getattr(self.snapshot(), name)

    # -- credentials, headers, certificates --------------------------------------------

    def set_credentials(
        self,
        target: AuthTarget,
        scheme: AuthScheme,
        user_name: str | None,
        password: str | None,
    ) -> None:
        """SetCredentials. The password is sealed before it is recorded."""
        pair = _integer(target, "the target"), _integer(scheme, "the authentication scheme")
        password = _string(password, "the password", optional=True)
        sealed = self._manager.seal(password) if password is not None else None
        length = len(password) if password is not None else 0
        self._do(cmd.SetCredentials(*pair, user_name, sealed, length))

    def remove_credentials(self, target: AuthTarget, scheme: AuthScheme) -> bool:
        """RemoveCredentials: True (S_OK) if removed, False (S_FALSE) if none were set."""
        pair = _integer(target, "the target"), _integer(scheme, "the authentication scheme")
        return bool(self._do(cmd.RemoveCredentials(*pair)))

    @property
    def credentials(self) -> list[tuple[AuthTarget, AuthScheme, str | None]]:
        """Which credentials are set: (target, scheme, user name). Passwords never."""
        return [
            (AuthTarget(c.target), AuthScheme(c.scheme), c.user_name)
            for c in self.snapshot().credentials
        ]

    def set_custom_headers(self, headers: str | None) -> None:
        """SetCustomHeaders: CR/LF-terminated header lines, stored sealed; None removes."""
        if headers is None:
            self._do(cmd.SetCustomHeaders(None, 0))
            return
        if not isinstance(headers, str) or "\x00" in headers:
            raise BitsError(hresult.E_INVALIDARG, "custom headers must be a string")
        lines = [line for line in headers.split("\r\n") if line]
        for number, line in enumerate(lines, 1):
            if ":" not in line or "\n" in line or "\r" in line:
                # Named by its place only: the line may hold a token or a cookie.
                raise BitsError(
                    hresult.E_INVALIDARG,
                    f"header line {number} is malformed: each line is NAME: VALUE, the lines "
                    "separated by CR LF, with no CR or LF of their own",
                )
        cmd.check_custom_header_names(lines)
        self._do(cmd.SetCustomHeaders(self._manager.seal(headers), len(headers) + 1))

    @property
    def custom_headers(self) -> str | None:
        """GetCustomHeaders. Raises E_ACCESSDENIED once the headers are write-only."""
        job = self.snapshot()
        if job.custom_headers_write_only:
            raise BitsError(hresult.E_ACCESSDENIED, "the custom headers are write-only")
        if job.custom_headers is None:
            return None
        return str(self._manager.store.secrets.open(job.custom_headers))

    def make_custom_headers_write_only(self) -> None:
        self._do(cmd.MakeCustomHeadersWriteOnly())

    def take_ownership(self) -> None:
        """TakeOwnership (administrators only): the job becomes this manager's owner's, and
        loses the old owner's credentials, client certificate, custom headers and notify
        command line. Cancelling it afterwards may leave files the old owner made."""
        if not _is_admin():
            raise BitsError(hresult.E_ACCESSDENIED, "only an administrator takes ownership")
        self._do(cmd.TakeOwnership(self._manager.owner))

    def set_client_certificate_by_id(
        self, location: CertStoreLocation, store_name: str, sha1: bytes | str
    ) -> None:
        """SetClientCertificateByID: the store must exist and hold the certificate with
        a usable key (adapters/certstore.py), else the BITS error and nothing recorded."""
        where = _integer(location, "the store location")
        if not isinstance(sha1, bytes | bytearray | str):
            raise BitsError(
                hresult.E_INVALIDARG, f"the SHA-1 hash must be bytes or hex, not {_kind(sha1)}"
            )
        digest = sha1.hex() if isinstance(sha1, bytes | bytearray) else sha1
        if isinstance(sha1, bytes | bytearray) and len(sha1) != 20:
            raise BitsError(
                hresult.hresult_from_win32(hresult.RPC_X_BAD_STUB_DATA), "a SHA-1 hash is 20 bytes"
            )
        self._set_certificate(ClientCertificate(where, store_name, sha1=digest))

    def set_client_certificate_by_name(
        self, location: CertStoreLocation, store_name: str, subject: str
    ) -> None:
        """SetClientCertificateByName: subject substring, RDNs reversed (BITS's rule)."""
        where = _integer(location, "the store location")
        self._set_certificate(ClientCertificate(where, store_name, subject=subject))

    def _set_certificate(self, ref: ClientCertificate) -> None:
        check_setting("client_certificate", ref, self.snapshot())
        self._manager.certificates.check(ref)
        self._set("client_certificate", ref)

    @property
    def ca_bundle(self) -> str | None:
        """Beyond BITS: a CA bundle (PEM) trusted for this job's HTTPS servers."""
        return self.snapshot().ca_bundle

    @ca_bundle.setter
    def ca_bundle(self, value: str | Path | None) -> None:
        self._set("ca_bundle", None if value is None else str(value))

    def remove_client_certificate(self) -> None:
        self._set("client_certificate", None)

    @property
    def client_certificate(self) -> ClientCertificate | None:
        return self.snapshot().client_certificate

    # -- files -------------------------------------------------------------------------

    def add_file(
        self,
        remote_name: str,
        local_name: str | Path,
        *,
        ranges: Sequence[ByteRange | tuple[int, int | None]] | None = None,
        expected_digest: str | None = None,
    ) -> None:
        """AddFile (with ``ranges``: AddFileWithRanges)."""
        local = cast(str, local_name)  # a Path too: add_files checks the types
        spec = FileSpec(remote_name, local, _ranges(ranges or ()), expected_digest)
        if ranges is not None and not ranges:
            raise BitsError(hresult.E_INVALIDARG, "AddFileWithRanges needs at least one range")
        self.add_files([spec])

    def add_files(self, files: Iterable[FileSpec | tuple[str, str | Path]]) -> None:
        """AddFileSet: all the files or none. A user and password inside an ``smb://`` URL
        are moved out before anything is recorded: the URL is recorded without them and they
        become the job's SERVER credentials (specs/smb.md §2)."""
        specs = tuple(_file_spec(f) for f in _collection(files, "the files"))
        self._manager._before_sealing(s.remote_name for s in specs)
        names, login = _split_url_credentials([s.remote_name for s in specs])
        specs = tuple(self._sealed(s, n) for s, n in zip(specs, names, strict=True))
        job = self.snapshot()
        for spec in specs:
            cmd.check_local_name(spec.local_name)
            cmd.check_remote_name(spec.remote_name, job.job_type)
            self._check_scheme(spec.remote_name, job.job_type)
        batched = self._manager._in_batch()
        good_dirs = self._manager._good_dirs if batched else None  # per group commit
        localfile.check_local_names(job.job_type, (s.local_name for s in specs), good_dirs)
        if job.job_type is JobType.DOWNLOAD:
            self._manager._check_not_the_store(s.local_name for s in specs)
            self._manager._check_aliases(job, [s.local_name for s in specs])

        def add() -> None:  # the credentials and the files, or neither
            if login is not None:
                self.set_credentials(AuthTarget.SERVER, AuthScheme.NTLM, *login)
            self._do(cmd.AddFiles(specs))

        self._in_one_commit(add)

    def _in_one_commit(self, steps: Callable[[], object]) -> None:
        """``steps`` recorded in one commit, or nothing. Alone (outside the caller's own
        batch), decided again when another writer changed the job meanwhile, as a single
        call is (``execute``); inside a batch, a part of it."""
        manager = self._manager
        if manager._in_batch():
            steps()
            return
        for _ in range(_RETRIES):
            try:
                with manager.batch():
                    steps()
                return
            except BatchConflict:
                continue  # the batch forgot its copies of the job: the next one reads it
        raise BitsError(hresult.E_FAIL, f"job {self.id} kept changing under this call")

    def _sealed(self, spec: FileSpec, remote_name: str) -> FileSpec:
        """``spec`` named ``remote_name``, the URL's password and signed query sealed."""
        name, password, query = self._manager.store.secrets.seal_url(remote_name)
        return attrs.evolve(spec, remote_name=name, password=password, query=query)

    def _check_scheme(self, remote_name: str, job_type: JobType | None = None) -> None:
        """E_INVALIDARG for a scheme no transport serves (nothing is imported)."""
        schemes = self._manager.schemes
        if schemes is None:
            kind = self.job_type if job_type is None else job_type  # DOWNLOAD is 0: no `or`
            upload = kind is not JobType.DOWNLOAD
            group = registry.UPLOAD_GROUP if upload else registry.GROUP
            registry.default_registry(group).check(remote_name)
        elif registry.scheme_of(remote_name) not in schemes:
            message = registry.missing_message(registry.scheme_of(remote_name))
            raise BitsError(hresult.E_INVALIDARG, f"{message} ({remote_name})")

    def files(self) -> list[FileInfo]:
        """EnumFiles: a snapshot of the file list with live progress."""
        job = self.snapshot()
        return [file_info(job, i) for i in range(len(job.files))]

    def file(self, index: int) -> FileInfo:
        """One file of ``files()``, without building the others (a job may hold 10,000)."""
        index = _index(index)
        job = self.snapshot()
        if not 0 <= index < len(job.files):
            raise BitsError(hresult.BG_E_FILE_NOT_FOUND, f"the job has no file {index}")
        return file_info(job, index)

    def get_file_property(self, index: int, prop: FilePropertyId) -> Any:
        index = _index(index)
        job = self.snapshot()
        if not 0 <= index < len(job.files):
            raise BitsError(hresult.BG_E_FILE_NOT_FOUND, f"the job has no file {index}")
        if prop != FilePropertyId.HTTP_RESPONSE_HEADERS:
            raise BitsError(hresult.BG_E_UNKNOWN_PROPERTY_ID, f"unknown file property {prop!r}")
        # The raw header block (status line, header lines, an empty line; CR LF each) of the
        # last response whose body this file received; None before the first one.
        headers = job.files[index].response_headers
        if isinstance(headers, Sealed):  # it holds a cookie: the log keeps it sealed
            return self._manager.store.secrets.open(headers)
        return headers

    def set_remote_name(self, index: int, remote_name: str) -> None:
        """IBackgroundCopyFile2::SetRemoteName (download jobs); credentials in an ``smb://``
        URL are moved out as in ``add_files``, and a password in another URL is sealed.
        A new URL without a password keeps the file's own while it names the same user,
        host and port."""
        index = _index(index)
        remote_name = _string(remote_name, "the remote name")
        self._manager._before_sealing([remote_name])
        (remote_name,), login = _split_url_credentials([remote_name])
        remote_name, password, query = self._manager.store.secrets.seal_url(remote_name)
        self._check_scheme(remote_name)
        change = cmd.SetRemoteName(index, remote_name, password, query)

        def rename() -> None:
            if login is not None:
                self.set_credentials(AuthTarget.SERVER, AuthScheme.NTLM, *login)
            self._do(change)

        self._in_one_commit(rename)

    def replace_remote_prefix(self, old_prefix: str, new_prefix: str) -> bool:
        """ReplaceRemotePrefix: True (S_OK) if any name changed, False (S_FALSE) if none.
        A password in ``new_prefix`` is sealed and given to every name it changes."""
        old_prefix = _string(old_prefix, "the old prefix")
        new_prefix = _string(new_prefix, "the new prefix")
        new_prefix, password = split_url_password(new_prefix)
        sealed = None if password is None else self._manager.seal(password)
        change = cmd.ReplaceRemotePrefix(old_prefix, new_prefix, sealed)
        job = self.snapshot()
        self._manager._check_access(job)
        for event in cmd.decide(job, change, self._manager.clock.now(), self._manager.limits):
            if isinstance(event, ev.RemoteNameChanged):
                self._check_scheme(event.remote_name)  # nobody serves it: refused, as at AddFile
        return bool(self._do(change))

    # -- the four state-changing calls -------------------------------------------------

    def resume(self) -> None:
        self._do(cmd.Resume())

    def suspend(self) -> None:
        self._do(cmd.Suspend())

    def cancel(self) -> int:
        """Cancel: deletes every temp file. Returns S_OK or BG_S_UNABLE_TO_DELETE_FILES.
        Cancel and Complete take turns on the store (``store.file_work``), in every
        process: one that comes while the other runs waits, then finds the job final."""
        if self._manager._in_batch():  # the batch's commit takes the turn
            return self._cancel()
        with self._manager._lock, file_work(self._manager.store):
            return self._cancel()

    def _cancel(self) -> int:
        job = self.snapshot()
        self._manager._check_access(job)
        cmd.decide(job, cmd.Cancel(), self._manager.clock.now(), self._manager.limits)
        if self.id in self._manager._completing_jobs():
            raise BitsError(
                hresult.BG_E_INVALID_STATE,
                "a Complete of this job was interrupted after it began renaming its files "
                "into place: call Complete again to finish it",
            )
        if self._manager._in_batch():  # at the commit: nothing of an abandoned batch happens
            self._manager.execute(self.id, cmd.Cancel())
            listings = self._manager._listings
            self._manager._after_commit.append(
                lambda: self._manager._discard(job, listings, batched=True)
            )
            self._manager._discarded.append(job.id)
            return hresult.S_OK
        # Alone, the temp files go first: a process killed once the log says CANCELLED
        # would leave them for good (no engine looks at a final job again). Killed before,
        # the job is still live, and its next run restarts the files whose bytes are gone.
        localfile.discard(job)
        self._manager.execute(self.id, cmd.Cancel())
        # Again after: what a running engine made meanwhile (it deletes them too, once it
        # sees the Cancel).
        left = self._manager._discard(job)
        return hresult.BG_S_UNABLE_TO_DELETE_FILES if left else hresult.S_OK

    def complete(self) -> int:
        """Complete: publishes the whole files atomically, deletes the rest. Returns
        S_OK, or BG_S_PARTIAL_COMPLETE when only some files were whole. If publishing
        fails the job stays as it was and the error is raised (BITS keeps it queued).
        Complete and Cancel take turns on the store (see ``cancel``)."""
        if self._manager._in_batch():  # the batch's commit takes the turn
            return self._complete()
        with self._manager._lock, file_work(self._manager.store):
            return self._complete()

    def _complete(self) -> int:
        job = self.snapshot()
        self._manager._check_access(job)
        decided = cmd.decide(job, cmd.Complete(), self._manager.clock.now(), self._manager.limits)
        kept = decided[0].files_kept  # type: ignore[attr-defined]
        if job.job_type is JobType.DOWNLOAD:
            self._reject_changed(job, kept)

        batched = self._manager._in_batch()
        # In a batch, each directory is fsynced once, after every rename of the batch.
        dirs = self._manager._renamed_dirs if batched else None

        def publish() -> None:
            if job.job_type is JobType.DOWNLOAD:
                localfile.publish(job, kept, dirs)
            if job.job_type is JobType.UPLOAD_REPLY:
                localfile.publish_reply(job)

        # In a batch the jobs share one listing of each directory (taken after every
        # publish of the batch); alone, the job lists its directories itself.
        listings = self._manager._listings if batched else None

        def discard(final: bool = True) -> None:
            """The job's temp files; once it is final, those left go to the journal."""
            if job.job_type is not JobType.DOWNLOAD:
                return
            if final:
                self._manager._discard(job, listings, batched=batched)
            else:
                localfile.discard(job, listings)

        if batched:  # in a batch: files move at its commit (marked as below, all at once)
            events = self._manager.execute(self.id, cmd.Complete(kept))
            self._manager._before_commit.append(publish)
            self._manager._after_commit.append(discard)
            self._manager._completing.append(job.id)
            if job.job_type is JobType.DOWNLOAD:
                self._manager._discarded.append(job.id)
            return int(events[0].result)  # type: ignore[attr-defined]
        marks = self._manager._mark_completing([self.id])
        try:
            publish()
        except Exception:
            # A failure (a directory in the way): the job stays TRANSFERRED with the files
            # renamed so far, as BITS keeps them, and Cancel may end it.
            _unmark(marks)
            raise
        # The unfinished files' temps go before the event too, as Cancel's do (killed
        # after it, they would stay for good); and again after, for a running engine's.
        discard(final=False)
        events = self._manager.execute(self.id, cmd.Complete(kept))
        discard()
        _unmark(marks)
        self._manager._prune_marks()  # a killed Complete's, which this one finished
        return int(events[0].result)  # type: ignore[attr-defined]

    def _reject_changed(self, job: Job, kept: Sequence[int]) -> None:
        """Complete validates what it publishes (BITS: "Complete implicitly validates
        files"): a transferred file whose temp file was deleted or cut short since would be
        published wrong for good. Each such file is rejected as SetValidationState(FALSE)
        rejects one (the job goes to ERROR, the file starts over, Resume fetches it again)
        and Complete fails with BG_E_VALIDATION_FAILED, publishing nothing."""
        changed = localfile.changed_since_transferred(job, kept)
        if not changed:
            return
        for index, reason in changed:
            self._do(cmd.SetValidationState(index, valid=False, reason=reason))
        names = ", ".join(str(index) for index, _ in changed)
        raise BitsError(
            hresult.BG_E_VALIDATION_FAILED,
            f"nothing was published: {changed[0][1]}; file(s) {names} will be fetched again "
            "after resume (the job is in ERROR)",
        )

    def set_validation_state(self, index: int, valid: bool) -> None:
        """IBackgroundCopyFile3::SetValidationState of a transferred download file (E_PENDING
        before it is transferred). FALSE rejects it: the job goes to ERROR with
        BG_E_VALIDATION_FAILED, the file's progress returns to 0, and Resume fetches it
        again."""
        if not isinstance(valid, bool):
            raise BitsError(
                hresult.E_INVALIDARG, f"valid must be True or False, not {_kind(valid)}"
            )
        self._do(cmd.SetValidationState(_index(index), valid=valid))

    # -- on-demand jobs (IBackgroundCopyFile6) -----------------------------------------

    def request_file_ranges(
        self, index: int, ranges: Sequence[ByteRange | tuple[int, int | None]]
    ) -> None:
        """RequestFileRanges: file ``index`` of an on-demand job should get these byte ranges
        (``length`` None: to the end of the file); overlaps are allowed. The engine fetches
        the ones not held yet, from the download position on; once all are in the job is
        TRANSFERRED if the file is whole, else SUSPENDED (request more, then resume).
        BG_E_RANDOM_ACCESS_NOT_SUPPORTED for other jobs and files, BG_E_INVALID_RANGE for a
        range outside a file whose size is known."""
        self._do(cmd.RequestFileRanges(_index(index), _ranges(ranges)))

    def update_download_position(self, index: int, offset: int) -> None:
        """UpdateDownloadPosition: fill the requested ranges from ``offset`` on first."""
        offset = _integer(offset, "the download position")
        self._do(cmd.UpdateDownloadPosition(_index(index), offset))

    def filled_file_ranges(self, index: int) -> list[ByteRange]:
        """GetFilledFileRanges: the byte ranges the file holds, merged and sorted."""
        index = _index(index)
        job = self.snapshot()
        cmd.check_random_access(job, index)
        f = job.files[index]
        if f.transferred and f.bytes_total:
            return [ByteRange(0, f.bytes_total)]
        return list(f.filled)

    def validation_state(self, index: int) -> bool:
        """IBackgroundCopyFile3::GetValidationState: TRUE once the application accepted the
        file since it was last transferred."""
        return self.file(index).validated

    def reply_data(self) -> bytes:
        """GetReplyData: the server's reply (upload-reply jobs), at most 1 MiB in memory;
        above that BG_E_TOO_LARGE, and the reply is read from ``reply_file_name``."""
        job = self.snapshot()
        if job.job_type is not JobType.UPLOAD_REPLY:
            raise BitsError(hresult.E_NOTIMPL, "only upload-reply jobs have a reply")
        if job.reply_bytes_total is None or job.reply_bytes_transferred < job.reply_bytes_total:
            raise BitsError(hresult.BG_E_INVALID_STATE, "the reply has not arrived yet")
        if job.reply_bytes_total > localfile.REPLY_DATA_MAX:
            raise BitsError(
                hresult.BG_E_TOO_LARGE, f"the reply is {job.reply_bytes_total} bytes (over 1 MiB)"
            )
        path = (
            localfile.reply_path(job)
            if job.state is JobState.ACKNOWLEDGED
            else (localfile.reply_temp_path(job))
        )
        return path.read_bytes()


def _split_url_credentials(
    names: Sequence[str],
) -> tuple[list[str], tuple[str, str | None] | None]:
    """The remote names without ``user:password@`` in ``smb://`` URLs, and that login (one
    per call: a job has one SERVER credential per scheme). Other names pass unchanged."""
    cleaned, logins = [], set()
    for name in names:
        if isinstance(name, str) and name[:6].lower() == "smb://":
            try:
                from backhaul.transports.smb import parse_smb_name, split_smb_credentials
            except ImportError:
                raise BitsError(
                    hresult.E_INVALIDARG, "smb:// URLs need backhaul's smb extra"
                ) from None
            name, user, password = split_smb_credentials(name)
            try:  # refused now, before anything is recorded (it may hold a login it hides)
                parse_smb_name(name)
            except TransferError as exc:
                raise BitsError(exc.hresult, exc.message) from None
            if user is not None:
                logins.add((user, password))
        cleaned.append(name)
    if len(logins) > 1:
        raise BitsError(
            hresult.E_INVALIDARG, "the URLs carry different credentials; a job has one login"
        )
    return cleaned, next(iter(logins), None)


def _prop(prop: Any) -> JobPropertyId:
    try:
        return JobPropertyId(prop)
    except ValueError:
        raise BitsError(hresult.BG_E_UNKNOWN_PROPERTY_ID, f"unknown property {prop!r}") from None


def _range(r: Any) -> ByteRange:
    """A range as the core takes it: BG_LENGTH_TO_EOF becomes ``length=None``. Its numbers
    go on as given: the core refuses what is no integer (BG_E_INVALID_RANGE)."""
    if isinstance(r, ByteRange):
        offset, length = r.offset, r.length
    elif isinstance(r, tuple | list) and len(r) == 2:
        offset, length = r
    else:
        raise BitsError(
            hresult.E_INVALIDARG,
            f"a range is a ByteRange or an (offset, length) pair, not {_kind(r)}",
        )
    if isinstance(length, int) and not isinstance(length, bool) and length == LENGTH_TO_EOF:
        length = None
    return ByteRange(offset, length)


def _ranges(ranges: Any) -> tuple[ByteRange, ...]:
    return tuple(_range(r) for r in _collection(ranges, "the ranges"))


def _file_spec(f: Any) -> FileSpec:
    """A file of AddFileSet, a FileSpec or a (remote name, local name) pair, its fields'
    types checked (their values are the core's and the checks' before it)."""
    if isinstance(f, FileSpec):
        spec = f
    elif isinstance(f, tuple | list) and len(f) == 2:
        spec = FileSpec(*f)
    else:
        raise BitsError(
            hresult.E_INVALIDARG,
            f"a file is a FileSpec or a (remote name, local name) pair, not {_kind(f)}",
        )
    return attrs.evolve(
        spec,
        remote_name=_string(spec.remote_name, "a remote name"),
        local_name=_path(spec.local_name, "a local name"),
        ranges=_ranges(spec.ranges),
        expected_digest=_string(spec.expected_digest, "an expected digest", optional=True),
    )


__all__ = ["BatchConflict", "FileInfo", "TransferJob", "TransferManager"]
