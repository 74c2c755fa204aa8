"""FileTransport passes the conformance kit (downloads and uploads), plus what only file://
URLs have: how a URL maps to a path."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import pytest

from backhaul.core import hresult as hr
from backhaul.core.error import TransferError
from backhaul.core.port import RequestOptions
from backhaul.core.vocabulary import ErrorContext
from backhaul.transports.conformance import TransportConformance, UploadConformance, read_all
from backhaul.transports.file import PART_SUFFIX, FileTransport, _os_error, path_of


class TestFileConformance(TransportConformance, UploadConformance):
    @pytest.fixture(autouse=True)
    def _root(self, tmp_path: Path) -> None:
        self.root = tmp_path / "remote dir"  # a space: URLs must percent-encode it
        self.root.mkdir()

    def make_transport(self) -> FileTransport:
        return FileTransport()

    def url_for(self, name: str) -> str:
        return (self.root / name).as_uri()

    def publish(self, name: str, data: bytes) -> str:
        (self.root / name).write_bytes(data)
        return self.url_for(name)

    def replace(self, name: str, data: bytes) -> None:
        fresh = self.root / f".{name}.new"
        fresh.write_bytes(data)
        os.replace(fresh, self.root / name)  # a new inode: the validator changes

    def make_uploader(self) -> FileTransport:
        return FileTransport()

    def upload_url(self, name: str) -> str:
        return self.url_for(name)

    def fetch(self, name: str) -> bytes | None:
        path = self.root / name
        return path.read_bytes() if path.exists() else None


# -- URLs ----------------------------------------------------------------------------------------


def test_path_of_decodes_percent_escapes_and_accepts_localhost() -> None:
    assert path_of("file:///tmp/a%20b/c%23d.bin") == "/tmp/a b/c#d.bin"
    assert path_of("file://localhost/tmp/x") == "/tmp/x"
    assert path_of(Path("/tmp/ü é").as_uri()) == "/tmp/ü é"


@pytest.mark.parametrize(
    "url",
    [
        "file://server/share/x",  # a remote host: smb's business
        "file:relative/x",
        "file:///tmp/x?query",
        "file:///tmp/x#fragment",
        "file:///tmp/nul%00byte",
        "http://127.0.0.1/x",
    ],
)
def test_urls_that_name_no_local_path_are_e_invalidarg(url: str) -> None:
    with pytest.raises(TransferError) as info:
        path_of(url)
    assert (info.value.hresult, info.value.context, info.value.transient) == (
        hr.E_INVALIDARG,
        ErrorContext.REMOTE_FILE,
        False,
    )


def test_a_directory_is_not_a_remote_file(tmp_path: Path) -> None:
    with pytest.raises(TransferError) as info:
        asyncio.run(FileTransport().stat(tmp_path.as_uri(), RequestOptions()))
    assert (info.value.hresult, info.value.transient) == (hr.E_INVALIDARG, False)


def test_a_path_through_a_file_is_path_not_found(tmp_path: Path) -> None:
    (tmp_path / "plain").write_bytes(b"x")
    with pytest.raises(TransferError) as info:
        asyncio.run(FileTransport().stat((tmp_path / "plain" / "x").as_uri(), RequestOptions()))
    assert info.value.hresult == hr.hresult_from_win32(hr.ERROR_PATH_NOT_FOUND)
    assert not info.value.transient


def test_a_missing_directory_is_path_not_found_and_a_missing_file_file_not_found(
    tmp_path: Path,
) -> None:
    """transport-sdk.md's table: a directory on the path missing, or only the file."""
    transport = FileTransport()
    for name, code in (
        ("gone/x.bin", hr.hresult_from_win32(hr.ERROR_PATH_NOT_FOUND)),
        ("x.bin", hr.hresult_from_win32(hr.ERROR_FILE_NOT_FOUND)),
    ):
        url = (tmp_path / name).as_uri()
        for call in (transport.stat(url, RequestOptions()), transport.open(url, RequestOptions())):
            with pytest.raises(TransferError) as info:
                asyncio.run(call)
            assert (info.value.hresult, info.value.transient) == (code, False), name


@pytest.mark.parametrize(
    ("errno_", "code", "transient"),
    [
        (errno.EACCES, hr.E_ACCESSDENIED, False),
        (errno.EPERM, hr.E_ACCESSDENIED, False),
        (errno.ENOENT, hr.hresult_from_win32(hr.ERROR_FILE_NOT_FOUND), False),
        (errno.ENOSPC, hr.hresult_from_win32(hr.ERROR_DISK_FULL), True),
        (errno.EIO, hr.E_FAIL, True),  # unknown: transient, as BITS retries it
    ],
)
def test_os_errors_map_through_one_table(errno_: int, code: int, transient: bool) -> None:
    error = _os_error(OSError(errno_, os.strerror(errno_)), "file:///x")
    assert (error.hresult, error.context, error.transient) == (
        code,
        ErrorContext.REMOTE_FILE,
        transient,
    )


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(TransferError) as info:
        asyncio.run(FileTransport().open(fifo.as_uri(), RequestOptions()))
    assert info.value.hresult == hr.E_INVALIDARG


def test_a_file_that_grows_during_the_read_ends_at_the_size_seen_at_open(tmp_path: Path) -> None:
    path = tmp_path / "growing"
    path.write_bytes(b"a" * 1000)

    async def body() -> tuple[int | None, bytes]:
        download = await FileTransport(chunk_size=100).open(path.as_uri(), RequestOptions())
        with path.open("ab") as f:
            f.write(b"b" * 1000)
        return download.remote.size, await read_all(download)

    assert asyncio.run(body()) == (1000, b"a" * 1000)


def test_a_file_that_shrinks_during_the_read_is_transient(tmp_path: Path) -> None:
    path = tmp_path / "shrinking"
    path.write_bytes(b"a" * 1000)

    async def body() -> bytes:
        download = await FileTransport(chunk_size=100).open(path.as_uri(), RequestOptions())
        os.truncate(path, 500)
        return await read_all(download)

    with pytest.raises(TransferError) as info:
        asyncio.run(body())
    assert (info.value.hresult, info.value.transient) == (hr.BG_E_CONNECTION_CLOSED, True)


def test_an_upload_keeps_its_bytes_in_a_hidden_part_file_beside_the_target(
    tmp_path: Path,
) -> None:
    target = tmp_path / "up.bin"

    async def body() -> str:
        session = await FileTransport().begin(target.as_uri(), RequestOptions(), size=4)
        await session.send(b"ab", 0)
        return session.token

    token = asyncio.run(body())
    assert not target.exists()
    assert (tmp_path / f".up.bin.{token}{PART_SUFFIX}").read_bytes() == b"ab"


def test_an_upload_into_a_missing_directory_is_fatal(tmp_path: Path) -> None:
    url = (tmp_path / "nowhere" / "up.bin").as_uri()
    with pytest.raises(TransferError) as info:
        asyncio.run(FileTransport().begin(url, RequestOptions(), size=1))
    assert (info.value.context, info.value.transient) == (ErrorContext.REMOTE_FILE, False)
