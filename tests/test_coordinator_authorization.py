"""The permission table of CONTRACTS.md, walked: every role and token kind against every action."""
from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import requests

from tests.support.server import Api, CapeServer, worker_public_keys

PRINCIPALS = ("admin", "operator", "data_scientist", "user", "org_token", "no_token", "bad_token", "revoked_token",
              "other_admin", "other_worker")
_counter = itertools.count()


def expect(admin: int, operator: int, data_scientist: int, user: int, org_token: int, other_admin: int,
           other_worker: int) -> dict[str, int]:
    """Expected status per principal; missing, bad and revoked tokens are always 401."""
    return {"admin": admin, "operator": operator, "data_scientist": data_scientist, "user": user,
            "org_token": org_token, "other_admin": other_admin, "other_worker": other_worker,
            "no_token": 401, "bad_token": 401, "revoked_token": 401}


def unique(prefix: str) -> str:
    return f"{prefix}{next(_counter)}"


class World:
    """Org `a` (owns project `p`, x data; all four roles), `b` (y data, model owner), `c` (helper), `d` (outsider)."""

    def __init__(self, server: CapeServer):
        self.server = server
        self.orgs = {label: server.create_org(label) for label in "abcd"}
        self.admin = {label: Api(server, o["user_token"]) for label, o in self.orgs.items()}
        self.worker = {label: Api(server, o["organization_token"]) for label, o in self.orgs.items()}
        revoked = self.ok(self.admin["a"].post("/v1/tokens"))
        assert self.admin["a"].delete(f"/v1/tokens/{revoked['id']}").status_code == 204
        roles = {role: server.create_user("a", f"{role}@a.example", role)["token"]
                 for role in ("operator", "data_scientist", "user")}
        self.api = {"admin": self.admin["a"], **{r: Api(server, t) for r, t in roles.items()},
                    "org_token": self.worker["a"], "no_token": Api(server, None),
                    "bad_token": Api(server, self.orgs["a"]["user_token"].split(",")[0] + ",AAAA"),
                    "revoked_token": Api(server, revoked["token"]), "other_admin": self.admin["d"],
                    "other_worker": self.worker["d"]}
        self.ok(self.admin["a"].post("/v1/projects", json={"label": "p"}))
        self.ok(self.admin["a"].post("/v1/projects/p/organizations", json={"organization": "b"}))
        self.ok(self.admin["a"].put("/v1/projects/p/helper", json={"organization": "c"}))
        self.ok(self.admin["c"].post("/v1/projects/p/organizations/c/join"))
        self.xs = self.dataview("a", "xs")
        self.ys = self.dataview("b", "ys")
        for label in "abc":
            assert self.worker[label].put("/v1/worker/keys", json=worker_public_keys()).status_code == 204
        self.completed_job = self.approved_job()
        for label in "cab":
            self.report(label, self.completed_job, {"state": "started"})
        self.report("b", self.completed_job, {"state": "completed",
                                              "metrics": {"mse_result": 1.0, "r_squared_result": 0.5}})
        self.running_job = self.approved_job()

    @staticmethod
    def ok(response: requests.Response) -> Any:
        assert response.status_code < 300, response.text
        return response.json() if response.content else None

    def dataview(self, org: str, name: str | None = None) -> dict[str, Any]:
        return self.ok(self.admin[org].post("/v1/projects/p/dataviews", json={
            "name": name or unique("dv"), "uri": f"file:///{org}.csv",
            "schema": [{"name": "a", "type": "number"}, {"name": "t", "type": "number"}]}))

    def job(self) -> str:
        return self.ok(self.admin["a"].post("/v1/projects/p/jobs", json={
            "type": "linear_regression", "x": {"dataview": "xs", "columns": ["a"]},
            "y": {"dataview": "ys", "column": "t"}, "model_owner": "b"}))["id"]

    def approved_job(self) -> str:
        job_id = self.job()
        for org in "ab":
            self.ok(self.admin[org].post(f"/v1/jobs/{job_id}/approve"))
        return job_id

    def report(self, org: str, job_id: str, body: dict[str, Any]) -> None:
        assert self.worker[org].post(f"/v1/worker/jobs/{job_id}/report", json=body).status_code == 204

    def project(self) -> str:
        return self.ok(self.admin["a"].post("/v1/projects", json={"label": unique("tmp")}))["label"]

    def member(self) -> str:
        """A fresh member of `a` (role user), by id: the target of a removal or role change."""
        return self.ok(self.admin["a"].post("/v1/organizations/a/users",
                                            json={"email": f"{unique('m')}@a.example", "role": "user"}))["user"]["id"]

    def org_token_id(self) -> str:
        return self.ok(self.admin["a"].post("/v1/organizations/a/tokens"))["id"]


Action = Callable[[Api, World], requests.Response]
JOB = {"type": "linear_regression", "x": {"dataview": "xs", "columns": ["a"]}, "y": {"dataview": "ys", "column": "t"},
       "model_owner": "b"}
DV = {"uri": "file:///x.csv", "schema": [{"name": "a", "type": "number"}]}

ACTIONS: list[tuple[str, Action, dict[str, int]]] = [
    ("login", lambda api, w: api.post("/v1/login"), expect(200, 200, 200, 200, 200, 200, 200)),
    ("list organizations", lambda api, w: api.get("/v1/organizations"), expect(200, 200, 200, 200, 403, 200, 403)),
    ("read organization", lambda api, w: api.get("/v1/organizations/a"), expect(200, 200, 200, 200, 403, 200, 403)),
    ("list org users", lambda api, w: api.get("/v1/organizations/a/users"), expect(200, 200, 200, 200, 403, 403, 403)),
    ("show org worker", lambda api, w: api.get("/v1/organizations/a/worker"), expect(200, 200, 200, 200, 403, 403, 403)),
    ("add org user", lambda api, w: api.post("/v1/organizations/a/users",
                                             json={"email": f"{unique('u')}@a.example", "role": "user"}),
     expect(201, 403, 403, 403, 403, 403, 403)),
    ("remove org user", lambda api, w: api.delete(f"/v1/organizations/a/users/{w.member()}"),
     expect(204, 403, 403, 403, 403, 403, 403)),
    ("change org user's role", lambda api, w: api.put(f"/v1/organizations/a/users/{w.member()}",
                                                      json={"role": "operator"}),
     expect(200, 403, 403, 403, 403, 403, 403)),
    ("create org token", lambda api, w: api.post("/v1/organizations/a/tokens", json={"description": "w2"}),
     expect(201, 403, 403, 403, 403, 403, 403)),
    # 404 for a token one may not revoke, as for one that does not exist: token ids cannot be probed.
    ("revoke org token", lambda api, w: api.delete(f"/v1/tokens/{w.org_token_id()}"),
     expect(204, 404, 404, 404, 403, 404, 403)),
    ("create own user token", lambda api, w: api.post("/v1/tokens"), expect(201, 201, 201, 201, 403, 201, 403)),
    ("create project", lambda api, w: api.post("/v1/projects", json={"label": unique("new")}),
     expect(201, 403, 201, 403, 403, 201, 403)),
    ("list projects", lambda api, w: api.get("/v1/projects"), expect(200, 200, 200, 200, 403, 200, 403)),
    ("read project", lambda api, w: api.get("/v1/projects/p"), expect(200, 200, 200, 200, 403, 403, 403)),
    ("add project organization", lambda api, w: api.post("/v1/projects/p/organizations", json={"organization": "c"}),
     expect(200, 403, 200, 403, 403, 403, 403)),
    ("join project for own org", lambda api, w: api.post("/v1/projects/p/organizations/a/join"),
     expect(200, 200, 403, 403, 403, 403, 403)),
    ("join project for another org", lambda api, w: api.post("/v1/projects/p/organizations/b/join"),
     expect(403, 403, 403, 403, 403, 403, 403)),
    # Allowed (then refused: the helper has a seat in jobs that have not ended) or not allowed.
    ("take an organization out of a project", lambda api, w: api.delete("/v1/projects/p/organizations/c"),
     expect(409, 403, 409, 403, 403, 403, 403)),
    ("set project helper", lambda api, w: api.put("/v1/projects/p/helper", json={"organization": "c"}),
     expect(200, 403, 200, 403, 403, 403, 403)),
    ("delete project", lambda api, w: api.delete(f"/v1/projects/{w.project()}"),
     expect(204, 403, 204, 403, 403, 403, 403)),
    ("add dataview", lambda api, w: api.post("/v1/projects/p/dataviews", json={"name": unique("dv"), **DV}),
     expect(201, 403, 201, 403, 403, 403, 403)),
    ("list dataviews", lambda api, w: api.get("/v1/projects/p/dataviews"), expect(200, 200, 200, 200, 403, 403, 403)),
    ("read dataview", lambda api, w: api.get(f"/v1/dataviews/{w.xs['id']}"),
     expect(200, 200, 200, 200, 403, 403, 403)),
    ("delete own org's dataview", lambda api, w: api.delete(f"/v1/dataviews/{w.dataview('a')['id']}"),
     expect(204, 403, 204, 403, 403, 403, 403)),
    ("delete another org's dataview", lambda api, w: api.delete(f"/v1/dataviews/{w.dataview('b')['id']}"),
     expect(403, 403, 403, 403, 403, 403, 403)),
    ("submit job", lambda api, w: api.post("/v1/projects/p/jobs", json=JOB), expect(201, 403, 201, 403, 403, 403, 403)),
    ("list jobs", lambda api, w: api.get("/v1/projects/p/jobs"), expect(200, 200, 200, 200, 403, 403, 403)),
    ("read job", lambda api, w: api.get(f"/v1/jobs/{w.running_job}"), expect(200, 200, 200, 200, 403, 403, 403)),
    ("approve job", lambda api, w: api.post(f"/v1/jobs/{w.job()}/approve"), expect(200, 200, 403, 403, 403, 403, 403)),
    ("reject job", lambda api, w: api.post(f"/v1/jobs/{w.job()}/reject", json={"reason": "no"}),
     expect(200, 200, 403, 403, 403, 403, 403)),
    ("stop job", lambda api, w: api.post(f"/v1/jobs/{w.approved_job()}/stop"),
     expect(200, 200, 200, 403, 403, 403, 403)),
    ("read results (not model owner)", lambda api, w: api.get(f"/v1/jobs/{w.completed_job}/results"),
     expect(403, 403, 403, 403, 403, 403, 403)),
    ("register worker keys", lambda api, w: api.put("/v1/worker/keys", json=worker_public_keys()),
     expect(403, 403, 403, 403, 204, 403, 204)),
    ("heartbeat", lambda api, w: api.post("/v1/worker/heartbeat", json={"version": "1"}),
     expect(403, 403, 403, 403, 204, 403, 204)),
    ("worker job list", lambda api, w: api.get("/v1/worker/jobs"), expect(403, 403, 403, 403, 200, 403, 200)),
    ("worker job detail", lambda api, w: api.get(f"/v1/worker/jobs/{w.running_job}"),
     expect(403, 403, 403, 403, 200, 403, 403)),
    ("worker report", lambda api, w: api.post(f"/v1/worker/jobs/{w.running_job}/report", json={"state": "started"}),
     expect(403, 403, 403, 403, 204, 403, 403)),
    ("broker put", lambda api, w: api.put(f"/broker/v1/jobs/{w.running_job}/messages/y_owner/x_owner.{unique('m')}",
                                          data=b"sealed"), expect(403, 403, 403, 403, 201, 403, 403)),
    ("broker list", lambda api, w: api.get(f"/broker/v1/jobs/{w.running_job}/messages"),
     expect(403, 403, 403, 403, 200, 403, 403)),
    ("broker download", lambda api, w: api.get(f"/broker/v1/jobs/{w.running_job}/messages/nothing"),
     expect(403, 403, 403, 403, 404, 403, 403)),
    ("broker acknowledge", lambda api, w: api.delete(f"/broker/v1/jobs/{w.running_job}/messages/nothing"),
     expect(403, 403, 403, 403, 404, 403, 403)),
]


def test_every_principal_against_every_action(cape_server):
    world = World(cape_server)
    mismatches = []
    for (name, action, expected), principal in itertools.product(ACTIONS, PRINCIPALS):
        response = action(world.api[principal], world)
        if response.status_code != expected[principal]:
            mismatches.append(f"{name} as {principal}: {response.status_code} (expected {expected[principal]}) "
                              f"{response.text[:160]}")
        elif response.status_code >= 400:
            error = response.json()["error"]
            assert error["code"] and error["message"], (name, principal)
    assert not mismatches, "\n".join(mismatches)


def test_results_only_for_model_owner_members(cape_server):
    world = World(cape_server)
    job = world.completed_job
    b_user = Api(cape_server, cape_server.create_user("b", "analyst@b.example", "user")["token"])
    for api in (world.admin["b"], b_user):
        results = api.get(f"/v1/jobs/{job}/results")
        assert results.status_code == 200
        assert results.json()["metrics"] == {"mse_result": 1.0, "r_squared_result": 0.5}
    for api in (world.admin["a"], world.admin["c"], world.admin["d"], world.worker["b"]):
        assert api.get(f"/v1/jobs/{job}/results").status_code == 403
    # The helper sees progress (project member) but not the uri of anyone's dataview.
    dataviews = world.admin["c"].get("/v1/projects/p/dataviews").json()
    assert {d["name"]: d["uri"] for d in dataviews if d["name"] in ("xs", "ys")} == {"xs": None, "ys": None}
    assert world.admin["a"].get(f"/v1/dataviews/{world.xs['id']}").json()["uri"] == "file:///a.csv"
    assert world.admin["a"].get(f"/v1/dataviews/{world.ys['id']}").json()["uri"] is None


def test_tokens_revoke_rules(cape_server):
    world = World(cape_server)
    mine = world.api["user"].post("/v1/tokens").json()
    assert world.api["operator"].delete(f"/v1/tokens/{mine['id']}").status_code == 404  # not theirs: as unknown
    assert world.api["admin"].delete(f"/v1/tokens/{mine['id']}").status_code == 404  # admins revoke org tokens only
    assert Api(cape_server, mine["token"]).post("/v1/login").status_code == 200
    assert world.api["user"].delete(f"/v1/tokens/{mine['id']}").status_code == 204
    assert Api(cape_server, mine["token"]).post("/v1/login").status_code == 401
    assert world.api["user"].delete("/v1/tokens/0123").status_code == 404
    # Revoking the worker's organization token locks the worker out at once, broker included.
    token_id = world.orgs["a"]["organization_token"].split(",")[0]
    assert world.admin["a"].delete(f"/v1/tokens/{token_id}").status_code == 204
    revoked = world.worker["a"].get(f"/broker/v1/jobs/{world.running_job}/messages")
    assert revoked.status_code == 401 and revoked.json()["error"]["code"] == "revoked_token"


def test_an_outsider_reaching_a_project_by_an_id_learns_no_label(cape_server):
    """Project labels are guessable words, ids are not: a 403 names the project as the caller named it."""
    world = World(cape_server)
    outsider = world.admin["d"]
    project_id = world.ok(world.admin["a"].get("/v1/projects/p"))["id"]
    for path in (f"/v1/jobs/{world.completed_job}", f"/v1/dataviews/{world.xs['id']}", f"/v1/projects/{project_id}"):
        refused = outsider.get(path)
        assert refused.status_code == 403 and refused.json()["error"]["message"] == (
            f"none of your organizations is a member of project '{project_id}'"), path
    assert outsider.get("/v1/projects/p").json()["error"]["message"] == \
        "none of your organizations is a member of project 'p'"
