"""What the aiohttp transports (``http``, ``bits_upload``) share about reading responses: the
limits on a response's head (a session gets ``max_line_size`` and ``max_field_size``
``MAX_HEADER_LINE``, ``max_headers`` ``MAX_RESPONSE_HEADERS``), and why aiohttp's parser refused one, in words.

The transports import nothing of each other (pyproject's import contracts); this module is
theirs in common, so one response is read alike by a download and by an upload."""

from __future__ import annotations

from typing import Final

from aiohttp.http import HttpProcessingError
from aiohttp.http_exceptions import LineTooLong

from backhaul.core.url import scrub_text

__all__ = ["MAX_HEADER_LINE", "MAX_RESPONSE_HEADERS", "cut_short_why", "unreadable_why"]

MAX_RESPONSE_HEADERS: Final = 2048
"""Header lines a response may have. aiohttp's default, 128, refuses real servers' answers.
WinHTTP counts no lines but caps the whole block at 64 KiB (BITS reads no more); 2048 lines
cover every block of that size whose lines average 32 bytes or more, i.e. any real one. More
(curl takes 5000) would accept blocks BITS itself refuses and raise the memory a hostile server
can make one response hold while its headers are parsed: aiohttp has no cap on the whole
block, only on lines, so that is about ``MAX_RESPONSE_HEADERS * MAX_HEADER_LINE`` bytes."""
MAX_HEADER_LINE: Final = 64 * 1024
"""Bytes of one header line, and of the status line: WinHTTP's whole 64 KiB header block,
which a single header (a large Content-Security-Policy, Link or Set-Cookie) may fill. aiohttp's
default, 8190, is Apache's limit for requests, not what clients accept. Its compiled parser
bounds a header's name and its value each by ``max_field_size``; its pure-Python one bounds the
whole line, and a line whose end has not arrived yet by ``max_line_size``: both get this."""


def unreadable_why(error: HttpProcessingError) -> str:
    """Why aiohttp's parser refused a response head, in words; its own text (scrubbed of
    URLs' secrets) for the rest."""
    original = error.__cause__  # aiohttp copies the parser's error: the original is its cause
    if isinstance(original, LineTooLong):
        return f"a header line is longer than {MAX_HEADER_LINE} bytes"
    if error.message.startswith("Too many headers"):
        return f"too many headers (more than {MAX_RESPONSE_HEADERS})"
    return scrub_text(error.message)


def cut_short_why(url: str, received: int, expected: int | None, exc: BaseException | None) -> str:
    """Why a body ended early, in our words (aiohttp's hold a status 400 no server sent):
    the bytes received of those announced, or, with no length to compare (a chunked body),
    aiohttp's reason scrubbed. ``url`` is already redacted."""
    if expected is not None and received < expected:
        return f"connection closed after {received} of {expected} body bytes from {url}"
    cause = exc.__cause__ if exc is not None else None
    reason = cause.message if isinstance(cause, HttpProcessingError) else str(exc)
    return f"the body from {url} was cut short after {received} bytes: {scrub_text(reason)}"
