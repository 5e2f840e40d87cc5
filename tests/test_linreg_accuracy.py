"""Accuracy of the secure fit against numpy.linalg.lstsq at the corners of the promised range (done-when 1).

Weights within 1e-6 of the largest weight, metrics within 1e-6 relative, for n from 20 to 2·10^6, d from 1 to 64,
column magnitudes from 1e-4 to 1e6 mixed in one X, and no scaling by the user.
"""
from __future__ import annotations

import numpy as np
import pytest

from services.jobs.linear_regression import LinearRegressionTask, plaintext_fit, simulate_arrays

TOLERANCE = 1e-6


def make_data(n: int, d: int, y_scale: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Independent columns whose magnitudes alternate between 1e-4 and 1e6 (and values between), with offsets."""
    rng = np.random.default_rng(seed)
    scales = np.logspace(-4, 6, d)[rng.permutation(d)] if d > 1 else np.array([1e6])
    x = (rng.standard_normal((n, d)) + rng.uniform(-3, 3, d)) * scales
    weights = rng.uniform(-2, 2, d) / scales
    y = (x @ weights + rng.uniform(-2, 2) + 0.3 * rng.standard_normal(n)) * y_scale
    return x, y


def assert_close_to_lstsq(x: np.ndarray, y: np.ndarray, outputs_to: str = "model_owner") -> None:
    task = LinearRegressionTask(tuple(f"x{i}" for i in range(x.shape[1])), "y", outputs_to)
    report = simulate_arrays(x, y, task, plaintext=False)
    expected, metrics = plaintext_fit(x, y)
    scale = np.max(np.abs(expected))
    error = np.max(np.abs(report.weights - expected)) / scale
    assert error <= TOLERANCE, f"weights off by {error:.3g} of the largest weight"
    for key, value in metrics.items():
        relative = abs(report.metrics[key] - value) / abs(value)
        assert relative <= TOLERANCE, f"{key} off by {relative:.3g} relative"


@pytest.mark.parametrize(
    ("n", "d", "y_scale"),
    [
        (20, 1, 1.0),      # fewest rows, one column
        (20, 8, 1e6),      # few rows, mixed magnitudes, large y
        (20, 12, 1e-4),    # many columns for 20 rows, tiny y
        (2_000, 64, 1.0),  # widest X, magnitudes 1e-4..1e6 mixed
        (5_000, 64, 1e-4),
    ],
)
@pytest.mark.parametrize("outputs_to", ["x_owner", "y_owner", "model_owner"])
def test_corners(n: int, d: int, y_scale: float, outputs_to: str) -> None:
    x, y = make_data(n, d, y_scale, seed=n + d)
    assert_close_to_lstsq(x, y, outputs_to)


def test_tiny_and_huge_columns_alone() -> None:
    rng = np.random.default_rng(5)
    n = 500
    for magnitude in (1e-4, 1e6):
        x = rng.uniform(0.5, 1.5, (n, 2)) * magnitude  # all positive, far from zero: the intercept is entangled
        y = 7.0 + (x @ np.array([1.0, -2.0])) / magnitude + 0.1 * rng.standard_normal(n)
        assert_close_to_lstsq(x, y)


def test_two_million_rows() -> None:
    x, y = make_data(2_000_000, 3, 1e3, seed=11)
    assert_close_to_lstsq(x, y)


def test_metrics_of_a_close_fit() -> None:
    # r2 = 0.999997: mse = (SS_tot - ||v||^2) / n must not lose its precision to the cancellation.
    rng = np.random.default_rng(3)
    x = rng.standard_normal((10_000, 4))
    y = x @ np.array([1.0, 2.0, 3.0, 4.0]) + 0.01 * rng.standard_normal(10_000)
    assert_close_to_lstsq(x, y)
