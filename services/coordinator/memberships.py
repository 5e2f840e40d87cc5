"""Changing an organization's members: removing one, changing a role; an organization always keeps an admin.

Only the membership changes. A user may belong to several organizations and their tokens are not per
organization, so their tokens stay valid; with no membership left they authenticate but carry no role (they can
log in, list organization labels and make tokens for themselves, nothing more). Jobs they submitted stay.
"""
from __future__ import annotations

import sqlite3
from typing import Any

from services.coordinator.identity import user_view
from services.server.errors import Conflict, NotFound


class MemberNotFound(NotFound):
    """The user is unknown, or not a member of this organization (one answer for both: no probing for emails)."""

    code = "member_not_found"


class LastAdmin(Conflict):
    """The change would leave the organization without an admin, who alone can manage its users and tokens."""

    code = "last_admin"


SET_ADMIN_HINT = "first make another member admin (`cape orgs set-role {org} USER admin`)"


def find_member(conn: sqlite3.Connection, org: sqlite3.Row, ref: str) -> sqlite3.Row:
    """A member of `org` by user id or email, with their role; MemberNotFound names the reference."""
    row = conn.execute("SELECT u.id, u.email, m.role FROM memberships m JOIN users u ON u.id = m.user_id "
                       "WHERE m.org_id = ? AND (u.id = ? OR u.email = ? COLLATE NOCASE) "
                       # The exact id or email first: a database from before emails matched whatever their case
                       # may hold two accounts differing only in case.
                       "ORDER BY u.id = ? DESC, u.email = ? DESC, u.created_at",
                       (org["id"], ref, ref, ref, ref)).fetchone()
    if row is None:
        raise MemberNotFound(f"'{ref}' is not a member of organization '{org['label']}'; "
                             f"`cape orgs show {org['label']}` lists its users (by email and id)")
    return row


def _is_last_admin(conn: sqlite3.Connection, org_id: str, member: sqlite3.Row) -> bool:
    if member["role"] != "admin":
        return False
    count = conn.execute("SELECT COUNT(*) FROM memberships WHERE org_id = ? AND role = 'admin'", (org_id,)).fetchone()
    return int(count[0]) <= 1


def remove_member(conn: sqlite3.Connection, org: sqlite3.Row, ref: str) -> None:
    """End `ref`'s membership of `org`; refused for its last admin."""
    member = find_member(conn, org, ref)
    if _is_last_admin(conn, org["id"], member):
        raise LastAdmin(f"cannot remove '{member['email']}': they are the last admin of organization "
                        f"'{org['label']}'; {SET_ADMIN_HINT.format(org=org['label'])}")
    conn.execute("DELETE FROM memberships WHERE org_id = ? AND user_id = ?", (org["id"], member["id"]))


def set_member_role(conn: sqlite3.Connection, org: sqlite3.Row, ref: str, role: str) -> dict[str, Any]:
    """Give `ref` the role `role` in `org` (the same role again is a no-op); refused for demoting its last admin."""
    member = find_member(conn, org, ref)
    if role != "admin" and _is_last_admin(conn, org["id"], member):
        raise LastAdmin(f"cannot make '{member['email']}' {role}: they are the last admin of organization "
                        f"'{org['label']}'; {SET_ADMIN_HINT.format(org=org['label'])}")
    conn.execute("UPDATE memberships SET role = ? WHERE org_id = ? AND user_id = ?", (role, org["id"], member["id"]))
    return user_view(member, role)
