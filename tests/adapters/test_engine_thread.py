"""An application's EngineThread (README: the engine in a thread of its own) when the
application closes its TransferManager first: the engine stops, and ``stop()`` tells why with
BitsError RPC_E_DISCONNECTED (as the manager's own calls do once it is closed), not with the
closed store's exception from deep inside."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from test_engine import (  # the autouse fixture keeps BACKHAUL_STORE out
    FaultServer,
    Served,
    _no_store_from_the_environment,  # noqa: F401
    new_job,
)

from backhaul.adapters.engine import EngineThread
from backhaul.adapters.manager import TransferManager
from backhaul.core import hresult
from backhaul.core.error import BitsError
from backhaul.core.vocabulary import JobState

KiB = 1024


def wait_for(predicate: object, what: str, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "transferring"])
def test_closing_the_manager_under_its_engine_thread_stops_it_with_rpc_e_disconnected(
    tmp_path: Path, busy: bool
) -> None:
    data = os.urandom(512 * KiB)
    served = Served(data, step=16 * KiB, delay=0.05) if busy else Served(data)
    with FaultServer({"/f": served}).threaded() as server:
        manager = TransferManager(home=tmp_path / "home")
        job = new_job(manager, [(server.url("/f"), tmp_path / "f.bin")])
        engine = EngineThread(manager, poll_interval=0.05).start()
        wanted = JobState.TRANSFERRING if busy else JobState.TRANSFERRED
        wait_for(lambda: job.state is wanted, wanted.name)
        manager.close()
        wait_for(lambda: not engine._thread.is_alive(), "the engine to stop")
        with pytest.raises(BitsError) as stopped:
            engine.stop()
        assert stopped.value.hresult == hresult.RPC_E_DISCONNECTED
        assert "closed" in stopped.value.message
    with TransferManager(home=tmp_path / "home") as again:  # the store is whole
        assert again.get_job(job.id).state in (JobState.TRANSFERRING, JobState.TRANSFERRED)
