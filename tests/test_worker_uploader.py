"""The uploader against a real moto S3 server and file:// buckets: layout, multipart, override, permissions."""
import errno
import json
import logging
import os
import time

import numpy as np
import pytest

from services.client.results import read_weights, weights_location
from services.worker.config import WorkerConfig, parse_bucket
from services.worker.spool import Spool
from services.worker import uploader as uploader_module
from services.worker.uploader import ModelStore, Uploader, UploadError, weights_csv
from tests.support.faults import answering_every_request

TOKEN = "tok123,c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0"
WEIGHTS = [1.5, -2.25, 1e-12, 3.141592653589793]
METRICS = {"mse_result": 0.125, "r_squared_result": 0.97}


def make_config(tmp_path, **extra):
    return WorkerConfig.from_env({"CAPE_TOKEN": TOKEN, "CAPE_COORDINATOR": "http://127.0.0.1:1",
                                  "CAPE_SPOOL_DIR": str(tmp_path / "spool"), "CAPE_STATE_DIR": str(tmp_path / "st"),
                                  "CAPE_WORKER_NAME": "org-a", **extra})


def spool_with_result(config, job_id="job1", model_location=None):
    spool = Spool(config.spool_dir)
    spool.put_result(job_id, {"job_id": job_id, "weights": WEIGHTS, "x_columns": ["a", "b", "c"],
                              "metrics": METRICS, "model_location": model_location})
    return spool


def statuses(spool):
    return [item.read() for item in spool.pending_status()]


def test_weights_csv_is_pycape_layout():
    data = weights_csv(WEIGHTS + [0.1])
    # Each number as `cape jobs results` prints it: the shortest text of the same double (%.17g: 0.10000000000000001)
    assert data.decode().splitlines() == ["1.5", "-2.25", "1e-12", "3.141592653589793", "0.1"]
    data = weights_csv(WEIGHTS)
    assert len(data.decode().splitlines()) == 4
    np.testing.assert_array_equal(np.loadtxt(data.decode().splitlines(), delimiter=","), WEIGHTS)


def test_upload_to_jobs_model_location_on_s3(tmp_path, moto, monkeypatch):
    moto.make_bucket("models")
    config = make_config(tmp_path, **moto.env)
    spool = spool_with_result(config, model_location="s3://models/team")
    assert Uploader(config, spool).cycle()
    assert moto.keys("models") == ["team/job1/metrics.json", "team/job1/regression_weights.csv"]
    s3 = moto.client("s3")
    body = s3.get_object(Bucket="models", Key="team/job1/regression_weights.csv")["Body"].read()
    np.testing.assert_array_equal(np.loadtxt(body.decode().splitlines(), delimiter=","), WEIGHTS)
    assert json.loads(s3.get_object(Bucket="models", Key="team/job1/metrics.json")["Body"].read()) == METRICS
    # The status for the poller carries the metrics and where the weights are; the result is no longer pending.
    [status] = statuses(spool)
    assert status == {"state": "completed", "progress": 1.0, "metrics": METRICS,
                      "model_location": "s3://models/team/job1/regression_weights.csv"}
    assert spool.pending_results() == []
    # The client SDK reads it back from the reported location (pycape's reader: np.loadtxt with delimiter ",").
    for key, value in moto.env.items():
        monkeypatch.setenv(key, value)
    np.testing.assert_array_equal(read_weights(weights_location(status["model_location"], "job1")), WEIGHTS)


def test_a_jobs_file_location_is_written_only_through_cape_bucket(tmp_path):
    """The submitter picks model_location and the model owner does not approve it: a path on the worker's own
    machine comes only from its operator's CAPE_BUCKET, never from a job."""
    config = make_config(tmp_path)
    target = tmp_path / "chosen-by-the-submitter"
    spool = spool_with_result(config, model_location=target.as_uri())
    with pytest.raises(UploadError) as refused:
        Uploader(config, spool).upload("job1")
    assert str(refused.value) == (
        f"the job's model_location {target.as_uri()} is a path on this worker's machine, which only CAPE_BUCKET may "
        "name: set CAPE_BUCKET=file:///dir (or s3://bucket) on the model owner's worker")
    assert not target.exists()


def test_cape_bucket_overrides_model_location(tmp_path, moto):
    moto.make_bucket("theirs")
    moto.make_bucket("ours")
    config = make_config(tmp_path, CAPE_BUCKET="s3://ours", **moto.env)
    spool = spool_with_result(config, model_location="s3://theirs/p")
    Uploader(config, spool).cycle()
    assert moto.keys("ours") == ["job1/metrics.json", "job1/regression_weights.csv"]
    assert moto.keys("theirs") == []


def test_file_bucket_writes_local_directory(tmp_path):
    config = make_config(tmp_path, CAPE_BUCKET=f"file://{tmp_path}/bucket")
    spool = spool_with_result(config, model_location="s3://ignored")
    Uploader(config, spool).cycle()
    weights = tmp_path / "bucket" / "job1" / "regression_weights.csv"
    np.testing.assert_array_equal(np.loadtxt(weights, delimiter=","), WEIGHTS)
    assert json.loads((tmp_path / "bucket/job1/metrics.json").read_text()) == METRICS
    assert statuses(spool)[0]["model_location"] == weights.as_uri()


def test_a_file_bucket_keeps_no_temporary_file_of_an_upload_killed_mid_write(tmp_path):
    """An uploader killed while it wrote the weights left `.regression_weights.csv.<hex>.tmp` in the model owner's
    folder for ever; the upload that follows removes it (only this worker's own temporary names)."""
    config = make_config(tmp_path, CAPE_BUCKET=f"file://{tmp_path}/bucket")
    folder = tmp_path / "bucket" / "job1"
    folder.mkdir(parents=True)
    killed = folder / ".regression_weights.csv.0123456789ab.tmp"
    killed.write_bytes(b"1.0\n2.")
    theirs = [folder / ".regression_weights.csv.notes.tmp", folder / "regression_weights.csv.bak"]
    for path in theirs:
        path.write_text("the owner's")
    Uploader(config, spool_with_result(config, model_location="s3://ignored")).cycle()
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["metrics.json", "regression_weights.csv", *(p.name for p in theirs)])
    np.testing.assert_array_equal(np.loadtxt(folder / "regression_weights.csv", delimiter=","), WEIGHTS)


def test_large_file_goes_multipart(tmp_path, moto):
    moto.make_bucket("models")
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(20 * 1024 * 1024))
    config = make_config(tmp_path, **moto.env)
    uri = ModelStore(config).upload_file(parse_bucket("s3://models"), "job1/big.bin", big)
    assert uri == "s3://models/job1/big.bin"
    head = moto.client("s3").head_object(Bucket="models", Key="job1/big.bin")
    assert head["ContentLength"] == 20 * 1024 * 1024
    assert head["ETag"].strip('"').endswith("-3")  # 3 parts of 8 MiB: a multipart upload


def kept_message(public: str) -> str:
    return (f"uploading the model: {public}; the model is kept and tried again every 60 s until its operator fixes "
            "it (at most 24 h)")


def made_old(spool, job_id="job1"):
    """The job's result came longer ago than the uploader keeps a refused model."""
    old = time.time() - uploader_module.REFUSED_KEPT_SECONDS - 1
    os.utime(spool.result_path(job_id), (old, old))


def test_a_missing_bucket_keeps_the_model_until_it_exists_then_the_job_completes(tmp_path, moto, caplog,
                                                                                   monkeypatch):
    """A refusal ended the finished job in Error at once, and nothing could upload its model again: the job was
    submitted, approved by every data owner and computed again."""
    caplog.set_level(logging.ERROR, logger="cape.uploader")
    config = make_config(tmp_path, CAPE_BUCKET="s3://not-yet-made", **moto.env)
    spool = spool_with_result(config)
    uploader = Uploader(config, spool)
    uploader.cycle()
    uploader.cycle()  # not due yet: not tried, nothing said again
    # Every project member reads the seat: it names no bucket; the model owner's log says which, once.
    assert statuses(spool) == [{"state": "running", "progress": 0.99, "message": kept_message(
        "the model owner's bucket does not exist (NoSuchBucket)")}]
    assert caplog.text.count("s3://not-yet-made/job1/metrics.json does not exist: create it, or fix CAPE_BUCKET") == 1
    assert spool.pending_results() == ["job1"] and not spool.upload_failed("job1")

    moto.make_bucket("not-yet-made")  # its operator fixes it
    monkeypatch.setattr(uploader_module, "REFUSED_RETRY_SECONDS", 0.0)
    uploader._refused_until.clear()  # the minute has passed
    assert uploader.cycle()
    assert statuses(spool)[-1]["state"] == "completed" and spool.uploaded("job1")
    assert moto.keys("not-yet-made") == ["job1/metrics.json", "job1/regression_weights.csv"]


def test_a_refusal_not_fixed_within_a_day_ends_the_job(tmp_path, moto):
    config = make_config(tmp_path, CAPE_BUCKET="s3://no-such-bucket", **moto.env)
    spool = spool_with_result(config)
    made_old(spool)
    Uploader(config, spool).cycle()
    [status] = statuses(spool)
    assert status == {"state": "error", "progress": 1.0, "message": (
        "uploading the model failed: the model owner's bucket does not exist (NoSuchBucket); the model owner's "
        "uploader log has the details")}
    assert spool.upload_failed("job1") and not spool.uploaded("job1")


def test_bucket_without_write_permission_keeps_the_model_until_it_is_granted(tmp_path, moto, caplog):
    caplog.set_level(logging.ERROR, logger="cape.uploader")
    moto.make_bucket("readonly")
    keys = moto.read_only_keys("readonly")
    config = make_config(tmp_path, **{**moto.env, **keys})
    spool = spool_with_result(config, model_location="s3://readonly")
    moto.enforce_iam(True)
    try:
        uploader = Uploader(config, spool)
        uploader.cycle()
    finally:
        moto.enforce_iam(False)
    [status] = statuses(spool)
    assert status["message"] == kept_message("the model owner's bucket refused the model (AccessDenied)")
    assert "access denied writing s3://readonly/job1/metrics.json" in caplog.text
    assert "s3:PutObject" in caplog.text
    assert keys["AWS_SECRET_ACCESS_KEY"] not in status["message"] + caplog.text
    assert moto.keys("readonly") == []
    uploader._refused_until.clear()  # a minute later, the policy granted (here: no longer enforced)
    assert uploader.cycle() and spool.uploaded("job1")
    assert moto.keys("readonly") == ["job1/metrics.json", "job1/regression_weights.csv"]


def test_expired_temporary_credentials_are_said_and_the_model_kept(tmp_path, caplog):
    caplog.set_level(logging.ERROR, logger="cape.uploader")
    body = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>ExpiredToken</Code><Message>The provided token has "
            b"expired.</Message></Error>")
    with answering_every_request(400, body, "application/xml") as url:
        config = make_config(tmp_path, AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="ASIAEXAMPLE",
                             AWS_SECRET_ACCESS_KEY="b", AWS_SESSION_TOKEN="session-token-value")
        spool = spool_with_result(config, model_location="s3://models")
        Uploader(config, spool).cycle()
    [status] = statuses(spool)
    assert status["message"] == kept_message("the model owner's bucket refused the model (ExpiredToken)")
    assert "temporary AWS credentials have expired" in caplog.text and "session-token-value" not in caplog.text
    assert spool.pending_results() == ["job1"]


def test_unreachable_s3_is_retried_not_failed(tmp_path):
    from tests.support.aws import free_port
    config = make_config(tmp_path, AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}", AWS_ACCESS_KEY_ID="a",
                         AWS_SECRET_ACCESS_KEY="b")
    spool = spool_with_result(config, model_location="s3://models")
    uploader = Uploader(config, spool)
    assert uploader.cycle() is False and uploader.cycle() is False
    assert spool.pending_results() == ["job1"]
    # Project members see why the job does not complete, once per reason, and not where the model owner's bucket is.
    assert statuses(spool) == [{"state": "running", "progress": 0.99, "message": (
        "uploading the model: the model owner's worker cannot reach its bucket's store; trying again (the model is "
        "kept until it is stored)")}]


def test_no_location_anywhere_is_said_and_the_model_kept_for_a_cape_bucket(tmp_path):
    """Its operator may still set CAPE_BUCKET and restart the worker: the restarted uploader stores it."""
    config = make_config(tmp_path)
    spool = spool_with_result(config)
    Uploader(config, spool).cycle()
    assert statuses(spool)[0]["message"] == kept_message(
        "the job names no model location and the model owner's worker has no CAPE_BUCKET")
    fixed = make_config(tmp_path, CAPE_BUCKET=f"file://{tmp_path}/bucket")
    assert Uploader(fixed, spool).cycle() and spool.uploaded("job1")


@pytest.fixture
def bad_gateway():
    """A proxy whose S3 is away: every request answered 502 with an HTML page, no S3 error code."""
    with answering_every_request(502, b"<html><body>502 Bad Gateway</body></html>", "text/html") as url:
        yield url


def test_a_gateways_5xx_is_retried_and_the_finished_jobs_model_kept(tmp_path, bad_gateway, caplog):
    """A 502 with no S3 error code (a proxy, a store starting up) passes: ending the job in Error would throw the
    finished computation away."""
    caplog.set_level(logging.WARNING, logger="cape.uploader")
    config = make_config(tmp_path, AWS_ENDPOINT_URL=bad_gateway, AWS_ACCESS_KEY_ID="a", AWS_SECRET_ACCESS_KEY="b")
    spool = spool_with_result(config, model_location="s3://models")
    store = ModelStore(config, read_timeout=5, attempts=1)
    assert Uploader(config, spool, store).cycle() is False
    assert spool.pending_results() == ["job1"]
    [status] = statuses(spool)
    assert status["state"] == "running" and "models" not in status["message"]
    assert status["message"].startswith("uploading the model: the model owner's bucket is busy or unavailable (502)")
    assert ("S3 is busy or unavailable writing s3://models/job1/metrics.json (502); trying again later"
            in caplog.text)


def test_an_endpoint_that_will_never_store_is_not_tried_for_ever(tmp_path):
    """501 Not Implemented (a mistyped AWS_ENDPOINT_URL at a server that is no S3 store) will not pass by itself:
    said as a refusal its operator fixes (the endpoint), tried again for a day, then the job ends in Error."""
    with answering_every_request(501, b"<html>501 Not Implemented</html>", "text/html") as url:
        config = make_config(tmp_path, AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="a", AWS_SECRET_ACCESS_KEY="b")
        spool = spool_with_result(config, model_location="s3://models")
        Uploader(config, spool).cycle()
        made_old(spool)
        Uploader(config, spool).cycle()
    kept, ended = statuses(spool)
    assert kept["state"] == "running" and "(501)" in kept["message"]
    assert ended["state"] == "error" and "(501)" in ended["message"], ended
    assert spool.upload_failed("job1")


def test_a_throttling_store_is_waited_for_whatever_the_spool_path_holds(tmp_path):
    """The error code was read from the first "(word)" of boto3's message, which begins with the spool's path: with
    CAPE_SPOOL_DIR=/srv/cape (prod)/spool a 503 SlowDown was the code "prod", a refusal, and the model was lost."""
    body = b"<?xml version='1.0'?><Error><Code>SlowDown</Code><Message>Please reduce your rate.</Message></Error>"
    with answering_every_request(503, body, "application/xml") as url:
        config = make_config(tmp_path / "cape (prod)", AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="a",
                             AWS_SECRET_ACCESS_KEY="b", CAPE_BUCKET="s3://models/run(2)")
        spool = spool_with_result(config)
        assert Uploader(config, spool, ModelStore(config, attempts=1)).cycle() is False
    [status] = statuses(spool)
    assert status["message"] == ("uploading the model: the model owner's bucket is busy or unavailable (SlowDown); "
                                 "trying again (the model is kept until it is stored)")


def test_results_for_a_store_that_is_away_all_say_why_at_once(tmp_path):
    """Each waited its turn: with a store that hangs, the third job's seat said nothing for over 400 s."""
    from tests.support.aws import free_port

    config = make_config(tmp_path, AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}", AWS_ACCESS_KEY_ID="a",
                         AWS_SECRET_ACCESS_KEY="b")
    spool = spool_with_result(config, "job1", model_location="s3://models")
    for job_id in ("job2", "job3"):
        spool_with_result(config, job_id, model_location="s3://models")
    tries = []
    store = ModelStore(config, attempts=1)
    real = store.upload_file
    store.upload_file = lambda *args: (tries.append(args[1]), real(*args))[1]
    assert Uploader(config, spool, store).cycle() is False
    assert len(tries) == 1  # one try for the store that is away, not one per result
    said = {item.job_id: item.read()["message"] for item in spool.pending_status()}
    assert said == {job: ("uploading the model: the model owner's worker cannot reach its bucket's store; trying "
                          "again (the model is kept until it is stored)") for job in ("job1", "job2", "job3")}


def test_a_job_stopped_before_its_upload_is_not_published(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="cape.uploader")
    config = make_config(tmp_path, CAPE_BUCKET=f"file://{tmp_path}/bucket")
    spool = spool_with_result(config)
    spool.mark_ended("job1", "Stopped", "stopped by someone@example.org")
    assert Uploader(config, spool).cycle()
    assert not (tmp_path / "bucket" / "job1").exists()
    assert statuses(spool) == [] and spool.pending_results() == []
    assert ("job job1 ended at the coordinator (Stopped) before its model was uploaded; the model is not published"
            in caplog.text)
    # Completed at the coordinator: this uploader's own report got there before a restart cut it short; the upload
    # is repeated, not called off.
    spool.put_result("job2", {"job_id": "job2", "weights": WEIGHTS, "metrics": METRICS})
    spool.mark_ended("job2", "Completed")
    assert Uploader(config, spool).cycle()
    assert (tmp_path / "bucket" / "job2" / "regression_weights.csv").exists() and spool.uploaded("job2")


def test_a_job_stopped_while_its_metrics_are_written_gets_no_weights(tmp_path, caplog):
    """The weights went first and the stop was looked at once: a stop during a slow upload left the weights of a
    Stopped job in the bucket while the log said "the model is not written"."""
    caplog.set_level(logging.WARNING, logger="cape.uploader")
    config = make_config(tmp_path, CAPE_BUCKET=f"file://{tmp_path}/bucket")
    spool = spool_with_result(config)
    store = ModelStore(config)
    real = store.put_bytes

    def stopped_meanwhile(bucket, key, data, scratch):
        uri = real(bucket, key, data, scratch)
        spool.mark_ended("job1", "Stopped", "stopped by someone@example.org")  # the poller, during the upload
        return uri

    store.put_bytes = stopped_meanwhile
    assert Uploader(config, spool, store).cycle()
    assert sorted(p.name for p in (tmp_path / "bucket" / "job1").iterdir()) == ["metrics.json"]
    assert statuses(spool) == [] and spool.upload_failed("job1")
    metrics_uri = (tmp_path / "bucket" / "job1" / "metrics.json").as_uri()
    assert (f"job job1 ended at the coordinator (Stopped) while its model was uploaded; its weights are not written "
            f"({metrics_uri} was, and stays: this worker may not delete)") in caplog.text


def test_temporary_credentials_carry_their_session_token(tmp_path):
    config = make_config(tmp_path, AWS_ACCESS_KEY_ID="ASIAEXAMPLE", AWS_SECRET_ACCESS_KEY="secret/key",
                         AWS_SESSION_TOKEN="session-token-value")
    assert config.boto3_kwargs("s3")["aws_session_token"] == "session-token-value"
    assert "session-token-value" in config.secrets and "session-token-value" not in repr(config)


def test_a_full_spool_volume_keeps_the_model_and_the_uploader_running(tmp_path, caplog, monkeypatch):
    """A full spool volume (here, a file:// bucket on it too) refuses the status the uploader queues: raised, it
    ended the uploader, whose restarts by supervisord ended FATAL and stopped the whole worker (seen on a full
    tmpfs). The result stays, is said once, and goes out once the volume has room again."""
    config = make_config(tmp_path, CAPE_BUCKET=f"file://{tmp_path}/bucket")
    spool = spool_with_result(config)
    full = [str(tmp_path)]  # what the full volume holds: the spool and the bucket, then the spool alone
    real_fsync = os.fsync

    def full_disk_fsync(fd):
        if any(os.readlink(f"/proc/self/fd/{fd}").startswith(prefix) for prefix in full):
            raise OSError(errno.ENOSPC, "No space left on device")  # as the kernel says it: no file name
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk_fsync)
    caplog.set_level(logging.INFO, logger="cape.uploader")
    uploader = Uploader(config, spool)
    assert uploader.cycle() is False
    uploader._refused_until.clear()  # (the bucket's own refusal waits a minute: not this test's subject)
    assert uploader.cycle() is False
    assert caplog.text.count("job job1: cannot write the spool (") == 1, caplog.text
    assert "No space left on device); the model is kept and tried again: free space on the volume of CAPE_SPOOL_DIR" \
        in caplog.text
    full[:] = [str(config.spool_dir)]  # a bucket elsewhere takes the model; the status still cannot be queued
    uploader._refused_until.clear()
    assert uploader.cycle() is False
    assert spool.read_result("job1") is not None and statuses(spool) == []
    full.clear()  # space is freed
    assert uploader.cycle() is True
    assert spool.read_result("job1") is None
    assert [s["state"] for s in statuses(spool)] == ["completed"]
    np.testing.assert_array_equal(np.loadtxt(tmp_path / "bucket/job1/regression_weights.csv", delimiter=","),
                                  WEIGHTS)
    assert "job job1: the spool takes writes again" in caplog.text
