"""Checks of loaded data before the protocol, the task's own checks, and the singular-XᵀX diagnosis."""
from __future__ import annotations

import numpy as np
import pytest

from services.jobs.linear_regression import (
    JobDataError,
    LinearRegressionTask,
    NonFiniteError,
    SingularDataError,
    TooFewRowsError,
    ValueRangeError,
)
from services.jobs.linear_regression.validation import MAX_ABS_VALUE, check_x, check_y, diagnose_singular


def test_task_fields_and_checks() -> None:
    task = LinearRegressionTask(["a", "b"], "y", "y_owner")
    assert task.x_columns == ("a", "b") and task.d == 2 and task.output_party == 1
    assert LinearRegressionTask(["a"], "y", "helper").output_party == 2
    with pytest.raises(ValueError, match="outputs_to must be one of"):
        LinearRegressionTask(["a"], "y", "nobody")
    with pytest.raises(ValueError, match="repeat a name"):
        LinearRegressionTask(["a", "a"], "y")
    with pytest.raises(ValueError, match="at least one x column"):
        LinearRegressionTask([], "y")


def test_too_few_rows() -> None:
    x = np.arange(6.0).reshape(3, 2)
    with pytest.raises(TooFewRowsError) as caught:
        check_x(x[:2], ["a", "b"], "x.csv")
    assert str(caught.value) == (
        "x.csv: 2 rows for 2 x columns; a fit needs at least 3 rows (one more than the number of x columns, "
        "for the intercept)"
    )
    check_x(x, ["a", "b"], "x.csv")
    with pytest.raises(TooFewRowsError, match=r"^y.csv: 2 rows for 2 x columns"):
        check_y(np.ones(2), "t", 2, "y.csv")


def test_non_finite_and_out_of_range_name_the_first_bad_row() -> None:
    x = np.ones((200_000, 3))
    x[150_000, 2] = np.nan
    x[170_000, 0] = np.inf
    with pytest.raises(NonFiniteError, match=r"^x.csv: column 'c' row 150001: the value is NaN"):
        check_x(x, ["a", "b", "c"], "x.csv")
    y = np.ones(10)
    y[4] = -2 * MAX_ABS_VALUE
    with pytest.raises(ValueRangeError) as caught:
        check_y(y, "t", 1, "y.csv")
    assert str(caught.value).startswith("y.csv: column 't' row 5: the value's magnitude is above 1e+100")
    with pytest.raises(ValueRangeError, match=r"^x.csv: column 'b': every value's magnitude is below 1e-100"):
        check_x(np.array([[1.0, 0.0], [2.0, 3e-101], [3.0, 0.0]]), ["a", "b"], "x.csv")
    check_x(np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 1e-99]]), ["a", "b"], "x.csv")  # small but in range


def test_wrong_shape() -> None:
    with pytest.raises(JobDataError, match=r"expected an n×2 array for columns \['a', 'b'\], got shape \(4, 3\)"):
        check_x(np.ones((4, 3)), ["a", "b"], "x.csv")


def test_diagnosis_names_constant_then_collinear_columns() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((100, 4))
    x[:, 2] = 5.0
    error = diagnose_singular(x, ["a", "b", "c", "d"], "x.csv")
    assert isinstance(error, SingularDataError)
    assert str(error) == (
        "x.csv: column 'c' is constant (the intercept already fits a constant); drop or replace those columns, "
        "the weights are not determined"
    )
    x[:, 2] = 2 * x[:, 0] - x[:, 3] + 1
    assert str(diagnose_singular(x, ["a", "b", "c", "d"], "x.csv")).startswith(
        "x.csv: columns 'a', 'c', 'd' are collinear"
    )
