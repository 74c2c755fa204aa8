"""On-demand jobs (IBackgroundCopyFile6): the engine fills the ranges an application
requested into a sparse temp file laid out as the remote file (a mixin of ``Engine``;
bits-core.md §7.5). The methods use the engine's state, which ``Engine.__init__`` sets."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Sequence

from backhaul.adapters import localfile
from backhaul.adapters.download import (
    CHANGES_MET,
    RESUME_OVERLAP,
    Throttle,
    held_bytes,
    read_upto,
    resize_reason,
)
from backhaul.adapters.jobrun import local_error, name_file
from backhaul.core import byteranges, hresult
from backhaul.core import command as cmd
from backhaul.core.error import BitsError, TransferError
from backhaul.core.port import RemoteFile, RequestOptions, Transport
from backhaul.core.value import ByteRange
from backhaul.core.vocabulary import ErrorContext


class Fills:
    """The on-demand half of ``Engine``."""

    async def _fill_requested(self, job_id: str, pending: Sequence[int]) -> None:
        """An on-demand job's files, one after the other: each gets the ranges requested
        and not yet held, from its download position on. A file that holds every byte is
        transferred; the others wait for more requests."""
        for index in pending:
            remote_name = self._job(job_id).files[index].remote_name
            try:
                transport = self.transport_for(remote_name)
                for _ in range(CHANGES_MET):
                    try:
                        options = self._options(self._job(job_id))
                        await self._fill_file(job_id, index, transport, options)
                        break
                    except _Changed:
                        continue  # restarted: fill again from the new version
                else:
                    raise TransferError(
                        hresult.BG_E_REMOTE_FILE_CHANGED,
                        f"the remote file changed {CHANGES_MET} times while its ranges were filled",
                        context=ErrorContext.REMOTE_FILE,
                        transient=False,
                    )
            except TransferError as exc:
                name_file(exc, index, remote_name)
                raise

    async def _fill_file(
        self, job_id: str, index: int, transport: Transport, options: RequestOptions
    ) -> None:
        job = self._job(job_id)
        f = job.files[index]
        try:  # an SMB file, a file with ranges, dynamic content: no random access
            cmd.check_random_access(job, index)
        except BitsError as exc:
            context = ErrorContext.GENERAL_QUEUE_MANAGER
            raise TransferError(exc.hresult, exc.message, context=context, transient=False) from exc
        url = self._url(f)
        async with self._connections:
            self._hold_lease(job_id)
            remote = await transport.stat(url, options)
        await self._report_redirect(job_id, index, remote)
        size = remote.size
        if size is None or not remote.accepts_ranges:
            lacks = "sent no size" if size is None else "does not accept byte ranges"
            raise TransferError(
                hresult.BG_E_RANDOM_ACCESS_NOT_SUPPORTED,
                f"{f.remote_name}: the server {lacks}; on-demand files need both",
                context=ErrorContext.REMOTE_FILE,
                transient=False,
                response_headers=remote.headers,
            )
        outside = next((r for r in f.requested if _outside(r, size)), None)
        if outside is not None:  # requested before the size was known, or of a longer version
            raise TransferError(
                hresult.BG_E_INVALID_RANGE,
                f"{f.remote_name}: the range {outside.offset}:{outside.length} lies outside "
                f"the file of {size} bytes",
                context=ErrorContext.REMOTE_FILE,
                transient=False,
            )
        tmp = localfile.temp_name(job_id, index, f.local_name, self.worker)
        wanted = byteranges.resolve(f.requested, size)  # a restart keeps the requests
        if f.filled:
            if f.bytes_total != size:
                why = resize_reason(f.bytes_total, size)
            elif f.validator and remote.validator != f.validator:
                why = "the remote file changed"
            elif f.temp_worker != self.worker:
                # Another worker filled them (its lease ran out, or it let the job go):
                # copy its synced ranges into this worker's temp file, as a resumed
                # download takes over a checkpoint.
                theirs = localfile.temp_name(job_id, index, f.local_name, f.temp_worker)
                why = await asyncio.to_thread(_take_over_ranges, theirs, tmp, f.filled, size)
            else:
                why = localfile.checkpoint_lost(tmp, size, exact=True)
            if why is None and not f.validator and byteranges.missing(wanted, f.filled):
                why = await self._held_changed(job_id, transport, options, url, tmp, f.filled)
            if why is not None:
                await self._commit(job_id, cmd.RestartFile(index, why))
                f = self._job(job_id).files[index]
        todo = byteranges.starting_at(byteranges.missing(wanted, f.filled), f.position)
        await self._connected(job_id)
        if todo:
            self.live_sizes[(job_id, index)] = size
            try:
                fd = localfile.open_temp(tmp, os.O_RDWR | os.O_CREAT)
            except OSError as exc:
                raise local_error(exc, tmp) from exc
            try:
                if os.fstat(fd).st_size != size:
                    os.ftruncate(fd, size)  # the file's layout, holes where nothing came yet
                for r in todo:
                    await self._fill_range(job_id, index, transport, options, url, remote, fd, r)
            finally:
                os.close(fd)
                self._forget_live(job_id, index)
        if byteranges.covers(self._job(job_id).files[index].filled, size):
            await self._keep_security(job_id, index)
            await self._finish_file(job_id, index, size, None)

    async def _held_changed(
        self,
        job_id: str,
        transport: Transport,
        options: RequestOptions,
        url: str,
        tmp: str,
        filled: Sequence[ByteRange],
    ) -> str | None:
        """A server with no validator (neither ETag nor Last-Modified) cannot tell a new
        version of the same size: before more ranges join the ones the file holds, fetch
        the last bytes it holds again (up to RESUME_OVERLAP) and compare them with the temp
        file's. Why the file must restart, or None."""
        last = filled[-1]
        assert last.length is not None
        length = min(last.length, RESUME_OVERLAP)
        offset = last.offset + last.length - length
        async with self._connections:
            self._hold_lease(job_id)
            download = await transport.open(url, options, offset=offset, length=length)
        try:
            if download.offset != offset:
                return None  # no range honoured: the fill fails for it (no random access)
            got = await read_upto(aiter(download), length, f"at {offset}")
        finally:
            await download.aclose()
        if got[:length] == held_bytes(tmp, offset, length):
            return None
        return "the remote file changed: the bytes it holds are not the same"

    async def _fill_range(
        self,
        job_id: str,
        index: int,
        transport: Transport,
        options: RequestOptions,
        url: str,
        remote: RemoteFile,
        fd: int,
        wanted: ByteRange,
    ) -> None:
        """Fetch one missing range into the temp file at its offset; claim it (FillRanges)
        once durable, every ``checkpoint_bytes`` or ``checkpoint_interval`` on the way."""
        assert wanted.length is not None
        assert remote.size is not None
        start = position = synced = wanted.offset
        end = start + wanted.length
        async with self._connections:
            self._hold_lease(job_id)
            download = await transport.open(
                url, options, offset=start, length=wanted.length, validator=remote.validator
            )

        def filled(upto: int) -> cmd.FillRanges:
            part = (ByteRange(synced, upto - synced),)
            return cmd.FillRanges(index, part, remote.size or 0, remote.validator)

        try:
            if download.offset != start:
                if download.remote.validator not in (None, remote.validator):
                    # If-Range did not match: a new version since the stat. The ranges held
                    # are of the old one, so the file starts over from the new one's.
                    await self._commit(job_id, cmd.RestartFile(index, "the remote file changed"))
                    raise _Changed
                raise TransferError(
                    hresult.BG_E_RANDOM_ACCESS_NOT_SUPPORTED,
                    "the server no longer honours byte ranges",
                    context=ErrorContext.REMOTE_FILE,
                    transient=False,
                    response_headers=download.remote.headers,
                )
            job = self._job(job_id)
            throttle = Throttle(self, job, download)
            key, last = (job_id, index), time.monotonic()
            before = job.files[index].bytes_transferred - start  # the file's other ranges
            async for chunk in download:
                chunk = chunk[: end - position]
                if not chunk:
                    break
                try:
                    localfile.pwrite_all(fd, chunk, position)
                except OSError as exc:
                    raise local_error(exc, "the temp file") from exc
                position += len(chunk)
                self.live_progress[key] = before + position
                await throttle.charge(len(chunk))
                self._check_size(job, before + position)  # the bytes this file holds
                now = time.monotonic()
                if position - synced >= self.checkpoint_bytes or now - last >= (
                    self.checkpoint_interval
                ):
                    await asyncio.to_thread(os.fdatasync, fd)
                    await self._commit(job_id, filled(position))
                    synced, last = position, now
            if position < end:
                raise TransferError(
                    hresult.BG_E_CONNECTION_CLOSED,
                    f"got {position - start} of the {wanted.length} bytes at {start}",
                    transient=True,
                )
            await asyncio.to_thread(os.fdatasync, fd)
            await self._commit(job_id, filled(position))
            synced = position
        except (asyncio.CancelledError, TransferError) as exc:
            # Stopped or cut off: the bytes that came since the last claim are kept.
            if position > synced and (isinstance(exc, asyncio.CancelledError) or exc.transient):
                with contextlib.suppress(Exception):
                    await download.aclose()
                await self._last_checkpoint(job_id, fd, filled(position))
            raise
        finally:
            await download.aclose()
            self._bg_sockets.discard(getattr(download, "socket", None))


def _take_over_ranges(
    source: str, target: str, ranges: Sequence[ByteRange], size: int
) -> str | None:
    """Copy the ``ranges`` another worker's temp file holds into ours, at their offsets, in
    a file laid out as the remote file; synced. Why the file must restart, or None."""
    try:
        with open(source, "rb") as src, localfile.new_temp(target) as dst:
            if os.fstat(src.fileno()).st_size != size:
                return f"another worker's temp file {source} is not the file's size"
            os.ftruncate(dst.fileno(), size)
            for r in ranges:
                assert r.length is not None
                done = 0
                while done < r.length:
                    at = r.offset + done
                    n = os.copy_file_range(src.fileno(), dst.fileno(), r.length - done, at, at)
                    if n == 0:
                        return f"another worker's temp file {source} ends inside its ranges"
                    done += n
            os.fsync(dst.fileno())
    except OSError as exc:
        return f"cannot take over another worker's temp file {source}: {exc.strerror}"
    return None


class _Changed(Exception):
    """A range came from a newer version than the fill's stat saw; the file restarted."""


def _outside(r: ByteRange, size: int) -> bool:
    """A requested range the file of ``size`` bytes does not hold (the whole of an empty
    file, 0 to the end, is in it)."""
    if r.end is not None:
        return r.end > size
    return r.offset >= size and r.offset > 0
