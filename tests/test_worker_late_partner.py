"""A seat late for longer than the job's timeout but alive: its partners wait for it (its keep-alives say it is still
preparing), and a partner that sends nothing, or stops, is still given up within the timeout or two.

End to end on 127.0.0.1: the real cape-server, a real moto S3 and three workers under real supervisord, started as
the image starts them. The x-owner's dataview is an s3:// object whose download is held up at a relay in front of
the store, as a slow or throttling store does."""
import os
import re
import signal
import time
from urllib.parse import urlparse

import numpy as np
import pytest

from services.jobs.linear_regression import plaintext_fit
from services.worker.keepalive import interval_for
from tests.support.workers import JobWorld, worker_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]
TIMEOUT = 5  # the job's timeout: without keep-alives, the longest wait for any one message
HELD = 3 * TIMEOUT  # how long the x-owner's download is held up at the store
WAITING = "waiting for the x_owner worker, still preparing (loading its data)"
PARTNERS = ("y_owner", "helper")


@pytest.fixture
def late_world(cape_server, moto, relay, start_worker, tmp_path):
    """The three workers, the x-owner's on `xs3` (s3://) through `store`, a relay that can hold the download."""
    world = JobWorld(cape_server, tmp_path)
    moto.make_bucket("xorg-data")
    moto.client("s3").upload_file(str(world.x_path), "xorg-data", "x.csv")
    world.add_dataview("xorg", "xs3", "s3://xorg-data/x.csv", ["a", "b", "c"])
    store = relay(urlparse(moto.url).port)
    workers = {}
    for label in JobWorld.LABELS:
        aws = {**moto.env, "AWS_ENDPOINT_URL_S3": store.url} if label == "xorg" else {}
        workers[label] = start_worker(worker_env(tmp_path, label, CAPE_TOKEN=world.token(label),
                                                 CAPE_COORDINATOR=cape_server.url, **aws))
    for worker in workers.values():
        worker.wait_running()
    return world, store, workers


def seats_saying(world: JobWorld, job_id: str, text: str) -> list[str]:
    parties = world.job(job_id)["parties"]
    return [seat for seat in PARTNERS if text in (parties[seat]["message"] or "")]


def wait_until(predicate, what: str, timeout: float):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return value


def test_a_seat_loading_its_data_for_three_timeouts_does_not_fail_the_job(late_world):
    """Also through a kill -9 of a waiting runner and of the late seat's messenger meanwhile."""
    world, store, workers = late_world
    store.hold_reply(r"^GET /xorg-data/x\.csv")
    job_id = world.submit(x="xs3", timeout=TIMEOUT)
    try:
        assert store.wait_held(30), "the x-owner's download never reached the store"
        held_at = time.monotonic()
        # Past the timeout, the partners waiting for its first message say why at the coordinator.
        wait_until(lambda: seats_saying(world, job_id, WAITING), "a partner to say why it waits", 3 * TIMEOUT)
        assert time.monotonic() - held_at >= TIMEOUT - 1
        os.kill(workers["yorg"].pid("runner"), signal.SIGKILL)  # it replays and waits again
        os.kill(workers["xorg"].pid("messenger"), signal.SIGKILL)  # its keep-alives wait in the outbox meanwhile
        time.sleep(max(0.0, held_at + HELD - time.monotonic()))
        assert world.job(job_id)["status"] == "Started"
    finally:
        store.release()
    job = world.wait_ended(job_id, timeout=60)
    assert job["status"] == "Completed", job
    results = world.user["yorg"].get(f"/v1/jobs/{job_id}/results").json()
    weights = np.loadtxt(urlparse(results["model_location"]).path, delimiter=",")
    expected, _ = plaintext_fit(world.x, world.y)
    assert np.max(np.abs(weights - expected)) / np.max(np.abs(expected)) <= 1e-6
    assert (f"job {job_id}: still preparing (loading its data); telling the other workers every "
            f"{interval_for(TIMEOUT):g} s") in workers["xorg"].output
    assert f"job {job_id}: {WAITING}; waited" in workers["yorg"].output + workers["helper"].output


def test_a_partner_that_sends_nothing_still_fails_the_job_within_the_timeout(late_world):
    """The x-owner's worker is cut off from the broker (its messenger frozen): nothing of it arrives, no keep-alive
    either, and the job ends in Error with the timeout's message, not after the keep-alives' limit."""
    world, _, workers = late_world
    messenger = workers["xorg"].pid("messenger")
    os.kill(messenger, signal.SIGSTOP)
    try:
        began = time.monotonic()
        job = world.wait_ended(world.submit(timeout=TIMEOUT), timeout=60)
        took = time.monotonic() - began
    finally:
        os.kill(messenger, signal.SIGCONT)
    assert job["status"] == "Error", job
    timed_out = (r"no message '(\w+)\.[^']+' from the \1 worker \(organization \w+\) within 5 s; check that worker "
                 r"is running and reaches the broker")
    # Whichever seat timed out first: the x-owner's partners on it, or the x-owner itself on what it never received.
    assert re.search(timed_out, job["error"]), job["error"]
    assert took < 2 * TIMEOUT + 10, took  # the keep-alives' limit would be 5 timeouts


def test_a_late_seat_that_goes_silent_is_given_up_within_two_timeouts(late_world):
    """Its keep-alives came, then its runner froze (a hung machine): its partners stop waiting, saying so."""
    world, store, workers = late_world
    store.hold_reply(r"^GET /xorg-data/x\.csv")
    job_id = world.submit(x="xs3", timeout=TIMEOUT)
    runner = None
    try:
        assert store.wait_held(30), "the x-owner's download never reached the store"
        wait_until(lambda: seats_saying(world, job_id, WAITING), "a partner to say why it waits", 3 * TIMEOUT)
        runner = workers["xorg"].pid("runner")
        os.kill(runner, signal.SIGSTOP)
        frozen_at = time.monotonic()
        job = world.wait_ended(job_id, timeout=60)
        took = time.monotonic() - frozen_at
    finally:
        if runner is not None:
            os.kill(runner, signal.SIGCONT)
        store.release()
    assert job["status"] == "Error", job
    assert re.search(r"no message 'x_owner\.[^']+' from the x_owner worker \(organization xorg\): it said it was "
                     r"still preparing \(loading its data\), then nothing came from it for 5 s; check that worker "
                     r"is running and reaches the broker", job["error"]), job["error"]
    assert took < 2 * TIMEOUT + 8, took
