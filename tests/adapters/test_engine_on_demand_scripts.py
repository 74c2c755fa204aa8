"""A property of on-demand jobs (random access, bits-core.md §7.5) as a whole: whatever the
server does across requests (drops a connection mid-body, answers 503 or 429 with
Retry-After, redirects, sends a Content-Range that starts elsewhere, or replaces the file
with a new version of any size, with or without an ETag), ranges requested in two rounds,
then the whole file, end in a TRANSFERRED job whose file, after Complete, is exactly the
version the server holds last; between the rounds the temp file holds, at each filled
range, that range of one version. Hypothesis writes the server's script (one step per
GET); the real engine and HttpTransport run it against an aiohttp server on 127.0.0.1, on a
manual clock for the retry timers."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_engine import (
    _no_store_from_the_environment,  # noqa: F401
    make_engine,
)
from test_engine_fault_scripts import SETTINGS, STEPS, Script, _version, serving, versions

from backhaul.adapters.clock import ManualClock
from backhaul.adapters.manager import TransferJob, TransferManager
from backhaul.core import hresult as hr
from backhaul.core.vocabulary import JobPropertyId, JobState

S = JobState
# A server that ignores Range cannot serve random access (a fatal
# BG_E_RANDOM_ACCESS_NOT_SUPPORTED, tested on its own): no "whole" step here.
ON_DEMAND_STEPS = tuple(step for step in STEPS if step != "whole")
steps = st.lists(
    st.tuples(st.sampled_from((*ON_DEMAND_STEPS, "drop", "change")), st.floats(0.05, 0.95)),
    max_size=8,
)
# Ranges as fractions of the smallest version: (start, length), each inside the file.
fractions = st.lists(st.tuples(st.floats(0.0, 0.9), st.floats(0.01, 0.5)), min_size=1, max_size=3)


def _ranges(smallest: int, picks: list[tuple[float, float]]) -> list[tuple[int, int]]:
    out = []
    for start, part in picks:
        offset = int(smallest * start)
        out.append((offset, max(1, min(int(smallest * part), smallest - offset))))
    return out


async def _until(job: TransferJob, engine: object, clock: ManualClock, states: set[S]) -> None:
    """Let the engine run until the job is in one of ``states`` (at most about 3 s), moving
    the manual clock past MinimumRetryDelay at each TRANSIENT_ERROR."""
    for _ in range(300):
        await asyncio.sleep(0.01)
        if job.state in states:
            return
        if job.state is S.TRANSIENT_ERROR:
            clock.advance(10)
            engine.wake()  # type: ignore[attr-defined]


async def _run(
    script: Script, dest: Path, first: list[tuple[int, int]], second: list[tuple[int, int]]
) -> tuple[TransferJob, list[bytes]]:
    clock = ManualClock()
    manager = TransferManager("memory:", clock=clock)
    runner, (url,) = await serving([script])
    held: list[bytes] = []
    try:
        job = manager.create_job("on demand, scripted")
        job.set_property(JobPropertyId.ON_DEMAND_MODE, True)
        job.minimum_retry_delay = 5
        job.add_file(url, dest)
        engine = make_engine(manager)
        task = asyncio.create_task(engine.run())
        try:
            for ranges in (first, second, [(0, None)]):
                job.request_file_ranges(0, ranges)
                job.resume()
                await _until(job, engine, clock, {S.SUSPENDED, S.TRANSFERRED, S.ERROR})
                if job.state is S.SUSPENDED:
                    name = job.file(0).temporary_name
                    assert name is not None
                    data = Path(name).read_bytes()
                    held.extend(
                        data[r.offset : r.offset + (r.length or 0)]
                        for r in job.filled_file_ranges(0)
                    )
                if job.state is not S.SUSPENDED:
                    break
        finally:
            engine.stop()
            await asyncio.wait_for(task, 15)
        return job, held
    finally:
        await runner.cleanup()


@settings(SETTINGS, max_examples=150)
@given(
    versions=versions,
    steps=steps,
    etag=st.booleans(),
    first=fractions,
    second=fractions,
)
# Always among them: a drop in the first range, then a new version of the same size (no
# ETag) when the second round starts; and the same with an ETag and another size.
@example(
    versions=[_version(0, 16), _version(1, 16)],
    steps=[("ok", 0.5), ("drop", 0.5), ("ok", 0.5), ("ok", 0.5), ("change", 0.5)],
    etag=False,
    first=[(0.1, 0.3)],
    second=[(0.6, 0.2)],
)
@example(
    versions=[_version(0, 16), _version(1, 24)],
    steps=[("ok", 0.5), ("ok", 0.5), ("change", 0.5)],
    etag=True,
    first=[(0.0, 0.2), (0.5, 0.1)],
    second=[(0.3, 0.1)],
)
def test_an_on_demand_file_is_exactly_the_servers_last_version(
    versions: list[bytes],
    steps: list[tuple[str, float]],
    etag: bool,
    first: list[tuple[float, float]],
    second: list[tuple[float, float]],
) -> None:
    smallest = min(len(v) for v in versions)
    script = Script(versions, list(steps), etag)
    with tempfile.TemporaryDirectory() as tmp:
        dest = Path(tmp) / "f.bin"
        job, held = asyncio.run(
            _run(script, dest, _ranges(smallest, first), _ranges(smallest, second))
        )
        assert job.state is S.TRANSFERRED, (job.error, script.seen)
        assert job.complete() == hr.S_OK
        assert dest.read_bytes() == script.versions[script.current], script.seen
        assert sorted(p.name for p in Path(tmp).iterdir()) == ["f.bin"]
    # What a SUSPENDED job held at each filled range was that range of some version.
    for piece in held:
        assert any(piece in v for v in versions), script.seen
