"""A full or read-only disk under the data dir: answered 507 in words, said in the log once a minute (not as a
traceback per request), and shown by /healthz while it lasts."""
from __future__ import annotations

import errno
import logging
import sqlite3
import time

from services.server.errors import InsufficientStorage

log = logging.getLogger("cape.server")
SAY_EVERY_SECONDS = 60.0
RECENT_SECONDS = 60.0  # /healthz reports trouble this long after the last refusal
_SQLITE_CODES = {sqlite3.SQLITE_FULL, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_IOERR}
_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG}


def is_storage_refusal(exc: BaseException) -> bool:
    """Whether `exc` is the disk refusing a write (full, read-only, over a quota or a size limit, failing), not a
    bug."""
    if isinstance(exc, sqlite3.OperationalError):  # the primary code: SQLITE_IOERR_WRITE is an SQLITE_IOERR
        return (getattr(exc, "sqlite_errorcode", -1) & 0xFF) in _SQLITE_CODES or "disk is full" in str(exc)
    return isinstance(exc, OSError) and exc.errno in _ERRNOS


class StorageTrouble:
    """When the data dir's disk last refused a write; one per app."""

    def __init__(self) -> None:
        self.last: float | None = None
        self._said_at = -SAY_EVERY_SECONDS

    def refused(self, exc: BaseException, what: str) -> InsufficientStorage:
        """Record a refusal of `what` (e.g. "POST /v1/projects") and return the client's answer."""
        now = time.monotonic()
        self.last = now
        if now - self._said_at >= SAY_EVERY_SECONDS:
            self._said_at = now
            log.error("the data dir's disk refuses writes (%s, on %s): requests that change anything fail until "
                      "space is freed or it is writable again (said once a minute)", exc, what)
        return InsufficientStorage("the server's disk is full or read-only, so it cannot record this; try again "
                                   "later (its operator must free space)", code="server_disk_full")

    def problem(self) -> str | None:
        """A sentence for /healthz while refusals are recent, else None."""
        if self.last is not None and time.monotonic() - self.last < RECENT_SECONDS:
            return "the data dir's disk refused a write in the last minute (full or read-only)"
        return None
