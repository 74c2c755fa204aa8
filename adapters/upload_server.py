"""A BITS upload server: IIS's BITS server extension as an aiohttp application.

The counterpart of ``transports.bits_upload`` and of Windows BITS clients (bits-upload.md):
Ping, Create-Session, Fragment, Close-Session and Cancel-Session on ``BITS_POST``; upload and
upload-reply; the settings of an IIS virtual directory (§7) on ``VirtualDirectory``.

``BITS_POST`` and aiohttp
    aiohttp's default request parser is the C extension (llhttp), which refuses any method it
    does not know, ``BITS_POST`` included, with ``400 Invalid method`` before routing
    (bits-upload.md §12). aiohttp's pure-Python parser, ``http_parser.HttpRequestParserPy``,
    accepts every RFC 9110 token as a method. Three ways out were weighed:
    ``AIOHTTP_NO_EXTENSIONS=1`` (process-wide, must be set before aiohttp is imported, slows
    every client and server in the process), assigning ``web_protocol.HttpRequestParser``
    (a process-wide monkey-patch of aiohttp's module) and a per-server parser. This module
    does the last: ``BitsAppRunner`` is a ``web.AppRunner`` whose ``web.Server`` builds
    ``BitsRequestHandler``\\ s, a ``web_protocol.RequestHandler`` subclass that swaps in the
    pure-Python parser with the same limits. Only the connections of this server change; the
    rest of the process keeps the fast parser. It leans on aiohttp internals
    (``RequestHandler._parser``, ``Server._kwargs``): tests pin it (a raw socket sends
    ``BITS_POST`` and gets an Ack, GET/HEAD still work, and the plain ``AppRunner`` is shown
    to refuse ``BITS_POST``). ``serve_uploads`` (and ``serve_app`` for any app) use it.

Sessions
    One directory per session under ``UploadServerConfig.session_dir`` (outside every virtual
    directory, so it is never uploaded into nor served): ``session.json`` (the state, written
    atomically: temp file + rename), ``progress`` (the offset and the last-touched time, a
    20-byte record with a CRC rewritten in place after every fragment: a rename per fragment
    makes ext4 start writeback of the session every time, which tripled the wall time of a
    1 GiB upload), ``request.bin`` (the upload being assembled) and ``reply.bin`` (the reply
    of an upload-reply). State is read from disk on every packet, so it survives a restart;
    a torn progress record is ignored (the offset in ``session.json`` is older, never ahead:
    the client resends a little more). The offset is the only bookkeeping (§4.1): a fragment
    starting beyond it is a gap (416 with ``BITS-Received-Content-Range``, nothing written);
    one ending before it is a duplicate (200, idempotent); an overlap writes only the new
    bytes; bytes of a fragment cut short by a dropped connection are kept (fsynced, then
    claimed), so the client resumes from where the bytes stopped. A Ping that names a known session gets
    ``BITS-Received-Content-Range`` too, and ``BITS-Reply-URL`` when the upload-reply is done
    (a backhaul extension, see ``transports.bits_upload``); not while the session has every
    byte but its final fragment was refused (the notification or the commit failed): only that
    fragment, sent again, retries them (§4.1), and an offset of "all" would tell the client
    there is nothing left to send.

    On the last byte: with no notification the file is renamed into place at once
    (atomically: ``os.replace``, or ``os.link`` when overwriting is refused, fsync of file
    and directory), as BITS's docs describe (bits-core.md §3); with a notification the
    back-end application is POSTed first (by reference: ``BITS-Request-DataFile-Name`` /
    ``BITS-Response-DataFile-Name``; by value: the file is the body), its answer becomes the
    reply (``reply.bin``, served with GET/HEAD and ranges at ``BITS-Reply-URL``, or its
    ``BITS-Static-Response-URL``), and the upload is copied to its destination only if it said
    ``BITS-Copy-File-To-Destination``. A repeated final fragment (lost Ack) is answered again
    with the same reply URL; if the notification failed it is retried. Close-Session deletes
    the session's files (a partial upload is discarded) and leaves a tombstone so that a
    repeated Close-Session is answered 200; Cancel-Session deletes the partial upload and the
    reply. Sessions (and tombstones) untouched for the virtual directory's ``session_timeout``
    are removed by a cleanup task every ``cleanup_interval`` seconds and ignored before that.

Errors
    Every refusal is ``BITS-Packet-Type: Ack`` with ``BITS-Error-Code`` (``0x%08X``) and
    ``BITS-Error-Context`` (``0x5`` the server, ``0x7`` the back-end application) and an empty
    body (§1.5): 400 ``E_INVALIDARG`` for malformed packets, 403 ``E_ACCESSDENIED`` for an
    existing destination without ``allow_overwrite`` (MC-BUP's form; the SDK docs say 409) and
    for paths the server refuses, 404 for URLs outside every virtual directory, 413 for a
    fragment above ``max_fragment_size``, 500 ``BG_E_TOO_LARGE`` above ``max_upload_size``,
    500 ``BG_E_SESSION_NOT_FOUND``, 501 ``E_ACCESSDENIED`` on a disabled virtual directory,
    500 ``HRESULT_FROM_WIN32(ERROR_DISK_FULL)`` when the disk is full, and the back-end's own
    status with ``BG_E_HTTP_ERROR_<status>`` and context 0x7 when the application fails (408 +
    ``0x80070112`` when it times out, 502 when it cannot be reached). The 416 resync carries
    no error code (MC-BUP <4>).

Security (bits-upload.md §9)
    Paths come from the request URL only (never ``Content-Name``): every segment is checked
    (no ``..``, ``.``, empty segments, ``\\ / : * ? " < > |``, control characters), the
    parent directory is resolved and must lie inside the virtual directory's root (a symlink
    leading out is 403), ``BITS-Sessions`` is never a destination, and a destination that is a
    directory or a symlink is refused. The final rename is done relative to a directory handle
    opened component by component from the root with ``O_NOFOLLOW``, so a directory swapped
    for a symlink after the check makes the commit fail (403) instead of writing outside.
    An existing file is never opened for writing: the upload is assembled in the session
    directory and published with ``os.link`` (refused overwrite: the file stays as it was) or
    ``os.replace`` (atomic).

    The notification target: a relative notification URL resolves against the upload URL's
    path on the listener that received the final fragment (its scheme and the socket's local
    address and port), never against the client's ``Host`` header, from which aiohttp builds
    ``request.url``: a client must not choose where the server POSTs its uploads (nor, by
    reference, learn the server's local paths) (§6.2, §9).

    One active session per destination: only one session at a time may receive bytes for a
    destination file. A Create-Session for a destination whose session is active (a request of
    it is being handled, or it received one in the last ``claim_timeout`` seconds, 30 by
    default) is refused with ``409 Conflict`` + ``HRESULT_FROM_WIN32(ERROR_SHARING_VIOLATION)``
    (``0x80070020``, transient for BITS clients: they retry later); the SDK docs list 409 for a
    Create-Session whose destination is taken. A session idle for longer is superseded by the
    new one: it is cancelled (partial upload deleted, tombstone kept until its own timeout), so
    its client gets BG_E_SESSION_NOT_FOUND and starts over, and meets the 409 while the new
    session is active. (Refusing until the old session's timeout, 14 days by default, would
    lock a destination for that long after a client vanished.) The destination is free again
    once its session committed, was closed, cancelled or expired.

    ``UploadServerConfig.max_sessions`` bounds the live sessions of the server (IIS has
    ``BITSNumberOfSessionsLimit`` per user, §5.2/§7; the spec names no error for it): beyond
    it Create-Session gets ``503 Service Unavailable`` + ``BG_E_HTTP_ERROR_503``
    (``0x801901F7``, transient: the 5xx rule of §6.3) with ``Retry-After``. Sessions count
    from Create-Session until Close-Session, Cancel-Session or their timeout. Both checks
    keep their index in memory (rebuilt from the session directory at start-up): several
    server processes must not share one ``session_dir``.

    Limits: a header value above 4 KB or a request head (request line and headers) above
    ``max_header_bytes`` (16 KiB, http.sys's MaxRequestBytes) is 400 ``E_INVALIDARG``; the
    parser itself refuses lines above 8190 bytes and more than 128 header lines (a plain 400
    and the connection is closed); fragment bodies above ``max_fragment_size`` are 413.

    Authentication: HTTP Basic (``BasicAuth``, users with plain or ``{SHA}`` passwords, e.g.
    from an nginx-style password file), for the whole server (``UploadServerConfig.auth``) or
    per virtual directory (``VirtualDirectory.auth``, which wins). Without valid credentials
    every request (BITS_POST and the GET/HEAD of replies) gets ``401`` with
    ``WWW-Authenticate: Basic realm="..."`` and, on BITS_POST, ``BITS-Packet-Type: Ack``
    without an error code (IIS answers 401 before its BITS extension runs); the handler never
    reads the body of an unauthenticated request and the connection is closed after the answer
    (aiohttp's lingering close discards what the client still sends, for at most 10 s, so that
    the client gets to read the 401 before the socket is reset). A session belongs to the
    user who created it: another user naming it gets BG_E_SESSION_NOT_FOUND. Basic sends the
    password in clear: serve over HTTPS (``ssl_context``) beyond loopback.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import enum
import errno
import hashlib
import hmac
import json
import os
import re
import shutil
import struct
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import aiohttp
import attrs
from aiohttp import web, web_protocol
from aiohttp.http_parser import HttpRequestParserPy
from yarl import URL

from backhaul.core import hresult as hr

__all__ = [
    "UPLOAD_SERVER",
    "BasicAuth",
    "BitsAppRunner",
    "BitsRequestHandler",
    "NotificationType",
    "UploadServer",
    "UploadServerConfig",
    "VirtualDirectory",
    "make_upload_app",
    "serve_app",
    "serve_uploads",
]

UPLOAD_PROTOCOL: Final = "{7df0354d-249b-430f-820d-3d2a9bef4931}"
SESSIONS_SEGMENT: Final = "BITS-Sessions"
REPLY_NAME: Final = "responsefile.bin"
DEFAULT_MAX_UPLOAD_SIZE: Final = 2**64 - 1
DEFAULT_MAX_FRAGMENT_SIZE: Final = 30_000_000  # IIS 7's maxAllowedContentLength default
DEFAULT_SESSION_TIMEOUT: Final = 1_209_600.0  # BITSSessionTimeout: 14 days
DEFAULT_CLEANUP_INTERVAL: Final = 43_200.0  # IIS's cleanup task: every 12 hours
DEFAULT_NOTIFICATION_TIMEOUT: Final = 300.0  # MC-BUP back-end timers: 5 minutes
DEFAULT_FALLBACK_TIMEOUT: Final = 86_400  # BITSHostIdFallbackTimeout: 1 day
NOTIFICATION_TIMEOUT_CODE: Final = 0x80070112  # MC-BUP 3.3.6's literal value, context 0x7
MAX_HEADER_VALUE: Final = 4096
DEFAULT_MAX_HEADER_BYTES: Final = 16 * 1024  # http.sys MaxRequestBytes: request line + headers
DEFAULT_CLAIM_TIMEOUT: Final = 30.0
SESSION_BUSY: Final = hr.hresult_from_win32(hr.ERROR_SHARING_VIOLATION)  # 409: 0x80070020
TOO_MANY_SESSIONS: Final = hr.BG_E_HTTP_ERROR_503  # 503: 0x801901F7
MAX_REPLY_URL: Final = 2200
DISK_FULL: Final = hr.hresult_from_win32(hr.ERROR_DISK_FULL)
PATH_NOT_FOUND: Final = hr.hresult_from_win32(hr.ERROR_PATH_NOT_FOUND)

CONTEXT_SERVER: Final = 0x5  # BG_ERROR_CONTEXT_REMOTE_FILE
CONTEXT_APPLICATION: Final = 0x7  # BG_ERROR_CONTEXT_REMOTE_APPLICATION

_CHUNK: Final = 256 * 1024
PROGRESS_NAME: Final = "progress"
_PROGRESS: Final = struct.Struct("<QdI")  # received, touched, CRC-32 of the first 16 bytes
_DRAIN_LIMIT: Final = 64 * 1024 * 1024  # unread bodies up to this are drained, else closed
_BAD_SEGMENT: Final = re.compile(r'[\\/:*?"<>|\x00-\x1f\x7f]')
_SESSION_ID: Final = re.compile(
    r"\{([0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12})\}"
)
_GUID: Final = re.compile(r"[0-9A-F]{8}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{12}")
_RANGE: Final = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+)", re.IGNORECASE)
_PACKETS: Final = frozenset(
    {"ping", "create-session", "fragment", "close-session", "cancel-session"}
)


# =================================================================================================
# Configuration
# =================================================================================================


class NotificationType(enum.IntEnum):
    """``BITSServerNotificationType``."""

    NONE = 0
    BY_REFERENCE = 1
    BY_VALUE = 2


class BasicAuth:
    """HTTP Basic authentication: ``users`` maps a user name to its password, in plain text
    or as ``{SHA}<base64 SHA-1>`` (``htpasswd -s``, nginx). ``realm`` goes into
    ``WWW-Authenticate``. Never printed with the passwords."""

    __slots__ = ("_users", "realm")

    def __init__(self, users: Mapping[str, str], realm: str = "BITS uploads") -> None:
        if not users:
            raise ValueError("BasicAuth needs at least one user")
        if '"' in realm or "\\" in realm or not realm.isprintable():
            raise ValueError(f"bad realm {realm!r}")
        for user, secret in users.items():
            if not user or ":" in user or not user.isprintable():
                raise ValueError(f"bad user name {user!r}")
            if secret.startswith(("$", "{")) and not secret.startswith(("{SHA}", "{PLAIN}")):
                raise ValueError(f"user {user!r}: only plain and {{SHA}} passwords are supported")
        self._users: Mapping[str, str] = MappingProxyType(dict(users))
        self.realm = realm

    def __repr__(self) -> str:
        return f"BasicAuth(<{len(self._users)} users>, realm={self.realm!r})"

    @classmethod
    def from_lines(cls, lines: Iterable[str], realm: str = "BITS uploads") -> BasicAuth:
        """``user:password`` lines (``#`` comments and blank lines ignored)."""
        users: dict[str, str] = {}
        for number, line in enumerate(lines, 1):
            text = line.rstrip("\r\n")
            if not text.strip() or text.lstrip().startswith("#"):
                continue
            user, sep, secret = text.partition(":")
            if not sep:
                raise ValueError(f"line {number}: want user:password")
            users[user.strip()] = secret
        return cls(users, realm)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], realm: str = "BITS uploads") -> BasicAuth:
        with open(path, encoding="utf-8") as fh:
            return cls.from_lines(fh, realm)

    @property
    def challenge(self) -> str:
        return f'Basic realm="{self.realm}", charset="UTF-8"'

    def authenticate(self, authorization: str | None) -> str | None:
        """The user an ``Authorization`` header proves, else None."""
        if authorization is None:
            return None
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            raw = base64.b64decode(token.strip(), validate=True)
        except (binascii.Error, ValueError):
            return None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        user, sep, password = text.partition(":")
        if not sep:
            return None
        secret = self._users.get(user)
        ok = _password_matches(secret if secret is not None else "{PLAIN}\0", password)
        return user if ok and secret is not None else None


def _password_matches(secret: str, password: str) -> bool:
    given = password.encode("utf-8")
    if secret.startswith("{SHA}"):
        digest = base64.b64encode(hashlib.sha1(given).digest()).decode()
        return hmac.compare_digest(digest.encode(), secret[5:].encode())
    expected = secret.removeprefix("{PLAIN}").encode("utf-8")
    return hmac.compare_digest(hashlib.sha256(given).digest(), hashlib.sha256(expected).digest())


def _prefix(value: str) -> str:
    parts = [p for p in value.split("/") if p]
    if any(p in (".", "..") or _BAD_SEGMENT.search(p) for p in parts):
        raise ValueError(f"bad virtual directory prefix {value!r}")
    return "/" + "/".join(parts)


@attrs.frozen
class VirtualDirectory:
    """An upload-enabled URL prefix and the IIS settings of it (bits-upload.md §7).

    ``prefix`` ("/uploads") maps to ``directory``; ``enabled`` is BITSUploadEnabled;
    ``max_upload_size`` BITSMaximumUploadSize; ``allow_overwrite`` BITSAllowOverwrites;
    ``session_timeout`` BITSSessionTimeout (seconds); ``notification`` /
    ``notification_url`` BITSServerNotificationType / URL (relative URLs resolve against the
    upload URL's path on this server's listener, never the client's Host header);
    ``host_id`` / ``host_id_fallback_timeout`` BITSHostId / BITSHostIdFallbackTimeout.
    ``auth``: HTTP Basic for this directory (else the server's).
    """

    prefix: str = attrs.field(converter=_prefix)
    directory: Path = attrs.field(converter=Path)
    enabled: bool = True
    max_upload_size: int = DEFAULT_MAX_UPLOAD_SIZE
    allow_overwrite: bool = False
    session_timeout: float = DEFAULT_SESSION_TIMEOUT
    notification: NotificationType = attrs.field(
        default=NotificationType.NONE, converter=NotificationType
    )
    notification_url: str | None = None
    host_id: str | None = None
    host_id_fallback_timeout: int = DEFAULT_FALLBACK_TIMEOUT
    auth: BasicAuth | None = attrs.field(default=None, eq=False)

    def __attrs_post_init__(self) -> None:
        if self.notification != NotificationType.NONE and not self.notification_url:
            raise ValueError(f"{self.prefix}: a notification needs a notification_url")
        if self.max_upload_size < 0 or self.session_timeout <= 0:
            raise ValueError(f"{self.prefix}: bad size limit or session timeout")

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(p for p in self.prefix.split("/") if p)


def _vdirs(value: Any) -> tuple[VirtualDirectory, ...]:
    return tuple(value)


@attrs.frozen
class UploadServerConfig:
    """The server: where sessions live, its virtual directories and server-wide limits.

    ``max_fragment_size``: the largest request body (IIS's maxAllowedContentLength); a bigger
    fragment gets 413 and the client shrinks its fragments. ``fsync``: flush every fragment
    before acknowledging it. ``clock``: wall-clock seconds (session timeouts survive restarts).
    ``auth``: HTTP Basic for every virtual directory without its own. ``max_sessions``: live
    sessions at most (None: no limit), beyond it Create-Session is 503. ``max_header_bytes``:
    the largest request head (request line and headers), beyond it 400. ``claim_timeout``:
    seconds after its last request during which a session keeps its destination from a new
    Create-Session (409); after that a new session supersedes it.
    """

    session_dir: Path = attrs.field(converter=Path)
    vdirs: tuple[VirtualDirectory, ...] = attrs.field(converter=_vdirs)
    max_fragment_size: int = DEFAULT_MAX_FRAGMENT_SIZE
    cleanup_interval: float = DEFAULT_CLEANUP_INTERVAL
    notification_timeout: float = DEFAULT_NOTIFICATION_TIMEOUT
    fsync: bool = True
    clock: Callable[[], float] = attrs.field(default=time.time, eq=False)
    auth: BasicAuth | None = attrs.field(default=None, eq=False)
    max_sessions: int | None = None
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    claim_timeout: float = DEFAULT_CLAIM_TIMEOUT

    def __attrs_post_init__(self) -> None:
        prefixes = [v.prefix for v in self.vdirs]
        if len(set(prefixes)) != len(prefixes):
            raise ValueError("virtual directory prefixes must be unique")
        if self.max_fragment_size <= 0 or self.cleanup_interval <= 0:
            raise ValueError("max_fragment_size and cleanup_interval must be positive")
        if self.max_sessions is not None and self.max_sessions <= 0:
            raise ValueError("max_sessions must be positive (or None)")
        if self.max_header_bytes < 1024:
            raise ValueError("max_header_bytes must be at least 1024")
        if self.claim_timeout < 0:
            raise ValueError("claim_timeout must not be negative")


# =================================================================================================
# BITS_POST: the pure-Python request parser for this server only
# =================================================================================================


class BitsRequestHandler(web_protocol.RequestHandler):
    """aiohttp's connection handler with the pure-Python request parser, which accepts
    extension methods such as ``BITS_POST`` (module docstring)."""

    __slots__ = ()

    def __init__(
        self,
        manager: web.Server,
        *,
        loop: asyncio.AbstractEventLoop,
        auto_decompress: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, loop=loop, auto_decompress=auto_decompress, **kwargs)
        self._parser = HttpRequestParserPy(
            self,
            loop,
            self._read_bufsize,
            max_line_size=self.max_line_size,
            max_field_size=self.max_field_size,
            max_headers=self.max_headers,
            payload_exception=web_protocol.RequestPayloadError,
            auto_decompress=auto_decompress,
            max_msg_queue_size=web_protocol.MAX_MSG_QUEUE_SIZE,
        )


class _BitsServer(web.Server):
    def __call__(self) -> web_protocol.RequestHandler:
        return BitsRequestHandler(self, loop=self._loop, **self._kwargs)


class BitsAppRunner(web.AppRunner):
    """``web.AppRunner`` whose connections accept ``BITS_POST``."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        return _BitsServer(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=asyncio.get_running_loop(),
            **server._kwargs,
        )


@contextlib.asynccontextmanager
async def serve_app(
    app: web.Application, host: str = "127.0.0.1", port: int = 0, **site_kwargs: Any
) -> AsyncIterator[str]:
    """Run ``app`` with ``BitsAppRunner`` on host:port (0: a free port); yields its base URL."""
    runner = BitsAppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, **site_kwargs)
        await site.start()
        bound_host, bound_port = runner.addresses[0][:2]
        scheme = "https" if site_kwargs.get("ssl_context") else "http"
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        yield f"{scheme}://{shown}:{bound_port}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def serve_uploads(
    config: UploadServerConfig, host: str = "127.0.0.1", port: int = 0, **site_kwargs: Any
) -> AsyncIterator[str]:
    """The upload server on host:port (0: a free port); yields its base URL."""
    async with serve_app(make_upload_app(config), host, port, **site_kwargs) as url:
        yield url


# =================================================================================================
# Sessions on disk
# =================================================================================================

RECEIVING: Final = "receiving"  # fragments arriving
RECEIVED: Final = "received"  # every byte here; commit / notification still to do
DONE: Final = "done"  # committed and/or notified; a reply may wait to be downloaded
CLOSED: Final = "closed"  # tombstone after Close-Session
CANCELLED: Final = "cancelled"  # tombstone after Cancel-Session
_LIVE: Final = frozenset({RECEIVING, RECEIVED, DONE})


@attrs.define
class _Session:
    id: str
    vdir: str
    path: str  # the decoded URL path the session was created for
    relative: str  # destination below the virtual directory, POSIX form
    url: str  # the upload URL as the client sent it
    created: float
    touched: float
    total: int | None = None
    received: int = 0
    state: str = RECEIVING
    reply: str | None = None  # "file" (reply.bin) or an absolute static URL
    owner: str | None = None  # the authenticated user who created it (None: no auth)

    @property
    def guid(self) -> str:
        return self.id.strip("{}").upper()


class _Store:
    def __init__(self, root: Path, fsync: bool) -> None:
        self.root = root
        self.fsync = fsync

    def directory(self, session: _Session | str) -> Path:
        guid = session.guid if isinstance(session, _Session) else session
        return self.root / guid

    def data(self, session: _Session) -> Path:
        return self.directory(session) / "request.bin"

    def reply(self, session: _Session) -> Path:
        return self.directory(session) / "reply.bin"

    def load(self, session_id: str) -> _Session | None:
        match = _SESSION_ID.fullmatch(session_id.strip())
        if match is None:
            return None
        return self._read(self.directory(match[1].upper()) / "session.json")

    def _read(self, path: Path) -> _Session | None:
        try:
            raw = json.loads(path.read_text("utf-8"))
            session = _Session(**raw)
        except (OSError, ValueError, TypeError):
            return None
        progress = self._progress(path.with_name(PROGRESS_NAME))
        if progress is not None and progress[0] >= session.received:
            session.received = progress[0]
            session.touched = max(session.touched, progress[1])
        return session

    @staticmethod
    def _progress(path: Path) -> tuple[int, float] | None:
        """(received, touched) of a progress record, None when missing or torn."""
        try:
            with open(path, "rb") as fh:
                raw = fh.read(_PROGRESS.size)
        except OSError:
            return None
        if len(raw) != _PROGRESS.size:
            return None
        received, touched, check = _PROGRESS.unpack(raw)
        if check != zlib.crc32(raw[:16]):
            return None
        return received, touched

    def claim(self, session: _Session) -> None:
        """Record ``received`` and ``touched`` in the session's progress record: a 20-byte
        write in place (no rename, so no forced writeback), after the data (fsync mode: both
        flushed, the data first, so the record never claims bytes that are not on disk)."""
        head = struct.pack("<Qd", session.received, session.touched)
        record = head + struct.pack("<I", zlib.crc32(head))
        fd = os.open(self.directory(session) / PROGRESS_NAME, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.pwrite(fd, record, 0)
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def create(self, session: _Session) -> None:
        folder = self.directory(session)
        folder.mkdir(parents=True, mode=0o700)
        self.data(session).touch(mode=0o600)
        self.save(session)

    def save(self, session: _Session) -> None:
        folder = self.directory(session)
        temp = folder / "session.json.tmp"
        with open(temp, "w", encoding="utf-8") as fh:
            json.dump(attrs.asdict(session), fh)
            fh.flush()
            if self.fsync:
                os.fsync(fh.fileno())
        os.replace(temp, folder / "session.json")
        if self.fsync:
            _fsync_directory(folder)

    def discard_files(self, session: _Session) -> None:
        for path in (self.data(session), self.reply(session)):
            path.unlink(missing_ok=True)

    def remove(self, guid: str) -> None:
        shutil.rmtree(self.directory(guid), ignore_errors=True)

    def all(self) -> list[tuple[str, _Session | None]]:
        if not self.root.is_dir():
            return []
        found = []
        for entry in self.root.iterdir():
            if entry.is_dir() and _GUID.fullmatch(entry.name):
                found.append((entry.name, self._read(entry / "session.json")))
        return found


def _write_all(fd: int, chunks: list[bytes | memoryview], offset: int) -> int:
    """``os.pwritev`` until every byte of ``chunks`` is at ``offset``; returns the count."""
    views = [memoryview(c) for c in chunks]
    total = 0
    while views:
        n = os.pwritev(fd, views, offset + total)
        total += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]
    return total


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_directory(root: Path, parts: tuple[str, ...]) -> int:
    """A handle on ``root/parts...``, opened one component at a time with ``O_NOFOLLOW``: a
    component that is (now) a symlink fails with ELOOP, one that is not a directory with
    ENOTDIR."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    fd = os.open(root, flags)
    try:
        for part in parts:
            inner = os.open(part, flags | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = inner
    except BaseException:
        os.close(fd)
        raise
    return fd


def _place(
    source: Path, root: Path, parts: tuple[str, ...], name: str, *, overwrite: bool, durable: bool
) -> None:
    """Move ``source`` to ``root/parts.../name`` atomically, relative to a directory handle
    opened without following symlinks (``_open_directory``): ``os.replace`` when overwriting,
    else ``os.link`` (fails if the name exists, even as a dangling symlink; no window). Across
    file systems the data is first copied to a temp file beside the destination. Raises
    FileExistsError, or OSError ELOOP / ENOTDIR when a directory was swapped for a symlink."""
    directory = _open_directory(root, parts)
    try:

        def publish(path: str, path_dir: int | None) -> None:
            if overwrite:
                os.replace(path, name, src_dir_fd=path_dir, dst_dir_fd=directory)
            else:
                os.link(path, name, src_dir_fd=path_dir, dst_dir_fd=directory)
                os.unlink(path, dir_fd=path_dir)

        try:
            publish(str(source), None)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            temp = f".{name}.{uuid.uuid4().hex[:12]}.bits-tmp"
            out = os.open(
                temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=directory
            )
            try:
                with open(out, "wb") as dst, open(source, "rb") as src:
                    shutil.copyfileobj(src, dst, _CHUNK)
                    dst.flush()
                    if durable:
                        os.fsync(dst.fileno())
                publish(temp, directory)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp, dir_fd=directory)
            source.unlink(missing_ok=True)
        if durable:
            os.fsync(directory)
    finally:
        os.close(directory)


# =================================================================================================
# Responses
# =================================================================================================


class _Refusal(Exception):
    """A BITS error response, raised inside the handlers."""

    def __init__(
        self,
        status: int,
        code: int | None,
        context: int = CONTEXT_SERVER,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(status, code)
        self.status = status
        self.code = code
        self.context = context
        self.headers = dict(headers or {})


class _Unauthorized(Exception):
    """No valid credentials for a directory that wants them."""

    def __init__(self, auth: BasicAuth) -> None:
        super().__init__(auth.realm)
        self.auth = auth


def _ack(status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    response = web.Response(status=status, headers={"BITS-Packet-Type": "Ack"})
    if headers:
        response.headers.update(headers)
    return response


def _refusal(refusal: _Refusal, session_id: str | None) -> web.Response:
    headers = dict(refusal.headers)
    if refusal.code is not None:
        headers["BITS-Error-Code"] = f"0x{refusal.code:08X}"
        headers["BITS-Error-Context"] = f"0x{refusal.context:X}"
    if session_id:
        headers["BITS-Session-Id"] = session_id
    return _ack(refusal.status, headers)


def _invalid() -> _Refusal:
    return _Refusal(400, hr.E_INVALIDARG)


def _not_found() -> _Refusal:
    return _Refusal(500, hr.BG_E_SESSION_NOT_FOUND)


def _status_code(status: int) -> int:
    return hr.http_status_hresult(status) if 100 <= status <= 599 else hr.E_FAIL


# =================================================================================================
# The server
# =================================================================================================


class UploadServer:
    """The request handlers and the session store of one upload application."""

    def __init__(self, config: UploadServerConfig) -> None:
        self.config = config
        self.store = _Store(config.session_dir, config.fsync)
        self._locks: dict[str, asyncio.Lock] = {}
        self._client: aiohttp.ClientSession | None = None
        # In memory, rebuilt from the session directory at start-up (module docstring):
        self._live: set[str] = set()  # GUIDs of sessions counted against max_sessions
        self._claims: dict[str, str] = {}  # destination path -> GUID of the session writing it
        self._claim_of: dict[str, str] = {}  # GUID -> its destination path

    # -- lifecycle -------------------------------------------------------------------------------

    async def _context(self, app: web.Application) -> AsyncIterator[None]:
        self.config.session_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._rebuild_index()
        self._client = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.config.notification_timeout),
            headers={"User-Agent": "BITSExts 1.5 (backhaul)"},
            auto_decompress=False,
            trust_env=False,
        )
        sweeper = asyncio.create_task(self._sweep_forever())
        try:
            yield
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            await self._client.close()

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.cleanup_interval)
            await self.sweep()

    async def sweep(self) -> int:
        """Remove sessions and tombstones untouched for their session timeout, and session
        directories without state. Returns how many were removed."""
        now = self.config.clock()
        removed = 0
        for guid, session in self.store.all():
            async with self._lock(guid):
                if session is None or self._expired(session, now):
                    self.store.remove(guid)
                    self._locks.pop(guid, None)
                    self._forget(guid)
                    removed += 1
        return removed

    # -- the in-memory index: live sessions and the destinations they hold ------------------------

    def _rebuild_index(self) -> None:
        self._live.clear()
        self._claims.clear()
        self._claim_of.clear()
        now = self.config.clock()
        for guid, session in self.store.all():
            if session is None or session.state not in _LIVE or self._expired(session, now):
                continue
            self._live.add(guid)
            vdir = self._vdir_named(session.vdir)
            if session.state in (RECEIVING, RECEIVED) and vdir is not None:
                with contextlib.suppress(OSError, ValueError):
                    self._claim(guid, self._physical(vdir, session.relative))

    @staticmethod
    def _physical(vdir: VirtualDirectory, relative: str) -> str:
        """The destination as ``_destination`` computes it: the resolved parent + the name."""
        path = vdir.directory.resolve().joinpath(*relative.split("/"))
        return str(path.parent.resolve() / path.name)

    def _claim(self, guid: str, destination: str) -> None:
        self._claims[destination] = guid
        self._claim_of[guid] = destination

    def _release(self, guid: str) -> None:
        destination = self._claim_of.pop(guid, None)
        if destination is not None and self._claims.get(destination) == guid:
            del self._claims[destination]

    def _forget(self, guid: str) -> None:
        self._release(guid)
        self._live.discard(guid)

    def _holds(self, guid: str) -> bool:
        """Does that session keep its destination from a new one? Yes while a request of it
        runs or within ``claim_timeout`` of its last one. An idle one is superseded: cancelled
        here (its tombstone keeps its last-touched time, so it expires as it would have)."""
        lock = self._locks.get(guid)
        if lock is not None and lock.locked():
            return True
        session = self.store.load("{" + guid + "}")
        if session is None or session.state not in (RECEIVING, RECEIVED):
            return False
        now = self.config.clock()
        if self._expired(session, now):
            return False
        if now - session.touched < self.config.claim_timeout:
            return True
        self.store.discard_files(session)
        session.state = CANCELLED
        self.store.save(session)
        self._forget(guid)
        return False

    def _prune_live(self) -> None:
        """Forget sessions that ended or expired behind the index's back (no sweep yet)."""
        now = self.config.clock()
        for guid in list(self._live):
            session = self.store.load("{" + guid + "}")
            if session is None or session.state not in _LIVE or self._expired(session, now):
                self._forget(guid)

    def _expired(self, session: _Session, now: float) -> bool:
        vdir = self._vdir_named(session.vdir)
        timeout = vdir.session_timeout if vdir is not None else DEFAULT_SESSION_TIMEOUT
        return now - session.touched > timeout

    def _lock(self, guid: str) -> asyncio.Lock:
        lock = self._locks.get(guid)
        if lock is None:
            lock = self._locks[guid] = asyncio.Lock()
        return lock

    # -- authentication --------------------------------------------------------------------------

    def _auth_for(self, request: web.Request) -> BasicAuth | None:
        matched = self._match(request)
        if matched is not None and matched[0].auth is not None:
            return matched[0].auth
        return self.config.auth

    def _authorize(self, request: web.Request) -> str | None:
        """The authenticated user (None when no authentication is configured)."""
        auth = self._auth_for(request)
        if auth is None:
            return None
        user = auth.authenticate(request.headers.get("Authorization"))
        if user is None:
            raise _Unauthorized(auth)
        return user

    # -- URL mapping -----------------------------------------------------------------------------

    def _vdir_named(self, prefix: str) -> VirtualDirectory | None:
        return next((v for v in self.config.vdirs if v.prefix == prefix), None)

    def _match(self, request: web.Request) -> tuple[VirtualDirectory, tuple[str, ...]] | None:
        parts = request.rel_url.parts[1:]
        best: VirtualDirectory | None = None
        for vdir in self.config.vdirs:
            n = len(vdir.parts)
            if parts[:n] == vdir.parts and (best is None or n > len(best.parts)):
                best = vdir
        if best is None:
            return None
        return best, tuple(parts[len(best.parts) :])

    def _destination(self, request: web.Request) -> tuple[VirtualDirectory, Path, str]:
        """(virtual directory, destination path, relative POSIX name) of an upload URL."""
        matched = self._match(request)
        if matched is None:
            raise _Refusal(404, _status_code(404))
        vdir, rest = matched
        if not vdir.enabled:
            raise _Refusal(501, hr.E_ACCESSDENIED)
        if not rest or any(p in ("", ".", "..") or _BAD_SEGMENT.search(p) for p in rest):
            raise _invalid()
        if rest[0].lower() == SESSIONS_SEGMENT.lower():
            raise _Refusal(403, hr.E_ACCESSDENIED)
        try:
            root = vdir.directory.resolve()
            dest = root.joinpath(*rest)
            parent = dest.parent.resolve()
            if not parent.is_relative_to(root):
                raise _Refusal(403, hr.E_ACCESSDENIED)  # a symlink leads out of the directory
            if not parent.is_dir():
                raise _Refusal(404, PATH_NOT_FOUND)
            dest = parent / dest.name
            if dest.is_symlink():
                raise _Refusal(403, hr.E_ACCESSDENIED)  # never written through, nor replaced
            if dest.is_dir():
                raise _invalid()
        except OSError as exc:  # a name too long, a loop of symlinks, no permission
            if exc.errno == errno.ENAMETOOLONG:
                raise _invalid() from None
            raise _Refusal(403, hr.E_ACCESSDENIED) from None
        except RuntimeError:  # Python 3.11's Path.resolve: a symlink loop
            raise _Refusal(403, hr.E_ACCESSDENIED) from None
        return vdir, dest, "/".join(rest)

    def _session(self, request: web.Request, vdir: VirtualDirectory, user: str | None) -> _Session:
        """The live session a packet names, else BG_E_SESSION_NOT_FOUND (also when another
        user created it)."""
        session_id = request.headers.get("BITS-Session-Id")
        if session_id is None:
            raise _invalid()
        session = self.store.load(session_id)
        if (
            session is None
            or session.vdir != vdir.prefix
            or session.path != request.rel_url.path
            or session.owner != user
            or self._expired(session, self.config.clock())
        ):
            raise _not_found()
        return session

    # -- BITS_POST -------------------------------------------------------------------------------

    async def handle_bits(self, request: web.Request) -> web.StreamResponse:
        session_id = request.headers.get("BITS-Session-Id")
        try:
            self._check_head(request)
            user = self._authorize(request)
            response = await self._dispatch(request, user)
        except _Unauthorized as unauthorized:
            response = _ack(401, {"WWW-Authenticate": unauthorized.auth.challenge})
            response.force_close()  # no keep-alive; the body is never read here
            return response
        except _Refusal as refusal:
            response = _refusal(refusal, session_id)
        except OSError as exc:
            code = DISK_FULL if exc.errno == errno.ENOSPC else hr.E_FAIL
            response = _refusal(_Refusal(500, code), session_id)
        await _drain(request, response)
        return response

    def _check_head(self, request: web.Request) -> None:
        """400 for a header value above 4 KB or a request head above ``max_header_bytes``."""
        size = len(request.method) + len(request.raw_path) + 12  # " HTTP/1.1\r\n"
        for name, value in request.raw_headers:
            if len(value) > MAX_HEADER_VALUE:
                raise _invalid()
            size += len(name) + len(value) + 4  # ": " and CRLF
        if size > self.config.max_header_bytes:
            raise _invalid()

    async def _dispatch(self, request: web.Request, user: str | None) -> web.StreamResponse:
        packet = request.headers.get("BITS-Packet-Type", "").strip().lower()
        length = request.content_length
        if length is None or packet not in _PACKETS:
            raise _invalid()
        if packet != "fragment" and length != 0:
            raise _invalid()
        if packet == "ping":
            return await self._ping(request, user)
        vdir, dest, relative = self._destination(request)
        if packet == "create-session":
            return self._create(request, vdir, dest, relative, user)
        session = self._session(request, vdir, user)
        async with self._lock(session.guid):
            session = self._session(request, vdir, user)  # it may have changed meanwhile
            if packet == "fragment":
                return await self._fragment(request, vdir, dest, session)
            if packet == "close-session":
                return await self._close(request, vdir, dest, session)
            return self._cancel(session)

    async def _ping(self, request: web.Request, user: str | None) -> web.Response:
        """Always 200. Extension: a Ping naming a live session learns its offset, and its reply
        URL once done (under the session's lock, so a fragment being written is counted). A
        session with every byte whose completion failed (RECEIVED) tells nothing, as any BITS
        server: its final fragment was refused, and must come again to retry the completion."""
        session_id = request.headers.get("BITS-Session-Id")
        found = self.store.load(session_id) if session_id is not None else None
        if found is not None:
            async with self._lock(found.guid):
                session = self.store.load(found.id)
            if (
                session is not None
                and session.state in (RECEIVING, DONE)
                and session.path == request.rel_url.path
                and session.owner == user
                and not self._expired(session, self.config.clock())
            ):
                headers = self._offset_headers(session)
                vdir = self._vdir_named(session.vdir)
                if session.state == DONE and session.reply is not None and vdir is not None:
                    headers["BITS-Reply-URL"] = self._reply_url(request, vdir, session)
                return _ack(headers=headers)
        return _ack()

    def _create(
        self,
        request: web.Request,
        vdir: VirtualDirectory,
        dest: Path,
        relative: str,
        user: str | None,
    ) -> web.Response:
        """No await in here: the checks and the creation are atomic on the event loop."""
        offered = request.headers.get("BITS-Supported-Protocols", "")
        guids = {g.strip("{}").lower() for g in re.split(r"[\s,]+", offered) if g}
        if UPLOAD_PROTOCOL.strip("{}") not in guids:
            raise _invalid()
        if os.path.lexists(dest) and not vdir.allow_overwrite:
            raise _Refusal(403, hr.E_ACCESSDENIED)
        holder = self._claims.get(str(dest))
        if holder is not None and self._holds(holder):
            raise _Refusal(409, SESSION_BUSY)  # one active session per destination
        limit = self.config.max_sessions
        if limit is not None and len(self._live) >= limit:
            self._prune_live()
            if len(self._live) >= limit:
                raise _Refusal(503, TOO_MANY_SESSIONS, headers={"Retry-After": "60"})
        now = self.config.clock()
        session = _Session(
            id="{" + str(uuid.uuid4()).upper() + "}",
            vdir=vdir.prefix,
            path=request.rel_url.path,
            relative=relative,
            url=str(request.url),
            created=now,
            touched=now,
            owner=user,
        )
        self.store.create(session)
        self._live.add(session.guid)
        self._claim(session.guid, str(dest))
        headers = {
            "BITS-Protocol": UPLOAD_PROTOCOL,
            "BITS-Session-Id": session.id,
            "Accept-Encoding": "identity",
        }
        if vdir.host_id:
            headers["BITS-Host-Id"] = vdir.host_id
            headers["BITS-Host-Id-Fallback-Timeout"] = str(vdir.host_id_fallback_timeout)
        return _ack(headers=headers)

    async def _fragment(
        self, request: web.Request, vdir: VirtualDirectory, dest: Path, session: _Session
    ) -> web.StreamResponse:
        if session.state not in _LIVE:
            raise _not_found()
        match = _RANGE.fullmatch(request.headers.get("Content-Range", "").strip())
        if match is None:
            raise _invalid()
        first, last, total = (int(g) for g in match.groups())
        if not first <= last < total or request.content_length != last - first + 1:
            raise _invalid()
        if session.total is not None and total != session.total:
            raise _invalid()
        if total > vdir.max_upload_size:
            raise _Refusal(500, hr.BG_E_TOO_LARGE)
        if last - first + 1 > self.config.max_fragment_size:
            raise _Refusal(413, _status_code(413))
        if first > session.received:  # a gap: tell the client where to continue
            return _ack(416, self._offset_headers(session))
        structural = session.total is None  # the first fragment fixes the total
        session.total = total
        if last >= session.received:  # new bytes (exact continuation or overlap)
            whole = await self._receive(request, session, skip=session.received - first)
            structural = structural or not whole  # a cut: rare, session.json catches up
        session.touched = self.config.clock()
        if session.received == session.total and session.state == RECEIVING:
            session.state = RECEIVED
            structural = True
        if structural:
            self.store.save(session)
        else:
            self.store.claim(session)  # the offset only: no rename per fragment
        if session.state == RECEIVED:
            await self._complete(request, vdir, dest, session)
        headers = self._offset_headers(session)
        if session.state == DONE and session.reply is not None:
            headers["BITS-Reply-URL"] = self._reply_url(request, vdir, session)
        return _ack(headers=headers)

    @staticmethod
    def _offset_headers(session: _Session) -> dict[str, str]:
        return {"BITS-Session-Id": session.id, "BITS-Received-Content-Range": str(session.received)}

    async def _receive(self, request: web.Request, session: _Session, *, skip: int) -> bool:
        """Append the body after its first ``skip`` bytes at ``session.received``. Bytes that
        arrived before the connection dropped are kept and claimed. The caller saves the
        session, unless an exception escapes from here (then it is claimed here). Returns
        False when the body was cut short."""
        fd = os.open(self.store.data(session), os.O_WRONLY | os.O_CREAT, 0o600)
        written = 0
        pending: list[bytes | memoryview] = []  # chunks as the parser delivered them
        size = 0
        handled = False
        whole = True
        try:
            os.ftruncate(fd, session.received)  # bytes beyond the claim are not trusted
            try:
                while chunk := await request.content.readany():
                    if skip >= len(chunk):
                        skip -= len(chunk)
                        continue
                    pending.append(memoryview(chunk)[skip:] if skip else chunk)
                    size += len(chunk) - skip
                    skip = 0
                    if size >= _CHUNK:
                        written += _write_all(fd, pending, session.received + written)
                        pending.clear()
                        size = 0
            except (web_protocol.RequestPayloadError, ConnectionError, aiohttp.ClientError):
                whole = False  # the client went away: keep what arrived, it resumes there
            handled = True
        finally:
            try:
                if pending:
                    written += _write_all(fd, pending, session.received + written)
                if written and self.config.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
                if written:
                    session.received += written
                    session.touched = self.config.clock()
                    if not handled:
                        self.store.claim(session)
        return whole

    async def _complete(
        self, request: web.Request, vdir: VirtualDirectory, dest: Path, session: _Session
    ) -> None:
        """Every byte is here: notify the back-end and/or commit; then the session is DONE."""
        copy = vdir.notification == NotificationType.NONE
        if not copy:
            copy = await self._notify(request, vdir, session)
        if copy:
            await self._commit(vdir, dest, session)
        session.state = DONE
        self.store.save(session)
        self._release(session.guid)  # the destination is free for a new session

    async def _commit(self, vdir: VirtualDirectory, dest: Path, session: _Session) -> None:
        source = self.store.data(session)
        if not source.exists():  # an empty upload closed without fragments
            source.touch()
        if os.path.lexists(dest) and not vdir.allow_overwrite:
            raise _Refusal(403, hr.E_ACCESSDENIED)
        root = vdir.directory.resolve()
        if not dest.parent.is_relative_to(root):
            raise _Refusal(403, hr.E_ACCESSDENIED)
        try:
            await asyncio.to_thread(
                _place,
                source,
                root,
                dest.parent.relative_to(root).parts,
                dest.name,
                overwrite=vdir.allow_overwrite,
                durable=self.config.fsync,
            )
        except FileExistsError:
            raise _Refusal(403, hr.E_ACCESSDENIED) from None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EISDIR, errno.ENOENT):
                raise _Refusal(403, hr.E_ACCESSDENIED) from None  # the tree changed under us
            raise

    async def _notify(
        self, request: web.Request, vdir: VirtualDirectory, session: _Session
    ) -> bool:
        """POST the upload to the back-end application; store its reply. Returns whether the
        upload is to be copied to its destination too."""
        assert vdir.notification_url is not None
        assert self._client is not None
        job = URL(session.url)
        target = _own_url(request, job).join(URL(vdir.notification_url))
        if job.raw_query_string:
            joiner = "&" if target.raw_query_string else "?"
            target = URL(f"{target}{joiner}{job.raw_query_string}", encoded=True)
        headers = {"BITS-Original-Request-URL": session.url}
        data_path, reply_path = self.store.data(session), self.store.reply(session)
        reply_path.unlink(missing_ok=True)
        try:
            if vdir.notification == NotificationType.BY_REFERENCE:
                headers["BITS-Request-DataFile-Name"] = str(data_path.resolve())
                headers["BITS-Response-DataFile-Name"] = str(reply_path.resolve())
                async with self._client.post(target, headers=headers, data=b"") as resp:
                    return await self._take_reply(resp, session, by_value=False)
            with open(data_path, "rb") as body:
                async with self._client.post(target, headers=headers, data=body) as resp:
                    return await self._take_reply(resp, session, by_value=True)
        except TimeoutError:
            raise _Refusal(408, NOTIFICATION_TIMEOUT_CODE, CONTEXT_APPLICATION) from None
        except (aiohttp.ClientError, ConnectionError):
            raise _Refusal(502, _status_code(502), CONTEXT_APPLICATION) from None

    async def _take_reply(
        self, resp: aiohttp.ClientResponse, session: _Session, *, by_value: bool
    ) -> bool:
        if resp.status != 200:
            status = resp.status if 400 <= resp.status <= 599 else 500
            raise _Refusal(status, _status_code(resp.status), CONTEXT_APPLICATION)
        static = resp.headers.get("BITS-Static-Response-URL", "").strip()
        reply_path = self.store.reply(session)
        if static:
            url = str(URL(str(resp.url)).join(URL(static)))
            if len(url) > MAX_REPLY_URL:
                raise _invalid()
            session.reply = url
        elif by_value or not reply_path.exists():
            temp = reply_path.with_suffix(".tmp")
            with open(temp, "wb") as fh:
                async for chunk in resp.content.iter_chunked(_CHUNK):
                    fh.write(chunk)
                fh.flush()
                if self.config.fsync:
                    os.fsync(fh.fileno())
            os.replace(temp, reply_path)
            session.reply = "file"
        else:
            session.reply = "file"
        return "BITS-Copy-File-To-Destination" in resp.headers

    def _reply_url(self, request: web.Request, vdir: VirtualDirectory, session: _Session) -> str:
        if session.reply != "file":
            return str(session.reply)
        path = f"{vdir.prefix.rstrip('/')}/{SESSIONS_SEGMENT}/Replies/{session.guid}/{REPLY_NAME}"
        url = str(request.url.origin().with_path(path))
        if len(url) > MAX_REPLY_URL:
            raise _invalid()
        return url

    async def _close(
        self, request: web.Request, vdir: VirtualDirectory, dest: Path, session: _Session
    ) -> web.Response:
        if session.state == CANCELLED:
            raise _not_found()
        if session.state == RECEIVING and session.total is None and session.received == 0:
            if vdir.notification == NotificationType.NONE:  # a 0-byte upload (bits_upload.py)
                await self._commit(vdir, dest, session)
        elif session.state == RECEIVED:
            await self._complete(request, vdir, dest, session)
        self._tombstone(session, CLOSED)
        return _ack(headers={"BITS-Session-Id": session.id})

    def _cancel(self, session: _Session) -> web.Response:
        if session.state == CLOSED:
            raise _not_found()
        self._tombstone(session, CANCELLED)
        return _ack(headers={"BITS-Session-Id": session.id})

    def _tombstone(self, session: _Session, state: str) -> None:
        if session.state not in (CLOSED, CANCELLED):
            self.store.discard_files(session)
            session.state = state
        session.touched = self.config.clock()
        self.store.save(session)
        self._forget(session.guid)

    # -- GET / HEAD of replies -------------------------------------------------------------------

    async def handle_get(self, request: web.Request) -> web.StreamResponse:
        try:
            user = self._authorize(request)
        except _Unauthorized as unauthorized:
            return web.Response(
                status=401, headers={"WWW-Authenticate": unauthorized.auth.challenge}
            )
        matched = self._match(request)
        if matched is not None:
            vdir, rest = matched
            if (
                len(rest) == 4
                and rest[0] == SESSIONS_SEGMENT
                and rest[1] == "Replies"
                and rest[3] == REPLY_NAME
                and _GUID.fullmatch(rest[2])
            ):
                session = self.store.load("{" + rest[2] + "}")
                if (
                    session is not None
                    and session.vdir == vdir.prefix
                    and session.owner == user
                    and session.state == DONE
                    and session.reply == "file"
                    and not self._expired(session, self.config.clock())
                ):
                    return web.FileResponse(
                        self.store.reply(session),
                        headers={"Content-Type": "application/octet-stream"},
                    )
        raise web.HTTPNotFound()


def _own_url(request: web.Request, url: URL) -> URL:
    """``url`` on the listener that received ``request``: its scheme and the local address
    and port of its socket. The client's ``Host`` header (which builds ``request.url``) names
    any host it likes. A listener without an IP address (a Unix socket) has no URL of its own:
    the back-end cannot be reached (502, context 0x7)."""
    transport = request.transport
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    if not isinstance(sockname, tuple) or len(sockname) < 2:
        raise _Refusal(502, _status_code(502), CONTEXT_APPLICATION)
    host, port = sockname[0], sockname[1]
    return url.with_scheme(request.scheme).with_host(host).with_port(port)


async def _drain(request: web.Request, response: web.StreamResponse) -> None:
    """Read an unread request body so the connection stays usable (413, 416, refusals), or
    close the connection when the body is too big or has no length."""
    if request.content.at_eof():
        return
    length = request.content_length
    if length is None or length > _DRAIN_LIMIT:
        response.force_close()
        return
    with contextlib.suppress(web_protocol.RequestPayloadError, ConnectionError):
        while await request.content.readany():
            pass


UPLOAD_SERVER: Final = web.AppKey("backhaul.upload_server", UploadServer)


def make_upload_app(config: UploadServerConfig) -> web.Application:
    """The aiohttp application; run it with ``BitsAppRunner`` (``serve_uploads``), not the
    plain ``web.AppRunner``, whose parser refuses ``BITS_POST``. ``app[UPLOAD_SERVER]`` is the
    ``UploadServer`` (``sweep()`` runs the cleanup now)."""
    server = UploadServer(config)
    app = web.Application()
    app[UPLOAD_SERVER] = server
    app.cleanup_ctx.append(server._context)
    app.router.add_route("BITS_POST", "/{tail:.*}", server.handle_bits)
    app.router.add_get("/{tail:.*}", server.handle_get)  # HEAD too
    return app
