"""HttpTransport against a real nginx on loopback: sizes, validators, ranges, If-Range, errors,
connection reuse."""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
from peers.nginx import NginxServer

from backhaul.core import hresult as hr
from backhaul.core.error import TransferError
from backhaul.core.port import Download, RequestOptions
from backhaul.core.vocabulary import ErrorContext
from backhaul.transports.http import HttpTransport

pytestmark = pytest.mark.peer

NO_OPTIONS = RequestOptions()
T = TypeVar("T")


def run(body: Callable[[HttpTransport], Awaitable[T]], **kwargs: float) -> T:
    """Run ``body(transport)`` in a fresh loop with a fresh transport, closed afterwards."""

    async def main() -> T:
        transport = HttpTransport(**kwargs)
        try:
            return await body(transport)
        finally:
            await transport.close()

    return asyncio.run(main())


async def read_all(download: Download) -> bytes:
    try:
        return b"".join([chunk async for chunk in download])
    finally:
        await download.aclose()


def new_file(docroot: Path, data: bytes) -> str:
    """A file of its own in the docroot (the docroot is shared by the whole session)."""
    name = f"t-{secrets.token_hex(6)}.bin"
    (docroot / name).write_bytes(data)
    return name


def test_stat_reports_size_strong_etag_last_modified_and_ranges(
    nginx_server: tuple[NginxServer, Path],
) -> None:
    server, docroot = nginx_server
    url = f"{server.url}/blob.bin"

    remote = run(lambda t: t.stat(url, NO_OPTIONS))

    st = (docroot / "blob.bin").stat()
    assert remote.url == url
    assert remote.size == st.st_size
    # nginx's ETag is "<mtime hex>-<size hex>": strong, so it is the validator
    assert remote.validator == f'"{int(st.st_mtime):x}-{st.st_size:x}"'
    assert remote.last_modified is not None
    assert remote.last_modified.timestamp() == int(st.st_mtime)
    assert remote.accepts_ranges
    assert remote.headers is not None
    assert f"ETag: {remote.validator}\r\n" in remote.headers
    assert f"Content-Length: {st.st_size}\r\n" in remote.headers
    assert remote.headers.endswith("\r\n")


def test_stat_of_an_empty_file_gives_size_zero(nginx_server: tuple[NginxServer, Path]) -> None:
    server, _ = nginx_server
    remote = run(lambda t: t.stat(f"{server.url}/empty.bin", NO_OPTIONS))
    assert remote.size == 0


def test_full_read_matches_sha256(nginx_server: tuple[NginxServer, Path]) -> None:
    server, docroot = nginx_server
    expected = hashlib.sha256((docroot / "blob.bin").read_bytes()).hexdigest()

    async def body(t: HttpTransport) -> tuple[int, int | None, str]:
        download = await t.open(f"{server.url}/blob.bin", NO_OPTIONS)
        digest = hashlib.sha256()
        try:
            async for chunk in download:
                assert len(chunk) <= 1024 * 1024
                digest.update(chunk)
        finally:
            await download.aclose()
        return download.offset, download.remote.size, digest.hexdigest()

    offset, size, got = run(body)
    assert (offset, size, got) == (0, (docroot / "blob.bin").stat().st_size, expected)


def test_empty_file_reads_as_no_bytes(nginx_server: tuple[NginxServer, Path]) -> None:
    server, _ = nginx_server

    async def body(t: HttpTransport) -> bytes:
        return await read_all(await t.open(f"{server.url}/empty.bin", NO_OPTIONS))

    assert run(body) == b""


def test_read_at_an_offset_returns_exactly_the_tail(
    nginx_server: tuple[NginxServer, Path],
) -> None:
    server, docroot = nginx_server
    data = (docroot / "blob.bin").read_bytes()
    offset = 1_234_567

    async def body(t: HttpTransport) -> tuple[int, bytes]:
        download = await t.open(f"{server.url}/blob.bin", NO_OPTIONS, offset=offset)
        return download.offset, await read_all(download)

    got_offset, got = run(body)
    assert got_offset == offset
    assert got == data[offset:]
    [line] = [x for x in server.access_lines() if x["http_range"] == f"bytes={offset}-"]
    assert line["status"] == "206"


def test_if_range_with_the_current_etag_resumes_with_206(
    nginx_server: tuple[NginxServer, Path],
) -> None:
    server, docroot = nginx_server
    data = os.urandom(200_000)
    name = new_file(docroot, data)
    url = f"{server.url}/{name}"

    async def body(t: HttpTransport) -> tuple[str | None, int, str | None, bytes]:
        remote = await t.stat(url, NO_OPTIONS)
        download = await t.open(url, NO_OPTIONS, offset=150_000, validator=remote.validator)
        return (
            remote.validator,
            download.offset,
            download.remote.validator,
            await read_all(download),
        )

    validator, offset, new_validator, got = run(body)
    assert offset == 150_000
    assert new_validator == validator
    assert got == data[150_000:]
    requests = [x for x in server.access_lines() if x["request"].startswith(f"GET /{name}")]
    assert {"status": "206", "http_if_range": validator}.items() <= requests[-1].items()


def test_if_range_with_a_stale_etag_restarts_from_zero_with_the_new_version(
    nginx_server: tuple[NginxServer, Path],
) -> None:
    server, docroot = nginx_server
    name = new_file(docroot, os.urandom(100_000))
    url = f"{server.url}/{name}"
    old = run(lambda t: t.stat(url, NO_OPTIONS))
    # A new version on the server: other bytes, another size, a later mtime.
    new_data = os.urandom(120_000)
    (docroot / name).write_bytes(new_data)
    later = time.time() + 100
    os.utime(docroot / name, (later, later))

    async def body(t: HttpTransport) -> tuple[Download, bytes]:
        download = await t.open(url, NO_OPTIONS, offset=50_000, validator=old.validator)
        return download, await read_all(download)

    download, got = run(body)
    assert download.offset == 0
    assert download.remote.validator not in (None, old.validator)
    assert download.remote.size == len(new_data)
    assert got == new_data


def test_if_range_with_a_last_modified_validator_resumes(
    nginx_server: tuple[NginxServer, Path],
) -> None:
    server, docroot = nginx_server
    data = os.urandom(10_000)
    url = f"{server.url}/{new_file(docroot, data)}"

    async def body(t: HttpTransport) -> tuple[int, bytes]:
        remote = await t.stat(url, NO_OPTIONS)
        assert remote.headers is not None
        [date] = [
            line.split(": ", 1)[1]
            for line in remote.headers.split("\r\n")
            if line.startswith("Last-Modified: ")
        ]
        download = await t.open(url, NO_OPTIONS, offset=4_000, validator=date)
        return download.offset, await read_all(download)

    assert run(body) == (4_000, data[4_000:])


def test_length_bounded_range_returns_exactly_that_range(
    nginx_server: tuple[NginxServer, Path],
) -> None:
    server, docroot = nginx_server
    data = (docroot / "blob.bin").read_bytes()

    async def body(t: HttpTransport) -> list[tuple[int, bytes]]:
        url = f"{server.url}/blob.bin"
        remote = await t.stat(url, NO_OPTIONS)
        got = []
        for offset, length in ((100, 100), (0, 10), (len(data) - 7, 7)):
            download = await t.open(
                url, NO_OPTIONS, offset=offset, length=length, validator=remote.validator
            )
            got.append((download.offset, await read_all(download)))
        return got

    assert run(body) == [(100, data[100:200]), (0, data[:10]), (len(data) - 7, data[-7:])]


def test_a_range_outside_the_file_is_fatal_invalid_range(
    nginx_server: tuple[NginxServer, Path],
) -> None:
    server, _ = nginx_server

    async def body(t: HttpTransport) -> None:
        await t.open(f"{server.url}/hello.txt", NO_OPTIONS, offset=1000, length=10)

    with pytest.raises(TransferError) as caught:
        run(body)
    assert caught.value.hresult == hr.BG_E_INVALID_RANGE
    assert not caught.value.transient


@pytest.mark.parametrize("call", ["stat", "open"])
def test_missing_file_is_fatal_http_404_on_the_remote_file(
    nginx_server: tuple[NginxServer, Path], call: str
) -> None:
    server, _ = nginx_server
    url = f"{server.url}/no-such-file.bin"

    async def body(t: HttpTransport) -> object:
        return await (t.stat(url, NO_OPTIONS) if call == "stat" else t.open(url, NO_OPTIONS))

    with pytest.raises(TransferError) as caught:
        run(body)
    assert caught.value.hresult == 0x80190194
    assert caught.value.context == ErrorContext.REMOTE_FILE
    assert caught.value.transient is False
    assert caught.value.retry_after is None


def test_sequential_requests_share_one_connection(nginx_server: tuple[NginxServer, Path]) -> None:
    server, docroot = nginx_server
    token = secrets.token_hex(6)
    data = (docroot / "hello.txt").read_bytes()

    async def body(t: HttpTransport) -> list[bytes]:
        got = []
        await t.stat(f"{server.url}/hello.txt?reuse={token}-stat", NO_OPTIONS)
        for i in range(4):
            url = f"{server.url}/hello.txt?reuse={token}-{i}"
            got.append(await read_all(await t.open(url, NO_OPTIONS)))
        # A 404 with a small body does not cost the connection either.
        with pytest.raises(TransferError):
            await t.open(f"{server.url}/missing?reuse={token}-404", NO_OPTIONS)
        got.append(
            await read_all(await t.open(f"{server.url}/hello.txt?reuse={token}-5", NO_OPTIONS))
        )
        return got

    assert run(body) == [data] * 5
    lines: list[dict[str, str]] = []
    deadline = time.monotonic() + 5  # nginx logs a request after answering it
    while len(lines) < 7 and time.monotonic() < deadline:
        lines = [x for x in server.access_lines() if f"reuse={token}" in x["request"]]
        time.sleep(0.02)
    assert len(lines) == 7
    assert len({x["connection"] for x in lines}) == 1
    assert [int(x["connection_requests"]) for x in lines] == list(range(1, 8))
