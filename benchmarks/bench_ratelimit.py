"""Rate-limit accuracy and the rate controller's CPU cost, against a real nginx.

1. Accuracy: one job limited to ``--limit`` (its own max_rate, then the global policy for
   a background job) downloads from nginx on loopback for ``--seconds``; the mean rate
   over each 10-second window is reported against the limit (target: within +-10%).
2. Overhead: CPU seconds per GiB for an unthrottled transfer, and for the same transfer
   through the limiter with a limit far above what loopback can carry (every chunk pays
   the limiter's bookkeeping, no chunk waits).

    .venv/bin/python benchmarks/bench_ratelimit.py [--limit 8MB] [--seconds 30] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from peers.nginx import running_nginx  # noqa: E402

from backhaul.adapters.engine import Engine  # noqa: E402
from backhaul.adapters.manager import TransferManager  # noqa: E402
from backhaul.core.bandwidth import BandwidthPolicy, Limit, parse_rate  # noqa: E402
from backhaul.core.vocabulary import JobPriority  # noqa: E402

WINDOW = 10.0


async def sample(engine: Engine, job_id: str, seconds: float) -> list[float]:
    """Mean rate of each WINDOW-second window, from the engine's live progress."""
    task = asyncio.create_task(engine.run())
    rates: list[float] = []
    while not any(k[0] == job_id for k in engine.live_progress):
        await asyncio.sleep(0.05)
    await asyncio.sleep(2.0)  # past the start-up burst
    last_t, last_b = time.monotonic(), engine.live_progress.get((job_id, 0), 0)
    deadline = last_t + seconds
    while time.monotonic() < deadline:
        await asyncio.sleep(WINDOW)
        now, done = time.monotonic(), engine.live_progress.get((job_id, 0), last_b)
        rates.append((done - last_b) / (now - last_t))
        last_t, last_b = now, done
    engine.stop()
    await task
    return rates


def accuracy(url: str, work: Path, limit: int, seconds: float, scope: str) -> list[float]:
    manager = TransferManager(home=work / f"home-{scope}")
    job = manager.create_job(f"limited {scope}")
    job.add_file(url, work / f"limited-{scope}.bin")
    if scope == "job":
        job.priority = JobPriority.FOREGROUND
        job.max_rate = limit
    else:
        manager.set_bandwidth_policy(BandwidthPolicy((Limit(limit),)))
    job.resume()
    engine = Engine(manager, poll_interval=0.1, yield_bandwidth=False)
    rates = asyncio.run(sample(engine, job.id, seconds))
    job.cancel()
    manager.close()
    return rates


def cpu_per_gib(url: str, work: Path, size: int, limited: bool) -> float:
    manager = TransferManager(home=work / f"home-cpu-{limited}")
    job = manager.create_job("cpu")
    job.add_file(url, work / f"cpu-{limited}.bin")
    job.priority = JobPriority.FOREGROUND
    if limited:
        job.max_rate = 100 * 1024**3  # far above loopback: bookkeeping only
    job.resume()
    before = resource.getrusage(resource.RUSAGE_SELF)
    asyncio.run(Engine(manager, poll_interval=0.05, yield_bandwidth=False).run(until_idle=True))
    after = resource.getrusage(resource.RUSAGE_SELF)
    job.complete()
    os.unlink(work / f"cpu-{limited}.bin")
    manager.close()
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu / (size / 1024**3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--limit", default="8MB")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    limit = parse_rate(args.limit)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        www = work / "www"
        www.mkdir()
        with open(www / "big.bin", "wb") as f:
            block = os.urandom(1024 * 1024)
            for _ in range(max(args.size_mib, int(limit * (args.seconds + 5) / 2**20) + 1)):
                f.write(block)
        size = (www / "big.bin").stat().st_size
        with running_nginx(www) as nginx:
            url = f"{nginx.url}/big.bin"
            result = {"limit_Bps": limit, "window_s": WINDOW}
            for scope in ("job", "global"):
                rates = accuracy(url, work, limit, args.seconds, scope)
                errors = [r / limit - 1 for r in rates]
                result[f"{scope}_windows_Bps"] = rates
                result[f"{scope}_worst_error"] = max(abs(e) for e in errors)
                print(
                    f"{scope:>6} limit {limit / 1e6:.2f} MB/s: windows "
                    + ", ".join(f"{r / 1e6:.2f}" for r in rates)
                    + f" MB/s; worst error {max(abs(e) for e in errors):.1%}"
                )
            plain = [cpu_per_gib(url, work, size, False) for _ in range(3)]
            metered = [cpu_per_gib(url, work, size, True) for _ in range(3)]
            plain.sort()
            metered.sort()
            result["cpu_s_per_gib_unlimited"] = plain[1]
            result["cpu_s_per_gib_through_limiter"] = metered[1]
            print(
                f"CPU s/GiB: unthrottled {plain[1]:.2f}, through the limiter {metered[1]:.2f} "
                f"({metered[1] / plain[1] - 1:+.1%})"
            )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
