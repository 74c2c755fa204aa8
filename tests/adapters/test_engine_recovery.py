"""An engine killed while it transfers (SIGKILL, a power cut), and the next engine's start:
the job left CONNECTING/TRANSFERRING in the log gets its slice ended, and only the time it
really transferred counts for MaximumDownloadTime (bits-core.md §5), however long the engine
was down. A real engine in a child process, killed with SIGKILL mid-transfer."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from test_engine import (  # the autouse fixture keeps BACKHAUL_STORE out
    FaultServer,
    KiB,
    Served,
    _no_store_from_the_environment,  # noqa: F401
    events_of,
    make_engine,
    of_type,
)

from backhaul.adapters.clock import ManualClock
from backhaul.adapters.manager import TransferManager
from backhaul.core import event as ev
from backhaul.core import job as jobs
from backhaul.core.vocabulary import JobState

TESTS = Path(__file__).resolve().parent

# Runs a job in an engine and kills its own process with SIGKILL once the job has
# transferred for a while: the log is left with the job TRANSFERRING.
KILLED_ENGINE = """
import asyncio, os, signal, sys
sys.path[:0] = [sys.argv[3], os.path.dirname(sys.argv[3])]
from pathlib import Path
from test_engine import make_engine, new_job, until
from backhaul.adapters.manager import TransferManager
from backhaul.core.vocabulary import JobState

async def main():
    home, url = Path(sys.argv[1]), sys.argv[2]
    manager = TransferManager(home=home)
    job = new_job(manager, [(url, home.parent / "f")], start=False, maximum_download_time=600)
    job.resume()
    (home.parent / "job_id").write_text(job.id)
    task = asyncio.create_task(make_engine(manager).run())
    def transferring():
        snap = job.snapshot()
        return snap.state is JobState.TRANSFERRING and snap.files[0].bytes_transferred > 0
    await until(transferring, "TRANSFERRING with bytes checkpointed", 20)
    await asyncio.sleep(0.5)
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""


def test_the_downtime_after_an_engine_was_killed_mid_transfer_is_not_transfer_time(
    tmp_path: Path,
) -> None:
    data = os.urandom(4 * 1024 * KiB)  # about 5 s at this pace: still running when killed
    server = FaultServer({"/f": Served(data, step=16 * KiB, delay=0.02)})
    script = tmp_path / "killed_engine.py"
    script.write_text(KILLED_ENGINE)
    home = tmp_path / "home"
    with server.threaded():
        child = subprocess.run(
            [sys.executable, str(script), str(home), server.url("/f"), str(TESTS)],
            timeout=60,
        )
        assert child.returncode == -signal.SIGKILL
        job_id = (tmp_path / "job_id").read_text()
        # The next engine starts an hour later (the machine was off): MaximumDownloadTime
        # is 10 minutes, of which the job used about one second.
        clock = ManualClock(current=datetime.now(UTC) + timedelta(hours=1))
        manager = TransferManager(home=home, clock=clock)
        left = manager.get_job(job_id).snapshot()
        assert left.state is JobState.TRANSFERRING and left.last_active_at is not None
        asyncio.run(asyncio.wait_for(make_engine(manager).run(until_idle=True), 60))

    snap = manager.get_job(job_id).snapshot()
    assert snap.state is JobState.TRANSFERRED, snap.error
    events = events_of(manager, job_id)
    ended = of_type(events, ev.SliceEnded)
    assert len(ended) == 1
    # Counted up to the dead engine's last event, which the log holds: the same on replay.
    assert ended[0].active_until == left.last_active_at
    assert ended[0].at >= left.last_active_at + timedelta(hours=1) - timedelta(minutes=1)
    assert snap.active_seconds < 60
    replayed = jobs.fold(events)
    assert replayed is not None and replayed.active_seconds == snap.active_seconds
