"""The reliability suite (tests/reliability): several engine processes on one PostgreSQL log,
kill -9, PostgreSQL restarts, disk full, server faults, many jobs.

Run alone at full size with ``BACKHAUL_RELIABILITY=full``; the default (CI) size keeps the
whole directory under about three minutes on two cores::

    .venv/bin/python -m pytest tests/reliability -q                       # CI size
    BACKHAUL_RELIABILITY=full .venv/bin/python -m pytest tests/reliability -q

Every run prints a one-line JSON summary (``-s`` shows it) and ends with the common checks of
``reliability_helpers.py``: final states, SHA-256 of every published file, no temp file left,
bounded refetching, and (PostgreSQL) no event appended by a fenced worker.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# tests/reliability is not a package: make its helpers importable by module name.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from reliability_helpers import FULL  # noqa: E402


@pytest.fixture(autouse=True)
def _no_store_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """BACKHAUL_STORE / BACKHAUL_HOME would win over the tests' own stores."""
    monkeypatch.delenv("BACKHAUL_STORE", raising=False)
    monkeypatch.delenv("BACKHAUL_HOME", raising=False)


def pytest_report_header(config: pytest.Config) -> str:
    return f"backhaul reliability suite: {'FULL' if FULL else 'CI'} size"
