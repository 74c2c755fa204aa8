"""The ``backhaul`` command around the engine, with the REAL HTTP transport: ``get`` runs a
foreground job to its end (its own engine, or following ``serve`` when one holds the store's
lock), ``serve`` refuses a second engine and stops cleanly on SIGTERM, and a ``serve`` killed
mid-transfer leaves a job that the next engine resumes from its last checkpoint."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import io
import json
import logging
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path

import pytest
from peers.nginx import NginxServer
from test_engine import (  # the autouse fixture keeps BACKHAUL_STORE out
    FaultServer,
    KiB,
    MiB,
    Served,
    _no_store_from_the_environment,  # noqa: F401
    checkpointed,
    events_of,
    make_engine,
    new_job,
    sha256,
    temp_of,
    trickle,
)

from backhaul.adapters import localfile
from backhaul.adapters.cli import (
    GC_YOUNG_THRESHOLD,
    LOCK_FILE,
    LOCK_SUFFIX,
    _made_by,
    _name_from_url,
    main,
    serve_lock,
)
from backhaul.adapters.manager import TransferJob, TransferManager
from backhaul.core import event as ev
from backhaul.core.job import Job
from backhaul.core.vocabulary import JobPriority, JobState, JobType

S = JobState
BACKHAUL = Path(sys.executable).parent / "backhaul"


@pytest.fixture
def env() -> dict[str, str]:
    """The environment for subprocesses: no store or home inherited from the caller."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BACKHAUL_")}
    clean["PYTHONUNBUFFERED"] = "1"
    return clean


def wait(predicate: Callable[[], bool], what: str, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        time.sleep(0.02)


def all_jobs(home: Path) -> list[TransferJob]:
    with TransferManager(home=home) as manager:
        return list(manager.jobs(include_final=True))


def the_job(home: Path) -> TransferJob:
    manager = TransferManager(home=home)
    jobs = list(manager.jobs(include_final=True))
    assert len(jobs) == 1, jobs
    return jobs[0]


@pytest.fixture
def serve(home: Path, env: dict[str, str]) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start ``backhaul --home H serve``; wait until it holds the lock. Killed at the end."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(*extra: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [str(BACKHAUL), "--home", str(home), "serve", *extra],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        procs.append(proc)
        lock = home / LOCK_FILE

        def holds() -> bool:
            assert proc.poll() is None, proc.communicate()
            return lock.exists() and lock.read_text() == str(proc.pid)

        wait(holds, "backhaul serve to take the lock")
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


# =================================================================================================
# get
# =================================================================================================


def test_get_downloads_the_file_and_completes_the_job(
    tmp_path: Path, home: Path, engine_nginx: tuple[NginxServer, Path]
) -> None:
    server, docroot = engine_nginx
    dest = tmp_path / "dest"
    dest.mkdir()
    out = io.StringIO()

    code = main(
        ["--home", str(home), "get", f"{server.url}/two.bin", str(dest / "two.bin"), "--json"],
        out,
    )

    assert code == 0
    assert sha256(dest / "two.bin") == sha256(docroot / "two.bin")
    assert list(dest.iterdir()) == [dest / "two.bin"]  # no temp file left
    job = the_job(home)
    assert job.state is S.ACKNOWLEDGED
    size = (docroot / "two.bin").stat().st_size
    assert json.loads(out.getvalue().splitlines()[-1]) == {  # the progress lines' fields
        "id": job.id,
        "state": "ACKNOWLEDGED",
        "bytes_transferred": size,
        "bytes_total": size,
        "files_transferred": 1,
        "files_total": 1,
        "result": "S_OK",
    }


def test_get_range_takes_curls_ranges_one_after_the_other(
    tmp_path: Path,
    home: Path,
    engine_nginx: tuple[NginxServer, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    server, docroot = engine_nginx
    data = (docroot / "two.bin").read_bytes()
    dest = tmp_path / "part.bin"
    argv = ["--home", str(home), "get", "-q", "-r", "0-99,1000000-", f"{server.url}/two.bin"]
    assert main([*argv, str(dest)], io.StringIO()) == 0
    assert dest.read_bytes() == data[:100] + data[1_000_000:]
    assert the_only_job(home).state is S.ACKNOWLEDGED
    for bad in ("-500", "5-2", "a-b", "100"):
        capsys.readouterr()
        assert main([*argv[:4], "--range", bad, f"{server.url}/two.bin", str(tmp_path / "x")])
        assert "E_INVALIDARG" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_get_into_a_log_writes_a_progress_line_per_state_not_a_redrawn_bar(
    tmp_path: Path, home: Path, env: dict[str, str], engine_nginx: tuple[NginxServer, Path]
) -> None:
    """stderr is not a terminal (a pipe, a log file): no carriage returns, one line per
    state (and one every 10 s within a state), the last one the finished file."""
    server, _ = engine_nginx
    get = subprocess.run(
        [str(BACKHAUL), "--home", str(home), "get", f"{server.url}/two.bin", str(tmp_path / "t")],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
        check=False,
    )
    err = get.stderr.decode()
    assert get.returncode == 0, err
    assert "\r" not in err
    bars = [line for line in err.splitlines() if line.startswith("[")]
    states = [line.split()[-1] for line in bars]
    assert states == list(dict.fromkeys(states)), err  # each state once: no redraws
    assert bars[-1].startswith("[" + "#" * 30 + "] 100.0% 2.0 MiB/2.0 MiB "), err
    assert states[-1] == "TRANSFERRED"


def test_get_max_rate_limits_the_job_as_setmaxrate_does(
    tmp_path: Path, home: Path, engine_nginx: tuple[NginxServer, Path]
) -> None:
    """`get --max-rate 400k` (curl's --limit-rate): the job's own rate is recorded before
    the transfer starts, and 1 MiB at 400 kB/s takes over 2 s (about 2.4 s after the
    bucket's first quarter second); unlimited, the same `get` takes a fraction of that."""
    server, docroot = engine_nginx
    dest = tmp_path / "one.bin"

    def timed_get(*options: str) -> float:
        started = time.monotonic()
        argv = ["--home", str(home), "get", "-q", *options, f"{server.url}/one.bin", str(dest)]
        assert main(argv, io.StringIO()) == 0
        return time.monotonic() - started

    limited = timed_get("--max-rate", "400k")
    assert sha256(dest) == sha256(docroot / "one.bin")
    job = the_only_job(home)
    assert (job.max_rate, job.state) == (400_000, S.ACKNOWLEDGED)
    assert limited > 2.0
    dest.unlink()
    assert timed_get() < limited / 2  # the limit, not the machine, set the time above
    assert main(["--home", str(home), "get", "--max-rate", "fast", "x", str(dest)], io.StringIO())


def left_by(
    verb: str, home: Path, remote: str, local: Path, kind: JobType = JobType.DOWNLOAD
) -> str:
    """The job a `get` or `put` (``verb``) killed before it ran leaves: described as that
    command describes its jobs, its file added, SUSPENDED. Its id."""
    with TransferManager(home=home) as manager:
        left = manager.create_job(f"an earlier {verb}", kind)
        left.description = _made_by(verb)
        left.add_file(remote, str(local))
        return left.id


def the_only_job(home: Path) -> Job:
    """The one job of the store (final or not), as it stands now."""
    with TransferManager(home=home) as manager:
        (job,) = manager.jobs(include_final=True)
        return job.snapshot()


@contextlib.contextmanager
def sigint_at_default() -> Iterator[None]:
    """Children started in this block take SIGINT at its default (as a terminal's foreground
    job does). A shell without job control that starts the suite in the background
    (`bash .ci/test &`) makes it ignore SIGINT, every child inherits that, and `get` keeps an
    inherited SIG_IGN (nohup's contract): a Ctrl-C test would then test nothing."""
    before = signal.getsignal(signal.SIGINT)
    if before is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # exec resets it to SIG_DFL
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def slow_get_past_a_checkpoint(
    home: Path, env: dict[str, str], url: str, dest: Path, *, as_json: bool = False
) -> subprocess.Popen[bytes]:
    """A `backhaul get --max-rate 512K` process, once the log holds a checkpoint of its job
    (with ``as_json``, `--json`, its stdout a pipe). The first checkpoint comes about a
    second in, so the 3 MiB file leaves about 5 s to act on the running get: at 1M a second the
    2 s left were sometimes used up on a loaded machine, and the get ended on its own."""
    shown = "--json" if as_json else "-q"
    with sigint_at_default():
        proc = subprocess.Popen(
            [
                str(BACKHAUL),
                "--home",
                str(home),
                "get",
                shown,
                "--max-rate",
                "512K",
                url,
                str(dest),
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if as_json else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
    try:
        with TransferManager(home=home) as manager:

            def kept() -> int:
                jobs = list(manager.jobs())  # files come after the job: maybe none yet
                return sum(f.bytes_transferred for j in jobs for f in j.snapshot().files)

            wait(lambda: kept() > 0, "a checkpoint of the first get")
    except BaseException:
        proc.kill()
        proc.wait(10)
        raise
    return proc


def ended_after(proc: subprocess.Popen[bytes], act: Callable[[], object], timeout: float) -> str:
    """Do ``act`` to a running command, then wait for it to end: its stderr. A command
    still running after ``timeout`` is killed (and the test fails on the wait)."""
    try:
        act()
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return err.decode()


def test_a_rerun_of_a_killed_get_picks_up_its_job_from_the_last_checkpoint(
    tmp_path: Path,
    home: Path,
    env: dict[str, str],
    engine_nginx: tuple[NginxServer, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """As `wget -c` or aria2c resume: `get` killed (SIGKILL) mid-transfer, then the same
    `get` again: it runs the job the first left, asking nginx for the bytes after the last
    checkpoint only (Range), with this run's options (no --max-rate: no limit); one job,
    the file byte-identical, no temp file left."""
    server, docroot = engine_nginx
    dest = tmp_path / "three.bin"
    url = f"{server.url}/three.bin"

    def requests_for_it() -> list[dict[str, str]]:
        return [r for r in server.access_lines() if r["request"].startswith("GET /three.bin ")]

    earlier = len(requests_for_it())  # the nginx is shared by the session's tests
    first = slow_get_past_a_checkpoint(home, env, url, dest)
    first.kill()
    first.wait(10)
    with TransferManager(home=home) as manager:
        (job,) = manager.jobs()
        resume_at = checkpointed(job)
        assert (
            job.state is not S.TRANSFERRED
            and 0 < resume_at < (docroot / "three.bin").stat().st_size
        )
    # nginx logs the killed request once it notices the closed connection: wait for it
    wait(lambda: len(requests_for_it()) == earlier + 1, "nginx to log the killed request")

    assert main(["--home", str(home), "get", url, str(dest)], io.StringIO()) == 0

    assert f"picking up job {job.id}" in capsys.readouterr().err
    assert sha256(dest) == sha256(docroot / "three.bin")
    assert list(tmp_path.glob(".*.bhtmp")) == []
    done = the_only_job(home)
    assert (done.id, done.state, done.max_rate) == (job.id, S.ACKNOWLEDGED, None)
    (request,) = requests_for_it()[earlier + 1 :]
    assert request["http_range"] == f"bytes={resume_at}-", request
    size = (docroot / "three.bin").stat().st_size
    assert int(request["body_bytes_sent"]) == size - resume_at


@pytest.mark.parametrize(
    ("stop", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)]
)
def test_an_interrupted_get_suspends_its_job_and_the_next_get_finishes_it(
    tmp_path: Path,
    home: Path,
    env: dict[str, str],
    engine_nginx: tuple[NginxServer, Path],
    stop: signal.Signals,
    code: int,
) -> None:
    """Ctrl-C (SIGINT) on `get`, and SIGTERM (`kill`, `timeout`) or SIGHUP (a closed
    terminal) alike: exit 128 + the signal, the job SUSPENDED with every byte its temp file
    holds claimed (the engine stopped cleanly: not a kill, which loses what came since the
    last checkpoint), nothing cancelled, and the message says how to go on; the same `get`
    then completes that job."""
    server, docroot = engine_nginx
    dest = tmp_path / "three.bin"
    url = f"{server.url}/three.bin"
    first = slow_get_past_a_checkpoint(home, env, url, dest)
    err = ended_after(first, lambda: first.send_signal(stop), 30)
    assert first.returncode == code, err
    with TransferManager(home=home) as manager:
        (job,) = manager.jobs()
        assert job.state is S.SUSPENDED and checkpointed(job) > 0
        (temp,) = tmp_path.glob(".*.bhtmp")
        assert checkpointed(job) == temp.stat().st_size
        job_id = job.id
    assert f"job {job_id} suspended" in err

    assert main(["--home", str(home), "get", "-q", url, str(dest)], io.StringIO()) == 0
    assert sha256(dest) == sha256(docroot / "three.bin")
    done = the_only_job(home)
    assert (done.id, done.state) == (job_id, S.ACKNOWLEDGED)


def test_an_interrupted_get_json_ends_with_a_line_of_its_suspended_job(
    tmp_path: Path, home: Path, env: dict[str, str], engine_nginx: tuple[NginxServer, Path]
) -> None:
    """`get --json` stopped by Ctrl-C: the last line on stdout said TRANSFERRING (the
    suspension was told on stderr only). It now ends with the job's line, SUSPENDED."""
    server, _ = engine_nginx
    proc = slow_get_past_a_checkpoint(
        home, env, f"{server.url}/three.bin", tmp_path / "three.bin", as_json=True
    )
    try:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    last = json.loads(out.decode().splitlines()[-1])
    assert last["state"] == "SUSPENDED"
    assert last["bytes_transferred"] > 0 and last["files_total"] == 1


def test_get_whose_complete_fails_says_so_on_a_line_of_its_own_and_keeps_the_job(
    tmp_path: Path, home: Path, env: dict[str, str], engine_nginx: tuple[NginxServer, Path]
) -> None:
    """A directory made at the destination's name while the file came: Complete's rename
    fails, and as in BITS the job stays TRANSFERRED for another Complete or a Cancel. `get`
    says so after the bar, on its own line, and exits 1."""
    server, _ = engine_nginx
    dest = tmp_path / "f"
    first = slow_get_past_a_checkpoint(home, env, f"{server.url}/three.bin", dest)
    err = ended_after(first, dest.mkdir, 30)
    assert first.returncode == 1, err
    job = the_only_job(home)
    lines = err.replace("\r", "\n").splitlines()
    assert any(line.startswith("backhaul get: Complete failed: cannot publish ") for line in lines)
    assert f"job {job.id} stays TRANSFERRED: `backhaul complete {job.id}` tries again" in lines[-1]
    assert job.state is S.TRANSFERRED


def test_get_max_time_ends_a_slow_download_with_maxdownload_timeout(
    tmp_path: Path,
    home: Path,
    engine_nginx: tuple[NginxServer, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """curl's -m: MaximumDownloadTime, counted while connecting and transferring."""
    server, _ = engine_nginx
    dest = tmp_path / "f"
    argv = ["--home", str(home), "get", "-q", "--max-time", "1", "--max-rate", "1M"]
    started = time.monotonic()
    assert main([*argv, f"{server.url}/three.bin", str(dest)], io.StringIO()) == 1
    assert 1.0 <= time.monotonic() - started < 10
    assert "ended in ERROR: BG_E_MAXDOWNLOAD_TIMEOUT (0x80200054)" in capsys.readouterr().err
    assert not dest.exists()


def test_get_whose_job_another_command_cancels_says_so_and_exits_3(
    tmp_path: Path, home: Path, env: dict[str, str], engine_nginx: tuple[NginxServer, Path]
) -> None:
    """`backhaul cancel` (or the application) cancels the job a `get` runs: the `get` ends
    with exit status 3 and a line that says what happened, not silently."""
    server, _ = engine_nginx
    dest = tmp_path / "f"
    first = slow_get_past_a_checkpoint(home, env, f"{server.url}/three.bin", dest)
    job = the_only_job(home)

    def cancel() -> None:
        assert main(["--home", str(home), "cancel", job.id], io.StringIO()) == 0

    err = ended_after(first, cancel, 30)
    assert first.returncode == 3, err
    lines = err.replace("\r", "\n").splitlines()
    assert lines[-1] == (
        f"backhaul get: job {job.id} was cancelled by another command or application"
    )
    assert not dest.exists() and not list(tmp_path.glob(".*.bhtmp"))


def test_get_picks_up_only_a_get_of_the_same_files_and_new_starts_over(
    tmp_path: Path, home: Path, engine_nginx: tuple[NginxServer, Path]
) -> None:
    """An unfinished job is picked up only by a `get` of the same files and of what shapes
    them (the digest); a job made through the API (or `create`) with those files is never
    taken, and `--new` cancels the one it would take (a later plain run picked the old job
    up and published it over the new files) and makes a job of its own."""
    server, docroot = engine_nginx
    url, dest = f"{server.url}/one.bin", tmp_path / "one.bin"
    with TransferManager(home=home) as manager:
        theirs = manager.create_job("an application's")
        theirs.add_file(url, str(dest))  # suspended, never resumed
    left_id = left_by("get", home, url, dest)
    ids = {theirs.id, left_id}

    def get(*options: str) -> set[str]:
        argv = ["--home", str(home), "get", "-q", *options, url, str(dest)]
        assert main(argv, io.StringIO()) == 0
        with TransferManager(home=home) as manager:
            jobs = manager.jobs(include_final=True)
            return {j.id for j in jobs if j.state is S.ACKNOWLEDGED}

    digest = hashlib.sha256((docroot / "one.bin").read_bytes()).hexdigest()
    assert len(get("--sha256", digest) - ids) == 1  # another digest: not the same files
    assert get() & ids == {left_id}  # picked up
    again = left_by("get", home, url, dest)
    temp = localfile.temp_path(again, 0, str(dest))
    temp.write_bytes(b"an earlier run's bytes")
    assert again not in get("--new")
    assert not temp.exists()
    with TransferManager(home=home) as manager:
        states = {j.id: j.state for j in manager.jobs(include_final=True)}
        assert states[again] is S.CANCELLED
        assert len(states) == 5
        assert manager.get_job(theirs.id).state is S.SUSPENDED


def test_a_picked_up_get_takes_the_signature_given_now(
    tmp_path: Path, home: Path, engine_nginx: tuple[NginxServer, Path]
) -> None:
    """The earlier `get`'s signed URL may have expired: the rerun's own signature (sealed,
    as any) is what nginx sees, on the same job."""
    server, docroot = engine_nginx
    url, dest = f"{server.url}/one.bin", tmp_path / "one.bin"
    left_id = left_by("get", home, f"{url}?sig=expired0", dest)
    before = len(server.access_lines())

    assert (
        main(["--home", str(home), "get", "-q", f"{url}?sig=fresh1", str(dest)], io.StringIO()) == 0
    )

    assert sha256(dest) == sha256(docroot / "one.bin")
    (request,) = server.access_lines()[before:]
    assert request["request"].startswith("GET /one.bin?sig=fresh1 "), request
    job = the_only_job(home)
    assert (job.id, job.state) == (left_id, S.ACKNOWLEDGED)


def test_get_of_several_urls_into_a_directory(
    tmp_path: Path, home: Path, engine_nginx: tuple[NginxServer, Path]
) -> None:
    """Each file is named as wget names it: the last segment of the URL's path, decoded,
    without a query (a signature) or a fragment."""
    server, docroot = engine_nginx
    urls = [
        f"{server.url}/one.bin?sig=abc&x=1",
        f"{server.url}/two.bin#part",
        f"{server.url}/%74hree.bin",
    ]
    dest = tmp_path / "into"
    dest.mkdir()

    assert main(["--home", str(home), "get", *urls, str(dest), "--quiet"]) == 0

    assert sorted(p.name for p in dest.iterdir()) == ["one.bin", "three.bin", "two.bin"]
    for name in ("one.bin", "two.bin", "three.bin"):
        assert sha256(dest / name) == sha256(docroot / name)


def test_get_to_a_name_of_255_bytes_works_and_one_of_256_is_refused_at_once(
    tmp_path: Path,
    home: Path,
    engine_nginx: tuple[NginxServer, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A file name may have 255 bytes: before, the temp name beside it (".<name>.<job16>-0
    .bhtmp") could not be created, so the job failed with E_FAIL after connecting. One of
    256 bytes can never be created: AddFile refuses it with ERROR_FILENAME_EXCED_RANGE, before
    any transfer, where looking the name up raised a traceback."""
    server, docroot = engine_nginx
    dest = tmp_path / "dest"
    dest.mkdir()
    longest = dest / ("é" * 125 + "a" * 5)  # 255 bytes
    assert main(["--home", str(home), "get", f"{server.url}/two.bin", str(longest), "-q"]) == 0
    assert sha256(longest) == sha256(docroot / "two.bin")
    assert list(dest.iterdir()) == [longest]  # no temp file left
    too_long = dest / ("é" * 125 + "a" * 6)
    for local in (too_long, too_long / "x.bin"):
        argv = ["--home", str(home), "get", f"{server.url}/two.bin", str(local), "-q"]
        assert main(argv, io.StringIO()) == 1
        err = capsys.readouterr().err
        assert err.startswith("backhaul get: the name ") and err.endswith(
            "is 256 bytes; a directory entry holds at most 255 "
            "[HRESULT_FROM_WIN32(ERROR_FILENAME_EXCED_RANGE) 0x800700CE]\n"
        )
    assert list(dest.iterdir()) == [longest]
    with TransferManager(home=home) as manager:  # the refused ones' jobs, with no file
        states = sorted(j.state.name for j in manager.jobs(include_final=True))
        assert states == ["ACKNOWLEDGED", "CANCELLED", "CANCELLED"]


def test_get_to_dev_null_or_a_symbolic_link_is_refused_and_leaves_them_alone(
    tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """curl -o /dev/null is common; here Complete would rename a regular file over the
    device (as root), and over /dev/stdout's link. Refused before any transfer."""
    target = tmp_path / "target.bin"
    target.write_bytes(b"kept")
    link = tmp_path / "link.bin"
    link.symlink_to(target)
    for local, kind in (("/dev/null", "a character device"), (str(link), "a symbolic link")):
        assert main(["--home", str(home), "get", "http://127.0.0.1:9/f", local, "-q"]) == 1
        assert f"backhaul get: {local} is {kind}" in capsys.readouterr().err
    assert stat.S_ISCHR(os.lstat("/dev/null").st_mode)
    assert link.is_symlink() and target.read_bytes() == b"kept"


def test_get_refuses_a_custom_range_header_before_making_a_job(
    tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--home", str(home), "get", "-H", "Range: bytes=0-99", "http://127.0.0.1:9/f"]
    assert main([*argv, str(tmp_path / "f")], io.StringIO()) == 1
    assert "backhaul get: Range is set by backhaul itself" in capsys.readouterr().err
    with TransferManager(home=home) as manager:
        assert list(manager.jobs(include_final=True)) == []


def test_the_names_get_gives_urls_in_a_directory() -> None:
    assert _name_from_url("http://h/d/a%20b.txt?token=1") == "a b.txt"
    assert _name_from_url("http://h/d/") == "index.html"  # a directory's URL
    assert _name_from_url("http://h") == "index.html"
    assert _name_from_url("http://h/d/..") == "index.html"
    assert _name_from_url("http://h/a%2Fb.bin") == "a%2Fb.bin"  # no directory from a slash
    # Not UTF-8: kept as written (curl -O), not U+FFFD, which made a%FEb and a%FFb one name.
    assert _name_from_url("http://h/a%FFb") == "a%FFb"
    assert _name_from_url("http://h/a%FEb") == "a%FEb"


def test_get_of_a_missing_file_fails_and_cancels_the_job(
    tmp_path: Path, home: Path, engine_nginx: tuple[NginxServer, Path]
) -> None:
    server, _ = engine_nginx
    dest = tmp_path / "dest"
    dest.mkdir()

    out = io.StringIO()
    argv = ["--home", str(home), "get", "--json", f"{server.url}/missing.bin", str(dest / "m")]
    code = main(argv, out)

    assert code == 1
    assert the_job(home).state is S.CANCELLED
    assert list(dest.iterdir()) == []
    # The last line's error is the object every line (and `info --json`) gives, not a string;
    # its state is the job's at the end, with the progress lines' fields.
    last = json.loads(out.getvalue().splitlines()[-1])
    assert last["state"] == "CANCELLED"
    assert last["error"]["name"] == "BG_E_HTTP_ERROR_404"
    assert last["error"]["context"] == "REMOTE_FILE"
    assert last["files_total"] == 1 and last["files_transferred"] == 0


def test_get_of_several_urls_keeps_the_files_that_arrived_when_one_fails(
    tmp_path: Path,
    home: Path,
    engine_nginx: tuple[NginxServer, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """curl and wget keep every URL that succeeded: a 404 on the last of three URLs
    cancelled the job and deleted the two files that had arrived whole. `get` completes
    the job instead (BG_S_PARTIAL_COMPLETE: those files published, the rest deleted), says
    which it kept, and still exits 1."""
    server, docroot = engine_nginx
    dest = tmp_path / "dest"
    dest.mkdir()
    urls = [f"{server.url}/one.bin", f"{server.url}/two.bin", f"{server.url}/missing.bin"]
    out = io.StringIO()
    assert main(["--home", str(home), "get", "--json", *urls, str(dest)], out) == 1
    assert sorted(p.name for p in dest.iterdir()) == ["one.bin", "two.bin"]
    for name in ("one.bin", "two.bin"):
        assert (dest / name).read_bytes() == (docroot / name).read_bytes()
    assert the_job(home).state is S.ACKNOWLEDGED
    last = json.loads(out.getvalue().splitlines()[-1])
    assert last["state"] == "ACKNOWLEDGED"
    assert last["error"]["name"] == "BG_E_HTTP_ERROR_404"
    assert last["files_transferred"] == 2 and last["files_total"] == 3
    assert f"kept, complete: {dest / 'one.bin'}, {dest / 'two.bin'}" in capsys.readouterr().err


def test_get_names_a_job_of_a_long_url_within_the_display_names_limit(
    tmp_path: Path, home: Path, engine_nginx: tuple[NginxServer, Path]
) -> None:
    """A URL over about 250 characters (BITS takes 2,200) was refused: the job's default
    name, "get URL", passed the 256 characters of a display name."""
    server, docroot = engine_nginx
    name = "n" * 240 + ".bin"
    (docroot / name).write_bytes(b"long")
    assert (
        main(["--home", str(home), "get", "-q", f"{server.url}/{name}", str(tmp_path / "l")]) == 0
    )
    assert (tmp_path / "l").read_bytes() == b"long"
    job = the_job(home)
    assert len(job.display_name) == 256 and job.display_name.endswith("...")


@pytest.mark.parametrize("as_json", [False, True])
def test_get_says_why_it_waits_after_a_transient_error_and_when_it_tries_again(
    tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str], as_json: bool
) -> None:
    """A 503 with Retry-After: the bar alone would only show TRANSIENT_ERROR. `get` says
    once what failed and when it tries again (a line on stderr; with --json, the progress
    lines carry the error, the reason and the time), then finishes the file."""
    data = os.urandom(96 * KiB)
    served = Served(data, statuses=[503], retry_after="6")  # past the 5 s floor of the delay
    with FaultServer({"/f": served}).threaded() as srv:
        dest = tmp_path / "f"
        json_ = ["--json"] if as_json else []
        argv = ["--home", str(home), "get", "--retry-delay", "5", *json_, srv.url("/f")]
        out = io.StringIO()
        assert main([*argv, str(dest)], out) == 0
    assert dest.read_bytes() == data
    err = capsys.readouterr().err
    if not as_json:
        (said,) = [line for line in err.splitlines() if line.startswith("transient error:")]
        assert "[BG_E_HTTP_ERROR_503 0x801901F7]" in said, said
        assert "the server asked to retry later (Retry-After) at " in said, said
        return
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    waiting = [line for line in lines if line["state"] == "TRANSIENT_ERROR"]
    assert waiting, lines
    assert waiting[0]["error"]["name"] == "BG_E_HTTP_ERROR_503"
    assert waiting[0]["error"]["context"] == "REMOTE_FILE"
    assert waiting[0]["waiting"] == "the server asked to retry later (Retry-After)"
    assert datetime.fromisoformat(waiting[0]["next_try"]) > datetime.now(UTC) - timedelta(
        seconds=30
    )
    assert lines[-2]["state"] == "TRANSFERRED" and "error" not in lines[-2]
    assert {line["id"] for line in lines} == {lines[-1]["id"]}  # every line names the job
    assert lines[-1]["state"] == "ACKNOWLEDGED"  # then Complete's result
    assert "transient error:" not in err


def test_get_refuses_a_bad_sha256_and_stdout_before_making_a_job(
    tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused before a job is made, as a bad command line: exit 2, as argparse's own."""
    argv = ["--home", str(home), "get", "http://127.0.0.1:9/f", "-"]
    assert main(argv, io.StringIO()) == 2  # curl's stdout: a job's files are files
    assert "get writes files, not standard output" in capsys.readouterr().err
    argv = ["--home", str(home), "get", "--user", ":pw", "http://127.0.0.1:9/f", str(tmp_path)]
    assert main(argv, io.StringIO()) == 2
    assert "--user wants USER or USER:PASSWORD" in capsys.readouterr().err
    for argv in (
        ["get", "http://127.0.0.1:9/f"],
        ["get", "-r", "abc", "http://127.0.0.1:9/f", str(tmp_path)],
        ["get", "--retry-delay", "nan", "http://127.0.0.1:9/f", str(tmp_path)],
        ["get", "--max-time", "-1", "http://127.0.0.1:9/f", str(tmp_path)],
        ["transfer", "t", "http://127.0.0.1:9/f"],
        ["monitor", "--count", "1", "--interval", "-1"],
        ["monitor", "--count", "1", "--interval", "nan"],
    ):
        assert main(["--home", str(home), *argv], io.StringIO()) == 2, argv
        assert "Traceback" not in capsys.readouterr().err
    for bad in ("abc", "g" * 64, "0" * 63):
        argv = ["--home", str(home), "get", "--sha256", bad, "http://127.0.0.1:9/f", str(tmp_path)]
        assert main(argv, io.StringIO()) == 2
        assert capsys.readouterr().err == (
            "backhaul get: --sha256 wants the 64 hex digits of a SHA-256 [E_INVALIDARG 0x80070057]\n"
        )
    with TransferManager(home=home) as manager:
        assert list(manager.jobs(include_final=True)) == []


def test_get_and_addfile_take_paths_as_the_shell_means_them(
    tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``../x`` is the parent's x (it was refused: the core takes no . or ..); a DEST that
    ends in / is a directory (it became a file of that name, over one that was there); curl
    and wget mean the same."""
    data = os.urandom(4 * KiB)
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "precious.txt").write_bytes(b"precious")
    monkeypatch.chdir(work)
    with FaultServer({"/f.bin": Served(data)}).threaded() as srv:
        get = ["--home", str(home), "get", "-q", srv.url("/f.bin")]
        assert main([*get, "../up.bin"], io.StringIO()) == 0
        assert (tmp_path / "up.bin").read_bytes() == data
        assert main([*get, "../"], io.StringIO()) == 0  # into the parent, under the URL's name
        assert (tmp_path / "f.bin").read_bytes() == data
        # Refused before a job is made: a command line the verb cannot take (exit 2).
        assert main([*get, "../precious.txt/"], io.StringIO()) == 2
        assert f"{tmp_path}/precious.txt/ is not a directory" in capsys.readouterr().err
        assert main([*get, "newdir/"], io.StringIO()) == 2
        assert not (work / "newdir").exists()
        created = io.StringIO()
        assert main(["--home", str(home), "create", "files"], created) == 0
        job = created.getvalue().strip()
        add = ["--home", str(home), "addfile", job, srv.url("/f.bin")]
        assert main([*add, "../sub/../added.bin"], io.StringIO()) == 0
        assert main([*add, "x/"], io.StringIO()) == 1
    assert (tmp_path / "precious.txt").read_bytes() == b"precious"
    with TransferManager(home=home) as manager:
        names = [f.local_name for f in manager.get_job(job).files()]
    assert names == [str(tmp_path / "added.bin")]


def test_get_of_content_without_a_size_names_dynamic_and_dynamic_fetches_it(
    tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A chunked answer has no size: BITS fails the job (BG_E_MISSING_FILE_SIZE) unless it
    has the DYNAMIC_CONTENT property; the message names the option that sets it, and
    `get --dynamic` fetches the content, no temp file left either time."""
    data = os.urandom(40 * KiB)
    with FaultServer(
        {"/gen": Served(data, etag=None, ranges=False, length=False)}
    ).threaded() as srv:
        dest = tmp_path / "gen.out"
        get = ["--home", str(home), "get", "-q", srv.url("/gen"), str(dest)]
        assert main(get, io.StringIO()) == 1
        err = capsys.readouterr().err
        assert "BG_E_MISSING_FILE_SIZE (0x80200011)" in err and "(backhaul get --dynamic)" in err
        assert list(tmp_path.iterdir()) == [home]
        assert main([*get, "--dynamic"], io.StringIO()) == 0
    assert dest.read_bytes() == data
    assert sorted(tmp_path.iterdir()) == sorted([home, dest])


def test_get_follows_the_job_when_another_engine_holds_the_lock(
    tmp_path: Path, home: Path, env: dict[str, str], engine_nginx: tuple[NginxServer, Path]
) -> None:
    server, docroot = engine_nginx
    dest = tmp_path / "one.bin"
    with serve_lock(home / LOCK_FILE) as held:
        assert held
        get = subprocess.Popen(
            [str(BACKHAUL), "--home", str(home), "get", f"{server.url}/one.bin", str(dest), "-q"],
            env=env,
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            wait(lambda: len(all_jobs(home)) == 1, "get to create its job")
            job = the_job(home)
            wait(lambda: job.state is S.QUEUED, "the job to be queued")
            time.sleep(0.5)
            assert job.state is S.QUEUED  # get runs no engine of its own
            assert get.poll() is None
            # The lock holder's engine runs the job; get sees it transferred and completes it.
            with TransferManager(home=home) as manager:
                asyncio.run(make_engine(manager, store_lock=held).run(until_idle=True))
            _, err = get.communicate(timeout=15)
        finally:
            if get.poll() is None:
                get.kill()
                get.wait(10)
    assert get.returncode == 0, err.decode()
    assert the_job(home).state is S.ACKNOWLEDGED
    assert sha256(dest) == sha256(docroot / "one.bin")


# =================================================================================================
# serve
# =================================================================================================


def test_version_prints_the_installed_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"backhaul {version('backhaul')}\n"


@pytest.mark.parametrize("verb", [["list"], ["info", "job"], ["audit", "export"]])
def test_a_reader_that_left_ends_the_command_quietly_with_sigpipes_status(
    home: Path, env: dict[str, str], verb: list[str]
) -> None:
    """`backhaul list | head -1`: once the reader has gone, the command stops without a
    traceback (a BrokenPipeError before), with status 141 as cat would have."""
    with TransferManager(home=home) as m:
        m.create_job("job")
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first byte
    try:
        done = subprocess.run(
            [str(BACKHAUL), "--home", str(home), *verb],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=write,
            stderr=subprocess.PIPE,
            timeout=30,
            check=False,
        )
    finally:
        os.close(write)
    assert (done.returncode, done.stderr.decode()) == (141, "")


def test_the_engine_lock_belongs_to_the_store_not_the_home(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two homes naming one SQLite store (``--store``) share its engine lock: the lock was
    the home's, so two engines ran one store and fought over its jobs. Two stores in one
    home each have their own."""
    store = tmp_path / "shared" / "jobs.db"
    argv = ["--store", str(store), "serve", "--until-idle"]
    with serve_lock(store.with_name("jobs.db" + LOCK_SUFFIX)) as held:
        assert held
        assert main(["--home", str(tmp_path / "a"), *argv]) == 1
        assert main(["--home", str(tmp_path / "b"), *argv]) == 1
        other = ["--store", str(tmp_path / "shared" / "other.db"), "serve", "--until-idle"]
        assert main(["--home", str(tmp_path / "a"), *other]) == 0
    assert capsys.readouterr().err.count("another engine already runs") == 2
    assert main(["--home", str(tmp_path / "b"), *argv]) == 0


def test_serve_refuses_to_start_while_another_engine_holds_the_lock(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with serve_lock(home / LOCK_FILE) as held:
        assert held
        assert main(["--home", str(home), "serve", "--until-idle"]) == 1
    assert "another engine already runs" in capsys.readouterr().err
    assert main(["--home", str(home), "serve", "--until-idle"]) == 0  # the lock is free again
    # Its log's handler is taken down with it: a later command in this process (or a test)
    # must not write to the stderr this one had.
    assert logging.getLogger("backhaul").handlers == []


def test_get_next_to_a_running_serve_completes_and_serve_stops_on_sigterm(
    tmp_path: Path,
    home: Path,
    env: dict[str, str],
    serve: Callable[..., subprocess.Popen[bytes]],
    engine_nginx: tuple[NginxServer, Path],
) -> None:
    server, docroot = engine_nginx
    daemon = serve("--poll", "0.05")
    dest = tmp_path / "three.bin"

    get = subprocess.run(
        [str(BACKHAUL), "--home", str(home), "get", f"{server.url}/three.bin", str(dest), "-q"],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
        check=False,
    )

    assert get.returncode == 0, get.stderr.decode()
    assert sha256(dest) == sha256(docroot / "three.bin")
    assert the_job(home).state is S.ACKNOWLEDGED
    assert daemon.poll() is None  # still serving
    daemon.send_signal(signal.SIGTERM)
    _, err = daemon.communicate(timeout=15)
    assert daemon.returncode == 0, err.decode()


@pytest.mark.parametrize("quiet", [False, True])
def test_serve_logs_a_line_when_a_job_transfers_fails_or_ends(
    tmp_path: Path,
    home: Path,
    env: dict[str, str],
    serve: Callable[..., subprocess.Popen[bytes]],
    engine_nginx: tuple[NginxServer, Path],
    quiet: bool,
) -> None:
    """An operator reads what serve did: a line, with its time, when a job transfers, fails
    for good or for now (with its next try), is cancelled or completed; --quiet: none."""
    server, _ = engine_nginx
    with TransferManager(home=home) as m:
        ok = new_job(m, [(f"{server.url}/one.bin", tmp_path / "one.bin")], name="ok")
        gone = new_job(m, [(f"{server.url}/missing.bin", tmp_path / "m.bin")], name="gone")
        down = new_job(m, [("http://127.0.0.1:9/x", tmp_path / "x.bin")], name="down")
        daemon = serve("--poll", "0.05", *(["--quiet"] if quiet else []))
        wait(lambda: ok.state is S.TRANSFERRED and down.state is S.TRANSIENT_ERROR, "the runs")
        wait(lambda: gone.state is S.ERROR, "the 404")
        ok.complete()
        down.cancel()
        time.sleep(0.5)  # serve reads the client's events within its poll
    daemon.send_signal(signal.SIGTERM)
    _, raw = daemon.communicate(timeout=15)
    lines = [line for line in raw.decode().splitlines() if '"' in line]
    if quiet:
        assert lines == []
        return
    said = {line.split('"')[1]: [] for line in lines}
    for line in lines:
        assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} backhaul serve: job ", line)
        said[line.split('"')[1]].append(line.split('": ', 1)[1])
    assert said["ok"] == ["TRANSFERRED, 1 file(s), 1048576 byte(s)", "ACKNOWLEDGED"]
    assert said["gone"] == [
        f"ERROR: HTTP 404 Not Found from {server.url}/missing.bin [BG_E_HTTP_ERROR_404 "
        "0x80190194] (REMOTE_FILE, file 0)"
    ]
    assert said["down"][0].startswith("transient error: cannot connect to 127.0.0.1:9 ")
    assert (
        "[BG_E_CONNECT_FAILURE 0x8020002D] (GENERAL_TRANSPORT, file 0); next try at "
        in (said["down"][0])
    )
    assert said["down"][1:] == ["CANCELLED"]


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP])
def test_a_get_that_follows_a_serve_runs_its_job_itself_once_that_serve_stops(
    tmp_path: Path,
    home: Path,
    env: dict[str, str],
    serve: Callable[..., subprocess.Popen[bytes]],
    engine_nginx: tuple[NginxServer, Path],
    stop: signal.Signals,
) -> None:
    """`get` next to a running engine follows it; when that engine stops first (serve
    stopped, or another get whose own job is done), the get takes the store's lock and
    finishes its job from where the stopped engine left it, instead of waiting forever.
    serve stops cleanly (exit 0) on SIGHUP as on SIGTERM."""
    server, docroot = engine_nginx
    daemon = serve("--poll", "0.05")
    dest = tmp_path / "three.bin"
    url = f"{server.url}/three.bin"
    before = len(server.access_lines())
    get = slow_get_past_a_checkpoint(home, env, url, dest)  # checkpointed by serve

    def stop_serve() -> None:
        daemon.send_signal(stop)
        assert daemon.wait(15) == 0

    err = ended_after(get, stop_serve, 60)
    assert get.returncode == 0, err
    assert sha256(dest) == sha256(docroot / "three.bin")
    assert the_job(home).state is S.ACKNOWLEDGED
    # the get resumed where serve stopped (nginx is shared: other tests' lines may follow)
    ranges = [
        r["http_range"]
        for r in server.access_lines()[before:]
        if r["request"].startswith("GET /three.bin ")
    ]
    assert "" in ranges and any(r.startswith("bytes=") for r in ranges), ranges


def test_serve_and_get_under_nohup_keep_running_on_sighup(
    tmp_path: Path, home: Path, env: dict[str, str], engine_nginx: tuple[NginxServer, Path]
) -> None:
    """A SIGHUP the caller ignores (nohup) stays ignored: serve and a get started that way
    outlive their terminal; SIGTERM still stops them cleanly."""
    server, docroot = engine_nginx

    def ignoring_hup(*argv: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [str(BACKHAUL), "--home", str(home), *argv],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),
        )

    daemon = ignoring_hup("serve", "--poll", "0.05")
    lock = home / LOCK_FILE

    def hang_up_then_terminate() -> None:
        wait(lambda: lock.exists() and lock.read_text() == str(daemon.pid), "serve's lock")
        daemon.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert daemon.poll() is None
        daemon.send_signal(signal.SIGTERM)

    err = ended_after(daemon, hang_up_then_terminate, 15)
    assert daemon.returncode == 0, err
    dest = tmp_path / "three.bin"
    get = ignoring_hup("get", "-q", "--max-rate", "2M", f"{server.url}/three.bin", str(dest))

    def hang_up() -> None:
        time.sleep(0.5)
        get.send_signal(signal.SIGHUP)

    err = ended_after(get, hang_up, 30)
    assert get.returncode == 0, err
    assert sha256(dest) == sha256(docroot / "three.bin")


def test_a_killed_serve_leaves_a_job_the_next_engine_resumes_from_its_last_checkpoint(
    tmp_path: Path, home: Path, serve: Callable[..., subprocess.Popen[bytes]]
) -> None:
    data = os.urandom(2 * MiB)
    with FaultServer({"/f": trickle(data, delay=0.015)}).threaded() as srv:
        manager = TransferManager(home=home)
        # FOREGROUND: the daemon's background jobs would yield to the machine's other traffic.
        job = new_job(manager, [(srv.url("/f"), tmp_path / "f")], priority=JobPriority.FOREGROUND)
        daemon = serve("--poll", "0.05")
        wait(lambda: checkpointed(job) >= 64 * KiB, "a checkpoint by serve")
        daemon.kill()  # SIGKILL: no shutdown, the job is left TRANSFERRING
        daemon.wait(10)
        assert job.state is S.TRANSFERRING
        kept = checkpointed(job)
        assert temp_of(job, 0).stat().st_size >= kept
        start = len(events_of(manager, job.id))

        asyncio.run(make_engine(manager).run(until_idle=True))

        assert job.state is S.TRANSFERRED
        assert isinstance(events_of(manager, job.id)[start], ev.SliceEnded)  # its turn was over
        assert srv.hits[-1].range_start == kept
        assert srv.hits[-1].if_range == '"v1"'
    job.complete()
    assert (tmp_path / "f").read_bytes() == data


def test_the_progress_a_display_sees_never_goes_back_and_knows_the_size_early(
    tmp_path: Path,
) -> None:
    """What `get`'s bar adds up: the engine's current copy plus ``live_progress`` and
    ``live_sizes``. A finished file's bytes stay counted until its FileTransferred is logged
    (they used to drop to the last checkpoint meanwhile), and a file's size shows from its
    response on, not from its first checkpoint. No checkpoint is made here (60 s interval):
    one file is held in memory, the other written to its temp file."""
    small, large = os.urandom(192 * KiB), os.urandom(512 * KiB)
    manager = TransferManager(home=tmp_path / "home")
    seen: list[tuple[int, int | None]] = []
    states: list[tuple[int, S]] = []

    async def main() -> TransferJob:
        async with FaultServer({"/s": trickle(small), "/l": trickle(large)}) as srv:
            job = new_job(
                manager, [(srv.url("/s"), tmp_path / "s"), (srv.url("/l"), tmp_path / "l")]
            )
            engine = make_engine(manager, checkpoint_interval=60.0)
            task = asyncio.create_task(engine.run(until_idle=True))
            while not task.done():
                snap = engine.current(job.id)
                if snap is not None:
                    done, total = 0, 0
                    for i, f in enumerate(snap.files):
                        live = engine.live_progress.get((job.id, i), 0)
                        done += f.bytes_transferred + max(live - f.bytes_transferred, 0)
                        size = f.bytes_total
                        size = engine.live_sizes.get((job.id, i)) if size is None else size
                        total = None if size is None or total is None else total + size
                    seen.append((done, total))
                    states.append((done, snap.state))
                await asyncio.sleep(0)
            await task
            assert not engine.live_progress and not engine.live_sizes  # nothing kept after
            return job

    job = asyncio.run(main())
    assert job.state is S.TRANSFERRED
    everything = len(small) + len(large)
    # bytes flowing show as TRANSFERRING at once, not CONNECTING (or QUEUED) until the
    # engine's own events are read back from the log
    flowing = {state for done, state in states if 0 < done < everything}
    assert flowing == {S.TRANSFERRING}, flowing
    assert seen[-1] == (everything, everything)
    backwards = [(a, b) for a, b in pairwise(seen) if b[0] < a[0]]
    assert not backwards, backwards[:3]
    # the large file's size was known while it was still arriving
    assert any(len(small) < done < everything and total == everything for done, total in seen)


def test_the_command_collects_young_objects_less_often(tmp_path: Path) -> None:
    """Every verb raises the young generation's threshold (the gain is measured in
    benchmarks/RESULTS-download.md run 8); a higher setting of its own is kept."""
    saved = gc.get_threshold()
    home = str(tmp_path / "home")
    try:
        gc.set_threshold(700, 10, 10)
        assert main(["--home", home, "list"], io.StringIO()) == 0
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, 10, 10)
        gc.set_threshold(50_000, 5, 5)
        assert main(["--home", home, "list"], io.StringIO()) == 0
        assert gc.get_threshold() == (50_000, 5, 5)
    finally:
        gc.set_threshold(*saved)
