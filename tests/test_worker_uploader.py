"""The uploader against a real moto S3 server and file:// buckets: layout, multipart, override, permissions."""
import json
import logging
import os

import numpy as np
import pytest

from services.client.results import read_weights, weights_location
from services.worker.config import WorkerConfig, parse_bucket
from services.worker.spool import Spool
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
    data = weights_csv(WEIGHTS)
    assert data.decode().splitlines()[0] == "1.5"
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


def test_missing_bucket_ends_job_with_clear_error(tmp_path, moto, caplog):
    caplog.set_level(logging.ERROR, logger="cape.uploader")
    config = make_config(tmp_path, CAPE_BUCKET="s3://no-such-bucket", **moto.env)
    spool = spool_with_result(config)
    Uploader(config, spool).cycle()
    [status] = statuses(spool)
    assert status["state"] == "error"
    # Every project member reads the job's error: it names no bucket; the model owner's log says which.
    assert status["message"] == ("uploading the model failed: the model owner's bucket does not exist (NoSuchBucket); "
                                 "the model owner's uploader log has the details")
    assert "s3://no-such-bucket/job1/regression_weights.csv does not exist: create it, or fix CAPE_BUCKET" in \
        caplog.text
    assert spool.upload_failed("job1") and not spool.uploaded("job1")


def test_bucket_without_write_permission_gives_clear_error(tmp_path, moto, caplog):
    caplog.set_level(logging.ERROR, logger="cape.uploader")
    moto.make_bucket("readonly")
    keys = moto.read_only_keys("readonly")
    config = make_config(tmp_path, **{**moto.env, **keys})
    spool = spool_with_result(config, model_location="s3://readonly")
    moto.enforce_iam(True)
    Uploader(config, spool).cycle()
    moto.enforce_iam(False)
    [status] = statuses(spool)
    assert status["state"] == "error"
    assert status["message"] == ("uploading the model failed: the model owner's bucket refused the model "
                                 "(AccessDenied); the model owner's uploader log has the details")
    assert "access denied writing s3://readonly/job1/regression_weights.csv" in caplog.text
    assert "s3:PutObject" in caplog.text
    assert keys["AWS_SECRET_ACCESS_KEY"] not in status["message"] + caplog.text
    assert moto.keys("readonly") == []


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


def test_no_location_anywhere_is_an_error(tmp_path):
    config = make_config(tmp_path)
    spool = spool_with_result(config)
    Uploader(config, spool).cycle()
    assert "CAPE_BUCKET is not set" in statuses(spool)[0]["message"]


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
    assert ("S3 is busy or unavailable writing s3://models/job1/regression_weights.csv (502); trying again later"
            in caplog.text)


def test_an_endpoint_that_will_never_store_ends_the_job(tmp_path):
    """501 Not Implemented (a mistyped AWS_ENDPOINT_URL at a server that is no S3 store) will not pass: not retried
    for ever, the job ends in Error saying so."""
    with answering_every_request(501, b"<html>501 Not Implemented</html>", "text/html") as url:
        config = make_config(tmp_path, AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="a", AWS_SECRET_ACCESS_KEY="b")
        spool = spool_with_result(config, model_location="s3://models")
        Uploader(config, spool, ModelStore(config, read_timeout=5, attempts=1)).cycle()
    [status] = statuses(spool)
    assert status["state"] == "error" and "(501)" in status["message"], status
    assert spool.upload_failed("job1")


def test_a_job_stopped_before_its_upload_is_not_published(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="cape.uploader")
    config = make_config(tmp_path, CAPE_BUCKET=f"file://{tmp_path}/bucket")
    spool = spool_with_result(config)
    spool.mark_ended("job1", "Stopped", "stopped by someone@example.org")
    assert Uploader(config, spool).cycle()
    assert not (tmp_path / "bucket" / "job1").exists()
    assert statuses(spool) == [] and spool.pending_results() == []
    assert "job job1 ended at the coordinator (Stopped) before its model was uploaded; the model is not written" in \
        caplog.text
    # Completed at the coordinator: this uploader's own report got there before a restart cut it short; the upload
    # is repeated, not called off.
    spool.put_result("job2", {"job_id": "job2", "weights": WEIGHTS, "metrics": METRICS})
    spool.mark_ended("job2", "Completed")
    assert Uploader(config, spool).cycle()
    assert (tmp_path / "bucket" / "job2" / "regression_weights.csv").exists() and spool.uploaded("job2")


def test_temporary_credentials_carry_their_session_token(tmp_path):
    config = make_config(tmp_path, AWS_ACCESS_KEY_ID="ASIAEXAMPLE", AWS_SECRET_ACCESS_KEY="secret/key",
                         AWS_SESSION_TOKEN="session-token-value")
    assert config.boto3_kwargs("s3")["aws_session_token"] == "session-token-value"
    assert "session-token-value" in config.secrets and "session-token-value" not in repr(config)
