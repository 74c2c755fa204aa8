"""The job-list projection: folds the log into read-model rows, tracking its position.

``catch_up`` reads the notifications after the tracked position, folds each touched
job from its current row (its ``doc`` is the Job as of ``version``), and saves the new
rows and the new position in one transaction. Replaying an event the row already holds
is skipped, so catching up twice is harmless. ``rebuild`` drops every row and folds the
whole log again; the result always equals a pure fold of each stream.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from eventsourcing.persistence import IntegrityError

from backhaul.adapters.jobtable import wake_at
from backhaul.adapters.serialization import job_from_dict, job_to_dict
from backhaul.adapters.store import EventStore, Recorded
from backhaul.adapters.view import ViewRow, due_text
from backhaul.core import job as jobs
from backhaul.core.event import POLICY_STREAM
from backhaul.core.job import Job

BATCH = 5000
SAVE_EVENTS = 50_000
# Touched jobs held before a save (a job of one file folds to about 1.3 KB: some 32 MB).
# Above the 10,000 jobs of a large batch, so that each is written once: at 10,000 a catch-up
# after an engine ran 10,000 jobs saved every row three times (29,000 rows, 3 s of its 5.9).
SAVE_JOBS = 25_000


def view_row(job: Job) -> ViewRow:
    sizes = [f.bytes_total for f in job.files]
    total = None if any(s is None for s in sizes) else sum(s for s in sizes if s is not None)
    due = wake_at(job)
    return ViewRow(
        job_id=job.id,
        owner=job.owner,
        state=int(job.state),
        live=not job.is_final,
        job_type=int(job.job_type),
        priority=int(job.priority),
        display_name=job.display_name,
        version=job.version,
        created_at=job.created_at.isoformat(),
        modified_at=job.modified_at.isoformat(),
        completed_at=job.transfer_completed_at.isoformat() if job.transfer_completed_at else None,
        bytes_total=total,
        bytes_transferred=sum(f.bytes_transferred for f in job.files),
        files_total=len(job.files),
        files_transferred=job.files_transferred,
        error_hresult=job.error.hresult if job.error else None,
        error_count=job.error_count,
        next_due=None if due is None else due_text(due),
        doc=json.dumps(job_to_dict(job), separators=(",", ":")),
    )


def job_of(row: ViewRow) -> Job:
    return job_from_dict(json.loads(row.doc))


def catch_up(
    store: EventStore,
    folded_into: dict[str, Job] | None = None,
    known: tuple[int, int, dict[str, Job]] | None = None,
) -> int:
    """Bring the read models up to the head of the log; returns the new position.

    The log is read a page (``BATCH`` events) at a time, but the rows are saved, with the
    position, only every ``SAVE_EVENTS`` events or ``SAVE_JOBS`` touched jobs: 10,000 jobs
    that each moved through four states are written once, not once per page they appear
    in. The jobs just saved are kept for the next pages (not read back from their rows).
    ``folded_into`` gets every job this call saved, as saved (their rows, unread).

    ``known``: (position before, last position, the jobs as of it) of events the caller
    appended itself, which are every event in that run of positions. When the read model
    stands right before them, the rows of those jobs are saved as given, without reading
    the run back."""
    with store.lock:
        position = read_to = store.views.position()
        saved: dict[str, Job] = {}  # the rows of the last save, as saved
        touched: dict[str, Job | None] = {}  # folded since that save
        unsaved = 0
        if known is not None and known[0] == position and known[1] > position:
            try:
                store.views.save([view_row(job) for job in known[2].values()], known[1])
            except IntegrityError:
                position = read_to = store.views.position()  # another process was first
            else:
                position = read_to = known[1]
                saved = dict(known[2])
                if folded_into is not None:
                    folded_into.update(saved)
        while True:
            page = store.read(read_to, BATCH)
            if page:
                _fold_page(store, page, touched, saved)
                read_to = page[-1].position
                unsaved += len(page)
                if unsaved < SAVE_EVENTS and len(touched) < SAVE_JOBS:
                    continue
            if read_to == position:
                return position
            folded = [job for job in touched.values() if job is not None]
            try:
                store.views.save([view_row(job) for job in folded], read_to)
            except IntegrityError:
                # Another process on the same store saved up to this position first: go on
                # from the position it recorded (its rows hold the same fold).
                recorded = store.views.position()
                if recorded <= position:
                    raise
                position = read_to = recorded
                saved, touched, unsaved = {}, {}, 0
                continue
            position = read_to
            saved, touched, unsaved = {job.id: job for job in folded}, {}, 0
            if folded_into is not None:
                folded_into.update(saved)


def _fold_page(
    store: EventStore,
    page: Sequence[Recorded],
    touched: dict[str, Job | None],
    saved: dict[str, Job],
) -> None:
    """Fold the page into ``touched``; a job not in it yet starts from ``saved`` (rows
    this catch-up just saved), else from its row in the store."""
    ids = {
        rec.job_id: None
        for rec in page
        if rec.job_id != POLICY_STREAM and rec.job_id not in touched and rec.job_id not in saved
    }
    rows = store.views.get_many(ids)  # the page's rows in a few queries
    for rec in page:
        if rec.job_id == POLICY_STREAM:
            continue  # engine-wide settings, not a job
        if rec.job_id not in touched:
            if rec.job_id in saved:
                touched[rec.job_id] = saved[rec.job_id]
            else:
                row = rows.get(rec.job_id)
                touched[rec.job_id] = job_of(row) if row else None
        current = touched[rec.job_id]
        if current is not None and rec.version <= current.version:
            continue  # already folded into this row
        touched[rec.job_id] = jobs.fold([rec.event], current)


def rebuild(store: EventStore) -> int:
    with store.lock:
        store.views.clear()
        return catch_up(store)
