"""Aligned text tables for the command lines (`cape`, `cape-server admin`): what people read; --json is for scripts."""
from __future__ import annotations

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
    """A value as a table cell: `-` for nothing, floats to 6 significant digits, lists joined by commas."""
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(cell_text(v) for v in value) or "-"
    return str(value)
