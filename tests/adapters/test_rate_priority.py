"""A job's priority changed during a transfer: the rate buckets (and yielding) follow it
from the next chunk on, run by the real engine against servers on 127.0.0.1
(bits-core.md §4, §16: FOREGROUND jobs are exempt from the bandwidth policy, background
jobs are held to it)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from test_engine import (  # the autouse fixture keeps BACKHAUL_STORE out
    FaultServer,
    KiB,
    Served,
    _no_store_from_the_environment,  # noqa: F401
    make_engine,
    new_job,
    running,
    stays,
    trickle,
    until,
)
from test_engine_on_demand import on_demand_job
from test_engine_upload import an_upload, upload_server

from backhaul.adapters.engine import Engine
from backhaul.adapters.manager import TransferJob, TransferManager
from backhaul.core.bandwidth import BandwidthPolicy, Limit
from backhaul.core.vocabulary import JobPriority, JobState

MiB = 1024 * KiB
LIMIT = 100_000  # bytes per second: 4 MiB would take about 40 s
SLOW = BandwidthPolicy((Limit(LIMIT),))


async def raised_to_foreground(engine: Engine, job: TransferJob, done: JobState) -> float:
    """Seconds from raising ``job`` to FOREGROUND, once the engine holds it mid-transfer
    under ``SLOW``, until it is ``done`` (about 40 s if it stayed limited)."""
    await until(lambda: engine.live_progress.get((job.id, 0), 0) > 0, "started")
    await asyncio.sleep(0.3)
    assert job.state is JobState.TRANSFERRING  # held back by the limit
    job.priority = JobPriority.FOREGROUND
    raised = asyncio.get_running_loop().time()
    await until(lambda: job.state is done, done.name, 15)
    return asyncio.get_running_loop().time() - raised


def test_a_download_raised_to_foreground_mid_transfer_leaves_the_global_limit(
    tmp_path: Path,
) -> None:
    data = os.urandom(4 * MiB)

    async def main() -> float:
        async with FaultServer({"/f": Served(data)}) as server:
            manager = TransferManager(home=tmp_path / "home")
            manager.set_bandwidth_policy(SLOW)
            job = new_job(manager, [(server.url("/f"), tmp_path / "f.bin")])
            engine = make_engine(manager)
            async with running(engine):
                return await raised_to_foreground(engine, job, JobState.TRANSFERRED)

    assert asyncio.run(main()) < 5.0


def test_a_download_lowered_from_foreground_mid_transfer_takes_the_global_limit(
    tmp_path: Path,
) -> None:
    """The job's own rate only lets the test catch it mid-transfer; once it is lifted,
    the global limit of the (now background) job is what holds it back."""
    data = os.urandom(4 * MiB)

    async def main() -> int:
        async with FaultServer({"/f": Served(data)}) as server:
            manager = TransferManager(home=tmp_path / "home")
            manager.set_bandwidth_policy(SLOW)
            job = new_job(
                manager,
                [(server.url("/f"), tmp_path / "f.bin")],
                start=False,
                priority=JobPriority.FOREGROUND,
            )
            job.max_rate = 2 * LIMIT
            job.resume()
            engine = make_engine(manager)
            async with running(engine):
                key = (job.id, 0)
                await until(lambda: engine.live_progress.get(key, 0) > 0, "started")
                job.priority = JobPriority.NORMAL
                job.max_rate = None
                before = engine.live_progress[key]
                await stays(lambda: job.state is JobState.TRANSFERRING, "held back", 1.5)
                return engine.live_progress[key] - before

    # About 150 kB in 1.5 s at the limit (and a bucket's burst); unlimited, the whole file.
    assert asyncio.run(main()) < 1 * MiB


def test_a_download_raised_to_foreground_stops_yielding(tmp_path: Path) -> None:
    """While the engine measures idle bandwidth, a background transfer's bytes count as
    ours and its socket is watched; raised to FOREGROUND, neither any more."""
    data = os.urandom(4 * MiB)

    async def main() -> tuple[Engine, int]:
        async with FaultServer({"/f": trickle(data)}) as server:  # about 2.6 s
            manager = TransferManager(home=tmp_path / "home")
            job = new_job(manager, [(server.url("/f"), tmp_path / "f.bin")])
            engine = make_engine(manager, yield_bandwidth=True)
            assert engine.yielder is not None
            async with running(engine):
                await until(lambda: engine.yielder.ours > 256 * KiB, "counted as ours")  # type: ignore[union-attr]
                assert engine._bg_sockets
                job.priority = JobPriority.FOREGROUND
                await until(lambda: not engine._bg_sockets, "the socket no longer ours")
                assert job.state is JobState.TRANSFERRING
                ours = engine.yielder.ours
                await until(lambda: job.state is JobState.TRANSFERRED, "transferred", 15)
                return engine, ours

    engine, ours = asyncio.run(main())
    assert engine.yielder is not None
    assert engine.yielder.ours == ours < len(data)


def test_an_on_demand_fill_raised_to_foreground_mid_range_leaves_the_global_limit(
    tmp_path: Path,
) -> None:
    data = os.urandom(4 * MiB)

    async def main() -> float:
        async with FaultServer({"/f": Served(data)}) as server:
            manager = TransferManager(home=tmp_path / "home")
            manager.set_bandwidth_policy(SLOW)
            job = on_demand_job(manager, server.url("/f"), tmp_path / "f.bin")
            job.request_file_ranges(0, [(0, len(data) - KiB)])  # then it waits for more
            engine = make_engine(manager)
            async with running(engine):
                job.resume()
                return await raised_to_foreground(engine, job, JobState.SUSPENDED)

    assert asyncio.run(main()) < 5.0


def test_an_upload_raised_to_foreground_mid_transfer_leaves_the_global_limit(
    tmp_path: Path,
) -> None:
    async def main() -> float:
        async with upload_server(tmp_path) as (url, _www):
            manager, job, _data = an_upload(tmp_path, url, 4 * MiB)
            manager.set_bandwidth_policy(SLOW)
            job.resume()
            engine = Engine(manager, poll_interval=0.02, yield_bandwidth=False)
            engine.upload_fragment = 64 * KiB
            async with running(engine):
                return await raised_to_foreground(engine, job, JobState.TRANSFERRED)

    assert asyncio.run(main()) < 5.0
