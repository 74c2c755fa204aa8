"""Bandwidth policy, cost policy and per-job rates, run by the real engine against a
trickling fault server (bits-core.md §4, §14: blocked jobs wait in TRANSIENT_ERROR with
the policy's code, count no error, and go on when the condition clears)."""

from __future__ import annotations

import asyncio
import io
import json
import os
from datetime import timedelta
from pathlib import Path

import pytest
from test_engine import (
    FaultServer,
    Served,
    events_of,
    make_engine,
    new_job,
    of_type,
    running,
    sha256,
    stays,
    trickle,
    until,
)

from backhaul.adapters import localfile
from backhaul.adapters.cli import main as cli_main
from backhaul.adapters.clock import ManualClock
from backhaul.adapters.manager import TransferJob, TransferManager
from backhaul.core import event as ev
from backhaul.core import hresult
from backhaul.core.bandwidth import BandwidthPolicy, Limit, parse_window
from backhaul.core.policy import why_waiting
from backhaul.core.vocabulary import CostFlags, JobPriority, JobPropertyId, JobState

KiB = 1024
MiB = 1024 * KiB
ALWAYS = parse_window("all 00:00-24:00")


def test_a_zero_limit_blocks_background_jobs_until_the_policy_changes(tmp_path: Path) -> None:
    data = os.urandom(256 * KiB)

    async def main() -> None:
        async with FaultServer({"/f": Served(data)}) as server:
            manager = TransferManager(home=tmp_path / "home")
            manager.set_bandwidth_policy(BandwidthPolicy((Limit(0, ALWAYS),)))
            background = new_job(manager, [(server.url("/f"), tmp_path / "bg.bin")])
            foreground = new_job(
                manager, [(server.url("/f"), tmp_path / "fg.bin")], priority=JobPriority.FOREGROUND
            )
            engine = make_engine(manager)
            async with running(engine):
                await until(lambda: foreground.state is JobState.TRANSFERRED, "foreground done")
                await until(lambda: background.state is JobState.TRANSIENT_ERROR, "blocked")
                snap = background.snapshot()
                assert snap.blocked_by == hresult.BG_E_BLOCKED_BY_POLICY
                assert background.error is not None
                assert background.error.hresult == hresult.BG_E_BLOCKED_BY_POLICY
                assert background.error_count == 0
                manager.set_bandwidth_policy(BandwidthPolicy())  # the limit is lifted
                await until(lambda: background.state is JobState.TRANSFERRED, "released")
            assert background.error_count == 0
            background.complete()
            assert sha256(tmp_path / "bg.bin") == sha256(data)

    asyncio.run(main())


def test_a_costly_network_blocks_mid_transfer_and_the_job_goes_on_when_it_is_cheap(
    tmp_path: Path,
) -> None:
    data = os.urandom(2 * 1024 * KiB)

    async def main() -> None:
        async with FaultServer({"/f": trickle(data)}) as server:
            manager = TransferManager(home=tmp_path / "home")
            job = new_job(manager, [(server.url("/f"), tmp_path / "f.bin")], start=False)
            job.set_property(JobPropertyId.COST_FLAGS, int(CostFlags.UNRESTRICTED))
            job.resume()
            engine = make_engine(manager)
            engine.cost_probe = lambda: int(CostFlags.UNRESTRICTED)
            async with running(engine):
                await until(lambda: job.snapshot().files[0].bytes_transferred > 0, "progress")
                manager.set_network_cost(int(CostFlags.ROAMING))  # takes effect mid-transfer
                await until(lambda: job.state is JobState.TRANSIENT_ERROR, "blocked by cost")
                assert job.snapshot().blocked_by == hresult.BG_E_BLOCKED_BY_COST_TRANSFER_POLICY
                held = job.snapshot().files[0].bytes_transferred
                manager.set_network_cost(None)  # back to the system's (unrestricted) cost
                await until(lambda: job.state is JobState.TRANSFERRED, "transferred", 30)
            assert job.error_count == 0
            hits = server.hits_for("/f")
            assert any(h.range_start == held for h in hits), "resumed at the checkpoint"
            job.complete()
            assert sha256(tmp_path / "f.bin") == sha256(data)

    asyncio.run(main())


def test_changing_a_jobs_cost_flags_releases_it(tmp_path: Path) -> None:
    data = os.urandom(64 * KiB)

    async def main() -> None:
        async with FaultServer({"/f": Served(data)}) as server:
            manager = TransferManager(home=tmp_path / "home")
            manager.set_network_cost(int(CostFlags.USAGE_BASED))
            job = new_job(manager, [(server.url("/f"), tmp_path / "f.bin")], start=False)
            job.set_property(JobPropertyId.COST_FLAGS, int(CostFlags.UNRESTRICTED))
            job.resume()
            async with running(make_engine(manager)):
                await until(lambda: job.state is JobState.TRANSIENT_ERROR, "blocked by cost")
                job.set_property(JobPropertyId.COST_FLAGS, int(CostFlags.USAGE_BASED))
                await until(lambda: job.state is JobState.TRANSFERRED, "released")

    asyncio.run(main())


@pytest.mark.parametrize("condition", ["zero limit", "costly network"])
def test_a_retry_that_comes_due_while_a_policy_blocks_the_job_waits_blocked(
    tmp_path: Path, condition: str
) -> None:
    """The condition comes while the job waits for its retry (a 503): when the retry comes
    due the job is checked as it would start, and waits blocked instead of transferring;
    the retry that does not happen counts no error."""
    data = os.urandom(256 * KiB)
    clock = ManualClock()

    async def main() -> None:
        async with FaultServer({"/f": Served(data, statuses=[503])}) as server:
            manager = TransferManager(home=tmp_path / "home", clock=clock)
            job = new_job(
                manager,
                [(server.url("/f"), tmp_path / "f.bin")],
                start=False,
                minimum_retry_delay=5,
            )
            job.set_property(JobPropertyId.COST_FLAGS, int(CostFlags.UNRESTRICTED))
            job.resume()
            engine = make_engine(manager)
            engine.network_check_interval = 0.0
            async with running(engine):
                await until(lambda: job.state is JobState.TRANSIENT_ERROR, "the 503")
                if condition == "zero limit":
                    blocked_by = hresult.BG_E_BLOCKED_BY_POLICY
                    manager.set_bandwidth_policy(BandwidthPolicy((Limit(0, ALWAYS),)))
                    await until(lambda: engine.settings.bandwidth.global_limits, "the policy")
                else:
                    blocked_by = hresult.BG_E_BLOCKED_BY_COST_TRANSFER_POLICY
                    manager.set_network_cost(int(CostFlags.ROAMING))
                    await until(lambda: engine.settings.network_cost is not None, "the cost")
                assert job.snapshot().blocked_by is None  # it waits for its retry
                clock.advance(timedelta(seconds=6))  # the retry comes due
                await until(lambda: job.snapshot().blocked_by == blocked_by, "blocked")
                await stays(lambda: job.state is JobState.TRANSIENT_ERROR, "held back")
                assert len(server.hits_for("/f")) == 1, "the retry transferred"
                assert job.error_count == 1
                assert len(of_type(events_of(manager, job.id), ev.TransferStarted)) == 1
                if condition == "zero limit":
                    manager.set_bandwidth_policy(BandwidthPolicy())
                else:
                    manager.set_network_cost(None)
                await until(lambda: job.state is JobState.TRANSFERRED, "released")
            assert job.error_count == 1
            job.complete()
            assert sha256(tmp_path / "f.bin") == sha256(data)

    asyncio.run(main())


def test_a_zero_limit_holds_back_the_queued_jobs_the_engine_loads_as_others_leave(
    tmp_path: Path,
) -> None:
    """More queued jobs than the engine's queue window: those it loads later, once the
    first ones left QUEUED (blocked), are checked as they would start too."""
    data = os.urandom(16 * KiB)

    async def main() -> None:
        async with FaultServer({"/f": Served(data)}) as server:
            manager = TransferManager(home=tmp_path / "home")
            manager.set_bandwidth_policy(BandwidthPolicy((Limit(0, ALWAYS),)))
            engine = make_engine(manager)
            count = engine.queue_window() + 8
            queued = [
                new_job(manager, [(server.url("/f"), tmp_path / f"{i}.bin")], name=f"j{i}")
                for i in range(count)
            ]
            async with running(engine):
                await until(
                    lambda: all(j.state is JobState.TRANSIENT_ERROR for j in queued), "blocked"
                )
                await asyncio.sleep(0.3)
            assert server.hits_for("/f") == []
            for job in queued:
                snap = job.snapshot()
                assert snap.state is JobState.TRANSIENT_ERROR
                assert snap.blocked_by == hresult.BG_E_BLOCKED_BY_POLICY
                assert snap.error_count == 0

    asyncio.run(main())


def test_no_progress_timeout_does_not_run_while_a_policy_blocks_the_job(tmp_path: Path) -> None:
    """Condition-waiting has no timers (bits-core.md §20): a job whose NoProgressTimeout
    runs (a refused connection, then its retry came due under a zero limit and was held
    back) waits blocked past the timeout without going to ERROR with the policy's code; the
    clock restarts when the block ends, and when it runs out the job's error is its last
    transient error."""
    clock = ManualClock()

    async def main() -> None:
        manager = TransferManager(home=tmp_path / "home", clock=clock)
        job = new_job(
            manager,
            [("http://127.0.0.1:1/refused", tmp_path / "f.bin")],
            minimum_retry_delay=60,
            no_progress_timeout=600,
        )
        engine = make_engine(manager)
        async with running(engine):
            await until(lambda: job.state is JobState.TRANSIENT_ERROR, "the refused connection")
            failed = job.snapshot()
            assert failed.no_progress_since is not None and failed.error is not None
            manager.set_bandwidth_policy(BandwidthPolicy((Limit(0, ALWAYS),)))
            await until(lambda: engine.settings.bandwidth.global_limits, "the policy")
            clock.advance(timedelta(seconds=61))  # the retry comes due, and is held back
            blocked = hresult.BG_E_BLOCKED_BY_POLICY
            await until(lambda: job.snapshot().blocked_by == blocked, "blocked")
            status = why_waiting(job.snapshot(), clock.now())
            assert status is not None and status[1] is None  # no time: waits for the policy
            clock.advance(timedelta(seconds=700))  # past NoProgressTimeout, still blocked
            await stays(lambda: job.snapshot().blocked_by == blocked, "still blocked")
            assert job.state is JobState.TRANSIENT_ERROR
            assert not of_type(events_of(manager, job.id), ev.NoProgressTimedOut)
            manager.set_bandwidth_policy(BandwidthPolicy())
            await until(lambda: job.error_count == 2, "the retry after the block")
            unblocked = of_type(events_of(manager, job.id), ev.JobUnblocked)[-1].at
            assert job.snapshot().no_progress_since == unblocked  # restarted
            clock.advance(timedelta(seconds=601))
            await until(lambda: job.state is JobState.ERROR, "NoProgressTimeout")
        error = job.error
        assert error is not None
        assert error.hresult == failed.error.hresult  # the transient error, not the block
        assert len(of_type(events_of(manager, job.id), ev.NoProgressTimedOut)) == 1

    asyncio.run(main())


def test_a_per_job_rate_set_from_the_cli_limits_the_transfer(tmp_path: Path) -> None:
    data = os.urandom(600 * KiB)
    home = tmp_path / "home"

    async def main() -> float:
        async with FaultServer({"/f": Served(data)}) as server:
            manager = TransferManager(home=home)
            job = new_job(
                manager,
                [(server.url("/f"), tmp_path / "f.bin")],
                start=False,
                priority=JobPriority.FOREGROUND,
            )
            assert cli_main(["--home", str(home), "setmaxrate", job.id, "400k"], io.StringIO()) == 0
            out = io.StringIO()
            assert cli_main(["--home", str(home), "info", job.id, "--json"], out) == 0
            assert json.loads(out.getvalue())["max_rate"] == 400_000
            job.resume()
            engine = make_engine(manager)
            started = asyncio.get_running_loop().time()
            async with running(engine):
                await until(lambda: job.state is JobState.TRANSFERRED, "transferred", 20)
            return asyncio.get_running_loop().time() - started

    elapsed = asyncio.run(main())
    # 600 KiB at 400 kB/s takes ~1.3 s after the first burst (the bucket holds 0.25 s).
    assert elapsed > 1.0


def test_a_per_job_rate_removed_mid_transfer_frees_it_at_once(tmp_path: Path) -> None:
    """The engine syncs each job's rate every pass: lowering it slows the transfer, and
    removing it (None) lifts the limit for the rest of the file."""
    data = os.urandom(4 * MiB)

    async def main() -> float:
        async with FaultServer({"/f": Served(data)}) as server:
            manager = TransferManager(home=tmp_path / "home")
            job = new_job(
                manager, [(server.url("/f"), tmp_path / "f.bin")], priority=JobPriority.FOREGROUND
            )
            job.max_rate = 100_000  # 4 MiB would take about 40 s
            engine = make_engine(manager)
            async with running(engine):
                await until(lambda: engine.live_progress.get((job.id, 0), 0) > 0, "started")
                await asyncio.sleep(0.5)
                assert job.state is JobState.TRANSFERRING  # held back by the limit
                job.max_rate = None
                lifted = asyncio.get_running_loop().time()
                await until(lambda: job.state is JobState.TRANSFERRED, "transferred", 15)
                return asyncio.get_running_loop().time() - lifted

    assert asyncio.run(main()) < 5.0


def test_an_abandoned_job_is_cancelled_after_the_inactivity_timeout(tmp_path: Path) -> None:
    from datetime import timedelta

    from backhaul.adapters.clock import ManualClock
    from backhaul.adapters.engine import Engine
    from backhaul.core.event import JobScavenged

    clock = ManualClock()
    manager = TransferManager(home=tmp_path / "home", clock=clock)
    idle = manager.create_job("abandoned")
    idle.add_file("http://127.0.0.1:1/never", tmp_path / "never.bin")  # never resumed
    temp = tmp_path / f".never.bin.{localfile.job_tag(idle.id)}-0.bhtmp"
    temp.write_bytes(b"partial")  # as if it had run before
    busy = manager.create_job("touched")
    busy.add_file("http://127.0.0.1:1/other", tmp_path / "other.bin")
    clock.advance(timedelta(days=89))
    busy.description = "still wanted"  # a change resets the inactivity clock
    clock.advance(timedelta(days=2))
    engine = Engine(manager, poll_interval=0.02, yield_bandwidth=False)
    engine.network_probe = lambda: True
    asyncio.run(engine.run(until_idle=True))
    assert idle.snapshot().state is JobState.CANCELLED
    events = [a.event for a in manager.store.stream(idle.id)]
    assert isinstance(events[-1], JobScavenged)
    assert not temp.exists()
    assert busy.state is JobState.SUSPENDED


def test_a_running_engine_scavenges_loaded_and_unloaded_jobs_when_their_time_comes(
    tmp_path: Path,
) -> None:
    """While the engine runs: a TRANSFERRED job (loaded: its deadline is in the engine's heap)
    and a SUSPENDED job the engine never loaded (found in the read model) are both cancelled
    once nobody changed them for JobInactivityTimeout; a job changed meanwhile is not."""
    from datetime import timedelta

    from backhaul.adapters.clock import ManualClock

    clock = ManualClock()
    data = os.urandom(48 * KiB)

    async def main() -> TransferJob:
        async with FaultServer({"/f": Served(data)}) as server:
            manager = TransferManager(home=tmp_path / "home", clock=clock)
            done = new_job(manager, [(server.url("/f"), tmp_path / "done.bin")])
            asleep = new_job(manager, [(server.url("/f"), tmp_path / "asleep.bin")], start=False)
            kept = new_job(manager, [(server.url("/f"), tmp_path / "kept.bin")], start=False)
            engine = make_engine(manager)  # the manager's clock
            async with running(engine):
                await until(lambda: done.state is JobState.TRANSFERRED, "the transfer")
                assert asleep.id not in engine._jobs
                clock.advance(timedelta(days=89))
                kept.description = "still wanted"
                await asyncio.sleep(0.1)
                assert done.state is JobState.TRANSFERRED, "scavenged before its time"
                clock.advance(timedelta(days=2))
                await until(lambda: done.snapshot().state is JobState.CANCELLED, "done scavenged")
                await until(lambda: asleep.snapshot().state is JobState.CANCELLED, "scavenged")
                await asyncio.sleep(0.1)
            return kept

    kept = asyncio.run(main())
    assert kept.state is JobState.SUSPENDED
    assert not (tmp_path / "done.bin").exists()
    assert not list(tmp_path.glob(".*.bhtmp")), "a scavenged job left its temp file"


def test_the_engine_reports_whether_the_kernel_offers_low_priority_tcp() -> None:
    from backhaul.adapters.engine import congestion_report
    from backhaul.adapters.yielding import congestion_controls

    available = congestion_controls()
    report = congestion_report()
    assert available, "the kernel lists its congestion controls"
    if "lp" in available:
        assert "use TCP lp" in report
    else:
        assert "no TCP lp" in report
        assert " ".join(available) in report
