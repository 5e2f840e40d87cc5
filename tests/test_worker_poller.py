"""The poller against the real cape-server: login, keys, jobs into the spool, reports, ended jobs, backoff."""
import logging
import os
import threading
import time

import pytest

from services.worker import health
from services.worker.config import WorkerConfig
from services.worker.coordinator_client import CoordinatorAuthError, CoordinatorClient
from services.worker.keys import WorkerKeys
import services.worker.poller as poller_mod
from services.worker.poller import Backoff, Poller
from services.worker.spool import Spool
from tests.support.aws import free_port
from tests.support.server import build_job_world, worker_public_keys


def make_poller(tmp_path, url, token):
    config = WorkerConfig.from_env({"CAPE_TOKEN": token, "CAPE_COORDINATOR": url, "CAPE_WORKER_NAME": "w",
                                    "CAPE_SPOOL_DIR": str(tmp_path / "spool"), "CAPE_STATE_DIR": str(tmp_path / "st"),
                                    "CAPE_POLL_INTERVAL": "0.05"})
    keys = WorkerKeys.load_or_create(config.state_dir)
    return Poller(config, CoordinatorClient(url, token, timeout=5), Spool(config.spool_dir), keys), keys


@pytest.fixture(scope="module")
def module_world(shared_cape_server):
    return build_job_world(shared_cape_server)


@pytest.fixture
def cape_server(shared_cape_server):
    return shared_cape_server


@pytest.fixture
def world(module_world):
    """The module's organizations and project with a fresh approved job per test."""
    user = module_world["user"]
    job = user["xorg"].post("/v1/projects/demo/jobs", json={
        "type": "linear_regression", "x": {"dataview": "xs", "columns": ["a", "b"]},
        "y": {"dataview": "ys", "column": "t"}, "model_owner": "yorg", "timeout": 600}).json()
    assert user["xorg"].post(f"/v1/jobs/{job['id']}/approve").status_code == 200
    assert user["yorg"].post(f"/v1/jobs/{job['id']}/approve").status_code == 200
    return {**module_world, "job": job}


def test_fetches_approved_job_into_spool_and_registers_keys(cape_server, world, tmp_path):
    poller, keys = make_poller(tmp_path, cape_server.url, world["orgs"]["xorg"]["organization_token"])
    poller.cycle()
    job_id = world["job"]["id"]
    spec = poller.spool.read_job(job_id)
    assert spec["seat"] == "x_owner" and spec["status"] == "Approved"
    assert spec["parties"]["x_owner"]["encryption_public_key"] == keys.encryption_public_b64
    assert spec["parties"]["x_owner"]["signing_public_key"] == keys.signing_public_b64
    assert spec["task"]["x"]["dataview"]["uri"] == "file:///data/x.csv"


def test_reports_status_in_order_and_removes_only_accepted(cape_server, world, tmp_path):
    poller, _ = make_poller(tmp_path, cape_server.url, world["orgs"]["xorg"]["organization_token"])
    poller.cycle()
    job_id = world["job"]["id"]
    poller.spool.put_status(job_id, {"state": "started", "progress": 0.0})
    poller.spool.put_status(job_id, {"state": "running", "progress": 0.5, "message": "halfway"})
    poller.cycle()
    assert poller.spool.pending_status() == []
    job = world["user"]["xorg"].get(f"/v1/jobs/{job_id}").json()
    party = job["parties"]["x_owner"]
    assert (party["state"], party["progress"]) == ("running", 0.5)


def test_unreachable_coordinator_keeps_reports_for_later(cape_server, world, tmp_path):
    poller, _ = make_poller(tmp_path, cape_server.url, world["orgs"]["xorg"]["organization_token"])
    poller.cycle()
    job_id = world["job"]["id"]
    poller.spool.put_status(job_id, {"state": "started", "progress": 0.0})
    poller.client.base_url = f"http://127.0.0.1:{free_port()}"
    poller.run(max_cycles=2)  # logs and backs off, never raises
    assert len(poller.spool.pending_status()) == 1
    poller.client.base_url = cape_server.url
    poller.cycle()
    assert poller.spool.pending_status() == []


def test_stopped_job_is_marked_ended_in_spool(cape_server, world, tmp_path):
    poller, _ = make_poller(tmp_path, cape_server.url, world["orgs"]["yorg"]["organization_token"])
    poller.cycle()
    job_id = world["job"]["id"]
    assert poller.spool.ended(job_id) is None
    assert world["user"]["xorg"].post(f"/v1/jobs/{job_id}/stop").status_code == 200
    poller.cycle()
    assert poller.spool.ended(job_id)["status"] == "Stopped"


def test_a_cycle_forgets_finished_jobs_beyond_the_most_recent(cape_server, world, tmp_path, monkeypatch):
    monkeypatch.setattr("services.worker.spool.FINISHED_JOBS_KEPT", 1)
    poller, _ = make_poller(tmp_path, cape_server.url, world["orgs"]["yorg"]["organization_token"])
    for job in ("finished1", "finished2"):
        poller.spool.put_job({"id": job, "seat": "y_owner"})
        poller.spool.mark_done(job, "completed")
        poller.spool.mark_ended(job, "Completed")
    os.utime(poller.spool.job_dir("finished1") / "ended.json", ns=(0, 0))
    poller.cycle()
    assert "finished1" not in poller.spool.job_ids() and "finished2" in poller.spool.job_ids()
    assert world["job"]["id"] in poller.spool.job_ids()  # the job still served is kept


def test_report_refused_with_409_marks_job_ended(cape_server, world, tmp_path):
    poller, _ = make_poller(tmp_path, cape_server.url, world["orgs"]["yorg"]["organization_token"])
    poller.cycle()
    job_id = world["job"]["id"]
    world["user"]["xorg"].post(f"/v1/jobs/{job_id}/stop")
    poller.spool.put_status(job_id, {"state": "running", "progress": 0.2})
    poller.send_status()  # before noticing the stop through the job list
    assert poller.spool.ended(job_id)["status"] == "Stopped"
    assert poller.spool.pending_status() == []


def test_bad_token_is_an_auth_error_not_a_crash(cape_server, tmp_path, caplog, monkeypatch):
    poller, _ = make_poller(tmp_path, cape_server.url, "nosuchid,ZHVtbXktc2VjcmV0LWR1bW15LXNlY3JldA==")
    with pytest.raises(CoordinatorAuthError, match="refused CAPE_TOKEN"):
        poller.cycle()
    caplog.set_level(logging.INFO, logger="cape.poller")
    delays = []
    monkeypatch.setattr(poller_mod.time, "sleep", delays.append)
    poller.run(max_cycles=2)
    assert delays == [10.0, 10.0]  # a refused token is retried slowly, never a crash loop
    assert "refused CAPE_TOKEN" in caplog.text and "ZHVtbXkt" not in caplog.text


def test_a_refused_token_is_recorded_for_the_health_check_until_accepted(cape_server, world, tmp_path, caplog,
                                                                         monkeypatch):
    """A refused token needs the operator while all four programs still run: the poller records it (no secret in
    the record) for `cape-worker health`, keeps its first time, and forgets it once a cycle succeeds."""
    secret = "ZHVtbXktc2VjcmV0LWR1bW15LXNlY3JldA=="
    poller, _ = make_poller(tmp_path, cape_server.url, f"nosuchid,{secret}")
    run_dir = poller.config.run_dir
    run_dir.mkdir(parents=True)
    monkeypatch.setattr(poller_mod.time, "sleep", lambda _seconds: None)
    caplog.set_level(logging.INFO, logger="cape.poller")
    poller.run(max_cycles=1)
    first = health.read_login_refused(run_dir)
    assert first is not None and first["message"].startswith(
        f"the coordinator at {cape_server.url} refused CAPE_TOKEN (")
    assert "cape orgs create-token ORG" in first["message"]
    assert secret not in (run_dir / health.LOGIN_REFUSED_NAME).read_text()
    assert health.login_refused_line(first).startswith("the coordinator refuses CAPE_TOKEN (since 20")
    poller.run(max_cycles=1)
    assert health.read_login_refused(run_dir) == first  # still the first refusal's time

    poller.client = CoordinatorClient(cape_server.url, world["orgs"]["xorg"]["organization_token"], timeout=5)
    poller.run(max_cycles=1)
    assert health.read_login_refused(run_dir) is None
    assert "the coordinator accepts CAPE_TOKEN again" in caplog.text


def test_backoff_doubles_and_caps():
    backoff = Backoff(0.5, cap=4)
    assert [backoff.next_delay() for _ in range(6)] == [0.5, 1, 2, 4, 4, 4]
    backoff.reset()
    assert backoff.next_delay() == 0.5


def submit_job(world):
    user = world["user"]
    return user["xorg"].post("/v1/projects/demo/jobs", json={
        "type": "linear_regression", "x": {"dataview": "xs", "columns": ["a", "b"]},
        "y": {"dataview": "ys", "column": "t"}, "model_owner": "yorg", "timeout": 600}).json()


def test_job_list_long_poll_answers_when_a_job_is_approved(cape_server, module_world):
    worker = module_world["worker"]["helper"]
    first = worker.get("/v1/worker/jobs")
    version = int(first.headers["X-Cape-Jobs-Version"])
    # Nothing changes: the poll waits its full time, then answers with the same version.
    started = time.monotonic()
    quiet = worker.get("/v1/worker/jobs", params={"wait": 0.3, "after": version})
    assert 0.25 <= time.monotonic() - started < 2.0
    assert int(quiet.headers["X-Cape-Jobs-Version"]) == version and quiet.json() == first.json()
    # The last approval while a poll waits: the poll answers with the new job right away, not after its 20 s.
    job = submit_job(module_world)
    assert module_world["user"]["xorg"].post(f"/v1/jobs/{job['id']}/approve").status_code == 200
    version = int(worker.get("/v1/worker/jobs").headers["X-Cape-Jobs-Version"])
    answer: dict = {}
    waiter = threading.Thread(target=lambda: answer.update(
        response=worker.get("/v1/worker/jobs", params={"wait": 20, "after": version}), at=time.monotonic()))
    waiter.start()
    time.sleep(0.2)
    assert module_world["user"]["yorg"].post(f"/v1/jobs/{job['id']}/approve").status_code == 200
    approved = time.monotonic()
    waiter.join(timeout=10)
    assert not waiter.is_alive()
    assert answer["at"] - approved < 1.0
    assert job["id"] in [j["id"] for j in answer["response"].json()]
    assert int(answer["response"].headers["X-Cape-Jobs-Version"]) > version
    # A version the server does not hold (say, from before its restart) is answered at once.
    started = time.monotonic()
    worker.get("/v1/worker/jobs", params={"wait": 20, "after": version - 1000})
    assert time.monotonic() - started < 1.0


def test_job_list_long_poll_answers_when_the_last_worker_registers_its_keys(start_cape_server):
    """An approved job is served only once all three workers registered keys: the last registration wakes the
    others' long polls, so the job starts then, not at their next full cycle (up to CAPE_POLL_INTERVAL later)."""
    world = build_job_world(start_cape_server(), register_keys=False)
    worker = world["worker"]
    for label in ("xorg", "yorg"):
        assert worker[label].put("/v1/worker/keys", json=worker_public_keys()).status_code == 204
    first = worker["xorg"].get("/v1/worker/jobs")
    assert first.json() == []
    answer: dict = {}
    waiter = threading.Thread(target=lambda: answer.update(response=worker["xorg"].get(
        "/v1/worker/jobs", params={"wait": 20, "after": int(first.headers["X-Cape-Jobs-Version"])}),
        at=time.monotonic()))
    waiter.start()
    time.sleep(0.3)
    assert worker["helper"].put("/v1/worker/keys", json=worker_public_keys()).status_code == 204
    registered = time.monotonic()
    waiter.join(timeout=10)
    assert not waiter.is_alive()
    assert answer["at"] - registered < 1.0
    assert [job["id"] for job in answer["response"].json()] == [world["job"]["id"]]


def test_job_list_long_poll_rejects_a_bad_wait(module_world):
    response = module_world["worker"]["helper"].get("/v1/worker/jobs", params={"wait": 61, "after": 1})
    assert response.status_code == 422


def test_watcher_stores_an_approved_job_and_marks_a_stopped_one_before_the_next_cycle(cape_server, module_world, tmp_path):
    poller, _ = make_poller(tmp_path, cape_server.url, module_world["orgs"]["helper"]["organization_token"])
    poller.cycle()  # logs in and registers keys; the next cycle would be CAPE_POLL_INTERVAL away
    stop = threading.Event()
    watcher = threading.Thread(target=poller.watch_jobs,
                               args=(CoordinatorClient(cape_server.url, module_world["orgs"]["helper"]
                                                       ["organization_token"], timeout=5), stop, 20.0))
    watcher.start()
    try:
        job = submit_job(module_world)
        time.sleep(0.3)  # the watcher is parked in its long poll
        for org in ("xorg", "yorg"):
            module_world["user"][org].post(f"/v1/jobs/{job['id']}/approve")
        deadline = time.monotonic() + 5
        while poller.spool.read_job(job["id"]) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        spec = poller.spool.read_job(job["id"])
        assert spec is not None and spec["seat"] == "helper" and spec["status"] == "Approved"
        # Stopped: the job leaves the list, and the watcher marks it ended at once (the runner drops it then).
        time.sleep(0.3)
        assert module_world["user"]["xorg"].post(f"/v1/jobs/{job['id']}/stop").status_code == 200
        deadline = time.monotonic() + 5
        while poller.spool.ended(job["id"]) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert poller.spool.ended(job["id"]) == {"status": "Stopped", "message": None}
    finally:
        stop.set()
        other = submit_job(module_world)
        module_world["user"]["xorg"].post(f"/v1/jobs/{other['id']}/stop")  # wakes the watcher's poll
        watcher.join(timeout=10)
    assert not watcher.is_alive()
