"""Faults during a running job: kill -9 of each of the four programs (each at its own moment, on different
workers) and a restart of cape-server; the job still ends Completed with the plaintext fit's weights."""
import os
import signal
import time

import numpy as np
import pytest

from services.jobs.linear_regression import plaintext_fit
from tests.support.aws import free_port
from tests.support.workers import JobWorld, worker_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
TOLERANCE = 1e-6


def has_files(folder):
    return folder.is_dir() and any(p.is_file() and not p.name.startswith(".") for p in folder.rglob("*"))


def test_kill_each_program_and_restart_server_mid_job(start_cape_server, start_worker, tmp_path):
    port = free_port()
    server = start_cape_server(extra_args=["--port", str(port)])  # a restart keeps the port the workers use
    world = JobWorld(server, tmp_path, n=20000)
    workers = {label: start_worker(worker_env(tmp_path, label, CAPE_TOKEN=world.token(label),
                                              CAPE_COORDINATOR=server.url))
               for label in JobWorld.LABELS}
    for worker in workers.values():
        worker.wait_running()
    job_id = world.submit()
    spool = {label: tmp_path / label / "spool" for label in JobWorld.LABELS}

    # (worker, program, the moment: a predicate over the spools) in the order they tend to happen.
    moments = [
        ("helper", "poller", lambda: (spool["helper"] / "jobs" / job_id / "spec.json").exists()),
        ("xorg", "runner", lambda: has_files(spool["xorg"] / "outbox" / job_id)),
        ("yorg", "messenger", lambda: has_files(spool["yorg"] / "inbox" / job_id)),
        ("server", "restart", lambda: has_files(spool["helper"] / "inbox" / job_id)),
        ("yorg", "uploader", lambda: (spool["yorg"] / "results" / job_id).is_dir()),
    ]
    killed = {}
    deadline = time.monotonic() + 90
    while moments and time.monotonic() < deadline:
        label, program, due = moments[0]
        if due():
            if label == "server":
                server.restart()
                assert server.url == f"http://127.0.0.1:{port}"
            else:
                pid = workers[label].pid(program)
                os.kill(pid, signal.SIGKILL)
                killed[(label, program)] = pid
            moments.pop(0)
        else:
            time.sleep(0.01)
    assert not moments, f"moments never reached: {[(m[0], m[1]) for m in moments]}"

    job = world.wait_ended(job_id, timeout=120)
    assert job["status"] == "Completed", job
    for (label, program), old_pid in killed.items():
        info = workers[label].supervisor().getProcessInfo(f"worker:{program}")
        assert info["pid"] != old_pid and info["statename"] in ("STARTING", "RUNNING"), (label, program, info)

    weights_file = tmp_path / "yorg" / "bucket" / job_id / "regression_weights.csv"
    weights = np.loadtxt(weights_file, delimiter=",")
    expected, _ = plaintext_fit(world.x, world.y)
    assert np.max(np.abs(weights - expected)) / np.max(np.abs(expected)) <= TOLERANCE
    assert not (tmp_path / "xorg" / "bucket").exists() and not (tmp_path / "helper" / "bucket").exists()
