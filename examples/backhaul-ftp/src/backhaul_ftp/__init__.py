"""backhaul-ftp: an example backhaul transport plugin for ``ftp://`` URLs.

A plugin author's whole job, as specs/transport-sdk.md describes it:

* a class with ``schemes``, ``capabilities``, ``stat``, ``open`` and ``close`` (the
  ``backhaul.core.port.Transport`` protocol; ``begin`` too, for the ``Uploader`` protocol,
  because it declares ``"upload"``);
* only ``backhaul.core.error.TransferError`` leaves it, with an HRESULT, an error context and
  whether a retry can help: ONE table maps FTP replies, ONE table the other exceptions;
* an entry point in the ``backhaul.transports`` group, named by the scheme.

How FTP gives what backhaul needs: ``SIZE`` the size (binary mode), ``MDTM`` the time of the
version; the validator is ``"<MDTM>-<size>"`` (a change within the same second that keeps the
size is invisible, as FTP offers nothing finer). ``REST <offset>`` + ``RETR`` resumes; a
bounded range stops reading at its end and drops the connection. ``ftplib`` is blocking, so
every call runs in a worker thread; one data chunk is read per thread hop (``MSG_WAITALL``),
so memory stays at one chunk. Cancelling a read shuts the data socket down, which wakes the
thread blocked in ``recv``.

Uploads write ``.<name>.<token>.bhpart`` beside the target with ``APPE`` (its size is the
session's offset, so an upload resumes after a crash), then ``RNFR``/``RNTO`` it over the
target at ``finish``; ``abort`` deletes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ftplib
import io
import posixpath
import re
import socket
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final, TypeVar
from urllib.parse import unquote, urlsplit

from backhaul.core import hresult as hr
from backhaul.core.error import TransferError
from backhaul.core.port import (
    Download,
    RemoteFile,
    RequestOptions,
    Transport,
    Uploader,
    UploadSession,
    begin_upload,
)
from backhaul.core.vocabulary import AuthScheme, AuthTarget, ErrorContext
from backhaul.transports.blocking import BlockingDownload

__all__ = ["FtpDownload", "FtpTransport", "FtpUploadSession"]
__version__ = "0.1.0"

DEFAULT_TIMEOUT: Final = 30.0
DEFAULT_CHUNK_SIZE: Final = 256 * 1024
PART_SUFFIX: Final = ".bhpart"
_MDTM: Final = re.compile(r"213 (\d{14})(?:\.\d+)?")

_T = ErrorContext.GENERAL_TRANSPORT
_R = ErrorContext.REMOTE_FILE
NOT_FOUND: Final = hr.hresult_from_win32(hr.ERROR_FILE_NOT_FOUND)
TIMEOUT: Final = hr.hresult_from_win32(hr.ERROR_WINHTTP_TIMEOUT)

# FTP replies (RFC 959): 4yz is a transient negative reply, 5yz a permanent one. The code for
# each reply; replies not listed get the default of their class.
_REPLY_TABLE: Final[dict[str, tuple[int, ErrorContext]]] = {
    "421": (hr.BG_E_CONNECT_FAILURE, _T),  # service not available
    "425": (hr.BG_E_CONNECT_FAILURE, _T),  # cannot open the data connection
    "426": (hr.BG_E_CONNECTION_CLOSED, _T),  # transfer aborted
    "450": (hr.hresult_from_win32(hr.ERROR_SHARING_VIOLATION), _R),  # file busy
    "452": (hr.hresult_from_win32(hr.ERROR_DISK_FULL), _R),
    "530": (hr.E_ACCESSDENIED, _R),  # not logged in
    "532": (hr.E_ACCESSDENIED, _R),
    "550": (NOT_FOUND, _R),  # file unavailable
    "552": (hr.hresult_from_win32(hr.ERROR_DISK_FULL), _R),
    "553": (hr.E_INVALIDARG, _R),  # file name not allowed
}
_TRANSIENT_REPLY_DEFAULT: Final = (hr.BG_E_CONNECTION_CLOSED, _T)
_PERMANENT_REPLY_DEFAULT: Final = (hr.BG_E_INSUFFICIENT_HTTP_SUPPORT, _R)  # "the server can't"

# Other exceptions, first match wins; every one of them is transient but the last.
_EXCEPTION_TABLE: Final[tuple[tuple[type[BaseException], int, ErrorContext], ...]] = (
    (ConnectionRefusedError, hr.BG_E_CONNECT_FAILURE, _T),
    (socket.gaierror, hr.BG_E_CONNECT_FAILURE, _T),
    (TimeoutError, TIMEOUT, _T),
    (ftplib.error_reply, hr.BG_E_INVALID_SERVER_RESPONSE, _R),
    (ftplib.error_proto, hr.BG_E_INVALID_SERVER_RESPONSE, _R),
    (EOFError, hr.BG_E_CONNECTION_CLOSED, _T),
    (OSError, hr.BG_E_CONNECTION_CLOSED, _T),
)

T = TypeVar("T")


def _error(
    code: int, message: str, context: ErrorContext = _R, *, transient: bool = False
) -> TransferError:
    return TransferError(code, message, context=context, transient=transient)


def _translate(exc: BaseException, where: str) -> TransferError:
    if isinstance(exc, ftplib.error_temp | ftplib.error_perm):
        reply = str(exc)[:3]
        transient = isinstance(exc, ftplib.error_temp)
        default = _TRANSIENT_REPLY_DEFAULT if transient else _PERMANENT_REPLY_DEFAULT
        code, context = _REPLY_TABLE.get(reply, default)
        return _error(code, f"FTP {exc} ({where})", context, transient=transient)
    if isinstance(exc, ValueError):  # ftplib refuses a CR/LF in a command
        return _error(hr.E_INVALIDARG, f"{exc} ({where})")
    for cls, code, context in _EXCEPTION_TABLE:
        if isinstance(exc, cls):
            detail = str(exc) or type(exc).__name__
            return _error(code, f"{detail} ({where})", context, transient=True)
    raise exc


_TRANSLATED: Final[tuple[type[BaseException], ...]] = (
    ftplib.Error,
    ValueError,
    *(cls for cls, _, _ in _EXCEPTION_TABLE),
)


class _Target:
    """Where an ``ftp://`` URL points, and who logs in."""

    def __init__(self, url: str, options: RequestOptions) -> None:
        try:
            parts = urlsplit(url)
            port = parts.port or 21
        except ValueError:
            raise _error(hr.E_INVALIDARG, "not a valid ftp URL") from None
        if parts.scheme.lower() != "ftp" or not parts.hostname:
            raise _error(hr.E_INVALIDARG, f"not an ftp URL: {url.split('@')[-1]!r}")
        path = unquote(parts.path)
        if not path.startswith("/") or path.endswith("/") or "\n" in path or "\r" in path:
            raise _error(hr.E_INVALIDARG, f"an ftp URL needs a file path: {path!r}")
        self.host, self.port, self.path = parts.hostname, port, path
        self.user, self.password = "anonymous", "anonymous@"
        if parts.username:
            self.user, self.password = unquote(parts.username), unquote(parts.password or "")
        for entry in options.credentials:  # the job's credentials beat the URL's
            if entry.target == AuthTarget.SERVER and entry.scheme == AuthScheme.BASIC:
                self.user, self.password = entry.user_name or "", entry.password or ""
                break
        self.where = f"ftp://{self.host}:{self.port}{self.path}"  # no credentials in messages


def _connect(target: _Target, timeout: float) -> ftplib.FTP:
    ftp = ftplib.FTP(timeout=timeout)
    try:
        ftp.connect(target.host, target.port)
        ftp.login(target.user, target.password)
        ftp.voidcmd("TYPE I")  # SIZE counts bytes only in binary mode
    except BaseException:
        ftp.close()
        raise
    return ftp


def _remote(ftp: ftplib.FTP, target: _Target, url: str) -> RemoteFile:
    size = ftp.size(target.path)
    if size is None:
        raise _error(hr.BG_E_MISSING_FILE_SIZE, f"no SIZE for {target.where}")
    validator = modified = None
    try:
        match = _MDTM.match(ftp.sendcmd(f"MDTM {target.path}"))
    except ftplib.error_perm:
        match = None  # a server without MDTM: no validator, as the capability allows
    if match is not None:
        stamp = match.group(1)
        validator = f'"{stamp}-{size:x}"'
        modified = datetime.strptime(stamp, "%Y%m%d%H%M%S").replace(tzinfo=UTC)
    return RemoteFile(
        url=url, size=size, validator=validator, last_modified=modified, accepts_ranges=True
    )


async def _in_thread(func: Callable[[], T], cleanup: Callable[[T], object], where: str) -> T:
    """``func()`` in a worker thread, its failures translated. If the caller is cancelled
    meanwhile, whatever ``func`` still returns goes to ``cleanup`` (no connection leaks)."""
    future = asyncio.ensure_future(asyncio.to_thread(func))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:

        def late(done: asyncio.Future[T]) -> None:
            if not done.cancelled() and done.exception() is None:
                cleanup(done.result())

        future.add_done_callback(late)
        raise
    except _TRANSLATED as exc:
        raise _translate(exc, where) from exc


def _close_quietly(ftp: ftplib.FTP | None, conn: socket.socket | None = None) -> None:
    if conn is not None:
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv
        conn.close()
    if ftp is not None:
        ftp.close()


class _Opened:
    def __init__(
        self,
        ftp: ftplib.FTP | None,
        conn: socket.socket | None,
        remote: RemoteFile,
        offset: int,
        end: int,
    ) -> None:
        self.ftp, self.conn, self.remote, self.offset, self.end = ftp, conn, remote, offset, end

    def close(self) -> None:
        _close_quietly(self.ftp, self.conn)


class FtpDownload(BlockingDownload):
    """An open ``RETR`` (a ``Download``): ``recv`` in worker threads, one data chunk per hop.
    Iterate once; always ``aclose``."""

    errors = _TRANSLATED

    def __init__(self, opened: _Opened, where: str, chunk_size: int) -> None:
        super().__init__(opened.remote, opened.offset, opened.end, chunk_size)
        self._opened = opened
        self._where = where

    def __repr__(self) -> str:
        return f"<FtpDownload {self._where} offset={self.offset}>"

    def read_blocking(self, want: int, position: int) -> bytes:
        conn = self._opened.conn
        assert conn is not None  # a download with nothing to read has end == offset
        return conn.recv(want, socket.MSG_WAITALL)

    def failed(self, exc: BaseException) -> TransferError:
        return _translate(exc, self._where)

    def ended_early(self, position: int) -> TransferError:
        return _error(
            hr.BG_E_CONNECTION_CLOSED,
            f"the data connection closed at byte {position} of {self.end} ({self._where})",
            _T,
            transient=True,
        )

    def finish_blocking(self) -> None:
        """The whole file was read: the server confirms the transfer (226)."""
        opened = self._opened
        if opened.conn is not None and opened.ftp is not None and self.end == self.remote.size:
            opened.conn.close()
            opened.ftp.voidresp()

    def interrupt(self) -> None:
        if self._opened.conn is not None:
            with contextlib.suppress(OSError):
                self._opened.conn.shutdown(socket.SHUT_RDWR)  # wakes a thread in recv

    def release(self) -> None:
        self._opened.close()


class FtpTransport:
    """``ftp://`` downloads and uploads. ``timeout``: seconds for connecting and for any
    socket read (a stall); ``chunk_size``: bytes per data chunk."""

    schemes: frozenset[str] = frozenset({"ftp"})
    capabilities: frozenset[str] = frozenset({"ranges", "validators", "upload"})

    def __init__(
        self, *, timeout: float = DEFAULT_TIMEOUT, chunk_size: int = DEFAULT_CHUNK_SIZE
    ) -> None:
        if timeout <= 0 or chunk_size <= 0:
            raise ValueError("timeout and chunk_size must be positive")
        self._timeout = timeout
        self._chunk_size = chunk_size

    async def close(self) -> None:
        return None  # no pool: every call opens and closes its own control connection

    def _connect(self, target: _Target) -> ftplib.FTP:
        return _connect(target, self._timeout)

    # -- downloads -------------------------------------------------------------------------------

    async def stat(self, url: str, options: RequestOptions) -> RemoteFile:
        target = _Target(url, options)

        def work() -> RemoteFile:
            with contextlib.closing(self._connect(target)) as ftp:
                return _remote(ftp, target, url)

        return await _in_thread(work, lambda _: None, target.where)

    async def open(
        self,
        url: str,
        options: RequestOptions,
        *,
        offset: int = 0,
        length: int | None = None,
        validator: str | None = None,
    ) -> FtpDownload:
        if offset < 0 or (length is not None and length <= 0):
            raise _error(hr.E_INVALIDARG, f"bad range offset={offset} length={length}")
        target = _Target(url, options)

        def work() -> _Opened:
            ftp = self._connect(target)
            try:
                return self._start(ftp, target, url, offset, length, validator)
            except BaseException:
                ftp.close()
                raise

        opened = await _in_thread(work, _Opened.close, target.where)
        return FtpDownload(opened, target.where, self._chunk_size)

    @staticmethod
    def _start(
        ftp: ftplib.FTP,
        target: _Target,
        url: str,
        offset: int,
        length: int | None,
        validator: str | None,
    ) -> _Opened:
        remote = _remote(ftp, target, url)
        size = remote.size or 0
        if validator is not None and remote.validator not in (None, validator):
            offset, length = 0, None  # another version: the whole of it, from 0
        if length is None and offset > size:
            raise _error(
                hr.BG_E_INVALID_RANGE, f"offset {offset} is past the end of {target.where}"
            )
        if length is not None and offset >= size:
            raise _error(
                hr.BG_E_INVALID_RANGE, f"range {offset}+{length} lies outside {target.where}"
            )
        end = size if length is None else min(offset + length, size)
        if offset == end:  # an empty file, or a resume that already has every byte
            ftp.close()
            return _Opened(None, None, remote, offset, end)
        conn = ftp.transfercmd(f"RETR {target.path}", rest=offset or None)
        return _Opened(ftp, conn, remote, offset, end)

    # -- uploads ---------------------------------------------------------------------------------

    async def begin(
        self,
        url: str,
        options: RequestOptions,
        *,
        size: int,
        token: str | None = None,
        reply: bool = False,
    ) -> FtpUploadSession:
        token = begin_upload("ftp", size=size, token=token, reply=reply)
        target = _Target(url, options)
        directory, name = posixpath.split(target.path)
        part = posixpath.join(directory, f".{name}.{token}{PART_SUFFIX}")

        def work() -> int:
            with contextlib.closing(self._connect(target)) as ftp:
                try:
                    held = ftp.size(part) or 0
                except ftplib.error_perm:
                    held = None  # no part file yet
                if held is None or held > size:
                    ftp.storbinary(f"STOR {part}", io.BytesIO(b""))
                    held = 0
                return held

        held = await _in_thread(work, lambda _: None, target.where)
        return FtpUploadSession(self, target, part, token, size, held)


class FtpUploadSession:
    """One upload (an ``UploadSession``); stateless on the client: every call reconnects."""

    def __init__(
        self,
        transport: FtpTransport,
        target: _Target,
        part: str,
        token: str,
        size: int,
        offset: int,
    ) -> None:
        self.token = token
        self.offset = offset
        self._transport = transport
        self._target = target
        self._part = part
        self._size = size

    def __repr__(self) -> str:
        return f"<FtpUploadSession {self._target.where} token={self.token} offset={self.offset}>"

    async def send(self, data: bytes, offset: int) -> int:
        if offset < 0 or offset + len(data) > self._size:
            raise _error(
                hr.E_INVALIDARG,
                f"fragment {offset}+{len(data)} lies outside the {self._size}-byte upload",
            )
        if offset > self.offset:
            return self.offset  # a hole would follow: the caller resends from self.offset
        data = data[self.offset - offset :]  # APPE only appends: skip what the server holds
        if not data:
            return self.offset

        def work() -> int:
            with contextlib.closing(self._transport._connect(self._target)) as ftp:
                ftp.storbinary(f"APPE {self._part}", io.BytesIO(data))
                return ftp.size(self._part) or 0

        self.offset = await _in_thread(work, lambda _: None, self._target.where)
        return self.offset

    async def finish(self) -> str | None:
        if self.offset != self._size:
            raise _error(
                hr.E_INVALIDARG,
                f"the upload holds {self.offset} of {self._size} bytes; send the rest first",
            )

        def work() -> None:
            with contextlib.closing(self._transport._connect(self._target)) as ftp:
                held = ftp.size(self._part)
                if held != self._size:
                    raise _error(
                        hr.BG_E_CONNECTION_CLOSED,
                        f"the server holds {held} of {self._size} bytes of {self._target.where}",
                        transient=True,
                    )
                ftp.rename(self._part, self._target.path)

        await _in_thread(work, lambda _: None, self._target.where)
        return None

    async def close(self) -> None:
        return None  # no reply, and ``finish`` already closed the session

    async def abort(self) -> None:
        def work() -> None:
            with contextlib.closing(self._transport._connect(self._target)) as ftp:
                try:
                    ftp.delete(self._part)
                except ftplib.error_perm as exc:
                    if not str(exc).startswith("550"):  # already gone is fine
                        raise

        await _in_thread(work, lambda _: None, self._target.where)


if TYPE_CHECKING:  # mypy proves that the classes implement backhaul's ports

    def _ports(
        transport: FtpTransport, download: FtpDownload, session: FtpUploadSession
    ) -> tuple[Transport, Download, Uploader, UploadSession]:
        return transport, download, transport, session
