"""Benchmark the event-sourced job store: creating jobs, listing them, rebuilding views.

Run from the project root::

    .venv/bin/python benchmarks/bench_store.py [--jobs N] [--files F] [--json OUT]

Everything happens in a fresh temporary directory (``--dir`` picks its parent) on the
SQLite store. Nothing is transferred: remote names point at http://127.0.0.1:1/ and
local names at an existing, empty directory. BITS's per-owner and per-machine job
limits are lifted (``Limits(None, None, None, None)``). See benchmarks/README.md.

Steps:
1. create jobs of F files: (a) one call at a time (each call its own durable append)
   for the first ``--single`` jobs, in a store of their own; (b) in ``manager.batch()``
   group commits of ``--batch`` jobs, for all N jobs, in the store the later steps use;
2. catch the read model up (``manager.refresh_views()``), then list the N jobs:
   (i) rows straight from the read model (``store.views.select``), (ii) handles only
   (``list(manager.jobs())``), (iii) handles and ``.progress`` of each; median of 5,
   each run on a fresh ``TransferManager`` (a cold handle cache, like a new CLI process);
3. rebuild the read model from zero (``projection.rebuild``), median of 3;
4. the database size and events per job.

``--profile`` also runs every step under cProfile on a ``--profile-jobs`` run and prints
the top cumulative entries of each.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime as dt
import io
import json
import os
import platform
import pstats
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from backhaul.adapters import projection
from backhaul.adapters.manager import TransferManager
from backhaul.adapters.store import DB_FILE, EventStore, open_store
from backhaul.adapters.view import COLUMNS
from backhaul.core.limit import Limits

OWNER = "bench"
UNLIMITED = Limits(None, None, None, None)
LIST_TARGET_S = 0.100  # (i) for 10,000 jobs
LIST_RUNS = 5
VIEW_TABLE = "backhaul_job_views"  # adapters/view.py
REBUILD_RUNS = 3


# -- helpers ---------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 0
    try:
        eventsourcing = metadata.version("eventsourcing")
    except metadata.PackageNotFoundError:
        eventsourcing = "?"
    return {
        "nproc": usable,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "sqlite": sqlite3.sqlite_version,
        "eventsourcing": eventsourcing,
        "platform": platform.platform(),
        "machine": platform.machine(),
    }


def open_manager(store: EventStore) -> TransferManager:
    return TransferManager(store, owner=OWNER, limits=UNLIMITED)


def file_specs(downloads: Path, job: int, files: int) -> list[tuple[str, str]]:
    return [
        (f"http://127.0.0.1:1/bench/{job}/{k}.bin", str(downloads / f"j{job}-f{k}.bin"))
        for k in range(files)
    ]


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def median_of(runs: int, fn: Callable[[], Any]) -> tuple[float, list[float], Any]:
    times, result = [], None
    for _ in range(runs):
        elapsed, result = timed(fn)
        times.append(elapsed)
    return statistics.median(times), times, result


def log(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


def db_size(path: Path) -> dict[str, int]:
    sizes = {}
    for suffix in ("", "-wal", "-shm"):
        p = path.with_name(path.name + suffix)
        sizes["db" + suffix.replace("-", "_")] = p.stat().st_size if p.exists() else 0
    return sizes


def table_sizes(path: Path) -> dict[str, int]:
    """Bytes per table and index (SQLite's dbstat), or {} when dbstat is missing."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as c:
            found = c.execute(
                "SELECT name, SUM(pgsize) FROM dbstat GROUP BY name ORDER BY 2 DESC"
            ).fetchall()
    except sqlite3.Error:
        return {}
    return {str(name): int(size) for name, size in found}


@contextlib.contextmanager
def profiled(enabled: bool, title: str, top: int, sink: list[str]) -> Iterator[None]:
    if not enabled:
        yield
        return
    prof = cProfile.Profile()
    prof.enable()
    try:
        yield
    finally:
        prof.disable()
        out = io.StringIO()
        stats = pstats.Stats(prof, stream=out).strip_dirs().sort_stats("cumulative")
        stats.print_stats(top)
        sink.append(f"--- {title}: top {top} by cumulative time ---\n{_trim(out.getvalue())}")


def _trim(text: str) -> str:
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.lstrip().startswith("ncalls"):
            head = [ln for ln in lines[:i] if "function calls" in ln]
            return "\n".join(head + lines[i:]).rstrip()
    return text.rstrip()


# -- the steps -------------------------------------------------------------------------


def create_single(store: EventStore, downloads: Path, jobs: int, files: int) -> dict[str, Any]:
    """1(a): each create_job and each add_files is its own durable append."""
    manager = open_manager(store)
    head0 = store.head()

    def run() -> None:
        for i in range(jobs):
            manager.create_job(f"single {i}").add_files(file_specs(downloads, i, files))

    elapsed, _ = timed(run)
    events = store.head() - head0
    return {
        "jobs": jobs,
        "events": events,
        "seconds": elapsed,
        "jobs_per_s": jobs / elapsed,
        "events_per_s": events / elapsed,
        "us_per_job": elapsed / jobs * 1e6,
    }


def create_batched(
    store: EventStore, downloads: Path, jobs: int, files: int, per_batch: int
) -> dict[str, Any]:
    """1(b): ``per_batch`` jobs (create + add_files) per ``manager.batch()`` commit."""
    manager = open_manager(store)
    head0 = store.head()

    def run() -> None:
        for start in range(0, jobs, per_batch):
            with manager.batch():
                for i in range(start, min(start + per_batch, jobs)):
                    manager.create_job(f"batched {i}").add_files(file_specs(downloads, i, files))

    elapsed, _ = timed(run)
    events = store.head() - head0
    return {
        "jobs": jobs,
        "jobs_per_batch": per_batch,
        "commits": -(-jobs // per_batch),
        "events": events,
        "seconds": elapsed,
        "jobs_per_s": jobs / elapsed,
        "events_per_s": events / elapsed,
        "us_per_job": elapsed / jobs * 1e6,
    }


def catch_up_views(store: EventStore) -> dict[str, Any]:
    """2, first: the projection folds the whole log into the read model."""
    manager = open_manager(store)
    elapsed, position = timed(manager.refresh_views)
    return {"seconds": elapsed, "position": position, "events_per_s": position / elapsed}


def list_jobs(store: EventStore, db: Path, jobs: int) -> dict[str, Any]:
    """2: list the N jobs three ways, median of LIST_RUNS each, plus two diagnostics:
    the same SELECT through a plain sqlite3 connection, with and without ``doc``
    (where the time of (i) goes: SQL with the JSON snapshot, SQL without it, the rest
    is building ``ViewRow`` objects)."""
    raw = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    tail = f"FROM {VIEW_TABLE} WHERE live = ? AND owner = ? ORDER BY created_at, job_id"
    every, slim = ", ".join(COLUMNS), ", ".join(c for c in COLUMNS if c != "doc")

    def sql_all() -> int:
        return len(raw.execute(f"SELECT {every} {tail}", (True, OWNER)).fetchall())

    def sql_no_doc() -> int:
        return len(raw.execute(f"SELECT {slim} {tail}", (True, OWNER)).fetchall())

    def rows() -> int:
        listed = store.views.select(OWNER, include_final=False)
        # read the progress columns, as a listing would
        progress = [(r.bytes_transferred, r.bytes_total, r.files_total) for r in listed]
        return len(progress)

    def handles() -> int:
        return len(list(open_manager(store).jobs()))

    def handles_progress() -> int:
        return len([j.progress for j in open_manager(store).jobs()])

    result: dict[str, Any] = {}
    for name, fn in (
        ("read_model_rows", rows),
        ("handles", handles),
        ("handles_progress", handles_progress),
        ("sql_all_columns", sql_all),
        ("sql_without_doc", sql_no_doc),
    ):
        med, times, count = median_of(LIST_RUNS, fn)
        if count != jobs:
            raise SystemExit(f"{name}: listed {count} jobs, expected {jobs}")
        result[name] = {"median_s": med, "runs_s": times, "us_per_job": med / jobs * 1e6}
        log(f"list {name}: {med * 1e3:.1f} ms")
    raw.close()
    return result


def rebuild_views(store: EventStore) -> dict[str, Any]:
    """3: drop every row and fold the whole log again, median of REBUILD_RUNS."""
    before = store.views.select(None, include_final=True)
    med, times, position = median_of(REBUILD_RUNS, lambda: projection.rebuild(store))
    after = store.views.select(None, include_final=True)
    if after != before:
        raise SystemExit("the rebuilt read model differs from the caught-up one")
    return {"median_s": med, "runs_s": times, "position": position, "events_per_s": position / med}


# -- the run ---------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    jobs, files = args.jobs, args.files
    single_jobs = min(args.single, jobs)
    parent = args.dir
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="backhaul-bench-", dir=parent) as tmp:
        root = Path(tmp)
        downloads = root / "downloads"  # exists, stays empty
        downloads.mkdir()
        result: dict[str, Any] = {
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": machine_info(),
            "params": {
                "jobs": jobs,
                "files_per_job": files,
                "single_jobs": single_jobs,
                "jobs_per_batch": args.batch,
                "tmp": str(root),
            },
        }
        profiles: list[str] = []
        prof = args.profile

        # 1(a): a store of its own, so that the later steps see exactly N jobs.
        single_home = root / "single"
        single_store = open_store(f"sqlite://{single_home / DB_FILE}", single_home)
        try:
            log(f"creating {single_jobs} jobs one call at a time")
            with profiled(prof, "1(a) create, one call at a time", args.top, profiles):
                result["create_single"] = create_single(single_store, downloads, single_jobs, files)
        finally:
            single_store.close()

        # 1(b) and the rest: the main store.
        home = root / "main"
        db = home / DB_FILE
        store = open_store(f"sqlite://{db}", home)
        try:
            log(f"creating {jobs} jobs in batches of {args.batch}")
            with profiled(prof, "1(b) create, batched", args.top, profiles):
                result["create_batched"] = create_batched(store, downloads, jobs, files, args.batch)
            log("catching the read model up")
            with profiled(prof, "2 refresh_views (catch-up from zero)", args.top, profiles):
                result["refresh_views"] = catch_up_views(store)
            with profiled(prof, "2 listing (all three ways, all runs)", args.top, profiles):
                result["list"] = list_jobs(store, db, jobs)
            if prof:  # the handle path alone, once
                with profiled(True, "2(iii) handles + progress, one run", args.top, profiles):
                    [j.progress for j in open_manager(store).jobs()]
            log("rebuilding the read model")
            with profiled(prof, "3 rebuild (all runs)", args.top, profiles):
                result["rebuild"] = rebuild_views(store)
            head = store.head()
            result["size_open"] = db_size(db)
        finally:
            store.close()
        closed = db_size(db)  # closing the last connection checkpoints the WAL
        total = sum(closed.values())
        result["size"] = {
            **closed,
            "total_bytes": total,
            "events": head,
            "events_per_job": head / jobs,
            "bytes_per_job": total / jobs,
            "bytes_per_event": total / head if head else None,
            "tables": table_sizes(db),
        }
        if profiles:
            result["profiles"] = profiles
        return result


def report(result: dict[str, Any]) -> str:
    m, p = result["machine"], result["params"]
    single, batched = result["create_single"], result["create_batched"]
    refresh, listing, rebuild, size = (
        result["refresh_views"],
        result["list"],
        result["rebuild"],
        result["size"],
    )
    jobs = p["jobs"]
    rows_ms = listing["read_model_rows"]["median_s"] * 1e3
    target_ms = LIST_TARGET_S * 1e3 * jobs / 10_000
    verdict = "meets" if rows_ms < target_ms else "MISSES"
    lines = [
        f"backhaul store benchmark  {result['date']}",
        f"machine: nproc={m['nproc']}  python {m['python']}  sqlite {m['sqlite']}  "
        f"eventsourcing {m['eventsourcing']}  {m['platform']}",
        f"workload: {jobs:,} jobs x {p['files_per_job']} files  (SQLite, WAL, temp dir {p['tmp']})",
        "",
        f"{'step':<52} {'result':>14} {'rate':>22}",
        "-" * 90,
        _line(
            f"1a create, one call at a time ({single['jobs']:,} jobs)",
            f"{single['seconds']:.2f} s",
            f"{single['jobs_per_s']:,.0f} jobs/s {single['events_per_s']:,.0f} ev/s",
        ),
        _line(
            f"1b create, batch() of {batched['jobs_per_batch']} ({batched['jobs']:,} jobs)",
            f"{batched['seconds']:.2f} s",
            f"{batched['jobs_per_s']:,.0f} jobs/s {batched['events_per_s']:,.0f} ev/s",
        ),
        _line(
            "2  refresh_views: catch-up from zero",
            f"{refresh['seconds']:.2f} s",
            f"{refresh['events_per_s']:,.0f} ev/s",
        ),
        _line(
            "2i list rows from the read model (median of 5)",
            f"{rows_ms:.1f} ms",
            f"{listing['read_model_rows']['us_per_job']:.1f} us/job",
        ),
        _line(
            "2ii list(manager.jobs()) (median of 5)",
            f"{listing['handles']['median_s'] * 1e3:.1f} ms",
            f"{listing['handles']['us_per_job']:.1f} us/job",
        ),
        _line(
            "2iii [j.progress for j in jobs()] (median of 5)",
            f"{listing['handles_progress']['median_s'] * 1e3:.1f} ms",
            f"{listing['handles_progress']['us_per_job']:.1f} us/job",
        ),
        _line(
            "   diag: same SELECT, raw sqlite3, all columns",
            f"{listing['sql_all_columns']['median_s'] * 1e3:.1f} ms",
            f"{listing['sql_all_columns']['us_per_job']:.1f} us/job",
        ),
        _line(
            "   diag: same SELECT, raw sqlite3, without doc",
            f"{listing['sql_without_doc']['median_s'] * 1e3:.1f} ms",
            f"{listing['sql_without_doc']['us_per_job']:.1f} us/job",
        ),
        _line(
            "3  projection.rebuild from zero (median of 3)",
            f"{rebuild['median_s']:.2f} s",
            f"{rebuild['events_per_s']:,.0f} ev/s",
        ),
        _line(
            "4  database size (closed, WAL checkpointed)",
            f"{size['total_bytes'] / 2**20:.1f} MiB",
            f"{size['bytes_per_job']:,.0f} B/job",
        ),
        _line(
            "4  events per job",
            f"{size['events_per_job']:.2f}",
            f"{size['bytes_per_event']:,.0f} B/event",
        ),
        *(
            _line(f"     {name}", f"{size_b / 2**20:.1f} MiB", f"{size_b / jobs:,.0f} B/job")
            for name, size_b in list(size["tables"].items())[:5]
        ),
        "-" * 90,
        f"target (i) < {target_ms:.0f} ms for {jobs:,} jobs: {verdict} ({rows_ms:.1f} ms)",
    ]
    return "\n".join(lines)


def _line(step: str, value: str, rate: str) -> str:
    return f"{step:<52} {value:>14} {rate:>22}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=10_000, help="jobs to create (default 10,000)")
    ap.add_argument("--files", type=int, default=10, help="files per job (default 10)")
    ap.add_argument(
        "--single", type=int, default=1_000, help="jobs created one call at a time (1,000)"
    )
    ap.add_argument("--batch", type=int, default=100, help="jobs per batch() commit (100)")
    ap.add_argument("--json", type=Path, help="write the results to this JSON file")
    ap.add_argument("--dir", type=Path, help="parent of the temp dir (default: $TMPDIR)")
    ap.add_argument("--profile", action="store_true", help="cProfile every step")
    ap.add_argument("--top", type=int, default=5, help="profile entries per step (5)")
    args = ap.parse_args(argv)
    if args.jobs < 1 or args.files < 0 or args.single < 1 or args.batch < 1:
        ap.error("--jobs, --single and --batch must be >= 1, --files >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(report(result))
    for block in result.get("profiles", []):
        print()
        print(block)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nresults written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
