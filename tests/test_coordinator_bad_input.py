"""Bad input gets a typed JSON error naming what is wrong, never a 500."""
from __future__ import annotations

import json
import subprocess

import pytest

from tests.support.server import Api, build_job_world, cape_server_command

JOB = {"type": "linear_regression", "x": {"dataview": "xs", "columns": ["a"]}, "y": {"dataview": "ys", "column": "t"},
       "model_owner": "yorg"}


def error(response, status):
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert set(body) >= {"code", "message"}
    return body["message"]


@pytest.fixture
def world(cape_server):
    world = build_job_world(cape_server)
    yield world
    log = cape_server.log_path.read_text()
    assert "internal error" not in log and "Traceback" not in log


def test_malformed_bodies_name_the_field(world):
    admin = world["user"]["xorg"]
    # In words, not the regular expression behind them.
    assert error(admin.post("/v1/projects", json={"label": "has space"}), 422) == (
        "field 'label': a label starts with a letter or digit and holds only letters, digits, '.', '_' and '-' (at "
        "most 64), not 'has space'")
    org = world["orgs"]["xorg"]["organization"]["label"]
    assert error(admin.post(f"/v1/organizations/{org}/users", json={"email": "nope", "role": "user"}), 422) == (
        "field 'email': 'nope' is not an email address (like name@example.org)")
    # An email is written to the audit log and shown to other organizations' members: as a name, no escapes.
    for email in ("a\x1b]0;title\x07\x1b[2J@x.example", "admin\u202e@x.example", "a\x00b@x.example"):
        assert error(admin.post(f"/v1/organizations/{org}/users", json={"email": email, "role": "user"}), 422) == (
            "field 'email': must be one line of text, without control characters (line breaks, tabs, escapes)")
    assert error(admin.post("/v1/projects", json={"name": "no label"}), 422) == "field 'label': field required"
    # Names are shown in tables: one line, no terminal escapes; a length in characters, not pydantic's "items".
    assert error(admin.post("/v1/projects", json={"label": "p", "name": "Evil\nCorp\x1b[31m"}), 422) == (
        "field 'name': must be one line of text, without control characters (line breaks, tabs, escapes)")
    assert error(admin.post("/v1/projects", json={"label": "p", "name": "x" * 201}), 422) == \
        "field 'name': must be at most 200 characters"
    assert error(admin.post("/v1/projects", json={"label": "ok", "colour": 1}), 422) == \
        "field 'colour': extra inputs are not permitted"
    assert error(admin.post("/v1/projects", data="{not json", headers={"Content-Type": "application/json"}),
                 422) == "the request body is not valid JSON"
    assert "JSON object" in error(admin.post("/v1/projects", json=["label"]), 422)
    assert "Content-Type" in error(admin.post("/v1/projects", data='{"label": "x"}'), 422)
    assert error(admin.post("/v1/projects/demo/dataviews", json={
        "name": "d", "uri": "file:///d.csv", "schema": [{"name": "a", "type": "float"}]}), 422).startswith(
        "field 'schema[0].type':")
    assert error(admin.post("/v1/projects/demo/dataviews", json={
        "name": "d", "uri": "file:///d.csv", "schema": [{"name": "a", "type": "number"}] * 2}), 422) == \
        "field 'schema': column names must be unique"
    # Columns show in every member's job views, and scripts read the API raw: one line too.
    for column in ("a\x1b[31m\nb", "income\u202e", "a\tb"):
        assert error(admin.post("/v1/projects/demo/dataviews", json={
            "name": "d", "uri": "file:///d.csv", "schema": [{"name": column, "type": "number"}]}), 422) == (
            "field 'schema[0].name': must be one line of text, without control characters (line breaks, tabs, "
            "escapes)")
    # A uri no worker can read is refused when the dataview is added, not after a job using it was approved.
    for uri in ("http://host/x.csv", "s3://bucket-only", "file://host/x.csv", "file://relative.csv", "ftp://h/x"):
        assert error(admin.post("/v1/projects/demo/dataviews", json={
            "name": "d", "uri": uri, "schema": [{"name": "a", "type": "number"}]}), 422) == (
            "field 'uri': a worker reads s3://bucket/key, file:///absolute/path or an absolute path on the owner's "
            "worker"), uri
    for uri in ("x.csv", "./data/y.csv", "~/x.csv"):  # the worker's programs run elsewhere than the CLI
        assert error(admin.post("/v1/projects/demo/dataviews", json={
            "name": "d", "uri": uri, "schema": [{"name": "a", "type": "number"}]}), 422) == (
            f"field 'uri': {uri!r} is a relative path; give the file's absolute path on the owner's worker "
            "(starting with /), a file:///absolute/path or an s3://bucket/key uri"), uri
    for uri in ("s3://bucket/x.csv", "file:///srv/x.parquet", "file://localhost/srv/x.csv", "/srv/x.csv"):
        created = admin.post("/v1/projects/demo/dataviews", json={
            "name": f"ok-{len(uri)}", "uri": uri, "schema": [{"name": "a", "type": "number"}]})
        assert created.status_code == 201, (uri, created.text)
    assert error(admin.post("/v1/projects/demo/jobs", json={**JOB, "x": {"dataview": "xs"}}), 422) == \
        "field 'x.columns': field required"
    assert error(admin.post("/v1/projects/demo/jobs", json={**JOB, "x": {"dataview": "xs", "columns": []}}),
                 422).startswith("field 'x.columns':")
    assert error(admin.post("/v1/projects/demo/jobs", json={**JOB, "timeout": 0}), 422).startswith("field 'timeout':")
    assert error(admin.post("/v1/projects/demo/jobs", json={**JOB, "type": "logistic"}), 422).startswith(
        "field 'type':")
    for name in ("a:b", "a,b"):
        refused = admin.post("/v1/projects/demo/dataviews", json={"name": name, "uri": "s3://b/k.csv",
                                                                  "schema": [{"name": "c", "type": "number"}]})
        assert error(refused, 422) == ("field 'name': a dataview name cannot hold ':' or ',' (the CLI selects "
                                       "columns as NAME:COL1,COL2)")
    assert error(admin.post("/v1/projects/demo/jobs", json={**JOB, "model_location": "http://x"}), 422) == (
        "field 'model_location': give s3://BUCKET[/PREFIX] or file:///ABSOLUTE/PATH")
    assert error(admin.post("/v1/projects/demo/jobs", json={**JOB, "model_location": "s3://"}), 422) == (
        "field 'model_location': s3:// needs a bucket: give s3://BUCKET[/PREFIX] or file:///ABSOLUTE/PATH")
    assert error(admin.post("/v1/projects/demo/jobs", json={**JOB, "model_location": "file://models"}), 422) == (
        "field 'model_location': file:// needs an absolute path (three slashes, file:///dir): give "
        "s3://BUCKET[/PREFIX] or file:///ABSOLUTE/PATH")
    worker = world["worker"]["xorg"]
    assert error(worker.put("/v1/worker/keys", json={"encryption_public_key": "not base64!",
                                                     "signing_public_key": "AAAA"}), 422).startswith(
        "field 'encryption_public_key': must be the base64 of a raw 32-byte X25519 public key")
    jid = world["job"]["id"]
    assert error(worker.post(f"/v1/worker/jobs/{jid}/report", json={"state": "started", "progress": 2}),
                 422).startswith("field 'progress':")
    assert error(worker.post(f"/v1/worker/jobs/{jid}/report", json={"state": "done"}), 422).startswith(
        "field 'state':")
    assert error(worker.post(f"/v1/worker/jobs/{jid}/report", data='{"state": "started", "progress": NaN}',
                             headers={"Content-Type": "application/json"}), 422).startswith("field 'progress':")


def test_job_references_are_checked(world):
    admin = world["user"]["xorg"]
    assert error(admin.post("/v1/projects/demo/jobs", json={**JOB, "x": {"dataview": "xs", "columns": ["zz"]}}),
                 422) == "field 'x.columns': dataview 'xs' has no column 'zz' (it has: a, b)"
    assert error(admin.post("/v1/projects/demo/jobs", json={**JOB, "y": {"dataview": "ys", "column": "a"}}),
                 422).startswith("field 'y.column': dataview 'ys' has no column 'a'")
    assert error(admin.post("/v1/projects/demo/jobs", json={**JOB, "y": {"dataview": "xs", "column": "a"}}),
                 422) == "field 'y.dataview': the x and y dataviews must belong to two different organizations"
    assert error(admin.post("/v1/projects/demo/jobs", json={**JOB, "model_owner": "nobody"}), 422) == \
        "field 'model_owner': no organization 'nobody'"
    admin.post("/v1/projects/demo/dataviews", json={"name": "names", "uri": "file:///n.csv",
                                                    "schema": [{"name": "who", "type": "string"}]})
    assert "not numeric" in error(admin.post("/v1/projects/demo/jobs", json={
        **JOB, "x": {"dataview": "names", "columns": ["who"]}}), 422)
    # The model owner holds y, so a helper must take the third seat: without one, the message says how to name it.
    assert admin.put("/v1/projects/demo/helper", json={"organization": None}).status_code == 200
    assert error(admin.post("/v1/projects/demo/jobs", json=JOB), 422) == (
        "field 'helper': the model owner is a data owner, so the project needs a helper organization for the third "
        "seat (`cape projects set-helper PROJECT ORG`, or `PUT /v1/projects/{project}/helper`)")


def test_job_on_another_projects_dataview_is_refused(world, cape_server):
    outsider = cape_server.create_org("outsider")
    out = Api(cape_server, outsider["user_token"])
    assert out.post("/v1/projects", json={"label": "theirs"}).status_code == 201
    theirs = out.post("/v1/projects/theirs/dataviews", json={
        "name": "secret", "uri": "s3://theirs/x.csv", "schema": [{"name": "a", "type": "number"}]}).json()
    # A dataview of another project cannot be named in this project's job, not even by id...
    assert error(world["user"]["xorg"].post("/v1/projects/demo/jobs", json={
        **JOB, "x": {"dataview": theirs["id"], "columns": ["a"]}}), 422) == \
        f"field 'x.dataview': this project has no dataview '{theirs['id']}'"
    # ...and an organization outside the project can neither submit there nor see its dataviews.
    assert error(out.post("/v1/projects/demo/jobs", json=JOB), 403).startswith("none of your organizations")
    assert out.get("/v1/projects/demo/dataviews").status_code == 403
    assert world["user"]["xorg"].get(f"/v1/dataviews/{theirs['id']}").status_code == 403


def test_unknown_ids_are_404(world):
    admin = world["user"]["xorg"]
    # Each 404 says how to find the right name, with the CLI command first (most users meet it there).
    assert error(admin.get("/v1/projects/nope"), 404) == \
        "no project 'nope'; `cape projects list` (`GET /v1/projects`) lists yours"
    assert error(admin.get("/v1/jobs/0123"), 404) == "no job '0123'"
    assert error(admin.get("/v1/dataviews/0123"), 404) == "no dataview '0123'"
    assert error(admin.get("/v1/organizations/nope"), 404) == \
        "no organization 'nope'; `cape orgs list` (or, on the server, `cape-server admin list-orgs`) lists them"
    assert error(admin.post("/v1/projects/demo/organizations", json={"organization": "nope"}), 404).startswith(
        "no organization 'nope'")
    assert error(world["worker"]["xorg"].get("/v1/worker/jobs/0123"), 404) == "no job '0123'"
    assert error(admin.get("/v1/no/such/endpoint"), 404).startswith("no such endpoint")
    assert error(admin.get("/v1/worker/jobs"), 403) == ("this endpoint is for workers: use an organization token "
                                                         "(`cape orgs create-token ORG`, or "
                                                         "`POST /v1/organizations/{org}/tokens`)")
    assert error(admin.request("PATCH", "/v1/projects/demo"), 405).startswith("this endpoint does not accept")


def test_duplicates_are_409(world, cape_server):
    admin = world["user"]["xorg"]
    assert error(admin.post("/v1/projects", json={"label": "demo"}), 409) == \
        "a project labelled 'demo' already exists; choose another label"
    assert error(admin.post("/v1/projects/demo/dataviews", json={
        "name": "xs", "uri": "file:///x.csv", "schema": [{"name": "a", "type": "number"}]}), 409) == \
        "project 'demo' already has a dataview named 'xs'"
    assert error(admin.post("/v1/organizations/xorg/users", json={"email": "admin@xorg.example", "role": "user"}),
                 409) == "'admin@xorg.example' is already a member of this organization"
    # Ending states: approving twice is a no-op, stopping an ended job is a conflict naming its status.
    jid = world["job"]["id"]
    assert admin.post(f"/v1/jobs/{jid}/approve").status_code == 200
    assert admin.post(f"/v1/jobs/{jid}/stop").status_code == 200
    assert error(admin.post(f"/v1/jobs/{jid}/stop"), 409) == "the job already ended (Stopped)"


def test_active_jobs_block_deleting_their_project_and_dataviews(world):
    admin = world["user"]["xorg"]
    xs = world["job"]["task"]["x"]["dataview"]["id"]
    assert error(admin.delete(f"/v1/dataviews/{xs}"), 409).startswith("dataview 'xs' is used by 1 job that has not")
    assert error(admin.delete("/v1/projects/demo"), 409).startswith("project 'demo' has 1 job that has not ended")
    assert admin.post(f"/v1/jobs/{world['job']['id']}/stop").status_code == 200
    assert admin.delete(f"/v1/dataviews/{xs}").status_code == 204
    assert admin.delete("/v1/projects/demo").status_code == 204
    assert admin.get("/v1/projects/demo").status_code == 404


def test_oversized_json_body_is_413(world):
    response = world["user"]["xorg"].post("/v1/projects", data=b'{"label": "' + b"a" * 2_000_000 + b'"}',
                                          headers={"Content-Type": "application/json"})
    assert error(response, 413).startswith("the request body is over")


def test_admin_cli_errors_are_one_line(cape_server):
    cape_server.create_org("acme")

    def admin(*args):
        return subprocess.run([*cape_server_command(), "admin", *args, "--data-dir", str(cape_server.data_dir)],
                              capture_output=True, text=True, timeout=60)

    dup = admin("create-org", "acme", "--admin-email", "x@acme.example")
    assert dup.returncode == 1 and dup.stderr.strip() == \
        "Error: an organization labelled 'acme' already exists; choose another label"
    bad = admin("create-org", "a b", "--admin-email", "x@acme.example")
    assert bad.returncode == 2 and "Invalid value for LABEL" in bad.stderr
    missing = admin("create-user", "nope", "--email", "x@y.z", "--role", "user")
    assert missing.returncode == 1 and "no organization 'nope'" in missing.stderr
    for name, problem in (("Evil\nCorp", "must be one line of text, without control characters (line breaks, tabs, "
                                        "escapes)"), ("x" * 201, "must be at most 200 characters")):
        refused = admin("create-org", "evil", "--name", name, "--admin-email", "x@evil.example")
        assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1] == \
            f"Error: Invalid value for '--name': the name {problem}"  # as the API's rule: nothing stored
    long = admin("create-org-token", "acme", "--description", "d" * 501)
    assert long.returncode == 2 and "the description must be at most 500 characters" in long.stderr
    role = admin("create-user", "acme", "--email", "x@y.z", "--role", "boss")
    assert role.returncode == 2 and "'boss' is not one of" in role.stderr
    token = cape_server.create_org("beta")["organization_token"]
    revoked = admin("revoke-token", token)
    assert revoked.returncode == 0 and token.split(",")[1] not in revoked.stdout
    assert Api(cape_server, token).post("/v1/login").status_code == 401


def test_only_the_model_owner_chooses_the_model_location(world):
    """The model owner approves nothing and its worker writes with its own credentials: another organization naming
    the location could have the weights written to a bucket it reads."""
    job = {**JOB, "model_location": "s3://somewhere/models"}
    assert error(world["user"]["xorg"].post("/v1/projects/demo/jobs", json=job), 422) == (
        "field 'model_location': only the model owner 'yorg' chooses where its model is written; leave it out (its "
        "worker writes to its CAPE_BUCKET) or submit as a member of the model owner")
    assert world["user"]["xorg"].post("/v1/projects/demo/jobs", json=JOB).status_code == 201
    created = world["user"]["yorg"].post("/v1/projects/demo/jobs", json=job)
    assert created.status_code == 201, created.text
    assert world["user"]["yorg"].get(f"/v1/jobs/{created.json()['id']}").json()["task"]["model_location"] == \
        "s3://somewhere/models"
    # Where the model owner keeps its models is for its eyes (job errors never name it): other members see no
    # location, in the job, in a listing, and in the answer to their approval.
    job_id = created.json()["id"]
    for seen in (world["user"]["xorg"].get(f"/v1/jobs/{job_id}").json(),
                 next(j for j in world["user"]["xorg"].get("/v1/projects/demo/jobs").json() if j["id"] == job_id),
                 world["user"]["xorg"].post(f"/v1/jobs/{job_id}/approve").json()):
        assert (seen["task"]["model_location"], seen["task"]["model_location_shown"]) == (None, False)
        assert seen.get("model_stored_at") is None and "somewhere" not in json.dumps(seen)
    assert world["user"]["yorg"].get(f"/v1/jobs/{job_id}").json()["task"]["model_location_shown"] is True
    # ... and the other seats' workers, whose operators read their spools, are not told either.
    worker_views = {org: world["worker"][org].get(f"/v1/worker/jobs/{job_id}").json() for org in ("xorg", "yorg")}
    assert worker_views["xorg"]["task"]["model_location"] is None
    assert worker_views["yorg"]["task"]["model_location"] == "s3://somewhere/models"


def test_jobs_waiting_for_approval_are_bounded_per_project_and_submitter(world):
    """A member submitted 1,000 jobs in 9 s against a partner's dataview: each waits weeks for its owner, holds the
    dataview from deletion and was rejected one call at a time. Past the bound, submitting says what to do."""
    from services.coordinator.jobs import MAX_WAITING_JOBS
    from tests.support.server import SIMPLE_JOB, submit_jobs

    yorg, xorg = world["user"]["yorg"], world["user"]["xorg"]
    waiting = [j["id"] for j in submit_jobs(xorg, "demo", MAX_WAITING_JOBS)]
    assert error(xorg.post("/v1/projects/demo/jobs", json=SIMPLE_JOB), 409) == (
        f"your organization has {MAX_WAITING_JOBS} jobs waiting for approval in project 'demo', the most it may: stop "
        "some (`cape jobs list demo --status NeedsApproval`, then `cape jobs stop JOB_ID`) or wait for their data "
        "owners to decide")
    assert yorg.post("/v1/projects/demo/jobs", json=SIMPLE_JOB).status_code == 201  # another submitter's own bound
    assert xorg.post(f"/v1/jobs/{waiting[0]}/stop").status_code == 200
    assert xorg.post("/v1/projects/demo/jobs", json=SIMPLE_JOB).status_code == 201
