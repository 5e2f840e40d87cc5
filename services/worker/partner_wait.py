"""How long a seat waits for one message from a partner: the job's timeout, longer while the partner proves alive.

A wait's deadline is first `timeout` after it began. When it passes, a keep-alive that came from the partner since
the last look (keepalive.py: the partner is still preparing, queued for a job slot or loading its data) moves the
deadline one `timeout` further; without one the wait fails, so a partner that is gone is given up after one to two
timeouts from its last word. A partner that is alive but never sends the message cannot hold the job for ever: no
wait lasts more than `LIMIT_TIMEOUTS` times the timeout. That limit is also how long two workers that each gave
their last job slot to a different job, each job waiting for its seat queued at the other worker, wait before one of
the jobs fails and frees its slot (job_slots.py).

Time the waiter itself did not run (its machine suspended, its process stopped: `time.monotonic()` moves on all the
same) is not the partner's silence: what the partner sent meanwhile waits at the broker until this worker's
messenger, which did not run either, brings it in. Such a wait starts afresh when it runs again (`resumed`).
"""
from __future__ import annotations

LIMIT_TIMEOUTS = 5  # the longest wait for one message, in job timeouts (50 minutes at the default 600 s)
# A gap this long between two looks of a waiter that sleeps at most a second between them: it did not run meanwhile.
STALLED_SECONDS = 5.0


class PartnerWait:
    """The deadline of one wait (times from `time.monotonic()`); pure, so the bounds are tested without clocks."""

    def __init__(self, timeout: float, started: float, limit_timeouts: int = LIMIT_TIMEOUTS) -> None:
        if timeout <= 0 or limit_timeouts < 1:
            raise ValueError("a wait needs a positive timeout and a limit of at least one timeout")
        self.timeout = timeout
        self.started = started
        self.deadline = started + timeout
        self.limit = started + limit_timeouts * timeout
        self.extensions = 0

    def left(self, now: float) -> float:
        """Seconds until the deadline (0 or less: it passed; call `extend`)."""
        return self.deadline - now

    def extend(self, now: float, alive: bool) -> bool:
        """At a passed deadline: whether the wait goes on. It does if the partner proved `alive` since the last look
        and the limit is not reached; the deadline is then one timeout from now (never past the limit)."""
        if not alive or now >= self.limit:
            return False
        self.deadline = min(max(self.deadline, now) + self.timeout, self.limit)
        self.extensions += 1
        return True

    def resumed(self, now: float, stalled: float) -> None:
        """The waiter did not run for `stalled` seconds up to `now` (suspended, stopped): the partner gets one timeout
        from now, and the limit moves on by the time lost, so its messages sent meanwhile can still come in."""
        self.limit += stalled
        self.deadline = min(max(self.deadline, now + self.timeout), self.limit)
