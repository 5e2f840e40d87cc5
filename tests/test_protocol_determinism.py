"""Determinism (done-when 3): same seeds and inputs give byte-identical messages and results; new seeds give new
messages and results that agree within the accuracy bound. The appliance relies on this to replay a role."""
from __future__ import annotations

import numpy as np
import pytest

from services.jobs.linear_regression.task import LinearRegressionTask
from services.mpc import InMemoryNetwork, simulated_seeds
from tests.support.mpc_parties import run_protocol

# Row counts, statuses and exponents: the same whatever the seeds.
PUBLIC_MESSAGES = {"lr/x-rows", "lr/y-rows", "lr/x-status", "lr/y-status", "lr/kx", "lr/ky", "lr/y-meta", "lr/ybar"}
RNG = np.random.default_rng(3)
X = RNG.standard_normal((700, 4)) * [1e-3, 1.0, 1e3, 1e5]
Y = X @ [1e3, -2.0, 1e-3, 3e-5] + 7.0 + RNG.standard_normal(700)


def recorded_run(seeds, outputs_to: str):
    task = LinearRegressionTask(("a", "b", "c", "d"), "y", outputs_to)
    network = InMemoryNetwork(timeout=10.0, record=True)
    results, _ = run_protocol(task, X, Y, seeds=seeds, network=network)
    messages = {(to, frm, name): array.tobytes() for to in range(3) for frm, name, array in network.received[to]}
    result = next(r for r in results if r is not None)
    return messages, result


@pytest.mark.parametrize("outputs_to", ["x_owner", "y_owner", "model_owner"])
def test_same_seeds_give_byte_identical_messages_and_results(outputs_to: str) -> None:
    first_messages, first = recorded_run(simulated_seeds(b"job-1"), outputs_to)
    second_messages, second = recorded_run(simulated_seeds(b"job-1"), outputs_to)
    assert first_messages == second_messages
    assert first.weights.tobytes() == second.weights.tobytes()
    assert first.metrics == second.metrics


@pytest.mark.parametrize("outputs_to", ["y_owner", "model_owner"])
def test_different_seeds_give_different_messages_and_agreeing_results(outputs_to: str) -> None:
    first_messages, first = recorded_run(simulated_seeds(b"job-1"), outputs_to)
    second_messages, second = recorded_run(simulated_seeds(b"job-2"), outputs_to)
    assert first_messages.keys() == second_messages.keys()
    masked = [key for key in first_messages if key[2] not in PUBLIC_MESSAGES]
    assert masked, "the run exchanged masked messages"
    assert all(first_messages[key] != second_messages[key] for key in masked)
    assert first.weights.tobytes() != second.weights.tobytes()  # rounding differs with the masks and rotation
    scale = np.max(np.abs(first.weights))
    assert np.max(np.abs(first.weights - second.weights)) <= 1e-8 * scale
    for key in first.metrics:
        assert first.metrics[key] == pytest.approx(second.metrics[key], rel=1e-8)


def test_streamed_blocks_and_background_threads_stay_deterministic() -> None:
    """Several blocks of M (PRF prefetch and residual accumulation run in background threads)."""
    from services.jobs.linear_regression.protocol import BLOCK_ROWS

    rng = np.random.default_rng(8)
    n = 2 * BLOCK_ROWS + 123
    x = rng.standard_normal((n, 3)) * [1.0, 1e3, 1e-3]
    y = x @ [1.0, 2e-3, 4e2] + rng.standard_normal(n)
    task = LinearRegressionTask(("a", "b", "c"), "y", "model_owner")
    runs = []
    for _ in range(2):
        network = InMemoryNetwork(timeout=20.0, record=True)
        results, _ = run_protocol(task, x, y, seeds=simulated_seeds(b"blocks"), network=network)
        names = sorted(name for frm, name, _ in network.received[1] if frm == 0)
        runs.append((results[2], [a.tobytes() for to in range(3) for _, _, a in network.received[to]], names))
    assert runs[0][1] == runs[1][1]
    assert runs[0][0].weights.tobytes() == runs[1][0].weights.tobytes() and runs[0][0].metrics == runs[1][0].metrics
    assert [name for name in runs[0][2] if name.startswith("lr/v/M-S/")] == ["lr/v/M-S/0", "lr/v/M-S/1", "lr/v/M-S/2"]
