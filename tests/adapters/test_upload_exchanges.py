"""The sample exchanges of the protocol digest (bits-upload.md §14) replayed against the BITS
upload server (adapters/upload_server.py) over a raw socket on 127.0.0.1.

Every request below is the spec's request, byte for byte apart from the session id the server
chose (and a ``Host`` header where the spec leaves it out for brevity). Every answer is checked against the
spec's response: the status line, and every header the spec shows, with its value where the
spec fixes one, or its shape where the server chooses it (session ids: a registry-form GUID,
upper case; reply URLs: absolute, on the host the client used, below the virtual directory's
``BITS-Sessions/Replies/<GUID>/``). An answer may not carry a ``BITS-*`` header the spec's
response does not show, except ``BITS-Session-Id`` where §1.4 allows it (the spec's IIS
captures omit it from some Acks; we always echo it).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web
from test_upload_server_security import (
    Answer,
    Clock,
    exchange,
    port_of,
    read_answer,
    run,
)
from yarl import URL

from backhaul.adapters.upload_server import (
    NotificationType,
    UploadServerConfig,
    VirtualDirectory,
    _Store,
    serve_app,
    serve_uploads,
)

PROTOCOL = "{7df0354d-249b-430f-820d-3d2a9bef4931}"
SESSION_SHAPE = re.compile(r"\{[0-9A-F]{8}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{12}\}")
ANY = object()  # a header the spec shows with a value the server chooses: checked apart


def message(text: str, body: bytes = b"", host: str = "files.example") -> bytes:
    """A request as the spec writes it (one header per line, no trailing blank line). The
    spec leaves ``Host`` out of its later requests for brevity; HTTP/1.1 requires it, so it is
    added when missing."""
    lines = [line.strip() for line in text.strip().splitlines()]
    if not any(line.lower().startswith("host:") for line in lines):
        lines.insert(1, f"Host: {host}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def expect(answer: Answer, status_line: str, headers: dict[str, Any]) -> None:
    """The answer matches the spec's response (module docstring)."""
    status, reason = status_line.split(" ", 1)
    assert (answer.status, answer.reason) == (int(status), reason), answer
    for name, value in headers.items():
        got = answer.header(name)
        assert got is not None, f"{name} missing from {answer}"
        if value is not ANY:
            assert got == value, f"{name}: {got!r} != {value!r}"
    shown = {name.lower() for name in headers}
    extra = {n for n in answer.names() if n.startswith("bits-")} - shown - {"bits-session-id"}
    assert not extra, f"headers the spec does not show: {extra}"
    if answer.header("BITS-Packet-Type") is not None:
        assert answer.body == b""  # an Ack has no body


def session_of(answer: Answer) -> str:
    session = answer.header("BITS-Session-Id") or ""
    assert SESSION_SHAPE.fullmatch(session), session
    return session


async def create_session(port: int) -> str:
    """Create-Session for /upload/report.bin, as §14.1 opens it; the new session's id."""
    (created,) = await exchange(
        port,
        message(f"""
            BITS_POST /upload/report.bin HTTP/1.1
            BITS-Packet-Type: Create-Session
            BITS-Supported-Protocols: {PROTOCOL}
            Content-Length: 0
        """),
    )
    return session_of(created)


def received_of(config: UploadServerConfig, session: str) -> int | None:
    """The server's offset for the session, as the server reads it from its directory."""
    found = _Store(config.session_dir, fsync=False).load(session)
    return None if found is None else found.received


# =================================================================================================
# §14.1: a full plain upload with a dropped connection and a resume; the gap and expiry variants
# =================================================================================================

DATA = bytes((i * 7 + 3) % 251 for i in range(100_000))


def plain_config(tmp_path: Path, **server: Any) -> UploadServerConfig:
    www = tmp_path / "www"
    www.mkdir(exist_ok=True)
    return UploadServerConfig(
        session_dir=tmp_path / "sessions",
        vdirs=[VirtualDirectory("/upload", www, session_timeout=3600)],
        fsync=False,
        **server,
    )


def test_14_1_full_plain_upload_with_a_drop_and_a_resume(tmp_path: Path) -> None:
    config = plain_config(tmp_path)

    async def body() -> None:
        async with serve_uploads(config) as base:
            port = port_of(base)
            # Ping and Create-Session on one keep-alive connection, as Windows does.
            ping, created = await exchange(
                port,
                message("""
                    BITS_POST /upload/report.bin HTTP/1.1
                    Host: files.example
                    Accept: */*
                    BITS-Packet-Type: Ping
                    User-Agent: Microsoft BITS/6.7
                    Content-Length: 0
                    Connection: Keep-Alive
                """),
                message(f"""
                    BITS_POST /upload/report.bin HTTP/1.1
                    Host: files.example
                    BITS-Packet-Type: Create-Session
                    BITS-Supported-Protocols: {PROTOCOL}
                    Content-Length: 0
                """),
            )
            expect(ping, "200 OK", {"BITS-Packet-Type": "Ack", "Content-Length": "0"})
            assert ping.header("BITS-Session-Id") is None
            expect(
                created,
                "200 OK",
                {
                    "BITS-Packet-Type": "Ack",
                    "BITS-Protocol": PROTOCOL,
                    "BITS-Session-Id": ANY,
                    "Accept-Encoding": "identity",
                    "Content-Length": "0",
                },
            )
            sid = session_of(created)

            (first,) = await exchange(
                port,
                message(
                    f"""
                    BITS_POST /upload/report.bin HTTP/1.1
                    Host: files.example
                    BITS-Packet-Type: Fragment
                    BITS-Session-Id: {sid}
                    Content-Name: report.bin
                    Content-Range: bytes 0-65535/100000
                    Content-Length: 65536
                """,
                    DATA[:65536],
                ),
            )
            expect(
                first,
                "200 OK",
                {
                    "BITS-Packet-Type": "Ack",
                    "BITS-Session-Id": sid,
                    "BITS-Received-Content-Range": "65536",
                    "Content-Length": "0",
                },
            )

            # The connection drops while the next fragment (65536-99999) is in flight, after
            # 16384 of its bytes: the server keeps them (it has 65536..81919).
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                message(
                    f"""
                    BITS_POST /upload/report.bin HTTP/1.1
                    Host: files.example
                    BITS-Packet-Type: Fragment
                    BITS-Session-Id: {sid}
                    Content-Range: bytes 65536-99999/100000
                    Content-Length: 34464
                """,
                    DATA[65536:81920],
                )
            )
            await writer.drain()
            writer.close()
            for _ in range(200):
                if received_of(config, sid) == 81920:
                    break
                await asyncio.sleep(0.02)
            assert received_of(config, sid) == 81920

            # Later, a new connection: the client Pings, then resends from its own offset.
            ping, resent, closed = await exchange(
                port,
                message("""
                    BITS_POST /upload/report.bin HTTP/1.1
                    BITS-Packet-Type: Ping
                    Content-Length: 0
                """),
                message(
                    f"""
                    BITS_POST /upload/report.bin HTTP/1.1
                    BITS-Packet-Type: Fragment
                    BITS-Session-Id: {sid}
                    Content-Range: bytes 65536-99999/100000
                    Content-Length: 34464
                """,
                    DATA[65536:],
                ),
                message(f"""
                    BITS_POST /upload/report.bin HTTP/1.1
                    BITS-Packet-Type: Close-Session
                    BITS-Session-Id: {sid}
                    Content-Length: 0
                """),
            )
            expect(ping, "200 OK", {"BITS-Packet-Type": "Ack", "Content-Length": "0"})
            expect(
                resent,
                "200 OK",
                {
                    "BITS-Packet-Type": "Ack",
                    "BITS-Session-Id": sid,
                    "BITS-Received-Content-Range": "100000",
                    "Content-Length": "0",
                },
            )
            expect(
                closed,
                "200 OK",
                {"BITS-Packet-Type": "Ack", "BITS-Session-Id": sid, "Content-Length": "0"},
            )

    run(body)
    assert (tmp_path / "www" / "report.bin").read_bytes() == DATA


def test_14_1_gap_variant_is_416_with_the_servers_offset(tmp_path: Path) -> None:
    config = plain_config(tmp_path)

    def fragment(sid: str, first: int, last: int) -> bytes:
        return message(
            f"""
            BITS_POST /upload/report.bin HTTP/1.1
            BITS-Packet-Type: Fragment
            BITS-Session-Id: {sid}
            Content-Range: bytes {first}-{last}/100000
            Content-Length: {last - first + 1}
        """,
            DATA[first : last + 1],
        )

    async def body() -> None:
        async with serve_uploads(config) as base:
            port = port_of(base)
            sid = await create_session(port)
            # The server has 0..81919; the client jumps ahead to 90000-99999.
            *_, gap = await exchange(
                port,
                fragment(sid, 0, 65535),
                fragment(sid, 65536, 81919),
                fragment(sid, 90000, 99999),
            )
            expect(
                gap,
                "416 Requested Range Not Satisfiable",
                {
                    "BITS-Packet-Type": "Ack",
                    "BITS-Session-Id": sid,
                    "BITS-Received-Content-Range": "81920",
                    "Content-Length": "0",
                },
            )

    run(body)


def test_14_1_expired_session_is_session_not_found(tmp_path: Path) -> None:
    clock = Clock()
    config = plain_config(tmp_path, clock=clock)

    async def body() -> None:
        async with serve_uploads(config) as base:
            port = port_of(base)
            sid = await create_session(port)
            clock.now += 3601  # the virtual directory's session_timeout
            (expired,) = await exchange(
                port,
                message(
                    f"""
                    BITS_POST /upload/report.bin HTTP/1.1
                    BITS-Packet-Type: Fragment
                    BITS-Session-Id: {sid}
                    Content-Range: bytes 0-4/100000
                    Content-Length: 5
                """,
                    DATA[:5],
                ),
            )
            expect(
                expired,
                "500 Internal Server Error",
                {
                    "BITS-Packet-Type": "Ack",
                    "BITS-Error-Code": "0x8020001F",
                    "BITS-Error-Context": "0x5",
                    "Content-Length": "0",
                },
            )

    run(body)


# =================================================================================================
# §14.2: upload-reply, notification by reference, BITS-Host-Id; and the by-value hop
# =================================================================================================

QUERY = bytes((i * 13) % 256 for i in range(4892))
REPLY = bytes((i * 31 + 5) % 256 for i in range(10240))


class Application:
    """The server application of the hop: records each notification and answers it by
    reference (writes BITS-Response-DataFile-Name) or by value (a 100-byte body)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict[str, str], bytes]] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.seen.append((request.method, request.path_qs, dict(request.headers), body))
        reply_file = request.headers.get("BITS-Response-DataFile-Name")
        if reply_file is not None:
            Path(reply_file).write_bytes(REPLY)
            return web.Response(status=200)
        return web.Response(status=200, body=REPLY[:100])


@contextlib.asynccontextmanager
async def application() -> AsyncIterator[tuple[Application, str]]:
    app = Application()
    web_app = web.Application()
    web_app.router.add_post("/bitsasp/handler.asp", app.handle)
    async with serve_app(web_app) as base:
        yield app, f"{base}/bitsasp/handler.asp"


def test_14_2_upload_reply_by_reference_with_a_host_id(tmp_path: Path) -> None:
    www = tmp_path / "www"
    www.mkdir()

    async def body() -> None:
        async with application() as (app, notify_url):
            config = UploadServerConfig(
                session_dir=tmp_path / "sessions",
                vdirs=[
                    VirtualDirectory(
                        "/upload-ref",
                        www,
                        notification=NotificationType.BY_REFERENCE,
                        notification_url=notify_url,
                        host_id="node7.farm.example",
                        host_id_fallback_timeout=110,
                    )
                ],
                fsync=False,
            )
            async with serve_uploads(config) as base:
                port = port_of(base)
                (created,) = await exchange(
                    port,
                    message(f"""
                        BITS_POST /upload-ref/query.xml HTTP/1.1
                        Host: farm.example
                        BITS-Packet-Type: Create-Session
                        BITS-Supported-Protocols: {PROTOCOL}
                        Content-Length: 0
                    """),
                )
                expect(
                    created,
                    "200 OK",
                    {
                        "BITS-Packet-Type": "Ack",
                        "BITS-Protocol": PROTOCOL,
                        "BITS-Session-Id": ANY,
                        "BITS-Host-Id": "node7.farm.example",
                        "BITS-Host-Id-Fallback-Timeout": "110",
                        "Accept-Encoding": "identity",
                        "Content-Length": "0",
                    },
                )
                sid = session_of(created)
                guid = sid.strip("{}")
                # Now sent to the node named by BITS-Host-Id (here: the same server).
                ping, last = await exchange(
                    port,
                    message("""
                        BITS_POST /upload-ref/query.xml HTTP/1.1
                        Host: node7.farm.example
                        BITS-Packet-Type: Ping
                        Content-Length: 0
                    """),
                    message(
                        f"""
                        BITS_POST /upload-ref/query.xml HTTP/1.1
                        Host: node7.farm.example
                        BITS-Packet-Type: Fragment
                        BITS-Session-Id: {sid}
                        Content-Range: bytes 0-4891/4892
                        Content-Length: 4892
                    """,
                        QUERY,
                    ),
                )
                expect(ping, "200 OK", {"BITS-Packet-Type": "Ack", "Content-Length": "0"})
                expect(
                    last,
                    "200 OK",
                    {
                        "BITS-Packet-Type": "Ack",
                        "BITS-Session-Id": sid,
                        "BITS-Received-Content-Range": "4892",
                        "BITS-Reply-URL": ANY,
                        "Content-Length": "0",
                    },
                )
                # The server-side hop: one POST with the spec's headers.
                ((method, target, headers, hop_body),) = app.seen
                assert (method, target, hop_body) == ("POST", "/bitsasp/handler.asp", b"")
                assert headers["User-Agent"].startswith("BITSExts 1.5")
                assert (
                    headers["BITS-Original-Request-URL"]
                    == "http://farm.example/upload-ref/query.xml"
                )
                request_file = Path(headers["BITS-Request-DataFile-Name"])
                response_file = Path(headers["BITS-Response-DataFile-Name"])
                assert request_file.is_absolute() and response_file.is_absolute()
                assert guid in str(request_file) and guid in str(response_file)
                assert headers["Content-Length"] == "0"
                # The reply URL: absolute, on the node the client talks to, in the vdir.
                reply_url = URL(last.header("BITS-Reply-URL") or "")
                assert reply_url.is_absolute() and reply_url.host == "node7.farm.example"
                assert reply_url.path == (
                    f"/upload-ref/BITS-Sessions/Replies/{guid}/responsefile.bin"
                )
                path = reply_url.raw_path
                head, tail = await exchange(
                    port,
                    message(f"""
                        GET {path} HTTP/1.1
                        Host: node7.farm.example
                        Accept: */*
                        Accept-Encoding: identity
                        Range: bytes=0-9976
                    """),
                    message(f"""
                        GET {path} HTTP/1.1
                        Host: node7.farm.example
                        Accept: */*
                        Accept-Encoding: identity
                        Range: bytes=9977-10239
                    """),
                )
                expect(
                    head,
                    "206 Partial Content",
                    {
                        "Content-Type": "application/octet-stream",
                        "Content-Range": "bytes 0-9976/10240",
                        "Content-Length": "9977",
                        "Last-Modified": ANY,
                        "Accept-Ranges": "bytes",
                    },
                )
                expect(
                    tail,
                    "206 Partial Content",
                    {"Content-Range": "bytes 9977-10239/10240", "Content-Length": "263"},
                )
                assert head.body + tail.body == REPLY
                (closed,) = await exchange(
                    port,
                    message(f"""
                        BITS_POST /upload-ref/query.xml HTTP/1.1
                        Host: node7.farm.example
                        BITS-Packet-Type: Close-Session
                        BITS-Session-Id: {sid}
                        Content-Length: 0
                    """),
                )
                expect(closed, "200 OK", {"BITS-Packet-Type": "Ack", "Content-Length": "0"})
                # The reply is gone with the session; the upload was never copied (type 1
                # without BITS-Copy-File-To-Destination).
                (gone,) = await exchange(
                    port, message(f"GET {path} HTTP/1.1\nHost: node7.farm.example")
                )
                assert gone.status == 404
                assert not (www / "query.xml").exists()

    run(body)


def test_14_2_by_value_hop(tmp_path: Path) -> None:
    www = tmp_path / "www"
    www.mkdir()

    async def body() -> None:
        async with application() as (app, notify_url):
            config = UploadServerConfig(
                session_dir=tmp_path / "sessions",
                vdirs=[
                    VirtualDirectory(
                        "/upload-ref",
                        www,
                        notification=NotificationType.BY_VALUE,
                        notification_url=notify_url,
                    )
                ],
                fsync=False,
            )
            async with serve_uploads(config) as base:
                port = port_of(base)
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(
                    message(f"""
                        BITS_POST /upload-ref/query.xml HTTP/1.1
                        Host: farm.example
                        BITS-Packet-Type: Create-Session
                        BITS-Supported-Protocols: {PROTOCOL}
                        Content-Length: 0
                    """)
                )
                sid = session_of(await read_answer(reader))
                writer.write(
                    message(
                        f"""
                        BITS_POST /upload-ref/query.xml HTTP/1.1
                        Host: farm.example
                        BITS-Packet-Type: Fragment
                        BITS-Session-Id: {sid}
                        Content-Range: bytes 0-4891/4892
                        Content-Length: 4892
                    """,
                        QUERY,
                    )
                )
                last = await read_answer(reader)
                writer.close()
                expect(
                    last,
                    "200 OK",
                    {
                        "BITS-Packet-Type": "Ack",
                        "BITS-Session-Id": sid,
                        "BITS-Received-Content-Range": "4892",
                        "BITS-Reply-URL": ANY,
                        "Content-Length": "0",
                    },
                )
                ((method, _, headers, hop_body),) = app.seen
                assert method == "POST"
                assert (
                    headers["BITS-Original-Request-URL"]
                    == "http://farm.example/upload-ref/query.xml"
                )
                assert headers["Content-Length"] == "4892"
                assert hop_body == QUERY
                reply_url = URL(last.header("BITS-Reply-URL") or "")
                (reply,) = await exchange(
                    port, message(f"GET {reply_url.raw_path} HTTP/1.1\nHost: farm.example")
                )
                assert (reply.status, reply.body) == (200, REPLY[:100])

    run(body)
