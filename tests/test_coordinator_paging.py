"""Paged listings: `GET /v1/projects`, `/v1/projects/{p}/jobs` and the caller's jobs across projects `/v1/jobs`,
newest first by (created_at, id), a page at a time; `X-Cape-Next-Cursor` names the next page
(services/coordinator/paging.py)."""
from __future__ import annotations

import sqlite3
from typing import Any

import pytest

from services.coordinator import jobs
from services.coordinator.db import Database
from services.coordinator.identity import Principal
from services.coordinator.paging import PageRequest
from tests.support.server import Api, add_side_project, api_error, build_job_world, newest_first, ok, submit_jobs

NEXT = "X-Cape-Next-Cursor"


def follow(api: Api, path: str, between: Any = None, **params: Any) -> list[list[dict[str, Any]]]:
    """Every page of a listing, following its cursors; `between()` runs after each page."""
    pages, cursor = [], None
    while True:
        answer = api.get(path, params={**params, **({"cursor": cursor} if cursor else {})})
        assert answer.status_code == 200, answer.text
        pages.append(answer.json())
        if between is not None:
            between()
        cursor = answer.headers.get(NEXT)
        if cursor is None:
            return pages


def ids(views: list[dict[str, Any]]) -> list[str]:
    return [view["id"] for view in views]


def test_following_the_cursors_gives_every_job_once_while_jobs_are_submitted(cape_server):
    world = build_job_world(cape_server, approve=False)
    add_side_project(cape_server, world)
    user = world["user"]["yorg"]
    there = [world["job"], *submit_jobs(user, "demo", 7), *submit_jobs(user, "side", 4)]
    added: list[dict[str, Any]] = []

    pages = follow(user, "/v1/projects/demo/jobs", lambda: added.extend(submit_jobs(user, "demo", 2)), limit=3)
    assert [len(page) for page in pages] == [3, 3, 2]
    listed = [job for page in pages for job in page]
    # Those there at the start, once each and newest first; those submitted meanwhile are newer than the first page.
    assert ids(listed) == ids(newest_first([job for job in there if job["project"] == world["project"]["id"]]))
    assert ids(user.get("/v1/projects/demo/jobs", params={"limit": 6}).json()) == ids(newest_first(added))

    # The caller's jobs across projects: both projects' jobs, interleaved by age, with jobs submitted to both.
    everything = [*there, *added]
    pages = follow(user, "/v1/jobs", lambda: added.extend([*submit_jobs(user, "side", 1),
                                                           *submit_jobs(user, "demo", 1)]), limit=4)
    assert all(len(page) == 4 for page in pages[:-1]) and 1 <= len(pages[-1]) <= 4
    listed = [job for page in pages for job in page]
    assert ids(listed) == ids(newest_first(everything))
    assert {job["project_label"] for job in listed} == {"demo", "side"}
    assert listed[0] == ok(user.get(f"/v1/jobs/{listed[0]['id']}"))  # each as the job's own view


def test_a_status_filter_holds_on_every_page(cape_server):
    world = build_job_world(cape_server, approve=False)
    add_side_project(cape_server, world)
    user = world["user"]["xorg"]
    submitted = [world["job"], *submit_jobs(user, "demo", 6), *submit_jobs(user, "side", 5)]
    stopped = [ok(user.post(f"/v1/jobs/{job['id']}/stop")) for job in submitted[1::2]]
    waiting = [job for job in submitted if job["id"] not in ids(stopped)]

    for status, expected in (("Stopped", stopped), ("NeedsApproval", waiting)):
        pages = follow(user, "/v1/jobs", status=status, limit=2)
        assert [len(page) for page in pages[:-1]] == [2] * (len(pages) - 1)
        assert ids([job for page in pages for job in page]) == ids(newest_first(expected))
    in_demo = [job for job in stopped if job["project"] == world["project"]["id"]]
    pages = follow(user, "/v1/projects/demo/jobs", status=["Stopped", "Rejected"], limit=2)
    assert ids([job for page in pages for job in page]) == ids(newest_first(in_demo))


def test_a_user_sees_only_the_jobs_and_projects_of_their_organizations_projects(cape_server):
    world = build_job_world(cape_server, approve=False)
    add_side_project(cape_server, world)
    submit_jobs(world["user"]["yorg"], "side", 3)
    outsider = Api(cape_server, cape_server.create_org("outsider")["user_token"])

    # helper is a member of demo only: side's jobs are not its to see, across projects or by name.
    assert ids(ok(world["user"]["helper"].get("/v1/jobs"))) == [world["job"]["id"]]
    assert api_error(world["user"]["helper"].get("/v1/projects/side/jobs"), 403)["message"] == \
        "none of your organizations is a member of project 'side'"
    assert [p["label"] for p in ok(world["user"]["helper"].get("/v1/projects"))] == ["demo"]
    assert len(ok(world["user"]["xorg"].get("/v1/jobs"))) == 4
    # Another organization's user: nothing, and no cursor to follow.
    for path in ("/v1/jobs", "/v1/projects"):
        answer = outsider.get(path)
        assert answer.status_code == 200 and answer.json() == [] and NEXT not in answer.headers
    # A worker's organization token reads no listing.
    assert api_error(world["worker"]["xorg"].get("/v1/jobs"), 403)["code"] == "wrong_token_kind"


def test_a_page_is_100_by_default_and_at_most_1000(cape_server):
    world = build_job_world(cape_server, approve=False)
    user = world["user"]["xorg"]
    submit_jobs(user, "demo", 100)
    for path in ("/v1/projects/demo/jobs", "/v1/jobs"):
        first = user.get(path)
        assert len(first.json()) == 100 and first.headers[NEXT]
        rest = user.get(path, params={"cursor": first.headers[NEXT]})
        assert len(rest.json()) == 1 and NEXT not in rest.headers
        assert set(ids(first.json())).isdisjoint(ids(rest.json()))
        assert len(ok(user.get(path, params={"limit": 1000}))) == 101
    for path in ("/v1/projects/demo/jobs", "/v1/jobs", "/v1/projects"):
        assert api_error(user.get(path, params={"limit": 1001}), 422)["message"] == \
            "field 'limit': input should be less than or equal to 1000"
        assert api_error(user.get(path, params={"limit": 0}), 422)["message"] == \
            "field 'limit': input should be greater than or equal to 1"
        assert api_error(user.get(path, params={"limit": "ten"}), 422)["message"].startswith(
            "field 'limit': input should be a valid integer")


def test_a_cursor_not_given_by_the_listing_is_refused_saying_what_to_pass(cape_server):
    world = build_job_world(cape_server, approve=False)
    user = world["user"]["xorg"]
    ok(user.post("/v1/projects", json={"label": "second"}))
    projects_cursor = user.get("/v1/projects", params={"limit": 1}).headers[NEXT]
    advice = ("; pass the X-Cape-Next-Cursor header of this listing's previous page as it came, or leave cursor out "
              "for the first page")
    for path in ("/v1/projects/demo/jobs", "/v1/jobs"):
        for bad in ("garbage", "!!", "am9ic3w", projects_cursor[:6]):
            assert api_error(user.get(path, params={"cursor": bad}), 422)["message"] == \
                "field 'cursor': not a cursor this server gave" + advice, bad
        assert api_error(user.get(path, params={"cursor": projects_cursor}), 422)["message"] == \
            "field 'cursor': a cursor of the projects listing, not of this one" + advice
    submit_jobs(user, "demo", 1)
    jobs_cursor = user.get("/v1/jobs", params={"limit": 1}).headers[NEXT]
    assert api_error(user.get("/v1/projects", params={"cursor": jobs_cursor}), 422)["message"] == \
        "field 'cursor': a cursor of the jobs listing, not of this one" + advice
    # A jobs cursor serves both job listings: it names a place in time, not a listing's filter.
    assert ids(ok(user.get("/v1/projects/demo/jobs", params={"cursor": jobs_cursor}))) == [world["job"]["id"]]


def test_projects_are_paged_newest_first_and_a_new_one_does_not_shift_the_pages(cape_server):
    org = cape_server.create_org("acme")
    user = Api(cape_server, org["user_token"])
    made = [ok(user.post("/v1/projects", json={"label": f"p{k}"})) for k in range(5)]
    late: list[dict[str, Any]] = []
    pages = follow(user, "/v1/projects", lambda: late.append(ok(user.post("/v1/projects", json={
        "label": f"late{len(late)}"}))), limit=2)
    assert [len(page) for page in pages] == [2, 2, 1]
    assert ids([p for page in pages for p in page]) == ids(newest_first(made))
    assert ids(ok(user.get("/v1/projects", params={"limit": 3}))) == ids(newest_first(late))


def test_a_page_of_jobs_reads_through_an_index_in_the_listings_order(tmp_path):
    """Each page reads only its own keys: no sort of all the project's (or the caller's) jobs."""
    db = Database(tmp_path / "coordinator.sqlite3")
    try:
        with db.transaction() as conn:
            conn.execute("INSERT INTO projects (id, label, name, description, owner_org_id, created_at) "
                         "VALUES ('p', 'p', 'p', '', 'o', 'now')")
            conn.execute("INSERT INTO project_organizations (project_id, org_id, added_at) VALUES ('p', 'o', 'now')")
        reader = Principal(kind="user", token_id="t", user_id="u", roles={"o": "user"})
        for project, statuses in (("p", None), ("p", ["Started"]), (None, None), (None, ["Started"])):
            statements: list[str] = []
            with db.transaction() as conn:
                conn.set_trace_callback(statements.append)
                try:
                    jobs.list_jobs(conn, reader, project, statuses, PageRequest(2, "am9ic3wyMDI2fGFiYw"))
                finally:
                    conn.set_trace_callback(None)
                query = next(s for s in statements if s.startswith("SELECT id, created_at FROM jobs"))
                plan = " / ".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {query}"))
            assert "SEARCH jobs USING " in plan and "SCAN" not in plan, (project, statuses, plan)
            if project is not None:  # one project: the index is in the listing's order, so nothing is sorted
                assert "jobs_project_" in plan and "(created_at,id)<" in plan and "TEMP B-TREE" not in plan, plan
            elif "TEMP B-TREE FOR ORDER BY" in plan:  # several, merged by a sort: of the keys alone
                assert "USING COVERING INDEX jobs_project_" in plan, (statuses, plan)
    finally:
        db.close()


def test_an_older_database_gets_the_listings_indexes_in_place_of_the_ones_they_supersede(start_cape_server):
    server = start_cape_server()
    world = build_job_world(server, approve=False)
    server.stop()
    with sqlite3.connect(server.data_dir / "coordinator.sqlite3") as conn:  # as an older version left it
        conn.execute("DROP INDEX jobs_project_created_id")
        conn.execute("DROP INDEX jobs_project_status_created_id")
        conn.execute("CREATE INDEX jobs_project_created ON jobs(project_id, created_at)")
        conn.execute("CREATE INDEX jobs_project_status ON jobs(project_id, status, created_at)")
    server.start()
    with sqlite3.connect(server.data_dir / "coordinator.sqlite3") as conn:
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"jobs_project_created_id", "jobs_project_status_created_id"} <= names
    assert not {"jobs_project_created", "jobs_project_status"} & names
    assert ids(ok(world["user"]["xorg"].get("/v1/projects/demo/jobs"))) == [world["job"]["id"]]


@pytest.mark.parametrize("path", ["/v1/projects", "/v1/projects/{project}/jobs", "/v1/jobs"])
def test_the_openapi_document_names_the_paging_parameters_and_header(cape_server, path):
    operation = ok(Api(cape_server, None).get("/openapi.json"))["paths"][path]["get"]
    limit = next(p for p in operation["parameters"] if p["name"] == "limit")
    assert (limit["schema"]["minimum"], limit["schema"]["maximum"], limit["schema"]["default"]) == (1, 1000, 100)
    assert any(p["name"] == "cursor" for p in operation["parameters"])
    assert NEXT in operation["responses"]["200"]["headers"]
