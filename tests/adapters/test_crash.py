"""Crash test: ``backhaul serve`` killed with SIGKILL at random points, restarted each time.

One download job of four files (16-24 MiB of random bytes) is served by a small aiohttp server
written here: it honours ``Range`` / ``If-Range``, paces every response at ``RATE`` and logs the
byte range it actually served for each request. A real ``backhaul serve --until-idle``
subprocess (its own BACKHAUL_HOME in tmp) runs the job; the test kills it with SIGKILL ``KILLS``
times, each time ``uniform(0.05, 0.8)`` s after a start, then lets a last one finish. Then
``backhaul complete`` must publish files whose SHA-256 equals the source, with no temp file
left, and the log and the server's request log must show that nothing claimed was lost and
nothing claimed was fetched again:

* every ``BytesCheckpointed`` of a file has a non-decreasing offset within one file version,
  never beyond the bytes the server had sent for that file;
* every request an incarnation makes for a file starts EXACTLY at the file's last checkpoint
  committed before that incarnation started (0 if none), and no file that was already
  transferred is fetched again: no byte before the last checkpoint is fetched twice;
* the waste (bytes served minus the file size) is bounded: per interrupted request by about one
  checkpoint interval of data (plus slack for the fsync and commit in flight), and in total by
  (kills + restarts) x the bytes one checkpoint interval carries at ``RATE``.

Choices (the engine checkpoints every 1 s; ``serve`` has no option to change that):

* ``RATE`` is 6 MiB/s, so that every file takes 2.7-4 s, longer than one checkpoint interval,
  and gets checkpoints in mid-file (at 40-60 MiB/s a 24 MiB file is done before its first
  checkpoint, and every resume would be from 0), and so that the whole job (~14 s of transfer)
  outlasts the progress 21 short-lived incarnations make.
* "After a start" is, in turn (shuffled), after the process start (most of these land in the
  interpreter start-up, the engine's first appends or the first second of the transfer), after
  the incarnation's first request, and after its first checkpoint falls due (first request +
  1 s). An incarnation killed less than 1 s into its transfer can never have checkpointed.
* While the kills go on, the server holds back the last 256 KiB of the last file, so that the
  job cannot finish early (there are always ``KILLS`` kills); the hold ends before the final run.

``BACKHAUL_CRASH_SEED`` replays the same random plan (the seed is in every failure message).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from backhaul.adapters.localfile import TEMP_SUFFIX
from backhaul.adapters.store import DB_FILE, open_store
from backhaul.core import event as ev

MiB = 1024 * 1024
SIZES = (16 * MiB, 20 * MiB + 12_345, 24 * MiB - 777, 24 * MiB + 4321)
RATE = 6 * MiB  # bytes per second, per response
CHUNK = 64 * 1024
CHECKPOINT_INTERVAL = 1.0  # the engine's default (adapters/engine.py)
KILLS = 21
DELAY = (0.05, 0.8)
HOLD = 256 * 1024  # bytes of the last file held back while the kills go on
ANCHORS = ("process start", "first request", "first checkpoint due")
FINAL_TIMEOUT = 60.0
BACKHAUL = Path(sys.executable).parent / "backhaul"
# Per interrupted request: one checkpoint interval, the fsync + commit of the checkpoint in
# flight (generous on a loaded 2-core machine), and what sat in the socket buffers.
WASTE_PER_INTERRUPTION = int(RATE * (CHECKPOINT_INTERVAL + 1.0)) + 2 * MiB


# -- the server ------------------------------------------------------------------------------


@dataclass
class Served:
    """One GET as the server saw it: [start, start + served) of file ``name`` was sent."""

    name: str
    start: int
    end: int  # exclusive end of what was asked for
    at: float  # time.time() when the request arrived
    status: int
    range_header: str | None
    if_range: str | None
    peer: Any
    served: int = 0
    finished: bool = False
    error: str | None = None

    @property
    def stop(self) -> int:
        return self.start + self.served


class RangeServer:
    """Static files from memory with ETag, Last-Modified, Range and If-Range, paced at
    ``rate`` bytes per second per response; every GET is logged as a ``Served``."""

    def __init__(self, files: dict[str, bytes], rate: float) -> None:
        self.files = files
        self.views = {name: memoryview(data) for name, data in files.items()}
        self.etags = {
            name: '"' + hashlib.sha256(data).hexdigest()[:32] + '"' for name, data in files.items()
        }
        self.rate = rate
        self.requests: list[Served] = []
        self.hold: dict[str, int] = {}  # name -> bytes held back at its end until release()
        self.active = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._released: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._setup(), self._loop).result(10)

    async def _setup(self) -> None:
        self._released = asyncio.Event()
        app = web.Application()
        app.router.add_get("/{name}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def release(self) -> None:
        """End the hold: held responses go on, new ones are not held."""

        def _release() -> None:
            self.hold.clear()
            assert self._released is not None
            self._released.set()

        self._loop.call_soon_threadsafe(_release)

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(15)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()  # its self-pipe sockets with it

    def gets_since(self, when: float) -> list[Served]:
        return [r for r in list(self.requests) if r.at >= when]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        data = self.views.get(name)
        if data is None:
            raise web.HTTPNotFound()
        size = len(data)
        etag = self.etags[name]
        headers = {
            "ETag": etag,
            "Last-Modified": "Wed, 25 Nov 2026 12:00:00 GMT",
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        start, end, status = 0, size, 200
        range_header = request.headers.get("Range")
        if_range = request.headers.get("If-Range")
        if range_header is not None and if_range in (None, etag):
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", range_header.strip())
            if m is None:
                raise web.HTTPBadRequest(text=f"unsupported Range {range_header!r}")
            start = int(m[1])
            end = min(int(m[2]) + 1, size) if m[2] else size
            if start >= size or end <= start:
                raise web.HTTPRequestRangeNotSatisfiable(
                    headers={"Content-Range": f"bytes */{size}"}
                )
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = end - start
        if request.method == "HEAD":
            await resp.prepare(request)
            return resp
        rec = Served(
            name,
            start,
            end,
            time.time(),
            status,
            range_header,
            if_range,
            request.transport.get_extra_info("peername") if request.transport else None,
        )
        self.requests.append(rec)
        self.active += 1
        loop = asyncio.get_running_loop()
        try:
            await resp.prepare(request)
            pos, began = start, loop.time()
            while pos < end:
                n = min(CHUNK, end - pos)
                held = self.hold.get(name)
                if held is not None and pos + n > size - held:
                    assert self._released is not None
                    await self._released.wait()
                await resp.write(data[pos : pos + n])
                pos += n
                rec.served = pos - start
                delay = began + rec.served / self.rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            await resp.write_eof()
            rec.finished = True
        except (ConnectionError, OSError, RuntimeError) as exc:  # the client went away
            rec.error = repr(exc)
        except asyncio.CancelledError:
            rec.error = "cancelled"
            raise
        finally:
            self.active -= 1
        return resp


# -- the subprocesses ------------------------------------------------------------------------


@dataclass
class Life:
    """One ``backhaul serve`` process."""

    index: int
    spawned: float  # time.time()
    anchor: str | None  # what the kill delay counted from (None: the final run)
    delay: float | None
    log: Path
    killed_at: float | None = None
    returncode: int | None = None
    requests: list[Served] = field(default_factory=list)


def _cli(home: Path, *args: str, env: dict[str, str]) -> str:
    result = subprocess.run(
        [str(BACKHAUL), "--home", str(home), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"backhaul {' '.join(args)}: {result.stdout}{result.stderr}"
    return result.stdout


def _spawn(home: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [str(BACKHAUL), "--home", str(home), "serve", "--until-idle", "--poll", "0.05"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _wait_for_first_request(
    server: RangeServer, proc: subprocess.Popen[bytes], since: float, timeout: float = 15.0
) -> float | None:
    """time.time() of the incarnation's first GET, or None if the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = server.gets_since(since)
        if seen:
            return seen[0].at
        if proc.poll() is not None:
            return None
        time.sleep(0.005)
    return None


def _kill_after(server: RangeServer, proc: subprocess.Popen[bytes], life: Life) -> None:
    """SIGKILL ``proc`` ``life.delay`` s after ``life.anchor`` (the process start, its first
    request, or its first checkpoint due), unless it ended by itself first
    (``life.killed_at`` stays None then); reap it in any case."""
    assert life.delay is not None
    try:
        if life.anchor == "process start":
            base: float | None = life.spawned
        else:
            base = _wait_for_first_request(server, proc, life.spawned)
            if base is not None and life.anchor == "first checkpoint due":
                base += CHECKPOINT_INTERVAL
        if base is not None:
            time.sleep(max(0.0, base + life.delay - time.time()))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            life.killed_at = time.time()
    finally:
        if proc.poll() is None:
            proc.kill()
        life.returncode = proc.wait(10)


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"({exc})"


# -- the log ---------------------------------------------------------------------------------


@dataclass
class FileLog:
    """One file's story in the event log."""

    checkpoints: list[tuple[float, int, int]] = field(default_factory=list)  # (at, offset, ver)
    restarts: list[float] = field(default_factory=list)
    transferred_at: float | None = None

    def resume_offset(self, before: float) -> int | None:
        """Where an engine started at ``before`` must resume: the last checkpoint of the
        current file version decided before then (0 if none); None if already transferred."""
        if self.transferred_at is not None and self.transferred_at < before:
            return None
        restarted = max((t for t in self.restarts if t < before), default=float("-inf"))
        offsets = [o for t, o, _ in self.checkpoints if restarted < t < before]
        return offsets[-1] if offsets else 0


def _read_log(home: Path, job_id: str, count: int) -> tuple[list[FileLog], list[Any]]:
    store = open_store(str(home / DB_FILE))
    try:
        stream = store.stream(job_id)
    finally:
        store.close()
    files = [FileLog() for _ in range(count)]
    version = [0] * count
    errors = []
    for appended in stream:
        e = appended.event
        at = e.at.timestamp()
        if isinstance(e, ev.BytesCheckpointed):
            files[e.file_index].checkpoints.append((at, e.bytes_transferred, version[e.file_index]))
        elif isinstance(e, ev.FileRestarted):
            version[e.file_index] += 1
            files[e.file_index].restarts.append(at)
        elif isinstance(e, ev.FileTransferred):
            files[e.file_index].transferred_at = at
        elif isinstance(e, ev.ErrorOccurred):
            errors.append(e)
    return files, errors


# -- the test --------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_at_random_points_loses_nothing_and_refetches_at_most_a_checkpoint(
    tmp_path: Path, record_property: Any
) -> None:
    t_begin = time.monotonic()
    seed = int(os.environ.get("BACKHAUL_CRASH_SEED") or random.SystemRandom().randrange(2**32))
    rng = random.Random(seed)
    names = [f"part{i}.bin" for i in range(len(SIZES))]
    sources = {name: os.urandom(size) for name, size in zip(names, SIZES, strict=True)}
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in sources.items()}

    home, dest = tmp_path / "home", tmp_path / "dest"
    dest.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("BACKHAUL_STORE", "BACKHAUL_HOME")}
    env["BACKHAUL_HOME"] = str(home)

    server = RangeServer(sources, RATE)
    server.start()
    lives: list[Life] = []
    try:
        job_id = _cli(home, "create", "crash test", env=env).strip()
        listing = tmp_path / "files.txt"
        listing.write_text("".join(f"{server.url}/{n} {dest / n}\n" for n in names))
        _cli(home, "addfileset", job_id, str(listing), env=env)
        _cli(home, "setminretrydelay", job_id, "5", env=env)
        _cli(home, "resume", job_id, env=env)

        server.hold[names[-1]] = HOLD
        anchors = [ANCHORS[i % len(ANCHORS)] for i in range(KILLS)]
        rng.shuffle(anchors)
        for i, anchor in enumerate(anchors):
            delay = rng.uniform(*DELAY)
            life = Life(i, time.time(), anchor, delay, tmp_path / f"serve-{i}.log")
            lives.append(life)
            _kill_after(server, _spawn(home, env, life.log), life)
            assert life.killed_at is not None, (
                f"seed {seed}: serve #{i} ended by itself (rc={life.returncode}) before its kill:\n"
                + _tail(life.log)
            )
            time.sleep(0.02)

        server.release()
        final = Life(len(lives), time.time(), None, None, tmp_path / "serve-final.log")
        lives.append(final)
        proc = _spawn(home, env, final.log)
        try:
            final.returncode = proc.wait(FINAL_TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        assert final.returncode == 0, f"seed {seed}: final serve failed:\n{_tail(final.log)}"

        info = json.loads(_cli(home, "info", job_id, "--json", env=env))
        assert info["state"] == "TRANSFERRED", f"seed {seed}: {info}"
        _cli(home, "complete", job_id, env=env)
        deadline = time.monotonic() + 10
        while server.active and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        server.stop()

    # -- the files ---------------------------------------------------------------------------
    for name in names:
        got = hashlib.sha256((dest / name).read_bytes()).hexdigest()
        assert got == digests[name], f"seed {seed}: {name} differs from the source"
    leftovers = sorted(p.name for p in dest.iterdir() if p.name not in names)
    assert not leftovers, f"seed {seed}: left in the destination: {leftovers}"
    assert not list(dest.glob(f"*{TEMP_SUFFIX}"))

    # -- the log -----------------------------------------------------------------------------
    files, errors = _read_log(home, job_id, len(names))
    assert not errors, f"seed {seed}: the kills caused errors: {errors}"
    for index, flog in enumerate(files):
        assert not flog.restarts, f"seed {seed}: file {index} restarted from 0: {flog.restarts}"
        assert flog.transferred_at is not None, f"seed {seed}: file {index} never transferred"
        for (_, a, va), (_, b, vb) in itertools.pairwise(flog.checkpoints):
            assert va != vb or a <= b, f"seed {seed}: file {index} checkpoint went back {a} -> {b}"
        assert all(0 <= o <= SIZES[index] for _, o, _ in flog.checkpoints)

    # -- the requests against the log --------------------------------------------------------
    starts = [life.spawned for life in lives]
    for r in server.requests:
        owner = max(i for i, s in enumerate(starts) if s <= r.at)
        lives[owner].requests.append(r)

    per_file: dict[str, list[Served]] = {name: [] for name in names}
    resumed_mid_file = 0
    for life in lives:
        seen: set[str] = set()
        for r in life.requests:
            index = names.index(r.name)
            flog = files[index]
            expected = flog.resume_offset(life.spawned)
            where = f"seed {seed}: serve #{life.index} ({life.anchor}) asked {r.range_header!r}"
            assert expected is not None, f"{where} for {r.name}, transferred before it started"
            if r.name not in seen:
                assert r.start == expected, f"{where}: must resume at checkpoint {expected}"
            assert r.start >= expected, f"{where}: refetches bytes before checkpoint {expected}"
            assert r.status == (206 if r.start else 200), f"{where}: got {r.status}"
            assert r.start == 0 or r.if_range == server.etags[r.name], f"{where}: no If-Range"
            claimed = {0} | {o for _, o, _ in flog.checkpoints}
            assert r.start in claimed, f"{where}: starts at no checkpoint of {r.name}"
            before = max((p.stop for p in per_file[r.name]), default=0)
            assert r.start <= before, f"{where}: a checkpoint claimed bytes never sent"
            resumed_mid_file += r.start > 0
            seen.add(r.name)
            per_file[r.name].append(r)
    for name, flog in zip(names, files, strict=True):
        for at, offset, _ in flog.checkpoints:
            sent = max((r.stop for r in per_file[name] if r.at <= at), default=0)
            assert offset <= sent, f"seed {seed}: {name}: checkpoint {offset} > {sent} bytes sent"

    # -- waste -------------------------------------------------------------------------------
    kills = sum(life.killed_at is not None for life in lives)
    restarts = len(lives) - 1
    worst = 0
    waste: dict[str, int] = {}
    for name, size in zip(names, SIZES, strict=True):
        reqs = per_file[name]
        waste[name] = sum(r.served for r in reqs) - size
        for r, nxt in itertools.pairwise(reqs):
            lost = r.stop - nxt.start
            worst = max(worst, lost)
            assert lost <= WASTE_PER_INTERRUPTION, (
                f"seed {seed}: {name}: {lost} bytes fetched past the checkpoint {nxt.start} "
                f"were fetched again (bound {WASTE_PER_INTERRUPTION})"
            )
        assert reqs[-1].stop == size, f"seed {seed}: {name} not served to its end"
        assert reqs[-1].finished, f"seed {seed}: the last response for {name} did not finish"
    total_waste = sum(waste.values())
    bound = (kills + restarts) * int(RATE * CHECKPOINT_INTERVAL)
    assert total_waste <= bound, f"seed {seed}: waste {total_waste} > {bound}"
    assert kills >= 20
    # The plan lets some incarnations live past their first checkpoint: if no request ever
    # resumed in mid-file, the test did not test resuming.
    assert resumed_mid_file >= 1, f"seed {seed}: no resume from a mid-file checkpoint"

    elapsed = time.monotonic() - t_begin
    summary = {
        "seed": seed,
        "kills": kills,
        "restarts": restarts,
        "requests": len(server.requests),
        "resumed_mid_file": resumed_mid_file,
        "checkpoints": sum(len(f.checkpoints) for f in files),
        "waste_bytes": waste,
        "waste_total": total_waste,
        "waste_bound": bound,
        "worst_interruption": worst,
        "seconds": round(elapsed, 1),
    }
    timeline = [
        {
            "serve": life.index,
            "anchor": life.anchor,
            "delay": life.delay and round(life.delay, 3),
            "lived": round((life.killed_at or time.time()) - life.spawned, 3),
            "gets": [(r.name, r.start, r.served) for r in life.requests],
        }
        for life in lives
    ]
    for key, value in summary.items():
        record_property(key, value)
    print("crash test:", json.dumps(summary))
    with contextlib.suppress(OSError):
        (tmp_path / "summary.json").write_text(json.dumps({**summary, "timeline": timeline}))
