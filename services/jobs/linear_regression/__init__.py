"""Vertically partitioned linear regression: the x-owner holds X, the y-owner y, one seat learns the weights.

The façade of the job: `run_party` validates a party's data and runs its part of the 3-party protocol
(`protocol.py`); `simulate` runs all three parties in one process; `load_x`/`load_y` read an owner's columns.
"""
from .data import load_x, load_y, read_columns
from .errors import (
    ConstantTargetColumnError,
    JobDataError,
    MissingColumnError,
    MissingFileError,
    NonFiniteError,
    NonNumericError,
    ProtocolError,
    RowCountMismatchError,
    RowCountsDiffer,
    SingularDataError,
    TooFewRowsError,
    UnreadableDataError,
    ValueRangeError,
)
from .party import run_party
from .simulation import SimulationReport, plaintext_fit, simulate, simulate_arrays
from .task import LinearRegressionResult, LinearRegressionTask

__all__ = [
    "ConstantTargetColumnError",
    "JobDataError",
    "LinearRegressionResult",
    "LinearRegressionTask",
    "MissingColumnError",
    "MissingFileError",
    "NonFiniteError",
    "NonNumericError",
    "ProtocolError",
    "RowCountMismatchError",
    "RowCountsDiffer",
    "SimulationReport",
    "SingularDataError",
    "TooFewRowsError",
    "UnreadableDataError",
    "ValueRangeError",
    "load_x",
    "load_y",
    "plaintext_fit",
    "read_columns",
    "run_party",
    "simulate",
    "simulate_arrays",
]
