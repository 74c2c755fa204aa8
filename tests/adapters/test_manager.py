"""Behaviour of the Python API (TransferManager / TransferJob) on the in-memory store.

Each test is named for the BITS behaviour it pins down (bits-core.md §2 states, §3 job
types, §7 files, §8 progress and times, §14 properties, §15 ownership, §16 limits). The
engine is played by hand through ``manager.execute`` with core.command engine commands
and a ManualClock, so every time is known.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

import attrs
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from backhaul.adapters import localfile
from backhaul.adapters import manager as manager_module
from backhaul.adapters.clock import ManualClock
from backhaul.adapters.manager import TransferJob, TransferManager
from backhaul.adapters.notify import command_line_due_at
from backhaul.adapters.store import ConcurrentAppend, EventStore, open_store
from backhaul.core import command as cmd
from backhaul.core import hresult
from backhaul.core.error import BitsError
from backhaul.core.event import POLICY_STREAM
from backhaul.core.job import fold
from backhaul.core.limit import DESCRIPTION_MAX, DISPLAY_NAME_MAX, UNLIMITED, Limits
from backhaul.core.value import ByteRange, FileSpec, JobError, ProxySettings
from backhaul.core.vocabulary import (
    LENGTH_TO_EOF,
    AuthScheme,
    AuthTarget,
    ErrorContext,
    JobPriority,
    JobPropertyId,
    JobState,
    JobTransferPolicy,
    JobType,
    NotifyFlags,
)

OWNER = "alice"
URL = "https://example.com/files/data.bin"
TRANSIENT = JobError(ErrorContext.GENERAL_TRANSPORT, hresult.BG_E_CONNECT_FAILURE)
FATAL = JobError(ErrorContext.REMOTE_FILE, hresult.E_ACCESSDENIED)
UPLOAD_TYPES = [JobType.UPLOAD, JobType.UPLOAD_REPLY]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def store() -> EventStore:
    return open_store("memory:")


@pytest.fixture
def manager(store: EventStore, clock: ManualClock) -> TransferManager:
    return TransferManager(store, owner=OWNER, clock=clock)


@pytest.fixture
def not_admin(monkeypatch: pytest.MonkeyPatch) -> None:
    """The caller is no administrator (the tests run as root, whom the limits spare)."""
    monkeypatch.setattr(manager_module, "_is_admin", lambda: False)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """An existing local file for upload jobs."""
    path = tmp_path / "upload-me.bin"
    path.write_bytes(b"payload to upload\n")
    return path


def code(exc: pytest.ExceptionInfo[BitsError]) -> str:
    return hresult.name_of(exc.value.hresult)


def refused(
    store: EventStore, expected: int, call: Callable[[], Any]
) -> pytest.ExceptionInfo[BitsError]:
    """``call`` must raise BitsError(expected) and append nothing."""
    head = store.head()
    with pytest.raises(BitsError) as exc:
        call()
    assert code(exc) == hresult.name_of(expected), exc.value.message
    assert store.head() == head, "a refused call appended events"
    return exc


def outcome(call: Callable[[], Any]) -> Any:
    """The call's result, or the BitsError it raised."""
    try:
        return call()
    except BitsError as exc:
        return exc


def engine(manager: TransferManager, job: TransferJob, *commands: cmd.Command) -> None:
    for command in commands:
        manager.execute(job.id, command)


def download(manager: TransferManager, tmp_path: Path, files: int = 1) -> TransferJob:
    job = manager.create_job("download")
    for i in range(files):
        job.add_file(f"https://example.com/files/{i}.bin", tmp_path / f"file-{i}.bin")
    return job


def transferring(manager: TransferManager, tmp_path: Path, files: int = 1) -> TransferJob:
    job = download(manager, tmp_path, files)
    job.resume()
    engine(manager, job, cmd.StartTransfer(), cmd.Connect())
    assert job.state is JobState.TRANSFERRING
    return job


def transferred(manager: TransferManager, tmp_path: Path) -> TransferJob:
    job = transferring(manager, tmp_path)
    temp = localfile.temp_path(job.id, 0, str(tmp_path / "file-0.bin"))
    temp.write_bytes(b"0123456789")
    engine(manager, job, cmd.FinishFile(0, 10), cmd.FinishJob())
    assert job.state is JobState.TRANSFERRED
    return job


def replayed(store: EventStore, job: TransferJob) -> Any:
    return fold(a.event for a in store.stream(job.id))


# -- creation and defaults ---------------------------------------------------------------


@pytest.mark.parametrize("job_type", list(JobType))
def test_new_job_is_suspended_with_bits_defaults(
    manager: TransferManager, clock: ManualClock, job_type: JobType
) -> None:
    job = manager.create_job("defaults", job_type)

    assert job.state is JobState.SUSPENDED
    assert job.job_type is job_type
    assert job.owner == OWNER
    assert job.display_name == "defaults"
    assert job.description == ""
    assert job.priority is JobPriority.NORMAL
    assert job.minimum_retry_delay == timedelta(seconds=600)
    assert job.no_progress_timeout == timedelta(days=14)
    assert job.maximum_download_time == timedelta(days=90)
    assert job.notify_flags == 3 == NotifyFlags.JOB_TRANSFERRED | NotifyFlags.JOB_ERROR
    assert job.notify_cmdline is None
    assert job.proxy_settings == ProxySettings()
    assert job.http_method == ("GET" if job_type is JobType.DOWNLOAD else "BITS_POST")
    assert job.security_flags == 0
    assert job.acl_flags == 0
    assert job.credentials == []
    assert job.custom_headers is None
    assert job.client_certificate is None
    assert job.files() == []
    assert job.error is None
    assert job.error_count == 0
    assert job.get_property(JobPropertyId.COST_FLAGS) == JobTransferPolicy.ALWAYS
    assert job.get_property(JobPropertyId.MINIMUM_NOTIFICATION_INTERVAL_MS) == 500
    times = job.times
    assert times.creation_time == times.modification_time == clock.now()
    assert times.transfer_completion_time is None


def test_new_job_appends_exactly_one_event(manager: TransferManager, store: EventStore) -> None:
    head = store.head()
    job = manager.create_job("one event")
    assert store.head() == head + 1
    assert replayed(store, job) == job.snapshot()


def test_create_job_with_an_unknown_type_raises_e_invalidarg(
    manager: TransferManager, store: EventStore
) -> None:
    refused(store, hresult.E_INVALIDARG, lambda: manager.create_job("bad type", 7))  # type: ignore[arg-type]


def test_display_name_of_257_characters_raises_bg_e_string_too_long(
    manager: TransferManager, store: EventStore
) -> None:
    too_long = "n" * (DISPLAY_NAME_MAX + 1)
    refused(store, hresult.BG_E_STRING_TOO_LONG, lambda: manager.create_job(too_long))
    job = manager.create_job("n" * DISPLAY_NAME_MAX)
    refused(store, hresult.BG_E_STRING_TOO_LONG, lambda: setattr(job, "display_name", too_long))
    assert job.display_name == "n" * DISPLAY_NAME_MAX


def test_description_of_1025_characters_raises_bg_e_string_too_long(
    manager: TransferManager, store: EventStore
) -> None:
    job = manager.create_job("described")
    job.description = "d" * DESCRIPTION_MAX
    too_long = "d" * (DESCRIPTION_MAX + 1)
    refused(store, hresult.BG_E_STRING_TOO_LONG, lambda: setattr(job, "description", too_long))
    assert job.description == "d" * DESCRIPTION_MAX


def test_display_name_with_a_lone_surrogate_is_refused_or_stored_never_crashes(
    manager: TransferManager, store: EventStore
) -> None:
    """A Python str can hold a lone surrogate (a broken UTF-16 name from Windows). The API
    must either refuse it with E_INVALIDARG or store it; it must not escape as an encoding
    error from the store."""
    name = "report-\ud800.txt"
    result = outcome(lambda: manager.create_job(name))
    if isinstance(result, BitsError):
        assert hresult.name_of(result.hresult) == "E_INVALIDARG"
    else:
        assert result.display_name == name
        assert replayed(store, result) == result.snapshot()


# -- files -------------------------------------------------------------------------------


@pytest.mark.parametrize("job_type", UPLOAD_TYPES)
def test_upload_jobs_hold_exactly_one_file(
    manager: TransferManager, store: EventStore, source: Path, job_type: JobType
) -> None:
    job = manager.create_job("upload", job_type)
    job.add_file("https://example.com/upload/target", source)

    refused(
        store,
        hresult.BG_E_TOO_MANY_FILES,
        lambda: job.add_file("https://example.com/upload/second", source),
    )
    assert len(job.files()) == 1


@pytest.mark.parametrize("job_type", UPLOAD_TYPES)
def test_add_file_set_of_two_on_an_empty_upload_job_refuses_both(
    manager: TransferManager, store: EventStore, source: Path, job_type: JobType
) -> None:
    job = manager.create_job("upload", job_type)
    pair = [("https://example.com/upload/a", source), ("https://example.com/upload/b", source)]

    refused(store, hresult.BG_E_TOO_MANY_FILES, lambda: job.add_files(pair))

    assert job.files() == []
    job.add_files(pair[:1])
    assert len(job.files()) == 1


def test_add_file_set_on_a_download_job_adds_all_files_in_one_event(
    manager: TransferManager, store: EventStore, tmp_path: Path
) -> None:
    job = manager.create_job("download")
    head = store.head()
    job.add_files([(f"https://example.com/{i}", tmp_path / f"f{i}") for i in range(3)])
    assert store.head() == head + 1
    assert [f.local_name for f in job.files()] == [str(tmp_path / f"f{i}") for i in range(3)]


def test_one_file_is_the_same_as_in_the_whole_list(
    manager: TransferManager, tmp_path: Path
) -> None:
    job = manager.create_job("download")
    job.add_files([(f"https://example.com/{i}", tmp_path / f"f{i}") for i in range(3)])
    assert [job.file(i) for i in range(3)] == job.files()
    with pytest.raises(BitsError) as refused:
        job.file(3)
    assert refused.value.hresult == hresult.BG_E_FILE_NOT_FOUND


@pytest.mark.parametrize("job_type", UPLOAD_TYPES)
def test_ranges_on_an_upload_job_raise_e_notimpl(
    manager: TransferManager, store: EventStore, source: Path, job_type: JobType
) -> None:
    job = manager.create_job("upload", job_type)
    refused(
        store,
        hresult.E_NOTIMPL,
        lambda: job.add_file("https://example.com/upload/target", source, ranges=[(0, 10)]),
    )
    assert job.files() == []


@pytest.mark.parametrize("job_type", [JobType.DOWNLOAD, JobType.UPLOAD])
def test_get_reply_progress_of_a_job_without_a_reply_is_e_notimpl(
    manager: TransferManager, job_type: JobType
) -> None:
    """IBackgroundCopyJob2::GetReplyProgress: E_NOTIMPL unless the job is upload-reply."""
    job = manager.create_job("no reply", job_type)
    with pytest.raises(BitsError) as refused_call:
        job.reply_progress  # noqa: B018
    assert refused_call.value.hresult == hresult.E_NOTIMPL
    reply = manager.create_job("reply", JobType.UPLOAD_REPLY)
    assert reply.reply_progress.bytes_transferred == 0
    assert reply.reply_file_name is None  # no file yet to name the reply after


@pytest.mark.parametrize("job_type", UPLOAD_TYPES)
def test_set_remote_name_and_replace_remote_prefix_on_an_upload_job_raise_e_notimpl(
    manager: TransferManager, store: EventStore, source: Path, job_type: JobType
) -> None:
    job = manager.create_job("upload", job_type)
    job.add_file("https://example.com/upload/target", source)

    refused(store, hresult.E_NOTIMPL, lambda: job.set_remote_name(0, "https://example.org/other"))
    refused(
        store,
        hresult.E_NOTIMPL,
        lambda: job.replace_remote_prefix("https://example.com", "https://example.org"),
    )
    assert job.files()[0].remote_name == "https://example.com/upload/target"


def test_set_remote_name_and_replace_remote_prefix_change_download_remote_names(
    manager: TransferManager, tmp_path: Path
) -> None:
    job = download(manager, tmp_path, files=2)
    job.set_remote_name(1, "https://mirror.example.org/one.bin")
    assert job.replace_remote_prefix("https://example.com/files/", "https://cdn.example.net/")
    assert not job.replace_remote_prefix("https://nowhere.example/", "https://x.example/")
    assert [f.remote_name for f in job.files()] == [
        "https://cdn.example.net/0.bin",
        "https://mirror.example.org/one.bin",
    ]


@pytest.mark.parametrize(
    ("old", "new", "why"),
    [
        ("https://", "gopher://", "gopher"),  # a scheme nobody serves (bits-core.md §7.1)
        ("https://example.com/", "https://example.com:99999/", "Port out of range"),
        ("https://example.com/", "https:///", "names no host"),
        ("https://example.com/", "https://[::1/", "Invalid IPv6 URL"),
    ],
)
def test_replace_remote_prefix_refuses_a_name_add_file_would_refuse(
    manager: TransferManager, tmp_path: Path, old: str, new: str, why: str
) -> None:
    """ReplaceRemotePrefix: E_INVALIDARG if a result is invalid (bits-core.md §7.3), at
    the call and nothing recorded, as AddFile and SetRemoteName refuse those names."""
    job = download(manager, tmp_path, files=2)
    version = job.snapshot().version
    with pytest.raises(BitsError) as refused:
        job.replace_remote_prefix(old, new)
    assert refused.value.hresult == hresult.E_INVALIDARG
    assert why in refused.value.message
    assert job.snapshot().version == version
    for bad in (new + "files/0.bin", new + "x"):
        with pytest.raises(BitsError):
            job.add_file(bad, tmp_path / "other.bin")


@pytest.mark.parametrize(
    "ranges",
    [
        [(0, 100), (50, 10)],
        [(10, 5), (10, 5)],
        [(0, None), (1000, 5)],  # to the end of the file, then more
        [(500, 100), (0, 501)],  # overlap found after sorting by offset
    ],
)
def test_overlapping_ranges_raise_bg_e_overlapping_ranges(
    manager: TransferManager,
    store: EventStore,
    tmp_path: Path,
    ranges: list[tuple[int, int | None]],
) -> None:
    job = manager.create_job("ranges")
    refused(
        store,
        hresult.BG_E_OVERLAPPING_RANGES,
        lambda: job.add_file(URL, tmp_path / "ranged.bin", ranges=ranges),
    )
    assert job.files() == []


def test_bg_length_to_eof_is_a_range_to_the_end_of_the_file(
    manager: TransferManager, tmp_path: Path
) -> None:
    """BITS's sentinel, (UINT64)-1, as a length: the core's ``length=None``. It was taken as
    a length, the job's BytesTotal became 2**64 - 1, and the read model's refresh raised
    OverflowError in every engine that opened the store."""
    job = manager.create_job("to the end")
    job.add_file(URL, tmp_path / "a.bin", ranges=[(100, LENGTH_TO_EOF)])
    job.add_file(URL, tmp_path / "b.bin", ranges=[ByteRange(0, LENGTH_TO_EOF)])
    assert [f.ranges for f in job.files()] == [(ByteRange(100, None),), (ByteRange(0, None),)]
    assert job.progress.bytes_total is None
    manager.refresh_views()


@pytest.mark.parametrize(
    "bad",
    [(0, 2**63), (2**62, 2**62), (2**63 - 1, 1), (LENGTH_TO_EOF, 10), (0, 2**64 - 2), ("x", 1)],
)
def test_ranges_no_file_can_hold_raise_bg_e_invalid_range(
    manager: TransferManager, store: EventStore, tmp_path: Path, bad: tuple[Any, int]
) -> None:
    job = manager.create_job("ranges")
    refused(
        store,
        hresult.BG_E_INVALID_RANGE,
        lambda: job.add_file(URL, tmp_path / "ranged.bin", ranges=[bad]),
    )
    job.set_property(JobPropertyId.ON_DEMAND_MODE, True)
    job.add_file(URL, tmp_path / "on-demand.bin")
    refused(store, hresult.BG_E_INVALID_RANGE, lambda: job.request_file_ranges(0, [bad]))
    manager.refresh_views()


def test_one_file_named_two_ways_is_one_destination(
    manager: TransferManager, store: EventStore, tmp_path: Path
) -> None:
    """ "/d//x" is "/d/x": both in one job would publish one over the other at Complete."""
    job = manager.create_job("twice")
    job.add_file(URL, f"{tmp_path}/x.bin")
    refused(store, hresult.E_INVALIDARG, lambda: job.add_file(URL, f"{tmp_path}//x.bin"))
    refused(
        store,
        hresult.E_INVALIDARG,
        lambda: job.add_files([(URL, f"{tmp_path}/y.bin"), (URL, f"{tmp_path}///y.bin")]),
    )


def test_adjacent_ranges_are_accepted_and_count_only_the_requested_bytes(
    manager: TransferManager, tmp_path: Path
) -> None:
    job = manager.create_job("ranges")
    job.add_file(URL, tmp_path / "ranged.bin", ranges=[(900, 100), (100, 100), (200, 50)])
    assert job.files()[0].ranges == (ByteRange(900, 100), ByteRange(100, 100), ByteRange(200, 50))
    assert job.progress.bytes_total == 250


@pytest.mark.usefixtures("not_admin")
def test_files_per_job_limit_raises_bg_e_too_many_files_in_job(
    store: EventStore, clock: ManualClock, tmp_path: Path
) -> None:
    manager = TransferManager(store, owner=OWNER, clock=clock, limits=Limits(max_files_per_job=3))
    job = manager.create_job("limited")
    job.add_files([(f"https://example.com/{i}", tmp_path / f"f{i}") for i in range(2)])

    pair = [(f"https://example.com/{i}", tmp_path / f"f{i}") for i in (2, 3)]
    refused(store, hresult.BG_E_TOO_MANY_FILES_IN_JOB, lambda: job.add_files(pair))
    job.add_file("https://example.com/2", tmp_path / "f2")
    refused(
        store,
        hresult.BG_E_TOO_MANY_FILES_IN_JOB,
        lambda: job.add_file("https://example.com/3", tmp_path / "f3"),
    )
    assert len(job.files()) == 3


@pytest.mark.parametrize(
    "local",
    [
        "relative/path/file.bin",
        "{tmp}/no-such-directory/file.bin",
        "{tmp}",  # an existing directory, not a file name
        "{tmp}/../escape.bin",
        "",
    ],
    ids=["relative", "missing-directory", "directory", "dot-dot", "empty"],
)
def test_bad_local_name_raises_e_invalidarg_and_records_nothing(
    manager: TransferManager, store: EventStore, tmp_path: Path, local: str
) -> None:
    job = manager.create_job("bad local name")
    name = local.format(tmp=tmp_path)
    refused(store, hresult.E_INVALIDARG, lambda: job.add_file(URL, name))
    assert job.files() == []


@pytest.mark.parametrize(
    "bad", ["{tmp}/sub", "{tmp}/sub/", "{tmp}/sub/missing/file.bin", "{tmp}/sub/."]
)
def test_a_file_set_checks_each_name_though_its_directory_is_checked_once(
    manager: TransferManager, store: EventStore, tmp_path: Path, bad: str
) -> None:
    """The set's directories are looked at once each; a name after good names in the same
    directory is still refused when it is a directory or in a missing one."""
    (tmp_path / "sub").mkdir()
    job = manager.create_job("file set")
    good = [(f"{URL}?{i}", tmp_path / "sub" / f"{i}.bin") for i in range(3)]
    bad_name = bad.format(tmp=tmp_path)
    refused(store, hresult.E_INVALIDARG, lambda: job.add_files([*good, (URL, bad_name)]))
    assert job.files() == []
    job.add_files(good)
    assert len(job.files()) == 3


@pytest.mark.parametrize("job_type", UPLOAD_TYPES)
def test_upload_of_a_missing_file_raises_e_invalidarg(
    manager: TransferManager, store: EventStore, tmp_path: Path, job_type: JobType
) -> None:
    job = manager.create_job("upload", job_type)
    refused(
        store,
        hresult.E_INVALIDARG,
        lambda: job.add_file("https://example.com/upload", tmp_path / "not-there.bin"),
    )


@pytest.mark.parametrize(
    "remote",
    [
        "gopher://example.com/file.bin",
        "gopher://example.com/file",
        "not a url",
        "https://example.com/*.bin",
        "",
    ],
)
def test_unknown_url_scheme_or_bad_remote_name_raises_e_invalidarg(
    manager: TransferManager, store: EventStore, tmp_path: Path, remote: str
) -> None:
    job = manager.create_job("bad remote name")
    refused(store, hresult.E_INVALIDARG, lambda: job.add_file(remote, tmp_path / "file.bin"))
    assert job.files() == []


def test_a_refused_remote_name_is_shown_without_its_password_and_a_space_is_named(
    manager: TransferManager, tmp_path: Path
) -> None:
    """The message of a refused name never holds the password or a signature it carries;
    a space (BITS escapes nothing) gets its own hint."""
    job = manager.create_job("shown")
    with pytest.raises(BitsError) as refused_name:
        job.add_file("http://user:hunter2@127.0.0.1/a b.bin?sig=s3cret", tmp_path / "a")
    message = str(refused_name.value)
    assert "hunter2" not in message and "s3cret" not in message
    assert message.startswith(
        "'http://127.0.0.1/a b.bin?sig=<redacted>' holds a space: write it %20"
    )
    with pytest.raises(BitsError) as refused_name:
        job.add_file("not a url, hunter2", tmp_path / "a")
    assert "neither a URL nor a UNC path" in str(refused_name.value)
    assert job.files() == []


def test_a_manager_accepts_only_the_schemes_it_was_given(
    store: EventStore, clock: ManualClock, tmp_path: Path
) -> None:
    manager = TransferManager(store, owner=OWNER, clock=clock, schemes={"https"})
    job = manager.create_job("https only")
    job.add_file("https://example.com/a", tmp_path / "a")
    refused(
        store, hresult.E_INVALIDARG, lambda: job.add_file("http://example.com/b", tmp_path / "b")
    )


def test_upload_reply_jobs_need_an_http_url(
    manager: TransferManager, store: EventStore, source: Path
) -> None:
    job = manager.create_job("reply", JobType.UPLOAD_REPLY)
    refused(store, hresult.E_INVALIDARG, lambda: job.add_file("\\\\server\\share\\up.bin", source))


# -- finding and listing jobs ------------------------------------------------------------


@pytest.mark.parametrize("job_id", [str(uuid4()), "not-a-job-id"])
def test_get_job_of_an_unknown_id_raises_bg_e_not_found(
    manager: TransferManager, job_id: str
) -> None:
    with pytest.raises(BitsError) as exc:
        manager.get_job(job_id)
    assert code(exc) == "BG_E_NOT_FOUND"


@pytest.mark.parametrize("final", [JobState.CANCELLED, JobState.ACKNOWLEDGED])
def test_get_job_of_a_final_job_raises_bg_e_not_found_unless_include_final(
    manager: TransferManager, tmp_path: Path, final: JobState
) -> None:
    if final is JobState.CANCELLED:
        job = download(manager, tmp_path)
        job.cancel()
    else:
        job = transferred(manager, tmp_path)
        job.complete()

    with pytest.raises(BitsError) as exc:
        manager.get_job(job.id)
    assert code(exc) == "BG_E_NOT_FOUND"
    assert manager.get_job(job.id, include_final=True).state is final


def test_jobs_lists_live_jobs_and_excludes_final_ones(
    manager: TransferManager, clock: ManualClock, tmp_path: Path
) -> None:
    kept = download(manager, tmp_path)
    clock.advance(1)
    cancelled = manager.create_job("cancelled")
    cancelled.cancel()
    clock.advance(1)
    acknowledged = manager.create_job("acknowledged")
    acknowledged.add_file(URL, tmp_path / "ack.bin")
    acknowledged.complete()

    assert [j.id for j in manager.jobs()] == [kept.id]
    assert [j.id for j in manager.jobs(include_final=True)] == [
        kept.id,
        cancelled.id,
        acknowledged.id,
    ]


def test_jobs_lists_only_the_owners_jobs(
    store: EventStore, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(manager_module, "_is_admin", lambda: False)
    alice = TransferManager(store, owner="alice", clock=clock)
    bob = TransferManager(store, owner="bob", clock=clock)
    a = alice.create_job("alice's")
    clock.advance(1)
    b = bob.create_job("bob's")

    assert [j.id for j in alice.jobs()] == [a.id]
    assert [j.id for j in bob.jobs()] == [b.id]
    with pytest.raises(BitsError) as exc:
        list(alice.jobs(all_owners=True))
    assert code(exc) == "E_ACCESSDENIED"


def test_jobs_of_all_owners_are_listed_for_an_administrator(
    store: EventStore, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(manager_module, "_is_admin", lambda: True)
    alice = TransferManager(store, owner="alice", clock=clock)
    bob = TransferManager(store, owner="bob", clock=clock)
    a = alice.create_job("alice's")
    clock.advance(1)
    b = bob.create_job("bob's")

    assert [j.id for j in alice.jobs(all_owners=True)] == [a.id, b.id]
    assert [j.id for j in alice.jobs()] == [a.id]
    assert alice.get_job(b.id).owner == "bob"


@pytest.mark.skipif(os.geteuid() != 0, reason="all_owners needs root without a monkeypatch")
def test_jobs_of_all_owners_are_listed_when_running_as_root(
    store: EventStore, clock: ManualClock
) -> None:
    alice = TransferManager(store, owner="alice", clock=clock)
    bob = TransferManager(store, owner="bob", clock=clock)
    ids = {alice.create_job("a").id, bob.create_job("b").id}
    assert {j.id for j in alice.jobs(all_owners=True)} == ids


def test_get_job_of_another_owners_job_raises_e_accessdenied_for_a_standard_user(
    store: EventStore, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(manager_module, "_is_admin", lambda: False)
    alice = TransferManager(store, owner="alice", clock=clock)
    bob = TransferManager(store, owner="bob", clock=clock)
    job = alice.create_job("alice's")

    with pytest.raises(BitsError) as exc:
        bob.get_job(job.id)
    assert code(exc) == "E_ACCESSDENIED"
    refused(store, hresult.E_ACCESSDENIED, lambda: setattr(TransferJob(bob, job.id), "priority", 1))


@pytest.mark.usefixtures("not_admin")
def test_jobs_per_owner_limit_raises_bg_e_too_many_jobs_per_user(
    store: EventStore, clock: ManualClock
) -> None:
    limits = Limits(max_jobs_per_owner=2, max_jobs=None)
    alice = TransferManager(store, owner="alice", clock=clock, limits=limits)
    first = alice.create_job("1")
    alice.create_job("2")

    refused(store, hresult.BG_E_TOO_MANY_JOBS_PER_USER, lambda: alice.create_job("3"))
    TransferManager(store, owner="bob", clock=clock, limits=limits).create_job("bob's")
    first.cancel()  # final jobs no longer count
    alice.create_job("3")


@pytest.mark.usefixtures("not_admin")
def test_jobs_per_machine_limit_raises_bg_e_too_many_jobs_per_machine(
    store: EventStore, clock: ManualClock
) -> None:
    limits = Limits(max_jobs_per_owner=None, max_jobs=2)
    TransferManager(store, owner="alice", clock=clock, limits=limits).create_job("1")
    TransferManager(store, owner="bob", clock=clock, limits=limits).create_job("2")
    carol = TransferManager(store, owner="carol", clock=clock, limits=limits)
    refused(store, hresult.BG_E_TOO_MANY_JOBS_PER_MACHINE, lambda: carol.create_job("3"))


def test_an_administrator_is_held_to_no_limit(
    store: EventStore, clock: ManualClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BITS exempts administrators and service accounts from MaxJobsPerUser,
    MaxJobsPerMachine, MaxFilesPerJob and MaxRangesPerFile (§16); here root is one."""
    monkeypatch.setattr(manager_module, "_is_admin", lambda: True)
    limits = Limits(max_files_per_job=2, max_ranges_per_file=1, max_jobs_per_owner=1, max_jobs=1)
    manager = TransferManager(store, owner=OWNER, clock=clock, limits=limits)
    jobs = [manager.create_job(str(i)) for i in range(3)]
    jobs[0].add_files([(f"https://example.com/{i}", tmp_path / f"f{i}") for i in range(3)])
    jobs[1].add_file(URL, tmp_path / "r", ranges=[(0, 10), (20, 10)])
    assert len(jobs[0].files()) == 3
    monkeypatch.setattr(manager_module, "_is_admin", lambda: False)
    refused(store, hresult.BG_E_TOO_MANY_JOBS_PER_USER, lambda: manager.create_job("4"))
    refused(
        store,
        hresult.BG_E_TOO_MANY_RANGES_IN_FILE,
        lambda: jobs[2].add_file(URL, tmp_path / "s", ranges=[(0, 10), (20, 10)]),
    )


@pytest.mark.usefixtures("not_admin")
def test_jobs_per_owner_limit_also_holds_inside_a_batch(
    store: EventStore, clock: ManualClock
) -> None:
    limits = Limits(max_jobs_per_owner=2, max_jobs=None)
    alice = TransferManager(store, owner="alice", clock=clock, limits=limits)

    def three_jobs_in_one_batch() -> None:
        with alice.batch():
            for i in range(3):
                alice.create_job(f"batched {i}")

    with pytest.raises(BitsError) as exc:
        three_jobs_in_one_batch()
    assert code(exc) == "BG_E_TOO_MANY_JOBS_PER_USER"
    assert store.head() == 0


# -- settings ----------------------------------------------------------------------------


@pytest.mark.parametrize(("given", "stored"), [(0, 5), (1, 5), (4.9, 5), (5, 5), (60, 60)])
def test_minimum_retry_delay_below_5_seconds_is_raised_to_5(
    manager: TransferManager, given: float, stored: int
) -> None:
    job = manager.create_job("retry delay")
    job.minimum_retry_delay = given
    assert job.minimum_retry_delay == timedelta(seconds=stored)
    job.minimum_retry_delay = timedelta(seconds=given)
    assert job.minimum_retry_delay == timedelta(seconds=stored)


def test_negative_times_raise_e_invalidarg(manager: TransferManager, store: EventStore) -> None:
    """Negative and NaN seconds are refused (NaN raised ValueError); a part of a second
    counts as one (a NoProgressTimeout of 0.5 became 0: every error fatal)."""
    job = manager.create_job("times")
    for name in ("minimum_retry_delay", "no_progress_timeout", "maximum_download_time"):
        for bad in (-1, float("nan"), float("inf")):
            refused(store, hresult.E_INVALIDARG, lambda name=name, bad=bad: setattr(job, name, bad))
        setattr(job, name, timedelta(milliseconds=7500))
        assert getattr(job, name) == timedelta(seconds=8)
    job.no_progress_timeout = 0.5
    assert job.no_progress_timeout == timedelta(seconds=1)


def test_custom_headers_read_back_until_made_write_only(
    manager: TransferManager, store: EventStore
) -> None:
    job = manager.create_job("headers")
    headers = "X-Api-Key: abc123\r\nX-Trace: on\r\n"
    job.set_custom_headers(headers)
    assert job.custom_headers == headers

    job.make_custom_headers_write_only()
    with pytest.raises(BitsError) as exc:
        _ = job.custom_headers
    assert code(exc) == "E_ACCESSDENIED"
    head = store.head()
    job.make_custom_headers_write_only()  # already write-only: nothing to record
    assert store.head() == head


def test_custom_headers_none_removes_them(manager: TransferManager) -> None:
    job = manager.create_job("headers")
    job.set_custom_headers("X-One: 1\r\n")
    job.set_custom_headers(None)
    assert job.custom_headers is None


def test_malformed_custom_header_line_raises_e_invalidarg(
    manager: TransferManager, store: EventStore
) -> None:
    job = manager.create_job("headers")
    refused(store, hresult.E_INVALIDARG, lambda: job.set_custom_headers("no colon here\r\n"))


@pytest.mark.parametrize(
    "bad",
    ["Cookie: sid=SEKRIT-1\n", "Authorization: Bearer SEKRIT-1\r", "NoColon SEKRIT-1"],
    ids=["lf", "cr", "no-colon"],
)
def test_a_refused_custom_header_line_is_named_by_its_place_not_its_value(
    manager: TransferManager, bad: str
) -> None:
    """The message (printed by the command, logged by applications) showed the line's first
    40 characters: a whole cookie or bearer token."""
    job = manager.create_job("headers")
    with pytest.raises(BitsError) as refused_error:
        job.set_custom_headers(f"X-Good: 1\r\n{bad}\r\n")
    assert refused_error.value.hresult == hresult.E_INVALIDARG
    assert "header line 2 is malformed" in str(refused_error.value)
    assert "SEKRIT" not in str(refused_error.value)


@pytest.mark.parametrize(
    "line",
    [
        "Range: bytes=0-99",
        "if-range: x",
        "Content-Length: 5",
        "Transfer-Encoding: chunked",
        "Accept-Encoding: gzip",
        "BITS-Packet-Type: Ping",
    ],
)
def test_a_custom_header_backhaul_sets_itself_is_refused(
    manager: TransferManager, store: EventStore, line: str
) -> None:
    """Found with `get -H 'Range: bytes=0-99'`: every answer was a 206 the engine had not
    asked for, a transient BG_E_INVALID_SERVER_RESPONSE retried for NoProgressTimeout."""
    job = manager.create_job("headers")
    refused(store, hresult.E_INVALIDARG, lambda: job.set_custom_headers(f"X-Ok: 1\r\n{line}\r\n"))
    job.set_custom_headers("X-Ok: 1\r\nHost: vhost.test\r\n")  # curl's -H 'Host: ...' too
    assert job.custom_headers == "X-Ok: 1\r\nHost: vhost.test\r\n"


def test_remove_credentials_returns_false_when_none_were_set(
    manager: TransferManager, store: EventStore
) -> None:
    job = manager.create_job("credentials")
    head = store.head()
    assert job.remove_credentials(AuthTarget.SERVER, AuthScheme.BASIC) is False
    assert store.head() == head

    job.set_credentials(AuthTarget.SERVER, AuthScheme.BASIC, "alice", "s3cret")
    assert job.credentials == [(AuthTarget.SERVER, AuthScheme.BASIC, "alice")]
    assert job.remove_credentials(AuthTarget.PROXY, AuthScheme.BASIC) is False
    assert job.remove_credentials(AuthTarget.SERVER, AuthScheme.BASIC) is True
    assert job.credentials == []


def test_basic_credentials_need_a_user_name_and_a_password(
    manager: TransferManager, store: EventStore
) -> None:
    job = manager.create_job("credentials")
    refused(
        store,
        hresult.E_INVALIDARG,
        lambda: job.set_credentials(AuthTarget.SERVER, AuthScheme.BASIC, "alice", None),
    )


PROPERTY_VALUES: dict[JobPropertyId, tuple[Any, Any]] = {
    # id: (value given, value read back)
    JobPropertyId.COST_FLAGS: (int(JobTransferPolicy.STANDARD), JobTransferPolicy.STANDARD),
    JobPropertyId.NOTIFICATION_CLSID: (
        "{12345678-ABCD-1234-ABCD-123456789ABC}",
        "12345678-abcd-1234-abcd-123456789abc",
    ),
    JobPropertyId.DYNAMIC_CONTENT: (True, True),
    JobPropertyId.HIGH_PERFORMANCE: (True, True),
    JobPropertyId.MAX_DOWNLOAD_SIZE: (10**9, 10**9),
    JobPropertyId.USE_STORED_CREDENTIALS: (AuthTarget.PROXY, AuthTarget.PROXY),
    JobPropertyId.MINIMUM_NOTIFICATION_INTERVAL_MS: (2000, 2000),
    JobPropertyId.ON_DEMAND_MODE: (True, True),
}
DOWNLOAD_ONLY = [
    JobPropertyId.DYNAMIC_CONTENT,
    JobPropertyId.HIGH_PERFORMANCE,
    JobPropertyId.MAX_DOWNLOAD_SIZE,
    JobPropertyId.ON_DEMAND_MODE,
]


def test_property_table_covers_every_job_property_id() -> None:
    assert set(PROPERTY_VALUES) == set(JobPropertyId)


@pytest.mark.parametrize("prop", list(JobPropertyId), ids=lambda p: p.name)
def test_set_property_then_get_property_reads_the_value_back(
    manager: TransferManager, store: EventStore, prop: JobPropertyId
) -> None:
    job = manager.create_job("properties")
    given, expected = PROPERTY_VALUES[prop]
    job.set_property(prop, given)
    assert job.get_property(prop) == expected
    assert replayed(store, job) == job.snapshot()


@pytest.mark.parametrize("job_type", UPLOAD_TYPES)
@pytest.mark.parametrize("prop", DOWNLOAD_ONLY, ids=lambda p: p.name)
def test_download_only_property_on_an_upload_job_is_refused(
    manager: TransferManager, store: EventStore, prop: JobPropertyId, job_type: JobType
) -> None:
    job = manager.create_job("upload", job_type)
    refused(
        store,
        hresult.BG_E_PROPERTY_SUPPORTED_FOR_DOWNLOAD_JOBS_ONLY,
        lambda: job.set_property(prop, PROPERTY_VALUES[prop][0]),
    )


def test_dynamic_content_after_the_first_resume_raises_read_only_after_resume(
    manager: TransferManager, store: EventStore, tmp_path: Path
) -> None:
    job = download(manager, tmp_path)
    job.set_property(JobPropertyId.DYNAMIC_CONTENT, True)
    job.resume()
    job.suspend()
    refused(
        store,
        hresult.BG_E_READ_ONLY_PROPERTY_AFTER_RESUME,
        lambda: job.set_property(JobPropertyId.DYNAMIC_CONTENT, False),
    )
    assert job.get_property(JobPropertyId.DYNAMIC_CONTENT) is True


def test_high_performance_after_add_file_raises_read_only_after_addfile(
    manager: TransferManager, store: EventStore, tmp_path: Path
) -> None:
    job = download(manager, tmp_path)
    refused(
        store,
        hresult.BG_E_READ_ONLY_PROPERTY_AFTER_ADDFILE,
        lambda: job.set_property(JobPropertyId.HIGH_PERFORMANCE, True),
    )


def test_unknown_property_id_raises_bg_e_unknown_property_id(
    manager: TransferManager, store: EventStore
) -> None:
    job = manager.create_job("properties")
    refused(store, hresult.BG_E_UNKNOWN_PROPERTY_ID, lambda: job.set_property(6, 1))  # type: ignore[arg-type]
    with pytest.raises(BitsError) as exc:
        job.get_property(8)  # type: ignore[arg-type]
    assert code(exc) == "BG_E_UNKNOWN_PROPERTY_ID"


def test_custom_http_method_forces_foreground_and_locks_the_priority(
    manager: TransferManager, store: EventStore
) -> None:
    job = manager.create_job("put")
    job.priority = JobPriority.LOW
    job.http_method = "PUT"

    assert job.http_method == "PUT"
    assert job.priority is JobPriority.FOREGROUND
    refused(
        store,
        hresult.BG_E_NOT_SUPPORTED_WITH_CUSTOM_HTTP_METHOD,
        lambda: setattr(job, "priority", JobPriority.HIGH),
    )
    job.priority = JobPriority.FOREGROUND


def test_on_demand_mode_after_a_custom_http_method_is_refused(
    manager: TransferManager, store: EventStore
) -> None:
    """A custom method allows neither DYNAMIC_CONTENT nor ON_DEMAND_MODE (§10), in either
    order of the calls."""
    job = manager.create_job("post")
    job.http_method = "POST"
    for prop in (JobPropertyId.ON_DEMAND_MODE, JobPropertyId.DYNAMIC_CONTENT):
        refused(
            store,
            hresult.BG_E_NOT_SUPPORTED_WITH_CUSTOM_HTTP_METHOD,
            lambda prop=prop: job.set_property(prop, True),
        )
    job.set_property(JobPropertyId.ON_DEMAND_MODE, False)


def test_acl_flags_with_unknown_bits_raise_e_invalidarg(
    manager: TransferManager, store: EventStore
) -> None:
    job = manager.create_job("acl")
    refused(store, hresult.E_INVALIDARG, lambda: setattr(job, "acl_flags", 0x10))
    assert job.acl_flags == 0
    job.acl_flags = 0xF
    assert job.acl_flags == 0xF


@pytest.mark.parametrize(
    ("setter", "unknown_bit", "expected"),
    [
        ("notify_flags", 0x40, hresult.E_NOTIMPL),
        ("security_flags", 0x1000, hresult.E_NOTIMPL),
        ("acl_flags", 0x100, hresult.E_INVALIDARG),
    ],
)
def test_flag_setters_refuse_bits_outside_their_flag_set(
    manager: TransferManager, store: EventStore, setter: str, unknown_bit: int, expected: int
) -> None:
    job = manager.create_job("flags")
    before = getattr(job, setter)
    refused(store, expected, lambda: setattr(job, setter, unknown_bit | 0x1))
    assert getattr(job, setter) == before


def test_cost_flags_with_the_reserved_bit_raise_e_invalidarg(
    manager: TransferManager, store: EventStore
) -> None:
    job = manager.create_job("cost")
    reserved = 0x40000000  # BITS_COST_STATE_RESERVED is not a cost flag
    refused(
        store,
        hresult.E_INVALIDARG,
        lambda: job.set_property(JobPropertyId.COST_FLAGS, reserved | 0x1),
    )
    assert job.get_property(JobPropertyId.COST_FLAGS) == JobTransferPolicy.ALWAYS


def test_acl_flags_are_refused_once_the_job_is_transferred(
    manager: TransferManager, store: EventStore, tmp_path: Path
) -> None:
    job = transferred(manager, tmp_path)
    refused(store, hresult.BG_E_INVALID_STATE, lambda: setattr(job, "acl_flags", 1))


def test_setters_on_a_final_job_raise_bg_e_invalid_state(
    manager: TransferManager, store: EventStore, tmp_path: Path
) -> None:
    job = download(manager, tmp_path)
    job.cancel()
    for call in (
        lambda: setattr(job, "description", "late"),
        lambda: setattr(job, "priority", JobPriority.HIGH),
        lambda: job.set_custom_headers("X-Late: 1\r\n"),
        lambda: job.add_file(URL, tmp_path / "late.bin"),
        job.resume,
        job.suspend,
        job.cancel,
        job.complete,
    ):
        refused(store, hresult.BG_E_INVALID_STATE, call)


# -- the state-changing calls ------------------------------------------------------------


def test_resume_without_files_raises_bg_e_empty(
    manager: TransferManager, store: EventStore
) -> None:
    job = manager.create_job("empty")
    refused(store, hresult.BG_E_EMPTY, job.resume)
    assert job.state is JobState.SUSPENDED


def test_resume_with_a_file_queues_the_job(manager: TransferManager, tmp_path: Path) -> None:
    job = download(manager, tmp_path)
    job.resume()
    assert job.state is JobState.QUEUED
    job.resume()  # an action state stays as it is
    assert job.state is JobState.QUEUED
    job.suspend()
    assert job.state is JobState.SUSPENDED


def test_complete_of_a_download_without_transferred_files_returns_partial_complete(
    manager: TransferManager, tmp_path: Path
) -> None:
    job = download(manager, tmp_path, files=2)
    assert job.complete() == hresult.BG_S_PARTIAL_COMPLETE
    assert job.state is JobState.ACKNOWLEDGED
    assert not (tmp_path / "file-0.bin").exists()


@pytest.mark.parametrize("job_type", UPLOAD_TYPES)
def test_complete_of_an_upload_job_that_is_not_transferred_raises_bg_e_invalid_state(
    manager: TransferManager, store: EventStore, source: Path, job_type: JobType
) -> None:
    job = manager.create_job("upload", job_type)
    job.add_file("https://example.com/upload/target", source)
    refused(store, hresult.BG_E_INVALID_STATE, job.complete)
    job.resume()
    refused(store, hresult.BG_E_INVALID_STATE, job.complete)
    assert job.state is JobState.QUEUED


def test_complete_of_a_transferred_upload_job_returns_s_ok(
    manager: TransferManager, source: Path
) -> None:
    job = manager.create_job("upload", JobType.UPLOAD)
    job.add_file("https://example.com/upload/target", source)
    job.resume()
    engine(
        manager,
        job,
        cmd.StartTransfer(),
        cmd.Connect(),
        cmd.FinishFile(0, source.stat().st_size),
        cmd.FinishJob(),
    )
    assert job.complete() == hresult.S_OK
    assert job.state is JobState.ACKNOWLEDGED
    assert source.exists()  # an upload's source is never touched


def test_complete_publishes_the_temp_file_into_place_atomically(
    manager: TransferManager, tmp_path: Path
) -> None:
    target = tmp_path / "published.bin"
    job = manager.create_job("publish")
    job.add_file(URL, target)
    job.resume()
    temp = localfile.temp_path(job.id, 0, str(target))
    assert job.files()[0].temporary_name == str(temp)
    data = os.urandom(4096)
    temp.write_bytes(data[:1000])
    engine(manager, job, cmd.StartTransfer(), cmd.Connect(), cmd.Checkpoint(0, 1000, 4096))
    with temp.open("ab") as f:
        f.write(data[1000:])
    engine(manager, job, cmd.FinishFile(0, 4096), cmd.FinishJob())
    assert job.state is JobState.TRANSFERRED
    assert not target.exists()
    inode = temp.stat().st_ino

    assert job.complete() == hresult.S_OK

    assert target.read_bytes() == data
    assert target.stat().st_ino == inode  # renamed into place, not copied
    assert not temp.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["published.bin"]
    done = manager.get_job(job.id, include_final=True)
    assert done.files()[0].progress.completed
    assert done.files()[0].temporary_name is None


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o4755])
def test_a_file_published_over_another_keeps_its_permissions_and_owner(
    manager: TransferManager, tmp_path: Path, mode: int
) -> None:
    """As curl -o and wget (which write in place) keep them: a private file stays private
    when a new version comes over it; no set-user-ID bit goes to the new bytes. A new
    name gets the usual mode (umask)."""
    kept, new = tmp_path / "kept.bin", tmp_path / "new.bin"
    kept.write_bytes(b"old version")
    os.chmod(kept, mode)
    os.chown(kept, 65534, 65534)  # the tests run as root: another owner's file
    job = manager.create_job("over")
    job.add_files([(URL, kept), (URL + "?2", new)])
    job.resume()
    temps = [localfile.temp_path(job.id, i, str(p)) for i, p in enumerate((kept, new))]
    for temp in temps:
        temp.write_bytes(b"new version")
    engine(manager, job, cmd.StartTransfer(), cmd.Connect())
    engine(manager, job, cmd.FinishFile(0, 11), cmd.FinishFile(1, 11), cmd.FinishJob())

    assert job.complete() == hresult.S_OK

    assert kept.read_bytes() == b"new version"
    st = kept.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (mode & 0o777, 65534, 65534)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(new.stat().st_mode) == 0o666 & ~umask
    assert new.stat().st_uid == os.geteuid()


def test_a_temp_file_is_its_owners_alone_until_complete(tmp_path: Path) -> None:
    """The new version of a private file was readable by all (0644) in its temp file until
    Complete gave it the old one's mode: temps are 0600 while they fill."""
    private = tmp_path / "private.bin"
    private.write_bytes(b"old secret")
    os.chmod(private, 0o600)
    temp = localfile.temp_path("12345678-aaaa-4aaa-8aaa-aaaaaaaaaaaa", 0, str(private))
    fd = localfile.open_temp(temp, os.O_RDWR | os.O_CREAT)
    os.close(fd)
    assert stat.S_IMODE(temp.stat().st_mode) == 0o600
    with localfile.new_temp(tmp_path / ".other.bhtmp") as f:
        assert stat.S_IMODE(os.fstat(f.fileno()).st_mode) == 0o600


def test_complete_after_an_error_keeps_the_whole_files_and_deletes_the_rest(
    manager: TransferManager, tmp_path: Path
) -> None:
    job = transferring(manager, tmp_path, files=2)
    first = localfile.temp_path(job.id, 0, str(tmp_path / "file-0.bin"))
    second = localfile.temp_path(job.id, 1, str(tmp_path / "file-1.bin"))
    first.write_bytes(b"whole")
    second.write_bytes(b"par")
    engine(manager, job, cmd.FinishFile(0, 5), cmd.Checkpoint(1, 3, 10), cmd.Fail(FATAL, False))
    assert job.state is JobState.ERROR

    assert job.complete() == hresult.BG_S_PARTIAL_COMPLETE

    assert (tmp_path / "file-0.bin").read_bytes() == b"whole"
    assert not (tmp_path / "file-1.bin").exists()
    assert not first.exists()
    assert not second.exists()


def test_complete_publishes_an_empty_file_and_resumes_a_complete_that_failed_half_way(
    manager: TransferManager, tmp_path: Path
) -> None:
    """An empty file has no temp file to rename: Complete creates it. A file an earlier
    Complete already renamed (it failed on a later file) counts as published, its temp
    file gone: the next Complete neither rejects it nor fails on it. Here the later file's
    destination turned into a directory after AddFile (ERROR_ACCESS_DENIED)."""
    job = transferring(manager, tmp_path, files=3)
    temps = [localfile.temp_path(job.id, i, str(tmp_path / f"file-{i}.bin")) for i in (0, 1, 2)]
    temps[0].write_bytes(b"whole")
    temps[2].write_bytes(b"abc")
    engine(manager, job, cmd.FinishFile(0, 5), cmd.FinishFile(1, 0), cmd.FinishFile(2, 3))
    engine(manager, job, cmd.FinishJob())
    assert job.state is JobState.TRANSFERRED
    in_the_way = tmp_path / "file-2.bin"
    in_the_way.mkdir()

    with pytest.raises(BitsError) as failed:
        job.complete()
    assert failed.value.hresult == hresult.hresult_from_win32(hresult.ERROR_ACCESS_DENIED)
    assert "file-2.bin" in str(failed.value)
    assert job.state is JobState.TRANSFERRED
    assert (tmp_path / "file-0.bin").read_bytes() == b"whole"  # renamed before the failure
    assert (tmp_path / "file-1.bin").read_bytes() == b""
    assert not temps[0].exists()

    in_the_way.rmdir()
    assert job.complete() == hresult.S_OK
    assert [(tmp_path / f"file-{i}.bin").read_bytes() for i in (0, 1, 2)] == [b"whole", b"", b"abc"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"file-{i}.bin" for i in (0, 1, 2)]


def whole_and_part(manager: TransferManager, tmp_path: Path) -> tuple[TransferJob, list[Path]]:
    """A job of two files: the first transferred (5 bytes), the second checkpointed at 4."""
    job = transferring(manager, tmp_path, files=2)
    temps = [localfile.temp_path(job.id, i, str(tmp_path / f"file-{i}.bin")) for i in (0, 1)]
    temps[0].write_bytes(b"whole")
    temps[1].write_bytes(b"part")
    engine(manager, job, cmd.FinishFile(0, 5), cmd.Checkpoint(1, 4, 10))
    return job, temps


def killed_after_the_append(manager: TransferManager, monkeypatch: pytest.MonkeyPatch) -> None:
    """The manager's next command is appended, then the process 'dies' (KeyboardInterrupt
    stands for the kill: nothing after the append runs)."""
    execute = manager.execute

    def killed_after(job_id: str, command: cmd.Command) -> object:
        execute(job_id, command)
        raise KeyboardInterrupt

    monkeypatch.setattr(manager, "execute", killed_after)


def test_cancel_deletes_the_temp_files(manager: TransferManager, tmp_path: Path) -> None:
    job, temps = whole_and_part(manager, tmp_path)

    assert job.cancel() == hresult.S_OK

    assert job.state is JobState.CANCELLED
    assert not any(t.exists() for t in temps)
    assert not (tmp_path / "file-0.bin").exists()


def test_a_cancel_killed_after_its_event_leaves_no_temp_file(
    manager: TransferManager, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed the moment the log says CANCELLED (a SIGKILL, a power cut): no engine looks
    at a final job again, so the temp files must be gone already."""
    job, temps = whole_and_part(manager, tmp_path)
    killed_after_the_append(manager, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        job.cancel()

    assert job.state is JobState.CANCELLED
    assert not any(t.exists() for t in temps)


def test_a_partial_complete_killed_after_its_event_leaves_no_temp_file(
    manager: TransferManager, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job, temps = whole_and_part(manager, tmp_path)
    killed_after_the_append(manager, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        job.complete()

    assert job.state is JobState.ACKNOWLEDGED
    assert (tmp_path / "file-0.bin").read_bytes() == b"whole"
    assert not any(t.exists() for t in temps)


# -- times -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("retry_after", "kept"),
    [(30.0, 30.0), (1e14, 365 * 86400.0), (float("inf"), 365 * 86400.0), (float("nan"), None)],
)
def test_a_servers_retry_after_is_kept_up_to_a_year(
    manager: TransferManager, clock: ManualClock, tmp_path: Path, retry_after: float, kept: float
) -> None:
    """A Retry-After of 10**14 seconds overflowed the fold's clock (OverflowError): the error
    was never recorded and the engine retried at once, again and again."""
    job = manager.create_job("retry after")
    job.add_file(URL, tmp_path / "t.bin")
    job.resume()
    manager.execute(job.id, cmd.StartTransfer())
    manager.execute(job.id, cmd.Fail(TRANSIENT, transient=True, retry_after=retry_after))
    assert job.state is JobState.TRANSIENT_ERROR
    wait = job.snapshot().retry_not_before
    assert (None if wait is None else (wait - clock.now()).total_seconds()) == kept


def test_modification_time_moves_on_every_call(
    manager: TransferManager, clock: ManualClock, tmp_path: Path
) -> None:
    job = manager.create_job("times")
    created = job.times.creation_time
    calls: list[Callable[[], Any]] = [
        lambda: job.add_file(URL, tmp_path / "t.bin"),
        lambda: setattr(job, "description", "new description"),
        lambda: setattr(job, "priority", JobPriority.LOW),
        lambda: setattr(job, "display_name", "renamed"),
        lambda: setattr(job, "no_progress_timeout", 60),
        lambda: job.set_custom_headers("X-A: 1\r\n"),
        job.resume,
        lambda: manager.execute(job.id, cmd.StartTransfer()),
        lambda: manager.execute(job.id, cmd.Connect()),
        lambda: manager.execute(job.id, cmd.Checkpoint(0, 1, 10)),
        job.suspend,
        job.cancel,
    ]
    for call in calls:
        clock.advance(timedelta(seconds=3))
        call()
        assert job.times.modification_time == clock.now()
        assert job.times.creation_time == created


def test_the_engines_bookkeeping_leaves_the_modification_time(
    manager: TransferManager, clock: ManualClock, tmp_path: Path
) -> None:
    """A lease taken, renewed or released and a run of the notify command line are the
    engine's records, not modifications (§8): ModificationTime, which is also the
    JobInactivityTimeout clock, stays. The command line's retry is timed from its run."""
    job = manager.create_job("times")
    job.add_file(URL, tmp_path / "t.bin")
    job.set_notify_cmdline("/bin/false")
    job.resume()
    manager.execute(job.id, cmd.StartTransfer())
    manager.execute(job.id, cmd.Fail(FATAL, transient=False))
    assert job.state is JobState.ERROR
    errored = job.times.modification_time
    for command in (
        cmd.RecordNotification("error", 1),
        cmd.TakeLease("w1", 30),
        cmd.TakeLease("w1", 30),
        cmd.ReleaseLease("w1"),
    ):
        clock.advance(timedelta(hours=1))
        manager.execute(job.id, command)
        assert job.times.modification_time == errored
    ran = errored + timedelta(hours=1)
    assert command_line_due_at(job.snapshot()) == ran + timedelta(seconds=600)
    clock.advance(timedelta(hours=1))
    job.description = "a real change"
    assert job.times.modification_time == clock.now()


def test_refused_call_leaves_the_modification_time(
    manager: TransferManager, clock: ManualClock
) -> None:
    job = manager.create_job("times")
    before = job.times.modification_time
    clock.advance(10)
    with pytest.raises(BitsError):
        job.resume()
    assert job.times.modification_time == before


def test_transfer_completion_time_is_set_on_entering_transferred(
    manager: TransferManager, clock: ManualClock, tmp_path: Path
) -> None:
    job = transferring(manager, tmp_path)
    engine(manager, job, cmd.FinishFile(0, 10))
    assert job.times.transfer_completion_time is None
    clock.advance(timedelta(minutes=5))
    finished_at = clock.now()
    engine(manager, job, cmd.FinishJob())
    clock.advance(timedelta(minutes=5))
    assert job.times.transfer_completion_time == finished_at


# -- errors ------------------------------------------------------------------------------


def test_error_is_none_unless_the_job_is_in_error_or_transient_error(
    manager: TransferManager, tmp_path: Path
) -> None:
    job = transferring(manager, tmp_path)
    assert job.error is None
    engine(manager, job, cmd.Fail(TRANSIENT, True))
    assert job.state is JobState.TRANSIENT_ERROR
    error = job.error
    assert error is not None
    assert error.hresult == hresult.BG_E_CONNECT_FAILURE
    assert error.context is ErrorContext.GENERAL_TRANSPORT
    assert error.description
    assert str(error) == (
        f"{error.description} [BG_E_CONNECT_FAILURE 0x8020002D] (GENERAL_TRANSPORT)"
        if error.file_index is None
        else f"{error.description} [BG_E_CONNECT_FAILURE 0x8020002D] "
        f"(GENERAL_TRANSPORT, file {error.file_index})"
    )
    engine(manager, job, cmd.Retry())
    assert job.state is JobState.QUEUED
    assert job.error is None
    engine(manager, job, cmd.StartTransfer(), cmd.Connect(), cmd.Fail(FATAL, False))
    assert job.state is JobState.ERROR
    assert job.error is not None
    assert job.error.hresult == hresult.E_ACCESSDENIED
    job.suspend()
    assert job.error is None


def test_error_count_counts_failures_but_not_network_loss_or_blocking(
    manager: TransferManager, tmp_path: Path
) -> None:
    job = transferring(manager, tmp_path)
    engine(manager, job, cmd.Fail(TRANSIENT, True))
    assert job.error_count == 1
    engine(manager, job, cmd.Retry(), cmd.LoseNetwork())
    assert job.state is JobState.TRANSIENT_ERROR
    assert job.error is not None
    assert job.error.hresult == hresult.BG_E_NETWORK_DISCONNECTED
    assert job.error_count == 1
    engine(manager, job, cmd.RestoreNetwork(), cmd.Block(hresult.BG_E_BLOCKED_BY_POLICY))
    assert job.state is JobState.TRANSIENT_ERROR
    assert job.error is not None
    assert job.error.hresult == hresult.BG_E_BLOCKED_BY_POLICY
    assert job.error_count == 1
    engine(manager, job, cmd.Unblock(), cmd.StartTransfer(), cmd.Fail(FATAL, False))
    assert job.error_count == 2


def test_no_progress_timeout_0_turns_a_transient_failure_into_error(
    manager: TransferManager, tmp_path: Path
) -> None:
    job = download(manager, tmp_path)
    job.no_progress_timeout = 0
    job.resume()
    engine(manager, job, cmd.StartTransfer(), cmd.Fail(TRANSIENT, True))
    assert job.state is JobState.ERROR
    assert job.error is not None
    assert job.error.hresult == hresult.BG_E_CONNECT_FAILURE


def test_custom_http_method_turns_a_transient_failure_into_error(
    manager: TransferManager, tmp_path: Path
) -> None:
    job = download(manager, tmp_path)
    job.http_method = "PUT"
    job.resume()
    engine(manager, job, cmd.StartTransfer(), cmd.Fail(TRANSIENT, True))
    assert job.state is JobState.ERROR


def test_transient_failure_with_a_default_job_is_retried(
    manager: TransferManager, tmp_path: Path
) -> None:
    job = download(manager, tmp_path)
    job.resume()
    engine(manager, job, cmd.StartTransfer(), cmd.Fail(TRANSIENT, True))
    assert job.state is JobState.TRANSIENT_ERROR
    job.resume()  # retries at once
    assert job.state is JobState.QUEUED


# -- group commit ------------------------------------------------------------------------


def test_batch_appends_nothing_when_the_block_raises(
    manager: TransferManager, store: EventStore, tmp_path: Path
) -> None:
    existing = download(manager, tmp_path)
    head = store.head()
    created: list[str] = []

    def abandoned_batch() -> None:
        with manager.batch():
            job = manager.create_job("batched")
            created.append(job.id)
            job.add_file(URL, tmp_path / "batched.bin")
            existing.description = "changed in the batch"
            existing.resume()
            raise RuntimeError("abandon the batch")

    with pytest.raises(RuntimeError, match="abandon"):
        abandoned_batch()

    assert store.head() == head
    assert existing.description == ""
    assert existing.state is JobState.SUSPENDED
    with pytest.raises(BitsError) as exc:
        manager.get_job(created[0])
    assert code(exc) == "BG_E_NOT_FOUND"


def test_batch_appends_everything_in_one_go(
    manager: TransferManager, store: EventStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    existing = download(manager, tmp_path)
    head = store.head()
    appends: list[int] = []
    real_append_many = store.append_many

    def counting(batches: Any) -> list[int]:
        appends.append(sum(len(events) for _, _, events in batches))
        return real_append_many(batches)

    monkeypatch.setattr(store, "append_many", counting)

    with manager.batch():
        job = manager.create_job("batched")
        job.add_file(URL, tmp_path / "batched.bin")
        job.description = "batched description"
        existing.resume()
        existing.priority = JobPriority.HIGH
        assert store.head() == head  # nothing is written before the block ends
        assert job.description == "batched description"  # but reads see the batch

    assert appends == [5]
    assert store.head() == head + 5
    assert job.state is JobState.SUSPENDED
    assert existing.state is JobState.QUEUED
    for handle in (job, existing):
        assert replayed(store, handle) == handle.snapshot()


def test_batch_reads_the_live_job_when_its_view_row_is_behind(
    store: EventStore, clock: ManualClock, tmp_path: Path
) -> None:
    """A job last seen through the read model (another manager, or after a restart) must be
    caught up with the log inside a batch too, as everywhere else."""
    writer = TransferManager(store, owner=OWNER, clock=clock)
    job = download(writer, tmp_path)
    writer.refresh_views()
    job.description = "written after the views were refreshed"

    other = TransferManager(store, owner=OWNER, clock=clock)
    with other.batch():
        handle = other.get_job(job.id)
        assert handle.description == "written after the views were refreshed"
        handle.priority = JobPriority.HIGH

    assert job.priority is JobPriority.HIGH
    assert job.description == "written after the views were refreshed"


def job_ids_asked(monkeypatch: pytest.MonkeyPatch, reader: object, name: str) -> list[str]:
    """Record the job id of every call of ``reader.name(job_id, ...)`` from now on."""
    asked: list[str] = []
    real = getattr(reader, name)

    def counted(job_id: str, *args: Any) -> Any:
        asked.append(job_id)
        return real(job_id, *args)

    monkeypatch.setattr(reader, name, counted)
    return asked


def test_a_batch_reads_each_job_from_the_store_once(
    store: EventStore,
    clock: ManualClock,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Completing 1,000 jobs must not read each one four times: inside a batch a job is read
    at its first use; a change another process appends after that fails the commit, and
    nothing of the batch is written."""
    writer = TransferManager(store, owner=OWNER, clock=clock)
    ids = [download(writer, tmp_path).id for _ in range(3)]
    reads = job_ids_asked(monkeypatch, store, "stream")
    reader = TransferManager(store, owner=OWNER, clock=clock)
    with reader.batch():
        for job_id in ids:
            handle = reader.get_job(job_id)
            assert handle.state is JobState.SUSPENDED
            handle.description = "batched"
            handle.resume()
            assert handle.state is JobState.QUEUED
    # (the manager reads the policy stream once as it starts: its secret query parameters)
    assert sorted(r for r in reads if r != POLICY_STREAM) == sorted(ids)
    assert [writer.get_job(i).description for i in ids] == ["batched"] * 3

    head = store.head()

    def raced() -> None:
        with reader.batch():
            reader.get_job(ids[0]).priority = JobPriority.HIGH
            writer.get_job(ids[0]).description = "another process, meanwhile"
            reader.get_job(ids[1]).suspend()

    with pytest.raises(ConcurrentAppend):
        raced()
    assert store.head() == head + 1  # only the other process's change
    assert writer.get_job(ids[0]).priority is not JobPriority.HIGH
    assert writer.get_job(ids[1]).state is JobState.QUEUED


def test_refresh_views_keeps_the_jobs_it_folded_so_no_row_is_read_again(
    store: EventStore,
    clock: ManualClock,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A manager that caught the read model up holds those jobs: reading one after that
    reads only its newer events (none of its row). Inside a batch the jobs the batch
    changed stay as the batch has them."""
    writer = TransferManager(store, owner=OWNER, clock=clock)
    ids = [download(writer, tmp_path).id for _ in range(3)]
    for job_id in ids:
        writer.get_job(job_id).description = "before the catch-up"
    assert store.views.position() < store.head()  # the read model has not folded them yet
    reader = TransferManager(store, owner=OWNER, clock=clock)
    reader.refresh_views()
    rows = job_ids_asked(monkeypatch, store.views, "get")
    writer.get_job(ids[0]).description = "after the catch-up"  # a newer event: still seen
    assert [reader.get_job(i).state for i in ids] == [JobState.SUSPENDED] * 3
    assert reader.get_job(ids[0]).description == "after the catch-up"
    assert rows == []

    writer.get_job(ids[1]).description = "before the batch"  # the next catch-up folds it
    with reader.batch():
        reader.get_job(ids[1]).resume()
        reader.refresh_views()  # folds the description, not the resume (not in the log yet)
        assert reader.get_job(ids[1]).state is JobState.QUEUED
    assert writer.get_job(ids[1]).state is JobState.QUEUED


def test_a_batch_right_after_refresh_views_reads_none_of_the_jobs_it_folded(
    store: EventStore,
    clock: ManualClock,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Complete many jobs right after a refresh: while the log has not moved, a batch takes
    the refreshed copies as they are; once it moved, each job is read again."""
    writer = TransferManager(store, owner=OWNER, clock=clock)
    ids = [download(writer, tmp_path).id for _ in range(3)]
    for job_id in ids:
        writer.get_job(job_id).description = "folded by the refresh"
    reader = TransferManager(store, owner=OWNER, clock=clock)
    reader.refresh_views()
    reads = job_ids_asked(monkeypatch, store, "stream")
    with reader.batch():
        for job_id in ids:
            reader.get_job(job_id).resume()
    assert reads == []
    assert [writer.get_job(i).state for i in ids] == [JobState.QUEUED] * 3

    reader.refresh_views()
    writer.get_job(ids[1]).description = "moved the log after the refresh"
    reads.clear()
    with reader.batch():
        assert reader.get_job(ids[1]).description == "moved the log after the refresh"
        reader.get_job(ids[2]).suspend()
    assert sorted(reads) == sorted(ids[1:])


def test_cancel_inside_an_abandoned_batch_keeps_the_temp_files(
    manager: TransferManager, store: EventStore, tmp_path: Path
) -> None:
    """Nothing of an abandoned batch happens: the job is not cancelled, so the partial
    download it still owns must still be there."""
    job = transferring(manager, tmp_path)
    temp = localfile.temp_path(job.id, 0, str(tmp_path / "file-0.bin"))
    temp.write_bytes(b"partial")
    engine(manager, job, cmd.Checkpoint(0, 7, 100))

    def abandoned_batch() -> None:
        with manager.batch():
            job.cancel()
            raise RuntimeError("abandon the batch")

    with pytest.raises(RuntimeError, match="abandon"):
        abandoned_batch()

    assert job.state is JobState.TRANSFERRING
    assert job.progress.bytes_transferred == 7
    assert temp.read_bytes() == b"partial"


# -- live handles ------------------------------------------------------------------------


def test_a_handle_sees_changes_made_through_another_manager(
    store: EventStore, clock: ManualClock, tmp_path: Path
) -> None:
    first = TransferManager(store, owner=OWNER, clock=clock)
    second = TransferManager(store, owner=OWNER, clock=clock)
    job = download(first, tmp_path)
    other = second.get_job(job.id)

    other.description = "from the second manager"
    job.resume()

    assert job.description == "from the second manager"
    assert other.state is JobState.QUEUED
    assert job.snapshot() == other.snapshot() == replayed(store, job)


def test_add_files_records_the_file_specs_as_given(
    manager: TransferManager, store: EventStore, tmp_path: Path
) -> None:
    job = manager.create_job("specs")
    digest = "sha256:" + "ab" * 32
    job.add_files([FileSpec(URL, str(tmp_path / "a.bin"), (ByteRange(0, 10),), digest)])
    (only,) = replayed(store, job).files
    assert only.spec == FileSpec(URL, str(tmp_path / "a.bin"), (ByteRange(0, 10),), digest)


def test_a_batch_of_cancels_and_completes_deletes_each_jobs_temp_files_only(
    manager: TransferManager, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Jobs completed and cancelled in one batch share one listing of their directory: each
    still deletes all of its own temp files (its workers' too), and nobody else's. Their
    directory is fsynced once for the batch, after the renames and before the events."""
    dest = tmp_path / "shared"
    dest.mkdir()

    def running(name: str, files: int) -> TransferJob:
        job = manager.create_job(name)
        for i in range(files):
            job.add_file(f"https://example.com/{name}/{i}.bin", dest / f"{name}-{i}.bin")
        job.resume()
        engine(manager, job, cmd.StartTransfer(), cmd.Connect())
        return job

    def temps_of(job: TransferJob) -> list[Path]:
        made = []
        for i, f in enumerate(job.files()):
            for worker in (None, "host-7-abc"):  # this engine's, and another worker's
                temp = localfile.temp_path(job.id, i, f.local_name, worker)
                temp.write_bytes(b"partial")
                made.append(temp)
        return made

    done = [running(f"done{n}", 1) for n in range(3)]
    for job in done:
        localfile.temp_path(job.id, 0, job.files()[0].local_name).write_bytes(b"0123456789")
        engine(manager, job, cmd.FinishFile(0, 10), cmd.FinishJob())
    partial = [running(f"partial{n}", 2) for n in range(3)]
    kept = running("kept", 1)
    temps = {job.id: temps_of(job) for job in [*partial, kept]}
    synced: list[tuple[Path, str]] = []

    def last_stored(job: TransferJob) -> str:
        return type(list(manager.store.stream(job.id))[-1].event).__name__

    monkeypatch.setattr(
        localfile, "_fsync_dir", lambda d: synced.append((Path(d), last_stored(done[0])))
    )
    with manager.batch():
        for job in done:
            assert job.complete() == hresult.S_OK
        for job in partial:
            assert job.cancel() == hresult.S_OK
    for job in partial:
        assert job.state is JobState.CANCELLED
        assert not any(t.exists() for t in temps[job.id]), "a cancelled job left a temp file"
    assert all(t.exists() for t in temps[kept.id]), "another job's temp file was deleted"
    published = sorted(p.name for p in dest.iterdir() if not p.name.endswith(".bhtmp"))
    assert published == ["done0-0.bin", "done1-0.bin", "done2-0.bin"]
    assert all((dest / name).read_bytes() == b"0123456789" for name in published)
    assert synced == [(dest, "JobTransferred")]  # once, before JobCompleted was stored


def test_a_group_commit_looks_at_a_destination_directory_and_the_policy_once(
    manager: TransferManager, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Creating 1,000 jobs in one batch: one look at their common directory, one read of the
    store's secret query parameters; outside a batch, each AddFile looks again (the
    directory may have gone meanwhile)."""
    looks: list[object] = []
    real_access = os.access

    def access(path: object, mode: int) -> bool:
        looks.append(path)
        return real_access(path, mode)  # type: ignore[arg-type]

    settings_reads = []
    real_settings = manager.settings

    def settings() -> object:
        settings_reads.append(1)
        return real_settings()

    monkeypatch.setattr(localfile.os, "access", access)
    monkeypatch.setattr(manager, "settings", settings)
    with manager.batch():
        for i in range(3):
            job = manager.create_job(f"batched {i}")
            job.add_file(f"{URL}?part={i}", tmp_path / f"b{i}.bin")
    assert (len(looks), len(settings_reads)) == (1, 1)
    for i in range(2):
        job = manager.create_job(f"alone {i}")
        job.add_file(f"{URL}?part={i}", tmp_path / f"a{i}.bin")
    assert (len(looks), len(settings_reads)) == (3, 3)
    with manager.batch(), pytest.raises(BitsError) as refused:  # another directory: looked at
        manager.create_job("elsewhere").add_file(URL, tmp_path / "missing" / "y.bin")
    assert refused.value.hresult == hresult.E_INVALIDARG


def test_a_closed_manager_refuses_every_call_with_rpc_e_disconnected(tmp_path: Path) -> None:
    """After close (or the end of its ``with`` block) a manager and the job handles it
    gave out refuse with RPC_E_DISCONNECTED, as a released BITS interface does, instead of
    the database library's own error about a closed pool."""
    with TransferManager(home=tmp_path / "home") as manager:
        job = manager.create_job("kept")
        job.add_file("http://127.0.0.1:9/a.bin", tmp_path / "a.bin")
    calls: list[Callable[[], object]] = [
        lambda: job.state,
        lambda: job.files(),
        job.resume,
        job.cancel,
        lambda: manager.create_job("new"),
        lambda: manager.get_job(job.id),
        lambda: list(manager.jobs()),
        manager.refresh_views,
    ]
    for call in calls:
        with pytest.raises(BitsError) as refused:
            call()
        assert refused.value.hresult == hresult.RPC_E_DISCONNECTED
        assert "this TransferManager is closed" in str(refused.value)
    # A repr must not raise: a log line or a traceback that shows the handle would fail too.
    assert repr(job) == f"<TransferJob {job.id} (RPC_E_DISCONNECTED)>"
    with TransferManager(home=tmp_path / "home") as reopened:  # nothing was recorded
        assert reopened.get_job(job.id).state is JobState.SUSPENDED
        assert repr(reopened.get_job(job.id)) == f"<TransferJob {job.id} 'kept' SUSPENDED>"


# -- long local names ---------------------------------------------------------------------


def test_jobs_whose_ids_start_alike_have_their_own_temp_files(
    manager: TransferManager, tmp_path: Path
) -> None:
    """Temp names held 8 hex digits of the job's id: two jobs to one destination whose ids
    began alike shared a temp file, and one's Cancel deleted the other's bytes."""
    ids = ["12345678-aaaa-4aaa-8aaa-aaaaaaaaaaaa", "12345678-bbbb-4bbb-8bbb-bbbbbbbbbbbb"]
    dest = str(tmp_path / "f.bin")
    first, second = (localfile.temp_name(job_id, 0, dest) for job_id in ids)
    assert first != second
    Path(first).write_bytes(b"the first job's")
    job = manager.create_job("second")
    job.add_file(URL, dest)
    assert localfile.discard(attrs.evolve(job.snapshot(), id=ids[1])) == []
    assert Path(first).read_bytes() == b"the first job's"


@given(
    name=st.text(
        st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"),
        min_size=1,
        max_size=255,
    ).filter(lambda n: len(n.encode()) <= 255 and n not in (".", "..")),
    index=st.integers(0, 9_999_999),
    worker=st.none() | st.text(min_size=1, max_size=60),
)
@example(name="a" * 255, index=9_999_999, worker="w" * 60)
@example(name="é" * 127, index=0, worker=None)
def test_every_legal_file_name_gets_legal_temp_names_that_share_a_stem(
    name: str, index: int, worker: str | None
) -> None:
    """A name of up to NAME_MAX (255) bytes is legal, so its temp names (any worker's) and
    its generated reply name must be legal too; and every worker's temp of one file starts
    with the plain temp's stem, which is how Cancel finds them all."""
    job_id = str(uuid4())
    local = f"/d/{name}"
    plain = os.path.basename(localfile.temp_name(job_id, index, local))
    tagged = os.path.basename(localfile.temp_name(job_id, index, local, worker))
    assert len(plain.encode()) <= 255 and len(tagged.encode()) <= 255
    stem = plain.removesuffix(localfile.TEMP_SUFFIX) + "."
    assert tagged == plain or tagged.startswith(stem)
    assert localfile.temp_name(job_id, index, local, worker) == os.path.join("/d", tagged)
    if len(name.encode()) <= 182:
        tag = localfile.job_tag(job_id)
        assert plain == f".{name}.{tag}-{index}{localfile.TEMP_SUFFIX}"  # as before


def test_a_file_name_of_255_bytes_downloads_and_cancels_like_any_other(
    manager: TransferManager, tmp_path: Path
) -> None:
    """Its temp name is cut and hashed (255 bytes + ".<job16>-0.bhtmp" would not fit a
    directory entry); Complete publishes it under its own name, Cancel finds every worker's
    temp of it."""
    names = [tmp_path / ("a" * 251 + ".bin"), tmp_path / ("b" * 251 + ".bin")]
    job = manager.create_job("long names")
    for i, name in enumerate(names):
        job.add_file(f"https://example.com/files/{i}.bin", name)
    job.resume()
    engine(manager, job, cmd.StartTransfer(), cmd.Connect())
    temp = localfile.temp_path(job.id, 0, str(names[0]))
    temp.write_bytes(b"0123456789")
    engine(manager, job, cmd.FinishFile(0, 10))
    theirs = localfile.temp_path(job.id, 1, str(names[1]), "host-1234-abcdef")
    theirs.write_bytes(b"part")  # another worker's temp of the second file
    assert job.complete() == hresult.BG_S_PARTIAL_COMPLETE
    assert names[0].read_bytes() == b"0123456789"
    assert not theirs.exists() and not names[1].exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [names[0].name]


def test_a_name_longer_than_a_directory_entry_is_refused_at_addfile(
    manager: TransferManager, tmp_path: Path
) -> None:
    """256 bytes (here 128 two-byte characters) cannot be created on any file system here:
    AddFile refuses it with ERROR_FILENAME_EXCED_RANGE, instead of a transfer failing later
    with E_FAIL, and nothing is recorded."""
    job = manager.create_job("too long")
    for local in (tmp_path / ("é" * 128), tmp_path / ("x" * 256) / "f.bin"):
        with pytest.raises(BitsError) as refused:
            job.add_file(URL, local)
        assert refused.value.hresult == 0x800700CE
        assert "is 256 bytes; a directory entry holds at most 255" in str(refused.value)
    assert job.files() == []


# -- destinations that are not regular files ----------------------------------------------


def test_addfile_refuses_a_device_a_fifo_and_a_symbolic_link_as_a_destination(
    manager: TransferManager, tmp_path: Path
) -> None:
    """Complete renames the temp file over the destination, which would replace /dev/null
    with a regular file (as root) and /dev/stdout's link with one: refused at AddFile, and
    nothing is recorded. (Only AddFile is called on /dev/null here.)"""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    target = tmp_path / "target.bin"
    target.write_bytes(b"kept")
    link = tmp_path / "link.bin"
    link.symlink_to(target)
    job = manager.create_job("not files")
    for local, kind in (
        (Path("/dev/null"), "a character device"),
        (fifo, "a FIFO"),
        (link, f"a symbolic link (to {target})"),
    ):
        with pytest.raises(BitsError) as refused:
            job.add_file(URL, local)
        assert refused.value.hresult == hresult.E_INVALIDARG
        assert str(refused.value).startswith(f"{local} is {kind}, not a regular file")
    assert job.files() == []
    assert link.is_symlink() and target.read_bytes() == b"kept"


def test_complete_does_not_rename_over_a_fifo_made_at_the_name_since_addfile(
    manager: TransferManager, tmp_path: Path
) -> None:
    """The job stays TRANSFERRED with its temp file (BITS: a Complete that cannot rename
    fails and may be called again); once the name is free, Complete publishes."""
    job = transferred(manager, tmp_path)
    local = tmp_path / "file-0.bin"
    os.mkfifo(local)
    with pytest.raises(BitsError) as refused:
        job.complete()
    assert refused.value.hresult == hresult.hresult_from_win32(hresult.ERROR_ACCESS_DENIED)
    assert "it is a FIFO now, not a regular file" in str(refused.value)
    assert job.state is JobState.TRANSFERRED
    assert stat.S_ISFIFO(os.lstat(local).st_mode)
    local.unlink()
    assert job.complete() == hresult.S_OK
    assert local.read_bytes() == b"0123456789"


def test_a_download_or_reply_over_the_stores_own_files_is_refused(tmp_path: Path) -> None:
    """Complete would rename the download over the SQLite database (every job lost) or the
    secret key (every sealed secret lost); found with `get URL $BACKHAUL_HOME/backhaul.db`.
    Refused at AddFile and SetReplyFileName, through a link to the home too."""
    home = tmp_path / "home"
    with TransferManager(home=home) as manager:
        (tmp_path / "via").symlink_to(home)
        job = manager.create_job("over the store")
        own = ["backhaul.db", "backhaul.db-wal", "backhaul.db-shm", "secret.key"]
        for local in [home / name for name in own] + [tmp_path / "via" / "backhaul.db"]:
            with pytest.raises(BitsError) as refused:
                job.add_file(URL, local)
            assert refused.value.hresult == hresult.E_INVALIDARG
            assert "is a file of this store itself" in str(refused.value)
        job.add_file(URL, home / "backhaul.db.copy")  # a name beside them is fine
        reply = manager.create_job("reply", JobType.UPLOAD_REPLY)
        with pytest.raises(BitsError):
            reply.reply_file_name = str(home / "backhaul.db")
        assert [f.local_name for f in job.files()] == [str(home / "backhaul.db.copy")]
    with TransferManager(home=home) as reopened:
        assert reopened.get_job(job.id).display_name == "over the store"


def test_the_reply_file_name_is_refused_where_add_file_refuses_a_local_name(
    manager: TransferManager, tmp_path: Path
) -> None:
    """SetReplyFileName names a file Complete renames a temp file over, as a download's
    local name: the same refusals as AddFile, at the call, nothing recorded."""
    job = manager.create_job("reply", JobType.UPLOAD_REPLY)
    (tmp_path / "sub").mkdir()
    version = job.snapshot().version
    for name, why in (
        (tmp_path / "missing" / "reply", "does not exist"),
        (tmp_path / "sub", "is a directory"),
        (Path("/dev/null"), "not a regular file"),
        (f"{tmp_path}/sub/../reply", "without . or .."),
    ):
        with pytest.raises(BitsError) as refused_name:
            job.reply_file_name = str(name)
        assert refused_name.value.hresult == hresult.E_INVALIDARG
        assert why in str(refused_name.value)
    assert job.snapshot().version == version
    job.reply_file_name = str(tmp_path / "sub" / "reply")
    assert job.reply_file_name == str(tmp_path / "sub" / "reply")


def test_the_reply_file_name_is_fixed_once_the_reply_starts(
    manager: TransferManager, store: EventStore, tmp_path: Path
) -> None:
    """SetReplyFileName only before the reply download starts (§2.3): the reply's temp
    file is named after it, so a new name in TRANSFERRED lost a reply already there."""
    job = manager.create_job("reply", JobType.UPLOAD_REPLY)
    upload = tmp_path / "up.bin"
    upload.write_bytes(b"x")
    job.add_file(URL, upload)
    job.reply_file_name = str(tmp_path / "a.reply")
    job.resume()
    manager.execute(job.id, cmd.StartTransfer())
    manager.execute(job.id, cmd.Connect())
    job.reply_file_name = str(tmp_path / "b.reply")  # the upload runs, the reply has not begun
    manager.execute(job.id, cmd.ProgressReply(6, 0))
    for state in ("TRANSFERRING", "SUSPENDED"):
        assert job.state.name == state
        refused(
            store,
            hresult.BG_E_INVALID_STATE,
            lambda: setattr(job, "reply_file_name", str(tmp_path / "c.reply")),
        )
        job.suspend()
    assert job.reply_file_name == str(tmp_path / "b.reply")


def test_a_call_that_lost_a_race_reads_only_the_events_after_its_copy(tmp_path: Path) -> None:
    """Another writer appends between this manager's read and its append (an engine
    checkpointing a busy job): the call is decided again on its copy plus the newer events.
    Before, it dropped its copy and decoded the whole job again from the read model, which
    for a job of 5,000 files took long enough to lose the next race too ('kept changing')."""
    home = tmp_path / "home"
    a = TransferManager(home=home)
    b = TransferManager(home=home)
    job = a.create_job("raced")
    job.add_files([(f"https://example.com/{i}.bin", tmp_path / f"{i}.bin") for i in range(50)])
    job.description = "loaded"  # a's copy is current
    append = a.store.append
    raced: list[int] = []
    full_reads: list[str] = []

    def append_after_another_writer(job_id: str, after: int, events: Any) -> Any:
        if not raced:
            raced.append(after)
            b.get_job(job_id).display_name = "renamed by b"  # lands first
        return append(job_id, after, events)

    get, stream = a.store.views.get, a.store.stream
    a.store.append = append_after_another_writer  # type: ignore[method-assign]
    a.store.views.get = lambda job_id: full_reads.append("row") or get(job_id)  # type: ignore[method-assign]
    a.store.stream = lambda job_id, after_version=0: (
        (  # type: ignore[method-assign]
            full_reads.append("stream") if not after_version else None
        )
        or stream(job_id, after_version)
    )

    job.description = "after the race"

    assert raced and full_reads == []
    with TransferManager(home=home) as fresh:
        again = fresh.get_job(job.id)
        assert (again.display_name, again.description) == ("renamed by b", "after the race")
    a.close()
    b.close()


def test_threads_sharing_a_manager_lose_no_call_and_no_job(tmp_path: Path) -> None:
    """An application's threads share one manager (an EngineThread's callbacks complete
    jobs while the main thread adds more). Before, one thread's group commit (AddFile is
    one) swallowed another thread's calls: a raw ConcurrentAppend ('no version 1 to append
    after') escaped, and a job that create_job had returned was never recorded."""
    home = tmp_path / "home"
    manager = TransferManager(home=home, limits=UNLIMITED)
    made: dict[str, JobState] = {}
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for i in range(60):
                job = manager.create_job(f"t{k}-{i}")
                job.add_file(f"https://example.com/{k}/{i}.bin", tmp_path / f"{k}-{i}.bin")
                job.resume()
                job.description = f"thread {k}"
                if i % 3 == 0:
                    job.cancel()
                made[job.id] = JobState.CANCELLED if i % 3 == 0 else JobState.QUEUED
                if i % 5 == 0:
                    list(manager.jobs())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    manager.close()
    with TransferManager(home=home, limits=UNLIMITED) as fresh:
        assert len(made) == 240
        for job_id, state in made.items():
            job = fresh.get_job(job_id, include_final=True)
            assert job.state is state
            assert job.description.startswith("thread ")
        listed = {j.id for j in fresh.jobs(include_final=True)}
        assert listed == set(made)


def _transferred_jobs(home: Path, tmp_path: Path, count: int) -> list[str]:
    """``count`` one-file jobs the engine reported transferred, their temp files whole;
    the read model refreshed."""
    ids = []
    with TransferManager(home=home, limits=UNLIMITED) as m:
        for i in range(count):
            job = m.create_job(f"done {i}")
            local = tmp_path / f"done-{i}.bin"
            job.add_file(f"https://example.com/{i}.bin", local)
            job.resume()
            localfile.temp_path(job.id, 0, str(local)).write_bytes(b"x" * (i + 1))
            for command in (cmd.StartTransfer(), cmd.Connect(), cmd.FinishFile(0, i + 1)):
                m.execute(job.id, command)
            m.execute(job.id, cmd.FinishJob())
            ids.append(job.id)
        m.refresh_views()
    return ids


def test_a_batch_after_a_current_read_model_reads_no_stream(tmp_path: Path) -> None:
    """Completing many jobs right after an engine kept the read model current: each job
    is its row, with no query of its stream (one per job before: about a quarter of the
    time of Complete for 2,000 jobs)."""
    home = tmp_path / "home"
    ids = _transferred_jobs(home, tmp_path, 5)
    with TransferManager(home=home, limits=UNLIMITED) as m:
        m.refresh_views()  # nothing to fold: the rows are current already
        reads: list[str] = []
        stream = m.store.stream
        m.store.stream = lambda job_id, after_version=0: (  # type: ignore[method-assign]
            reads.append(job_id) or stream(job_id, after_version)
        )
        with m.batch():
            for job_id in ids:
                assert m.get_job(job_id).complete() == hresult.S_OK
        assert reads == []
        assert [m.get_job(i, include_final=True).state for i in ids] == [JobState.ACKNOWLEDGED] * 5
    assert [(tmp_path / f"done-{i}.bin").read_bytes() for i in range(5)] == [
        b"x" * (i + 1) for i in range(5)
    ]


def test_a_batch_reads_the_stream_of_a_job_whose_row_is_behind(tmp_path: Path) -> None:
    """Another process appended after the rows were saved: the batch reads the job's newer
    events and decides on them (here: its description, then Complete)."""
    home = tmp_path / "home"
    (job_id,) = _transferred_jobs(home, tmp_path, 1)
    with TransferManager(home=home) as other:  # appends, and saves no row
        other.get_job(job_id).description = "changed elsewhere"
    with TransferManager(home=home) as m:
        with m.batch():
            job = m.get_job(job_id)
            assert job.description == "changed elsewhere"
            assert job.complete() == hresult.S_OK
        assert m.get_job(job_id, include_final=True).description == "changed elsewhere"


def test_a_long_lived_manager_drops_its_copies_of_final_jobs(tmp_path: Path) -> None:
    """An application's manager open for months kept a copy of every job it ever read or
    changed (about 2 KB each, final ones too). Past CACHE_TRIM_AT copies, those of final
    jobs go; the jobs are still read, from the store."""
    from backhaul.adapters.manager import CACHE_TRIM_AT

    with TransferManager(home=tmp_path / "home", limits=UNLIMITED) as manager:
        ids = []
        for i in range(CACHE_TRIM_AT + 200):
            job = manager.create_job(f"job {i}")
            job.add_file(URL, tmp_path / f"f{i}")
            job.cancel()
            ids.append(job.id)
        live = manager.create_job("live")
        assert len(manager._cache) <= CACHE_TRIM_AT
        assert live.id in manager._cache
        states = {j.id: j.state for j in manager.jobs(include_final=True)}
        assert [states[i] for i in ids] == [JobState.CANCELLED] * len(ids)


def test_a_listing_reads_each_job_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`list --all --include-final` read each job four times (its snapshot, then progress,
    times and error, each a read of the store): 1.4 s for 3,000 jobs."""
    from backhaul.adapters.cli import job_info

    with TransferManager(home=tmp_path / "home") as manager:
        job = manager.create_job("listed")
        job.add_file(URL, tmp_path / "f")
        reads: list[str] = []
        stream = manager.store.stream

        def counted(job_id: str, *args: Any) -> Any:
            reads.append(job_id)
            return stream(job_id, *args)

        monkeypatch.setattr(manager.store, "stream", counted)
        info = job_info(job)
        assert info["files_total"] == 1 and info["state"] == "SUSPENDED"
        assert reads == [job.id]
