"""The protocol's weights and metrics against a plaintext least-squares fit, at the corners of the promised range.

The reference fits column-scaled data with `numpy.linalg.lstsq` and undoes the scaling: on columns whose
magnitudes span 1e-4..1e6, lstsq on the raw columns is itself only good to ~1e-7 (its error grows with the
condition number of X), while the protocol scales internally. Both references are checked where they agree.
"""
from __future__ import annotations

import numpy as np
import pytest

from services.jobs.linear_regression.task import LinearRegressionTask
from services.mpc import simulated_seeds
from tests.support.mpc_parties import run_protocol

TOLERANCE = 1e-6
OUTPUT_PARTY = {"x_owner": 0, "y_owner": 1, "model_owner": 2}


def reference_fit(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
    """Least squares on centred, unit-scaled columns (well conditioned), mapped back to the user's units."""
    mu, scale = x.mean(axis=0), x.std(axis=0)
    xb = np.column_stack([np.ones(len(y)), (x - mu) / scale])
    beta, *_ = np.linalg.lstsq(xb, y, rcond=None)
    slopes = beta[1:] / scale
    residual = y - xb @ beta
    ss_res = float(residual @ residual)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    weights = np.concatenate([[beta[0] - mu @ slopes], slopes])
    return weights, {"mse_result": ss_res / len(y), "r_squared_result": 1 - ss_res / ss_tot}


def make_data(n: int, d: int, seed: int, *, y_offset: float = 2.0, noise: float = 0.5,
              magnitudes: tuple[float, float] = (1e-4, 1e6)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    scales = np.logspace(np.log10(magnitudes[0]), np.log10(magnitudes[1]), d)[rng.permutation(d)]
    x = (rng.standard_normal((n, d)) + rng.uniform(-3, 3, d)) * scales
    y = x @ (rng.uniform(-2, 2, d) / scales) + y_offset + noise * rng.standard_normal(n)
    return x, y


def fit(x: np.ndarray, y: np.ndarray, outputs_to: str = "model_owner", seeds=None):
    task = LinearRegressionTask(tuple(f"x{i}" for i in range(x.shape[1])), "y", outputs_to)
    results, network = run_protocol(task, x, y, seeds=seeds)
    out = OUTPUT_PARTY[outputs_to]
    assert all(results[i] is None for i in range(3) if i != out), "only the output party gets a result"
    return results[out], network


def assert_accurate(result, x: np.ndarray, y: np.ndarray) -> None:
    expected, metrics = reference_fit(x, y)
    assert result.weights.shape == (x.shape[1] + 1,)
    error = np.max(np.abs(result.weights - expected)) / np.max(np.abs(expected))
    assert error <= TOLERANCE, f"weights off by {error:.3g} of the largest weight"
    for key, value in metrics.items():
        relative = abs(result.metrics[key] - value) / abs(value)
        assert relative <= TOLERANCE, f"{key} off by {relative:.3g}"


@pytest.mark.parametrize("outputs_to", ["x_owner", "y_owner", "model_owner"])
@pytest.mark.parametrize(("n", "d"), [(20, 1), (500, 7), (300, 64)])
def test_weights_and_metrics_match_least_squares(n: int, d: int, outputs_to: str) -> None:
    x, y = make_data(n, d, seed=n + d)
    result, _ = fit(x, y, outputs_to)
    assert_accurate(result, x, y)


def test_agrees_with_plain_lstsq_where_lstsq_is_well_conditioned() -> None:
    x, y = make_data(400, 5, seed=3, magnitudes=(0.5, 5.0))
    result, _ = fit(x, y)
    xb = np.column_stack([np.ones(len(y)), x])
    expected, *_ = np.linalg.lstsq(xb, y, rcond=None)
    assert np.max(np.abs(result.weights - expected)) / np.max(np.abs(expected)) <= TOLERANCE


@pytest.mark.parametrize("outputs_to", ["y_owner", "model_owner"])
@pytest.mark.parametrize(("y_scale", "y_offset"), [(1e-3, 1e6), (1e-6, 1e-4), (10.0, -3e8), (1e5, 0.0)])
def test_target_far_from_zero_or_tiny(y_scale: float, y_offset: float, outputs_to: str) -> None:
    """ybar much larger or smaller than y's spread: the intercept's scale exponent path (ky > kx and ky < kx)."""
    x, y = make_data(200, 3, seed=11, magnitudes=(1e-2, 1e2))
    y = y * y_scale + y_offset
    result, _ = fit(x, y, outputs_to)
    assert_accurate(result, x, y)


def test_columns_with_large_offsets_and_tiny_spread() -> None:
    rng = np.random.default_rng(5)
    x = np.column_stack([1e6 + rng.standard_normal(300), 1e-4 * rng.standard_normal(300) + 5e-3])
    y = x @ np.array([2.0, 3e3]) + rng.standard_normal(300)
    for outputs_to in ("x_owner", "model_owner"):
        result, _ = fit(x, y, outputs_to)
        assert_accurate(result, x, y)


@pytest.mark.parametrize("outputs_to", ["x_owner", "y_owner", "model_owner"])
def test_metrics_of_a_close_fit(outputs_to: str) -> None:
    """r2 = 1 - 4e-6: SS_res = SS_tot - ||P yc||^2 would lose ~1e-4 relative without the rounding corrections."""
    x, y = make_data(5000, 8, seed=21, noise=5e-3, magnitudes=(1e-3, 1e3))
    result, _ = fit(x, y, outputs_to)
    assert 1 - result.metrics["r_squared_result"] < 1e-5
    assert_accurate(result, x, y)


def test_perfect_fit_has_r_squared_one_and_zero_mse() -> None:
    rng = np.random.default_rng(9)
    x = rng.standard_normal((100, 2))
    y = x @ np.array([1.5, -2.0]) + 4.0
    result, _ = fit(x, y)
    np.testing.assert_allclose(result.weights, [4.0, 1.5, -2.0], rtol=0, atol=1e-8)
    assert result.metrics["r_squared_result"] == pytest.approx(1.0, abs=1e-8)
    assert result.metrics["mse_result"] <= 1e-8 * float(np.var(y))


def test_result_reports_seconds_per_phase_and_progress_marks_each_phase() -> None:
    from services.jobs.linear_regression.protocol import run_party
    from services.mpc import InMemoryNetwork
    from tests.support.mpc_parties import run_roles

    x, y = make_data(100, 2, seed=1)
    task = LinearRegressionTask(("a", "b"), "y", "model_owner")
    network, seeds, marks = InMemoryNetwork(timeout=10), simulated_seeds(), []
    data = [x, y, None]
    results = run_roles([
        (lambda i=i: run_party(i, task, data[i], network.transport(i), seeds[i],
                               (lambda f, p: marks.append((f, p))) if i == 2 else None))
        for i in range(3)
    ])
    assert [p for _, p in marks] == ["prepare", "product", "reveal", "weights"]
    assert [f for f, _ in marks] == sorted(f for f, _ in marks) and marks[-1][0] == 1.0
    assert set(results[2].seconds) == {"prepare", "product", "reveal", "weights"}
