"""Stopping and restarting cape-server on the same data directory keeps everything."""
from __future__ import annotations

import pytest

from tests.support.server import Api, build_job_world


@pytest.mark.parametrize("crash", [False, True], ids=["sigterm", "sigkill"])
def test_restart_keeps_identities_projects_jobs_and_messages(cape_server, crash):
    world = build_job_world(cape_server)
    jid, user, worker, orgs = world["job"]["id"], world["user"], world["worker"], world["orgs"]
    spare = user["xorg"].post("/v1/tokens").json()
    assert user["xorg"].delete(f"/v1/tokens/{spare['id']}").status_code == 204
    assert worker["xorg"].post(f"/v1/worker/jobs/{jid}/report", json={"state": "started"}).status_code == 204
    assert worker["xorg"].put(f"/broker/v1/jobs/{jid}/messages/y_owner/x_owner.r1", data=b"sealed-1").status_code == 201
    assert worker["helper"].put(f"/broker/v1/jobs/{jid}/messages/y_owner/helper.r2", data=b"sealed-2").status_code == 201
    before = {"project": user["xorg"].get("/v1/projects/demo").json(),
              "dataviews": user["xorg"].get("/v1/projects/demo/dataviews").json(),
              "job": user["yorg"].get(f"/v1/jobs/{jid}").json(),
              "worker_job": worker["helper"].get(f"/v1/worker/jobs/{jid}").json(),
              "organizations": user["helper"].get("/v1/organizations").json()}

    cape_server.restart(crash=crash)  # (the port may change: every Api reads server.url per request)

    for label, org in orgs.items():  # every token still works, as the same principal
        assert Api(cape_server, org["user_token"]).post("/v1/login").json()["kind"] == "user"
        assert Api(cape_server, org["organization_token"]).post("/v1/login").json()["organization"]["label"] == label
    assert Api(cape_server, spare["token"]).post("/v1/login").status_code == 401  # revoked stays revoked
    assert user["xorg"].get("/v1/projects/demo").json() == before["project"]
    assert user["xorg"].get("/v1/projects/demo/dataviews").json() == before["dataviews"]
    assert user["yorg"].get(f"/v1/jobs/{jid}").json() == before["job"]
    assert worker["helper"].get(f"/v1/worker/jobs/{jid}").json() == before["worker_job"]
    assert user["helper"].get("/v1/organizations").json() == before["organizations"]
    waiting = worker["yorg"].get(f"/broker/v1/jobs/{jid}/messages").json()
    assert sorted(m["name"] for m in waiting) == ["helper.r2", "x_owner.r1"]
    assert worker["yorg"].get(f"/broker/v1/jobs/{jid}/messages/helper.r2").content == b"sealed-2"
    # The job carries on where it was: the other two start, and it moves to Started.
    for label in ("yorg", "helper"):
        assert worker[label].post(f"/v1/worker/jobs/{jid}/report", json={"state": "started"}).status_code == 204
    assert user["xorg"].get(f"/v1/jobs/{jid}").json()["status"] == "Started"
