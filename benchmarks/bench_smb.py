"""Benchmark an SMB download from Samba over loopback: backhaul's ``smb`` transport (run by the
engine, and alone) against Samba's own ``smbclient``, in the same run, for several
``read_ahead`` values.

Run from the project root, as root (smbd needs it; tests/peers/samba.py starts it)::

    .venv/bin/python benchmarks/bench_smb.py [--size 256MiB] [--rounds 5] [--read-ahead 1,2,4]

What runs (each round runs every tool once, in an order rotated by one each round; ``sync``
between runs, untimed; every run writes a new local file, checked and deleted after the run,
untimed: on this machine, a VM, runs that need pages the page cache must give back first were
2-3x slower for every tool, so without it the rounds after the first measured memory
reclaim):

* ``smbclient get``: ``smbclient //127.0.0.1/share -p PORT -U user%pass -c 'get FILE OUT'``
  (a child; its wall time and CPU from ``os.wait4``).
* ``backhaul engine ra=N``: a FOREGROUND download job run by an ``Engine`` in this process
  with a new ``SmbTransport(read_ahead=N)`` (connection set-up included), then completed
  (the rename, timed too: smbclient writes the final name).
* ``SmbTransport ra=N``: the transport alone: ``open`` and write every chunk with
  ``os.pwrite``.

CPU of the in-process runs is ``getrusage(RUSAGE_SELF)`` deltas (all threads). The server's
CPU is the smbd processes' (the parent's own and reaped children's, plus the live children's)
deltas from ``/proc``. The table gives medians; the ratio is the median of the per-round
ratios to smbclient's wall time. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from backhaul.adapters.engine import Engine
from backhaul.adapters.manager import TransferManager
from backhaul.core.port import RequestOptions
from backhaul.core.vocabulary import CostFlags, JobPriority, JobState
from backhaul.transports.smb import SmbTransport

MiB = 1024 * 1024
GiB = 1024 * MiB
ROOT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")
SMBCLIENT = "smbclient get"


def log(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+)\s*([kmg]?)i?b?", text.strip(), re.IGNORECASE)
    if match is None:
        raise argparse.ArgumentTypeError(f"bad size {text!r}")
    return int(match[1]) * 1024 ** " kmg".index(match[2].lower() or " ")


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def settle() -> None:
    os.sync()
    time.sleep(0.5)


def smbd_cpu(pid: int) -> float:
    """CPU of smbd: the parent (its own and its reaped children's) and live children."""

    def fields(p: int) -> list[str]:
        return Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()

    try:
        own = fields(pid)
    except OSError:
        return 0.0
    total = sum(int(x) for x in own[11:15])
    children = Path(f"/proc/{pid}/task/{pid}/children")
    for child in children.read_text().split() if children.exists() else []:
        with contextlib.suppress(OSError):
            total += sum(int(x) for x in fields(int(child))[11:13])
    return total / TICK


@contextlib.contextmanager
def samba() -> Iterator[Any]:
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from peers.samba import running_samba
    finally:
        sys.path.remove(str(ROOT / "tests"))
    with running_samba() as server:
        yield server


@dataclass
class Run:
    tool: str
    round: int
    wall: float
    client_cpu: float
    server_cpu: float


class Bench:
    def __init__(self, server: Any, work: Path, name: str, size: int) -> None:
        self.server = server
        self.work = work
        self.name = name
        self.size = size
        self.count = 0

    def out(self) -> Path:
        self.count += 1
        return self.work / "out" / f"{self.count}.bin"

    def check(self, path: Path) -> None:
        if path.stat().st_size != self.size:
            raise RuntimeError(f"{path}: {path.stat().st_size} bytes, want {self.size}")

    def smbclient(self) -> tuple[float, float]:
        out = self.out()
        s = self.server
        argv = [shutil.which("smbclient") or "/usr/bin/smbclient", f"//{s.host}/{s.share}"]
        argv += ["-p", str(s.port), "-U", f"{s.user}%{s.password}"]
        argv += ["-c", f"get {self.name} {out}"]
        start = time.perf_counter()
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            assert proc.stderr is not None
            raise RuntimeError(f"smbclient failed: {proc.stderr.read().decode(errors='replace')}")
        self.check(out)
        return wall, usage.ru_utime + usage.ru_stime

    def transport(self, read_ahead: int) -> SmbTransport:
        return SmbTransport(
            username=self.server.user, password=self.server.password, read_ahead=read_ahead
        )

    def engine(self, read_ahead: int) -> tuple[float, float]:
        out = self.out()
        home = self.work / f"home{self.count}"

        async def run() -> None:
            transport = self.transport(read_ahead)
            try:
                with TransferManager(home=home) as manager:
                    job = manager.create_job("bench")
                    job.priority = JobPriority.FOREGROUND
                    job.add_file(self.server.url(self.name), out)
                    job.resume()
                    engine = Engine(
                        manager,
                        transports={"smb": transport},
                        poll_interval=0.05,
                        yield_bandwidth=False,
                    )
                    engine.network_probe = lambda: True
                    engine.cost_probe = lambda: int(CostFlags.UNRESTRICTED)
                    await engine.run(until_idle=True)
                    if job.state is not JobState.TRANSFERRED:
                        raise RuntimeError(f"the job ended in {job.state.name}: {job.error}")
                    job.complete()
            finally:
                await transport.close()

        cpu, start = self_cpu(), time.perf_counter()
        asyncio.run(run())
        wall, cpu = time.perf_counter() - start, self_cpu() - cpu
        self.check(out)
        return wall, cpu

    def direct(self, read_ahead: int) -> tuple[float, float]:
        out = self.out()

        async def run() -> None:
            transport = self.transport(read_ahead)
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                download = await transport.open(self.server.url(self.name), RequestOptions())
                try:
                    offset = 0
                    async for chunk in download:
                        os.pwrite(fd, chunk, offset)
                        offset += len(chunk)
                finally:
                    await download.aclose()
            finally:
                os.close(fd)
                await transport.close()

        cpu, start = self_cpu(), time.perf_counter()
        asyncio.run(run())
        wall, cpu = time.perf_counter() - start, self_cpu() - cpu
        self.check(out)
        return wall, cpu


def summarize(runs: list[Run], size: int) -> list[dict[str, Any]]:
    gib = size / GiB
    reference = {r.round: r.wall for r in runs if r.tool == SMBCLIENT}
    rows = []
    for tool in dict.fromkeys(r.tool for r in runs):
        mine = [r for r in runs if r.tool == tool]
        wall = statistics.median(r.wall for r in mine)
        rows.append(
            {
                "tool": tool,
                "wall_s": wall,
                "walls": [round(r.wall, 2) for r in mine],
                "mib_s": size / MiB / wall,
                "ratio_to_smbclient": statistics.median(r.wall / reference[r.round] for r in mine),
                "client_cpu_s_per_gib": statistics.median(r.client_cpu for r in mine) / gib,
                "server_cpu_s_per_gib": statistics.median(r.server_cpu for r in mine) / gib,
            }
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=256 * MiB)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--read-ahead", default="1,2,4", help="comma-separated values")
    parser.add_argument("--no-direct", action="store_true", help="skip the transport-only rows")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--dir", type=Path, help="parent of the temp dir ($TMPDIR)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("run as root: smbd must start as root (tests/peers/samba.py)")
    read_aheads = [int(x) for x in args.read_ahead.split(",") if x.strip()]
    work = Path(tempfile.mkdtemp(prefix="bh-bench-smb.", dir=args.dir))
    (work / "out").mkdir()
    log(f"work dir {work}")
    runs: list[Run] = []
    try:
        with samba() as server:
            name = "big.bin"
            path = server.share_path / name
            with open(path, "wb") as f:
                left = args.size
                while left > 0:
                    n = min(16 * MiB, left)
                    f.write(os.urandom(n))
                    left -= n
            os.chown(path, server.uid, server.gid)
            bench = Bench(server, work, name, args.size)
            tools: list[tuple[str, Callable[[], tuple[float, float]]]] = [
                (SMBCLIENT, bench.smbclient)
            ]
            for k in read_aheads:
                tools.append((f"backhaul engine ra={k}", lambda k=k: bench.engine(k)))
                if not args.no_direct:
                    tools.append((f"SmbTransport ra={k}", lambda k=k: bench.direct(k)))
            for round_ in range(args.rounds):
                shift = round_ % len(tools)
                for label, run in tools[shift:] + tools[:shift]:
                    settle()
                    before = smbd_cpu(server.pid)
                    wall, cpu = run()
                    time.sleep(0.2)  # let the connection's smbd child exit and be reaped
                    server_cpu = smbd_cpu(server.pid) - before
                    runs.append(Run(label, round_, wall, cpu, server_cpu))
                    # Untimed: free the run's page cache (see the module docstring).
                    for leftover in (work / "out").iterdir():
                        leftover.unlink()
                    for home in work.glob("home*"):
                        shutil.rmtree(home)
                    log(f"round {round_ + 1}: {label}: {wall:.2f} s, CPU {cpu:.2f} s")
        rows = summarize(runs, args.size)
        print(f"\nSMB download of {args.size / MiB:.0f} MiB, median of {args.rounds} rounds")
        head = (
            f"{'tool':<24} {'wall s':>7} {'MiB/s':>7} {'x smbclient':>12} "
            f"{'client CPU':>11} {'smbd CPU':>9}  (CPU s/GiB)  walls"
        )
        print(head)
        print("-" * len(head))
        for r in rows:
            print(
                f"{r['tool']:<24} {r['wall_s']:7.2f} {r['mib_s']:7.0f} "
                f"{r['ratio_to_smbclient']:12.2f} {r['client_cpu_s_per_gib']:11.2f} "
                f"{r['server_cpu_s_per_gib']:9.2f}               {r['walls']}"
            )
        if args.json:
            args.json.write_text(
                json.dumps(
                    {"size": args.size, "rows": rows, "runs": [asdict(r) for r in runs]}, indent=2
                )
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
