"""Fixtures for the adapter tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# tests/ is not a package: pytest puts tests/ itself on sys.path, so tests/peers is "peers".
from peers.nginx import NginxServer, running_nginx

MiB = 1024 * 1024


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A backhaul home for the test (created by the first store opened in it)."""
    return tmp_path / "home"


# =================================================================================================
# nginx for the engine tests: one server per test session (tests/peers/nginx.py) serving a docroot
# of random files of a few MiB (ENGINE_FILES). Tests may add their own files to the docroot. If
# nginx cannot start, the fixture raises; it never skips.
# =================================================================================================


ENGINE_FILES = {"one.bin": 1 * MiB, "two.bin": 2 * MiB + 123, "three.bin": 3 * MiB - 7}


@pytest.fixture(scope="session")
def engine_nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NginxServer, Path]]:
    docroot = tmp_path_factory.mktemp("engine-www")
    for name, size in ENGINE_FILES.items():
        (docroot / name).write_bytes(os.urandom(size))
    with running_nginx(docroot) as server:
        yield server, docroot
