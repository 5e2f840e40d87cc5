"""The broker's message store: bodies as files under the data dir, an SQLite index of (job, seat, name)."""
from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

INDEX_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    job_id TEXT NOT NULL, to_seat TEXT NOT NULL, name TEXT NOT NULL, from_seat TEXT NOT NULL,
    size INTEGER NOT NULL, sha256 TEXT NOT NULL, file TEXT NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (job_id, to_seat, name));
CREATE INDEX IF NOT EXISTS messages_created ON messages(created);
"""


@dataclass(frozen=True)
class StoredMessage:
    job_id: str
    to_seat: str
    name: str
    from_seat: str
    size: int
    sha256: str
    file: Path
    created: float

    def view(self) -> dict[str, Any]:
        created = datetime.fromtimestamp(self.created, UTC).isoformat(timespec="milliseconds")
        return {"name": self.name, "from_seat": self.from_seat, "size": self.size, "sha256": self.sha256,
                "created_at": created.replace("+00:00", "Z")}


class BodyTooLarge(Exception):
    """The streamed body went past the size limit."""


class PendingBody:
    """A body being received: written to a temp file and hashed chunk by chunk, never held whole in memory."""

    def __init__(self, path: Path, limit: int):
        self.path = path
        self.limit = limit
        self.size = 0
        self._hash = hashlib.sha256()
        self._file = open(path, "wb")

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            raise BodyTooLarge()
        self._hash.update(chunk)
        self._file.write(chunk)

    def finish(self) -> str:
        """Flush to disk and return the body's sha256 hex."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return self._hash.hexdigest()

    def discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.path.unlink(missing_ok=True)


class MessageStore:
    """Messages under `<data_dir>/broker/`: `bodies/` (one file per message), `incoming/` (uploads in progress)."""

    def __init__(self, data_dir: Path, ttl_seconds: float):
        self.root = data_dir / "broker"
        self.bodies = self.root / "bodies"
        self.incoming = self.root / "incoming"
        for d in (self.bodies, self.incoming):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        for leftover in self.incoming.iterdir():  # uploads cut off by a crash or restart
            leftover.unlink(missing_ok=True)
        self.ttl = ttl_seconds
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(str(self.root / "index.sqlite3"), check_same_thread=False, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.executescript(INDEX_SCHEMA)

    def begin(self, limit: int) -> PendingBody:
        return PendingBody(self.incoming / f"{uuid.uuid4().hex}.part", limit)

    def commit(self, job_id: str, to_seat: str, name: str, from_seat: str, body: PendingBody,
               sha256: str) -> tuple[StoredMessage, bool]:
        """Store a received body under its name; returns (message, created). Same name, other bytes -> (old, False)
        with a different sha256, which the caller turns into 409."""
        with self._lock:
            existing = self.get(job_id, to_seat, name)
            if existing is not None:
                body.discard()
                return existing, False
            final = self.bodies / f"{uuid.uuid4().hex}.msg"
            os.replace(body.path, final)
            message = StoredMessage(job_id, to_seat, name, from_seat, body.size, sha256, final, time.time())
            self._conn.execute("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                               (job_id, to_seat, name, from_seat, body.size, sha256, final.name, message.created))
            return message, True

    def _row(self, row: sqlite3.Row) -> StoredMessage:
        return StoredMessage(row["job_id"], row["to_seat"], row["name"], row["from_seat"], row["size"],
                             row["sha256"], self.bodies / row["file"], row["created"])

    def get(self, job_id: str, to_seat: str, name: str) -> StoredMessage | None:
        with self._lock:
            row = self._conn.execute("SELECT * FROM messages WHERE job_id = ? AND to_seat = ? AND name = ? "
                                     "AND created > ?", (job_id, to_seat, name, time.time() - self.ttl)).fetchone()
        return self._row(row) if row else None

    def waiting(self, job_id: str, to_seat: str) -> list[StoredMessage]:
        """Unexpired messages waiting in a mailbox, oldest first."""
        with self._lock:
            rows = self._conn.execute("SELECT * FROM messages WHERE job_id = ? AND to_seat = ? AND created > ? "
                                      "ORDER BY created, name", (job_id, to_seat, time.time() - self.ttl)).fetchall()
        return [self._row(r) for r in rows]

    def delete(self, job_id: str, to_seat: str, name: str) -> bool:
        with self._lock:
            row = self._conn.execute("SELECT * FROM messages WHERE job_id = ? AND to_seat = ? AND name = ?",
                                     (job_id, to_seat, name)).fetchone()
            if row is None:
                return False
            self._conn.execute("DELETE FROM messages WHERE job_id = ? AND to_seat = ? AND name = ?",
                               (job_id, to_seat, name))
        # An open download keeps reading the unlinked file (POSIX), so deleting now is safe.
        (self.bodies / row["file"]).unlink(missing_ok=True)
        return True

    def expire(self) -> int:
        """Delete messages older than the TTL; returns how many."""
        cutoff = time.time() - self.ttl
        with self._lock:
            rows = self._conn.execute("SELECT * FROM messages WHERE created <= ?", (cutoff,)).fetchall()
            self._conn.execute("DELETE FROM messages WHERE created <= ?", (cutoff,))
        for row in rows:
            (self.bodies / row["file"]).unlink(missing_ok=True)
        return len(rows)

    def close(self) -> None:
        with self._lock:
            self._conn.close()
