"""Pages of the long listings (projects, jobs): newest first by (created_at, id), each page ending with the cursor
where the next one starts.

Keyset paging, not OFFSET: a page starts strictly after the last row of the one before, so rows added meanwhile
(newer, they sort before the first page) neither shift a row into a second page nor push one out of it, and a deep
page costs what the first does. `created_at` never changes and `id` breaks ties, so every row has one place.
"""
from __future__ import annotations

import base64
import binascii
import sqlite3
from dataclasses import dataclass
from typing import Any

from services.server.errors import InvalidRequest

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
# A header, not a field of the body: the body stays the bare list every client reads, and the header needs no URL
# (a `Link` built from the request would name http:// or drop a path prefix behind a TLS proxy, and a client
# following it would send its token there).
NEXT_CURSOR_HEADER = "X-Cape-Next-Cursor"
LISTINGS = ("jobs", "projects")


@dataclass(frozen=True)
class PageRequest:
    """What a caller asked for: at most `limit` rows, after the row `cursor` names (None: from the newest)."""

    limit: int = DEFAULT_LIMIT
    cursor: str | None = None


@dataclass(frozen=True)
class Page:
    rows: list[sqlite3.Row]
    next_cursor: str | None  # None on the last page


def cursor_of(listing: str, row: sqlite3.Row) -> str:
    """The opaque cursor of the page after `row` (its listing's name, created_at and id, base64url)."""
    text = f"{listing}|{row['created_at']}|{row['id']}"
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def position(listing: str, cursor: str) -> tuple[str, str]:
    """(created_at, id) of the row `cursor` names; 422 for anything this listing did not give."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        text = ""
    name, _, key = text.partition("|")
    created_at, _, row_id = key.partition("|")
    if name == listing and created_at and row_id:
        return created_at, row_id
    what = (f"a cursor of the {name} listing, not of this one" if name in LISTINGS and name != listing
            else "not a cursor this server gave")
    raise InvalidRequest(f"field 'cursor': {what}; pass the {NEXT_CURSOR_HEADER} header of this listing's previous "
                         "page as it came, or leave cursor out for the first page")


def newest_first(conn: sqlite3.Connection, listing: str, query: str, params: list[Any],
                 request: PageRequest) -> Page:
    """One page of `query` (a SELECT of rows with `created_at` and `id`, ending in its WHERE clause), newest
    first. One row more than the page is read to know whether another page follows."""
    if request.cursor is not None:
        query += " AND (created_at, id) < (?, ?)"
        params = [*params, *position(listing, request.cursor)]
    rows = list(conn.execute(f"{query} ORDER BY created_at DESC, id DESC LIMIT ?", [*params, request.limit + 1]))
    if len(rows) <= request.limit:
        return Page(rows, None)
    return Page(rows[:request.limit], cursor_of(listing, rows[request.limit - 1]))
