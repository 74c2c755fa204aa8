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


def catch_up(store: EventStore) -> int:
    """Bring the read models up to the head of the log; returns the new position."""
    with store.lock:
        position = store.views.position()
        # The jobs of the last page saved, as saved: a job whose events span several pages
        # (10,000 files' FileTransferred) is read back from its row once, not once per page.
        saved: dict[str, Job] = {}
        while True:
            page = store.read(position, BATCH)
            if not page:
                return position
            folded = _fold_page(store, page, saved)
            try:
                store.views.save([view_row(job) for job in folded], page[-1].position)
            except IntegrityError:
                # Another process on the same store saved this page first: go on from
                # the position it recorded (its rows hold the same fold).
                recorded = store.views.position()
                if recorded <= position:
                    raise
                position = recorded
                saved.clear()
                continue
            saved = {job.id: job for job in folded}
            position = page[-1].position


def _fold_page(store: EventStore, page: Sequence[Recorded], saved: dict[str, Job]) -> list[Job]:
    """The page's jobs folded; ``saved``: rows this catch-up saved (read from the store
    only for the others)."""
    ids = {
        rec.job_id: None for rec in page if rec.job_id != POLICY_STREAM and rec.job_id not in saved
    }
    rows = store.views.get_many(ids)  # the page's rows in a few queries
    touched: dict[str, Job | None] = {}
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
    return [job for job in touched.values() if job is not None]


def rebuild(store: EventStore) -> int:
    with store.lock:
        store.views.clear()
        return catch_up(store)
