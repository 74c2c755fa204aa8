"""The engine end to end with the REAL HTTP transport: a real nginx (tests/peers/nginx.py) and
small aiohttp.web servers that misbehave on purpose, run in the engine's own loop.

Covers a job's life (states, events, temp files, Complete), resume after a dropped connection,
503/429 with Retry-After, fatal 404, a remote file that changed, a server that ignores ranges,
NoProgressTimeout, MaximumDownloadTime, AddFileWithRanges, expected digests and dynamic content.
Long timers run on a ManualClock. bits-core.md §2.2, §5, §7.

This module also holds the helpers the other test_engine_*.py modules import.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import os
import shutil
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest
from aiohttp import web
from peers.nginx import NginxServer

from backhaul.adapters import localfile
from backhaul.adapters.clock import ManualClock
from backhaul.adapters.engine import Engine
from backhaul.adapters.localfile import FinishedFile, GroupSync
from backhaul.adapters.manager import TransferJob, TransferManager
from backhaul.core import event as ev
from backhaul.core import hresult as hr
from backhaul.core import job as jobs
from backhaul.core.error import BitsError
from backhaul.core.vocabulary import (
    CostFlags,
    ErrorContext,
    JobPropertyId,
    JobState,
    NotifyFlags,
    SecurityFlags,
)
from backhaul.transports.file import FileTransport
from backhaul.transports.http import HttpTransport

KiB = 1024
MiB = 1024 * KiB
S = JobState


# =================================================================================================
# Helpers (imported by the other test_engine_*.py modules)
# =================================================================================================


@pytest.fixture(autouse=True)
def _no_store_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """BACKHAUL_STORE would win over home=: the tests must use their own tmp_path store."""
    monkeypatch.delenv("BACKHAUL_STORE", raising=False)
    monkeypatch.delenv("BACKHAUL_HOME", raising=False)


def sha256(data: bytes | Path) -> str:
    raw = data.read_bytes() if isinstance(data, Path) else data
    return hashlib.sha256(raw).hexdigest()


def make_engine(manager: TransferManager, **options: Any) -> Engine:
    """An engine with a fresh HttpTransport and short intervals. Background jobs do not yield
    to the machine's other traffic here (the tests' servers are on loopback, and other test
    runs on the machine would slow them down at random), and the network counts as up and
    unmetered whatever the host's interfaces say."""
    transport = HttpTransport(stall_timeout=5.0, connect_timeout=5.0, chunk_size=64 * KiB)
    settings: dict[str, Any] = {
        "transports": {"http": transport},
        "poll_interval": 0.02,
        "checkpoint_interval": 0.03,
        "yield_bandwidth": False,
    }
    settings.update(options)
    engine = Engine(manager, **settings)
    engine.network_probe = lambda: True
    engine.cost_probe = lambda: int(CostFlags.UNRESTRICTED)
    return engine


@contextlib.asynccontextmanager
async def running(engine: Engine) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``engine`` (not until idle) for the block; stop it and wait for it at the end."""
    task = asyncio.create_task(engine.run())
    try:
        yield task
    finally:
        engine.stop()
        await asyncio.wait_for(task, 15)


async def until(predicate: Callable[[], bool], what: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.01)


async def stays(predicate: Callable[[], bool], what: str, seconds: float = 0.3) -> None:
    """``predicate`` holds the whole time (checked every 10 ms)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert predicate(), what
        await asyncio.sleep(0.01)


def events_of(manager: TransferManager, job_id: str) -> list[ev.Event]:
    return [a.event for a in manager.store.stream(job_id)]


def of_type(events: list[ev.Event], kind: type[ev.Event]) -> list[Any]:
    return [e for e in events if isinstance(e, kind)]


def state_path(manager: TransferManager, job_id: str) -> list[JobState]:
    """The job's states in order, as the log replays them (repeats collapsed)."""
    job: jobs.Job | None = None
    path: list[JobState] = []
    for event in events_of(manager, job_id):
        job = jobs.fold([event], job)
        assert job is not None
        if not path or path[-1] is not job.state:
            path.append(job.state)
    return path


def temp_of(job: TransferJob, index: int) -> Path:
    f = job.snapshot().files[index]
    return localfile.temp_path(job.id, index, f.local_name)


def checkpointed(job: TransferJob, index: int = 0) -> int:
    return job.snapshot().files[index].bytes_transferred


def new_job(
    manager: TransferManager,
    files: list[tuple[str, Path]],
    *,
    name: str = "job",
    start: bool = True,
    **settings: Any,
) -> TransferJob:
    job = manager.create_job(name)
    for key, value in settings.items():
        setattr(job, key, value)
    job.add_files(files)
    if start:
        job.resume()
    return job


class HeldSync(GroupSync):
    """A GroupSync that makes a batch's files only once ``gate`` is set."""

    def __init__(self, gate: asyncio.Event) -> None:
        super().__init__()
        self.gate = gate
        self.held = False

    async def finish(self, files: Sequence[FinishedFile]) -> list[OSError | None]:
        self.held = True
        await self.gate.wait()
        return await super().finish(files)


# -- a fault-injecting file server ----------------------------------------------------------------


@attrs.define
class Hit:
    method: str
    path: str
    range: str | None
    if_range: str | None
    query: str = ""

    @property
    def range_start(self) -> int | None:
        if self.range is None:
            return None
        return int(self.range.removeprefix("bytes=").partition("-")[0])


@attrs.define
class Served:
    """One file of a FaultServer and how it misbehaves.

    ``ranges``: honour Range/If-Range (else always 200 with the whole body, no Accept-Ranges);
    ``length``: send Content-Length (else chunked: dynamic content); ``step``/``delay``: write
    the body ``step`` bytes at a time with ``delay`` seconds between writes (a trickle);
    ``drop_after``: once, close the connection when this offset of the file was sent;
    ``statuses``: answer these statuses first, one per request (with ``retry_after``);
    ``header_delay``: wait this long before answering; ``headers``: sent with every answer
    (the ``statuses`` too); ``token``: a signed URL's signature, the query parameter
    ``token_name`` (``sig``) every request must carry (else 403, as for an expired
    signature); ``cut_range``: once, the 206 for a range starting at ``cut_range[0]`` ends
    ``cut_range[1]`` bytes before the end asked for (a valid, short Content-Range)."""

    data: bytes
    etag: str | None = '"v1"'
    ranges: bool = True
    length: bool = True
    step: int = 0
    delay: float = 0.0
    drop_after: int | None = None
    statuses: list[int] = attrs.field(factory=list)
    retry_after: str | None = None
    header_delay: float = 0.0
    headers: dict[str, str] = attrs.field(factory=dict)
    token: str | None = None
    token_name: str = "sig"
    cut_range: tuple[int, int] | None = None  # (start, bytes): once, a 206 there ends short
    if_range: bool = True  # False: a Range is served whatever the If-Range (a broken server)


class FaultServer:
    """An aiohttp.web server on 127.0.0.1:<free port> serving ``files`` by path.

    Use ``async with`` in the engine's loop, or ``threaded()`` for other processes. It records
    every request (``hits``), how many bodies were cut by the client (``aborted``), dropped on
    purpose (``dropped``) or sent whole (``completed``), and the peak of concurrent requests."""

    def __init__(self, files: dict[str, Served]) -> None:
        self.files = files
        self.hits: list[Hit] = []
        self.active = 0
        self.max_active = 0
        self.aborted = 0
        self.dropped = 0
        self.completed = 0
        self.base = ""
        self._runner: web.AppRunner | None = None

    def url(self, path: str) -> str:
        return self.base + path

    def hits_for(self, path: str, method: str = "GET") -> list[Hit]:
        return [h for h in self.hits if h.path == path and h.method == method]

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{name:.*}", self._handle)
        self._runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=0.1
        )
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        site = web.SockSite(self._runner, sock)
        await site.start()
        self.base = f"http://127.0.0.1:{sock.getsockname()[1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FaultServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @contextlib.contextmanager
    def threaded(self) -> Iterator[FaultServer]:
        """Serve from a background thread with its own loop (for code that runs its own loop
        or another process)."""
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self.start())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.stop())
            loop.close()

        thread = threading.Thread(target=serve, name="fault-server", daemon=True)
        thread.start()
        assert ready.wait(10), "the fault server did not start"
        try:
            yield self
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        f = self.files.get(request.path)
        if f is None:
            return web.Response(status=404, text="no such file")
        self.hits.append(
            Hit(
                request.method,
                request.path,
                request.headers.get("Range"),
                request.headers.get("If-Range"),
                request.query_string,
            )
        )
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            return await self._answer(request, f)
        except asyncio.CancelledError:
            self.aborted += 1
            raise
        except ConnectionError:
            self.aborted += 1
            return web.Response(status=499)
        finally:
            self.active -= 1

    async def _answer(self, request: web.Request, f: Served) -> web.StreamResponse:
        if f.header_delay:
            await asyncio.sleep(f.header_delay)
        if f.token is not None and request.query.get(f.token_name) != f.token:
            return web.Response(status=403, text="signature expired", headers=f.headers)
        if f.statuses:
            status = f.statuses.pop(0)
            extra = {"Retry-After": f.retry_after} if f.retry_after is not None else {}
            return web.Response(status=status, text="not now", headers={**f.headers, **extra})
        size = len(f.data)
        headers: dict[str, str] = dict(f.headers)
        if f.etag is not None:
            headers["ETag"] = f.etag
        if f.ranges:
            headers["Accept-Ranges"] = "bytes"
        start, end, status = 0, size - 1, 200
        spec = request.headers.get("Range")
        if_range = request.headers.get("If-Range")
        if f.ranges and spec and (not f.if_range or if_range in (None, f.etag)):
            first, _, last = spec.removeprefix("bytes=").partition("-")
            start = int(first)
            end = min(int(last), size - 1) if last else size - 1
            if start >= size:
                return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
            status = 206
            if f.cut_range is not None and f.cut_range[0] == start:
                end, f.cut_range = end - f.cut_range[1], None
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        body = f.data[start : end + 1]
        if request.method == "HEAD":
            return web.Response(status=status, body=body, headers=headers)
        resp = web.StreamResponse(status=status, headers=headers)
        if f.length:
            resp.content_length = len(body)
        else:
            resp.enable_chunked_encoding()
        await resp.prepare(request)
        step = f.step or max(len(body), 1)
        sent = 0
        while sent < len(body):
            piece = body[sent : sent + step]
            await resp.write(piece)
            sent += len(piece)
            if f.drop_after is not None and start + sent >= f.drop_after:
                f.drop_after = None
                await asyncio.sleep(0.05)  # let the client read what was sent
                assert request.transport is not None
                request.transport.close()
                self.dropped += 1
                return resp
            if f.delay:
                await asyncio.sleep(f.delay)
        await resp.write_eof()
        self.completed += 1
        return resp


def trickle(data: bytes, **options: Any) -> Served:
    """``data`` sent 16 KiB every 10 ms (about 1.6 MB/s), so checkpoints happen on the way."""
    options.setdefault("step", 16 * KiB)
    options.setdefault("delay", 0.01)
    return Served(data, **options)


def open_temp_files(directory: Path) -> list[str]:
    """The temp files under ``directory`` this process holds open."""
    held = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(str(directory)) and target.endswith(localfile.TEMP_SUFFIX):
                held.append(target)
    return held


# =================================================================================================
# Small files in flight together: claimed in file order
# =================================================================================================


def test_small_files_that_finish_out_of_order_are_claimed_in_file_order(tmp_path: Path) -> None:
    """The first file trickles while the five after it finish: FileTransferred still goes
    0, 1, ... 5 in the log, and every file comes out whole."""
    bodies = [os.urandom(64 * KiB)] + [os.urandom(4 * KiB) for _ in range(5)]
    files = {"/f0": trickle(bodies[0], step=4 * KiB, delay=0.03)}
    files.update({f"/f{i}": Served(bodies[i]) for i in range(1, 6)})
    manager = TransferManager(home=tmp_path / "home")

    async def main() -> TransferJob:
        async with FaultServer(files) as srv:
            dests = [(srv.url(f"/f{i}"), tmp_path / f"f{i}.bin") for i in range(6)]
            job = new_job(manager, dests)
            await make_engine(manager).run(until_idle=True)
            return job

    job = asyncio.run(main())
    assert job.state is S.TRANSFERRED
    done = of_type(events_of(manager, job.id), ev.FileTransferred)
    assert [e.file_index for e in done] == list(range(6))
    assert open_temp_files(tmp_path) == []
    job.complete()
    assert [(tmp_path / f"f{i}.bin").read_bytes() for i in range(6)] == bodies


def test_claiming_stops_at_a_file_that_failed_and_leaves_no_file_open(tmp_path: Path) -> None:
    """File 2 trickles, then its connection drops; files 3 to 5 finish meanwhile. Files 0
    and 1 are claimed, nothing from the failed file on is, no temp file stays open, and the
    retry claims the rest in order."""
    bodies = [os.urandom(4 * KiB) for _ in range(6)]
    bodies[2] = os.urandom(64 * KiB)
    files = {f"/f{i}": Served(bodies[i]) for i in range(6)}
    files["/f2"] = trickle(bodies[2], step=4 * KiB, delay=0.03, drop_after=32 * KiB)
    manager = TransferManager(home=tmp_path / "home")

    async def main() -> TransferJob:
        async with FaultServer(files) as srv:
            dests = [(srv.url(f"/f{i}"), tmp_path / f"f{i}.bin") for i in range(6)]
            job = new_job(manager, dests)
            async with running(make_engine(manager)):
                await until(lambda: job.state is S.TRANSIENT_ERROR, "TRANSIENT_ERROR")
                done = of_type(events_of(manager, job.id), ev.FileTransferred)
                assert [e.file_index for e in done] == [0, 1]
                assert all(srv.hits_for(f"/f{i}") for i in range(3, 6)), "3-5 never ran"
                assert open_temp_files(tmp_path) == []
                # Their bytes are kept as whole-file checkpoints, not thrown away.
                files_now = job.snapshot().files
                assert [files_now[i].bytes_transferred for i in range(3, 6)] == [4 * KiB] * 3
                job.resume()
                await until(lambda: job.state is S.TRANSFERRED, "TRANSFERRED")
                # The retry asked only from their ends (If-Range), never for them again.
                for i in range(3, 6):
                    again = srv.hits_for(f"/f{i}")[1:]
                    assert [h.range for h in again] == [f"bytes={4 * KiB}-"], again
            return job

    job = asyncio.run(main())
    done = of_type(events_of(manager, job.id), ev.FileTransferred)
    assert [e.file_index for e in done] == list(range(6))
    job.complete()
    assert [(tmp_path / f"f{i}.bin").read_bytes() for i in range(6)] == bodies


def test_files_that_finished_behind_a_running_one_are_not_fetched_again_after_suspend(
    tmp_path: Path,
) -> None:
    """File 0 trickles; files 1 and 2 (a body held in memory, and one written to its temp
    file) finish behind it and wait to be claimed in file order. A Suspend then threw their
    bytes away, and the next turn fetched them again from byte 0 (166 MiB of 42 jobs in a
    soak). They are kept as checkpoints of the whole file: the next turn only asks from
    their ends."""
    bodies = [os.urandom(256 * KiB), os.urandom(8 * KiB), os.urandom(768 * KiB)]
    files = {
        "/f0": trickle(bodies[0], step=4 * KiB, delay=0.05),
        "/f1": Served(bodies[1]),
        "/f2": Served(bodies[2]),
    }
    manager = TransferManager(home=tmp_path / "home")

    async def main() -> TransferJob:
        async with FaultServer(files) as srv:
            dests = [(srv.url(f"/f{i}"), tmp_path / f"f{i}.bin") for i in range(3)]
            job = new_job(manager, dests)
            async with running(make_engine(manager)):
                await until(lambda: srv.completed >= 2, "files 1 and 2 sent")
                await asyncio.sleep(0.2)  # received too
                job.suspend()
                await until(
                    lambda: (
                        [f.bytes_transferred for f in job.snapshot().files[1:]]
                        == [len(bodies[1]), len(bodies[2])]
                    ),
                    "files 1 and 2 kept",
                )
                assert job.state is S.SUSPENDED
                job.resume()
                await until(lambda: job.state is S.TRANSFERRED, "TRANSFERRED")
            for i in (1, 2):
                again = srv.hits_for(f"/f{i}")[1:]
                assert [h.range for h in again] == [f"bytes={len(bodies[i])}-"], again
            return job

    job = asyncio.run(main())
    done = of_type(events_of(manager, job.id), ev.FileTransferred)
    assert [e.file_index for e in done] == [0, 1, 2]
    job.complete()
    assert [(tmp_path / f"f{i}.bin").read_bytes() for i in range(3)] == bodies


def test_no_new_file_starts_while_the_claimer_is_far_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small bodies wait in memory for the claimer; when it is slow (here 20 ms a file),
    the transfers stop starting new files once ``held_bodies`` bytes wait, so memory stays
    bounded by that plus the files in flight."""
    from backhaul.adapters.download import FileRun

    bodies = [os.urandom(16 * KiB) for _ in range(40)]
    files = {f"/f{i}": Served(bodies[i]) for i in range(40)}
    manager = TransferManager(home=tmp_path / "home")
    held: list[int] = []
    finish = FileRun.finish

    def counted(self: Any, finished: Any) -> bool:
        taken = finish(self, finished)
        held.append(self.held)
        return taken

    async def slow_claims(self: Engine, job_id: str, index: int) -> None:
        await asyncio.sleep(0.02)

    monkeypatch.setattr(FileRun, "finish", counted)
    monkeypatch.setattr(Engine, "_keep_security", slow_claims)

    async def main() -> TransferJob:
        async with FaultServer(files) as srv:
            job = new_job(manager, [(srv.url(f"/f{i}"), tmp_path / f"f{i}") for i in range(40)])
            engine = make_engine(manager)
            engine.held_bodies = 32 * KiB
            await engine.run(until_idle=True)
            return job

    job = asyncio.run(main())
    assert job.state is S.TRANSFERRED
    assert len(held) == 40
    assert max(held) <= 32 * KiB + 8 * 16 * KiB  # the limit, plus the window in flight
    job.complete()
    assert [(tmp_path / f"f{i}").read_bytes() for i in range(40)] == bodies


def test_ranged_and_whole_files_of_one_job_are_claimed_in_file_order(
    tmp_path: Path, engine_nginx: tuple[NginxServer, Path]
) -> None:
    """A ranged file claims itself once the files before it are claimed; the whole files
    around it go through the claimer: FileTransferred 0, 1, 2, 3 and every file right."""
    server, docroot = engine_nginx
    source = (docroot / "one.bin").read_bytes()
    manager = TransferManager(home=tmp_path / "home")
    job = manager.create_job("mixed")
    job.add_file(f"{server.url}/one.bin", tmp_path / "w0.bin")
    job.add_file(f"{server.url}/one.bin", tmp_path / "r1.bin", ranges=[(10, 20), (0, 5)])
    job.add_file(f"{server.url}/two.bin", tmp_path / "w2.bin")
    job.add_file(f"{server.url}/one.bin", tmp_path / "r3.bin", ranges=[(50, 1)])
    job.resume()

    asyncio.run(make_engine(manager).run(until_idle=True))

    assert job.state is S.TRANSFERRED
    done = of_type(events_of(manager, job.id), ev.FileTransferred)
    assert [e.file_index for e in done] == [0, 1, 2, 3]
    assert open_temp_files(tmp_path) == []
    job.complete()
    assert (tmp_path / "w0.bin").read_bytes() == source
    assert (tmp_path / "r1.bin").read_bytes() == source[10:30] + source[:5]
    assert (tmp_path / "w2.bin").read_bytes() == (docroot / "two.bin").read_bytes()
    assert (tmp_path / "r3.bin").read_bytes() == source[50:51]


# =================================================================================================
# A job's life against nginx
# =================================================================================================

NGINX_FILES = ("one.bin", "two.bin", "three.bin")


def test_a_multi_file_job_goes_through_its_states_and_files_appear_only_at_complete(
    tmp_path: Path, engine_nginx: tuple[NginxServer, Path]
) -> None:
    server, docroot = engine_nginx
    dest = tmp_path / "dest"
    dest.mkdir()
    manager = TransferManager(home=tmp_path / "home")
    flags = NotifyFlags.JOB_TRANSFERRED | NotifyFlags.JOB_ERROR | NotifyFlags.FILE_TRANSFERRED
    job = new_job(
        manager, [(f"{server.url}/{n}", dest / n) for n in NGINX_FILES], notify_flags=int(flags)
    )
    seen_at_file_transferred: list[tuple[bool, int]] = []

    def on_file(handle: TransferJob, info: Any) -> None:
        final = Path(info.local_name)
        temp = Path(info.temporary_name)
        seen_at_file_transferred.append((final.exists(), temp.stat().st_size))

    mark = len(server.access_lines())
    engine = make_engine(manager)
    engine.on("file_transferred", on_file)
    asyncio.run(engine.run(until_idle=True))

    assert job.state is S.TRANSFERRED
    assert state_path(manager, job.id) == [
        S.SUSPENDED,
        S.QUEUED,
        S.CONNECTING,
        S.TRANSFERRING,
        S.TRANSFERRED,
    ]
    events = events_of(manager, job.id)
    assert [e.file_index for e in of_type(events, ev.FileTransferred)] == [0, 1, 2]
    assert isinstance(events[-1], ev.JobTransferred)
    sizes = [(docroot / n).stat().st_size for n in NGINX_FILES]
    assert job.progress.bytes_total == job.progress.bytes_transferred == sum(sizes)
    assert job.progress.files_transferred == 3
    # Before Complete only the temp files exist, whole; the final names do not.
    assert seen_at_file_transferred == [(False, size) for size in sizes]
    temps = [temp_of(job, i) for i in range(3)]
    assert sorted(p.name for p in dest.iterdir()) == sorted(t.name for t in temps)
    assert [t.stat().st_size for t in temps] == sizes

    assert job.complete() == hr.S_OK

    assert manager.get_job(job.id, include_final=True).state is S.ACKNOWLEDGED
    assert sorted(p.name for p in dest.iterdir()) == sorted(NGINX_FILES)
    for n in NGINX_FILES:
        assert sha256(dest / n) == sha256(docroot / n), n
        # HTTP downloads get the server's modification time (bits-core.md §7.2).
        assert int((dest / n).stat().st_mtime) == int((docroot / n).stat().st_mtime)
    assert all(f.progress.completed for f in job.files())
    # One whole GET per file, nothing fetched twice.
    lines = server.access_lines()[mark:]
    assert [(x["request"].split()[:2], x["status"]) for x in lines] == [
        (["GET", f"/{n}"], "200") for n in NGINX_FILES
    ]
    assert [int(x["body_bytes_sent"]) for x in lines] == sizes


def test_a_missing_file_url_names_its_file_and_the_file_protocol(tmp_path: Path) -> None:
    """IBackgroundCopyError::GetFile and GetProtocol: the failing file, and "file" for a
    file:// (or SMB) name."""
    (tmp_path / "here.bin").write_bytes(b"x" * 100)
    manager = TransferManager(home=tmp_path / "home")
    job = new_job(
        manager,
        [
            ((tmp_path / "here.bin").as_uri(), tmp_path / "a"),
            ((tmp_path / "gone.bin").as_uri(), tmp_path / "b"),
        ],
    )
    asyncio.run(make_engine(manager, transports={"file": FileTransport()}).run(until_idle=True))
    assert job.state is S.ERROR
    error = job.error
    assert error is not None
    assert error.hresult == hr.hresult_from_win32(hr.ERROR_FILE_NOT_FOUND)
    assert (error.file_index, error.protocol) == (1, "file")


def test_404_is_fatal_with_the_http_error_on_the_remote_file_and_one_job_error_callback(
    tmp_path: Path, engine_nginx: tuple[NginxServer, Path]
) -> None:
    server, docroot = engine_nginx
    manager = TransferManager(home=tmp_path / "home")
    job = new_job(
        manager,
        [
            (f"{server.url}/one.bin", tmp_path / "one.bin"),
            (f"{server.url}/nope.bin", tmp_path / "x"),
        ],
    )
    errors: list[tuple[str, int]] = []
    transferred: list[str] = []
    engine = make_engine(manager)
    engine.on("job_error", lambda handle, error: errors.append((handle.id, error.hresult)))
    engine.on("job_transferred", lambda handle: transferred.append(handle.id))
    mark = len(server.access_lines())

    asyncio.run(engine.run(until_idle=True))

    assert job.state is S.ERROR
    error = job.error
    assert error is not None
    assert error.hresult == hr.BG_E_HTTP_ERROR_404 == 0x80190194
    assert error.context is ErrorContext.REMOTE_FILE
    assert error.file_index == 1
    assert error.protocol == "http"
    assert job.error_count == 1
    assert errors == [(job.id, 0x80190194)]
    assert transferred == []
    failures = of_type(events_of(manager, job.id), ev.ErrorOccurred)
    assert len(failures) == 1
    assert not failures[0].transient
    statuses = [x["status"] for x in server.access_lines()[mark:]]
    assert statuses == ["200", "404"]  # never retried
    # The file finished before the error is kept by Complete (BG_S_PARTIAL_COMPLETE).
    assert job.complete() == hr.BG_S_PARTIAL_COMPLETE
    assert sha256(tmp_path / "one.bin") == sha256(docroot / "one.bin")
    assert not (tmp_path / "x").exists()


# =================================================================================================
# Transient failures and retries
# =================================================================================================


@pytest.mark.parametrize("retry_by", ["timer", "resume"])
def test_a_dropped_connection_is_transient_and_the_retry_resumes_at_the_checkpoint(
    tmp_path: Path, retry_by: str
) -> None:
    data = os.urandom(512 * KiB)
    served = trickle(data, drop_after=256 * KiB)
    clock = ManualClock()
    manager = TransferManager(home=tmp_path / "home", clock=clock)
    dest = tmp_path / "f.bin"

    async def main() -> TransferJob:
        async with FaultServer({"/f": served}) as srv:
            job = new_job(manager, [(srv.url("/f"), dest)], minimum_retry_delay=5)
            engine = make_engine(manager)
            async with running(engine):
                await until(lambda: job.state is S.TRANSIENT_ERROR, "TRANSIENT_ERROR")
                error = job.error
                assert error is not None
                assert error.hresult == hr.BG_E_CONNECTION_CLOSED
                assert error.context is ErrorContext.GENERAL_TRANSPORT
                assert error.file_index == 0
                assert job.error_count == 1
                # Nothing happens before MinimumRetryDelay on the (manual) clock.
                await stays(lambda: job.state is S.TRANSIENT_ERROR, "waiting for the retry")
                assert len(srv.hits) == 1
                resumed_at = checkpointed(job)
                assert 0 < resumed_at <= 256 * KiB
                if retry_by == "timer":
                    clock.advance(6)
                    engine.wake()
                else:
                    job.resume()  # Resume retries at once, whatever the delay
                await until(lambda: job.state is S.TRANSFERRED, "TRANSFERRED")
            assert [h.range_start for h in srv.hits] == [None, resumed_at]
            assert srv.hits[1].if_range == '"v1"'
            return job

    job = asyncio.run(main())
    events = events_of(manager, job.id)
    failure = of_type(events, ev.ErrorOccurred)[0]
    assert failure.transient
    assert failure.error.hresult == hr.BG_E_CONNECTION_CLOSED
    if retry_by == "timer":
        assert of_type(events, ev.RetryStarted)
    assert state_path(manager, job.id)[-4:] == [
        S.QUEUED,
        S.CONNECTING,
        S.TRANSFERRING,
        S.TRANSFERRED,
    ]
    assert job.complete() == hr.S_OK
    assert dest.read_bytes() == data


def test_the_bytes_received_before_a_dropped_connection_are_kept(tmp_path: Path) -> None:
    """A transient failure in the middle of a body claims what had arrived (a last
    checkpoint, logged before the error): the retry asks for the rest only, even when no
    checkpoint was due yet (the interval here is longer than the test)."""
    data = os.urandom(512 * KiB)
    served = trickle(data, drop_after=256 * KiB)
    manager = TransferManager(home=tmp_path / "home")

    async def main() -> TransferJob:
        async with FaultServer({"/f": served}) as srv:
            job = new_job(manager, [(srv.url("/f"), tmp_path / "f")])
            engine = make_engine(manager, checkpoint_interval=600.0)
            async with running(engine):
                await until(lambda: job.state is S.TRANSIENT_ERROR, "TRANSIENT_ERROR")
                assert checkpointed(job) == 256 * KiB
                job.resume()
                await until(lambda: job.state is S.TRANSFERRED, "TRANSFERRED")
            assert [h.range_start for h in srv.hits] == [None, 256 * KiB]
            return job

    job = asyncio.run(main())
    kinds = [type(e) for e in events_of(manager, job.id)]
    failed = kinds.index(ev.ErrorOccurred)
    assert kinds[failed - 1] is ev.BytesCheckpointed
    assert job.complete() == hr.S_OK
    assert (tmp_path / "f").read_bytes() == data


@pytest.mark.parametrize("lost", ["deleted", "cut short"])
def test_a_temp_file_lost_behind_the_engine_restarts_its_file_instead_of_leaving_a_hole(
    tmp_path: Path, lost: str
) -> None:
    """The checkpointed bytes are in the temp file only. When someone deletes it, or cuts it
    short, while the job waits to retry, a resume after the checkpoint would write the rest
    after a hole of zeros, and Complete would publish that: the file starts over instead."""
    data = os.urandom(512 * KiB)
    served = trickle(data, drop_after=256 * KiB)
    manager = TransferManager(home=tmp_path / "home")
    dest = tmp_path / "f.bin"

    async def main() -> TransferJob:
        async with FaultServer({"/f": served}) as srv:
            job = new_job(manager, [(srv.url("/f"), dest)])
            engine = make_engine(manager, checkpoint_interval=600.0)
            async with running(engine):
                await until(lambda: job.state is S.TRANSIENT_ERROR, "TRANSIENT_ERROR")
                assert checkpointed(job) == 256 * KiB
                temp = temp_of(job, 0)
                if lost == "deleted":
                    temp.unlink()
                else:
                    os.truncate(temp, 100 * KiB)
                job.resume()
                await until(lambda: job.state is S.TRANSFERRED, "TRANSFERRED")
            assert [h.range_start for h in srv.hits] == [None, None]
            return job

    job = asyncio.run(main())
    restarts = of_type(events_of(manager, job.id), ev.FileRestarted)
    assert [r.file_index for r in restarts] == [0]
    assert "gone" in restarts[0].reason if lost == "deleted" else "holds" in restarts[0].reason
    assert job.complete() == hr.S_OK
    assert dest.read_bytes() == data


@pytest.mark.parametrize("ranged", [False, True])
def test_a_temp_file_deleted_while_it_is_written_is_an_error_and_the_resume_refetches_it(
    tmp_path: Path, ranged: bool
) -> None:
    """Its directory removed mid-transfer, say: the engine's descriptor still writes, but to
    a file no one can find. It must not count as transferred (Complete could never publish
    it): the job ends in ERROR, and once the directory is back, Resume fetches the file
    again from byte 0."""
    data = os.urandom(512 * KiB)
    served = trickle(data)
    manager = TransferManager(home=tmp_path / "home")
    folder = tmp_path / "out"
    folder.mkdir()
    dest = folder / "f.bin"

    async def main() -> TransferJob:
        async with FaultServer({"/f": served}) as srv:
            job = manager.create_job("deleted")
            job.add_file(srv.url("/f"), dest, ranges=[(0, 10), (10, None)] if ranged else None)
            job.resume()
            async with running(make_engine(manager)):
                await until(lambda: checkpointed(job) > 0, "a first checkpoint")
                shutil.rmtree(folder)
                await until(lambda: job.state is S.ERROR, "ERROR")
                error = job.error
                assert error is not None
                assert error.hresult == hr.hresult_from_win32(hr.ERROR_FILE_NOT_FOUND)
                assert error.context is ErrorContext.LOCAL_FILE
                assert job.snapshot().files[0].transferred is False
                folder.mkdir()
                before = len(srv.hits_for("/f"))
                job.resume()
                await until(lambda: job.state is S.TRANSFERRED, "TRANSFERRED")
            assert srv.hits_for("/f")[before].range_start in (None, 0)  # from byte 0 again
            return job

    job = asyncio.run(main())
    assert of_type(events_of(manager, job.id), ev.FileRestarted)
    assert job.complete() == hr.S_OK
    assert dest.read_bytes() == data


def test_a_resumed_file_with_an_expected_digest_hashes_the_kept_prefix_too(tmp_path: Path) -> None:
    data = os.urandom(512 * KiB)
    served = trickle(data, drop_after=300 * KiB)
    manager = TransferManager(home=tmp_path / "home")
    dest = tmp_path / "f.bin"

    async def main() -> None:
        async with FaultServer({"/f": served}) as srv:
            job = manager.create_job("digest")
            job.add_file(srv.url("/f"), dest, expected_digest=f"sha256:{sha256(data)}")
            job.resume()
            engine = make_engine(manager)
            async with running(engine):
                await until(lambda: job.state is S.TRANSIENT_ERROR, "TRANSIENT_ERROR")
                resumed_at = checkpointed(job)
                assert resumed_at > 0
                job.resume()
                await until(lambda: job.state is S.TRANSFERRED, "TRANSFERRED")
            assert [h.range_start for h in srv.hits] == [None, resumed_at]

    asyncio.run(main())
    job = next(iter(manager.jobs()))
    done = of_type(events_of(manager, job.id), ev.FileTransferred)
    assert [d.digest for d in done] == [f"sha256:{sha256(data)}"]
    job.complete()
    assert dest.read_bytes() == data


def test_a_checkpoint_in_flight_when_the_connection_drops_is_not_left_on_a_closed_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a slow disk a checkpoint's fdatasync is still running when the body fails. The
    transfer must wait for it (or drop it) before closing the temp file: never fdatasync a
    closed (or since reused) descriptor, never leave a task whose failure nobody reads."""
    data = os.urandom(512 * KiB)
    served = trickle(data, drop_after=256 * KiB)
    manager = TransferManager(home=tmp_path / "home")
    real_fdatasync = os.fdatasync
    synced: list[str] = []
    failures: list[OSError] = []

    def slow_fdatasync(fd: int) -> None:
        # A slow disk: the first sync lasts until the server has dropped the connection.
        deadline = time.monotonic() + 5
        while served.drop_after is not None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.1)
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
            real_fdatasync(fd)
        except OSError as exc:
            failures.append(exc)
            raise
        synced.append(path)

    async def main() -> list[dict[str, Any]]:
        unhandled: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _loop, c: unhandled.append(c))
        monkeypatch.setattr(os, "fdatasync", slow_fdatasync)
        async with FaultServer({"/f": served}) as srv:
            job = new_job(manager, [(srv.url("/f"), tmp_path / "f")])
            engine = make_engine(manager)
            async with running(engine):
                await until(lambda: job.state is S.TRANSIENT_ERROR, "TRANSIENT_ERROR")
                await asyncio.sleep(0.5)  # the checkpoint in flight ends one way or another
                job.resume()
                await until(lambda: job.state is S.TRANSFERRED, "TRANSFERRED")
        gc.collect()
        await asyncio.sleep(0)
        return unhandled

    unhandled = asyncio.run(main())
    assert failures == []
    assert synced
    assert all(path.endswith(localfile.TEMP_SUFFIX) for path in synced), synced
    assert [c.get("message") for c in unhandled] == []
    job = next(iter(manager.jobs()))
    job.complete()
    assert (tmp_path / "f").read_bytes() == data


def test_503_is_transient_then_the_retry_succeeds(tmp_path: Path) -> None:
    data = os.urandom(64 * KiB)
    clock = ManualClock()
    manager = TransferManager(home=tmp_path / "home", clock=clock)

    async def main() -> TransferJob:
        async with FaultServer({"/f": Served(data, statuses=[503])}) as srv:
            job = new_job(manager, [(srv.url("/f"), tmp_path / "f")], minimum_retry_delay=5)
            engine = make_engine(manager)
            async with running(engine):
                await until(lambda: job.state is S.TRANSIENT_ERROR, "TRANSIENT_ERROR")
                error = job.error
                assert error is not None
                assert error.hresult == hr.http_status_hresult(503)
                assert error.context is ErrorContext.REMOTE_FILE
                clock.advance(5.5)
                engine.wake()
                await until(lambda: job.state is S.TRANSFERRED, "TRANSFERRED")
            assert len(srv.hits) == 2
            return job

    job = asyncio.run(main())
    assert job.error_count == 1
    job.complete()
    assert (tmp_path / "f").read_bytes() == data


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_delays_the_retry_beyond_minimum_retry_delay(
    tmp_path: Path, status: int
) -> None:
    data = os.urandom(64 * KiB)
    clock = ManualClock()
    manager = TransferManager(home=tmp_path / "home", clock=clock)
    served = Served(data, statuses=[status], retry_after="30")

    async def main() -> TransferJob:
        async with FaultServer({"/f": served}) as srv:
            job = new_job(manager, [(srv.url("/f"), tmp_path / "f")], minimum_retry_delay=5)
            engine = make_engine(manager)
            async with running(engine):
                await until(lambda: job.state is S.TRANSIENT_ERROR, "TRANSIENT_ERROR")
                failure = of_type(events_of(manager, job.id), ev.ErrorOccurred)[0]
                assert failure.retry_after == 30
                assert failure.error.hresult == hr.http_status_hresult(status)
                clock.advance(6)  # past MinimumRetryDelay, not past Retry-After
                engine.wake()
                await stays(lambda: job.state is S.TRANSIENT_ERROR, "Retry-After is honoured")
                assert len(srv.hits) == 1
                clock.advance(20)  # 26 s
                engine.wake()
                await stays(lambda: job.state is S.TRANSIENT_ERROR, "Retry-After is honoured")
                clock.advance(4.5)  # 30.5 s
                engine.wake()
                await until(lambda: job.state is S.TRANSFERRED, "TRANSFERRED")
            assert len(srv.hits) == 2
            return job

    job = asyncio.run(main())
    job.complete()
    assert (tmp_path / "f").read_bytes() == data


def test_no_progress_timeout_runs_from_the_first_transient_error_and_ends_in_error(
    tmp_path: Path,
) -> None:
    clock = ManualClock()
    manager = TransferManager(home=tmp_path / "home", clock=clock)
    served = Served(b"x" * 1000, statuses=[503] * 10)
    errors: list[int] = []

    async def main() -> TransferJob:
        async with FaultServer({"/f": served}) as srv:
            job = new_job(
                manager,
                [(srv.url("/f"), tmp_path / "f")],
                minimum_retry_delay=5,
                no_progress_timeout=10,
            )
            engine = make_engine(manager)
            engine.on("job_error", lambda handle, error: errors.append(error.hresult))
            async with running(engine):
                await until(lambda: job.error_count == 1, "the first failure")
                clock.advance(6)  # the retry fails again: the timeout still counts from 0 s
                engine.wake()
                await until(lambda: job.error_count == 2, "the second failure")
                assert job.state is S.TRANSIENT_ERROR
                clock.advance(4.5)  # 10.5 s: the timeout (10 s) comes before the retry (11 s)
                engine.wake()
                await until(lambda: job.state is S.ERROR, "ERROR")
                await asyncio.sleep(0.1)
            assert len(srv.hits) == 2
            return job

    job = asyncio.run(main())
    events = events_of(manager, job.id)
    assert len(of_type(events, ev.NoProgressTimedOut)) == 1
    error = job.error
    assert error is not None
    assert error.hresult == hr.http_status_hresult(503)  # the last transient error stays
    assert errors == [hr.http_status_hresult(503)]


def test_maximum_download_time_stops_a_slow_transfer_with_maxdownload_timeout(
    tmp_path: Path,
) -> None:
    data = os.urandom(256 * KiB)
    served = trickle(data, step=4 * KiB, delay=0.05)  # about 3 s
    manager = TransferManager(home=tmp_path / "home")
    errors: list[int] = []

    async def main() -> tuple[TransferJob, float, FaultServer]:
        async with FaultServer({"/f": served}) as srv:
            job = new_job(manager, [(srv.url("/f"), tmp_path / "f")], maximum_download_time=1)
            engine = make_engine(manager)
            engine.on("job_error", lambda handle, error: errors.append(error.hresult))
            started = time.monotonic()
            await asyncio.wait_for(engine.run(until_idle=True), 10)
            elapsed = time.monotonic() - started
            await until(lambda: srv.active == 0, "the server to see the client go")
            return job, elapsed, srv

    job, elapsed, srv = asyncio.run(main())
    assert job.state is S.ERROR
    error = job.error
    assert error is not None
    assert error.hresult == hr.BG_E_MAXDOWNLOAD_TIMEOUT
    assert error.context is ErrorContext.GENERAL_QUEUE_MANAGER
    assert 1.0 <= elapsed < 2.5
    assert of_type(events_of(manager, job.id), ev.MaxDownloadTimeExceeded)
    assert errors == [hr.BG_E_MAXDOWNLOAD_TIMEOUT]
    assert srv.completed == 0
    assert 0 < checkpointed(job) < len(data)


def test_run_until_idle_returns_only_once_its_last_decision_is_in_the_log(tmp_path: Path) -> None:
    """A timer's decision (here MaximumDownloadTime on a ManualClock) is queued without being
    awaited; with a slow log the writer still holds it when the engine looks idle. run() must
    not return before it is appended and observed (state ERROR, job_error called)."""
    data = os.urandom(1 * MiB)
    served = trickle(data, step=4 * KiB, delay=0.02)  # about 5 s: it never finishes here
    clock = ManualClock()
    manager = TransferManager(home=tmp_path / "home", clock=clock)
    errors: list[int] = []
    append_many = manager.store.append_many

    def slow_append_many(batches: Any) -> list[int]:
        time.sleep(0.2)  # a slow disk under the log (called in the writer's thread)
        return append_many(batches)

    async def main() -> tuple[JobState, list[int]]:
        async with FaultServer({"/f": served}) as srv:
            job = new_job(manager, [(srv.url("/f"), tmp_path / "f")], maximum_download_time=5)
            manager.store.append_many = slow_append_many  # type: ignore[method-assign]
            engine = make_engine(manager)
            engine.on("job_error", lambda handle, error: errors.append(error.hresult))
            task = asyncio.create_task(engine.run(until_idle=True))
            await until(lambda: checkpointed(job) > 0, "some progress")
            clock.advance(6)
            engine.wake()
            await asyncio.wait_for(task, 10)
            return job.state, list(errors)  # as run() returns, not later

    state, called = asyncio.run(main())
    assert state is S.ERROR
    assert called == [hr.BG_E_MAXDOWNLOAD_TIMEOUT]


# =================================================================================================
# Remote files that change, and servers that ignore ranges
# =================================================================================================


def test_a_changed_remote_file_restarts_only_that_file_from_zero(tmp_path: Path) -> None:
    first = os.urandom(64 * KiB)
    old, new = os.urandom(512 * KiB), os.urandom(400 * KiB)
    a = Served(first, etag='"a1"')
    b = trickle(old, etag='"b1"', drop_after=256 * KiB)
    clock = ManualClock()
    manager = TransferManager(home=tmp_path / "home", clock=clock)

    async def main() -> tuple[TransferJob, FaultServer, int]:
        async with FaultServer({"/a": a, "/b": b}) as srv:
            job = new_job(
                manager,
                [(srv.url("/a"), tmp_path / "a"), (srv.url("/b"), tmp_path / "b")],
                minimum_retry_delay=5,
            )
            engine = make_engine(manager)
            async with running(engine):
                await until(lambda: job.state is S.TRANSIENT_ERROR, "TRANSIENT_ERROR")
                reached = checkpointed(job, 1)
                assert reached > 0
                b.data, b.etag = new, '"b2"'  # the file changes on the server
                clock.advance(6)
                engine.wake()
                await until(lambda: job.state is S.TRANSFERRED, "TRANSFERRED")
            return job, srv, reached

    job, srv, reached = asyncio.run(main())
    assert len(srv.hits_for("/a")) == 1  # the finished file is not fetched again
    retry = srv.hits_for("/b")[1]
    assert (retry.range_start, retry.if_range) == (reached, '"b1"')
    events = events_of(manager, job.id)
    restarts = of_type(events, ev.FileRestarted)
    assert [r.file_index for r in restarts] == [1]
    assert [e.file_index for e in of_type(events, ev.FileTransferred)] == [0, 1]
    assert job.snapshot().files[1].validator == '"b2"'
    assert job.snapshot().files[1].bytes_total == len(new)
    job.complete()
    assert (tmp_path / "a").read_bytes() == first
    assert (tmp_path / "b").read_bytes() == new


def resumed_after_a_change(
    tmp_path: Path, old: bytes, new: bytes
) -> tuple[TransferManager, TransferJob, FaultServer]:
    """A server with no ETag and no Last-Modified drops the connection at 256 KiB of
    ``old`` (a checkpoint there), then serves ``new``; the job resumed: run to TRANSFERRED."""
    served = trickle(old, etag=None, drop_after=256 * KiB)
    manager = TransferManager(home=tmp_path / "home")

    async def main() -> tuple[TransferJob, FaultServer]:
        async with FaultServer({"/f": served}) as srv:
            job = new_job(manager, [(srv.url("/f"), tmp_path / "f.bin")])
            async with running(make_engine(manager, checkpoint_interval=600.0)):
                await until(lambda: job.state is S.TRANSIENT_ERROR, "TRANSIENT_ERROR")
                assert checkpointed(job) == 256 * KiB
                served.data = new  # the file changes on the server
                job.resume()
                await until(lambda: job.state is S.TRANSFERRED, "TRANSFERRED")
            return job, srv

    job, srv = asyncio.run(main())
    return manager, job, srv


def test_a_206_of_another_version_restarts_the_file(tmp_path: Path) -> None:
    """A server that ignores If-Range answers the resume with 206 and the bytes of a new
    version of the same size, under its new ETag: the engine took them after the old
    version's checkpoint, and the file ended TRANSFERRED, half of each version."""
    old, new = os.urandom(512 * KiB), os.urandom(512 * KiB)
    served = trickle(old, drop_after=256 * KiB, if_range=False)
    manager = TransferManager(home=tmp_path / "home")

    async def main() -> tuple[TransferJob, FaultServer]:
        async with FaultServer({"/f": served}) as srv:
            job = new_job(manager, [(srv.url("/f"), tmp_path / "f.bin")])
            async with running(make_engine(manager, checkpoint_interval=600.0)):
                await until(lambda: job.state is S.TRANSIENT_ERROR, "TRANSIENT_ERROR")
                assert checkpointed(job) == 256 * KiB
                served.data, served.etag = new, '"v2"'
                job.resume()
                await until(lambda: job.state is S.TRANSFERRED, "TRANSFERRED")
            return job, srv

    job, srv = asyncio.run(main())
    hits = srv.hits_for("/f")
    assert [(h.range_start, h.if_range) for h in hits] == [
        (None, None),
        (256 * KiB, '"v1"'),
        (None, None),
    ]
    restarts = of_type(events_of(manager, job.id), ev.FileRestarted)
    assert [r.reason for r in restarts] == [
        "the remote file changed: the server resumed another version (If-Range ignored)"
    ]
    assert job.complete() == hr.S_OK
    assert (tmp_path / "f.bin").read_bytes() == new


@pytest.mark.parametrize(
    ("policy", "state", "renamed"),
    [
        (0, S.TRANSFERRED, False),  # ALLOW_SILENT
        (SecurityFlags.REDIRECT_POLICY_ALLOW_REPORT, S.TRANSFERRED, True),
        (SecurityFlags.REDIRECT_POLICY_DISALLOW, S.ERROR, True),
    ],
    ids=["silent", "report", "disallow"],
)
def test_the_redirect_policy_decides_the_remote_name(
    tmp_path: Path, policy: int, state: S, renamed: bool
) -> None:
    """BITS's redirect policies (§10): ALLOW_SILENT follows and keeps the name;
    ALLOW_REPORT follows and makes the final URL the file's remote name; DISALLOW fails
    (HRESULT_FROM_WIN32 of the 3xx, §2.2) and names the redirect's target. The new name's
    signature is sealed in the log, not written in it."""
    data = os.urandom(64 * KiB)
    manager = TransferManager(home=tmp_path / "home")

    async def old(request: web.Request) -> web.Response:
        raise web.HTTPFound("/new?sig=SECRET-SIGNATURE")

    async def new(request: web.Request) -> web.Response:
        return web.Response(body=data, headers={"ETag": '"n1"'})

    async def main() -> TransferJob:
        app = web.Application()
        app.router.add_get("/old", old)
        app.router.add_get("/new", new)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            job = new_job(
                manager, [(f"http://127.0.0.1:{port}/old", tmp_path / "f.bin")], start=False
            )
            job.security_flags = int(policy)
            job.resume()
            await make_engine(manager).run(until_idle=True)
            return job
        finally:
            await runner.cleanup()

    job = asyncio.run(main())
    assert job.state is state
    name = job.files()[0].remote_name
    if renamed:
        assert name.endswith("/new?sig=<redacted>")
        assert job.snapshot().files[0].spec.query is not None  # the real query, sealed
    else:
        assert name.endswith("/old")
    if state is S.ERROR:
        assert job.error is not None
        assert job.error.hresult == hr.hresult_from_win32(302)
    else:
        job.complete()
        assert (tmp_path / "f.bin").read_bytes() == data
    db = (tmp_path / "home" / "backhaul.db").read_bytes()
    assert b"SECRET-SIGNATURE" not in db


@pytest.mark.parametrize("new_size", [300 * KiB, 200 * KiB, 700 * KiB])
def test_a_remote_file_whose_size_changed_restarts_without_a_validator(
    tmp_path: Path, new_size: int
) -> None:
    """A server that sends no ETag and no Last-Modified gets no If-Range: when its file
    changes size between attempts, the resume's 206 (larger file, or shorter but still past
    the checkpoint) or 416 (shorter than the checkpoint) shows the new size, and the file
    restarts from zero instead of joining two versions (or failing with a 416)."""
    new = os.urandom(new_size)
    manager, job, srv = resumed_after_a_change(tmp_path, os.urandom(512 * KiB), new)
    hits = srv.hits_for("/f")
    assert [(h.range_start, h.if_range) for h in hits] == [
        (None, None),
        (252 * KiB, None),  # 4 KiB before the checkpoint: nothing else to compare with
        (None, None),
    ]
    restarts = of_type(events_of(manager, job.id), ev.FileRestarted)
    assert [r.reason for r in restarts] == [
        f"the remote file changed: {512 * KiB} bytes, now {new_size}"
    ]
    assert job.snapshot().files[0].bytes_total == new_size
    assert job.complete() == hr.S_OK
    assert (tmp_path / "f.bin").read_bytes() == new


@pytest.mark.parametrize("changed", [False, True])
def test_a_resume_without_a_validator_checks_the_bytes_before_the_checkpoint(
    tmp_path: Path, changed: bool
) -> None:
    """A server that sends no ETag and no Last-Modified, and a new version of the same size
    between attempts: no If-Range can catch it, and the size does not show it. The resume
    asks for the 4 KiB before the checkpoint too and compares them with the temp file's:
    the same, it goes on from the checkpoint (4 KiB fetched twice); not the same, the file
    restarts from byte 0 instead of joining two versions."""
    old = os.urandom(512 * KiB)
    new = old[: 100 * KiB] + os.urandom(412 * KiB) if changed else old  # the same size
    manager, job, srv = resumed_after_a_change(tmp_path, old, new)
    starts = [h.range_start for h in srv.hits_for("/f")]
    restarts = of_type(events_of(manager, job.id), ev.FileRestarted)
    if changed:
        assert starts == [None, 252 * KiB, None]
        assert [r.reason for r in restarts] == [
            "the remote file changed: its bytes before the checkpoint are not the same"
        ]
    else:
        assert starts == [None, 252 * KiB]
        assert restarts == []
    assert job.complete() == hr.S_OK
    assert (tmp_path / "f.bin").read_bytes() == new


def test_a_range_request_answered_200_restarts_the_file_from_zero(tmp_path: Path) -> None:
    data = os.urandom(512 * KiB)
    served = trickle(data, ranges=False, drop_after=256 * KiB)
    manager = TransferManager(home=tmp_path / "home")

    async def main() -> tuple[TransferJob, FaultServer]:
        async with FaultServer({"/f": served}) as srv:
            job = new_job(manager, [(srv.url("/f"), tmp_path / "f")])
            engine = make_engine(manager)
            async with running(engine):
                await until(lambda: job.state is S.TRANSIENT_ERROR, "TRANSIENT_ERROR")
                assert checkpointed(job) > 0
                job.resume()
                await until(lambda: job.state is S.TRANSFERRED, "TRANSFERRED")
            return job, srv

    job, srv = asyncio.run(main())
    assert srv.hits[1].range_start is not None  # the engine asked to resume...
    restarts = of_type(events_of(manager, job.id), ev.FileRestarted)  # ...and got the whole body
    assert [r.file_index for r in restarts] == [0]
    job.complete()
    assert (tmp_path / "f").read_bytes() == data


# =================================================================================================
# AddFileWithRanges, digests, dynamic content
# =================================================================================================


def test_ranges_make_a_file_of_the_ranges_in_the_order_given(
    tmp_path: Path, engine_nginx: tuple[NginxServer, Path]
) -> None:
    server, docroot = engine_nginx
    source = (docroot / "one.bin").read_bytes()
    manager = TransferManager(home=tmp_path / "home")
    job = manager.create_job("ranges")
    job.add_file(
        f"{server.url}/one.bin", tmp_path / "r.bin", ranges=[(100, 100), (900, 100), (400, 100)]
    )
    assert job.progress.bytes_total == 300
    job.resume()
    mark = len(server.access_lines())

    asyncio.run(make_engine(manager).run(until_idle=True))

    assert job.state is S.TRANSFERRED
    assert job.progress.bytes_total == job.progress.bytes_transferred == 300
    lines = server.access_lines()[mark:]
    gets = [
        (x["http_range"], x["status"], x["body_bytes_sent"]) for x in lines if "GET" in x["request"]
    ]
    assert gets == [
        ("bytes=100-199", "206", "100"),
        ("bytes=900-999", "206", "100"),
        ("bytes=400-499", "206", "100"),
    ]
    job.complete()
    assert (tmp_path / "r.bin").read_bytes() == source[100:200] + source[900:1000] + source[400:500]


def test_a_range_to_the_end_of_the_file(
    tmp_path: Path, engine_nginx: tuple[NginxServer, Path]
) -> None:
    server, docroot = engine_nginx
    source = (docroot / "two.bin").read_bytes()
    manager = TransferManager(home=tmp_path / "home")
    job = manager.create_job("eof range")
    tail = len(source) - 5000
    job.add_file(f"{server.url}/two.bin", tmp_path / "r.bin", ranges=[(0, 10), (tail, None)])
    assert job.progress.bytes_total is None  # unknown until the size is known
    job.resume()

    asyncio.run(make_engine(manager).run(until_idle=True))

    assert job.state is S.TRANSFERRED
    assert job.progress.bytes_total == job.progress.bytes_transferred == 5010
    job.complete()
    assert (tmp_path / "r.bin").read_bytes() == source[:10] + source[tail:]


@pytest.mark.parametrize("new_size", [600 * KiB, 512 * KiB])
def test_a_ranged_file_without_a_validator_restarts_when_it_changed(
    tmp_path: Path, new_size: int
) -> None:
    """A server that sends neither ETag nor Last-Modified: a new size is one sign of a new
    version (BITS keys on size and time); for one of the same size, the file's first bytes
    are fetched again once its ranges are in, and must still be the temp file's. A ranged
    file cut off mid-range and resumed after the remote file changed must not join the old
    version's bytes to the new one's: it starts over."""
    old, new = os.urandom(512 * KiB), os.urandom(new_size)
    served = trickle(old, etag=None, drop_after=300 * KiB)
    clock = ManualClock()
    manager = TransferManager(home=tmp_path / "home", clock=clock)
    ranges = [(0, 1000), (100 * KiB, None)]

    async def main() -> TransferJob:
        async with FaultServer({"/f": served}) as srv:
            job = manager.create_job("ranged, no validator")
            job.minimum_retry_delay = 5
            job.add_file(srv.url("/f"), tmp_path / "r.bin", ranges=ranges)
            job.resume()
            engine = make_engine(manager)
            async with running(engine):
                await until(lambda: job.state is S.TRANSIENT_ERROR, "TRANSIENT_ERROR")
                assert checkpointed(job) > 1000  # inside the second range
                served.data = new  # a new version, of another size, and still no validator
                clock.advance(6)
                engine.wake()
                await until(lambda: job.state is S.TRANSFERRED, "TRANSFERRED")
            return job

    job = asyncio.run(main())
    restarts = of_type(events_of(manager, job.id), ev.FileRestarted)
    assert [r.file_index for r in restarts] == [0]
    job.complete()
    assert (tmp_path / "r.bin").read_bytes() == new[:1000] + new[100 * KiB :]


def test_a_range_answered_short_keeps_what_came_and_asks_for_the_rest(tmp_path: Path) -> None:
    """A 206 whose Content-Range ends before the end asked for (a valid answer, but not the
    whole range): what came is claimed, the run ends in TRANSIENT_ERROR, and the retry asks
    for the rest only; the ranges after it stay where they belong in the file."""
    data = os.urandom(256 * KiB)
    served = Served(data, cut_range=(100 * KiB, 1000))
    clock = ManualClock()
    manager = TransferManager(home=tmp_path / "home", clock=clock)
    ranges = [(0, 1000), (100 * KiB, 50 * KiB), (200 * KiB, 10)]

    async def main() -> tuple[TransferJob, FaultServer]:
        async with FaultServer({"/f": served}) as srv:
            job = manager.create_job("short range")
            job.minimum_retry_delay = 5
            job.add_file(srv.url("/f"), tmp_path / "r.bin", ranges=ranges)
            job.resume()
            engine = make_engine(manager)
            async with running(engine):
                await until(lambda: job.state is S.TRANSIENT_ERROR, "TRANSIENT_ERROR")
                assert job.error is not None
                assert job.error.hresult == hr.BG_E_CONNECTION_CLOSED
                clock.advance(6)
                engine.wake()
                await until(lambda: job.state is S.TRANSFERRED, "TRANSFERRED")
            return job, srv

    job, srv = asyncio.run(main())
    starts = [h.range_start for h in srv.hits_for("/f") if h.method == "GET"]
    assert starts[-3:] == [100 * KiB, 150 * KiB - 1000, 200 * KiB]
    assert job.complete() == hr.S_OK
    wanted = data[:1000] + data[100 * KiB : 150 * KiB] + data[200 * KiB : 200 * KiB + 10]
    assert (tmp_path / "r.bin").read_bytes() == wanted


def test_a_correct_expected_digest_passes_and_is_recorded(
    tmp_path: Path, engine_nginx: tuple[NginxServer, Path]
) -> None:
    server, docroot = engine_nginx
    digest = f"sha256:{sha256(docroot / 'two.bin')}"
    manager = TransferManager(home=tmp_path / "home")
    job = manager.create_job("digest")
    job.add_file(f"{server.url}/two.bin", tmp_path / "two.bin", expected_digest=digest)
    job.resume()

    asyncio.run(make_engine(manager).run(until_idle=True))

    assert job.state is S.TRANSFERRED
    done = of_type(events_of(manager, job.id), ev.FileTransferred)
    assert [d.digest for d in done] == [digest]
    assert job.files()[0].digest == digest
    job.complete()
    assert sha256(tmp_path / "two.bin") == sha256(docroot / "two.bin")


def test_a_wrong_expected_digest_is_a_fatal_validation_failure(
    tmp_path: Path, engine_nginx: tuple[NginxServer, Path]
) -> None:
    server, _ = engine_nginx
    manager = TransferManager(home=tmp_path / "home")
    job = manager.create_job("bad digest")
    job.add_file(
        f"{server.url}/one.bin", tmp_path / "one.bin", expected_digest="sha256:" + "0" * 64
    )
    job.resume()

    asyncio.run(make_engine(manager).run(until_idle=True))

    assert job.state is S.ERROR
    error = job.error
    assert error is not None
    assert error.hresult == hr.BG_E_VALIDATION_FAILED
    assert error.context is ErrorContext.LOCAL_FILE
    assert not of_type(events_of(manager, job.id), ev.FileTransferred)
    assert job.cancel() == hr.S_OK
    assert list(tmp_path.glob("*.bin")) == []
    assert list(tmp_path.glob(".*.bhtmp")) == []


def test_a_failed_digest_starts_the_file_over_so_a_resume_can_pass(tmp_path: Path) -> None:
    """Bytes a checkpoint claimed were wrong (a corrupting hop, fixed since): the digest
    fails, and the file starts over as SetValidationState(FALSE) makes it. Before, the
    checkpoint stayed and every Resume asked for nothing more and failed again."""
    good = os.urandom(1 * MiB)
    bad = good[:1000] + b"X" * 10 + good[1010:]
    served = trickle(bad, drop_after=600 * KiB)
    manager = TransferManager(home=tmp_path / "home")
    dest = tmp_path / "f.bin"

    async def main() -> TransferJob:
        async with FaultServer({"/f": served}) as srv:
            job = manager.create_job("digest")
            job.add_file(srv.url("/f"), dest, expected_digest=f"sha256:{sha256(good)}")
            job.resume()
            async with running(make_engine(manager)):
                await until(lambda: job.state is S.TRANSIENT_ERROR, "the drop", 20)
                assert checkpointed(job) > 0
                served.data = good
                job.resume()
                await until(lambda: job.state in (S.ERROR, S.TRANSFERRED), "the digest", 20)
                assert job.state is S.ERROR
                assert job.error is not None
                assert job.error.hresult == hr.BG_E_VALIDATION_FAILED
                assert checkpointed(job) == 0
                job.resume()
                await until(lambda: job.state in (S.ERROR, S.TRANSFERRED), "the refetch", 20)
            return job

    job = asyncio.run(main())
    assert job.state is S.TRANSFERRED
    job.complete()
    assert dest.read_bytes() == good


@pytest.mark.parametrize("size", [4 * KiB, 3 * MiB], ids=["kept in memory", "streamed"])
def test_a_link_at_the_temp_name_is_never_written_through_nor_published(
    tmp_path: Path, size: int
) -> None:
    """Temp names are predictable (GetTemporaryName shows them): a symbolic link planted at
    one sent the bytes outside the destination directory, and Complete renamed the link into
    place. The open refuses links (ERROR, access denied) and nothing is published."""
    (tmp_path / "dest").mkdir()
    (tmp_path / "elsewhere").mkdir()
    victim = tmp_path / "elsewhere" / "victim.txt"
    victim.write_bytes(b"precious\n")
    data = os.urandom(size)
    dest = tmp_path / "dest" / "f.bin"
    manager = TransferManager(home=tmp_path / "home")

    async def main() -> TransferJob:
        async with FaultServer({"/f": Served(data)}) as srv:
            job = new_job(manager, [(srv.url("/f"), dest)], start=False)
            os.symlink(victim, temp_of(job, 0))
            job.resume()
            await make_engine(manager).run(until_idle=True)
            return job

    job = asyncio.run(main())
    assert victim.read_bytes() == b"precious\n"
    assert job.state is S.ERROR
    assert job.error is not None
    assert job.error.hresult == hr.hresult_from_win32(hr.ERROR_ACCESS_DENIED)
    assert "symbolic link" in job.error.description
    assert job.complete() == hr.BG_S_PARTIAL_COMPLETE
    assert not dest.exists() and not dest.is_symlink()


def test_complete_never_renames_a_link_into_place(tmp_path: Path) -> None:
    """A transferred file whose temp was swapped for a link before Complete: Complete fails
    and the link stays where it was, not at the destination."""
    data = os.urandom(64 * KiB)
    dest = tmp_path / "f.bin"
    manager = TransferManager(home=tmp_path / "home")

    async def main() -> TransferJob:
        async with FaultServer({"/f": Served(data)}) as srv:
            job = new_job(manager, [(srv.url("/f"), dest)])
            await make_engine(manager).run(until_idle=True)
            return job

    job = asyncio.run(main())
    assert job.state is S.TRANSFERRED
    temp = temp_of(job, 0)
    other = tmp_path / "other.bin"
    other.write_bytes(data)  # the same size: Complete's size check does not see it
    temp.unlink()
    temp.symlink_to(other)
    with pytest.raises(BitsError) as refused:
        job.complete()
    assert refused.value.hresult == hr.hresult_from_win32(hr.ERROR_ACCESS_DENIED)
    assert not dest.exists() and not dest.is_symlink()
    assert temp.is_symlink()


def test_complete_tells_its_own_renamed_file_from_an_older_one_of_the_same_size(
    tmp_path: Path,
) -> None:
    """A file whose temp file is gone and whose destination holds a file of its size was
    either renamed there by an earlier Complete that failed later on (published: the
    next Complete goes on), or its temp file was deleted behind the engine over an older
    file of that size: that one is not the transferred file, and Complete must not publish
    the job over it. The two differ by inode (a rename keeps the temp file's)."""
    data = [os.urandom(64 * KiB) for _ in range(3)]
    dests = [tmp_path / f"f{i}.bin" for i in range(3)]
    manager = TransferManager(home=tmp_path / "home")

    async def main() -> TransferJob:
        routes = {f"/f{i}": Served(d) for i, d in enumerate(data)}
        async with FaultServer(routes) as srv:
            job = new_job(manager, [(srv.url(f"/f{i}"), d) for i, d in enumerate(dests)])
            await make_engine(manager).run(until_idle=True)
            return job

    job = asyncio.run(main())
    assert job.state is S.TRANSFERRED
    dests[1].mkdir()  # in the way of the second file: Complete fails there
    with pytest.raises(BitsError):
        job.complete()
    assert dests[0].read_bytes() == data[0] and not temp_of(job, 0).exists()
    dests[1].rmdir()
    stale = os.urandom(64 * KiB)
    dests[2].write_bytes(stale)  # an older version of the same size was there...
    temp_of(job, 2).unlink()  # ... and the new one's temp file is deleted behind the engine

    with pytest.raises(BitsError) as refused:
        job.complete()
    assert "f2.bin" in str(refused.value)
    assert dests[2].read_bytes() == stale
    assert job.state is S.ERROR  # as for any transferred file lost before Complete
    assert dests[0].read_bytes() == data[0]  # the file the first Complete renamed is kept


@pytest.mark.parametrize("length", [True, False], ids=["told", "dynamic"])
def test_max_download_size_bounds_a_file(tmp_path: Path, length: bool) -> None:
    """BITS_JOB_PROPERTY_MAX_DOWNLOAD_SIZE: a file past the limit is fatal
    (BG_E_MAX_DOWNLOAD_SIZE_LIMIT_REACHED, the file named). A size the server tells is
    refused before any byte is written; dynamic content stops once it passes the limit.
    A file within the limit in the same job is fetched whole."""
    small, big = os.urandom(16 * KiB), os.urandom(512 * KiB)
    served = Served(big, etag=None, ranges=length, length=length, step=32 * KiB)
    manager = TransferManager(home=tmp_path / "home")

    async def main() -> TransferJob:
        async with FaultServer({"/small": Served(small), "/big": served}) as srv:
            job = manager.create_job("bounded")
            job.set_property(JobPropertyId.MAX_DOWNLOAD_SIZE, 64 * KiB)
            if not length:
                job.set_property(JobPropertyId.DYNAMIC_CONTENT, True)
            job.add_files([(srv.url("/small"), tmp_path / "s"), (srv.url("/big"), tmp_path / "b")])
            job.resume()
            await make_engine(manager).run(until_idle=True)
            return job

    job = asyncio.run(main())
    assert job.state is S.ERROR
    assert job.error is not None
    assert (job.error.hresult, job.error.file_index) == (hr.BG_E_MAX_DOWNLOAD_SIZE_LIMIT_REACHED, 1)
    files = job.files()
    assert files[0].progress.bytes_transferred == len(small)
    assert files[1].progress.bytes_transferred <= 64 * KiB
    temp = temp_of(job, 1)
    assert not temp.exists() if length else temp.stat().st_size <= 96 * KiB
    assert job.complete() == hr.BG_S_PARTIAL_COMPLETE
    assert (tmp_path / "s").read_bytes() == small


@pytest.mark.parametrize("dynamic", [False, True])
def test_content_without_a_size_needs_the_dynamic_content_property(
    tmp_path: Path, dynamic: bool
) -> None:
    data = os.urandom(200 * KiB)
    served = Served(data, etag=None, ranges=False, length=False, step=32 * KiB)
    manager = TransferManager(home=tmp_path / "home")

    async def main() -> TransferJob:
        async with FaultServer({"/gen": served}) as srv:
            job = manager.create_job("dynamic")
            if dynamic:
                job.set_property(JobPropertyId.DYNAMIC_CONTENT, True)
            job.add_file(srv.url("/gen"), tmp_path / "gen.out")
            job.resume()
            await asyncio.wait_for(make_engine(manager).run(until_idle=True), 10)
            return job

    job = asyncio.run(main())
    if not dynamic:
        assert job.state is S.ERROR
        error = job.error
        assert error is not None
        assert error.hresult == hr.BG_E_MISSING_FILE_SIZE
        assert error.context is ErrorContext.REMOTE_FILE
        return
    assert job.state is S.TRANSFERRED
    assert job.progress.bytes_total == len(data)
    job.complete()
    assert (tmp_path / "gen.out").read_bytes() == data


def test_dynamic_content_restarts_from_zero_after_an_interruption(tmp_path: Path) -> None:
    data = os.urandom(512 * KiB)
    served = trickle(data, etag=None, ranges=False, length=False, drop_after=256 * KiB)
    manager = TransferManager(home=tmp_path / "home")

    async def main() -> tuple[TransferJob, FaultServer]:
        async with FaultServer({"/gen": served}) as srv:
            job = manager.create_job("dynamic")
            job.set_property(JobPropertyId.DYNAMIC_CONTENT, True)
            job.add_file(srv.url("/gen"), tmp_path / "gen.out")
            job.resume()
            engine = make_engine(manager)
            async with running(engine):
                await until(lambda: job.state is S.TRANSIENT_ERROR, "TRANSIENT_ERROR")
                assert checkpointed(job) > 0
                job.resume()
                await until(lambda: job.state is S.TRANSFERRED, "TRANSFERRED")
            return job, srv

    job, srv = asyncio.run(main())
    assert [h.range for h in srv.hits] == [None, None]  # never a range request
    job.complete()
    assert (tmp_path / "gen.out").read_bytes() == data


def test_an_application_whose_asyncio_run_ends_keeps_what_its_engine_received(
    tmp_path: Path, engine_nginx: tuple[NginxServer, Path]
) -> None:
    """An application's ``main`` returns (or Ctrl-C ends it) with the engine still running:
    ``asyncio.run`` cancels every task left, and the engine's own shutdown then cancels its
    transfers a second time. That second cancellation cut the last checkpoint short, and the
    bytes since the previous one (1 MiB of 2.7 here) were fetched again by the next engine.
    They are now synced and claimed as on any other stop."""
    server, _ = engine_nginx
    manager = TransferManager(home=tmp_path / "home")
    job = new_job(manager, [(f"{server.url}/three.bin", tmp_path / "three.bin")])
    job.max_rate = 1_000_000

    async def main() -> None:
        engine = make_engine(manager, checkpoint_interval=60.0)
        asyncio.get_running_loop().create_task(engine.run())  # left for asyncio.run to end
        await until(lambda: engine.live_progress.get((job.id, 0), 0) >= 256 * KiB, "some")

    asyncio.run(main())
    on_disk = temp_of(job, 0).stat().st_size
    assert 256 * KiB <= checkpointed(job) == on_disk
    manager.close()


def test_an_engine_that_stops_mid_file_checkpoints_what_it_received(tmp_path: Path) -> None:
    """`serve` stopped (SIGTERM) or `get` interrupted in the middle of a file: the bytes
    received since the last checkpoint are made durable and claimed before the engine
    ends, so the next engine asks only for the rest. Checkpoints are a minute apart here:
    without that last one, nothing would be claimed and the next run would start at 0."""
    data = os.urandom(768 * KiB)
    manager = TransferManager(home=tmp_path / "home")
    kept: list[int] = []

    async def main() -> tuple[TransferJob, FaultServer]:
        async with FaultServer({"/f": trickle(data)}) as srv:
            job = new_job(manager, [(srv.url("/f"), tmp_path / "f")])
            engine = make_engine(manager, checkpoint_interval=60.0)
            async with running(engine):
                await until(lambda: engine.live_progress.get((job.id, 0), 0) >= 128 * KiB, "some")
            kept.append(checkpointed(job))
            assert 128 * KiB <= kept[0] < len(data), kept
            assert temp_of(job, 0).stat().st_size >= kept[0]
            assert job.state is S.QUEUED  # the slice ended with the engine
            async with running(make_engine(manager)):
                await until(lambda: job.state is S.TRANSFERRED, "TRANSFERRED")
            return job, srv

    job, srv = asyncio.run(main())
    assert [h.range_start for h in srv.hits] == [None, kept[0]]
    job.complete()
    assert (tmp_path / "f").read_bytes() == data
