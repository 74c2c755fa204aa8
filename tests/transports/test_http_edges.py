"""HttpTransport at the edges real servers reach and curl/wget take in their stride: a body cut
off right after the bytes were sent (the bytes that came with the close are kept, so every
resume gets further), responses with hundreds of headers or very long ones (aiohttp's defaults
refuse what WinHTTP reads), and a redirect with an empty Location (no redirect at all)."""

from __future__ import annotations

import asyncio
import re

import pytest
from aiohttp import web
from test_http_faults import Handler, fails, raw_serving, run, serving

from backhaul.core import hresult as hr
from backhaul.core.error import TransferError
from backhaul.core.port import Download, RequestOptions
from backhaul.core.vocabulary import ErrorContext
from backhaul.transports.http import MAX_HEADER_LINE, MAX_RESPONSE_HEADERS, HttpTransport

NO_OPTIONS = RequestOptions()
DATA = bytes(range(256)) * 1024  # 256 KiB
ETAG = '"v1"'
FAKE_400 = re.compile(r"\b400\b")  # the status aiohttp's parser errors carry, no server's


async def read_into(download: Download, got: bytearray) -> None:
    try:
        async for chunk in download:
            got.extend(chunk)
    finally:
        await download.aclose()


# -- a body cut off right after it was sent ---------------------------------------------------

SENT = 40_000  # bytes each answer carries before the server closes


def test_bytes_that_arrive_with_the_close_are_kept_so_each_resume_gets_further() -> None:
    """wget -c finishes such a file in ceil(size / SENT) requests. aiohttp raises the stored
    ClientPayloadError before handing back what it buffered: when the close arrived before the
    reader ran (the engine was busy writing), every attempt kept 0 bytes and resumed at 0."""
    closed: list[asyncio.Event] = []

    async def dropping(request: web.Request) -> web.StreamResponse:
        spec = request.headers.get("Range")
        start = int(spec.removeprefix("bytes=").split("-")[0]) if spec else 0
        headers = {"ETag": ETAG, "Accept-Ranges": "bytes", "Content-Length": str(len(DATA) - start)}
        if spec:
            headers["Content-Range"] = f"bytes {start}-{len(DATA) - 1}/{len(DATA)}"
        resp = web.StreamResponse(status=206 if spec else 200, headers=headers)
        await resp.prepare(request)
        await resp.write(DATA[start : start + SENT])
        if start + SENT < len(DATA):
            assert request.transport is not None
            request.transport.close()  # at once: no pause for the client to read
            closed[-1].set()
        return resp

    async def body(t: HttpTransport) -> tuple[list[int], list[TransferError], bytes]:
        offsets: list[int] = []
        errors: list[TransferError] = []
        got = bytearray()
        async with serving({"/f": dropping}) as base:
            for _ in range(2 * len(DATA) // SENT):
                closed.append(asyncio.Event())
                download = await t.open(f"{base}/f", NO_OPTIONS, offset=len(got), validator=ETAG)
                offsets.append(download.offset)
                assert download.offset == len(got)
                if len(got) + SENT < len(DATA):  # a busy consumer: the close comes first
                    await asyncio.wait_for(closed[-1].wait(), 5)
                    await asyncio.sleep(0.2)
                try:
                    async for chunk in download:
                        got.extend(chunk)
                    break
                except TransferError as error:
                    errors.append(error)
                finally:
                    await download.aclose()
        return offsets, errors, bytes(got)

    offsets, errors, got = run(body, chunk_size=16 * 1024)  # the kept bytes come in pieces too
    assert offsets == list(range(0, len(DATA), SENT))
    assert got == DATA
    assert len(errors) == len(offsets) - 1
    for offset, error in zip(offsets, errors, strict=False):
        assert error.hresult == hr.BG_E_CONNECTION_CLOSED
        assert error.transient
        assert error.context == ErrorContext.GENERAL_TRANSPORT
        assert f"connection closed after {SENT} of {len(DATA) - offset} body bytes" in (
            error.message
        )
        assert not FAKE_400.search(error.message), error.message
        assert "ClientPayloadError" not in error.message


def test_a_chunked_body_cut_short_keeps_its_bytes_and_says_so_without_a_fake_400() -> None:
    """No length to compare: the words say the body was cut short, with aiohttp's reason but
    not the status 400 its parser errors carry (no server sent one)."""
    answer = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n9\r\nunfin"  # the third chunk never ends
    )

    async def body(t: HttpTransport) -> tuple[bytes, TransferError]:
        got = bytearray()
        async with raw_serving(answer) as base:
            download = await t.open(f"{base}/f", NO_OPTIONS)
            await asyncio.sleep(0.2)  # the close comes before the first read
            with pytest.raises(TransferError) as caught:
                await read_into(download, got)
        return bytes(got), caught.value

    got, error = run(body)
    assert got == b"hello worldunfin"
    assert error.hresult == hr.BG_E_CONNECTION_CLOSED
    assert error.transient
    assert "was cut short after 16 bytes" in error.message
    assert not FAKE_400.search(error.message), error.message


# -- many and long headers --------------------------------------------------------------------


def headers_answer(headers: dict[str, str]) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=DATA, headers={"ETag": ETAG, **headers})

    return handler


def test_hundreds_of_headers_and_a_header_longer_than_8_kib_are_read() -> None:
    """aiohttp's defaults (128 lines of at most 8190 bytes) refused both with a transient
    error retried for ever; curl takes 5000 lines, WinHTTP a 64 KiB block."""
    many = {f"X-H{i}": "v" * 50 for i in range(500)}
    long = {"Content-Security-Policy": "default-src 'self' " + "x" * 20_000}

    async def body(t: HttpTransport) -> list[tuple[int, bytes, bytes]]:
        results = []
        async with serving({"/many": headers_answer(many), "/long": headers_answer(long)}) as base:
            for path in ("/many", "/long"):
                remote = await t.stat(f"{base}{path}", NO_OPTIONS)
                download = await t.open(f"{base}{path}", NO_OPTIONS)
                try:
                    got = b"".join([chunk async for chunk in download])
                finally:
                    await download.aclose()
                results.append((remote.size or 0, got, (remote.headers or "").encode()))
        return results

    (size, got, headers), (long_size, long_got, long_headers) = run(body)
    assert (size, got) == (len(DATA), DATA)
    assert b"X-H499: " + b"v" * 50 + b"\r\n" in headers
    assert (long_size, long_got) == (len(DATA), DATA)
    assert b"x" * 20_000 in long_headers


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        (
            {f"X-H{i}": "v" for i in range(MAX_RESPONSE_HEADERS + 1)},
            f"too many headers (more than {MAX_RESPONSE_HEADERS})",
        ),
        (
            {"X-Big": "x" * (MAX_HEADER_LINE + 1)},
            f"a header line is longer than {MAX_HEADER_LINE} bytes",
        ),
    ],
    ids=["too-many", "too-long"],
)
def test_headers_beyond_the_limits_are_an_unreadable_response_without_a_fake_400(
    headers: dict[str, str], why: str
) -> None:
    """The client refuses to read the response: BG_E_INVALID_SERVER_RESPONSE, in words that
    say so, not aiohttp's 'ClientResponseError: 400' (a status the server never sent)."""

    async def body(t: HttpTransport) -> object:
        async with serving({"/f": headers_answer(headers)}) as base:
            return await t.open(f"{base}/f", NO_OPTIONS)

    error = fails(body)
    assert error.hresult == hr.BG_E_INVALID_SERVER_RESPONSE
    assert error.context == ErrorContext.REMOTE_FILE
    assert "the server's response headers could not be read" in error.message
    assert why in error.message
    assert not FAKE_400.search(error.message), error.message
    assert "x" * 200 not in error.message  # the line is not quoted


# -- an empty Location ------------------------------------------------------------------------


@pytest.mark.parametrize("location", ["", "   "])
@pytest.mark.parametrize("call", ["stat", "open"])
def test_a_redirect_with_an_empty_location_is_the_http_error_it_is(
    location: str, call: str
) -> None:
    """An empty Location joined to the URL is the URL itself: following it asked the same
    URL 11 times before 'more than 10 redirects'. It is no redirect: one request, and the 302
    is reported as BG_E_HTTP_ERROR_302."""
    hits: list[str] = []

    async def empty(request: web.Request) -> web.StreamResponse:
        hits.append(request.method)
        return web.Response(status=302, headers={"Location": location})

    async def body(t: HttpTransport) -> object:
        async with serving({"/f": empty}) as base:
            if call == "stat":
                return await t.stat(f"{base}/f", NO_OPTIONS)
            return await t.open(f"{base}/f", NO_OPTIONS)

    error = fails(body)
    assert error.hresult == hr.http_status_hresult(302) == hr.BG_E_HTTP_ERROR_302
    assert error.context == ErrorContext.REMOTE_FILE
    assert "HTTP 302" in error.message
    assert "redirects" not in error.message
    assert hits == ["HEAD" if call == "stat" else "GET"]
