"""The ``http`` / ``https`` transport: BITS downloads over aiohttp.

Rules of this module:

* It only talks to the network: no file I/O, no events, no logging of secrets. It raises only
  ``TransferError``; every foreign exception goes through ONE table, ``_EXCEPTION_TABLE``
  (httpcore style), and every HTTP status through ``failure.is_transient`` (the project's one
  classification table). Only the few codes that table does not know yet are decided here,
  and each says why.
* One ``aiohttp.ClientSession`` per ``HttpTransport``, created lazily inside the running loop,
  so files and jobs on the same host reuse connections. ``close()`` closes it; a transport
  belongs to one event loop at a time (a new loop gets a new session).
* No total timeout: a download may take days. A stall is a socket read that gets no byte for
  ``stall_timeout`` seconds (aiohttp's ``sock_read``), while waiting for the headers or inside
  the body; a slow trickle is not a stall, nor is a slow consumer (aiohttp stops the timer
  while reading is paused). A stall raises ``HTTP_TIMEOUT`` (0x80072EE2,
  ``HRESULT_FROM_WIN32(ERROR_WINHTTP_TIMEOUT)``), the code BITS itself reports when WinHTTP's
  receive timeout fires, rather than BG_E_CONNECTION_CLOSED: the connection did not close, it
  went silent. Transient.
* Bodies are read as they are (``Accept-Encoding: identity``, no decompression), so offsets,
  sizes and ranges always count the bytes of the remote file (bits-core.md §7.7).
* ``stat`` sends HEAD (bits-core.md §7.7). If HEAD is refused (any 4xx/5xx except 401, 403,
  404, 407 and 410) or gives no size, it probes with ``GET Range: bytes=0-0``: a 206 gives the
  size from Content-Range; a 200 gives Content-Length and is closed after the headers; a 416
  with ``bytes */0`` is an empty file.
* The validator of a version is its strong ETag, else its Last-Modified value (a weak ETag
  cannot be used with If-Range), stored as the raw header value.
* ``open`` asks for ``Range: bytes=offset-`` (or ``offset-end`` when a length is given) when
  ``offset > 0`` or a length is given, plus ``If-Range`` with every Range when a (strong)
  validator is given (a range at offset 0 of a changed file is as wrong as one at offset 1).
  Outcomes:

  - 206: its Content-Range must start at the requested offset and stay inside the requested
    range, and Content-Length (if any) must match it, else ``BG_E_INVALID_SERVER_RESPONSE``.
  - 200: the server sent the whole body (it ignores ranges, or If-Range did not match):
    ``Download.offset`` is 0 and ``Download.remote`` describes that version; the engine decides
    to restart. With a length-bounded range (AddFileWithRanges), a 200 is accepted only when the
    validator changed (the file must restart anyway) or when the range starts at 0 and covers
    the whole file; otherwise the server does not honour ranges:
    ``BG_E_INSUFFICIENT_RANGE_SUPPORT`` (fatal).
  - 416 for a length-bounded range: ``BG_E_INVALID_RANGE`` (the range lies outside the file);
    for an open-ended resume it stays ``BG_E_HTTP_ERROR_416``.
  - Dynamic content (``options.dynamic``) and custom HTTP methods (``options.http_method`` other
    than GET, which restart from zero in BITS, §10) send no Range: the body starts at 0.

  A body that ends before its Content-Length / Content-Range length raises
  ``BG_E_CONNECTION_CLOSED`` (transient); the engine resumes at the offset it reached.
* Redirects are followed here, not by aiohttp (at most 10), so that the policy is checked
  before each hop is requested: ``DISALLOW`` and an HTTPS to HTTP downgrade without
  ``ALLOW_HTTPS_TO_HTTP`` raise the redirect's ``BG_E_HTTP_ERROR_3xx``, fatal (a policy refusal
  does not go away by retrying, even for 308); a redirect to anything but http/https is refused
  the same way (HTTP to SMB is never followed, §10), and more than 10 hops raise the last
  redirect's code, classified by failure. ``ALLOW_REPORT`` behaves like
  ``ALLOW_SILENT`` here: ``RemoteFile.url`` is always the final URL, and rewriting the remote
  name is the engine's job. Authorization and Cookie headers are dropped when a redirect leaves
  the origin.
* HTTPS is verified against the system CAs (``ssl.create_default_context()``) unless an
  ``ssl_context`` is passed (tests pass a trustme CA).
* ``options.custom_headers`` go with every request (redirect hops included). Credentials: only
  Basic for the SERVER target is sent, preemptively, to the original origin, and only when the
  custom headers carry no Authorization of their own.

Not done yet (later issues): the other auth schemes (Digest, NTLM, Negotiate, Passport) and
proxy credentials; ``options.proxy`` (connections are always direct, environment proxy
variables are ignored); ``options.client_certificate`` (a Windows certificate store
reference); the ``BG_SSL_IGNORE_*`` and ``ENABLE_CRL_CHECK`` security flags (verification is
always the strict default); multi-range requests; uploads.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import TYPE_CHECKING, Final, Self

import aiohttp
from yarl import URL

from backhaul.core import hresult as hr
from backhaul.core.error import TransferError
from backhaul.core.failure import is_transient
from backhaul.core.port import Download, PlainCredentials, RemoteFile, RequestOptions, Transport
from backhaul.core.vocabulary import (
    REDIRECT_POLICY_MASK,
    AuthScheme,
    AuthTarget,
    ErrorContext,
    SecurityFlags,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_LIMIT_PER_HOST",
    "DEFAULT_STALL_TIMEOUT",
    "DEFAULT_USER_AGENT",
    "HTTP_TIMEOUT",
    "MAX_REDIRECTS",
    "SECURE_FAILURE",
    "HttpDownload",
    "HttpTransport",
]

DEFAULT_CHUNK_SIZE: Final = 1024 * 1024
"""Bytes asked of ``iter_chunked`` per chunk (perf-notes: 1 MiB is the fast size)."""
DEFAULT_STALL_TIMEOUT: Final = 60.0
DEFAULT_CONNECT_TIMEOUT: Final = 30.0
DEFAULT_LIMIT_PER_HOST: Final = 16
"""Connections per host; 16 in flight beat 64 on loopback (perf-notes)."""
DEFAULT_LIMIT: Final = 100
DEFAULT_USER_AGENT: Final = "backhaul/0.1"
MAX_REDIRECTS: Final = 10

# WinHTTP codes BITS reports that core/hresult.py does not register (yet).
_ERROR_WINHTTP_TIMEOUT: Final = 12002
_ERROR_WINHTTP_SECURE_FAILURE: Final = 12175

HTTP_TIMEOUT: Final = hr.hresult_from_win32(_ERROR_WINHTTP_TIMEOUT)
"""0x80072EE2, what BITS reports when WinHTTP's receive timeout fires: our stall. It is not in
failure.TRANSIENT, so it is transient, as BITS retries it."""
SECURE_FAILURE: Final = hr.hresult_from_win32(_ERROR_WINHTTP_SECURE_FAILURE)
"""0x80072F8F, WinHTTP's code for a server certificate that failed verification."""

_WHOLE_BODY: Final = frozenset({200, 203})
_REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})
_HEAD_NOT_REFUSED: Final = frozenset({401, 403, 404, 407, 410})
_RETRY_AFTER_STATUSES: Final = frozenset({429, 503})
_HTTP_SCHEMES: Final = frozenset({"http", "https"})
_CREDENTIAL_HEADERS: Final = frozenset({"authorization", "proxy-authorization", "cookie"})
_SMALL_BODY: Final = 64 * 1024  # error bodies up to this size are read to keep the connection
_DISCARD_SECONDS: Final = 1.0

# -------------------------------------------------------------------------------------------------
# Errors: ONE table from foreign exceptions to (HRESULT, context); transient from failure
# -------------------------------------------------------------------------------------------------

_T = ErrorContext.GENERAL_TRANSPORT
_R = ErrorContext.REMOTE_FILE

# First match wins, so subclasses come before their bases (asyncio.TimeoutError is an OSError;
# ssl.SSLError is an OSError; aiohttp's connector errors are ClientOSErrors). Whether a code is
# transient is not a column: it is failure.is_transient's answer (see _is_transient).
_EXCEPTION_TABLE: Final[tuple[tuple[type[BaseException], int, ErrorContext], ...]] = (
    (aiohttp.ClientConnectorCertificateError, SECURE_FAILURE, _T),
    (ssl.SSLCertVerificationError, SECURE_FAILURE, _T),
    (aiohttp.ClientConnectorSSLError, SECURE_FAILURE, _T),
    (aiohttp.ConnectionTimeoutError, hr.BG_E_CONNECT_FAILURE, _T),
    (aiohttp.ClientConnectorError, hr.BG_E_CONNECT_FAILURE, _T),  # refused, DNS, unreachable
    (aiohttp.ServerTimeoutError, HTTP_TIMEOUT, _T),  # sock_read: the stall detector
    (asyncio.TimeoutError, HTTP_TIMEOUT, _T),
    (aiohttp.ServerDisconnectedError, hr.BG_E_CONNECTION_CLOSED, _T),
    (aiohttp.ClientPayloadError, hr.BG_E_CONNECTION_CLOSED, _T),  # body cut short
    (aiohttp.InvalidURL, hr.E_INVALIDARG, _R),
    (aiohttp.NonHttpUrlClientError, hr.E_INVALIDARG, _R),
    (aiohttp.ClientResponseError, hr.BG_E_INVALID_SERVER_RESPONSE, _R),  # unparsable response
    (aiohttp.ClientOSError, hr.BG_E_CONNECTION_CLOSED, _T),  # reset mid-request
    (aiohttp.ClientError, hr.BG_E_CONNECTION_CLOSED, _T),
    (ssl.SSLError, SECURE_FAILURE, _T),
    (OSError, hr.BG_E_CONNECTION_CLOSED, _T),
    (ValueError, hr.E_INVALIDARG, _R),  # a URL or header aiohttp refuses to send
)


def _is_transient(code: int) -> bool:
    return is_transient(code)


def _redact(url: str | URL) -> str:
    """The URL without user:password, for messages."""
    try:
        parsed = URL(str(url))
    except ValueError:
        return "<invalid URL>"
    return str(parsed.with_user(None)) if parsed.user or parsed.password else str(parsed)


def _translate(exc: BaseException, url: str | URL) -> TransferError:
    for cls, code, context in _EXCEPTION_TABLE:
        if isinstance(exc, cls):
            detail = str(exc) or type(exc).__name__
            return TransferError(
                code,
                f"{type(exc).__name__} for {_redact(url)}: {detail}",
                context=context,
                transient=_is_transient(code),
            )
    raise exc


_TRANSLATED: Final = tuple(cls for cls, _, _ in _EXCEPTION_TABLE)


@contextlib.contextmanager
def _translated(url: str | URL) -> Iterator[None]:
    """Turn every exception of the table into a TransferError (wraps awaits too)."""
    try:
        yield
    except _TRANSLATED as exc:
        raise _translate(exc, url) from exc


def _status_error(resp: aiohttp.ClientResponse, *, code: int | None = None) -> TransferError:
    """``BG_E_HTTP_ERROR_<status>`` (or ``code``), REMOTE_FILE, classified by failure."""
    status = resp.status
    if code is None:
        valid = 100 <= status <= 599
        code = hr.http_status_hresult(status) if valid else hr.BG_E_INVALID_SERVER_RESPONSE
    retry_after = None
    if status in _RETRY_AFTER_STATUSES:
        retry_after = _retry_after(resp.headers.get("Retry-After"), resp.headers.get("Date"))
    reason = f" {resp.reason}" if resp.reason else ""
    return TransferError(
        code,
        f"HTTP {status}{reason} from {_redact(resp.url)}",
        context=ErrorContext.REMOTE_FILE,
        transient=_is_transient(code),
        retry_after=retry_after,
    )


def _protocol_error(resp: aiohttp.ClientResponse, why: str) -> TransferError:
    code = hr.BG_E_INVALID_SERVER_RESPONSE
    return TransferError(
        code,
        f"{why} (HTTP {resp.status} from {_redact(resp.url)})",
        context=ErrorContext.REMOTE_FILE,
        transient=_is_transient(code),
    )


def _digits(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _http_date(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _retry_after(value: str | None, date: str | None) -> float | None:
    """Retry-After as seconds: delta-seconds, or an HTTP-date measured from the response's own
    Date header when it has one (immune to clock skew), else from our clock."""
    if value is None:
        return None
    value = value.strip()
    if _digits(value):
        return float(int(value))
    when = _http_date(value)
    if when is None:
        return None
    now = _http_date(date) or datetime.now(UTC)
    return max(0.0, (when - now).total_seconds())


# -------------------------------------------------------------------------------------------------
# Reading responses
# -------------------------------------------------------------------------------------------------


def _header_block(resp: aiohttp.ClientResponse) -> str:
    return "".join(
        f"{name.decode('utf-8', 'replace')}: {value.decode('utf-8', 'replace')}\r\n"
        for name, value in resp.raw_headers
    )


def _validator(resp: aiohttp.ClientResponse) -> str | None:
    etag = resp.headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return resp.headers.get("Last-Modified") or None


def _accepts_ranges(resp: aiohttp.ClientResponse) -> bool:
    if resp.status == 206:
        return True
    tokens = resp.headers.get("Accept-Ranges", "").lower().replace(",", " ").split()
    return "bytes" in tokens


def _content_length(resp: aiohttp.ClientResponse) -> int | None:
    value = resp.headers.get("Content-Length")
    if value is None or not _digits(value.strip()):
        return None
    return int(value)


def _content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """``bytes start-end/total`` (total may be ``*``) -> (start, end, total); else None."""
    if value is None:
        return None
    unit, _, spec = value.strip().partition(" ")
    span, _, total = spec.strip().partition("/")
    first, _, last = span.partition("-")
    if unit.lower() != "bytes" or not (_digits(first) and _digits(last)):
        return None
    start, end = int(first), int(last)
    if end < start or not (total == "*" or _digits(total)):
        return None
    size = None if total == "*" else int(total)
    if size is not None and end >= size:
        return None
    return start, end, size


def _unsatisfied_size(resp: aiohttp.ClientResponse) -> int | None:
    """The size in a 416's ``Content-Range: bytes */size``."""
    value = resp.headers.get("Content-Range", "").strip()
    unit, _, spec = value.partition(" ")
    if unit.lower() == "bytes" and spec.startswith("*/") and _digits(spec[2:]):
        return int(spec[2:])
    return None


def _remote(
    resp: aiohttp.ClientResponse, size: int | None, validator: str | None = None
) -> RemoteFile:
    last_modified = resp.headers.get("Last-Modified")
    return RemoteFile(
        url=str(resp.url),
        size=size,
        validator=_validator(resp) or validator,
        last_modified=_http_date(last_modified),
        accepts_ranges=_accepts_ranges(resp),
        headers=_header_block(resp),
    )


async def _discard(resp: aiohttp.ClientResponse) -> None:
    """Done with a response whose body we do not want: read a small body so that the connection
    can be reused, otherwise close it."""
    length = _content_length(resp)
    if resp.method != "HEAD" and length is not None and 0 < length <= _SMALL_BODY:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
            async with asyncio.timeout(_DISCARD_SECONDS):
                await resp.read()
    resp.release()  # closes the connection instead when the body was not read to the end


# -------------------------------------------------------------------------------------------------
# The transport
# -------------------------------------------------------------------------------------------------


class HttpDownload:
    """An open GET (a ``core.port.Download``). Iterate once for the body; always ``aclose``
    (or use it as an async context manager)."""

    def __init__(
        self,
        response: aiohttp.ClientResponse,
        remote: RemoteFile,
        offset: int,
        expected: int | None,
        chunk_size: int,
    ) -> None:
        self.remote = remote
        self.offset = offset
        self._response = response
        self._expected = expected  # body bytes the headers promised, when they did
        self._chunk_size = chunk_size
        self._chunks: AsyncGenerator[bytes, None] | None = None
        self._complete = False
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"<HttpDownload {_redact(self.remote.url)} offset={self.offset} "
            f"expected={self._expected}>"
        )

    def __aiter__(self) -> AsyncIterator[bytes]:
        if self._chunks is not None or self._closed:
            raise RuntimeError("a Download can be iterated only once, and not after aclose")
        self._chunks = self._read()
        return self._chunks

    async def _read(self) -> AsyncGenerator[bytes, None]:
        resp, received = self._response, 0
        with _translated(resp.url):
            async for chunk in resp.content.iter_chunked(self._chunk_size):
                received += len(chunk)
                if self._expected is not None and received > self._expected:
                    raise _protocol_error(resp, "more body bytes than the headers announced")
                yield chunk
        if self._expected is not None and received < self._expected:
            code = hr.BG_E_CONNECTION_CLOSED
            raise TransferError(
                code,
                f"connection closed after {received} of {self._expected} body bytes from "
                f"{_redact(resp.url)}",
                context=ErrorContext.GENERAL_TRANSPORT,
                transient=_is_transient(code),
            )
        self._complete = True
        resp.release()  # the whole body was read: the connection goes back to the pool

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._chunks is not None:
            await self._chunks.aclose()
        if self._complete:
            self._response.release()
        else:
            self._response.close()  # an unread body: the connection cannot be reused

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class HttpTransport:
    """BITS-style downloads over HTTP/1.1 with aiohttp. See the module docstring for the rules.

    ``stall_timeout``: seconds without a received byte before a read fails (transient
    ``HTTP_TIMEOUT``). ``connect_timeout``: seconds to open a connection. ``chunk_size``: bytes
    asked per body chunk. ``ssl_context``: trust for HTTPS (default: the system CAs).
    ``limit_per_host`` / ``limit``: connection pool bounds. ``user_agent``: the User-Agent
    header (custom headers may override it).
    """

    schemes: frozenset[str] = frozenset(_HTTP_SCHEMES)

    def __init__(
        self,
        *,
        stall_timeout: float = DEFAULT_STALL_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        ssl_context: ssl.SSLContext | None = None,
        limit_per_host: int = DEFAULT_LIMIT_PER_HOST,
        limit: int = DEFAULT_LIMIT,
        user_agent: str = DEFAULT_USER_AGENT,
    ) -> None:
        if stall_timeout <= 0 or connect_timeout <= 0:
            raise ValueError("timeouts must be positive")
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        self._stall_timeout = stall_timeout
        self._connect_timeout = connect_timeout
        self._chunk_size = chunk_size
        self._ssl_context = ssl_context
        self._limit_per_host = limit_per_host
        self._limit = limit
        self._user_agent = user_agent
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- session ---------------------------------------------------------------------------------

    def _current_session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._loop is not loop:
            if self._ssl_context is None:
                self._ssl_context = ssl.create_default_context()
            connector = aiohttp.TCPConnector(
                ssl=self._ssl_context, limit=self._limit, limit_per_host=self._limit_per_host
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=self._connect_timeout, sock_read=self._stall_timeout
                ),
                headers={"User-Agent": self._user_agent, "Accept-Encoding": "identity"},
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,
            )
            self._loop = loop
        return self._session

    async def close(self) -> None:
        session, self._session, self._loop = self._session, None, None
        if session is not None and not session.closed:
            await session.close()

    # -- requests --------------------------------------------------------------------------------

    async def _request(
        self, method: str, url: str, options: RequestOptions, extra: Sequence[tuple[str, str]]
    ) -> aiohttp.ClientResponse:
        """Send one request and follow redirects under the job's policy. Returns the first
        non-redirect response; the caller owns it."""
        target = URL(url)
        if target.scheme not in _HTTP_SCHEMES or not target.host:
            raise TransferError(
                hr.E_INVALIDARG,
                f"not an http or https URL: {_redact(url)}",
                context=ErrorContext.REMOTE_FILE,
                transient=_is_transient(hr.E_INVALIDARG),
            )
        headers = _request_headers(options, extra)
        if any(name.lower() == "authorization" for name, _ in headers):
            target = target.with_user(None)  # credentials in the URL would clash with them
        origin = target.origin()
        flags = options.security_flags
        policy = flags & REDIRECT_POLICY_MASK
        session = self._current_session()
        for _ in range(MAX_REDIRECTS + 1):
            resp = await session.request(method, target, headers=headers, allow_redirects=False)
            location = resp.headers.get("Location")
            if resp.status not in _REDIRECTS or location is None:
                return resp
            await _discard(resp)
            refusal = _status_error(resp)
            try:
                following = target.join(URL(location))
            except ValueError:
                raise _protocol_error(resp, f"bad redirect Location {location!r}") from None
            if policy == SecurityFlags.REDIRECT_POLICY_DISALLOW:
                raise _refused(refusal, f"redirect to {_redact(following)} is disallowed")
            if following.scheme not in _HTTP_SCHEMES or not following.host:
                raise _refused(refusal, f"redirect to a non-HTTP URL {_redact(following)}")
            if (
                target.scheme == "https"
                and following.scheme == "http"
                and not flags & SecurityFlags.REDIRECT_POLICY_ALLOW_HTTPS_TO_HTTP
            ):
                raise _refused(refusal, f"redirect from HTTPS down to {_redact(following)}")
            if following.origin() != origin:
                headers = [(n, v) for n, v in headers if n.lower() not in _CREDENTIAL_HEADERS]
            target = following
        raise TransferError(
            refusal.hresult,
            f"more than {MAX_REDIRECTS} redirects from {_redact(url)}",
            context=ErrorContext.REMOTE_FILE,
            transient=refusal.transient,
        )

    async def stat(self, url: str, options: RequestOptions) -> RemoteFile:
        with _translated(url):
            head = await self._request("HEAD", url, options, ())
            await _discard(head)
            if head.status in _WHOLE_BODY:
                remote = _remote(head, _content_length(head))
                if remote.size is not None or options.dynamic:
                    return remote
                probed = await self._probe(str(head.url), options, quiet=True)
                return probed if probed is not None and probed.size is not None else remote
            if head.status >= 400 and head.status not in _HEAD_NOT_REFUSED:
                probed = await self._probe(str(head.url), options, quiet=False)
                assert probed is not None  # not quiet: it raises instead
                return probed
            raise _status_error(head)

    async def _probe(self, url: str, options: RequestOptions, *, quiet: bool) -> RemoteFile | None:
        """GET ``Range: bytes=0-0``: the size of a file whose HEAD did not give it. ``quiet``
        returns None instead of raising for an error status."""
        resp = await self._request("GET", url, options, (("Range", "bytes=0-0"),))
        if resp.status == 206:
            span = _content_range(resp.headers.get("Content-Range"))
            await _discard(resp)
            if span is None or span[0] != 0:
                raise _protocol_error(resp, "206 without a valid Content-Range for bytes=0-0")
            return _remote(resp, span[2])
        if resp.status in _WHOLE_BODY:
            resp.close()  # the whole body is coming: keep only the headers
            return _remote(resp, _content_length(resp))
        await _discard(resp)
        if resp.status == 416 and _unsatisfied_size(resp) == 0:
            return _remote(resp, 0)  # an empty file has no byte 0
        if quiet:
            return None
        raise _status_error(resp)

    async def open(
        self,
        url: str,
        options: RequestOptions,
        *,
        offset: int = 0,
        length: int | None = None,
        validator: str | None = None,
    ) -> HttpDownload:
        if offset < 0 or (length is not None and length <= 0):
            raise TransferError(
                hr.E_INVALIDARG,
                f"bad range offset={offset} length={length}",
                context=ErrorContext.REMOTE_FILE,
                transient=_is_transient(hr.E_INVALIDARG),
            )
        method = (options.http_method or "GET").upper()
        ranged = not options.dynamic and method == "GET" and (offset > 0 or length is not None)
        extra: list[tuple[str, str]] = []
        if ranged:
            end = "" if length is None else str(offset + length - 1)
            extra.append(("Range", f"bytes={offset}-{end}"))
            if validator and not validator.startswith("W/"):
                extra.append(("If-Range", validator))
        with _translated(url):
            resp = await self._request(method, url, options, extra)
            try:
                return await self._start(resp, ranged, offset, length, validator)
            except BaseException:
                resp.close()
                raise

    async def _start(
        self,
        resp: aiohttp.ClientResponse,
        ranged: bool,
        offset: int,
        length: int | None,
        validator: str | None,
    ) -> HttpDownload:
        status = resp.status
        if status == 206 and ranged:
            span = _content_range(resp.headers.get("Content-Range"))
            if span is None:
                raise _protocol_error(resp, "206 without a single valid Content-Range")
            start, end, size = span
            if start != offset:
                raise _protocol_error(resp, f"Content-Range starts at {start}, not {offset}")
            if length is not None and end > offset + length - 1:
                raise _protocol_error(resp, f"Content-Range ends at {end}, beyond the range")
            declared = _content_length(resp)
            if declared is not None and declared != end - start + 1:
                raise _protocol_error(resp, "Content-Length does not match Content-Range")
            remote = _remote(resp, size, validator)
            return HttpDownload(resp, remote, offset, end - start + 1, self._chunk_size)
        if status in _WHOLE_BODY:
            remote = _remote(resp, _content_length(resp))
            if ranged and length is not None:
                changed = validator is not None and remote.validator not in (None, validator)
                covers = offset == 0 and remote.size is not None and remote.size <= length
                if not (changed or covers):
                    code = hr.BG_E_INSUFFICIENT_RANGE_SUPPORT
                    raise TransferError(
                        code,
                        f"{_redact(resp.url)} answered a byte-range request with the whole file",
                        context=ErrorContext.REMOTE_FILE,
                        transient=_is_transient(code),
                    )
            return HttpDownload(resp, remote, 0, remote.size, self._chunk_size)
        await _discard(resp)
        if status == 206:
            raise _protocol_error(resp, "206 for a request without Range")
        if status == 416 and ranged and length is not None:
            raise _status_error(resp, code=hr.BG_E_INVALID_RANGE)
        raise _status_error(resp)


def _refused(redirect: TransferError, why: str) -> TransferError:
    """A redirect the policy forbids: the redirect's status code, always fatal."""
    return TransferError(
        redirect.hresult, f"{why} ({redirect.message})", context=redirect.context, transient=False
    )


def _basic_authorization(credentials: Sequence[PlainCredentials]) -> str | None:
    for entry in credentials:
        if entry.target == AuthTarget.SERVER and entry.scheme == AuthScheme.BASIC:
            return aiohttp.encode_basic_auth(entry.user_name or "", entry.password or "")
    return None


def _request_headers(
    options: RequestOptions, extra: Sequence[tuple[str, str]]
) -> list[tuple[str, str]]:
    """Custom headers, then ours; ours replace custom headers of the same name."""
    ours = {name.lower() for name, _ in extra}
    headers = [(n, v) for n, v in options.custom_headers if n.lower() not in ours]
    headers.extend(extra)
    if not any(n.lower() == "authorization" for n, _ in headers):
        authorization = _basic_authorization(options.credentials)
        if authorization is not None:
            headers.append(("Authorization", authorization))
    return headers


if TYPE_CHECKING:  # mypy proves that the classes implement the ports

    def _ports(transport: HttpTransport, download: HttpDownload) -> tuple[Transport, Download]:
        return transport, download
