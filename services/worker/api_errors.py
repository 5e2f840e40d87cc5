"""Reading a Cape server's error answer (`{"error": {"code", "message"}}`), as the worker's clients and checks do."""
from __future__ import annotations

import re

import requests


def error_of(response: requests.Response) -> tuple[str | None, str]:
    """(code, message) of a Cape server's error body; (None, the HTTP reason phrase) for any other body (not a Cape
    server, or a proxy's page)."""
    try:
        error = response.json()["error"]
        return error.get("code"), str(error.get("message", response.reason))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None, response.reason or ""


NEW_TOKEN = "its organization's admin creates a new one (`cape orgs create-token ORG`); set CAPE_TOKEN to it"


def token_refusal(code: str | None, message: str, token: str) -> str:
    """Why a server refused CAPE_TOKEN (401), in a worker operator's words: the server's own message is for people
    and their tokens too (`cape tokens create`, `cape-server admin ...`). Names the token's id, which is not secret,
    when the token has the `<id>,<secret>` shape, so the operator knows which one to replace."""
    token_id = token.split(",", 1)[0] if "," in token else ""
    # Ids are 32 hex digits; a secret (43 base64 characters and '=') pasted first must never be quoted as one.
    named = f"token {token_id}" if re.fullmatch(r"[A-Za-z0-9_-]{1,40}", token_id) else "the token"
    why = {"bad_token": f"{named} is not one it knows (check CAPE_TOKEN: it looks like <id>,<secret>)",
           "revoked_token": f"{named} was revoked",
           "no_token": "no token reached it (check CAPE_TOKEN, and any proxy on the way)"}.get(code or "", message)
    return f"{why}; {NEW_TOKEN}"
