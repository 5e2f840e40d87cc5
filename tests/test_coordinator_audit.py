"""The audit trail an operator reads in the server's log (cape.audit): who changed members, roles, tokens, keys
and deleted things, and requests refused for their token, never with a secret."""
from __future__ import annotations

import logging

import requests

from services.coordinator import audit
from services.coordinator.audit import RefusedTokens
from tests.support.server import Api, build_job_world, worker_public_keys


def test_changes_to_who_may_do_what_are_logged_with_their_actor(cape_server):
    world = build_job_world(cape_server, approve=False)
    admin = world["user"]["xorg"]
    email = "admin@xorg.example"
    added = admin.post("/v1/organizations/xorg/users", json={"email": "ds@xorg.example", "role": "user"}).json()
    user_id = added["user"]["id"]
    assert admin.put(f"/v1/organizations/xorg/users/{user_id}", json={"role": "operator"}).status_code == 200
    token = admin.post("/v1/organizations/xorg/tokens", json={"description": "spare"}).json()
    assert admin.delete(f"/v1/tokens/{token['id']}").status_code == 204
    mine = admin.post("/v1/tokens").json()
    assert admin.delete(f"/v1/organizations/xorg/users/{user_id}").status_code == 204
    assert world["worker"]["xorg"].put("/v1/worker/keys", json=worker_public_keys()).status_code == 204  # new keys
    assert admin.post(f"/v1/jobs/{world['job']['id']}/approve").status_code == 200
    assert admin.post(f"/v1/jobs/{world['job']['id']}/stop").status_code == 200
    assert admin.delete("/v1/projects/demo").status_code == 204
    for attempt in range(3):
        assert requests.post(f"{cape_server.url}/v1/login", headers={"Authorization": f"Bearer nope{attempt},x"},
                             timeout=10).status_code == 401

    log = cape_server.log_path.read_text()
    actor = f"{email} (token {world['orgs']['xorg']['user_token'].split(',')[0]})"
    xorg_id = world["orgs"]["xorg"]["organization"]["id"]
    for line in (f"{actor} added ds@xorg.example to organization xorg as user",
                 f"{actor} made user {user_id} operator in organization xorg",
                 f"{actor} issued organization token {token['id']} for organization xorg",
                 f"{actor} revoked token {token['id']}",
                 f"{actor} issued themselves user token {mine['id']}",
                 f"{actor} removed user {user_id} from organization xorg",
                 f"the worker of organization {xorg_id} (token "
                 f"{world['orgs']['xorg']['organization_token'].split(',')[0]}) replaced its public keys",
                 f"{actor} approved job {world['job']['id']}",
                 f"{actor} stopped job {world['job']['id']}",
                 f"{actor} added organization yorg to project demo",
                 f"{actor} made helper the helper of project demo",
                 f"{actor} deleted project demo",
                 "1 request(s) refused for their token (missing, unknown or revoked) since the last such line: "
                 "127.0.0.1 x1"):  # the first at once; the other two within the minute are added up
        assert f"INFO cape.audit: {line}" in log or f"WARNING cape.audit: {line}" in log, (line, log[-3000:])
    secrets = [t.split(",", 1)[1] for t in (token["token"], mine["token"], added["token"])]
    secrets += [o[k].split(",", 1)[1] for o in world["orgs"].values() for k in ("user_token", "organization_token")]
    assert not any(secret in log for secret in secrets)


def test_refusals_are_added_up_and_said_once_a_minute(monkeypatch, caplog):
    now = [1000.0]
    monkeypatch.setattr(audit.time, "monotonic", lambda: now[0])
    refused = RefusedTokens()
    with caplog.at_level(logging.WARNING, logger="cape.audit"):
        refused.note("10.0.0.5")  # the first after a quiet minute: at once
        for client in ("10.0.0.5", "10.0.0.5", "10.0.0.9"):
            now[0] += 1
            refused.note(client)
        refused.flush()
        assert len(caplog.records) == 1 and caplog.records[0].getMessage().endswith("10.0.0.5 x1")
        now[0] += 60
        refused.flush()  # the server's sweep
        refused.flush()
    assert [r.getMessage().split(": ", 1)[1] for r in caplog.records] == ["10.0.0.5 x1", "10.0.0.5 x2, 10.0.0.9 x1"]
    assert caplog.records[1].getMessage().startswith("3 request(s) refused for their token")


def test_the_brokers_refusals_are_counted_too(cape_server):
    """A worker left with a revoked token knocks at the broker about once a second."""
    refused = Api(cape_server, "nope,x").get("/broker/v1/jobs/feedface/messages")
    assert refused.status_code == 401
    assert ("WARNING cape.audit: 1 request(s) refused for their token (missing, unknown or revoked) since the last "
            "such line: 127.0.0.1 x1") in cape_server.log_path.read_text()


def test_requests_refused_as_not_allowed_are_counted_by_caller_and_code(cape_server):
    """An organization probing others' projects, jobs and tokens (all 403) left no line in the server's log."""
    world = build_job_world(cape_server, approve=False)
    outsider = cape_server.create_org("outsider")
    probe = Api(cape_server, outsider["user_token"])
    assert probe.get("/v1/projects/demo").status_code in (403, 404)
    assert probe.post(f"/v1/jobs/{world['job']['id']}/approve").status_code == 403
    assert probe.get("/v1/organizations/xorg/tokens").status_code == 403
    worker = Api(cape_server, outsider["organization_token"])
    assert worker.get(f"/broker/v1/jobs/{world['job']['id']}/messages").status_code == 403
    log = cape_server.log_path.read_text()
    token_id = outsider["user_token"].split(",")[0]
    said = [line.split("cape.audit: ", 1)[1] for line in log.splitlines()
            if "refused as not allowed to the caller (403)" in line]
    # The first at once; the others within the minute are added up (said by the sweep a minute on, or at stop).
    assert said and said[0].startswith("1 request(s) refused as not allowed to the caller (403) since the last such "
                                       f"line: admin@outsider.example (token {token_id}) "), said
    cape_server.stop()
    said = [line.split("cape.audit: ", 1)[1] for line in cape_server.log_path.read_text().splitlines()
            if "refused as not allowed to the caller (403)" in line]
    assert len(said) == 2 and said[1].startswith("3 request(s) refused as not allowed"), said
    worker_token = outsider["organization_token"].split(",")[0]
    assert f"the worker with token {worker_token} no_seat x1" in said[1]
    secrets = [outsider[k].split(",", 1)[1] for k in ("user_token", "organization_token")]
    assert not any(secret in line for secret in secrets for line in said)


def test_audit_lines_stay_at_a_quiet_log_level_and_counts_are_said_at_stop(start_cape_server):
    server = start_cape_server(extra_args=["--log-level", "warning"])
    org = server.create_org("quiet")
    token = Api(server, org["user_token"]).post("/v1/tokens").json()
    for attempt in range(3):
        assert Api(server, f"nope{attempt},x").post("/v1/login").status_code == 401
    server.stop()
    log = server.log_path.read_text()
    assert f"INFO cape.audit: admin@quiet.example (token {org['user_token'].split(',')[0]}) issued themselves " \
           f"user token {token['id']}" in log
    # The first refusal at once, the two after it when the server stopped (they were lost with the process).
    assert "since the last such line: 127.0.0.1 x1" in log and "since the last such line: 127.0.0.1 x2" in log
