"""The `cape-server` ASGI application: coordinator at `/v1`, broker at `/broker/v1`, OpenAPI at `/openapi.json`."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import anyio
from fastapi import FastAPI

from services.broker.api import broker_router
from services.broker.mailboxes import MailboxSignals
from services.broker.membership import JobMembership, LocalMembership, RemoteMembership
from services.broker.store import MessageStore
from services.broker.room import Room
from services.coordinator.api import MAX_JSON_BODY, coordinator_router
from services.coordinator.db import Database
from services.coordinator.job_changes import JobChanges
from services.coordinator.views import Health
from services.coordinator.jobs import ended_jobs, expire_late_jobs
from services.server.body_limit import DeclaredBodyLimit
from services.server.config import ServerConfig
from services.server.error_handlers import install_error_handlers

log = logging.getLogger("cape.server")


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

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        # `cape-server serve` calls this from its signal handler: parked long polls return at once.
        def begin_shutdown() -> None:
            loop.call_soon_threadsafe(signals.close)
            changes.close()

        app.state.begin_shutdown = begin_shutdown
        log.info("cape-server %s: %s, data in %s", server_version, " + ".join(parts), config.data_dir)
        tasks = []
        if db is not None:
            def sweep_jobs() -> None:
                with db.transaction() as conn:
                    expired = expire_late_jobs(conn)
                if expired:
                    changes.bump()
                if store is not None:
                    _purge_ended_jobs(db, store)
            tasks.append(asyncio.create_task(_every(config.job_sweep_seconds, "job timeout sweep", sweep_jobs)))
        if store is not None:
            interval = min(60.0, max(0.5, config.message_ttl / 4))
            tasks.append(asyncio.create_task(_every(interval, "message expiry", store.expire)))
        try:
            yield
        finally:
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
    install_error_handlers(app)
    app.add_middleware(DeclaredBodyLimit, prefix="/v1/", limit=MAX_JSON_BODY)
    parts = []
    if db is not None:
        app.include_router(coordinator_router(db, changes))
        parts.append("coordinator")
    if store is not None and membership is not None:
        app.include_router(broker_router(store, membership, signals, config.max_message_bytes,
                                         Room(config.max_job_bytes, config.min_free_bytes)))
        parts.append("broker")

    @app.get("/healthz", tags=["server"], response_model=Health)
    async def healthz() -> dict[str, Any]:  # no I/O: served on the event loop, no thread hand-off
        return {"status": "ok", "parts": parts, "version": server_version}

    return app
