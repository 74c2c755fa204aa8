"""Notifications from the engine with the REAL HTTP transport: in-process callbacks (order,
errors in callbacks, NotifyFlags, the JobModification throttle) and the notify command line
(once on success, again after MinimumRetryDelay on failure, never after Complete).
bits-core.md §9, §5 (command-line retry)."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import sys
import threading
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from peers.nginx import NginxServer
from test_engine import (  # the autouse fixture keeps BACKHAUL_STORE out
    FaultServer,
    KiB,
    Served,
    _no_store_from_the_environment,  # noqa: F401
    events_of,
    make_engine,
    new_job,
    of_type,
    running,
    stays,
    trickle,
    until,
)

from backhaul.adapters.clock import ManualClock
from backhaul.adapters.manager import TransferJob, TransferManager
from backhaul.core import event as ev
from backhaul.core import hresult as hr
from backhaul.core.byteranges import merge
from backhaul.core.value import ByteRange
from backhaul.core.vocabulary import JobPropertyId, JobState, NotifyFlags

S = JobState
KINDS = ("job_transferred", "job_error", "job_modification", "file_transferred")
FILES = ("one.bin", "two.bin", "three.bin")


def record_all(engine: Any, calls: list[tuple[Any, ...]]) -> None:
    engine.on("job_transferred", lambda job: calls.append(("job_transferred", job.id)))
    engine.on("job_error", lambda job, error: calls.append(("job_error", job.id, error.hresult)))
    engine.on("job_modification", lambda job: calls.append(("job_modification", job.id)))
    engine.on(
        "file_transferred",
        lambda job, info: calls.append(("file_transferred", job.id, info.index)),
    )
    engine.on(
        "file_ranges_transferred",
        lambda job, info, ranges: calls.append(("file_ranges_transferred", job.id, ranges)),
    )


# =================================================================================================
# Callbacks
# =================================================================================================


def test_file_transferred_for_each_file_comes_before_job_transferred_and_a_raising_callback_is_harmless(
    tmp_path: Path, engine_nginx: tuple[NginxServer, Path], caplog: pytest.LogCaptureFixture
) -> None:
    server, _ = engine_nginx
    manager = TransferManager(home=tmp_path / "home")
    flags = NotifyFlags.JOB_TRANSFERRED | NotifyFlags.JOB_ERROR | NotifyFlags.FILE_TRANSFERRED
    job = new_job(
        manager, [(f"{server.url}/{n}", tmp_path / n) for n in FILES], notify_flags=int(flags)
    )
    calls: list[tuple[Any, ...]] = []
    engine = make_engine(manager)

    def broken(job: TransferJob, info: Any) -> None:
        raise RuntimeError("a buggy application callback")

    engine.on("file_transferred", broken)
    record_all(engine, calls)

    with caplog.at_level(logging.ERROR, logger="backhaul.notify"):
        asyncio.run(engine.run(until_idle=True))

    assert job.state is S.TRANSFERRED
    assert calls == [
        ("file_transferred", job.id, 0),
        ("file_transferred", job.id, 1),
        ("file_transferred", job.id, 2),
        ("job_transferred", job.id),
    ]
    raised = [r for r in caplog.records if "raised; the engine goes on" in r.getMessage()]
    assert len(raised) == 3  # logged, once per file


def test_job_transferred_callback_may_complete_the_job(
    tmp_path: Path, engine_nginx: tuple[NginxServer, Path]
) -> None:
    server, docroot = engine_nginx
    manager = TransferManager(home=tmp_path / "home")
    job = new_job(manager, [(f"{server.url}/one.bin", tmp_path / "one.bin")])
    engine = make_engine(manager)
    results: list[int] = []
    engine.on("job_transferred", lambda handle: results.append(handle.complete()))

    asyncio.run(engine.run(until_idle=True))

    assert results == [hr.S_OK]
    assert job.state is S.ACKNOWLEDGED
    assert (tmp_path / "one.bin").read_bytes() == (docroot / "one.bin").read_bytes()


def test_notify_flag_disable_silences_every_callback_and_the_command_line(
    tmp_path: Path, engine_nginx: tuple[NginxServer, Path]
) -> None:
    server, _ = engine_nginx
    manager = TransferManager(home=tmp_path / "home")
    flags = (
        NotifyFlags.JOB_TRANSFERRED
        | NotifyFlags.JOB_ERROR
        | NotifyFlags.JOB_MODIFICATION
        | NotifyFlags.FILE_TRANSFERRED
        | NotifyFlags.DISABLE
    )
    ok = new_job(manager, [(f"{server.url}/one.bin", tmp_path / "a")], notify_flags=int(flags))
    bad = new_job(manager, [(f"{server.url}/nope", tmp_path / "b")], notify_flags=int(flags))
    marker = tmp_path / "marker"
    for job in (ok, bad):
        job.set_notify_cmdline(sys.executable, str(write_script(tmp_path)), str(marker), "0")
    calls: list[tuple[Any, ...]] = []
    engine = make_engine(manager)
    record_all(engine, calls)

    asyncio.run(engine.run(until_idle=True))

    assert ok.state is S.TRANSFERRED
    assert bad.state is S.ERROR
    assert calls == []
    assert not marker.exists()


def test_job_modification_is_throttled_by_the_minimum_notification_interval(
    tmp_path: Path,
) -> None:
    data = os.urandom(768 * KiB)
    clock = ManualClock()
    manager = TransferManager(home=tmp_path / "home", clock=clock)
    calls: list[tuple[Any, ...]] = []

    async def main() -> TransferJob:
        async with FaultServer({"/f": trickle(data)}) as srv:
            job = new_job(
                manager,
                [(srv.url("/f"), tmp_path / "f")],
                start=False,
                notify_flags=int(NotifyFlags.JOB_MODIFICATION | NotifyFlags.JOB_TRANSFERRED),
            )
            job.set_property(JobPropertyId.MINIMUM_NOTIFICATION_INTERVAL_MS, 1000)
            job.resume()

            def checkpoints() -> int:
                return len(of_type(events_of(manager, job.id), ev.BytesCheckpointed))

            engine = make_engine(manager)
            record_all(engine, calls)
            async with running(engine):
                await until(lambda: checkpoints() >= 4, "four checkpoints")
                assert calls == [("job_modification", job.id)]  # the clock has not moved
                clock.advance(1.0)  # the interval has passed: one more is due
                await until(lambda: len(calls) == 2, "the next job_modification")
                seen = checkpoints()
                await until(lambda: checkpoints() >= seen + 3, "three more checkpoints")
                assert len(calls) == 2
                await until(lambda: job.state is S.TRANSFERRED, "TRANSFERRED")
                await asyncio.sleep(0.1)
            return job

    job = asyncio.run(main())
    assert calls == [
        ("job_modification", job.id),
        ("job_modification", job.id),
        ("job_transferred", job.id),
    ]


def test_a_change_within_the_interval_is_told_once_the_interval_ends(tmp_path: Path) -> None:
    """Two changes of a job 0.1 s apart with a 1 s interval: the first is told at once, the
    second held and told when the interval ends, even with nothing else happening to the
    job (an application must not keep a stale view of it); a third change later is told
    at once again, and a held one never comes after the job's move to TRANSFERRED/ERROR."""
    clock = ManualClock()
    manager = TransferManager(home=tmp_path / "home", clock=clock)
    calls: list[tuple[Any, ...]] = []
    job = manager.create_job("idle")
    job.notify_flags = int(NotifyFlags.JOB_MODIFICATION)
    job.set_property(JobPropertyId.MINIMUM_NOTIFICATION_INTERVAL_MS, 1000)

    async def main() -> None:
        engine = make_engine(manager)
        record_all(engine, calls)
        async with running(engine):
            await asyncio.sleep(0.3)  # the engine has started: it reads the log from here
            job.description = "first"
            await until(lambda: len(calls) == 1, "the first job_modification")
            clock.advance(0.1)
            job.description = "second"
            await stays(lambda: len(calls) == 1, "held while the interval runs")
            clock.advance(0.9)
            await until(lambda: len(calls) == 2, "the held job_modification")
            await stays(lambda: len(calls) == 2, "told once")
            clock.advance(5)
            job.description = "third"
            await until(lambda: len(calls) == 3, "the next change, at once")

    asyncio.run(main())
    assert calls == [("job_modification", job.id)] * 3


def test_job_modification_without_a_minimum_interval_comes_for_every_change(
    tmp_path: Path,
) -> None:
    data = os.urandom(256 * KiB)
    clock = ManualClock()
    manager = TransferManager(home=tmp_path / "home", clock=clock)
    calls: list[tuple[Any, ...]] = []

    async def main() -> TransferJob:
        # About 0.5 s of body: several checkpoints (every 0.03 s) even on a busy machine.
        async with FaultServer({"/f": trickle(data, delay=0.03)}) as srv:
            job = new_job(
                manager,
                [(srv.url("/f"), tmp_path / "f")],
                start=False,
                notify_flags=int(NotifyFlags.JOB_MODIFICATION | NotifyFlags.JOB_TRANSFERRED),
            )
            job.set_property(JobPropertyId.MINIMUM_NOTIFICATION_INTERVAL_MS, 0)
            job.resume()
            engine = make_engine(manager)
            record_all(engine, calls)
            await asyncio.wait_for(engine.run(until_idle=True), 10)
            return job

    job = asyncio.run(main())
    events = events_of(manager, job.id)
    by_engine = events[[type(e) for e in events].index(ev.JobResumed) + 1 :]
    # Every change but the move to TRANSFERRED, which has its own callback (§9).
    assert calls == [("job_modification", job.id)] * (len(by_engine) - 1) + [
        ("job_transferred", job.id)
    ]
    assert len(of_type(by_engine, ev.BytesCheckpointed)) >= 3


def test_job_modification_is_never_raised_for_the_moves_to_transferred_and_error(
    tmp_path: Path,
) -> None:
    """JobModification is not raised for a transition to TRANSFERRED or ERROR (§9), even when
    the flags ask for JobModification alone (no JOB_TRANSFERRED, no JOB_ERROR)."""
    manager = TransferManager(home=tmp_path / "home")
    states: dict[str, list[S]] = {}

    async def main() -> tuple[TransferJob, TransferJob]:
        async with FaultServer({"/f": Served(b"x" * 1000)}) as srv:
            made = []
            for path in ("/f", "/missing"):  # the second is a 404: fatal, to ERROR
                job = new_job(
                    manager,
                    [(srv.url(path), tmp_path / path.strip("/"))],
                    start=False,
                    notify_flags=int(NotifyFlags.JOB_MODIFICATION),
                )
                job.set_property(JobPropertyId.MINIMUM_NOTIFICATION_INTERVAL_MS, 0)
                job.resume()
                made.append(job)
            engine = make_engine(manager)

            def modified(handle: TransferJob) -> None:
                logged = engine.logged(handle.id)  # the job as of the event told
                assert logged is not None
                states.setdefault(handle.id, []).append(logged.state)

            engine.on("job_modification", modified)
            await asyncio.wait_for(engine.run(until_idle=True), 10)
            return made[0], made[1]

    done, failed = asyncio.run(main())
    assert done.state is S.TRANSFERRED and failed.state is S.ERROR
    assert S.TRANSFERRING in states[done.id] and S.TRANSFERRED not in states[done.id]
    events = events_of(manager, done.id)
    by_engine = events[[type(e) for e in events].index(ev.JobResumed) + 1 :]
    assert len(states[done.id]) == len(by_engine) - 1  # every change but the last
    assert states[failed.id] and S.ERROR not in states[failed.id]


def small_then_trickle(size: int) -> dict[str, Served]:
    """Two files: /a of 1,000 bytes at once, then /b of ``size`` bytes trickling."""
    return {"/a": Served(b"a" * 1000), "/b": trickle(os.urandom(size))}


def small_then_slow_job(manager: TransferManager, srv: FaultServer, tmp_path: Path) -> TransferJob:
    """A job of ``small_then_trickle``'s two files, told FileTransferred and JobTransferred,
    resumed."""
    job = new_job(
        manager,
        [(srv.url("/a"), tmp_path / "a"), (srv.url("/b"), tmp_path / "b")],
        start=False,
        notify_flags=int(NotifyFlags.FILE_TRANSFERRED | NotifyFlags.JOB_TRANSFERRED),
    )
    job.resume()
    return job


def test_no_notification_is_lost_when_a_client_change_makes_the_engine_reload_its_job(
    tmp_path: Path,
) -> None:
    """A client's change lands while the engine's own FileTransferred is not read back yet:
    the engine's next append conflicts and it reloads the job from the log. The events it
    has not observed yet are still notified, each once, in the order of the log."""
    manager = TransferManager(home=tmp_path / "home")
    client = TransferManager(home=tmp_path / "home")
    told: list[Any] = []

    async def main() -> TransferJob:
        async with FaultServer(small_then_trickle(600 * KiB)) as srv:
            job = small_then_slow_job(manager, srv, tmp_path)
            # The loop reads the log back only every 2 s (nothing wakes it while a transfer
            # runs), as a busy engine between two passes: the reload comes first.
            engine = make_engine(manager, poll_interval=2.0)
            engine.on("file_transferred", lambda j, info: told.append(info.index))
            engine.on("job_transferred", lambda j: told.append("job"))
            run = asyncio.create_task(engine.run(until_idle=True))
            await until(
                lambda: bool(of_type(events_of(manager, job.id), ev.FileTransferred)),
                "file 0 transferred",
            )
            client.get_job(job.id).description = "changed while the engine runs"
            await asyncio.wait_for(run, 30)
            return job

    job = asyncio.run(main())
    events = events_of(manager, job.id)
    kinds = [type(e) for e in events]
    # The client's change came between the two files (what made the engine reload).
    assert kinds.index(ev.FileTransferred) < kinds.index(ev.PropertySet, kinds.index(ev.JobResumed))
    assert len(of_type(events, ev.FileTransferred)) == 2
    assert told == [0, 1, "job"]


def test_a_store_read_that_fails_while_callbacks_are_told_neither_stops_the_engine_nor_loses_one(
    tmp_path: Path,
) -> None:
    """The callbacks' arguments come from the engine's copy of the job: a read of the store
    that fails (SQLite's disk I/O error, which the manager turns into StoreUnavailable) does
    not kill the loop, and every notification is told."""
    manager = TransferManager(home=tmp_path / "home")
    told: list[int] = []

    async def main() -> TransferJob:
        async with FaultServer(small_then_trickle(300 * KiB)) as srv:
            job = small_then_slow_job(manager, srv, tmp_path)
            engine = make_engine(manager)
            engine.on("file_transferred", lambda j, info: told.append(info.index))
            stream = manager.store.stream
            loop_thread = threading.get_ident()
            failed: list[bool] = []

            def flaky_stream(*args: Any, **kwargs: Any) -> Any:
                # The engine reads the log in worker threads; a read in the loop's thread
                # fails once.
                if threading.get_ident() == loop_thread and not failed:
                    failed.append(True)
                    raise sqlite3.OperationalError("disk I/O error")
                return stream(*args, **kwargs)

            manager.store.stream = flaky_stream  # type: ignore[method-assign]
            try:
                await asyncio.wait_for(engine.run(until_idle=True), 20)
            finally:
                manager.store.stream = stream  # type: ignore[method-assign]
            return job

    job = asyncio.run(main())
    assert job.state is S.TRANSFERRED
    assert told == [0, 1]


def test_job_error_comes_once_when_a_retry_fails_past_the_no_progress_deadline(
    tmp_path: Path,
) -> None:
    """The retry fails when NoProgressTimeout has already passed: the transient failure is
    followed at once by the timeout. Only the move to ERROR calls job_error (§9), once, even
    when the log is slow and the engine decides the timeout before it reads the failure back."""
    clock = ManualClock()
    manager = TransferManager(home=tmp_path / "home", clock=clock)
    append_many = manager.store.append_many

    def slow_append_many(batches: Any) -> list[int]:
        time.sleep(0.1)  # a slow disk under the log (called in the writer's thread)
        return append_many(batches)

    errors: list[tuple[Any, ...]] = []

    async def main() -> TransferJob:
        async with FaultServer({"/f": Served(b"x" * 1000, statuses=[503] * 10)}) as srv:
            job = new_job(
                manager,
                [(srv.url("/f"), tmp_path / "f")],
                minimum_retry_delay=5,
                no_progress_timeout=6,
            )
            manager.store.append_many = slow_append_many  # type: ignore[method-assign]
            engine = make_engine(manager)
            engine.on("job_error", lambda job, error: errors.append((job.id, error.hresult)))
            async with running(engine):
                await until(lambda: job.state is S.TRANSIENT_ERROR, "the first failure")
                clock.advance(100)  # the retry (due at 5 s) fires first, and fails
                engine.wake()
                await until(lambda: job.state is S.ERROR, "ERROR")
                await asyncio.sleep(0.5)
            assert len(srv.hits) == 2
            return job

    job = asyncio.run(main())
    events = events_of(manager, job.id)
    assert len(of_type(events, ev.ErrorOccurred)) == 2
    assert len(of_type(events, ev.NoProgressTimedOut)) == 1
    assert errors == [(job.id, hr.http_status_hresult(503))]


def test_file_ranges_transferred_reports_the_requested_ranges(
    tmp_path: Path, engine_nginx: tuple[NginxServer, Path]
) -> None:
    server, _ = engine_nginx
    manager = TransferManager(home=tmp_path / "home")
    job = manager.create_job("ranges")
    job.notify_flags = int(NotifyFlags.FILE_RANGES_TRANSFERRED | NotifyFlags.JOB_TRANSFERRED)
    job.add_file(f"{server.url}/one.bin", tmp_path / "r", ranges=[(0, 100), (5000, 100)])
    job.resume()
    calls: list[tuple[Any, ...]] = []
    engine = make_engine(manager)
    record_all(engine, calls)

    asyncio.run(engine.run(until_idle=True))

    assert job.state is S.TRANSFERRED
    ranged = [c for c in calls if c[0] == "file_ranges_transferred"]
    told = [(r.offset, r.length) for c in ranged for r in c[2]]
    assert sorted(told) == [(0, 100), (5000, 100)]  # each byte told once, all of them
    assert calls[-1] == ("job_transferred", job.id)


def test_file_ranges_transferred_tells_only_new_ranges_and_keeps_to_the_interval(
    tmp_path: Path,
) -> None:
    """IBackgroundCopyCallback3::FileRangesTransferred for a file with ranges: the parts of
    its ranges that arrived since the last callback, at most once per
    MINIMUM_NOTIFICATION_INTERVAL_MS (bits-core.md §7.5, §14), and the last of them before
    FileTransferred. A trickling server: many checkpoints, a 0.5 s interval."""
    data = os.urandom(1024 * KiB)
    manager = TransferManager(home=tmp_path / "home")
    calls: list[tuple[float, Any]] = []

    async def main() -> TransferJob:
        async with FaultServer({"/f": Served(data, step=16 * KiB, delay=0.03)}) as srv:
            job = manager.create_job("ranges")
            job.notify_flags = int(
                NotifyFlags.FILE_RANGES_TRANSFERRED | NotifyFlags.FILE_TRANSFERRED
            )
            job.set_property(JobPropertyId.MINIMUM_NOTIFICATION_INTERVAL_MS, 500)
            wanted = [(0, 256 * KiB), (512 * KiB, 256 * KiB)]
            job.add_file(srv.url("/f"), tmp_path / "r", ranges=wanted)
            job.resume()
            engine = make_engine(manager)
            engine.on(
                "file_ranges_transferred",
                lambda _j, _f, ranges: calls.append((time.monotonic(), ranges)),
            )
            engine.on("file_transferred", lambda _j, _f: calls.append((time.monotonic(), None)))
            await engine.run(until_idle=True)
            return job

    job = asyncio.run(main())
    assert job.state is S.TRANSFERRED
    assert calls[-1][1] is None  # FileTransferred last, after every range
    ranged = calls[:-1]
    assert len(ranged) >= 2  # the trickle lasts about 1 s
    told = [(r.offset, r.length) for _, ranges in ranged for r in ranges]
    covered = sum(length for _, length in told)
    assert covered == 512 * KiB  # no byte twice, none left out
    assert merge(ByteRange(o, n) for o, n in told) == (
        ByteRange(0, 256 * KiB),
        ByteRange(512 * KiB, 256 * KiB),
    )
    times = [t for t, _ in ranged]
    # The interval holds between callbacks, but for the last ones, told before FileTransferred.
    assert all(b - a >= 0.45 for a, b in pairwise(times[:-1]))


# =================================================================================================
# The notify command line
# =================================================================================================

SCRIPT = """\
import os, sys
with open(sys.argv[1], "a") as out:
    out.write(os.environ["BACKHAUL_JOB_STATE"] + " " + os.environ["BACKHAUL_JOB_ID"] + "\\n")
sys.exit(int(sys.argv[2]))
"""


def write_script(directory: Path) -> Path:
    script = directory / "notify.py"
    script.write_text(SCRIPT)
    return script


def test_the_command_line_runs_once_when_the_job_is_transferred(
    tmp_path: Path, engine_nginx: tuple[NginxServer, Path]
) -> None:
    server, _ = engine_nginx
    manager = TransferManager(home=tmp_path / "home")
    job = new_job(manager, [(f"{server.url}/one.bin", tmp_path / "one.bin")], start=False)
    marker = tmp_path / "marker"
    job.set_notify_cmdline(sys.executable, str(write_script(tmp_path)), str(marker), "0")
    job.resume()

    asyncio.run(make_engine(manager).run(until_idle=True))

    assert job.state is S.TRANSFERRED
    assert marker.read_text() == f"TRANSFERRED {job.id}\n"
    notified = of_type(events_of(manager, job.id), ev.CommandLineNotified)
    assert [(n.reason, n.exit_code) for n in notified] == [("transferred", 0)]
    # The successful run is in the log: a new engine does not run it again.
    asyncio.run(make_engine(manager).run(until_idle=True))
    assert marker.read_text() == f"TRANSFERRED {job.id}\n"


def test_the_command_line_runs_for_a_job_in_error(
    tmp_path: Path, engine_nginx: tuple[NginxServer, Path]
) -> None:
    server, _ = engine_nginx
    manager = TransferManager(home=tmp_path / "home")
    job = new_job(manager, [(f"{server.url}/missing.bin", tmp_path / "m")], start=False)
    marker = tmp_path / "marker"
    job.set_notify_cmdline(sys.executable, str(write_script(tmp_path)), str(marker), "0")
    job.resume()

    asyncio.run(make_engine(manager).run(until_idle=True))

    assert job.state is S.ERROR
    assert marker.read_text() == f"ERROR {job.id}\n"
    notified = of_type(events_of(manager, job.id), ev.CommandLineNotified)
    assert [(n.reason, n.exit_code) for n in notified] == [("error", 0)]


def test_a_failing_command_line_runs_again_after_the_retry_delay_until_the_job_is_completed(
    tmp_path: Path,
) -> None:
    data = os.urandom(32 * KiB)
    clock = ManualClock()
    manager = TransferManager(home=tmp_path / "home", clock=clock)
    client = TransferManager(home=tmp_path / "home", clock=clock)
    marker = tmp_path / "marker"

    def runs() -> int:
        return len(marker.read_text().splitlines()) if marker.exists() else 0

    async def main() -> TransferJob:
        async with FaultServer({"/f": trickle(data)}) as srv:
            job = new_job(
                manager, [(srv.url("/f"), tmp_path / "f")], start=False, minimum_retry_delay=5
            )
            job.set_notify_cmdline(sys.executable, str(write_script(tmp_path)), str(marker), "1")
            job.resume()

            def notified() -> list[Any]:
                return of_type(events_of(manager, job.id), ev.CommandLineNotified)

            engine = make_engine(manager)
            async with running(engine):
                await until(lambda: len(notified()) == 1, "the first run")
                assert notified()[0].exit_code == 1
                await stays(lambda: runs() == 1, "no second run before MinimumRetryDelay")
                clock.advance(6)
                engine.wake()
                await until(lambda: len(notified()) == 2, "the second run")
                assert runs() == 2
                assert client.get_job(job.id).complete() == hr.S_OK
                await asyncio.sleep(0.1)
                clock.advance(6)
                engine.wake()
                await stays(lambda: runs() == 2, "no run once the job is completed", 0.5)
            return job

    job = asyncio.run(main())
    assert job.state is S.ACKNOWLEDGED
    assert marker.read_text() == f"TRANSFERRED {job.id}\n" * 2
    assert (tmp_path / "f").read_bytes() == data


NOTIFY_AND_RESUME = """
import os, sys, time
from backhaul.adapters.manager import TransferManager
home, marker = sys.argv[1], sys.argv[2]
job_id = os.environ["BACKHAUL_JOB_ID"]
with open(marker, "a") as out:
    out.write(os.environ["BACKHAUL_JOB_STATE"] + "\\n")
manager = TransferManager(home=home)
if len(open(marker).read().splitlines()) == 1:
    manager.get_job(job_id).resume()  # the first run retries the job...
    deadline = time.time() + 15
    while time.time() < deadline:  # ...and exits 0 only once it failed again
        errors = [e for e in manager.store.stream(job_id) if type(e.event).__name__ == "ErrorOccurred"]
        if len(errors) >= 2:
            break
        time.sleep(0.05)
sys.exit(0)
"""


def test_a_run_that_exits_after_the_job_came_back_to_error_counts_for_its_own_error_only(
    tmp_path: Path,
) -> None:
    """The program resumes the job, which fails again while the program still runs; it
    exits 0 after that. Its exit counts for the ERROR it was started for: the new ERROR
    gets a run of its own."""
    manager = TransferManager(home=tmp_path / "home")
    script = tmp_path / "notify.py"
    script.write_text(NOTIFY_AND_RESUME)
    marker = tmp_path / "marker"

    async def main() -> TransferJob:
        async with FaultServer({}) as srv:  # every path is a 404: fatal, to ERROR
            job = new_job(manager, [(srv.url("/missing"), tmp_path / "m")], start=False)
            job.set_notify_cmdline(sys.executable, str(script), str(tmp_path / "home"), str(marker))
            job.resume()

            def notified() -> list[Any]:
                return of_type(events_of(manager, job.id), ev.CommandLineNotified)

            async with running(make_engine(manager)):
                await until(lambda: len(notified()) == 2, "a run for each ERROR", 30)
                await asyncio.sleep(0.3)
            return job

    job = asyncio.run(main())
    events = events_of(manager, job.id)
    assert job.state is S.ERROR
    assert len(of_type(events, ev.ErrorOccurred)) == 2
    assert marker.read_text() == "ERROR\n" * 2
    first, second = of_type(events, ev.CommandLineNotified)
    assert [(n.reason, n.exit_code) for n in (first, second)] == [("error", 0)] * 2
    assert first.since_version < second.since_version  # each for its own entry into ERROR


SLOW_NOTIFY = """
import os, signal, sys, time
marker, seconds, stubborn = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "1"
first = not os.path.exists(marker)
if first and stubborn:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
with open(marker, "a") as out:
    out.write(f"start {os.getpid()}\\n")
if first:
    time.sleep(seconds)
with open(marker, "a") as out:
    out.write(f"end {os.getpid()}\\n")
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_during_the_command_line(
    tmp_path: Path, seconds: float, *, stubborn: bool = False, grace: float = 3.0
) -> tuple[TransferManager, TransferJob, Path, float]:
    """Run a job whose notify program's first run takes ``seconds`` (ignoring SIGTERM when
    ``stubborn``), and stop the engine as soon as the program started; how long the stop took."""
    manager = TransferManager(home=tmp_path / "home")
    script = tmp_path / "notify.py"
    script.write_text(SLOW_NOTIFY)
    marker = tmp_path / "marker"

    async def main() -> tuple[TransferJob, float]:
        async with FaultServer({"/f": Served(b"x" * 1000)}) as srv:
            job = new_job(manager, [(srv.url("/f"), tmp_path / "f")], start=False)
            job.set_notify_cmdline(
                sys.executable, str(script), str(marker), str(seconds), str(int(stubborn))
            )
            job.resume()
            engine = make_engine(manager)
            engine.command_line_grace = grace
            async with running(engine):
                await until(marker.exists, "the notify program started")
                stopping = time.monotonic()
            return job, time.monotonic() - stopping

    job, took = asyncio.run(main())
    return manager, job, marker, took


def test_a_command_line_running_at_stop_is_waited_for_and_its_exit_recorded(
    tmp_path: Path,
) -> None:
    manager, job, marker, _ = stop_during_the_command_line(tmp_path, 1.0)

    pid = int(marker.read_text().split()[1])
    assert marker.read_text() == f"start {pid}\nend {pid}\n"  # it exited before the stop ended
    notified = of_type(events_of(manager, job.id), ev.CommandLineNotified)
    assert [(n.reason, n.exit_code) for n in notified] == [("transferred", 0)]
    # Its exit is in the log: the next engine does not run it again.
    asyncio.run(make_engine(manager).run(until_idle=True))
    assert marker.read_text() == f"start {pid}\nend {pid}\n"


def test_a_command_line_still_running_after_the_grace_is_ended_and_runs_again(
    tmp_path: Path,
) -> None:
    """A program that outlasts the grace (and ignores SIGTERM) is killed with the stop, and
    its run is not recorded: the next engine runs it again, as BITS would."""
    manager, job, marker, took = stop_during_the_command_line(
        tmp_path, 60.0, stubborn=True, grace=0.3
    )

    pid = int(marker.read_text().split()[1])
    assert not alive(pid)  # nothing the engine started outlives it
    assert took < 10  # the grace, then SIGTERM and SIGKILL: not the program's 60 s
    assert marker.read_text() == f"start {pid}\n"
    assert of_type(events_of(manager, job.id), ev.CommandLineNotified) == []
    asyncio.run(make_engine(manager).run(until_idle=True))
    runs = marker.read_text().splitlines()
    assert len(runs) == 3 and runs[1].startswith("start") and runs[2].startswith("end")
    notified = of_type(events_of(manager, job.id), ev.CommandLineNotified)
    assert [(n.reason, n.exit_code) for n in notified] == [("transferred", 0)]
