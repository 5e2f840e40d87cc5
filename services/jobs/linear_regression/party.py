"""One party's run of the job: validate the owner's data, run the protocol, turn its failures into user messages."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from . import protocol
from .errors import (
    ConstantTargetColumnError,
    ProtocolError,
    RowCountMismatchError,
    RowCountsDiffer,
)
from .task import X_OWNER, Y_OWNER, LinearRegressionResult, LinearRegressionTask
from .validation import check_x, check_y, diagnose_singular


def run_party(
    index: int,
    task: LinearRegressionTask,
    data: np.ndarray | None,
    transport: Any,
    seeds: Any,
    progress: Callable[..., None] | None = None,
    *,
    data_name: str | None = None,
    other_name: str | None = None,
) -> LinearRegressionResult | None:
    """Run party `index` (0 x_owner, 1 y_owner, 2 third seat); return the result at the output party, else None.

    `data` is the x matrix at party 0, the y vector at party 1, None at party 2. `data_name` (the file or dataview)
    and `other_name` (the other owner's, when known) only make error messages precise.
    Raises a `JobDataError` for bad data (this party's, or a row-count mismatch) and `ProtocolError` otherwise.
    """
    if index not in (0, 1, 2):
        raise ValueError(f"party index must be 0, 1 or 2, not {index!r}")
    name = data_name or ("the x data" if index == X_OWNER else "the y data")
    if index == X_OWNER:
        check_x(data, task.x_columns, name)  # type: ignore[arg-type]
    elif index == Y_OWNER:
        check_y(data, task.y_column, task.d, name)  # type: ignore[arg-type]
    elif data is not None:
        raise ValueError("the third seat holds no data; pass data=None")

    try:
        return protocol.run_party(index, task, data, transport, seeds, progress)
    except RowCountsDiffer as exc:
        x_name = name if index == X_OWNER else (other_name or "the x data")
        y_name = name if index == Y_OWNER else (other_name or "the y data")
        raise RowCountMismatchError(x_name, exc.x_rows, y_name, exc.y_rows) from None
    except protocol.ConstantTargetError:
        raise ConstantTargetColumnError(name, task.y_column) from None
    except np.linalg.LinAlgError:
        if index == X_OWNER:
            raise diagnose_singular(data, task.x_columns, name) from None  # type: ignore[arg-type]
        raise ProtocolError("the secure computation hit a singular matrix") from None
