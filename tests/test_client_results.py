"""Reading a job's weights CSV (pycape's layout) from file:// and from a real S3 server (moto)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.client.errors import ResultsUnavailable
from services.client.results import read_weights, weights_location

WEIGHTS = np.array([0.5, -1.25, 3.0e-7, 123456.789])


def test_weights_location_follows_pycape_layout() -> None:
    assert weights_location("s3://bucket", "j1") == "s3://bucket/j1/regression_weights.csv"
    assert weights_location("s3://bucket/prefix/", "j1") == "s3://bucket/prefix/j1/regression_weights.csv"
    assert weights_location("file:///m/j1/regression_weights.csv", "j1") == "file:///m/j1/regression_weights.csv"


def test_read_weights_from_file_uri_and_path(tmp_path: Path) -> None:
    path = tmp_path / "j1" / "regression_weights.csv"
    path.parent.mkdir()
    np.savetxt(path, WEIGHTS, delimiter=",")  # what pycape's own tests write
    np.testing.assert_array_equal(read_weights(f"file://{path}"), WEIGHTS)
    np.testing.assert_array_equal(read_weights(str(path)), WEIGHTS)
    path.write_text("".join(f"{float(w)!r}\n" for w in WEIGHTS))  # repr per line: exact round trip
    np.testing.assert_array_equal(read_weights(f"file://{path}"), WEIGHTS)


def test_a_single_weight_is_still_a_vector(tmp_path: Path) -> None:
    path = tmp_path / "w.csv"
    path.write_text("2.5\n")
    assert read_weights(str(path)).tolist() == [2.5]


def test_missing_and_malformed_weights_files(tmp_path: Path) -> None:
    with pytest.raises(ResultsUnavailable, match="no weights file at file:///nonexistent/w.csv"):
        read_weights("file:///nonexistent/w.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("intercept,0.5\nx,1\n")
    with pytest.raises(ResultsUnavailable, match="is not one number per line"):
        read_weights(str(bad))
    with pytest.raises(ResultsUnavailable, match="only file:// and s3:// locations"):
        read_weights("https://example.org/w.csv")


def test_read_weights_from_s3_with_standard_aws_variables(moto, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in moto.env.items():
        monkeypatch.setenv(name, value)  # AWS_ENDPOINT_URL points boto3 at the moto server
    bucket = moto.make_bucket("model-owner-bucket")
    body = "".join(f"{float(w)!r}\n" for w in WEIGHTS).encode()
    moto.client("s3").put_object(Bucket=bucket, Key="job42/regression_weights.csv", Body=body)
    np.testing.assert_array_equal(read_weights(weights_location(f"s3://{bucket}", "job42")), WEIGHTS)
    with pytest.raises(ResultsUnavailable, match=r"no weights file at s3://model-owner-bucket/other/.*NoSuchKey"):
        read_weights(f"s3://{bucket}/other/regression_weights.csv")


def test_s3_without_credentials_names_the_variables(moto, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto.url)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(ResultsUnavailable, match="set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        read_weights("s3://any-bucket/j/regression_weights.csv")


def test_reads_what_the_worker_uploader_writes(tmp_path: Path) -> None:
    from services.worker.uploader import weights_csv

    path = tmp_path / "regression_weights.csv"
    path.write_bytes(weights_csv(WEIGHTS))
    np.testing.assert_array_equal(read_weights(path.as_uri()), WEIGHTS)


def test_sdk_get_results_from_s3_through_the_coordinator(cape_server, moto, monkeypatch: pytest.MonkeyPatch) -> None:
    """The coordinator derives the pycape location from the job's s3:// model location; the SDK reads it."""
    from services.client import Cape
    from tests.support.server import build_job_world

    world = build_job_world(cape_server)  # model location s3://bucket/models, yorg is the model owner
    job_id = world["job"]["id"]
    for label in ("xorg", "yorg", "helper"):
        api = world["worker"][label]
        assert api.post(f"/v1/worker/jobs/{job_id}/report", json={"state": "started", "progress": 0}).status_code == 204
    metrics = {"mse_result": 0.25, "r_squared_result": 0.75}
    done = world["worker"]["yorg"].post(f"/v1/worker/jobs/{job_id}/report",
                                        json={"state": "completed", "progress": 1, "metrics": metrics})
    assert done.status_code == 204, done.text

    for name, value in moto.env.items():
        monkeypatch.setenv(name, value)
    moto.make_bucket("bucket")
    moto.client("s3").put_object(Bucket="bucket", Key=f"models/{job_id}/regression_weights.csv",
                                 Body="".join(f"{float(w)!r}\n" for w in WEIGHTS).encode())
    cape = Cape(endpoint=cape_server.url, token=world["orgs"]["yorg"]["user_token"])
    weights, got = cape.get_job(job_id).get_results()
    np.testing.assert_array_equal(weights, WEIGHTS)
    assert got == metrics
