"""The façade: `simulate` over the real protocol, typed errors from any party, and no hang when one party fails."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from services.jobs.linear_regression import (
    LinearRegressionTask,
    NonFiniteError,
    RowCountMismatchError,
    SingularDataError,
    TooFewRowsError,
    run_party,
    simulate,
    simulate_arrays,
)
from services.mpc.prf import simulated_seeds
from services.mpc.transport import InMemoryNetwork

TASK = LinearRegressionTask(("a", "b"), "t", "model_owner")


def sample(n: int = 100, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 2))
    return x, 1.0 + x @ np.array([2.0, -3.0]) + 0.1 * rng.standard_normal(n)


def test_simulate_from_files_and_file_objects(tmp_path: Path) -> None:
    x, y = sample()
    np.savetxt(tmp_path / "x.csv", x, delimiter=",", header="a,b", comments="", fmt="%.17g")
    np.savetxt(tmp_path / "y.csv", y, header="t", comments="", fmt="%.17g")
    with open(tmp_path / "y.csv", "rb") as y_file:
        report = simulate(tmp_path / "x.csv", ["b", "a"], y_file, "t")
    assert report.x_columns == ["b", "a"]
    np.testing.assert_allclose(report.weights, report.plaintext_weights, rtol=0, atol=1e-6 * 3)
    np.testing.assert_allclose(report.weights, [1.0, -3.0, 2.0], atol=0.05)
    assert report.max_abs_error == pytest.approx(np.max(np.abs(report.weights - report.plaintext_weights)))
    assert list(report.seconds)[:2] == ["load", "prepare"] and "protocol" in report.seconds
    assert len(report.bytes_sent) == len(report.rounds) == 3 and min(report.bytes_sent) > 0


@pytest.mark.parametrize("outputs_to", ["x_owner", "y_owner", "model_owner"])
def test_every_output_seat_gets_the_same_fit(outputs_to: str) -> None:
    x, y = sample()
    task = LinearRegressionTask(("a", "b"), "t", outputs_to)
    report = simulate_arrays(x, y, task)
    assert report.max_abs_error <= 1e-6 * np.max(np.abs(report.plaintext_weights))


def test_given_seeds_reproduce_the_run_fresh_ones_do_not() -> None:
    x, y = sample()
    seeds = simulated_seeds(b"k" * 32)
    first = simulate_arrays(x, y, TASK, seeds)
    again = simulate_arrays(x, y, TASK, simulated_seeds(b"k" * 32))
    assert first.weights.tobytes() == again.weights.tobytes()
    assert first.metrics == again.metrics
    other = simulate_arrays(x, y, TASK)
    assert other.weights.tobytes() != first.weights.tobytes()  # other rounding of other masks, same fit
    np.testing.assert_allclose(other.weights, first.weights, rtol=0, atol=1e-6 * 3)


def test_row_mismatch_names_both_sources() -> None:
    x, y = sample(50)
    with pytest.raises(RowCountMismatchError) as caught:
        simulate_arrays(x, y[:49], TASK, x_name="x.csv", y_name="y.parquet")
    assert str(caught.value) == (
        "x.csv has 50 rows but y.parquet has 49; the x and y data must have the same rows, in the same order"
    )


def test_a_party_failing_before_it_sends_stops_the_others_promptly() -> None:
    x, y = sample()
    x[40, 1] = np.nan  # the x-owner refuses before the protocol starts: the others wait on its first message
    started = time.monotonic()
    with pytest.raises(NonFiniteError, match=r"^x.csv: column 'b' row 41: the value is NaN"):
        simulate_arrays(x, y, TASK, x_name="x.csv")
    assert time.monotonic() - started < 5.0  # not the 600 s receive bound: the others were cancelled
    with pytest.raises(TooFewRowsError, match=r"^y.csv: 2 rows for 2 x columns"):
        simulate_arrays(np.nan_to_num(x), y[:2], TASK, y_name="y.csv")


def test_collinear_columns_are_named_by_the_x_owner() -> None:
    x, y = sample()
    x[:, 1] = 3 * x[:, 0] + 2
    started = time.monotonic()
    with pytest.raises(SingularDataError, match=r"^x.csv: columns 'a', 'b' are collinear"):
        simulate_arrays(x, y, TASK, x_name="x.csv")
    assert time.monotonic() - started < 5.0  # not the 600 s receive bound: the others were cancelled


def test_one_party_alone_names_what_it_knows() -> None:
    """A worker runs one party: a mismatch names its own file and 'the x data' for the other owner's."""
    x, _ = sample(31)
    _, y = sample(30)
    network = InMemoryNetwork(parties=3, timeout=5)
    seeds = simulated_seeds()
    x_errors: list[BaseException] = []

    def x_owner() -> None:
        try:
            run_party(0, TASK, x, network.transport(0), seeds[0])
        except BaseException as exc:  # noqa: BLE001 - checked below
            x_errors.append(exc)

    thread = threading.Thread(target=x_owner)
    thread.start()
    with pytest.raises(RowCountMismatchError) as caught:
        run_party(1, TASK, y, network.transport(1), seeds[1], data_name="s3://bucket/y.csv")
    thread.join(10)
    assert str(caught.value).startswith("the x data has 31 rows but s3://bucket/y.csv has 30;")
    assert [str(e) for e in x_errors] == [
        "the x data has 31 rows but the y data has 30; the x and y data must have the same rows, in the same order"
    ]
