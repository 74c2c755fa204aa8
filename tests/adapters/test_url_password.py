"""A URL's own secrets, its password (``http://user:password@host/``) and a signed URL's
signature (``?X-Amz-Signature=...``, ``?sig=...``), are secrets like any other: the log holds
them sealed (FilesAdded v3, RemoteNameChanged v2), the remote name is recorded as
``http://user@host/...?sig=<redacted>``, and the engine puts them back only for the request.
Against a real nginx with Basic authentication (and the project's BITS upload server): the
file arrives, no byte of the store holds the password, and a wrong password is refused by the
server (so the one sent is the one given). A fault server plays the signing CDN."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import attrs
import pytest
from aiohttp import web
from aiohttp.typedefs import Handler
from peers.nginx import NginxServer, running_nginx
from test_engine import (  # the autouse fixture keeps BACKHAUL_STORE out
    FaultServer,
    Served,
    _no_store_from_the_environment,  # noqa: F401
    make_engine,
    new_job,
    sha256,
)

from backhaul.adapters import audit
from backhaul.adapters.cli import main
from backhaul.adapters.clock import ManualClock
from backhaul.adapters.manager import FileInfo, TransferJob, TransferManager
from backhaul.adapters.store import DB_FILE, open_store
from backhaul.adapters.upload_server import (
    BasicAuth,
    NotificationType,
    UploadServerConfig,
    VirtualDirectory,
    make_upload_app,
    serve_app,
    serve_uploads,
)
from backhaul.core import command as cmd
from backhaul.core import event as ev
from backhaul.core import hresult
from backhaul.core.error import BitsError
from backhaul.core.url import secrets_of
from backhaul.core.value import FileSpec, JobError, Sealed
from backhaul.core.vocabulary import ErrorContext, JobState, JobType

USER, PASSWORD = "alice", "Url-s3cret-Marker-41f7"


@pytest.fixture(scope="module")
def private_nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NginxServer, Path]]:
    """nginx with Basic authentication (USER, PASSWORD) on /private/."""
    docroot = tmp_path_factory.mktemp("private-www")
    (docroot / "private").mkdir()
    (docroot / "private" / "a.bin").write_bytes(os.urandom(300 * 1024))
    (docroot / "private" / "b.bin").write_bytes(os.urandom(70 * 1024))
    with running_nginx(docroot, basic_auth=(USER, PASSWORD)) as server:
        yield server, docroot


@pytest.fixture
def manager(home: Path) -> Iterator[TransferManager]:
    m = TransferManager(open_store(home=home))
    yield m
    m.close()


def with_password(url: str, password: str = PASSWORD) -> str:
    return url.replace("http://", f"http://{USER}:{password}@", 1)


def as_user(url: str) -> str:
    """``url`` as the job records it: the user kept, no password."""
    return url.replace("http://", f"http://{USER}@", 1)


def store_bytes(home: Path) -> bytes:
    db = home / DB_FILE
    files = (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm"))
    return b"".join(p.read_bytes() for p in files if p.exists())


def assert_not_in_store(home: Path, secret: str) -> None:
    raw = store_bytes(home)
    assert raw, "the store has no bytes to look at"
    assert secret.encode() not in raw
    assert secret.encode().hex().encode() not in raw


def run(manager: TransferManager) -> None:
    asyncio.run(make_engine(manager).run(until_idle=True))


# -- against nginx ----------------------------------------------------------------------------


def test_a_url_password_is_used_for_the_request_and_never_stored(
    tmp_path: Path,
    home: Path,
    manager: TransferManager,
    private_nginx: tuple[NginxServer, Path],
) -> None:
    server, docroot = private_nginx
    url = f"{server.url}/private/a.bin"
    job = new_job(manager, [(with_password(url), tmp_path / "a.bin")])

    run(manager)
    job = manager.get_job(job.id)
    assert job.state is JobState.TRANSFERRED, job.error
    job.complete()

    assert sha256(tmp_path / "a.bin") == sha256(docroot / "private" / "a.bin")
    # The request carried the password: nginx answered 200 to it, and nothing else.
    statuses = [
        line["status"] for line in server.access_lines() if "/private/a.bin" in line["request"]
    ]
    assert statuses and set(statuses) == {"200"}
    # What the job shows: the URL without the password, the user kept.
    assert [f.remote_name for f in job.files()] == [as_user(url)]
    history = audit.history_to_text(audit.history(manager.store, job.id))
    assert f"http://{USER}:<redacted>@" in history
    assert PASSWORD not in history
    manager.close()
    assert_not_in_store(home, PASSWORD)


def test_a_password_sealed_with_another_key_is_a_fatal_nte_bad_key_until_the_key_is_back(
    tmp_path: Path, home: Path, private_nginx: tuple[NginxServer, Path]
) -> None:
    """A store moved (or imported) without its secret.key: the job's password cannot be
    opened. That is a fatal error that names the key file (it was an internal error, retried
    for 14 days, with a traceback in the log); with the key back, Resume carries on."""
    server, docroot = private_nginx
    url = f"{server.url}/private/b.bin"
    with TransferManager(open_store(home=home)) as first:
        job_id = new_job(first, [(with_password(url), tmp_path / "b.bin")]).id
    key = home / "secret.key"
    kept = key.read_bytes()
    key.unlink()  # the home opened next makes a new key

    with TransferManager(open_store(home=home)) as manager:
        # Bounded: a transient error would keep the engine busy with its retries.
        asyncio.run(asyncio.wait_for(make_engine(manager).run(until_idle=True), 30))
        job = manager.get_job(job_id)
        assert job.state is JobState.ERROR
        error = job.error
        assert error is not None
        assert error.hresult == hresult.NTE_BAD_KEY == 0x80090003
        assert error.context.name == "GENERAL_QUEUE_MANAGER"
        assert str(key) in error.description
        assert not any("/private/b.bin" in line["request"] for line in server.access_lines())

    key.write_bytes(kept)
    with TransferManager(open_store(home=home)) as manager:
        job = manager.get_job(job_id)
        job.resume()
        run(manager)
        assert job.state is JobState.TRANSFERRED, job.error
        job.complete()
    assert sha256(tmp_path / "b.bin") == sha256(docroot / "private" / "b.bin")


def test_a_wrong_url_password_gets_the_servers_401(
    tmp_path: Path, manager: TransferManager, private_nginx: tuple[NginxServer, Path]
) -> None:
    server, _ = private_nginx
    url = with_password(f"{server.url}/private/b.bin", "not-the-password")
    job = new_job(manager, [(url, tmp_path / "b.bin")])

    run(manager)

    job = manager.get_job(job.id)
    assert job.state is JobState.ERROR
    assert job.error is not None
    assert job.error.hresult == hresult.http_status_hresult(401)
    assert "not-the-password" not in job.error.description


def test_a_new_url_keeps_the_password_of_the_same_login_and_the_refreshed_file_arrives(
    tmp_path: Path,
    home: Path,
    manager: TransferManager,
    private_nginx: tuple[NginxServer, Path],
) -> None:
    server, docroot = private_nginx
    job = new_job(
        manager, [(with_password(f"{server.url}/private/missing.bin"), tmp_path / "b.bin")]
    )
    engine = make_engine(manager)
    asked: list[str] = []

    def refresher(_job: TransferJob, file: object, code: int) -> str:
        asked.append(file.remote_name)  # type: ignore[attr-defined]
        return as_user(f"{server.url}/private/b.bin")

    engine.set_url_refresher(refresher, statuses=(404,))
    asyncio.run(engine.run(until_idle=True))

    job = manager.get_job(job.id)
    assert job.state is JobState.TRANSFERRED, job.error
    job.complete()
    assert sha256(tmp_path / "b.bin") == sha256(docroot / "private" / "b.bin")
    assert asked == [as_user(f"{server.url}/private/missing.bin")]
    changed = [e for e in manager.store.stream(job.id) if isinstance(e.event, ev.RemoteNameChanged)]
    assert len(changed) == 1 and isinstance(changed[0].event.password, Sealed)
    manager.close()
    assert_not_in_store(home, PASSWORD)


def test_backhaul_get_with_a_url_password(
    tmp_path: Path, home: Path, private_nginx: tuple[NginxServer, Path]
) -> None:
    server, docroot = private_nginx
    dest = tmp_path / "dest"
    dest.mkdir()
    url = with_password(f"{server.url}/private/a.bin")
    out = io.StringIO()

    code = main(["--home", str(home), "get", url, str(dest / "a.bin"), "--json"], out)

    assert code == 0, out.getvalue()
    assert sha256(dest / "a.bin") == sha256(docroot / "private" / "a.bin")
    assert PASSWORD not in out.getvalue()
    assert_not_in_store(home, PASSWORD)
    with sqlite3.connect(home / DB_FILE) as db:  # the read model too (not only the log)
        docs = [row[0] for row in db.execute("SELECT doc FROM backhaul_job_views")]
    assert docs and all(PASSWORD not in doc for doc in docs)


def test_an_upload_to_a_url_with_a_password_authenticates_and_never_stores_it(
    tmp_path: Path, home: Path, manager: TransferManager
) -> None:
    """The project's BITS upload server with Basic authentication on its directory."""
    www = tmp_path / "www"
    www.mkdir()
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(200 * 1024))
    auth = BasicAuth({USER: PASSWORD})
    config = UploadServerConfig(
        session_dir=tmp_path / "sessions", vdirs=[VirtualDirectory("/up", www, auth=auth)]
    )
    job = manager.create_job("up", JobType.UPLOAD)

    async def body() -> None:
        async with serve_uploads(config) as base:
            job.add_file(with_password(f"{base}/up/put.bin"), source)
            job.resume()
            await make_engine(manager).run(until_idle=True)

    asyncio.run(body())

    job = manager.get_job(job.id)
    assert job.state is JobState.TRANSFERRED, job.error
    assert (www / "put.bin").read_bytes() == source.read_bytes()
    assert job.files()[0].remote_name.startswith(f"http://{USER}@127.0.0.1:")
    manager.close()
    assert_not_in_store(home, PASSWORD)


# -- the reply of an upload-reply job ------------------------------------------------------


@contextlib.asynccontextmanager
async def reply_backend(reply: bytes, static: str | None) -> AsyncIterator[str]:
    """The application an upload-reply server notifies: it answers ``reply`` by value, or,
    with ``static``, points the client at ``/reply?sig=SIGNATURE`` on itself
    (BITS-Static-Response-URL), which answers only with that signature."""

    async def notify(request: web.Request) -> web.Response:
        await request.read()
        if static is None:
            return web.Response(body=reply)
        base = f"http://{request.host}"
        return web.Response(headers={"BITS-Static-Response-URL": f"{base}{static}"})

    async def fetch(request: web.Request) -> web.Response:
        if request.query.get("sig") != SIGNATURE:
            return web.Response(status=403)
        return web.Response(body=reply)

    app = web.Application()
    app.router.add_post("/notify", notify)
    app.router.add_get("/reply", fetch)
    async with serve_app(app, "127.0.0.1", 0) as url:
        yield f"{url}/notify"


@pytest.mark.parametrize("where", ["upload-server", "signed-static-url"])
def test_an_upload_reply_fetches_its_reply_without_storing_the_urls_secrets(
    tmp_path: Path, home: Path, manager: TransferManager, where: str
) -> None:
    """``upload-server``: the reply is on the upload server (Basic auth on its directory),
    at a URL joined from the upload URL, so with its password; ``signed-static-url``: the
    application points at a signed URL of its own."""
    www = tmp_path / "www"
    www.mkdir()
    source = tmp_path / "query.json"
    source.write_bytes(b'{"q": 1}')
    reply = b'{"a": "' + os.urandom(16).hex().encode() + b'"}'
    static = f"/reply?sig={SIGNATURE}" if where == "signed-static-url" else None
    job = manager.create_job("ask", JobType.UPLOAD_REPLY)

    async def body() -> None:
        async with reply_backend(reply, static) as notify_url:
            config = UploadServerConfig(
                session_dir=tmp_path / "sessions",
                vdirs=[
                    VirtualDirectory(
                        "/up",
                        www,
                        auth=BasicAuth({USER: PASSWORD}),
                        notification=NotificationType.BY_VALUE,
                        notification_url=notify_url,
                    )
                ],
            )
            async with serve_uploads(config) as base:
                job.add_file(with_password(f"{base}/up/query.json"), source)
                job.resume()
                await make_engine(manager).run(until_idle=True)

    asyncio.run(body())

    assert job.state is JobState.TRANSFERRED, job.error
    assert job.reply_data() == reply
    located = [
        r.event for r in manager.store.stream(job.id) if isinstance(r.event, ev.ReplyLocated)
    ]
    assert len(located) == 1
    if static is None:  # the server's own URL for it: the job gave it the upload's login
        assert located[0].url.startswith("http://127.0.0.1:")
        assert located[0].query is None
    else:
        assert located[0].url.endswith("/reply?sig=<redacted>")
        assert located[0].query is not None
    manager.close()
    assert_not_in_store(home, PASSWORD)
    assert_not_in_store(home, SIGNATURE)


# -- a signed URL ---------------------------------------------------------------------------

SIGNATURE = "Sig-Marker-5d0c9e"


def fetch_signed(
    manager: TransferManager, dest: Path, name: str, query: str
) -> tuple[TransferJob, str]:
    """Download ``/f?QUERY`` from a FaultServer that plays the signing CDN (a request without
    ``NAME=SIGNATURE`` gets 403), complete the job and check the file and the query the
    server got (as given): the job, and the file's URL without a query."""
    data = os.urandom(96 * 1024)

    async def body() -> tuple[TransferJob, list[str], str]:
        async with FaultServer({"/f": Served(data, token=SIGNATURE, token_name=name)}) as srv:
            job = new_job(manager, [(srv.url(f"/f?{query}"), dest)])
            await make_engine(manager).run(until_idle=True)
            return job, [h.query for h in srv.hits_for("/f")], srv.url("/f")

    job, queries, plain = asyncio.run(body())
    assert job.state is JobState.TRANSFERRED, job.error
    job.complete()
    assert dest.read_bytes() == data
    assert queries == [query]
    return job, plain


@pytest.mark.parametrize("sig", ["sig", "X-Upload-Token", "sessionSignature"])
def test_a_signed_urls_signature_is_used_for_the_request_and_never_stored(
    tmp_path: Path, home: Path, manager: TransferManager, sig: str
) -> None:
    """The FaultServer plays the signing CDN: a request without ``sig=SIGNATURE`` gets 403.
    The parameter may be a listed name or any name with a secret word in it."""
    query = f"X-Amz-Date=20261126T150000Z&{sig}={SIGNATURE}&part=1"
    job, plain = fetch_signed(manager, tmp_path / "f.bin", sig, query)
    shown = f"{plain}?X-Amz-Date=20261126T150000Z&{sig}=<redacted>&part=1"
    assert [f.remote_name for f in job.files()] == [shown]
    assert shown in audit.history_to_text(audit.history(manager.store, job.id))
    manager.close()
    assert_not_in_store(home, SIGNATURE)


def declare_in_another_process(home: Path, *names: str) -> None:
    """``backhaul setsecretparams NAMES`` in a process of its own: what reaches this one
    comes through the store's policy, not through this process's memory."""
    argv = [str(Path(sys.executable).parent / "backhaul"), "--home", str(home)]
    done = subprocess.run([*argv, "setsecretparams", *names], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    shown = subprocess.run([*argv, "getsecretparams", "--json"], capture_output=True, text=True)
    assert json.loads(shown.stdout) == {"secret_parameters": sorted(names, key=str.lower)}


def fresh_parameter_name() -> str:
    """A parameter name with no secret word that this process has not been told about (the
    declared names only grow in a process)."""
    return f"edgeh{os.urandom(4).hex()}"


def test_a_signature_parameter_without_a_secret_word_is_kept_out_once_declared(
    tmp_path: Path, home: Path, manager: TransferManager
) -> None:
    """A CDN that signs with ``?edgeh...=``: no secret word, so the name must be declared.
    Declared in another process, the store's policy carries it here; the request still
    carries the real value (the server refuses a request without it)."""
    name = fresh_parameter_name()
    assert secrets_of(f"http://127.0.0.1/f?{name}={SIGNATURE}")[2] is None  # not known yet
    declare_in_another_process(home, name)

    job, plain = fetch_signed(manager, tmp_path / "f", name, f"part=1&{name}={SIGNATURE}")
    assert [f.remote_name for f in job.files()] == [f"{plain}?part=1&{name}=<redacted>"]
    manager.close()
    assert_not_in_store(home, SIGNATURE)


def test_backhaul_get_keeps_a_declared_parameter_out_of_the_log_and_the_job_name(
    tmp_path: Path, home: Path
) -> None:
    name = fresh_parameter_name()
    data = os.urandom(70 * 1024)
    declare_in_another_process(home, name)
    out = io.StringIO()
    with FaultServer({"/f": Served(data, token=SIGNATURE, token_name=name)}).threaded() as srv:
        url = srv.url(f"/f?{name}={SIGNATURE}")
        code = main(["--home", str(home), "get", url, str(tmp_path / "f"), "--json"], out)

    assert code == 0, out.getvalue()
    assert (tmp_path / "f").read_bytes() == data
    assert SIGNATURE not in out.getvalue()
    assert_not_in_store(home, SIGNATURE)
    with sqlite3.connect(home / DB_FILE) as db:
        docs = [row[0] for row in db.execute("SELECT doc FROM backhaul_job_views")]
    assert docs and all(SIGNATURE not in doc for doc in docs)
    assert any(f"{name}=<redacted>" in doc for doc in docs)  # the job's name and its file


def test_secret_parameter_names_are_checked_and_the_list_is_replaced(home: Path) -> None:
    m = TransferManager(open_store(home=home))
    try:
        with pytest.raises(BitsError) as refused:
            m.set_secret_parameters(["a=b"])
        assert refused.value.hresult == hresult.E_INVALIDARG
        assert m.settings().secret_parameters == ()
        m.set_secret_parameters(["Zeta", "alpha", "zeta"])
        assert m.settings().secret_parameters == ("alpha", "Zeta")  # compared without case
        m.set_secret_parameters([])
        assert m.settings().secret_parameters == ()
    finally:
        m.close()


def test_the_error_of_a_refused_signed_url_does_not_hold_its_signature(
    tmp_path: Path, home: Path, manager: TransferManager
) -> None:
    async def body() -> TransferJob:
        async with FaultServer({"/f": Served(b"x" * 1000, token="the-current-one")}) as srv:
            job = new_job(manager, [(srv.url(f"/f?sig={SIGNATURE}"), tmp_path / "f.bin")])
            await make_engine(manager).run(until_idle=True)
            return job

    job = asyncio.run(body())

    assert job.state is JobState.ERROR
    assert job.error is not None
    assert job.error.hresult == hresult.http_status_hresult(403)
    assert "sig=<redacted>" in job.error.description
    manager.close()
    assert_not_in_store(home, SIGNATURE)


# -- a signed upload URL, refreshed ----------------------------------------------------------

OLD_SIG, NEW_SIG = "Upload-Sig-Old-71c2e4", "Upload-Sig-New-9a03bd"
FRAGMENT = 64 * 1024


@attrs.define
class SigningGate:
    """In front of the project's upload server: a request without a valid ``sig`` gets 403.
    OLD_SIG expires after ``old_fragments`` fragments; NEW_SIG is valid throughout."""

    old_fragments: int
    valid: set[str] = attrs.field(factory=lambda: {OLD_SIG, NEW_SIG})
    fragments: list[tuple[str, str, int]] = attrs.field(factory=list)  # sig, session, start
    refused: int = 0

    @web.middleware
    async def __call__(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        sig = request.query.get("sig", "")
        if sig not in self.valid:
            self.refused += 1
            return web.Response(status=403)
        if request.headers.get("BITS-Packet-Type", "").lower() == "fragment":
            start = int(request.headers["Content-Range"].split()[1].split("-")[0])
            self.fragments.append((sig, request.headers["BITS-Session-Id"], start))
            if sum(f[0] == OLD_SIG for f in self.fragments) >= self.old_fragments:
                self.valid.discard(OLD_SIG)  # answered, then expired
        return await handler(request)


def run_refreshed_upload(
    tmp_path: Path, manager: TransferManager, gate: SigningGate, new_path: str
) -> tuple[TransferJob, bytes, Path]:
    """An upload of 8 fragments to ``/up/put.bin?sig=OLD_SIG``, with a refresher that answers
    ``new_path?sig=NEW_SIG``."""
    www = tmp_path / "www"
    www.mkdir()
    source = tmp_path / "source.bin"
    data = os.urandom(8 * FRAGMENT)
    source.write_bytes(data)
    config = UploadServerConfig(
        session_dir=tmp_path / "sessions", vdirs=[VirtualDirectory("/up", www)]
    )
    app = make_upload_app(config)
    app.middlewares.append(gate.__call__)
    job = manager.create_job("up", JobType.UPLOAD)
    asked: list[tuple[str, int]] = []

    async def body() -> None:
        async with serve_app(app) as base:

            def refresher(handle: TransferJob, file: FileInfo, code: int) -> str:
                asked.append((file.remote_name, code))
                return f"{base}{new_path}?sig={NEW_SIG}"

            job.add_file(f"{base}/up/put.bin?sig={OLD_SIG}", source)
            job.resume()
            engine = make_engine(manager)
            engine.upload_fragment = FRAGMENT
            engine.set_url_refresher(refresher)
            await engine.run(until_idle=True)

    asyncio.run(body())
    assert [code for _, code in asked] == [hresult.http_status_hresult(403)]
    assert asked[0][0].endswith("/up/put.bin?sig=<redacted>")  # the recorded form
    return manager.get_job(job.id), data, www / "put.bin"


def test_an_expired_upload_url_is_refreshed_and_its_session_goes_on(
    tmp_path: Path, home: Path, manager: TransferManager
) -> None:
    gate = SigningGate(old_fragments=3)
    job, data, placed = run_refreshed_upload(tmp_path, manager, gate, "/up/put.bin")

    assert job.state is JobState.TRANSFERRED, job.error
    assert placed.read_bytes() == data
    assert gate.refused >= 1
    old = [f for f in gate.fragments if f[0] == OLD_SIG]
    new = [f for f in gate.fragments if f[0] == NEW_SIG]
    assert [start for _, _, start in old] == [0, FRAGMENT, 2 * FRAGMENT]
    # one session throughout: the new URL went on where the server was, not from byte 0
    assert len({session for _, session, _ in gate.fragments}) == 1
    assert new and 0 < new[0][2] <= 3 * FRAGMENT
    assert new[-1][2] == 7 * FRAGMENT
    assert job.files()[0].remote_name.endswith("/up/put.bin?sig=<redacted>")
    changed = [e for e in manager.store.stream(job.id) if isinstance(e.event, ev.RemoteNameChanged)]
    assert len(changed) == 1
    manager.close()
    for secret in (OLD_SIG, NEW_SIG):
        assert_not_in_store(home, secret)


def test_a_refreshed_upload_url_must_name_the_same_file(
    tmp_path: Path, home: Path, manager: TransferManager
) -> None:
    """A new path would be another file on the server: the refresher's answer is refused
    and the 403 stands."""
    gate = SigningGate(old_fragments=3)
    job, _, placed = run_refreshed_upload(tmp_path, manager, gate, "/up/other.bin")

    assert job.state is JobState.ERROR
    assert job.error is not None
    assert job.error.hresult == hresult.http_status_hresult(403)
    assert not placed.exists()
    assert {f[0] for f in gate.fragments} == {OLD_SIG}
    assert job.files()[0].remote_name.endswith("/up/put.bin?sig=<redacted>")


def test_set_remote_name_stays_a_download_call_and_a_refresh_keeps_the_file(
    manager: TransferManager, tmp_path: Path
) -> None:
    source = tmp_path / "s.bin"
    source.write_bytes(b"x")
    job = manager.create_job("up", JobType.UPLOAD)
    job.add_file("https://h/up/s.bin?sig=a", source)
    with pytest.raises(BitsError) as refused:
        job.set_remote_name(0, "https://h/up/s.bin?sig=b")
    assert refused.value.hresult == hresult.E_NOTIMPL
    snapshot = job.snapshot()
    now = manager.clock.now()
    for other in ("https://h/up/t.bin", "https://g/up/s.bin", "http://h/up/s.bin"):
        with pytest.raises(BitsError) as refused:
            cmd.decide(snapshot, cmd.SetRemoteName(0, other, refresh=True), now, manager.limits)
        assert refused.value.hresult == hresult.E_INVALIDARG
    same = cmd.SetRemoteName(0, "https://u@H/up/s.bin?sig=<redacted>&v=2", refresh=True)
    (changed,) = cmd.decide(snapshot, same, now, manager.limits)
    assert isinstance(changed, ev.RemoteNameChanged)


# -- the rules, on the store alone --------------------------------------------------------------


@pytest.fixture
def memory() -> Iterator[TransferManager]:
    m = TransferManager(open_store("memory:"), clock=ManualClock())
    yield m
    m.close()


def test_set_remote_name_keeps_the_password_only_for_the_same_user_host_and_port(
    tmp_path: Path, memory: TransferManager
) -> None:
    job = memory.create_job("j")
    job.add_files(
        [
            ("http://bob:pw-one@a.example:8080/x", tmp_path / "x"),
            ("http://bob:pw-one@a.example:8080/y", tmp_path / "y"),
            ("http://bob:pw-one@a.example:8080/z", tmp_path / "z"),
        ]
    )
    first = job.snapshot().files[0].spec.password
    assert isinstance(first, Sealed)
    assert memory.store.secrets.open(first) == "pw-one"

    job.set_remote_name(0, "http://bob@a.example:8080/x2")  # same login: kept
    job.set_remote_name(1, "http://bob@b.example:8080/y")  # another host: dropped
    job.set_remote_name(2, "http://bob:pw-two@b.example/z")  # given: the new one
    files = job.snapshot().files
    assert [f.remote_name for f in files] == [
        "http://bob@a.example:8080/x2",
        "http://bob@b.example:8080/y",
        "http://bob@b.example/z",
    ]
    assert files[0].spec.password == first
    assert files[1].spec.password is None
    assert files[2].spec.password is not None
    assert memory.store.secrets.open(files[2].spec.password) == "pw-two"

    assert job.replace_remote_prefix("http://bob@a.example:8080/", "http://carol:pw-3@c.example/")
    renamed = job.snapshot().files[0]
    assert renamed.remote_name == "http://carol@c.example/x2"
    assert renamed.spec.password is not None
    assert memory.store.secrets.open(renamed.spec.password) == "pw-3"


def test_a_new_name_keeps_the_signed_query_only_while_it_shows_the_same_one(
    tmp_path: Path, memory: TransferManager
) -> None:
    job = memory.create_job("j")
    job.add_files(
        [
            ("https://a.example/x?X-Amz-Signature=s1&X-Amz-Expires=60", tmp_path / "x"),
            ("https://a.example/y?sig=s2", tmp_path / "y"),
            ("https://a.example/z?sig=s3", tmp_path / "z"),
        ]
    )
    opened = memory.store.secrets.open
    first = job.snapshot().files[0]
    assert first.remote_name == "https://a.example/x?X-Amz-Signature=<redacted>&X-Amz-Expires=60"
    assert first.spec.query is not None
    assert opened(first.spec.query) == "X-Amz-Signature=s1&X-Amz-Expires=60"

    # Another host, the same query shown: a mirror of the same signed object keeps it.
    assert job.replace_remote_prefix("https://a.example/x", "https://b.example/x")
    job.set_remote_name(1, "https://a.example/y?sig=s2-new")  # signed anew: the new one
    job.set_remote_name(2, "https://a.example/z?page=1")  # another query, unsigned: none
    x, y, z = job.snapshot().files
    assert x.remote_name == "https://b.example/x?X-Amz-Signature=<redacted>&X-Amz-Expires=60"
    assert x.spec.query == first.spec.query
    assert y.remote_name == "https://a.example/y?sig=<redacted>"
    assert y.spec.query is not None and opened(y.spec.query) == "sig=s2-new"
    assert (z.remote_name, z.spec.query) == ("https://a.example/z?page=1", None)


def test_an_smb_url_whose_password_holds_a_slash_is_refused_unrecorded(home: Path) -> None:
    """'/' ends a URL's authority, so ``smb://alice:s3cr/et@host/...`` has no user info to
    move out: it was recorded whole, and the engine's error quoted it. AddFile refuses it,
    nothing recorded, the password nowhere (a '%2F' in its place is the way)."""
    with TransferManager(home=home) as manager:
        job = manager.create_job("smb")
        with pytest.raises(BitsError) as refused:
            job.add_file("smb://alice:s3cr/et@127.0.0.1/share/f.bin", home / "f.bin")
        assert refused.value.hresult == hresult.E_INVALIDARG
        assert "s3cr" not in str(refused.value)
        assert job.files() == []
        job.add_file("smb://alice:s3cr%2Fet@127.0.0.1/share/f.bin", home / "f.bin")
        assert job.files()[0].remote_name == "smb://127.0.0.1/share/f.bin"
    stored = b"".join(p.read_bytes() for p in home.iterdir() if p.name.startswith("backhaul.db"))
    assert b"s3cr" not in stored


def test_the_core_refuses_a_remote_name_that_still_holds_a_password(
    tmp_path: Path, memory: TransferManager
) -> None:
    job = memory.create_job("j")
    job.add_file("http://a.example/x", tmp_path / "x")
    for command in (
        cmd.AddFiles((FileSpec("http://u:secret@a.example/y", str(tmp_path / "y")),)),
        cmd.SetRemoteName(0, "http://u:secret@a.example/x"),
    ):
        with pytest.raises(BitsError) as refused:
            memory.execute(job.id, command)
        assert refused.value.hresult == hresult.E_INVALIDARG
        assert "secret" not in str(refused.value)
    with pytest.raises(BitsError) as refused:
        memory.execute(job.id, cmd.SetRemoteName(0, "http://a.example/x", Sealed("t")))
    assert refused.value.hresult == hresult.E_INVALIDARG  # a password needs a user to go with


def test_the_audit_hides_url_secrets_that_an_older_log_recorded_in_plain_text(
    tmp_path: Path, memory: TransferManager
) -> None:
    """Before FilesAdded v3 a URL's password and signature were stored as given: the audit
    output still never shows them."""
    job = memory.create_job("old")
    name = f"https://bob:{PASSWORD}@a.example/f?X-Amz-Signature={SIGNATURE}&n=1"
    old = ev.FilesAdded(memory.clock.now(), (FileSpec(name, str(tmp_path / "f")),))
    memory.store.append(job.id, job.snapshot().version, [old])  # as an older release wrote it

    text = audit.history_to_text(audit.history(memory.store, job.id))
    state = audit.state_at(memory.store, job.id, version=2)
    shown = state.to_text() + json.dumps(state.to_dict())

    for output in (text, shown):
        assert PASSWORD not in output and SIGNATURE not in output
    assert "https://bob:<redacted>@a.example/f?X-Amz-Signature=<redacted>&n=1" in text


def test_info_and_files_hide_url_secrets_that_an_older_log_recorded_in_plain_text(
    tmp_path: Path, home: Path
) -> None:
    """An older log's remote name and error description holding a URL's password and
    signature in plain text: ``backhaul files`` and ``info`` (text and JSON) show neither."""
    name = f"https://bob:{PASSWORD}@a.example/f?X-Amz-Signature={SIGNATURE}&n=1"
    with TransferManager(home=home) as m:
        job = m.create_job("old")
        old = ev.FilesAdded(m.clock.now(), (FileSpec(name, str(tmp_path / "f")),))
        m.store.append(job.id, job.snapshot().version, [old])  # as an older release wrote it
        job.resume()
        m.execute(job.id, cmd.StartTransfer())
        error = JobError(ErrorContext.REMOTE_FILE, hresult.E_ACCESSDENIED, f"refused: {name}", 0)
        m.execute(job.id, cmd.Fail(error, False))
        assert job.state is JobState.ERROR
    outputs = []
    for verb in ("files", "info"):
        for extra in ((), ("--json",)):
            out = io.StringIO()
            assert main(["--home", str(home), verb, job.id, *extra], out) == 0
            outputs.append(out.getvalue())
    for output in outputs:
        assert PASSWORD not in output and SIGNATURE not in output
    assert "https://bob:<redacted>@a.example/f?X-Amz-Signature=<redacted>&n=1" in outputs[0]
    assert "refused: https://bob:<redacted>@a.example/f" in outputs[2]
