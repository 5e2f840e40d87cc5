"""The broker's HTTP API under `/broker/v1`: per-job mailboxes of opaque, streamed message bodies."""
from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any, BinaryIO

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.requests import ClientDisconnect

from services.broker.mailboxes import MailboxSignals
from services.broker.membership import JobAccess, JobMembership
from services.broker.room import Room
from services.broker.store import BodyTooLarge, Commit, MessageStore, Waiting
from services.coordinator.audit import RefusedActions, RefusedTokens
from services.coordinator.views import JobsWaiting, WaitingMessage
from services.server.errors import (
    ApiError, Conflict, Forbidden, InsufficientStorage, InvalidRequest, NotFound, RequestTimeout, TooLarge,
    Unauthorized, Unavailable,
)
from services.server.config import DEFAULT_BODY_IDLE_SECONDS
from services.server.storage_trouble import StorageTrouble, is_storage_refusal

log = logging.getLogger("cape.broker")

NAME_PATTERN = r"^[A-Za-z0-9._-]{1,200}$"
_NAME = re.compile(NAME_PATTERN)

bearer = HTTPBearer(auto_error=False, scheme_name="WorkerToken",
                    description="a worker's organization token (`<token_id>,<secret>`)")
MessageName = Path(pattern=NAME_PATTERN, description="`[A-Za-z0-9._-]{1,200}`")
JOB_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
_JOB_ID = re.compile(JOB_ID_PATTERN)
JobId = Path(pattern=JOB_ID_PATTERN)
MAX_JOBS_PER_LIST = 50  # a worker runs a few jobs at a time; more in one request is not a worker's
# A listing names a mailbox's oldest messages only: a worker takes them and lists again. Whole, a mailbox flooded by a
# partner listed 200,000 names in 4 s on the event loop, holding every other request up, at each of the victim's polls.
LISTED_PER_MAILBOX = 1000


CHUNK = 1 << 20
DISK_CHECK_BYTES = 64 << 20  # how often a growing body is checked against the disk's reserve (one statvfs)
UNAPPROVED_STATUSES = ("NeedsApproval", "Rejected")


async def _arriving(chunks: AsyncIterator[bytes], idle_seconds: float) -> AsyncIterator[bytes]:
    """`chunks` (a request body), raising `TimeoutError` when none arrives for `idle_seconds`."""
    iterator = aiter(chunks)
    while True:
        try:
            async with asyncio.timeout(idle_seconds):
                chunk = await anext(iterator)
        except StopAsyncIteration:
            return
        yield chunk


async def _chunks(file: BinaryIO) -> AsyncIterator[bytes]:
    try:
        while chunk := file.read(CHUNK):
            yield chunk
    finally:
        file.close()


def broker_router(store: MessageStore, membership: JobMembership, signals: MailboxSignals,
                  max_message_bytes: int, room: Room, storage: StorageTrouble | None = None,
                  refused: RefusedTokens | None = None, body_idle_seconds: float = DEFAULT_BODY_IDLE_SECONDS,
                  forbidden: RefusedActions | None = None) -> APIRouter:
    """All `/broker/v1` endpoints over one store and one way of authorizing callers; `storage` notes a disk that
    refuses writes (for /healthz), `refused` counts callers refused for their token and `forbidden` those refused
    a job they have no seat in (for the audit log); a body from which nothing arrives for `body_idle_seconds` is
    given up."""
    router = APIRouter(prefix="/broker/v1", tags=["broker"])
    storage = storage or StorageTrouble()
    refused = refused or RefusedTokens()
    forbidden = forbidden or RefusedActions()

    async def access(request: Request, token: str | None, job_id: str) -> JobAccess:
        try:
            return await membership.access(token, job_id)
        except Unauthorized:
            refused.note(request.client.host if request.client else "unknown")
            raise
        except Forbidden as exc:  # a valid token (else 401 above): its id is no secret
            forbidden.note(f"the worker with token {str(token).split(',', 1)[0]} {exc.code}")
            raise

    def _storage_failed(exc: OSError) -> ApiError:
        if is_storage_refusal(exc):  # full, read-only: said once a minute, 507 as for the coordinator's writes
            return storage.refused(exc, "storing a message")
        log.error("cannot store a message: %s", exc.strerror or type(exc).__name__)
        return Unavailable("the broker could not store the message (its disk refused); try again later",
                           code="storage_failed")

    async def waiting_in(seats: dict[str, str], wait: float) -> dict[str, list[dict[str, Any]]]:
        """The messages waiting in each job's mailbox of `seats` (job -> seat), long-polling up to `wait` seconds
        until one of them has any."""
        deadline = time.monotonic() + wait
        while True:
            with signals.watching(list(seats.items())) as events:  # before looking: an arrival meanwhile sets one
                waiting = {job_id: [m.view() for m in store.waiting(job_id, seat, LISTED_PER_MAILBOX)]
                           for job_id, seat in seats.items()}
                remaining = deadline - time.monotonic()
                if not seats or any(waiting.values()) or remaining <= 0 or signals.closing:
                    return waiting
                waits = [asyncio.ensure_future(event.wait()) for event in events]
                try:
                    await asyncio.wait(waits, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for pending in waits:
                        pending.cancel()

    async def caller(request: Request, job: str = JobId,
                     credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> JobAccess:
        return await access(request, credentials.credentials if credentials else None, job)

    async def caller_seat(access: JobAccess = Depends(caller)) -> str:
        return access.seat

    def _room_for(waiting: Waiting, size: int, seat: str, org: str) -> None:
        """At commit, the store's lock held: the seat's bound in the job, and its organization's across jobs."""
        room.check_job(waiting, size, seat)
        if org:
            room.check_org(store.sent_by_org(org), size)

    @router.put("/jobs/{job}/messages/{to_seat}/{name}", status_code=201, response_class=Response,
                responses={201: {"description": "stored (no body)"},
                           200: {"description": "already stored with the same bytes (no body)"}},
                openapi_extra={"requestBody": {"required": True, "description": "the sealed message, streamed",
                                               "content": {"application/octet-stream": {"schema": {
                                                   "type": "string", "format": "binary"}}}}})
    async def put_message(request: Request, to_seat: str, job: str = JobId, name: str = MessageName,
                          access: JobAccess = Depends(caller)) -> Response:
        if to_seat not in access.seats:
            raise InvalidRequest(f"field 'to_seat': this job's seats are {', '.join(access.seats)}")
        if to_seat == access.seat:
            # No protocol message goes to its own sender, and no partner would ever take (acknowledge) one.
            raise InvalidRequest(f"field 'to_seat': {to_seat} is the sender's own seat; a message goes to another "
                                 "seat of the job")
        if access.status in UNAPPROVED_STATUSES:
            # Seats exist from submission, and such a job may wait for approval for ever: no worker has a reason
            # to send anything yet, and what it stored would stay until the TTL.
            raise Conflict(f"job {job} is {access.status}: the broker takes its messages only once every data owner "
                           "approved it", code="job_not_approved", extra={"status": access.status})
        seat = access.seat
        if not _NAME.match(name):  # the route pattern guards too; names reach the index, never a path
            raise InvalidRequest("field 'name': must match [A-Za-z0-9._-]{1,200}")
        if not name.startswith(f"{seat}."):
            # Names are written once: another seat taking a sender's name first would hold its message back.
            raise InvalidRequest(f"field 'name': a message from seat {seat} is named {seat}.<name> (receivers "
                                 "check the sender by it)")
        declared = request.headers.get("content-length")
        size = int(declared) if declared is not None and declared.isdigit() else 0
        if size > max_message_bytes:
            raise TooLarge(f"the message is {declared} bytes; this broker takes at most {max_message_bytes}",
                           code="message_too_large")
        if store.get(job, to_seat, name) is None:  # a repeated put (a restarted sender) is answered at commit
            room.check_disk(store.root, size)
            # Early; commit checks again (puts overlap). In a thread: the sum grows with the seat's waiting messages.
            room.check_job(await asyncio.to_thread(store.sent_from, job, seat), size, seat)
            if access.org:
                room.check_org(await asyncio.to_thread(store.sent_by_org, access.org), size)
        try:
            pending = store.begin(max_message_bytes)
        except OSError as exc:
            raise _storage_failed(exc) from None
        try:
            # Each chunk (at most one socket read, 256 KiB) is written on the event loop: a page-cache write takes
            # well under a millisecond, and handing chunks to a thread cost more CPU than the writes (the broker
            # bench). Only the fsync, which waits for the disk, goes to a thread.
            next_disk_check = size + DISK_CHECK_BYTES  # the declared size was checked: a body past it, or a
            async for chunk in _arriving(request.stream(), body_idle_seconds):  # chunked one, is checked as it grows
                pending.write(chunk)
                if pending.size >= next_disk_check:
                    room.check_disk(store.root, 0)
                    next_disk_check = pending.size + DISK_CHECK_BYTES
            await asyncio.to_thread(pending.finish)  # fsync: seconds on a busy disk
        except BodyTooLarge:
            pending.discard()
            raise TooLarge(f"the message exceeds this broker's limit of {max_message_bytes} bytes",
                           code="message_too_large") from None
        except ClientDisconnect:
            pending.discard()
            return Response(status_code=400)  # nobody is left to read it
        except TimeoutError:
            pending.discard()
            log.warning("gave up message %s of job %s from seat %s after %s bytes: nothing arrived for %g s",
                        name, job, seat, pending.size, body_idle_seconds)
            raise RequestTimeout(f"nothing of the message arrived for {body_idle_seconds:g} s; send it again",
                                 code="body_timeout") from None
        except OSError as exc:
            pending.discard()
            raise _storage_failed(exc) from None
        except BaseException:
            pending.discard()
            raise
        try:
            outcome = await asyncio.to_thread(store.commit, job, to_seat, name, seat, pending,
                                              lambda waiting: _room_for(waiting, pending.size, seat, access.org),
                                              access.org)
        except OSError as exc:
            pending.discard()
            raise _storage_failed(exc) from None
        except InsufficientStorage:
            pending.discard()
            raise
        if outcome is Commit.CONFLICT:
            raise Conflict(f"message '{name}' already holds other bytes; a name is written once",
                           code="message_conflict")
        if outcome is Commit.DUPLICATE:
            return Response(status_code=200)
        signals.notify(job, to_seat)
        return Response(status_code=201)

    @router.get("/jobs/{job}/messages", response_model=list[WaitingMessage])
    async def list_messages(job: str = JobId, wait: float = Query(0, ge=0, le=60),
                            seat: str = Depends(caller_seat)) -> list[dict[str, Any]]:
        return (await waiting_in({job: seat}, wait))[job]

    @router.get("/messages", response_model=JobsWaiting)
    async def list_jobs_messages(request: Request, job: list[str] = Query(min_length=1, max_length=MAX_JOBS_PER_LIST),
                                 wait: float = Query(0, ge=0, le=60),
                                 credentials: HTTPAuthorizationCredentials | None = Depends(bearer)
                                 ) -> dict[str, Any]:
        """Several jobs' mailboxes at once, long-polled together: a worker with several active jobs waits on one
        request instead of polling each job in turn."""
        token = credentials.credentials if credentials else None
        seats: dict[str, str] = {}
        refused: dict[str, dict[str, Any]] = {}
        for job_id in dict.fromkeys(job):
            if not _JOB_ID.match(job_id):
                raise InvalidRequest("field 'job': a job id is 1 to 64 letters, digits, '_' or '-'")
            try:
                seats[job_id] = (await access(request, token, job_id)).seat
            except ApiError as exc:
                if isinstance(exc, Unauthorized) or exc.status >= 500:
                    raise  # the token, or the coordinator a broker alone asks: every job would say the same
                refused[job_id] = exc.body()["error"]  # this job only: unknown, or not this organization's
        return {"jobs": await waiting_in(seats, wait), "refused": refused}

    @router.get("/jobs/{job}/messages/{name}", response_class=StreamingResponse,
                responses={200: {"description": "the sealed message's bytes, as put",
                                 "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                     "format": "binary"}}}}})
    async def get_message(job: str = JobId, name: str = MessageName, seat: str = Depends(caller_seat)) -> Response:
        message = store.get(job, seat, name)
        try:
            # Open now: an acknowledge or the expiry sweep may unlink the file while we stream it.
            file = open(message.file, "rb") if message else None
        except FileNotFoundError:
            file = None
        if message is None or file is None:
            raise NotFound(f"no message '{name}' waits for you in this job", code="message_not_found")
        return StreamingResponse(_chunks(file), media_type="application/octet-stream",
                                 headers={"Content-Length": str(message.size)})

    @router.delete("/jobs/{job}/messages/{name}", status_code=204)
    async def delete_message(job: str = JobId, name: str = MessageName, seat: str = Depends(caller_seat)) -> Response:
        if not store.delete(job, seat, name):
            raise NotFound(f"no message '{name}' waits for you in this job", code="message_not_found")
        return Response(status_code=204)

    return router
