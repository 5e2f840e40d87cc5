"""What `cape-server serve` was asked to run."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

DEFAULT_MAX_MESSAGE_BYTES = 2 * 1024**3
DEFAULT_MESSAGE_TTL = 7 * 24 * 3600.0
DEFAULT_MAX_JOB_BYTES = 16 * 1024**3  # per sending seat and job; a job at n = 10^6, d = 32 keeps 0.26 GB waiting
# Per sending seat and job: a job sends a few dozen messages plus one per 2^15 rows of its matrices, and its recipient
# takes them as they come, so this binds only a sender of empty messages (each an index row, a file, a listing entry).
DEFAULT_MAX_JOB_MESSAGES = 10_000
# Per sending organization, across its jobs: seats in many jobs could otherwise hold many times --max-job-bytes.
DEFAULT_MAX_ORG_BYTES = 2 * DEFAULT_MAX_JOB_BYTES
# ... and in number: each put sums them under the store's lock (500,000 took 63 ms there, holding every put up).
DEFAULT_MAX_ORG_MESSAGES = 20_000
DEFAULT_MIN_FREE_BYTES = 1024**3
# Below it the coordinator takes nothing new: above the broker's reserve, so the messages of running jobs keep room.
DEFAULT_CREATE_RESERVE_BYTES = 2 * 1024**3
# A message body from which no byte arrives for this long is given up: a sender whose network dropped the flow
# (a NAT, a pulled cable) never closes it, and its partial file would stay until a restart.
DEFAULT_BODY_IDLE_SECONDS = 120.0
DEFAULT_APPROVAL_TTL = 30 * 24 * 3600.0  # a job not approved by every data owner within it ends in Error


@dataclass(frozen=True)
class ServerConfig:
    data_dir: Path
    only: Literal["coordinator", "broker"] | None = None
    coordinator_url: str | None = None  # where a broker running alone asks about job membership
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    message_ttl: float = DEFAULT_MESSAGE_TTL
    max_job_bytes: int = DEFAULT_MAX_JOB_BYTES
    max_job_messages: int = DEFAULT_MAX_JOB_MESSAGES
    max_org_bytes: int = DEFAULT_MAX_ORG_BYTES
    max_org_messages: int = DEFAULT_MAX_ORG_MESSAGES
    min_free_bytes: int = DEFAULT_MIN_FREE_BYTES
    create_reserve_bytes: int = DEFAULT_CREATE_RESERVE_BYTES
    body_idle_seconds: float = DEFAULT_BODY_IDLE_SECONDS
    approval_ttl: float | None = DEFAULT_APPROVAL_TTL  # None: jobs wait for approval for ever
    job_sweep_seconds: float = 5.0  # how often the start timeout is applied, and ended jobs' messages dropped

    @property
    def runs_coordinator(self) -> bool:
        return self.only in (None, "coordinator")

    @property
    def runs_broker(self) -> bool:
        return self.only in (None, "broker")

    @property
    def coordinator_db_path(self) -> Path:
        return self.data_dir / "coordinator.sqlite3"
