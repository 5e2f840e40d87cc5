"""What the protocol does with data it cannot fit: every party stops promptly with a typed error."""
from __future__ import annotations

import time

import numpy as np
import pytest

from services.jobs.linear_regression.errors import ProtocolError, RowCountsDiffer
from services.jobs.linear_regression.protocol import ConstantTargetError
from services.jobs.linear_regression.task import LinearRegressionTask
from tests.support.mpc_parties import run_protocol

TASK = LinearRegressionTask(("a", "b", "c"), "target", "model_owner")
RNG = np.random.default_rng(7)


def run(x: np.ndarray, y: np.ndarray) -> list:
    started = time.monotonic()
    results, _ = run_protocol(TASK, x, y, catch=True)
    assert time.monotonic() - started < 5.0, "a failing run must end promptly, not at a transport timeout"
    return results


def test_row_counts_that_differ_stop_all_three_parties() -> None:
    results = run(RNG.standard_normal((30, 3)), RNG.standard_normal(29))
    for error in results:
        assert isinstance(error, RowCountsDiffer)
        assert (error.x_rows, error.y_rows) == (30, 29)
        assert "30 rows" in str(error) and "29" in str(error)


@pytest.mark.parametrize("problem", ["constant", "collinear"])
def test_singular_x_stops_the_x_owner_with_linalg_error_and_the_others_with_a_reason(problem: str) -> None:
    x = RNG.standard_normal((40, 3))
    if problem == "constant":
        x[:, 1] = 5.0
    else:
        x[:, 2] = 2 * x[:, 0] - x[:, 1] + 1.0
    results = run(x, RNG.standard_normal(40))
    assert isinstance(results[0], np.linalg.LinAlgError)
    for error in results[1:]:
        assert isinstance(error, ProtocolError)
        assert "x_owner stopped the job" in str(error) and "constant or collinear" in str(error)


def test_constant_y_names_the_column_at_the_y_owner() -> None:
    results = run(RNG.standard_normal((40, 3)), np.full(40, 3.25))
    assert isinstance(results[1], ConstantTargetError)
    assert "'target'" in str(results[1]) and "constant" in str(results[1])
    assert "3.25" not in str(results[1])  # no data value in a message
    for index in (0, 2):
        assert isinstance(results[index], ProtocolError) and "y_owner stopped the job" in str(results[index])


def test_messages_carry_no_data_values() -> None:
    x = RNG.standard_normal((40, 3))
    x[:, 0] = 1234.5678
    results = run(x, RNG.standard_normal(40))
    for error in results:
        assert "1234" not in str(error)
