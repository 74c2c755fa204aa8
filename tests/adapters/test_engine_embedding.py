"""An application that embeds the engine (README: the engine in its own asyncio loop, or in
an ``EngineThread``): callbacks registered while the engine runs, callbacks that raise or
are coroutines, long work in a callback, ranges told only when there are some, running an
engine twice, stopping an engine thread that does not stop in time, and one engine per
memory store. bits-core.md §9 (Notifications)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_engine import (  # the autouse fixture keeps BACKHAUL_STORE out
    FaultServer,
    KiB,
    Served,
    _no_store_from_the_environment,  # noqa: F401
    make_engine,
    new_job,
    running,
    temp_of,
    trickle,
    until,
)

from backhaul.adapters.engine import Engine, EngineThread
from backhaul.adapters.manager import TransferJob, TransferManager
from backhaul.core import hresult as hr
from backhaul.core.error import BitsError
from backhaul.core.vocabulary import CostFlags, JobPriority, JobPropertyId, JobState, NotifyFlags

S = JobState
ALREADY_RUNNING = hr.hresult_from_win32(hr.ERROR_SERVICE_ALREADY_RUNNING)


def wait_for(predicate: Callable[[], bool], what: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {within} s waiting for {what}"
        time.sleep(0.02)


def engine_thread(manager: TransferManager, **options: Any) -> EngineThread:
    """An EngineThread with ``make_engine``'s settings: short intervals, no yielding, the
    network up and unmetered."""
    thread = EngineThread(manager, poll_interval=0.02, yield_bandwidth=False, **options)
    thread.engine.network_probe = lambda: True
    thread.engine.cost_probe = lambda: int(CostFlags.UNRESTRICTED)
    return thread


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[TransferManager]:
    with TransferManager(home=tmp_path / "home") as manager:
        yield manager


def final_state(manager: TransferManager, job: TransferJob) -> JobState:
    return manager.get_job(job.id, include_final=True).state


# =================================================================================================
# Callbacks registered while the engine runs: told at least once (bits-core.md §9)
# =================================================================================================


@pytest.mark.parametrize("where", ["thread", "loop"])
def test_a_callback_registered_while_the_engine_runs_is_told_of_jobs_already_transferred_or_failed(
    tmp_path: Path, manager: TransferManager, where: str
) -> None:
    """Jobs that reached TRANSFERRED or ERROR before their callbacks were registered, under
    an earlier engine or under this one: a job_transferred or job_error callback registered
    while the engine runs (from another thread, or from the engine's own loop) is called
    for each of them once, as the start-up pass calls those registered before ``run``; a
    job whose flags leave the notification out is not told."""
    with FaultServer({"/f": Served(b"f" * 4096)}).threaded() as srv:
        earlier = new_job(manager, [(srv.url("/f"), tmp_path / "earlier")], name="earlier")
        failed = new_job(manager, [(srv.url("/missing"), tmp_path / "failed")], name="failed")
        quiet = new_job(
            manager,
            [(srv.url("/f"), tmp_path / "quiet")],
            name="quiet",
            notify_flags=int(NotifyFlags.DISABLE | NotifyFlags.JOB_TRANSFERRED),
        )
        asyncio.run(make_engine(manager).run(until_idle=True))  # nobody listened
        assert (earlier.state, failed.state, quiet.state) == (S.TRANSFERRED, S.ERROR, S.TRANSFERRED)
        told: list[tuple[Any, ...]] = []

        def register(engine: Engine | EngineThread) -> None:
            engine.on("job_transferred", lambda job: told.append(("transferred", job.id)))
            engine.on("job_error", lambda job, error: told.append(("error", job.id, error.hresult)))

        expected = sorted(
            [
                ("transferred", earlier.id),
                ("error", failed.id, hr.http_status_hresult(404)),
            ]
        )
        if where == "thread":
            with engine_thread(manager) as thread:
                now = new_job(manager, [(srv.url("/f"), tmp_path / "now")], name="now")
                thread.wake()
                wait_for(lambda: now.state is S.TRANSFERRED, "the engine to transfer a job")
                register(thread)
                expected = sorted([*expected, ("transferred", now.id)])
                wait_for(lambda: len(told) >= len(expected), "the late callbacks", within=5)
                time.sleep(0.3)  # and nothing more
        else:

            async def main() -> None:
                nonlocal expected
                engine = make_engine(manager)
                async with running(engine):
                    now = new_job(manager, [(srv.url("/f"), tmp_path / "now")], name="now")
                    engine.wake()
                    await until(lambda: now.state is S.TRANSFERRED, "the engine to transfer")
                    register(engine)
                    expected = sorted([*expected, ("transferred", now.id)])
                    await until(lambda: len(told) >= len(expected), "the late callbacks", 5)
                    await asyncio.sleep(0.3)

            asyncio.run(main())
    assert sorted(told) == expected


# =================================================================================================
# A callback that raises is called again (BITS re-invokes until S_OK)
# =================================================================================================


def test_callbacks_that_raise_are_called_again_while_their_job_stays_in_that_state(
    tmp_path: Path, manager: TransferManager, caplog: pytest.LogCaptureFixture
) -> None:
    """file_transferred, job_transferred and job_error callbacks that raise are logged and
    called again after ``callback_retry_interval`` while the job is still in that state; once
    the job is completed or cancelled (here by the callbacks themselves), never again."""
    calls: list[Any] = []

    def on_file(job: TransferJob, info: Any) -> None:
        calls.append(("file", info.index))
        if info.index == 0 and calls.count(("file", 0)) == 1:
            raise OSError("the disk is busy")

    def on_transferred(job: TransferJob) -> None:
        calls.append("transferred")
        if calls.count("transferred") < 3:
            raise OSError("the disk is busy")
        job.complete()

    def on_error(job: TransferJob, error: Any) -> None:
        calls.append("error")
        if calls.count("error") < 2:
            raise OSError("the disk is busy")
        job.cancel()

    async def main() -> None:
        async with FaultServer({"/a": Served(b"a" * 1000), "/b": Served(b"b" * 1000)}) as srv:
            flags = (
                NotifyFlags.JOB_TRANSFERRED | NotifyFlags.JOB_ERROR | NotifyFlags.FILE_TRANSFERRED
            )
            ok = new_job(
                manager,
                [(srv.url("/a"), tmp_path / "a"), (srv.url("/b"), tmp_path / "b")],
                name="ok",
                notify_flags=int(flags),
            )
            bad = new_job(manager, [(srv.url("/missing"), tmp_path / "m")], name="bad")
            engine = make_engine(manager)
            engine.callback_retry_interval = 0.2
            engine.on("file_transferred", on_file)
            engine.on("job_transferred", on_transferred)
            engine.on("job_error", on_error)
            async with running(engine):
                await until(
                    lambda: (
                        final_state(manager, ok) is S.ACKNOWLEDGED
                        and final_state(manager, bad) is S.CANCELLED
                    ),
                    "both jobs ended by their callbacks",
                )
                await asyncio.sleep(0.6)  # several intervals: nothing more is called

    asyncio.run(main())
    assert calls.count(("file", 0)) == 2
    assert calls.count(("file", 1)) == 1
    assert calls.count("transferred") == 3
    assert calls.count("error") == 2
    assert (tmp_path / "a").read_bytes() == b"a" * 1000
    again = [r for r in caplog.records if "calls it again" in r.getMessage()]
    assert len(again) == 4  # file 0 once, job_transferred twice, job_error once


# =================================================================================================
# async def callbacks: awaited on the engine's loop, each job's in order
# =================================================================================================


def test_async_callbacks_are_awaited_in_the_order_of_their_jobs_events(
    tmp_path: Path, manager: TransferManager
) -> None:
    """An ``async def`` callback is awaited as a task of the engine's loop. A job's
    callbacks keep the order of its events (FileTransferred for each file, then
    JobTransferred) even when one is still awaited as the next event comes, and a
    coroutine that raises is treated as a callback that raises: logged, called again."""
    calls: list[Any] = []
    loops: set[asyncio.AbstractEventLoop] = set()

    async def on_file(job: TransferJob, info: Any) -> None:
        loops.add(asyncio.get_running_loop())
        calls.append(("file begins", info.index))
        await asyncio.sleep(0.1)  # longer than the next file takes
        calls.append(("file ends", info.index))

    async def on_transferred(job: TransferJob) -> None:
        calls.append("transferred")
        if calls.count("transferred") == 1:
            raise OSError("not yet")
        await asyncio.to_thread(job.complete)  # long work off the loop

    async def main() -> asyncio.AbstractEventLoop:
        files = {f"/{n}": Served(bytes([n]) * 2000) for n in range(3)}
        async with FaultServer(files) as srv:
            job = new_job(
                manager,
                [(srv.url(f"/{n}"), tmp_path / str(n)) for n in range(3)],
                notify_flags=int(NotifyFlags.JOB_TRANSFERRED | NotifyFlags.FILE_TRANSFERRED),
            )
            engine = make_engine(manager)
            engine.callback_retry_interval = 0.2
            engine.on("file_transferred", on_file)
            engine.on("job_transferred", on_transferred)
            async with running(engine):
                await until(lambda: final_state(manager, job) is S.ACKNOWLEDGED, "Complete")
            return asyncio.get_running_loop()

    loop = asyncio.run(main())
    assert loops == {loop}
    assert calls == [
        *(step for n in range(3) for step in (("file begins", n), ("file ends", n))),
        "transferred",
        "transferred",
    ]
    assert [(tmp_path / str(n)).read_bytes() for n in range(3)] == [
        bytes([n]) * 2000 for n in range(3)
    ]


def test_an_async_callback_that_hands_long_work_to_a_thread_leaves_transfers_running(
    tmp_path: Path, manager: TransferManager
) -> None:
    """Callbacks run on the engine's loop: the long work of one (here 0.6 s) goes to a
    thread, awaited from an ``async def`` callback, and another job's transfer goes on
    meanwhile."""
    data = os.urandom(3 * 1024 * KiB)
    started = asyncio.Event()
    grew: list[int] = []

    async def main() -> None:
        files = {"/big": trickle(data), "/small": Served(b"s" * 1000)}
        async with FaultServer(files) as srv:
            big = new_job(
                manager,
                [(srv.url("/big"), tmp_path / "big")],
                name="big",
                priority=JobPriority.FOREGROUND,
            )
            engine = make_engine(manager)

            async def on_transferred(job: TransferJob) -> None:
                if job.id == big.id:
                    return
                started.set()
                await asyncio.to_thread(time.sleep, 0.6)  # long work, in a thread
                await asyncio.to_thread(job.complete)

            engine.on("job_transferred", on_transferred)
            async with running(engine):
                await until(lambda: big.state is S.TRANSFERRING, "the big job to run")
                new_job(
                    manager,
                    [(srv.url("/small"), tmp_path / "small")],
                    name="small",
                    priority=JobPriority.FOREGROUND,
                )
                engine.wake()
                await asyncio.wait_for(started.wait(), 10)
                before = temp_of(big, 0).stat().st_size
                await asyncio.sleep(0.4)
                grew.append(temp_of(big, 0).stat().st_size - before)
                big.cancel()

    asyncio.run(main())
    assert grew[0] >= 128 * KiB  # about 1.6 MB/s: the transfer did not wait
    assert (tmp_path / "small").read_bytes() == b"s" * 1000


# =================================================================================================
# FileRangesTransferred: never an empty list
# =================================================================================================


def test_file_ranges_transferred_is_never_told_an_empty_list(
    tmp_path: Path, manager: TransferManager
) -> None:
    """A file with ranges whose last checkpoint already claimed every byte, told at once
    (no notification interval): its FileTransferred brings no new range, and the callback
    is not called with none."""
    data = os.urandom(768 * KiB)
    told: list[Any] = []

    async def main() -> TransferJob:
        async with FaultServer({"/f": trickle(data)}) as srv:
            job = manager.create_job("ranges")
            job.notify_flags = int(
                NotifyFlags.FILE_RANGES_TRANSFERRED | NotifyFlags.FILE_TRANSFERRED
            )
            job.set_property(JobPropertyId.MINIMUM_NOTIFICATION_INTERVAL_MS, 0)
            wanted = [(0, 100), (256 * KiB, 384 * KiB)]
            job.add_file(srv.url("/f"), tmp_path / "r", ranges=wanted)
            job.resume()
            engine = make_engine(manager)
            engine.on(
                "file_ranges_transferred",
                lambda _j, _f, ranges: told.append([(r.offset, r.length) for r in ranges]),
            )
            engine.on("file_transferred", lambda _j, _f: told.append("file"))
            await engine.run(until_idle=True)
            return job

    job = asyncio.run(main())
    assert job.state is S.TRANSFERRED
    assert told[-1] == "file"
    assert [] not in told
    assert len(told) >= 4  # the trickle's checkpoints, each told at once
    covered = sum(n for ranges in told[:-1] for _, n in ranges)
    assert covered == 100 + 384 * KiB  # each byte told once


# =================================================================================================
# run() twice; EngineThread.stop(timeout); one engine per memory store
# =================================================================================================


def test_an_engine_runs_once_and_run_again_says_so(manager: TransferManager) -> None:
    """A second ``run`` of an engine that stopped raises BitsError RPC_E_DISCONNECTED (its
    transports are closed) rather than returning at once having done nothing; one while it
    runs raises ERROR_SERVICE_ALREADY_RUNNING. A new engine runs."""
    engine = make_engine(manager)
    asyncio.run(engine.run(until_idle=True))
    with pytest.raises(BitsError) as again:
        asyncio.run(engine.run(until_idle=True))
    assert again.value.hresult == hr.RPC_E_DISCONNECTED
    assert "runs once" in again.value.message

    async def twice() -> None:
        other = make_engine(manager)
        async with running(other):
            await asyncio.sleep(0.1)
            with pytest.raises(BitsError) as beside:
                await other.run()
            assert beside.value.hresult == ALREADY_RUNNING

    asyncio.run(twice())


def test_engine_thread_stop_raises_timeout_error_while_its_thread_still_runs(
    tmp_path: Path, manager: TransferManager
) -> None:
    """A callback that blocks keeps the engine's thread from ending: ``stop(timeout)`` raises
    TimeoutError then, and another engine is still refused; once the callback returns, a
    second ``stop`` returns and the store is free."""
    inside, release = threading.Event(), threading.Event()

    def blocking(job: TransferJob) -> None:
        inside.set()
        release.wait(10)

    with FaultServer({"/f": Served(b"f" * 1000)}).threaded() as srv:
        thread = engine_thread(manager)
        thread.on("job_transferred", blocking)
        thread.start()
        try:
            new_job(manager, [(srv.url("/f"), tmp_path / "f")])
            thread.wake()
            assert inside.wait(10)
            began = time.monotonic()
            with pytest.raises(TimeoutError):
                thread.stop(timeout=0.3)
            assert time.monotonic() - began < 2
            with pytest.raises(BitsError) as refused:
                engine_thread(manager).start()
            assert refused.value.hresult == ALREADY_RUNNING
        finally:
            release.set()
        thread.stop(timeout=10)
        engine_thread(manager).start().stop()


def test_a_second_engine_on_one_memory_store_is_refused_until_the_first_stops() -> None:
    """A ``memory:`` store is reached by this process only, but two engines on it would run
    the same jobs into the same temp files: the second refuses to start
    (ERROR_SERVICE_ALREADY_RUNNING), as on SQLite, until the first has stopped."""
    with TransferManager("memory:") as manager:
        first = engine_thread(manager).start()
        try:
            with pytest.raises(BitsError) as refused:
                engine_thread(manager).start()
            assert refused.value.hresult == ALREADY_RUNNING
            with pytest.raises(BitsError) as in_a_loop:
                asyncio.run(make_engine(manager).run(until_idle=True))
            assert in_a_loop.value.hresult == ALREADY_RUNNING
            with TransferManager("memory:") as elsewhere:  # another memory store: its own
                engine_thread(elsewhere).start().stop()
        finally:
            first.stop()
        engine_thread(manager).start().stop()
        asyncio.run(make_engine(manager).run(until_idle=True))
