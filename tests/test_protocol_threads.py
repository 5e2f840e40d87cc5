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
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, set[int]] = {}

    def first() -> None:
        with single_threaded_blas():
            first_in.set()
            second_in.wait(5)
        first_out.set()

    def second() -> None:
        first_in.wait(5)
        with single_threaded_blas():
            second_in.set()
            first_out.wait(5)
            seen["after the first role left"] = blas_threads()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert seen["after the first role left"] == {1}
    assert blas_threads() == before
