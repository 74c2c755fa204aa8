"""kill -9 of workers at random points: several ``backhaul serve`` processes on one PostgreSQL
store (``--lease-seconds 2``), many small-to-medium files from a local server.

Each run (a fresh database) keeps 3 workers (``--max-background 3``) busy with a stream of
download jobs of 1-3 files (128 KiB to 4 MiB, each response paced, so that transfers outlast
a checkpoint interval and kills land mid-file). The test acts as the application: it adds jobs
so that about ``ACTIVE`` are unfinished, completes every job that reaches TRANSFERRED, and
cancels a few jobs at random. Meanwhile it SIGKILLs a worker every 0.2-1.0 s (a random one; in
30% of the kills, and in every kill until one could be, a worker that holds a file checkpointed
part-way) and starts it again at once, until ``KILLS`` kills; a worker that dies by itself is
restarted as well (and reported). A few times per run a worker is frozen instead (SIGSTOP for 2.5-4 s, longer than its
2 s leases, then SIGCONT): its jobs move to other workers while it still runs, the case the
lease fence is for. Then no more kills and no new jobs: every job must reach its final state.

The run ends with the suite's checks (reliability_helpers.py): final states, SHA-256 of every
published file, no temp file, exact resumes at the log's checkpoint and bounded refetching,
and no event appended by a fenced worker (who appended each event is recorded by a trigger).

CI size: 2 runs x 26 kills (52 kills). ``BACKHAUL_RELIABILITY=full``: 4 runs x 60 kills, more
and bigger files. ``BACKHAUL_RELIABILITY_SEED`` replays a run's random choices.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from reliability_helpers import (
    CLIENT_APP,
    SECRET_KEY,
    App,
    FileServer,
    Freezer,
    Life,
    MiB,
    Workers,
    blobs,
    check_fencing,
    check_files,
    check_log_replays,
    check_no_temps,
    check_requests,
    check_states,
    expect_none,
    install_appender_trigger,
    is_schema_race,
    read_appenders,
    read_streams,
    seed_for,
    size,
    summary,
    tail,
)

from backhaul.core import event as ev
from backhaul.core.vocabulary import JobState

pytestmark = [pytest.mark.peer, pytest.mark.slow]

RUNS = size(2, 4)
KILLS = size(26, 60)
WORKERS = 3
MAX_BACKGROUND = 3
LEASE_SECONDS = 2.0
ACTIVE = size(12, 24)  # unfinished jobs the application keeps in the store
BLOB_SIZES = size((128 * 1024, 4 * MiB), (32 * 1024, 12 * MiB))
RATE = size(1 * MiB, 2 * MiB)  # bytes/s per response: larger files outlast a checkpoint
KILL_GAP = (0.2, 1.0)  # seconds between kills
# Share of the kills aimed at a worker that holds a file checkpointed part-way (every kill until
# AIMED_FIRST could be aimed), so that every run resumes mid-file: random kills alone missed that
# in 3 of 7 CI-size runs, and most files are done before their first checkpoint. One aimed kill
# was not always enough either: the file may finish between the look at the read model and the
# kill (seed 2712027292 of the CI-size run resumed nothing mid-file in 3 of 4 replays).
TARGETED = 0.3
AIMED_FIRST = 3
# Besides the log-uniform pool, LARGE blobs of the top half of BLOB_SIZES: files that outlast
# several checkpoints at RATE, so that there is something part-way to aim at in every run.
LARGE = 4
# Besides the kills, some workers are frozen (SIGSTOP) for longer than their leases, then go on
# (SIGCONT): alive but fenced, they must append nothing more for the jobs taken from them.
FREEZES = size(3, 10)
FREEZE_SECONDS = (2.5, 4.0)
CANCEL_CHANCE = 0.004  # per look (every 0.2 s) at an unfinished job: cancel it now
DRAIN_TIMEOUT = size(60.0, 180.0)
CHECKPOINT_INTERVAL = 1.0  # serve's engine (adapters/engine.py default)
# Bytes one interruption may make the server send again: a checkpoint interval at RATE, the
# fdatasync and commit of a checkpoint in flight on a loaded 2-core machine, socket buffers.
PER_INTERRUPTION = int(RATE * (CHECKPOINT_INTERVAL + 1.0)) + 1 * MiB


def one_run(run: int, url: str, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    seed = seed_for(f"kills-{run}")
    rng = random.Random(seed)
    home, dest = tmp / "home", tmp / "dest"
    dest.mkdir(parents=True)
    monkeypatch.setenv("PGAPPNAME", CLIENT_APP)
    monkeypatch.setenv("BACKHAUL_SECRET_KEY", SECRET_KEY)
    t0 = time.monotonic()
    with FileServer() as server:
        low, high = BLOB_SIZES
        pool = blobs(rng, 16 - LARGE, low, high) + blobs(rng, LARGE, high // 2, high)
        app = App(url, home, server, dest, rng, pool=pool, rate=RATE)
        install_appender_trigger(url)
        workers = Workers(
            url, home, tmp / "logs", WORKERS, lease_seconds=LEASE_SECONDS,
            max_background=MAX_BACKGROUND,
        )  # fmt: skip
        kills = aimed_kills = 0
        crashes: list[Life] = []
        freezer = Freezer()
        broken: list[str] = []  # the application's own failures
        try:
            while app.created < ACTIVE:
                app.create()
            workers.start()
            next_kill = time.monotonic() + rng.uniform(*KILL_GAP)
            next_look = 0.0
            freeze_at = sorted(rng.sample(range(2, KILLS - 2), FREEZES))  # after these kills
            while (kills < KILLS or freezer.busy()) and not broken:
                if time.monotonic() >= next_look:
                    next_look = time.monotonic() + 0.2
                    try:
                        app.tend(CANCEL_CHANCE)
                        while len(app.unfinished) < ACTIVE:
                            app.create()
                    except Exception as exc:  # e.g. the read model cannot fold the log
                        broken.append(repr(exc))
                for life in workers.reap():
                    crashes.append(life)
                    workers.spawn(life.slot)
                if kills < KILLS and time.monotonic() >= next_kill:
                    slot = rng.randrange(WORKERS)
                    if aimed_kills < AIMED_FIRST or rng.random() < TARGETED:
                        pids = app.mid_file_pids()
                        aimed = [s for s, life in workers.current.items() if life.pid in pids]
                        slot = rng.choice(aimed) if aimed else slot
                        aimed_kills += bool(aimed)
                    workers.kill(slot)
                    workers.spawn(slot)
                    kills += 1
                    next_kill = time.monotonic() + rng.uniform(*KILL_GAP)
                    if freeze_at and kills >= freeze_at[0]:
                        freeze_at.pop(0)
                        busy = freezer.frozen_slots(workers) | {slot}
                        idle = [s for s in range(WORKERS) if s not in busy]
                        if idle:
                            freezer.freeze(workers, rng.choice(idle), rng.uniform(*FREEZE_SECONDS))
                time.sleep(0.03)
            kill_phase = time.monotonic() - t0
            deadline = time.monotonic() + DRAIN_TIMEOUT
            while app.unfinished and time.monotonic() < deadline and not broken:
                try:
                    app.tend(0.0)
                except Exception as exc:
                    broken.append(repr(exc))
                for life in workers.reap():
                    crashes.append(life)
                    workers.spawn(life.slot)
                time.sleep(0.2)
        finally:
            freezer.finish()
            workers.stop()
            server.wait_quiet()
        store = app.manager.store
        stuck = [
            f"{j[:8]} still {JobState(r.state).name if r else '?'}"
            for j, r in ((j, store.views.get(j)) for j in sorted(app.unfinished))
        ]
        streams = read_streams(store, app.expected, read_appenders(url))
        report = check_requests(
            server,
            app.files,
            streams,
            PER_INTERRUPTION,
            completed=app.completed,
            stalls=freezer.stalls,
            thaws=freezer.thaws,
            rate=RATE,
        )
        # Start-up crashes of the schema race have a test of their own
        # (test_reliability_startup.py): here they are counted, and the worker restarted.
        ddl_races = [life for life in crashes if is_schema_race(life)]
        events = Counter(type(r.event).__name__ for recs in streams.values() for r in recs)
        leases = [
            [r for r in recs if isinstance(r.event, ev.LeaseTaken)] for recs in streams.values()
        ]
        result = {
            "seed": seed,
            "kills": kills,
            "aimed_kills": aimed_kills,
            "freezes": sum(life.frozen for life in workers.lives),
            "worker_lives": len(workers.lives),
            "jobs": app.created,
            "completed": len(app.completed),
            "cancelled": sum(1 for s in app.expected.values() if s is JobState.CANCELLED),
            "files": len(app.files),
            "bytes": sum(f.source.final_size for f in app.files if f.job_id in app.completed),
            "requests": report.requests,
            "resumed_mid_file": report.resumed_mid_file,
            "takeovers": sum(a.app != b.app for taken in leases for a, b in pairwise(taken)),
            "waste_bytes": report.waste_bytes,
            "worst_interruption": report.worst_interruption,
            "thawed_fetches": report.thawed_fetches,
            "bound": PER_INTERRUPTION,
            "transient_errors": [
                f"{r.event.error.hresult:#x} {r.event.error.description}"
                for recs in streams.values()
                for r in recs
                if isinstance(r.event, ev.ErrorOccurred)
            ][:5],
            "events": sum(events.values()),
            "checkpoints": events["BytesCheckpointed"],
            "startup_schema_races": len(ddl_races),
            "kill_phase_s": round(kill_phase, 1),
            "seconds": round(time.monotonic() - t0, 1),
        }
        summary(f"kills[{run}]", result, tmp / "summary.json")
        context = f"seed {seed}, run {run}, logs in {tmp / 'logs'}"
        expect_none(check_log_replays(streams), "streams that do not replay", context)
        expect_none(broken, "the application failed", context)
        expect_none(stuck, f"jobs unfinished {DRAIN_TIMEOUT} s after the last kill", context)
        expect_none(check_states(store, app.expected, streams), "wrong final states", context)
        expect_none(check_files(app.files, app.completed), "wrong files", context)
        expect_none(check_no_temps([dest]), "temp files left", context)
        expect_none(report.violations, "refetched bytes", context)
        expect_none(check_fencing(streams), "events appended by a fenced worker", context)
        expect_none(app.partial, "partial completes", context)
        expect_none(app.errors, "jobs in ERROR", context)
        expect_none(
            [
                f"{c.label} rc={c.returncode}: {tail(c.log, 8)}"
                for c in crashes
                if c not in ddl_races
            ],
            "workers that died by themselves",
            context,
        )
        app.close()
        return result


@pytest.mark.parametrize("run", range(RUNS))
def test_sigkill_workers_at_random_points_loses_nothing(
    run: int, postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = one_run(run, postgres_url, tmp_path, monkeypatch)
    assert result["kills"] == KILLS
    assert result["resumed_mid_file"] >= 1, "no request resumed mid-file: resumes went untested"
    assert result["takeovers"] >= 1, "no job moved between workers: take-over went untested"
