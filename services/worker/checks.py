"""`cape-worker check`: validate the configuration, then reach every endpoint it names.

One `CheckResult` per check: the configuration (and a warning per CAPE_ variable the worker does not read), the
spool and state directories, the worker's key files, the coordinator (login with CAPE_TOKEN), the broker, the bucket
(write and delete a test object) and CloudWatch Logs when enabled (make the group and stream <worker>/check if
missing, as the programs would, and put one event: exactly the permissions they need). The directory and key checks
run what `run` and its programs run, so `check` passes only where they would; they create nothing, so a mistyped
path is not made real.
Each failure says what is wrong and how to fix it; no secret appears.
"""
from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import requests

from services.connection_errors import connection_problem
from services.worker import health, keys
from services.worker.api_errors import error_of, token_refusal
from services.worker.disk_advice import FULL_ERRNOS, disk_advice
from services.worker.config import ConfigError, WorkerConfig, setting_warnings
from services.worker.coordinator_client import CoordinatorClient, CoordinatorError
from services.worker.keys import KeyFileError
from services.worker.logs import make_unless_there, rejected_for
from services.worker.memory_cgroup import memory_limit
from services.worker.resource_limits import MIN_OPEN_FILES, memory_limit_said, open_files_problem
from services.worker.spool import RESERVE_BYTES, mib
from services.worker.uploader import ModelStore, UploadError

CHECK_TIMEOUT = 5.0
# AWS's codes for credentials it does not accept (unknown key, wrong secret, expired session token).
_BAD_CREDENTIALS = ("UnrecognizedClientException", "InvalidSignatureException", "ExpiredTokenException",
                    "InvalidClientTokenId", "InvalidAccessKeyId", "SignatureDoesNotMatch")
# What the coordinator and the broker checks say of a token they refuse.
USER_TOKEN = ("CAPE_TOKEN is a user token; a worker needs an organization token (`cape orgs create-token ORG`, as "
              "an admin of ORG)")
SPOOL_LEAST_FREE_BYTES = RESERVE_BYTES + 256 * 1024**2  # below it `check` fails: the messenger's reserve and a job


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    warning: bool = False  # not a failure, but likely a mistake (a misspelled variable)

    def line(self) -> str:
        mark = "WARN" if self.warning else "ok  " if self.ok else "FAIL"
        return f"{mark} {self.name:<13} {self.detail}"


def run_checks(environ: Mapping[str, str]) -> list[CheckResult]:
    """All checks in order; stops after the configuration (and its warnings) if it is invalid."""
    return list(iter_checks(environ))


def iter_checks(environ: Mapping[str, str]) -> Iterator[CheckResult]:
    """The checks one at a time, each as soon as it is done (one that waits on the network shows which)."""
    # A misspelled variable may be why the configuration is invalid (a required one unset): warn either way.
    warnings = [CheckResult("variables", True, text, warning=True) for text in setting_warnings(environ)]
    try:
        config = WorkerConfig.from_env(environ)
    except ConfigError as exc:
        yield CheckResult("configuration", False, str(exc))
        yield from warnings
        return
    warnings += [CheckResult("transport", True, text, warning=True) for text in config.warnings()]
    yield CheckResult("configuration", True, f"worker {config.worker_name}, token id {config.token_id}")
    yield from warnings
    yield check_spool(config)
    for check in (check_state, check_keys, check_limits, check_coordinator, check_broker, check_bucket):
        yield check(config)
    if config.cloudwatch:
        yield check_cloudwatch(config)


def check_spool(config: WorkerConfig) -> CheckResult:
    """The spool is writable, on a volume with more free than the messenger keeps (below it, messages wait at the
    broker and no job can go on)."""
    result = check_directory("spool", config.spool_dir, "CAPE_SPOOL_DIR")
    if not result.ok:
        return result
    existing = config.spool_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < SPOOL_LEAST_FREE_BYTES:
        return CheckResult("spool", False, f"{config.spool_dir}'s volume has {mib(free)} free; the messenger keeps "
                                           f"{mib(RESERVE_BYTES)} free (messages wait at the broker below it) and a "
                                           "job needs room for its messages: give CAPE_SPOOL_DIR a volume with at "
                                           f"least {mib(SPOOL_LEAST_FREE_BYTES)} free (at n = 10^6 rows and d = 32 "
                                           "columns, the y-owner's worker keeps 0.26 GB of messages)")
    return CheckResult("spool", True, f"{result.detail}, {mib(free)} free")


def check_limits(_: WorkerConfig) -> CheckResult:
    """The process limits `cape-worker run` refuses to start under (its supervisord would not), and the memory
    limit: too small for a worker to run a job, or what size of jobs it leaves room for."""
    problem = open_files_problem()
    if problem:
        return CheckResult("limits", False, problem)
    enough, memory = memory_limit_said(memory_limit())
    if not enough:
        return CheckResult("limits", False, memory)
    return CheckResult("limits", True, f"open files: at least {MIN_OPEN_FILES}; {memory}")


def check_directory(name: str, path: Path, variable: str) -> CheckResult:
    """A directory writable by the worker (a probe written and removed), or a missing one it could create."""
    if not path.is_dir():
        return _missing_directory(name, path, variable)
    try:
        probe = path / f".cape-check-{secrets.token_hex(4)}.tmp"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        if exc.errno in FULL_ERRNOS:
            return CheckResult(name, False, f"{path} takes no new file ({exc.strerror}); {disk_advice(exc, variable)}")
        return CheckResult(name, False, f"{path} is not writable ({exc.strerror}); point {variable} at a "
                                        "writable directory (a volume)")
    return CheckResult(name, True, f"{path} writable")


def _missing_directory(name: str, path: Path, variable: str) -> CheckResult:
    """Whether the worker could create the missing `path`: its nearest existing parent must be a writable
    directory. Nothing is created: a mistyped path must not become real."""
    parent = path.parent
    while not os.path.exists(parent) and parent != parent.parent:
        parent = parent.parent
    if os.path.isdir(parent) and os.access(parent, os.W_OK | os.X_OK):
        return CheckResult(name, True, f"{path} does not exist yet; the worker will create it ({parent} is "
                                       "writable)")
    return CheckResult(name, False, f"{path} does not exist and the worker cannot create it ({parent} is not a "
                                    f"writable directory); create it, or fix {variable}")


def check_state(config: WorkerConfig) -> CheckResult:
    """The state directory, and room in it for supervisord's unix socket (which `run` needs)."""
    result = check_directory("state", config.state_dir, "CAPE_STATE_DIR")
    problem = health.socket_path_problem(config.run_dir)
    if result.ok and problem:
        return CheckResult("state", False, problem)
    return result


def check_keys(config: WorkerConfig) -> CheckResult:
    """The key files load as each program loads them at start (keys.py: mode 0600, a private key). Missing ones are
    made at the first start; this check makes none."""
    folder = config.state_dir
    try:
        missing = keys.check_key_files(folder)
    except KeyFileError as exc:
        return CheckResult("keys", False, str(exc))
    except OSError as exc:
        return CheckResult("keys", False, f"cannot read the key files in {folder} ({exc.strerror}); let this user "
                                          "read CAPE_STATE_DIR")
    if missing:
        return CheckResult("keys", True, f"{', '.join(missing)} not in {folder} yet; the worker makes "
                                         f"{'it' if len(missing) == 1 else 'them'} at its first start")
    return CheckResult("keys", True, f"{folder}: both key files load")


def check_coordinator(config: WorkerConfig) -> CheckResult:
    """Log in; then whether the coordinator would take this worker's keys (another worker of the organization, with
    other keys and heard from, holds its seat: `run` would be refused, and `health` fail)."""
    client = CoordinatorClient(config.coordinator, config.token, timeout=CHECK_TIMEOUT)
    try:
        identity = client.login()
        if identity.get("kind") != "organization":
            return CheckResult("coordinator", False, USER_TOKEN)
        registered = client.registered_keys()
    except CoordinatorError as exc:
        return CheckResult("coordinator", False, str(exc))
    finally:
        client.close()
    label = (identity.get("organization") or {}).get("label", "?")
    logged_in = f"{config.coordinator}: logged in as organization {label}"
    if not registered or not registered.get("registered") or _local_public_keys(config) == (
            registered.get("encryption_public_key"), registered.get("signing_public_key")):
        return CheckResult("coordinator", True, logged_in)
    if registered.get("online"):
        return CheckResult("coordinator", False, f"{logged_in}, but another worker of it, with other keys, was heard "
                                                 f"from {registered.get('seconds_since_seen') or 0:.0f} s ago: the "
                                                 "coordinator would refuse this one; an organization runs one worker "
                                                 "(stop the other, or give this one the other's CAPE_STATE_DIR)")
    return CheckResult("coordinator", True, f"{logged_in}; it holds the keys of another worker of {label}, last heard "
                                            f"from at {registered.get('last_seen') or 'no time'}: this one replaces "
                                            "them at its start")


def _local_public_keys(config: WorkerConfig) -> tuple[str, str] | None:
    """This worker's public keys, if both key files are there and load (the keys check says why not)."""
    try:
        private = [keys.load_key_file(config.state_dir / name) for name in (keys.ENCRYPTION_KEY_FILE,
                                                                            keys.SIGNING_KEY_FILE)]
    except (KeyFileError, OSError):
        return None
    return keys.b64_raw_public(private[0].public_key()), keys.b64_raw_public(private[1].public_key())


def check_broker(config: WorkerConfig) -> CheckResult:
    """List the mailbox of a job that cannot exist: a Cape broker answers 403/404 in its JSON error shape."""
    url = f"{config.broker}/v1/jobs/cape-worker-check/messages"
    try:
        response = requests.get(url, params={"wait": 0}, timeout=CHECK_TIMEOUT,
                                headers={"Authorization": f"Bearer {config.token}"})
    except (requests.RequestException, OSError) as exc:  # OSError: requests could not load REQUESTS_CA_BUNDLE
        return CheckResult("broker", False, f"cannot reach {config.broker} ({connection_problem(exc, url)}); "
                                            "check CAPE_BROKER (default: CAPE_COORDINATOR + /broker) and the network")
    code, message = error_of(response)
    # As the coordinator check: 401 is a token it does not accept (unknown, revoked), 403 wrong_token_kind a user
    # token, which the broker refuses before it looks for the job.
    if response.status_code == 401:
        return CheckResult("broker", False, f"{config.broker} refused CAPE_TOKEN: "
                                            f"{token_refusal(code, message, config.token)}")
    if code == "wrong_token_kind":
        return CheckResult("broker", False, USER_TOKEN)
    # A Cape broker knows the route and refuses the job (job_not_found / no_seat); a generic "not_found" means
    # no broker route lives at this URL.
    if response.status_code == 200 or (response.status_code in (403, 404) and code not in (None, "not_found")):
        return CheckResult("broker", True, f"{config.broker} answers and accepts the token")
    if response.status_code >= 500 and code is not None:  # a Cape broker that cannot serve (its coordinator...)
        return CheckResult("broker", False, f"{config.broker} answered {response.status_code}: {message}")
    return CheckResult("broker", False, f"{config.broker} answered {response.status_code} and does not look like a "
                                        "Cape broker; check CAPE_BROKER")


def check_bucket(config: WorkerConfig) -> CheckResult:
    bucket = config.bucket
    if bucket is None:
        return CheckResult("bucket", True, "CAPE_BUCKET not set: models go to each job's model_location (s3:// "
                                           "only); a job whose model this worker stores and that names none ends "
                                           "in Error before its data is loaded")
    if bucket.scheme == "file" and not Path(bucket.name).is_dir():
        return _missing_directory("bucket", Path(bucket.name), "CAPE_BUCKET")
    store = ModelStore(config, read_timeout=CHECK_TIMEOUT, attempts=1)  # an answer in seconds, not minutes
    key = "/".join(p for p in (bucket.prefix, f".cape-worker-check-{secrets.token_hex(6)}") if p)
    try:
        # The S3 upload's scratch file: not in the spool, which this check does not create.
        with tempfile.TemporaryDirectory(prefix="cape-worker-check-") as scratch:
            store.put_bytes(bucket, key, b"cape-worker check\n", Path(scratch))
    except UploadError as exc:
        return CheckResult("bucket", False, str(exc))
    where = "exists and is writable: " if bucket.scheme == "file" else ""
    try:
        store.delete(bucket, key)
    except Exception as exc:  # noqa: BLE001 -- s3:DeleteObject denied, say: the worker never deletes, so not a failure
        return CheckResult("bucket", True, f"{bucket.uri}: {where}wrote a test object, {key}, but could not delete "
                                           f"it ({type(exc).__name__}; the worker needs only s3:PutObject): remove "
                                           "it by hand")
    return CheckResult("bucket", True, f"{bucket.uri}: {where}wrote and deleted a test object")


def check_cloudwatch(config: WorkerConfig) -> CheckResult:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import (
        BotoCoreError, ClientError, ConnectTimeoutError, EndpointConnectionError, NoCredentialsError, ReadTimeoutError,
    )

    # What the programs do, and only that (their minimal policy has no read permission): make the group and a
    # stream if missing, and put one event, in stream <worker>/check.
    stream = f"{config.worker_name}/check"
    try:
        # total_max_attempts: botocore's max_attempts counts retries only (1 made two tries of 3 s each).
        client = boto3.client("logs", config=Config(connect_timeout=2, read_timeout=3,
                                                    retries={"total_max_attempts": 1}),
                              **config.boto3_kwargs("logs"))
        made = make_unless_there(client.create_log_group, logGroupName=config.log_group)
        make_unless_there(client.create_log_stream, logGroupName=config.log_group, logStreamName=stream)
        put = client.put_log_events(logGroupName=config.log_group, logStreamName=stream, logEvents=[
            {"timestamp": int(time.time() * 1000), "message": "cape-worker check: this worker can write here"}])
    except NoCredentialsError:
        return CheckResult("cloudwatch", False, "no AWS credentials: set AWS_ACCESS_KEY_ID and "
                                                "AWS_SECRET_ACCESS_KEY, or CAPE_CLOUDWATCH=off")
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = error.get("Code", "error")
        if code in _BAD_CREDENTIALS:
            return CheckResult("cloudwatch", False, f"AWS does not accept this worker's credentials ({code}): check "
                                                    "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN, "
                                                    "or set CAPE_CLOUDWATCH=off")
        if code in ("AccessDeniedException", "AccessDenied", "403"):  # a bare 403: the body was not AWS JSON
            return CheckResult("cloudwatch", False, f"CloudWatch Logs refused {exc.operation_name} ({code}); allow "
                                                    "logs:CreateLogGroup, logs:CreateLogStream, logs:PutLogEvents, "
                                                    "or set CAPE_CLOUDWATCH=off")
        return CheckResult("cloudwatch", False, f"CloudWatch Logs answered {exc.operation_name} with {code} "
                                                f"({error.get('Message') or 'no message'}); check AWS_REGION and "
                                                f"{config.endpoint_variable('logs')}, or set CAPE_CLOUDWATCH=off")
    except BotoCoreError as exc:
        verb = "reach" if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError)) else "use"
        return CheckResult("cloudwatch", False, f"cannot {verb} CloudWatch Logs ({type(exc).__name__}: {exc}); check "
                                                f"AWS_REGION / {config.endpoint_variable('logs')} / AWS_PROFILE, or "
                                                "set CAPE_CLOUDWATCH=off")
    if put.get("rejectedLogEventsInfo"):
        # Taken with a 200 and dropped: the programs' records would be too (they warn once, on stdout only).
        return CheckResult("cloudwatch", False, f"CloudWatch Logs dropped the test event, stamped {_utc_now()} by "
                                                f"this machine's clock, as {rejected_for(put['rejectedLogEventsInfo'])}"
                                                "; set the clock right (NTP), or set CAPE_CLOUDWATCH=off")
    return CheckResult("cloudwatch", True, f"log group {config.log_group}{' (made now)' if made else ''}: wrote a "
                                           f"test event to stream {stream}")


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time()))
