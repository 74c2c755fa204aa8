"""Crash test of an on-demand job: ``backhaul serve`` killed with SIGKILL while it fills
requested byte ranges, restarted each time (the server and helpers of test_crash.py).

One 24 MiB file; the job requests three ranges (14 MiB) from a download position in the
middle. ``KILLS`` incarnations are killed ``uniform(DELAY)`` s after their first request;
a last one runs until the job is idle. Then:

* the job is SUSPENDED (the requested ranges are in, the file is not whole), and
  GetFilledFileRanges is exactly the requested set;
* the temp file holds the source's bytes in every filled range;
* every ``RangesFilled`` claims only bytes the server had sent before the claim;
* no incarnation asks for a byte claimed before it started (nothing claimed is fetched
  twice);
* requesting the rest and serving once more gives TRANSFERRED, and Complete publishes a
  file whose SHA-256 is the source's.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from pathlib import Path
from typing import Any

import pytest
from test_crash import RATE, Life, MiB, RangeServer, _cli, _kill_after, _spawn, _tail

from backhaul.adapters.store import DB_FILE, open_store
from backhaul.core import byteranges
from backhaul.core import event as ev
from backhaul.core.value import ByteRange

SIZE = 24 * MiB
REQUESTED = "0:4194304,8388608:6291456,20971520:eof"  # 0-4 MiB, 8-14 MiB, 20 MiB to the end
WANTED = (ByteRange(0, 4 * MiB), ByteRange(8 * MiB, 6 * MiB), ByteRange(20 * MiB, 4 * MiB))
POSITION = 9 * MiB
KILLS = 8
DELAY = (0.05, 1.6)


def _filled_events(home: Path, job_id: str) -> list[tuple[float, ByteRange]]:
    store = open_store(str(home / DB_FILE))
    try:
        return [
            (a.event.at.timestamp(), r)
            for a in store.stream(job_id)
            if isinstance(a.event, ev.RangesFilled)
            for r in a.event.ranges
        ]
    finally:
        store.close()


@pytest.mark.slow
def test_sigkill_while_filling_ranges_loses_nothing_and_refetches_nothing_claimed(
    tmp_path: Path, record_property: Any
) -> None:
    seed = int(os.environ.get("BACKHAUL_CRASH_SEED") or random.SystemRandom().randrange(2**32))
    rng = random.Random(seed)
    source = os.urandom(SIZE)
    home, dest = tmp_path / "home", tmp_path / "dest"
    dest.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("BACKHAUL_STORE", "BACKHAUL_HOME")}
    env["BACKHAUL_HOME"] = str(home)
    server = RangeServer({"f.bin": source}, RATE)
    server.start()
    lives: list[Life] = []
    try:
        job = _cli(home, "create", "on demand crash", env=env).strip()
        _cli(home, "setproperty", job, "ON_DEMAND_MODE", "true", env=env)
        _cli(home, "addfile", job, f"{server.url}/f.bin", str(dest / "f.bin"), env=env)
        _cli(home, "setminretrydelay", job, "5", env=env)
        _cli(home, "requestfileranges", job, "0", REQUESTED, env=env)
        _cli(home, "updatedownloadposition", job, "0", str(POSITION), env=env)
        _cli(home, "resume", job, env=env)
        for i in range(KILLS):
            life = Life(i, time.time(), "first request", rng.uniform(*DELAY), tmp_path / f"s{i}")
            lives.append(life)
            _kill_after(server, _spawn(home, env, life.log), life)
            if life.killed_at is None:
                break  # every range came in before this kill: the last run finds the job idle
        final = Life(len(lives), time.time(), None, None, tmp_path / "s-final")
        lives.append(final)
        proc = _spawn(home, env, final.log)
        final.returncode = proc.wait(60)
        assert final.returncode == 0, f"seed {seed}: {_tail(final.log)}"
        assert _cli(home, "getstate", job, env=env).strip() == "SUSPENDED", f"seed {seed}"
        filled = [
            ByteRange(*map(int, line.split(":")))
            for line in _cli(home, "getfilledfileranges", job, "0", env=env).split()
        ]
        assert tuple(filled) == WANTED, f"seed {seed}: {filled}"
        temp = Path(_cli(home, "gettemporaryname", job, "0", env=env).strip())
        held = temp.read_bytes()
        for r in WANTED:
            assert r.end is not None
            assert held[r.offset : r.end] == source[r.offset : r.end], f"seed {seed}: {r}"
        claims = _filled_events(home, job)

        _cli(home, "requestfileranges", job, "0", "0:eof", env=env)
        _cli(home, "resume", job, env=env)
        last = _spawn(home, env, tmp_path / "s-whole")
        assert last.wait(60) == 0, f"seed {seed}: {_tail(tmp_path / 's-whole')}"
        assert _cli(home, "getstate", job, env=env).strip() == "TRANSFERRED"
        _cli(home, "complete", job, env=env)
    finally:
        server.stop()

    got = hashlib.sha256((dest / "f.bin").read_bytes()).hexdigest()
    assert got == hashlib.sha256(source).hexdigest(), f"seed {seed}: the file differs"
    kills = sum(life.killed_at is not None for life in lives)
    record_property("kills", kills)
    assert kills >= 1, f"seed {seed}: no incarnation was killed"  # 14 MiB take 2.3 s at RATE
    starts = [life.spawned for life in lives]
    for at, claim in claims:  # a claim covers only bytes sent before it
        sent = byteranges.merge(
            ByteRange(r.start, r.served) for r in server.requests if r.at <= at and r.served
        )
        assert not byteranges.missing((claim,), sent), f"seed {seed}: {claim} claimed unsent"
    for r in server.requests:  # nothing claimed before an incarnation started is asked again
        began = max(s for s in starts if s <= r.at)
        before = byteranges.merge(c for at, c in claims if at < began)
        asked = (ByteRange(r.start, r.end - r.start),)
        overlap = byteranges.total(asked) - byteranges.total(byteranges.missing(asked, before))
        assert overlap == 0, f"seed {seed}: {r.range_header} refetches {overlap} claimed bytes"
    first = server.requests[0]
    assert first.start == POSITION, f"seed {seed}: the first range asked is not the position"
