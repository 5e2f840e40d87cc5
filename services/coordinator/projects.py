"""Projects (member organizations, helper) and dataviews (pointers to an organization's dataset)."""
from __future__ import annotations

import json
import sqlite3
from typing import Any

from services.coordinator.blocking_jobs import active_jobs, blocked
from services.coordinator.db import new_id, now_iso
from services.coordinator.identity import Principal, find_organization, get_org, org_ref, org_view
from services.coordinator.paging import Page, PageRequest, newest_first
from services.coordinator.permissions import (
    JOIN_PROJECTS,
    MANAGE_DATAVIEWS,
    MANAGE_PROJECTS,
    acting_organization,
    require_person,
    require_role,
)
from services.server.errors import Conflict, Forbidden, InvalidRequest, NotFound


def find_project(conn: sqlite3.Connection, ref: str) -> sqlite3.Row:
    row = conn.execute("SELECT * FROM projects WHERE id = ? OR label = ? ORDER BY id = ? DESC LIMIT 1",
                       (ref, ref, ref)).fetchone()
    if row is None:
        raise NotFound(f"no project '{ref}'; `cape projects list` (`GET /v1/projects`) lists yours",
                       code="project_not_found")
    return row


def member_org_ids(conn: sqlite3.Connection, project_id: str) -> list[str]:
    return [r["org_id"] for r in conn.execute(
        "SELECT org_id FROM project_organizations WHERE project_id = ? ORDER BY added_at, org_id", (project_id,))]


def is_member_org(conn: sqlite3.Connection, project_id: str, org_id: str) -> bool:
    return conn.execute("SELECT 1 FROM project_organizations WHERE project_id = ? AND org_id = ?",
                        (project_id, org_id)).fetchone() is not None


def has_joined(conn: sqlite3.Connection, project_id: str, org_id: str) -> bool:
    """Whether the member organization agreed to the project (`join_project`), so its worker may take seats."""
    return conn.execute("SELECT 1 FROM project_organizations WHERE project_id = ? AND org_id = ? "
                        "AND joined_at IS NOT NULL", (project_id, org_id)).fetchone() is not None


def readable_project(conn: sqlite3.Connection, principal: Principal, ref: str) -> sqlite3.Row:
    """The project if one of the caller's organizations is a member (any role); 403/404 otherwise."""
    require_person(principal)
    project = find_project(conn, ref)
    if not any(principal.role_in(o) for o in member_org_ids(conn, project["id"])):
        # Named as the caller gave it: a caller reaching it through a job's or dataview's id learns no label.
        raise Forbidden(f"none of your organizations is a member of project '{ref}'")
    return project


def project_view(conn: sqlite3.Connection, row: sqlite3.Row) -> dict[str, Any]:
    return {
        "id": row["id"], "label": row["label"], "name": row["name"], "description": row["description"],
        "owner": org_ref(get_org(conn, row["owner_org_id"])),
        # With names: pycape's examples name things after `o.name` of a project's organizations.
        "organizations": [{**org_view(get_org(conn, m["org_id"])), "joined": m["joined_at"] is not None}
                          for m in conn.execute("SELECT org_id, joined_at FROM project_organizations WHERE "
                                                "project_id = ? ORDER BY added_at, org_id", (row["id"],))],
        "helper": org_ref(get_org(conn, row["helper_org_id"])) if row["helper_org_id"] else None,
        "created_at": row["created_at"],
    }


def create_project(conn: sqlite3.Connection, principal: Principal, label: str, name: str | None,
                   description: str | None, organization: str | None) -> sqlite3.Row:
    org_id = acting_organization(conn, principal, organization, MANAGE_PROJECTS, "create projects")
    if conn.execute("SELECT 1 FROM projects WHERE label = ?", (label,)).fetchone():
        raise Conflict(f"a project labelled '{label}' already exists; choose another label", code="duplicate_label")
    project_id, now = new_id(), now_iso()
    conn.execute("INSERT INTO projects (id, label, name, description, owner_org_id, created_at) "
                 "VALUES (?, ?, ?, ?, ?, ?)", (project_id, label, name or label, description or "", org_id, now))
    conn.execute("INSERT INTO project_organizations (project_id, org_id, added_at, joined_at) VALUES (?, ?, ?, ?)",
                 (project_id, org_id, now, now))
    return find_project(conn, project_id)


def _managed_project(conn: sqlite3.Connection, principal: Principal, ref: str, action: str) -> sqlite3.Row:
    project = readable_project(conn, principal, ref)
    require_role(principal, project["owner_org_id"], MANAGE_PROJECTS, f"{action} (owner organization)")
    return project


def _add_member(conn: sqlite3.Connection, principal: Principal, project_id: str, org_id: str) -> None:
    """Make the organization a member; joined at once when the caller may join for it (`JOIN_PROJECTS` there),
    else once one of its admins or operators joins (`join_project`)."""
    now = now_iso()
    conn.execute("INSERT OR IGNORE INTO project_organizations (project_id, org_id, added_at) VALUES (?, ?, ?)",
                 (project_id, org_id, now))
    if principal.role_in(org_id) in JOIN_PROJECTS:
        _join(conn, project_id, org_id)


def _join(conn: sqlite3.Connection, project_id: str, org_id: str) -> None:
    conn.execute("UPDATE project_organizations SET joined_at = ? WHERE project_id = ? AND org_id = ? "
                 "AND joined_at IS NULL", (now_iso(), project_id, org_id))


def add_organization(conn: sqlite3.Connection, principal: Principal, ref: str, org: str) -> sqlite3.Row:
    project = _managed_project(conn, principal, ref, "add organizations to a project")
    _add_member(conn, principal, project["id"], find_organization(conn, org)["id"])
    return project


def set_helper(conn: sqlite3.Connection, principal: Principal, ref: str, org: str | None) -> sqlite3.Row:
    """Name (or clear) the helper organization; a helper not yet in the project is added as a member."""
    project = _managed_project(conn, principal, ref, "set a project's helper")
    org_id = find_organization(conn, org)["id"] if org is not None else None
    if org_id is not None:
        _add_member(conn, principal, project["id"], org_id)
    conn.execute("UPDATE projects SET helper_org_id = ? WHERE id = ?", (org_id, project["id"]))
    return find_project(conn, project["id"])


def join_project(conn: sqlite3.Connection, principal: Principal, ref: str, org: str) -> sqlite3.Row:
    """The member organization `org` agrees to the project (its admin or operator): its worker may then take a
    job's third seat, as helper or as a model owner that owns no data, and store that model in its bucket."""
    project = readable_project(conn, principal, ref)
    org_id = find_organization(conn, org)["id"]
    require_role(principal, org_id, JOIN_PROJECTS, "join a project for an organization")
    if not is_member_org(conn, project["id"], org_id):
        raise Conflict(f"organization '{org}' is not a member of project '{ref}': an admin or data_scientist of the "
                       "project's owner organization adds it first (`cape projects add-org`)", code="not_a_member")
    _join(conn, project["id"], org_id)
    return find_project(conn, project["id"])


def remove_organization(conn: sqlite3.Connection, principal: Principal, ref: str, org: str) -> None:
    """The member organization `org` leaves the project (its admin or operator), or the owner organization's admin
    or data scientist takes it out: its dataviews in the project go with it, and it stops being the helper. Refused
    for the owner organization, and while a job of the project that has not ended gives it a seat."""
    project = readable_project(conn, principal, ref)
    org_id = find_organization(conn, org)["id"]
    if (principal.role_in(org_id) not in JOIN_PROJECTS
            and principal.role_in(project["owner_org_id"]) not in MANAGE_PROJECTS):
        raise Forbidden("to take an organization out of a project you need the role admin or operator in it, or "
                        "admin or data_scientist in the project's owner organization")
    if not is_member_org(conn, project["id"], org_id):
        raise Conflict(f"organization '{org}' is not a member of project '{ref}'", code="not_a_member")
    if org_id == project["owner_org_id"]:
        raise Conflict(f"organization '{org}' owns project '{ref}' and cannot leave it; delete the project instead "
                       "(`cape projects delete`)", code="owner_cannot_leave")
    blocking = active_jobs(conn, "project_id = ? AND id IN (SELECT job_id FROM job_parties WHERE org_id = ?)",
                           (project["id"], org_id))
    if blocking:
        raise blocked(f"organization '{org}' has a seat in", blocking, "active_jobs")
    conn.execute("DELETE FROM dataviews WHERE project_id = ? AND owner_org_id = ?", (project["id"], org_id))
    conn.execute("UPDATE projects SET helper_org_id = NULL WHERE id = ? AND helper_org_id = ?", (project["id"], org_id))
    conn.execute("DELETE FROM project_organizations WHERE project_id = ? AND org_id = ?", (project["id"], org_id))


def delete_project(conn: sqlite3.Connection, principal: Principal, ref: str) -> None:
    project = _managed_project(conn, principal, ref, "delete a project")
    blocking = active_jobs(conn, "project_id = ?", (project["id"],))
    if blocking:
        raise blocked(f"project '{project['label']}' has", blocking, "active_jobs")
    pid = project["id"]
    for table in ("job_parties", "job_approvals"):
        conn.execute(f"DELETE FROM {table} WHERE job_id IN (SELECT id FROM jobs WHERE project_id = ?)", (pid,))
    conn.execute("DELETE FROM jobs WHERE project_id = ?", (pid,))
    conn.execute("DELETE FROM dataviews WHERE project_id = ?", (pid,))
    conn.execute("DELETE FROM project_organizations WHERE project_id = ?", (pid,))
    conn.execute("DELETE FROM projects WHERE id = ?", (pid,))


def readable_projects(principal: Principal, column: str = "id") -> tuple[str, list[str]]:
    """A condition on `column` (a project id) that holds for the projects `readable_project` lets the caller read:
    those one of their organizations is a member of."""
    require_person(principal)
    marks = ", ".join("?" * len(principal.roles))
    return (f"{column} IN (SELECT project_id FROM project_organizations WHERE org_id IN ({marks}))",
            list(principal.roles))


def list_projects(conn: sqlite3.Connection, principal: Principal, request: PageRequest) -> Page:
    """A page of the caller's projects, newest first."""
    where, params = readable_projects(principal)
    return newest_first(conn, "projects", f"SELECT * FROM projects WHERE {where}", params, request)  # noqa: S608


# --- dataviews ----------------------------------------------------------------------------------------------

def dataview_view(conn: sqlite3.Connection, principal: Principal, row: sqlite3.Row) -> dict[str, Any]:
    owner = get_org(conn, row["owner_org_id"])
    return {
        "id": row["id"], "name": row["name"], "project": row["project_id"], "owner": org_ref(owner),
        "schema": json.loads(row["schema_json"]),
        # The uri says where an organization keeps its data: only that organization sees it.
        "uri": row["uri"] if principal.role_in(row["owner_org_id"]) else None,
        "created_at": row["created_at"],
    }


def create_dataview(conn: sqlite3.Connection, principal: Principal, ref: str, name: str, uri: str,
                    schema: list[dict[str, str]], organization: str | None) -> sqlite3.Row:
    project = readable_project(conn, principal, ref)
    org_id = acting_organization(conn, principal, organization, MANAGE_DATAVIEWS, "add dataviews")
    if not is_member_org(conn, project["id"], org_id):
        raise Forbidden(f"your organization is not a member of project '{project['label']}'")
    names = [c["name"] for c in schema]
    if len(set(names)) != len(names):
        raise InvalidRequest("field 'schema': column names must be unique")
    if conn.execute("SELECT 1 FROM dataviews WHERE project_id = ? AND name = ?", (project["id"], name)).fetchone():
        raise Conflict(f"project '{project['label']}' already has a dataview named '{name}'", code="duplicate_name")
    dataview_id = new_id()
    conn.execute("INSERT INTO dataviews (id, project_id, name, uri, owner_org_id, schema_json, created_at) "
                 "VALUES (?, ?, ?, ?, ?, ?, ?)",
                 (dataview_id, project["id"], name, uri, org_id, json.dumps(schema), now_iso()))
    return find_dataview(conn, dataview_id)


def find_dataview(conn: sqlite3.Connection, dataview_id: str) -> sqlite3.Row:
    row = conn.execute("SELECT * FROM dataviews WHERE id = ?", (dataview_id,)).fetchone()
    if row is None:
        raise NotFound(f"no dataview '{dataview_id}'", code="dataview_not_found")
    return row


def find_project_dataview(conn: sqlite3.Connection, project_id: str, ref: str, field: str) -> sqlite3.Row:
    """A dataview of this project by id or name; 422 naming `field` when the project has none such."""
    row = conn.execute("SELECT * FROM dataviews WHERE project_id = ? AND (id = ? OR name = ?) "
                       "ORDER BY id = ? DESC LIMIT 1", (project_id, ref, ref, ref)).fetchone()
    if row is None:
        raise InvalidRequest(f"field '{field}': this project has no dataview '{ref}'")
    return row


def readable_dataview(conn: sqlite3.Connection, principal: Principal, dataview_id: str) -> sqlite3.Row:
    row = find_dataview(conn, dataview_id)
    readable_project(conn, principal, row["project_id"])
    return row


def list_dataviews(conn: sqlite3.Connection, principal: Principal, ref: str) -> list[sqlite3.Row]:
    project = readable_project(conn, principal, ref)
    return list(conn.execute("SELECT * FROM dataviews WHERE project_id = ? ORDER BY created_at, name",
                             (project["id"],)))


def delete_dataview(conn: sqlite3.Connection, principal: Principal, dataview_id: str) -> None:
    row = readable_dataview(conn, principal, dataview_id)
    require_role(principal, row["owner_org_id"], MANAGE_DATAVIEWS, "delete a dataview (owner organization)")
    in_use = active_jobs(conn, "json_extract(task_json, '$.x.dataview') = ? OR "
                         "json_extract(task_json, '$.y.dataview') = ?", (dataview_id, dataview_id))
    if in_use:
        raise blocked(f"dataview '{row['name']}' is used by", in_use, "dataview_in_use")
    conn.execute("DELETE FROM dataviews WHERE id = ?", (dataview_id,))
