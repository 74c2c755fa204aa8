"""The BITS upload server's defences (adapters/upload_server.py, bits-upload.md §9), each shown
over real sockets on 127.0.0.1: paths from the URL only and never through a symlink, no
truncation of existing files, one active session per destination, gaps and overlaps, header
and body limits, HTTP Basic authentication (also end to end with BitsUploader and the engine)
and the session limit. Also a hypothesis fuzz test: random packet sequences, malformed and
oversized requests must never produce an unnamed 5xx, a file outside the root or a corrupted
upload, and the server keeps answering.

The raw HTTP helpers here (``Answer``, ``exchange``, ``bits_request``) are imported by
test_upload_exchanges.py and test_upload_end_to_end.py."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import random
import socket
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backhaul.adapters.engine import Engine
from backhaul.adapters.manager import TransferManager
from backhaul.adapters.upload_server import (
    BasicAuth,
    NotificationType,
    UploadServerConfig,
    VirtualDirectory,
    _place,
    make_upload_app,
    serve_app,
    serve_uploads,
)
from backhaul.core import hresult as hr
from backhaul.core.error import TransferError
from backhaul.core.port import PlainCredentials, RequestOptions
from backhaul.core.vocabulary import AuthScheme, AuthTarget, JobState, JobType
from backhaul.transports.bits_upload import BitsUploader

T = TypeVar("T")
GUID = "{7df0354d-249b-430f-820d-3d2a9bef4931}"
KIB = 1024
NOT_FOUND = (500, "0x8020001F", "0x5")
INVALID = (400, "0x80070057", "0x5")
DENIED = (403, "0x80070005", "0x5")
BUSY = (409, "0x80070020", "0x5")
TOO_MANY = (503, "0x801901F7", "0x5")


# =================================================================================================
# Raw HTTP over a socket (aiohttp's client would normalise paths and refuse odd requests)
# =================================================================================================


class Answer:
    """One HTTP response: status, headers in order (names as sent), body."""

    def __init__(self, status: int, reason: str, headers: list[tuple[str, str]], body: bytes):
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def names(self) -> set[str]:
        return {k.lower() for k, _ in self.headers}

    def error(self) -> tuple[int, str | None, str | None]:
        return self.status, self.header("BITS-Error-Code"), self.header("BITS-Error-Context")

    def __repr__(self) -> str:
        return f"<Answer {self.status} {self.headers}>"


async def read_answer(reader: asyncio.StreamReader, *, head: bool = False) -> Answer:
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw.decode("latin-1").split("\r\n")
    _, status, reason = [*lines[0].split(" ", 2), ""][:3]
    headers = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers.append((name.strip(), value.strip()))
    answer = Answer(int(status), reason, headers, b"")
    length = answer.header("Content-Length")
    if head or answer.status in (204, 304):
        return answer
    if length is not None:
        answer.body = await reader.readexactly(int(length))
    else:
        answer.body = await reader.read()
    return answer


def bits_request(
    path: str,
    packet: str | None,
    *,
    session: str | None = None,
    body: bytes = b"",
    content_range: str | None = None,
    headers: list[tuple[str, str]] | None = None,
    method: str = "BITS_POST",
    host: str = "127.0.0.1",
    content_length: int | None = None,
    close: bool = False,
) -> bytes:
    """A request as bytes; ``content_length`` overrides the length header (-1: none)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    if packet is not None:
        lines.append(f"BITS-Packet-Type: {packet}")
    if packet is not None and packet.lower() == "create-session":
        lines.append(f"BITS-Supported-Protocols: {GUID}")
    if session is not None:
        lines.append(f"BITS-Session-Id: {session}")
    if content_range is not None:
        lines.append(f"Content-Range: {content_range}")
    for name, value in headers or []:
        lines.append(f"{name}: {value}")
    length = len(body) if content_length is None else content_length
    if length >= 0:
        lines.append(f"Content-Length: {length}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def exchange(port: int, *requests: bytes, within: float = 10.0) -> list[Answer]:
    """Send the requests on ONE connection, one at a time, and read each answer."""

    async def run() -> list[Answer]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            answers = []
            for request in requests:
                writer.write(request)
                await writer.drain()
                answers.append(await read_answer(reader, head=request.startswith(b"HEAD ")))
            return answers
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    return await asyncio.wait_for(run(), within)


def run(body: Callable[[], Awaitable[T]], timeout: float = 20.0) -> T:
    async def main() -> T:
        return await asyncio.wait_for(body(), timeout)

    return asyncio.run(main())


def port_of(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def config_for(
    tmp_path: Path, www: Path, *, vdirs: Any = None, **server: Any
) -> UploadServerConfig:
    vdir_keys = {"allow_overwrite", "max_upload_size", "session_timeout", "auth"}
    vdir = {k: server.pop(k) for k in list(server) if k in vdir_keys}
    return UploadServerConfig(
        session_dir=tmp_path / "sessions",
        vdirs=vdirs or [VirtualDirectory("/up", www, **vdir)],
        fsync=False,
        **server,
    )


@contextlib.asynccontextmanager
async def raw_server(config: UploadServerConfig) -> AsyncIterator[int]:
    async with serve_uploads(config) as base:
        yield port_of(base)


async def create(port: int, path: str, **extra: Any) -> str:
    (answer,) = await exchange(port, bits_request(path, "Create-Session", **extra))
    assert answer.status == 200, answer
    session = answer.header("BITS-Session-Id")
    assert session is not None
    return session


async def fragment(
    port: int, path: str, session: str, data: bytes, first: int, total: int, **extra: Any
) -> Answer:
    (answer,) = await exchange(
        port,
        bits_request(
            path,
            "Fragment",
            session=session,
            body=data,
            content_range=f"bytes {first}-{first + len(data) - 1}/{total}",
            **extra,
        ),
    )
    return answer


async def packet(
    port: int, path: str, kind: str, session: str | None = None, **extra: Any
) -> Answer:
    (answer,) = await exchange(port, bits_request(path, kind, session=session, **extra))
    return answer


@pytest.fixture
def www(tmp_path: Path) -> Path:
    path = tmp_path / "www"
    path.mkdir()
    return path


def snapshot(path: Path) -> tuple[bytes, int, int]:
    st_ = path.stat()
    return path.read_bytes(), st_.st_ino, st_.st_mtime_ns


# =================================================================================================
# Paths: from the URL only, inside the root, never through a symlink
# =================================================================================================


def test_the_destination_comes_from_the_url_never_from_content_name(
    tmp_path: Path, www: Path
) -> None:
    async def body() -> None:
        async with raw_server(config_for(tmp_path, www)) as port:
            evil = [("Content-Name", "../../escape.bin")]
            sid = await create(port, "/up/named.bin", headers=evil)
            answer = await fragment(port, "/up/named.bin", sid, b"data", 0, 4, headers=evil)
            assert answer.status == 200

    run(body)
    assert (www / "named.bin").read_bytes() == b"data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sessions", "www"]


def test_symlinks_inside_the_root_are_never_followed_for_writes(tmp_path: Path, www: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "target.bin").write_bytes(b"precious")
    (www / "file-link.bin").symlink_to(outside / "target.bin")  # to an existing file
    (www / "dangling.bin").symlink_to(outside / "new.bin")  # to a file not there yet
    (www / "dir-link").symlink_to(outside)  # to a directory
    (www / "sub").mkdir()
    (www / "sub" / "deeper").symlink_to(outside)

    async def body() -> None:
        config = config_for(tmp_path, www, allow_overwrite=True)
        async with raw_server(config) as port:
            for path in (
                "/up/file-link.bin",
                "/up/dangling.bin",
                "/up/dir-link/x.bin",
                "/up/sub/deeper/x.bin",
                "/up/sub/deeper/../x.bin",
            ):
                answer = await packet(port, path, "Create-Session")
                assert answer.error() in (DENIED, INVALID), (path, answer)
            # A directory swapped for a symlink while the upload runs: refused at the next
            # packet (the path is resolved again for every packet), nothing written outside.
            (www / "swap").mkdir()
            sid = await create(port, "/up/swap/x.bin")
            assert (await fragment(port, "/up/swap/x.bin", sid, b"abc", 0, 6)).status == 200
            (www / "swap").rmdir()
            (www / "swap").symlink_to(outside)
            answer = await fragment(port, "/up/swap/x.bin", sid, b"def", 3, 6)
            assert answer.error() == DENIED

    run(body)
    assert sorted(p.name for p in outside.iterdir()) == ["target.bin"]
    assert (outside / "target.bin").read_bytes() == b"precious"


def test_the_commit_opens_each_directory_without_following_symlinks(tmp_path: Path) -> None:
    """The last line of defence: ``_place`` walks from the root with O_NOFOLLOW, so a
    directory swapped for a symlink between the check and the rename fails (ELOOP)."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "a").mkdir(parents=True)
    outside.mkdir()
    source = tmp_path / "upload.bin"
    source.write_bytes(b"payload")
    _place(source, root, ("a",), "x.bin", overwrite=False, durable=True)
    assert (root / "a" / "x.bin").read_bytes() == b"payload"
    source.write_bytes(b"payload 2")
    (root / "a" / "b").symlink_to(outside)
    for overwrite in (False, True):
        with pytest.raises(OSError) as caught:
            _place(source, root, ("a", "b"), "y.bin", overwrite=overwrite, durable=False)
        assert caught.value.errno in (40, 20)  # ELOOP, ENOTDIR
    assert list(outside.iterdir()) == []
    # An existing name, even a dangling symlink, is never replaced without overwrite.
    (root / "a" / "dangling").symlink_to(outside / "nothing")
    with pytest.raises(FileExistsError):
        _place(source, root, ("a",), "dangling", overwrite=False, durable=False)
    assert not (outside / "nothing").exists()


# =================================================================================================
# Existing files: never truncated; the rename is atomic
# =================================================================================================


def test_an_existing_file_is_never_truncated(tmp_path: Path, www: Path) -> None:
    old = os.urandom(10_000)
    (www / "keep.bin").write_bytes(old)
    (www / "replace.bin").write_bytes(old)
    new = os.urandom(30_000)

    async def body() -> None:
        async with raw_server(config_for(tmp_path, www)) as port:
            before = snapshot(www / "keep.bin")
            assert (await packet(port, "/up/keep.bin", "Create-Session")).error() == DENIED
            assert snapshot(www / "keep.bin") == before
            # The destination appears during the upload: the commit is refused, it stays.
            sid = await create(port, "/up/late.bin")
            await fragment(port, "/up/late.bin", sid, new[:10_000], 0, len(new))
            (www / "late.bin").write_bytes(old)
            late = snapshot(www / "late.bin")
            answer = await fragment(port, "/up/late.bin", sid, new[10_000:], 10_000, len(new))
            assert answer.error() == DENIED
            assert snapshot(www / "late.bin") == late
        async with raw_server(config_for(tmp_path, www, allow_overwrite=True)) as port:
            before = snapshot(www / "replace.bin")
            sid = await create(port, "/up/replace.bin")
            for first in range(0, 20_000, 5_000):  # two thirds: the old file is untouched
                chunk = new[first : first + 5_000]
                assert (
                    await fragment(port, "/up/replace.bin", sid, chunk, first, 30_000)
                ).status == 200
                assert snapshot(www / "replace.bin") == before
            answer = await fragment(port, "/up/replace.bin", sid, new[20_000:], 20_000, 30_000)
            assert answer.header("BITS-Received-Content-Range") == "30000"
            after = (www / "replace.bin").stat()
            assert (www / "replace.bin").read_bytes() == new
            assert after.st_ino != before[1]  # a new file renamed over the old one

    run(body)
    assert sorted(p.name for p in www.iterdir()) == ["keep.bin", "late.bin", "replace.bin"]


# =================================================================================================
# One active session per destination
# =================================================================================================


def test_one_active_session_per_destination(tmp_path: Path, www: Path) -> None:
    clock = Clock()
    data = os.urandom(20_000)

    async def body() -> None:
        config = config_for(
            tmp_path,
            www,
            clock=clock,
            claim_timeout=30,
            vdirs=[
                VirtualDirectory("/up", www, allow_overwrite=True),
                VirtualDirectory("/alias", www, allow_overwrite=True),  # the same directory
            ],
        )
        async with raw_server(config) as port:
            first = await create(port, "/up/one.bin")
            # The same destination, by its URL or another vdir's: 409, transient.
            for path in ("/up/one.bin", "/alias/one.bin"):
                assert (await packet(port, path, "Create-Session")).error() == BUSY
            assert (await packet(port, "/up/other.bin", "Create-Session")).status == 200
            # Activity keeps the claim; the upload completes; then the name is free again.
            clock.now += 25
            await fragment(port, "/up/one.bin", first, data[:10_000], 0, 20_000)
            clock.now += 25
            assert (await packet(port, "/up/one.bin", "Create-Session")).error() == BUSY
            await fragment(port, "/up/one.bin", first, data[10_000:], 10_000, 20_000)
            assert (www / "one.bin").read_bytes() == data
            second = await create(port, "/up/one.bin")
            # A request in flight holds the destination, however old the session's last one:
            # the fragment's head and half its body are sent, the rest waits.
            clock.now += 1000
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            request = bits_request(
                "/up/one.bin",
                "Fragment",
                session=second,
                body=data,
                content_range="bytes 0-19999/20000",
            )
            writer.write(request[:-10_000])
            await writer.drain()
            await asyncio.sleep(0.1)
            assert (await packet(port, "/alias/one.bin", "Create-Session")).error() == BUSY
            writer.write(request[-10_000:])
            assert (await read_answer(reader)).status == 200
            writer.close()
            # Idle beyond claim_timeout: a new session supersedes the old one, whose client
            # learns BG_E_SESSION_NOT_FOUND (it starts over and meets the 409).
            third = await create(port, "/up/two.bin")
            await fragment(port, "/up/two.bin", third, data[:5000], 0, 20_000)
            clock.now += 31
            fourth = await create(port, "/alias/two.bin")
            answer = await fragment(port, "/up/two.bin", third, data[5000:], 5000, 20_000)
            assert answer.error() == NOT_FOUND
            assert (await packet(port, "/up/two.bin", "Create-Session")).error() == BUSY
            answer = await fragment(port, "/alias/two.bin", fourth, data, 0, 20_000)
            assert answer.header("BITS-Received-Content-Range") == "20000"
            assert (www / "two.bin").read_bytes() == data

    run(body)


# =================================================================================================
# Gaps, overlaps
# =================================================================================================


def test_a_gap_is_416_with_the_expected_offset_and_nothing_is_written(
    tmp_path: Path, www: Path
) -> None:
    async def body() -> None:
        config = config_for(tmp_path, www)
        async with raw_server(config) as port:
            sid = await create(port, "/up/gap.bin")
            await fragment(port, "/up/gap.bin", sid, b"a" * 100, 0, 1000)
            answer = await fragment(port, "/up/gap.bin", sid, b"b" * 100, 500, 1000)
            assert answer.status == 416
            assert answer.header("BITS-Received-Content-Range") == "100"
            assert answer.header("BITS-Error-Code") is None
            assert answer.header("BITS-Session-Id") == sid
            data = config.session_dir / sid.strip("{}") / "request.bin"
            assert data.read_bytes() == b"a" * 100

    run(body)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_overlapping_and_repeated_fragments_leave_the_file_exact(
    tmp_path: Path, www: Path, seed: int
) -> None:
    rng = random.Random(seed)
    data = rng.randbytes(64 * KIB + rng.randrange(1000))
    garbage = bytes(len(data))  # what a server writing overlaps again would leave

    async def body() -> None:
        async with raw_server(config_for(tmp_path, www)) as port:
            sid = await create(port, "/up/exact.bin")
            expected, sent = 0, 0
            while expected < len(data):
                first = rng.randrange(max(expected - 4000, 0), expected + 1)
                if rng.random() < 0.15:
                    first = expected + rng.randrange(1, 2000)  # a gap now and then
                if first >= len(data):
                    continue
                last = min(first + rng.randrange(1, 9000), len(data)) - 1
                # Bytes the server already has are sent as garbage: it must skip them.
                if first > expected:
                    chunk = data[first : last + 1]
                elif last < expected:
                    chunk = garbage[first : last + 1]
                else:
                    chunk = garbage[first:expected] + data[expected : last + 1]
                answer = await fragment(port, "/up/exact.bin", sid, chunk, first, len(data))
                got = int(answer.header("BITS-Received-Content-Range") or -1)
                if first > expected:
                    assert (answer.status, got) == (416, expected)
                else:
                    assert answer.status == 200, answer
                    expected = max(expected, last + 1)
                    assert got == expected
                sent += 1
            assert sent > 5

    run(body)
    assert (www / "exact.bin").read_bytes() == data


# =================================================================================================
# Limits: header and body sizes
# =================================================================================================


def test_header_and_body_size_limits(tmp_path: Path, www: Path) -> None:
    async def body() -> None:
        config = config_for(
            tmp_path,
            www,
            max_fragment_size=16 * KIB,
            max_header_bytes=8 * KIB,
            max_upload_size=1 << 20,
        )
        async with raw_server(config) as port:
            sid = await create(port, "/up/limits.bin")
            # A fragment body above max_fragment_size: 413; the connection stays usable.
            too_big = bits_request(
                "/up/limits.bin",
                "Fragment",
                session=sid,
                body=b"x" * (16 * KIB + 1),
                content_range=f"bytes 0-{16 * KIB}/100000",
            )
            fits = bits_request(
                "/up/limits.bin",
                "Fragment",
                session=sid,
                body=b"x" * 100,
                content_range="bytes 0-99/100000",
            )
            big, small = await exchange(port, too_big, fits)
            assert big.error() == (413, hr.format_hresult(hr.http_status_hresult(413)), "0x5")
            assert small.header("BITS-Received-Content-Range") == "100"
            # A total above max_upload_size: 500 BG_E_TOO_LARGE.
            other = await create(port, "/up/huge.bin")
            answer = await fragment(port, "/up/huge.bin", other, b"x", 0, (1 << 20) + 1)
            assert answer.error() == (500, "0x80200020", "0x5")
            # A Content-Length that is not the range's length: 400.
            answer = await packet(
                port,
                "/up/limits.bin",
                "Fragment",
                sid,
                body=b"abc",
                content_range="bytes 100-199/100000",
            )
            assert answer.error() == INVALID
            # One header value above 4 KB: 400 with the BITS error headers.
            answer = await packet(port, "/up/x.bin", "Ping", headers=[("X-Big", "a" * 4097)])
            assert answer.error() == INVALID
            # A head above max_header_bytes made of small headers: 400.
            many = [(f"X-H{i}", "v" * 100) for i in range(90)]  # ~9.5 KB
            answer = await packet(port, "/up/x.bin", "Ping", headers=many)
            assert answer.error() == INVALID
            assert (await packet(port, "/up/x.bin", "Ping", headers=many[:60])).status == 200
            # Beyond the parser's own limits (a line above 8190 bytes, more than 128 header
            # lines): a plain 400 and the connection is closed.
            for headers in ([("X-Huge", "a" * 9000)], [(f"X-{i}", "1") for i in range(200)]):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(bits_request("/up/x.bin", "Ping", headers=headers))
                answer = await read_answer(reader)
                assert answer.status == 400
                assert await reader.read() == b""  # closed
                writer.close()
            # The server still answers.
            assert (await packet(port, "/up/x.bin", "Ping")).status == 200

    run(body)


# =================================================================================================
# HTTP Basic authentication
# =================================================================================================


def basic(user: str, password: str) -> list[tuple[str, str]]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return [("Authorization", f"Basic {token}")]


def sha(password: str) -> str:
    return "{SHA}" + base64.b64encode(hashlib.sha1(password.encode()).digest()).decode()


def test_basic_auth_per_server_and_per_directory(tmp_path: Path, www: Path) -> None:
    (www / "open").mkdir()
    (www / "team").mkdir()
    server_auth = BasicAuth({"alice": "wonder land", "bob": sha("builder")}, realm="uploads")
    team_auth = BasicAuth.from_lines(["# the team", "carol:c4rol", ""], realm="team")
    assert "wonder" not in repr(server_auth) and "c4rol" not in repr(team_auth)

    async def body() -> None:
        config = UploadServerConfig(
            session_dir=tmp_path / "sessions",
            vdirs=[
                VirtualDirectory("/up", www),
                VirtualDirectory("/up/team", www / "team", auth=team_auth),
            ],
            fsync=False,
            auth=server_auth,
        )
        async with raw_server(config) as port:
            for headers in (
                [],
                basic("alice", "wrong"),
                basic("nobody", "wonder land"),
                [("Authorization", "Basic !!!not base64")],
                [("Authorization", "Bearer abc")],
                basic("carol", "c4rol"),  # a team user is not a server user
            ):
                for kind in ("Ping", "Create-Session"):
                    answer = await packet(port, "/up/a.bin", kind, headers=headers)
                    assert answer.status == 401, (headers, answer)
                    assert (
                        answer.header("WWW-Authenticate")
                        == 'Basic realm="uploads", charset="UTF-8"'
                    )
                    assert answer.header("BITS-Packet-Type") == "Ack"
                    assert answer.header("BITS-Error-Code") is None
                    assert answer.body == b""
            alice, bob = basic("alice", "wonder land"), basic("bob", "builder")
            assert (await packet(port, "/up/a.bin", "Ping", headers=bob)).status == 200
            sid = await create(port, "/up/a.bin", headers=alice)
            # A session belongs to its creator: bob cannot write, close or cancel it.
            answer = await fragment(port, "/up/a.bin", sid, b"abc", 0, 3, headers=bob)
            assert answer.error() == NOT_FOUND
            for kind in ("Close-Session", "Cancel-Session"):
                assert (
                    await packet(port, "/up/a.bin", kind, sid, headers=bob)
                ).error() == NOT_FOUND
            answer = await fragment(port, "/up/a.bin", sid, b"abc", 0, 3, headers=alice)
            assert answer.header("BITS-Received-Content-Range") == "3"
            # The vdir's own auth wins below /up/team.
            answer = await packet(port, "/up/team/t.bin", "Create-Session", headers=alice)
            assert answer.status == 401
            assert answer.header("WWW-Authenticate") == 'Basic realm="team", charset="UTF-8"'
            carol = basic("carol", "c4rol")
            sid = await create(port, "/up/team/t.bin", headers=carol)
            answer = await fragment(port, "/up/team/t.bin", sid, b"team", 0, 4, headers=carol)
            assert answer.status == 200
            # GET (replies) needs credentials too.
            (answer,) = await exchange(port, b"GET /up/a.bin HTTP/1.1\r\nHost: x\r\n\r\n")
            assert answer.status == 401 and answer.header("WWW-Authenticate")
            # The body of an unauthenticated fragment is discarded, and the connection closed.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                bits_request(
                    "/up/team/t.bin",
                    "Fragment",
                    session=sid,
                    body=b"x" * 1000,
                    content_range="bytes 0-999/1000",
                )
            )
            answer = await read_answer(reader)
            assert answer.status == 401
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()

    run(body)
    assert (www / "a.bin").read_bytes() == b"abc"
    assert (www / "team" / "t.bin").read_bytes() == b"team"


def test_basic_auth_end_to_end_with_bits_uploader_and_the_engine(tmp_path: Path, www: Path) -> None:
    data = os.urandom(300 * KIB)
    source = tmp_path / "source.bin"
    source.write_bytes(data)

    async def body() -> None:
        config = config_for(tmp_path, www, auth=BasicAuth({"alice": "s3cret"}))
        async with serve_uploads(config) as base:
            uploader = BitsUploader(fragment_size=64 * KIB, min_fragment_size=16 * KIB)
            try:
                with pytest.raises(TransferError) as refused:
                    await uploader.begin(f"{base}/up/nocreds.bin", RequestOptions(), size=3)
                assert refused.value.hresult == hr.http_status_hresult(401)
                assert not refused.value.transient
                wrong = RequestOptions(
                    credentials=(
                        PlainCredentials(AuthTarget.SERVER, AuthScheme.BASIC, "alice", "nope"),
                    )
                )
                with pytest.raises(TransferError):
                    await uploader.begin(f"{base}/up/nocreds.bin", wrong, size=3)
                good = RequestOptions(
                    credentials=(
                        PlainCredentials(AuthTarget.SERVER, AuthScheme.BASIC, "alice", "s3cret"),
                    )
                )
                session = await uploader.begin(f"{base}/up/direct.bin", good, size=len(data))
                assert await session.send(data, 0) == len(data)
                assert await session.finish() is None
            finally:
                await uploader.close()
            manager = TransferManager(home=tmp_path / "home")
            job = manager.create_job("upload", JobType.UPLOAD)
            job.add_file(f"{base}/up/engine.bin", source)
            job.set_credentials(AuthTarget.SERVER, AuthScheme.BASIC, "alice", "s3cret")
            job.resume()
            await Engine(manager, poll_interval=0.05).run(until_idle=True)
            assert job.state is JobState.TRANSFERRED, job.error
            job.complete()
            # Without credentials the job fails for good with HTTP 401.
            other = manager.create_job("upload", JobType.UPLOAD)
            other.add_file(f"{base}/up/refused.bin", source)
            other.resume()
            await Engine(manager, poll_interval=0.05).run(until_idle=True)
            assert other.state is JobState.ERROR
            assert other.error is not None
            assert other.error.hresult == hr.http_status_hresult(401)

    run(body, timeout=30)
    assert (www / "direct.bin").read_bytes() == data
    assert (www / "engine.bin").read_bytes() == data
    assert not (www / "refused.bin").exists()


# =================================================================================================
# The notification target: the server's own, never the client's Host header
# =================================================================================================


@pytest.mark.parametrize("notification", [NotificationType.BY_REFERENCE, NotificationType.BY_VALUE])
def test_a_relative_notification_url_never_follows_the_clients_host_header(
    tmp_path: Path, www: Path, notification: NotificationType
) -> None:
    """A relative BITSServerNotificationURL ("the application on this server") resolves on
    the listener that took the upload, whatever ``Host`` the client sends: a client naming
    another server there must not make the upload server POST the upload (by value) or its
    local paths (by reference) to it (bits-upload.md §6.2, §9)."""
    legit: list[str] = []
    rogue: list[str] = []

    async def application(request: web.Request) -> web.Response:
        legit.append(request.headers.get("BITS-Original-Request-URL", ""))
        return web.Response(body=b"the reply")

    async def elsewhere(request: web.Request) -> web.Response:
        rogue.append(str(request.url))
        return web.Response(body=b"rogue")

    async def body() -> None:
        vdir = VirtualDirectory(
            "/up", www, notification=notification, notification_url="../app/notify"
        )
        app = make_upload_app(config_for(tmp_path, www, vdirs=[vdir]))
        app.router.add_post("/app/notify", application)
        other = web.Application()
        other.router.add_post("/app/notify", elsewhere)
        async with serve_app(app) as base, serve_app(other) as other_base:
            port, host = port_of(base), other_base.split("//")[1]
            session = await create(port, "/up/f.bin", host=host)
            answer = await fragment(port, "/up/f.bin", session, b"hello", 0, 5, host=host)
            assert answer.status == 200, answer
        assert rogue == []
        assert legit == [f"http://{host}/up/f.bin"]  # the URL as the client sent it

    run(body)


# =================================================================================================
# A bounded number of sessions
# =================================================================================================


def test_the_number_of_sessions_is_bounded(tmp_path: Path, www: Path) -> None:
    clock = Clock()

    async def body() -> None:
        config = config_for(tmp_path, www, max_sessions=3, clock=clock, session_timeout=100)
        async with raw_server(config) as port:
            sessions = [await create(port, f"/up/s{i}.bin") for i in range(3)]
            answer = await packet(port, "/up/s3.bin", "Create-Session")
            assert answer.error() == TOO_MANY
            assert answer.header("Retry-After") == "60"
            # Ping and the existing sessions still work.
            assert (await packet(port, "/up/s3.bin", "Ping")).status == 200
            assert (await fragment(port, "/up/s0.bin", sessions[0], b"ab", 0, 2)).status == 200
            # A committed session still counts until Close-Session; a closed one does not.
            assert (await packet(port, "/up/s3.bin", "Create-Session")).error() == TOO_MANY
            assert (await packet(port, "/up/s0.bin", "Close-Session", sessions[0])).status == 200
            sessions[0] = await create(port, "/up/s3.bin")
            assert (await packet(port, "/up/s4.bin", "Create-Session")).error() == TOO_MANY
            assert (await packet(port, "/up/s1.bin", "Cancel-Session", sessions[1])).status == 200
            sessions[1] = await create(port, "/up/s4.bin")
        # The count survives a restart (rebuilt from the session directory)...
        async with raw_server(config) as port:
            assert (await packet(port, "/up/s5.bin", "Create-Session")).error() == TOO_MANY
            # ...and expired sessions make room even before the cleanup runs.
            clock.now += 101
            assert (await packet(port, "/up/s5.bin", "Create-Session")).status == 200

    run(body)


# =================================================================================================
# Fuzz: random packet sequences over real sockets
# =================================================================================================

NAMES = ["a.bin", "b.bin", "sub/c.bin", "link/x.bin", "..%2Fup.bin", "%2e%2e/x.bin", "d.bin"]
PACKETS = ["Ping", "Create-Session", "Fragment", "Close-Session", "Cancel-Session"]
TOTALS = [1, 7, 100, 1000, 5000]
ALLOWED_5XX = {  # the 5xx a BITS server may send (bits-upload.md §1.5)
    (500, "0x8020001F"),  # BG_E_SESSION_NOT_FOUND
    (500, "0x80200020"),  # BG_E_TOO_LARGE
    (503, "0x801901F7"),  # our session limit
}


def source_bytes(name: str, total: int) -> bytes:
    """What the test uploads to ``name`` for a file of ``total`` bytes: every fragment is a
    slice of it, so a complete file must equal it exactly."""
    return hashlib.shake_256(f"{name}:{total}".encode()).digest(total)


FAULTS = [
    "length-none",  # no Content-Length
    "length-more",  # more declared than sent, then the client half-closes (a drop)
    "length-less",  # less declared than sent: the rest is garbage on the connection
    "range-bad",  # "bytes=a-b/c"
    "range-none",
    "range-inverted",
    "dup-length",  # two Content-Length headers
    "bad-protocol",  # a foreign protocol GUID
    "big-value",  # a header value above 4 KB
    "truncate",  # the body stops half way and the client half-closes
    "case",  # the packet type in another case (allowed: must work)
]


@st.composite
def operations(draw: st.DrawFn) -> dict[str, Any]:
    """One request: mostly plausible (known sessions, offsets near the server's), with one
    fault in about a third of them, plus foreign methods and oversized heads."""
    kind = draw(
        st.sampled_from([*PACKETS, "Create-Session", *["Fragment"] * 6, "method", "oversized"])
    )
    return {
        "kind": kind,
        "name": draw(st.sampled_from([*["a.bin", "b.bin", "sub/c.bin"] * 3, *NAMES])),
        "session": draw(st.sampled_from(["known"] * 6 + ["random", "garbage", "none"])),
        "which": draw(st.sampled_from([0, 0, 0, 1, 2])),  # 0: the newest session
        "total": draw(st.sampled_from(TOTALS)),
        "tracked": draw(st.integers(0, 3)) > 0,  # start at the server's offset (minus back)
        "back": draw(st.sampled_from([0, 0, 0, 1, 10, 300])),
        "first": draw(st.integers(0, 5100)),
        "size": draw(st.integers(1, 3000)),
        "fault": draw(st.sampled_from(["none"] * 22 + FAULTS)),
        "method": draw(st.sampled_from(["GET", "PUT", "DELETE", "POST", "bits_post", "FOO"])),
    }


class FuzzServer:
    """The upload server on its own event loop in a thread (hypothesis drives it from plain
    blocking sockets)."""

    def __init__(self, config: UploadServerConfig) -> None:
        self.config = config
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self._stop = asyncio.Event()
            async with serve_uploads(self.config) as base:
                self.port = port_of(base)
                self._ready.set()
                await self._stop.wait()

        try:
            self._loop.run_until_complete(main())
        finally:
            self._loop.close()

    @contextlib.contextmanager
    def running(self) -> Iterator[FuzzServer]:
        self._thread.start()
        assert self._ready.wait(10)
        try:
            yield self
        finally:
            assert self._stop is not None
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)


def send_raw(port: int, request: bytes, *, half_close: bool) -> tuple[int, dict[str, str], bytes]:
    """One request on a new connection; (status, headers, body); status 0 if the server closed
    the connection without an answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return 0, {}, data
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split(" ")[1]), headers, rest


def test_fuzz_random_packet_sequences(tmp_path: Path) -> None:
    www, outside = tmp_path / "www", tmp_path / "outside"
    (www / "sub").mkdir(parents=True)
    outside.mkdir()
    (www / "link").symlink_to(outside)
    config = UploadServerConfig(
        session_dir=tmp_path / "sessions",
        vdirs=[VirtualDirectory("/up", www, max_upload_size=4000, allow_overwrite=True)],
        fsync=False,
        max_fragment_size=2500,
        max_sessions=500,
        claim_timeout=3600.0,  # a second Create-Session for a busy name: 409
    )
    sessions: dict[str, list[str]] = {}  # name -> the session ids created for it
    statuses: dict[int, int] = {}

    offsets: dict[str, int] = {}  # session id -> the offset the server last said
    totals: dict[str, int] = {}  # session id -> the total of its first accepted fragment

    def request_for(op: dict[str, Any]) -> tuple[bytes, bool, str | None, int | None]:
        path = f"/up/{op['name']}"
        kind, fault = op["kind"], op["fault"]
        if kind == "method":
            body = os.urandom(op["size"] % 50)
            head = f"{op['method']} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}"
            return head.encode() + b"\r\n\r\n" + body, False, None, None
        if kind == "oversized":
            big = [("X-Big", "b" * (4000 + op["size"] * 3))]
            return bits_request(path, "Ping", headers=big), False, None, None
        packet_type = kind.swapcase() if fault == "case" else kind
        known = sessions.get(op["name"], [])
        session: str | None = None
        if op["session"] == "known" and known:
            session = known[-1 - op["which"] % len(known)]
        elif op["session"] == "random":
            session = "{" + str(uuid.uuid4()).upper() + "}"
        elif op["session"] == "garbage":
            session = "../../" + "x" * op["which"]
        headers: list[tuple[str, str]] = []
        if fault == "dup-length":
            headers.append(("Content-Length", "0"))
        elif fault == "bad-protocol":
            headers.append(("BITS-Supported-Protocols", "{00000000-0000-0000-0000-000000000000}"))
        elif fault == "big-value":
            headers.append(("X-Value", "v" * 4100))
        body = b""
        content_range = None
        total: int | None = None
        if kind == "Fragment":
            total = totals.get(session or "", op["total"])
            if op["tracked"] and session in offsets:
                first = max(offsets[session] - op["back"], 0)
            else:
                first = op["first"] % (total + 10)
            body = source_bytes(op["name"], total)[first : first + op["size"]]
            last = first + max(len(body), 1) - 1
            content_range = {
                "range-bad": f"bytes={first}-{last}/{total}",
                "range-none": None,
                "range-inverted": f"bytes {last + 1}-{first}/{total}",
            }.get(fault, f"bytes {first}-{last}/{total}")
        content_length = {
            "length-none": -1,
            "length-more": len(body) + 7,
            "length-less": max(len(body) - 1, 0),
        }.get(fault)
        if fault == "truncate" and body:  # the connection drops in the middle of the body
            body = body[: len(body) // 2]
            content_length = len(body) * 2 + 1
        request = bits_request(
            path,
            packet_type,
            session=session,
            body=body,
            content_range=content_range,
            headers=headers,
            content_length=content_length,
        )
        half_close = fault in ("length-more", "truncate")
        return request, half_close, session, total

    def check_files() -> None:
        for path in www.rglob("*"):
            if path.is_symlink() or path.is_dir():
                continue
            name = path.relative_to(www).as_posix()
            content = path.read_bytes()
            assert content == source_bytes(name, len(content)), f"{name} is corrupted"
        assert list(outside.iterdir()) == []
        assert sorted(p.name for p in tmp_path.iterdir()) == ["outside", "sessions", "www"]

    with FuzzServer(config).running() as server:

        @settings(
            max_examples=150,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
            derandomize=True,
        )
        @given(st.lists(operations(), min_size=1, max_size=12))
        def check(ops: list[dict[str, Any]]) -> None:
            for op in ops:
                request, half_close, session, total = request_for(op)
                status, headers, _ = send_raw(server.port, request, half_close=half_close)
                statuses[status] = statuses.get(status, 0) + 1
                if status >= 500:
                    assert (status, headers.get("bits-error-code")) in ALLOWED_5XX, (op, headers)
                if headers:
                    assert headers.get("content-length") is not None
                if status == 200 and op["kind"] == "Create-Session":
                    sessions.setdefault(op["name"], []).append(headers["bits-session-id"])
                offset = headers.get("bits-received-content-range")
                if session is not None and offset is not None:
                    offsets[session] = int(offset)
                    if total is not None and int(offset) > 0:
                        totals.setdefault(session, total)
            check_files()
            # The server keeps answering.
            status, headers, _ = send_raw(
                server.port, bits_request("/up/a.bin", "Ping"), half_close=False
            )
            assert (status, headers.get("bits-packet-type")) == (200, "Ack")

        check()
    check_files()
    assert statuses.get(200, 0) > 50 and statuses.get(400, 0) > 50, statuses
    completed = [p for p in www.rglob("*.bin") if p.is_file() and not p.is_symlink()]
    assert completed, "the fuzz never completed an upload"


def test_fuzz_runs_upload_sequences_to_completion(tmp_path: Path) -> None:
    """The fuzz's "no corrupted upload" check has teeth only if uploads complete: a seeded
    run of plausible clients (random fragment sizes, resends, overlaps) completes many."""
    www = tmp_path / "www"
    www.mkdir()

    async def body() -> None:
        async with raw_server(config_for(tmp_path, www, allow_overwrite=True)) as port:
            rng = random.Random(7)
            for n in range(20):
                name, total = f"f{n}.bin", rng.choice(TOTALS)
                data = source_bytes(name, total)
                sid = await create(port, f"/up/{name}")
                offset = 0
                while offset < total:
                    first = max(0, offset - rng.randrange(0, 50))
                    chunk = data[first : first + rng.randrange(1, 3000)]
                    answer = await fragment(port, f"/up/{name}", sid, chunk, first, total)
                    offset = int(answer.header("BITS-Received-Content-Range") or 0)
                assert (await packet(port, f"/up/{name}", "Close-Session", sid)).status == 200

    run(body)
    for path in www.iterdir():
        assert path.read_bytes() == source_bytes(path.name, path.stat().st_size)
    assert len(list(www.iterdir())) == 20
