"""The ``http`` / ``https`` transport: BITS downloads over aiohttp.

Rules of this module:

* It only talks to the network: no job files, no events, no logging of secrets (passwords,
  private keys and custom headers never appear in messages, reprs or exceptions). It raises only
  ``TransferError``; every foreign exception goes through ONE table, ``_EXCEPTION_TABLE``
  (httpcore style), and every HTTP status through ``failure.is_transient`` (the project's one
  classification table). Only the few codes that table does not know yet are decided here,
  and each says why. The only things it reads besides the network are trust material (a CA
  bundle, the system CAs) and the proxy environment variables.
* One ``aiohttp.ClientSession`` per ``HttpTransport``, created lazily inside the running loop,
  so files and jobs on the same host reuse connections. ``close()`` closes it; a transport
  belongs to one event loop at a time (a new loop gets a new session). aiohttp keys pooled
  connections by TLS context, proxy and proxy headers, so jobs with different certificates,
  security flags or proxies never share a connection.
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
* ``RemoteFile.headers`` is what BITS's ``BITS_FILE_PROPERTY_ID_HTTP_RESPONSE_HEADERS`` holds
  (WinHTTP's raw CRLF headers): the status line (``HTTP/1.1 200 OK``), every header line as
  received, and the empty line that ends the block, each ending in CR LF.
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
    for an open-ended resume at exactly the size (``Content-Range: bytes */<offset>``) an empty
    body at that offset (every byte is already here); for one past a smaller size the file
    changed: it is requested again whole, and ``Download.offset`` is 0 as for a 200; otherwise
    it stays ``BG_E_HTTP_ERROR_416``.
  - Dynamic content (``options.dynamic``) and custom HTTP methods (``options.http_method`` other
    than GET, which restart from zero in BITS, §10) send no Range: the body starts at 0. The
    custom method is what ``open`` sends (``stat`` still sends HEAD); BITS's other rules for
    custom methods (foreground only, errors fatal) belong to the core and the engine.

  A body that ends before its Content-Length / Content-Range length raises
  ``BG_E_CONNECTION_CLOSED`` (transient); the engine resumes at the offset it reached.
* Redirects are followed here, not by aiohttp (at most 10), so that the policy is checked
  before each hop is requested. ``DISALLOW`` raises ``HRESULT_FROM_WIN32(<the 3xx status>)``
  (0x8007012E for a 302, bits-core.md §2.2), fatal, whose ``redirect_target`` attribute holds
  the redirect's http(s) URL: BITS sets the file's remote name to it, which is the engine's
  job. An HTTPS to HTTP downgrade without ``ALLOW_HTTPS_TO_HTTP`` raises the redirect's
  ``BG_E_HTTP_ERROR_3xx``, fatal (a policy refusal does not go away by retrying, even for
  308); a redirect to anything but http/https is refused the same way (HTTP to SMB is never
  followed, §10), and more than 10 hops raise the last redirect's code, classified by
  failure. ``ALLOW_REPORT`` behaves like ``ALLOW_SILENT`` here: ``RemoteFile.url`` is always
  the final URL, and ``RemoteFile.redirect_target`` (of ``stat`` and of ``Download.remote``)
  is that URL as requested, set only when there was a redirect; rewriting the remote name is
  the engine's job. Both targets may hold user info and signatures: messages only ever show
  URLs redacted, and a Location that cannot be used is shown scrubbed. Authorization and
  Cookie headers are dropped when a redirect leaves the origin, and server credentials are
  only ever answered to the original origin.
* Retry-After (429, 503) becomes ``TransferError.retry_after`` in seconds, clamped to
  ``MAX_RETRY_AFTER`` (a year); a value that is neither delta-seconds nor an HTTP-date is
  ignored.
* ``options.custom_headers`` go with every request (redirect hops included).

HTTPS: trust, security flags, client certificates, the server-certificate callback
-------------------------------------------------------------------------------------
Trust is the system CAs (``ssl.create_default_context()``), or the PEM file ``ca_bundle``
(per transport, or per job as ``options.ca_bundle``: CA certificates and, for the CRL check,
CRLs), or a fixed ``ssl_context`` given to the transport (used as it is: with it, a request that
needs a client certificate, TLS security flags, a CA bundle or a certificate callback fails
with ``E_INVALIDARG``, fatal; configure ``ca_bundle`` instead). On Python >= 3.13 the contexts
get ``VERIFY_X509_STRICT | VERIFY_X509_PARTIAL_CHAIN`` as ``create_default_context`` does.

The ``BG_SSL_*`` security flags map onto Python's ``ssl`` as far as it allows. Python has no
OpenSSL verify callback and no way to set the verification purpose, so two flags switch
OpenSSL's chain verification off and backhaul checks the certificate itself after the
handshake, before any request is sent on the connection:

================================  =============================================================
``ENABLE_CRL_CHECK`` (0x01)       ``VERIFY_CRL_CHECK_LEAF``: the server certificate is checked
                                  against the CRLs in the trust store (PEM ``X509 CRL`` blocks
                                  in the CA bundle; hashed ``.r0`` files in the system CA dir).
                                  CRLs are NOT downloaded from distribution points (BITS does).
                                  No current CRL for the issuer: ``HRESULT_FROM_WIN32(
                                  ERROR_WINHTTP_SECURE_CERT_REV_FAILED)`` 0x80072F19; revoked:
                                  ``..._SECURE_CERT_REVOKED`` 0x80072F8A; both fatal, as BITS
                                  says revocation failures are. With IGNORE_UNKNOWN_CA or
                                  IGNORE_CERT_WRONG_USAGE (OpenSSL does not verify then) no CRL
                                  check can be made: it fails closed with 0x80072F19.
``IGNORE_CERT_CN_INVALID`` (0x02)  ``check_hostname = False``: the chain is still verified.
``IGNORE_CERT_DATE_INVALID``      OpenSSL's ``X509_V_FLAG_NO_CHECK_TIME``: no certificate of the
(0x04)                            chain is checked for its validity period (nor CRLs for
                                  theirs); everything else is.
``IGNORE_UNKNOWN_CA`` (0x08)      ``verify_mode = CERT_NONE``; afterwards backhaul checks the
                                  server certificate's validity period (unless 0x04), its
                                  subjectAltName against the host (unless 0x02) and its
                                  extended key usage allows serverAuth (unless 0x10). The chain's
                                  signatures are not checked: without a trusted anchor they prove
                                  nothing.
``IGNORE_CERT_WRONG_USAGE``       ``verify_mode = CERT_NONE``; afterwards the chain the server
(0x10)                            sent is verified against the same trust anchors by
                                  ``cryptography``'s RFC 5280 verifier with the server
                                  certificate's extensions (EKU, key usage) unchecked (the CA
                                  certificates must still be CAs: basicConstraints, keyUsage
                                  keyCertSign); at a time inside the certificate's validity
                                  period with 0x04; host name by backhaul unless 0x02.
================================  =============================================================

A certificate that fails verification raises ``SECURE_FAILURE`` (0x80072F8F,
``HRESULT_FROM_WIN32(ERROR_WINHTTP_SECURE_FAILURE)``), fatal, context GENERAL_TRANSPORT.

Client certificates (``options.client_certificate``, a store reference) are opened by the
``certificates`` source given to the transport (``adapters/certstore.py`` maps stores to
directories and opens sealed key passphrases): it returns a ``ClientIdentity`` (PEM chain and
the private key, in memory only) or raises ``TransferError`` (CRYPT_E_NOT_FOUND, ...). An
identity passed directly as ``options.client_identity`` wins. The key reaches OpenSSL through an
anonymous in-memory file (``memfd_create``; pipes elsewhere), never through the disk. A key
OpenSSL cannot use raises ``HRESULT_FROM_WIN32(ERROR_WINHTTP_CLIENT_CERT_NO_ACCESS_PRIVATE_KEY)``
(0x80072F9A), fatal. A server that refuses the certificate with an HTTP status (nginx: 400,
IIS: 403) gives that status's ``BG_E_HTTP_ERROR_*``; one that aborts TLS 1.3 after the
handshake is seen as a closed connection, BG_E_CONNECTION_CLOSED (transient): asyncio reports
no alert then, so BITS's ERROR_WINHTTP_CLIENT_AUTH_CERT_NEEDED (0x80072F0C) cannot be told
apart; a TLS 1.2 handshake refusal is SECURE_FAILURE.
Client certificates are ignored for http:// URLs, as in BITS.

The server-certificate callback (``server_certificate_validator`` of the transport, or
``options.server_certificate_validator`` per job: BITS's ``SetServerCertificateValidation
Interface``) is called as ``validator(host, port, chain)`` with the chain as DER bytes (server
certificate first) after the certificate passed verification, before any request goes out on
the connection. It returns an HRESULT: ``S_OK`` (0) accepts; anything else (or an exception,
E_FAIL) refuses: TRANSIENT_ERROR with context SERVER_CERTIFICATE_CALLBACK and that HRESULT, as
BITS says. Accepted ``(host, port, SHA-256 of the certificate)`` are cached per validator, so a
validator is asked once per server certificate (BITS keeps the same per-job cache); refusals are
never cached.

Credentials (``options.credentials``)
-------------------------------------
* SERVER target: Basic is sent preemptively; Digest (RFC 7616: MD5, SHA-256 and their -sess
  variants, qop auth / auth-int for bodiless requests, stale nonces; the nonce is then reused
  preemptively with an increasing nonce count, and when the server no longer knows it and
  challenges afresh, even without ``stale=true``, that challenge still gets its answer), NTLM
  and Negotiate (``pyspnego``; Negotiate is Kerberos when GSSAPI and a ticket are available,
  else NTLM inside SPNEGO) answer the server's 401 challenge. When a server offers several
  schemes, the first of Negotiate, NTLM, Digest, Basic that has credentials is used (WinHTTP's
  preference). User name and password both None with NTLM or Negotiate means the implicit
  credentials (a Kerberos ticket cache, or pyspnego's ``NTLM_USER_FILE``). Credentials go
  only to the original origin and never when the custom headers carry their own
  Authorization. Passport is not supported.
* PROXY target: Basic is sent preemptively to the proxy (``Proxy-Authorization`` on the request
  for http:// URLs, on the CONNECT for https:// URLs, never inside the tunnel); Digest, NTLM and
  Negotiate answer a 407. For https:// URLs (CONNECT) only Basic and Digest can be answered:
  aiohttp closes the connection after a refused CONNECT, so connection-bound NTLM cannot
  complete there.
* NTLM and Negotiate authenticate a connection, so their handshakes (and the request they
  authorize) run on a separate pool holding one connection per (origin, proxy, TLS context,
  user): requests of one user to one such server are serialised.
* A 401 (or 407) that the credentials cannot satisfy (no credentials for any offered scheme, or
  the answer refused again) is returned as is: ``BG_E_HTTP_ERROR_401`` / ``_407``, fatal.

Proxies (``options.proxy``)
---------------------------
* PRECONFIG: the environment, with curl's rules: ``http_proxy`` (lower case only) for http://
  URLs, ``https_proxy`` / ``HTTPS_PROXY`` for https:// URLs, else ``all_proxy`` / ``ALL_PROXY``;
  ``no_proxy`` / ``NO_PROXY`` lists (comma or space separated) host names that match as
  themselves or as a domain suffix (a leading dot or ``*.`` is optional), IP addresses, CIDR
  ranges, or ``*`` for every host. A proxy URL without a scheme is http://. Linux has no other
  system-wide proxy setting that every program honours, so "system settings" are this process's
  environment (set it in the service unit). An unusable value (a SOCKS proxy, a bad port) raises
  ``BG_E_INVALID_PROXY_INFO``, fatal.
* NO_PROXY: direct.
* OVERRIDE: the BITS proxy list, space-delimited entries ``[scheme=][scheme://]host[:port]``:
  ``scheme=`` entries serve that URL scheme, entries without it serve every scheme that has no
  entry of its own; the ``scheme://`` part is how to talk to the proxy (default http, port 80
  for http and 443 for https). The entries that apply are tried in order when a proxy refuses
  connections (WinHTTP's fail-over). The bypass list: space-delimited host names or IP
  addresses, each with at most a leading wildcard (``*.example.com``), and ``<local>`` for any
  host name without a dot; a host that matches goes direct. A list that cannot be parsed raises
  ``BG_E_INVALID_PROXY_INFO``, fatal (BITS validates them at run time).
* AUTODETECT: there is no WPAD or PAC evaluation here (it needs a JavaScript engine), so it
  behaves as PRECONFIG.

Not done yet: multi-range requests; uploads (another module); CRL download from distribution
points; NTLM/Negotiate proxy authentication for https:// URLs; Passport.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import functools
import hashlib
import ipaddress
import os
import re
import secrets
import socket
import ssl
import sys
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, Final

import aiohttp
import attrs
from aiohttp.client_proto import ResponseHandler
from aiohttp.http import HttpProcessingError
from aiohttp.tracing import Trace
from yarl import URL

from backhaul.core import hresult as hr
from backhaul.core.error import TransferError
from backhaul.core.failure import is_transient
from backhaul.core.port import (
    RANGES,
    VALIDATORS,
    ClientIdentity,
    ClosedOnExit,
    Download,
    PlainCredentials,
    RemoteFile,
    RequestOptions,
    ServerCertificateValidator,
    Transport,
    header_block,
)
from backhaul.core.url import redact_url, scrub_text
from backhaul.core.value import ClientCertificate
from backhaul.core.vocabulary import (
    REDIRECT_POLICY_MASK,
    AuthScheme,
    AuthTarget,
    ErrorContext,
    ProxyUsage,
    SecurityFlags,
)
from backhaul.transports.aiohttp_limits import (
    MAX_HEADER_LINE,
    MAX_RESPONSE_HEADERS,
    cut_short_why,
    unreadable_why,
)

if TYPE_CHECKING:
    from cryptography import x509

__all__ = [
    "CERT_REVOCATION_FAILED",
    "CERT_REVOKED",
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_LIMIT_PER_HOST",
    "DEFAULT_STALL_TIMEOUT",
    "DEFAULT_USER_AGENT",
    "HTTP_TIMEOUT",
    "MAX_HEADER_LINE",
    "MAX_REDIRECTS",
    "MAX_RESPONSE_HEADERS",
    "MAX_RETRY_AFTER",
    "NO_ACCESS_PRIVATE_KEY",
    "SECURE_FAILURE",
    "ClientCertificateSource",
    "ClientIdentity",
    "HttpDownload",
    "HttpTransport",
    "ServerCertificateValidator",
    "parse_bypass_list",
    "parse_proxy_list",
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
MAX_RETRY_AFTER: Final = 365 * 24 * 3600.0
"""The longest Retry-After honoured, in seconds (a year): longer ones are clamped to it."""

HTTP_TIMEOUT: Final = hr.hresult_from_win32(hr.ERROR_WINHTTP_TIMEOUT)
"""0x80072EE2, what BITS reports when WinHTTP's receive timeout fires: our stall. Transient."""
SECURE_FAILURE: Final = hr.hresult_from_win32(hr.ERROR_WINHTTP_SECURE_FAILURE)
"""0x80072F8F, WinHTTP's code for a server certificate that failed verification. Fatal."""
CERT_REVOKED: Final = hr.hresult_from_win32(hr.ERROR_WINHTTP_SECURE_CERT_REVOKED)
"""0x80072F8A: the server certificate is revoked (ENABLE_CRL_CHECK). Fatal."""
CERT_REVOCATION_FAILED: Final = hr.hresult_from_win32(hr.ERROR_WINHTTP_SECURE_CERT_REV_FAILED)
"""0x80072F19: the revocation status could not be checked (no current CRL). Fatal."""
NO_ACCESS_PRIVATE_KEY: Final = hr.hresult_from_win32(
    hr.ERROR_WINHTTP_CLIENT_CERT_NO_ACCESS_PRIVATE_KEY
)
"""0x80072F9A: the client certificate's private key cannot be used. Fatal."""

# Codes failure.TRANSIENT does not classify yet, decided here: BITS says revocation failures
# are fatal (§10).

_WHOLE_BODY: Final = frozenset({200, 203})
_REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})
_HEAD_NOT_REFUSED: Final = frozenset({401, 403, 404, 407, 410})
_RETRY_AFTER_STATUSES: Final = frozenset({429, 503})
_HTTP_SCHEMES: Final = frozenset({"http", "https"})
_CREDENTIAL_HEADERS: Final = frozenset({"authorization", "proxy-authorization", "cookie"})
_SMALL_BODY: Final = 64 * 1024  # error bodies up to this size are read to keep the connection
_DISCARD_SECONDS: Final = 1.0
_AUTH_ROUNDS: Final = 6  # requests per hop: a challenge, a Digest stale retry, NTLM's 2 legs...
_CONTEXT_CACHE: Final = 32  # TLS contexts kept per transport (key: flags, trust, identity, cb)
_DIGEST_CACHE: Final = 64  # Digest protection spaces remembered for preemptive answers
_ACCEPTED_CACHE: Final = 1024  # (host, port, cert hash) a validator accepted
_VALIDATOR_CACHES: Final = 64  # validators (jobs) whose acceptances are remembered

_SSL_FLAGS: Final = (
    SecurityFlags.ENABLE_CRL_CHECK
    | SecurityFlags.IGNORE_CERT_CN_INVALID
    | SecurityFlags.IGNORE_CERT_DATE_INVALID
    | SecurityFlags.IGNORE_UNKNOWN_CA
    | SecurityFlags.IGNORE_CERT_WRONG_USAGE
)
_OWN_VERIFICATION: Final = SecurityFlags.IGNORE_UNKNOWN_CA | SecurityFlags.IGNORE_CERT_WRONG_USAGE
_X509_V_FLAG_NO_CHECK_TIME: Final = 0x200000  # OpenSSL >= 1.1.0; Python has no name for it
# OpenSSL verify codes (x509_vfy.h) that mean "revocation could not be checked" / "revoked".
_X509_REVOKED: Final = 23
_X509_REVOCATION_UNKNOWN: Final = frozenset({3, 8, 11, 12, 33})  # no CRL, bad/old CRL, issuer

# -------------------------------------------------------------------------------------------------
# Errors: ONE table from foreign exceptions to (HRESULT, context); transient from failure
# -------------------------------------------------------------------------------------------------

_T = ErrorContext.GENERAL_TRANSPORT
_R = ErrorContext.REMOTE_FILE

# First match wins, so subclasses come before their bases (asyncio.TimeoutError is an OSError;
# ssl.SSLError is an OSError; aiohttp's connector errors are ClientOSErrors). Whether a code is
# transient is not a column: it is failure.is_transient's answer (see _is_transient).
# Certificate verification errors are refined by their OpenSSL verify code (_certificate_code).
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
    """The URL for messages: no user info, secret query values ``<redacted>``."""
    return redact_url(str(url))


def _certificate_code(exc: BaseException) -> int:
    """A certificate verification failure: revoked, revocation unknown, or any other."""
    cause = getattr(exc, "certificate_error", exc)
    verify_code = getattr(cause, "verify_code", None)
    if verify_code == _X509_REVOKED:
        return CERT_REVOKED
    if verify_code in _X509_REVOCATION_UNKNOWN:
        return CERT_REVOCATION_FAILED
    return SECURE_FAILURE


def _translate(exc: BaseException, url: str | URL) -> TransferError:
    for cls, code, context in _EXCEPTION_TABLE:
        if isinstance(exc, cls):
            if code == SECURE_FAILURE:
                code = _certificate_code(exc)
            return TransferError(
                code, _described(exc, url), context=context, transient=_is_transient(code)
            )
    raise exc


def _described(exc: BaseException, url: str | URL) -> str:
    """The error's description (what ``info`` and ``get`` show): plain words for a
    connection that could not be made, else the exception's name and text, scrubbed of the
    URLs' secrets (a ``ClientResponseError``'s text ends in the request's real URL, signature
    and all: its status and message are used instead)."""
    tls = (aiohttp.ClientConnectorCertificateError, aiohttp.ClientConnectorSSLError)
    if isinstance(exc, aiohttp.ClientConnectorError) and not isinstance(exc, tls):
        os_error = exc.os_error  # refused, unreachable, no such host
        if isinstance(os_error, socket.gaierror) or not os_error.errno:
            why = os_error.strerror or str(os_error) or type(os_error).__name__
        else:  # asyncio's text is 'Connect call failed (address)'
            why = os.strerror(os_error.errno)
        return f"cannot connect to {exc.host}:{exc.port} for {_redact(url)}: {why}"
    if isinstance(exc, aiohttp.ClientResponseError) and isinstance(
        exc.__cause__, HttpProcessingError
    ):
        # aiohttp's parser refused the response: the client, not the server, says 400 there.
        return f"the server's response headers could not be read from {_redact(url)}: " + (
            unreadable_why(exc.__cause__)
        )
    if isinstance(exc, aiohttp.ClientResponseError):
        detail = f"{exc.status}, message={exc.message!r}"
    else:
        detail = str(exc) or type(exc).__name__
    return f"{type(exc).__name__} for {_redact(url)}: {scrub_text(detail)}"


_TRANSLATED: Final = tuple(cls for cls, _, _ in _EXCEPTION_TABLE)


@contextlib.contextmanager
def _translated(url: str | URL) -> Iterator[None]:
    """Turn every exception of the table into a TransferError (wraps awaits too)."""
    try:
        yield
    except _TRANSLATED as exc:
        raise _translate(exc, url) from exc


def _fatal(code: int, message: str, context: ErrorContext = _T) -> TransferError:
    return TransferError(code, message, context=context, transient=False)


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
        response_headers=_header_block(resp),
    )


def _protocol_error(resp: aiohttp.ClientResponse, why: str) -> TransferError:
    code = hr.BG_E_INVALID_SERVER_RESPONSE
    return TransferError(
        code,
        f"{why} (HTTP {resp.status} from {_redact(resp.url)})",
        context=ErrorContext.REMOTE_FILE,
        transient=_is_transient(code),
        response_headers=_header_block(resp),
    )


# -------------------------------------------------------------------------------------------------
# TLS: contexts from the security flags, client identities, checks after the handshake
# -------------------------------------------------------------------------------------------------


ClientCertificateSource = Callable[[ClientCertificate], ClientIdentity]
"""Opens a store reference; raises TransferError (CRYPT_E_NOT_FOUND, ...) when it cannot."""

# ServerCertificateValidator and ClientIdentity live in core/port.py
"""``validator(host, port, chain_der) -> HRESULT``: S_OK (0) accepts the server certificate."""


@dataclass(frozen=True, eq=False)
class _TlsPolicy:
    """What to check after the handshake of a connection made with a ``_TlsContext``."""

    flags: int
    anchors: tuple[x509.Certificate, ...]  # for IGNORE_CERT_WRONG_USAGE's own chain check
    validator: ServerCertificateValidator | None
    accepted: collections.OrderedDict[tuple[str, int, bytes], None] | None

    @property
    def own_verification(self) -> bool:
        return bool(self.flags & _OWN_VERIFICATION)


class _TlsContext(ssl.SSLContext):
    """An SSLContext that carries the checks its connections need after the handshake."""

    backhaul_policy: _TlsPolicy | None = None


def _new_context(ca_bundle: str | None) -> _TlsContext:
    """What ``ssl.create_default_context(cafile=ca_bundle)`` makes, as a ``_TlsContext``."""
    ctx = _TlsContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    if sys.version_info >= (3, 13):  # what create_default_context does there
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT | ssl.VERIFY_X509_PARTIAL_CHAIN
    try:
        if ca_bundle is not None:
            ctx.load_verify_locations(cafile=ca_bundle)
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    except (OSError, ssl.SSLError) as exc:
        raise _fatal(
            SECURE_FAILURE, f"cannot load the CA bundle {ca_bundle!r}: {exc.strerror or exc}"
        ) from None
    return ctx


def _load_identity(ctx: ssl.SSLContext, identity: ClientIdentity) -> None:
    """Give OpenSSL the certificate and key through anonymous in-memory files."""
    try:
        with _memory_file(identity.certificate_pem) as cert, _memory_file(identity.key_pem) as key:
            ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise _fatal(
            NO_ACCESS_PRIVATE_KEY,
            f"the client certificate {identity.sha1} or its private key cannot be used: "
            f"{getattr(exc, 'reason', None) or type(exc).__name__}",
        ) from None


@contextlib.contextmanager
def _memory_file(data: bytes) -> Iterator[str]:
    """A path OpenSSL can open once that reads ``data`` and exists only in memory."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("backhaul-tls", os.MFD_CLOEXEC)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    read, write = os.pipe()  # elsewhere: a pipe (a PEM key and chain fit in its buffer)
    try:
        with os.fdopen(write, "wb") as pipe:
            pipe.write(data)
        yield f"/dev/fd/{read}"
    finally:
        os.close(read)


def _load_anchors(ca_bundle: str | None) -> tuple[x509.Certificate, ...]:
    """The trust anchors as ``cryptography`` certificates (for IGNORE_CERT_WRONG_USAGE)."""
    from cryptography import x509

    paths = ssl.get_default_verify_paths()
    files = [ca_bundle] if ca_bundle else [p for p in (paths.cafile, paths.openssl_cafile) if p]
    if not ca_bundle and paths.capath and os.path.isdir(paths.capath):
        files += sorted(
            os.path.join(paths.capath, n) for n in os.listdir(paths.capath) if n.endswith(".pem")
        )
    anchors: list[x509.Certificate] = []
    for name in files:
        try:
            with open(name, "rb") as f:
                data = f.read()
        except OSError:
            continue
        for block in re.findall(
            rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", data, re.S
        ):
            with contextlib.suppress(ValueError):
                anchors.append(x509.load_pem_x509_certificate(block))
        if anchors and not ca_bundle:
            break  # the first system bundle found is the system's trust
    return tuple(anchors)


def _der_chain(ssl_object: Any, *, verified: bool) -> list[bytes]:
    """The peer's chain as DER, server certificate first (the verified chain when OpenSSL
    verified it, else what the server sent)."""
    public = getattr(ssl_object, "get_verified_chain" if verified else "get_unverified_chain", None)
    if public is not None:  # Python >= 3.13
        chain = public()
        if chain:
            return [bytes(c) for c in chain]
    private = getattr(getattr(ssl_object, "_sslobj", None), "get_unverified_chain", None)
    if verified:
        private = getattr(getattr(ssl_object, "_sslobj", None), "get_verified_chain", private)
    if private is not None:
        chain = private()
        if chain:
            return [c.public_bytes(ssl._ssl.ENCODING_DER) for c in chain]  # type: ignore[attr-defined]
    leaf = ssl_object.getpeercert(binary_form=True)
    return [leaf] if leaf else []


def _host_matches(cert: x509.Certificate, host: str) -> bool:
    """RFC 6125 as Python's ssl does it: subjectAltName only, a wildcard only as the whole
    left-most label, IP addresses against IP entries."""
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        ip = None
    if ip is not None:
        return ip in san.get_values_for_type(x509.IPAddress)
    labels = host.lower().rstrip(".").split(".")
    for name in san.get_values_for_type(x509.DNSName):
        pattern = name.lower().rstrip(".").split(".")
        if len(pattern) != len(labels):
            continue
        if pattern[0] == "*" and len(pattern) > 2 and pattern[1:] == labels[1:]:
            return True
        if pattern == labels:
            return True
    return False


def _allows_server_auth(cert: x509.Certificate) -> bool:
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return (
        ExtendedKeyUsageOID.SERVER_AUTH in eku or ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in eku
    )


def _verify_ourselves(policy: _TlsPolicy, host: str, ders: list[bytes]) -> list[bytes]:
    """The checks OpenSSL could not be told to make (IGNORE_UNKNOWN_CA, IGNORE_CERT_WRONG_USAGE).
    Returns the chain the validator callback gets."""
    from cryptography import x509
    from cryptography.x509 import verification as v

    flags = policy.flags
    if flags & SecurityFlags.ENABLE_CRL_CHECK:
        raise _fatal(
            CERT_REVOCATION_FAILED,
            f"{host}: the CRL check needs OpenSSL's verification, which IGNORE_UNKNOWN_CA and "
            "IGNORE_CERT_WRONG_USAGE turn off",
        )
    if not ders:
        raise _fatal(SECURE_FAILURE, f"{host} sent no certificate")
    try:
        chain = [x509.load_der_x509_certificate(d) for d in ders]
    except ValueError as exc:
        raise _fatal(
            SECURE_FAILURE, f"{host} sent a certificate that cannot be parsed: {exc}"
        ) from None
    leaf = chain[0]
    now = datetime.now(UTC)
    start, end = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    dates = not flags & SecurityFlags.IGNORE_CERT_DATE_INVALID
    if dates and not start <= now <= end:
        raise _fatal(SECURE_FAILURE, f"{host}: the certificate is valid from {start} to {end}")
    if not flags & SecurityFlags.IGNORE_CERT_CN_INVALID and not _host_matches(leaf, host):
        raise _fatal(SECURE_FAILURE, f"{host}: the certificate's names do not match the host")
    if not flags & SecurityFlags.IGNORE_CERT_WRONG_USAGE and not _allows_server_auth(leaf):
        raise _fatal(SECURE_FAILURE, f"{host}: the certificate is not for server authentication")
    if flags & SecurityFlags.IGNORE_UNKNOWN_CA:
        return ders
    when = min(max(now, start + timedelta(seconds=1)), end - timedelta(seconds=1))
    try:
        verified = (
            v.PolicyBuilder()
            .store(v.Store(list(policy.anchors)))
            .time(now if dates else when)
            .extension_policies(
                ca_policy=v.ExtensionPolicy.webpki_defaults_ca(),
                ee_policy=v.ExtensionPolicy.permit_all(),
            )
            .build_client_verifier()  # no name or usage rules: those are checked above
            .verify(leaf, chain[1:])
        )
    except (v.VerificationError, ValueError) as exc:
        raise _fatal(
            SECURE_FAILURE, f"{host}: the certificate chain is not trusted: {exc}"
        ) from None
    from cryptography.hazmat.primitives.serialization import Encoding

    return [c.public_bytes(Encoding.DER) for c in verified.chain]


def _ask_validator(policy: _TlsPolicy, host: str, port: int, ders: list[bytes]) -> None:
    validator = policy.validator
    if validator is None or not ders:
        return
    key = (host, port, hashlib.sha256(ders[0]).digest())
    accepted = policy.accepted
    if accepted is not None and key in accepted:
        accepted.move_to_end(key)
        return
    try:
        answer = validator(host, port, tuple(ders))
    except Exception as exc:  # the application's code: its failure is a refusal
        answer, why = hr.E_FAIL, f"raised {type(exc).__name__}"
    else:
        why = f"returned {hr.name_of(answer) if isinstance(answer, int) else answer!r}"
    if answer != hr.S_OK:
        code = (
            answer if isinstance(answer, int) and hr.is_failure(answer & 0xFFFFFFFF) else hr.E_FAIL
        )
        raise TransferError(
            code & 0xFFFFFFFF,
            f"the server certificate callback refused {host}:{port} ({why})",
            context=ErrorContext.SERVER_CERTIFICATE_CALLBACK,
            transient=True,  # BITS: TRANSIENT_ERROR whatever the callback's HRESULT
        )
    if accepted is not None:
        accepted[key] = None
        while len(accepted) > _ACCEPTED_CACHE:
            accepted.popitem(last=False)


class _Connector(aiohttp.TCPConnector):
    """aiohttp's connector plus the checks of a ``_TlsContext`` on every new connection, made
    after the TLS handshake and before the first request goes out on it."""

    async def _create_connection(
        self,
        req: aiohttp.ClientRequest,
        traces: list[Trace],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 (aiohttp's signature)
    ) -> ResponseHandler:
        proto = await super()._create_connection(req, traces, timeout)
        policy = getattr(req.ssl, "backhaul_policy", None)
        if policy is not None and req.is_ssl():
            try:
                transport = proto.transport
                ssl_object = transport.get_extra_info("ssl_object") if transport else None
                if ssl_object is None:
                    raise _fatal(SECURE_FAILURE, f"no TLS session with {req.host}")
                host = req.server_hostname or req.host
                if policy.own_verification:
                    ders = _verify_ourselves(policy, host, _der_chain(ssl_object, verified=False))
                else:
                    ders = _der_chain(ssl_object, verified=True)
                _ask_validator(policy, host, req.port or 443, ders)
            except BaseException:
                proto.close()
                raise
        return proto


# -------------------------------------------------------------------------------------------------
# Proxies: BITS lists, curl's environment rules
# -------------------------------------------------------------------------------------------------

_HOST_PORT = re.compile(
    r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9\-_.]*[A-Za-z0-9_])?)"
    r"(?::(?P<port>\d{1,5}))?$"
)
_BYPASS = re.compile(r"^(?:<local>|\*?[A-Za-z0-9\-_.:\[\]]*[A-Za-z0-9\]])$", re.I)
_PROXY_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_LIST_SPLIT = re.compile(r"[\s;]+")


@dataclass(frozen=True)
class _ProxyEntry:
    scheme: str | None  # the URL scheme it serves ("http", "https"), None for every scheme
    url: URL


def parse_proxy_list(text: str) -> tuple[_ProxyEntry, ...]:
    """A BITS proxy list (``[scheme=][scheme://]host[:port]`` entries, space-delimited).
    Raises ``ValueError`` naming the first entry that is not valid."""
    entries = []
    for raw in _LIST_SPLIT.split(text.strip()):
        if not raw:
            continue
        rest, serves = raw, None
        if "=" in rest:
            serves, _, rest = rest.partition("=")
            serves = serves.lower()
            if serves not in _HTTP_SCHEMES:
                raise ValueError(f"proxy entry {raw!r}: {serves!r} is not http or https")
        scheme = "http"
        if "://" in rest:
            scheme, _, rest = rest.partition("://")
            scheme = scheme.lower()
            if scheme not in _HTTP_SCHEMES:
                raise ValueError(f"proxy entry {raw!r}: a proxy speaks http or https")
        match = _HOST_PORT.match(rest)
        if match is None:
            raise ValueError(f"proxy entry {raw!r} is not [scheme=][scheme://]host[:port]")
        port = int(match["port"]) if match["port"] else _PROXY_DEFAULT_PORTS[scheme]
        if not 0 < port < 65536:
            raise ValueError(f"proxy entry {raw!r}: port {port} is out of range")
        host = match["host"]
        if host.startswith("["):
            try:
                ipaddress.IPv6Address(host[1:-1])
            except ValueError:
                raise ValueError(f"proxy entry {raw!r}: {host} is not an IPv6 address") from None
        entries.append(
            _ProxyEntry(serves, URL.build(scheme=scheme, host=host.strip("[]"), port=port))
        )
    if not entries:
        raise ValueError("the proxy list is empty")
    return tuple(entries)


def parse_bypass_list(text: str | None) -> tuple[str, ...]:
    """A BITS bypass list (host names or IP addresses with at most a leading ``*``, and
    ``<local>``), lower-cased. Raises ``ValueError`` naming the first entry that is not valid."""
    entries = []
    for raw in _LIST_SPLIT.split((text or "").strip()):
        if not raw:
            continue
        if not _BYPASS.match(raw) or "*" in raw[1:]:
            raise ValueError(f"bypass entry {raw!r} is not a host, *.suffix or <local>")
        entries.append(raw.lower())
    return tuple(entries)


def _bypassed(host: str, port: int | None, entries: Sequence[str]) -> bool:
    host = host.lower().strip("[]")
    with_port = f"{host}:{port}" if port is not None else host
    for entry in entries:
        if entry == "<local>":
            if "." not in host and ":" not in host:
                return True
        elif entry.startswith("*"):
            if host.endswith(entry[1:]) or with_port.endswith(entry[1:]):
                return True
        elif entry.strip("[]") in (host, with_port):
            return True
    return False


def _no_proxy(host: str, value: str) -> bool:
    """curl's NO_PROXY: ``*``, host names matching as themselves or as a domain suffix,
    IP addresses and CIDR ranges; comma or space separated."""
    host = host.lower().strip("[]").rstrip(".")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    for raw in re.split(r"[\s,]+", value.strip()):
        entry = raw.lower().rstrip(".")
        if not entry:
            continue
        if entry == "*":
            return True
        if ip is not None:
            with contextlib.suppress(ValueError):
                if ip in ipaddress.ip_network(entry.strip("[]"), strict=False):
                    return True
            continue
        entry = entry.removeprefix("*").removeprefix(".")
        if host == entry or host.endswith("." + entry):
            return True
    return False


def _environment_proxy(target: URL, environ: Mapping[str, str]) -> URL | None:
    """curl's rules: http_proxy (lower case only: HTTP_PROXY can be set by a CGI request),
    https_proxy / HTTPS_PROXY, else all_proxy / ALL_PROXY; minus no_proxy / NO_PROXY."""
    scheme = target.scheme
    names = ("http_proxy",) if scheme == "http" else ("https_proxy", "HTTPS_PROXY")
    value = next((environ[n] for n in (*names, "all_proxy", "ALL_PROXY") if environ.get(n)), None)
    if not value:
        return None
    no_proxy = environ.get("no_proxy") or environ.get("NO_PROXY") or ""
    if no_proxy and target.host and _no_proxy(target.host, no_proxy):
        return None
    text = value.strip()
    if "://" not in text:
        text = f"http://{text}"
    try:
        proxy = URL(text)
        port = proxy.port
    except ValueError:
        raise ValueError(f"the environment's proxy {_redact(text)!r} is not a URL") from None
    if proxy.scheme not in _HTTP_SCHEMES or not proxy.host or port is None:
        raise ValueError(f"the environment's proxy {_redact(text)!r} is not an http(s) proxy")
    return proxy


def _proxies_for(target: URL, options: RequestOptions, environ: Mapping[str, str]) -> list[URL]:
    """The proxies to try for ``target``, in order; empty means a direct connection."""
    settings = options.proxy
    try:
        usage = ProxyUsage(settings.usage)
        if usage is ProxyUsage.NO_PROXY:
            return []
        if usage in (ProxyUsage.PRECONFIG, ProxyUsage.AUTODETECT):
            proxy = _environment_proxy(target, environ)
            return [proxy] if proxy is not None else []
        entries = parse_proxy_list(settings.proxy_list or "")
        bypass = parse_bypass_list(settings.bypass_list)
    except ValueError as exc:
        raise _fatal(hr.BG_E_INVALID_PROXY_INFO, f"invalid proxy settings: {exc}") from None
    if target.host and _bypassed(target.host, target.explicit_port, bypass):
        return []
    specific = [e.url for e in entries if e.scheme == target.scheme]
    return specific or [e.url for e in entries if e.scheme is None]


# -------------------------------------------------------------------------------------------------
# Authentication: challenges, Basic, Digest, NTLM and Negotiate
# -------------------------------------------------------------------------------------------------

_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_PARAM = re.compile(rf'^\s*({_TOKEN})\s*=\s*({_TOKEN}|"(?:[^"\\]|\\.)*")\s*$', re.S)
_SCHEME = re.compile(rf"^\s*({_TOKEN})(?:\s+(.*?))?\s*$", re.S)
_TOKEN68 = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")
_PREFERENCE: Final = (AuthScheme.NEGOTIATE, AuthScheme.NTLM, AuthScheme.DIGEST, AuthScheme.BASIC)
_SCHEME_NAMES: Final = {
    AuthScheme.BASIC: "Basic",
    AuthScheme.DIGEST: "Digest",
    AuthScheme.NTLM: "NTLM",
    AuthScheme.NEGOTIATE: "Negotiate",
}
_BY_NAME: Final = {name.lower(): scheme for scheme, name in _SCHEME_NAMES.items()}
_DIGEST_HASHES: Final[dict[str, Callable[[bytes], Any]]] = {
    "md5": hashlib.md5,
    "sha-256": hashlib.sha256,
}


@dataclass
class _Challenge:
    scheme: str  # lower case
    token: str | None = None
    params: dict[str, str] = field(default_factory=dict)


def _split_list(value: str) -> list[str]:
    """Split a header value at the commas that are not inside a quoted string."""
    items: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in value:
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            items.append("".join(current))
            current = []
            continue
        current.append(char)
    items.append("".join(current))
    return [item for item in items if item.strip()]


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def _parse_challenges(values: Iterable[str]) -> list[_Challenge]:
    """WWW-Authenticate / Proxy-Authenticate header values as challenges (RFC 7235)."""
    challenges: list[_Challenge] = []
    for value in values:
        for item in _split_list(value):
            param = _PARAM.match(item)
            if param is not None and challenges and challenges[-1].token is None:
                challenges[-1].params[param[1].lower()] = _unquote(param[2])
                continue
            scheme = _SCHEME.match(item)
            if scheme is None:
                continue
            challenge = _Challenge(scheme[1].lower())
            rest = scheme[2] or ""
            if _TOKEN68.match(rest):
                challenge.token = rest
            elif (first := _PARAM.match(rest)) is not None:
                challenge.params[first[1].lower()] = _unquote(first[2])
            challenges.append(challenge)
    return challenges


def _basic(entry: PlainCredentials) -> str:
    return aiohttp.encode_basic_auth(entry.user_name or "", entry.password or "")


@dataclass
class _DigestSpace:
    """A Digest protection space's last challenge, reused preemptively (nonce count grows)."""

    realm: str
    nonce: str
    algorithm: str
    qop: str | None
    opaque: str | None
    count: int = 0

    @classmethod
    def of(cls, challenge: _Challenge) -> _DigestSpace | None:
        p = challenge.params
        algorithm = p.get("algorithm", "MD5")
        if "realm" not in p or "nonce" not in p:
            return None
        if algorithm.lower().removesuffix("-sess") not in _DIGEST_HASHES:
            return None
        offered = [q.strip().lower() for q in p.get("qop", "").split(",") if q.strip()]
        qop = "auth" if "auth" in offered else "auth-int" if "auth-int" in offered else None
        if offered and qop is None:
            return None
        return cls(p["realm"], p["nonce"], algorithm, qop, p.get("opaque"))

    def authorization(self, entry: PlainCredentials, method: str, uri: str) -> str:
        hash_name = self.algorithm.lower()
        sess = hash_name.endswith("-sess")

        def h(text: str) -> str:
            return str(_DIGEST_HASHES[hash_name.removesuffix("-sess")](text.encode()).hexdigest())

        self.count += 1
        nc, cnonce = f"{self.count:08x}", secrets.token_hex(16)
        ha1 = h(f"{entry.user_name or ''}:{self.realm}:{entry.password or ''}")
        if sess:
            ha1 = h(f"{ha1}:{self.nonce}:{cnonce}")
        ha2 = h(f"{method}:{uri}:{h('')}" if self.qop == "auth-int" else f"{method}:{uri}")
        if self.qop:
            response = h(f"{ha1}:{self.nonce}:{nc}:{cnonce}:{self.qop}:{ha2}")
        else:
            response = h(f"{ha1}:{self.nonce}:{ha2}")

        def q(text: str) -> str:
            return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

        parts = [
            f"username={q(entry.user_name or '')}",
            f"realm={q(self.realm)}",
            f"nonce={q(self.nonce)}",
            f"uri={q(uri)}",
            f"algorithm={self.algorithm}",
            f"response={q(response)}",
        ]
        if self.opaque is not None:
            parts.append(f"opaque={q(self.opaque)}")
        if self.qop:
            parts += [f"qop={self.qop}", f"nc={nc}", f"cnonce={q(cnonce)}"]
        return "Digest " + ", ".join(parts)


class _Authenticator:
    """The credentials of one target (server or proxy) for one request and its retries: what
    to send first, and how to answer a challenge. Lives for one hop of one request."""

    def __init__(
        self,
        target: AuthTarget,
        credentials: Sequence[PlainCredentials],
        spaces: collections.OrderedDict[tuple[str, str], _DigestSpace],
        space: str,
    ) -> None:
        self.header = "Authorization" if target is AuthTarget.SERVER else "Proxy-Authorization"
        self.challenge_header = (
            "WWW-Authenticate" if target is AuthTarget.SERVER else "Proxy-Authenticate"
        )
        self.entries: dict[AuthScheme, PlainCredentials] = {}
        for entry in credentials:
            if entry.target == target and entry.scheme in _SCHEME_NAMES:
                self.entries.setdefault(AuthScheme(entry.scheme), entry)
        self._spaces = spaces
        self._space = space
        self._tried: set[AuthScheme] = set()  # schemes whose one real answer was sent
        self._digest: _DigestSpace | None = None
        self._spnego: Any = None
        self._spnego_scheme: AuthScheme | None = None
        self.value: str | None = None  # the header to send next
        self.bound = False  # NTLM / Negotiate: the exchange must stay on one connection
        self.bound_key: tuple[object, ...] | None = None

    def __bool__(self) -> bool:
        return bool(self.entries)

    def first(self, method: str, uri: str) -> str | None:
        """Preemptive credentials: Basic, or Digest for a space that challenged before.

        A Digest answer from the cache is not Digest's try: the server may have forgotten
        that nonce (it restarted, it expires nonces) and challenge afresh without
        ``stale=true``; the credentials still get their real answer to that challenge, and
        only a refused real answer makes the 401 final. (Basic has no such state: a refused
        preemptive Basic is a refused answer.)"""
        basic = self.entries.get(AuthScheme.BASIC)
        digest = self.entries.get(AuthScheme.DIGEST)
        if digest is not None:
            space = self._spaces.get((self._space, digest.user_name or ""))
            if space is not None:
                self._digest = space
                self.value = space.authorization(digest, method, uri)
                return self.value
        if basic is not None:
            self._tried.add(AuthScheme.BASIC)
            self.value = _basic(basic)
        return self.value

    def answer(
        self, values: Sequence[str], method: str, uri: str, host: str, *, tunnel: bool
    ) -> bool:
        """Prepare ``value`` to answer these challenges; False when they cannot be satisfied."""
        challenges = _parse_challenges(values)
        if self._spnego is not None:
            return self._continue_spnego(challenges)
        offered = {c.scheme: c for c in reversed(challenges)}
        digest = offered.get("digest")
        if self._digest is not None and digest is not None:
            stale = digest.params.get("stale", "").lower() == "true"
            space = _DigestSpace.of(digest)
            self._forget_digest()
            if stale and space is not None:  # a new nonce, same credentials: answer once more
                return self._use_digest(space, method, uri)
        for scheme in _PREFERENCE:
            challenge = offered.get(_SCHEME_NAMES[scheme].lower())
            entry = self.entries.get(scheme)
            if challenge is None or entry is None or scheme in self._tried:
                continue
            self._tried.add(scheme)
            if scheme is AuthScheme.BASIC:
                self.value = _basic(entry)
                return True
            if scheme is AuthScheme.DIGEST:
                space = _DigestSpace.of(challenge)
                if space is not None:
                    return self._use_digest(space, method, uri)
                continue
            if tunnel:
                continue  # a refused CONNECT closes its connection: no connection-bound auth
            if self._start_spnego(scheme, entry, host):
                return True
        return False

    def _use_digest(self, space: _DigestSpace, method: str, uri: str) -> bool:
        entry = self.entries[AuthScheme.DIGEST]
        self._digest = space
        self._spaces[(self._space, entry.user_name or "")] = space
        self._spaces.move_to_end((self._space, entry.user_name or ""))
        while len(self._spaces) > _DIGEST_CACHE:
            self._spaces.popitem(last=False)
        self.value = space.authorization(entry, method, uri)
        return True

    def _forget_digest(self) -> None:
        entry = self.entries.get(AuthScheme.DIGEST)
        if entry is not None:
            self._spaces.pop((self._space, entry.user_name or ""), None)
        self._digest = None

    def _start_spnego(self, scheme: AuthScheme, entry: PlainCredentials, host: str) -> bool:
        try:
            import spnego

            self._spnego = spnego.client(
                entry.user_name,
                entry.password,
                hostname=host,
                service="HTTP",
                protocol=_SCHEME_NAMES[scheme].lower(),
            )
            token = self._spnego.step()
        except Exception:  # no Kerberos, a bad user name...: this scheme cannot answer
            self._spnego = None
            return False
        self._spnego_scheme = scheme
        self.bound = True
        secret = hashlib.sha256((entry.password or "").encode()).hexdigest()
        self.bound_key = (int(scheme), entry.user_name, secret)
        self.value = f"{_SCHEME_NAMES[scheme]} {base64.b64encode(token).decode('ascii')}"
        return True

    def _continue_spnego(self, challenges: Sequence[_Challenge]) -> bool:
        assert self._spnego_scheme is not None
        name = _SCHEME_NAMES[self._spnego_scheme].lower()
        challenge = next((c for c in challenges if c.scheme == name and c.token), None)
        if challenge is None or challenge.token is None or self._spnego.complete:
            return False  # refused (a bare challenge again) or already done
        try:
            token = self._spnego.step(base64.b64decode(challenge.token))
        except Exception:
            return False
        if not token:
            return False
        self.value = f"{_SCHEME_NAMES[self._spnego_scheme]} {base64.b64encode(token).decode()}"
        return True


# -------------------------------------------------------------------------------------------------
# Header values
# -------------------------------------------------------------------------------------------------


def _digits(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _http_date(value: str | None) -> datetime | None:
    if not value:
        return None
    return _parsed_date(value)


@functools.lru_cache(maxsize=256)  # files served together share their Last-Modified
def _parsed_date(value: str) -> datetime | None:
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):  # a year of 30 digits overflows
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _retry_after(value: str | None, date: str | None) -> float | None:
    """Retry-After as seconds: delta-seconds, or an HTTP-date measured from the response's own
    Date header when it has one (immune to clock skew), else from our clock. None when there
    is none or it is neither (the hint is ignored; the 429/503 stays what it is).

    It is the server's word, so it is clamped to ``MAX_RETRY_AFTER`` (a year): a wait of a
    thousand years or of 400 digits is a mistake, and the engine must be able to add it to a
    date. A run of digits is not converted beyond the bound (Python refuses ``int()`` of
    more than 4300 digits, and ``float()`` of a 400-digit int overflows)."""
    if value is None:
        return None
    value = value.strip()
    if _digits(value):
        digits = value.lstrip("0") or "0"
        if len(digits) > len(str(int(MAX_RETRY_AFTER))):
            return MAX_RETRY_AFTER
        return min(float(digits), MAX_RETRY_AFTER)
    when = _http_date(value)
    if when is None:
        return None
    now = _http_date(date) or datetime.now(UTC)
    return min(max(0.0, (when - now).total_seconds()), MAX_RETRY_AFTER)


# -------------------------------------------------------------------------------------------------
# Reading responses
# -------------------------------------------------------------------------------------------------


def _header_block(resp: aiohttp.ClientResponse) -> str:
    """The response's raw header block (HTTP_RESPONSE_HEADERS; ``core.port.header_block``)."""
    return header_block(resp.version, resp.status, resp.reason, resp.raw_headers)


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


def _shorter_than(resp: aiohttp.ClientResponse, offset: int) -> bool:
    """A 416 whose ``Content-Range: bytes */size`` puts the end of the file before ``offset``."""
    if resp.status != 416:
        return False
    size = _unsatisfied_size(resp)
    return size is not None and size < offset


def _unsatisfied_size(resp: aiohttp.ClientResponse) -> int | None:
    """The size in a 416's ``Content-Range: bytes */size``."""
    value = resp.headers.get("Content-Range", "").strip()
    unit, _, spec = value.partition(" ")
    if unit.lower() == "bytes" and spec.startswith("*/") and _digits(spec[2:]):
        return int(spec[2:])
    return None


def _remote(
    resp: aiohttp.ClientResponse,
    size: int | None,
    validator: str | None = None,
    *,
    redirected: str | None = None,
) -> RemoteFile:
    last_modified = resp.headers.get("Last-Modified")
    return RemoteFile(
        url=str(resp.url),
        size=size,
        validator=_validator(resp) or validator,
        last_modified=_http_date(last_modified),
        accepts_ranges=_accepts_ranges(resp),
        headers=_header_block(resp),
        redirect_target=redirected,
    )


async def _discard(resp: aiohttp.ClientResponse) -> None:
    """Done with a response whose body we do not want: read a small body (of a known length,
    or chunked) so that the connection can be reused, otherwise close it. NTLM and Negotiate
    need this: their exchange must stay on the connection that carried the challenge."""
    length = _content_length(resp)
    small = length is not None and 0 < length <= _SMALL_BODY
    chunked = length is None and "chunked" in resp.headers.get("Transfer-Encoding", "").lower()
    if resp.method != "HEAD" and (small or chunked):
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
            async with asyncio.timeout(_DISCARD_SECONDS):
                read = 0
                while read <= _SMALL_BODY:
                    chunk = await resp.content.read(_SMALL_BODY)
                    if not chunk:
                        break
                    read += len(chunk)
    resp.release()  # closes the connection instead when the body was not read to the end


# -------------------------------------------------------------------------------------------------
# The transport
# -------------------------------------------------------------------------------------------------


def _left_in_buffer(content: aiohttp.StreamReader) -> bytes:
    """The body bytes ``content`` still holds after it failed (every public read raises the
    stored error first). ``_read_nowait`` is aiohttp's private drain (3.x, streams.py): if a
    later aiohttp renames or changes it, the bytes are lost as they were before this was
    written (the resume starts earlier), and nothing else breaks."""
    drain = getattr(content, "_read_nowait", None)
    if not callable(drain):
        return b""
    try:
        data = drain(-1)
    except Exception:  # a changed private API: lose the bytes rather than the error
        return b""
    return bytes(data) if isinstance(data, bytes | bytearray) else b""


class HttpDownload(ClosedOnExit):
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

    @property
    def socket(self) -> Any:
        """The connection's socket (the engine reads its receive queue to measure
        idle bandwidth), or None."""
        connection = self._response.connection
        transport = connection.transport if connection is not None else None
        return transport.get_extra_info("socket") if transport is not None else None

    def __aiter__(self) -> AsyncIterator[bytes]:
        if self._chunks is not None or self._closed:
            raise RuntimeError("a Download can be iterated only once, and not after aclose")
        self._chunks = self._read()
        return self._chunks

    async def _read(self) -> AsyncGenerator[bytes, None]:
        resp, received = self._response, 0
        if self._expected == 0:  # an empty file, or a resume at the end: no body to read
            self._complete = True
            resp.release()
            return
        with _translated(resp.url):
            try:
                async for chunk in resp.content.iter_chunked(self._chunk_size):
                    received += len(chunk)
                    if self._expected is not None and received > self._expected:
                        raise _protocol_error(resp, "more body bytes than the headers announced")
                    yield chunk
            except aiohttp.ClientPayloadError as exc:
                # The body was cut short. aiohttp raises that before handing back the bytes
                # that arrived with the close and still sit in its buffer: a server that closes
                # right after sending would otherwise never let a resume get further.
                tail = _left_in_buffer(resp.content)
                received += len(tail)
                if self._expected is not None and received > self._expected:
                    raise _protocol_error(
                        resp, "more body bytes than the headers announced"
                    ) from exc
                for start in range(0, len(tail), self._chunk_size):
                    yield tail[start : start + self._chunk_size]
                raise self._cut_short(received, exc) from exc
        if self._expected is not None and received < self._expected:
            raise self._cut_short(received, None)
        self._complete = True
        resp.release()  # the whole body was read: the connection goes back to the pool

    def _cut_short(self, received: int, exc: aiohttp.ClientPayloadError | None) -> TransferError:
        """BG_E_CONNECTION_CLOSED (transient) for a body that ended after ``received`` bytes;
        ``exc`` is aiohttp's report of it, when it made one. Its text holds a status 400 that
        no server sent (aiohttp's parser errors all carry one): the words here are ours."""
        why = cut_short_why(_redact(self._response.url), received, self._expected, exc)
        code = hr.BG_E_CONNECTION_CLOSED
        return TransferError(
            code, why, context=ErrorContext.GENERAL_TRANSPORT, transient=_is_transient(code)
        )

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


class HttpTransport:
    """BITS-style downloads over HTTP/1.1 with aiohttp. See the module docstring for the rules.

    ``stall_timeout``: seconds without a received byte before a read fails (transient
    ``HTTP_TIMEOUT``). ``connect_timeout``: seconds to open a connection. ``chunk_size``: bytes
    asked per body chunk. ``ssl_context``: a fixed trust for HTTPS, used as it is (tests);
    ``ca_bundle``: a PEM file of trusted CAs (and CRLs) instead of the system's.
    ``certificates``: opens client certificate references (adapters/certstore.py).
    ``server_certificate_validator``: the default server-certificate callback.
    ``environ``: where PRECONFIG proxies come from (default ``os.environ``, read per request).
    ``limit_per_host`` / ``limit``: connection pool bounds. ``user_agent``: the User-Agent
    header (custom headers may override it).
    """

    schemes: frozenset[str] = frozenset(_HTTP_SCHEMES)
    capabilities: frozenset[str] = frozenset({RANGES, VALIDATORS})

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
        ca_bundle: str | os.PathLike[str] | None = None,
        certificates: ClientCertificateSource | None = None,
        server_certificate_validator: ServerCertificateValidator | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        if stall_timeout <= 0 or connect_timeout <= 0:
            raise ValueError("timeouts must be positive")
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        if ssl_context is not None and (ca_bundle or certificates or server_certificate_validator):
            raise ValueError(
                "a fixed ssl_context excludes ca_bundle, certificates and a certificate callback"
            )
        self._stall_timeout = stall_timeout
        self._connect_timeout = connect_timeout
        self._chunk_size = chunk_size
        self._ssl_context = ssl_context
        self._ca_bundle = os.fspath(ca_bundle) if ca_bundle is not None else None
        self._certificates = certificates
        self._validator = server_certificate_validator
        self._environ: Mapping[str, str] = environ if environ is not None else os.environ
        self._limit_per_host = limit_per_host
        self._limit = limit
        self._user_agent = user_agent
        self._session: aiohttp.ClientSession | None = None
        self._bound: dict[tuple[object, ...], aiohttp.ClientSession] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._default_tls: ssl.SSLContext | None = ssl_context
        self._contexts: collections.OrderedDict[tuple[object, ...], _TlsContext] = (
            collections.OrderedDict()
        )
        self._accepted: collections.OrderedDict[
            ServerCertificateValidator, collections.OrderedDict[tuple[str, int, bytes], None]
        ] = collections.OrderedDict()
        self._digest_spaces: collections.OrderedDict[tuple[str, str], _DigestSpace] = (
            collections.OrderedDict()
        )

    # -- sessions --------------------------------------------------------------------------------

    def _new_session(self, limit: int, limit_per_host: int) -> aiohttp.ClientSession:
        # Every https request passes its own context (``_tls_for``), so the connector's
        # default serves plain http only: not loading the system CAs for it saves a plain-http
        # process 20-26 ms (measured here).
        connector = _Connector(ssl=True, limit=limit, limit_per_host=limit_per_host)
        return aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=self._connect_timeout, sock_read=self._stall_timeout
            ),
            headers={"User-Agent": self._user_agent, "Accept-Encoding": "identity"},
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            max_line_size=MAX_HEADER_LINE,
            max_field_size=MAX_HEADER_LINE,
            max_headers=MAX_RESPONSE_HEADERS,
        )

    def _current_session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._loop is not loop:
            self._session = self._new_session(self._limit, self._limit_per_host)
            self._bound = {}  # sessions of another loop cannot be used (nor closed) here
            self._loop = loop
        return self._session

    def _bound_session(self, key: tuple[object, ...]) -> aiohttp.ClientSession:
        """A pool of ONE connection per key, for connection-bound authentication."""
        self._current_session()  # the loop check
        session = self._bound.get(key)
        if session is None or session.closed:
            session = self._bound[key] = self._new_session(1, 1)
        return session

    async def close(self) -> None:
        sessions = [self._session, *self._bound.values()]
        self._session, self._bound, self._loop = None, {}, None
        for session in sessions:
            if session is not None and not session.closed:
                await session.close()

    # -- TLS -------------------------------------------------------------------------------------

    def _default_context(self) -> ssl.SSLContext:
        if self._default_tls is None:
            self._default_tls = _new_context(self._ca_bundle)
        return self._default_tls

    def _identity(self, options: RequestOptions) -> ClientIdentity | None:
        identity: ClientIdentity | None = getattr(options, "client_identity", None)
        if identity is not None or options.client_certificate is None:
            return identity
        if self._certificates is None:
            raise _fatal(
                hr.hresult_from_win32(hr.ERROR_FILE_NOT_FOUND),
                "the job has a client certificate but this transport has no certificate stores",
            )
        return self._certificates(options.client_certificate)

    def _tls_for(self, options: RequestOptions) -> ssl.SSLContext:
        """The TLS context for an https request with these options (cached)."""
        flags = options.security_flags & _SSL_FLAGS
        job_bundle: str | None = getattr(options, "ca_bundle", None)
        validator: ServerCertificateValidator | None = (
            getattr(options, "server_certificate_validator", None) or self._validator
        )
        identity = self._identity(options)
        if not (flags or job_bundle or validator or identity):
            return self._default_context()
        if self._ssl_context is not None:
            raise _fatal(
                hr.E_INVALIDARG,
                "this transport has a fixed ssl_context: it cannot apply a job's client "
                "certificate, TLS security flags, CA bundle or certificate callback "
                "(configure ca_bundle instead)",
            )
        ca_bundle = os.fspath(job_bundle) if job_bundle else self._ca_bundle
        fingerprint = None
        if identity is not None:
            fingerprint = hashlib.sha256(identity.certificate_pem + identity.key_pem).digest()
        key: tuple[object, ...] = (flags, ca_bundle, fingerprint, validator)
        ctx = self._contexts.get(key)
        if ctx is not None:
            self._contexts.move_to_end(key)
            return ctx
        ctx = _new_context(ca_bundle)
        if flags & _OWN_VERIFICATION:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            if flags & SecurityFlags.IGNORE_CERT_CN_INVALID:
                ctx.check_hostname = False
            if flags & SecurityFlags.IGNORE_CERT_DATE_INVALID:
                ctx.verify_flags |= _X509_V_FLAG_NO_CHECK_TIME
            if flags & SecurityFlags.ENABLE_CRL_CHECK:
                ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        if identity is not None:
            _load_identity(ctx, identity)
        wrong_usage = flags & SecurityFlags.IGNORE_CERT_WRONG_USAGE
        unknown_ca = flags & SecurityFlags.IGNORE_UNKNOWN_CA
        anchors = _load_anchors(ca_bundle) if wrong_usage and not unknown_ca else ()
        accepted = None
        if validator is not None:  # one cache per validator (BITS: per job), the last 64 kept
            accepted = self._accepted.setdefault(validator, collections.OrderedDict())
            self._accepted.move_to_end(validator)
            while len(self._accepted) > _VALIDATOR_CACHES:
                self._accepted.popitem(last=False)
        if flags & _OWN_VERIFICATION or validator is not None:
            ctx.backhaul_policy = _TlsPolicy(flags, anchors, validator, accepted)
        self._contexts[key] = ctx
        while len(self._contexts) > _CONTEXT_CACHE:
            self._contexts.popitem(last=False)
        return ctx

    # -- requests --------------------------------------------------------------------------------

    async def _request(
        self, method: str, url: str, options: RequestOptions, extra: Sequence[tuple[str, str]]
    ) -> tuple[aiohttp.ClientResponse, str | None]:
        """Send one request and follow redirects under the job's policy. Returns the first
        non-redirect response (the caller owns it) and the URL the redirects led to, None
        when there was no redirect (``RemoteFile.redirect_target``)."""
        target = URL(url)
        if target.scheme not in _HTTP_SCHEMES or not target.host:
            raise TransferError(
                hr.E_INVALIDARG,
                f"not an http or https URL: {_redact(url)}",
                context=ErrorContext.REMOTE_FILE,
                transient=_is_transient(hr.E_INVALIDARG),
            )
        headers = _request_headers(options, extra)
        own_authorization = any(name.lower() == "authorization" for name, _ in headers)
        login = any(c.target == AuthTarget.SERVER for c in options.credentials)
        if own_authorization or login:
            # A login in the URL would clash with them (aiohttp refuses both): the custom
            # header, or the job's server credentials, win, as curl's -u wins over the URL's.
            target = target.with_user(None)
        origin = target.origin()
        flags = options.security_flags
        policy = flags & REDIRECT_POLICY_MASK
        redirected: str | None = None
        for _ in range(MAX_REDIRECTS + 1):
            answer_server = not own_authorization and target.origin() == origin
            resp = await self._exchange(method, target, headers, options, answer_server)
            location = resp.headers.get("Location")
            if resp.status not in _REDIRECTS or location is None or not location.strip():
                # An empty Location points nowhere (joined to the request's URL it would be the
                # same URL, requested again 10 times): the 3xx is the answer, and the caller
                # reports it as the HTTP error it is (BG_E_HTTP_ERROR_3xx).
                return resp, redirected
            await _discard(resp)
            refusal = _status_error(resp)
            try:
                following = target.join(URL(location))
            except ValueError:
                raise _protocol_error(
                    resp, f"bad redirect Location {scrub_text(location)!r}"
                ) from None
            if policy == SecurityFlags.REDIRECT_POLICY_DISALLOW:
                raise _disallowed(resp, following)
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
            if resp.status == 303 and method != "HEAD":
                # See Other: the answer is elsewhere, fetched with GET whatever the custom
                # method asked (RFC 9110 §15.4.4; WinHTTP and every browser do so).
                method = "GET"
            target = following
            redirected = str(target)
        raise TransferError(
            refusal.hresult,
            f"more than {MAX_REDIRECTS} redirects from {_redact(url)}",
            context=ErrorContext.REMOTE_FILE,
            transient=refusal.transient,
        )

    async def _exchange(
        self,
        method: str,
        target: URL,
        headers: Sequence[tuple[str, str]],
        options: RequestOptions,
        answer_server: bool,
    ) -> aiohttp.ClientResponse:
        """One hop: through the proxies that apply (failing over while a proxy refuses
        connections), answering authentication challenges."""
        proxies: list[URL | None] = list(_proxies_for(target, options, self._environ)) or [None]
        tls = self._tls_for(options) if target.scheme == "https" else None
        for i, proxy in enumerate(proxies):
            try:
                return await self._authenticated(
                    method, target, headers, options, answer_server, tls, proxy
                )
            except aiohttp.ClientProxyConnectionError:
                if i == len(proxies) - 1:
                    raise
        raise AssertionError("unreachable")

    async def _authenticated(
        self,
        method: str,
        target: URL,
        headers: Sequence[tuple[str, str]],
        options: RequestOptions,
        answer_server: bool,
        tls: ssl.SSLContext | None,
        proxy: URL | None,
    ) -> aiohttp.ClientResponse:
        credentials = options.credentials
        # A custom Proxy-Authorization is for the proxy (on the CONNECT, never through the
        # tunnel; without a proxy, nobody's), and our credentials replace it.
        own_proxy_auth = next((v for n, v in headers if n.lower() == "proxy-authorization"), None)
        headers = [(n, v) for n, v in headers if n.lower() != "proxy-authorization"]
        if proxy is None and not credentials:
            # Nothing to send first and no challenge we could answer: the one exchange the
            # loop below would make.
            return await self._current_session().request(
                method,
                target,
                headers=headers,
                ssl=tls if tls is not None else True,
                allow_redirects=False,
            )
        spaces = self._digest_spaces
        server = _Authenticator(
            AuthTarget.SERVER, credentials if answer_server else (), spaces, str(target.origin())
        )
        by_proxy = _Authenticator(
            AuthTarget.PROXY, credentials if proxy else (), spaces, f"proxy {proxy}"
        )
        tunnel = proxy is not None and target.scheme == "https"
        uri = target.raw_path_qs
        proxy_method = "CONNECT" if tunnel else method
        proxy_uri = f"{target.raw_host}:{target.port}" if tunnel else str(target)
        server.first(method, uri)
        by_proxy.first(proxy_method, proxy_uri)
        host = target.raw_host or ""
        resp: aiohttp.ClientResponse | None = None
        if proxy is None:
            own_proxy_auth = None
        for _ in range(_AUTH_ROUNDS):
            send = list(headers)
            if server.value is not None:
                send.append((server.header, server.value))
            proxy_headers = None
            proxy_value = by_proxy.value or own_proxy_auth
            if proxy_value is not None:
                if tunnel:  # on the CONNECT only, never inside the tunnel
                    proxy_headers = {by_proxy.header: proxy_value}
                else:
                    send.append((by_proxy.header, proxy_value))
            session = self._current_session()
            if server.bound or by_proxy.bound:
                key = (str(target.origin()), str(proxy), server.bound_key, by_proxy.bound_key)
                session = self._bound_session(key)
            try:
                resp = await session.request(
                    method,
                    target,
                    headers=send,
                    proxy=proxy,
                    proxy_headers=proxy_headers,
                    ssl=tls if tls is not None else True,
                    allow_redirects=False,
                )
            except aiohttp.ClientHttpProxyError as exc:
                assert proxy is not None
                challenges = exc.headers.getall("Proxy-Authenticate", []) if exc.headers else []
                if exc.status == 407 and by_proxy.answer(
                    challenges, proxy_method, proxy_uri, proxy.raw_host or "", tunnel=True
                ):
                    continue
                raise _tunnel_refused(exc, proxy, target) from None
            if resp.status == 401 and server.answer(
                resp.headers.getall("WWW-Authenticate", []), method, uri, host, tunnel=False
            ):
                await _discard(resp)
                continue
            if (
                resp.status == 407
                and proxy is not None
                and by_proxy.answer(
                    resp.headers.getall("Proxy-Authenticate", []),
                    proxy_method,
                    proxy_uri,
                    proxy.raw_host or "",
                    tunnel=False,
                )
            ):
                await _discard(resp)
                continue
            return resp
        assert resp is not None
        return resp

    async def stat(self, url: str, options: RequestOptions) -> RemoteFile:
        with _translated(url):
            head, redirected = await self._request("HEAD", url, options, ())
            await _discard(head)
            if head.status in _WHOLE_BODY:
                remote = _remote(head, _content_length(head), redirected=redirected)
                if remote.size is not None or options.dynamic:
                    return remote
                probed = await self._probe(str(head.url), options, redirected, quiet=True)
                return probed if probed is not None and probed.size is not None else remote
            if head.status >= 400 and head.status not in _HEAD_NOT_REFUSED:
                probed = await self._probe(str(head.url), options, redirected, quiet=False)
                assert probed is not None  # not quiet: it raises instead
                return probed
            raise _status_error(head)

    async def _probe(
        self, url: str, options: RequestOptions, redirected: str | None, *, quiet: bool
    ) -> RemoteFile | None:
        """GET ``Range: bytes=0-0``: the size of a file whose HEAD did not give it (``url`` is
        where the HEAD's redirects, to ``redirected``, led). ``quiet`` returns None instead of
        raising for an error status."""
        resp, hop = await self._request("GET", url, options, (("Range", "bytes=0-0"),))
        redirected = hop or redirected
        if resp.status == 206:
            span = _content_range(resp.headers.get("Content-Range"))
            await _discard(resp)
            if span is None or span[0] != 0:
                raise _protocol_error(resp, "206 without a valid Content-Range for bytes=0-0")
            return _remote(resp, span[2], redirected=redirected)
        if resp.status in _WHOLE_BODY:
            resp.close()  # the whole body is coming: keep only the headers
            return _remote(resp, _content_length(resp), redirected=redirected)
        await _discard(resp)
        if resp.status == 416 and _unsatisfied_size(resp) == 0:
            # An empty file has no byte 0; a server that says so with a Content-Range takes
            # ranges (an on-demand job of an empty file needs nothing more).
            remote = _remote(resp, 0, redirected=redirected)
            return attrs.evolve(remote, accepts_ranges=True)
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
            resp, redirected = await self._request(method, url, options, extra)
            if ranged and length is None and _shorter_than(resp, offset):
                # The file is now shorter than the checkpoint: it changed (its validator, if
                # any, would have said so too). Fetch it whole, as if the server had sent a 200.
                await _discard(resp)
                resp, redirected = await self._request(method, url, options, ())
                ranged, offset = False, 0
            try:
                return await self._start(resp, ranged, offset, length, validator, redirected)
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
        redirected: str | None,
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
            remote = _remote(resp, size, validator, redirected=redirected)
            return HttpDownload(resp, remote, offset, end - start + 1, self._chunk_size)
        if status in _WHOLE_BODY:
            remote = _remote(resp, _content_length(resp), redirected=redirected)
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
        if status == 416 and ranged and length is None and _unsatisfied_size(resp) == offset:
            # A resume at the very end (a checkpoint claimed the whole file before the file was
            # finished): nothing is left to send. A changed file would have got a 200 (If-Range).
            remote = _remote(resp, offset, validator, redirected=redirected)
            return HttpDownload(resp, remote, offset, 0, self._chunk_size)
        if status == 416 and ranged and length is not None:
            raise _status_error(resp, code=hr.BG_E_INVALID_RANGE)
        raise _status_error(resp)


def _disallowed(resp: aiohttp.ClientResponse, following: URL) -> TransferError:
    """A redirect under REDIRECT_POLICY_DISALLOW: fatal, with the code bits-core.md §2.2
    gives, ``HRESULT_FROM_WIN32(HTTP_STATUS_MOVED / _REDIRECT / ...)`` (0x8007012E for a
    302), not the redirect's BG_E_HTTP_ERROR_3xx. BITS sets the file's remote name to the
    redirect target: the error carries it as ``redirect_target`` for the engine (the URL as
    it would have been requested, secrets and all: the message shows it redacted), only when
    it is an http(s) URL (HTTP to SMB or file is never followed, nor offered as a name)."""
    code = hr.hresult_from_win32(resp.status)
    error = _refused(
        _status_error(resp, code=code), f"redirect to {_redact(following)} is disallowed"
    )
    if following.scheme in _HTTP_SCHEMES and following.host:
        error.redirect_target = str(following)  # type: ignore[attr-defined]
    return error


def _refused(redirect: TransferError, why: str) -> TransferError:
    """A redirect the policy forbids: ``redirect``'s code (the redirect's status, or
    DISALLOW's HRESULT), always fatal."""
    return TransferError(
        redirect.hresult,
        f"{why} ({redirect.message})",
        context=redirect.context,
        transient=False,
        response_headers=redirect.response_headers,
    )


def _tunnel_refused(exc: aiohttp.ClientHttpProxyError, proxy: URL, target: URL) -> TransferError:
    """A proxy that answered the CONNECT for an https URL with an error status."""
    status = exc.status
    code = (
        hr.http_status_hresult(status) if 100 <= status <= 599 else hr.BG_E_INVALID_SERVER_RESPONSE
    )
    return TransferError(
        code,
        f"the proxy {_redact(proxy)} refused to tunnel to {target.raw_host}:{target.port}: "
        f"HTTP {status} {exc.message}",
        context=ErrorContext.REMOTE_FILE,
        transient=_is_transient(code),
    )


def _request_headers(
    options: RequestOptions, extra: Sequence[tuple[str, str]]
) -> list[tuple[str, str]]:
    """Custom headers, then ours; ours replace custom headers of the same name."""
    ours = {name.lower() for name, _ in extra}
    headers = [(n, v) for n, v in options.custom_headers if n.lower() not in ours]
    headers.extend(extra)
    return headers


if TYPE_CHECKING:  # mypy proves that the classes implement the ports

    def _ports(transport: HttpTransport, download: HttpDownload) -> tuple[Transport, Download]:
        return transport, download
