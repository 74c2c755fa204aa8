"""The server faults of the downloads issue across many concurrent jobs, with one engine.

``JOBS`` download jobs of 1-2 files (64 KiB to 2 MiB, each response paced) run at once (half
FOREGROUND, half NORMAL with ``max_background`` 16) against one server where every file gets a
random fault, each firing once:

* ``drop``: the connection closes mid-body (the job resumes at its checkpoint);
* ``503`` / ``503x2``: "503 Service Unavailable" (Retry-After: 1) once or twice, then success;
* ``stall``: the body stops for longer than the engine's stall timeout (1 s), then goes on;
* ``changed``: mid-body the file changes (new bytes, new size, new ETag) and the connection
  drops; the resume's If-Range no longer matches, so the file restarts and ends as the new
  version;
* ``no-ranges``: the server ignores Range (always 200, no Accept-Ranges) and drops once: the
  file restarts from 0;
* ``missing``: 404 (a fatal error: the job goes to ERROR and the application cancels it);
* ``none``.

The run ends with the suite's checks (final states, SHA-256 of the version the server had
last, no temp file, exact resumes, bounded refetching) and checks that each fault showed in
the log as BITS would report it.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from pathlib import Path

import pytest
from reliability_helpers import (
    FileRef,
    FileServer,
    KiB,
    MiB,
    Source,
    blobs,
    check_files,
    check_no_temps,
    check_requests,
    check_states,
    expect_none,
    make_engine,
    read_streams,
    seed_for,
    size,
    summary,
)

from backhaul.adapters.manager import TransferManager
from backhaul.core import event as ev
from backhaul.core import hresult
from backhaul.core.limit import UNLIMITED
from backhaul.core.vocabulary import JobPriority, JobState

pytestmark = pytest.mark.slow

JOBS = size(50, 200)
RATE = 4 * MiB
STALL_TIMEOUT = 1.0
FAULTS = ("none", "drop", "503", "503x2", "stall", "changed", "no-ranges", "missing")
WEIGHTS = (3, 3, 2, 1, 2, 2, 2, 0)  # "missing" is added to exactly two jobs
PER_INTERRUPTION = 1 * MiB  # 0.05 s checkpoints at 4 MiB/s, plus slack and socket buffers
TIMEOUT = size(60.0, 180.0)
HTTP_TIMEOUT = 0x80072EE2


def _source(rng: random.Random, data: bytes, fault: str) -> Source:
    s = Source(data, rate=RATE, faults=(fault,))
    cut = rng.randrange(len(data) // 4, len(data) * 3 // 4)
    if fault == "drop":
        s.drop_after = cut
    elif fault == "503":
        s.statuses, s.retry_after = [503], "1"
    elif fault == "503x2":
        s.statuses, s.retry_after = [503, 503], "1"
    elif fault == "stall":
        s.stall_at, s.stall_seconds = cut, STALL_TIMEOUT + 1.5
    elif fault == "changed":
        s.change_at = cut
        s.new_data = rng.randbytes(len(data) + rng.randrange(-len(data) // 2, 64 * KiB))
    elif fault == "no-ranges":
        s.ranges, s.drop_after = False, cut
    return s


def test_server_faults_across_many_concurrent_jobs(tmp_path: Path) -> None:
    seed = seed_for("server-faults")
    rng = random.Random(seed)
    dest = tmp_path / "dest"
    dest.mkdir()
    pool = blobs(rng, 24, 64 * KiB, 2 * MiB)
    t0 = time.monotonic()
    with FileServer() as server:
        manager = TransferManager(home=tmp_path / "home", limits=UNLIMITED)
        refs: list[FileRef] = []
        expected: dict[str, JobState] = {}
        missing_jobs = set(rng.sample(range(JOBS), 2))
        faults_of: dict[str, list[str]] = {}
        for j in range(JOBS):
            specs = []
            for k in range(rng.randint(1, 2)):
                fault = rng.choices(FAULTS, WEIGHTS)[0]
                if j in missing_jobs and k == 0:
                    fault = "missing"
                path = f"/j{j}/f{k}.bin"
                source = _source(rng, rng.choice(pool), fault)
                if fault != "missing":
                    server.add(path, source)
                specs.append((path, dest / f"j{j}-f{k}.bin", source))
            job = manager.create_job(f"faults-{j}")
            job.priority = JobPriority.FOREGROUND if j % 2 else JobPriority.NORMAL
            job.minimum_retry_delay = 5  # the floor (BITS's default is 600 s)
            job.add_files([(server.url(p), d) for p, d, _ in specs])
            job.resume()
            faults_of[job.id] = [s.faults[0] for _, _, s in specs]
            expected[job.id] = JobState.CANCELLED if j in missing_jobs else JobState.ACKNOWLEDGED
            refs += [FileRef(job.id, k, p, d, s) for k, (p, d, s) in enumerate(specs)]
        engine = make_engine(manager, max_background=16, stall_timeout=STALL_TIMEOUT)
        completed: set[str] = set()
        fatal: dict[str, str] = {}

        async def main() -> None:
            run = asyncio.create_task(engine.run())
            try:
                deadline = time.monotonic() + TIMEOUT
                while len(completed) + len(fatal) < JOBS and time.monotonic() < deadline:
                    for job in manager.jobs():
                        state = job.state
                        if state is JobState.TRANSFERRED:
                            assert job.complete() == hresult.S_OK
                            completed.add(job.id)
                        elif state is JobState.ERROR:
                            error = job.error
                            assert error is not None
                            fatal[job.id] = f"{error.context.name} {error.hresult:#x}"
                            job.cancel()
                    await asyncio.sleep(0.1)
            finally:
                engine.stop()
                await asyncio.wait_for(run, 15)

        asyncio.run(main())
        server.wait_quiet()
        context = f"seed {seed}"
        streams = read_streams(manager.store, expected)
        expect_none(check_states(manager.store, expected, streams), "wrong final states", context)
        expect_none(check_files(refs, completed), "wrong files", context)
        expect_none(check_no_temps([dest]), "temp files left", context)
        report = check_requests(server, refs, streams, PER_INTERRUPTION, completed=completed)
        expect_none(report.violations, "refetched bytes", context)
        # Each fault shows in the log as BITS reports it.
        problems = []
        paths = {(r.job_id, r.index): r.path for r in refs}
        for job_id, faults in faults_of.items():
            events = [r.event for r in streams[job_id]]
            codes = {e.error.hresult for e in events if isinstance(e, ev.ErrorOccurred)}
            restarted = {e.file_index for e in events if isinstance(e, ev.FileRestarted)}
            for k, fault in enumerate(faults):
                where = f"job {job_id[:8]} file {k} ({fault})"
                if fault == "missing":
                    want = f"REMOTE_FILE {hresult.BG_E_HTTP_ERROR_404:#x}"
                    if fatal.get(job_id) != want:
                        problems.append(f"{where}: fatal error {fatal.get(job_id)}, not {want}")
                    break  # the job stops at its missing file
                found = sorted(map(hex, codes))
                # A job records one error at a time: when another file of the job (the engine
                # may fetch the next file while one finishes) failed at about the same moment,
                # that error stands for both.
                hit = [r.at for r in server.requests_for(paths[(job_id, k)]) if r.status == 503]
                hit += [r.at for r in server.requests_for(paths[(job_id, k)]) if r.error]
                masked = any(
                    isinstance(r.event, ev.ErrorOccurred)
                    and r.event.error.file_index != k
                    and any(abs(r.when - t) < 3.0 for t in hit)
                    for r in streams[job_id]
                )
                wanted = hresult.BG_E_HTTP_ERROR_503
                if fault in ("503", "503x2") and not masked and wanted not in codes:
                    problems.append(f"{where}: no BG_E_HTTP_ERROR_503 in {found}")
                if fault == "stall" and not masked and HTTP_TIMEOUT not in codes:
                    problems.append(f"{where}: no stall error (0x80072EE2) in {found}")
                # A resume from a checkpoint that got the whole new body (200) restarts the
                # file in the log; a resume from 0 (no checkpoint yet) needs no restart.
                refused = [
                    r
                    for r in server.requests_for(paths[(job_id, k)])
                    if r.range_header and r.status == 200
                ]
                if refused and k not in restarted:
                    problems.append(f"{where}: a resume got 200, yet the file never restarted")
        expect_none(problems, "faults not reported as BITS does", context)
        manager.close()
    counts = Counter(f for faults in faults_of.values() for f in faults)
    summary(
        "server faults",
        {
            "seed": seed,
            "jobs": JOBS,
            "faults": dict(counts),
            "completed": len(completed),
            "cancelled_after_error": len(fatal),
            "requests": report.requests,
            "resumed_mid_file": report.resumed_mid_file,
            "waste_bytes": report.waste_bytes,
            "worst_interruption": report.worst_interruption,
            "seconds": round(time.monotonic() - t0, 1),
        },
        tmp_path / "summary.json",
    )
