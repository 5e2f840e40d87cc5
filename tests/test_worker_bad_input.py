"""Bad input through three real workers (cape-server, supervisord, a real moto S3): a dataview that is missing,
unreadable or bad ends its job in Error with a message that says what and where, shown by `cape jobs status`; a model
owner's bucket without write permission keeps the job Started with the reason, until its operator grants it and the
model is stored; a job not approved by every data owner (still
NeedsApproval, or Rejected) never reaches any worker. The helper's broker is unreachable for a while as the jobs
start: its messenger reports it, backs off and catches up, without a crash loop."""
import re
import time

import numpy as np
import pytest

from tests.support.workers import JobWorld, worker_env, write_csv

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def submit(world: JobWorld, x: str = "xs", y: str = "ys", approvers=("xorg", "yorg")) -> str:
    job = world._ok(world.user["xorg"].post("/v1/projects/e2e/jobs", json={
        "type": "linear_regression", "x": {"dataview": x, "columns": ["a", "b", "c"]},
        "y": {"dataview": y, "column": "t"}, "model_owner": "yorg", "timeout": 120}))
    for label in approvers:
        world._ok(world.user[label].post(f"/v1/jobs/{job['id']}/approve"))
    return job["id"]


def test_bad_dataviews_and_a_read_only_bucket_end_in_error_and_unapproved_jobs_never_run(
        cape_server, moto, start_worker, cape_cli, relay, tmp_path):
    world = JobWorld(cape_server, tmp_path, n=200)
    data = tmp_path / "xorg" / "data"
    (data / "corrupt.parquet").write_bytes(b"PAR1" + bytes(range(64)))
    rows = [[f"{v:.12g}" for v in row] for row in world.x]
    rows[6][1] = "n/a"  # data row 7, column b: not a number
    (data / "text.csv").write_text("a,b,c\n" + "".join(",".join(row) + "\n" for row in rows))
    y_nan = world.y.copy()
    y_nan[11] = np.nan
    write_csv(tmp_path / "yorg" / "data" / "y_nan.csv", ["t"], [y_nan])
    world.add_dataview("xorg", "gone", (data / "gone.csv").as_uri(), ["a", "b", "c"])
    world.add_dataview("xorg", "corrupt", (data / "corrupt.parquet").as_uri(), ["a", "b", "c"])
    world.add_dataview("xorg", "text", (data / "text.csv").as_uri(), ["a", "b", "c"])
    world._ok(world.user["yorg"].post("/v1/projects/e2e/dataviews", json={
        "name": "ynan", "uri": (tmp_path / "yorg" / "data" / "y_nan.csv").as_uri(),
        "schema": [{"name": "t", "type": "number"}]}))

    # The model owner's worker may read its bucket but not write it.
    moto.make_bucket("yorg-readonly")
    read_only = moto.read_only_keys("yorg-readonly")
    moto.enforce_iam(True)
    broker = relay(int(cape_server.url.rsplit(":", 1)[1]))
    broker.cut(True)  # the helper's broker is down when the jobs start
    workers = {}
    for label in JobWorld.LABELS:
        extra = {"CAPE_BUCKET": "s3://yorg-readonly", **moto.env, **read_only} if label == "yorg" else {}
        if label == "helper":
            extra = {"CAPE_BROKER": broker.url + "/broker"}
        workers[label] = start_worker(worker_env(tmp_path, label, CAPE_TOKEN=world.token(label),
                                                 CAPE_COORDINATOR=cape_server.url, **extra))

    # Jobs no worker may run: the y-owner never approved one, and rejected the other.
    pending = submit(world, approvers=("xorg",))
    rejected = submit(world, approvers=("xorg",))
    world._ok(world.user["yorg"].post(f"/v1/jobs/{rejected}/reject", json={"reason": "not this one"}))

    for worker in workers.values():
        worker.wait_running()
    cases = {
        submit(world, x="gone"): ["dataview 'gone'", "no such file"],
        submit(world, x="corrupt"): ["dataview 'corrupt'", "not a readable Parquet file"],
        submit(world, x="text"): ["dataview 'text'", "column 'b' row 7", "not a number"],
        submit(world, y="ynan"): ["dataview 'ynan'", "column 't' row 12", "finite number"],
    }
    # The finished model is kept while its operator fixes the bucket (it ended the job in Error, the computation lost).
    refused = submit(world)
    helper = workers["helper"]
    messenger_pid = helper.pid("messenger")
    # The relay closes each new connection at once, as a server going down does.
    warning = re.compile(r"messenger WARNING receiving: .*cannot reach the broker at \S+ \(the connection closed "
                         r"without an answer: the server restarting, or a TLS port, whose URL must start with "
                         r"https://\); check CAPE_BROKER and that the broker is running; retrying in ([0-9.]+) s")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not warning.findall(helper.output):
        time.sleep(0.1)
    assert warning.findall(helper.output), helper.output[-3000:]
    time.sleep(3.0)  # several retries: said once (then once a minute), not once per retry
    assert len(warning.findall(helper.output)) == 1, helper.output[-3000:]
    broker.cut(False)

    env = {"CAPE_TOKEN": world.orgs["yorg"]["user_token"], "CAPE_COORDINATOR": cape_server.url}
    for job_id, words in cases.items():
        job = world.wait_ended(job_id)
        shown = cape_cli("jobs", "status", job_id, env=env)
        assert shown.exit_code == 0, shown.stderr
        assert job["status"] == "Error", job
        assert all(word in job["error"] for word in words), job
        assert "Error" in shown.stdout and all(word in shown.stdout for word in words), shown.stdout
    # Every project member reads it: no bucket named (the model owner's log names it).
    reason = "uploading the model: the model owner's bucket refused the model (AccessDenied); the model is kept"
    deadline = time.monotonic() + 60
    while reason not in (shown := cape_cli("jobs", "status", refused, env=env).stdout):
        assert time.monotonic() < deadline, shown
        time.sleep(0.5)
    assert "Started" in shown and "yorg-readonly" not in shown, shown
    assert "access denied writing s3://yorg-readonly/" in workers["yorg"].output and "s3:PutObject" in \
        workers["yorg"].output
    moto.enforce_iam(False)  # its operator grants the write, then restarts the uploader, which tries at once
    assert moto.keys("yorg-readonly") == []
    workers["yorg"].supervisor().stopProcess("worker:uploader")
    workers["yorg"].supervisor().startProcess("worker:uploader")
    assert world.wait_ended(refused)["status"] == "Completed"
    assert moto.keys("yorg-readonly") == [f"{refused}/metrics.json", f"{refused}/regression_weights.csv"]
    assert re.search(r"messenger INFO receiving: the broker is reachable again \(after (one failed try|\d+ failed "
                     r"tries over \d+ s)\)", helper.output)
    assert helper.pid("messenger") == messenger_pid  # the same process all along: no crash loop

    # The unapproved jobs kept their status and no party ever took them up.
    for job_id, status in ((pending, "NeedsApproval"), (rejected, "Rejected")):
        job = world.job(job_id)
        assert job["status"] == status, job
        assert all(party["state"] == "pending" for party in job["parties"].values()), job
        for label in JobWorld.LABELS:
            assert not (tmp_path / label / "spool" / "jobs" / job_id).exists()
            assert job_id not in workers[label].output


def test_a_store_that_is_away_keeps_the_job_started_with_the_reason_then_it_completes(
        cape_server, moto, start_worker, cape_cli, relay, tmp_path):
    """The model owner's S3 goes away after the computation: the job stays Started (the model is kept), its seat says
    why in `cape jobs status` without naming the bucket, and the job completes once the store is back."""
    world = JobWorld(cape_server, tmp_path, n=200)
    bucket = moto.make_bucket("yorg-models")
    store = relay(int(moto.url.rsplit(":", 1)[1]))
    store.cut(True)
    for label in JobWorld.LABELS:
        extra = {"CAPE_BUCKET": f"s3://{bucket}", **moto.env, "AWS_ENDPOINT_URL": store.url} \
            if label == "yorg" else {}
        start_worker(worker_env(tmp_path, label, CAPE_TOKEN=world.token(label), CAPE_COORDINATOR=cape_server.url,
                                **extra)).wait_running()
    job_id = submit(world)
    env = {"CAPE_TOKEN": world.orgs["xorg"]["user_token"], "CAPE_COORDINATOR": cape_server.url}
    reason = "uploading the model: the model owner's worker cannot reach its bucket"
    deadline = time.monotonic() + 60
    while reason not in (shown := cape_cli("jobs", "status", job_id, env=env).stdout):
        assert time.monotonic() < deadline, shown
        time.sleep(0.5)
    assert "Started" in shown and "trying again (the model is kept until it is stored)" in shown, shown
    assert bucket not in shown
    store.cut(False)
    job = world.wait_ended(job_id, timeout=90)
    assert job["status"] == "Completed", job
    assert moto.keys(bucket) == [f"{job_id}/metrics.json", f"{job_id}/regression_weights.csv"]
    assert all(not party.get("message") for party in job["parties"].values()), job  # the reason is gone
