"""Started jobs whose workers all went away: ended in Error once their silence outlasts the broker's message TTL.

A live worker gives up a silent partner within a few of the job's timeouts and says so, but when every worker of a
job went away for good (an organization that retired its worker), the job showed Started for ever, holding its
project and dataviews. A worker away that long cannot go on anyway: the broker dropped what was sent to it.

The silence is read from the stored reports' wall-clock times, which a clock step or a machine resumed after days
can make look old all at once, when every worker also looks offline until its next heartbeat. So only silence
while this server ran counts (by the monotonic clock: workers cannot report to a server that is down), and a job is
ended only when it was still silent, its workers still offline, at a sweep `confirm_seconds` after the first that
found it so (by then a live worker has heartbeated).
"""
from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from services.coordinator.db import iso
from services.coordinator.jobs import duration, parties, seat_label, set_status
from services.coordinator.liveness import ONLINE_WITHIN_SECONDS, worker_online

CONFIRM_SECONDS = ONLINE_WITHIN_SECONDS + 15  # longer than a live worker goes without a heartbeat


class AbandonedJobs:
    """The sweep of Started jobs silent for `silence_ttl` seconds, with what earlier sweeps found."""

    def __init__(self, silence_ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.silence_ttl = silence_ttl
        self.confirm_seconds = min(CONFIRM_SECONDS, silence_ttl)
        self.clock = clock
        self.serving_since = clock()
        self._suspects: dict[str, float] = {}  # job id -> when a sweep first found it abandoned

    def sweep(self, conn: sqlite3.Connection, now: datetime | None = None) -> int:
        """End the jobs abandoned at this sweep and at one `confirm_seconds` before; returns how many ended."""
        looked = self.clock()
        if looked - self.serving_since < self.silence_ttl:
            return 0
        found = self._abandoned(conn, now or datetime.now(UTC))
        self._suspects = {job["id"]: self._suspects.get(job["id"], looked) for job, _ in found}
        ended = 0
        for job, unfinished in found:
            if looked - self._suspects[job["id"]] < self.confirm_seconds:
                continue
            set_status(conn, job["id"], "Error",
                       f"no report from its workers for {duration(self.silence_ttl)} and none of "
                       f"{', '.join(seat_label(conn, p) for p in unfinished)} is online; the broker keeps undelivered "
                       "messages that long, so the job cannot go on: submit it again once their workers run")
            del self._suspects[job["id"]]
            ended += 1
        return ended

    def _abandoned(self, conn: sqlite3.Connection, now: datetime) -> list[tuple[sqlite3.Row, list[sqlite3.Row]]]:
        """Started jobs with no report for the TTL, and their unfinished seats, none of whose workers is online."""
        cutoff = iso(now - timedelta(seconds=self.silence_ttl))
        found = []
        for job in list(conn.execute(  # the sweep runs every few seconds: only jobs silent that long are read
                "SELECT * FROM jobs j WHERE status = 'Started' AND updated_at <= ? AND NOT EXISTS "
                "(SELECT 1 FROM job_parties p WHERE p.job_id = j.id AND p.updated_at > ?)", (cutoff, cutoff))):
            unfinished = [p for p in parties(conn, job["id"]) if p["state"] != "completed"]
            # None: it completes on its own. One online: computing a long step, or back: its partners judge it.
            if unfinished and not any(worker_online(conn, p["org_id"]) for p in unfinished):
                found.append((job, unfinished))
        return found
