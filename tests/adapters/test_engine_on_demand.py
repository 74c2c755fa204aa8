"""On-demand jobs: IBackgroundCopyFile6's random access (bits-core.md §7.5).

A job in ON_DEMAND_MODE fetches only the byte ranges the application requested
(RequestFileRanges), from its download position on (UpdateDownloadPosition), into a temp
file laid out as the remote file. Once every requested range is in, the job is SUSPENDED
while the file has holes, and TRANSFERRED once it is whole; GetFilledFileRanges says what
the temp file holds, FileRangesTransferred callbacks say what just came. Against the
engine tests' nginx (ranges, ETag), and FaultServers for a dropped range, the download
position and a server without ranges."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
from peers.nginx import NginxServer
from test_cli_limits import ok
from test_engine import (  # the autouse fixture keeps BACKHAUL_STORE out
    FaultServer,
    KiB,
    Served,
    _no_store_from_the_environment,  # noqa: F401
    events_of,
    make_engine,
    of_type,
    running,
    trickle,
    until,
)

from backhaul.adapters.manager import TransferJob, TransferManager
from backhaul.core import byteranges
from backhaul.core import event as ev
from backhaul.core import hresult as hr
from backhaul.core.error import BitsError
from backhaul.core.value import ByteRange
from backhaul.core.vocabulary import JobPriority, JobPropertyId, JobType, NotifyFlags
from backhaul.core.vocabulary import JobState as S


def on_demand_job(manager: TransferManager, url: str, dest: Path) -> TransferJob:
    job = manager.create_job("on demand")
    job.set_property(JobPropertyId.ON_DEMAND_MODE, True)
    job.add_file(url, dest)
    return job


def temp_bytes(job: TransferJob) -> bytes:
    name = job.file(0).temporary_name
    assert name is not None
    return Path(name).read_bytes()


def test_requested_ranges_then_the_rest_against_nginx(
    tmp_path: Path, engine_nginx: tuple[NginxServer, Path]
) -> None:
    server, docroot = engine_nginx
    data = (docroot / "two.bin").read_bytes()
    size = len(data)
    manager = TransferManager(home=tmp_path / "home")
    dest = tmp_path / "two.bin"
    job = on_demand_job(manager, f"{server.url}/two.bin", dest)
    job.notify_flags = int(NotifyFlags.FILE_RANGES_TRANSFERRED | NotifyFlags.JOB_TRANSFERRED)
    job.request_file_ranges(0, [(0, 1000), (1_500_000, 4096), (1_500_100, 10), (2 << 20, None)])
    told: list[ByteRange] = []

    async def main() -> None:
        engine = make_engine(manager)
        engine.on("file_ranges_transferred", lambda _j, _f, ranges: told.extend(ranges))
        async with running(engine):
            job.resume()
            await until(lambda: job.state is S.SUSPENDED, "SUSPENDED: the ranges are in")
            wanted = [ByteRange(0, 1000), ByteRange(1_500_000, 4096), ByteRange(2 << 20, 123)]
            assert job.filled_file_ranges(0) == wanted
            held = temp_bytes(job)
            assert len(held) == size  # laid out as the remote file, holes between
            for r in wanted:
                assert r.length is not None
                assert held[r.offset : r.offset + r.length] == data[r.offset : r.offset + r.length]
            assert job.progress.bytes_transferred == 1000 + 4096 + 123
            assert job.progress.bytes_total == size
            assert not dest.exists()
            # The size is known now: a range past the end is refused, nothing recorded.
            with pytest.raises(BitsError) as outside:
                job.request_file_ranges(0, [(size - 10, 11)])
            assert outside.value.hresult == hr.BG_E_INVALID_RANGE
            job.request_file_ranges(0, [(0, None)])  # everything
            job.resume()
            await until(lambda: job.state is S.TRANSFERRED, "TRANSFERRED: the file is whole")

    asyncio.run(main())
    filled = of_type(events_of(manager, job.id), ev.RangesFilled)
    assert sum(r.length for e in filled for r in e.ranges) == size  # no byte fetched twice
    # Told once each, merged by the notification interval: the same bytes as the claims.
    assert byteranges.total(told) == byteranges.total(byteranges.merge(told)) == size
    assert job.filled_file_ranges(0) == [ByteRange(0, size)]
    assert job.complete() == hr.S_OK
    assert dest.read_bytes() == data


def test_random_access_needs_an_on_demand_job_and_a_plain_http_file(tmp_path: Path) -> None:
    manager = TransferManager(home=tmp_path / "home")
    plain = manager.create_job("plain")
    plain.add_file("http://127.0.0.1:9/f", tmp_path / "f")
    ranged = on_demand_job(manager, "http://127.0.0.1:9/a", tmp_path / "a")
    ranged.add_file("http://127.0.0.1:9/b", tmp_path / "b", ranges=[(0, 10)])
    smb = on_demand_job(manager, "smb://127.0.0.1/share/f", tmp_path / "s")
    refusals: list[tuple[Any, int]] = [
        (lambda: plain.request_file_ranges(0, [(0, 10)]), hr.BG_E_RANDOM_ACCESS_NOT_SUPPORTED),
        (lambda: plain.filled_file_ranges(0), hr.BG_E_RANDOM_ACCESS_NOT_SUPPORTED),
        (lambda: ranged.request_file_ranges(1, [(0, 5)]), hr.BG_E_RANDOM_ACCESS_NOT_SUPPORTED),
        (lambda: smb.update_download_position(0, 5), hr.BG_E_RANDOM_ACCESS_NOT_SUPPORTED),
        (lambda: ranged.request_file_ranges(0, [(0, 0)]), hr.BG_E_INVALID_RANGE),
        (lambda: ranged.request_file_ranges(0, [(-1, 5)]), hr.BG_E_INVALID_RANGE),
        (lambda: ranged.request_file_ranges(0, []), hr.E_INVALIDARG),
        (lambda: ranged.request_file_ranges(2, [(0, 5)]), hr.BG_E_FILE_NOT_FOUND),
    ]
    heads = {j.id: len(events_of(manager, j.id)) for j in (plain, ranged, smb)}
    for call, code in refusals:
        with pytest.raises(BitsError) as refused:
            call()
        assert hr.name_of(refused.value.hresult) == hr.name_of(code)
    assert {j.id: len(events_of(manager, j.id)) for j in (plain, ranged, smb)} == heads
    upload = manager.create_job("up", JobType.UPLOAD)
    with pytest.raises(BitsError) as refused:
        upload.set_property(JobPropertyId.ON_DEMAND_MODE, True)
    assert refused.value.hresult != hr.S_OK


def test_a_dropped_range_keeps_what_came_and_the_download_position_goes_first(
    tmp_path: Path,
) -> None:
    data = os.urandom(600 * KiB)
    served = trickle(data, drop_after=400 * KiB)
    manager = TransferManager(home=tmp_path / "home")
    job: TransferJob

    async def main() -> FaultServer:
        nonlocal job
        async with FaultServer({"/f": served}) as srv:
            job = on_demand_job(manager, srv.url("/f"), tmp_path / "f")
            job.minimum_retry_delay = 5
            job.request_file_ranges(0, [(0, 10 * KiB), (300 * KiB, 200 * KiB)])
            job.update_download_position(0, 300 * KiB)
            engine = make_engine(manager)
            async with running(engine):
                job.resume()
                await until(lambda: job.state is S.TRANSIENT_ERROR, "the dropped connection")
                kept = job.filled_file_ranges(0)
                assert kept and kept[0].offset == 300 * KiB
                job.resume()
                await until(lambda: job.state is S.SUSPENDED, "SUSPENDED")
            return srv

    srv = asyncio.run(main())
    starts = [h.range_start for h in srv.hits_for("/f")]
    resumed_at = of_type(events_of(manager, job.id), ev.RangesFilled)
    assert starts[0] == 300 * KiB  # the download position first
    assert starts[1] > 300 * KiB  # the retry goes on after what was claimed
    assert starts[-1] == 0  # then the range before the position
    assert job.filled_file_ranges(0) == [ByteRange(0, 10 * KiB), ByteRange(300 * KiB, 200 * KiB)]
    held = temp_bytes(job)
    assert held[300 * KiB : 500 * KiB] == data[300 * KiB : 500 * KiB]
    assert held[: 10 * KiB] == data[: 10 * KiB]
    assert sum(r.length for e in resumed_at for r in e.ranges) == 210 * KiB


def ended_in_error(
    tmp_path: Path, served: Served, ranges: list[tuple[int, int]], **properties: Any
) -> TransferJob:
    """An on-demand job of one file (``served``), with these job properties (by
    JobPropertyId name) and ``ranges`` requested, resumed: run until it is in ERROR."""
    manager = TransferManager(home=tmp_path / "home")

    async def main() -> TransferJob:
        async with FaultServer({"/f": served}) as srv:
            job = on_demand_job(manager, srv.url("/f"), tmp_path / "f")
            for name, value in properties.items():
                job.set_property(JobPropertyId[name], value)
            job.request_file_ranges(0, ranges)
            async with running(make_engine(manager)):
                job.resume()
                await until(lambda: job.state is S.ERROR, "ERROR")
            return job

    return asyncio.run(main())


def test_a_server_without_ranges_cannot_serve_an_on_demand_file(tmp_path: Path) -> None:
    job = ended_in_error(tmp_path, Served(os.urandom(64 * KiB), ranges=False), [(0, 100)])
    assert job.error is not None
    assert job.error.hresult == hr.BG_E_RANDOM_ACCESS_NOT_SUPPORTED
    assert not (tmp_path / "f").exists()


def test_the_random_access_verbs_against_nginx(
    tmp_path: Path, home: Path, engine_nginx: tuple[NginxServer, Path]
) -> None:
    server, docroot = engine_nginx
    data = (docroot / "one.bin").read_bytes()
    dest = tmp_path / "one.bin"
    job = ok(home, "create", "random access").strip()
    ok(home, "setproperty", job, "ON_DEMAND_MODE", "true")
    ok(home, "addfile", job, f"{server.url}/one.bin", str(dest))
    ok(home, "requestfileranges", job, "0", "4096:100,1000000:eof")
    ok(home, "updatedownloadposition", job, "0", "1000000")
    ok(home, "resume", job)
    ok(home, "serve", "--until-idle")
    assert ok(home, "getstate", job).strip() == "SUSPENDED"
    assert ok(home, "getfilledfileranges", job, "0").split() == [
        "4096:100",
        f"1000000:{len(data) - 1_000_000}",
    ]
    ok(home, "requestfileranges", job, "0", "0:eof")
    ok(home, "resume", job)
    ok(home, "serve", "--until-idle")
    assert ok(home, "getstate", job).strip() == "TRANSFERRED"
    ok(home, "complete", job)
    assert dest.read_bytes() == data


def test_file_ranges_transferred_keeps_to_the_notification_interval(tmp_path: Path) -> None:
    """Forty small ranges come within the interval: the first is told at once, the others
    are held and told together, merged, before the job's RangesDone."""
    data = os.urandom(64 * KiB)
    manager = TransferManager(home=tmp_path / "home")
    calls: list[list[ByteRange]] = []

    async def main() -> TransferJob:
        async with FaultServer({"/f": Served(data)}) as srv:
            job = on_demand_job(manager, srv.url("/f"), tmp_path / "f")
            job.notify_flags = int(NotifyFlags.FILE_RANGES_TRANSFERRED)
            job.set_property(JobPropertyId.MINIMUM_NOTIFICATION_INTERVAL_MS, 60_000)
            job.request_file_ranges(0, [(i * 1000, 100) for i in range(40)])
            engine = make_engine(manager)
            engine.on("file_ranges_transferred", lambda _j, _f, ranges: calls.append(ranges))
            async with running(engine):
                job.resume()
                await until(lambda: job.state is S.SUSPENDED, "SUSPENDED")
                await until(lambda: len(calls) == 2, "the held ranges told")
            return job

    job = asyncio.run(main())
    assert calls[0] == [ByteRange(0, 100)]
    assert calls[1] == [ByteRange(i * 1000, 100) for i in range(1, 40)]
    assert job.filled_file_ranges(0) == [ByteRange(i * 1000, 100) for i in range(40)]


def test_an_on_demand_job_with_a_file_that_has_ranges_ends_in_error(tmp_path: Path) -> None:
    """AddFileWithRanges into an on-demand job is allowed, but such a file has no random
    access: the engine ends the job in ERROR instead of fetching it some other way."""
    manager = TransferManager(home=tmp_path / "home")

    async def main() -> TransferJob:
        async with FaultServer({"/f": Served(os.urandom(4 * KiB))}) as srv:
            job = manager.create_job("on demand, ranged")
            job.set_property(JobPropertyId.ON_DEMAND_MODE, True)
            job.add_file(srv.url("/f"), tmp_path / "f", ranges=[(0, 100)])
            async with running(make_engine(manager)):
                job.resume()
                await until(lambda: job.state is S.ERROR, "ERROR")
            assert srv.hits == []  # nothing was asked of the server
            return job

    job = asyncio.run(main())
    assert job.error is not None
    assert (job.error.hresult, job.error.file_index) == (hr.BG_E_RANDOM_ACCESS_NOT_SUPPORTED, 0)


@pytest.mark.parametrize(
    "ranges", [[(200 * KiB, 10)], [(0, 100), (60 * KiB, 8 * KiB)]], ids=["past", "across"]
)
def test_a_range_requested_before_the_size_was_known_and_outside_the_file(
    tmp_path: Path, ranges: list[tuple[int, int]]
) -> None:
    """RequestFileRanges checks its ranges against the size when the size is known; before
    the engine first looked, it cannot. A range outside the file is BG_E_INVALID_RANGE at
    run time (fatal, §6.3), where it was dropped (the job went quietly to SUSPENDED)."""
    job = ended_in_error(tmp_path, Served(os.urandom(64 * KiB)), ranges)
    assert job.error is not None
    assert (job.error.hresult, job.error.file_index) == (hr.BG_E_INVALID_RANGE, 0)
    assert job.filled_file_ranges(0) == []


def test_an_empty_file_whose_head_gives_no_length_is_filled_on_demand(tmp_path: Path) -> None:
    """aiohttp's server answers HEAD of an empty file without a Content-Length, and the probe
    (Range: bytes=0-0) gets 416 with Content-Range bytes */0: that server takes ranges, and
    the empty file is published (it ended BG_E_RANDOM_ACCESS_NOT_SUPPORTED)."""
    manager = TransferManager(home=tmp_path / "home")

    async def main() -> TransferJob:
        async with FaultServer({"/f": Served(b"")}) as srv:
            job = on_demand_job(manager, srv.url("/f"), tmp_path / "f")
            job.request_file_ranges(0, [(0, None)])
            async with running(make_engine(manager)):
                job.resume()
                await until(lambda: job.state in (S.TRANSFERRED, S.ERROR), "the end")
            return job

    job = asyncio.run(main())
    assert job.state is S.TRANSFERRED, job.error
    assert job.complete() == hr.S_OK
    assert (tmp_path / "f").read_bytes() == b""


def test_max_download_size_bounds_the_bytes_an_on_demand_file_holds(tmp_path: Path) -> None:
    """BITS_JOB_PROPERTY_MAX_DOWNLOAD_SIZE holds for random access too: the second range
    takes the file's bytes past the limit, and the job ends in ERROR with
    BG_E_MAX_DOWNLOAD_SIZE_LIMIT_REACHED, the first range still claimed."""
    ranges = [(0, 4 * KiB), (32 * KiB, 4 * KiB)]
    job = ended_in_error(tmp_path, Served(os.urandom(64 * KiB)), ranges, MAX_DOWNLOAD_SIZE=6 * KiB)
    assert job.error is not None
    assert (job.error.hresult, job.error.file_index) == (hr.BG_E_MAX_DOWNLOAD_SIZE_LIMIT_REACHED, 0)
    assert job.filled_file_ranges(0) == [ByteRange(0, 4 * KiB)]
    assert job.progress.bytes_transferred <= 6 * KiB


def test_a_background_on_demand_job_counts_as_ours_when_the_engine_yields(
    tmp_path: Path,
) -> None:
    """While the engine measures idle bandwidth (yield_bandwidth), the bytes a background
    job fills are counted as its own traffic, as a plain download's are: else they would
    read as other programs' traffic, and the yield bucket would throttle the job to a
    trickle. A FOREGROUND job's bytes do not count (it never yields)."""
    data = os.urandom(256 * KiB)
    manager = TransferManager(home=tmp_path / "home")

    async def main() -> tuple[int, int]:
        async with FaultServer({"/f": Served(data), "/g": Served(data)}) as srv:
            background = on_demand_job(manager, srv.url("/f"), tmp_path / "f")
            background.request_file_ranges(0, [(0, 100 * KiB), (200 * KiB, 50 * KiB)])
            foreground = on_demand_job(manager, srv.url("/g"), tmp_path / "g")
            foreground.priority = JobPriority.FOREGROUND
            foreground.request_file_ranges(0, [(0, 10 * KiB)])
            engine = make_engine(manager, yield_bandwidth=True)
            assert engine.yielder is not None
            async with running(engine):
                background.resume()
                await until(lambda: background.state is S.SUSPENDED, "background SUSPENDED")
                ours = engine.yielder.ours
                foreground.resume()
                await until(lambda: foreground.state is S.SUSPENDED, "foreground SUSPENDED")
                assert not engine._bg_sockets  # every socket taken out again
                return ours, engine.yielder.ours

    ours, after = asyncio.run(main())
    assert ours == after == 150 * KiB


def test_ranges_held_by_the_interval_are_told_when_the_engine_stops(tmp_path: Path) -> None:
    """A range claimed and held back by the notification interval is not lost when the
    engine stops in the middle of the next range: the stop claims what came of that range
    and ends the job's slice, and the held ranges are told before that event, merged with
    the part just claimed."""
    data = os.urandom(256 * KiB)
    manager = TransferManager(home=tmp_path / "home")
    calls: list[list[ByteRange]] = []

    async def main() -> TransferJob:
        async with FaultServer({"/f": trickle(data, step=KiB, delay=0.05)}) as srv:
            job = on_demand_job(manager, srv.url("/f"), tmp_path / "f")
            job.notify_flags = int(NotifyFlags.FILE_RANGES_TRANSFERRED)
            job.set_property(JobPropertyId.MINIMUM_NOTIFICATION_INTERVAL_MS, 600_000)
            job.request_file_ranges(0, [(0, KiB), (8 * KiB, KiB), (64 * KiB, 128 * KiB)])
            engine = make_engine(manager)
            engine.on("file_ranges_transferred", lambda _j, _f, ranges: calls.append(ranges))
            async with running(engine):
                job.resume()
                await until(lambda: len(job.filled_file_ranges(0)) == 3, "the third range began")
                assert calls == [[ByteRange(0, KiB)]]  # the second is held
            return job

    job = asyncio.run(main())
    assert len(calls) == 2, calls
    held = job.filled_file_ranges(0)
    assert calls[1][0] == ByteRange(8 * KiB, KiB) and calls[1][1].offset == 64 * KiB
    assert calls[0] + calls[1] == held  # every byte claimed was told, once


@pytest.mark.parametrize(
    ("etag", "changed"),
    [('"v1"', True), (None, True), (None, False)],
    ids=["etag", "same-size", "same"],
)
def test_a_remote_file_that_changed_fills_its_ranges_again_from_the_new_version(
    tmp_path: Path, etag: str | None, changed: bool
) -> None:
    """A new version on the server between two fills. With an ETag, the stat shows it. With
    neither ETag nor Last-Modified and the same size, before new ranges join the held ones
    the last bytes held are fetched again and compared. Either way the file restarts and
    every requested range comes from the new version; an unchanged file fetches only the
    new range (and, without a validator, the sample)."""
    old = os.urandom(64 * KiB)
    new = os.urandom(64 * KiB) if changed else old
    served = Served(old, etag=etag)
    manager = TransferManager(home=tmp_path / "home")

    async def main() -> tuple[TransferJob, FaultServer]:
        async with FaultServer({"/f": served}) as srv:
            job = on_demand_job(manager, srv.url("/f"), tmp_path / "f")
            job.request_file_ranges(0, [(0, 1000)])
            async with running(make_engine(manager)):
                job.resume()
                await until(lambda: job.state is S.SUSPENDED, "SUSPENDED")
                served.data = new
                if etag is not None:
                    served.etag = '"v2"'
                job.request_file_ranges(0, [(5000, 1000)])
                job.resume()
                await until(
                    lambda: job.state is S.SUSPENDED and len(job.filled_file_ranges(0)) == 2,
                    "SUSPENDED again",
                )
            return job, srv

    job, srv = asyncio.run(main())
    restarts = of_type(events_of(manager, job.id), ev.FileRestarted)
    held = temp_bytes(job)
    assert held[:1000] == new[:1000] and held[5000:6000] == new[5000:6000]
    assert job.filled_file_ranges(0) == [ByteRange(0, 1000), ByteRange(5000, 1000)]
    gets = [h.range_start for h in srv.hits_for("/f") if h.method == "GET"]
    if etag is not None:
        assert [r.reason for r in restarts] == ["the remote file changed"]
        assert gets == [0, 0, 5000]  # the first fill, then both ranges again
    elif changed:
        assert [r.reason for r in restarts] == [
            "the remote file changed: the bytes it holds are not the same"
        ]
        assert gets == [0, 0, 0, 5000]  # the first fill, the sample, then both ranges again
    else:
        assert restarts == []
        assert gets == [0, 0, 5000]


def test_a_final_job_leaves_no_notification_clocks_behind(tmp_path: Path) -> None:
    """The callback intervals keep a clock per job and per on-demand file; a long-running
    engine drops them once the job is final (here: completed), else they would grow with
    every job it ever ran."""
    data = os.urandom(64 * KiB)
    manager = TransferManager(home=tmp_path / "home")

    async def main() -> None:
        async with FaultServer({"/f": Served(data)}) as srv:
            job = on_demand_job(manager, srv.url("/f"), tmp_path / "f")
            job.notify_flags = int(
                NotifyFlags.FILE_RANGES_TRANSFERRED | NotifyFlags.JOB_MODIFICATION
            )
            job.request_file_ranges(0, [(0, None)])
            engine = make_engine(manager)
            engine.on("file_ranges_transferred", lambda *_: None)
            engine.on("job_modification", lambda *_: None)
            clocks = engine.callbacks._last_ranges, engine.callbacks._last_modification
            async with running(engine):
                job.resume()
                await until(lambda: job.state is S.TRANSFERRED, "TRANSFERRED")
                # The engine tells what the log says once it has read it back.
                await until(lambda: all(job.id in told for told in clocks), "the clocks")
                assert job.complete() == hr.S_OK
                await until(lambda: not any(job.id in told for told in clocks), "forgotten")

    asyncio.run(main())
    assert (tmp_path / "f").read_bytes() == data
