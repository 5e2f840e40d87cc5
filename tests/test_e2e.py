"""End to end on 127.0.0.1: the real cape-server, a real moto server (S3 + CloudWatch Logs) and three workers
under real supervisord, started exactly as the image starts them."""
import json
import signal
import subprocess

import numpy as np
import pytest

from services.jobs.linear_regression import plaintext_fit
from services.worker.health import PROGRAMS
from tests.support.workers import JobWorld, worker_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
LOG_GROUP = "/cape/e2e"
TOLERANCE = 1e-6  # the engine's accuracy bound: relative to the largest weight


def test_three_workers_train_and_only_the_model_owner_gets_weights(cape_server, moto, start_worker, tmp_path):
    world = JobWorld(cape_server, tmp_path)
    buckets = {label: moto.make_bucket(f"{label}-models") for label in JobWorld.LABELS}
    workers = {}
    for label in JobWorld.LABELS:
        env = worker_env(tmp_path, label, CAPE_TOKEN=world.token(label), CAPE_COORDINATOR=cape_server.url,
                         CAPE_BUCKET=f"s3://{buckets[label]}", CAPE_CLOUDWATCH="on", CAPE_LOG_GROUP=LOG_GROUP,
                         **moto.env)
        workers[label] = start_worker(env)
    for worker in workers.values():
        worker.wait_running()

    unapproved = world.submit(approvers=("xorg",))  # the y-owner never approves: no worker may run it
    job_id = world.submit()
    job = world.wait_ended(job_id)
    assert job["status"] == "Completed", job

    # The weights object is in the model owner's bucket, in pycape's layout, and matches a plaintext fit.
    assert moto.keys("yorg-models") == [f"{job_id}/metrics.json", f"{job_id}/regression_weights.csv"]
    assert moto.keys("xorg-models") == [] and moto.keys("helper-models") == []
    body = moto.client("s3").get_object(Bucket="yorg-models", Key=f"{job_id}/regression_weights.csv")["Body"]
    weights = np.loadtxt(body.read().decode().splitlines(), delimiter=",")
    expected, expected_metrics = plaintext_fit(world.x, world.y)
    assert weights.shape == (4,)
    assert np.max(np.abs(weights - expected)) / np.max(np.abs(expected)) <= TOLERANCE
    results = world.user["yorg"].get(f"/v1/jobs/{job_id}/results").json()
    assert results["model_location"] == f"s3://yorg-models/{job_id}/regression_weights.csv"
    for key, value in expected_metrics.items():
        assert abs(results["metrics"][key] - value) <= TOLERANCE * abs(value)
    assert world.user["xorg"].get(f"/v1/jobs/{job_id}/results").status_code == 403

    # `cape-worker status` shows the job in the model owner's spool, uploaded.
    status = subprocess.run(["cape-worker", "status", "--json"], env=workers["yorg"].env, capture_output=True,
                            text=True, timeout=30)
    listed = {job["id"]: job for job in json.loads(status.stdout)["jobs"]}
    assert listed[job_id]["seat"] == "y_owner" and listed[job_id]["result"] == "uploaded"

    # A dataview whose file is missing ends its job in Error with a message naming the dataview (not its uri,
    # which only its owner may see).
    world.add_dataview("xorg", "missing", (tmp_path / "xorg" / "data" / "gone.csv").as_uri(), ["a", "b", "c"])
    bad = world.wait_ended(world.submit(x="missing"))
    assert bad["status"] == "Error"
    assert "dataview 'missing'" in bad["error"] and "no such file" in bad["error"], bad
    assert "gone.csv" not in bad["error"], bad

    # The job the y-owner did not approve never reached any worker.
    assert world.job(unapproved)["status"] == "NeedsApproval"
    for label in JobWorld.LABELS:
        assert not (tmp_path / label / "spool" / "jobs" / unapproved).exists()

    # SIGTERM every worker (as docker stop) so queued log records are flushed; all stop cleanly.
    for worker in workers.values():
        worker.proc.send_signal(signal.SIGTERM)
    for worker in workers.values():
        assert worker.stop() == 0

    # Log events from all four programs of each worker are readable from CloudWatch Logs.
    streams = moto.log_streams(LOG_GROUP)
    cloudwatch_lines = []
    for label in JobWorld.LABELS:
        for program in PROGRAMS:
            assert f"{label}/{program}" in streams
            events = moto.log_events(LOG_GROUP, f"{label}/{program}")
            assert events, f"no CloudWatch events from {label}/{program}"
            assert all(e.startswith(f"{program} ") for e in events)
            cloudwatch_lines += events
    uploader_events = moto.log_events(LOG_GROUP, "yorg/uploader")
    uploader_stdout = [line for line in workers["yorg"].output.splitlines() if "uploader" in line]
    assert any(job_id in line for line in uploader_events), (uploader_events, uploader_stdout[-20:])

    # No token, token secret or data value in any log line (stdout or CloudWatch).
    everything = "\n".join([*cloudwatch_lines, *(w.output for w in workers.values())])
    for secret in world.secrets():
        assert secret not in everything
    for value in world.data_values():
        assert value not in everything, f"data value {value} appears in a log line"
