"""Jobs that have not ended, which block deleting their project or a dataview they use, and the refusal naming them.

The refusal says which jobs block and what ends each one, so nobody has to list the project's jobs to find them.
"""
from __future__ import annotations

import sqlite3

from services.server.errors import Conflict

ACTIVE_STATUSES = ("Initialized", "NeedsApproval", "Approved", "Started")
SHOWN = 5  # ids named in the message; the error's `jobs` lists them all


def active_jobs(conn: sqlite3.Connection, where: str, args: tuple[str, ...]) -> list[sqlite3.Row]:
    """`id, status` of the jobs matching `where` that have not ended, in submission order."""
    marks = ",".join("?" * len(ACTIVE_STATUSES))
    return list(conn.execute(f"SELECT id, status FROM jobs WHERE status IN ({marks}) AND ({where}) "
                             "ORDER BY created_at, rowid", (*ACTIVE_STATUSES, *args)))


def blocked(subject: str, jobs: list[sqlite3.Row], code: str) -> Conflict:
    """409 `code`: '<subject> N jobs that have not ended: ID (Status), ... and N more; <what ends them>, then try
    again'. A job waiting for approval is stopped (by the submitter's or a party's admin, operator or data
    scientist) or rejected (by a data owner's admin or operator); the others are stopped."""
    count = len(jobs)
    shown = ", ".join(f"{j['id']} ({j['status']})" for j in jobs[:SHOWN])
    if count > SHOWN:
        shown += f" and {count - SHOWN} more"
    steps = []
    if any(j["status"] == "NeedsApproval" for j in jobs):
        steps.append("stop a job waiting for approval (`cape jobs stop JOB`) or, as a data owner's admin or "
                     "operator, reject it (`cape jobs reject JOB`)")
    if any(j["status"] != "NeedsApproval" for j in jobs):
        steps.append("stop an approved or started job (`cape jobs stop JOB`)")
    noun = "1 job that has" if count == 1 else f"{count} jobs that have"
    return Conflict(f"{subject} {noun} not ended: {shown}; {' and '.join(steps)}, then try again", code=code,
                    extra={"jobs": [{"id": j["id"], "status": j["status"]} for j in jobs]})
