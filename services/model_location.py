"""What a job's model location may be, checked alike by the CLI/SDK (before a request) and the coordinator."""
from __future__ import annotations

from urllib.parse import urlparse

MODEL_LOCATION_FORMS = "s3://BUCKET[/PREFIX] or file:///ABSOLUTE/PATH"


def model_location_problem(uri: str) -> str | None:
    """None for s3://BUCKET[/PREFIX] or file:///ABSOLUTE/PATH (no spaces); else what is wrong, in a few words."""
    if not uri or any(c.isspace() for c in uri):
        return f"give {MODEL_LOCATION_FORMS}, without spaces"
    parsed = urlparse(uri)
    if parsed.scheme == "s3" and parsed.netloc:
        return None
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost") and parsed.path.startswith("/"):
        return None
    if parsed.scheme == "s3":
        return f"s3:// needs a bucket: give {MODEL_LOCATION_FORMS}"
    if parsed.scheme == "file":
        return f"file:// needs an absolute path (three slashes, file:///dir): give {MODEL_LOCATION_FORMS}"
    return f"give {MODEL_LOCATION_FORMS}"
