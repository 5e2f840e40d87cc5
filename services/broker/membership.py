"""Which seat of a job a broker caller's organization token holds: from the coordinator's database when both run
in one process, or by asking the coordinator's worker endpoint when the broker runs alone."""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Protocol

import anyio
import httpx

from services.connection_errors import connection_problem
from services.coordinator import identity
from services.coordinator.db import Database
from services.coordinator.jobs import find_job, parties, seat_of
from services.coordinator.permissions import require_worker
from services.server.errors import ApiError, Conflict, Forbidden, NotFound, Unauthorized, Unavailable

log = logging.getLogger("cape.broker")


@dataclass(frozen=True)
class JobAccess:
    """The caller's seat in a job, all the job's seats (the mailboxes it may write to), the job's status, and the
    caller's organization (its id: what it has waiting across jobs is bounded)."""

    seat: str
    seats: tuple[str, ...]
    status: str = "Started"
    org: str = ""


class JobMembership(Protocol):
    """Authorizes a broker caller for one job."""

    async def access(self, token: str | None, job_id: str) -> JobAccess:
        """The caller's seat in the job; raises Unauthorized (401), Forbidden (403) or NotFound (404)."""
        ...

    async def close(self) -> None: ...


class LocalMembership:
    """Reads the coordinator's database directly (broker and coordinator in one process)."""

    def __init__(self, db: Database):
        self.db = db

    async def access(self, token: str | None, job_id: str) -> JobAccess:
        # The database lock may be held by a request in the thread pool: wait for it off the event loop, so
        # long polls and streaming transfers keep moving meanwhile.
        return await anyio.to_thread.run_sync(self._access, token, job_id)

    def _access(self, token: str | None, job_id: str) -> JobAccess:
        with self.db.transaction() as conn:
            principal = identity.authenticate(conn, token)
            require_worker(principal)
            job = find_job(conn, job_id)
            seat = seat_of(conn, job_id, principal.org_id or "")
            seats = tuple(p["seat"] for p in parties(conn, job_id))
        identity.note_use(self.db, principal)
        if seat is None:
            raise Forbidden("your organization has no seat in this job", code="no_seat")
        return JobAccess(seat, seats, job["status"], principal.org_id or "")

    async def close(self) -> None:
        return None


class RemoteMembership:
    """Asks `GET {coordinator}/v1/worker/jobs/{id}` with the caller's token; answers are cached briefly."""

    def __init__(self, coordinator_url: str, cache_seconds: float = 10.0, timeout: float = 10.0):
        self.base = coordinator_url.rstrip("/")
        self.cache_seconds = cache_seconds
        self._cache: dict[tuple[str, str], tuple[JobAccess, float]] = {}
        self._client = httpx.AsyncClient(timeout=timeout)
        self._failing = False  # the coordinator could not be reached: said once in this server's log, until it can

    async def access(self, token: str | None, job_id: str) -> JobAccess:
        if not token:
            raise Unauthorized("this endpoint needs a token: send 'Authorization: Bearer <token>'", code="no_token")
        # Key the cache by a hash so the token itself is kept in one place only (the request).
        key = (hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest(), job_id)
        hit = self._cache.get(key)
        if hit and hit[1] > time.monotonic():
            return hit[0]
        try:
            response = await self._client.get(f"{self.base}/v1/worker/jobs/{job_id}",
                                              headers={"Authorization": f"Bearer {token}"})
        except httpx.HTTPError as exc:
            reason = connection_problem(exc, self.base, "SSL_CERT_FILE")
            if not self._failing:
                log.warning("cannot reach the coordinator at %s (%s); workers get 503 until it answers", self.base,
                            reason)
                self._failing = True
            raise Unavailable(f"the broker cannot reach its coordinator at {self.base} ({reason}); try again "
                              "shortly") from None
        if self._failing:
            log.info("the coordinator at %s answers again", self.base)
            self._failing = False
        if response.status_code == 200:
            job = response.json()
            party = job["parties"].get(job["seat"]) or {}
            access = JobAccess(job["seat"], tuple(job["parties"]), job["status"],
                               str((party.get("organization") or {}).get("id") or ""))
            if len(self._cache) > 10_000:  # bound memory: drop everything, it refills on demand
                self._cache.clear()
            self._cache[key] = (access, time.monotonic() + self.cache_seconds)
            return access
        error_type: type[ApiError] = {401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict}.get(
            response.status_code, Unavailable)
        try:
            error = response.json()["error"]
            raise error_type(str(error["message"]), code=str(error["code"]))
        except (ValueError, KeyError, TypeError):
            raise error_type(f"the coordinator answered {response.status_code}") from None

    async def close(self) -> None:
        await self._client.aclose()
