"""An approved three-party job on a real `cape-server`, with real worker keys: the setting of messenger/runner tests.

`approved_job(cape_server, tmp_path, x_csv=..., y_csv=...)` creates three organizations (bank = x-owner,
shop = y-owner and model owner, neutral = helper), a project, the two dataviews, registers each worker's keys
(made by `WorkerKeys` under `tmp_path/<seat>/state`), submits and approves a linear regression, and returns an
`ApprovedJob` whose `seats[seat]` holds that worker's org token, keys, spool and the `WorkerJob` it is served.
`program_env(job, seat, base)` is the environment a worker program of that seat runs with; `wait_for` polls with
a bound.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from services.worker.keys import WorkerKeys
from services.worker.spool import Spool

SEAT_ORGS = {"x_owner": "bank", "y_owner": "shop", "helper": "neutral"}
HTTP_TIMEOUT = 30


@dataclass
class Seat:
    """One worker of the job."""

    seat: str
    org: str
    token: str
    keys: WorkerKeys
    spool: Spool
    spec: dict[str, Any]


@dataclass
class ApprovedJob:
    """The job id and the three workers."""

    id: str
    url: str
    broker_url: str
    seats: dict[str, Seat]


def worker_job(keys: dict[str, WorkerKeys], seat: str, job_id: str, approved_at: str = "2026-01-01T00:00:00Z"
               ) -> dict[str, Any]:
    """A WorkerJob as the coordinator serves it to `seat`, for three workers with `keys` by seat (x_owner, y_owner,
    helper), without a coordinator."""
    return {
        "id": job_id, "type": "linear_regression", "status": "Approved", "seat": seat, "outputs_to": "y_owner",
        "timeout": 5, "approved_at": approved_at,
        "task": {"x": {"columns": ["a"], "dataview": {"id": "d1", "name": "x", "uri": None}},
                 "y": {"column": "t", "dataview": {"id": "d2", "name": "y", "uri": None}}, "model_location": None},
        "parties": {s: {"organization": {"id": s, "label": f"org-{s}"}, **k.public_keys()} for s, k in keys.items()},
    }


def _call(method: str, url: str, token: str, expect: tuple[int, ...] = (200, 201), **kwargs: Any) -> Any:
    response = requests.request(method, url, headers={"Authorization": f"Bearer {token}"}, timeout=HTTP_TIMEOUT,
                                **kwargs)
    assert response.status_code in expect, f"{method} {url}: {response.status_code} {response.text}"
    return response.json() if response.content else None


def approved_job(cape_server: Any, base: Path, *, x_uri: str = "file:///nonexistent/x.csv",
                 y_uri: str = "file:///nonexistent/y.csv", x_columns: tuple[str, ...] = ("a", "b"),
                 y_column: str = "t", timeout: int = 60, model_location: str | None = None) -> ApprovedJob:
    """Set up an approved job on `cape_server` (see the module docstring)."""
    url = cape_server.url
    orgs = {seat: cape_server.create_org(label) for seat, label in SEAT_ORGS.items()}
    bank = orgs["x_owner"]["user_token"]
    project = _call("POST", f"{url}/v1/projects", bank, json={"label": f"p{time.time_ns()}"})
    for other in ("shop", "neutral"):
        _call("POST", f"{url}/v1/projects/{project['id']}/organizations", bank, json={"organization": other})
    _call("PUT", f"{url}/v1/projects/{project['id']}/helper", bank, json={"organization": "neutral"})
    _call("POST", f"{url}/v1/projects/{project['id']}/organizations/neutral/join", orgs["helper"]["user_token"])
    _call("POST", f"{url}/v1/projects/{project['id']}/dataviews", bank, json={
        "name": "features", "uri": x_uri, "schema": [{"name": c, "type": "number"} for c in x_columns]})
    _call("POST", f"{url}/v1/projects/{project['id']}/dataviews", orgs["y_owner"]["user_token"], json={
        "name": "target", "uri": y_uri, "schema": [{"name": y_column, "type": "number"}]})

    keys = {seat: WorkerKeys.load_or_create(base / seat / "state") for seat in SEAT_ORGS}
    for seat, org in orgs.items():
        _call("PUT", f"{url}/v1/worker/keys", org["organization_token"], expect=(204,), json=keys[seat].public_keys())

    job = _call("POST", f"{url}/v1/projects/{project['id']}/jobs", orgs["y_owner"]["user_token"], json={
        "type": "linear_regression", "x": {"dataview": "features", "columns": list(x_columns)},
        "y": {"dataview": "target", "column": y_column}, "model_owner": "shop",
        "model_location": model_location, "timeout": timeout})
    for seat in ("x_owner", "y_owner"):
        _call("POST", f"{url}/v1/jobs/{job['id']}/approve", orgs[seat]["user_token"])

    seats = {}
    for seat, org in orgs.items():
        spec = _call("GET", f"{url}/v1/worker/jobs/{job['id']}", org["organization_token"])
        assert spec["seat"] == seat, spec
        seats[seat] = Seat(seat, SEAT_ORGS[seat], org["organization_token"], keys[seat],
                           Spool(base / seat / "spool"), spec)
    return ApprovedJob(job["id"], url, cape_server.broker_url, seats)


def program_env(job: ApprovedJob, seat: str, base: Path) -> dict[str, str]:
    """Environment for `python -m services.worker.<program>` of `seat` (its token, spool and state)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CAPE_", "AWS_"))}
    env.update({
        "CAPE_TOKEN": job.seats[seat].token,
        "CAPE_COORDINATOR": job.url,
        "CAPE_BROKER": job.broker_url,
        "CAPE_SPOOL_DIR": str(job.seats[seat].spool.root),
        "CAPE_STATE_DIR": str(base / seat / "state"),
        "CAPE_WORKER_NAME": seat.replace("_", "-"),
        "CAPE_BUCKET": (base / seat / "models").as_uri(),  # where its models go, as an operator sets it
        "PYTHONUNBUFFERED": "1",
    })
    return env


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    """Poll `predicate` every 50 ms until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
