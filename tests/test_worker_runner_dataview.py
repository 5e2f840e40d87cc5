"""The runner's dataview loading: s3:// through a real moto server (boto3 over HTTP), file:// and local paths."""
from __future__ import annotations

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from botocore.config import Config

from services.jobs.linear_regression import JobDataError, MissingFileError
from services.worker.dataview import default_s3_client, load_dataview
from services.worker.spool import Spool

X = np.array([[1.0, 2.5], [3.0, -4.0], [5.5, 6.0]])


@pytest.fixture
def bucket(moto, tmp_path):
    moto.make_bucket("org-data")
    s3 = moto.client("s3")
    (tmp_path / "x.csv").write_text("a,b\n" + "".join(f"{float(r[0])!r},{float(r[1])!r}\n" for r in X))
    s3.upload_file(str(tmp_path / "x.csv"), "org-data", "views/x.csv")
    pq.write_table(pa.table({"a": X[:, 0], "b": X[:, 1], "t": X.sum(axis=1)}), tmp_path / "x.parquet")
    s3.upload_file(str(tmp_path / "x.parquet"), "org-data", "views/x.parquet")
    return moto


def test_s3_csv_with_the_standard_aws_variables(bucket, tmp_path, monkeypatch):
    for name, value in bucket.env.items():  # AWS_ENDPOINT_URL, AWS_REGION and keys, as the worker gets them
        monkeypatch.setenv(name, value)
    spool = Spool(tmp_path / "spool")
    got = load_dataview("s3://org-data/views/x.csv", x_columns=["b", "a"], spool=spool, s3_client=default_s3_client)
    np.testing.assert_array_equal(got, X[:, ::-1])
    assert list((tmp_path / "spool" / "tmp").iterdir()) == []  # the scratch copy of the data is gone


def test_s3_parquet_y_column(bucket, tmp_path):
    got = load_dataview("s3://org-data/views/x.parquet", y_column="t", spool=Spool(tmp_path / "spool"),
                        s3_client=lambda: bucket.client("s3"))
    np.testing.assert_array_equal(got, X.sum(axis=1))


def test_s3_missing_object_names_the_uri(bucket, tmp_path):
    with pytest.raises(MissingFileError, match=r"s3://org-data/views/nope.csv: no such object in S3"):
        load_dataview("s3://org-data/views/nope.csv", y_column="t", spool=Spool(tmp_path / "spool"),
                      s3_client=lambda: bucket.client("s3"))
    assert list((tmp_path / "spool" / "tmp").iterdir()) == []


def test_s3_without_credentials_says_which_variables_to_set(bucket, tmp_path, monkeypatch):
    """No path hint: the path is fine, the credentials are missing (and botocore never asks the instance metadata
    service, which is not on loopback)."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    endpoint = bucket.env["AWS_ENDPOINT_URL"]
    with pytest.raises(MissingFileError) as caught:
        load_dataview("s3://org-data/views/x.csv", y_column="t", spool=Spool(tmp_path / "spool"),
                      s3_client=lambda: boto3.session.Session().client("s3", endpoint_url=endpoint,
                                                                           region_name="us-east-1"))
    assert str(caught.value) == ("s3://org-data/views/x.csv: no AWS credentials; set AWS_ACCESS_KEY_ID and "
                                 "AWS_SECRET_ACCESS_KEY")


def test_s3_unreachable_endpoint_says_so(tmp_path):
    def client():
        return boto3.client("s3", endpoint_url="http://127.0.0.1:9", region_name="us-east-1",
                            aws_access_key_id="k", aws_secret_access_key="s",
                            config=Config(connect_timeout=1, retries={"max_attempts": 1}))

    with pytest.raises(MissingFileError, match="cannot reach S3"):
        load_dataview("s3://org-data/x.csv", y_column="t", spool=Spool(tmp_path / "spool"), s3_client=client)


def test_local_path_and_file_uri(tmp_path):
    (tmp_path / "y.csv").write_text("t\n1\n2\n3\n")
    spool = Spool(tmp_path / "spool")
    np.testing.assert_array_equal(load_dataview(str(tmp_path / "y.csv"), y_column="t", spool=spool), [1, 2, 3])
    np.testing.assert_array_equal(load_dataview((tmp_path / "y.csv").as_uri(), y_column="t", spool=spool), [1, 2, 3])
    with pytest.raises(JobDataError, match="no column 'z'"):
        load_dataview(str(tmp_path / "y.csv"), y_column="z", spool=spool)
