"""Projections of a job: progress, reply progress, times and error, as BITS reports them.

Pure functions of the folded Job (bits-core.md §8, §6.1). An unknown size is ``None``
(BG_SIZE_UNKNOWN). The read models in adapters/view.py store the same values per job.
"""

from __future__ import annotations

from datetime import datetime

import attrs

from backhaul.core import hresult
from backhaul.core.job import FileState, Job
from backhaul.core.vocabulary import ErrorContext, JobState, JobType


@attrs.frozen
class JobProgress:
    """BG_JOB_PROGRESS."""

    bytes_total: int | None
    bytes_transferred: int
    files_total: int
    files_transferred: int


@attrs.frozen
class FileProgress:
    """BG_FILE_PROGRESS. ``completed``: available to the user (downloads: renamed by
    Complete; uploads: the upload finished)."""

    bytes_total: int | None
    bytes_transferred: int
    completed: bool


@attrs.frozen
class ReplyProgress:
    """BG_JOB_REPLY_PROGRESS: 0/0 for jobs without a reply; total None until it starts."""

    bytes_total: int | None
    bytes_transferred: int


@attrs.frozen
class JobTimes:
    """BG_JOB_TIMES."""

    creation_time: datetime
    modification_time: datetime
    transfer_completion_time: datetime | None


@attrs.frozen
class ErrorInfo:
    """IBackgroundCopyError: present only in ERROR / TRANSIENT_ERROR (§6.1)."""

    context: ErrorContext
    hresult: int
    description: str
    file_index: int | None
    protocol: str | None

    @property
    def hresult_name(self) -> str:
        return hresult.name_of(self.hresult)

    def __str__(self) -> str:
        """As a message shows it: ``HTTP 404 Not Found from URL [BG_E_HTTP_ERROR_404
        0x80190194] (REMOTE_FILE, file 0)``."""
        where = (
            self.context.name
            if self.file_index is None
            else (f"{self.context.name}, file {self.file_index}")
        )
        code = f"{self.hresult_name} {hresult.format_hresult(self.hresult)}"
        return f"{self.description} [{code}] ({where})"


def job_progress(job: Job) -> JobProgress:
    sizes = [f.bytes_total for f in job.files]
    total = None if None in sizes else sum(s for s in sizes if s is not None)
    return JobProgress(
        bytes_total=total,
        bytes_transferred=sum(f.bytes_transferred for f in job.files),
        files_total=len(job.files),
        files_transferred=job.files_transferred,
    )


def file_progress(job: Job, index: int) -> FileProgress:
    f: FileState = job.files[index]
    completed = f.completed if job.job_type is JobType.DOWNLOAD else f.transferred
    return FileProgress(f.bytes_total, f.bytes_transferred, completed)


def reply_progress(job: Job) -> ReplyProgress:
    if job.job_type is not JobType.UPLOAD_REPLY:
        return ReplyProgress(0, 0)
    return ReplyProgress(job.reply_bytes_total, job.reply_bytes_transferred)


def job_times(job: Job) -> JobTimes:
    return JobTimes(job.created_at, job.modified_at, job.transfer_completed_at)


def job_error(job: Job) -> ErrorInfo | None:
    if job.error is None or job.state not in (JobState.ERROR, JobState.TRANSIENT_ERROR):
        return None
    e = job.error
    description = e.description or hresult.describe(e.hresult)
    return ErrorInfo(e.context, e.hresult, description, e.file_index, e.protocol)
