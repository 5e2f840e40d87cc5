"""The `cape-server` ASGI application: coordinator at `/v1`, broker at `/broker/v1`, OpenAPI at `/openapi.json`."""
from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse

from services.broker.api import broker_router
from services.broker.mailboxes import MailboxSignals
from services.broker.membership import JobMembership, LocalMembership, RemoteMembership
from services.broker.store import MessageStore
from services.broker.room import Room
from services.coordinator.abandoned_jobs import AbandonedJobs
from services.coordinator.api import MAX_JSON_BODY, coordinator_router
from services.coordinator.audit import RefusedActions, RefusedTokens
from services.coordinator.creation_room import CreationRoom
from services.coordinator.db import Database
from services.coordinator.job_changes import JobChanges
from services.coordinator.views import ErrorBody, Health
from services.coordinator.jobs import ended_jobs, expire_late_jobs
from services.server.body_limit import DeclaredBodyLimit
from services.server.config import ServerConfig
from services.server.error_handlers import install_error_handlers
from services.server.errors import NotFound
from services.server.storage_trouble import StorageTrouble

log = logging.getLogger("cape.server")
HEALTHY_FREE_BYTES = 16 << 20  # SQLite's WAL and an index page or two: below it, writes are about to fail


def _version() -> str:
    try:
        return version("cape-workers")
    except PackageNotFoundError:
        return "0"


async def _every(seconds: float, what: str, work: Callable[[], Any]) -> None:
    """Run blocking `work` in a thread every `seconds` until cancelled; a failure is logged, not fatal."""
    while True:
        await asyncio.sleep(seconds)
        try:
            await anyio.to_thread.run_sync(work)
        except Exception:
            log.exception("background %s failed; retrying in %.0f s", what, seconds)


def _purge_ended_jobs(db: Database, store: MessageStore) -> None:
    """Drop the messages of jobs that ended: nobody will read them, and they would otherwise stay for the TTL
    (a sender that repeats a put whose answer it lost, after the recipient acknowledged, stores a second copy)."""
    held = store.job_ids()
    if not held:
        return
    with db.transaction() as conn:
        ended = ended_jobs(conn, held)
    for job_id in ended:
        log.info("job %s ended: dropped %d message(s) still at the broker", job_id, store.purge_job(job_id))


def create_app(config: ServerConfig) -> FastAPI:
    """Build the app for the parts `config` asks for; background sweeps start with the app's lifespan."""
    # Token hashes and queued messages live here: a new data dir is private to the server's user.
    config.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    db = Database(config.coordinator_db_path) if config.runs_coordinator else None
    store = MessageStore(config.data_dir, config.message_ttl) if config.runs_broker else None
    membership: JobMembership | None = None
    if store is not None:
        if db is not None:
            membership = LocalMembership(db)
        elif config.coordinator_url:
            membership = RemoteMembership(config.coordinator_url)
        else:
            raise ValueError("a broker running alone needs --coordinator-url to check who may use a job's mailboxes")

    signals = MailboxSignals()
    changes = JobChanges()
    refused, forbidden = RefusedTokens(), RefusedActions()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        # `cape-server serve` calls this from its signal handler: parked long polls return at once.
        def begin_shutdown() -> None:
            loop.call_soon_threadsafe(signals.close)
            changes.close()

        app.state.begin_shutdown = begin_shutdown
        log.info("cape-server %s: %s, data in %s", server_version, " + ".join(parts), config.data_dir)
        if store is not None and store.orphans_removed:
            log.warning("removed %d message file(s) that no index entry named (left by a crash)",
                        store.orphans_removed)
        tasks = []
        if db is not None:
            abandoned = AbandonedJobs(config.message_ttl)

            def sweep_jobs() -> None:
                with db.transaction() as conn:
                    expired = expire_late_jobs(conn, config.approval_ttl) + abandoned.sweep(conn)
                if expired:
                    changes.bump()
                refused.flush()
                forbidden.flush()
                if store is not None:
                    _purge_ended_jobs(db, store)
            tasks.append(asyncio.create_task(_every(config.job_sweep_seconds, "job timeout sweep", sweep_jobs)))
        if store is not None:
            interval = min(60.0, max(0.5, config.message_ttl / 4))
            def expire_messages() -> None:
                refused.flush()  # for a broker running alone, which has no job sweep
                forbidden.flush()
                expired = store.expire()
                if expired:  # undelivered: a worker that was away too long; its job will say what it missed
                    log.info("%d undelivered message(s) expired (--message-ttl %g s)", expired, config.message_ttl)

            tasks.append(asyncio.create_task(_every(interval, "message expiry", expire_messages)))
        try:
            yield
        finally:
            refused.flush(final=True)  # counts not yet said would be lost with the process
            forbidden.flush(final=True)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if membership is not None:
                await membership.close()
            if store is not None:
                store.close()
            if db is not None:
                db.close()

    server_version = _version()  # read once: a metadata lookup searches sys.path, and would cost each health check
    app = FastAPI(title="Cape server", version=server_version, lifespan=lifespan, openapi_url="/openapi.json",
                  description="Reference coordinator (`/v1`) and broker (`/broker/v1`) for Cape workers.")
    app.add_middleware(DeclaredBodyLimit, prefix="/v1/", limit=MAX_JSON_BODY)
    storage = StorageTrouble()
    install_error_handlers(app, storage, forbidden)  # after: its middleware is the outermost of ours
    parts = []
    if db is not None:
        app.include_router(coordinator_router(db, changes, refused,
                                              CreationRoom(config.data_dir, config.create_reserve_bytes)))
        parts.append("coordinator")
    if store is not None and membership is not None:
        app.include_router(broker_router(store, membership, signals, config.max_message_bytes,
                                         Room(config.max_job_bytes, config.min_free_bytes, config.max_job_messages,
                                              config.max_org_bytes, config.max_org_messages), storage, refused,
                                         config.body_idle_seconds, forbidden))
        parts.append("broker")

    _answer_for_missing_parts(app, runs_coordinator=db is not None, runs_broker=store is not None)
    app.openapi = lambda: _openapi_with_our_errors(app)  # type: ignore[method-assign]

    # Below this much free space the server cannot work on: the broker's reserve, and room for SQLite to grow.
    least_free = max(config.min_free_bytes if store is not None else 0, HEALTHY_FREE_BYTES)
    # Below this one the coordinator refuses everything new (creation_room.py): a monitor must see that too.
    create_reserve = config.create_reserve_bytes if db is not None else 0

    @app.get("/healthz", tags=["server"], response_model=Health, responses={503: {"model": Health}})
    async def healthz() -> Any:  # no thread hand-off: a statvfs is all the I/O
        problem = storage.problem() or _low_space(config.data_dir, least_free, store is not None)
        if problem is None:
            # 200: running jobs go on, and a probe that drains a 503 would stop them; the JSON says it to a monitor.
            warning = _below_create_reserve(config.data_dir, create_reserve)
            if warning is not None:
                return {"status": "warning", "parts": parts, "version": server_version, "problem": warning}
            return {"status": "ok", "parts": parts, "version": server_version}
        return JSONResponse({"status": "degraded", "parts": parts, "version": server_version, "problem": problem},
                            status_code=503)  # a monitor watching the status code sees it

    return app


def _low_space(data_dir: Path, least_free: int, runs_broker: bool) -> str | None:
    """A sentence when the data dir's disk has less than `least_free` bytes free (a full disk that no request wrote
    to yet), else None."""
    refusing = "; the broker refuses new messages (--min-free-bytes)" if runs_broker else ""
    return _short_of_space(data_dir, least_free,
                           f"below the {least_free} the server needs{refusing}")


def _below_create_reserve(data_dir: Path, reserve: int) -> str | None:
    """A sentence when the data dir's disk has less than `reserve` bytes free (--create-reserve-bytes; 0: none),
    below which the coordinator takes nothing new, else None."""
    if reserve <= 0:
        return None
    return _short_of_space(data_dir, reserve, f"below --create-reserve-bytes ({reserve}): the coordinator takes no "
                                              "new projects, dataviews, jobs, users or tokens")


def _short_of_space(data_dir: Path, least: int, below: str) -> str | None:
    """'the data dir's disk has N bytes free, <below>' when it has less than `least` free, else None."""
    try:
        free = shutil.disk_usage(data_dir).free
    except OSError as exc:
        return f"the data dir cannot be examined ({exc.strerror or exc})"
    return None if free >= least else f"the data dir's disk has {free} bytes free, {below}"


def _answer_for_missing_parts(app: FastAPI, *, runs_coordinator: bool, runs_broker: bool) -> None:
    """A part this server does not run answers every path under it with a 404 that says so, not "no such
    endpoint": a worker whose CAPE_BROKER defaulted to a coordinator running alone is told what to set."""
    methods = ["GET", "HEAD", "PUT", "POST", "DELETE", "PATCH", "OPTIONS"]
    missing = []
    if not runs_coordinator:
        missing.append(("/v1", "coordinator_not_here", "this cape-server runs the broker only (--only broker); point "
                                                       "CAPE_COORDINATOR at the coordinator's URL"))
    if not runs_broker:
        missing.append(("/broker", "broker_not_here", "this cape-server runs the coordinator only (--only "
                                                      "coordinator); set CAPE_BROKER to the broker's URL"))
    for prefix, code, message in missing:
        app.add_api_route(f"{prefix}/{{path:path}}", _refusing(code, message), methods=methods,
                          include_in_schema=False)


def _refusing(code: str, message: str) -> Callable[[str], None]:
    """A route answering NotFound(message, code) whatever the request (its only parameter is the path: a default
    argument would be a query parameter the caller could set)."""
    def refuse(path: str) -> None:
        raise NotFound(message, code=code)

    return refuse


def _openapi_with_our_errors(app: FastAPI) -> dict[str, Any]:
    """FastAPI's description, with the error body every endpoint really answers (`{"error": {"code", "message"}}`,
    services/server/error_handlers.py) in place of its `{"detail": [...]}` for 422, and declared for 4XX/5XX."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    document = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    body = ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(body.pop("$defs", {}))
    schemas["ErrorBody"] = body
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}
    for path in document.get("paths", {}).values():
        for operation in path.values():
            responses = operation.setdefault("responses", {})
            if "422" in responses:
                responses["422"] = {"description": "a field of the request is invalid (the message names it)", **error}
            responses.setdefault("4XX", {"description": "refused: see the error's code and message", **error})
            responses.setdefault("5XX", {"description": "the server could not answer now", **error})
    app.openapi_schema = document
    return document
