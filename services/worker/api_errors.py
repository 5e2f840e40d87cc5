"""Reading a Cape server's error answer (`{"error": {"code", "message"}}`), as the worker's clients and checks do."""
from __future__ import annotations

import requests


def error_of(response: requests.Response) -> tuple[str | None, str]:
    """(code, message) of a Cape server's error body; (None, the HTTP reason phrase) for any other body (not a Cape
    server, or a proxy's page)."""
    try:
        error = response.json()["error"]
        return error.get("code"), str(error.get("message", response.reason))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None, response.reason or ""
