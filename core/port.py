"""Ports: the small interfaces through which the pure core meets the world.

Adapters implement them; the core and the transports only see these Protocols.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import datetime
from types import TracebackType
from typing import Final, Protocol, Self

import attrs

from backhaul.core import hresult
from backhaul.core.error import TransferError
from backhaul.core.value import ClientCertificate, ProxySettings
from backhaul.core.vocabulary import ErrorContext


class Clock(Protocol):
    """Where time comes from. ``now`` is aware (UTC); ``monotonic`` is for timers."""

    def now(self) -> datetime: ...

    def monotonic(self) -> float: ...


# -- transports --------------------------------------------------------------------------


@attrs.frozen
class PlainCredentials:
    """Credentials opened for one transfer. In memory only: never stored or logged."""

    target: int  # AuthTarget
    scheme: int  # AuthScheme
    user_name: str | None
    password: str | None = attrs.field(repr=False)


@attrs.frozen
class ClientIdentity:
    """A client certificate opened for one transfer: the PEM chain (certificate first)
    and its private key as unencrypted PEM. In memory only; ``sha1`` names it as BITS does."""

    sha1: str
    certificate_pem: bytes
    key_pem: bytes = attrs.field(repr=False)


# (host, port, DER chain leaf first) -> an HRESULT: S_OK accepts, anything else refuses
ServerCertificateValidator = Callable[[str, int, tuple[bytes, ...]], int]


@attrs.frozen
class RequestOptions:
    """What a transport needs from the job for one request. Built by the engine."""

    custom_headers: tuple[tuple[str, str], ...] = ()
    credentials: tuple[PlainCredentials, ...] = ()
    proxy: ProxySettings = attrs.field(factory=ProxySettings)
    security_flags: int = 0
    client_certificate: ClientCertificate | None = None
    http_method: str | None = None
    dynamic: bool = False
    ca_bundle: str | None = None
    server_certificate_validator: ServerCertificateValidator | None = attrs.field(
        default=None, eq=False, repr=False
    )
    client_identity: ClientIdentity | None = attrs.field(default=None, repr=False)


@attrs.frozen
class RemoteFile:
    """What a transport learnt about a remote file.

    ``size`` is None when unknown (dynamic content). ``validator`` identifies the
    version (an HTTP entity tag, else its Last-Modified date, else SMB size+mtime):
    a different validator means the remote file changed. ``url`` is the final URL
    after redirects. ``headers`` is the raw response header block, when there is one.
    ``redirect_target`` is set only when the request was redirected: the URL the
    redirects led to, as the transport requested it (user info and signed query
    included, so it is for a new remote name, never for a message; ``url`` is the
    library's form of it). The engine makes it the file's remote name under
    REDIRECT_POLICY_ALLOW_REPORT (bits-core.md §10). None: no redirect, or a transport
    that does not redirect.
    """

    url: str
    size: int | None
    validator: str | None = None
    last_modified: datetime | None = None
    accepts_ranges: bool = False
    headers: str | None = None
    redirect_target: str | None = None


class Download(Protocol):
    """An open read of a remote file. ``offset`` is where the body starts: when the
    server ignored the requested range (or the validator no longer matched), it is 0
    and ``remote`` describes the new version. Iterate for chunks; always ``aclose``."""

    remote: RemoteFile
    offset: int

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


class ClosedOnExit:
    """``async with`` for a Download: ``aclose()`` on the way out, whatever happened."""

    async def aclose(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def header_block(
    version: tuple[int, int] | None,
    status: int,
    reason: str | None,
    raw: Iterable[tuple[bytes, bytes]],
) -> str:
    """A response's raw header block as WinHTTP gives it (WINHTTP_QUERY_RAW_HEADERS_CRLF, what
    BITS's HTTP_RESPONSE_HEADERS holds): status line, header lines, empty line; CR LF each.
    The arguments are what aiohttp's response gives (``version``, None: HTTP/1.1;
    ``reason``; ``raw_headers``, the header lines as received, in order)."""
    major, minor = version or (1, 1)
    status_line = f"HTTP/{major}.{minor} {status} {reason or ''}".rstrip()
    lines = "".join(
        f"{name.decode('utf-8', 'replace')}: {value.decode('utf-8', 'replace')}\r\n"
        for name, value in raw
    )
    return f"{status_line}\r\n{lines}\r\n"


# -- what a transport can do (specs/transport-sdk.md §2) -----------------------------------

RANGES: Final = "ranges"
"""``open`` honours ``offset`` and ``length``: a resume starts where it was asked to."""
VALIDATORS: Final = "validators"
"""``stat`` and ``open`` report a validator that changes when the remote file changes."""
UPLOAD: Final = "upload"
"""The object is (also) an ``Uploader``."""
UPLOAD_REPLY: Final = "upload-reply"
"""Its upload sessions can return a reply URL (upload-reply jobs)."""
KNOWN_CAPABILITIES: Final = frozenset({RANGES, VALIDATORS, UPLOAD, UPLOAD_REPLY})


class Transport(Protocol):
    """A wire family, keyed by URL scheme. Raises only ``TransferError``. ``capabilities``:
    a subset of ``KNOWN_CAPABILITIES``, declared on the class."""

    schemes: frozenset[str]
    capabilities: frozenset[str]

    async def stat(self, url: str, options: RequestOptions) -> RemoteFile: ...

    async def open(
        self,
        url: str,
        options: RequestOptions,
        *,
        offset: int = 0,
        length: int | None = None,
        validator: str | None = None,
    ) -> Download: ...

    async def close(self) -> None: ...


# -- uploads -----------------------------------------------------------------------------


class UploadSession(Protocol):
    """One resumable upload of one file.

    ``token`` identifies the session on the remote side (a BITS-Session-Id, a temp name
    on an SMB share) and is recorded in the log, so that after a crash ``Uploader.begin``
    can pick the same session up again. ``offset`` is how many bytes the remote side
    holds: the next fragment starts there. A session over HTTP may also keep
    ``response_headers``, the raw header block of its last reply (``header_block``): the
    engine records it as the file's HTTP_RESPONSE_HEADERS when the file is done.
    """

    token: str
    offset: int

    async def send(self, data: bytes, offset: int) -> int:
        """Send ``data`` at ``offset``; return the remote side's new offset."""
        ...

    async def finish(self) -> str | None:
        """Commit the upload (close the session, rename into place). Returns the reply
        URL for upload-reply jobs, else None."""
        ...

    async def abort(self) -> None:
        """Cancel the session on the remote side (BITS Cancel-Session)."""
        ...

    async def close(self) -> None:
        """Upload-reply: release the remote session (Close-Session) once the reply was
        downloaded; a no-op for plain uploads, which ``finish`` already closed."""
        ...


class Uploader(Protocol):
    """The upload side of a wire family. Raises only ``TransferError``."""

    schemes: frozenset[str]

    async def begin(
        self,
        url: str,
        options: RequestOptions,
        *,
        size: int,
        token: str | None = None,
        reply: bool = False,
    ) -> UploadSession:
        """Open (or, with ``token``, re-open) a session for a ``size``-byte upload.
        ``reply``: the job is upload-reply and the server must give a reply URL."""
        ...

    async def close(self) -> None: ...


_PART_TOKEN: Final = re.compile(r"[0-9a-f]{16}")


def begin_upload(scheme: str, *, size: int, token: str | None, reply: bool) -> str:
    """What ``Uploader.begin`` of a family without upload-reply checks first, for plugins
    (the ``file`` uploader and the FTP example use it): a ``reply`` job or a negative
    ``size`` is a fatal E_INVALIDARG. Returns the session's part token: ``token`` when it
    is one this helper made (16 hex digits), else a new one."""
    if reply:
        raise TransferError(
            hresult.E_INVALIDARG,
            f"upload-reply jobs need an HTTP server, not {scheme}://",
            context=ErrorContext.REMOTE_FILE,
            transient=False,
        )
    if size < 0:
        raise TransferError(
            hresult.E_INVALIDARG,
            f"bad upload size {size}",
            context=ErrorContext.REMOTE_FILE,
            transient=False,
        )
    if token is not None and _PART_TOKEN.fullmatch(token):
        return token
    return secrets.token_hex(8)


class SecurityTransport(Protocol):
    """Optional (SMB): read a remote file's security descriptor for the ACL flags (§13)."""

    async def security(self, url: str, options: RequestOptions, flags: int) -> bytes | None: ...


class SecureUploadSession(Protocol):
    """Optional (SMB): set the flagged parts of the source's self-relative descriptor at
    ``finish()``."""

    async def apply_security(self, descriptor: bytes, flags: int) -> None: ...
