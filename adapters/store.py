"""The event store: an append-only log, one stream per job, through eventsourcing.

Where the store lives, in order of precedence:
1. an explicit ``url`` argument;
2. the ``BACKHAUL_STORE`` environment variable;
3. ``sqlite`` in the backhaul home: ``home`` argument, else ``BACKHAUL_HOME``, else
   ``$XDG_DATA_HOME/backhaul`` (``~/.local/share/backhaul``).
URLs: ``memory:`` (in-process, for tests), ``sqlite:///abs/path.db`` (or a plain path),
``postgresql://user:password@host:port/dbname``.

Appends are optimistic: a stream's next version must be free, which eventsourcing's
unique (originator_id, originator_version) key enforces, so two writers can never both
append the next event of one job (``ConcurrentAppend``). Many streams can be appended in
one transaction (``append_many``): the group commit that keeps the log cheap.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final, cast
from urllib.parse import unquote, urlsplit
from uuid import UUID

import attrs
from eventsourcing.persistence import (
    ApplicationRecorder,
    InfrastructureFactory,
    IntegrityError,
    Notification,
    PersistenceError,
    StoredEvent,
)
from eventsourcing.persistence import InternalError as PgInternalError
from eventsourcing.persistence import ProgrammingError as PgProgrammingError

from backhaul.adapters.secret import SecretBox
from backhaul.adapters.serialization import (
    chain_hash,
    event_from_bytes,
    event_to_bytes,
    event_topic,
    stored_hash,
    with_hash,
)
from backhaul.adapters.view import JobViews, MemoryJobViews, SQLiteJobViews
from backhaul.core import hresult
from backhaul.core.error import BitsError
from backhaul.core.event import Event
from backhaul.core.url import is_secret_parameter_name

STORE_ENV = "BACKHAUL_STORE"
HOME_ENV = "BACKHAUL_HOME"
DB_FILE = "backhaul.db"
LINK_CACHE_SIZE = 10_000  # streams whose last (version, hash) an EventStore remembers


class ConcurrentAppend(Exception):
    """Another writer appended to the stream first; reload and decide again."""


@attrs.frozen
class Appended:
    job_id: str
    version: int
    event: Event


@attrs.frozen
class Recorded:
    """An event as it sits in the log: its global position, stream and version."""

    position: int
    job_id: str
    version: int
    event: Event


_SQLITE_FILES: Final = ("", "-wal", "-shm", "-journal", ".serve.lock", ".files.lock")


def stored_bytes(state: bytes | str) -> bytes:
    """A stored state as bytes. SQLite keeps whatever type a row was given: a state edited
    with the sqlite3 shell (``SET state = replace(state, ...)``) comes back as TEXT, which
    is read as its UTF-8 bytes, as the decoder reads it (and the audit then finds the
    edit by its hash)."""
    return state.encode("utf-8") if isinstance(state, str) else bytes(state)


def default_home() -> Path:
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "backhaul"


def redact_url(url: str) -> str:
    """A store's URL as messages show it: without the password of its user part, nor the
    values of secret query parameters (``?password=``, ``?sslpassword=``, any name
    ``is_secret_parameter_name`` calls secret). A URL that cannot be read is not shown."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return f"{url.partition(':')[0]}:<a URL that cannot be read>"
    if password is not None:
        parts = parts._replace(netloc=parts.netloc.replace(f":{password}@", ":***@"))
    if parts.query:
        shown = [
            f"{name}=***" if _secret_store_parameter(name) else f"{name}{eq}{value}"
            for name, eq, value in (p.partition("=") for p in parts.query.split("&"))
        ]
        parts = parts._replace(query="&".join(shown))
    return parts.geturl()


def _secret_store_parameter(name: str) -> bool:
    lowered = unquote(name).lower()
    return "password" in lowered or is_secret_parameter_name(unquote(name))


class EventStore:
    """The log and its read models in one database, plus the secret box."""

    def __init__(
        self,
        log: ApplicationRecorder,
        views: JobViews,
        secrets: SecretBox,
        *,
        kind: str,
        location: str,
        factory: InfrastructureFactory[Any] | None = None,
        connect: Callable[[], Any] | None = None,
    ) -> None:
        self.log = log
        self.views = views
        self.secrets = secrets
        self.kind = kind
        self.location = location
        self._factory = factory
        # PostgreSQL: a new connection of its own (the engine lock's, ``AdvisoryLock``).
        self.connect = connect
        self.lock = threading.RLock()
        self._links: OrderedDict[str, tuple[int, str]] = OrderedDict()
        self._links_lock = threading.Lock()
        # The files the store is made of: a download must never be renamed over one.
        own = [Path(f"{location}{end}") for end in _SQLITE_FILES] if kind == "sqlite" else []
        self.files: tuple[Path, ...] = (*own, *([secrets.file] if secrets.file else []))

    def __repr__(self) -> str:
        return f"EventStore({self.kind}: {self.location})"

    # -- writing -----------------------------------------------------------------------

    def append(self, job_id: str, after_version: int, events: Sequence[Event]) -> list[int]:
        return self.append_many([(job_id, after_version, events)])

    def append_many(self, batches: Sequence[tuple[str, int, Sequence[Event]]]) -> list[int]:
        """Append to several streams in ONE transaction. ``after_version`` is the
        version the caller decided against; the first new event gets the next one.

        Each state carries its link in the stream's hash chain (``"h"``, see
        serialization.chain_hash), computed from the hash of version ``after_version``:
        from this store's cache when it appended that version itself, else read from
        the log. A batch may append to one stream several times, in order."""
        stored: list[StoredEvent] = []
        links: dict[str, tuple[int, str]] = {}  # stream -> its last (version, hash) here
        self._fetch_links(batches, links)
        for job_id, after_version, events in batches:
            if not events:
                continue
            originator = UUID(job_id)
            stream = str(originator)
            previous = self._previous_link(originator, stream, after_version, links)
            version = after_version
            for event in events:
                version += 1
                topic = event_topic(event)
                body = event_to_bytes(event)
                previous = chain_hash(previous, stream, topic, version, body)
                stored.append(StoredEvent(originator, version, topic, with_hash(body, previous)))
            links[stream] = (version, previous)
        if not stored:
            return []
        try:
            ids = self.log.insert_events(stored)
        except IntegrityError as exc:
            raise ConcurrentAppend(str(exc)) from exc
        self._remember(links)
        return list(ids or [])

    def _fetch_links(
        self,
        batches: Sequence[tuple[str, int, Sequence[Event]]],
        links: dict[str, tuple[int, str]],
    ) -> None:
        """Read into ``links`` the hashes the batch chains to that the cache misses (an
        engine's first append to 1,000 jobs another process created), on SQLite in one read
        transaction: one query each, without the recorder's cost per call (about 75 us
        against 5 here). Elsewhere ``_previous_link`` reads them one by one."""
        if self.kind != "sqlite":
            return
        wanted: dict[UUID, int] = {}
        with self._links_lock:
            for job_id, after, events in batches:
                try:
                    originator = UUID(job_id)
                except ValueError:
                    continue  # not a stream the store writes: append_many refuses it
                known = self._links.get(str(originator))
                if events and after and (known is None or known[0] != after):
                    wanted.setdefault(originator, after)
        if len(wanted) < 2:
            return
        log = cast(Any, self.log)
        statement = (
            f"{log.select_events_statement}AND originator_version<=? "
            "ORDER BY originator_version DESC LIMIT 1"
        )
        with log.datastore.transaction(commit=False) as cursor:
            for originator, after in wanted.items():
                cursor.execute(statement, [originator.hex, after])
                rows = cursor.fetchall()
                if rows and rows[0]["originator_version"] == after:
                    links[str(originator)] = (after, stored_hash(rows[0]["state"]))

    def _previous_link(
        self, originator: UUID, stream: str, after: int, links: dict[str, tuple[int, str]]
    ) -> str:
        """The hash of version ``after`` of ``stream`` ("" before version 1)."""
        if after == 0:
            return ""
        for known in (links.get(stream), self._links.get(stream)):
            if known is not None and known[0] == after:
                return known[1]
        last = self.log.select_events(originator, lte=after, desc=True, limit=1)
        if not last or last[0].originator_version != after:
            raise ConcurrentAppend(f"stream {stream} has no version {after} to append after")
        return stored_hash(last[0].state)

    def _remember(self, links: dict[str, tuple[int, str]]) -> None:
        """Cache each stream's new last (version, hash): facts, true for as long as the
        log is append-only, so the cache never needs invalidating (a stale entry only
        misses)."""
        with self._links_lock:
            for stream, link in links.items():
                self._links[stream] = link
                self._links.move_to_end(stream)
            while len(self._links) > LINK_CACHE_SIZE:
                self._links.popitem(last=False)

    def insert_into_empty(self, stored: Iterable[StoredEvent], batch: int = 1000) -> bool:
        """Insert states exactly as given (the audit import: no re-encoding, no new hashes)
        into an EMPTY log, in ONE transaction that holds the log's write lock from the check
        that it is empty to the commit: two imports started together cannot both find it
        empty and mix their logs, and a failure half way leaves nothing written. False, with
        nothing written, when the log holds events. ``batch``: events sent at a time."""
        log = cast(Any, self.log)
        if self.kind == "sqlite":
            return self._insert_into_empty_sqlite(log, stored, batch)
        if self.kind == "postgresql":
            return self._insert_into_empty_postgres(log, stored, batch)
        with self.lock:  # in-process: this store is the only writer
            if self.head():
                return False
            self.log.insert_events(list(stored))
            return True

    @staticmethod
    def _insert_into_empty_sqlite(log: Any, stored: Iterable[StoredEvent], batch: int) -> bool:
        """BEGIN IMMEDIATE takes the write lock before the emptiness check (a plain BEGIN
        would read first, and a second import would then fail its first write with
        "database is locked" instead of waiting and finding the log taken)."""
        with log.datastore.get_connection(commit=True) as conn:
            cursor = conn.cursor()
            cursor.execute("BEGIN IMMEDIATE")
            try:
                cursor.execute(log.select_max_notification_id_statement)
                if cursor.fetchone()[0]:
                    conn.rollback()
                    return False
                for chunk in _chunks(stored, batch):
                    log._insert_events(cursor, chunk)
            except BaseException:
                conn.rollback()
                raise
            conn.commit()
        return True

    @staticmethod
    def _insert_into_empty_postgres(log: Any, stored: Iterable[StoredEvent], batch: int) -> bool:
        """The recorder's own table lock (EXCLUSIVE: readers go on, a second writer waits
        for the commit), taken before the emptiness check and held to the commit."""
        with log.datastore.transaction(commit=True) as cursor:
            log._lock_table(cursor)
            cursor.execute(log.max_notification_id_statement)
            if cursor.fetchone()["max"]:
                return False
            for chunk in _chunks(stored, batch):
                log._insert_stored_events(cursor, chunk)
        return True

    # -- reading -----------------------------------------------------------------------

    def stream(self, job_id: str, after_version: int = 0) -> list[Appended]:
        try:
            originator = UUID(job_id)
        except ValueError:
            raise BitsError(hresult.BG_E_NOT_FOUND, f"{job_id!r} is not a job id") from None
        records = self.log.select_events(originator, gt=after_version or None)
        if records:  # a reader about to append: remember the link it will chain to
            self._note({str(originator): records[-1]})
        return [
            Appended(job_id, r.originator_version, event_from_bytes(r.topic, r.state))
            for r in records
        ]

    def _note(self, last: dict[str, StoredEvent]) -> None:
        """Remember each stream's link from the last of its records just read."""
        with self._links_lock:
            for stream, record in last.items():
                state = stored_bytes(record.state)
                if state[-72:-66] != b',"h":"' or state[-2:] != b'"}':
                    continue  # not the layout the store writes: an append reads it properly
                known = self._links.get(stream)
                if known is None or known[0] < record.originator_version:
                    link = state[-66:-2].decode("ascii", "replace")
                    self._links[stream] = (record.originator_version, link)
                    self._links.move_to_end(stream)
            while len(self._links) > LINK_CACHE_SIZE:
                self._links.popitem(last=False)

    def read(self, after: int = 0, limit: int = 1000) -> list[Recorded]:
        """The events after global position ``after``. Like ``stream``, it remembers each
        stream's last link: completing 10,000 jobs right after a catch-up read them chains
        their JobCompleted without a read of the log per stream."""
        notes = self.log.select_notifications(start=after, limit=limit, inclusive_of_start=False)
        records: list[Recorded] = []
        last: dict[str, StoredEvent] = {}
        for n in notes:
            stream = str(n.originator_id)
            last[stream] = n
            records.append(
                Recorded(n.id, stream, n.originator_version, event_from_bytes(n.topic, n.state))
            )
        self._note(last)
        return records

    def read_all(self, after: int = 0, batch: int = 1000) -> Iterator[Recorded]:
        while True:
            page = self.read(after, batch)
            if not page:
                return
            yield from page
            after = page[-1].position

    def raw_stream(self, job_id: str) -> list[StoredEvent]:
        """One stream's stored events, undecoded, in version order (for the audit)."""
        return list(self.log.select_events(UUID(job_id)))

    def raw_read(self, after: int = 0, limit: int = 1000) -> list[Notification]:
        """Stored events after global position ``after``, undecoded (for the audit)."""
        notes = self.log.select_notifications(start=after, limit=limit, inclusive_of_start=False)
        return list(notes)

    def raw_read_all(self, after: int = 0, batch: int = 1000) -> Iterator[Notification]:
        while True:
            page = self.raw_read(after, batch)
            if not page:
                return
            yield from page
            after = page[-1].id

    def head(self) -> int:
        return self.log.max_notification_id() or 0

    def failure(self, exc: BaseException) -> StoreUnavailable:
        """``exc``, one of ``STORE_ERRORS`` met under a call, as ``store_failure`` types it."""
        directory = Path(self.location).parent if self.kind == "sqlite" else None
        return store_failure(exc, self.location, directory)

    def close(self) -> None:
        if self._factory is not None:
            self._factory.close()
            self._factory = None


def _chunks(items: Iterable[StoredEvent], size: int) -> Iterator[list[StoredEvent]]:
    chunk: list[StoredEvent] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# What a store that cannot be used raises under a call (SQLite's own errors, the event store
# library's, which wrap PostgreSQL's).
STORE_ERRORS: Final = (sqlite3.Error, PersistenceError)


class StoreUnavailable(BitsError):
    """The store cannot be opened, read or written (a full disk, no permission, a broken
    database file): nothing was recorded by the call that met it."""


def store_failure(
    exc: BaseException, where: str | Path, directory: Path | None = None
) -> StoreUnavailable:
    """``exc`` (SQLite's, the event store library's, or the OS's) as a typed error with its
    HRESULT: a full disk is ERROR_DISK_FULL (SQLite says only 'disk I/O error' when it
    cannot make its WAL files: ``directory``, the database's, is then looked at), a refusal
    E_ACCESSDENIED, anything else E_FAIL. ``where`` names the store (no password in it)."""
    text = str(exc) or type(exc).__name__
    code, why = hresult.E_FAIL, ""
    full = getattr(exc, "errno", None) == errno.ENOSPC or "full" in text.lower()
    if not full and directory is not None:
        with contextlib.suppress(OSError):
            full = os.statvfs(directory).f_bavail == 0
    if full:
        code, why = hresult.hresult_from_win32(hresult.ERROR_DISK_FULL), " (the disk is full)"
    elif getattr(exc, "errno", None) in (errno.EACCES, errno.EPERM) or any(
        word in text.lower()
        for word in ("readonly", "read-only", "permission", "authentication failed")
    ):
        code = hresult.E_ACCESSDENIED
    return StoreUnavailable(code, f"the store {where} cannot be used: {text}{why}")


def sqlite_file(url: str | None = None, home: Path | None = None) -> Path | None:
    """The SQLite database ``open_store`` opens for these arguments (None: another kind)."""
    url = url or os.environ.get(STORE_ENV) or None
    if url is None:
        return Path(home if home is not None else default_home()) / DB_FILE
    if url.startswith(("memory:", "postgresql://", "postgres://")):
        return None
    return Path(url.removeprefix("sqlite://")) if url.startswith("sqlite://") else Path(url)


# -- one engine per SQLite store -------------------------------------------------------------

LOCK_SUFFIX: Final = ".serve.lock"  # beside the SQLite database


def engine_lock_file(store: EventStore) -> Path | None:
    """The engine lock of a SQLite store: a file beside its database, so that two homes (or
    a ``--store``) naming one database share it. None for other stores."""
    return Path(store.location + LOCK_SUFFIX) if store.kind == "sqlite" else None


def engine_lock(store: EventStore, *, shared: bool) -> EngineLock | AdvisoryLock | None:
    """The lock an engine holds while it runs on ``store`` (``shared``: a worker's): a file
    beside a SQLite database, an advisory lock in a PostgreSQL database; None for a memory
    store (no other process can reach it)."""
    path = engine_lock_file(store)
    if path is not None:
        return EngineLock(path, shared=shared)
    if store.connect is not None:
        return AdvisoryLock(store.connect, shared=shared)
    return None


class _CountedLock:
    """What the engine locks share: ``acquire`` takes the lock (True) or finds another
    holder (False), never waiting, and counts (the command that took the lock to decide
    whether to run an engine hands it to that engine, which takes it again); the last
    ``release`` gives it back. ``shared``: the lock of an engine that leases the jobs it runs
    (a ``worker``): workers fence each other by their leases, so they share it, but an
    engine without leases (which takes every job as its own) never runs beside one."""

    def __init__(self, *, shared: bool = False) -> None:
        self.shared = shared
        self._count = 0
        self._guard = threading.Lock()

    def acquire(self) -> bool:
        with self._guard:
            if not self._count and not self._take():
                return False
            self._count += 1
            return True

    def release(self) -> None:
        with self._guard:
            if not self._count:
                return
            self._count -= 1
            if not self._count:
                self._give_back()

    def holder(self) -> str:
        """Who holds it, for a message."""
        return "another engine"

    def _take(self) -> bool:
        raise NotImplementedError

    def _give_back(self) -> None:
        raise NotImplementedError


class EngineLock(_CountedLock):
    """One engine per SQLite store: a ``flock`` on ``path`` while it runs, with the holder's
    pid written in it (exclusive). Two engines without leases transferring one job write
    the same temp file and restart each other's files: the bytes published are wrong.
    ``flock`` also refuses a second holder in the same process (another descriptor), so
    two engines of one application are kept apart too."""

    def __init__(self, path: Path | str, *, shared: bool = False) -> None:
        super().__init__(shared=shared)
        self.path = Path(path)
        self._fd = -1

    def _take(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        if not self.shared:  # the one holder: its pid, for the others' messages
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return True

    def _give_back(self) -> None:
        os.close(self._fd)  # which gives the lock back
        self._fd = -1

    def holder(self) -> str:
        """Who holds it, as far as its file says (``pid N``)."""
        try:
            pid = self.path.read_text(encoding="ascii").strip()
        except (OSError, ValueError):
            pid = ""
        return f"pid {pid}" if pid.isdigit() else "another process"


class AdvisoryLock(_CountedLock):
    """The engine lock of a PostgreSQL store: a session advisory lock of the database, on a
    connection of its own held while the engine runs. PostgreSQL gives it back when the
    connection ends, a killed engine's too."""

    KEY: Final = int.from_bytes(b"backhaul", "big")  # one key per database: the store's

    def __init__(self, connect: Callable[[], Any], *, shared: bool = False) -> None:
        super().__init__(shared=shared)
        self._connect = connect
        self._conn: Any = None

    def _take(self) -> bool:
        call = "pg_try_advisory_lock_shared" if self.shared else "pg_try_advisory_lock"
        self._conn = _advisory_lock(self._connect, call, self.KEY, "for the engine lock")
        return self._conn is not None

    def _give_back(self) -> None:
        _close_quietly(self._conn)
        self._conn = None

    def holder(self) -> str:
        return "an engine of another process or connection"


def _advisory_lock(connect: Callable[[], Any], call: str, key: int, why: str) -> Any:
    """A new connection that holds the advisory lock ``call`` took on ``key``, or None when
    a ``pg_try_*`` call found it held. A server gone since the store was opened:
    StoreUnavailable."""
    try:
        conn = connect()
    except Exception as exc:
        raise store_failure(exc, why) from exc
    try:
        taken = conn.execute(f"SELECT {call}(%s)", (key,)).fetchone()[0]
    except Exception as exc:
        conn.close()
        raise store_failure(exc, why) from exc
    if taken is False:
        conn.close()
        return None
    return conn


def _close_quietly(conn: Any) -> None:
    with contextlib.suppress(Exception):  # a connection already gone gave its locks back
        conn.close()


FILES_LOCK_SUFFIX: Final = ".files.lock"  # beside the SQLite database
_FILES_KEY: Final = int.from_bytes(b"bh-files", "big")


@contextlib.contextmanager
def file_work(store: EventStore) -> Iterator[None]:
    """Complete and Cancel, one at a time on the store, across processes: each moves or
    deletes a job's files and then records the end, and the two interleaved left a job
    CANCELLED with part of its files published (Cancel deleting the temp files Complete
    was renaming). Whoever comes second waits, then finds the job final. SQLite: an
    exclusive ``flock`` on a file beside the database; PostgreSQL: an advisory lock of the
    database on a connection of its own; a memory store has no other process."""
    if store.kind == "sqlite":
        fd = os.open(
            store.location + FILES_LOCK_SUFFIX, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # which gives the lock back
        return
    if store.connect is None:
        yield
        return
    conn = _advisory_lock(store.connect, "pg_advisory_lock", _FILES_KEY, "for Complete or Cancel")
    try:
        yield
    finally:
        _close_quietly(conn)  # which gives the lock back


def is_free(path: Path) -> bool:
    """Does no engine hold the lock at ``path`` now? (Taken and given back at once, without
    writing over the holder's pid.)"""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def open_store(url: str | None = None, home: Path | None = None) -> EventStore:
    """Open (creating if needed) the store named by ``url`` / environment / home."""
    url = url or os.environ.get(STORE_ENV) or None
    if home is None and url is None:
        home = default_home()
    if url is None:
        assert home is not None
        return _open_sqlite(Path(home) / DB_FILE, Path(home))
    if url.startswith("memory:"):
        return _open_memory()
    if url.startswith(("postgresql://", "postgres://")):
        return _open_postgres(url, home)
    path = Path(url.removeprefix("sqlite://")) if url.startswith("sqlite://") else Path(url)
    if not path.is_absolute():
        raise BitsError(
            hresult.E_INVALIDARG, f"the store path {redact_url(url)!r} must be absolute"
        )
    return _open_sqlite(path, home or path.parent)


def _open_memory() -> EventStore:
    factory = InfrastructureFactory.construct({"PERSISTENCE_MODULE": "eventsourcing.popo"})
    log = factory.application_recorder()
    return EventStore(
        log,
        MemoryJobViews(),
        SecretBox.ephemeral(),
        kind="memory",
        location="memory:",
        factory=factory,
    )


def _open_sqlite(path: Path, home: Path) -> EventStore:
    try:
        return _open_sqlite_store(path, home)
    except (*STORE_ERRORS, OSError) as exc:
        raise store_failure(exc, path, path.parent) from exc


@contextlib.contextmanager
def _setting_up(directory: Path) -> Iterator[None]:
    """One process at a time opens (and so may create) a store in ``directory``: commands
    started together on a new home (``xargs -P``) raced in eventsourcing's table creation
    ("Failed to record tracking for __migration__ 1") and its switch to WAL ("database is
    locked"). An flock on the directory itself: no file of its own, given back on close."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _open_sqlite_store(path: Path, home: Path) -> EventStore:
    path.parent.mkdir(parents=True, exist_ok=True)
    with _setting_up(path.parent):
        return _set_up_sqlite_store(path, home)


def _set_up_sqlite_store(path: Path, home: Path) -> EventStore:
    env = {
        "PERSISTENCE_MODULE": "eventsourcing.sqlite",
        "SQLITE_DBNAME": str(path),
        "SQLITE_LOCK_TIMEOUT": "30",
        "ORIGINATOR_ID_TYPE": "uuid",
        "CREATE_TABLE": "y",
    }
    factory = InfrastructureFactory.construct(env)
    log = factory.application_recorder()
    views = cast(SQLiteJobViews, factory.tracking_recorder(SQLiteJobViews))
    views.upgrade()
    _private(path)
    return EventStore(
        log,
        views,
        SecretBox.for_home(home),
        kind="sqlite",
        location=str(path),
        factory=factory,
    )


def _private(path: Path) -> None:
    """The log may name servers and files: keep it readable by its owner only."""
    for candidate in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if candidate.exists():
            candidate.chmod(0o600)


def _connect_postgres(env: dict[str, str]) -> Any:
    """A new connection to the store's database, outside the pool (autocommit)."""
    import psycopg

    return psycopg.connect(
        host=env["POSTGRES_HOST"],
        port=int(env["POSTGRES_PORT"]),
        dbname=env["POSTGRES_DBNAME"],
        user=env["POSTGRES_USER"],
        password=env["POSTGRES_PASSWORD"],
        connect_timeout=int(env["POSTGRES_CONNECT_TIMEOUT"]),
        autocommit=True,
    )


def _reach_postgres(env: dict[str, str], where: str) -> None:
    """One connection first, for the server's own words when it cannot be used (no
    server, a refused login, no such database): the pool would only say, after its
    timeout, that it got no connection."""
    import psycopg

    try:
        _connect_postgres(env).close()
    except psycopg.Error as exc:
        raise store_failure(exc, where) from exc


def _open_postgres(url: str, home: Path | None) -> EventStore:
    parts = urlsplit(url)
    if not parts.hostname or not parts.path.strip("/"):
        raise BitsError(
            hresult.E_INVALIDARG,
            f"{redact_url(url)} must name a host and a database "
            "(postgresql://user:password@host:port/dbname)",
        )
    env = {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": unquote(parts.path.strip("/")),
        "POSTGRES_HOST": parts.hostname,
        "POSTGRES_PORT": str(parts.port or 5432),
        "POSTGRES_USER": unquote(parts.username or ""),
        "POSTGRES_PASSWORD": unquote(parts.password or ""),
        "POSTGRES_CONNECT_TIMEOUT": "10",
        "POSTGRES_POOL_SIZE": "4",
        "POSTGRES_MAX_OVERFLOW": "4",
        "CREATE_TABLE": "y",
    }
    from backhaul.adapters.view_postgres import PostgresJobViews

    _reach_postgres(env, redact_url(url))
    # Several processes creating the tables at once can collide in PostgreSQL's catalog
    # ("tuple concurrently updated"): the tables exist afterwards, so try again.
    for attempt in range(8):
        factory = InfrastructureFactory.construct(env)
        try:
            log = factory.application_recorder()
            views = cast(PostgresJobViews, factory.tracking_recorder(PostgresJobViews))
            views.upgrade()
            break
        except (PgInternalError, PgProgrammingError, IntegrityError) as exc:
            factory.close()
            if attempt == 7:
                raise store_failure(exc, redact_url(url)) from exc
            time.sleep(0.05 * 2**attempt)
        except PersistenceError as exc:  # no server there, a refused login, no database
            factory.close()
            raise store_failure(exc, redact_url(url)) from exc
    secrets = SecretBox.for_home(home or default_home())
    return EventStore(
        log,
        views,
        secrets,
        kind="postgresql",
        location=redact_url(url),
        factory=factory,
        connect=functools.partial(_connect_postgres, env),
    )
