"""The BG_JOB_STATE machine as ONE declarative table.

Rules of this module (after h11's state module):
- ``TABLE`` maps ``state -> {trigger -> Rule}``. A missing cell means the trigger is
  illegal in that state and is refused with BG_E_INVALID_STATE.
- A ``Rule`` is an ordered list of ``(guard, target)`` choices; the first guard that
  holds picks the target. When no guard holds, the rule's ``refusal`` HRESULT is raised.
- Guards are data (``Guard`` members), evaluated against a few facts about the job
  (``JobFacts``), never if-chains in the callers.
- Final states are derived: the states whose row is empty.
- The command side (``decide``), the replay side (``evolve``), the spec renderings in
  ``specs/`` and the property tests all read this table; nothing restates it.

Every row cites bits-core.md §2.2; the cells that reference marks UNCONFIRMED are
decided in ``DECISIONS`` and explained in specs/state-machine.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from enum import Enum
from types import MappingProxyType

import attrs

from backhaul.core import hresult
from backhaul.core.vocabulary import JobState, JobType


class Trigger(Enum):
    """Everything that can move a job: the client's calls and the engine's events."""

    # Client calls (IBackgroundCopyJob).
    RESUME = "resume"
    SUSPEND = "suspend"
    CANCEL = "cancel"
    COMPLETE = "complete"
    ADD_FILE = "add_file"
    VALIDATION_FAILED = "validation_failed"
    # Engine events.
    SCHEDULED = "scheduled"
    CONNECTED = "connected"
    DATA_RECEIVED = "data_received"
    SLICE_ENDED = "slice_ended"
    ALL_FILES_DONE = "all_files_done"
    TRANSIENT_FAILURE = "transient_failure"
    FATAL_FAILURE = "fatal_failure"
    RETRY_DUE = "retry_due"
    NO_PROGRESS_TIMEOUT = "no_progress_timeout"
    MAX_DOWNLOAD_TIME_EXCEEDED = "max_download_time_exceeded"
    NETWORK_LOST = "network_lost"
    NETWORK_RESTORED = "network_restored"
    BLOCKED = "blocked"
    UNBLOCKED = "unblocked"
    INACTIVITY_TIMEOUT = "inactivity_timeout"
    RANGES_DONE = "ranges_done"

    @property
    def is_client_call(self) -> bool:
        return self in CLIENT_CALLS


CLIENT_CALLS = frozenset(
    {
        Trigger.RESUME,
        Trigger.SUSPEND,
        Trigger.CANCEL,
        Trigger.COMPLETE,
        Trigger.ADD_FILE,
        Trigger.VALIDATION_FAILED,
    }
)


@attrs.frozen
class JobFacts:
    """What a guard may look at. Derived from the job by the caller."""

    job_type: JobType
    has_files: bool
    retries_allowed: bool
    on_demand: bool = False


class Guard(Enum):
    ALWAYS = "always"
    HAS_FILES = "has files"
    IS_DOWNLOAD = "download job"
    RETRIES_ALLOWED = (
        "retries allowed (NoProgressTimeout > 0 and above MinimumRetryDelay, default HTTP method)"
    )
    ON_DEMAND = "on-demand job"

    def holds(self, facts: JobFacts) -> bool:
        return _GUARD_PREDICATES[self](facts)


_GUARD_PREDICATES: Mapping[Guard, Callable[[JobFacts], bool]] = MappingProxyType(
    {
        Guard.ALWAYS: lambda f: True,
        Guard.HAS_FILES: lambda f: f.has_files,
        Guard.IS_DOWNLOAD: lambda f: f.job_type is JobType.DOWNLOAD,
        Guard.RETRIES_ALLOWED: lambda f: f.retries_allowed,
        Guard.ON_DEMAND: lambda f: f.on_demand,
    }
)


@attrs.frozen
class Rule:
    choices: tuple[tuple[Guard, JobState], ...]
    refusal: int = hresult.BG_E_INVALID_STATE

    def target(self, facts: JobFacts) -> JobState | None:
        for guard, state in self.choices:
            if guard.holds(facts):
                return state
        return None


def _to(state: JobState) -> Rule:
    return Rule(((Guard.ALWAYS, state),))


S = JobState
T = Trigger

_ACTIVE = (S.QUEUED, S.CONNECTING, S.TRANSFERRING)
_NON_FINAL = (*_ACTIVE, S.SUSPENDED, S.ERROR, S.TRANSIENT_ERROR, S.TRANSFERRED)

_RESUME_FROM_SUSPENDED = Rule(((Guard.HAS_FILES, S.QUEUED),), refusal=hresult.BG_E_EMPTY)
_COMPLETE_UNLESS_TRANSFERRED = Rule(((Guard.IS_DOWNLOAD, S.ACKNOWLEDGED),))
_ON_TRANSIENT_FAILURE = Rule(((Guard.RETRIES_ALLOWED, S.TRANSIENT_ERROR), (Guard.ALWAYS, S.ERROR)))


def _row(**cells: Rule) -> Mapping[Trigger, Rule]:
    return MappingProxyType({Trigger[name.upper()]: rule for name, rule in cells.items()})


# fmt: off
_CALLS_IN_ANY_NON_FINAL = {
    "cancel": _to(S.CANCELLED),
    "inactivity_timeout": _to(S.CANCELLED),
    "validation_failed": _to(S.ERROR),
}

TABLE: Mapping[JobState, Mapping[Trigger, Rule]] = MappingProxyType({
    S.SUSPENDED: _row(
        resume=_RESUME_FROM_SUSPENDED,
        suspend=_to(S.SUSPENDED),
        complete=_COMPLETE_UNLESS_TRANSFERRED,
        add_file=_to(S.SUSPENDED),
        data_received=_to(S.SUSPENDED),
        **_CALLS_IN_ANY_NON_FINAL,
    ),
    S.QUEUED: _row(
        resume=_to(S.QUEUED),
        suspend=_to(S.SUSPENDED),
        complete=_COMPLETE_UNLESS_TRANSFERRED,
        add_file=_to(S.QUEUED),
        scheduled=_to(S.CONNECTING),
        network_lost=_to(S.TRANSIENT_ERROR),
        blocked=_to(S.TRANSIENT_ERROR),
        **_CALLS_IN_ANY_NON_FINAL,
    ),
    S.CONNECTING: _row(
        resume=_to(S.CONNECTING),
        suspend=_to(S.SUSPENDED),
        complete=_COMPLETE_UNLESS_TRANSFERRED,
        add_file=_to(S.CONNECTING),
        connected=_to(S.TRANSFERRING),
        data_received=_to(S.TRANSFERRING),
        slice_ended=_to(S.QUEUED),
        all_files_done=_to(S.TRANSFERRED),
        transient_failure=_ON_TRANSIENT_FAILURE,
        fatal_failure=_to(S.ERROR),
        max_download_time_exceeded=_to(S.ERROR),
        network_lost=_to(S.TRANSIENT_ERROR),
        blocked=_to(S.TRANSIENT_ERROR),
        **_CALLS_IN_ANY_NON_FINAL,
    ),
    S.TRANSFERRING: _row(
        resume=_to(S.TRANSFERRING),
        suspend=_to(S.SUSPENDED),
        complete=_COMPLETE_UNLESS_TRANSFERRED,
        add_file=_to(S.TRANSFERRING),
        data_received=_to(S.TRANSFERRING),
        slice_ended=_to(S.QUEUED),
        all_files_done=_to(S.TRANSFERRED),
        transient_failure=_ON_TRANSIENT_FAILURE,
        fatal_failure=_to(S.ERROR),
        max_download_time_exceeded=_to(S.ERROR),
        network_lost=_to(S.TRANSIENT_ERROR),
        blocked=_to(S.TRANSIENT_ERROR),
        ranges_done=Rule(((Guard.ON_DEMAND, S.SUSPENDED),)),
        **_CALLS_IN_ANY_NON_FINAL,
    ),
    S.TRANSIENT_ERROR: _row(
        resume=_to(S.QUEUED),
        suspend=_to(S.SUSPENDED),
        complete=_COMPLETE_UNLESS_TRANSFERRED,
        add_file=_to(S.TRANSIENT_ERROR),
        retry_due=_to(S.QUEUED),
        no_progress_timeout=_to(S.ERROR),
        network_lost=_to(S.TRANSIENT_ERROR),
        network_restored=_to(S.QUEUED),
        blocked=_to(S.TRANSIENT_ERROR),
        unblocked=_to(S.QUEUED),
        **_CALLS_IN_ANY_NON_FINAL,
    ),
    S.ERROR: _row(
        resume=_to(S.QUEUED),
        suspend=_to(S.SUSPENDED),
        complete=_COMPLETE_UNLESS_TRANSFERRED,
        add_file=_to(S.ERROR),
        **_CALLS_IN_ANY_NON_FINAL,
    ),
    S.TRANSFERRED: _row(
        resume=_to(S.TRANSFERRED),
        suspend=_to(S.TRANSFERRED),
        complete=_to(S.ACKNOWLEDGED),
        add_file=_to(S.SUSPENDED),
        **_CALLS_IN_ANY_NON_FINAL,
    ),
    S.ACKNOWLEDGED: _row(),
    S.CANCELLED: _row(),
})
# fmt: on

FINAL_STATES: frozenset[JobState] = frozenset(s for s, row in TABLE.items() if not row)
ACTIVE_STATES: frozenset[JobState] = frozenset(_ACTIVE)
NON_FINAL_STATES: frozenset[JobState] = frozenset(_NON_FINAL)

# Cells that bits-core.md marks UNCONFIRMED (or leaves silent), with the decision taken.
# specs/state-machine.md renders this mapping; a test checks every key is a real cell.
DECISIONS: Mapping[tuple[JobState, Trigger], str] = MappingProxyType(
    {
        (S.SUSPENDED, T.DATA_RECEIVED): (
            "Stays SUSPENDED, with the progress recorded. A transfer stopped by Suspend "
            "claims what it had written (a last checkpoint), and a file it had finished (its "
            "FileTransferred), so that Resume goes on from there; BITS keeps a suspended "
            "job's progress. It stays SUSPENDED even when that was the last file: Resume "
            "then finds nothing pending and the job goes on to TRANSFERRED."
        ),
        (S.TRANSFERRED, T.SUSPEND): (
            "Stays TRANSFERRED. Nothing is running, so there is nothing to suspend, and a "
            "TRANSFERRED job is already one of the 'automatically suspended' states "
            "(Suspend page). Moving it to SUSPENDED would hide that its files are ready."
        ),
        (S.TRANSFERRED, T.RESUME): (
            "Stays TRANSFERRED: every file is transferred, so there is nothing to queue."
        ),
        (S.TRANSFERRED, T.ADD_FILE): (
            "Goes to SUSPENDED. The life-cycle page allows adding files to a TRANSFERRED job "
            "and then calling Resume; with an untransferred file the job is no longer "
            "'transferred', and like every job that is waiting for the application it is "
            "suspended until Resume queues it."
        ),
        (S.ERROR, T.SUSPEND): (
            "Goes to SUSPENDED, as the life-cycle page implies; the error object is kept "
            "until the next transfer starts."
        ),
        (S.CONNECTING, T.SLICE_ENDED): (
            "Back to QUEUED, like TRANSFERRING: the scheduler may take the turn back (time "
            "slice over, pre-empted by a higher priority, engine shut down) before the "
            "first byte."
        ),
        (S.CONNECTING, T.ALL_FILES_DONE): (
            "TRANSFERRED without passing TRANSFERRING when every file was finished in an "
            "earlier turn (the slice ended, or the job was suspended, after the last file)."
        ),
        (S.TRANSIENT_ERROR, T.NETWORK_LOST): (
            "Stays TRANSIENT_ERROR; the error becomes BG_E_NETWORK_DISCONNECTED and the "
            "retry timer stops until the network returns."
        ),
        (S.CONNECTING, T.BLOCKED): (
            "TRANSIENT_ERROR with the blocking code (policy, cost); no error is counted and "
            "no retry timer runs; UNBLOCKED queues the job again."
        ),
        (S.TRANSFERRED, T.VALIDATION_FAILED): (
            "Goes to ERROR with BG_E_VALIDATION_FAILED, and the rejected file starts over "
            "from byte 0 (SetValidationState page: Resume fetches it again). The same when "
            "Complete finds a transferred file's temp file cut short or gone: Complete "
            "validates the files it publishes."
        ),
        (S.SUSPENDED, T.VALIDATION_FAILED): (
            "Goes to ERROR, as from the active states: the error says why the job holds a "
            "file to fetch again, and Resume queues it as it would from SUSPENDED."
        ),
        (S.ERROR, T.VALIDATION_FAILED): (
            "Stays ERROR; the job's error becomes the rejection (BG_E_VALIDATION_FAILED, "
            "naming the file), which is what Resume must mend."
        ),
        (S.TRANSIENT_ERROR, T.VALIDATION_FAILED): (
            "Goes to ERROR: the rejection is the application's verdict, not a failure a "
            "retry would mend; the retry timer stops until Resume."
        ),
        (S.TRANSFERRING, T.RANGES_DONE): (
            "On-demand job whose requested ranges are in but whose file is still incomplete: "
            "SUSPENDED (RequestFileRanges page). When the file is whole the engine sends "
            "ALL_FILES_DONE instead."
        ),
    }
)


class IllegalTransition(Exception):
    """A trigger is not legal for the job's state or facts. Carries the HRESULT."""

    def __init__(self, state: JobState, trigger: Trigger, code: int) -> None:
        self.state = state
        self.trigger = trigger
        self.hresult = code
        super().__init__(f"{trigger.value} is not allowed in state {state.name}")


def rule_for(state: JobState, trigger: Trigger) -> Rule | None:
    return TABLE[state].get(trigger)


def next_state(state: JobState, trigger: Trigger, facts: JobFacts) -> JobState:
    """The one lookup. Raises ``IllegalTransition`` with the BITS HRESULT."""
    rule = TABLE[state].get(trigger)
    if rule is None:
        raise IllegalTransition(state, trigger, hresult.BG_E_INVALID_STATE)
    target = rule.target(facts)
    if target is None:
        raise IllegalTransition(state, trigger, rule.refusal)
    return target
