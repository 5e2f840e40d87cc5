"""What the worker is doing: the four programs' supervisord states (XML-RPC over the unix socket), whether the
coordinator refuses the worker's token, and the jobs in the spool. `supervisorctl status` exits 0 even with a
program in BACKOFF, so the states are read directly."""
from __future__ import annotations

import json
import logging
import os
import socket
import time
import xmlrpc.client
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from supervisor.xmlrpc import SupervisorTransport

from services.worker.config import DEFAULT_STATE_DIR
from services.worker.spool import RESERVE_BYTES, Spool, mib

PROGRAMS = ("poller", "messenger", "runner", "uploader")
SOCKET_NAME = "supervisor.sock"
MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes
# Written by the poller while the coordinator refuses this worker (CAPE_TOKEN revoked, deleted or a user token;
# another worker of the organization holding its seat): all four programs keep running, retrying, so only this
# record makes the HEALTHCHECK (and `docker ps`) show it.
LOGIN_REFUSED_NAME = "login-refused"


class SupervisorUnavailable(RuntimeError):
    """supervisord's socket cannot be reached: the worker is not running (or CAPE_STATE_DIR differs)."""


def run_dir_from_env(environ: Mapping[str, str]) -> Path:
    """The run directory without needing a full configuration (the HEALTHCHECK has only the image's env)."""
    if environ.get("CAPE_RUN_DIR"):
        return Path(environ["CAPE_RUN_DIR"])
    return Path(environ.get("CAPE_STATE_DIR") or DEFAULT_STATE_DIR) / "run"


def socket_path_problem(run_dir: Path) -> str | None:
    """Why supervisord could not bind its unix socket in `run_dir` (the path is too long), else None; `run` refuses
    to start and `check` fails on it."""
    sock = run_dir / SOCKET_NAME
    if len(str(sock)) > MAX_SOCKET_PATH:
        return (f"CAPE_STATE_DIR is too deep for supervisord's unix socket ({sock} is over {MAX_SOCKET_PATH} "
                "characters); use a shorter path")
    return None


def supervisor_proxy(run_dir: Path) -> xmlrpc.client.ServerProxy:
    """An XML-RPC proxy to supervisord over `run_dir/supervisor.sock`."""
    transport = SupervisorTransport(None, None, f"unix://{run_dir / SOCKET_NAME}")
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)


def program_states(run_dir: Path) -> dict[str, str]:
    """{program: state name} for the worker group's programs (e.g. {"poller": "RUNNING", ...})."""
    sock = run_dir / SOCKET_NAME
    if not sock.exists():
        raise SupervisorUnavailable(f"no supervisord socket at {sock}; is the worker running (`cape-worker run`) "
                                    "with this CAPE_STATE_DIR?")
    try:
        infos = supervisor_proxy(run_dir).supervisor.getAllProcessInfo()
    except (OSError, socket.error, xmlrpc.client.Error) as exc:
        raise SupervisorUnavailable(f"supervisord at {sock} does not answer ({type(exc).__name__})") from None
    return {info["name"]: info["statename"] for info in infos if info["name"] in PROGRAMS}


@dataclass(frozen=True)
class PollerRecord:
    """A condition a program (the poller, mostly) records in the run dir for `health` and `status` while it lasts:
    since when (kept from its first record) and why. `message` never holds the token."""

    name: str
    unreadable: str  # the message of a record that is not ours (written whole by os.replace): still the condition
    headline: str
    topic: str = "coordinator"  # what `status` says it is about

    def record(self, run_dir: Path, message: str) -> None:
        path = run_dir / self.name
        since = (self.read(run_dir) or {}).get("since") or time.time()
        temp = path.with_name(f".{self.name}.tmp")
        temp.write_text(json.dumps({"since": since, "message": message}))
        os.replace(temp, path)

    def note(self, run_dir: Path | None, message: str | None, log: logging.Logger) -> None:
        """Record `message` (or clear the record, with None) for a running program: a run dir it cannot write (gone,
        read-only) is said in `log`, beside the program's own line about the condition."""
        if run_dir is None:
            return
        try:
            if message is None:
                self.clear(run_dir)
            else:
                self.record(run_dir, message)
        except OSError as exc:
            log.warning("cannot record %s for the health check in %s: %s", self.name, run_dir, exc.strerror)

    def clear(self, run_dir: Path) -> bool:
        """Forget the record (the condition ended, or a new run starts); True if there was one."""
        try:
            (run_dir / self.name).unlink()
        except FileNotFoundError:
            return False
        return True

    def read(self, run_dir: Path) -> dict[str, Any] | None:
        """{"since": epoch seconds, "message": why} while the condition lasts, else None."""
        try:
            found = json.loads((run_dir / self.name).read_text())
        except (FileNotFoundError, NotADirectoryError):
            return None
        except ValueError:
            found = None
        if not isinstance(found, dict):
            return {"since": 0.0, "message": self.unreadable}
        return {"since": float(found.get("since") or 0.0), "message": str(found.get("message") or "")}

    def line(self, record: dict[str, Any]) -> str:
        """One line for `health` and `status`: since when (UTC) and why."""
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(record["since"])) if record["since"] else "?"
        return f"{self.headline} (since {since})" + (f": {record['message']}" if record["message"] else "")


LOGIN_REFUSED = PollerRecord(LOGIN_REFUSED_NAME, "the coordinator refused CAPE_TOKEN",
                             "the coordinator refuses this worker")
# Not a health failure (the worker catches up once it answers), but `status` says it: the programs stay RUNNING.
COORDINATOR_UNREACHABLE = PollerRecord("coordinator-unreachable", "the coordinator did not answer",
                                       "the coordinator is unreachable; the poller retries")
# A health failure too: a TLS setup that cannot work (an untrusted or expired certificate) needs the operator.
COORDINATOR_UNTRUSTED = PollerRecord("coordinator-untrusted", "the coordinator's TLS failed",
                                     "this worker cannot trust the coordinator's TLS")
# A health failure: the server at CAPE_COORDINATOR answers, but is no Cape coordinator (or not at its base URL).
COORDINATOR_MISADDRESSED = PollerRecord("coordinator-misaddressed", "CAPE_COORDINATOR leads to no Cape coordinator",
                                        "CAPE_COORDINATOR does not lead to a Cape coordinator")
# Written by the messenger: messages wait at the broker rather than take the spool volume below its reserve, or
# because the spool refused their inbox file, so the worker's jobs cannot go on until the operator makes room.
SPOOL_SHORT_OF_ROOM = PollerRecord("spool-short-of-room", "the spool volume is short of room",
                                   "the spool volume is short of room or refuses writes; messages wait at the broker",
                                   topic="spool")
# Written by the poller and the runner when the spool refuses a write of theirs (full, read-only), cleared by the
# poller once a write goes through: statuses go through the spool too, so the seats showed nothing of it at the
# coordinator, and `health` said healthy while no job could go on.
SPOOL_REFUSES_WRITES = PollerRecord("spool-refuses-writes", "the spool refused a write",
                                    "the spool volume refuses writes (full or read-only); jobs cannot go on",
                                    topic="spool")
# Written by the messenger while the broker cannot be reached or keeps failing: like an unreachable coordinator, not
# a health failure (messages wait in the outbox and at the broker, and move once it answers).
BROKER_UNREACHABLE = PollerRecord("broker-unreachable", "the broker did not answer",
                                  "the broker is unreachable or failing; messages wait and the messenger retries",
                                  topic="broker")


LOW_ROOM_BYTES = 1024**3  # a spool with less than this above the messenger's reserve is said with its free space


def messenger_trouble(run_dir: Path | None, free_bytes: int | None = None) -> str | None:
    """What this worker's messenger records against its own link to the broker and its spool, in headlines only
    (the records' messages can name local paths; this goes into job errors every project member reads). The spool's
    `free_bytes`, when low, go with its record: alone they were said whether or not a message waited for room."""
    if run_dir is None:
        return None
    said = []
    for record in (BROKER_UNREACHABLE, SPOOL_SHORT_OF_ROOM):
        found = record.read(run_dir)
        if found is not None:
            said.append(record.line({**found, "message": ""}))
            if record is SPOOL_SHORT_OF_ROOM and free_bytes is not None and free_bytes < RESERVE_BYTES + LOW_ROOM_BYTES:
                said[-1] += (f": it has {mib(free_bytes)} free, and the messenger leaves messages at the broker "
                             f"rather than go below {mib(RESERVE_BYTES)} (see its log)")
    return "; ".join(said) or None


POLLER_RECORDS = (LOGIN_REFUSED, COORDINATOR_UNTRUSTED, COORDINATOR_MISADDRESSED, COORDINATOR_UNREACHABLE,
                  SPOOL_SHORT_OF_ROOM, SPOOL_REFUSES_WRITES, BROKER_UNREACHABLE)
# What makes `health` fail (and stays true of a stopped worker's settings, unlike an unreachable coordinator).
HEALTH_RECORDS = (LOGIN_REFUSED, COORDINATOR_UNTRUSTED, COORDINATOR_MISADDRESSED, SPOOL_SHORT_OF_ROOM,
                  SPOOL_REFUSES_WRITES)
# ... and these once they have lasted `outage_log.UNHEALTHY_AFTER_SECONDS`: a coordinator that moved, say.
LASTING_HEALTH_RECORDS = (COORDINATOR_UNREACHABLE, BROKER_UNREACHABLE)


def spool_jobs(spool: Spool, runner_running: bool = True) -> list[dict[str, Any]]:
    """A summary of each job in the spool (no data values, no keys). A claimed job shows `running` (or `queued`,
    for one of the runner's job slots) only while the runner program runs (`claimed` otherwise: it resumes when the
    worker runs again); a job that failed or was ended carries the reason the runner or the coordinator gave."""
    pending_reports: dict[str, int] = {}
    for item in spool.pending_status():
        pending_reports[item.job_id] = pending_reports.get(item.job_id, 0) + 1
    results = set(spool.pending_results())
    jobs = []
    for job_id in spool.job_ids():
        spec = spool.read_job(job_id) or {}
        ended, done = spool.ended(job_id), spool.done(job_id)
        claimed = ("running" if spool.is_working(job_id) else "queued") if runner_running else "claimed"
        job = {
            "id": job_id,
            "seat": spec.get("seat"),
            "status": (ended or {}).get("status") or spec.get("status"),
            "runner": (done or {}).get("outcome") or (claimed if spool.is_claimed(job_id) else "waiting"),
            "reason": (done or {}).get("message") or (ended or {}).get("message"),
            "unsent_messages": spool.unsent_count(job_id),
            "pending_reports": pending_reports.get(job_id, 0),
            "result": "pending upload" if job_id in results else (
                "uploaded" if spool.uploaded(job_id) else "upload failed" if spool.upload_failed(job_id) else "-"),
            "approved_at": spec.get("approved_at"),
            "ended_at": _modified_at(spool.job_dir(job_id) / "ended.json") if ended else None,
        }
        # In progress: the coordinator has not ended it, or something of it still waits here (a message to send,
        # a report, a result to upload). One it ended is no longer, even before the runner closes it.
        job["active"] = not ended or bool(job["unsent_messages"] or job["pending_reports"] or job_id in results)
        jobs.append(job)
    # What is in progress (or stuck) first, oldest approval first; then the finished, most recent first.
    active = sorted((j for j in jobs if j["active"]), key=lambda j: j["approved_at"] or "")
    finished = sorted((j for j in jobs if not j["active"]), key=lambda j: j["ended_at"] or "", reverse=True)
    return active + finished


def _modified_at(path: Path) -> str | None:
    """A file's modification time as the coordinator writes times (ISO 8601, UTC, milliseconds)."""
    try:
        stamp = path.stat().st_mtime
    except OSError:
        return None
    return datetime.fromtimestamp(stamp, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
