"""Limits a job must respect: BITS's policy defaults (bits-core.md §16), configurable.

The hard-coded BITS lengths (display name 256, description 1,024, URL 2,200...) are
constants here too, so that one table names every limit the API enforces.
"""

from __future__ import annotations

import hashlib
from typing import Final

import attrs

DISPLAY_NAME_MAX: Final = 256
DESCRIPTION_MAX: Final = 1024
REMOTE_NAME_MAX: Final = 2200
LOCAL_NAME_MAX: Final = 4096  # PATH_MAX on Linux stands in for Windows' MAX_PATH
LOCAL_NAME_PART_MAX: Final = 255  # NAME_MAX: the bytes of one name in a directory
CUSTOM_HEADERS_MAX: Final = 16384
CERT_STORE_NAME_MAX: Final = 255  # 256 including the NUL (bits-core.md §11)
CERT_SUBJECT_MAX: Final = 256
USER_NAME_MAX: Final = 300
PASSWORD_MAX: Final = 65536
NOTIFY_PROGRAM_MAX: Final = 4096
NOTIFY_PARAMETERS_MAX: Final = 4000
PROXY_LIST_MAX: Final = 32000
HTTP_METHOD_MAX: Final = 64
MINIMUM_RETRY_DELAY_FLOOR: Final = 5  # seconds; smaller values are raised to this


def fit_name(name: str, room: int) -> str:
    """``name`` when its UTF-8 form has at most ``room`` bytes, else its start and a hash of
    the whole in ``room`` bytes: a file name that is legal (up to NAME_MAX bytes) gets temp
    and reply names that are legal too (on an SMB share as well: 255 UTF-16 code units
    never hold more characters than 255 bytes). The same name always gives the same result,
    so whoever asks again finds the same name."""
    if len(name) * 4 <= room:  # UTF-8 takes at most 4 bytes a character
        return name
    raw = name.encode()
    if len(raw) <= room:
        return name
    digest = hashlib.sha256(raw).hexdigest()[:16]
    head = raw[: room - len(digest) - 1].decode(errors="ignore")  # whole characters only
    return f"{head}~{digest}"


@attrs.frozen
class Limits:
    """Per-deployment limits. ``None`` disables a limit."""

    max_files_per_job: int | None = 200
    max_ranges_per_file: int | None = 500
    max_jobs_per_owner: int | None = 60
    max_jobs: int | None = 300


DEFAULT_LIMITS: Final = Limits()
UNLIMITED: Final = Limits(None, None, None, None)
