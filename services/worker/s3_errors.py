"""What an S3 error says: its code and HTTP status, and whether waiting may fix it (the uploader and the dataview
download both retry what passes: a throttling store, a gateway's 502, a store starting up)."""
from __future__ import annotations

import re

TRANSIENT_CODES = ("SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling",
                   "ThrottlingException", "RequestTimeTooSkewed")


def code_and_status(exc: BaseException) -> tuple[str, int]:
    """The error code and HTTP status of a botocore/boto3 error ("" and 0 when it carries none)."""
    code, status = "", 0
    # boto3's S3UploadFailedError is raised while handling the ClientError that has the answer's code and status.
    for error in (exc, exc.__cause__, exc.__context__):
        response = getattr(error, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            break
    if not code:  # only the text is left: "... An error occurred (502) when calling ..." (a path may hold "(x)")
        match = re.search(r"An error occurred \(([\w.]+)\)", str(exc))
        code = match.group(1) if match else ""
    if not status and code.isdigit():
        status = int(code)
    return code, status


def is_transient(code: str, status: int) -> bool:
    """Whether the store may take the request later: busy, throttling or failing for now (a 501 or 505 never
    will)."""
    return code in TRANSIENT_CODES or (status >= 500 and status not in (501, 505)) or status == 429
