"""``Cape``: the SDK's entry point, shaped like pycape's (``Cape().login()``, ``list_projects()``, ...)."""
from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from services.client.config import clean_token, load_config
from services.client.errors import BadArgument
from services.client.http import DEFAULT_TIMEOUT_S, ApiSession
from services.client.models import DataView, Job, Organization, Project, iter_jobs, one_of, recent_jobs, seg
from services.client.pages import DEFAULT_PAGE, PAGE_MAX, follow


class Cape:
    """A client of one coordinator; endpoint and token default to CAPE_COORDINATOR / CAPE_TOKEN, then `cape login`."""

    def __init__(self, endpoint: str | None = None, token: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S) -> None:
        config = load_config(endpoint, token)
        self.endpoint = config.coordinator
        # Whether the token is CAPE_TOKEN's in place of another saved by `cape login` (the CLI says so on 401/403).
        self.env_token_overrides_login = config.env_token_overrides_login
        self.env_coordinator_overrides_login = config.env_coordinator_overrides_login
        self._timeout = timeout
        self._session = ApiSession(config.coordinator, config.token, timeout)
        self.identity: dict[str, Any] | None = None

    @property
    def token_id(self) -> str | None:
        """The public part of the token in use (before the comma), or None without a token."""
        return self._session.token_id

    def login(self, token: str | None = None) -> dict[str, Any]:
        """Check the token with the coordinator; returns who it belongs to (kind, user, organization, roles)."""
        if token is not None:
            self._session = ApiSession(self.endpoint, clean_token(token, "the token given"), self._timeout)
            self.env_token_overrides_login = False
        self.identity = self._session.post("/v1/login")
        return self.identity

    # Organizations

    def list_organizations(self) -> list[Organization]:
        """All organizations (labels are public so projects can add them)."""
        return [Organization(self._session, o) for o in self._session.get("/v1/organizations")]

    def get_organization(self, id_or_label: str) -> Organization:
        return Organization(self._session, self._session.get(f"/v1/organizations/{seg(id_or_label)}"))

    def create_user_token(self, description: str | None = None) -> dict[str, Any]:
        """A new token for the calling user: ``{"id", "token"}``."""
        return self._session.post("/v1/tokens", {"description": description} if description else {})

    def list_user_tokens(self) -> list[dict[str, Any]]:
        """The calling user's own tokens, oldest first: ``{"id", "description", "created_at", "revoked_at",
        "last_used_at"}``, never a secret."""
        return self._session.get("/v1/tokens")

    def revoke_token(self, token_id: str) -> None:
        self._session.delete(f"/v1/tokens/{seg(token_id)}")

    # Projects

    def list_projects(self) -> list[Project]:
        """Projects one of your organizations is a member of, oldest first."""
        return list(self.iter_projects(page_size=PAGE_MAX))[::-1]

    def iter_projects(self, page_size: int = DEFAULT_PAGE) -> Iterator[Project]:
        """The same newest first, asking the coordinator for `page_size` (1 to 1000) at a time as the iteration
        goes on."""
        return (Project(self._session, p) for p in follow(self._session, "/v1/projects", page_size=page_size))

    def get_project(self, id_or_label: str | None = None, *, id: str | None = None,
                    label: str | None = None) -> Project:
        """One project by id or label: ``get_project("churn")``, or pycape's ``get_project(id=...)`` /
        ``get_project(label=...)``."""
        ref = one_of("get_project", id_or_label=id_or_label, id=id, label=label)
        return Project(self._session, self._session.get(f"/v1/projects/{seg(ref)}"))

    def delete_project(self, id_or_label: str | None = None, *, id: str | None = None,
                       label: str | None = None) -> None:
        """Delete a project (its owner organization), as pycape's ``delete_project(id=...)``."""
        ref = one_of("delete_project", id_or_label=id_or_label, id=id, label=label)
        self._session.delete(f"/v1/projects/{seg(ref)}")

    def create_project(self, label: str | None = None, name: str | None = None, description: str | None = None,
                       organization: str | None = None, *, owner: str | None = None) -> Project:
        """Create a project owned by your organization (``organization`` when more than one of yours may).

        pycape's ``create_project(name=..., owner=ORG, description=...)`` works too: ``owner`` is the
        organization, and without ``label`` the label is made from the name ("My Project" -> "my-project")."""
        if owner is not None and organization is not None and owner != organization:
            raise BadArgument("give the owning organization once: organization=... or owner=..., not both")
        organization = organization if organization is not None else owner
        if label is None:
            if not name:
                raise BadArgument("name the project: create_project(label=...) or create_project(name=...)")
            label = label_from_name(name)
        body: dict[str, Any] = {"label": label}
        for key, value in (("name", name), ("description", description), ("organization", organization)):
            if value is not None:
                body[key] = value
        return Project(self._session, self._session.post("/v1/projects", body))

    # Dataviews and jobs by id

    def get_dataview(self, dataview_id: str | None = None, *, id: str | None = None) -> DataView:
        """One dataview by id: ``get_dataview(ID)``, or pycape's ``get_dataview(id=ID)``."""
        ref = one_of("get_dataview", dataview_id=dataview_id, id=id)
        return DataView(self._session, self._session.get(f"/v1/dataviews/{seg(ref)}"))

    def iter_jobs(self, status: str | list[str] | None = None, page_size: int = DEFAULT_PAGE) -> Iterator[Job]:
        """Your jobs across projects (those of every project one of your organizations is a member of), newest
        first, only those with `status` (one or several) when given, `page_size` (1 to 1000) at a time."""
        return iter_jobs(self._session, "/v1/jobs", status, page_size)

    def list_jobs(self, status: str | list[str] | None = None, limit: int | None = None) -> list[Job]:
        """Your jobs across projects in the order they were submitted: only those with `status`, only the `limit`
        most recent, when given (as ``project.list_jobs``)."""
        return recent_jobs(self._session, "/v1/jobs", status, limit)

    def get_job(self, job_id: str | None = None, *, id: str | None = None) -> Job:
        """One job by id: ``get_job(ID)``, or pycape's ``get_job(id=ID)``."""
        ref = one_of("get_job", job_id=job_id, id=id)
        return Job(self._session, self._session.get(f"/v1/jobs/{seg(ref)}"))


def label_from_name(name: str) -> str:
    """A project label made from a name, as pycape's docs show them: "My Project" -> "my-project"."""
    label = re.sub(r"[^a-z0-9._-]+", "-", name.strip().lower()).strip("-._")[:64].rstrip("-._")
    if not label:
        raise BadArgument(f"cannot make a label from the name {name!r}; give label=... (letters, digits, . _ -)")
    return label
