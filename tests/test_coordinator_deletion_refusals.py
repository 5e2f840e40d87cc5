"""Deleting a project or dataview that unfinished jobs use is refused naming those jobs and what to do with each."""
from __future__ import annotations

from typing import Any

import requests

from tests.support.server import build_job_world

JOB = {"type": "linear_regression", "x": {"dataview": "xs", "columns": ["a", "b"]},
       "y": {"dataview": "ys", "column": "t"}, "model_owner": "yorg"}
REJECT = ("stop a job waiting for approval (`cape jobs stop JOB`) or, as a data owner's admin or operator, reject it "
          "(`cape jobs reject JOB`)")
STOP = "stop an approved or started job (`cape jobs stop JOB`)"


def refusal(response: requests.Response, code: str) -> dict[str, Any]:
    assert response.status_code == 409, response.text
    error = response.json()["error"]
    assert error["code"] == code
    return error


def test_refusals_name_the_blocking_jobs_and_how_to_end_them(cape_server):
    world = build_job_world(cape_server, approve=False)
    user, worker = world["user"], world["worker"]
    xs = world["job"]["task"]["x"]["dataview"]["id"]
    waiting = world["job"]["id"]

    # One job waiting for approval.
    assert refusal(user["xorg"].delete(f"/v1/dataviews/{xs}"), "dataview_in_use")["message"] == \
        f"dataview 'xs' is used by 1 job that has not ended: {waiting} (NeedsApproval); {REJECT}, then try again"

    # Six more: one started, one approved, four waiting; the message shows the first five in submission order.
    ids = [waiting] + [user["xorg"].post("/v1/projects/demo/jobs", json=JOB).json()["id"] for _ in range(6)]
    started, approved = ids[1], ids[2]
    for job in (started, approved):
        for label in ("xorg", "yorg"):
            assert user[label].post(f"/v1/jobs/{job}/approve").status_code == 200
    for label in ("xorg", "yorg", "helper"):
        assert worker[label].post(f"/v1/worker/jobs/{started}/report", json={"state": "started"}).status_code == 204
    statuses = dict.fromkeys(ids, "NeedsApproval") | {started: "Started", approved: "Approved"}
    shown = ", ".join(f"{job} ({statuses[job]})" for job in ids[:5])
    error = refusal(user["xorg"].delete("/v1/projects/demo"), "active_jobs")
    assert error["message"] == (f"project 'demo' has 7 jobs that have not ended: {shown} and 2 more; {REJECT} and "
                                f"{STOP}, then try again")
    assert error["jobs"] == [{"id": job, "status": statuses[job]} for job in ids]
    assert refusal(user["yorg"].delete(f"/v1/dataviews/{world['job']['task']['y']['dataview']['id']}"),
                   "dataview_in_use")["message"].startswith("dataview 'ys' is used by 7 jobs that have not ended: ")

    # Only approved or started ones left: only the stop advice.
    for job in ids:
        if statuses[job] == "NeedsApproval":
            assert user["yorg"].post(f"/v1/jobs/{job}/reject").status_code == 200
    assert refusal(user["xorg"].delete("/v1/projects/demo"), "active_jobs")["message"] == (
        f"project 'demo' has 2 jobs that have not ended: {started} (Started), {approved} (Approved); {STOP}, then "
        "try again")
    for job in (started, approved):
        assert user["xorg"].post(f"/v1/jobs/{job}/stop").status_code == 200
    assert user["xorg"].delete(f"/v1/dataviews/{xs}").status_code == 204
    assert user["xorg"].delete("/v1/projects/demo").status_code == 204
