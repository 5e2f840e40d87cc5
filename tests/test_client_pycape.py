"""pycape's calls, as its README, docs and example write them, against the real cape-server.

pycape (Cape Privacy's SDK) names things its own way: ``get_project(id=...)``, ``create_dataview(owner_label=...)``,
``[{"name", "schema_type"}]`` schemas, ``project.dataviews``, ``submit_job(job, timeout=60)``,
``job.approve(org_id=...)``. These tests run those calls unchanged but for the endpoint and token.
"""
from __future__ import annotations

import json
import types

import numpy as np
import pytest

from services.client import BadArgument, Cape, VerticallyPartitionedLinearRegression
from services.client.errors import ApiError
from services.client.schema import normalise_schema
from tests.support.server import Api, worker_public_keys

WEIGHTS = np.array([0.5, -1.25, 3.0])
METRICS = {"mse_result": 0.25, "r_squared_result": 0.75}


@pytest.fixture
def world(shared_cape_server, unique_label) -> dict:
    """Organizations bank (x data), shop (y data, model owner) and neutral (helper) in one project."""
    orgs = {name: shared_cape_server.create_org(unique_label(name)) for name in ("bank", "shop", "neutral")}
    label = {name: o["organization"]["label"] for name, o in orgs.items()}
    bank = Cape(endpoint=shared_cape_server.url, token=orgs["bank"]["user_token"])
    project = bank.create_project(unique_label("lr")).add_org(label["shop"]).add_org(label["neutral"])
    project.set_helper(label["neutral"])
    Cape(endpoint=shared_cape_server.url, token=orgs["neutral"]["user_token"]).get_project(project.id).join(
        label["neutral"])
    return {"orgs": orgs, "label": label, "project": project.refresh()}


def pycape(server, token: str) -> Cape:
    """As pycape's example logs in: ``Cape(endpoint=...)`` then ``login(token=...)``."""
    c = Cape(endpoint=server.url)
    c.login(token=token)
    return c


def test_projects_as_pycape_gets_creates_and_deletes_them(shared_cape_server, world, cape_home) -> None:
    c = pycape(shared_cape_server, world["orgs"]["bank"]["user_token"])
    project = world["project"]
    assert c.get_project(id=project.id) == project
    assert c.get_project(label=project.label) == project
    assert c.get_project(project.id) == project
    with pytest.raises(BadArgument, match="exactly one of"):
        c.get_project(id=project.id, label=project.label)

    # pycape's project.organizations entries have .id, .label and .name; ours stay dicts as well.
    orgs = c.get_project(id=project.id).organizations
    assert [o.label for o in orgs] == [world["label"][n] for n in ("bank", "shop", "neutral")]
    bank_org = world["orgs"]["bank"]["organization"]
    assert orgs[0] == {"id": bank_org["id"], "label": world["label"]["bank"], "name": bank_org["name"], "joined": True}
    assert (orgs[0].id, orgs[0].name) == (orgs[0]["id"], bank_org["name"])
    with pytest.raises(AttributeError, match="has no 'email'; it has id, label, name, joined"):
        orgs[0].email

    bank_id = world["orgs"]["bank"]["organization"]["id"]
    name = f"My Project {project.label}"
    made = c.create_project(name=name, owner=bank_id, description="Linear Regression model")
    assert (made.label, made.name, made.description) == (f"my-project-{project.label}", name,
                                                          "Linear Regression model")
    assert made.data["owner"]["id"] == bank_id
    with pytest.raises(BadArgument, match="not both"):
        c.create_project("x", organization=world["label"]["bank"], owner=world["label"]["shop"])
    c.delete_project(id=made.id)
    assert made.label not in [p.label for p in c.list_projects()]


def test_dataviews_as_pycape_creates_finds_and_deletes_them(shared_cape_server, world, cape_home) -> None:
    orgs, label = world["orgs"], world["label"]
    project = pycape(shared_cape_server, orgs["bank"]["user_token"]).get_project(id=world["project"].id)
    x = project.create_dataview(name="bank-data", uri="s3://bank/x.csv", owner_label=label["bank"], schema=[
        {"name": "x_1", "schema_type": "number"}, {"name": "x_2", "schema_type": "integer"},
        {"name": "note", "schema_type": "string"}])
    # The types are kept (a `schema_type` used to be read as a number).
    assert x.schema == [{"name": "x_1", "type": "number"}, {"name": "x_2", "type": "integer"},
                        {"name": "note", "type": "string"}]
    shop = pycape(shared_cape_server, orgs["shop"]["user_token"]).get_project(id=project.id)
    shop_org = next(o for o in shop.organizations if o.label == label["shop"])
    y = shop.create_dataview(name="shop-data", owner_id=shop_org.id, uri="s3://shop/y.csv",
                             schema={"y": np.dtype("float64")})
    assert y.owner["id"] == shop_org.id and y.schema == [{"name": "y", "type": "number"}]
    with pytest.raises(BadArgument, match="organization once"):
        project.create_dataview("z", "s3://bank/z.csv", schema="z", owner_label=label["bank"], owner_id=shop_org.id)

    assert [d.name for d in project.dataviews] == ["bank-data", "shop-data"]
    assert project.get_dataview(id=x.id) == x
    assert project.get_dataview(uri="s3://bank/x.csv") == x
    assert project.get_dataview(uri="s3://bank/x.csv").location == "s3://bank/x.csv"
    with pytest.raises(BadArgument, match="only your own organization's dataviews show their uri"):
        project.get_dataview(uri="s3://shop/y.csv")  # another organization's
    assert project.get_dataview(id=y.id).location is None

    project.delete_dataview(id=x.id)
    assert [d.name for d in project.list_dataviews()] == ["shop-data"]


def test_job_as_pycape_submits_approves_per_org_and_gets_results(shared_cape_server, world, cape_home,
                                                                 tmp_path) -> None:
    orgs, label = world["orgs"], world["label"]
    bank = pycape(shared_cape_server, orgs["bank"]["user_token"])
    shop = pycape(shared_cape_server, orgs["shop"]["user_token"])
    project = bank.get_project(id=world["project"].id)
    project.create_dataview(name="bank-data", uri="s3://bank/x.csv", owner_label=label["bank"],
                            schema=[{"name": "x_1", "schema_type": "number"}, {"name": "x_2", "schema_type": "number"}])
    shop.get_project(id=project.id).create_dataview(name="shop-data", uri="s3://shop/y.csv", owner_label=label["shop"],
                                                   schema=[{"name": "y", "schema_type": "number"}])

    dataviews = project.dataviews
    vlr = VerticallyPartitionedLinearRegression(
        x_train_dataview=dataviews[0]["x_1", "x_2"], y_train_dataview=dataviews[1]["y"],
        model_location=(tmp_path / "bucket").as_uri(), model_owner=orgs["shop"]["organization"]["id"])
    with pytest.raises(ApiError, match=f"only the model owner '{orgs['shop']['organization']['id']}' chooses"):
        project.submit_job(vlr)  # bank may not say where shop's model goes
    job = shop.get_project(id=project.id).submit_job(vlr, timeout=60)
    assert job.data["task"]["timeout"] == 60
    job = project.get_job(id=job.id)  # bank's view of it from here on
    vlr.model_location = None
    other = project.submit_job(task=vlr)
    assert other.data["task"]["timeout"] == vlr.timeout
    other.stop()
    with pytest.raises(BadArgument, match="exactly one job"):
        project.submit_job()
    assert project.get_job(id=job.id) == job
    assert [j.id for j in project.jobs] == [job.id, other.id]
    assert project.get_job(id=job.id).get_status() == "NeedsApproval"

    # As pycape's example: for o in project.organizations: job.approve(org_id=o.id), each with its own token.
    neutral = next(o for o in project.organizations if o.label == label["neutral"])
    with pytest.raises(ApiError, match=f"organization '{label['neutral']}' owns no data of this job"):
        job.approve(org_id=neutral.id)
    with pytest.raises(ApiError, match=f"to approve this job for '{label['shop']}' you need the role admin or "
                                       "operator there"):
        job.approve(org_id=label["shop"])  # bank's user has no role in shop: nothing is approved
    assert set(job.refresh().data["approvals"].values()) == {"pending"}
    for o in project.organizations[:2]:
        token = orgs["bank" if o.label == label["bank"] else "shop"]["user_token"]
        pycape(shared_cape_server, token).get_project(id=project.id).get_job(id=job.id).approve(org_id=o.id)
    assert job.get_status() == "Approved"

    complete(shared_cape_server, orgs, job.id, tmp_path / "bucket")
    assert job.get_status() == "Completed"
    weights, metrics = shop.get_project(id=project.id).get_job(id=job.id).get_results()
    np.testing.assert_array_equal(weights, WEIGHTS)
    assert metrics == METRICS


def complete(server, orgs: dict, job_id: str, bucket) -> None:
    """Stand in for the three workers: every seat starts, the model owner (shop) writes weights and completes."""
    workers = [Api(server, o["organization_token"]) for o in orgs.values()]
    for api in workers:
        assert api.put("/v1/worker/keys", json=worker_public_keys()).status_code == 204
        started = api.post(f"/v1/worker/jobs/{job_id}/report", json={"state": "started", "progress": 0})
        assert started.status_code == 204, started.text
    weights = bucket / job_id / "regression_weights.csv"
    weights.parent.mkdir(parents=True)
    weights.write_text("".join(f"{float(w)!r}\n" for w in WEIGHTS))
    done = Api(server, orgs["shop"]["organization_token"]).post(f"/v1/worker/jobs/{job_id}/report", json={
        "state": "completed", "progress": 1, "metrics": METRICS, "model_location": bucket.as_uri()})
    assert done.status_code == 204, done.text


def test_schema_takes_pycape_schema_type_and_dtypes() -> None:
    assert normalise_schema([{"name": "a", "schema_type": "string"}, {"name": "b", "schema_type": "integer"}]) == [
        {"name": "a", "type": "string"}, {"name": "b", "type": "integer"}]
    with pytest.raises(BadArgument, match="both type and schema_type"):
        normalise_schema([{"name": "a", "type": "number", "schema_type": "string"}])
    dtypes = {"i": np.dtype("int64"), "f": np.dtype("float32"), "b": np.dtype("bool"), "o": np.dtype("O"), "p": int}
    assert normalise_schema(dtypes) == [{"name": "i", "type": "integer"}, {"name": "f", "type": "number"},
                                        {"name": "b", "type": "integer"}, {"name": "o", "type": "string"},
                                        {"name": "p", "type": "integer"}]
    with pytest.raises(BadArgument, match="'datetime64\\[ns\\]'; the types are number, integer, string"):
        normalise_schema({"when": np.dtype("datetime64[ns]")})
    with pytest.raises(BadArgument, match="'datetime'; the types are"):
        normalise_schema([{"name": "when", "schema_type": "datetime"}])  # a pycape type we do not have


def test_schema_takes_a_dtypes_series_like_mapping() -> None:
    """`df.dtypes` is a pandas Series, not a dict: any object with `.items()` of (name, dtype) is read the same way
    (pandas is not a dependency, so a read-only mapping stands in for it here)."""
    dtypes = types.MappingProxyType({"col_1": np.dtype("int64"), "col_2": np.dtype("float64"),
                                     "name": np.dtype("O")})
    assert not isinstance(dtypes, dict)
    assert json.loads(json.dumps(normalise_schema(dtypes))) == [
        {"name": "col_1", "type": "integer"}, {"name": "col_2", "type": "number"}, {"name": "name", "type": "string"}]
