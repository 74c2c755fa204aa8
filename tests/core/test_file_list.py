"""A job's FileList behaves as the tuple of its files, and replacing one file shares the rest."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from backhaul.core.job import FileList, FileState, Job
from backhaul.core.value import FileSpec
from backhaul.core.vocabulary import JobType

files = st.lists(
    st.builds(
        FileState,
        spec=st.builds(FileSpec, st.text(max_size=5), st.just("/tmp/x")),
        bytes_transferred=st.integers(0, 3),
        transferred=st.booleans(),
    ),
    max_size=3 * FileList.CHUNK + 5,
)


@given(files, st.data())
def test_a_file_list_is_the_tuple_of_its_files(items: list[FileState], data: st.DataObject) -> None:
    expected = tuple(items)
    listed = FileList(items)
    assert len(listed) == len(expected)
    assert tuple(listed) == expected and list(listed) == items
    assert listed == expected and expected == listed
    assert hash(listed) == hash(expected)
    assert bool(listed) is bool(expected)
    if items:
        i = data.draw(st.integers(-len(items), len(items) - 1))
        assert listed[i] == expected[i]
        start, stop = data.draw(st.integers(0, len(items))), data.draw(st.integers(0, len(items)))
        assert listed[start:stop] == expected[start:stop]
        assert listed.index(expected[i]) == expected.index(expected[i])
    assert listed + expected == expected + expected


@given(files.filter(bool), st.data())
def test_replacing_a_file_changes_that_file_only(
    items: list[FileState], data: st.DataObject
) -> None:
    listed = FileList(items)
    i = data.draw(st.integers(0, len(items) - 1))
    new = attrs.evolve(items[i], bytes_transferred=items[i].bytes_transferred + 1)
    replaced = listed.replace(i, new)
    assert replaced == (*items[:i], new, *items[i + 1 :])
    assert listed == tuple(items)  # the original is untouched
    assert replaced != listed
    assert replaced == FileList(replaced)  # chunked the same way as one built from scratch


@pytest.mark.parametrize("index", [1, -1])
def test_replace_refuses_an_index_outside_the_list(index: int) -> None:
    listed = FileList([FileState(FileSpec("http://h/a", "/tmp/a"))])
    with pytest.raises(IndexError):
        listed.replace(index, listed[0])


def test_a_job_holds_its_files_as_a_file_list_whatever_it_was_given() -> None:
    from datetime import UTC, datetime

    now = datetime(2026, 1, 1, tzinfo=UTC)
    spec = FileSpec("http://h/a", "/tmp/a")
    job = Job("j", JobType.DOWNLOAD, "me", "n", now, now, files=(FileState(spec),))
    assert type(job.files) is FileList and job.files == (FileState(spec),)
    assert type(attrs.evolve(job, files=[]).files) is FileList
