"""BitsUploader (the BITS upload protocol client) passes the upload half of the conformance
kit against backhaul's own BITS upload server (adapters/upload_server.py): ``/up`` publishes
uploads, ``/reply`` hands them to a back-end application (by value) whose answer is the reply.
Server and back-end run in a thread with their own event loop, once per module."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from backhaul.adapters.upload_server import (
    NotificationType,
    UploadServerConfig,
    VirtualDirectory,
    serve_app,
    serve_uploads,
)
from backhaul.transports.bits_upload import BitsUploader
from backhaul.transports.conformance import UploadConformance


async def _notify(request: web.Request) -> web.Response:
    """The back-end application: its reply names the upload's digest."""
    body = await request.read()
    return web.Response(body=f"reply:{hashlib.sha256(body).hexdigest()}".encode())


@pytest.fixture(scope="module")
def upload_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    root = tmp_path_factory.mktemp("bits-upload")
    (root / "www").mkdir()
    (root / "replies").mkdir()
    started = threading.Event()
    base: list[str] = []
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    async def serve() -> None:
        backend = web.Application()
        backend.router.add_post("/notify", _notify)
        async with serve_app(backend) as backend_url:
            config = UploadServerConfig(
                session_dir=root / "sessions",
                vdirs=[
                    VirtualDirectory("/up", root / "www"),
                    VirtualDirectory(
                        "/reply",
                        root / "replies",
                        notification=NotificationType.BY_VALUE,
                        notification_url=f"{backend_url}/notify",
                    ),
                ],
                fsync=False,
            )
            async with serve_uploads(config) as url:
                base.append(url)
                started.set()
                await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    try:
        assert started.wait(10), "the upload server did not start"
        yield base[0], root / "www"
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()


class TestBitsUploadConformance(UploadConformance):
    @pytest.fixture(autouse=True)
    def _server(self, upload_server: tuple[str, Path]) -> None:
        self.base, self.www = upload_server

    def make_uploader(self) -> BitsUploader:
        return BitsUploader(fragment_size=self.fragment_size)

    def upload_url(self, name: str) -> str:
        return f"{self.base}/up/{name}"

    def reply_upload_url(self, name: str) -> str:
        return f"{self.base}/reply/{name}"

    def fetch(self, name: str) -> bytes | None:
        path = self.www / name
        return path.read_bytes() if path.exists() else None
