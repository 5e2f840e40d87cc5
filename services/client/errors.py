"""Typed errors of the SDK and CLI; each message is one sentence a user can act on."""
from __future__ import annotations


class CapeError(Exception):
    """Base of every error the SDK raises on purpose."""


class NotConfigured(CapeError):
    """No token (or coordinator) is known: the user has to log in first."""


class ApiError(CapeError):
    """The coordinator answered with an error status (``{"error": {"code", "message"}}``)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        self.status = status
        self.code = code
        self.message = message
        super().__init__(f"{message} (HTTP {status})")


class CoordinatorUnreachable(CapeError):
    """No HTTP answer at all: refused connection, DNS failure, timeout."""


class BadArgument(CapeError):
    """Something the caller passed cannot be turned into a request (bad column spec, schema, ...)."""


class NotAllowed(CapeError):
    """The caller's roles (from ``/v1/login``) do not allow an action: refused before asking the server to do it."""


class ResultsUnavailable(CapeError):
    """The weights file named by the coordinator cannot be read."""
