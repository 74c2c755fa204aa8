"""Uploads and upload-replies: the engine's runs of an upload job's file through an
``Uploader`` (BITS upload protocol), and the reply's fetch (a mixin of ``Engine``). The
methods use the engine's state, which ``Engine.__init__`` sets."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from backhaul.adapters import localfile, registry
from backhaul.adapters.download import Throttle
from backhaul.adapters.jobrun import local_error, name_file
from backhaul.core import command as cmd
from backhaul.core import hresult
from backhaul.core.error import TransferError
from backhaul.core.job import Job
from backhaul.core.port import Uploader
from backhaul.core.url import same_origin, with_login_of
from backhaul.core.vocabulary import ErrorContext, JobType

# The smallest fragment a rate-limited upload sends (a BITS fragment is a request of its own).
MIN_LIMITED_FRAGMENT: Final = 64 * 1024


def default_uploaders() -> Mapping[str, Uploader]:
    """Every installed uploader (entry-point group ``backhaul.uploaders``), built lazily."""
    return registry.uploaders()


class Uploads:
    """The upload half of ``Engine``."""

    def uploader_for(self, remote_name: str) -> Uploader:
        if self._uploaders is None:
            self._uploaders = default_uploaders()
        return registry.transport_for(self._uploaders, remote_name)

    async def _upload_file(self, job_id: str, index: int) -> None:
        """Send the local file in fragments from the offset the server holds; the
        local file must not change meanwhile (BG_E_LOCAL_FILE_CHANGED, fatal). A server
        that lost the session (BG_E_SESSION_NOT_FOUND) gets a new one, from byte 0. A URL
        the server refuses (an expired signature) goes to the URL refresher, as a download's
        does; the session goes on at the new URL of the same file."""
        refreshed = 0
        while True:
            remote_name = self._job(job_id).files[index].remote_name
            try:
                try:
                    await self._upload_once(job_id, index)
                except TransferError as exc:
                    if exc.hresult != hresult.BG_E_SESSION_NOT_FOUND:
                        raise
                    restart = cmd.RestartFile(index, "the server lost the session")
                    await self._commit(job_id, restart)
                    await self._upload_once(job_id, index)
                return
            except TransferError as exc:
                name_file(exc, index, remote_name)
                if refreshed < self.url_refreshes and await self._refresh_url(job_id, index, exc):
                    refreshed += 1
                    continue  # the same session from the server's offset, at the new URL
                raise

    async def _upload_once(self, job_id: str, index: int) -> None:
        self._hold_lease(job_id)
        job = self._job(job_id)
        f = job.files[index]
        uploader = self.uploader_for(f.remote_name)
        reply = job.job_type is JobType.UPLOAD_REPLY
        try:
            fd = os.open(f.local_name, os.O_RDONLY)
        except OSError as exc:
            raise local_error(exc, Path(f.local_name)) from exc
        key = (job_id, index)
        position = claimed = f.bytes_transferred
        try:
            size, version = _local_version(fd)
            self.live_sizes[key] = size  # a display knows it before the first checkpoint
            if f.validator is not None and f.validator != version:
                raise _local_changed(f.local_name)
            async with self._connections:
                session = await uploader.begin(
                    self._url(f), self._options(job), size=size, token=f.upload_token, reply=reply
                )
            if session.token != f.upload_token:
                # Recorded before any fragment, so a crash can re-open this session.
                await self._commit(job_id, cmd.OpenUploadSession(index, session.token))
            await self._connected(job_id)
            if getattr(session, "offset_known", True):
                position = session.offset
            else:
                # The server cannot be asked: send from our checkpoint (the server's
                # Ack corrects us). When every byte was acknowledged, an upload has only
                # Close-Session left (perhaps sent already, its answer lost: the server
                # answers a repeated one 200, where a fragment of the closed session would
                # be "session not found" and start the upload over); an upload-reply
                # resends the tail to get the final Ack, and the reply URL, again.
                position = f.bytes_transferred if f.upload_token == session.token else 0
                told = getattr(session, "acknowledged", None)
                if position >= size and not reply and told is not None:
                    told(size)
                elif position >= size:
                    position = max(size - 64 * 1024, 0)
            last = time.monotonic()
            throttle = Throttle(self, job)
            while position < size:
                step = self._fragment_size(throttle)
                data = os.pread(fd, min(step, size - position), position)
                if not data or _local_version(fd)[1] != version:
                    raise _local_changed(f.local_name)
                position = await session.send(data, position)
                await throttle.charge(len(data))
                self.live_progress[key] = position
                if time.monotonic() - last >= self.checkpoint_interval:
                    last, claimed = time.monotonic(), position
                    self._post(job_id, cmd.Checkpoint(index, position, size, version))
            apply_security = getattr(session, "apply_security", None)
            if job.acl_flags and apply_security is not None:  # ACL flags (bits-core.md §13)
                from backhaul.adapters import acl  # needs the smb extra: only SMB gets here

                try:
                    descriptor = await asyncio.to_thread(acl.source_descriptor, f.local_name)
                except ValueError as exc:
                    raise TransferError(
                        hresult.E_INVALIDARG,
                        f"{f.local_name}: its {acl.XATTR_NAME} is not a security descriptor",
                        context=ErrorContext.LOCAL_FILE,
                        transient=False,
                    ) from exc
                await apply_security(descriptor, job.acl_flags)
            reply_url = await session.finish()
        except BaseException as exc:
            self._forget_live(job_id, index)  # a finished upload's: when its event is logged
            if isinstance(exc, OSError):
                raise local_error(exc, Path(f.local_name)) from exc
            if position > claimed and (
                isinstance(exc, asyncio.CancelledError)
                or (isinstance(exc, TransferError) and exc.transient)
            ):
                # Stopped or cut off: the server acknowledged ``position`` bytes; claim
                # them, as a download claims what it received (a display, and a server
                # that cannot be asked for its offset, start from there).
                last_one = cmd.Checkpoint(index, position, size, version)
                await self._last_checkpoint(job_id, None, last_one)
            raise
        finally:
            os.close(fd)
        if reply:
            if not reply_url:
                raise TransferError(
                    hresult.BG_E_INVALID_SERVER_RESPONSE,
                    "the server gave no BITS-Reply-URL for an upload-reply job",
                    context=ErrorContext.REMOTE_APPLICATION,
                    transient=False,
                )
            self._reply_sessions[job_id] = session
            # Recorded without its secrets: a password (joined from the upload URL) is the
            # file's, put back at the fetch (``_reply_url``); a signed query is sealed.
            # Recorded before the file is finished: a Suspend (or a crash) between the two
            # then leaves the file to upload again, whose final Ack tells the URL again,
            # never a finished file without its reply URL, which nothing could learn again.
            recorded, _password, query = self.store.secrets.seal_url(reply_url)
            await self._commit(job_id, cmd.LocateReply(recorded, query))
        await self._commit(job_id, cmd.Checkpoint(index, size, size, version))
        # HTTP_RESPONSE_HEADERS of an upload: the session's last reply (the final Ack, or the
        # Close-Session's), for sessions that keep one.
        block = self._recorded_headers(getattr(session, "response_headers", None), job_id, index)
        await self._commit(job_id, cmd.FinishFile(index, size, response_headers=block))

    def _fragment_size(self, throttle: Throttle) -> int:
        """``upload_fragment``, but no more than a quarter second of the slowest rate the
        job is held to now (64 KiB at least): a fragment goes out at the link's speed and
        is charged to the rate limiter after, so a 4 MiB fragment under a 256 KiB/s limit
        was a 4 MiB burst, then a 16 s pause."""
        rates = [r for name in throttle.buckets if (r := self.limiter.rate(name))]
        if not rates:
            return self.upload_fragment
        return max(MIN_LIMITED_FRAGMENT, min(self.upload_fragment, int(min(rates) / 4)))

    async def _abort_uploads(self, job: Job) -> None:
        """Cancel of an upload job: tell the server (Cancel-Session), retrying a while."""
        for f in job.files:
            if f.upload_token is None:
                continue
            for attempt in range(5):
                try:
                    uploader = self.uploader_for(f.remote_name)
                    size = f.bytes_total
                    if size is None:
                        size = os.stat(f.local_name).st_size
                    session = await uploader.begin(
                        self._url(f),
                        self._options(job),
                        size=size,
                        token=f.upload_token,
                        reply=job.job_type is JobType.UPLOAD_REPLY,
                    )
                    await session.abort()
                    break
                except OSError:
                    break  # the source is gone and its size unknown: the server's
                    # session timeout will remove the session
                except TransferError as exc:
                    if not exc.transient:
                        break
                    await asyncio.sleep(min(2**attempt, 30))

    def _reply_url(self, job: Job, recorded: str) -> str:
        """The reply URL to request: its sealed query put back, and the upload URL's login
        (user and password) when the reply is on the same server, as the upload's
        credentials are the job's for that server."""
        spec = job.files[0].spec if job.files else None
        password = None
        if spec and spec.password is not None and same_origin(spec.remote_name, recorded):
            recorded = with_login_of(spec.remote_name, recorded)
            password = spec.password
        return self.store.secrets.open_url(recorded, password, job.reply_query)

    async def _fetch_reply(self, job_id: str) -> None:
        """Upload-reply: download the reply (ranged, resumable) into the reply temp file,
        then close the upload session (``_close_reply_session``)."""
        job = self._job(job_id)
        url = job.reply_url
        if url is None:
            raise TransferError(
                hresult.BG_E_INVALID_SERVER_RESPONSE,
                "no reply URL was recorded",
                context=ErrorContext.REMOTE_APPLICATION,
                transient=False,
            )
        url = self._reply_url(job, url)
        tmp = localfile.reply_temp_path(job)
        offset = job.reply_bytes_transferred if job.reply_bytes_total is not None else 0
        if offset == job.reply_bytes_total and localfile.checkpoint_lost(tmp, offset) is None:
            # Fetched whole by an attempt whose Close-Session failed: only that is left (the
            # server may have deleted the reply since, if that Close-Session got there).
            await self._close_reply_session(job_id)
            return
        if offset and localfile.checkpoint_lost(tmp, offset) is not None:
            offset = 0  # the reply's temp file was deleted or cut: fetch it again whole
        transport = self.transport_for(url)
        async with self._connections:
            download = await transport.open(url, self._options(job), offset=offset)
        try:
            size = download.remote.size
            position = download.offset
            await self._commit(job_id, cmd.ProgressReply(size, position))
            fd = localfile.open_temp(tmp, os.O_RDWR | os.O_CREAT)
            try:
                os.ftruncate(fd, position)
                last = time.monotonic()
                async for chunk in download:
                    localfile.pwrite_all(fd, chunk, position)
                    position += len(chunk)
                    if time.monotonic() - last >= self.checkpoint_interval:
                        last = time.monotonic()
                        await asyncio.to_thread(os.fdatasync, fd)
                        self._post(job_id, cmd.ProgressReply(size, position))
                await asyncio.to_thread(os.fdatasync, fd)
            finally:
                os.close(fd)
        finally:
            await download.aclose()
        await self._commit(job_id, cmd.ProgressReply(position, position))
        await self._close_reply_session(job_id)

    async def _close_reply_session(self, job_id: str) -> None:
        """Close-Session, only once the reply is here: the server deletes the reply when it
        gets it (bits-upload.md §2.4, §6.1). The session of an earlier engine (stopped, or
        restarted while the job waited to retry) is re-opened with the token the file
        recorded. A transient failure (the uploader resent it already) fails the attempt:
        the retry closes the session without fetching the reply again. A refusal ends it:
        BITS never resends on 1xx-4xx, and the server's session timeout removes the session."""
        job = self._job(job_id)
        session = self._reply_sessions.pop(job_id, None)
        try:
            if session is None:
                f = job.files[0]
                if f.upload_token is None:
                    return
                size = f.bytes_total
                if size is None:
                    size = os.stat(f.local_name).st_size
                async with self._connections:
                    session = await self.uploader_for(f.remote_name).begin(
                        self._url(f),
                        self._options(job),
                        size=size,
                        token=f.upload_token,
                        reply=True,
                    )
            await session.close()
        except TransferError as exc:
            if exc.transient:
                raise
        except OSError:
            pass  # the source is gone and its size unknown: left to the session timeout


def _local_version(fd: int) -> tuple[int, str]:
    st = os.fstat(fd)
    return st.st_size, f"size={st.st_size};mtime_ns={st.st_mtime_ns}"


def _local_changed(path: str) -> TransferError:
    return TransferError(
        hresult.BG_E_LOCAL_FILE_CHANGED,
        f"{path} changed during the upload",
        context=ErrorContext.LOCAL_FILE,
        transient=False,
    )
