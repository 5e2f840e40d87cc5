"""One BLAS thread while protocol roles run.

A role already keeps both cores busy with its own threads (the x-owner streams blocks while a PRF thread and a
residual thread work beside it, and in a simulation three roles share the machine). OpenBLAS's own worker threads
on top of that oversubscribe the cores, and its spinning workers then made the same job 2-20x slower and erratic
on this 2-core machine. One thread also fixes BLAS's summation order, so a replayed role (a restarted runner)
computes byte-identical blocks whatever the machine's core count. The limit is process-wide, so concurrent
roles (a simulation's three threads) share one reference-counted limit: the first role in sets it, the last one
out restores the previous setting.

The first and the last role are often on different threads. threadpoolctl (3.8 on) lets only the thread that last
changed OpenBLAS's pthreads pool change it again while that thread is alive, so the last role's restore was
dropped whenever the first role's thread outlived it. Each change here first hands that control to the calling
thread; `_lock` already keeps our own changes from racing.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import threadpoolctl
from threadpoolctl import threadpool_limits

_lock = threading.Lock()
_active = 0
_limiter: threadpool_limits | None = None


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Limit BLAS to one thread for the duration of the block (nested and concurrent uses share the limit)."""
    global _active, _limiter
    with _lock:
        if _active == 0:
            _take_blas_control()
            _limiter = threadpool_limits(limits=1, user_api="blas")
        _active += 1
    try:
        yield
    finally:
        with _lock:
            _active -= 1
            if _active == 0 and _limiter is not None:
                _take_blas_control()
                _limiter.restore_original_limits()
                _limiter = None


def _take_blas_control() -> None:
    """Let this thread change OpenBLAS's thread count (see the module's docstring); older threadpoolctl versions
    have no such control and need nothing."""
    controller = getattr(threadpoolctl, "OpenBLASController", None)
    clear = getattr(controller, "clear_controlling_thread", None)
    if clear is not None:
        clear(force=True)
