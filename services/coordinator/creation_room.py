"""Room for new things at the coordinator: below a reserve of free space on the data dir's disk, it takes no new
projects, dataviews, jobs, users or tokens, while everything the jobs already there need (reports, heartbeats,
approvals, stops, the broker's messages above its own --min-free-bytes) goes on.

Without it one member submitting jobs of 1,000 long column names (200 KB each, 114 a second here) grew the database
until the disk was full, and then every organization's reports and messages failed with it.
"""
from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path

from services.coordinator.identity import Principal
from services.server.errors import InsufficientStorage

log = logging.getLogger("cape.coordinator")
SAY_EVERY_SECONDS = 60.0


def _mib(size: int) -> str:
    return f"{size / 1024**2:.0f} MiB"


class CreationRoom:
    """Refuses creations while `directory`'s disk has less than `reserve` bytes free (0: never)."""

    def __init__(self, directory: Path, reserve: int):
        self.directory = directory
        self.reserve = reserve
        self._lock = threading.Lock()
        self._said_at = -SAY_EVERY_SECONDS

    def check(self, principal: Principal, what: str) -> None:
        """Raise 507 `server_disk_low` if making `what` (e.g. "a job") would eat into the reserve."""
        if self.reserve <= 0:
            return
        free = shutil.disk_usage(self.directory).free
        if free >= self.reserve:
            return
        with self._lock:  # said once a minute, naming who asked: a member creating in bulk shows up here
            now = time.monotonic()
            say = now - self._said_at >= SAY_EVERY_SECONDS
            if say:
                self._said_at = now
        if say:
            log.warning("refused %s from %s: %d bytes free on the data dir's disk, below the %d kept for the jobs "
                        "already running (--create-reserve-bytes; said once a minute)", what,
                        principal.email or principal.token_id, free, self.reserve)
        raise InsufficientStorage(
            f"the server's disk has {_mib(free)} free, less than the {_mib(self.reserve)} it keeps for the jobs "
            "already running, so it takes no new projects, dataviews, jobs, users or tokens; try again once its "
            "operator has freed space", code="server_disk_low")
