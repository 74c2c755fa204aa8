"""Shared helpers of the reliability suite: sizes, a fault-injecting file server that logs every
byte it serves, ``backhaul serve`` worker processes, who-appended-what on PostgreSQL, and the
checks every run ends with.

The checks (``final_checks``):

1. every job is in its expected final state (ACKNOWLEDGED or CANCELLED);
2. every published file has the source's SHA-256 (the version the server had last, for files
   that changed on the server);
3. no temp file (``*.bhtmp``) is left in any destination directory;
4. nothing was fetched twice beyond one checkpoint interval: no GET of a file after its
   ``FileTransferred``; every ranged GET resumes EXACTLY at the last checkpoint of the file
   that was in the log when the request arrived (0 after a restart); and between two
   consecutive responses for one file, the bytes served again (previous stop - next start)
   stay under a per-interruption bound;
5. (PostgreSQL, several workers) no event appended by a fenced worker: a trigger records, for
   every row of ``stored_events``, the connection's ``application_name`` (each worker process
   gets its own through ``PGAPPNAME``) and the insert time. Walking each job's stream, the
   holder is whoever appended the latest ``LeaseTaken``; every transfer event
   (``TransferStarted``, ``Connected``, ``BytesCheckpointed``, ``FileTransferred``,
   ``FileRestarted``, ``JobTransferred``, ``ErrorOccurred`` ...) must come from the holder's
   process, a ``LeaseTaken`` by another worker only once the previous lease expired or was
   released, and housekeeping events (``SliceEnded``...) of a non-holder only after the
   holder's lease expired.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from backhaul.adapters.localfile import TEMP_SUFFIX
from backhaul.adapters.store import EventStore
from backhaul.core import event as ev
from backhaul.core.vocabulary import JobState

KiB = 1024
MiB = 1024 * KiB
FULL = os.environ.get("BACKHAUL_RELIABILITY", "").strip().lower() == "full"
BACKHAUL = Path(sys.executable).parent / "backhaul"
CLIENT_APP = "bh-client"  # application_name of the test's own connections
SECRET_KEY = "cmVsaWFiaWxpdHktc3VpdGUta2V5LTMyLWJ5dGVzISE="  # 32 bytes, base64


def size(ci: Any, full: Any) -> Any:
    """The CI value by default, the full one with BACKHAUL_RELIABILITY=full."""
    return full if FULL else ci


def seed_for(name: str) -> int:
    """``BACKHAUL_RELIABILITY_SEED`` replays a run; else a fresh seed (printed on failure)."""
    fixed = os.environ.get("BACKHAUL_RELIABILITY_SEED")
    base = int(fixed) if fixed else random.SystemRandom().randrange(2**32)
    return base ^ (int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) if not fixed else 0)


def sha256(data: bytes | Path) -> str:
    if isinstance(data, Path):
        digest = hashlib.sha256()
        with open(data, "rb") as f:
            for block in iter(lambda: f.read(4 * MiB), b""):
                digest.update(block)
        return digest.hexdigest()
    return hashlib.sha256(data).hexdigest()


def blobs(rng: random.Random, count: int, low: int, high: int) -> list[bytes]:
    """``count`` random blobs, sizes log-uniform in [low, high]."""
    out = []
    for _ in range(count):
        n = round(low * (high / low) ** rng.random())
        out.append(rng.randbytes(n))
    return out


# =================================================================================================
# The file server
# =================================================================================================


@dataclass
class Source:
    """One URL of the server and how it misbehaves (each fault fires once).

    ``rate``: bytes per second per response (None: as fast as the client reads);
    ``ranges``: honour Range / If-Range (else always 200, whole body, no Accept-Ranges);
    ``statuses``: answer these first, one per request (with ``retry_after``);
    ``drop_after``: close the connection once this file offset was sent;
    ``stall_at`` / ``stall_seconds``: stop sending for a while at this offset;
    ``change_at`` / ``new_data``: at this offset the file changes (new bytes, new ETag) and the
    connection drops; later requests get the new version (If-Range no longer matches)."""

    data: bytes
    rate: float | None = None
    ranges: bool = True
    statuses: list[int] = field(default_factory=list)
    retry_after: str | None = None
    drop_after: int | None = None
    stall_at: int | None = None
    stall_seconds: float = 0.0
    change_at: int | None = None
    new_data: bytes | None = None
    version: int = 1
    faults: tuple[str, ...] = ()
    _etag: tuple[int, str] | None = field(default=None, repr=False)

    @property
    def etag(self) -> str:
        if self._etag is None or self._etag[0] != self.version:
            self._etag = (self.version, f'"{sha256(self.data)[:16]}-v{self.version}"')
        return self._etag[1]

    @property
    def final_sha256(self) -> str:
        """What a completed download must hold: the newest version the server will send."""
        if self.change_at is not None and self.new_data is not None:
            return sha256(self.new_data)
        return sha256(self.data)

    @property
    def final_size(self) -> int:
        if self.change_at is not None and self.new_data is not None:
            return len(self.new_data)
        return len(self.data)


@dataclass
class Request:
    """One GET as the server saw it: bytes [start, start + served) of ``path`` were sent."""

    path: str
    at: float  # time.time() when it arrived
    status: int
    start: int
    end: int  # exclusive end of the body promised
    range_header: str | None
    if_range: str | None
    version: int
    served: int = 0
    finished: bool = False
    error: str | None = None
    ended: float | None = None  # time.time() when the response ended (or broke off)

    @property
    def stop(self) -> int:
        return self.start + self.served

    @property
    def has_body(self) -> bool:
        return self.status in (200, 206)


class FileServer:
    """An aiohttp server on 127.0.0.1:<free port> in a thread of its own, serving ``sources``
    by path, logging every GET as a ``Request``. Sources may be added while it runs."""

    CHUNK = 64 * KiB

    def __init__(self, sources: dict[str, Source] | None = None) -> None:
        self.sources: dict[str, Source] = dict(sources or {})
        self.requests: list[Request] = []
        self.active = 0
        self.port = 0
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._main, name="reliability-server", daemon=True)
        self._ready = threading.Event()

    # -- life ------------------------------------------------------------------------------

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> FileServer:
        self._thread.start()
        assert self._ready.wait(15), "the file server did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        if self._runner is not None:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(15)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(15)

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._setup())
        self._ready.set()
        self._loop.run_forever()

    async def _setup(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=0.2
        )
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        site = web.SockSite(self._runner, sock)
        await site.start()
        self.port = sock.getsockname()[1]

    def add(self, path: str, source: Source) -> str:
        with self._lock:
            self.sources[path] = source
        return self.url(path)

    def requests_for(self, path: str) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    def wait_quiet(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.active and time.monotonic() < deadline:
            time.sleep(0.02)

    # -- serving ---------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        with self._lock:
            src = self.sources.get(request.path)
        if src is None:
            return web.Response(status=404, text="no such file")
        if request.method == "GET" and src.statuses:
            status = src.statuses.pop(0)
            self._log(Request(request.path, time.time(), status, 0, 0, None, None, src.version))
            extra = {"Retry-After": src.retry_after} if src.retry_after else {}
            return web.Response(status=status, text="not now", headers=extra)
        data, etag = src.data, src.etag
        size = len(data)
        headers = {"ETag": etag, "Last-Modified": "Wed, 25 Nov 2026 12:00:00 GMT"}
        if src.ranges:
            headers["Accept-Ranges"] = "bytes"
        start, end, status = 0, size, 200
        spec = request.headers.get("Range")
        if_range = request.headers.get("If-Range")
        if src.ranges and spec and if_range in (None, etag):
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", spec.strip())
            if m is None:
                return web.Response(status=400, text=f"bad Range {spec!r}")
            start = int(m[1])
            end = min(int(m[2]) + 1, size) if m[2] else size
            if start >= size:
                return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = end - start
        if request.method == "HEAD":
            await resp.prepare(request)
            return resp
        rec = Request(request.path, time.time(), status, start, end, spec, if_range, src.version)
        self._log(rec)
        self.active += 1
        loop = asyncio.get_running_loop()
        try:
            await resp.prepare(request)
            pos, began = start, loop.time()
            while pos < end:
                n = min(self.CHUNK, end - pos)
                for name in ("drop_after", "stall_at", "change_at"):
                    mark = getattr(src, name)
                    if mark is not None and pos < mark <= pos + n:
                        n = mark - pos  # stop exactly at the fault's offset
                await resp.write(data[pos : pos + n])
                pos += n
                rec.served = pos - start
                if src.drop_after is not None and pos >= src.drop_after:
                    src.drop_after = None
                    await asyncio.sleep(0.05)  # let the client read what was sent
                    rec.error = "dropped on purpose"
                    assert request.transport is not None
                    request.transport.close()
                    return resp
                if src.change_at is not None and pos >= src.change_at and src.new_data:
                    src.change_at = None
                    src.data, src.new_data = src.new_data, None
                    src.version += 1
                    await asyncio.sleep(0.05)
                    rec.error = "changed on purpose"
                    assert request.transport is not None
                    request.transport.close()
                    return resp
                if src.stall_at is not None and pos >= src.stall_at:
                    src.stall_at = None
                    rec.error = "stalled"  # cleared if the response goes on to its end
                    await asyncio.sleep(src.stall_seconds)
                    rec.error = None
                if src.rate:
                    delay = began + rec.served / src.rate - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
            await resp.write_eof()
            rec.finished = True
        except (ConnectionError, OSError, RuntimeError) as exc:  # the client went away
            rec.error = repr(exc)
        except asyncio.CancelledError:
            rec.error = rec.error or "cancelled"
            raise
        finally:
            self.active -= 1
            rec.ended = time.time()
        return resp

    def _log(self, rec: Request) -> None:
        with self._lock:
            self.requests.append(rec)


# =================================================================================================
# The application: creates, completes and cancels jobs
# =================================================================================================


class App:
    """The application side of a run, with its own store handle: it creates download jobs of
    1-``max_files`` files (sources picked from ``pool``, served at ``rate``), completes every
    job that reaches TRANSFERRED, cancels a job now and then, and notes jobs in ERROR."""

    def __init__(
        self,
        url: str,
        home: Path,
        server: FileServer,
        dest: Path,
        rng: random.Random,
        *,
        pool: Sequence[bytes],
        rate: float | None,
        max_files: int = 3,
    ) -> None:
        from backhaul.adapters.manager import TransferManager
        from backhaul.adapters.store import open_store
        from backhaul.core.limit import UNLIMITED

        self.manager = TransferManager(open_store(url), home=home, limits=UNLIMITED)
        self.server = server
        self.dest = dest
        self.rng = rng
        self.pool = list(pool)
        self.rate = rate
        self.max_files = max_files
        self.files: list[FileRef] = []
        self.expected: dict[str, JobState] = {}
        self.unfinished: set[str] = set()
        self.completed: set[str] = set()
        self.errors: list[str] = []
        self.partial: list[str] = []
        self.created = 0

    def create(self) -> str:
        n = self.created
        refs = []
        for k in range(self.rng.randint(1, self.max_files)):
            path = f"/j{n}/f{k}.bin"
            source = Source(self.rng.choice(self.pool), rate=self.rate)
            self.server.add(path, source)
            refs.append((path, self.dest / f"j{n}-f{k}.bin", source))
        with self.manager.batch():
            job = self.manager.create_job(f"job-{n}")
            job.minimum_retry_delay = 5  # the floor (BITS's default is 600 s)
            job.add_files([(self.server.url(p), d) for p, d, _ in refs])
            job.resume()
        self.created += 1
        for k, (p, d, s) in enumerate(refs):
            self.files.append(FileRef(job.id, k, p, d, s))
        self.expected[job.id] = JobState.ACKNOWLEDGED
        self.unfinished.add(job.id)
        return job.id

    def tend(self, cancel_chance: float = 0.0) -> None:
        """Complete transferred jobs; cancel one now and then (``cancel_chance`` per
        unfinished job and call); note jobs in ERROR (and cancel them)."""
        from backhaul.core import hresult
        from backhaul.core.error import BitsError

        self.manager.refresh_views()
        views = self.manager.store.views
        rows = {r.job_id: r for r in views.select(None, include_final=False)}
        for job_id in sorted(self.unfinished):
            row = rows.get(job_id) or views.get(job_id)
            if row is None:
                continue
            state = JobState(row.state)
            job = self.manager.get_job(job_id, include_final=True)
            try:
                if state is JobState.TRANSFERRED:
                    result = job.complete()
                    if result != hresult.S_OK:
                        self.partial.append(f"{job_id[:8]}: Complete returned {result:#x}")
                    self.completed.add(job_id)
                    self.unfinished.discard(job_id)
                elif state is JobState.ERROR:
                    self.errors.append(f"{job_id[:8]}: ERROR {job.error}")
                    job.cancel()
                    self.expected[job_id] = JobState.CANCELLED
                    self.unfinished.discard(job_id)
                elif state in RUNNABLE and self.rng.random() < cancel_chance:
                    job.cancel()
                    self.expected[job_id] = JobState.CANCELLED
                    self.unfinished.discard(job_id)
            except BitsError as exc:  # the job moved on meanwhile: look again next time
                if exc.hresult != hresult.BG_E_INVALID_STATE:
                    raise

    def mid_file_pids(self) -> set[int]:
        """Pids of the workers leasing a job with a file checkpointed part-way (a kill of
        one of them makes the next worker resume mid-file)."""
        from backhaul.adapters.projection import job_of

        rows = self.manager.store.views.select(
            None, include_final=False, with_doc=True, states=[JobState.TRANSFERRING]
        )
        pids = set()
        for row in rows:
            job = job_of(row)
            partial = any(0 < f.bytes_transferred < (f.bytes_total or 0) for f in job.files)
            if partial and job.lease_worker:
                pids.add(int(job.lease_worker.rsplit("-", 2)[1]))  # host-pid-nonce
        return pids

    def close(self) -> None:
        self.manager.close()


RUNNABLE = (JobState.QUEUED, JobState.CONNECTING, JobState.TRANSFERRING, JobState.TRANSIENT_ERROR)


# =================================================================================================
# An engine in this process, and a small disk
# =================================================================================================


def make_engine(manager: Any, **options: Any) -> Any:
    """An engine with a fresh HTTP transport (stall after ``stall_timeout`` s), short
    intervals, no yielding, and the network counted as up and unmetered."""
    from backhaul.adapters.engine import Engine
    from backhaul.core.vocabulary import CostFlags
    from backhaul.transports.http import HttpTransport

    stall = options.pop("stall_timeout", 5.0)
    transport = HttpTransport(stall_timeout=stall, connect_timeout=5.0, chunk_size=64 * KiB)
    settings: dict[str, Any] = {
        "transports": {"http": transport},
        "poll_interval": 0.02,
        "checkpoint_interval": 0.05,
        "yield_bandwidth": False,
    }
    settings.update(options)
    engine = Engine(manager, **settings)
    engine.network_probe = lambda: True
    engine.cost_probe = lambda: int(CostFlags.UNRESTRICTED)
    return engine


@contextlib.contextmanager
def tmpfs(path: Path, size_bytes: int) -> Iterator[Path]:
    """A tmpfs of ``size_bytes`` mounted at ``path`` (needs root), unmounted at the end."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"cannot mount a tmpfs at {path} (root needed): {done.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(path: Path, leave: int) -> Path:
    """Write a filler file so that exactly ``leave`` bytes stay free (a multiple of 4 KiB)."""
    filler = path / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(free_bytes(path) - leave, 0))
        f.flush()
        os.fsync(f.fileno())
    return filler


# =================================================================================================
# Worker processes (backhaul serve)
# =================================================================================================


@dataclass
class Life:
    """One ``backhaul serve`` process."""

    label: str  # also its PostgreSQL application_name
    slot: int
    proc: subprocess.Popen[bytes]
    log: Path
    spawned: float
    killed_at: float | None = None
    ended_at: float | None = None
    returncode: int | None = None
    frozen: int = 0  # times it was SIGSTOPped

    @property
    def pid(self) -> int:
        return self.proc.pid


class Freezer:
    """Freeze workers (SIGSTOP) and thaw them (SIGCONT) on timers of their own, so that a thaw
    is never late because the test's own thread waits on a lock the frozen worker holds."""

    def __init__(self) -> None:
        self.thaws: list[tuple[str, float, float]] = []  # (worker label, frozen at, thawed at)
        self._timers: dict[str, threading.Timer] = {}
        self._lock = threading.Lock()

    def freeze(self, workers: Workers, slot: int, seconds: float) -> Life:
        life = workers.freeze(slot)
        began = time.time()

        def thaw() -> None:
            workers.thaw(life)
            with self._lock:
                self.thaws.append((life.label, began, time.time()))
                self._timers.pop(life.label, None)

        timer = threading.Timer(seconds, thaw)
        timer.daemon = True
        with self._lock:
            self._timers[life.label] = timer
        timer.start()
        return life

    @property
    def stalls(self) -> list[tuple[float, float]]:
        """(frozen at, thawed at) in time.time(), whoever was frozen."""
        with self._lock:
            return [(began, thawed) for _, began, thawed in self.thaws]

    def frozen_slots(self, workers: Workers) -> set[int]:
        with self._lock:
            labels = set(self._timers)
        return {life.slot for life in workers.lives if life.label in labels}

    def busy(self) -> bool:
        with self._lock:
            return bool(self._timers)

    def finish(self) -> None:
        """Thaw every worker now."""
        with self._lock:
            timers = list(self._timers.values())
        for timer in timers:
            timer.cancel()
            timer.function()


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("BACKHAUL_STORE", "BACKHAUL_HOME")}
    env["BACKHAUL_SECRET_KEY"] = SECRET_KEY  # every process of the run opens the same secrets
    env.update(extra or {})
    return env


class Workers:
    """N ``backhaul --store URL serve`` processes (slots), each restartable."""

    def __init__(
        self,
        store_url: str,
        home: Path,
        logs: Path,
        count: int,
        *,
        lease_seconds: float = 2.0,
        max_background: int = 3,
        poll: float = 0.05,
    ) -> None:
        self.url = store_url
        self.home = home
        self.logs = logs
        self.count = count
        self.lease_seconds = lease_seconds
        self.max_background = max_background
        self.poll = poll
        self.lives: list[Life] = []
        self.current: dict[int, Life] = {}
        logs.mkdir(parents=True, exist_ok=True)

    def spawn(self, slot: int) -> Life:
        label = f"w{slot}.{sum(1 for life in self.lives if life.slot == slot)}"
        log = self.logs / f"{label}.log"
        argv = [
            str(BACKHAUL), "--store", self.url, "--home", str(self.home), "serve",
            "--lease-seconds", str(self.lease_seconds),
            "--max-background", str(self.max_background),
            "--poll", str(self.poll), "--no-yield",
        ]  # fmt: skip
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                argv,
                env=worker_env({"PGAPPNAME": label}),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        life = Life(label, slot, proc, log, time.time())
        self.lives.append(life)
        self.current[slot] = life
        return life

    def start(self) -> None:
        for slot in range(self.count):
            self.spawn(slot)

    def kill(self, slot: int) -> Life:
        life = self.current[slot]
        if life.proc.poll() is None:
            life.proc.send_signal(signal.SIGKILL)
            life.killed_at = time.time()
        life.returncode = life.proc.wait(15)
        life.ended_at = life.ended_at or time.time()
        return life

    def freeze(self, slot: int) -> Life:
        """SIGSTOP: the worker stalls (a long GC pause, a frozen VM) with its leases held."""
        life = self.current[slot]
        if life.proc.poll() is None:
            os.kill(life.pid, signal.SIGSTOP)
            life.frozen += 1
        return life

    def thaw(self, life: Life) -> None:
        if life.proc.poll() is None:
            os.kill(life.pid, signal.SIGCONT)

    def reap(self) -> list[Life]:
        """Lives that ended by themselves (not killed by us) since the last call."""
        ended = []
        for life in self.current.values():
            if life.returncode is None and life.proc.poll() is not None:
                life.returncode = life.proc.returncode
                life.ended_at = time.time()
                ended.append(life)
        return ended

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM every running worker (a graceful stop), SIGKILL after ``timeout``."""
        for life in self.current.values():
            if life.proc.poll() is None:
                os.kill(life.pid, signal.SIGCONT)
                life.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for life in self.current.values():
            try:
                life.returncode = life.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                life.proc.kill()
                life.returncode = life.proc.wait(10)
                life.killed_at = time.time()
            life.ended_at = life.ended_at or time.time()

    def crashed(self) -> list[Life]:
        """Lives that ended with an error code of their own (not our SIGKILL)."""
        return [
            life
            for life in self.lives
            if life.killed_at is None and life.returncode not in (None, 0, -signal.SIGTERM)
        ]


SCHEMA_RACE = "tuple concurrently updated"


def is_schema_race(life: Life) -> bool:
    """The worker died opening the store: its CREATE ... IF NOT EXISTS / CREATE OR REPLACE
    FUNCTION raced another process's (see test_reliability_startup.py)."""
    text = tail(life.log, 400)
    return SCHEMA_RACE in text and "open_store" in text


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"({exc})"


def cli(home: Path, store: str | None, *args: str, timeout: float = 60) -> str:
    argv = [str(BACKHAUL), *(("--store", store) if store else ()), "--home", str(home), *args]
    result = subprocess.run(
        argv, env=worker_env(), capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, f"backhaul {' '.join(args)}: {result.stdout}{result.stderr}"
    return result.stdout


# =================================================================================================
# Who appended what (PostgreSQL)
# =================================================================================================

_TRIGGER_SQL = """
CREATE TABLE IF NOT EXISTS bh_appenders (
    originator_id uuid NOT NULL,
    originator_version bigint NOT NULL,
    app text NOT NULL,
    inserted_at double precision NOT NULL,
    PRIMARY KEY (originator_id, originator_version));
CREATE OR REPLACE FUNCTION bh_record_appender() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO bh_appenders VALUES (NEW.originator_id, NEW.originator_version,
        current_setting('application_name'), extract(epoch FROM clock_timestamp()));
    RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS bh_appenders_trigger ON stored_events;
CREATE TRIGGER bh_appenders_trigger AFTER INSERT ON stored_events
    FOR EACH ROW EXECUTE FUNCTION bh_record_appender();
"""


def install_appender_trigger(url: str) -> None:
    """Record the appender (application_name) and insert time of every event. The store's
    tables must exist (open the store once first)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(_TRIGGER_SQL)


def read_appenders(url: str) -> dict[tuple[str, int], tuple[str, float]]:
    import psycopg

    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT originator_id::text, originator_version, app, inserted_at FROM bh_appenders"
        ).fetchall()
    return {(str(r[0]), int(r[1])): (str(r[2]), float(r[3])) for r in rows}


# =================================================================================================
# The log, read back
# =================================================================================================


@dataclass
class Rec:
    """One event of a job's stream, with (on PostgreSQL) who appended it and when."""

    version: int
    event: ev.Event
    app: str | None = None
    inserted: float | None = None

    @property
    def when(self) -> float:
        """When the event reached the log (insert time; else the time it was decided)."""
        return self.inserted if self.inserted is not None else self.event.at.timestamp()


def read_streams(
    store: EventStore,
    job_ids: Iterable[str],
    appenders: dict[tuple[str, int], tuple[str, float]] | None = None,
) -> dict[str, list[Rec]]:
    out = {}
    for job_id in job_ids:
        recs = []
        for a in store.stream(job_id):
            app, inserted = (appenders or {}).get((job_id, a.version), (None, None))
            recs.append(Rec(a.version, a.event, app, inserted))
        out[job_id] = recs
    return out


@dataclass
class FileStory:
    """One file's story in the log: (when, offset) checkpoints, restarts, its FileTransferred."""

    checkpoints: list[tuple[float, int]] = field(default_factory=list)
    restarts: list[float] = field(default_factory=list)
    transferred_at: float | None = None

    def resume_offset(self, at: float) -> int:
        """Where a request arriving at ``at`` must start: the file's last checkpoint in the
        log by then, of the file's current version (0 after a restart or with none)."""
        restarted = max((t for t in self.restarts if t <= at), default=float("-inf"))
        offsets = [o for t, o in self.checkpoints if restarted < t <= at]
        return offsets[-1] if offsets else 0


def file_stories(recs: Sequence[Rec], count: int) -> list[FileStory]:
    stories = [FileStory() for _ in range(count)]
    for r in recs:
        e = r.event
        if isinstance(e, ev.BytesCheckpointed):
            stories[e.file_index].checkpoints.append((r.when, e.bytes_transferred))
        elif isinstance(e, ev.FileRestarted):
            stories[e.file_index].restarts.append(r.when)
        elif isinstance(e, ev.FileTransferred):
            stories[e.file_index].transferred_at = r.when
    return stories


# =================================================================================================
# The checks
# =================================================================================================

TRANSFER_EVENTS: tuple[type[ev.Event], ...] = (
    ev.TransferStarted,
    ev.Connected,
    ev.BytesCheckpointed,
    ev.FileTransferred,
    ev.FileRestarted,
    ev.JobTransferred,
    ev.RangesDone,
    ev.ReplyProgressed,
    ev.UploadSessionOpened,
    ev.ReplyLocated,
    ev.ErrorOccurred,
)


def check_fencing(
    streams: dict[str, list[Rec]], client_apps: Iterable[str] = (CLIENT_APP,)
) -> list[str]:
    """Violations of the lease fence (see the module docstring)."""
    clients = set(client_apps)
    bad: list[str] = []
    for job_id, recs in streams.items():
        holder_app: str | None = None
        holder: str | None = None
        expires: float | None = None
        released = True
        for r in recs:
            e = r.event
            where = f"job {job_id[:8]} v{r.version} {type(e).__name__} by {r.app}"
            if r.app is None:
                bad.append(f"{where}: no appender recorded")
                continue
            if isinstance(e, ev.LeaseTaken):
                if (
                    holder is not None
                    and e.worker != holder
                    and not released
                    and expires is not None
                    and expires > e.at.timestamp()
                ):
                    bad.append(f"{where}: taken from {holder} whose lease ran until {expires}")
                holder_app, holder, released = r.app, e.worker, False
                expires = e.expires_at.timestamp()
                continue
            if isinstance(e, ev.LeaseReleased):
                if e.worker != holder or r.app != holder_app:
                    bad.append(f"{where}: released {e.worker}'s lease; holder {holder_app}")
                released = True
                continue
            if r.app in clients:
                continue
            if isinstance(e, TRANSFER_EVENTS):
                if r.app != holder_app or released:
                    bad.append(
                        f"{where}: a transfer event from a worker that is not the lease holder "
                        f"({holder_app}, {'released' if released else 'held'})"
                    )
            elif r.app != holder_app and not (
                released or (expires is not None and expires <= e.at.timestamp())
            ):
                bad.append(f"{where}: while {holder_app} held the lease until {expires}")
    return bad


@dataclass
class FileRef:
    """A downloaded file: its job, index, URL path, destination and source."""

    job_id: str
    index: int
    path: str
    dest: Path
    source: Source


@dataclass
class RequestReport:
    violations: list[str]
    requests: int
    bodies: int
    resumed_mid_file: int
    waste_bytes: int
    worst_interruption: int
    thawed_fetches: int = 0  # see THAW_GRACE


# A worker frozen (SIGSTOP) between its last lease check and the moment its request reaches
# the socket sends that request when it is thawed, whatever it checked before: no check in a
# process can run while it is stopped. The engine re-checks its lease before every request
# (Engine._hold_lease) and cancels the transfer once it sees the lease gone; it can never
# append for the job again (the fence) nor publish its temp file. So a GET of a file after its
# FileTransferred is counted apart, not failed, only when all of this holds: the worker that
# held the job's lease when it was frozen was thawed at most THAW_GRACE seconds before the
# request, and the request was cancelled (not served to its end). Any other refetch fails.
THAW_GRACE = 0.5


# A Cancel on its own deletes the job's temp files first, then appends (TransferJob.cancel:
# killed in between, the job stays live and its next run fetches again the files whose bytes
# are gone, rather than leaving temp files that no engine would ever delete). A worker that
# starts the job in that window finds a transferred file's temp file gone, restarts the file
# and asks for it again; the Cancel reaches the log moments later and stops that request. So
# a GET after FileTransferred is counted apart, not failed, when the client's JobCancelled
# reached the log at most CANCEL_GRACE seconds after the request and the request was cut
# off (not served to its end).
CANCEL_GRACE = 0.5


def _cancelled_fetch(r: Request, recs: Sequence[Rec]) -> bool:
    if r.finished:
        return False
    return any(
        isinstance(x.event, ev.JobCancelled)
        and x.app == CLIENT_APP
        and r.at <= x.when <= r.at + CANCEL_GRACE
        for x in recs
    )


def _lease_holder(recs: Sequence[Rec], at: float) -> str | None:
    """The label of the worker holding the job's lease at ``at``, by the log."""
    holder = None
    for x in sorted(recs, key=lambda r: r.when):
        if x.when > at:
            break
        if isinstance(x.event, ev.LeaseTaken):
            holder = x.app
        elif isinstance(x.event, ev.LeaseReleased) and x.app == holder:
            holder = None
    return holder


def _thawed_fetch(
    r: Request, recs: Sequence[Rec], thaws: Sequence[tuple[str, float, float]]
) -> bool:
    if r.finished:
        return False
    return any(
        thawed <= r.at <= thawed + THAW_GRACE and _lease_holder(recs, frozen) == label
        for label, frozen, thawed in thaws
    )


def history(reqs: Sequence[Request], recs: Sequence[Rec]) -> str:
    """A file's requests and its job's events, in time order, for a failure message."""
    lines = [
        (r.at, f"GET {r.range_header or 'whole'} -> {r.status} served {r.served}"
         f"{' ' + r.error if r.error else ''}{' (ended)' if r.finished else ''}")
        for r in reqs
    ]  # fmt: skip
    for x in recs:
        e = x.event
        detail = getattr(e, "worker", None) or getattr(e, "file_index", "")
        lines.append((x.when, f"v{x.version} {type(e).__name__} {detail} by {x.app}"))
    return "\n      " + "\n      ".join(f"{t:.3f} {text}" for t, text in sorted(lines))


def check_requests(
    server: FileServer,
    files: Sequence[FileRef],
    streams: dict[str, list[Rec]],
    per_interruption: int,
    *,
    completed: set[str] | None = None,
    slack: float = 0.05,
    stalls: Sequence[tuple[float, float]] = (),
    thaws: Sequence[tuple[str, float, float]] = (),
    rate: float = 0.0,
) -> RequestReport:
    """No refetch beyond one checkpoint interval (see the module docstring). ``completed``:
    the jobs that reached TRANSFERRED (their files must have been served to the end).
    ``stalls``: (start, end) windows in which some worker was frozen: a response to a frozen
    worker goes on filling the socket buffers at ``rate`` bytes/s, which nobody can claim, so
    an interruption during a stall may waste that much more. ``thaws``: (worker label,
    frozen at, thawed at), for the fetches of thawed workers (``THAW_GRACE``)."""
    bad: list[str] = []
    counts = {"requests": 0, "bodies": 0, "mid": 0, "thawed": 0}
    waste = worst = 0
    by_job: dict[str, int] = {}
    for f in files:
        by_job[f.job_id] = max(by_job.get(f.job_id, 0), f.index + 1)
    stories = {j: file_stories(streams[j], n) for j, n in by_job.items() if j in streams}
    for f in files:
        story = stories[f.job_id][f.index]
        reqs = sorted(server.requests_for(f.path), key=lambda r: r.at)
        counts["requests"] += len(reqs)
        bodies = [r for r in reqs if r.has_body]
        counts["bodies"] += len(bodies)
        where = f"{f.path} (job {f.job_id[:8]} file {f.index})"
        # A thawed worker's request, cancelled (THAW_GRACE), or a request a client's Cancel
        # cut off (CANCEL_GRACE): counted apart, checked no further.
        thawed = [
            r
            for r in bodies
            if story.transferred_at is not None
            and r.at > story.transferred_at + slack
            and (
                _thawed_fetch(r, streams[f.job_id], thaws) or _cancelled_fetch(r, streams[f.job_id])
            )
        ]
        counts["thawed"] += len(thawed)
        bodies = [r for r in bodies if not any(r is t for t in thawed)]
        for r in bodies:
            if story.transferred_at is not None and r.at > story.transferred_at + slack:
                bad.append(
                    f"{where}: fetched again at {r.at:.3f}, after FileTransferred; "
                    + history(reqs, streams[f.job_id])
                )
            if not f.source.ranges or r.version != bodies[0].version:
                continue  # refetches the server forces (no ranges, a changed file)
            expected = story.resume_offset(r.at)
            asked = 0 if r.range_header is None else int(r.range_header[6:].split("-")[0])
            if asked != expected:
                bad.append(
                    f"{where}: asked from {asked} at {r.at:.3f}; the log's checkpoint then "
                    f"was {expected}"
                )
            counts["mid"] += r.start > 0
        for prev, nxt in itertools.pairwise(bodies):
            if prev.version != nxt.version:
                continue
            lost = prev.stop - nxt.start
            if lost > 0:
                worst = max(worst, lost)
                waste += lost
                limit = per_interruption if f.source.ranges else len(f.source.data)
                end = prev.ended if prev.ended is not None else nxt.at
                frozen = sum(max(0.0, min(b, end) - max(a, prev.at)) for a, b in stalls)
                limit += int(rate * frozen)
                if lost > limit:
                    bad.append(
                        f"{where}: {lost} bytes served again after an interruption (bound {limit})"
                    )
        if completed is not None and f.job_id in completed:
            last = [r for r in bodies if r.version == f.source.version]
            if not last or last[-1].stop != len(f.source.data):
                bad.append(f"{where}: never served to its end, yet transferred")
    return RequestReport(
        bad, counts["requests"], counts["bodies"], counts["mid"], waste, worst, counts["thawed"]
    )


def check_log_replays(streams: dict[str, list[Rec]]) -> list[str]:
    """Every job's stream folds from its first event (the transition table accepts each
    event in turn); a stream that does not shows the events around the refusal."""
    from backhaul.core import job as jobs

    bad = []
    for job_id, recs in streams.items():
        job = None
        for i, r in enumerate(recs):
            try:
                job = jobs.fold([r.event], job)
            except Exception as exc:  # IllegalTransition, or a bug in evolve
                around = "; ".join(
                    f"v{x.version} {type(x.event).__name__}"
                    f"{'/' + str(getattr(x.event, 'worker', '')) if hasattr(x.event, 'worker') else ''}"
                    f" by {x.app} at {x.when:.3f}"
                    for x in recs[max(0, i - 8) : i + 2]
                )
                state = job.state.name if job is not None else None
                bad.append(f"job {job_id[:8]} v{r.version} in {state}: {exc!r} [{around}]")
                break
    return bad


def check_read_model(store: EventStore, streams: dict[str, list[Rec]]) -> list[str]:
    """Each job's read-model row (its snapshot) equals the pure fold of its stream up to the
    row's version: the projection lost or doubled no event."""
    from backhaul.adapters.projection import job_of
    from backhaul.core import job as jobs

    bad = []
    for job_id, recs in streams.items():
        row = store.views.get(job_id)
        if row is None:
            bad.append(f"job {job_id[:8]}: no read-model row")
            continue
        try:
            folded = jobs.fold(r.event for r in recs if r.version <= row.version)
        except Exception as exc:
            bad.append(f"job {job_id[:8]}: the stream does not fold: {exc!r}")
            continue
        snap = job_of(row)
        if folded is None or folded != snap:
            got = None if folded is None else (folded.state.name, folded.version)
            bad.append(
                f"job {job_id[:8]}: row at v{row.version} {snap.state.name}, the log's fold "
                f"to that version {got}"
            )
    return bad


def check_states(
    store: EventStore, expected: dict[str, JobState], streams: dict[str, list[Rec]] | None = None
) -> list[str]:
    from backhaul.core import job as jobs

    bad = []
    for job_id, want in expected.items():
        recs = streams[job_id] if streams is not None else None
        events = (
            [r.event for r in recs] if recs is not None else [a.event for a in store.stream(job_id)]
        )
        job = jobs.fold(events)
        if job is None or job.state is not want:
            got = None if job is None else job.state.name
            error = None if job is None or job.error is None else job.error
            bad.append(f"job {job_id[:8]}: {got}, expected {want.name} (error {error})")
    return bad


def check_files(files: Sequence[FileRef], published: set[str]) -> list[str]:
    """Every file of a completed job (``published``: job ids) holds the source's bytes."""
    bad = []
    for f in files:
        if f.job_id not in published:
            if f.dest.exists():
                bad.append(f"{f.dest}: exists, but its job was not completed")
            continue
        if not f.dest.exists():
            bad.append(f"{f.dest}: missing after Complete")
            continue
        if f.dest.stat().st_size != f.source.final_size or sha256(f.dest) != f.source.final_sha256:
            bad.append(f"{f.dest}: differs from the source")
    return bad


def check_no_temps(dirs: Iterable[Path]) -> list[str]:
    left = []
    for d in dirs:
        left += [str(p) for p in d.rglob(f"*{TEMP_SUFFIX}")]
    return [f"temp file left: {p}" for p in sorted(left)]


def expect_none(problems: Sequence[str], what: str, context: str, limit: int = 25) -> None:
    """Fail with the first ``limit`` problems (and the run's context) if there are any."""
    if problems:
        shown = "\n  ".join(problems[:limit])
        more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
        raise AssertionError(f"{what} ({len(problems)}), {context}:\n  {shown}{more}")


def summary(name: str, data: dict[str, Any], out: Path | None = None) -> None:
    line = json.dumps({"test": name, **data}, default=str)
    print(f"\nreliability: {line}")
    if out is not None:
        with contextlib.suppress(OSError):
            out.write_text(line + "\n")


@contextlib.contextmanager
def timing() -> Iterator[dict[str, float]]:
    box = {"start": time.monotonic()}
    try:
        yield box
    finally:
        box["seconds"] = time.monotonic() - box["start"]
