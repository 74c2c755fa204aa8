"""The BITS upload server (adapters/upload_server.py) packet by packet: raw sockets for what
aiohttp's client cannot send, aiohttp's client for the rest. The BitsUploader end-to-end
tests live in tests/transports/test_bits_upload.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from aiohttp import web

from backhaul.adapters.upload_server import (
    UPLOAD_SERVER,
    NotificationType,
    UploadServerConfig,
    VirtualDirectory,
    make_upload_app,
    serve_app,
    serve_uploads,
)
from backhaul.core import hresult as hr

T = TypeVar("T")
GUID = "{7df0354d-249b-430f-820d-3d2a9bef4931}"
KIB = 1024


def run(body: Callable[[], Awaitable[T]], timeout: float = 15.0) -> T:
    async def main() -> T:
        return await asyncio.wait_for(body(), timeout)

    return asyncio.run(main())


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def www(tmp_path: Path) -> Path:
    path = tmp_path / "www"
    path.mkdir()
    return path


def make_config(tmp_path: Path, www: Path, **vdir: Any) -> UploadServerConfig:
    server_keys = {"max_fragment_size", "clock", "cleanup_interval", "notification_timeout"}
    server = {k: vdir.pop(k) for k in list(vdir) if k in server_keys}
    return UploadServerConfig(
        session_dir=tmp_path / "sessions",
        vdirs=[VirtualDirectory("/up", www, **vdir), VirtualDirectory("/off", www, enabled=False)],
        fsync=True,
        **server,
    )


class Reply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers.items() if k.lower() == name.lower()), None)

    def error(self) -> tuple[int, str | None, str | None]:
        return self.status, self.header("BITS-Error-Code"), self.header("BITS-Error-Context")


async def post(
    http: aiohttp.ClientSession,
    url: str,
    packet: str,
    *,
    session: str | None = None,
    data: bytes | None = None,
    total: int | None = None,
    first: int = 0,
    **headers: str,
) -> Reply:
    sent = {"BITS-Packet-Type": packet, **{k.replace("_", "-"): v for k, v in headers.items()}}
    if session is not None:
        sent["BITS-Session-Id"] = session
    if packet.lower() == "create-session":
        sent.setdefault("BITS-Supported-Protocols", GUID)
    if data is not None and total is not None:
        sent["Content-Range"] = f"bytes {first}-{first + len(data) - 1}/{total}"
    async with http.request("BITS_POST", url, headers=sent, data=data) as resp:
        return Reply(resp.status, dict(resp.headers), await resp.read())


async def create(http: aiohttp.ClientSession, url: str) -> str:
    reply = await post(http, url, "Create-Session")
    assert reply.status == 200, reply.headers
    session = reply.header("BITS-Session-Id")
    assert session is not None
    return session


async def raw(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await reader.read()  # to EOF: the last request says Connection: close
    writer.close()
    return data


@contextlib.asynccontextmanager
async def server(config: UploadServerConfig) -> AsyncIterator[tuple[str, aiohttp.ClientSession]]:
    async with serve_uploads(config) as base, aiohttp.ClientSession() as http:
        yield base, http


def port_of(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


# -- BITS_POST reaches the handlers -----------------------------------------------------------


def test_a_raw_bits_post_ping_gets_an_ack(tmp_path: Path, www: Path) -> None:
    async def body() -> None:
        async with server(make_config(tmp_path, www)) as (base, _http):
            answer = await raw(
                port_of(base),
                b"BITS_POST /up/file.bin HTTP/1.1\r\nHost: x\r\nBITS-Packet-Type: Ping\r\n"
                b"Content-Length: 0\r\nConnection: close\r\n\r\n",
            )
        head = answer.decode("latin-1")
        assert head.startswith("HTTP/1.1 200 OK\r\n")
        assert "\r\nBITS-Packet-Type: Ack\r\n" in head
        assert "\r\nContent-Length: 0\r\n" in head
        assert head.endswith("\r\n\r\n")  # no body

    run(body)


def test_the_plain_app_runner_refuses_bits_post_which_is_why_bits_app_runner_exists(
    tmp_path: Path, www: Path
) -> None:
    async def body() -> None:
        runner = web.AppRunner(make_upload_app(make_config(tmp_path, www)))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            answer = await raw(
                port,
                b"BITS_POST /up/f HTTP/1.1\r\nHost: x\r\nBITS-Packet-Type: Ping\r\n"
                b"Content-Length: 0\r\n\r\n",
            )
        finally:
            await runner.cleanup()
        assert answer.split(b"\r\n", 1)[0].endswith(b"400 Bad Request")

    if os.environ.get("AIOHTTP_NO_EXTENSIONS"):
        pytest.skip("the C parser is disabled in this process")
    run(body)


def test_keep_alive_serves_bits_post_then_get_and_head_on_one_connection(
    tmp_path: Path, www: Path
) -> None:
    async def body() -> None:
        async with server(make_config(tmp_path, www)) as (base, _http):
            answer = await raw(
                port_of(base),
                b"BITS_POST /up/f HTTP/1.1\r\nHost: x\r\nBITS-Packet-Type: ping\r\n"
                b"Content-Length: 0\r\n\r\n"
                b"HEAD /up/nothing HTTP/1.1\r\nHost: x\r\n\r\n"
                b"GET /up/nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
        statuses = [line for line in answer.split(b"\r\n") if line.startswith(b"HTTP/1.1 ")]
        assert statuses == [
            b"HTTP/1.1 200 OK",
            b"HTTP/1.1 404 Not Found",
            b"HTTP/1.1 404 Not Found",
        ]

    run(body)


# -- sessions and fragments -------------------------------------------------------------------


def test_create_session_ack(tmp_path: Path, www: Path) -> None:
    async def body() -> None:
        config = make_config(tmp_path, www, host_id="node7.example", host_id_fallback_timeout=110)
        async with server(config) as (base, http):
            # Mixed case, comma-separated, a foreign GUID first: still a match.
            offered = (
                "{00000000-0000-0000-0000-000000000001}, {7DF0354D-249B-430F-820d-3d2a9bef4931}"
            )
            reply = await post(
                http, f"{base}/up/a.bin", "CreatE-SEssION", BITS_Supported_Protocols=offered
            )
            assert reply.status == 200
            assert reply.header("BITS-Packet-Type") == "Ack"
            assert reply.header("BITS-Protocol") == GUID
            assert reply.header("Accept-Encoding") == "identity"
            assert reply.header("BITS-Host-Id") == "node7.example"
            assert reply.header("BITS-Host-Id-Fallback-Timeout") == "110"
            assert reply.body == b""
            session = reply.header("BITS-Session-Id") or ""
            assert (session[0], session[-1]) == ("{", "}")
            assert session == session.upper()
            state = json.loads(
                (config.session_dir / session.strip("{}") / "session.json").read_text()
            )
            assert state["state"] == "receiving"
            # No common protocol.
            reply = await post(
                http, f"{base}/up/a.bin", "Create-Session", BITS_Supported_Protocols="{1234}"
            )
            assert reply.error() == (400, "0x80070057", "0x5")

    run(body)


def test_fragment_bookkeeping_gap_duplicate_overlap(tmp_path: Path, www: Path) -> None:
    async def body() -> None:
        config = make_config(tmp_path, www)
        async with server(config) as (base, http):
            url = f"{base}/up/f.bin"
            sid = await create(http, url)
            data = bytes(range(200))
            reply = await post(http, url, "FRAgmENT", session=sid, data=data[:101], total=200)
            assert (reply.status, reply.header("BITS-Received-Content-Range")) == (200, "101")
            assert reply.header("BITS-Session-Id") == sid
            # A gap: 416 with the offset, no error code, nothing written.
            reply = await post(
                http, url, "Fragment", session=sid, data=data[150:], total=200, first=150
            )
            assert (reply.status, reply.header("BITS-Received-Content-Range")) == (416, "101")
            assert reply.header("BITS-Error-Code") is None
            # A duplicate: acknowledged, nothing written.
            reply = await post(http, url, "Fragment", session=sid, data=b"X" * 50, total=200)
            assert (reply.status, reply.header("BITS-Received-Content-Range")) == (200, "101")
            # An overlap (docs' example: have 0-100, get 50-150): only 101-150 are written.
            overlap = b"Y" * 51 + data[101:151]
            reply = await post(
                http, url, "Fragment", session=sid, data=overlap, total=200, first=50
            )
            assert reply.header("BITS-Received-Content-Range") == "151"
            # The total may not change; the range must be valid.
            reply = await post(
                http, url, "Fragment", session=sid, data=data[151:], total=300, first=151
            )
            assert reply.error() == (400, "0x80070057", "0x5")
            for bad in ("bytes 151-150/200", "bytes=151-199/200", "151-199/200", "bytes 151-199/*"):
                reply = await post(
                    http, url, "Fragment", session=sid, data=data[151:], Content_Range=bad
                )
                assert reply.error() == (400, "0x80070057", "0x5"), bad
            reply = await post(
                http, url, "Fragment", session=sid, data=data[151:], total=200, first=151
            )
            assert (reply.status, reply.header("BITS-Received-Content-Range")) == (200, "200")
            # The last fragment renamed the upload into place.
            assert (www / "f.bin").read_bytes() == data
            # A repeated final fragment (lost Ack) is acknowledged again.
            reply = await post(
                http, url, "Fragment", session=sid, data=data[151:], total=200, first=151
            )
            assert (reply.status, reply.header("BITS-Received-Content-Range")) == (200, "200")
            assert (await post(http, url, "Close-Session", session=sid)).status == 200
            # Close-Session is idempotent; Cancel after Close is "not found".
            assert (await post(http, url, "Close-Session", session=sid)).status == 200
            reply = await post(http, url, "Cancel-Session", session=sid)
            assert reply.error() == (500, "0x8020001F", "0x5")
            assert not (config.session_dir / sid.strip("{}") / "request.bin").exists()

    run(body)


def test_malformed_packets_are_400_with_error_headers(tmp_path: Path, www: Path) -> None:
    async def body() -> None:
        async with server(make_config(tmp_path, www)) as (base, http):
            url = f"{base}/up/m.bin"
            sid = await create(http, url)
            cases = [
                await post(http, url, "Teleport"),
                await post(http, url, ""),
                await post(http, url, "Ping", data=b"body"),  # a body on a body-less packet
                await post(http, url, "Close-Session", session=sid, data=b"x"),
                await post(http, url, "Fragment", data=b"abc", total=3),  # no session id
                await post(http, url, "Ping", X_Big="a" * 5000),  # a header over 4 KB
            ]
            for reply in cases:
                assert reply.error() == (400, "0x80070057", "0x5")
                assert reply.header("BITS-Packet-Type") == "Ack"
                assert reply.body == b""
            # No Content-Length at all (chunked): refused, on a raw socket.
            answer = await raw(
                port_of(base),
                b"BITS_POST /up/m.bin HTTP/1.1\r\nHost: x\r\nBITS-Packet-Type: Fragment\r\n"
                b"BITS-Session-Id: " + sid.encode() + b"\r\nContent-Range: bytes 0-2/3\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            )
            assert answer.startswith(b"HTTP/1.1 400")
            assert b"BITS-Error-Code: 0x80070057" in answer

    run(body)


def test_unknown_sessions_are_session_not_found(tmp_path: Path, www: Path) -> None:
    async def body() -> None:
        async with server(make_config(tmp_path, www)) as (base, http):
            sid = await create(http, f"{base}/up/a.bin")
            for session, url in [
                ("{00000000-0000-0000-0000-000000000000}", f"{base}/up/a.bin"),
                ("../../etc", f"{base}/up/a.bin"),
                (sid, f"{base}/up/b.bin"),  # a session belongs to its URL
            ]:
                reply = await post(http, url, "Fragment", session=session, data=b"abc", total=3)
                assert reply.error() == (500, "0x8020001F", "0x5")
                reply = await post(http, url, "Close-Session", session=session)
                assert reply.error() == (500, "0x8020001F", "0x5")

    run(body)


def test_max_upload_size_is_bg_e_too_large(tmp_path: Path, www: Path) -> None:
    async def body() -> None:
        async with server(make_config(tmp_path, www, max_upload_size=1000)) as (base, http):
            url = f"{base}/up/big.bin"
            sid = await create(http, url)
            reply = await post(http, url, "Fragment", session=sid, data=b"a" * 10, total=1001)
            assert reply.error() == (500, "0x80200020", "0x5")
            reply = await post(http, url, "Fragment", session=sid, data=b"a" * 10, total=1000)
            assert reply.status == 200

    run(body)


def test_fragments_above_max_fragment_size_are_413_and_the_connection_survives(
    tmp_path: Path, www: Path
) -> None:
    async def body() -> None:
        async with server(make_config(tmp_path, www, max_fragment_size=64 * KIB)) as (base, http):
            url = f"{base}/up/f.bin"
            sid = await create(http, url)
            reply = await post(http, url, "Fragment", session=sid, data=b"a" * 65537, total=70000)
            assert reply.error() == (413, hr.format_hresult(hr.http_status_hresult(413)), "0x5")
            reply = await post(http, url, "Fragment", session=sid, data=b"a" * 65536, total=70000)
            assert reply.header("BITS-Received-Content-Range") == "65536"

    run(body)


def test_disabled_and_unknown_virtual_directories(tmp_path: Path, www: Path) -> None:
    async def body() -> None:
        async with server(make_config(tmp_path, www)) as (base, http):
            reply = await post(http, f"{base}/off/a.bin", "Create-Session")
            assert reply.error() == (501, "0x80070005", "0x5")
            reply = await post(http, f"{base}/elsewhere/a.bin", "Create-Session")
            assert reply.error() == (404, hr.format_hresult(hr.http_status_hresult(404)), "0x5")
            reply = await post(http, f"{base}/up/no/such/dir.bin", "Create-Session")
            assert reply.error() == (404, "0x80070003", "0x5")
            # Ping is always 200 (no state change).
            assert (await post(http, f"{base}/off/a.bin", "Ping")).status == 200

    run(body)


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/up/%2E%2E/escape.bin", 400),
        ("/up/../escape.bin", 400),
        ("/up/./x.bin", 400),
        ("/up//x.bin", 400),
        ("/up/a%2Fb.bin", 400),
        ("/up/a%5Cb.bin", 400),
        ("/up/c:evil", 400),
        ("/up/a%00b", 400),
        ("/up/", 400),
        ("/up/BITS-Sessions/x.bin", 403),
        ("/up/bits-sessions/Replies/x", 403),
        ("/up/link/escape.bin", 403),
        ("/up/sub", 400),  # a directory
    ],
)
def test_unsafe_paths_are_refused(tmp_path: Path, www: Path, path: str, status: int) -> None:
    (www / "sub").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (www / "link").symlink_to(outside)

    async def body() -> None:
        async with server(make_config(tmp_path, www)) as (base, _http):
            answer = await raw(  # a raw request: aiohttp's client would normalise the path
                port_of(base),
                b"BITS_POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                b"BITS-Packet-Type: Create-Session\r\nBITS-Supported-Protocols: "
                + GUID.encode()
                + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )
        assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer
        code = b"0x80070057" if status == 400 else b"0x80070005"
        assert b"\r\nBITS-Error-Code: " + code + b"\r\n" in answer
        assert b"\r\nBITS-Error-Context: 0x5\r\n" in answer

    run(body)
    assert list(outside.iterdir()) == []


def test_overwrite_policy(tmp_path: Path, www: Path) -> None:
    (www / "taken.bin").write_bytes(b"old")

    async def body() -> None:
        async with server(make_config(tmp_path, www)) as (base, http):
            reply = await post(http, f"{base}/up/taken.bin", "Create-Session")
            assert reply.error() == (403, "0x80070005", "0x5")
            # The destination appears while the upload runs: the commit is refused, the old
            # file stays, and a retry of the final fragment succeeds once it is gone.
            url = f"{base}/up/late.bin"
            sid = await create(http, url)
            (www / "late.bin").write_bytes(b"someone else")
            reply = await post(http, url, "Fragment", session=sid, data=b"new", total=3)
            assert reply.error() == (403, "0x80070005", "0x5")
            assert (www / "late.bin").read_bytes() == b"someone else"
            (www / "late.bin").unlink()
            reply = await post(http, url, "Fragment", session=sid, data=b"new", total=3)
            assert reply.status == 200
            assert (www / "late.bin").read_bytes() == b"new"
        async with server(make_config(tmp_path, www, allow_overwrite=True)) as (base, http):
            url = f"{base}/up/taken.bin"
            sid = await create(http, url)
            reply = await post(http, url, "Fragment", session=sid, data=b"newer", total=5)
            assert reply.status == 200

    run(body)
    assert (www / "taken.bin").read_bytes() == b"newer"


def test_close_before_the_last_byte_discards_and_cancel_deletes(tmp_path: Path, www: Path) -> None:
    async def body() -> None:
        config = make_config(tmp_path, www)
        async with server(config) as (base, http):
            for packet in ("Close-Session", "Cancel-Session"):
                url = f"{base}/up/{packet}.bin"
                sid = await create(http, url)
                await post(http, url, "Fragment", session=sid, data=b"abc", total=10)
                data_file = config.session_dir / sid.strip("{}") / "request.bin"
                assert data_file.read_bytes() == b"abc"
                reply = await post(http, url, packet, session=sid)
                assert (reply.status, reply.header("BITS-Session-Id")) == (200, sid)
                assert not data_file.exists()
                assert not (www / f"{packet}.bin").exists()

    run(body)


def test_state_survives_a_server_restart(tmp_path: Path, www: Path) -> None:
    async def body() -> None:
        config = make_config(tmp_path, www)
        async with server(config) as (base, http):
            url = f"{base}/up/r.bin"
            sid = await create(http, url)
            await post(http, url, "Fragment", session=sid, data=b"hello ", total=11)
        async with server(config) as (base, http):
            url = f"{base}/up/r.bin"
            reply = await post(http, url, "Ping", session=sid)  # the backhaul extension
            assert reply.header("BITS-Received-Content-Range") == "6"
            reply = await post(http, url, "Fragment", session=sid, data=b"world", total=11, first=6)
            assert reply.header("BITS-Received-Content-Range") == "11"

    run(body)
    assert (www / "r.bin").read_bytes() == b"hello world"


def test_session_timeout_cleanup(tmp_path: Path, www: Path) -> None:
    clock = Clock()

    async def body() -> None:
        config = make_config(tmp_path, www, session_timeout=100, clock=clock)
        app = make_upload_app(config)
        async with serve_app(app) as base, aiohttp.ClientSession() as http:
            url = f"{base}/up/t.bin"
            stale = await create(http, url)
            clock.now += 60
            fresh = await create(http, url)
            (config.session_dir / "not-a-session").mkdir()  # foreign entries are left alone
            clock.now += 50  # stale: 110 s old, fresh: 50 s
            # Expired sessions are ignored before the cleanup runs...
            reply = await post(http, url, "Fragment", session=stale, data=b"abc", total=3)
            assert reply.error() == (500, "0x8020001F", "0x5")
            # ...and removed when it does.
            assert await app[UPLOAD_SERVER].sweep() == 1
            left = sorted(p.name for p in config.session_dir.iterdir())
            assert left == sorted([fresh.strip("{}"), "not-a-session"])
            # Activity keeps a session alive.
            clock.now += 40  # fresh: 90 s
            reply = await post(http, url, "Fragment", session=fresh, data=b"a", total=3)
            assert reply.status == 200
            clock.now += 60  # 60 s since the fragment
            assert await app[UPLOAD_SERVER].sweep() == 0
            clock.now += 41
            assert await app[UPLOAD_SERVER].sweep() == 1

    run(body)


def test_the_cleanup_task_runs_periodically(tmp_path: Path, www: Path) -> None:
    clock = Clock()

    async def body() -> None:
        config = make_config(tmp_path, www, session_timeout=10, clock=clock, cleanup_interval=0.02)
        async with server(config) as (base, http):
            sid = await create(http, f"{base}/up/t.bin")
            folder = config.session_dir / sid.strip("{}")
            assert folder.exists()
            clock.now += 11
            for _ in range(100):
                if not folder.exists():
                    break
                await asyncio.sleep(0.02)
            assert not folder.exists()

    run(body)


# -- notification and replies -----------------------------------------------------------------


class Backend:
    """A server application whose answer each test sets."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, str], bytes]] = []
        self.status = 200
        self.body = b"the reply"
        self.headers: dict[str, str] = {}
        self.delay = 0.0

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append((str(request.rel_url), dict(request.headers), await request.read()))
        await asyncio.sleep(self.delay)
        return web.Response(status=self.status, body=self.body, headers=self.headers)


@contextlib.asynccontextmanager
async def backend() -> AsyncIterator[tuple[Backend, str]]:
    app_backend = Backend()
    app = web.Application()
    app.router.add_post("/app/notify", app_backend.handle)
    async with serve_app(app) as url:
        yield app_backend, url


def test_notification_by_value_and_reply_get_head_range(tmp_path: Path, www: Path) -> None:
    async def body() -> None:
        async with backend() as (app, app_base):
            config = make_config(
                tmp_path,
                www,
                notification=NotificationType.BY_VALUE,
                notification_url=f"{app_base}/app/notify?kind=x",
            )
            async with server(config) as (base, http):
                url = f"{base}/up/q.xml?tx=7"
                sid = await create(http, url)
                app.body = bytes(range(256)) * 4
                reply = await post(http, url, "Fragment", session=sid, data=b"payload", total=7)
                assert reply.status == 200
                reply_url = reply.header("BITS-Reply-URL")
                guid = sid.strip("{}")
                assert reply_url == f"{base}/up/BITS-Sessions/Replies/{guid}/responsefile.bin"
                target, headers, uploaded = app.seen[0]
                assert target == "/app/notify?kind=x&tx=7"  # the job's query string appended
                assert headers["BITS-Original-Request-URL"] == url
                assert uploaded == b"payload"
                async with http.head(reply_url) as resp:
                    assert (resp.status, resp.headers["Content-Length"]) == (200, "1024")
                    assert resp.headers["Content-Type"] == "application/octet-stream"
                async with http.get(reply_url, headers={"Range": "bytes=1000-"}) as resp:
                    assert resp.status == 206
                    assert resp.headers["Content-Range"] == "bytes 1000-1023/1024"
                    assert await resp.read() == app.body[1000:]
                # A repeated final fragment gets the same reply URL, without a second POST.
                reply = await post(http, url, "Fragment", session=sid, data=b"payload", total=7)
                assert reply.header("BITS-Reply-URL") == reply_url
                assert len(app.seen) == 1
                await post(http, url, "Close-Session", session=sid)
                async with http.get(reply_url) as resp:
                    assert resp.status == 404
        assert not (www / "q.xml").exists()

    run(body)


def test_notification_by_reference_static_url_and_copy(tmp_path: Path, www: Path) -> None:
    async def body() -> None:
        async with backend() as (app, app_base):
            config = make_config(
                tmp_path,
                www,
                notification=NotificationType.BY_REFERENCE,
                notification_url=f"{app_base}/app/notify",
            )
            app.body = b""
            app.headers = {
                "BITS-Static-Response-URL": "http://static.example/r/1",
                "BITS-Copy-File-To-Destination": "1",
            }
            async with server(config) as (base, http):
                url = f"{base}/up/ref.bin"
                sid = await create(http, url)
                reply = await post(http, url, "Fragment", session=sid, data=b"by ref", total=6)
                assert reply.header("BITS-Reply-URL") == "http://static.example/r/1"
                _, headers, uploaded = app.seen[0]
                assert uploaded == b""
                assert headers["Content-Length"] == "0"
                request_file = Path(headers["BITS-Request-DataFile-Name"])
                assert request_file.is_relative_to(config.session_dir.resolve())
                assert Path(headers["BITS-Response-DataFile-Name"]).parent == request_file.parent
        assert (www / "ref.bin").read_bytes() == b"by ref"

    run(body)


@pytest.mark.parametrize(
    ("status", "delay", "expected"),
    [
        (500, 0.0, (500, "0x801901F4", "0x7")),
        (403, 0.0, (403, "0x80190193", "0x7")),
        (200, 0.6, (408, "0x80070112", "0x7")),  # the application does not answer in time
    ],
)
def test_a_failing_backend_is_reported_with_context_7_and_retried(
    tmp_path: Path, www: Path, status: int, delay: float, expected: tuple[int, str, str]
) -> None:
    async def body() -> None:
        config = make_config(
            tmp_path,
            www,
            notification=NotificationType.BY_VALUE,
            notification_url="../app/notify",  # relative: resolved against the upload URL
            notification_timeout=0.2,
        )
        app = Backend()
        upload_app = make_upload_app(config)
        upload_app.router.add_post("/app/notify", app.handle)  # the application, same host
        async with serve_app(upload_app) as base, aiohttp.ClientSession() as http:
            url = f"{base}/up/x.bin"
            sid = await create(http, url)
            app.status, app.delay = status, delay
            reply = await post(http, url, "Fragment", session=sid, data=b"abc", total=3)
            assert reply.error() == expected
            assert app.seen[0][0] == "/app/notify"
            app.status, app.delay = 200, 0.0
            reply = await post(http, url, "Fragment", session=sid, data=b"abc", total=3)
            assert reply.status == 200
            assert reply.header("BITS-Reply-URL")
            assert len(app.seen) == 2

    run(body)


def test_a_ping_does_not_claim_an_upload_whose_final_fragment_was_refused(
    tmp_path: Path, www: Path
) -> None:
    """The back-end failed on the final fragment: the server holds every byte, but the
    client never got the final Ack. A Ping naming the session (the backhaul extension) then
    tells no offset, as any BITS server: the client must send the final fragment again,
    which notifies the back-end again (bits-upload.md §4.1). Before and after, it tells."""

    async def body() -> None:
        async with backend() as (app, app_base):
            config = make_config(
                tmp_path,
                www,
                notification=NotificationType.BY_VALUE,
                notification_url=f"{app_base}/app/notify",
            )
            async with server(config) as (base, http):
                url = f"{base}/up/q.bin"
                sid = await create(http, url)
                await post(http, url, "Fragment", session=sid, data=b"ab", total=4)
                reply = await post(http, url, "Ping", session=sid)
                assert reply.header("BITS-Received-Content-Range") == "2"
                app.status = 503
                reply = await post(http, url, "Fragment", session=sid, data=b"cd", total=4, first=2)
                assert reply.error() == (503, "0x801901F7", "0x7")
                reply = await post(http, url, "Ping", session=sid)
                assert reply.status == 200
                assert reply.header("BITS-Received-Content-Range") is None
                assert reply.header("BITS-Reply-URL") is None
                app.status = 200
                reply = await post(http, url, "Fragment", session=sid, data=b"cd", total=4, first=2)
                reply_url = reply.header("BITS-Reply-URL")
                assert reply.status == 200 and reply_url
                assert len(app.seen) == 2
                reply = await post(http, url, "Ping", session=sid)
                assert reply.header("BITS-Received-Content-Range") == "4"
                assert reply.header("BITS-Reply-URL") == reply_url

    run(body)


def test_an_unreachable_backend_is_502_with_context_7(tmp_path: Path, www: Path) -> None:
    async def body() -> None:
        config = make_config(
            tmp_path,
            www,
            notification=NotificationType.BY_VALUE,
            notification_url="http://127.0.0.1:9/nothing",
        )
        async with server(config) as (base, http):
            url = f"{base}/up/x.bin"
            sid = await create(http, url)
            reply = await post(http, url, "Fragment", session=sid, data=b"abc", total=3)
            assert reply.error() == (502, "0x801901F6", "0x7")

    run(body)


def test_config_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        VirtualDirectory("/a", tmp_path, notification=NotificationType.BY_VALUE)
    with pytest.raises(ValueError):
        VirtualDirectory("/a/../b", tmp_path)
    with pytest.raises(ValueError):
        UploadServerConfig(session_dir=tmp_path, vdirs=[VirtualDirectory("/a", tmp_path)] * 2)
    assert VirtualDirectory("a/b/", tmp_path).prefix == "/a/b"
