"""The ``file`` transport: local paths as ``file://`` URLs, for downloads and uploads.

Rules of this module:

* A URL is ``file:///absolute/path`` or ``file://localhost/absolute/path`` with the path
  percent-encoded (``Path.as_uri()`` makes one). Any other host, a relative path, a query, a
  fragment or a NUL byte is ``E_INVALIDARG`` (fatal, REMOTE_FILE): remote hosts are the ``smb``
  transport's business.
* Blocking calls run in the default executor (``asyncio.to_thread``), one chunk at a time, so
  the event loop never waits on the disk and memory stays at about one chunk per download.
* The validator of a version is ``"<inode>-<size>-<mtime ns>"`` (hex): a file replaced by a
  rename gets a new inode, one rewritten in place a new mtime. Two rewrites of the same size
  within the file system's timestamp granularity cannot be told apart; nor can they over SMB.
* ``open`` reads from one file descriptor opened and ``fstat``-ed once, so the bytes, the size
  and the validator it reports belong to one version. It reads up to the size seen at open: a
  file that grows meanwhile ends there, one that shrinks raises ``BG_E_CONNECTION_CLOSED``
  (transient; the resume then sees the new validator and restarts).
* Offsets: a stale validator gives the whole file from 0 (``Download.offset == 0``); an
  open-ended read at ``offset == size`` is an empty body at that offset; a bounded range that
  starts at or past the end is ``BG_E_INVALID_RANGE``, and one that runs past the end is cut
  at the end (HTTP's rules, so the engine sees one behaviour).
* OS errors go through ONE table, ``_ERRNO_TABLE``; whether a code is transient is
  ``failure.is_transient``'s answer.
* Uploads (the ``Uploader`` port): a session writes ``.<name>.<token>.bhpart`` beside the
  target; its size is the session's offset, so a crashed upload resumes from what the file
  holds. ``finish`` fsyncs it, renames it over the target (an existing file is replaced) and
  fsyncs the directory; ``abort`` deletes it. There is no reply URL (upload-reply is HTTP's).
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat as stat_module
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Final, TypeVar
from urllib.parse import unquote_to_bytes, urlsplit

from backhaul.core import hresult as hr
from backhaul.core.error import TransferError
from backhaul.core.failure import is_transient
from backhaul.core.port import (
    RANGES,
    UPLOAD,
    VALIDATORS,
    Download,
    RemoteFile,
    RequestOptions,
    Transport,
    Uploader,
    UploadSession,
    begin_upload,
)
from backhaul.core.vocabulary import ErrorContext
from backhaul.transports.blocking import BlockingDownload

__all__ = [
    "CAPABILITIES",
    "DEFAULT_CHUNK_SIZE",
    "PART_SUFFIX",
    "FileDownload",
    "FileTransport",
    "FileUploadSession",
    "path_of",
]

DEFAULT_CHUNK_SIZE: Final = 1024 * 1024
PART_SUFFIX: Final = ".bhpart"
CAPABILITIES: Final = frozenset({RANGES, VALIDATORS, UPLOAD})
_LOCAL_HOSTS: Final = frozenset({"", "localhost"})
_R = ErrorContext.REMOTE_FILE

NOT_FOUND: Final = hr.hresult_from_win32(hr.ERROR_FILE_NOT_FOUND)
PATH_NOT_FOUND: Final = hr.hresult_from_win32(hr.ERROR_PATH_NOT_FOUND)

# errno -> HRESULT; context is REMOTE_FILE for all of them (the "remote" file is local here).
_ERRNO_TABLE: Final[dict[int, int]] = {
    errno.ENOENT: NOT_FOUND,
    errno.ENOTDIR: PATH_NOT_FOUND,
    errno.ELOOP: PATH_NOT_FOUND,
    errno.ENAMETOOLONG: hr.E_INVALIDARG,
    errno.EISDIR: hr.E_INVALIDARG,
    errno.EACCES: hr.E_ACCESSDENIED,
    errno.EPERM: hr.E_ACCESSDENIED,
    errno.EROFS: hr.E_ACCESSDENIED,
    errno.ENOSPC: hr.hresult_from_win32(hr.ERROR_DISK_FULL),
    errno.EDQUOT: hr.hresult_from_win32(hr.ERROR_DISK_FULL),
    errno.EBUSY: hr.hresult_from_win32(hr.ERROR_SHARING_VIOLATION),
    errno.ETXTBSY: hr.hresult_from_win32(hr.ERROR_SHARING_VIOLATION),
}

T = TypeVar("T")


def _error(code: int, message: str) -> TransferError:
    return TransferError(code, message, context=_R, transient=is_transient(code))


def _os_error(exc: OSError, what: str) -> TransferError:
    code = _ERRNO_TABLE.get(exc.errno or 0, hr.E_FAIL)  # E_FAIL: unknown, so transient
    return _error(code, f"{what}: {exc.strerror or exc}")


def path_of(url: str) -> str:
    """The local path a ``file://`` URL names; ``E_INVALIDARG`` if it names none."""
    try:
        parts = urlsplit(url)
    except ValueError:
        raise _error(hr.E_INVALIDARG, f"not a valid URL: {url!r}") from None
    if parts.scheme.lower() != "file":
        raise _error(hr.E_INVALIDARG, f"not a file URL: {url!r}")
    if parts.netloc.lower() not in _LOCAL_HOSTS:
        raise _error(hr.E_INVALIDARG, f"file URLs name local paths, not host {parts.netloc!r}")
    if parts.query or parts.fragment or "#" in url or "?" in url:
        raise _error(hr.E_INVALIDARG, f"a file URL has no query or fragment: {url!r}")
    raw = unquote_to_bytes(parts.path)
    if not raw.startswith(b"/") or b"\0" in raw:
        raise _error(hr.E_INVALIDARG, f"a file URL needs an absolute path: {url!r}")
    return os.fsdecode(raw)


def _validator(st: os.stat_result) -> str:
    return f'"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"'


def _remote(url: str, st: os.stat_result) -> RemoteFile:
    return RemoteFile(
        url=url,
        size=st.st_size,
        validator=_validator(st),
        last_modified=datetime.fromtimestamp(st.st_mtime, UTC),
        accepts_ranges=True,
    )


def _open_regular(path: str) -> tuple[int, os.stat_result]:
    """An fd on ``path`` and its fstat. O_NONBLOCK: opening a FIFO must not hang. A missing
    directory on the path is ERROR_PATH_NOT_FOUND, a missing file ERROR_FILE_NOT_FOUND."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        if not os.path.isdir(os.path.dirname(path) or "."):
            raise FileNotFoundError(errno.ENOTDIR, "no such directory", path) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat_module.S_ISREG(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "not a regular file", path)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


class FileDownload(BlockingDownload):
    """An open read of a local file (a ``core.port.Download``): ``os.pread`` in worker
    threads. Iterate once; always ``aclose`` (or use it as an async context manager)."""

    def __init__(self, fd: int, remote: RemoteFile, offset: int, end: int, chunk_size: int) -> None:
        super().__init__(remote, offset, end, chunk_size)
        self._fd = fd

    def __repr__(self) -> str:
        return f"<FileDownload {self.remote.url} offset={self.offset} end={self.end}>"

    def read_blocking(self, want: int, position: int) -> bytes:
        return os.pread(self._fd, want, position)

    def failed(self, exc: BaseException) -> TransferError:
        assert isinstance(exc, OSError)
        return _os_error(exc, f"reading {self.remote.url}")

    def ended_early(self, position: int) -> TransferError:
        return TransferError(
            hr.BG_E_CONNECTION_CLOSED,
            f"{self.remote.url} shrank to {position} bytes while being read",
            context=_R,
            transient=is_transient(hr.BG_E_CONNECTION_CLOSED),
        )

    def release(self) -> None:
        os.close(self._fd)


async def _in_thread(func: Callable[[], T], cleanup: Callable[[T], object]) -> T:
    """``func()`` in a worker thread. If the caller is cancelled meanwhile, whatever ``func``
    still returns is passed to ``cleanup`` (an fd must not leak)."""
    future = asyncio.ensure_future(asyncio.to_thread(func))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:

        def late(done: asyncio.Future[T]) -> None:
            if not done.cancelled() and done.exception() is None:
                cleanup(done.result())

        future.add_done_callback(late)
        raise


class FileTransport:
    """``file://`` URLs: downloads from and uploads to local paths (Transport and Uploader).

    ``chunk_size``: bytes per read. Stateless apart from that: ``close`` has nothing to do.
    """

    schemes: frozenset[str] = frozenset({"file"})
    capabilities: frozenset[str] = CAPABILITIES

    def __init__(self, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        self._chunk_size = chunk_size

    async def close(self) -> None:
        return None

    # -- downloads -------------------------------------------------------------------------------

    async def stat(self, url: str, options: RequestOptions) -> RemoteFile:
        path = path_of(url)

        def work() -> os.stat_result:
            fd, st = _open_regular(path)
            os.close(fd)
            return st

        try:
            st = await asyncio.to_thread(work)
        except OSError as exc:
            raise _os_error(exc, url) from exc
        return _remote(url, st)

    async def open(
        self,
        url: str,
        options: RequestOptions,
        *,
        offset: int = 0,
        length: int | None = None,
        validator: str | None = None,
    ) -> FileDownload:
        if offset < 0 or (length is not None and length <= 0):
            raise _error(hr.E_INVALIDARG, f"bad range offset={offset} length={length}")
        path = path_of(url)
        try:
            fd, st = await _in_thread(lambda: _open_regular(path), lambda got: os.close(got[0]))
        except OSError as exc:
            raise _os_error(exc, url) from exc
        try:
            return self._start(fd, _remote(url, st), offset, length, validator)
        except BaseException:
            os.close(fd)
            raise

    def _start(
        self, fd: int, remote: RemoteFile, offset: int, length: int | None, validator: str | None
    ) -> FileDownload:
        size = remote.size or 0
        if validator is not None and validator != remote.validator:
            offset, length = 0, None  # another version: the whole of it, from 0
        if length is None:
            if offset > size:
                raise _error(
                    hr.BG_E_INVALID_RANGE, f"offset {offset} is past the end of {remote.url}"
                )
            return FileDownload(fd, remote, offset, size, self._chunk_size)
        if offset >= size:
            raise _error(
                hr.BG_E_INVALID_RANGE,
                f"range {offset}+{length} lies outside the {size}-byte {remote.url}",
            )
        return FileDownload(fd, remote, offset, min(offset + length, size), self._chunk_size)

    # -- uploads ---------------------------------------------------------------------------------

    async def begin(
        self,
        url: str,
        options: RequestOptions,
        *,
        size: int,
        token: str | None = None,
        reply: bool = False,
    ) -> FileUploadSession:
        token = begin_upload("file", size=size, token=token, reply=reply)
        target = Path(path_of(url))
        part = target.with_name(f".{target.name}.{token}{PART_SUFFIX}")

        def work() -> int:
            if not target.parent.is_dir():
                raise FileNotFoundError(errno.ENOTDIR, "no such directory", str(target.parent))
            if target.is_dir():
                raise IsADirectoryError(errno.EISDIR, "is a directory", str(target))
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                held = os.fstat(fd).st_size
                if held > size:
                    os.ftruncate(fd, 0)  # not this upload's bytes
                    held = 0
                return held
            finally:
                os.close(fd)

        try:
            held = await asyncio.to_thread(work)
        except OSError as exc:
            raise _os_error(exc, url) from exc
        return FileUploadSession(url, target, part, token, size, held)


class FileUploadSession:
    """One upload to a local path (a ``core.port.UploadSession``)."""

    def __init__(
        self, url: str, target: Path, part: Path, token: str, size: int, offset: int
    ) -> None:
        self.url = url
        self.token = token
        self.offset = offset
        self._target = target
        self._part = part
        self._size = size
        self._done = False

    def __repr__(self) -> str:
        return f"<FileUploadSession {self.url} token={self.token} offset={self.offset}>"

    def _check_open(self) -> None:
        if self._done:
            raise _error(hr.E_INVALIDARG, f"the upload session {self.token} is closed")

    async def send(self, data: bytes, offset: int) -> int:
        self._check_open()
        if offset < 0 or offset + len(data) > self._size:
            raise _error(
                hr.E_INVALIDARG,
                f"fragment {offset}+{len(data)} lies outside the {self._size}-byte upload",
            )
        if offset > self.offset or not data:
            return self.offset  # a hole would follow: the caller resends from self.offset

        def work() -> int:
            fd = os.open(self._part, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.pwrite(fd, data, offset)
                return os.fstat(fd).st_size
            finally:
                os.close(fd)

        try:
            self.offset = await asyncio.to_thread(work)
        except OSError as exc:
            raise _os_error(exc, f"writing {self.url}") from exc
        return self.offset

    async def finish(self) -> str | None:
        self._check_open()
        if self.offset != self._size:
            raise _error(
                hr.E_INVALIDARG,
                f"the upload holds {self.offset} of {self._size} bytes; send the rest first",
            )

        def work() -> None:
            fd = os.open(self._part, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(self._part, self._target)
            directory = os.open(self._target.parent, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)

        try:
            await asyncio.to_thread(work)
        except OSError as exc:
            raise _os_error(exc, f"publishing {self.url}") from exc
        self._done = True
        return None

    async def close(self) -> None:
        return None  # no reply, and ``finish`` already closed the session

    async def abort(self) -> None:
        self._done = True
        try:
            await asyncio.to_thread(self._part.unlink, missing_ok=True)
        except OSError as exc:
            raise _os_error(exc, f"discarding the upload to {self.url}") from exc


if TYPE_CHECKING:  # mypy proves that the classes implement the ports

    def _ports(
        transport: FileTransport, download: FileDownload, session: FileUploadSession
    ) -> tuple[Transport, Download, Uploader, UploadSession]:
        return transport, download, transport, session
