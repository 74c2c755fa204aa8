"""GroupSync: files that finish together are written, made durable with one syncfs, stamped
and closed in one worker thread, and a failure reaches the caller whose file it is."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from backhaul.adapters import localfile
from backhaul.adapters.localfile import FinishedFile, GroupSync


def recording(calls: list[int]) -> Callable[[int], None]:
    """libc's syncfs, recording the descriptor of each call."""
    real = localfile._syncfs()
    assert real is not None

    def syncfs(fd: int) -> None:
        calls.append(fd)
        real(fd)

    return syncfs


def _written(tmp_path: Path, count: int) -> list[FinishedFile]:
    files = []
    for i in range(count):
        path = str(tmp_path / f"f{i}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.pwrite(fd, b"x" * 4096, 0)
        files.append(FinishedFile(path, fd))
    return files


def test_files_that_finish_together_share_one_syncfs(tmp_path: Path) -> None:
    calls: list[int] = []
    group = GroupSync(recording(calls))
    files = _written(tmp_path, 5)
    fds = [f.fd for f in files]

    async def main() -> None:
        results = await asyncio.gather(*(group.finish([f]) for f in files))
        assert results == [[None]] * 5
        alone = _written(tmp_path, 1)
        assert await group.finish(alone) == [None]  # alone: its own fdatasync, no syncfs

    asyncio.run(main())
    assert len(calls) == 1 and calls[0] in fds
    assert (group.batches, group.files) == (1, 5)
    assert all(f.fd == -1 for f in files)  # closed


def test_files_finishing_while_a_batch_syncs_wait_for_the_next_batch(tmp_path: Path) -> None:
    calls: list[int] = []
    group = GroupSync(recording(calls))
    files = _written(tmp_path, 4)

    async def main() -> None:
        first = asyncio.create_task(group.finish(files[:1]))
        await asyncio.sleep(0)  # its batch (of one) is in its worker thread now
        rest = [asyncio.create_task(group.finish([f])) for f in files[1:]]
        await asyncio.gather(first, *rest)

    asyncio.run(main())
    assert (group.batches, group.files) == (1, 3)  # the three that came later, together


def test_bodies_kept_in_memory_are_created_written_and_stamped(tmp_path: Path) -> None:
    group = GroupSync()
    bodies = [os.urandom(100_000), b"", os.urandom(10)]
    files = [
        FinishedFile(str(tmp_path / f"b{i}"), body=body, stamp=1_600_000_000.0 + i)
        for i, body in enumerate(bodies)
    ]
    nowhere = FinishedFile(str(tmp_path / "missing" / "b"), body=b"lost")

    errors = asyncio.run(group.finish([*files, nowhere]))

    assert errors[:3] == [None, None, None]
    assert isinstance(errors[3], OSError) and errors[3].errno == errno.ENOENT
    for i, body in enumerate(bodies):
        path = tmp_path / f"b{i}"
        assert path.read_bytes() == body
        assert path.stat().st_mtime == 1_600_000_000.0 + i
    assert all(f.fd == -1 and f.body is None for f in [*files, nowhere])


@pytest.mark.parametrize(("lookup", "batches"), [(True, 1), (False, 0)])
def test_libc_syncfs_is_found_and_used_unless_turned_off(
    tmp_path: Path, lookup: bool, batches: int
) -> None:
    group = GroupSync(lookup=lookup)
    files = _written(tmp_path, 3)
    assert asyncio.run(group.finish(files)) == [None] * 3
    assert group.batches == batches


def test_a_failed_syncfs_falls_back_to_each_files_own_fdatasync(tmp_path: Path) -> None:
    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "writeback error somewhere on the filesystem")

    group = GroupSync(failing)
    files = _written(tmp_path, 2)
    unsyncable, writer = os.pipe()  # fdatasync of a pipe: EINVAL, for this caller only
    files.append(FinishedFile("a pipe", writer))

    results = asyncio.run(group.finish(files))

    os.close(unsyncable)
    assert results[:2] == [None, None]
    assert isinstance(results[2], OSError) and results[2].errno == errno.EINVAL
    assert group.batches == 0


@pytest.mark.parametrize("count", [1, 2])
def test_a_cancelled_waiter_does_not_stop_the_others(tmp_path: Path, count: int) -> None:
    group = GroupSync()
    files = _written(tmp_path, count + 1)

    async def main() -> None:
        doomed = asyncio.create_task(group.finish(files[:1]))
        others = [asyncio.create_task(group.finish([f])) for f in files[1:]]
        await asyncio.sleep(0)
        doomed.cancel()
        assert await asyncio.gather(*others) == [[None]] * count

    asyncio.run(main())


def test_a_file_deleted_while_it_was_written_is_an_error_for_its_caller_only(
    tmp_path: Path,
) -> None:
    """Its directory was removed (or the temp file itself): syncing it would let the engine
    claim a file that Complete can never find."""
    calls: list[int] = []
    group = GroupSync(recording(calls))
    files = _written(tmp_path, 3)
    os.unlink(files[1].path)

    results = asyncio.run(group.finish(files))

    assert results[0] is None and results[2] is None
    assert isinstance(results[1], FileNotFoundError) and results[1].errno == errno.ENOENT
    assert len(calls) == 1  # the other two still share one syncfs
    assert all(f.fd == -1 for f in files)
