"""The stored form of events and jobs: cattrs + JSON round trips, and persisted names.

Every class in ``core.event.EVENT_TYPES`` gets a hypothesis strategy built with
``st.builds`` over its attrs fields (resolved type hints; ``st.from_type`` for the plain
types, registered strategies for datetimes, secrets, files, ranges, errors and the
``Any``-valued ``PropertySet.value``), and must survive
``event_from_bytes(topic, event_to_bytes(e)) == e``. A folded Job must survive
``job_from_dict(job_to_dict(job))`` through JSON, as the read models store it.
"""

from __future__ import annotations

import json
import types
import typing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backhaul.adapters import serialization
from backhaul.adapters.clock import ManualClock
from backhaul.adapters.manager import TransferManager
from backhaul.adapters.serialization import (
    EVENT_CLASSES,
    SCHEMA_VERSION,
    event_from_bytes,
    event_to_bytes,
    event_topic,
    job_from_dict,
    job_to_dict,
)
from backhaul.core import command as cmd
from backhaul.core import event as ev
from backhaul.core import hresult
from backhaul.core.command import SetSetting
from backhaul.core.job import FileList, Job, fold
from backhaul.core.value import (
    ByteRange,
    ClientCertificate,
    FileSpec,
    JobError,
    ProxySettings,
    Sealed,
)
from backhaul.core.vocabulary import (
    AuthScheme,
    AuthTarget,
    CertStoreLocation,
    ErrorContext,
    JobPriority,
    JobPropertyId,
    JobType,
    ProxyUsage,
)

# -- strategies ----------------------------------------------------------------------------

UINT64 = 2**64 - 1
TEXT = st.text(max_size=40)  # st.text() never yields lone surrogates: UTF-8 encodable
JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)
BYTE_RANGES = st.builds(
    ByteRange, offset=st.integers(0, UINT64 - 1), length=st.none() | st.integers(1, UINT64)
)
DIGESTS = st.none() | st.from_regex(r"sha256:[0-9a-f]{64}", fullmatch=True)

# The registry: types whose values st.from_type would not make the way the log holds them.
REGISTERED: dict[Any, st.SearchStrategy[Any]] = {
    datetime: st.datetimes(
        min_value=datetime(1970, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
    ),
    float: st.floats(allow_nan=False),  # NaN is not equal to itself
    str: TEXT,
    Sealed: st.builds(Sealed, st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdef0123456789+/=")),
    ByteRange: BYTE_RANGES,
    FileSpec: st.builds(
        FileSpec,
        remote_name=TEXT,
        local_name=TEXT,
        ranges=st.lists(BYTE_RANGES, max_size=3).map(tuple),
        expected_digest=DIGESTS,
    ),
    JobError: st.builds(
        JobError,
        context=st.sampled_from(ErrorContext),
        hresult=st.integers(0, 0xFFFFFFFF),
        description=TEXT,
        file_index=st.none() | st.integers(0, 200),
        protocol=st.none() | st.sampled_from(["http", "https", "smb", "file"]),
    ),
    Any: JSON_VALUES,  # PropertySet.value: the plain data core/setting.py records
}


def strategy_for(tp: Any) -> st.SearchStrategy[Any]:
    """A strategy for an annotation: registered, then unions, tuples, attrs classes, and
    ``st.from_type`` for the rest."""
    if tp in REGISTERED:
        return REGISTERED[tp]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return st.one_of([strategy_for(arg) for arg in args])
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return st.lists(strategy_for(args[0]), max_size=3).map(tuple)
        return st.tuples(*(strategy_for(arg) for arg in args))
    if tp is type(None):
        return st.none()
    if attrs.has(tp):
        return builds_over_fields(tp)
    return st.from_type(tp)


def builds_over_fields(cls: type[Any]) -> st.SearchStrategy[Any]:
    hints = typing.get_type_hints(cls)
    return st.builds(cls, **{f.name: strategy_for(hints[f.name]) for f in attrs.fields(cls)})


EVENT_STRATEGIES = {cls: builds_over_fields(cls) for cls in ev.EVENT_TYPES}


# -- events --------------------------------------------------------------------------------


@pytest.mark.parametrize("event_type", ev.EVENT_TYPES, ids=lambda cls: cls.__name__)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_every_event_survives_the_round_trip_through_bytes(
    event_type: type[ev.Event], data: st.DataObject
) -> None:
    event = data.draw(EVENT_STRATEGIES[event_type])
    topic = event_topic(event)
    stored = event_to_bytes(event)

    assert topic == event_type.__name__
    document = json.loads(stored.decode("utf-8"))
    assert document["v"] == SCHEMA_VERSION[topic]
    back = event_from_bytes(topic, stored)
    assert type(back) is event_type
    assert back == event
    assert event_to_bytes(back) == stored  # and the stored form is stable


def test_every_event_type_has_a_strategy_and_a_registered_topic() -> None:
    assert set(EVENT_STRATEGIES) == set(ev.EVENT_TYPES)
    assert dict(EVENT_CLASSES) == {cls.__name__: cls for cls in ev.EVENT_TYPES}
    assert all(issubclass(cls, ev.Event) and attrs.has(cls) for cls in ev.EVENT_TYPES)


def test_event_class_names_are_unique() -> None:
    names = [cls.__name__ for cls in ev.EVENT_TYPES]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    assert len(set(ev.EVENT_TYPES)) == len(ev.EVENT_TYPES)


def test_a_renamed_topic_without_an_alias_raises_value_error() -> None:
    event = ev.JobSuspended(datetime(2026, 1, 1, tzinfo=UTC))
    stored = event_to_bytes(event)
    assert "JobSuspendedOld" not in serialization.TOPIC_ALIASES
    with pytest.raises(ValueError, match="JobSuspendedOld"):
        event_from_bytes("JobSuspendedOld", stored)


def test_a_renamed_topic_with_an_alias_reads_as_the_current_class(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    event = ev.JobSuspended(datetime(2026, 1, 1, tzinfo=UTC))
    monkeypatch.setattr(serialization, "TOPIC_ALIASES", {"JobPaused": "JobSuspended"})
    assert event_from_bytes("JobPaused", event_to_bytes(event)) == event


def test_a_sealed_secret_is_stored_as_its_token_only() -> None:
    sealed = Sealed("b3BhcXVlLXRva2Vu")
    event = ev.CredentialsSet(datetime(2026, 1, 1, tzinfo=UTC), 1, 1, "user", sealed)
    document = json.loads(event_to_bytes(event))
    assert document["password"] == {"sealed": "b3BhcXVlLXRva2Vu"}


# -- jobs ----------------------------------------------------------------------------------


def json_round_trip(job: Job) -> Job:
    """What the read models do: job_to_dict -> JSON text -> job_from_dict."""
    text = json.dumps(job_to_dict(job), separators=(",", ":"))
    return job_from_dict(json.loads(text))


def rich_folded_job(tmp: Path) -> Job:
    """A job that has been through most of the API and the engine, folded from its log."""
    clock = ManualClock()
    with TransferManager("memory:", owner="serializer", clock=clock) as manager:
        job = manager.create_job("rich job", JobType.DOWNLOAD)
        clock.advance(1)
        job.description = "every field that has a value"
        job.priority = JobPriority.HIGH
        job.minimum_retry_delay = timedelta(seconds=30)
        job.no_progress_timeout = timedelta(hours=1)
        job.notify_flags = 0x0B
        job.set_notify_cmdline("/usr/bin/logger", "-t", "backhaul")
        job.set_proxy_settings(ProxyUsage.OVERRIDE, "http=proxy:8080", "<local>")
        job.security_flags = 0x100
        job.acl_flags = 0x3
        # Recorded as the API records it, past the certificate-store check (no store here).
        manager.execute(
            job.id,
            SetSetting(
                "client_certificate",
                ClientCertificate(int(CertStoreLocation.CURRENT_USER), "MY", subject="CN=client"),
            ),
        )
        job.set_credentials(AuthTarget.SERVER, AuthScheme.BASIC, "user", "pa55word")
        job.set_custom_headers("X-Trace: 1\r\n")
        job.set_property(JobPropertyId.COST_FLAGS, 0x80000067)
        job.set_property(JobPropertyId.NOTIFICATION_CLSID, "{12345678-1234-1234-1234-123456789ABC}")
        job.set_property(JobPropertyId.MAX_DOWNLOAD_SIZE, 10**12)
        job.set_property(JobPropertyId.USE_STORED_CREDENTIALS, AuthTarget.PROXY)
        job.set_property(JobPropertyId.MINIMUM_NOTIFICATION_INTERVAL_MS, 250)
        job.add_file("https://example.com/a.bin", tmp / "a.bin", ranges=[(0, 100), (200, None)])
        job.add_file("https://example.com/b.bin", tmp / "b.bin")
        job.resume()
        for command in (
            cmd.StartTransfer(),
            cmd.Connect(),
            cmd.Checkpoint(0, 50, 100, validator='"etag-1"'),
            cmd.FinishFile(0, 100, digest="sha256:" + "0" * 64),
            cmd.Fail(
                JobError(ErrorContext.REMOTE_FILE, hresult.http_status_hresult(503), file_index=1),
                True,
                retry_after=30.0,
                response_headers="HTTP/1.1 503 Service Unavailable\r\nRetry-After: 30\r\n\r\n",
            ),
        ):
            clock.advance(7)
            manager.execute(job.id, command)
        replayed = fold(a.event for a in manager.store.stream(job.id))
        assert replayed == job.snapshot()
    assert replayed is not None
    return replayed


def test_a_folded_job_survives_the_round_trip_through_a_dict(tmp_path: Path) -> None:
    job = rich_folded_job(tmp_path)
    assert job.files[0].transferred
    assert job.credentials
    assert job.custom_headers is not None
    assert job.error is not None
    assert job.files[1].response_headers.startswith("HTTP/1.1 503")  # the failed response's
    assert job.proxy == ProxySettings(int(ProxyUsage.OVERRIDE), "http=proxy:8080", "<local>")
    assert job_from_dict(job_to_dict(job)) == job
    assert json_round_trip(job) == job
    # The files are stored as the plain list they always were, and come back as a FileList.
    assert isinstance(job_to_dict(job)["files"], list)
    assert type(json_round_trip(job).files) is FileList


@settings(max_examples=60, deadline=None)
@given(job=builds_over_fields(Job))
def test_any_job_value_survives_the_round_trip_through_json(job: Job) -> None:
    assert json_round_trip(job) == job
