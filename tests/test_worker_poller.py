"""The poller against the real cape-server: login, keys, jobs into the spool, reports, ended jobs, backoff."""
import errno
import logging
import re
import os
import sqlite3
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
from tests.support.server import Api, build_job_world, worker_public_keys


def shared_keys_dir(tmp_path, token):
    return tmp_path.parent / f"poller-keys-{token.split(',')[0]}"


def make_poller(tmp_path, url, token, state_dir=None):
    """A poller with its own spool. An organization runs one worker (the coordinator refuses other keys while its
    worker is alive), so by default every poller of one token in this session shares its keys."""
    state_dir = state_dir or shared_keys_dir(tmp_path, token)
    config = WorkerConfig.from_env({"CAPE_TOKEN": token, "CAPE_COORDINATOR": url, "CAPE_WORKER_NAME": "w",
                                    "CAPE_SPOOL_DIR": str(tmp_path / "spool"), "CAPE_STATE_DIR": str(state_dir),
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


def test_a_refused_token_is_said_at_once_then_once_a_minute_not_at_every_retry(cape_server, tmp_path, caplog,
                                                                             monkeypatch):
    """A revoked token logged the same ERROR every 10 s while it lasted (360 lines an hour, the alarm on errors
    firing all along), where an unreachable coordinator is said once a minute."""
    from services.worker import outage_log

    poller, _ = make_poller(tmp_path, cape_server.url, "nosuchid,ZHVtbXktc2VjcmV0LWR1bW15LXNlY3JldA==")
    poller.config.run_dir.mkdir(parents=True)
    clock = [1000.0]
    monkeypatch.setattr(outage_log.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(poller_mod.time, "sleep", lambda seconds: clock.__setitem__(0, clock[0] + seconds))
    cycles = [0]
    real_cycle = poller.cycle

    def cycle() -> None:  # 9 refusals of the token, then another reason
        cycles[0] += 1
        if cycles[0] > 9:
            raise CoordinatorAuthError("CAPE_TOKEN is a user token; a worker needs an organization token")
        real_cycle()

    monkeypatch.setattr(poller, "cycle", cycle)
    caplog.set_level(logging.INFO, logger="cape.poller")
    poller.run(max_cycles=11)  # 100 s of retries, 10 s apart
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(said) == 3, said  # the first, once more when a minute passed, and the new reason at once
    assert said[0].startswith(f"the coordinator at {cape_server.url} refused CAPE_TOKEN: token nosuchid is not one")
    assert said[0].endswith("; retrying in 10 s")
    first = said[0].removesuffix("; retrying in 10 s")
    assert re.fullmatch(re.escape(first) + r"; retrying in \d+ s \(failing for (6\d|7\d) s, \d tries\)", said[1])
    assert re.fullmatch(r"CAPE_TOKEN is a user token; a worker needs an organization token; retrying in \d+ s "
                        r"\(failing for \d+ s, 10 tries\)", said[2])


def test_a_refused_token_is_recorded_for_the_health_check_until_accepted(cape_server, world, tmp_path, caplog,
                                                                         monkeypatch):
    """A refused token needs the operator while all four programs still run: the poller records it (no secret in
    the record) for `cape-worker health`, keeps its first time, and forgets it once a cycle succeeds."""
    secret = "ZHVtbXktc2VjcmV0LWR1bW15LXNlY3JldA=="
    xorg = world["orgs"]["xorg"]["organization_token"]  # set below, as a new token: the same worker's keys
    poller, _ = make_poller(tmp_path, cape_server.url, f"nosuchid,{secret}", shared_keys_dir(tmp_path, xorg))
    run_dir = poller.config.run_dir
    run_dir.mkdir(parents=True)
    monkeypatch.setattr(poller_mod.time, "sleep", lambda _seconds: None)
    caplog.set_level(logging.INFO, logger="cape.poller")
    poller.run(max_cycles=1)
    first = health.LOGIN_REFUSED.read(run_dir)
    assert first is not None and first["message"].startswith(
        f"the coordinator at {cape_server.url} refused CAPE_TOKEN: token nosuchid is not one it knows")
    assert "cape orgs create-token ORG" in first["message"]
    assert secret not in (run_dir / health.LOGIN_REFUSED_NAME).read_text()
    assert health.LOGIN_REFUSED.line(first).startswith("the coordinator refuses this worker (since 20")
    poller.run(max_cycles=1)
    assert health.LOGIN_REFUSED.read(run_dir) == first  # still the first refusal's time

    poller.client = CoordinatorClient(cape_server.url, xorg, timeout=5)
    poller.run(max_cycles=1)
    assert health.LOGIN_REFUSED.read(run_dir) is None
    assert "the coordinator accepts this worker again" in caplog.text


def test_a_coordinator_url_without_a_coordinator_is_recorded_for_the_health_check(cape_server, world, tmp_path,
                                                                                  caplog, monkeypatch):
    """CAPE_COORDINATOR one path off (404 on /v1/login): the worker showed healthy and `status` said nothing while it
    retried for ever; and after a refusal cleared, "reachable again" was said of a coordinator that had answered."""
    xorg = world["orgs"]["xorg"]["organization_token"]
    poller, _ = make_poller(tmp_path, f"{cape_server.url}/cape", xorg, shared_keys_dir(tmp_path, xorg))
    run_dir = poller.config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)  # the keys dir is shared by the module's pollers
    monkeypatch.setattr(poller_mod.time, "sleep", lambda _seconds: None)
    caplog.set_level(logging.INFO, logger="cape.poller")
    poller.run(max_cycles=1)
    record = health.COORDINATOR_MISADDRESSED.read(run_dir)
    assert record is not None and record["message"] == (
        f"the server at {cape_server.url}/cape has no POST /v1/login (no such endpoint; see /openapi.json); check "
        "CAPE_COORDINATOR: the coordinator's base URL, without /v1")
    assert health.COORDINATOR_MISADDRESSED in health.HEALTH_RECORDS
    poller.client = CoordinatorClient(cape_server.url, xorg, timeout=5)
    poller.run(max_cycles=1)
    assert health.COORDINATOR_MISADDRESSED.read(run_dir) is None
    assert "reachable again" not in caplog.text  # it answered all along


def test_registered_keys_from_a_coordinator_without_the_route_is_none(cape_server, world, monkeypatch):
    """An older cape-server has /v1/worker/keys for PUT only: its 405 (method_not_allowed) is "no such route", not a
    failure of `cape-worker check`. Simulated here by asking the route with a method it does not take."""
    from services.worker.coordinator_client import CoordinatorNoRoute

    client = CoordinatorClient(cape_server.url, world["orgs"]["xorg"]["organization_token"], timeout=5)
    with pytest.raises(CoordinatorNoRoute, match="405 method_not_allowed"):
        client._request("DELETE", "/v1/worker/keys")
    real = client._request
    monkeypatch.setattr(client, "_request", lambda method, path, **kwargs: real("DELETE", path, **kwargs))
    assert client.registered_keys() is None


def test_backoff_doubles_and_caps_with_jitter():
    backoff = Backoff(0.5, cap=4)
    delays = [backoff.next_delay() for _ in range(6)]
    assert all(0.5 * step <= delay <= step for delay, step in zip(delays, [0.5, 1, 2, 4, 4, 4])), delays
    backoff.reset()
    assert 0.25 <= backoff.next_delay() <= 0.5
    # Workers retrying after the same failure do not all come back at the same moment.
    assert len({round(Backoff(8.0).next_delay(), 3) for _ in range(20)}) > 10


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


def test_progress_reports_wake_no_job_list_long_poll_but_a_status_change_does(world):
    """Every seat reports progress several times per job; waking every worker's long poll for each would make every
    worker fetch its job list again for nothing (the list changes only with a job's status)."""
    worker, job_id = world["worker"], world["job"]["id"]
    report = f"/v1/worker/jobs/{job_id}/report"
    assert worker["xorg"].post(report, json={"state": "started"}).status_code == 204
    version = int(worker["helper"].get("/v1/worker/jobs").headers["X-Cape-Jobs-Version"])
    answer: dict = {}
    started = time.monotonic()
    waiter = threading.Thread(target=lambda: answer.update(
        response=worker["helper"].get("/v1/worker/jobs", params={"wait": 1.5, "after": version}),
        at=time.monotonic()))
    waiter.start()
    time.sleep(0.2)
    for progress in (0.1, 0.5, 0.9):
        assert worker["xorg"].post(report, json={"state": "running", "progress": progress}).status_code == 204
    waiter.join(timeout=10)
    assert answer["at"] - started >= 1.4  # waited its full time
    assert int(answer["response"].headers["X-Cape-Jobs-Version"]) == version
    # The last seat starting moves the job to Started: a poll from the old version answers at once.
    for label in ("yorg", "helper"):
        assert worker[label].post(report, json={"state": "started"}).status_code == 204
    assert world["user"]["xorg"].get(f"/v1/jobs/{job_id}").json()["status"] == "Started"
    started = time.monotonic()
    moved = worker["helper"].get("/v1/worker/jobs", params={"wait": 20, "after": version})
    assert time.monotonic() - started < 1.0
    assert int(moved.headers["X-Cape-Jobs-Version"]) > version


def test_a_job_change_wakes_only_the_polls_of_the_organizations_holding_its_seats(start_cape_server):
    """One version for every organization made each job change wake every worker's poll, each listing its jobs
    again (a user stopping a few jobs a second took 100 workers' polls from 4 to 294 a second)."""
    server = start_cape_server()
    world = build_job_world(server, approve=False)
    outsider = Api(server, server.create_org("outsider")["organization_token"])
    assert outsider.put("/v1/worker/keys", json=worker_public_keys()).status_code == 204
    job_id = world["job"]["id"]
    assert world["user"]["xorg"].post(f"/v1/jobs/{job_id}/approve").status_code == 200
    polls: dict[str, dict] = {}

    def poll(label: str, api: Api) -> None:
        version = int(api.get("/v1/worker/jobs").headers["X-Cape-Jobs-Version"])
        started = time.monotonic()
        response = api.get("/v1/worker/jobs", params={"wait": 2.0, "after": version})
        polls[label] = {"seconds": time.monotonic() - started, "jobs": len(response.json()),
                        "moved": int(response.headers["X-Cape-Jobs-Version"]) != version}

    waiters = [threading.Thread(target=poll, args=("helper", world["worker"]["helper"])),
               threading.Thread(target=poll, args=("outsider", outsider))]
    for waiter in waiters:
        waiter.start()
    time.sleep(0.3)
    assert world["user"]["yorg"].post(f"/v1/jobs/{job_id}/approve").status_code == 200  # the last approval
    for waiter in waiters:
        waiter.join(timeout=10)
    assert polls["helper"]["seconds"] < 1.5 and polls["helper"]["moved"] and polls["helper"]["jobs"] == 1, polls
    assert polls["outsider"]["seconds"] >= 1.9 and not polls["outsider"]["moved"], polls
    assert polls["outsider"]["jobs"] == 0


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
        # Who stopped it (a person's email) stays with the project's members, out of partner organizations' logs.
        assert poller.spool.ended(job["id"]) == {"status": "Stopped", "message": None}
    finally:
        stop.set()
        other = submit_job(module_world)
        module_world["user"]["xorg"].post(f"/v1/jobs/{other['id']}/stop")  # wakes the watcher's poll
        watcher.join(timeout=10)
    assert not watcher.is_alive()


def test_a_second_worker_of_an_organization_is_refused_while_the_first_is_alive(start_cape_server, tmp_path,
                                                                               monkeypatch):
    """A one-off `cape-worker run` with the production token must not replace the running worker's keys (each of
    its jobs would then fail on a key mismatch): it is refused while that worker heartbeats, and says why in the
    health record; once the first has been silent 45 s the second takes the seat, and the first's heartbeat is
    then refused in turn."""
    server = start_cape_server()
    world = build_job_world(server, register_keys=False)
    token = world["orgs"]["xorg"]["organization_token"]
    monkeypatch.setattr(poller_mod.time, "sleep", lambda _seconds: None)
    first, first_keys = make_poller(tmp_path / "first", server.url, token, tmp_path / "first-state")
    first.run(max_cycles=1)
    second, second_keys = make_poller(tmp_path / "second", server.url, token, tmp_path / "second-state")
    second.config.run_dir.mkdir(parents=True)
    second.run(max_cycles=1)
    refused = health.LOGIN_REFUSED.read(second.config.run_dir)
    assert refused is not None and refused["message"].startswith(
        f"the coordinator at {server.url} refused this worker: another worker of this organization, with other keys, "
        "was heard from ")
    assert refused["message"].endswith("s ago; an organization runs one worker: stop the other one (this one "
                                       "registers its keys once the other has been silent for 45 s; if the "
                                       "other was this worker before its state directory was replaced, that is all "
                                       "there is to do)")
    assert world["user"]["xorg"].get("/v1/organizations/xorg/worker").json()["online"] is True
    # Refused, it takes no job either: its messenger would drop the messages sealed for the running worker.
    for label in ("yorg", "helper"):
        assert world["worker"][label].put("/v1/worker/keys", json=worker_public_keys()).status_code == 204
    stop = threading.Event()
    watcher = threading.Thread(target=second.watch_jobs, args=(CoordinatorClient(server.url, token, timeout=5), stop,
                                                               0.5), daemon=True)
    watcher.start()
    first.cycle()
    assert first.spool.read_job(world["job"]["id"]) is not None  # the job is served: the running worker has it
    time.sleep(1.5)
    assert second.spool.read_job(world["job"]["id"]) is None
    db = sqlite3.connect(server.data_dir / "coordinator.sqlite3")
    row = db.execute("SELECT signing_public_key FROM workers WHERE org_id = ?",
                     (world["orgs"]["xorg"]["organization"]["id"],)).fetchone()
    assert row[0] == first_keys.signing_public_b64

    # The first worker goes silent (its machine died, say): the second may now take the seat.
    db.execute("UPDATE workers SET last_seen = '2026-01-01T00:00:00.000Z'")
    db.commit()
    db.close()
    second.run(max_cycles=1)
    assert health.LOGIN_REFUSED.read(second.config.run_dir) is None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and second.spool.read_job(world["job"]["id"]) is None:
        time.sleep(0.05)
    stop.set()
    watcher.join(timeout=5)
    assert second.spool.read_job(world["job"]["id"]) is not None  # holding the seat now, it takes the jobs
    first.last_heartbeat = 0.0  # it comes back and heartbeats: refused, not counted as alive
    first.config.run_dir.mkdir(parents=True, exist_ok=True)
    first.run(max_cycles=1)
    assert "another worker of this organization registered other keys at 20" in \
        health.LOGIN_REFUSED.read(first.config.run_dir)["message"]
    assert second_keys.signing_public_b64 != first_keys.signing_public_b64


def test_heartbeats_keep_coming_when_the_poll_interval_is_long(cape_server, world, tmp_path, monkeypatch):
    """CAPE_POLL_INTERVAL may be an hour; the worker must not look offline (heard from within 45 s) meanwhile."""
    poller, _ = make_poller(tmp_path, cape_server.url, world["orgs"]["xorg"]["organization_token"])
    poller.cycle()
    monkeypatch.setattr(poller_mod, "HEARTBEAT_SECONDS", 0.2)
    beats = []
    real_heartbeat = poller.client.heartbeat
    monkeypatch.setattr(poller.client, "heartbeat", lambda **kw: (beats.append(kw), real_heartbeat(**kw)))
    poller.report_until(time.monotonic() + 1.0)
    assert 3 <= len(beats) <= 6


def test_a_spool_it_cannot_write_is_one_clear_line_and_a_retry(cape_server, world, tmp_path, caplog, monkeypatch):
    """A read-only or broken CAPE_SPOOL_DIR: no traceback, no crash loop; the job is stored once it is fixed."""
    poller, _ = make_poller(tmp_path, cape_server.url, world["orgs"]["xorg"]["organization_token"])
    jobs = poller.spool.root / "jobs"
    jobs.rename(tmp_path / "jobs-aside")
    jobs.write_text("not a folder")  # (tests run as root, for whom a read-only mode is no obstacle)
    monkeypatch.setattr(poller_mod.time, "sleep", lambda _seconds: None)
    caplog.set_level(logging.INFO, logger="cape.poller")
    poller.run(max_cycles=1)
    assert f"cannot write the spool ({jobs}" in caplog.text
    assert "make CAPE_SPOOL_DIR writable by this worker; retrying in" in caplog.text
    assert "Traceback" not in caplog.text
    jobs.unlink()
    (tmp_path / "jobs-aside").rename(jobs)
    poller.run(max_cycles=1)
    assert poller.spool.read_job(world["job"]["id"]) is not None


def test_a_full_spool_volume_is_one_clear_line_and_a_retry_not_a_crash(cape_server, world, tmp_path, caplog,
                                                                       monkeypatch):
    """A full disk refuses a write or an fsync without naming a file: the poller took that for a bug of its own and
    ended, and supervisord's restarts of it ended FATAL, stopping the whole worker (seen on a full tmpfs spool)."""
    poller, _ = make_poller(tmp_path, cape_server.url, world["orgs"]["xorg"]["organization_token"])
    poller.config.run_dir.mkdir(parents=True, exist_ok=True)  # the state dir is shared by this token's pollers
    spool_root = str(poller.spool.root)
    real_fsync = os.fsync

    def full_disk_fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").startswith(spool_root):
            raise OSError(errno.ENOSPC, "No space left on device")  # as the kernel says it: no file name
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk_fsync)
    monkeypatch.setattr(poller_mod.time, "sleep", lambda _seconds: None)
    caplog.set_level(logging.INFO, logger="cape.poller")
    poller.run(max_cycles=3)
    said = [r.getMessage() for r in caplog.records if "cannot write the spool" in r.getMessage()]
    assert len(said) == 1, said  # once, not at every retry (then once a minute while it lasts)
    assert re.search(rf"cannot write the spool \({re.escape(spool_root)}/jobs/\w+/spec\.json: No space left on "
                     r"device\); free space on the volume of CAPE_SPOOL_DIR; retrying in", caplog.text), caplog.text
    assert "Traceback" not in caplog.text
    assert poller.spool.read_job(world["job"]["id"]) is None
    # `health` fails and `status` says it: the seats at the coordinator cannot show it (statuses go through the spool).
    refused = health.SPOOL_REFUSES_WRITES.read(poller.config.run_dir)
    assert re.fullmatch(rf"cannot write {re.escape(spool_root)}/jobs/\w+/spec\.json \(No space left on device\); "
                        "free space on the volume of CAPE_SPOOL_DIR", refused["message"]), refused
    assert health.SPOOL_REFUSES_WRITES in health.HEALTH_RECORDS
    monkeypatch.setattr(os, "fsync", real_fsync)  # space is freed
    poller.run(max_cycles=1)
    assert poller.spool.read_job(world["job"]["id"]) is not None
    assert health.SPOOL_REFUSES_WRITES.read(poller.config.run_dir) is None
    assert "the spool takes writes again" in caplog.text


def test_the_job_watch_outlives_a_spool_that_cannot_record_a_jobs_end(tmp_path, monkeypatch):
    """A full spool refused the ended.json of a job that left the list: the OSError ended the job-watch thread
    (a traceback, and no more immediate pick-up of approved jobs for the poller's life: seen on a full tmpfs)."""
    poller, _ = make_poller(tmp_path, "http://127.0.0.1:9", "tok,c2VjcmV0LXNlY3JldA==", state_dir=tmp_path / "st")
    poller.seat_held.set()
    ended_json = poller.spool.job_dir("j1") / "ended.json"

    class Listing:
        def wait_for_jobs(self, version, wait):
            return [], 1

    class Recording(threading.Event):
        def wait(self, timeout=None):  # the backoff's pauses, without the wait
            return self.is_set()

    stop, calls = Recording(), []

    def notice_ended(served, client=None, statuses=()):
        calls.append(served)
        if len(calls) == 3:
            stop.set()
            return
        raise OSError(errno.ENOSPC, "No space left on device", str(ended_json))

    monkeypatch.setattr(poller, "notice_ended", notice_ended)
    poller.watch_jobs(Listing(), stop, wait=0.1)  # type: ignore[arg-type]
    assert len(calls) == 3


def test_a_job_naming_another_workers_keys_for_our_seat_is_not_taken(start_cape_server, tmp_path, monkeypatch):
    """Cut off from the coordinator for over 45 s, a worker may lose its seat to another; back, its job watcher
    must not store the jobs the other now runs (its runner would end them in Error on the key mismatch)."""
    server = start_cape_server()
    world = build_job_world(server, register_keys=False)
    for label in ("yorg", "helper"):
        assert world["worker"][label].put("/v1/worker/keys", json=worker_public_keys()).status_code == 204
    token = world["orgs"]["xorg"]["organization_token"]
    first, _ = make_poller(tmp_path / "first", server.url, token, tmp_path / "first-state")
    first.start()  # registered, not heartbeating yet: the coordinator sees no live worker
    other = worker_public_keys()
    assert world["worker"]["xorg"].put("/v1/worker/keys", json=other).status_code == 204  # the seat is taken
    assert first.store_jobs(first.client.jobs()) == {world["job"]["id"]}
    assert first.spool.read_job(world["job"]["id"]) is None
    assert not first.seat_held.is_set() and first.registered is False


def test_a_seats_completed_report_still_reaches_a_job_completed_meanwhile(cape_server, world, tmp_path):
    """During an outage the output seat completed the job; this seat's own queued "completed" is still taken (its
    progress reports are not), so the job does not show this seat pending for ever."""
    job_id, worker = world["job"]["id"], world["worker"]
    report = f"/v1/worker/jobs/{job_id}/report"
    for label in ("xorg", "yorg", "helper"):
        assert worker[label].post(report, json={"state": "started"}).status_code == 204
    assert worker["yorg"].post(report, json={"state": "completed", "metrics": {"mse_result": 1.0,
                                                                               "r_squared_result": 0.5}}
                               ).status_code == 204
    poller, _ = make_poller(tmp_path, cape_server.url, world["orgs"]["xorg"]["organization_token"])
    poller.spool.put_job({**world["job"], "seat": "x_owner"})
    poller.spool.put_status(job_id, {"state": "running", "progress": 0.5})
    poller.spool.put_status(job_id, {"state": "completed", "progress": 1.0})
    poller.spool.mark_ended(job_id, "Completed")
    poller.send_status()
    assert poller.spool.pending_status() == []
    party = world["user"]["xorg"].get(f"/v1/jobs/{job_id}").json()["parties"]["x_owner"]
    assert (party["state"], party["progress"]) == ("completed", 1.0)


def _started_then_x_owner_error(world, message: str) -> str:
    """Every seat of the world's job took its seat, then the x-owner reported `message` as its error; the job's id."""
    job_id, worker = world["job"]["id"], world["worker"]
    report = f"/v1/worker/jobs/{job_id}/report"
    for label in ("xorg", "yorg", "helper"):
        assert worker[label].post(report, json={"state": "started"}).status_code == 204
    assert worker["xorg"].post(report, json={"state": "error", "message": message}).status_code == 204
    return job_id


def test_a_seats_own_error_still_reaches_a_job_a_partners_relay_of_it_ended(cape_server, world, tmp_path):
    """A partner told to stop by this seat ("the y_owner stopped the job ... (see its error)") reported first and its
    job watch marked the job ended here at once: this seat's own queued error was dropped, and the job pointed at
    an error shown nowhere."""
    relay = "the y_owner stopped the job: its y column is constant (see its error)"
    job_id = _started_then_x_owner_error(world, relay)
    poller, _ = make_poller(tmp_path, cape_server.url, world["orgs"]["yorg"]["organization_token"])
    poller.spool.put_job({**world["job"], "seat": "y_owner"})
    own = "dataview 'ys': column 't' is constant (all its values are equal); a regression needs a target that varies"
    poller.spool.put_status(job_id, {"state": "running", "progress": 0.1})
    poller.spool.put_status(job_id, {"state": "error", "progress": 0.0, "message": own})
    poller.notice_ended({job_id} - {job_id}, poller.client)  # what the job watch does once the job left the list
    assert (poller.spool.ended(job_id) or {}).get("status") == "Error"
    poller.send_status()
    assert poller.spool.pending_status() == []
    job = world["user"]["yorg"].get(f"/v1/jobs/{job_id}").json()
    assert job["error"] == f"y_owner (yorg): {own}"
    assert (job["parties"]["y_owner"]["state"], job["parties"]["y_owner"]["message"]) == ("error", own)


def test_retries_after_an_outage_start_at_seconds_whatever_the_poll_interval(tmp_path, monkeypatch, caplog):
    """At the 10 s default interval the first retry came 10 s after a failure, then 20 and 30, without heartbeats:
    a coordinator restart could show the worker offline."""
    from services.worker import poller as poller_module

    config = WorkerConfig.from_env({"CAPE_TOKEN": "tok,c2VjcmV0LXNlY3JldA==", "CAPE_WORKER_NAME": "w",
                                    "CAPE_COORDINATOR": f"http://127.0.0.1:{free_port()}",
                                    "CAPE_SPOOL_DIR": str(tmp_path / "spool"), "CAPE_STATE_DIR": str(tmp_path / "st")})
    assert config.poll_interval == 10.0
    poller = Poller(config, CoordinatorClient(config.coordinator, config.token, timeout=2), Spool(config.spool_dir),
                    WorkerKeys.load_or_create(config.state_dir))
    delays: list[float] = []
    monkeypatch.setattr(poller_module.time, "sleep", delays.append)
    monkeypatch.setattr(poller_module, "UNHEALTHY_AFTER_SECONDS", 0.0)  # as if these three tries took an hour
    config.run_dir.mkdir(parents=True)
    caplog.set_level(logging.INFO, logger="cape.poller")
    poller.run(max_cycles=3)
    assert all(step / 2 <= delay <= step for delay, step in zip(delays, [2.0, 4.0, 8.0], strict=True)), delays
    # Said once, not once per try (an outage of hours was thousands of lines), and once past the health bound.
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(f"cannot reach the coordinator at {config.coordinator} "), \
        warnings
    assert warnings[0].endswith(f"check CAPE_COORDINATOR and the network; retrying in {delays[0]:.1f} s")
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [f"the coordinator at {config.coordinator} has been unreachable for over 0 min: `cape-worker "
                      "health` now fails; if it moved, set CAPE_COORDINATOR to its new URL"]


def test_a_worker_whose_keys_the_coordinator_lost_registers_them_again(start_cape_server, tmp_path, caplog,
                                                                       monkeypatch):
    """The coordinator's data restored from a backup taken before the worker first started: keys are registered
    once per start, so every job failed for want of them ("start that organization's worker") while the worker
    looked healthy. The heartbeat is refused with keys_not_registered, and the worker registers them again."""
    server = start_cape_server()
    world = build_job_world(server, register_keys=False)
    for label in ("yorg", "helper"):
        assert world["worker"][label].put("/v1/worker/keys", json=worker_public_keys()).status_code == 204
    token = world["orgs"]["xorg"]["organization_token"]
    monkeypatch.setattr(poller_mod.time, "sleep", lambda _seconds: None)
    poller, keys = make_poller(tmp_path, server.url, token, tmp_path / "state")
    poller.run(max_cycles=1)
    assert world["user"]["xorg"].get("/v1/organizations/xorg/worker").json()["registered"] is True

    db = sqlite3.connect(server.data_dir / "coordinator.sqlite3")  # what a restore of the older backup leaves
    db.execute("DELETE FROM workers")
    db.commit()
    db.close()
    refused = world["worker"]["xorg"].post("/v1/worker/heartbeat", json={"signing_public_key": keys.signing_public_b64})
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "keys_not_registered"
    assert world["worker"]["xorg"].post("/v1/worker/heartbeat", json={}).status_code == 204  # keyless: counted

    caplog.set_level(logging.INFO, logger="cape.poller")
    poller.last_heartbeat = 0.0  # the next heartbeat is due
    poller.run(max_cycles=1)
    assert "the coordinator holds no keys for this worker" in caplog.text
    status = world["user"]["xorg"].get("/v1/organizations/xorg/worker").json()
    assert status["registered"] is True and status["online"] is True
    poller.cycle()
    assert poller.spool.read_job(world["job"]["id"]) is not None  # the job is served to it again


def test_a_final_report_the_coordinator_lost_is_sent_again(start_cape_server, tmp_path, caplog, monkeypatch):
    """The coordinator's data restored from a backup taken while the job was Started, after which it completed:
    every seat had reported its end, nobody reported again, and the job stayed Started for ever. A served job whose
    seat the coordinator shows unfinished gets the seat's kept final report again."""
    server = start_cape_server()
    world = build_job_world(server)
    job_id = world["job"]["id"]
    monkeypatch.setattr(poller_mod.time, "sleep", lambda _seconds: None)
    pollers = {label: make_poller(tmp_path / label, server.url, world["orgs"][label]["organization_token"])[0]
               for label in ("xorg", "yorg")}
    pollers["xorg"].cycle()
    pollers["xorg"].spool.put_status(job_id, {"state": "started", "progress": 0.0})
    pollers["xorg"].spool.put_status(job_id, {"state": "completed", "progress": 1.0})
    pollers["xorg"].cycle()
    assert pollers["xorg"].spool.reported(job_id) == {"state": "completed", "progress": 1.0}
    assert world["user"]["xorg"].get(f"/v1/jobs/{job_id}").json()["parties"]["x_owner"]["state"] == "completed"

    db = sqlite3.connect(server.data_dir / "coordinator.sqlite3")  # what the older backup held
    db.execute("UPDATE job_parties SET state = 'running', progress = 0.5 WHERE job_id = ?", (job_id,))
    db.commit()
    db.close()
    caplog.set_level(logging.INFO, logger="cape.poller")
    pollers["xorg"].cycle()
    assert f"job {job_id}: the coordinator shows this seat running although it reported completed" in caplog.text
    assert world["user"]["xorg"].get(f"/v1/jobs/{job_id}").json()["parties"]["x_owner"]["state"] == "completed"
    pollers["xorg"].cycle()  # said once: the coordinator has it now
    assert caplog.text.count("reporting it again") == 1

    # The output seat's kept report carries the metrics: sent again, it completes the job.
    metrics = {"mse_result": 0.5, "r_squared_result": 0.9}
    pollers["yorg"].cycle()
    pollers["yorg"].spool.put_status(job_id, {"state": "completed", "progress": 1.0, "metrics": metrics},
                                     source="uploader")
    pollers["yorg"].send_status()  # taken (the job Completed), then lost by the restore
    db = sqlite3.connect(server.data_dir / "coordinator.sqlite3")
    db.execute("UPDATE job_parties SET state = 'running' WHERE job_id = ? AND seat = 'y_owner'", (job_id,))
    db.execute("UPDATE jobs SET status = 'Started', metrics_json = NULL WHERE id = ?", (job_id,))
    db.commit()
    db.close()
    pollers["yorg"].cycle()
    assert world["user"]["yorg"].get(f"/v1/jobs/{job_id}").json()["status"] == "Completed"
    assert world["user"]["yorg"].get(f"/v1/jobs/{job_id}/results").json()["metrics"] == metrics


def test_a_stopping_worker_says_so_and_its_seats_show_it_offline_at_once(start_cape_server, tmp_path, caplog):
    """`docker stop` of a worker left its seats showing it online for 45 s, hiding why its jobs waited."""
    server = start_cape_server()
    world = build_job_world(server, register_keys=False)
    token = world["orgs"]["xorg"]["organization_token"]
    poller, _ = make_poller(tmp_path, server.url, token, state_dir=tmp_path / "state")
    poller.say_stopping()  # not registered yet: nothing to say
    poller.cycle()
    job_id = world["job"]["id"]
    assert world["user"]["xorg"].get(f"/v1/jobs/{job_id}").json()["parties"]["x_owner"]["worker_online"] is True
    with caplog.at_level(logging.INFO, logger="cape.poller"):
        poller.say_stopping()
    assert "told the coordinator this worker is stopping" in caplog.text
    job = world["user"]["xorg"].get(f"/v1/jobs/{job_id}").json()
    assert job["parties"]["x_owner"]["worker_online"] is False
    assert world["user"]["xorg"].get("/v1/organizations/xorg/worker").json()["stopped_at"]
    # A coordinator that cannot be reached does not hold the stop up for long.
    unreachable, _ = make_poller(tmp_path / "other", f"http://127.0.0.1:{free_port()}", token,
                                 state_dir=tmp_path / "state")
    unreachable.registered = True
    started = time.monotonic()
    unreachable.say_stopping()
    assert time.monotonic() - started < 3.0


@pytest.mark.parametrize("error, longest", [("unreachable", 4.0), ("refused", 30.0)])
def test_the_job_watch_looks_again_soon_after_an_outage_but_not_after_a_refusal(tmp_path, error, longest):
    """The watch's short cap (the cycle covers longer outages) made a worker with a revoked token ask every 2-4 s
    for ever; a refusal keeps the long backoff."""
    import threading

    from services.worker.coordinator_client import CoordinatorAuthError, CoordinatorUnreachable

    poller, _ = make_poller(tmp_path, "http://127.0.0.1:9", "tok,c2VjcmV0LXNlY3JldA==", state_dir=tmp_path / "st")
    poller.seat_held.set()
    raised = CoordinatorUnreachable("down") if error == "unreachable" else CoordinatorAuthError("revoked")

    class Failing:
        def wait_for_jobs(self, version, wait):
            raise raised

    class Recording(threading.Event):
        delays: list[float] = []

        def wait(self, timeout=None):
            self.delays.append(timeout)
            if len(self.delays) >= 8:
                self.set()
            return self.is_set()

    stop = Recording()
    poller.watch_jobs(Failing(), stop, wait=0.1)  # type: ignore[arg-type]
    assert len(stop.delays) == 8 and max(stop.delays) <= longest
    assert max(stop.delays) > longest / 2, stop.delays  # it does reach the cap: 30 s for a refusal, not 4


def test_a_coordinator_older_than_the_heartbeats_key_check_still_gets_heartbeats_and_reports(
        cape_server, world, tmp_path, caplog, monkeypatch):
    """An older cape-server refuses a heartbeat field it does not know (422): the whole cycle failed with it, so no
    status report ever left the worker, and its jobs ended in Error or stayed Started while it computed them.
    Simulated here against the real server by adding a field it does not know wherever the key check goes."""
    poller, _ = make_poller(tmp_path, cape_server.url, world["orgs"]["xorg"]["organization_token"])
    real = poller.client._request

    def older(method, path, **kwargs):
        body = kwargs.get("json")
        if path == "/v1/worker/heartbeat" and body and "signing_public_key" in body:
            kwargs["json"] = {**body, "field_of_a_newer_worker": 1}
        return real(method, path, **kwargs)

    monkeypatch.setattr(poller.client, "_request", older)
    caplog.set_level(logging.WARNING, logger="cape.poller")
    job_id = world["job"]["id"]
    poller.cycle()
    poller.spool.put_status(job_id, {"state": "started", "progress": 0.0})
    poller.last_heartbeat = 0.0  # the next heartbeat is due
    poller.cycle()
    assert poller.older_coordinator
    assert caplog.text.count("the coordinator is older than this worker") == 1
    assert poller.spool.pending_status() == []  # the report went through
    # An hour on, the key check is tried again (the coordinator may have been upgraded); still refused, not said again.
    monkeypatch.setattr(poller_mod, "OLDER_COORDINATOR_RECHECK_SECONDS", 0.0)
    poller.last_heartbeat = 0.0
    poller.cycle()
    assert poller.older_coordinator and caplog.text.count("the coordinator is older than this worker") == 1
    monkeypatch.setattr(poller.client, "_request", real)  # upgraded: the check is back
    poller.last_heartbeat = 0.0
    poller.cycle()
    assert not poller.older_coordinator
    seat = world["user"]["xorg"].get(f"/v1/jobs/{job_id}").json()["parties"]
    assert seat["x_owner"]["state"] == "started" and seat["x_owner"]["worker_online"]


def test_a_job_a_partner_ended_in_error_is_logged_with_its_reason(cape_server, world, tmp_path, caplog):
    """The worker view of a job carried no error: a partner's log said only "ended at the coordinator: Error", and
    `cape-worker status` no reason, so its operator could not tell from the worker which seat failed or why."""
    why = "dataview 'xs': no such file; check the path (a local path, a file:// uri, or a dataview's uri)"
    job_id = _started_then_x_owner_error(world, why)
    assert world["worker"]["yorg"].get(f"/v1/worker/jobs/{job_id}").json()["error"] == f"x_owner (xorg): {why}"
    poller, _ = make_poller(tmp_path, cape_server.url, world["orgs"]["yorg"]["organization_token"])
    poller.spool.put_job({**world["job"], "seat": "y_owner"})
    with caplog.at_level(logging.INFO, logger="cape.poller"):
        poller.notice_ended(set(), poller.client)
    assert poller.spool.ended(job_id) == {"status": "Error", "message": f"x_owner (xorg): {why}"}
    assert f"job {job_id} ended at the coordinator: Error (x_owner (xorg): {why})" in caplog.messages


def test_a_job_is_said_stored_when_new_or_its_status_moves_not_at_each_change_of_its_view(tmp_path, caplog):
    """Each report of its seat changes the job's view: 'stored for seat' two or three times per job read like the
    job being taken again."""
    poller, _ = make_poller(tmp_path, f"http://127.0.0.1:{free_port()}", "tok,c2VjcmV0LXNlY3JldA==")
    caplog.set_level(logging.INFO, logger="cape.poller")
    job = {"id": "0123456789abcdef0123456789abcdef", "seat": "x_owner", "status": "Approved", "seat_state": "pending"}
    for change in ({}, {"seat_state": "started"}, {"status": "Started"}, {"seat_state": "running"}, {}):
        job = {**job, **change}
        assert poller.store_jobs([job]) == {job["id"]}
        assert poller.spool.read_job(job["id"]) == job
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.INFO] == [
        f"job {job['id']} (Approved) stored for seat x_owner", f"job {job['id']} (Started) stored for seat x_owner"]


def test_a_seat_held_by_another_worker_is_said_once_a_minute_though_its_heartbeat_age_changes(
        start_cape_server, tmp_path, caplog, monkeypatch):
    """The coordinator's refusal of a second worker says how long ago the first was heard from, a number that
    changes at every retry: taken for a new reason each time, it was one ERROR per retry for as long as two workers
    shared a token (the repetition the refusal log was made to end)."""
    from datetime import UTC, datetime, timedelta

    from services.worker import outage_log

    server = start_cape_server()
    world = build_job_world(server, register_keys=False)
    token = world["orgs"]["xorg"]["organization_token"]
    first, _ = make_poller(tmp_path / "first", server.url, token, tmp_path / "first-state")
    monkeypatch.setattr(poller_mod.time, "sleep", lambda _seconds: None)
    first.run(max_cycles=1)  # registers its keys and heartbeats: it holds the seat
    second, _ = make_poller(tmp_path / "second", server.url, token, tmp_path / "second-state")
    second.config.run_dir.mkdir(parents=True)
    clock, silent = [1000.0], [0]
    monkeypatch.setattr(outage_log.time, "monotonic", lambda: clock[0])

    def sleep(seconds: float) -> None:  # the first worker heartbeats meanwhile, seen a few seconds before each try
        clock[0] += seconds
        silent[0] = (silent[0] + 7) % 40
        seen = (datetime.now(UTC) - timedelta(seconds=silent[0])).isoformat(timespec="milliseconds")
        with sqlite3.connect(server.data_dir / "coordinator.sqlite3", timeout=10) as conn:
            conn.execute("UPDATE workers SET last_seen = ?", (seen.replace("+00:00", "Z"),))
        conn.close()

    monkeypatch.setattr(poller_mod.time, "sleep", sleep)
    caplog.set_level(logging.INFO, logger="cape.poller")
    second.run(max_cycles=5)  # 40 s of retries, 10 s apart
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR and "refused this worker" in
            r.getMessage()]
    assert len(said) == 1, said
