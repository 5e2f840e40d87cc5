"""Unit tests of the error plumbing: typed errors, 422 messages naming the field, and the generic 500."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import pytest
from fastapi import FastAPI

from services.server.error_handlers import install_error_handlers, validation_message
from services.server.errors import Conflict, Unauthorized

if TYPE_CHECKING:
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.filterwarnings("ignore:Using .httpx. with .starlette.testclient.")


@pytest.fixture
def client() -> TestClient:
    from fastapi.testclient import TestClient  # imported here: its import warns about httpx, which we don't control

    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret-value-123 leaked into an exception")

    @app.get("/conflict")
    def conflict() -> None:
        raise Conflict("the job is Completed; stop working on it", code="job_not_active",
                       extra={"status": "Completed"})

    @app.get("/unauthorized")
    def unauthorized() -> None:
        raise Unauthorized("this endpoint needs a token")

    return TestClient(app, raise_server_exceptions=False)


def test_unexpected_exception_is_a_generic_500_logged_server_side(client, caplog):
    with caplog.at_level(logging.ERROR, logger="cape.server"):
        response = client.get("/boom")
    assert response.status_code == 500
    assert response.json() == {"error": {"code": "internal_error",
                                         "message": "the server failed; the operator can find details in its log"}}
    assert "secret-value-123" not in response.text and "Traceback" not in response.text
    assert "internal error on GET /boom" in caplog.text
    assert caplog.records[-1].exc_info is not None  # the stack trace stays in the server's log


def test_typed_errors_keep_status_code_and_extra_fields(client):
    response = client.get("/conflict")
    assert response.status_code == 409
    assert response.json() == {"error": {"code": "job_not_active", "status": "Completed",
                                         "message": "the job is Completed; stop working on it"}}
    unauthorized = client.get("/unauthorized")
    assert unauthorized.status_code == 401 and unauthorized.headers["www-authenticate"] == "Bearer"


def test_validation_message_names_the_nested_field():
    assert validation_message([{"loc": ("body", "x", "columns", 2), "msg": "String should have at least 1 character",
                                "type": "string_too_short"}]) == \
        "field 'x.columns[2]': string should have at least 1 character"
    assert validation_message([{"loc": ("query", "wait"), "msg": "Input should be less than or equal to 60",
                                "type": "less_than_equal"}, {"loc": ("body",), "msg": "x", "type": "missing"},
                               {"loc": ("body",), "msg": "y", "type": "missing"}]) == \
        "field 'wait': input should be less than or equal to 60 (and 2 more problems)"
    assert validation_message([{"loc": ("body", 12), "msg": "JSON decode error", "type": "json_invalid"}]) == \
        "the request body is not valid JSON"
    assert validation_message([{"loc": ("body",), "msg": "Field required", "type": "missing"}]) == \
        "the request needs a JSON body"
