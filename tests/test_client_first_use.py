"""Rough edges a new user of `cape` and the SDK meets: wrong token kinds, URLs, several organizations, names."""
from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import numpy as np
import pytest

from services.client import BadArgument, Cape, VerticallyPartitionedLinearRegression
from tests.support.client import one_error_line
from tests.support.server import build_job_world

ROOT = Path(__file__).resolve().parents[1]
ENV_HINT = "(CAPE_TOKEN is set in the environment and overrides your saved login)"
ORG_TOKEN_KIND = ("error: organization tokens may use only the worker endpoints and the broker; use a user token "
                  "(HTTP 403)")


@pytest.fixture
def orgs(shared_cape_server, unique_label) -> dict[str, dict]:
    return {name: shared_cape_server.create_org(unique_label(name)) for name in ("acme", "globex", "initech")}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_login_refuses_an_organization_token(shared_cape_server, cape_cli, cape_home: Path, orgs) -> None:
    result = cape_cli("login", "--coordinator", shared_cape_server.url, "--token", orgs["acme"]["organization_token"])
    assert result.exit_code == 1
    assert one_error_line(result.stderr) == (
        "error: this is an organization token, for a worker's CAPE_TOKEN; log in with a user token "
        "(`cape-server admin create-user`, or `cape orgs add-user` by an admin)")
    assert result.stdout == ""
    assert not cape_home.exists()
    # The SDK still takes one (a script may call the worker endpoints with it): login says what it is.
    identity = Cape(endpoint=shared_cape_server.url).login(token=orgs["acme"]["organization_token"])
    assert identity["kind"] == "organization"


def test_a_refused_env_token_says_it_overrides_the_saved_login(shared_cape_server, cape_cli, orgs) -> None:
    url = shared_cape_server.url
    # Without a saved login there is nothing overridden: the server's line as it is.
    worker_env = {"CAPE_COORDINATOR": url, "CAPE_TOKEN": orgs["acme"]["organization_token"]}
    alone = cape_cli("projects", "list", env=worker_env)
    assert (alone.exit_code, one_error_line(alone.stderr)) == (1, ORG_TOKEN_KIND)

    assert cape_cli("login", "--coordinator", url, "--token", orgs["acme"]["user_token"]).exit_code == 0
    refused = cape_cli("projects", "list", env={"CAPE_TOKEN": orgs["acme"]["organization_token"]})
    assert refused.exit_code == 1
    assert one_error_line(refused.stderr) == f"{ORG_TOKEN_KIND} {ENV_HINT}"
    bad = cape_cli("whoami", env={"CAPE_TOKEN": "nosuchid,c2VjcmV0c2VjcmV0"})
    assert bad.exit_code == 1
    line = one_error_line(bad.stderr)
    assert line.endswith(f"(HTTP 401) {ENV_HINT}") and "c2VjcmV0c2VjcmV0" not in line
    # Other errors, and the saved token itself given again, get no hint.
    missing = cape_cli("jobs", "status", "0" * 32, env={"CAPE_TOKEN": orgs["globex"]["user_token"]})
    assert missing.exit_code == 1 and one_error_line(missing.stderr).endswith("(HTTP 404)")
    same = cape_cli("orgs", "create-token", orgs["globex"]["organization"]["label"],
                    env={"CAPE_TOKEN": orgs["acme"]["user_token"]})
    assert same.exit_code == 1 and one_error_line(same.stderr).endswith("(HTTP 403)")


@pytest.mark.parametrize("suffix", ["/v1", "/v1/", "/broker", "/broker/v1"])
def test_an_api_path_in_the_coordinator_url_is_refused_before_any_request(cape_cli, cape_home: Path,
                                                                          suffix: str) -> None:
    base = f"http://127.0.0.1:{_closed_port()}"  # nothing listens: a request would say "cannot reach"
    shown = suffix.rstrip("/")
    login = cape_cli("login", "--coordinator", base + suffix, "--token", "tid,c2VjcmV0")
    assert login.exit_code == 1
    assert one_error_line(login.stderr) == f"error: give the coordinator's base URL, without {shown}: {base}"
    assert not cape_home.exists()
    listed = cape_cli("projects", "list", env={"CAPE_COORDINATOR": base + suffix, "CAPE_TOKEN": "tid,c2VjcmV0"})
    assert listed.exit_code == 1
    assert one_error_line(listed.stderr) == (
        f"error: CAPE_COORDINATOR: give the coordinator's base URL, without {shown}: {base}")


def test_a_user_of_several_organizations_names_one_with_org(shared_cape_server, cape_cli, orgs,
                                                            unique_label) -> None:
    acme, globex, initech = (orgs[n]["organization"]["label"] for n in ("acme", "globex", "initech"))
    # acme's admin also joins globex as a data scientist: their tokens now act for both.
    email = orgs["acme"]["user"]["email"]
    shared_cape_server.create_user(globex, email, "data_scientist")
    env = {"CAPE_COORDINATOR": shared_cape_server.url, "CAPE_TOKEN": orgs["acme"]["user_token"]}
    several = (f"error: --org: you belong to several organizations; name the one you act for: "
               f"{' or '.join(sorted([acme, globex]))} (HTTP 422)")
    project = unique_label("multi")

    unnamed = cape_cli("projects", "create", project, env=env)
    assert (unnamed.exit_code, one_error_line(unnamed.stderr)) == (1, several)
    assert cape_cli("projects", "create", project, "--org", acme, env=env).exit_code == 0
    assert cape_cli("projects", "add-org", project, globex, env=env).exit_code == 0
    assert cape_cli("projects", "set-helper", project, initech, env=env).exit_code == 0
    joined = cape_cli("projects", "join", project, initech, env={**env, "CAPE_TOKEN": orgs["initech"]["user_token"]})
    assert joined.exit_code == 0, joined.stderr
    unnamed = cape_cli("dataviews", "add", project, "x", "s3://acme/x.csv", "--schema", "a,b", env=env)
    assert (unnamed.exit_code, one_error_line(unnamed.stderr)) == (1, several)
    for name, org, schema in (("x", acme, "a,b"), ("y", globex, "t")):
        added = cape_cli("dataviews", "add", project, name, f"s3://{org}/{name}.csv", "--schema", schema,
                         "--org", org, env=env)
        assert added.exit_code == 0, added.stderr

    submit = ("jobs", "submit", project, "linear-regression", "--x", "x", "--y", "y", "--model-owner", acme)
    unnamed = cape_cli(*submit, env=env)
    assert (unnamed.exit_code, one_error_line(unnamed.stderr)) == (1, several)
    submitted = cape_cli(*submit, "--org", globex, "--json", env=env)
    assert submitted.exit_code == 0, submitted.stderr
    assert json.loads(submitted.stdout)["status"] == "NeedsApproval"

    sdk = Cape(endpoint=shared_cape_server.url, token=orgs["acme"]["user_token"]).get_project(project)
    task = VerticallyPartitionedLinearRegression(sdk.get_dataview("x"), sdk.get_dataview("y"), acme)
    assert sdk.submit_job(task, organization=acme).status == "NeedsApproval"
    assert len(sdk.list_jobs()) == 2


def test_a_user_who_may_act_for_only_one_of_their_organizations_needs_no_org(shared_cape_server, cape_cli, orgs,
                                                                           unique_label) -> None:
    """A data scientist of one organization and a plain user of another creates projects for the first, unasked."""
    acme, globex = (orgs[n]["organization"]["label"] for n in ("acme", "globex"))
    email = f"{unique_label('two-hats')}@example.com"
    token = shared_cape_server.create_user(acme, email, "data_scientist")["token"]
    shared_cape_server.create_user(globex, email, "user")
    env = {"CAPE_COORDINATOR": shared_cape_server.url, "CAPE_TOKEN": token}
    project = unique_label("one-able")
    created = cape_cli("projects", "create", project, "--json", env=env)
    assert created.exit_code == 0, created.stderr
    assert json.loads(created.stdout)["owner"]["label"] == acme


def test_dataviews_show_and_delete_take_an_id_or_project_and_name(shared_cape_server, cape_cli, orgs,
                                                                 unique_label) -> None:
    env = {"CAPE_COORDINATOR": shared_cape_server.url, "CAPE_TOKEN": orgs["acme"]["user_token"]}
    project = unique_label("dvnames")
    assert cape_cli("projects", "create", project, env=env).exit_code == 0
    added = json.loads(cape_cli("dataviews", "add", project, "target", "s3://acme/y.csv", "--schema", "t",
                                "--json", env=env).stdout)

    by_name = cape_cli("dataviews", "show", project, "target", "--json", env=env)
    by_id = cape_cli("dataviews", "show", added["id"], "--json", env=env)
    assert by_name.exit_code == by_id.exit_code == 0
    assert json.loads(by_name.stdout) == json.loads(by_id.stdout) == added
    for command in ("show", "delete"):
        alone = cape_cli("dataviews", command, "target", env=env)
        assert alone.exit_code == 1
        assert one_error_line(alone.stderr) == (
            f"error: no dataview with id 'target'; give its id, or the project and name: cape dataviews {command} "
            "PROJECT NAME (HTTP 404)")
    too_many = cape_cli("dataviews", "show", project, "target", "extra", env=env)
    assert too_many.exit_code == 2 and "give the dataview's id, or its project and name" in too_many.stderr

    deleted = cape_cli("dataviews", "delete", project, "target", env=env)
    assert (deleted.exit_code, deleted.stdout) == (0, f"Deleted dataview target ({added['id']}).\n")
    assert json.loads(cape_cli("dataviews", "list", project, "--json", env=env).stdout) == []


def test_sdk_gets_jobs_and_dataviews_by_id_keyword(shared_cape_server, orgs, unique_label) -> None:
    c = Cape(endpoint=shared_cape_server.url)
    c.login(token=orgs["acme"]["user_token"])
    project = c.create_project(unique_label("kw")).add_org(orgs["globex"]["organization"]["label"])
    project.set_helper(orgs["initech"]["organization"]["label"])
    Cape(endpoint=shared_cape_server.url, token=orgs["initech"]["user_token"]).get_project(project.id).join(
        orgs["initech"]["organization"]["label"])
    x = project.create_dataview("x", "s3://acme/x.csv", schema="a")
    Cape(endpoint=shared_cape_server.url, token=orgs["globex"]["user_token"]).get_project(project.id) \
        .create_dataview("y", "s3://globex/y.csv", schema="t")
    job = project.submit_job(VerticallyPartitionedLinearRegression(x, project.get_dataview("y"),
                                                                   orgs["acme"]["organization"]["label"]))
    assert c.get_job(id=job.id) == c.get_job(job.id) == job
    assert c.get_dataview(id=x.id) == c.get_dataview(x.id) == x
    with pytest.raises(BadArgument, match=r"get_job takes exactly one of job_id=, id= \(got 0\)"):
        c.get_job()


def test_jobs_results_show_where_the_worker_wrote_the_model(cape_server, cape_cli, tmp_path: Path) -> None:
    """The model owner's worker wrote elsewhere than the submitted s3://bucket/models (its CAPE_BUCKET)."""
    world = build_job_world(cape_server)
    job_id = world["job"]["id"]
    for api in world["worker"].values():
        assert api.post(f"/v1/worker/jobs/{job_id}/report", json={"state": "started", "progress": 0}).status_code == 204
    weights = tmp_path / "bucket" / job_id / "regression_weights.csv"
    weights.parent.mkdir(parents=True)
    weights.write_text("0.5\n-1.25\n3.0\n")
    assert world["worker"]["yorg"].post(f"/v1/worker/jobs/{job_id}/report", json={
        "state": "completed", "progress": 1, "metrics": {"mse_result": 0.25, "r_squared_result": 0.75},
        "model_location": weights.as_uri()}).status_code == 204
    env = {"CAPE_COORDINATOR": cape_server.url, "CAPE_TOKEN": world["orgs"]["yorg"]["user_token"]}

    as_json = cape_cli("jobs", "results", job_id, "--json", env=env)
    assert as_json.exit_code == 0, as_json.stderr
    assert json.loads(as_json.stdout) == {
        "job": job_id, "weights": [0.5, -1.25, 3.0], "names": ["intercept", "a", "b"],
        "metrics": {"mse_result": 0.25, "r_squared_result": 0.75}, "model_location": weights.as_uri()}
    text = cape_cli("jobs", "results", job_id, env=env)
    assert text.exit_code == 0
    assert text.stdout.splitlines()[-3:] == [
        "mse_result:       0.25", "r_squared_result: 0.75", f"model location:   {weights.as_uri()}"]

    job = Cape(endpoint=cape_server.url, token=world["orgs"]["yorg"]["user_token"]).get_job(job_id)
    assert job.model_location is None  # not read yet
    found, metrics = job.get_results()  # pycape's shape: (weights, metrics)
    np.testing.assert_array_equal(found, [0.5, -1.25, 3.0])
    assert job.model_location == weights.as_uri()
    assert job.data["task"]["model_location"] == "s3://bucket/models"
    # `cape jobs status` says where the model went to the model owner's members; to the others, that it is not theirs.
    assert f"model location: stored at {weights.as_uri()}\n" in cape_cli("jobs", "status", job_id, env=env).stdout
    others = {**env, "CAPE_TOKEN": world["orgs"]["xorg"]["user_token"]}
    assert "model location: the model owner's to know (shown to its members)\n" in cape_cli(
        "jobs", "status", job_id, env=others).stdout


def test_projects_delete_refuses_before_asking_when_the_role_does_not_allow_it(shared_cape_server, cape_cli, orgs,
                                                                               unique_label) -> None:
    acme, globex = orgs["acme"]["organization"]["label"], orgs["globex"]["organization"]["label"]
    env = {"CAPE_COORDINATOR": shared_cape_server.url, "CAPE_TOKEN": orgs["acme"]["user_token"]}
    project = unique_label("del")
    assert cape_cli("projects", "create", project, env=env).exit_code == 0
    assert cape_cli("projects", "add-org", project, globex, env=env).exit_code == 0
    member = cape_cli("orgs", "add-user", acme, f"user@{acme}.test", "--json", env=env)
    user_env = {**env, "CAPE_TOKEN": json.loads(member.stdout)["token"]}
    globex_env = {**env, "CAPE_TOKEN": orgs["globex"]["user_token"]}

    asked = "to delete a project (owner organization) you need the role admin or data_scientist in the organization"
    for who, have in ((user_env, "your role there is user"), (globex_env, "you are not a member of that organization")):
        refused = cape_cli("projects", "delete", project, env=who, input="y\n")
        assert (refused.exit_code, refused.stdout) == (1, "")  # never asked
        assert one_error_line(refused.stderr) == f"error: {asked} ({have})"
    # With --yes nothing is asked, so the server answers (and stays the authority).
    forced = cape_cli("projects", "delete", project, "--yes", env=user_env)
    assert forced.exit_code == 1 and one_error_line(forced.stderr) == (
        f"error: {asked} (your role there is user) (HTTP 403)")

    kept = cape_cli("projects", "delete", project, env=env, input="n\n")
    assert kept.exit_code == 1 and re.match(rf"Delete project {project} \(\w+\)\? \[y/N\]: n\n", kept.stdout)
    deleted = cape_cli("projects", "delete", project, env=env, input="y\n")
    assert deleted.exit_code == 0 and deleted.stdout.splitlines()[-1].startswith(f"Deleted project {project} (")
    assert json.loads(cape_cli("projects", "list", "--json", env=env).stdout) == []


def test_readme_names_both_config_locations_and_logs_in_in_two_statements() -> None:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("\n## The `cape` CLI and SDK\n"):text.index("\n## Running the coordinator")]
    assert "`$XDG_CONFIG_HOME/cape/config.json`" in section and "`~/.config/cape/config.json`" in section
    assert "Cape(endpoint=URL).login(" not in section
    assert "`c = Cape(endpoint=URL)` then `c.login(token=T)`" in section
