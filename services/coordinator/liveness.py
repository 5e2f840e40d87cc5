"""Whether an organization's worker is alive: seconds since its last heartbeat, by the server's clock."""
from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from typing import Any

from services.coordinator.db import parse_iso

# A worker heartbeats at least every 15 s (services/worker/poller.py HEARTBEAT_SECONDS): one silent for three
# beats is shown offline. The coordinator's own constant, so it does not import the worker package.
ONLINE_WITHIN_SECONDS = 45.0


def liveness(row: sqlite3.Row | None) -> dict[str, Any]:
    """Of a `workers` row: `seconds_since_seen` by the server's clock (so a client need not trust its own),
    `online`, and `stopped_at` (the worker said it was stopping: offline at once)."""
    last_seen, stopped_at = (row["last_seen"], row["stopped_at"]) if row is not None else (None, None)
    if last_seen is None:
        return {"seconds_since_seen": None, "online": False, "stopped_at": stopped_at}
    seconds = max(0.0, (datetime.now(UTC) - parse_iso(last_seen)).total_seconds())
    return {"seconds_since_seen": round(seconds, 1), "online": seconds <= ONLINE_WITHIN_SECONDS and not stopped_at,
            "stopped_at": stopped_at}


def worker_online(conn: sqlite3.Connection, org_id: str) -> bool:
    """Whether the organization's worker heartbeated within ONLINE_WITHIN_SECONDS and has not said it stopped."""
    return bool(liveness(conn.execute("SELECT last_seen, stopped_at FROM workers WHERE org_id = ?",
                                      (org_id,)).fetchone())["online"])
