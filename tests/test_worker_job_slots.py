"""The runner's job slots (services/worker/job_slots.py): jobs waiting for a partner that is not running never keep
a job between running workers waiting, and a job waiting for a slot says so."""
from __future__ import annotations

import json
import subprocess
import time

import pytest

from services.worker.job_slots import JobSlots
from tests.support.server import Api, worker_public_keys
from tests.support.workers import JobWorld, worker_env


def test_the_last_slot_goes_only_to_a_job_all_three_workers_took():
    started: set[str] = set()
    slots = JobSlots(3, started.__contains__)
    assert slots.take("a", "2026-01-01T00:00:01Z") is None
    assert slots.take("b", "2026-01-01T00:00:02Z") is None
    waiting = slots.take("c", "2026-01-01T00:00:03Z")  # its partners have not all taken it
    assert waiting is not None and not waiting.all_busy and "waiting for the other workers" in waiting.message
    started.add("d")
    assert slots.take("d", "2026-01-01T00:00:04Z") is None  # all three took it: the last slot is its
    started.add("c")
    full = slots.take("c", "2026-01-01T00:00:03Z")
    assert full is not None and full.all_busy and "all 3 of the worker's job slots are taken" in full.message
    slots.leave("a")
    assert slots.take("c", "2026-01-01T00:00:03Z") is None
    assert slots.working == 3


def test_a_free_slot_goes_to_the_oldest_approval_that_may_take_it_as_it_is_now():
    started = {"a", "young", "old"}
    slots = JobSlots(2, started.__contains__)
    assert slots.take("a", "2026-01-01T00:00:01Z") is None
    assert slots.take("a", "2026-01-01T00:00:01Z") is None  # asking again while working changes nothing
    assert slots.take("young", "2026-01-01T00:00:09Z") is None
    assert slots.take("old", "2026-01-01T00:00:02Z") is not None  # full
    assert slots.take("older", "2026-01-01T00:00:01Z") is not None
    slots.leave("young")
    # One slot free: "older" (not all seats taken) may not have it; "young2" must let "old" go first.
    started.add("young2")
    assert slots.take("young2", "2026-01-01T00:00:08Z").message.endswith("behind an older job")
    assert slots.take("older", "2026-01-01T00:00:01Z") is not None
    # "older" became Started since its own last look: it goes first although "old" asks now.
    started.add("older")
    assert slots.take("old", "2026-01-01T00:00:02Z").message.endswith("behind an older job")
    assert slots.take("older", "2026-01-01T00:00:01Z") is None
    slots.leave("older")
    slots.leave("young2")  # a job that left while waiting is not waited for
    assert slots.take("old", "2026-01-01T00:00:02Z") is None
    with pytest.raises(ValueError):
        JobSlots(0, started.__contains__)


def test_a_job_that_held_a_slot_before_a_restart_goes_first_and_may_have_the_last_slot():
    """Its partners, mid-protocol, wait for it: a job that was only queued must not take its slot."""
    slots = JobSlots(2, lambda job: False)
    assert slots.take("other", "2026-01-01T00:00:01Z") is None
    assert slots.take("queued", "2026-01-01T00:00:02Z") is not None  # the last slot: not for it
    assert slots.take("resumed", "2026-01-01T00:00:09Z", resumed=True) is None
    assert slots.take("queued", "2026-01-01T00:00:02Z").all_busy


def test_jobs_waiting_for_a_worker_that_is_down_leave_a_job_between_running_workers_its_slot(
        cape_server, start_worker, tmp_path):
    """Four jobs whose helper's worker is down, then one between three running workers: that one completes at
    once (it waited for the four to time out, then ended in Error naming a running worker as missing); the
    fourth waiting job says at the coordinator and in `cape-worker status` that it is queued."""
    world = JobWorld(cape_server, tmp_path, n=200)
    away = cape_server.create_org("away")
    assert Api(cape_server, away["organization_token"]).put("/v1/worker/keys",
                                                            json=worker_public_keys()).status_code == 204
    xorg, yorg = world.user["xorg"], world.user["yorg"]
    world._ok(xorg.post("/v1/projects", json={"label": "down", "name": "Helper down"}))
    world._ok(xorg.post("/v1/projects/down/organizations", json={"organization": "yorg"}))
    world._ok(xorg.put("/v1/projects/down/helper", json={"organization": "away"}))
    world._ok(Api(cape_server, away["user_token"]).post("/v1/projects/down/organizations/away/join"))
    world._ok(xorg.post("/v1/projects/down/dataviews", json={
        "name": "xs", "uri": world.x_path.as_uri(), "schema": [{"name": c, "type": "number"} for c in "abc"]}))
    world._ok(yorg.post("/v1/projects/down/dataviews", json={
        "name": "ys", "uri": world.y_path.as_uri(), "schema": [{"name": "t", "type": "number"}]}))
    workers = {label: start_worker(worker_env(tmp_path, label, CAPE_TOKEN=world.token(label),
                                              CAPE_COORDINATOR=cape_server.url)) for label in JobWorld.LABELS}
    for worker in workers.values():
        worker.wait_running()

    stuck = []
    for _ in range(4):
        job = world._ok(yorg.post("/v1/projects/down/jobs", json={
            "type": "linear_regression", "x": {"dataview": "xs", "columns": ["a", "b", "c"]},
            "y": {"dataview": "ys", "column": "t"}, "model_owner": "yorg", "timeout": 300}))
        for api in (xorg, yorg):
            world._ok(api.post(f"/v1/jobs/{job['id']}/approve"))
        stuck.append(job["id"])
    deadline = time.monotonic() + 30
    while any(world.job(j)["parties"]["x_owner"]["state"] == "pending" for j in stuck):
        assert time.monotonic() < deadline, [world.job(j)["parties"] for j in stuck]
        time.sleep(0.2)

    began = time.monotonic()
    job = world.wait_ended(world.submit(), timeout=30)
    assert job["status"] == "Completed", job
    assert time.monotonic() - began < 20

    # Three of the four hold a slot at each data owner's worker; the fourth waits, and says so.
    queued = "of its 4 job slots are taken and the last is kept for a job whose three workers have all taken it"
    deadline = time.monotonic() + 15
    while not any(queued in (world.job(j)["parties"]["x_owner"]["message"] or "") for j in stuck):
        assert time.monotonic() < deadline, [world.job(j)["parties"] for j in stuck]
        time.sleep(0.2)
    status = subprocess.run(["cape-worker", "status", "--json"], env=workers["xorg"].env, capture_output=True,
                            text=True, timeout=30)
    runners = {j["id"]: j["runner"] for j in json.loads(status.stdout)["jobs"] if j["id"] in stuck}
    assert sorted(runners.values()) == ["queued", "running", "running", "running"], (runners, status.stderr)
    assert all(world.job(j)["status"] == "Approved" for j in stuck)


def test_a_job_whose_runner_was_killed_runs_alone():
    """A kill counts against every job that was working: run alone, a job killed beside a large one completes, and
    one that dies again alone is the one that needs more memory (3 such kills end it)."""
    slots = JobSlots(4, lambda job: True)
    assert slots.take("small", "2026-01-01T00:00:05Z") is None
    waiting = slots.take("killed", "2026-01-01T00:00:01Z", resumed=True, alone=True)
    assert waiting is not None and "it runs alone once they leave their slots" in waiting.message
    behind = slots.take("new", "2026-01-01T00:00:00Z")  # free slots, but the killed job goes first, alone
    assert behind is not None and "runs alone first" in behind.message
    slots.leave("small")
    assert slots.take("killed", "2026-01-01T00:00:01Z", resumed=True, alone=True) is None
    assert slots.working == 1
    still = slots.take("new", "2026-01-01T00:00:00Z")
    assert still is not None and "runs alone first" in still.message
    slots.leave("killed")
    assert slots.take("new", "2026-01-01T00:00:00Z") is None
    assert slots.take("other", "2026-01-01T00:00:02Z") is None  # slots shared again
