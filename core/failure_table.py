"""specs/failures.md, rendered from core/failure.py (pure: returns text)."""

from __future__ import annotations

from backhaul.core import hresult
from backhaul.core.failure import TRANSIENT, http_status_is_transient

_DECIDED = {
    hresult.BG_E_MISSING_FILE_SIZE: "BITS says the request fails; nothing a retry fixes "
    "(set DYNAMIC_CONTENT for such servers).",
    hresult.BG_E_INSUFFICIENT_RANGE_SUPPORT: "documented as a JobError (AddFileWithRanges).",
    hresult.BG_E_INVALID_SERVER_RESPONSE: "DOC CONFLICT in BITS; a broken response is often "
    "one bad proxy or node: retried.",
    hresult.BG_E_CONNECT_FAILURE: "the canonical transient error ('server unavailable').",
    hresult.BG_E_CONNECTION_CLOSED: "a dropped connection resumes from the checkpoint.",
    hresult.BG_E_TOO_LARGE: "the server's limit does not change by retrying.",
    hresult.BG_E_REMOTE_FILE_CHANGED: "BITS's message says 'Resume to retry': the application "
    "decides.",
    hresult.BG_E_MAX_DOWNLOAD_SIZE_LIMIT_REACHED: "the job's own limit.",
    hresult.BG_E_CLIENT_SERVER_PROTOCOL_MISMATCH: "the server speaks no protocol we know.",
    hresult.BG_E_SERVER_EXECUTE_ENABLE: "a server configuration error.",
}


def failures_markdown() -> str:
    lines = [
        "# Which failures are transient",
        "",
        "Generated from `core/failure.py` by `tests/specs/regen.py`; do not edit.",
        "A transient failure moves the job to TRANSIENT_ERROR (retried after",
        "MinimumRetryDelay, or the server's Retry-After); a fatal one to ERROR (the",
        "application decides). NoProgressTimeout = 0, MinimumRetryDelay >= NoProgressTimeout",
        "and a custom HTTP method make every failure fatal (bits-core.md §5).",
        "",
        "## HTTP statuses (HRESULT 0x80190000 + status)",
        "",
        "bits-core.md §6.4's server-application rule, applied to every HTTP transfer,",
        "plus 429 (a rate limit is temporary by definition; its Retry-After is honoured).",
        "",
        "| status | class |",
        "| --- | --- |",
    ]
    for status in (*range(300, 308), 308, *range(400, 418), 429, 449, *range(500, 506)):
        kind = "transient" if http_status_is_transient(status) else "fatal"
        lines.append(f"| {status} | {kind} |")
    lines += [
        "| any other | transient |",
        "",
        "## Other codes",
        "",
        "Codes not listed are transient (BITS retries what it does not know).",
        "",
        "| HRESULT | name | class | why (where BITS leaves it UNCONFIRMED) |",
        "| --- | --- | --- | --- |",
    ]
    for code, transient in sorted(TRANSIENT.items()):
        kind = "transient" if transient else "fatal"
        why = _DECIDED.get(code, "")
        lines.append(
            f"| {hresult.format_hresult(code)} | {hresult.name_of(code)} | {kind} | {why} |"
        )
    return "\n".join(lines) + "\n"
