"""Privacy (done-when 2): what each party receives, recorded over many runs with fresh seeds.

What the x-owner receives is uniform over the ring and distributed the same for two very different y; what the
y-owner receives likewise for two very different X; the helper receives only the public row counts and statuses;
the model owner's view (its seeds and the messages it received) yields exactly the outputs. Uniformity is a
chi-square test on the top bits of the words, "the same distribution" a two-sample Kolmogorov-Smirnov test, both
at alpha = 0.001 with fixed seeds (so the test is reproducible).
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from services.jobs.linear_regression.protocol import run_party
from services.jobs.linear_regression.task import LinearRegressionTask
from services.mpc import InMemoryNetwork, simulated_seeds
from tests.support.mpc_parties import run_protocol

RUNS = 120
N, D = 48, 3
PUBLIC_MESSAGES = {"lr/x-rows", "lr/y-rows", "lr/x-status", "lr/y-status", "lr/kx", "lr/ky", "lr/y-meta", "lr/ybar"}
CHI2_CRITICAL = {15: 37.70, 255: 330.52}  # chi-square quantiles at 1 - 0.001
KS_C_ALPHA = 1.949  # two-sample KS: reject when D > c(alpha) sqrt((n + m) / (n m)), alpha = 0.001

RNG = np.random.default_rng(2026)
X_SMALL = RNG.standard_normal((N, D)) * 1e-4
X_LARGE = (RNG.standard_normal((N, D)) @ np.array([[1, 0.9, 0], [0, 0.4, 0.5], [0, 0, 0.1]]) + 50) * 1e6
Y_SMALL = RNG.standard_normal(N) * 1e-3 + 5.0
Y_LARGE = X_LARGE @ np.array([2.0, -1.0, 0.5]) * 1e3 + RNG.standard_normal(N) * 1e9


def views(x: np.ndarray, y: np.ndarray, outputs_to: str, label: str) -> list[dict[tuple[int, str], list[np.ndarray]]]:
    """For each party, `(sender, name) -> [array per run]` over RUNS runs with fresh seeds."""
    task = LinearRegressionTask(("a", "b", "c"), "y", outputs_to)
    received: list[dict[tuple[int, str], list[np.ndarray]]] = [defaultdict(list) for _ in range(3)]
    for run in range(RUNS):
        network = InMemoryNetwork(timeout=10.0, record=True)
        run_protocol(task, x, y, seeds=simulated_seeds(f"{label}|{run}".encode()), network=network)
        for party in range(3):
            for frm, name, array in network.received[party]:
                received[party][(frm, name)].append(array)
    return received


def masked_words(view: dict[tuple[int, str], list[np.ndarray]]) -> dict[str, np.ndarray]:
    """The ring-valued messages of a view, each pooled over the runs."""
    return {name: np.concatenate(arrays).ravel() for (_, name), arrays in view.items() if name not in PUBLIC_MESSAGES}


def assert_uniform(words: np.ndarray, what: str) -> None:
    """Chi-square on the top bits (where the data's magnitude would show) and on the low bits."""
    assert words.dtype == np.uint64, f"{what} is not a ring element"
    bits = 8 if words.size >= 256 * 20 else 4  # at least ~20 expected per bin
    for label, values in (("top", words >> np.uint64(64 - bits)), ("low", words & np.uint64(2**bits - 1))):
        counts = np.bincount(values.astype(np.int64), minlength=2**bits)
        expected = words.size / 2**bits
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < CHI2_CRITICAL[2**bits - 1], f"{what}: {label} {bits} bits not uniform (chi2 = {chi2:.1f})"


def assert_same_distribution(a: np.ndarray, b: np.ndarray, what: str) -> None:
    fa, fb = np.sort(a.astype(np.float64)), np.sort(b.astype(np.float64))
    grid = np.concatenate([fa, fb])
    gap = np.abs(np.searchsorted(fa, grid, side="right") / fa.size - np.searchsorted(fb, grid, side="right") / fb.size)
    statistic = float(gap.max())
    critical = KS_C_ALPHA * np.sqrt((fa.size + fb.size) / (fa.size * fb.size))
    assert statistic < critical, f"{what}: distributions differ (KS D = {statistic:.4f} >= {critical:.4f})"


def public_part(view: dict[tuple[int, str], list[np.ndarray]]) -> dict[tuple[int, str], list[bytes]]:
    return {key: [a.tobytes() for a in arrays] for key, arrays in view.items() if key[1] in PUBLIC_MESSAGES}


@pytest.fixture(scope="module")
def two_targets():
    """The same X with two very different y, the model owner in the third seat."""
    return views(X_SMALL, Y_SMALL, "model_owner", "y-small"), views(X_SMALL, Y_LARGE, "model_owner", "y-large")


@pytest.fixture(scope="module")
def two_designs():
    """The same y with two very different X, the model owner in the third seat."""
    return views(X_SMALL, Y_SMALL, "model_owner", "x-small"), views(X_LARGE, Y_SMALL, "model_owner", "x-large")


def test_what_the_x_owner_receives_is_uniform_and_independent_of_y(two_targets) -> None:
    small, large = (masked_words(v[0]) for v in two_targets)
    assert set(small) == set(large) == {"lr/v/y-r", "lr/c/y-r", "lr/w/y-r"}
    for name in small:
        assert_uniform(small[name], f"x-owner's {name} (small y)")
        assert_uniform(large[name], f"x-owner's {name} (large y)")
        assert_same_distribution(small[name], large[name], f"x-owner's {name}")
    assert public_part(two_targets[0][0]) == public_part(two_targets[1][0])


def test_what_the_y_owner_receives_is_uniform_and_independent_of_x(two_designs) -> None:
    small, large = (masked_words(v[1]) for v in two_designs)
    assert set(small) == set(large) == {"lr/v/M-S/0", "lr/w-ybar/M-S/0"}
    for name in small:
        assert_uniform(small[name], f"y-owner's {name} (small X)")
        assert_uniform(large[name], f"y-owner's {name} (large X)")
        assert_same_distribution(small[name], large[name], f"y-owner's {name}")
    assert public_part(two_designs[0][1]) == public_part(two_designs[1][1])


@pytest.mark.parametrize("outputs_to", ["x_owner", "y_owner"])
def test_the_helper_receives_only_public_counts_and_statuses(outputs_to: str) -> None:
    seen = []
    for x, y, label in ((X_SMALL, Y_SMALL, "a"), (X_LARGE, Y_LARGE, "b")):
        task = LinearRegressionTask(("a", "b", "c"), "y", outputs_to)
        network = InMemoryNetwork(timeout=10.0, record=True)
        run_protocol(task, x, y, seeds=simulated_seeds(label.encode()), network=network)
        seen.append(sorted((frm, name, array.tobytes()) for frm, name, array in network.received[2]))
    assert {name for _, name, _ in seen[0]} == {"lr/x-rows", "lr/y-rows", "lr/x-status", "lr/y-status"}
    assert seen[0] == seen[1]


def test_the_model_owners_opened_shares_are_each_uniform(two_targets) -> None:
    for view in two_targets:
        opened = {name: words for name, words in masked_words(view[2]).items() if "-open/" in name}
        assert set(opened) == {"lr/v-open/0", "lr/v-open/1", "lr/c-open/0", "lr/c-open/1", "lr/w-open/0",
                               "lr/w-open/1"}
        for name, words in opened.items():
            assert_uniform(words, f"model owner's {name}")


class _ReplayTransport:
    """Serves a party's recorded incoming messages and checks that its outgoing ones are the recorded ones."""

    def __init__(self, party: int, network: InMemoryNetwork) -> None:
        self.party = party
        self.incoming = {(frm, name): array for frm, name, array in network.received[party]}
        self.outgoing = {(to, name): array for to in range(3) for frm, name, array in network.received[to]
                         if frm == party}

    def send(self, to: int, name: str, array: np.ndarray) -> None:
        assert np.array_equal(self.outgoing.pop((to, name)), array)

    def receive(self, frm: int, name: str, expected: object = None) -> np.ndarray:
        return self.incoming.pop((frm, name))


@pytest.mark.parametrize("outputs_to", ["x_owner", "y_owner", "model_owner"])
def test_the_output_partys_view_yields_exactly_the_outputs(outputs_to: str) -> None:
    task = LinearRegressionTask(("a", "b", "c"), "y", outputs_to)
    out = {"x_owner": 0, "y_owner": 1, "model_owner": 2}[outputs_to]
    seeds = simulated_seeds(b"view")
    network = InMemoryNetwork(timeout=10.0, record=True)
    results, _ = run_protocol(task, X_LARGE, Y_SMALL, seeds=seeds, network=network)
    replay = _ReplayTransport(out, network)
    data = [X_LARGE, Y_SMALL, None][out]
    replayed = run_party(out, task, data, replay, seeds[out])
    assert replay.incoming == {} and replay.outgoing == {}  # the whole view was used, nothing else was sent
    assert replayed.weights.tobytes() == results[out].weights.tobytes()
    assert replayed.metrics == results[out].metrics
    xb = np.column_stack([np.ones(N), X_LARGE])
    expected, *_ = np.linalg.lstsq(xb, Y_SMALL, rcond=None)
    assert np.max(np.abs(replayed.weights - expected)) <= 1e-6 * np.max(np.abs(expected))
