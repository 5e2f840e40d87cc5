"""Running the three parties of the real protocol in one process, over the engine's in-memory network.

Used by `cape simulate` (try a job on sample files) and by the benchmark. Each party runs in its own thread with
its own seeds, exactly as it would in a worker; only the transport differs.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from services.mpc.prf import simulated_seeds
from services.mpc.transport import Expected, InMemoryNetwork, TransportTimeout

from .data import Source, load_x, load_y, source_name
from .errors import JobDataError, ProtocolError
from .party import run_party
from .task import THIRD_SEAT, X_OWNER, Y_OWNER, LinearRegressionResult, LinearRegressionTask

# Once a party has failed the others are cancelled; they notice within _POLL_SECONDS unless busy computing.
_JOIN_AFTER_FAILURE_SECONDS = 30.0
_POLL_SECONDS = 0.05
# A receive waits this long for a live peer (the x-owner's plaintext step at 10^6 rows takes seconds).
RECEIVE_BOUND_SECONDS = 600.0


@dataclass
class SimulationReport:
    """What a simulated run produced, beside a plaintext fit of the same data."""

    x_columns: list[str]
    weights: np.ndarray
    metrics: dict[str, float]
    plaintext_weights: np.ndarray
    plaintext_metrics: dict[str, float]
    max_abs_error: float
    seconds: dict[str, float] = field(default_factory=dict)
    bytes_sent: list[int] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)
    seats: tuple[str, str, str] = ("x_owner", "y_owner", "model_owner")  # the parties' seat names, by index

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the `cape simulate --json` object)."""
        return {
            "names": ["intercept", *self.x_columns],
            "weights": [float(w) for w in self.weights],
            "metrics": {k: float(v) for k, v in self.metrics.items()},
            "plaintext_weights": [float(w) for w in self.plaintext_weights],
            "plaintext_metrics": {k: float(v) for k, v in self.plaintext_metrics.items()},
            "max_abs_error": float(self.max_abs_error),
            "seconds": {k: round(v, 6) for k, v in self.seconds.items()},
            "bytes_sent": {self.seats[i]: int(b) for i, b in enumerate(self.bytes_sent)},
            "rounds": {self.seats[i]: int(r) for i, r in enumerate(self.rounds)},
        }


def simulate(
    x_source: Source,
    x_columns: Sequence[str],
    y_source: Source,
    y_column: str,
    seeds: Sequence[Any] | None = None,
    *,
    outputs_to: str = "model_owner",
) -> SimulationReport:
    """Load the files, run the three parties, and compare with `numpy.linalg.lstsq` on the same data.

    Raises the typed `JobDataError` (bad file, column, value, row counts, singular XᵀX) or `ProtocolError`.
    """
    started = time.perf_counter()
    x = load_x(x_source, x_columns)
    y = load_y(y_source, y_column)
    loaded = time.perf_counter() - started
    task = LinearRegressionTask(tuple(x_columns), y_column, outputs_to)
    report = simulate_arrays(x, y, task, seeds, x_name=source_name(x_source), y_name=source_name(y_source))
    report.seconds = {"load": loaded, **report.seconds}
    return report


def simulate_arrays(
    x: np.ndarray,
    y: np.ndarray,
    task: LinearRegressionTask,
    seeds: Sequence[Any] | None = None,
    *,
    x_name: str = "the x data",
    y_name: str = "the y data",
    plaintext: bool = True,
) -> SimulationReport:
    """Run the three parties on in-memory data; see `simulate`. `plaintext=False` skips the reference fit."""
    seeds = list(seeds) if seeds is not None else simulated_seeds()
    # Short network timeout: receives are retried by _CancellableTransport, which stops when a party fails.
    network = InMemoryNetwork(parties=3, timeout=_POLL_SECONDS)
    failed = threading.Event()
    phases = _PhaseClock()
    data = {X_OWNER: x, Y_OWNER: y, THIRD_SEAT: None}
    names = {X_OWNER: (x_name, y_name), Y_OWNER: (y_name, x_name), THIRD_SEAT: (None, None)}
    results: dict[int, LinearRegressionResult | None] = {}
    errors: dict[int, BaseException] = {}

    def party(index: int) -> None:
        try:
            results[index] = run_party(
                index, task, data[index], _CancellableTransport(network.transport(index), failed), seeds[index],
                phases.reporter(index), data_name=names[index][0], other_name=names[index][1],
            )
        except BaseException as exc:  # noqa: BLE001 - reported to the caller below
            errors[index] = exc
            failed.set()  # wakes the other parties' receives

    started = time.perf_counter()
    threads = [threading.Thread(target=party, args=(i,), name=f"party-{i}", daemon=True) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive() and not failed.is_set():
            thread.join(0.05)
    if failed.is_set():
        deadline = time.monotonic() + _JOIN_AFTER_FAILURE_SECONDS
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        raise _first_cause(errors)
    seconds = phases.seconds(started)
    seconds["protocol"] = time.perf_counter() - started

    result = results[task.output_party]
    if result is None:
        raise ProtocolError(f"the output party ({task.outputs_to}) finished without a result")
    plain_started = time.perf_counter()
    if plaintext:
        plain_weights, plain_metrics = plaintext_fit(x, y)
        seconds["plaintext"] = time.perf_counter() - plain_started
    else:
        plain_weights, plain_metrics = np.full_like(result.weights, np.nan), {}
    return SimulationReport(
        x_columns=list(task.x_columns),
        weights=np.asarray(result.weights, dtype=np.float64),
        metrics=dict(result.metrics),
        plaintext_weights=plain_weights,
        plaintext_metrics=plain_metrics,
        max_abs_error=float(np.max(np.abs(result.weights - plain_weights))),
        seconds=seconds,
        bytes_sent=[int(b) for b in _per_party(network.bytes_sent)],
        rounds=[int(r) for r in _per_party(network.rounds)],
        seats=("x_owner", "y_owner", "model_owner" if task.output_party == THIRD_SEAT else "helper"),
    )


def plaintext_fit(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
    """numpy's least squares with an intercept: weights (intercept first) and the job's two metrics.

    Columns are first scaled by powers of two (exact in floating point) to comparable magnitudes: lstsq's default
    cutoff (eps · max(n, d) of the largest singular value) would otherwise drop a 1e-4 column beside a 1e6 one
    once n reaches ~10^6, and return a wrong fit.
    """
    n, d = x.shape
    exponents = np.frexp(np.max(np.abs(x), axis=0) if n else np.ones(d))[1]
    xb = np.empty((n, d + 1))
    xb[:, 0] = 1.0
    np.ldexp(x, -exponents, out=xb[:, 1:])
    scaled_weights, *_ = np.linalg.lstsq(xb, y, rcond=None)
    residual = y - xb @ scaled_weights
    weights = scaled_weights.copy()
    weights[1:] = np.ldexp(scaled_weights[1:], -exponents)
    ss_res = float(residual @ residual)
    centred = y - y.mean()
    ss_tot = float(centred @ centred)
    return weights, {"mse_result": ss_res / n, "r_squared_result": 1.0 - ss_res / ss_tot}


class _PhaseClock:
    """Seconds per phase of the whole job: a phase ends when the last party reports its end.

    The protocol calls `progress(fraction, phase)` at the end of each phase, in every party.
    """

    def __init__(self) -> None:
        self._ends: dict[str, float] = {}
        self._order: list[str] = []
        self._lock = threading.Lock()

    def reporter(self, index: int) -> Callable[[float, str], None]:
        """The progress callback for party `index`."""

        def progress(fraction: float, phase: str) -> None:
            now = time.perf_counter()
            with self._lock:
                if phase not in self._ends:
                    self._order.append(phase)
                self._ends[phase] = max(self._ends.get(phase, now), now)

        return progress

    def seconds(self, started: float) -> dict[str, float]:
        """Seconds per phase, in the order the phases were first reported."""
        out: dict[str, float] = {}
        last = started
        for phase in self._order:
            end = max(self._ends[phase], last)
            out[phase] = end - last
            last = end
        return out


def _per_party(counts: Any) -> list[int]:
    if isinstance(counts, dict):
        return [counts.get(i, 0) for i in range(3)]
    return list(counts)


class PartyCancelled(ProtocolError):
    """Another party of the simulated run failed, so this one stopped."""


class _CancellableTransport:
    """A party's transport whose receives wait in short slices, so the party stops as soon as another fails."""

    def __init__(self, inner: Any, cancelled: threading.Event, bound: float = RECEIVE_BOUND_SECONDS) -> None:
        self._inner = inner
        self._cancelled = cancelled
        self._bound = bound
        self.party = inner.party

    def send(self, to: int, name: str, array: np.ndarray) -> None:
        """Send through the network, unless the run was cancelled."""
        if self._cancelled.is_set():
            raise PartyCancelled(f"party {self.party} stopped: another party failed")
        self._inner.send(to, name, array)

    def receive(self, frm: int, name: str, expected: Expected | None = None) -> np.ndarray:
        """Wait for `name` from `frm`; PartyCancelled if another party fails, TransportTimeout after the bound."""
        deadline = time.monotonic() + self._bound
        while True:
            if self._cancelled.is_set():
                raise PartyCancelled(f"party {self.party} stopped: another party failed")
            try:
                return self._inner.receive(frm, name, expected)
            except TransportTimeout:
                if time.monotonic() > deadline:
                    raise TransportTimeout(
                        f"party {self.party} waited {self._bound:g} s for message {name!r} from party {frm}"
                    ) from None


def _first_cause(errors: dict[int, BaseException]) -> BaseException:
    """The error to show: a data error first, then the earliest failure that is not an echo of another's."""
    ordered = list(errors.values())  # insertion order = order of failure
    # A data owner's own account first: it names its file, where the third seat can only say "the x data".
    owners_first = [e for i, e in errors.items() if i != THIRD_SEAT] + [e for i, e in errors.items() if i == THIRD_SEAT]
    for error in owners_first:
        if isinstance(error, JobDataError):
            return error
    for error in ordered:
        if not isinstance(error, PartyCancelled):
            return error
    return ordered[0]
