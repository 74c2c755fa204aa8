"""Downloads: the engine's runs of a download job's files (a mixin of ``Engine``).

A file goes whole (``_download_whole``) or as its ranges (``_download_ranges``); its bytes
go to the temp file and are claimed by checkpoints once synced (see adapters/engine.py's
header). Small files overlap in a window; the claimer (``_claim_files``) logs them in
file order. The methods use the engine's state, which ``Engine.__init__`` sets."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import logging
import os
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Final

import attrs

from backhaul.adapters import localfile
from backhaul.adapters.jobrun import JobGone, local_error, name_file, to_the_end
from backhaul.adapters.yielding import congestion_of, set_congestion
from backhaul.core import command as cmd
from backhaul.core import event as ev
from backhaul.core import hresult
from backhaul.core.error import BitsError, TransferError
from backhaul.core.job import Job
from backhaul.core.port import Download, RemoteFile, RequestOptions, Transport
from backhaul.core.transition import Trigger, rule_for
from backhaul.core.url import holds_url_secret
from backhaul.core.value import ByteRange, Sealed
from backhaul.core.vocabulary import REDIRECT_POLICY_MASK, ErrorContext, JobState, SecurityFlags

log = logging.getLogger("backhaul.engine")

MiB = 1024 * 1024

# A ranged file whose remote changes this many times while its ranges are fetched fails
# with BG_E_REMOTE_FILE_CHANGED (fatal: BITS's message says to Resume).
CHANGES_MET: Final = 3
# Bytes before the checkpoint a resume without a validator fetches again, to compare.
RESUME_OVERLAP: Final = 4096


class Downloads:
    """The download half of ``Engine``."""

    async def _download_files(self, job_id: str, pending: Sequence[int]) -> None:
        """The job's files, started in order. Small files overlap: up to ``file_window``
        are in flight while every one in flight is small (<= ``small_file``); a large
        file runs alone, as BITS runs a job's files one after the other. FileTransferred
        events stay in file order whatever finishes first (see ``_claim_files``)."""
        job = self._job(job_id)
        window = self.file_window if not any(f.ranges for f in job.files) else 1
        run = FileRun(pending)
        self._order[job_id] = run
        claimer = asyncio.create_task(self._claim_files(job_id, run))
        self._finishing[job_id] = claimer
        running: dict[int, asyncio.Task[None]] = {}
        try:
            for index in pending:
                while running and (
                    len(running) >= window
                    or not run.large.isdisjoint(running)
                    or not run.unsized.isdisjoint(running)
                ):
                    run.changed.clear()
                    await run.changed.wait()  # a file in flight got its size, or ended
                    for i in [i for i, t in running.items() if t.done()]:
                        running.pop(i).result()  # the first failure stops the job's transfer
                while run.held > self.held_bodies and not claimer.done():
                    run.released.clear()
                    await run.released.wait()  # the claimer is behind: let it catch up
                if claimer.done():
                    break  # claiming failed: _finished_files tells why
                run.unsized.add(index)
                task = asyncio.create_task(self._download_file(job_id, index))
                task.add_done_callback(lambda _t, i=index: run.ended(i))
                running[index] = task
            for task in running.values():
                await task
        finally:
            for task in running.values():
                task.cancel()
            for task in running.values():
                with contextlib.suppress(BaseException):
                    await task
            run.close()  # the files that never finished: the claiming stops at the first
            self._order.pop(job_id, None)

    async def _claim_files(self, job_id: str, run: FileRun) -> None:
        """Claim the files of ``run`` in file order, whatever order they finish in: a
        batch at a time, every finished file from the next one to claim on. A batch is
        synced together (one ``syncfs``, ``GroupSync``), then each file gets its time
        stamp, its ACLs and its FileTransferred. Claiming stops at the first file that
        ended without finishing (the files after it keep their temp files, unclaimed),
        or at the first error, which ``_finished_files`` raises."""
        futures: list[asyncio.Future[list[ev.Event]]] = []
        try:
            while True:
                batch = run.take()
                if not batch:
                    if run.blocked():
                        break  # done, or the next file ended without finishing
                    run.ready.clear()
                    await run.ready.wait()
                    continue
                try:
                    # The temp files of bodies held in memory are created only now: a worker
                    # that stalled past its lease (another may have finished the job and
                    # Complete cleaned up since) must not leave new ones behind.
                    self._hold_lease(job_id)
                    errors = await to_the_end(self.group_sync.finish(batch))
                    for f, error in zip(batch, errors, strict=True):
                        if error is not None:
                            raise local_error(error, f.path)
                        await self._keep_security(job_id, f.index)
                        try:
                            command = cmd.FinishFile(f.index, f.size, f.digest, f.headers, f.inode)
                            futures.append(self._enqueue(job_id, command))
                        except BitsError as exc:
                            raise JobGone(str(exc)) from exc
                        run.claimed(f.index)
                finally:
                    for f in batch:
                        f.close()  # GroupSync closed them, unless it never ran
                # A failed append stops the claiming (the writer has reloaded the job).
                for future in futures:
                    if future.done():
                        _committed(future)
                futures = [f for f in futures if not f.done()]
        except JobGone:
            if job_id in self._jobs:
                raise
            return  # completed or cancelled meanwhile: the transfer is being stopped too
        finally:
            await self._keep_unclaimed(job_id, run.stop())
        for future in futures:
            await asyncio.wait([future])
            _committed(future)

    async def _keep_unclaimed(self, job_id: str, files: list[_Finished]) -> None:
        """Files whose bytes all arrived after the claiming stopped short of them (an earlier
        file was still coming, or failed, when the turn ended: Suspend, a time slice, an
        error): FileTransferred must stay in file order, so they are not transferred yet,
        but their bytes are not lost either. Written and synced as a batch, then claimed as
        a checkpoint of the whole file, so that the next turn asks the server only whether
        the file is still the same (a resume at its end) instead of fetching it again from
        byte 0. Only where a last checkpoint may be taken (``_last_checkpoint``)."""
        if not files:
            return
        try:
            job = self._jobs.get(job_id)
            if job is None or job.dynamic_content:  # dynamic content restarts anyway
                return
            if rule_for(job.state, Trigger.DATA_RECEIVED) is None:
                return
            self._hold_lease(job_id)
            errors = await to_the_end(self.group_sync.finish(files))
            for f, error in zip(files, errors, strict=True):
                if error is None:
                    whole = cmd.Checkpoint(f.index, f.size, f.size, f.validator, f.headers)
                    self._post(job_id, whole)
        except (OSError, JobGone) as exc:
            log.info("the finished files of job %s stay unclaimed: %s", job_id, exc)
        finally:
            for f in files:
                f.close()

    async def _claimed_before(self, job_id: str, index: int) -> None:
        """Wait until the files before ``index`` are claimed (``index`` claims itself)."""
        run = self._order.get(job_id)
        if run is None:
            return
        while not run.reached(index):
            run.advanced.clear()
            await run.advanced.wait()
        claimer = self._finishing.get(job_id)
        if claimer is not None and claimer.done():
            claimer.result()  # claiming stopped with an error: tell it
        if run.cursor < run.position[index]:
            raise JobGone(f"an earlier file of job {job_id} did not finish")

    async def _recheck_transferred(self, job_id: str) -> None:
        """A job that runs again (after an error, a Suspend, a new file) may hold files
        already transferred whose temp files someone deleted or cut short meanwhile:
        Complete would fail on them for good, or publish them short. Those files restart
        (FileRestarted) and are fetched again with the others. A stat per such file, at
        the start of a run only."""
        job = self._job(job_id)
        for index, lost in localfile.changed_since_transferred(job, range(len(job.files))):
            await self._commit(job_id, cmd.RestartFile(index, lost))

    async def _take_over_file(self, job_id: str, index: int) -> None:
        """Before resuming a file from its checkpoint: its own temp file must still hold the
        checkpointed bytes, and bytes another worker (or an engine without leases)
        checkpointed are copied into this worker's temp file. When they cannot be had, the
        file restarts (FileRestarted) instead of resuming after a hole."""
        job = self._job(job_id)
        f = job.files[index]
        if not f.bytes_transferred:
            return
        if f.temp_worker == self.worker:
            lost = localfile.checkpoint_lost(localfile.file_temp(job, index), f.bytes_transferred)
            if lost is not None:
                await self._commit(job_id, cmd.RestartFile(index, lost))
            return
        mine = localfile.temp_path(job_id, index, f.local_name, self.worker)
        try:
            await asyncio.to_thread(
                _take_over, localfile.file_temp(job, index), mine, f.bytes_transferred
            )
        except TransferError as exc:
            await self._commit(job_id, cmd.RestartFile(index, exc.message))

    async def _download_file(self, job_id: str, index: int) -> None:
        await self._take_over_file(job_id, index)
        refreshed = 0
        while True:
            job = self._job(job_id)
            spec = job.files[index].spec
            try:
                transport = self.transport_for(spec.remote_name)
                options = self._options(job)
                if spec.ranges:
                    await self._download_ranges(job_id, index, transport, options)
                else:
                    await self._download_whole(job_id, index, transport, options)
                return
            except TransferError as exc:
                name_file(exc, index, spec.remote_name)
                target = getattr(exc, "redirect_target", None)
                if target is not None:  # REDIRECT_POLICY_DISALLOW: BITS names the target
                    await self._rename(job_id, index, target)
                if refreshed < self.url_refreshes and await self._refresh_url(job_id, index, exc):
                    refreshed += 1
                    continue  # the same file from its checkpoint, at its new URL
                raise

    async def _refresh_url(self, job_id: str, index: int, exc: TransferError) -> bool:
        """Ask the application's URL refresher for a new URL of a file whose server refused
        it (an expired signed URL: 401, 403 or 410 by default). True once a new name is
        recorded (RemoteNameChanged, as SetRemoteName records it)."""
        refresher = self.url_refresher
        if refresher is None or exc.hresult not in self.url_refresh_codes:
            return False
        handle = self.job(job_id)
        old = self._job(job_id).files[index].remote_name
        try:
            answer = refresher(handle, handle.file(index), exc.hresult)
            if inspect.isawaitable(answer):
                answer = await answer
        except Exception:  # a refresher that raises does not stop the engine: the error stands
            log.exception("the URL refresher failed for file %d of job %s", index, job_id)
            return False
        name, password, query = self.store.secrets.seal_url(str(answer or ""))
        if not name or (name == old and password is None and query is None):
            return False
        try:
            refresh = cmd.SetRemoteName(index, name, password, query, refresh=True)
            await self._enqueue(job_id, refresh)  # not _commit: a refusal is no JobGone
        except BitsError as refused:
            log.warning("the URL refresher's answer for job %s was refused: %s", job_id, refused)
            return False
        log.info("job %s file %d: new URL after %s", job_id, index, hresult.name_of(exc.hresult))
        return True

    async def _report_redirect(self, job_id: str, index: int, remote: RemoteFile) -> None:
        """REDIRECT_POLICY_ALLOW_REPORT: the file's remote name becomes the URL its
        redirects led to (bits-core.md §10), and later requests go there directly."""
        if remote.redirect_target is None:
            return
        policy = self._job(job_id).security_flags & REDIRECT_POLICY_MASK
        if policy == SecurityFlags.REDIRECT_POLICY_ALLOW_REPORT:
            await self._rename(job_id, index, remote.redirect_target)

    async def _rename(self, job_id: str, index: int, url: str) -> None:
        """Record ``url`` as the file's remote name, as SetRemoteName does (its password
        and signed query sealed)."""
        name, password, query = self.store.secrets.seal_url(url)
        if name == self._job(job_id).files[index].remote_name and password is query is None:
            return
        try:
            await self._enqueue(job_id, cmd.SetRemoteName(index, name, password, query))
        except BitsError as refused:  # not _commit: a refusal is no JobGone
            log.warning("job %s file %d keeps its remote name: %s", job_id, index, refused)

    def _hold_lease(self, job_id: str) -> None:
        """Before a request: with leases, this worker's lease must still run (a worker that
        was stopped for longer than its lease finds out here, before fetching anything)."""
        if self.worker is None:
            return
        job = self._jobs.get(job_id)
        if job is None or job.lease_worker != self.worker:
            raise JobGone(f"job {job_id} is not leased by this worker")
        if job.lease_expires is not None and job.lease_expires <= self.clock.now():
            raise JobGone(f"this worker's lease of job {job_id} ran out")

    async def _connected(self, job_id: str) -> None:
        if self._job(job_id).state is JobState.CONNECTING:
            await self._commit(job_id, cmd.Connect())

    async def _download_whole(
        self, job_id: str, index: int, transport: Transport, options: RequestOptions
    ) -> None:
        job = self._job(job_id)
        f = job.files[index]
        url = self._url(f)
        offset = f.bytes_transferred if f.bytes_total is not None else 0
        if job.dynamic_content:
            offset = 0  # dynamic content restarts after any interruption (§7.6)
        # A server that gave no validator (neither ETag nor Last-Modified) gets no If-Range,
        # and nothing else would show a new version of the same size: the resume starts
        # a little before the checkpoint, and those bytes must be the temp file's.
        overlap = min(offset, RESUME_OVERLAP) if offset and not f.validator else 0
        async with self._connections:
            self._hold_lease(job_id)
            download = await transport.open(
                url, options, offset=offset - overlap, validator=f.validator if offset else None
            )
        changed = offset and _remote_changed(f.bytes_total, f.validator, download)
        if changed:
            # The server resumed, but the size or the validator of what it sends is not the
            # recorded one: a new version (a server that ignores If-Range answers 206 with
            # the new version's bytes), so the bytes before the checkpoint are of another.
            # BITS restarts the file.
            await download.aclose()
            await self._commit(job_id, cmd.RestartFile(index, changed))
            offset = 0
            async with self._connections:
                self._hold_lease(job_id)
                download = await transport.open(url, options)
        elif overlap and download.offset == offset - overlap:
            try:
                download = await self._past_overlap(
                    job_id, index, transport, options, download, offset
                )
            except BaseException:
                await download.aclose()
                raise
            offset = download.offset  # 0 when the bytes differed: the file restarted
        try:
            remote = download.remote
            await self._report_redirect(job_id, index, remote)
            run = self._order.get(job_id)
            if run is not None:
                run.sized(index, large=remote.size is None or remote.size > self.small_file)
            if remote.size is None and not job.dynamic_content:
                raise TransferError(
                    hresult.BG_E_MISSING_FILE_SIZE,
                    f"{f.remote_name} sent no size; set the DYNAMIC_CONTENT property to "
                    "download content without one",
                    context=ErrorContext.REMOTE_FILE,
                    transient=False,
                    response_headers=remote.headers,
                )
            if download.offset != offset:
                reason = "the server did not resume at the checkpoint"
                if f.validator and remote.validator != f.validator:
                    reason = "the remote file changed"
                elif None not in (f.bytes_total, remote.size) and remote.size != f.bytes_total:
                    reason = resize_reason(f.bytes_total, remote.size)
                if offset:
                    await self._commit(job_id, cmd.RestartFile(index, reason))
                offset = download.offset
            await self._connected(job_id)
            await self._receive(job_id, index, download, offset, remote, None)
        finally:
            await download.aclose()

    async def _past_overlap(
        self,
        job_id: str,
        index: int,
        transport: Transport,
        options: RequestOptions,
        download: Download,
        offset: int,
    ) -> Download:
        """``download`` starts before the checkpoint at ``offset``: compare what comes
        before it with the temp file's synced bytes there. The same: the download, going on
        from the checkpoint. Not the same (or the temp file cannot show them): the remote
        file changed, the file restarts (FileRestarted), and a download from byte 0."""
        overlap = offset - download.offset
        chunks = aiter(download)
        got = await read_upto(chunks, overlap, "before the checkpoint")
        f = self._job(job_id).files[index]
        tmp = localfile.temp_name(job_id, index, f.local_name, self.worker)
        if got[:overlap] == held_bytes(tmp, download.offset, overlap):
            return _Resumed(download, chunks, got[overlap:], offset)
        await download.aclose()
        why = "the remote file changed: its bytes before the checkpoint are not the same"
        await self._commit(job_id, cmd.RestartFile(index, why))
        async with self._connections:
            self._hold_lease(job_id)
            return await transport.open(self._url(f), options)

    async def _download_ranges(
        self, job_id: str, index: int, transport: Transport, options: RequestOptions
    ) -> None:
        f = self._job(job_id).files[index]
        url = self._url(f)
        for _ in range(CHANGES_MET):
            f = self._job(job_id).files[index]
            async with self._connections:
                self._hold_lease(job_id)
                remote = await transport.stat(url, options)
            await self._report_redirect(job_id, index, remote)
            if f.validator and _version(remote) != f.validator and f.bytes_transferred:
                await self._commit(job_id, cmd.RestartFile(index, "the remote file changed"))
            total = await self._fetch_ranges(job_id, index, transport, options, url, remote)
            # No validator, so no If-Range: a new version of the same size may have come
            # between two ranges, or since a checkpoint. The first bytes fetched again must
            # still be the temp file's (any change after they came shows there).
            if (
                total is not None
                and remote.validator is None
                and not await self._first_range_holds(job_id, index, transport, options, remote)
            ):
                total = None
            if total is not None:
                break
            # A range came from a newer version than the stat saw: the ranges kept so far
            # are of the old one, so the file starts over from the new one's.
            await self._commit(job_id, cmd.RestartFile(index, "the remote file changed"))
        else:
            raise TransferError(
                hresult.BG_E_REMOTE_FILE_CHANGED,
                f"the remote file changed {CHANGES_MET} times while its ranges were fetched",
                context=ErrorContext.REMOTE_FILE,
                transient=False,
            )
        await self._claimed_before(job_id, index)  # FileTransferred stays in file order
        lost = localfile.checkpoint_lost(
            localfile.temp_name(job_id, index, f.local_name, self.worker), total
        )
        if lost is not None:  # deleted while it was written: Complete could not find it
            raise TransferError(
                hresult.hresult_from_win32(hresult.ERROR_FILE_NOT_FOUND),
                lost,
                context=ErrorContext.LOCAL_FILE,
                transient=False,
            )
        await self._keep_security(job_id, index)
        await self._finish_file(job_id, index, total, None)
        run = self._order.get(job_id)
        if run is not None:
            run.claimed(index)

    async def _first_range_holds(
        self,
        job_id: str,
        index: int,
        transport: Transport,
        options: RequestOptions,
        remote: RemoteFile,
    ) -> bool:
        """Whether the server still sends the temp file's first bytes (up to
        RESUME_OVERLAP of the first range) where the first range starts."""
        f = self._job(job_id).files[index]
        (first,) = _resolve(f.ranges[:1], remote)
        length = min(first.length or 0, RESUME_OVERLAP)
        if not length:
            return True
        async with self._connections:
            self._hold_lease(job_id)
            download = await transport.open(
                self._url(f), options, offset=first.offset, length=length
            )
        try:
            if download.offset != first.offset:
                return False  # a 200 with the whole body: not the bytes asked for
            got = await read_upto(aiter(download), length, f"at {first.offset}")
        finally:
            await download.aclose()
        tmp = localfile.temp_name(job_id, index, f.local_name, self.worker)
        return got[:length] == held_bytes(tmp, 0, length)

    async def _fetch_ranges(
        self,
        job_id: str,
        index: int,
        transport: Transport,
        options: RequestOptions,
        url: str,
        remote: RemoteFile,
    ) -> int | None:
        """Fetch the ranges not yet checkpointed, in order, into the temp file: their total
        length, or None when a range's answer came from another version of the file (its
        If-Range did not match: a 200 with a new validator)."""
        f = self._job(job_id).files[index]
        ranges = _resolve(f.ranges, remote)
        total = sum(r.length or 0 for r in ranges)
        await self._connected(job_id)
        done = f.bytes_transferred
        local = 0
        # The checkpoints record the version the ranges come from (_version).
        versioned = attrs.evolve(remote, validator=_version(remote))
        for r in ranges:
            length = r.length or 0
            if local + length <= done:
                local += length
                continue
            skip = done - local if done > local else 0
            async with self._connections:
                self._hold_lease(job_id)
                download = await transport.open(
                    url,
                    options,
                    offset=r.offset + skip,
                    length=length - skip,
                    validator=remote.validator,
                )
            try:
                if None not in (download.remote.size, remote.size) and (
                    download.remote.size != remote.size
                ):
                    return None  # a new size since the stat: another version (no If-Range)
                if download.offset != r.offset + skip:
                    if download.remote.validator not in (None, remote.validator):
                        return None  # the file changed since the stat
                    raise TransferError(
                        hresult.BG_E_INSUFFICIENT_RANGE_SUPPORT,
                        "the server did not honour the requested range",
                        context=ErrorContext.REMOTE_FILE,
                        transient=False,
                        response_headers=download.remote.headers,
                    )
                await self._receive(
                    job_id, index, download, local + skip, versioned, (local + length, total)
                )
            finally:
                await download.aclose()
            local += length
            done = local
        return total

    async def _receive(
        self,
        job_id: str,
        index: int,
        download: Download,
        position: int,
        remote: RemoteFile,
        range_end: tuple[int, int] | None,
    ) -> None:
        """Stream the body into the temp file at ``position`` (local offset)."""
        job = self._job(job_id)
        f = job.files[index]
        tmp = localfile.temp_name(job_id, index, f.local_name, self.worker)
        total = range_end[1] if range_end else remote.size
        if range_end is None and remote.size is not None:
            self._check_size(job, remote.size)  # known too large: not one byte of it
        digest = _hasher(f.spec.expected_digest) if range_end is None else None
        if total is not None:
            self.live_sizes[(job_id, index)] = total
        # HTTP_RESPONSE_HEADERS: this response's header block goes with the file's first
        # event after it (a checkpoint, or its FileTransferred).
        headers = self._recorded_headers(download.remote.headers, job_id, index)
        # A small body of a known size is kept in memory: the claimer creates and writes its
        # temp file in a worker thread, with the batch's sync, so the loop does no file I/O
        # for it. One still arriving after a checkpoint interval goes to its temp file and
        # is checkpointed from then on, like any other.
        body: list[bytes] | None = None
        fd = -1
        if range_end is None and not position and 0 < (remote.size or 0) <= self.buffer_body:
            body = []
        else:
            try:
                # From byte 0 the open truncates; from a checkpoint the bytes after it go.
                flags = os.O_RDWR | os.O_CREAT | (0 if position else os.O_TRUNC)
                fd = localfile.open_temp(tmp, flags)
            except OSError as exc:
                raise local_error(exc, tmp) from exc
        pending: asyncio.Task[None] | None = None
        handed = False
        synced = position
        try:
            if position:
                os.ftruncate(fd, position)
            if digest is not None and position:
                await asyncio.to_thread(_hash_prefix, fd, position, digest)
            synced, last = position, time.monotonic()
            key = (job_id, index)
            throttle = Throttle(self, job, download)
            async for chunk in download:
                if body is not None:
                    body.append(chunk)  # no more than its Content-Length (aiohttp stops there)
                    if time.monotonic() - last >= self.checkpoint_interval:
                        self._hold_lease(job_id)  # as for the claimer's files
                        fd = _spill(tmp, body)  # a slow body: to its file, checkpointed
                        body = None
                else:
                    try:
                        localfile.pwrite_all(fd, chunk, position)
                    except OSError as exc:
                        raise local_error(exc, tmp) from exc
                position += len(chunk)
                await throttle.charge(len(chunk))
                self.live_progress[key] = position
                if digest is not None:
                    digest.update(chunk)
                self._check_size(job, position)
                now = time.monotonic()
                if body is not None:
                    continue  # in memory: nothing to checkpoint
                if pending is None and (
                    now - last >= self.checkpoint_interval
                    or position - synced >= self.checkpoint_bytes
                ):
                    pending = asyncio.create_task(
                        self._checkpoint(
                            job_id, index, fd, position, total, remote.validator, headers
                        )
                    )
                    synced, last, headers = position, now, None
                elif pending is not None and pending.done():
                    pending.result()
                    pending = None
                elif pending is not None and now - last >= self.checkpoint_interval * 3:
                    # The log is behind (a store outage, a stalled disk): stop reading rather
                    # than receive bytes no checkpoint can claim, which a take-over refetches.
                    await pending
                    pending = None
            if pending is not None:
                await pending
                pending = None
            if range_end is not None and position < range_end[0]:
                # A range answered short (its end inside the range asked for): what came
                # is claimed (below), and the next attempt asks for the rest.
                raise TransferError(
                    hresult.BG_E_CONNECTION_CLOSED,
                    f"the range ended {range_end[0] - position} bytes early",
                    transient=True,
                )
            if range_end is not None:
                await self._checkpoint(
                    job_id, index, fd, position, total, remote.validator, headers
                )
                return
            if remote.size is not None and position != remote.size:
                raise TransferError(
                    hresult.BG_E_CONNECTION_CLOSED,
                    f"got {position} of {remote.size} bytes",
                    transient=True,
                )
            if digest is not None:
                await self._verify(job_id, index, f.spec.expected_digest, digest, f.remote_name)
            # The rest (sync, time stamp, ACLs, FileTransferred) is the claimer's, behind
            # the next files' transfers; the file's fd goes with it.
            finished = _Finished(
                tmp,
                fd,
                b"".join(body) if body is not None else None,
                remote.last_modified.timestamp() if remote.last_modified else None,
                index=index,
                size=position,
                digest=f"{digest.name}:{digest.hexdigest()}" if digest else None,
                headers=headers,
                validator=remote.validator,
            )
            fd, handed = -1, True
            if not self._order[job_id].finish(finished):  # the claiming already stopped
                await self._keep_unclaimed(job_id, [finished])
        except (asyncio.CancelledError, TransferError) as exc:
            # Stopped (the engine stops, Suspend, a higher priority or the end of a time
            # slice took the turn) or cut off (a dropped connection, a stall): what arrived
            # since the last checkpoint is kept, so that the next turn does not fetch it
            # again. Not while a checkpoint is still on its way (the two would reach the log
            # out of order), nor for a fatal error.
            if (
                fd >= 0
                and position > synced
                and (pending is None or pending.done())
                and (isinstance(exc, asyncio.CancelledError) or exc.transient)
            ):
                # A second cancellation (asyncio.run cancels every task, then the engine's
                # shutdown cancels its transfers) must not cost the bytes: they are claimed
                # all the same, and the cancellation goes on after.
                again: asyncio.CancelledError | None = None
                try:
                    await download.aclose()  # stop receiving first, then sync what came
                except asyncio.CancelledError as cancelled:
                    again = cancelled
                except Exception:  # closing a broken download: there is nothing to keep
                    pass
                last = cmd.Checkpoint(index, position, total, remote.validator, headers)
                try:
                    await self._last_checkpoint(job_id, fd, last)
                except asyncio.CancelledError as cancelled:
                    again = again or cancelled
                if again is not None and not isinstance(exc, asyncio.CancelledError):
                    raise again from exc
            raise
        finally:
            if pending is not None and not pending.done():
                with contextlib.suppress(BaseException):
                    await pending  # its fdatasync must not outlive the descriptor
            elif pending is not None:
                with contextlib.suppress(BaseException):
                    pending.result()
            if fd >= 0:
                os.close(fd)
            if not handed:  # a finished file's progress stays until its event is logged
                self._forget_live(job_id, index)
            self._bg_sockets.discard(getattr(download, "socket", None))

    async def _finished_files(self, job_id: str) -> None:
        """Wait for the claiming of the files that finished (raises its first error).
        Cancelled, it still waits for the claimer to end: a transfer is over only once no
        temp file can appear any more (Cancel deletes them after it, ``_discard_after``)."""
        claimer = self._finishing.pop(job_id, None)
        if claimer is not None:
            await to_the_end(claimer)

    def _check_size(self, job: Job, position: int) -> None:
        limit = job.max_download_size
        if limit is not None and position > limit:
            raise TransferError(
                hresult.BG_E_MAX_DOWNLOAD_SIZE_LIMIT_REACHED,
                f"the download passed the {limit}-byte limit",
                context=ErrorContext.REMOTE_FILE,
                transient=False,
            )

    async def _verify(
        self, job_id: str, index: int, expected: str | None, digest: Any, remote_name: str
    ) -> None:
        """The expected digest, else BG_E_VALIDATION_FAILED (fatal). The file starts over
        first, as SetValidationState(FALSE) makes it: its checkpoints claimed bytes that
        are wrong somewhere, and a Resume that kept them would fail the same way forever."""
        if expected is None:
            return
        got = f"{digest.name}:{digest.hexdigest()}"
        if got != expected:
            await self._commit(job_id, cmd.RestartFile(index, f"its digest was {got}"))
            raise TransferError(
                hresult.BG_E_VALIDATION_FAILED,
                f"{remote_name}: expected {expected}, got {got}",
                context=ErrorContext.LOCAL_FILE,
                transient=False,
            )

    async def _checkpoint(
        self,
        job_id: str,
        index: int,
        fd: int,
        position: int,
        total: int | None,
        validator: str | None,
        headers: str | Sealed | None = None,
    ) -> None:
        """Make ``position`` bytes durable, then claim them in the log."""
        await asyncio.to_thread(os.fdatasync, fd)
        await self._commit(job_id, cmd.Checkpoint(index, position, total, validator, headers))

    async def _last_checkpoint(
        self, job_id: str, fd: int | None, checkpoint: cmd.Checkpoint | cmd.FillRanges
    ) -> None:
        """A transfer stops in the middle of a file: claim the bytes it received since the
        file's last checkpoint. Only where the table takes the bytes (the job still runs, or
        was suspended: SUSPENDED/data_received) and, with leases, while this worker's lease
        runs; a cancelled job's temp file is deleted instead. The engine's shutdown appends
        it with its EndSlice, a Suspend after its JobSuspended, a failure before its error."""
        job = self._jobs.get(job_id)
        if job is None or rule_for(job.state, Trigger.DATA_RECEIVED) is None:
            return
        try:
            self._hold_lease(job_id)
            if fd is not None:  # an upload's bytes are the server's: nothing to sync here
                synced = asyncio.ensure_future(asyncio.to_thread(os.fdatasync, fd))
                try:
                    await to_the_end(synced)
                finally:
                    # Cancelled while syncing, the sync ran to its end all the same
                    # (to_the_end): what it made durable is claimed before going on.
                    if synced.done() and not synced.cancelled() and synced.exception() is None:
                        self._post(job_id, checkpoint)
            else:
                self._post(job_id, checkpoint)
        except (OSError, JobGone) as exc:
            log.info("no last checkpoint for job %s: %s", job_id, exc)

    def _recorded_headers(
        self, block: str | None, job_id: str, index: int | None
    ) -> str | Sealed | None:
        """A response's header block as the log keeps it: sealed when a header in it can
        carry a secret (a session cookie, a token, by its name), when it holds a signed URL
        (BITS-Reply-URL), and for every job that sends a secret of its own (credentials,
        custom headers, a password in a URL), which a server may echo under any name;
        else as it is."""
        if block is None:
            return None
        job = self._jobs.get(job_id)
        if (
            (job is not None and _sends_secrets(job, index))
            or _SECRET_RESPONSE_HEADER.search(block)
            or holds_url_secret(block)
        ):
            return self.store.secrets.seal(block)
        return block

    async def _keep_security(self, job_id: str, index: int) -> None:
        """ACL flags on a download (bits-core.md §13), as the file completes: keep the
        parts of the remote descriptor the flags name with the temp file (adapters/acl.py).
        Transports without ``security`` (HTTP) ignore the flags, as BITS does."""
        job = self._job(job_id)
        if not job.acl_flags:
            return
        f = job.files[index]
        read = getattr(self.transport_for(f.remote_name), "security", None)
        if read is None:
            return
        async with self._connections:
            descriptor = await read(self._url(f), self._options(job), job.acl_flags)
        if descriptor is None:
            return
        from backhaul.adapters import acl  # needs the smb extra: only SMB jobs get here

        tmp = localfile.temp_path(job_id, index, f.local_name, self.worker)
        try:
            await asyncio.to_thread(acl.write_descriptor, tmp, descriptor)
        except OSError as exc:
            raise local_error(exc, tmp) from exc

    async def _finish_file(self, job_id: str, index: int, size: int, digest: str | None) -> None:
        """Record a file whose bytes are synced in this worker's temp file (with its inode)."""
        f = self._job(job_id).files[index]
        tmp = localfile.temp_name(job_id, index, f.local_name, self.worker)
        try:
            inode: int | None = os.stat(tmp).st_ino
        except OSError:
            inode = None  # Complete finds out what became of it
        await self._commit(job_id, cmd.FinishFile(index, size, digest, inode=inode))


# Response headers that can carry a secret, by a word in their name (Set-Cookie,
# Authentication-Info, X-Auth-Token, X-Amz-Security-Token, X-Api-Key...): a header block
# holding one is sealed in the log.
_SECRET_RESPONSE_HEADER: Final = re.compile(
    r"^[^:\r\n]*(?:auth|cookie|token|secret|key|passw|signature|credential)[^:\r\n]*:",
    re.IGNORECASE | re.MULTILINE,
)


def _sends_secrets(job: Job, index: int | None) -> bool:
    """Does the job send a secret a server could echo back: credentials, custom headers, a
    password in the file's URL?"""
    if job.credentials or job.custom_headers is not None:
        return True
    return (
        index is not None and index < len(job.files) and job.files[index].spec.password is not None
    )


_ENDED: Final = None  # a file whose transfer ended without finishing
_TAKEN: Final = "taken"  # finished, and in the claimer's hands
_CLAIMED: Final = "claimed"  # its FileTransferred is decided


def _spill(tmp: str, body: list[bytes]) -> int:
    """The temp file, created with the bytes kept in memory so far: its descriptor."""
    try:
        return localfile.create_written(tmp, b"".join(body))
    except OSError as exc:
        raise local_error(exc, tmp) from exc


def _committed(future: asyncio.Future[list[ev.Event]]) -> None:
    """A claimed file's append is done: raise its failure (a refused FileTransferred means
    the job moved on: JobGone)."""
    try:
        future.result()
    except BitsError as exc:
        raise JobGone(str(exc)) from exc


@attrs.define(eq=False)
class _Finished(localfile.FinishedFile):
    """A file of a run whose bytes have all arrived, waiting to be claimed."""

    index: int = attrs.field(kw_only=True)
    size: int = attrs.field(kw_only=True)
    digest: str | None = attrs.field(kw_only=True)
    headers: str | Sealed | None = attrs.field(kw_only=True, default=None)
    validator: str | None = attrs.field(kw_only=True, default=None)  # of the response


class FileRun:
    """One ``_download_files`` of a job: the window's view of the files in flight (which
    are large, which have no size yet), and the files that finished, which the claimer
    takes in file order."""

    def __init__(self, order: Sequence[int]) -> None:
        self.order = list(order)
        self.position = {index: i for i, index in enumerate(self.order)}
        self.large: set[int] = set()
        self.unsized: set[int] = set()  # in flight, no size yet
        self.changed = asyncio.Event()  # a file in flight got its size, or ended
        self.done: dict[int, _Finished | str | None] = {}
        self.cursor = 0  # position in ``order`` of the next file to claim
        self.ready = asyncio.Event()  # a file finished or ended: the claimer may go on
        self.advanced = asyncio.Event()  # the cursor moved, or the claiming stopped
        self.stopped = False
        self.held = 0  # bytes of finished bodies in memory that the claimer has not taken
        self.released = asyncio.Event()  # the claimer took some of them, or stopped

    # -- the window ----------------------------------------------------------------------

    def sized(self, index: int, *, large: bool) -> None:
        self.unsized.discard(index)
        if large:
            self.large.add(index)
        self.changed.set()

    def ended(self, index: int) -> None:
        """The file's task is over: finished, claimed by itself, or not."""
        self.unsized.discard(index)
        self.large.discard(index)
        self.changed.set()
        if index not in self.done:
            self.done[index] = _ENDED
            self.ready.set()

    def close(self) -> None:
        """The run is over: the files that never finished ended."""
        for index in self.order:
            self.done.setdefault(index, _ENDED)
        self.ready.set()
        self.changed.set()

    # -- claiming ------------------------------------------------------------------------

    def finish(self, finished: _Finished) -> bool:
        """Hand a finished file to the claimer; False once the claiming stopped (the
        caller keeps its bytes as a checkpoint, ``_keep_unclaimed``)."""
        if self.stopped:
            return False
        self.done[finished.index] = finished
        self.held += len(finished.body or b"")
        self.ready.set()
        return True

    def take(self) -> list[_Finished]:
        """The finished files from the cursor on, in order: now the claimer's."""
        batch: list[_Finished] = []
        for at in range(self.cursor, len(self.order)):
            index = self.order[at]
            entry = self.done.get(index)
            if not isinstance(entry, _Finished):
                break
            self.done[index] = _TAKEN
            batch.append(entry)
            self.held -= len(entry.body or b"")
        self.released.set()
        return batch

    def claimed(self, index: int) -> None:
        """``index`` has its FileTransferred decided: the cursor moves past it (and past
        the files after it that claimed themselves)."""
        self.done[index] = _CLAIMED
        while self.cursor < len(self.order) and (
            self.done.get(self.order[self.cursor]) == _CLAIMED
        ):
            self.cursor += 1
        self.advanced.set()
        self.ready.set()

    def blocked(self) -> bool:
        """Nothing more to claim: every file is claimed, or the next one ended."""
        if self.cursor >= len(self.order):
            return True
        index = self.order[self.cursor]
        return index in self.done and self.done[index] is _ENDED

    def reached(self, index: int) -> bool:
        return self.stopped or self.cursor >= self.position[index]

    def stop(self) -> list[_Finished]:
        """The claiming stopped: the finished files it never took, now the caller's."""
        self.stopped = True
        self.held = 0
        self.released.set()
        left = []
        for index, entry in list(self.done.items()):
            if isinstance(entry, _Finished):
                left.append(entry)
                self.done[index] = _ENDED
        self.advanced.set()
        return left


class Throttle:
    """The rate buckets one transfer takes from, and whether it yields to other traffic,
    for its job's priority as it is now: a priority changed during the transfer applies
    from the next chunk on, as a changed limit does. A job raised to FOREGROUND leaves the
    policy's buckets and stops yielding (bits-core.md §4: foreground jobs are not
    throttled); one lowered to a background priority takes from them from then on. The
    priority is compared once per chunk; the buckets are worked out again only when it
    changed. ``download`` is None for an upload, which the yield controller (it counts
    received bytes) does not measure."""

    def __init__(self, engine: Any, job: Job, download: Download | None = None) -> None:
        self._engine = engine
        self._job_id = job.id
        self._download = download
        self._socket = getattr(download, "socket", None)
        # The socket's own congestion control, to give back when the job turns foreground
        # (a background socket is switched to the kernel's "lp").
        self._congestion = congestion_of(self._socket) if engine.low_priority_tcp else None
        self.priority = job.priority
        self.buckets: list[str] = []
        self.background = False
        self._follow(job)

    def _follow(self, job: Job) -> None:
        engine = self._engine
        self.priority = job.priority
        self.buckets = engine._buckets(job)
        if self._download is None:
            return
        was = self.background
        self.background = engine._yields(job, self._download)
        if was and not self.background:
            engine._bg_sockets.discard(self._socket)  # its bytes are no longer ours
            if self._congestion:
                set_congestion(self._socket, self._congestion)

    async def charge(self, amount: int) -> None:
        """Count ``amount`` bytes just moved; wait while a bucket of the job is in debt."""
        engine = self._engine
        job = engine._jobs.get(self._job_id)
        if job is not None and job.priority is not self.priority:
            self._follow(job)
        if self.background:
            engine.yielder.add(amount)
        if engine.limiter.limited(self.buckets):
            await engine.limiter.take(self.buckets, amount)


def _version(remote: RemoteFile) -> str | None:
    """What a ranged file's checkpoints record as its remote version: the validator, or,
    from a server that sends none, the size ("size:N"). A ranged file's own size is that
    of its ranges, so without this a new version of another size would go unseen and its
    bytes would be joined to the old one's (BITS keys a version on size and time)."""
    if remote.validator is not None or remote.size is None:
        return remote.validator
    return f"size:{remote.size}"


async def read_upto(chunks: AsyncIterator[bytes], length: int, what: str) -> bytes:
    """At least ``length`` bytes of a body (what came with the last of them too)."""
    got = b""
    while len(got) < length:
        try:
            got += await anext(chunks)
        except StopAsyncIteration:
            raise TransferError(
                hresult.BG_E_CONNECTION_CLOSED,
                f"got {len(got)} of the {length} bytes {what}",
                transient=True,
            ) from None
    return got


def held_bytes(tmp: str, offset: int, length: int) -> bytes:
    """The temp file's bytes there (empty when it cannot show them)."""
    try:
        fd = os.open(tmp, os.O_RDONLY)
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)
    except OSError:
        return b""


class _Resumed:
    """A Download opened before the checkpoint whose bytes up to it were checked
    (``_past_overlap``): it goes on from the checkpoint, ``rest`` (what came past it with
    the checked bytes) first."""

    def __init__(
        self, inner: Download, chunks: AsyncIterator[bytes], rest: bytes, offset: int
    ) -> None:
        self.inner, self.chunks, self.rest = inner, chunks, rest
        self.remote, self.offset = inner.remote, offset
        self.socket = getattr(inner, "socket", None)
        self._read: AsyncGenerator[bytes, None] | None = None

    def __aiter__(self) -> AsyncIterator[bytes]:
        self._read = self._from_the_checkpoint()
        return self._read

    async def _from_the_checkpoint(self) -> AsyncGenerator[bytes, None]:
        if self.rest:
            yield self.rest
        async for chunk in self.chunks:
            yield chunk

    async def aclose(self) -> None:
        if self._read is not None:
            await self._read.aclose()
        await self.inner.aclose()


def _remote_changed(size: int | None, validator: str | None, download: Download) -> str | None:
    """A resume that the server honoured (``download.offset`` > 0) of another version than
    the one recorded (``size``, ``validator``): why the file restarts, or None. Its size
    shows it when no validator was sent; its validator when the server ignored If-Range."""
    if not download.offset:
        return None
    remote = download.remote
    if None not in (size, remote.size) and remote.size != size:
        return resize_reason(size, remote.size)
    if None not in (validator, remote.validator) and remote.validator != validator:
        return "the remote file changed: the server resumed another version (If-Range ignored)"
    return None


def resize_reason(was: int | None, now: int | None) -> str:
    return f"the remote file changed: {was} bytes, now {now}"


def _take_over(source: Path, target: Path, length: int) -> None:
    """Another worker wrote (and synced) the first ``length`` bytes into its own temp
    file: copy them into ours, so its later writes, if it still runs, touch nothing of
    ours. Without them the transfer cannot resume: E_FAIL, transient (starts over)."""
    try:
        with open(source, "rb") as src, localfile.new_temp(target) as dst:
            copied = 0
            while copied < length:
                n = os.copy_file_range(src.fileno(), dst.fileno(), length - copied)
                if n == 0:
                    break
                copied += n
            dst.flush()
            os.fsync(dst.fileno())
    except OSError as exc:
        raise TransferError(
            hresult.E_FAIL,
            f"cannot take over {source}: {exc.strerror}",
            context=ErrorContext.LOCAL_FILE,
            transient=True,
        ) from exc
    if copied < length:
        raise TransferError(
            hresult.E_FAIL,
            f"{source} holds {copied} of the {length} checkpointed bytes",
            context=ErrorContext.LOCAL_FILE,
            transient=True,
        )


def _resolve(ranges: Sequence[ByteRange], remote: RemoteFile) -> list[ByteRange]:
    """Give every to-end-of-file range its length, and check ranges lie in the file."""
    resolved = []
    for r in ranges:
        if remote.size is not None and r.offset + (r.length or 0) > remote.size:
            shown = f"{r.offset}-" if r.length is None else f"{r.offset}+{r.length}"  # - : to EOF
            raise TransferError(
                hresult.BG_E_INVALID_RANGE,
                f"range {shown} lies outside the {remote.size}-byte file",
                context=ErrorContext.REMOTE_FILE,
                transient=False,
            )
        if r.length is None:
            if remote.size is None:
                raise TransferError(
                    hresult.BG_E_MISSING_FILE_SIZE,
                    "a range to the end of the file needs the file's size",
                    context=ErrorContext.REMOTE_FILE,
                    transient=False,
                )
            r = ByteRange(r.offset, remote.size - r.offset)
        resolved.append(r)
    return resolved


def _hasher(expected: str | None) -> Any:
    if expected is None:
        return None
    return hashlib.new(expected.split(":", 1)[0])


def _hash_prefix(fd: int, length: int, digest: Any) -> None:
    done = 0
    while done < length:
        block = os.pread(fd, min(4 * MiB, length - done), done)
        if not block:
            break
        digest.update(block)
        done += len(block)
