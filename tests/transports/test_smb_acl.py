"""BITS's ACL flags (bits-core.md §13) over SMB, against a real smbd: the remote descriptor kept
with a downloaded file (adapters/acl.py, ``user.backhaul.ntacl``), the source descriptor set on an
uploaded file, privileges (E_ACCESSDENIED, transient), and the flag's validation in the API."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from peers.samba import SambaServer, running_samba

from backhaul.adapters import acl, localfile
from backhaul.adapters.manager import TransferManager
from backhaul.adapters.store import open_store
from backhaul.core import command as cmd
from backhaul.core import hresult as hr
from backhaul.core.error import BitsError, TransferError
from backhaul.core.port import PlainCredentials, RequestOptions
from backhaul.core.value import JobError
from backhaul.core.vocabulary import (
    AclFlags,
    AuthScheme,
    AuthTarget,
    ErrorContext,
    JobState,
    JobType,
)
from backhaul.transports.smb import (
    ACCESS_ALLOWED_ACE_TYPE,
    ACCESS_DENIED_ACE_TYPE,
    INHERITED_ACE,
    SYSTEM_AUDIT_ACE_TYPE,
    Ace,
    Acl,
    SecurityDescriptor,
    SmbTransport,
)

pytestmark = pytest.mark.peer

MiB = 1024 * 1024
T = TypeVar("T")
OWNER, GROUP, DACL, SACL = 1, 2, 4, 8  # SECURITY_INFORMATION bits for the reference client
EVERYONE, ADMINS, USERS = "S-1-1-0", "S-1-5-32-544", "S-1-5-32-545"
UNIX_ROOT = "S-1-22-1-0"
FULL, READ = 0x001F01FF, 0x001200A9
AUDIT_DELETE = Ace.of(SYSTEM_AUDIT_ACE_TYPE, EVERYONE, 0x00010000, 0x80 | 0x40)


@pytest.fixture(scope="module")
def samba() -> Iterator[SambaServer]:
    with running_samba() as server:
        yield server


def login(server: SambaServer) -> RequestOptions:
    entry = PlainCredentials(AuthTarget.SERVER, AuthScheme.NTLM, server.user, server.password)
    return RequestOptions(credentials=(entry,))


def run(body: Callable[[SmbTransport], Awaitable[T]]) -> T:
    """``body`` with a fresh transport: a new SMB session, so privileges granted since count."""

    async def main() -> T:
        transport = SmbTransport()
        try:
            async with asyncio.timeout(60):
                return await body(transport)
        finally:
            await transport.close()

    return asyncio.run(main())


def fails(body: Callable[[SmbTransport], Awaitable[object]]) -> TransferError:
    with pytest.raises(TransferError) as info:
        run(body)
    return info.value


def remote_sd(server: SambaServer, path: str, information: int) -> SecurityDescriptor:
    """Read back with the reference client (smbprotocol's high-level API), not the transport."""
    server.reset_client()
    return SecurityDescriptor.parse(server.query_security(path, information))


def entries(sd_acl: Acl | None) -> list[tuple[int, str | None, int | None, bool]]:
    assert sd_acl is not None
    return [(a.type, a.sid, a.mask, a.inherited) for a in sd_acl.aces]


async def upload(
    t: SmbTransport, url: str, options: RequestOptions, data: bytes, local: Path, flags: int
) -> None:
    """What the engine does for an upload job with ACL flags (see specs/smb.md)."""
    session = await t.begin(url, options, size=len(data))
    await session.send(data, 0)
    if flags:
        descriptor = await asyncio.to_thread(acl.source_descriptor, local)
        await session.apply_security(descriptor, flags)
    await session.finish()


@pytest.fixture
def privileges(samba: SambaServer) -> Iterator[Callable[..., None]]:
    """Grant privileges for one test; always revoked afterwards."""
    granted: list[str] = []

    def grant(*names: str) -> None:
        samba.grant(*names)
        granted.extend(names)

    yield grant
    if granted:
        samba.revoke(*granted)
    samba.reset_client()


def local_file(tmp_path: Path, samba: SambaServer, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    os.chown(path, samba.uid, samba.gid)
    return path


# =================================================================================================
# Downloads: the remote descriptor is kept with the local file
# =================================================================================================


def test_download_keeps_owner_group_and_dacl_of_the_remote_file_in_an_xattr(
    samba: SambaServer, tmp_path: Path
) -> None:
    url = samba.put("dl/acl.bin", b"data")
    me = remote_sd(samba, "dl/acl.bin", OWNER).owner
    assert me is not None
    dacl = Acl(
        (
            Ace.of(ACCESS_DENIED_ACE_TYPE, ADMINS, 0x2),
            Ace.of(ACCESS_ALLOWED_ACE_TYPE, me, FULL),
            Ace.of(ACCESS_ALLOWED_ACE_TYPE, EVERYONE, READ),
        )
    )
    samba.set_security("dl/acl.bin", SecurityDescriptor(dacl=dacl).pack(), DACL)
    flags = AclFlags.OWNER | AclFlags.GROUP | AclFlags.DACL

    descriptor = run(lambda t: t.security(url, login(samba), flags))

    assert descriptor is not None
    local = tmp_path / "acl.bin"
    local.write_bytes(b"data")
    assert acl.write_descriptor(local, descriptor)
    kept = acl.read_descriptor(local)
    assert kept is not None
    kept_sd = SecurityDescriptor.parse(kept)
    expected = remote_sd(samba, "dl/acl.bin", OWNER | GROUP | DACL)
    assert (kept_sd.owner, kept_sd.group) == (expected.owner, expected.group)
    assert entries(kept_sd.dacl) == entries(expected.dacl) == entries(dacl)
    assert kept_sd.sacl is None
    assert kept_sd.parts == flags


@pytest.mark.parametrize("flags", [AclFlags.OWNER, AclFlags.DACL, AclFlags.GROUP | AclFlags.DACL])
def test_download_keeps_only_the_parts_the_flags_name(samba: SambaServer, flags: int) -> None:
    url = samba.put("dl/parts.bin", b"x")
    descriptor = run(lambda t: t.security(url, login(samba), flags))
    assert descriptor is not None
    assert SecurityDescriptor.parse(descriptor).parts == flags


def test_no_acl_flags_read_no_descriptor(samba: SambaServer) -> None:
    url = samba.put("dl/none.bin", b"x")
    assert run(lambda t: t.security(url, login(samba), 0)) is None


def test_reading_the_sacl_without_privilege_is_a_transient_e_accessdenied(
    samba: SambaServer,
) -> None:
    url = samba.put("dl/sacl.bin", b"x")
    error = fails(lambda t: t.security(url, login(samba), AclFlags.ALL))
    assert (error.hresult, error.transient) == (hr.E_ACCESSDENIED, True)
    assert error.context is ErrorContext.REMOTE_FILE


def test_with_se_security_privilege_the_sacl_is_kept_too(
    samba: SambaServer, privileges: Callable[..., None]
) -> None:
    url = samba.put("dl/sacl-ok.bin", b"x")
    privileges("SeSecurityPrivilege")
    samba.reset_client()
    samba.set_security("dl/sacl-ok.bin", SecurityDescriptor(sacl=Acl((AUDIT_DELETE,))).pack(), SACL)

    descriptor = run(lambda t: t.security(url, login(samba), AclFlags.ALL))

    assert descriptor is not None
    kept = SecurityDescriptor.parse(descriptor)
    assert kept.parts == AclFlags.ALL
    assert entries(kept.sacl) == entries(Acl((AUDIT_DELETE,)))


# =================================================================================================
# Uploads: the source descriptor is set on the published file
# =================================================================================================


def test_upload_sets_owner_group_and_dacl_from_the_kept_descriptor_with_inherited_entries(
    samba: SambaServer, tmp_path: Path
) -> None:
    """Explicit source entries, then what the destination directory passes to new files
    (bits-core.md §13, BG_COPY_FILE_DACL)."""
    samba.put("inherit/.keep", b"")
    samba.reset_client()
    parent = SecurityDescriptor.parse(samba.query_security("inherit", DACL, directory=True))
    assert parent.dacl is not None
    with_users = Acl((*parent.dacl.aces, Ace.of(ACCESS_ALLOWED_ACE_TYPE, USERS, 0x120089, 0x03)))
    samba.set_security("inherit", SecurityDescriptor(dacl=with_users).pack(), DACL, directory=True)
    me = remote_sd(samba, "inherit/.keep", OWNER | GROUP)
    source = SecurityDescriptor(
        me.owner,
        me.group,
        Acl(
            (
                Ace.of(ACCESS_DENIED_ACE_TYPE, ADMINS, 0x2),
                Ace.of(ACCESS_ALLOWED_ACE_TYPE, str(me.owner), FULL),
                Ace.of(ACCESS_ALLOWED_ACE_TYPE, EVERYONE, READ, INHERITED_ACE),  # not copied
            )
        ),
    )
    local = local_file(tmp_path, samba, "up.bin", os.urandom(MiB))
    acl.write_descriptor(local, source.pack())
    flags = AclFlags.OWNER | AclFlags.GROUP | AclFlags.DACL

    run(
        lambda t: upload(
            t, samba.url("inherit/up.bin"), login(samba), local.read_bytes(), local, flags
        )
    )

    assert (samba.share_path / "inherit/up.bin").read_bytes() == local.read_bytes()
    got = remote_sd(samba, "inherit/up.bin", OWNER | GROUP | DACL)
    assert (got.owner, got.group) == (me.owner, me.group)
    explicit = [e for e in entries(got.dacl) if not e[3]]
    inherited = [e for e in entries(got.dacl) if e[3]]
    assert explicit == [
        (ACCESS_DENIED_ACE_TYPE, ADMINS, 0x2, False),
        (ACCESS_ALLOWED_ACE_TYPE, me.owner, FULL, False),
    ]
    assert (ACCESS_ALLOWED_ACE_TYPE, USERS, 0x120089, True) in inherited
    assert entries(got.dacl)[: len(explicit)] == explicit, "explicit entries come first"


def test_upload_without_a_kept_descriptor_uses_the_posix_owner_and_mode(
    samba: SambaServer, tmp_path: Path
) -> None:
    samba.put("posix/.keep", b"")
    local = local_file(tmp_path, samba, "p.bin", b"posix")
    os.chmod(local, 0o640)
    flags = AclFlags.OWNER | AclFlags.GROUP | AclFlags.DACL

    run(lambda t: upload(t, samba.url("posix/p.bin"), login(samba), b"posix", local, flags))

    got = remote_sd(samba, "posix/p.bin", OWNER | GROUP | DACL)
    user, group = f"S-1-22-1-{samba.uid}", f"S-1-22-2-{samba.gid}"
    assert (got.owner, got.group) == (user, group)
    explicit = [e for e in entries(got.dacl) if not e[3]]
    assert explicit == [
        (ACCESS_ALLOWED_ACE_TYPE, user, 0x001F019F, False),  # rw- + READ_CONTROL|WRITE_DAC|OWNER
        (ACCESS_ALLOWED_ACE_TYPE, group, 0x00120089, False),  # r--
    ]  # ---: no Everyone entry


def test_upload_with_only_the_dacl_flag_leaves_owner_and_group_to_the_server(
    samba: SambaServer, tmp_path: Path
) -> None:
    local = local_file(tmp_path, samba, "d.bin", b"d")
    kept = SecurityDescriptor(
        UNIX_ROOT, "S-1-22-2-0", Acl((Ace.of(ACCESS_ALLOWED_ACE_TYPE, EVERYONE, FULL),))
    )
    acl.write_descriptor(local, kept.pack())

    run(lambda t: upload(t, samba.url("d.bin"), login(samba), b"d", local, AclFlags.DACL))

    got = remote_sd(samba, "d.bin", OWNER | DACL)
    assert got.owner != UNIX_ROOT  # not copied (and not allowed without SeRestorePrivilege)
    assert entries(got.dacl)[0] == (ACCESS_ALLOWED_ACE_TYPE, EVERYONE, FULL, False)


def test_a_foreign_owner_without_se_restore_privilege_is_a_transient_e_accessdenied(
    samba: SambaServer, tmp_path: Path, privileges: Callable[..., None]
) -> None:
    """BITS: BG_COPY_FILE_OWNER needs SeRestorePrivilege; without it TRANSIENT_ERROR
    E_ACCESSDENIED, and the file is not published. With it, the retry succeeds."""
    local = local_file(tmp_path, samba, "root.bin", b"root's")
    acl.write_descriptor(local, SecurityDescriptor(owner=UNIX_ROOT).pack())
    url = samba.url("root-owned.bin")

    async def attempt(t: SmbTransport) -> str:
        session = await t.begin(url, login(samba), size=6)
        await session.send(b"root's", 0)
        await session.apply_security(acl.source_descriptor(local), AclFlags.OWNER)
        try:
            await session.finish()
        except TransferError:
            await session.abort()
            raise
        return session.token

    error = fails(attempt)
    assert (error.hresult, error.transient, error.context) == (
        hr.E_ACCESSDENIED,
        True,
        ErrorContext.REMOTE_FILE,
    )
    assert not (samba.share_path / "root-owned.bin").exists()

    privileges("SeRestorePrivilege")
    run(attempt)
    assert remote_sd(samba, "root-owned.bin", OWNER).owner == UNIX_ROOT
    assert (samba.share_path / "root-owned.bin").stat().st_uid == 0  # Samba chowned it


def test_the_sacl_is_refused_without_se_security_privilege_and_applied_with_it(
    samba: SambaServer, tmp_path: Path, privileges: Callable[..., None]
) -> None:
    local = local_file(tmp_path, samba, "audited.bin", b"audited")
    acl.write_descriptor(local, SecurityDescriptor(sacl=Acl((AUDIT_DELETE,))).pack())
    url = samba.url("audited.bin")
    flags = AclFlags.SACL

    error = fails(lambda t: upload(t, url, login(samba), b"audited", local, flags))
    assert (error.hresult, error.transient) == (hr.E_ACCESSDENIED, True)
    assert not (samba.share_path / "audited.bin").exists()

    privileges("SeSecurityPrivilege")
    run(lambda t: upload(t, url, login(samba), b"audited", local, flags))
    got = remote_sd(samba, "audited.bin", SACL)
    assert [e for e in entries(got.sacl) if not e[3]] == entries(Acl((AUDIT_DELETE,)))
    assert (samba.share_path / "audited.bin").read_bytes() == b"audited"


def test_download_then_upload_restores_the_descriptor_elsewhere(
    samba: SambaServer, tmp_path: Path
) -> None:
    """The documented round trip: download with ACL flags keeps the descriptor in the xattr; a
    later upload job with ACL flags sets it on the new copy."""
    data = os.urandom(2 * MiB + 1)
    url = samba.put("round/src.bin", data)
    me = remote_sd(samba, "round/src.bin", OWNER).owner
    dacl = Acl(
        (
            Ace.of(ACCESS_ALLOWED_ACE_TYPE, str(me), FULL),
            Ace.of(ACCESS_ALLOWED_ACE_TYPE, USERS, READ),
        )
    )
    samba.set_security("round/src.bin", SecurityDescriptor(dacl=dacl).pack(), DACL)
    flags = AclFlags.OWNER | AclFlags.GROUP | AclFlags.DACL
    local = tmp_path / "copy.bin"

    async def down(t: SmbTransport) -> None:
        download = await t.open(url, login(samba))
        local.write_bytes(b"".join([c async for c in download]))
        await download.aclose()
        descriptor = await t.security(url, login(samba), flags)
        assert descriptor is not None
        acl.write_descriptor(local, descriptor)

    run(down)
    os.replace(local, tmp_path / "published.bin")  # Complete renames: the xattr goes along
    published = tmp_path / "published.bin"
    run(lambda t: upload(t, samba.url("round/dst.bin"), login(samba), data, published, flags))

    source = remote_sd(samba, "round/src.bin", OWNER | GROUP | DACL)
    copy = remote_sd(samba, "round/dst.bin", OWNER | GROUP | DACL)
    assert (copy.owner, copy.group) == (source.owner, source.group)
    assert [e for e in entries(copy.dacl) if not e[3]] == entries(dacl)
    assert (samba.share_path / "round/dst.bin").read_bytes() == data


def test_a_malformed_source_descriptor_is_a_fatal_local_file_error(samba: SambaServer) -> None:
    async def body(t: SmbTransport) -> None:
        session = await t.begin(samba.url("bad-sd.bin"), login(samba), size=1)
        await session.apply_security(b"\x01\x00garbage", AclFlags.DACL)

    error = fails(body)
    assert (error.hresult, error.transient) == (hr.E_INVALIDARG, False)
    assert error.context is ErrorContext.LOCAL_FILE


# =================================================================================================
# adapters/acl.py on its own
# =================================================================================================


def test_posix_descriptor_maps_owner_group_and_mode_bits(tmp_path: Path) -> None:
    path = tmp_path / "m"
    path.write_bytes(b"")
    os.chmod(path, 0o751)
    st = path.stat()
    sd = acl.posix_descriptor(st)
    assert (sd.owner, sd.group) == (f"S-1-22-1-{st.st_uid}", f"S-1-22-2-{st.st_gid}")
    assert entries(sd.dacl) == [
        (ACCESS_ALLOWED_ACE_TYPE, sd.owner, 0x001F01BF, False),  # rwx + the owner's rights
        (ACCESS_ALLOWED_ACE_TYPE, sd.group, 0x001200A9, False),  # r-x
        (ACCESS_ALLOWED_ACE_TYPE, EVERYONE, 0x001200A0, False),  # --x
    ]
    assert sd.sacl is None


def test_source_descriptor_overlays_the_kept_parts_on_the_posix_ones(tmp_path: Path) -> None:
    path = tmp_path / "o"
    path.write_bytes(b"")
    kept = SecurityDescriptor(group="S-1-5-32-545", sacl=Acl((AUDIT_DELETE,)))
    acl.write_descriptor(path, kept.pack())
    sd = SecurityDescriptor.parse(acl.source_descriptor(path))
    assert sd.owner == f"S-1-22-1-{path.stat().st_uid}"  # from POSIX
    assert sd.group == "S-1-5-32-545"  # kept
    assert sd.dacl == acl.posix_descriptor(path.stat()).dacl  # from POSIX
    assert sd.sacl == kept.sacl  # kept
    acl.remove_descriptor(path)
    acl.remove_descriptor(path)  # twice is harmless
    assert acl.read_descriptor(path) is None


def test_write_descriptor_refuses_bytes_that_are_not_a_descriptor(tmp_path: Path) -> None:
    path = tmp_path / "x"
    path.write_bytes(b"")
    with pytest.raises(ValueError):
        acl.write_descriptor(path, b"not a descriptor")
    assert acl.read_descriptor(path) is None


def test_a_file_system_without_user_xattrs_keeps_nothing_as_bits_on_fat(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "fat"
    path.write_bytes(b"")

    def unsupported(*_: object) -> None:
        raise OSError(errno.ENOTSUP, "Operation not supported")

    monkeypatch.setattr(os, "setxattr", unsupported)
    monkeypatch.setattr(os, "getxattr", unsupported)
    assert acl.write_descriptor(path, SecurityDescriptor(owner=EVERYONE).pack()) is False
    assert acl.read_descriptor(path) is None


# =================================================================================================
# SetFileACLFlags validation (core/setting.py, bits-core.md §13)
# =================================================================================================


@pytest.fixture
def manager() -> Iterator[TransferManager]:
    with TransferManager(open_store("memory:"), owner="alice") as m:
        yield m


@pytest.mark.parametrize("flags", [0, 1, 2, 4, 8, 15, AclFlags.OWNER | AclFlags.SACL])
@pytest.mark.parametrize("job_type", list(JobType))
def test_every_acl_flag_combination_is_accepted_on_every_job_type(
    manager: TransferManager, flags: int, job_type: JobType
) -> None:
    job = manager.create_job("acl", job_type)
    job.acl_flags = AclFlags.ALL
    job.acl_flags = flags  # each call overwrites; 0 clears
    assert job.acl_flags == flags


@pytest.mark.parametrize("flags", [16, 0x1F, 0x100, -1, 1 << 31])
def test_unknown_acl_flag_bits_are_e_invalidarg(manager: TransferManager, flags: int) -> None:
    job = manager.create_job("acl")
    job.acl_flags = AclFlags.DACL
    with pytest.raises(BitsError) as info:
        job.acl_flags = flags
    assert info.value.hresult == hr.E_INVALIDARG
    assert job.acl_flags == AclFlags.DACL


def test_acl_flags_are_settable_until_transferred_and_not_after(
    manager: TransferManager, tmp_path: Path
) -> None:
    job = manager.create_job("acl")
    job.add_file("smb://server/share/f.bin", tmp_path / "f.bin")
    job.resume()
    job.acl_flags = AclFlags.OWNER  # QUEUED
    manager.execute(job.id, cmd.StartTransfer())
    manager.execute(job.id, cmd.Connect())
    job.acl_flags = AclFlags.GROUP  # TRANSFERRING
    error = JobError(ErrorContext.REMOTE_FILE, hr.E_ACCESSDENIED)
    manager.execute(job.id, cmd.Fail(error, True, None))
    assert job.state is JobState.TRANSIENT_ERROR
    job.acl_flags = AclFlags.DACL  # TRANSIENT_ERROR: fix the flags, BITS retries
    job.resume()
    manager.execute(job.id, cmd.StartTransfer())
    manager.execute(job.id, cmd.Connect())
    (tmp_path / f".f.bin.{localfile.job_tag(job.id)}-0.bhtmp").write_bytes(b"x")
    manager.execute(job.id, cmd.FinishFile(0, 1))
    manager.execute(job.id, cmd.FinishJob())
    assert job.state is JobState.TRANSFERRED
    with pytest.raises(BitsError) as info:
        job.acl_flags = AclFlags.ALL
    assert info.value.hresult == hr.BG_E_INVALID_STATE
    assert job.acl_flags == AclFlags.DACL
