"""Validation of transferred files (IBackgroundCopyFile3::SetValidationState, bits-core.md
§7.4) and Complete's own check of the temp files it publishes (§7.2: "Complete implicitly
validates files").

A rejected file goes back to byte 0, the job to ERROR with BG_E_VALIDATION_FAILED naming
the file, and Resume fetches that file again and no other. Complete that finds a
transferred file's temp file deleted, cut short or grown since it was transferred rejects
it the same way and publishes nothing, instead of renaming a wrong file into place. The
command's verbs run against the engine tests' nginx; the engine's refetch against a
FaultServer that counts requests per file."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest
from peers.nginx import NginxServer
from test_cli_getters import refused
from test_cli_limits import (  # the autouse fixture keeps BACKHAUL_* out
    _no_backhaul_environment,  # noqa: F401
    ok,
)
from test_engine import (
    FaultServer,
    KiB,
    Served,
    events_of,
    make_engine,
    new_job,
    of_type,
    running,
    temp_of,
    until,
)

from backhaul.adapters.manager import TransferJob, TransferManager
from backhaul.core import command as cmd
from backhaul.core import event as ev
from backhaul.core import hresult as hr
from backhaul.core.error import BitsError
from backhaul.core.vocabulary import ErrorContext, JobType
from backhaul.core.vocabulary import JobState as S


def test_a_rejected_file_is_fetched_again_after_resume_and_no_other(tmp_path: Path) -> None:
    first, second = os.urandom(300 * KiB), os.urandom(200 * KiB)
    manager = TransferManager(home=tmp_path / "home")
    errors: list[Any] = []

    async def main() -> tuple[TransferJob, FaultServer]:
        async with FaultServer({"/a": Served(first), "/b": Served(second)}) as srv:
            job = new_job(
                manager, [(srv.url("/a"), tmp_path / "a"), (srv.url("/b"), tmp_path / "b")]
            )
            engine = make_engine(manager)
            engine.on("job_error", lambda handle, error: errors.append(error))
            async with running(engine):
                await until(lambda: job.state is S.TRANSFERRED, "TRANSFERRED")
                with pytest.raises(BitsError) as pending:
                    job.set_validation_state(2, False)
                assert pending.value.hresult == hr.BG_E_FILE_NOT_FOUND
                job.set_validation_state(0, True)
                assert job.validation_state(0) and not job.validation_state(1)
                job.set_validation_state(1, False)
                assert job.state is S.ERROR
                await until(lambda: len(errors) == 1, "the job_error callback")
                job.resume()
                await until(lambda: job.state is S.TRANSFERRED, "TRANSFERRED again")
            return job, srv

    job, srv = asyncio.run(main())
    assert (len(srv.hits_for("/a")), len(srv.hits_for("/b"))) == (1, 2)
    error = errors[0]
    assert (error.hresult, error.context, error.file_index) == (
        hr.BG_E_VALIDATION_FAILED,
        ErrorContext.LOCAL_FILE,
        1,
    )
    events = events_of(manager, job.id)
    assert [e.file_index for e in of_type(events, ev.FileTransferred)] == [0, 1, 1]
    assert [e.file_index for e in of_type(events, ev.FileRejected)] == [1]
    assert job.validation_state(0)  # accepted once, and not fetched since
    assert job.complete() == hr.S_OK
    assert (tmp_path / "a").read_bytes() == first
    assert (tmp_path / "b").read_bytes() == second


def test_only_a_transferred_file_of_a_download_job_can_be_validated(tmp_path: Path) -> None:
    manager = TransferManager(home=tmp_path / "home")
    job = new_job(manager, [("http://127.0.0.1:9/a", tmp_path / "a")], start=False)
    for valid in (True, False):
        with pytest.raises(BitsError) as refused:
            job.set_validation_state(0, valid)
        assert refused.value.hresult == hr.E_PENDING
    source = tmp_path / "up.bin"
    source.write_bytes(b"up")
    upload = manager.create_job("up", JobType.UPLOAD)
    upload.add_file("http://127.0.0.1:9/up", str(source))
    with pytest.raises(BitsError) as refused:
        upload.set_validation_state(0, True)
    assert refused.value.hresult == hr.E_NOTIMPL
    assert len(events_of(manager, job.id)) == 2  # created, files added: nothing appended


def _transferred(manager: TransferManager, tmp_path: Path, sizes: list[int]) -> TransferJob:
    """A job whose files the engine reported transferred, their temp files written whole
    (what the engine leaves), without a server."""
    job = new_job(
        manager, [(f"http://127.0.0.1:9/{i}", tmp_path / f"f{i}") for i in range(len(sizes))]
    )
    for command in (cmd.StartTransfer(), cmd.Connect()):
        manager.execute(job.id, command)
    for i, size in enumerate(sizes):
        temp_of(job, i).write_bytes(b"x" * size)
        manager.execute(job.id, cmd.FinishFile(i, size))
    manager.execute(job.id, cmd.FinishJob())
    assert job.state is S.TRANSFERRED
    return job


@pytest.mark.parametrize("caught", [True, False])
def test_complete_in_a_batch_rejects_a_changed_file_only_if_the_batch_commits(
    tmp_path: Path, caught: bool
) -> None:
    manager = TransferManager(home=tmp_path / "home")
    job = _transferred(manager, tmp_path, [100, 50])
    os.truncate(temp_of(job, 0), 99)
    if caught:  # the caller goes on: the batch commits, the rejection with it
        with manager.batch(), pytest.raises(BitsError) as refused:
            job.complete()
        assert job.state is S.ERROR
        assert job.error is not None and job.error.file_index == 0
    else:  # an abandoned batch appends nothing: Complete may be tried again
        with pytest.raises(BitsError) as refused, manager.batch():
            job.complete()
        assert job.state is S.TRANSFERRED
    assert refused.value.hresult == hr.BG_E_VALIDATION_FAILED
    assert not (tmp_path / "f0").exists() and not (tmp_path / "f1").exists()


def test_the_validation_verbs_and_complete_check_with_nginx(
    tmp_path: Path,
    home: Path,
    engine_nginx: tuple[NginxServer, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The command end to end: a temp file cut short after the transfer makes ``complete``
    fail and publish nothing; ``resume`` and ``serve`` fetch that file again; then both
    files are published whole."""
    server, docroot = engine_nginx
    one, two = tmp_path / "one.bin", tmp_path / "two.bin"
    job = ok(home, "create", "validate").strip()
    ok(home, "addfile", job, f"{server.url}/one.bin", str(one))
    ok(home, "addfile", job, f"{server.url}/two.bin", str(two))
    assert "E_PENDING" in refused(home, capsys, "setvalidationstate", job, "0", "true")
    ok(home, "resume", job)
    ok(home, "serve", "--until-idle")
    assert ok(home, "getstate", job).strip() == "TRANSFERRED"

    ok(home, "setvalidationstate", job, "0", "TRUE")
    assert ok(home, "getvalidationstate", job, "0").strip() == "true"
    assert ok(home, "getvalidationstate", job, "1").strip() == "false"
    rows = json.loads(ok(home, "files", job, "--json"))
    assert [r["validated"] for r in rows] == [True, False]

    temp = Path(ok(home, "gettemporaryname", job, "1").strip())
    os.truncate(temp, temp.stat().st_size // 2)
    message = refused(home, capsys, "complete", job)
    assert "BG_E_VALIDATION_FAILED" in message and "two.bin" in message
    assert not one.exists() and not two.exists()
    assert ok(home, "getstate", job).strip() == "ERROR"
    assert ok(home, "geterror", job).startswith(
        "BG_E_VALIDATION_FAILED (0x80200053) in LOCAL_FILE (file 1)"
    )

    ok(home, "resume", job)
    ok(home, "serve", "--until-idle")
    assert ok(home, "getstate", job).strip() == "TRANSFERRED"
    ok(home, "complete", job)
    assert one.read_bytes() == (docroot / "one.bin").read_bytes()
    assert two.read_bytes() == (docroot / "two.bin").read_bytes()


@pytest.mark.parametrize("change", ["deleted", "cut short", "grown"])
def test_complete_rejects_a_file_whose_temp_changed_and_resume_fetches_it_again(
    tmp_path: Path, change: str
) -> None:
    first, second = os.urandom(256 * KiB), os.urandom(128 * KiB)
    manager = TransferManager(home=tmp_path / "home")

    async def main() -> tuple[TransferJob, FaultServer]:
        async with FaultServer({"/a": Served(first), "/b": Served(second)}) as srv:
            job = new_job(
                manager, [(srv.url("/a"), tmp_path / "a"), (srv.url("/b"), tmp_path / "b")]
            )
            engine = make_engine(manager)
            async with running(engine):
                await until(lambda: job.state is S.TRANSFERRED, "TRANSFERRED")
            temp = temp_of(job, 1)
            if change == "deleted":
                temp.unlink()
            elif change == "cut short":
                os.truncate(temp, 100 * KiB)
            else:
                with temp.open("ab") as grow:
                    grow.write(b"more")
            with pytest.raises(BitsError) as refused:
                job.complete()
            assert refused.value.hresult == hr.BG_E_VALIDATION_FAILED
            assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
            assert job.state is S.ERROR
            assert temp_of(job, 0).stat().st_size == len(first)  # the whole file is kept
            job.resume()
            async with running(make_engine(manager)):
                await until(lambda: job.state is S.TRANSFERRED, "TRANSFERRED again")
            return job, srv

    job, srv = asyncio.run(main())
    assert (len(srv.hits_for("/a")), len(srv.hits_for("/b"))) == (1, 2)
    rejected = of_type(events_of(manager, job.id), ev.FileRejected)
    assert [r.file_index for r in rejected] == [1]
    assert rejected[0].error.hresult == hr.BG_E_VALIDATION_FAILED
    assert job.complete() == hr.S_OK
    assert (tmp_path / "a").read_bytes() == first
    assert (tmp_path / "b").read_bytes() == second
