"""Running the three parties of an engine or protocol step in threads over an in-memory network."""
from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from services.mpc.party import Party
from services.mpc.prf import PartySeeds, simulated_seeds
from services.mpc.transport import InMemoryNetwork

JOIN_SECONDS = 60.0


def run_three(step: Callable[[Party], Any], *, network: InMemoryNetwork | None = None,
              seeds: Sequence[PartySeeds] | None = None) -> list[Any]:
    """Run `step(party)` for parties 0, 1, 2 in threads; return their results, re-raising the first error."""
    network = network or InMemoryNetwork(timeout=10.0)
    seeds = list(seeds) if seeds is not None else simulated_seeds()
    return run_roles([lambda i=i: step(Party.create(i, network.transport(i), seeds[i])) for i in range(3)])


def run_roles(roles: Sequence[Callable[[], Any]]) -> list[Any]:
    """Run each callable in its own thread; return their results in order, re-raising the first error."""
    results: list[Any] = [None] * len(roles)
    errors: dict[int, BaseException] = {}

    def run(i: int) -> None:
        try:
            results[i] = roles[i]()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors[i] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(roles))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_SECONDS)
        assert not thread.is_alive(), "a party did not finish within the test's bound"
    if errors:
        raise errors[min(errors)]
    return results


def run_protocol(task: Any, x: np.ndarray | None, y: np.ndarray | None, *, seeds: Sequence[PartySeeds] | None = None,
                 network: InMemoryNetwork | None = None, catch: bool = False) -> tuple[list[Any], InMemoryNetwork]:
    """Run the linear-regression protocol's three roles; with `catch=True` errors are returned in place of results."""
    from services.jobs.linear_regression.protocol import run_party

    network = network or InMemoryNetwork(timeout=10.0)
    seeds = list(seeds) if seeds is not None else simulated_seeds()
    data = [x, y, None]

    def role(i: int) -> Callable[[], Any]:
        def call() -> Any:
            try:
                return run_party(i, task, data[i], network.transport(i), seeds[i])
            except Exception as exc:  # noqa: BLE001 - handed back for the test to inspect
                if catch:
                    return exc
                raise
        return call

    return run_roles([role(i) for i in range(3)]), network
