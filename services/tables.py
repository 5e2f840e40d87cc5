"""Aligned text tables for the command lines (`cape`, `cape-server admin`): what people read; --json is for scripts."""
from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import click


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, Callable[[dict[str, Any]], Any]]],
                empty: str) -> None:
    """Left-aligned columns with a header; ``empty`` when there is no row."""
    if not rows:
        click.echo(empty)
        return
    header = [title for title, _ in columns]
    cells = [[cell_text(get(row)) for _, get in columns] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    for line in [header, *cells]:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())


def cell_text(value: Any) -> str:
    """A value as a table cell: `-` for nothing, floats to 6 significant digits, lists joined by commas; control
    characters escaped (text stored before the coordinator refused them must not move the cursor or write to the
    terminal)."""
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):  # an item holding a comma is quoted, as the CLI takes it back
        return ", ".join(_quoted(cell_text(v)) if "," in str(v) else cell_text(v) for v in value) or "-"
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], str(value))


def _quoted(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'


# C0 and C1 controls, line and paragraph separators, bidirectional overrides and isolates.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
