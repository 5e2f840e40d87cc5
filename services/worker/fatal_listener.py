"""supervisord event listener: when a program goes FATAL, record it and stop supervisord.

supervisord itself exits 0 after SIGTERM, so the listener leaves a marker file (`$CAPE_RUN_DIR/fatal`) naming the
program; `cape-worker run` sees it after supervisord has stopped and exits non-zero, so Docker's restart policy
takes over. Where the marker cannot be written (a full state volume), the listener sends SIGUSR1 to `cape-worker
run` (`$CAPE_RUN_PID`) instead, before it stops supervisord. stdout is the event protocol's channel: diagnostics go
to stderr.

Once supervisord is shutting down (`docker stop`), a FATAL is not a failure: supervisord itself turns a program
waiting in BACKOFF into FATAL while it stops everything, so FATAL events after SUPERVISOR_STATE_CHANGE_STOPPING
are ignored (and `cape-worker run` ignores a marker written after it forwarded the stop signal).

Run as `python -m services.worker.fatal_listener` (an `[eventlistener]` with
`events=PROCESS_STATE_FATAL,SUPERVISOR_STATE_CHANGE_STOPPING`).
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from supervisor import childutils

FATAL_MARKER = "fatal"
FATAL_EVENT = "PROCESS_STATE_FATAL"
# Sent to `cape-worker run` when the marker cannot be written: without either, supervisord's stop looked like a
# `docker stop` to it, and the worker exited 0 after a FATAL.
UNRECORDED_FATAL_SIGNAL = signal.SIGUSR1
STOPPING_EVENT = "SUPERVISOR_STATE_CHANGE_STOPPING"


def marker_path(run_dir: str | os.PathLike) -> Path:
    """Where the FATAL marker is written."""
    return Path(run_dir) / FATAL_MARKER


def read_marker(run_dir: str | os.PathLike) -> dict | None:
    """The FATAL marker's content ({"program", "group", "at"}), or None if there is none."""
    try:
        found = json.loads(marker_path(run_dir).read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        return {"program": "?", "group": "?", "at": 0.0}
    return found if isinstance(found, dict) else {"program": "?", "group": "?", "at": 0.0}


@dataclass
class FatalListener:
    """Acts on supervisord's events; `stopping` turns true once supervisord begins its shutdown."""

    run_dir: Path
    supervisord_pid: int
    stopping: bool = False
    run_pid: int | None = None  # `cape-worker run`, told of a FATAL its marker could not record

    def handle(self, headers: dict[str, str], payload: str) -> str | None:
        """Act on one event; returns the FATAL program's name when it stopped the worker, else None."""
        event = headers.get("eventname")
        if event == STOPPING_EVENT:
            self.stopping = True
            return None
        if event != FATAL_EVENT:
            return None
        fields, _ = childutils.eventdata(payload + "\n")
        program = fields.get("processname", "?")
        if self.stopping:
            print(f"fatal_listener: program {program} FATAL while the worker stops; ignored", file=sys.stderr,
                  flush=True)
            return None
        marker = marker_path(self.run_dir)
        tmp = marker.with_name(f".{FATAL_MARKER}.tmp")
        try:
            tmp.write_text(json.dumps({"program": program, "group": fields.get("groupname", "?"), "at": time.time()}))
            os.replace(tmp, marker)
        except OSError as exc:  # a full state volume: the worker must stop all the same, not run on with a dead program
            print(f"fatal_listener: cannot record the failure in {self.run_dir} ({exc.strerror or exc}); free space "
                  "on CAPE_STATE_DIR's volume", file=sys.stderr, flush=True)
            if self.run_pid:
                with contextlib.suppress(OSError):
                    os.kill(self.run_pid, UNRECORDED_FATAL_SIGNAL)
        print(f"fatal_listener: program {program} keeps failing (FATAL); stopping the worker", file=sys.stderr,
              flush=True)
        os.kill(self.supervisord_pid, signal.SIGTERM)
        return program


def main() -> int:
    """Serve supervisord's event listener protocol until stdin closes."""
    run_pid = os.environ.get("CAPE_RUN_PID", "")
    listener = FatalListener(Path(os.environ.get("CAPE_RUN_DIR", ".")), os.getppid(),
                             run_pid=int(run_pid) if run_pid.isdigit() else None)
    # supervisord's stop: leave at once with status 0 (the default action made supervisord log a WARN, "terminated
    # by SIGTERM", at every docker stop). Nothing is lost: the marker is in place before supervisord is signalled.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: os._exit(0))
    while True:
        headers, payload = childutils.listener.wait(sys.stdin, sys.stdout)
        try:
            listener.handle(headers, payload)
        finally:
            childutils.listener.ok(sys.stdout)


if __name__ == "__main__":
    raise SystemExit(main())
