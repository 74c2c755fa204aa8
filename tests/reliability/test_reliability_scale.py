"""Many jobs: finished jobs (ACKNOWLEDGED, CANCELLED) leave the live set, so that engine start-up,
listing and scheduling cost what the LIVE jobs cost, however long the history.

A SQLite store gets ``JOBS`` jobs: 10% stay live (SUSPENDED), 10% are transferred (file://
sources, one engine) and completed, 80% are cancelled. Then, structurally (no timing
thresholds, which a loaded CI machine would make flaky):

* the read model marks exactly the live jobs live; listing returns only those;
* a new engine starts from the read model's snapshots: it loads only the live jobs, reads no
  job's stream and replays no event (the view is at the head of the log);
* a new manager (a new process's view) loads a live job from its snapshot plus the events after
  it, not from its whole stream;
* finished jobs cannot be got (BG_E_NOT_FOUND) unless asked for with ``include_final``.

The times are reported (benchmarks/bench_scale.py measures them properly).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from reliability_helpers import make_engine, size, summary

from backhaul.adapters.manager import TransferManager
from backhaul.adapters.store import open_store
from backhaul.core import hresult
from backhaul.core.error import BitsError
from backhaul.core.event import POLICY_STREAM
from backhaul.core.limit import UNLIMITED
from backhaul.core.vocabulary import JobPriority, JobState

JOBS = size(3000, 30_000)
LIVE_SHARE, DONE_SHARE = 0.1, 0.1  # the rest is cancelled


class Counting:
    """Wrap a store's reads: how many streams and log rows an operation reads."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.streams = 0
        self.whole_streams = 0  # read from version 0: a replay, not a snapshot + tail
        self.rows = 0
        self.view_rows = 0
        self._stream, self._read, self._select = store.stream, store.read, store.views.select

    def __enter__(self) -> Counting:
        def stream(job_id: str, *a: Any, **k: Any) -> Any:
            if job_id != POLICY_STREAM:  # engine-wide settings, not a job
                self.streams += 1
                after = a[0] if a else k.get("after_version", 0)
                self.whole_streams += not after
            return self._stream(job_id, *a, **k)

        def read(*a: Any, **k: Any) -> Any:
            page = self._read(*a, **k)
            self.rows += len(page)
            return page

        def select(*a: Any, **k: Any) -> Any:
            rows = self._select(*a, **k)
            self.view_rows += len(rows)
            return rows

        self.store.stream, self.store.read, self.store.views.select = stream, read, select
        return self

    def __exit__(self, *exc: object) -> None:
        self.store.stream, self.store.read, self.store.views.select = (
            self._stream,
            self._read,
            self._select,
        )


def test_finished_jobs_leave_the_live_set(tmp_path: Path) -> None:
    home = tmp_path / "home"
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    dest.mkdir()
    (src / "small.bin").write_bytes(b"x" * 1000)
    manager = TransferManager(home=home, limits=UNLIMITED)
    live, done, cancelled = [], [], []
    t0 = time.monotonic()
    for start in range(0, JOBS, 500):
        with manager.batch():
            for i in range(start, min(start + 500, JOBS)):
                job = manager.create_job(f"scale-{i}")
                kind = i % 10
                if kind == 0:  # live: SUSPENDED
                    job.add_file(f"http://127.0.0.1:1/{i}.bin", dest / f"{i}.bin")
                    live.append(job.id)
                elif kind == 1:  # transferred below, then completed
                    job.add_file((src / "small.bin").as_uri(), dest / f"{i}.bin")
                    job.priority = JobPriority.FOREGROUND
                    job.resume()
                    done.append(job.id)
                else:
                    job.add_file(f"http://127.0.0.1:1/{i}.bin", dest / f"{i}.bin")
                    job.cancel()
                    cancelled.append(job.id)
    created = time.monotonic() - t0
    t0 = time.monotonic()
    asyncio.run(make_engine(manager, transports=None).run(until_idle=True))
    transferred = time.monotonic() - t0
    with manager.batch():
        for job_id in done:
            manager.get_job(job_id).complete()
    manager.refresh_views()
    manager.close()

    store = open_store(home=home)
    try:
        views = store.views
        assert views.count_live(None) == len(live)
        rows = views.select(None, include_final=True)
        assert len(rows) == JOBS
        assert {r.job_id for r in rows if r.live} == set(live)
        states = {r.job_id: JobState(r.state) for r in rows}
        assert {states[j] for j in done} == {JobState.ACKNOWLEDGED}
        assert {states[j] for j in cancelled} == {JobState.CANCELLED}

        fresh = TransferManager(store, home=home, limits=UNLIMITED)
        with Counting(store) as listing:
            t0 = time.monotonic()
            listed = [j.id for j in fresh.jobs()]
            list_s = time.monotonic() - t0
        assert sorted(listed) == sorted(live)
        assert listing.view_rows == len(live), "listing read finished jobs' rows"
        assert listing.streams == 0 and listing.rows == 0

        engine = make_engine(TransferManager(store, home=home, limits=UNLIMITED))
        with Counting(store) as start:
            t0 = time.monotonic()
            asyncio.run(engine.run(until_idle=True))
            start_s = time.monotonic() - t0
        # The live jobs are all SUSPENDED: nothing can run, so nothing is loaded (a SUSPENDED
        # job is loaded when an event of it is read, below).
        assert set(engine._jobs) == set(), "the engine loaded SUSPENDED or finished jobs"
        assert start.view_rows == 0, "start-up read snapshots of jobs that cannot run"
        assert start.streams == 0, f"start-up read {start.streams} job streams"
        assert start.rows == 0, f"start-up replayed {start.rows} events"

        # A live job changed by someone else: a new manager loads its snapshot plus the new
        # events only (stream reads from the snapshot's version on, never from 0).
        other = TransferManager(store, home=home, limits=UNLIMITED)
        other.get_job(live[0]).description = "changed"
        reader = TransferManager(store, home=home, limits=UNLIMITED)
        with Counting(store) as load:
            assert reader.get_job(live[0]).description == "changed"
        assert load.streams >= 1 and load.whole_streams == 0, "the job was replayed from 0"

        for job_id in (done[0], cancelled[0]):
            with pytest.raises(BitsError) as refused:
                fresh.get_job(job_id)
            assert refused.value.hresult == hresult.BG_E_NOT_FOUND
            final = fresh.get_job(job_id, include_final=True).state
            assert final in (JobState.ACKNOWLEDGED, JobState.CANCELLED)
    finally:
        store.close()
    summary(
        "scale",
        {
            "jobs": JOBS,
            "live": len(live),
            "acknowledged": len(done),
            "cancelled": len(cancelled),
            "create_s": round(created, 2),
            "transfer_s": round(transferred, 2),
            "engine_start_s": round(start_s, 3),
            "list_s": round(list_s, 3),
        },
    )
