"""HRESULT values used by BITS, with a name registry and short English descriptions.

Rules of this module:

* An HRESULT is a plain ``int`` holding the unsigned 32-bit value (``0x80200002``, not the
  signed ``-2145386494``). Every function here also accepts the signed spelling of the same
  32 bits and treats it as the unsigned one; anything outside 32 bits raises ``ValueError``.
  Bit 31 set means failure (bits-core.md §6.2).
* Every ``BG_S_*`` / ``BG_E_*`` value is copied verbatim from the table of bits-core.md §6.3
  (the codes are not contiguous: 0x80200049 is followed by 0x80200050, 0x80200059 by
  0x80200060). ``BG_E_HTTP_ERROR_<status>`` is ``0x80190000 | status`` for the statuses the
  headers define (§6.2, §6.4); ``http_status_hresult`` builds the code for any status 100-599.
* Generic COM codes (``S_OK``, ``E_INVALIDARG``, ...) are the ones the reference names in §6,
  §7.4, §10 and §15. Win32 codes (``ERROR_*``, ``RPC_X_*``) are plain Win32 numbers, NOT
  HRESULTs; turn them into HRESULTs with ``hresult_from_win32`` (the ``HRESULT_FROM_WIN32``
  macro). The registry lists each of them as ``"HRESULT_FROM_WIN32(ERROR_...)"``.
* ``name_of`` gives the registered name, preferring the COM name where two names share a
  value (``0x80070005`` is ``E_ACCESSDENIED`` rather than
  ``HRESULT_FROM_WIN32(ERROR_ACCESS_DENIED)``), and ``format_hresult`` text for unregistered
  values; ``value_of`` inverts both. ``describe`` is our own short wording of each meaning.
* Standard library ``typing`` only; no I/O.
"""

from __future__ import annotations

from typing import Final

# -------------------------------------------------------------------------------------------------
# Generic COM HRESULTs
# -------------------------------------------------------------------------------------------------

S_OK: Final = 0x00000000
S_FALSE: Final = 0x00000001
E_NOTIMPL: Final = 0x80004001
E_NOINTERFACE: Final = 0x80004002
E_ABORT: Final = 0x80004004
E_FAIL: Final = 0x80004005
E_PENDING: Final = 0x8000000A
E_ACCESSDENIED: Final = 0x80070005
E_OUTOFMEMORY: Final = 0x8007000E
E_INVALIDARG: Final = 0x80070057
RPC_E_DISCONNECTED: Final = 0x80010108
CO_E_FAILEDTOIMPERSONATE: Final = 0x80010123
CRYPT_E_NOT_FOUND: Final = 0x80092004
NTE_BAD_KEY: Final = 0x80090003

# -------------------------------------------------------------------------------------------------
# BITS success codes (bits-core.md §6.3)
# -------------------------------------------------------------------------------------------------

BG_S_ERROR_CONTEXT_NONE: Final = 0x00200006
BG_S_PARTIAL_COMPLETE: Final = 0x00200017
BG_S_UNABLE_TO_DELETE_FILES: Final = 0x0020001A
BG_S_PROXY_CHANGED: Final = 0x0020002A
BG_S_OVERRIDDEN_BY_POLICY: Final = 0x00200055

# -------------------------------------------------------------------------------------------------
# BITS failure codes (bits-core.md §6.3), in numeric order
# -------------------------------------------------------------------------------------------------

BG_E_NOT_FOUND: Final = 0x80200001
BG_E_INVALID_STATE: Final = 0x80200002
BG_E_EMPTY: Final = 0x80200003
BG_E_FILE_NOT_AVAILABLE: Final = 0x80200004
BG_E_PROTOCOL_NOT_AVAILABLE: Final = 0x80200005
BG_E_ERROR_CONTEXT_UNKNOWN: Final = 0x80200007
BG_E_ERROR_CONTEXT_GENERAL_QUEUE_MANAGER: Final = 0x80200008
BG_E_ERROR_CONTEXT_LOCAL_FILE: Final = 0x80200009
BG_E_ERROR_CONTEXT_REMOTE_FILE: Final = 0x8020000A
BG_E_ERROR_CONTEXT_GENERAL_TRANSPORT: Final = 0x8020000B
BG_E_ERROR_CONTEXT_QUEUE_MANAGER_NOTIFICATION: Final = 0x8020000C
BG_E_DESTINATION_LOCKED: Final = 0x8020000D
BG_E_VOLUME_CHANGED: Final = 0x8020000E
BG_E_ERROR_INFORMATION_UNAVAILABLE: Final = 0x8020000F
BG_E_NETWORK_DISCONNECTED: Final = 0x80200010
BG_E_MISSING_FILE_SIZE: Final = 0x80200011
BG_E_INSUFFICIENT_HTTP_SUPPORT: Final = 0x80200012
BG_E_INSUFFICIENT_RANGE_SUPPORT: Final = 0x80200013
BG_E_REMOTE_NOT_SUPPORTED: Final = 0x80200014
BG_E_NEW_OWNER_DIFF_MAPPING: Final = 0x80200015
BG_E_NEW_OWNER_NO_FILE_ACCESS: Final = 0x80200016
BG_E_PROXY_LIST_TOO_LARGE: Final = 0x80200018
BG_E_PROXY_BYPASS_LIST_TOO_LARGE: Final = 0x80200019
BG_E_INVALID_SERVER_RESPONSE: Final = 0x8020001B
BG_E_TOO_MANY_FILES: Final = 0x8020001C
BG_E_LOCAL_FILE_CHANGED: Final = 0x8020001D
BG_E_ERROR_CONTEXT_REMOTE_APPLICATION: Final = 0x8020001E
BG_E_SESSION_NOT_FOUND: Final = 0x8020001F
BG_E_TOO_LARGE: Final = 0x80200020
BG_E_STRING_TOO_LONG: Final = 0x80200021
BG_E_CLIENT_SERVER_PROTOCOL_MISMATCH: Final = 0x80200022
BG_E_SERVER_EXECUTE_ENABLE: Final = 0x80200023
BG_E_NO_PROGRESS: Final = 0x80200024
BG_E_USERNAME_TOO_LARGE: Final = 0x80200025
BG_E_PASSWORD_TOO_LARGE: Final = 0x80200026
BG_E_INVALID_AUTH_TARGET: Final = 0x80200027
BG_E_INVALID_AUTH_SCHEME: Final = 0x80200028
BG_E_FILE_NOT_FOUND: Final = 0x80200029
BG_E_INVALID_RANGE: Final = 0x8020002B
BG_E_OVERLAPPING_RANGES: Final = 0x8020002C
BG_E_CONNECT_FAILURE: Final = 0x8020002D
BG_E_CONNECTION_CLOSED: Final = 0x8020002E
BG_E_BLOCKED_BY_POLICY: Final = 0x8020003E
BG_E_INVALID_PROXY_INFO: Final = 0x8020003F
BG_E_INVALID_CREDENTIALS: Final = 0x80200040
BG_E_INVALID_HASH_ALGORITHM: Final = 0x80200041
BG_E_RECORD_DELETED: Final = 0x80200042
BG_E_COMMIT_IN_PROGRESS: Final = 0x80200043
BG_E_DISCOVERY_IN_PROGRESS: Final = 0x80200044
BG_E_UPNP_ERROR: Final = 0x80200045
BG_E_TEST_OPTION_BLOCKED_DOWNLOAD: Final = 0x80200046
BG_E_PEERCACHING_DISABLED: Final = 0x80200047
BG_E_BUSYCACHERECORD: Final = 0x80200048
BG_E_TOO_MANY_JOBS_PER_USER: Final = 0x80200049
BG_E_TOO_MANY_JOBS_PER_MACHINE: Final = 0x80200050
BG_E_TOO_MANY_FILES_IN_JOB: Final = 0x80200051
BG_E_TOO_MANY_RANGES_IN_FILE: Final = 0x80200052
BG_E_VALIDATION_FAILED: Final = 0x80200053
BG_E_MAXDOWNLOAD_TIMEOUT: Final = 0x80200054
BG_E_TOKEN_REQUIRED: Final = 0x80200056
BG_E_UNKNOWN_PROPERTY_ID: Final = 0x80200057
BG_E_READ_ONLY_PROPERTY: Final = 0x80200058
BG_E_BLOCKED_BY_COST_TRANSFER_POLICY: Final = 0x80200059
BG_E_PROPERTY_SUPPORTED_FOR_DOWNLOAD_JOBS_ONLY: Final = 0x80200060
BG_E_READ_ONLY_PROPERTY_AFTER_ADDFILE: Final = 0x80200061
BG_E_READ_ONLY_PROPERTY_AFTER_RESUME: Final = 0x80200062
BG_E_MAX_DOWNLOAD_SIZE_INVALID_VALUE: Final = 0x80200063
BG_E_MAX_DOWNLOAD_SIZE_LIMIT_REACHED: Final = 0x80200064
BG_E_STANDBY_MODE: Final = 0x80200065
BG_E_USE_STORED_CREDENTIALS_NOT_SUPPORTED: Final = 0x80200066
BG_E_BLOCKED_BY_BATTERY_POLICY: Final = 0x80200067
BG_E_BLOCKED_BY_BATTERY_SAVER: Final = 0x80200068
BG_E_WATCHDOG_TIMEOUT: Final = 0x80200069
BG_E_APP_PACKAGE_NOT_FOUND: Final = 0x8020006A
BG_E_APP_PACKAGE_SCENARIO_NOT_SUPPORTED: Final = 0x8020006B
BG_E_DATABASE_CORRUPT: Final = 0x8020006C
BG_E_RANDOM_ACCESS_NOT_SUPPORTED: Final = 0x8020006D
BG_E_BLOCKED_BY_BACKGROUND_ACCESS_POLICY: Final = 0x8020006E
BG_E_BLOCKED_BY_GAME_MODE: Final = 0x8020006F
BG_E_BLOCKED_BY_SYSTEM_POLICY: Final = 0x80200070
BG_E_NOT_SUPPORTED_WITH_CUSTOM_HTTP_METHOD: Final = 0x80200071
BG_E_UNSUPPORTED_JOB_CONFIGURATION: Final = 0x80200072
BG_E_REMOTE_FILE_CHANGED: Final = 0x80200073
BG_E_SERVER_CERT_VALIDATION_INTERFACE_REQUIRED: Final = 0x80200074
BG_E_READ_ONLY_WHEN_JOB_ACTIVE: Final = 0x80200075
BG_E_ERROR_CONTEXT_SERVER_CERTIFICATE_CALLBACK: Final = 0x80200076

# -------------------------------------------------------------------------------------------------
# HTTP status codes as BITS HRESULTs: 0x80190000 | status (bits-core.md §6.2, §6.4)
# -------------------------------------------------------------------------------------------------

BG_E_HTTP_ERROR_100: Final = 0x80190064
BG_E_HTTP_ERROR_101: Final = 0x80190065
BG_E_HTTP_ERROR_200: Final = 0x801900C8
BG_E_HTTP_ERROR_201: Final = 0x801900C9
BG_E_HTTP_ERROR_202: Final = 0x801900CA
BG_E_HTTP_ERROR_203: Final = 0x801900CB
BG_E_HTTP_ERROR_204: Final = 0x801900CC
BG_E_HTTP_ERROR_205: Final = 0x801900CD
BG_E_HTTP_ERROR_206: Final = 0x801900CE
BG_E_HTTP_ERROR_300: Final = 0x8019012C
BG_E_HTTP_ERROR_301: Final = 0x8019012D
BG_E_HTTP_ERROR_302: Final = 0x8019012E
BG_E_HTTP_ERROR_303: Final = 0x8019012F
BG_E_HTTP_ERROR_304: Final = 0x80190130
BG_E_HTTP_ERROR_305: Final = 0x80190131
BG_E_HTTP_ERROR_307: Final = 0x80190133
BG_E_HTTP_ERROR_400: Final = 0x80190190
BG_E_HTTP_ERROR_401: Final = 0x80190191
BG_E_HTTP_ERROR_402: Final = 0x80190192
BG_E_HTTP_ERROR_403: Final = 0x80190193
BG_E_HTTP_ERROR_404: Final = 0x80190194
BG_E_HTTP_ERROR_405: Final = 0x80190195
BG_E_HTTP_ERROR_406: Final = 0x80190196
BG_E_HTTP_ERROR_407: Final = 0x80190197
BG_E_HTTP_ERROR_408: Final = 0x80190198
BG_E_HTTP_ERROR_409: Final = 0x80190199
BG_E_HTTP_ERROR_410: Final = 0x8019019A
BG_E_HTTP_ERROR_411: Final = 0x8019019B
BG_E_HTTP_ERROR_412: Final = 0x8019019C
BG_E_HTTP_ERROR_413: Final = 0x8019019D
BG_E_HTTP_ERROR_414: Final = 0x8019019E
BG_E_HTTP_ERROR_415: Final = 0x8019019F
BG_E_HTTP_ERROR_416: Final = 0x801901A0
BG_E_HTTP_ERROR_417: Final = 0x801901A1
BG_E_HTTP_ERROR_449: Final = 0x801901C1
BG_E_HTTP_ERROR_500: Final = 0x801901F4
BG_E_HTTP_ERROR_501: Final = 0x801901F5
BG_E_HTTP_ERROR_502: Final = 0x801901F6
BG_E_HTTP_ERROR_503: Final = 0x801901F7
BG_E_HTTP_ERROR_504: Final = 0x801901F8
BG_E_HTTP_ERROR_505: Final = 0x801901F9

HTTP_ERROR_BASE: Final = 0x80190000
"""``BG_E_HTTP_ERROR_<status>`` is ``HTTP_ERROR_BASE | status``."""

# -------------------------------------------------------------------------------------------------
# Win32 error codes (plain Win32 numbers; wrap with hresult_from_win32)
# -------------------------------------------------------------------------------------------------

ERROR_FILE_NOT_FOUND: Final = 2
ERROR_PATH_NOT_FOUND: Final = 3
ERROR_ACCESS_DENIED: Final = 5
ERROR_WRITE_PROTECT: Final = 19
ERROR_SHARING_VIOLATION: Final = 32
ERROR_LOCK_VIOLATION: Final = 33
ERROR_HANDLE_DISK_FULL: Final = 39
ERROR_FILE_EXISTS: Final = 80
ERROR_DISK_FULL: Final = 112
ERROR_ALREADY_EXISTS: Final = 183
ERROR_FILENAME_EXCED_RANGE: Final = 206
ERROR_SERVICE_ALREADY_RUNNING: Final = 1056
RPC_X_NULL_REF_POINTER: Final = 1780
RPC_X_BAD_STUB_DATA: Final = 1783
ERROR_WINHTTP_TIMEOUT: Final = 12002
ERROR_WINHTTP_CLIENT_AUTH_CERT_NEEDED: Final = 12044
ERROR_WINHTTP_SECURE_CERT_REV_FAILED: Final = 12057
ERROR_WINHTTP_SECURE_CERT_REVOKED: Final = 12170
ERROR_WINHTTP_CLIENT_CERT_NO_ACCESS_PRIVATE_KEY: Final = 12186
ERROR_WINHTTP_SECURE_FAILURE: Final = 12175

FACILITY_WIN32_BASE: Final = 0x80070000
"""``HRESULT_FROM_WIN32(code)`` is ``FACILITY_WIN32_BASE | (code & 0xFFFF)`` for ``code > 0``."""

# -------------------------------------------------------------------------------------------------
# Descriptions (our own wording of the meaning column of bits-core.md §6.3)
# -------------------------------------------------------------------------------------------------

_HRESULT_DESCRIPTIONS: Final[dict[str, str]] = {
    # Generic COM codes first: they win name_of when a Win32 alias has the same value.
    "S_OK": "success",
    "S_FALSE": "success, but the answer is 'no' or the call did nothing",
    "E_NOTIMPL": "not implemented for this object or job type",
    "E_NOINTERFACE": "the object does not provide the requested interface",
    "E_ABORT": "the operation was aborted",
    "E_FAIL": "unspecified failure",
    "E_PENDING": "the data is not available yet",
    "E_ACCESSDENIED": "the caller is not allowed to do this",
    "E_OUTOFMEMORY": "ran out of memory",
    "E_INVALIDARG": "an argument is not valid",
    "RPC_E_DISCONNECTED": "the object invoked has disconnected from its clients (it was closed)",
    "CO_E_FAILEDTOIMPERSONATE": "COM could not impersonate the caller",
    "CRYPT_E_NOT_FOUND": "no certificate matched in the certificate store",
    "NTE_BAD_KEY": "the key cannot open this sealed data: it was sealed with another key",
    # BITS success codes
    "BG_S_ERROR_CONTEXT_NONE": "no error has occurred",
    "BG_S_PARTIAL_COMPLETE": (
        "the job was completed but only some files were kept; the unfinished ones were removed"
    ),
    "BG_S_UNABLE_TO_DELETE_FILES": (
        "the job was completed or cancelled, but some temporary files could not be removed"
    ),
    "BG_S_PROXY_CHANGED": "the proxy server changed",
    "BG_S_OVERRIDDEN_BY_POLICY": (
        "the setting was stored, but Group Policy currently overrides it"
    ),
    # BITS failure codes
    "BG_E_NOT_FOUND": "no such job",
    "BG_E_INVALID_STATE": "the job's current state does not allow this action",
    "BG_E_EMPTY": "the job has no files to transfer",
    "BG_E_FILE_NOT_AVAILABLE": "the error does not concern a particular file",
    "BG_E_PROTOCOL_NOT_AVAILABLE": "the error does not concern a particular protocol",
    "BG_E_ERROR_CONTEXT_UNKNOWN": "error context: the cause is not known",
    "BG_E_ERROR_CONTEXT_GENERAL_QUEUE_MANAGER": "error context: the transfer queue manager",
    "BG_E_ERROR_CONTEXT_LOCAL_FILE": "error context: the local file",
    "BG_E_ERROR_CONTEXT_REMOTE_FILE": "error context: the remote file",
    "BG_E_ERROR_CONTEXT_GENERAL_TRANSPORT": "error context: the network transport",
    "BG_E_ERROR_CONTEXT_QUEUE_MANAGER_NOTIFICATION": (
        "error context: delivering a notification to the application"
    ),
    "BG_E_DESTINATION_LOCKED": (
        "the destination volume is locked; the transfer waits until it is available again"
    ),
    "BG_E_VOLUME_CHANGED": (
        "the destination volume was replaced; put the original back and resume the job"
    ),
    "BG_E_ERROR_INFORMATION_UNAVAILABLE": "the job has no error to report",
    "BG_E_NETWORK_DISCONNECTED": "no network connection is active",
    "BG_E_MISSING_FILE_SIZE": "the server did not give the size of the file",
    "BG_E_INSUFFICIENT_HTTP_SUPPORT": "the server does not support HTTP/1.1",
    "BG_E_INSUFFICIENT_RANGE_SUPPORT": (
        "the server, or something between it and the client, does not honour byte ranges"
    ),
    "BG_E_REMOTE_NOT_SUPPORTED": "the service cannot be used from a remote session",
    "BG_E_NEW_OWNER_DIFF_MAPPING": "the new owner's drive mappings differ from the old owner's",
    "BG_E_NEW_OWNER_NO_FILE_ACCESS": "the new owner cannot reach the job's temporary files",
    "BG_E_PROXY_LIST_TOO_LARGE": "the proxy server list is too long",
    "BG_E_PROXY_BYPASS_LIST_TOO_LARGE": "the proxy bypass list is too long",
    "BG_E_INVALID_SERVER_RESPONSE": "the server's response broke the protocol",
    "BG_E_TOO_MANY_FILES": "an upload job can hold only one file",
    "BG_E_LOCAL_FILE_CHANGED": "the local file changed while it was being transferred",
    "BG_E_ERROR_CONTEXT_REMOTE_APPLICATION": "error context: the server application",
    "BG_E_SESSION_NOT_FOUND": "the server does not know the upload session",
    "BG_E_TOO_LARGE": "the upload (or reply) is larger than allowed",
    "BG_E_STRING_TOO_LONG": "a string argument is too long",
    "BG_E_CLIENT_SERVER_PROTOCOL_MISMATCH": (
        "client and server share no version of the upload protocol"
    ),
    "BG_E_SERVER_EXECUTE_ENABLE": (
        "the server directory allows scripts or executables, so uploads are refused"
    ),
    "BG_E_NO_PROGRESS": "the job stopped making progress; it will be retried later",
    "BG_E_USERNAME_TOO_LARGE": "the user name is too long",
    "BG_E_PASSWORD_TOO_LARGE": "the password is too long",
    "BG_E_INVALID_AUTH_TARGET": "the authentication target is not valid",
    "BG_E_INVALID_AUTH_SCHEME": "the authentication scheme is not valid",
    "BG_E_FILE_NOT_FOUND": "the named file is not part of the job",
    "BG_E_INVALID_RANGE": "a byte range is not valid or lies outside the remote file",
    "BG_E_OVERLAPPING_RANGES": "byte ranges repeat or overlap",
    "BG_E_CONNECT_FAILURE": "no connection could be made to the server",
    "BG_E_CONNECTION_CLOSED": "the connection closed before the transfer finished",
    "BG_E_BLOCKED_BY_POLICY": "bandwidth policy forbids background transfers right now",
    "BG_E_INVALID_PROXY_INFO": "the proxy list or bypass list is not valid",
    "BG_E_INVALID_CREDENTIALS": "the credentials are not in a valid form",
    "BG_E_INVALID_HASH_ALGORITHM": "peer cache: the hash algorithm is not supported",
    "BG_E_RECORD_DELETED": "peer cache: the cache record was deleted",
    "BG_E_COMMIT_IN_PROGRESS": "peer cache: a commit is already under way",
    "BG_E_DISCOVERY_IN_PROGRESS": "peer cache: peer discovery is already under way",
    "BG_E_UPNP_ERROR": "peer cache: a UPnP operation failed",
    "BG_E_TEST_OPTION_BLOCKED_DOWNLOAD": "peer cache: a test option blocked the download",
    "BG_E_PEERCACHING_DISABLED": "peer cache: peer caching is turned off",
    "BG_E_BUSYCACHERECORD": "peer cache: the cache record is in use",
    "BG_E_TOO_MANY_JOBS_PER_USER": "the per-user job limit has been reached",
    "BG_E_TOO_MANY_JOBS_PER_MACHINE": "the per-machine job limit has been reached",
    "BG_E_TOO_MANY_FILES_IN_JOB": "the per-job file limit has been reached",
    "BG_E_TOO_MANY_RANGES_IN_FILE": "the per-file range limit has been reached",
    "BG_E_VALIDATION_FAILED": "the application rejected the downloaded content",
    "BG_E_MAXDOWNLOAD_TIMEOUT": "the job ran past its maximum download time",
    "BG_E_TOKEN_REQUIRED": "a helper token is needed but is no longer available",
    "BG_E_UNKNOWN_PROPERTY_ID": "no property has this identifier",
    "BG_E_READ_ONLY_PROPERTY": "this property cannot be set",
    "BG_E_BLOCKED_BY_COST_TRANSFER_POLICY": (
        "the current network costs more than the job's cost flags allow"
    ),
    "BG_E_PROPERTY_SUPPORTED_FOR_DOWNLOAD_JOBS_ONLY": "this property applies to download jobs only",
    "BG_E_READ_ONLY_PROPERTY_AFTER_ADDFILE": "this property cannot change once files are added",
    "BG_E_READ_ONLY_PROPERTY_AFTER_RESUME": (
        "this property cannot change once the job has been resumed"
    ),
    "BG_E_MAX_DOWNLOAD_SIZE_INVALID_VALUE": "the maximum download size must be at least 1",
    "BG_E_MAX_DOWNLOAD_SIZE_LIMIT_REACHED": "the download is larger than its maximum size",
    "BG_E_STANDBY_MODE": "transfers are paused while the machine saves power",
    "BG_E_USE_STORED_CREDENTIALS_NOT_SUPPORTED": (
        "stored credentials can only be used for the proxy"
    ),
    "BG_E_BLOCKED_BY_BATTERY_POLICY": "transfers are paused while running on battery",
    "BG_E_BLOCKED_BY_BATTERY_SAVER": "transfers are paused while Battery Saver is on",
    "BG_E_WATCHDOG_TIMEOUT": "an internal operation took too long",
    "BG_E_APP_PACKAGE_NOT_FOUND": "the owning app package cannot be found",
    "BG_E_APP_PACKAGE_SCENARIO_NOT_SUPPORTED": "this is not supported for app packages",
    "BG_E_DATABASE_CORRUPT": "the stored job data is corrupt",
    "BG_E_RANDOM_ACCESS_NOT_SUPPORTED": "random access is not available for this file or job",
    "BG_E_BLOCKED_BY_BACKGROUND_ACCESS_POLICY": (
        "the owning app's background access settings block the transfer"
    ),
    "BG_E_BLOCKED_BY_GAME_MODE": "transfers are paused while Game Mode is on",
    "BG_E_BLOCKED_BY_SYSTEM_POLICY": "transfers are paused to save system resources",
    "BG_E_NOT_SUPPORTED_WITH_CUSTOM_HTTP_METHOD": ("this cannot be done with a custom HTTP method"),
    "BG_E_UNSUPPORTED_JOB_CONFIGURATION": "the job's configuration does not allow this",
    "BG_E_REMOTE_FILE_CHANGED": "the remote file changed; resume the job to try again",
    "BG_E_SERVER_CERT_VALIDATION_INTERFACE_REQUIRED": (
        "a server certificate callback is configured but not available"
    ),
    "BG_E_READ_ONLY_WHEN_JOB_ACTIVE": (
        "allowed only while the job is suspended, in error or transferred"
    ),
    "BG_E_ERROR_CONTEXT_SERVER_CERTIFICATE_CALLBACK": (
        "error context: the server certificate validation callback"
    ),
}

_WIN32_DESCRIPTIONS: Final[dict[str, str]] = {
    "ERROR_FILE_NOT_FOUND": "the file does not exist",
    "ERROR_PATH_NOT_FOUND": "the path does not exist",
    "ERROR_ACCESS_DENIED": "access to the file or share was refused",
    "ERROR_WRITE_PROTECT": "the file system is read-only (write protected)",
    "ERROR_SHARING_VIOLATION": "another process holds the file open",
    "ERROR_LOCK_VIOLATION": "another process has locked a portion of the file",
    "ERROR_HANDLE_DISK_FULL": "the disk is full",
    "ERROR_FILE_EXISTS": "the file already exists",
    "ERROR_DISK_FULL": "not enough space on the disk",
    "ERROR_ALREADY_EXISTS": "the file already exists, so it cannot be created",
    "ERROR_FILENAME_EXCED_RANGE": "the file name is too long",
    "ERROR_SERVICE_ALREADY_RUNNING": "another engine already runs on the store",
    "RPC_X_NULL_REF_POINTER": "a required pointer argument was null",
    "RPC_X_BAD_STUB_DATA": "an argument had the wrong size or shape",
    "ERROR_WINHTTP_TIMEOUT": "the server stopped sending: the connection stalled",
    "ERROR_WINHTTP_SECURE_FAILURE": "the server's certificate failed verification",
    "ERROR_WINHTTP_CLIENT_AUTH_CERT_NEEDED": "the server asks for a client certificate",
    "ERROR_WINHTTP_SECURE_CERT_REV_FAILED": (
        "the certificate's revocation status could not be checked"
    ),
    "ERROR_WINHTTP_SECURE_CERT_REVOKED": "the certificate has been revoked",
    "ERROR_WINHTTP_CLIENT_CERT_NO_ACCESS_PRIVATE_KEY": (
        "the client certificate's private key cannot be used"
    ),
}

# Reason phrases for the HTTP statuses that have a BG_E_HTTP_ERROR_<status> constant.
_HTTP_REASONS: Final[dict[int, str]] = {
    100: "Continue",
    101: "Switching Protocols",
    200: "OK",
    201: "Created",
    202: "Accepted",
    203: "Non-Authoritative Information",
    204: "No Content",
    205: "Reset Content",
    206: "Partial Content",
    300: "Multiple Choices",
    301: "Moved Permanently",
    302: "Found",
    303: "See Other",
    304: "Not Modified",
    305: "Use Proxy",
    307: "Temporary Redirect",
    400: "Bad Request",
    401: "Unauthorized",
    402: "Payment Required",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    406: "Not Acceptable",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    409: "Conflict",
    410: "Gone",
    411: "Length Required",
    412: "Precondition Failed",
    413: "Request Entity Too Large",
    414: "Request-URI Too Long",
    415: "Unsupported Media Type",
    416: "Range Not Satisfiable",
    417: "Expectation Failed",
    449: "Retry With",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}

# Statuses whose BITS message is the generic "server did not follow the protocol" (§6.4).
_HTTP_UNEXPECTED: Final = frozenset({200, 205, 304, 402, 415, 449})

_U32_MASK: Final = 0xFFFFFFFF
_FAILURE_BIT: Final = 0x80000000

# -------------------------------------------------------------------------------------------------
# Functions
# -------------------------------------------------------------------------------------------------


def _u32(hr: int) -> int:
    """``hr`` as an unsigned 32-bit value; accepts the signed spelling too."""
    if not -0x80000000 <= hr <= _U32_MASK:
        raise ValueError(f"not a 32-bit HRESULT: {hr!r}")
    return hr & _U32_MASK


def format_hresult(hr: int) -> str:
    """``hr`` as eight upper-case hex digits, e.g. ``"0x80200002"``."""
    return f"0x{_u32(hr):08X}"


def is_failure(hr: int) -> bool:
    """True when bit 31 (the severity bit) is set."""
    return bool(_u32(hr) & _FAILURE_BIT)


def is_success(hr: int) -> bool:
    """True when bit 31 (the severity bit) is clear (``S_OK``, ``S_FALSE``, ``BG_S_*``)."""
    return not is_failure(hr)


def hresult_from_win32(code: int) -> int:
    """The ``HRESULT_FROM_WIN32`` macro.

    A positive Win32 code becomes ``0x8007xxxx`` (its low 16 bits in facility 7); zero stays
    ``S_OK``; a negative number is taken to be an HRESULT already and returned as unsigned.
    """
    if code > 0:
        return FACILITY_WIN32_BASE | (code & 0xFFFF)
    return _u32(code)


def win32_code_of(hr: int) -> int | None:
    """The Win32 code inside a ``0x8007xxxx`` HRESULT, else ``None``."""
    value = _u32(hr)
    if value & 0xFFFF0000 == FACILITY_WIN32_BASE:
        return value & 0xFFFF
    return None


def http_status_hresult(status: int) -> int:
    """``BG_E_HTTP_ERROR_<status>``: ``0x80190000 + status``, for ``100 <= status <= 599``."""
    if not 100 <= status <= 599:
        raise ValueError(f"not an HTTP status code: {status!r}")
    return HTTP_ERROR_BASE + status


def http_status_of(hr: int) -> int | None:
    """The HTTP status inside a ``BG_E_HTTP_ERROR_<status>`` HRESULT, else ``None``."""
    value = _u32(hr)
    if value & 0xFFFF0000 == HTTP_ERROR_BASE and 100 <= value & 0xFFFF <= 599:
        return value & 0xFFFF
    return None


def _build_registry() -> tuple[dict[str, int], dict[str, str]]:
    """name -> value and name -> description, in preference order (first name wins name_of)."""
    module = globals()
    values: dict[str, int] = {}
    descriptions: dict[str, str] = {}

    def constant(name: str) -> int:
        value = module[name]
        if not isinstance(value, int):
            raise TypeError(f"{name} is not an int constant")
        return value

    for name, text in _HRESULT_DESCRIPTIONS.items():
        values[name] = constant(name)
        descriptions[name] = text
    for status, reason in _HTTP_REASONS.items():
        name = f"BG_E_HTTP_ERROR_{status}"
        values[name] = constant(name)
        text = f"the server answered HTTP {status} {reason}"
        if status in _HTTP_UNEXPECTED:
            text += ", which is not a valid answer here (the server broke the protocol)"
        descriptions[name] = text
    for win32_name, text in _WIN32_DESCRIPTIONS.items():
        name = f"HRESULT_FROM_WIN32({win32_name})"
        values[name] = hresult_from_win32(constant(win32_name))
        descriptions[name] = text
    return values, descriptions


_VALUE_BY_NAME, _DESCRIPTION_BY_NAME = _build_registry()
_NAME_BY_VALUE: Final[dict[int, str]] = {}
for _name, _value in _VALUE_BY_NAME.items():
    _NAME_BY_VALUE.setdefault(_value, _name)
_VALUE_BY_UPPER_NAME: Final = {name.upper(): value for name, value in _VALUE_BY_NAME.items()}
del _name, _value


def registry() -> dict[str, int]:
    """A copy of the registry: every registered name and its HRESULT, aliases included."""
    return dict(_VALUE_BY_NAME)


def name_of(hr: int) -> str:
    """The registered name of ``hr`` (e.g. ``"BG_E_INVALID_STATE"``,
    ``"HRESULT_FROM_WIN32(ERROR_DISK_FULL)"``), or ``format_hresult(hr)`` if it has none."""
    value = _u32(hr)
    return _NAME_BY_VALUE.get(value, format_hresult(value))


def value_of(name: str) -> int:
    """The HRESULT called ``name`` (any case), or the value of a ``"0x...."`` hex spelling.

    Inverts ``name_of``. Raises ``ValueError`` for an unknown name.
    """
    key = name.strip().upper()
    if key in _VALUE_BY_UPPER_NAME:
        return _VALUE_BY_UPPER_NAME[key]
    if key.startswith("0X"):
        try:
            return _u32(int(key, 16))
        except ValueError:
            pass
    raise ValueError(f"unknown HRESULT name: {name!r}")


def describe(hr: int) -> str:
    """A short English description of ``hr``; never empty, even for unregistered values."""
    value = _u32(hr)
    name = _NAME_BY_VALUE.get(value)
    if name is not None:
        return _DESCRIPTION_BY_NAME[name]
    status = http_status_of(value)
    if status is not None:
        return f"the server answered HTTP {status}"
    win32 = win32_code_of(value)
    if win32 is not None:
        return f"Windows error {win32}"
    kind = "failure" if is_failure(value) else "success"
    return f"unregistered {kind} code {format_hresult(value)}"
