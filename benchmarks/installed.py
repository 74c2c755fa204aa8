"""Child processes that run backhaul as an installed copy runs: with its bytecode compiled.

pip compiles a wheel's modules to bytecode at install time. A source checkout compiles each
module on its first import and caches it in ``__pycache__``, unless ``PYTHONDONTWRITEBYTECODE``
is set, in which case every ``backhaul`` child recompiles every module it imports: about 0.1 s
per process on the benchmark machines, a fixed cost no installed copy pays. The benchmarks
therefore compile the package once before timing anything, and start their children without
that variable.
"""

from __future__ import annotations

import compileall
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "transports", "adapters")


def compile_package() -> None:
    """Write the bytecode of backhaul's modules, as ``pip install`` does for a wheel."""
    for name in PACKAGES:
        if not compileall.compile_dir(ROOT / name, quiet=1):
            raise SystemExit(f"compiling {ROOT / name} failed")


def child_env(*, drop_prefix: str | None = None, drop: tuple[str, ...] = ()) -> dict[str, str]:
    """This process's environment for a backhaul child: without ``PYTHONDONTWRITEBYTECODE``,
    without the names in ``drop`` and those starting with ``drop_prefix``."""
    env = {}
    for key, value in os.environ.items():
        if key == "PYTHONDONTWRITEBYTECODE" or key in drop:
            continue
        if drop_prefix is not None and key.startswith(drop_prefix):
            continue
        env[key] = value
    return env
