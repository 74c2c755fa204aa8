"""Complete and Cancel of one job from two managers at once (two processes, or two
applications on one store): the outcome is one or the other, never a CANCELLED job with part
of its files published and the rest deleted. Complete renames files into place before it
records the end, Cancel deletes temp files before it records its own: they take turns on the
store (``store.file_work``), and whoever comes second finds the job final. Here the renames
are slowed down so that the Cancel comes while the Complete is half-way."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from backhaul.adapters import localfile
from backhaul.adapters.manager import TransferJob, TransferManager
from backhaul.core import command as cmd
from backhaul.core import hresult
from backhaul.core.error import BitsError
from backhaul.core.limit import UNLIMITED
from backhaul.core.vocabulary import JobState

FILES = 60


def transferred_job(manager: TransferManager, tmp_path: Path) -> TransferJob:
    job = manager.create_job("many")
    job.add_files([(f"https://example.com/{i}", tmp_path / f"f{i}.bin") for i in range(FILES)])
    job.resume()
    manager.execute(job.id, cmd.StartTransfer())
    manager.execute(job.id, cmd.Connect())
    for i in range(FILES):
        localfile.temp_path(job.id, i, str(tmp_path / f"f{i}.bin")).write_bytes(b"%d" % i)
        manager.execute(job.id, cmd.FinishFile(i, len(b"%d" % i)))
    manager.execute(job.id, cmd.FinishJob())
    assert job.state is JobState.TRANSFERRED
    return job


def complete(
    manager: TransferManager, job: TransferJob, batched: bool, other: TransferJob | None = None
) -> None:
    """``job.complete()`` alone, or in a batch (with a change to ``other`` in it too)."""
    if not batched:
        job.complete()
        return
    with manager.batch():
        if other is not None:
            other.description = "in the batch"
        job.complete()


@pytest.mark.parametrize("batched", [False, True], ids=["alone", "in-a-batch"])
def test_a_cancel_during_a_complete_waits_and_finds_the_job_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batched: bool
) -> None:
    home = tmp_path / "home"
    first = TransferManager(home=home, limits=UNLIMITED)
    second = TransferManager(home=home, limits=UNLIMITED)
    job = transferred_job(first, tmp_path)
    renaming = threading.Event()
    replace = os.replace

    def slow_replace(src: Any, dst: Any) -> None:
        renaming.set()
        time.sleep(0.01)
        replace(src, dst)

    monkeypatch.setattr(localfile.os, "replace", slow_replace)
    results: dict[str, Any] = {}

    def complete() -> None:
        try:
            if batched:
                with first.batch():
                    results["complete"] = job.complete()
            else:
                results["complete"] = job.complete()
        except BitsError as exc:
            results["complete"] = exc

    worker = threading.Thread(target=complete)
    worker.start()
    assert renaming.wait(10)
    with pytest.raises(BitsError) as refused:
        second.get_job(job.id).cancel()
    worker.join(30)

    assert results["complete"] == hresult.S_OK
    assert refused.value.hresult == hresult.BG_E_INVALID_STATE
    assert job.state is JobState.ACKNOWLEDGED
    assert [(tmp_path / f"f{i}.bin").read_bytes() for i in range(FILES)] == [
        b"%d" % i for i in range(FILES)
    ]
    first.close()
    second.close()


def test_a_batch_complete_of_a_job_cancelled_meanwhile_publishes_nothing(
    tmp_path: Path,
) -> None:
    """A batch read the job, then another manager cancelled it before the batch's commit:
    the commit finds the job changed before it renames anything (BatchConflict), instead of
    publishing the files of a CANCELLED job and failing only at the append."""
    home = tmp_path / "home"
    first = TransferManager(home=home, limits=UNLIMITED)
    second = TransferManager(home=home, limits=UNLIMITED)
    job = transferred_job(first, tmp_path)

    def complete_in_a_batch_cancelled_meanwhile() -> None:
        with first.batch():
            job.complete()
            second.get_job(job.id).cancel()

    with pytest.raises(BitsError) as conflict:
        complete_in_a_batch_cancelled_meanwhile()
    assert conflict.value.hresult == hresult.E_FAIL
    assert job.state is JobState.CANCELLED
    assert not any((tmp_path / f"f{i}.bin").exists() for i in range(FILES))
    first.close()
    second.close()


@pytest.mark.parametrize("batched", [False, True], ids=["alone", "in-a-batch"])
def test_a_complete_killed_half_way_is_finished_by_complete_and_never_cancelled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batched: bool
) -> None:
    """``backhaul complete`` killed while it renames (alone, or in a batch's commit): the
    job is still TRANSFERRED with part of its files published. A Cancel then would end it
    with those files left and the others deleted; it is refused (BG_E_INVALID_STATE) until
    Complete, called again, finishes the renames. (KeyboardInterrupt stands for the kill:
    nothing after it runs.)"""
    home = tmp_path / "home"
    first = TransferManager(home=home, limits=UNLIMITED)
    job = transferred_job(first, tmp_path)
    other = first.create_job("other")  # a second job in the batch, not completed
    replace = os.replace
    renamed: list[Any] = []

    def killed_after_ten(src: Any, dst: Any) -> None:
        if len(renamed) == 10:
            raise KeyboardInterrupt
        replace(src, dst)
        renamed.append(dst)

    monkeypatch.setattr(localfile.os, "replace", killed_after_ten)
    with pytest.raises(KeyboardInterrupt):
        complete(first, job, batched, other)
    monkeypatch.setattr(localfile.os, "replace", replace)
    assert len(renamed) == 10
    first.close()

    again = TransferManager(home=home, limits=UNLIMITED)
    after_the_kill = again.get_job(job.id)
    assert after_the_kill.state is JobState.TRANSFERRED
    with pytest.raises(BitsError) as refused:
        after_the_kill.cancel()
    assert refused.value.hresult == hresult.BG_E_INVALID_STATE
    assert "call Complete again" in refused.value.message
    assert after_the_kill.complete() == hresult.S_OK
    assert [(tmp_path / f"f{i}.bin").read_bytes() for i in range(FILES)] == [
        b"%d" % i for i in range(FILES)
    ]
    assert not list((home / "completing").iterdir())  # nothing left behind
    again.close()


@pytest.mark.parametrize("batched", [False, True], ids=["alone", "in-a-batch"])
def test_a_complete_that_fails_leaves_the_job_to_cancel(tmp_path: Path, batched: bool) -> None:
    """A Complete that fails (a directory in the way), not one killed: the job stays
    TRANSFERRED with the files renamed before the failure, as BITS keeps them, and Cancel
    may end it."""
    manager = TransferManager(home=tmp_path / "home", limits=UNLIMITED)
    job = transferred_job(manager, tmp_path)
    (tmp_path / "f5.bin").mkdir()
    with pytest.raises(BitsError):
        complete(manager, job, batched)
    assert job.state is JobState.TRANSFERRED
    assert (tmp_path / "f4.bin").exists()  # renamed before the failure
    assert job.cancel() == hresult.S_OK
    assert job.state is JobState.CANCELLED
    manager.close()
