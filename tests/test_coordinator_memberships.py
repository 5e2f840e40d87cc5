"""Removing a user from an organization and changing a member's role, against the real cape-server."""
from __future__ import annotations

from typing import Any

import pytest
import requests

from services.client import Cape
from services.client.errors import ApiError
from tests.support.server import Api, CapeServer, ok
from tests.support.server import api_error as error

ROLE_422 = "field 'role': input should be 'admin', 'operator', 'data_scientist' or 'user'"


class Orgs:
    """Organizations `x` (owns project `p`, x data), `y` (y data, model owner) and `h` (helper), labels unique."""

    def __init__(self, server: CapeServer, unique_label: Any):
        self.server = server
        self.label = {name: unique_label(name) for name in ("x", "y", "h")}
        self.created = {name: server.create_org(label) for name, label in self.label.items()}
        self.admin = {name: Api(server, o["user_token"]) for name, o in self.created.items()}
        self.project = unique_label("p")
        ok(self.admin["x"].post("/v1/projects", json={"label": self.project}))
        ok(self.admin["x"].post(f"/v1/projects/{self.project}/organizations", json={"organization": self.label["y"]}))
        ok(self.admin["x"].put(f"/v1/projects/{self.project}/helper", json={"organization": self.label["h"]}))
        ok(self.admin["h"].post(f"/v1/projects/{self.project}/organizations/{self.label['h']}/join"))
        ok(self.admin["y"].post(f"/v1/projects/{self.project}/dataviews", json={
            "name": "ys", "uri": "file:///y.csv", "schema": [{"name": "t", "type": "number"}]}))

    def add(self, org: str, email: str, role: str) -> tuple[Api, dict[str, Any]]:
        """A new member of `org`: (their Api, their user view)."""
        added = ok(self.admin[org].post(f"/v1/organizations/{self.label[org]}/users",
                                        json={"email": email, "role": role}))
        return Api(self.server, added["token"]), added["user"]

    def members(self, org: str) -> dict[str, str]:
        return {u["email"]: u["role"] for u in ok(self.admin[org].get(f"/v1/organizations/{self.label[org]}/users"))}

    def users_path(self, org: str, user: str) -> str:
        return f"/v1/organizations/{self.label[org]}/users/{user}"

    def dataview(self, api: Api, name: str) -> requests.Response:
        """An x dataview, acting for `x` (named: the caller may belong to several organizations)."""
        return api.post(f"/v1/projects/{self.project}/dataviews", json={
            "name": name, "uri": "file:///x.csv", "schema": [{"name": "a", "type": "number"}],
            "organization": self.label["x"]})

    def job(self, api: Api, x_dataview: str) -> requests.Response:
        return api.post(f"/v1/projects/{self.project}/jobs", json={
            "type": "linear_regression", "x": {"dataview": x_dataview, "columns": ["a"]},
            "y": {"dataview": "ys", "column": "t"}, "model_owner": self.label["y"], "organization": self.label["x"]})


@pytest.fixture
def orgs(shared_cape_server: CapeServer, unique_label: Any) -> Orgs:
    return Orgs(shared_cape_server, unique_label)


def test_removed_member_loses_the_orgs_projects_but_keeps_other_orgs_and_jobs(orgs: Orgs) -> None:
    email = f"ds@{orgs.label['x']}.example"
    member, user = orgs.add("x", email, "data_scientist")
    ok(orgs.admin["y"].post(f"/v1/organizations/{orgs.label['y']}/users",
                            json={"email": email, "role": "user", "existing_account": True}))
    ok(orgs.dataview(member, "xs"))
    job = ok(orgs.job(member, "xs"))
    project = f"/v1/projects/{orgs.project}"
    assert member.get(project).status_code == 200
    assert member.get(f"{project}/dataviews").status_code == 200

    removed = orgs.admin["x"].delete(orgs.users_path("x", email))
    assert removed.status_code == 204 and not removed.content
    assert email not in orgs.members("x") and orgs.members("y")[email] == "user"
    roles = ok(member.post("/v1/login"))["roles"]
    assert roles == {orgs.created["y"]["organization"]["id"]: "user"}
    # Still a member of y (a project member) so the project stays readable, but x's powers are gone.
    assert member.get(project).status_code == 200
    assert error(orgs.dataview(member, "xs2"), 403)["message"] == (
        "to add dataviews you need the role admin or data_scientist in the organization (you are not a member of "
        "that organization)")
    # Once out of y too, the project is closed to them exactly as to an outsider.
    assert orgs.admin["y"].delete(orgs.users_path("y", user["id"])).status_code == 204
    outsider = Api(orgs.server, orgs.server.create_org(orgs.label["x"] + "-out")["user_token"])
    for path in (project, f"{project}/dataviews", f"{project}/jobs", f"/v1/jobs/{job['id']}",
                 f"/v1/organizations/{orgs.label['x']}/users"):
        got, expected = member.get(path), outsider.get(path)
        assert got.status_code == expected.status_code == 403, (path, got.text)
        assert got.json()["error"]["message"] == expected.json()["error"]["message"]
    assert ok(member.get("/v1/projects")) == []
    # Their token still authenticates, with no role anywhere; the job they submitted stays.
    assert ok(member.post("/v1/login"))["roles"] == {}
    kept = ok(orgs.admin["x"].get(f"/v1/jobs/{job['id']}"))
    assert kept["status"] == "NeedsApproval" and kept["submitted_by"]["email"] == email
    # Gone means gone: a second removal is a 404.
    assert error(orgs.admin["x"].delete(orgs.users_path("x", email)), 404)["code"] == "member_not_found"
    # Added again, the same user (same id) is a member once more, and their old token carries the new role.
    again = ok(orgs.admin["x"].post(f"/v1/organizations/{orgs.label['x']}/users",
                                    json={"email": email, "role": "operator"}))
    assert again["user"]["id"] == user["id"]
    assert ok(member.post("/v1/login"))["roles"] == {orgs.created["x"]["organization"]["id"]: "operator"}


def test_role_change_takes_effect_at_once(orgs: Orgs) -> None:
    email = f"analyst@{orgs.label['x']}.example"
    member, user = orgs.add("x", email, "user")
    assert orgs.dataview(member, "early").status_code == 403
    ok(orgs.dataview(orgs.admin["x"], "xs"))
    assert orgs.job(member, "xs").status_code == 403

    promoted = orgs.admin["x"].put(orgs.users_path("x", user["id"]), json={"role": "data_scientist"})
    assert promoted.status_code == 200
    assert promoted.json() == {"id": user["id"], "email": email, "role": "data_scientist"}
    assert orgs.members("x")[email] == "data_scientist"
    assert orgs.dataview(member, "mine").status_code == 201
    assert orgs.job(member, "xs").status_code == 201

    # The same role again is a no-op; then demoted (by email), the powers go.
    assert ok(orgs.admin["x"].put(orgs.users_path("x", email), json={"role": "data_scientist"}))["role"] == \
        "data_scientist"
    assert ok(orgs.admin["x"].put(orgs.users_path("x", email), json={"role": "user"}))["role"] == "user"
    assert error(orgs.job(member, "xs"), 403)["message"] == (
        "to submit jobs you need the role admin or data_scientist in the organization (your role there is user)")
    assert orgs.dataview(member, "late").status_code == 403


def test_only_the_orgs_admin_may_remove_or_change_members(orgs: Orgs) -> None:
    target, target_user = orgs.add("x", f"target@{orgs.label['x']}.example", "user")
    callers = {role: orgs.add("x", f"{role}@{orgs.label['x']}.example", role)[0]
               for role in ("operator", "data_scientist", "user")}
    callers["other org's admin"] = orgs.admin["y"]
    callers["x's org token"] = Api(orgs.server, orgs.created["x"]["organization_token"])
    callers["the target itself"] = target
    for name, api in callers.items():
        for response in (api.delete(orgs.users_path("x", target_user["id"])),
                         api.put(orgs.users_path("x", target_user["id"]), json={"role": "admin"})):
            assert response.status_code == 403, (name, response.text)
    assert error(callers["operator"].delete(orgs.users_path("x", target_user["id"])), 403)["message"] == \
        "to remove users you need the role admin in the organization (your role there is operator)"
    assert error(orgs.admin["y"].put(orgs.users_path("x", target_user["id"]), json={"role": "admin"}), 403)[
        "message"] == ("to change users' roles you need the role admin in the organization (you are not a member "
                       "of that organization)")
    # Non-admins learn nothing about who is a member: an unknown user is a 403 for them too.
    assert callers["user"].delete(orgs.users_path("x", "nobody@nowhere.example")).status_code == 403
    assert Api(orgs.server, None).delete(orgs.users_path("x", target_user["id"])).status_code == 401
    assert orgs.members("x")[target_user["email"]] == "user"


def test_an_organization_keeps_its_last_admin(orgs: Orgs) -> None:
    x = orgs.label["x"]
    first = orgs.created["x"]["user"]
    hint = f"first make another member admin (`cape orgs set-role {x} USER admin`)"
    removed = error(orgs.admin["x"].delete(orgs.users_path("x", first["id"])), 409)
    assert removed == {"code": "last_admin", "message": f"cannot remove '{first['email']}': they are the last admin "
                                                        f"of organization '{x}'; {hint}"}
    demoted = error(orgs.admin["x"].put(orgs.users_path("x", first["email"]), json={"role": "operator"}), 409)
    assert demoted == {"code": "last_admin", "message": f"cannot make '{first['email']}' operator: they are the "
                                                        f"last admin of organization '{x}'; {hint}"}
    # Staying admin is fine; with a second admin the first may step down, and the second is then the last.
    assert ok(orgs.admin["x"].put(orgs.users_path("x", first["id"]), json={"role": "admin"}))["role"] == "admin"
    second, second_user = orgs.add("x", f"second@{x}.example", "admin")
    assert ok(second.put(orgs.users_path("x", first["id"]), json={"role": "user"}))["role"] == "user"
    assert error(second.delete(orgs.users_path("x", second_user["email"])), 409)["code"] == "last_admin"
    assert error(second.put(orgs.users_path("x", second_user["id"]), json={"role": "user"}), 409)["code"] == \
        "last_admin"
    # An admin who is not the last may leave, even by removing themselves.
    ok(second.put(orgs.users_path("x", first["id"]), json={"role": "admin"}))
    assert second.delete(orgs.users_path("x", second_user["id"])).status_code == 204
    assert orgs.members("x") == {first["email"]: "admin"}


def test_unknown_member_is_404_and_bad_role_is_422(orgs: Orgs) -> None:
    x = orgs.label["x"]
    y_admin = orgs.created["y"]["user"]
    for ref in ("nobody@nowhere.example", "0123456789abcdef0123456789abcdef", y_admin["email"], y_admin["id"]):
        for response in (orgs.admin["x"].delete(orgs.users_path("x", ref)),
                         orgs.admin["x"].put(orgs.users_path("x", ref), json={"role": "user"})):
            assert error(response, 404) == {
                "code": "member_not_found",
                "message": f"'{ref}' is not a member of organization '{x}'; `cape orgs show {x}` lists its users "
                           "(by email and id)"}
    assert error(orgs.admin["x"].delete(f"/v1/organizations/{x}-none/users/{y_admin['id']}"), 404)["code"] == \
        "organization_not_found"

    member, user = orgs.add("x", f"m@{x}.example", "user")
    path = orgs.users_path("x", user["id"])
    assert error(orgs.admin["x"].put(path, json={"role": "owner"}), 422)["message"] == ROLE_422
    assert error(orgs.admin["x"].put(path, json={}), 422)["message"] == "field 'role': field required"
    assert error(orgs.admin["x"].put(path, json={"role": "user", "email": "a@b.c"}), 422)["message"].startswith(
        "field 'email': ")
    assert orgs.members("x")[user["email"]] == "user"


def test_sdk_remove_user_and_set_role(orgs: Orgs) -> None:
    x = orgs.label["x"]
    cape = Cape(endpoint=orgs.server.url, token=orgs.created["x"]["user_token"])
    organization = cape.get_organization(x)
    user = organization.add_user(f"sdk@{x}.example", "user")["user"]
    assert organization.set_role(user["email"], "operator") == {**user, "role": "operator"}
    assert organization.set_role(user["id"], "data_scientist")["role"] == "data_scientist"
    assert organization.remove_user(user["email"]) is None
    assert user["email"] not in {u["email"] for u in organization.list_users()}
    with pytest.raises(ApiError) as missing:
        organization.remove_user(user["id"])
    assert missing.value.status == 404 and missing.value.code == "member_not_found"
    with pytest.raises(ApiError) as last:
        organization.set_role(orgs.created["x"]["user"]["email"], "user")
    assert last.value.status == 409 and last.value.code == "last_admin"
    with pytest.raises(ApiError) as bad:
        organization.set_role(orgs.created["x"]["user"]["email"], "owner")
    assert bad.value.status == 422 and bad.value.message == ROLE_422


def test_adding_an_existing_user_hands_out_no_credential(shared_cape_server, unique_label) -> None:
    """A user token carries its user's roles in every organization: an admin who adds someone else's user (known
    by email) must not get a token for them, or they would get that user's other organizations too."""
    victim_org = shared_cape_server.create_org(unique_label("victim"))
    other = shared_cape_server.create_org(unique_label("other"))
    victim_email = victim_org["user"]["email"]  # the victim organization's admin
    added = Api(shared_cape_server, other["user_token"]).post(
        f"/v1/organizations/{other['organization']['label']}/users", json={"email": victim_email, "role": "user"})
    assert added.status_code == 201, added.text
    assert added.json()["token"] is None and added.json()["user"]["email"] == victim_email
    assert added.json()["existing_account"] == {  # made with its organization, by the server's operator
        "created_at": added.json()["existing_account"]["created_at"], "made_by": "server_operator",
        "created_by_organization": None}
    # The victim's own token now also carries the new membership; nothing else was issued.
    roles = Api(shared_cape_server, victim_org["user_token"]).post("/v1/login").json()["roles"]
    assert roles == {victim_org["organization"]["id"]: "admin", other["organization"]["id"]: "user"}
    # The server's operator may still issue one (the user lost theirs, say).
    third = shared_cape_server.create_org(unique_label("third"))
    issued = shared_cape_server.create_user(third["organization"]["label"], victim_email, "user")
    assert Api(shared_cape_server, issued["token"]).post("/v1/login").json()["user"]["email"] == victim_email


def test_an_email_is_one_account_whatever_its_case(orgs) -> None:
    """Emails are not verified: an admin who made 'Ann@Y.example' must not get a second account beside
    'ann@y.example', and whoever adds an existing account sees which organization made it (and holds its first
    token), so a squatted email is noticed."""
    _, made = orgs.add("x", f"Ann@{orgs.label['y']}.example", "user")
    added = ok(orgs.admin["y"].post(f"/v1/organizations/{orgs.label['y']}/users", json={
        "email": f"ann@{orgs.label['y']}.EXAMPLE", "role": "operator", "existing_account": True}))
    assert added["token"] is None and added["user"] == {**made, "role": "operator"}
    assert (added["existing_account"]["made_by"], added["existing_account"]["created_by_organization"]) == (
        "organization", orgs.label["x"])
    assert orgs.members("y")[made["email"]] == "operator"
    assert error(orgs.admin["y"].post(f"/v1/organizations/{orgs.label['y']}/users", json={
        "email": made["email"].upper(), "role": "user"}), 409)["message"] == \
        f"'{made['email']}' is already a member of this organization"
    ok(orgs.admin["y"].delete(orgs.users_path("y", made["email"].lower())))  # found whatever the case
    assert made["email"] not in orgs.members("y")


def test_an_account_another_organization_made_is_added_only_when_confirmed(orgs) -> None:
    """Tried as a new user would: x's admin makes an account for y's future admin before y does, so x's admin holds
    its first token. y's admin adding that email must not give x's token y's admin role before y's admin has seen
    who made the account and confirmed it is the person meant."""
    squatter, made = orgs.add("x", f"cfo@{orgs.label['y']}.example", "user")
    ok(orgs.admin["x"].delete(orgs.users_path("x", made["id"])))
    path = f"/v1/organizations/{orgs.label['y']}/users"
    refused = orgs.admin["y"].post(path, json={"email": made["email"], "role": "admin"})
    assert refused.status_code == 409, refused.text
    body = refused.json()["error"]
    assert body["code"] == "existing_account" and body["existing_account"] == {
        "created_at": body["existing_account"]["created_at"], "made_by": "organization",
        "created_by_organization": orgs.label["x"]}
    assert body["message"] == (
        f"'{made['email']}' already has an account, made {body['existing_account']['created_at']} by organization "
        f"{orgs.label['x']}'s admin, who got its first token (emails are not verified); adding it gives that token "
        f"the role admin in {orgs.label['y']} at once. If it is the person you mean (ask them), add it again "
        f"confirming it (`cape orgs add-user {orgs.label['y']} {made['email']} --existing-account`, or "
        '"existing_account": true)')
    assert made["email"] not in orgs.members("y")
    assert ok(squatter.post("/v1/login"))["roles"] == {}
    assert squatter.get(f"/v1/organizations/{orgs.label['y']}/tokens").status_code == 403

    confirmed = ok(orgs.admin["y"].post(path, json={"email": made["email"], "role": "user", "existing_account": True}))
    assert confirmed["token"] is None and orgs.members("y")[made["email"]] == "user"
    # Accounts the server's operator made, or this organization's own admin, need no confirmation.
    ok(orgs.admin["y"].delete(orgs.users_path("y", made["id"])))
    _, own = orgs.add("y", f"own@{orgs.label['y']}.example", "user")
    ok(orgs.admin["y"].delete(orgs.users_path("y", own["id"])))
    assert ok(orgs.admin["y"].post(path, json={"email": own["email"], "role": "user"}))["token"] is None
    operator_made = orgs.created["h"]["user"]["email"]
    assert ok(orgs.admin["y"].post(path, json={"email": operator_made, "role": "user"}))["token"] is None
