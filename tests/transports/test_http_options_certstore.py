"""Client certificates: the directory stores of adapters/certstore.py (BITS's selection rules and
errors, sealed passphrases) and HTTPS with a client certificate against a real nginx with
``ssl_verify_client on``, through the transport and through the engine (bits-core.md §10)."""

from __future__ import annotations

import asyncio
import datetime
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from peers.nginx import P12_PASSPHRASE, PEM_PASSPHRASE, NginxServer, Pki

from backhaul.adapters.certstore import (
    ERROR_INVALID_PASSWORD,
    NO_ACCESS_PRIVATE_KEY,
    CertificateStores,
    set_client_certificate_by_id,
    set_client_certificate_by_name,
    simple_subject,
)
from backhaul.adapters.engine import Engine
from backhaul.adapters.manager import TransferManager
from backhaul.adapters.secret import SecretBox
from backhaul.core import hresult as hr
from backhaul.core.error import BitsError, TransferError
from backhaul.core.port import Download, RequestOptions
from backhaul.core.value import ClientCertificate
from backhaul.core.vocabulary import CertStoreLocation, CostFlags, ErrorContext, JobState
from backhaul.transports.http import HttpTransport

T = TypeVar("T")
CU = CertStoreLocation.CURRENT_USER
FILE_NOT_FOUND = hr.hresult_from_win32(hr.ERROR_FILE_NOT_FOUND)


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


@pytest.fixture
def stores(tmp_path: Path) -> CertificateStores:
    return CertificateStores(tmp_path / "certs", SecretBox.ephemeral())


def _cert(
    names: list[tuple[x509.ObjectIdentifier, str]],
    *,
    usage: list[x509.ObjectIdentifier] | None = None,
) -> tuple[bytes, bytes]:
    """A self-signed certificate with the subject RDNs in the given (DER) order; PEM + key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.RelativeDistinguishedName([x509.NameAttribute(o, v)]) for o, v in names])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    cert = builder.sign(key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _code(call: Callable[[], object]) -> int:
    with pytest.raises(BitsError) as caught:
        call()
    return caught.value.hresult


# -- the store: mapping, selection, errors ---------------------------------------------------------


def test_a_store_is_root_location_name_store_name_matched_without_case(
    stores: CertificateStores, pki: Pki
) -> None:
    added = stores.import_file(CU, "My", pki.client_pem)
    assert [c.sha1 for c in added] == [pki.client_sha1]
    directory = stores.root / "CURRENT_USER" / "MY"
    assert added[0].path.parent == directory
    assert stores.store_dir(CU, "my") == stores.store_dir(CU, "MY") == directory
    assert oct(directory.stat().st_mode & 0o777) == "0o700"
    assert oct(added[0].path.stat().st_mode & 0o777) == "0o600"
    home = CertificateStores.for_home(stores.root.parent, None)
    assert home.root == stores.root


def test_by_sha1_and_by_subject_with_the_rdns_reversed(stores: CertificateStores, pki: Pki) -> None:
    stores.import_file(CU, "MY", pki.client_pem)
    by_hash = stores.find(ClientCertificate(CU, "MY", sha1=pki.client_sha1.upper()))
    assert by_hash.sha1 == pki.client_sha1
    # trustme writes O, OU, CN: BITS matches "Backhaul Tests, Clients, backhaul-alice"
    assert pki.client_subject.startswith("Backhaul Tests")
    assert pki.client_subject.endswith("backhaul-alice")
    for subject in ("backhaul-alice", "TESTS, Clients", pki.client_subject):
        assert stores.find(ClientCertificate(CU, "MY", subject=subject)).sha1 == pki.client_sha1
    display_order = "backhaul-alice, Clients"
    code = _code(lambda: stores.find(ClientCertificate(CU, "MY", subject=display_order)))
    assert code == hr.CRYPT_E_NOT_FOUND


def test_subject_rules_client_auth_only_first_in_file_order_wins(
    stores: CertificateStores, tmp_path: Path
) -> None:
    """RDNs in DER order O=c, OU=b, CN=a display as "CN=a, OU=b, O=c"; BITS matches "c, b, a".
    A server-only certificate is not a candidate; of two candidates the first file wins."""
    directory = stores.store_dir(CU, "APP", create=True)
    names = [(NameOID.ORGANIZATION_NAME, "c"), (NameOID.ORGANIZATIONAL_UNIT_NAME, "b")]
    server_only = _cert(
        [*names, (NameOID.COMMON_NAME, "a")], usage=[ExtendedKeyUsageOID.SERVER_AUTH]
    )
    first = _cert([*names, (NameOID.COMMON_NAME, "a1")], usage=[ExtendedKeyUsageOID.CLIENT_AUTH])
    second = _cert([*names, (NameOID.COMMON_NAME, "a2")])  # no EKU: any use
    (directory / "0-server.pem").write_bytes(b"".join(server_only))
    (directory / "1-first.pem").write_bytes(b"".join(first))
    (directory / "2-second.pem").write_bytes(b"".join(second))
    listed = stores.certificates(CU, "APP")
    assert [c.subject for c in listed] == ["c, b, a", "c, b, a1", "c, b, a2"]
    cert = x509.load_pem_x509_certificate(server_only[0])
    assert cert.subject.rfc4514_string() == "CN=a,OU=b,O=c"
    assert simple_subject(cert) == "c, b, a"
    found = stores.find(ClientCertificate(CU, "APP", subject="C, B, A"))
    assert found.path.name == "1-first.pem"  # "c, b, a" is a substring of "c, b, a1"
    assert stores.find(ClientCertificate(CU, "APP", subject="b, a2")).path.name == "2-second.pem"
    # by hash the server-only certificate is found (BITS checks usage only by name)
    assert stores.find(ClientCertificate(CU, "APP", sha1=listed[0].sha1)) == listed[0]


def test_store_errors_carry_the_bits_hresults(stores: CertificateStores, pki: Pki) -> None:
    stores.import_file(CU, "MY", pki.client_pem)
    assert _code(lambda: stores.find(ClientCertificate(99, "MY", sha1="0" * 40))) == hr.E_NOTIMPL
    missing = ClientCertificate(CU, "NOPE", sha1=pki.client_sha1)
    assert _code(lambda: stores.find(missing)) == FILE_NOT_FOUND == 0x80070002
    other_location = ClientCertificate(CertStoreLocation.LOCAL_MACHINE, "MY", sha1=pki.client_sha1)
    assert _code(lambda: stores.find(other_location)) == FILE_NOT_FOUND
    unknown = ClientCertificate(CU, "MY", sha1="ab" * 20)
    assert _code(lambda: stores.find(unknown)) == hr.CRYPT_E_NOT_FOUND == 0x80092004
    with pytest.raises(TransferError) as caught:
        stores.identity(unknown)
    assert caught.value.hresult == hr.CRYPT_E_NOT_FOUND
    assert caught.value.transient is False
    assert caught.value.context is ErrorContext.GENERAL_TRANSPORT


def test_a_certificate_without_its_key_cannot_be_used(stores: CertificateStores, pki: Pki) -> None:
    directory = stores.store_dir(CU, "MY", create=True)
    pem = pki.client_pem.read_bytes()
    end = pem.index(b"-----END CERTIFICATE-----\n") + len(b"-----END CERTIFICATE-----\n")
    (directory / "only-cert.pem").write_bytes(pem[:end])
    ref = ClientCertificate(CU, "MY", sha1=pki.client_sha1)
    assert stores.find(ref).has_key is False
    assert _code(lambda: stores.check(ref)) == NO_ACCESS_PRIVATE_KEY == 0x80072F9A
    by_name = ClientCertificate(CU, "MY", subject="backhaul-alice")
    assert _code(lambda: stores.check(by_name)) == hr.CRYPT_E_NOT_FOUND  # not a candidate


@pytest.mark.parametrize(
    ("source", "passphrase"), [("pem", PEM_PASSPHRASE), ("p12", P12_PASSPHRASE)]
)
def test_an_encrypted_key_opens_with_its_sealed_passphrase_only(
    stores: CertificateStores, pki: Pki, source: str, passphrase: str
) -> None:
    path = pki.client_encrypted_pem if source == "pem" else pki.client_p12
    wrong = _code(lambda: stores.import_file(CU, "MY", path, "not the passphrase"))
    assert wrong == ERROR_INVALID_PASSWORD == 0x80070056
    assert not (stores.root / "CURRENT_USER").exists()  # nothing written
    if source == "pem":
        assert _code(lambda: stores.import_file(CU, "MY", path)) == ERROR_INVALID_PASSWORD
    (entry,) = [c for c in stores.import_file(CU, "MY", path, passphrase) if c.has_key]
    assert entry.sha1 == pki.client_sha1
    sidecar = entry.path.with_name(entry.path.name + ".passphrase")
    assert passphrase.encode() not in sidecar.read_bytes()
    assert passphrase.encode() not in entry.path.read_bytes()
    identity = stores.identity(ClientCertificate(CU, "MY", subject="backhaul-alice"))
    assert identity.sha1 == pki.client_sha1
    assert passphrase not in repr(identity) and "PRIVATE" not in repr(identity)
    assert identity.key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    # replacing the passphrase with a wrong one is refused and changes nothing
    before = sidecar.read_bytes()
    refused = _code(lambda: stores.set_passphrase(CU, "MY", entry.path.name, "wrong"))
    assert refused == ERROR_INVALID_PASSWORD
    assert sidecar.read_bytes() == before
    # a sidecar sealed by another key (another store's secret) cannot open the key
    other = CertificateStores(stores.root, SecretBox.ephemeral())
    with pytest.raises(TransferError) as caught:
        other.identity(ClientCertificate(CU, "MY", sha1=pki.client_sha1))
    assert caught.value.hresult in (NO_ACCESS_PRIVATE_KEY, hr.CRYPT_E_NOT_FOUND)
    assert passphrase not in caught.value.message


def test_unreadable_certificate_files_are_refused_at_import(
    stores: CertificateStores, tmp_path: Path
) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    assert _code(lambda: stores.import_file(CU, "MY", tmp_path / "absent.pem")) == FILE_NOT_FOUND
    assert _code(lambda: stores.import_file(CU, "MY", garbage)) == hr.E_INVALIDARG
    assert _code(lambda: stores.import_file(CU, "MY", tmp_path)) == hr.E_INVALIDARG
    not_p12 = tmp_path / "x.p12"
    not_p12.write_bytes(os.urandom(64))
    assert _code(lambda: stores.import_file(CU, "MY", not_p12)) == ERROR_INVALID_PASSWORD
    assert _code(lambda: stores.import_file(7.5, "MY", garbage)) == hr.E_NOTIMPL  # type: ignore[arg-type]
    assert _code(lambda: stores.import_file(CU, "../x", garbage)) == hr.E_INVALIDARG
    assert _code(lambda: stores.import_file(CU, "S" * 300, garbage)) == hr.BG_E_STRING_TOO_LONG
    assert not (stores.root / "CURRENT_USER").exists()


def test_the_job_calls_check_the_store_and_record_nothing_on_error(
    stores: CertificateStores, pki: Pki
) -> None:
    stores.import_file(CU, "MY", pki.client_pem)
    with TransferManager("memory:") as manager:
        manager.certificates = stores  # the manager checks references against these stores
        job = manager.create_job("certs")
        before = len(manager.store.stream(job.id))
        bad = [
            (lambda: set_client_certificate_by_id(job, stores, CU, "MY", "ab" * 20), 0x80092004),
            (
                lambda: set_client_certificate_by_id(job, stores, CU, "NOPE", pki.client_sha1),
                0x80070002,
            ),
            (
                lambda: set_client_certificate_by_id(job, stores, 8, "MY", pki.client_sha1),
                0x80004001,
            ),
            (lambda: set_client_certificate_by_id(job, stores, CU, "MY", b"\x01" * 19), 0x800706F7),
            (lambda: set_client_certificate_by_name(job, stores, CU, "MY", "nobody"), 0x80092004),
            (lambda: set_client_certificate_by_name(job, stores, CU, "MY", ""), hr.E_INVALIDARG),
        ]
        for call, code in bad:
            assert _code(call) == code
        assert len(manager.store.stream(job.id)) == before
        assert job.client_certificate is None
        set_client_certificate_by_name(job, stores, CU, "my", "alice")
        assert job.client_certificate == ClientCertificate(CU, "my", subject="alice")
        set_client_certificate_by_id(job, stores, CU, "MY", bytes.fromhex(pki.client_sha1))
        assert job.client_certificate == ClientCertificate(CU, "MY", sha1=pki.client_sha1)
        job.remove_client_certificate()
        assert job.client_certificate is None


# -- HTTPS with a client certificate: nginx with ssl_verify_client on ------------------------------


@pytest.mark.peer
@pytest.mark.parametrize("form", ["pem", "encrypted-pem", "p12"])
def test_nginx_accepts_the_right_client_certificate(
    nginx_tls: NginxServer, pki: Pki, stores: CertificateStores, form: str
) -> None:
    source, passphrase = {
        "pem": (pki.client_pem, None),
        "encrypted-pem": (pki.client_encrypted_pem, PEM_PASSPHRASE),
        "p12": (pki.client_p12, P12_PASSPHRASE),
    }[form]
    stores.import_file(CU, "MY", source, passphrase)
    options = RequestOptions(client_certificate=ClientCertificate(CU, "MY", subject="alice"))
    url = f"{nginx_tls.tls_url}/hello.txt"

    async def body(t: HttpTransport) -> tuple[str | None, bytes]:
        remote = await t.stat(url, options)
        return remote.headers, await read_all(await t.open(url, options))

    headers, data = run(body, ca_bundle=pki.ca_pem, certificates=stores)
    assert data == b"hello from nginx\n"
    assert headers is not None and headers.startswith("HTTP/1.1 200 OK\r\n")
    assert "X-Client-DN: CN=backhaul-alice,OU=Clients,O=Backhaul Tests\r\n" in headers


@pytest.mark.peer
@pytest.mark.parametrize("which", ["none", "foreign"])
def test_nginx_refuses_no_certificate_or_one_from_another_ca(
    nginx_tls: NginxServer, pki: Pki, stores: CertificateStores, which: str
) -> None:
    stores.import_file(CU, "MY", pki.foreign_pem)
    ref = ClientCertificate(CU, "MY", sha1=pki.foreign_sha1) if which == "foreign" else None
    options = RequestOptions(client_certificate=ref)

    async def body(t: HttpTransport) -> None:
        await t.open(f"{nginx_tls.tls_url}/hello.txt", options)

    with pytest.raises(TransferError) as caught:
        run(body, ca_bundle=pki.ca_pem, certificates=stores)
    # nginx answers "400 No required SSL certificate was sent" / "The SSL certificate error"
    assert caught.value.hresult == hr.BG_E_HTTP_ERROR_400
    assert caught.value.context is ErrorContext.REMOTE_FILE
    assert caught.value.transient is False


def _engine(manager: TransferManager, transport: HttpTransport) -> Engine:
    engine = Engine(
        manager,
        transports={"http": transport, "https": transport},
        poll_interval=0.02,
        checkpoint_interval=0.03,
        yield_bandwidth=False,
    )
    engine.network_probe = lambda: True  # type: ignore[method-assign]
    engine.cost_probe = lambda: int(CostFlags.UNRESTRICTED)  # type: ignore[method-assign]
    return engine


@pytest.mark.peer
def test_jobs_with_right_missing_and_foreign_certificates_through_the_engine(
    nginx_tls: NginxServer, pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole path: a SQLite store, the certificate stores of its home (key passphrase sealed
    with the store's key), the engine. The right certificate transfers the file; without one,
    or with one from another CA, the job ends in ERROR with nginx's 400, context REMOTE_FILE.
    The passphrase is nowhere on disk in plain text."""
    monkeypatch.delenv("BACKHAUL_STORE", raising=False)
    monkeypatch.delenv("BACKHAUL_CERTS", raising=False)
    home = tmp_path / "home"
    blob = (nginx_tls.docroot / "blob.bin").read_bytes()
    with TransferManager(home=home) as manager:
        stores = CertificateStores.for_home(home, manager.store.secrets)
        stores.import_file(CU, "MY", pki.client_encrypted_pem, PEM_PASSPHRASE)
        stores.import_file(CU, "OTHER", pki.foreign_pem)
        good, missing, foreign = (manager.create_job(n) for n in ("good", "missing", "foreign"))
        for job in (good, missing, foreign):
            job.add_file(f"{nginx_tls.tls_url}/blob.bin", tmp_path / f"{job.display_name}.bin")
        set_client_certificate_by_name(good, stores, CU, "MY", "Clients, backhaul-alice")
        set_client_certificate_by_id(foreign, stores, CU, "OTHER", pki.foreign_sha1)
        for job in (good, missing, foreign):
            job.resume()
        transport = HttpTransport(ca_bundle=pki.ca_pem, certificates=stores, stall_timeout=5)
        asyncio.run(asyncio.wait_for(_engine(manager, transport).run(until_idle=True), 60))
        assert good.state is JobState.TRANSFERRED, good.error
        good.complete()
        assert (tmp_path / "good.bin").read_bytes() == blob
        for job in (missing, foreign):
            assert job.state is JobState.ERROR
            error = job.error
            assert error is not None
            assert (error.context, error.hresult) == (ErrorContext.REMOTE_FILE, 0x80190190)
    secret = PEM_PASSPHRASE.encode()
    for path in home.rglob("*"):
        if path.is_file():
            assert secret not in path.read_bytes(), path
