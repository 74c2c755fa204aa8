"""The BITS vocabulary enums carry the exact BITS numbers and names (bits-core.md §1)."""

from __future__ import annotations

from enum import Enum

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backhaul.core.vocabulary import (
    ACL_FLAGS_VALID,
    COST_FLAGS_VALID,
    JOB_ENUM_FLAGS_VALID,
    LENGTH_TO_EOF,
    NOTIFY_FLAGS_VALID,
    REDIRECT_POLICY_ALLOW_SILENT,
    REDIRECT_POLICY_MASK,
    SECURITY_FLAGS_VALID,
    SIZE_UNKNOWN,
    TOKEN_FLAGS_VALID,
    AclFlags,
    AuthScheme,
    AuthTarget,
    BitsEnum,
    BitsFlag,
    CertStoreLocation,
    CostFlags,
    ErrorContext,
    FilePropertyId,
    JobEnumFlags,
    JobPriority,
    JobPropertyId,
    JobState,
    JobTransferPolicy,
    JobType,
    NotifyFlags,
    ProxyUsage,
    SecurityFlags,
    TokenFlags,
)

# Expected BITS constant name -> number, transcribed from bits-core.md §1.
REFERENCE: dict[type[Enum], dict[str, int]] = {
    JobState: {
        "BG_JOB_STATE_QUEUED": 0,
        "BG_JOB_STATE_CONNECTING": 1,
        "BG_JOB_STATE_TRANSFERRING": 2,
        "BG_JOB_STATE_SUSPENDED": 3,
        "BG_JOB_STATE_ERROR": 4,
        "BG_JOB_STATE_TRANSIENT_ERROR": 5,
        "BG_JOB_STATE_TRANSFERRED": 6,
        "BG_JOB_STATE_ACKNOWLEDGED": 7,
        "BG_JOB_STATE_CANCELLED": 8,
    },
    JobType: {
        "BG_JOB_TYPE_DOWNLOAD": 0,
        "BG_JOB_TYPE_UPLOAD": 1,
        "BG_JOB_TYPE_UPLOAD_REPLY": 2,
    },
    JobPriority: {
        "BG_JOB_PRIORITY_FOREGROUND": 0,
        "BG_JOB_PRIORITY_HIGH": 1,
        "BG_JOB_PRIORITY_NORMAL": 2,
        "BG_JOB_PRIORITY_LOW": 3,
    },
    ErrorContext: {
        "BG_ERROR_CONTEXT_NONE": 0,
        "BG_ERROR_CONTEXT_UNKNOWN": 1,
        "BG_ERROR_CONTEXT_GENERAL_QUEUE_MANAGER": 2,
        "BG_ERROR_CONTEXT_QUEUE_MANAGER_NOTIFICATION": 3,
        "BG_ERROR_CONTEXT_LOCAL_FILE": 4,
        "BG_ERROR_CONTEXT_REMOTE_FILE": 5,
        "BG_ERROR_CONTEXT_GENERAL_TRANSPORT": 6,
        "BG_ERROR_CONTEXT_REMOTE_APPLICATION": 7,
        "BG_ERROR_CONTEXT_SERVER_CERTIFICATE_CALLBACK": 8,
    },
    ProxyUsage: {
        "BG_JOB_PROXY_USAGE_PRECONFIG": 0,
        "BG_JOB_PROXY_USAGE_NO_PROXY": 1,
        "BG_JOB_PROXY_USAGE_OVERRIDE": 2,
        "BG_JOB_PROXY_USAGE_AUTODETECT": 3,
    },
    AuthTarget: {
        "BG_AUTH_TARGET_SERVER": 1,
        "BG_AUTH_TARGET_PROXY": 2,
    },
    AuthScheme: {
        "BG_AUTH_SCHEME_BASIC": 1,
        "BG_AUTH_SCHEME_DIGEST": 2,
        "BG_AUTH_SCHEME_NTLM": 3,
        "BG_AUTH_SCHEME_NEGOTIATE": 4,
        "BG_AUTH_SCHEME_PASSPORT": 5,
    },
    CertStoreLocation: {
        "BG_CERT_STORE_LOCATION_CURRENT_USER": 0,
        "BG_CERT_STORE_LOCATION_LOCAL_MACHINE": 1,
        "BG_CERT_STORE_LOCATION_CURRENT_SERVICE": 2,
        "BG_CERT_STORE_LOCATION_SERVICES": 3,
        "BG_CERT_STORE_LOCATION_USERS": 4,
        "BG_CERT_STORE_LOCATION_CURRENT_USER_GROUP_POLICY": 5,
        "BG_CERT_STORE_LOCATION_LOCAL_MACHINE_GROUP_POLICY": 6,
        "BG_CERT_STORE_LOCATION_LOCAL_MACHINE_ENTERPRISE": 7,
    },
    JobPropertyId: {
        "BITS_JOB_PROPERTY_ID_COST_FLAGS": 1,
        "BITS_JOB_PROPERTY_ID_NOTIFICATION_CLSID": 2,
        "BITS_JOB_PROPERTY_ID_DYNAMIC_CONTENT": 3,
        "BITS_JOB_PROPERTY_ID_HIGH_PERFORMANCE": 4,
        "BITS_JOB_PROPERTY_ID_MAX_DOWNLOAD_SIZE": 5,
        "BITS_JOB_PROPERTY_ID_USE_STORED_CREDENTIALS": 7,
        "BITS_JOB_PROPERTY_ID_MINIMUM_NOTIFICATION_INTERVAL_MS": 9,
        "BITS_JOB_PROPERTY_ID_ON_DEMAND_MODE": 10,
    },
    FilePropertyId: {
        "BITS_FILE_PROPERTY_ID_HTTP_RESPONSE_HEADERS": 1,
    },
    JobTransferPolicy: {
        "BITS_JOB_TRANSFER_POLICY_ALWAYS": 0x800000FF,
        "BITS_JOB_TRANSFER_POLICY_NOT_ROAMING": 0x8000007F,
        "BITS_JOB_TRANSFER_POLICY_NO_SURCHARGE": 0x8000006F,
        "BITS_JOB_TRANSFER_POLICY_STANDARD": 0x80000067,
        "BITS_JOB_TRANSFER_POLICY_UNRESTRICTED": 0x80000021,
    },
    NotifyFlags: {
        "BG_NOTIFY_JOB_TRANSFERRED": 0x01,
        "BG_NOTIFY_JOB_ERROR": 0x02,
        "BG_NOTIFY_DISABLE": 0x04,
        "BG_NOTIFY_JOB_MODIFICATION": 0x08,
        "BG_NOTIFY_FILE_TRANSFERRED": 0x10,
        "BG_NOTIFY_FILE_RANGES_TRANSFERRED": 0x20,
    },
    AclFlags: {
        "BG_COPY_FILE_OWNER": 1,
        "BG_COPY_FILE_GROUP": 2,
        "BG_COPY_FILE_DACL": 4,
        "BG_COPY_FILE_SACL": 8,
    },
    SecurityFlags: {
        "BG_SSL_ENABLE_CRL_CHECK": 0x01,
        "BG_SSL_IGNORE_CERT_CN_INVALID": 0x02,
        "BG_SSL_IGNORE_CERT_DATE_INVALID": 0x04,
        "BG_SSL_IGNORE_UNKNOWN_CA": 0x08,
        "BG_SSL_IGNORE_CERT_WRONG_USAGE": 0x10,
        "BG_HTTP_REDIRECT_POLICY_ALLOW_REPORT": 0x100,
        "BG_HTTP_REDIRECT_POLICY_DISALLOW": 0x200,
        "BG_HTTP_REDIRECT_POLICY_ALLOW_HTTPS_TO_HTTP": 0x800,
    },
    CostFlags: {
        "BITS_COST_STATE_UNRESTRICTED": 0x1,
        "BITS_COST_STATE_CAPPED_USAGE_UNKNOWN": 0x2,
        "BITS_COST_STATE_BELOW_CAP": 0x4,
        "BITS_COST_STATE_NEAR_CAP": 0x8,
        "BITS_COST_STATE_OVERCAP_CHARGED": 0x10,
        "BITS_COST_STATE_OVERCAP_THROTTLED": 0x20,
        "BITS_COST_STATE_USAGE_BASED": 0x40,
        "BITS_COST_STATE_ROAMING": 0x80,
        "BITS_COST_OPTION_IGNORE_CONGESTION": 0x80000000,
    },
    TokenFlags: {
        "BG_TOKEN_LOCAL_FILE": 0x1,
        "BG_TOKEN_NETWORK": 0x2,
    },
    JobEnumFlags: {
        "BG_JOB_ENUM_ALL_USERS": 0x0001,
    },
}

ENUM_CLASSES: list[type[BitsEnum]] = [c for c in REFERENCE if issubclass(c, BitsEnum)]
FLAG_CLASSES: list[type[BitsFlag]] = [c for c in REFERENCE if issubclass(c, BitsFlag)]

ENUM_MEMBERS: list[BitsEnum] = [m for cls in ENUM_CLASSES for m in cls]
# Every flag member, aliases such as AclFlags.ALL included.
FLAG_MEMBERS: list[BitsFlag] = [m for cls in FLAG_CLASSES for m in cls.__members__.values()]


def _single_name(member: BitsEnum | BitsFlag) -> str:
    if isinstance(member, BitsEnum):
        return member.bits_name
    (name,) = member.bits_names
    return name


def test_every_vocabulary_class_is_checked_against_the_reference() -> None:
    assert len(ENUM_CLASSES) + len(FLAG_CLASSES) == len(REFERENCE) == 17


@pytest.mark.parametrize("cls", list(REFERENCE), ids=lambda c: c.__name__)
def test_values_and_names_are_the_bits_numbers_and_names(cls: type[BitsEnum | BitsFlag]) -> None:
    actual = {_single_name(member): int(member) for member in cls}
    assert actual == REFERENCE[cls]


def test_job_state_values_are_the_bits_numbers() -> None:
    assert [int(s) for s in JobState] == list(range(9))
    assert JobState.QUEUED == 0
    assert JobState.CANCELLED == 8


def test_bits_names_from_the_brief() -> None:
    assert JobState.QUEUED.bits_name == "BG_JOB_STATE_QUEUED"
    assert JobPriority.FOREGROUND.bits_name == "BG_JOB_PRIORITY_FOREGROUND"
    assert JobType.UPLOAD_REPLY.bits_name == "BG_JOB_TYPE_UPLOAD_REPLY"
    assert JobPropertyId.COST_FLAGS.bits_name == "BITS_JOB_PROPERTY_ID_COST_FLAGS"
    assert (
        FilePropertyId.HTTP_RESPONSE_HEADERS.bits_name
        == "BITS_FILE_PROPERTY_ID_HTTP_RESPONSE_HEADERS"
    )


def test_job_property_ids_six_and_eight_are_unused() -> None:
    values = {int(p) for p in JobPropertyId}
    assert 6 not in values
    assert 8 not in values


@given(st.sampled_from(ENUM_MEMBERS))
def test_enum_bits_name_round_trips(member: BitsEnum) -> None:
    cls = type(member)
    assert cls.from_bits_name(member.bits_name) is member
    assert cls.from_bits_name(member.bits_name.lower()) is member
    assert cls.from_bits_name(member.name) is member
    assert cls.from_bits_name(f"  {member.name.lower()}  ") is member


@given(st.sampled_from(FLAG_MEMBERS))
def test_flag_bits_names_round_trip_for_every_member(member: BitsFlag) -> None:
    cls = type(member)
    assert cls.from_bits_names(*member.bits_names) == member
    assert cls.from_bits_names(" | ".join(member.bits_names).lower()) == member
    assert member.name is not None
    assert cls.from_bits_names(member.name) == member


@st.composite
def _flag_values(draw: st.DrawFn) -> BitsFlag:
    cls = draw(st.sampled_from(FLAG_CLASSES))
    chosen = draw(st.sets(st.sampled_from(list(cls))))
    value = cls(0)
    for member in chosen:
        value |= member
    return value


@given(_flag_values())
def test_flag_bits_names_round_trip_for_every_combination(value: BitsFlag) -> None:
    cls = type(value)
    assert cls.from_bits_names(*value.bits_names) == value
    assert len(value.bits_names) == bin(int(value)).count("1")


def test_flag_bits_names_are_listed_lowest_bit_first() -> None:
    flags = NotifyFlags.FILE_TRANSFERRED | NotifyFlags.JOB_TRANSFERRED
    assert flags.bits_names == ["BG_NOTIFY_JOB_TRANSFERRED", "BG_NOTIFY_FILE_TRANSFERRED"]
    assert NotifyFlags(0).bits_names == []
    assert NotifyFlags.from_bits_names() == NotifyFlags(0)


def test_acl_all_is_the_four_acl_bits() -> None:
    assert AclFlags.ALL == 15
    assert AclFlags.ALL == AclFlags.OWNER | AclFlags.GROUP | AclFlags.DACL | AclFlags.SACL
    assert AclFlags.from_bits_names("BG_COPY_FILE_ALL") == AclFlags.ALL
    assert AclFlags.ALL.bits_names == [
        "BG_COPY_FILE_OWNER",
        "BG_COPY_FILE_GROUP",
        "BG_COPY_FILE_DACL",
        "BG_COPY_FILE_SACL",
    ]


@pytest.mark.parametrize("cls", ENUM_CLASSES, ids=lambda c: c.__name__)
def test_unknown_enum_name_is_rejected(cls: type[BitsEnum]) -> None:
    with pytest.raises(ValueError, match="unknown"):
        cls.from_bits_name("BG_NO_SUCH_CONSTANT")


def test_name_of_another_enum_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown"):
        JobState.from_bits_name("BG_JOB_PRIORITY_HIGH")


@pytest.mark.parametrize("cls", FLAG_CLASSES, ids=lambda c: c.__name__)
def test_unknown_flag_name_is_rejected(cls: type[BitsFlag]) -> None:
    with pytest.raises(ValueError, match="unknown"):
        cls.from_bits_names("BG_NO_SUCH_FLAG")


@pytest.mark.parametrize("cls", FLAG_CLASSES, ids=lambda c: c.__name__)
def test_flag_sets_refuse_undefined_bits(cls: type[BitsFlag]) -> None:
    undefined = ~int(cls.valid_mask()) & 0xFFFFFFFF
    lowest_undefined_bit = undefined & -undefined
    with pytest.raises(ValueError):
        cls(lowest_undefined_bit)


def test_valid_masks_are_the_union_of_all_flags() -> None:
    assert NOTIFY_FLAGS_VALID == 0x3F
    assert ACL_FLAGS_VALID == 15
    assert SECURITY_FLAGS_VALID == 0x1F | 0x100 | 0x200 | 0x800
    assert COST_FLAGS_VALID == 0x800000FF
    assert TOKEN_FLAGS_VALID == 0x3
    assert JOB_ENUM_FLAGS_VALID == 0x1
    assert NotifyFlags.valid_mask() == NOTIFY_FLAGS_VALID
    assert isinstance(NOTIFY_FLAGS_VALID, NotifyFlags)


def test_redirect_policy_constants() -> None:
    assert REDIRECT_POLICY_ALLOW_SILENT == 0
    assert REDIRECT_POLICY_MASK == 0x700
    assert SecurityFlags.REDIRECT_POLICY_ALLOW_REPORT & REDIRECT_POLICY_MASK
    assert SecurityFlags.REDIRECT_POLICY_DISALLOW & REDIRECT_POLICY_MASK
    assert not SecurityFlags.REDIRECT_POLICY_ALLOW_HTTPS_TO_HTTP & REDIRECT_POLICY_MASK


def test_sentinels_are_uint64_minus_one() -> None:
    assert SIZE_UNKNOWN == 2**64 - 1
    assert LENGTH_TO_EOF == 2**64 - 1


def test_only_foreground_priority_is_not_background() -> None:
    assert not JobPriority.FOREGROUND.is_background
    assert JobPriority.HIGH.is_background
    assert JobPriority.NORMAL.is_background
    assert JobPriority.LOW.is_background


@pytest.mark.parametrize("policy", list(JobTransferPolicy), ids=lambda p: p.name)
def test_transfer_policies_are_cost_flag_combinations(policy: JobTransferPolicy) -> None:
    assert int(policy.cost_flags) == int(policy)
    assert CostFlags.IGNORE_CONGESTION in policy.cost_flags


def test_enums_compare_equal_to_their_bits_numbers() -> None:
    assert JobState(4) is JobState.ERROR
    assert ErrorContext(8) is ErrorContext.SERVER_CERTIFICATE_CALLBACK
    assert NotifyFlags(0x3) == NotifyFlags.JOB_TRANSFERRED | NotifyFlags.JOB_ERROR
