"""The worker's configuration, read once from the environment (and an optional `.env` file) and validated.

Every problem is a `ConfigError` naming the variable and how to fix it. Secrets (the organization token, the AWS
secret key) are kept out of `repr()` and out of every message, also when pasted into another variable. A CAPE_
variable the worker does not read is a typo whose setting is lost: `unknown_variables` names each, and an AWS_ one
botocore does not read whose name is close to one the worker's documentation gives.
"""
from __future__ import annotations

import base64
import binascii
import difflib
import functools
import os
import re
import socket
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping
from urllib.parse import urlparse

from dotenv import dotenv_values

from services.connection_errors import ca_file_problem, plain_http_to_another_host
from services.model_location import model_location_problem

DEFAULT_SPOOL_DIR = "/var/lib/cape-worker/spool"
DEFAULT_STATE_DIR = "/var/lib/cape-worker/state"
DEFAULT_LOG_GROUP = "/cape/worker"
DEFAULT_REGION = "us-east-1"
DEFAULT_POLL_INTERVAL = 10.0
# The first retry after the coordinator or the model store failed (doubling from there): not the poll interval,
# which may be long, while a short outage should cost seconds (and the heartbeats the coordinator awaits).
RETRY_BASE_SECONDS = 2.0
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_TOKEN_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_LOG_GROUP_RE = re.compile(r"^[A-Za-z0-9_\-/.#]{1,512}$")
# botocore's rule for a region name (botocore.utils.validate_region_name, which raises InvalidRegionError at client
# creation, inside every program); S3-compatible stores' names like "auto" or "garage" pass it.
_REGION_RE = re.compile(r"^(?![0-9]+$)(?!-)[a-zA-Z0-9-]{1,63}(?<!-)$")
# What a fix looks like in an error message: a Cape server (coordinator, broker), an S3-compatible endpoint.
_SERVER_EXAMPLE = "https://cape.example.com"
_S3_ENDPOINT_EXAMPLE = "http://127.0.0.1:9000 or https://s3.eu-west-1.amazonaws.com"
# Every CAPE_ variable the worker reads: these settings, the CLI's (CAPE_ENV_FILE, CAPE_WORKER_CONF) and the
# four `cape-worker run` hands to supervisord and its programs (CAPE_RUN_DIR, CAPE_PYTHON, CAPE_RUN_PID,
# CAPE_RUN_ID). Any other is a typo.
KNOWN_VARIABLES = frozenset({
    "CAPE_TOKEN", "CAPE_COORDINATOR", "CAPE_BROKER", "CAPE_BUCKET", "CAPE_SPOOL_DIR", "CAPE_STATE_DIR",
    "CAPE_WORKER_NAME", "CAPE_LOG_LEVEL", "CAPE_CLOUDWATCH", "CAPE_LOG_GROUP", "CAPE_POLL_INTERVAL",
    "CAPE_ENV_FILE", "CAPE_WORKER_CONF", "CAPE_RUN_DIR", "CAPE_PYTHON", "CAPE_RUN_PID", "CAPE_RUN_ID",
})
# Read by another Cape tool that may share the worker's environment (the demo runs both): not a typo.
OTHER_TOOLS_VARIABLES = frozenset({"CAPE_SERVER_DATA_DIR", "CAPE_SERVER_TLS_CERT", "CAPE_SERVER_TLS_KEY"})
# The AWS variables the README gives for the worker. An AWS_ name close to one of them that botocore does not read
# is a typo whose setting is lost (AWS_SECRET_KEY, AWS_REGION_NAME); names further off are left alone, as the AWS
# CLI and other SDKs that may share the environment read many more (AWS_DEFAULT_OUTPUT scores 0.72).
DOCUMENTED_AWS_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION",
                            "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_CA_BUNDLE")
_AWS_TYPO_CUTOFF = 0.78
# botocore reads AWS_ENDPOINT_URL_<SERVICE ID> for any service. The worker reads the two it uses itself, each in
# place of AWS_ENDPOINT_URL for its service (botocore's rule; an explicit endpoint_url would override both).
_AWS_SERVICE_ENDPOINT_PREFIX = "AWS_ENDPOINT_URL_"
SERVICE_ENDPOINT_VARIABLES = {"s3": "AWS_ENDPOINT_URL_S3", "logs": "AWS_ENDPOINT_URL_CLOUDWATCH_LOGS"}
# requests, which the worker's clients use, trusts the CAs in this file (or directory) for https:// instead of its
# own bundle: how a coordinator with a private CA's certificate is reached.
CA_BUNDLE_VARIABLE = "REQUESTS_CA_BUNDLE"
# Variables whose values are secrets: a value equal to one of them is never shown in a message.
SECRET_VARIABLES = ("CAPE_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
# A Cape token's shape, `<token_id>,<base64 secret>`, or a long base64 run (an AWS secret key is 40 characters): a
# value like it is a secret in the wrong variable (a path or a URL has characters a key has not).
_SECRET_SHAPE_RE = re.compile(r"[A-Za-z0-9_-]{1,128},[A-Za-z0-9+/_-]{8,}={0,2}|[A-Za-z0-9+/]{32,}={0,2}")
# A key has upper- and lower-case letters and digits mixed; a path of letters and slashes does not look like one.
_KEY_MIX = (re.compile(r"[A-Z]"), re.compile(r"[a-z]"), re.compile(r"[0-9]"))
NOT_SHOWN = "(the value looks like a secret; not shown)"
_ON = {"1", "on", "true", "yes"}
_OFF = {"", "0", "off", "false", "no"}


class ConfigError(ValueError):
    """A configuration variable is missing or malformed; the message names it and says how to fix it."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable


@dataclass(frozen=True)
class Bucket:
    """Where result files go: `s3://bucket[/prefix]` or `file:///dir`."""

    scheme: str  # "s3" or "file"
    name: str  # bucket name, or the local directory for file://
    prefix: str = ""  # key prefix inside the bucket, no leading/trailing slash

    @property
    def uri(self) -> str:
        if self.scheme == "file":
            return Path(self.name).as_uri()
        return f"s3://{self.name}/{self.prefix}".rstrip("/")


@dataclass(frozen=True)
class LocalConfig:
    """The settings that name only this machine's directories and the worker: all `cape-worker status` reads, so it
    works without CAPE_TOKEN or CAPE_COORDINATOR."""

    spool_dir: Path
    state_dir: Path
    worker_name: str

    @property
    def run_dir(self) -> Path:
        """Where supervisord's socket and the FATAL marker live."""
        return self.state_dir / "run"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "LocalConfig":
        """Read and validate these settings (defaults as in the image); with no `environ`, as `WorkerConfig`."""
        get = _getter(_merged_env(environ, None))
        worker_name = get("CAPE_WORKER_NAME", _default_worker_name())
        if not _NAME_RE.match(worker_name):
            raise ConfigError("CAPE_WORKER_NAME", "use 1-63 letters, digits, '.', '_' or '-', starting with a "
                                                  "letter or digit")
        show = _shower(get)
        return cls(spool_dir=_parse_dir("CAPE_SPOOL_DIR", get("CAPE_SPOOL_DIR", DEFAULT_SPOOL_DIR), show),
                   state_dir=_parse_dir("CAPE_STATE_DIR", get("CAPE_STATE_DIR", DEFAULT_STATE_DIR), show),
                   worker_name=worker_name)


@dataclass(frozen=True)
class WorkerConfig:
    """Validated settings of one worker; built by `from_env`."""

    token: str = field(repr=False)
    coordinator: str
    broker: str
    bucket: Bucket | None
    spool_dir: Path
    state_dir: Path
    worker_name: str
    log_level: str = "INFO"
    cloudwatch: bool = False
    log_group: str = DEFAULT_LOG_GROUP
    aws_region: str = DEFAULT_REGION
    aws_endpoint_url: str | None = None
    aws_service_endpoints: dict[str, str] = field(default_factory=dict)  # "s3"/"logs" -> its own endpoint
    aws_access_key_id: str | None = field(default=None, repr=False)
    aws_secret_access_key: str | None = field(default=None, repr=False)
    aws_session_token: str | None = field(default=None, repr=False)  # temporary credentials (assume-role, SSO)
    # The job watch's long poll picks up approvals and stops at once; the full cycle is the safety net (and marks
    # Completed jobs ended). At 2 s an idle worker made 36 requests a minute; at 10 s, about 12.
    poll_interval: float = DEFAULT_POLL_INTERVAL

    def warnings(self) -> list[str]:
        """Settings that work but expose something: a Cape server reached over plain HTTP across a network."""
        return [f"{variable} is plain http:// to {urlparse(url).hostname}, not this machine: CAPE_TOKEN and job "
                "details cross the network unencrypted (messages between workers stay end-to-end encrypted); "
                "use https://" for variable, url in (("CAPE_COORDINATOR", self.coordinator), ("CAPE_BROKER", self.broker))
                if plain_http_to_another_host(url)]

    @property
    def token_id(self) -> str:
        """The public half of the token (safe to log)."""
        return self.token.split(",", 1)[0]

    @property
    def secrets(self) -> tuple[str, ...]:
        """Values that must never appear in a log line."""
        return tuple(s for s in (self.token, self.token.split(",", 1)[1], self.aws_secret_access_key,
                                 self.aws_session_token) if s)

    @property
    def run_dir(self) -> Path:
        """Where supervisord's socket and the FATAL marker live."""
        return self.state_dir / "run"

    def boto3_kwargs(self, service: str) -> dict[str, str]:
        """Keyword arguments for `boto3.client(service, ...)` ("s3" or "logs"): region, the service's endpoint
        (its own variable, else AWS_ENDPOINT_URL), explicit keys when given."""
        kwargs = {"region_name": self.aws_region}
        endpoint = self.aws_service_endpoints.get(service) or self.aws_endpoint_url
        if endpoint:
            kwargs["endpoint_url"] = endpoint
        if self.aws_access_key_id and self.aws_secret_access_key:
            kwargs["aws_access_key_id"] = self.aws_access_key_id
            kwargs["aws_secret_access_key"] = self.aws_secret_access_key
            if self.aws_session_token:
                kwargs["aws_session_token"] = self.aws_session_token
        return kwargs

    def endpoint_variable(self, service: str) -> str:
        """The variable that sets `service`'s endpoint, for messages ("check AWS_ENDPOINT_URL_S3")."""
        return SERVICE_ENDPOINT_VARIABLES[service] if service in self.aws_service_endpoints else "AWS_ENDPOINT_URL"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, env_file: str | os.PathLike | None = None
                 ) -> "WorkerConfig":
        """Read and validate the configuration.

        With no `environ`, reads `os.environ` plus the `.env` file named by CAPE_ENV_FILE (or `./.env` if present);
        variables already in the environment win over the file.
        """
        env = _merged_env(environ, env_file)
        get = _getter(env)
        show = _shower(get)

        token = _parse_token(get("CAPE_TOKEN"))
        coordinator = _parse_base_url("CAPE_COORDINATOR", get("CAPE_COORDINATOR"), "coordinator's", show)
        broker = _parse_base_url("CAPE_BROKER", get("CAPE_BROKER", coordinator + "/broker"), "broker's", show)
        _check_ca_bundle(env.get(CA_BUNDLE_VARIABLE, ""))
        endpoint = _parse_http_url("AWS_ENDPOINT_URL", get("AWS_ENDPOINT_URL"), show, required=False,
                                   example=_S3_ENDPOINT_EXAMPLE) or None
        service_endpoints = {service: url for service, variable in SERVICE_ENDPOINT_VARIABLES.items()
                             if (url := _parse_http_url(variable, get(variable), show, required=False,
                                                        example=_S3_ENDPOINT_EXAMPLE))}
        access_key, secret_key = get("AWS_ACCESS_KEY_ID") or None, get("AWS_SECRET_ACCESS_KEY") or None
        if bool(access_key) != bool(secret_key):
            missing = "AWS_SECRET_ACCESS_KEY" if access_key else "AWS_ACCESS_KEY_ID"
            raise ConfigError(missing, "set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or neither "
                                       "(to use the instance role or ~/.aws)")
        local = LocalConfig.from_env(env)
        log_level = get("CAPE_LOG_LEVEL", "INFO").upper()
        if log_level not in LOG_LEVELS:
            raise ConfigError("CAPE_LOG_LEVEL", f"must be one of {', '.join(LOG_LEVELS)}")
        cloudwatch_raw = get("CAPE_CLOUDWATCH").lower()
        if cloudwatch_raw not in _ON | _OFF:
            raise ConfigError("CAPE_CLOUDWATCH", "must be 'on' or 'off'")
        log_group = get("CAPE_LOG_GROUP", DEFAULT_LOG_GROUP)
        if len(log_group) > 512:
            raise ConfigError("CAPE_LOG_GROUP", f"is {len(log_group)} characters long; CloudWatch takes at most 512")
        if not _LOG_GROUP_RE.match(log_group):
            raise ConfigError("CAPE_LOG_GROUP", "use letters, digits and _ - / . # only (for example /cape/worker)")
        if log_group.startswith("aws/"):
            raise ConfigError("CAPE_LOG_GROUP", "names starting with aws/ are reserved by AWS; use e.g. /cape/worker")
        region = get("AWS_REGION", get("AWS_DEFAULT_REGION", DEFAULT_REGION))
        if not _REGION_RE.match(region):
            raise ConfigError("AWS_REGION" if get("AWS_REGION") else "AWS_DEFAULT_REGION",
                              f"{show(region)} is not a region name (like eu-west-1)")
        poll_interval = _parse_poll_interval(get("CAPE_POLL_INTERVAL", f"{DEFAULT_POLL_INTERVAL:g}"), show)
        return cls(
            token=token,
            coordinator=coordinator,
            broker=broker,
            bucket=parse_bucket(get("CAPE_BUCKET"), "CAPE_BUCKET") if get("CAPE_BUCKET") else None,
            spool_dir=local.spool_dir,
            state_dir=local.state_dir,
            worker_name=local.worker_name,
            log_level=log_level,
            cloudwatch=cloudwatch_raw in _ON,
            log_group=log_group,
            aws_region=region,
            aws_endpoint_url=endpoint,
            aws_service_endpoints=service_endpoints,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            aws_session_token=get("AWS_SESSION_TOKEN") or None,
            poll_interval=poll_interval,
        )


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """One warning per CAPE_ variable the worker does not read (a typo: its setting is lost), with the known name it
    most resembles, and per AWS_ variable botocore does not read that is close to one the README gives; with no
    `environ`, `os.environ` over CAPE_ENV_FILE or ./.env, as `WorkerConfig`."""
    names = sorted(_merged_env(environ, None))
    warnings = [_unknown_variable_warning(name) for name in names
                if name.startswith("CAPE_") and name not in KNOWN_VARIABLES | OTHER_TOOLS_VARIABLES]
    for name in names:
        if name.startswith(_AWS_SERVICE_ENDPOINT_PREFIX):
            warnings += _service_endpoint_warning(name)
        elif (name.startswith("AWS_") and name not in _botocore_variables()
              and name not in DOCUMENTED_AWS_VARIABLES):
            close = difflib.get_close_matches(name, DOCUMENTED_AWS_VARIABLES, n=1, cutoff=_AWS_TYPO_CUTOFF)
            if close:
                warnings.append(f"{name} is not a variable boto3 reads, so it is ignored; did you mean {close[0]}?")
    return warnings


def _service_endpoint_warning(name: str) -> list[str]:
    """AWS_ENDPOINT_URL_LOGS and the like: close to one the worker reads, and not another service's. botocore names
    the variable after a service's id, CLOUDWATCH_LOGS, not its client name, logs; and the worker uses no CloudWatch
    but its Logs: those two are said although they name services."""
    suffix = name[len(_AWS_SERVICE_ENDPOINT_PREFIX):]
    slips = ("LOGS", "CLOUDWATCH")
    if name in SERVICE_ENDPOINT_VARIABLES.values() or (suffix not in slips
                                                        and suffix.lower().replace("_", "-") in _aws_service_names()):
        return []

    def likeness(variable: str) -> float:  # by the service part: LOGS is in CLOUDWATCH_LOGS, CLOUDWATCHLOGS near it
        used = variable[len(_AWS_SERVICE_ENDPOINT_PREFIX):]
        return 1.0 if suffix in used else difflib.SequenceMatcher(None, suffix, used).ratio()

    closest = max(SERVICE_ENDPOINT_VARIABLES.values(), key=likeness)
    return [f"{name} is not a variable boto3 reads for the worker's S3 or CloudWatch Logs, so it is ignored; did "
            f"you mean {closest}?"] if likeness(closest) >= _AWS_TYPO_CUTOFF else []


@functools.cache
def _aws_service_names() -> frozenset[str]:
    import botocore.session

    return frozenset(botocore.session.get_session().get_available_services())


@functools.cache
def _botocore_variables() -> frozenset[str]:
    """The environment variables botocore reads: its session settings and the environment credential provider's
    (AWS_REGION and AWS_ENDPOINT_URL are read elsewhere, and by the worker itself)."""
    from botocore.configprovider import BOTOCORE_DEFAUT_SESSION_VARIABLES  # botocore's own spelling
    from botocore.credentials import EnvProvider

    names: set[str] = set()
    for _config_name, env, *_rest in BOTOCORE_DEFAUT_SESSION_VARIABLES.values():
        names.update([env] if isinstance(env, str) else env or ())
    for value in vars(EnvProvider).values():
        if isinstance(value, str) and value.startswith("AWS_"):
            names.add(value)
        elif isinstance(value, list):
            names.update(v for v in value if isinstance(v, str))
    return frozenset(names)


def _unknown_variable_warning(name: str) -> str:
    close = difflib.get_close_matches(name, sorted(KNOWN_VARIABLES), n=1, cutoff=0.7)
    hint = f"did you mean {close[0]}?" if close else "check its name against the worker's variables in the README"
    return f"{name} is not a variable the worker reads, so it is ignored; {hint}"


def setting_warnings(environ: Mapping[str, str]) -> list[str]:
    """What `check` and `run` warn of in the settings: misspelled variables, and a `.env` file holding a secret that
    other users can read (the worker refuses key files such as that)."""
    return unknown_variables(environ) + exposed_env_file(environ)


def exposed_env_file(environ: Mapping[str, str]) -> list[str]:
    """A warning if the `.env` file in use defines CAPE_TOKEN or an AWS secret and is readable by other users."""
    try:
        path = env_file_path(environ)
        if path is None:
            return []
        mode = stat.S_IMODE(path.stat().st_mode)
        held = [name for name in SECRET_VARIABLES if dotenv_values(path).get(name)]
    except (ConfigError, OSError):
        return []  # the configuration's own check says what is wrong with the file
    if not held or not mode & 0o077:
        return []
    return [f"{path} holds {' and '.join(held)} and other users can read it (mode {mode:o}); run chmod 600 {path}"]


def env_file_path(environ: Mapping[str, str]) -> Path | None:
    """The `.env` file to read: the one CAPE_ENV_FILE names, which must be readable (a typo must not go unnoticed),
    else `./.env` if there is one (it is optional)."""
    named = (environ.get("CAPE_ENV_FILE") or "").strip()
    if not named:
        return Path(".env") if Path(".env").is_file() else None
    return _readable_env_file(Path(named))


def _readable_env_file(path: Path) -> Path:
    """`path` if this user can read it; otherwise a ConfigError saying what is wrong with it."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ConfigError("CAPE_ENV_FILE", f"{path} does not exist; fix the path or unset CAPE_ENV_FILE") from None
    except OSError as exc:
        raise ConfigError("CAPE_ENV_FILE", f"cannot read {path} ({exc.strerror}); fix the path or unset "
                                           "CAPE_ENV_FILE") from None
    if stat.S_ISDIR(mode):
        raise ConfigError("CAPE_ENV_FILE", f"{path} is a directory; point CAPE_ENV_FILE at the .env file itself")
    if not os.access(path, os.R_OK):
        raise ConfigError("CAPE_ENV_FILE", f"cannot read {path} (permission denied); let this user read it, or "
                                           "unset CAPE_ENV_FILE")
    return path


def _merged_env(environ: Mapping[str, str] | None, env_file: str | os.PathLike | None) -> dict[str, str]:
    """`environ` over the variables of `env_file`; with no `environ`, `os.environ` over CAPE_ENV_FILE or ./.env."""
    if environ is None:
        environ = os.environ
        if env_file is None:
            env_file = env_file_path(environ)
    env: dict[str, str] = {}
    if env_file is not None:
        path = _readable_env_file(Path(env_file))
        env.update({k: v for k, v in dotenv_values(path).items() if v is not None})
    env.update(environ)
    return env


def _getter(env: Mapping[str, str]) -> Callable[..., str]:
    """`get(name, default="")`: the stripped value, the default when unset or empty."""
    return lambda name, default="": (env.get(name) or default).strip()


def _shower(get: Callable[..., str]) -> Callable[[str], str]:
    """`show(value)`: `repr(value)` for an error message, or NOT_SHOWN for a secret pasted into the wrong variable
    (the value of a secret variable, the secret half of CAPE_TOKEN, or anything shaped like a token or a key)."""
    secrets = {get(name) for name in SECRET_VARIABLES} | {get("CAPE_TOKEN").partition(",")[2]}
    secrets.discard("")

    def show(value: str) -> str:
        # Also a value that holds a secret (a URL with the token in its path): short secrets only when equal.
        holds = any(secret == value or (len(secret) >= 8 and secret in value) for secret in secrets)
        shaped = (_SECRET_SHAPE_RE.fullmatch(value) and not value.startswith("/")
                  and all(kind.search(value) for kind in _KEY_MIX))
        return NOT_SHOWN if holds or shaped else repr(value)

    return show


def parse_bucket(value: str, variable: str = "model_location") -> Bucket:
    """Parse `s3://bucket[/prefix]` or `file:///absolute/dir` (services/model_location.py's rule, which the CLI and
    the coordinator apply too); `variable` names the source in errors."""
    problem = model_location_problem(value)
    if problem:
        raise ConfigError(variable, problem)
    parsed = urlparse(value)
    if parsed.scheme == "file":
        return Bucket("file", os.path.normpath(parsed.path))
    return Bucket("s3", parsed.netloc, parsed.path.strip("/"))


def _parse_token(value: str) -> str:
    if not value:
        raise ConfigError("CAPE_TOKEN", "is not set; create an organization token (`cape-server admin create-org` "
                                        "or `cape orgs create-token ORG`) and pass it as CAPE_TOKEN")
    token_id, sep, secret = value.partition(",")
    if not sep or not _TOKEN_ID_RE.match(token_id) or not secret:
        raise ConfigError("CAPE_TOKEN", "is malformed: expected '<token_id>,<base64 secret>' as printed when the "
                                        "token was created")
    try:
        base64.b64decode(secret + "=" * (-len(secret) % 4), altchars=b"-_" if ("-" in secret or "_" in secret)
                         else None, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError("CAPE_TOKEN", "is malformed: the part after the comma is not base64; copy the whole "
                                        "token as printed when it was created") from None
    return value


def _parse_http_url(variable: str, value: str, show: Callable[[str], str], required: bool,
                    example: str = _SERVER_EXAMPLE) -> str:
    """`value` without a trailing slash; `example` is a URL of the kind `variable` wants, for the error message;
    `show` quotes `value` in it (or hides a secret)."""
    if not value:
        if required:
            raise ConfigError(variable, f"is not set; give the server's URL, e.g. {example}")
        return ""
    parsed = urlparse(value)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(variable, f"is not an http(s) URL: {show(value)}; use e.g. {example}")
    try:
        parsed.port  # noqa: B018 -- raises ValueError for a bad port
    except ValueError:
        raise ConfigError(variable, f"has an invalid port: {show(value)}") from None
    if parsed.query or parsed.fragment or parsed.username:
        raise ConfigError(variable, "must not contain credentials, ?query or #fragment; give just the base URL")
    return value.rstrip("/")


def _parse_base_url(variable: str, value: str, whose: str, show: Callable[[str], str]) -> str:
    """A required server URL that the worker's clients append `/v1/...` to, so one ending in /v1 would double it."""
    url = _parse_http_url(variable, value, show, required=True)
    if urlparse(url).path.endswith("/v1"):
        base = url[:-len("/v1")]
        raise ConfigError(variable, f"give the {whose} base URL, without /v1: "
                                    f"{NOT_SHOWN if show(base) == NOT_SHOWN else base}")
    return url


def _check_ca_bundle(value: str) -> None:
    """REQUESTS_CA_BUNDLE, when set, must load as requests will load it (the raw value: requests does not strip
    it), or every call fails with an OSError, or a verification error that blames the server."""
    problem = ca_file_problem(value) if value else None
    if problem:
        raise ConfigError(CA_BUNDLE_VARIABLE, problem)


def _parse_poll_interval(value: str, show: Callable[[str], str]) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0.05 <= seconds <= 3600:  # also false for nan
        raise ConfigError("CAPE_POLL_INTERVAL", f"must be a number of seconds between 0.05 and 3600, not "
                                                f"{show(value)}")
    return seconds


def _parse_dir(variable: str, value: str, show: Callable[[str], str]) -> Path:
    path = Path(value)
    if not path.is_absolute():
        path = Path.cwd() / path
    shown = path if show(value) != NOT_SHOWN else NOT_SHOWN
    try:
        is_other = path.exists() and not path.is_dir()
    except OSError as exc:
        raise ConfigError(variable, f"cannot access {shown} ({exc.strerror}); give this user access or choose "
                                    "another directory") from None
    if is_other:
        raise ConfigError(variable, f"{shown} exists and is not a directory; point it at a directory (a volume)")
    return path


def _default_worker_name() -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:63].strip("-.") or "worker"
    return name
