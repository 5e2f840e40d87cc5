"""Room for a message at the broker: what one seat of a job has waiting unacknowledged is bounded (bytes, and
messages: empty ones cost an index row, a file and a listing entry each), and the disk under the data dir keeps a
reserve (the coordinator's database lives there too).

Both refusals are 507: a worker's broker client retries them with backoff, so a sender whose recipients are slow
to take its messages waits for room instead of failing.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from services.broker.store import Waiting
from services.server.config import DEFAULT_MAX_JOB_MESSAGES, DEFAULT_MAX_ORG_BYTES, DEFAULT_MAX_ORG_MESSAGES
from services.server.errors import InsufficientStorage

log = logging.getLogger("cape.broker")


def _gib(size: int) -> str:
    return f"{size / 1024**3:.3g} GiB"


@dataclass(frozen=True)
class Room:
    max_job_bytes: int  # per sending seat and job, waiting for its recipients
    min_free_bytes: int  # kept free on the data dir's file system
    max_job_messages: int = DEFAULT_MAX_JOB_MESSAGES  # per sending seat and job, waiting for its recipients
    max_org_bytes: int = DEFAULT_MAX_ORG_BYTES  # per sending organization across its jobs, waiting likewise
    max_org_messages: int = DEFAULT_MAX_ORG_MESSAGES  # ... and in number

    def check_disk(self, root: Path, size: int) -> None:
        """Refuse a body of `size` bytes (0 when not declared) that would eat into the disk's reserve."""
        free = shutil.disk_usage(root).free
        if free - size < self.min_free_bytes:
            log.warning("refused a message of %d bytes: %d bytes free, %d kept in reserve", size, free,
                        self.min_free_bytes)
            raise InsufficientStorage("the broker's disk is nearly full; try again later (its operator frees space "
                                      "or lowers --min-free-bytes)", code="broker_disk_full")

    def check_job(self, waiting: Waiting, size: int, seat: str) -> None:
        """Refuse a body of `size` bytes when seat `seat` already has `waiting` unacknowledged in the job."""
        _refuse_past(waiting, size, self.max_job_bytes, self.max_job_messages, f"seat {seat}", "in this job",
                     "seat and job", "job_quota_exceeded")

    def check_org(self, waiting: Waiting, size: int) -> None:
        """Refuse a body of `size` bytes when the sender's organization already has `waiting` unacknowledged across
        its jobs: with seats in many jobs it could otherwise hold many times `max_job_bytes`, and a full disk fails
        every other project's messages."""
        _refuse_past(waiting, size, self.max_org_bytes, self.max_org_messages, "your organization",
                     "across its jobs", "organization", "org_quota_exceeded")


def _refuse_past(waiting: Waiting, size: int, max_bytes: int, max_messages: int, holder: str, where: str, per: str,
                 code: str) -> None:
    """507 `code` when `holder`'s waiting messages and a body of `size` bytes would pass either bound."""
    if waiting.size + size > max_bytes:
        held, most = _gib(waiting.size), _gib(max_bytes)
    elif waiting.count + 1 > max_messages:
        held, most = f"{waiting.count} messages", str(max_messages)
    else:
        return
    raise InsufficientStorage(f"{holder} has {held} waiting for its recipients {where} and this broker holds at most "
                              f"{most} per {per}; send again once they took some", code=code)
