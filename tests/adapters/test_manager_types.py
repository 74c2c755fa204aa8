"""Arguments of the wrong type to the Python API (TransferManager / TransferJob).

README: every refused call raises BitsError carrying the BITS HRESULT, and nothing is
recorded. Before, a wrong type escaped as TypeError, ValueError or IndexError (``int(None)``,
``"?" in None``, ``f[1]`` of a 1-tuple), or was silently made another value (``int(2.9)`` is 2,
``int("3")`` is 3, ``float("600")`` is 600) before the core could refuse it; a string given
for a collection was taken letter by letter; a batch that lost a race raised the store's raw
ConcurrentAppend. The rule: integers (IntEnum and IntFlag members too) are accepted, a bool
is not an integer here, timers take an int, a float or a timedelta.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from backhaul.adapters.manager import BatchConflict, TransferJob, TransferManager
from backhaul.adapters.store import ConcurrentAppend
from backhaul.core import hresult
from backhaul.core.error import BitsError
from backhaul.core.value import ByteRange, FileSpec
from backhaul.core.vocabulary import (
    AuthScheme,
    AuthTarget,
    FilePropertyId,
    JobPriority,
    NotifyFlags,
    ProxyUsage,
)

URL = "https://example.com/files/data.bin"


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[TransferManager]:
    with TransferManager(home=tmp_path / "home") as m:
        yield m


@pytest.fixture
def job(manager: TransferManager, tmp_path: Path) -> TransferJob:
    """A download job with one file (index 0)."""
    job = manager.create_job("types")
    job.add_file(URL, tmp_path / "data.bin")
    return job


def refused(
    job: TransferJob, call: Callable[[], Any], words: str, code: int = hresult.E_INVALIDARG
) -> BitsError:
    """``call`` raises BitsError(``code``) whose message says ``words``; the job's version
    and the log are unchanged."""
    version, head = job.snapshot().version, job._manager.store.head()
    with pytest.raises(BitsError) as info:
        call()
    assert info.value.hresult == code, info.value
    assert words in info.value.message, info.value.message
    assert job.snapshot().version == version, "a refused call changed the job"
    assert job._manager.store.head() == head, "a refused call appended events"
    return info.value


def assign(job: TransferJob, name: str, value: Any) -> Callable[[], None]:
    return lambda: setattr(job, name, value)


# -- A, B: integers -----------------------------------------------------------------------

BAD_INTEGERS = [None, "abc", "3", 2.9, 1.5, 1.0]


@pytest.mark.parametrize("value", BAD_INTEGERS)
@pytest.mark.parametrize("name", ["notify_flags", "security_flags", "acl_flags"])
def test_flags_that_are_no_integer_are_e_invalidarg_not_converted(
    job: TransferJob, name: str, value: Any
) -> None:
    """int(None) raised TypeError and int('abc') ValueError; int(2.9) recorded 2, '3' 3."""
    refused(job, assign(job, name, value), "must be an integer bit mask")


@pytest.mark.parametrize("name", ["security_flags", "acl_flags"])
def test_a_bool_is_no_bit_mask_but_flag_members_are(job: TransferJob, name: str) -> None:
    """int(True) recorded 1 (notify_flags already refused a bool)."""
    refused(job, assign(job, name, True), "must be an integer bit mask")
    job.notify_flags = NotifyFlags.JOB_TRANSFERRED | NotifyFlags.JOB_ERROR
    assert job.notify_flags == 3 and type(job.notify_flags) is int
    job.security_flags = 0x100
    job.acl_flags = 1
    assert (job.security_flags, job.acl_flags) == (0x100, 1)


@pytest.mark.parametrize("value", [None, "abc", "600", True])
@pytest.mark.parametrize(
    ("name", "what"),
    [
        ("minimum_retry_delay", "the minimum retry delay"),
        ("no_progress_timeout", "the no-progress timeout"),
        ("maximum_download_time", "the maximum download time"),
    ],
)
def test_timers_take_seconds_or_a_timedelta_only(
    job: TransferJob, name: str, what: str, value: Any
) -> None:
    """float('600') recorded 600 s, float(True) 1 s; None and 'abc' raised."""
    refused(job, assign(job, name, value), f"{what} must be a number of seconds or a timedelta")
    job.minimum_retry_delay = 600
    job.no_progress_timeout = 2.5  # a part of a second counts as one
    job.maximum_download_time = timedelta(minutes=2)
    assert job.minimum_retry_delay == timedelta(seconds=600)
    assert job.no_progress_timeout == timedelta(seconds=3)
    assert job.maximum_download_time == timedelta(seconds=120)


@pytest.mark.parametrize("value", [1.5, 1e6, True])
def test_a_max_rate_is_an_integer_or_a_rate_string(job: TransferJob, value: Any) -> None:
    """1.5 went through str() into parse_rate and became 1 B/s; 1e6 became '1000000.0'.
    parse_rate takes an int of bytes per second or a string such as '1.5k'."""
    refused(job, assign(job, "max_rate", value), "the maximum rate")
    job.max_rate = "1.5k"
    assert job.max_rate == 1500
    job.max_rate = 2048
    assert job.max_rate == 2048


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ((None,), "the proxy usage must be an integer"),
        ((1.9,), "the proxy usage must be an integer"),  # was NO_PROXY
        (("1",), "the proxy usage must be an integer"),
        ((ProxyUsage.OVERRIDE, 5), "the proxy list must be a string"),
        ((ProxyUsage.OVERRIDE, "proxy:8080", 5), "the bypass list must be a string"),
    ],
)
def test_proxy_settings_of_the_wrong_type(job: TransferJob, args: Any, words: str) -> None:
    refused(job, lambda: job.set_proxy_settings(*args), words)
    job.set_proxy_settings(ProxyUsage.OVERRIDE, "proxy:8080", "<local>")
    assert job.proxy_settings.proxy_list == "proxy:8080"


# -- A, B, C: credentials and certificates --------------------------------------------------


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ((None, AuthScheme.BASIC, "u", "p"), "the target must be an integer"),
        ((1.7, 1.2, "u", "p"), "the target must be an integer"),  # was SERVER / BASIC
        ((AuthTarget.SERVER, "1", "u", "p"), "the authentication scheme must be an integer"),
        ((AuthTarget.SERVER, AuthScheme.BASIC, 5, "p"), "the user name must be a string"),
        ((AuthTarget.SERVER, AuthScheme.BASIC, "u\x00", "p"), "without NUL"),
        ((AuthTarget.SERVER, AuthScheme.BASIC, "\ud800", "p"), "valid Unicode"),
        ((AuthTarget.SERVER, AuthScheme.BASIC, "u", "\ud800"), "the password must be valid"),
    ],
)
def test_credentials_of_the_wrong_type(job: TransferJob, args: Any, words: str) -> None:
    """A user name with NUL was recorded, where every other text setter refuses NUL."""
    error = refused(job, lambda: job.set_credentials(*args), words)
    assert "\ud800" not in error.message and "'p'" not in error.message
    assert job.credentials == []
    job.set_credentials(AuthTarget.SERVER, AuthScheme.BASIC, "user", "secret")
    job.set_credentials(2, 3, None, None)  # PROXY, NTLM: plain integers are fine
    assert job.credentials == [
        (AuthTarget.SERVER, AuthScheme.BASIC, "user"),
        (AuthTarget.PROXY, AuthScheme.NTLM, None),
    ]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("x", AuthScheme.BASIC), "the target must be an integer"),
        ((AuthTarget.SERVER, 1.0), "the authentication scheme must be an integer"),
    ],
)
def test_remove_credentials_of_the_wrong_type(job: TransferJob, args: Any, words: str) -> None:
    job.set_credentials(AuthTarget.SERVER, AuthScheme.BASIC, "user", "secret")
    refused(job, lambda: job.remove_credentials(*args), words)
    assert len(job.credentials) == 1
    assert job.remove_credentials(AuthTarget.SERVER, 1)


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda j: j.set_client_certificate_by_id("x", "MY", "a" * 40), "the store location"),
        (lambda j: j.set_client_certificate_by_id(0.0, "MY", "a" * 40), "the store location"),
        (lambda j: j.set_client_certificate_by_id(0, "MY", 5), "the SHA-1 hash must be bytes"),
        (lambda j: j.set_client_certificate_by_name("x", "MY", "CN=a"), "the store location"),
    ],
)
def test_client_certificates_of_the_wrong_type(
    job: TransferJob, call: Callable[[TransferJob], None], words: str
) -> None:
    refused(job, lambda: call(job), words)
    assert job.client_certificate is None


# -- A, B: files ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda j, d: j.add_file(None, d / "b"), "a remote name must be a string"),
        (lambda j, d: j.add_file(5, d / "b"), "a remote name must be a string"),
        (lambda j, d: j.add_file(URL + "2", None), "a local name must be a string or a Path"),
        (lambda j, d: j.add_file(URL + "2", d / "b", ranges=[None]), "a range is a ByteRange"),
        (lambda j, d: j.add_file(URL + "2", d / "b", ranges=[(0, 1, 2)]), "a range is a"),
        (lambda j, d: j.add_file(URL + "2", d / "b", ranges=5), "the ranges must be a list"),
        (lambda j, d: j.add_file(URL + "2", d / "b", expected_digest=5), "an expected digest"),
        (lambda j, d: j.add_files([(URL + "2",)]), "a (remote name, local name) pair"),
        (lambda j, d: j.add_files([None]), "a (remote name, local name) pair"),
        (lambda j, d: j.add_files(URL), "the files must be a list"),  # was its letters
        (lambda j, d: j.add_files(None), "the files must be a list"),
        (lambda j, d: j.add_files([FileSpec(None, str(d / "b"))]), "a remote name"),
    ],
)
def test_files_of_the_wrong_type(
    job: TransferJob, tmp_path: Path, call: Callable[[TransferJob, Path], None], words: str
) -> None:
    refused(job, lambda: call(job, tmp_path), words)
    assert len(job.files()) == 1
    add_files_of_the_right_types(job, tmp_path)


@pytest.mark.parametrize("bad", [(1.5, 10), (0, 2.5), ("5", 10)])
def test_range_numbers_are_not_converted(job: TransferJob, tmp_path: Path, bad: Any) -> None:
    """int(1.5) made offset 1 and int('5') offset 5: the core refuses what is no integer."""
    refused(
        job,
        lambda: job.add_file(URL + "2", tmp_path / "b", ranges=[bad]),
        "invalid range offset" if bad[1] == 10 else "a range length must be positive",
        hresult.BG_E_INVALID_RANGE,
    )


def add_files_of_the_right_types(job: TransferJob, tmp_path: Path) -> None:
    job.add_file(URL + "2", str(tmp_path / "b"), ranges=[ByteRange(0, 10), [20, 5]])
    job.add_files([FileSpec(URL + "3", str(tmp_path / "c")), [URL + "4", tmp_path / "d"]])
    job.add_files(f for f in [(URL + "5", tmp_path / "e")])  # any iterable of pairs
    assert [f.local_name for f in job.files()][1:] == [
        str(tmp_path / n) for n in ("b", "c", "d", "e")
    ]
    assert job.file(1).ranges == (ByteRange(0, 10), ByteRange(20, 5))


INDEX_CALLS: dict[str, Callable[[TransferJob, Any], Any]] = {
    "file": lambda j, i: j.file(i),
    "get_file_property": lambda j, i: j.get_file_property(i, FilePropertyId.HTTP_RESPONSE_HEADERS),
    "set_remote_name": lambda j, i: j.set_remote_name(i, URL + "?v=2"),
    "set_validation_state": lambda j, i: j.set_validation_state(i, True),
    "update_download_position": lambda j, i: j.update_download_position(i, 0),
    "filled_file_ranges": lambda j, i: j.filled_file_ranges(i),
    "validation_state": lambda j, i: j.validation_state(i),
    "request_file_ranges": lambda j, i: j.request_file_ranges(i, [(0, 10)]),
}


@pytest.mark.parametrize("index", ["0", None, 1.0, 0.0, True, False])
@pytest.mark.parametrize("method", sorted(INDEX_CALLS))
def test_a_file_index_must_be_an_integer(job: TransferJob, method: str, index: Any) -> None:
    """'0' and None raised TypeError; 1.0 and True were BG_E_FILE_NOT_FOUND, and 0.0 and
    False were file 0."""
    refused(job, lambda: INDEX_CALLS[method](job, index), "a file index must be an integer")


def test_set_validation_state_takes_true_or_false(job: TransferJob) -> None:
    """bool('no') made a file valid."""
    refused(job, lambda: job.set_validation_state(0, "no"), "valid must be True or False")
    refused(job, lambda: job.set_validation_state(0, 1), "valid must be True or False")


def test_a_download_position_must_be_an_integer(job: TransferJob) -> None:
    refused(job, lambda: job.update_download_position(0, 1.5), "the download position")
    refused(job, lambda: job.update_download_position(0, "7"), "the download position")


def test_remote_names_and_prefixes_must_be_strings(job: TransferJob) -> None:
    """set_remote_name(0, None) raised TypeError, and a prefix of 5 did once a file
    matched the old one."""
    refused(job, lambda: job.set_remote_name(0, None), "the remote name must be a string")
    refused(
        job,
        lambda: job.replace_remote_prefix("https://example.com/", 5),
        "the new prefix must be a string",
    )
    refused(job, lambda: job.replace_remote_prefix(5, "https://other/"), "the old prefix")
    assert job.file(0).remote_name == URL
    assert job.replace_remote_prefix("https://example.com/", "https://mirror.example.com/")
    assert job.file(0).remote_name == "https://mirror.example.com/files/data.bin"


# -- the manager ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("x",), "an HRESULT must be an integer"),
        ((None,), "an HRESULT must be an integer"),
        ((True,), "an HRESULT must be an integer"),
        ((2**40,), "not a 32-bit HRESULT"),
        ((hresult.E_FAIL, "en"), "a language id must be an integer"),
    ],
)
def test_get_error_description_of_what_is_no_hresult(args: Any, words: str) -> None:
    """'x' raised TypeError and 2**40 ValueError; True described S_FALSE. Every 32-bit code
    still gets its description, an unregistered one too (the docstring's promise)."""
    with pytest.raises(BitsError) as info:
        TransferManager.get_error_description(*args)
    assert info.value.hresult == hresult.E_INVALIDARG
    assert words in info.value.message
    describe = TransferManager.get_error_description
    assert describe(0x12345678) == "unregistered success code 0x12345678"
    assert describe(-1) == "unregistered failure code 0xFFFFFFFF"  # the signed spelling
    assert describe(hresult.BG_E_NOT_FOUND) == hresult.describe(hresult.BG_E_NOT_FOUND)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"store": 5}, "the store must be a URL, an open EventStore or None"),
        ({"store": Path("/tmp/x.db")}, "the store must be a URL"),
        ({"store": "/tmp/x\x00.db"}, "the store URL must be valid Unicode without NUL"),
        ({"home": "HOME/x\x00"}, "the home must be valid Unicode without NUL"),
        ({"home": 5}, "the home must be a string or a Path"),
        ({"home": ""}, "the home must not be empty"),
        ({"home": "HOME", "owner": 5}, "the owner must be a string"),
        ({"home": "HOME", "owner": "a\x00b"}, "the owner must be valid Unicode without NUL"),
        ({"home": "HOME", "schemes": "http"}, "the schemes must be a list"),  # was h, t, p
        ({"home": "HOME", "schemes": [5]}, "a scheme must be a string"),
    ],
)
def test_a_manager_of_the_wrong_arguments_is_refused_and_makes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kwargs: dict[str, Any], words: str
) -> None:
    monkeypatch.chdir(tmp_path)
    home = tmp_path / "home"
    if isinstance(kwargs.get("home"), str):
        kwargs["home"] = kwargs["home"].replace("HOME", str(home))
    with pytest.raises(BitsError) as info:
        TransferManager(**kwargs)
    assert info.value.hresult == hresult.E_INVALIDARG
    assert words in info.value.message
    assert not home.exists()
    assert os.listdir(tmp_path) == []  # home="" put the store in the current directory


def test_a_relative_home_is_taken_from_the_current_directory_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command's --home may be relative (adapters/cli.py `_home`): it is made absolute
    as the manager opens, so that the store and ``home`` (certificates, discards) stay one
    directory whatever the process's current directory is later."""
    monkeypatch.chdir(tmp_path)
    with TransferManager(home="rel/home") as m:
        assert m.home == tmp_path / "rel" / "home"
        assert Path(m.store.location).is_absolute()
        assert Path(m.store.location).parent == m.home


def test_set_secret_parameters_refuses_one_string(manager: TransferManager) -> None:
    """set_secret_parameters('abc') declared 'a', 'b' and 'c'."""
    head = manager.store.head()
    for names in ("abc", None, 5):
        with pytest.raises(BitsError) as info:
            manager.set_secret_parameters(names)  # type: ignore[arg-type]
        assert info.value.hresult == hresult.E_INVALIDARG
        assert "the secret parameter names must be a list" in info.value.message
    assert manager.store.head() == head
    assert manager.settings().secret_parameters == ()
    manager.set_secret_parameters(["token"])
    assert list(manager.settings().secret_parameters) == ["token"]


def test_create_job_refuses_a_job_type_that_is_no_integer(manager: TransferManager) -> None:
    """JobType(0.0) was DOWNLOAD."""
    head = manager.store.head()
    with pytest.raises(BitsError) as info:
        manager.create_job("typed", 0.0)  # type: ignore[arg-type]
    assert info.value.hresult == hresult.E_INVALIDARG
    assert "the job type must be an integer" in info.value.message
    assert manager.store.head() == head


def test_a_priority_must_be_an_integer(job: TransferJob) -> None:
    """JobPriority(1.0) was HIGH."""
    refused(job, assign(job, "priority", 1.0), "the priority must be an integer")
    job.priority = 1
    assert job.priority is JobPriority.HIGH


def test_a_bandwidth_policy_of_the_wrong_type(manager: TransferManager) -> None:
    """None raised AttributeError."""
    head = manager.store.head()
    with pytest.raises(BitsError) as info:
        manager.set_bandwidth_policy(None)  # type: ignore[arg-type]
    assert info.value.hresult == hresult.E_INVALIDARG
    assert "the policy must be a BandwidthPolicy" in info.value.message
    assert manager.store.head() == head


# -- E: a batch that lost its race -----------------------------------------------------------


def test_a_batch_that_lost_a_race_raises_bits_error_and_records_nothing(
    tmp_path: Path,
) -> None:
    """The commit raised the store's raw ConcurrentAppend, without an HRESULT. It is a
    BitsError (E_FAIL, as a single call that keeps losing its race), and still a
    ConcurrentAppend for whoever caught that; nothing of the batch is recorded."""
    home = tmp_path / "home"
    with TransferManager(home=home) as a, TransferManager(home=home) as b:
        first = a.create_job("first")
        second = a.create_job("second")
        version = second.snapshot().version

        def raced() -> None:
            with a.batch():
                first.priority = JobPriority.HIGH
                b.get_job(first.id).description = "another writer, meanwhile"
                second.description = "batched"

        with pytest.raises(BitsError) as info:
            raced()
        error = info.value
        assert isinstance(error, BatchConflict) and isinstance(error, ConcurrentAppend)
        assert error.hresult == hresult.E_FAIL
        assert "nothing of the batch was recorded" in error.message
        assert b.get_job(first.id).priority is JobPriority.NORMAL
        assert b.get_job(first.id).description == "another writer, meanwhile"
        assert b.get_job(second.id).snapshot().version == version
        assert a.get_job(second.id).description == ""
        with a.batch():  # the manager goes on: the next batch reads the jobs again
            first.priority = JobPriority.HIGH
        assert b.get_job(first.id).priority is JobPriority.HIGH


def test_a_single_add_file_that_lost_a_race_is_decided_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AddFile commits as a batch (the files and an smb:// URL's credentials, or neither):
    another writer landing first raised ConcurrentAppend out of a single call, where every
    other single call is decided again (``execute``)."""
    home = tmp_path / "home"
    with TransferManager(home=home) as a, TransferManager(home=home) as b:
        job = a.create_job("raced")
        job.description = "a's copy is current"
        append_many = a.store.append_many
        raced: list[bool] = []

        def another_writer_first(batches: Any) -> Any:
            if not raced:
                raced.append(True)
                b.get_job(job.id).display_name = "renamed by b"  # lands first
            return append_many(batches)

        monkeypatch.setattr(a.store, "append_many", another_writer_first)
        job.add_file(URL, tmp_path / "data.bin")
        assert raced
        assert [f.remote_name for f in job.files()] == [URL]
        assert job.display_name == "renamed by b"
