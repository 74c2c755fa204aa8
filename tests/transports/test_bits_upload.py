"""BitsUploader against backhaul's own BITS upload server (adapters/upload_server.py, started
in-process on 127.0.0.1:0), against a fault proxy that cuts a fragment in half, and against a
tiny fake IIS that sends what real servers send (no session id on later Acks, relative reply
URLs with backslashes, the error code under either header name)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from aiohttp import web

from backhaul.adapters.upload_server import (
    NotificationType,
    UploadServerConfig,
    VirtualDirectory,
    serve_app,
    serve_uploads,
)
from backhaul.core import hresult as hr
from backhaul.core.error import TransferError
from backhaul.core.port import PlainCredentials, RequestOptions
from backhaul.core.vocabulary import AuthScheme, AuthTarget, ErrorContext
from backhaul.transports.bits_upload import (
    UPLOAD_PROTOCOL,
    BitsUploader,
    BitsUploadSession,
    format_token,
    parse_token,
    resolve_reply_url,
)

NO_OPTIONS = RequestOptions()
KIB = 1024
MIB = 1024 * KIB
T = TypeVar("T")


def run(body: Callable[[], Awaitable[T]], timeout: float = 15.0) -> T:
    async def main() -> T:
        return await asyncio.wait_for(body(), timeout)

    return asyncio.run(main())


def payload(size: int, seed: int = 1) -> bytes:
    """Deterministic, non-repeating bytes (so a misplaced fragment shows)."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


async def drive(
    session: BitsUploadSession, data: bytes, *, start: int | None = None, chunk: int = 3 * MIB
) -> None:
    """What the engine does: send from the acknowledged offset until the server has it all."""
    offset = session.offset if start is None else start
    while offset < len(data):
        offset = await session.send(data[offset : offset + chunk], offset)


def session_state(config: UploadServerConfig, session_id: str) -> dict[str, Any]:
    path = config.session_dir / session_id.strip("{}") / "session.json"
    state: dict[str, Any] = json.loads(path.read_text())
    return state


@pytest.fixture
def config(tmp_path: Path) -> UploadServerConfig:
    (tmp_path / "www").mkdir()
    return UploadServerConfig(
        session_dir=tmp_path / "sessions",
        vdirs=[VirtualDirectory("/up", tmp_path / "www")],
        fsync=False,
    )


def with_vdir(config: UploadServerConfig, **changes: Any) -> UploadServerConfig:
    vdir = config.vdirs[0]
    fields = {
        "prefix": vdir.prefix,
        "directory": vdir.directory,
        "allow_overwrite": vdir.allow_overwrite,
        **changes,
    }
    return UploadServerConfig(
        session_dir=config.session_dir,
        vdirs=[VirtualDirectory(**fields)],
        fsync=False,
        max_fragment_size=config.max_fragment_size,
    )


# -- the happy path ---------------------------------------------------------------------------


def test_upload_of_a_few_mib_is_byte_identical(config: UploadServerConfig) -> None:
    data = payload(3 * MIB + 12345)

    async def body() -> None:
        async with serve_uploads(config) as base:
            uploader = BitsUploader(fragment_size=512 * KIB)
            try:
                session = await uploader.begin(f"{base}/up/big.bin", NO_OPTIONS, size=len(data))
                assert session.offset == 0
                assert session.offset_known
                assert session.token == session.session_id
                await drive(session, data, chunk=MIB + 7)  # chunks that straddle fragments
                assert session.offset == len(data)
                assert await session.finish() is None
                state = session_state(config, session.session_id)
                assert state["state"] == "closed"
                assert not (
                    config.session_dir / session.session_id.strip("{}") / "request.bin"
                ).exists()
            finally:
                await uploader.close()

    run(body)
    assert (config.vdirs[0].directory / "big.bin").read_bytes() == data


def test_zero_byte_upload_is_create_then_close(config: UploadServerConfig) -> None:
    async def body() -> None:
        async with serve_uploads(config) as base:
            uploader = BitsUploader()
            session = await uploader.begin(f"{base}/up/empty.bin", NO_OPTIONS, size=0)
            assert await session.finish() is None
            await uploader.close()

    run(body)
    assert (config.vdirs[0].directory / "empty.bin").read_bytes() == b""


# -- resume -----------------------------------------------------------------------------------


class CuttingProxy:
    """A TCP proxy that forwards to ``upstream`` but, once armed, drops the connection after
    ``budget`` more client bytes: a fragment cut in the middle."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.budget: int | None = None
        self.cuts = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def upstream() -> None:
            while data := await reader.read(64 * KIB):
                if self.budget is not None:
                    if len(data) >= self.budget:
                        up_writer.write(data[: self.budget])
                        await up_writer.drain()
                        self.budget, self.cuts = None, self.cuts + 1
                        up_writer.transport.abort()
                        writer.transport.abort()
                        return
                    self.budget -= len(data)
                up_writer.write(data)
                await up_writer.drain()
            up_writer.close()

        async def downstream() -> None:
            while data := await up_reader.read(64 * KIB):
                writer.write(data)
                await writer.drain()
            writer.close()

        with contextlib.suppress(ConnectionError, OSError):
            await asyncio.gather(upstream(), downstream())

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[str]:
        server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.close()


def test_resume_after_a_fragment_cut_in_the_middle(config: UploadServerConfig) -> None:
    data = payload(2 * MIB + 999)

    async def body() -> None:
        async with serve_uploads(config) as direct:
            proxy = CuttingProxy(int(direct.rsplit(":", 1)[1]))
            async with proxy.serving() as base:
                url = f"{base}/up/cut.bin"
                uploader = BitsUploader(fragment_size=MIB)
                session = await uploader.begin(url, NO_OPTIONS, size=len(data))
                assert await session.send(data[:MIB], 0) == MIB
                proxy.budget = 300 * KIB  # headers + about 300 KiB of the next fragment
                with pytest.raises(TransferError) as caught:
                    await session.send(data[MIB:], MIB)
                assert caught.value.hresult == hr.BG_E_CONNECTION_CLOSED
                assert caught.value.transient
                assert proxy.cuts == 1
                # The engine comes back later with the recorded token.
                again = await uploader.begin(url, NO_OPTIONS, size=len(data), token=session.token)
                kept = session_state(config, session.session_id)["received"]
                assert MIB < kept < MIB + 300 * KIB  # the bytes that arrived were kept
                assert again.offset_known
                assert again.offset == kept
                await drive(again, data)
                assert await again.finish() is None
                await uploader.close()

    run(body)
    assert (config.vdirs[0].directory / "cut.bin").read_bytes() == data


def test_resume_after_a_client_crash_continues_at_the_server_offset(
    config: UploadServerConfig,
) -> None:
    data = payload(3 * MIB)

    async def body() -> None:
        async with serve_uploads(config) as base:
            url = f"{base}/up/crash.bin"
            first = BitsUploader(fragment_size=MIB)
            session = await first.begin(url, NO_OPTIONS, size=len(data))
            await session.send(data[: 2 * MIB], 0)
            token = session.token
            await first.close()  # the process dies; only the token was recorded
            second = BitsUploader(fragment_size=MIB)
            again = await second.begin(url, NO_OPTIONS, size=len(data), token=token)
            assert (again.offset, again.offset_known) == (2 * MIB, True)
            assert await again.send(data[2 * MIB :], 2 * MIB) == len(data)
            await again.finish()
            await second.close()

    run(body)
    assert (config.vdirs[0].directory / "crash.bin").read_bytes() == data


def test_resume_from_an_older_checkpoint_is_acknowledged_idempotently(
    config: UploadServerConfig,
) -> None:
    data = payload(2 * MIB)

    async def body() -> None:
        async with serve_uploads(config) as base:
            url = f"{base}/up/dup.bin"
            uploader = BitsUploader(fragment_size=256 * KIB)
            session = await uploader.begin(url, NO_OPTIONS, size=len(data))
            await session.send(data[:MIB], 0)
            # The engine's last checkpoint was 0: resending is harmless.
            assert await session.send(data[: 512 * KIB], 0) == MIB
            await drive(session, data)
            await session.finish()
            await uploader.close()

    run(body)
    assert (config.vdirs[0].directory / "dup.bin").read_bytes() == data


def test_session_not_found_is_transient_and_names_the_code(config: UploadServerConfig) -> None:
    async def body() -> None:
        async with serve_uploads(config) as base:
            uploader = BitsUploader()
            token = "{00000000-1111-2222-3333-444444444444}"
            session = await uploader.begin(f"{base}/up/x.bin", NO_OPTIONS, size=10, token=token)
            assert not session.offset_known  # the server did not recognise it
            with pytest.raises(TransferError) as caught:
                await session.send(b"0123456789", 0)
            await uploader.close()
        assert caught.value.hresult == hr.BG_E_SESSION_NOT_FOUND
        assert caught.value.transient
        assert caught.value.context == ErrorContext.REMOTE_FILE

    run(body)


def test_413_halves_the_fragment_size_until_it_fits(config: UploadServerConfig) -> None:
    small = UploadServerConfig(
        session_dir=config.session_dir,
        vdirs=config.vdirs,
        fsync=False,
        max_fragment_size=100 * KIB,
    )
    data = payload(MIB + 5)

    async def body() -> None:
        async with serve_uploads(small) as base:
            uploader = BitsUploader(fragment_size=MIB, min_fragment_size=64 * KIB)
            session = await uploader.begin(f"{base}/up/small.bin", NO_OPTIONS, size=len(data))
            await drive(session, data)
            assert session.fragment_size == 64 * KIB  # 1 MiB -> 512 -> 256 -> 128 -> 64 KiB
            await session.finish()
            # At the floor, a 413 is an error.
            floor = BitsUploader(fragment_size=128 * KIB, min_fragment_size=128 * KIB)
            other = await floor.begin(f"{base}/up/other.bin", NO_OPTIONS, size=len(data))
            with pytest.raises(TransferError) as caught:
                await other.send(data, 0)
            assert caught.value.hresult == hr.http_status_hresult(413)
            assert not caught.value.transient
            await uploader.close()
            await floor.close()

    run(body)
    assert (config.vdirs[0].directory / "small.bin").read_bytes() == data


# -- upload-reply -----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def backend(mode: str) -> AsyncIterator[tuple[str, list[dict[str, str]]]]:
    """A server application: by value it answers sha256(body); by reference it writes
    sha256(file) into the response file."""
    seen: list[dict[str, str]] = []

    async def notify(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        if mode == "value":
            digest = hashlib.sha256(await request.read()).hexdigest()
            return web.Response(body=f"reply:{digest}".encode())
        upload = await asyncio.to_thread(
            Path(request.headers["BITS-Request-DataFile-Name"]).read_bytes
        )
        reply = f"reply:{hashlib.sha256(upload).hexdigest()}".encode()
        await asyncio.to_thread(
            Path(request.headers["BITS-Response-DataFile-Name"]).write_bytes, reply
        )
        return web.Response()

    app = web.Application(client_max_size=64 * MIB)
    app.router.add_post("/notify", notify)
    async with serve_app(app) as url:
        yield f"{url}/notify", seen


@pytest.mark.parametrize("mode", ["value", "reference"])
def test_upload_reply_gives_a_reply_url_serving_the_backends_reply(
    config: UploadServerConfig, mode: str
) -> None:
    data = payload(MIB + 3)
    expected = f"reply:{hashlib.sha256(data).hexdigest()}".encode()

    async def body() -> None:
        async with backend(mode) as (notify_url, seen):
            kind = NotificationType.BY_VALUE if mode == "value" else NotificationType.BY_REFERENCE
            reply_config = with_vdir(config, notification=kind, notification_url=notify_url)
            async with serve_uploads(reply_config) as base:
                uploader = BitsUploader(fragment_size=256 * KIB)
                url = f"{base}/up/query.bin?tx=42"
                session = await uploader.begin(url, NO_OPTIONS, size=len(data), reply=True)
                await drive(session, data)
                reply_url = await session.finish()
                assert reply_url is not None
                assert reply_url == session.reply_url
                # A crash before the reply was fetched: re-opening gives the reply URL again.
                other = BitsUploader()
                again = await other.begin(
                    url, NO_OPTIONS, size=len(data), reply=True, token=session.token
                )
                assert (again.offset, again.reply_url) == (len(data), reply_url)
                assert await again.finish() == reply_url
                await other.close()
                assert reply_url.startswith(f"{base}/up/BITS-Sessions/Replies/")
                async with aiohttp.ClientSession() as http:
                    async with http.get(reply_url) as resp:
                        assert resp.status == 200
                        assert await resp.read() == expected
                    await session.close()  # only now: Close-Session deletes the reply
                    async with http.get(reply_url) as resp:
                        assert resp.status == 404
                await uploader.close()
            assert len(seen) == 1
            assert seen[0]["BITS-Original-Request-URL"] == url

    run(body)
    # A notified upload is not copied to its destination unless the application asks.
    assert not (config.vdirs[0].directory / "query.bin").exists()


# -- a fake IIS: what real servers send -------------------------------------------------------


class FakeIIS:
    """A minimal in-memory BITS server with switchable quirks. Records every request."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], int]] = []
        self.received = 0
        self.total = 0
        self.session_id = "{A0FF5911-4144-45B3-BF27-27AFC8EC8A67}"
        self.reply_url: str | None = None
        self.host_id: str | None = None
        self.error: tuple[int, dict[str, str]] | None = None  # status, headers for every packet
        self.fail: dict[str, list[tuple[int, dict[str, str]]]] = {}  # packet -> queued failures
        self.ack = "Ack"
        self.protocol = UPLOAD_PROTOCOL.upper()
        self.ping_tells = False  # a Ping naming the session gets its offset (backhaul's)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        packet = request.headers.get("BITS-Packet-Type", "")
        self.requests.append((packet, dict(request.headers), len(body)))
        queued = self.fail.get(packet)
        if queued:
            status, headers = queued.pop(0)
            return web.Response(status=status, headers=headers)
        if self.error is not None and packet not in ("Ping",):
            status, headers = self.error
            return web.Response(status=status, headers=headers)
        ack = {"BITS-Packet-Type": self.ack}
        named = request.headers.get("BITS-Session-Id") == self.session_id
        if packet == "Ping" and self.ping_tells and named:
            ack |= {
                "BITS-Session-Id": self.session_id,
                "BITS-Received-Content-Range": str(self.received),
            }
        if packet == "Create-Session":
            ack |= {"BITS-Protocol": self.protocol, "BITS-Session-Id": self.session_id}
            if self.host_id:
                ack |= {"BITS-Host-Id": self.host_id, "BITS-Host-Id-Fallback-Timeout": "110"}
            return web.Response(status=201, headers=ack)
        if packet == "Fragment":
            first, last, total = _content_range(request.headers["Content-Range"])
            self.total = total
            if first > self.received:
                return web.Response(
                    status=416, headers=ack | {"BITS-Received-Content-Range": str(self.received)}
                )
            self.received = max(self.received, last + 1)
            ack["BITS-Received-Content-Range"] = str(self.received)  # IIS 6: no session id
            if self.received == total and self.reply_url is not None:
                ack["BITS-Reply-URL"] = self.reply_url
        return web.Response(headers=ack)


def _content_range(value: str) -> tuple[int, int, int]:
    span, total = value.split(" ", 1)[1].split("/")
    first, last = span.split("-")
    return int(first), int(last), int(total)


@contextlib.asynccontextmanager
async def fake_iis() -> AsyncIterator[tuple[FakeIIS, str]]:
    fake = FakeIIS()
    app = web.Application(client_max_size=64 * MIB)
    app.router.add_route("BITS_POST", "/{tail:.*}", fake.handle)
    async with serve_app(app) as url:
        yield fake, url


def test_what_the_client_sends(tmp_path: Path) -> None:
    options = RequestOptions(
        custom_headers=(("X-Tenant", "blue"), ("BITS-Packet-Type", "spoofed")),
        credentials=(PlainCredentials(AuthTarget.SERVER, AuthScheme.BASIC, "u", "p"),),
    )

    async def body() -> None:
        async with fake_iis() as (fake, base):
            uploader = BitsUploader(fragment_size=64 * KIB)
            data = payload(100 * KIB)
            session = await uploader.begin(f"{base}/vdir/report%20x.bin", options, size=len(data))
            await drive(session, data)
            await session.finish()
            await uploader.close()
        packets = [p for p, _, _ in fake.requests]
        assert packets == ["Ping", "Create-Session", "Fragment", "Fragment", "Close-Session"]
        create = fake.requests[1][1]
        assert create["BITS-Supported-Protocols"] == UPLOAD_PROTOCOL
        assert "BITS-Session-Id" not in create
        first, second = fake.requests[2][1], fake.requests[3][1]
        assert first["Content-Range"] == f"bytes 0-{64 * KIB - 1}/{100 * KIB}"
        assert second["Content-Range"] == f"bytes {64 * KIB}-{100 * KIB - 1}/{100 * KIB}"
        assert first["Content-Name"] == "report%20x.bin"
        assert "Content-Name" not in second
        assert (fake.requests[2][2], fake.requests[3][2]) == (64 * KIB, 36 * KIB)
        for packet, headers, size in fake.requests:
            assert headers["X-Tenant"] == "blue"
            assert headers["BITS-Packet-Type"] == packet
            assert headers["Authorization"] == "Basic dTpw"
            assert headers["Content-Length"] == str(size)
            if packet in ("Fragment", "Close-Session"):
                assert headers["BITS-Session-Id"] == fake.session_id

    run(body)


def test_reopen_without_the_ping_extension_learns_the_offset_from_the_first_ack() -> None:
    data = payload(MIB)

    async def body() -> None:
        async with fake_iis() as (fake, base):
            uploader = BitsUploader(fragment_size=256 * KIB)
            session = await uploader.begin(f"{base}/v/f.bin", NO_OPTIONS, size=len(data))
            await session.send(data[: 768 * KIB], 0)
            again = await uploader.begin(
                f"{base}/v/f.bin", NO_OPTIONS, size=len(data), token=session.token
            )
            assert (again.offset, again.offset_known) == (0, False)
            with pytest.raises(TransferError) as caught:
                await again.finish()
            assert caught.value.hresult == hr.BG_E_INVALID_STATE
            sizes_before = len(fake.requests)
            # The engine sends from its own (older) checkpoint; a small first fragment.
            assert await again.send(data[: 256 * KIB], 0) == 768 * KIB
            assert fake.requests[sizes_before][2] == 64 * KIB
            await drive(again, data)
            await again.finish()
            await uploader.close()

    run(body)


def test_a_reopened_reply_held_whole_without_a_reply_url_sends_its_last_bytes_again() -> None:
    """A Ping that tells "every byte" but no reply URL (the server's application failed on
    the final fragment, whose Ack was that error; e.g. an older backhaul server): the offset
    counts as unknown, so the caller sends the final fragment again, whose Ack brings the
    reply URL (bits-upload.md §4.1). Taking the offset would leave nothing to send and a
    ``finish()`` without a reply URL, for ever."""
    data = payload(100 * KIB)

    async def body() -> None:
        async with fake_iis() as (fake, base):
            fake.ping_tells = True
            uploader = BitsUploader()
            url = f"{base}/v/q.xml"
            session = await uploader.begin(url, NO_OPTIONS, size=len(data), reply=True)
            fake.received = len(data)  # it has every byte; its application failed on them
            again = await uploader.begin(
                url, NO_OPTIONS, size=len(data), token=session.token, reply=True
            )
            assert (again.offset, again.offset_known, again.reply_url) == (0, False, None)
            fake.reply_url = "/replies/1"
            tail = len(data) - 64 * KIB
            assert await again.send(data[tail:], tail) == len(data)
            assert await again.finish() == f"{base}/replies/1"
            assert [p for p, _, _ in fake.requests][-2:] == ["Ping", "Fragment"]
            await uploader.close()

    run(body)


def test_relative_reply_url_with_backslashes_is_resolved() -> None:
    async def body() -> None:
        async with fake_iis() as (fake, base):
            fake.reply_url = r"BITS-Sessions\Replies\{A0FF5911-4144}\responsefile.bin"
            uploader = BitsUploader()
            session = await uploader.begin(f"{base}/vdir/q.xml", NO_OPTIONS, size=10, reply=True)
            await session.send(b"0123456789", 0)
            url = await session.finish()
            assert url == f"{base}/vdir/BITS-Sessions/Replies/%7BA0FF5911-4144%7D/responsefile.bin"
            assert [p for p, _, _ in fake.requests][-1] == "Fragment"  # no Close-Session yet
            await session.close()
            assert [p for p, _, _ in fake.requests][-1] == "Close-Session"
            await uploader.close()

    run(body)


def test_resolve_reply_url() -> None:
    base = "http://node7.farm.example/upload-ref/query.xml"
    assert resolve_reply_url(base, "http://other/abs/r.bin") == "http://other/abs/r.bin"
    assert resolve_reply_url(base, "/root/r.bin") == "http://node7.farm.example/root/r.bin"
    assert resolve_reply_url(base, r" a\b.bin ") == "http://node7.farm.example/upload-ref/a/b.bin"


def test_an_upload_reply_final_ack_without_a_reply_url_is_an_error() -> None:
    async def body() -> None:
        async with fake_iis() as (_fake, base):
            uploader = BitsUploader()
            session = await uploader.begin(f"{base}/v/q", NO_OPTIONS, size=4, reply=True)
            with pytest.raises(TransferError) as caught:
                await session.send(b"abcd", 0)
            assert caught.value.hresult == hr.BG_E_INVALID_SERVER_RESPONSE
            await uploader.close()

    run(body)


@pytest.mark.parametrize(
    ("header", "value", "context", "expected_context"),
    [
        ("BITS-Error-Code", "0x80200020", "0x5", ErrorContext.REMOTE_FILE),
        ("BITS-Error", "80200020", "0x5", ErrorContext.REMOTE_FILE),
        ("bits-error-code", "0X80200020", "7", ErrorContext.REMOTE_APPLICATION),
        ("BITS-Error", "0x80200020", "0x00000007", ErrorContext.REMOTE_APPLICATION),
    ],
)
def test_the_error_code_is_read_under_both_header_names(
    header: str, value: str, context: str, expected_context: ErrorContext
) -> None:
    async def body() -> None:
        async with fake_iis() as (fake, base):
            uploader = BitsUploader()
            session = await uploader.begin(f"{base}/v/f", NO_OPTIONS, size=4)
            fake.error = (
                500,
                {"BITS-Packet-Type": "Ack", header: value, "BITS-Error-Context": context},
            )
            with pytest.raises(TransferError) as caught:
                await session.send(b"abcd", 0)
            await uploader.close()
        assert caught.value.hresult == hr.BG_E_TOO_LARGE
        assert not caught.value.transient  # failure.is_transient
        assert caught.value.context == expected_context

    run(body)


@pytest.mark.parametrize(
    ("status", "headers", "code", "transient"),
    [
        (403, {}, hr.http_status_hresult(403), False),
        (503, {}, hr.http_status_hresult(503), True),
        (409, {"BITS-Error-Context": "0x7"}, hr.http_status_hresult(409), True),
        (500, {"BITS-Error-Code": "0x0"}, hr.http_status_hresult(500), True),
        (500, {"BITS-Error-Code": "garbage"}, hr.http_status_hresult(500), True),
    ],
)
def test_statuses_without_a_usable_code(
    status: int, headers: dict[str, str], code: int, transient: bool
) -> None:
    async def body() -> None:
        async with fake_iis() as (fake, base):
            fake.error = (status, headers)
            uploader = BitsUploader()
            with pytest.raises(TransferError) as caught:
                await uploader.begin(f"{base}/v/f", NO_OPTIONS, size=4)
            await uploader.close()
        assert caught.value.hresult == code
        assert caught.value.transient is transient

    run(body)


def test_not_a_bits_server_and_protocol_mismatch() -> None:
    async def body() -> None:
        async with fake_iis() as (fake, base):
            uploader = BitsUploader(ping=False)
            fake.ack = "Whatever"
            with pytest.raises(TransferError) as caught:
                await uploader.begin(f"{base}/v/f", NO_OPTIONS, size=4)
            assert caught.value.hresult == hr.BG_E_INVALID_SERVER_RESPONSE
            fake.ack = "ACK"  # any case
            fake.protocol = "{00000000-0000-0000-0000-000000000000}"
            with pytest.raises(TransferError) as caught:
                await uploader.begin(f"{base}/v/f", NO_OPTIONS, size=4)
            assert caught.value.hresult == hr.BG_E_CLIENT_SERVER_PROTOCOL_MISMATCH
            assert not caught.value.transient
            fake.protocol = "7DF0354D-249B-430F-820D-3D2A9BEF4931"  # no braces, upper case
            session = await uploader.begin(f"{base}/v/f", NO_OPTIONS, size=4)
            assert await session.send(b"abcd", 0) == 4
            await uploader.close()

    run(body)


def test_host_id_pins_later_packets_to_the_node() -> None:
    async def body() -> None:
        async with fake_iis() as (fake, base):
            fake.host_id = "localhost"
            uploader = BitsUploader()
            session = await uploader.begin(f"{base}/v/f", NO_OPTIONS, size=4)
            assert session.token == f"{fake.session_id} host=localhost fallback=110"
            assert parse_token(session.token) == (fake.session_id, "localhost", 110)
            await session.send(b"abcd", 0)
            await session.finish()
            await uploader.close()
        hosts = [(p, h["Host"].split(":")[0]) for p, h, _ in fake.requests]
        assert hosts == [
            ("Ping", "127.0.0.1"),
            ("Create-Session", "127.0.0.1"),
            ("Ping", "localhost"),  # Windows checks the node first
            ("Fragment", "localhost"),
            ("Close-Session", "localhost"),
        ]

    run(body)
    assert parse_token(format_token("{X}")) == ("{X}", None, None)


def test_abort_resends_cancel_on_5xx_and_network_errors_only() -> None:
    async def body() -> None:
        async with fake_iis() as (fake, base):
            uploader = BitsUploader(attempts=3, retry_delay=0.01)
            session = await uploader.begin(f"{base}/v/f", NO_OPTIONS, size=4)
            fake.fail["Cancel-Session"] = [(503, {}), (500, {})]
            await session.abort()
            assert [p for p, _, _ in fake.requests].count("Cancel-Session") == 3
            await session.abort()  # idempotent: nothing sent
            assert [p for p, _, _ in fake.requests].count("Cancel-Session") == 3

            again = await uploader.begin(f"{base}/v/f", NO_OPTIONS, size=4)
            fake.fail["Cancel-Session"] = [(503, {})] * 3
            with pytest.raises(TransferError) as caught:
                await again.abort()  # the engine calls abort() again later (BITS: up to 24 h)
            assert caught.value.transient
            fake.fail["Cancel-Session"] = [(400, {"BITS-Error-Code": "0x80070057"})]
            with pytest.raises(TransferError) as caught:
                await again.abort()
            assert caught.value.hresult == hr.E_INVALIDARG
            fake.fail["Cancel-Session"] = [(500, {"BITS-Error-Code": "0x8020001F"})]
            await again.abort()  # the server has no such session: nothing left to cancel
            await uploader.close()

    run(body)


def test_finish_before_every_byte_is_acknowledged_is_refused() -> None:
    async def body() -> None:
        async with fake_iis() as (_fake, base):
            uploader = BitsUploader()
            session = await uploader.begin(f"{base}/v/f", NO_OPTIONS, size=8)
            await session.send(b"abcd", 0)
            with pytest.raises(TransferError) as caught:
                await session.finish()
            assert caught.value.hresult == hr.BG_E_INVALID_STATE
            assert not caught.value.transient
            with pytest.raises(TransferError):
                await session.send(b"abcdefghij", 0)  # beyond the size
            await uploader.close()

    run(body)


def test_network_errors_map_like_the_download_transport() -> None:
    async def body() -> None:
        import socket

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()  # nothing listens there
        uploader = BitsUploader()
        with pytest.raises(TransferError) as caught:
            await uploader.begin(f"http://127.0.0.1:{port}/v/f", NO_OPTIONS, size=4)
        assert caught.value.hresult == hr.BG_E_CONNECT_FAILURE
        assert caught.value.transient
        with pytest.raises(TransferError) as caught:
            await uploader.begin("ftp://example.org/f", NO_OPTIONS, size=4)
        assert caught.value.hresult == hr.E_INVALIDARG
        await uploader.close()

    run(body)


def test_cancel_sends_cancel_session_and_the_server_deletes_the_partial_data(
    config: UploadServerConfig,
) -> None:
    data = payload(MIB)

    async def body() -> None:
        async with serve_uploads(config) as base:
            uploader = BitsUploader(fragment_size=256 * KIB)
            session = await uploader.begin(f"{base}/up/gone.bin", NO_OPTIONS, size=len(data))
            await session.send(data[: 512 * KIB], 0)
            folder = config.session_dir / session.session_id.strip("{}")
            assert (folder / "request.bin").stat().st_size == 512 * KIB
            await session.abort()
            assert not (folder / "request.bin").exists()
            assert session_state(config, session.session_id)["state"] == "cancelled"
            # The session is gone for good: a late fragment is refused.
            again = await uploader.begin(
                f"{base}/up/gone.bin", NO_OPTIONS, size=len(data), token=session.token
            )
            with pytest.raises(TransferError) as caught:
                await again.send(data[512 * KIB :], 512 * KIB)
            assert caught.value.hresult == hr.BG_E_SESSION_NOT_FOUND
            await uploader.close()

    run(body)
    assert not (config.vdirs[0].directory / "gone.bin").exists()
