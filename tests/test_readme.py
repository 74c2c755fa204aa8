"""README.md is executable: its Python blocks run, and its set-up is the two commands."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_readme_python_block_runs(index: int) -> None:
    code = _blocks("python")[index]
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "readme"})


def test_readme_has_exactly_two_setup_commands() -> None:
    setup = README.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    commands = [
        line
        for block in re.findall(r"```sh\n(.*?)```", setup, flags=re.S)
        for line in block.splitlines()
        if line.strip()
    ]
    assert commands == ["bash .ci/main", "bash .ci/test"]
    for command in commands:
        assert (ROOT / command.split()[1]).exists()


def test_ci_runs_the_readme_test_command() -> None:
    setup = README.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    test_command = re.findall(r"```sh\n(.*?)```", setup, flags=re.S)[-1].strip()
    run = (ROOT / ".ci" / "run").read_text()
    assert f"exec {test_command}" in run  # the same command, from the repository root
    assert 'cd "$(dirname "$0")/.."' in run
