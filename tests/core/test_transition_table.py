"""Every (state x trigger) pair, through the real ``decide`` and ``fold``, against TABLE.

Each job is reached by legal commands from creation (no hand-built Job objects), so the
test also proves every state is reachable. For each pair the command that carries the
trigger is decided: where TABLE has a cell whose guard holds, the events fold to exactly
the cell's target; everywhere else ``decide`` refuses with the table's HRESULT
(BG_E_INVALID_STATE, or the rule's refusal such as BG_E_EMPTY) and appends nothing.
Reference: bits-core.md §2.2 (transition table), §2.3 (legality), §5 (retry rules).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

import attrs
import pytest

from backhaul.core import event as ev
from backhaul.core import hresult
from backhaul.core.command import (
    AddFiles,
    Block,
    Cancel,
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
    FinishRanges,
    LoseNetwork,
    RestoreNetwork,
    Resume,
    Retry,
    Scavenge,
    SetSetting,
    SetValidationState,
    StartTransfer,
    Suspend,
    TimeOutNoProgress,
    Unblock,
    decide,
)
from backhaul.core.error import BitsError
from backhaul.core.job import Job, fold
from backhaul.core.limit import DEFAULT_LIMITS
from backhaul.core.policy import next_timer, no_progress_deadline
from backhaul.core.transition import FINAL_STATES, NON_FINAL_STATES, TABLE, Guard, Trigger
from backhaul.core.value import ByteRange, FileSpec, JobError
from backhaul.core.vocabulary import ErrorContext, JobState, JobType

S = JobState
T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
FILE_SIZE = 1024
FIRST_FILE = FileSpec("https://example.com/files/a.bin", "/srv/downloads/a.bin")
SECOND_FILE = FileSpec("https://example.com/files/b.bin", "/srv/downloads/b.bin")
TRANSIENT = JobError(ErrorContext.GENERAL_TRANSPORT, hresult.BG_E_CONNECT_FAILURE)
FATAL = JobError(ErrorContext.REMOTE_FILE, hresult.E_ACCESSDENIED)


# -- reaching each state by legal commands -------------------------------------------------


def at(step: int) -> datetime:
    """The time of the ``step``-th event: one second apart, always UTC, never the clock."""
    return T0 + timedelta(seconds=step)


def created(job_type: JobType = JobType.DOWNLOAD) -> list[ev.Event]:
    return [ev.JobCreated(T0, "job-1", job_type, "transition table test", "S-1-5-21-1000")]


def run(commands: Sequence[Command], job_type: JobType = JobType.DOWNLOAD) -> Job:
    """Fold creation, then decide and fold each command in turn (each must be accepted)."""
    events = created(job_type)
    job = fold(events)
    assert job is not None
    for command in commands:
        new = decide(job, command, at(len(events)), DEFAULT_LIMITS)
        events += new
        folded = fold(new, job)
        assert folded is not None
        job = folded
    assert fold(events) == job  # replay from scratch gives the same job
    return job


_ADD: tuple[Command, ...] = (AddFiles((FIRST_FILE,)),)
_QUEUED = (*_ADD, Resume())
_CONNECTING = (*_QUEUED, StartTransfer())
_TRANSFERRING = (*_CONNECTING, Connect())
_FINISHED = (
    *_TRANSFERRING,
    Checkpoint(0, FILE_SIZE // 2, FILE_SIZE),
    FinishFile(0, FILE_SIZE),
)
_TRANSFERRED = (*_FINISHED, FinishJob())

# The shortest realistic history for each state: the file is still pending.
PATHS: dict[JobState, tuple[Command, ...]] = {
    S.SUSPENDED: _ADD,
    S.QUEUED: _QUEUED,
    S.CONNECTING: _CONNECTING,
    S.TRANSFERRING: _TRANSFERRING,
    S.TRANSIENT_ERROR: (*_TRANSFERRING, Fail(TRANSIENT, transient=True)),
    S.ERROR: (*_TRANSFERRING, Fail(FATAL, transient=False)),
    S.TRANSFERRED: _TRANSFERRED,
    S.ACKNOWLEDGED: (*_TRANSFERRED, Complete()),
    S.CANCELLED: (*_QUEUED, Cancel()),
}

# The same states with every file already transferred (needed by ALL_FILES_DONE, which
# the engine only reports once nothing is pending).
_FINISHED_QUEUED = (*_FINISHED, EndSlice())
PATHS_FILES_DONE: dict[JobState, tuple[Command, ...]] = {
    S.SUSPENDED: (*_FINISHED, Suspend()),
    S.QUEUED: _FINISHED_QUEUED,
    S.CONNECTING: (*_FINISHED_QUEUED, StartTransfer()),
    S.TRANSFERRING: _FINISHED,
    S.TRANSIENT_ERROR: (*_FINISHED, Fail(TRANSIENT, transient=True)),
    S.ERROR: (*_FINISHED, Fail(FATAL, transient=False)),
    S.TRANSFERRED: _TRANSFERRED,
    S.ACKNOWLEDGED: (*_TRANSFERRED, Complete()),
    S.CANCELLED: (*_FINISHED, Cancel()),
}


def reach(
    state: JobState, *, job_type: JobType = JobType.DOWNLOAD, files_done: bool = False
) -> Job:
    job = run((PATHS_FILES_DONE if files_done else PATHS)[state], job_type)
    assert job.state is state
    if files_done:
        assert not job.pending_files
    return job


# -- the command that carries each trigger -------------------------------------------------

COMMANDS: dict[Trigger, Callable[[], Command]] = {
    Trigger.RESUME: Resume,
    Trigger.SUSPEND: Suspend,
    Trigger.CANCEL: Cancel,
    Trigger.COMPLETE: Complete,
    Trigger.ADD_FILE: lambda: AddFiles((SECOND_FILE,)),
    Trigger.VALIDATION_FAILED: lambda: SetValidationState(0, valid=False),
    Trigger.SCHEDULED: StartTransfer,
    Trigger.CONNECTED: Connect,
    Trigger.DATA_RECEIVED: lambda: Checkpoint(0, FILE_SIZE // 4, FILE_SIZE),
    Trigger.SLICE_ENDED: EndSlice,
    Trigger.ALL_FILES_DONE: FinishJob,
    Trigger.TRANSIENT_FAILURE: lambda: Fail(TRANSIENT, transient=True),
    Trigger.FATAL_FAILURE: lambda: Fail(FATAL, transient=False),
    Trigger.RETRY_DUE: Retry,
    Trigger.NO_PROGRESS_TIMEOUT: TimeOutNoProgress,
    Trigger.MAX_DOWNLOAD_TIME_EXCEEDED: ExceedMaxDownloadTime,
    Trigger.NETWORK_LOST: LoseNetwork,
    Trigger.NETWORK_RESTORED: RestoreNetwork,
    Trigger.BLOCKED: lambda: Block(hresult.BG_E_BLOCKED_BY_POLICY),
    Trigger.UNBLOCKED: Unblock,
    Trigger.INACTIVITY_TIMEOUT: Scavenge,
    Trigger.RANGES_DONE: FinishRanges,
}

# ALL_FILES_DONE comes only once nothing is pending; a file is rejected once it is in.
FILES_DONE = (Trigger.ALL_FILES_DONE, Trigger.VALIDATION_FAILED)

ALL_PAIRS = [(state, trigger) for state in JobState for trigger in Trigger]


def pair_id(pair: tuple[JobState, Trigger]) -> str:
    state, trigger = pair
    return f"{state.name}-{trigger.value}"


def expect_table_outcome(job: Job, trigger: Trigger, command: Command) -> None:
    """decide + fold agree with TABLE for ``command`` (which carries ``trigger``)."""
    rule = TABLE[job.state].get(trigger)
    target = None if rule is None else rule.target(job.facts())
    if target is None:
        code = hresult.BG_E_INVALID_STATE if rule is None else rule.refusal
        before = job
        with pytest.raises(BitsError) as refused:
            decide(job, command, at(job.version), DEFAULT_LIMITS)
        assert hresult.name_of(refused.value.hresult) == hresult.name_of(code)
        assert job == before
        return
    events = decide(job, command, at(job.version), DEFAULT_LIMITS)
    assert [e.trigger_of() for e in events] == [trigger]
    after = fold(events, job)
    assert after is not None
    assert after.state is target
    assert after.version == job.version + len(events)


# -- the exhaustive test -------------------------------------------------------------------


def test_every_trigger_is_carried_by_a_command() -> None:
    assert set(COMMANDS) == set(Trigger)


def test_the_table_has_a_row_for_every_state_and_nothing_else() -> None:
    assert set(TABLE) == set(JobState)


@pytest.mark.parametrize("state", list(JobState), ids=lambda s: s.name)
def test_every_state_is_reachable_from_creation_by_legal_commands(state: JobState) -> None:
    assert reach(state).state is state
    assert reach(state, files_done=True).state is state


@pytest.mark.parametrize("pair", ALL_PAIRS, ids=pair_id)
def test_decide_and_fold_follow_the_table_for_every_state_and_trigger(
    pair: tuple[JobState, Trigger],
) -> None:
    state, trigger = pair
    job = reach(state, files_done=trigger in FILES_DONE)
    expect_table_outcome(job, trigger, COMMANDS[trigger]())


@pytest.mark.parametrize("state", list(JobState), ids=lambda s: s.name)
def test_a_finished_file_is_data_received_like_a_checkpoint(state: JobState) -> None:
    job = reach(state)
    expect_table_outcome(job, Trigger.DATA_RECEIVED, FinishFile(0, FILE_SIZE))


@pytest.mark.parametrize("state", list(JobState), ids=lambda s: s.name)
def test_ranges_filled_on_demand_are_data_received_like_a_checkpoint(state: JobState) -> None:
    job = reach(state)
    expect_table_outcome(job, Trigger.DATA_RECEIVED, FillRanges(0, (ByteRange(0, 10),), FILE_SIZE))


def test_a_download_job_with_files_satisfies_every_first_guard() -> None:
    """So the exhaustive test above really takes every cell's first choice (but the
    on-demand one, which the next test covers)."""
    for state in NON_FINAL_STATES:
        facts = reach(state).facts()
        for trigger, rule in TABLE[state].items():
            if rule.choices[0][0] is Guard.ON_DEMAND:
                continue
            assert rule.target(facts) is rule.choices[0][1], (state, trigger)


def test_ranges_done_suspends_only_on_demand_jobs() -> None:
    job = reach(JobState.TRANSFERRING)
    with pytest.raises(BitsError) as refused:
        decide(job, FinishRanges(), T0, DEFAULT_LIMITS)
    assert refused.value.hresult == hresult.BG_E_INVALID_STATE
    on_demand = attrs.evolve(job, on_demand=True)
    after = fold(decide(on_demand, FinishRanges(), T0, DEFAULT_LIMITS), on_demand)
    assert after is not None
    assert after.state is JobState.SUSPENDED


# -- final states ----------------------------------------------------------------------------


def test_the_final_states_are_acknowledged_and_cancelled() -> None:
    assert frozenset({S.ACKNOWLEDGED, S.CANCELLED}) == FINAL_STATES
    assert FINAL_STATES.isdisjoint(NON_FINAL_STATES)
    assert set(JobState) == FINAL_STATES | NON_FINAL_STATES


@pytest.mark.parametrize(
    "pair", [(s, t) for s in sorted(FINAL_STATES) for t in Trigger], ids=pair_id
)
def test_a_final_state_refuses_every_trigger_with_invalid_state(
    pair: tuple[JobState, Trigger],
) -> None:
    state, trigger = pair
    for files_done in (False, True):
        job = reach(state, files_done=files_done)
        with pytest.raises(BitsError) as refused:
            decide(job, COMMANDS[trigger](), at(job.version), DEFAULT_LIMITS)
        assert refused.value.hresult == hresult.BG_E_INVALID_STATE


@pytest.mark.parametrize("state", sorted(NON_FINAL_STATES), ids=lambda s: s.name)
def test_cancel_reaches_cancelled_from_every_non_final_state(state: JobState) -> None:
    job = reach(state)
    after = fold(decide(job, Cancel(), at(job.version), DEFAULT_LIMITS), job)
    assert after is not None
    assert after.state is S.CANCELLED


# -- guards: job type, files, retries ----------------------------------------------------------


@pytest.mark.parametrize("job_type", list(JobType), ids=lambda t: t.name)
@pytest.mark.parametrize("state", sorted(NON_FINAL_STATES), ids=lambda s: s.name)
def test_complete_acknowledges_a_download_anywhere_but_an_upload_only_when_transferred(
    job_type: JobType, state: JobState
) -> None:
    job = reach(state, job_type=job_type)
    if job_type is JobType.DOWNLOAD or state is S.TRANSFERRED:
        after = fold(decide(job, Complete(), at(job.version), DEFAULT_LIMITS), job)
        assert after is not None
        assert after.state is S.ACKNOWLEDGED
    else:
        with pytest.raises(BitsError) as refused:
            decide(job, Complete(), at(job.version), DEFAULT_LIMITS)
        assert refused.value.hresult == hresult.BG_E_INVALID_STATE


@pytest.mark.parametrize("job_type", list(JobType), ids=lambda t: t.name)
def test_every_job_type_follows_the_table_for_every_state_and_trigger(job_type: JobType) -> None:
    for state, trigger in ALL_PAIRS:
        job = reach(state, job_type=job_type, files_done=trigger in FILES_DONE)
        command = COMMANDS[trigger]()
        # Per-call rules checked after "not final": one file per upload job (§2.3), and
        # validation of download files only (§3).
        per_call = {Trigger.ADD_FILE: "BG_E_TOO_MANY_FILES", Trigger.VALIDATION_FAILED: "E_NOTIMPL"}
        if trigger in per_call and job_type is not JobType.DOWNLOAD:
            with pytest.raises(BitsError) as refused:
                decide(job, command, at(job.version), DEFAULT_LIMITS)
            expected = "BG_E_INVALID_STATE" if job.is_final else per_call[trigger]
            assert hresult.name_of(refused.value.hresult) == expected
            continue
        expect_table_outcome(job, trigger, command)


def test_resume_of_a_suspended_job_without_files_is_refused_with_bg_e_empty() -> None:
    job = run(())
    assert job.state is S.SUSPENDED
    assert not job.files
    with pytest.raises(BitsError) as refused:
        decide(job, Resume(), at(job.version), DEFAULT_LIMITS)
    assert refused.value.hresult == hresult.BG_E_EMPTY
    assert job.state is S.SUSPENDED


def test_resume_of_a_suspended_job_with_a_file_queues_it() -> None:
    job = reach(S.SUSPENDED)
    after = fold(decide(job, Resume(), at(job.version), DEFAULT_LIMITS), job)
    assert after is not None
    assert after.state is S.QUEUED


@pytest.mark.parametrize("state", [S.CONNECTING, S.TRANSFERRING], ids=lambda s: s.name)
def test_a_transient_failure_is_retried_by_default(state: JobState) -> None:
    job = reach(state)
    after = fold(decide(job, Fail(TRANSIENT, transient=True), at(job.version), DEFAULT_LIMITS), job)
    assert after is not None
    assert after.state is S.TRANSIENT_ERROR
    assert after.error == TRANSIENT
    assert after.error_count == job.error_count + 1


def test_a_failure_with_response_headers_keeps_them_as_its_files_last_response() -> None:
    job = reach(S.TRANSFERRING)
    block = "HTTP/1.1 404 Not Found\r\nServer: x\r\n\r\n"
    failed = Fail(attrs.evolve(FATAL, file_index=0), transient=False, response_headers=block)
    after = fold(decide(job, failed, at(job.version), DEFAULT_LIMITS), job)
    assert after is not None and after.state is S.ERROR
    assert after.files[0].response_headers == block
    # Without headers the file keeps what it had; headers need a file of the job.
    plain = fold(decide(job, Fail(FATAL, transient=False), at(job.version), DEFAULT_LIMITS), job)
    assert plain is not None and plain.files[0].response_headers is None
    for error, code in (
        (FATAL, hresult.E_INVALIDARG),
        (attrs.evolve(FATAL, file_index=9), hresult.BG_E_FILE_NOT_FOUND),
    ):
        with pytest.raises(BitsError) as refused:
            decide(job, Fail(error, False, response_headers=block), at(job.version), DEFAULT_LIMITS)
        assert refused.value.hresult == code


@pytest.mark.parametrize("state", [S.CONNECTING, S.TRANSFERRING], ids=lambda s: s.name)
def test_no_progress_timeout_zero_makes_a_transient_failure_land_in_error(
    state: JobState,
) -> None:
    path = PATHS[state]
    job = run((*path[:1], SetSetting("no_progress_timeout", 0), *path[1:]))
    assert job.state is state
    assert job.no_progress_timeout == 0
    events = decide(job, Fail(TRANSIENT, transient=True), at(job.version), DEFAULT_LIMITS)
    after = fold(events, job)
    assert after is not None
    assert after.state is S.ERROR
    assert after.error == TRANSIENT
    assert after.error_count == job.error_count + 1
    assert after.no_progress_since is None  # no retry, so no no-progress clock


@pytest.mark.parametrize(
    ("hold", "release"),
    [(Block(hresult.BG_E_BLOCKED_BY_POLICY), Unblock()), (LoseNetwork(), RestoreNetwork())],
    ids=["policy", "network"],
)
def test_no_progress_timeout_waits_with_a_held_back_job_and_restarts_when_the_condition_ends(
    hold: Command, release: Command
) -> None:
    """bits-core.md §20: condition-waiting has no timers. A job whose NoProgressTimeout runs,
    held back as its retry queued it, has no deadline while held; the condition's end
    restarts the clock from then (not from the first transient error, long gone)."""
    job = run((*PATHS[S.TRANSIENT_ERROR], Retry(), hold))
    assert job.state is S.TRANSIENT_ERROR
    assert job.blocked_by is not None
    assert job.no_progress_since is not None  # it ran before the condition came
    later = job.modified_at + timedelta(seconds=job.no_progress_timeout + 1)
    assert no_progress_deadline(job) is None
    assert next_timer(job, later) is None
    after = fold(decide(job, release, later, DEFAULT_LIMITS), job)
    assert after is not None
    assert after.state is S.QUEUED
    assert after.no_progress_since == later


@pytest.mark.parametrize("state", [S.CONNECTING, S.TRANSFERRING], ids=lambda s: s.name)
def test_a_custom_http_method_makes_a_transient_failure_land_in_error(state: JobState) -> None:
    path = PATHS[state]
    job = run((*path[:1], SetSetting("http_method", "PUT"), *path[1:]))
    assert job.state is state
    assert job.uses_custom_method
    after = fold(decide(job, Fail(TRANSIENT, transient=True), at(job.version), DEFAULT_LIMITS), job)
    assert after is not None
    assert after.state is S.ERROR


@pytest.mark.parametrize(
    "state", sorted((NON_FINAL_STATES | {S.CANCELLED}) - {S.TRANSFERRED}), ids=lambda s: s.name
)
def test_finish_job_with_a_pending_file_is_refused_in_every_state(state: JobState) -> None:
    """Even where ALL_FILES_DONE is a cell (CONNECTING, TRANSFERRING): a file is pending."""
    job = reach(state)
    assert job.pending_files
    with pytest.raises(BitsError) as refused:
        decide(job, FinishJob(), at(job.version), DEFAULT_LIMITS)
    assert refused.value.hresult == hresult.BG_E_INVALID_STATE


@pytest.mark.parametrize(
    "again", ["/srv/downloads/a.bin", "/srv//downloads/a.bin", "/srv/downloads//a.bin"]
)
def test_the_core_refuses_one_destination_named_twice_in_a_download_job(again: str) -> None:
    """Decided in the core itself, whatever the adapters check first: two files of one
    download job published at one name would replace each other at Complete."""
    job = run([AddFiles((FIRST_FILE,))])
    with pytest.raises(BitsError) as refused:
        decide(job, AddFiles((FileSpec(SECOND_FILE.remote_name, again),)), at(9), DEFAULT_LIMITS)
    assert refused.value.hresult == hresult.E_INVALIDARG
    assert "already a destination" in refused.value.message
