"""Disk full: downloads into a small tmpfs (8 MiB, mounted by the test as root, unmounted in a
``finally``) that a filler file has almost filled.

Expected (bits-core.md: local file errors): the job goes to TRANSIENT_ERROR with context
LOCAL_FILE and HRESULT_FROM_WIN32(ERROR_DISK_FULL) = 0x80070070; the temp file holds exactly
what the log claims (every checkpointed byte is the source's, nothing claimed is missing); no
file appears under the final name; once the filler is deleted the job resumes from its
checkpoint (``resume()``, or the retry timer) and completes with the right bytes.

Where the disk fills up:

* in the middle of a file, at a chunk boundary (the next ``pwrite`` fails with ENOSPC);
* in the middle of a chunk: the kernel writes what fits and returns a short count (``pwrite``
  returns fewer bytes than asked; only the NEXT write fails with ENOSPC). A writer that does
  not check the count believes the whole chunk is on disk: a checkpoint taken in between
  claims bytes that are not there;
* in the LAST chunk of a file: the short write is the last write, nothing fails, and the file
  is declared transferred while its tail is missing;
* several jobs at once.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path
from typing import Any

import pytest
from reliability_helpers import (
    FileRef,
    FileServer,
    KiB,
    MiB,
    Source,
    check_files,
    check_no_temps,
    check_requests,
    expect_none,
    fill,
    free_bytes,
    make_engine,
    read_streams,
    seed_for,
    sha256,
    size,
    summary,
    tmpfs,
)

from backhaul.adapters import localfile
from backhaul.adapters.manager import TransferJob, TransferManager
from backhaul.adapters.store import StoreUnavailable
from backhaul.core import hresult
from backhaul.core.limit import UNLIMITED
from backhaul.core.vocabulary import ErrorContext, JobPriority, JobState

pytestmark = pytest.mark.slow

TMPFS_SIZE = 8 * MiB
DISK_FULL = 0x80070070
RATE = 16 * MiB  # bytes/s per response: a few checkpoints before the disk fills


async def _until(predicate, what: str, within: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.02)


def _check_temp_matches_log(job: TransferJob, index: int, source: bytes) -> list[str]:
    """The temp file holds every byte the log claims for file ``index``, equal to the source."""
    snap = job.snapshot()
    claimed = snap.files[index].bytes_transferred
    tmp = localfile.file_temp(snap, index)
    if not tmp.exists():
        return [f"file {index}: no temp file, yet {claimed} bytes are claimed"] if claimed else []
    data = tmp.read_bytes()
    bad = []
    if len(data) < claimed:
        bad.append(f"file {index}: the log claims {claimed} bytes, the temp file has {len(data)}")
    if data[:claimed] != source[: len(data[:claimed])]:
        bad.append(f"file {index}: the claimed bytes differ from the source")
    return bad


def _run_disk_full(
    tmp_path: Path, leave: int, sizes: list[int], name: str, **engine_options: Any
) -> dict[str, object]:
    """One job of ``len(sizes)`` files into a tmpfs with ``leave`` bytes free; the last file
    does not fit. Returns the run's figures; raises on any failed check."""
    seed = seed_for(name)
    rng = random.Random(seed)
    small = tmp_path / "small"
    with tmpfs(small, TMPFS_SIZE), FileServer() as server:
        filler = fill(small, leave)
        free = free_bytes(small)
        assert free == leave, f"the tmpfs has {free} bytes free, wanted {leave}"
        datas = [rng.randbytes(n) for n in sizes]
        files = []
        for i, data in enumerate(datas):
            path = f"/f{i}.bin"
            files.append((path, small / f"f{i}.bin", Source(data, rate=RATE)))
            server.add(path, files[-1][2])
        manager = TransferManager(home=tmp_path / "home", limits=UNLIMITED)
        job = manager.create_job(name)
        job.priority = JobPriority.FOREGROUND
        job.minimum_retry_delay = 5
        job.add_files([(server.url(p), d) for p, d, _ in files])
        job.resume()
        engine = make_engine(manager, **engine_options)
        problems: list[str] = []

        async def main() -> dict[str, object]:
            run = asyncio.create_task(engine.run())
            try:
                await _until(
                    lambda: (
                        job.state
                        in (JobState.TRANSIENT_ERROR, JobState.ERROR, JobState.TRANSFERRED)
                    ),
                    "the disk to fill",
                )
                state, error = job.state, job.error
                seen = {"state": state.name, "error": None}
                if error is not None:
                    seen["error"] = f"{error.context.name} {error.hresult:#x} {error.description}"
                if state is not JobState.TRANSIENT_ERROR or error is None:
                    problems.append(f"after the disk filled: {state.name}, error {seen['error']}")
                else:
                    if error.context is not ErrorContext.LOCAL_FILE:
                        problems.append(f"context {error.context.name}, expected LOCAL_FILE")
                    if error.hresult != DISK_FULL:
                        problems.append(f"HRESULT {error.hresult:#x}, expected {DISK_FULL:#x}")
                for i, data in enumerate(datas):
                    problems.extend(_check_temp_matches_log(job, i, data))
                published = [str(d) for _, d, _ in files if d.exists()]
                if published:
                    problems.append(f"files under their final names before Complete: {published}")
                claimed = [f.bytes_transferred for f in job.snapshot().files]
                filler.unlink()  # space returns
                if job.state is JobState.TRANSIENT_ERROR:
                    job.resume()
                await _until(
                    lambda: job.state in (JobState.TRANSFERRED, JobState.ERROR),
                    "the job to finish",
                    30,
                )
                seen["claimed_at_error"] = claimed
                seen["final"] = job.state.name
                return seen
            finally:
                engine.stop()
                await asyncio.wait_for(run, 15)

        seen = asyncio.run(main())
        if job.state is JobState.TRANSFERRED:
            assert job.complete() == hresult.S_OK
        refs = [FileRef(job.id, i, p, d, s) for i, (p, d, s) in enumerate(files)]
        streams = read_streams(manager.store, [job.id])
        problems += check_files(refs, {job.id})
        problems += check_no_temps([small])
        # A full disk stops a file wherever its last checkpoint was; how far behind the
        # writes that checkpoint is depends on the machine's load (fdatasync time), so the
        # refetch is bounded by the file, not by one checkpoint interval. What this test
        # is about is checked above and by check_requests: no claim past the bytes on disk,
        # and every resume starting exactly at the log's checkpoint.
        report = check_requests(server, refs, streams, 8 * MiB, completed={job.id})
        problems += report.violations
        server.wait_quiet()
        manager.close()
        result = {"seed": seed, "free": leave, "sizes": sizes, **seen, "requests": report.requests}
        summary(name, result, tmp_path / "summary.json")
        expect_none(problems, "disk-full problems", f"seed {seed}: {result}")
        return result


def test_disk_full_mid_file_is_a_transient_local_error_and_the_job_resumes(tmp_path: Path) -> None:
    # 3 MiB free: the first file (1 MiB) fits, the second (4 MiB) fills the disk at ~2 MiB.
    _run_disk_full(tmp_path, 3 * MiB, [1 * MiB, 4 * MiB + 123], "disk-full-mid-file")


def test_disk_full_in_the_last_chunk_of_a_file_is_noticed(tmp_path: Path) -> None:
    # 2 MiB + 32 KiB free and a file 1 KiB larger: the disk fills inside the file's last
    # chunk, which the kernel writes only in part (a short pwrite, not an error).
    _run_disk_full(tmp_path, 2 * MiB + 32 * KiB, [2 * MiB + 33 * KiB], "disk-full-last-chunk")


ATTEMPTS = size(10, 30)


def test_disk_full_mid_file_never_leaves_a_checkpoint_claiming_unwritten_bytes(
    tmp_path: Path,
) -> None:
    """The disk fills inside a chunk in mid-file (free space not a multiple of the chunk), with
    a checkpoint due at every chunk: the chunk is written in part (a short pwrite), and the
    next write fails. A checkpoint taken between the two must claim only the bytes on disk;
    if it claims the whole chunk, the resume extends the temp file with zeros there and the
    published file is corrupt. Whether a checkpoint falls in between is a matter of timing,
    so the scenario runs ``ATTEMPTS`` times."""
    for attempt in range(ATTEMPTS):
        _run_disk_full(
            tmp_path / f"a{attempt}",
            3 * MiB + 20 * KiB,
            [4 * MiB + 123],
            f"disk-full-short-write-{attempt}",
            checkpoint_interval=0.0,
            checkpoint_bytes=1,
        )


def test_several_jobs_hit_a_full_disk_and_all_complete_once_space_returns(tmp_path: Path) -> None:
    """Four jobs write at once into 3 MiB free: whichever fill the disk get the disk-full
    error; after the filler goes, every job completes with the right bytes."""
    seed = seed_for("disk-full-several")
    rng = random.Random(seed)
    small = tmp_path / "small"
    with tmpfs(small, TMPFS_SIZE), FileServer() as server:
        filler = fill(small, 3 * MiB)
        manager = TransferManager(home=tmp_path / "home", limits=UNLIMITED)
        refs: list[FileRef] = []
        jobs = []
        for j in range(4):
            data = rng.randbytes(1 * MiB + rng.randrange(512 * KiB))
            source = Source(data, rate=4 * MiB)
            path = f"/j{j}.bin"
            server.add(path, source)
            job = manager.create_job(f"several-{j}")
            job.priority = JobPriority.FOREGROUND
            job.minimum_retry_delay = 5
            job.add_file(server.url(path), small / f"j{j}.bin")
            job.resume()
            jobs.append(job)
            refs.append(FileRef(job.id, 0, path, small / f"j{j}.bin", source))
        engine = make_engine(manager)
        errors: list[str] = []

        async def main() -> None:
            run = asyncio.create_task(engine.run())
            try:
                settled = (JobState.TRANSIENT_ERROR, JobState.ERROR, JobState.TRANSFERRED)
                await _until(lambda: all(j.state in settled for j in jobs), "every job to settle")
                for job, ref in zip(jobs, refs, strict=True):
                    if job.state is JobState.TRANSIENT_ERROR:
                        e = job.error
                        assert e is not None
                        if (e.context, e.hresult) != (ErrorContext.LOCAL_FILE, DISK_FULL):
                            errors.append(f"{job.id[:8]}: {e.context.name} {e.hresult:#x}")
                    elif job.state is JobState.ERROR:
                        errors.append(f"{job.id[:8]}: ERROR {job.error}")
                    errors.extend(_check_temp_matches_log(job, 0, ref.source.data))
                filler.unlink()
                for job in jobs:
                    if job.state is JobState.TRANSIENT_ERROR:
                        job.resume()
                await _until(
                    lambda: all(j.state is JobState.TRANSFERRED for j in jobs), "every job", 30
                )
            finally:
                engine.stop()
                await asyncio.wait_for(run, 15)

        asyncio.run(main())
        full = sum(1 for job in jobs if job.error_count)
        for job in jobs:
            assert job.complete() == hresult.S_OK
        streams = read_streams(manager.store, [j.id for j in jobs])
        problems = errors + check_files(refs, {j.id for j in jobs}) + check_no_temps([small])
        problems += check_requests(server, refs, streams, 2 * MiB, completed=None).violations
        server.wait_quiet()
        manager.close()
        summary("disk-full-several", {"seed": seed, "jobs": 4, "hit_disk_full": full})
        expect_none(problems, "disk-full problems", f"seed {seed}")
        assert full >= 1, "no job hit the full disk: the test did not test it"
        assert sha256(small / "j0.bin") == sha256(refs[0].source.data)
        assert not os.path.exists(filler)


def test_the_store_on_a_full_disk_refuses_api_calls_with_a_typed_error(tmp_path: Path) -> None:
    """The SQLite store itself on a full tmpfs: an application's calls that must append get
    StoreUnavailable with ERROR_DISK_FULL (not the database library's own exception), what
    was refused is not in the log, and the same calls work once space returns."""
    small = tmp_path / "small"
    with tmpfs(small, TMPFS_SIZE):
        manager = TransferManager(home=small / "home", limits=UNLIMITED)
        job = manager.create_job("before")
        filler = fill(small, 0)
        added = 0

        def add() -> None:
            nonlocal added
            job.add_file(f"http://127.0.0.1:9/{added}.bin", tmp_path / f"{added}.bin")
            added += 1

        def first_refusal(call: Any) -> StoreUnavailable:
            for _ in range(500):  # until the log must grow by a page
                try:
                    call()
                except StoreUnavailable as refusal:
                    return refusal
            raise AssertionError("the full disk refused none of 500 calls")

        for call in (add, lambda: manager.create_job("x" * 200)):
            error = first_refusal(call)
            assert error.hresult == DISK_FULL, error
            assert str(error).startswith(f"the store {small / 'home' / 'backhaul.db'} cannot be")
            assert "(the disk is full)" in str(error)
        filler.unlink()
        again = TransferManager(home=small / "home", limits=UNLIMITED)  # the log, read afresh
        assert len(again.get_job(job.id).files()) == added
        add()
        assert len(again.get_job(job.id).files()) == added
        assert manager.create_job("after").display_name == "after"
        again.close()
        manager.close()
