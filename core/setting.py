"""Job settings as ONE table: name, validation, where and when each may be set.

Every setter of the Python API (and every ``PropertySet`` event) goes through a row of
``SETTINGS``. A row says:
- ``check(value, job) -> stored``: validates the value and normalises it to plain data
  (ints, strings, bools, dicts), raising ``BitsError`` with the BITS HRESULT;
- ``decode(stored) -> value``: turns the stored plain data back into the Job's field;
- ``states``: the job states where it may be set (else BG_E_INVALID_STATE);
- ``job_types`` and ``wrong_type``: which job types accept it and the HRESULT for the
  others (E_NOTIMPL for download-only calls, BG_E_PROPERTY_SUPPORTED_FOR_DOWNLOAD_JOBS_ONLY
  for download-only job properties; bits-core.md §2.3, §14);
- ``frozen_after``: "resume" or "add_file" when BITS freezes it after that call.
Sources: bits-core.md §2.3, §5, §9, §10, §12, §13, §14, §16.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

import attrs

from backhaul.core import hresult, limit
from backhaul.core.error import BitsError
from backhaul.core.transition import NON_FINAL_STATES
from backhaul.core.value import ClientCertificate, NotifyCommandLine, ProxySettings
from backhaul.core.vocabulary import (
    ACL_FLAGS_VALID,
    COST_FLAGS_VALID,
    NOTIFY_FLAGS_VALID,
    REDIRECT_POLICY_ALLOW_SILENT,
    REDIRECT_POLICY_MASK,
    SECURITY_FLAGS_VALID,
    AuthTarget,
    CertStoreLocation,
    JobPriority,
    JobPropertyId,
    JobState,
    JobType,
    ProxyUsage,
    SecurityFlags,
)

if TYPE_CHECKING:
    from backhaul.core.job import Job

ALL_TYPES = frozenset(JobType)
DOWNLOAD = frozenset({JobType.DOWNLOAD})
UPLOAD_REPLY = frozenset({JobType.UPLOAD_REPLY})
BEFORE_TRANSFERRED = NON_FINAL_STATES - {JobState.TRANSFERRED}


def _identity(value: Any) -> Any:
    return value


@attrs.frozen
class Setting:
    name: str
    bits_name: str
    check: Callable[[Any, Job], Any]
    decode: Callable[[Any], Any] = _identity
    states: frozenset[JobState] = NON_FINAL_STATES
    job_types: frozenset[JobType] = ALL_TYPES
    wrong_type: int = hresult.E_NOTIMPL
    frozen_after: str | None = None


def _invalid(message: str, code: int = hresult.E_INVALIDARG) -> BitsError:
    return BitsError(code, message)


def _text(max_len: int, what: str, *, allow_empty: bool = True) -> Callable[[Any, Job], str]:
    def check(value: Any, job: Job) -> str:
        if not isinstance(value, str):
            raise _invalid(f"{what} must be a string")
        if "\x00" in value:
            raise _invalid(f"{what} must not contain NUL characters")
        if not is_utf8(value):
            raise _invalid(f"{what} holds characters that are not valid Unicode")
        if not allow_empty and not value:
            raise _invalid(f"{what} must not be empty")
        if len(value) > max_len:
            raise _invalid(
                f"{what} is {len(value)} characters; the limit is {max_len}",
                hresult.BG_E_STRING_TOO_LONG,
            )
        return value

    return check


def is_utf8(value: str) -> bool:
    """The text can be stored (no lone surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _seconds(what: str, floor: int = 0) -> Callable[[Any, Job], int]:
    def check(value: Any, job: Job) -> int:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _invalid(f"{what} must be a number of seconds")
        if not 0 <= value <= 0xFFFFFFFF:  # NaN too
            raise _invalid(f"{what} must be between 0 and 4294967295 seconds")
        # BITS keeps whole seconds: a part of one counts as one (0.5 must not become 0,
        # which for NoProgressTimeout makes every error fatal).
        return max(math.ceil(value), floor)

    return check


def _flags(valid: int, what: str, code: int) -> Callable[[Any, Job], int]:
    def check(value: Any, job: Job) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _invalid(f"{what} must be an integer bit mask")
        if value < 0:  # in hex, a negative number reads as "0x-5"
            raise _invalid(f"{what} must be a bit mask within 0x{valid:X}, not {value}", code)
        if value & ~int(valid):
            raise _invalid(f"{what} 0x{value:X} has bits outside 0x{valid:X}", code)
        return int(value)

    return check


def _flag(what: str) -> Callable[[Any, Job], bool]:
    def check(value: Any, job: Job) -> bool:
        if not isinstance(value, bool):
            raise _invalid(f"{what} must be True or False")
        return value

    return check


def _check_priority(value: Any, job: Job) -> int:
    try:
        priority = JobPriority(value)
    except ValueError:
        raise _invalid(f"unknown priority {value!r}") from None
    if job.uses_custom_method and priority is not JobPriority.FOREGROUND:
        raise _invalid(
            "a job with a custom HTTP method stays at FOREGROUND priority",
            hresult.BG_E_NOT_SUPPORTED_WITH_CUSTOM_HTTP_METHOD,
        )
    return int(priority)


def _check_cmdline(value: Any, job: Job) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, NotifyCommandLine):
        raise _invalid("the notify command line must be a NotifyCommandLine or None")
    program, parameters = value.program, value.parameters
    _text(limit.NOTIFY_PROGRAM_MAX, "the notify program", allow_empty=False)(program, job)
    if not program.startswith("/"):
        raise _invalid("the notify program must be an absolute path (no search path is used)")
    for arg in parameters:
        _text(limit.NOTIFY_PARAMETERS_MAX, "a notify parameter")(arg, job)
    if sum(len(a) + 1 for a in parameters) > limit.NOTIFY_PARAMETERS_MAX:
        raise _invalid(
            f"the notify parameters exceed {limit.NOTIFY_PARAMETERS_MAX} characters",
            hresult.BG_E_STRING_TOO_LONG,
        )
    return {"program": program, "parameters": list(parameters)}


def _decode_cmdline(value: Any) -> NotifyCommandLine | None:
    if value is None:
        return None
    return NotifyCommandLine(value["program"], tuple(value["parameters"]))


_PROXY_ENTRY = re.compile(
    r"^(?:https?=)?(?:https?://)?"
    r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9\-_.]*[A-Za-z0-9_])?)"
    r"(?::(?:6553[0-5]|655[0-2]\d|65[0-4]\d\d|6[0-4]\d{3}|[1-5]\d{4}|[1-9]\d{0,3}))?$",
    re.IGNORECASE,
)
_BYPASS_ENTRY = re.compile(r"^(?:<local>|\*?[A-Za-z0-9\-_.:\[\]]*[A-Za-z0-9\]])$")


def _check_proxy(value: Any, job: Job) -> dict[str, Any]:
    if not isinstance(value, ProxySettings):
        raise _invalid("proxy settings must be a ProxySettings value")
    try:
        usage = ProxyUsage(value.usage)
    except ValueError:
        raise _invalid(f"unknown proxy usage {value.usage!r}", hresult.E_NOTIMPL) from None
    if usage is not ProxyUsage.OVERRIDE:
        if value.proxy_list is not None or value.bypass_list is not None:
            raise _invalid("proxy and bypass lists are allowed only with OVERRIDE")
    elif not value.proxy_list:
        raise _invalid("OVERRIDE needs a proxy list")
    for text, code, pattern, what in (
        (value.proxy_list, hresult.BG_E_PROXY_LIST_TOO_LARGE, _PROXY_ENTRY, "proxy"),
        (value.bypass_list, hresult.BG_E_PROXY_BYPASS_LIST_TOO_LARGE, _BYPASS_ENTRY, "bypass"),
    ):
        if text is None:
            continue
        if len(text) > limit.PROXY_LIST_MAX:
            raise _invalid(f"the {what} list is longer than {limit.PROXY_LIST_MAX}", code)
        bad = [entry for entry in text.split() if not pattern.match(entry)]
        if any("@" in entry for entry in bad):  # a login: never echoed, and not its place
            raise _invalid(
                f"a {what} list entry holds a login (user@): give the proxy's credentials "
                "with SetCredentials (target PROXY)"
            )
        if bad:
            raise _invalid(f"invalid {what} list entries: {' '.join(bad)}")
    return {"usage": int(usage), "proxy_list": value.proxy_list, "bypass_list": value.bypass_list}


def _decode_proxy(value: Any) -> ProxySettings:
    return ProxySettings(value["usage"], value["proxy_list"], value["bypass_list"])


_HTTP_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def _check_security_flags(value: Any, job: Job) -> int:
    flags = _flags(SECURITY_FLAGS_VALID, "the security flags", hresult.E_NOTIMPL)(value, job)
    policy = flags & REDIRECT_POLICY_MASK
    if policy not in _REDIRECT_POLICIES:
        raise _invalid(
            f"0x{policy:X} is not a redirect policy (0x0, 0x100 or 0x200)", hresult.E_NOTIMPL
        )
    return flags


_REDIRECT_POLICIES: Final = (
    REDIRECT_POLICY_ALLOW_SILENT,
    int(SecurityFlags.REDIRECT_POLICY_ALLOW_REPORT),
    int(SecurityFlags.REDIRECT_POLICY_DISALLOW),
)


def _check_on_demand(value: Any, job: Job) -> bool:
    flag = _flag("on-demand mode")(value, job)
    if flag and job.uses_custom_method:
        raise _invalid(
            "on-demand mode cannot be used with a custom HTTP method",
            hresult.BG_E_NOT_SUPPORTED_WITH_CUSTOM_HTTP_METHOD,
        )
    return flag


def _check_method(value: Any, job: Job) -> str:
    text = _text(limit.HTTP_METHOD_MAX, "the HTTP method", allow_empty=False)(value, job)
    if not _HTTP_TOKEN.match(text):
        raise _invalid(f"{text!r} is not an HTTP method token")
    if job.dynamic_content or job.on_demand:
        raise _invalid(
            "a custom HTTP method cannot be combined with dynamic content or on-demand mode",
            hresult.BG_E_NOT_SUPPORTED_WITH_CUSTOM_HTTP_METHOD,
        )
    return text


def _check_certificate(value: Any, job: Job) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, ClientCertificate):
        raise _invalid("the client certificate must be a ClientCertificate or None")
    try:
        CertStoreLocation(value.store_location)
    except ValueError:
        raise _invalid(
            f"unknown store location {value.store_location!r}", hresult.E_NOTIMPL
        ) from None
    _text(limit.CERT_STORE_NAME_MAX, "the store name", allow_empty=False)(value.store_name, job)
    if (value.sha1 is None) == (value.subject is None):
        raise _invalid("give exactly one of a SHA-1 hash or a subject name")
    if value.sha1 is not None and not re.fullmatch(r"[0-9a-fA-F]{40}", value.sha1):
        raise _invalid(
            "a certificate hash is 20 bytes (40 hex digits)",
            hresult.hresult_from_win32(hresult.RPC_X_BAD_STUB_DATA),
        )
    if value.subject is not None:
        _text(limit.CERT_SUBJECT_MAX, "the subject", allow_empty=False)(value.subject, job)
    return {
        "store_location": int(value.store_location),
        "store_name": value.store_name,
        "sha1": value.sha1.lower() if value.sha1 else None,
        "subject": value.subject,
    }


def _decode_certificate(value: Any) -> ClientCertificate | None:
    return None if value is None else ClientCertificate(**value)


def _check_reply_name(value: Any, job: Job) -> str | None:
    if value is None:
        return None
    text = _text(limit.LOCAL_NAME_MAX, "the reply file name", allow_empty=False)(value, job)
    if not text.startswith("/"):
        raise _invalid("the reply file name must be an absolute path")
    from backhaul.core.command import check_local_name  # command imports this module

    check_local_name(text)  # as a download's local name: a file, without . or ..
    if job.reply_bytes_total is not None:  # started (TRANSFERRING, SUSPENDED) or done
        raise _invalid("the reply download has started", hresult.BG_E_INVALID_STATE)
    return text


def _check_max_download_size(value: Any, job: Job) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < 2**64:
        raise _invalid(
            "the maximum download size must be 1 to 2**64-1 bytes",
            hresult.BG_E_MAX_DOWNLOAD_SIZE_INVALID_VALUE,
        )
    return int(value)


def _check_dynamic(value: Any, job: Job) -> bool:
    flag = _flag("dynamic content")(value, job)
    if flag and any(f.ranges for f in job.files):
        raise _invalid(
            "dynamic content cannot be used with file ranges",
            hresult.BG_E_UNSUPPORTED_JOB_CONFIGURATION,
        )
    if flag and job.uses_custom_method:
        raise _invalid(
            "dynamic content cannot be used with a custom HTTP method",
            hresult.BG_E_NOT_SUPPORTED_WITH_CUSTOM_HTTP_METHOD,
        )
    return flag


def _check_stored_credentials(value: Any, job: Job) -> int | None:
    if value is None:
        return None
    if value != AuthTarget.PROXY:
        raise _invalid(
            "stored credentials apply to the proxy target only",
            hresult.BG_E_USE_STORED_CREDENTIALS_NOT_SUPPORTED,
        )
    return int(value)


def _check_clsid(value: Any, job: Job) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not re.fullmatch(
        r"\{?[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}\}?", value
    ):
        raise _invalid("a notification CLSID is a GUID")
    return value.strip("{}").lower()


def _check_ca_bundle(value: Any, job: Job) -> str | None:
    if value is None:
        return None
    text = _text(limit.LOCAL_NAME_MAX, "the CA bundle", allow_empty=False)(value, job)
    if not text.startswith("/"):
        raise _invalid("the CA bundle must be an absolute path")
    return text


def _check_max_rate(value: Any, job: Job) -> int | None:
    if value is None or value == 0:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _invalid("a maximum rate is a positive number of bytes per second, or None")
    return int(value)


def _check_interval(value: Any, job: Job) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFFFFFFFF:
        raise _invalid("the minimum notification interval is 0 to 4294967295 ms")
    return int(value)


_DOWNLOAD_ONLY_PROPERTY = hresult.BG_E_PROPERTY_SUPPORTED_FOR_DOWNLOAD_JOBS_ONLY

# fmt: off
_ROWS = (
    Setting("display_name", "SetDisplayName",
            _text(limit.DISPLAY_NAME_MAX, "the display name")),
    Setting("description", "SetDescription", _text(limit.DESCRIPTION_MAX, "the description")),
    Setting("priority", "SetPriority", _check_priority, JobPriority),
    Setting("minimum_retry_delay", "SetMinimumRetryDelay",
            _seconds("the minimum retry delay", limit.MINIMUM_RETRY_DELAY_FLOOR)),
    Setting("no_progress_timeout", "SetNoProgressTimeout", _seconds("the no-progress timeout")),
    Setting("maximum_download_time", "SetMaximumDownloadTime",
            _seconds("the maximum download time")),
    Setting("notify_flags", "SetNotifyFlags",
            _flags(NOTIFY_FLAGS_VALID, "the notify flags", hresult.E_NOTIMPL)),
    Setting("notify_cmdline", "SetNotifyCmdLine", _check_cmdline, _decode_cmdline),
    Setting("proxy", "SetProxySettings", _check_proxy, _decode_proxy),
    Setting("http_method", "SetHttpMethod", _check_method, frozen_after="resume"),
    Setting("security_flags", "SetSecurityFlags",
            _check_security_flags),
    Setting("client_certificate", "SetClientCertificate", _check_certificate,
            _decode_certificate),
    Setting("acl_flags", "SetFileACLFlags",
            _flags(ACL_FLAGS_VALID, "the ACL flags", hresult.E_INVALIDARG),
            states=BEFORE_TRANSFERRED),
    Setting("reply_file_name", "SetReplyFileName", _check_reply_name,
            job_types=UPLOAD_REPLY),
    Setting("cost_flags", "BITS_JOB_PROPERTY_ID_COST_FLAGS",
            _flags(COST_FLAGS_VALID, "the cost flags", hresult.E_INVALIDARG)),
    Setting("notification_clsid", "BITS_JOB_PROPERTY_NOTIFICATION_CLSID", _check_clsid),
    Setting("dynamic_content", "BITS_JOB_PROPERTY_DYNAMIC_CONTENT", _check_dynamic,
            job_types=DOWNLOAD, wrong_type=_DOWNLOAD_ONLY_PROPERTY, frozen_after="resume"),
    Setting("high_performance", "BITS_JOB_PROPERTY_HIGH_PERFORMANCE",
            _flag("high performance"), job_types=DOWNLOAD, wrong_type=_DOWNLOAD_ONLY_PROPERTY,
            frozen_after="add_file"),
    Setting("max_download_size", "BITS_JOB_PROPERTY_MAX_DOWNLOAD_SIZE",
            _check_max_download_size, job_types=DOWNLOAD, wrong_type=_DOWNLOAD_ONLY_PROPERTY,
            frozen_after="resume"),
    Setting("use_stored_credentials", "BITS_JOB_PROPERTY_USE_STORED_CREDENTIALS",
            _check_stored_credentials),
    Setting("ca_bundle", "(backhaul) CA bundle for HTTPS", _check_ca_bundle),
    Setting("max_rate", "(backhaul) maximum transfer rate, bytes/s",
            _check_max_rate),
    Setting("minimum_notification_interval_ms",
            "BITS_JOB_PROPERTY_MINIMUM_NOTIFICATION_INTERVAL_MS", _check_interval),
    Setting("on_demand", "BITS_JOB_PROPERTY_ON_DEMAND_MODE", _check_on_demand,
            job_types=DOWNLOAD, wrong_type=_DOWNLOAD_ONLY_PROPERTY, frozen_after="resume"),
)
# fmt: on

SETTINGS: Mapping[str, Setting] = MappingProxyType({row.name: row for row in _ROWS})

# IBackgroundCopyJob5::SetProperty ids, mapped onto rows of SETTINGS.
JOB_PROPERTIES: Mapping[JobPropertyId, str] = MappingProxyType(
    {
        JobPropertyId.COST_FLAGS: "cost_flags",
        JobPropertyId.NOTIFICATION_CLSID: "notification_clsid",
        JobPropertyId.DYNAMIC_CONTENT: "dynamic_content",
        JobPropertyId.HIGH_PERFORMANCE: "high_performance",
        JobPropertyId.MAX_DOWNLOAD_SIZE: "max_download_size",
        JobPropertyId.USE_STORED_CREDENTIALS: "use_stored_credentials",
        JobPropertyId.MINIMUM_NOTIFICATION_INTERVAL_MS: "minimum_notification_interval_ms",
        JobPropertyId.ON_DEMAND_MODE: "on_demand",
    }
)


def check_setting(name: str, value: Any, job: Job) -> Any:
    """Validate a setter call against its row; return the plain data to record."""
    row = SETTINGS.get(name)
    if row is None:
        raise _invalid(f"unknown job setting {name!r}", hresult.BG_E_UNKNOWN_PROPERTY_ID)
    if job.job_type not in row.job_types:
        raise _invalid(
            f"{row.bits_name} does not apply to {job.job_type.name} jobs", row.wrong_type
        )
    if job.state not in row.states:
        raise _invalid(
            f"{row.bits_name} is not allowed in state {job.state.name}",
            hresult.BG_E_INVALID_STATE,
        )
    if row.frozen_after == "resume" and job.ever_resumed:
        raise _invalid(
            f"{row.bits_name} is read-only after the first Resume",
            hresult.BG_E_READ_ONLY_PROPERTY_AFTER_RESUME,
        )
    if row.frozen_after == "add_file" and job.files:
        raise _invalid(
            f"{row.bits_name} is read-only once a file was added",
            hresult.BG_E_READ_ONLY_PROPERTY_AFTER_ADDFILE,
        )
    return row.check(value, job)
