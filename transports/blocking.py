"""A ``Download`` over a blocking read: for transports built on blocking libraries.

``file://`` reads with ``os.pread``; an FTP data connection with ``recv``. Both need the same
asyncio around the blocking call, and it is easy to get subtly wrong: one read at a time in a
worker thread, a body that ends early is an error, iterated once, and ``aclose`` must wait for
a read still running in its thread before the descriptor or socket under it is closed (or a
reused descriptor number would be read). A subclass gives the blocking parts::

    class MyDownload(BlockingDownload):
        def read_blocking(self, want: int, position: int) -> bytes: ...  # in a thread
        def failed(self, exc: BaseException) -> TransferError: ...     # translate
        def ended_early(self, position: int) -> TransferError: ...      # b"" before the end
        def release(self) -> None: ...                                  # close what it holds

and, when needed, ``finish_blocking`` (after the last byte, in a thread: FTP's 226),
``interrupt`` (on ``aclose``, before waiting for a read in flight: shut a socket down to wake
a blocked ``recv``) and ``errors`` (the exception types ``failed`` translates; OSError).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from backhaul.core.error import TransferError
from backhaul.core.port import ClosedOnExit, RemoteFile

__all__ = ["BlockingDownload"]


class BlockingDownload(ClosedOnExit):
    """Bytes ``offset`` to ``end`` of a remote file, ``chunk_size`` at a time (a
    ``core.port.Download``). Iterate once; always ``aclose`` (or use ``async with``)."""

    errors: tuple[type[BaseException], ...] = (OSError,)

    def __init__(self, remote: RemoteFile, offset: int, end: int, chunk_size: int) -> None:
        self.remote = remote
        self.offset = offset
        self.end = end
        self._chunk_size = chunk_size
        self._chunks: AsyncGenerator[bytes, None] | None = None
        self._pending: asyncio.Future[Any] | None = None
        self._closed = False

    # -- what a subclass gives ---------------------------------------------------------------

    def read_blocking(self, want: int, position: int) -> bytes:
        """Up to ``want`` bytes at ``position``; b"" (or fewer bytes) where the body ends."""
        raise NotImplementedError

    def failed(self, exc: BaseException) -> TransferError:
        raise NotImplementedError

    def ended_early(self, position: int) -> TransferError:
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError

    def finish_blocking(self) -> None:
        """After the last byte was read (in a thread)."""

    def interrupt(self) -> None:
        """Wake a read blocked in its thread (``aclose``); nothing by default."""

    # -- the Download ------------------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[bytes]:
        if self._chunks is not None or self._closed:
            raise RuntimeError("a Download can be iterated only once, and not after aclose")
        self._chunks = self._read()
        return self._chunks

    async def _in_thread(self, call: Callable[..., Any], *args: Any) -> Any:
        self._pending = asyncio.get_running_loop().run_in_executor(None, call, *args)
        try:
            return await self._pending
        except self.errors as exc:
            raise self.failed(exc) from exc

    async def _read(self) -> AsyncGenerator[bytes, None]:
        position = self.offset
        while position < self.end and not self._closed:
            chunk = await self._in_thread(
                self.read_blocking, min(self._chunk_size, self.end - position), position
            )
            if not isinstance(chunk, bytes) or not chunk:
                raise self.ended_early(position)
            position += len(chunk)
            yield chunk
        if not self._closed and type(self).finish_blocking is not BlockingDownload.finish_blocking:
            await self._in_thread(self.finish_blocking)  # no thread hop when there is nothing

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.interrupt()
        if self._chunks is not None:
            await self._chunks.aclose()
        pending = self._pending
        if pending is not None and not pending.done():
            await asyncio.wait([pending])  # its thread must be done with what release() closes
        self.release()
