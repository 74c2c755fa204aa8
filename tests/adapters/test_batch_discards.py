"""A batch's Cancel and Complete delete temp files after the batch commits; a process killed
between the commit and the deletions used to leave them for good (no engine looks at a
final job again). The batch now names those jobs in a journal in the home first, and the
next engine (or ``TransferManager.finish_discards``) deletes the temp files of the jobs the
journal names that are final, and keeps those of jobs that are not (a batch that never
committed). The kill is real: a child process on the same SQLite home exits hard at the
first deletion after the commit."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_engine import make_engine

from backhaul.adapters import localfile
from backhaul.adapters.manager import TransferJob, TransferManager
from backhaul.core import command as cmd
from backhaul.core.vocabulary import JobState

# The child: jobs of two files each, the first transferred and the second checkpointed,
# then one batch that cancels the first job and completes the second (a partial Complete:
# the checkpointed file's temp is discarded after the commit), killed at the first
# deletion after the commit. It prints the jobs' ids.
CHILD = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    from backhaul.adapters import localfile
    from backhaul.adapters.manager import TransferManager
    from backhaul.core import command as cmd

    home, out, commit = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "commit"
    m = TransferManager(home=home)
    ids = []
    for name in ("cancelled", "completed"):
        job = m.create_job(name)
        job.add_files([(f"http://127.0.0.1:9/{name}-{i}", str(out / f"{name}-{i}")) for i in (0, 1)])
        job.resume()
        for c in (cmd.StartTransfer(), cmd.Connect()):
            m.execute(job.id, c)
        for i, size in ((0, 10), (1, 4)):
            localfile.temp_path(job.id, i, str(out / f"{name}-{i}")).write_bytes(b"x" * size)
        m.execute(job.id, cmd.FinishFile(0, 10))
        m.execute(job.id, cmd.Checkpoint(1, 4, 100))
        ids.append(job.id)
    print(json.dumps(ids), flush=True)
    localfile.discard = lambda *a, **k: os._exit(9)  # killed right after the commit
    cancelled, completed = (m.get_job(i) for i in ids)
    with m.batch():
        cancelled.cancel()
        completed.complete()
        if not commit:
            raise SystemExit(3)  # abandoned: nothing is appended, nothing is deleted
    """
)


def run_child(home: Path, out: Path, mode: str) -> tuple[int, list[str]]:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(home), str(out), mode],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout.splitlines()[0])


def temps(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.endswith(localfile.TEMP_SUFFIX))


@pytest.fixture(autouse=True)
def _no_store_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BACKHAUL_STORE", raising=False)
    monkeypatch.delenv("BACKHAUL_HOME", raising=False)


@pytest.mark.parametrize("cleaner", ["finish_discards", "engine"])
def test_temp_files_of_a_batch_killed_after_its_commit_are_deleted_later(
    tmp_path: Path, cleaner: str
) -> None:
    home, out = tmp_path / "home", tmp_path / "out"
    out.mkdir()
    code, (cancelled, completed) = run_child(home, out, "commit")
    assert code == 9  # killed at the first deletion, after the commit
    m = TransferManager(home=home)
    assert m.get_job(cancelled, include_final=True).state is JobState.CANCELLED
    assert m.get_job(completed, include_final=True).state is JobState.ACKNOWLEDGED
    assert (out / "completed-0").read_bytes() == b"x" * 10  # published before the commit
    assert len(temps(out)) == 3  # what the kill left: both of one job, one of the other
    assert len(list((home / "discards").glob("*.json"))) == 1

    if cleaner == "finish_discards":
        assert m.finish_discards() == 1
    else:
        asyncio.run(make_engine(m).run(until_idle=True))
    assert temps(out) == []
    assert sorted(p.name for p in out.iterdir()) == ["completed-0"]
    assert list((home / "discards").glob("*")) == []


def test_a_batch_that_never_committed_keeps_its_temp_files(tmp_path: Path) -> None:
    home, out = tmp_path / "home", tmp_path / "out"
    out.mkdir()
    code, ids = run_child(home, out, "abandon")
    assert code == 3
    m = TransferManager(home=home)
    assert [m.get_job(i).state for i in ids] == [JobState.TRANSFERRING] * 2
    assert m.finish_discards() == 0  # no journal: the batch never reached its commit
    assert len(temps(out)) == 4


def test_a_journal_naming_live_jobs_deletes_nothing(tmp_path: Path) -> None:
    """A batch whose append failed after its journal was written (another writer's event
    in between): its jobs are live, and their bytes stay."""
    m = TransferManager(home=tmp_path / "home")
    job: TransferJob = m.create_job("live")
    job.add_file("http://127.0.0.1:9/f", str(tmp_path / "f"))
    job.resume()
    m.execute(job.id, cmd.StartTransfer())
    temp = localfile.temp_path(job.id, 0, str(tmp_path / "f"))
    temp.write_bytes(b"kept")
    journal = m._journal_discards([job.id])
    assert journal is not None and journal.exists()
    assert m.finish_discards() == 1
    assert temp.read_bytes() == b"kept" and not journal.exists()
    assert os.listdir(tmp_path / "home" / "discards") == []


def test_on_postgresql_the_journal_lies_beside_the_homes_key(
    tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same on a PostgreSQL store: its home (the secret key's folder) keeps the
    journal. Here the deletion after the commit raises, a stand-in for the kill (the
    batch's exception comes after its append), and the next engine deletes the file."""
    home, out = tmp_path / "home", tmp_path / "out"
    out.mkdir()
    m = TransferManager(postgres_url, home=home)
    job = m.create_job("cancelled in a batch")
    job.add_file("http://127.0.0.1:9/f", str(out / "f"))
    job.resume()
    m.execute(job.id, cmd.StartTransfer())
    localfile.temp_path(job.id, 0, str(out / "f")).write_bytes(b"part")
    m.execute(job.id, cmd.Checkpoint(0, 4, 100))

    def killed(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("killed after the commit")

    real = localfile.discard
    monkeypatch.setattr(localfile, "discard", killed)
    with pytest.raises(RuntimeError), m.batch():
        job.cancel()
    monkeypatch.setattr(localfile, "discard", real)
    assert m.get_job(job.id, include_final=True).state is JobState.CANCELLED
    assert len(temps(out)) == 1
    assert m.store.secrets.file is not None
    assert len(list((Path(m.store.secrets.file).parent / "discards").glob("*.json"))) == 1
    asyncio.run(make_engine(m).run(until_idle=True))
    assert temps(out) == []
    m.close()
