"""Which jobs the engine holds in memory: only those whose time is near (read model's
``next_due``, ``jobtable.wake_at``), so that 100,000 jobs waiting for a retry, TRANSFERRED or
SUSPENDED cost neither start-up nor memory. Each test checks that a job left out still does
everything it must, when it must: retry, run its notify command line, be scavenged."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
from datetime import timedelta
from pathlib import Path

from test_engine import FaultServer, KiB, Served, make_engine, new_job, running, stays, until

from backhaul.adapters.clock import ManualClock
from backhaul.adapters.engine import Engine
from backhaul.adapters.jobtable import wake_at
from backhaul.adapters.manager import TransferJob, TransferManager
from backhaul.adapters.projection import catch_up
from backhaul.adapters.view import due_text
from backhaul.core.vocabulary import JobState as S
from backhaul.core.vocabulary import NotifyFlags

SCAN = 60.0  # the engine's idle_scan_interval here (its default)


def after_start(engine: Engine) -> list[int]:
    """Filled, once the engine's start-up has loaded its jobs, with how many it holds."""
    held: list[int] = []
    start = engine._start

    async def counted_start() -> None:
        await start()
        held.append(len(engine._jobs))

    engine._start = counted_start  # type: ignore[method-assign]
    return held


async def failed_once(
    manager: TransferManager, srv: FaultServer, dest: Path, *, retry_delay: int
) -> TransferJob:
    """A job of ``/f`` (which answers 503 first) run by an engine until it waits in
    TRANSIENT_ERROR for its retry, ``retry_delay`` seconds away; the engine is stopped."""
    job = new_job(manager, [(srv.url("/f"), dest)], minimum_retry_delay=retry_delay)
    async with running(make_engine(manager)):
        await until(lambda: job.state is S.TRANSIENT_ERROR, "the 503")
    return job


def test_wake_at_gives_the_time_an_engine_must_hold_each_job(tmp_path: Path) -> None:
    clock = ManualClock()
    manager = TransferManager(home=tmp_path / "home", clock=clock)
    job = new_job(manager, [("http://127.0.0.1:9/f", tmp_path / "f")], start=False)
    snap = job.snapshot()
    assert snap.state is S.SUSPENDED and wake_at(snap) is None
    job.resume()
    queued = job.snapshot()
    assert wake_at(queued) == queued.modified_at  # QUEUED: always
    manager.refresh_views()
    row = manager.store.views.get(job.id)
    assert row is not None and row.next_due == due_text(queued.modified_at)
    job.cancel()
    manager.refresh_views()
    row = manager.store.views.get(job.id)
    assert row is not None and row.next_due is None and not row.live


def test_a_job_waiting_for_a_far_retry_is_loaded_only_when_its_time_is_near(
    tmp_path: Path,
) -> None:
    """Restarted with a job in TRANSIENT_ERROR whose retry is 600 s away, the engine does not
    load it; a scan loads it once the retry is within two scans, and the retry runs then,
    not earlier, not later."""
    clock = ManualClock()
    data = os.urandom(48 * KiB)

    async def main() -> TransferJob:
        async with FaultServer({"/f": Served(data, statuses=[503])}) as srv:
            manager = TransferManager(home=tmp_path / "home", clock=clock)
            job = await failed_once(manager, srv, tmp_path / "f", retry_delay=600)
            assert len(srv.hits_for("/f")) == 1
            engine = make_engine(manager)
            started = after_start(engine)
            async with running(engine):
                await until(lambda: bool(started), "start-up")
                assert started == [0], "a job waiting 600 s was loaded at start"
                assert job.id not in engine._jobs
                clock.advance(600 - 3 * SCAN)  # the retry is 3 scans away: not yet
                await stays(lambda: job.id not in engine._jobs, "loaded too early")
                clock.advance(SCAN + 1)  # within two scans now
                await until(lambda: job.id in engine._jobs, "the scan to load it")
                await stays(lambda: len(srv.hits_for("/f")) == 1, "retried before its time")
                clock.advance(2 * SCAN)
                await until(lambda: job.state is S.TRANSFERRED, "the retry")
            return job

    job = asyncio.run(main())
    job.complete()
    assert (tmp_path / "f").read_bytes() == data


def test_the_engine_lets_go_of_a_job_whose_retry_is_far_and_an_event_brings_it_back(
    tmp_path: Path,
) -> None:
    """A job that fails while the engine runs stays loaded until the next scan, which lets
    it go (its retry is far). A client's event loads it again from its snapshot, and the
    engine then runs it as usual."""
    clock = ManualClock()
    data = os.urandom(48 * KiB)
    client = TransferManager(home=tmp_path / "home", clock=clock)

    async def main() -> TransferJob:
        async with FaultServer({"/f": Served(data, statuses=[503])}) as srv:
            manager = TransferManager(home=tmp_path / "home", clock=clock)
            job = new_job(manager, [(srv.url("/f"), tmp_path / "f")], minimum_retry_delay=3600)
            engine = make_engine(manager)
            async with running(engine):
                await until(lambda: job.state is S.TRANSIENT_ERROR, "the 503")
                assert job.id in engine._jobs
                clock.advance(SCAN)
                await until(lambda: job.id not in engine._jobs, "the scan to let it go")
                assert engine.logged(job.id) is None
                client.get_job(job.id).suspend()
                await until(lambda: job.id in engine._jobs, "the event to load it")
                assert engine._jobs[job.id].state is S.SUSPENDED
                client.get_job(job.id).resume()
                await until(lambda: job.state is S.TRANSFERRED, "the transfer")
            return job

    job = asyncio.run(main())
    job.complete()
    assert (tmp_path / "f").read_bytes() == data


def test_serve_until_idle_waits_for_a_retry_even_when_it_is_far(tmp_path: Path) -> None:
    """``run(until_idle=True)`` (``backhaul serve --until-idle``) holds every waiting job:
    a job waiting for its retry is work left, loaded at start or not."""
    clock = ManualClock()
    data = os.urandom(16 * KiB)

    async def main() -> None:
        async with FaultServer({"/f": Served(data, statuses=[503])}) as srv:
            manager = TransferManager(home=tmp_path / "home", clock=clock)
            job = await failed_once(manager, srv, tmp_path / "f", retry_delay=3600)
            engine = make_engine(manager)
            task = asyncio.create_task(engine.run(until_idle=True))
            await asyncio.sleep(0.3)
            assert not task.done(), "serve --until-idle stopped with a retry pending"
            assert job.id in engine._jobs
            clock.advance(3600)
            await asyncio.wait_for(task, 10)
            assert job.state is S.TRANSFERRED

    asyncio.run(main())


def test_a_transferred_job_with_a_notify_command_line_is_loaded_and_runs_it(
    tmp_path: Path,
) -> None:
    """TRANSFERRED jobs are not loaded at start, except those whose notify command line is
    due: a restarted engine loads that one and runs its program."""
    marker = tmp_path / "ran"
    data = os.urandom(16 * KiB)

    async def main() -> tuple[TransferJob, TransferJob, set[str]]:
        async with FaultServer({"/f": Served(data)}) as srv:
            manager = TransferManager(home=tmp_path / "home")
            plain = new_job(manager, [(srv.url("/f"), tmp_path / "plain")])
            notified = new_job(manager, [(srv.url("/f"), tmp_path / "notified")])
            async with running(make_engine(manager)):
                await until(lambda: plain.state is S.TRANSFERRED, "plain")
                await until(lambda: notified.state is S.TRANSFERRED, "notified")
            program = (
                "import os, pathlib, sys; "
                f"pathlib.Path({str(marker)!r}).write_text(os.environ['BACKHAUL_JOB_ID'])"
            )
            notified.notify_flags = NotifyFlags.JOB_TRANSFERRED
            notified.set_notify_cmdline(sys.executable, "-c", program)
            engine = make_engine(manager)
            async with running(engine):
                await until(marker.exists, "the command line to run")
                loaded = set(engine._jobs)
            return plain, notified, loaded

    plain, notified, loaded = asyncio.run(main())
    assert marker.read_text() == notified.id
    assert plain.id not in loaded, "a TRANSFERRED job without a command line was loaded"
    assert plain.state is S.TRANSFERRED


def test_a_read_model_from_before_next_due_is_upgraded_and_refolded(tmp_path: Path) -> None:
    """A store whose read model has no ``next_due`` column (written by an older backhaul)
    gets it when opened, with every row folded again from the log."""
    home = tmp_path / "home"
    manager = TransferManager(home=home)
    waiting = new_job(manager, [("http://127.0.0.1:9/f", tmp_path / "f")])
    manager.refresh_views()
    manager.close()
    db = sqlite3.connect(home / "backhaul.db")
    db.execute("DROP INDEX backhaul_job_views_due")
    db.execute("ALTER TABLE backhaul_job_views DROP COLUMN next_due")
    db.commit()
    db.close()
    reopened = TransferManager(home=home)
    assert reopened.store.views.position() == 0, "the old rows were kept"
    catch_up(reopened.store)
    row = reopened.store.views.get(waiting.id)
    assert row is not None and row.state == int(S.QUEUED)
    assert row.next_due == due_text(reopened.get_job(waiting.id).snapshot().modified_at)
    due = reopened.store.views.select(None, include_final=False, due_by="9999")
    assert [r.job_id for r in due] == [waiting.id]
    reopened.close()


def test_due_text_sorts_as_the_times_do() -> None:
    from datetime import UTC, datetime

    times = [
        datetime(2026, 1, 1, tzinfo=UTC),
        datetime(2026, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
        datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC) + timedelta(hours=-1),
        datetime(2026, 1, 1, 2, tzinfo=UTC).astimezone(),
    ]
    assert sorted(times) == sorted(times, key=due_text)


def test_a_postgresql_read_model_from_before_next_due_is_upgraded(
    postgres_url: str, tmp_path: Path
) -> None:
    """The same on PostgreSQL, where several workers may open the old store at once."""
    import psycopg

    manager = TransferManager(store=postgres_url, home=tmp_path / "home")
    waiting = new_job(manager, [("http://127.0.0.1:9/f", tmp_path / "f")])
    manager.refresh_views()
    manager.close()
    with psycopg.connect(postgres_url, autocommit=True) as db:
        db.execute("DROP INDEX backhaul_job_views_due")
        db.execute("ALTER TABLE backhaul_job_views DROP COLUMN next_due")
    first = TransferManager(store=postgres_url, home=tmp_path / "home")
    second = TransferManager(store=postgres_url, home=tmp_path / "home")  # already upgraded
    catch_up(second.store)
    row = first.store.views.get(waiting.id)
    assert row is not None
    assert row.next_due == due_text(first.get_job(waiting.id).snapshot().modified_at)
    first.close()
    second.close()


def test_the_engine_holds_a_window_of_the_background_queue_and_runs_it_in_order(
    tmp_path: Path,
) -> None:
    """With many background jobs QUEUED, a restarted engine loads only the longest waiting
    ones by priority (its queue window), reads the next ones as those run, and still runs
    every job, HIGH before NORMAL, each priority oldest first."""
    from backhaul.core.vocabulary import JobPriority

    data = os.urandom(8 * KiB)
    manager = TransferManager(home=tmp_path / "home")

    async def main() -> tuple[list[TransferJob], list[str], int]:
        async with FaultServer({"/f": Served(data)}) as srv:
            normal = [
                new_job(manager, [(srv.url("/f"), tmp_path / f"n{i}")], priority=JobPriority.NORMAL)
                for i in range(10)
            ]
            high = [
                new_job(manager, [(srv.url("/f"), tmp_path / f"h{i}")], priority=JobPriority.HIGH)
                for i in range(3)
            ]
            manager.refresh_views()
            engine = make_engine(manager, max_background=1)
            engine.queue_window = lambda: 4  # type: ignore[method-assign]
            order: list[str] = []
            engine.on("job_transferred", lambda job: order.append(job.id))
            held = after_start(engine)
            async with running(engine):
                jobs = normal + high
                await until(lambda: all(j.state is S.TRANSFERRED for j in jobs), "every job")
            return jobs, order, held[0]

    jobs, order, held = asyncio.run(main())
    assert held == 4, f"the engine held {held} of 13 queued jobs at start, not its window"
    normal, high = jobs[:10], jobs[10:]
    assert order == [j.id for j in high] + [j.id for j in normal]
    for job in jobs:
        job.complete()


def test_a_released_job_is_retried_on_time_without_catching_the_read_model_up(
    tmp_path: Path,
) -> None:
    """The engine does not fold the log into the read model while it runs (that costs a
    fold per changed job). A job that failed after start-up has a stale row (QUEUED); once
    let go of, the engine still brings it back for its retry, from what it noted at release."""
    clock = ManualClock()
    data = os.urandom(16 * KiB)

    async def main() -> tuple[TransferJob, int]:
        async with FaultServer({"/f": Served(data, statuses=[503])}) as srv:
            manager = TransferManager(home=tmp_path / "home", clock=clock)
            job = new_job(manager, [(srv.url("/f"), tmp_path / "f")], minimum_retry_delay=900)
            manager.refresh_views()  # the row: QUEUED
            engine = make_engine(manager)
            catch_ups = 0
            refresh = manager.refresh_views

            def counted() -> int:
                nonlocal catch_ups
                catch_ups += 1
                return refresh()

            manager.refresh_views = counted  # type: ignore[method-assign]
            async with running(engine):
                await until(lambda: job.state is S.TRANSIENT_ERROR, "the 503")
                clock.advance(SCAN)
                await until(lambda: job.id not in engine._jobs, "the scan to let it go")
                row = manager.store.views.get(job.id)
                assert row is not None and row.state == int(S.QUEUED), "the row is stale"
                for _ in range(10):  # scans while the retry is far: not loaded again
                    clock.advance(SCAN)
                    await stays(lambda: job.id not in engine._jobs, "loaded from a stale row", 0.05)
                assert len(srv.hits_for("/f")) == 1
                clock.advance(4 * SCAN)  # 900 s after the failure: due
                await until(lambda: job.state is S.TRANSFERRED, "the retry")
            assert len(srv.hits_for("/f")) == 2
            return job, catch_ups

    job, catch_ups = asyncio.run(main())
    assert catch_ups == 1, (
        f"the engine caught the read model up {catch_ups} times, not only at start"
    )
    job.complete()
    assert (tmp_path / "f").read_bytes() == data
