"""Fixtures for the transport tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# tests/ is not a package: pytest puts tests/ itself on sys.path, so tests/peers is "peers".
from peers.nginx import NginxServer, running_nginx

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
