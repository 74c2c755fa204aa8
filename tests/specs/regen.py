"""Write the generated spec files in specs/ from the code (backhaul.core.diagram).

Run from anywhere:  .venv/bin/python tests/specs/regen.py          (rewrite what is stale)
                    .venv/bin/python tests/specs/regen.py --check  (exit 1 if one is stale)

It writes the whole of each file in ``GENERATED`` and, in the hand-written
specs/state-machine.md, only the body of the ```mermaid block. tests/specs/test_specs_golden.py
imports this module and checks the same things.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType

from backhaul.core import diagram, failure_table

ROOT = Path(__file__).resolve().parents[2]
SPECS = ROOT / "specs"
PROSE = SPECS / "state-machine.md"
MERMAID_BLOCK = re.compile(r"(^```mermaid\n)(.*?)(^```$)", re.MULTILINE | re.DOTALL)


def state_table() -> str:
    return diagram.table_markdown() + "\n" + diagram.decisions_markdown()


# file name in specs/ -> the function whose output it holds, exactly.
GENERATED: Mapping[str, Callable[[], str]] = MappingProxyType(
    {
        "state-table.md": state_table,
        "state-table.csv": diagram.table_csv,
        "state-diagram.mmd": diagram.mermaid,
        "failures.md": failure_table.failures_markdown,
    }
)


def mermaid_blocks(text: str) -> list[str]:
    """The bodies of the ```mermaid blocks of a Markdown text."""
    return [m.group(2) for m in MERMAID_BLOCK.finditer(text)]


def with_current_mermaid(text: str) -> str:
    """``text`` with the body of every ```mermaid block replaced by ``diagram.mermaid()``."""
    body = diagram.mermaid()
    return MERMAID_BLOCK.sub(lambda m: m.group(1) + body + m.group(3), text)


def _read(path: Path) -> str | None:
    return path.read_text(encoding="utf-8") if path.is_file() else None


def stale() -> list[str]:
    """The spec files that differ from what the code renders."""
    out = [name for name, render in GENERATED.items() if _read(SPECS / name) != render()]
    prose = _read(PROSE)
    if prose is not None and with_current_mermaid(prose) != prose:
        out.append(PROSE.name)
    return out


def _write(path: Path, text: str) -> None:
    if _read(path) == text:
        print(f"specs/{path.name} is up to date")
        return
    path.write_text(text, encoding="utf-8", newline="\n")
    print(f"wrote specs/{path.name}")


def main(argv: list[str]) -> int:
    if "--check" in argv:
        names = stale()
        for name in names:
            print(f"specs/{name} is out of date; run .venv/bin/python tests/specs/regen.py")
        return 1 if names else 0
    SPECS.mkdir(exist_ok=True)
    for name, render in GENERATED.items():
        _write(SPECS / name, render())
    prose = _read(PROSE)
    if prose is not None:
        _write(PROSE, with_current_mermaid(prose))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
