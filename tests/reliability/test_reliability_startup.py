"""Several workers started at the same moment on one PostgreSQL store all come up.

A fleet restart (a service manager starting N ``backhaul serve`` units at boot, or after a
deploy) starts its workers within milliseconds of each other. Every worker opens the store,
and opening runs the store's schema statements (CREATE TABLE / INDEX IF NOT EXISTS, CREATE OR
REPLACE FUNCTION) even when the schema exists. Two such statements on the same catalog row at
once make PostgreSQL fail one of them with ``tuple concurrently updated``; the worker must not
die of it.

The first test opens the store from several threads released by one barrier (each thread its
own connection pool, as separate processes have): it reproduces the race within a second. The
second starts real ``backhaul serve`` processes together (the race needs their opens to
coincide within milliseconds, so it shows only now and then).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from reliability_helpers import SCHEMA_RACE, Workers, size, summary, tail

from backhaul.adapters.store import open_store

pytestmark = pytest.mark.peer

ROUNDS = size(2, 8)
AT_ONCE = 4
OPEN_ROUNDS = size(15, 60)
OPEN_AT_ONCE = 6


def test_the_store_opens_from_several_processes_at_once(postgres_url: str) -> None:
    open_store(postgres_url).close()  # the schema exists already
    failures: list[str] = []
    for _ in range(OPEN_ROUNDS):
        barrier = threading.Barrier(OPEN_AT_ONCE)

        def open_once(barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            try:
                open_store(postgres_url).close()
            except Exception as exc:
                failures.append(repr(exc))

        threads = [threading.Thread(target=open_once) for _ in range(OPEN_AT_ONCE)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    opens = OPEN_ROUNDS * OPEN_AT_ONCE
    summary("open_store at once", {"opens": opens, "failed": len(failures)})
    assert not failures, f"{len(failures)} of {opens} concurrent opens failed: {failures[:3]}"


def test_workers_started_together_all_come_up(postgres_url: str, tmp_path: Path) -> None:
    open_store(postgres_url).close()  # the schema exists before the fleet starts
    died: list[str] = []
    lives = 0
    for round_ in range(ROUNDS):
        workers = Workers(postgres_url, tmp_path / "home", tmp_path / f"logs{round_}", AT_ONCE)
        workers.start()
        lives += AT_ONCE
        time.sleep(3.0)  # start-up (about 1 s each on 2 busy cores) plus a few engine ticks
        for life in workers.current.values():
            if life.proc.poll() is not None:
                died.append(
                    f"round {round_} {life.label} rc={life.proc.returncode}: {tail(life.log, 1)}"
                )
        workers.stop()
    races = sum(SCHEMA_RACE in line for line in died)
    summary("startup", {"rounds": ROUNDS, "workers": lives, "died": len(died), "races": races})
    assert not died, "workers died at start-up:\n" + "\n".join(died)
