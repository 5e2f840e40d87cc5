"""Job lifecycle against a real cape-server: seats, approvals, worker view, reports, status moves, results."""
from __future__ import annotations

import sqlite3
import time

import pytest

from tests.support.server import Api, build_job_world, newest_first, worker_public_keys

METRICS = {"mse_result": 0.25, "r_squared_result": 0.93}


def test_job_runs_from_submission_to_results(cape_server):
    world = build_job_world(cape_server, approve=False)
    job, user, worker = world["job"], world["user"], world["worker"]
    jid = job["id"]
    assert job["status"] == "NeedsApproval"
    assert job["outputs_to"] == "y_owner"
    assert {s: p["organization"]["label"] for s, p in job["parties"].items()} == {
        "x_owner": "xorg", "y_owner": "yorg", "helper": "helper"}
    assert job["approvals"] == {"xorg": "pending", "yorg": "pending"}
    assert job["task"]["x"] == {"dataview": {"id": job["task"]["x"]["dataview"]["id"], "name": "xs"},
                                "columns": ["a", "b"]}

    # Not yet approved: no worker sees it, and the helper cannot approve (it owns no data).
    assert worker["xorg"].get("/v1/worker/jobs").json() == []
    assert user["helper"].post(f"/v1/jobs/{jid}/approve").status_code == 403
    assert user["xorg"].post(f"/v1/jobs/{jid}/approve").json()["status"] == "NeedsApproval"
    approved = user["yorg"].post(f"/v1/jobs/{jid}/approve").json()
    assert approved["status"] == "Approved"
    assert approved["approvals"] == {"xorg": "approved", "yorg": "approved"}

    # Each worker gets the job with its own seat, everyone's public keys, and only its own dataview's uri.
    views = {label: api.get("/v1/worker/jobs").json() for label, api in worker.items()}
    assert [v[0]["seat"] for v in views.values()] == ["x_owner", "y_owner", "helper"]
    x_view, y_view, h_view = views["xorg"][0], views["yorg"][0], views["helper"][0]
    assert x_view["task"]["x"]["dataview"]["uri"] == "file:///data/x.csv"
    assert x_view["task"]["y"]["dataview"]["uri"] is None
    assert y_view["task"]["y"]["dataview"]["uri"] == "file:///data/y.csv"
    assert y_view["task"]["x"]["dataview"]["uri"] is None
    assert h_view["task"]["x"]["dataview"]["uri"] is None and h_view["task"]["y"]["dataview"]["uri"] is None
    assert set(x_view["parties"]) == {"x_owner", "y_owner", "helper"}
    assert all(len(p["encryption_public_key"]) == 44 for p in x_view["parties"].values())
    assert worker["xorg"].get(f"/v1/worker/jobs/{jid}").json() == x_view

    # Started once all three report started; progress visible to project members.
    for label in ("xorg", "yorg"):
        assert worker[label].post(f"/v1/worker/jobs/{jid}/report", json={"state": "started"}).status_code == 204
    assert user["xorg"].get(f"/v1/jobs/{jid}").json()["status"] == "Approved"
    assert worker["helper"].post(f"/v1/worker/jobs/{jid}/report", json={"state": "started"}).status_code == 204
    assert worker["xorg"].post(f"/v1/worker/jobs/{jid}/report",
                               json={"state": "running", "progress": 0.5, "message": "round 3"}).status_code == 204
    status = user["yorg"].get(f"/v1/jobs/{jid}").json()
    assert status["status"] == "Started"
    assert status["parties"]["x_owner"] == {"organization": status["parties"]["x_owner"]["organization"],
                                            "state": "running", "progress": 0.5, "message": "round 3",
                                            "worker_online": False}  # reports are not heartbeats
    assert worker["xorg"].post("/v1/worker/heartbeat", json={}).status_code == 204
    parties = user["yorg"].get(f"/v1/jobs/{jid}").json()["parties"]
    assert {seat: party["worker_online"] for seat, party in parties.items()} == {
        "x_owner": True, "y_owner": False, "helper": False}

    # Results only once Completed; the output seat must send metrics.
    assert user["yorg"].get(f"/v1/jobs/{jid}/results").status_code == 409
    missing = worker["yorg"].post(f"/v1/worker/jobs/{jid}/report", json={"state": "completed"})
    assert missing.status_code == 422 and "metrics" in missing.json()["error"]["message"]
    done = worker["yorg"].post(f"/v1/worker/jobs/{jid}/report", json={"state": "completed", "metrics": METRICS})
    assert done.status_code == 204
    # A retried identical report is fine; anything else on an ended job is 409 naming the status.
    assert worker["yorg"].post(f"/v1/worker/jobs/{jid}/report",
                               json={"state": "completed", "metrics": METRICS}).status_code == 204
    late = worker["xorg"].post(f"/v1/worker/jobs/{jid}/report", json={"state": "running", "progress": 0.9})
    assert late.status_code == 409 and late.json()["error"]["status"] == "Completed"
    # A seat that finishes its role just after the output seat completed the job is recorded completed.
    assert worker["xorg"].post(f"/v1/worker/jobs/{jid}/report", json={"state": "completed"}).status_code == 204
    parties = user["yorg"].get(f"/v1/jobs/{jid}").json()["parties"]
    assert {seat: (p["state"], p["progress"]) for seat, p in parties.items()} == {
        "x_owner": ("completed", 1.0), "y_owner": ("completed", 1.0), "helper": ("started", 0.0)}

    results = user["yorg"].get(f"/v1/jobs/{jid}/results").json()
    assert results == {"job": jid, "status": "Completed", "metrics": METRICS,
                       "model_location": f"s3://bucket/models/{jid}/regression_weights.csv"}
    for label in ("xorg", "helper"):
        refused = user[label].get(f"/v1/jobs/{jid}/results")
        assert refused.status_code == 403, refused.text
        assert "model owner" in refused.json()["error"]["message"]
    assert worker["xorg"].get("/v1/worker/jobs").json() == []  # ended jobs leave the worker list


def test_a_seat_that_completed_is_not_shown_running_again(cape_server):
    """A late `running` (queued before `completed`, sent after: a worker's clock stepped back during an outage)
    showed a finished seat running again."""
    world = build_job_world(cape_server)
    jid, worker, user = world["job"]["id"], world["worker"], world["user"]
    report = f"/v1/worker/jobs/{jid}/report"
    assert worker["xorg"].post(report, json={"state": "completed", "progress": 1.0}).status_code == 204
    assert worker["xorg"].post(report, json={"state": "running", "progress": 0.5}).status_code == 204
    party = user["xorg"].get(f"/v1/jobs/{jid}").json()["parties"]["x_owner"]
    assert (party["state"], party["progress"]) == ("completed", 1.0)


def test_error_report_ends_job_with_the_party_message(cape_server):
    world = build_job_world(cape_server)
    jid, worker, user = world["job"]["id"], world["worker"], world["user"]
    assert worker["xorg"].post(f"/v1/worker/jobs/{jid}/report", json={"state": "running", "progress": 0.3,
                                                                       "message": "prepare"}).status_code == 204
    assert worker["yorg"].post(f"/v1/worker/jobs/{jid}/report",
                               json={"state": "error", "message": "column t has NaN at row 7"}).status_code == 204
    job = user["xorg"].get(f"/v1/jobs/{jid}").json()
    assert job["status"] == "Error"
    assert job["error"] == "y_owner (yorg): column t has NaN at row 7"
    # Asking for the results says the job will have none, and why.
    refused = user["yorg"].get(f"/v1/jobs/{jid}/results")
    assert refused.status_code == 409
    assert refused.json()["error"]["message"] == ("the job ended in Error (y_owner (yorg): column t has NaN at row 7); "
                                                  "it has no results")
    # The x-owner was working when the job ended: it shows stopped (at its last progress), not still running; the
    # helper never started.
    assert {seat: (p["state"], p["progress"]) for seat, p in job["parties"].items()} == {
        "x_owner": ("stopped", 0.3), "y_owner": ("error", 0.0), "helper": ("pending", 0.0)}


def test_a_seats_wait_that_ended_names_the_workers_the_coordinator_shows_offline(cape_server):
    """x waited for y, y for the helper whose worker had stopped: x's timeout came first, and the job's error blamed
    the healthy y-owner alone (no worker log named the helper)."""
    world = build_job_world(cape_server)
    jid, worker, user = world["job"]["id"], world["worker"], world["user"]
    for label in ("xorg", "yorg", "helper"):
        assert worker[label].post(f"/v1/worker/jobs/{jid}/report", json={"state": "started"}).status_code == 204
        assert worker[label].post("/v1/worker/heartbeat", json={"version": "0.1.0"}).status_code == 204
    assert worker["helper"].post("/v1/worker/heartbeat", json={"stopping": True}).status_code == 204
    waited = ("no message 'y_owner.lr-c-y-r.0' from the y_owner worker (organization yorg) within 15 s; check that "
              "worker is running and reaches the broker")
    assert worker["xorg"].post(f"/v1/worker/jobs/{jid}/report",
                               json={"state": "error", "message": waited}).status_code == 204
    assert user["yorg"].get(f"/v1/jobs/{jid}").json()["error"] == (
        f"x_owner (xorg): {waited}; the coordinator shows offline the helper worker (organization helper: it said "
        "it was stopping)")


def test_an_error_other_than_a_wait_is_the_seats_own_words_alone(cape_server):
    world = build_job_world(cape_server)  # no worker ever heartbeated: all offline, and it is not the point
    jid, worker, user = world["job"]["id"], world["worker"], world["user"]
    assert worker["xorg"].post(f"/v1/worker/jobs/{jid}/report",
                               json={"state": "error", "message": "dataview 'xs': no such file"}).status_code == 204
    assert user["yorg"].get(f"/v1/jobs/{jid}").json()["error"] == "x_owner (xorg): dataview 'xs': no such file"


def test_job_not_served_until_all_keys_registered(cape_server):
    world = build_job_world(cape_server, register_keys=False)
    jid, worker = world["job"]["id"], world["worker"]
    worker["xorg"].put("/v1/worker/keys", json=worker_public_keys())
    assert worker["xorg"].get("/v1/worker/jobs").json() == []
    waiting = worker["xorg"].get(f"/v1/worker/jobs/{jid}")
    assert waiting.status_code == 409
    assert "y_owner (yorg)" in waiting.json()["error"]["message"]
    assert "helper (helper)" in waiting.json()["error"]["message"]
    for label in ("yorg", "helper"):
        worker[label].put("/v1/worker/keys", json=worker_public_keys())
    assert [j["id"] for j in worker["xorg"].get("/v1/worker/jobs").json()] == [jid]


def test_start_timeout_ends_job_naming_missing_seats(cape_server):
    world = build_job_world(cape_server, timeout=1)
    jid, worker, user = world["job"]["id"], world["worker"], world["user"]
    worker["xorg"].post(f"/v1/worker/jobs/{jid}/report", json={"state": "started"})
    time.sleep(1.2)
    job = user["xorg"].get(f"/v1/jobs/{jid}").json()
    assert job["status"] == "Error"
    assert job["error"] == "not all parties started within 1 s of approval; missing: y_owner (yorg), helper (helper)"
    refused = worker["yorg"].post(f"/v1/worker/jobs/{jid}/report", json={"state": "started"})
    assert refused.status_code == 409 and refused.json()["error"]["status"] == "Error"


def test_start_timeout_names_only_the_seat_without_a_worker_when_one_never_registered(cape_server):
    """The job goes to no worker until all three registered keys: the ready ones were not 'missing'."""
    world = build_job_world(cape_server, timeout=1, register_keys=False)
    jid, worker, user = world["job"]["id"], world["worker"], world["user"]
    for label in ("xorg", "yorg"):
        worker[label].put("/v1/worker/keys", json=worker_public_keys())
    time.sleep(1.2)
    job = user["xorg"].get(f"/v1/jobs/{jid}").json()
    assert job["status"] == "Error"
    assert job["error"] == (
        "not all parties started within 1 s of approval: no worker of helper (helper) has registered its keys, and "
        "the job goes to the workers only once all three have; start that organization's worker (cape-worker run), "
        "then submit the job again")


def test_a_seats_own_error_arriving_after_a_partners_relay_of_it_becomes_the_jobs_error(cape_server):
    """Workers report in their own order: a partner told to stop by the y-owner ("the y_owner stopped the job ...
    (see its error)") could report first, and the y-owner's own error was then refused: the job blamed the
    partner, pointing at an error shown nowhere."""
    world = build_job_world(cape_server)
    jid, worker, user = world["job"]["id"], world["worker"], world["user"]
    for label in ("xorg", "yorg", "helper"):
        assert worker[label].post(f"/v1/worker/jobs/{jid}/report", json={"state": "started"}).status_code == 204
    relay = "the y_owner stopped the job: its y column is constant (see its error)"
    assert worker["xorg"].post(f"/v1/worker/jobs/{jid}/report",
                               json={"state": "error", "message": relay}).status_code == 204
    assert user["xorg"].get(f"/v1/jobs/{jid}").json()["error"] == f"x_owner (xorg): {relay}"
    own = "dataview 'ys': column 't' is constant (all its values are equal); a regression needs a target that varies"
    late = worker["yorg"].post(f"/v1/worker/jobs/{jid}/report", json={"state": "error", "message": own})
    assert late.status_code == 204, late.text
    job = user["xorg"].get(f"/v1/jobs/{jid}").json()
    assert job["status"] == "Error" and job["error"] == f"y_owner (yorg): {own}"
    assert (job["parties"]["y_owner"]["state"], job["parties"]["y_owner"]["message"]) == ("error", own)
    assert job["parties"]["x_owner"]["message"] == relay
    # Another error from a seat that did not stop the job is kept on its seat only; other reports stay refused.
    other = worker["helper"].post(f"/v1/worker/jobs/{jid}/report", json={"state": "error", "message": "cut off"})
    assert other.status_code == 204
    job = user["xorg"].get(f"/v1/jobs/{jid}").json()
    assert job["error"] == f"y_owner (yorg): {own}" and job["parties"]["helper"]["message"] == "cut off"
    refused = worker["helper"].post(f"/v1/worker/jobs/{jid}/report", json={"state": "running", "progress": 0.5})
    assert refused.status_code == 409 and refused.json()["error"]["status"] == "Error"


def test_start_timeout_is_applied_by_the_background_sweep(start_cape_server):
    server = start_cape_server(extra_args=["--job-sweep-seconds", "0.2"])
    world = build_job_world(server, timeout=1)
    jid = world["job"]["id"]
    time.sleep(1.6)
    # Read the database itself: any API read would apply the timeout on its own and prove nothing.
    conn = sqlite3.connect(server.data_dir / "coordinator.sqlite3")
    status = conn.execute("SELECT status FROM jobs WHERE id = ?", (jid,)).fetchone()[0]
    conn.close()
    assert status == "Error"


def test_a_job_not_approved_by_every_data_owner_in_time_ends_in_error(start_cape_server):
    """Jobs waited for approval for ever: an approval given weeks before the last one still counted (for data that
    may have changed since), and a forgotten job held its dataview and project. --approval-ttl (30 days by
    default) bounds the wait."""
    server = start_cape_server(extra_args=["--job-sweep-seconds", "0.2", "--approval-ttl", "1"])
    world = build_job_world(server, approve=False)
    jid, user = world["job"]["id"], world["user"]
    assert user["xorg"].post(f"/v1/jobs/{jid}/approve").json()["status"] == "NeedsApproval"
    time.sleep(1.6)
    conn = sqlite3.connect(server.data_dir / "coordinator.sqlite3")  # the sweep's doing, not an API read's
    status = conn.execute("SELECT status FROM jobs WHERE id = ?", (jid,)).fetchone()[0]
    conn.close()
    assert status == "Error"
    job = user["yorg"].get(f"/v1/jobs/{jid}").json()
    assert job["error"] == ("not approved within 1 s of its submission (no approval from yorg); submit it again if "
                            "it is still wanted")
    late = user["yorg"].post(f"/v1/jobs/{jid}/approve")
    assert late.status_code == 409 and late.json()["error"]["status"] == "Error"
    assert user["xorg"].delete("/v1/dataviews/" + job["task"]["x"]["dataview"]["id"]).status_code == 204  # not held


def test_a_started_job_whose_workers_all_went_away_ends_once_their_messages_would_have_expired(start_cape_server):
    """A live worker gives up a silent partner itself; a job whose workers all went away for good (an organization
    that retired its worker) showed Started for ever, holding its project and dataviews. After --message-ttl without
    a report (what was sent to them expired then) and with none of them online, it ends in Error naming them."""
    server = start_cape_server(extra_args=["--job-sweep-seconds", "0.2", "--message-ttl", "1.5"])
    world = build_job_world(server)
    jid, user, worker = world["job"]["id"], world["user"], world["worker"]
    for label in ("xorg", "yorg", "helper"):
        assert worker[label].post(f"/v1/worker/jobs/{jid}/report", json={"state": "running"}).status_code == 204
        assert worker[label].post("/v1/worker/heartbeat", json={}).status_code == 204
    assert worker["helper"].post(f"/v1/worker/jobs/{jid}/report", json={"state": "completed"}).status_code == 204
    assert user["xorg"].get(f"/v1/jobs/{jid}").json()["status"] == "Started"
    time.sleep(2.2)  # silent past the TTL, but its workers online (a long step, say): theirs to judge
    assert user["xorg"].get(f"/v1/jobs/{jid}").json()["status"] == "Started"
    for label in ("xorg", "yorg"):  # the helper, done with its part, stays online: it cannot finish the job
        assert worker[label].post("/v1/worker/heartbeat", json={"stopping": True}).status_code == 204
    deadline = time.monotonic() + 5
    while (job := user["yorg"].get(f"/v1/jobs/{jid}").json())["status"] == "Started" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert job["status"] == "Error"
    assert job["error"] == ("no report from its workers for 1.5 s and none of x_owner (xorg), y_owner (yorg) is "
                            "online; the broker keeps undelivered messages that long, so the job cannot go on: submit "
                            "it again once their workers run")
    assert user["xorg"].delete("/v1/dataviews/" + job["task"]["x"]["dataview"]["id"]).status_code == 204  # not held


def test_silence_while_the_server_was_down_does_not_end_a_started_job(start_cape_server):
    """Workers cannot report to a server that is down, and after a long outage their first heartbeats come after its
    first sweep: only silence while it ran counts."""
    server = start_cape_server(extra_args=["--job-sweep-seconds", "0.2", "--message-ttl", "1.5"])
    world = build_job_world(server)
    jid, user, worker = world["job"]["id"], world["user"], world["worker"]
    for label in ("xorg", "yorg", "helper"):
        assert worker[label].post(f"/v1/worker/jobs/{jid}/report", json={"state": "running"}).status_code == 204
        assert worker[label].post("/v1/worker/heartbeat", json={"stopping": True}).status_code == 204
    server.stop()
    time.sleep(2.0)  # down longer than the TTL, the job's workers offline
    server.start()
    restarted = time.monotonic()
    assert user["xorg"].get(f"/v1/jobs/{jid}").json()["status"] == "Started"
    time.sleep(max(0.0, restarted + 1.0 - time.monotonic()))  # several sweeps, before 1.5 s of its own
    assert user["xorg"].get(f"/v1/jobs/{jid}").json()["status"] == "Started"
    deadline = time.monotonic() + 5
    while (job := user["yorg"].get(f"/v1/jobs/{jid}").json())["status"] == "Started" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert job["status"] == "Error" and time.monotonic() - restarted >= 1.5


def test_a_clock_step_ends_no_started_job_whose_workers_heartbeat_again(start_cape_server):
    """The silence is read from stored wall-clock times: a clock stepped (or a machine resumed) days ahead made every
    Started job look silent at once, its workers offline until their next heartbeat. A job is ended only when a sweep
    a confirmation later finds it still silent and its workers still offline."""
    from datetime import UTC, datetime, timedelta

    from services.coordinator.abandoned_jobs import CONFIRM_SECONDS, AbandonedJobs
    from services.coordinator.db import Database

    server = start_cape_server()
    world = build_job_world(server)
    jid, worker = world["job"]["id"], world["worker"]
    for label in ("xorg", "yorg", "helper"):
        assert worker[label].post(f"/v1/worker/jobs/{jid}/report", json={"state": "running"}).status_code == 204

    def heartbeats(**body) -> None:
        for label in ("xorg", "yorg", "helper"):
            assert worker[label].post("/v1/worker/heartbeat", json=body).status_code == 204

    heartbeats(stopping=True)  # offline, as workers look in the instant after a step
    clock = [0.0]
    abandoned = AbandonedJobs(7 * 86400, clock=lambda: clock[0])
    stepped = datetime.now(UTC) + timedelta(days=8)  # every report looks 8 days old
    db = Database(server.data_dir / "coordinator.sqlite3")
    try:
        def sweep() -> int:
            with db.transaction() as conn:
                return abandoned.sweep(conn, now=stepped)

        def status() -> str:
            with db.transaction() as conn:
                return conn.execute("SELECT status FROM jobs WHERE id = ?", (jid,)).fetchone()[0]

        clock[0] = 7 * 86400 - 1
        assert sweep() == 0  # the server has not run for the TTL: its silence does not count yet
        clock[0] = 8 * 86400
        assert sweep() == 0 and status() == "Started"  # found; confirmed only a sweep later
        heartbeats()  # the workers' next heartbeats
        clock[0] += CONFIRM_SECONDS
        assert sweep() == 0 and status() == "Started"
        heartbeats(stopping=True)  # now they went away for good
        clock[0] += 1
        assert sweep() == 0 and status() == "Started"  # found afresh
        clock[0] += CONFIRM_SECONDS
        assert sweep() == 1 and status() == "Error"
    finally:
        db.close()


def test_reject_and_stop(cape_server):
    world = build_job_world(cape_server, approve=False)
    jid, user = world["job"]["id"], world["user"]
    rejected = user["yorg"].post(f"/v1/jobs/{jid}/reject", json={"reason": "not this quarter"}).json()
    assert rejected["status"] == "Rejected"
    assert rejected["error"] == "rejected by yorg: not this quarter"
    assert rejected["approvals"]["yorg"] == "rejected"
    assert user["xorg"].post(f"/v1/jobs/{jid}/approve").status_code == 409
    assert user["xorg"].post(f"/v1/jobs/{jid}/stop").status_code == 409

    second = user["xorg"].post("/v1/projects/demo/jobs", json={
        "type": "linear_regression", "x": {"dataview": "xs", "columns": ["a"]}, "y": {"dataview": "ys", "column": "t"},
        "model_owner": "xorg"}).json()
    assert second["outputs_to"] == "x_owner" and second["task"]["timeout"] == 600
    for label in ("xorg", "yorg"):
        assert user[label].post(f"/v1/jobs/{second['id']}/approve").status_code == 200
    for label in ("xorg", "yorg", "helper"):
        assert world["worker"][label].post(f"/v1/worker/jobs/{second['id']}/report", json={
            "state": "running", "progress": 0.99, "message": "uploading the model: its bucket is away; trying again"}
            ).status_code == 204
    stopped = user["helper"].post(f"/v1/jobs/{second['id']}/stop").json()  # a party's org may stop it
    assert stopped["status"] == "Stopped"
    # A seat working when the job ended shows stopped, and what it said then as such (not as if it still tried).
    assert {(seat["state"], seat["message"]) for seat in stopped["parties"].values()} == {
        ("stopped", "when the job ended: uploading the model: its bucket is away; trying again")}
    report = world["worker"]["helper"].post(f"/v1/worker/jobs/{second['id']}/report", json={"state": "started"})
    assert report.status_code == 409 and report.json()["error"]["status"] == "Stopped"


def test_model_owner_outside_data_owners_takes_third_seat(cape_server):
    world = build_job_world(cape_server, approve=False)
    user = world["user"]
    # `helper` org as model owner: it gets the model_owner seat and the outputs.
    job = user["xorg"].post("/v1/projects/demo/jobs", json={
        "type": "linear_regression", "x": {"dataview": "xs", "columns": ["b", "a"]},
        "y": {"dataview": "ys", "column": "t"}, "model_owner": "helper"}).json()
    assert set(job["parties"]) == {"x_owner", "y_owner", "model_owner"}
    assert job["outputs_to"] == "model_owner"
    assert job["task"]["x"]["columns"] == ["b", "a"]
    del_helper = user["xorg"].put("/v1/projects/demo/helper", json={"organization": None})
    assert del_helper.json()["helper"] is None
    no_helper = user["xorg"].post("/v1/projects/demo/jobs", json={
        "type": "linear_regression", "x": {"dataview": "xs", "columns": ["a"]},
        "y": {"dataview": "ys", "column": "t"}, "model_owner": "yorg"})
    assert no_helper.status_code == 422
    assert no_helper.json()["error"]["message"].startswith("field 'helper':")


def test_a_database_from_before_the_status_index_gets_it_and_still_serves_workers(start_cape_server):
    server = start_cape_server()
    world = build_job_world(server)
    server.stop()
    with sqlite3.connect(server.data_dir / "coordinator.sqlite3") as conn:  # as an older version left it
        conn.execute("DROP INDEX jobs_status")
    server.start()
    with sqlite3.connect(server.data_dir / "coordinator.sqlite3") as conn:
        assert conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'jobs_status'").fetchone()
    served = Api(server, world["orgs"]["xorg"]["organization_token"]).get("/v1/worker/jobs")
    assert served.status_code == 200 and [job["id"] for job in served.json()] == [world["job"]["id"]]
    assert served.json()[0]["seat"] == "x_owner"


def test_a_projects_jobs_can_be_listed_by_status_and_most_recent(cape_server):
    """A busy project has thousands of jobs: the list takes a status filter and a limit (a page, newest first)."""
    from services.client import Cape
    from services.client.errors import BadArgument

    world = build_job_world(cape_server, approve=False)
    user = world["user"]["yorg"]
    submitted = [world["job"]] + [user.post("/v1/projects/demo/jobs", json={
        "type": "linear_regression", "x": {"dataview": "xs", "columns": ["a", "b"]},
        "y": {"dataview": "ys", "column": "t"}, "model_owner": "yorg", "timeout": 600}).json() for _ in range(4)]
    ids = [job["id"] for job in reversed(newest_first(submitted))]  # oldest first (the id orders one millisecond's)
    assert user.post(f"/v1/jobs/{ids[1]}/stop").status_code == 200
    assert user.post(f"/v1/jobs/{ids[3]}/stop").status_code == 200

    def listed(**params) -> list[str]:
        answer = user.get("/v1/projects/demo/jobs", params=params)
        assert answer.status_code == 200, answer.text
        return [job["id"] for job in answer.json()]

    assert listed() == ids[::-1]  # every job (fewer than a page), newest first
    assert listed(limit=2) == [ids[4], ids[3]]
    assert listed(status="Stopped") == [ids[3], ids[1]]
    assert listed(status=["Stopped", "NeedsApproval"], limit=3) == [ids[4], ids[3], ids[2]]
    assert user.get("/v1/projects/demo/jobs", params={"status": "Done"}).status_code == 422
    assert user.get("/v1/projects/demo/jobs", params={"limit": 0}).status_code == 422

    project = Cape(endpoint=cape_server.url, token=world["orgs"]["yorg"]["user_token"]).get_project("demo")
    # The SDK's list keeps its order: the most recent `limit`, oldest first.
    assert [job.id for job in project.list_jobs(status="NeedsApproval", limit=2)] == [ids[2], ids[4]]
    with pytest.raises(BadArgument, match="^limit must be a positive whole number of jobs, not 0$"):
        project.list_jobs(limit=0)
