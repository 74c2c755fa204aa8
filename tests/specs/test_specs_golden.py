"""The spec files in specs/ are the code's own renderings, and the prose covers every cell.

- state-table.md, state-table.csv and state-diagram.mmd equal the output of
  backhaul.core.diagram exactly (regenerate with tests/specs/regen.py);
- the ```mermaid block of state-machine.md equals diagram.mermaid();
- state-machine.md has one ``<!-- cell: STATE/trigger -->`` marker per cell of TABLE, under
  the ``### STATE`` heading, followed by prose naming the trigger and citing bits-core.md;
- it has one ``<!-- decided: STATE/trigger -->`` marker per DECISIONS entry, under
  ``## Decided cells``; and every DECISIONS key is a real cell of TABLE.
"""

from __future__ import annotations

import csv
import io
import re

import pytest
import regen  # tests/specs/regen.py (pytest puts this directory on sys.path)

from backhaul.core import diagram
from backhaul.core.transition import DECISIONS, FINAL_STATES, TABLE, Trigger
from backhaul.core.vocabulary import JobState

REGEN = "run `.venv/bin/python tests/specs/regen.py` and commit the result"
CELL_MARKER = re.compile(r"^<!-- cell: (?P<state>\w+)/(?P<trigger>\w+) -->$", re.MULTILINE)
DECIDED_MARKER = re.compile(r"^<!-- decided: (?P<state>\w+)/(?P<trigger>\w+) -->$", re.MULTILINE)
HEADING = re.compile(r"^(?P<level>#{1,6}) (?P<title>.+)$", re.MULTILINE)

Cell = tuple[JobState, Trigger]
TABLE_CELLS: set[Cell] = {(state, trigger) for state, row in TABLE.items() for trigger in row}


def prose() -> str:
    return regen.PROSE.read_text(encoding="utf-8")


def section_of(text: str, offset: int) -> list[str]:
    """The headings enclosing ``offset``, outermost first (e.g. ['...', 'Transitions...'])."""
    stack: list[tuple[int, str]] = []
    for match in HEADING.finditer(text, 0, offset):
        level = len(match["level"])
        stack = [(lvl, title) for lvl, title in stack if lvl < level]
        stack.append((level, match["title"].strip()))
    return [title for _, title in stack]


def markers(pattern: re.Pattern[str], text: str) -> list[tuple[Cell, int]]:
    found = []
    for match in pattern.finditer(text):
        cell = (JobState[match["state"]], Trigger(match["trigger"]))
        found.append((cell, match.end()))
    return found


# -- generated files --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(regen.GENERATED))
def test_generated_spec_file_equals_what_the_code_renders(name: str) -> None:
    path = regen.SPECS / name
    assert path.is_file(), f"specs/{name} is missing: {REGEN}"
    assert path.read_text(encoding="utf-8") == regen.GENERATED[name](), (
        f"specs/{name} is out of date with core/transition.py: {REGEN}"
    )


def test_the_mermaid_block_of_the_prose_spec_equals_the_generated_diagram() -> None:
    blocks = regen.mermaid_blocks(prose())
    assert len(blocks) == 1, "state-machine.md must hold exactly one ```mermaid block"
    assert blocks[0] == diagram.mermaid(), f"the diagram in state-machine.md is stale: {REGEN}"


def test_regen_check_reports_nothing_stale() -> None:
    assert regen.stale() == [], REGEN


# -- the renderings themselves ------------------------------------------------------------


def test_the_markdown_table_has_one_row_per_cell_in_state_then_trigger_order() -> None:
    rows = [line for line in diagram.table_markdown().splitlines() if line.startswith("| ")]
    body = rows[1:]  # the first row is the header
    cells = [(JobState[r.split(" | ")[0][2:]], Trigger(r.split(" | ")[1].strip("`"))) for r in body]
    assert set(cells) == TABLE_CELLS
    assert len(cells) == len(TABLE_CELLS)
    order = list(Trigger)
    assert cells == sorted(cells, key=lambda c: (c[0].value, order.index(c[1])))


def test_the_csv_has_a_header_and_one_row_per_cell_with_the_rule_data() -> None:
    rows = list(csv.reader(io.StringIO(diagram.table_csv())))
    assert tuple(rows[0]) == diagram.CSV_COLUMNS
    seen = set()
    for src, trig, guards, targets, refusal, decided in rows[1:]:
        cell = (JobState[src], Trigger(trig))
        rule = TABLE[cell[0]][cell[1]]
        assert guards.split(";") == [g.name for g, _ in rule.choices]
        assert targets.split(";") == [t.name for _, t in rule.choices]
        assert refusal == (diagram.refusal_name(rule) or "")
        assert decided == ("yes" if cell in DECISIONS else "no")
        seen.add(cell)
    assert seen == TABLE_CELLS
    assert len(rows) == len(TABLE_CELLS) + 1


def test_the_mermaid_diagram_has_an_edge_for_every_choice_and_ends_in_the_final_states() -> None:
    text = diagram.mermaid()
    assert text.startswith("stateDiagram-v2\n")
    assert "    [*] --> SUSPENDED\n" in text
    for state in FINAL_STATES:
        assert f"    {state.name} --> [*]\n" in text
    edges = {}
    for line in text.splitlines():
        match = re.fullmatch(r"    (\w+) --> (\w+) : (.+)", line)
        if match:
            pair = (match[1], match[2])
            assert pair not in edges, f"parallel edges {pair} must be merged"
            edges[pair] = match[3].split("<br/>")
    for state, trigger in TABLE_CELLS:
        for _, target in TABLE[state][trigger].choices:
            labels = edges[state.name, target.name]
            assert any(label.split(" [")[0] == trigger.value for label in labels)


def test_the_renderings_are_deterministic() -> None:
    for render in (
        diagram.table_markdown,
        diagram.table_csv,
        diagram.mermaid,
        diagram.decisions_markdown,
    ):
        assert render() == render()


# -- the prose spec covers the table ----------------------------------------------------------


def test_every_decision_is_a_real_cell_of_the_table() -> None:
    assert set(DECISIONS) <= TABLE_CELLS, set(DECISIONS) - TABLE_CELLS


def test_the_prose_spec_has_one_cell_marker_per_table_cell() -> None:
    found = [cell for cell, _ in markers(CELL_MARKER, prose())]
    duplicates = {c for c in found if found.count(c) > 1}
    assert not duplicates, f"cells described twice: {duplicates}"
    assert set(found) == TABLE_CELLS, (
        f"no prose for {TABLE_CELLS - set(found)}; prose for non-cells {set(found) - TABLE_CELLS}"
    )


def test_each_cell_marker_sits_under_its_state_heading_and_names_and_cites_the_trigger() -> None:
    text = prose()
    for (state, trigger), end in markers(CELL_MARKER, text):
        sections = section_of(text, end)
        assert sections[-2:] == ["Transitions by state", state.name], (state, trigger, sections)
        paragraph = " ".join(text[end:].strip().split("\n\n", 1)[0].split())
        assert paragraph.startswith(f"- `{trigger.value}`"), (state, trigger, paragraph[:60])
        assert "bits-core.md §" in paragraph, f"{state.name}/{trigger.value} cites no section"


def test_every_state_has_a_heading_in_the_prose_spec() -> None:
    text = prose()
    headings = {
        m["title"].strip()
        for m in HEADING.finditer(text)
        if section_of(text, m.end())[-2:-1] == ["Transitions by state"]
    }
    assert headings == {state.name for state in JobState}


def test_the_prose_spec_explains_every_decided_cell_in_its_section() -> None:
    text = prose()
    found = markers(DECIDED_MARKER, text)
    cells = [c for c, _ in found]
    assert len(cells) == len(set(cells)), "a decided cell is explained twice"
    assert set(cells) == set(DECISIONS), "one decided marker per DECISIONS key"
    for (state, trigger), end in found:
        assert section_of(text, end)[-1] == "Decided cells", (state, trigger)
        paragraph = text[end:].strip().split("\n\n", 1)[0]
        assert f"**{state.name} / `{trigger.value}`" in paragraph


def test_the_prose_spec_settles_the_unconfirmed_item_4_of_bits_core() -> None:
    decided = prose().split("## Decided cells", 1)[1]
    assert "§21 item 4" in decided
    for cell in [
        (JobState.TRANSFERRED, Trigger.SUSPEND),
        (JobState.TRANSFERRED, Trigger.RESUME),
        (JobState.ERROR, Trigger.SUSPEND),
    ]:
        assert cell in DECISIONS
