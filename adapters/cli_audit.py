"""``backhaul audit``: replay and audit verbs over the event log (adapters/audit.py).

    backhaul audit history JOB [--json]        the job's whole event timeline
    backhaul audit at JOB TIME|VERSION [--json]  the job as it was then
    backhaul audit export [FILE]               the whole log as JSON lines (stdout: -)
    backhaul audit import FILE                 an export into an EMPTY store (stdin: -)
    backhaul audit rebuild                     drop the read models and fold the log again
    backhaul audit verify [--json]             hash chains, versions, read models

JOB is a job id, a unique id prefix or a unique display name, of any owner and in any
state (the audit reads the whole store). TIME is ISO 8601 (a time without a zone is UTC);
a plain number is a VERSION. Secrets print as ``<redacted>``; an export holds them only
sealed. Exit codes as for the other verbs; ``verify`` exits 1 when it finds problems.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO
from uuid import UUID

from backhaul.adapters.manager import TransferManager
from backhaul.core import hresult
from backhaul.core.error import BitsError


class _LazyAudit:
    """adapters/audit.py, imported on first use: `backhaul get` need not load it."""

    def __getattr__(self, name: str) -> Any:
        import backhaul.adapters.audit as module

        return getattr(module, name)


audit = _LazyAudit()

EXIT_OK, EXIT_FAILED = 0, 1


def parse_when(text: str) -> int | datetime:
    """A version (a plain number) or an ISO 8601 time (naive: UTC)."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a version number nor an ISO 8601 time"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def resolve_job(m: TransferManager, ref: str) -> str:
    """A job id from an id, a unique id prefix or a unique display name (any owner, any
    state): the audit reads the log, so a job the read models miss is still found by id."""
    try:
        job_id = str(UUID(ref))
    except ValueError:
        job_id = None
    if job_id is not None and m.store.raw_stream(job_id):
        return job_id
    m.refresh_views()
    rows = m.store.views.select(None, include_final=True)
    matches = {r.job_id for r in rows if r.job_id.startswith(ref.lower()) or r.display_name == ref}
    if len(matches) == 1:
        return matches.pop()
    if not matches:
        raise BitsError(hresult.BG_E_NOT_FOUND, f"no job named {ref!r}")
    raise BitsError(hresult.E_INVALIDARG, f"{ref!r} names {len(matches)} jobs; use the id")


def _json(data: Any, out: TextIO) -> None:
    out.write(audit.safe_text(json.dumps(data, ensure_ascii=False, indent=2)) + "\n")


def cmd_history(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    entries = audit.history(m.store, resolve_job(m, args.job))
    if args.json:
        _json(audit.history_to_dict(entries), out)
    else:
        out.write(audit.safe_text(audit.history_to_text(entries)))
    return EXIT_OK


def cmd_at(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    job_id = resolve_job(m, args.job)
    when = args.when
    if isinstance(when, int):
        as_of = audit.state_at(m.store, job_id, version=when)
    else:
        as_of = audit.state_at(m.store, job_id, at=when)
    if args.json:
        _json(as_of.to_dict(), out)
    else:
        out.write(audit.safe_text(as_of.to_text()))
    return EXIT_OK


def cmd_export(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    if args.file in (None, "-"):
        summary = audit.export(m.store, out)
        report = sys.stderr
    else:
        path = Path(args.file).expanduser()
        # The export names servers, files and owners and holds sealed secrets: owner-only,
        # a file it overwrites too (os.open's mode applies only to a file it creates); a
        # device or pipe given as the file (/dev/null, a FIFO) keeps its mode.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "w", encoding="utf-8", newline="\n") as sink:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                os.fchmod(fd, 0o600)
            summary = audit.export(m.store, sink)
        report = out
    report.write(
        f"exported {summary.events} event(s) of {summary.streams} stream(s); "
        f"log digest {summary.digest}\n"
    )
    return EXIT_OK


def cmd_import(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    if args.file == "-":
        summary = audit.import_(m.store, sys.stdin)
    else:
        with open(Path(args.file).expanduser(), encoding="utf-8") as source:
            summary = audit.import_(m.store, source)
    out.write(
        f"imported {summary.events} event(s) of {summary.streams} stream(s); "
        f"read models rebuilt: {summary.rows} job(s); log digest {summary.digest}\n"
    )
    if summary.unreadable:
        key = m.store.secrets.file or "BACKHAUL_SECRET_KEY"
        sys.stderr.write(
            f"backhaul audit import: warning: {summary.unreadable} sealed secret(s) of "
            f"{summary.unreadable_jobs} unfinished job(s) cannot be opened with the key in "
            f"{key}: put the exporting home's secret.key there (or set BACKHAUL_SECRET_KEY) "
            "before those jobs run, or they end in ERROR (NTE_BAD_KEY)\n"
        )
    return EXIT_OK


def cmd_rebuild(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    summary = audit.rebuild(m.store)
    out.write(f"rebuilt the read models: {summary.rows} job(s), log position {summary.position}\n")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace, m: TransferManager, out: TextIO) -> int:
    report = audit.verify_report(m.store)
    if args.json:
        _json(report.to_dict(), out)
    else:
        for problem in report.problems:
            out.write(f"{problem}\n")
        verdict = "ok" if report.ok else f"{len(report.problems)} problem(s)"
        out.write(
            f"{verdict}: {report.events} event(s) in {report.streams} stream(s), "
            f"{report.rows} read-model row(s) checked; log digest {report.digest}\n"
        )
    return EXIT_OK if report.ok else EXIT_FAILED


def add_audit_parser(subparsers: Any) -> None:
    """Add ``audit`` and its verbs to the ``backhaul`` parser's sub-commands."""
    a = subparsers.add_parser(
        "audit",
        help="replay and audit the event log (history, at, export, import, rebuild, verify)",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    verbs = a.add_subparsers(dest="audit_verb", required=True, metavar="AUDIT_VERB")

    h = verbs.add_parser("history", help="a job's whole event timeline")
    h.add_argument("job", help="job id, id prefix or display name")
    h.add_argument("--json", action="store_true")
    h.set_defaults(func=cmd_history)

    at = verbs.add_parser("at", help="a job's state, progress and error at a time or version")
    at.add_argument("job", help="job id, id prefix or display name")
    at.add_argument(
        "when", type=parse_when, metavar="TIME|VERSION", help="ISO 8601 time or version"
    )
    at.add_argument("--json", action="store_true")
    at.set_defaults(func=cmd_at)

    e = verbs.add_parser("export", help="the whole log as JSON lines (specs/event-log.md)")
    e.add_argument("file", nargs="?", help="output file (default: stdout)")
    e.set_defaults(func=cmd_export)

    i = verbs.add_parser("import", help="load an export into an empty store")
    i.add_argument("file", help="the export file, or - for stdin")
    i.set_defaults(func=cmd_import)

    r = verbs.add_parser("rebuild", help="drop the read models and fold the whole log again")
    r.set_defaults(func=cmd_rebuild)

    v = verbs.add_parser("verify", help="check hash chains, versions and read models")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_verify)


__all__ = ["add_audit_parser", "parse_when", "resolve_job"]
