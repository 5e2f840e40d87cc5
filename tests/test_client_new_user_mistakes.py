"""What a new user of `cape` and the SDK runs into, tried as a new user would: a token read from a file with its
line break, an unset shell variable as a project, an Excel CSV (BOM), a broken config file, a coordinator restarting
while a job is watched, a revoked own token, results whose weights file is on another machine, approving twice,
deleting without a terminal, a job's details before approving it, and SDK arguments of the wrong type."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.client import Cape, VerticallyPartitionedLinearRegression
from services.client.errors import BadArgument
from services.worker.partner_wait import LIMIT_TIMEOUTS
from services.client.models import DataView
from tests.support.client import one_error_line
from tests.support.server import build_job_world, cape_server_command, ok


@pytest.fixture
def acme(shared_cape_server, unique_label) -> dict:
    return shared_cape_server.create_org(unique_label("acme"))


def env_of(server, token: str) -> dict[str, str]:
    return {"CAPE_COORDINATOR": server.url, "CAPE_TOKEN": token}


def test_a_token_with_its_line_break_works_and_one_with_a_space_inside_is_refused_unshown(
        shared_cape_server, acme, cape_cli) -> None:
    token = acme["user_token"]
    secret = token.split(",", 1)[1]
    for padded in (token + "\r\n", token + "\n", f"  {token} "):
        result = cape_cli("whoami", env=env_of(shared_cape_server, padded))
        assert result.exit_code == 0, result.stderr
        assert Cape(endpoint=shared_cape_server.url, token=padded).login()["kind"] == "user"
        assert Cape(endpoint=shared_cape_server.url).login(token=padded)["kind"] == "user"
    broken = token[:10] + "\r" + token[10:]
    result = cape_cli("projects", "list", env=env_of(shared_cape_server, broken))
    assert result.exit_code == 1
    assert one_error_line(result.stderr) == (
        "error: CAPE_TOKEN: the token holds a space, line break or other character a token never has; copy it "
        "again, on one line (it looks like <id>,<secret>)")
    assert secret[:8] not in result.stderr and secret[-8:] not in result.stderr
    with pytest.raises(BadArgument, match="the token given: the token holds a space") as caught:
        Cape(endpoint=shared_cape_server.url, token=broken)
    assert secret[-8:] not in str(caught.value)


def test_cape_login_saves_the_token_without_its_line_break(shared_cape_server, acme, cape_cli, cape_home) -> None:
    result = cape_cli("login", "--coordinator", shared_cape_server.url, "--token", acme["user_token"] + "\n")
    assert result.exit_code == 0, result.stderr
    assert json.loads(cape_home.read_text())["token"] == acme["user_token"]
    piped = cape_cli("login", "--coordinator", shared_cape_server.url, input=acme["user_token"] + "\n")
    assert piped.exit_code == 0, piped.stderr
    assert "GetPassWarning" not in piped.stderr + piped.stdout


@pytest.mark.parametrize("args", [("projects", "show", ""), ("jobs", "list", ""), ("dataviews", "list", ""),
                                  ("orgs", "show", ""), ("orgs", "tokens", ""), ("projects", "delete", "--yes", "")])
def test_an_empty_name_is_refused_before_any_request(shared_cape_server, acme, cape_cli, args) -> None:
    result = cape_cli(*args, env=env_of(shared_cape_server, acme["user_token"]))
    assert result.exit_code == 1
    assert one_error_line(result.stderr) == ("error: an empty name or id was given (an unset shell variable?); "
                                             "give a label or an id")


def test_the_sdk_refuses_an_empty_project_or_organization(shared_cape_server, acme) -> None:
    cape = Cape(endpoint=shared_cape_server.url, token=acme["user_token"])
    for call in (lambda: cape.get_project(""), lambda: cape.get_organization(""), lambda: cape.get_job(" ")):
        with pytest.raises(BadArgument, match="an empty name or id was given"):
            call()


def test_a_csv_saved_by_excel_with_a_bom_gives_clean_column_names(shared_cape_server, acme, cape_cli, tmp_path,
                                                                   unique_label) -> None:
    data = tmp_path / "x_bom.csv"
    data.write_text("age,income\n31,1200.5\n45,2200\n", encoding="utf-8-sig")
    project, env = unique_label("bom"), env_of(shared_cape_server, acme["user_token"])
    assert cape_cli("projects", "create", project, env=env).exit_code == 0
    result = cape_cli("dataviews", "add", project, "features", str(data), "--json", env=env)
    assert result.exit_code == 0, result.stderr
    assert [c["name"] for c in json.loads(result.stdout)["schema"]] == ["age", "income"]


def test_a_broken_config_file_is_replaced_by_cape_login(shared_cape_server, acme, cape_cli, cape_home) -> None:
    cape_home.parent.mkdir(parents=True, exist_ok=True)
    cape_home.write_text("{")
    result = cape_cli("projects", "list")
    assert one_error_line(result.stderr) == (
        f"error: the config file {cape_home} is not valid JSON; run `cape login --coordinator URL --token TOKEN`, "
        "which replaces it (or delete it)")
    # Given both explicitly, nothing needs the file: the SDK works and `cape login` replaces it.
    assert Cape(endpoint=shared_cape_server.url, token=acme["user_token"]).login()["kind"] == "user"
    assert cape_cli("projects", "list", env=env_of(shared_cape_server, acme["user_token"])).exit_code == 0
    result = cape_cli("login", "--coordinator", shared_cape_server.url, "--token", acme["user_token"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(cape_home.read_text())["token"] == acme["user_token"]
    assert cape_cli("projects", "list").exit_code == 0


def test_errors_say_when_cape_coordinator_overrides_the_saved_login(shared_cape_server, start_cape_server, acme,
                                                                    cape_cli) -> None:
    assert cape_cli("login", "--coordinator", shared_cape_server.url, "--token", acme["user_token"]).exit_code == 0
    other = start_cape_server(name="other")
    result = cape_cli("projects", "list", env={"CAPE_COORDINATOR": other.url})
    assert result.exit_code == 1
    assert one_error_line(result.stderr).endswith(
        "(HTTP 401) (CAPE_COORDINATOR is set in the environment and overrides your saved login)")


def test_watch_waits_out_a_coordinator_that_is_briefly_unreachable(cape_server, relay) -> None:
    world = build_job_world(cape_server, approve=False)
    through = relay(int(cape_server.url.rsplit(":", 1)[1]))
    job_id = world["job"]["id"]
    cape = Path(sys.executable).with_name("cape")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CAPE_")}, "CAPE_COORDINATOR": through.url,
           "CAPE_TOKEN": world["orgs"]["xorg"]["user_token"]}
    watch = subprocess.Popen([str(cape), "jobs", "watch", job_id, "--interval", "0.2", "--timeout", "60"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        through.cut(True)
        time.sleep(1.5)
        through.cut(False)
        time.sleep(1.0)
        ok(world["user"]["xorg"].post(f"/v1/jobs/{job_id}/reject", json={"reason": "not now"}))
        out, err = watch.communicate(timeout=30)
    finally:
        if watch.poll() is None:
            watch.kill()
    assert watch.returncode == 1, (out, err)
    assert "still watching until --timeout" in err and "the coordinator answers again" in err, err
    assert err.strip().splitlines()[-1].startswith(f"error: job {job_id} ended Rejected"), err


def test_a_revoked_own_token_says_how_to_get_another(cape_server, cape_cli) -> None:
    org = cape_server.create_org("acme")
    token = org["user_token"]
    token_id = token.split(",", 1)[0]
    made = cape_cli("tokens", "create", "--description", "spare", "--json", env=env_of(cape_server, token))
    assert made.exit_code == 0, made.stderr
    spare = json.loads(made.stdout)["token"]
    result = cape_cli("orgs", "revoke-token", token_id, env=env_of(cape_server, token))
    assert result.exit_code == 0, result.stderr
    assert result.stderr.startswith("warning: it was the token this command used: log in with another")
    assert cape_cli("whoami", env=env_of(cape_server, spare)).exit_code == 0  # made before: carries on
    refused = cape_cli("projects", "list", env=env_of(cape_server, token))
    assert one_error_line(refused.stderr) == (
        "error: the token was revoked; make another with a token of yours that still works (`cape tokens create`), "
        "or ask the server's operator for one (`cape-server admin create-user-token EMAIL`) (HTTP 401)")
    # Without another token of theirs, the server's operator makes one.
    issued = json.loads(cape_server.admin("create-user-token", "admin@acme.example", "--json"))
    assert issued["user"]["email"] == "admin@acme.example"
    assert cape_cli("projects", "list", env=env_of(cape_server, issued["token"])).exit_code == 0
    missing = subprocess.run([*cape_server_command(), "admin", "create-user-token", "nobody@acme.example",
                              "--data-dir", str(cape_server.data_dir)], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1
    assert "no user nobody@acme.example; `admin create-user ORGANIZATION nobody@acme.example --role ROLE` makes one" \
        in missing.stderr


def test_results_show_metrics_and_location_when_the_weights_file_is_elsewhere(cape_server, cape_cli) -> None:
    world = build_job_world(cape_server)
    job_id, worker = world["job"]["id"], world["worker"]
    report = f"/v1/worker/jobs/{job_id}/report"
    for label in ("xorg", "yorg", "helper"):
        assert worker[label].post(report, json={"state": "started"}).status_code == 204
    location = f"file:///elsewhere/models/{job_id}/regression_weights.csv"
    assert worker["yorg"].post(report, json={"state": "completed", "model_location": location,
                                             "metrics": {"mse_result": 0.25, "r_squared_result": 0.9999996}}
                               ).status_code == 204
    env = env_of(cape_server, world["orgs"]["yorg"]["user_token"])
    result = cape_cli("jobs", "results", job_id, env=env)
    assert result.exit_code == 1
    assert "mse_result" in result.stdout and "0.25" in result.stdout and location in result.stdout
    assert "r_squared_result: 0.9999996\n" in result.stdout  # in full: six digits showed it as 1
    assert one_error_line(result.stderr) == (
        f"error: the weights were not read: no weights file at {location}; is this the machine (or volume) the "
        "model owner's worker writes to?")
    as_json = cape_cli("jobs", "results", job_id, "--json", env=env)
    assert as_json.exit_code == 1
    shown = json.loads(as_json.stdout)
    assert shown["weights"] is None and shown["metrics"] == {"mse_result": 0.25, "r_squared_result": 0.9999996}
    assert shown["model_location"] == location and shown["weights_error"].startswith("no weights file at")


def test_approving_twice_says_nothing_changed_and_status_shows_what_an_approver_needs(cape_server, cape_cli) -> None:
    world = build_job_world(cape_server, approve=False)
    job_id = world["job"]["id"]
    env = env_of(cape_server, world["orgs"]["xorg"]["user_token"])
    second = world["user"]["yorg"].post("/v1/projects/demo/jobs", json={
        "type": "linear_regression", "x": {"dataview": "xs", "columns": ["a", "b"]},
        "y": {"dataview": "ys", "column": "t"}, "model_owner": "yorg"}).json()["id"]
    owner = env_of(cape_server, world["orgs"]["yorg"]["user_token"])
    assert ("model location: not given: the model owner's worker writes to its CAPE_BUCKET\n"
            in cape_cli("jobs", "status", second, env=owner).stdout)  # "-" read as "no model"
    assert ("model location: the model owner's to know (shown to its members)\n"
            in cape_cli("jobs", "status", second, env=env).stdout)
    first = cape_cli("jobs", "approve", job_id, env=env)
    assert first.stdout.startswith(f"Approved job {job_id}; it is now NeedsApproval (waiting for yorg)")
    again = cape_cli("jobs", "approve", job_id, env=env)
    assert again.stdout == (f"Job {job_id} was already approved for that organization; nothing changed. It is "
                            "NeedsApproval (waiting for yorg).\n")
    status = cape_cli("jobs", "status", job_id, env=env).stdout
    # Where the model owner keeps its models is its own business (as a dataview's uri is its owner's): the data
    # owner approves the use of its data by the model owner, wherever that one writes the model.
    assert "s3://bucket/models" not in status and "model location: the model owner's to know" in status
    assert ("600 s (for the three workers to take the job after approval, and for each message between them: longer "
            f"while its sender says it is still preparing, up to {LIMIT_TIMEOUTS} times)") in status
    assert "admin@yorg.example (yorg)" in status
    assert "WORKER" in status and "offline" in status  # no worker heartbeats here


def test_deleting_a_project_without_a_terminal_asks_for_yes(shared_cape_server, acme, cape_cli,
                                                            unique_label) -> None:
    project, env = unique_label("keep"), env_of(shared_cape_server, acme["user_token"])
    assert cape_cli("projects", "create", project, env=env).exit_code == 0
    result = cape_cli("projects", "delete", project, env=env)
    assert result.exit_code == 1
    assert one_error_line(result.stderr) == (f"error: deleting project {project} needs confirmation and no answer "
                                             "came; answer y, or add --yes")
    assert cape_cli("projects", "show", project, env=env).exit_code == 0


def test_sdk_arguments_of_the_wrong_type_are_named(shared_cape_server, acme) -> None:
    y = DataView(None, {"id": "d", "name": "target", "schema": [{"name": "t", "type": "number"}]})  # type: ignore
    with pytest.raises(BadArgument, match="x_train_dataview must be a DataView .* not str 'features'"):
        VerticallyPartitionedLinearRegression(x_train_dataview="features", y_train_dataview=y,  # type: ignore
                                              model_owner="acme")
    with pytest.raises(BadArgument, match="timeout must be a positive number of seconds, not '600'"):
        VerticallyPartitionedLinearRegression(x_train_dataview=y, y_train_dataview=y, model_owner="acme",
                                              timeout="600")  # type: ignore[arg-type]
    with pytest.raises(BadArgument, match=r"select exactly one y column of dataview 'wide', as dv\[\"COLUMN\"\]"):
        wide = DataView(None, {"id": "w", "name": "wide",  # type: ignore[arg-type]
                               "schema": [{"name": "a", "type": "number"}, {"name": "b", "type": "number"}]})
        VerticallyPartitionedLinearRegression(x_train_dataview=y, y_train_dataview=wide,
                                              model_owner="acme").to_request()


def test_sdk_calls_with_arguments_of_the_wrong_type_raise_bad_argument(shared_cape_server, acme,
                                                                       unique_label) -> None:
    """Each was a plain AttributeError or TypeError, which `except CapeError` in a user's script does not catch."""
    cape = Cape(endpoint=shared_cape_server.url, token=acme["user_token"])
    project = cape.create_project(unique_label("types"))
    view = DataView(None, {"id": "d", "name": "target", "schema": [{"name": "t", "type": "number"}]})  # type: ignore
    with pytest.raises(BadArgument, match="^token must be a string, not int$"):
        Cape(endpoint=shared_cape_server.url, token=123)  # type: ignore[arg-type]
    with pytest.raises(BadArgument, match="submit_job takes a VerticallyPartitionedLinearRegression"):
        project.submit_job({"x": 1})  # type: ignore[arg-type]
    with pytest.raises(BadArgument, match=r"select columns of dataview 'target' by name: .* not int 5"):
        view[5]  # type: ignore[index]
    with pytest.raises(BadArgument, match="status must be a job status"):
        project.list_jobs(status=5)  # type: ignore[arg-type]
    with pytest.raises(BadArgument, match=r"timeout must be a number of seconds \(0: look once\)"):
        cape.get_job  # the job itself is not needed: wait's check comes first
        from services.client.models import Job
        Job(None, {"id": "j", "status": "Started"}).wait(timeout="10")  # type: ignore[arg-type]


def test_cli_submit_says_what_to_type_and_refuses_empty_column_names(shared_cape_server, acme, cape_cli,
                                                                     unique_label) -> None:
    env, project = env_of(shared_cape_server, acme["user_token"]), unique_label("cli")
    assert cape_cli("projects", "create", project, env=env).exit_code == 0
    for name, schema in (("wide", "a,b"), ("target", "t")):
        assert cape_cli("dataviews", "add", project, name, f"s3://b/{name}.csv", "--schema", schema,
                        env=env).exit_code == 0
    submit = ("jobs", "submit", project, "linear-regression", "--model-owner", acme["organization"]["label"])
    y_wide = cape_cli(*submit, "--x", "wide", "--y", "wide", env=env)
    assert one_error_line(y_wide.stderr) == "error: --y takes one column: dataview 'wide' has a, b; give --y wide:COLUMN"
    for x in ("wide:a,,b", "wide:"):
        empty = cape_cli(*submit, "--x", x, "--y", "target", env=env)
        assert one_error_line(empty.stderr) == (
            f"error: --x '{x}' has an empty column name; give DATAVIEW:COL1,COL2 (or DATAVIEW alone for its schema's "
            "columns)")
    from services.client.commands.jobs import _split_spec
    assert _split_spec('wide:"a,b", c', "--x") == ("wide", ["a,b", "c"])  # a column whose name holds a comma
    with pytest.raises(BadArgument, match="quote a name that holds a comma"):
        _split_spec('wide:"a,b', "--x")  # an unclosed quote
    schema = cape_cli("dataviews", "add", project, "gap", "s3://b/g.csv", "--schema", "a:number,,b", env=env)
    assert one_error_line(schema.stderr) == (
        "error: the schema 'a:number,,b' has an empty entry (two commas in a row); give it as name:type,... "
        "(types: number, integer, string)")
    assert [r.exit_code for r in (y_wide, schema)] == [1, 1]


def test_a_user_lists_their_own_tokens_to_find_the_one_to_revoke(shared_cape_server, acme, cape_cli) -> None:
    """The description given to `tokens create` could never be read back: a lost laptop's token id was lost too."""
    env = env_of(shared_cape_server, acme["user_token"])
    made = json.loads(cape_cli("tokens", "create", "--description", "old laptop", "--json", env=env).stdout)
    listed = cape_cli("tokens", "list", env=env)
    assert listed.exit_code == 0, listed.stderr
    in_use = acme["user_token"].split(",")[0]
    rows = {line.split()[0]: line for line in listed.stdout.splitlines()[1:]}
    assert set(rows) == {in_use, made["id"]}
    assert "(this one)" in rows[in_use] and "old laptop" in rows[made["id"]] and "(this one)" not in rows[made["id"]]
    as_json = json.loads(cape_cli("tokens", "list", "--json", env=env).stdout)
    assert [t["id"] for t in as_json] == [in_use, made["id"]] and all("token" not in t for t in as_json)
    assert made["token"].split(",")[1] not in listed.stdout + json.dumps(as_json)
    assert cape_cli("orgs", "revoke-token", made["id"], env=env).exit_code == 0
    assert Cape(endpoint=shared_cape_server.url, token=acme["user_token"]).list_user_tokens()[1]["revoked_at"]
    worker = cape_cli("tokens", "list", env=env_of(shared_cape_server, acme["organization_token"]))
    assert worker.exit_code == 1 and "organization tokens may use only the worker endpoints" in worker.stderr


def test_stopping_or_rejecting_twice_changes_nothing_and_exits_0(cape_server, cape_cli) -> None:
    """Approving twice said "nothing changed" (exit 0), stopping or rejecting twice was a 409 (exit 1): a script that
    stops a job to be sure failed when it had stopped already. The three take --json (the job's view)."""
    world = build_job_world(cape_server, approve=False)
    job_id = world["job"]["id"]
    env = env_of(cape_server, world["orgs"]["xorg"]["user_token"])
    assert cape_cli("jobs", "watch", job_id, "--timeout", "0", env=env).exit_code == 3  # looked once: not ended
    first = cape_cli("jobs", "reject", job_id, "--reason", "not now", env=env)
    assert (first.exit_code, first.stdout) == (0, f"Rejected job {job_id}; it is now Rejected.\n")
    again = cape_cli("jobs", "reject", job_id, env=env)
    assert (again.exit_code, again.stdout) == (0, f"Job {job_id} was already Rejected; nothing changed.\n")
    assert json.loads(cape_cli("jobs", "reject", job_id, "--json", env=env).stdout)["status"] == "Rejected"

    job_id = world["user"]["yorg"].post("/v1/projects/demo/jobs", json={
        "type": "linear_regression", "x": {"dataview": "xs", "columns": ["a", "b"]},
        "y": {"dataview": "ys", "column": "t"}, "model_owner": "yorg"}).json()["id"]
    stopped = cape_cli("jobs", "stop", job_id, "--json", env=env)
    assert stopped.exit_code == 0 and json.loads(stopped.stdout)["status"] == "Stopped"
    again = cape_cli("jobs", "stop", job_id, env=env)
    assert (again.exit_code, again.stdout) == (0, f"Job {job_id} was already Stopped; nothing changed.\n")
    approved = cape_cli("jobs", "approve", job_id, "--json", env=env)
    assert approved.exit_code == 1 and "already ended (Stopped)" in approved.stderr  # no approving an ended job
