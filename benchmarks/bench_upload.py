"""Benchmark a BITS upload over loopback: backhaul's engine and its upload server against
``curl -T`` (HTTP PUT) to nginx with WebDAV, in the same run.

Run from the project root::

    .venv/bin/python benchmarks/bench_upload.py [--size 1GiB] [--rounds 3] [--json OUT]

What runs (each round runs every tool once, in an order rotated by one each round; ``sync``
between runs, untimed; every run uploads to a new name, deleted after the run, untimed):

* ``curl PUT -> nginx``: ``curl -sS -f -T FILE http://127.0.0.1:PORT/dav/xN`` to nginx
  (``dav_methods PUT; client_max_body_size 0;``, its own config on a free port, started the
  way tests/peers/nginx.py starts it; the body's temp files on the same file system, so the
  PUT ends with a rename, as ours does).
* ``backhaul serve``: an upload job (created through the API beforehand, FOREGROUND) run by a
  ``backhaul --home H serve --until-idle --no-yield`` child: the command's start-up included.
* ``backhaul serve (mallopt)``: the same, the command started with glibc's
  ``mallopt(M_MMAP_THRESHOLD, 32 MiB)`` and ``mallopt(M_TRIM_THRESHOLD, 128 MiB)`` first. A new
  process starts with glibc's 128 KiB mmap threshold and trims the heap top eagerly, so the
  1 MiB buffers of every fragment (the read, aiohttp's join of head and body) are mapped and
  unmapped, and every page is faulted in again: about 1 s of CPU per GiB on this VM.
* ``backhaul engine``: the same job on an ``Engine`` in this process (``run(until_idle=True)``).
* ``BitsUploader``: the transport alone in this process (``begin`` / ``send`` 1 MiB at a time /
  ``finish``), to separate the engine's cost from the protocol's. ``--fragment SIZE`` sets
  the fragment size of these two (the engine's ``upload_fragment`` and BitsUploader's
  ``fragment_size``; both default to 1 MiB).
* ``... (server fsync)``: ``backhaul engine`` against a second server that fsyncs every
  fragment before acknowledging it (the server's default; nginx does not fsync).

After each run, untimed, the uploaded file is checked (size) and deleted, with the job's home:
on this machine (a VM) a run that needs pages the page cache must give back first was up to
3x slower, for every tool alike, so the rounds after the first measured memory reclaim.

The backhaul server is ``python -m backhaul.adapters.cli_upload upload-server --no-fsync`` (a
child process; ``--allow-overwrite``), so client and server each have a process, as curl and
nginx do. Wall time: ``perf_counter`` around the run. CPU: the client's from ``os.wait4`` (a
child) or ``getrusage`` deltas (in-process), the server's from ``/proc/PID/stat`` deltas (the
nginx worker; the upload server). The table gives medians over the rounds; the ratio is the
median of the per-round ratios to curl's wall time. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import installed

from backhaul.adapters.engine import Engine
from backhaul.adapters.manager import TransferManager
from backhaul.core.vocabulary import JobPriority, JobState, JobType
from backhaul.transports.bits_upload import BitsUploader

MiB = 1024 * 1024
GiB = 1024 * MiB
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TICK = os.sysconf("SC_CLK_TCK")
CURL = "curl PUT -> nginx"
# M_MMAP_THRESHOLD (-3) 32 MiB, M_TRIM_THRESHOLD (-1) 128 MiB
MALLOPT = "import ctypes; libc = ctypes.CDLL(None); libc.mallopt(-3, 32 << 20); libc.mallopt(-1, 128 << 20)"


def log(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+)\s*([kmg]?)i?b?", text.strip(), re.IGNORECASE)
    if match is None:
        raise argparse.ArgumentTypeError(f"bad size {text!r}")
    return int(match[1]) * 1024 ** " kmg".index(match[2].lower() or " ")


def proc_cpu(pid: int) -> float:
    """utime + stime of one process, seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def settle() -> None:
    os.sync()
    time.sleep(0.5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_random(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(16 * MiB, left)
            f.write(os.urandom(n))
            left -= n


@dataclass
class Run:
    tool: str
    round: int
    wall: float
    client_cpu: float
    server_cpu: float


# -- servers ---------------------------------------------------------------------------------


@dataclass
class Server:
    url: str
    pid: int  # the process whose CPU is the server's (nginx: the worker)
    root: Path  # where the uploads land


@contextlib.contextmanager
def nginx_dav(work: Path) -> Iterator[Server]:
    """nginx with WebDAV PUT under /dav/ on a free port (tests/peers/nginx.py's way)."""
    d = work / "nginx"
    (d / "www" / "dav").mkdir(parents=True)
    (d / "tmp").mkdir()
    port = free_port()
    user = "user root root;\n" if os.geteuid() == 0 else ""
    temp = "\n".join(
        f"  {kind}_temp_path {d / 'tmp' / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (d / "nginx.conf").write_text(
        f"""{user}worker_processes 1;
daemon off;
pid {d / "nginx.pid"};
error_log {d / "error.log"} warn;
events {{ worker_connections 256; }}
http {{
  access_log off;
{temp}
  server {{
    listen 127.0.0.1:{port};
    root {d / "www"};
    location /dav/ {{
      dav_methods PUT;
      client_max_body_size 0;
      create_full_put_path on;
      dav_access user:rw;
    }}
  }}
}}
"""
    )
    proc = subprocess.Popen(
        ["nginx", "-p", str(d), "-c", str(d / "nginx.conf"), "-e", str(d / "error.log")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        worker = None
        for _ in range(200):
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
            pids = children.read_text().split() if children.exists() else []
            if pids:
                worker = int(pids[0])
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                    break
            time.sleep(0.05)
        if worker is None:
            raise RuntimeError(f"nginx did not start: {(d / 'error.log').read_text()}")
        yield Server(f"http://127.0.0.1:{port}", worker, d / "www" / "dav")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


@contextlib.contextmanager
def upload_server(work: Path, name: str, *, fsync: bool) -> Iterator[Server]:
    root = work / name
    root.mkdir()
    argv = [sys.executable, "-m", "backhaul.adapters.cli_upload", "upload-server"]
    argv += ["--root", str(root), "--port", "0", "--allow-overwrite"]
    if not fsync:
        argv.append("--no-fsync")
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        if not url.startswith("http://"):
            raise RuntimeError("the upload server did not start")
        yield Server(url, proc.pid, root)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


# -- the tools -------------------------------------------------------------------------------


def run_child(argv: Sequence[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """(wall, CPU of the child and its descendants)."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        assert proc.stderr is not None
        raise RuntimeError(f"{argv[0]} failed: {proc.stderr.read().decode(errors='replace')}")
    return wall, usage.ru_utime + usage.ru_stime


def new_job(home: Path, url: str, source: Path) -> str:
    with TransferManager(home=home) as manager:
        job = manager.create_job("bench", JobType.UPLOAD)
        job.priority = JobPriority.FOREGROUND
        job.add_file(url, source)
        job.resume()
        return job.id


def check_job(home: Path, job_id: str) -> None:
    with TransferManager(home=home) as manager:
        job = manager.get_job(job_id)
        if job.state is not JobState.TRANSFERRED:
            raise RuntimeError(f"the job ended in {job.state.name}: {job.error}")
        job.complete()


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, source: Path) -> None:
        self.args = args
        self.work = work
        self.source = source
        self.homes = 0

    def home(self) -> Path:
        self.homes += 1
        return self.work / f"home{self.homes}"

    def curl(self, server: Server, name: str) -> tuple[float, float]:
        return run_child(
            [
                "curl",
                "-sS",
                "-f",
                "-T",
                str(self.source),
                f"{server.url}/dav/{name}",
                "-o",
                "/dev/null",
            ]
        )

    def serve(self, server: Server, name: str) -> tuple[float, float]:
        home = self.home()
        job_id = new_job(home, f"{server.url}/{name}", self.source)
        env = installed.child_env(drop_prefix="BACKHAUL_")
        argv = [str(BIN / "backhaul"), "--home", str(home), "serve", "--until-idle"]
        result = run_child([*argv, "--poll", "0.05", "--no-yield"], env)
        check_job(home, job_id)
        return result

    def serve_mallopt(self, server: Server, name: str) -> tuple[float, float]:
        """``serve`` with glibc's malloc told to keep ~1 MiB buffers on the heap (see the
        module docstring)."""
        home = self.home()
        job_id = new_job(home, f"{server.url}/{name}", self.source)
        env = installed.child_env(drop_prefix="BACKHAUL_")
        argv = ["--home", str(home), "serve", "--until-idle", "--poll", "0.05", "--no-yield"]
        code = f"{MALLOPT}; import sys; from backhaul.adapters.cli import main; sys.exit(main({argv!r}))"
        result = run_child([sys.executable, "-c", code], env)
        check_job(home, job_id)
        return result

    def engine(self, server: Server, name: str) -> tuple[float, float]:
        home = self.home()
        job_id = new_job(home, f"{server.url}/{name}", self.source)
        with TransferManager(home=home) as manager:
            fragment = self.args.fragment
            uploaders = {"http": BitsUploader(fragment_size=fragment)} if fragment else None
            engine = Engine(manager, uploaders=uploaders, poll_interval=0.05, yield_bandwidth=False)
            if fragment:
                engine.upload_fragment = fragment
            cpu, start = self_cpu(), time.perf_counter()
            asyncio.run(engine.run(until_idle=True))
            wall, cpu = time.perf_counter() - start, self_cpu() - cpu
        check_job(home, job_id)
        return wall, cpu

    def uploader(self, server: Server, name: str) -> tuple[float, float]:
        async def upload() -> None:
            from backhaul.core.port import RequestOptions

            fragment = self.args.fragment or MiB
            client = BitsUploader(fragment_size=fragment)
            size = self.source.stat().st_size
            fd = os.open(self.source, os.O_RDONLY)
            try:
                session = await client.begin(f"{server.url}/{name}", RequestOptions(), size=size)
                offset = 0
                while offset < size:
                    data = os.pread(fd, min(fragment, size - offset), offset)
                    offset = await session.send(data, offset)
                await session.finish()
            finally:
                os.close(fd)
                await client.close()

        cpu, start = self_cpu(), time.perf_counter()
        asyncio.run(upload())
        return time.perf_counter() - start, self_cpu() - cpu


def summarize(runs: list[Run], size: int) -> list[dict[str, Any]]:
    tools = list(dict.fromkeys(r.tool for r in runs))
    gib = size / GiB
    rows = []
    curl_wall = {r.round: r.wall for r in runs if r.tool == CURL}
    for tool in tools:
        mine = [r for r in runs if r.tool == tool]
        wall = statistics.median(r.wall for r in mine)
        ratio = statistics.median(r.wall / curl_wall[r.round] for r in mine)
        rows.append(
            {
                "tool": tool,
                "wall_s": wall,
                "walls": [round(r.wall, 2) for r in mine],
                "mib_s": size / MiB / wall,
                "ratio_to_curl": ratio,
                "client_cpu_s_per_gib": statistics.median(r.client_cpu for r in mine) / gib,
                "server_cpu_s_per_gib": statistics.median(r.server_cpu for r in mine) / gib,
                "total_cpu_s_per_gib": statistics.median(r.client_cpu + r.server_cpu for r in mine)
                / gib,
            }
        )
    return rows


def print_table(rows: list[dict[str, Any]], size: int, rounds: int) -> None:
    print(f"\nUpload of {size / MiB:.0f} MiB over loopback, median of {rounds} rounds")
    head = (
        f"{'tool':<34} {'wall s':>7} {'MiB/s':>7} {'x curl':>7} "
        f"{'client CPU':>11} {'server CPU':>11} {'total CPU':>10}  (CPU s/GiB)  walls"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['tool']:<34} {r['wall_s']:7.2f} {r['mib_s']:7.0f} {r['ratio_to_curl']:7.2f} "
            f"{r['client_cpu_s_per_gib']:11.2f} {r['server_cpu_s_per_gib']:11.2f} "
            f"{r['total_cpu_s_per_gib']:10.2f}               {r['walls']}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=GiB, help="bytes to upload (1GiB)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--fragment",
        type=parse_size,
        help="fragment size of the in-process engine and uploader (default: theirs, 1 MiB)",
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--dir", type=Path, help="parent of the temp dir ($TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    parser.add_argument(
        "--tools",
        default="curl,serve,mallopt,engine,uploader,fsync",
        help="comma-separated subset of curl,serve,mallopt,engine,uploader,fsync",
    )
    args = parser.parse_args()
    for tool in ("curl", "nginx"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is needed")
    installed.compile_package()
    wanted = {t.strip() for t in args.tools.split(",") if t.strip()}
    wanted.add("curl")  # the reference
    work = Path(tempfile.mkdtemp(prefix="bh-bench-up.", dir=args.dir))
    log(f"work dir {work}")
    runs: list[Run] = []
    try:
        source = work / "source.bin"
        write_random(source, args.size)
        bench = Bench(args, work, source)
        with (
            nginx_dav(work) as nginx,
            upload_server(work, "up", fsync=False) as ours,
            upload_server(work, "up-fsync", fsync=True) as ours_fsync,
        ):
            tools: list[tuple[str, str, Server, Callable[[Server, str], tuple[float, float]]]] = [
                ("curl", CURL, nginx, bench.curl),
                ("serve", "backhaul serve --until-idle", ours, bench.serve),
                ("mallopt", "backhaul serve (mallopt)", ours, bench.serve_mallopt),
                ("engine", "backhaul engine (in-process)", ours, bench.engine),
                ("uploader", "BitsUploader (in-process)", ours, bench.uploader),
                ("fsync", "backhaul engine (server fsync)", ours_fsync, bench.engine),
            ]
            tools = [t for t in tools if t[0] in wanted]
            for round_ in range(args.rounds):
                order = tools[round_ % len(tools) :] + tools[: round_ % len(tools)]
                for key, label, server, run in order:
                    settle()
                    before = proc_cpu(server.pid)
                    wall, cpu = run(server, f"{key}{round_}.bin")
                    server_cpu = proc_cpu(server.pid) - before
                    runs.append(Run(label, round_, wall, cpu, server_cpu))
                    uploaded = server.root / f"{key}{round_}.bin"
                    if uploaded.stat().st_size != args.size:
                        raise RuntimeError(f"{label}: {uploaded} has the wrong size")
                    # Untimed: free the upload's page cache, so that every run finds memory
                    # as the first did (new pages cost much more once the cache is full).
                    uploaded.unlink()
                    for home in work.glob("home*"):
                        shutil.rmtree(home)
                    log(
                        f"round {round_ + 1}: {label}: {wall:.2f} s, client CPU {cpu:.2f} s, "
                        f"server CPU {server_cpu:.2f} s"
                    )
        rows = summarize(runs, args.size)
        print_table(rows, args.size, args.rounds)
        if args.json:
            info = {
                "python": platform.python_version(),
                "nproc": len(os.sched_getaffinity(0)),
                "curl": subprocess.run(
                    ["curl", "--version"], capture_output=True, text=True, check=False
                ).stdout.split("\n")[0],
                "nginx": subprocess.run(
                    ["nginx", "-v"], capture_output=True, text=True, check=False
                ).stderr.strip(),
            }
            args.json.write_text(
                json.dumps(
                    {
                        "size": args.size,
                        "info": info,
                        "rows": rows,
                        "runs": [asdict(r) for r in runs],
                    },
                    indent=2,
                )
            )
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
