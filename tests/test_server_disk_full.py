"""cape-server on a disk that refuses writes: reads still answer, writes get a typed 507 in words, the log says so
once (no traceback per request), /healthz reports it, and all is well again once the disk takes writes.

The refusal is the kernel's own: the server's file size limit (RLIMIT_FSIZE, set on the running process) makes
every write to a regular file past its first byte fail with EFBIG, as a full disk fails them with ENOSPC."""
from __future__ import annotations

import queue
import resource
import subprocess
import threading
import time

import pytest
import requests

from tests.support.server import api_error, build_job_world, cape_server_command

pytestmark = pytest.mark.skipif(not hasattr(resource, "prlimit"), reason="needs Linux prlimit")


def test_a_disk_that_refuses_writes_is_said_once_and_reads_still_answer(start_cape_server):
    first = start_cape_server()
    world = build_job_world(first)  # an approved job whose workers may use the broker
    first.stop()
    data_dir = first.data_dir
    token = world["orgs"]["xorg"]["user_token"]
    # stderr through a pipe: the size limit applies to regular files, and the log must still get out.
    server = subprocess.Popen([*cape_server_command(), "serve", "--port", "0", "--data-dir", str(data_dir)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    log: list[str] = []
    threading.Thread(target=lambda: [lines.put(line) for line in server.stdout], daemon=True).start()
    threading.Thread(target=lambda: [log.append(line) for line in server.stderr], daemon=True).start()
    try:
        url = lines.get(timeout=30).split()[-1]
        headers = {"Authorization": f"Bearer {token}"}
        _, hard = resource.prlimit(server.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(server.pid, resource.RLIMIT_FSIZE, (1, hard))  # the soft limit: a user may raise it again

        # The token's first use cannot be recorded: the read answers all the same.
        listed = requests.get(f"{url}/v1/organizations", headers=headers, timeout=10)
        assert listed.status_code == 200 and [o["label"] for o in listed.json()] == ["helper", "xorg", "yorg"]
        for label in ("p1", "p2", "p3"):
            refused = requests.post(f"{url}/v1/projects", headers=headers, json={"label": label}, timeout=10)
            assert refused.status_code == 507, refused.text
            assert refused.json() == {"error": {"code": "server_disk_full", "message": (
                "the server's disk is full or read-only, so it cannot record this; try again later (its operator "
                "must free space)")}}
        # The broker's message bodies live in the same data dir: the same answer, and the same single log line.
        broker_put = requests.put(f"{url}/broker/v1/jobs/{world['job']['id']}/messages/y_owner/x_owner.m1",
                                  data=b"sealed", timeout=10,
                                  headers={"Authorization": f"Bearer {world['orgs']['xorg']['organization_token']}"})
        assert broker_put.status_code == 507 and broker_put.json()["error"]["code"] == "server_disk_full"
        health = requests.get(f"{url}/healthz", timeout=10)
        assert health.status_code == 503 and health.json()["status"] == "degraded"
        assert "refused a write" in health.json()["problem"]
        time.sleep(0.2)  # the log lines of the last request
        text = "".join(log)
        assert text.count("the data dir's disk refuses writes") == 1, text
        assert "Traceback" not in text and "Exception in ASGI application" not in text, text

        resource.prlimit(server.pid, resource.RLIMIT_FSIZE, (hard, hard))
        made = requests.post(f"{url}/v1/projects", headers=headers, json={"label": "p4"}, timeout=10)
        assert made.status_code == 201, made.text
    finally:
        server.terminate()
        server.wait(timeout=15)


def test_below_the_create_reserve_nothing_new_is_taken_and_running_jobs_go_on(start_cape_server):
    """One member creating in bulk (jobs of 1,000 long column names: 200 KB each) filled the disk, and then every
    organization's reports and messages failed. Below --create-reserve-bytes free, nothing new is taken, in words
    naming the cause; the jobs already there still report, stop, and pass messages."""
    server = start_cape_server()
    world = build_job_world(server)
    server.extra_args += ["--create-reserve-bytes", str(2**62)]  # more than any disk has free
    server.restart()
    jid, user, worker = world["job"]["id"], world["user"], world["worker"]
    job = {"type": "linear_regression", "x": {"dataview": "xs", "columns": ["a"]}, "y": {"dataview": "ys",
           "column": "t"}, "model_owner": "yorg"}
    # What the caller may not do is refused for that first (403), not told the server's free space nor logged as
    # refused for room (the diff review: the room was checked before any permission).
    assert api_error(user["helper"].post("/v1/organizations/xorg/users", json={"email": "e@x.example",
                                                                              "role": "user"}), 403)
    assert api_error(user["helper"].post("/v1/organizations/yorg/tokens", json={}), 403)
    for refused in (user["yorg"].post("/v1/projects/demo/jobs", json=job), user["xorg"].post("/v1/projects",
                    json={"label": "more"}), user["xorg"].post("/v1/tokens", json={}),
                    user["xorg"].post("/v1/projects/demo/dataviews", json={"name": "more", "uri": "/d.csv",
                                                                           "schema": [{"name": "a", "type": "number"}]})):
        error = api_error(refused, 507)
        assert error["code"] == "server_disk_low", error
        assert error["message"].endswith("free, less than the 4398046511104 MiB it keeps for the jobs already running, "
                                         "so it takes no new projects, dataviews, jobs, users or tokens; try again "
                                         "once its operator has freed space"), error
    assert worker["xorg"].post("/v1/worker/heartbeat", json={}).status_code == 204
    assert worker["xorg"].post(f"/v1/worker/jobs/{jid}/report", json={"state": "started"}).status_code == 204
    put = worker["xorg"].put(f"/broker/v1/jobs/{jid}/messages/y_owner/x_owner.a", data=b"sealed")
    assert put.status_code == 201, put.text
    assert user["xorg"].post(f"/v1/jobs/{jid}/stop").status_code == 200
    log = server.log_path.read_text()
    assert log.count("below the 4611686018427387904 kept for the jobs already running") == 1  # once a minute
    assert "refused a job from admin@yorg.example" in log
    assert api_error(user["xorg"].get("/v1/projects/more"), 404)  # a refused creation leaves nothing behind


def test_healthz_says_when_the_coordinator_takes_nothing_new(start_cape_server):
    """Below --create-reserve-bytes every new project, dataview, job, user and token is refused: /healthz said "ok"
    all the while, so the operator's monitor stayed green until the broker's own reserve ran out too. It says
    "warning" with the reason, and still 200: the running jobs go on, and a probe draining a 503 would stop them."""
    server = start_cape_server(extra_args=["--create-reserve-bytes", str(2**62)])
    health = requests.get(f"{server.url}/healthz", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "warning", health.text
    problem = health.json()["problem"]
    assert problem.startswith("the data dir's disk has ") and problem.endswith(
        " bytes free, below --create-reserve-bytes (4611686018427387904): the coordinator takes no new projects, "
        "dataviews, jobs, users or tokens"), problem
    unlimited = start_cape_server(extra_args=["--create-reserve-bytes", "0"], name="unlimited")
    assert requests.get(f"{unlimited.url}/healthz", timeout=10).json()["status"] == "ok"
