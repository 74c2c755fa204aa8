"""Which failures are transient (TRANSIENT_ERROR, retried after MinimumRetryDelay) and
which are fatal (ERROR, until the application acts). ONE table, read by every transport
and by the engine; rendered in specs/failures.md.

HTTP statuses follow the BITS server-application rule (bits-core.md §6.4), which we apply
to every HTTP transfer: 3xx transient except 300-305 and 307; 4xx fatal except 408, 409
(and 429, beyond BITS: a rate limit is temporary by definition); 5xx transient except 501
and 505; anything else transient. 401 and 407 are fatal (credentials not satisfied).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from backhaul.core import hresult as hr

_FATAL_3XX = frozenset({300, 301, 302, 303, 304, 305, 307})
_TRANSIENT_4XX = frozenset({408, 409, 429})
_FATAL_5XX = frozenset({501, 505})


def http_status_is_transient(status: int) -> bool:
    if 300 <= status < 400:
        return status not in _FATAL_3XX
    if 400 <= status < 500:
        return status in _TRANSIENT_4XX
    if 500 <= status < 600:
        return status not in _FATAL_5XX
    return True


# BITS codes raised by transports and the engine, and whether each is transient.
# Decisions for codes bits-core.md §21 item 6 leaves UNCONFIRMED are explained in
# specs/failures.md.
TRANSIENT: Mapping[int, bool] = MappingProxyType(
    {
        hr.BG_E_CONNECT_FAILURE: True,
        hr.BG_E_CONNECTION_CLOSED: True,
        hr.BG_E_NETWORK_DISCONNECTED: True,
        hr.BG_E_NO_PROGRESS: True,
        hr.BG_E_SESSION_NOT_FOUND: True,
        hr.BG_E_DESTINATION_LOCKED: True,
        hr.BG_E_BLOCKED_BY_POLICY: True,
        hr.BG_E_BLOCKED_BY_COST_TRANSFER_POLICY: True,
        hr.BG_E_INVALID_SERVER_RESPONSE: True,
        hr.BG_E_MISSING_FILE_SIZE: False,
        hr.BG_E_INSUFFICIENT_HTTP_SUPPORT: False,
        hr.BG_E_INSUFFICIENT_RANGE_SUPPORT: False,
        hr.BG_E_INVALID_RANGE: False,
        hr.BG_E_RANDOM_ACCESS_NOT_SUPPORTED: False,
        hr.BG_E_TOO_LARGE: False,
        hr.BG_E_LOCAL_FILE_CHANGED: False,
        hr.BG_E_REMOTE_FILE_CHANGED: False,
        hr.BG_E_VALIDATION_FAILED: False,
        hr.BG_E_MAXDOWNLOAD_TIMEOUT: False,
        hr.BG_E_MAX_DOWNLOAD_SIZE_LIMIT_REACHED: False,
        hr.BG_E_INVALID_PROXY_INFO: False,
        hr.BG_E_CLIENT_SERVER_PROTOCOL_MISMATCH: False,
        hr.BG_E_SERVER_EXECUTE_ENABLE: False,
        hr.BG_E_TOKEN_REQUIRED: False,
        hr.BG_E_VOLUME_CHANGED: False,
        hr.E_ACCESSDENIED: False,  # also HRESULT_FROM_WIN32(ERROR_ACCESS_DENIED)
        hr.E_INVALIDARG: False,
        hr.hresult_from_win32(hr.ERROR_FILE_NOT_FOUND): False,
        hr.hresult_from_win32(hr.ERROR_PATH_NOT_FOUND): False,
        hr.hresult_from_win32(hr.ERROR_WRITE_PROTECT): False,
        hr.hresult_from_win32(hr.ERROR_DISK_FULL): True,
        hr.hresult_from_win32(hr.ERROR_HANDLE_DISK_FULL): True,
        hr.hresult_from_win32(hr.ERROR_SHARING_VIOLATION): True,
        hr.hresult_from_win32(hr.ERROR_LOCK_VIOLATION): True,
        hr.hresult_from_win32(hr.ERROR_WINHTTP_TIMEOUT): True,
        hr.hresult_from_win32(hr.ERROR_WINHTTP_SECURE_FAILURE): False,
        hr.hresult_from_win32(hr.ERROR_WINHTTP_SECURE_CERT_REVOKED): False,
        hr.hresult_from_win32(hr.ERROR_WINHTTP_SECURE_CERT_REV_FAILED): False,
        hr.hresult_from_win32(hr.ERROR_WINHTTP_CLIENT_CERT_NO_ACCESS_PRIVATE_KEY): False,
        hr.CRYPT_E_NOT_FOUND: False,
        hr.NTE_BAD_KEY: False,
    }
)


def is_transient(code: int) -> bool:
    """The class of a failure HRESULT; unknown codes are transient, as BITS retries them."""
    status = hr.http_status_of(code)
    if status is not None:
        return http_status_is_transient(status)
    return TRANSIENT.get(code, True)
