"""How each supervisord program starts: read the configuration, set up its log, load the worker's keys.

A configuration or key problem is logged (it names the variable or file and how to fix it) and ends the program
with exit code 2; supervisord's retries then make the worker exit non-zero, as a bad configuration should.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable

from services.memory_reuse import keep_freed_memory
from services.worker import logs
from services.worker.config import ConfigError, WorkerConfig
from services.file_locks import lock_file
from services.worker.keys import KeyFileError, WorkerKeys

BAD_CONFIGURATION = 2
ORPHAN_CHECK_SECONDS = 1.0
PROGRAMS_LOCK_NAME = ".programs.lock"

log = logging.getLogger(__name__)


class StartupFailed(Exception):
    """The program cannot start; the reason is already logged."""


def configure(program: str) -> WorkerConfig:
    """The worker's configuration, with `program`'s log set up; raises StartupFailed."""
    try:
        config = WorkerConfig.from_env()
    except ConfigError as exc:
        logs.setup(program).error("configuration error: %s", exc)
        raise StartupFailed from None
    logs.setup(program, config)
    return config


def load_keys(config: WorkerConfig) -> WorkerKeys:
    """The worker's key pairs (made on first start); raises StartupFailed."""
    try:
        return WorkerKeys.load_or_create(config.state_dir)
    except KeyFileError as exc:
        log.error("%s", exc)
        raise StartupFailed from None


def stop_when_orphaned(check_every: float = ORPHAN_CHECK_SECONDS) -> threading.Thread | None:
    """Under supervisord, SIGTERM this process once supervisord is gone (its parent changes).

    supervisord stops its programs when it stops, but when it is killed (`kill -9`, OOM) they would run on
    under init, and a new `cape-worker run` would start a second set on the same spool. SIGTERM takes the
    program's normal way out (logs flushed, a running job paused)."""
    if not os.environ.get("SUPERVISOR_ENABLED"):  # set by supervisord for its programs
        return None
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(check_every)
        log.warning("supervisord (pid %d) is gone; stopping", parent)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, name="orphan-guard", daemon=True)
    thread.start()
    return thread


def hold_programs_lock(spool_dir: Path) -> int | None:
    """Hold a shared lock on the spool's `.programs.lock` for the life of this process: `cape-worker run` waits
    for it to be free, so it never starts a worker beside programs of one whose supervisord was killed (they stop
    within seconds: `stop_when_orphaned`). None where the file cannot be opened (the lock is a safeguard only)."""
    try:  # shared: the four programs hold it at once
        return lock_file(spool_dir / PROGRAMS_LOCK_NAME, shared=True, wait=True)
    except OSError as exc:
        log.warning("cannot open %s: %s", spool_dir / PROGRAMS_LOCK_NAME, exc.strerror)
        return None


def run(program: str, body: Callable[[WorkerConfig], None]) -> int:
    """Configure `program`, then run `body(config)`; the process's exit code."""
    keep_freed_memory()
    stop_when_orphaned()
    try:
        config = configure(program)
        hold_programs_lock(config.spool_dir)
        body(config)
    except StartupFailed:
        return BAD_CONFIGURATION
    return 0
