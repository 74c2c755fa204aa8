"""Read models: one row per job, kept in the same database as the log, with a tracked
position (eventsourcing's tracking table), rebuildable from zero at any time.

A row holds the columns that listing needs (state, owner, priority, progress, times,
error) and ``doc``, the whole folded Job as JSON (it doubles as a snapshot: loading a job
reads the row, then only the events after its version). Rows and the tracking position
are written in one transaction, so a crash never leaves a view ahead of or behind its
recorded position.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import attrs
from eventsourcing.persistence import Tracking
from eventsourcing.sqlite import SQLiteTrackingRecorder

PROJECTION = "backhaul.jobs"

COLUMNS = (
    "job_id",
    "owner",
    "state",
    "live",
    "job_type",
    "priority",
    "display_name",
    "version",
    "created_at",
    "modified_at",
    "completed_at",
    "bytes_total",
    "bytes_transferred",
    "files_total",
    "files_transferred",
    "error_hresult",
    "error_count",
    "next_due",
    "doc",
)


@attrs.frozen
class ViewRow:
    job_id: str
    owner: str
    state: int
    live: bool
    job_type: int
    priority: int
    display_name: str
    version: int
    created_at: str
    modified_at: str
    completed_at: str | None
    bytes_total: int | None
    bytes_transferred: int
    files_total: int
    files_transferred: int
    error_hresult: int | None
    error_count: int
    next_due: str | None  # when an engine must hold the job (jobtable.wake_at), due_text
    doc: str

    def values(self) -> tuple[Any, ...]:
        return attrs.astuple(self, recurse=False)


def due_text(when: datetime) -> str:
    """A time as ``next_due`` holds it: UTC, always with microseconds, so that the text
    sorts as the time does."""
    return when.astimezone(UTC).isoformat(timespec="microseconds")


def queue_key(row: ViewRow) -> tuple[int, str, str]:
    """Where a row stands in the queue: by priority, then longest waiting (``longest_waiting``
    and ``after`` of ``JobViews.select``)."""
    return (row.priority, row.modified_at, row.job_id)


def _row(values: Sequence[Any]) -> ViewRow:
    data = list(values)
    data[3] = bool(data[3])
    return ViewRow(*data)


class JobViews:
    """What the projection and the manager need from a read-model store."""

    def save(self, rows: Sequence[ViewRow], position: int) -> None:
        raise NotImplementedError

    def position(self) -> int:
        raise NotImplementedError

    def get(self, job_id: str) -> ViewRow | None:
        raise NotImplementedError

    def get_many(self, job_ids: Iterable[str]) -> dict[str, ViewRow]:
        """The rows of these jobs (those that have one), by job id."""
        rows = {}
        for job_id in job_ids:
            row = self.get(job_id)
            if row is not None:
                rows[job_id] = row
        return rows

    def select(
        self,
        owner: str | None,
        *,
        include_final: bool,
        with_doc: bool = False,
        states: Iterable[int] | None = None,
        exclude_states: Iterable[int] = (),
        modified_before: str | None = None,
        modified_since: str | None = None,
        job_types: Iterable[int] | None = None,
        due_by: str | None = None,
        priorities: Iterable[int] | None = None,
        longest_waiting: int | None = None,
        after: tuple[int, str, str] | None = None,
    ) -> list[ViewRow]:
        """Rows ordered by creation; ``doc`` is empty unless ``with_doc``. ``states`` /
        ``exclude_states`` filter by BG_JOB_STATE; ``modified_before`` (an ISO time in UTC,
        as the rows hold it) keeps rows last modified before it, ``modified_since`` those
        modified at or after it; ``job_types`` filters by BG_JOB_TYPE; ``due_by`` (``due_text``)
        keeps rows whose ``next_due`` is set and not after it; ``priorities`` filters by
        BG_JOB_PRIORITY. ``longest_waiting=N``: only the first N rows by priority, then by
        ``modified_at`` (the order the scheduler takes queued jobs in), in that order, and
        with ``after`` (a row's ``(priority, modified_at, job_id)``) only the rows after it."""
        raise NotImplementedError

    def count_live(self, owner: str | None) -> int:
        raise NotImplementedError

    def clear(self) -> None:
        raise NotImplementedError

    def upgrade(self) -> None:
        """Bring a read model written by an older backhaul to this schema."""


def _create_sql(text_type: str, big: str) -> list[str]:
    return [
        "CREATE TABLE IF NOT EXISTS backhaul_job_views ("
        f"job_id {text_type} PRIMARY KEY, owner {text_type} NOT NULL, state INTEGER NOT NULL, "
        "live BOOLEAN NOT NULL, job_type INTEGER NOT NULL, priority INTEGER NOT NULL, "
        f"display_name {text_type} NOT NULL, version INTEGER NOT NULL, "
        f"created_at {text_type} NOT NULL, modified_at {text_type} NOT NULL, "
        f"completed_at {text_type}, bytes_total {big}, bytes_transferred {big} NOT NULL, "
        "files_total INTEGER NOT NULL, files_transferred INTEGER NOT NULL, "
        f"error_hresult {big}, error_count INTEGER NOT NULL, next_due {text_type}, "
        f"doc {text_type} NOT NULL)",
        "CREATE INDEX IF NOT EXISTS backhaul_job_views_list "
        "ON backhaul_job_views (live, owner, created_at, job_id)",
    ]


# Made by ``upgrade``, after the column exists (a read model from before it lacks it).
_DUE_INDEX = "CREATE INDEX IF NOT EXISTS backhaul_job_views_due ON backhaul_job_views (next_due)"
# The queue: QUEUED jobs by priority, longest waiting first (``longest_waiting``).
_QUEUE_INDEX = (
    "CREATE INDEX IF NOT EXISTS backhaul_job_views_queue "
    "ON backhaul_job_views (state, priority, modified_at)"
)


def _upsert_sql(mark: str) -> str:
    cols = ", ".join(COLUMNS)
    marks = ", ".join([mark] * len(COLUMNS))
    updates = ", ".join(f"{c} = excluded.{c}" for c in COLUMNS if c != "job_id")
    # A row never goes back: another process that caught up further first keeps its rows.
    return (
        f"INSERT INTO backhaul_job_views ({cols}) VALUES ({marks}) "
        f"ON CONFLICT (job_id) DO UPDATE SET {updates} "
        "WHERE excluded.version >= backhaul_job_views.version"
    )


_SELECT = f"SELECT {', '.join(COLUMNS)} FROM backhaul_job_views"
# Listing leaves out ``doc`` (the snapshot): rows are then a few dozen bytes, not kilobytes.
_SELECT_LIST = f"SELECT {', '.join(COLUMNS[:-1])}, '' FROM backhaul_job_views"


class _SqlViews(JobViews):
    """Shared SQL for SQLite and PostgreSQL; ``mark`` is the parameter placeholder."""

    mark = "?"
    datastore: Any

    def _tracking(self, c: Any, position: int) -> None:
        raise NotImplementedError

    def _max(self) -> int | None:
        raise NotImplementedError

    def save(self, rows: Sequence[ViewRow], position: int) -> None:
        with self.datastore.transaction(commit=True) as c:
            c.executemany(_upsert_sql(self.mark), [self._params(r) for r in rows])
            self._tracking(c, position)

    def _params(self, row: ViewRow) -> tuple[Any, ...]:
        return row.values()

    def position(self) -> int:
        return self._max() or 0

    def _fetch(self, sql: str, params: Sequence[Any]) -> list[Any]:
        with self.datastore.transaction(commit=False) as c:
            c.execute(sql, params)
            return list(c.fetchall())

    def _tuple(self, record: Any) -> Sequence[Any]:
        return tuple(record)

    def get(self, job_id: str) -> ViewRow | None:
        rows = self._fetch(f"{_SELECT} WHERE job_id = {self.mark}", [job_id])
        return _row(self._tuple(rows[0])) if rows else None

    def get_many(self, job_ids: Iterable[str]) -> dict[str, ViewRow]:
        ids = list(job_ids)
        found: dict[str, ViewRow] = {}
        for start in range(0, len(ids), 500):  # one query per 500 ids, not one per id
            chunk = ids[start : start + 500]
            marks = ", ".join([self.mark] * len(chunk))
            for record in self._fetch(f"{_SELECT} WHERE job_id IN ({marks})", chunk):
                row = _row(self._tuple(record))
                found[row.job_id] = row
        return found

    def select(
        self,
        owner: str | None,
        *,
        include_final: bool,
        with_doc: bool = False,
        states: Iterable[int] | None = None,
        exclude_states: Iterable[int] = (),
        modified_before: str | None = None,
        modified_since: str | None = None,
        job_types: Iterable[int] | None = None,
        due_by: str | None = None,
        priorities: Iterable[int] | None = None,
        longest_waiting: int | None = None,
        after: tuple[int, str, str] | None = None,
    ) -> list[ViewRow]:
        where, params = self._where(owner, include_final)
        extra: list[str] = []
        more: list[Any] = []
        mark = self.mark
        for column, values, test in (
            ("state", states, "IN"),
            ("state", exclude_states or None, "NOT IN"),
            ("job_type", job_types, "IN"),
            ("priority", priorities, "IN"),
        ):
            if values is not None:  # an empty IN () list is SQL no database takes
                listed = [int(x) for x in values] or [-1]
                extra.append(f"{column} {test} ({', '.join([mark] * len(listed))})")
                more += listed
        for test, value in (
            ("modified_at <", modified_before),
            ("modified_at >=", modified_since),
            ("next_due <=", due_by),
        ):
            if value is not None:
                extra.append(f"{test} {mark}")
                more.append(value)
        if after is not None:
            extra.append(
                f"(priority, modified_at, job_id) > ({self.mark}, {self.mark}, {self.mark})"
            )
            more += list(after)
        if extra:
            where = (where + " AND " if where else " WHERE ") + " AND ".join(extra)
            params = [*params, *more]
        head = _SELECT if with_doc else _SELECT_LIST
        order = " ORDER BY created_at, job_id"
        if longest_waiting is not None:
            order = f" ORDER BY priority, modified_at, job_id LIMIT {int(longest_waiting)}"
        rows = self._fetch(f"{head}{where}{order}", params)
        return [_row(self._tuple(r)) for r in rows]

    def upgrade(self) -> None:
        """Bring a read model made by an older backhaul to this schema: add ``next_due``
        and drop the rows and position, so that the next catch-up refolds every job from
        the log (once). Then the index on ``next_due``."""
        with self.datastore.transaction(commit=True) as c:
            if not self._has_next_due(c):
                c.execute(f"ALTER TABLE backhaul_job_views ADD COLUMN {self._add_if} next_due TEXT")
                self._clear(c)
            c.execute(_DUE_INDEX)
            c.execute(_QUEUE_INDEX)

    _add_if = ""

    def _has_next_due(self, c: Any) -> bool:
        raise NotImplementedError

    def _clear(self, c: Any) -> None:
        raise NotImplementedError

    def clear(self) -> None:
        with self.datastore.transaction(commit=True) as c:
            self._clear(c)

    def count_live(self, owner: str | None) -> int:
        where, params = self._where(owner, include_final=False)
        rows = self._fetch(f"SELECT COUNT(*) FROM backhaul_job_views{where}", params)
        return int(self._tuple(rows[0])[0])

    def _where(self, owner: str | None, include_final: bool) -> tuple[str, list[Any]]:
        clauses, params = [], []
        if not include_final:
            clauses.append(f"live = {self.mark}")
            params.append(True)
        if owner is not None:
            clauses.append(f"owner = {self.mark}")
            params.append(owner)
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


class SQLiteJobViews(SQLiteTrackingRecorder, _SqlViews):
    def construct_create_table_statements(self) -> list[str]:
        return [*super().construct_create_table_statements(), *_create_sql("TEXT", "INTEGER")]

    def _tracking(self, c: Any, position: int) -> None:
        self._insert_tracking(c, Tracking(PROJECTION, position))

    def _max(self) -> int | None:
        return self.max_tracking_id(PROJECTION)

    def _has_next_due(self, c: Any) -> bool:
        c.execute("PRAGMA table_info(backhaul_job_views)")
        return any(row[1] == "next_due" for row in c.fetchall())

    def _clear(self, c: Any) -> None:
        c.execute("DELETE FROM backhaul_job_views")
        c.execute("DELETE FROM tracking WHERE application_name = ?", [PROJECTION])


class MemoryJobViews(JobViews):
    def __init__(self) -> None:
        self._rows: dict[str, ViewRow] = {}
        self._position = 0
        self._views_lock = threading.Lock()

    def save(self, rows: Sequence[ViewRow], position: int) -> None:
        with self._views_lock:
            if position < self._position:
                raise ValueError("the view position cannot go back")
            for r in rows:  # a row never goes back (see _upsert_sql)
                old = self._rows.get(r.job_id)
                if old is None or r.version >= old.version:
                    self._rows[r.job_id] = r
            self._position = position

    def position(self) -> int:
        return self._position

    def get(self, job_id: str) -> ViewRow | None:
        return self._rows.get(job_id)

    def select(
        self,
        owner: str | None,
        *,
        include_final: bool,
        with_doc: bool = False,
        states: Iterable[int] | None = None,
        exclude_states: Iterable[int] = (),
        modified_before: str | None = None,
        modified_since: str | None = None,
        job_types: Iterable[int] | None = None,
        due_by: str | None = None,
        priorities: Iterable[int] | None = None,
        longest_waiting: int | None = None,
        after: tuple[int, str, str] | None = None,
    ) -> list[ViewRow]:
        wanted = None if states is None else {int(x) for x in states}
        excluded = {int(x) for x in exclude_states}
        allowed = None if priorities is None else {int(x) for x in priorities}
        kinds = None if job_types is None else {int(x) for x in job_types}
        rows = sorted(
            (
                r
                for r in _matching(self._rows.values(), owner, include_final)
                if (wanted is None or r.state in wanted)
                and r.state not in excluded
                and (modified_before is None or r.modified_at < modified_before)
                and (modified_since is None or r.modified_at >= modified_since)
                and (kinds is None or r.job_type in kinds)
                and (due_by is None or (r.next_due is not None and r.next_due <= due_by))
                and (allowed is None or r.priority in allowed)
            ),
            key=lambda r: (r.created_at, r.job_id),
        )
        if after is not None:
            rows = [r for r in rows if queue_key(r) > after]
        if longest_waiting is not None:
            rows = sorted(rows, key=queue_key)[:longest_waiting]
        return rows if with_doc else [attrs.evolve(r, doc="") for r in rows]

    def count_live(self, owner: str | None) -> int:
        return sum(1 for _ in _matching(self._rows.values(), owner, include_final=False))

    def clear(self) -> None:
        with self._views_lock:
            self._rows.clear()
            self._position = 0


def _matching(rows: Iterable[ViewRow], owner: str | None, include_final: bool) -> Iterable[ViewRow]:
    return (r for r in rows if (include_final or r.live) and (owner is None or r.owner == owner))
