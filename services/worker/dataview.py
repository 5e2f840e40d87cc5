"""Loading this organization's dataview for a job: s3:// (boto3), file:// or a local path, CSV or Parquet.

An s3:// object is streamed to a private scratch file in the spool (boto3's managed, multipart download, with the
standard AWS variables and `AWS_ENDPOINT_URL`), read with the job package's loaders, and removed.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from services.jobs.linear_regression import MissingFileError, load_x, load_y
from services.worker.spool import Spool

S3ClientFactory = Callable[[], Any]


def default_s3_client() -> Any:
    """A boto3 S3 client from the standard AWS variables (AWS_ENDPOINT_URL included, read by boto3 itself)."""
    import boto3

    return boto3.client("s3")


def load_dataview(
    uri: str,
    *,
    x_columns: list[str] | None = None,
    y_column: str | None = None,
    spool: Spool,
    s3_client: S3ClientFactory = default_s3_client,
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
    scratch = spool.temp_file(Path(urlparse(uri).path).suffix)
    try:
        _download_s3(uri, scratch, s3_client)
        with open(scratch, "rb") as handle:
            return load(handle)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(scratch)


def _download_s3(uri: str, dest: Path, s3_client: S3ClientFactory) -> None:
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    parsed = urlparse(uri)
    bucket, key = parsed.netloc, parsed.path.lstrip("/")
    if not bucket or not key:
        raise MissingFileError(uri, "an s3:// dataview uri must be s3://bucket/key")
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # organization data: private scratch file
    try:
        with os.fdopen(fd, "wb") as out:
            s3_client().download_fileobj(bucket, key, out)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NoSuchBucket", "NotFound"):
            raise MissingFileError(uri, "no such object in S3") from None
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise MissingFileError(uri, "access denied by S3; check the worker's AWS credentials", hint=None) from None
        raise MissingFileError(uri, f"S3 refused the download ({code or 'error'})") from None
    except NoCredentialsError:
        raise MissingFileError(uri, "no AWS credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
                               hint=None) from None
    except BotoCoreError as exc:
        raise MissingFileError(uri, f"cannot reach S3 ({type(exc).__name__}); check AWS_ENDPOINT_URL (or "
                                    "AWS_ENDPOINT_URL_S3) and the network") from None
