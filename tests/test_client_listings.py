"""`cape jobs list` with and without a project, and the SDK's paged listings (`iter_jobs`, `iter_projects`), against
the real cape-server."""
from __future__ import annotations

import json
from typing import Any

import pytest

from services.client import BadArgument, Cape
from services.client.http import ApiSession
from services.client.pages import follow
from tests.support.server import add_side_project, build_job_world, newest_first, ok, submit_jobs

MORE = "there are more: raise --limit, or --limit 0 for every job)"


@pytest.fixture
def two_projects(cape_server) -> dict[str, Any]:
    """`demo` (xorg, yorg, helper) and `side` (xorg, yorg, aside), their jobs submitted in turn, oldest first."""
    world = build_job_world(cape_server, approve=False)
    add_side_project(cape_server, world)
    user = world["user"]["yorg"]
    world["jobs"] = [world["job"]]
    for _ in range(3):
        world["jobs"] += [*submit_jobs(user, "side", 1), *submit_jobs(user, "demo", 1)]
    return world


def env_of(server, world: dict[str, Any], org: str) -> dict[str, str]:
    return {"CAPE_COORDINATOR": server.url, "CAPE_TOKEN": world["orgs"][org]["user_token"]}


def ids(views: list[dict[str, Any]]) -> list[str]:
    return [view["id"] for view in views]


def rows(table: str) -> list[list[str]]:
    return [line.split() for line in table.splitlines()[1:]]


def test_jobs_list_without_a_project_shows_your_recent_jobs_across_projects(cape_server, cape_cli, two_projects):
    world, env = two_projects, env_of(cape_server, two_projects, "xorg")
    newest = newest_first(world["jobs"])
    label = {world["project"]["id"]: "demo"}

    listed = cape_cli("jobs", "list", "--limit", "4", env=env)
    assert listed.exit_code == 0, listed.stderr
    assert listed.stdout.splitlines()[0].split()[:4] == ["ID", "PROJECT", "TYPE", "STATUS"]
    assert [row[:2] for row in rows(listed.stdout)] == [  # the most recent, oldest first, as with a project
        [job["id"], label.get(job["project"], "side")] for job in newest[:4][::-1]]
    assert listed.stderr.strip() == f"(the 4 most recent; {MORE}"

    every = cape_cli("jobs", "list", "--limit", "0", "--json", env=env)
    assert ids(json.loads(every.stdout)) == ids(newest[::-1]) and every.stderr == ""
    default = cape_cli("jobs", "list", env=env)
    assert [row[0] for row in rows(default.stdout)] == ids(newest[::-1]) and default.stderr == ""  # fewer than 50
    exactly = cape_cli("jobs", "list", "--limit", str(len(newest)), env=env)
    assert len(rows(exactly.stdout)) == len(newest) and exactly.stderr == ""  # nothing left out: no note

    # helper takes part in demo only: side's jobs are not listed for it.
    helper = cape_cli("jobs", "list", "--json", env=env_of(cape_server, world, "helper"))
    assert ids(json.loads(helper.stdout)) == [job["id"] for job in newest[::-1]
                                              if job["project"] == world["project"]["id"]]
    stopped = ok(world["user"]["xorg"].post(f"/v1/jobs/{newest[2]['id']}/stop"))
    only = cape_cli("jobs", "list", "--status", "Stopped", "--json", env=env)
    assert ids(json.loads(only.stdout)) == [stopped["id"]]

    # With a project, as before: its most recent, oldest first, without the project column.
    in_side = [job for job in world["jobs"] if job["project"] != world["project"]["id"]]
    side = cape_cli("jobs", "list", "side", "--limit", "2", env=env)
    assert side.stdout.splitlines()[0].split()[:3] == ["ID", "TYPE", "STATUS"]
    assert [row[0] for row in rows(side.stdout)] == ids(newest_first(in_side)[:2][::-1])
    assert side.stderr.strip() == f"(the 2 most recent; {MORE}"
    outsider = cape_cli("jobs", "list", "--json", env={"CAPE_COORDINATOR": cape_server.url,
                                                      "CAPE_TOKEN": cape_server.create_org("out")["user_token"]})
    assert outsider.exit_code == 0 and json.loads(outsider.stdout) == []


def test_the_sdk_follows_the_pages_as_the_iteration_goes(cape_server, two_projects, monkeypatch):
    world = two_projects
    asked: list[dict[str, Any]] = []
    get_page = ApiSession.get_page

    def counted(self: ApiSession, path: str, params: dict[str, Any]) -> tuple[Any, str | None]:
        asked.append(params)
        return get_page(self, path, params)

    monkeypatch.setattr(ApiSession, "get_page", counted)
    cape = Cape(endpoint=cape_server.url, token=world["orgs"]["xorg"]["user_token"])
    newest = newest_first(world["jobs"])
    in_demo = [job for job in newest if job["project"] == world["project"]["id"]]

    jobs = cape.get_project("demo").iter_jobs(page_size=2)
    assert asked == []  # nothing asked before the iteration starts
    assert next(jobs).id == in_demo[0]["id"] and len(asked) == 1
    assert [next(jobs).id, next(jobs).id] == ids(in_demo[1:3]) and len(asked) == 2
    assert [job.id for job in jobs] == ids(in_demo[3:]) and len(asked) == 2  # 4 jobs: the second page was the last
    assert "cursor" not in asked[0] and asked[1]["cursor"]

    asked.clear()
    assert [job.id for job in cape.iter_jobs(page_size=3)] == ids(newest) and len(asked) == 3
    assert [job.id for job in cape.list_jobs(limit=3)] == ids(newest[:3][::-1])  # as project.list_jobs: oldest first
    assert [job.id for job in cape.list_jobs(status="NeedsApproval")] == ids(newest[::-1])
    asked.clear()
    assert ids([job for job in follow(cape._session, "/v1/jobs", limit=5, page_size=2)]) == ids(newest[:5])
    assert [params["limit"] for params in asked] == [2, 2, 1]  # never more than is still wanted

    labels = [p.label for p in cape.iter_projects(page_size=1)]
    assert labels == ["side", "demo"] and [p.label for p in cape.list_projects()] == ["demo", "side"]
    for bad in (0, 1001, True, "2"):
        with pytest.raises(BadArgument, match=f"^page_size must be a whole number of items per page from 1 to 1000, "
                                              f"not {bad!r}$"):
            cape.iter_jobs(page_size=bad)  # type: ignore[arg-type]  # said at the call, not at the first item
    with pytest.raises(BadArgument, match="^limit must be a positive whole number of jobs, not 0$"):
        cape.list_jobs(limit=0)


def test_an_older_coordinator_that_ignores_the_filter_and_paging_still_gives_the_right_jobs(
        cape_server, two_projects, monkeypatch):
    """An older coordinator ignores `status`, `limit` and `cursor` and answers every job at once, oldest first:
    `cape jobs list --status Started` listed Rejected and NeedsApproval jobs (a script stopping every Started job
    would stop them). Simulated against the real server by not sending what an older one ignores."""
    world = two_projects
    get_page = ApiSession.get_page

    def older(self: ApiSession, path: str, params: dict[str, Any]) -> tuple[Any, str | None]:
        page, _ = get_page(self, path, {"limit": 1000})
        return page[::-1], None  # everything, oldest first, no next page

    stopped = ok(world["user"]["xorg"].post(f"/v1/jobs/{world['jobs'][1]['id']}/stop"))
    monkeypatch.setattr(ApiSession, "get_page", older)
    cape = Cape(endpoint=cape_server.url, token=world["orgs"]["xorg"]["user_token"])
    newest = newest_first(world["jobs"])
    assert [job.id for job in cape.list_jobs(status="Stopped")] == [stopped["id"]]
    assert [job.id for job in cape.list_jobs(limit=2)] == ids(newest[:2][::-1])
    assert [job.id for job in cape.iter_jobs()] == ids(newest)
