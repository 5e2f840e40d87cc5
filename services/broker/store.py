"""The broker's message store: bodies as files under the data dir, an SQLite index of (job, seat, name).

Bodies are opaque and not hashed: the workers seal and authenticate every message end to end, so a digest here
would only cost a pass over every byte. A second put under a stored name is compared byte for byte instead.
"""
from __future__ import annotations

import enum
import filecmp
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from services.durable_files import fsync_dir
from services.sqlite_files import mark_schema, refuse_newer_schema, unusable

INDEX_SCHEMA_VERSION = 2  # in `PRAGMA user_version`: one more with each change of the index's schema
INDEX_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    job_id TEXT NOT NULL, to_seat TEXT NOT NULL, name TEXT NOT NULL, from_seat TEXT NOT NULL,
    size INTEGER NOT NULL, file TEXT NOT NULL, created REAL NOT NULL, from_org TEXT,
    PRIMARY KEY (job_id, to_seat, name));
CREATE INDEX IF NOT EXISTS messages_created ON messages(created);
"""
# After the upgrade below: an index from before has no from_org column for it until then.
ORG_INDEX = "CREATE INDEX IF NOT EXISTS messages_from_org ON messages(from_org, created, size)"  # covers sent_by_org


@dataclass(frozen=True)
class StoredMessage:
    job_id: str
    to_seat: str
    name: str
    from_seat: str
    size: int
    file: Path
    created: float

    def view(self) -> dict[str, Any]:
        created = datetime.fromtimestamp(self.created, UTC).isoformat(timespec="milliseconds")
        return {"name": self.name, "from_seat": self.from_seat, "size": self.size,
                "created_at": created.replace("+00:00", "Z")}


class Waiting(NamedTuple):
    """What one seat of a job (or one organization) has waiting unacknowledged at the broker."""

    count: int
    size: int


class Commit(enum.Enum):
    """What storing a body under a name did."""

    CREATED = "created"
    DUPLICATE = "duplicate"  # the name already held these same bytes
    CONFLICT = "conflict"  # the name already held other bytes


class BodyTooLarge(Exception):
    """The streamed body went past the size limit."""


class PendingBody:
    """A body being received: written to a temp file chunk by chunk, never held whole in memory."""

    def __init__(self, path: Path, limit: int):
        self.path = path
        self.limit = limit
        self.size = 0
        self._file = open(path, "wb", buffering=0)  # chunks are large: no buffer to copy them through

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            raise BodyTooLarge()
        view = memoryview(chunk)
        while view:  # a raw file may take less than asked
            view = view[self._file.write(view):]

    def finish(self) -> None:
        """Make the body durable."""
        os.fsync(self._file.fileno())
        self._file.close()

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
        index = self.root / "index.sqlite3"
        try:
            self._conn = sqlite3.connect(str(index), check_same_thread=False, isolation_level=None)
            self._conn.row_factory = sqlite3.Row
            self._conn.execute("PRAGMA journal_mode=WAL")
            refuse_newer_schema(self._conn, index, INDEX_SCHEMA_VERSION)
            self._conn.executescript(INDEX_SCHEMA)
            columns = {row["name"] for row in self._conn.execute("PRAGMA table_info(messages)")}
            if "sha256" in columns:  # an index written before bodies stopped being hashed
                self._conn.execute("ALTER TABLE messages DROP COLUMN sha256")
            if "from_org" not in columns:  # before organizations were bounded: its messages count for none
                self._conn.execute("ALTER TABLE messages ADD COLUMN from_org TEXT")
            self._conn.execute(ORG_INDEX)
            mark_schema(self._conn, INDEX_SCHEMA_VERSION)
        except sqlite3.Error as exc:
            raise unusable(index, exc, f"remove it and {self.bodies} to start the broker empty (the jobs whose "
                                       "messages it held end at their timeout)") from None
        self.orphans_removed = self._remove_orphan_bodies()

    def _remove_orphan_bodies(self) -> int:
        """Delete body files no index row names (a crash between storing a body and indexing it): nothing would
        ever read or expire them."""
        named = {row[0] for row in self._conn.execute("SELECT file FROM messages")}
        orphans = [f for f in self.bodies.iterdir() if f.name not in named]
        for orphan in orphans:
            orphan.unlink(missing_ok=True)
        return len(orphans)

    def begin(self, limit: int) -> PendingBody:
        return PendingBody(self.incoming / f"{uuid.uuid4().hex}.part", limit)

    def commit(self, job_id: str, to_seat: str, name: str, from_seat: str, body: PendingBody,
               room: Callable[[Waiting], None] = lambda waiting: None, from_org: str = "") -> Commit:
        """Store a received (finished) body under its name. A name already stored keeps its body; the new one is
        discarded, and the answer says whether it held the same bytes (a repeated put) or others (a conflict).
        `room` gets what the sender has waiting in the job (concurrent puts counted) and raises to refuse; it may
        ask `sent_by_org` too (the store's lock is held, and taken again by the same thread)."""
        with self._lock:
            # An expired message not yet swept still holds its name's row: drop it, so the name is free again.
            self._delete_where("job_id = ? AND to_seat = ? AND name = ? AND created <= ?",
                               (job_id, to_seat, name, time.time() - self.ttl))
            existing = self.get(job_id, to_seat, name)
            if existing is not None:
                try:
                    same = filecmp.cmp(existing.file, body.path, shallow=False)
                except FileNotFoundError:  # acknowledged or expired meanwhile: the name is taken all the same
                    same = False
                body.discard()
                return Commit.DUPLICATE if same else Commit.CONFLICT
            room(self.sent_from(job_id, from_seat))
            final = self.bodies / f"{uuid.uuid4().hex}.msg"
            os.replace(body.path, final)
            # Before the row: a power loss could otherwise keep the row and lose the rename, and the body would be
            # swept at start as an incoming/ leftover while its sender took the put as done.
            fsync_dir(self.bodies)
            try:
                self._conn.execute("INSERT INTO messages (job_id, to_seat, name, from_seat, size, file, created, "
                                   "from_org) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                   (job_id, to_seat, name, from_seat, body.size, final.name, time.time(),
                                    from_org or None))
            except BaseException:
                final.unlink(missing_ok=True)  # never indexed: nothing would read or expire it
                raise
            return Commit.CREATED

    def _row(self, row: sqlite3.Row) -> StoredMessage:
        return StoredMessage(row["job_id"], row["to_seat"], row["name"], row["from_seat"], row["size"],
                             self.bodies / row["file"], row["created"])

    def get(self, job_id: str, to_seat: str, name: str) -> StoredMessage | None:
        with self._lock:
            row = self._conn.execute("SELECT * FROM messages WHERE job_id = ? AND to_seat = ? AND name = ? "
                                     "AND created > ?", (job_id, to_seat, name, time.time() - self.ttl)).fetchone()
        return self._row(row) if row else None

    def sent_from(self, job_id: str, from_seat: str) -> Waiting:
        """The unexpired messages a seat sent in a job that no recipient acknowledged yet: how many, what size."""
        with self._lock:
            row = self._conn.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM messages WHERE job_id = ? AND "
                                     "from_seat = ? AND created > ?",
                                     (job_id, from_seat, time.time() - self.ttl)).fetchone()
        return Waiting(int(row[0]), int(row[1]))

    def sent_by_org(self, org: str) -> Waiting:
        """The unexpired messages an organization sent, in all its jobs, that no recipient acknowledged yet."""
        with self._lock:
            row = self._conn.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM messages WHERE from_org = ? AND "
                                     "created > ?", (org, time.time() - self.ttl)).fetchone()
        return Waiting(int(row[0]), int(row[1]))

    def bytes_from(self, job_id: str, from_seat: str) -> int:
        """The size of the unexpired messages a seat sent in a job that no recipient acknowledged yet."""
        return self.sent_from(job_id, from_seat).size

    def waiting(self, job_id: str, to_seat: str, limit: int | None = None) -> list[StoredMessage]:
        """Unexpired messages waiting in a mailbox, oldest first; the first `limit` only when given."""
        with self._lock:
            rows = self._conn.execute("SELECT * FROM messages WHERE job_id = ? AND to_seat = ? AND created > ? "
                                      "ORDER BY created, name LIMIT ?",
                                      (job_id, to_seat, time.time() - self.ttl, -1 if limit is None else limit)
                                      ).fetchall()
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

    def job_ids(self) -> list[str]:
        """The jobs that have messages stored (waiting or expired but not yet swept)."""
        with self._lock:
            return [row[0] for row in self._conn.execute("SELECT DISTINCT job_id FROM messages")]

    def purge_job(self, job_id: str) -> int:
        """Delete every message of one job (it ended: nobody will read them); returns how many."""
        return self._delete_where("job_id = ?", (job_id,))

    def expire(self) -> int:
        """Delete messages older than the TTL; returns how many."""
        return self._delete_where("created <= ?", (time.time() - self.ttl,))

    def _delete_where(self, condition: str, params: tuple[Any, ...]) -> int:
        """Drop the index rows matching `condition` (SQL over this class's own columns), then their bodies."""
        with self._lock:
            rows = self._conn.execute(f"SELECT file FROM messages WHERE {condition}", params).fetchall()
            self._conn.execute(f"DELETE FROM messages WHERE {condition}", params)
        for row in rows:
            (self.bodies / row["file"]).unlink(missing_ok=True)
        return len(rows)

    def close(self) -> None:
        with self._lock:
            self._conn.close()
