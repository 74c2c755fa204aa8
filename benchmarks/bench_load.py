"""Load benchmark: many concurrent jobs, large files, and several workers, against nginx on
loopback. Reported, not asserted.

Run from the project root::

    .venv/bin/python benchmarks/bench_load.py                    # all three parts
    .venv/bin/python benchmarks/bench_load.py --parts small large --json /tmp/load.json
    .venv/bin/python benchmarks/bench_load.py --parts workers --workers 1 2 4

nginx (tests/peers/nginx.py) serves a docroot of random files made once per run in a temp
directory (``--dir`` picks its parent; deleted at the end). Jobs are created through the Python
API in this process (``manager.batch()``, ``Limits(None, None, None, None)``) before the engine
starts; the engine is ``backhaul serve --until-idle --no-yield`` in a child process (so its
figures are the engine's alone), started under GNU time for its peak RSS.

Parts:

* ``small``: ``--small-jobs`` (1,000) one-file jobs of ``--small-kib`` (64 KiB), all FOREGROUND
  (every one active at once), SQLite store, one engine.
* ``large``: ``--large-files`` (20) one-file FOREGROUND jobs of ``--large-mib`` (256 MiB) at once,
  SQLite store, one engine.
* ``workers``: ``--scale-jobs`` (240) NORMAL jobs of ``--scale-mib`` (4 MiB) on a PostgreSQL store
  (a throwaway cluster, tests/peers/postgres.py), run by 1, 2 and 4 ``serve`` workers
  (``--max-background 8`` each, ``--lease-seconds 30``), a fresh database for each count.

Figures: the transfer's wall time (from the first ``TransferStarted`` to the last
``JobTransferred`` in the log, so the engine's start-up is not in it) and the whole child's
wall time; throughput (MiB/s over the transfer time); event-log rows per transferred GiB
(every row the run appended, and of those the engine's: TransferStarted onwards); the
engine's peak RSS (and, for ``workers``, the sum over workers); every file's size is checked.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import installed

from backhaul.adapters.manager import TransferManager
from backhaul.adapters.store import open_store
from backhaul.core import event as ev
from backhaul.core.limit import UNLIMITED
from backhaul.core.vocabulary import JobPriority, JobState

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # tests/peers: nginx and PostgreSQL for benchmarks

from peers.nginx import running_nginx  # noqa: E402
from peers.postgres import create_database, running_postgres  # noqa: E402

BACKHAUL = str(Path(sys.executable).parent / "backhaul")
TIME = "/usr/bin/time"  # GNU time: the child's peak RSS
KiB, MiB, GiB = 1024, 1024 * 1024, 1024 * 1024 * 1024
SECRET_KEY = "YmVuY2gtbG9hZC1zZWNyZXQta2V5LTMyLWJ5dGVzISE="


def log(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


def write_random(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 8 * MiB)
            f.write(os.urandom(n))
            left -= n


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = installed.child_env(drop=("BACKHAUL_STORE", "BACKHAUL_HOME"))
    env["BACKHAUL_SECRET_KEY"] = SECRET_KEY
    env.update(extra or {})
    return env


def serve_argv(store: str | None, home: Path, max_background: int, lease: float) -> list[str]:
    argv = [BACKHAUL, *(("--store", store) if store else ()), "--home", str(home), "serve"]
    return [*argv, "--until-idle", "--no-yield", "--poll", "0.05",
            "--max-background", str(max_background), "--lease-seconds", str(lease)]  # fmt: skip


def spawn(argv: Sequence[str], work: Path, name: str) -> tuple[subprocess.Popen[bytes], Path]:
    rss = work / f"{name}.rss"
    with open(work / f"{name}.log", "wb") as out:
        proc = subprocess.Popen(
            [TIME, "-f", "%M", "-o", str(rss), *argv],
            env=child_env(),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return proc, rss


def finish(proc: subprocess.Popen[bytes], rss: Path, work: Path, name: str) -> int:
    code = proc.wait()
    if code != 0:
        raise RuntimeError(f"{name} failed ({code}):\n{(work / f'{name}.log').read_text()[-3000:]}")
    return int(rss.read_text().split()[-1]) * KiB


def create_jobs(
    manager: TransferManager, urls: Sequence[str], dest: Path, priority: JobPriority
) -> list[str]:
    ids = []
    for start in range(0, len(urls), 500):
        with manager.batch():
            for i in range(start, min(start + 500, len(urls))):
                job = manager.create_job(f"load-{i}")
                job.priority = priority
                job.add_file(urls[i], dest / f"{i}.bin")
                job.resume()
                ids.append(job.id)
    manager.refresh_views()
    return ids


def log_figures(store: Any, ids: Sequence[str], head0: int, nbytes: int) -> dict[str, Any]:
    """Transfer time from the log, rows appended, and every job TRANSFERRED."""
    first = last = None
    engine_rows = 0
    states = {}
    for job_id in ids:
        started = False
        job_state = None
        for a in store.stream(job_id):
            e = a.event
            if isinstance(e, ev.TransferStarted):
                started = True
                t = e.at.timestamp()
                first = t if first is None else min(first, t)
            if isinstance(e, ev.JobTransferred):
                t = e.at.timestamp()
                last = t if last is None else max(last, t)
                job_state = JobState.TRANSFERRED
            engine_rows += started
        states[job_id] = job_state
    not_done = sum(1 for s in states.values() if s is not JobState.TRANSFERRED)
    if not_done:
        raise RuntimeError(f"{not_done} jobs did not reach TRANSFERRED")
    rows = store.head() - head0
    assert first is not None
    assert last is not None
    seconds = last - first
    gib = nbytes / GiB
    return {
        "transfer_s": seconds,
        "mib_per_s": nbytes / MiB / seconds if seconds > 0 else float("nan"),
        "rows": rows,
        "engine_rows": engine_rows,
        "rows_per_gib": rows / gib,
        "engine_rows_per_gib": engine_rows / gib,
    }


def check_sizes(dest: Path, ids: Sequence[str], size: int) -> None:
    temps = list(dest.glob(".*.bhtmp"))
    if len(temps) != len(ids):
        raise RuntimeError(f"{len(temps)} temp files for {len(ids)} jobs")
    wrong = [p for p in temps if p.stat().st_size != size]
    if wrong:
        raise RuntimeError(f"{len(wrong)} files of the wrong size, e.g. {wrong[0]}")


# -- the parts -----------------------------------------------------------------------------------


def run_sqlite_part(
    name: str, work: Path, base_url: str, files: Sequence[str], size: int
) -> dict[str, Any]:
    part = work / name
    home, dest = part / "home", part / "dest"
    dest.mkdir(parents=True)
    manager = TransferManager(home=home, limits=UNLIMITED)
    urls = [f"{base_url}/{f}" for f in files]
    t0 = time.perf_counter()
    ids = create_jobs(manager, urls, dest, JobPriority.FOREGROUND)
    created = time.perf_counter() - t0
    head0 = manager.store.head()
    manager.close()
    log(f"{name}: {len(ids)} jobs created in {created:.1f} s; serving")
    start = time.perf_counter()
    proc, rss = spawn(serve_argv(None, home, 1, 30.0), part, "serve")
    peak = finish(proc, rss, part, "serve")
    wall = time.perf_counter() - start
    check_sizes(dest, ids, size)
    store = open_store(home=home)
    try:
        figures = log_figures(store, ids, head0, len(ids) * size)
    finally:
        store.close()
    shutil.rmtree(dest, ignore_errors=True)
    return {
        "part": name,
        "jobs": len(ids),
        "file_bytes": size,
        "bytes": len(ids) * size,
        "create_s": created,
        "serve_wall_s": wall,
        "peak_rss_mib": peak / MiB,
        **figures,
    }


def run_workers_part(
    work: Path, base_url: str, files: Sequence[str], size: int, counts: Sequence[int]
) -> list[dict[str, Any]]:
    results = []
    with running_postgres() as pg:
        for n in counts:
            part = work / f"workers{n}"
            home, dest = part / "home", part / "dest"
            dest.mkdir(parents=True)
            url = create_database(pg, f"load_w{n}")
            os.environ["BACKHAUL_SECRET_KEY"] = SECRET_KEY
            manager = TransferManager(open_store(url), home=home, limits=UNLIMITED)
            ids = create_jobs(manager, [f"{base_url}/{f}" for f in files], dest, JobPriority.NORMAL)
            head0 = manager.store.head()
            log(f"workers={n}: {len(ids)} jobs; serving")
            start = time.perf_counter()
            peaks, restarts = run_workers(url, home, part, n)
            wall = time.perf_counter() - start
            check_sizes(dest, ids, size)
            figures = log_figures(manager.store, ids, head0, len(ids) * size)
            leases: dict[str, int] = {}
            for job_id in ids:
                for a in manager.store.stream(job_id):
                    if isinstance(a.event, ev.LeaseTaken):
                        leases[a.event.worker] = leases.get(a.event.worker, 0) + 1
                        break
            manager.close()
            shutil.rmtree(dest, ignore_errors=True)
            results.append(
                {
                    "part": f"workers={n}",
                    "workers": n,
                    "jobs": len(ids),
                    "file_bytes": size,
                    "bytes": len(ids) * size,
                    "serve_wall_s": wall,
                    "peak_rss_mib": max(peaks) / MiB,
                    "sum_rss_mib": sum(peaks) / MiB,
                    "jobs_per_worker": sorted(leases.values(), reverse=True),
                    "startup_race_restarts": restarts,
                    **figures,
                }
            )
    return results


SCHEMA_RACE = "tuple concurrently updated"


def run_workers(url: str, home: Path, part: Path, n: int) -> tuple[list[int], int]:
    """Run ``n`` serve workers to the end; their peak RSS each. Workers opening the store at
    the same moment can die of PostgreSQL's "tuple concurrently updated" on the schema
    statements (a bug: see tests/reliability/test_reliability_startup.py): starts are spread
    by 0.15 s, and a worker that dies of it is started again at once (as a service manager
    would); the number of such restarts is reported."""
    procs: dict[int, tuple[subprocess.Popen[bytes], Path]] = {}
    for i in range(n):
        procs[i] = spawn(serve_argv(url, home, 8, 30.0), part, f"serve{i}")
        time.sleep(0.15)
    peaks: dict[int, int] = {}
    restarts = 0
    while len(peaks) < n:
        for i, (proc, rss) in list(procs.items()):
            if i in peaks or proc.poll() is None:
                continue
            text = (part / f"serve{i}.log").read_text(errors="replace")
            if proc.returncode != 0 and SCHEMA_RACE in text and restarts < 3 * n:
                restarts += 1
                procs[i] = spawn(serve_argv(url, home, 8, 30.0), part, f"serve{i}")
                continue
            peaks[i] = finish(proc, rss, part, f"serve{i}")
        time.sleep(0.02)
    return [peaks[i] for i in range(n)], restarts


def table(results: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| part | jobs x size | transfer | throughput | serve wall | rows / GiB (engine's) "
        "| peak RSS |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        size = r["file_bytes"]
        size_s = f"{size // MiB} MiB" if size >= MiB else f"{size // KiB} KiB"
        rss = f"{r['peak_rss_mib']:.0f} MiB"
        if "sum_rss_mib" in r:
            rss += f" (sum {r['sum_rss_mib']:.0f})"
        lines.append(
            f"| {r['part']} | {r['jobs']:,} x {size_s} | {r['transfer_s']:.2f} s | "
            f"{r['mib_per_s']:.0f} MiB/s | {r['serve_wall_s']:.2f} s | "
            f"{r['rows_per_gib']:,.0f} ({r['engine_rows_per_gib']:,.0f}) | {rss} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", nargs="+", default=["small", "large", "workers"])
    parser.add_argument("--small-jobs", type=int, default=1000)
    parser.add_argument("--small-kib", type=int, default=64)
    parser.add_argument("--large-files", type=int, default=20)
    parser.add_argument("--large-mib", type=int, default=256)
    parser.add_argument("--scale-jobs", type=int, default=240)
    parser.add_argument("--scale-mib", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--dir", type=Path, help="parent of the temp dir ($TMPDIR)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    installed.compile_package()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bh-load.", dir=args.dir) as tmp:
        work = Path(tmp)
        www = work / "www"
        www.mkdir()
        small = [f"s{i}.bin" for i in range(args.small_jobs)]
        large = [f"l{i}.bin" for i in range(args.large_files)]
        scale = [f"m{i}.bin" for i in range(args.scale_jobs)]
        log("writing the docroot")
        if "small" in args.parts:
            for name in small:
                write_random(www / name, args.small_kib * KiB)
        if "large" in args.parts:
            for name in large:
                write_random(www / name, args.large_mib * MiB)
        if "workers" in args.parts:
            for name in scale:
                write_random(www / name, args.scale_mib * MiB)
        subprocess.run(["sync"], check=False)
        with running_nginx(www) as nginx:
            if "small" in args.parts:
                results.append(
                    run_sqlite_part("small", work, nginx.url, small, args.small_kib * KiB)
                )
            if "large" in args.parts:
                results.append(
                    run_sqlite_part("large", work, nginx.url, large, args.large_mib * MiB)
                )
            if "workers" in args.parts:
                results += run_workers_part(
                    work, nginx.url, scale, args.scale_mib * MiB, args.workers
                )
    info = {
        "date": dt.date.today().isoformat(),
        "nproc": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
    }
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
