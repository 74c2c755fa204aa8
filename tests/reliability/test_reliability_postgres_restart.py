"""PostgreSQL restarted mid-transfer (``PostgresServer.restart(immediate=True)``: a crash, then
crash recovery) while ``backhaul serve`` workers run.

The workers either survive the outage or die of it; a worker that died is restarted (as a
service manager would) and counted. Every job must still complete, and the run ends with the
suite's checks (final states, SHA-256, no temp file, exact resumes, bounded refetching, the
lease fence).

Each restart is a crash (SIGQUIT); PostgreSQL stays down from a moment (a plain restart,
within the store's own connection retries) to 8 s (longer than those retries and than the
workers' 2 s leases, so that the other worker ends the slices of the stalled worker's jobs
while the stalled worker still holds decisions it could not append).

Besides the suite's checks, every job's stream must replay through the transition table and
every read-model row must equal the fold of its stream: a worker that appends an event decided
against a stale copy of a job (one the log never had) breaks both, and then every reader of
the log (listing, every engine's start-up) fails. The outage runs on the session's PostgreSQL cluster (the test's own database lives there):
the cluster is back up before the test returns.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path

import pytest
from peers.postgres import PostgresServer
from reliability_helpers import (
    CLIENT_APP,
    SECRET_KEY,
    App,
    FileServer,
    MiB,
    Workers,
    blobs,
    check_fencing,
    check_files,
    check_log_replays,
    check_no_temps,
    check_read_model,
    check_requests,
    check_states,
    expect_none,
    install_appender_trigger,
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

JOBS = size(30, 60)
# Seconds PostgreSQL stays down at each restart: 0 is a plain restart (about 0.2 s, within the
# store's own retries), the longer ones outlast those retries (10 x 0.2 s) and the 2 s leases.
DOWNTIMES = size((0.0, 8.0), (0.0, 4.0, 1.0, 8.0, 0.0))
RESTARTS = len(DOWNTIMES)
WORKERS = 2
RATE = 1 * MiB
BLOB_SIZES = size((256 * 1024, 4 * MiB), (256 * 1024, 8 * MiB))
GAP = size((1.5, 3.0), (1.5, 4.0))  # seconds of transfer between two restarts
DRAIN_TIMEOUT = size(60.0, 180.0)
# While PostgreSQL is down a worker goes on downloading but cannot record checkpoints; once its
# lease lapses another worker takes the job from the last recorded checkpoint: one interruption
# may refetch what arrived during the whole outage, besides a checkpoint interval and slack.
PER_INTERRUPTION = int(RATE * (max(DOWNTIMES) + 3.0)) + 1 * MiB


def _store_errors() -> tuple[type[BaseException], ...]:
    from eventsourcing.persistence import PersistenceError

    return (PersistenceError, OSError)


def test_postgres_restarted_mid_transfer_every_job_completes(
    postgres_server: PostgresServer,
    postgres_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seed = seed_for("postgres-restart")
    rng = random.Random(seed)
    monkeypatch.setenv("PGAPPNAME", CLIENT_APP)
    monkeypatch.setenv("BACKHAUL_SECRET_KEY", SECRET_KEY)
    home, dest = tmp_path / "home", tmp_path / "dest"
    dest.mkdir()
    t0 = time.monotonic()
    outages: list[float] = []
    died: list[str] = []
    broken: list[str] = []
    with FileServer() as server:
        app = App(
            postgres_url, home, server, dest, rng, pool=blobs(rng, 12, *BLOB_SIZES), rate=RATE
        )
        install_appender_trigger(postgres_url)
        for _ in range(JOBS):
            app.create()
        workers = Workers(postgres_url, home, tmp_path / "logs", WORKERS, max_background=4)
        try:
            workers.start()
            for downtime in DOWNTIMES:
                _wait_for_transfers(server, 10.0)
                time.sleep(rng.uniform(*GAP))
                began = time.monotonic()
                postgres_server.shutdown(immediate=True)
                try:
                    time.sleep(downtime)
                finally:
                    postgres_server.start()
                outages.append(round(time.monotonic() - began, 2))
                for life in workers.reap():
                    died.append(f"{life.label} rc={life.returncode}: {tail(life.log, 1)}")
                    workers.spawn(life.slot)
            deadline = time.monotonic() + DRAIN_TIMEOUT
            while app.unfinished and time.monotonic() < deadline:
                try:
                    app.tend()
                except _store_errors():
                    pass  # PostgreSQL is still starting
                except Exception as exc:  # e.g. the read model cannot fold the log
                    broken.append(repr(exc))
                    break
                for life in workers.reap():
                    died.append(f"{life.label} rc={life.returncode}: {tail(life.log, 1)}")
                    workers.spawn(life.slot)
                time.sleep(0.2)
        finally:
            workers.stop()
            server.wait_quiet()
        store = app.manager.store
        context = f"seed {seed}, logs in {tmp_path / 'logs'}"
        streams = read_streams(store, app.expected, read_appenders(postgres_url))
        expect_none(check_log_replays(streams), "streams that do not replay", context)
        expect_none(broken + check_read_model(store, streams), "the application failed", context)
        expect_none(
            [f"{j[:8]} still {JobState(store.views.get(j).state).name}" for j in app.unfinished],
            f"jobs unfinished {DRAIN_TIMEOUT} s after the last restart",
            context + f"; workers that died: {died}",
        )
        expect_none(check_states(store, app.expected, streams), "wrong final states", context)
        expect_none(check_files(app.files, app.completed), "wrong files", context)
        expect_none(check_no_temps([dest]), "temp files left", context)
        report = check_requests(
            server, app.files, streams, PER_INTERRUPTION, completed=app.completed
        )
        expect_none(report.violations, "refetched bytes", context)
        expect_none(check_fencing(streams), "events appended by a fenced worker", context)
        expect_none(app.errors, "jobs in ERROR", context)
        errors = Counter(
            f"{r.event.error.hresult:#x}"
            for recs in streams.values()
            for r in recs
            if isinstance(r.event, ev.ErrorOccurred)
        )
        summary(
            "postgres restart",
            {
                "seed": seed,
                "restarts": RESTARTS,
                "outage_s": outages,
                "jobs": app.created,
                "completed": len(app.completed),
                "worker_lives": len(workers.lives),
                "workers_died": len(died),
                "died": died[:4],
                "transient_errors": dict(errors),
                "requests": report.requests,
                "waste_bytes": report.waste_bytes,
                "seconds": round(time.monotonic() - t0, 1),
            },
            tmp_path / "summary.json",
        )
        app.close()
    # The workers are expected to ride out an outage of a second or two; report it if not.
    expect_none(died, "workers that died of the PostgreSQL restart", context)


def _wait_for_transfers(server: FileServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while server.active == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
