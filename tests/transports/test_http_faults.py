"""HttpTransport against small aiohttp.web servers that misbehave on purpose: dropped and stalled
bodies, 503/429 with Retry-After, servers that ignore or botch ranges, refused HEAD, dynamic
content, redirects and their policy, TLS trust, credentials and custom headers."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any, TypeVar

import pytest
import trustme
from aiohttp import web

from backhaul.core import hresult as hr
from backhaul.core.error import TransferError
from backhaul.core.port import Download, PlainCredentials, RemoteFile, RequestOptions
from backhaul.core.vocabulary import AuthScheme, AuthTarget, ErrorContext, SecurityFlags
from backhaul.transports.http import HTTP_TIMEOUT, MAX_RETRY_AFTER, SECURE_FAILURE, HttpTransport

NO_OPTIONS = RequestOptions()
DATA = bytes(range(256)) * 1024  # 256 KiB
ETAG = '"v1"'
T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# -- servers ----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serving(
    routes: dict[str, Handler],
    *,
    head: bool = True,
    ssl_context: ssl.SSLContext | None = None,
    any_method: bool = False,
) -> AsyncIterator[str]:
    """An aiohttp.web app on 127.0.0.1:<free port>; yields its base URL. ``any_method``:
    the routes take every method (a custom HTTP method), not GET (and HEAD) only."""
    app = web.Application()
    for path, handler in routes.items():
        if any_method:
            app.router.add_route("*", path, handler)
        else:
            app.router.add_get(path, handler, allow_head=head)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.1)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    site = web.SockSite(runner, sock, ssl_context=ssl_context)
    await site.start()
    try:
        yield f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def raw_serving(answer: bytes) -> AsyncIterator[str]:
    """A TCP server on 127.0.0.1 that reads a request head and writes ``answer`` (a response
    aiohttp's parser refuses, say); yields its base URL."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


def serve_bytes(request: web.Request, data: bytes = DATA, etag: str = ETAG) -> web.Response:
    """A static file with a single-range and If-Range support, like nginx."""
    headers = {"ETag": etag, "Accept-Ranges": "bytes"}
    spec = request.headers.get("Range")
    if_range = request.headers.get("If-Range")
    if spec is None or (if_range is not None and if_range != etag):
        return web.Response(body=data, headers=headers)
    first, _, last = spec.removeprefix("bytes=").partition("-")
    start = int(first)
    end = min(int(last), len(data) - 1) if last else len(data) - 1
    if start >= len(data):
        return web.Response(status=416, headers={"Content-Range": f"bytes */{len(data)}"})
    headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
    return web.Response(status=206, body=data[start : end + 1], headers=headers)


async def static(request: web.Request) -> web.StreamResponse:
    return serve_bytes(request)


def run(body: Callable[[HttpTransport], Awaitable[T]], **kwargs: Any) -> T:
    async def main() -> T:
        transport = HttpTransport(**kwargs)
        try:
            return await body(transport)
        finally:
            await transport.close()

    return asyncio.run(main())


async def read_all(download: Download) -> bytes:
    try:
        return b"".join([chunk async for chunk in download])
    finally:
        await download.aclose()


async def read_until_error(download: Download, got: bytearray) -> None:
    try:
        async for chunk in download:
            got.extend(chunk)
    finally:
        await download.aclose()


def fails(body: Callable[[HttpTransport], Awaitable[object]], **kwargs: Any) -> TransferError:
    with pytest.raises(TransferError) as caught:
        run(body, **kwargs)
    return caught.value


# -- broken bodies ----------------------------------------------------------------------------


def test_connection_dropped_mid_body_is_transient_and_resumes_at_the_reached_offset() -> None:
    half = len(DATA) // 2

    async def dropping(request: web.Request) -> web.StreamResponse:
        if "Range" in request.headers:
            return serve_bytes(request)
        resp = web.StreamResponse(headers={"Content-Length": str(len(DATA)), "ETag": ETAG})
        await resp.prepare(request)
        await resp.write(DATA[:half])
        await asyncio.sleep(0.2)  # let the client read what was sent
        assert request.transport is not None
        request.transport.close()
        return resp

    async def body(t: HttpTransport) -> tuple[TransferError, int, bytes]:
        async with serving({"/f": dropping}) as base:
            got = bytearray()
            first = await t.open(f"{base}/f", NO_OPTIONS)
            with pytest.raises(TransferError) as caught:
                await read_until_error(first, got)
            reached = len(got)
            second = await t.open(f"{base}/f", NO_OPTIONS, offset=reached, validator=ETAG)
            assert second.offset == reached
            got.extend(await read_all(second))
            return caught.value, reached, bytes(got)

    error, reached, got = run(body, chunk_size=16 * 1024)
    assert error.hresult == hr.BG_E_CONNECTION_CLOSED
    assert error.transient
    assert error.context == ErrorContext.GENERAL_TRANSPORT
    assert 0 < reached <= half
    assert got == DATA


@pytest.mark.parametrize("where", ["body", "headers"])
def test_a_stall_fails_transient_after_stall_timeout(where: str) -> None:
    async def stalling(request: web.Request) -> web.StreamResponse:
        if where == "headers":
            await asyncio.sleep(30)
        resp = web.StreamResponse(headers={"Content-Length": str(len(DATA))})
        await resp.prepare(request)
        await resp.write(DATA[:1000])
        await asyncio.sleep(30)
        return resp

    async def body(t: HttpTransport) -> float:
        async with serving({"/f": stalling}) as base:
            t0 = time.monotonic()
            try:
                await read_all(await t.open(f"{base}/f", NO_OPTIONS))
            finally:
                elapsed = time.monotonic() - t0
            raise AssertionError(f"no stall detected after {elapsed:.2f} s")

    t0 = time.monotonic()
    error = fails(body, stall_timeout=0.5)
    elapsed = time.monotonic() - t0
    assert error.hresult == HTTP_TIMEOUT == 0x80072EE2
    assert error.transient
    assert 0.4 < elapsed < 3.0


def test_a_slow_trickle_is_not_a_stall() -> None:
    pieces = [DATA[i : i + 100] for i in range(0, 600, 100)]

    async def trickling(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": "600"})
        await resp.prepare(request)
        for piece in pieces:
            await resp.write(piece)
            await asyncio.sleep(0.25)
        return resp

    async def body(t: HttpTransport) -> bytes:
        async with serving({"/f": trickling}) as base:
            return await read_all(await t.open(f"{base}/f", NO_OPTIONS))

    t0 = time.monotonic()
    assert run(body, stall_timeout=0.5) == DATA[:600]
    assert time.monotonic() - t0 > 1.2  # three times the stall timeout, without a stall


# -- retry hints ------------------------------------------------------------------------------


def test_503_is_transient_with_retry_after_seconds_then_success() -> None:
    calls = 0

    async def busy_once(request: web.Request) -> web.StreamResponse:
        nonlocal calls
        calls += 1
        if calls == 1:
            return web.Response(status=503, text="busy", headers={"Retry-After": "2"})
        return serve_bytes(request)

    async def body(t: HttpTransport) -> tuple[TransferError, bytes]:
        async with serving({"/f": busy_once}, head=False) as base:
            with pytest.raises(TransferError) as caught:
                await t.open(f"{base}/f", NO_OPTIONS)
            return caught.value, await read_all(await t.open(f"{base}/f", NO_OPTIONS))

    error, got = run(body)
    assert error.hresult == hr.BG_E_HTTP_ERROR_503
    assert error.transient
    assert error.context == ErrorContext.REMOTE_FILE
    assert error.retry_after == 2.0
    assert got == DATA


def test_503_retry_after_as_an_http_date_counts_from_the_server_date() -> None:
    async def busy(request: web.Request) -> web.StreamResponse:
        now = datetime.now(UTC).replace(microsecond=0)
        headers = {
            "Date": format_datetime(now, usegmt=True),
            "Retry-After": format_datetime(now + timedelta(seconds=90), usegmt=True),
        }
        return web.Response(status=503, headers=headers)

    async def body(t: HttpTransport) -> object:
        async with serving({"/f": busy}) as base:
            return await t.stat(f"{base}/f", NO_OPTIONS)

    error = fails(body)
    assert error.hresult == hr.BG_E_HTTP_ERROR_503
    assert error.transient
    assert error.retry_after == 90.0


def test_429_is_transient_with_retry_after() -> None:
    async def limited(request: web.Request) -> web.StreamResponse:
        return web.Response(status=429, headers={"Retry-After": "7"})

    async def body(t: HttpTransport) -> object:
        async with serving({"/f": limited}) as base:
            return await t.open(f"{base}/f", NO_OPTIONS)

    error = fails(body)
    assert error.hresult == http_error(429)
    assert error.transient
    assert error.retry_after == 7.0


YEAR = 365 * 24 * 3600.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("999999999999", YEAR),  # 31,000 years: timedelta would take it, a date could not
        ("0000000000000000000031536001", YEAR),
        ("9" * 400, YEAR),  # float() of it overflows
        ("9" * 5000, YEAR),  # beyond Python's int() digit limit
        ("Fri, 31 Dec 9999 23:59:59 GMT", YEAR),
        ("0060", 60.0),
        ("Fri, 31 Dec 99999999999999999999 23:59:59 GMT", None),  # parsedate overflows
        ("soon", None),
        ("-5", None),
        ("1.5", None),
    ],
)
def test_an_absurd_or_unusable_retry_after_is_clamped_or_ignored_and_the_503_stays_transient(
    value: str, expected: float | None
) -> None:
    """The server's Retry-After never escapes as anything but the 503's TransferError: past
    a year it is clamped to a year (the engine adds it to a date), unusable it is ignored."""

    async def busy(request: web.Request) -> web.StreamResponse:
        return web.Response(status=503, headers={"Retry-After": value})

    async def body(t: HttpTransport) -> list[TransferError]:
        errors = []
        async with serving({"/f": busy}) as base:
            for call in (t.stat(f"{base}/f", NO_OPTIONS), t.open(f"{base}/f", NO_OPTIONS)):
                with pytest.raises(TransferError) as caught:
                    await call
                errors.append(caught.value)
        return errors

    for error in run(body):
        assert error.hresult == hr.BG_E_HTTP_ERROR_503
        assert error.transient
        assert error.retry_after == expected
        if error.retry_after is not None:  # the engine adds it to a date
            assert datetime.now(UTC) + timedelta(seconds=error.retry_after) > datetime.now(UTC)
    assert MAX_RETRY_AFTER == YEAR


def test_an_absurd_last_modified_is_no_date() -> None:
    async def odd(request: web.Request) -> web.StreamResponse:
        headers = {"Last-Modified": "Fri, 31 Dec 99999999999999999999 23:59:59 GMT"}
        return web.Response(body=b"abc", headers=headers)

    async def body(t: HttpTransport) -> RemoteFile:
        async with serving({"/f": odd}) as base:
            return await t.stat(f"{base}/f", NO_OPTIONS)

    remote = run(body)
    assert (remote.size, remote.last_modified) == (3, None)


def http_error(status: int) -> int:
    return hr.http_status_hresult(status)


# -- ranges -----------------------------------------------------------------------------------


async def ignores_ranges(request: web.Request) -> web.StreamResponse:
    return web.Response(body=DATA, headers={"ETag": ETAG})


def test_a_ranged_get_answered_200_reports_offset_zero_and_the_whole_body() -> None:
    async def body(t: HttpTransport) -> tuple[int, bytes]:
        async with serving({"/f": ignores_ranges}) as base:
            download = await t.open(f"{base}/f", NO_OPTIONS, offset=1000, validator=ETAG)
            return download.offset, await read_all(download)

    assert run(body) == (0, DATA)


def test_a_length_bounded_range_answered_200_is_insufficient_range_support() -> None:
    async def body(t: HttpTransport) -> object:
        async with serving({"/f": ignores_ranges}) as base:
            return await t.open(f"{base}/f", NO_OPTIONS, offset=1000, length=10, validator=ETAG)

    error = fails(body)
    assert error.hresult == hr.BG_E_INSUFFICIENT_RANGE_SUPPORT
    assert not error.transient


def test_a_range_covering_the_whole_file_may_be_answered_200() -> None:
    async def body(t: HttpTransport) -> tuple[int, bytes]:
        async with serving({"/f": ignores_ranges}) as base:
            download = await t.open(f"{base}/f", NO_OPTIONS, offset=0, length=len(DATA))
            return download.offset, await read_all(download)

    assert run(body) == (0, DATA)


def test_a_length_bounded_range_of_a_changed_file_restarts_from_zero() -> None:
    async def body(t: HttpTransport) -> tuple[int, str | None]:
        async with serving({"/f": static}) as base:
            download = await t.open(f"{base}/f", NO_OPTIONS, offset=10, length=10, validator='"v0"')
            await download.aclose()
            return download.offset, download.remote.validator

    assert run(body) == (0, ETAG)


def test_a_wrong_content_range_start_is_an_invalid_server_response() -> None:
    async def off_by_some(request: web.Request) -> web.StreamResponse:
        headers = {"Content-Range": f"bytes 0-{len(DATA) - 1}/{len(DATA)}"}
        return web.Response(status=206, body=DATA, headers=headers)

    async def body(t: HttpTransport) -> object:
        async with serving({"/f": off_by_some}) as base:
            return await t.open(f"{base}/f", NO_OPTIONS, offset=100)

    error = fails(body)
    assert error.hresult == hr.BG_E_INVALID_SERVER_RESPONSE
    assert error.transient
    assert error.context == ErrorContext.REMOTE_FILE


def test_404_is_fatal() -> None:
    async def body(t: HttpTransport) -> object:
        async with serving({"/f": static}) as base:
            return await t.open(f"{base}/missing", NO_OPTIONS)

    error = fails(body)
    assert error.hresult == hr.BG_E_HTTP_ERROR_404
    assert not error.transient
    assert error.context == ErrorContext.REMOTE_FILE


# -- stat -------------------------------------------------------------------------------------


def test_head_refused_with_405_falls_back_to_a_range_get_for_the_size() -> None:
    seen: list[str] = []

    async def get_only(request: web.Request) -> web.StreamResponse:
        seen.append(request.headers.get("Range", ""))
        return serve_bytes(request)

    async def body(t: HttpTransport) -> Any:
        async with serving({"/f": get_only}, head=False) as base:
            return await t.stat(f"{base}/f", NO_OPTIONS)

    remote = run(body)
    assert (remote.size, remote.validator, remote.accepts_ranges) == (len(DATA), ETAG, True)
    assert seen == ["bytes=0-0"]


def test_head_refused_and_ranges_ignored_takes_the_size_from_content_length() -> None:
    async def body(t: HttpTransport) -> Any:
        async with serving({"/f": ignores_ranges}, head=False) as base:
            return await t.stat(f"{base}/f", NO_OPTIONS)

    remote = run(body)
    assert (remote.size, remote.accepts_ranges) == (len(DATA), False)


def test_dynamic_content_without_length_or_ranges_has_no_size() -> None:
    async def generated(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        if request.method != "HEAD":
            for i in range(0, len(DATA), 50_000):
                await resp.write(DATA[i : i + 50_000])
        return resp

    async def body(t: HttpTransport) -> tuple[Any, int, bytes]:
        async with serving({"/f": generated}) as base:
            remote = await t.stat(f"{base}/f", NO_OPTIONS)
            download = await t.open(f"{base}/f", RequestOptions(dynamic=True))
            return remote, download.offset, await read_all(download)

    remote, offset, got = run(body)
    assert (remote.size, remote.accepts_ranges, remote.validator) == (None, False, None)
    assert (offset, got) == (0, DATA)


# -- secrets in messages ----------------------------------------------------------------------


def test_an_unparsable_response_keeps_the_urls_secrets_out_of_the_message() -> None:
    """aiohttp's ClientResponseError text ends in the request's real URL: the message is made
    of its status and message, and every URL in it is redacted."""
    bad = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nThis is not a header\r\n\r\nabc"

    async def body(t: HttpTransport) -> list[TransferError]:
        errors = []
        async with raw_serving(bad) as base:
            url = f"{base.replace('http://', 'http://alice:Pa55-SECRET@')}/f?sig=SIG-SECRET&x=1"
            for call in (t.stat(url, NO_OPTIONS), t.open(url, NO_OPTIONS)):
                with pytest.raises(TransferError) as caught:
                    await call
                errors.append(caught.value)
        return errors

    for error in run(body):
        assert error.hresult == hr.BG_E_INVALID_SERVER_RESPONSE
        assert error.context == ErrorContext.REMOTE_FILE
        for text in (error.message, str(error), repr(error.args)):
            assert "SIG-SECRET" not in text
            assert "Pa55-SECRET" not in text
        assert "/f?sig=<redacted>&x=1" in error.message
        assert "Invalid header token" in error.message  # the parser's reason stays


@pytest.mark.parametrize(
    "location",
    [
        "http://127.0.0.1:99999/x?sig=SECRET-1&x=1",  # port out of range
        "http://bob:SECRET-2@127.0.0.1:abc/x",  # a bad port, with a password
        "//bob:SECRET-3@127.0.0.1:abc/x?token=SECRET-4",  # the same, scheme-relative
        "http://[::1/x?X-Amz-Signature=SECRET-5",  # a broken IPv6 host
        "http://bob:SEC RET-6@127.0.0.1:abc/x",  # a space in the password
    ],
)
def test_an_unusable_redirect_location_is_quoted_without_its_secrets(location: str) -> None:
    async def redirect(request: web.Request) -> web.StreamResponse:
        return web.Response(status=302, headers={"Location": location})

    async def body(t: HttpTransport) -> object:
        async with serving({"/f": redirect}) as base:
            return await t.stat(f"{base}/f", NO_OPTIONS)

    error = fails(body)
    assert error.hresult == hr.BG_E_INVALID_SERVER_RESPONSE
    assert "bad redirect Location" in error.message
    assert "SECRET" not in str(error)
    assert "RET-6" not in str(error)
    assert "bob" not in str(error)


# -- redirects --------------------------------------------------------------------------------


async def moved(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/new")


def test_a_redirect_is_followed_and_the_final_url_reported() -> None:
    async def body(t: HttpTransport) -> tuple[str, str, bytes]:
        async with serving({"/old": moved, "/new": static}) as base:
            remote = await t.stat(f"{base}/old", NO_OPTIONS)
            download = await t.open(f"{base}/old", NO_OPTIONS, offset=5, validator=ETAG)
            return base, remote.url, await read_all(download)

    base, url, got = run(body)
    assert url == f"{base}/new"
    assert got == DATA[5:]


@pytest.mark.parametrize(("status", "then"), [(303, "GET"), (307, "REPORT")])
def test_a_see_other_is_fetched_with_get_whatever_the_custom_method(status: int, then: str) -> None:
    """A custom method (SetHttpMethod) answered 303 See Other: the answer is fetched with
    GET (it was asked with the custom method again); 307 keeps the method."""
    seen: list[tuple[str, str]] = []

    async def answer(request: web.Request) -> web.StreamResponse:
        seen.append((request.method, request.path))
        if request.path == "/ask" and status == 303:
            raise web.HTTPSeeOther("/answer")
        if request.path == "/ask":
            raise web.HTTPTemporaryRedirect("/answer")
        return web.Response(body=DATA)

    async def body(t: HttpTransport) -> bytes:
        async with serving({"/ask": answer, "/answer": answer}, any_method=True) as base:
            download = await t.open(f"{base}/ask", RequestOptions(http_method="REPORT"))
            return await read_all(download)

    assert run(body) == DATA
    assert seen == [("REPORT", "/ask"), (then, "/answer")]


@pytest.mark.parametrize(
    "flags", [0, SecurityFlags.REDIRECT_POLICY_ALLOW_REPORT], ids=["silent", "report"]
)
def test_a_redirect_reports_its_target_for_the_engine_and_no_redirect_reports_none(
    flags: int,
) -> None:
    """``RemoteFile.redirect_target`` is the URL the redirects led to, as requested (its
    signature included: the engine makes it the remote name under ALLOW_REPORT); None when
    the request was not redirected. Also when the size came from the range probe after a
    refused HEAD."""
    options = RequestOptions(security_flags=flags)

    async def first(request: web.Request) -> web.StreamResponse:
        raise web.HTTPMovedPermanently("/second?sig=SIG-1&x=1")

    async def second(request: web.Request) -> web.StreamResponse:
        raise web.HTTPTemporaryRedirect("/new?sig=SIG-2&x=2")

    async def no_head(request: web.Request) -> web.StreamResponse:
        raise web.HTTPMovedPermanently("/refusing")

    async def refusing(request: web.Request) -> web.StreamResponse:
        if request.method == "HEAD":
            return web.Response(status=405)
        return serve_bytes(request)

    routes: dict[str, Handler] = {"/first": first, "/second": second, "/new": static}
    routes |= {"/no-head": no_head, "/refusing": refusing}

    async def body(t: HttpTransport) -> tuple[str, list[str | None], bytes]:
        async with serving(routes) as base:
            stat = await t.stat(f"{base}/first", options)
            download = await t.open(f"{base}/first", options, offset=5, validator=ETAG)
            got = await read_all(download)
            probed = await t.stat(f"{base}/no-head", options)
            assert probed.size == len(DATA)
            direct = await t.stat(f"{base}/new", options)
            plain = await t.open(f"{base}/new", options)
            await plain.aclose()
            targets = [
                stat.redirect_target,
                download.remote.redirect_target,
                probed.redirect_target,
                direct.redirect_target,
                plain.remote.redirect_target,
            ]
            return base, targets, got

    base, targets, got = run(body)
    assert targets == [f"{base}/new?sig=SIG-2&x=2"] * 2 + [f"{base}/refusing", None, None]
    assert got == DATA[5:]


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirect_policy_disallow_is_fatal_hresult_from_win32_with_the_target(
    status: int,
) -> None:
    """bits-core.md §2.2: DISALLOW fails with HRESULT_FROM_WIN32(HTTP_STATUS_MOVED, ...), and
    BITS sets the remote name to the redirect target, which the error carries for the engine
    (as requested, signature and all) while its message shows it redacted."""
    options = RequestOptions(security_flags=SecurityFlags.REDIRECT_POLICY_DISALLOW)

    async def redirect(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, headers={"Location": "/new?sig=SIG-SECRET"})

    async def body(t: HttpTransport) -> tuple[str, TransferError]:
        async with serving({"/old": redirect, "/new": static}) as base:
            with pytest.raises(TransferError) as caught:
                await t.open(f"{base}/old", options)
            return base, caught.value

    base, error = run(body)
    assert error.hresult == hr.hresult_from_win32(status) == 0x80070000 + status
    assert not error.transient
    assert error.context == ErrorContext.REMOTE_FILE
    assert error.redirect_target == f"{base}/new?sig=SIG-SECRET"  # type: ignore[attr-defined]
    assert "SIG-SECRET" not in str(error)
    assert f"{base}/new?sig=<redacted>" in error.message


def test_redirect_policy_disallow_offers_no_target_that_is_not_http() -> None:
    options = RequestOptions(security_flags=SecurityFlags.REDIRECT_POLICY_DISALLOW)

    async def to_a_file(request: web.Request) -> web.StreamResponse:
        return web.Response(status=302, headers={"Location": "file:///etc/passwd"})

    async def body(t: HttpTransport) -> object:
        async with serving({"/old": to_a_file}) as base:
            return await t.stat(f"{base}/old", options)

    error = fails(body)
    assert error.hresult == hr.hresult_from_win32(302)
    assert not error.transient
    assert getattr(error, "redirect_target", None) is None


@pytest.fixture(scope="module")
def tls() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context trusting the server's trustme CA)."""
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


@pytest.mark.parametrize("allowed", [False, True])
def test_an_https_to_http_redirect_needs_allow_https_to_http(
    tls: tuple[ssl.SSLContext, ssl.SSLContext], allowed: bool
) -> None:
    server_ctx, client_ctx = tls
    flags = SecurityFlags.REDIRECT_POLICY_ALLOW_HTTPS_TO_HTTP if allowed else 0

    async def body(t: HttpTransport) -> bytes:
        async with serving({"/f": static}) as plain:

            async def downgrade(request: web.Request) -> web.StreamResponse:
                raise web.HTTPMovedPermanently(f"{plain}/f")

            async with serving({"/f": downgrade}, ssl_context=server_ctx) as secure:
                assert secure.startswith("https://")
                options = RequestOptions(security_flags=flags)
                return await read_all(await t.open(f"{secure}/f", options))

    if allowed:
        assert run(body, ssl_context=client_ctx) == DATA
    else:
        error = fails(body, ssl_context=client_ctx)
        assert error.hresult == hr.BG_E_HTTP_ERROR_301
        assert not error.transient


def test_https_from_an_unknown_ca_is_a_fatal_secure_failure(
    tls: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server_ctx, _ = tls

    async def body(t: HttpTransport) -> object:
        async with serving({"/f": static}, ssl_context=server_ctx) as secure:
            return await t.stat(f"{secure}/f", NO_OPTIONS)

    error = fails(body)  # the system CAs do not know the trustme CA
    assert error.hresult == SECURE_FAILURE == 0x80072F8F
    assert not error.transient


def test_https_with_a_trusted_ca_works(tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_ctx, client_ctx = tls

    async def body(t: HttpTransport) -> bytes:
        async with serving({"/f": static}, ssl_context=server_ctx) as secure:
            return await read_all(await t.open(f"{secure}/f", NO_OPTIONS, offset=10))

    assert run(body, ssl_context=client_ctx) == DATA[10:]


# -- connections and URLs ---------------------------------------------------------------------


def test_a_refused_connection_is_a_transient_connect_failure() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once it is closed

    async def body(t: HttpTransport) -> object:
        return await t.stat(f"http://127.0.0.1:{port}/f", NO_OPTIONS)

    error = fails(body)
    assert error.hresult == hr.BG_E_CONNECT_FAILURE
    assert error.transient
    assert error.context == ErrorContext.GENERAL_TRANSPORT
    assert error.message == (  # plain words, not the client library's
        f"cannot connect to 127.0.0.1:{port} for http://127.0.0.1:{port}/f: Connection refused"
    )


@pytest.mark.parametrize("url", ["ftp://example.org/f", "http://", "not a url"])
def test_an_invalid_url_is_fatal_invalid_arg(url: str) -> None:
    error = fails(lambda t: t.stat(url, NO_OPTIONS))
    assert error.hresult == hr.E_INVALIDARG
    assert not error.transient


# -- headers and credentials ------------------------------------------------------------------


def test_custom_headers_and_basic_credentials_go_with_every_request() -> None:
    seen: list[tuple[str, str | None, str | None]] = []

    async def guarded(request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization")
        seen.append((request.method, request.headers.get("X-Job"), auth))
        if auth != "Basic YWxpY2U6czNjcmV0":  # alice:s3cret
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="t"'})
        return serve_bytes(request)

    credentials = PlainCredentials(
        target=AuthTarget.SERVER, scheme=AuthScheme.BASIC, user_name="alice", password="s3cret"
    )
    with_credentials = RequestOptions(custom_headers=(("X-Job", "42"),), credentials=(credentials,))

    async def body(t: HttpTransport) -> tuple[int | None, bytes, TransferError]:
        async with serving({"/f": guarded}) as base:
            remote = await t.stat(f"{base}/f", with_credentials)
            got = await read_all(await t.open(f"{base}/f", with_credentials, offset=1))
            with pytest.raises(TransferError) as caught:
                await t.stat(f"{base}/f", NO_OPTIONS)
            return remote.size, got, caught.value

    size, got, error = run(body)
    assert (size, got) == (len(DATA), DATA[1:])
    assert seen[:2] == [
        ("HEAD", "42", "Basic YWxpY2U6czNjcmV0"),
        ("GET", "42", "Basic YWxpY2U6czNjcmV0"),
    ]
    assert error.hresult == hr.BG_E_HTTP_ERROR_401
    assert not error.transient


def test_credentials_are_not_sent_to_another_origin_after_a_redirect() -> None:
    seen: list[str | None] = []

    async def record(request: web.Request) -> web.StreamResponse:
        seen.append(request.headers.get("Authorization"))
        return serve_bytes(request)

    credentials = PlainCredentials(
        target=AuthTarget.SERVER, scheme=AuthScheme.BASIC, user_name="alice", password="s3cret"
    )

    async def body(t: HttpTransport) -> bytes:
        async with serving({"/f": record}) as other:

            async def away(request: web.Request) -> web.StreamResponse:
                seen.append(request.headers.get("Authorization"))
                raise web.HTTPTemporaryRedirect(f"{other}/f")

            async with serving({"/f": away}) as base:
                options = RequestOptions(credentials=(credentials,))
                return await read_all(await t.open(f"{base}/f", options))

    assert run(body) == DATA
    assert seen == ["Basic YWxpY2U6czNjcmV0", None]
