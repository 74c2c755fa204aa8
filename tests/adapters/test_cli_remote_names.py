"""The command's remote-name verbs, as bitsadmin has them: ``addfilewithranges`` (byte ranges
of a remote file), and ``setremotename`` and ``replaceremoteprefix``, which fix a job in ERROR
before ``resume`` (bits-core.md: "fix by SetRemoteName / ReplaceRemotePrefix and Resume").
Against the engine tests' real nginx, through ``backhaul serve``'s code in this process."""

from __future__ import annotations

from pathlib import Path

import pytest
from peers.nginx import NginxServer
from test_cli_limits import (  # the autouse fixture keeps BACKHAUL_* out
    _no_backhaul_environment,  # noqa: F401
    ok,
    run,
)

from backhaul.adapters.manager import TransferManager
from backhaul.core import hresult
from backhaul.core.value import ByteRange
from backhaul.core.vocabulary import JobPriority, JobState


def serve(home: Path) -> None:
    ok(home, "serve", "--until-idle")


def state(home: Path, job: str) -> JobState:
    with TransferManager(home=home) as m:
        return m.get_job(job).state


def test_addfilewithranges_downloads_just_those_ranges(
    tmp_path: Path, home: Path, engine_nginx: tuple[NginxServer, Path]
) -> None:
    server, docroot = engine_nginx
    data = (docroot / "two.bin").read_bytes()
    job = ok(home, "create", "ranges").strip()
    ok(
        home,
        "addfilewithranges",
        job,
        f"{server.url}/two.bin",
        str(tmp_path / "r.bin"),
        "10:90, 4096:1000,2000000:eof",
    )
    with TransferManager(home=home) as m:
        assert m.get_job(job).files()[0].ranges == (
            ByteRange(10, 90),
            ByteRange(4096, 1000),
            ByteRange(2000000, None),
        )
    ok(home, "resume", job)
    serve(home)
    ok(home, "complete", job)

    assert (tmp_path / "r.bin").read_bytes() == data[10:100] + data[4096:5096] + data[2000000:]


@pytest.mark.parametrize("ranges", ["10", "a:5", "0:x", "0:10,,5:5", ""])
def test_a_bad_range_list_is_refused_and_nothing_is_recorded(
    tmp_path: Path, home: Path, ranges: str, capsys: pytest.CaptureFixture[str]
) -> None:
    job = ok(home, "create", "ranges").strip()
    capsys.readouterr()
    code, _ = run(
        home, "addfilewithranges", job, "http://127.0.0.1:1/f", str(tmp_path / "f"), ranges
    )
    assert code != 0
    assert hresult.format_hresult(hresult.E_INVALIDARG) in capsys.readouterr().err
    with TransferManager(home=home) as m:
        assert m.get_job(job).files() == []


def test_setremotename_fixes_a_job_in_error_and_resume_finishes_it(
    tmp_path: Path, home: Path, engine_nginx: tuple[NginxServer, Path]
) -> None:
    server, docroot = engine_nginx
    job = ok(home, "create", "fix").strip()
    ok(home, "addfile", job, f"{server.url}/one.bin", str(tmp_path / "one.bin"))
    ok(home, "addfile", job, f"{server.url}/no-such.bin", str(tmp_path / "three.bin"))
    ok(home, "resume", job)
    serve(home)
    assert state(home, job) is JobState.ERROR  # the 404

    ok(home, "setremotename", job, "1", f"{server.url}/three.bin")
    ok(home, "resume", job)
    serve(home)
    assert state(home, job) is JobState.TRANSFERRED
    ok(home, "complete", job)

    assert (tmp_path / "one.bin").read_bytes() == (docroot / "one.bin").read_bytes()
    assert (tmp_path / "three.bin").read_bytes() == (docroot / "three.bin").read_bytes()
    code, _ = run(home, "setremotename", job, "7", f"{server.url}/one.bin")
    assert code != 0  # the job is final now, and has no file 7


def test_replaceremoteprefix_moves_the_job_to_the_right_server(
    tmp_path: Path, home: Path, engine_nginx: tuple[NginxServer, Path]
) -> None:
    server, docroot = engine_nginx
    wrong = "http://127.0.0.1:1"  # nothing listens there
    job = ok(home, "create", "moved").strip()
    ok(home, "addfile", job, f"{wrong}/one.bin", str(tmp_path / "one.bin"))
    ok(home, "addfile", job, f"{wrong}/two.bin", str(tmp_path / "two.bin"))

    assert ok(home, "replaceremoteprefix", job, "http://elsewhere", server.url) == "S_FALSE\n"
    assert ok(home, "replaceremoteprefix", job, wrong, server.url) == ""
    with TransferManager(home=home) as m:
        names = [f.remote_name for f in m.get_job(job).files()]
    assert names == [f"{server.url}/one.bin", f"{server.url}/two.bin"]
    ok(home, "resume", job)
    serve(home)
    ok(home, "complete", job)
    for name in ("one.bin", "two.bin"):
        assert (tmp_path / name).read_bytes() == (docroot / name).read_bytes()


def test_the_remote_name_verbs_apply_to_download_jobs_only(
    tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = ok(home, "create", "up", "--type", "upload").strip()
    source = tmp_path / "s.bin"
    source.write_bytes(b"x")
    ok(home, "addfile", job, "http://127.0.0.1:1/up/s.bin", str(source))
    for argv in (
        ("setremotename", job, "0", "http://127.0.0.1:2/up/s.bin"),
        ("replaceremoteprefix", job, "http://127.0.0.1:1", "http://127.0.0.1:2"),
    ):
        capsys.readouterr()
        code, _ = run(home, *argv)
        assert code != 0
        assert hresult.format_hresult(hresult.E_NOTIMPL) in capsys.readouterr().err
    with TransferManager(home=home) as m:
        assert m.get_job(job).files()[0].remote_name == "http://127.0.0.1:1/up/s.bin"


def test_transfer_downloads_its_pairs_and_completes_the_job(
    tmp_path: Path,
    home: Path,
    engine_nginx: tuple[NginxServer, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """bitsadmin /transfer NAME /download /priority normal REMOTE LOCAL REMOTE LOCAL."""
    server, docroot = engine_nginx
    pairs = []
    for name in ("one.bin", "three.bin"):
        pairs += [f"{server.url}/{name}", str(tmp_path / name)]
    ok(home, "transfer", "nightly", "--download", "--priority", "normal", "--quiet", *pairs)

    for name in ("one.bin", "three.bin"):
        assert (tmp_path / name).read_bytes() == (docroot / name).read_bytes()
    with TransferManager(home=home) as m:
        (job,) = m.jobs(include_final=True)
        assert (job.display_name, job.state) == ("nightly", JobState.ACKNOWLEDGED)
        assert job.priority is JobPriority.NORMAL

    capsys.readouterr()
    code, _ = run(home, "transfer", "odd", f"{server.url}/one.bin")
    assert code != 0
    assert hresult.format_hresult(hresult.E_INVALIDARG) in capsys.readouterr().err
    with TransferManager(home=home) as m:
        assert [j.display_name for j in m.jobs(include_final=True)] == ["nightly"]
