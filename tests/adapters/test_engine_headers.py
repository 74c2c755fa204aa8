"""BITS_FILE_PROPERTY_ID_HTTP_RESPONSE_HEADERS: each file keeps the raw header block of its
last response, a failed one too (bits-core.md §10), read with
``TransferJob.get_file_property`` or ``backhaul getfileproperty``.

Against the real nginx of the engine tests: whole files, AddFileWithRanges, and a 404 (a
failed response is the file's last response too). Against a FaultServer: a trickled body
checkpointed several times, a resume after a dropped connection (the 206 replaces the 200), a
503 with Retry-After and then the file, and responses with a Set-Cookie, which the log and the
read model hold only sealed.
"""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from peers.nginx import NginxServer
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
from backhaul.adapters.manager import TransferJob, TransferManager
from backhaul.core import event as ev
from backhaul.core.value import ByteRange, FileSpec, Sealed
from backhaul.core.vocabulary import FilePropertyId

HEADERS = FilePropertyId.HTTP_RESPONSE_HEADERS


def header_lines(block: str) -> dict[str, str]:
    """The block's headers by lower-case name (the status line and the empty line apart)."""
    lines = block.split("\r\n")
    return {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(":") for line in lines[1:-2])
    }


def run_served(
    tmp_path: Path, files: dict[str, Served], custom_headers: str | None = None
) -> tuple[TransferManager, TransferJob]:
    """One job of ``files`` (each to its name under tmp_path), run until idle."""
    manager = TransferManager(home=tmp_path / "home")

    async def main_() -> str:
        async with FaultServer(files) as srv:
            pairs = [(srv.url(path), tmp_path / path.strip("/")) for path in files]
            job = new_job(manager, pairs, start=False)
            job.set_custom_headers(custom_headers)
            job.resume()
            await make_engine(manager).run(until_idle=True)
        return job.id

    return manager, manager.get_job(asyncio.run(main_()))


def test_each_file_keeps_the_headers_of_its_last_response_from_nginx(
    tmp_path: Path, engine_nginx: tuple[NginxServer, Path]
) -> None:
    server, docroot = engine_nginx
    manager = TransferManager(home=tmp_path / "home")
    names = ["one.bin", "two.bin"]
    job = new_job(manager, [(f"{server.url}/{n}", tmp_path / n) for n in names])
    assert job.get_file_property(0, HEADERS) is None  # no response yet

    asyncio.run(make_engine(manager).run(until_idle=True))

    assert job.state is S.TRANSFERRED
    for i, name in enumerate(names):
        block = job.get_file_property(i, HEADERS)
        assert isinstance(block, str)
        assert block.startswith("HTTP/1.1 200 OK\r\n")
        assert block.endswith("\r\n\r\n")
        headers = header_lines(block)
        assert headers["server"].startswith("nginx")
        assert headers["content-length"] == str((docroot / name).stat().st_size)
        assert headers["etag"].startswith('"') and headers["accept-ranges"] == "bytes"
    # The command line prints the same block, a header a line.
    out = io.StringIO()
    home = str(tmp_path / "home")
    assert main(["--home", home, "getfileproperty", job.id, "1", "HTTP_RESPONSE_HEADERS"], out) == 0
    block = job.get_file_property(1, HEADERS)
    assert out.getvalue().splitlines() == [line for line in block.split("\r\n") if line]
    assert main(["--home", home, "getfileproperty", job.id, "1", "NO_SUCH"], io.StringIO()) == 1


def test_a_checkpointed_file_records_its_headers_once_per_response(tmp_path: Path) -> None:
    """A body that arrives over several checkpoint intervals (a trickle, so that the count
    of checkpoints does not depend on the machine's speed): its block goes with the first
    checkpoint only."""
    served = trickle(os.urandom(512 * KiB), headers={"X-Served": "trickle"})
    manager, job = run_served(tmp_path, {"/f": served})
    assert job.state is S.TRANSFERRED
    events = events_of(manager, job.id)
    checkpoints = of_type(events, ev.BytesCheckpointed)
    assert len(checkpoints) >= 2
    # The first event after the response carries its block; the rest say "unchanged".
    first = checkpoints[0].response_headers
    assert isinstance(first, str) and first.startswith("HTTP/1.1 200 OK\r\n")
    assert header_lines(first)["x-served"] == "trickle"
    assert [c.response_headers for c in checkpoints[1:]] == [None] * (len(checkpoints) - 1)
    assert of_type(events, ev.FileTransferred)[0].response_headers is None
    assert job.get_file_property(0, HEADERS) == first


def test_ranges_keep_the_headers_of_the_last_range_request(
    tmp_path: Path, engine_nginx: tuple[NginxServer, Path]
) -> None:
    server, docroot = engine_nginx
    size = (docroot / "two.bin").stat().st_size
    manager = TransferManager(home=tmp_path / "home")
    job = manager.create_job("ranges")
    ranges = (ByteRange(100, 1000), ByteRange(size - 500, None))
    job.add_files([FileSpec(f"{server.url}/two.bin", str(tmp_path / "r.bin"), ranges)])
    job.resume()

    asyncio.run(make_engine(manager).run(until_idle=True))

    assert job.state is S.TRANSFERRED
    block = job.get_file_property(0, HEADERS)
    assert block.startswith("HTTP/1.1 206 Partial Content\r\n")
    assert header_lines(block)["content-range"] == f"bytes {size - 500}-{size - 1}/{size}"


@pytest.mark.parametrize(
    ("served", "while_waiting", "at_the_end", "retry_after"),
    [
        # A body cut short: no response came with the error, so the 200 stays; the 206 of
        # the resume replaces it.
        (
            lambda: trickle(os.urandom(512 * KiB), drop_after=256 * KiB),
            "HTTP/1.1 200 OK",
            "HTTP/1.1 206 Partial Content",
            None,
        ),
        # A 503 with Retry-After is the file's last response until the 200 comes.
        (
            lambda: trickle(os.urandom(64 * KiB), statuses=[503], retry_after="7"),
            "HTTP/1.1 503 Service Unavailable",
            "HTTP/1.1 200 OK",
            "7",
        ),
    ],
    ids=["dropped-then-206", "503-then-200"],
)
def test_a_retried_file_shows_its_last_response_at_each_step(
    tmp_path: Path,
    served: Callable[[], Served],
    while_waiting: str,
    at_the_end: str,
    retry_after: str | None,
) -> None:
    fault = served()
    fault.headers["X-Served"] = "fault"
    manager = TransferManager(home=tmp_path / "home")

    async def main_() -> None:
        async with FaultServer({"/f": fault}) as srv:
            job = new_job(manager, [(srv.url("/f"), tmp_path / "f.bin")], minimum_retry_delay=5)
            async with running(make_engine(manager)):
                await until(lambda: job.state is S.TRANSIENT_ERROR, "TRANSIENT_ERROR")
                block = job.get_file_property(0, HEADERS)
                assert block.startswith(while_waiting + "\r\n")
                assert header_lines(block)["x-served"] == "fault"
                assert header_lines(block).get("retry-after") == retry_after
                job.resume()
                await until(lambda: job.state is S.TRANSFERRED, "TRANSFERRED")
            block = job.get_file_property(0, HEADERS)
            assert block.startswith(at_the_end + "\r\n")
            assert header_lines(block)["x-served"] == "fault"
            assert "retry-after" not in header_lines(block)
            if at_the_end.startswith("HTTP/1.1 206"):
                assert header_lines(block)["content-range"].startswith("bytes ")

    asyncio.run(main_())


def test_a_block_with_a_cookie_is_sealed_in_the_log_and_the_read_model(tmp_path: Path) -> None:
    cookie = "session=c00kie-" + os.urandom(8).hex()
    files = {
        "/plain": trickle(os.urandom(64 * KiB)),
        "/cookie": trickle(os.urandom(64 * KiB), headers={"Set-Cookie": cookie}),
    }
    manager, job = run_served(tmp_path, files)
    assert job.state is S.TRANSFERRED
    assert header_lines(job.get_file_property(1, HEADERS))["set-cookie"] == cookie
    files_now = job.snapshot().files
    assert isinstance(files_now[0].response_headers, str)  # nothing secret: kept as it is
    assert isinstance(files_now[1].response_headers, Sealed)
    manager.refresh_views()
    manager.close()
    # No byte of the database (log and read model) holds the cookie.
    raw = b"".join(p.read_bytes() for p in (tmp_path / "home").iterdir() if p.is_file())
    assert b"Accept-Ranges: bytes" in raw  # the plain file's block, as it is
    assert cookie.encode() not in raw


def test_a_404_from_nginx_is_the_files_last_response(
    tmp_path: Path, engine_nginx: tuple[NginxServer, Path]
) -> None:
    """BITS keeps "the server's last HTTP response" for the file: a failed one too."""
    server, _ = engine_nginx
    manager = TransferManager(home=tmp_path / "home")
    job = new_job(
        manager,
        [(f"{server.url}/one.bin", tmp_path / "one.bin"), (f"{server.url}/gone", tmp_path / "g")],
    )

    asyncio.run(make_engine(manager).run(until_idle=True))

    assert job.state is S.ERROR
    assert job.error is not None and job.error.file_index == 1
    block = job.get_file_property(1, HEADERS)
    assert isinstance(block, str) and block.startswith("HTTP/1.1 404 Not Found\r\n")
    assert header_lines(block)["server"].startswith("nginx")
    assert job.get_file_property(0, HEADERS).startswith("HTTP/1.1 200 OK\r\n")  # its own
    error = of_type(events_of(manager, job.id), ev.ErrorOccurred)[0]
    assert error.response_headers == block
    # A fresh manager reads the same from the log and from the read model.
    manager.close()
    again = TransferManager(home=tmp_path / "home")
    assert again.get_job(job.id).get_file_property(1, HEADERS) == block
    again.refresh_views()
    assert again.store.views.get(job.id) is not None
    assert again.get_job(job.id).snapshot().files[1].response_headers == block


def test_a_failed_response_with_a_cookie_is_sealed(tmp_path: Path) -> None:
    cookie = "session=c00kie-" + os.urandom(8).hex()
    served = trickle(os.urandom(4 * KiB), statuses=[403], headers={"Set-Cookie": cookie})
    manager, job = run_served(tmp_path, {"/f": served})
    assert job.state is S.ERROR
    assert header_lines(job.get_file_property(0, HEADERS))["set-cookie"] == cookie
    assert isinstance(job.snapshot().files[0].response_headers, Sealed)
    manager.refresh_views()
    manager.close()
    raw = b"".join(p.read_bytes() for p in (tmp_path / "home").iterdir() if p.is_file())
    assert cookie.encode() not in raw
    assert b"HTTP/1.1 403" not in raw  # the block is sealed whole (the description says 403)


def raw_store(tmp_path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in (tmp_path / "home").iterdir() if p.is_file())


def test_a_block_with_a_token_header_is_sealed_whatever_its_status(tmp_path: Path) -> None:
    """Tokens a server issues under names of their own (X-Auth-Token on a 200,
    X-Amz-Security-Token on a 503) were kept in plain text: only Set-Cookie and
    Authentication-Info sealed a block."""
    token = "tok-" + os.urandom(8).hex()
    amz = "amz-" + os.urandom(8).hex()
    files = {
        "/token": trickle(os.urandom(4 * KiB), headers={"X-Auth-Token": token}),
        "/amz": trickle(os.urandom(4 * KiB), statuses=[404], headers={"X-Amz-Security-Token": amz}),
    }
    manager, job = run_served(tmp_path, files)
    assert job.state is S.ERROR
    assert header_lines(job.get_file_property(0, HEADERS))["x-auth-token"] == token
    assert header_lines(job.get_file_property(1, HEADERS))["x-amz-security-token"] == amz
    manager.refresh_views()
    manager.close()
    raw = raw_store(tmp_path)
    assert token.encode() not in raw
    assert amz.encode() not in raw


def test_a_job_that_sends_a_secret_keeps_its_responses_sealed(tmp_path: Path) -> None:
    """A server that echoes a request header back, under any name: the job's custom header
    (sealed in the log) reached the log in plain text inside the response's block."""
    secret = "Bearer " + os.urandom(8).hex()
    echo = trickle(os.urandom(4 * KiB), headers={"X-Echo": secret})
    manager, job = run_served(tmp_path, {"/echo": echo}, custom_headers=f"X-Mine: {secret}")
    assert job.state is S.TRANSFERRED
    assert header_lines(job.get_file_property(0, HEADERS))["x-echo"] == secret
    manager.refresh_views()
    manager.close()
    assert secret.encode() not in raw_store(tmp_path)
