"""The engine with the SMB transport and BITS's ACL flags, against a real smbd: a download
keeps the flagged parts of the remote descriptor with the local file; an upload with
BG_COPY_FILE_ALL is refused without SeSecurityPrivilege (TRANSIENT_ERROR, E_ACCESSDENIED)
and applied once the test grants it; credentials inside an smb:// URL never reach the log."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from peers.samba import running_samba

from backhaul.adapters import acl
from backhaul.adapters.engine import Engine
from backhaul.adapters.manager import TransferManager
from backhaul.core import hresult as hr
from backhaul.core.error import BitsError
from backhaul.core.vocabulary import AclFlags, AuthScheme, AuthTarget, JobState, JobType
from backhaul.transports.smb import Ace, Acl, SecurityDescriptor, SmbTransport

pytestmark = pytest.mark.peer


def run_engine(manager: TransferManager, transport: SmbTransport) -> None:
    engine = Engine(manager, transports={"smb": transport}, uploaders={"smb": transport})
    engine.network_probe = lambda: True
    asyncio.run(engine.run(until_idle=True))


def test_acl_flags_through_the_engine_download_then_upload_with_the_sacl(tmp_path: Path) -> None:
    with running_samba() as samba, TransferManager(home=tmp_path / "home") as manager:
        url = samba.put("d/src.bin", os.urandom(3_000_000))
        job = manager.create_job("dl")
        job.add_file(url, tmp_path / "local.bin")
        job.set_credentials(AuthTarget.SERVER, AuthScheme.NTLM, samba.user, samba.password)
        job.acl_flags = AclFlags.OWNER | AclFlags.GROUP | AclFlags.DACL
        job.resume()
        run_engine(manager, SmbTransport())
        assert job.state is JobState.TRANSFERRED, job.error
        job.complete()
        kept = acl.read_descriptor(tmp_path / "local.bin")
        assert kept is not None
        source = SecurityDescriptor.parse(kept)
        assert source.owner is not None
        assert source.dacl is not None

        audit = Ace.of(2, "S-1-1-0", 0x10000, 0xC0)
        with_sacl = SecurityDescriptor(source.owner, source.group, source.dacl, Acl((audit,)))
        acl.write_descriptor(tmp_path / "local.bin", with_sacl.pack())
        up = manager.create_job("up", JobType.UPLOAD)
        up.add_file(samba.unc("d/dst.bin"), tmp_path / "local.bin")
        up.set_credentials(AuthTarget.SERVER, AuthScheme.NTLM, samba.user, samba.password)
        up.acl_flags = AclFlags.ALL
        up.minimum_retry_delay = 600  # the test resumes it itself
        up.resume()

        async def until_refused() -> None:
            transport = SmbTransport(default_port=samba.port)
            engine = Engine(manager, transports={"smb": transport}, uploaders={"smb": transport})
            engine.network_probe = lambda: True
            task = asyncio.create_task(engine.run())
            for _ in range(600):
                if up.state is JobState.TRANSIENT_ERROR:
                    break
                await asyncio.sleep(0.05)
            engine.stop()
            await task

        asyncio.run(until_refused())
        assert up.state is JobState.TRANSIENT_ERROR
        assert up.error is not None
        assert up.error.hresult == hr.E_ACCESSDENIED
        assert not (samba.share_path / "d/dst.bin").exists()  # nothing published

        samba.grant("SeSecurityPrivilege")
        up.resume()
        run_engine(manager, SmbTransport(default_port=samba.port))
        assert up.state is JobState.TRANSFERRED, up.error
        up.complete()
        samba.reset_client()
        got = SecurityDescriptor.parse(samba.query_security("d/dst.bin", 15))
        assert got.sacl is not None
        assert got.sacl.aces[0] == audit
        assert got.owner == source.owner
        assert (samba.share_path / "d/dst.bin").read_bytes() == (
            tmp_path / "local.bin"
        ).read_bytes()


def test_credentials_inside_an_smb_url_are_moved_out_before_anything_is_recorded(
    tmp_path: Path,
) -> None:
    with running_samba() as samba, TransferManager(home=tmp_path / "home") as manager:
        data = os.urandom(1_000_000)
        url = samba.put("c/f.bin", data)
        with_creds = url.replace("smb://", f"smb://{samba.user}:{samba.password}@")
        job = manager.create_job("x")
        job.add_file(with_creds, tmp_path / "f.bin")
        assert job.files()[0].remote_name == url
        assert job.credentials == [(AuthTarget.SERVER, AuthScheme.NTLM, samba.user)]
        job.resume()
        run_engine(manager, SmbTransport())
        assert job.state is JobState.TRANSFERRED, job.error
        job.complete()
        assert (tmp_path / "f.bin").read_bytes() == data
        other = manager.create_job("y")
        two_logins = [
            (with_creds, tmp_path / "a"),
            (url.replace("smb://", "smb://u:v@"), tmp_path / "b"),
        ]
        with pytest.raises(BitsError):
            other.add_files(two_logins)
        assert other.files() == []
        assert other.credentials == []
    stored = b"".join(p.read_bytes() for p in (tmp_path / "home").rglob("*") if p.is_file())
    assert samba.password.encode() not in stored
