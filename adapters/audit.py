"""Replay and audit tools over the event log: history, state at a time, export/import,
rebuild and verify. The ``backhaul audit`` verbs (adapters/cli_audit.py) print these.

- ``history(store, job_id)``: every event of a job's stream with the state it led to.
- ``state_at(store, job_id, at=..., version=...)``: the job as it was then (a fold of
  the stream's prefix).
- ``export(store, out)`` / ``import_(store, in_)``: the whole log as JSON lines
  (specs/event-log.md), and back into an EMPTY store with the very same stored states;
  the import checks the whole file (chains, versions, counts, that every stream replays)
  before writing anything, then writes it in one transaction.
- ``rebuild(store)``: drop the read models and fold the log again.
- ``verify(store)``: the hash chain and the versions of every stream, and the read models
  against a fresh fold; a list of ``Problem`` (empty: all is well).

Secrets: a ``Sealed`` value prints as ``<redacted>`` in every output here, and a password
inside a URL too; only ``export`` carries the sealed ciphertext (never plain text),
because an import must reproduce the store. These tools work on the whole store: who may
open the store (its file mode, its database credentials) may audit all of it.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import IO, Any, Final
from uuid import UUID

import attrs
from eventsourcing.persistence import StoredEvent

from backhaul.adapters import projection, serialization
from backhaul.adapters.secret import SealedUnreadable
from backhaul.adapters.serialization import chain_hash, event_from_bytes, split_state, utf8
from backhaul.adapters.store import EventStore, stored_bytes
from backhaul.adapters.view import ViewRow
from backhaul.core import event as ev
from backhaul.core import hresult
from backhaul.core import job as jobs
from backhaul.core import projection as proj
from backhaul.core.error import BitsError
from backhaul.core.event import POLICY_STREAM, Event, JobCreated, PolicyChanged
from backhaul.core.job import FileList, Job
from backhaul.core.url import URL_IN_TEXT, one_line, split_url_query, url_with_password
from backhaul.core.value import Sealed
from backhaul.core.vocabulary import AuthScheme, AuthTarget

REDACTED: Final = "<redacted>"
EXPORT_FORMAT: Final = "backhaul.event-log"
EXPORT_FORMAT_VERSION: Final = 1
IMPORT_BATCH: Final = 1000
PAGE: Final = 1000
_FILES_SHOWN: Final = 5  # of an AddFileSet, in a history line

_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/@\s:]*:)[^/@\s]*@")


class AuditError(BitsError):
    """An audit call refused (a bad export file, a non-empty store for an import).
    ``problems`` lists what was found, when there is a list."""

    def __init__(self, code: int, message: str, problems: Iterable[Problem] = ()) -> None:
        self.problems = list(problems)
        shown = "".join(f"\n  {p}" for p in self.problems[:20])
        more = len(self.problems) - 20
        if more > 0:
            shown += f"\n  ... and {more} more"
        super().__init__(code, message + shown)


# -- redaction -----------------------------------------------------------------------------


def redact_text(text: str) -> str:
    """A password in a URL (``scheme://user:password@host``) becomes ``<redacted>``, and so
    does a signed URL's signature (core/url.py): a log written before both were sealed
    (FilesAdded v3) may hold them in its names and messages."""
    text = URL_IN_TEXT.sub(lambda m: split_url_query(m[0])[0], text)
    return _URL_PASSWORD.sub(lambda m: f"{m['head']}{REDACTED}@", text)


def plain(value: Any) -> Any:
    """JSON-ready data for output: attrs classes as dicts, enums by name, datetimes as
    ISO 8601, and every ``Sealed`` value (and URL password) as ``<redacted>``."""
    if isinstance(value, Sealed):
        return REDACTED
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, str):
        return redact_text(value)
    if attrs.has(type(value)):
        return {f.name: plain(getattr(value, f.name)) for f in attrs.fields(type(value))}
    if isinstance(value, list | tuple | FileList):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    return value


def _name(kind: type[enum.IntEnum], value: int) -> str | int:
    try:
        return kind(value).name
    except ValueError:
        return value


def _short(value: Any) -> str:
    return json.dumps(plain(value), ensure_ascii=False, separators=(",", ":"))


# -- history -------------------------------------------------------------------------------


@attrs.frozen
class Entry:
    """One stored event of a stream, decoded, with the job state it led to.

    ``topic`` is the stored topic (an old name stays visible); ``event`` is None and
    ``problem`` says why when the stored state cannot be read."""

    job_id: str
    version: int
    topic: str
    event: Event | None
    state: str | None
    link: str | None
    problem: str | None = None

    @property
    def at(self) -> datetime | None:
        return self.event.at if self.event is not None else None

    @property
    def event_type(self) -> str:
        return type(self.event).__name__ if self.event is not None else self.topic

    def fields(self) -> dict[str, Any]:
        """The event's fields for output (redacted; enums and auth numbers by name)."""
        if self.event is None:
            return {}
        data: dict[str, Any] = plain(self.event)
        data.pop("at", None)
        if isinstance(self.event, ev.CredentialsSet | ev.CredentialsRemoved):
            data["target"] = _name(AuthTarget, self.event.target)
            data["scheme"] = _name(AuthScheme, self.event.scheme)
        return data

    def to_dict(self) -> dict[str, Any]:
        trigger = self.event.trigger_of() if self.event is not None else None
        return {
            "job_id": self.job_id,
            "version": self.version,
            "at": self.at.isoformat() if self.at else None,
            "type": self.event_type,
            "topic": self.topic,
            "trigger": trigger.name if trigger is not None else None,
            "state": self.state,
            "fields": self.fields(),
            "hash": self.link,
            "problem": self.problem,
        }

    def summary(self) -> str:
        """One line: an AddFileSet of 1,000 files shows its first few, not a line of 70 KB."""
        event = self.event
        if event is None:
            return f"!! {self.problem}"
        if isinstance(event, ev.FilesAdded):
            files = plain(event.files)
            parts = []
            for f in files[:_FILES_SHOWN]:
                ranges = f" ranges={_short(f['ranges'])}" if f.get("ranges") else ""
                name = f["remote_name"]
                if f.get("password") is not None:  # sealed: shown where it sat in the URL
                    name = url_with_password(name, REDACTED)
                parts.append(f"{name} -> {f['local_name']}{ranges}")
            more = len(files) - len(parts)
            rest = f"; and {more} more (--json lists them all)" if more else ""
            return f"{len(files)} file(s): " + "; ".join(parts) + rest
        fields = self.fields()
        if isinstance(event, ev.ErrorOccurred):
            error = event.error
            fields.pop("error")
            text = (
                f"{hresult.name_of(error.hresult)} ({hresult.format_hresult(error.hresult)})"
                f" in {plain(error.context)}"
            )
            if error.description:
                text += f": {redact_text(error.description)}"
            rest = " ".join(f"{k}={_short(v)}" for k, v in fields.items())
            return f"{text} {rest}".strip()
        if isinstance(event, JobCreated):
            fields.pop("job_id")
        return " ".join(f"{k}={_short(v)}" for k, v in fields.items())

    def to_text(self) -> str:
        at = self.at.isoformat() if self.at else "?"
        alias = f" (stored as {self.topic})" if self.topic != self.event_type else ""
        return (
            f"{self.version:>5}  {at:<32}  {self.event_type + alias:<26} "
            f"{self.state or '-':<15} {self.summary()}".rstrip()
        )


def _stream_id(job_id: str) -> str:
    try:
        return str(UUID(str(job_id)))
    except ValueError:
        raise BitsError(hresult.BG_E_NOT_FOUND, f"{job_id!r} is not a job id") from None


def _raw_stream(store: EventStore, job_id: str) -> tuple[str, list[StoredEvent]]:
    stream = _stream_id(job_id)
    records = store.raw_stream(stream)
    if not records:
        raise BitsError(hresult.BG_E_NOT_FOUND, f"no job {stream} in {store!r}")
    return stream, records


def history(store: EventStore, job_id: str) -> list[Entry]:
    """Every stored event of the job's stream, in version order, each with the job
    state after it (None where the stream cannot be folded)."""
    stream, records = _raw_stream(store, job_id)
    entries = []
    job: Job | None = None
    foldable = True
    for r in records:
        state = stored_bytes(r.state)
        link: str | None = None
        try:
            link = split_state(state)[2]
            event = event_from_bytes(r.topic, state)
        except Exception as exc:  # any failure to read a stored event is a finding
            entries.append(
                Entry(stream, r.originator_version, r.topic, None, None, link, _why(exc))
            )
            foldable = False
            continue
        if foldable:
            try:
                job = jobs.fold([event], job)
            except Exception:  # a stream that is not a job's, or an impossible step
                foldable, job = False, None
        name = job.state.name if foldable and job is not None else None
        entries.append(Entry(stream, r.originator_version, r.topic, event, name, link))
    return entries


def _why(exc: Exception) -> str:
    return f"cannot read the stored event ({type(exc).__name__}: {exc})"


def history_to_dict(entries: list[Entry]) -> dict[str, Any]:
    return {
        "job_id": entries[0].job_id if entries else None,
        "events": [e.to_dict() for e in entries],
    }


def history_to_text(entries: list[Entry]) -> str:
    if not entries:
        return ""
    first = entries[0].event
    head = f"job {entries[0].job_id}"
    if isinstance(first, JobCreated):
        head += (
            f" {redact_text(json.dumps(first.display_name, ensure_ascii=False))}"
            f" ({first.job_type.name}, owner {first.owner})"
        )
    lines = [f"{head}: {len(entries)} event(s)"]
    lines += [e.to_text() for e in entries]
    return "\n".join(lines) + "\n"


# -- the state at a time or version --------------------------------------------------------


@attrs.frozen
class AsOf:
    """A job as it was after ``job.version`` events; ``asked`` is the time asked for."""

    job: Job
    latest_version: int
    asked: datetime | None

    @property
    def version(self) -> int:
        return self.job.version

    @property
    def progress(self) -> proj.JobProgress:
        return proj.job_progress(self.job)

    @property
    def error(self) -> proj.ErrorInfo | None:
        return proj.job_error(self.job)

    @property
    def times(self) -> proj.JobTimes:
        return proj.job_times(self.job)

    def to_dict(self) -> dict[str, Any]:
        job, error = self.job, self.error
        return {
            "job_id": job.id,
            "version": job.version,
            "latest_version": self.latest_version,
            "asked": self.asked.isoformat() if self.asked else None,
            "as_of": job.modified_at.isoformat(),
            "display_name": redact_text(job.display_name),
            "type": job.job_type.name,
            "owner": job.owner,
            "state": job.state.name,
            "priority": job.priority.name,
            "progress": plain(self.progress),
            "reply_progress": plain(proj.reply_progress(job)),
            "error": None
            if error is None
            else {
                "context": error.context.name,
                "hresult": hresult.format_hresult(error.hresult),
                "name": error.hresult_name,
                "description": redact_text(error.description),
                "file_index": error.file_index,
                "protocol": error.protocol,
            },
            "error_count": job.error_count,
            "times": plain(self.times),
            "files": [
                {
                    "index": i,
                    "remote_name": redact_text(f.remote_name),
                    "local_name": f.local_name,
                    "bytes_total": f.bytes_total,
                    "bytes_transferred": f.bytes_transferred,
                    "transferred": f.transferred,
                    "completed": f.completed,
                }
                for i, f in enumerate(job.files)
            ],
            "job": plain(job),
        }

    def to_text(self) -> str:
        data = self.to_dict()
        data.pop("job")
        lines = []
        for key, value in data.items():
            if key == "files":
                for f in value:
                    lines.append(
                        f"{'file ' + str(f['index']):>18}: {f['bytes_transferred']}/"
                        f"{f['bytes_total'] if f['bytes_total'] is not None else '?'} "
                        f"{'transferred' if f['transferred'] else 'pending'}  "
                        f"{one_line(f['remote_name'])} -> {one_line(f['local_name'])}"
                    )
                continue
            if isinstance(value, dict):
                value = " ".join(f"{k}={v}" for k, v in value.items())
            lines.append(f"{key:>18}: {one_line(value)}")
        return "\n".join(lines) + "\n"


def state_at(
    store: EventStore,
    job_id: str,
    at: datetime | None = None,
    version: int | None = None,
) -> AsOf:
    """The job after the longest prefix of its stream whose events happened at or before
    ``at`` (a naive time is UTC), or after ``version`` events; the latest without either."""
    if at is not None and version is not None:
        raise BitsError(hresult.E_INVALIDARG, "give a time or a version, not both")
    if at is not None and at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    entries = history(store, job_id)
    latest = entries[-1].version
    if version is not None and not 1 <= version <= latest:
        raise BitsError(hresult.E_INVALIDARG, f"job {entries[0].job_id} has versions 1 to {latest}")
    first = entries[0].event
    if first is not None and not isinstance(first, JobCreated):
        raise BitsError(
            hresult.BG_E_NOT_FOUND,
            f"{entries[0].job_id} is not a job stream (it starts with {entries[0].event_type})",
        )
    job: Job | None = None
    for entry in entries:
        if version is not None and entry.version > version:
            break
        if entry.event is None:
            raise BitsError(hresult.E_FAIL, f"version {entry.version}: {entry.problem}")
        if at is not None and entry.event.at > at:
            break
        try:
            job = jobs.fold([entry.event], job)
        except Exception as exc:  # an impossible step: `audit verify` reports it as "fold"
            raise BitsError(
                hresult.E_FAIL,
                f"job {entry.job_id}: version {entry.version} cannot be replayed: {exc}",
            ) from exc
    if job is None:
        raise BitsError(
            hresult.BG_E_NOT_FOUND, f"job {entries[0].job_id} did not exist yet at {at}"
        )
    return AsOf(job, latest, at)


# -- export --------------------------------------------------------------------------------


@attrs.frozen
class ExportSummary:
    events: int
    streams: int
    digest: str  # of every stream's head: see ``heads_digest``


def heads_digest(heads: dict[str, tuple[int, str]]) -> str:
    """SHA-256 over ``stream version hash`` lines of every stream's last event, sorted by
    stream: one value that pins the whole log (record it to detect a truncated tail or a
    rewritten chain later)."""
    digest = hashlib.sha256()
    for stream in sorted(heads):
        version, link = heads[stream]
        digest.update(f"{stream} {version} {link}\n".encode())
    return digest.hexdigest()


def _line(data: dict[str, Any]) -> str:
    return safe_text(json.dumps(data, ensure_ascii=False, separators=(",", ":"))) + "\n"


def safe_text(text: str) -> str:
    """``text`` with any lone surrogate as a ``\\udXXX`` escape, so it can be written as
    UTF-8 (inside JSON strings that escape reads back as the same character)."""
    return utf8(text).decode("utf-8")


def export(store: EventStore, out: IO[str]) -> ExportSummary:
    """Write the whole log to ``out`` as JSON lines (specs/event-log.md): a header, one
    line per stored event in the log's global order, and a footer with the counts."""
    out.write(
        _line(
            {
                "format": EXPORT_FORMAT,
                "format_version": EXPORT_FORMAT_VERSION,
                "schema": dict(serialization.SCHEMA_VERSION),
            }
        )
    )
    heads: dict[str, tuple[int, str]] = {}
    events = 0
    for n in store.raw_read_all(batch=PAGE):
        stream = str(n.originator_id) if isinstance(n.originator_id, UUID) else n.originator_id
        stream = str(UUID(stream))
        try:
            state = json.loads(stored_bytes(n.state))
        except ValueError:
            raise AuditError(
                hresult.E_FAIL,
                f"stream {stream} version {n.originator_version} is not JSON; "
                "run `backhaul audit verify`",
            ) from None
        out.write(
            _line(
                {
                    "stream": stream,
                    "version": n.originator_version,
                    "topic": n.topic,
                    "state": state,
                }
            )
        )
        link = state.get(serialization.HASH_KEY) if isinstance(state, dict) else None
        heads[stream] = (n.originator_version, link if isinstance(link, str) else "")
        events += 1
    summary = ExportSummary(events, len(heads), heads_digest(heads))
    out.write(_line({"end": {"events": events, "streams": len(heads), "digest": summary.digest}}))
    return summary


# -- import --------------------------------------------------------------------------------


@attrs.frozen
class ImportSummary:
    events: int
    streams: int
    digest: str
    rows: int  # read-model rows after the rebuild
    unreadable: int = 0  # sealed secrets of live jobs this store's key cannot open
    unreadable_jobs: int = 0


def import_(store: EventStore, in_stream: IO[str]) -> ImportSummary:
    """Load an export into an EMPTY store: the same stored states byte for byte, then
    rebuild the read models. The whole file is checked first (format, versions 1..n per
    stream in order, every hash, every state readable, every stream replayable as the
    rebuild will replay it, the footer's counts); if anything is wrong, nothing is written
    and ``AuditError`` lists what. The events go in in one transaction that holds the
    log's write lock from the check that the store is empty on: of two imports into one
    store, one is refused."""
    if store.head() != 0:
        raise AuditError(
            hresult.BG_E_INVALID_STATE,
            f"{store!r} already holds events; an import needs an empty store",
        )
    try:
        with _seekable(in_stream) as source:
            start = source.tell()
            problems, events, heads = _check_export(source)
            if problems:
                raise _invalid(problems)
            source.seek(start)
            if not store.insert_into_empty(_records(source), IMPORT_BATCH):
                raise AuditError(
                    hresult.BG_E_INVALID_STATE,
                    f"{store!r} is no longer empty (another import?); nothing was imported",
                )
    except UnicodeDecodeError:  # a gzip, binary or UTF-16 file: met on the first read
        raise _invalid(
            [Problem("-", None, "format", "not a backhaul export: not UTF-8 text")]
        ) from None
    projection.rebuild(store)
    rows = len(store.views.select(None, include_final=True))
    unreadable = [
        _unreadable_secrets(store, row.job_id)
        for row in store.views.select(None, include_final=False)
    ]
    return ImportSummary(
        events,
        len(heads),
        heads_digest(heads),
        rows,
        sum(unreadable),
        sum(1 for n in unreadable if n),
    )


def _invalid(problems: list[Problem]) -> AuditError:
    return AuditError(
        hresult.E_INVALIDARG,
        f"the export is not valid ({len(problems)} problem(s)); nothing was imported",
        problems,
    )


def _unreadable_secrets(store: EventStore, job_id: str) -> int:
    """How many of a job's sealed values this store's key cannot open (an export imported
    without the exporting home's key): told at the import, not first when the job runs."""
    job = jobs.fold(a.event for a in store.stream(job_id))
    count = 0
    for sealed in _sealed_in(job):
        try:
            store.secrets.open(sealed)
        except SealedUnreadable:
            count += 1
    return count


def _sealed_in(value: object) -> Iterator[Sealed]:
    if isinstance(value, Sealed):
        yield value
    elif attrs.has(type(value)):
        for field in attrs.fields(type(value)):
            yield from _sealed_in(getattr(value, field.name))
    elif isinstance(value, (tuple, list, FileList)):
        for item in value:
            yield from _sealed_in(item)


@contextlib.contextmanager
def _seekable(stream: IO[str]) -> Iterator[IO[str]]:
    """The import reads its input twice; a pipe is spooled to a temporary file first."""
    try:
        seekable = stream.seekable()
    except (AttributeError, OSError):
        seekable = False
    if seekable:
        yield stream
        return
    with tempfile.TemporaryFile("w+", encoding="utf-8") as spool:
        shutil.copyfileobj(stream, spool)
        spool.seek(0)
        yield spool


def _lines(source: IO[str]) -> Iterator[tuple[int, Any]]:
    for number, text in enumerate(source, 1):
        if not text.strip():
            continue
        try:
            yield number, json.loads(text)
        except ValueError as exc:
            yield number, exc


def _records(source: IO[str]) -> Iterator[StoredEvent]:
    for _, data in _lines(source):
        if isinstance(data, dict) and "stream" in data:
            yield StoredEvent(
                UUID(data["stream"]), data["version"], data["topic"], _state_bytes(data["state"])
            )


def _state_bytes(state: dict[str, Any]) -> bytes:
    """The stored bytes of an exported state: compact, keys in the exported order (the
    order they were stored in), so an import reproduces them exactly."""
    return utf8(json.dumps(state, ensure_ascii=False, separators=(",", ":")))


def _check_export(source: IO[str]) -> tuple[list[Problem], int, dict[str, tuple[int, str]]]:
    problems: list[Problem] = []
    heads: dict[str, tuple[int, str]] = {}
    replay = _Replay()
    events = 0
    header = footer = None
    for number, data in _lines(source):
        where = f"line {number}"
        if footer is not None:
            problems.append(Problem("-", None, "format", f"{where}: data after the footer"))
            break
        if isinstance(data, Exception) or not isinstance(data, dict):
            problems.append(Problem("-", None, "format", f"{where}: not a JSON object"))
            continue
        if header is None:
            header = data
            if data.get("format") != EXPORT_FORMAT:
                problems.append(Problem("-", None, "format", f"{where}: not a backhaul export"))
                break
            if data.get("format_version") != EXPORT_FORMAT_VERSION:
                problems.append(
                    Problem(
                        "-",
                        None,
                        "format",
                        f"export format version {data.get('format_version')!r} is not "
                        f"{EXPORT_FORMAT_VERSION}",
                    )
                )
                break
            continue
        if "end" in data:
            footer = data["end"]
            continue
        events += 1
        found, stream, event = _check_record(data, where, heads)
        problems += found
        if stream is not None:
            problems += replay.step(stream, data["version"], event, where)
    if header is None:
        problems.append(Problem("-", None, "format", "empty input: no export header"))
    elif footer is None:
        problems.append(Problem("-", None, "format", "no footer: the export is truncated"))
    elif not isinstance(footer, dict) or (footer.get("events"), footer.get("streams")) != (
        events,
        len(heads),
    ):
        problems.append(
            Problem(
                "-",
                None,
                "format",
                f"the footer says {footer!r}, the file holds {events} events "
                f"in {len(heads)} streams",
            )
        )
    elif footer.get("digest") not in (None, heads_digest(heads)):
        problems.append(Problem("-", None, "format", "the footer's digest does not match"))
    return problems, events, heads


def _check_record(
    data: dict[str, Any], where: str, heads: dict[str, tuple[int, str]]
) -> tuple[list[Problem], str | None, Event | None]:
    """The record's problems, its stream (None: not a record) and its event (None: a
    problem was found)."""
    try:
        stream = str(UUID(str(data["stream"])))
        version, topic, state = data["version"], data["topic"], data["state"]
    except (KeyError, ValueError):
        return [Problem("-", None, "format", f"{where}: not an event record")], None, None
    if not isinstance(version, int) or not isinstance(topic, str) or not isinstance(state, dict):
        return (
            [Problem(stream, None, "format", f"{where}: bad version, topic or state")],
            None,
            None,
        )
    last_version, previous = heads.get(stream, (0, ""))
    problems = []
    event: Event | None = None
    if version != last_version + 1:
        problems.append(
            Problem(
                stream,
                version,
                "order",
                f"{where}: version {version} follows version {last_version}",
            )
        )
    stored = _state_bytes(state)
    try:
        _, body, link = split_state(stored)
        event = event_from_bytes(topic, stored)
    except Exception as exc:  # any failure to read a stored event is a finding
        problems.append(Problem(stream, version, "undecodable", f"{where}: {_why(exc)}"))
        link = None
    else:
        if link is None:
            problems.append(Problem(stream, version, "unchained", f"{where}: no hash"))
        elif version == last_version + 1 and link != chain_hash(
            previous, stream, topic, version, body
        ):
            problems.append(
                Problem(stream, version, "hash", f"{where}: the hash does not match the event")
            )
    heads[stream] = (version, link or "")
    return problems, stream, None if problems else event


class _Replay:
    """The import's rebuild replayed ahead, so that an export it would fail on (a job
    stream that does not start with JobCreated, an impossible step, a JobCreated naming
    another stream, which would write that stream's read model) is refused before a byte
    is written, not found by the rebuild after the log is in."""

    def __init__(self) -> None:
        self.jobs: dict[str, Job | None] = {}
        self.broken: set[str] = set()  # streams with a problem found already

    def step(self, stream: str, version: int, event: Event | None, where: str) -> list[Problem]:
        if stream in self.broken:
            return []
        if event is None:  # its record's problems say why
            self.broken.add(stream)
            self.jobs.pop(stream, None)
            return []
        try:
            self._fold(stream, version, event)
        except Exception as exc:  # any failure to replay is a finding
            self.broken.add(stream)
            self.jobs.pop(stream, None)
            return [Problem(stream, version, "fold", f"{where}: replay fails: {exc}")]
        return []

    def _fold(self, stream: str, version: int, event: Event) -> None:
        if stream == POLICY_STREAM:  # engine-wide settings (TransferManager.settings)
            if not isinstance(event, PolicyChanged):
                raise ValueError(f"a {type(event).__name__} in the policy stream")
            return
        if isinstance(event, JobCreated):
            if version != 1:
                raise ValueError(f"a JobCreated at version {version} starts the job again")
            if event.job_id != stream:
                raise ValueError(f"its JobCreated names job {event.job_id!r}, not its stream")
        self.jobs[stream] = jobs.fold([event], self.jobs.get(stream))


# -- rebuild -------------------------------------------------------------------------------


@attrs.frozen
class RebuildSummary:
    rows: int
    position: int


def rebuild(store: EventStore) -> RebuildSummary:
    """Drop every read-model row and fold the whole log again."""
    position = projection.rebuild(store)
    return RebuildSummary(len(store.views.select(None, include_final=True)), position)


# -- verify --------------------------------------------------------------------------------


@attrs.frozen
class Problem:
    """What ``verify`` (or an import's check) found: ``job_id`` is the stream ("-" for the
    file as a whole), ``version`` the event (None: the stream or its read model)."""

    job_id: str
    version: int | None
    kind: str  # gap, order, hash, unchained, undecodable, fold, view, format
    detail: str

    def __str__(self) -> str:
        where = f" version {self.version}" if self.version is not None else ""
        return f"{self.job_id}{where}: {self.kind}: {self.detail}"

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class VerifyReport:
    problems: list[Problem]
    events: int
    streams: int
    rows: int  # read-model rows checked
    digest: str  # heads_digest of the log as read

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "events": self.events,
            "streams": self.streams,
            "rows": self.rows,
            "digest": self.digest,
            "problems": [p.to_dict() for p in self.problems],
        }


@attrs.define
class _Seen:
    """One stream as the global order shows it."""

    first: int  # position of its first event
    version: int  # the highest version seen in the global order
    covered: int = 0  # the highest version at or before the read models' position


def verify(store: EventStore) -> list[Problem]:
    """Every problem in the log and its read models (empty: all is well)."""
    return verify_report(store).problems


def verify_report(store: EventStore) -> VerifyReport:
    """Check, for every stream: versions 1..n without gaps, in the same order as the log's
    global order; every event's hash chain link; every event readable; and for every job
    the read-model row against a fresh fold of the stream up to the row's version."""
    problems: list[Problem] = []
    seen: dict[str, _Seen] = {}
    events = 0
    # The store may be live: read the position first, then the log, then the rows. Rows
    # are saved with their position, so the rows read later include everything up to it.
    position = store.views.position()
    for n in store.raw_read_all(batch=PAGE):
        stream = str(UUID(str(n.originator_id)))
        version = n.originator_version
        events += 1
        s = seen.get(stream)
        if s is None:
            s = seen[stream] = _Seen(n.id, version)
        elif version <= s.version:
            problems.append(
                Problem(
                    stream,
                    version,
                    "order",
                    f"stored at position {n.id}, after version {s.version} of the stream",
                )
            )
        s.version = max(s.version, version)
        if n.id <= position:
            s.covered = max(s.covered, version)
    rows = {r.job_id: r for r in store.views.select(None, include_final=True, with_doc=True)}
    checked = len(rows)
    heads: dict[str, tuple[int, str]] = {}
    for stream in sorted(seen, key=lambda k: seen[k].first):
        found, heads[stream] = _verify_stream(
            store, stream, seen[stream], position, rows.pop(stream, None)
        )
        problems += found
    for job_id in rows:
        if _exists(store, job_id):
            continue  # created after the log was read
        problems.append(
            Problem(job_id, None, "view", "a read-model row for a job the log does not hold")
        )
    return VerifyReport(problems, events, len(seen), checked, heads_digest(heads))


def _exists(store: EventStore, job_id: str) -> bool:
    try:
        return bool(store.log.select_events(UUID(job_id), limit=1))
    except ValueError:
        return False


def _verify_stream(
    store: EventStore, stream: str, seen: _Seen, position: int, row: ViewRow | None
) -> tuple[list[Problem], tuple[int, str]]:
    """The stream's problems, and its head (last version, its hash)."""
    problems: list[Problem] = []
    expected = 1
    previous: str | None = ""
    job: Job | None = None
    at_row: Job | None = None
    foldable = True
    last, head = 0, ""
    for r in store.raw_stream(stream):
        version, topic, state = r.originator_version, r.topic, stored_bytes(r.state)
        last, head = version, ""
        if version != expected:
            missing = (
                f"version {expected}"
                if version == expected + 1
                else f"versions {expected} to {version - 1}"
            )
            problems.append(Problem(stream, expected, "gap", f"{missing} missing from the log"))
            previous, foldable = None, False  # the link to a missing event cannot be checked
        expected = version + 1
        try:
            _, body, link = split_state(state)
            event = event_from_bytes(topic, state)
        except Exception as exc:  # any failure to read a stored event is a finding
            problems.append(Problem(stream, version, "undecodable", _why(exc)))
            previous, foldable = None, False
            continue
        if link is None:
            problems.append(Problem(stream, version, "unchained", "the event has no hash"))
        elif previous is not None and link != chain_hash(previous, stream, topic, version, body):
            problems.append(
                Problem(
                    stream,
                    version,
                    "hash",
                    "the stored hash does not match the event and its predecessor "
                    "(the event, its version or the previous event was altered)",
                )
            )
        previous = head = link or ""
        if version == 1 and not isinstance(event, JobCreated):
            foldable = False  # a stream of its own kind (not a job's): no read model
        if foldable:
            try:
                job = jobs.fold([event], job)
            except Exception as exc:
                problems.append(Problem(stream, version, "fold", f"replay fails: {exc}"))
                foldable, job = False, None
            if row is not None and job is not None and job.version == row.version:
                at_row = job
    problems += _verify_row(stream, seen, position, row, job, at_row, last)
    return problems, (last, head)


def _verify_row(
    stream: str,
    seen: _Seen,
    position: int,
    row: ViewRow | None,
    job: Job | None,
    at_row: Job | None,
    last: int,
) -> list[Problem]:
    if row is None:
        if job is not None and seen.first <= position:
            return [
                Problem(
                    stream,
                    None,
                    "view",
                    f"no read-model row, though the read models are at position {position}",
                )
            ]
        return []
    if row.version > last:
        return [
            Problem(
                stream,
                row.version,
                "view",
                f"the read model is at version {row.version} but the log ends at version "
                f"{last} (events deleted?)",
            )
        ]
    if row.version < seen.covered:
        return [
            Problem(
                stream,
                None,
                "view",
                f"the read model stopped at version {row.version}, though it has read "
                f"version {seen.covered}",
            )
        ]
    if at_row is None:
        return []  # the stream cannot be folded up to the row: its problems say why
    fresh = projection.view_row(at_row)
    differ = [
        f.name
        for f in attrs.fields(ViewRow)
        if f.name != "doc" and getattr(fresh, f.name) != getattr(row, f.name)
    ]
    if row.doc != fresh.doc:
        differ.append("doc(" + ",".join(_doc_keys(row.doc, fresh.doc)) + ")")
    if not differ:
        return []
    return [
        Problem(
            stream,
            row.version,
            "view",
            "the read model differs from a fresh fold in: " + ", ".join(differ),
        )
    ]


def _doc_keys(stored: str, fresh: str) -> list[str]:
    """The top-level Job fields where two docs differ (names only: values may be sealed)."""
    try:
        a, b = json.loads(stored), json.loads(fresh)
    except ValueError:
        return ["not JSON"]
    if not isinstance(a, dict):
        return ["not an object"]
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


__all__ = [
    "REDACTED",
    "AsOf",
    "AuditError",
    "Entry",
    "ExportSummary",
    "ImportSummary",
    "Problem",
    "RebuildSummary",
    "VerifyReport",
    "export",
    "history",
    "import_",
    "plain",
    "rebuild",
    "redact_text",
    "state_at",
    "verify",
    "verify_report",
]
