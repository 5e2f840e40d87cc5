"""Which of the runner's jobs may load their data and compute now.

A job thread takes its seat at once (its `started` report tells the coordinator this worker is there), then waits
here for one of `size` slots before it loads its data. Slots bound the memory and CPU of jobs at once; the last
free slot goes only to a job whose three workers have all taken their seats (Started at the coordinator), or to
one that held a slot before the runner restarted. So jobs waiting for a partner that is not running hold at most
`size - 1` slots and do not hold up jobs among running workers: when every slot went to jobs whose partner was
down, a job between three healthy workers waited for those to time out (and ended in Error, naming the healthy
worker as missing). Among the jobs that may take a slot, resumed ones go first, then the oldest approval, as at
every worker. Each worker decides alone: two workers that each have one slot left, and saw two jobs between them
start in different orders, can give it to different jobs, which then wait for another slot to free (or for the
message timeout to end one).

A job whose runner was killed while it worked on it (`alone`: the OOM killer, most often) runs alone: it waits for
the others to leave their slots, and no other job takes one while it works. A kill is counted against every job that
was working (none can tell which one took the memory), so jobs that were killed beside a large one end in Error
only if they die again on their own, and a job that does is the one that needs more memory.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Waiting:
    """Why a job waits for a slot, as its seat's message at the coordinator says it."""

    message: str
    all_busy: bool  # every slot is taken (else: the last one is kept for a job all three workers took)


class JobSlots:
    """`size` slots shared by the runner's job threads; `all_seats_taken(job)` reads whether the coordinator shows
    the job Started (asked of every waiting job at each decision: a flag remembered from a job's own last look
    could hand the slot to a younger job)."""

    def __init__(self, size: int, all_seats_taken: Callable[[str], bool]) -> None:
        if size < 1:
            raise ValueError("a runner needs at least one job slot")
        self.size = size
        self._all_seats_taken = all_seats_taken
        self._lock = threading.Lock()
        self._working: set[str] = set()
        self._alone: str | None = None  # a job working with every slot to itself
        self._waiting: dict[str, tuple[bool, str, bool]] = {}  # job -> (resumed, approved_at, alone)

    @property
    def working(self) -> int:
        with self._lock:
            return len(self._working)

    def take(self, job_id: str, approved_at: str, resumed: bool = False, alone: bool = False) -> Waiting | None:
        """Take a slot for the job if it may have one now (None), else say why it waits; call again on a change.
        A `resumed` job (it held a slot before the runner restarted: its partners wait for it) goes first and may
        have the last slot; an `alone` one (its runner was killed while it worked) takes all of them."""
        with self._lock:
            if job_id in self._working:
                return None
            self._waiting[job_id] = (resumed, approved_at, alone)
            free = self.size - len(self._working)
            order = sorted((not again, not self._all_seats_taken(job), approved, job, solo)
                           for job, (again, approved, solo) in self._waiting.items())
            eligible = [key for key in order if free >= 2 or (free == 1 and not (key[0] and key[1]))]
            if self._alone is not None or (eligible and eligible[0][4] and self._working):
                if self._alone is None and eligible[0][3] == job_id:  # it waits for the slots to empty, as do others
                    return Waiting("queued at its worker: its runner was killed while it worked beside other jobs; "
                                   "it runs alone once they leave their slots", all_busy=True)
                return Waiting("queued at its worker: a job whose runner was killed while it worked runs alone "
                               "first, to tell whether it needs more memory than the worker has", all_busy=True)
            if eligible and eligible[0][3] == job_id:
                del self._waiting[job_id]
                self._working.add(job_id)
                if alone:
                    self._alone = job_id
                return None
            if free <= 0:
                return Waiting(f"queued at its worker: all {self.size} of the worker's job slots are taken by jobs "
                               "loading their data or computing", all_busy=True)
            if eligible:
                return Waiting("queued at its worker behind an older job", all_busy=True)
            return Waiting(f"queued at its worker: {len(self._working)} of its {self.size} job slots are taken and "
                           "the last is kept for a job whose three workers have all taken it; waiting for the "
                           "other workers", all_busy=False)

    def leave(self, job_id: str) -> None:
        """The job no longer waits or works here (it ended, was stopped or paused)."""
        with self._lock:
            self._waiting.pop(job_id, None)
            self._working.discard(job_id)
            if self._alone == job_id:
                self._alone = None
