"""BITS behaviour of the core, pinned by expectations written out by hand.

Every expected value here (a state, an HRESULT, a time, a count) is spelled out in the test
from BITS's rules (bits-core.md, section named in each docstring) or from the project's own
specs where BITS leaves a case open; none is read back from the core's tables (TABLE,
TRANSIENT). A wrong cell in one of those tables therefore fails here even where the
table-driven tests agree with it. Jobs are driven through the real ``decide`` and ``fold``,
each command at a known number of seconds after T0.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from backhaul.core import event as ev
from backhaul.core import hresult
from backhaul.core.command import (
    AddFiles,
    Block,
    Checkpoint,
    Command,
    Complete,
    Connect,
    EndSlice,
    ExceedMaxDownloadTime,
    Fail,
    FillRanges,
    FinishFile,
    FinishJob,
    ProgressReply,
    RequestFileRanges,
    Resume,
    Retry,
    SetSetting,
    SetValidationState,
    StartTransfer,
    Suspend,
    UpdateDownloadPosition,
    decide,
)
from backhaul.core.error import BitsError
from backhaul.core.failure import is_transient
from backhaul.core.job import Job, fold
from backhaul.core.limit import DEFAULT_LIMITS
from backhaul.core.policy import (
    Timer,
    max_download_deadline,
    next_timer,
    no_progress_deadline,
    retry_due_at,
    why_waiting,
)
from backhaul.core.projection import (
    FileProgress,
    JobProgress,
    ReplyProgress,
    file_progress,
    job_error,
    job_progress,
    reply_progress,
)
from backhaul.core.value import ByteRange, FileSpec, JobError
from backhaul.core.vocabulary import ErrorContext, JobState, JobType

S = JobState
T0 = datetime(2025, 6, 2, 8, 0, tzinfo=UTC)
A = FileSpec("https://example.com/files/a.bin", "/srv/downloads/a.bin")
B = FileSpec("https://example.com/files/b.bin", "/srv/downloads/b.bin")
A_SIZE = 1000
B_SIZE = 3000
CONNECT_FAILURE = JobError(ErrorContext.GENERAL_TRANSPORT, hresult.BG_E_CONNECT_FAILURE)

# The HRESULTs the tests expect, as BITS defines them (bitsmsg.h, winerror.h).
E_INVALIDARG = 0x80070057
BG_S_PARTIAL_COMPLETE = 0x00200017
BG_E_INVALID_RANGE = 0x8020002B
BG_E_VALIDATION_FAILED = 0x80200053
BG_E_MAXDOWNLOAD_TIMEOUT = 0x80200054

# Retry settings of the timer tests: small, so that the times below read easily.
RETRY_DELAY = 60
NO_PROGRESS_TIMEOUT = 3600


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


class Story:
    """One job, driven by commands through ``decide`` and ``fold``; each must be accepted."""

    def __init__(self, job_type: JobType = JobType.DOWNLOAD) -> None:
        self.events: list[ev.Event] = [
            ev.JobCreated(T0, "job-1", job_type, "independent oracles", "S-1-5-21-1000")
        ]
        job = fold(self.events)
        assert job is not None
        self.job = job

    def do(self, second: float, *commands: Command) -> Job:
        for command in commands:
            new = decide(self.job, command, at(second), DEFAULT_LIMITS)
            self.events += new
            job = fold(new, self.job)
            assert job is not None
            self.job = job
        assert fold(self.events) == self.job  # replay gives the same job
        return self.job

    def refusal(self, second: float, command: Command) -> int:
        """The HRESULT ``command`` is refused with; the job is left as it was."""
        before = self.job
        with pytest.raises(BitsError) as refused:
            decide(self.job, command, at(second), DEFAULT_LIMITS)
        assert self.job == before
        return refused.value.hresult


def transferring(*files: FileSpec, job_type: JobType = JobType.DOWNLOAD) -> Story:
    """A job with ``files`` (A by default) transferring since second 2, with the retry
    settings above (set before the first Resume)."""
    story = Story(job_type)
    story.do(
        0,
        AddFiles(files or (A,)),
        SetSetting("minimum_retry_delay", RETRY_DELAY),
        SetSetting("no_progress_timeout", NO_PROGRESS_TIMEOUT),
        Resume(),
    )
    story.do(1, StartTransfer())
    story.do(2, Connect())
    assert story.job.state is S.TRANSFERRING
    return story


def transferred() -> Story:
    story = transferring()
    story.do(5, FinishFile(0, A_SIZE), FinishJob())
    assert story.job.state is S.TRANSFERRED
    return story


# -- the state machine: TRANSFERRED (bits-core.md §2.2, §21 item 4) -------------------------


def test_suspend_leaves_a_transferred_job_transferred() -> None:
    """Nothing runs in TRANSFERRED, so Suspend has nothing to stop: the job still says its
    files are ready for Complete."""
    story = transferred()
    assert story.do(10, Suspend()).state is S.TRANSFERRED
    assert story.do(11, Complete()).state is S.ACKNOWLEDGED


def test_resume_leaves_a_transferred_job_transferred() -> None:
    story = transferred()
    assert story.do(10, Resume()).state is S.TRANSFERRED


def test_adding_a_file_to_a_transferred_job_suspends_it_until_resume_queues_it() -> None:
    """Life-cycle page: files may be added to a TRANSFERRED job, then Resume. With a file
    pending the job is no longer transferred; it waits, suspended, for that Resume."""
    story = transferred()
    assert story.do(10, AddFiles((B,))).state is S.SUSPENDED
    assert story.job.pending_files == (1,)
    assert story.do(11, Resume()).state is S.QUEUED


# -- transient or fatal (bits-core.md §6.4 and §2.2; specs/failures.md) ----------------------


@pytest.mark.parametrize(
    ("code", "transient"),
    [
        # HTTP: BG_E_HTTP_ERROR_<status> = 0x80190000 + status. 3xx transient but 300-305 and
        # 307; 4xx fatal but 408 and 409 (and 429, a rate limit); 5xx transient but 501, 505.
        pytest.param(0x8019012C, False, id="http-300"),
        pytest.param(0x80190131, False, id="http-305"),
        pytest.param(0x80190132, True, id="http-306"),
        pytest.param(0x80190133, False, id="http-307"),
        pytest.param(0x80190134, True, id="http-308"),
        pytest.param(0x80190190, False, id="http-400"),
        pytest.param(0x80190191, False, id="http-401"),
        pytest.param(0x80190193, False, id="http-403"),
        pytest.param(0x80190194, False, id="http-404"),
        pytest.param(0x80190197, False, id="http-407"),
        pytest.param(0x80190198, True, id="http-408"),
        pytest.param(0x80190199, True, id="http-409"),
        pytest.param(0x801901AD, True, id="http-429"),
        pytest.param(0x801901F4, True, id="http-500"),
        pytest.param(0x801901F5, False, id="http-501"),
        pytest.param(0x801901F7, True, id="http-503"),
        pytest.param(0x801901F9, False, id="http-505"),
        # Local disk: a full disk and a file another process holds are waited out.
        pytest.param(0x80070070, True, id="ERROR_DISK_FULL"),
        pytest.param(0x80070020, True, id="ERROR_SHARING_VIOLATION"),
        # "Access denied" is BITS's canonical fatal error, under either of its names.
        pytest.param(0x80070005, False, id="E_ACCESSDENIED"),
        pytest.param(0x80070002, False, id="ERROR_FILE_NOT_FOUND"),
        # A revoked certificate, or a revocation check that fails: ERROR.
        pytest.param(0x80072F8A, False, id="ERROR_WINHTTP_SECURE_CERT_REVOKED"),
        pytest.param(0x80072F19, False, id="ERROR_WINHTTP_SECURE_CERT_REV_FAILED"),
        # "Server unavailable" is the canonical transient one.
        pytest.param(0x8020002D, True, id="BG_E_CONNECT_FAILURE"),
        pytest.param(0x80200054, False, id="BG_E_MAXDOWNLOAD_TIMEOUT"),
        pytest.param(0x80200053, False, id="BG_E_VALIDATION_FAILED"),
        # Codes BITS does not know are retried.
        pytest.param(0x80041234, True, id="unlisted"),
        pytest.param(0x8020FFF0, True, id="unlisted-bits-facility"),
    ],
)
def test_a_failure_is_transient_or_fatal_as_bits_classifies_it(code: int, transient: bool) -> None:
    assert is_transient(code) is transient


def test_access_denied_has_one_code_and_it_is_fatal() -> None:
    """E_ACCESSDENIED and HRESULT_FROM_WIN32(ERROR_ACCESS_DENIED) are the same 0x80070005."""
    assert hresult.E_ACCESSDENIED == 0x80070005
    assert hresult.hresult_from_win32(hresult.ERROR_ACCESS_DENIED) == 0x80070005
    assert is_transient(hresult.E_ACCESSDENIED) is False


def test_the_named_failure_codes_have_their_bits_values() -> None:
    assert hresult.hresult_from_win32(hresult.ERROR_DISK_FULL) == 0x80070070
    assert hresult.hresult_from_win32(hresult.ERROR_SHARING_VIOLATION) == 0x80070020
    assert hresult.hresult_from_win32(hresult.ERROR_WINHTTP_SECURE_CERT_REVOKED) == 0x80072F8A
    assert hresult.http_status_hresult(307) == 0x80190133


# -- MaximumDownloadTime (bits-core.md §5) -----------------------------------------------------


def test_maximum_download_time_counts_only_connecting_and_transferring_time() -> None:
    """Counted: CONNECTING 10-20 and TRANSFERRING 20-40 (30 s), then TRANSFERRING again
    1000-1020 (20 s). Not counted: QUEUED 40-1000, TRANSIENT_ERROR 1020-1100."""
    story = Story()
    story.do(0, AddFiles((A,)), SetSetting("maximum_download_time", 100), Resume())
    story.do(10, StartTransfer())
    assert max_download_deadline(story.job, at(10)) == at(110)
    story.do(20, Connect())
    queued = story.do(40, EndSlice())
    assert queued.state is S.QUEUED
    assert queued.elapsed_active(at(900)) == timedelta(seconds=30)
    assert max_download_deadline(queued, at(900)) is None
    assert next_timer(queued, at(900)) is None

    running = story.do(1000, StartTransfer(), Connect())
    assert running.elapsed_active(at(1010)) == timedelta(seconds=40)
    assert max_download_deadline(running, at(1010)) == at(1070)  # 100 - 40 s left
    assert next_timer(running, at(1010)) == (Timer.MAX_DOWNLOAD_TIME, at(1070))

    failed = story.do(1020, Fail(CONNECT_FAILURE, transient=True))
    assert failed.state is S.TRANSIENT_ERROR
    assert failed.elapsed_active(at(1090)) == timedelta(seconds=50)
    assert max_download_deadline(failed, at(1090)) is None

    again = story.do(1100, Retry(), StartTransfer())
    assert max_download_deadline(again, at(1100)) == at(1150)  # 100 - 50 s left


def test_resume_after_suspend_starts_the_maximum_download_time_afresh() -> None:
    """ "Resume resets the elapsed-time counter"; a Resume of a job that runs changes nothing."""
    story = Story()
    story.do(0, AddFiles((A,)), SetSetting("maximum_download_time", 100), Resume())
    story.do(10, StartTransfer(), Connect())
    story.do(40, Resume())  # already active: still counting from 10
    assert story.job.elapsed_active(at(50)) == timedelta(seconds=40)
    story.do(50, Suspend())
    assert story.job.elapsed_active(at(500)) == timedelta(seconds=40)
    assert max_download_deadline(story.job, at(500)) is None
    story.do(500, Resume())
    assert story.job.elapsed_active(at(500)) == timedelta(0)
    story.do(600, StartTransfer())
    assert max_download_deadline(story.job, at(600)) == at(700)


def test_exceeding_maximum_download_time_is_a_counted_fatal_error() -> None:
    story = transferring()
    before = story.job.error_count
    job = story.do(100, ExceedMaxDownloadTime())
    assert job.state is S.ERROR
    assert job.error is not None
    assert job.error.hresult == BG_E_MAXDOWNLOAD_TIMEOUT
    assert job.error_count == before + 1
    error = job_error(job)
    assert error is not None
    assert error.hresult == BG_E_MAXDOWNLOAD_TIMEOUT
    # In ERROR the clock stands still: 1 s CONNECTING + 98 s TRANSFERRING.
    assert job.elapsed_active(at(5000)) == timedelta(seconds=99)


# -- NoProgressTimeout (bits-core.md §5: from the first transient error; progress resets it) -


def test_resume_starts_a_fresh_no_progress_timeout() -> None:
    story = transferring()
    story.do(10, Fail(CONNECT_FAILURE, transient=True))
    assert no_progress_deadline(story.job) == at(10 + NO_PROGRESS_TIMEOUT)
    story.do(20, Resume())
    assert story.job.state is S.QUEUED
    assert story.job.no_progress_since is None
    story.do(21, StartTransfer(), Connect())
    story.do(30, Fail(CONNECT_FAILURE, transient=True))
    assert no_progress_deadline(story.job) == at(30 + NO_PROGRESS_TIMEOUT)


def test_a_checkpoint_without_new_bytes_is_no_progress() -> None:
    story = transferring()
    story.do(5, Checkpoint(0, 400, A_SIZE))
    story.do(10, Fail(CONNECT_FAILURE, transient=True))
    story.do(70, Retry(), StartTransfer(), Connect())
    story.do(75, Checkpoint(0, 400, A_SIZE))  # the same 400 bytes again
    assert story.job.no_progress_since == at(10)
    story.do(80, Fail(CONNECT_FAILURE, transient=True))
    assert no_progress_deadline(story.job) == at(10 + NO_PROGRESS_TIMEOUT)
    # One new byte is progress: the next error starts the timeout again.
    story.do(140, Retry(), StartTransfer(), Connect())
    story.do(145, Checkpoint(0, 401, A_SIZE))
    assert story.job.no_progress_since is None
    story.do(150, Fail(CONNECT_FAILURE, transient=True))
    assert no_progress_deadline(story.job) == at(150 + NO_PROGRESS_TIMEOUT)


def test_a_finished_file_is_progress() -> None:
    story = transferring(A, B)
    story.do(10, Fail(CONNECT_FAILURE, transient=True))
    story.do(70, Retry(), StartTransfer(), Connect())
    story.do(75, FinishFile(0, A_SIZE))
    assert story.job.no_progress_since is None
    story.do(80, Fail(CONNECT_FAILURE, transient=True))
    assert no_progress_deadline(story.job) == at(80 + NO_PROGRESS_TIMEOUT)


# -- error count, blocked jobs, partial Complete (bits-core.md §5, §7.2, §7.4) ---------------


def test_rejecting_a_transferred_file_is_a_counted_error_and_the_file_starts_over() -> None:
    story = transferred()
    before = story.job.error_count
    job = story.do(10, SetValidationState(0, valid=False))
    assert job.state is S.ERROR
    assert job.error is not None
    assert job.error.hresult == BG_E_VALIDATION_FAILED
    assert job.error_count == before + 1
    assert file_progress(job, 0) == FileProgress(None, 0, False)
    assert job.pending_files == (0,)


def test_a_failure_after_a_blocked_wait_is_retried_on_the_timer() -> None:
    """A job held back by a policy waits for the condition, without a retry timer; once it
    runs again, an ordinary transient failure is retried after MinimumRetryDelay."""
    story = transferring()
    story.do(5, Block(hresult.BG_E_BLOCKED_BY_POLICY))
    assert story.job.state is S.TRANSIENT_ERROR
    assert retry_due_at(story.job) is None
    story.do(8, Resume(), StartTransfer(), Connect())
    job = story.do(10, Fail(CONNECT_FAILURE, transient=True))
    assert job.state is S.TRANSIENT_ERROR
    assert job.blocked_by is None
    assert retry_due_at(job) == at(10 + RETRY_DELAY)
    assert next_timer(job, at(10)) == (Timer.RETRY, at(10 + RETRY_DELAY))
    assert why_waiting(job, at(10)) == ("retry after MinimumRetryDelay", at(10 + RETRY_DELAY))


@pytest.mark.parametrize("leave", ["suspend", "resume"])
def test_a_job_held_back_is_no_longer_held_once_suspended_or_resumed(leave: str) -> None:
    """Held back by a condition means waiting in TRANSIENT_ERROR. Suspended, or resumed
    (QUEUED: the engine asks the policy again), the job waits for it no more; `info --json`
    showed the old reason on a SUSPENDED or QUEUED job."""
    story = transferring()
    story.do(5, Block(hresult.BG_E_BLOCKED_BY_POLICY))
    assert story.job.blocked_by == hresult.BG_E_BLOCKED_BY_POLICY
    job = story.do(8, Suspend() if leave == "suspend" else Resume())
    assert job.state is (S.SUSPENDED if leave == "suspend" else S.QUEUED)
    assert job.blocked_by is None


def test_partial_complete_marks_only_the_files_it_kept_completed() -> None:
    """Complete keeps the files wholly transferred; the others are not available."""
    story = transferring(A, B)
    story.do(5, FinishFile(0, A_SIZE), Checkpoint(1, 200, B_SIZE))
    job = story.do(10, Complete())
    assert job.state is S.ACKNOWLEDGED
    assert job.result == BG_S_PARTIAL_COMPLETE
    assert file_progress(job, 0).completed is True
    assert file_progress(job, 1).completed is False


def test_a_transferred_file_complete_did_not_rename_is_not_completed() -> None:
    story = transferring(A, B)
    story.do(5, FinishFile(0, A_SIZE))
    job = story.do(10, Complete(files_kept=()))
    assert job.result == BG_S_PARTIAL_COMPLETE
    assert file_progress(job, 0).completed is False


# -- projections (bits-core.md §8, §3) ---------------------------------------------------------


def test_job_progress_counts_transferred_files_and_sums_known_sizes() -> None:
    story = transferring(A, B)
    assert job_progress(story.job) == JobProgress(None, 0, 2, 0)
    story.do(5, FinishFile(0, A_SIZE))
    assert job_progress(story.job) == JobProgress(None, A_SIZE, 2, 1)  # B's size unknown
    story.do(6, Checkpoint(1, 200, B_SIZE))
    assert job_progress(story.job) == JobProgress(A_SIZE + B_SIZE, A_SIZE + 200, 2, 1)
    story.do(7, FinishFile(1, B_SIZE))
    assert job_progress(story.job) == JobProgress(A_SIZE + B_SIZE, A_SIZE + B_SIZE, 2, 2)


def test_a_downloaded_file_is_completed_only_once_complete_renames_it() -> None:
    story = transferred()
    assert file_progress(story.job, 0) == FileProgress(A_SIZE, A_SIZE, False)
    story.do(10, Complete())
    assert file_progress(story.job, 0) == FileProgress(A_SIZE, A_SIZE, True)


def test_an_uploaded_file_is_completed_once_the_upload_finished() -> None:
    story = transferring(job_type=JobType.UPLOAD)
    assert file_progress(story.job, 0).completed is False
    story.do(5, FinishFile(0, A_SIZE))
    assert file_progress(story.job, 0) == FileProgress(A_SIZE, A_SIZE, True)


@pytest.mark.parametrize("job_type", [JobType.DOWNLOAD, JobType.UPLOAD], ids=lambda t: t.name)
def test_reply_progress_is_zero_for_a_job_without_a_reply(job_type: JobType) -> None:
    story = transferring(job_type=job_type)
    assert reply_progress(story.job) == ReplyProgress(0, 0)


def test_reply_progress_is_unknown_until_the_reply_starts() -> None:
    story = transferring(job_type=JobType.UPLOAD_REPLY)
    assert reply_progress(story.job) == ReplyProgress(None, 0)
    story.do(5, ProgressReply(500, 120))
    assert reply_progress(story.job) == ReplyProgress(500, 120)


# -- retry timers (bits-core.md §5; README: a Retry-After only lengthens the wait) -------------


def test_a_retry_after_shorter_than_the_retry_delay_does_not_shorten_it() -> None:
    story = transferring()
    job = story.do(10, Fail(CONNECT_FAILURE, transient=True, retry_after=5))
    assert retry_due_at(job) == at(10 + RETRY_DELAY)
    assert why_waiting(job, at(10)) == ("retry after MinimumRetryDelay", at(10 + RETRY_DELAY))


def test_a_retry_after_longer_than_the_retry_delay_lengthens_it() -> None:
    story = transferring()
    job = story.do(10, Fail(CONNECT_FAILURE, transient=True, retry_after=300))
    assert retry_due_at(job) == at(310)
    assert why_waiting(job, at(10)) == ("the server asked to retry later (Retry-After)", at(310))


def test_a_retry_due_at_the_no_progress_deadline_gives_up_instead() -> None:
    """The first error at 10 starts the timeout (deadline 3610). A second error at 3550 is
    due for a retry at 3610 too: the timeout has run out by then, so the job gives up."""
    story = transferring()
    story.do(10, Fail(CONNECT_FAILURE, transient=True))
    story.do(70, Retry(), StartTransfer(), Connect())
    job = story.do(3550, Fail(CONNECT_FAILURE, transient=True))
    deadline = at(10 + NO_PROGRESS_TIMEOUT)
    assert retry_due_at(job) == deadline
    assert no_progress_deadline(job) == deadline
    assert next_timer(job, at(3550)) == (Timer.NO_PROGRESS, deadline)
    assert why_waiting(job, at(3550)) == (
        "no progress: gives up at the NoProgressTimeout",
        deadline,
    )


def test_a_retry_due_a_second_before_the_no_progress_deadline_is_tried() -> None:
    story = transferring()
    story.do(10, Fail(CONNECT_FAILURE, transient=True))
    story.do(70, Retry(), StartTransfer(), Connect())
    job = story.do(3549, Fail(CONNECT_FAILURE, transient=True))
    assert next_timer(job, at(3549)) == (Timer.RETRY, at(3609))
    assert why_waiting(job, at(3549)) == ("retry after MinimumRetryDelay", at(3609))


# -- refused calls (the HRESULTs core/command.py documents) -----------------------------------


def test_complete_refuses_to_keep_a_file_that_is_not_transferred() -> None:
    story = transferring(A, B)
    story.do(5, FinishFile(0, A_SIZE))
    assert story.refusal(10, Complete(files_kept=(0, 1))) == E_INVALIDARG
    assert story.refusal(10, Complete(files_kept=(1,))) == E_INVALIDARG
    assert story.do(10, Complete(files_kept=(0,))).state is S.ACKNOWLEDGED


def on_demand_file_of_known_size() -> Story:
    """An on-demand download whose file is known to hold A_SIZE bytes."""
    story = Story()
    story.do(0, AddFiles((A,)), SetSetting("on_demand", True), Resume())
    story.do(1, StartTransfer(), Connect())
    story.do(2, FillRanges(0, (ByteRange(0, 100),), A_SIZE))
    assert story.job.files[0].bytes_total == A_SIZE
    return story


def test_a_requested_range_must_start_and_end_inside_the_file() -> None:
    """RequestFileRanges: BG_E_INVALID_RANGE for a range outside the file (bits-core.md §7.5).
    The file's bytes are 0 to A_SIZE - 1."""
    story = on_demand_file_of_known_size()
    outside = [
        ByteRange(A_SIZE, 1),  # starts one past the last byte
        ByteRange(A_SIZE),  # from one past the last byte to the end: nothing
        ByteRange(900, 101),  # ends one past the file
    ]
    for r in outside:
        assert story.refusal(5, RequestFileRanges(0, (r,))) == BG_E_INVALID_RANGE, r
    story.do(5, RequestFileRanges(0, (ByteRange(A_SIZE - 1, 1), ByteRange(900, 100))))
    assert story.job.files[0].requested == (ByteRange(900, 100),)
    story.do(6, RequestFileRanges(0, (ByteRange(A_SIZE - 1),)))  # the last byte, to the end


def test_the_download_position_must_lie_inside_the_file() -> None:
    story = on_demand_file_of_known_size()
    assert story.refusal(5, UpdateDownloadPosition(0, A_SIZE)) == BG_E_INVALID_RANGE
    assert story.refusal(5, UpdateDownloadPosition(0, -1)) == BG_E_INVALID_RANGE
    assert story.do(5, UpdateDownloadPosition(0, A_SIZE - 1)).files[0].position == A_SIZE - 1
