"""What workers (organization tokens) do: register keys, heartbeat, fetch their jobs, report progress."""
from __future__ import annotations

import base64
import binascii
import json
import re
import sqlite3
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from services.coordinator.db import now_iso
from services.coordinator.identity import get_org, org_ref
from services.coordinator.jobs import (FINAL_STATUSES, expire_if_late, find_job, has_worker_keys, parties,
                                       registered_worker, seat_of, set_status)
from services.coordinator.liveness import ONLINE_WITHIN_SECONDS, liveness, offline_in_words, worker_liveness
from services.server.errors import Conflict, Forbidden, InvalidRequest


def _check_public_key(text: str, loader: Any, field: str, kind: str) -> None:
    try:
        loader(base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"field '{field}': must be the base64 of a raw 32-byte {kind} public key") from None


class KeysInUse(Conflict):
    """Another worker of the organization, with other keys, is alive: one organization has one worker (one seat
    per job), and replacing its keys would make each of its jobs fail on a key mismatch."""

    code = "worker_keys_in_use"


class OtherWorkerKeys(Conflict):
    """A heartbeat from a worker whose keys are not the registered ones: another worker took the seat."""

    code = "other_worker_keys"


class KeysNotRegistered(Conflict):
    """A heartbeat with keys from a worker of an organization that has none registered (the coordinator's database
    restored from a backup older than the worker's start): the worker registers them again."""

    code = "keys_not_registered"


def register_keys(conn: sqlite3.Connection, org_id: str, encryption_key: str, signing_key: str) -> str | None:
    """Register the worker's public keys; returns "registered" (the first), "replaced" or None (the same again).
    Other keys than the registered ones replace them only once the worker that registered them has been silent for
    ONLINE_WITHIN_SECONDS (a worker moved to a new machine, or whose state directory was lost): a second worker
    started with the same token must not take the seat from under a running one."""
    _check_public_key(encryption_key, X25519PublicKey.from_public_bytes, "encryption_public_key", "X25519")
    _check_public_key(signing_key, Ed25519PublicKey.from_public_bytes, "signing_public_key", "Ed25519")
    row = registered_worker(conn, org_id)
    if row is not None and (row["encryption_public_key"], row["signing_public_key"]) != (encryption_key, signing_key):
        alive = liveness(row)
        if alive["online"]:
            raise KeysInUse(f"another worker of this organization, with other keys, was heard from "
                            f"{alive['seconds_since_seen']:.0f} s ago; an organization runs one worker: stop the "
                            f"other one (this one registers its keys once the other has been silent for "
                            f"{ONLINE_WITHIN_SECONDS:.0f} s; if the other was this worker before its state "
                            "directory was replaced, that is all there is to do)")
    conn.execute("INSERT INTO workers (org_id, encryption_public_key, signing_public_key, keys_updated_at) "
                 "VALUES (?, ?, ?, ?) ON CONFLICT(org_id) DO UPDATE SET encryption_public_key = excluded."
                 "encryption_public_key, signing_public_key = excluded.signing_public_key, "
                 "keys_updated_at = excluded.keys_updated_at", (org_id, encryption_key, signing_key, now_iso()))
    if row is None or row["encryption_public_key"] is None:  # a heartbeat may have come first
        return "registered"
    return "replaced" if (row["encryption_public_key"], row["signing_public_key"]) != (encryption_key, signing_key) \
        else None


def registered_keys_view(conn: sqlite3.Connection, org_id: str) -> dict[str, Any]:
    """What a worker of the organization may see before it registers (`cape-worker check`): the public keys the
    coordinator holds for it and whether the worker that registered them is heard from."""
    row = _worker_row(conn, org_id)
    return {**_heard_from(row), "encryption_public_key": row["encryption_public_key"] if row else None,
            "signing_public_key": row["signing_public_key"] if row else None}


def status_view(conn: sqlite3.Connection, org_id: str) -> dict[str, Any]:
    """What an organization's members may see of their worker: keys registered, last heartbeat and whether it is
    recent, program states."""
    row = _worker_row(conn, org_id)
    return {**_heard_from(row), "version": row["version"] if row else None,
            "programs": json.loads(row["programs"]) if row and row["programs"] else None}


def _worker_row(conn: sqlite3.Connection, org_id: str) -> sqlite3.Row | None:
    return conn.execute("SELECT * FROM workers WHERE org_id = ?", (org_id,)).fetchone()


def _heard_from(row: sqlite3.Row | None) -> dict[str, Any]:
    """Whether the organization's worker registered keys, when, and when it was last heard from (None: never)."""
    return {"registered": row is not None and row["encryption_public_key"] is not None,
            "keys_updated_at": row["keys_updated_at"] if row else None, "last_seen": row["last_seen"] if row else None,
            **liveness(row)}


def heartbeat(conn: sqlite3.Connection, org_id: str, version: str | None, programs: dict[str, Any] | None,
              signing_key: str | None = None, stopping: bool = False) -> None:
    """Record that the worker is alive (or, `stopping`, that it is not: a stopped worker looked online for 45 s,
    hiding why its jobs waited); refused (and not recorded) for a worker whose keys are not the registered ones, so
    a worker that lost its seat to another does not keep looking like the live one."""
    row = registered_worker(conn, org_id)
    if signing_key is not None and row is None:
        raise KeysNotRegistered("this organization has no worker keys registered (the coordinator's data may have "
                                "been restored from a backup); register them again (PUT /v1/worker/keys)")
    if signing_key is not None and row["signing_public_key"] != signing_key:
        raise OtherWorkerKeys(f"another worker of this organization registered other keys at "
                              f"{row['keys_updated_at']}; this worker no longer takes the organization's seats: stop "
                              "one of the two (a worker registers its keys when it starts)")
    now = now_iso()
    conn.execute("INSERT INTO workers (org_id, last_seen, version, programs, stopped_at) VALUES (?, ?, ?, ?, ?) "
                 "ON CONFLICT(org_id) DO UPDATE SET last_seen = excluded.last_seen, version = excluded.version, "
                 "programs = excluded.programs, stopped_at = excluded.stopped_at",
                 (org_id, now, version, json.dumps(programs) if programs is not None else None,
                  now if stopping else None))


def missing_keys(conn: sqlite3.Connection, job_id: str) -> list[str]:
    """Seats (with organization labels) whose worker has not registered its public keys yet."""
    return [f"{p['seat']} ({get_org(conn, p['org_id'])['label']})" for p in parties(conn, job_id)
            if not has_worker_keys(conn, p["org_id"])]


def seated_job(conn: sqlite3.Connection, org_id: str, job_id: str) -> tuple[sqlite3.Row, str]:
    """The job (start timeout applied) and the caller's seat; 404 unknown job, 403 no seat."""
    job = find_job(conn, job_id)
    seat = seat_of(conn, job_id, org_id)
    if seat is None:
        raise Forbidden("your organization has no seat in this job", code="no_seat")
    return expire_if_late(conn, job), seat


def worker_job_view(conn: sqlite3.Connection, job: sqlite3.Row, seat: str) -> dict[str, Any]:
    task = json.loads(job["task_json"])
    seats = {p["seat"]: p for p in parties(conn, job["id"])}

    def dataview(key: str, owner_seat: str) -> dict[str, Any]:
        uri = None
        if owner_seat == seat:  # only the owning seat learns where the data lives
            row = conn.execute("SELECT uri FROM dataviews WHERE id = ?", (task[key]["dataview"],)).fetchone()
            uri = row["uri"] if row else None
        return {"id": task[key]["dataview"], "name": task[key]["dataview_name"], "uri": uri}

    party_view = {}
    for name, party in seats.items():
        keys = registered_worker(conn, party["org_id"])
        party_view[name] = {"organization": org_ref(get_org(conn, party["org_id"])),
                            "encryption_public_key": keys["encryption_public_key"] if keys else None,
                            "signing_public_key": keys["signing_public_key"] if keys else None}
    return {
        "id": job["id"], "type": job["type"], "status": job["status"], "seat": seat,
        "seat_state": seats[seat]["state"],
        "outputs_to": job["outputs_to"], "timeout": job["timeout"], "approved_at": job["approved_at"],
        # Why it ended in Error, for the partners' logs; not who stopped a Stopped job (a person's email, which
        # would go to every partner organization's log and its CloudWatch).
        "error": job["error"] if job["status"] == "Error" else None,
        "task": {"x": {"columns": task["x"]["columns"], "dataview": dataview("x", "x_owner")},
                 "y": {"column": task["y"]["column"], "dataview": dataview("y", "y_owner")},
                 # Where the model owner keeps its models: for its own worker, which writes there, alone.
                 "model_location": task["model_location"] if seat == job["outputs_to"] else None},
        "parties": party_view,
    }


def list_worker_jobs(conn: sqlite3.Connection, org_id: str) -> list[dict[str, Any]]:
    """Approved or Started jobs where the organization holds a seat and all three parties registered keys."""
    # From the few live jobs to their parties: left to itself, SQLite walks every job the organization ever had a
    # seat in (20 ms for 20,000 jobs, on every worker's poll; 0.05 ms this way).
    rows = list(conn.execute("SELECT j.*, p.seat AS my_seat FROM jobs j INDEXED BY jobs_status "
                             "JOIN job_parties p ON p.job_id = j.id "
                             "WHERE j.status IN ('Approved', 'Started') AND p.org_id = ? ORDER BY j.approved_at",
                             (org_id,)))
    out = []
    for row in rows:
        job = expire_if_late(conn, row)
        if job["status"] in ("Approved", "Started") and not missing_keys(conn, job["id"]):
            out.append(worker_job_view(conn, job, row["my_seat"]))
    return out


def get_worker_job(conn: sqlite3.Connection, org_id: str, job_id: str) -> dict[str, Any]:
    job, seat = seated_job(conn, org_id, job_id)
    missing = missing_keys(conn, job_id)
    if missing:
        raise Conflict(f"the job waits for workers to register their keys: {', '.join(missing)}",
                       code="keys_missing", extra={"status": job["status"]})
    return worker_job_view(conn, job, seat)


def _late_error(conn: sqlite3.Connection, job: sqlite3.Row, seat: str, org_id: str, message: str | None) -> None:
    """A seat's own error arriving after a partner's report of it ended the job: a partner told to stop by this
    seat says "the <seat> stopped the job ... (see its error)", and its report can come first (the workers report
    in their own order). The seat keeps its error, and the job's error becomes it, in place of the partner's."""
    conn.execute("UPDATE job_parties SET state = 'error', message = ?, updated_at = ? WHERE job_id = ? AND seat = ?",
                 (message, now_iso(), job["id"], seat))
    # The relayed wording is the protocol's (services/jobs/linear_regression/protocol.py, _check_status).
    if message and re.match(rf"[a-z_]+ \([^)]*\): the {re.escape(seat)} stopped the job\b", job["error"] or ""):
        label = get_org(conn, org_id)["label"]
        conn.execute("UPDATE jobs SET error = ?, updated_at = ? WHERE id = ?",
                     (f"{seat} ({label}): {message}", now_iso(), job["id"]))


def _offline_partners(conn: sqlite3.Connection, job_id: str, seat: str, message: str) -> str:
    """For a seat's timeout waiting for a partner: the other seats' workers the coordinator shows offline. The
    partner named may itself have waited for one of them: x waited for y, y for the helper whose worker had
    stopped, and the job's error blamed y alone."""
    if not message.startswith("no message "):  # the runner's words for a wait that ended (spool_transport.py)
        return ""
    offline, seen = [], set()
    for party in parties(conn, job_id):
        if party["seat"] == seat or party["org_id"] in seen:  # one organization may hold two seats
            continue
        seen.add(party["org_id"])
        state = worker_liveness(conn, party["org_id"])
        if not state["online"]:
            offline.append(f"the {party['seat']} worker (organization {get_org(conn, party['org_id'])['label']}: "
                           f"{offline_in_words(state)})")
    return f"; the coordinator shows offline {' and '.join(offline)}" if offline else ""


def report(conn: sqlite3.Connection, org_id: str, job_id: str, body: dict[str, Any]) -> bool:
    """Record a seat's state; move the job to Started, Completed or Error when the reports say so. True when the
    job's status changed (what the workers' job watches wait for; progress alone wakes none of them)."""
    job, seat = seated_job(conn, org_id, job_id)
    state = body["state"]
    current = conn.execute("SELECT state FROM job_parties WHERE job_id = ? AND seat = ?", (job_id, seat)).fetchone()
    if job["status"] not in ("Approved", "Started"):
        if job["status"] in FINAL_STATUSES and state in ("completed", "error") and current["state"] == state:
            return False  # a retried final report that was already applied (its first answer got lost)
        if job["status"] == "Completed" and state == "completed":
            # Another seat finished its role just after the output seat completed the job: record it, so the job
            # does not show that seat still running.
            conn.execute("UPDATE job_parties SET state = 'completed', progress = 1.0, message = ?, updated_at = ? "
                         "WHERE job_id = ? AND seat = ?", (body.get("message"), now_iso(), job_id, seat))
            return False
        if job["status"] == "Error" and state == "error" and current["state"] not in ("completed", "error"):
            _late_error(conn, job, seat, org_id, body.get("message"))
            return False
        raise Conflict(f"the job is {job['status']}; stop working on it", code="job_not_active",
                       extra={"status": job["status"]})
    if current["state"] == "completed" and state in ("started", "running"):
        return False  # an update older than the seat's end, arriving late (a worker's clock stepped back): kept out
    if state == "completed" and seat == job["outputs_to"] and not body.get("metrics"):
        raise InvalidRequest("field 'metrics': the output seat's completed report must carry the metrics")
    progress = 1.0 if state == "completed" else body.get("progress") or 0.0
    conn.execute("UPDATE job_parties SET state = ?, progress = ?, message = ?, updated_at = ? "
                 "WHERE job_id = ? AND seat = ?", (state, progress, body.get("message"), now_iso(), job_id, seat))
    if state == "error":
        label = get_org(conn, org_id)["label"]
        message = body.get("message") or "the worker reported an error"
        set_status(conn, job_id, "Error", f"{seat} ({label}): {message}{_offline_partners(conn, job_id, seat, message)}")
        return True
    if state == "completed" and seat == job["outputs_to"]:
        task = json.loads(job["task_json"])
        location = body.get("model_location") or (
            f"{task['model_location'].rstrip('/')}/{job_id}/regression_weights.csv" if task["model_location"] else None)
        conn.execute("UPDATE jobs SET metrics_json = ?, result_location = ? WHERE id = ?",
                     (json.dumps(body["metrics"]), location, job_id))
        set_status(conn, job_id, "Completed")
        return True
    if job["status"] == "Approved" and all(p["state"] != "pending" for p in parties(conn, job_id)):
        set_status(conn, job_id, "Started")
        return True
    conn.execute("UPDATE jobs SET updated_at = ? WHERE id = ?", (now_iso(), job_id))
    return False
