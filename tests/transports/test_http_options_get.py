"""`backhaul get` with curl's TLS and proxy options, against real servers: `--cacert FILE`
(the job's ca_bundle), `-k` (the BG_SSL_IGNORE_* security flags) against an nginx whose
certificate comes from the tests' own CA, and `-x PROXY` (SetProxySettings OVERRIDE) through
squid. A rerun that picks the job up takes this run's options, as it does for the others."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from peers.nginx import NginxServer, NginxTls, Pki, running_nginx
from peers.squid import SquidServer

from backhaul.adapters.cli import main
from backhaul.adapters.manager import TransferManager
from backhaul.core.vocabulary import JobState, ProxyUsage, SecurityFlags

IGNORED = (
    SecurityFlags.IGNORE_CERT_CN_INVALID
    | SecurityFlags.IGNORE_CERT_DATE_INVALID
    | SecurityFlags.IGNORE_UNKNOWN_CA
    | SecurityFlags.IGNORE_CERT_WRONG_USAGE
)


@pytest.fixture(autouse=True)
def _no_backhaul_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("BACKHAUL_STORE", "BACKHAUL_HOME", "http_proxy", "https_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def https_nginx(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[NginxServer]:
    """nginx over HTTPS with a certificate from the tests' CA, no client certificate asked."""
    docroot = tmp_path_factory.mktemp("https-www")
    (docroot / "f.bin").write_bytes(os.urandom(200 * 1024))
    tls = NginxTls(pki.server_pem, pki.server_key, pki.ca_pem, require_client=False)
    with running_nginx(docroot, tls=tls) as server:
        yield server


def get(home: Path, *argv: str) -> int:
    return main(["--home", str(home), "get", "-q", *argv], io.StringIO())


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def the_job(home: Path) -> tuple[JobState, int, str | None, ProxyUsage]:
    with TransferManager(home=home) as m:
        (job,) = m.jobs(include_final=True)
        flags = int(job.security_flags)
        return job.state, flags, job.ca_bundle, ProxyUsage(job.proxy_settings.usage)


def test_get_trusts_a_ca_file_given_with_cacert(
    tmp_path: Path, pki: Pki, https_nginx: NginxServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert https_nginx.tls_url is not None
    url, dest = f"{https_nginx.tls_url}/f.bin", tmp_path / "f.bin"
    assert get(tmp_path / "refused", url, str(dest)) == 1  # the tests' CA is not the system's
    err = capsys.readouterr().err
    assert "ERROR_WINHTTP_SECURE_FAILURE" in err
    assert err.rstrip().endswith("(--cacert FILE trusts the CAs in FILE; -k skips the checks)")
    assert not dest.exists()

    home = tmp_path / "home"
    assert get(home, "--cacert", str(pki.ca_pem), url, str(dest)) == 0
    assert digest(dest) == digest(https_nginx.docroot / "f.bin")
    state, flags, bundle, _ = the_job(home)
    assert (state, flags & IGNORED, bundle) == (JobState.ACKNOWLEDGED, 0, str(pki.ca_pem))


def test_get_insecure_skips_the_certificate_checks(
    tmp_path: Path, https_nginx: NginxServer
) -> None:
    assert https_nginx.tls_url is not None
    dest = tmp_path / "f.bin"
    assert get(tmp_path / "home", "-k", f"{https_nginx.tls_url}/f.bin", str(dest)) == 0
    assert digest(dest) == digest(https_nginx.docroot / "f.bin")
    assert the_job(tmp_path / "home")[1] & IGNORED == IGNORED


def test_get_through_a_proxy_given_with_x(
    tmp_path: Path, squid_server: SquidServer, https_nginx: NginxServer
) -> None:
    url, dest = f"{https_nginx.url}/f.bin", tmp_path / "f.bin"
    assert get(tmp_path / "home", "-x", squid_server.url, url, str(dest)) == 0
    assert digest(dest) == digest(https_nginx.docroot / "f.bin")
    assert any(line[2] == url for line in squid_server.access_lines())
    assert the_job(tmp_path / "home")[3] is ProxyUsage.OVERRIDE


def test_get_refuses_a_missing_cacert_and_a_bad_proxy_and_leaves_no_job(
    tmp_path: Path, https_nginx: NginxServer, capsys: pytest.CaptureFixture[str]
) -> None:
    home, dest = tmp_path / "home", tmp_path / "f.bin"
    # Found before any job is made: exit 2, as README gives for a command line refused so.
    assert get(home, "--cacert", str(tmp_path / "none.pem"), https_nginx.url, str(dest)) == 2
    err = capsys.readouterr().err
    assert "--cacert" in err and "no such file" in err
    assert get(home, "-x", "not a proxy!", f"{https_nginx.url}/f.bin", str(dest)) == 1
    assert "invalid proxy list entries" in capsys.readouterr().err
    with TransferManager(home=home) as m:
        # --cacert is refused before a job is made; the proxy list when it is set (cancelled)
        assert [j.state for j in m.jobs(include_final=True)] == [JobState.CANCELLED]
