"""Start real cape workers exactly as the image does (`cape-worker run` with conf/supervisord.conf).

- `WORKER_COMMAND`: the command the Dockerfile's CMD runs (a test asserts they are equal).
- `worker_env(tmp_path, name, **extra)`: a complete environment for one worker with its own spool and state.
- `start_worker` fixture: `start_worker(env, cgroup=None)` -> `WorkerProcess`; every worker started is stopped at
  teardown.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from services.worker import health
from tests.support.cgroups import join_code

WORKER_COMMAND = ["cape-worker", "run"]
ROOT = Path(__file__).resolve().parents[2]
# A well-formed organization token no coordinator knows (for tests that do not need a real one).
DUMMY_TOKEN = "0000dummy,ZHVtbXktc2VjcmV0LWR1bW15LXNlY3JldA=="


def worker_env(base: Path, name: str, **extra: str) -> dict[str, str]:
    """Environment for one worker under `base/name` (spool, state, file:// bucket), plus `extra`."""
    folder = base / name
    env = {key: value for key, value in os.environ.items() if not key.startswith(("CAPE_", "AWS_"))}
    env.update({
        "CAPE_TOKEN": DUMMY_TOKEN,
        "CAPE_COORDINATOR": "http://127.0.0.1:9",
        "CAPE_WORKER_NAME": name,
        "CAPE_SPOOL_DIR": str(folder / "spool"),
        "CAPE_STATE_DIR": str(folder / "state"),
        "CAPE_BUCKET": f"file://{folder / 'bucket'}",
        "CAPE_POLL_INTERVAL": "0.2",
        "PYTHONUNBUFFERED": "1",
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
    })
    env.update(extra)
    return env


class WorkerProcess:
    """A running `cape-worker run` whose output goes to `log_path` (opened in append mode)."""

    def __init__(self, env: dict[str, str], log_path: Path, cgroup: Path | None = None) -> None:
        """`cgroup`: a memory cgroup (tests/support/cgroups.py) the worker runs in, as in a container."""
        self.env = env
        self.log_path = log_path
        self.run_dir = Path(env["CAPE_STATE_DIR"]) / "run"
        command = WORKER_COMMAND
        if cgroup is not None:
            command = [sys.executable, "-c", join_code(cgroup) + f"os.execvp({WORKER_COMMAND[0]!r}, {WORKER_COMMAND!r})"]
        with open(log_path, "ab") as out:  # O_APPEND: the programs' lines must not overwrite each other
            self.proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=log_path.parent,
                                         start_new_session=True)

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def states(self) -> dict[str, str]:
        try:
            return health.program_states(self.run_dir)
        except health.SupervisorUnavailable:
            return {}

    def wait_running(self, timeout: float = 30.0) -> dict[str, str]:
        """Wait until all four programs are RUNNING; fail with the states and output otherwise."""
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            states = self.states()
            if len(states) == 4 and all(s == "RUNNING" for s in states.values()):
                return states
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        pytest.fail(f"worker programs not all RUNNING: {states}; exit={self.proc.poll()}\n{self.output[-3000:]}")

    def pid(self, program: str) -> int:
        return health.supervisor_proxy(self.run_dir).supervisor.getProcessInfo(f"worker:{program}")["pid"]

    def supervisor(self):
        return health.supervisor_proxy(self.run_dir).supervisor

    def wait_exit(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill_whole(self) -> None:
        """SIGKILL `cape-worker run`, supervisord and every program at once, as `docker kill` or a power loss does
        (the programs are in process groups of their own: a kill of the session's group spares them, and they stop
        cleanly). All are frozen first, so none sees another die."""
        import psutil

        root = psutil.Process(self.proc.pid)
        tree = [root, *root.children(recursive=True)]
        for signum in (signal.SIGSTOP, signal.SIGKILL):
            for process in tree:
                try:
                    process.send_signal(signum)
                except psutil.NoSuchProcess:
                    pass
        self.proc.wait(timeout=10)
        psutil.wait_procs(tree, timeout=10)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (as `docker stop`), then SIGKILL of the whole session if it does not end in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            if self.wait_exit(timeout) is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        return self.proc.returncode


@pytest.fixture
def start_worker(tmp_path) -> Callable[..., WorkerProcess]:
    """`start_worker(env)` starts one worker; all are stopped (and their process groups killed) at teardown."""
    started: list[WorkerProcess] = []

    def _start(env: dict[str, str], cgroup: Path | None = None) -> WorkerProcess:
        worker = WorkerProcess(env, tmp_path / f"{env['CAPE_WORKER_NAME']}-{len(started)}.log", cgroup)
        started.append(worker)
        return worker

    yield _start
    for worker in started:  # SIGTERM all first: they stop in parallel, as `docker stop` of several containers
        if worker.proc.poll() is None:
            worker.proc.send_signal(signal.SIGTERM)
    for worker in started:
        worker.stop()
        try:
            os.killpg(worker.proc.pid, signal.SIGKILL)  # leftovers of a worker that misbehaved
        except ProcessLookupError:
            pass


# ---- three organizations, their data and a job: shared by the end-to-end and fault tests ----------------------

def make_regression_data(n: int = 300, seed: int = 7):
    """X (n x 3, columns a, b, c at mixed scales) and y = X w + b + noise; distinctive digits for leak checks."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3)) * np.array([1.0, 250.0, 0.01]) + np.array([3.0, -40.0, 0.5])
    y = x @ np.array([1.75, -0.004, 120.0]) + 2.5 + 0.1 * rng.standard_normal(n)
    return x, y


def write_csv(path: Path, header: list[str], columns) -> Path:
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.column_stack(columns)
    np.savetxt(path, data, delimiter=",", header=",".join(header), comments="", fmt="%.12g")
    return path


class JobWorld:
    """cape-server with orgs xorg (X), yorg (y, model owner) and helper; a project, dataviews on local CSV files,
    and `submit()` for an approved linear-regression job. Tokens by label in `orgs`."""

    LABELS = ("xorg", "yorg", "helper")

    def __init__(self, server, base: Path, n: int = 300) -> None:
        from tests.support.server import Api

        self.server = server
        self.base = base
        self.x, self.y = make_regression_data(n)
        self.orgs = {label: server.create_org(label) for label in self.LABELS}
        self.user = {label: Api(server, org["user_token"]) for label, org in self.orgs.items()}
        self.x_path = write_csv(base / "xorg" / "data" / "x.csv", ["a", "b", "c"], self.x.T)
        self.y_path = write_csv(base / "yorg" / "data" / "y.csv", ["t"], [self.y])
        ok = self._ok
        ok(self.user["xorg"].post("/v1/projects", json={"label": "e2e", "name": "End to end"}))
        ok(self.user["xorg"].post("/v1/projects/e2e/organizations", json={"organization": "yorg"}))
        ok(self.user["xorg"].put("/v1/projects/e2e/helper", json={"organization": "helper"}))
        ok(self.user["helper"].post("/v1/projects/e2e/organizations/helper/join"))
        ok(self.user["xorg"].post("/v1/projects/e2e/dataviews", json={
            "name": "xs", "uri": self.x_path.as_uri(), "schema": [{"name": c, "type": "number"} for c in "abc"]}))
        ok(self.user["yorg"].post("/v1/projects/e2e/dataviews", json={
            "name": "ys", "uri": self.y_path.as_uri(), "schema": [{"name": "t", "type": "number"}]}))

    @staticmethod
    def _ok(response):
        assert response.status_code < 300, response.text
        return response.json() if response.content else None

    def token(self, label: str) -> str:
        return self.orgs[label]["organization_token"]

    def secrets(self) -> list[str]:
        """Every token and token secret of the world (none may appear in a log line)."""
        found = []
        for org in self.orgs.values():
            for key in ("organization_token", "user_token"):
                found += [org[key], org[key].split(",", 1)[1]]
        return found

    def data_values(self, count: int = 40) -> list[str]:
        """How the first data values are written in the CSV files (none may appear in a log line)."""
        return [f"{v:.12g}" for v in [*self.x[:count // 2].ravel(), *self.y[:count // 2]] if len(f"{v:.12g}") > 6]

    def add_dataview(self, label: str, name: str, uri: str, columns: list[str]) -> None:
        self._ok(self.user[label].post("/v1/projects/e2e/dataviews", json={
            "name": name, "uri": uri, "schema": [{"name": c, "type": "number"} for c in columns]}))

    def submit(self, model_location: str | None = None, timeout: int = 120, x: str = "xs",
               approvers: tuple[str, ...] = ("xorg", "yorg")) -> str:
        """Submit a job on dataviews `x` (columns a, b, c) and `ys`; approve it as `approvers`; return its id."""
        ok = self._ok
        job = ok(self.user["yorg"].post("/v1/projects/e2e/jobs", json={  # the model owner: it may name the location
            "type": "linear_regression", "x": {"dataview": x, "columns": ["a", "b", "c"]},
            "y": {"dataview": "ys", "column": "t"}, "model_owner": "yorg", "model_location": model_location,
            "timeout": timeout}))
        for label in approvers:
            ok(self.user[label].post(f"/v1/jobs/{job['id']}/approve"))
        return job["id"]

    def job(self, job_id: str) -> dict:
        return self._ok(self.user["yorg"].get(f"/v1/jobs/{job_id}"))

    def wait_ended(self, job_id: str, timeout: float = 90.0) -> dict:
        """Poll until the job is Completed, Error, Stopped or Rejected; fail with its state after `timeout`."""
        deadline = time.monotonic() + timeout
        job = self.job(job_id)
        while job["status"] not in ("Completed", "Error", "Stopped", "Rejected"):
            if time.monotonic() > deadline:
                pytest.fail(f"job {job_id} still {job['status']} after {timeout} s: {job['parties']}")
            time.sleep(0.25)
            job = self.job(job_id)
        return job
