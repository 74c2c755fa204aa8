"""The engine's writer: decisions are made against the engine's copy of a job and appended
later in group commits. When the log refuses a batch (another writer appended first), every
decision that rested on the refused one is decided again against the log, with the lease
fence, before anything of it is appended."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
from pathlib import Path

import pytest
from test_engine import (
    FaultServer,
    KiB,
    checkpointed,
    events_of,
    make_engine,
    new_job,
    running,
    trickle,
    until,
)

from backhaul.adapters.engine import JobGone
from backhaul.adapters.manager import TransferJob, TransferManager
from backhaul.core import command as cmd
from backhaul.core import event as ev
from backhaul.core.error import BitsError
from backhaul.core.vocabulary import JobState, NotifyFlags


def hold(
    monkeypatch: pytest.MonkeyPatch, obj: object, name: str
) -> tuple[threading.Event, threading.Event]:
    """Make ``obj.name`` (called in a worker thread) block until the second event is set;
    the first is set when a call has begun."""
    entered, go_on = threading.Event(), threading.Event()
    real = getattr(obj, name)

    def held(*args, **kwargs):  # type: ignore[no-untyped-def]
        entered.set()
        go_on.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(obj, name, held)
    return entered, go_on


def test_a_decision_made_while_a_refused_batch_is_reloaded_is_decided_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Worker A's copy says it holds the lease, but its lease ran out and worker B took the
    job. A renews (refused: the log moved on); while A reloads the job, its transfer ends
    and queues a ReleaseLease against the copy it still has. That release rests on A's own
    refused renewal: it must be fenced, not appended after B's LeaseTaken."""
    manager = TransferManager(home=tmp_path / "home")
    job = manager.create_job("raced")
    job.add_file("http://127.0.0.1:1/x", tmp_path / "x")
    job.resume()

    async def main() -> None:
        engine = make_engine(manager, worker="worker-a", lease_seconds=30.0)
        engine._writer_wake = asyncio.Event()
        engine._flush_lock = asyncio.Lock()
        await engine._start()
        taken = engine._enqueue(job.id, cmd.TakeLease("worker-a", 0.01))
        await engine._flush()
        await taken
        await asyncio.sleep(0.05)  # A's lease runs out; B takes the job behind A's back
        manager.execute(job.id, cmd.TakeLease("worker-b", 30))

        reloading, go_on = hold(monkeypatch, engine.store, "stream")
        renewal = engine._enqueue(job.id, cmd.TakeLease("worker-a", 30))
        flushing = asyncio.create_task(engine._flush())
        await asyncio.to_thread(reloading.wait, 10)
        release = engine._enqueue(job.id, cmd.ReleaseLease("worker-a"))
        go_on.set()
        await flushing
        with pytest.raises(BitsError):
            await renewal
        with pytest.raises(JobGone):
            await release

    asyncio.run(main())
    after_b = False
    for recorded in manager.store.stream(job.id):
        e = recorded.event
        if isinstance(e, ev.LeaseTaken) and e.worker == "worker-b":
            after_b = True
        assert not (after_b and e.worker == "worker-a"), f"fenced worker appended {e!r}"
    assert job.snapshot().lease_worker == "worker-b"


def test_a_transfer_stops_reading_while_the_log_cannot_take_its_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Back-pressure: while a checkpoint's commit is stuck (a store outage) for more than three
    checkpoint intervals, the transfer stops reading, so that a take-over refetches at most
    that much instead of everything received during the outage; it goes on once the log
    takes the checkpoint, and the file is whole."""
    data = os.urandom(3 * 1024 * KiB)
    manager = TransferManager(home=tmp_path / "home")

    async def main() -> tuple[int, TransferJob]:
        async with FaultServer({"/f": trickle(data)}) as server:  # about 1.6 MB/s
            job = new_job(manager, [(server.url("/f"), tmp_path / "f")])
            engine = make_engine(manager, checkpoint_interval=0.05)
            async with running(engine):
                await until(lambda: checkpointed(job) >= 64 * KiB, "a first checkpoint")
                append_many = engine.store.append_many
                stuck, go_on = hold(monkeypatch, engine.store, "append_many")
                await asyncio.to_thread(stuck.wait, 10)
                began = engine.live_progress[(job.id, 0)]
                await asyncio.sleep(1.0)  # about 1.6 MB would arrive without back-pressure
                grown = engine.live_progress[(job.id, 0)] - began
                monkeypatch.setattr(engine.store, "append_many", append_many)
                go_on.set()
                await until(lambda: job.state is JobState.TRANSFERRED, "TRANSFERRED", 30)
            return grown, job

    grown, job = asyncio.run(main())
    # Three checkpoint intervals at 1.6 MB/s is about 240 KB; allow the chunks in hand.
    assert grown < 512 * KiB, f"{grown} bytes received while the log was stuck"
    job.complete()
    assert (tmp_path / "f").read_bytes() == data


def through_an_outage(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    call: str,
    error: Exception,
    ended: str,
) -> tuple[TransferManager, TransferJob, bytes, int, list[logging.LogRecord]]:
    """A transfer under way while the store's ``call`` raises ``error`` for a second; run
    until the job is TRANSFERRED and the engine has said ``ended``. The manager, the job,
    its data, how many calls failed, and what the engine logged."""
    data = os.urandom(2 * 1024 * KiB)
    manager = TransferManager(home=tmp_path / "home")
    failed = [0]

    async def main() -> TransferJob:
        async with FaultServer({"/f": trickle(data)}) as server:
            job = new_job(manager, [(server.url("/f"), tmp_path / "f")])
            engine = make_engine(manager, checkpoint_interval=0.05)
            async with running(engine) as task:
                await until(lambda: checkpointed(job) >= 64 * KiB, "a first checkpoint")
                working = getattr(engine.store, call)

                def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
                    failed[0] += 1
                    raise error

                monkeypatch.setattr(engine.store, call, broken)
                await asyncio.sleep(1.0)
                assert not task.done()  # the engine outlives it
                monkeypatch.setattr(engine.store, call, working)
                await until(lambda: job.state is JobState.TRANSFERRED, "TRANSFERRED", 30)
                said = lambda: any(ended in r.getMessage() for r in caplog.records)  # noqa: E731
                await until(said, ended, 10)
            return job

    with caplog.at_level(logging.INFO, logger="backhaul.engine"):
        job = asyncio.run(main())
    records = [r for r in caplog.records if r.name == "backhaul.engine"]
    return manager, job, data, failed[0], records


def test_a_log_that_refuses_appends_for_a_while_is_waited_out_without_a_flood(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The log's disk fills for a second (SQLite: 'database or disk is full') under a
    running transfer. The transfer stops without failing its job (nothing could record an
    error anyway), the writer waits longer between appends while they are refused (0.1 s,
    doubling) instead of trying hundreds of times a second, the outage is logged once and
    its end once (no traceback per append), and the job finishes once the log takes
    appends again."""
    full = sqlite3.OperationalError("database or disk is full")
    manager, job, data, refused, records = through_an_outage(
        tmp_path, monkeypatch, caplog, "append_many", full, "takes appends again"
    )
    assert 1 <= refused <= 8, refused  # 0.1 + 0.2 + 0.4 + ... within 1 s
    failures = [r for r in records if "appending to the log failed" in r.getMessage()]
    assert len(failures) == 1 and "database or disk is full" in failures[0].getMessage()
    assert not failures[0].exc_info  # no traceback
    back = [r.getMessage() for r in records if "takes appends again" in r.getMessage()]
    assert back == [f"the log takes appends again ({refused} failed)"]
    assert not [r for r in records if "unexpectedly" in r.getMessage()]
    assert not [e for e in events_of(manager, job.id) if isinstance(e, ev.ErrorOccurred)]
    job.complete()
    assert (tmp_path / "f").read_bytes() == data


def test_an_engine_outlives_a_log_it_cannot_read_for_a_while(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The log cannot be read for a second (a database server gone, a disk error): the
    engine's passes fail, and instead of ending the engine (a serve would exit with a
    traceback) they wait (0.1 s, doubling) and go on; one line each way, and the transfer
    under way finishes."""
    broken = sqlite3.OperationalError("disk I/O error")
    _, job, data, failed, records = through_an_outage(
        tmp_path, monkeypatch, caplog, "read", broken, "read again"
    )
    assert 1 <= failed <= 8, failed
    lines = [r.getMessage() for r in records]
    assert len([m for m in lines if m.startswith("reading the log failed: disk I/O error")]) == 1
    assert lines.count(f"the log can be read again ({failed} failed)") == 1
    job.complete()
    assert (tmp_path / "f").read_bytes() == data


def test_the_engine_observes_its_own_appends_without_reading_them_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the engine appended is observed from memory, in log order (most of it: see the
    last assertion): its notifications still fire, and a change another writer makes in the
    middle is read from the log."""
    manager = TransferManager(home=tmp_path / "home")
    files = {f"/f{i}": trickle(os.urandom(64 * KiB), step=8 * KiB, delay=0.02) for i in range(3)}
    read_back: list[ev.Event] = []
    real_read = manager.store.read

    def read(after: int = 0, limit: int = 1000) -> list:  # type: ignore[type-arg]
        records = real_read(after, limit)
        read_back.extend(r.event for r in records)
        return records

    monkeypatch.setattr(manager.store, "read", read)

    async def main() -> tuple[TransferJob, list[str]]:
        async with FaultServer(files) as srv:
            flags = int(NotifyFlags.JOB_TRANSFERRED | NotifyFlags.FILE_TRANSFERRED)
            job = new_job(
                manager, [(srv.url(p), tmp_path / p[1:]) for p in files], notify_flags=flags
            )
            engine = make_engine(manager)
            told: list[str] = []
            engine.on("file_transferred", lambda _job, info: told.append(info.local_name))
            async with running(engine):
                await until(lambda: job.state is JobState.TRANSFERRING, "TRANSFERRING")
                job.description = "changed while it runs"  # another writer's event
                await until(lambda: len(told) == 3, "three files told")
                await until(
                    lambda: (
                        getattr(engine.logged(job.id), "description", None)
                        == "changed while it runs"
                    ),
                    "the engine's copy has the other writer's change",
                )
                # Stopped before its JobTransferred, the engine would give the job back (QUEUED).
                await until(lambda: job.state is JobState.TRANSFERRED, "TRANSFERRED")
            return job, told

    job, told = asyncio.run(main())
    assert job.state is JobState.TRANSFERRED
    assert told == [str(tmp_path / p[1:]) for p in files]
    assert any(isinstance(e, ev.PropertySet) for e in read_back)
    engine_events = (
        ev.TransferStarted,
        ev.Connected,
        ev.BytesCheckpointed,
        ev.FileTransferred,
        ev.JobTransferred,
    )
    appended = [e for e in events_of(manager, job.id) if isinstance(e, engine_events)]
    again = [e for e in read_back if isinstance(e, engine_events)]
    # Its own events are observed from memory. A batch whose append commits while a read of
    # the log is under way comes back with that read (harmless: it is not folded again);
    # reading every one of them back was the old way.
    assert len(appended) >= 6
    assert len(again) <= len(appended) // 2, (len(again), len(appended))


def test_a_read_of_the_log_stops_before_the_engines_own_next_event(tmp_path: Path) -> None:
    """Another writer's events between the engine's position and its own next event: the
    engine reads only that gap, and observes its own events after it from memory."""
    engine = make_engine(TransferManager(home=tmp_path / "home"))
    engine._position = 10
    for own, limit in (([13, 14], 2), ([11, 12], 5000), ([], 5000), ([9000], 5000)):
        engine._appended = dict.fromkeys(own)  # type: ignore[arg-type]
        assert engine._read_limit() == limit, own
