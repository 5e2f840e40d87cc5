"""The coordinator's HTTP API under `/v1` (see services/CONTRACTS.md); thin handlers over the store modules."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from services.coordinator import decisions, identity, jobs, memberships, projects, views, workers
from services.coordinator.audit import RefusedTokens, record
from services.coordinator.creation_room import CreationRoom
from services.coordinator.db import Database
from services.coordinator.identity import Principal
from services.coordinator.job_changes import VERSION_HEADER, JobChanges
from services.coordinator.paging import DEFAULT_LIMIT, MAX_LIMIT, NEXT_CURSOR_HEADER, PageRequest
from services.coordinator.permissions import MANAGE_USERS, require_member, require_person, require_role, require_worker
from services.coordinator.schemas import (
    Approval,
    Heartbeat,
    HelperRef,
    MemberRole,
    NewDataview,
    NewJob,
    NewProject,
    NewToken,
    NewUser,
    OrganizationRef,
    Rejection,
    Report,
    WorkerKeys,
)
from services.server.errors import Unauthorized

MAX_JSON_BODY = 1 << 20
bearer = HTTPBearer(auto_error=False, scheme_name="CapeToken",
                    description="`<token_id>,<secret>` as issued by the coordinator: a person's user token, or a "
                                "worker's organization token for /v1/worker/... (each endpoint says which it takes "
                                "by its tag: `worker` endpoints take organization tokens, the others user tokens, "
                                "`/v1/login` either)")


def listing(items: list[dict[str, Any]], next_cursor: str | None = None) -> JSONResponse:
    """A long list's answer, encoded here (in the request's worker thread). FastAPI checks and encodes what an
    endpoint returns against its response_model on the event loop: 0.6 s for 5,000 jobs, during which no other
    request (every worker's heartbeat and long poll) was served. The views are built by our own code in the
    model's shape; the model still documents the answer. A page that has a next one names it in a header."""
    return JSONResponse(items, headers={NEXT_CURSOR_HEADER: next_cursor} if next_cursor else None)


def page_request(limit: int = Query(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT,
                                    description=f"at most this many, newest first (1 to {MAX_LIMIT})"),
                 cursor: str | None = Query(None, description=f"where the page starts: the {NEXT_CURSOR_HEADER} "
                                                              "header of the previous page")) -> PageRequest:
    return PageRequest(limit, cursor)


PAGED = {200: {"description": "a page, newest first", "headers": {NEXT_CURSOR_HEADER: {
    "description": "the `cursor` of the next page; absent on the last page", "schema": {"type": "string"}}}}}


def coordinator_router(db: Database, changes: JobChanges | None = None,
                       refused: RefusedTokens | None = None, room: CreationRoom | None = None) -> APIRouter:
    """All `/v1` endpoints, bound to one database; `changes` is bumped whenever a job's status may have changed,
    `refused` counts requests refused for their token, `room` refuses new things when the disk runs low."""
    changes = changes or JobChanges()
    refused = refused or RefusedTokens()
    room = room or CreationRoom(db.path.parent, 0)

    @contextmanager
    def job_change(job_id: str | None = None) -> Iterator[Any]:
        """A transaction that may change a job's status; once it has committed, the waiting workers of the
        organizations holding the job's seats are woken (every worker's when no job is named)."""
        with db.transaction() as conn:
            yield conn
            orgs = jobs.seat_orgs(conn, job_id) if job_id is not None else None
        changes.bump(orgs)
    # JSON bodies here are small; a 1 MiB cap answers 413 before a big body is parsed into memory.
    router = APIRouter(prefix="/v1", max_body_size=MAX_JSON_BODY)

    def principal(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Principal:
        try:
            with db.transaction() as conn:
                found = identity.authenticate(conn, credentials.credentials if credentials else None)
        except Unauthorized:
            refused.note(request.client.host if request.client else "unknown")
            raise
        identity.note_use(db, found)
        request.state.principal = found  # for the audit of a refusal (403) that follows
        return found

    def person(p: Principal = Depends(principal)) -> Principal:
        require_person(p)
        return p

    def worker(p: Principal = Depends(principal)) -> Principal:
        require_worker(p)
        return p

    # --- identity ----------------------------------------------------------------------------------------------

    @router.post("/login", tags=["identity"], response_model=views.Login)
    def login(p: Principal = Depends(principal)) -> dict[str, Any]:
        with db.transaction() as conn:
            return identity.login_view(conn, p)

    @router.get("/organizations", tags=["identity"], response_model=list[views.Organization])
    def list_organizations(p: Principal = Depends(person)) -> list[dict[str, Any]]:
        with db.transaction() as conn:
            return identity.list_organizations(conn)

    @router.get("/organizations/{org}", tags=["identity"], response_model=views.Organization)
    def get_organization(org: str, p: Principal = Depends(person)) -> dict[str, Any]:
        with db.transaction() as conn:
            return identity.org_view(identity.find_organization(conn, org))

    @router.post("/organizations/{org}/users", status_code=201, tags=["identity"], response_model=views.NewMember)
    def add_user(org: str, body: NewUser, p: Principal = Depends(person)) -> dict[str, Any]:
        with db.transaction() as conn:
            org_id = identity.find_organization(conn, org)["id"]
            require_role(p, org_id, MANAGE_USERS, "add users")
            user, token, existing = identity.add_user(conn, org_id, body.email, body.role,
                                                      existing_ok=body.existing_account)
            room.check(p, "a user")  # after the checks: a refusal of its own comes first; raised, it rolls back
        record(p, "added %s to organization %s as %s%s", body.email, org, body.role,
               " (an existing account)" if existing else "")
        return {"user": user, "token": token, "existing_account": existing}

    @router.get("/organizations/{org}/users", tags=["identity"], response_model=list[views.Member])
    def list_users(org: str, p: Principal = Depends(person)) -> list[dict[str, Any]]:
        with db.transaction() as conn:
            org_id = identity.find_organization(conn, org)["id"]
            require_member(p, org_id, "these users")
            return identity.list_members(conn, org_id)

    @router.put("/organizations/{org}/users/{user}", tags=["identity"], response_model=views.Member)
    def set_user_role(org: str, user: str, body: MemberRole, p: Principal = Depends(person)) -> dict[str, Any]:
        with db.transaction() as conn:
            row = identity.find_organization(conn, org)
            require_role(p, row["id"], MANAGE_USERS, "change users' roles")
            member = memberships.set_member_role(conn, row, user, body.role)
        record(p, "made user %s %s in organization %s", user, body.role, org)
        return member

    @router.delete("/organizations/{org}/users/{user}", status_code=204, tags=["identity"])
    def remove_user(org: str, user: str, p: Principal = Depends(person)) -> Response:
        with db.transaction() as conn:
            row = identity.find_organization(conn, org)
            require_role(p, row["id"], MANAGE_USERS, "remove users")
            memberships.remove_member(conn, row, user)
        record(p, "removed user %s from organization %s", user, org)
        return Response(status_code=204)

    @router.get("/organizations/{org}/worker", tags=["identity"], response_model=views.WorkerStatus)
    def get_worker_status(org: str, p: Principal = Depends(person)) -> dict[str, Any]:
        with db.transaction() as conn:
            org_id = identity.find_organization(conn, org)["id"]
            require_member(p, org_id, "this worker")
            return workers.status_view(conn, org_id)

    @router.post("/organizations/{org}/tokens", status_code=201, tags=["identity"], response_model=views.IssuedToken)
    def create_org_token(org: str, body: NewToken | None = None, p: Principal = Depends(person)) -> dict[str, str]:
        with db.transaction() as conn:
            org_id = identity.find_organization(conn, org)["id"]
            require_role(p, org_id, MANAGE_USERS, "create organization tokens")
            issued = identity.issue_org_token(conn, org_id, body.description if body else None)
            room.check(p, "a token")
        record(p, "issued organization token %s for organization %s", issued["id"], org)
        return issued

    @router.get("/organizations/{org}/tokens", tags=["identity"], response_model=list[views.TokenInfo])
    def list_org_tokens(org: str, p: Principal = Depends(person)) -> list[dict[str, Any]]:
        # Which id to revoke when a worker's token leaked: ids, descriptions and dates only.
        with db.transaction() as conn:
            org_id = identity.find_organization(conn, org)["id"]
            require_role(p, org_id, MANAGE_USERS, "see organization tokens")
            return identity.list_org_tokens(conn, org_id)

    @router.get("/tokens", tags=["identity"], response_model=list[views.TokenInfo])
    def list_user_tokens(p: Principal = Depends(person)) -> list[dict[str, Any]]:
        # A person's own tokens: which id to revoke for a lost laptop, by the description given at `tokens create`.
        with db.transaction() as conn:
            return identity.list_user_tokens(conn, p.user_id or "")

    @router.post("/tokens", status_code=201, tags=["identity"], response_model=views.IssuedToken)
    def create_user_token(body: NewToken | None = None, p: Principal = Depends(person)) -> dict[str, str]:
        with db.transaction() as conn:
            issued = identity.issue_user_token(conn, p.user_id or "", body.description if body else None)
            room.check(p, "a token")
        record(p, "issued themselves user token %s", issued["id"])
        return issued

    @router.delete("/tokens/{token_id}", status_code=204, tags=["identity"])
    def revoke_token(token_id: str, p: Principal = Depends(principal)) -> Response:
        with db.transaction() as conn:
            identity.check_may_revoke(conn, p, token_id)
            identity.revoke_token(conn, token_id)
        record(p, "revoked token %s", token_id)
        return Response(status_code=204)

    # --- projects ----------------------------------------------------------------------------------------------

    @router.post("/projects", status_code=201, tags=["projects"], response_model=views.Project)
    def create_project(body: NewProject, p: Principal = Depends(person)) -> dict[str, Any]:
        with db.transaction() as conn:
            row = projects.create_project(conn, p, body.label, body.name, body.description, body.organization)
            room.check(p, "a project")
            return projects.project_view(conn, row)

    @router.get("/projects", tags=["projects"], response_model=list[views.Project], responses=PAGED)
    def list_projects(page: PageRequest = Depends(page_request), p: Principal = Depends(person)) -> JSONResponse:
        with db.reading() as conn:
            found = projects.list_projects(conn, p, page)
            listed = [projects.project_view(conn, r) for r in found.rows]
        return listing(listed, found.next_cursor)

    @router.get("/projects/{project}", tags=["projects"], response_model=views.Project)
    def get_project(project: str, p: Principal = Depends(person)) -> dict[str, Any]:
        with db.transaction() as conn:
            return projects.project_view(conn, projects.readable_project(conn, p, project))

    @router.post("/projects/{project}/organizations", tags=["projects"], response_model=views.Project)
    def add_project_organization(project: str, body: OrganizationRef, p: Principal = Depends(person)) -> dict[str, Any]:
        with db.transaction() as conn:
            view = projects.project_view(conn, projects.add_organization(conn, p, project, body.organization))
        record(p, "added organization %s to project %s", body.organization, project)
        return view

    @router.post("/projects/{project}/organizations/{org}/join", tags=["projects"], response_model=views.Project)
    def join_project(project: str, org: str, p: Principal = Depends(person)) -> dict[str, Any]:
        with db.transaction() as conn:
            view = projects.project_view(conn, projects.join_project(conn, p, project, org))
        record(p, "joined project %s for organization %s", project, org)
        return view

    @router.delete("/projects/{project}/organizations/{org}", status_code=204, tags=["projects"])
    def remove_project_organization(project: str, org: str, p: Principal = Depends(person)) -> Response:
        with db.transaction() as conn:
            projects.remove_organization(conn, p, project, org)
        record(p, "took organization %s out of project %s", org, project)
        return Response(status_code=204)

    @router.put("/projects/{project}/helper", tags=["projects"], response_model=views.Project)
    def set_project_helper(project: str, body: HelperRef, p: Principal = Depends(person)) -> dict[str, Any]:
        with db.transaction() as conn:
            view = projects.project_view(conn, projects.set_helper(conn, p, project, body.organization))
        record(p, "made %s the helper of project %s", body.organization or "no organization", project)
        return view

    @router.delete("/projects/{project}", status_code=204, tags=["projects"])
    def delete_project(project: str, p: Principal = Depends(person)) -> Response:
        with db.transaction() as conn:
            projects.delete_project(conn, p, project)
        record(p, "deleted project %s", project)
        return Response(status_code=204)

    # --- dataviews ---------------------------------------------------------------------------------------------

    @router.post("/projects/{project}/dataviews", status_code=201, tags=["dataviews"], response_model=views.Dataview)
    def create_dataview(project: str, body: NewDataview, p: Principal = Depends(person)) -> dict[str, Any]:
        with db.transaction() as conn:
            schema = [c.model_dump() for c in body.schema_]
            row = projects.create_dataview(conn, p, project, body.name, body.uri, schema, body.organization)
            room.check(p, "a dataview")
            return projects.dataview_view(conn, p, row)

    @router.get("/projects/{project}/dataviews", tags=["dataviews"], response_model=list[views.Dataview])
    def list_dataviews(project: str, p: Principal = Depends(person)) -> list[dict[str, Any]]:
        with db.transaction() as conn:
            return [projects.dataview_view(conn, p, r) for r in projects.list_dataviews(conn, p, project)]

    @router.get("/dataviews/{dataview_id}", tags=["dataviews"], response_model=views.Dataview)
    def get_dataview(dataview_id: str, p: Principal = Depends(person)) -> dict[str, Any]:
        with db.transaction() as conn:
            return projects.dataview_view(conn, p, projects.readable_dataview(conn, p, dataview_id))

    @router.delete("/dataviews/{dataview_id}", status_code=204, tags=["dataviews"])
    def delete_dataview(dataview_id: str, p: Principal = Depends(person)) -> Response:
        with db.transaction() as conn:
            projects.delete_dataview(conn, p, dataview_id)
        record(p, "deleted dataview %s", dataview_id)
        return Response(status_code=204)

    # --- jobs --------------------------------------------------------------------------------------------------

    @router.post("/projects/{project}/jobs", status_code=201, tags=["jobs"], response_model=views.Job)
    def submit_job(project: str, body: NewJob, p: Principal = Depends(person)) -> dict[str, Any]:
        with db.transaction() as conn:
            job_id = jobs.submit_job(conn, p, project, body.model_dump())
            room.check(p, "a job")
            return jobs.job_view(conn, jobs.find_job(conn, job_id), p)

    def job_page(p: Principal, project: str | None, status: list[str] | None, page: PageRequest) -> JSONResponse:
        with db.transaction() as conn:  # it may end jobs past their start timeout: a write
            found = jobs.list_jobs(conn, p, project, status, page)
        with db.reading() as conn:
            views = jobs.job_views(conn, jobs.find_jobs(conn, [row["id"] for row in found.rows]), p)
        # A later snapshot than the one the ids came from: a job that moved on since has left the filter.
        return listing([view for view in views if not status or view["status"] in status], found.next_cursor)

    @router.get("/projects/{project}/jobs", tags=["jobs"], response_model=list[views.Job], responses=PAGED)
    def list_jobs(project: str, status: list[views.JobStatus] | None = Query(None),
                  page: PageRequest = Depends(page_request), p: Principal = Depends(person)) -> JSONResponse:
        return job_page(p, project, status, page)

    @router.get("/jobs", tags=["jobs"], response_model=list[views.Job], responses=PAGED)
    def list_my_jobs(status: list[views.JobStatus] | None = Query(None), page: PageRequest = Depends(page_request),
                     p: Principal = Depends(person)) -> JSONResponse:
        """The jobs of every project one of the caller's organizations is a member of."""
        return job_page(p, None, status, page)

    @router.get("/jobs/{job_id}", tags=["jobs"], response_model=views.Job)
    def get_job(job_id: str, p: Principal = Depends(person)) -> dict[str, Any]:
        with db.transaction() as conn:
            return jobs.job_view(conn, jobs.readable_job(conn, p, job_id), p)

    @router.post("/jobs/{job_id}/approve", tags=["jobs"], response_model=views.Job)
    def approve_job(job_id: str, body: Approval | None = None, p: Principal = Depends(person)) -> dict[str, Any]:
        organization = body.organization if body else None
        with job_change(job_id) as conn:
            view = jobs.job_view(conn, decisions.approve(conn, p, job_id, organization), p)
        record(p, "approved job %s%s", job_id, f" for organization {organization}" if organization else "")
        return view

    @router.post("/jobs/{job_id}/reject", tags=["jobs"], response_model=views.Job)
    def reject_job(job_id: str, body: Rejection | None = None, p: Principal = Depends(person)) -> dict[str, Any]:
        organization = body.organization if body else None
        with job_change(job_id) as conn:
            view = jobs.job_view(conn, decisions.reject(conn, p, job_id, organization, body.reason if body else None),
                                 p)
        record(p, "rejected job %s%s", job_id, f" for organization {organization}" if organization else "")
        return view

    @router.post("/jobs/{job_id}/stop", tags=["jobs"], response_model=views.Job)
    def stop_job(job_id: str, p: Principal = Depends(person)) -> dict[str, Any]:
        with job_change(job_id) as conn:
            view = jobs.job_view(conn, jobs.stop(conn, p, job_id), p)
        record(p, "stopped job %s", job_id)
        return view

    @router.get("/jobs/{job_id}/results", tags=["jobs"], response_model=views.JobResults)
    def job_results(job_id: str, p: Principal = Depends(person)) -> dict[str, Any]:
        with db.transaction() as conn:
            return jobs.results(conn, p, job_id)

    # --- worker endpoints --------------------------------------------------------------------------------------

    @router.get("/worker/keys", tags=["worker"], response_model=views.RegisteredKeys)
    def get_keys(p: Principal = Depends(worker)) -> dict[str, Any]:
        # `cape-worker check`: would this worker's keys be refused (another worker of the organization heard from)?
        with db.transaction() as conn:
            return workers.registered_keys_view(conn, p.org_id or "")

    @router.put("/worker/keys", status_code=204, tags=["worker"])
    def put_keys(body: WorkerKeys, p: Principal = Depends(worker)) -> Response:
        # A job is served to its workers only once all three registered keys: the last one's makes it appear.
        with job_change() as conn:
            change = workers.register_keys(conn, p.org_id or "", body.encryption_public_key, body.signing_public_key)
        if change:
            record(p, "%s its public keys", change)
        return Response(status_code=204)

    @router.post("/worker/heartbeat", status_code=204, tags=["worker"])
    def post_heartbeat(body: Heartbeat | None = None, p: Principal = Depends(worker)) -> Response:
        with db.transaction() as conn:
            workers.heartbeat(conn, p.org_id or "", body.version if body else None, body.programs if body else None,
                              body.signing_public_key if body else None, bool(body and body.stopping))
        return Response(status_code=204)

    @router.get("/worker/jobs", tags=["worker"], response_model=list[views.WorkerJob])
    async def worker_jobs(response: Response, p: Principal = Depends(worker),
                          wait: float = Query(0, ge=0, le=60, description="long-poll: answer once the jobs' version "
                                              "differs from `after`, or after this many seconds"),
                          after: int | None = Query(None, description="the version (X-Cape-Jobs-Version header) of "
                                                    "the caller's previous answer")
                          ) -> list[dict[str, Any]]:
        if wait > 0 and after is not None:
            await changes.wait(p.org_id or "", after, wait)
        version = changes.version(p.org_id or "")  # read before listing: a change made meanwhile shows as newer

        def listing() -> list[dict[str, Any]]:
            with db.transaction() as conn:
                return workers.list_worker_jobs(conn, p.org_id or "")

        jobs_now = await run_in_threadpool(listing)
        response.headers[VERSION_HEADER] = str(version)
        return jobs_now

    @router.get("/worker/jobs/{job_id}", tags=["worker"], response_model=views.WorkerJob)
    def worker_job(job_id: str, p: Principal = Depends(worker)) -> dict[str, Any]:
        with db.transaction() as conn:
            return workers.get_worker_job(conn, p.org_id or "", job_id)

    @router.post("/worker/jobs/{job_id}/report", status_code=204, tags=["worker"])
    def worker_report(job_id: str, body: Report, p: Principal = Depends(worker)) -> Response:
        with db.transaction() as conn:
            changed = workers.report(conn, p.org_id or "", job_id, body.model_dump(exclude_none=True))
            orgs = jobs.seat_orgs(conn, job_id) if changed else []
        if changed:  # progress alone: no worker's job list changed, so none of their long polls is woken
            changes.bump(orgs)
        return Response(status_code=204)

    return router
