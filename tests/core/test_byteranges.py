"""core/byteranges.py against a model: a range set is the set of byte offsets it holds."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from backhaul.core import byteranges
from backhaul.core.value import ByteRange

SIZE = 64
closed = st.builds(
    lambda offset, length: ByteRange(offset, length),
    st.integers(0, SIZE - 1),
    st.integers(1, SIZE),
)
any_range = closed | st.builds(ByteRange, st.integers(0, SIZE - 1), st.none())


def offsets(ranges: tuple[ByteRange, ...] | list[ByteRange], size: int = SIZE) -> set[int]:
    held: set[int] = set()
    for r in ranges:
        held.update(range(r.offset, size if r.end is None else r.end))
    return held


def is_normal(ranges: tuple[ByteRange, ...]) -> bool:
    """Sorted, no empty range, no overlapping or touching neighbours."""
    ends = [(r.offset, r.end) for r in ranges]
    return all(length is None or length > 0 for length in (r.length for r in ranges)) and all(
        a_end is not None and a_end < b_start
        for (_, a_end), (b_start, _) in itertools.pairwise(ends)
    )


@given(st.lists(any_range, max_size=8))
def test_merge_holds_the_same_bytes_in_normal_form(ranges: list[ByteRange]) -> None:
    merged = byteranges.merge(ranges)
    assert is_normal(merged)
    assert offsets(merged, 10 * SIZE) == offsets(ranges, 10 * SIZE)


@given(st.lists(any_range, max_size=8), st.integers(0, SIZE))
def test_resolve_closes_and_cuts_at_the_size(ranges: list[ByteRange], size: int) -> None:
    resolved = byteranges.resolve(ranges, size)
    assert is_normal(resolved) and all(r.length is not None for r in resolved)
    assert offsets(resolved) == {i for i in offsets(ranges) if i < size}


@given(st.lists(closed, max_size=6), st.lists(closed, max_size=6))
def test_missing_is_the_difference(wanted: list[ByteRange], have: list[ByteRange]) -> None:
    holes = byteranges.missing(wanted, have)
    assert offsets(holes, 2 * SIZE) == offsets(wanted, 2 * SIZE) - offsets(have, 2 * SIZE)
    assert byteranges.total(holes) == len(offsets(holes, 2 * SIZE))


@given(st.lists(closed, max_size=6), st.integers(0, 2 * SIZE))
def test_starting_at_reorders_without_losing_a_byte(ranges: list[ByteRange], at: int) -> None:
    normal = byteranges.merge(ranges)
    ordered = byteranges.starting_at(normal, at)
    assert offsets(ordered, 2 * SIZE) == offsets(normal, 2 * SIZE)
    firsts = [r.offset for r in ordered]
    after = [o for o in firsts if o >= at]
    assert firsts[: len(after)] == after  # from the position on, then what lies before


@given(st.lists(closed, max_size=6), st.integers(0, SIZE))
def test_covers_means_every_byte(ranges: list[ByteRange], size: int) -> None:
    assert byteranges.covers(ranges, size) == (set(range(size)) <= offsets(ranges, 2 * SIZE))


@given(st.lists(closed, min_size=1, max_size=6), st.integers(0, 400), st.integers(0, 400))
def test_within_gives_the_bytes_at_those_positions_of_the_ranges_laid_end_to_end(
    ranges: list[ByteRange], start: int, end: int
) -> None:
    """A model: the remote offsets of the ranges' bytes in order, sliced [start, end)."""
    laid = [o for r in ranges for o in range(r.offset, r.offset + (r.length or 0))]
    parts = byteranges.within(ranges, start, end)
    assert [o for r in parts for o in range(r.offset, r.offset + (r.length or 0))] == laid[
        start:end
    ]
    assert all(r.length for r in parts)


def test_within_runs_a_range_to_the_end_of_the_file_as_far_as_asked() -> None:
    ranges = [ByteRange(10, 5), ByteRange(100, None)]
    assert byteranges.within(ranges, 3, 12) == (ByteRange(13, 2), ByteRange(100, 7))
