"""Upload jobs run by the engine against the BITS upload server (adapters/upload_server.py)
on 127.0.0.1, and the ``backhaul upload-server`` command (adapters/cli_upload.py) as a real
process with BitsUploader as its client. The engine runs through failures: connections dropped at random fragment boundaries (a fault
middleware on the server) or in the middle of fragment bodies (a TCP proxy), the server
restarted mid-session on the same port and session directory, and a real ``backhaul serve``
killed with SIGKILL mid-upload and started again. Every time the final file is exact, and the
resumes continue from the server's offset (the session is never restarted; after the kill the
server receives exactly the bytes it did not have)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from test_engine import (  # the autouse fixture keeps BACKHAUL_STORE out
    KiB,
    MiB,
    _no_store_from_the_environment,  # noqa: F401
    make_engine,
    until,
)

from backhaul.adapters.cli_upload import build_config, main, parse_size
from backhaul.adapters.manager import TransferJob, TransferManager
from backhaul.adapters.upload_server import (
    UploadServerConfig,
    VirtualDirectory,
    _Store,
    make_upload_app,
    serve_app,
)
from backhaul.core import hresult as hr
from backhaul.core.error import TransferError
from backhaul.core.port import PlainCredentials, RequestOptions
from backhaul.core.vocabulary import AuthScheme, AuthTarget, JobPriority, JobState, JobType
from backhaul.transports.bits_upload import BitsUploader

BACKHAUL = Path(sys.executable).parent / "backhaul"


def server_sessions(session_dir: Path) -> list[Any]:
    """The sessions as the server reads them (session.json + the progress record)."""
    return [s for _, s in _Store(session_dir, fsync=False).all() if s is not None]


def config_for(tmp_path: Path) -> UploadServerConfig:
    (tmp_path / "www").mkdir(exist_ok=True)
    return UploadServerConfig(
        session_dir=tmp_path / "sessions",
        vdirs=[VirtualDirectory("/up", tmp_path / "www")],
        fsync=False,
    )


def fragment_packet(request: web.Request) -> tuple[int, int] | None:
    """(first, last) of a Fragment request, else None."""
    if request.method != "BITS_POST":
        return None
    if request.headers.get("BITS-Packet-Type", "").strip().lower() != "fragment":
        return None
    text = request.headers.get("Content-Range", "")
    try:
        first, rest = text.split(" ", 1)[1].split("-", 1)
        return int(first), int(rest.split("/", 1)[0])
    except (IndexError, ValueError):
        return None


class Recorder:
    """A middleware that records every Fragment's range (and can slow them down)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.ranges: list[tuple[int, int]] = []
        self.delay = delay

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        span = fragment_packet(request)
        if span is not None:
            self.ranges.append(span)
            if self.delay:
                await asyncio.sleep(self.delay)
        return await handler(request)


class Faults:
    """A middleware that drops connections at fragment boundaries: before the server reads a
    fragment (it never arrives) or after the server stored it (the Ack is lost)."""

    def __init__(self, rng: random.Random, probability: float) -> None:
        self.rng = rng
        self.probability = probability
        self.lost = 0
        self.acks_lost = 0

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if fragment_packet(request) is None or self.rng.random() >= self.probability:
            return await handler(request)
        transport = request.transport
        assert transport is not None
        if self.rng.random() < 0.5:
            self.lost += 1
            transport.abort()
            return web.Response()  # never sent: the connection is gone
        response = await handler(request)
        self.acks_lost += 1
        transport.abort()
        return response


class CuttingProxy:
    """A TCP proxy in front of the server that cuts connections after a random number of
    client bytes, in the middle of a fragment's head or body: the first connection always,
    later ones with ``probability``."""

    def __init__(self, upstream: int, rng: random.Random, probability: float, span: int) -> None:
        self.upstream = upstream
        self.rng = rng
        self.probability = probability
        self.span = span
        self.cuts = 0
        self.connections = 0
        self.port = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cut = self.connections == 0 or self.rng.random() < self.probability
        self.connections += 1
        budget = self.rng.randrange(1, self.span) if cut else None
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, count: bool) -> None:
            nonlocal budget
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                while data := await src.read(64 * KiB):
                    if count and budget is not None:
                        if len(data) >= budget:
                            dst.write(data[:budget])
                            await dst.drain()
                            self.cuts += 1
                            break
                        budget -= len(data)
                    dst.write(data)
                    await dst.drain()
            for w in (writer, up_writer):
                if w.transport is not None:
                    w.transport.abort()

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[int]:
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        try:
            yield self.port
        finally:
            server.close()
            await server.wait_closed()


async def retrying(job: TransferJob, done: Callable[[], bool], within: float = 30.0) -> int:
    """Resume the job at once whenever it is in TRANSIENT_ERROR (instead of waiting for
    MinimumRetryDelay) until ``done()``; returns how many times."""
    resumes = 0
    deadline = time.monotonic() + within
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out in {job.state.name}: {job.error}")
        if job.state is JobState.TRANSIENT_ERROR:
            job.resume()
            resumes += 1
        elif job.state is JobState.ERROR:
            raise AssertionError(f"the job failed: {job.error}")
        await asyncio.sleep(0.01)
    return resumes


def uploader() -> BitsUploader:
    return BitsUploader(
        fragment_size=64 * KiB,
        min_fragment_size=16 * KiB,
        response_timeout=10.0,
        connect_timeout=5.0,
        retry_delay=0.01,
    )


def upload_job(manager: TransferManager, url: str, source: Path) -> TransferJob:
    job = manager.create_job("upload", JobType.UPLOAD)
    job.add_file(url, source)
    job.resume()
    return job


# =================================================================================================
# Dropped connections
# =================================================================================================


@pytest.mark.parametrize(
    ("where", "seed"),
    [("boundary", 1), ("boundary", 2), ("boundary", 3), ("mid-body", 4), ("mid-body", 5)],
)
def test_uploads_survive_connections_dropped_at_random_points(
    tmp_path: Path, where: str, seed: int
) -> None:
    rng = random.Random(seed)
    data = rng.randbytes(2 * MiB + rng.randrange(64 * KiB))
    source = tmp_path / "source.bin"
    source.write_bytes(data)
    config = config_for(tmp_path)

    async def body() -> int:
        app = make_upload_app(config)
        faults = Faults(rng, 0.15)
        if where == "boundary":
            app.middlewares.append(faults.middleware)
        async with serve_app(app) as base:
            server_port = int(base.rsplit(":", 1)[1])
            proxy = CuttingProxy(server_port, rng, 0.5, 1 * MiB)
            async with proxy.running() as proxy_port:
                url = f"http://127.0.0.1:{proxy_port if where == 'mid-body' else server_port}"
                manager = TransferManager(home=tmp_path / "home")
                job = upload_job(manager, f"{url}/up/file.bin", source)
                job.priority = JobPriority.FOREGROUND
                engine = make_engine(manager, uploaders={"http": uploader()})
                engine.upload_fragment = 256 * KiB
                task = asyncio.create_task(engine.run())
                try:
                    resumes = await retrying(job, lambda: job.state is JobState.TRANSFERRED)
                finally:
                    engine.stop()
                    await asyncio.wait_for(task, 15)
                job.complete()
                faults_seen = faults.lost + faults.acks_lost + proxy.cuts
                assert faults_seen > 0, "no fault was injected"
                assert resumes > 0
                return faults_seen

    asyncio.run(asyncio.wait_for(body(), 60))
    assert (tmp_path / "www" / "file.bin").read_bytes() == data
    # One session carried the whole upload through every drop; it was closed and cleaned.
    states = [json.loads(p.read_text()) for p in (tmp_path / "sessions").glob("*/session.json")]
    assert [s["state"] for s in states] == ["closed"]
    assert not list((tmp_path / "sessions").rglob("request.bin"))


# =================================================================================================
# The server restarted mid-session
# =================================================================================================


def test_the_server_restarted_mid_session_and_the_job_completes(tmp_path: Path) -> None:
    data = os.urandom(8 * MiB + 123)
    source = tmp_path / "source.bin"
    source.write_bytes(data)
    config = config_for(tmp_path)

    def received() -> int:
        sessions = server_sessions(tmp_path / "sessions")
        assert len(sessions) <= 1
        return sessions[0].received if sessions else 0

    async def body() -> None:
        first = Recorder(delay=0.01)
        app = make_upload_app(config)
        app.middlewares.append(first.middleware)
        manager = TransferManager(home=tmp_path / "home")
        engine = make_engine(manager, uploaders={"http": uploader()})
        engine.upload_fragment = 256 * KiB
        async with serve_app(app) as base:
            port = int(base.rsplit(":", 1)[1])
            job = upload_job(manager, f"{base}/up/file.bin", source)
            job.priority = JobPriority.FOREGROUND
            task = asyncio.create_task(engine.run())
            await until(lambda: received() >= 2 * MiB, "2 MiB on the server", within=20)
        # The server is gone: the engine's next packets fail (TRANSIENT_ERROR).
        token = job.snapshot().files[0].upload_token
        await until(lambda: job.state is JobState.TRANSIENT_ERROR, "TRANSIENT_ERROR")
        at_restart = received()
        assert 0 < at_restart < len(data)
        second = Recorder()
        app = make_upload_app(config)
        app.middlewares.append(second.middleware)
        try:
            async with serve_app(app, port=port):
                await retrying(job, lambda: job.state is JobState.TRANSFERRED)
        finally:
            engine.stop()
            await asyncio.wait_for(task, 15)
        assert job.snapshot().files[0].upload_token == token  # the same session
        # The new server was asked only for what it did not have.
        assert second.ranges[0][0] == at_restart
        assert min(first for first, _ in second.ranges) == at_restart
        assert sum(last - first + 1 for first, last in second.ranges) == len(data) - at_restart
        job.complete()

    asyncio.run(asyncio.wait_for(body(), 60))
    assert (tmp_path / "www" / "file.bin").read_bytes() == data


# =================================================================================================
# backhaul serve killed with SIGKILL mid-upload
# =================================================================================================


class ThreadedServer:
    """The upload application on its own loop in a thread, so that it lives while the test
    waits for subprocesses."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.base = ""
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self._stop = asyncio.Event()
            async with serve_app(self.app) as base:
                self.base = base
                self._ready.set()
                await self._stop.wait()

        try:
            self._loop.run_until_complete(main())
        finally:
            self._loop.close()

    @contextlib.contextmanager
    def running(self) -> Iterator[str]:
        self._thread.start()
        assert self._ready.wait(10)
        try:
            yield self.base
        finally:
            assert self._stop is not None
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)


def wait(predicate: Callable[[], bool], what: str, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        time.sleep(0.02)


def test_a_killed_serve_resumes_the_upload_from_the_servers_offset(tmp_path: Path) -> None:
    data = os.urandom(32 * MiB + 4321)
    source = tmp_path / "source.bin"
    source.write_bytes(data)
    home = tmp_path / "home"
    config = config_for(tmp_path)
    recorder = Recorder(delay=0.04)  # 1 MiB fragments: the upload takes about 1.5 s or more
    app = make_upload_app(config)
    app.middlewares.append(recorder.middleware)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKHAUL_")}
    env["BACKHAUL_HOME"] = str(home)

    def received() -> int:
        sessions = server_sessions(tmp_path / "sessions")
        assert len(sessions) <= 1
        return sessions[0].received if sessions else 0

    def settled() -> int:
        """The server's offset once a drained in-flight fragment no longer moves it."""
        before = received()
        time.sleep(0.3)
        after = received()
        return after if after == before else settled()

    with ThreadedServer(app).running() as base:
        with TransferManager(home=home) as manager:
            job = upload_job(manager, f"{base}/up/big.bin", source)
            job.priority = JobPriority.FOREGROUND
            job_id = job.id
        serve = subprocess.Popen(
            [str(BACKHAUL), "serve", "--poll", "0.05"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            wait(
                lambda: serve.poll() is None and received() >= 8 * MiB,
                "8 MiB on the server",
            )
        finally:
            serve.send_signal(signal.SIGKILL)
            serve.wait(10)
        killed_at = settled()
        assert 8 * MiB <= killed_at < len(data)
        before_restart = len(recorder.ranges)
        sent_before = sum(last - first + 1 for first, last in recorder.ranges)
        again = subprocess.run(
            [str(BACKHAUL), "serve", "--poll", "0.05", "--until-idle"],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert again.returncode == 0, again.stderr.decode(errors="replace")
        after = recorder.ranges[before_restart:]
    with TransferManager(home=home) as manager:
        job = manager.get_job(job_id)
        assert job.state is JobState.TRANSFERRED, job.error
        job.complete()
    assert (tmp_path / "www" / "big.bin").read_bytes() == data
    # The restarted engine re-opened the session (Ping) and sent exactly the missing bytes:
    # nothing before the kill offset was uploaded twice.
    assert after[0][0] == killed_at
    assert all(first >= killed_at for first, _ in after)
    assert sum(last - first + 1 for first, last in after) == len(data) - killed_at
    assert sent_before >= killed_at  # the server had cut the in-flight fragment short


# =================================================================================================
# backhaul upload-server
# =================================================================================================


def upload_server(*args: str) -> subprocess.Popen[str]:
    """The verb as a real process (``python -m`` the verb's module: the same code the
    ``backhaul`` command runs once the verb is registered in adapters/cli.py)."""
    return subprocess.Popen(
        [sys.executable, "-m", "backhaul.adapters.cli_upload", "upload-server", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@contextlib.contextmanager
def serving(*args: str) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    proc = upload_server(*args)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("http://"), (line, proc.stderr and proc.stderr.read())
        yield line, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_the_upload_server_command_serves_uploads_until_stopped(
    tmp_path: Path, stop: signal.Signals
) -> None:
    root = tmp_path / "root"
    (root / "inbox").mkdir(parents=True)
    users = tmp_path / "users"
    users.write_text("# uploaders\nalice:s3cret\n")
    data = os.urandom(600 * KiB)
    options = RequestOptions(
        credentials=(PlainCredentials(AuthTarget.SERVER, AuthScheme.BASIC, "alice", "s3cret"),)
    )

    async def upload(url: str, payload: bytes, opts: RequestOptions = options) -> None:
        client = BitsUploader(fragment_size=512 * KiB, min_fragment_size=64 * KiB)
        try:
            session = await client.begin(url, opts, size=len(payload))
            assert await session.send(payload, 0) == len(payload)
            await session.finish()
        finally:
            await client.close()

    with serving(
        "--root", str(root), "--port", "0", "--prefix", "/bits",
        "--max-upload-size", "1M", "--max-fragment-size", "256k",
        "--session-timeout", "600", "--auth-file", str(users), "--realm", "team",
        "--max-sessions", "4", "--host-id", "127.0.0.1", "--host-id-fallback-timeout", "60",
        "--claim-timeout", "5",
    ) as (base, proc):  # fmt: skip
        assert base.endswith("/bits")
        # Fragments above 256k get 413: the client halves them and goes on.
        asyncio.run(upload(f"{base}/inbox/report.bin", data))
        assert (root / "inbox" / "report.bin").read_bytes() == data
        with pytest.raises(TransferError) as too_large:
            asyncio.run(upload(f"{base}/inbox/big.bin", bytes(1024 * KiB + 1)))
        assert too_large.value.hresult == hr.BG_E_TOO_LARGE
        with pytest.raises(TransferError) as denied:
            asyncio.run(upload(f"{base}/inbox/anon.bin", b"x", RequestOptions()))
        assert denied.value.hresult == hr.http_status_hresult(401)
        proc.send_signal(stop)
        assert proc.wait(10) == 0
        assert proc.stderr is not None
        assert "stopped" in proc.stderr.read()
    assert sorted(p.name for p in root.iterdir()) == ["BITS-Sessions", "inbox"]
    assert sorted(p.name for p in (root / "inbox").iterdir()) == ["report.bin"]


def test_the_upload_server_command_refuses_bad_options(tmp_path: Path) -> None:
    assert parse_size("64k") == 64 * KiB
    assert parse_size("1GiB") == 1 << 30
    assert parse_size("30000000") == 30_000_000
    assert main(["upload-server"]) == 2  # --root is required
    assert main(["upload-server", "--root", str(tmp_path), "--max-upload-size", "lots"]) == 2
    for bad in (
        ["--root", str(tmp_path / "missing")],
        ["--root", str(tmp_path), "--auth-file", str(tmp_path / "nope")],
        ["--root", str(tmp_path), "--notification", "by-value"],  # no URL
        ["--root", str(tmp_path), "--keyfile", "k.pem"],
    ):
        proc = upload_server(*bad)
        assert proc.wait(20) == 2, bad
        assert proc.stderr is not None and proc.stderr.read().startswith("backhaul upload-server:")
    # Every option reaches the configuration.
    args = argparse.Namespace(
        root=str(tmp_path), prefix="/x", session_dir=None, max_upload_size=10,
        session_timeout=60.0, host_id_fallback_timeout=9, allow_overwrite=True,
        notification="by-reference", notification_url="http://app/notify", host_id="node",
        max_fragment_size=5, cleanup_interval=7.0, max_sessions=3, max_header_bytes=2048,
        claim_timeout=1.0, no_fsync=True, auth_file=None, realm="r",
    )  # fmt: skip
    config = build_config(args)
    (vdir,) = config.vdirs
    assert (vdir.prefix, vdir.directory, vdir.max_upload_size) == ("/x", tmp_path, 10)
    assert (vdir.session_timeout, vdir.allow_overwrite, int(vdir.notification)) == (60, True, 1)
    assert (vdir.notification_url, vdir.host_id, vdir.host_id_fallback_timeout) == (
        "http://app/notify",
        "node",
        9,
    )
    assert config.session_dir == tmp_path / "BITS-Sessions"
    assert (config.max_fragment_size, config.cleanup_interval, config.max_sessions) == (5, 7, 3)
    assert (config.max_header_bytes, config.claim_timeout, config.fsync) == (2048, 1.0, False)
