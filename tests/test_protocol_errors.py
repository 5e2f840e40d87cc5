"""What the protocol does with data it cannot fit: every party stops promptly with a typed error."""
from __future__ import annotations

import re
import time

import numpy as np
import pytest

from services.jobs.linear_regression.errors import ProtocolError, RowCountsDiffer
from services.jobs.linear_regression.protocol import ConstantTargetError
from services.jobs.linear_regression.task import LinearRegressionTask
from services.mpc.transport import InMemoryNetwork
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


class _PartnerSends(InMemoryNetwork):
    """Party `frm` sends `value` (in the message's own shape and dtype) as message `name`: a buggy or hostile
    partner whose messages are genuine but whose content is wrong."""

    def __init__(self, frm: int, name: str, value: float) -> None:
        super().__init__(timeout=3.0)
        self.frm, self.name, self.value = frm, name, value

    def _send(self, frm: int, to: int, name: str, array: np.ndarray) -> None:
        if (frm, name) == (self.frm, self.name):
            array = np.full_like(np.asarray(array), self.value)
        super()._send(frm, to, name, array)


@pytest.mark.parametrize("frm, name, value, outputs_to, at, message", [
    # a status only its own sender may give: the y-owner cannot stop the job "for the x_owner's columns"
    (1, "lr/y-status", 1, "model_owner", 2, r"the y_owner worker sent an unknown status \(1\) as lr/y-status"),
    (0, "lr/x-status", 9, "model_owner", 2, r"the x_owner worker sent an unknown status \(9\) as lr/x-status"),
    (0, "lr/kx", -(1 << 40), "y_owner", 1, r"the x_owner worker sent lr/kx = -1099511627776, not the exponent"),
    (0, "lr/kx", 3000, "model_owner", 2, r"the x_owner worker sent lr/kx = 3000, not the exponent"),
    (1, "lr/y-meta", np.nan, "x_owner", 0, r"the y_owner worker sent a total sum of squares that is not a positive"),
    (1, "lr/y-meta", np.inf, "model_owner", 2, r"the y_owner worker sent a total sum of squares that is not"),
    (1, "lr/ybar", np.nan, "x_owner", 0, r"the y_owner worker sent a y mean that is not a finite number"),
    (0, "lr/kx", 1090, "y_owner", 1, r"the computed weights or metrics are not finite numbers"),
])
@pytest.mark.filterwarnings("ignore:overflow encountered in ldexp")  # the last case: infinite weights, then refused
def test_a_partners_out_of_range_value_is_a_protocol_error_naming_that_seat(frm, name, value, outputs_to, at,
                                                                           message) -> None:
    """Genuine messages whose values no honest run sends: the receiving party stops with a typed error naming the
    sender, not a ValueError or OverflowError from numpy, a finished job with infinite or NaN weights, or an error
    that blames the other data owner."""
    task = LinearRegressionTask(("a", "b", "c"), "target", outputs_to)
    x = RNG.standard_normal((40, 3))
    results, _ = run_protocol(task, x, x @ [1.0, 2.0, 3.0] + RNG.standard_normal(40),
                              network=_PartnerSends(frm, name, value), catch=True)
    assert isinstance(results[at], ProtocolError), results[at]
    assert re.search(message, str(results[at])), str(results[at])
    assert "x columns are constant" not in str(results[at])
