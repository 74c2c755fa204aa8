"""Old logs still replay: schema versions are upcast, renamed topics are aliased.

``tests/fixtures/log-v1.jsonl`` is an export of a log as release 0.1 stored it (every
topic at version 1; made by tests/fixtures/make_log_v1.py). Since then FilesAdded is at
version 2 (byte ranges stored as [offset, length] pairs). Importing the fixture must keep
its stored bytes (their hashes cover them) and replay to the jobs it recorded.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
import pytest

from backhaul.adapters import audit, serialization
from backhaul.adapters.audit import AuditError
from backhaul.adapters.clock import ManualClock
from backhaul.adapters.manager import TransferManager
from backhaul.adapters.serialization import (
    SCHEMA_VERSION,
    UPCASTERS,
    chain_hash,
    event_from_bytes,
    event_to_bytes,
    split_state,
)
from backhaul.core import event as ev
from backhaul.core import hresult
from backhaul.core.value import ByteRange, FileSpec, Sealed
from backhaul.core.vocabulary import AuthScheme, AuthTarget, JobPriority, JobState, JobType

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "log-v1.jsonl"
FIXTURE_KEY = "1ouU59qha0yF80IvXkPeaQPJAQ0WMpBz8UT6XG9t6QQ="  # tests/fixtures/make_log_v1.py


def fixture_lines() -> list[dict[str, Any]]:
    return [json.loads(line) for line in FIXTURE.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TransferManager]:
    monkeypatch.setenv("BACKHAUL_SECRET_KEY", FIXTURE_KEY)
    with TransferManager(home=tmp_path / "home", owner="fixture", clock=ManualClock()) as m:
        yield m


def by_name(m: TransferManager) -> dict[str, Any]:
    return {j.display_name: j for j in m.jobs(include_final=True)}


# -- the v1 fixture --------------------------------------------------------------------------


def test_the_fixture_is_a_version_1_log() -> None:
    lines = fixture_lines()
    events = lines[1:-1]
    assert lines[0]["format"] == "backhaul.event-log"
    assert set(lines[0]["schema"].values()) == {1}
    assert {e["state"]["v"] for e in events} == {1}
    files_added = [e for e in events if e["topic"] == "FilesAdded"]
    assert files_added[0]["state"]["files"][0]["ranges"] == [
        {"length": 100, "offset": 0},
        {"length": None, "offset": 200},
    ]
    assert SCHEMA_VERSION["FilesAdded"] == 3  # what changed since (v2 ranges, v3 passwords)
    assert SCHEMA_VERSION["RemoteNameChanged"] == 2


def test_importing_the_v1_log_replays_the_jobs_it_recorded(manager: TransferManager) -> None:
    with FIXTURE.open(encoding="utf-8") as source:
        summary = audit.import_(manager.store, source)
    assert (summary.events, summary.streams, summary.rows) == (26, 4, 4)
    assert audit.verify(manager.store) == []

    jobs = by_name(manager)
    assert set(jobs) == {"mirror", "done", "dropped", "upload"}

    mirror = jobs["mirror"]
    assert mirror.state is JobState.TRANSIENT_ERROR
    assert mirror.priority is JobPriority.HIGH
    assert mirror.description == "nightly mirror"
    assert mirror.error is not None
    assert mirror.error.hresult == hresult.BG_E_CONNECT_FAILURE
    assert mirror.error_count == 1
    files = mirror.files()
    assert [f.remote_name for f in files] == [
        "https://example.com/data/a.bin",
        "https://example.com/data/b.bin",
    ]
    assert files[0].ranges == (ByteRange(0, 100), ByteRange(200, None))  # upcast from v1
    assert files[1].ranges == ()
    assert (files[0].progress.bytes_transferred, files[0].progress.bytes_total) == (100, 100)
    assert mirror.credentials == [(AuthTarget.SERVER, AuthScheme.BASIC, "mirror-user")]
    assert mirror.custom_headers == "X-Fixture-Token: fixture-header-v1\r\n"  # same key

    assert jobs["done"].state is JobState.ACKNOWLEDGED
    assert jobs["done"].progress.bytes_transferred == 2048
    assert jobs["dropped"].state is JobState.CANCELLED
    assert jobs["upload"].state is JobState.SUSPENDED
    assert jobs["upload"].job_type is JobType.UPLOAD


def test_the_import_keeps_the_v1_bytes_and_new_events_are_current(
    manager: TransferManager, tmp_path: Path
) -> None:
    with FIXTURE.open(encoding="utf-8") as source:
        audit.import_(manager.store, source)
    again = io.StringIO()
    audit.export(manager.store, again)
    assert again.getvalue().splitlines()[1:] == FIXTURE.read_text().splitlines()[1:]

    mirror = by_name(manager)["mirror"]
    mirror.description = "appended after the import"  # chains onto an imported stream
    fresh = manager.create_job("fresh")
    fresh.add_file("https://example.com/new", tmp_path / "new.bin", ranges=[(0, 10)])
    last = manager.store.raw_stream(fresh.id)[-1]
    document = json.loads(last.state)
    assert (last.topic, document["v"]) == ("FilesAdded", 3)
    assert document["files"][0]["ranges"] == [[0, 10]]
    assert audit.verify(manager.store) == []  # the new event chains onto the imported ones


def test_files_added_v2_stores_ranges_as_pairs_and_v1_needs_its_upcaster(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = FileSpec("https://example.com/x", "/tmp/x", (ByteRange(0, 10), ByteRange(20)))
    event = ev.FilesAdded(datetime(2026, 1, 1, tzinfo=UTC), (spec,))
    stored = json.loads(event_to_bytes(event))
    assert stored["v"] == 3
    assert stored["files"][0]["ranges"] == [[0, 10], [20, None]]
    assert "password" not in stored["files"][0]  # v3 stores a file without one as v2 did
    v2 = json.dumps({**stored, "v": 2}).encode()
    assert event_from_bytes("FilesAdded", v2) == event

    v1 = next(e for e in fixture_lines()[1:-1] if e["topic"] == "FilesAdded")["state"]
    state = json.dumps(v1).encode()
    upcast = event_from_bytes("FilesAdded", state)
    assert isinstance(upcast, ev.FilesAdded)
    assert upcast.files[0].ranges == (ByteRange(0, 100), ByteRange(200, None))
    assert ("FilesAdded", 1) in UPCASTERS

    monkeypatch.setattr(serialization, "UPCASTERS", {})
    with pytest.raises(ValueError, match="no upcaster for FilesAdded from version 1"):
        event_from_bytes("FilesAdded", state)


def test_a_url_password_is_stored_sealed_from_files_added_v3_and_remote_name_changed_v2() -> None:
    at = datetime(2026, 1, 1, tzinfo=UTC)
    spec = FileSpec("https://bob@example.com/x", "/tmp/x", password=Sealed("token-1"))
    stored = json.loads(event_to_bytes(ev.FilesAdded(at, (spec,))))
    assert stored["files"][0]["password"] == {"sealed": "token-1"}
    assert event_from_bytes("FilesAdded", event_to_bytes(ev.FilesAdded(at, (spec,)))).files == (
        spec,
    )

    renamed_to = ev.RemoteNameChanged(at, 0, "https://bob@example.org/x", Sealed("token-2"))
    stored = json.loads(event_to_bytes(renamed_to))
    assert (stored["v"], stored["password"]) == (2, {"sealed": "token-2"})
    v1 = {"at": at.isoformat(), "file_index": 0, "remote_name": "https://example.org/x", "v": 1}
    upcast = event_from_bytes("RemoteNameChanged", json.dumps(v1).encode())
    assert upcast == ev.RemoteNameChanged(at, 0, "https://example.org/x", None)
    assert ("RemoteNameChanged", 1) in UPCASTERS


def test_a_state_from_a_newer_release_is_refused() -> None:
    state = json.dumps({"at": "2026-01-01T00:00:00+00:00", "v": 9}).encode()
    with pytest.raises(ValueError, match="JobResumed has no schema version 9"):
        event_from_bytes("JobResumed", state)


# -- topic aliases ---------------------------------------------------------------------------


def renamed(text: str, old: str, new: str) -> str:
    """An export where every ``old`` topic is stored as ``new``, chained as a release that
    used the name ``new`` would have written it."""
    lines = [json.loads(line) for line in text.splitlines()]
    heads: dict[str, str] = {}
    for record in lines[1:-1]:
        if record["topic"] == old:
            record["topic"] = new
        state = record["state"]
        del state["h"]
        _, body, _ = split_state(json.dumps(state).encode())
        previous = heads.get(record["stream"], "")
        link = chain_hash(previous, record["stream"], record["topic"], record["version"], body)
        state["h"] = heads[record["stream"]] = link
    lines[-1]["end"].pop("digest")
    return "".join(json.dumps(line) + "\n" for line in lines)


def test_a_log_with_an_old_topic_name_replays_through_its_alias(
    manager: TransferManager, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with TransferManager(home=tmp_path / "source", owner="fixture", clock=ManualClock()) as src:
        job = src.create_job("paused")
        (tmp_path / "f.bin").write_bytes(b"")
        job.add_file("https://example.com/f", tmp_path / "f.bin")
        job.resume()
        job.suspend()
        out = io.StringIO()
        audit.export(src.store, out)
    old_log = renamed(out.getvalue(), "JobSuspended", "JobPaused")
    assert '"topic": "JobPaused"' in old_log

    with pytest.raises(AuditError) as refused:  # no alias: the topic is unknown
        audit.import_(manager.store, io.StringIO(old_log))
    assert "unknown event topic 'JobPaused'" in str(refused.value)
    assert manager.store.head() == 0

    monkeypatch.setattr(serialization, "TOPIC_ALIASES", {"JobPaused": "JobSuspended"})
    audit.import_(manager.store, io.StringIO(old_log))
    assert audit.verify(manager.store) == []
    assert by_name(manager)["paused"].state is JobState.SUSPENDED
    entries = audit.history(manager.store, job.id)
    assert (entries[-1].topic, entries[-1].event_type) == ("JobPaused", "JobSuspended")
    assert "JobSuspended (stored as JobPaused)" in audit.history_to_text(entries)


# -- specs/event-log.md ----------------------------------------------------------------------

SPEC = Path(__file__).resolve().parents[2] / "specs" / "event-log.md"
EVENT_HEADING = re.compile(r"^### (?P<topic>\w+) \(v(?P<version>\d+)\)$", re.MULTILINE)
FIELD_ROW = re.compile(r"^\| `(?P<field>\w+)` \|", re.MULTILINE)


def documented_events() -> dict[str, tuple[int, list[str]]]:
    text = SPEC.read_text(encoding="utf-8")
    headings = list(EVENT_HEADING.finditer(text))
    found = {}
    for i, heading in enumerate(headings):
        end = (
            headings[i + 1].start() if i + 1 < len(headings) else text.find("\n## ", heading.end())
        )
        section = text[heading.end() : end]
        fields = [m["field"] for m in FIELD_ROW.finditer(section)]
        found[heading["topic"]] = (int(heading["version"]), fields)
    return found


def test_the_spec_documents_every_event_type_its_fields_and_version() -> None:
    documented = documented_events()
    assert list(documented) == [cls.__name__ for cls in ev.EVENT_TYPES]
    for cls in ev.EVENT_TYPES:
        version, fields = documented[cls.__name__]
        assert version == SCHEMA_VERSION[cls.__name__], cls.__name__
        assert fields == [f.name for f in attrs.fields(cls) if f.name != "at"], cls.__name__
