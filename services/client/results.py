"""Reading a job's weights CSV from its model location (``file://`` path or ``s3://`` object).

Layout (pycape's): ``<model_location>/<job_id>/regression_weights.csv``, no header, one value per line,
the intercept first, then one weight per x column in the job's column order.
"""
from __future__ import annotations

import io
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np

from services.client.errors import ResultsUnavailable

WEIGHTS_FILE = "regression_weights.csv"


def weights_location(model_location: str, job_id: str) -> str:
    """The weights file's URI: ``model_location`` itself if it names the CSV, else the pycape layout under it."""
    if model_location.endswith(".csv"):
        return model_location
    return f"{model_location.rstrip('/')}/{job_id}/{WEIGHTS_FILE}"


def read_weights(location: str) -> np.ndarray:
    """Load the weights vector from ``file://``, a plain path or ``s3://`` (boto3, standard AWS variables)."""
    parsed = urlparse(location)
    if parsed.scheme == "s3":
        data = _read_s3(parsed.netloc, parsed.path.lstrip("/"), location)
    elif parsed.scheme in ("file", ""):
        path = Path(unquote(parsed.path if parsed.scheme == "file" else location))
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ResultsUnavailable(
                f"no weights file at {location}; is this the machine (or volume) the model owner's worker writes to?"
            ) from None
        except OSError as exc:
            raise ResultsUnavailable(f"cannot read the weights file {location}: {exc.strerror}") from None
    else:
        raise ResultsUnavailable(f"cannot read weights from {location}: only file:// and s3:// locations are supported")
    return parse_weights(data, location)


def parse_weights(data: bytes, location: str) -> np.ndarray:
    """One float per line, intercept first; anything else is an error naming the file."""
    try:
        weights = np.loadtxt(io.BytesIO(data), dtype=np.float64, delimiter=",", ndmin=1)
    except ValueError:
        raise ResultsUnavailable(
            f"the weights file {location} is not one number per line; it was not written by a cape worker"
        ) from None
    if weights.ndim != 1 or weights.size == 0:
        raise ResultsUnavailable(f"the weights file {location} must hold one number per line, intercept first")
    return weights


def _read_s3(bucket: str, key: str, location: str) -> bytes:
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    try:
        # A fresh session reads AWS_ACCESS_KEY_ID, AWS_REGION, AWS_ENDPOINT_URL and the profile files now,
        # rather than whatever boto3's process-wide default session cached earlier.
        body = boto3.session.Session().client("s3").get_object(Bucket=bucket, Key=key)["Body"]
        return body.read()
    except NoCredentialsError:
        raise ResultsUnavailable(
            f"no AWS credentials to read {location}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or a profile)"
        ) from None
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchKey", "404", "NoSuchBucket"):
            raise ResultsUnavailable(f"no weights file at {location} ({code})") from None
        if code in ("AccessDenied", "403"):
            raise ResultsUnavailable(f"access denied to {location}; ask the bucket owner for read access") from None
        raise ResultsUnavailable(f"cannot read {location}: {code or 'S3 error'}") from None
    except BotoCoreError as exc:
        raise ResultsUnavailable(f"cannot read {location}: {exc}; check AWS_ENDPOINT_URL and AWS_REGION") from None
