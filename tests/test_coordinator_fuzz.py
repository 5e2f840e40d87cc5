"""Schema-driven fuzz of the coordinator API from its served OpenAPI document: no input gets a 500."""
from __future__ import annotations

import itertools
import time
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import response_schema_conformance

from tests.support.server import CapeServer, build_job_world

MAX_EXAMPLES = 15  # per operation and generation mode (valid and invalid inputs)
TIME_BUDGET = 40.0  # seconds; past it (a loaded machine) every remaining operation still gets a few examples
MIN_EXAMPLES = 3


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CapeServer]:
    server = CapeServer(tmp_path_factory.mktemp("fuzz") / "server")
    server.world = build_job_world(server)  # type: ignore[attr-defined]
    yield server
    server.stop()
    log = server.log_path.read_text()
    assert "internal error" not in log, log[-4000:]


@pytest.fixture(scope="module")
def api_schema(fuzz_server: CapeServer) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")


def test_openapi_document_describes_both_parts(fuzz_server, api_schema):
    paths = api_schema.raw_schema["paths"]
    assert "/v1/projects/{project}/jobs" in paths and "/v1/worker/jobs/{job_id}/report" in paths
    assert "/broker/v1/jobs/{job}/messages/{to_seat}/{name}" in paths
    schemes = api_schema.raw_schema["components"]["securitySchemes"]
    assert schemes["CapeToken"]["scheme"] == schemes["WorkerToken"]["scheme"] == "bearer"


def test_openapi_document_names_the_shape_of_every_answer(api_schema):
    """Every JSON success answer has a named schema (an SDK or another worker can be written from the document);
    the answers without a body say so."""
    unnamed = []
    for path, operations in api_schema.raw_schema["paths"].items():
        for method, operation in operations.items():
            for status, answer in operation["responses"].items():
                if not status.startswith("2"):
                    continue
                json_schema = answer.get("content", {}).get("application/json", {}).get("schema")
                if json_schema is not None and "$ref" not in json_schema.get("items", json_schema):
                    unnamed.append(f"{method.upper()} {path} {status}")
                if not answer.get("content") and status not in ("204", "201", "200"):
                    unnamed.append(f"{method.upper()} {path} {status}: no content")
    assert not unnamed, unnamed
    schemas = api_schema.raw_schema["components"]["schemas"]
    assert schemas["Job"]["properties"]["status"]["enum"] == ["NeedsApproval", "Approved", "Started", "Completed",
                                                              "Error", "Stopped", "Rejected"]
    assert schemas["WorkerJob"]["additionalProperties"] is False
    broker_get = api_schema.raw_schema["paths"]["/broker/v1/jobs/{job}/messages/{name}"]["get"]["responses"]["200"]
    assert list(broker_get["content"]) == ["application/octet-stream"]


def fuzz_operation(strategy: st.SearchStrategy[schemathesis.Case], examples: int, base_url: str,
                   headers: dict[str, str]) -> list[str]:
    """Call the API with `examples` generated cases; returns a line per 5xx or non-JSON error answer."""
    failures: list[str] = []

    @given(case=strategy)
    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def fuzz(case: schemathesis.Case) -> None:
        response = case.call(base_url=base_url, headers=headers, timeout=30)
        if response.status_code >= 500 or (response.status_code >= 400 and "error" not in response.json()):
            failures.append(f"{case.method} {case.formatted_path} body={case.body!r:.200}: "
                            f"{response.status_code} {response.text[:200]}")
        elif response.status_code < 300:
            try:  # what the API answers is what its OpenAPI document says it answers
                case.validate_response(response, checks=[response_schema_conformance])
            except BaseExceptionGroup as exc:  # schemathesis's FailureGroup: one entry per mismatch
                failures.append(f"{case.method} {case.formatted_path}: {response.status_code} does not match the "
                                f"documented schema: {exc!s:.300}")

    fuzz()
    return failures


def test_coordinator_never_answers_500(fuzz_server, api_schema):
    """Every `/v1` operation, valid and invalid inputs alike, with a real token so the fuzz gets past 401."""
    world = fuzz_server.world
    failures: list[str] = []
    operations = [result.ok() for result in api_schema.include(path_regex="^/v1/").get_all_operations()]
    assert len(operations) >= 25

    job = world["job"]
    known = {"project": "demo", "org": "xorg", "job_id": job["id"], "dataview_id": job["task"]["x"]["dataview"]["id"]}
    started = time.monotonic()
    for operation, mode in itertools.product(operations, GenerationMode):
        examples = MAX_EXAMPLES if time.monotonic() - started < TIME_BUDGET else MIN_EXAMPLES
        # Worker endpoints with the worker's token, the rest with an admin's.
        token_of = "organization_token" if operation.path.startswith("/v1/worker") else "user_token"
        headers = {"Authorization": f"Bearer {world['orgs']['xorg'][token_of]}"}
        # Half the cases aim at objects that exist, so the fuzz reaches the handlers' own checks.
        names = {p.name for p in operation.iter_parameters() if p.location == "path"}
        real = {k: v for k, v in known.items() if k in names}
        strategy = operation.as_strategy(mode)
        if real and real.keys() == names:
            strategy = st.one_of(strategy, operation.as_strategy(mode, path_parameters=real))

        failures += fuzz_operation(strategy, examples, fuzz_server.url, headers)
    assert not failures, "\n".join(failures[:20])
