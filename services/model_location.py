"""Where a model may be written: `s3://BUCKET[/PREFIX]` or `file:///ABSOLUTE/DIR`. One rule for the CLI and SDK
(before a request), the coordinator (at submission) and the worker (CAPE_BUCKET, and a job's location at upload),
so a location refused at upload is refused at submission already, not after the whole computation."""
from __future__ import annotations

import re
from urllib.parse import unquote, urlparse

MODEL_LOCATION_FORMS = "s3://BUCKET[/PREFIX] or file:///ABSOLUTE/PATH"
_S3_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def model_location_problem(uri: str) -> str | None:
    """None for a location a worker writes to; else what is wrong, in a few words."""
    if not uri or any(c.isspace() for c in uri):
        return f"give {MODEL_LOCATION_FORMS}, without spaces"
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/"):
            return f"file:// needs an absolute path (three slashes, file:///dir): give {MODEL_LOCATION_FORMS}"
        return None
    if parsed.scheme == "s3":
        if not parsed.netloc:
            return f"s3:// needs a bucket: give {MODEL_LOCATION_FORMS}"
        if not _S3_BUCKET.fullmatch(parsed.netloc):
            return "not a valid S3 bucket name (3 to 63 lower-case letters, digits, '.' and '-'); use " \
                   "s3://bucket-name[/prefix]"
        if parsed.query or parsed.fragment:
            return "remove the ?query or #fragment; use s3://bucket-name[/prefix]"
        # A path-tidying hop (a proxy) turns `a/../b` into `b`, or `../other-bucket` into another bucket, so the
        # object would not be where the job's record says.
        prefix = unquote(parsed.path).strip("/")
        if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
            return "the prefix may not hold '.', '..' or empty ('//') segments; use s3://bucket-name[/prefix]"
        return None
    return f"give {MODEL_LOCATION_FORMS}"
