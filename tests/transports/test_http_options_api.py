"""Bad input to the HTTP options, driven by hypothesis through the TransferJob API on a memory
store (TransferManager("memory:")) and the certificate stores: malformed headers, unknown flag
bits, invalid proxy and bypass lists, bad credentials and methods, bad certificate references,
unreadable certificate files and wrong passphrases. Each is a typed error carrying the BITS
HRESULT at the call, and nothing is recorded (the job's stream and the store directory are
unchanged). Also: the run-time list parsers only ever raise ValueError, and the CLI verbs of
adapters/cli_http.py."""

from __future__ import annotations

import argparse
import io
import string
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from peers.nginx import PEM_PASSPHRASE, Pki

from backhaul.adapters.certstore import (
    ERROR_INVALID_PASSWORD,
    CertificateStores,
    set_client_certificate_by_id,
    set_client_certificate_by_name,
)
from backhaul.adapters.cli_http import add_http_verbs
from backhaul.adapters.manager import TransferJob, TransferManager
from backhaul.adapters.secret import SecretBox
from backhaul.core import hresult as hr
from backhaul.core.error import BitsError
from backhaul.core.limit import Limits
from backhaul.core.vocabulary import (
    SECURITY_FLAGS_VALID,
    AuthScheme,
    AuthTarget,
    CertStoreLocation,
    ProxyUsage,
)
from backhaul.transports.http import parse_bypass_list, parse_proxy_list

CU = CertStoreLocation.CURRENT_USER
VALID_FLAGS = int(SECURITY_FLAGS_VALID)
SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def manager() -> Iterator[TransferManager]:
    with TransferManager("memory:", limits=Limits(None, None, None, None)) as m:
        yield m


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> CertificateStores:
    s = CertificateStores(tmp_path_factory.mktemp("stores") / "certs", SecretBox.ephemeral())
    s.import_file(CU, "MY", pki.client_encrypted_pem, PEM_PASSPHRASE)
    return s


def refused(job: TransferJob, call: Callable[[], object]) -> int:
    """Run a call that must be refused; return its HRESULT after checking nothing changed."""
    manager = job._manager
    before, snapshot = len(manager.store.stream(job.id)), job.snapshot()
    with pytest.raises(BitsError) as caught:
        call()
    assert len(manager.store.stream(job.id)) == before
    assert job.snapshot() == snapshot
    return caught.value.hresult


def tree(root: Path) -> dict[str, bytes]:
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# -- headers, flags, method, credentials -----------------------------------------------------------

header_name = st.text(string.ascii_letters + "-", min_size=1, max_size=12)
header_value = st.text(string.printable.replace("\r", "").replace("\n", ""), max_size=20)
good_line = st.builds(lambda n, v: f"{n}: {v}", header_name, header_value)
bad_line = st.one_of(
    st.text(string.ascii_letters + " ", min_size=1, max_size=20),  # no colon
    st.builds(lambda n, v: f"{n}:{v}\nX: y", header_name, header_value),  # a bare LF
    st.builds(lambda n, v: f"{n}:\r{v}", header_name, header_value),  # a bare CR
)


@SETTINGS
@given(
    before=st.lists(good_line, max_size=3),
    bad=bad_line,
    after=st.lists(good_line, max_size=3),
)
def test_malformed_custom_headers(
    manager: TransferManager, before: list[str], bad: str, after: list[str]
) -> None:
    job = manager.create_job("headers")
    headers = "".join(f"{line}\r\n" for line in [*before, bad, *after])
    assert refused(job, lambda: job.set_custom_headers(headers)) == hr.E_INVALIDARG


@SETTINGS
@given(st.data())
def test_too_long_or_nul_headers(manager: TransferManager, data: st.DataObject) -> None:
    job = manager.create_job("headers")
    if data.draw(st.booleans()):
        long = "X-Long: " + "v" * data.draw(st.integers(16384, 20000)) + "\r\n"
        assert refused(job, lambda: job.set_custom_headers(long)) == hr.BG_E_STRING_TOO_LONG
    else:
        nul = data.draw(good_line) + "\x00\r\n"
        assert refused(job, lambda: job.set_custom_headers(nul)) == hr.E_INVALIDARG


def _one_policy(flags: int) -> int:
    """``flags`` with at most one redirect policy (0x300 is none of BITS's policies)."""
    return flags & ~0x100 if flags & 0x300 == 0x300 else flags


@SETTINGS
@given(
    valid=st.integers(0, 2**32 - 1).map(lambda v: _one_policy(v & VALID_FLAGS)),
    bit=st.integers(0, 31).filter(lambda b: not (1 << b) & VALID_FLAGS),
)
def test_unknown_security_flag_bits(manager: TransferManager, valid: int, bit: int) -> None:
    job = manager.create_job("flags")
    value = valid | 1 << bit
    assert refused(job, lambda: setattr(job, "security_flags", value)) == hr.E_NOTIMPL
    job.security_flags = valid  # the valid bits alone are fine
    assert job.security_flags == valid


@SETTINGS
@given(others=st.integers(0, 2**32 - 1).map(lambda v: v & VALID_FLAGS & ~0x700))
def test_both_redirect_bits_are_no_policy(manager: TransferManager, others: int) -> None:
    """ALLOW_REPORT | DISALLOW (0x300) lies inside BG_HTTP_REDIRECT_POLICY_MASK but is none
    of the policies (0x000, 0x100, 0x200): refused, not taken as "follow silently"."""
    job = manager.create_job("policy")
    code = refused(job, lambda: setattr(job, "security_flags", others | 0x300))
    assert code == hr.E_NOTIMPL
    job.security_flags = others | 0x200
    assert job.security_flags == others | 0x200


def test_custom_headers_up_to_16384_characters_with_the_nul(manager: TransferManager) -> None:
    job = manager.create_job("headers")
    fits = "X-Long: " + "v" * (16383 - len("X-Long: ") - 2) + "\r\n"  # 16,383 + the NUL
    assert len(fits) == 16383
    job.set_custom_headers(fits)
    assert job.custom_headers == fits
    one_more = fits[:-2] + "v\r\n"
    assert refused(job, lambda: job.set_custom_headers(one_more)) == hr.BG_E_STRING_TOO_LONG


def test_store_names_up_to_256_characters_with_the_nul(
    manager: TransferManager, stores: CertificateStores, pki: Pki
) -> None:
    job = manager.create_job("cert")
    by_id = set_client_certificate_by_id
    too_long = refused(job, lambda: by_id(job, stores, CU, "S" * 256, pki.client_sha1))
    assert too_long == hr.BG_E_STRING_TOO_LONG
    missing = refused(job, lambda: by_id(job, stores, CU, "S" * 255, pki.client_sha1))
    assert missing == hr.hresult_from_win32(hr.ERROR_FILE_NOT_FOUND)


@SETTINGS
@given(
    st.text(min_size=1, max_size=20).filter(
        lambda m: any(c in m for c in ' ()<>@,;:\\"/[]?={}\t\x00')
    )
)
def test_http_methods_that_are_not_tokens(manager: TransferManager, method: str) -> None:
    job = manager.create_job("method")
    code = refused(job, lambda: setattr(job, "http_method", method))
    assert code in (hr.E_INVALIDARG, hr.BG_E_STRING_TOO_LONG)


@SETTINGS
@given(
    target=st.integers(-5, 10).filter(lambda t: t not in (1, 2)),
    scheme=st.integers(-5, 10).filter(lambda s: s not in range(1, 6)),
    user=st.text(min_size=301, max_size=310),
)
def test_bad_credentials(manager: TransferManager, target: int, scheme: int, user: str) -> None:
    job = manager.create_job("credentials")
    server, basic = AuthTarget.SERVER, AuthScheme.BASIC
    bad_target = refused(job, lambda: job.set_credentials(target, basic, "u", "p"))  # type: ignore[arg-type]
    assert bad_target == hr.BG_E_INVALID_AUTH_TARGET
    bad_scheme = refused(job, lambda: job.set_credentials(server, scheme, "u", "p"))  # type: ignore[arg-type]
    assert bad_scheme == hr.BG_E_INVALID_AUTH_SCHEME
    assert (
        refused(job, lambda: job.set_credentials(server, basic, user, "p"))
        == hr.BG_E_USERNAME_TOO_LARGE
    )
    assert refused(job, lambda: job.set_credentials(server, basic, "u", None)) == hr.E_INVALIDARG


# -- proxy settings --------------------------------------------------------------------------------

host = st.from_regex(r"[a-z][a-z0-9.-]{0,10}[a-z0-9]", fullmatch=True)
bad_entry = st.one_of(
    st.builds(lambda h: f"ftp={h}", host),  # not http or https
    st.builds(lambda h: f"{h}/path", host),  # a path
    st.builds(lambda h: f"http={h}=x", host),  # two "="
    st.builds(lambda h: f"socks://{h}", host),  # a proxy speaks http or https
)


@SETTINGS
@given(
    good=st.lists(host, max_size=3),
    bad=bad_entry,
    usage=st.sampled_from(list(ProxyUsage)),
)
def test_invalid_proxy_settings(
    manager: TransferManager, good: list[str], bad: str, usage: ProxyUsage
) -> None:
    job = manager.create_job("proxy")
    entries = " ".join([*good, bad])
    over = ProxyUsage.OVERRIDE
    assert refused(job, lambda: job.set_proxy_settings(over, entries)) == hr.E_INVALIDARG
    assert refused(job, lambda: job.set_proxy_settings(over, None)) == hr.E_INVALIDARG
    assert refused(job, lambda: job.set_proxy_settings(over, "p:80", "a*b")) == hr.E_INVALIDARG
    if usage is not over:
        assert refused(job, lambda: job.set_proxy_settings(usage, "p:80")) == hr.E_INVALIDARG
    unknown = refused(job, lambda: job.set_proxy_settings(7, None))  # type: ignore[arg-type]
    assert unknown == hr.E_NOTIMPL
    huge = " ".join(["proxy.example:8080"] * 2000)
    assert refused(job, lambda: job.set_proxy_settings(over, huge)) == hr.BG_E_PROXY_LIST_TOO_LARGE


@pytest.mark.parametrize("entry", ["http://pu:PROXYPW@127.0.0.1:9", "pu:PROXYPW@proxy:8080"])
def test_a_proxy_entry_with_a_login_is_refused_without_echoing_it(
    manager: TransferManager, entry: str
) -> None:
    """Its error quoted the entry, password and all (the refusal itself was right: a
    proxy's login goes with SetCredentials, target PROXY, sealed)."""
    job = manager.create_job("proxy")
    with pytest.raises(BitsError) as caught:
        job.set_proxy_settings(ProxyUsage.OVERRIDE, f"good:80 {entry}")
    assert caught.value.hresult == hr.E_INVALIDARG
    assert "PROXYPW" not in str(caught.value) and "SetCredentials" in str(caught.value)


@pytest.mark.parametrize(
    ("proxies", "bypass"),
    [("p:100000", None), ("a$b:80", None), ("p:0", None), ("p:80", "a/b"), ("p:80", "x=y")],
)
def test_entries_the_transport_refuses_are_refused_at_the_call(
    manager: TransferManager, proxies: str, bypass: str | None
) -> None:
    refusals = 0
    for text, parse in ((proxies, parse_proxy_list), (bypass, parse_bypass_list)):
        try:
            parse(text or "p")  # type: ignore[operator]
        except ValueError:
            refusals += 1
    assert refusals == 1  # the transport refuses it (BG_E_INVALID_PROXY_INFO at run time)
    job = manager.create_job("proxy")
    over = ProxyUsage.OVERRIDE
    assert refused(job, lambda: job.set_proxy_settings(over, proxies, bypass)) == hr.E_INVALIDARG


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=string.printable + "[]*<>é", max_size=60))
def test_the_run_time_list_parsers_only_raise_value_error(text: str) -> None:
    """Whatever a stored list holds, the transport either uses it or refuses it cleanly
    (ValueError, which becomes a fatal BG_E_INVALID_PROXY_INFO)."""
    for parse in (parse_proxy_list, parse_bypass_list):
        try:
            parsed = parse(text)
        except ValueError:
            continue
        assert isinstance(parsed, tuple)


# -- client certificates ---------------------------------------------------------------------------


@SETTINGS
@given(
    digest=st.one_of(
        st.text(string.hexdigits, max_size=39),
        st.text(string.hexdigits, min_size=41, max_size=50),
        st.text(min_size=40, max_size=40).filter(
            lambda t: not all(c in string.hexdigits for c in t)
        ),
    )
)
def test_hashes_that_are_not_20_bytes(
    manager: TransferManager, stores: CertificateStores, digest: str
) -> None:
    job = manager.create_job("cert")
    code = refused(job, lambda: set_client_certificate_by_id(job, stores, CU, "MY", digest))
    assert code == hr.hresult_from_win32(hr.RPC_X_BAD_STUB_DATA)


@SETTINGS
@given(
    digest=st.text("0123456789abcdef", min_size=40, max_size=40),
    location=st.integers(-100, 100).filter(lambda n: n not in range(8)),
    store=st.text(string.ascii_letters, min_size=1, max_size=20).filter(
        lambda s: s.upper() != "MY"
    ),
    subject=st.text(string.ascii_letters + " ,=", min_size=1, max_size=30),
)
def test_references_to_nothing(
    manager: TransferManager,
    stores: CertificateStores,
    pki: Pki,
    digest: str,
    location: int,
    store: str,
    subject: str,
) -> None:
    job = manager.create_job("cert")
    by_id = set_client_certificate_by_id
    if digest != pki.client_sha1:
        assert refused(job, lambda: by_id(job, stores, CU, "MY", digest)) == hr.CRYPT_E_NOT_FOUND
    assert refused(job, lambda: by_id(job, stores, location, "MY", pki.client_sha1)) == hr.E_NOTIMPL
    missing = refused(job, lambda: by_id(job, stores, CU, store, pki.client_sha1))
    assert missing == hr.hresult_from_win32(hr.ERROR_FILE_NOT_FOUND)
    if subject.lower() not in pki.client_subject.lower():
        by_name = set_client_certificate_by_name
        assert refused(job, lambda: by_name(job, stores, CU, "MY", subject)) == hr.CRYPT_E_NOT_FOUND


@SETTINGS
@given(content=st.binary(max_size=300), suffix=st.sampled_from([".pem", ".p12", ".crt", ".bin"]))
def test_unreadable_certificate_files(
    stores: CertificateStores, tmp_path_factory: pytest.TempPathFactory, content: bytes, suffix: str
) -> None:
    source = tmp_path_factory.mktemp("bad") / f"file{suffix}"
    source.write_bytes(content)
    before = tree(stores.root)
    with pytest.raises(BitsError) as caught:
        stores.import_file(CU, "MY", source)
    assert caught.value.hresult in (hr.E_INVALIDARG, ERROR_INVALID_PASSWORD)
    assert tree(stores.root) == before


@SETTINGS
@given(passphrase=st.text(min_size=0, max_size=30).filter(lambda p: p != PEM_PASSPHRASE))
@example(passphrase=".p1")  # a piece of the file's name (alice.p12) is no leak
def test_wrong_passphrases(stores: CertificateStores, pki: Pki, passphrase: str) -> None:
    before = tree(stores.root)
    expected = hr.E_INVALIDARG if "\x00" in passphrase else ERROR_INVALID_PASSWORD
    for source in (pki.client_encrypted_pem, pki.client_p12):
        with pytest.raises(BitsError) as caught:
            stores.import_file(CU, "OTHER", source, passphrase)
        assert caught.value.hresult == expected
        # The message does not depend on the passphrase, so it cannot hold it (a plain
        # 'not in' fails by chance when the passphrase is a piece of the file's name).
        other = "\x00other" if "\x00" in passphrase else "another wrong one"
        with pytest.raises(BitsError) as reference:
            stores.import_file(CU, "OTHER", source, other)
        assert caught.value.message == reference.value.message
    (entry,) = [c for c in stores.certificates(CU, "MY") if c.has_key]
    with pytest.raises(BitsError) as caught:
        stores.set_passphrase(CU, "MY", entry.path.name, passphrase)
    assert caught.value.hresult == expected
    assert tree(stores.root) == before


# -- the CLI verbs ---------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    """A parser like adapters/cli.py build_parser's, with only the HTTP verbs."""
    p = argparse.ArgumentParser(prog="backhaul")
    p.add_argument("--home")
    p.add_argument("--store")
    sub = p.add_subparsers(dest="verb", required=True)

    def verb(
        name: str, func: Callable[..., int], help_: str, job: bool = True
    ) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_)
        if job:
            sp.add_argument("job")
        sp.set_defaults(func=func)
        return sp

    add_http_verbs(sub, verb)
    return p


def cli(manager: TransferManager, home: Path, *argv: str) -> str:
    args = _parser().parse_args(["--home", str(home), *argv])
    out = io.StringIO()
    assert args.func(args, manager, out) == 0
    return out.getvalue()


def test_the_certificate_verbs_through_the_whole_command(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``backhaul importcertificate LOCATION STORE FILE`` and the job's by-id/by-name verbs
    through ``main``: the certificate store's name is not the global ``--store`` (the event
    store), which once took it, refused "MY" as not absolute, and made a SQLite database at
    an absolute name."""
    from backhaul.adapters.cli import main

    monkeypatch.delenv("BACKHAUL_CERTS", raising=False)
    for key in ("BACKHAUL_STORE", "BACKHAUL_HOME"):
        monkeypatch.delenv(key, raising=False)
    home = tmp_path / "home"

    def run(*argv: str) -> str:
        out = io.StringIO()
        assert main(["--home", str(home), *argv], out) == 0, out.getvalue()
        return out.getvalue()

    assert run("importcertificate", "CURRENT_USER", "MY", str(pki.client_pem)).startswith(
        f"{pki.client_sha1} "
    )
    assert (home / "certs" / "CURRENT_USER" / "MY").is_dir()
    job = run("create", "cert").strip()
    run("setclientcertificatebyname", job, "CURRENT_USER", "MY", "backhaul-alice")
    assert "subject: backhaul-alice" in run("getclientcertificate", job)
    run("setclientcertificatebyid", job, "CURRENT_USER", "MY", pki.client_sha1)
    assert f"hash: {pki.client_sha1}" in run("getclientcertificate", job)
    elsewhere = tmp_path / "OTHER"
    argv = ["--home", str(home), "importcertificate", "CURRENT_USER", str(elsewhere)]
    assert main([*argv, str(pki.client_pem)], io.StringIO()) == 1  # not a store name
    assert not elsewhere.exists()  # never an event store made at a certificate store's name


def test_the_cli_verbs(pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BACKHAUL_CERTS", raising=False)
    monkeypatch.setattr("sys.stdin", io.StringIO(PEM_PASSPHRASE + "\n"))
    with TransferManager("memory:", home=tmp_path) as m:
        job = m.create_job("cli")
        j = job.id
        added = cli(
            m,
            tmp_path,
            "importcertificate",
            "CURRENT_USER",
            "MY",
            str(pki.client_encrypted_pem),
            "--passphrase-stdin",
        )
        assert added.startswith(f"{pki.client_sha1} ") and "(with key)" in added
        assert (tmp_path / "certs" / "CURRENT_USER" / "MY").is_dir()
        cli(m, tmp_path, "setclientcertificatebyname", j, "CURRENT_USER", "my", "backhaul-alice")
        assert "subject: backhaul-alice" in cli(m, tmp_path, "getclientcertificate", j)
        cli(m, tmp_path, "setclientcertificatebyid", j, "0", "MY", pki.client_sha1.upper())
        assert f"hash: {pki.client_sha1}" in cli(m, tmp_path, "getclientcertificate", j)
        cli(m, tmp_path, "removeclientcertificate", j)
        assert cli(m, tmp_path, "getclientcertificate", j) == "no client certificate\n"
        cli(m, tmp_path, "setsecurityflags", j, "IGNORE_UNKNOWN_CA|REDIRECT_POLICY_DISALLOW")
        assert (
            cli(m, tmp_path, "getsecurityflags", j)
            == "0x0208 IGNORE_UNKNOWN_CA|REDIRECT_POLICY_DISALLOW\n"
        )
        (tmp_path / "more").write_text("X-Three: 3\n")
        cli(m, tmp_path, "setcustomheaders", j, "X-One: 1", f"@{tmp_path / 'more'}")
        assert cli(m, tmp_path, "getcustomheaders", j) == "X-One: 1\nX-Three: 3\n"
        cli(m, tmp_path, "setcustomheaders", j, "X-One: 1", "X-Two: two")
        assert cli(m, tmp_path, "getcustomheaders", j) == "X-One: 1\nX-Two: two\n"
        cli(m, tmp_path, "makecustomheaderswriteonly", j)
        cli(m, tmp_path, "sethttpmethod", j, "PURGE")
        assert cli(m, tmp_path, "gethttpmethod", j) == "PURGE\n"
        monkeypatch.setattr("sys.stdin", io.StringIO("from stdin\n"))
        cli(m, tmp_path, "setcredentials", j, "PROXY", "BASIC", "carol", "-")
        cli(m, tmp_path, "setcredentials", j, "server", "ntlm", "NULL", "NULL")
        assert job.credentials == [
            (AuthTarget.PROXY, AuthScheme.BASIC, "carol"),
            (AuthTarget.SERVER, AuthScheme.NTLM, None),
        ]
        assert cli(m, tmp_path, "removecredentials", j, "SERVER", "NTLM") == ""
        assert "S_FALSE" in cli(m, tmp_path, "removecredentials", j, "SERVER", "NTLM")
        cli(m, tmp_path, "setproxysettings", j, "OVERRIDE", "http=p1:8080 p2", "NULL")
        assert cli(m, tmp_path, "getproxysettings", j) == (
            "usage: OVERRIDE\nproxy list: http=p1:8080 p2\nbypass list: NULL\n"
        )
        cli(m, tmp_path, "setproxysettings", j, "NO_PROXY")
        assert cli(m, tmp_path, "getproxysettings", j).startswith("usage: NO_PROXY\n")
        before = len(m.store.stream(j))
        for argv, code in (
            (("getcustomheaders", j), hr.E_ACCESSDENIED),
            (("setclientcertificatebyid", j, "SOMEWHERE", "MY", pki.client_sha1), hr.E_NOTIMPL),
            (("setclientcertificatebyname", j, "CURRENT_USER", "NOPE", "alice"), 0x80070002),
            (
                ("setclientcertificatebyname", j, "CURRENT_USER", "MY", "nobody"),
                hr.CRYPT_E_NOT_FOUND,
            ),
            (("setsecurityflags", j, "0x40000"), hr.E_NOTIMPL),
            (("setsecurityflags", j, "IGNORE_EVERYTHING"), hr.E_INVALIDARG),
            (("setcustomheaders", j, "no colon here"), hr.E_INVALIDARG),
            (("setcredentials", j, "NOBODY", "BASIC", "u", "p"), hr.BG_E_INVALID_AUTH_TARGET),
            (("setcredentials", j, "SERVER", "KERBEROS", "u", "p"), hr.BG_E_INVALID_AUTH_SCHEME),
            (("setproxysettings", j, "SOMETIMES"), hr.E_NOTIMPL),
            (("setproxysettings", j, "OVERRIDE", "ftp=x"), hr.E_INVALIDARG),
            (("importcertificate", "CURRENT_USER", "MY", str(tmp_path / "absent.pem")), 0x80070002),
        ):
            args = _parser().parse_args(["--home", str(tmp_path), *argv])
            with pytest.raises(BitsError) as caught:
                args.func(args, m, io.StringIO())
            assert caught.value.hresult == code, argv
        assert len(m.store.stream(j)) == before
