"""A real `moto_server` process on 127.0.0.1 serving S3 and CloudWatch Logs, for tests that talk to AWS over HTTP.

Fixtures:
- `moto_server_url` (session): starts one moto_server process, returns its base URL.
- `moto` (function): resets moto's state and returns a `MotoAWS` with the env a worker needs and boto3 clients.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
import requests

MOTO_REGION = "us-east-1"
MOTO_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret-key"}


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class MotoAWS:
    """A reset moto server: `env` for workers, boto3 clients for assertions."""

    url: str

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.url, "AWS_REGION": MOTO_REGION, **MOTO_KEYS}

    def client(self, service: str):
        return boto3.client(service, endpoint_url=self.url, region_name=MOTO_REGION,
                            aws_access_key_id=MOTO_KEYS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=MOTO_KEYS["AWS_SECRET_ACCESS_KEY"])

    def enforce_iam(self, on: bool) -> None:
        """Make moto check IAM permissions of every request (off by default: any key may do anything)."""
        body = "0" if on else "inf"
        requests.post(f"{self.url}/moto-api/reset-auth", data=body, timeout=10).raise_for_status()

    def read_only_keys(self, bucket: str) -> dict[str, str]:
        """Access keys of a new IAM user that may read but not write `bucket` (use with `enforce_iam(True)`)."""
        iam = self.client("iam")
        iam.create_user(UserName="reader")
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject",
                  "s3:ListBucket"], "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]}]}
        iam.put_user_policy(UserName="reader", PolicyName="read", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}

    def make_bucket(self, name: str) -> str:
        self.client("s3").create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str) -> list[str]:
        """Every object key in `bucket`."""
        pages = self.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))

    def log_events(self, group: str, stream: str) -> list[str]:
        """Every message in one CloudWatch Logs stream (empty if the group or stream does not exist)."""
        logs = self.client("logs")
        try:
            events = logs.get_log_events(logGroupName=group, logStreamName=stream, startFromHead=True)["events"]
        except logs.exceptions.ResourceNotFoundException:
            return []
        return [e["message"] for e in events]

    def log_streams(self, group: str) -> list[str]:
        logs = self.client("logs")
        try:
            return sorted(s["logStreamName"] for s in logs.describe_log_streams(logGroupName=group)["logStreams"])
        except logs.exceptions.ResourceNotFoundException:
            return []


def start_moto_server(port: int, log) -> subprocess.Popen:
    """A `moto_server` process on 127.0.0.1:`port`, writing to the open file `log`, once it answers (30 s at most)."""
    exe = Path(sys.executable).with_name("moto_server")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]
    proc = subprocess.Popen([*cmd, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, **MOTO_KEYS})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if requests.get(f"{url}/moto-api/", timeout=1).status_code == 200:
                return proc
        except requests.ConnectionError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait(timeout=10)
            pytest.fail(f"moto_server did not start on {url} (see {log.name})")
        time.sleep(0.1)


@pytest.fixture(scope="session")
def moto_server_url(tmp_path_factory) -> str:
    """Start `moto_server` on a free loopback port for the session; stop it at the end."""
    port = free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("wb")
    proc = start_moto_server(port, log)
    url = f"http://127.0.0.1:{port}"
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
    log.close()


@pytest.fixture
def moto(moto_server_url) -> MotoAWS:
    """The session's moto server with all state cleared."""
    requests.post(f"{moto_server_url}/moto-api/reset", timeout=10).raise_for_status()
    aws = MotoAWS(moto_server_url)
    yield aws
    aws.enforce_iam(False)
