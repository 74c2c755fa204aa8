"""Fixtures for the transport tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# tests/ is not a package: pytest puts tests/ itself on sys.path, so tests/peers is "peers".
from peers.apache import ApacheServer, running_apache
from peers.nginx import (
    BASIC_PASSWORD,
    BASIC_USER,
    NginxServer,
    NginxTls,
    Pki,
    make_pki,
    running_nginx,
)
from peers.squid import SquidServer, running_squid

BLOB_SIZE = 3 * 1024 * 1024

# =================================================================================================
# nginx: one server per test session (tests/peers/nginx.py) serving a docroot with a 3 MiB random
# file (blob.bin), an empty file (empty.bin) and a small text file (hello.txt). Tests may add their
# own files to the docroot. If nginx cannot start, the fixture raises; it never skips.
# =================================================================================================


@pytest.fixture(scope="session")
def nginx_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NginxServer, Path]]:
    docroot = tmp_path_factory.mktemp("nginx-www")
    (docroot / "blob.bin").write_bytes(os.urandom(BLOB_SIZE))
    (docroot / "empty.bin").write_bytes(b"")
    (docroot / "hello.txt").write_text("hello from nginx\n")
    with running_nginx(docroot) as server:
        yield server, docroot


# =================================================================================================
# HTTP options (tests/transports/test_http_options_*.py): a PKI made with trustme (CA, server
# certificate for 127.0.0.1, client certificates from that CA and from a foreign one, as PEM with
# a plain key, PEM with an encrypted key, and PKCS#12), an nginx that requires client
# certificates over HTTPS and Basic auth under /private/, an apache2 with Digest auth, and a squid
# with an open and a Basic-auth port. Session-scoped; each raises (never skips) when its server
# cannot start.
# =================================================================================================


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """CA, server and client certificates (tests/peers/nginx.py make_pki)."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def nginx_tls(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[NginxServer]:
    """nginx with ``tls_url`` (client certificates from ``pki.ca`` required: HTTP 400 without)
    and Basic auth (BASIC_USER / BASIC_PASSWORD) under /private/ on both servers. Docroot:
    blob.bin (1 MiB random), hello.txt, private/secret.txt."""
    docroot = tmp_path_factory.mktemp("nginx-tls-www")
    (docroot / "blob.bin").write_bytes(os.urandom(1024 * 1024))
    (docroot / "hello.txt").write_text("hello from nginx\n")
    (docroot / "private").mkdir()
    (docroot / "private" / "secret.txt").write_text("top secret\n")
    tls = NginxTls(pki.server_pem, pki.server_key, pki.ca_pem)
    with running_nginx(docroot, tls=tls, basic_auth=(BASIC_USER, BASIC_PASSWORD)) as server:
        yield server


@pytest.fixture(scope="session")
def apache_server() -> Iterator[ApacheServer]:
    """apache2 with Digest auth under /digest/ (tests/peers/apache.py)."""
    with running_apache() as server:
        yield server


@pytest.fixture(scope="session")
def squid_server() -> Iterator[SquidServer]:
    """squid: ``url`` open, ``auth_url`` Basic auth (tests/peers/squid.py)."""
    with running_squid() as server:
        yield server
