"""Checks of a data owner's loaded columns before the protocol runs, and the diagnosis of a singular XᵀX."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import (
    JobDataError,
    NonFiniteError,
    SingularDataError,
    TooFewRowsError,
    ValueRangeError,
    shown_columns,
)

# Largest magnitude accepted in any column. The protocol scales each column internally, so the fixed-point range
# is not the limit; this bound keeps xᵢ², Σxᵢ² and XᵀX far from float64 overflow (1e300) after scaling and summing
# over up to 10^9 rows. Users with larger values should change units.
MAX_ABS_VALUE = 1e100
# A column whose largest magnitude is below this would underflow once squared (1e-200 and below lose precision).
MIN_ABS_VALUE = 1e-100


def check_x(x: np.ndarray, columns: Sequence[str], name: str) -> None:
    """Raise a `JobDataError` unless `x` is an n×d finite float array with n ≥ d + 1 and values in range."""
    if not isinstance(x, np.ndarray) or x.ndim != 2 or x.shape[1] != len(columns):
        shape = getattr(x, "shape", None)
        raise JobDataError(f"{name}: expected an n×{len(columns)} array for columns {list(columns)}, got shape {shape}")
    _check_values(x, list(columns), name)
    if x.shape[0] < len(columns) + 1:
        raise TooFewRowsError(name, x.shape[0], len(columns))


def check_y(y: np.ndarray, column: str, d: int, name: str) -> None:
    """Raise a `JobDataError` unless `y` is a finite float vector with at least d + 1 values in range."""
    if not isinstance(y, np.ndarray) or y.ndim != 1:
        raise JobDataError(f"{name}: expected a vector for column {column!r}, got shape {getattr(y, 'shape', None)}")
    _check_values(y[:, None], [column], name)
    if y.shape[0] < d + 1:
        raise TooFewRowsError(name, y.shape[0], d)


def _check_values(a: np.ndarray, columns: list[str], name: str) -> None:
    # Column-wise min and max allocate nothing of the data's size (the job's memory bound counts), and NaN
    # propagates through both, so one pass answers "all finite and in range?".
    if a.shape[0] == 0:
        return
    low, high = a.min(axis=0), a.max(axis=0)
    largest = np.maximum(-low, high)
    if np.all(largest <= MAX_ABS_VALUE):
        tiny = (largest < MIN_ABS_VALUE) & (largest > 0)
        if tiny.any():
            raise ValueRangeError(name, columns[int(np.argmax(tiny))], None, MIN_ABS_VALUE)
        return
    for row in range(0, a.shape[0], 65536):  # the error path: find the first bad row block by block
        block = a[row : row + 65536]
        ok = np.abs(block) <= MAX_ABS_VALUE  # NaN compares False
        if not ok.all():
            r = int(np.argmax(~ok.all(axis=1)))
            j = int(np.argmax(~ok[r]))
            value = float(block[r, j])
            if not np.isfinite(value):
                raise NonFiniteError(name, columns[j], row + r + 1, value)
            raise ValueRangeError(name, columns[j], row + r + 1, MAX_ABS_VALUE)


def diagnose_singular(x: np.ndarray, columns: Sequence[str], name: str) -> SingularDataError:
    """Name the constant columns, or a set of collinear columns, that make X_bᵀX_b singular."""
    columns = list(columns)
    constant = [c for c, spread in zip(columns, np.ptp(x, axis=0)) if spread == 0]
    if constant:
        which = "column " + shown_columns(constant) if len(constant) == 1 else "columns " + shown_columns(constant)
        verb = "is" if len(constant) == 1 else "are"
        return SingularDataError(name, f"{which} {verb} constant (the intercept already fits a constant)")
    # Centre and scale so the eigenvector of the smallest eigenvalue shows which columns combine to ~0.
    centred = x - x.mean(axis=0)
    scaled = centred / np.linalg.norm(centred, axis=0)
    eigenvalues, eigenvectors = np.linalg.eigh(scaled.T @ scaled)
    weights = np.abs(eigenvectors[:, 0])
    involved = [c for c, w in zip(columns, weights) if w > 1e-3 * weights.max()]
    return SingularDataError(
        name,
        f"columns {shown_columns(involved)} are collinear (one is, or nearly is, a linear combination of the others "
        "and the intercept)",
    )

