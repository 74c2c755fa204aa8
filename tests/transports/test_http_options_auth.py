"""Server credentials of the HTTP transport (bits-core.md §11): Basic against a real nginx,
Digest against a real apache2 (mod_auth_digest), Digest's SHA-256 / -sess / stale nonces and
NTLM / Negotiate against small aiohttp servers (pyspnego on the server side), the scheme
preference, and 401 as a fatal BG_E_HTTP_ERROR_401 whenever credentials cannot satisfy it."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import spnego
from aiohttp import web
from peers.apache import ApacheServer
from peers.nginx import BASIC_PASSWORD, BASIC_USER, NginxServer

from backhaul.core import hresult as hr
from backhaul.core.error import TransferError
from backhaul.core.port import Download, PlainCredentials, RequestOptions
from backhaul.core.vocabulary import AuthScheme, AuthTarget, ErrorContext
from backhaul.transports.http import HttpTransport

T = TypeVar("T")
DATA = b"authenticated\n" * 50
SERVER = AuthTarget.SERVER


def run(body: Callable[[HttpTransport], Awaitable[T]], **kwargs: Any) -> T:
    async def main() -> T:
        transport = HttpTransport(**kwargs)
        try:
            return await body(transport)
        finally:
            await transport.close()

    return asyncio.run(main())


async def read_all(download: Download) -> bytes:
    try:
        return b"".join([chunk async for chunk in download])
    finally:
        await download.aclose()


def creds(scheme: AuthScheme, user: str | None, password: str | None) -> PlainCredentials:
    return PlainCredentials(int(SERVER), int(scheme), user, password)


def fetch_twice(url: str, options: RequestOptions) -> list[bytes]:
    async def body(t: HttpTransport) -> list[bytes]:
        await t.stat(url, options)
        return [await read_all(await t.open(url, options)) for _ in range(2)]

    return run(body)


def refused(url: str, options: RequestOptions) -> TransferError:
    async def body(t: HttpTransport) -> None:
        await t.open(url, options)

    with pytest.raises(TransferError) as caught:
        run(body)
    return caught.value


def assert_401(error: TransferError) -> None:
    assert error.hresult == hr.BG_E_HTTP_ERROR_401 == 0x80190191
    assert error.context is ErrorContext.REMOTE_FILE
    assert error.transient is False


# -- Basic against nginx ---------------------------------------------------------------------------


@pytest.mark.peer
def test_basic_against_nginx(nginx_tls: NginxServer) -> None:
    url = f"{nginx_tls.url}/private/secret.txt"
    good = RequestOptions(credentials=(creds(AuthScheme.BASIC, BASIC_USER, BASIC_PASSWORD),))
    assert fetch_twice(url, good) == [b"top secret\n"] * 2
    assert_401(refused(url, RequestOptions()))
    wrong = RequestOptions(credentials=(creds(AuthScheme.BASIC, BASIC_USER, "wrong"),))
    error = refused(url, wrong)
    assert_401(error)
    assert "wrong" not in error.message
    # proxy credentials are not server credentials
    proxy_only = PlainCredentials(int(AuthTarget.PROXY), int(AuthScheme.BASIC), BASIC_USER, "x")
    assert_401(refused(url, RequestOptions(credentials=(proxy_only,))))
    # the application's own Authorization header wins: nothing is answered for it
    own = RequestOptions(
        custom_headers=(("Authorization", "Basic bm9ib2R5Om5vbmU="),),
        credentials=(creds(AuthScheme.BASIC, BASIC_USER, BASIC_PASSWORD),),
    )
    assert_401(refused(url, own))
    statuses = [
        line["status"] for line in nginx_tls.access_lines() if "/private/" in line["request"]
    ]
    assert statuses[:3] == ["200", "200", "200"]


# -- Digest against apache2 ------------------------------------------------------------------------


@pytest.mark.peer
def test_digest_against_apache_reuses_the_nonce_preemptively(apache_server: ApacheServer) -> None:
    name = "digest/d-reuse.bin"
    (apache_server.docroot / name).write_bytes(DATA)
    url = f"{apache_server.url}/{name}"
    user, password = apache_server.digest_user, apache_server.digest_password
    options = RequestOptions(credentials=(creds(AuthScheme.DIGEST, user, password),))
    assert fetch_twice(url, options) == [DATA, DATA]
    rows = apache_server.access_lines(wait_for=4, matching=name)
    # one challenge, then HEAD and two GETs answered with the same nonce (nc 1, 2, 3)
    assert [(r[0], r[1].split()[0], r[2]) for r in rows] == [
        ("-", "HEAD", "401"),
        (user, "HEAD", "200"),
        (user, "GET", "200"),
        (user, "GET", "200"),
    ]


@pytest.mark.peer
def test_digest_against_apache_wrong_or_unusable_credentials_are_a_fatal_401(
    apache_server: ApacheServer,
) -> None:
    name = "digest/d-wrong.bin"
    (apache_server.docroot / name).write_bytes(DATA)
    url = f"{apache_server.url}/{name}"
    user = apache_server.digest_user
    wrong = RequestOptions(credentials=(creds(AuthScheme.DIGEST, user, "wrong"),))
    assert_401(refused(url, wrong))
    basic_only = RequestOptions(credentials=(creds(AuthScheme.BASIC, user, "d1gest"),))
    assert_401(refused(url, basic_only))  # apache offers Digest only
    rows = [r[2] for r in apache_server.access_lines(wait_for=3, matching=name)]
    assert rows == ["401", "401", "401"]  # challenge, refused answer; Basic: one request


# -- Digest details against a small server ---------------------------------------------------------


@contextlib.asynccontextmanager
async def serving(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        await runner.cleanup()


def _digest_params(header: str) -> dict[str, str]:
    return {
        m[0].lower(): m[1] if m[1] else m[2]
        for m in re.findall(
            r'(\w+)=(?:"((?:[^"\\]|\\.)*)"|([^,\s]+))', header.removeprefix("Digest ")
        )
    }


@pytest.mark.parametrize("algorithm", ["SHA-256", "MD5-sess", "SHA-256-sess"])
def test_digest_algorithms_and_a_stale_nonce(algorithm: str) -> None:
    """A server (RFC 7616 checked independently here) that marks its first nonce stale after
    one use: the client answers the stale challenge once more without failing."""
    h = hashlib.sha256 if algorithm.startswith("SHA-256") else hashlib.md5
    nonces = ["n-one", "n-two"]
    log: list[str] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        header = request.headers.get("Authorization", "")
        challenge = f'Digest realm="r", qop="auth", algorithm={algorithm}, opaque="o"'
        if not header.startswith("Digest "):
            log.append("challenge")
            return web.Response(
                status=401, headers={"WWW-Authenticate": f'{challenge}, nonce="{nonces[0]}"'}
            )
        p = _digest_params(header)

        def hx(text: str) -> str:
            return h(text.encode()).hexdigest()

        ha1 = hx(f"{p['username']}:r:pw")
        if algorithm.endswith("-sess"):
            ha1 = hx(f"{ha1}:{p['nonce']}:{p['cnonce']}")
        ha2 = hx(f"{request.method}:{request.path_qs}")
        good = hx(f"{ha1}:{p['nonce']}:{p['nc']}:{p['cnonce']}:auth:{ha2}")
        assert p["uri"] == request.path_qs and p["opaque"] == "o" and p["algorithm"] == algorithm
        if p["response"] != good:
            log.append("bad")
            return web.Response(status=401, headers={"WWW-Authenticate": f'{challenge}, nonce="x"'})
        if p["nonce"] == "n-one" and p["nc"] != "00000001":
            nonces[0] = "n-two"
            log.append("stale")
            stale = f'{challenge}, nonce="n-two", stale=true'
            return web.Response(status=401, headers={"WWW-Authenticate": stale})
        log.append(f"ok {p['nonce']} {p['nc']}")
        return web.Response(body=DATA)

    options = RequestOptions(credentials=(creds(AuthScheme.DIGEST, "u", "pw"),))

    async def body(t: HttpTransport) -> list[bytes]:
        async with serving(handler) as base:
            return [await read_all(await t.open(f"{base}/f?x=1", options)) for _ in range(3)]

    assert run(body) == [DATA] * 3
    assert log == [
        "challenge",
        "ok n-one 00000001",
        "stale",
        "ok n-two 00000001",
        "ok n-two 00000002",
    ]


def test_digest_a_forgotten_cached_nonce_gets_a_real_answer_only_its_refusal_is_final() -> None:
    """The nonce reused preemptively is unknown to a server that restarted: it challenges
    afresh, without stale=true. Right credentials answer that challenge and succeed; wrong ones
    (the password changed meanwhile) are refused once more, and that refusal is the 401."""
    nonces: set[str] = set()
    password = ["pw"]
    log: list[str] = []

    def challenge() -> web.Response:
        nonce = f"n{len(log)}"
        nonces.add(nonce)
        header = f'Digest realm="r", qop="auth", nonce="{nonce}"'
        return web.Response(status=401, headers={"WWW-Authenticate": header})

    async def handler(request: web.Request) -> web.StreamResponse:
        header = request.headers.get("Authorization", "")
        if not header.startswith("Digest "):
            log.append("challenge")
            return challenge()
        p = _digest_params(header)
        if p["nonce"] not in nonces:
            log.append(f"unknown {p['nonce']}")
            return challenge()

        def md5(text: str) -> str:
            return hashlib.md5(text.encode()).hexdigest()

        ha1, ha2 = md5(f"{p['username']}:r:{password[0]}"), md5(f"{request.method}:{p['uri']}")
        if p["response"] != md5(f"{ha1}:{p['nonce']}:{p['nc']}:{p['cnonce']}:auth:{ha2}"):
            log.append(f"bad {p['nonce']}")
            return challenge()
        log.append(f"ok {p['nonce']}")
        return web.Response(body=DATA)

    options = RequestOptions(credentials=(creds(AuthScheme.DIGEST, "u", "pw"),))

    async def body(t: HttpTransport) -> tuple[list[bytes], TransferError]:
        async with serving(handler) as base:
            got = [await read_all(await t.open(f"{base}/f", options))]
            nonces.clear()  # the server restarts
            got.append(await read_all(await t.open(f"{base}/f", options)))
            nonces.clear()
            password[0] = "changed"
            with pytest.raises(TransferError) as caught:
                await t.open(f"{base}/f", options)
            return got, caught.value

    got, error = run(body)
    assert got == [DATA, DATA]
    assert log == [
        "challenge",
        "ok n1",
        "unknown n1",  # preemptive, with the forgotten nonce
        "ok n3",  # the real answer to the fresh challenge
        "unknown n3",
        "bad n5",  # the real answer, refused: final
    ]
    assert_401(error)


# -- NTLM and Negotiate against pyspnego -----------------------------------------------------------


@pytest.fixture
def ntlm_users(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    users = tmp_path / "ntlm-users"
    users.write_text("DOM:alice:s3cret\n")
    monkeypatch.setenv("NTLM_USER_FILE", str(users))


def spnego_server(
    offers: tuple[str, ...], log: list[str]
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """A server that authenticates connections with pyspnego (as IIS does)."""
    contexts: dict[int, Any] = {}

    def challenge() -> web.Response:
        headers = [("WWW-Authenticate", o) for o in offers]
        return web.Response(status=401, text="who are you?", headers=headers)  # type: ignore[arg-type]

    async def handler(request: web.Request) -> web.StreamResponse:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        connection = id(request.transport)
        if scheme.lower() not in ("ntlm", "negotiate") or not token:
            log.append(f"{request.method} challenge")
            return challenge()
        ctx = contexts.setdefault(connection, spnego.server(protocol=scheme.lower()))
        try:
            out = ctx.step(base64.b64decode(token))
        except Exception:
            contexts.pop(connection, None)
            log.append(f"{request.method} {scheme} refused")
            return challenge()
        if not ctx.complete:
            log.append(f"{request.method} {scheme} leg on {connection}")
            assert out is not None
            return web.Response(
                status=401,
                text="go on",
                headers={"WWW-Authenticate": f"{scheme} {base64.b64encode(out).decode()}"},
            )
        contexts.pop(connection, None)
        log.append(f"{request.method} {scheme} done on {connection} as {ctx.client_principal}")
        return web.Response(body=DATA)

    return handler


@pytest.mark.usefixtures("ntlm_users")
@pytest.mark.parametrize("scheme", [AuthScheme.NTLM, AuthScheme.NEGOTIATE])
def test_ntlm_and_negotiate_handshakes_stay_on_one_connection(scheme: AuthScheme) -> None:
    log: list[str] = []
    name = "NTLM" if scheme is AuthScheme.NTLM else "Negotiate"
    handler = spnego_server((name, 'Basic realm="r"'), log)
    options = RequestOptions(credentials=(creds(scheme, "DOM\\alice", "s3cret"),))

    async def body(t: HttpTransport) -> bytes:
        async with serving(handler) as base:
            await t.stat(f"{base}/f", options)
            return await read_all(await t.open(f"{base}/f", options))

    assert run(body) == DATA
    legs = [line for line in log if " leg on " in line or " done on " in line]
    assert len(legs) == 4  # HEAD: leg + done; GET: leg + done
    for leg, done in zip(legs[::2], legs[1::2], strict=True):
        assert leg.split(" on ")[1] == done.split(" on ")[1].split(" as ")[0]  # same connection
        assert done.endswith("as DOM\\alice")


@pytest.mark.usefixtures("ntlm_users")
def test_the_strongest_offered_scheme_with_credentials_is_used_and_wrong_ones_are_fatal() -> None:
    log: list[str] = []
    handler = spnego_server(
        ("Negotiate", "NTLM", 'Digest realm="r", nonce="n"', 'Basic realm="r"'), log
    )
    both = RequestOptions(
        credentials=(
            creds(AuthScheme.BASIC, "alice", "s3cret"),
            creds(AuthScheme.NTLM, "DOM\\alice", "s3cret"),
        )
    )

    async def body(t: HttpTransport, options: RequestOptions) -> bytes:
        async with serving(handler) as base:
            return await read_all(await t.open(f"{base}/f", options))

    # Basic is sent preemptively (challenge), then NTLM is chosen over Basic
    assert run(lambda t: body(t, both)) == DATA
    assert [line.split(" on ")[0] for line in log] == [
        "GET challenge",
        "GET NTLM leg",
        "GET NTLM done",
    ]
    log.clear()
    wrong = RequestOptions(credentials=(creds(AuthScheme.NTLM, "DOM\\alice", "wrong"),))
    with pytest.raises(TransferError) as caught:
        run(lambda t: body(t, wrong))
    assert_401(caught.value)
    assert [line.split(" on ")[0] for line in log] == [
        "GET challenge",
        "GET NTLM leg",
        "GET NTLM refused",
    ]


# -- the command's --user ---------------------------------------------------------------------------


@pytest.mark.peer
def test_get_user_logs_in_by_digest_and_basic_and_the_password_stays_sealed(
    apache_server: ApacheServer,
    nginx_tls: NginxServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`get --user USER:PASSWORD` (curl's -u) answers apache's Digest challenge; `--user
    USER` reads the password from stdin when stdin is no terminal, and answers nginx's
    Basic one; a wrong password is the server's fatal 401. No password reaches the store's
    files in plain text, nor the messages."""
    from backhaul.adapters.cli import main

    monkeypatch.delenv("BACKHAUL_STORE", raising=False)
    home = tmp_path / "home"
    name = "digest/d-cli.bin"
    (apache_server.docroot / name).write_bytes(DATA)
    user, password = apache_server.digest_user, apache_server.digest_password
    login = f"{user}:{password}"
    get = ["--home", str(home), "get", "-q"]
    assert main([*get, "--user", login, f"{apache_server.url}/{name}", str(tmp_path / "d")]) == 0
    assert (tmp_path / "d").read_bytes() == DATA

    monkeypatch.setattr("sys.stdin", io.StringIO(f"{BASIC_PASSWORD}\n"))
    secret = f"{nginx_tls.url}/private/secret.txt"
    assert main([*get, "--user", BASIC_USER, secret, str(tmp_path / "s")]) == 0
    assert (tmp_path / "s").read_text() == "top secret\n"

    # --user wins over a login in the URL, as curl's -u does (aiohttp refused the pair).
    in_url = secret.replace("://", "://mallory:in-the-url@", 1)
    login = f"{BASIC_USER}:{BASIC_PASSWORD}"
    assert main([*get, "--user", login, in_url, str(tmp_path / "u")]) == 0
    assert (tmp_path / "u").read_text() == "top secret\n"

    assert main([*get, "--user", f"{BASIC_USER}:not-it", secret, str(tmp_path / "w")]) == 1
    err = capsys.readouterr().err
    assert "BG_E_HTTP_ERROR_401" in err and "not-it" not in err
    stored = b"".join(p.read_bytes() for p in home.iterdir() if p.name.startswith("backhaul.db"))
    for plain in (password, BASIC_PASSWORD, "not-it", "in-the-url"):
        assert plain.encode() not in stored


@pytest.mark.peer
def test_get_header_goes_with_every_request_and_stays_sealed(
    nginx_tls: NginxServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`get -H 'NAME: VALUE'` (curl's -H) is the job's custom headers: nginx's Basic area
    takes an Authorization header given that way. A header that is not 'NAME: VALUE' is
    refused before any job is made, without echoing it."""
    from backhaul.adapters.cli import main
    from backhaul.adapters.manager import TransferManager

    monkeypatch.delenv("BACKHAUL_STORE", raising=False)
    home = tmp_path / "home"
    token = base64.b64encode(f"{BASIC_USER}:{BASIC_PASSWORD}".encode()).decode()
    secret = f"{nginx_tls.url}/private/secret.txt"
    get = ["--home", str(home), "get", "-q"]
    header = f"Authorization: Basic {token}"
    assert main([*get, "-H", "X-Trace: 1", "-H", header, secret, str(tmp_path / "s")]) == 0
    assert (tmp_path / "s").read_text() == "top secret\n"
    stored = b"".join(p.read_bytes() for p in home.iterdir() if p.name.startswith("backhaul.db"))
    assert token.encode() not in stored
    capsys.readouterr()
    assert main([*get, "-H", f"Bearer{token}", secret, str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--header wants 'NAME: VALUE'" in err and token not in err
    with TransferManager(home=home) as manager:
        assert len(list(manager.jobs(include_final=True))) == 1  # only the first get's

    # -H @FILE (curl's): the token from a file, never in the command line; @- reads stdin.
    headers = tmp_path / "headers"
    headers.write_text(f"X-Trace: 2\r\n\n{header}\n")
    assert main([*get, "-H", f"@{headers}", secret, str(tmp_path / "f")]) == 0
    assert (tmp_path / "f").read_text() == "top secret\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(header + "\n"))
    assert main([*get, "-H", "@-", secret, str(tmp_path / "i")]) == 0
    assert (tmp_path / "i").read_text() == "top secret\n"
    capsys.readouterr()
    assert main([*get, "-H", f"@{tmp_path / 'none'}", secret, str(tmp_path / "n")]) == 2
    assert "No such file" in capsys.readouterr().err
    stored = b"".join(p.read_bytes() for p in home.iterdir() if p.name.startswith("backhaul.db"))
    assert token.encode() not in stored
