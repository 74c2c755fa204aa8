"""bitsadmin's HTTP-option verbs for the ``backhaul`` command.

``add_http_verbs(sub, verb)`` adds them to the parser of ``adapters/cli.py``; ``verb`` is the
helper of its ``build_parser`` (``verb(name, func, help, job=True)`` makes a sub-command whose
first argument is the job). Arguments follow bitsadmin's order::

    setclientcertificatebyid   JOB LOCATION STORE HASH        (LOCATION: CURRENT_USER, 0..7)
    setclientcertificatebyname JOB LOCATION STORE SUBJECT     (subject RDNs reversed: "O, OU, CN")
    removeclientcertificate    JOB
    getclientcertificate       JOB
    setsecurityflags           JOB FLAGS       (0x.. or names joined by |, e.g.
                                                IGNORE_UNKNOWN_CA|REDIRECT_POLICY_DISALLOW)
    getsecurityflags           JOB
    setcustomheaders           JOB "Name: value"|@FILE...  (NULL removes them)
    getcustomheaders           JOB
    makecustomheaderswriteonly JOB
    sethttpmethod / gethttpmethod JOB [METHOD]
    setcredentials             JOB TARGET SCHEME USER PASSWORD  (SERVER|PROXY,
                                BASIC|DIGEST|NTLM|NEGOTIATE|PASSPORT; PASSWORD "-" reads one
                                line from stdin; NULL NULL = implicit credentials)
    removecredentials          JOB TARGET SCHEME
    setproxysettings           JOB USAGE [PROXY_LIST [BYPASS_LIST]]   (PRECONFIG, NO_PROXY,
                                OVERRIDE, AUTODETECT; NULL for no bypass list)
    getproxysettings           JOB
    importcertificate          LOCATION STORE FILE [--passphrase-stdin]

The client-certificate verbs check the certificate stores of the backhaul home
(``adapters/certstore.py``: ``$BACKHAUL_CERTS`` or ``<home>/certs``) before anything is
recorded. Every refusal is a ``BitsError`` with the BITS HRESULT (exit code 1); nothing is
recorded then. Passwords and passphrases are never printed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from backhaul.adapters.cli_args import header_lines
from backhaul.adapters.manager import TransferJob, TransferManager
from backhaul.adapters.store import default_home
from backhaul.core import hresult
from backhaul.core.error import BitsError
from backhaul.core.vocabulary import (
    AuthScheme,
    AuthTarget,
    CertStoreLocation,
    ProxyUsage,
    SecurityFlags,
)

if TYPE_CHECKING:
    from backhaul.adapters.certstore import CertificateStores

__all__ = ["add_http_verbs"]

Verb = Callable[..., argparse.ArgumentParser]
Command = Callable[[argparse.Namespace, TransferManager, TextIO], int]
_OK = 0


def _job(m: TransferManager, ref: str) -> TransferJob:
    from backhaul.adapters.cli import find_job  # cli imports this module: import it late

    return find_job(m, ref)


def _stores(args: argparse.Namespace, m: TransferManager) -> CertificateStores:
    # certstore loads cryptography (about 40 ms): only the certificate verbs pay for it.
    from backhaul.adapters.certstore import CertificateStores

    home = Path(args.home).expanduser() if getattr(args, "home", None) else default_home()
    return CertificateStores.for_home(home, m.store.secrets)


def _location(text: str) -> int:
    """A store location by name (CURRENT_USER, BG_CERT_STORE_LOCATION_CURRENT_USER) or number;
    E_NOTIMPL for anything else, as BITS says for a bad location."""
    name = text.strip().upper().removeprefix("BG_CERT_STORE_LOCATION_")
    if name in CertStoreLocation.__members__:
        return int(CertStoreLocation[name])
    try:
        return int(CertStoreLocation(int(text, 0)))
    except ValueError:
        raise BitsError(hresult.E_NOTIMPL, f"unknown certificate store location {text!r}") from None


def _member(kind: Any, text: str, prefix: str, code: int) -> Any:
    name = text.strip().upper().removeprefix(prefix)
    if name in kind.__members__:
        return kind[name]
    try:
        return kind(int(text, 0))
    except ValueError:
        raise BitsError(code, f"unknown {kind.__name__} {text!r}") from None


def _flags(text: str) -> int:
    value = 0
    for part in text.replace(",", "|").split("|"):
        part = part.strip()
        if not part:
            continue
        name = part.upper().removeprefix("BG_SSL_").removeprefix("BG_HTTP_")
        if name in SecurityFlags.__members__:
            value |= int(SecurityFlags[name])
            continue
        try:
            value |= int(part, 0)
        except ValueError:
            raise BitsError(hresult.E_INVALIDARG, f"unknown security flag {part!r}") from None
    return value


def _null(text: str | None) -> str | None:
    return None if text is None or text.upper() == "NULL" else text


# -- client certificates ---------------------------------------------------------------------


def cmd_setclientcertificatebyid(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    job = _job(m, args.job)
    from backhaul.adapters.certstore import set_client_certificate_by_id

    digest = args.hash.replace(" ", "").replace(":", "")
    entry = set_client_certificate_by_id(
        job, _stores(args, m), _location(args.location), args.cert_store, digest
    )
    out.write(f"{entry.sha1} {entry.subject}\n")
    return _OK


def cmd_setclientcertificatebyname(
    args: argparse.Namespace, m: TransferManager, out: TextIO
) -> int:
    from backhaul.adapters.certstore import set_client_certificate_by_name

    job = _job(m, args.job)
    entry = set_client_certificate_by_name(
        job, _stores(args, m), _location(args.location), args.cert_store, args.subject
    )
    out.write(f"{entry.sha1} {entry.subject}\n")
    return _OK


def cmd_removeclientcertificate(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    _job(m, args.job).remove_client_certificate()
    return _OK


def cmd_getclientcertificate(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    cert = _job(m, args.job).client_certificate
    if cert is None:
        out.write("no client certificate\n")
        return _OK
    out.write(
        f"location: {CertStoreLocation(cert.store_location).name}\n"
        f"store: {cert.store_name}\n"
        f"hash: {cert.sha1 or ''}\n"
        f"subject: {cert.subject or ''}\n"
    )
    return _OK


def cmd_importcertificate(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    passphrase = None
    if args.passphrase_stdin:
        passphrase = sys.stdin.readline().rstrip("\r\n")
    added = _stores(args, m).import_file(
        _location(args.location), args.cert_store, args.file, passphrase
    )
    for entry in added:
        key = "with key" if entry.has_key else "no key"
        out.write(f"{entry.sha1} {entry.subject} ({key})\n")
    return _OK


# -- security flags, headers, method ---------------------------------------------------------


def cmd_setsecurityflags(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    _job(m, args.job).security_flags = _flags(args.flags)
    return _OK


def cmd_getsecurityflags(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    flags = _job(m, args.job).security_flags
    names = [f.name for f in SecurityFlags if f.name and flags & f == f]
    out.write(f"0x{flags:04X}" + (f" {'|'.join(names)}" if names else "") + "\n")
    return _OK


def cmd_setcustomheaders(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    job = _job(m, args.job)
    if not args.headers or [h.upper() for h in args.headers] == ["NULL"]:
        job.set_custom_headers(None)
    else:
        headers = header_lines(args.headers) or []
        job.set_custom_headers("".join(f"{h}\r\n" for h in headers))
    return _OK


def cmd_getcustomheaders(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    headers = _job(m, args.job).custom_headers
    if headers is None:
        out.write("no custom headers\n")
    else:
        out.write("".join(f"{line}\n" for line in headers.split("\r\n") if line))
    return _OK


def cmd_makecustomheaderswriteonly(
    args: argparse.Namespace, m: TransferManager, out: TextIO
) -> int:
    _job(m, args.job).make_custom_headers_write_only()
    return _OK


def cmd_sethttpmethod(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    _job(m, args.job).http_method = args.method
    return _OK


def cmd_gethttpmethod(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    out.write(f"{_job(m, args.job).http_method}\n")
    return _OK


# -- credentials and proxies -----------------------------------------------------------------


def cmd_setcredentials(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    job = _job(m, args.job)
    target = _member(AuthTarget, args.target, "BG_AUTH_TARGET_", hresult.BG_E_INVALID_AUTH_TARGET)
    scheme = _member(AuthScheme, args.scheme, "BG_AUTH_SCHEME_", hresult.BG_E_INVALID_AUTH_SCHEME)
    password = args.password
    if password == "-":
        password = sys.stdin.readline().rstrip("\r\n")
    job.set_credentials(target, scheme, _null(args.user), _null(password))
    return _OK


def cmd_removecredentials(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    job = _job(m, args.job)
    target = _member(AuthTarget, args.target, "BG_AUTH_TARGET_", hresult.BG_E_INVALID_AUTH_TARGET)
    scheme = _member(AuthScheme, args.scheme, "BG_AUTH_SCHEME_", hresult.BG_E_INVALID_AUTH_SCHEME)
    if not job.remove_credentials(target, scheme):
        out.write("no such credentials were set (S_FALSE)\n")
    return _OK


def cmd_setproxysettings(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    job = _job(m, args.job)
    usage = _member(ProxyUsage, args.usage, "BG_JOB_PROXY_USAGE_", hresult.E_NOTIMPL)
    job.set_proxy_settings(usage, _null(args.proxy_list), _null(args.bypass_list))
    return _OK


def cmd_getproxysettings(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    proxy = _job(m, args.job).proxy_settings
    out.write(
        f"usage: {ProxyUsage(proxy.usage).name}\n"
        f"proxy list: {proxy.proxy_list or 'NULL'}\n"
        f"bypass list: {proxy.bypass_list or 'NULL'}\n"
    )
    return _OK


# -- the parser ------------------------------------------------------------------------------


def add_http_verbs(sub: Any, verb: Verb) -> None:
    """Add the HTTP-option verbs to ``build_parser``'s sub-parsers with its ``verb`` helper."""
    del sub  # every verb goes through the helper, which owns the sub-parsers
    s = verb("setclientcertificatebyid", cmd_setclientcertificatebyid, "SetClientCertificateByID")
    s.add_argument("location", help="CURRENT_USER, LOCAL_MACHINE, ... or 0..7")
    # Not "store": that is the global --store option's name (the event store to open).
    s.add_argument("cert_store", metavar="store", help="store name, e.g. MY")
    s.add_argument("hash", help="SHA-1 of the certificate, 40 hex digits")
    s = verb(
        "setclientcertificatebyname", cmd_setclientcertificatebyname, "SetClientCertificateByName"
    )
    s.add_argument("location")
    s.add_argument("cert_store", metavar="store", help="store name, e.g. MY")
    s.add_argument("subject", help='substring of the subject, RDNs reversed ("O, OU, CN")')
    verb("removeclientcertificate", cmd_removeclientcertificate, "RemoveClientCertificate")
    verb("getclientcertificate", cmd_getclientcertificate, "GetClientCertificate")
    s = verb(
        "setsecurityflags", cmd_setsecurityflags, "SetSecurityFlags (BG_SSL_*, redirect policy)"
    )
    s.add_argument("flags", help="0x.. or names joined by |")
    verb("getsecurityflags", cmd_getsecurityflags, "GetSecurityFlags")
    s = verb("setcustomheaders", cmd_setcustomheaders, "SetCustomHeaders (NULL removes them)")
    s.add_argument(
        "headers",
        nargs="*",
        metavar="HEADER",
        help='"Name: value", or @FILE (@- for stdin): its lines, keeping a token out of the '
        "command line",
    )
    verb("getcustomheaders", cmd_getcustomheaders, "GetCustomHeaders")
    verb("makecustomheaderswriteonly", cmd_makecustomheaderswriteonly, "MakeCustomHeadersWriteOnly")
    s = verb("sethttpmethod", cmd_sethttpmethod, "SetHttpMethod (before the first resume)")
    s.add_argument("method")
    verb("gethttpmethod", cmd_gethttpmethod, "GetHttpMethod")
    s = verb("setcredentials", cmd_setcredentials, "SetCredentials (PASSWORD - reads stdin)")
    s.add_argument("target", help="SERVER or PROXY")
    s.add_argument("scheme", help="BASIC, DIGEST, NTLM, NEGOTIATE or PASSPORT")
    s.add_argument("user", help="user name, or NULL")
    s.add_argument("password", help="password, NULL, or - to read one line from stdin")
    s = verb("removecredentials", cmd_removecredentials, "RemoveCredentials")
    s.add_argument("target")
    s.add_argument("scheme")
    s = verb("setproxysettings", cmd_setproxysettings, "SetProxySettings")
    s.add_argument("usage", help="PRECONFIG, NO_PROXY, OVERRIDE or AUTODETECT")
    s.add_argument("proxy_list", nargs="?", help='OVERRIDE: "[scheme=][scheme://]host[:port] ..."')
    s.add_argument("bypass_list", nargs="?", help='OVERRIDE: "host *.domain <local>" or NULL')
    verb("getproxysettings", cmd_getproxysettings, "GetProxySettings")
    s = verb(
        "importcertificate", cmd_importcertificate, "add a PEM/PKCS#12 file to a store", job=False
    )
    s.add_argument("location")
    s.add_argument("cert_store", metavar="store", help="store name, e.g. MY")
    s.add_argument("file", help="PEM (certificate + key) or PKCS#12 file")
    s.add_argument(
        "--passphrase-stdin", action="store_true", help="read the key passphrase from stdin"
    )
