"""Bandwidth limits, windows and cost (core/bandwidth.py): pure rules."""

from __future__ import annotations

from datetime import datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backhaul.core import hresult
from backhaul.core.bandwidth import (
    BandwidthPolicy,
    EngineSettings,
    Limit,
    Window,
    check_network_cost,
    cost_allows,
    current_limit,
    effective_rate,
    parse_rate,
    parse_window,
    policy_blocks,
)
from backhaul.core.error import BitsError
from backhaul.core.vocabulary import CostFlags, JobPriority, JobTransferPolicy

MONDAY_10 = datetime(2026, 11, 23, 10, 0)
MONDAY_20 = datetime(2026, 11, 23, 20, 0)
SATURDAY_10 = datetime(2026, 11, 28, 10, 0)
TUESDAY_03 = datetime(2026, 11, 24, 3, 0)


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("0", 0),
        ("500k", 500_000),
        ("1.5M", 1_500_000),
        ("2MiB", 2 * 1024**2),
        ("8Mbit", 10**6),
        ("100KB/s", 100_000),
        (12345, 12345),
    ],
)
def test_rates_parse_with_decimal_and_binary_prefixes_and_bits(text: str | int, rate: int) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["fast", "-5", "1.2.3k", ""])
def test_a_malformed_rate_is_e_invalidarg(text: str) -> None:
    with pytest.raises(BitsError) as refused:
        parse_rate(text)
    assert refused.value.hresult == hresult.E_INVALIDARG


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("500kbps", 62_500),  # MaxInternetBandwidth's unit: kilobits per second
        ("8Mbps", 1_000_000),
        ("1Gbps", 125_000_000),
        ("2Mb/s", 250_000),
        ("64kbit/s", 8_000),
        ("100kB/s", 100_000),
        ("1MBps", 1_000_000),
        ("10KiB", 10 * 1024),
        ("2MiB/s", 2 * 1024**2),
    ],
)
def test_bits_per_second_are_bits_and_bytes_stay_bytes(text: str, rate: int) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["0.5", "7bit", "1bps", "0.0004k"])
def test_a_positive_rate_below_one_byte_per_second_is_slow_not_a_block(text: str) -> None:
    """0 blocks background jobs (MaxInternetBandwidth=0); a tiny limit is a slow one (BITS
    treats a limit below 2 kbps as about 2 kbps)."""
    rate = parse_rate(text)
    assert rate == 1
    assert not policy_blocks(BandwidthPolicy((Limit(rate),)), JobPriority.NORMAL, MONDAY_10)


@pytest.mark.parametrize("text", ["mon 09:75-10:00", "mon 09:00-10:60", "mon 23:99-24:00"])
def test_a_window_with_minutes_past_59_is_e_invalidarg(text: str) -> None:
    with pytest.raises(BitsError) as refused:
        parse_window(text)
    assert refused.value.hresult == hresult.E_INVALIDARG


@pytest.mark.parametrize(
    ("days", "start", "end"),
    [
        ({9}, 540, 600),
        ({-1}, 540, 600),
        (set(), 540, 600),
        ({0}, 1440, 60),
        ({0}, -60, 60),
        ({0}, 540, 1441),
    ],
)
def test_a_window_built_directly_lies_in_the_week_and_the_day(
    days: set[int], start: int, end: int
) -> None:
    """The API takes windows built by the caller, not only parsed ones: one that could never
    hold as meant (nor be shown by getbandwidth) is E_INVALIDARG where it is built."""
    with pytest.raises(BitsError) as refused:
        Window(frozenset(days), start, end)
    assert refused.value.hresult == hresult.E_INVALIDARG


def test_a_stored_policy_with_a_window_outside_the_week_leaves_the_previous_policy() -> None:
    """A log from before windows were checked (or edited by hand) must not stop a manager
    or an engine from starting: the policy it holds is refused, as the setter refuses it."""
    before = EngineSettings().evolve("bandwidth", BandwidthPolicy((Limit(5),)).to_data())
    bad = {"global": [{"rate": 0, "window": {"days": [9], "start": 540, "end": 600}}]}
    after = before.evolve("bandwidth", bad)
    assert after.bandwidth == before.bandwidth
    assert after.version == 2


def test_a_work_hours_window_holds_on_weekdays_inside_the_hours_only() -> None:
    window = parse_window("mon-fri 09:00-17:00")
    assert window.holds(MONDAY_10)
    assert not window.holds(MONDAY_20)
    assert not window.holds(SATURDAY_10)


def test_a_window_past_midnight_belongs_to_the_day_it_starts() -> None:
    night = parse_window("mon 22:00-06:00")
    assert night.holds(datetime(2026, 11, 23, 23, 0))
    assert night.holds(TUESDAY_03)  # Monday's night, early Tuesday
    assert not night.holds(datetime(2026, 11, 24, 23, 0))  # Tuesday night is not in it


@pytest.mark.parametrize("text", ["someday 09:00-10:00", "mon 25:00-26:00", "mon 09:00-09:00", "x"])
def test_a_malformed_window_is_e_invalidarg(text: str) -> None:
    with pytest.raises(BitsError) as refused:
        parse_window(text)
    assert refused.value.hresult == hresult.E_INVALIDARG


def test_the_first_limit_whose_window_holds_applies() -> None:
    limits = (Limit(0, parse_window("mon-fri 09:00-17:00")), Limit(2_000_000))
    assert current_limit(limits, MONDAY_10) == 0
    assert current_limit(limits, MONDAY_20) == 2_000_000
    assert current_limit((), MONDAY_10) is None


def test_the_effective_rate_is_the_smallest_and_foreground_ignores_the_policy() -> None:
    policy = BandwidthPolicy((Limit(5_000_000),), {int(JobPriority.LOW): (Limit(1_000_000),)})
    assert effective_rate(policy, JobPriority.LOW, None, MONDAY_10) == 1_000_000
    assert effective_rate(policy, JobPriority.NORMAL, None, MONDAY_10) == 5_000_000
    assert effective_rate(policy, JobPriority.NORMAL, 300_000, MONDAY_10) == 300_000
    assert effective_rate(policy, JobPriority.FOREGROUND, None, MONDAY_10) is None
    assert effective_rate(policy, JobPriority.FOREGROUND, 7, MONDAY_10) == 7


def test_a_zero_limit_blocks_background_priorities_only_inside_its_window() -> None:
    policy = BandwidthPolicy((Limit(0, parse_window("mon-fri 09:00-17:00")),))
    assert policy_blocks(policy, JobPriority.NORMAL, MONDAY_10)
    assert not policy_blocks(policy, JobPriority.NORMAL, MONDAY_20)
    assert not policy_blocks(policy, JobPriority.FOREGROUND, MONDAY_10)


def test_cost_flags_allow_the_networks_whose_state_bit_they_hold() -> None:
    standard = int(JobTransferPolicy.STANDARD)
    assert cost_allows(standard, int(CostFlags.UNRESTRICTED))
    assert cost_allows(standard, int(CostFlags.BELOW_CAP))
    assert not cost_allows(standard, int(CostFlags.ROAMING))
    assert not cost_allows(standard, int(CostFlags.OVERCAP_CHARGED))
    assert cost_allows(int(JobTransferPolicy.ALWAYS), int(CostFlags.ROAMING))


def test_a_network_cost_is_one_state_bit_or_none() -> None:
    assert check_network_cost(None) is None
    assert check_network_cost(int(CostFlags.ROAMING)) == 0x80
    for bad in (0, 3, int(CostFlags.IGNORE_CONGESTION)):
        with pytest.raises(BitsError):
            check_network_cost(bad)


@given(
    st.lists(
        st.builds(
            Limit,
            st.integers(0, 10**9),
            st.none()
            | st.builds(
                Window,
                st.frozensets(st.integers(0, 6), min_size=1),
                st.integers(0, 1439),
                st.integers(1, 1440),
            ),
        ),
        max_size=4,
    ),
    st.dictionaries(
        st.sampled_from([1, 2, 3]), st.lists(st.builds(Limit, st.integers(0, 10**6)), max_size=2)
    ),
)
def test_a_policy_survives_its_stored_form(
    global_limits: list[Limit], per: dict[int, list[Limit]]
) -> None:
    policy = BandwidthPolicy(tuple(global_limits), {p: tuple(v) for p, v in per.items()})
    assert BandwidthPolicy.from_data(policy.to_data()) == policy
    settings = EngineSettings().evolve("bandwidth", policy.to_data())
    assert settings.bandwidth == policy
    assert settings.version == 1


def test_the_secret_parameters_setting_keeps_only_parameter_names() -> None:
    """The setter checks names; a log edited by hand may hold anything, and a value that is
    not a name must not stop a manager or an engine from starting."""
    settings = EngineSettings().evolve("secret_parameters", ["h", "a=b", 3, "", "X-Edge-Hmac"])
    assert settings.secret_parameters == ("h", "X-Edge-Hmac")
    assert settings.version == 1
    assert settings.evolve("secret_parameters", None).secret_parameters == ()
