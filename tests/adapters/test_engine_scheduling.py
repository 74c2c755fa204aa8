"""The engine's scheduler and the client's calls while a transfer runs, with the REAL HTTP
transport: priorities, FOREGROUND next to the background job, round-robin time slices,
Suspend/Resume and Cancel while transferring, and a new engine taking over from a stopped one.
bits-core.md §2.2, §4, §7.2."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from peers.nginx import NginxServer
from test_engine import (  # the autouse fixture keeps BACKHAUL_STORE out
    FaultServer,
    HeldSync,
    KiB,
    Served,
    _no_store_from_the_environment,  # noqa: F401
    checkpointed,
    events_of,
    make_engine,
    new_job,
    of_type,
    running,
    stays,
    temp_of,
    trickle,
    until,
)

from backhaul.adapters.clock import ManualClock
from backhaul.adapters.manager import TransferJob, TransferManager
from backhaul.adapters.store import Recorded
from backhaul.core import event as ev
from backhaul.core import hresult as hr
from backhaul.core.vocabulary import JobPriority, JobState

S = JobState


def log_of(manager: TransferManager) -> list[Recorded]:
    return manager.store.read(0, 100_000)


def first(log: list[Recorded], job_id: str, kind: type[ev.Event]) -> int:
    return next(r.position for r in log if r.job_id == job_id and isinstance(r.event, kind))


def last(log: list[Recorded], job_id: str, kind: type[ev.Event]) -> int:
    return [r.position for r in log if r.job_id == job_id and isinstance(r.event, kind)][-1]


# =================================================================================================
# Priorities and slices
# =================================================================================================


def test_a_high_job_runs_before_normal_ones_and_background_jobs_run_one_at_a_time(
    tmp_path: Path, engine_nginx: tuple[NginxServer, Path]
) -> None:
    server, docroot = engine_nginx
    manager = TransferManager(home=tmp_path / "home")
    normal1 = new_job(manager, [(f"{server.url}/two.bin", tmp_path / "n1")], name="n1")
    normal2 = new_job(manager, [(f"{server.url}/one.bin", tmp_path / "n2")], name="n2")
    high = new_job(
        manager,
        [(f"{server.url}/three.bin", tmp_path / "h")],
        name="high",
        priority=JobPriority.HIGH,
    )

    asyncio.run(make_engine(manager, max_background=1).run(until_idle=True))

    log = log_of(manager)
    order = [r.job_id for r in log if isinstance(r.event, ev.TransferStarted)]
    assert order == [high.id, normal1.id, normal2.id]
    # One background job at a time: each starts after the one before it transferred.
    assert first(log, high.id, ev.JobTransferred) < first(log, normal1.id, ev.TransferStarted)
    assert first(log, normal1.id, ev.JobTransferred) < first(log, normal2.id, ev.TransferStarted)
    for job in (normal1, normal2, high):
        assert job.state is S.TRANSFERRED
        job.complete()
    assert (tmp_path / "h").read_bytes() == (docroot / "three.bin").read_bytes()


def test_foreground_jobs_run_next_to_the_one_background_job(tmp_path: Path) -> None:
    data = os.urandom(384 * KiB)
    files = {p: trickle(data) for p in ("/b1", "/b2", "/fg")}
    manager = TransferManager(home=tmp_path / "home")

    async def main() -> tuple[list[TransferJob], FaultServer]:
        async with FaultServer(files) as srv:
            b1 = new_job(manager, [(srv.url("/b1"), tmp_path / "b1")], name="b1")
            b2 = new_job(manager, [(srv.url("/b2"), tmp_path / "b2")], name="b2")
            fg = new_job(
                manager,
                [(srv.url("/fg"), tmp_path / "fg")],
                name="fg",
                priority=JobPriority.FOREGROUND,
            )
            engine = make_engine(manager, max_background=1)
            await asyncio.wait_for(engine.run(until_idle=True), 15)
            return [b1, b2, fg], srv

    (b1, b2, fg), srv = asyncio.run(main())
    assert srv.max_active == 2  # the foreground job and ONE background job
    log = log_of(manager)
    # The foreground job and b1 overlapped; b2 waited for b1.
    assert first(log, fg.id, ev.TransferStarted) < first(log, b1.id, ev.JobTransferred)
    assert first(log, b1.id, ev.TransferStarted) < first(log, fg.id, ev.JobTransferred)
    assert first(log, b1.id, ev.JobTransferred) < first(log, b2.id, ev.TransferStarted)
    for job in (b1, b2, fg):
        assert job.state is S.TRANSFERRED


def test_jobs_of_one_priority_share_the_background_slot_in_round_robin_slices(
    tmp_path: Path,
) -> None:
    a_data, b_data = os.urandom(768 * KiB), os.urandom(768 * KiB)
    files = {"/a": trickle(a_data), "/b": trickle(b_data)}
    manager = TransferManager(home=tmp_path / "home")

    async def main() -> tuple[TransferJob, TransferJob, FaultServer]:
        async with FaultServer(files) as srv:
            a = new_job(manager, [(srv.url("/a"), tmp_path / "a")], name="a")
            b = new_job(manager, [(srv.url("/b"), tmp_path / "b")], name="b")
            engine = make_engine(manager, max_background=1, slice_length=timedelta(seconds=0.3))
            await asyncio.wait_for(engine.run(until_idle=True), 20)
            return a, b, srv

    a, b, srv = asyncio.run(main())
    log = log_of(manager)
    for job in (a, b):
        assert of_type(events_of(manager, job.id), ev.SliceEnded), job
        assert job.state is S.TRANSFERRED
    turns = [r.job_id for r in log if isinstance(r.event, ev.TransferStarted)]
    assert turns[:4] == [a.id, b.id, a.id, b.id], turns
    assert srv.max_active == 1
    # A new turn resumes where the last checkpoint of the previous ones left off (from
    # byte 0 only when none was made yet: a turn on a loaded machine may end before one, or
    # even before its request reached the server, so the requests are matched in order to
    # a subsequence of the turns).
    for job, path in ((a, "/a"), (b, "/b")):
        hits = srv.hits_for(path)
        assert len(hits) >= 2
        resumed_at, starts = None, []
        for r in log:
            if r.job_id != job.id:
                continue
            if isinstance(r.event, ev.TransferStarted):
                starts.append(resumed_at)
            elif isinstance(r.event, ev.BytesCheckpointed):
                resumed_at = r.event.bytes_transferred or None
        turns_left = iter(starts)
        assert all(h.range_start in turns_left for h in hits), (hits, starts)
        assert any(h.range_start for h in hits[1:]), hits
    a.complete()
    b.complete()
    assert (tmp_path / "a").read_bytes() == a_data
    assert (tmp_path / "b").read_bytes() == b_data


def test_equal_background_jobs_get_equal_turns_when_their_slices_end_together(
    tmp_path: Path,
) -> None:
    """Five NORMAL jobs, two background slots, slices of 1 s on a ManualClock: the two
    whose slices end in one pass queue again in the order they started, so every job gets
    its turn in order (4 turns each in 10 slices), not the lowest ids more often."""
    clock = ManualClock()

    async def main() -> list[str]:
        # The server never answers: each turn is spent CONNECTING until its slice ends.
        async with FaultServer({"/f": Served(b"x", header_delay=60)}) as srv:
            manager = TransferManager(home=tmp_path / "home", clock=clock)
            for i in range(5):
                new_job(manager, [(srv.url("/f"), tmp_path / f"{i}.bin")], name=f"n{i}")
            engine = make_engine(manager, max_background=2, slice_length=timedelta(seconds=1))

            def turns() -> list[str]:
                return [
                    r.job_id for r in log_of(manager) if isinstance(r.event, ev.TransferStarted)
                ]

            async with running(engine):
                for slices in range(1, 11):
                    await until(lambda n=slices: len(turns()) == 2 * n, f"slice {slices}")
                    clock.advance(timedelta(seconds=1))
                return turns()[:20]

    started = asyncio.run(main())
    assert sorted(Counter(started).values()) == [4, 4, 4, 4, 4], Counter(started)


def test_a_foreground_job_lowered_next_to_the_background_job_sends_the_longest_running_back(
    tmp_path: Path,
) -> None:
    """max_background=1: a FOREGROUND job runs next to the background job; lowered to
    NORMAL it makes two background jobs, and the one that has run longer goes back to
    QUEUED (its slice ends) so that one background job transfers."""
    data = os.urandom(2048 * KiB)

    async def main() -> None:
        async with FaultServer({"/a": Served(data), "/b": Served(data)}) as srv:
            manager = TransferManager(home=tmp_path / "home")
            a = new_job(manager, [(srv.url("/a"), tmp_path / "a")], name="a", start=False)
            b = new_job(
                manager,
                [(srv.url("/b"), tmp_path / "b")],
                name="b",
                start=False,
                priority=JobPriority.FOREGROUND,
            )
            for job in (a, b):
                job.max_rate = 200_000  # about 10 s each: both run for the whole test
            engine = make_engine(manager, max_background=1)
            async with running(engine):
                a.resume()
                await until(lambda: a.state is S.TRANSFERRING, "a runs")
                b.resume()
                await until(lambda: b.state is S.TRANSFERRING, "b runs next to a")
                b.priority = JobPriority.NORMAL
                await until(lambda: a.state is S.QUEUED, "a, the longest running, goes back")
                await stays(
                    lambda: (
                        len(engine._jobs.background_among(engine._tasks)) == 1
                        and b.state is S.TRANSFERRING
                    ),
                    "one background job transfers",
                    0.5,
                )
                assert of_type(events_of(manager, a.id), ev.SliceEnded)
                assert not of_type(events_of(manager, b.id), ev.SliceEnded)

    asyncio.run(main())


# =================================================================================================
# Suspend, Cancel, and a new engine
# =================================================================================================


def test_suspend_while_transferring_keeps_the_bytes_received_and_resume_goes_on_from_there(
    tmp_path: Path,
) -> None:
    """BITS keeps a suspended job's progress. The checkpoint interval here is longer than
    the test, so no checkpoint claims anything before the Suspend: the bytes received until
    then are claimed by the transfer as it stops (SUSPENDED/data_received), and Resume asks
    for the rest only."""
    data = os.urandom(768 * KiB)
    manager = TransferManager(home=tmp_path / "home")
    client = TransferManager(home=tmp_path / "home")  # another process, as the CLI would be

    async def main() -> tuple[TransferJob, FaultServer, int, int]:
        async with FaultServer({"/f": trickle(data)}) as srv:
            job = new_job(manager, [(srv.url("/f"), tmp_path / "f")])
            engine = make_engine(manager, checkpoint_interval=600.0)
            async with running(engine):
                await until(
                    lambda: engine.live_progress.get((job.id, 0), 0) >= 64 * KiB, "some bytes"
                )
                assert checkpointed(job) == 0
                client.get_job(job.id).suspend()
                await until(lambda: job.state is S.SUSPENDED, "SUSPENDED")
                await until(lambda: srv.active == 0, "the server to see the client go")
                cut = srv.aborted  # (the end of the run may cut the last answer's tail too)
                await until(lambda: checkpointed(job) > 0, "the bytes received to be claimed")
                await until(lambda: not engine.live_progress, "the transfer task to end")
                count = len(events_of(manager, job.id))
                await stays(
                    lambda: len(events_of(manager, job.id)) == count and srv.active == 0,
                    "nothing happens while SUSPENDED",
                )
                events = events_of(manager, job.id)
                since = events[[type(e) for e in events].index(ev.JobSuspended) + 1 :]
                assert [type(e) for e in since] == [ev.BytesCheckpointed], since
                kept = checkpointed(job)
                assert job.state is S.SUSPENDED
                assert kept >= 64 * KiB
                assert temp_of(job, 0).stat().st_size == kept  # every byte written is claimed
                client.get_job(job.id).resume()
                await until(lambda: job.state is S.TRANSFERRED, "TRANSFERRED")
            return job, srv, kept, cut

    job, srv, kept, cut = asyncio.run(main())
    assert cut == 1
    assert [h.range_start for h in srv.hits] == [None, kept]
    job.complete()
    assert (tmp_path / "f").read_bytes() == data


def test_a_job_suspended_when_the_engine_started_is_loaded_by_its_next_event_and_runs(
    tmp_path: Path,
) -> None:
    """The engine does not load SUSPENDED jobs at start (with 100,000 of them that was its
    whole start-up): an event of such a job loads it, from its read-model snapshot plus the
    events after it, and a Resume then runs it as usual."""
    data = os.urandom(96 * KiB)
    manager = TransferManager(home=tmp_path / "home")
    client = TransferManager(home=tmp_path / "home")

    async def main() -> TransferJob:
        async with FaultServer({"/f": Served(data)}) as srv:
            job = new_job(manager, [(srv.url("/f"), tmp_path / "f")], start=False)
            job.description = "before the engine"
            manager.refresh_views()
            engine = make_engine(manager)
            streams: list[tuple[str, int]] = []
            stream = engine.store.stream

            def counted(job_id: str, after_version: int = 0):  # type: ignore[no-untyped-def]
                streams.append((job_id, after_version))
                return stream(job_id, after_version)

            engine.store.stream = counted  # type: ignore[method-assign]
            async with running(engine):
                await asyncio.sleep(0.1)
                assert job.id not in engine._jobs, "a SUSPENDED job was loaded at start"
                client.get_job(job.id).priority = JobPriority.HIGH
                await until(lambda: job.id in engine._jobs, "the changed job to be loaded")
                assert engine._jobs[job.id].priority is JobPriority.HIGH
                assert engine._jobs[job.id].description == "before the engine"
                assert (job.id, 0) not in streams, "the job was replayed from its first event"
                await stays(lambda: not srv.hits, "a SUSPENDED job does not run")
                client.get_job(job.id).resume()
                await until(lambda: job.state is S.TRANSFERRED, "TRANSFERRED")
            return job

    job = asyncio.run(main())
    job.complete()
    assert (tmp_path / "f").read_bytes() == data


def test_cancel_while_transferring_deletes_the_temp_file(tmp_path: Path) -> None:
    data = os.urandom(768 * KiB)
    dest = tmp_path / "dest"
    dest.mkdir()
    manager = TransferManager(home=tmp_path / "home")
    client = TransferManager(home=tmp_path / "home")

    async def main() -> TransferJob:
        async with FaultServer({"/f": trickle(data)}) as srv:
            job = new_job(manager, [(srv.url("/f"), dest / "f")])
            engine = make_engine(manager)
            async with running(engine):
                await until(lambda: checkpointed(job) >= 64 * KiB, "some progress")
                assert temp_of(job, 0).exists()
                assert client.get_job(job.id).cancel() == hr.S_OK
                await until(lambda: srv.active == 0, "the server to see the client go")
                await until(lambda: not engine.live_progress, "the transfer task to end")
                await asyncio.sleep(0.1)
            return job

    job = asyncio.run(main())
    assert job.state is S.CANCELLED
    assert list(dest.iterdir()) == []


def test_cancel_from_another_process_between_two_files_leaves_no_temp_file(
    tmp_path: Path,
) -> None:
    """The client cancels (and deletes the temp files) while the engine, which has not read the
    log since, is opening the next file: the engine must not leave that file's temp behind."""
    small, big = os.urandom(32 * KiB), os.urandom(256 * KiB)
    files = {"/a": Served(small), "/b": trickle(big, header_delay=0.3)}
    dest = tmp_path / "dest"
    dest.mkdir()
    manager = TransferManager(home=tmp_path / "home")
    client = TransferManager(home=tmp_path / "home")

    async def main() -> TransferJob:
        async with FaultServer(files) as srv:
            job = new_job(manager, [(srv.url("/a"), dest / "a"), (srv.url("/b"), dest / "b")])
            # The engine reads the log every 2 s (``backhaul serve --poll 2``).
            engine = make_engine(manager, poll_interval=2.0)
            async with running(engine):
                await until(lambda: bool(srv.hits_for("/b")), "the request for the 2nd file")
                assert client.get_job(job.id).cancel() == hr.S_OK
                await until(lambda: srv.active == 0, "the server to finish or see the client go")
                await asyncio.sleep(0.3)
                engine.wake()
                await until(lambda: not engine.live_progress, "the transfer task to end")
                await asyncio.sleep(0.1)
            return job

    job = asyncio.run(main())
    assert job.state is S.CANCELLED
    assert sorted(p.name for p in dest.iterdir()) == []


def test_a_new_engine_resumes_a_stopped_engines_job_from_its_last_checkpoint(
    tmp_path: Path,
) -> None:
    data = os.urandom(768 * KiB)
    manager = TransferManager(home=tmp_path / "home")

    async def main() -> tuple[TransferJob, FaultServer, int]:
        # About 1.5 s of body: stopped after 128 KiB, well before the end on a busy machine.
        async with FaultServer({"/f": trickle(data, delay=0.03)}) as srv:
            job = new_job(manager, [(srv.url("/f"), tmp_path / "f")])
            engine = make_engine(manager)
            async with running(engine):
                await until(lambda: checkpointed(job) >= 128 * KiB, "some progress")
            # stopped: its turn ended, the job waits in QUEUED
            assert job.state is S.QUEUED
            assert isinstance(events_of(manager, job.id)[-1], ev.SliceEnded)
            kept = checkpointed(job)
            assert 0 < kept < len(data)
            await asyncio.wait_for(make_engine(manager).run(until_idle=True), 10)
            return job, srv, kept

    job, srv, kept = asyncio.run(main())
    assert job.state is S.TRANSFERRED
    assert [h.range_start for h in srv.hits] == [None, kept]
    job.complete()
    assert (tmp_path / "f").read_bytes() == data


def test_a_job_whose_files_were_all_claimed_before_a_crash_is_declared_transferred(
    tmp_path: Path,
) -> None:
    """An engine that died between the last FileTransferred and JobTransferred leaves a
    job TRANSFERRING with no file left to fetch: the next engine ends its slice, runs it
    with nothing pending and declares it TRANSFERRED, without a request."""
    from backhaul.adapters import localfile
    from backhaul.core import command as cmd

    data = os.urandom(4 * KiB)
    manager = TransferManager(home=tmp_path / "home")

    async def main() -> tuple[TransferJob, FaultServer]:
        async with FaultServer({"/f": Served(data)}) as srv:
            job = new_job(manager, [(srv.url("/f"), tmp_path / "f")])
            for command in (cmd.StartTransfer(), cmd.Connect()):
                manager.execute(job.id, command)
            localfile.temp_path(job.id, 0, str(tmp_path / "f")).write_bytes(data)
            manager.execute(job.id, cmd.FinishFile(0, len(data)))
            assert job.state is S.TRANSFERRING and not job.snapshot().pending_files
            await asyncio.wait_for(make_engine(manager).run(until_idle=True), 10)
            return job, srv

    job, srv = asyncio.run(main())
    assert job.state is S.TRANSFERRED, job.error
    assert not srv.hits
    job.complete()
    assert (tmp_path / "f").read_bytes() == data


def test_another_writers_event_is_folded_onto_the_engines_copy_not_reread_from_the_start(
    tmp_path: Path,
) -> None:
    """A client sets the description of a running 200-file job five times. Before, each
    such event made the engine's next append fail and the engine read and decode the job's
    whole stream again (its FilesAdded of every file): with 5,000 files and a change every
    0.1 s, the transfer ran at half speed. Now it reads only the events after its copy."""
    manager = TransferManager(home=tmp_path / "home")
    client = TransferManager(home=tmp_path / "home")
    files = {f"/f{i}": trickle(os.urandom(8 * KiB), step=KiB, delay=0.01) for i in range(200)}
    whole_reads: list[str] = []

    async def main() -> TransferJob:
        async with FaultServer(files) as srv:
            job = new_job(manager, [(srv.url(p), tmp_path / p[1:]) for p in files])
            engine = make_engine(manager)
            stream = engine.store.stream

            def counted(job_id: str, after_version: int = 0) -> Any:
                if job_id == job.id and not after_version:
                    whole_reads.append(job_id)
                return stream(job_id, after_version)

            engine.store.stream = counted  # type: ignore[method-assign]
            async with running(engine):
                await until(lambda: job.progress.files_transferred >= 20, "some files")
                for i in range(5):
                    client.get_job(job.id).description = f"changed {i}"
                    await asyncio.sleep(0.05)
                assert job.state is S.TRANSFERRING  # the changes came while it ran
                await until(lambda: job.state is S.TRANSFERRED, "the job", 60)
            engine.store.stream = stream  # type: ignore[method-assign]
            return job

    job = asyncio.run(main())
    assert job.description == "changed 4"
    events = events_of(manager, job.id)
    assert len(of_type(events, ev.PropertySet)) >= 5
    assert whole_reads == []


def test_a_complete_while_files_are_being_claimed_stops_the_claim_quietly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Found with `backhaul complete` under a running `serve`: the claimer, resuming after
    the job was completed and let go of, raised KeyError from the engine's job table, and
    asyncio logged 'Task exception was never retrieved'. Now it stops as for any job that
    went, and the temp files it made are deleted once the transfer stopped."""
    files = {f"/f{i}": Served(os.urandom(16 * KiB)) for i in range(6)}
    manager = TransferManager(home=tmp_path / "home")
    client = TransferManager(home=tmp_path / "home")
    dest = tmp_path / "dest"
    dest.mkdir()

    async def main() -> TransferJob:
        gate = asyncio.Event()
        async with FaultServer(files) as srv:
            job = new_job(manager, [(srv.url(p), dest / p[1:]) for p in files])
            engine = make_engine(manager)
            held = engine.group_sync = HeldSync(gate)
            async with running(engine):
                await until(lambda: held.held, "a claim to start")
                assert client.get_job(job.id).complete() == hr.BG_S_PARTIAL_COMPLETE
                engine.wake()
                await until(lambda: job.id not in engine._jobs, "the engine to let it go")
                gate.set()
                await asyncio.sleep(0.3)
                await until(lambda: not engine._tasks, "the transfer to stop")
                await asyncio.sleep(0.2)
            return job

    with caplog.at_level("ERROR"):
        job = asyncio.run(main())
    assert job.state is S.ACKNOWLEDGED
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text
    assert sorted(p.name for p in dest.iterdir() if p.name.startswith(".")) == []
