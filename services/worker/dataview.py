"""Loading this organization's dataview for a job: s3:// (boto3), file:// or a local path, CSV or Parquet.

An s3:// object is streamed to a private scratch file in the spool (boto3's managed, multipart download, with the
standard AWS variables and `AWS_ENDPOINT_URL`), read with the job package's loaders, and removed. Its first bytes
and (Parquet) footer are read first, so a file without the job's columns fails before it is fetched whole. A store that is
busy, throttling, unreachable or stops sending is tried again for up to `LOAD_RETRY_SECONDS` (a job cannot resume:
it would be submitted and approved again), each wait said through `DownloadWatch.retrying`; the bytes received are
said through `DownloadWatch.received`, which may also stop the download (the job was stopped meanwhile).
"""
from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from services.jobs.linear_regression import MissingFileError, load_x, load_y
from services.jobs.linear_regression.data import check_ends, head_size
from services.worker.s3_errors import code_and_status, is_transient
from services.worker.spool import RESERVE_BYTES, Spool, mib

S3ClientFactory = Callable[[], Any]
LOAD_RETRY_SECONDS = 300.0  # how long a busy or unreachable store is tried again before the job ends in Error
RETRY_FIRST_SECONDS = 2.0
RETRY_MAX_SECONDS = 30.0
# Each S3 request: an answer or a byte within READ_TIMEOUT_SECONDS (botocore's 60 s, times s3transfer's 5 tries per
# part, left a store that stopped sending silent for 5 to 9 minutes), a few attempts by botocore itself.
CONNECT_TIMEOUT_SECONDS = 10
READ_TIMEOUT_SECONDS = 30
REQUEST_ATTEMPTS = 5
PART_ATTEMPTS = 2  # s3transfer's tries of a part whose body stops coming (its default is 5)
HEAD_BYTES = 65536  # read before the download: the CSV header or the format must show in it
FOOTER_MAX_BYTES = 16 * 1024 * 1024  # a Parquet footer read before the download: larger ones are left to the loader


def s3_client_config() -> Any:
    """The botocore Config of the clients that download dataviews."""
    from botocore.config import Config

    return Config(connect_timeout=CONNECT_TIMEOUT_SECONDS, read_timeout=READ_TIMEOUT_SECONDS,
                  retries={"total_max_attempts": REQUEST_ATTEMPTS, "mode": "standard"})


def default_s3_client() -> Any:
    """A boto3 S3 client from the standard AWS variables (AWS_ENDPOINT_URL included, read by boto3 itself)."""
    import boto3

    return boto3.client("s3", config=s3_client_config())


class DownloadWatch:
    """What the download tells its caller; the defaults say nothing and never stop it."""

    def received(self, done: int, total: int | None) -> None:
        """`done` bytes of `total` have arrived (called often: throttle what it does). Raise to stop the
        download (the exception propagates out of `load_dataview`)."""

    def retrying(self, reason: str, delay: float) -> None:
        """The store failed for now (`reason`, no bucket or key in it); the download starts again in `delay` s."""


class _TooLargeToCheck(Exception):
    """The part of the object the early check needs is too large to fetch on its own."""


class _TransientFailure(Exception):
    """The store may take the download later; the message says why, for a data owner."""


def load_dataview(
    uri: str,
    *,
    x_columns: list[str] | None = None,
    y_column: str | None = None,
    spool: Spool,
    s3_client: S3ClientFactory = default_s3_client,
    watch: DownloadWatch | None = None,
) -> np.ndarray:
    """Load the x columns (give `x_columns`) or the y column (give `y_column`) of the dataview at `uri`.

    Raises the job package's `JobDataError` subclasses, whose messages name the uri, column and row.
    """
    def load(source: Any) -> np.ndarray:
        if x_columns is not None:
            return load_x(source, x_columns, name=uri)
        assert y_column is not None
        return load_y(source, y_column, name=uri)

    if not uri.startswith("s3://"):
        return load(uri)
    bucket, key = _bucket_and_key(uri)
    columns = x_columns if x_columns is not None else [y_column or ""]
    scratch = spool.temp_file(Path(key).suffix)
    try:
        _download_s3(uri, bucket, key, columns, scratch, s3_client, watch or DownloadWatch(), spool)
        with open(scratch, "rb") as handle:
            return load(handle)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(scratch)


def _bucket_and_key(uri: str) -> tuple[str, str]:
    """`s3://bucket/key` split by hand: a key may hold `#` or `?`, which a URL parser takes for a fragment or a
    query (such a dataview was registered, then "no such object")."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket or not key:
        raise MissingFileError(uri, "an s3:// dataview uri must be s3://bucket/key")
    return bucket, key


def _download_s3(uri: str, bucket: str, key: str, columns: list[str], dest: Path, s3_client: S3ClientFactory,
                 watch: DownloadWatch, spool: Spool) -> None:
    """Download `uri` to `dest`, trying a failing store again (with backoff) until `LOAD_RETRY_SECONDS` passed."""
    client = s3_client()
    deadline = time.monotonic() + LOAD_RETRY_SECONDS
    delay = RETRY_FIRST_SECONDS
    while True:
        try:
            _download_once(uri, bucket, key, columns, dest, client, watch, spool)
            return
        except _TransientFailure as failure:
            if time.monotonic() + delay > deadline:
                raise MissingFileError(uri, f"{failure}, for over {LOAD_RETRY_SECONDS / 60:g} minutes; check the "
                                            "store, AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) and the network, then "
                                            "submit the job again", hint=None) from None
            wait = random.uniform(0.5, 1.0) * delay
            watch.retrying(str(failure), wait)
            time.sleep(wait)
            delay = min(RETRY_MAX_SECONDS, delay * 2)


def _download_once(uri: str, bucket: str, key: str, columns: list[str], dest: Path, client: Any,
                   watch: DownloadWatch, spool: Spool) -> None:
    """One managed download of the whole object into `dest` (truncated first), once its ends show it may hold
    `columns`; a failure waiting may fix is raised as `_TransientFailure`, one it will not as `MissingFileError`."""
    from botocore.exceptions import (BotoCoreError, ClientError, ConnectionError as BotoConnectionError,
                                     IncompleteReadError, NoCredentialsError, ReadTimeoutError,
                                     ResponseStreamingError)
    from s3transfer.exceptions import RetriesExceededError, S3DownloadFailedError

    total: int | None = None
    done = 0

    def received(amount: int) -> None:
        nonlocal done
        done += amount
        watch.received(done, total)

    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # organization data: private scratch file
    try:
        with os.fdopen(fd, "wb") as out:
            total = int(client.head_object(Bucket=bucket, Key=key).get("ContentLength") or 0) or None
            _check_ends(uri, bucket, key, columns, total, client)
            _check_room(uri, spool, total)
            watch.received(0, total)
            client.download_fileobj(bucket, key, out, Callback=received, Config=_transfer_config())
    except ClientError as exc:
        code, status = code_and_status(exc)
        if code in ("404", "NoSuchKey", "NoSuchBucket", "NotFound"):
            raise MissingFileError(uri, "no such object in S3") from None
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise MissingFileError(uri, "access denied by S3; check the worker's AWS credentials", hint=None) from None
        if code in ("412", "PreconditionFailed"):
            raise _TransientFailure("the file changed while it was read (a new version written to the same key); "
                                    "reading it again") from None
        if is_transient(code, status):
            raise _TransientFailure(f"the data store is busy or unavailable ({code or status})") from None
        raise MissingFileError(uri, f"S3 refused the download ({code or 'error'})", hint=None) from None
    except S3DownloadFailedError:  # s3transfer's: the object's ETag changed between its parts
        raise _TransientFailure("the file changed while it was read (a new version written to the same key); "
                                "reading it again") from None
    except RetriesExceededError as exc:  # s3transfer's, after its own tries of a part
        raise _TransientFailure(_lost_link(exc.last_exception)) from None
    except NoCredentialsError:
        raise MissingFileError(uri, "no AWS credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
                               hint=None) from None
    except (BotoConnectionError, ReadTimeoutError, ResponseStreamingError, IncompleteReadError) as exc:
        raise _TransientFailure(_lost_link(exc)) from None
    except BotoCoreError as exc:
        raise MissingFileError(uri, f"cannot reach S3 ({type(exc).__name__}); check AWS_ENDPOINT_URL (or "
                                    "AWS_ENDPOINT_URL_S3) and the network", hint=None) from None


def _check_ends(uri: str, bucket: str, key: str, columns: list[str], size: int | None, client: Any) -> None:
    """The loaders' checks of what the object's first 64 KiB (a bzip2 file's first block) and (Parquet) footer show,
    before it is fetched whole: a column missing from a 600 MiB file was said after its download."""
    def read(first: int, last: int) -> bytes:
        body = client.get_object(Bucket=bucket, Key=key, Range=f"bytes={first}-{last}")["Body"]
        try:  # at most what was asked: a store that ignores Range sends the whole object
            return body.read(last - first + 1)
        finally:
            body.close()

    def tail(n: int) -> bytes:
        if n > FOOTER_MAX_BYTES:  # a damaged footer's length, or a schema of thousands of columns: the loader tells
            raise _TooLargeToCheck
        return read(max(0, size - n), size - 1)

    if not size:
        check_ends(uri, columns, b"", lambda n: b"")
        return
    with contextlib.suppress(_TooLargeToCheck):
        head = read(0, min(size, HEAD_BYTES) - 1)
        wanted = min(size, head_size(head, HEAD_BYTES))
        if wanted > len(head):  # a bzip2 file's first block, under 1 MiB (again from 0: a store may ignore Range)
            head = read(0, wanted - 1)
        check_ends(uri, columns, head, tail)


def _check_room(uri: str, spool: Spool, size: int | None) -> None:
    """Refuse at once a copy the spool volume cannot hold beside the room its messages need (a download ran 40 s
    before the volume was full)."""
    free = spool.free_bytes()
    if size is not None and free - size < RESERVE_BYTES:
        raise MissingFileError(uri, f"the worker's spool volume has {mib(free)} free, too little for a copy of the "
                                    f"dataview ({mib(size)}) beside the {mib(RESERVE_BYTES)} kept for the job's "
                                    "messages; its operator gives CAPE_SPOOL_DIR's volume more room", hint=None)


def _transfer_config() -> Any:
    """s3transfer's settings: a part that stops is tried twice (not 5 times) before the store's silence is said on
    the seat and the whole download is tried again."""
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(num_download_attempts=PART_ATTEMPTS)


def _lost_link(exc: BaseException | None) -> str:
    """Why the store's answers stopped, in a data owner's words."""
    from botocore.exceptions import ReadTimeoutError

    if isinstance(exc, ReadTimeoutError) or "timed out" in str(exc).lower():
        return f"the data store stopped sending data (nothing for {READ_TIMEOUT_SECONDS} s)"
    return f"the connection to the data store failed ({type(exc).__name__ if exc else 'no answer'})"
