"""What the engine's job runs share: the exceptions that end a run, and the
helpers that wait for a worker thread and name a failure."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

from backhaul.adapters import localfile
from backhaul.core.error import TransferError
from backhaul.core.vocabulary import ErrorContext

T = TypeVar("T")


class JobGone(Exception):
    """The job changed under the transfer (suspended, cancelled...): stop quietly."""


class StoreDown(Exception):
    """The log refused an append (its disk is full, its server is gone): the transfer
    that needed it stops, and its job runs again once the log takes appends."""


async def to_the_end(work: Awaitable[T]) -> T:
    """Await work that runs on in a worker thread: cancelled, wait for it to end before the
    cancellation goes on, so that no descriptor it uses is closed under it."""
    future = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await asyncio.wait([future])
        raise


def name_file(exc: TransferError, index: int, remote_name: str) -> None:
    """The file a transfer error is about, and its protocol (what BITS's
    IBackgroundCopyError::GetFile and GetProtocol give): "file" for SMB, UNC and file://
    names, else "http"."""
    exc.file_index = index  # type: ignore[attr-defined]
    local = remote_name.startswith(("smb", "\\\\", "file:"))
    exc.protocol = "file" if local else "http"  # type: ignore[attr-defined]


def local_error(exc: OSError, path: Path | str) -> TransferError:
    import errno

    transient = exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EAGAIN, errno.EBUSY)
    code = localfile.os_hresult(exc)
    return TransferError(
        code,
        f"{path}: {exc.strerror}",
        context=ErrorContext.LOCAL_FILE,
        transient=transient,
    )
