"""The suite's own checks catch what they are for (synthetic logs and request logs): a check
that cannot fail proves nothing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from reliability_helpers import (
    FileRef,
    FileServer,
    Rec,
    Request,
    Source,
    check_fencing,
    check_no_temps,
    check_requests,
)

from backhaul.core import event as ev

T0 = datetime(2026, 11, 25, 12, tzinfo=UTC)
JOB = "00000000-0000-4000-8000-000000000001"


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def lease(version: int, t: float, worker: str, app: str, seconds: float = 2.0) -> Rec:
    return Rec(version, ev.LeaseTaken(at(t), worker, at(t + seconds)), app, t)


def checkpoint(version: int, t: float, offset: int, app: str) -> Rec:
    return Rec(version, ev.BytesCheckpointed(at(t), 0, offset, 1000), app, t)


def test_fencing_accepts_a_clean_take_over_and_catches_a_fenced_append() -> None:
    clean = [
        lease(1, 0.0, "a-1-x", "w0.0"),
        checkpoint(2, 0.5, 100, "w0.0"),
        lease(3, 3.0, "b-2-y", "w1.0"),  # a's lease ran out at 2.0
        Rec(4, ev.SliceEnded(at(3.1)), "w1.0", 3.1),
        checkpoint(5, 3.5, 200, "w1.0"),
    ]
    assert check_fencing({JOB: clean}) == []
    fenced = [*clean, checkpoint(6, 3.6, 150, "w0.0")]  # a, fenced, appends after b took over
    assert any("not the lease holder" in p for p in check_fencing({JOB: fenced}))
    stolen = [lease(1, 0.0, "a-1-x", "w0.0"), lease(2, 1.0, "b-2-y", "w1.0")]  # a held until 2.0
    assert any("taken from" in p for p in check_fencing({JOB: stolen}))
    early = [lease(1, 0.0, "a-1-x", "w0.0"), Rec(2, ev.SliceEnded(at(1.0)), "w1.0", 1.0)]
    assert any("held the lease" in p for p in check_fencing({JOB: early}))


def test_requests_must_resume_at_the_logs_checkpoint(tmp_path: Path) -> None:
    source = Source(b"x" * 1000)
    ref = FileRef(JOB, 0, "/f", tmp_path / "f", source)
    streams = {
        JOB: [
            lease(1, 0.0, "a-1-x", "w0.0"),
            checkpoint(2, 0.5, 400, "w0.0"),
            Rec(3, ev.FileTransferred(at(5.0), 0, 1000), "w0.0", 5.0),
        ]
    }
    server = FileServer()
    first = Request("/f", 0.1 + T0.timestamp(), 200, 0, 1000, None, None, 1, served=500)
    good = Request("/f", 1.0 + T0.timestamp(), 206, 400, 1000, "bytes=400-", '"v"', 1, 600, True)
    server.requests = [first, good]
    # The Rec times are seconds after T0 in these synthetic logs: shift them to epoch time.
    for rec in streams[JOB]:
        rec.inserted = (rec.inserted or 0) + T0.timestamp()
    assert check_requests(server, [ref], streams, 200).violations == []
    back = Request("/f", 1.0 + T0.timestamp(), 206, 0, 1000, "bytes=0-", '"v"', 1, 1000, True)
    server.requests = [first, back]
    assert any(
        "checkpoint then was 400" in p
        for p in check_requests(server, [ref], streams, 2000).violations
    )
    late = Request("/f", 6.0 + T0.timestamp(), 206, 400, 1000, "bytes=400-", '"v"', 1, 600, True)
    server.requests = [first, good, late]
    assert any(
        "after FileTransferred" in p for p in check_requests(server, [ref], streams, 200).violations
    )
    server.requests = [first, good]
    assert check_requests(server, [ref], streams, 50).violations  # 100 bytes served again > 50
    server._loop.close()  # never started


def test_temp_files_are_found(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".f.bin.12345678-0.bhtmp").write_bytes(b"")
    assert check_no_temps([tmp_path])


def test_only_a_thawed_lease_holders_cancelled_request_is_spared(tmp_path: Path) -> None:
    """A GET after FileTransferred fails the run, except the one a worker sends as it is
    thawed from a freeze that began while it held the job's lease, and that it cancels
    (reliability_helpers.THAW_GRACE). The same GET from anyone else, later, or served to the
    end still fails."""
    source = Source(b"x" * 1000)
    ref = FileRef(JOB, 0, "/f", tmp_path / "f", source)
    recs = [
        lease(1, 0.0, "a-1-x", "w0.0"),  # w0.0 holds the lease; it is frozen at 1.0
        lease(2, 3.0, "b-2-y", "w1.0"),  # w1.0 takes over once the lease ran out
        Rec(3, ev.FileTransferred(at(4.0), 0, 1000), "w1.0", 4.0),
    ]
    for rec in recs:
        rec.inserted = (rec.inserted or 0) + T0.timestamp()
    streams = {JOB: recs}
    e = T0.timestamp()
    whole = Request("/f", 3.1 + e, 200, 0, 1000, None, None, 1, 1000, True)
    server = FileServer()

    def report(late: Request, thaws: list[tuple[str, float, float]]) -> list[str]:
        server.requests = [whole, late]
        result = check_requests(server, [ref], streams, 200, completed={JOB}, thaws=thaws)
        return result.violations

    cancelled = Request("/f", 5.2 + e, 200, 0, 1000, None, None, 1, 300, False)
    assert report(cancelled, [("w0.0", 1.0 + e, 5.0 + e)]) == []
    assert report(cancelled, [("w1.0", 1.0 + e, 5.0 + e)]), "not the frozen lease holder"
    assert report(cancelled, [("w0.0", 1.0 + e, 4.5 + e)]), "too long after the thaw"
    assert report(cancelled, []), "nobody was frozen"
    served = Request("/f", 5.2 + e, 200, 0, 1000, None, None, 1, 1000, True)
    assert report(served, [("w0.0", 1.0 + e, 5.0 + e)]), "served to its end"
    server._loop.close()  # never started
