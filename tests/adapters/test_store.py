"""Contract tests for the event store, run against every backend (eventsourcing style).

``StoreContract`` states what any ``EventStore`` must do; each backend subclasses it with
a ``backend`` fixture that opens stores on one location. ``SharedStoreContract`` adds what
only a store shared between processes can show (a second store object on the same
SQLite file or PostgreSQL database), and what the raw database holds at rest.
"""

from __future__ import annotations

import errno
import io
import secrets
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from uuid import uuid4

import attrs
import psycopg
import pytest
from psycopg import sql

from backhaul.adapters import projection
from backhaul.adapters.clock import ManualClock
from backhaul.adapters.manager import TransferManager
from backhaul.adapters.projection import catch_up, rebuild, view_row
from backhaul.adapters.secret import SecretBox
from backhaul.adapters.store import (
    ConcurrentAppend,
    EventStore,
    Recorded,
    StoreUnavailable,
    open_store,
    redact_url,
    store_failure,
)
from backhaul.adapters.view import ViewRow
from backhaul.core import command as cmd
from backhaul.core import event as ev
from backhaul.core import hresult
from backhaul.core.error import BitsError
from backhaul.core.job import fold
from backhaul.core.vocabulary import AuthScheme, AuthTarget, JobState, JobType

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def at(seconds: int) -> datetime:
    return T0 + timedelta(seconds=seconds)


def new_id() -> str:
    return str(uuid4())


def created(job_id: str, name: str = "contract") -> ev.JobCreated:
    return ev.JobCreated(T0, job_id, JobType.DOWNLOAD, name, "contract-owner")


def history(job_id: str, n: int) -> list[ev.Event]:
    """A valid stream of ``n`` events: creation, then settings."""
    return [created(job_id)] + [ev.PropertySet(at(i), "description", f"d{i}") for i in range(1, n)]


@attrs.frozen
class Backend:
    """How a contract opens stores on ONE location and reads its raw bytes."""

    open: Callable[[], EventStore]
    raw: Callable[[], str] | None = None  # everything the database holds at rest, as text


def all_rows(store: EventStore) -> dict[str, ViewRow]:
    rows = {r.job_id: r for r in store.views.select(None, include_final=True, with_doc=True)}
    assert rows == {job_id: store.views.get(job_id) for job_id in rows}
    return rows


def make_jobs(manager: TransferManager, tmp: Path, count: int = 3) -> list[str]:
    """A few jobs with some history each, through the real API."""
    ids = []
    clock = manager.clock
    assert isinstance(clock, ManualClock)
    for i in range(count):
        clock.advance(1)  # distinct creation times: listings are ordered by them
        job = manager.create_job(f"job {i}")
        job.add_file(f"https://example.com/{i}.bin", tmp / f"file-{i}.bin")
        job.description = f"job number {i}"
        if i % 2:
            job.resume()
            manager.execute(job.id, cmd.StartTransfer())
        ids.append(job.id)
    manager.get_job(ids[0]).cancel()
    return ids


def assert_rows_are_folds(store: EventStore, ids: list[str]) -> None:
    """Each job's row is the pure fold of its stream."""
    for job_id in ids:
        job = fold(a.event for a in store.stream(job_id))
        assert job is not None
        assert store.views.get(job_id) == view_row(job)


class StoreContract:
    """What every EventStore must do. Subclasses provide the ``backend`` fixture."""

    @pytest.fixture
    def backend(self) -> Backend:
        raise NotImplementedError

    @pytest.fixture
    def store(self, backend: Backend) -> EventStore:
        return backend.open()

    @pytest.fixture
    def manager(self, store: EventStore) -> TransferManager:
        return TransferManager(store, owner="contract-owner", clock=ManualClock())

    def test_select_by_job_type_and_modified_since(
        self, store: EventStore, manager: TransferManager, tmp_path: Path
    ) -> None:
        """What an engine's start asks for the uploads cancelled lately, on every backend:
        the rows of those only, not of every final job."""
        ids = make_jobs(manager, tmp_path, count=2)  # downloads; the first cancelled
        clock = manager.clock
        assert isinstance(clock, ManualClock)
        clock.advance(3600)
        cutoff = clock.now().isoformat()
        upload = manager.create_job("up", JobType.UPLOAD)
        upload.cancel()
        manager.refresh_views()
        cancelled = [int(JobState.CANCELLED)]
        uploads = [int(JobType.UPLOAD), int(JobType.UPLOAD_REPLY)]

        def ids_of(**filters: Any) -> list[str]:
            rows = store.views.select(None, include_final=True, states=cancelled, **filters)
            return [r.job_id for r in rows]

        assert ids_of() == [ids[0], upload.id]
        assert ids_of(job_types=uploads) == [upload.id]
        assert ids_of(modified_since=cutoff) == [upload.id]
        assert ids_of(job_types=[int(JobType.DOWNLOAD)], modified_since=cutoff) == []

    # -- append and stream -------------------------------------------------------------

    def test_stream_gives_the_appended_events_in_order_with_versions(
        self, store: EventStore
    ) -> None:
        job_id = new_id()
        events = history(job_id, 4)
        store.append(job_id, 0, events[:1])
        store.append(job_id, 1, events[1:])

        stream = store.stream(job_id)

        assert [a.version for a in stream] == [1, 2, 3, 4]
        assert [a.event for a in stream] == events
        assert {a.job_id for a in stream} == {job_id}
        assert [a.version for a in store.stream(job_id, 2)] == [3, 4]
        assert store.stream(job_id, 4) == []
        assert fold(a.event for a in stream) is not None

    def test_stream_of_an_unknown_job_is_empty(self, store: EventStore) -> None:
        assert store.stream(new_id()) == []

    def test_append_returns_increasing_positions_and_moves_the_head(
        self, store: EventStore
    ) -> None:
        before = store.head()
        a, b = new_id(), new_id()
        first = store.append(a, 0, history(a, 2))
        second = store.append(b, 0, history(b, 3))

        assert len(first) == 2
        assert len(second) == 3
        positions = first + second
        assert positions == sorted(positions)
        assert len(set(positions)) == 5
        assert positions[0] > before
        assert store.head() == positions[-1]

    def test_append_of_nothing_appends_nothing(self, store: EventStore) -> None:
        before = store.head()
        assert store.append(new_id(), 0, []) == []
        assert store.append_many([]) == []
        assert store.head() == before

    def test_append_many_writes_several_streams_in_one_go(self, store: EventStore) -> None:
        a, b, c = new_id(), new_id(), new_id()
        store.append(c, 0, history(c, 1))
        before = store.head()

        positions = store.append_many(
            [(a, 0, history(a, 2)), (b, 0, history(b, 3)), (c, 1, history(c, 2)[1:])]
        )

        assert len(positions) == 6
        assert store.head() == before + 6
        assert [x.version for x in store.stream(a)] == [1, 2]
        assert [x.version for x in store.stream(b)] == [1, 2, 3]
        assert [x.version for x in store.stream(c)] == [1, 2]

    def test_append_many_may_append_to_one_stream_several_times_in_order(
        self, store: EventStore
    ) -> None:
        job_id = new_id()
        events = history(job_id, 3)
        store.append_many([(job_id, 0, events[:1]), (job_id, 1, events[1:])])
        assert [(a.version, a.event) for a in store.stream(job_id)] == list(
            enumerate(events, start=1)
        )

    def test_append_after_a_version_the_stream_has_not_reached_raises_concurrent_append(
        self, store: EventStore
    ) -> None:
        job_id = new_id()
        store.append(job_id, 0, history(job_id, 2))
        before = store.head()
        with pytest.raises(ConcurrentAppend):
            store.append(job_id, 5, [ev.PropertySet(at(9), "description", "from the future")])
        assert store.head() == before
        assert [a.version for a in store.stream(job_id)] == [1, 2]

    def test_append_many_is_all_or_nothing_when_one_stream_conflicts(
        self, store: EventStore
    ) -> None:
        a, b = new_id(), new_id()
        store.append(a, 0, history(a, 2))
        before = store.head()
        stale = ev.PropertySet(at(99), "description", "stale writer")

        with pytest.raises(ConcurrentAppend):
            store.append_many([(b, 0, history(b, 3)), (a, 1, [stale])])

        assert store.head() == before
        assert store.stream(b) == []
        assert [x.event for x in store.stream(a)] == history(a, 2)

    def test_append_on_a_taken_version_raises_concurrent_append_and_appends_nothing(
        self, store: EventStore
    ) -> None:
        job_id = new_id()
        store.append(job_id, 0, history(job_id, 2))
        before = store.head()
        first = ev.PropertySet(at(10), "description", "first writer")
        second = ev.PropertySet(at(11), "description", "second writer")
        store.append(job_id, 2, [first])

        with pytest.raises(ConcurrentAppend):
            store.append(job_id, 2, [second, second])

        assert store.head() == before + 1
        assert [x.event for x in store.stream(job_id, 2)] == [first]

    def test_racing_writers_on_one_version_let_exactly_one_win(self, store: EventStore) -> None:
        job_id = new_id()
        store.append(job_id, 0, history(job_id, 1))
        writers = 6
        barrier = threading.Barrier(writers)
        outcomes: list[str] = []
        lock = threading.Lock()

        def write(n: int) -> None:
            event = ev.PropertySet(at(n), "description", f"writer {n}")
            barrier.wait()
            try:
                store.append(job_id, 1, [event])
                result = "won"
            except ConcurrentAppend:
                result = "lost"
            with lock:
                outcomes.append(result)

        threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)

        assert sorted(outcomes) == ["lost"] * (writers - 1) + ["won"]
        assert [x.version for x in store.stream(job_id)] == [1, 2]

    # -- the global log --------------------------------------------------------------

    def test_read_pages_give_the_global_order_of_appends(self, store: EventStore) -> None:
        jobs = [new_id() for _ in range(3)]
        versions = dict.fromkeys(jobs, 0)
        appended: list[tuple[str, int]] = []
        for step in range(12):
            job_id = jobs[(step * 7) % 3]
            batch = history(job_id, 1) if versions[job_id] == 0 else []
            batch += [ev.PropertySet(at(step), "description", f"step {step}")]
            store.append(job_id, versions[job_id], batch)
            for _ in batch:
                versions[job_id] += 1
                appended.append((job_id, versions[job_id]))

        everything = store.read(0, 1000)
        paged, after = [], 0
        while page := store.read(after, 5):
            assert len(page) <= 5
            paged += page
            after = page[-1].position

        assert paged == everything
        assert list(store.read_all(0, batch=2)) == everything
        assert [(r.job_id, r.version) for r in everything] == appended
        positions = [r.position for r in everything]
        assert positions == sorted(set(positions))
        assert positions[-1] == store.head()
        assert store.read(positions[3], 2) == everything[4:6]
        for r in everything:
            assert store.stream(r.job_id)[r.version - 1].event == r.event

    # -- read models -----------------------------------------------------------------

    def test_catch_up_folds_every_stream_into_its_row(
        self, store: EventStore, manager: TransferManager, tmp_path: Path
    ) -> None:
        ids = make_jobs(manager, tmp_path)
        assert catch_up(store) == store.head()
        assert store.views.position() == store.head()
        rows = all_rows(store)
        assert set(rows) == set(ids)
        for job_id in ids:
            job = fold(a.event for a in store.stream(job_id))
            assert job is not None
            assert rows[job_id] == view_row(job)

    def test_catch_up_is_idempotent(
        self, store: EventStore, manager: TransferManager, tmp_path: Path
    ) -> None:
        make_jobs(manager, tmp_path)
        position = catch_up(store)
        rows = all_rows(store)

        assert catch_up(store) == position
        assert catch_up(store) == position
        assert all_rows(store) == rows
        assert store.views.position() == position

    def test_catch_up_after_more_events_updates_only_what_changed(
        self, store: EventStore, manager: TransferManager, tmp_path: Path
    ) -> None:
        ids = make_jobs(manager, tmp_path)
        catch_up(store)
        before = all_rows(store)
        manager.get_job(ids[1]).description = "changed after the first catch-up"

        catch_up(store)

        after = all_rows(store)
        assert after[ids[1]].version == before[ids[1]].version + 1
        assert {k: v for k, v in after.items() if k != ids[1]} == {
            k: v for k, v in before.items() if k != ids[1]
        }

    def test_catch_up_in_small_pages_reads_a_spanning_job_once(
        self,
        store: EventStore,
        manager: TransferManager,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A job whose events span several saves is carried from one to the next, not
        read back from the row it just saved; the rows still equal a pure fold."""
        ids = make_jobs(manager, tmp_path, count=4)
        manager.refresh_views()  # left to catch up: the one job's events only
        long = manager.get_job(ids[1])
        for i in range(9):
            long.description = f"edit {i}"
        monkeypatch.setattr(projection, "BATCH", 2)
        monkeypatch.setattr(projection, "SAVE_EVENTS", 2)  # a save after every page
        asked: list[str] = []
        get_many = store.views.get_many

        def recorded(job_ids: dict[str, None]) -> dict[str, ViewRow]:
            asked.extend(job_ids)
            return get_many(job_ids)

        monkeypatch.setattr(store.views, "get_many", recorded)

        assert catch_up(store) == store.head()

        assert_rows_are_folds(store, ids)
        assert asked.count(ids[1]) == 1, asked

    def test_catch_up_saves_rows_once_per_several_pages(
        self,
        store: EventStore,
        manager: TransferManager,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Jobs that appear in page after page (every job moving through its states) are
        written once per save, and a save comes every SAVE_EVENTS events, not per page."""
        ids = make_jobs(manager, tmp_path, count=6)
        for job_id in ids[1:]:
            manager.get_job(job_id).description = "edited after all were created"
        events = store.head() - store.views.position()
        monkeypatch.setattr(projection, "BATCH", 3)
        monkeypatch.setattr(projection, "SAVE_EVENTS", 12)
        saves: list[tuple[int, int]] = []
        save = store.views.save

        def recorded(rows: list[ViewRow], position: int) -> None:
            saves.append((len(rows), position))
            save(rows, position)

        monkeypatch.setattr(store.views, "save", recorded)

        assert catch_up(store) == store.head()

        assert len(saves) == -(-events // 12), saves
        assert saves[-1][1] == store.head()
        assert [p for _, p in saves] == sorted(p for _, p in saves)
        assert sum(n for n, _ in saves) < events
        assert_rows_are_folds(store, ids)

    def test_a_managers_own_appends_are_saved_from_its_copies_not_read_back(
        self,
        store: EventStore,
        manager: TransferManager,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """After this manager's own appends, refresh_views saves their rows from its copies
        and reads none of them back; another writer's event in between ends the shortcut.
        Either way the rows equal a pure fold."""
        manager.refresh_views()
        with manager.batch():
            ids = []
            for i in range(3):
                job = manager.create_job(f"batched {i}")
                job.add_file(f"https://example.com/{i}.bin", tmp_path / f"b{i}.bin")
                job.resume()
                ids.append(job.id)
        manager.get_job(ids[0]).description = "one more, still this manager's"
        read_back: list[str] = []
        read = store.read

        def recorded(after: int = 0, limit: int = 1000) -> list[Recorded]:
            records = read(after, limit)
            read_back.extend(r.job_id for r in records)
            return records

        monkeypatch.setattr(store, "read", recorded)

        assert manager.refresh_views() == store.head()
        assert read_back == []
        assert_rows_are_folds(store, ids)

        other = TransferManager(store, owner="contract-owner", clock=ManualClock())
        manager.get_job(ids[1]).description = "before the other writer"
        other.get_job(ids[2]).description = "the other writer"
        manager.get_job(ids[1]).description = "after the other writer"
        assert manager.refresh_views() == store.head()
        assert read_back.count(ids[2]) == 1
        assert_rows_are_folds(store, ids)

    def test_a_row_never_goes_back_to_an_older_version(
        self, store: EventStore, manager: TransferManager, tmp_path: Path
    ) -> None:
        """Another process that caught up further first keeps its newer row."""
        job_id = make_jobs(manager, tmp_path, count=1)[0]
        stream = [a.event for a in store.stream(job_id)]
        newer, older = fold(stream), fold(stream[:-1])
        assert newer is not None and older is not None
        head = store.head()
        store.views.save([view_row(newer)], head)
        store.views.save([view_row(older)], head + 1)
        assert store.views.get(job_id) == view_row(newer)

    def test_rebuild_gives_identical_rows(
        self, store: EventStore, manager: TransferManager, tmp_path: Path
    ) -> None:
        make_jobs(manager, tmp_path)
        position = catch_up(store)
        rows = all_rows(store)

        assert rebuild(store) == position
        assert all_rows(store) == rows
        assert store.views.position() == position

    def test_rows_hold_the_listing_columns(
        self, store: EventStore, manager: TransferManager, tmp_path: Path
    ) -> None:
        ids = make_jobs(manager, tmp_path)
        catch_up(store)
        live = {r.job_id for r in store.views.select("contract-owner", include_final=False)}
        assert live == set(ids[1:])  # the first job was cancelled
        assert store.views.select("somebody-else", include_final=True) == []
        assert store.views.count_live("contract-owner") == len(ids) - 1
        assert store.views.count_live(None) == len(ids) - 1
        assert store.views.get(new_id()) is None
        listing = store.views.select(None, include_final=True)  # without the snapshot
        assert [attrs.evolve(r, doc="") for r in listing] == [
            attrs.evolve(r, doc="") for r in all_rows(store).values()
        ]
        assert [r.job_id for r in listing] == ids  # in creation order

    # -- secrets at rest ---------------------------------------------------------------

    def plant_secrets(self, manager: TransferManager, tmp_path: Path) -> tuple[str, list[str]]:
        password, header_value = secrets.token_hex(12), secrets.token_hex(12)
        assert len(password) == len(header_value) == 24
        job = manager.create_job("secret holder")
        job.add_file("https://example.com/secret.bin", tmp_path / "secret.bin")
        job.set_credentials(AuthTarget.SERVER, AuthScheme.BASIC, "alice", password)
        job.set_credentials(AuthTarget.PROXY, AuthScheme.NEGOTIATE, None, password)
        job.set_custom_headers(f"X-Api-Key: {header_value}\r\nX-Other: 1\r\n")
        assert job.custom_headers == f"X-Api-Key: {header_value}\r\nX-Other: 1\r\n"
        manager.refresh_views()
        return job.id, [password, header_value]

    def test_secrets_never_appear_in_the_log_or_the_views(
        self, store: EventStore, manager: TransferManager, tmp_path: Path
    ) -> None:
        job_id, markers = self.plant_secrets(manager, tmp_path)
        stored = [
            bytes(n.state).decode("utf-8", "replace") + n.topic
            for n in store.log.select_notifications(start=None, limit=10_000)
        ]
        rows = [repr(r.values()) for r in all_rows(store).values()]
        for marker in markers:
            assert not any(marker in text for text in stored), "a secret is in the log"
            assert not any(marker in text for text in rows), "a secret is in a view row"
        assert marker_free(repr(fold(a.event for a in store.stream(job_id))), markers)


def marker_free(text: str, markers: list[str]) -> bool:
    return not any(m in text or m.encode().hex() in text for m in markers)


class SharedStoreContract(StoreContract):
    """Stores that other processes open too: a second store object on the same location
    sees everything, and the database at rest holds no secret in plain text."""

    def test_a_second_store_sees_the_first_ones_events_and_views(
        self, backend: Backend, store: EventStore, manager: TransferManager, tmp_path: Path
    ) -> None:
        ids = make_jobs(manager, tmp_path)
        manager.refresh_views()
        other = backend.open()

        assert other.head() == store.head()
        assert other.views.position() == store.views.position()
        assert all_rows(other) == all_rows(store)
        for job_id in ids:
            assert other.stream(job_id) == store.stream(job_id)
        assert other.read(0, 1000) == store.read(0, 1000)

    def test_a_manager_on_a_second_store_sees_live_jobs_both_ways(
        self, backend: Backend, store: EventStore, manager: TransferManager, tmp_path: Path
    ) -> None:
        ids = make_jobs(manager, tmp_path)
        handle = manager.get_job(ids[1])
        handle.set_custom_headers("X-Shared: yes\r\n")
        other = TransferManager(backend.open(), owner="contract-owner", clock=ManualClock())

        theirs = other.get_job(ids[1])
        assert theirs.snapshot() == handle.snapshot()
        assert theirs.custom_headers == "X-Shared: yes\r\n"  # the same secret key

        theirs.description = "written through the second store"
        assert handle.description == "written through the second store"
        handle.suspend()
        assert theirs.state == handle.state
        assert {j.id for j in other.jobs()} == set(ids[1:])

    def test_catch_up_racing_another_store_on_the_same_database_does_not_fail(
        self,
        backend: Backend,
        store: EventStore,
        manager: TransferManager,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Two processes list jobs at the same moment: both catch up the same page, and the
        second to save finds the position already recorded. That is not an error: the rows
        it would write are the ones already there."""
        ids = make_jobs(manager, tmp_path)
        other = backend.open()
        save = store.views.save

        def other_process_saves_first(rows: list[ViewRow], position: int) -> None:
            assert catch_up(other) == position
            save(rows, position)

        monkeypatch.setattr(store.views, "save", other_process_saves_first)

        assert catch_up(store) == store.head()

        monkeypatch.undo()
        assert store.views.position() == other.views.position() == store.head()
        for job_id in ids:
            job = fold(a.event for a in store.stream(job_id))
            assert job is not None
            assert store.views.get(job_id) == other.views.get(job_id) == view_row(job)

    def test_concurrent_append_through_two_store_objects_appends_once(
        self, backend: Backend, store: EventStore
    ) -> None:
        job_id = new_id()
        store.append(job_id, 0, history(job_id, 1))
        other = backend.open()
        mine = ev.PropertySet(at(1), "description", "mine")
        theirs = ev.PropertySet(at(2), "description", "theirs")

        other.append(job_id, 1, [theirs])
        with pytest.raises(ConcurrentAppend):
            store.append(job_id, 1, [mine])

        assert [a.event for a in store.stream(job_id, 1)] == [theirs]
        assert store.head() == other.head()

    def test_secrets_never_appear_in_the_raw_database(
        self, backend: Backend, store: EventStore, manager: TransferManager, tmp_path: Path
    ) -> None:
        assert backend.raw is not None
        _, markers = self.plant_secrets(manager, tmp_path)
        raw = backend.raw()
        assert "secret holder" in raw  # the dump does see the data...
        assert "X-Other" not in raw  # ...and the sealed headers are not readable in it
        for marker in markers:
            assert marker not in raw, "a secret is stored in plain text"
            assert marker.encode().hex() not in raw, "a secret is stored as plain bytes"


# -- the backends ----------------------------------------------------------------------------


def closing(
    opened: list[EventStore], factory: Callable[[], EventStore]
) -> Callable[[], EventStore]:
    def open_one() -> EventStore:
        store = factory()
        opened.append(store)
        return store

    return open_one


class TestMemoryStore(StoreContract):
    @pytest.fixture
    def backend(self) -> Iterator[Backend]:
        opened: list[EventStore] = []
        yield Backend(closing(opened, lambda: open_store("memory:")))
        for store in opened:
            store.close()


class TestSQLiteStore(SharedStoreContract):
    @pytest.fixture
    def backend(self, tmp_path: Path) -> Iterator[Backend]:
        path = tmp_path / "home" / "backhaul.db"
        opened: list[EventStore] = []

        def raw() -> str:
            data = b"".join(
                p.read_bytes() for p in (path, path.with_name(path.name + "-wal")) if p.exists()
            )
            return data.decode("latin-1")

        yield Backend(closing(opened, lambda: open_store(f"sqlite://{path}")), raw)
        for store in opened:
            store.close()


@pytest.mark.peer
class TestPostgreSQLStore(SharedStoreContract):
    @pytest.fixture
    def backend(self, postgres_url: str, tmp_path: Path) -> Iterator[Backend]:
        opened: list[EventStore] = []
        home = tmp_path / "home"

        def raw() -> str:
            texts = []
            with psycopg.connect(postgres_url, connect_timeout=10) as conn:
                tables = conn.execute(
                    "SELECT table_schema, table_name FROM information_schema.tables "
                    "WHERE table_type = 'BASE TABLE' "
                    "AND table_schema NOT IN ('pg_catalog', 'information_schema')"
                ).fetchall()
                assert tables
                for schema, table in tables:
                    query = sql.SQL("SELECT t::text FROM {}.{} AS t").format(
                        sql.Identifier(schema), sql.Identifier(table)
                    )
                    texts += [row[0] for row in conn.execute(query)]
            return "\n".join(texts)

        yield Backend(closing(opened, lambda: open_store(postgres_url, home)), raw)
        for store in opened:
            store.close()


def test_a_store_that_cannot_be_used_is_a_typed_error_with_its_hresult(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not a database (a broken or foreign file): opening it raises StoreUnavailable, and
    every command says so in one line with the HRESULT, no traceback, exit 1. A full disk
    is ERROR_DISK_FULL, a refusal E_ACCESSDENIED."""
    from backhaul.adapters.cli import main

    home = tmp_path / "home"
    home.mkdir()
    (home / "backhaul.db").write_bytes(b"not a database, " * 512)
    with pytest.raises(StoreUnavailable) as refused:
        open_store(home=home)
    assert refused.value.hresult == hresult.E_FAIL
    for argv in (["list"], ["create", "x"]):
        assert main(["--home", str(home), *argv], io.StringIO()) == 1
        err = capsys.readouterr().err
        assert err == (
            f"backhaul {argv[0]}: the store {home / 'backhaul.db'} cannot be used: file is not "
            "a database [E_FAIL 0x80004005]\n"
        )
    full = store_failure(OSError(errno.ENOSPC, "No space left on device"), home)
    assert full.hresult == hresult.hresult_from_win32(hresult.ERROR_DISK_FULL)
    assert str(full).endswith("(the disk is full) [HRESULT_FROM_WIN32(ERROR_DISK_FULL) 0x80070070]")
    readonly = sqlite3.OperationalError("attempt to write a readonly database")
    assert store_failure(readonly, home).hresult == hresult.E_ACCESSDENIED


def test_a_postgresql_store_that_cannot_be_reached_is_a_typed_error_without_its_password(
    postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The real server, a database that does not exist, then a wrong password: the command
    says at once why the store cannot be used, in the server's words, with the URL's
    password hidden; a refused login is E_ACCESSDENIED."""
    from backhaul.adapters.cli import main

    parts = urlsplit(postgres_url)
    assert parts.password
    missing = postgres_url.rsplit("/", 1)[0] + "/no_such_database"
    assert main(["--store", missing, "list"], io.StringIO()) == 1
    err = capsys.readouterr().err
    assert err.startswith("backhaul list: the store postgresql://") and "cannot be used: " in err
    assert 'database "no_such_database" does not exist' in err and "[E_FAIL 0x80004005]" in err
    assert parts.password not in err
    wrong = postgres_url.replace(f":{parts.password}@", ":not-the-password@")
    assert main(["--store", wrong, "list"], io.StringIO()) == 1
    err = capsys.readouterr().err
    assert "password authentication failed" in err and "[E_ACCESSDENIED 0x80070005]" in err
    assert "not-the-password" not in err


_OPEN_AT_ONCE = """
import sys, time
from pathlib import Path
from backhaul.adapters.manager import TransferManager
home, start = Path(sys.argv[1]), float(sys.argv[2])
time.sleep(max(start - time.time(), 0))
with TransferManager(home=home) as manager:
    job = manager.create_job("together")
    job.add_file("http://127.0.0.1:9/f?X-Amz-Signature=s3cret", home.parent / f"{job.id}.bin")
    assert manager.store.secrets.open_url(*manager.store.secrets.seal_url("http://h/?a=b")) == "http://h/?a=b"
print(job.id)
"""


def test_commands_started_together_on_a_new_home_all_open_one_store_with_one_key(
    tmp_path: Path,
) -> None:
    """`xargs -P 20 backhaul get` on a home that does not exist yet: every process opens
    the same new store (eventsourcing's table creation and its switch to WAL raced: some
    failed with "database is locked" or "Failed to record tracking for __migration__ 1"),
    and all of them use the one key the first one made (one read it half-written)."""
    for round_ in range(3):
        home = tmp_path / f"home{round_}"
        start = time.time() + 1.5  # every interpreter is up by then: they open at once
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _OPEN_AT_ONCE, str(home), str(start)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(16)
        ]
        outputs = [p.communicate(timeout=60) for p in procs]
        failed = [err for p, (_, err) in zip(procs, outputs, strict=True) if p.returncode]
        assert not failed, failed[0]
        ids = {out.strip() for out, _ in outputs}
        with TransferManager(home=home) as manager:
            assert {job.id for job in manager.jobs()} == ids and len(ids) == 16
            for job in manager.jobs():  # each sealed its signature with the one key
                assert (
                    manager.store.secrets.open(job.snapshot().files[0].spec.query)
                    == "X-Amz-Signature=s3cret"
                )
        assert [p.name for p in home.iterdir() if p.name.startswith(".secret.key")] == []


def _key_of(home: Path, barrier: threading.Barrier, keys: list[str], errors: list[object]) -> None:
    barrier.wait()
    try:
        box = SecretBox.for_home(home)
        assert box.open(box.seal("x")) == "x"
        keys.append((home / "secret.key").read_text())
    except BaseException as exc:  # the test reports it
        errors.append(exc)


def test_threads_making_the_homes_key_at_once_all_get_the_one_key_written(
    tmp_path: Path,
) -> None:
    """The key file appears whole or not at all: one that reads it while another writes it
    gets the whole key, never an empty one or a FileExistsError."""
    for round_ in range(20):
        home = tmp_path / f"home{round_}"
        keys: list[str] = []
        errors: list[object] = []
        barrier = threading.Barrier(8)
        threads = [
            threading.Thread(target=_key_of, args=(home, barrier, keys, errors)) for _ in range(8)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[0]
        assert len(set(keys)) == 1 and keys[0]
        assert sorted(p.name for p in home.iterdir()) == ["secret.key"]


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://bh:SEKRIT-1@127.0.0.1:9/db",  # a scheme the stores do not read
        "mysql://bh:SEKRIT-1@127.0.0.1/db",
        "sqlite://bh:SEKRIT-1@x/db",
        "postgresql://bh@127.0.0.1:9/db?password=SEKRIT-1&sslmode=disable",
        "postgresql://bh@127.0.0.1:9/db?sslpassword=SEKRIT-1",
    ],
)
def test_a_store_url_that_cannot_be_used_is_named_without_its_secrets(url: str) -> None:
    """The messages printed by the command showed the password of a store URL whose scheme
    is not a store's, and a password given as a query parameter."""
    with pytest.raises(BitsError) as refused:
        open_store(url)
    assert "SEKRIT" not in str(refused.value)
    assert "127.0.0.1" in str(refused.value) or "db" in str(refused.value)
    assert redact_url(url).count("***") == 1
