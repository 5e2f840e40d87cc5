"""Faults during running jobs: `kill -9` of each of the four programs at several moments, and restarts of
cape-server (clean and crashed) at two moments; every job still ends Completed with the very weights of a run
without faults.

The run is deterministic given the job's seeds (derived from the workers' keys and the job id), so "the same
weights" is checked bit for bit against the engine's in-memory run of the same data with the same seeds.

Each worker talks to cape-server (coordinator and broker) through its own loopback `Relay`, and the model owner's
uploader talks to a real moto S3 through one too: a relay can hold the reply to one request, which puts a call
*in flight* (the server did the work, the client has not heard) at the moment of a kill.

Two jobs run one after the other on the same three workers; the moments (in the order they happen):

job 1  helper poller     killed when the job has just reached its spool
       xorg runner       killed when the job has just reached its spool
       xorg messenger    killed with a message PUT in flight (stored at the broker, reply not received)
       cape-server       restarted (SIGTERM) mid-transfer, with messages in the inboxes
       yorg runner       killed after it wrote its result, before the upload (the uploader is held by SIGSTOP)
       yorg uploader     killed with the result waiting, before the upload
job 2  yorg messenger    killed when the job has just reached its spool
       xorg poller       killed with a status report in flight (taken by the coordinator, reply not received)
       helper messenger  killed with a message download in flight
       helper runner     killed mid-protocol (messages in its inbox)
       yorg uploader     killed during the upload (the weights PUT in flight at S3)
       cape-server       crashed (SIGKILL) and restarted after the upload, before the completion is reported
                         (the yorg poller is held by SIGSTOP until the server is back)

A second test stops whole workers as `docker stop` does and starts them again, each with a request in flight: the
helper's worker during a message download, the model owner's during the weights' upload.
"""
import os
import re
import signal
import time
from urllib.parse import urlparse

import numpy as np
import pytest

from services.jobs.linear_regression import simulate
from services.worker.keys import WorkerKeys
from services.worker.seeds import party_seeds
from services.worker.spool import Spool
from tests.support.workers import JobWorld, worker_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]
N_ROWS = 5000
MOMENT_TIMEOUT = 45.0  # bound for reaching each moment
STOP_SECONDS = 6.0  # a worker's stop with requests in flight: inside supervisord's stopwaitsecs (7), docker's 10 s
SEAT_INDEX = {"xorg": 0, "yorg": 1, "helper": 2}  # x_owner, y_owner (the model owner), helper


def port_of(url: str) -> int:
    return urlparse(url).port


def has_files(folder):
    return folder.is_dir() and any(p.is_file() and not p.name.startswith(".") for p in folder.rglob("*"))


class Fleet:
    """The server, three workers behind their relays, and the moments of the faults (logged for failures)."""

    def __init__(self, server, world, workers, relays, moto, tmp_path):
        self.server = server
        self.moto = moto
        self.world = world
        self.workers = workers
        self.relays = relays
        self.spool = {label: tmp_path / label / "spool" for label in JobWorld.LABELS}
        self.done: list[str] = []

    def wait(self, what: str, predicate) -> None:
        deadline = time.monotonic() + MOMENT_TIMEOUT
        while not predicate():
            if time.monotonic() > deadline:
                pytest.fail(f"moment never reached: {what}; moments done: {self.done}")
            time.sleep(0.01)

    def kill(self, label: str, program: str, moment: str) -> None:
        os.kill(self.workers[label].pid(program), signal.SIGKILL)
        self.done.append(f"{label} {program}: {moment}")

    def signal(self, label: str, program: str, signum: int) -> int:
        pid = self.workers[label].pid(program)
        os.kill(pid, signum)
        return pid

    def arm(self, relay_key: str, request: str) -> None:
        """Hold the reply to the next request matching `request` (a regex on the request line) at a relay."""
        self.relays[relay_key].hold_reply(request)

    def kill_held(self, label: str, program: str, relay_key: str, moment: str) -> None:
        """Wait until the armed relay holds a reply, kill the program, then let the reply go (to a dead client)."""
        relay = self.relays[relay_key]
        try:
            held = relay.wait_held(MOMENT_TIMEOUT)
            if held is None:
                pytest.fail(f"moment never reached: {label} {program}: {moment}; moments done: {self.done}")
            self.kill(label, program, f"{moment} ({held.split(' HTTP/')[0]})")
        finally:
            relay.release()

    def restart_server(self, crash: bool, moment: str) -> None:
        self.server.restart(crash=crash)
        for key, relay in self.relays.items():
            if key != "s3":
                relay.retarget(port_of(self.server.url))
        self.done.append(f"cape-server {'crashed' if crash else 'restarted'}: {moment}")

    def spec(self, label: str, job_id: str):
        return self.spool[label] / "jobs" / job_id / "spec.json"


@pytest.fixture
def fleet(start_cape_server, start_worker, relay, moto, tmp_path):
    server = start_cape_server()
    world = JobWorld(server, tmp_path, n=N_ROWS)
    moto.make_bucket("fault-models")
    relays = {label: relay(port_of(server.url)) for label in JobWorld.LABELS}
    relays["s3"] = relay(port_of(moto.url))
    workers = {}
    for label in JobWorld.LABELS:
        extra = {"CAPE_BUCKET": "s3://fault-models", **moto.env, "AWS_ENDPOINT_URL": relays["s3"].url} \
            if label == "yorg" else {}
        workers[label] = start_worker(worker_env(
            tmp_path, label, CAPE_TOKEN=world.token(label), CAPE_COORDINATOR=relays[label].url,
            CAPE_BROKER=relays[label].url + "/broker", **extra))
    for worker in workers.values():
        worker.wait_running()
    fleet = Fleet(server, world, workers, relays, moto, tmp_path)
    yield fleet
    for worker in workers.values():  # a program left stopped by a failed test must not hang the teardown
        for program in ("poller", "uploader"):
            try:
                fleet.signal(worker.env["CAPE_WORKER_NAME"], program, signal.SIGCONT)
            except Exception:  # noqa: BLE001 -- supervisord may be gone already
                pass


def fault_free_weights(fleet: Fleet, job_id: str):
    """The weights and metrics of the engine's in-memory run on the same files with the job's own seeds."""
    keys = {label: WorkerKeys.load_or_create(fleet.workers[label].env["CAPE_STATE_DIR"]) for label in SEAT_INDEX}
    publics = {SEAT_INDEX[label]: key.encryption.public_key() for label, key in keys.items()}
    seeds = [None] * 3
    for label, index in SEAT_INDEX.items():
        seeds[index] = party_seeds(keys[label].encryption, publics, job_id, index)
    report = simulate(fleet.world.x_path, ["a", "b", "c"], fleet.world.y_path, "t", seeds=seeds,
                      outputs_to="y_owner")
    return report.weights, report.metrics


def assert_completed_with_fault_free_weights(fleet: Fleet, job_id: str) -> None:
    job = fleet.world.wait_ended(job_id, timeout=90)
    assert job["status"] == "Completed", (job, fleet.done)
    body = fleet.moto.client("s3").get_object(Bucket="fault-models", Key=f"{job_id}/regression_weights.csv")
    weights = np.loadtxt(body["Body"].read().decode().splitlines(), delimiter=",")
    expected_weights, expected_metrics = fault_free_weights(fleet, job_id)
    assert weights.tobytes() == expected_weights.tobytes(), (weights, expected_weights, fleet.done)
    results = fleet.world.user["yorg"].get(f"/v1/jobs/{job_id}/results").json()
    assert results["metrics"] == {k: float(v) for k, v in expected_metrics.items()}
    assert results["model_location"] == f"s3://fault-models/{job_id}/regression_weights.csv"


def test_kills_and_server_restarts_at_several_moments_end_with_the_fault_free_weights(fleet):
    f = fleet
    # ---- job 1 --------------------------------------------------------------------------------------------
    f.signal("yorg", "uploader", signal.SIGSTOP)  # so the result surely waits in the spool before its upload
    f.arm("xorg", r"^PUT /broker/v1/jobs/[^/]+/messages/")
    job_id = f.world.submit()
    f.wait("the job reaches helper's spool", f.spec("helper", job_id).exists)
    f.kill("helper", "poller", "the job has just reached the spool")
    f.wait("the job reaches xorg's spool", f.spec("xorg", job_id).exists)
    f.kill("xorg", "runner", "the job has just reached the spool")
    f.kill_held("xorg", "messenger", "xorg", "a message PUT in flight")
    f.wait("messages reach helper's inbox", lambda: has_files(f.spool["helper"] / "inbox" / job_id))
    f.restart_server(crash=False, moment="mid-transfer, messages in the inboxes")
    result = f.spool["yorg"] / "results" / job_id / "result.json"
    f.wait("yorg's runner writes the result", result.exists)
    f.kill("yorg", "runner", "after it wrote its result, before the upload")
    f.kill("yorg", "uploader", "with the result waiting, before the upload")  # SIGKILL ends a stopped process too
    assert_completed_with_fault_free_weights(f, job_id)

    # ---- job 2 --------------------------------------------------------------------------------------------
    f.arm("xorg", r"^POST /v1/worker/jobs/[^/]+/report ")
    f.arm("helper", r"^GET /broker/v1/jobs/[^/]+/messages/[^ ?]+ ")
    f.arm("s3", r"^PUT /fault-models/[^/]+/regression_weights\.csv")
    job_id = f.world.submit()
    f.wait("the job reaches yorg's spool", f.spec("yorg", job_id).exists)
    f.kill("yorg", "messenger", "the job has just reached the spool")
    f.kill_held("xorg", "poller", "xorg", "a status report in flight")
    f.kill_held("helper", "messenger", "helper", "a message download in flight")
    f.wait("messages in helper's inbox", lambda: has_files(f.spool["helper"] / "inbox" / job_id))
    f.kill("helper", "runner", "mid-protocol, messages in its inbox")
    held_poller = f.signal("yorg", "poller", signal.SIGSTOP)  # the completion must wait for the server's crash
    try:
        f.kill_held("yorg", "uploader", "s3", "during the upload")
        f.wait("the upload finishes", (f.spool["yorg"] / "jobs" / job_id / "uploaded.json").exists)
        assert f.world.job(job_id)["status"] != "Completed"
        f.restart_server(crash=True, moment="after the upload, before the completion is reported")
    finally:
        os.kill(held_poller, signal.SIGCONT)
    assert_completed_with_fault_free_weights(f, job_id)

    # Every killed program was respawned; the pollers reported the outage and the recovery; no crash loop.
    for worker in f.workers.values():
        worker.wait_running(timeout=15)
    for label in JobWorld.LABELS:
        output = f.workers[label].output
        assert re.search(r"poller WARNING cannot reach the coordinator at \S+ \(.+\); check CAPE_COORDINATOR "
                         r"and the network; retrying in [0-9.]+ s\n", output), label
        assert re.search(r"poller INFO the coordinator at \S+ is reachable again \(after (one failed try|\d+ "
                         r"failed tries over \d+ s)\)", output), label
    assert len(f.done) == 12, f.done


def test_docker_stop_then_start_of_a_worker_mid_job_ends_with_the_fault_free_weights(fleet, start_worker):
    """`docker stop` of a worker with a request in flight (its reply held at the relay), then `docker start` of the
    same worker: the stop is clean and well inside docker's 10 s (a program blocked on the network must not wait
    for supervisord's SIGKILL), the work resumes at the start, and each job ends with the fault-free weights.

    job 1: the helper's worker, while its runner waits for a message whose download is in flight;
    job 2: the model owner's worker, with the weights' upload to S3 in flight."""
    f = fleet

    def docker_stop(label: str, relay_key: str, moment: str) -> None:
        worker = f.workers[label]
        try:
            if f.relays[relay_key].wait_held(MOMENT_TIMEOUT) is None:
                pytest.fail(f"moment never reached: {label}: {moment}; moments done: {f.done}")
            started = time.monotonic()
            worker.proc.send_signal(signal.SIGTERM)
            code = worker.wait_exit(timeout=10)
            elapsed = time.monotonic() - started
        finally:
            f.relays[relay_key].release()
        assert code == 0, worker.output[-3000:]
        assert elapsed < STOP_SECONDS, (elapsed, worker.output[-3000:])
        assert "SIGKILL" not in worker.output, worker.output[-3000:]
        f.done.append(f"{label} worker: docker stop ({elapsed:.1f} s) {moment}, then docker start")

    def docker_start(label: str) -> None:
        f.workers[label] = start_worker(f.workers[label].env)

    f.arm("helper", r"^GET /broker/v1/jobs/[^/]+/messages/[^ ?]+ ")
    job_id = f.world.submit()
    docker_stop("helper", "helper", "with a message download in flight")
    assert f"job {job_id}: paused (the runner is stopping); it resumes on restart" in f.workers["helper"].output
    assert Spool(f.spool["helper"]).claimed_jobs() == [job_id]  # the started worker resumes it first
    docker_start("helper")
    assert_completed_with_fault_free_weights(f, job_id)

    f.arm("s3", r"^PUT /fault-models/[^/]+/regression_weights\.csv")
    job_id = f.world.submit()
    docker_stop("yorg", "s3", "with the weights' upload in flight")
    docker_start("yorg")
    assert_completed_with_fault_free_weights(f, job_id)
