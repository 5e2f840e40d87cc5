"""Request bodies of the coordinator API (pydantic): validation here turns into 422s naming the field."""
from __future__ import annotations

import re
import unicodedata
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from services.model_location import model_location_problem


def _encodable(text: str) -> str:
    # JSON may smuggle lone surrogates in; they cannot be stored or echoed back as UTF-8.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (it holds a lone surrogate)") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]


# Shown in tables and logs: a line break, a terminal escape or a bidirectional override would break them or worse
# (fake rows, a terminal title or clipboard set, text shown reversed). Other format characters (joiners) stay:
# scripts and emoji need them.
_NOT_IN_ONE_LINE = {"Cc", "Zl", "Zp"}
_BIDI_CONTROLS = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _one_line(text: str) -> str:
    if any(unicodedata.category(c) in _NOT_IN_ONE_LINE or c in _BIDI_CONTROLS for c in text):
        raise ValueError("must be one line of text, without control characters (line breaks, tabs, escapes)")
    return text


def _model_location(uri: str) -> str:
    problem = model_location_problem(uri)
    if problem:
        raise ValueError(problem)
    return uri


def _readable_uri(uri: str) -> str:
    # What the owner's worker can read: refused here, not after every data owner has approved a job that uses it.
    # A relative path would be read from whatever directory the worker's programs run in, not the one it was
    # typed in: refused, so the mistake shows now rather than as "no such file" when the job runs.
    if "://" not in uri:
        if uri.startswith("/"):
            return uri  # a path on the owner's worker
        raise ValueError(f"{uri!r} is a relative path; give the file's absolute path on the owner's worker "
                         "(starting with /), a file:///absolute/path or an s3://bucket/key uri")
    parsed = urlparse(uri)
    if parsed.scheme == "s3" and parsed.netloc and parsed.path.strip("/"):
        return uri
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost") and parsed.path.startswith("/"):
        return uri
    raise ValueError("a worker reads s3://bucket/key, file:///absolute/path or an absolute path on the owner's "
                     "worker")

_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,190}$")


def _label(value: str) -> str:
    if not _LABEL.match(value):
        raise ValueError("a label starts with a letter or digit and holds only letters, digits, '.', '_' and '-' "
                         f"(at most 64), not {value[:80]!r}")
    return value


def _email(value: str) -> str:
    if not _EMAIL.match(value):
        raise ValueError(f"{value[:80]!r} is not an email address (like name@example.org)")
    # An email goes into the audit log and every project member's job views, as names do: no escapes, no bidi
    # overrides (one would show another organization's address).
    return _one_line(value)


# Validators rather than patterns: a pattern's error quotes the regular expression to the user.
Label = Annotated[str, AfterValidator(_label)]
Ref = Annotated[Text, StringConstraints(min_length=1, max_length=200)]
Name = Annotated[Text, StringConstraints(min_length=1, max_length=200), AfterValidator(_one_line)]
Email = Annotated[str, AfterValidator(_email)]
Role = Literal["admin", "operator", "data_scientist", "user"]
# One line too: columns show in every project member's job views, and scripts read the API's text raw.
Column = Annotated[Text, StringConstraints(min_length=1, max_length=200), AfterValidator(_one_line)]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NewUser(Body):
    email: Email
    role: Role
    # The admin confirms adding an account another organization made (`existing_account` in the 409).
    existing_account: bool = False


class MemberRole(Body):
    role: Role


TokenDescription = Annotated[Text, StringConstraints(max_length=500), AfterValidator(_one_line)]


class NewToken(Body):
    description: TokenDescription | None = None


class NewProject(Body):
    label: Label
    name: Name | None = None
    description: Annotated[Text, StringConstraints(max_length=5000)] | None = None
    organization: Ref | None = None


class OrganizationRef(Body):
    organization: Ref


class HelperRef(Body):
    organization: Ref | None


class SchemaColumn(Body):
    name: Column
    type: Literal["number", "integer", "string"]


def _selectable(name: str) -> str:
    # `cape jobs submit --x NAME:COL,...` splits at the first ':' and at ','; a name holding one could not be chosen.
    if ":" in name or "," in name:
        raise ValueError("a dataview name cannot hold ':' or ',' (the CLI selects columns as NAME:COL1,COL2)")
    return name


class NewDataview(Body):
    name: Annotated[Name, AfterValidator(_selectable)]
    uri: Annotated[Text, StringConstraints(min_length=1, max_length=2000), AfterValidator(_readable_uri)]
    schema_: list[SchemaColumn] = Field(alias="schema", min_length=1, max_length=10000)
    organization: Ref | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class XSpec(Body):
    dataview: Ref
    columns: list[Column] = Field(min_length=1, max_length=1000)


class YSpec(Body):
    dataview: Ref
    column: Column


class NewJob(Body):
    type: Literal["linear_regression"]
    x: XSpec
    y: YSpec
    model_owner: Ref
    model_location: Annotated[Text, StringConstraints(max_length=2000), AfterValidator(_model_location)] | None = None
    timeout: int = Field(default=600, ge=1, le=7 * 24 * 3600)
    organization: Ref | None = None


class Approval(Body):
    # The data-owner organization decided for; needed only when the caller may decide for several of them.
    organization: Ref | None = None


class Rejection(Approval):
    reason: Annotated[Text, StringConstraints(max_length=2000)] | None = None


class WorkerKeys(Body):
    encryption_public_key: Annotated[str, StringConstraints(max_length=200)]
    signing_public_key: Annotated[str, StringConstraints(max_length=200)]


class Heartbeat(Body):
    version: Annotated[Text, StringConstraints(max_length=200)] | None = None
    # The sender's key (base64, as registered): a heartbeat from a worker whose keys were replaced is refused.
    signing_public_key: Annotated[str, StringConstraints(max_length=200)] | None = None
    programs: dict[Annotated[Text, StringConstraints(max_length=100)], Any] | None = Field(default=None,
                                                                                          max_length=50)
    # The worker is stopping (`docker stop`): it shows offline at once, not 45 s later.
    stopping: bool = False


class Metrics(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    mse_result: float
    r_squared_result: float


class Report(Body):
    state: Literal["started", "running", "completed", "error"]
    progress: float = Field(default=0.0, ge=0.0, le=1.0)
    message: Annotated[Text, StringConstraints(max_length=4000)] | None = None
    metrics: Metrics | None = None
    model_location: Annotated[Text, StringConstraints(max_length=2000)] | None = None
