"""The README's SDK snippet, run as written against the real cape-server; reports over HTTP stand in for workers."""
from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from services.client import Cape
from tests.support.server import Api, CapeServer, worker_public_keys

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = np.array([0.5, -1.25, 3.0])
METRICS = {"mse_result": 0.25, "r_squared_result": 0.75}
DEADLINE_S = 60


def readme_snippet(section: str) -> str:
    """The first ```python block under the README heading `section`."""
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {section}\n")
    block = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert block, f"no python block under {section!r}"
    return block.group(1)


@pytest.mark.timeout(120)
def test_readme_sdk_snippet_gets_the_results(cape_server: CapeServer, cape_home: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    orgs = {label: cape_server.create_org(label) for label in ("bank", "shop", "neutral")}
    bank = Cape(endpoint=cape_server.url, token=orgs["bank"]["user_token"])
    project = bank.create_project("churn").add_org("shop").add_org("neutral").set_helper("neutral")
    Cape(endpoint=cape_server.url, token=orgs["neutral"]["user_token"]).get_project("churn").join("neutral")
    project.create_dataview("features", "s3://bank-data/x.csv", schema="age,income")
    shop = Cape(endpoint=cape_server.url, token=orgs["shop"]["user_token"])
    shop.get_project("churn").create_dataview("target", "s3://shop-data/y.csv", schema="spend")
    workers = {label: Api(cape_server, o["organization_token"]) for label, o in orgs.items()}
    for api in workers.values():
        assert api.put("/v1/worker/keys", json=worker_public_keys()).status_code == 204

    stand_in = threading.Thread(target=complete_when_approved, args=(workers, tmp_path / "bucket"), daemon=True)
    stand_in.start()
    monkeypatch.setenv("CAPE_COORDINATOR", cape_server.url)
    monkeypatch.setenv("CAPE_TOKEN", orgs["bank"]["user_token"])
    monkeypatch.setenv("SHOP_TOKEN", orgs["shop"]["user_token"])
    namespace: dict = {}
    exec(compile(readme_snippet("The `cape` CLI and SDK"), "README.md", "exec"), namespace)
    stand_in.join(timeout=DEADLINE_S)
    assert namespace["status"] == "Completed"
    np.testing.assert_array_equal(namespace["weights"], WEIGHTS)
    assert namespace["metrics"] == METRICS


def complete_when_approved(workers: dict[str, Api], bucket: Path) -> None:
    """Once the job is approved (the coordinator hands it to workers), every seat starts and the model owner
    (shop, the y-owner) writes the weights and completes it. Any failure stops the job, so the snippet's wait ends."""
    deadline = time.monotonic() + DEADLINE_S
    job: dict | None = None
    while job is None and time.monotonic() < deadline:
        listed = workers["shop"].get("/v1/worker/jobs").json()
        job = listed[0] if listed else None
        time.sleep(0.1)
    if job is None:
        return  # the snippet never got both approvals; it fails on its own
    job_id = job["id"]
    try:
        for api in workers.values():
            started = api.post(f"/v1/worker/jobs/{job_id}/report", json={"state": "started", "progress": 0})
            assert started.status_code == 204, started.text
        weights = bucket / job_id / "regression_weights.csv"
        weights.parent.mkdir(parents=True)
        weights.write_text("".join(f"{float(w)!r}\n" for w in WEIGHTS))
        done = workers["shop"].post(f"/v1/worker/jobs/{job_id}/report", json={
            "state": "completed", "progress": 1, "metrics": METRICS, "model_location": weights.as_uri()})
        assert done.status_code == 204, done.text
    except BaseException:
        workers["shop"].post(f"/v1/worker/jobs/{job_id}/report", json={"state": "error", "message": "stand-in failed"})
        raise
