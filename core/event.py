"""Events: frozen, past-tense facts, one stream per job.

Rules:
- An event class name is a persisted topic. Never rename one without registering the old
  name as an alias in the store's mapper (adapters/serialization.py) and adding a test.
- Every event carries ``at``, the time it happened (UTC, from the Clock port).
- ``trigger`` names the row of the transition table (core/transition.py) that the event
  follows; ``None`` means the event does not move the state.
- Events hold values, never secrets in plain text (see ``Sealed``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

import attrs

from backhaul.core.transition import Trigger
from backhaul.core.value import ByteRange, FileSpec, JobError, Sealed
from backhaul.core.vocabulary import JobType


@attrs.frozen
class Event:
    at: datetime
    trigger: ClassVar[Trigger | None] = None

    def trigger_of(self) -> Trigger | None:
        return type(self).trigger


# -- the client's calls ----------------------------------------------------------------


@attrs.frozen
class JobCreated(Event):
    job_id: str
    job_type: JobType
    display_name: str
    owner: str


@attrs.frozen
class FilesAdded(Event):
    files: tuple[FileSpec, ...]
    trigger = Trigger.ADD_FILE


@attrs.frozen
class PropertySet(Event):
    """A job setting changed; ``name`` is a row of core/setting.py, ``value`` plain data."""

    name: str
    value: Any


@attrs.frozen
class CredentialsSet(Event):
    target: int
    scheme: int
    user_name: str | None
    password: Sealed | None


@attrs.frozen
class CredentialsRemoved(Event):
    target: int
    scheme: int


@attrs.frozen
class CustomHeadersSet(Event):
    headers: Sealed | None


@attrs.frozen
class CustomHeadersMadeWriteOnly(Event):
    pass


@attrs.frozen
class RemoteNameChanged(Event):
    file_index: int
    remote_name: str
    password: Sealed | None = None  # the new URL's password, sealed (FileSpec.password)
    query: Sealed | None = None  # its signed query, sealed (FileSpec.query)


@attrs.frozen
class JobResumed(Event):
    trigger = Trigger.RESUME


@attrs.frozen
class JobSuspended(Event):
    trigger = Trigger.SUSPEND


@attrs.frozen
class JobCancelled(Event):
    trigger = Trigger.CANCEL


@attrs.frozen
class JobCompleted(Event):
    """Complete: ``files_kept`` were renamed into place; ``result`` is S_OK or partial."""

    result: int
    files_kept: tuple[int, ...]
    trigger = Trigger.COMPLETE


# -- the engine's events ---------------------------------------------------------------


@attrs.frozen
class TransferStarted(Event):
    trigger = Trigger.SCHEDULED


@attrs.frozen
class Connected(Event):
    trigger = Trigger.CONNECTED


@attrs.frozen
class BytesCheckpointed(Event):
    """The temp file holds ``bytes_transferred`` durable bytes of file ``file_index``."""

    file_index: int
    bytes_transferred: int
    bytes_total: int | None
    validator: str | None = None
    # The header block of the response these bytes came in, on the file's first event after
    # each response (None: unchanged). Sealed when it carries a secret.
    response_headers: str | Sealed | None = None
    trigger = Trigger.DATA_RECEIVED


@attrs.frozen
class FileTransferred(Event):
    file_index: int
    bytes_total: int
    digest: str | None = None
    response_headers: str | Sealed | None = None  # as in BytesCheckpointed
    # The temp file's inode number once its bytes were synced (None: not known, as in v1).
    # A rename keeps it: Complete tells the file an earlier Complete renamed into place from
    # another file of the same size found at the name.
    inode: int | None = None
    trigger = Trigger.DATA_RECEIVED


@attrs.frozen
class FileRestarted(Event):
    """The remote file changed (its size or validator; with no validator, the bytes just
    before the checkpoint): this file starts again from byte 0."""

    file_index: int
    reason: str


@attrs.frozen
class FileValidated(Event):
    """SetValidationState(TRUE): the application accepted a transferred file."""

    file_index: int


@attrs.frozen
class FileRejected(Event):
    """SetValidationState(FALSE), or Complete finding a transferred file's temp file cut
    short or gone: the job goes to ERROR with ``error`` and the file starts again from
    byte 0 (Resume fetches it again)."""

    file_index: int
    error: JobError
    trigger = Trigger.VALIDATION_FAILED


@attrs.frozen
class JobTransferred(Event):
    trigger = Trigger.ALL_FILES_DONE


@attrs.frozen
class ErrorOccurred(Event):
    """``retry_after``: seconds the server asked us to wait (Retry-After), if any.
    ``response_headers``: the header block of the response that failed (an HTTP 404 or 503,
    say), which becomes the HTTP_RESPONSE_HEADERS of ``error.file_index``; None when no
    response came or the error names no file."""

    error: JobError
    transient: bool
    retry_after: float | None = None
    response_headers: str | Sealed | None = None

    def trigger_of(self) -> Trigger:
        return Trigger.TRANSIENT_FAILURE if self.transient else Trigger.FATAL_FAILURE


@attrs.frozen
class RetryStarted(Event):
    trigger = Trigger.RETRY_DUE


@attrs.frozen
class NoProgressTimedOut(Event):
    trigger = Trigger.NO_PROGRESS_TIMEOUT


@attrs.frozen
class MaxDownloadTimeExceeded(Event):
    trigger = Trigger.MAX_DOWNLOAD_TIME_EXCEEDED


@attrs.frozen
class NetworkLost(Event):
    trigger = Trigger.NETWORK_LOST


@attrs.frozen
class NetworkRestored(Event):
    trigger = Trigger.NETWORK_RESTORED


@attrs.frozen
class JobBlocked(Event):
    """A policy (bandwidth, cost) forbids the transfer now: ``hresult`` says which."""

    hresult: int
    trigger = Trigger.BLOCKED


@attrs.frozen
class JobUnblocked(Event):
    trigger = Trigger.UNBLOCKED


@attrs.frozen
class SliceEnded(Event):
    """The job's turn ended (round robin), or the engine stopped it. ``active_until``: set
    when the engine that ran the job stopped without ending it (killed, or a worker whose
    lease ran out): its CONNECTING/TRANSFERRING time counts up to then (the job's last event
    while it ran), not up to this event, which the next engine records after the downtime."""

    active_until: datetime | None = None
    trigger = Trigger.SLICE_ENDED


@attrs.frozen
class JobScavenged(Event):
    """JobInactivityTimeout: the engine cancelled an abandoned job."""

    trigger = Trigger.INACTIVITY_TIMEOUT


@attrs.frozen
class RangesDone(Event):
    trigger = Trigger.RANGES_DONE


@attrs.frozen
class FileRangesRequested(Event):
    """IBackgroundCopyFile6::RequestFileRanges: an on-demand job's file should get these
    byte ranges (``length`` None: to the end of the file)."""

    file_index: int
    ranges: tuple[ByteRange, ...]


@attrs.frozen
class DownloadPositionUpdated(Event):
    """IBackgroundCopyFile6::UpdateDownloadPosition: fill the requested ranges from here."""

    file_index: int
    offset: int


@attrs.frozen
class RangesFilled(Event):
    """The temp file of an on-demand job's file holds these byte ranges durably, at their
    offsets in the remote file of ``bytes_total`` bytes and version ``validator``."""

    file_index: int
    ranges: tuple[ByteRange, ...]
    bytes_total: int
    validator: str | None = None
    trigger = Trigger.DATA_RECEIVED


@attrs.frozen
class UploadSessionOpened(Event):
    """The remote side opened an upload session for file ``file_index``; ``token``
    re-opens it after a crash (a BITS-Session-Id, a temp name on a share)."""

    file_index: int
    token: str


@attrs.frozen
class ReplyLocated(Event):
    """Upload-reply: the server's reply is at ``url`` (BITS-Reply-URL), recorded without a
    password (the engine gives it the file's, for the same login) and with the values of
    its signature parameters ``<redacted>``: ``query`` holds the real query, sealed."""

    url: str
    query: Sealed | None = None


@attrs.frozen
class LeaseTaken(Event):
    """Worker ``worker`` runs this job until ``expires_at`` (renewed while it transfers).
    Several engines share a PostgreSQL store this way; the stream's optimistic
    concurrency makes sure only one of them appends the next event."""

    worker: str
    expires_at: datetime


@attrs.frozen
class LeaseReleased(Event):
    worker: str


@attrs.frozen
class OwnershipTaken(Event):
    """TakeOwnership: the job is ``owner``'s from now; its credentials, client certificate,
    custom headers and notify command line are gone (bits-core.md §15)."""

    owner: str


@attrs.frozen
class PolicyChanged(Event):
    """An engine-wide setting changed (``name``: "bandwidth", "network_cost"). These
    live in one stream of their own, ``POLICY_STREAM``, not in a job's."""

    name: str
    value: Any


@attrs.frozen
class CommandLineNotified(Event):
    """The notify command line ran for ``reason`` ("transferred"/"error") and exited.
    ``since_version``: the version at which the job entered the state the run was started
    for; its exit counts for that entry only. 0 (events recorded before it was kept): the
    run counts for the state the job is in at this event."""

    reason: str
    exit_code: int
    since_version: int = 0


@attrs.frozen
class ReplyProgressed(Event):
    bytes_total: int | None
    bytes_transferred: int


EVENT_TYPES: tuple[type[Event], ...] = (
    JobCreated,
    FilesAdded,
    PropertySet,
    CredentialsSet,
    CredentialsRemoved,
    CustomHeadersSet,
    CustomHeadersMadeWriteOnly,
    RemoteNameChanged,
    JobResumed,
    JobSuspended,
    JobCancelled,
    JobCompleted,
    TransferStarted,
    Connected,
    BytesCheckpointed,
    FileTransferred,
    FileRestarted,
    FileValidated,
    FileRejected,
    JobTransferred,
    ErrorOccurred,
    RetryStarted,
    NoProgressTimedOut,
    MaxDownloadTimeExceeded,
    NetworkLost,
    NetworkRestored,
    JobBlocked,
    JobUnblocked,
    SliceEnded,
    JobScavenged,
    RangesDone,
    FileRangesRequested,
    DownloadPositionUpdated,
    RangesFilled,
    ReplyProgressed,
    CommandLineNotified,
    UploadSessionOpened,
    ReplyLocated,
    PolicyChanged,
    LeaseTaken,
    LeaseReleased,
    OwnershipTaken,
)

# The stream of engine-wide settings (bandwidth policy, network cost); not a job.
POLICY_STREAM = "6261636b-6861-5000-8000-706f6c696379"
