"""Errors of backhaul. One base, named for what failed, each carrying a BITS HRESULT.

- ``BitsError``: a refused call (a "method return" in bits-core.md §6.3). Nothing was
  appended to the log when it is raised.
- ``TransferError``: what a transport raises when a transfer fails. The engine turns it
  into an error value inside an event; it never escapes to the application.
Use ``BitsError`` for bad input and illegal calls; do not use it for I/O failures during
a transfer (those are ``TransferError``).
"""

from __future__ import annotations

from backhaul.core import hresult
from backhaul.core.vocabulary import ErrorContext


class BackhaulError(Exception):
    """Base of every error backhaul raises on purpose."""

    hresult: int = hresult.E_FAIL

    def __init__(self, code: int, message: str) -> None:
        self.hresult = code
        self.message = message
        super().__init__(f"{message} [{hresult.name_of(code)} {hresult.format_hresult(code)}]")


class BitsError(BackhaulError):
    """A call refused with a BITS HRESULT; the job and the log are unchanged."""


class TransferError(BackhaulError):
    """A transfer failed. ``transient`` says whether BITS would retry it.

    ``response_headers``: the raw header block of the server's response that failed (status
    line, header lines, empty line; CR LF each), when a response came. The engine keeps it
    as the file's HTTP_RESPONSE_HEADERS, which holds the last response whatever it was."""

    def __init__(
        self,
        code: int,
        message: str,
        *,
        context: ErrorContext = ErrorContext.GENERAL_TRANSPORT,
        transient: bool,
        retry_after: float | None = None,
        response_headers: str | None = None,
    ) -> None:
        super().__init__(code, message)
        self.context = context
        self.transient = transient
        self.retry_after = retry_after
        self.response_headers = response_headers
