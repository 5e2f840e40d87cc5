"""Issue 2, "done when" point 2: a whole job through the real cape-server, driven by the CLI and scripted workers.

Three organizations (x-owner, y-owner who is also the model owner, and a helper), a project with a helper,
dataviews, a job approved by both data owners through the CLI, one scripted worker per seat that uses the worker
endpoints and the broker over HTTP (keys, job fetch, reports, messages), the output seat writing the weights CSV
to a file:// model location, and the results read by the model owner and refused to another organization.
"""
from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from services.client import Cape
from services.client.errors import ApiError

STEP_TIMEOUT_S = 30  # bound for every wait on the server in this test
SEATS = ("x_owner", "y_owner", "helper")


def _b64_public(key: Any) -> str:
    return base64.b64encode(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()


class ScriptedWorker:
    """A worker reduced to its HTTP conversation: keys, job fetch, reports, broker messages."""

    def __init__(self, url: str, org_token: str) -> None:
        self.url = url
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {org_token}"

    def call(self, method: str, path: str, expect: tuple[int, ...] = (200,), **kwargs: Any) -> requests.Response:
        response = self.http.request(method, f"{self.url}{path}", timeout=STEP_TIMEOUT_S + 30, **kwargs)
        assert response.status_code in expect, f"{method} {path}: {response.status_code} {response.text}"
        return response

    def register_keys(self) -> None:
        self.call("PUT", "/v1/worker/keys", expect=(204,), json={
            "encryption_public_key": _b64_public(X25519PrivateKey.generate()),
            "signing_public_key": _b64_public(Ed25519PrivateKey.generate()),
        })
        self.call("POST", "/v1/worker/heartbeat", expect=(204,), json={"version": "scripted"})

    def fetch_job(self, job_id: str) -> dict[str, Any]:
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while time.monotonic() < deadline:
            for job in self.call("GET", "/v1/worker/jobs").json():
                if job["id"] == job_id:
                    return job
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} was never served to this worker")

    def report(self, job_id: str, state: str, progress: float, expect: tuple[int, ...] = (204,),
               **extra: Any) -> None:
        self.call("POST", f"/v1/worker/jobs/{job_id}/report", expect=expect,
                  json={"state": state, "progress": progress, **extra})

    def send(self, job_id: str, to_seat: str, name: str, body: bytes) -> None:
        self.call("PUT", f"/broker/v1/jobs/{job_id}/messages/{to_seat}/{name}", expect=(201,), data=body)
        # A repeated put of the same bytes is idempotent (a restarted sender does this).
        self.call("PUT", f"/broker/v1/jobs/{job_id}/messages/{to_seat}/{name}", expect=(200,), data=body)

    def receive(self, job_id: str, names: set[str]) -> dict[str, tuple[str, bytes]]:
        """Long-poll until every name arrived; download, check, acknowledge; returns name -> (from_seat, body)."""
        got: dict[str, tuple[str, bytes]] = {}
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while set(got) != names:
            assert time.monotonic() < deadline, f"messages {sorted(names - set(got))} never arrived"
            listing = self.call("GET", f"/broker/v1/jobs/{job_id}/messages", params={"wait": 5}).json()
            for item in listing:
                if item["name"] in names and item["name"] not in got:
                    body = self.call("GET", f"/broker/v1/jobs/{job_id}/messages/{item['name']}").content
                    assert len(body) == item["size"]
                    got[item["name"]] = (item["from_seat"], body)
                    self.call("DELETE", f"/broker/v1/jobs/{job_id}/messages/{item['name']}", expect=(204,))
        return got


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _run_seat(worker: ScriptedWorker, job_id: str, data: dict[str, np.ndarray], model_dir: Path,
              all_sent: threading.Barrier) -> str:
    """One seat's scripted run: every seat sends one message to each other seat; the output seat fits the model.
    No seat receives before all have sent: an acknowledged name is free again at the broker, so a repeated put
    after the recipient's acknowledgment would be stored anew (201), not answered as a duplicate (200)."""
    job = worker.fetch_job(job_id)
    seat, outputs_to = job["seat"], job["outputs_to"]
    assert set(job["parties"]) == set(SEATS)
    assert all(p["encryption_public_key"] and p["signing_public_key"] for p in job["parties"].values())
    worker.report(job_id, "started", 0.0)
    for other in SEATS:
        if other == seat:
            continue
        # The data owners send their columns to the output seat; the rest is filler, as a helper's shares would be.
        payload = data[seat] if other == outputs_to and seat in data else np.arange(4, dtype=np.float64)
        worker.send(job_id, other, f"{seat}.r0.{other}", _npy(payload))
    all_sent.wait()
    received = worker.receive(job_id, {f"{other}.r0.{seat}" for other in SEATS if other != seat})
    assert {frm for frm, _ in received.values()} == set(SEATS) - {seat}
    if seat != outputs_to:
        # The output seat may have completed the job already: a 409 tells a worker to stop.
        worker.report(job_id, "running", 0.5, expect=(204, 409), message="messages exchanged")
        worker.report(job_id, "completed", 1.0, expect=(204, 409))
        return seat
    worker.report(job_id, "running", 0.5, message="messages exchanged")
    arrays = {frm: np.load(io.BytesIO(body)) for frm, body in received.values()}
    arrays[seat] = data[seat]
    x, y = arrays["x_owner"], arrays["y_owner"]
    x_b = np.column_stack([np.ones(len(x)), x])
    weights = np.linalg.lstsq(x_b, y, rcond=None)[0]
    residual = y - x_b @ weights
    metrics = {"mse_result": float(residual @ residual / len(y)),
               "r_squared_result": float(1 - residual @ residual / ((y - y.mean()) @ (y - y.mean())))}
    path = model_dir / job_id / "regression_weights.csv"
    path.parent.mkdir(parents=True)
    path.write_text("".join(f"{float(w)!r}\n" for w in weights))
    worker.report(job_id, "completed", 1.0, metrics=metrics, model_location=path.as_uri())
    return seat


@pytest.fixture
def flow_data(tmp_path: Path) -> dict[str, Any]:
    rng = np.random.default_rng(7)
    x = rng.normal(size=(60, 3)) * [1.0, 10.0, 0.1]
    y = 2.0 + x @ np.array([0.5, -0.25, 4.0]) + rng.normal(scale=0.01, size=60)
    x_csv, y_csv = tmp_path / "features.csv", tmp_path / "target.csv"
    np.savetxt(x_csv, x, delimiter=",", header="age,income,score", comments="")
    np.savetxt(y_csv, y, delimiter=",", header="spend", comments="")
    return {"x": x, "y": y, "x_csv": x_csv, "y_csv": y_csv}


def test_job_flow_end_to_end(cape_server, cape_cli, cape_script, flow_data, tmp_path: Path) -> None:
    url = cape_server.url
    orgs = {label: cape_server.create_org(label) for label in ("bank", "shop", "neutral")}

    def as_(label: str) -> dict[str, str]:
        return {"CAPE_COORDINATOR": url, "CAPE_TOKEN": orgs[label]["user_token"]}

    def ok(label: str, *args: str) -> str:
        result = cape_cli(*args, env=as_(label))
        assert result.exit_code == 0, f"cape {' '.join(args)}: {result.stderr}"
        return result.stdout

    # Project with three organizations and a helper (the model owner is the y-owner, so a helper takes seat 3).
    ok("bank", "projects", "create", "churn", "--name", "Churn study")
    ok("bank", "projects", "add-org", "churn", "shop")
    added = cape_cli("projects", "add-org", "churn", "neutral", env=as_("bank"))
    assert "organizations: bank, shop (not joined), neutral (not joined)" in added.stdout.splitlines()
    assert added.stderr == ("neutral has not joined churn: its worker takes no third seat in its jobs (the helper's, or a "
                            "model owner's that owns none of the job's data) until one of its admins or operators runs "
                            "`cape projects join churn neutral` (a data owner need not join).\n")
    project = json.loads(ok("bank", "projects", "set-helper", "churn", "neutral", "--json"))
    assert project["helper"]["label"] == "neutral"
    assert {o["label"]: o["joined"] for o in project["organizations"]} == {"bank": True, "shop": False,
                                                                           "neutral": False}

    # Dataviews: schema from the CSV header (x) and given on the command line (y).
    ok("bank", "dataviews", "add", "churn", "features", flow_data["x_csv"].as_uri(),
       "--schema-from-file", str(flow_data["x_csv"]))
    ok("shop", "dataviews", "add", "churn", "target", flow_data["y_csv"].as_uri(), "--schema", "spend:number")
    views = {v["name"]: v for v in json.loads(ok("shop", "dataviews", "list", "churn", "--json"))}
    assert [c["name"] for c in views["features"]["schema"]] == ["age", "income", "score"]
    assert views["features"]["uri"] is None  # the bank's uri is not shown to the shop
    assert views["target"]["uri"] == flow_data["y_csv"].as_uri()

    # The helper's worker would take the third seat of the project's jobs: its organization agrees first.
    refused = cape_cli("jobs", "submit", "churn", "linear-regression", "--x", "features:age", "--y", "target:spend",
                       "--model-owner", "shop", env=as_("shop"))
    assert refused.exit_code != 0
    assert refused.stderr.startswith("error: organization 'neutral', the project's helper, has not joined project "
                                     "'churn', so its worker takes no seat in its jobs: one of its admins or operators "
                                     "runs `cape projects join churn neutral`")
    assert "Joined project churn." in ok("neutral", "projects", "join", "churn", "neutral")

    # Workers register their keys with their organization tokens.
    workers = {label: ScriptedWorker(url, orgs[label]["organization_token"]) for label in orgs}
    for worker in workers.values():
        worker.register_keys()

    model_dir = tmp_path / "models"
    job = json.loads(ok("shop", "jobs", "submit", "churn", "linear-regression",
                        "--x", "features:age,income,score", "--y", "target:spend",
                        "--model-owner", "shop", "--model-location", model_dir.as_uri(),
                        "--timeout", "60", "--json"))
    job_id = job["id"]
    assert job["status"] == "NeedsApproval"
    assert job["outputs_to"] == "y_owner"
    assert {s: p["organization"]["label"] for s, p in job["parties"].items()} == \
        {"x_owner": "bank", "y_owner": "shop", "helper": "neutral"}

    # The helper's data is not used: it cannot approve. Both data owners approve through the CLI.
    refused = cape_cli("jobs", "approve", job_id, env=as_("neutral"))
    assert refused.exit_code == 1 and refused.stderr.startswith("error: ") and "(HTTP 403)" in refused.stderr
    assert "Approved job" in ok("bank", "jobs", "approve", job_id)
    assert json.loads(ok("shop", "jobs", "status", job_id, "--json"))["status"] == "NeedsApproval"
    ok("shop", "jobs", "approve", job_id)
    status = json.loads(ok("neutral", "jobs", "status", job_id, "--json"))
    assert status["status"] == "Approved"
    assert status["approvals"] == {"bank": "approved", "shop": "approved"}

    # `cape jobs watch` (the real console script) follows the job while the three workers run it.
    watch = subprocess.Popen(
        [str(Path(sys.executable).with_name("cape")), "jobs", "watch", job_id, "--interval", "0.2", "--timeout", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **as_("neutral")},
    )
    try:
        data = {"x_owner": flow_data["x"], "y_owner": flow_data["y"]}
        all_sent = threading.Barrier(len(SEATS), timeout=STEP_TIMEOUT_S)
        with ThreadPoolExecutor(max_workers=3) as pool:
            runs = [pool.submit(_run_seat, w, job_id, data, model_dir, all_sent) for w in workers.values()]
            assert sorted(r.result(timeout=STEP_TIMEOUT_S * 2) for r in runs) == sorted(SEATS)
        out, err = watch.communicate(timeout=STEP_TIMEOUT_S)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.communicate(timeout=5)
    assert watch.returncode == 0, err
    assert f"Job {job_id} completed" in out
    assert "x_owner=bank:" in out and "helper=neutral:" in out

    final = json.loads(ok("shop", "jobs", "status", job_id, "--json"))
    assert final["status"] == "Completed"
    assert final["parties"]["y_owner"]["state"] == "completed"

    # The model owner reads the results: CLI (real script) and SDK agree with the plaintext fit.
    expected = np.linalg.lstsq(np.column_stack([np.ones(60), flow_data["x"]]), flow_data["y"], rcond=None)[0]
    result = cape_script("jobs", "results", job_id, "--json", env=as_("shop"))
    assert result.exit_code == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["names"] == ["intercept", "age", "income", "score"]
    np.testing.assert_array_equal(printed["weights"], expected)
    assert printed["metrics"]["r_squared_result"] > 0.99
    np.testing.assert_allclose(expected, [2.0, 0.5, -0.25, 4.0], atol=0.01)

    table = ok("shop", "jobs", "results", job_id)
    assert table.splitlines()[0].split() == ["TERM", "WEIGHT"]
    assert table.splitlines()[1].split() == ["intercept", repr(float(expected[0]))]
    assert f"r_squared_result: {printed['metrics']['r_squared_result']!r}" in table  # in full, as the weights

    weights, metrics = Cape(endpoint=url, token=orgs["shop"]["user_token"]).get_job(job_id).get_results()
    np.testing.assert_array_equal(weights, expected)
    assert metrics == printed["metrics"] and set(metrics) == {"mse_result", "r_squared_result"}

    # Another organization (a member, but not the model owner) is refused, with one readable line.
    for label in ("bank", "neutral"):
        denied = cape_script("jobs", "results", job_id, "--json", env=as_(label))
        assert denied.exit_code == 1
        assert denied.stdout == ""
        lines = denied.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0].endswith("(HTTP 403)"), lines
    with pytest.raises(ApiError) as info:
        Cape(endpoint=url, token=orgs["bank"]["user_token"]).get_job(job_id).get_results()
    assert info.value.status == 403

    # The job ended: the helper's organization may leave the project, and then sees it no more.
    assert ok("neutral", "projects", "remove-org", "churn", "neutral") == \
        "Organization neutral is no longer in project churn.\n"
    shown = json.loads(ok("bank", "projects", "show", "churn", "--json"))
    assert shown["helper"] is None and [o["label"] for o in shown["organizations"]] == ["bank", "shop"]
    assert cape_cli("projects", "show", "churn", env=as_("neutral")).exit_code == 1
    # The owner takes a data owner out: what went with it is said.
    assert ok("bank", "projects", "remove-org", "churn", "shop") == \
        "Organization shop is no longer in project churn; its dataviews there went with it: target.\n"
    assert [v["name"] for v in json.loads(ok("bank", "dataviews", "list", "churn", "--json"))] == ["features"]
