"""An organization added to a project by another gives its worker's seat only once it joined the project."""
from __future__ import annotations

from typing import Any

from services.coordinator.projects import has_joined
from tests.support.server import Api, CapeServer, database_from_before, ok
from tests.support.server import api_error as error

JOB = {"type": "linear_regression", "x": {"dataview": "xs", "columns": ["a"]}, "y": {"dataview": "ys", "column": "t"},
       "timeout": 600}


class Orgs:
    """`x` owns project `p` and the x data, `y` the y data, `m` a would-be model owner or helper; labels unique."""

    def __init__(self, server: CapeServer, unique_label: Any):
        self.label = {name: unique_label(name) for name in "xym"}
        created = {name: server.create_org(label) for name, label in self.label.items()}
        self.admin = {name: Api(server, o["user_token"]) for name, o in created.items()}
        self.project = unique_label("p")
        ok(self.admin["x"].post("/v1/projects", json={"label": self.project}))
        ok(self.admin["x"].post(f"/v1/projects/{self.project}/organizations", json={"organization": self.label["y"]}))
        ok(self.admin["x"].post(f"/v1/projects/{self.project}/dataviews", json={
            "name": "xs", "uri": "file:///x.csv", "schema": [{"name": "a", "type": "number"}]}))
        ok(self.admin["y"].post(f"/v1/projects/{self.project}/dataviews", json={
            "name": "ys", "uri": "file:///y.csv", "schema": [{"name": "t", "type": "number"}]}))

    def joined(self) -> dict[str, bool]:
        project = ok(self.admin["x"].get(f"/v1/projects/{self.project}"))
        return {org["label"]: org["joined"] for org in project["organizations"]}

    def join(self, name: str, as_: str | None = None):
        return self.admin[as_ or name].post(f"/v1/projects/{self.project}/organizations/{self.label[name]}/join")


def test_a_helper_that_has_not_joined_takes_no_seat_until_its_admin_joins(shared_cape_server, unique_label):
    o = Orgs(shared_cape_server, unique_label)
    ok(o.admin["x"].put(f"/v1/projects/{o.project}/helper", json={"organization": o.label["m"]}))
    assert o.joined() == {o.label["x"]: True, o.label["y"]: False, o.label["m"]: False}
    refused = error(o.admin["y"].post(f"/v1/projects/{o.project}/jobs", json={**JOB, "model_owner": o.label["y"]}),
                    409)
    assert refused == {"code": "not_joined", "message": (
        f"organization '{o.label['m']}', the project's helper, has not joined project '{o.project}', so its worker "
        f"takes no seat in its jobs: one of its admins or operators runs `cape projects join {o.project} "
        f"{o.label['m']}` (`POST /v1/projects/{{project}}/organizations/{{org}}/join`)")}
    assert error(o.join("m", as_="x"), 403)["code"] == "forbidden"  # the owner cannot join for it
    joined = ok(o.join("m"))
    assert {org["label"]: org["joined"] for org in joined["organizations"]}[o.label["m"]] is True
    ok(o.join("m"))  # again: no change, no error
    job = ok(o.admin["y"].post(f"/v1/projects/{o.project}/jobs", json={**JOB, "model_owner": o.label["y"]}))
    assert job["parties"]["helper"]["organization"]["label"] == o.label["m"]


def test_a_model_owner_without_data_joins_unless_it_submits_itself(shared_cape_server, unique_label):
    o = Orgs(shared_cape_server, unique_label)
    ok(o.admin["x"].post(f"/v1/projects/{o.project}/organizations", json={"organization": o.label["m"]}))
    refused = error(o.admin["x"].post(f"/v1/projects/{o.project}/jobs", json={**JOB, "model_owner": o.label["m"]}),
                    409)
    assert refused["message"].startswith(f"organization '{o.label['m']}', the model owner, has not joined project")
    # Its own member submitting names it model owner: that is its agreement.
    ok(o.admin["m"].post(f"/v1/projects/{o.project}/jobs", json={**JOB, "model_owner": o.label["m"]}))
    assert o.joined()[o.label["m"]] is False


def test_someone_who_may_join_for_the_added_organization_joins_it_by_adding_it(shared_cape_server, unique_label):
    """An admin of both the owner and the added organization consents for it as they add it; an operator of the
    added one joins for it too, a data scientist cannot."""
    o = Orgs(shared_cape_server, unique_label)
    both = Api(shared_cape_server, shared_cape_server.create_user(o.label["x"], f"both@{o.label['x']}.example",
                                                                  "admin")["token"])
    shared_cape_server.create_user(o.label["m"], f"both@{o.label['x']}.example", "admin")
    ok(both.put(f"/v1/projects/{o.project}/helper", json={"organization": o.label["m"]}))
    assert o.joined()[o.label["m"]] is True
    operator = Api(shared_cape_server, shared_cape_server.create_user(o.label["y"], f"ops@{o.label['y']}.example",
                                                                      "operator")["token"])
    scientist = Api(shared_cape_server, shared_cape_server.create_user(
        o.label["y"], f"ds@{o.label['y']}.example", "data_scientist")["token"])
    path = f"/v1/projects/{o.project}/organizations/{o.label['y']}/join"
    assert error(scientist.post(path), 403)["message"].startswith("to join a project for an organization you need")
    assert o.joined()[o.label["y"]] is False
    ok(operator.post(path))
    assert o.joined()[o.label["y"]] is True


def test_joining_a_project_the_organization_is_not_in_is_refused(shared_cape_server, unique_label):
    o = Orgs(shared_cape_server, unique_label)
    shared_cape_server.create_user(o.label["m"], f"admin@{o.label['x']}.example", "admin")  # x's admin, m's too
    refused = error(o.join("m", as_="x"), 409)
    assert refused == {"code": "not_a_member", "message": (
        f"organization '{o.label['m']}' is not a member of project '{o.project}': an admin or data_scientist of the "
        "project's owner organization adds it first (`cape projects add-org`)")}


def test_members_of_a_database_from_before_joining_have_joined(tmp_path):
    """Projects that ran jobs before an upgrade go on as they were: their members took seats as they were added."""
    db = database_from_before(tmp_path, (
        "CREATE TABLE project_organizations (project_id TEXT NOT NULL, org_id TEXT NOT NULL, added_at TEXT NOT NULL,"
        " PRIMARY KEY (project_id, org_id));"
        "INSERT INTO project_organizations VALUES ('p1', 'o1', '2026-01-01T00:00:00.000Z');"))
    try:
        with db.transaction() as conn:
            assert has_joined(conn, "p1", "o1")
            conn.execute("INSERT INTO project_organizations (project_id, org_id, added_at) VALUES ('p1', 'o2', 'x')")
            assert not has_joined(conn, "p1", "o2")  # the upgrade does not join members added after it
    finally:
        db.close()


def test_an_organization_leaves_or_is_taken_out_with_its_dataviews_but_not_mid_job(shared_cape_server, unique_label):
    """An organization added without being asked had no way out. It leaves (its admin or operator), or the owner
    takes it out; its dataviews there go with it, and it stops being the helper. Not the owner, and not while a
    job that has not ended gives it a seat."""
    o = Orgs(shared_cape_server, unique_label)
    p = o.project
    ok(o.admin["x"].put(f"/v1/projects/{p}/helper", json={"organization": o.label["m"]}))
    ok(o.join("m"))
    ok(o.admin["m"].post(f"/v1/projects/{p}/dataviews", json={
        "name": "ms", "uri": "file:///m.csv", "schema": [{"name": "z", "type": "number"}]}))
    job = ok(o.admin["y"].post(f"/v1/projects/{p}/jobs", json={**JOB, "model_owner": o.label["y"]}))
    leave = f"/v1/projects/{p}/organizations/{o.label['m']}"
    refused = error(o.admin["m"].delete(leave), 409)
    assert refused["code"] == "active_jobs" and refused["message"].startswith(
        f"organization '{o.label['m']}' has a seat in 1 job that has not ended: {job['id']} (NeedsApproval); stop")
    ok(o.admin["y"].post(f"/v1/jobs/{job['id']}/stop"))
    assert error(o.admin["y"].delete(leave), 403)["message"].startswith(
        "to take an organization out of a project you need the role admin or operator in it")
    assert o.admin["m"].delete(leave).status_code == 204
    project = ok(o.admin["x"].get(f"/v1/projects/{p}"))
    assert project["helper"] is None and o.label["m"] not in [org["label"] for org in project["organizations"]]
    assert [d["name"] for d in ok(o.admin["x"].get(f"/v1/projects/{p}/dataviews"))] == ["xs", "ys"]
    assert error(o.admin["m"].get(f"/v1/projects/{p}"), 403)["code"] == "forbidden"
    # The owner takes a member out; it cannot leave its own project.
    taken = f"/v1/projects/{p}/organizations/{o.label['y']}"
    assert o.admin["x"].delete(taken).status_code == 204
    assert error(o.admin["x"].delete(taken), 409) == {
        "code": "not_a_member", "message": f"organization '{o.label['y']}' is not a member of project '{p}'"}
    assert error(o.admin["x"].delete(f"/v1/projects/{p}/organizations/{o.label['x']}"), 409) == {
        "code": "owner_cannot_leave", "message": f"organization '{o.label['x']}' owns project '{p}' and cannot leave "
                                                 "it; delete the project instead (`cape projects delete`)"}
