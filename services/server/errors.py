"""Typed API errors: each carries its HTTP status, a snake_case code and a message that tells the user what to do.

`services.server.error_handlers` turns them into `{"error": {"code", "message"}}` responses.
"""
from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An error the client caused or must act on; `status` is the HTTP status."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, code: str | None = None, extra: dict[str, Any] | None = None):
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        self.extra = extra or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, **self.extra}}


class Unauthorized(ApiError):
    status = 401
    code = "unauthorized"


class Forbidden(ApiError):
    status = 403
    code = "forbidden"


class NotFound(ApiError):
    status = 404
    code = "not_found"


class Conflict(ApiError):
    status = 409
    code = "conflict"


class RequestTimeout(ApiError):
    status = 408
    code = "request_timeout"


class TooLarge(ApiError):
    status = 413
    code = "too_large"


class InvalidRequest(ApiError):
    status = 422
    code = "invalid_request"


class Unavailable(ApiError):
    status = 503
    code = "unavailable"


class InsufficientStorage(ApiError):
    status = 507
    code = "insufficient_storage"
