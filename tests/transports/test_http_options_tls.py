"""Server-certificate policy of the HTTP transport: the BG_SSL_* security flags as Python's ssl
allows them (each ignores its own fault and nothing else), the CRL check, a CA bundle per job,
the server-certificate callback (through the transport and the engine), the response-header
block with its status line, and the custom HTTP method (bits-core.md §10)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pytest
import trustme
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from backhaul.adapters.engine import Engine
from backhaul.adapters.manager import TransferManager
from backhaul.core import hresult as hr
from backhaul.core.error import TransferError
from backhaul.core.port import Download, RequestOptions
from backhaul.core.vocabulary import CostFlags, ErrorContext, JobState, SecurityFlags
from backhaul.transports.http import (
    CERT_REVOCATION_FAILED,
    CERT_REVOKED,
    SECURE_FAILURE,
    HttpTransport,
    ServerCertificateValidator,
)

T = TypeVar("T")
F = SecurityFlags
DATA = b"certificate policy\n" * 100
NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)


@attrs.frozen
class JobOptions(RequestOptions):
    """RequestOptions with the fields proposed for core/port.py (the transport reads them with
    getattr, so it works before the core has them)."""

    ca_bundle: str | None = None
    server_certificate_validator: ServerCertificateValidator | None = attrs.field(
        default=None, eq=False
    )


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


# -- certificates ----------------------------------------------------------------------------------


@attrs.frozen
class Issuer:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def of(cls, ca: trustme.CA) -> Issuer:
        key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cls(x509.load_pem_x509_certificate(ca.cert_pem.bytes()), key)


def server_cert(
    issuer: Issuer,
    directory: Path,
    *,
    names: tuple[str, ...] = ("127.0.0.1",),
    valid: tuple[datetime.datetime, datetime.datetime] = (NOW - DAY, NOW + DAY),
    usage: tuple[x509.ObjectIdentifier, ...] = (ExtendedKeyUsageOID.SERVER_AUTH,),
) -> ssl.SSLContext:
    """A TLS server context with a certificate signed by ``issuer``."""
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test server")]))
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(list(usage)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
        .sign(issuer.key, hashes.SHA256())
    )
    pem = directory / f"server-{cert.serial_number}.pem"
    pem.write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pem)
    ctx.serial = cert.serial_number  # type: ignore[attr-defined]
    return ctx


def bundle(path: Path, issuer: Issuer, *, revoked: tuple[int, ...] | None = None) -> str:
    """A CA bundle: the issuer's certificate, plus a current CRL when ``revoked`` is given."""
    data = issuer.cert.public_bytes(serialization.Encoding.PEM)
    if revoked is not None:
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(issuer.cert.subject)
            .last_update(NOW - DAY)
            .next_update(NOW + DAY)
        )
        for serial in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(NOW - DAY)
                .build()
            )
        data += builder.sign(issuer.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
    path.write_bytes(data)
    return str(path)


@pytest.fixture(scope="module")
def issuers() -> tuple[Issuer, Issuer]:
    return Issuer.of(trustme.CA()), Issuer.of(trustme.CA())


# -- servers ---------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serving(
    ctx: ssl.SSLContext, seen: list[str] | None = None, *, close: bool = False
) -> AsyncIterator[str]:
    """An HTTPS aiohttp.web server for DATA at /f; yields its base URL; ``seen`` collects the
    request methods (and Range headers)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        if seen is not None:
            seen.append(f"{request.method} {request.headers.get('Range', '')}".strip())
        headers = {"ETag": '"v1"', "Connection": "close"} if close else {"ETag": '"v1"'}
        return web.Response(body=DATA, headers=headers)

    app = web.Application()
    app.router.add_route("*", "/f", handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    site = web.SockSite(runner, sock, ssl_context=ctx)
    await site.start()
    try:
        yield f"https://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        await runner.cleanup()


def fetch(ctx: ssl.SSLContext, options: RequestOptions, **transport: Any) -> bytes:
    async def body(t: HttpTransport) -> bytes:
        async with serving(ctx) as base:
            return await read_all(await t.open(f"{base}/f", options))

    return run(body, **transport)


def refusal(ctx: ssl.SSLContext, options: RequestOptions, **transport: Any) -> TransferError:
    with pytest.raises(TransferError) as caught:
        fetch(ctx, options, **transport)
    return caught.value


# -- the security flags ----------------------------------------------------------------------------

ALL_IGNORES = (
    F.IGNORE_CERT_CN_INVALID
    | F.IGNORE_CERT_DATE_INVALID
    | F.IGNORE_UNKNOWN_CA
    | F.IGNORE_CERT_WRONG_USAGE
)


@pytest.mark.parametrize(
    ("fault", "flag"),
    [
        ("wrong host", F.IGNORE_CERT_CN_INVALID),
        ("expired", F.IGNORE_CERT_DATE_INVALID),
        ("not yet valid", F.IGNORE_CERT_DATE_INVALID),
        ("unknown CA", F.IGNORE_UNKNOWN_CA),
        ("client-only usage", F.IGNORE_CERT_WRONG_USAGE),
    ],
)
def test_each_ignore_flag_forgives_its_own_fault_and_nothing_else(
    issuers: tuple[Issuer, Issuer], tmp_path: Path, fault: str, flag: SecurityFlags
) -> None:
    trusted, stranger = issuers
    kwargs: dict[str, Any] = {}
    if fault == "wrong host":
        kwargs["names"] = ("other.example",)
    elif fault == "expired":
        kwargs["valid"] = (NOW - 3 * DAY, NOW - DAY)
    elif fault == "not yet valid":
        kwargs["valid"] = (NOW + DAY, NOW + 3 * DAY)
    elif fault == "client-only usage":
        kwargs["usage"] = (ExtendedKeyUsageOID.CLIENT_AUTH,)
    ctx = server_cert(stranger if fault == "unknown CA" else trusted, tmp_path, **kwargs)
    ca = bundle(tmp_path / "ca.pem", trusted)
    # strict by default
    error = refusal(ctx, RequestOptions(), ca_bundle=ca)
    assert (error.hresult, error.context, error.transient) == (
        SECURE_FAILURE,
        ErrorContext.GENERAL_TRANSPORT,
        False,
    )
    # its own flag forgives it
    assert fetch(ctx, RequestOptions(security_flags=flag), ca_bundle=ca) == DATA
    # every other flag together does not
    others = RequestOptions(security_flags=ALL_IGNORES & ~flag)
    assert refusal(ctx, others, ca_bundle=ca).hresult == SECURE_FAILURE


@pytest.mark.parametrize(
    "flags",
    [0, *(int(f) for f in (F.IGNORE_UNKNOWN_CA, F.IGNORE_CERT_WRONG_USAGE)), int(ALL_IGNORES)],
)
def test_a_good_certificate_passes_under_any_flags(
    issuers: tuple[Issuer, Issuer], tmp_path: Path, flags: int
) -> None:
    ctx = server_cert(issuers[0], tmp_path)
    assert (
        fetch(
            ctx,
            RequestOptions(security_flags=flags),
            ca_bundle=bundle(tmp_path / "ca.pem", issuers[0]),
        )
        == DATA
    )


def test_the_crl_check_uses_the_crls_of_the_trust_store(
    issuers: tuple[Issuer, Issuer], tmp_path: Path
) -> None:
    trusted = issuers[0]
    ctx = server_cert(trusted, tmp_path)
    serial = ctx.serial  # type: ignore[attr-defined]
    crl = RequestOptions(security_flags=F.ENABLE_CRL_CHECK)
    no_crl = bundle(tmp_path / "plain.pem", trusted)
    assert fetch(ctx, RequestOptions(), ca_bundle=no_crl) == DATA  # no check asked: fine
    unknown = refusal(ctx, crl, ca_bundle=no_crl)
    assert (unknown.hresult, unknown.transient) == (CERT_REVOCATION_FAILED, False)
    assert CERT_REVOCATION_FAILED == 0x80072F19
    current = bundle(tmp_path / "crl-ok.pem", trusted, revoked=(serial + 1,))
    assert fetch(ctx, crl, ca_bundle=current) == DATA
    revoking = bundle(tmp_path / "crl-revoked.pem", trusted, revoked=(serial,))
    revoked = refusal(ctx, crl, ca_bundle=revoking)
    assert (revoked.hresult, revoked.transient) == (CERT_REVOKED, False)
    assert CERT_REVOKED == 0x80072F8A
    # with OpenSSL's verification off there is no CRL check: it fails closed
    blind = RequestOptions(security_flags=F.ENABLE_CRL_CHECK | F.IGNORE_UNKNOWN_CA)
    assert refusal(ctx, blind, ca_bundle=current).hresult == CERT_REVOCATION_FAILED


def test_a_ca_bundle_per_job_and_the_fixed_ssl_context(
    issuers: tuple[Issuer, Issuer], tmp_path: Path
) -> None:
    ctx = server_cert(issuers[0], tmp_path)
    ca = bundle(tmp_path / "ca.pem", issuers[0])
    assert refusal(ctx, RequestOptions()).hresult == SECURE_FAILURE  # system CAs only
    assert fetch(ctx, JobOptions(ca_bundle=ca)) == DATA
    fixed = ssl.create_default_context(cafile=ca)
    assert fetch(ctx, RequestOptions(), ssl_context=fixed) == DATA
    conflict = refusal(
        ctx, RequestOptions(security_flags=F.IGNORE_CERT_CN_INVALID), ssl_context=fixed
    )
    assert (conflict.hresult, conflict.transient) == (hr.E_INVALIDARG, False)
    missing = refusal(ctx, JobOptions(ca_bundle=str(tmp_path / "absent.pem")))
    assert (missing.hresult, missing.transient) == (SECURE_FAILURE, False)


# -- the server-certificate callback ---------------------------------------------------------------


def test_the_callback_gets_the_verified_chain_and_its_acceptance_is_cached(
    issuers: tuple[Issuer, Issuer], tmp_path: Path
) -> None:
    ctx = server_cert(issuers[0], tmp_path)
    ca = bundle(tmp_path / "ca.pem", issuers[0])
    calls: list[tuple[str, int, tuple[bytes, ...]]] = []

    def validator(host: str, port: int, chain: tuple[bytes, ...]) -> int:
        calls.append((host, port, chain))
        return hr.S_OK

    options = JobOptions(server_certificate_validator=validator)

    async def body(t: HttpTransport) -> list[bytes]:
        async with serving(ctx, close=True) as base:  # a new connection per request
            return [await read_all(await t.open(f"{base}/f", options)) for _ in range(3)]

    assert run(body, ca_bundle=ca) == [DATA] * 3
    assert len(calls) == 1  # accepted (host, port, certificate) are not asked again
    host, port, chain = calls[0]
    assert host == "127.0.0.1" and port > 0
    leaf = x509.load_der_x509_certificate(chain[0])
    assert leaf.serial_number == ctx.serial  # type: ignore[attr-defined]
    assert x509.load_der_x509_certificate(chain[-1]) == issuers[0].cert  # verified up to the CA


@pytest.mark.parametrize("answer", [0x800B0109, hr.S_FALSE, "raise"])
def test_a_refusal_is_transient_with_context_server_certificate_callback(
    issuers: tuple[Issuer, Issuer], tmp_path: Path, answer: int | str
) -> None:
    ctx = server_cert(issuers[0], tmp_path)
    ca = bundle(tmp_path / "ca.pem", issuers[0])
    seen: list[str] = []
    asked = 0

    def validator(host: str, port: int, chain: tuple[bytes, ...]) -> int:
        nonlocal asked
        asked += 1
        if answer == "raise":
            raise RuntimeError("the application's callback broke")
        assert isinstance(answer, int)
        return answer

    async def body(t: HttpTransport) -> list[TransferError]:
        errors = []
        async with serving(ctx, seen) as base:
            for _ in range(2):
                with pytest.raises(TransferError) as caught:
                    await t.stat(f"{base}/f", RequestOptions())
                errors.append(caught.value)
        return errors

    errors = run(body, ca_bundle=ca, server_certificate_validator=validator)
    expected = answer if answer == 0x800B0109 else hr.E_FAIL
    for error in errors:
        assert error.hresult == expected
        assert error.context is ErrorContext.SERVER_CERTIFICATE_CALLBACK
        assert error.transient is True
    assert asked == 2  # a refusal is never cached
    assert seen == []  # refused before any request went out


def test_a_callback_refusal_puts_the_job_in_transient_error(
    issuers: tuple[Issuer, Issuer], tmp_path: Path
) -> None:
    ctx = server_cert(issuers[0], tmp_path)
    ca = bundle(tmp_path / "ca.pem", issuers[0])

    async def main(manager: TransferManager, job_id: str) -> None:
        transport = HttpTransport(
            ca_bundle=ca, server_certificate_validator=lambda h, p, c: 0x800B0109
        )
        async with serving(ctx) as base:
            job = manager.get_job(job_id)
            job.add_file(f"{base}/f", tmp_path / "f.bin")
            job.resume()
            engine = Engine(
                manager,
                transports={"https": transport},
                poll_interval=0.02,
                checkpoint_interval=0.03,
                yield_bandwidth=False,
            )
            engine.network_probe = lambda: True  # type: ignore[method-assign]
            engine.cost_probe = lambda: int(CostFlags.UNRESTRICTED)  # type: ignore[method-assign]
            task = asyncio.create_task(engine.run())
            try:
                for _ in range(500):
                    if job.state is JobState.TRANSIENT_ERROR:
                        break
                    await asyncio.sleep(0.01)
            finally:
                engine.stop()
                await asyncio.wait_for(task, 15)

    with TransferManager("memory:") as manager:
        job = manager.create_job("callback")
        asyncio.run(main(manager, job.id))
        assert job.state is JobState.TRANSIENT_ERROR
        error = job.error
        assert error is not None
        assert error.context is ErrorContext.SERVER_CERTIFICATE_CALLBACK
        assert error.hresult == 0x800B0109


# -- response headers and the HTTP method ----------------------------------------------------------


def test_response_headers_hold_the_status_line_and_end_with_an_empty_line(
    issuers: tuple[Issuer, Issuer], tmp_path: Path
) -> None:
    ctx = server_cert(issuers[0], tmp_path)
    ca = bundle(tmp_path / "ca.pem", issuers[0])

    async def body(t: HttpTransport) -> str | None:
        async with serving(ctx) as base:
            return (await t.stat(f"{base}/f", RequestOptions())).headers

    headers = run(body, ca_bundle=ca)
    assert headers is not None
    lines = headers.split("\r\n")
    assert lines[0] == "HTTP/1.1 200 OK"
    assert 'ETag: "v1"' in lines
    assert f"Content-Length: {len(DATA)}" in lines
    assert headers.endswith("\r\n\r\n")


def test_a_custom_http_method_is_sent_without_a_range(
    issuers: tuple[Issuer, Issuer], tmp_path: Path
) -> None:
    ctx = server_cert(issuers[0], tmp_path)
    ca = bundle(tmp_path / "ca.pem", issuers[0])
    seen: list[str] = []
    options = RequestOptions(http_method="REPORT")

    async def body(t: HttpTransport) -> tuple[int, bytes]:
        async with serving(ctx, seen) as base:
            await t.stat(f"{base}/f", options)
            download = await t.open(f"{base}/f", options, offset=100, validator='"v1"')
            return download.offset, await read_all(download)

    offset, data = run(body, ca_bundle=ca)
    assert (offset, data) == (0, DATA)  # a custom method restarts from zero (BITS §10)
    assert seen == ["HEAD", "REPORT"]
