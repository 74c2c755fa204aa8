"""SmbTransport against a real smbd (tests/peers/samba.py): the conformance kit, then what only SMB
has: credentials, dropped connections and restarts, crash resume, change detection, stalls,
sharing, the event loop staying free, and errors as BITS reports them."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from peers.samba import SambaServer, running_samba

from backhaul.core import hresult as hr
from backhaul.core.error import TransferError
from backhaul.core.port import PlainCredentials, RequestOptions
from backhaul.core.vocabulary import AuthScheme, AuthTarget, ErrorContext
from backhaul.transports.conformance import TransportConformance, UploadConformance, read_all
from backhaul.transports.smb import (
    ENV_PASSWORD,
    ENV_USER,
    LOGON_FAILURE,
    STALL_TIMEOUT,
    TEMP_SUFFIX,
    SmbTransport,
)

pytestmark = pytest.mark.peer

MiB = 1024 * 1024
T = TypeVar("T")


@pytest.fixture(scope="module")
def samba() -> Iterator[SambaServer]:
    with running_samba() as server:
        yield server


def login(server: SambaServer, scheme: AuthScheme = AuthScheme.NTLM) -> RequestOptions:
    """The job's credentials: the SERVER target entry."""
    entry = PlainCredentials(AuthTarget.SERVER, scheme, server.user, server.password)
    return RequestOptions(credentials=(entry,))


def run(body: Callable[[SmbTransport], Awaitable[T]], **kwargs: float) -> T:
    async def main() -> T:
        transport = SmbTransport(**kwargs)  # type: ignore[arg-type]
        try:
            async with asyncio.timeout(120):
                return await body(transport)
        finally:
            await transport.close()

    return asyncio.run(main())


def fails(body: Callable[[SmbTransport], Awaitable[object]], **kwargs: float) -> TransferError:
    with pytest.raises(TransferError) as info:
        run(body, **kwargs)
    return info.value


def unique(label: str) -> str:
    return f"t-{os.urandom(5).hex()}-{label}.bin"


# =================================================================================================
# The conformance kit
# =================================================================================================


class TestSmbConformance(TransportConformance, UploadConformance):
    @pytest.fixture(autouse=True)
    def _server(self, samba: SambaServer) -> None:
        self.server = samba
        self.options = login(samba)

    def make_transport(self) -> SmbTransport:
        return SmbTransport()

    def url_for(self, name: str) -> str:
        return self.server.url(f"conf dir/{name}")  # a space: URLs must percent-encode it

    def publish(self, name: str, data: bytes) -> str:
        return self.server.put(f"conf dir/{name}", data)

    def replace(self, name: str, data: bytes) -> None:
        path = self.server.share_path / "conf dir" / name
        before = path.stat().st_mtime
        self.server.put(f"conf dir/{name}", data, mtime=before + 5)  # the validator must change

    def make_uploader(self) -> SmbTransport:
        return SmbTransport()

    def upload_url(self, name: str) -> str:
        self.server.put("conf dir/.keep", b"")  # the directory must exist
        return self.url_for(name)

    def fetch(self, name: str) -> bytes | None:
        path = self.server.share_path / "conf dir" / name
        return path.read_bytes() if path.exists() else None


# =================================================================================================
# Downloads
# =================================================================================================


def test_stat_gives_size_last_write_time_and_a_size_mtime_validator(samba: SambaServer) -> None:
    url = samba.put(unique("stat"), b"x" * 1234, mtime=1_700_000_000.25)

    remote = run(lambda t: t.stat(url, login(samba)))

    assert (remote.url, remote.size, remote.accepts_ranges) == (url, 1234, True)
    assert remote.last_modified is not None
    assert remote.last_modified.timestamp() == 1_700_000_000.25
    filetime = (1_700_000_000_250_000 + 11_644_473_600_000_000) * 10
    assert remote.validator == f"size=1234;mtime={filetime}"


def test_download_over_smb_url_and_unc_name_is_byte_identical(samba: SambaServer) -> None:
    data = os.urandom(5 * MiB + 4321)
    name = unique("whole")
    url = samba.put(f"sub dir/{name}", data)

    async def body(t: SmbTransport) -> tuple[bytes, bytes, int]:
        by_url = await t.open(url, login(samba))
        by_unc = await t.open(samba.unc(f"sub dir/{name}"), login(samba))
        return await read_all(by_url), await read_all(by_unc), by_url.offset

    by_url, by_unc, offset = run(body, default_port=samba.port)
    assert (by_url == data, by_unc == data, offset) == (True, True, 0)


def test_download_resumes_at_the_checkpoint_when_the_validator_matches(samba: SambaServer) -> None:
    data = os.urandom(3 * MiB)
    url = samba.put(unique("resume"), data)

    async def body(t: SmbTransport) -> tuple[int, bytes]:
        validator = (await t.stat(url, login(samba))).validator
        download = await t.open(url, login(samba), offset=2_000_001, validator=validator)
        return download.offset, await read_all(download)

    assert run(body) == (2_000_001, data[2_000_001:])


@pytest.mark.parametrize("change", ["size", "mtime"])
def test_a_changed_file_restarts_from_zero(samba: SambaServer, change: str) -> None:
    """BITS restarts a file whose size or last-write time changed (bits-core.md §13)."""
    name = unique(f"changed-{change}")
    url = samba.put(name, os.urandom(MiB), mtime=1_600_000_000)
    stale = run(lambda t: t.stat(url, login(samba))).validator
    new = os.urandom(MiB + 1) if change == "size" else os.urandom(MiB)
    samba.put(name, new, mtime=1_600_000_000 + (change == "mtime"))

    async def body(t: SmbTransport) -> tuple[int, str | None, bytes]:
        download = await t.open(url, login(samba), offset=500_000, validator=stale)
        return download.offset, download.remote.validator, await read_all(download)

    offset, validator, got = run(body)
    assert (offset, got) == (0, new)
    assert validator not in (None, stale)


def test_a_dropped_connection_mid_read_is_transient_and_the_read_resumes(
    samba: SambaServer,
) -> None:
    data = os.urandom(48 * MiB)
    url = samba.put(unique("dropped"), data)

    async def body(t: SmbTransport) -> tuple[TransferError, int, bytes]:
        remote = await t.stat(url, login(samba))
        download = await t.open(url, login(samba))
        got, killed = bytearray(), 0
        try:
            async for chunk in download:
                got += chunk
                if len(got) >= 2 * MiB and not killed:
                    killed = samba.kill_sessions()
        except TransferError as exc:
            error = exc
        else:
            raise AssertionError("the read survived a killed session")
        finally:
            await download.aclose()
        reached = len(got)
        again = await t.open(url, login(samba), offset=reached, validator=remote.validator)
        return error, again.offset, bytes(got) + await read_all(again)

    error, offset, whole = run(body)
    assert (error.hresult, error.transient) == (hr.BG_E_CONNECTION_CLOSED, True), error
    assert error.context is ErrorContext.GENERAL_TRANSPORT
    assert offset >= 2 * MiB
    assert whole == data


def test_an_smbd_restart_mid_read_is_transient_and_the_read_resumes(samba: SambaServer) -> None:
    data = os.urandom(32 * MiB)
    url = samba.put(unique("restart"), data)

    async def body(t: SmbTransport) -> tuple[TransferError, int, bytes]:
        remote = await t.stat(url, login(samba))
        download = await t.open(url, login(samba))
        got = bytearray()
        try:
            async for chunk in download:
                got += chunk
                if len(got) == MiB:
                    await asyncio.to_thread(samba.restart)
        except TransferError as exc:
            error = exc
        else:
            raise AssertionError("the read survived a restart")
        await download.aclose()
        again = await t.open(url, login(samba), offset=len(got), validator=remote.validator)
        return error, again.offset, bytes(got) + await read_all(again)

    error, offset, whole = run(body)
    assert error.transient
    assert error.hresult in (hr.BG_E_CONNECTION_CLOSED, STALL_TIMEOUT)
    assert offset >= MiB
    assert whole == data


def test_after_an_engine_kill_a_new_transport_resumes_at_the_recorded_offset(
    samba: SambaServer,
) -> None:
    data = os.urandom(8 * MiB + 5)
    url = samba.put(unique("killed"), data)

    async def first(t: SmbTransport) -> tuple[int, str | None, bytes]:
        download = await t.open(url, login(samba))
        got = bytearray()
        async for chunk in download:
            got += chunk
            if len(got) >= 3 * MiB:
                break  # the process dies here: no aclose, the server drops the session
        samba.kill_sessions()
        return len(got), download.remote.validator, bytes(got)

    offset, validator, head = run(first)

    async def second(t: SmbTransport) -> tuple[int, bytes]:
        download = await t.open(url, login(samba), offset=offset, validator=validator)
        return download.offset, await read_all(download)

    assert run(second) == (offset, data[offset:])
    assert head + data[offset:] == data


def test_a_stalled_server_fails_the_read_with_a_transient_timeout(samba: SambaServer) -> None:
    url = samba.put(unique("stall"), os.urandom(16 * MiB))

    async def body(t: SmbTransport) -> tuple[TransferError, float]:
        download = await t.open(url, login(samba))
        stopped = list(samba.sessions())
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        started = time.monotonic()
        try:
            with pytest.raises(TransferError) as info:
                await read_all(download)
        finally:
            for pid in stopped:
                os.kill(pid, signal.SIGKILL)
                os.kill(pid, signal.SIGCONT)
        return info.value, time.monotonic() - started

    error, waited = run(body, stall_timeout=1.0)
    assert (error.hresult, error.transient) == (STALL_TIMEOUT, True)
    assert waited < 10


def test_a_file_open_for_writing_elsewhere_is_a_transient_sharing_violation(
    samba: SambaServer,
) -> None:
    """Reads deny writers (the bytes must not change under the read), so a writer holding the
    file open makes the read wait for a retry, as BITS does."""
    import smbclient

    name = unique("shared")
    url = samba.put(name, b"data")
    cache: dict[str, object] = {}
    kwargs = {"port": samba.port, "username": samba.user, "password": samba.password}
    smbclient.register_session(samba.host, connection_cache=cache, **kwargs)
    try:
        with smbclient.open_file(samba.unc(name), mode="ab", connection_cache=cache, **kwargs):
            error = fails(lambda t: t.open(url, login(samba)))
    finally:
        smbclient.reset_connection_cache(connection_cache=cache)
    assert error.hresult == hr.hresult_from_win32(hr.ERROR_SHARING_VIOLATION)
    assert error.transient


def test_the_event_loop_keeps_running_during_a_download(samba: SambaServer) -> None:
    data = os.urandom(64 * MiB)
    url = samba.put(unique("loop"), data)

    async def body(t: SmbTransport) -> tuple[int, float, bool]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.005)
                ticks += 1

        task = asyncio.create_task(ticker())
        started = time.monotonic()
        got = await read_all(await t.open(url, login(samba)))
        elapsed = time.monotonic() - started
        task.cancel()
        return ticks, elapsed, got == data

    ticks, elapsed, same = run(body)
    assert same
    assert ticks >= 0.3 * elapsed / 0.005, f"{ticks} ticks in {elapsed:.2f} s: the loop was blocked"


# =================================================================================================
# Uploads
# =================================================================================================


def test_upload_writes_a_temp_name_then_renames_it_into_place(samba: SambaServer) -> None:
    samba.put("up/.keep", b"")
    name = unique("up")
    data = os.urandom(3 * MiB + 77)
    folder = samba.share_path / "up"

    async def body(t: SmbTransport) -> tuple[str, list[str]]:
        session = await t.begin(samba.url(f"up/{name}"), login(samba), size=len(data))
        for start in range(0, len(data), MiB):
            await session.send(data[start : start + MiB], start)
        during = sorted(os.listdir(folder))
        await session.finish()
        return session.token, during

    token, during = run(body)
    assert token.startswith(f".{name}.") and token.endswith(TEMP_SUFFIX)
    assert token in during and name not in during
    assert (folder / name).read_bytes() == data
    assert token not in os.listdir(folder)


def test_an_upload_of_a_255_byte_name_uses_a_legal_temp_name_and_resumes_by_it(
    samba: SambaServer,
) -> None:
    """Samba keeps names of up to 255 bytes (the disk's NAME_MAX): the temp name of such a
    name is cut to fit and given a hash, and a new session with its token finds it."""
    stem = unique("long")
    name = stem + "é" * ((255 - len(stem)) // 2) + "x" * ((255 - len(stem)) % 2)
    assert len(name.encode()) == 255
    data = os.urandom(2 * MiB)
    url = samba.url(name)
    folder = samba.share_path

    async def body(t: SmbTransport) -> tuple[str, list[str]]:
        session = await t.begin(url, login(samba), size=len(data))
        await session.send(data[:MiB], 0)
        during = [n for n in os.listdir(folder) if n.endswith(TEMP_SUFFIX)]
        resumed = await t.begin(url, login(samba), size=len(data), token=session.token)
        assert resumed.offset == MiB
        await resumed.send(data[MiB:], MiB)
        await resumed.finish()
        return session.token, during

    token, during = run(body)
    assert token in during and len(token.encode()) <= 255
    assert token.startswith(f".{stem}")
    assert (folder / name).read_bytes() == data
    assert token not in os.listdir(folder)


def test_upload_replaces_an_existing_file(samba: SambaServer) -> None:
    name = unique("replace")
    url = samba.put(name, b"old contents")

    async def body(t: SmbTransport) -> None:
        session = await t.begin(url, login(samba), size=3)
        await session.send(b"new", 0)
        await session.finish()

    run(body)
    assert (samba.share_path / name).read_bytes() == b"new"


def test_an_upload_resumes_with_its_token_after_the_server_went_away(
    samba: SambaServer,
) -> None:
    name = unique("up-down")
    data = os.urandom(6 * MiB)
    url = samba.url(name)

    async def body(t: SmbTransport) -> tuple[TransferError, int]:
        session = await t.begin(url, login(samba), size=len(data))
        await session.send(data[:MiB], 0)
        await session.send(data[MiB : 2 * MiB], MiB)
        await asyncio.to_thread(samba.stop)
        try:
            with pytest.raises(TransferError) as info:
                await session.send(data[2 * MiB : 3 * MiB], 2 * MiB)
        finally:
            await asyncio.to_thread(samba.start)
        resumed = await t.begin(url, login(samba), size=len(data), token=session.token)
        held = position = resumed.offset
        while position < len(data):
            position = await resumed.send(data[position : position + MiB], position)
        await resumed.finish()
        return info.value, held

    error, held = run(body)
    assert error.transient
    assert error.hresult in (hr.BG_E_CONNECT_FAILURE, hr.BG_E_CONNECTION_CLOSED)
    assert held == 2 * MiB
    assert (samba.share_path / name).read_bytes() == data


def test_a_connection_dropped_between_fragments_is_replaced(samba: SambaServer) -> None:
    """The next fragment reconnects, reopens the temp and goes on from what it holds."""
    name = unique("up-dropped")
    data = os.urandom(4 * MiB)

    async def body(t: SmbTransport) -> int:
        session = await t.begin(samba.url(name), login(samba), size=len(data))
        await session.send(data[:MiB], 0)
        samba.kill_sessions()
        await asyncio.sleep(0.3)  # the client notices the closed socket
        position = await session.send(data[MiB : 2 * MiB], MiB)
        while position < len(data):
            position = await session.send(data[position : position + MiB], position)
        await session.finish()
        return position

    assert run(body) == len(data)
    assert (samba.share_path / name).read_bytes() == data


def test_a_temp_file_shorter_than_sent_is_resent_from_what_it_holds(samba: SambaServer) -> None:
    """A server that lost written bytes (say it crashed before writing them back) must not get
    a hole: the session reports what the temp holds and the caller resends from there."""
    name = unique("up-shrunk")
    data = os.urandom(3 * MiB)

    async def body(t: SmbTransport) -> tuple[int, int]:
        session = await t.begin(samba.url(name), login(samba), size=len(data))
        await session.send(data[:MiB], 0)
        await session.send(data[MiB : 2 * MiB], MiB)
        samba.kill_sessions()
        os.truncate(samba.share_path / session.token, 1000)
        await asyncio.sleep(0.3)
        held = await session.send(data[2 * MiB :], 2 * MiB)
        position = held
        while position < len(data):
            position = await session.send(data[position : position + MiB], position)
        await session.finish()
        return held, position

    assert run(body) == (1000, len(data))
    assert (samba.share_path / name).read_bytes() == data


def test_an_upload_resumes_from_the_token_after_an_engine_kill(samba: SambaServer) -> None:
    name = unique("up-killed")
    data = os.urandom(5 * MiB + 3)
    url = samba.url(name)

    async def first(t: SmbTransport) -> str:
        session = await t.begin(url, login(samba), size=len(data))
        for start in range(0, 2 * MiB, MiB):
            await session.send(data[start : start + MiB], start)
        samba.kill_sessions()  # the process dies: no finish, no abort
        return session.token

    token = run(first)

    async def second(t: SmbTransport) -> int:
        session = await t.begin(url, login(samba), size=len(data), token=token)
        held = session.offset
        position = held
        while position < len(data):
            position = await session.send(data[position : position + MiB], position)
        await session.finish()
        return held

    assert run(second) == 2 * MiB
    assert (samba.share_path / name).read_bytes() == data


def test_a_token_whose_temp_file_is_gone_restarts_at_zero(samba: SambaServer) -> None:
    name = unique("up-gone")
    url = samba.url(name)

    async def body(t: SmbTransport) -> int:
        session = await t.begin(url, login(samba), size=4)
        await session.send(b"ab", 0)
        (samba.share_path / session.token).unlink()
        again = await t.begin(url, login(samba), size=4, token=session.token)
        held = again.offset
        await again.send(b"abcd", 0)
        await again.finish()
        return held

    assert run(body) == 0
    assert (samba.share_path / name).read_bytes() == b"abcd"


def test_abort_deletes_the_temp_file(samba: SambaServer) -> None:
    samba.put("abort/.keep", b"")

    async def body(t: SmbTransport) -> list[str]:
        session = await t.begin(samba.url("abort/x.bin"), login(samba), size=10)
        await session.send(b"12345", 0)
        during = os.listdir(samba.share_path / "abort")
        await session.abort()
        return during

    during = run(body)
    assert len(during) == 2
    assert os.listdir(samba.share_path / "abort") == [".keep"]


@pytest.mark.parametrize(
    "token", ["../../etc/passwd", ".other.bin.0123456789ab.bhtmp", "x", ".f.bin.zz.bhtmp"]
)
def test_a_foreign_upload_token_is_refused(samba: SambaServer, token: str) -> None:
    error = fails(lambda t: t.begin(samba.url("f.bin"), login(samba), size=1, token=token))
    assert (error.hresult, error.transient) == (hr.E_INVALIDARG, False)


def test_upload_reply_over_smb_is_refused(samba: SambaServer) -> None:
    error = fails(lambda t: t.begin(samba.url("r.bin"), login(samba), size=1, reply=True))
    assert (error.hresult, error.transient) == (hr.E_INVALIDARG, False)


# =================================================================================================
# Credentials
# =================================================================================================


def test_credentials_come_from_the_job_before_the_environment(
    samba: SambaServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = samba.put(unique("creds"), b"abc")
    monkeypatch.setenv(ENV_USER, samba.user)
    monkeypatch.setenv(ENV_PASSWORD, "wrong")
    assert run(lambda t: t.stat(url, login(samba, AuthScheme.NEGOTIATE))).size == 3
    error = fails(lambda t: t.stat(url, RequestOptions()))
    assert (error.hresult, error.transient) == (LOGON_FAILURE, False)
    monkeypatch.setenv(ENV_PASSWORD, samba.password)
    assert run(lambda t: t.stat(url, RequestOptions())).size == 3


def test_credentials_from_the_transport_configuration_and_the_url(samba: SambaServer) -> None:
    url = samba.put(unique("config"), b"abcd")

    async def configured(_: SmbTransport) -> int | None:
        t = SmbTransport(username=samba.user, password=samba.password)
        try:
            return (await t.stat(url, RequestOptions())).size
        finally:
            await t.close()

    assert run(configured) == 4
    with_creds = url.replace("smb://", f"smb://{samba.user}:{samba.password}@")
    remote = run(lambda t: t.stat(with_creds, RequestOptions()))
    assert remote.size == 4
    assert remote.url == url, "the password must not travel on in RemoteFile.url"


def test_proxy_credentials_and_entries_without_a_user_are_not_used(samba: SambaServer) -> None:
    url = samba.put(unique("proxy"), b"a")
    options = RequestOptions(
        credentials=(
            PlainCredentials(AuthTarget.PROXY, AuthScheme.BASIC, samba.user, samba.password),
            PlainCredentials(AuthTarget.SERVER, AuthScheme.NTLM, None, None),
        )
    )
    error = fails(lambda t: t.stat(url, options))
    assert error.hresult == LOGON_FAILURE


def test_a_wrong_password_is_a_fatal_logon_failure_without_the_password(
    samba: SambaServer,
) -> None:
    url = samba.put(unique("badpw"), b"a")
    options = RequestOptions(
        credentials=(PlainCredentials(AuthTarget.SERVER, AuthScheme.NTLM, samba.user, "Nope-42"),)
    )
    error = fails(lambda t: t.stat(url, options))
    assert (error.hresult, error.transient) == (LOGON_FAILURE, False)
    assert "Nope-42" not in str(error)


# =================================================================================================
# Errors as BITS reports them (bits-core.md §6.4: Access Denied fatal, server unavailable transient)
# =================================================================================================


def test_errors_map_to_win32_hresults_and_bits_classes(samba: SambaServer, tmp_path: Path) -> None:
    samba.put("errs/.keep", b"")
    share = f"smb://{samba.host}:{samba.port}"
    cases = {
        samba.url("errs/missing.bin"): (hr.ERROR_FILE_NOT_FOUND, ErrorContext.REMOTE_FILE),
        samba.url("no-dir/x.bin"): (hr.ERROR_PATH_NOT_FOUND, ErrorContext.REMOTE_FILE),
        samba.url("errs"): (hr.ERROR_ACCESS_DENIED, ErrorContext.REMOTE_FILE),  # a directory
        f"{share}/noshare/x.bin": (67, ErrorContext.REMOTE_FILE),  # ERROR_BAD_NET_NAME
    }
    for url, (win32, context) in cases.items():

        async def stat(t: SmbTransport, url: str = url) -> object:
            return await t.stat(url, login(samba))

        error = fails(stat)
        assert (error.hresult, error.context, error.transient) == (
            hr.hresult_from_win32(win32),
            context,
            False,
        ), url


def test_a_server_that_is_not_there_is_a_transient_connect_failure(samba: SambaServer) -> None:
    from peers.samba import free_port

    url = f"smb://127.0.0.1:{free_port()}/share/x.bin"
    error = fails(lambda t: t.stat(url, login(samba)), connect_timeout=5)
    assert (error.hresult, error.transient) == (hr.BG_E_CONNECT_FAILURE, True)
    assert error.context is ErrorContext.GENERAL_TRANSPORT


def test_connections_are_reused_and_all_closed_with_the_transport(samba: SambaServer) -> None:
    url = samba.put(unique("reuse"), os.urandom(MiB))

    async def body(t: SmbTransport) -> tuple[int, int]:
        for _ in range(5):
            await read_all(await t.open(url, login(samba)))
            await t.stat(url, login(samba))
        during = len(samba.sessions())
        await t.close()
        for _ in range(100):
            if not samba.sessions():
                break
            await asyncio.sleep(0.05)
        return during, len(samba.sessions())

    during, after = run(body)
    assert during == 1, "one leased connection at a time should be reused"
    assert after == 0
