"""The hash chain the EventStore writes (adapters/store.py, adapters/serialization.py).

Each stored state ends with ``"h"``: SHA-256 over the previous event's hash in the stream
("" for version 1), the stream id, the topic, the version and the canonical body. The
store takes the previous hash from its cache when it appended that version itself, else
from the log; a batch may append to one stream several times.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import UUID, uuid4

import pytest

from backhaul.adapters import audit
from backhaul.adapters import store as store_module
from backhaul.adapters.serialization import (
    canonical_json,
    chain_hash,
    event_from_bytes,
    event_to_bytes,
    split_state,
)
from backhaul.adapters.store import ConcurrentAppend, EventStore, open_store
from backhaul.core import event as ev
from backhaul.core.vocabulary import JobType

T0 = datetime(2026, 3, 1, tzinfo=UTC)


def new_id() -> str:
    return str(uuid4())


def stream_of(job_id: str, n: int, start: int = 1) -> list[ev.Event]:
    events: list[ev.Event] = []
    for version in range(start, start + n):
        if version == 1:
            events.append(ev.JobCreated(T0, job_id, JobType.DOWNLOAD, "chain", "owner"))
        else:
            at = T0 + timedelta(seconds=version)
            events.append(ev.PropertySet(at, "description", f"d{version}"))
    return events


def expected_links(store: EventStore, job_id: str) -> list[str]:
    """The chain recomputed from the stored bodies."""
    links, previous = [], ""
    for r in store.raw_stream(job_id):
        _, body, _ = split_state(bytes(r.state))
        previous = chain_hash(previous, job_id, r.topic, r.originator_version, body)
        links.append(previous)
    return links


def stored_links(store: EventStore, job_id: str) -> list[str | None]:
    return [split_state(bytes(r.state))[2] for r in store.raw_stream(job_id)]


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EventStore]:
    url = "memory:" if request.param == "memory" else f"sqlite://{tmp_path / 'chain.db'}"
    opened = open_store(url)
    yield opened
    opened.close()


def test_each_append_links_to_the_previous_event_of_its_stream(store: EventStore) -> None:
    job_id = new_id()
    store.append(job_id, 0, stream_of(job_id, 3))
    store.append(job_id, 3, stream_of(job_id, 2, start=4))

    links = stored_links(store, job_id)
    assert links == expected_links(store, job_id)
    assert len(set(links)) == 5
    assert audit.verify(store) == []


def test_the_stored_state_is_the_canonical_body_then_the_hash(store: EventStore) -> None:
    job_id = new_id()
    event = stream_of(job_id, 1)[0]
    store.append(job_id, 0, [event])
    (record,) = store.raw_stream(job_id)
    state = bytes(record.state)
    body = event_to_bytes(event)
    link = chain_hash("", job_id, "JobCreated", 1, body)

    assert state == body[:-1] + b',"h":"' + link.encode() + b'"}'
    assert body == canonical_json(json.loads(body))
    assert event_from_bytes("JobCreated", state) == event  # "h" is not a field


def test_a_batch_chains_several_streams_and_several_runs_of_one_stream(
    store: EventStore,
) -> None:
    a, b = new_id(), new_id()
    store.append_many(
        [
            (a, 0, stream_of(a, 2)),
            (b, 0, stream_of(b, 1)),
            (a, 2, stream_of(a, 2, start=3)),  # the same stream again, after its first run
        ]
    )
    for job_id in (a, b):
        assert stored_links(store, job_id) == expected_links(store, job_id)
    assert [r.originator_version for r in store.raw_stream(a)] == [1, 2, 3, 4]


def test_a_second_store_object_continues_the_chain_from_the_log(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path / 'chain.db'}"
    job_id = new_id()
    first, second = open_store(url), open_store(url)
    try:
        first.append(job_id, 0, stream_of(job_id, 2))
        second.append(job_id, 2, stream_of(job_id, 2, start=3))  # its cache has no entry
        first.append(job_id, 4, stream_of(job_id, 1, start=5))  # its entry is stale: reads
        assert stored_links(first, job_id) == expected_links(first, job_id)
        assert audit.verify(first) == []
    finally:
        first.close()
        second.close()


def count_selects(monkeypatch: pytest.MonkeyPatch, store: EventStore) -> list[object]:
    """Every ``select_events`` call the store's recorder gets from now on."""
    calls: list[object] = []
    select = store.log.select_events

    def counting(*args: object, **kwargs: object) -> object:
        calls.append((args, kwargs))
        return select(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(store.log, "select_events", counting)
    return calls


def test_a_batch_to_streams_another_store_object_wrote_reads_their_links_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An engine's first append to 50 jobs a manager created: the links it chains to come
    from the log in one read (on SQLite), none through the recorder's select_events; a
    stream whose version is not there still conflicts, and the rest of the batch with it."""
    url = f"sqlite://{tmp_path / 'chain.db'}"
    ids = [new_id() for _ in range(50)]
    first, second = open_store(url), open_store(url)
    try:
        first.append_many([(j, 0, stream_of(j, 2)) for j in ids])
        selects = count_selects(monkeypatch, second)
        second.append_many([(j, 2, stream_of(j, 1, start=3)) for j in ids])
        assert selects == []
        for job_id in ids:
            assert stored_links(first, job_id) == expected_links(first, job_id)
        assert audit.verify(first) == []
        stale = [(j, 2, stream_of(j, 1, start=3)) for j in ids[:3]]
        with pytest.raises(ConcurrentAppend):
            second.append_many(stale)  # version 3 is taken: the insert conflicts
        missing = [
            (ids[0], 3, stream_of(ids[0], 1, start=4)),
            (ids[1], 7, stream_of(ids[1], 1, start=8)),
        ]
        with pytest.raises(ConcurrentAppend, match="no version 7"):
            second.append_many(missing)
        assert [r.originator_version for r in first.raw_stream(ids[0])] == [1, 2, 3]
    finally:
        first.close()
        second.close()


def test_appending_after_a_version_the_stream_does_not_have_appends_nothing(
    store: EventStore,
) -> None:
    job_id = new_id()
    store.append(job_id, 0, stream_of(job_id, 2))
    with pytest.raises(ConcurrentAppend, match="no version 5"):
        store.append(job_id, 5, stream_of(job_id, 1, start=6))
    with pytest.raises(ConcurrentAppend):
        store.append(job_id, 1, stream_of(job_id, 1, start=2))  # version 2 is taken
    assert [r.originator_version for r in store.raw_stream(job_id)] == [1, 2]
    store.append(job_id, 2, stream_of(job_id, 1, start=3))
    assert stored_links(store, job_id) == expected_links(store, job_id)


def test_the_link_cache_is_bounded_and_a_miss_reads_the_log(
    store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "LINK_CACHE_SIZE", 3)
    ids = [new_id() for _ in range(6)]
    for job_id in ids:
        store.append(job_id, 0, stream_of(job_id, 1))
    assert list(store._links) == [str(UUID(i)) for i in ids[-3:]]
    reads = []
    select = store.log.select_events

    def counting(*args: object, **kwargs: object) -> object:
        reads.append(kwargs)
        return select(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(store.log, "select_events", counting)
    store.append(ids[-1], 1, stream_of(ids[-1], 1, start=2))  # cached: no read
    assert reads == []
    store.append(ids[0], 1, stream_of(ids[0], 1, start=2))  # evicted: one read of the log
    assert reads == [{"lte": 1, "desc": True, "limit": 1}]
    for job_id in (ids[0], ids[-1]):
        assert stored_links(store, job_id) == expected_links(store, job_id)


def test_the_chain_binds_the_stream_topic_and_version() -> None:
    body = b'{"at":"2026-03-01T00:00:00+00:00","v":1}'
    stream = str(uuid4())
    base = chain_hash("", stream, "JobResumed", 2, body)
    assert base != chain_hash("", str(uuid4()), "JobResumed", 2, body)
    assert base != chain_hash("", stream, "JobSuspended", 2, body)
    assert base != chain_hash("", stream, "JobResumed", 3, body)
    assert base != chain_hash("0" * 64, stream, "JobResumed", 2, body)
    assert base != chain_hash("", stream, "JobResumed", 2, body.replace(b"00:00:00", b"00:00:01"))


def test_a_lone_surrogate_is_stored_escaped_and_survives_export_and_import() -> None:
    source, target = open_store("memory:"), open_store("memory:")
    try:
        job_id = new_id()
        created = ev.JobCreated(T0, job_id, JobType.DOWNLOAD, "report-\ud800.txt", "owner")
        source.append(job_id, 0, [created])
        (record,) = source.raw_stream(job_id)
        assert b"report-\\ud800.txt" in bytes(record.state)
        assert source.stream(job_id)[0].event == created
        assert audit.verify(source) == []

        exported = io.StringIO()
        audit.export(source, exported)
        exported.seek(0)
        audit.import_(target, exported)
        assert target.raw_stream(job_id) == source.raw_stream(job_id)
        assert audit.verify(target) == []
    finally:
        source.close()
        target.close()


def test_a_stream_that_is_not_a_job_is_chained_verified_and_exported(
    store: EventStore,
) -> None:
    policy = ev.POLICY_STREAM
    store.append(policy, 0, [ev.PolicyChanged(T0, "network_cost", 1)])
    store.append(policy, 1, [ev.PolicyChanged(T0, "network_cost", 2)])
    assert audit.verify(store) == []
    entries = audit.history(store, policy)
    assert [(e.version, e.event_type, e.state) for e in entries] == [
        (1, "PolicyChanged", None),
        (2, "PolicyChanged", None),
    ]
    exported = io.StringIO()
    assert audit.export(store, exported).streams == 1


def test_reading_a_stream_remembers_its_last_link(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path / 'chain.db'}"
    job_id = new_id()
    writer, reader = open_store(url), open_store(url)
    try:
        writer.append(job_id, 0, stream_of(job_id, 3))
        reader.stream(job_id)
        assert reader._links[job_id] == (3, stored_links(writer, job_id)[-1])
        reader.append(job_id, 3, stream_of(job_id, 1, start=4))
        assert stored_links(reader, job_id) == expected_links(reader, job_id)
    finally:
        writer.close()
        reader.close()


def test_reading_the_log_remembers_each_streams_last_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A catch-up reads the log just before a batch of Completes appends to every stream it
    read: those appends chain without reading the log again, and the chain is right."""
    url = f"sqlite://{tmp_path / 'chain.db'}"
    ids = [new_id() for _ in range(3)]
    writer, reader = open_store(url), open_store(url)
    try:
        for n, job_id in enumerate(ids):
            writer.append(job_id, 0, stream_of(job_id, 2 + n))
        assert len(reader.read(0, 1000)) == 2 + 3 + 4
        reads = count_selects(monkeypatch, reader)
        reader.append_many(
            [(job_id, 2 + n, stream_of(job_id, 1, start=3 + n)) for n, job_id in enumerate(ids)]
        )
        assert reads == []
        monkeypatch.undo()
        for job_id in ids:
            assert stored_links(reader, job_id) == expected_links(reader, job_id)
        assert audit.verify(reader) == []
    finally:
        writer.close()
        reader.close()
