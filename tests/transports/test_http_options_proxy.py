"""Proxies of the HTTP transport (bits-core.md §12) through a real squid: GET, a ranged resume,
HTTPS through CONNECT with a client certificate to nginx, proxy Basic auth (407 fatal when it
cannot be satisfied); PRECONFIG from the environment with curl's rules, NO_PROXY, OVERRIDE
lists with bypass entries and fail-over, and invalid lists as a fatal BG_E_INVALID_PROXY_INFO."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web
from peers.nginx import NginxServer, Pki
from peers.squid import SquidServer

from backhaul.adapters.certstore import CertificateStores
from backhaul.adapters.engine import Engine
from backhaul.adapters.manager import TransferManager
from backhaul.adapters.secret import SecretBox
from backhaul.core import hresult as hr
from backhaul.core.error import TransferError
from backhaul.core.port import Download, PlainCredentials, RequestOptions
from backhaul.core.value import ClientCertificate, ProxySettings
from backhaul.core.vocabulary import (
    AuthScheme,
    AuthTarget,
    CertStoreLocation,
    CostFlags,
    ErrorContext,
    JobState,
    ProxyUsage,
)
from backhaul.transports.http import HttpTransport, parse_bypass_list, parse_proxy_list

pytestmark = pytest.mark.peer
T = TypeVar("T")
U = ProxyUsage
CU = CertStoreLocation.CURRENT_USER


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


def override(proxies: str, bypass: str | None = None, **options: Any) -> RequestOptions:
    return RequestOptions(proxy=ProxySettings(int(U.OVERRIDE), proxies, bypass), **options)


def proxy_basic(user: str, password: str) -> PlainCredentials:
    return PlainCredentials(int(AuthTarget.PROXY), int(AuthScheme.BASIC), user, password)


def new_file(docroot: Path, data: bytes) -> str:
    name = f"p-{secrets.token_hex(6)}.bin"
    (docroot / name).write_bytes(data)
    return name


def get(url: str, options: RequestOptions, **transport: Any) -> bytes:
    async def body(t: HttpTransport) -> bytes:
        return await read_all(await t.open(url, options))

    return run(body, **transport)


def failure(url: str, options: RequestOptions, **transport: Any) -> TransferError:
    with pytest.raises(TransferError) as caught:
        get(url, options, **transport)
    return caught.value


def squid_saw(
    squid: SquidServer, needle: str, wait_for: int = 0
) -> list[tuple[str, str, str, str]]:
    """squid's log lines whose URL contains ``needle``; waits up to 2 s for ``wait_for`` of
    them (squid logs a transaction when it ends)."""
    deadline = time.monotonic() + 2.0
    while True:
        rows = [r for r in squid.access_lines() if needle in r[2]]
        if len(rows) >= wait_for or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


# -- through squid ---------------------------------------------------------------------------------


def test_a_get_and_a_ranged_resume_through_squid(
    nginx_server: tuple[NginxServer, Path], squid_server: SquidServer
) -> None:
    nginx, docroot = nginx_server
    data = bytes(range(256)) * 4096
    name = new_file(docroot, data)
    url = f"{nginx.url}/{name}"
    options = override(f"http={squid_server.url.removeprefix('http://')}")

    async def body(t: HttpTransport) -> tuple[bytes, int, bytes]:
        remote = await t.stat(url, options)
        whole = await read_all(await t.open(url, options))
        resumed = await t.open(url, options, offset=300_000, validator=remote.validator)
        return whole, resumed.offset, await read_all(resumed)

    whole, offset, tail = run(body)
    assert whole == data
    assert (offset, tail) == (300_000, data[300_000:])
    seen = squid_saw(squid_server, name, wait_for=3)
    assert [(r[1], r[3]) for r in seen] == [("HEAD", "200"), ("GET", "200"), ("GET", "206")]
    assert {r[0] for r in seen} == {str(squid_server.port)}
    ranges = [line["http_range"] for line in nginx.access_lines() if name in line["request"]]
    assert ranges == ["", "", "bytes=300000-"]


def test_https_through_connect_with_a_client_certificate_to_nginx(
    nginx_tls: NginxServer, squid_server: SquidServer, pki: Pki, tmp_path: Path
) -> None:
    stores = CertificateStores(tmp_path / "certs", SecretBox.ephemeral())
    stores.import_file(CU, "MY", pki.client_pem)
    cert = ClientCertificate(CU, "MY", sha1=pki.client_sha1)
    blob = (nginx_tls.docroot / "blob.bin").read_bytes()
    url = f"{nginx_tls.tls_url}/blob.bin"
    for proxy, credentials in (
        (squid_server.url, ()),
        (squid_server.auth_url, (proxy_basic(squid_server.user, squid_server.password),)),
    ):
        options = override(
            proxy.removeprefix("http://"), client_certificate=cert, credentials=credentials
        )

        async def body(t: HttpTransport, options: RequestOptions = options) -> tuple[str, bytes]:
            remote = await t.stat(url, options)
            resumed = await t.open(url, options, offset=1000, validator=remote.validator)
            assert resumed.offset == 1000
            return remote.headers or "", await read_all(resumed)

        headers, tail = run(body, ca_bundle=pki.ca_pem, certificates=stores)
        assert tail == blob[1000:]
        assert "X-Client-DN: CN=backhaul-alice" in headers
    tunnels = squid_saw(squid_server, f"127.0.0.1:{nginx_tls.tls_port}", wait_for=2)
    assert {(r[0], r[1], r[3]) for r in tunnels} >= {
        (str(squid_server.port), "CONNECT", "200"),
        (str(squid_server.auth_port), "CONNECT", "200"),
    }


def test_proxy_basic_auth_and_a_fatal_407(
    nginx_server: tuple[NginxServer, Path],
    nginx_tls: NginxServer,
    squid_server: SquidServer,
    pki: Pki,
) -> None:
    nginx, docroot = nginx_server
    name = new_file(docroot, b"behind an authenticating proxy\n")
    proxy = squid_server.auth_url.removeprefix("http://")
    good = (proxy_basic(squid_server.user, squid_server.password),)
    wrong = (proxy_basic(squid_server.user, "wrong"),)
    http_url, https_url = f"{nginx.url}/{name}", f"{nginx_tls.tls_url}/hello.txt"
    assert get(http_url, override(proxy, credentials=good)) == b"behind an authenticating proxy\n"
    for url in (http_url, https_url):
        for credentials in ((), wrong):
            error = failure(url, override(proxy, credentials=credentials), ca_bundle=pki.ca_pem)
            assert error.hresult == hr.BG_E_HTTP_ERROR_407 == 0x80190197
            assert error.transient is False
            assert error.context is ErrorContext.REMOTE_FILE
            assert "wrong" not in error.message
    # server credentials are not proxy credentials
    server_only = (
        PlainCredentials(int(AuthTarget.SERVER), int(AuthScheme.BASIC), "carol", "pr0xy"),
    )
    assert (
        failure(http_url, override(proxy, credentials=server_only)).hresult
        == hr.BG_E_HTTP_ERROR_407
    )


@contextlib.asynccontextmanager
async def tls_origin(pki: Pki, seen: list[Mapping[str, str]]) -> AsyncIterator[str]:
    """An HTTPS origin (certificate from pki.ca) that records the headers it receives."""

    async def handler(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.Response(text="origin\n")

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pki.server_pem, pki.server_key)
    app = web.Application()
    app.router.add_get("/o", handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock, ssl_context=ctx).start()
    try:
        yield f"https://127.0.0.1:{sock.getsockname()[1]}/o"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("with_credentials", [False, True])
def test_a_custom_proxy_authorization_goes_to_nobody_without_a_proxy(
    pki: Pki, with_credentials: bool
) -> None:
    seen: list[Mapping[str, str]] = []
    server = PlainCredentials(int(AuthTarget.SERVER), int(AuthScheme.BASIC), "u", "p")
    options = RequestOptions(
        custom_headers=(("Proxy-Authorization", "Basic c2VjcmV0OnNlY3JldA=="), ("X-Job", "42")),
        credentials=(server,) if with_credentials else (),
    )

    async def body(t: HttpTransport) -> bytes:
        async with tls_origin(pki, seen) as url:
            return await read_all(await t.open(url, options))

    assert run(body, ca_bundle=pki.ca_pem) == b"origin\n"
    received = {k.lower(): v for k, v in seen[0].items()}
    assert received["x-job"] == "42" and "proxy-authorization" not in received
    assert ("authorization" in received) is with_credentials


def test_proxy_credentials_never_travel_inside_the_tunnel(
    squid_server: SquidServer, pki: Pki
) -> None:
    seen: list[Mapping[str, str]] = []
    good = (proxy_basic(squid_server.user, squid_server.password),)
    options = override(squid_server.auth_url.removeprefix("http://"), credentials=good)

    async def body(t: HttpTransport) -> bytes:
        async with tls_origin(pki, seen) as url:
            return await read_all(await t.open(url, options))

    assert run(body, ca_bundle=pki.ca_pem) == b"origin\n"
    assert len(seen) == 1
    assert not {k.lower() for k in seen[0]} & {"proxy-authorization", "authorization"}


def test_an_engine_job_through_the_authenticating_proxy(
    nginx_server: tuple[NginxServer, Path], squid_server: SquidServer, tmp_path: Path
) -> None:
    nginx, docroot = nginx_server
    data = bytes(range(256)) * 1024
    name = new_file(docroot, data)
    proxy = squid_server.auth_url.removeprefix("http://")
    with TransferManager("memory:") as manager:
        good, bad = manager.create_job("good"), manager.create_job("bad")
        for job, password in ((good, squid_server.password), (bad, "wrong")):
            job.add_file(f"{nginx.url}/{name}", tmp_path / f"{job.display_name}.bin")
            job.set_proxy_settings(U.OVERRIDE, proxy, "<local>")
            job.set_credentials(AuthTarget.PROXY, AuthScheme.BASIC, squid_server.user, password)
            job.resume()
        transport = HttpTransport(stall_timeout=5)
        engine = Engine(
            manager,
            transports={"http": transport},
            poll_interval=0.02,
            checkpoint_interval=0.03,
            yield_bandwidth=False,
        )
        engine.network_probe = lambda: True  # type: ignore[method-assign]
        engine.cost_probe = lambda: int(CostFlags.UNRESTRICTED)  # type: ignore[method-assign]
        asyncio.run(asyncio.wait_for(engine.run(until_idle=True), 60))
        assert good.state is JobState.TRANSFERRED, good.error
        good.complete()
        assert (tmp_path / "good.bin").read_bytes() == data
        assert bad.state is JobState.ERROR
        assert bad.error is not None and bad.error.hresult == hr.BG_E_HTTP_ERROR_407
    assert [r[3] for r in squid_saw(squid_server, name, wait_for=2)].count("200") >= 1


# -- choosing the proxy ----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def via_origin() -> AsyncIterator[tuple[int, list[bool]]]:
    """A plain-HTTP origin that records, per request, whether a proxy carried it (squid adds a
    Via header)."""
    vias: list[bool] = []

    async def handler(request: web.Request) -> web.Response:
        vias.append("Via" in request.headers)
        return web.Response(text="origin\n")

    app = web.Application()
    app.router.add_get("/o", handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    try:
        yield sock.getsockname()[1], vias
    finally:
        await runner.cleanup()


def carried(options: RequestOptions, environ: Mapping[str, str], host: str = "127.0.0.1") -> bool:
    """Fetch from a fresh origin; True if a proxy carried the request."""

    async def body(t: HttpTransport) -> bool:
        async with via_origin() as (port, vias):
            assert await read_all(await t.open(f"http://{host}:{port}/o", options)) == b"origin\n"
            return vias == [True]

    return run(body, environ=environ)


def test_preconfig_follows_the_environment_like_curl(squid_server: SquidServer) -> None:
    host_port = squid_server.url.removeprefix("http://")
    preconfig, autodetect = RequestOptions(), RequestOptions(proxy=ProxySettings(int(U.AUTODETECT)))
    direct = RequestOptions(proxy=ProxySettings(int(U.NO_PROXY)))
    assert not carried(preconfig, {})
    assert carried(preconfig, {"http_proxy": squid_server.url})
    assert carried(autodetect, {"http_proxy": host_port})  # no scheme: http; AUTODETECT = env
    assert carried(preconfig, {"ALL_PROXY": squid_server.url})
    assert not carried(preconfig, {"HTTP_PROXY": squid_server.url})  # curl ignores it too
    assert not carried(preconfig, {"https_proxy": squid_server.url})  # for https:// only
    assert not carried(direct, {"http_proxy": squid_server.url})
    for no_proxy in ("127.0.0.1", "*", "example.org, 127.0.0.0/8", ".0.0.1"):
        env = {"http_proxy": squid_server.url, "NO_PROXY": no_proxy}
        assert carried(preconfig, env) is (no_proxy == ".0.0.1"), no_proxy


def test_override_lists_bypass_and_fail_over(squid_server: SquidServer) -> None:
    squid = squid_server.url.removeprefix("http://")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"  # nothing listens there
    env: dict[str, str] = {"http_proxy": "http://127.0.0.1:1"}  # OVERRIDE ignores it
    assert carried(override(squid), env)
    assert carried(override(f"https=127.0.0.1:1 {squid}"), env)  # the default entry
    assert not carried(override(f"https={squid}"), env)  # none for http: direct
    assert carried(override(f"http=http://{squid}", "*.example.org"), env)
    assert not carried(override(squid, "127.0.0.1"), env)
    assert not carried(override(squid, "*.0.0.1 other"), env)
    assert not carried(override(squid, "<local>"), env, host="localhost")
    assert carried(override(squid, "<local>"), env)  # 127.0.0.1 has dots
    assert carried(override(f"http={dead} http={squid}"), env)  # fail-over
    with pytest.raises(TransferError) as caught:
        carried(override(dead), env)
    assert (caught.value.hresult, caught.value.transient) == (hr.BG_E_CONNECT_FAILURE, True)


@pytest.mark.parametrize(
    ("proxies", "bypass", "environ"),
    [
        ("127.0.0.1:99999", None, None),
        ("ftp=127.0.0.1:3128", None, None),
        ("socks://127.0.0.1:1080", None, None),
        ("http=", None, None),
        ("a_b$c:80", None, None),
        ("127.0.0.1:3128", "a/b", None),
        ("127.0.0.1:3128", "aaa.*", None),
        (None, None, {"http_proxy": "socks5://127.0.0.1:1080"}),
        (None, None, {"http_proxy": "http://127.0.0.1:70000"}),
    ],
)
def test_invalid_lists_at_run_time_are_a_fatal_invalid_proxy_info(
    nginx_server: tuple[NginxServer, Path],
    proxies: str | None,
    bypass: str | None,
    environ: dict[str, str] | None,
) -> None:
    nginx, _ = nginx_server
    options = override(proxies, bypass) if proxies is not None else RequestOptions()
    error = failure(f"{nginx.url}/hello.txt", options, environ=environ or {})
    assert error.hresult == hr.BG_E_INVALID_PROXY_INFO == 0x8020003F
    assert error.transient is False


def test_the_list_parsers() -> None:
    entries = parse_proxy_list("http=p1:8080  https=https://p2 p3 [::1]:3128")
    assert [(e.scheme, e.url.scheme, e.url.host, e.url.port) for e in entries] == [
        ("http", "http", "p1", 8080),
        ("https", "https", "p2", 443),
        (None, "http", "p3", 80),
        (None, "http", "::1", 3128),
    ]
    assert parse_bypass_list("*.Example.ORG <local> 10.0.0.1 host:8080") == (
        "*.example.org",
        "<local>",
        "10.0.0.1",
        "host:8080",
    )
    for bad in ("", "   ", "x=p", "p:0", "[zz]:1", "http://", "p:80:80"):
        with pytest.raises(ValueError):
            parse_proxy_list(bad)
    for bad in ("*", "a*b", "*.", "a=b"):
        with pytest.raises(ValueError):
            parse_bypass_list(bad)
