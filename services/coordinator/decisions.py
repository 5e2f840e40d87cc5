"""Data owners' decisions on a job: approve or reject, each for one data-owner organization at a time.

A person who is admin or operator in both data owners used to approve for both with one call, without meaning
to; so a call decides for one organization, and one who may decide for several must name it.
"""
from __future__ import annotations

import logging
import sqlite3

from services.coordinator.db import now_iso
from services.coordinator.identity import Principal, find_organization, get_org
from services.coordinator.jobs import (FINAL_STATUSES, data_owner_orgs, find_job, org_labels, readable_job,
                                       set_status)
from services.coordinator.permissions import APPROVE_JOBS
from services.server.errors import Conflict, Forbidden, InvalidRequest, NotFound

log = logging.getLogger("cape.coordinator")


def _named_org(conn: sqlite3.Connection, principal: Principal, owners: list[str], ref: str, action: str) -> str:
    """The data owner the body names: 422 if it owns no data of the job, 403 if the caller may not decide for it."""
    listed = f"the data owners of this job are {org_labels(conn, owners)}"
    try:
        org = find_organization(conn, ref)
    except NotFound:
        raise InvalidRequest(f"field 'organization': no organization '{ref}'; {listed}") from None
    if org["id"] not in owners:
        raise InvalidRequest(f"field 'organization': organization '{org['label']}' owns no data of this job; {listed}")
    role = principal.role_in(org["id"])
    if role not in APPROVE_JOBS:
        have = f"your role there is {role}" if role else "you are not a member of it"
        raise Forbidden(f"to {action} this job for '{org['label']}' you need the role admin or operator there ({have})")
    return org["id"]


def _my_orgs(principal: Principal, owners: list[str], action: str) -> list[str]:
    """The data owners (in seat order) the caller may decide for; 403 when none."""
    mine = [o for o in owners if principal.role_in(o) in APPROVE_JOBS]
    if not mine:
        if any(principal.role_in(o) for o in owners):
            raise Forbidden(f"to {action} a job you need the role admin or operator in a data-owner organization")
        raise Forbidden(f"only the organizations whose data the job uses can {action} it")
    return mine


def _only_org(conn: sqlite3.Connection, mine: list[str], action: str) -> str:
    if len(mine) > 1:
        raise InvalidRequest(f"field 'organization': you may {action} for several data owners of this job "
                             f"({org_labels(conn, mine)}); name the one you {action} for")
    return mine[0]


def _deciding_org(conn: sqlite3.Connection, principal: Principal, job: sqlite3.Row, ref: str | None,
                  action: str) -> str:
    """The one organization this call decides for. A job that ended is refused (409) before an unnamed
    organization is asked for: naming one would not help."""
    owners = data_owner_orgs(conn, job["id"])
    if ref is not None:
        mine = [_named_org(conn, principal, owners, ref, action)]
    else:
        mine = _my_orgs(principal, owners, action)
    if job["status"] in FINAL_STATUSES:
        raise Conflict(f"the job already ended ({job['status']}); there is nothing to {action}",
                       code="wrong_status", extra={"status": job["status"]})
    return _only_org(conn, mine, action)


def approve(conn: sqlite3.Connection, principal: Principal, job_id: str, organization: str | None) -> sqlite3.Row:
    """Record one data owner's approval; the job is Approved once every data owner approved."""
    job = readable_job(conn, principal, job_id)
    org_id = _deciding_org(conn, principal, job, organization, "approve")
    decisions = {a["org_id"]: a["decision"] for a in
                 conn.execute("SELECT * FROM job_approvals WHERE job_id = ?", (job_id,))}
    if decisions[org_id] == "approved":
        return job  # approving again before the job ends is a no-op
    if job["status"] != "NeedsApproval":
        raise Conflict(f"the job is {job['status']}; only a job that needs approval can be approved",
                       code="wrong_status", extra={"status": job["status"]})
    now = now_iso()
    conn.execute("UPDATE job_approvals SET decision = 'approved', decided_at = ? WHERE job_id = ? AND org_id = ?",
                 (now, job_id, org_id))
    decisions[org_id] = "approved"
    if all(d == "approved" for d in decisions.values()):
        log.info("job %s is now Approved", job_id)
        conn.execute("UPDATE jobs SET status = 'Approved', approved_at = ?, updated_at = ? WHERE id = ?",
                     (now, now, job_id))
    else:
        conn.execute("UPDATE jobs SET updated_at = ? WHERE id = ?", (now, job_id))
    return find_job(conn, job_id)


def reject(conn: sqlite3.Connection, principal: Principal, job_id: str, organization: str | None,
           reason: str | None) -> sqlite3.Row:
    """One data owner's rejection rejects the job, while it has not started."""
    job = readable_job(conn, principal, job_id)
    org_id = _deciding_org(conn, principal, job, organization, "reject")
    if job["status"] not in ("NeedsApproval", "Approved"):
        raise Conflict(f"the job is {job['status']}; only a job that has not started can be rejected; stop it "
                       "instead (`cape jobs stop JOB`)", code="wrong_status", extra={"status": job["status"]})
    now = now_iso()
    conn.execute("UPDATE job_approvals SET decision = 'rejected', reason = ?, decided_at = ? "
                 "WHERE job_id = ? AND org_id = ?", (reason, now, job_id, org_id))
    label = get_org(conn, org_id)["label"]
    set_status(conn, job_id, "Rejected", f"rejected by {label}" + (f": {reason}" if reason else ""))
    return find_job(conn, job_id)
