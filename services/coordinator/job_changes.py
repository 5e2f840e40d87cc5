"""A version number of the jobs' states, which workers long-poll on so they start a job as soon as it is approved.

`GET /v1/worker/jobs?wait=S&after=V` answers at once if the version is no longer V, else when it changes or
after S seconds; every answer carries the version it reflects (`X-Cape-Jobs-Version`). Endpoints that change a
job's status call `bump()` after their transaction committed, so a woken poll reads the change.
"""
from __future__ import annotations

import asyncio
import threading
import time

VERSION_HEADER = "X-Cape-Jobs-Version"


class JobChanges:
    """The version and its waiters; `bump` may be called from any thread, `wait` runs on an event loop."""

    def __init__(self) -> None:
        # Starting from the clock means a restarted server never repeats a version a worker still holds.
        self._version = time.time_ns() // 1_000_000
        self._lock = threading.Lock()
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self._closing = False

    @property
    def version(self) -> int:
        with self._lock:
            return self._version

    def bump(self) -> None:
        """A job's status changed (call after the change is committed): wake every waiting poll."""
        with self._lock:
            self._version += 1
            waiters = list(self._waiters)
        self._wake(waiters)

    def close(self) -> None:
        """The server is stopping: wake every waiting poll, and let new ones return at once."""
        with self._lock:
            self._closing = True
            waiters = list(self._waiters)
        self._wake(waiters)

    async def wait(self, after: int, timeout: float) -> None:
        """Return when the version differs from `after`, the server is closing, or `timeout` s passed."""
        waiter = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            if self._version != after or self._closing:
                return
            self._waiters.add(waiter)
        try:
            await asyncio.wait_for(waiter[1].wait(), timeout)
        except TimeoutError:
            pass
        finally:
            with self._lock:
                self._waiters.discard(waiter)

    @staticmethod
    def _wake(waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]) -> None:
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop has closed: nothing waits on it any more
                pass
