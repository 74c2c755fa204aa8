"""Local names at their edges, each found to lose data or fail late before it was refused at
AddFile: a name of the form of a temp name (Complete or Cancel of the job it names deleted
the published file), two names of one file through a link (one published over the other),
paths whose temp file cannot exist (PATH_MAX), names in the store's own folders of marks.
And temp files Cancel could not delete (a read-only directory): noted in the discard journal,
deleted by the next engine to start."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from backhaul.adapters import localfile
from backhaul.adapters.manager import TransferJob, TransferManager
from backhaul.core import command as cmd
from backhaul.core import hresult
from backhaul.core.error import BitsError
from backhaul.core.limit import UNLIMITED
from backhaul.core.vocabulary import JobState, JobType

URL = "https://example.com/file"


def refused_with(code: int, call: Any, *words: str) -> None:
    with pytest.raises(BitsError) as refused:
        call()
    assert refused.value.hresult == code, refused.value
    for word in words:
        assert word in refused.value.message


@pytest.fixture
def manager(tmp_path: Path) -> Any:
    with TransferManager(home=tmp_path / "home", limits=UNLIMITED) as m:
        yield m


def transferred(manager: TransferManager, job: TransferJob, sizes: dict[int, bytes]) -> None:
    job.resume()
    manager.execute(job.id, cmd.StartTransfer())
    manager.execute(job.id, cmd.Connect())
    for i, data in sizes.items():
        f = job.files()[i]
        localfile.temp_path(job.id, i, f.local_name).write_bytes(data)
        manager.execute(job.id, cmd.FinishFile(i, len(data)))
    if len(sizes) == len(job.files()):
        manager.execute(job.id, cmd.FinishJob())


def test_a_name_of_the_form_of_a_temp_name_is_refused(
    manager: TransferManager, tmp_path: Path
) -> None:
    """File 1 named file 0's temp name: Complete published it, then deleted it with file 0's
    temp files (and another job's Cancel deleted a published file the same way)."""
    job = manager.create_job("collide")
    job.add_file(URL, tmp_path / "a")
    temp = localfile.temp_path(job.id, 0, str(tmp_path / "a"))
    worker_temp = localfile.temp_path(job.id, 0, str(tmp_path / "a"), "w1")
    other = manager.create_job("other")
    for name in (temp, worker_temp, tmp_path / f".a.{'0' * 16}-reply.bhtmp"):
        refused_with(hresult.E_INVALIDARG, lambda n=name: job.add_file(URL, n), "temp file")
        refused_with(hresult.E_INVALIDARG, lambda n=name: other.add_file(URL, n), "temp file")
    reply = manager.create_job("reply", JobType.UPLOAD_REPLY)
    with pytest.raises(BitsError):
        reply.reply_file_name = str(temp)
    job.add_files([(URL, tmp_path / "x.bhtmp"), (URL, tmp_path / ".a.b-0.bhtmp")])  # not temps
    assert len(job.files()) == 3


def test_two_names_of_one_file_through_a_link_are_refused(
    manager: TransferManager, tmp_path: Path
) -> None:
    """/d/link/x and /d/real/x in one job: Complete reported both completed, and one of them
    was silently replaced by the other."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    job = manager.create_job("alias")
    refused_with(
        hresult.E_INVALIDARG,
        lambda: job.add_files([(URL, tmp_path / "real/x"), (URL, tmp_path / "link/x")]),
        "name the same file",
    )
    job.add_file(URL, tmp_path / "real" / "x")
    refused_with(hresult.E_INVALIDARG, lambda: job.add_file(URL, tmp_path / "link" / "x"), "real/x")
    job.add_file(URL, tmp_path / "link" / "y")
    other = manager.create_job("another job may name it")
    other.add_file(URL, tmp_path / "link" / "x")
    assert [len(job.files()), len(other.files())] == [2, 1]


def test_paths_whose_temp_file_cannot_exist_are_refused(
    manager: TransferManager, tmp_path: Path
) -> None:
    """A path of 4,096 bytes or more cannot exist (PATH_MAX counts the NUL), counted in bytes,
    not characters; and a name whose temp name (up to 73 bytes longer) would pass 4,095 bytes
    failed only at transfer, with ERROR_FILENAME_EXCED_RANGE."""
    deep = Path(tmp_path)
    while len(str(deep)) < 3800:
        deep = deep / ("d" * 200)
    deep.mkdir(parents=True)
    room = 4095 - len(str(deep).encode()) - 1
    job = manager.create_job("long")
    fits = deep / ("f" * (room - 73))
    job.add_file(URL, fits)
    refused_with(
        hresult.E_INVALIDARG, lambda: job.add_file(URL, deep / ("g" * (room - 72))), "temp file"
    )
    refused_with(hresult.E_INVALIDARG, lambda: cmd.check_local_name("/" + "é/" * 1400), "bytes")
    refused_with(hresult.E_INVALIDARG, lambda: cmd.check_local_name("/" + "x/" * 2047 + "y"))
    assert [f.local_name for f in job.files()] == [str(fits)]
    transferred(manager, job, {0: b"fits"})
    assert job.complete() == hresult.S_OK
    assert fits.read_bytes() == b"fits"


def test_a_name_in_the_stores_folders_of_marks_is_refused(
    manager: TransferManager, tmp_path: Path
) -> None:
    """HOME/completing/JOB was published, then removed as the mark of its own Complete."""
    home = tmp_path / "home"
    done = manager.create_job("done")
    done.add_file(URL, tmp_path / "done.bin")
    transferred(manager, done, {0: b"d"})
    done.complete()  # makes HOME/completing
    for folder in ("completing", "discards"):
        (home / folder).mkdir(exist_ok=True)
        job = manager.create_job(folder)
        refused_with(
            hresult.E_INVALIDARG,
            lambda j=job, f=folder: j.add_file(URL, home / f / j.id),
            "folder of this store",
        )


def test_a_directory_that_cannot_be_looked_up_is_named_for_what_it_is(
    manager: TransferManager, tmp_path: Path
) -> None:
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    job = manager.create_job("loop")
    refused_with(
        hresult.E_INVALIDARG,
        lambda: job.add_file(URL, tmp_path / "loop" / "z"),
        "cannot be looked up",
        "symbolic links",
    )


def test_a_read_only_file_system_is_write_protect_and_a_quota_is_disk_full() -> None:
    code = localfile.os_hresult(OSError(errno.EROFS, "Read-only file system"))
    assert code == hresult.hresult_from_win32(hresult.ERROR_WRITE_PROTECT)
    assert hresult.name_of(code) == "HRESULT_FROM_WIN32(ERROR_WRITE_PROTECT)"
    code = localfile.os_hresult(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert code == hresult.hresult_from_win32(hresult.ERROR_DISK_FULL)


@pytest.mark.parametrize("batched", [False, True], ids=["alone", "in-a-batch"])
def test_temp_files_cancel_could_not_delete_are_deleted_by_the_next_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batched: bool
) -> None:
    """A read-only (or immutable) directory: Cancel gives BG_S_UNABLE_TO_DELETE_FILES as
    BITS does, and the temp files stayed for good. They are noted in the discard journal;
    ``finish_discards`` (the next engine's start) deletes them once it can."""
    home = tmp_path / "home"
    manager = TransferManager(home=home, limits=UNLIMITED)
    job = manager.create_job("stuck")
    job.add_files([(URL, tmp_path / f"f{i}") for i in range(3)])
    transferred(manager, job, {0: b"zero", 1: b"one"})
    unlink = os.unlink

    def read_only(path: Any) -> None:
        if str(path).endswith(".bhtmp"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        unlink(path)

    monkeypatch.setattr(localfile.os, "unlink", read_only)
    if batched:
        with manager.batch():
            job.cancel()
    else:
        assert job.cancel() == hresult.BG_S_UNABLE_TO_DELETE_FILES
    assert job.state is JobState.CANCELLED
    temps = sorted(p.name for p in tmp_path.glob(".*.bhtmp"))
    assert len(temps) == 2
    assert manager.finish_discards() == 1  # still read-only: kept for next time
    assert len(list((home / "discards").glob("*.json"))) == 1
    monkeypatch.setattr(localfile.os, "unlink", unlink)
    manager.close()

    with TransferManager(home=home, limits=UNLIMITED) as again:
        assert again.finish_discards() == 1
    assert list(tmp_path.glob(".*.bhtmp")) == []
    assert list((home / "discards").glob("*.json")) == []
