"""Commands: imperative requests, decided against the table and the job's rules.

``decide(job, command, now, limits)`` returns the events to append, or raises
``BitsError`` carrying the BITS HRESULT; a refused command appends nothing. State
changes are checked with ``transition.next_state`` (the one lookup); per-call rules
that are not states (one file per upload, download-only calls, string limits) are
checked here and in core/setting.py.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any, Final
from urllib.parse import urlsplit

import attrs

from backhaul.core import event as ev
from backhaul.core import hresult, limit
from backhaul.core.error import BitsError
from backhaul.core.job import Job
from backhaul.core.limit import Limits
from backhaul.core.setting import check_setting, is_utf8
from backhaul.core.transition import (
    NON_FINAL_STATES,
    IllegalTransition,
    Trigger,
    next_state,
)
from backhaul.core.url import (
    has_url_secret,
    has_user_info,
    redact_url,
    same_file,
    same_login,
    shown_query,
)
from backhaul.core.value import ByteRange, FileSpec, JobError, Sealed
from backhaul.core.vocabulary import AuthScheme, AuthTarget, ErrorContext, JobState, JobType


@attrs.frozen
class Command:
    pass


# -- the client's calls ----------------------------------------------------------------


@attrs.frozen
class AddFiles(Command):
    files: tuple[FileSpec, ...]


@attrs.frozen
class SetSetting(Command):
    name: str
    value: Any


@attrs.frozen
class SetCredentials(Command):
    target: int
    scheme: int
    user_name: str | None
    password: Sealed | None
    password_length: int = 0


@attrs.frozen
class RemoveCredentials(Command):
    target: int
    scheme: int


@attrs.frozen
class SetCustomHeaders(Command):
    headers: Sealed | None
    length: int = 0


@attrs.frozen
class MakeCustomHeadersWriteOnly(Command):
    pass


@attrs.frozen
class TakeOwnership(Command):
    """The job becomes ``owner``'s (the adapters allow it to administrators only)."""

    owner: str


@attrs.frozen
class SetRemoteName(Command):
    """``password`` and ``query``: the URL's sealed password and signed query (core/url.py).
    Without a password, the file keeps its own while the new URL names the same user, host
    and port; without a query, its own while the new URL shows the same query.

    ``refresh``: the engine's URL refresher signing the file's URL anew. Download jobs take
    any new name (as BITS's SetRemoteName); upload and upload-reply jobs take, from the
    refresher only, a name of the same file (scheme, host, port and path; only the login and
    the query may change), so that the server's upload session goes on."""

    file_index: int
    remote_name: str
    password: Sealed | None = None
    query: Sealed | None = None
    refresh: bool = False


@attrs.frozen
class ReplaceRemotePrefix(Command):
    """``password``: the sealed password taken out of ``new_prefix``, as in SetRemoteName
    (each file keeps its own signed query while its new name shows the same one)."""

    old_prefix: str
    new_prefix: str
    password: Sealed | None = None


@attrs.frozen
class Resume(Command):
    pass


@attrs.frozen
class Suspend(Command):
    pass


@attrs.frozen
class Cancel(Command):
    pass


@attrs.frozen
class RequestFileRanges(Command):
    """IBackgroundCopyFile6::RequestFileRanges (on-demand jobs)."""

    file_index: int
    ranges: tuple[ByteRange, ...]


@attrs.frozen
class UpdateDownloadPosition(Command):
    """IBackgroundCopyFile6::UpdateDownloadPosition (on-demand jobs)."""

    file_index: int
    offset: int


@attrs.frozen
class SetValidationState(Command):
    """IBackgroundCopyFile3::SetValidationState of a transferred download file. FALSE
    rejects it: the job goes to ERROR (BG_E_VALIDATION_FAILED) and the file starts over.
    ``reason``: what the error says (Complete's own check of a temp file gives one)."""

    file_index: int
    valid: bool
    reason: str | None = None


@attrs.frozen
class Complete(Command):
    """``files_kept``: the files the adapter renamed into place (None: decide them)."""

    files_kept: tuple[int, ...] | None = None


# -- the engine's reports --------------------------------------------------------------


@attrs.frozen
class StartTransfer(Command):
    pass


@attrs.frozen
class Connect(Command):
    pass


@attrs.frozen
class Checkpoint(Command):
    file_index: int
    bytes_transferred: int
    bytes_total: int | None
    validator: str | None = None
    response_headers: str | Sealed | None = None


@attrs.frozen
class FinishFile(Command):
    file_index: int
    bytes_total: int
    digest: str | None = None
    response_headers: str | Sealed | None = None
    inode: int | None = None  # the synced temp file's


@attrs.frozen
class RestartFile(Command):
    file_index: int
    reason: str


@attrs.frozen
class FillRanges(Command):
    """The engine: an on-demand file's temp file holds these ranges durably."""

    file_index: int
    ranges: tuple[ByteRange, ...]
    bytes_total: int
    validator: str | None = None


@attrs.frozen
class FinishJob(Command):
    pass


@attrs.frozen
class Fail(Command):
    error: JobError
    transient: bool
    retry_after: float | None = None
    response_headers: str | Sealed | None = None  # of the failed response, for its file


@attrs.frozen
class Retry(Command):
    pass


@attrs.frozen
class TimeOutNoProgress(Command):
    pass


@attrs.frozen
class ExceedMaxDownloadTime(Command):
    pass


@attrs.frozen
class LoseNetwork(Command):
    pass


@attrs.frozen
class RestoreNetwork(Command):
    pass


@attrs.frozen
class Block(Command):
    hresult: int


@attrs.frozen
class Unblock(Command):
    pass


@attrs.frozen
class EndSlice(Command):
    """``active_until``: for a transfer the engine that ran it left without ending it (see
    ``SliceEnded``), the job's ``last_active_at``."""

    active_until: datetime | None = None


@attrs.frozen
class Scavenge(Command):
    pass


@attrs.frozen
class FinishRanges(Command):
    pass


@attrs.frozen
class OpenUploadSession(Command):
    file_index: int
    token: str


@attrs.frozen
class LocateReply(Command):
    """``url`` as recorded (core/url.py: no password, signature values ``<redacted>``);
    ``query``: the real query, sealed, when a parameter of it is a secret."""

    url: str
    query: Sealed | None = None


@attrs.frozen
class TakeLease(Command):
    worker: str
    seconds: float


@attrs.frozen
class ReleaseLease(Command):
    worker: str


@attrs.frozen
class RecordNotification(Command):
    """The notify command line started for ``reason`` exited with ``exit_code``.
    ``since_version``: the job's ``state_since_version`` when the run started, the state
    entry the run was for (the job may have left it and come back while it ran)."""

    reason: str
    exit_code: int
    since_version: int = 0


@attrs.frozen
class ProgressReply(Command):
    bytes_total: int | None
    bytes_transferred: int


def decide(job: Job, command: Command, now: datetime, limits: Limits) -> list[ev.Event]:
    """The events that ``command`` causes, or a ``BitsError``; never a partial result."""
    handler = _DECIDERS[type(command)]
    try:
        return handler(job, command, now, limits)
    except IllegalTransition as exc:
        raise BitsError(exc.hresult, _refusal_message(job, exc)) from None


def _refusal_message(job: Job, exc: IllegalTransition) -> str:
    if exc.hresult == hresult.BG_E_EMPTY:
        return f"job {job.id} has no files to transfer"
    return f"{exc.trigger.value} is not allowed: job {job.id} is {job.state.name}"


def _require_live(job: Job) -> None:
    if job.state not in NON_FINAL_STATES:
        raise BitsError(
            hresult.BG_E_INVALID_STATE, f"job {job.id} is {job.state.name} and cannot change"
        )


def _transition(job: Job, trigger: Trigger, event: ev.Event) -> list[ev.Event]:
    next_state(job.state, trigger, job.facts())
    return [event]


# -- file names --------------------------------------------------------------------------

_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*)://(?P<rest>[^\s]+)$")
_UNC = re.compile(r"^\\\\[^\\/\s]+\\[^\\/]+(\\.*)?$")


def check_remote_name(name: Any, job_type: JobType) -> str:
    """Syntax only (bits-core.md §7.1); which schemes exist is the adapters' business."""
    if not isinstance(name, str) or not name:
        raise BitsError(hresult.E_INVALIDARG, "a remote name must be a non-empty string")
    if len(name) > limit.REMOTE_NAME_MAX:
        raise BitsError(
            hresult.E_INVALIDARG,
            f"the remote name is {len(name)} characters; the limit is {limit.REMOTE_NAME_MAX}",
        )
    if any(c in name for c in "\x00\r\n\t") or not is_utf8(name):
        raise BitsError(
            hresult.E_INVALIDARG, "a remote name must be valid Unicode without control characters"
        )
    if _UNC.match(name):
        if job_type is JobType.UPLOAD_REPLY:
            raise BitsError(hresult.E_INVALIDARG, "upload-reply jobs need an HTTP(S) URL")
        return name
    match = _URL.match(name)
    if match is None:
        shown = repr(redact_url(name))  # a refused name may hold a password: never shown
        if " " in name and _URL.match(name.replace(" ", "%20")):
            raise BitsError(
                hresult.E_INVALIDARG,
                f"{shown} holds a space: write it %20 (remote names are taken as they are, "
                "without escaping, as BITS takes them)",
            )
        raise BitsError(hresult.E_INVALIDARG, f"{shown} is neither a URL nor a UNC path")
    if has_url_secret(name):
        raise BitsError(
            hresult.E_INVALIDARG,
            "a URL's password or signature is never recorded in plain text: give the URL "
            "to TransferJob.add_file or set_remote_name, which seal them",
        )
    wild = "*?" if match["scheme"].lower() in ("smb", "file") else "*"
    if any(c in match["rest"] for c in wild):
        raise BitsError(hresult.E_INVALIDARG, "wildcards are not allowed in remote names")
    if match["scheme"].lower() in ("http", "https"):
        _check_authority(name)
    return name


def _check_authority(name: str) -> None:
    """An HTTP(S) URL names a host, and a port (if any) of 1 to 65535: a URL without them
    is refused at the call, not found out when the job runs."""
    shown = repr(redact_url(name))
    try:
        parts = urlsplit(name)
        port = parts.port
    except ValueError as exc:  # a port that is no number or out of range, a broken [IPv6]
        raise BitsError(hresult.E_INVALIDARG, f"{shown} is not a valid URL: {exc}") from None
    if not parts.hostname:
        raise BitsError(hresult.E_INVALIDARG, f"{shown} names no host")
    if port == 0:
        raise BitsError(hresult.E_INVALIDARG, f"{shown} names port 0")


# Headers the engine and its transports set themselves: a custom one would fight them (a
# custom Range made every answer a 206 the engine did not ask for, retried for 14 days).
_ENGINE_HEADERS: Final = frozenset(
    {"range", "if-range", "content-range", "content-length", "transfer-encoding", "accept-encoding"}
)


def check_custom_header_names(lines: Iterable[str]) -> None:
    """SetCustomHeaders: E_INVALIDARG for a header backhaul sets itself (byte ranges for
    resume and AddFileWithRanges, sizes, identity encoding, the BITS upload protocol's)."""
    for line in lines:
        name = line.partition(":")[0].strip()
        if name.lower() in _ENGINE_HEADERS or name.lower().startswith("bits-"):
            raise BitsError(
                hresult.E_INVALIDARG,
                f"{name} is set by backhaul itself (resume, byte ranges, sizes, the upload "
                "protocol): it cannot be a custom header",
            )


def check_local_name(name: Any) -> str:
    """Absolute, normalised, no NUL; directory existence is checked by the adapters."""
    if not isinstance(name, str) or not name:
        raise BitsError(hresult.E_INVALIDARG, "a local name must be a non-empty string")
    if "\x00" in name or not is_utf8(name):
        raise BitsError(hresult.E_INVALIDARG, "a local name must be valid Unicode without NUL")
    if not name.startswith("/"):
        raise BitsError(hresult.E_INVALIDARG, f"{name!r} is not an absolute path")
    size = len(name.encode())
    if size >= limit.LOCAL_NAME_MAX:  # PATH_MAX counts the NUL that ends the name
        raise BitsError(
            hresult.E_INVALIDARG,
            f"the local name is {size} bytes; a path holds at most {limit.LOCAL_NAME_MAX - 1}",
        )
    parts = name.split("/")
    long = next((p for p in parts if len(p.encode()) > limit.LOCAL_NAME_PART_MAX), None)
    if long is not None:  # no file system here would create it: refused now, not at transfer
        where = name[: name.index(long)].rstrip("/") or "/"
        shown = long if len(long) <= 40 else f"{long[:40]}..."
        raise BitsError(
            hresult.hresult_from_win32(hresult.ERROR_FILENAME_EXCED_RANGE),
            f"the name {shown} in {where} is {len(long.encode())} bytes; "
            f"a directory entry holds at most {limit.LOCAL_NAME_PART_MAX}",
        )
    if any(p in (".", "..") for p in parts) or name.endswith("/"):
        raise BitsError(hresult.E_INVALIDARG, f"{name!r} must name a file, without . or ..")
    if any(c in name for c in "*?"):
        raise BitsError(hresult.E_INVALIDARG, "wildcards are not allowed in local names")
    return name


# The last byte a range may reach: the largest file offset (a signed 64-bit off_t, and the
# largest integer the stores keep). BITS takes a UINT64; no file here can be that long.
MAX_FILE_SIZE: Final = 2**63 - 1


def _same_file(local_name: str) -> str:
    """The name a file system reads in ``local_name``: "/d//x" is "/d/x"."""
    return _SLASHES.sub("/", local_name)


_SLASHES: Final = re.compile("/{2,}")


def _check_range(r: ByteRange) -> None:
    """BG_E_INVALID_RANGE for a range that no file can hold (BG_LENGTH_TO_EOF arrives here
    as ``length=None``: the adapters map it)."""
    if isinstance(r.offset, bool) or not isinstance(r.offset, int):
        raise BitsError(hresult.BG_E_INVALID_RANGE, f"invalid range offset {r.offset!r}")
    if r.offset < 0 or r.offset >= MAX_FILE_SIZE:
        raise BitsError(hresult.BG_E_INVALID_RANGE, f"invalid range offset {r.offset}")
    if r.length is None:
        return
    if isinstance(r.length, bool) or not isinstance(r.length, int) or r.length <= 0:
        raise BitsError(hresult.BG_E_INVALID_RANGE, "a range length must be positive")
    if r.offset + r.length > MAX_FILE_SIZE:
        raise BitsError(
            hresult.BG_E_INVALID_RANGE,
            f"the range {r.offset}:{r.length} ends past the largest file size ({MAX_FILE_SIZE})",
        )


def _check_ranges(ranges: tuple[ByteRange, ...], limits: Limits) -> None:
    if limits.max_ranges_per_file is not None and len(ranges) > limits.max_ranges_per_file:
        raise BitsError(
            hresult.BG_E_TOO_MANY_RANGES_IN_FILE,
            f"{len(ranges)} ranges; the limit is {limits.max_ranges_per_file}",
        )
    for r in ranges:
        _check_range(r)
    ordered = sorted(ranges, key=lambda r: r.offset)
    for before, after in itertools.pairwise(ordered):
        if before.end is None or before.end > after.offset:
            raise BitsError(
                hresult.BG_E_OVERLAPPING_RANGES,
                f"ranges at {before.offset} and {after.offset} overlap",
            )


def _add_files(job: Job, cmd: AddFiles, now: datetime, limits: Limits) -> list[ev.Event]:
    _require_live(job)
    if not cmd.files:
        raise BitsError(hresult.E_INVALIDARG, "no files given")
    if job.job_type is not JobType.DOWNLOAD and len(job.files) + len(cmd.files) > 1:
        raise BitsError(
            hresult.BG_E_TOO_MANY_FILES, f"a {job.job_type.name} job holds exactly one file"
        )
    total = len(job.files) + len(cmd.files)
    if limits.max_files_per_job is not None and total > limits.max_files_per_job:
        raise BitsError(
            hresult.BG_E_TOO_MANY_FILES_IN_JOB,
            f"the job would hold {total} files; the limit is {limits.max_files_per_job}",
        )
    locals_seen = {_same_file(f.local_name) for f in job.files}
    for spec in cmd.files:
        check_remote_name(spec.remote_name, job.job_type)
        check_local_name(spec.local_name)
        if _same_file(spec.local_name) in locals_seen and job.job_type is JobType.DOWNLOAD:
            raise BitsError(
                hresult.E_INVALIDARG, f"{spec.local_name} is already a destination in this job"
            )
        locals_seen.add(_same_file(spec.local_name))
        if spec.ranges:
            if job.job_type is not JobType.DOWNLOAD:
                raise BitsError(hresult.E_NOTIMPL, "ranges apply to download jobs only")
            if job.dynamic_content:
                raise BitsError(
                    hresult.BG_E_UNSUPPORTED_JOB_CONFIGURATION,
                    "ranges cannot be used with dynamic content",
                )
            _check_ranges(spec.ranges, limits)
        if spec.expected_digest is not None and not re.fullmatch(
            r"sha256:[0-9a-f]{64}|sha1:[0-9a-f]{40}|md5:[0-9a-f]{32}|sha512:[0-9a-f]{128}",
            spec.expected_digest,
        ):
            raise BitsError(
                hresult.E_INVALIDARG, "an expected digest is 'sha256:<hex>' (or sha1/sha512/md5)"
            )
    return _transition(job, Trigger.ADD_FILE, ev.FilesAdded(now, cmd.files))


def _set_setting(job: Job, cmd: SetSetting, now: datetime, limits: Limits) -> list[ev.Event]:
    _require_live(job)
    stored = check_setting(cmd.name, cmd.value, job)
    events: list[ev.Event] = [ev.PropertySet(now, cmd.name, stored)]
    if cmd.name == "http_method" and stored != _default_method(job):
        # SetHttpMethod: a custom method forces FOREGROUND (bits-core.md §10).
        events.append(ev.PropertySet(now, "priority", 0))
    return events


def _default_method(job: Job) -> str:
    from backhaul.core.job import DEFAULT_HTTP_METHOD

    return DEFAULT_HTTP_METHOD[job.job_type]


def _set_credentials(
    job: Job, cmd: SetCredentials, now: datetime, limits: Limits
) -> list[ev.Event]:
    _require_live(job)
    target, scheme = _auth_pair(cmd.target, cmd.scheme)
    if cmd.user_name is not None:  # checked as every other text is (setting._text)
        if not isinstance(cmd.user_name, str):
            raise BitsError(hresult.E_INVALIDARG, "the user name must be a string or None")
        if len(cmd.user_name) > limit.USER_NAME_MAX:  # BITS's own code first
            raise BitsError(hresult.BG_E_USERNAME_TOO_LARGE, "the user name is too long")
        if "\x00" in cmd.user_name or not is_utf8(cmd.user_name):
            raise BitsError(
                hresult.E_INVALIDARG, "the user name must be valid Unicode without NUL characters"
            )
    if cmd.password_length > limit.PASSWORD_MAX:
        raise BitsError(hresult.BG_E_PASSWORD_TOO_LARGE, "the password is too long")
    if scheme in (AuthScheme.BASIC, AuthScheme.DIGEST, AuthScheme.PASSPORT) and (
        cmd.user_name is None or cmd.password is None
    ):
        raise BitsError(
            hresult.E_INVALIDARG, f"{scheme.name} needs both a user name and a password"
        )
    return [ev.CredentialsSet(now, int(target), int(scheme), cmd.user_name, cmd.password)]


def _auth_pair(target: int, scheme: int) -> tuple[AuthTarget, AuthScheme]:
    try:
        t = AuthTarget(target)
    except ValueError:
        raise BitsError(hresult.BG_E_INVALID_AUTH_TARGET, f"unknown target {target!r}") from None
    try:
        s = AuthScheme(scheme)
    except ValueError:
        raise BitsError(hresult.BG_E_INVALID_AUTH_SCHEME, f"unknown scheme {scheme!r}") from None
    return t, s


def _remove_credentials(
    job: Job, cmd: RemoveCredentials, now: datetime, limits: Limits
) -> list[ev.Event]:
    _require_live(job)
    target, scheme = _auth_pair(cmd.target, cmd.scheme)
    if not any((c.target, c.scheme) == (target, scheme) for c in job.credentials):
        return []  # S_FALSE: nothing to remove
    return [ev.CredentialsRemoved(now, int(target), int(scheme))]


def _set_headers(job: Job, cmd: SetCustomHeaders, now: datetime, limits: Limits) -> list[ev.Event]:
    _require_live(job)
    if cmd.length > limit.CUSTOM_HEADERS_MAX:  # ``length`` counts the NUL, as the limit does
        raise BitsError(hresult.BG_E_STRING_TOO_LONG, "the custom headers are too long")
    return [ev.CustomHeadersSet(now, cmd.headers)]


def _take_ownership(job: Job, cmd: TakeOwnership, now: datetime, limits: Limits) -> list[ev.Event]:
    _require_live(job)
    if not isinstance(cmd.owner, str) or not cmd.owner:
        raise BitsError(hresult.E_INVALIDARG, "the new owner must be a non-empty name")
    return [ev.OwnershipTaken(now, cmd.owner)]


def _headers_write_only(
    job: Job, cmd: MakeCustomHeadersWriteOnly, now: datetime, limits: Limits
) -> list[ev.Event]:
    _require_live(job)
    if job.custom_headers_write_only:
        return []
    return [ev.CustomHeadersMadeWriteOnly(now)]


def _set_remote_name(job: Job, cmd: SetRemoteName, now: datetime, limits: Limits) -> list[ev.Event]:
    _require_live(job)
    if not cmd.refresh:
        _download_only(job, "SetRemoteName")
    if not 0 <= cmd.file_index < len(job.files):
        raise BitsError(hresult.BG_E_FILE_NOT_FOUND, f"the job has no file {cmd.file_index}")
    check_remote_name(cmd.remote_name, job.job_type)
    spec = job.files[cmd.file_index].spec
    if job.job_type is not JobType.DOWNLOAD and not same_file(spec.remote_name, cmd.remote_name):
        raise BitsError(
            hresult.E_INVALIDARG,
            "a refreshed upload URL must name the same file: only its login and query may change",
        )
    password = _carried_password(spec, cmd.remote_name, cmd.password)
    query = _carried_query(spec, cmd.remote_name, cmd.query)
    return [ev.RemoteNameChanged(now, cmd.file_index, cmd.remote_name, password, query)]


def _carried_password(spec: FileSpec, new_name: str, given: Sealed | None) -> Sealed | None:
    """A new remote name's password: the one given with it, else the file's own while the
    new name keeps its scheme, user, host and port (a refreshed signed URL), else none."""
    if given is not None:
        if not has_user_info(new_name):
            raise BitsError(
                hresult.E_INVALIDARG, f"{new_name} has no user name for the password given"
            )
        return given
    return spec.password if same_login(spec.remote_name, new_name) else None


def _carried_query(spec: FileSpec, new_name: str, given: Sealed | None) -> Sealed | None:
    """A new remote name's signed query: the one given with it, else the file's own while
    the new name shows the same query (``<redacted>`` values and all), else none."""
    if given is not None:
        return given
    if spec.query is None or shown_query(new_name) != shown_query(spec.remote_name):
        return None
    return spec.query


def _replace_prefix(
    job: Job, cmd: ReplaceRemotePrefix, now: datetime, limits: Limits
) -> list[ev.Event]:
    _require_live(job)
    _download_only(job, "ReplaceRemotePrefix")
    if not cmd.old_prefix or not cmd.new_prefix:
        raise BitsError(hresult.E_INVALIDARG, "both prefixes must be non-empty")
    events: list[ev.Event] = []
    for i, f in enumerate(job.files):
        if f.remote_name.startswith(cmd.old_prefix):
            new_name = cmd.new_prefix + f.remote_name[len(cmd.old_prefix) :]
            check_remote_name(new_name, job.job_type)
            password = _carried_password(f.spec, new_name, cmd.password)
            query = _carried_query(f.spec, new_name, None)
            events.append(ev.RemoteNameChanged(now, i, new_name, password, query))
    return events


def _download_only(job: Job, call: str) -> None:
    if job.job_type is not JobType.DOWNLOAD:
        raise BitsError(hresult.E_NOTIMPL, f"{call} applies to download jobs only")


def _complete(job: Job, cmd: Complete, now: datetime, limits: Limits) -> list[ev.Event]:
    next_state(job.state, Trigger.COMPLETE, job.facts())
    whole = tuple(i for i, f in enumerate(job.files) if f.transferred)
    kept = whole if cmd.files_kept is None else cmd.files_kept
    if not set(kept) <= set(whole):
        raise BitsError(hresult.E_INVALIDARG, "only transferred files can be kept")
    partial = job.job_type is JobType.DOWNLOAD and len(kept) < len(job.files)
    result = hresult.BG_S_PARTIAL_COMPLETE if partial else hresult.S_OK
    return [ev.JobCompleted(now, result, kept)]


def check_random_access(job: Job, index: int) -> None:
    """IBackgroundCopyFile6's calls need an on-demand download job and a whole HTTP(S)
    file without ranges or dynamic content (bits-core.md §7.5)."""
    _require_live(job)
    _file_in_job(job, index)
    f = job.files[index]
    why = None
    if job.job_type is not JobType.DOWNLOAD or not job.on_demand:
        why = "random access needs a download job in on-demand mode (ON_DEMAND_MODE)"
    elif job.dynamic_content:
        why = "random access cannot be used with dynamic content"
    elif f.ranges:
        why = f"file {index} was added with ranges (AddFileWithRanges)"
    elif not f.remote_name.lower().startswith(("http://", "https://")):
        why = "random access is for HTTP and HTTPS files only"
    if why is not None:
        raise BitsError(hresult.BG_E_RANDOM_ACCESS_NOT_SUPPORTED, why)


def _request_file_ranges(
    job: Job, cmd: RequestFileRanges, now: datetime, limits: Limits
) -> list[ev.Event]:
    check_random_access(job, cmd.file_index)
    if not cmd.ranges:
        raise BitsError(hresult.E_INVALIDARG, "no ranges given")
    size = job.files[cmd.file_index].bytes_total
    for r in cmd.ranges:  # overlaps are allowed here (split as needed), unlike AddFile's
        _check_range(r)
        if size is not None and (r.offset >= size or (r.end is not None and r.end > size)):
            raise BitsError(
                hresult.BG_E_INVALID_RANGE,
                f"the range {r.offset}:{r.length} lies outside the file of {size} bytes",
            )
    if limits.max_ranges_per_file is not None and len(cmd.ranges) > limits.max_ranges_per_file:
        raise BitsError(
            hresult.BG_E_TOO_MANY_RANGES_IN_FILE,
            f"{len(cmd.ranges)} ranges; the limit is {limits.max_ranges_per_file}",
        )
    return [ev.FileRangesRequested(now, cmd.file_index, tuple(cmd.ranges))]


def _update_download_position(
    job: Job, cmd: UpdateDownloadPosition, now: datetime, limits: Limits
) -> list[ev.Event]:
    check_random_access(job, cmd.file_index)
    size = job.files[cmd.file_index].bytes_total
    if cmd.offset < 0 or (size is not None and cmd.offset >= size):
        raise BitsError(hresult.BG_E_INVALID_RANGE, f"position {cmd.offset} is outside the file")
    return [ev.DownloadPositionUpdated(now, cmd.file_index, cmd.offset)]


def _fill_ranges(job: Job, cmd: FillRanges, now: datetime, limits: Limits) -> list[ev.Event]:
    _file_in_job(job, cmd.file_index)
    if any(
        r.length is None or r.offset < 0 or r.offset + r.length > cmd.bytes_total
        for r in cmd.ranges
    ):
        raise BitsError(hresult.E_INVALIDARG, "filled ranges must lie within the file")
    event = ev.RangesFilled(now, cmd.file_index, cmd.ranges, cmd.bytes_total, cmd.validator)
    return _transition(job, Trigger.DATA_RECEIVED, event)


def _set_validation_state(
    job: Job, cmd: SetValidationState, now: datetime, limits: Limits
) -> list[ev.Event]:
    if not cmd.valid:  # a final job refuses before anything else is looked at
        next_state(job.state, Trigger.VALIDATION_FAILED, job.facts())
    _require_live(job)
    if job.job_type is not JobType.DOWNLOAD:
        raise BitsError(hresult.E_NOTIMPL, "validation applies to download jobs only")
    _file_in_job(job, cmd.file_index)
    if not job.files[cmd.file_index].transferred:
        raise BitsError(
            hresult.E_PENDING, f"file {cmd.file_index} is not transferred yet: nothing to validate"
        )
    if cmd.valid:
        return [ev.FileValidated(now, cmd.file_index)]
    reason = cmd.reason or f"the application rejected file {cmd.file_index}"
    error = JobError(
        ErrorContext.LOCAL_FILE, hresult.BG_E_VALIDATION_FAILED, reason, cmd.file_index
    )
    return _transition(job, Trigger.VALIDATION_FAILED, ev.FileRejected(now, cmd.file_index, error))


def _file_in_job(job: Job, index: int) -> None:
    if not 0 <= index < len(job.files):
        raise BitsError(hresult.BG_E_FILE_NOT_FOUND, f"the job has no file {index}")


def _checkpoint(job: Job, cmd: Checkpoint, now: datetime, limits: Limits) -> list[ev.Event]:
    _file_in_job(job, cmd.file_index)
    if cmd.bytes_transferred < 0 or (
        cmd.bytes_total is not None and cmd.bytes_transferred > cmd.bytes_total
    ):
        raise BitsError(hresult.E_INVALIDARG, "a checkpoint must lie within the file")
    event = ev.BytesCheckpointed(
        now,
        cmd.file_index,
        cmd.bytes_transferred,
        cmd.bytes_total,
        cmd.validator,
        cmd.response_headers,
    )
    return _transition(job, Trigger.DATA_RECEIVED, event)


def _finish_file(job: Job, cmd: FinishFile, now: datetime, limits: Limits) -> list[ev.Event]:
    _file_in_job(job, cmd.file_index)
    event = ev.FileTransferred(
        now, cmd.file_index, cmd.bytes_total, cmd.digest, cmd.response_headers, cmd.inode
    )
    return _transition(job, Trigger.DATA_RECEIVED, event)


def _restart_file(job: Job, cmd: RestartFile, now: datetime, limits: Limits) -> list[ev.Event]:
    _require_live(job)
    _file_in_job(job, cmd.file_index)
    return [ev.FileRestarted(now, cmd.file_index, cmd.reason)]


def _fail(job: Job, cmd: Fail, now: datetime, limits: Limits) -> list[ev.Event]:
    if cmd.response_headers is not None:
        if cmd.error.file_index is None:
            raise BitsError(hresult.E_INVALIDARG, "response headers belong to a file")
        _file_in_job(job, cmd.error.file_index)
    event = ev.ErrorOccurred(now, cmd.error, cmd.transient, cmd.retry_after, cmd.response_headers)
    return _transition(job, event.trigger_of(), event)


def _finish_job(job: Job, cmd: Command, now: datetime, limits: Limits) -> list[ev.Event]:
    if job.pending_files:
        raise BitsError(hresult.BG_E_INVALID_STATE, "files are still pending")
    return _transition(job, Trigger.ALL_FILES_DONE, ev.JobTransferred(now))


def _progress_reply(job: Job, cmd: ProgressReply, now: datetime, limits: Limits) -> list[ev.Event]:
    if job.job_type is not JobType.UPLOAD_REPLY:
        raise BitsError(hresult.E_NOTIMPL, "only upload-reply jobs have a reply")
    _require_live(job)
    return [ev.ReplyProgressed(now, cmd.bytes_total, cmd.bytes_transferred)]


def _take_lease(job: Job, cmd: TakeLease, now: datetime, limits: Limits) -> list[ev.Event]:
    _require_live(job)
    if job.leased_by_other(cmd.worker, now):
        raise BitsError(
            hresult.BG_E_INVALID_STATE,
            f"job {job.id} is leased by {job.lease_worker} until {job.lease_expires}",
        )
    return [ev.LeaseTaken(now, cmd.worker, now + timedelta(seconds=cmd.seconds))]


def _release_lease(job: Job, cmd: ReleaseLease, now: datetime, limits: Limits) -> list[ev.Event]:
    if job.lease_worker != cmd.worker:
        return []
    return [ev.LeaseReleased(now, cmd.worker)]


def _open_upload_session(
    job: Job, cmd: OpenUploadSession, now: datetime, limits: Limits
) -> list[ev.Event]:
    _file_in_job(job, cmd.file_index)
    if job.job_type is JobType.DOWNLOAD:
        raise BitsError(hresult.E_NOTIMPL, "download jobs have no upload session")
    if job.state not in (JobState.CONNECTING, JobState.TRANSFERRING):
        raise BitsError(hresult.BG_E_INVALID_STATE, f"job {job.id} is {job.state.name}")
    return [ev.UploadSessionOpened(now, cmd.file_index, cmd.token)]


def _locate_reply(job: Job, cmd: LocateReply, now: datetime, limits: Limits) -> list[ev.Event]:
    if job.job_type is not JobType.UPLOAD_REPLY:
        raise BitsError(hresult.E_NOTIMPL, "only upload-reply jobs have a reply")
    if job.state not in (JobState.CONNECTING, JobState.TRANSFERRING):
        raise BitsError(hresult.BG_E_INVALID_STATE, f"job {job.id} is {job.state.name}")
    if has_url_secret(cmd.url):
        raise BitsError(
            hresult.E_INVALIDARG, "a reply URL's secrets are sealed before it is recorded"
        )
    return [ev.ReplyLocated(now, cmd.url, cmd.query)]


def _simple(trigger: Trigger, event_type: Callable[[datetime], ev.Event]) -> Callable[..., Any]:
    def decide_simple(job: Job, cmd: Command, now: datetime, limits: Limits) -> list[ev.Event]:
        return _transition(job, trigger, event_type(now))

    return decide_simple


def _block(job: Job, cmd: Block, now: datetime, limits: Limits) -> list[ev.Event]:
    return _transition(job, Trigger.BLOCKED, ev.JobBlocked(now, cmd.hresult))


_DECIDERS: Mapping[type[Command], Callable[..., list[ev.Event]]] = MappingProxyType(
    {
        AddFiles: _add_files,
        SetSetting: _set_setting,
        SetCredentials: _set_credentials,
        RemoveCredentials: _remove_credentials,
        SetCustomHeaders: _set_headers,
        MakeCustomHeadersWriteOnly: _headers_write_only,
        TakeOwnership: _take_ownership,
        SetRemoteName: _set_remote_name,
        ReplaceRemotePrefix: _replace_prefix,
        Resume: _simple(Trigger.RESUME, ev.JobResumed),
        Suspend: _simple(Trigger.SUSPEND, ev.JobSuspended),
        Cancel: _simple(Trigger.CANCEL, ev.JobCancelled),
        Complete: _complete,
        SetValidationState: _set_validation_state,
        RequestFileRanges: _request_file_ranges,
        UpdateDownloadPosition: _update_download_position,
        FillRanges: _fill_ranges,
        StartTransfer: _simple(Trigger.SCHEDULED, ev.TransferStarted),
        Connect: _simple(Trigger.CONNECTED, ev.Connected),
        Checkpoint: _checkpoint,
        FinishFile: _finish_file,
        RestartFile: _restart_file,
        FinishJob: _finish_job,
        Fail: _fail,
        Retry: _simple(Trigger.RETRY_DUE, ev.RetryStarted),
        TimeOutNoProgress: _simple(Trigger.NO_PROGRESS_TIMEOUT, ev.NoProgressTimedOut),
        ExceedMaxDownloadTime: _simple(
            Trigger.MAX_DOWNLOAD_TIME_EXCEEDED, ev.MaxDownloadTimeExceeded
        ),
        LoseNetwork: _simple(Trigger.NETWORK_LOST, ev.NetworkLost),
        RestoreNetwork: _simple(Trigger.NETWORK_RESTORED, ev.NetworkRestored),
        Block: _block,
        Unblock: _simple(Trigger.UNBLOCKED, ev.JobUnblocked),
        EndSlice: lambda job, c, now, limits: _transition(
            job, Trigger.SLICE_ENDED, ev.SliceEnded(now, c.active_until)
        ),
        Scavenge: _simple(Trigger.INACTIVITY_TIMEOUT, ev.JobScavenged),
        FinishRanges: _simple(Trigger.RANGES_DONE, ev.RangesDone),
        ProgressReply: _progress_reply,
        TakeLease: _take_lease,
        ReleaseLease: _release_lease,
        OpenUploadSession: _open_upload_session,
        LocateReply: _locate_reply,
        RecordNotification: lambda job, c, now, limits: [
            ev.CommandLineNotified(now, c.reason, c.exit_code, c.since_version)
        ],
    }
)
