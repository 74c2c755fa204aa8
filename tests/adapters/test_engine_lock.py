"""One engine per store, whoever starts it: ``backhaul serve``, ``get``, or an
application's ``Engine``/``EngineThread``; on PostgreSQL as on SQLite. Two engines without leases on one store transfer
the same job into the same temp file, restart each other's files and publish wrong bytes, so
``Engine.run`` holds the store's engine lock (the file ``serve`` takes) and refuses to start
(ERROR_SERVICE_ALREADY_RUNNING) while another engine holds it, in this process or another.
Workers, which lease the jobs they run, share the lock; an engine without leases never runs
beside them. SQLite's lock is a file beside the database, PostgreSQL's an advisory lock of
the database (a real PostgreSQL server here)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_engine import (  # the autouse fixture keeps BACKHAUL_STORE out
    FaultServer,
    Served,
    _no_store_from_the_environment,  # noqa: F401
    make_engine,
    new_job,
    running,
    sha256,
    until,
)

from backhaul.adapters.engine import EngineThread
from backhaul.adapters.manager import TransferManager
from backhaul.adapters.store import DB_FILE, LOCK_SUFFIX, is_free, open_store
from backhaul.core import hresult
from backhaul.core.error import BitsError
from backhaul.core.vocabulary import JobState

KiB = 1024
ALREADY_RUNNING = hresult.hresult_from_win32(hresult.ERROR_SERVICE_ALREADY_RUNNING)
BACKHAUL = Path(sys.executable).parent / "backhaul"


def refused(error: pytest.ExceptionInfo[BitsError]) -> None:
    assert error.value.hresult == ALREADY_RUNNING
    assert "another engine runs on the store" in error.value.message


def test_a_second_engine_on_one_sqlite_store_is_refused_until_the_first_stops(
    tmp_path: Path,
) -> None:
    """Two managers of one application on one home: while one engine runs, another (with
    or without a worker name) refuses to start and transfers nothing; once the first has
    stopped, it runs and the file arrives whole."""
    data = os.urandom(256 * KiB)
    home = tmp_path / "home"
    with TransferManager(home=home) as first, TransferManager(home=home) as second:

        async def main() -> None:
            async with FaultServer({"/f": Served(data)}) as srv:
                async with running(make_engine(first)):
                    await until(lambda: not is_free(home / (DB_FILE + LOCK_SUFFIX)), "the lock")
                    job = new_job(second, [(srv.url("/f"), tmp_path / "f.bin")])
                    for options in ({}, {"worker": "w1"}):
                        with pytest.raises(BitsError) as error:
                            await make_engine(second, **options).run(until_idle=True)
                        refused(error)
                    await until(lambda: job.state is JobState.TRANSFERRED, "the first engine")
                job.complete()
                assert sha256(tmp_path / "f.bin") == sha256(data)
                job2 = new_job(second, [(srv.url("/f"), tmp_path / "g.bin")])
                await make_engine(second).run(until_idle=True)  # the lock is free again
                assert job2.state is JobState.TRANSFERRED

        asyncio.run(main())


def test_workers_share_the_lock_and_keep_an_engine_without_leases_out(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with TransferManager(home=home) as first, TransferManager(home=home) as second:

        async def main() -> None:
            async with (
                running(make_engine(first, worker="w1")),
                running(make_engine(second, worker="w2")) as task,
            ):
                await asyncio.sleep(0.2)
                assert not task.done()  # a second worker runs beside the first
                with pytest.raises(BitsError) as error:
                    await make_engine(second).run(until_idle=True)
                refused(error)

        asyncio.run(main())


def test_an_engine_thread_beside_backhaul_serve_is_refused_naming_its_pid(
    tmp_path: Path,
) -> None:
    """The application's EngineThread and a real ``backhaul serve`` on one store."""
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKHAUL_")}
    serve = subprocess.Popen(
        [str(BACKHAUL), "--home", str(home), "serve"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        lock = home / (DB_FILE + LOCK_SUFFIX)
        deadline = time.monotonic() + 15
        while not lock.exists() or is_free(lock):
            assert serve.poll() is None, serve.stderr.read() if serve.stderr else ""
            assert time.monotonic() < deadline, "serve did not take the lock"
            time.sleep(0.05)
        with TransferManager(home=home) as manager:
            engine = EngineThread(manager)
            with pytest.raises(BitsError) as error:
                engine.start()  # refused before start() returns, not at the block's end
            refused(error)
            assert f"pid {serve.pid}" in error.value.message
            assert not engine._thread.is_alive()
    finally:
        serve.terminate()
        serve.wait(15)
    assert serve.returncode == 0


@pytest.mark.peer
def test_on_postgresql_too_one_engine_without_leases_or_workers_only(
    postgres_url: str, tmp_path: Path
) -> None:
    """The advisory lock: a second engine without leases is refused while one runs; workers
    run together, and keep an engine without leases out; a stopped engine's lock is free."""
    first = TransferManager(open_store(postgres_url))
    second = TransferManager(open_store(postgres_url))

    async def main() -> None:
        async with running(make_engine(first)):
            await asyncio.sleep(0.2)
            for options in ({}, {"worker": "w1"}):
                with pytest.raises(BitsError) as error:
                    await make_engine(second, **options).run(until_idle=True)
                refused(error)
        async with (
            running(make_engine(first, worker="w1")),
            running(make_engine(second, worker="w2")) as task,
        ):
            await asyncio.sleep(0.2)
            assert not task.done()
            with pytest.raises(BitsError) as error:
                await make_engine(second).run(until_idle=True)
            refused(error)
        await make_engine(second).run(until_idle=True)  # every lock given back

    try:
        asyncio.run(main())
    finally:
        first.close()
        second.close()
