"""Upload and upload-reply jobs run by the real engine against the project's BITS upload
server (adapters/upload_server.py) on 127.0.0.1: the whole path from the API to the file
on the server, resume after an engine stop, the reply, and Cancel-Session."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from test_engine import (  # the autouse fixture keeps BACKHAUL_STORE out
    FaultServer,
    KiB,
    _no_store_from_the_environment,  # noqa: F401
    make_engine,
    running,
    trickle,
    until,
)
from test_engine_fault_scripts import drive

from backhaul.adapters import localfile
from backhaul.adapters.clock import ManualClock
from backhaul.adapters.engine import Engine
from backhaul.adapters.manager import TransferJob, TransferManager
from backhaul.adapters.upload_server import (
    NotificationType,
    UploadServerConfig,
    VirtualDirectory,
    make_upload_app,
    serve_app,
    serve_uploads,
)
from backhaul.core import command as cmd
from backhaul.core import hresult
from backhaul.core.event import (
    BytesCheckpointed,
    ErrorOccurred,
    FileTransferred,
    ReplyLocated,
    UploadSessionOpened,
)
from backhaul.core.vocabulary import FilePropertyId, JobState, JobType
from backhaul.transports.bits_upload import BitsUploader

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@contextlib.asynccontextmanager
async def upload_server(tmp_path: Path, **vdir: object) -> AsyncIterator[tuple[str, Path]]:
    www = tmp_path / "www"
    www.mkdir(exist_ok=True)
    config = UploadServerConfig(
        session_dir=tmp_path / "sessions",
        vdirs=(VirtualDirectory("/up", www, **vdir),),  # type: ignore[arg-type]
    )
    async with serve_uploads(config) as base:
        yield f"{base}/up", www


@contextlib.asynccontextmanager
async def backend(reply: bytes, headers: dict[str, str] | None = None) -> AsyncIterator[str]:
    """The server application an upload-reply notifies: it answers with ``reply`` (and
    ``headers``)."""

    async def notify(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=reply, headers=headers)

    app = web.Application()
    app.router.add_post("/notify", notify)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/notify"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def replying(
    tmp_path: Path, reply: bytes, headers: dict[str, str] | None = None
) -> AsyncIterator[str]:
    """An upload server whose back-end application answers every upload with ``reply``
    (notified by value); yields the upload URL's base."""
    async with (
        backend(reply, headers) as notify_url,
        upload_server(
            tmp_path, notification=NotificationType.BY_VALUE, notification_url=notify_url
        ) as (url, _www),
    ):
        yield url


def ask(manager: TransferManager, url: str, source: Path, reply_file: Path) -> TransferJob:
    """A resumed upload-reply job of ``source`` whose reply goes to ``reply_file``."""
    job = manager.create_job("ask", JobType.UPLOAD_REPLY)
    job.add_file(f"{url}/query.xml", source)
    job.reply_file_name = str(reply_file)
    job.resume()
    return job


def test_an_upload_job_puts_the_file_on_the_server(tmp_path: Path) -> None:
    source = tmp_path / "report.bin"
    data = os.urandom(3 * 1024 * 1024 + 17)
    source.write_bytes(data)

    async def body() -> None:
        async with upload_server(tmp_path) as (url, www):
            manager = TransferManager(home=tmp_path / "home")
            job = manager.create_job("upload", JobType.UPLOAD)
            job.add_file(f"{url}/report.bin", source)
            job.resume()
            await Engine(manager, poll_interval=0.05).run(until_idle=True)
            assert job.state is JobState.TRANSFERRED
            assert job.complete() == hresult.S_OK
            assert (www / "report.bin").read_bytes() == data
            assert job.files()[0].progress.completed
            events = [a.event for a in manager.store.stream(job.id)]
            assert any(isinstance(e, UploadSessionOpened) for e in events)

    asyncio.run(body())


def header_names(block: str) -> dict[str, str]:
    lines = block.split("\r\n")[1:-2]
    return {n.strip().lower(): v.strip() for n, _, v in (line.partition(":") for line in lines)}


def test_an_upload_keeps_the_last_reply_as_http_response_headers(tmp_path: Path) -> None:
    """HTTP_RESPONSE_HEADERS of an upload's file: the server's last reply. A finished plain
    upload's is the Ack of its Close-Session; a refused one's is the refusal, with the BITS
    error the server put in it."""
    small, big = tmp_path / "small.bin", tmp_path / "big.bin"
    small.write_bytes(os.urandom(1000))
    big.write_bytes(os.urandom(5000))

    async def body() -> None:
        async with upload_server(tmp_path, max_upload_size=4096) as (url, _www):
            manager = TransferManager(home=tmp_path / "home")
            ok = manager.create_job("fits", JobType.UPLOAD)
            ok.add_file(f"{url}/small.bin", small)
            refused = manager.create_job("too big", JobType.UPLOAD)
            refused.add_file(f"{url}/big.bin", big)
            assert ok.get_file_property(0, FilePropertyId.HTTP_RESPONSE_HEADERS) is None
            ok.resume()
            refused.resume()
            await Engine(manager, poll_interval=0.05).run(until_idle=True)

            assert ok.state is JobState.TRANSFERRED
            block = ok.get_file_property(0, FilePropertyId.HTTP_RESPONSE_HEADERS)
            assert block.startswith("HTTP/1.1 200 OK\r\n") and block.endswith("\r\n\r\n")
            assert header_names(block)["bits-packet-type"].lower() == "ack"
            session = ok.snapshot().files[0].upload_token
            assert session is not None and header_names(block)["bits-session-id"] in session

            assert refused.state is JobState.ERROR
            error = refused.error
            assert error is not None and (error.file_index, error.protocol) == (0, "http")
            block = refused.get_file_property(0, FilePropertyId.HTTP_RESPONSE_HEADERS)
            # The server refuses the first fragment of a file over its limit (500 with
            # BG_E_TOO_LARGE in BITS-Error-Code): that reply is the file's last response.
            assert block.startswith("HTTP/1.1 500 ")
            assert error.hresult == hresult.BG_E_TOO_LARGE
            assert int(header_names(block)["bits-error-code"], 16) == hresult.BG_E_TOO_LARGE
            failed = [a.event for a in manager.store.stream(refused.id)]
            assert [e.response_headers for e in failed if isinstance(e, ErrorOccurred)] == [block]

    asyncio.run(body())


def an_upload(tmp_path: Path, url: str, size: int) -> tuple[TransferManager, TransferJob, bytes]:
    """A new upload job of ``size`` random bytes to ``url``/big.bin (not resumed)."""
    source = tmp_path / "big.bin"
    data = os.urandom(size)
    source.write_bytes(data)
    manager = TransferManager(home=tmp_path / "home")
    job = manager.create_job("upload", JobType.UPLOAD)
    job.add_file(f"{url}/big.bin", source)
    return manager, job, data


def first_engine(manager: TransferManager, checkpoint_interval: float) -> Engine:
    """An engine that sends 256 KiB fragments: many of them in a short test."""
    engine = Engine(manager, poll_interval=0.05, checkpoint_interval=checkpoint_interval)
    engine.upload_fragment = 256 * 1024
    return engine


def test_an_upload_resumes_in_a_new_engine_from_the_servers_offset(tmp_path: Path) -> None:
    async def body() -> None:
        async with upload_server(tmp_path) as (url, www):
            manager, job, data = an_upload(tmp_path, url, 24 * 1024 * 1024)
            job.resume()
            first = first_engine(manager, 0.05)
            run = asyncio.create_task(first.run())
            while job.snapshot().files[0].upload_token is None or not first.live_progress:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
            first.stop()
            await run
            token = job.snapshot().files[0].upload_token
            assert job.state is JobState.QUEUED  # the stopped engine gave its turn back
            second = Engine(manager, poll_interval=0.05)
            await second.run(until_idle=True)
            assert job.state is JobState.TRANSFERRED
            assert job.snapshot().files[0].upload_token == token  # the same session
            job.complete()
            assert (www / "big.bin").read_bytes() == data

    asyncio.run(body())


def test_a_rate_limited_upload_sends_fragments_of_a_quarter_second(tmp_path: Path) -> None:
    """A fragment goes out at the link's speed and is charged to the limiter after it: a
    4 MiB fragment under a 256 KiB/s limit was a 4 MiB burst, then a 16 s pause. Limited,
    fragments hold a quarter second of the limit (here 64 KiB); unlimited, upload_fragment."""
    sizes: list[int] = []

    @web.middleware
    async def measured(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.headers.get("BITS-Packet-Type", "").lower() == "fragment":
            sizes.append(int(request.headers["Content-Length"]))
        return await handler(request)

    async def body() -> None:
        www = tmp_path / "www"
        www.mkdir()
        config = UploadServerConfig(
            session_dir=tmp_path / "sessions", vdirs=(VirtualDirectory("/up", www),)
        )
        app = make_upload_app(config)
        app.middlewares.append(measured)
        async with serve_app(app) as base:
            manager, job, data = an_upload(tmp_path, f"{base}/up", 1024 * 1024)
            job.max_rate = 256 * 1024
            job.resume()
            engine = Engine(manager, poll_interval=0.05)
            assert engine.upload_fragment > 256 * 1024
            await engine.run(until_idle=True)
            assert job.state is JobState.TRANSFERRED
            job.complete()
            assert (www / "big.bin").read_bytes() == data

    asyncio.run(body())
    assert sizes and max(sizes) <= 64 * 1024 and sum(sizes) >= 1024 * 1024


def test_a_stopped_upload_claims_what_the_server_acknowledged_and_shows_its_size(
    tmp_path: Path,
) -> None:
    """No checkpoint falls due before the stop (a minute apart): the stop itself claims
    the bytes the server acknowledged, as a stopped download claims what it received, so
    that `info` and the command's "kept" say what the server holds. A display knows the
    file's size from the start, before any checkpoint."""

    async def body() -> None:
        async with upload_server(tmp_path) as (url, www):
            manager, job, data = an_upload(tmp_path, url, 8 * 1024 * 1024)
            job.max_rate = 2 * 1024 * 1024
            job.resume()
            first = first_engine(manager, 60.0)
            run = asyncio.create_task(first.run())
            key = (job.id, 0)
            while first.live_progress.get(key, 0) < 512 * 1024:
                await asyncio.sleep(0.01)
            assert first.live_sizes[key] == len(data)
            seen = first.live_progress[key]
            first.stop()
            await run
            claimed = job.snapshot().files[0].bytes_transferred
            assert seen <= claimed < len(data) and claimed % (256 * 1024) == 0, claimed
            logged = [a.event for a in manager.store.stream(job.id)]
            checkpoints = [e for e in logged if isinstance(e, BytesCheckpointed)]
            assert [c.bytes_transferred for c in checkpoints] == [claimed]
            await Engine(manager, poll_interval=0.05).run(until_idle=True)
            assert job.state is JobState.TRANSFERRED
            job.complete()
            assert (www / "big.bin").read_bytes() == data

    asyncio.run(body())


def test_an_upload_reply_job_fetches_the_reply_and_keeps_it_on_complete(tmp_path: Path) -> None:
    source = tmp_path / "query.xml"
    source.write_bytes(b"<query/>")
    reply = b"<answer>" + os.urandom(5000) + b"</answer>"

    async def body() -> None:
        async with replying(tmp_path, reply) as url:
            manager = TransferManager(home=tmp_path / "home")
            job = ask(manager, url, source, tmp_path / "answer.xml")
            await Engine(manager, poll_interval=0.05).run(until_idle=True)
            assert job.state is JobState.TRANSFERRED, job.error
            progress = job.reply_progress
            assert progress.bytes_total == progress.bytes_transferred == len(reply)
            assert job.reply_data() == reply
            assert not (tmp_path / "answer.xml").exists()  # only after Complete
            job.complete()
            assert (tmp_path / "answer.xml").read_bytes() == reply
            events = [a.event for a in manager.store.stream(job.id)]
            located = [e for e in events if isinstance(e, ReplyLocated)]
            transferred = [i for i, e in enumerate(events) if isinstance(e, FileTransferred)]
            assert located and transferred

    asyncio.run(body())


def test_a_reply_temp_file_lost_while_the_job_waits_is_fetched_again_from_zero(
    tmp_path: Path,
) -> None:
    """The reply's checkpointed bytes are in its temp file only: when it is deleted while the
    job waits to retry, the reply is fetched again whole, not resumed after a hole."""
    source = tmp_path / "query.xml"
    source.write_bytes(b"<query/>")
    reply = os.urandom(512 * KiB)
    served = trickle(reply, drop_after=256 * KiB)

    async def body() -> None:
        async with FaultServer({"/reply": served}) as srv:
            static = {"BITS-Static-Response-URL": srv.url("/reply")}
            async with replying(tmp_path, b"", static) as url:
                manager = TransferManager(home=tmp_path / "home")
                job = ask(manager, url, source, tmp_path / "answer.bin")
                async with running(make_engine(manager)):
                    await until(lambda: job.state is JobState.TRANSIENT_ERROR, "the reply's drop")
                    assert job.reply_progress.bytes_transferred > 0
                    localfile.reply_temp_path(job.snapshot()).unlink()
                    job.resume()
                    await until(lambda: job.state is JobState.TRANSFERRED, "TRANSFERRED")
                assert [h.range_start for h in srv.hits_for("/reply")] == [None, None]
                job.complete()
                assert (tmp_path / "answer.bin").read_bytes() == reply

    asyncio.run(body())


def test_a_changed_source_fails_with_bg_e_local_file_changed(tmp_path: Path) -> None:
    source = tmp_path / "moving.bin"
    source.write_bytes(os.urandom(8 * 1024 * 1024))

    async def body() -> None:
        async with upload_server(tmp_path) as (url, _www):
            manager = TransferManager(home=tmp_path / "home")
            job = manager.create_job("upload", JobType.UPLOAD)
            job.add_file(f"{url}/moving.bin", source)
            job.resume()
            engine = Engine(manager, poll_interval=0.05)
            engine.upload_fragment = 64 * 1024
            run = asyncio.create_task(engine.run(until_idle=True))
            while not engine.live_progress:
                await asyncio.sleep(0.005)
            with open(source, "ab") as f:
                f.write(b"more")
            await run
            assert job.state is JobState.ERROR
            error = job.error
            assert error is not None
            assert error.hresult == hresult.BG_E_LOCAL_FILE_CHANGED

    asyncio.run(body())


def uploading(
    tmp_path: Path, url: str
) -> tuple[TransferManager, TransferJob, Engine, asyncio.Task[None]]:
    """``an_upload`` of 16 MiB, resumed, and an engine running it in 128 KiB fragments:
    long enough to be cancelled mid-way (call from the test's loop)."""
    manager, job, _ = an_upload(tmp_path, url, 16 * 1024 * 1024)
    job.resume()
    engine = Engine(manager, poll_interval=0.05)
    engine.upload_fragment = 128 * 1024
    return manager, job, engine, asyncio.create_task(engine.run())


def test_cancelling_an_upload_cancels_the_server_session(tmp_path: Path) -> None:
    async def body() -> None:
        async with upload_server(tmp_path) as (url, www):
            _, job, engine, run = uploading(tmp_path, url)
            while not engine.live_progress:
                await asyncio.sleep(0.005)
            sessions = tmp_path / "sessions"
            assert any(sessions.rglob("session.json"))
            job.cancel()
            for _ in range(100):
                await asyncio.sleep(0.05)
                live = list(sessions.rglob("request.bin"))
                if not live:
                    break
            engine.stop()
            await run
            assert not list(sessions.rglob("request.bin"))
            assert not (www / "big.bin").exists()

    asyncio.run(body())


def test_an_upload_cancelled_while_no_engine_ran_is_cancelled_on_the_server_later(
    tmp_path: Path,
) -> None:
    """BITS keeps telling the server of an upload's Cancel for up to 24 h: a job cancelled
    while no engine ran (the daemon stopped) left its session and partial file on the server
    for good. The next engine sends Cancel-Session; the session's bytes are gone."""

    async def body() -> None:
        async with upload_server(tmp_path) as (url, _www):
            manager, job, engine, run = uploading(tmp_path, url)
            sessions = tmp_path / "sessions"
            while not list(sessions.rglob("request.bin")):
                await asyncio.sleep(0.005)
            engine.stop()
            await run
            job.cancel()  # no engine runs
            assert list(sessions.rglob("request.bin"))
            later = Engine(manager, poll_interval=0.05)
            run = asyncio.create_task(later.run())
            for _ in range(100):
                await asyncio.sleep(0.05)
                if not list(sessions.rglob("request.bin")):
                    break
            later.stop()
            await run
            assert not list(sessions.rglob("request.bin"))

    asyncio.run(body())


# -- upload-reply faults, on the manual clock -------------------------------------------------


class ReplyServer:
    """The project's upload server on the manual clock, notifying (by value) a back-end whose
    answers a test scripts (``backend_statuses``: the status of each notification, then 200),
    behind a middleware that logs every request and answers 503 instead of the next
    ``refuse[packet]`` BITS_POSTs of a packet type (``"GET"``: reply downloads)."""

    def __init__(self, root: Path, clock: ManualClock) -> None:
        self.root = root
        self.clock = clock
        self.backend_statuses: list[int] = []
        self.notified = 0
        self.refuse: dict[str, int] = {}
        self.seen: list[str] = []

    async def notify(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.notified += 1
        status = self.backend_statuses.pop(0) if self.backend_statuses else 200
        if status != 200:
            return web.Response(status=status)
        return web.Response(body=b"answer to " + body)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        kind = request.headers.get("BITS-Packet-Type", "") if request.method == "BITS_POST" else ""
        kind = kind or request.method
        self.seen.append(kind)
        if self.refuse.get(kind, 0) > 0:
            self.refuse[kind] -= 1
            return web.Response(status=503)
        return await handler(request)

    def session_states(self) -> list[str]:
        return [
            json.loads(path.read_text())["state"]
            for path in (self.root / "sessions").glob("*/session.json")
        ]

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[str]:
        """Yields the upload URL's base."""
        backend_app = web.Application()
        backend_app.router.add_post("/notify", self.notify)
        async with serve_app(backend_app) as backend_base:
            (self.root / "www").mkdir(exist_ok=True)
            vdir = VirtualDirectory(
                "/up",
                self.root / "www",
                notification=NotificationType.BY_VALUE,
                notification_url=f"{backend_base}/notify",
            )
            config = UploadServerConfig(
                session_dir=self.root / "sessions",
                vdirs=(vdir,),
                clock=lambda: self.clock.now().timestamp(),
            )
            app = make_upload_app(config)
            app.middlewares.append(self.middleware)
            async with serve_app(app) as base:
                yield f"{base}/up"


def reply_job(tmp_path: Path, url: str, clock: ManualClock) -> tuple[TransferManager, TransferJob]:
    """A resumed upload-reply job of b"the query" on the manual clock."""
    source = tmp_path / "query.bin"
    source.write_bytes(b"the query")
    manager = TransferManager("memory:", clock=clock)
    job = manager.create_job("ask", JobType.UPLOAD_REPLY)
    job.minimum_retry_delay = 5
    job.add_file(f"{url}/query.bin", source)
    job.reply_file_name = str(tmp_path / "answer.bin")
    job.resume()
    return manager, job


def quick_engine(manager: TransferManager, **options: Any) -> Engine:
    """``make_engine`` whose BitsUploader resends Close-Session without waiting long."""
    return make_engine(manager, uploaders={"http": BitsUploader(retry_delay=0.01)}, **options)


def test_an_upload_reply_whose_backend_failed_once_sends_its_final_fragment_again(
    tmp_path: Path,
) -> None:
    """The back-end answers the first notification 503 (transient, bits-upload.md §6.3):
    the final fragment's Ack is that error, though the server holds every byte. The retry
    re-opens the session and sends the final fragment again (the server's Ping does not
    claim a finished upload then), the server notifies the back-end again and answers with
    the reply URL (§4.1): the job gets its reply."""
    clock = ManualClock()
    server = ReplyServer(tmp_path, clock)
    server.backend_statuses = [503]

    async def body() -> None:
        async with server.serving() as url:
            manager, job = reply_job(tmp_path, url, clock)
            await drive(quick_engine(manager), job, clock)
            assert job.state is JobState.TRANSFERRED, (job.error, server.seen)
            assert server.notified == 2
            assert server.seen.count("Fragment") == 2, server.seen
            assert job.complete() == hresult.S_OK
            assert (tmp_path / "answer.bin").read_bytes() == b"answer to the query"
            assert server.session_states() == ["closed"]

    asyncio.run(body())


def test_the_reply_session_is_closed_by_the_engine_that_fetches_the_reply(
    tmp_path: Path,
) -> None:
    """The reply's GET fails (503), the engine stops, a new engine (the same store) fetches
    the reply: that one sends the Close-Session (bits-upload.md §6.1 step 6), re-opening the
    session with the token the file recorded, so the server deletes the reply and the
    session is not left for its timeout (14 days)."""
    clock = ManualClock()
    server = ReplyServer(tmp_path, clock)
    server.refuse = {"GET": 1}

    async def body() -> None:
        async with server.serving() as url:
            manager, job = reply_job(tmp_path, url, clock)
            async with running(quick_engine(manager)):
                await until(lambda: job.state is JobState.TRANSIENT_ERROR, "the reply's 503")
            assert "Close-Session" not in server.seen
            clock.advance(10)
            await drive(quick_engine(manager), job, clock)
            assert job.state is JobState.TRANSFERRED, (job.error, server.seen)
            assert server.seen[-3:] == ["GET", "Ping", "Close-Session"]
            assert server.session_states() == ["closed"]
            job.complete()
            assert (tmp_path / "answer.bin").read_bytes() == b"answer to the query"

    asyncio.run(body())


def test_a_close_session_that_fails_transiently_is_sent_again_at_the_retry(
    tmp_path: Path,
) -> None:
    """Close-Session answered 503 every time the uploader resends it: the attempt fails
    transiently (not the job's transfer, silently), and the retry closes the session
    without downloading the reply again."""
    clock = ManualClock()
    server = ReplyServer(tmp_path, clock)
    server.refuse = {"Close-Session": 3}  # BitsUploader's attempts

    async def body() -> None:
        async with server.serving() as url:
            manager, job = reply_job(tmp_path, url, clock)
            await drive(quick_engine(manager), job, clock)
            assert job.state is JobState.TRANSFERRED, (job.error, server.seen)
            assert server.seen.count("Close-Session") == 4, server.seen
            assert server.seen.count("GET") == 1, server.seen
            assert server.session_states() == ["closed"]
            job.complete()
            assert (tmp_path / "answer.bin").read_bytes() == b"answer to the query"

    asyncio.run(body())


@pytest.mark.parametrize("after", [cmd.FinishFile, cmd.LocateReply])
def test_a_suspend_as_the_upload_finishes_keeps_the_reply_url(
    tmp_path: Path, after: type[cmd.Command]
) -> None:
    """The client suspends the job at the moment the engine records the upload's end (the
    file finished, or its reply located): whichever of the two lands first, after Resume the
    job fetches its reply. A finished file whose reply URL was never recorded could not
    learn it again (the file is not uploaded again)."""
    clock = ManualClock()
    server = ReplyServer(tmp_path, clock)

    async def body() -> None:
        async with server.serving() as url:
            manager, job = reply_job(tmp_path, url, clock)
            engine = quick_engine(manager)
            commit = engine._commit

            async def suspending(job_id: str, command: cmd.Command) -> Any:
                result = await commit(job_id, command)
                if isinstance(command, after):
                    job.suspend()  # the client's Suspend arrives right now
                return result

            engine._commit = suspending  # type: ignore[method-assign]
            async with running(engine):
                await until(lambda: job.state is JobState.SUSPENDED, "the suspend")
                await asyncio.sleep(0.1)  # the engine's turn with the job ends
                job.resume()
                await until(
                    lambda: job.state in (JobState.TRANSFERRED, JobState.ERROR), "the reply"
                )
            assert job.state is JobState.TRANSFERRED, (job.error, server.seen)
            job.complete()
            assert (tmp_path / "answer.bin").read_bytes() == b"answer to the query"
            assert server.session_states() == ["closed"]

    asyncio.run(body())
