"""Benchmark start-up, listing and scheduling with many jobs in the store.

Run from the project root::

    .venv/bin/python benchmarks/bench_scale.py                     # 1k, 10k, 100k jobs
    .venv/bin/python benchmarks/bench_scale.py --sizes 1000 10000 --json /tmp/scale.json

For every size N and every variant, a child process (so that memory and caches start cold
and the peak RSS belongs to that case alone) builds a fresh SQLite store in a temp
directory, creates the jobs quickly (``TransferManager.batch()`` of 1,000 jobs,
``Limits(None, None, None, None)``), brings the read model up to date, and then measures,
each on a NEW ``TransferManager`` over a newly opened store (a cold handle cache, as in a
new process):

* ``startup``: ``Engine(manager).run()`` (what ``backhaul serve`` runs), stopped at its FIRST
  call of the scheduler. Reported: the time to that call (start-up proper: read the jobs
  whose time is near, follow the log, policies, timers), the time that first scheduling pass
  took, and how many jobs the engine then held. The same for ``run(until_idle=True)``
  (``serve --until-idle``), which holds every job with a time (a retry pending is work left).
* ``tick``: one loop of a started engine (follow the log, policies, timers, schedule, command
  lines, the idle check), median of 5 after a first one: the steady-state cost of scheduling
  with that many live jobs. The engine runs this loop every ``poll_interval`` (0.2 s) or sooner.
* ``list``: ``list(TransferManager(...).jobs())`` (catch-up + the read-model query + handles).

Variants:

* ``live``: N jobs, all SUSPENDED (one file each, never run). The engine does not load
  SUSPENDED jobs at start (an event of one loads it), so this is the cheapest live set.
* ``waiting``: N jobs, all in TRANSIENT_ERROR with their retry 10 minutes away (resumed,
  started and failed with a transient error). ``run()`` loads those whose retry is within two
  scans (2 minutes), i.e. none; ``run(until_idle=True)`` loads and times every one.
* ``queued``: N jobs, all QUEUED at NORMAL priority (resumed). The engine (run with no
  background slot, so that nothing starts) holds only its queue window of them (32).
* ``90% finished``: N jobs, 90% of them CANCELLED (final). Only N/10 are live: if finished
  jobs leave the live set, this costs what ``live`` at N/10 costs, not what ``live`` at N costs.

Nothing is transferred: remote names point at http://127.0.0.1:1/ and local names sit in an
existing empty directory. Every time is the median of ``--runs`` runs (default 3).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from backhaul.adapters.engine import Engine
from backhaul.adapters.manager import TransferManager
from backhaul.adapters.store import open_store
from backhaul.core import command as cmd
from backhaul.core import hresult
from backhaul.core.limit import UNLIMITED
from backhaul.core.value import JobError
from backhaul.core.vocabulary import CostFlags, ErrorContext, JobState

OWNER = "bench"
BATCH = 1000
REFUSED = JobError(ErrorContext.REMOTE_FILE, hresult.http_status_hresult(503), "benchmark: 503")
VARIANTS = ("live", "waiting", "queued", "finished90")
LABELS = {
    "live": "all live (SUSPENDED)",
    "waiting": "all live (TRANSIENT_ERROR, retry due in 10 min)",
    "queued": "all live (QUEUED, NORMAL priority)",
    "finished90": "90% finished (CANCELLED)",
}


def log(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- one case (in a child process) -------------------------------------------------------


def build(
    home: Path, jobs: int, finished_share: float, waiting: bool = False, queued: bool = False
) -> dict[str, Any]:
    downloads = home / "downloads"
    downloads.mkdir(parents=True)
    manager = TransferManager(home=home, owner=OWNER, limits=UNLIMITED)
    keep_every = round(1 / (1 - finished_share)) if finished_share else 0  # 0.9: 1 in 10 live
    t0 = time.perf_counter()
    for start in range(0, jobs, BATCH):
        with manager.batch():
            for i in range(start, min(start + BATCH, jobs)):
                job = manager.create_job(f"job {i}")
                job.add_file(f"http://127.0.0.1:1/scale/{i}.bin", downloads / f"{i}.bin")
                if keep_every and i % keep_every != 0:  # 0.9: 9 of every 10 jobs
                    job.cancel()
                elif queued:
                    job.resume()
                elif waiting:
                    job.resume()
                    manager.execute(job.id, cmd.StartTransfer())
                    manager.execute(job.id, cmd.Fail(REFUSED, transient=True))
    created = time.perf_counter() - t0
    t0 = time.perf_counter()
    manager.refresh_views()
    caught_up = time.perf_counter() - t0
    events = manager.store.head()
    manager.close()
    return {"create_s": created, "catch_up_s": caught_up, "events": events}


def new_engine(manager: TransferManager) -> Engine:
    # No background slot: nothing may run here (the "queued" jobs would otherwise start).
    engine = Engine(manager, transports={}, uploaders={}, yield_bandwidth=False, max_background=0)
    engine.network_probe = lambda: True
    engine.cost_probe = lambda: int(CostFlags.UNRESTRICTED)
    return engine


async def first_schedule(manager: TransferManager, *, until_idle: bool) -> dict[str, float]:
    """Start an engine and stop it at its first call of the scheduler: the time to it, the
    time it took, and how many jobs the engine then held."""
    engine = new_engine(manager)
    marks: dict[str, float] = {}
    schedule = engine._schedule

    async def timed_schedule() -> None:
        begin = time.perf_counter()
        marks.setdefault("first_schedule", begin)
        await schedule()
        marks.setdefault("first_schedule_done", time.perf_counter())
        engine.stop()

    engine._schedule = timed_schedule  # type: ignore[method-assign]
    t0 = time.perf_counter()
    await engine.run(until_idle=until_idle)
    return {
        "to_first": marks["first_schedule"] - t0,
        "first": marks["first_schedule_done"] - marks["first_schedule"],
        "total": time.perf_counter() - t0,
        "loaded": len(engine._jobs),
    }


async def startup_once(home: Path) -> dict[str, float]:
    store = open_store(home=home)
    manager = TransferManager(store, home=home, owner=OWNER, limits=UNLIMITED)
    serve = await first_schedule(manager, until_idle=False)
    # More loops on a started engine: the steady-state scheduling cost (median of 5).
    engine2 = new_engine(manager)
    engine2._wake, engine2._writer_wake = asyncio.Event(), asyncio.Event()
    engine2._flush_lock = asyncio.Lock()
    await engine2._start()
    ticks = []
    for _ in range(6):
        t1 = time.perf_counter()
        await engine2._follow()
        await engine2._apply_policies()
        await engine2._fire_timers()
        await engine2._schedule()
        engine2._run_command_lines()
        engine2._idle()
        ticks.append(time.perf_counter() - t1)
    tick = statistics.median(ticks[1:])
    assert not engine2._tasks, "a job started: the benchmark expects no live job to run"
    store.close()
    return {
        "startup_to_first_schedule_s": serve["to_first"],
        "first_schedule_s": serve["first"],
        "engine_loaded_jobs": serve["loaded"],
        "tick_s": tick,
    }


async def until_idle_once(home: Path) -> dict[str, float]:
    store = open_store(home=home)
    manager = TransferManager(store, home=home, owner=OWNER, limits=UNLIMITED)
    batch = await first_schedule(manager, until_idle=True)
    store.close()
    return {
        "until_idle_to_first_schedule_s": batch["to_first"],
        "until_idle_loaded": batch["loaded"],
    }


def list_once(home: Path) -> tuple[float, int]:
    store = open_store(home=home)
    t0 = time.perf_counter()
    manager = TransferManager(store, home=home, owner=OWNER, limits=UNLIMITED)
    handles = list(manager.jobs())
    elapsed = time.perf_counter() - t0
    store.close()
    return elapsed, len(handles)


def run_case(jobs: int, variant: str, runs: int, parent: Path | None) -> dict[str, Any]:
    share = 0.9 if variant == "finished90" else 0.0
    with tempfile.TemporaryDirectory(prefix="bh-scale.", dir=parent) as tmp:
        home = Path(tmp)
        built = build(home, jobs, share, waiting=variant == "waiting", queued=variant == "queued")
        log(f"{variant} {jobs}: created in {built['create_s']:.1f} s")
        rss_before = peak_rss_mib()
        startups = [asyncio.run(startup_once(home)) for _ in range(runs)]
        rss_serve = peak_rss_mib()  # before anything loads every waiting job
        lists = [list_once(home) for _ in range(runs)]
        batches = [asyncio.run(until_idle_once(home)) for _ in range(runs)]
        db = home / "backhaul.db"
        size = sum(p.stat().st_size for p in (db, db.with_name(db.name + "-wal")) if p.exists())
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
            states = dict(
                c.execute("SELECT state, COUNT(*) FROM backhaul_job_views GROUP BY state")
            )
    result: dict[str, Any] = {
        "jobs": jobs,
        "variant": variant,
        "live": states.get(int(JobState.SUSPENDED), 0)
        + states.get(int(JobState.TRANSIENT_ERROR), 0)
        + states.get(int(JobState.QUEUED), 0),
        "finished": states.get(int(JobState.CANCELLED), 0),
        **built,
        "db_bytes": size,
        "listed": lists[0][1],
        "list_s": statistics.median(t for t, _ in lists),
        "list_runs_s": [t for t, _ in lists],
        "peak_rss_mib_before_engine": rss_before,
        "peak_rss_mib": rss_serve,
        "peak_rss_mib_until_idle": peak_rss_mib(),
    }
    startups = [s | b for s, b in zip(startups, batches, strict=True)]
    for key in startups[0]:
        values = [s[key] for s in startups]
        result[key] = statistics.median(values)
        if key.endswith("_s"):
            result[key.removesuffix("_s") + "_runs_s"] = values
    return result


# -- the parent --------------------------------------------------------------------------


def fmt_s(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def table(results: list[dict[str, Any]]) -> str:
    head = (
        "| jobs | variant | live | run(): start-up to first schedule | jobs loaded | "
        "first schedule | one tick | peak RSS | run(until_idle): start-up | jobs loaded | "
        "peak RSS | list (`jobs()`) | create (batch) |\n"
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = [
        f"| {r['jobs']:,} | {LABELS[r['variant']]} | {r['live']:,} | "
        f"{fmt_s(r['startup_to_first_schedule_s'])} | {r['engine_loaded_jobs']:,.0f} | "
        f"{fmt_s(r['first_schedule_s'])} | {fmt_s(r['tick_s'])} | {r['peak_rss_mib']:.0f} MiB | "
        f"{fmt_s(r['until_idle_to_first_schedule_s'])} | {r['until_idle_loaded']:,.0f} | "
        f"{r['peak_rss_mib_until_idle']:.0f} MiB | {fmt_s(r['list_s'])} | {fmt_s(r['create_s'])} |"
        for r in results
    ]
    return head + "\n".join(rows) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--dir", type=Path, help="parent of the temp dirs ($TMPDIR)")
    parser.add_argument("--one", nargs=2, metavar=("JOBS", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        result = run_case(int(args.one[0]), args.one[1], args.runs, args.dir)
        print(json.dumps(result))
        return 0
    results = []
    for jobs in args.sizes:
        for variant in args.variants:
            log(f"case: {jobs} jobs, {variant}")
            command = [sys.executable, __file__, "--one", str(jobs), variant]
            command += ["--runs", str(args.runs)]
            if args.dir:
                command += ["--dir", str(args.dir)]
            out = subprocess.run(command, check=True, capture_output=True, text=True)
            sys.stderr.write(out.stderr)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    info = {
        "date": dt.date.today().isoformat(),
        "nproc": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "runs": args.runs,
    }
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
