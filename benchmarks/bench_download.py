"""Benchmark downloads from a real nginx on loopback: backhaul against curl and aria2c.

Run from the project root::

    .venv/bin/python benchmarks/bench_download.py [--quick] [--rounds 3] [--json OUT]
    .venv/bin/python benchmarks/bench_download.py --cases big,files64,files4 [--max-jobs N]
    .venv/bin/python benchmarks/bench_download.py --profile files4 [--quick]

nginx (tests/peers/nginx.py) serves a docroot of random files made once per run in a temp
directory (``--dir`` picks its parent); everything is deleted at the end unless ``--keep``.
Every tool runs as a child process; its wall time comes from ``time.perf_counter`` around it and
its CPU time and peak RSS from ``os.wait4`` (the child's own ``rusage``: the same figures as a
``resource.getrusage(RUSAGE_CHILDREN)`` delta around that one child).

Cases (full size; ``--quick`` in brackets):

a. one 1 GiB [128 MiB] file to disk: ``curl -o``, ``aria2c -x1 -s1`` twice, ``backhaul get``
   (a FOREGROUND job, run by the command's own engine and completed). Plus ``backhaul
   in-process``: the same job on an ``Engine`` in this process, with ``store.append_many``
   wrapped to sum the time spent appending to the log (its share of the transfer). The log of
   every ``backhaul get`` run is read back to count its events and checkpoints.
   The two aria2c rows: ``aria2c alloc=none`` runs with ``--file-allocation=none`` (tuned,
   as every other aria2c run here), ``aria2c alloc=default`` with aria2c's default allocation
   (``prealloc``: the whole file is reserved before the download starts; aria2c 1.36 does it
   with one ``fallocate(2)`` where the filesystem has it, as ext4 does, and writes zeros
   where it has not). The reference figure the aria2c target was sized from (aria2c
   2.75-3.6x curl) was measured with the default.
b. 1,000 [200] files of 64 KiB: ``aria2c -j16 -i LIST``, ``curl -Z --parallel-max 16`` (for
   reference), and backhaul as ONE job of N files and as N one-file FOREGROUND jobs.
c. 10,000 [1,000] files of 4 KiB: the same tools.
d. peak RSS of ``backhaul get`` (and curl, aria2c) for 256 MiB [32 MiB] against the 1 GiB of (a).

backhaul's many-file jobs are created through the Python API in this process with
``backhaul.core.limit.UNLIMITED``, since one job holds more than BITS's 200 files and there
are more than 60 jobs per owner. (The command line lifts the same limits with ``backhaul
--unlimited`` or ``$BACKHAUL_UNLIMITED=1``; creating jobs one ``backhaul create`` process at a
time would measure the command's start-up, not the store.) The jobs are caught up into the
read model, then run by a ``backhaul --unlimited serve --until-idle`` child, then completed
through the API (Complete publishes the files under their names, as the other tools leave
them). The table shows the three phases and their sum; the ratios to aria2c are given for the
serve alone and for the sum. The ``in-process`` rows run the same jobs as an application that
embeds the engine does: created, run by an ``Engine`` (``run(until_idle=True)``) and completed,
all in this process, each phase opening the store afresh; no ``serve`` child starts. This
process sets the cyclic collector as the README advises an application holding thousands of
jobs, and as the ``backhaul`` command does at start (``backhaul.adapters.cli.tune_gc``: young
objects every 20,000 allocations): without it, 10,000 jobs run in-process took longer than
in a ``serve`` child (run V).

Targets (``TARGETS``; ratios of wall times, medians of per-round pairs): 1 GiB ``backhaul
get`` <= 1.10x curl and <= 0.40x aria2c (checked against both aria2c rows); 1,000 x 64 KiB
<= 0.50x ``aria2c -j16``, as one job and as 1,000 jobs; 10,000 x 4 KiB as one job <= 0.25x
``aria2c -j16``; log appends < 1% of the 1 GiB transfer; flat peak RSS from (d) to (a).
The many-file targets are checked twice: through ``serve`` (the command) and in-process (an
embedding application).

Each round runs every tool of a case once, in an order rotated by one each round; the table
gives the median over ``--rounds`` (3) rounds, and ratios are medians of the per-round pairs.
The single-file cases first run every tool ``--warmup`` (1) times uncounted: the first runs
after the docroot is written were 1.3-2x slower for every tool alike (page cache and writeback
of the freshly written source). ``sync`` runs between runs, untimed, so that no run pays for
the previous one's writeback.
Nothing is deleted while the benchmark runs (deleting many files makes creating files slow for
minutes on this filesystem). The single-file outputs keep their names and are truncated before
each run. For the many-file cases every run writes into a new directory, so every tool creates
its N files: backhaul always creates new files (a temp file per file, renamed on Complete), and
rewriting the previous round's files in place would spare curl and aria2c the file creation
(≈0.3–0.8 ms per file here, against ≈50 µs to truncate and rewrite one).

``--quick`` is the small size (the brackets above); ``--cases`` picks cases, ``--max-jobs`` caps
the N of the N-jobs rows (N jobs of len/N files each).

``--profile CASE`` (big, files64, files4, jobs64, jobs4) runs that case's backhaul job once on
an in-process engine under cProfile and prints the top entries instead of benchmarking.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import datetime as dt
import gc
import io
import json
import os
import platform
import pstats
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import installed

from backhaul.adapters.cli import tune_gc
from backhaul.adapters.engine import Engine
from backhaul.adapters.manager import TransferManager
from backhaul.adapters.store import DB_FILE, EventStore, open_store
from backhaul.core import event as ev
from backhaul.core.limit import UNLIMITED
from backhaul.core.value import FileSpec
from backhaul.core.vocabulary import JobPriority, JobState

ROOT = Path(__file__).resolve().parent.parent
BACKHAUL = str(Path(sys.executable).parent / "backhaul")
TIME = "/usr/bin/time"  # GNU time, for the children's peak RSS
KiB, MiB, GiB = 1024, 1024 * 1024, 1024 * 1024 * 1024
ARIA2_DEFAULTS = (  # aria2c's own settings, output quietened
    "--no-conf",
    "--allow-overwrite=true",
    "--auto-file-renaming=false",
    "--console-log-level=warn",
    "--summary-interval=0",
    "--download-result=hide",
)
ARIA2_COMMON = (*ARIA2_DEFAULTS, "--file-allocation=none")  # tuned: no preallocation
ARIA2_TUNED, ARIA2_DEFAULT = "aria2c alloc=none", "aria2c alloc=default"
ARIA2_MANY = "aria2c -j16"
CASES = ("big", "mid", "files64", "files4")
ONE_JOB = "backhaul 1 job"
INPROCESS = " in-process"
ONE_JOB_INPROCESS = ONE_JOB + INPROCESS
TARGETS = {
    "big_vs_curl": 1.10,
    "big_vs_aria2c": 0.40,
    "big_vs_aria2c_default": 0.40,
    "files64_vs_aria2c": 0.50,
    "files64_jobs_vs_aria2c": 0.50,
    "files4_vs_aria2c": 0.25,
    "files64_inprocess_vs_aria2c": 0.50,
    "files64_jobs_inprocess_vs_aria2c": 0.50,
    "files4_inprocess_vs_aria2c": 0.25,
    "append_share": 0.01,
    "rss_growth": 1.10,
}


@dataclass(frozen=True)
class Sizes:
    big: int
    mid: int
    files64: int
    files4: int

    @classmethod
    def pick(cls, quick: bool) -> Sizes:
        return cls(128 * MiB, 32 * MiB, 200, 1000) if quick else cls(GiB, 256 * MiB, 1000, 10000)


@dataclass
class Run:
    case: str
    tool: str
    round: int
    wall: float
    cpu: float
    rss_kib: int
    phases: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def log(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


# -- processes -------------------------------------------------------------------------------


@dataclass
class Child:
    wall: float
    cpu: float
    rss_kib: int
    stdout: str


def run_child(argv: Sequence[str], workdir: Path, env: dict[str, str] | None = None) -> Child:
    """Run ``argv`` to its end. Wall time from perf_counter; CPU time from ``os.wait4`` (the
    child's rusage, descendants included); peak RSS from GNU time's ``%M``. The child's own
    ``ru_maxrss`` cannot be used: Linux carries the high-water mark of the pre-exec image
    (here this process's, shared through vfork) into the exec'd program."""
    out_path, err_path, rss_path = workdir / "child.out", workdir / "child.err", workdir / "rss"
    wrapped = [TIME, "-f", "%M", "-o", str(rss_path), *argv]
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(wrapped, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    stdout = out_path.read_text(errors="replace")
    if proc.returncode != 0:
        stderr = err_path.read_text(errors="replace")
        raise RuntimeError(f"{argv[0]} failed (rc={proc.returncode}):\n{stdout}\n{stderr}")
    rss = int(rss_path.read_text().split()[-1])
    return Child(wall, usage.ru_utime + usage.ru_stime, rss, stdout)


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def settle() -> None:
    """Between runs: write back the previous run's dirty pages, outside any timing."""
    os.sync()
    time.sleep(0.3)


def truncate_all(directory: Path) -> None:
    if not directory.is_dir():
        return
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.is_file(follow_symlinks=False):
                os.truncate(entry.path, 0)


# -- the data --------------------------------------------------------------------------------


def write_random(path: Path, size: int) -> None:
    block = 16 * MiB
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(block, left)
            f.write(os.urandom(n))
            left -= n


def make_docroot(www: Path, sizes: Sizes) -> dict[str, list[str]]:
    """The files nginx serves; returns the names per case."""
    www.mkdir(parents=True, exist_ok=True)
    write_random(www / "big.bin", sizes.big)
    write_random(www / "mid.bin", sizes.mid)
    names: dict[str, list[str]] = {"big": ["big.bin"], "mid": ["mid.bin"]}
    for case, count, size in (
        ("files64", sizes.files64, 64 * KiB),
        ("files4", sizes.files4, 4 * KiB),
    ):
        folder = www / case
        folder.mkdir(exist_ok=True)
        blob = os.urandom(size + count)
        names[case] = []
        for i in range(count):
            name = f"f{i:05d}.bin"
            (folder / name).write_bytes(blob[i : i + size])
            names[case].append(f"{case}/{name}")
    # Read everything once so every tool finds it in the page cache.
    for path in www.rglob("*.bin"):
        with open(path, "rb") as f:
            while f.read(16 * MiB):
                pass
    return names


def check_output(src: Path, dst: Path) -> None:
    """Size equal and 8 sampled 64 KiB blocks equal (a full compare of 1 GiB costs seconds)."""
    size = src.stat().st_size
    if dst.stat().st_size != size:
        raise RuntimeError(f"{dst}: {dst.stat().st_size} bytes, expected {size}")
    with open(src, "rb") as a, open(dst, "rb") as b:
        for k in range(8):
            offset = (size - 64 * KiB) * k // 7 if size > 64 * KiB else 0
            if os.pread(a.fileno(), 64 * KiB, offset) != os.pread(b.fileno(), 64 * KiB, offset):
                raise RuntimeError(f"{dst} differs from {src} at {offset}")


def check_outputs(www: Path, rel: Sequence[str], out: Path) -> None:
    for name in rel:
        dst = out / Path(name).name
        if dst.stat().st_size != (www / name).stat().st_size:
            raise RuntimeError(f"{dst} has the wrong size")
    check_output(www / rel[0], out / Path(rel[0]).name)
    check_output(www / rel[-1], out / Path(rel[-1]).name)


# -- backhaul in this process ----------------------------------------------------------------


@dataclass
class AppendTimer:
    calls: int = 0
    events: int = 0
    seconds: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def wrap(self, store: EventStore) -> None:
        inner = store.append_many

        def timed(batches: Sequence[tuple[str, int, Sequence[ev.Event]]]) -> list[int]:
            start = time.perf_counter()
            try:
                return inner(batches)
            finally:
                elapsed = time.perf_counter() - start
                with self.lock:
                    self.calls += 1
                    self.events += sum(len(b[2]) for b in batches)
                    self.seconds += elapsed

        store.append_many = timed  # type: ignore[method-assign]


def create_jobs(
    home: Path, pairs: Sequence[tuple[str, Path]], jobs: int, priority: JobPriority
) -> list[str]:
    """``jobs`` jobs sharing ``pairs`` in order, resumed, in one group commit, caught up."""
    with TransferManager(home=home, limits=UNLIMITED) as manager:
        ids = []
        per_job = -(-len(pairs) // jobs)
        with manager.batch():
            for j in range(jobs):
                chunk = pairs[j * per_job : (j + 1) * per_job]
                if not chunk:
                    break
                job = manager.create_job(f"bench {j}")
                job.priority = priority
                job.add_files([FileSpec(url, str(dest)) for url, dest in chunk])
                job.resume()
                ids.append(job.id)
        manager.refresh_views()
    return ids


def complete_jobs(home: Path, ids: Sequence[str]) -> None:
    with TransferManager(home=home, limits=UNLIMITED) as manager:
        # Catch the read model up first: a batch right after refresh_views reads none of the
        # jobs it folded again (otherwise one stream read per job to complete).
        manager.refresh_views()
        with manager.batch():
            for job_id in ids:
                job = manager.get_job(job_id)
                if job.state is not JobState.TRANSFERRED:
                    raise RuntimeError(f"job {job_id} is {job.state.name}: {job.error}")
                job.complete()


def run_engine_inprocess(
    home: Path,
    ids: Sequence[str],
    timer: AppendTimer | None = None,
    profile: cProfile.Profile | None = None,
) -> float:
    with TransferManager(home=home, limits=UNLIMITED) as manager:
        if timer is not None:
            timer.wrap(manager.store)
        engine = Engine(manager)
        start = time.perf_counter()
        if profile is not None:
            profile.enable()
        try:
            asyncio.run(engine.run(until_idle=True))
        finally:
            if profile is not None:
                profile.disable()
        wall = time.perf_counter() - start
        for job_id in ids:
            state = manager.get_job(job_id).state
            if state is not JobState.TRANSFERRED:
                raise RuntimeError(f"in-process job {job_id} ended {state.name}")
    return wall


def log_counts(home: Path, job_id: str) -> dict[str, int]:
    store = open_store(str(home / DB_FILE))
    try:
        events = [a.event for a in store.stream(job_id)]
    finally:
        store.close()
    return {
        "events": len(events),
        "checkpoints": sum(isinstance(e, ev.BytesCheckpointed) for e in events),
    }


# -- the cases -------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, url: str, www: Path) -> None:
        self.args = args
        self.work = work
        self.url = url
        self.www = www
        self.runs: list[Run] = []
        self._homes = 0

    def out(self, tool: str, case: str, fresh: int | None = None) -> Path:
        """The tool's output directory for the case; with ``fresh``, a new one per round."""
        path = self.work / "out" / tool.replace(" ", "-") / case
        if fresh is not None:
            path = path / f"r{fresh}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def home(self) -> Path:
        self._homes += 1
        path = self.work / "homes" / f"h{self._homes}"
        path.mkdir(parents=True)
        return path

    def record(self, run: Run) -> None:
        self.runs.append(run)
        phases = " ".join(f"{k}={v:.2f}" for k, v in run.phases.items())
        log(
            f"{run.case:8} r{run.round} {run.tool:18} {run.wall:7.2f} s  cpu {run.cpu:6.2f} s  "
            f"rss {run.rss_kib / 1024:6.1f} MiB  {phases}"
        )

    def rounds(
        self, case: str, tools: dict[str, Callable[[int], Run]], rounds: int, warmup: int = 0
    ) -> None:
        names = list(tools)
        for w in range(warmup):  # not recorded: the first runs after the docroot is made
            for name in names:
                settle()
                run = tools[name](-1 - w)
                log(f"{run.case:8} warm-up {run.tool:18} {run.wall:7.2f} s (not counted)")
        for r in range(rounds):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                settle()
                run = tools[name](r)
                self.record(run)

    # -- a / d: one file ---------------------------------------------------------------------

    def single(
        self, case: str, name: str, *, inprocess: bool, others: bool, aria2c_default: bool = False
    ) -> None:
        url = f"{self.url}/{name}"
        src = self.www / name

        def curl(r: int) -> Run:
            out = self.out("curl", case)
            truncate_all(out)
            c = run_child(["curl", "-sS", "--fail", "-o", str(out / name), url], self.work)
            check_output(src, out / name)
            return Run(case, "curl", r, c.wall, c.cpu, c.rss_kib)

        def aria2c(tool: str, options: Sequence[str]) -> Callable[[int], Run]:
            def run(r: int) -> Run:
                out = self.out(tool, case)
                truncate_all(out)
                argv = ["aria2c", *options, "-x1", "-s1", "-d", str(out), "-o", name, url]
                c = run_child(argv, self.work)
                check_output(src, out / name)
                return Run(case, tool, r, c.wall, c.cpu, c.rss_kib)

            return run

        def backhaul(r: int) -> Run:
            out = self.out("backhaul", case)
            truncate_all(out)
            home = self.home()
            argv = [BACKHAUL, "--home", str(home), "get", "--json", "-q", url, str(out / name)]
            c = run_child(argv, self.work, env=child_env())
            check_output(src, out / name)
            job_id = json.loads(c.stdout.strip().splitlines()[-1])["id"]
            counts = log_counts(home, job_id)
            shutil.rmtree(home)
            return Run(case, "backhaul get", r, c.wall, c.cpu, c.rss_kib, extra=counts)

        def backhaul_inprocess(r: int) -> Run:
            out = self.out("backhaul-inproc", case)
            truncate_all(out)
            home = self.home()
            ids = create_jobs(home, [(url, out / name)], 1, JobPriority.FOREGROUND)
            timer = AppendTimer()
            cpu0 = self_cpu()
            wall = run_engine_inprocess(home, ids, timer)
            cpu = self_cpu() - cpu0
            start = time.perf_counter()
            complete_jobs(home, ids)
            done = time.perf_counter() - start
            check_output(src, out / name)
            counts = log_counts(home, ids[0])
            shutil.rmtree(home)
            extra = {
                **counts,
                "appends": timer.calls,
                "appended_events": timer.events,
                "append_seconds": timer.seconds,
                "append_share": timer.seconds / wall,
            }
            phases = {"engine": wall, "complete": done}
            return Run(case, "backhaul in-process", r, wall, cpu, 0, phases, extra)

        tools: dict[str, Callable[[int], Run]] = {}
        if others:
            tools |= {"curl": curl, ARIA2_TUNED: aria2c(ARIA2_TUNED, ARIA2_COMMON)}
            if aria2c_default:
                tools[ARIA2_DEFAULT] = aria2c(ARIA2_DEFAULT, ARIA2_DEFAULTS)
        tools["backhaul get"] = backhaul
        if inprocess:
            tools["backhaul in-process"] = backhaul_inprocess
        self.rounds(case, tools, self.args.rounds, self.args.warmup)

    # -- b / c: many files -------------------------------------------------------------------

    def many(self, case: str, names: Sequence[str]) -> None:
        urls = [f"{self.url}/{n}" for n in names]
        base = [Path(n).name for n in names]

        def aria2c(r: int) -> Run:
            out = self.out("aria2c", case, fresh=r)
            listing = self.work / f"{case}.aria2"
            listing.write_text(
                "".join(f"{u}\n  out={b}\n" for u, b in zip(urls, base, strict=True))
            )
            argv = ["aria2c", *ARIA2_COMMON, "-j16", "-d", str(out), "-i", str(listing)]
            c = run_child(argv, self.work)
            check_outputs(self.www, names, out)
            return Run(case, ARIA2_MANY, r, c.wall, c.cpu, c.rss_kib)

        def curl(r: int) -> Run:
            out = self.out("curl", case, fresh=r)
            config = self.work / f"{case}.curl"
            config.write_text(
                "".join(
                    f'url = "{u}"\noutput = "{out / b}"\n' for u, b in zip(urls, base, strict=True)
                )
            )
            argv = ["curl", "-sS", "--fail", "-Z", "--parallel-max", "16", "-K", str(config)]
            c = run_child(argv, self.work)
            check_outputs(self.www, names, out)
            return Run(case, "curl -Z 16", r, c.wall, c.cpu, c.rss_kib)

        def backhaul(jobs: int, tool: str, inprocess: bool = False) -> Callable[[int], Run]:
            """``jobs`` jobs created through the API, then run by a ``serve`` child, or with
            ``inprocess`` as an application embedding the engine runs them: by an ``Engine``
            in this process (``run(until_idle=True)``), no child to start; then completed."""

            def run(r: int) -> Run:
                out = self.out(tool, case, fresh=r)
                home = self.home()
                pairs = [(u, out / b) for u, b in zip(urls, base, strict=True)]
                cpu0, start = self_cpu(), time.perf_counter()
                priority = JobPriority.FOREGROUND if jobs > 1 else JobPriority.NORMAL
                ids = create_jobs(home, pairs, jobs, priority)
                phases = {"create": time.perf_counter() - start}
                extra: dict[str, float] = {"jobs": len(ids)}
                rss = 0
                if inprocess:
                    phases["engine"] = run_engine_inprocess(home, ids)
                else:
                    argv = [BACKHAUL, "--home", str(home), "--unlimited", "serve", "--until-idle"]
                    argv.append("--quiet")  # no line per job: quietened as aria2c's output is
                    c = run_child(argv, self.work, env=child_env())
                    phases["serve"], extra["serve_cpu"], rss = c.wall, c.cpu, c.rss_kib
                start = time.perf_counter()
                complete_jobs(home, ids)
                phases["complete"] = time.perf_counter() - start
                cpu = self_cpu() - cpu0 + extra.get("serve_cpu", 0.0)
                check_outputs(self.www, names, out)
                shutil.rmtree(home)
                return Run(case, tool, r, sum(phases.values()), cpu, rss, phases, extra)

            return run

        jobs = min(len(names), self.args.max_jobs)
        tools = {
            ARIA2_MANY: aria2c,
            "curl -Z 16": curl,
            ONE_JOB: backhaul(1, ONE_JOB),
            ONE_JOB_INPROCESS: backhaul(1, ONE_JOB_INPROCESS, inprocess=True),
        }
        if jobs > 1:
            tools[f"backhaul {jobs} jobs"] = backhaul(jobs, f"backhaul {jobs} jobs")
            name = f"backhaul {jobs} jobs{INPROCESS}"
            tools[name] = backhaul(jobs, name, inprocess=True)
        self.rounds(case, tools, self.args.rounds)


def child_env() -> dict[str, str]:
    return installed.child_env(drop=("BACKHAUL_STORE", "BACKHAUL_HOME"))


# -- the summary -----------------------------------------------------------------------------


def med(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(runs: Sequence[Run], sizes: Sizes) -> dict[str, Any]:
    by: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        by.setdefault((run.case, run.tool), []).append(run)
    tools: dict[str, dict[str, Any]] = {}
    for (case, tool), rs in by.items():
        entry: dict[str, Any] = {
            "case": case,
            "tool": tool,
            "runs": len(rs),
            "wall": med([r.wall for r in rs]),
            "wall_all": [round(r.wall, 3) for r in rs],
            "cpu": med([r.cpu for r in rs]),
            "rss_mib": med([r.rss_kib / 1024 for r in rs]),
        }
        for phase in rs[0].phases:
            entry[phase] = med([r.phases[phase] for r in rs])
        for key in rs[0].extra:
            if isinstance(rs[0].extra[key], int | float):
                entry[key] = med([r.extra[key] for r in rs])
        tools[f"{case}/{tool}"] = entry

    def paired(case: str, a: str, b: str, measure: Callable[[Run], float]) -> float | None:
        left = {r.round: r for r in by.get((case, a), [])}
        right = {r.round: r for r in by.get((case, b), [])}
        ratios = [measure(left[k]) / measure(right[k]) for k in left if k in right]
        return med(ratios) if ratios else None

    def wall(r: Run) -> float:
        return r.wall

    def serve(r: Run) -> float:  # the serve child, or the in-process engine run
        return r.phases.get("serve", r.phases.get("engine", r.wall))

    ratios: dict[str, float | None] = {
        "big: backhaul get / curl": paired("big", "backhaul get", "curl", wall),
        f"big: backhaul get / {ARIA2_TUNED}": paired("big", "backhaul get", ARIA2_TUNED, wall),
        f"big: backhaul get / {ARIA2_DEFAULT}": paired("big", "backhaul get", ARIA2_DEFAULT, wall),
        "big: backhaul in-process / curl": paired("big", "backhaul in-process", "curl", wall),
        f"big: {ARIA2_TUNED} / curl": paired("big", ARIA2_TUNED, "curl", wall),
        f"big: {ARIA2_DEFAULT} / curl": paired("big", ARIA2_DEFAULT, "curl", wall),
    }
    many_jobs: dict[str, str] = {}  # case -> the tool name of its N-jobs row
    for case in ("files64", "files4"):
        for tool in sorted({t for c, t in by if c == case and t.startswith("backhaul")}):
            if tool not in (ONE_JOB, ONE_JOB_INPROCESS) and not tool.endswith(INPROCESS):
                many_jobs[case] = tool
            for name, measure in (("total", wall), ("serve", serve)):
                ratios[f"{case}: {tool} ({name}) / aria2c"] = paired(
                    case, tool, ARIA2_MANY, measure
                )
    gib_big = sizes.big / GiB
    big_get = tools.get("big/backhaul get", {})
    inproc = tools.get("big/backhaul in-process", {})
    mid_get = tools.get("mid/backhaul get", {})
    cpu_per_gib = {
        tool: tools[f"big/{tool}"]["cpu"] / gib_big
        for tool in ("curl", ARIA2_TUNED, ARIA2_DEFAULT, "backhaul get", "backhaul in-process")
        if f"big/{tool}" in tools
    }
    rss_growth = big_get["rss_mib"] / mid_get["rss_mib"] if big_get and mid_get else None
    checks = {
        "big_vs_curl": ratios["big: backhaul get / curl"],
        "big_vs_aria2c": ratios[f"big: backhaul get / {ARIA2_TUNED}"],
        "big_vs_aria2c_default": ratios[f"big: backhaul get / {ARIA2_DEFAULT}"],
        "files64_vs_aria2c": ratios.get(f"files64: {ONE_JOB} (total) / aria2c"),
        "files64_jobs_vs_aria2c": ratios.get(
            f"files64: {many_jobs.get('files64')} (total) / aria2c"
        ),
        "files4_vs_aria2c": ratios.get(f"files4: {ONE_JOB} (total) / aria2c"),
        "files64_inprocess_vs_aria2c": ratios.get(f"files64: {ONE_JOB_INPROCESS} (total) / aria2c"),
        "files64_jobs_inprocess_vs_aria2c": ratios.get(
            f"files64: {many_jobs.get('files64')}{INPROCESS} (total) / aria2c"
        ),
        "files4_inprocess_vs_aria2c": ratios.get(f"files4: {ONE_JOB_INPROCESS} (total) / aria2c"),
        "append_share": inproc.get("append_share"),
        "rss_growth": rss_growth,
    }
    verdict = {key: (value is not None and value <= TARGETS[key]) for key, value in checks.items()}
    return {
        "tools": tools,
        "ratios": ratios,
        "cpu_s_per_gib": cpu_per_gib,
        "checkpoints_per_big_get": big_get.get("checkpoints"),
        "events_per_big_get": big_get.get("events"),
        "targets": TARGETS,
        "checks": checks,
        "met": verdict,
    }


def print_table(summary: dict[str, Any], sizes: Sizes) -> None:
    labels = {
        "big": f"(a) 1 file of {sizes.big // MiB} MiB",
        "mid": f"(d) 1 file of {sizes.mid // MiB} MiB",
        "files64": f"(b) {sizes.files64} files of 64 KiB (one job, and N jobs)",
        "files4": f"(c) {sizes.files4} files of 4 KiB (one job, and N jobs)",
    }
    current = None
    print()
    print(f"{'tool':24} {'wall s':>8} {'cpu s':>7} {'rss MiB':>8}  phases / notes")
    print(
        f"({ARIA2_TUNED}: --file-allocation=none, as every aria2c run here but one; "
        f"{ARIA2_DEFAULT}: aria2c's default --file-allocation=prealloc)"
    )
    for entry in summary["tools"].values():
        if entry["case"] != current:
            current = entry["case"]
            print(f"-- {labels.get(current, current)}")
        notes = []
        for phase in ("create", "serve", "engine", "complete"):
            if phase in entry:
                notes.append(f"{phase} {entry[phase]:.2f}")
        if "checkpoints" in entry:
            notes.append(f"{entry['events']:.0f} events, {entry['checkpoints']:.0f} checkpoints")
        if "append_share" in entry:
            notes.append(
                f"{entry['appends']:.0f} appends {entry['append_seconds'] * 1000:.1f} ms "
                f"= {entry['append_share'] * 100:.2f}% of the transfer"
            )
        rss = f"{entry['rss_mib']:8.1f}" if entry["rss_mib"] else f"{'-':>8}"
        print(
            f"{entry['tool']:24} {entry['wall']:8.2f} {entry['cpu']:7.2f} {rss}  {', '.join(notes)}"
        )
    print()
    print("ratios (medians of per-round pairs):")
    for key, value in summary["ratios"].items():
        if value is not None:
            print(f"  {key:56} {value:6.2f}x")
    print(
        "CPU seconds per GiB (case a): "
        + ", ".join(f"{k} {v:.2f}" for k, v in summary["cpu_s_per_gib"].items())
    )
    print("targets:")
    for key, value in summary["checks"].items():
        shown = "n/a" if value is None else f"{value:.4f}"
        met = "met" if summary["met"][key] else "NOT met"
        print(f"  {key:34} {shown:>8}  (target <= {TARGETS[key]})  {met}")


def machine_info() -> dict[str, Any]:
    def version(argv: list[str]) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, check=False).stdout.split(
                "\n"
            )[0]
        except OSError:
            return "?"

    packages = {}
    for name in ("aiohttp", "eventsourcing"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            packages[name] = metadata.version(name)
    git = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "git": git,
        "nproc": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "gc_threshold": list(gc.get_threshold()),
        "platform": platform.platform(),
        "sqlite": sqlite3.sqlite_version,
        "curl": version(["curl", "--version"]),
        "aria2c": version(["aria2c", "--version"]),
        "nginx": subprocess.run(
            ["nginx", "-v"], capture_output=True, text=True, check=False
        ).stderr.strip(),
        **packages,
    }


# -- profiling -------------------------------------------------------------------------------


def profile_case(case: str, bench: Bench, names: dict[str, list[str]], top: int) -> None:
    kind = {"big": "big", "files64": "files64", "files4": "files4", "jobs64": "files64"}
    kind["jobs4"] = "files4"
    rel = names[kind[case]]
    out = bench.out("profile", case)
    truncate_all(out)
    pairs = [(f"{bench.url}/{n}", out / Path(n).name) for n in rel]
    jobs = min(len(pairs), bench.args.max_jobs) if case.startswith("jobs") else 1
    home = bench.home()
    priority = JobPriority.FOREGROUND if jobs > 1 or case == "big" else JobPriority.NORMAL
    ids = create_jobs(home, pairs, jobs, priority)
    prof = cProfile.Profile()
    timer = AppendTimer()
    wall = run_engine_inprocess(home, ids, timer, prof)
    print(
        f"profile {case}: engine {wall:.2f} s for {len(pairs)} files in {len(ids)} jobs; "
        f"{timer.calls} appends of {timer.events} events took {timer.seconds:.3f} s"
    )
    for order in ("tottime", "cumulative"):
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).strip_dirs().sort_stats(order).print_stats(top)
        text = buf.getvalue()
        print(f"--- top {top} by {order} ---")
        print(text[text.find("   ncalls") :].rstrip())


# -- main ------------------------------------------------------------------------------------


@contextlib.contextmanager
def nginx(docroot: Path) -> Iterator[Any]:
    sys.path.insert(0, str(ROOT / "tests"))  # tests/peers, as the tests import it
    try:
        from peers.nginx import running_nginx
    finally:
        sys.path.remove(str(ROOT / "tests"))
    with running_nginx(docroot) as server:
        yield server


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="128 MiB, 200 and 1,000 files")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--warmup", type=int, default=1, help="uncounted rounds before the single-file cases"
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--dir", type=Path, help="parent of the temp dir ($TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    parser.add_argument(
        "--cases", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}"
    )
    parser.add_argument(
        "--max-jobs", type=int, default=10_000, help="cap on N for the N-jobs variants"
    )
    parser.add_argument(
        "--profile", choices=("big", "files64", "files4", "jobs64", "jobs4"), help="profile only"
    )
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    for tool in (TIME, "curl", "aria2c"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is needed (apt-get install time curl aria2)")
    sizes = Sizes.pick(args.quick)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}: pick from {', '.join(CASES)}")
    installed.compile_package()
    tune_gc()  # as the README advises an embedding application
    work = Path(tempfile.mkdtemp(prefix="bh-bench-dl.", dir=args.dir))
    log(f"work dir {work}")
    try:
        www = work / "www"
        t0 = time.perf_counter()
        names = make_docroot(www, sizes)
        log(f"docroot made in {time.perf_counter() - t0:.1f} s")
        with nginx(www) as server:
            bench = Bench(args, work, server.url, www)
            if args.profile:
                profile_case(args.profile, bench, names, args.top)
                return 0
            started = time.perf_counter()
            if "big" in cases:
                bench.single("big", "big.bin", inprocess=True, others=True, aria2c_default=True)
            if "mid" in cases:
                bench.single("mid", "mid.bin", inprocess=False, others=True)
            if "files64" in cases:
                bench.many("files64", names["files64"])
            if "files4" in cases:
                bench.many("files4", names["files4"])
            elapsed = time.perf_counter() - started
        summary = summarize(bench.runs, sizes)
        print_table(summary, sizes)
        if args.json:
            result = {
                "date": dt.date.today().isoformat(),
                "machine": machine_info(),
                "sizes": asdict(sizes),
                "rounds": args.rounds,
                "warmup": args.warmup,
                "seconds": elapsed,
                "runs": [asdict(r) for r in bench.runs],
                "summary": summary,
            }
            args.json.write_text(json.dumps(result, indent=2) + "\n")
            log(f"wrote {args.json}")
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
