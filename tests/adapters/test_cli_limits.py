"""The command's BITS limits: ``addfileset`` past 200 files per job and ``create`` past 60
jobs per owner are refused (a typed BITS error, nothing recorded) unless the global
``--unlimited`` option or ``$BACKHAUL_UNLIMITED=1`` lifts them. Nothing is transferred: the
URLs point at a closed port and no engine runs."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from backhaul.adapters import manager as manager_module
from backhaul.adapters.cli import main
from backhaul.adapters.manager import TransferManager
from backhaul.core.limit import DEFAULT_LIMITS

BACKHAUL = Path(sys.executable).parent / "backhaul"
MAX_FILES = DEFAULT_LIMITS.max_files_per_job
MAX_JOBS = DEFAULT_LIMITS.max_jobs_per_owner
assert MAX_FILES == 200 and MAX_JOBS == 60  # BITS's defaults, which these tests cross by one


@pytest.fixture(autouse=True)
def _no_backhaul_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The store, home and limits come from each test's arguments, not from the caller."""
    for name in [k for k in os.environ if k.startswith("BACKHAUL_")]:
        monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def _not_admin(monkeypatch: pytest.MonkeyPatch) -> None:
    """A user, not root (whom BITS's limits spare, as they spare administrators): the verbs
    run in this process, where the check can be told so."""
    monkeypatch.setattr(manager_module, "_is_admin", lambda: False)


def run(home: Path, *argv: str) -> tuple[int, str]:
    """``backhaul --home HOME ARGV...`` in this process: the exit code and stdout."""
    out = io.StringIO()
    code = main(["--home", str(home), *argv], out)
    return code, out.getvalue()


def ok(home: Path, *argv: str) -> str:
    """``run`` of a verb that must succeed: its stdout."""
    code, out = run(home, *argv)
    assert code == 0, out
    return out


def create(home: Path, name: str, *options: str) -> str:
    code, out = run(home, *options, "create", name)
    assert code == 0, out
    return out.strip()


def list_file(tmp_path: Path, count: int) -> Path:
    dest = tmp_path / "dest"
    dest.mkdir(exist_ok=True)
    listing = tmp_path / f"files-{count}.txt"
    listing.write_text(
        "".join(f"http://127.0.0.1:1/f{i:04d}.bin {dest / f'f{i:04d}.bin'}\n" for i in range(count))
    )
    return listing


def stream_length(home: Path, job_id: str) -> int:
    with TransferManager(home=home) as manager:
        return len(list(manager.store.stream(job_id)))


def files_of(home: Path, job_id: str) -> int:
    with TransferManager(home=home) as manager:
        return len(manager.get_job(job_id).files())


def live_jobs(home: Path) -> int:
    with TransferManager(home=home) as manager:
        return len(list(manager.jobs()))


def test_addfileset_of_201_files_is_refused_without_unlimited_and_records_nothing(
    tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = create(home, "many")
    before = stream_length(home, job)

    code, _ = run(home, "addfileset", job, str(list_file(tmp_path, MAX_FILES + 1)))

    assert code == 1
    assert capsys.readouterr().err == (
        "backhaul addfileset: the job would hold 201 files; the limit is 200 "
        "[BG_E_TOO_MANY_FILES_IN_JOB 0x80200051] (--unlimited lifts BITS's limits)\n"
    )
    assert stream_length(home, job) == before  # all or nothing: no FilesAdded
    assert files_of(home, job) == 0


def test_addfileset_of_200_files_is_accepted_without_unlimited(tmp_path: Path, home: Path) -> None:
    job = create(home, "at the limit")

    assert run(home, "addfileset", job, str(list_file(tmp_path, MAX_FILES)))[0] == 0

    assert files_of(home, job) == MAX_FILES


def test_addfileset_of_201_files_is_accepted_with_unlimited(tmp_path: Path, home: Path) -> None:
    job = create(home, "many")
    listing = list_file(tmp_path, MAX_FILES + 1)

    assert run(home, "--unlimited", "addfileset", job, str(listing))[0] == 0

    assert files_of(home, job) == MAX_FILES + 1
    code, out = run(home, "getstate", job)  # the job still works under the default limits
    assert (code, out) == (0, "SUSPENDED\n")


def test_the_61st_create_is_refused_without_unlimited_and_accepted_with_it(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for i in range(MAX_JOBS):
        create(home, f"job {i}")
    capsys.readouterr()

    code, out = run(home, "create", "one too many")

    assert (code, out) == (1, "")
    err = capsys.readouterr().err
    assert err.startswith("backhaul create: ")
    assert err.rstrip().endswith(
        "[BG_E_TOO_MANY_JOBS_PER_USER 0x80200049] (--unlimited lifts BITS's limits)"
    )
    assert live_jobs(home) == MAX_JOBS  # nothing recorded

    job = create(home, "job 60", "--unlimited")

    assert live_jobs(home) == MAX_JOBS + 1
    code, out = run(home, "--unlimited", "getdisplayname", job)
    assert (code, out) == (0, "job 60\n")
    create(home, "job 61", "--unlimited")
    assert live_jobs(home) == MAX_JOBS + 2


@pytest.mark.parametrize(("value", "lifted"), [("1", True), ("true", True), ("0", False)])
def test_backhaul_unlimited_in_the_environment(
    tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch, value: str, lifted: bool
) -> None:
    job = create(home, "many")
    monkeypatch.setenv("BACKHAUL_UNLIMITED", value)

    code, _ = run(home, "addfileset", job, str(list_file(tmp_path, MAX_FILES + 1)))

    assert code == (0 if lifted else 1)
    assert files_of(home, job) == (MAX_FILES + 1 if lifted else 0)


def test_the_installed_command_takes_unlimited_before_the_verb(tmp_path: Path, home: Path) -> None:
    """The console script, as a user runs it: the global option goes before the verb."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKHAUL_")}
    job = create(home, "many")
    listing = list_file(tmp_path, MAX_FILES + 1)

    accepted = subprocess.run(
        [str(BACKHAUL), "--home", str(home), "--unlimited", "addfileset", job, str(listing)],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert accepted.returncode == 0, accepted.stderr
    assert files_of(home, job) == MAX_FILES + 1


def test_help_names_the_limits_that_unlimited_lifts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--unlimited lift BITS's per-job file limit (200) and per-owner job limit (60)" in text
    assert "$BACKHAUL_UNLIMITED=1" in text
