"""One end-to-end run: a download job with an smb:// remote name through the real engine
(adapters/engine.py) and the real API (TransferManager on SQLite), against a real smbd, stopped
after its first checkpoint and finished by a second engine that resumes there."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from peers.samba import running_samba

from backhaul.adapters.engine import Engine
from backhaul.adapters.manager import TransferJob, TransferManager
from backhaul.core.port import RequestOptions
from backhaul.core.vocabulary import AuthScheme, AuthTarget, JobState
from backhaul.transports.smb import SmbDownload, SmbTransport

pytestmark = pytest.mark.peer

MiB = 1024 * 1024


class RecordingSmb(SmbTransport):
    """The real transport, noting where each read starts."""

    def __init__(self) -> None:
        super().__init__()
        self.opened: list[tuple[int, str | None]] = []

    async def open(
        self,
        url: str,
        options: RequestOptions,
        *,
        offset: int = 0,
        length: int | None = None,
        validator: str | None = None,
    ) -> SmbDownload:
        self.opened.append((offset, validator))
        return await super().open(url, options, offset=offset, length=length, validator=validator)


async def run_until_checkpoint(engine: Engine, job: TransferJob) -> int:
    """Run ``engine`` and stop it once the log claims some bytes of the file."""
    task = asyncio.create_task(engine.run())
    try:
        while not task.done():
            done = job.files()[0].progress.bytes_transferred
            if done:
                return done
            await asyncio.sleep(0.01)
        raise AssertionError("the engine ended before its first checkpoint")
    finally:
        engine.stop()
        await asyncio.wait_for(task, 60)


def test_engine_downloads_an_smb_url_with_the_job_credentials_and_resumes(
    tmp_path: Path,
) -> None:
    data = os.urandom(192 * MiB + 99)
    local = tmp_path / "out" / "data.bin"
    local.parent.mkdir()
    with running_samba() as samba, TransferManager(home=tmp_path / "home") as manager:
        url = samba.put("e2e dir/data.bin", data, mtime=1_650_000_000.5)
        job = manager.create_job("smb download")
        job.add_file(url, local)
        job.set_credentials(AuthTarget.SERVER, AuthScheme.NTLM, samba.user, samba.password)
        job.resume()

        first = RecordingSmb()
        engine = Engine(manager, transports={"smb": first}, checkpoint_interval=0.02)
        claimed = asyncio.run(run_until_checkpoint(engine, job))
        assert 0 < claimed < len(data)
        assert job.state is not JobState.TRANSFERRED

        second = RecordingSmb()
        engine = Engine(manager, transports={"smb": second}, checkpoint_interval=0.02)
        asyncio.run(asyncio.wait_for(engine.run(until_idle=True), 120))

        assert job.state is JobState.TRANSFERRED, job.error
        assert first.opened == [(0, None)]
        resumed_at, validator = second.opened[0]
        assert resumed_at >= claimed, "the second engine did not resume at the checkpoint"
        assert validator is not None and validator.startswith(f"size={len(data)};mtime=")
        assert job.progress.bytes_transferred == job.progress.bytes_total == len(data)
        job.complete()

    assert local.read_bytes() == data
    assert local.stat().st_mtime == 1_650_000_000.5  # timestamps propagate (bits-core.md §13)
    stored = b"".join(p.read_bytes() for p in (tmp_path / "home").rglob("*") if p.is_file())
    assert samba.password.encode() not in stored, "the password reached the store in plain text"
