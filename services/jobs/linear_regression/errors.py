"""Typed errors of the linear-regression job.

`JobDataError` and its subclasses are problems with a data owner's input; each message names the file, the column
and, where it applies, the first bad row (rows count from 1, the header row not counted), and says what to fix.
`ProtocolError` is a failure of the protocol run itself (a party misbehaving, or the parties disagreeing).
"""
from __future__ import annotations

from collections.abc import Sequence

# One class for the engine and the job: a caller catches `ProtocolError` whichever layer raised it.
from services.mpc.errors import ProtocolError

_MAX_SHOWN_COLUMNS = 20
PATH_HINT = "check the path (a local path, a file:// uri, or a dataview's uri)"


def shown_columns(columns: Sequence[str]) -> str:
    """Return a short, readable list of column names."""
    names = ", ".join(repr(c) for c in columns[:_MAX_SHOWN_COLUMNS])
    if len(columns) > _MAX_SHOWN_COLUMNS:
        names += f", ... ({len(columns)} in all)"
    return names or "none"


class JobDataError(ValueError):
    """A data owner's input cannot be used for the job; the message says what and where."""


class MissingFileError(JobDataError):
    """The data file does not exist or cannot be read."""

    def __init__(self, file: str, reason: str = "no such file", hint: str | None = PATH_HINT) -> None:
        self.file = file
        super().__init__(f"{file}: {reason}" + (f"; {hint}" if hint else ""))


class UnreadableDataError(JobDataError):
    """The file exists but is not a CSV with a header row or a Parquet file."""

    def __init__(self, file: str, reason: str) -> None:
        self.file = file
        super().__init__(f"{file}: {reason}")


def separator_hint(header: Sequence[str]) -> str:
    """A hint for a header read as one column holding ';' (a spreadsheet's export in some locales), else ''."""
    if len(header) == 1 and ";" in header[0]:
        return " (the header is one column holding ';': only ',' separates columns; export the file with commas)"
    return ""


class MissingColumnError(JobDataError):
    """A requested column is not in the file."""

    def __init__(self, file: str, column: str, available: Sequence[str]) -> None:
        self.file, self.column, self.available = file, column, list(available)
        super().__init__(f"{file}: no column {column!r}; the file has {shown_columns(self.available)}"
                         f"{separator_hint(self.available)}")

    def for_other_parties(self) -> str:
        """The message without the file's other column names: a job's error reaches every member of the project,
        and a file's header is its owner's (a column name can say what the data is about). Only a name that differs
        from the asked one by case is offered, the usual slip."""
        alike = [name for name in self.available if name.lower() == self.column.lower()]
        hint = f"; did you mean {shown_columns(alike)}?" if alike else ""
        return (f"{self.file}: no column {self.column!r} (the file has {len(self.available)} columns: the data "
                f"owner's worker log names them){hint}")


class NonNumericError(JobDataError):
    """A cell is empty or not a number."""

    def __init__(self, file: str, column: str, row: int, value: str | None) -> None:
        self.file, self.column, self.row = file, column, row
        # The cell's text is not quoted: job errors travel to the coordinator and the logs, where no data value may go.
        what = "the value is empty" if value is None or value.strip() == "" else "the value is not a number"
        super().__init__(f"{file}: column {column!r} row {row}: {what}{separator_hint([column])}")


class NonFiniteError(JobDataError):
    """A cell is NaN or infinite."""

    def __init__(self, file: str, column: str, row: int, value: float) -> None:
        self.file, self.column, self.row = file, column, row
        what = "NaN (not a number)" if value != value else "infinite (or beyond the float64 range)"
        super().__init__(f"{file}: column {column!r} row {row}: the value is {what}; every value must be a finite number")


class ValueRangeError(JobDataError):
    """A column's magnitude is outside the range the secure computation's internal scaling handles."""

    def __init__(self, file: str, column: str, row: int | None, limit: float) -> None:
        self.file, self.column, self.row = file, column, row
        if row is not None:
            where, what = f"column {column!r} row {row}", f"the value's magnitude is above {limit:g}"
        else:
            where, what = f"column {column!r}", f"every value's magnitude is below {limit:g} (but not all are 0)"
        super().__init__(
            f"{file}: {where}: {what}, outside the secure computation's fixed-point range even after its internal "
            "scaling; rescale the column (e.g. to other units)"
        )


class RowCountMismatchError(JobDataError):
    """The x data and the y data have different numbers of rows."""

    def __init__(self, x_file: str, x_rows: int, y_file: str, y_rows: int) -> None:
        self.x_rows, self.y_rows = x_rows, y_rows
        super().__init__(
            f"{x_file} has {x_rows} rows but {y_file} has {y_rows}; the x and y data must have the same rows, "
            "in the same order"
        )


class TooFewRowsError(JobDataError):
    """Fewer rows than the number of weights to fit."""

    def __init__(self, file: str, rows: int, columns: int) -> None:
        self.file, self.rows, self.columns = file, rows, columns
        super().__init__(
            f"{file}: {rows} rows for {columns} x columns; a fit needs at least {columns + 1} rows "
            "(one more than the number of x columns, for the intercept)"
        )


class SingularDataError(JobDataError):
    """The x columns (with the intercept) are constant or collinear, so XᵀX is singular."""

    def __init__(self, file: str, problem: str) -> None:
        self.file = file
        super().__init__(f"{file}: {problem}; drop or replace those columns, the weights are not determined")


class ConstantTargetColumnError(JobDataError):
    """The y column does not vary, so there is nothing to fit."""

    def __init__(self, file: str, column: str) -> None:
        self.file, self.column = file, column
        super().__init__(
            f"{file}: column {column!r} is constant (all its values are equal); a regression needs a target that varies"
        )


class RowCountsDiffer(ProtocolError):
    """Raised by the protocol when the row counts exchanged by the x-owner and the y-owner differ."""

    def __init__(self, x_rows: int, y_rows: int) -> None:
        self.x_rows, self.y_rows = x_rows, y_rows
        super().__init__(f"the x data has {x_rows} rows but the y data has {y_rows}")
