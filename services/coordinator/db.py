"""The coordinator's embedded SQLite database: one connection behind a lock, WAL, schema on open."""
from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from services.sqlite_files import mark_schema, refuse_newer_schema, unusable

log = logging.getLogger("cape.coordinator")

SCHEMA = """
CREATE TABLE IF NOT EXISTS organizations (
    id TEXT PRIMARY KEY, label TEXT NOT NULL UNIQUE, name TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS users (
    id TEXT PRIMARY KEY, email TEXT NOT NULL UNIQUE, created_at TEXT NOT NULL, created_by_org_id TEXT);
CREATE TABLE IF NOT EXISTS memberships (
    user_id TEXT NOT NULL REFERENCES users(id), org_id TEXT NOT NULL REFERENCES organizations(id),
    role TEXT NOT NULL, PRIMARY KEY (user_id, org_id));
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, user_id TEXT, org_id TEXT, secret_hash TEXT NOT NULL,
    description TEXT, created_at TEXT NOT NULL, revoked_at TEXT, last_used_at TEXT);
CREATE TABLE IF NOT EXISTS workers (
    org_id TEXT PRIMARY KEY REFERENCES organizations(id), encryption_public_key TEXT,
    signing_public_key TEXT, keys_updated_at TEXT, last_seen TEXT, version TEXT, programs TEXT, stopped_at TEXT);
CREATE TABLE IF NOT EXISTS projects (
    id TEXT PRIMARY KEY, label TEXT NOT NULL UNIQUE, name TEXT NOT NULL, description TEXT NOT NULL,
    owner_org_id TEXT NOT NULL, helper_org_id TEXT, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS project_organizations (
    project_id TEXT NOT NULL, org_id TEXT NOT NULL, added_at TEXT NOT NULL, joined_at TEXT,
    PRIMARY KEY (project_id, org_id));
CREATE TABLE IF NOT EXISTS dataviews (
    id TEXT PRIMARY KEY, project_id TEXT NOT NULL, name TEXT NOT NULL, uri TEXT NOT NULL,
    owner_org_id TEXT NOT NULL, schema_json TEXT NOT NULL, created_at TEXT NOT NULL, UNIQUE (project_id, name));
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, project_id TEXT NOT NULL, type TEXT NOT NULL, status TEXT NOT NULL,
    task_json TEXT NOT NULL, model_owner_org_id TEXT NOT NULL, outputs_to TEXT NOT NULL, timeout INTEGER NOT NULL,
    submitted_by_user_id TEXT NOT NULL, submitted_by_org_id TEXT NOT NULL, created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL, approved_at TEXT, error TEXT, metrics_json TEXT, result_location TEXT);
CREATE TABLE IF NOT EXISTS job_parties (
    job_id TEXT NOT NULL, seat TEXT NOT NULL, org_id TEXT NOT NULL, state TEXT NOT NULL, progress REAL NOT NULL,
    message TEXT, updated_at TEXT NOT NULL, PRIMARY KEY (job_id, seat));
CREATE TABLE IF NOT EXISTS job_approvals (
    job_id TEXT NOT NULL, org_id TEXT NOT NULL, decision TEXT NOT NULL, reason TEXT, decided_at TEXT,
    PRIMARY KEY (job_id, org_id));
CREATE INDEX IF NOT EXISTS job_parties_org ON job_parties(org_id);
CREATE INDEX IF NOT EXISTS jobs_project ON jobs(project_id);
-- The listings' order, newest first by (created_at, id): a page reads only its own rows (paging.py).
CREATE INDEX IF NOT EXISTS jobs_project_created_id ON jobs(project_id, created_at, id);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status);
CREATE INDEX IF NOT EXISTS jobs_status_created ON jobs(status, created_at);
CREATE INDEX IF NOT EXISTS jobs_project_status_created_id ON jobs(project_id, status, created_at, id);
CREATE INDEX IF NOT EXISTS project_organizations_org ON project_organizations(org_id, project_id);
CREATE INDEX IF NOT EXISTS memberships_org ON memberships(org_id);
CREATE INDEX IF NOT EXISTS tokens_user ON tokens(user_id, created_at);
CREATE INDEX IF NOT EXISTS tokens_org ON tokens(org_id, created_at);
"""


READERS_KEPT = 4  # idle read connections kept for the next listing
# The schema's version in `PRAGMA user_version`: one more whenever SCHEMA or `_upgrade` changes, so an older server
# refuses a database a newer one upgraded (services/sqlite_files.py).
SCHEMA_VERSION = 2


def now_iso() -> str:
    """The current time as an ISO 8601 UTC string (what every timestamp of the API looks like)."""
    return iso(datetime.now(UTC))


def iso(moment: datetime) -> str:
    """`moment` (UTC) as the stored timestamps are written, so that SQL compares them as strings."""
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def new_id() -> str:
    """An opaque id (uuid4 hex)."""
    return uuid.uuid4().hex


def _upgrade(conn: sqlite3.Connection) -> None:
    """Bring a database written by an earlier version up to SCHEMA."""
    if "created_by_org_id" not in {row["name"] for row in conn.execute("PRAGMA table_info(users)")}:
        conn.execute("ALTER TABLE users ADD COLUMN created_by_org_id TEXT")  # accounts from before: unknown maker
    if "last_used_at" not in {row["name"] for row in conn.execute("PRAGMA table_info(tokens)")}:
        conn.execute("ALTER TABLE tokens ADD COLUMN last_used_at TEXT")
    if "stopped_at" not in {row["name"] for row in conn.execute("PRAGMA table_info(workers)")}:
        conn.execute("ALTER TABLE workers ADD COLUMN stopped_at TEXT")
    if "joined_at" not in {row["name"] for row in conn.execute("PRAGMA table_info(project_organizations)")}:
        conn.execute("ALTER TABLE project_organizations ADD COLUMN joined_at TEXT")
        # Members from before joining existed took seats as they were added: their projects go on as they were.
        conn.execute("UPDATE project_organizations SET joined_at = added_at")
    # Superseded by the same columns and id (the listings' order): kept, each would only cost every write.
    conn.execute("DROP INDEX IF EXISTS jobs_project_created")
    conn.execute("DROP INDEX IF EXISTS jobs_project_status")
    try:
        # Emails are one account whatever their case: 'Ann@Bank.example' must not be a second 'ann@bank.example'.
        conn.execute("CREATE UNIQUE INDEX IF NOT EXISTS users_email_nocase ON users(email COLLATE NOCASE)")
    except sqlite3.IntegrityError:
        log.warning("two accounts' emails differ only in case; lookups by email take the older one")


class Database:
    """The coordinator's state in `<data_dir>/coordinator.sqlite3`.

    One connection shared by all threads behind a lock: the coordinator's load is small, and a single writer
    keeps every read-check-write sequence (approvals, status transitions) atomic without retry loops. Long reads
    (`reading`: the views of a listing) go through read-only connections of their own, on a snapshot that WAL
    keeps while the writer goes on: building 5,000 job views under the lock held every worker's request for it.
    """

    def __init__(self, path: Path):
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.RLock()
        # Idle read connections, at most READERS_KEPT: one per thread leaked a connection (2 files) whenever the
        # server's thread pool ended an idle thread.
        self._readers: queue.LifoQueue[sqlite3.Connection] = queue.LifoQueue(maxsize=READERS_KEPT)
        try:
            self._conn = self._connect()
            self._conn.execute("PRAGMA journal_mode=WAL")
            # FULL: each commit is on disk before its answer; NORMAL could lose a worker's acknowledged report (a
            # `completed` it has since removed from its spool) to a power loss.
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            refuse_newer_schema(self._conn, path, SCHEMA_VERSION)
            self._conn.executescript(SCHEMA)
            _upgrade(self._conn)
            mark_schema(self._conn, SCHEMA_VERSION)
        except sqlite3.Error as exc:
            raise unusable(path, exc, "put back the copy `cape-server admin backup` made") from None

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        conn.row_factory = sqlite3.Row
        return conn

    @contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        """Yield a read-only connection inside one read transaction (a consistent snapshot), not holding the
        writer's lock. For reads only: a write through it fails."""
        try:
            conn = self._readers.get_nowait()
        except queue.Empty:
            conn = self._connect()
            conn.execute("PRAGMA query_only=ON")
        try:
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.execute("ROLLBACK")  # nothing to keep: it only read
        except BaseException:
            conn.close()
            raise
        try:
            self._readers.put_nowait(conn)
        except queue.Full:
            conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Yield the connection inside BEGIN IMMEDIATE ... COMMIT (ROLLBACK on any exception)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            while True:
                try:
                    self._readers.get_nowait().close()
                except queue.Empty:
                    break
            self._conn.close()
