"""Expiring URLs (beyond BITS): ``Engine.set_url_refresher``. When a server refuses a
download's URL with 401, 403 or 410 (an expired pre-signed or CDN-signed URL), the engine asks
the application's refresher for a new URL, records it as SetRemoteName does
(RemoteNameChanged), and goes on from the file's checkpoint.

The FaultServer plays the signing CDN: a file with a ``token`` answers 403 to any request whose
``sig`` query parameter is not the current token; the tests change the token to expire URLs.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest
from test_engine import (
    FaultServer,
    KiB,
    S,
    Served,
    events_of,
    make_engine,
    new_job,
    of_type,
    running,
    trickle,
    until,
)

from backhaul.adapters.cli import main
from backhaul.adapters.engine import UrlRefresher, command_refresher
from backhaul.adapters.manager import FileInfo, TransferJob, TransferManager
from backhaul.core import event as ev
from backhaul.core import hresult as hr
from backhaul.core.value import ByteRange, FileSpec

FORBIDDEN = hr.http_status_hresult(403)


class Signer:
    """A refresher that signs the file's path with the server's current token."""

    def __init__(self, served: Served, base: str) -> None:
        self.served, self.base = served, base
        self.calls: list[tuple[str, str, int]] = []

    def __call__(self, job: TransferJob, file: FileInfo, code: int) -> str | None:
        self.calls.append((job.id, file.remote_name, code))
        return f"{self.base}/f?sig={self.served.token}"


def signed(file: FileInfo, token: str) -> str:
    """The file's URL signed anew (the recorded one shows ``sig=<redacted>``)."""
    return file.remote_name.split("?")[0] + f"?sig={token}"


def test_an_expired_url_is_refreshed_and_the_file_resumes_from_its_checkpoint(
    tmp_path: Path,
) -> None:
    data = os.urandom(512 * KiB)
    served = trickle(data, drop_after=256 * KiB, token="t1")
    manager = TransferManager(home=tmp_path / "home")

    async def main_() -> TransferJob:
        async with FaultServer({"/f": served}) as srv:
            signer = Signer(served, srv.base)
            job = new_job(
                manager, [(srv.url("/f?sig=t1"), tmp_path / "f.bin")], minimum_retry_delay=5
            )
            engine = make_engine(manager)
            engine.set_url_refresher(signer)
            async with running(engine):
                await until(lambda: job.state is S.TRANSIENT_ERROR, "the dropped connection")
                checkpoint = job.snapshot().files[0].bytes_transferred
                assert checkpoint > 0
                served.token = "t2"  # the signature expires while the job waits
                job.resume()
                await until(lambda: job.state is S.TRANSFERRED, "TRANSFERRED")
            # The refresher sees the URL as the log records it: the signature sealed.
            assert signer.calls == [(job.id, srv.url("/f?sig=<redacted>"), FORBIDDEN)]
            gets = srv.hits_for("/f")
            assert [h.query for h in gets] == ["sig=t1", "sig=t1", "sig=t2"]
            assert gets[1].range_start == checkpoint  # refused at the checkpoint
            assert gets[2].range_start == checkpoint  # and resumed there at the new URL
            assert gets[2].if_range == '"v1"'
        return job

    job = asyncio.run(main_())
    job.complete()
    assert (tmp_path / "f.bin").read_bytes() == data
    events = events_of(manager, job.id)
    renamed = of_type(events, ev.RemoteNameChanged)
    assert [(e.file_index, e.remote_name.endswith("/f?sig=<redacted>")) for e in renamed] == [
        (0, True)
    ]
    assert renamed[0].query is not None  # "sig=t2", sealed
    # The refusal was answered, not recorded: one error, the dropped connection.
    assert [e.error.hresult for e in of_type(events, ev.ErrorOccurred)] == [
        hr.BG_E_CONNECTION_CLOSED
    ]
    assert job.files()[0].remote_name.endswith("/f?sig=<redacted>")


def run_refused(
    tmp_path: Path, refresher: UrlRefresher, statuses: tuple[int, ...] = (401, 403, 410)
) -> tuple[TransferManager, TransferJob, TransferJob, FaultServer]:
    """A job of a file whose URL was never valid, and a job of a plain file, run until idle
    by one engine with ``refresher``."""
    files = {"/f": Served(os.urandom(64 * KiB), token="good"), "/ok": Served(b"ok" * 1000)}
    manager = TransferManager(home=tmp_path / "home")

    async def main_() -> tuple[TransferJob, TransferJob, FaultServer]:
        async with FaultServer(files) as srv:
            job = new_job(manager, [(srv.url("/f?sig=old"), tmp_path / "f.bin")])
            other = new_job(manager, [(srv.url("/ok"), tmp_path / "ok.bin")])
            engine = make_engine(manager)
            engine.set_url_refresher(refresher, statuses)
            await engine.run(until_idle=True)
        return job, other, srv

    job, other, srv = asyncio.run(main_())
    return manager, job, other, srv


@pytest.mark.parametrize(
    ("answer", "statuses"),
    [(None, (401, 403, 410)), ("same", (401, 403, 410)), ("good", (401, 410))],
    ids=["no-new-url", "the-same-url", "403-not-asked-for"],
)
def test_without_a_new_url_the_refusal_stands(
    tmp_path: Path, answer: str | None, statuses: tuple[int, ...]
) -> None:
    calls: list[int] = []

    def refresher(job: TransferJob, file: FileInfo, code: int) -> str | None:
        calls.append(code)
        if answer == "same":
            return file.remote_name
        return None if answer is None else signed(file, "good")

    manager, job, _other, srv = run_refused(tmp_path, refresher, statuses)
    assert job.state is S.ERROR
    assert job.error is not None and job.error.hresult == FORBIDDEN
    assert calls == ([] if 403 not in statuses else [FORBIDDEN])
    assert not of_type(events_of(manager, job.id), ev.RemoteNameChanged)
    assert [h.query for h in srv.hits_for("/f")] == ["sig=old"]


@pytest.mark.parametrize("answer", ["not a url", "http://127.0.0.1/*.bin"])
def test_an_answer_the_core_refuses_leaves_the_refusal_standing(
    tmp_path: Path, answer: str
) -> None:
    """SetRemoteName refuses the answer (E_INVALIDARG): the refusal is logged, the 403 is
    the job's error, and the job is not run again."""
    calls: list[int] = []

    def refresher(job: TransferJob, file: FileInfo, code: int) -> str:
        calls.append(code)
        return answer

    manager, job, other, srv = run_refused(tmp_path, refresher)
    assert job.state is S.ERROR
    assert job.error is not None and job.error.hresult == FORBIDDEN
    assert calls == [FORBIDDEN]
    assert not of_type(events_of(manager, job.id), ev.RemoteNameChanged)
    assert [h.query for h in srv.hits_for("/f")] == ["sig=old"]
    assert other.state is S.TRANSFERRED


def test_new_urls_are_tried_at_most_three_times_per_file(tmp_path: Path) -> None:
    tried = iter(range(100))

    def refresher(job: TransferJob, file: FileInfo, code: int) -> str:
        return signed(file, f"bad{next(tried)}")

    manager, job, _other, srv = run_refused(tmp_path, refresher)
    assert job.state is S.ERROR
    assert job.error is not None and job.error.hresult == FORBIDDEN
    assert [h.query for h in srv.hits_for("/f")] == ["sig=old", "sig=bad0", "sig=bad1", "sig=bad2"]
    assert len(of_type(events_of(manager, job.id), ev.RemoteNameChanged)) == 3


def test_an_async_refresher_is_awaited(tmp_path: Path) -> None:
    async def refresher(job: TransferJob, file: FileInfo, code: int) -> str:
        await asyncio.sleep(0.01)
        return signed(file, "good")

    _manager, job, _other, srv = run_refused(tmp_path, refresher)
    assert job.state is S.TRANSFERRED
    assert [h.query for h in srv.hits_for("/f")] == ["sig=old", "sig=good"]


def test_a_refresher_that_raises_leaves_the_error_and_the_engine_runs_on(tmp_path: Path) -> None:
    def refresher(job: TransferJob, file: FileInfo, code: int) -> str:
        raise RuntimeError("the signing service is down")

    manager, job, other, _srv = run_refused(tmp_path, refresher)
    assert job.state is S.ERROR
    assert job.error is not None and job.error.hresult == FORBIDDEN
    assert not of_type(events_of(manager, job.id), ev.RemoteNameChanged)
    assert other.state is S.TRANSFERRED


@pytest.mark.parametrize("verb", ["get", "serve"])
def test_the_command_asks_a_refresher_program(tmp_path: Path, verb: str) -> None:
    """``--url-refresher COMMAND`` (get and serve): the program gets the request as JSON on
    stdin (the URL is not in its arguments) and prints the new URL."""
    data = os.urandom(64 * KiB)
    asked = tmp_path / "asked.json"
    script = tmp_path / "sign.py"
    script.write_text(
        "import json, sys\n"
        "request = json.load(sys.stdin)\n"
        f"open({str(asked)!r}, 'w').write(json.dumps(request))\n"
        "print(request['remote_name'].split('?')[0] + '?sig=good')\n"
    )
    server = FaultServer({"/f": Served(data, token="good")})
    dest, home = tmp_path / "f.bin", str(tmp_path / "home")
    refresher = ["--url-refresher", f"{sys.executable} {script}"]
    with server.threaded():
        url = server.url("/f?sig=old")
        if verb == "get":
            assert main(["--home", home, "get", "--quiet", *refresher, url, str(dest)]) == 0
        else:
            with TransferManager(home=tmp_path / "home") as manager:
                job = new_job(manager, [(url, dest)])
            assert main(["--home", home, "serve", "--until-idle", *refresher]) == 0
            with TransferManager(home=tmp_path / "home") as manager:
                assert manager.get_job(job.id).complete() == hr.S_OK
    assert dest.read_bytes() == data
    request = json.loads(asked.read_text())
    assert request["remote_name"] == server.url("/f?sig=<redacted>")  # never the signature
    assert (request["file_index"], request["local_name"]) == (0, str(dest))
    assert (request["http_status"], request["hresult"]) == (403, "0x80190193")
    assert [h.query for h in server.hits_for("/f")] == ["sig=old", "sig=good"]


@pytest.mark.parametrize(
    "program",
    [
        "import sys; sys.exit(1)",  # refuses
        "pass",  # prints nothing
        "import time; time.sleep(30)",  # no answer in time
        None,  # cannot start
    ],
    ids=["exit-1", "silent", "too-slow", "missing"],
)
def test_a_refresher_program_without_an_answer_gives_no_url(
    tmp_path: Path, program: str | None
) -> None:
    argv = [sys.executable, "-c", program] if program else [str(tmp_path / "no-such-program")]
    refresh = command_refresher(argv, timeout=0.5)
    with TransferManager("memory:") as manager:
        job = manager.create_job("signed")
        job.add_file("https://cdn.example/f?sig=old", tmp_path / "f.bin")
        answer = refresh(job, job.files()[0], FORBIDDEN)
        assert asyncio.run(answer) is None  # type: ignore[arg-type]


def test_a_file_with_ranges_is_refreshed_too(tmp_path: Path) -> None:
    """AddFileWithRanges: the size request is refused, then both ranges come from the new
    URL."""
    data = os.urandom(256 * KiB)
    served = Served(data, token="good")
    manager = TransferManager(home=tmp_path / "home")

    async def main_() -> tuple[TransferJob, FaultServer]:
        async with FaultServer({"/f": served}) as srv:
            job = manager.create_job("ranges")
            ranges = (ByteRange(1000, 5000), ByteRange(200 * KiB, None))
            job.add_files([FileSpec(srv.url("/f?sig=old"), str(tmp_path / "r.bin"), ranges)])
            job.resume()
            engine = make_engine(manager)
            engine.set_url_refresher(lambda job, file, code: signed(file, "good"))
            await engine.run(until_idle=True)
        return job, srv

    job, srv = asyncio.run(main_())
    assert job.state is S.TRANSFERRED
    job.complete()
    assert (tmp_path / "r.bin").read_bytes() == data[1000:6000] + data[200 * KiB :]
    first, *rest = [(h.method, h.query) for h in srv.hits if h.path == "/f"]
    assert first == ("HEAD", "sig=old")  # the size request, refused
    assert rest[0] == ("HEAD", "sig=good")
    assert [q for m, q in rest[1:] if m == "GET"] == ["sig=good", "sig=good"]  # the two ranges
