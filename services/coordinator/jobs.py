"""Jobs: submission with seats, stop, the start timeout, and the views people read (decisions: decisions.py)."""
from __future__ import annotations

import json
import logging
import sqlite3
from datetime import UTC, datetime, timedelta
from typing import Any

from services.coordinator.db import iso, new_id, now_iso, parse_iso
from services.coordinator.identity import Principal, find_organization, get_org, org_ref
from services.coordinator.liveness import worker_online
from services.coordinator.paging import Page, PageRequest, newest_first
from services.coordinator.permissions import STOP_JOBS, SUBMIT_JOBS, acting_organization, require_person
from services.coordinator.projects import (
    find_project,
    find_project_dataview,
    has_joined,
    is_member_org,
    readable_project,
    readable_projects,
)
from services.server.errors import Conflict, Forbidden, InvalidRequest, NotFound

log = logging.getLogger("cape.coordinator")

FINAL_STATUSES = ("Rejected", "Completed", "Stopped", "Error")
DATA_SEATS = ("x_owner", "y_owner")
NUMERIC_TYPES = ("number", "integer")
MAX_WAITING_JOBS = 100  # per project and submitting organization: jobs waiting for approval (_check_waiting_jobs)


def find_job(conn: sqlite3.Connection, job_id: str) -> sqlite3.Row:
    row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None:
        raise NotFound(f"no job '{job_id}'", code="job_not_found")
    return row


def parties(conn: sqlite3.Connection, job_id: str) -> list[sqlite3.Row]:
    """The job's three seats in protocol order (x_owner, y_owner, third seat)."""
    return sorted(conn.execute("SELECT * FROM job_parties WHERE job_id = ?", (job_id,)), key=_seat_order)


def _seat_order(party: sqlite3.Row) -> int:
    return {"x_owner": 0, "y_owner": 1}.get(party["seat"], 2)


def seat_orgs(conn: sqlite3.Connection, job_id: str) -> list[str]:
    """The organizations holding the job's seats (none if it no longer exists)."""
    return [row["org_id"] for row in conn.execute("SELECT org_id FROM job_parties WHERE job_id = ?", (job_id,))]


def seat_of(conn: sqlite3.Connection, job_id: str, org_id: str) -> str | None:
    row = conn.execute("SELECT seat FROM job_parties WHERE job_id = ? AND org_id = ?", (job_id, org_id)).fetchone()
    return row["seat"] if row else None


def data_owner_orgs(conn: sqlite3.Connection, job_id: str) -> list[str]:
    return [p["org_id"] for p in parties(conn, job_id) if p["seat"] in DATA_SEATS]


# --- submission ---------------------------------------------------------------------------------------------

def _check_columns(dataview: sqlite3.Row, columns: list[str], field: str) -> None:
    schema = {c["name"]: c["type"] for c in json.loads(dataview["schema_json"])}
    for column in columns:
        if column not in schema:
            raise InvalidRequest(f"field '{field}': dataview '{dataview['name']}' has no column '{column}' "
                                 f"(it has: {', '.join(schema) or 'none'})")
        if schema[column] not in NUMERIC_TYPES:
            raise InvalidRequest(f"field '{field}': column '{column}' of dataview '{dataview['name']}' is "
                                 f"{schema[column]}, not numeric (its schema says so: a type guessed from a file is "
                                 "string when one of its first rows is not a number; its owner fixes the file and "
                                 "adds the dataview again)")


def submit_job(conn: sqlite3.Connection, principal: Principal, project_ref: str, body: dict[str, Any]) -> str:
    """Validate a linear-regression job, assign its seats and ask its data owners to approve it; returns its id."""
    project = readable_project(conn, principal, project_ref)
    org_id = acting_organization(conn, principal, body.get("organization"), SUBMIT_JOBS, "submit jobs")
    if not is_member_org(conn, project["id"], org_id):
        raise Forbidden(f"your organization is not a member of project '{project['label']}'")
    _check_waiting_jobs(conn, project, org_id)
    x_view = find_project_dataview(conn, project["id"], body["x"]["dataview"], "x.dataview")
    y_view = find_project_dataview(conn, project["id"], body["y"]["dataview"], "y.dataview")
    columns = body["x"]["columns"]
    if len(set(columns)) != len(columns):
        raise InvalidRequest("field 'x.columns': a column is named twice")
    _check_columns(x_view, columns, "x.columns")
    _check_columns(y_view, [body["y"]["column"]], "y.column")
    x_org, y_org = x_view["owner_org_id"], y_view["owner_org_id"]
    if x_org == y_org:
        raise InvalidRequest("field 'y.dataview': the x and y dataviews must belong to two different organizations")
    try:
        model_owner = find_organization(conn, body["model_owner"])["id"]
    except NotFound:
        raise InvalidRequest(f"field 'model_owner': no organization '{body['model_owner']}'") from None
    if not is_member_org(conn, project["id"], model_owner):
        raise InvalidRequest("field 'model_owner': the model owner must be a member organization of the project")
    if body.get("model_location") and org_id != model_owner:
        # The model owner's worker writes with its own credentials and the model owner approves nothing: a location
        # chosen by another organization could send its weights to a bucket that organization reads.
        raise InvalidRequest(f"field 'model_location': only the model owner '{body['model_owner']}' chooses where its "
                             "model is written; leave it out (its worker writes to its CAPE_BUCKET) or submit as a "
                             "member of the model owner")
    if model_owner in (x_org, y_org):
        third_seat, third_org = "helper", project["helper_org_id"]
        outputs_to = "x_owner" if model_owner == x_org else "y_owner"
        if third_org is None:
            raise InvalidRequest("field 'helper': the model owner is a data owner, so the project needs a helper "
                                 "organization for the third seat (`cape projects set-helper PROJECT ORG`, or "
                                 "`PUT /v1/projects/{project}/helper`)")
        if third_org in (x_org, y_org):
            raise InvalidRequest("field 'helper': the project's helper owns one of the dataviews; three distinct "
                                 "organizations must take the seats, so set another helper")
    else:
        third_seat, third_org, outputs_to = "model_owner", model_owner, "model_owner"
    if third_org != org_id and not has_joined(conn, project["id"], third_org):
        # Its worker would compute, and store a model in its bucket, for a project its organization never agreed to.
        label = get_org(conn, third_org)["label"]
        role = "the project's helper" if third_seat == "helper" else "the model owner"
        raise Conflict(f"organization '{label}', {role}, has not joined project '{project['label']}', so its worker "
                       f"takes no seat in its jobs: one of its admins or operators runs `cape projects join "
                       f"{project['label']} {label}` (`POST /v1/projects/{{project}}/organizations/{{org}}/join`)",
                       code="not_joined")
    job_id, now = new_id(), now_iso()
    task = {"x": {"dataview": x_view["id"], "dataview_name": x_view["name"], "columns": columns},
            "y": {"dataview": y_view["id"], "dataview_name": y_view["name"], "column": body["y"]["column"]},
            "model_location": body.get("model_location")}
    conn.execute("INSERT INTO jobs (id, project_id, type, status, task_json, model_owner_org_id, outputs_to, timeout,"
                 " submitted_by_user_id, submitted_by_org_id, created_at, updated_at) "
                 "VALUES (?, ?, ?, 'NeedsApproval', ?, ?, ?, ?, ?, ?, ?, ?)",
                 (job_id, project["id"], body["type"], json.dumps(task), model_owner, outputs_to, body["timeout"],
                  principal.user_id, org_id, now, now))
    for seat, seat_org in (("x_owner", x_org), ("y_owner", y_org), (third_seat, third_org)):
        conn.execute("INSERT INTO job_parties (job_id, seat, org_id, state, progress, updated_at) "
                     "VALUES (?, ?, ?, 'pending', 0, ?)", (job_id, seat, seat_org, now))
    for data_org in (x_org, y_org):
        conn.execute("INSERT INTO job_approvals (job_id, org_id, decision) VALUES (?, ?, 'pending')",
                     (job_id, data_org))
    return job_id


# --- status ---------------------------------------------------------------------------------------------------

def _check_waiting_jobs(conn: sqlite3.Connection, project: sqlite3.Row, org_id: str) -> None:
    """Refuse a job past `MAX_WAITING_JOBS` of the submitting organization waiting for approval in the project:
    each one waits for its data owners for weeks, is listed to every member and holds the dataviews it uses
    (a member submitted 1,000 in 9 s against a partner's dataview, which its owner then rejected one by one)."""
    waiting = conn.execute("SELECT COUNT(*) FROM jobs WHERE project_id = ? AND status = 'NeedsApproval' AND "
                           "submitted_by_org_id = ?", (project["id"], org_id)).fetchone()[0]
    if waiting >= MAX_WAITING_JOBS:
        label = project["label"]
        raise Conflict(f"your organization has {waiting} jobs waiting for approval in project '{label}', the most "
                       f"it may: stop some (`cape jobs list {label} --status NeedsApproval`, then `cape jobs stop "
                       "JOB_ID`) or wait for their data owners to decide", code="too_many_waiting_jobs")


def set_status(conn: sqlite3.Connection, job_id: str, status: str, error: str | None = None) -> None:
    log.info("job %s is now %s", job_id, status)  # ids and statuses only: messages may quote user data
    conn.execute("UPDATE jobs SET status = ?, error = COALESCE(?, error), updated_at = ? WHERE id = ?",
                 (status, error, now_iso(), job_id))


def expire_if_late(conn: sqlite3.Connection, job: sqlite3.Row, now: datetime | None = None) -> sqlite3.Row:
    """An Approved job whose three parties did not all start within its timeout ends in Error naming who is late."""
    if job["status"] != "Approved" or not job["approved_at"]:
        return job
    now = now or datetime.now(UTC)
    if now < parse_iso(job["approved_at"]) + timedelta(seconds=job["timeout"]):
        return job
    seats = parties(conn, job["id"])
    keyless = [seat_label(conn, p) for p in seats if not has_worker_keys(conn, p["org_id"])]
    if keyless:  # the job went to no worker: the others were ready and waiting, not missing
        set_status(conn, job["id"], "Error",
                   f"not all parties started within {job['timeout']} s of approval: no worker of "
                   f"{' or '.join(keyless)} has registered its keys, and the job goes to the workers only once all "
                   "three have; start that organization's worker (cape-worker run), then submit the job again")
    else:
        missing = [seat_label(conn, p) for p in seats if p["state"] == "pending"]
        set_status(conn, job["id"], "Error",
                   f"not all parties started within {job['timeout']} s of approval; missing: {', '.join(missing)}")
    return find_job(conn, job["id"])


def seat_label(conn: sqlite3.Connection, party: sqlite3.Row) -> str:
    return f"{party['seat']} ({get_org(conn, party['org_id'])['label']})"


def registered_worker(conn: sqlite3.Connection, org_id: str) -> sqlite3.Row | None:
    """The organization's worker row once it registered its public keys, else None."""
    return conn.execute("SELECT * FROM workers WHERE org_id = ? AND encryption_public_key IS NOT NULL",
                        (org_id,)).fetchone()


def has_worker_keys(conn: sqlite3.Connection, org_id: str) -> bool:
    """Whether a worker of the organization registered its public keys (jobs go to workers only once all have)."""
    return registered_worker(conn, org_id) is not None


def expire_late_jobs(conn: sqlite3.Connection, approval_ttl: float | None = None) -> int:
    """The periodic sweep: apply the start timeout to every Approved job, and the approval deadline (`approval_ttl`
    seconds after submission; None: none) to every job still waiting for approval; returns how many ended. (Started
    jobs whose workers all went away: abandoned_jobs.py.)"""
    ended = 0
    for job in list(conn.execute("SELECT * FROM jobs WHERE status = 'Approved'")):
        ended += expire_if_late(conn, job)["status"] == "Error"
    if approval_ttl is not None:
        ended += expire_unapproved(conn, approval_ttl)
    return ended


def org_labels(conn: sqlite3.Connection, org_ids: list[str]) -> str:
    """The organizations' labels, as messages list them."""
    return ", ".join(get_org(conn, o)["label"] for o in org_ids)


def expire_unapproved(conn: sqlite3.Connection, approval_ttl: float, now: datetime | None = None) -> int:
    """Jobs still waiting for approval `approval_ttl` seconds after submission end in Error naming who did not
    approve: an approval given weeks before the last one would otherwise still count, for data that may have changed
    since, and a forgotten job would hold its dataview and project (they cannot be deleted while it waits)."""
    now = now or datetime.now(UTC)
    ended = 0
    # Only those past the deadline, through the (status, ...) index: the sweep runs every few seconds, and reading
    # every job still waiting for approval (up to 30 days' worth) each time grew with them.
    cutoff = iso(now - timedelta(seconds=approval_ttl))
    for job in list(conn.execute("SELECT * FROM jobs WHERE status = 'NeedsApproval' AND created_at <= ?", (cutoff,))):
        if now < parse_iso(job["created_at"]) + timedelta(seconds=approval_ttl):
            continue
        waiting = [row["org_id"] for row in conn.execute(
            "SELECT org_id FROM job_approvals WHERE job_id = ? AND decision = 'pending'", (job["id"],))]
        within = duration(approval_ttl)
        set_status(conn, job["id"], "Error", f"not approved within {within} of its submission (no approval from "
                                             f"{org_labels(conn, waiting)}); submit it again if it is still wanted")
        ended += 1
    return ended


def duration(seconds: float) -> str:
    """A deadline's length as its error says it: days from a day on (the defaults are 7 and 30), else seconds."""
    return f"{seconds / 86400:g} days" if seconds >= 86400 else f"{seconds:g} s"


def ended_jobs(conn: sqlite3.Connection, job_ids: list[str]) -> list[str]:
    """Those of `job_ids` that have ended (a final status), or that no longer exist (their project was deleted)."""
    status = {row["id"]: row["status"] for row in conn.execute(
        f"SELECT id, status FROM jobs WHERE id IN ({', '.join('?' * len(job_ids))})", job_ids)} if job_ids else {}
    return [job_id for job_id in job_ids if job_id not in status or status[job_id] in FINAL_STATUSES]


# --- reading -------------------------------------------------------------------------------------------------

def readable_job(conn: sqlite3.Connection, principal: Principal, job_id: str) -> sqlite3.Row:
    job = find_job(conn, job_id)
    readable_project(conn, principal, job["project_id"])
    return expire_if_late(conn, job)


def task_view(job: sqlite3.Row) -> dict[str, Any]:
    task = json.loads(job["task_json"])
    return {"x": {"dataview": {"id": task["x"]["dataview"], "name": task["x"]["dataview_name"]},
                  "columns": task["x"]["columns"]},
            "y": {"dataview": {"id": task["y"]["dataview"], "name": task["y"]["dataview_name"]},
                  "column": task["y"]["column"]},
            "model_location": task["model_location"], "model_location_shown": True, "timeout": job["timeout"]}


def _shown_state(status: str, state: str) -> str:
    """A seat that was working when its job ended in Error or Stopped is shown `stopped`: its worker was told to
    stop, and its last report (`started`, `running`) would read as if it still worked. The stored state is kept."""
    return "stopped" if status in ("Error", "Stopped") and state in ("started", "running") else state


def _shown_message(status: str, seat: sqlite3.Row) -> str | None:
    """What a seat last said; for one shown `stopped`, as what it said when the job ended ("uploading the model:
    ... trying again" read as if it still tried after the stop)."""
    message = seat["message"]
    if message and _shown_state(status, seat["state"]) != seat["state"]:
        return f"when the job ended: {message}"
    return message


def job_view(conn: sqlite3.Connection, job: sqlite3.Row, viewer: Principal | None = None) -> dict[str, Any]:
    return job_views(conn, [job], viewer)[0]


_IN_CHUNK = 500  # ids per `IN (...)`: well under SQLite's limit on bound parameters


def _rows_by_id(conn: sqlite3.Connection, table: str, column: str, ids: list[str]) -> dict[str, list[sqlite3.Row]]:
    """The rows of `table` whose `column` is one of `ids`, by that id, in a query per 500 ids."""
    found: dict[str, list[sqlite3.Row]] = {some_id: [] for some_id in ids}
    for at in range(0, len(ids), _IN_CHUNK):
        chunk = ids[at:at + _IN_CHUNK]
        for row in conn.execute(f"SELECT * FROM {table} WHERE {column} IN ({', '.join('?' * len(chunk))})",  # noqa: S608
                                chunk):
            found[row[column]].append(row)
    return found


def find_jobs(conn: sqlite3.Connection, job_ids: list[str]) -> list[sqlite3.Row]:
    """The jobs of `job_ids` still there, in that order."""
    found = _rows_by_id(conn, "jobs", "id", job_ids)
    return [found[job_id][0] for job_id in job_ids if found[job_id]]


def job_views(conn: sqlite3.Connection, jobs: list[sqlite3.Row], viewer: Principal | None = None
              ) -> list[dict[str, Any]]:
    """The views of `jobs` as `viewer` may see them (None: all of it), in a few queries whatever their number: a view
    per job took about 15 queries (0.2 ms), so listing a project of 5,000 jobs held the database, and every
    worker's request behind it, for over a second. Where the model goes (asked and actual) is shown only to the
    model owner's members: job errors never name it, and the job view did, to every project member."""
    ids = [job["id"] for job in jobs]
    approvals, seats = _rows_by_id(conn, "job_approvals", "job_id", ids), _rows_by_id(conn, "job_parties", "job_id", ids)
    orgs: dict[str, sqlite3.Row] = {}
    online: dict[str, bool] = {}
    users: dict[str, sqlite3.Row | None] = {}
    project_labels: dict[str, str] = {}

    def project_label(project_id: str) -> str:
        if project_id not in project_labels:
            project_labels[project_id] = find_project(conn, project_id)["label"]
        return project_labels[project_id]

    def org(org_id: str) -> sqlite3.Row:
        if org_id not in orgs:
            orgs[org_id] = get_org(conn, org_id)
        return orgs[org_id]

    def is_online(org_id: str) -> bool:
        if org_id not in online:
            online[org_id] = worker_online(conn, org_id)
        return online[org_id]

    def user(user_id: str) -> sqlite3.Row | None:
        if user_id not in users:
            users[user_id] = conn.execute("SELECT id, email FROM users WHERE id = ?", (user_id,)).fetchone()
        return users[user_id]

    views = []
    for job in jobs:
        submitter = user(job["submitted_by_user_id"])
        views.append({
            "id": job["id"], "project": job["project_id"], "project_label": project_label(job["project_id"]),
            "type": job["type"], "status": job["status"],
            "task": task_view(job),
            "parties": {p["seat"]: {"organization": org_ref(org(p["org_id"])),
                                    "state": _shown_state(job["status"], p["state"]),
                                    "progress": p["progress"], "message": _shown_message(job["status"], p),
                                    "worker_online": is_online(p["org_id"])}
                        for p in sorted(seats[job["id"]], key=_seat_order)},
            "outputs_to": job["outputs_to"],
            "model_owner": org_ref(org(job["model_owner_org_id"])),
            "approvals": {org(a["org_id"])["label"]: a["decision"] for a in approvals[job["id"]]},
            "submitted_by": {"id": submitter["id"] if submitter else job["submitted_by_user_id"],
                             "email": submitter["email"] if submitter else None,
                             "organization": org_ref(org(job["submitted_by_org_id"]))},
            "created_at": job["created_at"], "updated_at": job["updated_at"], "approved_at": job["approved_at"],
            "error": job["error"],
        })
        if viewer is not None and job["model_owner_org_id"] not in viewer.roles:
            views[-1]["task"].update(model_location=None, model_location_shown=False)
            views[-1]["model_stored_at"] = None
        else:
            views[-1]["model_stored_at"] = job["result_location"]
    return views


def list_jobs(conn: sqlite3.Connection, principal: Principal, project_ref: str | None, statuses: list[str] | None,
              request: PageRequest) -> Page:
    """A page of jobs, newest first: a project's, or (`project_ref` None) those of every project the caller's
    organizations are members of, the projects `readable_project` lets them read; only those in `statuses` when
    given. A job of the page that is past its start timeout is ended here (a write)."""
    if project_ref is not None:
        where, params = "project_id = ?", [readable_project(conn, principal, project_ref)["id"]]
    else:
        where, params = readable_projects(principal, "project_id")
    if statuses:
        where += f" AND status IN ({', '.join('?' for _ in statuses)})"
        params += statuses
    # Keys first, through the (project_id[, status], created_at, id) indexes alone; whole rows for the page only.
    keys = newest_first(conn, "jobs", f"SELECT id, created_at FROM jobs WHERE {where}", params, request)  # noqa: S608
    listed = [expire_if_late(conn, r) for r in find_jobs(conn, [key["id"] for key in keys.rows])]
    # One that just expired has left the filter; the cursor stays the page's last key, so no job is skipped.
    return Page([r for r in listed if not statuses or r["status"] in statuses], keys.next_cursor)


# --- stopping and results ------------------------------------------------------------------------------------

def stop(conn: sqlite3.Connection, principal: Principal, job_id: str) -> sqlite3.Row:
    job = readable_job(conn, principal, job_id)
    orgs = {job["submitted_by_org_id"], *(p["org_id"] for p in parties(conn, job_id))}
    if not any(principal.role_in(o) in STOP_JOBS for o in orgs):
        raise Forbidden("to stop a job you need the role admin, operator or data_scientist in the submitting "
                        "organization or a party's organization")
    if job["status"] in FINAL_STATUSES:
        raise Conflict(f"the job already ended ({job['status']})", code="wrong_status",
                       extra={"status": job["status"]})
    set_status(conn, job_id, "Stopped", f"stopped by {principal.email}")
    return find_job(conn, job_id)


def _no_results(job: sqlite3.Row) -> str:
    """Why a job has no results: not yet, or never (then with the reason it ended, which members may read)."""
    if job["status"] in FINAL_STATUSES:
        why = f" ({job['error']})" if job["error"] else ""
        return f"the job ended in {job['status']}{why}; it has no results"
    return f"the job is {job['status']}; results exist once it is Completed"


def results(conn: sqlite3.Connection, principal: Principal, job_id: str) -> dict[str, Any]:
    require_person(principal)
    job = readable_job(conn, principal, job_id)
    if principal.role_in(job["model_owner_org_id"]) is None:
        raise Forbidden("only members of the model owner's organization can read a job's results")
    if job["status"] != "Completed":
        raise Conflict(_no_results(job), code="not_completed", extra={"status": job["status"]})
    return {"job": job["id"], "status": job["status"], "metrics": json.loads(job["metrics_json"] or "{}"),
            "model_location": job["result_location"]}
