"""``audit import`` (adapters/audit.py) refusing what it cannot load, writing nothing.

- an export the rebuild could not replay (a job stream without JobCreated, an impossible
  step, a JobCreated naming another stream) is refused before anything is written;
- a file that is not UTF-8 text (gzip, binary, UTF-16) is "not a backhaul export";
- of two imports into one empty store at the same time exactly one succeeds, and an
  import that fails half way leaves the store empty (SQLite and PostgreSQL).
The exports are written by ``audit.export`` from an in-memory store, whose appends chain
any events (the store does not fold): the hash chains of the odd ones are valid.
"""

from __future__ import annotations

import argparse
import gzip
import io
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest

from backhaul.adapters import audit
from backhaul.adapters.audit import AuditError
from backhaul.adapters.cli_audit import add_audit_parser
from backhaul.adapters.manager import TransferManager
from backhaul.adapters.store import EventStore, open_store
from backhaul.core import event as ev
from backhaul.core import hresult
from backhaul.core.vocabulary import JobType

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def created(job_id: str, name: str = "job", names: str | None = None) -> ev.JobCreated:
    """JobCreated of ``job_id``'s stream; ``names``: the job id it records, if another."""
    return ev.JobCreated(T0, names or job_id, JobType.DOWNLOAD, name, "auditor")


def export_of(*streams: tuple[str, list[ev.Event]]) -> str:
    """An export of these streams (appended in turn), chained as the store chains them."""
    store = open_store("memory:")
    try:
        for job_id, events in streams:
            store.append(job_id, 0, events)
        out = io.StringIO()
        audit.export(store, out)
        return out.getvalue()
    finally:
        store.close()


def jobs_export(count: int, name: str, *, policy: bool = True) -> str:
    """``count`` jobs named ``name``-i, two events each, and the policy stream if asked."""
    streams: list[tuple[str, list[ev.Event]]] = []
    if policy:
        streams.append((ev.POLICY_STREAM, [ev.PolicyChanged(T0, "network_cost", 1)]))
    for i in range(count):
        job_id = str(uuid4())
        streams.append(
            (job_id, [created(job_id, f"{name}-{i}"), ev.PropertySet(T0, "description", "x")])
        )
    return export_of(*streams)


def cli(store: EventStore, *argv: str) -> tuple[int, str]:
    """``backhaul audit ARGV`` through a parser with the audit verbs, on ``store``."""
    parser = argparse.ArgumentParser(prog="backhaul")
    add_audit_parser(parser.add_subparsers(dest="verb", required=True))
    args = parser.parse_args(["audit", *argv])
    out = io.StringIO()
    with TransferManager(store, owner="auditor") as m:
        code = args.func(args, m, out)
    return code, out.getvalue()


def names_in(store: EventStore) -> list[str]:
    return sorted(r.display_name for r in store.views.select(None, include_final=True))


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.peer)])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Where the imports go: an empty SQLite file or PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite://{tmp_path / 'home' / 'backhaul.db'}"
    else:
        yield request.getfixturevalue("postgres_url")


@pytest.fixture
def store(target: str, tmp_path: Path) -> Iterator[EventStore]:
    opened = open_store(target, tmp_path / "home")
    yield opened
    opened.close()


def test_a_good_export_with_the_policy_stream_imports(store: EventStore) -> None:
    summary = audit.import_(store, io.StringIO(jobs_export(3, "good")))
    assert (summary.events, summary.streams, summary.rows) == (7, 4, 3)
    assert audit.verify(store) == []


# -- an export the rebuild could not replay ----------------------------------------------------

A, B = str(uuid4()), str(uuid4())
UNREPLAYABLE = {
    "no JobCreated": [(A, [ev.JobResumed(T0)])],
    "impossible step": [(A, [created(A), ev.JobCancelled(T0), ev.JobResumed(T0)])],
    "JobCreated names another stream": [(A, [created(A)]), (B, [created(B, names=A)])],
    "JobCreated again": [(A, [created(A), ev.JobSuspended(T0), created(A)])],
    "a job event in the policy stream": [(ev.POLICY_STREAM, [created(ev.POLICY_STREAM)])],
}


@pytest.mark.parametrize("case", sorted(UNREPLAYABLE))
def test_an_export_that_does_not_replay_is_refused_before_anything_is_written(
    store: EventStore, case: str
) -> None:
    exported = export_of(*UNREPLAYABLE[case])

    with pytest.raises(AuditError) as refused:
        audit.import_(store, io.StringIO(exported))

    assert refused.value.hresult == hresult.E_INVALIDARG
    assert [p.kind for p in refused.value.problems] == ["fold"]
    assert "replay fails" in str(refused.value)
    assert "nothing was imported" in str(refused.value)
    assert store.head() == 0
    assert names_in(store) == []


def test_the_refusal_names_the_stream_version_and_why(store: EventStore) -> None:
    with pytest.raises(AuditError) as refused:
        audit.import_(store, io.StringIO(export_of(*UNREPLAYABLE["impossible step"])))
    (problem,) = refused.value.problems
    assert (problem.job_id, problem.version) == (A, 3)
    assert "resume is not allowed in state CANCELLED" in problem.detail
    with pytest.raises(AuditError) as refused:
        audit.import_(
            store, io.StringIO(export_of(*UNREPLAYABLE["JobCreated names another stream"]))
        )
    (problem,) = refused.value.problems
    assert (problem.job_id, problem.version) == (B, 1)
    assert f"names job {A!r}" in problem.detail


# -- not UTF-8 text ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gzip", "binary", "utf-16"])
def test_a_file_that_is_not_utf8_text_is_not_a_backhaul_export(
    store: EventStore, tmp_path: Path, kind: str
) -> None:
    text = jobs_export(1, "one")
    data = {
        "gzip": gzip.compress(text.encode()),
        "binary": bytes(range(256)) * 4,
        "utf-16": text.encode("utf-16"),  # with its byte order mark
    }[kind]
    path = tmp_path / f"export.{kind}"
    path.write_bytes(data)

    with pytest.raises(AuditError) as refused:
        cli(store, "import", str(path))

    assert "not a backhaul export" in str(refused.value)
    assert "nothing was imported" in str(refused.value)
    assert store.head() == 0


def test_the_main_command_refuses_a_gzip_export_with_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from backhaul.adapters.cli import main

    path = tmp_path / "export.jsonl.gz"
    path.write_bytes(gzip.compress(jobs_export(1, "one").encode()))
    home = tmp_path / "home"

    assert main(["--home", str(home), "audit", "import", str(path)], io.StringIO()) == 1

    err = capsys.readouterr().err
    assert "not a backhaul export" in err
    assert "Traceback" not in err


# -- two imports at once; a failure half way -----------------------------------------------------


class PausedExport(io.StringIO):
    """An export whose second reading (the import writing it) stops at its first line,
    after setting ``writing``, until ``go`` is set."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.seeks = 0
        self.writing = threading.Event()
        self.go = threading.Event()

    def seek(self, *args: Any) -> int:
        self.seeks += 1
        return super().seek(*args)

    def __next__(self) -> str:
        if self.seeks and not self.writing.is_set():
            self.writing.set()
            assert self.go.wait(60)
        return super().__next__()


def test_of_two_imports_into_one_empty_store_exactly_one_succeeds(
    target: str, tmp_path: Path
) -> None:
    # no stream in common: nothing in the log's keys keeps the two apart
    first = PausedExport(jobs_export(5, "first", policy=False))
    second = io.StringIO(jobs_export(5, "second", policy=False))
    outcomes: dict[str, object] = {}

    def run(name: str, source: io.StringIO) -> None:
        store = open_store(target, tmp_path / "home")
        try:
            outcomes[name] = audit.import_(store, source)
        except AuditError as exc:
            outcomes[name] = exc
        finally:
            store.close()

    one = threading.Thread(target=run, args=("first", first))
    two = threading.Thread(target=run, args=("second", second))
    one.start()
    try:
        assert first.writing.wait(30)  # the first import is past its checks, writing
        two.start()
        two.join(2)  # it waits for the first to commit (the bug: it imports meanwhile)
    finally:
        first.go.set()
    one.join(60)
    two.join(60)

    assert isinstance(outcomes["first"], audit.ImportSummary)
    refused = outcomes["second"]
    assert isinstance(refused, AuditError)
    # "no longer empty"; on PostgreSQL "already holds events" (opening waits for the lock)
    assert refused.hresult == hresult.BG_E_INVALID_STATE
    store = open_store(target, tmp_path / "home")
    try:
        assert names_in(store) == [f"first-{i}" for i in range(5)]
        assert store.head() == 10
        assert audit.verify(store) == []
    finally:
        store.close()


def test_an_import_that_fails_half_way_writes_nothing(
    store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    read = audit._records

    def failing(source: Any) -> Iterator[Any]:
        for count, record in enumerate(read(source)):
            if count == 1500:  # past the first batch of 1,000
                raise OSError("the export became unreadable")
            yield record

    monkeypatch.setattr(audit, "_records", failing)
    with pytest.raises(OSError, match="unreadable"):
        audit.import_(store, io.StringIO(jobs_export(1000, "many")))

    assert store.head() == 0
    monkeypatch.undo()
    audit.import_(store, io.StringIO(jobs_export(2, "then")))  # the store is still empty
    assert names_in(store) == ["then-0", "then-1"]
