"""BitsUploader at the edges real servers reach, against a BITS server on a raw socket that
answers exactly the bytes a test gives it: Acks with hundreds of headers or very long ones (the
download transport's limits, not aiohttp's defaults, which refuse what WinHTTP reads), answers
beyond those limits or unparsable (BG_E_INVALID_SERVER_RESPONSE in words, without the status 400
aiohttp's parser errors carry and without the URL's secrets), and answers whose body is cut
short (BG_E_CONNECTION_CLOSED with the bytes received)."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import pytest

from backhaul.core import hresult as hr
from backhaul.core.error import TransferError
from backhaul.core.port import RequestOptions
from backhaul.core.vocabulary import ErrorContext
from backhaul.transports.bits_upload import UPLOAD_PROTOCOL, BitsUploader, BitsUploadSession
from backhaul.transports.http import MAX_HEADER_LINE, MAX_RESPONSE_HEADERS

NO_OPTIONS = RequestOptions()
KIB = 1024
DATA = bytes(range(256)) * 384  # 96 KiB: two fragments of 64 KiB
SID = b"{6F1C2F0E-6A43-4C55-9A52-0B1E1D1F7A10}"
FAKE_400 = re.compile(r"\b400\b")  # the status aiohttp's parser errors carry, no server's
T = TypeVar("T")


def run(body: Callable[[], Awaitable[T]], timeout: float = 15.0) -> T:
    async def main() -> T:
        return await asyncio.wait_for(body(), timeout)

    return asyncio.run(main())


def header_lines(count: int, value: bytes = b"v") -> bytes:
    return b"".join(b"X-H%d: %s\r\n" % (i, value) for i in range(count))


def long_line(size: int) -> bytes:
    return b"Content-Security-Policy: default-src 'self' " + b"x" * size + b"\r\n"


class RawBits:
    """Just enough of a BITS upload server for one session, on a raw socket. ``extra``: header
    lines added to every Ack; ``odd``: packet type -> the whole answer to send instead of its
    Ack (the connection is closed after it). Records the packet types it was sent."""

    def __init__(self, extra: bytes = b"", odd: dict[str, bytes] | None = None) -> None:
        self.extra = extra
        self.odd = odd or {}
        self.packets: list[str] = []
        self.data = bytearray()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    headers = {}
                    for line in head.decode("latin-1").split("\r\n")[1:]:
                        name, _, value = line.partition(":")
                        if name:
                            headers[name.strip().lower()] = value.strip()
                    body = await reader.readexactly(int(headers.get("content-length", "0")))
                    packet = headers.get("bits-packet-type", "")
                    self.packets.append(packet)
                    if packet in self.odd:
                        writer.write(self.odd[packet])
                        await writer.drain()
                        return
                    writer.write(self.answer(packet, headers, body))
                    await writer.drain()
            finally:
                writer.close()

    def answer(self, packet: str, headers: dict[str, str], body: bytes) -> bytes:
        status = b"200 OK"
        lines = [b"BITS-Packet-Type: Ack", b"Content-Length: 0"]
        if packet == "Create-Session":
            status = b"201 Created"
            lines += [b"BITS-Protocol: " + UPLOAD_PROTOCOL.encode(), b"BITS-Session-Id: " + SID]
        elif packet == "Fragment":
            span = headers["content-range"].removeprefix("bytes ").split("/")[0]
            first = int(span.split("-")[0])
            if first > len(self.data):
                status = b"416 Requested Range Not Satisfiable"
            else:
                self.data[first:] = body
            lines.append(b"BITS-Received-Content-Range: %d" % len(self.data))
        return (
            b"HTTP/1.1 " + status + b"\r\n" + b"\r\n".join(lines) + b"\r\n" + self.extra + b"\r\n"
        )


@contextlib.asynccontextmanager
async def raw_bits(server: RawBits) -> AsyncIterator[str]:
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}"
    finally:
        listener.close()
        await listener.wait_closed()


async def upload(session: BitsUploadSession, data: bytes) -> None:
    offset = session.offset
    while offset < len(data):
        offset = await session.send(data[offset:], offset)


def failure(server: RawBits, url_tail: str = "/up/f.bin") -> TransferError:
    """The TransferError one whole upload of DATA to ``server`` ends in."""

    async def body() -> TransferError:
        async with raw_bits(server) as base:
            uploader = BitsUploader(fragment_size=64 * KIB)
            try:
                session = await uploader.begin(f"{base}{url_tail}", NO_OPTIONS, size=len(DATA))
                await upload(session, DATA)
                await session.finish()
            except TransferError as error:
                return error
            finally:
                await uploader.close()
        raise AssertionError("the upload did not fail")

    return run(body)


def assert_in_words(error: TransferError) -> None:
    assert not FAKE_400.search(error.message), error.message
    assert "message=" not in error.message
    assert "x" * 200 not in error.message  # a header line is not quoted


# -- the limits -------------------------------------------------------------------------------


def test_acks_with_hundreds_of_headers_and_a_header_line_over_8_kib_are_read() -> None:
    """aiohttp's defaults (128 lines of at most 8190 bytes) refused every such Ack, Ping and
    Create-Session first, with a transient error retried for ever."""
    server = RawBits(extra=header_lines(300) + long_line(20 * KIB))

    async def body() -> tuple[str | None, str | None]:
        async with raw_bits(server) as base:
            uploader = BitsUploader(fragment_size=64 * KIB)
            try:
                session = await uploader.begin(f"{base}/up/f.bin", NO_OPTIONS, size=len(DATA))
                created = session.response_headers
                await upload(session, DATA)
                assert session.offset == len(DATA)
                assert await session.finish() is None
                return created, session.response_headers
            finally:
                await uploader.close()

    created, closed = run(body)
    assert server.packets == ["Ping", "Create-Session", "Fragment", "Fragment", "Close-Session"]
    assert bytes(server.data) == DATA
    for block in (created, closed):
        assert block is not None
        assert "X-H299: v\r\n" in block
        assert "x" * (20 * KIB) in block


@pytest.mark.parametrize("packet", ["Create-Session", "Fragment"])
@pytest.mark.parametrize(
    ("extra", "why"),
    [
        (header_lines(3000), f"too many headers (more than {MAX_RESPONSE_HEADERS})"),
        (long_line(70 * KIB), f"a header line is longer than {MAX_HEADER_LINE} bytes"),
    ],
    ids=["3000-headers", "70-kib-line"],
)
def test_headers_beyond_the_limits_are_an_invalid_response_named_by_its_limit(
    packet: str, extra: bytes, why: str
) -> None:
    """The client refuses to read the answer: BG_E_INVALID_SERVER_RESPONSE, in words that
    name the limit, not aiohttp's '400, message=...' (a status the server never sent)."""
    ack = b"HTTP/1.1 200 OK\r\nBITS-Packet-Type: Ack\r\nContent-Length: 0\r\n" + extra + b"\r\n"
    server = RawBits(odd={packet: ack})
    error = failure(server)
    assert server.packets[-1] == packet
    assert error.hresult == hr.BG_E_INVALID_SERVER_RESPONSE
    assert error.context == ErrorContext.REMOTE_FILE
    assert error.message.startswith(f"{packet}: the server's response headers could not be read")
    assert why in error.message
    assert_in_words(error)


def test_an_unparsable_answer_is_described_without_a_fake_400_or_the_urls_secrets() -> None:
    """aiohttp's ClientResponseError text ends in the request's real URL: the signature in
    its query reached the job's error description, next to the status 400 no server sent."""
    server = RawBits(odd={"Create-Session": b"HTTP/1.1 2x1 Created\r\nContent-Length: 0\r\n\r\n"})
    error = failure(server, "/up/f.bin?sig=TOPSECRETSIG&tx=7")
    assert error.hresult == hr.BG_E_INVALID_SERVER_RESPONSE
    assert error.context == ErrorContext.REMOTE_FILE
    assert "the server's response headers could not be read" in error.message
    assert "TOPSECRETSIG" not in error.message
    assert "tx=7" in error.message
    assert_in_words(error)


# -- an answer's body cut short ---------------------------------------------------------------


@pytest.mark.parametrize("packet", ["Create-Session", "Fragment"])
def test_an_answer_whose_body_is_cut_short_says_how_many_bytes_came(packet: str) -> None:
    """BG_E_CONNECTION_CLOSED, transient, in our words: aiohttp's were 'ContentLengthError:
    400, message=...'."""
    cut = (
        b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 100\r\n\r\n" + b"0123456789"
    )  # then the close
    server = RawBits(odd={packet: cut})
    error = failure(server)
    assert error.hresult == hr.BG_E_CONNECTION_CLOSED
    assert error.transient
    assert error.context == ErrorContext.GENERAL_TRANSPORT
    assert error.message.startswith(f"{packet}: connection closed after 10 of 100 body bytes")
    assert "ClientPayloadError" not in error.message
    assert_in_words(error)


def test_a_chunked_answer_cut_short_says_so_without_a_fake_400() -> None:
    cut = (
        b"HTTP/1.1 500 Internal Server Error\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n9\r\nunf"  # the second chunk never ends
    )
    server = RawBits(odd={"Create-Session": cut})
    error = failure(server)
    assert error.hresult == hr.BG_E_CONNECTION_CLOSED
    assert error.transient
    assert "Create-Session: the body from http://127.0.0.1:" in error.message
    assert "was cut short after 8 bytes" in error.message
    assert "ClientPayloadError" not in error.message
    assert_in_words(error)
