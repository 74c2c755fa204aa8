"""``job.replaced`` is ``attrs.evolve`` for a Job, field by field."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import attrs
from hypothesis import given
from hypothesis import strategies as st

from backhaul.core import job as jobs
from backhaul.core.job import FileList, FileState, Job
from backhaul.core.value import FileSpec
from backhaul.core.vocabulary import JobType

NOW = datetime(2026, 1, 1, tzinfo=UTC)
BASE = Job("j", JobType.DOWNLOAD, "me", "n", NOW, NOW)
OTHER = Job(
    "k",
    JobType.UPLOAD,
    "you",
    "m",
    NOW + timedelta(1),
    NOW + timedelta(2),
    version=7,
    files=FileList([FileState(FileSpec("http://h/a", "/tmp/a"))]),
    error_count=3,
    notified=(("x", 1, 0),),
)
NAMES = [a.name for a in attrs.fields(Job)]


@given(st.lists(st.sampled_from(NAMES), unique=True))
def test_replacing_any_fields_equals_attrs_evolve(names: list[str]) -> None:
    changes = {name: getattr(OTHER, name) for name in names}
    assert jobs.replaced(BASE, changes) == attrs.evolve(BASE, **changes)


def test_every_field_of_a_job_can_be_given_by_position() -> None:
    """``replaced`` builds a Job by position: every field must be an init argument with
    its own name (no kw_only, no alias)."""
    assert all(a.init and not a.kw_only and a.alias == a.name for a in attrs.fields(Job))
