"""The BITS upload protocol (``BITS_POST``) over HTTP/HTTPS with aiohttp: upload and
upload-reply jobs (bits-upload.md, MC-BUP). Implements ``core.port.Uploader``.

Rules of this module:

* It only talks to the network: no file I/O, no events. It raises only ``TransferError``;
  every foreign exception goes through ONE table, ``_EXCEPTION_TABLE`` (the same shape as the
  download transport's), every HTTP status and every server ``BITS-Error-Code`` through
  ``failure.is_transient``. One ``aiohttp.ClientSession`` per ``BitsUploader``, created lazily
  inside the running loop; a new loop gets a new session.
* Packets (bits-upload.md §2): every request is ``BITS_POST`` with ``BITS-Packet-Type`` and a
  ``Content-Length`` (0 without a body); one request in flight per session. A new session is
  ``Ping`` (optional, ``ping=True``) -> ``Create-Session`` with ``BITS-Supported-Protocols:
  {7df0354d-249b-430f-820d-3d2a9bef4931}`` -> ``Fragment``\\ s with ``Content-Range: bytes
  a-b/total`` (``Content-Name`` on the first fragment, the one at offset 0) -> ``Close-Session``
  (or ``Cancel-Session``). Every successful reply must be an ``Ack``
  (``BITS-Packet-Type: Ack``), else the peer is not a BITS server:
  ``BG_E_INVALID_SERVER_RESPONSE``.
* Offsets: the server keeps one number per session, the next byte it wants, and returns it in
  ``BITS-Received-Content-Range`` on every Fragment Ack, 200 or 416 (§4.2). ``send(data,
  offset)`` splits ``data`` into fragments of ``fragment_size`` bytes and follows that number:
  when it lands inside ``data`` the upload continues from there (a 416 resync, or a server
  that already had part of the fragment); when it lands outside, ``send`` returns it and the
  caller re-slices. ``send`` always returns the server's latest offset, which is also
  ``session.offset``.
* 413 (Request Entity Too Large): the fragment is halved and resent, never below
  ``min_fragment_size`` (default 64 KiB; Windows stops at 5 KB); the smaller size is kept for
  the rest of the session (``session.fragment_size``). A 413 at the floor raises the 413.
* Re-opening a session (``begin(..., token=...)``, e.g. after a client crash): the protocol has
  no "query status" packet; a server tells its offset only in reply to a Fragment (§4.2). A
  probe fragment without the file's real bytes is NOT safe: if its start happens to equal the
  server's offset the server appends the probe's bytes to the upload. So ``begin`` with a token
  sends a ``Ping`` (what Windows does on resume, MC-BUP 3.1.4.3) carrying the
  ``BITS-Session-Id``. backhaul's own server (``adapters.upload_server``) answers that Ping
  with ``BITS-Received-Content-Range`` (and ``BITS-Reply-URL`` once the upload-reply is
  complete) -- an extension; other peers ignore the extra request header -- and then
  ``session.offset`` is the server's offset and ``offset_known`` is True. Not for an
  upload-reply the server holds whole without a reply URL (its application failed on the
  final fragment): that counts as not told, so the final fragment goes again.
  Against any other server (IIS) ``offset`` stays 0 with ``offset_known`` False: the caller
  sends from its own last acknowledged offset (always <= the server's) and the first Fragment
  Ack tells the truth; that first fragment is at most 64 KiB, so a duplicate costs little. A
  re-opened session whose offset is unknown cannot ``finish()``: send (again) at least the
  file's last bytes first; the server acknowledges duplicates, and for upload-reply that Ack
  carries the reply URL again. A caller whose log holds the Ack of every byte says so with
  ``session.acknowledged(size)`` and finishes (a plain upload: only Close-Session is left).
* ``token`` is the ``BITS-Session-Id``; when the server pinned the session to a node with
  ``BITS-Host-Id`` (web farms, §8) it is ``"<session-id> host=<host-id>"`` (plus
  `` fallback=<seconds>``), so a re-opened session goes back to that node. All packets after
  Create-Session go to the host-id node (same scheme, port and path); after
  ``BITS-Host-Id-Fallback-Timeout`` seconds without progress an error makes the session fall
  back to the original URL, and so does a failed Ping to the node when re-opening (the
  fallback timer cannot survive a crash). The original host typically answers
  BG_E_SESSION_NOT_FOUND then.
* BG_E_SESSION_NOT_FOUND (``500`` + ``BITS-Error-Code: 0x8020001F``: the server expired or lost
  the session) raises ``TransferError(BG_E_SESSION_NOT_FOUND, transient=True)``. The engine
  must then forget the token and begin a NEW session (``token=None``) from offset 0, as
  Windows restarts with Create-Session. Not at a plain upload's Close-Session once every
  byte was acknowledged: the server moved the file into place with its last fragment, and
  a session it lost since leaves nothing to close (``finish()`` returns).
* Errors from the server: the HRESULT comes from ``BITS-Error-Code`` or ``BITS-Error`` (the
  SDK docs and MC-BUP disagree on the name; both are read; hexadecimal with or without
  ``0x``), the context from ``BITS-Error-Context`` (``0x5`` -> REMOTE_FILE, ``0x7`` ->
  REMOTE_APPLICATION, the back-end application of upload-reply); without a code the HTTP
  status becomes ``BG_E_HTTP_ERROR_<status>`` with REMOTE_FILE. Transient or not is
  ``failure.is_transient(code)``. Network errors map as in the download transport.
* Responses are read within the limits the aiohttp transports share (``aiohttp_limits``):
  up to ``MAX_RESPONSE_HEADERS`` header lines of up to ``MAX_HEADER_LINE`` bytes each
  (aiohttp's defaults, 128 lines of 8190 bytes, refuse real servers' answers). A response beyond them, or one aiohttp cannot parse,
  is ``BG_E_INVALID_SERVER_RESPONSE`` in words that say why; an answer's body cut short is
  ``BG_E_CONNECTION_CLOSED`` with the bytes received. Descriptions never carry aiohttp's
  parser wording (its "400, message=..." is a status no server sent) nor a URL's secrets.
* Peers' quirks accepted: no ``BITS-Session-Id`` on later Acks (IIS 6), any case of header
  values, 201 for success, a relative ``BITS-Reply-URL`` with backslashes (IIS 6 sent
  ``BITS-Sessions\\Replies\\{GUID}\\responsefile.bin``): backslashes become slashes and the URL
  is resolved against the URL the fragment was posted to.
* Upload-reply (``reply=True``): the Ack of the final fragment carries ``BITS-Reply-URL``
  (``session.reply_url``); a final Ack without one raises ``BG_E_INVALID_SERVER_RESPONSE``.
  ``finish()`` returns the URL but does NOT send Close-Session yet, because a server deletes
  the reply on Close-Session (§2.4, §6.1) and the engine has not downloaded it: the engine
  downloads the reply (plain GET; the http transport) and then calls ``session.close()``,
  which sends Close-Session. (The port's ``UploadSession`` has no ``close``; see the note
  in the report.) A session never closed is removed by the server's session timeout.
* ``finish()`` for a plain upload requires every byte acknowledged (else BG_E_INVALID_STATE,
  fatal: a Close-Session before the last byte makes the server discard the upload) and sends
  Close-Session. Close-Session and Cancel-Session are resent on network errors and 5xx
  (except BG_E_SESSION_NOT_FOUND), never on 1xx-4xx (MC-BUP 3.1.5.2.1), ``attempts`` times
  with exponential backoff from ``retry_delay``; then the last error is raised. BITS keeps
  trying Cancel-Session for up to 24 h: the engine should call ``abort()`` again later after a
  transient error. ``abort()`` treats BG_E_SESSION_NOT_FOUND and 404 as done (nothing left to
  cancel); ``close()`` treats BG_E_SESSION_NOT_FOUND as done for upload-reply (the reply was
  fetched); ``finish()`` of a plain upload raises it (IIS commits on Close-Session, so the
  upload must start over).
* Zero-byte files cannot be expressed by ``Content-Range`` (bits-upload.md §4.3, UNCONFIRMED
  how Windows does it): a plain upload of 0 bytes is Create-Session then Close-Session (the
  backhaul server then commits an empty file); upload-reply of 0 bytes is refused
  (E_INVALIDARG).
* Options: ``custom_headers`` go with every packet (ours win on a clash); credentials: Basic
  for the SERVER target, preemptively, as the download transport. ``http_method`` is ignored
  (the method is always ``BITS_POST``); redirects are not followed (a 3xx is an error).
  ``proxy``, client certificates and the other auth schemes are not done yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Final

import aiohttp
from aiohttp.http import HttpProcessingError
from multidict import CIMultiDictProxy
from yarl import URL

from backhaul.core import hresult as hr
from backhaul.core.error import TransferError
from backhaul.core.failure import is_transient
from backhaul.core.port import (
    UPLOAD,
    UPLOAD_REPLY,
    PlainCredentials,
    RequestOptions,
    Uploader,
    UploadSession,
    header_block,
)
from backhaul.core.url import redact_url, scrub_text
from backhaul.core.vocabulary import AuthScheme, AuthTarget, ErrorContext
from backhaul.transports.aiohttp_limits import (
    MAX_HEADER_LINE,
    MAX_RESPONSE_HEADERS,
    cut_short_why,
    unreadable_why,
)

__all__ = [
    "DEFAULT_ATTEMPTS",
    "DEFAULT_FRAGMENT_SIZE",
    "DEFAULT_MIN_FRAGMENT_SIZE",
    "DEFAULT_RESPONSE_TIMEOUT",
    "DEFAULT_RETRY_DELAY",
    "MAX_HEADER_LINE",
    "MAX_RESPONSE_HEADERS",
    "METHOD",
    "UPLOAD_PROTOCOL",
    "BitsUploadSession",
    "BitsUploader",
    "format_token",
    "parse_token",
    "resolve_reply_url",
]

METHOD: Final = "BITS_POST"
UPLOAD_PROTOCOL: Final = "{7df0354d-249b-430f-820d-3d2a9bef4931}"
"""The BITS 1.5 upload protocol, the only one in existence."""

DEFAULT_FRAGMENT_SIZE: Final = 1024 * 1024
DEFAULT_MIN_FRAGMENT_SIZE: Final = 64 * 1024
DEFAULT_RESPONSE_TIMEOUT: Final = 300.0
"""MC-BUP 3.1.2: 5 minutes to receive a response; the final Ack of an upload-reply waits for
the server application, which has 5 minutes too."""
DEFAULT_CONNECT_TIMEOUT: Final = 30.0
DEFAULT_ATTEMPTS: Final = 3
DEFAULT_RETRY_DELAY: Final = 1.0
DEFAULT_LIMIT_PER_HOST: Final = 16
DEFAULT_USER_AGENT: Final = "backhaul/0.1"

# Header names (case-insensitive on the wire).
PACKET_TYPE: Final = "BITS-Packet-Type"
SESSION_ID: Final = "BITS-Session-Id"
SUPPORTED_PROTOCOLS: Final = "BITS-Supported-Protocols"
PROTOCOL: Final = "BITS-Protocol"
RECEIVED: Final = "BITS-Received-Content-Range"
REPLY_URL: Final = "BITS-Reply-URL"
HOST_ID: Final = "BITS-Host-Id"
HOST_ID_FALLBACK: Final = "BITS-Host-Id-Fallback-Timeout"
ERROR_CODE: Final = "BITS-Error-Code"
ERROR_CODE_MC_BUP: Final = "BITS-Error"
ERROR_CONTEXT: Final = "BITS-Error-Context"

HTTP_TIMEOUT: Final = hr.hresult_from_win32(hr.ERROR_WINHTTP_TIMEOUT)
"""0x80072EE2: no response byte for ``response_timeout`` seconds. Transient."""
SECURE_FAILURE: Final = hr.hresult_from_win32(hr.ERROR_WINHTTP_SECURE_FAILURE)

_OK: Final = frozenset({200, 201})
_HTTP_SCHEMES: Final = frozenset({"http", "https"})
_SMALL_BODY: Final = 64 * 1024  # an Ack has no body; error bodies up to this are read
_RESYNC_FRAGMENT: Final = 64 * 1024  # first fragment while the server's offset is unknown
_MAX_RESYNCS: Final = 3  # Acks in a row that move the offset backwards inside one send()
_MAX_SESSION_ID: Final = 100  # SDK docs: a session id is at most 100 characters
_TOKEN_RE: Final = re.compile(r"(?P<id>.+?) host=(?P<host>\S+)(?: fallback=(?P<fallback>\d+))?")

# -------------------------------------------------------------------------------------------------
# Errors: ONE table from foreign exceptions to (HRESULT, context); transient from failure
# -------------------------------------------------------------------------------------------------

_T = ErrorContext.GENERAL_TRANSPORT
_R = ErrorContext.REMOTE_FILE

# First match wins, so subclasses come before their bases (as in transports/http.py).
_EXCEPTION_TABLE: Final[tuple[tuple[type[BaseException], int, ErrorContext], ...]] = (
    (aiohttp.ClientConnectorCertificateError, SECURE_FAILURE, _T),
    (ssl.SSLCertVerificationError, SECURE_FAILURE, _T),
    (aiohttp.ClientConnectorSSLError, SECURE_FAILURE, _T),
    (aiohttp.ConnectionTimeoutError, hr.BG_E_CONNECT_FAILURE, _T),
    (aiohttp.ClientConnectorError, hr.BG_E_CONNECT_FAILURE, _T),  # refused, DNS, unreachable
    (aiohttp.ServerTimeoutError, HTTP_TIMEOUT, _T),  # sock_read: no response in time
    (asyncio.TimeoutError, HTTP_TIMEOUT, _T),
    (aiohttp.ServerDisconnectedError, hr.BG_E_CONNECTION_CLOSED, _T),
    (aiohttp.ClientPayloadError, hr.BG_E_CONNECTION_CLOSED, _T),
    (aiohttp.InvalidURL, hr.E_INVALIDARG, _R),
    (aiohttp.NonHttpUrlClientError, hr.E_INVALIDARG, _R),
    (aiohttp.ClientResponseError, hr.BG_E_INVALID_SERVER_RESPONSE, _R),  # unparsable response
    (aiohttp.ClientOSError, hr.BG_E_CONNECTION_CLOSED, _T),  # reset mid-request
    (aiohttp.ClientError, hr.BG_E_CONNECTION_CLOSED, _T),
    (ssl.SSLError, SECURE_FAILURE, _T),
    (OSError, hr.BG_E_CONNECTION_CLOSED, _T),
    (ValueError, hr.E_INVALIDARG, _R),  # a URL or header aiohttp refuses to send
)
_TRANSLATED: Final = tuple(cls for cls, _, _ in _EXCEPTION_TABLE)


def _redact(url: str | URL) -> str:
    """The URL for messages: no user info, secret query values ``<redacted>``."""
    return redact_url(str(url))


def _translate(exc: BaseException, url: str | URL, packet: str) -> TransferError:
    for cls, code, context in _EXCEPTION_TABLE:
        if isinstance(exc, cls):
            return TransferError(
                code,
                f"{packet}: {_described(exc, url)}",
                context=context,
                transient=is_transient(code),
            )
    raise exc


def _described(exc: BaseException, url: str | URL) -> str:
    """The exception in words, scrubbed of the URLs' secrets. aiohttp's response errors are
    not quoted: their text holds the request's real URL (secrets and all) and, when its parser
    refused the response, a status 400 that no server sent."""
    cause = exc.__cause__
    if isinstance(exc, aiohttp.ClientResponseError) and isinstance(cause, HttpProcessingError):
        return f"the server's response headers could not be read from {_redact(url)}: " + (
            unreadable_why(cause)
        )
    if isinstance(exc, aiohttp.ClientPayloadError) and isinstance(cause, HttpProcessingError):
        return f"the response body from {_redact(url)} was cut short: {scrub_text(cause.message)}"
    if isinstance(exc, aiohttp.ClientResponseError):
        detail = f"HTTP {exc.status} {exc.message}".rstrip()
    else:
        detail = str(exc) or type(exc).__name__
    return f"{type(exc).__name__} for {_redact(url)}: {scrub_text(detail)}"


@contextlib.contextmanager
def _translated(url: str | URL, packet: str) -> Iterator[None]:
    try:
        yield
    except _TRANSLATED as exc:
        raise _translate(exc, url, packet) from exc


def _error(
    code: int, message: str, context: ErrorContext = _R, reply: _Reply | None = None
) -> TransferError:
    """``reply``: the response the error is about (its block is the file's last response)."""
    block = reply.block if reply is not None else None
    return TransferError(
        code, message, context=context, transient=is_transient(code), response_headers=block
    )


def _usage(message: str) -> TransferError:
    """A call the engine should not have made: fatal, whatever the table says."""
    return TransferError(hr.E_INVALIDARG, message, context=_T, transient=False)


# -------------------------------------------------------------------------------------------------
# Replies
# -------------------------------------------------------------------------------------------------


class _Reply:
    """What came back for one packet: status and headers (an Ack has no body). ``block``: the
    raw header block (HTTP_RESPONSE_HEADERS)."""

    __slots__ = ("block", "headers", "packet", "reason", "status", "url")

    def __init__(
        self,
        packet: str,
        status: int,
        reason: str,
        headers: CIMultiDictProxy[str],
        url: URL,
        block: str,
    ) -> None:
        self.packet = packet
        self.status = status
        self.reason = reason
        self.headers = headers
        self.url = url
        self.block = block

    @property
    def ok(self) -> bool:
        return self.status in _OK

    def where(self) -> str:
        reason = f" {self.reason}" if self.reason else ""
        return f"{self.packet}: HTTP {self.status}{reason} from {_redact(self.url)}"


def _hex(value: str | None) -> int | None:
    """A hexadecimal header value (``0x8020001F``, ``8020001f``, ``0x5``) or None."""
    if value is None:
        return None
    text = value.strip().lower()
    text = text.removeprefix("0x")
    if not text or len(text) > 8 or any(c not in "0123456789abcdef" for c in text):
        return None
    return int(text, 16)


def _error_of(reply: _Reply) -> TransferError:
    """The TransferError a non-success reply stands for (see the module docstring)."""
    raw = reply.headers.get(ERROR_CODE)
    if raw is None:
        raw = reply.headers.get(ERROR_CODE_MC_BUP)
    code = _hex(raw)
    context_value = _hex(reply.headers.get(ERROR_CONTEXT))
    context = _R
    if context_value == ErrorContext.REMOTE_APPLICATION:
        context = ErrorContext.REMOTE_APPLICATION
    if code is None or code == hr.S_OK:
        valid = 100 <= reply.status <= 599
        code = hr.http_status_hresult(reply.status) if valid else hr.BG_E_INVALID_SERVER_RESPONSE
        detail = ""
    else:
        detail = f" with BITS error {hr.name_of(code)} {hr.format_hresult(code)}"
    if code == hr.BG_E_SESSION_NOT_FOUND:
        detail += " (the server does not know the session: begin a new one)"
    return _error(code, reply.where() + detail, context, reply)


def _protocol_error(reply: _Reply, why: str) -> TransferError:
    return _error(hr.BG_E_INVALID_SERVER_RESPONSE, f"{why} ({reply.where()})", reply=reply)


def _require_ack(reply: _Reply) -> None:
    if reply.headers.get(PACKET_TYPE, "").strip().lower() != "ack":
        raise _protocol_error(reply, "not a BITS Ack (no 'BITS-Packet-Type: Ack')")


def _received(reply: _Reply, size: int) -> int:
    value = reply.headers.get(RECEIVED, "").strip()
    if not (value.isascii() and value.isdigit()):
        raise _protocol_error(reply, f"bad or missing {RECEIVED} {value!r}")
    received = int(value)
    if received > size:
        raise _protocol_error(reply, f"{RECEIVED} {received} is beyond the file size {size}")
    return received


def _same_protocol(value: str) -> bool:
    return value.strip().strip("{}").lower() == UPLOAD_PROTOCOL.strip("{}")


def resolve_reply_url(base: str | URL, value: str) -> str:
    """``BITS-Reply-URL`` as an absolute URL: backslashes become slashes, a relative URL is
    resolved against ``base`` (the URL the fragment was posted to), braces are encoded."""
    text = value.strip().replace("\\", "/")
    return str(URL(str(base)).join(URL(text)))


def format_token(session_id: str, host_id: str | None = None, fallback: int | None = None) -> str:
    """The ``UploadSession.token`` of a session (see the module docstring)."""
    if host_id is None:
        return session_id
    tail = "" if fallback is None else f" fallback={fallback}"
    return f"{session_id} host={host_id}{tail}"


def parse_token(token: str) -> tuple[str, str | None, int | None]:
    """(session id, host id, fallback seconds) of a token made by ``format_token``."""
    match = _TOKEN_RE.fullmatch(token)
    if match is None:
        return token, None, None
    fallback = match["fallback"]
    return match["id"], match["host"], None if fallback is None else int(fallback)


# -------------------------------------------------------------------------------------------------
# The session
# -------------------------------------------------------------------------------------------------


class BitsUploadSession:
    """One BITS upload session (implements ``core.port.UploadSession``).

    ``offset``: the server's next expected byte, as last acknowledged. ``offset_known``: False
    only for a re-opened session whose server did not tell its offset yet. ``reply_url``: the
    absolute reply URL once the final Ack gave one. ``fragment_size``: the current fragment
    size (it shrinks on 413).
    """

    def __init__(
        self,
        uploader: BitsUploader,
        url: URL,
        options: RequestOptions,
        *,
        size: int,
        reply: bool,
        session_id: str,
        host_id: str | None,
        fallback: int | None,
        offset: int,
        offset_known: bool,
    ) -> None:
        self._uploader = uploader
        self._url = url
        self._options = options
        self.size = size
        self.reply = reply
        self.session_id = session_id
        self.host_id = host_id
        self._fallback = fallback
        self.token = format_token(session_id, host_id, fallback)
        self.offset = offset
        self.offset_known = offset_known
        self.reply_url: str | None = None
        self.response_headers: str | None = None  # of the last reply (HTTP_RESPONSE_HEADERS)
        self.fragment_size = uploader.fragment_size
        self._last_progress = time.monotonic()
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"<BitsUploadSession {self.session_id} {_redact(self.target)} "
            f"offset={self.offset}/{self.size}{'' if self.offset_known else '?'}>"
        )

    @property
    def target(self) -> URL:
        """Where packets go: the job's URL, on the host-id node if the server named one."""
        if self.host_id is None:
            return self._url
        return self._url.with_host(self.host_id.strip("[]"))

    def _fall_back(self) -> None:
        self.host_id = None
        self._fallback = None
        self.token = format_token(self.session_id)

    async def _post(
        self,
        packet: str,
        extra: Sequence[tuple[str, str]] = (),
        body: bytes | memoryview | None = None,
        *,
        with_id: bool = True,
    ) -> _Reply:
        headers = [(SESSION_ID, self.session_id), *extra] if with_id else list(extra)
        try:
            reply = await self._uploader._exchange(
                self.target, self._options, packet, headers, body
            )
        except TransferError as exc:
            self._failed(exc)
            raise
        self.response_headers = reply.block
        return reply

    def _failed(self, error: TransferError) -> TransferError:
        """An error while on a host-id node: after the fallback timeout without progress, the
        next packet goes to the original host again (bits-upload.md §3.2, §8)."""
        stalled = time.monotonic() - self._last_progress
        if self.host_id is not None and self._fallback is not None and stalled >= self._fallback:
            self._fall_back()
        return error

    async def _ping(self, *, reopen: bool) -> None:
        """Ping the target. Re-opening, the Ping names the session: backhaul's server then
        tells its offset (module docstring)."""
        extra = [(SESSION_ID, self.session_id)] if reopen else []
        try:
            reply = await self._post("Ping", extra, with_id=False)
        except TransferError as exc:
            if self.host_id is None or exc.context != _T:
                raise
            self._fall_back()  # the node is unreachable: back to the original host
            reply = await self._post("Ping", extra, with_id=False)
        if not reply.ok:
            raise _error_of(reply)
        _require_ack(reply)
        named = reply.headers.get(SESSION_ID, "").strip() == self.session_id
        if reopen and named and RECEIVED in reply.headers:
            offset = _received(reply, self.size)
            reply_url = reply.headers.get(REPLY_URL, "").strip()
            if self.reply and offset == self.size and not reply_url:
                # Every byte is there but no reply: the final Ack never came (the server
                # application failed). Only the final fragment, sent again, makes the server
                # notify it again and answer with the reply URL (§4.1): the offset stays
                # unknown, so the caller sends the file's last bytes.
                return
            self.offset, self.offset_known = offset, True
            if offset == self.size and reply_url:
                self._take_reply_url(reply)

    async def send(self, data: bytes, offset: int) -> int:
        """Send ``data`` at ``offset`` in fragments; return the server's new offset (which
        may lie outside ``data``: then the caller re-slices)."""
        end = offset + len(data)
        if offset < 0 or end > self.size or not data:
            raise _usage(f"bad fragment {offset}+{len(data)} for a {self.size}-byte upload")
        view = memoryview(data)
        pos, resyncs = offset, 0
        while pos < end:
            limit = (
                self.fragment_size
                if self.offset_known
                else min(self.fragment_size, _RESYNC_FRAGMENT)
            )
            n = min(limit, end - pos)
            reply = await self._fragment(view[pos - offset : pos - offset + n], pos)
            if reply.status == 413:
                if n <= self._uploader.min_fragment_size:
                    raise self._failed(_error_of(reply))
                self.fragment_size = max(self._uploader.min_fragment_size, n // 2)
                continue
            if not reply.ok and reply.status != 416:
                raise self._failed(_error_of(reply))
            if reply.ok:
                _require_ack(reply)
            received = _received(reply, self.size)
            if received > self.offset or not self.offset_known:
                self._last_progress = time.monotonic()
            self.offset, self.offset_known = received, True
            if received == self.size:
                self._take_reply_url(reply)
            if received == pos + n:
                pos, resyncs = received, 0
            elif offset <= received < end:
                resyncs = resyncs + 1 if received <= pos else 0
                if resyncs > _MAX_RESYNCS:
                    raise _protocol_error(reply, f"the server keeps asking for byte {received}")
                pos = received
            else:
                return received
        return self.offset

    async def _fragment(self, chunk: memoryview, pos: int) -> _Reply:
        extra = [("Content-Range", f"bytes {pos}-{pos + len(chunk) - 1}/{self.size}")]
        if pos == 0:
            name = self._url.raw_name
            if name:
                extra.append(("Content-Name", name))
        return await self._post("Fragment", extra, chunk)

    def _take_reply_url(self, reply: _Reply) -> None:
        value = reply.headers.get(REPLY_URL, "").strip()
        if value:
            try:
                self.reply_url = resolve_reply_url(reply.url, value)
            except ValueError:
                raise _protocol_error(reply, f"bad {REPLY_URL} {value!r}") from None
        elif self.reply and self.reply_url is None:
            raise _protocol_error(reply, f"the final Ack of an upload-reply has no {REPLY_URL}")

    def acknowledged(self, offset: int) -> None:
        """The caller holds the server's Ack of ``offset`` bytes of this session (its own
        log recorded it): a re-opened session whose offset the server did not tell may then
        finish without sending the last bytes again. A plain upload whose every byte was
        acknowledged has only Close-Session left, perhaps sent before with its answer lost;
        the server answers a repeated one 200, where a fragment of the closed session would
        be "session not found" and start the upload over."""
        if not self.offset_known or offset > self.offset:
            self.offset, self.offset_known = offset, True

    async def finish(self) -> str | None:
        """Plain upload: Close-Session, returns None. Upload-reply: returns the reply URL and
        leaves the session open until ``close()`` (module docstring)."""
        if self.size > 0 and (not self.offset_known or self.offset != self.size):
            known = "" if self.offset_known else " (unknown: send the last bytes again)"
            raise TransferError(
                hr.BG_E_INVALID_STATE,
                f"finish with {self.offset}{known} of {self.size} bytes acknowledged",
                context=_T,
                transient=False,
            )
        if self.reply:
            if self.reply_url is None:
                raise _error(
                    hr.BG_E_INVALID_SERVER_RESPONSE,
                    f"no {REPLY_URL} for the upload-reply to {_redact(self._url)}",
                )
            return self.reply_url
        # The server moved the file into place when its last fragment came (MC-BUP 3.2.5.3.4),
        # and acknowledged all of it: a session it lost or let expire since (its Close-Session
        # "not found") has nothing left to close. An empty file has no fragment: its
        # Close-Session is what commits it.
        await self._final("Close-Session", not_found_ok=self.size > 0)
        return None

    async def close(self) -> None:
        """Close-Session after the reply was downloaded (upload-reply); a plain upload's
        ``finish()`` already did. Idempotent."""
        await self._final("Close-Session", not_found_ok=self.reply)

    async def abort(self) -> None:
        """Cancel-Session, resent on network errors and 5xx (module docstring)."""
        await self._final("Cancel-Session", not_found_ok=True)

    async def _final(self, packet: str, *, not_found_ok: bool) -> None:
        if self._closed:
            return
        attempts, delay = self._uploader.attempts, self._uploader.retry_delay
        last: TransferError | None = None
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(delay * 2 ** (attempt - 1))
            try:
                reply = await self._post(packet)
            except TransferError as exc:
                if not exc.transient:
                    raise
                last = exc
                continue
            if reply.ok:
                self._closed = True
                return
            error = _error_of(reply)
            gone = error.hresult == hr.BG_E_SESSION_NOT_FOUND
            if (gone and not_found_ok) or (packet == "Cancel-Session" and reply.status == 404):
                self._closed = True
                return
            if gone or not 500 <= reply.status <= 599:
                raise error
            last = error
        assert last is not None
        raise last


# -------------------------------------------------------------------------------------------------
# The uploader
# -------------------------------------------------------------------------------------------------


class BitsUploader:
    """BITS uploads and upload-replies over HTTP/1.1 with aiohttp (``core.port.Uploader``).

    ``fragment_size``: bytes per Fragment (default 1 MiB); ``min_fragment_size``: the floor
    when 413 shrinks it. ``response_timeout``: seconds without a response byte before a packet
    fails (transient ``HTTP_TIMEOUT``). ``ping``: send Ping before Create-Session.
    ``attempts`` / ``retry_delay``: Close-Session and Cancel-Session resends. ``ssl_context``:
    trust for HTTPS (default: the system CAs).
    """

    schemes: frozenset[str] = frozenset(_HTTP_SCHEMES)
    capabilities: frozenset[str] = frozenset({UPLOAD, UPLOAD_REPLY})

    def __init__(
        self,
        *,
        fragment_size: int = DEFAULT_FRAGMENT_SIZE,
        min_fragment_size: int = DEFAULT_MIN_FRAGMENT_SIZE,
        response_timeout: float = DEFAULT_RESPONSE_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        ping: bool = True,
        attempts: int = DEFAULT_ATTEMPTS,
        retry_delay: float = DEFAULT_RETRY_DELAY,
        ssl_context: ssl.SSLContext | None = None,
        limit_per_host: int = DEFAULT_LIMIT_PER_HOST,
        user_agent: str = DEFAULT_USER_AGENT,
    ) -> None:
        if not 0 < min_fragment_size <= fragment_size:
            raise ValueError("need 0 < min_fragment_size <= fragment_size")
        if response_timeout <= 0 or connect_timeout <= 0 or retry_delay < 0 or attempts < 1:
            raise ValueError("timeouts must be positive, attempts at least 1")
        self.fragment_size = fragment_size
        self.min_fragment_size = min_fragment_size
        self.attempts = attempts
        self.retry_delay = retry_delay
        self._response_timeout = response_timeout
        self._connect_timeout = connect_timeout
        self._ping = ping
        self._ssl_context = ssl_context
        self._limit_per_host = limit_per_host
        self._user_agent = user_agent
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _current_session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._loop is not loop:
            if self._ssl_context is None:
                self._ssl_context = ssl.create_default_context()
            connector = aiohttp.TCPConnector(
                ssl=self._ssl_context, limit_per_host=self._limit_per_host
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=self._connect_timeout, sock_read=self._response_timeout
                ),
                headers={"User-Agent": self._user_agent, "Accept": "*/*"},
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,
                max_line_size=MAX_HEADER_LINE,
                max_field_size=MAX_HEADER_LINE,
                max_headers=MAX_RESPONSE_HEADERS,
            )
            self._loop = loop
        return self._session

    async def close(self) -> None:
        session, self._session, self._loop = self._session, None, None
        if session is not None and not session.closed:
            await session.close()

    async def _exchange(
        self,
        url: URL,
        options: RequestOptions,
        packet: str,
        extra: Sequence[tuple[str, str]],
        body: bytes | memoryview | None,
    ) -> _Reply:
        """One BITS_POST; the response is read (an Ack has no body) and released."""
        headers = _request_headers(options, [(PACKET_TYPE, packet), *extra])
        if any(name.lower() == "authorization" for name, _ in headers):
            url = url.with_user(None)
        session = self._current_session()
        with _translated(url, packet):
            async with session.request(
                METHOD, url, headers=headers, data=body, allow_redirects=False
            ) as resp:
                read = 0
                while read <= _SMALL_BODY:
                    try:
                        chunk = await resp.content.readany()
                    except aiohttp.ClientPayloadError as exc:
                        raise _cut_short(resp, packet, read, exc) from exc
                    if not chunk:
                        break
                    read += len(chunk)
                else:
                    resp.close()  # a big error body: do not reuse the connection
                block = header_block(resp.version, resp.status, resp.reason, resp.raw_headers)
                return _Reply(packet, resp.status, resp.reason or "", resp.headers, resp.url, block)

    async def begin(
        self,
        url: str,
        options: RequestOptions,
        *,
        size: int,
        token: str | None = None,
        reply: bool = False,
    ) -> BitsUploadSession:
        """Create a session, or with ``token`` re-open one (module docstring)."""
        try:
            target = URL(url)
        except (TypeError, ValueError):
            target = URL()
        if target.scheme not in _HTTP_SCHEMES or not target.host:
            raise _error(hr.E_INVALIDARG, f"not an http or https URL: {_redact(url)}")
        if size < 0:
            raise _usage(f"bad upload size {size}")
        if reply and size == 0:
            raise _usage("an upload-reply of 0 bytes cannot be expressed in BITS fragments")
        if token is not None:
            session_id, host_id, fallback = parse_token(token)
            session = self._session_for(target, options, size, reply, session_id, host_id)
            session._fallback = fallback
            session.token = token
            session.offset_known = size == 0
            await session._ping(reopen=True)
            return session
        if self._ping:
            ping = await self._exchange(target, options, "Ping", (), None)
            if not ping.ok:
                raise _error_of(ping)
            _require_ack(ping)
        created = await self._exchange(
            target, options, "Create-Session", [(SUPPORTED_PROTOCOLS, UPLOAD_PROTOCOL)], None
        )
        if not created.ok:
            raise _error_of(created)
        _require_ack(created)
        session_id = created.headers.get(SESSION_ID, "").strip()
        if not session_id or len(session_id) > _MAX_SESSION_ID or not session_id.isprintable():
            raise _protocol_error(created, f"bad or missing {SESSION_ID} {session_id!r}")
        protocol = created.headers.get(PROTOCOL)
        if protocol is not None and not _same_protocol(protocol):
            raise _error(
                hr.BG_E_CLIENT_SERVER_PROTOCOL_MISMATCH,
                f"the server chose the unknown upload protocol {protocol!r} ({created.where()})",
                reply=created,
            )
        host_id = created.headers.get(HOST_ID, "").strip() or None
        fallback_text = created.headers.get(HOST_ID_FALLBACK, "").strip()
        fallback = (
            int(fallback_text) if fallback_text.isascii() and fallback_text.isdigit() else None
        )
        if host_id is not None and not re.fullmatch(r"[A-Za-z0-9.\-:\[\]%]+", host_id):
            host_id = None  # not a host name or address: ignore it, stay on the original host
        session = self._session_for(target, options, size, reply, session_id, host_id)
        session.response_headers = created.block
        session._fallback = fallback if host_id is not None else None
        session.token = format_token(session_id, host_id, session._fallback)
        if host_id is not None:
            await session._ping(reopen=False)  # Windows checks the node before using it
        return session

    def _session_for(
        self,
        target: URL,
        options: RequestOptions,
        size: int,
        reply: bool,
        session_id: str,
        host_id: str | None,
    ) -> BitsUploadSession:
        return BitsUploadSession(
            self,
            target,
            options,
            size=size,
            reply=reply,
            session_id=session_id,
            host_id=host_id,
            fallback=None,
            offset=0,
            offset_known=True,
        )


def _cut_short(
    resp: aiohttp.ClientResponse, packet: str, read: int, exc: aiohttp.ClientPayloadError
) -> TransferError:
    """BG_E_CONNECTION_CLOSED (transient): the answer's body ended before its end. ``read``:
    the bytes taken so far; aiohttp reports the close before handing back what it still
    buffers, which its count of bytes received includes. aiohttp's text is not quoted: it
    holds a status 400 that no server sent."""
    fed = getattr(resp.content, "total_bytes", None)  # aiohttp 3.x: body bytes received
    received = max(read, fed) if isinstance(fed, int) else read
    why = cut_short_why(_redact(resp.url), received, resp.content_length, exc)
    code = hr.BG_E_CONNECTION_CLOSED
    return TransferError(code, f"{packet}: {why}", context=_T, transient=is_transient(code))


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

    def _ports(
        uploader: BitsUploader, session: BitsUploadSession
    ) -> tuple[Uploader, UploadSession]:
        return uploader, session
