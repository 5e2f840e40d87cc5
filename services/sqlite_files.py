"""Opening the server's SQLite files: one that cannot be opened, or is no database, is said in one line naming
the file and what to do, not as sqlite3's traceback (a file left by `sudo cape-server admin ...`, a bad restore)."""
from __future__ import annotations

import os
import pwd
import sqlite3
from pathlib import Path

from services.server.storage_trouble import is_storage_refusal


class DatabaseUnusable(Exception):
    """An SQLite file of the data dir cannot be used; the message names it and the fix."""


def refuse_newer_schema(conn: sqlite3.Connection, path: Path, version: int) -> None:
    """Refuse a database whose schema a newer cape-server wrote (`PRAGMA user_version` above `version`, the schema
    this one writes; `mark_schema` sets it). A server taken back to an older version wrote to tables it no longer
    knew: it said ok, and every broker message was a 500 until the jobs ended at their timeout."""
    found = conn.execute("PRAGMA user_version").fetchone()[0]
    if found > version:
        raise DatabaseUnusable(f"{path} was written by a newer cape-server (schema {found}; this one knows up to "
                               f"{version}): run that version, or put back the backup taken before the upgrade "
                               "(`cape-server admin backup`, with a copy of the data dir's broker/ folder)")


def mark_schema(conn: sqlite3.Connection, version: int) -> None:
    """Record that the database now has schema `version` (after any upgrade of it)."""
    conn.execute(f"PRAGMA user_version = {int(version)}")


def unusable(path: Path, exc: sqlite3.Error, remedy: str) -> DatabaseUnusable:
    """The error for `exc` raised while opening `path`; `remedy` says what to do about a file that is no database."""
    if isinstance(exc, sqlite3.DatabaseError) and "not a database" in str(exc):
        return DatabaseUnusable(f"{path} is not an SQLite database (a bad restore, or another file put in its "
                                f"place?); {remedy}")
    if is_storage_refusal(exc):
        return DatabaseUnusable(f"{path} cannot be written ({exc}): its disk is full or read-only; free space or "
                                "make it writable, then try again")
    try:
        info = path.stat()
    except OSError:
        return DatabaseUnusable(f"{path} cannot be opened ({exc}); check the data dir's permissions")
    me = _user(os.geteuid())
    if info.st_uid == os.geteuid() and os.access(path, os.R_OK | os.W_OK):  # not a question of ownership
        return DatabaseUnusable(f"{path} cannot be opened ({exc})")
    return DatabaseUnusable(f"{path} cannot be opened by user {me} ({exc}): it is owned by {_user(info.st_uid)}, "
                            f"mode {info.st_mode & 0o777:o}; run the server as its owner, or chown the data dir to "
                            f"{me}")


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
