"""A property of uploads as a whole: whatever the network does to the BITS upload exchange
(a 503 instead of an answer, the connection dropped before the server took a packet, or
dropped after it took it, so that the client never hears the answer), and whenever the
server loses its sessions (its clock jumps past BITSSessionTimeout), an upload job that
reaches TRANSFERRED has put, after Complete, exactly the local file on the server, and an
upload-reply job holds exactly the back-end application's answer. The project's own upload
server (adapters/upload_server.py) runs on 127.0.0.1 behind a middleware that plays a
script written by hypothesis, one step per BITS_POST; the real engine and BitsUploader run
the job on a manual clock, in small fragments."""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_engine import (  # the autouse fixture keeps BACKHAUL_STORE out
    KiB,
    _no_store_from_the_environment,  # noqa: F401
    make_engine,
)
from test_engine_fault_scripts import drive
from test_engine_upload import backend

from backhaul.adapters.clock import ManualClock
from backhaul.adapters.manager import TransferManager
from backhaul.adapters.upload_server import (
    DEFAULT_SESSION_TIMEOUT,
    NotificationType,
    UploadServerConfig,
    VirtualDirectory,
    make_upload_app,
    serve_app,
)
from backhaul.core import hresult as hr
from backhaul.core.vocabulary import JobState, JobType

S = JobState
STEPS = ("ok", "503", "drop-before", "drop-after", "expire")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def faulty(
    script: list[str], seen: list[str], skew: list[float]
) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method != "BITS_POST":
            return await handler(request)
        step = script.pop(0) if script else "ok"
        seen.append(f"{step} {request.headers.get('BITS-Packet-Type')}")
        if step == "503":
            return web.Response(status=503, text="not now")
        if step == "expire":  # the server's clock jumps past BITSSessionTimeout: every
            skew[0] += DEFAULT_SESSION_TIMEOUT + 1  # session it held is gone for good
        assert request.transport is not None
        if step == "drop-before":
            request.transport.close()
            return web.Response(status=503)  # never sent: the connection is gone
        response = await handler(request)
        if step == "drop-after":  # the server took the packet; the client never hears so
            request.transport.close()
        return response

    return middleware


def _answer(data: bytes) -> bytes:
    """What the back-end application answers an upload-reply of ``data`` with."""
    return b"answer to " + hashlib.sha256(data).hexdigest().encode()


async def upload(
    data: bytes, script: list[str], fragment: int, *, reply: bool, overwrite: bool = False
) -> tuple[str, bytes | None]:
    """Run the upload (an upload-reply with ``reply``) to its end: what the server then
    holds (the reply file, for an upload-reply), or None, and what happened. ``overwrite``:
    the virtual directory's BITSAllowOverwrites."""
    seen: list[str] = []
    skew = [0.0]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "www").mkdir()
        source = root / "source.bin"
        source.write_bytes(data)
        clock = ManualClock()
        async with backend(_answer(data)) as notify_url:
            notified: dict[str, Any] = {
                "notification": NotificationType.BY_VALUE,
                "notification_url": notify_url,
            }
            vdir_options = {**(notified if reply else {}), "allow_overwrite": overwrite}
            config = UploadServerConfig(
                session_dir=root / "sessions",
                vdirs=(VirtualDirectory("/up", root / "www", **vdir_options),),
                # The server's clock is the engine's: a session whose Create-Session answer
                # was lost keeps its destination for claim_timeout (30 s), which retries pass.
                clock=lambda: clock.now().timestamp() + skew[0],
            )
            app = make_upload_app(config)
            app.middlewares.append(faulty(script, seen, skew))
            manager = TransferManager("memory:", clock=clock)
            async with serve_app(app) as base:
                job = manager.create_job(
                    "scripted", JobType.UPLOAD_REPLY if reply else JobType.UPLOAD
                )
                job.minimum_retry_delay = 5
                job.add_file(f"{base}/up/put.bin", source)
                if reply:
                    job.reply_file_name = str(root / "reply.bin")
                job.resume()
                engine = make_engine(manager)  # on the manager's (manual) clock
                engine.upload_fragment = fragment
                await drive(engine, job, clock)
                outcome = f"{job.state.name} {job.error} {seen}"
                if job.state is not S.TRANSFERRED:
                    return outcome, None
                assert job.complete() == hr.S_OK
                held = root / ("reply.bin" if reply else "www/put.bin")
                return outcome, held.read_bytes() if held.exists() else None


@settings(
    max_examples=100,
    derandomize=True,  # the same scripts every run: CI meets no new one by chance
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    size=st.integers(1, 96 * KiB),
    fragment=st.sampled_from((4 * KiB, 16 * KiB, 64 * KiB)),
    script=st.lists(st.sampled_from(STEPS), max_size=12),
    reply=st.booleans(),
)
# Always among them: the first fragment taken but its answer lost, then a 503; and a
# Close-Session taken twice with its answer lost, then a 503 (the next try must close the
# session, not send a fragment of it: the server closed it, and would say "not found").
@example(40 * KiB, 16 * KiB, ["ok", "drop-after", "503", "drop-before"], False)
@example(
    40 * KiB, 16 * KiB, ["ok", "ok", "ok", "ok", "ok", "drop-after", "drop-after", "503"], False
)
@example(40 * KiB, 16 * KiB, ["ok", "ok", "ok", "drop-after", "503", "drop-after"], True)
def test_an_upload_puts_exactly_the_local_file_and_a_reply_comes_back_whole(
    size: int, fragment: int, script: list[str], reply: bool
) -> None:
    data = bytes((i * 7 + size) % 256 for i in range(size))
    # A session that expired after the server took the last fragment, before the client
    # heard so, can only start over, over the file it put: the server must allow that.
    overwrite = "expire" in script
    outcome, held = asyncio.run(
        upload(data, list(script), fragment, reply=reply, overwrite=overwrite)
    )
    assert held == (_answer(data) if reply else data), outcome


def test_an_upload_whose_session_expired_after_its_last_fragment_is_done() -> None:
    """The server took and acknowledged every byte (and moved the file into place), then
    let the session expire before Close-Session: "not found" there means nothing is left
    to close. Starting over would be refused (the destination exists, no overwrites)."""
    data = bytes(range(256)) * 40
    outcome, held = asyncio.run(upload(data, ["ok", "ok", "ok", "expire"], 16 * KiB, reply=False))
    assert held == data, outcome
    assert outcome.startswith("TRANSFERRED") and outcome.count("Create-Session") == 1, outcome
