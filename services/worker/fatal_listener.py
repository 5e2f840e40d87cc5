"""supervisord event listener: when a program goes FATAL, record it and stop supervisord.

supervisord itself exits 0 after SIGTERM, so the listener leaves a marker file (`$CAPE_RUN_DIR/fatal`) naming the
program; `cape-worker run` sees it after supervisord has stopped and exits non-zero, so Docker's restart policy
takes over. stdout is the event protocol's channel: diagnostics go to stderr.

Run as `python -m services.worker.fatal_listener` (an `[eventlistener]` with `events=PROCESS_STATE_FATAL`).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from supervisor import childutils

FATAL_MARKER = "fatal"


def marker_path(run_dir: str | os.PathLike) -> Path:
    """Where the FATAL marker is written."""
    return Path(run_dir) / FATAL_MARKER


def handle(headers: dict[str, str], payload: str, run_dir: Path, supervisord_pid: int) -> str | None:
    """Act on one event; returns the FATAL program's name, or None for any other event."""
    if headers.get("eventname") != "PROCESS_STATE_FATAL":
        return None
    fields, _ = childutils.eventdata(payload + "\n")
    program = fields.get("processname", "?")
    group = fields.get("groupname", "?")
    marker = marker_path(run_dir)
    tmp = marker.with_name(f".{FATAL_MARKER}.tmp")
    tmp.write_text(json.dumps({"program": program, "group": group, "at": time.time()}))
    os.replace(tmp, marker)
    print(f"fatal_listener: program {program} keeps failing (FATAL); stopping the worker", file=sys.stderr,
          flush=True)
    os.kill(supervisord_pid, signal.SIGTERM)
    return program


def main() -> int:
    """Serve supervisord's event listener protocol until stdin closes."""
    run_dir = Path(os.environ.get("CAPE_RUN_DIR", "."))
    supervisord_pid = os.getppid()
    while True:
        headers, payload = childutils.listener.wait(sys.stdin, sys.stdout)
        try:
            handle(headers, payload, run_dir, supervisord_pid)
        finally:
            childutils.listener.ok(sys.stdout)


if __name__ == "__main__":
    raise SystemExit(main())
