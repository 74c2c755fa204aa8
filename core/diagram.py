"""Renderings of the transition table, computed FROM ``transition.TABLE``.

Pure functions returning text; no I/O. ``tests/specs/regen.py`` writes their output to
``specs/`` and ``tests/specs/test_specs_golden.py`` checks the files are current, so the
spec files can never drift from the code.

Order everywhere: states by their BITS value (``BG_JOB_STATE``), then triggers in the
order ``Trigger`` declares them, then a rule's choices in the order they are tried.
"""

from __future__ import annotations

import csv
import io

from backhaul.core import hresult
from backhaul.core.transition import DECISIONS, FINAL_STATES, TABLE, Guard, Rule, Trigger
from backhaul.core.vocabulary import JobState

__all__ = [
    "Cell",
    "cells",
    "decisions_markdown",
    "mermaid",
    "refusal_name",
    "table_csv",
    "table_markdown",
]

Cell = tuple[JobState, Trigger, Rule]

GENERATED_NOTE = (
    "Generated from `backhaul.core.transition.TABLE` by `tests/specs/regen.py`; do not edit."
)


def cells() -> list[Cell]:
    """Every (state, trigger) cell of the table that exists, in the documented order."""
    return [
        (state, trigger, TABLE[state][trigger])
        for state in sorted(TABLE, key=lambda s: s.value)
        for trigger in Trigger
        if trigger in TABLE[state]
    ]


def refusal_name(rule: Rule) -> str | None:
    """The HRESULT name raised when no guard holds, or None when one always holds."""
    if any(guard is Guard.ALWAYS for guard, _ in rule.choices):
        return None
    return hresult.name_of(rule.refusal)


def _guard_text(guard: Guard, position: int) -> str:
    if guard is Guard.ALWAYS:
        return "always" if position == 0 else "otherwise"
    return str(guard.value)


def _guard_short(guard: Guard, position: int) -> str:
    if guard is Guard.ALWAYS:
        return "" if position == 0 else "otherwise"
    return guard.name.lower().replace("_", " ")


def _choices_text(rule: Rule) -> str:
    return "; ".join(
        f"{_guard_text(guard, i)} → {target.name}" for i, (guard, target) in enumerate(rule.choices)
    )


def _escape_cell(text: str) -> str:
    return text.replace("|", "\\|")


def table_markdown() -> str:
    """The table as a Markdown document: one row per existing (state, trigger) cell."""
    lines = [
        "# BG_JOB_STATE transition table",
        "",
        GENERATED_NOTE,
        "",
        "A (state, trigger) pair that has no row is refused with BG_E_INVALID_STATE and "
        "changes nothing. The choices of a row are tried in order; the first guard that "
        "holds gives the next state, and when none holds the call is refused with the "
        "row's refusal HRESULT. Rows marked *decided* settle a cell that bits-core.md "
        "leaves UNCONFIRMED or silent (see `DECISIONS` and specs/state-machine.md).",
        "",
        "Final states (empty rows, absorbing): "
        + ", ".join(s.name for s in sorted(FINAL_STATES, key=lambda s: s.value))
        + ".",
        "",
        "| From | Trigger | Guard → To | Refusal when no guard holds | Decided |",
        "|---|---|---|---|---|",
    ]
    for state, trigger, rule in cells():
        refusal = refusal_name(rule)
        row = (
            state.name,
            f"`{trigger.value}`",
            _choices_text(rule),
            refusal if refusal is not None else "—",
            "decided" if (state, trigger) in DECISIONS else "",
        )
        lines.append("| " + " | ".join(_escape_cell(c) for c in row) + " |")
    return "\n".join(lines) + "\n"


CSV_COLUMNS = ("from", "trigger", "guards", "targets", "refusal", "decided")


def table_csv() -> str:
    """The same cells as CSV. ``guards`` and ``targets`` are parallel ';'-joined lists."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for state, trigger, rule in cells():
        writer.writerow(
            (
                state.name,
                trigger.value,
                ";".join(guard.name for guard, _ in rule.choices),
                ";".join(target.name for _, target in rule.choices),
                refusal_name(rule) or "",
                "yes" if (state, trigger) in DECISIONS else "no",
            )
        )
    return buffer.getvalue()


def mermaid() -> str:
    """A Mermaid ``stateDiagram-v2``; parallel edges between two states share one label."""
    edges: dict[tuple[JobState, JobState], list[str]] = {}
    for state, trigger, rule in cells():
        for i, (guard, target) in enumerate(rule.choices):
            short = _guard_short(guard, i)
            label = f"{trigger.value} [{short}]" if short else trigger.value
            edges.setdefault((state, target), []).append(label)
    lines = [
        "stateDiagram-v2",
        "    %% Generated from backhaul.core.transition.TABLE; do not edit.",
        "    [*] --> SUSPENDED",
    ]
    for (source, target), labels in edges.items():
        lines.append(f"    {source.name} --> {target.name} : {'<br/>'.join(labels)}")
    for state in sorted(FINAL_STATES, key=lambda s: s.value):
        lines.append(f"    {state.name} --> [*]")
    return "\n".join(lines) + "\n"


def decisions_markdown() -> str:
    """Each ``DECISIONS`` cell, the state it leads to, and the reason recorded in code."""
    order = {(state, trigger): i for i, (state, trigger, _) in enumerate(cells())}
    keys = sorted(DECISIONS, key=lambda key: order.get(key, len(order)))
    lines = [
        "## Decided cells",
        "",
        GENERATED_NOTE.replace("TABLE", "DECISIONS"),
        "",
    ]
    for state, trigger in keys:
        rule = TABLE[state].get(trigger)
        outcome = _choices_text(rule) if rule is not None else "no such cell"
        lines.append(
            f"- **{state.name} / `{trigger.value}`** ({outcome}): {DECISIONS[state, trigger]}"
        )
    return "\n".join(lines) + "\n"
