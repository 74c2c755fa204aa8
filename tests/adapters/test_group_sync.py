"""GroupSync: files that finish together are made durable with one syncfs, and a failure
reaches the caller whose file it is."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import pytest

from backhaul.adapters.localfile import GroupSync


def _written(tmp_path: Path, count: int) -> list[int]:
    fds = []
    for i in range(count):
        fd = os.open(tmp_path / f"f{i}", os.O_RDWR | os.O_CREAT, 0o600)
        os.pwrite(fd, b"x" * 4096, 0)
        fds.append(fd)
    return fds


def test_files_that_finish_together_share_one_syncfs(tmp_path: Path) -> None:
    calls: list[int] = []
    group = GroupSync(calls.append)
    fds = _written(tmp_path, 5)

    async def main() -> None:
        await asyncio.gather(*(group.sync(fd) for fd in fds))
        await group.sync(fds[0])  # alone: its own fdatasync, no syncfs

    try:
        asyncio.run(main())
    finally:
        for fd in fds:
            os.close(fd)
    assert len(calls) == 1 and calls[0] in fds
    assert (group.batches, group.files) == (1, 5)


def test_files_finishing_while_a_batch_syncs_wait_for_the_next_batch(tmp_path: Path) -> None:
    calls: list[int] = []
    group = GroupSync(calls.append)
    fds = _written(tmp_path, 4)

    async def main() -> None:
        first = asyncio.create_task(group.sync(fds[0]))
        await asyncio.sleep(0)  # its batch (of one) is in its worker thread now
        rest = [asyncio.create_task(group.sync(fd)) for fd in fds[1:]]
        await asyncio.gather(first, *rest)

    try:
        asyncio.run(main())
    finally:
        for fd in fds:
            os.close(fd)
    assert (group.batches, group.files) == (1, 3)  # the three that came later, together


@pytest.mark.parametrize(("lookup", "batches"), [(True, 1), (False, 0)])
def test_libc_syncfs_is_found_and_used_unless_turned_off(
    tmp_path: Path, lookup: bool, batches: int
) -> None:
    group = GroupSync(lookup=lookup)
    fds = _written(tmp_path, 3)

    async def main() -> None:
        await asyncio.gather(*(group.sync(fd) for fd in fds))

    try:
        asyncio.run(main())
    finally:
        for fd in fds:
            os.close(fd)
    assert group.batches == batches


def test_a_failed_syncfs_falls_back_to_each_files_own_fdatasync(tmp_path: Path) -> None:
    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "writeback error somewhere on the filesystem")

    group = GroupSync(failing)
    fds = _written(tmp_path, 2)
    unsyncable, writer = os.pipe()  # fdatasync of a pipe: EINVAL, for this caller only
    fds += [writer]

    async def main() -> list[BaseException | None]:
        return await asyncio.gather(*(group.sync(fd) for fd in fds), return_exceptions=True)

    try:
        results = asyncio.run(main())
    finally:
        for fd in [*fds, unsyncable]:
            os.close(fd)
    assert results[:2] == [None, None]
    assert isinstance(results[2], OSError) and results[2].errno == errno.EINVAL
    assert group.batches == 0


@pytest.mark.parametrize("count", [1, 2])
def test_a_cancelled_waiter_does_not_stop_the_others(tmp_path: Path, count: int) -> None:
    group = GroupSync(lambda fd: None)
    fds = _written(tmp_path, count + 1)

    async def main() -> None:
        doomed = asyncio.create_task(group.sync(fds[0]))
        others = [asyncio.create_task(group.sync(fd)) for fd in fds[1:]]
        await asyncio.sleep(0)
        doomed.cancel()
        await asyncio.gather(*others)

    try:
        asyncio.run(main())
    finally:
        for fd in fds:
            os.close(fd)
