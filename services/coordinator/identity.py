"""Organizations, users, memberships and tokens: creating them and authenticating a bearer token."""
from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from typing import Any, Literal

from services.coordinator.db import Database, new_id, now_iso
from services.coordinator.tokens import issue_token, secret_matches, split_token
from services.server.errors import Conflict, Forbidden, InvalidRequest, NotFound, Unauthorized
from services.server.storage_trouble import is_storage_refusal

ROLES = ("admin", "operator", "data_scientist", "user")


@dataclass(frozen=True)
class Principal:
    """Who is calling: a person (user token, roles per organization) or a worker (organization token)."""

    kind: Literal["user", "organization"]
    token_id: str
    user_id: str | None = None
    email: str | None = None
    org_id: str | None = None
    roles: dict[str, str] = field(default_factory=dict)
    last_used_at: str | None = field(default=None, compare=False)  # as stored before this request

    def role_in(self, org_id: str) -> str | None:
        return self.roles.get(org_id)


# --- organizations -----------------------------------------------------------------------------------------

def org_view(row: sqlite3.Row | dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "label": row["label"], "name": row["name"]}


def org_ref(row: sqlite3.Row | dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "label": row["label"]}


def create_organization(conn: sqlite3.Connection, label: str, name: str | None = None) -> dict[str, Any]:
    if conn.execute("SELECT 1 FROM organizations WHERE label = ?", (label,)).fetchone():
        raise Conflict(f"an organization labelled '{label}' already exists; choose another label",
                       code="duplicate_label")
    row = {"id": new_id(), "label": label, "name": name or label, "created_at": now_iso()}
    conn.execute("INSERT INTO organizations (id, label, name, created_at) VALUES (:id, :label, :name, :created_at)",
                 row)
    return row


def find_organization(conn: sqlite3.Connection, ref: str) -> sqlite3.Row:
    """An organization by id or label; NotFound names the reference."""
    row = conn.execute("SELECT * FROM organizations WHERE id = ? OR label = ? ORDER BY id = ? DESC LIMIT 1",
                       (ref, ref, ref)).fetchone()
    if row is None:
        raise NotFound(f"no organization '{ref}'; `cape orgs list` (or, on the server, `cape-server admin list-orgs`) "
                       "lists them",
                       code="organization_not_found")
    return row


def get_org(conn: sqlite3.Connection, org_id: str) -> sqlite3.Row:
    row = conn.execute("SELECT * FROM organizations WHERE id = ?", (org_id,)).fetchone()
    if row is None:  # only ids we stored ourselves reach here
        raise NotFound(f"no organization '{org_id}'", code="organization_not_found")
    return row


def list_organizations(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    return [org_view(r) for r in conn.execute("SELECT * FROM organizations ORDER BY label")]


# --- users and memberships ----------------------------------------------------------------------------------

def user_view(row: sqlite3.Row | dict[str, Any], role: str | None = None) -> dict[str, Any]:
    view = {"id": row["id"], "email": row["email"]}
    if role is not None:
        view["role"] = role
    return view


class ExistingAccount(Conflict):
    """The email's account was made by another organization's admin (or by no one the coordinator recorded), who
    holds its first token: adding it would give that token the role at once, so the admin confirms it first."""

    code = "existing_account"


def add_user(conn: sqlite3.Connection, org_id: str, email: str, role: str, token_for_existing: bool = False,
             existing_ok: bool = False) -> tuple[dict[str, Any], str | None, dict[str, Any] | None]:
    """Add a user (made if the email is new) to the organization with a role; returns (user, token, existing).

    A new user gets a first token. A user who exists already keeps their own tokens and gets none: a user token
    carries the user's roles in every organization, so handing one to this organization's admin would hand them
    the user's other organizations too. Only the server's operator (`cape-server admin`, `token_for_existing`)
    issues a token for an existing user. `existing` says, for an account that was there, when it was made and
    by which organization's admin (None: by the server's operator): emails are not verified, so whoever made the
    account holds its first token, and the one adding it must be able to see that it is not a new one: one that
    another organization's admin made is added only with `existing_ok` (ExistingAccount otherwise), or that admin
    could make accounts for other organizations' people before them and hold the roles they are given."""
    if role not in ROLES:
        raise InvalidRequest(f"field 'role': must be one of {', '.join(ROLES)}")
    user = user_by_email(conn, email)
    existing = None
    if user is None:
        user = {"id": new_id(), "email": email, "created_at": now_iso(),
                "created_by_org_id": "" if token_for_existing else org_id}  # "": the operator; NULL: from before
        conn.execute("INSERT INTO users (id, email, created_at, created_by_org_id) "
                     "VALUES (:id, :email, :created_at, :created_by_org_id)", user)
    elif conn.execute("SELECT 1 FROM memberships WHERE user_id = ? AND org_id = ?", (user["id"], org_id)).fetchone():
        raise Conflict(f"'{user['email']}' is already a member of this organization", code="duplicate_member")
    else:
        existing = existing_account(conn, user)
        if user["created_by_org_id"] not in ("", org_id) and not (token_for_existing or existing_ok):
            _refuse_existing(conn, org_id, user, role, existing)
    conn.execute("INSERT INTO memberships (user_id, org_id, role) VALUES (?, ?, ?)", (user["id"], org_id, role))
    if existing and not token_for_existing:
        return user_view(user, role), None, existing
    token = issue_user_token(conn, user["id"], "first token" if not existing else "issued by the server's operator")
    return user_view(user, role), token["token"], existing


def _refuse_existing(conn: sqlite3.Connection, org_id: str, user: sqlite3.Row, role: str,
                     existing: dict[str, Any]) -> None:
    label = get_org(conn, org_id)["label"]
    maker = (f"by organization {existing['created_by_organization']}'s admin" if existing["made_by"] == "organization"
             else "by a maker the coordinator did not record")
    raise ExistingAccount(
        f"'{user['email']}' already has an account, made {existing['created_at']} {maker}, who got its first token "
        f"(emails are not verified); adding it gives that token the role {role} in {label} at once. If it is the "
        f"person you mean (ask them), add it again confirming it (`cape orgs add-user {label} {user['email']} "
        "--existing-account`, or \"existing_account\": true)", extra={"existing_account": existing})


def list_members(conn: sqlite3.Connection, org_id: str) -> list[dict[str, Any]]:
    rows = conn.execute("SELECT u.id, u.email, m.role FROM memberships m JOIN users u ON u.id = m.user_id "
                        "WHERE m.org_id = ? ORDER BY u.email", (org_id,))
    return [user_view(r, r["role"]) for r in rows]


def existing_account(conn: sqlite3.Connection, user: sqlite3.Row) -> dict[str, Any]:
    """Who made an account: `made_by` is `organization` (whose admin got its first token), `server_operator`, or
    `unknown` (made before the coordinator recorded it)."""
    maker_id = user["created_by_org_id"]
    maker = conn.execute("SELECT label FROM organizations WHERE id = ?", (maker_id,)).fetchone() if maker_id else None
    made_by = "organization" if maker else "server_operator" if maker_id == "" else "unknown"
    return {"created_at": user["created_at"], "made_by": made_by,
            "created_by_organization": maker["label"] if maker else None}


def user_by_email(conn: sqlite3.Connection, email: str) -> sqlite3.Row | None:
    """The account of `email`, whatever the case of its letters."""
    return conn.execute("SELECT * FROM users WHERE email = ? COLLATE NOCASE ORDER BY email = ? DESC, created_at "
                        "LIMIT 1", (email, email)).fetchone()


# --- tokens -------------------------------------------------------------------------------------------------

def _store_token(conn: sqlite3.Connection, kind: str, user_id: str | None, org_id: str | None,
                 description: str | None) -> dict[str, str]:
    issued = issue_token()
    conn.execute("INSERT INTO tokens (id, kind, user_id, org_id, secret_hash, description, created_at) "
                 "VALUES (?, ?, ?, ?, ?, ?, ?)",
                 (issued.id, kind, user_id, org_id, issued.secret_hash, description, now_iso()))
    return {"id": issued.id, "token": issued.text}


def issue_user_token(conn: sqlite3.Connection, user_id: str, description: str | None = None) -> dict[str, str]:
    return _store_token(conn, "user", user_id, None, description)


def issue_org_token(conn: sqlite3.Connection, org_id: str, description: str | None = None) -> dict[str, str]:
    return _store_token(conn, "organization", None, org_id, description)


def list_org_tokens(conn: sqlite3.Connection, org_id: str) -> list[dict[str, Any]]:
    """The organization's worker tokens, oldest first: ids and dates, never secrets (only hashes are stored)."""
    return [{k: v for k, v in token.items() if k != "kind"} for token in list_tokens(conn, org_id=org_id)]


def list_user_tokens(conn: sqlite3.Connection, user_id: str) -> list[dict[str, Any]]:
    """A person's own tokens, oldest first, as `list_org_tokens`."""
    return [{k: v for k, v in token.items() if k != "kind"} for token in list_tokens(conn, user_id=user_id)]


def list_users(conn: sqlite3.Connection, org_id: str | None = None) -> list[dict[str, Any]]:
    """Every account (or an organization's members), by email, with its roles by organization label."""
    where, params = ("WHERE u.id IN (SELECT user_id FROM memberships WHERE org_id = ?)", (org_id,)) if org_id \
        else ("", ())
    users: dict[str, dict[str, Any]] = {}
    for r in conn.execute("SELECT u.id, u.email, u.created_at, o.label, m.role FROM users u LEFT JOIN memberships m "
                          f"ON m.user_id = u.id LEFT JOIN organizations o ON o.id = m.org_id {where} "  # noqa: S608
                          "ORDER BY u.email, o.label", params):
        user = users.setdefault(r["id"], {"id": r["id"], "email": r["email"], "created_at": r["created_at"],
                                          "roles": {}})
        if r["label"] is not None:
            user["roles"][r["label"]] = r["role"]
    return list(users.values())


def list_tokens(conn: sqlite3.Connection, *, org_id: str | None = None, user_id: str | None = None
                ) -> list[dict[str, Any]]:
    """An organization's worker tokens or a user's tokens, oldest first: ids and dates, never secrets."""
    column, value = ("org_id", org_id) if org_id is not None else ("user_id", user_id)
    return [{"id": r["id"], "kind": r["kind"], "description": r["description"], "created_at": r["created_at"],
             "revoked_at": r["revoked_at"], "last_used_at": r["last_used_at"]}
            for r in conn.execute(f"SELECT * FROM tokens WHERE {column} = ? ORDER BY created_at, id",  # noqa: S608
                                  (value,))]


def revoke_user_tokens(conn: sqlite3.Connection, user_id: str) -> list[str]:
    """Revoke every token of a user still valid (a stolen laptop); returns their ids."""
    ids = [r["id"] for r in conn.execute("SELECT id FROM tokens WHERE user_id = ? AND revoked_at IS NULL "
                                         "ORDER BY created_at, id", (user_id,))]
    conn.execute("UPDATE tokens SET revoked_at = ? WHERE user_id = ? AND revoked_at IS NULL", (now_iso(), user_id))
    return ids


def find_token(conn: sqlite3.Connection, token_id: str) -> sqlite3.Row:
    row = conn.execute("SELECT * FROM tokens WHERE id = ?", (token_id,)).fetchone()
    if row is None:
        raise NotFound(f"no token '{token_id}'", code="token_not_found")
    return row


def revoke_token(conn: sqlite3.Connection, token_id: str) -> None:
    """Revoke a token (idempotent: revoking a revoked token is a no-op)."""
    find_token(conn, token_id)
    conn.execute("UPDATE tokens SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?", (now_iso(), token_id))


def check_may_revoke(conn: sqlite3.Connection, principal: Principal, token_id: str) -> None:
    """Own user tokens, and organization tokens of an organization the caller administers. Any other id, existing
    or not, gets the same 404: the answer must not tell which ids exist."""
    if principal.kind != "user":
        raise Forbidden("organization tokens cannot revoke tokens; use an admin's user token")
    row = conn.execute("SELECT * FROM tokens WHERE id = ?", (token_id,)).fetchone()
    if row is not None and row["kind"] == "user" and row["user_id"] == principal.user_id:
        return
    if row is not None and row["kind"] == "organization" and principal.role_in(row["org_id"]) == "admin":
        return
    raise NotFound(f"no token '{token_id}' that you may revoke (your own user tokens, and the organization tokens "
                   "of organizations you administer)", code="token_not_found")


def authenticate(conn: sqlite3.Connection, token_text: str | None) -> Principal:
    """The principal a bearer token stands for; Unauthorized when it is missing, malformed, unknown or revoked."""
    if not token_text:
        raise Unauthorized("this endpoint needs a token: send 'Authorization: Bearer <token>'", code="no_token")
    parts = split_token(token_text)
    row = conn.execute("SELECT * FROM tokens WHERE id = ?", (parts[0],)).fetchone() if parts else None
    if parts is None or row is None or not secret_matches(parts[1], row["secret_hash"]):
        raise Unauthorized("the token is not valid; check it (it looks like <id>,<secret>). A person's new token "
                           "comes from `cape tokens create` with a token that works, or from the server's operator "
                           "(`cape-server admin create-user-token EMAIL`); a worker's from its organization's admin",
                           code="bad_token")
    if row["revoked_at"]:
        advice = ("ask your organization's admin for a new one" if row["kind"] == "organization" else
                  "make another with a token of yours that still works (`cape tokens create`), or ask the "
                  "server's operator for one (`cape-server admin create-user-token EMAIL`)")
        raise Unauthorized(f"the token was revoked; {advice}", code="revoked_token")
    if row["kind"] == "organization":
        return Principal(kind="organization", token_id=row["id"], org_id=row["org_id"],
                         last_used_at=row["last_used_at"])
    user = conn.execute("SELECT * FROM users WHERE id = ?", (row["user_id"],)).fetchone()
    roles = {r["org_id"]: r["role"] for r in
             conn.execute("SELECT org_id, role FROM memberships WHERE user_id = ?", (row["user_id"],))}
    return Principal(kind="user", token_id=row["id"], user_id=user["id"], email=user["email"], roles=roles,
                     last_used_at=row["last_used_at"])


def note_use(db: Database, principal: Principal) -> None:
    """Record when the token was last used (to the minute: a worker's requests come many per second), so an admin
    can tell which of the organization's tokens its worker holds before revoking one.

    In its own transaction, after the request's authentication, and best effort: on a full or read-only disk the
    request goes on (a read still answers) rather than failing for its bookkeeping."""
    now = now_iso()
    if (principal.last_used_at or "")[:16] == now[:16]:
        return
    try:
        with db.transaction() as conn:
            conn.execute("UPDATE tokens SET last_used_at = ? WHERE id = ?", (now, principal.token_id))
    except sqlite3.OperationalError as exc:
        if not is_storage_refusal(exc):
            raise


def login_view(conn: sqlite3.Connection, principal: Principal) -> dict[str, Any]:
    if principal.kind == "organization":
        return {"kind": "organization", "user": None,
                "organization": org_view(get_org(conn, principal.org_id or "")), "roles": {}}
    memberships = [{"organization": org_ref(get_org(conn, org_id)), "role": role}
                   for org_id, role in principal.roles.items()]
    return {"kind": "user", "user": {"id": principal.user_id, "email": principal.email}, "organization": None,
            "roles": dict(principal.roles),
            "memberships": sorted(memberships, key=lambda m: m["organization"]["label"])}
