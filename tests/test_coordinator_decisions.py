"""Approve and reject decide for one data-owner organization at a time, and never for a job that already ended."""
from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.support.server import Api, CapeServer, ok
from tests.support.server import api_error as refusal


class World:
    """Organizations bank (x data), shop (y data, model owner) and helper, under labels unique on the shared
    server; `both` is one person who is operator in bank and in shop. `job()` submits a fresh job."""

    def __init__(self, server: CapeServer, unique_label: Callable[[str], str]):
        self.server = server
        self.label = {name: unique_label(name) for name in ("bank", "shop", "helper")}
        self.orgs = {name: server.create_org(label) for name, label in self.label.items()}
        self.admin = {name: Api(server, o["user_token"]) for name, o in self.orgs.items()}
        self.worker = {name: Api(server, o["organization_token"]) for name, o in self.orgs.items()}
        email = f"ops@{self.label['bank']}.example"
        server.create_user(self.label["bank"], email, "operator")
        self.both = Api(server, server.create_user(self.label["shop"], email, "operator")["token"])
        scientist = server.create_user(self.label["bank"], f"ds@{self.label['bank']}.example", "data_scientist")
        self.scientist = Api(server, scientist["token"])
        self.project = unique_label("decide")
        bank, shop = self.admin["bank"], self.admin["shop"]
        ok(bank.post("/v1/projects", json={"label": self.project}))
        ok(bank.post(f"/v1/projects/{self.project}/organizations", json={"organization": self.label["shop"]}))
        ok(bank.put(f"/v1/projects/{self.project}/helper", json={"organization": self.label["helper"]}))
        ok(self.admin["helper"].post(f"/v1/projects/{self.project}/organizations/{self.label['helper']}/join"))
        ok(bank.post(f"/v1/projects/{self.project}/dataviews", json={
            "name": "xs", "uri": "file:///data/x.csv", "schema": [{"name": "a", "type": "number"}]}))
        ok(shop.post(f"/v1/projects/{self.project}/dataviews", json={
            "name": "ys", "uri": "file:///data/y.csv", "schema": [{"name": "t", "type": "number"}]}))

    def job(self) -> str:
        return ok(self.admin["bank"].post(f"/v1/projects/{self.project}/jobs", json={
            "type": "linear_regression", "x": {"dataview": "xs", "columns": ["a"]},
            "y": {"dataview": "ys", "column": "t"}, "model_owner": self.label["shop"]}))["id"]

    def approvals(self, job_id: str) -> dict[str, str]:
        return ok(self.admin["bank"].get(f"/v1/jobs/{job_id}"))["approvals"]


@pytest.fixture(scope="module")
def world(shared_cape_server: CapeServer) -> World:
    import uuid
    return World(shared_cape_server, lambda name: f"{name}-{uuid.uuid4().hex[:6]}")


# --- one organization per decision -----------------------------------------------------------------------------

def test_an_operator_of_both_data_owners_must_name_the_organization(world: World) -> None:
    bank, shop = world.label["bank"], world.label["shop"]
    job = world.job()
    for body in ({}, None):
        error = refusal(world.both.post(f"/v1/jobs/{job}/approve", json=body), 422)
        assert error["message"] == (f"field 'organization': you may approve for several data owners of this job "
                                    f"({bank}, {shop}); name the one you approve for")
    assert world.approvals(job) == {bank: "pending", shop: "pending"}

    first = ok(world.both.post(f"/v1/jobs/{job}/approve", json={"organization": bank}))
    assert first["status"] == "NeedsApproval" and first["approvals"] == {bank: "approved", shop: "pending"}
    shop_id = world.orgs["shop"]["organization"]["id"]  # by id as well as by label
    second = ok(world.both.post(f"/v1/jobs/{job}/approve", json={"organization": shop_id}))
    assert second["status"] == "Approved" and second["approvals"] == {bank: "approved", shop: "approved"}


def test_a_named_organization_must_own_data_of_the_job_and_let_the_caller_decide(world: World) -> None:
    bank, shop, helper = world.label["bank"], world.label["shop"], world.label["helper"]
    job = world.job()
    owners = f"the data owners of this job are {bank}, {shop}"
    assert refusal(world.both.post(f"/v1/jobs/{job}/approve", json={"organization": helper}), 422)["message"] == \
        f"field 'organization': organization '{helper}' owns no data of this job; {owners}"
    assert refusal(world.both.post(f"/v1/jobs/{job}/reject", json={"organization": "no-such-org"}),
                   422)["message"] == f"field 'organization': no organization 'no-such-org'; {owners}"
    assert refusal(world.admin["bank"].post(f"/v1/jobs/{job}/approve", json={"organization": shop}),
                   403)["message"] == \
        f"to approve this job for '{shop}' you need the role admin or operator there (you are not a member of it)"
    assert refusal(world.scientist.post(f"/v1/jobs/{job}/reject", json={"organization": bank}), 403)["message"] == \
        f"to reject this job for '{bank}' you need the role admin or operator there (your role there is " \
        "data_scientist)"
    assert world.approvals(job) == {bank: "pending", shop: "pending"}


def test_a_member_of_one_data_owner_needs_no_body(world: World) -> None:
    bank, shop = world.label["bank"], world.label["shop"]
    job = world.job()
    assert ok(world.admin["bank"].post(f"/v1/jobs/{job}/approve"))["approvals"] == {bank: "approved", shop: "pending"}
    assert ok(world.admin["shop"].post(f"/v1/jobs/{job}/approve", json={"organization": shop}))["status"] == \
        "Approved"


def test_reject_decides_for_the_named_organization_only(world: World) -> None:
    bank, shop = world.label["bank"], world.label["shop"]
    job = world.job()
    error = refusal(world.both.post(f"/v1/jobs/{job}/reject", json={"reason": "not now"}), 422)
    assert error["message"] == (f"field 'organization': you may reject for several data owners of this job "
                                f"({bank}, {shop}); name the one you reject for")
    assert ok(world.admin["bank"].get(f"/v1/jobs/{job}"))["status"] == "NeedsApproval"
    rejected = ok(world.both.post(f"/v1/jobs/{job}/reject", json={"reason": "not now", "organization": shop}))
    assert rejected["status"] == "Rejected" and rejected["error"] == f"rejected by {shop}: not now"
    assert rejected["approvals"] == {bank: "pending", shop: "rejected"}


# --- decisions on jobs that ended --------------------------------------------------------------------------------

def test_approving_an_ended_job_is_a_conflict_even_for_an_organization_that_approved(world: World) -> None:
    bank = world.label["bank"]
    stopped = world.job()
    ok(world.admin["bank"].post(f"/v1/jobs/{stopped}/approve"))
    ok(world.admin["shop"].post(f"/v1/jobs/{stopped}/approve"))
    ok(world.admin["bank"].post(f"/v1/jobs/{stopped}/stop"))
    for api, body in ((world.admin["bank"], None), (world.both, {"organization": bank}), (world.both, None)):
        error = refusal(api.post(f"/v1/jobs/{stopped}/approve", json=body), 409)
        assert error == {"code": "wrong_status", "status": "Stopped",
                         "message": "the job already ended (Stopped); there is nothing to approve"}
    error = refusal(world.admin["shop"].post(f"/v1/jobs/{stopped}/reject"), 409)
    assert error == {"code": "wrong_status", "status": "Stopped",
                     "message": "the job already ended (Stopped); there is nothing to reject"}

    rejected = world.job()
    ok(world.admin["bank"].post(f"/v1/jobs/{rejected}/approve"))
    ok(world.admin["shop"].post(f"/v1/jobs/{rejected}/reject"))
    assert refusal(world.admin["bank"].post(f"/v1/jobs/{rejected}/approve"), 409)["message"] == \
        "the job already ended (Rejected); there is nothing to approve"
    assert refusal(world.admin["shop"].post(f"/v1/jobs/{rejected}/reject"), 409)["message"] == \
        "the job already ended (Rejected); there is nothing to reject"


def test_approving_again_before_the_job_ends_is_a_no_op(world: World) -> None:
    bank, shop = world.label["bank"], world.label["shop"]
    job = world.job()
    ok(world.admin["bank"].post(f"/v1/jobs/{job}/approve"))
    assert ok(world.admin["bank"].post(f"/v1/jobs/{job}/approve"))["status"] == "NeedsApproval"
    ok(world.admin["shop"].post(f"/v1/jobs/{job}/approve"))
    again = ok(world.both.post(f"/v1/jobs/{job}/approve", json={"organization": bank}))
    assert again["status"] == "Approved" and again["approvals"] == {bank: "approved", shop: "approved"}
    for name in ("bank", "shop", "helper"):
        assert world.worker[name].post(f"/v1/worker/jobs/{job}/report", json={"state": "started"}).status_code == 204
    assert ok(world.admin["shop"].post(f"/v1/jobs/{job}/approve"))["status"] == "Started"
    started = refusal(world.admin["shop"].post(f"/v1/jobs/{job}/reject"), 409)
    assert started == {"code": "wrong_status", "status": "Started",
                       "message": "the job is Started; only a job that has not started can be rejected; stop it "
                                  "instead (`cape jobs stop JOB`)"}
