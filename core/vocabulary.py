"""The BITS vocabulary: enumerations and flag sets whose values ARE the BITS numbers.

Rules of this module:

* Every value is the exact number from the Windows headers, as listed in bits-core.md §1
  ("Constants quick reference"), §10 (HTTP options), §11 (credentials), §12 (proxy),
  §14 (job properties and cost flags) and §15 (helper tokens). Values are never renumbered.
* Every member knows its full BITS constant name (``bits_name`` / ``bits_names``), and can be
  looked up from it (``from_bits_name`` / ``from_bits_names``), case-insensitively, by the full
  name or by the short member name.
* Flag sets are strict: building one from a number with an undefined bit raises ``ValueError``,
  so a value that made it into a flag type only holds bits BITS defines.
* Pure vocabulary only. Behaviour (which state is final, which transition is legal, which
  property is read-only) lives elsewhere and is derived from the tables of bits-core.md §2-§5.
  The only helpers here restate what a name means (``JobPriority.is_background``,
  ``JobTransferPolicy.cost_flags``).
* Standard library ``enum`` and ``typing`` only; no I/O.
"""

from __future__ import annotations

from enum import STRICT, Enum, IntEnum, IntFlag
from typing import Final, Self

__all__ = [
    "ACL_FLAGS_VALID",
    "COST_FLAGS_VALID",
    "JOB_ENUM_FLAGS_VALID",
    "LENGTH_TO_EOF",
    "NOTIFY_FLAGS_VALID",
    "REDIRECT_POLICY_ALLOW_SILENT",
    "REDIRECT_POLICY_MASK",
    "SECURITY_FLAGS_VALID",
    "SIZE_UNKNOWN",
    "TOKEN_FLAGS_VALID",
    "AclFlags",
    "AuthScheme",
    "AuthTarget",
    "BitsEnum",
    "BitsFlag",
    "CertStoreLocation",
    "CostFlags",
    "ErrorContext",
    "FilePropertyId",
    "JobEnumFlags",
    "JobPriority",
    "JobPropertyId",
    "JobState",
    "JobTransferPolicy",
    "JobType",
    "NotifyFlags",
    "ProxyUsage",
    "SecurityFlags",
    "TokenFlags",
]

# -------------------------------------------------------------------------------------------------
# Naming machinery: member name <-> full BITS constant name, per enumeration class.
# -------------------------------------------------------------------------------------------------

# class -> {member name (aliases included) -> full BITS constant name}
_FULL_NAMES: dict[type[Enum], dict[str, str]] = {}
# class -> {upper-cased full or short name -> member name}
_LOOKUP: dict[type[Enum], dict[str, str]] = {}


def _register_names(cls: type[Enum], prefix: str, overrides: dict[str, str] | None = None) -> None:
    """Record the BITS constant name of every member of ``cls``.

    The full name is ``prefix + member name`` unless ``overrides`` names the member.
    Raises ``TypeError`` if two spellings would look up different members.
    """
    overrides = overrides or {}
    unknown = set(overrides) - set(cls.__members__)
    if unknown:
        raise TypeError(f"{cls.__name__}: overrides for non-members {sorted(unknown)}")
    full_names: dict[str, str] = {}
    lookup: dict[str, str] = {}
    for member_name in cls.__members__:
        full = overrides.get(member_name, prefix + member_name)
        full_names[member_name] = full
        for spelling in (full.upper(), member_name.upper()):
            previous = lookup.setdefault(spelling, member_name)
            if previous != member_name:
                raise TypeError(
                    f"{cls.__name__}: {spelling!r} names both {previous} and {member_name}"
                )
    _FULL_NAMES[cls] = full_names
    _LOOKUP[cls] = lookup


def _full_name(cls: type[Enum], member_name: str) -> str:
    try:
        return _FULL_NAMES[cls][member_name]
    except KeyError:
        raise TypeError(f"{cls.__name__} has no BITS names registered") from None


def _member_name(cls: type[Enum], name: str) -> str:
    try:
        table = _LOOKUP[cls]
    except KeyError:
        raise TypeError(f"{cls.__name__} has no BITS names registered") from None
    try:
        return table[name.strip().upper()]
    except KeyError:
        raise ValueError(f"unknown {cls.__name__} name: {name!r}") from None


class BitsEnum(IntEnum):
    """Base of the BITS enumerations: an ``IntEnum`` that knows the BITS constant names."""

    @property
    def bits_name(self) -> str:
        """The full BITS constant name, e.g. ``"BG_JOB_STATE_QUEUED"``."""
        return _full_name(type(self), self.name)

    @classmethod
    def from_bits_name(cls, name: str) -> Self:
        """The member called ``name`` (full BITS name or short member name, any case).

        Raises ``ValueError`` for a name that is not a member of this enumeration.
        """
        return cls[_member_name(cls, name)]


class BitsFlag(IntFlag, boundary=STRICT):
    """Base of the BITS flag sets: a strict ``IntFlag`` that knows the BITS constant names."""

    @property
    def bits_names(self) -> list[str]:
        """The BITS constant names of the set bits, lowest bit first (empty for no bits)."""
        cls = type(self)
        # Iterating the class yields the single-bit members only; their names are never None.
        return [
            _full_name(cls, member.name)
            for member in cls
            if member.name is not None and member in self
        ]

    @classmethod
    def from_bits_names(cls, *names: str) -> Self:
        """The union of the named flags.

        Each argument is a full BITS name or a short member name (any case); an argument may
        also hold several names separated by ``|``. No names gives the empty set. Raises
        ``ValueError`` for an unknown name.
        """
        value = 0
        for argument in names:
            for name in argument.split("|"):
                if name.strip():
                    value |= cls[_member_name(cls, name)].value
        return cls(value)

    @classmethod
    def valid_mask(cls) -> Self:
        """Every bit this flag set defines."""
        mask = 0
        for member in cls:
            mask |= member.value
        return cls(mask)


# -------------------------------------------------------------------------------------------------
# Enumerations (bits-core.md §1)
# -------------------------------------------------------------------------------------------------


class JobState(BitsEnum):
    """``BG_JOB_STATE`` (§1, §2)."""

    QUEUED = 0
    CONNECTING = 1
    TRANSFERRING = 2
    SUSPENDED = 3
    ERROR = 4
    TRANSIENT_ERROR = 5
    TRANSFERRED = 6
    ACKNOWLEDGED = 7
    CANCELLED = 8


class JobType(BitsEnum):
    """``BG_JOB_TYPE`` (§1, §3)."""

    DOWNLOAD = 0
    UPLOAD = 1
    UPLOAD_REPLY = 2


class JobPriority(BitsEnum):
    """``BG_JOB_PRIORITY`` (§1, §4). NORMAL is the default for a new job."""

    FOREGROUND = 0
    HIGH = 1
    NORMAL = 2
    LOW = 3

    @property
    def is_background(self) -> bool:
        """True for HIGH, NORMAL and LOW: every priority except FOREGROUND."""
        return self is not JobPriority.FOREGROUND


class ErrorContext(BitsEnum):
    """``BG_ERROR_CONTEXT`` (§1, §6.1). SERVER_CERTIFICATE_CALLBACK arrived with BITS 10.3."""

    NONE = 0
    UNKNOWN = 1
    GENERAL_QUEUE_MANAGER = 2
    QUEUE_MANAGER_NOTIFICATION = 3
    LOCAL_FILE = 4
    REMOTE_FILE = 5
    GENERAL_TRANSPORT = 6
    REMOTE_APPLICATION = 7
    SERVER_CERTIFICATE_CALLBACK = 8


class ProxyUsage(BitsEnum):
    """``BG_JOB_PROXY_USAGE`` (§1, §12). PRECONFIG is the default."""

    PRECONFIG = 0
    NO_PROXY = 1
    OVERRIDE = 2
    AUTODETECT = 3


class AuthTarget(BitsEnum):
    """``BG_AUTH_TARGET`` (§1, §11)."""

    SERVER = 1
    PROXY = 2


class AuthScheme(BitsEnum):
    """``BG_AUTH_SCHEME`` (§1, §11)."""

    BASIC = 1
    DIGEST = 2
    NTLM = 3
    NEGOTIATE = 4
    PASSPORT = 5


class CertStoreLocation(BitsEnum):
    """``BG_CERT_STORE_LOCATION`` (§1, §10), for client certificates."""

    CURRENT_USER = 0
    LOCAL_MACHINE = 1
    CURRENT_SERVICE = 2
    SERVICES = 3
    USERS = 4
    CURRENT_USER_GROUP_POLICY = 5
    LOCAL_MACHINE_GROUP_POLICY = 6
    LOCAL_MACHINE_ENTERPRISE = 7


class JobPropertyId(BitsEnum):
    """``BITS_JOB_PROPERTY_ID`` (§1, §14). Numbers 6 and 8 are unused."""

    COST_FLAGS = 1
    NOTIFICATION_CLSID = 2
    DYNAMIC_CONTENT = 3
    HIGH_PERFORMANCE = 4
    MAX_DOWNLOAD_SIZE = 5
    USE_STORED_CREDENTIALS = 7
    MINIMUM_NOTIFICATION_INTERVAL_MS = 9
    ON_DEMAND_MODE = 10


class FilePropertyId(BitsEnum):
    """``BITS_FILE_PROPERTY_ID`` (§1, §14)."""

    HTTP_RESPONSE_HEADERS = 1


# -------------------------------------------------------------------------------------------------
# Flag sets (bits-core.md §1, §9, §10, §14, §15)
# -------------------------------------------------------------------------------------------------


class NotifyFlags(BitsFlag):
    """``BG_NOTIFY_*`` (§1, §9): which notifications a job raises."""

    JOB_TRANSFERRED = 0x01
    JOB_ERROR = 0x02
    DISABLE = 0x04
    JOB_MODIFICATION = 0x08
    FILE_TRANSFERRED = 0x10
    FILE_RANGES_TRANSFERRED = 0x20


class AclFlags(BitsFlag):
    """``BG_COPY_FILE_*`` (§1): which parts of the owner's ACL are copied to downloaded files.

    ALL is an alias for the four bits together.
    """

    OWNER = 1
    GROUP = 2
    DACL = 4
    SACL = 8
    ALL = 15


class SecurityFlags(BitsFlag):
    """``IBackgroundCopyJobHttpOptions`` security flags (§1, §10).

    The low bits are the ``BG_SSL_*`` certificate checks; the ``REDIRECT_POLICY_*`` members are
    ``BG_HTTP_REDIRECT_POLICY_*``. The default redirect policy, ALLOW_SILENT, is the absence of
    the redirect bits (``REDIRECT_POLICY_ALLOW_SILENT`` = 0), so it is not a member. The
    redirect policy is ``flags & REDIRECT_POLICY_MASK``; ALLOW_HTTPS_TO_HTTP lies outside that
    mask and combines with any policy.
    """

    ENABLE_CRL_CHECK = 0x01
    IGNORE_CERT_CN_INVALID = 0x02
    IGNORE_CERT_DATE_INVALID = 0x04
    IGNORE_UNKNOWN_CA = 0x08
    IGNORE_CERT_WRONG_USAGE = 0x10
    REDIRECT_POLICY_ALLOW_REPORT = 0x100
    REDIRECT_POLICY_DISALLOW = 0x200
    REDIRECT_POLICY_ALLOW_HTTPS_TO_HTTP = 0x800


class CostFlags(BitsFlag):
    """``BITS_COST_STATE_*`` plus ``BITS_COST_OPTION_IGNORE_CONGESTION`` (§1, §14).

    The value of the ``BITS_JOB_PROPERTY_ID_COST_FLAGS`` job property: the network cost states
    the job may transfer on. ``BITS_COST_STATE_RESERVED`` (0x40000000) is deliberately not a
    member.
    """

    UNRESTRICTED = 0x01
    CAPPED_USAGE_UNKNOWN = 0x02
    BELOW_CAP = 0x04
    NEAR_CAP = 0x08
    OVERCAP_CHARGED = 0x10
    OVERCAP_THROTTLED = 0x20
    USAGE_BASED = 0x40
    ROAMING = 0x80
    IGNORE_CONGESTION = 0x80000000


class TokenFlags(BitsFlag):
    """``BG_TOKEN_*`` (§1, §15): what a helper token is used for."""

    LOCAL_FILE = 0x1
    NETWORK = 0x2


class JobEnumFlags(BitsFlag):
    """``IBackgroundCopyManager::EnumJobs`` flags (§1, §15)."""

    ALL_USERS = 0x0001


class JobTransferPolicy(BitsEnum):
    """``BITS_JOB_TRANSFER_POLICY`` (§1, §14): named cost-flag combinations."""

    ALWAYS = 0x800000FF
    NOT_ROAMING = 0x8000007F
    NO_SURCHARGE = 0x8000006F
    STANDARD = 0x80000067
    UNRESTRICTED = 0x80000021

    @property
    def cost_flags(self) -> CostFlags:
        """The same number read as the cost flags it combines."""
        return CostFlags(self.value)


_register_names(JobState, "BG_JOB_STATE_")
_register_names(JobType, "BG_JOB_TYPE_")
_register_names(JobPriority, "BG_JOB_PRIORITY_")
_register_names(ErrorContext, "BG_ERROR_CONTEXT_")
_register_names(ProxyUsage, "BG_JOB_PROXY_USAGE_")
_register_names(AuthTarget, "BG_AUTH_TARGET_")
_register_names(AuthScheme, "BG_AUTH_SCHEME_")
_register_names(CertStoreLocation, "BG_CERT_STORE_LOCATION_")
_register_names(JobPropertyId, "BITS_JOB_PROPERTY_ID_")
_register_names(FilePropertyId, "BITS_FILE_PROPERTY_ID_")
_register_names(JobTransferPolicy, "BITS_JOB_TRANSFER_POLICY_")
_register_names(NotifyFlags, "BG_NOTIFY_")
_register_names(AclFlags, "BG_COPY_FILE_")
_register_names(
    SecurityFlags,
    "BG_SSL_",
    {
        "REDIRECT_POLICY_ALLOW_REPORT": "BG_HTTP_REDIRECT_POLICY_ALLOW_REPORT",
        "REDIRECT_POLICY_DISALLOW": "BG_HTTP_REDIRECT_POLICY_DISALLOW",
        "REDIRECT_POLICY_ALLOW_HTTPS_TO_HTTP": "BG_HTTP_REDIRECT_POLICY_ALLOW_HTTPS_TO_HTTP",
    },
)
_register_names(
    CostFlags,
    "BITS_COST_STATE_",
    {"IGNORE_CONGESTION": "BITS_COST_OPTION_IGNORE_CONGESTION"},
)
_register_names(TokenFlags, "BG_TOKEN_")
_register_names(JobEnumFlags, "BG_JOB_ENUM_")

# -------------------------------------------------------------------------------------------------
# Module constants
# -------------------------------------------------------------------------------------------------

SIZE_UNKNOWN: Final = 0xFFFF_FFFF_FFFF_FFFF
"""``BG_SIZE_UNKNOWN``: ``(UINT64)-1``, a size (or reply size) not known yet (§1, §8)."""

LENGTH_TO_EOF: Final = 0xFFFF_FFFF_FFFF_FFFF
"""``BG_LENGTH_TO_EOF``: ``(UINT64)-1``, a range length running to the end of the file (§1, §7)."""

REDIRECT_POLICY_ALLOW_SILENT: Final = 0x000
"""``BG_HTTP_REDIRECT_POLICY_ALLOW_SILENT``: the default policy, no redirect bit set (§1, §10)."""

REDIRECT_POLICY_MASK: Final = 0x700
"""``BG_HTTP_REDIRECT_POLICY_MASK``: the bits that hold the redirect policy (§1, §10)."""

NOTIFY_FLAGS_VALID: Final = NotifyFlags.valid_mask()
ACL_FLAGS_VALID: Final = AclFlags.valid_mask()
SECURITY_FLAGS_VALID: Final = SecurityFlags.valid_mask()
COST_FLAGS_VALID: Final = CostFlags.valid_mask()
TOKEN_FLAGS_VALID: Final = TokenFlags.valid_mask()
JOB_ENUM_FLAGS_VALID: Final = JobEnumFlags.valid_mask()
