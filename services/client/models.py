"""The SDK's resource objects (pycape's shape): ``Organization``, ``Project``, ``DataView``, ``Job``."""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator
from itertools import islice
from typing import TYPE_CHECKING, Any, Callable, Sequence
from urllib.parse import quote

import numpy as np

from services.client.errors import ApiError, BadArgument, CapeError, CoordinatorUnreachable, ResultsUnavailable
from services.client.http import ApiSession
from services.client.pages import DEFAULT_PAGE, PAGE_MAX, follow, whole_number
from services.client.results import read_weights, weights_location
from services.client.schema import check_schema_against_uri, normalise_schema, schema_from_file, schema_from_uri

if TYPE_CHECKING:
    from services.client.tasks import VerticallyPartitionedLinearRegression

TERMINAL_STATUSES = frozenset({"Completed", "Rejected", "Stopped", "Error"})
# How else to give a dataview's schema, in an error about a uri it cannot be read from.
SDK_SCHEMA_OPTIONS = "schema=... or schema_from_file_path=..., a local CSV or Parquet file"


def positive_seconds(value: Any) -> bool:
    """A number of seconds above 0 (not a bool, NaN or infinity)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and value > 0)


def seg(value: str) -> str:
    """One URL path segment (labels and names may hold any character); an empty one would name the whole list."""
    if not str(value).strip():
        raise BadArgument("an empty name or id was given (an unset shell variable?); give a label or an id")
    return quote(str(value), safe="")


def one_of(method: str, **refs: str | None) -> str:
    """The one reference given among ``refs`` (a positional id-or-label, or pycape's ``id=`` / ``label=``)."""
    given = [value for value in refs.values() if value is not None]
    if len(given) != 1:
        names = ", ".join(f"{name}=" for name in refs)
        raise BadArgument(f"{method} takes exactly one of {names} (got {len(given)})")
    return given[0]


class OrgRef(dict):
    """An organization as a project or job names it (``{"id", "label"}``, and ``"name"`` among a project's
    organizations); also ``o.id`` / ``o.label`` / ``o.name``, as pycape's ``project.organizations`` are read."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f"organization reference has no {key!r}; it has {', '.join(self)}") from None


class Resource:
    """A server object: its JSON is kept in ``.data``; attributes read from it."""

    def __init__(self, session: ApiSession, data: dict[str, Any]) -> None:
        self._session = session
        self.data = data

    @property
    def id(self) -> str:
        return self.data["id"]

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.id == self.id  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.id))


class Organization(Resource):
    """An organization (labels are public; members and tokens need the right role)."""

    @property
    def label(self) -> str:
        return self.data.get("label", "")

    @property
    def name(self) -> str | None:
        return self.data.get("name")

    def get_worker_status(self) -> dict[str, Any]:
        """The organization's worker as the coordinator last saw it: keys registered, last heartbeat, programs."""
        return self._session.get(f"/v1/organizations/{seg(self.id)}/worker")

    def list_users(self) -> list[dict[str, Any]]:
        """Members of the organization with their roles."""
        return self._session.get(f"/v1/organizations/{seg(self.id)}/users")

    def add_user(self, email: str, role: str, existing_account: bool = False) -> dict[str, Any]:
        """Add a user (admin only); returns ``{"user", "token", "existing_account"}``: a new user's first token, or
        None for a user who exists already (their own tokens now carry this role too; ``existing_account`` then says
        when and by which organization the account was made, since emails are not verified). An account another
        organization's admin made (who holds its first token) is refused (409 ``existing_account``) unless
        ``existing_account`` confirms it is the person meant."""
        body: dict[str, Any] = {"email": email, "role": role}
        if existing_account:  # only when asked: a coordinator from before the confirmation refuses unknown fields
            body["existing_account"] = True
        return self._session.post(f"/v1/organizations/{seg(self.id)}/users", body)

    def remove_user(self, email_or_id: str) -> None:
        """End a user's membership of this organization (admin only); their other organizations keep them."""
        self._session.delete(f"/v1/organizations/{seg(self.id)}/users/{seg(email_or_id)}")

    def set_role(self, email_or_id: str, role: str) -> dict[str, Any]:
        """Change a member's role (admin only); returns the member ``{"id", "email", "role"}``."""
        return self._session.put(f"/v1/organizations/{seg(self.id)}/users/{seg(email_or_id)}", {"role": role})

    def list_tokens(self) -> list[dict[str, Any]]:
        """This organization's worker tokens (admin only): ``{"id", "description", "created_at", "revoked_at"}``
        each, oldest first; never their secrets."""
        return self._session.get(f"/v1/organizations/{seg(self.id)}/tokens")

    def create_token(self, description: str | None = None) -> dict[str, Any]:
        """A new organization token for this organization's worker (admin only): ``{"id", "token"}``."""
        body = {"description": description} if description else {}
        return self._session.post(f"/v1/organizations/{seg(self.id)}/tokens", body)

    def __repr__(self) -> str:
        return f"Organization(id={self.id!r}, label={self.label!r})"


class DataView(Resource):
    """A pointer to one organization's dataset; ``dv[["a", "b"]]`` selects columns for a job (as pycape)."""

    def __init__(self, session: ApiSession, data: dict[str, Any], columns: list[str] | None = None) -> None:
        super().__init__(session, data)
        self.columns = columns

    @property
    def name(self) -> str:
        return self.data.get("name", "")

    @property
    def uri(self) -> str | None:
        return self.data.get("uri")

    @property
    def location(self) -> str | None:
        """pycape's name for ``uri`` (shown to the owner organization's members only)."""
        return self.uri

    @property
    def owner(self) -> dict[str, Any]:
        return self.data.get("owner") or {}

    @property
    def schema(self) -> list[dict[str, str]]:
        return self.data.get("schema") or []

    @property
    def column_names(self) -> list[str]:
        return [c["name"] for c in self.schema]

    def __getitem__(self, columns: str | Sequence[str]) -> DataView:
        if not isinstance(columns, (str, list, tuple)) or not all(isinstance(c, str) for c in columns):
            raise BadArgument(f"select columns of dataview {self.name!r} by name: dv[\"COLUMN\"] or "
                              f"dv[[\"A\", \"B\"]], not {type(columns).__name__} {columns!r}")
        selected = [columns] if isinstance(columns, str) else list(columns)
        if not selected:
            raise BadArgument(f"select at least one column of dataview {self.name!r}")
        known = self.column_names
        missing = [c for c in selected if known and c not in known]
        if missing:
            raise BadArgument(
                f"dataview {self.name!r} has no column {missing[0]!r}; its columns are {', '.join(known)}"
            )
        view = copy.copy(self)
        view.columns = selected
        return view

    def delete(self) -> None:
        """Delete the dataview (its owner organization only)."""
        self._session.delete(f"/v1/dataviews/{seg(self.id)}")

    def __repr__(self) -> str:
        cols = f", columns={self.columns!r}" if self.columns else ""
        return f"DataView(id={self.id!r}, name={self.name!r}, owner={self.owner.get('label')!r}{cols})"


class Job(Resource):
    """A job: its status, the parties' progress, approval, and (for the model owner) the results."""

    def __init__(self, session: ApiSession, data: dict[str, Any]) -> None:
        super().__init__(session, data)
        self._model_location: str | None = None

    @property
    def status(self) -> str:
        return self.data.get("status", "")

    @property
    def parties(self) -> dict[str, dict[str, Any]]:
        return self.data.get("parties") or {}

    def refresh(self) -> Job:
        """Reload from the coordinator; returns self."""
        self.data = self._session.get(f"/v1/jobs/{seg(self.id)}")
        return self

    def get_status(self) -> str:
        """The job's current status (``NeedsApproval``, ``Approved``, ``Started``, ``Completed``, ...)."""
        return self.refresh().status

    def approve(self, org_id: str | Organization | None = None) -> Job:
        """Approve as a data owner (admin or operator) for one organization: ``org_id`` (pycape's keyword; an id,
        label or Organization) names it, and may be left out when you may decide for only one data owner of the
        job. The coordinator refuses an organization that owns no data of the job, or where you may not decide."""
        body = {} if org_id is None else {"organization": org_ref(org_id)}
        return self._decide("approve", body, org_id)

    def reject(self, reason: str | None = None, org_id: str | Organization | None = None) -> Job:
        """Reject as a data owner, for one organization as in ``approve``; the reason is shown to the project's
        members."""
        body: dict[str, Any] = {} if reason is None else {"reason": reason}
        if org_id is not None:
            body["organization"] = org_ref(org_id)
        return self._decide("reject", body, org_id)

    def _decide(self, action: str, body: dict[str, Any], org_id: str | Organization | None) -> Job:
        """POST the decision; for one named organization, check that no other's changed with it: an older
        coordinator ignores the name and decides for every data owner the caller may decide for."""
        before = self._session.get(f"/v1/jobs/{seg(self.id)}").get("approvals") or {} if org_id is not None else {}
        self.data = self._session.post(f"/v1/jobs/{seg(self.id)}/{action}", body)
        labels = {(party.get("organization") or {}).get("id"): (party.get("organization") or {}).get("label")
                  for party in (self.data.get("parties") or {}).values()}
        named = labels.get(org_ref(org_id), org_ref(org_id)) if org_id is not None else None
        others = sorted(org for org, state in (self.data.get("approvals") or {}).items()
                        if named is not None and org != named and before.get(org, state) != state)
        if others:  # the caller's own decisions only: another organization may simply have decided meanwhile
            mine = {(m.get("organization") or {}).get("label") for m in
                    self._session.post("/v1/login").get("memberships") or [] if m.get("role") in ("admin", "operator")}
            others = [org for org in others if org in mine]
        if others:
            raise CapeError(f"the coordinator at {self._session.endpoint} decided ({action}) for {', '.join(others)} "
                            f"too, not only for {named}: it is older than this cape and does not take the "
                            "organization's name; stop the job (`cape jobs stop`) if that was not meant, and "
                            "upgrade cape-server")
        return self

    def pending_approvals(self) -> list[str]:
        """Labels of the data owners that have not approved yet (from the last view of the job)."""
        return [org for org, state in (self.data.get("approvals") or {}).items() if state == "pending"]

    def stop(self) -> Job:
        """Stop the job; the workers stop at their next report."""
        self.data = self._session.post(f"/v1/jobs/{seg(self.id)}/stop")
        return self

    @property
    def model_location(self) -> str | None:
        """Where the model owner's worker wrote the weights, as its completion report said (its CAPE_BUCKET may
        differ from the location submitted); known once ``get_results()`` or ``get_raw_results()`` has run."""
        return self._model_location

    def get_raw_results(self) -> dict[str, Any]:
        """The coordinator's results object: ``{"job", "status", "metrics", "model_location"}``."""
        raw = self._session.get(f"/v1/jobs/{seg(self.id)}/results")
        self._model_location = raw.get("model_location")
        return raw

    def get_results(self) -> tuple[np.ndarray, dict[str, Any]]:
        """``(weights, metrics)``: weights (intercept first) from the model location, metrics from the coordinator.

        The location read is then ``job.model_location``."""
        raw = self.get_raw_results()
        location = raw.get("model_location")
        if not location:
            raise ResultsUnavailable(f"job {self.id} has no model location; the coordinator reported none")
        weights = read_weights(weights_location(location, self.id))
        return weights, dict(raw.get("metrics") or {})

    def wait(
        self,
        timeout: float,
        interval: float = 2.0,
        on_update: Callable[[Job], None] | None = None,
        on_problem: Callable[[CapeError | None], None] | None = None,
    ) -> str:
        """Poll until the job ends or ``timeout`` seconds pass, calling ``on_update`` after each poll.

        A coordinator that cannot be reached or answers 5xx (restarting, say) is polled again until the timeout,
        as the job goes on meanwhile; ``on_problem`` gets each such error, and None once a poll works again.
        Returns the last status seen (a terminal one unless the timeout came first)."""
        if not (positive_seconds(timeout) or timeout == 0) or not positive_seconds(interval):  # 0: look once
            raise BadArgument(f"timeout must be a number of seconds (0: look once) and interval a positive one, not "
                              f"{timeout!r} and {interval!r}")
        deadline = time.monotonic() + timeout
        failing = False
        while True:
            try:
                self.refresh()
            except (CoordinatorUnreachable, ApiError) as exc:
                if isinstance(exc, ApiError) and exc.status < 500:
                    raise
                failing = True
                if on_problem is not None:
                    on_problem(exc)
            else:
                if failing and on_problem is not None:
                    on_problem(None)
                failing = False
                if on_update is not None:
                    on_update(self)
                if self.status in TERMINAL_STATUSES:
                    return self.status
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return self.status
            time.sleep(min(interval, remaining))

    def __repr__(self) -> str:
        return f"Job(id={self.id!r}, status={self.status!r})"


class Project(Resource):
    """A project: member organizations, an optional helper, dataviews and jobs."""

    @property
    def label(self) -> str:
        return self.data.get("label", "")

    @property
    def name(self) -> str | None:
        return self.data.get("name")

    @property
    def description(self) -> str | None:
        return self.data.get("description")

    @property
    def organizations(self) -> list[OrgRef]:
        """Member organizations, ``{"id", "label", "name", "joined"}`` each (also ``o.id``, ``o.label``, ``o.name`` as
        in pycape); ``joined``: its admin or operator agreed, so its worker may take a job's third seat."""
        return [OrgRef(o) for o in self.data.get("organizations") or []]

    @property
    def helper(self) -> OrgRef | None:
        helper = self.data.get("helper")
        return None if helper is None else OrgRef(helper)

    def refresh(self) -> Project:
        self.data = self._session.get(f"/v1/projects/{seg(self.id)}")
        return self

    def add_org(self, organization: str | Organization) -> Project:
        """Add a member organization (by label, id or object)."""
        self.data = self._session.post(
            f"/v1/projects/{seg(self.id)}/organizations", {"organization": org_ref(organization)}
        )
        return self

    def join(self, organization: str | Organization) -> Project:
        """Agree, as an admin or operator of ``organization`` (a member), that its worker takes a job's third seat
        in this project: as helper, or as a model owner that owns none of the job's data. Jobs that need it are
        refused (409 ``not_joined``) until then; an organization added by someone who may join for it is joined."""
        self.data = self._session.post(f"/v1/projects/{seg(self.id)}/organizations/{seg(org_ref(organization))}/join",
                                       {})
        return self

    def remove_org(self, organization: str | Organization) -> None:
        """Take ``organization`` out of the project: it leaves (as its admin or operator), or the owner organization
        (its admin or data scientist) removes it; its dataviews here go with it, and it stops being the helper.
        Refused for the owner organization and while a job that has not ended gives it a seat."""
        self._session.delete(f"/v1/projects/{seg(self.id)}/organizations/{seg(org_ref(organization))}")

    def set_helper(self, organization: str | Organization | None) -> Project:
        """Name the organization whose worker takes the third seat when needed (None removes it)."""
        ref = None if organization is None else org_ref(organization)
        self.data = self._session.put(f"/v1/projects/{seg(self.id)}/helper", {"organization": ref})
        return self

    def delete(self) -> None:
        """Delete the project (owner organization)."""
        self._session.delete(f"/v1/projects/{seg(self.id)}")

    def create_dataview(
        self,
        name: str,
        uri: str,
        schema: Any = None,
        schema_from_csv_path: str | None = None,
        organization: str | None = None,
        schema_from_file_path: str | None = None,
        *,
        owner_id: str | None = None,
        owner_label: str | None = None,
    ) -> DataView:
        """Register a dataview; the schema is given, or read from a local CSV or Parquet file, or from ``uri`` if local.

        ``schema_from_csv_path`` is the older name of ``schema_from_file_path`` (it reads Parquet too).
        ``organization`` (label or id; needed only when more than one of yours may) may be given as pycape's
        ``owner_id=`` or ``owner_label=``. ``schema`` also takes pycape's ``[{"name", "schema_type"}]`` and
        ``df.dtypes``."""
        owners = {o for o in (organization, owner_id, owner_label) if o is not None}
        if len(owners) > 1:
            raise BadArgument("give the dataview's organization once: organization=, owner_id= or owner_label=")
        organization = owners.pop() if owners else None
        path = schema_from_file_path or schema_from_csv_path
        if schema is not None:
            columns = normalise_schema(schema)
            check_schema_against_uri(columns, uri)
        elif path is not None:
            columns = schema_from_file(path)
            check_schema_against_uri(columns, uri)
        else:
            columns = schema_from_uri(uri, name, SDK_SCHEMA_OPTIONS)
        body: dict[str, Any] = {"name": name, "uri": uri, "schema": columns}
        if organization:
            body["organization"] = organization
        return DataView(self._session, self._session.post(f"/v1/projects/{seg(self.id)}/dataviews", body))

    def list_dataviews(self) -> list[DataView]:
        """Dataviews of the project (``uri`` shown for your own organization's only)."""
        return [DataView(self._session, d) for d in self._session.get(f"/v1/projects/{seg(self.id)}/dataviews")]

    @property
    def dataviews(self) -> list[DataView]:
        """pycape's ``project.dataviews``: the project's dataviews, listed now (as ``list_dataviews()``)."""
        return self.list_dataviews()

    def get_dataview(self, id_or_name: str | None = None, *, id: str | None = None,
                     name: str | None = None, uri: str | None = None) -> DataView:
        """One dataview of this project by id or name; pycape's ``get_dataview(id=...)`` and
        ``get_dataview(uri=...)`` (your own organization's dataviews only: others' uris are not shown) work too."""
        ref = one_of("get_dataview", id_or_name=id_or_name, id=id, name=name, uri=uri)
        if uri is not None:
            return self._dataview_by_uri(uri)
        id_or_name = ref
        views = self.list_dataviews()
        for view in views:
            if view.id == id_or_name:
                return view
        named = [v for v in views if v.name == id_or_name]
        if len(named) == 1:
            return named[0]
        if len(named) > 1:
            raise BadArgument(f"several dataviews of project {self.label!r} are named {id_or_name!r}; use the id")
        raise BadArgument(f"project {self.label!r} has no dataview named {id_or_name!r}; see `cape dataviews list`")

    def _dataview_by_uri(self, uri: str) -> DataView:
        found = [v for v in self.list_dataviews() if v.uri == uri]
        if len(found) == 1:
            return found[0]
        if found:
            raise BadArgument(f"several dataviews of project {self.label!r} point to {uri}; use the id or name")
        raise BadArgument(f"project {self.label!r} has no dataview of your organization at {uri} "
                          "(only your own organization's dataviews show their uri); use the id or name")

    def delete_dataview(self, id: str) -> None:
        """Delete one of this project's dataviews by id (or name), as pycape's ``delete_dataview(id=...)``."""
        self.get_dataview(id).delete()

    def submit_job(self, job: VerticallyPartitionedLinearRegression | None = None, timeout: float | None = None,
                   *, task: VerticallyPartitionedLinearRegression | None = None,
                   organization: str | Organization | None = None) -> Job:
        """Submit a job; it waits for every data owner's approval.

        ``timeout`` (seconds, as pycape's ``submit_job(job, timeout=60)``) overrides the job's own; ``task=`` is
        pycape's other name for ``job``. ``organization`` (label or id) is the one you submit for, needed only
        when more than one of yours may."""
        if (job is None) == (task is None):
            raise BadArgument("submit exactly one job: submit_job(VerticallyPartitionedLinearRegression(...))")
        from services.client.tasks import VerticallyPartitionedLinearRegression  # it imports this module

        chosen = job or task
        if not isinstance(chosen, VerticallyPartitionedLinearRegression):
            raise BadArgument("submit_job takes a VerticallyPartitionedLinearRegression(...), not "
                              f"{type(chosen).__name__}")
        body = chosen.to_request()
        if timeout is not None:
            if not positive_seconds(timeout):
                raise BadArgument(f"timeout must be a positive number of seconds, not {timeout!r}")
            body["timeout"] = math.ceil(timeout)
        if organization is not None:
            body["organization"] = org_ref(organization)
        return Job(self._session, self._session.post(f"/v1/projects/{seg(self.id)}/jobs", body))

    def get_job(self, id: str) -> Job:
        """One job of this project, as pycape's ``project.get_job(id=...)``."""
        job = Job(self._session, self._session.get(f"/v1/jobs/{seg(id)}"))
        if job.data.get("project") != self.id:
            raise BadArgument(f"job {id} is not a job of project {self.label!r}")
        return job

    @property
    def jobs(self) -> list[Job]:
        """pycape's ``project.jobs``: every job of the project, listed now (as ``list_jobs()``); ``iter_jobs()``
        reads a busy project's a page at a time."""
        return self.list_jobs()

    def iter_jobs(self, status: str | list[str] | None = None, page_size: int = DEFAULT_PAGE) -> Iterator[Job]:
        """The project's jobs newest first, only those with `status` (one or several) when given, asking the
        coordinator for `page_size` (1 to 1000) at a time as the iteration goes on."""
        return iter_jobs(self._session, f"/v1/projects/{seg(self.id)}/jobs", status, page_size)

    def list_jobs(self, status: str | list[str] | None = None, limit: int | None = None) -> list[Job]:
        """Jobs of the project in the order they were submitted: only those with `status` (one or several), only
        the `limit` most recent, when given."""
        return recent_jobs(self._session, f"/v1/projects/{seg(self.id)}/jobs", status, limit)

    def __repr__(self) -> str:
        return f"Project(id={self.id!r}, label={self.label!r})"


def org_ref(organization: str | Organization | dict[str, Any]) -> str:
    if isinstance(organization, Organization):
        return organization.label or organization.id
    if isinstance(organization, dict):
        return organization.get("label") or organization["id"]
    return str(organization)


def job_filter(status: str | list[str] | None) -> dict[str, Any]:
    """The query parameters of a job listing's `status` argument: one status or several."""
    if status is None:
        return {}
    statuses = [status] if isinstance(status, str) else status
    if not isinstance(statuses, (list, tuple, set)) or not all(isinstance(s, str) for s in statuses):
        raise BadArgument(f"status must be a job status (e.g. \"Completed\") or a list of them, not {status!r}")
    return {"status": list(statuses)}


def iter_jobs(session: ApiSession, path: str, status: str | list[str] | None, page_size: int) -> Iterator[Job]:
    """The jobs of a job listing, newest first, a page at a time."""
    return (Job(session, j) for j in _listed(session, path, status, page_size))


def recent_jobs(session: ApiSession, path: str, status: str | list[str] | None, limit: int | None) -> list[Job]:
    """The `limit` most recent jobs of a job listing (all when None), oldest first."""
    if limit is not None:
        whole_number(limit, "limit", "jobs")
    found = islice(_listed(session, path, status, min(limit or PAGE_MAX, PAGE_MAX)), limit)
    return [Job(session, j) for j in found][::-1]


def _listed(session: ApiSession, path: str, status: str | list[str] | None, page_size: int) -> Iterator[dict]:
    """A job listing's items with `status`, newest first. Filtered here too: an older coordinator ignores the
    filter (and answers every job at once), and a script stopping every Started job would stop the others."""
    params = job_filter(status)
    wanted = set(params.get("status", ()))
    items = follow(session, path, params, page_size=page_size)
    return (item for item in items if item.get("status") in wanted) if wanted else items
