"""How the CLI prints: aligned tables for people, ``--json`` for scripts, and the shared context."""
from __future__ import annotations

import json
from typing import Any, Callable, Sequence

import click

from services.client.sdk import Cape

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


class CliContext:
    """Builds the SDK client on first use, so `cape --help` needs no configuration."""

    def __init__(self) -> None:
        self._cape: Cape | None = None

    def cape(self) -> Cape:
        if self._cape is None:
            self._cape = Cape()
        return self._cape


pass_cli = click.make_pass_decorator(CliContext, ensure=True)


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True, default=_jsonable))


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, Callable[[dict[str, Any]], Any]]],
                empty: str) -> None:
    """Left-aligned columns with a header; ``empty`` when there is no row."""
    if not rows:
        click.echo(empty)
        return
    header = [title for title, _ in columns]
    cells = [[_text(get(row)) for _, get in columns] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    for line in [header, *cells]:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())


def print_fields(pairs: Sequence[tuple[str, Any]]) -> None:
    """``key: value`` lines, keys aligned."""
    width = max(len(k) for k, _ in pairs)
    for key, value in pairs:
        click.echo(f"{key + ':':<{width + 1}} {_text(value)}")


def org_label(ref: dict[str, Any] | None) -> str:
    if not ref:
        return "-"
    return ref.get("label") or ref.get("id") or "-"


def _text(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_text(v) for v in value) or "-"
    return str(value)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot print {type(value).__name__} as JSON")
