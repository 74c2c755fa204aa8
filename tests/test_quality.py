"""The project's own rules, run as tests: lint, format, types, the dependency rule."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PACKAGES = ("core", "transports", "adapters")


@pytest.fixture(scope="module")
def namespaced_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tree where backhaul/<pkg> links to the repository's <pkg>, as the install maps
    them, for tools that cannot follow the editable install's import hook."""
    top = tmp_path_factory.mktemp("ns")
    (top / "backhaul").mkdir()
    for pkg in PACKAGES:
        (top / "backhaul" / pkg).symlink_to(ROOT / pkg)
    return top


def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True, check=False
    )


def test_ruff_check_passes() -> None:
    result = _run([str(BIN / "ruff"), "check", "."], ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_applied() -> None:
    result = _run([str(BIN / "ruff"), "format", "--check", "."], ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_passes_on_core_and_transports(namespaced_tree: Path) -> None:
    result = _run(
        [
            str(BIN / "mypy"),
            "--strict",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--cache-dir",
            str(namespaced_tree / ".mypy_cache"),
            "-p",
            "backhaul.core",
            "-p",
            "backhaul.transports",
        ],
        namespaced_tree,
        MYPYPATH=str(namespaced_tree),
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_import_contracts_hold(namespaced_tree: Path) -> None:
    result = _run(
        [str(BIN / "lint-imports"), str(ROOT / "pyproject.toml")],
        namespaced_tree,
        PYTHONPATH=str(namespaced_tree),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


_BLOCKER = """
import importlib.abc, sys
BLOCKED = {"aiohttp", "smbprotocol", "eventsourcing", "cattrs", "psycopg", "asyncio", "sqlite3"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked: {name}")
sys.meta_path.insert(0, Block())
import pkgutil, importlib
import backhaul.core as core
names = [m.name for m in pkgutil.iter_modules(core.__path__, "backhaul.core.")]
for name in names:
    importlib.import_module(name)
print(len(names))
"""


def test_core_imports_without_io_libraries() -> None:
    result = _run([sys.executable, "-c", _BLOCKER], ROOT)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.strip()) >= 10


def test_no_tool_is_missing() -> None:
    for tool in ("ruff", "mypy", "lint-imports"):
        assert (BIN / tool).exists() or shutil.which(tool), tool
