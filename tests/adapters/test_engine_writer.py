"""The engine's writer: decisions are made against the engine's copy of a job and appended
later in group commits. When the log refuses a batch (another writer appended first), every
decision that rested on the refused one is decided again against the log, with the lease
fence, before anything of it is appended."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from test_engine import make_engine

from backhaul.adapters.engine import JobGone
from backhaul.adapters.manager import TransferManager
from backhaul.core import command as cmd
from backhaul.core import event as ev
from backhaul.core.error import BitsError


def test_a_decision_made_while_a_refused_batch_is_reloaded_is_decided_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Worker A's copy says it holds the lease, but its lease ran out and worker B took the
    job. A renews (refused: the log moved on); while A reloads the job, its transfer ends
    and queues a ReleaseLease against the copy it still has. That release rests on A's own
    refused renewal: it must be fenced, not appended after B's LeaseTaken."""
    manager = TransferManager(home=tmp_path / "home")
    job = manager.create_job("raced")
    job.add_file("http://127.0.0.1:1/x", tmp_path / "x")
    job.resume()

    async def main() -> None:
        engine = make_engine(manager, worker="worker-a", lease_seconds=30.0)
        engine._writer_wake = asyncio.Event()
        engine._flush_lock = asyncio.Lock()
        await engine._start()
        taken = engine._enqueue(job.id, cmd.TakeLease("worker-a", 0.01))
        await engine._flush()
        await taken
        await asyncio.sleep(0.05)  # A's lease runs out; B takes the job behind A's back
        manager.execute(job.id, cmd.TakeLease("worker-b", 30))

        reloading, go_on = threading.Event(), threading.Event()
        stream = engine.store.stream

        def slow_stream(*args, **kwargs):  # type: ignore[no-untyped-def]
            reloading.set()
            go_on.wait(10)
            return stream(*args, **kwargs)

        monkeypatch.setattr(engine.store, "stream", slow_stream)
        renewal = engine._enqueue(job.id, cmd.TakeLease("worker-a", 30))
        flushing = asyncio.create_task(engine._flush())
        await asyncio.to_thread(reloading.wait, 10)
        release = engine._enqueue(job.id, cmd.ReleaseLease("worker-a"))
        go_on.set()
        await flushing
        with pytest.raises(BitsError):
            await renewal
        with pytest.raises(JobGone):
            await release

    asyncio.run(main())
    after_b = False
    for recorded in manager.store.stream(job.id):
        e = recorded.event
        if isinstance(e, ev.LeaseTaken) and e.worker == "worker-b":
            after_b = True
        assert not (after_b and e.worker == "worker-a"), f"fenced worker appended {e!r}"
    assert job.snapshot().lease_worker == "worker-b"
