"""The `cape` CLI against the real cape-server: login and config, organizations, projects, dataviews, jobs."""
from __future__ import annotations

import json
import os
import queue
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from services.client import BadArgument, Cape, Job, VerticallyPartitionedLinearRegression
from tests.support.client import one_error_line
from tests.support.server import Api, build_job_world


@pytest.fixture
def orgs(shared_cape_server, unique_label) -> dict[str, dict]:
    return {name: shared_cape_server.create_org(unique_label(name)) for name in ("acme", "globex", "initech")}


def test_login_verifies_then_saves_url_and_token_0600(shared_cape_server, cape_script, cape_home: Path, orgs) -> None:
    token = orgs["acme"]["user_token"]
    result = cape_script("login", "--coordinator", shared_cape_server.url, "--token", token)
    assert result.exit_code == 0, result.stderr
    assert f"Logged in to {shared_cape_server.url} as " in result.stdout
    assert " (user token); saved in " in result.stdout
    assert token not in result.stdout + result.stderr
    assert stat.S_IMODE(cape_home.stat().st_mode) == 0o600
    assert json.loads(cape_home.read_text()) == {"coordinator": shared_cape_server.url, "token": token}

    # Later commands use the saved file, with no variable set.
    whoami = cape_script("whoami", "--json")
    assert whoami.exit_code == 0, whoami.stderr
    identity = json.loads(whoami.stdout)
    assert identity["kind"] == "user"
    assert orgs["acme"]["organization"]["id"] in identity["roles"]
    # Scripts read the roles by label too, without a second request to learn the ids' labels.
    acme = orgs["acme"]["organization"]
    assert {"organization": {"id": acme["id"], "label": acme["label"]}, "role": "admin"} in identity["memberships"]
    text = cape_script("whoami").stdout
    assert f"{acme['label']}: admin" in text and acme["id"] not in text


def test_login_with_a_bad_token_saves_nothing(shared_cape_server, cape_cli, cape_home: Path, orgs) -> None:
    result = cape_cli("login", "--coordinator", shared_cape_server.url, "--token", "bogus,Ym9ndXM=")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and result.stderr.strip().endswith("(HTTP 401)")
    assert not cape_home.exists()


def test_login_prompts_for_the_token_without_echo(shared_cape_server, cape_cli, cape_home: Path, orgs) -> None:
    token = orgs["acme"]["user_token"]
    result = cape_cli("login", "--coordinator", shared_cape_server.url, input=token + "\n")
    assert result.exit_code == 0, result.stderr
    assert token not in result.stdout
    assert json.loads(cape_home.read_text())["token"] == token


def test_environment_overrides_the_saved_login(shared_cape_server, cape_cli, orgs) -> None:
    url = shared_cape_server.url
    assert cape_cli("login", "--coordinator", url, "--token", orgs["acme"]["user_token"]).exit_code == 0
    saved = json.loads(cape_cli("whoami", "--json").stdout)
    override = json.loads(cape_cli("whoami", "--json", env={"CAPE_TOKEN": orgs["globex"]["user_token"]}).stdout)
    assert orgs["acme"]["organization"]["id"] in saved["roles"]
    assert orgs["globex"]["organization"]["id"] in override["roles"]
    refused = cape_cli("whoami", env={"CAPE_COORDINATOR": "http://127.0.0.1:9"})
    assert refused.exit_code == 1
    assert refused.stderr.startswith("error: cannot reach the coordinator at http://127.0.0.1:9 ")


def test_orgs_commands(shared_cape_server, cape_cli, orgs) -> None:
    acme = orgs["acme"]["organization"]["label"]
    op_email = f"op@{acme}.test"
    env = {"CAPE_COORDINATOR": shared_cape_server.url, "CAPE_TOKEN": orgs["acme"]["user_token"]}
    listed = json.loads(cape_cli("orgs", "list", "--json", env=env).stdout)
    assert {o["label"] for o in listed} >= {o["organization"]["label"] for o in orgs.values()}
    table = cape_cli("orgs", "list", env=env).stdout
    assert table.splitlines()[0].split() == ["ID", "LABEL", "NAME"] and acme in table

    added = json.loads(cape_cli("orgs", "add-user", acme, op_email, "--role", "operator", "--json",
                                env=env).stdout)
    assert added["user"]["email"] == op_email and "," in added["token"]
    shown = json.loads(cape_cli("orgs", "show", acme, "--json", env=env).stdout)
    assert {"email": op_email, "role": "operator"}.items() <= next(
        u for u in shown["users"] if u["email"] == op_email).items()

    # The operator's token works; the operator may not create worker tokens (admin only).
    op_env = {**env, "CAPE_TOKEN": added["token"]}
    assert json.loads(cape_cli("whoami", "--json", env=op_env).stdout)["user"]["email"] == op_email
    denied = cape_cli("orgs", "create-token", acme, env=op_env)
    assert denied.exit_code == 1 and denied.stderr.strip().endswith("(HTTP 403)")

    created = cape_cli("orgs", "create-token", acme, "--description", "worker-1", env=env)
    assert created.exit_code == 0, created.stderr
    worker_token = created.stdout.strip().splitlines()[-1]
    worker = Cape(endpoint=shared_cape_server.url, token=worker_token).login()
    assert worker["kind"] == "organization" and worker["organization"]["label"] == acme


def test_orgs_remove_user_and_set_role(shared_cape_server, cape_cli, orgs) -> None:
    acme = orgs["acme"]["organization"]["label"]
    admin_email = orgs["acme"]["user"]["email"]
    email = f"analyst@{acme}.test"
    env = {"CAPE_COORDINATOR": shared_cape_server.url, "CAPE_TOKEN": orgs["acme"]["user_token"]}
    added = json.loads(cape_cli("orgs", "add-user", acme, email, "--json", env=env).stdout)

    promoted = cape_cli("orgs", "set-role", acme, email, "data_scientist", env=env)
    assert (promoted.exit_code, promoted.stdout) == (0, f"{email} is now data_scientist in {acme}.\n")
    as_json = cape_cli("orgs", "set-role", acme, added["user"]["id"], "operator", "--json", env=env)
    assert json.loads(as_json.stdout) == {"id": added["user"]["id"], "email": email, "role": "operator"}

    # Errors: one line each, with the server's message and status; a bad role is a usage error (exit 2).
    member_env = {**env, "CAPE_TOKEN": added["token"]}
    denied = cape_cli("orgs", "remove-user", acme, admin_email, env=member_env)
    assert denied.exit_code == 1 and one_error_line(denied.stderr) == (
        "error: to remove users you need the role admin in the organization (your role there is operator) (HTTP 403)")
    last = cape_cli("orgs", "set-role", acme, admin_email, "user", env=env)
    assert last.exit_code == 1 and one_error_line(last.stderr) == (
        f"error: cannot make '{admin_email}' user: they are the last admin of organization '{acme}'; first make "
        f"another member admin (`cape orgs set-role {acme} USER admin`) (HTTP 409)")
    last = cape_cli("orgs", "remove-user", acme, admin_email, env=env)
    assert last.exit_code == 1 and one_error_line(last.stderr) == (
        f"error: cannot remove '{admin_email}': they are the last admin of organization '{acme}'; first make "
        f"another member admin (`cape orgs set-role {acme} USER admin`) (HTTP 409)")
    bad_role = cape_cli("orgs", "set-role", acme, email, "owner", env=env)
    assert bad_role.exit_code == 2 and "'owner' is not one of" in bad_role.stderr

    removed = cape_cli("orgs", "remove-user", acme, email, env=env)
    assert (removed.exit_code, removed.stdout) == (0, f"Removed {email} from {acme}.\n")
    shown = json.loads(cape_cli("orgs", "show", acme, "--json", env=env).stdout)
    assert email not in {u["email"] for u in shown["users"]}
    gone = cape_cli("orgs", "remove-user", acme, email, "--json", env=env)
    assert gone.exit_code == 1 and one_error_line(gone.stderr) == (
        f"error: '{email}' is not a member of organization '{acme}'; `cape orgs show {acme}` lists its users "
        "(by email and id) (HTTP 404)")
    again = cape_cli("orgs", "add-user", acme, email.upper(), env=env)  # the same account whatever the case
    made = json.loads(cape_cli("whoami", "--json", env=member_env).stdout)
    assert again.stdout.startswith(f"Added {email} to {acme} as user. This email already had an account (made ")
    assert again.stdout.endswith(
        f" by organization {acme}'s admin): its own tokens now work in {acme} too. Emails are not verified: if that "
        f"is not the person you mean, `cape orgs remove-user {acme} {email}`.\n")
    readded = made["user"]
    removed = cape_cli("orgs", "remove-user", acme, readded["id"], "--json", env=env)
    assert removed.exit_code == 0 and json.loads(removed.stdout) == {"organization": acme, "removed": readded["id"]}
    # Another organization's admin adds that account (acme's admin holds its first token) only once confirmed.
    globex = orgs["globex"]["organization"]["label"]
    env_g = {**env, "CAPE_TOKEN": orgs["globex"]["user_token"]}
    refused = cape_cli("orgs", "add-user", globex, email, env=env_g)
    assert refused.exit_code == 1 and f"by organization {acme}'s admin, who got its first token" in refused.stderr
    assert refused.stderr.strip().endswith("(HTTP 409)")
    confirmed = cape_cli("orgs", "add-user", globex, email, "--existing-account", env=env_g)
    assert confirmed.exit_code == 0 and confirmed.stdout.startswith(f"Added {email} to {globex} as user. ")


def test_projects_and_dataviews(shared_cape_server, cape_cli, orgs, unique_label, tmp_path: Path) -> None:
    acme, globex, initech = (orgs[n]["organization"]["label"] for n in ("acme", "globex", "initech"))
    env_a = {"CAPE_COORDINATOR": shared_cape_server.url, "CAPE_TOKEN": orgs["acme"]["user_token"]}
    env_g = {**env_a, "CAPE_TOKEN": orgs["globex"]["user_token"]}
    project = unique_label("proj")

    created = cape_cli("projects", "create", project, "--name", "Joint study", "--description", "d", env=env_a)
    assert created.exit_code == 0, created.stderr
    assert f"Created project {project}." in created.stdout
    cape_cli("projects", "add-org", project, globex, env=env_a)
    cape_cli("projects", "add-org", project, initech, env=env_a)
    cape_cli("projects", "set-helper", project, initech, env=env_a)
    env_i = {**env_a, "CAPE_TOKEN": orgs["initech"]["user_token"]}
    shown = json.loads(cape_cli("projects", "join", project, initech, "--json", env=env_i).stdout)
    assert shown["helper"]["label"] == initech
    assert {o["label"]: o["joined"] for o in shown["organizations"]} == {acme: True, globex: False, initech: True}
    assert sorted(o["label"] for o in shown["organizations"]) == sorted([acme, globex, initech])
    assert [p["label"] for p in json.loads(cape_cli("projects", "list", "--json", env=env_g).stdout)] == [project]
    text = cape_cli("projects", "show", project, env=env_g).stdout
    assert "helper:" in text and initech in text and "Joint study" in text

    csv = tmp_path / "x.csv"
    csv.write_text("age,height,city\n30,1.8,Oslo\n41,1.7,Rome\n")
    added = json.loads(cape_cli("dataviews", "add", project, "people", "s3://acme-data/people.csv",
                                "--schema-from-csv", str(csv), "--json", env=env_a).stdout)
    assert added["schema"] == [{"name": "age", "type": "integer"}, {"name": "height", "type": "number"},
                               {"name": "city", "type": "string"}]
    # Without a schema option the uri itself must be a local CSV: it is read from there.
    local = json.loads(cape_cli("dataviews", "add", project, "local", str(csv), "--json", env=env_a).stdout)
    assert [c["name"] for c in local["schema"]] == ["age", "height", "city"]
    remote = cape_cli("dataviews", "add", project, "remote", "s3://b/k.csv", env=env_a)
    assert remote.exit_code == 1 and "give the schema of dataview 'remote'" in remote.stderr
    given = json.loads(cape_cli("dataviews", "add", project, "labels", "file:///g/y.csv", "--schema", "churned:integer",
                                "--json", env=env_g).stdout)
    assert given["owner"]["label"] == globex

    as_acme = {v["name"]: v for v in json.loads(cape_cli("dataviews", "list", project, "--json", env=env_a).stdout)}
    assert as_acme["people"]["uri"] == "s3://acme-data/people.csv" and as_acme["labels"]["uri"] is None
    table = cape_cli("dataviews", "list", project, env=env_g).stdout
    assert table.splitlines()[0].split() == ["ID", "NAME", "OWNER", "COLUMNS", "URI"]
    assert "s3://acme-data" not in table  # globex never sees acme's uri

    show = cape_cli("dataviews", "show", added["id"], env=env_a).stdout
    assert "schema:" in show and "age:integer, height:number, city:string" in show
    denied = cape_cli("dataviews", "delete", added["id"], env=env_g)
    assert denied.exit_code == 1 and denied.stderr.strip().endswith("(HTTP 403)")
    assert cape_cli("dataviews", "delete", local["id"], env=env_a).exit_code == 0
    remaining = {v["name"] for v in json.loads(cape_cli("dataviews", "list", project, "--json", env=env_a).stdout)}
    assert remaining == {"people", "labels"}

    # Jobs list/submit/reject/stop through the CLI (no workers: the job never starts).
    submitted = json.loads(cape_cli("jobs", "submit", project, "linear-regression", "--x", "people:age,height",
                                    "--y", "labels", "--model-owner", acme, "--json", env=env_a).stdout)
    assert submitted["task"]["x"]["columns"] == ["age", "height"] and submitted["task"]["y"]["column"] == "churned"
    assert submitted["outputs_to"] == "x_owner" and "helper" in submitted["parties"]
    listed = cape_cli("jobs", "list", project, env=env_g).stdout
    assert submitted["id"] in listed and "NeedsApproval" in listed
    rejected = cape_cli("jobs", "reject", submitted["id"], "--reason", "not this quarter", env=env_g)
    assert rejected.exit_code == 0 and "Rejected" in rejected.stdout
    watch = cape_cli("jobs", "watch", submitted["id"], "--interval", "0.1", "--timeout", "5", env=env_a)
    assert watch.exit_code == 1
    assert watch.stderr.startswith(f"error: job {submitted['id']} ended Rejected")

    assert listed.splitlines()[1].split()[1] == "linear_regression"  # the API's name: submit takes it too
    second = json.loads(cape_cli("jobs", "submit", project, "linear_regression", "--x", "people:age",
                                 "--y", "labels:churned", "--model-owner", acme, "--json", env=env_a).stdout)
    only = cape_cli("jobs", "list", project, "--status", "Rejected", "--json", env=env_a)
    assert [job["id"] for job in json.loads(only.stdout)] == [submitted["id"]]
    latest = cape_cli("jobs", "list", project, "--limit", "1", env=env_a)
    assert latest.stdout.splitlines()[1].split()[0] == second["id"] and len(latest.stdout.splitlines()) == 2
    assert latest.stderr.strip() == "(the 1 most recent; there are more: raise --limit, or --limit 0 for every job)"
    every = cape_cli("jobs", "list", project, "--limit", "2", "--json", env=env_a)
    assert len(json.loads(every.stdout)) == 2 and every.stderr == ""  # nothing left out: no note
    timeout = cape_cli("jobs", "watch", second["id"], "--interval", "0.1", "--timeout", "0.3", env=env_a)
    assert timeout.exit_code == 3 and "still NeedsApproval after 0.3 s" in timeout.stderr
    stopped = cape_cli("jobs", "stop", second["id"], env=env_a)
    assert stopped.exit_code == 0 and "Stopped" in stopped.stdout
    # Which of several jobs is which, and why one ended, without a `jobs status` per id.
    table = cape_cli("jobs", "list", project, env=env_a).stdout.splitlines()
    assert "DATA (X / Y)" in table[0] and table[0].rstrip().endswith("ERROR")
    row = next(line for line in table if line.startswith(second["id"]))
    assert "people / labels" in row
    error = json.loads(cape_cli("jobs", "status", second["id"], "--json", env=env_a).stdout)["error"]
    assert (error is None and row.rstrip().endswith("-")) or (error[:20] in row and len(row) < 260), (error, row)
    status = cape_cli("jobs", "status", second["id"], env=env_g).stdout
    assert "status:" in status and "Stopped" in status and "SEAT" in status
    early = cape_cli("jobs", "results", second["id"], env=env_a)
    assert early.exit_code == 1 and early.stderr.strip().endswith("(HTTP 409)")

    missing = cape_cli("jobs", "submit", project, "linear-regression", "--x", "nope", "--y", "labels",
                       "--model-owner", acme, env=env_a)
    assert missing.exit_code == 1
    assert missing.stderr.strip() == (
        f"error: project {project!r} has no dataview named 'nope'; see `cape dataviews list`")

    denied = cape_cli("projects", "delete", project, "--yes", env=env_g)
    assert denied.exit_code == 1 and denied.stderr.strip().endswith("(HTTP 403)")
    deleted = cape_cli("projects", "delete", project, "--yes", env=env_a)
    assert deleted.exit_code == 0, deleted.stderr
    assert json.loads(cape_cli("projects", "list", "--json", env=env_a).stdout) == []


def test_sdk_pycape_shape(shared_cape_server, orgs, unique_label, tmp_path: Path) -> None:
    acme, globex = orgs["acme"], orgs["globex"]
    cape = Cape(endpoint=shared_cape_server.url, token=acme["user_token"])
    assert cape.login()["kind"] == "user"
    project = cape.create_project(unique_label("sdk"), name="SDK", description="pycape-like")
    project.add_org(globex["organization"]["label"])
    project.add_org(orgs["initech"]["organization"]["label"]).set_helper(orgs["initech"]["organization"]["label"])
    assert project.helper["label"] == orgs["initech"]["organization"]["label"]
    assert [o.joined for o in project.organizations] == [True, False, False]
    initech = Cape(endpoint=shared_cape_server.url, token=orgs["initech"]["user_token"])
    assert [o.joined for o in initech.get_project(project.id).join(project.helper["label"]).organizations] == \
        [True, False, True]
    csv = tmp_path / "x.csv"
    csv.write_text("a,b\n1,2\n3,4\n")
    x = project.create_dataview("x", csv.as_uri())
    assert x.column_names == ["a", "b"] and x.uri == csv.as_uri()
    assert [p.label for p in cape.list_projects()] == [project.label]
    assert cape.get_project(project.label) == project

    other = Cape(endpoint=shared_cape_server.url, token=globex["user_token"]).get_project(project.id)
    y = other.create_dataview("y", "s3://globex/y.csv", schema={"t": "number"})
    job = project.submit_job(VerticallyPartitionedLinearRegression(
        x_train_dataview=x[["b"]], y_train_dataview=project.get_dataview("y")["t"],
        model_owner=globex["organization"]["label"], timeout=30))
    assert job.get_status() == "NeedsApproval"
    assert [j.id for j in project.list_jobs()] == [job.id]
    job.approve()
    assert other.list_jobs()[0].get_status() == "NeedsApproval"
    assert other.list_jobs()[0].approve().status == "Approved"
    assert job.stop().status == "Stopped"
    assert {d.name for d in project.list_dataviews()} == {"x", "y"}
    assert y.owner["label"] == globex["organization"]["label"]


def test_watch_and_status_show_a_worker_error(cape_server, cape_script) -> None:
    """A party's error ends the job; `watch` exits 1 naming it and `status` shows the message."""
    world = build_job_world(cape_server)
    job_id = world["job"]["id"]
    assert world["worker"]["xorg"].post(f"/v1/worker/jobs/{job_id}/report", json={
        "state": "error", "progress": 0.1, "message": "column 'b' of /data/x.csv is not numeric at row 7",
    }).status_code == 204
    env = {"CAPE_COORDINATOR": cape_server.url, "CAPE_TOKEN": world["orgs"]["yorg"]["user_token"]}
    watch = cape_script("jobs", "watch", job_id, "--interval", "0.1", "--timeout", "10", env=env)
    assert watch.exit_code == 1
    assert watch.stderr.startswith(f"error: job {job_id} ended Error: ")
    assert "column 'b' of /data/x.csv is not numeric at row 7" in watch.stderr
    assert "x_owner=xorg:error 10%" in watch.stdout
    status = cape_script("jobs", "status", job_id, env=env)
    assert status.exit_code == 0
    assert "not numeric at row 7" in status.stdout and "Error" in status.stdout


def test_dataview_schema_from_a_local_parquet_file(shared_cape_server, cape_cli, orgs, unique_label,
                                                   tmp_path: Path) -> None:
    """A Parquet file gives a schema as a CSV does (CLI and SDK); what cannot be read says why, in each one's terms."""
    env = {"CAPE_COORDINATOR": shared_cape_server.url, "CAPE_TOKEN": orgs["acme"]["user_token"]}
    project = unique_label("pq")
    assert cape_cli("projects", "create", project, env=env).exit_code == 0
    parquet = tmp_path / "x.parquet"
    pq.write_table(pa.table({"age": [30, 41], "height": [1.8, 1.7], "city": ["Oslo", "Rome"]}), parquet)
    expected = [{"name": "age", "type": "integer"}, {"name": "height", "type": "number"},
                {"name": "city", "type": "string"}]

    from_uri = cape_cli("dataviews", "add", project, "pq3", parquet.as_uri(), "--json", env=env)
    assert from_uri.exit_code == 0, from_uri.stderr
    assert json.loads(from_uri.stdout)["schema"] == expected
    for option in ("--schema-from-file", "--schema-from-csv"):  # the older name keeps working
        added = cape_cli("dataviews", "add", project, f"pq{option}", "s3://acme/x.parquet", option, str(parquet),
                         "--json", env=env)
        assert added.exit_code == 0, added.stderr
        assert json.loads(added.stdout)["schema"] == expected

    options = "--schema NAME:TYPE,... or --schema-from-file PATH, a local CSV or Parquet file"
    absent = tmp_path / "absent.parquet"
    missing = cape_cli("dataviews", "add", project, "gone", absent.as_uri(), env=env)
    assert missing.exit_code == 1
    assert one_error_line(missing.stderr) == (
        f"error: give the schema of dataview 'gone' ({options}); {absent} does not exist on this machine")
    remote = cape_cli("dataviews", "add", project, "remote", "s3://b/k.parquet", env=env)
    assert remote.exit_code == 1
    assert one_error_line(remote.stderr) == (
        f"error: give the schema of dataview 'remote' ({options}); s3://b/k.parquet is not a local file")

    sdk = Cape(endpoint=shared_cape_server.url, token=orgs["acme"]["user_token"]).get_project(project)
    assert sdk.create_dataview("csv-kw", "s3://acme/x.parquet", schema_from_csv_path=str(parquet)).schema == expected
    assert sdk.create_dataview("file-kw", "s3://acme/x.parquet", schema_from_file_path=parquet).schema == expected
    with pytest.raises(BadArgument) as info:
        sdk.create_dataview("sdk-remote", "s3://b/k.parquet")
    assert str(info.value) == ("give the schema of dataview 'sdk-remote' (schema=... or schema_from_file_path=..., "
                               "a local CSV or Parquet file); s3://b/k.parquet is not a local file")


def test_ctrl_c_in_watch_stops_watching_not_the_job(shared_cape_server, cape_home: Path, orgs, unique_label) -> None:
    """SIGINT after the first progress line: one line saying the job goes on, exit 130 (not click's Aborted!, 1)."""
    job = _pending_job(shared_cape_server, orgs, unique_label)
    env = {**os.environ, "CAPE_COORDINATOR": shared_cape_server.url, "CAPE_TOKEN": orgs["acme"]["user_token"]}
    script = Path(sys.executable).with_name("cape")
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # an ignored SIGINT would be inherited
    try:
        proc = subprocess.Popen([str(script), "jobs", "watch", job.id, "--interval", "0.2", "--timeout", "60"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
        first = lines.get(timeout=30)
        assert "NeedsApproval" in first, first
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.stderr.read() == (
        f"stopped watching; job {job.id} goes on (cape jobs watch {job.id} to follow it again)\n")
    assert job.get_status() == "NeedsApproval"


def _pending_job(server, orgs: dict[str, dict], unique_label) -> Job:
    """A job of a new project that waits for approval (no worker ever runs it)."""
    acme, globex, initech = (orgs[n]["organization"]["label"] for n in ("acme", "globex", "initech"))
    project = Cape(endpoint=server.url, token=orgs["acme"]["user_token"]).create_project(unique_label("watch"))
    project.add_org(globex).add_org(initech)
    Cape(endpoint=server.url, token=orgs["initech"]["user_token"]).get_project(project.id).join(initech)
    x = project.create_dataview("x", "s3://acme/x.csv", schema="a")
    Cape(endpoint=server.url, token=orgs["globex"]["user_token"]).get_project(project.id).create_dataview(
        "y", "s3://globex/y.csv", schema="t")
    return project.submit_job(VerticallyPartitionedLinearRegression(x, project.get_dataview("y"), initech))


def test_approve_names_the_organization_when_you_may_decide_for_both(start_cape_server, cape_cli) -> None:
    """One person, operator in both data owners: an approval is for one organization, named with --org."""
    world = build_job_world(start_cape_server(), approve=False)
    users = {org: world["user"][org].post(f"/v1/organizations/{org}/users", json={
        "email": "ops@both.example", "role": "operator", "existing_account": org == "yorg"})  # xorg's admin made it
             for org in ("xorg", "yorg")}
    assert [r.status_code for r in users.values()] == [201, 201]
    assert users["yorg"].json()["token"] is None  # one user, one token: it carries both roles
    env = {"CAPE_COORDINATOR": world["user"]["xorg"].server.url, "CAPE_TOKEN": users["xorg"].json()["token"]}
    job = world["job"]["id"]

    result = cape_cli("jobs", "approve", job, env=env)
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == ("error: --org: you may approve for several data owners of this job (xorg, yorg); "
                             "name the one you approve for (HTTP 422)\n")
    result = cape_cli("jobs", "approve", job, "--org", "xorg", env=env)
    assert (result.exit_code, result.stdout) == (0, f"Approved job {job}; it is now NeedsApproval (waiting for "
                                                    "yorg).\n")
    result = cape_cli("jobs", "approve", job, "--org", "yorg", env=env)
    assert (result.exit_code, result.stdout) == (0, f"Approved job {job}; it is now Approved.\n")
    assert cape_cli("jobs", "stop", job, env=env).exit_code == 0
    result = cape_cli("jobs", "approve", job, "--org", "yorg", env=env)
    assert (result.exit_code, result.stderr) == (
        1, "error: the job already ended (Stopped); there is nothing to approve (HTTP 409)\n")


def test_an_older_coordinator_deciding_for_every_organization_is_said(start_cape_server, monkeypatch) -> None:
    """An older coordinator ignores the organization's name and approves for every data owner the caller may decide
    for: `cape jobs approve JOB --org xorg` said it approved, and the job ran on yorg's data nobody approved for it.
    Simulated against the real server by deciding for both organizations, as such a coordinator does."""
    from services.client.errors import CapeError
    from services.client.http import ApiSession

    world = build_job_world(start_cape_server(), approve=False)
    users = {org: world["user"][org].post(f"/v1/organizations/{org}/users", json={
        "email": "ops@both.example", "role": "operator", "existing_account": org == "yorg"})  # xorg's admin made it
             for org in ("xorg", "yorg")}
    post = ApiSession.post

    def older(self, path, json=None):
        if path.endswith("/approve"):
            for org in ("yorg", "xorg"):
                answer = post(self, path, {"organization": org})
            return answer
        return post(self, path, json)

    monkeypatch.setattr(ApiSession, "post", older)
    cape = Cape(endpoint=world["user"]["xorg"].server.url, token=users["xorg"].json()["token"])
    job = cape.get_job(world["job"]["id"])
    with pytest.raises(CapeError) as caught:
        job.approve(org_id="xorg")
    assert str(caught.value) == (
        f"the coordinator at {world['user']['xorg'].server.url} decided (approve) for yorg too, not only for xorg: "
        "it is older than this cape and does not take the organization's name; stop the job (`cape jobs stop`) if "
        "that was not meant, and upgrade cape-server")

    # Another organization deciding in the same instant is no older coordinator: no alarm.
    def meanwhile(self, path, json=None):
        if path.endswith("/approve"):
            world["user"]["yorg"].post(path, json={"organization": "yorg"})  # yorg's own admin, at that moment
        return post(self, path, json)

    monkeypatch.setattr(ApiSession, "post", meanwhile)
    other = Cape(endpoint=world["user"]["xorg"].server.url, token=world["orgs"]["xorg"]["user_token"])
    second = other.get_project("demo").submit_job(VerticallyPartitionedLinearRegression(
        other.get_project("demo").get_dataview("xs"), other.get_project("demo").get_dataview("ys"), "yorg"))
    assert second.approve(org_id="xorg").data["status"] == "Approved"


def test_dataview_mistakes_show_when_it_is_added(shared_cape_server, cape_cli, unique_label, tmp_path,
                                                 monkeypatch) -> None:
    """A relative path (read from the worker's own directory, not this one) and a schema naming a column the local
    file lacks are refused at `add`, not as a job Error after every data owner approved."""
    org = shared_cape_server.create_org(unique_label("dv"))
    env = {"CAPE_COORDINATOR": shared_cape_server.url, "CAPE_TOKEN": org["user_token"]}
    project = unique_label("dvp")
    assert cape_cli("projects", "create", project, env=env).exit_code == 0
    (tmp_path / "y.csv").write_text("spend,visits\n1.5,3\n2.5,4\n")
    monkeypatch.chdir(tmp_path)

    relative = cape_cli("dataviews", "add", project, "rel", "y.csv", env=env)
    assert (relative.exit_code, one_error_line(relative.stderr)) == (
        1, "error: field 'uri': 'y.csv' is a relative path; give the file's absolute path on the owner's worker "
           "(starting with /), a file:///absolute/path or an s3://bucket/key uri (HTTP 422)")
    uri = str(tmp_path / "y.csv")
    typo = cape_cli("dataviews", "add", project, "typo", uri, "--schema", "spnd:number", env=env)
    assert (typo.exit_code, one_error_line(typo.stderr)) == (
        1, f"error: {uri} has no column 'spnd' (its columns: spend, visits); fix the schema, or leave it out to "
           "read it from the file")
    good = cape_cli("dataviews", "add", project, "good", uri, "--schema", "spend:number", "--json", env=env)
    assert good.exit_code == 0, good.stderr
    remote = cape_cli("dataviews", "add", project, "remote", "s3://b/y.csv", "--schema", "spnd:number", env=env)
    assert remote.exit_code == 0, remote.stderr  # not on this machine: the worker checks when it runs


def test_watch_lines_say_what_a_job_waits_for() -> None:
    """Whose approval is missing, and which seat's worker is silent, rather than a quiet wait until the timeout."""
    from services.client.commands.jobs import _progress_line

    def party(label: str, state: str, online: bool) -> dict:
        return {"organization": {"id": label, "label": label}, "state": state, "progress": 0.0, "message": None,
                "worker_online": online}

    seats = {"x_owner": party("bank", "pending", True), "y_owner": party("shop", "pending", True),
             "helper": party("neutral", "pending", False)}
    waiting = Job(None, {"id": "j", "status": "NeedsApproval", "parties": seats,  # type: ignore[arg-type]
                         "approvals": {"bank": "approved", "shop": "pending"}})
    assert _progress_line(waiting) == (
        "NeedsApproval x_owner=bank:pending 0%  y_owner=shop:pending 0%  helper=neutral:pending 0% [worker offline]"
        "  (approval waits for shop)")
    started = Job(None, {"id": "j", "status": "Started", "approvals": {},  # type: ignore[arg-type]
                         "parties": {**seats, "x_owner": party("bank", "completed", False)}})
    assert _progress_line(started).endswith("x_owner=bank:completed 0%  y_owner=shop:pending 0%  "
                                            "helper=neutral:pending 0% [worker offline]")
    ended = Job(None, {"id": "j", "status": "Stopped", "parties": seats, "approvals": {}})  # type: ignore[arg-type]
    assert "offline" not in _progress_line(ended)


def test_an_admin_revokes_a_leaked_worker_token(shared_cape_server, cape_cli, unique_label) -> None:
    org = shared_cape_server.create_org(unique_label("leak"))
    env = {"CAPE_COORDINATOR": shared_cape_server.url, "CAPE_TOKEN": org["user_token"]}
    leaked = org["organization_token"]
    worker = Api(shared_cape_server, leaked)
    assert worker.get("/v1/worker/jobs").status_code == 200
    result = cape_cli("orgs", "revoke-token", leaked, env=env)  # the whole token: only its id goes out
    token_id, secret = leaked.split(",", 1)
    assert (result.exit_code, result.stdout) == (0, f"Revoked token {token_id}; whoever uses it (a worker's "
                                                    "CAPE_TOKEN, a person's login) is refused from now on.\n")
    assert result.stderr == ""  # not the token this command used
    assert secret not in result.stdout + result.stderr
    assert worker.get("/v1/worker/jobs").status_code == 401

    # The admin finds which id to revoke: every worker token of the organization, secrets never shown.
    label = org["organization"]["label"]
    spare = cape_cli("orgs", "create-token", label, "--description", "spare host", "--json", env=env)
    spare_id = json.loads(spare.stdout)["id"]
    listed = json.loads(cape_cli("orgs", "tokens", label, "--json", env=env).stdout)
    assert [(t["id"], t["description"], t["revoked_at"] is not None) for t in listed] == [
        (token_id, "created with the organization", True), (spare_id, "spare host", False)]
    # The worker's token was used (so it is the one a worker holds); the spare never was.
    assert listed[0]["last_used_at"].startswith("20") and listed[1]["last_used_at"] is None
    table = cape_cli("orgs", "tokens", label, env=env).stdout.splitlines()
    assert table[0].split() == ["ID", "DESCRIPTION", "CREATED", "LAST", "USED", "REVOKED"]
    assert table[2].startswith(f"{spare_id}  spare host") and table[2].split()[-2:] == ["-", "-"]
    assert secret not in "\n".join(table) and "secret" not in listed[0]
    operator = Api(shared_cape_server, org["user_token"]).post(f"/v1/organizations/{label}/users", json={
        "email": "op@leak.example", "role": "operator"}).json()["token"]
    assert Api(shared_cape_server, operator).get(f"/v1/organizations/{label}/tokens").json()["error"]["message"] == (
        "to see organization tokens you need the role admin in the organization (your role there is operator)")
    other = shared_cape_server.create_org(unique_label("other"))
    other_id = other["organization_token"].split(",")[0]
    # Someone else's token and an id that does not exist get one answer: ids cannot be probed.
    for token_id in (other_id, "f" * 32):
        refused = cape_cli("orgs", "revoke-token", token_id, env=env)
        assert (refused.exit_code, one_error_line(refused.stderr)) == (
            1, f"error: no token '{token_id}' that you may revoke (your own user tokens, and the organization tokens "
               "of organizations you administer) (HTTP 404)")


def test_adding_an_organization_says_joining_concerns_the_third_seat_only(shared_cape_server, cape_cli, orgs,
                                                                          unique_label) -> None:
    """A data owner need not join (it approves each job that uses its data): the note on adding one said its worker
    took "no seat in its jobs" until it joined, and its admin joined for nothing, or thought its jobs could not run."""
    acme, globex = (orgs[n]["organization"]["label"] for n in ("acme", "globex"))
    env = {"CAPE_COORDINATOR": shared_cape_server.url, "CAPE_TOKEN": orgs["acme"]["user_token"]}
    project = unique_label("note")
    assert cape_cli("projects", "create", project, env=env).exit_code == 0
    added = cape_cli("projects", "add-org", project, globex, env=env)
    assert added.exit_code == 0, added.stderr
    assert added.stderr == (f"{globex} has not joined {project}: its worker takes no third seat in its jobs (the "
                            "helper's, or a model owner's that owns none of the job's data) until one of its admins or "
                            f"operators runs `cape projects join {project} {globex}` (a data owner need not join).\n")
