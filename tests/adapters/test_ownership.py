"""TakeOwnership (bits-core.md §15) and the command's ``takeownership`` and ``reset``: an
administrator makes another user's job theirs, and the job loses what belonged to the old
owner (credentials, custom headers, the notify command line); ``reset`` cancels every job of
the caller (``--all``: of every user)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_cli_limits import (  # the autouse fixture keeps BACKHAUL_* out
    _no_backhaul_environment,  # noqa: F401
    run,
)

from backhaul.adapters import manager as manager_module
from backhaul.adapters.manager import TransferManager, current_owner
from backhaul.adapters.store import DB_FILE
from backhaul.core import event as ev
from backhaul.core import hresult
from backhaul.core.error import BitsError
from backhaul.core.vocabulary import AuthScheme, AuthTarget, JobState

HEADER_SECRET = "X-Token: owner-Marker-7f1"


@pytest.fixture
def alice(home: Path) -> Iterator[TransferManager]:
    with TransferManager(home=home, owner="alice") as m:
        yield m


def alices_job(alice: TransferManager, tmp_path: Path) -> str:
    job = alice.create_job("alice's")
    job.add_file("https://example.com/a.bin", tmp_path / "a.bin")
    job.set_credentials(AuthTarget.SERVER, AuthScheme.BASIC, "alice", "alice-pw")
    job.set_custom_headers(HEADER_SECRET + "\r\n")
    job.set_notify_cmdline("/bin/true", "true", "done")
    return job.id


def test_an_administrator_takes_a_job_and_the_old_owners_secrets_go(
    tmp_path: Path, home: Path, alice: TransferManager
) -> None:
    job_id = alices_job(alice, tmp_path)

    with TransferManager(home=home, owner="root") as admin:
        job = admin.get_job(job_id)
        job.take_ownership()
        assert job.owner == "root"
        assert job.credentials == []
        assert job.custom_headers is None
        assert job.notify_cmdline is None
        assert [f.remote_name for f in job.files()] == ["https://example.com/a.bin"]
        assert job.state is JobState.SUSPENDED  # the state does not change
        taken = [
            r.event for r in admin.store.stream(job_id) if isinstance(r.event, ev.OwnershipTaken)
        ]
        assert [e.owner for e in taken] == ["root"]
        assert [j.id for j in admin.jobs()] == [job_id]

    # alice's own listing no longer holds it
    assert [j.id for j in alice.jobs()] == []
    with sqlite3.connect(home / DB_FILE) as db:
        owners = [row[0] for row in db.execute("SELECT owner FROM backhaul_job_views")]
    assert owners == ["root"]


def test_only_an_administrator_takes_ownership(
    tmp_path: Path, home: Path, alice: TransferManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = alices_job(alice, tmp_path)
    monkeypatch.setattr(manager_module, "_is_admin", lambda: False)
    with pytest.raises(BitsError) as refused:
        alice.get_job(job_id).take_ownership()
    assert refused.value.hresult == hresult.E_ACCESSDENIED
    assert alice.get_job(job_id).credentials == [(AuthTarget.SERVER, AuthScheme.BASIC, "alice")]


def test_a_final_job_cannot_be_taken(tmp_path: Path, home: Path, alice: TransferManager) -> None:
    job_id = alices_job(alice, tmp_path)
    alice.get_job(job_id).cancel()
    with TransferManager(home=home, owner="root") as admin:
        job = admin.get_job(job_id, include_final=True)
        with pytest.raises(BitsError) as refused:
            job.take_ownership()
        assert refused.value.hresult == hresult.BG_E_INVALID_STATE
        assert job.owner == "alice"


def test_the_command_takes_ownership_and_resets(
    tmp_path: Path, home: Path, alice: TransferManager
) -> None:
    job_id = alices_job(alice, tmp_path)
    mine = alice.create_job("alice's second").id

    code, out = run(home, "takeownership", job_id[:8])
    assert code == 0, out
    assert alice.get_job(job_id, include_final=True).owner == current_owner()

    assert run(home, "reset") == (0, "1 job(s) cancelled\n")  # the job taken, not alice's
    assert alice.get_job(job_id, include_final=True).state is JobState.CANCELLED
    assert alice.get_job(mine).state is JobState.SUSPENDED
    assert run(home, "reset", "--all") == (0, "1 job(s) cancelled\n")
    assert alice.get_job(mine, include_final=True).state is JobState.CANCELLED
    assert run(home, "reset") == (0, "0 job(s) cancelled\n")
