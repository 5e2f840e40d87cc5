"""The permission table of CONTRACTS.md: which role of which organization may do what."""
from __future__ import annotations

import sqlite3

from services.coordinator.identity import Principal, find_organization, get_org
from services.server.errors import Forbidden, InvalidRequest

MANAGE_USERS = frozenset({"admin"})
MANAGE_PROJECTS = frozenset({"admin", "data_scientist"})
MANAGE_DATAVIEWS = frozenset({"admin", "data_scientist"})
SUBMIT_JOBS = frozenset({"admin", "data_scientist"})
APPROVE_JOBS = frozenset({"admin", "operator"})
# Joining a project lets the organization's worker take a job's third seat (and, as model owner, store the model):
# decided by those who decide what its worker does.
JOIN_PROJECTS = frozenset({"admin", "operator"})
STOP_JOBS = frozenset({"admin", "operator", "data_scientist"})


def require_person(principal: Principal) -> None:
    """User endpoints refuse organization (worker) tokens."""
    if principal.kind != "user":
        raise Forbidden("organization tokens may use only the worker endpoints and the broker; use a user token",
                        code="wrong_token_kind")


def require_worker(principal: Principal) -> None:
    """Worker endpoints and the broker take organization tokens only."""
    if principal.kind != "organization":
        raise Forbidden("this endpoint is for workers: use an organization token (`cape orgs create-token ORG`, "
                        "or `POST /v1/organizations/{org}/tokens`)", code="wrong_token_kind")


def require_member(principal: Principal, org_id: str, what: str = "this") -> None:
    require_person(principal)
    if principal.role_in(org_id) is None:
        raise Forbidden(f"you are not a member of the organization that owns {what}")


def require_role(principal: Principal, org_id: str, allowed: frozenset[str], action: str) -> None:
    """Forbidden unless the caller holds one of `allowed` in the organization; the message names the action."""
    require_person(principal)
    role = principal.role_in(org_id)
    if role not in allowed:
        need = " or ".join(sorted(allowed))
        have = f"your role there is {role}" if role else "you are not a member of that organization"
        raise Forbidden(f"to {action} you need the role {need} in the organization ({have})")


def acting_organization(conn: sqlite3.Connection, principal: Principal, ref: str | None,
                        allowed: frozenset[str], action: str) -> str:
    """The organization a user acts for: `ref` when given, else their only organization (422 if ambiguous)."""
    require_person(principal)
    if ref is not None:
        org_id = find_organization(conn, ref)["id"]
    elif len(principal.roles) == 1:
        org_id = next(iter(principal.roles))
    elif not principal.roles:
        raise Forbidden("you are not a member of any organization")
    else:
        able = sorted(org for org, role in principal.roles.items() if role in allowed)
        if len(able) != 1:  # only one may do it: the one meant
            labels = sorted(get_org(conn, org)["label"] for org in (able or principal.roles))
            raise InvalidRequest("field 'organization': you belong to several organizations; name the one you act "
                                 f"for: {' or '.join(labels)}")
        org_id = able[0]
    require_role(principal, org_id, allowed, action)
    return org_id
