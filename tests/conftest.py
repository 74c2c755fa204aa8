"""Shared pytest fixtures. Add new fixtures in their own section below."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

# tests/ is not a package: pytest puts tests/ itself on sys.path, so tests/peers is "peers".
from peers.postgres import (
    PostgresServer,
    create_database,
    drop_database,
    running_postgres,
    unique_database_name,
)

# =================================================================================================
# PostgreSQL: one throwaway cluster per test session (tests/peers/postgres.py), a fresh database
# per test. If the server cannot start, these fixtures raise (the test errors); they never skip.
# =================================================================================================


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    with running_postgres() as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server: PostgresServer, request: pytest.FixtureRequest) -> Iterator[str]:
    """postgresql://user:password@127.0.0.1:port/<new database>, dropped after the test."""
    name = unique_database_name(request.node.name)
    url = create_database(postgres_server, name)
    yield url
    if postgres_server.is_running():  # a test may have stopped the server
        drop_database(postgres_server, name)
