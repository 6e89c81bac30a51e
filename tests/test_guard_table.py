"""The README's guard table is the code's guard lists: names, order, modes, execution.

Which decision modes each guard looks at is data on the guard objects
(``ia.decisions.guards.builtin``); the README states it for operators.  This
keeps the two from drifting apart.
"""

from __future__ import annotations

import re
from pathlib import Path

from ia.decisions.guards import DECISION_GUARDS, EXECUTION_GUARDS
from ia.schemas.models import Mode

README = Path(__file__).resolve().parents[1] / "README.md"
HEADER = "| guard | modes | at execution |"


def guard_table() -> list[dict[str, str]]:
    """The rows of the README table that starts with :data:`HEADER`, by column name."""
    lines = README.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(HEADER))
    columns = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(columns, (c.strip() for c in line.strip("|").split("|")),
                             strict=True)))
    return rows


def ticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def test_the_table_lists_the_decision_guards_in_order() -> None:
    assert [ticked(r["guard"]) for r in guard_table()] == [[g.name] for g in DECISION_GUARDS]


def test_the_table_states_each_guards_modes() -> None:
    for row in guard_table():
        (name,) = ticked(row["guard"])
        guard = next(g for g in DECISION_GUARDS if g.name == name)
        assert {Mode(m) for m in ticked(row["modes"])} == guard.modes, name


def test_the_table_marks_the_execution_guards() -> None:
    again = [ticked(r["guard"])[0] for r in guard_table() if r["at execution"] == "yes"]
    assert {r["at execution"] for r in guard_table()} == {"yes", "no"}
    assert again == [g.name for g in EXECUTION_GUARDS]
