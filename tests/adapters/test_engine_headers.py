"""BITS_FILE_PROPERTY_ID_HTTP_RESPONSE_HEADERS: each file keeps the raw header block of the
last response whose body it received (bits-core.md §10), read with
``TransferJob.get_file_property`` or ``backhaul getfileproperty``.

Against the real nginx of the engine tests: whole files and AddFileWithRanges. Against a
FaultServer: a trickled body checkpointed several times, a resume after a dropped connection
(the 206 replaces the 200), and a response with a Set-Cookie, which the log and the read model
hold only sealed.
"""

from __future__ import annotations

import asyncio
import io
import os
from pathlib import Path

from peers.nginx import NginxServer
from test_engine import (
    FaultServer,
    KiB,
    S,
    events_of,
    make_engine,
    new_job,
    of_type,
    running,
    trickle,
    until,
)

from backhaul.adapters.cli import main
from backhaul.adapters.manager import TransferManager
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
    manager = TransferManager(home=tmp_path / "home")

    async def main_() -> str:
        async with FaultServer({"/f": served}) as srv:
            job = new_job(manager, [(srv.url("/f"), tmp_path / "f.bin")])
            await make_engine(manager).run(until_idle=True)
        return job.id

    job = manager.get_job(asyncio.run(main_()))
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


def test_a_resumed_file_keeps_the_206_that_finished_it(tmp_path: Path) -> None:
    data = os.urandom(512 * KiB)
    served = trickle(data, drop_after=256 * KiB, headers={"X-Served": "fault"})
    manager = TransferManager(home=tmp_path / "home")

    async def main_() -> None:
        async with FaultServer({"/f": served}) as srv:
            job = new_job(manager, [(srv.url("/f"), tmp_path / "f.bin")], minimum_retry_delay=5)
            async with running(make_engine(manager)):
                await until(lambda: job.state is S.TRANSIENT_ERROR, "TRANSIENT_ERROR")
                first = job.get_file_property(0, HEADERS)
                assert first.startswith("HTTP/1.1 200 OK\r\n")
                job.resume()
                await until(lambda: job.state is S.TRANSFERRED, "TRANSFERRED")
            block = job.get_file_property(0, HEADERS)
            assert block.startswith("HTTP/1.1 206 Partial Content\r\n")
            assert header_lines(block)["x-served"] == "fault"
            assert header_lines(block)["content-range"].startswith("bytes ")

    asyncio.run(main_())


def test_a_block_with_a_cookie_is_sealed_in_the_log_and_the_read_model(tmp_path: Path) -> None:
    cookie = "session=c00kie-" + os.urandom(8).hex()
    files = {
        "/plain": trickle(os.urandom(64 * KiB)),
        "/cookie": trickle(os.urandom(64 * KiB), headers={"Set-Cookie": cookie}),
    }
    manager = TransferManager(home=tmp_path / "home")

    async def main_() -> str:
        async with FaultServer(files) as srv:
            job = new_job(
                manager,
                [(srv.url("/plain"), tmp_path / "p.bin"), (srv.url("/cookie"), tmp_path / "c.bin")],
            )
            await make_engine(manager).run(until_idle=True)
        return job.id

    job_id = asyncio.run(main_())
    job = manager.get_job(job_id)
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
