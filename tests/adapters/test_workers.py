"""Several engines (workers) on one PostgreSQL store: each job runs on exactly one worker
at a time, a worker's lease is the fence, and a worker that lost its lease can append
nothing more for the job and never touches the new owner's bytes."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import pytest
from test_engine import (
    FaultServer,
    HeldSync,
    Served,
    make_engine,
    new_job,
    sha256,
    trickle,
    until,
)

from backhaul.adapters import localfile
from backhaul.adapters.manager import TransferManager
from backhaul.adapters.store import open_store
from backhaul.core import command as cmd
from backhaul.core import event as ev
from backhaul.core.error import BitsError
from backhaul.core.limit import UNLIMITED
from backhaul.core.port import Download
from backhaul.core.vocabulary import JobPriority, JobState
from backhaul.transports.http import HttpTransport

KiB = 1024
pytestmark = pytest.mark.peer


def managers(url: str, n: int) -> list[TransferManager]:
    return [TransferManager(open_store(url), limits=UNLIMITED) for _ in range(n)]


def lease_holders(manager: TransferManager, job_id: str) -> list[str]:
    return [
        a.event.worker for a in manager.store.stream(job_id) if isinstance(a.event, ev.LeaseTaken)
    ]


def test_two_workers_share_the_queue_and_each_job_runs_on_one_worker_at_a_time(
    postgres_url: str, tmp_path: Path
) -> None:
    files = {f"/f{i}": os.urandom(96 * KiB + i) for i in range(8)}

    async def main() -> None:
        served = {path: trickle(data, step=32 * KiB, delay=0.01) for path, data in files.items()}
        async with FaultServer(served) as server:
            first, second = managers(postgres_url, 2)
            jobs = [new_job(first, [(server.url(p), tmp_path / p.strip("/"))]) for p in files]
            engines = [
                make_engine(m, worker=name, lease_seconds=5.0, max_background=2)
                for m, name in ((first, "worker-a"), (second, "worker-b"))
            ]
            runs = [asyncio.create_task(e.run(until_idle=True)) for e in engines]
            await asyncio.wait_for(asyncio.gather(*runs), 60)
            holders = set()
            for job in jobs:
                assert job.state is JobState.TRANSFERRED, job.error
                seen = lease_holders(first, job.id)
                assert seen, "every job was leased"
                holders.update(seen)
                job.complete()
            assert holders == {"worker-a", "worker-b"}, "both workers took jobs"
            for path, data in files.items():
                assert sha256(tmp_path / path.strip("/")) == sha256(data)
            assert not list(tmp_path.glob(".*.bhtmp"))

    asyncio.run(main())


def test_a_lease_held_by_another_worker_refuses_the_take(postgres_url: str, tmp_path: Path) -> None:
    first, second = managers(postgres_url, 2)
    job = first.create_job("leased")
    job.add_file("http://127.0.0.1:1/x", tmp_path / "x")
    job.resume()
    first.execute(job.id, cmd.TakeLease("worker-a", 30))
    with pytest.raises(BitsError):
        second.execute(job.id, cmd.TakeLease("worker-b", 30))
    assert job.snapshot().lease_worker == "worker-a"


def test_a_stalled_worker_loses_its_job_and_is_fenced(postgres_url: str, tmp_path: Path) -> None:
    data = os.urandom(2048 * KiB)

    async def main() -> None:
        async with FaultServer({"/f": trickle(data, step=16 * KiB, delay=0.02)}) as server:
            first, second = managers(postgres_url, 2)
            job = new_job(
                first, [(server.url("/f"), tmp_path / "f.bin")], priority=JobPriority.FOREGROUND
            )
            a = make_engine(first, worker="worker-a", lease_seconds=1.0)
            a._extend_leases = lambda: None  # type: ignore[method-assign]  # it stalls
            run_a = asyncio.create_task(a.run())
            await until(lambda: job.snapshot().files[0].bytes_transferred > 0, "A checkpoints")

            async def frozen() -> None:  # A takes no new turn either: it is stuck
                return None

            a._schedule = frozen  # type: ignore[method-assign]
            held_by_a = job.snapshot().files[0].bytes_transferred
            b = make_engine(second, worker="worker-b", lease_seconds=5.0)
            run_b = asyncio.create_task(b.run(until_idle=True))
            await asyncio.wait_for(run_b, 60)
            a.stop()
            await asyncio.wait_for(run_a, 15)
            assert job.state is JobState.TRANSFERRED
            events = [x.event for x in first.store.stream(job.id)]
            takes = [e.worker for e in events if isinstance(e, ev.LeaseTaken)]
            assert takes[0] == "worker-a"
            assert "worker-b" in takes
            # After B's first lease, nothing A decided reached the log.
            after_b = takes.index("worker-b")
            later = events[
                [i for i, e in enumerate(events) if isinstance(e, ev.LeaseTaken)][after_b] :
            ]
            assert not any(isinstance(e, ev.LeaseTaken) and e.worker == "worker-a" for e in later)
            snap = job.snapshot()
            assert snap.files[0].temp_worker == "worker-b"
            b_checkpoints = [
                e.bytes_transferred for e in later if isinstance(e, ev.BytesCheckpointed)
            ]
            assert not b_checkpoints or b_checkpoints[0] >= held_by_a  # B went on, not back
            job.complete()
            assert sha256(tmp_path / "f.bin") == sha256(data)
            # A's own temp file was never published, and cancel/complete cleaned it.
            a_temp = localfile.temp_path(job.id, 0, str(tmp_path / "f.bin"), "worker-a")
            assert not a_temp.exists()

    asyncio.run(main())


class _HeldAtTheEnd:
    """A download whose last step (the end of its body) waits for ``gate``."""

    def __init__(self, inner: Download, gate: asyncio.Event) -> None:
        self._inner, self._gate = inner, gate
        self.remote, self.offset = inner.remote, inner.offset
        self.held = False

    def __aiter__(self) -> AsyncGenerator[bytes, None]:
        return self._chunks()

    async def _chunks(self) -> AsyncGenerator[bytes, None]:
        async for chunk in self._inner:
            yield chunk
        self.held = True
        await self._gate.wait()

    async def aclose(self) -> None:
        await self._inner.aclose()


class _Gated(HttpTransport):
    def __init__(self, gate: asyncio.Event) -> None:
        super().__init__()
        self.gate = gate
        self.opened: list[_HeldAtTheEnd] = []

    async def open(self, *args: Any, **options: Any) -> Any:
        download = _HeldAtTheEnd(await super().open(*args, **options), self.gate)
        self.opened.append(download)
        return download


@pytest.mark.parametrize("stall", ["body", "claim"])
def test_a_worker_that_stalled_past_its_lease_leaves_no_temp_file_behind(
    postgres_url: str, tmp_path: Path, stall: str
) -> None:
    """A small body is kept in memory and its temp file made when it is claimed. Worker A
    stalls past its lease (no renewal, no scheduling, no reading of the log), either with
    the whole body received (``body``) or inside the claim, after its lease check
    (``claim``). B takes the job over and finishes it, and the client completes it, which
    deletes every temp file there is. When A wakes up, it must make no temp file (body), or
    delete the one it made once it learns the job was completed (claim): nothing else would
    ever delete it."""
    data = os.urandom(48 * KiB)

    async def main() -> None:
        gate = asyncio.Event()
        async with FaultServer({"/f": Served(data)}) as server:
            first, second = managers(postgres_url, 2)
            job = new_job(
                first, [(server.url("/f"), tmp_path / "f.bin")], priority=JobPriority.FOREGROUND
            )
            gated, held_sync = _Gated(gate), HeldSync(gate)
            a = make_engine(
                first,
                worker="worker-a",
                lease_seconds=1.0,
                checkpoint_interval=30.0,
                transports={"http": gated if stall == "body" else HttpTransport()},
            )
            if stall == "claim":
                a.group_sync = held_sync
            run_a = asyncio.create_task(a.run())
            await until(lambda: held_sync.held or any(d.held for d in gated.opened), "A stalls")
            task_a = a._tasks[job.id]

            async def stalled() -> None:
                return None

            a._follow = a._schedule = stalled  # type: ignore[method-assign]
            await asyncio.sleep(1.2)  # A's lease runs out
            a._renewed = float("-inf")
            a._extend_leases()  # what A's first scheduling pass after waking up does
            expires = a._jobs[job.id].lease_expires
            assert expires is not None and expires <= a.clock.now(), "a lapsed lease renewed"
            b = make_engine(second, worker="worker-b", lease_seconds=5.0)
            await asyncio.wait_for(b.run(until_idle=True), 30)
            assert job.complete() == 0
            assert sha256(tmp_path / "f.bin") == sha256(data)
            assert not list(tmp_path.glob("*.bhtmp"))

            gate.set()  # A wakes up
            await until(task_a.done, "A's transfer ends")
            await until(lambda: not a._cmdlines, "A's clean-up ends")
            a.stop()
            await asyncio.wait_for(run_a, 15)
            assert not list(tmp_path.glob("*.bhtmp")), "A left a temp file"
            assert sha256(tmp_path / "f.bin") == sha256(data)
            assert "worker-a" not in lease_holders(first, job.id)[1:]

    asyncio.run(main())


@pytest.mark.parametrize("lost", [False, True])
def test_a_worker_takes_over_the_ranges_another_filled(
    postgres_url: str, tmp_path: Path, lost: bool
) -> None:
    """An on-demand file whose ranges worker A filled, then worker B runs the job for a new
    range: B copies A's ranges into its own temp file (a sparse copy, laid out as the remote
    file) instead of fetching them again, and fetches only the new range. When A's temp
    file is gone, B restarts the file and fetches every range."""
    from test_engine_on_demand import on_demand_job

    data = os.urandom(256 * KiB)

    first, second = managers(postgres_url, 2)

    async def main() -> tuple[Any, FaultServer]:
        async with FaultServer({"/f": Served(data)}) as server:
            job = on_demand_job(first, server.url("/f"), tmp_path / "f.bin")
            job.request_file_ranges(0, [(0, 10 * KiB), (100 * KiB, 10 * KiB)])
            job.resume()
            a = make_engine(first, worker="worker-a", lease_seconds=5.0)
            await asyncio.wait_for(a.run(until_idle=True), 60)
            assert job.state is JobState.SUSPENDED
            assert job.snapshot().files[0].temp_worker == "worker-a"
            if lost:
                localfile.temp_path(job.id, 0, str(tmp_path / "f.bin"), "worker-a").unlink()
            job.request_file_ranges(0, [(200 * KiB, None)])
            job.resume()
            b = make_engine(second, worker="worker-b", lease_seconds=5.0)
            await asyncio.wait_for(b.run(until_idle=True), 60)
            return job, server

    job, server = asyncio.run(main())
    assert job.state is JobState.SUSPENDED
    events = [x.event for x in first.store.stream(job.id)]
    restarts = [e.reason for e in events if isinstance(e, ev.FileRestarted)]
    gets = [h.range_start for h in server.hits_for("/f") if h.method == "GET"]
    if lost:
        assert len(restarts) == 1 and "cannot take over another worker's temp" in restarts[0]
        assert gets == [0, 100 * KiB, 0, 100 * KiB, 200 * KiB]
    else:
        assert restarts == []
        assert gets == [0, 100 * KiB, 200 * KiB]  # nothing fetched twice
    snap = job.snapshot()
    assert snap.files[0].temp_worker == "worker-b"
    mine = localfile.temp_path(job.id, 0, str(tmp_path / "f.bin"), "worker-b")
    held = mine.read_bytes()
    for offset, length in ((0, 10 * KiB), (100 * KiB, 10 * KiB), (200 * KiB, 56 * KiB)):
        assert held[offset : offset + length] == data[offset : offset + length]
