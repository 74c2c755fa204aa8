"""Sets of byte ranges, for on-demand files (bits-core.md §7.5): the ranges an application
requested, the ranges the temp file holds, and what is still missing.

A set is a tuple of ``ByteRange`` sorted by offset, without overlaps or touching neighbours
(``merge`` makes one). ``length`` None means "to the end of the file": ``resolve`` turns
such ranges into closed ones once the file's size is known.
"""

from __future__ import annotations

from collections.abc import Iterable

from backhaul.core.value import ByteRange

__all__ = ["covers", "merge", "missing", "resolve", "starting_at", "total"]


def merge(ranges: Iterable[ByteRange]) -> tuple[ByteRange, ...]:
    """The union of ``ranges``, sorted, overlapping and adjacent ranges joined."""
    out: list[ByteRange] = []
    for r in sorted(ranges, key=lambda r: r.offset):
        if r.length == 0:
            continue
        if out:
            last = out[-1]
            if last.end is None:
                continue  # the last one runs to the end of the file already
            if r.offset <= last.end:
                end = None if r.end is None else max(last.end, r.end)
                out[-1] = ByteRange(last.offset, None if end is None else end - last.offset)
                continue
        out.append(r)
    return tuple(out)


def resolve(ranges: Iterable[ByteRange], size: int) -> tuple[ByteRange, ...]:
    """``ranges`` within a file of ``size`` bytes: to-the-end ranges closed, ranges cut at
    the end of the file, ranges past it dropped."""
    closed = []
    for r in ranges:
        end = size if r.end is None else min(r.end, size)
        if end > r.offset:
            closed.append(ByteRange(r.offset, end - r.offset))
    return merge(closed)


def missing(wanted: Iterable[ByteRange], have: Iterable[ByteRange]) -> tuple[ByteRange, ...]:
    """The parts of ``wanted`` (closed ranges) that ``have`` (closed ranges) lacks."""
    holes: list[ByteRange] = []
    held = merge(have)
    for w in merge(wanted):
        assert w.end is not None
        at = w.offset
        for h in held:
            assert h.end is not None
            if h.end <= at or h.offset >= w.end:
                continue
            if h.offset > at:
                holes.append(ByteRange(at, h.offset - at))
            at = max(at, h.end)
        if at < w.end:
            holes.append(ByteRange(at, w.end - at))
    return tuple(holes)


def starting_at(ranges: tuple[ByteRange, ...], position: int) -> tuple[ByteRange, ...]:
    """``ranges`` (closed, sorted) in the order to fill them from ``position`` on (the
    application's UpdateDownloadPosition): the range holding it cut there, the ones after
    it, then the ones before."""
    after: list[ByteRange] = []
    before: list[ByteRange] = []
    for r in ranges:
        assert r.end is not None
        if r.end <= position:
            before.append(r)
        elif r.offset >= position:
            after.append(r)
        else:
            after.append(ByteRange(position, r.end - position))
            before.append(ByteRange(r.offset, position - r.offset))
    return (*after, *before)


def within(ranges: Iterable[ByteRange], start: int, end: int) -> tuple[ByteRange, ...]:
    """The bytes at positions ``start`` to ``end`` of ``ranges`` laid end to end, in order
    (a ranged file's progress counts its ranges' bytes so: bytes ``start`` to ``end`` of
    that count are these parts of the remote file). A range to the end of the file
    (length None) runs on as far as ``end``."""
    parts: list[ByteRange] = []
    position = 0
    for r in ranges:
        if position >= end:
            break
        length = r.length if r.length is not None else end - position
        low, high = max(start, position), min(end, position + length)
        if high > low:
            parts.append(ByteRange(r.offset + low - position, high - low))
        position += length
    return tuple(parts)


def total(ranges: Iterable[ByteRange]) -> int:
    """The bytes in ``ranges`` (closed ones)."""
    return sum(r.length or 0 for r in ranges)


def covers(ranges: Iterable[ByteRange], size: int) -> bool:
    """Do ``ranges`` (closed) hold every byte of a file of ``size`` bytes?"""
    return not missing((ByteRange(0, size),), ranges) if size else True
