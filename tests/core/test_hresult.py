"""HRESULT constants carry the exact values of bits-core.md §6, and the registry round-trips."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backhaul.core import hresult
from backhaul.core.hresult import (
    BG_E_HTTP_ERROR_404,
    BG_E_INVALID_STATE,
    BG_S_PARTIAL_COMPLETE,
    E_ACCESSDENIED,
    ERROR_ACCESS_DENIED,
    ERROR_DISK_FULL,
    S_OK,
    describe,
    format_hresult,
    hresult_from_win32,
    http_status_hresult,
    http_status_of,
    is_failure,
    is_success,
    name_of,
    registry,
    value_of,
    win32_code_of,
)

# Transcribed from the table of bits-core.md §6.3 (and §6.2 for the Win32-based ones).
REFERENCE_SPOT_CHECKS: dict[str, int] = {
    "BG_S_ERROR_CONTEXT_NONE": 0x00200006,
    "BG_S_PARTIAL_COMPLETE": 0x00200017,
    "BG_S_UNABLE_TO_DELETE_FILES": 0x0020001A,
    "BG_S_PROXY_CHANGED": 0x0020002A,
    "BG_S_OVERRIDDEN_BY_POLICY": 0x00200055,
    "BG_E_NOT_FOUND": 0x80200001,
    "BG_E_INVALID_STATE": 0x80200002,
    "BG_E_EMPTY": 0x80200003,
    "BG_E_FILE_NOT_AVAILABLE": 0x80200004,
    "BG_E_PROTOCOL_NOT_AVAILABLE": 0x80200005,
    "BG_E_DESTINATION_LOCKED": 0x8020000D,
    "BG_E_NETWORK_DISCONNECTED": 0x80200010,
    "BG_E_INSUFFICIENT_RANGE_SUPPORT": 0x80200013,
    "BG_E_INVALID_SERVER_RESPONSE": 0x8020001B,
    "BG_E_TOO_MANY_FILES": 0x8020001C,
    "BG_E_LOCAL_FILE_CHANGED": 0x8020001D,
    "BG_E_ERROR_CONTEXT_REMOTE_APPLICATION": 0x8020001E,
    "BG_E_STRING_TOO_LONG": 0x80200021,
    "BG_E_NO_PROGRESS": 0x80200024,
    "BG_E_INVALID_RANGE": 0x8020002B,
    "BG_E_OVERLAPPING_RANGES": 0x8020002C,
    "BG_E_CONNECTION_CLOSED": 0x8020002E,
    "BG_E_BLOCKED_BY_POLICY": 0x8020003E,
    "BG_E_INVALID_PROXY_INFO": 0x8020003F,
    "BG_E_UPNP_ERROR": 0x80200045,
    "BG_E_PEERCACHING_DISABLED": 0x80200047,
    "BG_E_TOO_MANY_JOBS_PER_USER": 0x80200049,
    "BG_E_TOO_MANY_JOBS_PER_MACHINE": 0x80200050,
    "BG_E_TOO_MANY_FILES_IN_JOB": 0x80200051,
    "BG_E_MAXDOWNLOAD_TIMEOUT": 0x80200054,
    "BG_E_TOKEN_REQUIRED": 0x80200056,
    "BG_E_BLOCKED_BY_COST_TRANSFER_POLICY": 0x80200059,
    "BG_E_PROPERTY_SUPPORTED_FOR_DOWNLOAD_JOBS_ONLY": 0x80200060,
    "BG_E_MAX_DOWNLOAD_SIZE_INVALID_VALUE": 0x80200063,
    "BG_E_RANDOM_ACCESS_NOT_SUPPORTED": 0x8020006D,
    "BG_E_READ_ONLY_WHEN_JOB_ACTIVE": 0x80200075,
    "BG_E_ERROR_CONTEXT_SERVER_CERTIFICATE_CALLBACK": 0x80200076,
    "BG_E_HTTP_ERROR_404": 0x80190194,
    "E_ACCESSDENIED": 0x80070005,
    "RPC_E_DISCONNECTED": 0x80010108,
    "CO_E_FAILEDTOIMPERSONATE": 0x80010123,
    "HRESULT_FROM_WIN32(ERROR_WINHTTP_CLIENT_AUTH_CERT_NEEDED)": 0x80072F0C,
    "HRESULT_FROM_WIN32(ERROR_WINHTTP_CLIENT_CERT_NO_ACCESS_PRIVATE_KEY)": 0x80072F9A,
}

REGISTRY = registry()
ALL_NAMES = sorted(REGISTRY)
ALL_VALUES = sorted(set(REGISTRY.values()))


@pytest.mark.parametrize(("name", "value"), sorted(REFERENCE_SPOT_CHECKS.items()))
def test_hresult_values_match_the_reference(name: str, value: int) -> None:
    assert value_of(name) == value
    if not name.startswith("HRESULT_FROM_WIN32("):
        assert getattr(hresult, name) == value


def test_module_constants_used_directly() -> None:
    assert BG_E_INVALID_STATE == 0x80200002
    assert BG_S_PARTIAL_COMPLETE == 0x00200017
    assert BG_E_HTTP_ERROR_404 == 0x80190194
    assert S_OK == 0
    assert hresult.S_FALSE == 1
    assert hresult.E_NOTIMPL == 0x80004001
    assert hresult.E_INVALIDARG == 0x80070057
    assert hresult.E_OUTOFMEMORY == 0x8007000E
    assert hresult.E_FAIL == 0x80004005
    assert hresult.E_PENDING == 0x8000000A
    assert hresult.E_ABORT == 0x80004004
    assert hresult.CRYPT_E_NOT_FOUND == 0x80092004


def test_bits_codes_are_not_contiguous() -> None:
    assert hresult.BG_E_TOO_MANY_JOBS_PER_USER == 0x80200049
    assert hresult.BG_E_TOO_MANY_JOBS_PER_MACHINE == 0x80200050
    assert hresult.BG_E_BLOCKED_BY_COST_TRANSFER_POLICY == 0x80200059
    assert hresult.BG_E_PROPERTY_SUPPORTED_FOR_DOWNLOAD_JOBS_ONLY == 0x80200060
    assert 0x8020002F not in ALL_VALUES
    assert 0x8020003D not in ALL_VALUES


def test_every_module_level_hresult_constant_is_registered() -> None:
    prefixes = ("S_", "E_", "BG_S_", "BG_E_", "CO_E_", "CRYPT_E_")
    module_constants = {
        name: value
        for name, value in vars(hresult).items()
        if name.startswith(prefixes) and isinstance(value, int)
    }
    # 12 COM codes, 5 BG_S_*, 86 BG_E_* (0x80200001-0x80200076 with gaps), 41 HTTP codes.
    assert len(module_constants) == 12 + 5 + 86 + 41
    for name, value in module_constants.items():
        assert REGISTRY[name] == value, name


def test_every_named_win32_code_is_registered_as_an_hresult() -> None:
    win32_codes = {
        name: value
        for name, value in vars(hresult).items()
        if name.startswith(("ERROR_", "RPC_X_")) and isinstance(value, int)
    }
    assert win32_codes
    for name, code in win32_codes.items():
        assert REGISTRY[f"HRESULT_FROM_WIN32({name})"] == hresult_from_win32(code)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_value_of_name_of_round_trips_over_the_registry(name: str) -> None:
    value = REGISTRY[name]
    assert value_of(name) == value
    assert value_of(name.lower()) == value
    canonical = name_of(value)
    assert REGISTRY[canonical] == value
    assert value_of(canonical) == value


@pytest.mark.parametrize("value", ALL_VALUES, ids=format_hresult)
def test_describe_gives_text_for_every_registered_constant(value: int) -> None:
    text = describe(value)
    assert isinstance(text, str)
    assert text.strip()


def test_bits_names_are_the_canonical_names() -> None:
    assert name_of(0x80200002) == "BG_E_INVALID_STATE"
    assert name_of(0x80190194) == "BG_E_HTTP_ERROR_404"
    assert name_of(0x00200017) == "BG_S_PARTIAL_COMPLETE"


def test_com_name_wins_over_the_win32_alias() -> None:
    assert hresult_from_win32(ERROR_ACCESS_DENIED) == E_ACCESSDENIED
    assert name_of(E_ACCESSDENIED) == "E_ACCESSDENIED"
    assert value_of("HRESULT_FROM_WIN32(ERROR_ACCESS_DENIED)") == E_ACCESSDENIED


def test_win32_codes_are_named_through_hresult_from_win32() -> None:
    assert hresult_from_win32(ERROR_DISK_FULL) == 0x80070070
    assert name_of(0x80070070) == "HRESULT_FROM_WIN32(ERROR_DISK_FULL)"
    assert name_of(hresult_from_win32(hresult.ERROR_FILE_NOT_FOUND)) == (
        "HRESULT_FROM_WIN32(ERROR_FILE_NOT_FOUND)"
    )
    assert name_of(0x80072F0C) == "HRESULT_FROM_WIN32(ERROR_WINHTTP_CLIENT_AUTH_CERT_NEEDED)"


def test_win32_code_values() -> None:
    assert hresult.ERROR_FILE_NOT_FOUND == 2
    assert hresult.ERROR_PATH_NOT_FOUND == 3
    assert hresult.ERROR_ACCESS_DENIED == 5
    assert hresult.ERROR_SHARING_VIOLATION == 32
    assert hresult.ERROR_HANDLE_DISK_FULL == 39
    assert hresult.ERROR_FILE_EXISTS == 80
    assert hresult.ERROR_DISK_FULL == 112
    assert hresult.ERROR_ALREADY_EXISTS == 183
    assert hresult.ERROR_WINHTTP_CLIENT_AUTH_CERT_NEEDED == 0x2F0C
    assert hresult.ERROR_WINHTTP_CLIENT_CERT_NO_ACCESS_PRIVATE_KEY == 0x2F9A


def test_hresult_from_win32_follows_the_macro() -> None:
    assert hresult_from_win32(0) == S_OK
    assert hresult_from_win32(5) == 0x80070005
    assert hresult_from_win32(0x12345) == 0x80072345
    assert hresult_from_win32(-2145386494) == BG_E_INVALID_STATE
    assert win32_code_of(0x80070070) == ERROR_DISK_FULL
    assert win32_code_of(BG_E_INVALID_STATE) is None


def test_unregistered_values_are_named_by_their_hex() -> None:
    assert name_of(0x80070099) == "0x80070099"
    assert value_of("0x80070099") == 0x80070099
    assert describe(0x80070099)
    assert describe(0x801901AD)  # HTTP 429 has no header constant
    assert describe(0x12345678)
    assert describe(0x87654321)


@given(st.integers(min_value=0, max_value=0xFFFFFFFF))
def test_name_of_and_value_of_round_trip_for_any_32_bit_value(value: int) -> None:
    assert value_of(name_of(value)) == value
    assert describe(value).strip()


def test_unknown_names_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown"):
        value_of("BG_E_UPLOAD_NOT_SUPPORTED")  # not a real constant (§6.3)
    with pytest.raises(ValueError, match="unknown"):
        value_of("0xNOTHEX")
    with pytest.raises(ValueError, match="unknown"):
        value_of("0x1FFFFFFFF")


def test_success_and_failure_follow_bit_31() -> None:
    assert is_success(S_OK)
    assert is_success(hresult.S_FALSE)
    assert is_success(BG_S_PARTIAL_COMPLETE)
    assert not is_failure(BG_S_PARTIAL_COMPLETE)
    assert is_failure(BG_E_INVALID_STATE)
    assert not is_success(BG_E_INVALID_STATE)
    assert is_failure(BG_E_HTTP_ERROR_404)


def test_signed_spelling_is_the_same_hresult() -> None:
    signed = BG_E_INVALID_STATE - 2**32
    assert signed == -2145386494
    assert name_of(signed) == "BG_E_INVALID_STATE"
    assert is_failure(signed)
    assert format_hresult(signed) == "0x80200002"


@pytest.mark.parametrize("bad", [2**32, -(2**31) - 1])
def test_values_outside_32_bits_are_rejected(bad: int) -> None:
    with pytest.raises(ValueError, match="32-bit"):
        format_hresult(bad)


def test_format_hresult_is_eight_upper_case_hex_digits() -> None:
    assert format_hresult(BG_E_INVALID_STATE) == "0x80200002"
    assert format_hresult(S_OK) == "0x00000000"
    assert format_hresult(0x8020001B) == "0x8020001B"


def test_http_status_maps_into_the_http_range() -> None:
    assert http_status_hresult(404) == 0x80190194 == BG_E_HTTP_ERROR_404
    assert http_status_hresult(100) == hresult.BG_E_HTTP_ERROR_100
    assert http_status_hresult(505) == hresult.BG_E_HTTP_ERROR_505
    assert http_status_of(0x80190194) == 404
    assert http_status_of(BG_E_INVALID_STATE) is None
    assert http_status_of(0x80194000) is None  # BITS_MC_* message ids share the facility


@given(st.integers(min_value=100, max_value=599))
def test_http_status_round_trips(status: int) -> None:
    hr = http_status_hresult(status)
    assert is_failure(hr)
    assert http_status_of(hr) == status


@pytest.mark.parametrize("status", [0, 99, 600, 1000, -404])
def test_http_status_outside_100_to_599_is_rejected(status: int) -> None:
    with pytest.raises(ValueError, match="HTTP status"):
        http_status_hresult(status)


def test_every_header_http_constant_matches_the_mapping() -> None:
    http_names = [name for name in REGISTRY if name.startswith("BG_E_HTTP_ERROR_")]
    assert len(http_names) == 41
    for name in http_names:
        status = int(name.removeprefix("BG_E_HTTP_ERROR_"))
        assert REGISTRY[name] == http_status_hresult(status)
        assert name_of(REGISTRY[name]) == name
        assert str(status) in describe(REGISTRY[name])
