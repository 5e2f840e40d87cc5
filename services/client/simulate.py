"""`cape simulate`: run a job's three parties on one machine, on local files, before involving other organizations."""
from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from services.client.columns import split_columns
from services.client.tasks import dashes_for_underscores
from services.jobs.linear_regression import JobDataError, ProtocolError, simulate as simulate_job
from services.jobs.linear_regression.data import local_path, read_columns
from services.jobs.linear_regression.errors import shown_columns

EXIT_DATA_ERROR = 1
EXIT_USAGE = 2


class _OneLineUsage(click.Command):
    """Reports a usage mistake as one `error: ...` line (exit 2) instead of click's usage block."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            click.echo(f"error: {exc.format_message().rstrip('.')}; see --help", err=True)
            ctx.exit(EXIT_USAGE)


def split_spec(spec: str) -> tuple[str, list[str]]:
    """Split `PATH[:COL,...]` into the path and the columns (none given: empty list).

    A `:` followed by text without `/` starts the column list, so `file:///data/x.csv` is a path;
    a spec naming an existing file is always a path.
    """
    if os.path.exists(_path_of(spec)):
        return spec, []
    path, sep, cols = spec.rpartition(":")
    if not sep or not path or "/" in cols:
        return spec, []
    columns = split_columns(cols, repr(spec))
    if any(not c for c in columns):
        raise click.UsageError(f"{spec!r}: empty column name; write PATH:COL1,COL2")
    return path, columns


def _path_of(spec: str) -> str:
    try:
        return local_path(spec)
    except JobDataError:
        return spec


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(_path_of(a), _path_of(b))
    except OSError:
        return False


def _resolve_columns(x_spec: str, y_spec: str) -> tuple[str, list[str], str, str]:
    """Apply the defaults: y = the y file's first column; x = every column of the x file except y (same file)."""
    x_path, x_columns = split_spec(x_spec)
    y_path, y_columns = split_spec(y_spec)
    if len(y_columns) > 1:
        raise click.UsageError(f"--y takes one column, got {len(y_columns)}: {', '.join(y_columns)}")
    if y_columns:
        y_column = y_columns[0]
    else:
        y_file_columns = read_columns(y_path)
        if not y_file_columns:
            raise JobDataError(f"{y_path}: the file has no columns")
        y_column = y_file_columns[0]
    if not x_columns:
        x_columns = read_columns(x_path)
        if _same_file(x_path, y_path):
            x_columns = [c for c in x_columns if c != y_column]
        if not x_columns:
            raise JobDataError(f"{x_path}: no x columns left once the y column {y_column!r} is set aside")
        unnamed = [i + 1 for i, c in enumerate(read_columns(x_path)) if not c.strip() and c in x_columns]
        if unnamed:  # its weight would print without a name
            raise JobDataError(f"{x_path}: the header leaves column {unnamed[0]} without a name; name every column, "
                               "or give the x columns (--x FILE:COL,...)")
        repeated = _repeated(x_columns)
        if repeated:  # the names came from the file: the data's mistake (exit 1), not the command line's
            raise JobDataError(f"{x_path}: the file names {shown_columns(repeated)} more than once; "
                               "give each column its own name")
    elif _same_file(x_path, y_path) and y_column in x_columns:
        raise click.UsageError(f"column {y_column!r} is both an x column and the y column")
    repeated = _repeated(x_columns)
    if repeated:
        raise click.UsageError(f"x columns named more than once: {', '.join(repeated)}")
    return x_path, x_columns, y_path, y_column


def _repeated(columns: list[str]) -> list[str]:
    return sorted({c for c in columns if columns.count(c) > 1})


@click.group(context_settings={"token_normalize_func": dashes_for_underscores})
def simulate() -> None:
    """Run a job's three parties on this machine, on local files, with the real protocol."""


@simulate.command("linear-regression", cls=_OneLineUsage)
@click.option("--x", "x_spec", required=True, metavar="PATH[:COL,...]",
              help="x data (CSV with a header row, or Parquet; a path or file:// uri) and its columns, in order. "
                   "Without columns: every column of the file except the y column (when x and y are one file); "
                   "quote a column whose name holds a comma: 'x.csv:\"a,b\",c'.")
@click.option("--y", "y_spec", required=True, metavar="PATH[:COL]",
              help="y data and its column. Without a column: the file's first column.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def linear_regression(x_spec: str, y_spec: str, as_json: bool) -> None:
    """Fit y on x by the secure 3-party protocol, and compare with a plaintext fit of the same files.

    Prints the weights (intercept first), the metrics mse_result and r_squared_result, and the largest difference
    from numpy's plaintext least squares. Rows in error messages count from 1, the header row not counted.
    """
    try:
        x_path, x_columns, y_path, y_column = _resolve_columns(x_spec, y_spec)
        report = simulate_job(x_path, x_columns, y_path, y_column)
    except click.UsageError as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(EXIT_USAGE)
    except (JobDataError, ProtocolError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_DATA_ERROR)
    if as_json:
        click.echo(json.dumps(report.to_json()))
    else:
        click.echo(_as_text(report.to_json()))


def _as_text(doc: dict[str, Any]) -> str:
    names = doc["names"]
    width = max(len(n) for n in names + ["r_squared_result"]) + 2
    lines = ["weights (secure fit; plaintext fit):"]
    for name, w, p in zip(names, doc["weights"], doc["plaintext_weights"]):
        lines.append(f"  {name:<{width}}{w:>20.12g}  {p:>20.12g}")
    lines.append("metrics (secure fit; plaintext fit):")
    for key, value in doc["metrics"].items():
        lines.append(f"  {key:<{width}}{value:>20.12g}  {doc['plaintext_metrics'][key]:>20.12g}")
    lines.append(f"largest weight difference from the plaintext fit: {doc['max_abs_error']:.3g}")
    seconds = ", ".join(f"{k} {v:.3f}" for k, v in doc["seconds"].items())
    lines.append(f"seconds: {seconds}")
    lines.append("bytes sent: " + ", ".join(f"{seat} {b:,}" for seat, b in doc["bytes_sent"].items()))
    lines.append("rounds: " + ", ".join(f"{seat} {r}" for seat, r in doc["rounds"].items()))
    return "\n".join(lines)


if __name__ == "__main__":  # python -m services.client.simulate linear-regression ...
    simulate(prog_name="cape simulate")
