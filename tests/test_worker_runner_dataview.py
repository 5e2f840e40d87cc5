"""The runner's dataview loading: s3:// through a real moto server (boto3 over HTTP), file:// and local paths."""
from __future__ import annotations

import bz2
import gzip
import io

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from botocore.config import Config

from services.jobs.linear_regression import JobDataError, MissingFileError
from services.worker import dataview
from services.worker.dataview import DownloadWatch, default_s3_client, load_dataview
from services.worker.spool_transport import JobInterrupted
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


class Watch(DownloadWatch):
    def __init__(self, stop_after: int | None = None) -> None:
        self.seen: list[tuple[int, int | None]] = []
        self.retries: list[str] = []
        self.stop_after = stop_after

    def received(self, done, total):
        self.seen.append((done, total))
        if self.stop_after is not None and done >= self.stop_after:
            raise JobInterrupted("the coordinator ended the job (Stopped)")

    def retrying(self, reason, delay):
        self.retries.append(reason)


@pytest.fixture
def quick_retries(monkeypatch):
    monkeypatch.setattr(dataview, "RETRY_FIRST_SECONDS", 0.1)
    monkeypatch.setattr(dataview, "LOAD_RETRY_SECONDS", 1.5)


def test_s3_unreachable_endpoint_is_tried_again_then_said(tmp_path, quick_retries):
    """A job cannot resume: a store away for a moment (or a dead endpoint) was an Error at once, to be submitted
    and approved again."""
    def client():
        return boto3.client("s3", endpoint_url="http://127.0.0.1:9", region_name="us-east-1",
                            aws_access_key_id="k", aws_secret_access_key="s",
                            config=Config(connect_timeout=1, retries={"max_attempts": 1}))

    watch = Watch()
    with pytest.raises(MissingFileError) as caught:
        load_dataview("s3://org-data/x.csv", y_column="t", spool=Spool(tmp_path / "spool"), s3_client=client,
                      watch=watch)
    assert str(caught.value) == ("s3://org-data/x.csv: the connection to the data store failed "
                                 "(EndpointConnectionError), for over 0.025 minutes; check the store, "
                                 "AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) and the network, then submit the job again")
    assert len(watch.retries) >= 2 and set(watch.retries) == {
        "the connection to the data store failed (EndpointConnectionError)"}


def test_a_throttling_store_or_a_file_replaced_midway_is_read_again(bucket, tmp_path, quick_retries):
    """503 SlowDown on 3 tries of one part failed the job in 6 s; an object replaced while read was "the runner
    failed unexpectedly"."""
    from botocore.exceptions import ClientError
    from s3transfer.exceptions import S3DownloadFailedError

    real = bucket.client("s3")
    failures = [ClientError({"Error": {"Code": "SlowDown", "Message": "slow down"},
                             "ResponseMetadata": {"HTTPStatusCode": 503}}, "GetObject"),
                S3DownloadFailedError("Contents of stored object did not match expected ETag")]

    class Flaky:
        def head_object(self, **kwargs):
            return real.head_object(**kwargs)

        def get_object(self, **kwargs):
            return real.get_object(**kwargs)

        def download_fileobj(self, *args, **kwargs):
            if failures:
                raise failures.pop(0)
            return real.download_fileobj(*args, **kwargs)

    watch = Watch()
    got = load_dataview("s3://org-data/views/x.csv", x_columns=["a", "b"], spool=Spool(tmp_path / "spool"),
                        s3_client=Flaky, watch=watch)
    np.testing.assert_array_equal(got, X)
    assert watch.retries == ["the data store is busy or unavailable (SlowDown)",
                             "the file changed while it was read (a new version written to the same key); reading "
                             "it again"]
    size = real.head_object(Bucket="org-data", Key="views/x.csv")["ContentLength"]
    assert watch.seen[0] == (0, size) and watch.seen[-1] == (size, size)


def test_a_store_that_stops_sending_is_said_as_such(tmp_path, quick_retries):
    from botocore.exceptions import ReadTimeoutError
    from s3transfer.exceptions import RetriesExceededError

    class Stalled:
        def head_object(self, **kwargs):
            return {"ContentLength": 10}

        def get_object(self, **kwargs):  # the first bytes come; the download stalls
            return {"Body": io.BytesIO(b"t\n1\n2\n3\n4\n")}

        def download_fileobj(self, *args, **kwargs):
            raise RetriesExceededError(ReadTimeoutError(endpoint_url="http://127.0.0.1:9"))

    with pytest.raises(MissingFileError, match=r"the data store stopped sending data \(nothing for 30 s\), for over"):
        load_dataview("s3://org-data/x.csv", y_column="t", spool=Spool(tmp_path / "spool"), s3_client=Stalled)


def test_a_download_stops_when_the_job_is_ended_and_leaves_no_scratch(bucket, tmp_path):
    """A stopped job's download went on for 44 s, then its data was parsed, before the runner abandoned it."""
    s3 = bucket.client("s3")
    s3.put_object(Bucket="org-data", Key="views/big.csv", Body=b"a,b\n" + b"1.0,2.0\n" * 2_000_000)
    spool = Spool(tmp_path / "spool")
    with pytest.raises(JobInterrupted, match="Stopped"):
        load_dataview("s3://org-data/views/big.csv", y_column="b", spool=spool,
                      s3_client=lambda: bucket.client("s3"), watch=Watch(stop_after=1))
    assert list((tmp_path / "spool" / "tmp").iterdir()) == []


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_a_missing_column_is_said_before_the_object_is_fetched_whole(bucket, tmp_path, fmt):
    """A column missing from a 600 MiB file was said after its download."""
    rows = 1_000_000
    local = tmp_path / f"big.{fmt}"
    if fmt == "csv":
        local.write_bytes(b"a, b\n" + b"1.0,2.0\n" * rows)
    else:
        pq.write_table(pa.table({"a": np.ones(rows), "b": np.arange(rows, dtype=float)}), local)
    bucket.client("s3").upload_file(str(local), "org-data", f"views/big.{fmt}")
    watch = Watch()
    with pytest.raises(JobDataError) as caught:
        load_dataview(f"s3://org-data/views/big.{fmt}", x_columns=["b", "c"], spool=Spool(tmp_path / "spool"),
                      s3_client=lambda: bucket.client("s3"), watch=watch)
    with pytest.raises(JobDataError) as local_error:  # the loaders' own words, as when the file is read whole
        load_dataview(str(local), x_columns=["b", "c"], spool=Spool(tmp_path / "spool"))
    assert str(caught.value) == str(local_error.value).replace(str(local), f"s3://org-data/views/big.{fmt}")
    assert "no column 'c'" in str(caught.value)
    assert watch.seen == []  # the download never began
    assert list((tmp_path / "spool" / "tmp").iterdir()) == []
    got = load_dataview(f"s3://org-data/views/big.{fmt}", y_column="b", spool=Spool(tmp_path / "spool"),
                        s3_client=lambda: bucket.client("s3"))
    assert got.shape == (rows,) and got[-1] == (rows - 1 if fmt == "parquet" else 2.0)


@pytest.mark.parametrize("compression", ["gzip", "bzip2", "zstd"])
def test_a_missing_column_of_a_compressed_csv_is_said_before_it_is_fetched_whole(bucket, tmp_path, compression):
    """A bzip2 or zstd CSV's header was checked only once the whole object was downloaded."""
    rows = b"a,b\n" + b"".join(b"%d,%d\n" % (i, (i * 7919) % 100_003) for i in range(1_000_000))
    packed = {"gzip": gzip.compress, "bzip2": bz2.compress,
              "zstd": lambda data: pa.Codec("zstd").compress(data, asbytes=True)}[compression](rows)
    assert len(packed) > 2 << 20  # well past the first block and the first bytes read
    bucket.client("s3").put_object(Bucket="org-data", Key="views/big.csv.z", Body=packed)
    watch = Watch()
    with pytest.raises(JobDataError, match=r"^s3://org-data/views/big.csv.z: .*no column 'c'"):
        load_dataview("s3://org-data/views/big.csv.z", x_columns=["b", "c"], spool=Spool(tmp_path / "spool"),
                      s3_client=lambda: bucket.client("s3"), watch=watch)
    assert watch.seen == []  # the download never began


def test_a_cut_parquet_object_is_said_before_it_is_fetched_whole(bucket, tmp_path):
    whole = (tmp_path / "x.parquet").read_bytes()
    bucket.client("s3").put_object(Bucket="org-data", Key="views/cut.parquet", Body=whole[: len(whole) // 2])
    watch = Watch()
    with pytest.raises(JobDataError) as caught:
        load_dataview("s3://org-data/views/cut.parquet", y_column="t", spool=Spool(tmp_path / "spool"),
                      s3_client=lambda: bucket.client("s3"), watch=watch)
    assert str(caught.value) == ("s3://org-data/views/cut.parquet: not a readable Parquet file (it does not end as "
                                 "Parquet files do: cut short?)")
    assert watch.seen == []


def test_a_parquet_footer_too_large_to_check_first_is_left_to_the_loader(bucket, tmp_path):
    """A damaged footer length (here 1 GiB) made the early check fetch that much into memory before the download."""
    whole = (tmp_path / "x.parquet").read_bytes()
    bucket.client("s3").put_object(Bucket="org-data", Key="views/odd.parquet",
                                   Body=whole[:-8] + (2**30).to_bytes(4, "little") + b"PAR1")
    watch = Watch()
    with pytest.raises(JobDataError, match="not a readable Parquet file"):
        load_dataview("s3://org-data/views/odd.parquet", y_column="t", spool=Spool(tmp_path / "spool"),
                      s3_client=lambda: bucket.client("s3"), watch=watch)
    assert watch.seen  # downloaded (a few KB), then refused by the loader


def test_a_gzip_compressed_csv_object_is_read_and_its_header_checked_first(bucket, tmp_path):
    import gzip

    bucket.client("s3").put_object(Bucket="org-data", Key="views/x.csv.gz",
                                   Body=gzip.compress((tmp_path / "x.csv").read_bytes()))
    got = load_dataview("s3://org-data/views/x.csv.gz", x_columns=["b", "a"], spool=Spool(tmp_path / "spool"),
                        s3_client=lambda: bucket.client("s3"))
    np.testing.assert_array_equal(got, X[:, ::-1])
    watch = Watch()
    with pytest.raises(JobDataError, match="no column 'c'"):
        load_dataview("s3://org-data/views/x.csv.gz", x_columns=["a", "c"], spool=Spool(tmp_path / "spool"),
                      s3_client=lambda: bucket.client("s3"), watch=watch)
    assert watch.seen == []  # said from its first bytes, before the download


def test_local_path_and_file_uri(tmp_path):
    (tmp_path / "y.csv").write_text("t\n1\n2\n3\n")
    spool = Spool(tmp_path / "spool")
    np.testing.assert_array_equal(load_dataview(str(tmp_path / "y.csv"), y_column="t", spool=spool), [1, 2, 3])
    np.testing.assert_array_equal(load_dataview((tmp_path / "y.csv").as_uri(), y_column="t", spool=spool), [1, 2, 3])
    with pytest.raises(JobDataError, match="no column 'z'"):
        load_dataview(str(tmp_path / "y.csv"), y_column="z", spool=spool)


def test_an_s3_key_with_a_hash_or_a_question_mark_is_read(bucket, tmp_path):
    """A URL parser took them for a fragment and a query: such a dataview was registered, then "no such object"."""
    bucket.client("s3").upload_file(str(tmp_path / "x.csv"), "org-data", "views/q?v=1#draft x.csv")
    got = load_dataview("s3://org-data/views/q?v=1#draft x.csv", x_columns=["a", "b"], spool=Spool(tmp_path / "spool"),
                        s3_client=lambda: bucket.client("s3"))
    np.testing.assert_array_equal(got, X)


def test_a_dataview_the_spool_cannot_hold_is_refused_before_the_download(bucket, tmp_path, monkeypatch):
    """A download ran 40 s, then the spool volume was full."""
    from services.worker.spool import RESERVE_BYTES

    size = bucket.client("s3").head_object(Bucket="org-data", Key="views/x.csv")["ContentLength"]
    monkeypatch.setattr(Spool, "free_bytes", lambda self: RESERVE_BYTES + size - 1)
    watch = Watch()
    with pytest.raises(MissingFileError) as caught:
        load_dataview("s3://org-data/views/x.csv", y_column="a", spool=Spool(tmp_path / "spool"),
                      s3_client=lambda: bucket.client("s3"), watch=watch)
    assert str(caught.value) == (
        "s3://org-data/views/x.csv: the worker's spool volume has 256 MiB free, too little for a copy of the dataview "
        "(0 MiB) beside the 256 MiB kept for the job's messages; its operator gives CAPE_SPOOL_DIR's volume more room")
    assert watch.seen == [] and watch.retries == []
    assert list((tmp_path / "spool" / "tmp").iterdir()) == []
