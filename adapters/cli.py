"""The ``backhaul`` command: bitsadmin's verbs and Start-BitsTransfer's ``get``.

The store is ``--store URL`` / ``$BACKHAUL_STORE``, else SQLite in ``--home DIR`` /
``$BACKHAUL_HOME`` (default ``~/.local/share/backhaul``); the command and the daemon
share it. A job is named by its id (or a unique prefix of it) or by its display name.
BITS's limits (200 files per job, 60 jobs per owner, 300 jobs, 500 ranges per file) apply
to every user but root (BITS spares administrators) unless ``--unlimited`` /
``$BACKHAUL_UNLIMITED=1`` lifts them.

Exit codes: 0 success; 1 the job ended in ERROR or a call was refused (the BITS error is
printed); 2 bad usage; 3 the job was cancelled; 130 interrupted (Ctrl-C). ``get``, ``put``
and ``transfer`` take SIGTERM and SIGHUP (``kill``, ``timeout``, a closed terminal) as they
take Ctrl-C, and exit 128 + the signal's number: 143 and 129.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import gc
import json
import logging
import os
import re
import shlex
import signal
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TextIO, TypeVar

from backhaul.adapters.audit import redact_text
from backhaul.adapters.cli_args import header_lines, interval_arg, seconds_arg
from backhaul.adapters.cli_audit import add_audit_parser
from backhaul.adapters.localfile import os_hresult
from backhaul.adapters.manager import TransferJob, TransferManager
from backhaul.adapters.store import (
    DB_FILE,
    LOCK_SUFFIX,
    STORE_ERRORS,
    EngineLock,
    default_home,
    is_free,
    sqlite_file,
)
from backhaul.core import hresult
from backhaul.core.command import check_custom_header_names
from backhaul.core.error import BackhaulError, BitsError
from backhaul.core.limit import DEFAULT_LIMITS, DISPLAY_NAME_MAX, UNLIMITED, Limits
from backhaul.core.policy import why_waiting
from backhaul.core.projection import job_error, job_progress, job_times
from backhaul.core.url import one_line, secrets_of
from backhaul.core.value import ByteRange, FileSpec, ProxySettings
from backhaul.core.vocabulary import (
    AuthScheme,
    AuthTarget,
    FilePropertyId,
    JobPriority,
    JobPropertyId,
    JobState,
    JobType,
    NotifyFlags,
    ProxyUsage,
    SecurityFlags,
)

if TYPE_CHECKING:
    from backhaul.adapters.engine import Engine

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CANCELLED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
NO_VALUE: Final = "NULL"  # a getter's "no value" in text (JSON: null), as bitsadmin prints it
EXIT_BROKEN_PIPE = 128 + 13  # SIGPIPE, as a shell reports a pipeline's cat cut short
LOCK_FILE = DB_FILE + LOCK_SUFFIX  # the default store's engine lock, in the home

_TYPES = {
    "download": JobType.DOWNLOAD,
    "upload": JobType.UPLOAD,
    "upload-reply": JobType.UPLOAD_REPLY,
}


# -- helpers ---------------------------------------------------------------------------------


class UsageError(BitsError):
    """A command line the verb cannot take, found before any job is made: exit 2 (bad usage,
    as argparse's own refusals), with its BITS HRESULT all the same."""


def _home(args: argparse.Namespace) -> Path:
    return Path(args.home).expanduser() if args.home else default_home()


UNLIMITED_ENV = "BACKHAUL_UNLIMITED"
_TRUE = ("1", "true", "yes", "on")


def _limits(args: argparse.Namespace) -> Limits:
    """BITS's limits, or none with ``--unlimited`` or ``$BACKHAUL_UNLIMITED=1`` (true, yes
    and on also count; any other value keeps the limits)."""
    lifted = args.unlimited or os.environ.get(UNLIMITED_ENV, "").strip().lower() in _TRUE
    return UNLIMITED if lifted else DEFAULT_LIMITS


def _manager(args: argparse.Namespace) -> TransferManager:
    return TransferManager(args.store, home=_home(args), limits=_limits(args))


def _priority(text: str) -> JobPriority:
    try:
        return JobPriority[text.upper()]
    except KeyError:
        raise argparse.ArgumentTypeError(
            f"priority is one of {', '.join(p.name.lower() for p in JobPriority)}"
        ) from None


def find_job(
    manager: TransferManager, ref: str, *, all_owners: bool = False, include_final: bool = False
) -> TransferJob:
    """A job by id, unique id prefix, or unique display name (bitsadmin's <job>); by prefix
    or name among the caller's jobs, or with ``all_owners`` every user's (root only);
    ``include_final``: completed and cancelled jobs too."""
    with contextlib.suppress(BitsError):
        return manager.get_job(ref, include_final=include_final)
    matches = [
        j
        for j in manager.jobs(include_final=include_final, all_owners=all_owners)
        if j.id.startswith(ref.lower()) or j.display_name == ref
    ]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise BitsError(hresult.BG_E_NOT_FOUND, f"no job named {ref!r}")
    raise BitsError(hresult.E_INVALIDARG, f"{ref!r} names {len(matches)} jobs; use the id")


def _fmt_size(n: int | None) -> str:
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    return f"{n} B"


def _error_json(error: Any) -> dict[str, Any]:
    """A job's error (``ErrorInfo`` or the core's ``JobError``) as ``info --json`` gives it."""
    return {
        "context": error.context.name,
        "hresult": hresult.format_hresult(error.hresult),
        "name": hresult.name_of(error.hresult),
        # A log written before URL secrets were sealed may hold them in its messages.
        "description": redact_text(error.description),
        "file_index": error.file_index,
    }


def job_info(job: TransferJob) -> dict[str, Any]:
    # One read of the job: each of job.progress, .times and .error reads it again (a
    # listing of 3,000 jobs read the store 12,000 times).
    snap = job.snapshot()
    waiting = why_waiting(snap, job._manager.clock.now())
    progress = job_progress(snap)
    times = job_times(snap)
    error = job_error(snap)
    return {
        "id": snap.id,
        "display_name": snap.display_name,
        "description": snap.description,
        "type": snap.job_type.name,
        "priority": snap.priority.name,
        "state": snap.state.name,
        "owner": snap.owner,
        "bytes_total": progress.bytes_total,
        "bytes_transferred": progress.bytes_transferred,
        "files_total": progress.files_total,
        "files_transferred": progress.files_transferred,
        "error": None if error is None else _error_json(error),
        "error_count": snap.error_count,
        "creation_time": times.creation_time.isoformat(),
        "modification_time": times.modification_time.isoformat(),
        "transfer_completion_time": times.transfer_completion_time.isoformat()
        if times.transfer_completion_time
        else None,
        "minimum_retry_delay": snap.minimum_retry_delay,
        "no_progress_timeout": snap.no_progress_timeout,
        "maximum_download_time": snap.maximum_download_time,
        "notify_flags": snap.notify_flags,
        "max_rate": snap.max_rate,
        "blocked_by": hresult.name_of(snap.blocked_by) if snap.blocked_by else None,
        "waiting": waiting[0] if waiting else None,
        "next_try": waiting[1].isoformat() if waiting and waiting[1] else None,
    }


def _print_json(data: Any, out: TextIO) -> None:
    out.write(json.dumps(data, indent=None, separators=(", ", ": ")) + "\n")


# -- the daemon lock -------------------------------------------------------------------------


@contextlib.contextmanager
def serve_lock(lock: Path) -> Iterator[EngineLock | None]:
    """Hold the SQLite store's engine lock (``lock_file``): the held lock, to hand to the
    engine this command runs, or None if another engine holds it."""
    held = EngineLock(lock)
    if not held.acquire():
        yield None
        return
    try:
        yield held
    finally:
        held.release()


def lock_file(args: argparse.Namespace) -> Path | None:
    """The engine lock of the SQLite store these arguments name (``store.engine_lock_file``
    of the store they open). None for stores that take many engines (PostgreSQL) or none
    other (memory)."""
    db = sqlite_file(args.store, _home(args))
    return None if db is None else db.with_name(db.name + LOCK_SUFFIX)


def _shared_store(args: argparse.Namespace) -> bool:
    url = args.store or os.environ.get("BACKHAUL_STORE") or ""
    return url.startswith(("postgresql://", "postgres://"))


_NO_LOCK: Final = True  # a store whose engines need no lock: each is a worker, or none other


def _engine_lock(args: argparse.Namespace) -> contextlib.AbstractContextManager[object]:
    """SQLite: one engine per store (a lock file; the held ``EngineLock``, or None). PostgreSQL:
    any number of engines, each a worker that leases the jobs it runs (``_NO_LOCK``)."""
    lock = lock_file(args)
    if lock is None:
        return contextlib.nullcontext(_NO_LOCK)
    return serve_lock(lock)


def _store_lock(held: object) -> EngineLock | None:
    """What ``_engine_lock`` gave, as the engine takes it (``Engine(store_lock=)``)."""
    return held if isinstance(held, EngineLock) else None


def worker_name() -> str:
    import socket
    import uuid

    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


# -- verbs -----------------------------------------------------------------------------------


def cmd_create(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    job = m.create_job(args.name, _TYPES[args.type])
    if args.priority is not None:
        job.priority = args.priority
    out.write(job.id + "\n")
    return EXIT_OK


def cmd_addfile(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    job = find_job(m, args.job)
    job.add_file(
        args.remote, _abs(args.local), expected_digest=args.sha256 and f"sha256:{args.sha256}"
    )
    return EXIT_OK


def cmd_addfilewithranges(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    """bitsadmin /addfilewithranges: RANGES is ``offset:length[,offset:length...]``, with
    ``eof`` for a length that runs to the end of the file."""
    job = find_job(m, args.job)
    job.add_file(args.remote, _abs(args.local), ranges=_ranges(args.ranges))
    return EXIT_OK


def _ranges(text: str) -> list[tuple[int, int | None]]:
    ranges: list[tuple[int, int | None]] = []
    for item in text.split(","):
        offset, colon, length = item.strip().partition(":")
        try:
            if not colon:
                raise ValueError(item)
            ranges.append((int(offset), None if length.lower() == "eof" else int(length)))
        except ValueError:
            raise UsageError(
                hresult.E_INVALIDARG,
                f"bad range {item.strip()!r}: want offset:length, or offset:eof",
            ) from None
    return ranges


def cmd_requestfileranges(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    """IBackgroundCopyFile6::RequestFileRanges for file INDEX of an on-demand job (the
    ``ON_DEMAND_MODE`` property): RANGES as for ``addfilewithranges``; ``resume`` fetches
    them."""
    find_job(m, args.job).request_file_ranges(args.index, _ranges(args.ranges))
    return EXIT_OK


def cmd_updatedownloadposition(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    """IBackgroundCopyFile6::UpdateDownloadPosition: fill the requested ranges from OFFSET."""
    find_job(m, args.job).update_download_position(args.index, args.offset)
    return EXIT_OK


def cmd_getfilledfileranges(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    """IBackgroundCopyFile6::GetFilledFileRanges: the ranges the file holds, a line each."""
    for r in find_job(m, args.job).filled_file_ranges(args.index):
        out.write(f"{r.offset}:{r.length}\n")
    return EXIT_OK


def cmd_setremotename(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    """IBackgroundCopyFile2::SetRemoteName for file INDEX (from 0, as ``files`` numbers
    them); fixes a job in ERROR before ``resume``."""
    find_job(m, args.job).set_remote_name(args.index, args.remote)
    return EXIT_OK


def cmd_replaceremoteprefix(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    """bitsadmin /replaceremoteprefix: prints S_FALSE when no remote name starts with OLD."""
    if not find_job(m, args.job).replace_remote_prefix(args.old, args.new):
        out.write("S_FALSE\n")
    return EXIT_OK


def cmd_geterror(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    """IBackgroundCopyJob::GetError: BG_E_ERROR_INFORMATION_UNAVAILABLE without one."""
    error = find_job(m, args.job).error
    if error is None:
        raise BitsError(hresult.BG_E_ERROR_INFORMATION_UNAVAILABLE, "the job has no error")
    out.write(f"{_error_text(error, file=True)}\n")
    return EXIT_OK


def _error_text(error: Any, *, file: bool = False) -> str:
    """A job's error on one line: its HRESULT's name and value, context (and file), and
    description (control characters escaped)."""
    where = "" if not file or error.file_index is None else f" (file {error.file_index})"
    return (
        f"{error.hresult_name} ({hresult.format_hresult(error.hresult)}) in "
        f"{error.context.name}{where}: {one_line(error.description)}"
    )


def cmd_geterrordescription(
    args: argparse.Namespace, m: TransferManager | None, out: TextIO
) -> int:
    """IBackgroundCopyManager::GetErrorDescription of an HRESULT given by name or value
    (``BG_E_HTTP_ERROR_404``, ``0x80190194``, ``-2145844844``)."""
    text = args.hresult.strip()
    try:
        code = int(text, 0) if text.lstrip("+-").isdigit() else hresult.value_of(text)
    except ValueError:
        raise BitsError(
            hresult.E_INVALIDARG, f"{text!r} is not an HRESULT name or number"
        ) from None
    code &= 0xFFFFFFFF
    description = TransferManager.get_error_description(code)
    name, value = hresult.name_of(code), hresult.format_hresult(code)
    label = value if name == value else f"{name} ({value})"
    out.write(f"{label}: {description}\n")
    return EXIT_OK


def cmd_gettemporaryname(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    """IBackgroundCopyFile3::GetTemporaryName of file INDEX (BG_E_FILE_NOT_FOUND past the
    last)."""
    out.write(f"{find_job(m, args.job).file(args.index).temporary_name}\n")
    return EXIT_OK


def cmd_setvalidationstate(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    """IBackgroundCopyFile3::SetValidationState of file INDEX: ``false`` rejects it (the job
    goes to ERROR with BG_E_VALIDATION_FAILED and ``resume`` fetches the file again)."""
    find_job(m, args.job).set_validation_state(args.index, args.state == "true")
    return EXIT_OK


def cmd_getvalidationstate(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    """IBackgroundCopyFile3::GetValidationState of file INDEX: true once accepted."""
    out.write(f"{str(find_job(m, args.job).validation_state(args.index)).lower()}\n")
    return EXIT_OK


def _integer(text: str, refusal: str) -> int:
    """A number as Python writes it (0x.. too), else E_INVALIDARG with ``refusal``."""
    try:
        return int(text, 0)
    except ValueError:
        raise BitsError(hresult.E_INVALIDARG, refusal) from None


def cmd_setaclflag(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    """bitsadmin /setaclflag: any of O (owner), G (group), D (DACL), S (SACL), or a number;
    the parts of an SMB file's security descriptor kept with the download."""
    text = args.flags.strip()
    bits = {"O": 1, "G": 2, "D": 4, "S": 8}
    if text and all(c in bits for c in text.upper()):
        value = sum(bits[c] for c in set(text.upper()))
    else:
        value = _integer(text, f"ACL flags {text!r}: want letters of OGDS, or a number")
    find_job(m, args.job).acl_flags = value
    return EXIT_OK


def cmd_setreplyfilename(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    """SetReplyFileName (upload-reply jobs): where Complete puts the server's reply."""
    find_job(m, args.job).reply_file_name = _abs(args.path)
    return EXIT_OK


def cmd_getreplyprogress(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    reply = find_job(m, args.job).reply_progress
    total = "?" if reply.bytes_total is None else reply.bytes_total
    out.write(f"{reply.bytes_transferred} of {total} bytes\n")
    return EXIT_OK


def cmd_getreplydata(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    """GetReplyData: the server's reply as text (undecodable bytes replaced); above 1 MiB,
    BG_E_TOO_LARGE, and the reply is in the reply file."""
    out.write(find_job(m, args.job).reply_data().decode("utf-8", "replace"))
    return EXIT_OK


def cmd_takeownership(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    """TakeOwnership (root only): the job becomes this user's, without the old owner's
    credentials, client certificate, custom headers and notify command line."""
    find_job(m, args.job, all_owners=True).take_ownership()
    return EXIT_OK


def cmd_reset(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    """bitsadmin /reset: cancel every job of this user (``--all``: of every user, root
    only); prints how many."""
    cancelled = 0
    for job in m.jobs(all_owners=args.all):
        with contextlib.suppress(BitsError):  # one that went final meanwhile
            job.cancel()
            cancelled += 1
    out.write(f"{cancelled} job(s) cancelled\n")
    return EXIT_OK


def _abs(local: str) -> str:
    """A local name as the shell means it, made absolute: ``..`` and ``.`` taken out as
    curl and wget take them (the core accepts no others). A trailing ``/`` stays: it names a
    directory, which the core refuses as a file's name."""
    path = os.path.abspath(os.path.expanduser(local))
    return path + "/" if local.endswith("/") and path != "/" else path


# A name in a list file: "quoted" or 'quoted' (a name with spaces; no escapes inside),
# else up to the next space (an apostrophe or # inside a URL stays in it).
_NAME = re.compile(r"""(?<!\S)(?:"([^"]*)"|'([^']*)'|(\S+))(?!\S)""")


def cmd_addfileset(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    """bitsadmin /addfileset: a 'REMOTE LOCAL' pair per line; blank lines and lines that
    start with # are skipped; a name with spaces is quoted."""
    job = find_job(m, args.job)
    pairs = []
    try:
        raw = Path(args.listfile).read_bytes()
        # Notepad's UTF-8 has a BOM; Windows PowerShell's '>' writes UTF-16 with one.
        utf16 = raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))
        text = raw.decode("utf-16" if utf16 else "utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        code = os_hresult(exc) if isinstance(exc, OSError) else hresult.E_INVALIDARG
        why = exc.strerror if isinstance(exc, OSError) else "not text"
        raise BitsError(code, f"cannot read the list file {args.listfile}: {why}") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = [next(g for g in m.groups() if g is not None) for m in _NAME.finditer(line)]
        if len(parts) != 2:
            raise BitsError(hresult.E_INVALIDARG, f"{args.listfile}:{lineno}: want 'REMOTE LOCAL'")
        pairs.append(FileSpec(parts[0], _abs(parts[1])))
    job.add_files(pairs)
    return EXIT_OK


def _state_verb(name: str) -> Callable[[argparse.Namespace, TransferManager, TextIO], int]:
    def verb(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
        job = find_job(m, args.job)
        result = getattr(job, name)()
        if isinstance(result, int) and result != hresult.S_OK:
            out.write(f"{hresult.name_of(result)}\n")
        return EXIT_OK

    return verb


def cmd_info(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    job = find_job(m, args.job, include_final=args.include_final)
    info = job_info(job)
    if args.json:
        _print_json(info, out)
        return EXIT_OK
    for key, value in info.items():
        if key == "error" and value:
            value = f"{value['name']} ({value['hresult']}) in {value['context']}: {value['description']}"
        out.write(f"{key:>26}: {one_line(NO_VALUE if value is None else value)}\n")
    return EXIT_OK


def cmd_list(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    jobs = list(m.jobs(all_owners=args.all, include_final=args.include_final))
    rows = [job_info(j) for j in jobs]
    if args.json:
        _print_json(rows, out)
        return EXIT_OK
    for r in rows:
        out.write(
            f"{r['id']}  {r['state']:<15} {r['priority']:<10} "
            f"{r['files_transferred']}/{r['files_total']} files  "
            f"{_fmt_size(r['bytes_transferred'])}/{_fmt_size(r['bytes_total'])}  "
            f"{one_line(r['display_name'])}\n"
        )
    out.write(f"Listed {len(rows)} job(s).\n")
    return EXIT_OK


def cmd_files(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    job = find_job(m, args.job, include_final=args.include_final)
    rows = [
        {
            "index": f.index,
            "remote_name": redact_text(f.remote_name),  # as in the description above
            "local_name": f.local_name,
            "bytes_total": f.progress.bytes_total,
            "bytes_transferred": f.progress.bytes_transferred,
            "completed": f.progress.completed,
            "temporary_name": f.temporary_name,
            "validated": f.validated,
        }
        for f in job.files()
    ]
    if args.json:
        _print_json(rows, out)
        return EXIT_OK
    for r in rows:
        out.write(
            f"{r['index']}: {_fmt_size(r['bytes_transferred'])}/{_fmt_size(r['bytes_total'])} "
            f"{'COMPLETED' if r['completed'] else 'WORKING'}  "
            f"{one_line(r['remote_name'])} -> {one_line(r['local_name'])}\n"
        )
    return EXIT_OK


_SETTERS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "setpriority": ("priority", _priority),
    "setdisplayname": ("display_name", str),
    "setdescription": ("description", str),
    "setminretrydelay": ("minimum_retry_delay", lambda s: timedelta(seconds=float(s))),
    "setnoprogresstimeout": ("no_progress_timeout", lambda s: timedelta(seconds=float(s))),
    "setmaxdownloadtime": ("maximum_download_time", lambda s: timedelta(seconds=float(s))),
    "setnotifyflags": ("notify_flags", lambda s: int(s, 0)),
}
_GETTERS = {
    "getpriority": "priority",
    "getdisplayname": "display_name",
    "getdescription": "description",
    "getminretrydelay": "minimum_retry_delay",
    "getnoprogresstimeout": "no_progress_timeout",
    "getmaxdownloadtime": "maximum_download_time",
    "getnotifyflags": "notify_flags",
    "getstate": "state",
    "gettype": "job_type",
    "getowner": "owner",
    "geterrorcount": "error_count",
    "getnotifycmdline": "notify_cmdline",
    # bitsadmin's one-value getters (``info`` shows them all).
    "getbytestotal": "progress.bytes_total",
    "getbytestransferred": "progress.bytes_transferred",
    "getfilestotal": "progress.files_total",
    "getfilestransferred": "progress.files_transferred",
    "getcreationtime": "times.creation_time",
    "getmodificationtime": "times.modification_time",
    "getcompletiontime": "times.transfer_completion_time",
    "getaclflags": "acl_flags",
    "getreplyfilename": "reply_file_name",
}


def _setter(verb: str) -> Callable[[argparse.Namespace, TransferManager, TextIO], int]:
    attr, parse = _SETTERS[verb]

    def run(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
        try:
            value = parse(args.value)
        except (ValueError, argparse.ArgumentTypeError) as exc:
            raise BitsError(hresult.E_INVALIDARG, f"{verb}: {exc}") from None
        except OverflowError:
            raise BitsError(hresult.E_INVALIDARG, f"{verb}: {args.value} is out of range") from None
        setattr(find_job(m, args.job), attr, value)
        return EXIT_OK

    return run


def _getter(verb: str) -> Callable[[argparse.Namespace, TransferManager, TextIO], int]:
    attr = _GETTERS[verb]

    def run(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
        value: Any = find_job(m, args.job)
        for name in attr.split("."):
            value = getattr(value, name)
        if isinstance(value, timedelta):
            value = int(value.total_seconds())
        elif isinstance(value, datetime):
            value = value.isoformat()
        elif hasattr(value, "name") and not isinstance(value, str):
            value = value.name
        elif hasattr(value, "program") and hasattr(value, "parameters"):  # a notify command
            value = shlex.join([value.program, *value.parameters])  # as setnotifycmdline takes it
        elif value is None:  # no value: bitsadmin's word, as getproxysettings prints it
            value = NO_VALUE
        out.write(f"{value}\n")
        return EXIT_OK

    return run


def cmd_setnotifycmdline(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    job = find_job(m, args.job)
    if not args.argv or args.argv == ["NULL"]:
        job.set_notify_cmdline(None)
    else:
        job.set_notify_cmdline(args.argv[0], *args.argv[1:])
    return EXIT_OK


_P = TypeVar("_P", JobPropertyId, FilePropertyId)


def _property(kind: type[_P], name: str, what: str) -> _P:
    """A property by its BITS name; unknown: BG_E_UNKNOWN_PROPERTY_ID."""
    try:
        return kind.from_bits_name(name)
    except (KeyError, ValueError):
        raise BitsError(
            hresult.BG_E_UNKNOWN_PROPERTY_ID, f"unknown {what} property {name!r}"
        ) from None


def cmd_setproperty(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    job = find_job(m, args.job)
    prop = _property(JobPropertyId, args.property, "job")
    raw = args.value
    value: Any = {"true": True, "false": False, "null": None}.get(raw.lower())
    if raw.lower() not in ("true", "false", "null"):
        value = _integer(raw, f"{raw!r} is not a number, true, false or null")
    job.set_property(prop, value)
    return EXIT_OK


def cmd_getfileproperty(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    """IBackgroundCopyFile5::GetProperty: HTTP_RESPONSE_HEADERS prints the header block of
    the file's last response, one header a line (nothing before its first response)."""
    job = find_job(m, args.job)
    prop = _property(FilePropertyId, args.property, "file")
    value = job.get_file_property(args.index, prop)
    if value is not None:
        out.write("".join(f"{line}\n" for line in value.split("\r\n") if line))
    return EXIT_OK


def cmd_setbandwidth(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    """Replace the limits of one scope (global or a priority) with the given ones."""
    from backhaul.core.bandwidth import BandwidthPolicy, Limit, parse_rate, parse_window

    limits = []
    for spec in args.limits:
        rate, _, window = spec.partition("@")
        limits.append(Limit(parse_rate(rate), parse_window(window) if window else None))
    current = m.settings().bandwidth
    if args.priority is None:
        policy = BandwidthPolicy(tuple(limits), current.priority_limits)
    else:
        if args.priority is JobPriority.FOREGROUND:
            raise BitsError(hresult.E_INVALIDARG, "FOREGROUND jobs are never throttled")
        per = dict(current.priority_limits)
        per[int(args.priority)] = tuple(limits)
        policy = BandwidthPolicy(current.global_limits, per)
    m.set_bandwidth_policy(policy)
    return EXIT_OK


def cmd_getbandwidth(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    settings = m.settings()
    policy = settings.bandwidth
    if args.json:
        data = policy.to_data()  # the stored form keys priorities by number: show their names
        data["priority"] = {JobPriority(int(p)).name: v for p, v in data["priority"].items()}
        _print_json({**data, "network_cost": settings.network_cost}, out)
        return EXIT_OK
    scopes = [("global", policy.global_limits)] + [
        (JobPriority(p).name, limits) for p, limits in sorted(policy.priority_limits.items())
    ]
    for scope, limits in scopes:
        text = ", ".join(
            f"{_fmt_size(x.rate)}/s" + (f" @ {x.window}" if x.window else "") for x in limits
        )
        out.write(f"{scope:>8}: {text or 'unlimited'}\n")
    cost = settings.network_cost
    out.write(f"network cost: {hex(cost) if cost is not None else 'from the system'}\n")
    return EXIT_OK


def cmd_setnetworkcost(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    from backhaul.core.vocabulary import CostFlags

    try:
        value = (
            None
            if args.state.lower() in ("auto", "system")
            else CostFlags.from_bits_names(args.state)
        )
    except ValueError as exc:
        raise BitsError(hresult.E_INVALIDARG, f"{exc} (BITS_COST_STATE_* names, or auto)") from None
    m.set_network_cost(None if value is None else int(value))
    return EXIT_OK


def cmd_setsecretparams(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    """Replace the list; ``none`` alone (any case), or no name, clears it."""
    names = args.names
    if len(names) == 1 and names[0].lower() == "none":
        names = []
    m.set_secret_parameters(names)
    return EXIT_OK


NO_SECRET_PARAMETERS: Final = "no secret parameters"  # no name holds a space: unambiguous


def cmd_getsecretparams(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    """A name a line; an empty list says so (as ``getcustomheaders`` does), where an empty
    output or ``none`` could be read as a parameter named none."""
    names = list(m.settings().secret_parameters)
    if args.json:
        _print_json({"secret_parameters": names}, out)
    else:
        out.write("".join(f"{n}\n" for n in names) if names else f"{NO_SECRET_PARAMETERS}\n")
    return EXIT_OK


def cmd_setmaxrate(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    job = find_job(m, args.job)
    job.max_rate = _max_rate(args.value)
    return EXIT_OK


def _max_rate(text: str | None) -> str | None:
    """A rate as ``setmaxrate`` and ``--max-rate`` take it: 0, none or unlimited (or no
    ``--max-rate``) for none."""
    return None if text is None or text.lower() in ("0", "none", "unlimited") else text


def cmd_transports(args: argparse.Namespace, m: TransferManager | None, out: TextIO) -> int:
    """The installed transports and uploaders: scheme, object, distribution, version."""
    from backhaul.adapters import registry

    rows = registry.installed_rows()
    if args.json:
        keys = [h.lower() for h in registry.HEADER]
        out.write(json.dumps([dict(zip(keys, r, strict=True)) for r in rows], indent=2) + "\n")
    else:
        out.write(registry.format_table(rows))
    return EXIT_OK


GC_YOUNG_THRESHOLD = 20_000  # allocations between young collections (CPython's default: 700)


def tune_gc() -> None:
    """Collect young objects every 20,000 allocations instead of 700. A process holding
    thousands of jobs spent much of its time in the cyclic collector: on 10,000 one-file jobs
    in one process, 27 full collections of up to 0.5 s each, 6.4-6.8 s in all (create, run,
    Complete; benchmarks/RESULTS-download.md run 8). The older generations keep their ratios
    (and CPython's rule that a full collection waits for a quarter more long-lived objects), so
    cyclic garbage is still collected, only in bigger batches."""
    young, middle, old = gc.get_threshold()
    gc.set_threshold(max(young, GC_YOUNG_THRESHOLD), middle, old)


def _tune_malloc() -> None:
    """Keep glibc from mapping and unmapping every 1 MiB transfer buffer (about 1 CPU
    second per GiB in a fresh process); harmless where mallopt does not exist."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 128 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def cmd_serve(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    from backhaul.adapters.engine import Engine

    _tune_malloc()
    with _engine_lock(args) as held:
        if not held:
            lock = lock_file(args)
            holder = EngineLock(lock).holder() if lock is not None else "another process"
            raise BitsError(  # the engine's own refusal (Engine.run), printed by main
                hresult.hresult_from_win32(hresult.ERROR_SERVICE_ALREADY_RUNNING),
                f"another engine already runs on the store {m.store.location} ({holder}): "
                "one engine per SQLite store; stop it, or leave the jobs to it",
            )
        worker = worker_name() if _shared_store(args) else None
        engine = Engine(
            m,
            max_background=args.max_background,
            poll_interval=args.poll,
            yield_bandwidth=not args.no_yield,
            worker=worker,
            lease_seconds=args.lease_seconds,
            store_lock=_store_lock(held),
        )
        _with_url_refresher(engine, args)
        who = f" as worker {worker}" if worker else ""
        sys.stderr.write(f"backhaul serve: running jobs of {m.store!r}{who}\n")
        if not args.no_yield:
            from backhaul.adapters.engine import congestion_report

            sys.stderr.write(f"backhaul serve: {congestion_report()}\n")
        with _job_log(quiet=args.quiet):
            asyncio.run(_serve(engine, until_idle=args.until_idle))
    return EXIT_OK


@contextlib.contextmanager
def _job_log(*, quiet: bool) -> Iterator[None]:
    """serve's log on stderr while it runs: a line when a job transfers, fails (for good,
    or for now, with its next try) or ends, with its time; --quiet leaves only the
    warnings. Taken down after (``main`` may run again in the same process)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s backhaul serve: %(message)s", "%Y-%m-%dT%H:%M:%S%z")
    )
    logger = logging.getLogger("backhaul")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def _serve(engine: Any, *, until_idle: bool) -> None:
    loop = asyncio.get_running_loop()
    # SIGHUP too (the terminal it ran in closed): a clean stop keeps what was received. A
    # signal the caller ignores (nohup) stays ignored.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            loop.add_signal_handler(sig, engine.stop)
    await engine.run(until_idle=until_idle)


def cmd_get(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    """Start-BitsTransfer: a foreground job, followed to its end, then completed."""
    _tune_malloc()
    _check_options(args)  # refused before a job is made
    if args.dest == "-":  # curl's and wget's stdout: a job's files are files
        raise UsageError(
            hresult.E_INVALIDARG,
            "get writes files, not standard output: give a path (./- for a file named -)",
        )
    urls, dest = args.urls, Path(_abs(args.dest))
    # os.path: a name too long to look up is "not a directory", not a traceback. Found
    # before any job is made: a command line the verb cannot take (exit 2).
    if args.dest.endswith("/") and not os.path.isdir(dest):
        raise UsageError(hresult.E_INVALIDARG, f"{dest}/ is not a directory")
    if len(urls) > 1 or os.path.isdir(dest):
        if not os.path.isdir(dest):
            raise UsageError(hresult.E_INVALIDARG, f"{dest} must be a directory for several URLs")
        shown = [secrets_of(url)[0] for url in urls]  # no secret in a name
        locals_ = [dest / _name_from_url(url) for url in shown]
    else:
        locals_ = [dest]
    digest = None
    if args.sha256 is not None:
        if not re.fullmatch(r"[0-9a-fA-F]{64}", args.sha256):
            raise UsageError(hresult.E_INVALIDARG, "--sha256 wants the 64 hex digits of a SHA-256")
        digest = f"sha256:{args.sha256.lower()}"
    ranges = _curl_ranges(args.range) if args.range is not None else ()
    if ranges and len(urls) > 1:
        raise UsageError(hresult.E_INVALIDARG, "--range applies to one URL")
    specs = [FileSpec(u, str(p), ranges, digest) for u, p in zip(urls, locals_, strict=True)]
    earlier = _unfinished(m, args, JobType.DOWNLOAD, specs, dynamic=args.dynamic)
    if earlier is not None:
        return _transfer(earlier, m, args, out)
    job = m.create_job(args.name or _default_name("get", urls[0]))

    def add() -> None:
        job.description = _made_by(args.verb)
        if args.dynamic:
            job.set_property(JobPropertyId.DYNAMIC_CONTENT, True)
        job.add_files(specs)

    _set_up(job, args, add)
    return _transfer(job, m, args, out)


def _default_name(verb: str, url: str) -> str:
    """A job's display name when ``--name`` gives none: the verb and the URL (without its
    secrets), cut to the 256 characters a display name holds (a URL may have 2,200)."""
    name = f"{verb} {secrets_of(url)[0]}"
    return name if len(name) <= DISPLAY_NAME_MAX else name[: DISPLAY_NAME_MAX - 3] + "..."


def _curl_ranges(text: str) -> tuple[ByteRange, ...]:
    """curl's ``-r`` form: ``START-END`` (END included) or ``START-`` (to the end of the
    file), comma-separated. The file is those ranges one after the other (AddFileWithRanges).
    curl's ``-N`` (the last N bytes) needs the size, which a job learns only later."""
    ranges = []
    for item in text.split(","):
        start, dash, end = item.strip().partition("-")
        if not dash or not start.isdigit() or not (end.isdigit() or not end):
            raise UsageError(
                hresult.E_INVALIDARG,
                f"bad range {item.strip()!r}: want START-END or START- (the last N bytes, "
                "-N, need the size: give START-)",
            )
        if end and int(end) < int(start):
            raise UsageError(hresult.E_INVALIDARG, f"range {item.strip()!r} ends before it starts")
        ranges.append(ByteRange(int(start), int(end) - int(start) + 1 if end else None))
    return tuple(ranges)


def _name_from_url(url: str) -> str:
    """The file name ``get URL... DIR`` gives a URL, as wget does: the last segment of its
    path, percent-decoded, without the query or the fragment (a signed URL's signature is
    no part of a name); ``index.html`` for a directory's URL."""
    raw = urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1]
    try:
        name = urllib.parse.unquote(raw, errors="strict")
    except UnicodeDecodeError:  # not UTF-8 (%FF): kept as written, as curl -O keeps it
        name = raw
    if "/" in name or "\0" in name:
        name = raw  # an encoded slash names no directory here
    return "index.html" if name in ("", ".", "..") else name


def cmd_put(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    """Start-BitsTransfer -TransferType Upload: LOCAL to URL by the BITS upload protocol, as
    a foreground job followed to its end, then completed; with ``--reply FILE``, an
    upload-reply job whose reply Complete puts in FILE."""
    _check_options(args)  # refused before a job is made
    local = _abs(args.local)
    kind = JobType.UPLOAD if args.reply is None else JobType.UPLOAD_REPLY
    reply = None if args.reply is None else _abs(args.reply)
    earlier = _unfinished(m, args, kind, [FileSpec(args.url, local)], reply=reply)
    if earlier is not None:
        return _transfer(earlier, m, args, out)
    job = m.create_job(args.name or _default_name("put", args.url), kind)

    def add() -> None:
        job.description = _made_by(args.verb)
        job.add_file(args.url, local)
        if reply is not None:
            job.reply_file_name = reply

    _set_up(job, args, add)
    return _transfer(job, m, args, out)


def cmd_transfer(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    """bitsadmin /transfer NAME [/download|/upload] [/priority P] REMOTE LOCAL...: create
    the job, add the pairs, resume, wait; complete it when transferred, cancel it when it
    failed for good (transient errors are waited out, as bitsadmin does)."""
    _check_options(args)  # refused before a job is made
    pairs = args.pairs
    if not pairs or len(pairs) % 2:
        raise UsageError(hresult.E_INVALIDARG, "give REMOTE LOCAL pairs")
    kind = JobType.UPLOAD if args.upload else JobType.DOWNLOAD
    files = [FileSpec(pairs[i], _abs(pairs[i + 1])) for i in range(0, len(pairs), 2)]
    job = m.create_job(args.name, kind)
    _set_up(job, args, lambda: job.add_files(files))
    return _transfer(job, m, args, out)


def _set_up(job: TransferJob, args: argparse.Namespace, add: Callable[[], None]) -> None:
    """A new job of ``get``, ``put`` or ``transfer``: the options, then its files
    (``add``); refused, the job is cancelled, so that none is left behind."""
    try:
        _set_options(job, args)
        add()
    except BaseException:
        with contextlib.suppress(BackhaulError):
            job.cancel()
        raise


def _set_options(job: TransferJob, args: argparse.Namespace) -> None:
    """This run's options, on a new job or one picked up (``_unfinished``): without
    ``--max-rate``, the job has no rate of its own."""
    job.priority = args.priority
    if args.retry_delay is not None:
        job.minimum_retry_delay = args.retry_delay
    if args.no_progress_timeout is not None:
        job.no_progress_timeout = args.no_progress_timeout
    if args.max_time is not None:
        job.maximum_download_time = args.max_time
    rate = _max_rate(args.max_rate)
    if rate is not None or job.max_rate is not None:
        job.max_rate = rate
    if args.header:
        job.set_custom_headers(_header_block(args))
    if args.user is not None:
        user, password = _login(args.user)
        for scheme in (AuthScheme.BASIC, AuthScheme.DIGEST):  # whichever the server asks
            job.set_credentials(AuthTarget.SERVER, scheme, user, password)
    bundle = _abs(args.cacert) if args.cacert else None
    if bundle != job.ca_bundle:
        job.ca_bundle = bundle
    flags = int(job.security_flags)
    wanted = flags | _IGNORE_CERTIFICATE if args.insecure else flags & ~_IGNORE_CERTIFICATE
    if wanted != flags:
        job.security_flags = wanted
    if args.proxy is None:
        proxy = ProxySettings(int(ProxyUsage.PRECONFIG))
    elif args.proxy.lower() == "none":
        proxy = ProxySettings(int(ProxyUsage.NO_PROXY))
    else:
        proxy = ProxySettings(int(ProxyUsage.OVERRIDE), args.proxy)
    if proxy != job.proxy_settings:
        job.set_proxy_settings(ProxyUsage(proxy.usage), proxy.proxy_list, proxy.bypass_list)


# curl's -k: every certificate check that BITS's security flags can turn off.
_IGNORE_CERTIFICATE: Final = int(
    SecurityFlags.IGNORE_CERT_CN_INVALID
    | SecurityFlags.IGNORE_CERT_DATE_INVALID
    | SecurityFlags.IGNORE_UNKNOWN_CA
    | SecurityFlags.IGNORE_CERT_WRONG_USAGE
)


def _check_options(args: argparse.Namespace) -> None:
    """The foreground verbs' options that can be refused before a job is made."""
    try:
        args.header = header_lines(args.header)  # read once: @- is stdin
    except OSError as exc:
        raise UsageError(hresult.E_INVALIDARG, f"--header: {exc.strerror}: {exc.filename}") from exc
    _header_block(args)
    if args.user is not None and not args.user.partition(":")[0]:
        raise UsageError(hresult.E_INVALIDARG, "--user wants USER or USER:PASSWORD")
    if args.cacert and not os.path.isfile(_abs(args.cacert)):
        raise UsageError(hresult.E_INVALIDARG, f"--cacert {args.cacert}: no such file")


def _header_block(args: argparse.Namespace) -> str | None:
    """``--header``s as SetCustomHeaders takes them; refused (without echoing a value,
    which may be a token) unless each is 'NAME: VALUE' on one line."""
    if not args.header:
        return None
    for header in args.header:
        name, colon, _ = header.partition(":")
        if not colon or not name.strip() or any(c in header for c in "\r\n"):
            raise UsageError(hresult.E_INVALIDARG, "--header wants 'NAME: VALUE'")
    check_custom_header_names(args.header)
    return "".join(f"{h}\r\n" for h in args.header)


def _login(text: str) -> tuple[str, str]:
    """``--user USER[:PASSWORD]``: without the password, ask for it (no echo on a
    terminal; otherwise the first line of stdin, for scripts)."""
    user, colon, password = text.partition(":")  # a USER checked by _check_options
    if colon:
        return user, password
    if sys.stdin is None:
        return user, ""
    if sys.stdin.isatty():
        import getpass

        return user, getpass.getpass(f"password for {user}: ")
    return user, sys.stdin.readline().rstrip("\r\n")


def _made_by(verb: str) -> str:
    """The description of the jobs ``get`` and ``put`` make (as PowerShell's
    Start-BitsTransfer gives its jobs one): how a rerun knows them."""
    return f"backhaul {verb}: a foreground transfer; rerun the same command to pick it up"


def _unfinished(
    m: TransferManager,
    args: argparse.Namespace,
    kind: JobType,
    specs: Sequence[FileSpec],
    *,
    dynamic: bool = False,
    reply: str | None = None,
) -> TransferJob | None:
    """The job an earlier ``get`` or ``put`` of the same files left unfinished (its process
    was killed, its terminal closed): this one picks it up from its last checkpoint, as
    ``wget -c`` and aria2c resume, instead of fetching everything again in a new job beside
    it. The same files means the same remote names (as recorded), local names, ranges and
    expected digests, in order, and the same dynamic-content flag and reply file; the job
    is one of the caller's, made by the same verb (its description), not final: a job an
    application or ``create`` made is never taken. ``--new`` always makes a new job. The
    picked-up job takes this command's options, and a download URL's password or signature
    given now (a refreshed one) replaces the recorded one. With ``--new`` the job found is
    cancelled (its temp files deleted) and a new one made: a later run without ``--new``
    would otherwise pick the old one up and publish it over the new one's files."""
    wanted = [
        (secrets_of(s.remote_name)[0], s.local_name, s.ranges, s.expected_digest) for s in specs
    ]
    m.refresh_views()
    for row in m.store.views.select(m.owner, include_final=False):
        if row.job_type != int(kind) or row.files_total != len(wanted):
            continue  # from the read model's row: no job is loaded for nothing
        handle = m.get_job(row.job_id)
        job = handle.snapshot()
        if (
            job.description != _made_by(args.verb)
            or job.is_final
            or job.dynamic_content != dynamic
            or (reply is not None and job.reply_file_name != reply)
        ):
            continue
        files = [
            (f.spec.remote_name, f.spec.local_name, f.spec.ranges, f.spec.expected_digest)
            for f in job.files
        ]
        if files != wanted:
            continue
        if args.new:
            handle.cancel()
            if not (args.quiet or args.json):
                sys.stderr.write(
                    f"backhaul {args.verb}: --new: cancelled job {job.id}, which an earlier "
                    f"{args.verb} of the same files left {job.state.name}\n"
                )
            continue
        _set_options(handle, args)
        if kind is JobType.DOWNLOAD:
            for index, spec in enumerate(specs):
                if spec.remote_name != wanted[index][0]:  # a secret given afresh
                    handle.set_remote_name(index, spec.remote_name)
        if not (args.quiet or args.json):
            kept = sum(f.bytes_transferred for f in job.files)
            sys.stderr.write(
                f"backhaul {args.verb}: picking up job {job.id}, which an earlier "
                f"{args.verb} of the same files left {job.state.name} "
                f"({_fmt_size(kept)} kept; --new starts over)\n"
            )
        return handle
    return None


def _transfer(job: TransferJob, m: TransferManager, args: argparse.Namespace, out: TextIO) -> int:
    """``get``, ``put`` and ``transfer``: resume the job, run it (or follow the engine that
    holds the store), then complete it, or cancel it when it failed for good. Interrupted
    (Ctrl-C), ``get`` and ``put`` suspend their job, which the same command picks up again
    (``_unfinished``); ``transfer`` cancels it, as before."""
    job.resume()
    try:
        with _stop_signals():
            state = _run_or_follow(job, m, args, out)
    except (KeyboardInterrupt, _Stopped) as exc:
        code = 128 + exc.signum if isinstance(exc, _Stopped) else EXIT_INTERRUPTED
        if args.verb not in ("get", "put"):
            with contextlib.suppress(BackhaulError):
                job.cancel()
            _tell("\ninterrupted: job cancelled\n")
            return code
        with contextlib.suppress(BackhaulError):
            job.suspend()
        if args.json:  # the last line says how it ended, as every other end does
            with contextlib.suppress(BackhaulError, OSError, ValueError):
                _print_json(_last_line(job), out)
        kept = sum(f.bytes_transferred for f in job.snapshot().files)
        _tell(
            f"\ninterrupted: job {job.id} suspended with {_fmt_size(kept)} kept; the same "
            f"command picks it up (--new starts over), `backhaul cancel {job.id}` drops it\n"
        )
        return code
    return _finish_get(job, state, args, out)


def _run_or_follow(
    job: TransferJob, m: TransferManager, args: argparse.Namespace, out: TextIO
) -> JobState:
    """Run the engine here, or follow the engine that holds the SQLite store (``serve``,
    another ``get``) while it runs. That engine may stop before this job is done (a ``get``
    ends with its own job, ``serve`` is stopped): then this command takes the store's lock
    and runs the job itself. On PostgreSQL, ``--follow`` leaves the job to the workers."""
    shared = _shared_store(args)
    while True:
        with _engine_lock(args) as held:
            if held and not (shared and args.follow):
                return _run_engine(job, m, args, out, _store_lock(held))
            if shared:
                return _follow(job, m, args, out)
        state = _follow(job, m, args, out, engine_gone=lambda: _lock_is_free(args))
        if state is not None:
            return state


def _lock_is_free(args: argparse.Namespace) -> bool:
    """Is no engine holding the SQLite store's lock now?"""
    lock = lock_file(args)
    return lock is None or is_free(lock)


class _Stopped(Exception):
    """SIGTERM or SIGHUP while ``get``, ``put`` or ``transfer`` runs: handled as Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _raise_stopped(signum: int, _frame: object) -> None:
    raise _Stopped(signum)


@contextlib.contextmanager
def _stop_signals() -> Iterator[None]:
    """While a transfer runs here, SIGTERM and SIGHUP stop it as Ctrl-C does (the engine
    stops cleanly, claiming what it received; the job is suspended, or cancelled by
    ``transfer``) instead of killing the process where it stands. Outside the engine's
    loop the signal raises ``_Stopped``; the loop takes it in its own turn
    (``_run_engine``). Only the main thread can take signals: elsewhere, nothing changes."""
    try:
        before = {
            sig: signal.signal(sig, _raise_stopped)
            for sig in _STOP_SIGNALS
            if signal.getsignal(sig) is not signal.SIG_IGN  # nohup: stays ignored
        }
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def _tell(text: str) -> None:
    """A last word on stderr, which a closed terminal (SIGHUP) may have taken away."""
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(text)
        sys.stderr.flush()


def _last_line(job: TransferJob, **more: Any) -> dict[str, Any]:
    """The last ``--json`` line of ``get``, ``put`` and ``transfer``: the progress lines'
    fields, the job's state now, and ``more`` (its result, the error that ended it)."""
    progress = job.progress
    return {
        "id": job.id,
        "state": job.state.name,
        "bytes_transferred": progress.bytes_transferred,
        "bytes_total": progress.bytes_total,
        "files_transferred": progress.files_transferred,
        "files_total": progress.files_total,
        **more,
    }


def _finish_get(job: TransferJob, state: JobState, args: argparse.Namespace, out: TextIO) -> int:
    if state in (JobState.TRANSFERRED, JobState.ACKNOWLEDGED):
        # ACKNOWLEDGED: the same job picked up by two commands at once, the other completed
        try:
            result = job.complete() if state is JobState.TRANSFERRED else hresult.S_OK
        except BitsError as exc:  # a destination directory removed meanwhile, say
            if args.json:
                refusal = {"context": None, "hresult": hresult.format_hresult(exc.hresult)}
                refusal |= {"name": hresult.name_of(exc.hresult), "description": exc.message}
                _print_json(_last_line(job, error=refusal), out)
            sys.stderr.write(
                f"\nbackhaul {args.verb}: Complete failed: {exc}\njob {job.id} stays "
                f"{job.state.name}: `backhaul complete {job.id}` tries again (the same command "
                f"picks it up too), `backhaul cancel {job.id}` drops it\n"
            )
            return EXIT_FAILED
        if args.json:
            _print_json(_last_line(job, result=hresult.name_of(result)), out)
        elif not args.quiet:
            if job.job_type is JobType.DOWNLOAD:
                done = [f.local_name for f in job.files()]
            else:
                done = [f.remote_name for f in job.files()]
                if job.reply_file_name:
                    done.append(f"reply in {job.reply_file_name}")
            sys.stderr.write(f"\ncomplete: {', '.join(done)}\n")
        return EXIT_OK
    if state is JobState.CANCELLED:
        if args.json:
            _print_json(_last_line(job), out)
        sys.stderr.write(
            f"\nbackhaul {args.verb}: job {job.id} was cancelled by another command or "
            "application\n"
        )
        return EXIT_CANCELLED
    error = job.error
    message = _error_text(error) if error else state.name
    kept = _end_failed(job, args.verb)
    if args.json:  # the error as every line (and ``info --json``) gives it
        shown = _error_json(error) if error else None
        _print_json(_last_line(job, error=shown), out)
    hint = _HINTS.get(error.hresult, {}).get(args.verb, "") if error else ""
    sys.stderr.write(
        f"\nbackhaul {args.verb}: job {job.id} ended in {state.name}: {message}{hint}\n"
    )
    if kept:
        sys.stderr.write(f"kept, complete: {', '.join(kept)}\n")
    return EXIT_FAILED


def _end_failed(job: TransferJob, verb: str) -> list[str]:
    """A job that failed for good. ``get`` keeps the files that arrived whole, as curl and
    wget keep every URL that succeeded: Complete publishes them (BG_S_PARTIAL_COMPLETE)
    and deletes the rest. Otherwise (nothing whole, an upload, ``transfer`` as bitsadmin
    /transfer) the job is cancelled, nothing left behind. Returns the files kept."""
    if verb == "get" and job.job_type is JobType.DOWNLOAD:
        whole = [f.local_name for f in job.snapshot().files if f.transferred]
        if whole:
            try:
                job.complete()
            except BackhaulError as exc:  # left as a failed Complete leaves it, not cancelled
                sys.stderr.write(
                    f"\nbackhaul {verb}: Complete failed: {exc}\njob {job.id} stays "
                    f"{job.state.name}: `backhaul complete {job.id}` tries again\n"
                )
                return []
            return whole
    with contextlib.suppress(BackhaulError):
        job.cancel()
    return []


# What the command's user can do about an error whose description speaks the API's words.
_NO_BITS_UPLOADS = (
    " (the server does not take BITS uploads (BITS_POST): it needs the BITS upload protocol, "
    "as IIS's BITS server extension or `backhaul upload-server` speak it)"
)
_HINTS: dict[int, dict[str, str]] = {
    hresult.BG_E_MISSING_FILE_SIZE: {"get": " (backhaul get --dynamic)"},
    hresult.BG_E_HTTP_ERROR_405: {"put": _NO_BITS_UPLOADS},
    hresult.BG_E_HTTP_ERROR_501: {"put": _NO_BITS_UPLOADS},
    hresult.hresult_from_win32(hresult.ERROR_WINHTTP_SECURE_FAILURE): dict.fromkeys(
        ("get", "put"), " (--cacert FILE trusts the CAs in FILE; -k skips the checks)"
    ),
}


_LIMITS = (
    hresult.BG_E_TOO_MANY_FILES_IN_JOB,
    hresult.BG_E_TOO_MANY_JOBS_PER_USER,
    hresult.BG_E_TOO_MANY_JOBS_PER_MACHINE,
    hresult.BG_E_TOO_MANY_RANGES_IN_FILE,
)

_DONE = (JobState.TRANSFERRED, JobState.ERROR, JobState.CANCELLED, JobState.ACKNOWLEDGED)


def _run_engine(
    job: TransferJob,
    m: TransferManager,
    args: argparse.Namespace,
    out: TextIO,
    store_lock: EngineLock | None,
) -> JobState:
    from backhaul.adapters.engine import Engine

    engine = Engine(
        m,
        poll_interval=0.1,
        yield_bandwidth=not args.no_yield,
        worker=worker_name() if _shared_store(args) else None,
        store_lock=store_lock,
    )
    _with_url_refresher(engine, args)
    reporter = _Reporter(job, args, out, engine)

    async def main() -> JobState:
        stopped: list[int] = []
        loop = asyncio.get_running_loop()
        taken = _take_stop_signals(loop, lambda sig: (stopped.append(sig), engine.stop()))
        task = asyncio.create_task(engine.run())
        try:
            while True:
                await asyncio.sleep(0.05)
                if stopped:
                    raise _Stopped(stopped[0])  # the engine stops below, cleanly
                # The engine's own copy while it holds the job: no store read on its loop.
                snap = engine.current(job.id) or m._load(job.id)
                reporter.show(snap)
                if snap.state in _DONE:
                    return snap.state
                if task.done():
                    task.result()
                    return snap.state
        finally:
            engine.stop()
            await task
            _give_back_stop_signals(loop, taken)

    return asyncio.run(main())


def _take_stop_signals(
    loop: asyncio.AbstractEventLoop, on_stop: Callable[[int], object]
) -> dict[int, Any]:
    """The engine's loop takes SIGTERM and SIGHUP in its own turn (a handler raising in
    the middle of a callback could leave a transfer half-recorded): the handlers it
    replaced, for ``_give_back_stop_signals``."""
    taken: dict[int, Any] = {}
    for sig in _STOP_SIGNALS:
        before = signal.getsignal(sig)
        if before is signal.SIG_IGN:
            continue  # nohup: the caller wants it ignored
        try:
            loop.add_signal_handler(sig, on_stop, int(sig))
        except (ValueError, RuntimeError, NotImplementedError):
            continue  # not the main thread, or no signals on this loop
        taken[sig] = before
    return taken


def _give_back_stop_signals(loop: asyncio.AbstractEventLoop, taken: dict[int, Any]) -> None:
    for sig, before in taken.items():
        loop.remove_signal_handler(sig)  # it leaves SIG_DFL behind: put back what was there
        if before is not None:
            signal.signal(sig, before)


def _follow(
    job: TransferJob,
    m: TransferManager,
    args: argparse.Namespace,
    out: TextIO,
    *,
    engine_gone: Callable[[], bool] | None = None,
) -> JobState | None:
    """Another engine (``backhaul serve``) runs the job: watch it through the log. None
    once ``engine_gone`` says that engine stopped with the job still to do."""
    reporter = _Reporter(job, args, out, None)
    while True:
        snap = m._load(job.id)
        reporter.show(snap)
        if snap.state in _DONE:
            return snap.state
        if engine_gone is not None and engine_gone():
            snap = m._load(job.id)  # it may have finished the job as it stopped
            if snap.state in _DONE:
                reporter.show(snap)
                return snap.state
            return None
        time.sleep(0.25)


_LOG_LINE_EVERY = 10.0  # seconds between two progress lines when stderr is no terminal


class _Reporter:
    """The live progress bar (stderr), or JSON progress lines (stdout) with --json."""

    def __init__(
        self, job: TransferJob, args: argparse.Namespace, out: TextIO, engine: Any
    ) -> None:
        self.job, self.args, self.out, self.engine = job, args, out, engine
        self.start = time.monotonic()
        self.last = 0.0
        self.base: int | None = None  # bytes a picked-up job had before this run
        self.told: tuple[object, ...] | None = None  # the transient error last shown
        # Not a terminal (a log file, a pipe): a line now and then, not 20 redraws a second.
        try:
            self.redraw = sys.stderr.isatty()
        except (AttributeError, ValueError):
            self.redraw = False
        self.logged: tuple[float, JobState] | None = None

    def show(self, snap: Any) -> None:
        done = sum(f.bytes_transferred for f in snap.files)
        sizes = [f.bytes_total for f in snap.files]
        state = snap.state
        if self.engine is not None:  # what the engine holds that the log does not show yet
            for i in range(len(snap.files)):
                live = self.engine.live_progress.get((snap.id, i))
                if live is not None:
                    done += max(live - snap.files[i].bytes_transferred, 0)
                if sizes[i] is None:
                    sizes[i] = self.engine.live_sizes.get((snap.id, i))
        total = None if None in sizes else sum(s for s in sizes if s is not None)
        now = time.monotonic()
        if self.base is None:
            self.base = done
        rate = max(done - self.base, 0) / max(now - self.start, 1e-6)  # this run's bytes
        failing = state is JobState.TRANSIENT_ERROR and snap.error is not None
        waiting = why_waiting(snap, self.job._manager.clock.now()) if failing else None
        if self.args.json:
            if now - self.last >= 0.5 or state in _DONE:
                line: dict[str, Any] = {
                    "id": snap.id,
                    "state": state.name,
                    "bytes_transferred": done,
                    "bytes_total": total,
                    "files_transferred": snap.files_transferred,
                    "files_total": len(snap.files),
                }
                if failing:
                    line["error"] = _error_json(snap.error)
                    line["waiting"] = waiting[0] if waiting else None
                    line["next_try"] = waiting[1].isoformat() if waiting and waiting[1] else None
                _print_json(line, self.out)
                self.last = now
            return
        if self.args.quiet:
            return
        if failing:
            self._tell_transient(snap, waiting)
        if not self.redraw:
            if self.logged is not None and (
                self.logged[1] is state and now - self.logged[0] < _LOG_LINE_EVERY
            ):
                return
            self.logged = (now, state)
        width = 30
        frac = (done / total) if total else 0.0
        bar = "#" * int(frac * width)
        pct = f"{frac * 100:5.1f}%" if total else "  ?  "
        line = (
            f"[{bar:<{width}}] {pct} {_fmt_size(done)}/{_fmt_size(total)} "
            f"{_fmt_size(int(rate))}/s {state.name:<15}"
        )
        sys.stderr.write(f"\r{line}" if self.redraw else f"{line.rstrip()}\n")
        sys.stderr.flush()

    def _tell_transient(self, snap: Any, waiting: tuple[str, datetime | None] | None) -> None:
        """A transient error, once per error (as wget says why it retries): what failed
        and when the job tries again, which the bar alone does not show."""
        error = snap.error
        seen = (snap.error_count, error.hresult, error.description, snap.blocked_by)
        if seen == self.told:
            return
        self.told = seen
        why = f"{one_line(error.description)} [{hresult.name_of(error.hresult)} "
        why += f"{hresult.format_hresult(error.hresult)}]"
        then = ""
        if waiting is not None:
            then = f"; {waiting[0]}"
            if waiting[1] is not None:
                wait = (waiting[1] - self.job._manager.clock.now()).total_seconds()
                then += f" at {waiting[1].astimezone():%H:%M:%S} (in {max(wait, 0):.0f} s)"
        sys.stderr.write(f"\ntransient error: {why}{then}; Ctrl-C suspends the job\n")


def cmd_monitor(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    """A live table of jobs with their current rates (bitsadmin /monitor); ``--count N``
    stops after N refreshes. Rates are measured between refreshes from the log."""
    n = 0
    seen: dict[str, tuple[float, int]] = {}
    try:
        while args.count is None or n < args.count:
            rows = [job_info(j) for j in m.jobs(all_owners=args.all)]
            now = time.monotonic()
            out.write("\x1b[2J\x1b[H" if out.isatty() else "")
            out.write(
                f"{'ID':<36}  {'STATE':<15} {'PRIORITY':<10} {'FILES':>7} {'BYTES':>22} "
                f"{'RATE':>12}  NAME / WAITING FOR\n"
            )
            for r in rows:
                files = f"{r['files_transferred']}/{r['files_total']}"
                size = f"{_fmt_size(r['bytes_transferred'])}/{_fmt_size(r['bytes_total'])}"
                before = seen.get(r["id"])
                rate = "-"
                if before is not None and now > before[0]:
                    rate = _fmt_size(int((r["bytes_transferred"] - before[1]) / (now - before[0])))
                    rate += "/s"
                seen[r["id"]] = (now, r["bytes_transferred"])
                note = one_line(r["display_name"]) + (f"  [{r['waiting']}]" if r["waiting"] else "")
                out.write(
                    f"{r['id']:<36}  {r['state']:<15} {r['priority']:<10} {files:>7} "
                    f"{size:>22} {rate:>12}  {note}\n"
                )
            out.flush()
            n += 1
            if args.count is None or n < args.count:
                time.sleep(args.interval)
    except KeyboardInterrupt:
        pass
    return EXIT_OK


# -- parser ----------------------------------------------------------------------------------


def _foreground_options(parser: argparse.ArgumentParser, *, name: bool = True) -> None:
    """The options of the verbs that run one job to its end (``get``, ``put``,
    ``transfer``, which names its job without ``--name``)."""
    parser.add_argument("--json", action="store_true", help="JSON progress lines on stdout")
    parser.add_argument(
        "--follow",
        action="store_true",
        help="PostgreSQL store: leave the job to the running workers and follow it",
    )
    parser.add_argument("--quiet", "-q", action="store_true")
    parser.add_argument("--priority", type=_priority, default=JobPriority.FOREGROUND)
    if name:
        parser.add_argument("--name")
    parser.add_argument("--retry-delay", type=seconds_arg, help="MinimumRetryDelay in seconds")
    parser.add_argument(
        "--no-progress-timeout", type=seconds_arg, help="NoProgressTimeout in seconds"
    )
    parser.add_argument(
        "--max-time",
        type=seconds_arg,
        metavar="SECONDS",
        help="MaximumDownloadTime: fail (BG_E_MAXDOWNLOAD_TIMEOUT) after this long connecting "
        "and transferring (curl's -m; the default is 90 days)",
    )
    parser.add_argument(
        "--max-rate",
        metavar="RATE",
        help="the job's own maximum rate, e.g. 500k or 2MiB (curl's --limit-rate; setmaxrate)",
    )
    parser.add_argument(
        "--no-yield", action="store_true", help="a background --priority does not yield"
    )
    parser.add_argument(
        "--header",
        "-H",
        action="append",
        metavar="'NAME: VALUE'",
        help="a header sent with every request (curl's -H; repeat it; SetCustomHeaders, "
        "sealed in the log); @FILE (@- for stdin) reads header lines from a file, keeping a "
        "token out of the command line",
    )
    parser.add_argument(
        "--user",
        "-u",
        metavar="USER[:PASSWORD]",
        help="the server's login (curl's -u), answering Basic and Digest challenges; without "
        ":PASSWORD it is asked for (read from stdin when that is no terminal)",
    )
    parser.add_argument(
        "--cacert",
        metavar="FILE",
        help="trust the CAs in this PEM file instead of the system's (curl's --cacert; the "
        "ca_bundle property)",
    )
    parser.add_argument(
        "--insecure",
        "-k",
        action="store_true",
        help="HTTPS without certificate checks (curl's -k; the BG_SSL_IGNORE_* security flags)",
    )
    parser.add_argument(
        "--proxy",
        "-x",
        metavar="[SCHEME://]HOST[:PORT]",
        help="this proxy, not the environment's (curl's -x; SetProxySettings OVERRIDE); "
        "none: no proxy",
    )
    if name:  # get and put: a rerun picks up the job an earlier one left unfinished
        parser.add_argument(
            "--new",
            action="store_true",
            help="start over: cancel the job an earlier run of the same files left unfinished "
            "(its temp files deleted) and make a new one",
        )


def _url_refresher_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url-refresher",
        metavar="COMMAND",
        type=shlex.split,
        help="program (and arguments; no shell) asked for a new URL when a server refuses one "
        "with 401, 403 or 410: JSON on its stdin, the new URL on its stdout",
    )


def _with_url_refresher(engine: Engine, args: argparse.Namespace) -> None:
    if args.url_refresher:
        from backhaul.adapters.engine import command_refresher

        engine.set_url_refresher(command_refresher(args.url_refresher))


class _Version(argparse.Action):
    """``--version``: the installed distribution's version on stdout (looked up only when
    asked: the metadata lookup is not free)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print backhaul's version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        from importlib.metadata import version

        sys.stdout.write(f"backhaul {version('backhaul')}\n")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="backhaul", description="Background, resumable transfers (the BITS job model)."
    )
    p.add_argument("--version", action=_Version)
    p.add_argument("--home", help="backhaul home for the SQLite store (default $BACKHAUL_HOME)")
    p.add_argument("--store", help="store URL (default $BACKHAUL_STORE, else SQLite in the home)")
    p.add_argument(
        "--unlimited",
        action="store_true",
        help=f"lift BITS's per-job file limit ({DEFAULT_LIMITS.max_files_per_job}) and "
        f"per-owner job limit ({DEFAULT_LIMITS.max_jobs_per_owner}), and with them the "
        f"{DEFAULT_LIMITS.max_jobs} jobs per store and {DEFAULT_LIMITS.max_ranges_per_file} "
        "ranges per file (default: $BACKHAUL_UNLIMITED=1)",
    )
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(
        name: str, func: Callable[..., int], help_: str, job: bool = True
    ) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        if job:
            sp.add_argument("job", help="job id, id prefix or display name")
        sp.set_defaults(func=func)
        return sp

    g = verb(
        "get",
        cmd_get,
        "download URL(s) to DEST as a foreground job and wait (Start-BitsTransfer)",
        job=False,
    )
    g.add_argument("urls", nargs="+", metavar="URL")
    g.add_argument("dest", metavar="DEST", help="a file, or a directory for the URLs' names")
    _foreground_options(g)
    g.add_argument("--sha256", help="expected SHA-256 of the (single) file")
    g.add_argument("--dynamic", action="store_true", help="content without size or ranges")
    g.add_argument(
        "--range",
        "-r",
        metavar="START-END[,...]",
        help="only these bytes, one range after the other (curl's -r syntax; START- to the end; "
        "a range past the end of the file is BG_E_INVALID_RANGE, BITS's rule)",
    )
    _url_refresher_option(g)

    pu = verb(
        "put",
        cmd_put,
        "upload LOCAL to URL (BITS upload protocol) as a foreground job and wait",
        job=False,
    )
    pu.add_argument("local")
    pu.add_argument("url")
    pu.add_argument("--reply", metavar="FILE", help="upload-reply: put the server's reply here")
    _foreground_options(pu)
    _url_refresher_option(pu)

    tr = verb(
        "transfer",
        cmd_transfer,
        "bitsadmin /transfer: create, add REMOTE LOCAL pairs, resume and wait",
        job=False,
    )
    tr.add_argument("name")
    tr.add_argument("pairs", nargs="+", metavar="REMOTE LOCAL")
    direction = tr.add_mutually_exclusive_group()
    direction.add_argument("--download", action="store_true", help="the default")
    direction.add_argument("--upload", action="store_true", help="one pair: LOCAL to REMOTE")
    _foreground_options(tr, name=False)
    tr.set_defaults(url_refresher=None)

    c = verb("create", cmd_create, "create a suspended job; prints its id", job=False)
    c.add_argument("name")
    c.add_argument("--type", choices=sorted(_TYPES), default="download")
    c.add_argument("--priority", type=_priority)

    a = verb("addfile", cmd_addfile, "add a file to a job")
    a.add_argument("remote")
    a.add_argument("local")
    a.add_argument("--sha256")
    af = verb(
        "addfileset",
        cmd_addfileset,
        "add the 'REMOTE LOCAL' pairs of a list file (one a line; quote names with spaces)",
    )
    af.add_argument("listfile")
    ar = verb(
        "addfilewithranges",
        cmd_addfilewithranges,
        "add the byte ranges of a remote file (offset:length,..., eof for to the end)",
    )
    ar.add_argument("remote")
    ar.add_argument("local")
    ar.add_argument("ranges", help="offset:length[,offset:length...]; length eof: to the end")
    sr = verb("setremotename", cmd_setremotename, "give a file of a job a new remote name")
    sr.add_argument("index", type=int, help="the file, from 0 (as 'files' lists them)")
    sr.add_argument("remote")
    rp = verb(
        "replaceremoteprefix",
        cmd_replaceremoteprefix,
        "replace the start of the job's remote names (prints S_FALSE if none matched)",
    )
    rp.add_argument("old")
    rp.add_argument("new")
    for name in ("resume", "suspend", "cancel", "complete"):
        verb(name, _state_verb(name), f"{name} a job")
    verb("takeownership", cmd_takeownership, "make a job yours (root only)")
    rs = verb("reset", cmd_reset, "cancel all your jobs", job=False)
    rs.add_argument("--all", action="store_true", help="every user's jobs (root only)")
    i = verb("info", cmd_info, "show a job")
    i.add_argument("--json", action="store_true")
    i.add_argument("--include-final", action="store_true")
    lst = verb("list", cmd_list, "list jobs", job=False)
    lst.add_argument("--json", action="store_true")
    lst.add_argument("--all", action="store_true", help="every owner's jobs (root only)")
    lst.add_argument("--include-final", action="store_true")
    for name in ("files", "listfiles"):  # listfiles: bitsadmin's name
        f = verb(name, cmd_files, "list a job's files")
        f.add_argument("--json", action="store_true")
        f.add_argument("--include-final", action="store_true", help="completed or cancelled too")
    verb("geterror", cmd_geterror, "the job's error (GetError)")
    ge = verb(
        "geterrordescription",
        cmd_geterrordescription,
        "what an HRESULT means (a name, or a number such as 0x80190194)",
        job=False,
    )
    ge.add_argument("hresult")
    ge.set_defaults(needs_store=False)  # a lookup: opens no store
    tn = verb("gettemporaryname", cmd_gettemporaryname, "file INDEX's temp file")
    tn.add_argument("index", type=int)
    rq = verb(
        "requestfileranges",
        cmd_requestfileranges,
        "on-demand job: ranges of file INDEX to fetch (offset:length,..., eof to the end)",
    )
    rq.add_argument("index", type=int)
    rq.add_argument("ranges")
    up = verb("updatedownloadposition", cmd_updatedownloadposition, "fill ranges from OFFSET")
    up.add_argument("index", type=int)
    up.add_argument("offset", type=int)
    fr = verb("getfilledfileranges", cmd_getfilledfileranges, "the ranges file INDEX holds")
    fr.add_argument("index", type=int)
    sv = verb(
        "setvalidationstate",
        cmd_setvalidationstate,
        "accept (true) or reject (false) transferred file INDEX; a rejected file is fetched "
        "again after resume",
    )
    sv.add_argument("index", type=int)
    sv.add_argument("state", type=str.lower, choices=("true", "false"))
    gv = verb("getvalidationstate", cmd_getvalidationstate, "whether file INDEX was accepted")
    gv.add_argument("index", type=int)
    verb("setaclflag", cmd_setaclflag, "ACL parts kept from SMB (letters of OGDS)").add_argument(
        "flags"
    )
    verb("setreplyfilename", cmd_setreplyfilename, "where Complete puts the reply").add_argument(
        "path"
    )
    verb("getreplyprogress", cmd_getreplyprogress, "the reply's bytes so far")
    verb("getreplydata", cmd_getreplydata, "the server's reply (upload-reply jobs)")
    for name in _SETTERS:
        verb(name, _setter(name), f"{name[3:]}: set it").add_argument("value")
    for name in _GETTERS:
        verb(name, _getter(name), f"{name[3:]}: show it")
    nc = verb(
        "setnotifycmdline",
        cmd_setnotifycmdline,
        "program and arguments run on TRANSFERRED/ERROR (no shell); NULL removes",
    )
    nc.add_argument("argv", nargs=argparse.REMAINDER)
    sp = verb("setproperty", cmd_setproperty, "IBackgroundCopyJob5::SetProperty")
    sp.add_argument("property", help="e.g. DYNAMIC_CONTENT, COST_FLAGS")
    sp.add_argument("value", help="true/false, an integer, or null")
    gf = verb("getfileproperty", cmd_getfileproperty, "IBackgroundCopyFile5::GetProperty")
    gf.add_argument("index", type=int, help="the file's index (see `files`)")
    gf.add_argument("property", help="HTTP_RESPONSE_HEADERS")
    mo = verb("monitor", cmd_monitor, "a live table of jobs", job=False)
    mo.add_argument("--interval", type=interval_arg, default=1.0)
    mo.add_argument("--count", type=int)
    mo.add_argument("--all", action="store_true")
    bw = verb(
        "setbandwidth",
        cmd_setbandwidth,
        "bandwidth limits: RATE[@WINDOW]... for all background jobs or one --priority",
        job=False,
    )
    bw.add_argument(
        "limits",
        nargs="*",
        help="e.g. '0@mon-fri 09:00-17:00' 2MiB: the first whose window holds applies; none: unlimited",
    )
    bw.add_argument("--priority", type=_priority)
    gbw = verb("getbandwidth", cmd_getbandwidth, "show the bandwidth policy", job=False)
    gbw.add_argument("--json", action="store_true")
    nc2 = verb(
        "setnetworkcost",
        cmd_setnetworkcost,
        "declare the network's cost state (e.g. UNRESTRICTED, ROAMING) or 'auto'",
        job=False,
    )
    nc2.add_argument("state")
    verb(
        "setsecretparams",
        cmd_setsecretparams,
        "query parameters whose values never reach the log (besides the built-in signature "
        "names); replaces the list, none clears it",
        job=False,
    ).add_argument("names", nargs="*", metavar="NAME")
    verb(
        "getsecretparams",
        cmd_getsecretparams,
        "list the declared secret query parameters",
        job=False,
    ).add_argument("--json", action="store_true")
    verb(
        "setmaxrate", cmd_setmaxrate, "a job's own maximum rate (e.g. 500k; 0 = none)"
    ).add_argument("value")
    tr = verb(
        "transports",
        cmd_transports,
        "list the installed transports (by URL scheme) and the distribution of each",
        job=False,
    )
    tr.add_argument("--json", action="store_true")
    tr.set_defaults(needs_store=False)  # lists installed metadata; opens no store
    s = verb(
        "serve",
        cmd_serve,
        "run the engine over the store until stopped (SIGINT, SIGTERM, SIGHUP)",
        job=False,
    )
    s.add_argument("--max-background", type=int, default=1)
    s.add_argument(
        "--lease-seconds",
        type=interval_arg,
        default=30.0,
        help="PostgreSQL store: how long a job stays with this worker without a renewal",
    )
    s.add_argument(
        "--no-yield", action="store_true", help="background jobs do not yield to other traffic"
    )
    s.add_argument("--poll", type=interval_arg, default=0.2)
    s.add_argument("--until-idle", action="store_true", help="stop once no job is left to run")
    s.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        help="no line per job (transferred, failed, ended); warnings only",
    )
    _url_refresher_option(s)
    from backhaul.adapters.cli_http import add_http_verbs

    add_http_verbs(sub, verb)
    from backhaul.adapters.cli_upload import add_upload_verbs

    add_upload_verbs(sub, verb)
    add_audit_parser(sub)
    return p


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    tune_gc()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return EXIT_USAGE if exc.code else EXIT_OK
    try:
        if not getattr(args, "needs_store", True):
            code = int(args.func(args, None, out))
        else:
            with _manager(args) as manager:
                try:
                    code = int(args.func(args, manager, out))
                except STORE_ERRORS as exc:  # an append or read outside the manager's calls
                    raise manager.store.failure(exc) from exc
        out.flush()  # here, where a reader that left (EPIPE) is caught below
        return code
    except BackhaulError as exc:
        hint = " (--unlimited lifts BITS's limits)" if exc.hresult in _LIMITS else ""
        sys.stderr.write(f"backhaul {args.verb}: {exc}{hint}\n")
        return EXIT_USAGE if isinstance(exc, UsageError) else EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `backhaul list | head`: the reader left. As cat does: no traceback, no word, and
        # no second error when Python flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except OSError as exc:  # a file the verb was given (audit export DIR/x, import FILE)
        # With its HRESULT, as addfileset prints a list file it cannot read.
        where = f"{exc.filename}: " if exc.filename else ""
        refusal = BitsError(os_hresult(exc), f"{where}{exc.strerror or exc}")
        sys.stderr.write(f"backhaul {args.verb}: {refusal}\n")
        return EXIT_FAILED


__all__ = ["NotifyFlags", "main"]
