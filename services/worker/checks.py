"""`cape-worker check`: validate the configuration, then reach every endpoint it names.

One `CheckResult` per check: the configuration, the spool and state directories, the coordinator (login with
CAPE_TOKEN), the broker, the bucket (write and delete a test object) and CloudWatch Logs when enabled. Each failure
says what is wrong and how to fix it; no secret appears.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Mapping

import requests

from services.worker.config import ConfigError, WorkerConfig
from services.worker.coordinator_client import CoordinatorClient, CoordinatorError
from services.worker.uploader import ModelStore, UploadError

CHECK_TIMEOUT = 5.0


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'} {self.name:<13} {self.detail}"


def run_checks(environ: Mapping[str, str]) -> list[CheckResult]:
    """All checks in order; stops after the configuration if it is invalid."""
    try:
        config = WorkerConfig.from_env(environ)
    except ConfigError as exc:
        return [CheckResult("configuration", False, str(exc))]
    results = [CheckResult("configuration", True, f"worker {config.worker_name}, token id {config.token_id}")]
    results += [check_directory("spool", config.spool_dir, "CAPE_SPOOL_DIR"),
                check_directory("state", config.state_dir, "CAPE_STATE_DIR"),
                check_coordinator(config), check_broker(config), check_bucket(config)]
    if config.cloudwatch:
        results.append(check_cloudwatch(config))
    return results


def check_directory(name: str, path, variable: str) -> CheckResult:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".cape-check-{secrets.token_hex(4)}.tmp"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        return CheckResult(name, False, f"{path} is not writable ({exc.strerror}); point {variable} at a "
                                        "writable directory (a volume)")
    return CheckResult(name, True, f"{path} writable")


def check_coordinator(config: WorkerConfig) -> CheckResult:
    client = CoordinatorClient(config.coordinator, config.token, timeout=CHECK_TIMEOUT)
    try:
        identity = client.login()
    except CoordinatorError as exc:
        return CheckResult("coordinator", False, str(exc))
    finally:
        client.close()
    if identity.get("kind") != "organization":
        return CheckResult("coordinator", False, "CAPE_TOKEN is a user token; a worker needs an organization token "
                                                 "(`cape orgs create-token ORG`, as an admin of ORG)")
    label = (identity.get("organization") or {}).get("label", "?")
    return CheckResult("coordinator", True, f"{config.coordinator}: logged in as organization {label}")


def check_broker(config: WorkerConfig) -> CheckResult:
    """List the mailbox of a job that cannot exist: a Cape broker answers 403/404 in its JSON error shape."""
    url = f"{config.broker}/v1/jobs/cape-worker-check/messages"
    try:
        response = requests.get(url, params={"wait": 0}, timeout=CHECK_TIMEOUT,
                                headers={"Authorization": f"Bearer {config.token}"})
    except requests.RequestException as exc:
        return CheckResult("broker", False, f"cannot reach {config.broker} ({type(exc).__name__}); check "
                                            "CAPE_BROKER (default: CAPE_COORDINATOR + /broker) and the network")
    try:
        code = response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = None
    # 403 wrong_token_kind: a user token, which the broker refuses before it looks for the job.
    if response.status_code == 401 or code == "wrong_token_kind":
        return CheckResult("broker", False, f"{config.broker} refused CAPE_TOKEN; use an organization token")
    # A Cape broker knows the route and refuses the job (job_not_found / no_seat); a generic "not_found" means
    # no broker route lives at this URL.
    if response.status_code == 200 or (response.status_code in (403, 404) and code not in (None, "not_found")):
        return CheckResult("broker", True, f"{config.broker} answers and accepts the token")
    return CheckResult("broker", False, f"{config.broker} answered {response.status_code} and does not look like a "
                                        "Cape broker; check CAPE_BROKER")


def check_bucket(config: WorkerConfig) -> CheckResult:
    if config.bucket is None:
        return CheckResult("bucket", True, "CAPE_BUCKET not set: results go to each job's model_location")
    store = ModelStore(config)
    key = "/".join(p for p in (config.bucket.prefix, f".cape-worker-check-{secrets.token_hex(6)}") if p)
    scratch = config.spool_dir / "tmp"
    try:
        store.put_bytes(config.bucket, key, b"cape-worker check\n", scratch)
        store.delete(config.bucket, key)
    except UploadError as exc:
        return CheckResult("bucket", False, str(exc))
    except Exception as exc:  # noqa: BLE001 -- e.g. s3:DeleteObject denied: report it, never a traceback
        return CheckResult("bucket", False, f"cannot delete the test object in {config.bucket.uri} "
                                            f"({type(exc).__name__}); allow s3:DeleteObject or remove it by hand")
    return CheckResult("bucket", True, f"{config.bucket.uri}: wrote and deleted a test object")


def check_cloudwatch(config: WorkerConfig) -> CheckResult:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    client = boto3.client("logs", config=Config(connect_timeout=2, read_timeout=3, retries={"max_attempts": 1}),
                          **config.boto3_kwargs())
    try:
        groups = client.describe_log_groups(logGroupNamePrefix=config.log_group, limit=5)["logGroups"]
    except NoCredentialsError:
        return CheckResult("cloudwatch", False, "no AWS credentials: set AWS_ACCESS_KEY_ID and "
                                                "AWS_SECRET_ACCESS_KEY, or CAPE_CLOUDWATCH=off")
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "error")
        return CheckResult("cloudwatch", False, f"CloudWatch Logs refused the request ({code}); allow "
                                                "logs:CreateLogGroup, logs:CreateLogStream, logs:PutLogEvents, or "
                                                "set CAPE_CLOUDWATCH=off")
    except BotoCoreError as exc:
        return CheckResult("cloudwatch", False, f"cannot reach CloudWatch Logs ({type(exc).__name__}); check "
                                                "AWS_REGION / AWS_ENDPOINT_URL, or set CAPE_CLOUDWATCH=off")
    exists = any(g["logGroupName"] == config.log_group for g in groups)
    return CheckResult("cloudwatch", True, f"log group {config.log_group} "
                                           f"{'exists' if exists else 'will be created at start'}")
