"""The protocol's BLAS thread limit: shared by concurrent roles, restored when the last one ends."""
from __future__ import annotations

import threading

import numpy as np  # noqa: F401 - loads OpenBLAS so threadpoolctl can see it
from threadpoolctl import threadpool_info

from services.jobs.linear_regression.protocol_threads import single_threaded_blas


def blas_threads() -> set[int]:
    return {info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"}


def test_the_limit_holds_while_any_role_runs_and_is_restored_after_the_last() -> None:
    before = blas_threads()
    first_in, second_in, first_out, second_out = (threading.Event() for _ in range(4))
    seen: dict[str, set[int]] = {}

    def first() -> None:
        with single_threaded_blas():
            first_in.set()
            second_in.wait(5)
        first_out.set()
        second_out.wait(5)  # the first role's thread outlives the last role (threadpoolctl ties control to it)

    def second() -> None:
        first_in.wait(5)
        with single_threaded_blas():
            second_in.set()
            first_out.wait(5)
            seen["after the first role left"] = blas_threads()
        seen["after the last role left"] = blas_threads()
        second_out.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert seen["after the first role left"] == {1}
    assert seen["after the last role left"] == before
    assert blas_threads() == before
