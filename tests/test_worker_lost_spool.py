"""A whole worker killed mid-job (`docker kill`, a power loss) and started again on an empty spool: its container
re-created without the spool volume (the image's anonymous VOLUME), say. Its keys survive in CAPE_STATE_DIR, so the
coordinator hands it the job again; the messages its old spool had received are gone from the broker.

- A seat that had already completed is not run again: a replay waited for those messages and reported an error that
  ended in Error a job its partners were completing.
- A seat that had started says on the seat, and in its worker's log, that its spool lost the job: the job's error
  otherwise named a worker that was running, or its partner, as not sending.
"""
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest

from services.worker.spool import Spool
from tests.support.workers import JobWorld, worker_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]
MOMENT_TIMEOUT = 45.0


def wait_for(what: str, predicate, timeout: float = MOMENT_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"never happened: {what}")
        time.sleep(0.01)


@pytest.fixture
def fleet(start_cape_server, start_worker, tmp_path):
    server = start_cape_server()
    world = JobWorld(server, tmp_path)
    workers = {label: start_worker(worker_env(tmp_path, label, CAPE_TOKEN=world.token(label),
                                              CAPE_COORDINATOR=server.url, CAPE_BROKER=server.url + "/broker"))
               for label in JobWorld.LABELS}
    for worker in workers.values():
        worker.wait_running()
    return world, workers


def restart_on_an_empty_spool(workers, start_worker, label: str) -> Path:
    workers[label].kill_whole()
    spool = Path(workers[label].env["CAPE_SPOOL_DIR"])
    shutil.rmtree(spool)
    workers[label] = start_worker(workers[label].env)
    workers[label].wait_running()
    return spool


def test_a_seat_that_completed_is_not_run_again_from_an_empty_spool(fleet, start_worker):
    world, workers = fleet
    uploader = workers["yorg"].pid("uploader")
    os.kill(uploader, signal.SIGSTOP)  # the job stays Started, the model waiting for its upload
    try:
        job_id = world.submit(timeout=3)
        wait_for("the helper's seat completes", lambda: world.job(job_id)["parties"]["helper"]["state"] == "completed")
        spool = restart_on_an_empty_spool(workers, start_worker, "helper")
        wait_for("the restarted helper settles the job", lambda: Spool(spool).done(job_id) is not None)
        time.sleep(4)  # beyond the job's timeout: a replay would have given up on its partners' messages by now
        assert Spool(spool).done(job_id)["outcome"] == "abandoned", Spool(spool).done(job_id)
        assert not Spool(spool).has_pending_status(job_id)
    finally:
        os.kill(uploader, signal.SIGCONT)
    job = world.wait_ended(job_id)
    assert job["status"] == "Completed", job
    assert "its seat had already ended at the coordinator (completed)" in workers["helper"].output


def test_a_started_seat_on_an_empty_spool_says_its_received_messages_are_lost(fleet, start_worker):
    world, workers = fleet
    x_spool = Path(workers["xorg"].env["CAPE_SPOOL_DIR"])
    y_runner = workers["yorg"].pid("runner")
    job_id = world.submit(timeout=3)
    try:
        wait_for("xorg receives a message", lambda: any((x_spool / "inbox" / job_id).glob("*.msg")))
        os.kill(y_runner, signal.SIGSTOP)  # the job cannot end before the kill
        assert world.job(job_id)["status"] == "Started"
        restart_on_an_empty_spool(workers, start_worker, "xorg")
    finally:
        os.kill(y_runner, signal.SIGCONT)
    job = world.wait_ended(job_id)
    assert job["status"] == "Error", job
    # Whichever gave up first, xorg waiting for a message its old spool had, or a partner waiting for xorg, the
    # x_owner seat says why.
    seat = job["parties"]["x_owner"]
    assert re.search(r"without its spool's record of (the job \(|it: )CAPE_SPOOL_DIR emptied or replaced",
                     seat["message"] or ""), seat
    assert "this worker's spool holds no record of the job" in workers["xorg"].output


def test_a_whole_worker_killed_mid_job_is_not_counted_as_a_runner_death_as_its_runner_killed_alone_is(
        fleet, start_worker):
    """Three `docker kill`s (or power losses) during one job ended it in Error saying the worker needed more memory:
    each counted as a death of its runner. A runner killed alone, restarted by supervisord under the same run, still
    counts (its cause from the memory cgroup's counter, here none)."""
    world, workers = fleet
    x_spool = Spool(Path(workers["xorg"].env["CAPE_SPOOL_DIR"]))
    y_runner = workers["yorg"].pid("runner")
    os.kill(y_runner, signal.SIGSTOP)  # the job cannot end meanwhile: xorg's seat waits for the y-owner's messages
    try:
        job_id = world.submit(timeout=60)
        loaded = f"job {job_id}: loaded its data"
        wait_for("xorg's runner loads its data", lambda: loaded in workers["xorg"].output)
        workers["xorg"].kill_whole()
        workers["xorg"] = start_worker(workers["xorg"].env)
        wait_for("the restarted runner loads the job again", lambda: loaded in workers["xorg"].output)
        assert (f"job {job_id}: the whole worker stopped while its runner worked on this job, without a clean stop "
                "(docker kill, a power loss, its supervisord killed): not counted as a death of the runner; the job "
                "is replayed") in workers["xorg"].output
        assert x_spool.kills(job_id) == 0
        os.kill(workers["xorg"].pid("runner"), signal.SIGKILL)
        wait_for("the runner's death is counted", lambda: x_spool.kills(job_id) == 1)
        assert f"job {job_id}: the last runner was killed while it worked on this job (1 of 3 times" in \
            workers["xorg"].output
    finally:
        os.kill(y_runner, signal.SIGCONT)
    assert world.wait_ended(job_id)["status"] == "Completed"
