"""The handlers that turn typed errors, validation failures and everything else into JSON error bodies.

Every error reaches the client as `{"error": {"code": "<snake_case>", "message": "<one sentence>"}}`; a
stack trace never does (it is logged server-side only).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.server.errors import ApiError, InvalidRequest
from services.server.storage_trouble import StorageTrouble, is_storage_refusal

if TYPE_CHECKING:
    from services.coordinator.audit import RefusedActions

log = logging.getLogger("cape.server")


def error_response(exc: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def _field_name(loc: tuple[Any, ...]) -> str:
    """`('body', 'x', 'columns', 0)` -> `x.columns[0]`; the location kind (body/query/path) is dropped."""
    parts = list(loc[1:]) if loc and loc[0] in ("body", "query", "path", "header", "cookie") else list(loc)
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "body"


def problem_of(error: dict[str, Any]) -> str:
    """One pydantic error in words, starting lower-case: our validators' own sentence, or pydantic's message."""
    context = error.get("ctx") or {}
    if error.get("type") in ("string_too_long", "too_long") and "max_length" in context:
        # A length checked beside our validators reads "Value should have at most N items after validation".
        unit = "characters" if isinstance(error.get("input"), str) else "items"
        return f"must be at most {context['max_length']} {unit}"
    msg = str(error.get("msg", "is invalid"))
    if error.get("type") == "value_error" and context.get("error"):
        msg = str(context["error"])  # our validators' own sentence, without pydantic's "Value error, "
    return msg[:1].lower() + msg[1:]


def validation_message(errors: list[dict[str, Any]]) -> str:
    """One readable sentence naming the first bad field (and how many more there are)."""
    if not errors:
        return "the request is malformed"
    first = errors[0]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON"
    field = _field_name(tuple(first.get("loc", ())))
    if first.get("type") == "missing" and field == "body":
        message = "the request needs a JSON body"
    elif field == "body" and first.get("type") in ("model_attributes_type", "dict_type", "model_type"):
        message = "the request body must be a JSON object, sent with 'Content-Type: application/json'"
    else:
        message = f"field '{field}': {problem_of(first)}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return message


def install_error_handlers(app: FastAPI, storage: StorageTrouble | None = None,
                           forbidden: RefusedActions | None = None) -> None:
    """Register the JSON error handlers: typed errors (a 403 to a known caller counted in `forbidden`), validation
    (422 naming the field), HTTP errors, 500 (507 for a disk that refuses writes, noted in `storage`)."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        caller = getattr(request.state, "principal", None)
        if exc.status == 403 and forbidden is not None and caller is not None:
            forbidden.note_principal(caller, exc.code)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(InvalidRequest(validation_message(list(exc.errors()))))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: ("not_found", "no such endpoint; see /openapi.json"),
                 405: ("method_not_allowed", "this endpoint does not accept that method; see /openapi.json"),
                 413: ("too_large", "the request body is too large for this endpoint"),
                 415: ("unsupported_media_type", "send the body as JSON with 'Content-Type: application/json'")}
        code, message = codes.get(exc.status_code, ("http_error", str(exc.detail)))
        return JSONResponse({"error": {"code": code, "message": message}}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    storage = storage or StorageTrouble()

    def unexpected(method: str, path: str, exc: Exception) -> JSONResponse:
        if is_storage_refusal(exc):  # a full disk is no bug: one line a minute, and 507 in words
            return error_response(storage.refused(exc, f"{method} {path}"))
        # The trace stays in the server log; the client learns only that it was our fault.
        log.error("internal error on %s %s", method, path, exc_info=exc)
        return JSONResponse({"error": {"code": "internal_error",
                                       "message": "the server failed; the operator can find details in its log"}},
                            status_code=500)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Reached only from outside AnswerUnexpected (Starlette then logs the exception again, with its trace).
        return unexpected(request.method, request.url.path, exc)

    app.add_middleware(AnswerUnexpected, answer=unexpected)


class AnswerUnexpected:
    """Answers an exception no handler took, before Starlette's outermost middleware would log it a second time
    (as "Exception in ASGI application", trace and all) after our handler. A response already begun cannot be
    replaced: that exception goes on up."""

    def __init__(self, app: ASGIApp, answer: Callable[[str, str, Exception], JSONResponse]) -> None:
        self.app = app
        self.answer = answer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as exc:  # noqa: BLE001 - answered as a typed 500 (or 507); the trace is logged
            if started:
                raise
            await self.answer(scope["method"], scope["path"], exc)(scope, receive, send)
