"""Following the coordinator's paged listings (projects, jobs): newest first, a page at a time, each page's
`X-Cape-Next-Cursor` header naming the next one (services/CONTRACTS.md)."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from services.client.errors import BadArgument
from services.client.http import ApiSession

DEFAULT_PAGE = 100
PAGE_MAX = 1000  # the coordinator's largest page


def whole_number(value: Any, name: str, what: str, most: int | None = None) -> int:
    """`value` if it is a whole number from 1 (to `most`); BadArgument naming `name` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (most is not None and value > most):
        kind = f"a whole number of {what} from 1 to {most}" if most else f"a positive whole number of {what}"
        raise BadArgument(f"{name} must be {kind}, not {value!r}")
    return value


def follow(session: ApiSession, path: str, params: dict[str, Any] | None = None, limit: int | None = None,
           page_size: int = PAGE_MAX) -> Iterator[dict[str, Any]]:
    """The listing's items, newest first: at most `limit` (all by default), asking for the next page only once the
    previous one has been gone through. Items added meanwhile are newer than the first page, so none is given
    twice and none that was there is missed."""
    whole_number(page_size, "page_size", "items per page", PAGE_MAX)

    def items() -> Iterator[dict[str, Any]]:
        left, cursor = limit, None
        while left is None or left > 0:
            size = page_size if left is None else min(page_size, left)
            page, cursor = session.get_page(path, {**(params or {}), "limit": size,
                                                   **({"cursor": cursor} if cursor else {})})
            # An older coordinator answers everything at once, oldest first: put it in this listing's order.
            page = sorted(page, key=lambda item: (item.get("created_at") or "", item.get("id") or ""), reverse=True)
            for item in page[:left]:
                yield item
            left = None if left is None else left - min(len(page), left)
            if cursor is None:
                return

    return items()  # the checks above at the call, the requests as the iteration goes
