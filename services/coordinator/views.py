"""Response bodies of the coordinator and broker APIs (pydantic): the shapes the OpenAPI document shows.

The handlers build plain dicts (see the store modules' `*_view` functions); FastAPI checks each against these
models on the way out. Extra fields are refused, so a field added to a view without its model here fails the
tests (an internal error) instead of going undocumented.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from services.coordinator.schemas import Role
from services.coordinator.liveness import ONLINE_WITHIN_SECONDS

JobStatus = Literal["NeedsApproval", "Approved", "Started", "Completed", "Error", "Stopped", "Rejected"]
PartyState = Literal["pending", "started", "running", "completed", "error", "stopped"]  # stopped: shown only
Decision = Literal["pending", "approved", "rejected"]
Seat = str  # x_owner, y_owner and the third seat (helper, or model_owner when the model owner holds no data)


class View(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- identity ------------------------------------------------------------------------------------------------

class OrgRef(View):
    id: str
    label: str


class Organization(OrgRef):
    name: str | None


class UserRef(View):
    id: str
    email: str


class Member(UserRef):
    role: Role


class Membership(View):
    organization: OrgRef
    role: Role


class Login(View):
    kind: Literal["user", "organization"] = Field(description="a person's token or a worker's organization token")
    user: UserRef | None
    organization: Organization | None = Field(description="the organization of an organization token")
    roles: dict[str, Role] = Field(description="organization id -> the user's role there")
    memberships: list[Membership] = Field(default_factory=list,
                                          description="the same roles with each organization's label, by label")


class ExistingAccount(View):
    created_at: str
    made_by: Literal["organization", "server_operator", "unknown"] = Field(
        description="who made the account: an organization's admin (who got its first token), the server's operator, "
                    "or unknown (made before the coordinator recorded it)")
    created_by_organization: str | None = Field(
        description="label of the organization whose admin made the account; null otherwise")


class NewMember(View):
    user: Member
    token: str | None = Field(description="a new user's first token (`<token_id>,<secret>`), shown only this once; "
                                          "null for a user who exists already (they keep using their own tokens)")
    existing_account: ExistingAccount | None = Field(
        description="set when the email already had an account (emails match whatever their case): who made it; "
                    "emails are not verified, so check it is the person you mean")


class IssuedToken(View):
    id: str
    token: str = Field(description="`<token_id>,<secret>`; the secret is shown only this once")


class TokenInfo(View):
    id: str
    description: str | None
    created_at: str
    revoked_at: str | None = Field(description="null while the token works")
    last_used_at: str | None = Field(default=None, description="when a request last came with it (to the minute); "
                                                           "null if never")


class RegisteredKeys(View):
    registered: bool = Field(description="a worker of the organization registered public keys")
    encryption_public_key: str | None
    signing_public_key: str | None
    keys_updated_at: str | None
    last_seen: str | None = Field(description="the last heartbeat of the worker holding these keys")
    seconds_since_seen: float | None
    online: bool = Field(description=f"a heartbeat came within the last {ONLINE_WITHIN_SECONDS:g} s and the "
                         "worker did not say it stopped: other keys are refused meanwhile")
    stopped_at: str | None = Field(default=None, description="when the worker said it was stopping (null: it did "
                                   "not, or it heartbeated since)")


class WorkerStatus(View):
    registered: bool = Field(description="the worker registered its public keys")
    keys_updated_at: str | None
    last_seen: str | None = Field(description="the worker's last heartbeat")
    seconds_since_seen: float | None = Field(description="seconds since the last heartbeat by the server's clock; "
                                             "null if never seen, or if that clock was set back since (the "
                                             "worker shows offline until its next heartbeat)")
    online: bool = Field(description=f"a heartbeat came within the last {ONLINE_WITHIN_SECONDS:g} s (workers "
                         "beat at least every 15 s) and the worker did not say it stopped")
    stopped_at: str | None = Field(default=None, description="when the worker said it was stopping (`docker stop`); "
                                   "null if it did not, or heartbeated since")
    version: str | None
    programs: dict[str, Any] | None = Field(description="the worker's programs and their states, as it reported")


# --- projects and dataviews ------------------------------------------------------------------------------------

class ProjectOrganization(Organization):
    joined: bool  # its admin or operator agreed: its worker may take a job's third seat


class Project(View):
    id: str
    label: str
    name: str | None
    description: str | None
    owner: OrgRef
    organizations: list[ProjectOrganization]
    helper: OrgRef | None
    created_at: str


class DataviewColumn(View):
    name: str
    type: Literal["number", "integer", "string"]


class Dataview(View):
    id: str
    name: str
    project: str = Field(description="the project's id")
    owner: OrgRef
    schema_: list[DataviewColumn] = Field(alias="schema")
    uri: str | None = Field(description="where the owner keeps the data; null for other organizations")
    created_at: str

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


# --- jobs ----------------------------------------------------------------------------------------------------

class DataviewRef(View):
    id: str
    name: str


class TaskX(View):
    dataview: DataviewRef
    columns: list[str]


class TaskY(View):
    dataview: DataviewRef
    column: str


class Task(View):
    x: TaskX
    y: TaskY
    model_location: str | None = Field(description="where the job asks the model owner's worker to write the model "
                                                   "(null: its CAPE_BUCKET, or not shown)")
    model_location_shown: bool = Field(True, description="false for a caller outside the model owner: where its "
                                                         "models go is its own business, as a dataview's uri is "
                                                         "its owner's")
    timeout: int = Field(description="seconds the workers have to start the job once approved")


class Party(View):
    organization: OrgRef
    state: PartyState
    progress: float
    message: str | None
    worker_online: bool = Field(description="the seat's worker heartbeated within the last "
                                            f"{ONLINE_WITHIN_SECONDS:g} s")


class Submitter(View):
    id: str
    email: str | None
    organization: OrgRef


class Job(View):
    id: str
    project: str = Field(description="the project's id")
    project_label: str
    type: Literal["linear_regression"]
    status: JobStatus
    task: Task
    parties: dict[Seat, Party]
    outputs_to: Seat = Field(description="the seat that learns the model")
    model_owner: OrgRef
    approvals: dict[str, Decision] = Field(description="data-owner organization label -> its decision")
    submitted_by: Submitter
    created_at: str
    updated_at: str
    approved_at: str | None
    error: str | None
    model_stored_at: str | None = Field(None, description="where the model owner's worker wrote the weights (its "
                                                          "CAPE_BUCKET decides when set), once the job completed; "
                                                          "shown to the model owner's members only")


class JobResults(View):
    job: str = Field(description="the job's id")
    status: Literal["Completed"]
    metrics: dict[str, Any] = Field(description="`mse_result` and `r_squared_result`, as the output seat reported")
    model_location: str | None = Field(description="where the model owner's worker wrote the weights")


# --- worker endpoints ----------------------------------------------------------------------------------------

class WorkerDataview(View):
    id: str
    name: str
    uri: str | None = Field(description="only for the seat that owns this dataview")


class WorkerTaskX(View):
    columns: list[str]
    dataview: WorkerDataview


class WorkerTaskY(View):
    column: str
    dataview: WorkerDataview


class WorkerTask(View):
    x: WorkerTaskX
    y: WorkerTaskY
    model_location: str | None


class WorkerParty(View):
    organization: OrgRef
    encryption_public_key: str | None
    signing_public_key: str | None


class WorkerJob(View):
    id: str
    type: Literal["linear_regression"]
    status: JobStatus
    seat: Seat = Field(description="the calling worker's seat")
    seat_state: PartyState = Field(description="the calling worker's seat's state as last reported (a final report "
                                               "missing from it is sent again)")
    outputs_to: Seat
    timeout: int
    approved_at: str | None
    error: str | None = Field(description="why the job ended in Error, as its project's members see it (null "
                                          "otherwise, also for a Stopped job: who stopped it is a person's email): "
                                          "a partner's worker logs it when it stops its seat")
    task: WorkerTask
    parties: dict[Seat, WorkerParty]


# --- broker --------------------------------------------------------------------------------------------------

class WaitingMessage(View):
    name: str
    from_seat: Seat
    size: int = Field(description="bytes")
    created_at: str


class JobsWaiting(View):
    """`GET /broker/v1/messages?job=...`: what waits in each job the caller may read, and the jobs it may not."""

    jobs: dict[str, list[WaitingMessage]]
    refused: dict[str, dict[str, Any]] = Field(description="job id -> the error its own listing would answer")


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")  # a job-state conflict also carries the job's "status"
    code: str = Field(description="snake_case, stable: what scripts test")
    message: str = Field(description="one sentence for people, saying what to do")


class ErrorBody(View):
    """Every error answer: `{"error": {"code", "message"}}`, with the HTTP status."""

    error: ErrorDetail


class Health(View):
    status: Literal["ok", "warning", "degraded"]
    parts: list[Literal["coordinator", "broker"]]
    version: str
    problem: str | None = Field(default=None, description="what is wrong, when degraded (503) or warning (200)")
