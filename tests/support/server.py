"""The `cape_server` fixture: a real `cape-server` subprocess on 127.0.0.1 with a fresh data directory.

Usage::

    def test_something(cape_server):
        org = cape_server.create_org("acme")      # {"organization": {...}, "organization_token", "user_token", ...}
        r = requests.get(f"{cape_server.url}/v1/projects",
                         headers={"Authorization": f"Bearer {org['user_token']}"})
        cape_server.broker_url                     # f"{url}/broker"  (what CAPE_BROKER is set to)
        cape_server.restart()                      # same data dir, new port: read `url` again afterwards
        cape_server.restart(crash=True)            # the same after SIGKILL
        cape_server.stop()                         # also done at teardown

`CapeServer(data_dir, extra_args=[...])` starts one by hand (e.g. `["--message-ttl", "2"]`), as does the
`start_cape_server` factory fixture (`start_cape_server(extra_args=[...])`, stopped at teardown).
"""
from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

START_TIMEOUT = 30.0
LISTENING = "cape-server listening on "


def cape_server_command() -> list[str]:
    """How to run `cape-server` from this venv (the console script beside the interpreter, else `-m`)."""
    script = Path(sys.executable).with_name("cape-server")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from services.server.cli import main; main()"]


class CapeServer:
    """A `cape-server serve` subprocess; `url` is its base URL (coordinator at `/v1`, broker at `/broker/v1`)."""

    def __init__(self, data_dir: Path, extra_args: list[str] | None = None):
        self.data_dir = Path(data_dir)
        self.extra_args = list(extra_args or [])
        self.process: subprocess.Popen[str] | None = None
        self.url = ""
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.server.log"
        self.start()

    @property
    def broker_url(self) -> str:
        return f"{self.url}/broker"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        """Start the server and wait (bounded) until it answers `/healthz`."""
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # private, as the server wants it
        log = open(self.log_path, "a")
        self.process = subprocess.Popen(
            [*cape_server_command(), "serve", "--host", "127.0.0.1", "--port", "0", "--data-dir", str(self.data_dir),
             *self.extra_args], stdout=subprocess.PIPE, stderr=log, text=True, env={**os.environ,
                                                                                    "PYTHONUNBUFFERED": "1"})
        log.close()
        lines: queue.Queue[str] = queue.Queue()
        stdout = self.process.stdout
        assert stdout is not None
        threading.Thread(target=lambda: [lines.put(line) for line in stdout], daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self.url:
            try:
                line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line.startswith(LISTENING):
                self.url = line[len(LISTENING):].strip()
        if not self.url:
            self.stop()
            raise RuntimeError(f"cape-server did not start within {START_TIMEOUT} s; see {self.log_path}")
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.url}/healthz", timeout=2).status_code in (200, 503):  # up (503: degraded)
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"cape-server at {self.url} did not answer within {START_TIMEOUT} s; see {self.log_path}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None
        self.url = ""

    def kill(self) -> None:
        """SIGKILL (a crash): nothing gets to shut down cleanly."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None
        self.url = ""

    def restart(self, crash: bool = False) -> None:
        """Stop (SIGTERM, or SIGKILL with `crash=True`) and start again on the same data directory.
        The port changes: read `url` again afterwards."""
        self.kill() if crash else self.stop()
        self.start()

    def admin(self, *args: str) -> str:
        """Run `cape-server admin ARGS --data-dir DATA_DIR`; returns stdout (raises on a non-zero exit)."""
        result = subprocess.run([*cape_server_command(), "admin", *args, "--data-dir", str(self.data_dir)],
                                capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"cape-server admin {args[0]} failed: {result.stderr.strip()}")
        return result.stdout

    def create_org(self, label: str, admin_email: str | None = None, name: str | None = None) -> dict[str, Any]:
        """`admin create-org LABEL --json`: {"organization", "user", "organization_token", "user_token"}."""
        args = ["create-org", label, "--admin-email", admin_email or f"admin@{label}.example", "--json"]
        if name:
            args += ["--name", name]
        return json.loads(self.admin(*args))

    def create_user(self, org: str, email: str, role: str) -> dict[str, Any]:
        """`admin create-user ORG --email E --role R --json`: {"user", "organization", "token"}."""
        return json.loads(self.admin("create-user", org, "--email", email, "--role", role, "--json"))


@pytest.fixture
def start_cape_server(tmp_path: Path) -> Iterator[Callable[..., CapeServer]]:
    """Factory: `start_cape_server(extra_args=[...], name="server")` -> a running CapeServer, stopped at teardown."""
    started: list[CapeServer] = []

    def start(extra_args: list[str] | None = None, name: str = "server") -> CapeServer:
        server = CapeServer(tmp_path / name, extra_args)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def cape_server(start_cape_server: Callable[..., CapeServer]) -> CapeServer:
    """A running `cape-server` (coordinator + broker) on 127.0.0.1 with a fresh data directory."""
    return start_cape_server()




class Api:
    """A tiny HTTP helper bound to one token: `api.get("/v1/projects")` -> requests.Response (no raising)."""

    def __init__(self, server: CapeServer, token: str | None):
        self.server = server
        self.token = token

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        headers = dict(kwargs.pop("headers", {}) or {})
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        kwargs.setdefault("timeout", 30)
        return requests.request(method, f"{self.server.url}{path}", headers=headers, **kwargs)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("POST", path, **kwargs)

    def put(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("PUT", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("DELETE", path, **kwargs)


def worker_public_keys() -> dict[str, str]:
    """A fresh, valid `PUT /v1/worker/keys` body (base64 raw X25519 and Ed25519 public keys)."""
    import base64

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    def raw(key: Any) -> str:
        return base64.b64encode(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()

    return {"encryption_public_key": raw(X25519PrivateKey.generate()),
            "signing_public_key": raw(Ed25519PrivateKey.generate())}


def ok(response: requests.Response) -> Any:
    """The JSON of a successful answer (None when it has no body); fails the test with the body otherwise."""
    assert response.status_code < 300, response.text
    return response.json() if response.content else None


def newest_first(views: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Views in the listings' order: newest first by (created_at, id); the id orders those of one millisecond."""
    return sorted(views, key=lambda view: (view["created_at"], view["id"]), reverse=True)


def api_error(response: requests.Response, status: int) -> dict[str, Any]:
    """The `error` object ({"code", "message", ...}) of an answer that must have `status`."""
    assert response.status_code == status, response.text
    return response.json()["error"]


def add_dataviews(user: dict[str, Api], project: str) -> None:
    """xorg's dataview `xs` (a, b) and yorg's `ys` (t) in `project`."""
    ok(user["xorg"].post(f"/v1/projects/{project}/dataviews", json={
        "name": "xs", "uri": "file:///data/x.csv", "schema": [{"name": "a", "type": "number"},
                                                             {"name": "b", "type": "number"}]}))
    ok(user["yorg"].post(f"/v1/projects/{project}/dataviews", json={
        "name": "ys", "uri": "file:///data/y.csv", "schema": [{"name": "t", "type": "number"}]}))


def build_job_world(server: CapeServer, approve: bool = True, register_keys: bool = True,
                    timeout: int = 600) -> dict[str, Any]:
    """Three organizations `xorg` (x data), `yorg` (y data, model owner) and `helper`; project `demo` with helper;
    dataviews `xs` (a, b) and `ys` (t); one linear-regression job (approved by both data owners unless
    `approve=False`; workers' keys registered unless `register_keys=False`).

    Returns {"orgs": {label: create_org output}, "project": {...}, "job": {...}, "user": {label: Api},
    "worker": {label: Api}}; seats: xorg=x_owner, yorg=y_owner, helper=helper.
    """
    orgs = {label: server.create_org(label) for label in ("xorg", "yorg", "helper")}
    user = {label: Api(server, o["user_token"]) for label, o in orgs.items()}
    worker = {label: Api(server, o["organization_token"]) for label, o in orgs.items()}

    ok(user["xorg"].post("/v1/projects", json={"label": "demo", "name": "Demo"}))
    ok(user["xorg"].post("/v1/projects/demo/organizations", json={"organization": "yorg"}))
    ok(user["xorg"].put("/v1/projects/demo/helper", json={"organization": "helper"}))
    project = ok(user["helper"].post("/v1/projects/demo/organizations/helper/join"))  # its worker may take seats
    add_dataviews(user, "demo")
    job = ok(user["yorg"].post("/v1/projects/demo/jobs", json={
        "type": "linear_regression", "x": {"dataview": "xs", "columns": ["a", "b"]},
        "y": {"dataview": "ys", "column": "t"}, "model_owner": "yorg", "model_location": "s3://bucket/models",
        "timeout": timeout}))
    if register_keys:
        for api in worker.values():
            assert api.put("/v1/worker/keys", json=worker_public_keys()).status_code == 204
    if approve:
        ok(user["xorg"].post(f"/v1/jobs/{job['id']}/approve"))
        job = ok(user["yorg"].post(f"/v1/jobs/{job['id']}/approve"))
    return {"orgs": orgs, "project": project, "job": job, "user": user, "worker": worker}


SIMPLE_JOB = {"type": "linear_regression", "x": {"dataview": "xs", "columns": ["a", "b"]},
              "y": {"dataview": "ys", "column": "t"}, "model_owner": "yorg", "timeout": 600}


def submit_jobs(api: Api, project: str, count: int) -> list[dict[str, Any]]:
    """`count` jobs of a `build_job_world` project (xs, ys; yorg the model owner), submitted one after the other."""
    return [ok(api.post(f"/v1/projects/{project}/jobs", json=SIMPLE_JOB)) for _ in range(count)]


def add_side_project(server: CapeServer, world: dict[str, Any]) -> None:
    """To a `build_job_world`: project `side` of xorg, yorg and its own helper `aside` (the world's helper is no
    member), with dataviews `xs` and `ys` as in `demo`."""
    user = world["user"]
    aside = Api(server, server.create_org("aside")["user_token"])
    ok(user["xorg"].post("/v1/projects", json={"label": "side"}))
    ok(user["xorg"].post("/v1/projects/side/organizations", json={"organization": "yorg"}))
    ok(user["xorg"].put("/v1/projects/side/helper", json={"organization": "aside"}))
    ok(aside.post("/v1/projects/side/organizations/aside/join"))
    add_dataviews(user, "side")


def database_from_before(data_dir: Path, script: str):
    """The coordinator's database in `data_dir` as an earlier version left it (`script`: its tables and rows),
    opened by this one (which upgrades it); the caller closes it."""
    import sqlite3

    from services.coordinator.db import Database

    old = sqlite3.connect(data_dir / "coordinator.sqlite3")
    old.executescript(script)
    old.close()
    return Database(data_dir / "coordinator.sqlite3")
