"""Whether an organization's worker is alive: seconds since its last heartbeat, by the server's clock."""
from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from typing import Any

from services.coordinator.db import parse_iso

# A worker heartbeats at least every 15 s (services/worker/poller.py HEARTBEAT_SECONDS): one silent for three
# beats is shown offline. The coordinator's own constant, so it does not import the worker package.
ONLINE_WITHIN_SECONDS = 45.0
# A heartbeat stamped further ahead of the server's clock than this came before the clock was set back (NTP, a
# resumed VM): how long ago is unknown.
AHEAD_SLACK_SECONDS = 2.0


def liveness(row: sqlite3.Row | None) -> dict[str, Any]:
    """Of a `workers` row: `seconds_since_seen` by the server's clock (so a client need not trust its own; None if
    never seen, or seen before that clock was set back), `online`, and `stopped_at` (the worker said it was
    stopping: offline at once)."""
    last_seen, stopped_at = (row["last_seen"], row["stopped_at"]) if row is not None else (None, None)
    if last_seen is None:
        return {"seconds_since_seen": None, "online": False, "stopped_at": stopped_at}
    seconds = (datetime.now(UTC) - parse_iso(last_seen)).total_seconds()
    if seconds < -AHEAD_SLACK_SECONDS:
        # Not proof of life: taken for "0 s ago", a worker gone since looked online for as long as the clock went
        # back, and held its seat against a replacement. A live worker's next heartbeat (15 s) sets it right.
        return {"seconds_since_seen": None, "online": False, "stopped_at": stopped_at}
    seconds = max(0.0, seconds)
    return {"seconds_since_seen": round(seconds, 1), "online": seconds <= ONLINE_WITHIN_SECONDS and not stopped_at,
            "stopped_at": stopped_at}


def worker_liveness(conn: sqlite3.Connection, org_id: str) -> dict[str, Any]:
    """`liveness` of the organization's worker."""
    return liveness(conn.execute("SELECT last_seen, stopped_at FROM workers WHERE org_id = ?", (org_id,)).fetchone())


def worker_online(conn: sqlite3.Connection, org_id: str) -> bool:
    """Whether the organization's worker heartbeated within ONLINE_WITHIN_SECONDS and has not said it stopped."""
    return bool(worker_liveness(conn, org_id)["online"])


def offline_in_words(state: dict[str, Any]) -> str:
    """Why a `liveness` that is not online is offline, in a few words."""
    if state["stopped_at"]:
        return "it said it was stopping"
    if state["seconds_since_seen"] is None:  # never seen, or seen before the server's clock went back
        return "no recent heartbeat"
    return f"not heard from for {state['seconds_since_seen']:.0f} s"
