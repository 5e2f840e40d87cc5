"""Whether an organization's worker is alive: seconds since its last heartbeat, by the server's clock."""
from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from typing import Any

from services.coordinator.db import parse_iso

# A worker heartbeats at least every 15 s (services/worker/poller.py HEARTBEAT_SECONDS): one silent for three
# beats is shown offline. The coordinator's own constant, so it does not import the worker package.
ONLINE_WITHIN_SECONDS = 45.0


def liveness(last_seen: str | None) -> dict[str, Any]:
    """`seconds_since_seen` by the server's clock (so a client need not trust its own) and `online`."""
    if last_seen is None:
        return {"seconds_since_seen": None, "online": False}
    seconds = max(0.0, (datetime.now(UTC) - parse_iso(last_seen)).total_seconds())
    return {"seconds_since_seen": round(seconds, 1), "online": seconds <= ONLINE_WITHIN_SECONDS}


def worker_online(conn: sqlite3.Connection, org_id: str) -> bool:
    """Whether the organization's worker heartbeated within ONLINE_WITHIN_SECONDS."""
    row = conn.execute("SELECT last_seen FROM workers WHERE org_id = ?", (org_id,)).fetchone()
    return bool(liveness(row["last_seen"] if row else None)["online"])
