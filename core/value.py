"""Value objects of the job model. All frozen; all stored inside events.

Sizes follow Python: an unknown size is ``None`` (BITS's BG_SIZE_UNKNOWN), a range to
the end of the file has ``length=None`` (BG_LENGTH_TO_EOF). The BITS sentinels are
mapped at the edges (see specs/names.md).
"""

from __future__ import annotations

import attrs

from backhaul.core.vocabulary import ErrorContext


@attrs.frozen
class ByteRange:
    """BG_FILE_RANGE: ``length=None`` means to the end of the file."""

    offset: int
    length: int | None = None

    @property
    def end(self) -> int | None:
        """One past the last byte, or None when the range runs to the end of the file."""
        return None if self.length is None else self.offset + self.length


@attrs.frozen
class Sealed:
    """A secret as the log holds it: an opaque token that only the store's cipher opens.

    The core never sees plain secrets; adapters seal them before a command is decided.
    """

    token: str = attrs.field(repr=False)

    def __repr__(self) -> str:
        return "Sealed(<redacted>)"


@attrs.frozen
class FileSpec:
    """What the application asked for: BG_FILE_INFO plus optional ranges and digest.

    A URL's secrets are recorded sealed (core/url.py): with a password in it
    (``https://user:password@host/``) ``remote_name`` keeps ``user@`` and ``password``
    holds the password; with a signature in its query (``?X-Amz-Signature=...``)
    ``remote_name`` shows ``X-Amz-Signature=<redacted>`` and ``query`` holds the whole
    query. The engine puts them back only for the request (``url.request_url``)."""

    remote_name: str
    local_name: str
    ranges: tuple[ByteRange, ...] = ()
    expected_digest: str | None = None  # "sha256:<hex>"
    password: Sealed | None = None
    query: Sealed | None = None


@attrs.frozen
class JobError:
    """IBackgroundCopyError as a value: context, HRESULT, description, file, protocol."""

    context: ErrorContext
    hresult: int
    description: str = ""
    file_index: int | None = None
    protocol: str | None = None


@attrs.frozen
class ProxySettings:
    """SetProxySettings: usage plus the OVERRIDE lists in BITS syntax (space-delimited)."""

    usage: int = 0  # ProxyUsage.PRECONFIG
    proxy_list: str | None = None
    bypass_list: str | None = None


@attrs.frozen
class ClientCertificate:
    """SetClientCertificateByID / ByName: a reference into a certificate store."""

    store_location: int
    store_name: str
    sha1: str | None = None  # 40 hex digits
    subject: str | None = None


@attrs.frozen
class NotifyCommandLine:
    """SetNotifyCmdLine: an argument vector, run without a shell."""

    program: str
    parameters: tuple[str, ...] = ()


@attrs.frozen
class CredentialsEntry:
    """BG_AUTH_CREDENTIALS for one (target, scheme); the password stays sealed."""

    target: int
    scheme: int
    user_name: str | None
    password: Sealed | None
