"""The audit tools (adapters/audit.py) and their CLI verbs (adapters/cli_audit.py).

- history and state_at replay a job's stream (text and JSON);
- export/import reproduce a store exactly: the same stored bytes, the same read models,
  on SQLite and from SQLite into PostgreSQL; an import refuses a non-empty store and a
  damaged export, writing nothing;
- rebuild restores damaged read models; verify finds an edited, deleted or reordered
  stored event (changed with sqlite3 on the raw file) and reports job id, version, what;
- no output, and no byte of the store, holds a planted secret in plain text.
The CLI verbs run through a parser built with ``add_audit_parser`` (and through the
main command) and a real ``TransferManager``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sqlite3
import stat
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import attrs
import psycopg
import pytest

from backhaul.adapters import audit
from backhaul.adapters.audit import AuditError, Problem
from backhaul.adapters.cli_audit import add_audit_parser
from backhaul.adapters.clock import ManualClock
from backhaul.adapters.manager import TransferManager
from backhaul.adapters.projection import view_row
from backhaul.adapters.secret import SealedUnreadable
from backhaul.adapters.store import DB_FILE, EventStore
from backhaul.adapters.view import ViewRow
from backhaul.core import command as cmd
from backhaul.core import hresult
from backhaul.core.error import BitsError
from backhaul.core.event import (
    POLICY_STREAM,
    JobCancelled,
    JobCreated,
    JobResumed,
    PolicyChanged,
)
from backhaul.core.job import fold
from backhaul.core.value import JobError
from backhaul.core.vocabulary import (
    AuthScheme,
    AuthTarget,
    ErrorContext,
    JobPriority,
    JobState,
    JobType,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)  # ManualClock's start
PASSWORD = "pw-Marker-7f3a9c"
HEADER_SECRET = "hdr-Marker-1b2d4e"
URL_PASSWORD = "url-Marker-99c1"
SECRETS = (PASSWORD, HEADER_SECRET, URL_PASSWORD)
SEALED = SECRETS  # the API seals all three (the URL's password too)


# -- helpers ---------------------------------------------------------------------------------


@attrs.frozen
class Jobs:
    rich: str
    done: str
    dropped: str
    upload: str

    def all(self) -> list[str]:
        return [self.rich, self.done, self.dropped, self.upload]


def populate(m: TransferManager, tmp: Path) -> Jobs:
    """Four jobs with varied histories through the real API and the engine's commands;
    the clock moves 10 s before each engine step (the times are distinct)."""
    clock = m.clock
    assert isinstance(clock, ManualClock)

    def step(job_id: str, *commands: cmd.Command) -> None:
        for command in commands:
            clock.advance(10)
            m.execute(job_id, command)

    rich = m.create_job("rich")  # v1 at T0
    rich.add_file(
        f"https://user:{URL_PASSWORD}@example.com/a.bin",
        tmp / "a.bin",
        ranges=[(0, 100), (200, None)],
    )  # v2
    rich.add_file("https://example.com/b.bin", tmp / "b.bin")  # v3
    rich.description = "the rich one"  # v4
    rich.priority = JobPriority.HIGH  # v5
    rich.set_credentials(AuthTarget.SERVER, AuthScheme.BASIC, "alice", PASSWORD)  # v6
    rich.set_custom_headers(f"X-Api-Key: {HEADER_SECRET}\r\n")  # v7
    rich.resume()  # v8 QUEUED at T0
    step(
        rich.id,
        cmd.StartTransfer(),  # v9 CONNECTING at +10
        cmd.Connect(),  # v10 TRANSFERRING at +20
        cmd.Checkpoint(0, 50, 100),  # v11 at +30
        cmd.FinishFile(0, 100),  # v12 at +40
        cmd.Fail(JobError(ErrorContext.REMOTE_FILE, hresult.BG_E_CONNECT_FAILURE), True),  # v13
        cmd.Retry(),  # v14 QUEUED at +60
    )
    done = m.create_job("done")
    done.add_file("https://example.com/c.bin", tmp / "c.bin")
    done.resume()
    step(done.id, cmd.StartTransfer(), cmd.Connect(), cmd.FinishFile(0, 2048), cmd.FinishJob())
    step(done.id, cmd.Complete((0,)))
    dropped = m.create_job("dropped")
    dropped.add_file("https://example.com/d.bin", tmp / "d.bin")
    dropped.cancel()
    (tmp / "e.bin").write_bytes(b"upload me")
    upload = m.create_job("upload", JobType.UPLOAD)
    upload.add_file("https://example.com/upload", tmp / "e.bin")
    m.refresh_views()
    return Jobs(rich.id, done.id, dropped.id, upload.id)


def cli(m: TransferManager, *argv: str) -> tuple[int, str]:
    """Run ``backhaul audit ARGV`` through a parser that has only the audit verbs."""
    parser = argparse.ArgumentParser(prog="backhaul")
    add_audit_parser(parser.add_subparsers(dest="verb", required=True))
    args = parser.parse_args(["audit", *argv])
    out = io.StringIO()
    code = args.func(args, m, out)
    return code, out.getvalue()


def rows_of(store: EventStore) -> dict[str, ViewRow]:
    return {r.job_id: r for r in store.views.select(None, include_final=True, with_doc=True)}


def raw_states(store: EventStore) -> list[tuple[str, int, str, bytes]]:
    return [
        (str(UUID(str(n.originator_id))), n.originator_version, n.topic, bytes(n.state))
        for n in store.raw_read_all()
    ]


def export_text(store: EventStore) -> str:
    out = io.StringIO()
    audit.export(store, out)
    return out.getvalue()


def import_text(store: EventStore, text: str) -> audit.ImportSummary:
    return audit.import_(store, io.StringIO(text))


def sqlite_exec(db: Path, sql: str, *params: Any) -> int:
    """Change the raw SQLite file behind the store's back; returns the rows changed."""
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
        changed = conn.execute(sql, params).rowcount
        conn.commit()
    return changed


def hex_id(job_id: str) -> str:
    return UUID(job_id).hex  # eventsourcing's SQLite recorder stores UUIDs as 32 hex digits


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def manager(home: Path) -> Iterator[TransferManager]:
    with TransferManager(home=home, owner="auditor", clock=ManualClock()) as m:
        yield m


@pytest.fixture
def jobs(manager: TransferManager, tmp_path: Path) -> Jobs:
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    return populate(manager, downloads)


def reopen(home: Path) -> TransferManager:
    return TransferManager(home=home, owner="auditor", clock=ManualClock())


# -- history ---------------------------------------------------------------------------------


def test_history_lists_every_event_with_the_state_it_led_to(
    manager: TransferManager, jobs: Jobs
) -> None:
    entries = audit.history(manager.store, jobs.rich)

    assert [e.version for e in entries] == list(range(1, 15))
    assert [e.event_type for e in entries] == [
        "JobCreated",
        "FilesAdded",
        "FilesAdded",
        "PropertySet",
        "PropertySet",
        "CredentialsSet",
        "CustomHeadersSet",
        "JobResumed",
        "TransferStarted",
        "Connected",
        "BytesCheckpointed",
        "FileTransferred",
        "ErrorOccurred",
        "RetryStarted",
    ]
    states = [e.state for e in entries]
    assert states[:7] == ["SUSPENDED"] * 7
    assert states[7:] == [
        "QUEUED",
        "CONNECTING",
        "TRANSFERRING",
        "TRANSFERRING",
        "TRANSFERRING",
        "TRANSIENT_ERROR",
        "QUEUED",
    ]
    assert entries[12].at == T0 + timedelta(seconds=50)
    assert all(e.link and len(e.link) == 64 for e in entries)
    assert [e.event for e in entries] == [a.event for a in manager.store.stream(jobs.rich)]


def test_history_text_is_one_readable_line_per_event(manager: TransferManager, jobs: Jobs) -> None:
    text = audit.history_to_text(audit.history(manager.store, jobs.rich))
    lines = text.splitlines()

    assert lines[0] == f'job {jobs.rich} "rich" (DOWNLOAD, owner auditor): 14 event(s)'
    assert len(lines) == 15
    assert lines[6].split()[:4] == ["6", "2026-01-01T00:00:00+00:00", "CredentialsSet", "SUSPENDED"]
    assert 'target="SERVER" scheme="BASIC" user_name="alice" password="<redacted>"' in lines[6]
    assert (
        f"BG_E_CONNECT_FAILURE ({hresult.format_hresult(hresult.BG_E_CONNECT_FAILURE)})"
        in lines[13]
    )
    assert "in REMOTE_FILE" in lines[13]
    assert "TRANSIENT_ERROR" in lines[13]
    assert "2 file(s)" not in text
    assert "1 file(s): https://user:<redacted>@example.com/a.bin" in text


def test_history_shows_the_first_files_of_a_large_addfileset_and_counts_the_rest(
    manager: TransferManager, tmp_path: Path
) -> None:
    """An AddFileSet of 1,000 files made a history line of 70 KB; --json keeps them all."""
    job = manager.create_job("many")
    job.add_files([(f"https://example.com/{i}.bin", tmp_path / f"{i}.bin") for i in range(12)])
    text = audit.history_to_text(audit.history(manager.store, job.id))
    line = next(x for x in text.splitlines() if "FilesAdded" in x)
    assert line.endswith(
        f"12 file(s): https://example.com/0.bin -> {tmp_path / '0.bin'}; "
        + "; ".join(f"https://example.com/{i}.bin -> {tmp_path / f'{i}.bin'}" for i in range(1, 5))
        + "; and 7 more (--json lists them all)"
    )
    entry = next(e for e in audit.history(manager.store, job.id) if e.event_type == "FilesAdded")
    assert len(entry.to_dict()["fields"]["files"]) == 12


def test_history_json_has_the_documented_fields(manager: TransferManager, jobs: Jobs) -> None:
    code, out = cli(manager, "history", jobs.rich, "--json")
    data = json.loads(out)

    assert code == 0
    assert data["job_id"] == jobs.rich
    assert len(data["events"]) == 14
    first = data["events"][0]
    assert set(first) == {
        "job_id",
        "version",
        "at",
        "type",
        "topic",
        "trigger",
        "state",
        "fields",
        "hash",
        "problem",
    }
    assert first["fields"] == {
        "job_id": jobs.rich,
        "job_type": "DOWNLOAD",
        "display_name": "rich",
        "owner": "auditor",
    }
    ranges = data["events"][1]["fields"]["files"][0]["ranges"]
    assert ranges == [{"offset": 0, "length": 100}, {"offset": 200, "length": None}]
    assert data["events"][7]["trigger"] == "RESUME"
    assert data["events"][12]["fields"]["error"]["context"] == "REMOTE_FILE"


def test_the_cli_finds_a_job_by_id_prefix_or_name_in_any_state(
    manager: TransferManager, jobs: Jobs
) -> None:
    by_id = cli(manager, "history", jobs.dropped)
    assert by_id == cli(manager, "history", jobs.dropped[:8])
    assert by_id == cli(manager, "history", "dropped")  # CANCELLED: final, still audited
    assert by_id[0] == 0
    assert "JobCancelled" in by_id[1]
    with pytest.raises(BitsError) as missing:
        cli(manager, "history", "no such job")
    assert missing.value.hresult == hresult.BG_E_NOT_FOUND
    with pytest.raises(BitsError) as unknown:
        audit.history(manager.store, "00000000-0000-4000-8000-000000000000")
    assert unknown.value.hresult == hresult.BG_E_NOT_FOUND


# -- at --------------------------------------------------------------------------------------


def test_state_at_a_version_is_the_fold_of_that_prefix(
    manager: TransferManager, jobs: Jobs
) -> None:
    events = [a.event for a in manager.store.stream(jobs.rich)]
    for version in range(1, len(events) + 1):
        as_of = audit.state_at(manager.store, jobs.rich, version=version)
        assert as_of.job == fold(events[:version])
        assert as_of.latest_version == len(events)


def test_state_at_a_time_gives_state_progress_and_error_as_they_were(
    manager: TransferManager, jobs: Jobs
) -> None:
    store = manager.store

    at_start = audit.state_at(store, jobs.rich, at=T0)
    assert (at_start.version, at_start.job.state) == (8, JobState.QUEUED)

    transferring = audit.state_at(store, jobs.rich, at=T0 + timedelta(seconds=35))
    assert transferring.version == 11
    assert transferring.job.state is JobState.TRANSFERRING
    assert transferring.progress.bytes_transferred == 50
    assert transferring.error is None

    failed = audit.state_at(store, jobs.rich, at=T0 + timedelta(seconds=59))
    assert failed.job.state is JobState.TRANSIENT_ERROR
    assert failed.progress.bytes_transferred == 100
    assert failed.progress.files_transferred == 1
    assert failed.error is not None
    assert failed.error.hresult == hresult.BG_E_CONNECT_FAILURE

    naive = audit.state_at(store, jobs.rich, at=datetime(2026, 1, 1, 0, 0, 59))  # UTC
    assert naive.job == failed.job

    with pytest.raises(BitsError) as before:
        audit.state_at(store, jobs.rich, at=T0 - timedelta(seconds=1))
    assert before.value.hresult == hresult.BG_E_NOT_FOUND
    for bad in ({"version": 0}, {"version": 15}, {"version": 1, "at": T0}):
        with pytest.raises(BitsError) as refused:
            audit.state_at(store, jobs.rich, **bad)  # type: ignore[arg-type]
        assert refused.value.hresult == hresult.E_INVALIDARG


def test_the_at_verb_takes_a_time_or_a_version(manager: TransferManager, jobs: Jobs) -> None:
    code, text = cli(manager, "at", "rich", "2026-01-01T00:00:59Z")
    assert code == 0
    assert "state: TRANSIENT_ERROR" in text
    assert "BG_E_CONNECT_FAILURE" in text
    assert "bytes_transferred=100" in text

    code, out = cli(manager, "at", jobs.rich, "11", "--json")
    data = json.loads(out)
    assert code == 0
    assert (data["version"], data["state"], data["latest_version"]) == (11, "TRANSFERRING", 14)
    assert data["progress"]["bytes_transferred"] == 50
    assert data["job"]["credentials"][0]["password"] == "<redacted>"
    assert data["job"]["custom_headers"] == "<redacted>"

    with pytest.raises(SystemExit) as usage:
        cli(manager, "at", jobs.rich, "yesterday-ish")
    assert usage.value.code == 2


def test_at_refuses_a_stream_that_is_not_a_job_or_does_not_replay(
    manager: TransferManager, jobs: Jobs, wired: Any, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = manager.store
    store.append(POLICY_STREAM, 0, [PolicyChanged(T0, "network_cost", 1)])
    odd = str(uuid4())  # appended behind the manager's back: the store does not fold
    store.append(
        odd,
        0,
        [JobCreated(T0, odd, JobType.DOWNLOAD, "odd", "auditor"), JobCancelled(T0), JobResumed(T0)],
    )
    assert cli(manager, "history", POLICY_STREAM)[0] == 0
    assert cli(manager, "history", odd)[0] == 0
    assert cli(manager, "at", odd, "2")[0] == 0  # up to the impossible step

    with pytest.raises(BitsError, match="is not a job stream") as refused:
        cli(manager, "at", POLICY_STREAM, "1")
    assert refused.value.hresult == hresult.BG_E_NOT_FOUND
    with pytest.raises(BitsError, match="version 3 cannot be replayed") as refused:
        cli(manager, "at", odd, "3")
    assert "resume is not allowed in state CANCELLED" in str(refused.value)

    manager.close()
    assert wired(["--home", str(home), "audit", "at", odd, "3"], io.StringIO()) == 1
    assert wired(["--home", str(home), "audit", "at", POLICY_STREAM, "1"], io.StringIO()) == 1
    err = capsys.readouterr().err
    assert "version 3 cannot be replayed" in err
    assert "is not a job stream" in err
    assert "Traceback" not in err


# -- export / import -------------------------------------------------------------------------


def test_export_is_json_lines_with_a_header_a_line_per_event_and_a_footer(
    manager: TransferManager, jobs: Jobs
) -> None:
    lines = [json.loads(line) for line in export_text(manager.store).splitlines()]
    events = lines[1:-1]

    assert lines[0]["format"] == "backhaul.event-log"
    assert lines[0]["format_version"] == 1
    assert lines[0]["schema"]["FilesAdded"] == 3
    assert lines[-1]["end"]["events"] == len(events) == manager.store.head()
    assert lines[-1]["end"]["streams"] == 4
    assert [(e["stream"], e["version"]) for e in events] == [
        (j, v) for j, v, _, _ in raw_states(manager.store)
    ]
    assert all(set(e) == {"stream", "version", "topic", "state"} for e in events)
    assert all(len(e["state"]["h"]) == 64 and "v" in e["state"] for e in events)


def test_export_then_import_reproduces_the_store_exactly(
    manager: TransferManager, jobs: Jobs, tmp_path: Path
) -> None:
    exported = export_text(manager.store)
    with reopen(tmp_path / "copy") as copy:
        summary = import_text(copy.store, exported)

        assert (summary.events, summary.streams, summary.rows) == (manager.store.head(), 4, 4)
        assert raw_states(copy.store) == raw_states(manager.store)  # byte for byte
        assert rows_of(copy.store) == rows_of(manager.store)
        assert export_text(copy.store) == exported
        assert audit.verify(copy.store) == []
        for job_id in jobs.all():
            assert (
                copy.get_job(job_id, include_final=True).snapshot()
                == manager.get_job(job_id, include_final=True).snapshot()
            )


def test_an_import_refuses_a_store_that_is_not_empty(manager: TransferManager, jobs: Jobs) -> None:
    exported = export_text(manager.store)
    head = manager.store.head()
    with pytest.raises(AuditError) as refused:
        import_text(manager.store, exported)
    assert refused.value.hresult == hresult.BG_E_INVALID_STATE
    assert "empty" in str(refused.value)
    assert manager.store.head() == head


def _damage(text: str, how: str) -> str:
    lines = text.splitlines(keepends=True)
    if how == "truncated":
        return "".join(lines[:-3])
    if how == "line dropped":
        return "".join(lines[:5] + lines[6:])
    if how == "edited":
        record = json.loads(lines[4])
        record["state"]["value"] = "something else"
        lines[4] = json.dumps(record, separators=(",", ":")) + "\n"
        return "".join(lines)
    if how == "lines swapped":
        lines[3], lines[4] = lines[4], lines[3]
        return "".join(lines)
    if how == "not an export":
        return '{"hello":"world"}\n'
    raise AssertionError(how)


@pytest.mark.parametrize(
    ("how", "kind"),
    [
        ("truncated", "format"),
        ("line dropped", "order"),
        ("edited", "hash"),
        ("lines swapped", "order"),
        ("not an export", "format"),
    ],
)
def test_an_import_refuses_a_damaged_export_and_writes_nothing(
    manager: TransferManager, jobs: Jobs, tmp_path: Path, how: str, kind: str
) -> None:
    damaged = _damage(export_text(manager.store), how)
    with reopen(tmp_path / "copy") as copy:
        with pytest.raises(AuditError) as refused:
            import_text(copy.store, damaged)
        assert kind in {p.kind for p in refused.value.problems}
        assert "nothing was imported" in str(refused.value)
        assert copy.store.head() == 0
        assert rows_of(copy.store) == {}


def test_an_import_reads_a_pipe(manager: TransferManager, jobs: Jobs, tmp_path: Path) -> None:
    class Pipe(io.StringIO):
        def seekable(self) -> bool:
            return False

    with reopen(tmp_path / "copy") as copy:
        audit.import_(copy.store, Pipe(export_text(manager.store)))
        assert rows_of(copy.store) == rows_of(manager.store)


def test_the_export_and_import_verbs(manager: TransferManager, jobs: Jobs, tmp_path: Path) -> None:
    target = tmp_path / "log.jsonl"
    code, out = cli(manager, "export", str(target))
    assert code == 0
    assert out.startswith(f"exported {manager.store.head()} event(s) of 4 stream(s); log digest ")
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    with reopen(tmp_path / "copy") as copy:
        code, out = cli(copy, "import", str(target))
        assert code == 0
        assert "read models rebuilt: 4 job(s)" in out
        assert rows_of(copy.store) == rows_of(manager.store)
        with pytest.raises(AuditError):
            cli(copy, "import", str(target))  # not empty any more


def test_an_export_over_an_existing_file_leaves_it_owner_only(
    manager: TransferManager, jobs: Jobs, tmp_path: Path
) -> None:
    target = tmp_path / "log.jsonl"
    target.write_text("an older export\n")
    target.chmod(0o644)

    assert cli(manager, "export", str(target))[0] == 0

    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert target.read_text().startswith('{"format":"backhaul.event-log"')


def test_a_sealed_secret_survives_an_import_with_the_same_key(
    jobs: Jobs, manager: TransferManager, home: Path, tmp_path: Path
) -> None:
    other = tmp_path / "copy"
    other.mkdir()
    (other / "secret.key").write_bytes((home / "secret.key").read_bytes())
    with reopen(other) as copy:
        summary = import_text(copy.store, export_text(manager.store))
        assert (summary.unreadable, summary.unreadable_jobs) == (0, 0)
        job = copy.get_job(jobs.rich)
        assert job.custom_headers == f"X-Api-Key: {HEADER_SECRET}\r\n"


def test_an_import_without_the_exporting_key_warns_of_the_secrets_it_cannot_open(
    jobs: Jobs, manager: TransferManager, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Told at the import, not first when the job runs (and ends in ERROR, NTE_BAD_KEY)."""
    target = tmp_path / "log.jsonl"
    assert cli(manager, "export", str(target))[0] == 0
    with reopen(tmp_path / "elsewhere") as copy:
        code, out = cli(copy, "import", str(target))
        assert code == 0 and "read models rebuilt: 4 job(s)" in out
        warning = capsys.readouterr().err
        key = tmp_path / "elsewhere" / "secret.key"
        assert f"1 unfinished job(s) cannot be opened with the key in {key}" in warning
        with pytest.raises(SealedUnreadable) as caught:
            copy.get_job(jobs.rich).custom_headers  # noqa: B018
        assert caught.value.hresult == hresult.NTE_BAD_KEY


# -- rebuild ---------------------------------------------------------------------------------


def test_rebuild_restores_damaged_read_models(
    manager: TransferManager, jobs: Jobs, home: Path
) -> None:
    before = rows_of(manager.store)
    db = home / DB_FILE
    assert sqlite_exec(db, "UPDATE backhaul_job_views SET state = 99 WHERE job_id = ?", jobs.rich)
    assert sqlite_exec(db, "DELETE FROM backhaul_job_views WHERE job_id = ?", jobs.done)
    found = audit.verify(manager.store)
    assert {(p.job_id, p.kind) for p in found} == {(jobs.rich, "view"), (jobs.done, "view")}
    assert any("state" in p.detail for p in found if p.job_id == jobs.rich)

    code, out = cli(manager, "rebuild")

    assert code == 0
    assert out.startswith("rebuilt the read models: 4 job(s), log position ")
    assert rows_of(manager.store) == before
    assert audit.verify(manager.store) == []


# -- verify ----------------------------------------------------------------------------------


def test_verify_passes_a_clean_store(manager: TransferManager, jobs: Jobs) -> None:
    code, out = cli(manager, "verify")
    report = audit.verify_report(manager.store)

    assert code == 0
    assert report.ok
    assert (report.events, report.streams, report.rows) == (manager.store.head(), 4, 4)
    assert out.startswith(f"ok: {report.events} event(s) in 4 stream(s), 4 read-model row(s)")
    assert report.digest == audit.export(manager.store, io.StringIO()).digest


def test_verify_of_an_empty_store(manager: TransferManager) -> None:
    assert audit.verify(manager.store) == []


def _verify_cli(home: Path) -> tuple[int, str, dict[str, Any]]:
    with reopen(home) as m:
        code, text = cli(m, "verify")
        code_json, out = cli(m, "verify", "--json")
    assert code == code_json
    return code, text, json.loads(out)


def _found(data: dict[str, Any]) -> set[tuple[str, int | None, str]]:
    return {(p["job_id"], p["version"], p["kind"]) for p in data["problems"]}


def test_verify_reports_an_edited_event(manager: TransferManager, jobs: Jobs, home: Path) -> None:
    manager.close()
    changed = sqlite_exec(
        home / DB_FILE,
        "UPDATE stored_events SET state = CAST(replace(CAST(state AS TEXT), "
        "'the rich one', 'the poor one') AS BLOB) "
        "WHERE originator_id = ? AND originator_version = 4",
        hex_id(jobs.rich),
    )
    assert changed == 1

    code, text, data = _verify_cli(home)

    assert code == 1
    assert not data["ok"]
    assert (jobs.rich, 4, "hash") in _found(data)
    assert f"{jobs.rich} version 4: hash: " in text
    # the read model still says "the rich one": the fresh fold now disagrees with it
    assert (jobs.rich, 14, "view") in _found(data)
    assert {p[0] for p in _found(data)} == {jobs.rich}


def test_verify_reports_an_edited_topic(manager: TransferManager, jobs: Jobs, home: Path) -> None:
    manager.close()
    sqlite_exec(
        home / DB_FILE,
        "UPDATE stored_events SET topic = 'JobSuspended' "
        "WHERE originator_id = ? AND originator_version = 14",
        hex_id(jobs.rich),
    )
    code, _, data = _verify_cli(home)
    assert code == 1
    assert (jobs.rich, 14, "hash") in _found(data)


def test_verify_reports_a_deleted_event(manager: TransferManager, jobs: Jobs, home: Path) -> None:
    manager.close()
    assert sqlite_exec(
        home / DB_FILE,
        "DELETE FROM stored_events WHERE originator_id = ? AND originator_version = 3",
        hex_id(jobs.done),
    )

    code, text, data = _verify_cli(home)

    assert code == 1
    assert (jobs.done, 3, "gap") in _found(data)
    assert f"{jobs.done} version 3: gap: version 3 missing from the log" in text


def test_verify_reports_a_deleted_last_event(
    manager: TransferManager, jobs: Jobs, home: Path
) -> None:
    manager.close()
    assert sqlite_exec(
        home / DB_FILE,
        "DELETE FROM stored_events WHERE originator_id = ? AND originator_version = 3",
        hex_id(jobs.dropped),
    )
    code, text, data = _verify_cli(home)
    assert code == 1
    assert (jobs.dropped, 3, "view") in _found(data)
    assert "the log ends at version 2" in text


def test_verify_reports_reordered_events(manager: TransferManager, jobs: Jobs, home: Path) -> None:
    manager.close()
    db, rich = home / DB_FILE, hex_id(jobs.rich)
    for old, new in ((9, -9), (10, 9), (-9, 10)):  # swap versions 9 and 10
        sqlite_exec(
            db,
            "UPDATE stored_events SET originator_version = ? "
            "WHERE originator_id = ? AND originator_version = ?",
            new,
            rich,
            old,
        )

    code, _, data = _verify_cli(home)

    assert code == 1
    found = _found(data)
    assert {(jobs.rich, 9, "hash"), (jobs.rich, 10, "hash")} <= found
    assert (jobs.rich, 9, "order") in found  # version 9 now sits after version 10


def test_verify_reports_an_unreadable_event(
    manager: TransferManager, jobs: Jobs, home: Path
) -> None:
    manager.close()
    sqlite_exec(
        home / DB_FILE,
        "UPDATE stored_events SET state = CAST('{not json' AS BLOB) "
        "WHERE originator_id = ? AND originator_version = 2",
        hex_id(jobs.upload),
    )
    code, _, data = _verify_cli(home)
    assert code == 1
    assert (jobs.upload, 2, "undecodable") in _found(data)
    with reopen(home) as m:
        entries = audit.history(m.store, jobs.upload)  # the history still shows the rest
        assert entries[1].event is None
        assert entries[1].problem
        assert "!! cannot read the stored event" in audit.history_to_text(entries)


def test_verify_reports_a_stripped_hash(manager: TransferManager, jobs: Jobs, home: Path) -> None:
    manager.close()
    with contextlib.closing(sqlite3.connect(home / DB_FILE)) as conn:
        (state,) = conn.execute(
            "SELECT state FROM stored_events WHERE originator_id = ? AND originator_version = 1",
            (hex_id(jobs.done),),
        ).fetchone()
        document = json.loads(state)
        del document["h"]
        conn.execute(
            "UPDATE stored_events SET state = ? WHERE originator_id = ? AND originator_version = 1",
            (json.dumps(document).encode(), hex_id(jobs.done)),
        )
        conn.commit()
    code, _, data = _verify_cli(home)
    assert code == 1
    assert (jobs.done, 1, "unchained") in _found(data)


def _text_states(db: Path, job_id: str) -> int:
    """How many of the job's stored states SQLite holds as TEXT (what its shell's string
    functions leave), not as BLOB."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        (count,) = conn.execute(
            "SELECT count(*) FROM stored_events WHERE originator_id = ? AND typeof(state) = 'text'",
            (hex_id(job_id),),
        ).fetchone()
    return int(count)


def test_a_state_stored_as_text_reads_as_its_utf8_bytes(
    manager: TransferManager, jobs: Jobs, home: Path
) -> None:
    exported = export_text(manager.store)
    history = audit.history(manager.store, jobs.rich)
    manager.close()
    sqlite_exec(
        home / DB_FILE,
        "UPDATE stored_events SET state = CAST(state AS TEXT) WHERE originator_id = ?",
        hex_id(jobs.rich),
    )
    assert _text_states(home / DB_FILE, jobs.rich) == 14

    with reopen(home) as m:
        assert audit.verify(m.store) == []
        assert audit.history(m.store, jobs.rich) == history
        assert audit.state_at(m.store, jobs.rich, version=4).job.description == "the rich one"
        assert export_text(m.store) == exported
        # the store reads it too, and notes its last link (a TEXT state) for the next append
        assert audit.rebuild(m.store).rows == 4
        assert m.store.stream(jobs.rich)[3].event == history[3].event
        m.get_job(jobs.rich).description = "appended after a TEXT state"
        assert audit.verify(m.store) == []


def test_verify_reports_an_edit_that_left_a_text_state(
    manager: TransferManager, jobs: Jobs, home: Path
) -> None:
    manager.close()
    changed = sqlite_exec(
        home / DB_FILE,
        "UPDATE stored_events SET state = replace(state, 'the rich one', 'the poor one') "
        "WHERE originator_id = ? AND originator_version = 4",
        hex_id(jobs.rich),
    )
    assert changed == 1
    assert _text_states(home / DB_FILE, jobs.rich) == 1

    code, text, data = _verify_cli(home)

    assert code == 1
    assert (jobs.rich, 4, "hash") in _found(data)
    assert f"{jobs.rich} version 4: hash: " in text
    with reopen(home) as m:
        assert audit.history(m.store, jobs.rich)[3].fields()["value"] == "the poor one"
        assert cli(m, "at", jobs.rich, "4")[0] == 0
        assert '"the poor one"' in export_text(m.store)


def test_an_undecodable_policy_event_is_reported_and_the_manager_still_opens(
    manager: TransferManager, jobs: Jobs, home: Path, wired: Any
) -> None:
    manager.store.append(POLICY_STREAM, 0, [PolicyChanged(T0, "secret_parameters", ["sig"])])
    manager.close()
    sqlite_exec(
        home / DB_FILE,
        "UPDATE stored_events SET state = CAST('{}' AS BLOB) WHERE topic = 'PolicyChanged'",
    )

    code, text, data = _verify_cli(home)

    assert code == 1
    assert _found(data) == {(POLICY_STREAM, 1, "undecodable")}
    assert f"{POLICY_STREAM} version 1: undecodable: " in text
    assert wired(["--home", str(home), "audit", "verify"], io.StringIO()) == 1
    assert wired(["--home", str(home), "audit", "history", jobs.rich], io.StringIO()) == 0
    # No job is made while the store's secret parameters are unknown: a job named after a
    # URL could hold one of their values in plain text.
    with TransferManager(home=home) as reopened, pytest.raises(BitsError) as refused:
        reopened.create_job("https://example.com/f?sig=abc")
    assert refused.value.hresult == hresult.E_FAIL


def test_problems_print_job_version_and_what() -> None:
    problem = Problem("b0865d00-a8b9-4718-a5d9-b8f18b2b752d", 4, "hash", "altered")
    assert str(problem) == "b0865d00-a8b9-4718-a5d9-b8f18b2b752d version 4: hash: altered"
    assert problem.to_dict() == {
        "job_id": "b0865d00-a8b9-4718-a5d9-b8f18b2b752d",
        "version": 4,
        "kind": "hash",
        "detail": "altered",
    }


# -- secrets ---------------------------------------------------------------------------------


def _assert_no_secret(text: str, where: str, secrets: tuple[str, ...] = SECRETS) -> None:
    for secret in secrets:
        assert secret not in text, f"{where} shows a secret"
        assert secret.encode().hex() not in text, f"{where} shows a secret as hex"


def test_no_output_and_no_byte_of_the_store_holds_a_planted_secret(
    manager: TransferManager, jobs: Jobs, home: Path, tmp_path: Path
) -> None:
    store = manager.store
    outputs: dict[str, str] = {}
    for job_id in jobs.all():
        entries = audit.history(store, job_id)
        outputs[f"history {job_id}"] = audit.history_to_text(entries)
        outputs[f"history json {job_id}"] = json.dumps(audit.history_to_dict(entries))
        for version in range(1, entries[-1].version + 1):
            as_of = audit.state_at(store, job_id, version=version)
            outputs[f"at {job_id} {version}"] = as_of.to_text() + json.dumps(as_of.to_dict())
    for argv in (
        ("history", jobs.rich),
        ("history", jobs.rich, "--json"),
        ("at", jobs.rich, "2026-01-01T00:00:30Z"),
        ("at", jobs.rich, "14", "--json"),
        ("verify",),
        ("verify", "--json"),
    ):
        outputs[" ".join(argv)] = cli(manager, *argv)[1]
    exported = export_text(store)
    outputs["rebuild"] = cli(manager, "rebuild")[1]

    for where, text in outputs.items():
        _assert_no_secret(text, where)
        assert "sealed" not in text, f"{where} shows a sealed token"
    assert outputs["history json " + jobs.rich].count("<redacted>") == 3  # password, headers, URL
    _assert_no_secret(exported, "export", SEALED)
    assert exported.count('{"sealed":') == 3  # the ciphertext only

    # the problems a tampered store shows are as clean
    db = home / DB_FILE
    sqlite_exec(db, "UPDATE backhaul_job_views SET doc = replace(doc, 'alice', 'mallory')")
    problems = cli(manager, "verify", "--json")[1]
    assert "credentials" in problems
    _assert_no_secret(problems, "verify of a tampered store")

    manager.close()
    raw = b"".join(
        p.read_bytes()
        for p in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm"))
        if p.exists()
    ).decode("latin-1")
    assert "alice" in raw  # the dump does see the data...
    _assert_no_secret(raw, "the raw SQLite store", SEALED)


# -- PostgreSQL ------------------------------------------------------------------------------


@pytest.mark.peer
def test_replay_is_deterministic_from_sqlite_to_postgresql(
    manager: TransferManager, jobs: Jobs, postgres_url: str, tmp_path: Path
) -> None:
    exported = export_text(manager.store)
    with TransferManager(postgres_url, home=tmp_path / "pg", owner="auditor") as pg:
        summary = import_text(pg.store, exported)
        assert summary.rows == 4

        mine, theirs = rows_of(manager.store), rows_of(pg.store)
        assert sorted(theirs) == sorted(mine)
        for job_id, row in mine.items():
            for field in attrs.fields(ViewRow):
                assert getattr(theirs[job_id], field.name) == getattr(row, field.name), (
                    job_id,
                    field.name,
                )
        assert raw_states(pg.store) == raw_states(manager.store)
        assert export_text(pg.store) == exported
        assert audit.verify(pg.store) == []

        # a fold on either backend gives the same rows: rebuild on PostgreSQL
        audit.rebuild(pg.store)
        assert rows_of(pg.store) == mine
        for job_id in jobs.all():
            events = [a.event for a in pg.store.stream(job_id)]
            job = fold(events)
            assert job is not None
            assert view_row(job) == mine[job_id]


@pytest.mark.peer
def test_verify_on_postgresql_reports_an_edited_and_a_deleted_event(
    postgres_url: str, tmp_path: Path
) -> None:
    with TransferManager(
        postgres_url, home=tmp_path / "pg", owner="auditor", clock=ManualClock()
    ) as m:
        downloads = tmp_path / "downloads"
        downloads.mkdir()
        jobs = populate(m, downloads)
        assert audit.verify(m.store) == []
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(
                "UPDATE stored_events SET state = convert_to(replace(convert_from(state, 'UTF8'), "
                "'the rich one', 'the poor one'), 'UTF8') "
                "WHERE originator_id = %s AND originator_version = 4",
                [UUID(jobs.rich)],
            )
            conn.execute(
                "DELETE FROM stored_events WHERE originator_id = %s AND originator_version = 2",
                [UUID(jobs.done)],
            )
        found = {(p.job_id, p.version, p.kind) for p in audit.verify(m.store)}
        assert (jobs.rich, 4, "hash") in found
        assert (jobs.done, 2, "gap") in found
        assert cli(m, "verify")[0] == 1


# -- wired into the main command -------------------------------------------------------------


@pytest.fixture
def wired() -> Any:
    """adapters/cli.py's main(), which has the audit verbs."""
    from backhaul.adapters import cli as main_cli

    return main_cli.main


def test_the_verbs_through_the_main_command(
    wired: Any,
    manager: TransferManager,
    jobs: Jobs,
    home: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    manager.close()
    out = io.StringIO()
    assert wired(["--home", str(home), "audit", "verify"], out) == 0
    assert out.getvalue().startswith("ok: ")
    export_file = tmp_path / "log.jsonl"
    assert wired(["--home", str(home), "audit", "export", str(export_file)], io.StringIO()) == 0
    assert wired(["--home", str(home), "audit", "import", str(export_file)], io.StringIO()) == 1
    assert "already holds events" in capsys.readouterr().err
    assert wired(["--home", str(tmp_path / "new"), "audit", "import", str(export_file)], out) == 0
    assert wired(["--home", str(home), "audit", "at", "rich", "not-a-time"], out) == 2
    assert wired(["--home", str(home), "audit"], out) == 2


def test_verify_accepts_read_models_that_lag_behind_the_log(
    manager: TransferManager, jobs: Jobs
) -> None:
    manager.get_job(jobs.rich).description = "after the last catch-up"
    late = manager.create_job("created after the last catch-up")
    assert manager.store.views.get(late.id) is None
    assert audit.verify(manager.store) == []


def test_verify_reports_a_row_the_projection_left_behind(
    manager: TransferManager, jobs: Jobs, home: Path
) -> None:
    store = manager.store
    events = [a.event for a in store.stream(jobs.rich)]
    stale = fold(events[:10])
    assert stale is not None
    row = view_row(stale)  # a row that missed events its position claims
    columns = [f.name for f in attrs.fields(ViewRow) if f.name != "job_id"]
    sqlite_exec(
        home / DB_FILE,
        f"UPDATE backhaul_job_views SET {', '.join(c + ' = ?' for c in columns)} WHERE job_id = ?",
        *[getattr(row, c) for c in columns],
        jobs.rich,
    )

    found = audit.verify(store)

    assert [(p.job_id, p.kind) for p in found] == [(jobs.rich, "view")]
    assert "stopped at version 10, though it has read version 14" in found[0].detail
