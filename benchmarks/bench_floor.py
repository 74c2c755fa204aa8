"""How fast can many small files go in this process? The floor under the many-file targets.

Run from the project root::

    .venv/bin/python benchmarks/bench_floor.py [--files64 1000] [--files4 10000] [--rounds 2]

One nginx (tests/peers/nginx.py) serves N x 64 KiB and N x 4 KiB random files from a temp
docroot. For each set, in this one process, each round runs:

* ``bare aiohttp``: one ClientSession, 16 requests in flight, each body written to a new file.
  No sync, no log: what any Python client pays per file.
* ``raw asyncio``: no aiohttp: 16 keep-alive connections, each an ``asyncio.Protocol`` that
  sends a bare GET and cuts the answer at its Content-Length, each body written to a new
  file. No sync, no log: what the loop pays per file below aiohttp's request machinery (the
  floor an HTTP path of our own could reach).
* ``durable pipeline``: backhaul's HttpTransport, 8 requests in flight, bodies kept in memory,
  then created, written, synced (one ``syncfs`` per batch) and closed by ``GroupSync``, and a
  ``FileTransferred`` per file appended in batches to a SQLite event store. The least a
  crash-safe engine must do, with no job fold, scheduler, read model or notifications.
* ``engine``: backhaul's Engine on the same files as one job (created and caught up before the
  clock starts), ``run(until_idle=True)``.

Each row gives the wall time and the event loop thread's CPU time per file (``time.thread_time``
around the run; for the engine it also counts opening and closing the store, about 10 ms). Nothing here spawns a process: a ``backhaul serve`` child adds its start-up
and exit (about 0.25-0.4 s here) on top of the engine row.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import installed
from bench_download import create_jobs, nginx, run_engine_inprocess

from backhaul.adapters.localfile import FinishedFile, GroupSync
from backhaul.adapters.store import open_store
from backhaul.core import event as ev
from backhaul.core.port import RequestOptions
from backhaul.core.vocabulary import JobPriority, JobType
from backhaul.transports.http import HttpTransport

KiB = 1024
TOOLS = ("raw asyncio", "bare aiohttp", "durable pipeline", "engine")


async def bare_aiohttp(urls: Sequence[str], out: Path) -> None:
    limit = asyncio.Semaphore(16)
    async with aiohttp.ClientSession() as session:

        async def one(i: int, url: str) -> None:
            async with limit, session.get(url) as resp:
                body = await resp.read()
            fd = os.open(out / f"{i}.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, body)
            finally:
                os.close(fd)

        await asyncio.gather(*(one(i, u) for i, u in enumerate(urls)))


class _Exchange(asyncio.Protocol):
    """One keep-alive connection for ``raw_asyncio``: GET, then the body by Content-Length
    (nginx's answers to these GETs have one; anything else is an error here)."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.answer: asyncio.Future[bytes] | None = None
        self.length: int | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.length is None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).lower()
            del self.buffer[: end + 4]
            status = head.split(b" ", 2)[1]
            found = head.find(b"\r\ncontent-length:")
            if status != b"200" or found < 0:
                if self.answer is not None and not self.answer.done():
                    self.answer.set_exception(RuntimeError(f"unexpected answer: {head[:200]!r}"))
                return
            self.length = int(head[found + 17 :].split(b"\r\n", 1)[0])
        if len(self.buffer) >= self.length and self.answer is not None:
            body = bytes(self.buffer[: self.length])
            del self.buffer[: self.length]
            self.length = None
            self.answer.set_result(body)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.answer is not None and not self.answer.done():
            self.answer.set_exception(ConnectionError("closed"))

    async def get(self, request: bytes) -> bytes:
        assert self.transport is not None
        self.answer = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return await self.answer


async def raw_asyncio(urls: Sequence[str], out: Path) -> None:
    first = urlsplit(urls[0])
    loop = asyncio.get_running_loop()
    work = iter(enumerate(urls))

    async def connection() -> None:
        transport, exchange = await loop.create_connection(_Exchange, first.hostname, first.port)
        try:
            for i, url in work:
                path = urlsplit(url).path
                request = f"GET {path} HTTP/1.1\r\nHost: {first.netloc}\r\n\r\n".encode()
                body = await exchange.get(request)
                fd = os.open(out / f"{i}.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    os.write(fd, body)
                finally:
                    os.close(fd)
        finally:
            transport.close()

    await asyncio.gather(*(connection() for _ in range(16)))


async def durable_pipeline(urls: Sequence[str], out: Path) -> None:
    transport = HttpTransport()
    options = RequestOptions()
    group = GroupSync()
    store = open_store(str(out / "log.sqlite"))
    job_id = str(uuid.uuid4())
    created = ev.JobCreated(datetime.now(UTC), job_id, JobType.DOWNLOAD, "floor", "me")
    store.append_many([(job_id, 0, [created])])
    version = 1
    finished: dict[int, FinishedFile] = {}
    sizes: dict[int, int] = {}
    ready = asyncio.Event()
    following = iter(range(len(urls)))

    async def fetch() -> None:
        for i in following:
            download = await transport.open(urls[i], options)
            parts = [chunk async for chunk in download]
            await download.aclose()
            body = b"".join(parts)
            sizes[i] = len(body)
            finished[i] = FinishedFile(str(out / f"{i}.bin"), body=body)
            ready.set()

    async def claim() -> None:
        nonlocal version
        cursor = 0
        while cursor < len(urls):
            if cursor not in finished:
                ready.clear()
                await ready.wait()
                continue
            batch = []
            while cursor in finished:
                batch.append((cursor, finished.pop(cursor)))
                cursor += 1
            errors = await group.finish([f for _, f in batch])
            assert not any(errors), errors
            now = datetime.now(UTC)
            events = [ev.FileTransferred(now, i, sizes.pop(i)) for i, _ in batch]
            await asyncio.to_thread(store.append_many, [(job_id, version, events)])
            version += len(events)

    try:
        await asyncio.gather(claim(), *(fetch() for _ in range(8)))
    finally:
        await transport.close()
        store.close()


def engine(urls: Sequence[str], out: Path) -> Callable[[], tuple[float, float]]:
    """Create the job now; the returned call runs the engine and gives its thread CPU."""
    home = out / "home"
    ids = create_jobs(
        home, [(u, out / f"{i}.bin") for i, u in enumerate(urls)], 1, JobPriority.NORMAL
    )

    def run() -> tuple[float, float]:
        start = time.thread_time()
        wall = run_engine_inprocess(home, ids)  # the engine's own run, not the store opening
        return wall, time.thread_time() - start

    return run


def timed(work: Callable[[], Awaitable[None]]) -> tuple[float, float]:
    start, cpu = time.perf_counter(), time.thread_time()
    asyncio.run(work())
    return time.perf_counter() - start, time.thread_time() - cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files64", type=int, default=1000)
    parser.add_argument("--files4", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    installed.compile_package()
    work = Path(tempfile.mkdtemp(prefix="bh-bench-floor."))
    www = work / "www"
    sets = {"64 KiB": (args.files64, 64 * KiB), "4 KiB": (args.files4, 4 * KiB)}
    for name, (count, size) in sets.items():
        folder = www / name.replace(" ", "")
        folder.mkdir(parents=True)
        for i in range(count):
            (folder / f"{i}.bin").write_bytes(os.urandom(size))
    rows: list[tuple[str, str, float, float, int]] = []
    with nginx(www) as server:
        for name, (count, _) in sets.items():
            urls = [f"{server.url}/{name.replace(' ', '')}/{i}.bin" for i in range(count)]
            for r in range(args.rounds):
                for tool in TOOLS:
                    out = work / f"out-{name.replace(' ', '')}-{tool.replace(' ', '-')}-{r}"
                    out.mkdir()
                    if tool == "engine":
                        wall, cpu = engine(urls, out)()
                    elif tool == "bare aiohttp":
                        wall, cpu = timed(lambda u=urls, o=out: bare_aiohttp(u, o))
                    elif tool == "raw asyncio":
                        wall, cpu = timed(lambda u=urls, o=out: raw_asyncio(u, o))
                    else:
                        wall, cpu = timed(lambda u=urls, o=out: durable_pipeline(u, o))
                    rows.append((name, tool, wall, cpu, count))
                    print(
                        f"  .. {count} x {name} r{r} {tool:18} {wall:6.2f} s  "
                        f"loop thread {cpu / count * 1e6:5.0f} us/file",
                        file=sys.stderr,
                        flush=True,
                    )
    print(
        f"{'files':>16} {'what':18} {'wall s':>7} {'loop CPU us/file':>17}  (median of {args.rounds})"
    )
    for name, (count, _) in sets.items():
        for tool in TOOLS:
            mine = [r for r in rows if r[0] == name and r[1] == tool]
            wall = statistics.median(r[2] for r in mine)
            cpu = statistics.median(r[3] / r[4] for r in mine) * 1e6
            print(f"{count:>7} x {name:>6} {tool:18} {wall:7.2f} {cpu:17.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
