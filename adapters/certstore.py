"""Client certificate stores for HTTPS jobs: BITS's certificate stores as directories.

BITS names a client certificate by a store location (``CertStoreLocation``), a store name
(``MY``, ``CA``, ``ROOT``, ``SPC`` or one an application made up) and either the certificate's
SHA-1 hash or a subject name. On Linux a store is a directory::

    <root>/<LOCATION>/<STORE>/
    root     = $BACKHAUL_CERTS, else <backhaul home>/certs   (e.g. ~/.local/share/backhaul/certs)
    LOCATION = the location's name: CURRENT_USER, LOCAL_MACHINE, CURRENT_SERVICE, SERVICES,
               USERS, CURRENT_USER_GROUP_POLICY, LOCAL_MACHINE_GROUP_POLICY,
               LOCAL_MACHINE_ENTERPRISE
    STORE    = the store name, matched without regard to case (as Windows does)

The files of a store, read in name order (anything else is ignored):

* ``*.pem``, ``*.crt``, ``*.cer``: PEM certificates; the private key (PKCS#8, PKCS#1 or SEC1,
  encrypted or not) in the same file or in ``<stem>.key`` beside it. Certificates of the file
  that do not belong to the key are the chain sent with it.
* ``*.p12``, ``*.pfx``: PKCS#12 (certificate, key and chain).
* ``<file>.passphrase``: the passphrase of ``<file>`` (its encrypted key, or the PKCS#12),
  SEALED with the store's secret key (``adapters/secret.py``): it is never on disk or in the
  log in plain text, never logged, never in an error message. ``import_file`` and
  ``set_passphrase`` write it; both refuse a passphrase that does not open the key
  (``HRESULT_FROM_WIN32(ERROR_INVALID_PASSWORD)``, what Windows' PFX import says) and then
  write nothing.

Selection follows BITS (bits-core.md §10): by SHA-1 (the thumbprint, the hash of the DER
certificate), or by subject: a case-insensitive substring of the certificate's simple subject
name with its RDNs comma-separated and reversed relative to the usual display
(``CN=a, OU=b, O=c`` is matched as ``c, b, a``: the attribute values in the certificate's own
order). By subject, only certificates that can authenticate a client are candidates (an
extended key usage, if present, allows clientAuth, and a private key is there); the first in
file order wins.

Errors, as BitsError at the call (``check``, ``import_file``) and as fatal TransferError
(context GENERAL_TRANSPORT) when a transfer opens the certificate (``identity``):
an unknown location ``E_NOTIMPL``; a store that does not exist
``HRESULT_FROM_WIN32(ERROR_FILE_NOT_FOUND)``; a store that cannot be read ``E_ACCESSDENIED``;
no matching certificate ``CRYPT_E_NOT_FOUND``; a certificate whose key is missing or cannot be
opened (wrong passphrase) ``HRESULT_FROM_WIN32(ERROR_WINHTTP_CLIENT_CERT_NO_ACCESS_PRIVATE_KEY)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID

from backhaul.adapters.secret import SecretBox
from backhaul.core import hresult, limit
from backhaul.core.error import BitsError, TransferError
from backhaul.core.port import ClientIdentity
from backhaul.core.value import ClientCertificate, Sealed
from backhaul.core.vocabulary import CertStoreLocation, ErrorContext

__all__ = [
    "CERTS_ENV",
    "ERROR_INVALID_PASSWORD",
    "NO_ACCESS_PRIVATE_KEY",
    "CertificateStores",
    "StoredCertificate",
    "set_client_certificate_by_id",
    "set_client_certificate_by_name",
    "simple_subject",
]

CERTS_ENV: Final = "BACKHAUL_CERTS"
ERROR_INVALID_PASSWORD: Final = hresult.hresult_from_win32(86)
"""0x80070056: the passphrase does not open the key (Windows' PFXImportCertStore says this)."""
NO_ACCESS_PRIVATE_KEY: Final = hresult.hresult_from_win32(
    hresult.ERROR_WINHTTP_CLIENT_CERT_NO_ACCESS_PRIVATE_KEY
)
FILE_NOT_FOUND: Final = hresult.hresult_from_win32(hresult.ERROR_FILE_NOT_FOUND)

_PEM_SUFFIXES: Final = frozenset({".pem", ".crt", ".cer"})
_P12_SUFFIXES: Final = frozenset({".p12", ".pfx"})
_PASSPHRASE: Final = ".passphrase"
_KEY_BLOCK = re.compile(
    rb"-----BEGIN ((?:ENCRYPTED |RSA |EC )?PRIVATE KEY)-----.+?-----END \1-----", re.S
)
_CERT_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
_MAX_FILE: Final = 1024 * 1024  # a certificate file larger than this is not one


class _Refusal(Exception):
    """A store problem, raised as BitsError at a call or TransferError during a transfer."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def simple_subject(cert: x509.Certificate) -> str:
    """The subject as BITS matches it: attribute values, comma-separated, in the certificate's
    own RDN order (the reverse of the usual ``CN=..., O=...`` display)."""
    return ", ".join(str(attr.value) for rdn in cert.subject.rdns for attr in rdn)


def _client_auth(cert: x509.Certificate) -> bool:
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return (
        ExtendedKeyUsageOID.CLIENT_AUTH in eku or ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in eku
    )


def _sha1(cert: x509.Certificate) -> str:
    return hashlib.sha1(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _same_key(cert: x509.Certificate, key: Any) -> bool:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    try:
        return bool(
            cert.public_key().public_bytes(der, spki) == key.public_key().public_bytes(der, spki)
        )
    except (AttributeError, ValueError, TypeError):
        return False


@dataclass(frozen=True)
class StoredCertificate:
    """One certificate of a store, as listed (its key is not opened)."""

    path: Path
    sha1: str
    subject: str  # simple_subject
    client_auth: bool
    has_key: bool  # a private key for it is in the file (or in <stem>.key)
    certificate: x509.Certificate = field(repr=False, compare=False)
    chain: tuple[x509.Certificate, ...] = field(default=(), repr=False, compare=False)


@dataclass
class _Parsed:
    entries: list[StoredCertificate]
    problem: str | None = None


class CertificateStores:
    """The certificate stores under ``root`` (see the module docstring). ``secrets`` opens
    sealed passphrases (the event store's ``SecretBox``). An instance is a
    ``ClientCertificateSource`` for ``HttpTransport(certificates=...)``."""

    def __init__(self, root: str | os.PathLike[str], secrets: SecretBox | None = None) -> None:
        self.root = Path(root)
        self._secrets = secrets
        self._cache: dict[tuple[str, int, int, int], _Parsed] = {}  # by path, mtime, size, sidecar

    @classmethod
    def for_home(cls, home: str | os.PathLike[str], secrets: SecretBox | None) -> CertificateStores:
        explicit = os.environ.get(CERTS_ENV)
        return cls(Path(explicit) if explicit else Path(home) / "certs", secrets)

    def __repr__(self) -> str:
        return f"CertificateStores({str(self.root)!r})"

    # -- addressing ----------------------------------------------------------------------

    def location_dir(self, location: int) -> Path:
        try:
            name = CertStoreLocation(location).name
        except ValueError:
            raise _Refusal(hresult.E_NOTIMPL, f"unknown store location {location!r}") from None
        return self.root / name

    def store_dir(self, location: int, store_name: str, *, create: bool = False) -> Path:
        """The directory of a store; raises when it does not exist (unless ``create``)."""
        _check_store_name(store_name)
        base = self.location_dir(location)
        try:
            names = [p.name for p in base.iterdir() if p.is_dir()]
        except FileNotFoundError:
            names = []
        except PermissionError:
            raise _Refusal(hresult.E_ACCESSDENIED, f"cannot read {base}") from None
        match = next((n for n in sorted(names) if n.upper() == store_name.upper()), None)
        if match is not None:
            return base / match
        if not create:
            raise _Refusal(
                FILE_NOT_FOUND,
                f"no certificate store {store_name!r} in {CertStoreLocation(location).name} "
                f"({base / store_name.upper()} does not exist)",
            )
        path = base / store_name.upper()
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        return path

    # -- listing -------------------------------------------------------------------------

    def certificates(self, location: int, store_name: str) -> list[StoredCertificate]:
        """Every certificate of a store, in selection order."""
        return [c for parsed in self._parsed(location, store_name) for c in parsed.entries]

    def _parsed(self, location: int, store_name: str) -> list[_Parsed]:
        directory = self.store_dir(location, store_name)
        try:
            files = sorted(p for p in directory.iterdir() if p.is_file())
        except PermissionError:
            raise _Refusal(hresult.E_ACCESSDENIED, f"cannot read {directory}") from None
        return [self._parse(p) for p in files if p.suffix.lower() in _PEM_SUFFIXES | _P12_SUFFIXES]

    def _parse(self, path: Path) -> _Parsed:
        sidecar = path.with_name(path.name + _PASSPHRASE)
        try:
            st = path.stat()
            sealed = sidecar.stat().st_mtime_ns if sidecar.exists() else 0
        except OSError as exc:
            return _Parsed([], f"{path.name}: {exc.strerror}")
        key = (str(path), st.st_mtime_ns, st.st_size, sealed)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        try:
            parsed = _Parsed(self._entries(path))
        except _Refusal as exc:
            parsed = _Parsed([], f"{path.name}: {exc.message}")
        self._cache[key] = parsed
        return parsed

    def _entries(self, path: Path) -> list[StoredCertificate]:
        data = _read(path)
        if path.suffix.lower() in _P12_SUFFIXES:
            bundle = self._open_p12(path, data)
            certs = [c.certificate for c in bundle.additional_certs]
            leaf = bundle.cert.certificate if bundle.cert is not None else None
            entries = []
            if leaf is not None:
                chain = tuple(c for c in certs if c != leaf)
                entries.append(_entry(path, leaf, bundle.key is not None, chain))
            entries += [_entry(path, c, False, ()) for c in certs]
            return entries
        certs = _pem_certificates(data)
        key_data = _key_pem(path, data)
        owner = None
        if key_data is not None:
            public = _public_key_of(key_data)
            owner = next((c for c in certs if public is not None and _same_public(c, public)), None)
            if owner is None and certs:
                owner = certs[0]  # an encrypted key: assume it is the first certificate's
        entries = []
        for cert in certs:
            chain = tuple(c for c in certs if c is not cert) if cert is owner else ()
            entries.append(_entry(path, cert, cert is owner, chain))
        return entries

    # -- selection -----------------------------------------------------------------------

    def find(self, ref: ClientCertificate) -> StoredCertificate:
        """The certificate a job's reference names (BITS's rules); raises ``BitsError``."""
        try:
            return self._find(ref)
        except _Refusal as exc:
            raise BitsError(exc.code, exc.message) from None

    def _find(self, ref: ClientCertificate) -> StoredCertificate:
        parsed = self._parsed(ref.store_location, ref.store_name)
        found = None
        for entry in (c for p in parsed for c in p.entries):
            if ref.sha1 is not None:
                if entry.sha1 == ref.sha1.lower():
                    found = entry
                    break
            elif (
                ref.subject is not None
                and entry.client_auth
                and entry.has_key
                and ref.subject.lower() in entry.subject.lower()
            ):
                found = entry
                break
        if found is not None:
            return found
        what = f"SHA-1 {ref.sha1}" if ref.sha1 else f"subject {ref.subject!r}"
        problems = [p.problem for p in parsed if p.problem]
        unread = f" ({len(problems)} unreadable: {'; '.join(problems)})" if problems else ""
        raise _Refusal(
            hresult.CRYPT_E_NOT_FOUND,
            f"no certificate with {what} in store {ref.store_name}{unread}",
        )

    def check(self, ref: ClientCertificate) -> StoredCertificate:
        """What SetClientCertificateByID/ByName check at the call: the store, the certificate,
        and that its private key opens. Raises ``BitsError``."""
        try:
            entry = self._find(ref)
            self._identity(entry)
        except _Refusal as exc:
            raise BitsError(exc.code, exc.message) from None
        return entry

    def identity(self, ref: ClientCertificate) -> ClientIdentity:
        """Open the certificate for a transfer: raises a fatal ``TransferError``."""
        try:
            return self._identity(self._find(ref))
        except _Refusal as exc:
            raise TransferError(
                exc.code, exc.message, context=ErrorContext.GENERAL_TRANSPORT, transient=False
            ) from None

    __call__ = identity

    def _identity(self, entry: StoredCertificate) -> ClientIdentity:
        if not entry.has_key:
            raise _Refusal(
                NO_ACCESS_PRIVATE_KEY,
                f"the certificate {entry.sha1} in {entry.path.name} has no private key",
            )
        data = _read(entry.path)
        if entry.path.suffix.lower() in _P12_SUFFIXES:
            key = self._open_p12(entry.path, data).key
        else:
            key_data = _key_pem(entry.path, data)
            key = self._open_key(entry.path, key_data) if key_data is not None else None
        if key is None or not _same_key(entry.certificate, key):
            raise _Refusal(
                NO_ACCESS_PRIVATE_KEY,
                f"the private key in {entry.path.name} does not belong to {entry.sha1}",
            )
        pem = serialization.Encoding.PEM
        return ClientIdentity(
            sha1=entry.sha1,
            certificate_pem=b"".join(
                c.public_bytes(pem) for c in (entry.certificate, *entry.chain)
            ),
            key_pem=key.private_bytes(
                pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        )

    # -- secrets -------------------------------------------------------------------------

    def _passphrase(self, path: Path) -> bytes | None:
        sidecar = path.with_name(path.name + _PASSPHRASE)
        try:
            token = sidecar.read_text().strip()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _Refusal(
                hresult.E_ACCESSDENIED, f"cannot read {sidecar.name}: {exc.strerror}"
            ) from None
        if self._secrets is None:
            raise _Refusal(NO_ACCESS_PRIVATE_KEY, f"no secret key to open {sidecar.name}")
        try:
            return self._secrets.open(Sealed(token)).encode()
        except Exception:  # a token of another key, or damaged: never show it
            raise _Refusal(
                NO_ACCESS_PRIVATE_KEY, f"{sidecar.name} was not sealed with this store's key"
            ) from None

    def _open_p12(self, path: Path, data: bytes, password: bytes | None = None) -> Any:
        if password is not None:
            tries: list[bytes | None] = [password]
        else:
            stored = self._passphrase(path)
            tries = [stored] if stored is not None else [None, b""]
        for candidate in tries:
            if candidate is not None and b"\x00" in candidate:
                continue  # PKCS#12 passwords are C strings (and cryptography panics on NUL)
            with contextlib.suppress(ValueError, TypeError):
                return pkcs12.load_pkcs12(data, candidate)
        code = ERROR_INVALID_PASSWORD if password is not None else NO_ACCESS_PRIVATE_KEY
        raise _Refusal(code, f"{path.name} is not PKCS#12 or its passphrase is wrong")

    def _open_key(self, path: Path, key_data: bytes, password: bytes | None = None) -> Any:
        secret = password if password is not None else self._passphrase(path)
        encrypted = b"ENCRYPTED" in key_data.split(b"\n", 1)[0] or b"Proc-Type" in key_data
        try:
            return serialization.load_pem_private_key(key_data, secret if encrypted else None)
        except (ValueError, TypeError):
            code = ERROR_INVALID_PASSWORD if password is not None else NO_ACCESS_PRIVATE_KEY
            reason = "its passphrase is wrong" if encrypted else "it cannot be read"
            raise _Refusal(code, f"the private key of {path.name}: {reason}") from None

    # -- changing a store ----------------------------------------------------------------

    def import_file(
        self,
        location: int,
        store_name: str,
        source: str | os.PathLike[str],
        passphrase: str | None = None,
    ) -> list[StoredCertificate]:
        """Copy a PEM or PKCS#12 file into a store (made if missing), with its passphrase
        sealed beside it. Checks everything first; on any error writes nothing. Returns the
        certificates it added. Raises ``BitsError``."""
        try:
            return self._import(location, store_name, Path(source), passphrase)
        except _Refusal as exc:
            raise BitsError(exc.code, exc.message) from None

    def _import(
        self, location: int, store_name: str, source: Path, passphrase: str | None
    ) -> list[StoredCertificate]:
        self.location_dir(location)
        _check_store_name(store_name)
        _check_passphrase(passphrase)
        if passphrase is not None and self._secrets is None:
            raise _Refusal(hresult.E_INVALIDARG, "a passphrase needs the store's secret key")
        data = _read(source)
        secret = passphrase.encode() if passphrase is not None else None
        p12 = source.suffix.lower() in _P12_SUFFIXES or b"-----BEGIN" not in data
        if p12:
            bundle = self._open_p12(source, data, secret if secret is not None else b"")
            if bundle.cert is None:
                raise _Refusal(hresult.E_INVALIDARG, f"{source.name} holds no certificate")
            leaf, suffix = bundle.cert.certificate, ".p12"
        else:
            certs = _pem_certificates(data)
            if not certs:
                raise _Refusal(hresult.E_INVALIDARG, f"{source.name} holds no PEM certificate")
            key_data = _key_pem(source, data)
            given = secret if secret is not None else b""  # no passphrase is a wrong one
            key = self._open_key(source, key_data, given) if key_data is not None else None
            if key_data is not None and key_data not in data:
                data = data.rstrip(b"\n") + b"\n" + key_data + b"\n"  # keep <stem>.key with it
            leaf = next((c for c in certs if key is not None and _same_key(c, key)), certs[0])
            if key is not None and not _same_key(leaf, key):
                raise _Refusal(
                    NO_ACCESS_PRIVATE_KEY, f"the private key of {source.name} fits no certificate"
                )
            suffix = ".pem"
        directory = self.store_dir(location, store_name, create=True)
        target = directory / f"{_sha1(leaf)}{suffix}"
        sealed = (
            self._secrets.seal(passphrase) if passphrase is not None and self._secrets else None
        )
        _write_private(target, data)
        sidecar = target.with_name(target.name + _PASSPHRASE)
        if sealed is not None:
            _write_private(sidecar, sealed.token.encode())
        else:
            sidecar.unlink(missing_ok=True)
        return self._parse(target).entries

    def set_passphrase(
        self, location: int, store_name: str, file_name: str, passphrase: str | None
    ) -> None:
        """Seal (or with None remove) the passphrase of a file already in a store, after
        checking that it opens the key. Raises ``BitsError``; writes nothing on error."""
        try:
            directory = self.store_dir(location, store_name)
            path = directory / file_name
            if path.parent != directory or not path.is_file():
                raise _Refusal(FILE_NOT_FOUND, f"no file {file_name!r} in store {store_name}")
            sidecar = path.with_name(path.name + _PASSPHRASE)
            if passphrase is None:
                sidecar.unlink(missing_ok=True)
                return
            _check_passphrase(passphrase)
            if self._secrets is None:
                raise _Refusal(hresult.E_INVALIDARG, "a passphrase needs the store's secret key")
            data = _read(path)
            if path.suffix.lower() in _P12_SUFFIXES:
                self._open_p12(path, data, passphrase.encode())
            else:
                key_data = _key_pem(path, data)
                if key_data is None:
                    raise _Refusal(NO_ACCESS_PRIVATE_KEY, f"{file_name} has no private key")
                self._open_key(path, key_data, passphrase.encode())
            _write_private(sidecar, self._secrets.seal(passphrase).token.encode())
        except _Refusal as exc:
            raise BitsError(exc.code, exc.message) from None


# -- helpers -----------------------------------------------------------------------------


def _check_store_name(name: object) -> None:
    if not isinstance(name, str) or not name:
        raise _Refusal(hresult.E_INVALIDARG, "a store name is a non-empty string")
    if len(name) > limit.CERT_STORE_NAME_MAX:
        raise _Refusal(hresult.BG_E_STRING_TOO_LONG, "the store name is too long")
    if "/" in name or "\x00" in name or name in (".", ".."):
        raise _Refusal(hresult.E_INVALIDARG, f"{name!r} is not a store name")


def _check_passphrase(passphrase: object) -> None:
    if passphrase is None:
        return
    if not isinstance(passphrase, str) or "\x00" in passphrase:
        raise _Refusal(hresult.E_INVALIDARG, "a passphrase is a string without NUL characters")


def _read(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_FILE + 1)
    except FileNotFoundError:
        raise _Refusal(FILE_NOT_FOUND, f"{path} does not exist") from None
    except PermissionError:
        raise _Refusal(hresult.E_ACCESSDENIED, f"{path} cannot be read") from None
    except IsADirectoryError:
        raise _Refusal(hresult.E_INVALIDARG, f"{path} is a directory") from None
    except OSError as exc:
        raise _Refusal(hresult.E_INVALIDARG, f"{path}: {exc.strerror}") from None
    if len(data) > _MAX_FILE:
        raise _Refusal(hresult.E_INVALIDARG, f"{path} is too large for a certificate file")
    return data


def _write_private(path: Path, data: bytes) -> None:
    """Write a file readable by its owner only, atomically."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, path)


def _pem_certificates(data: bytes) -> list[x509.Certificate]:
    certs = []
    for block in _CERT_BLOCK.findall(data):
        with contextlib.suppress(ValueError):
            certs.append(x509.load_pem_x509_certificate(block))
    return certs


def _key_pem(path: Path, data: bytes) -> bytes | None:
    match = _KEY_BLOCK.search(data)
    if match is None and b"Proc-Type: 4,ENCRYPTED" not in data:
        sibling = path.with_suffix(".key")
        with contextlib.suppress(OSError):
            if sibling.is_file():
                match = _KEY_BLOCK.search(_read(sibling))
    return match.group(0) if match is not None else None


def _public_key_of(key_data: bytes) -> Any:
    """The public half of an unencrypted key (None when it is encrypted)."""
    try:
        return serialization.load_pem_private_key(key_data, None).public_key()
    except (ValueError, TypeError):
        return None


def _same_public(cert: x509.Certificate, public: Any) -> bool:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return bool(cert.public_key().public_bytes(der, spki) == public.public_bytes(der, spki))


def _entry(
    path: Path, cert: x509.Certificate, has_key: bool, chain: Sequence[x509.Certificate]
) -> StoredCertificate:
    return StoredCertificate(
        path=path,
        sha1=_sha1(cert),
        subject=simple_subject(cert),
        client_auth=_client_auth(cert),
        has_key=has_key,
        certificate=cert,
        chain=tuple(chain),
    )


def _location(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BitsError(hresult.E_NOTIMPL, f"unknown store location {value!r}")
    return int(value)


# -- the job calls, checked against the stores ---------------------------------------------


def set_client_certificate_by_id(
    job: Any, stores: CertificateStores, location: int, store_name: str, sha1: bytes | str
) -> StoredCertificate:
    """SetClientCertificateByID with BITS's checks at the call (the store exists, the
    certificate is in it, its key opens), then recorded on the job. Raises ``BitsError``;
    records nothing then."""
    digest = sha1.hex() if isinstance(sha1, bytes | bytearray) else sha1
    if isinstance(sha1, bytes | bytearray) and len(sha1) != 20:
        raise BitsError(
            hresult.hresult_from_win32(hresult.RPC_X_BAD_STUB_DATA), "a SHA-1 is 20 bytes"
        )
    if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-fA-F]{40}", digest):
        raise BitsError(
            hresult.hresult_from_win32(hresult.RPC_X_BAD_STUB_DATA),
            "a certificate hash is 20 bytes (40 hex digits)",
        )
    entry = stores.check(ClientCertificate(_location(location), store_name, sha1=digest.lower()))
    job.set_client_certificate_by_id(CertStoreLocation(location), store_name, digest.lower())
    return entry


def set_client_certificate_by_name(
    job: Any, stores: CertificateStores, location: int, store_name: str, subject: str
) -> StoredCertificate:
    """SetClientCertificateByName with BITS's checks at the call (see the _by_id twin)."""
    if not isinstance(subject, str) or not subject:
        raise BitsError(hresult.E_INVALIDARG, "the subject name must not be empty")
    if len(subject) > limit.CERT_SUBJECT_MAX:
        raise BitsError(hresult.BG_E_STRING_TOO_LONG, "the subject name is too long")
    entry = stores.check(ClientCertificate(_location(location), store_name, subject=subject))
    job.set_client_certificate_by_name(CertStoreLocation(location), store_name, subject)
    return entry


def iter_stores(stores: CertificateStores) -> Iterator[tuple[CertStoreLocation, str]]:
    """Every (location, store name) that exists under the root."""
    for location in CertStoreLocation:
        base = stores.root / location.name
        with contextlib.suppress(OSError):
            for d in sorted(base.iterdir()):
                if d.is_dir():
                    yield location, d.name
