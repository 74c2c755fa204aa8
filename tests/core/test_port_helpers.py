"""core.port.begin_upload: the checks an uploader's begin() shares with every plugin."""

from __future__ import annotations

import pytest

from backhaul.core import hresult as hr
from backhaul.core.error import TransferError
from backhaul.core.port import begin_upload
from backhaul.core.vocabulary import ErrorContext


def test_a_token_it_made_is_kept_and_anything_else_is_replaced() -> None:
    made = begin_upload("ftp", size=10, token=None, reply=False)
    assert len(made) == 16 and int(made, 16) >= 0
    assert begin_upload("ftp", size=10, token=made, reply=False) == made
    # Upper case is foreign too ("A" for the first digit: made.upper() is made itself
    # when made has no letter, one token in 1,800 or so).
    for foreign in ("", "../../etc", "A" + made[1:].upper(), made + "0", "x" * 16):
        other = begin_upload("ftp", size=10, token=foreign, reply=False)
        assert other != foreign and len(other) == 16


@pytest.mark.parametrize(("size", "reply", "says"), [(-1, False, "size -1"), (5, True, "ftp://")])
def test_a_reply_job_or_a_negative_size_is_a_fatal_invalid_argument(
    size: int, reply: bool, says: str
) -> None:
    with pytest.raises(TransferError) as caught:
        begin_upload("ftp", size=size, token=None, reply=reply)
    error = caught.value
    assert (error.hresult, error.context, error.transient) == (
        hr.E_INVALIDARG,
        ErrorContext.REMOTE_FILE,
        False,
    )
    assert says in error.message
