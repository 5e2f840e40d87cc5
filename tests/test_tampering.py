"""A broker that tampers, replays or misaddresses messages, against three real workers (issue 4, done-when 4).

Three `cape-worker run` workers under real supervisord and a real `cape-server` on 127.0.0.1. The tests act as a
malicious broker (they edit the broker's data dir) or as someone holding a party's organization token (they call
the broker's API with it). To place a forgery before the recipient takes the genuine message, they stop the
recipient's messenger program (supervisord keeps it stopped) and start it again afterwards. Every test also
records all bytes the broker stores while it runs and checks that no plaintext share or input value is among them.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest

from services.jobs.linear_regression import plaintext_fit
from services.worker.keepalive import is_keepalive_name
from services.worker.spool_transport import wire_name
from tests.support.broker_tampering import (
    BrokerAs,
    DirectoryRecorder,
    all_files,
    pause,
    plaintext_leaks,
    resume,
    share_fingerprints,
    stored_body,
)
from tests.support.server import CapeServer
from tests.support.worker_messaging import wait_for
from tests.support.workers import JobWorld, WorkerProcess, worker_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

SEATS = {"xorg": "x_owner", "yorg": "y_owner", "helper": "helper"}
X_ROWS = wire_name("x_owner", "lr/x-rows")  # x_owner -> y_owner and helper, first message of the job
X_STATUS = wire_name("x_owner", "lr/x-status")  # x_owner -> y_owner and helper
KX = wire_name("x_owner", "lr/kx")  # x_owner -> y_owner (the output seat), late in the job
TOLERANCE = 1e-6  # the engine's accuracy bound, relative to the largest weight
SIGNATURE_FAILS = "signature does not verify"
CHUNK_FAILS = "fails authentication"


@dataclass
class TamperWorld:
    server: CapeServer
    world: JobWorld
    workers: dict[str, WorkerProcess]
    broker: dict[str, BrokerAs]  # by org label, with that org's worker token
    base: Path

    def spool(self, label: str) -> Path:
        return self.base / label / "spool"

    def recorder(self) -> DirectoryRecorder:
        """Records the broker's data dir and each worker's inbox (plaintext) and rejected/ folders."""
        folders = [self.server.data_dir / "broker"]
        folders += [self.spool(label) / sub for label in SEATS for sub in ("inbox", "rejected")]
        return DirectoryRecorder(folders)

    def rejections(self, recorder: DirectoryRecorder, label: str, job: str) -> dict[str, dict]:
        """What the worker's spool said about dropped messages of `job` (rejected/<job>/<name>.json)."""
        folder = str(self.spool(label) / "rejected" / job) + "/"
        return {path[len(folder):].removesuffix(".json"): json.loads(data)
                for path, data in recorder.blobs.items()
                if path.startswith(folder) and not Path(path).name.startswith(".")}

    def assert_no_plaintext_at_broker(self, recorder: DirectoryRecorder, shares_exchanged: bool = True) -> None:
        """No .npy header, received share or input value in any byte the broker stored while `recorder` ran."""
        broker = str(self.server.data_dir / "broker")
        stored = {p: b for p, b in recorder.blobs.items() if p.startswith(broker)}
        stored.update(all_files(self.server.data_dir))
        received = [b for p, b in recorder.blobs.items()  # engine messages (.npy), not a late seat's keep-alives
                    if "/inbox/" in p and p.endswith(".msg") and not Path(p).name.startswith(".")
                    and not is_keepalive_name(Path(p).name.removesuffix(".msg"))]
        assert received, "no plaintext was recorded in any inbox: the scan would prove nothing"
        fingerprints = share_fingerprints(received)
        assert fingerprints or not shares_exchanged, "no received share was long enough to search for"
        values = np.concatenate([self.world.x[:50].ravel(), self.world.y[:50]])
        assert plaintext_leaks(stored, fingerprints, values) == []
        assert any("/bodies/" in p for p in stored), "no stored message body was recorded"

    def weights(self, job: str) -> np.ndarray:
        results = self.world.user["yorg"].get(f"/v1/jobs/{job}/results").json()
        return np.loadtxt(urlparse(results["model_location"]).path, delimiter=",")


@pytest.fixture(scope="module")
def tamper_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TamperWorld]:
    """cape-server, the three organizations' data and project, and their three workers, for the whole module."""
    base = tmp_path_factory.mktemp("tampering")
    server = CapeServer(base / "server")
    workers: dict[str, WorkerProcess] = {}
    try:
        world = JobWorld(server, base)
        for label in SEATS:
            env = worker_env(base, label, CAPE_TOKEN=world.token(label), CAPE_COORDINATOR=server.url)
            workers[label] = WorkerProcess(env, base / f"{label}.log")
        for worker in workers.values():
            worker.wait_running()
        yield TamperWorld(server, world, workers, {label: BrokerAs(server, world.token(label)) for label in SEATS},
                          base)
    finally:
        for worker in workers.values():
            worker.stop()
        server.stop()


@pytest.fixture
def tw(tamper_world: TamperWorld) -> Iterator[TamperWorld]:
    """The module's world; every messenger is running again after each test."""
    yield tamper_world
    for worker in tamper_world.workers.values():
        resume(worker, "messenger")


def flip_byte(data: bytes, position: int) -> bytes:
    altered = bytearray(data)
    altered[position] ^= 0x01
    return bytes(altered)


def test_replayed_messages_are_rejected_and_the_job_completes_from_the_genuine_ones(tw: TamperWorld) -> None:
    yorg, xb = tw.broker["yorg"], tw.broker["xorg"]
    with tw.recorder() as recorder:
        # Job A runs while the y-owner's messenger is stopped, so the x-owner's first message to it waits at the
        # broker and we copy it; then job A completes normally.
        pause(tw.workers["yorg"], "messenger")
        job_a = tw.world.submit()
        yorg.wait_for(job_a, [X_ROWS])
        sealed_a = yorg.fetch(job_a, X_ROWS)
        resume(tw.workers["yorg"], "messenger")
        assert tw.world.wait_ended(job_a)["status"] == "Completed"

        # Job B is approved while the x-owner's messenger is stopped (the broker takes no message for a job not
        # yet approved); then, before its genuine puts, job A's message is put into job B's y-owner mailbox under
        # its own name (another job) and under the names of two later messages (other slots).
        job_b = tw.world.submit(approvers=())
        pause(tw.workers["xorg"], "messenger")  # its genuine puts wait until the forgeries are in place
        pause(tw.workers["yorg"], "messenger")  # until the x-owner's genuine put has met the forgery
        for label in ("xorg", "yorg"):
            assert tw.world.user[label].post(f"/v1/jobs/{job_b}/approve").status_code == 200
        for name in (X_ROWS, X_STATUS, KX):
            assert xb.put(job_b, "y_owner", name, sealed_a) == 201
        resume(tw.workers["xorg"], "messenger")
        conflict = f"could not send {X_ROWS} to y_owner for job {job_b}: the broker holds other bytes under this name"
        wait_for(lambda: conflict in tw.workers["xorg"].output, "the x-owner's put to meet the forgery (409)")
        resume(tw.workers["yorg"], "messenger")
        job = tw.world.wait_ended(job_b)
        assert job["status"] == "Completed", job

    # The genuine messages got through after the forgeries were dropped: the weights are right.
    expected, _ = plaintext_fit(tw.world.x, tw.world.y)
    assert np.max(np.abs(tw.weights(job_b) - expected)) <= TOLERANCE * np.max(np.abs(expected))

    # Each replay was rejected by the y-owner's worker: in its spool's rejected/ folder and in its log.
    rejected = tw.rejections(recorder, "yorg", job_b)
    assert set(rejected) == {X_ROWS, X_STATUS, KX}, rejected
    for name, record in rejected.items():
        assert record["from_seat"] == "x_owner" and SIGNATURE_FAILS in record["reason"], record
        assert f"job {job_b}: dropped message {name} from x_owner: {SIGNATURE_FAILS}" in tw.workers["yorg"].output
    assert tw.rejections(recorder, "yorg", job_a) == {}  # the genuine job A was untouched
    tw.assert_no_plaintext_at_broker(recorder)


def test_a_ciphertext_altered_at_the_broker_is_rejected_and_the_job_ends_in_error_saying_so(
        tw: TamperWorld) -> None:
    yorg, xb = tw.broker["yorg"], tw.broker["xorg"]
    with tw.recorder() as recorder:
        pause(tw.workers["yorg"], "messenger")
        job_id = tw.world.submit(timeout=15)  # the runners' bound for a missing message
        yorg.wait_for(job_id, [X_ROWS])
        genuine = yorg.fetch(job_id, X_ROWS)

        # Re-putting other bytes under a stored name is refused by the broker ...
        assert xb.put(job_id, "y_owner", X_ROWS, flip_byte(genuine, len(genuine) - 5)) == 409
        # ... so the malicious broker flips one byte of the ciphertext in its own store.
        body = stored_body(tw.server, job_id, "y_owner", X_ROWS)
        assert body.read_bytes() == genuine
        body.write_bytes(flip_byte(genuine, len(genuine) - 5))
        resume(tw.workers["yorg"], "messenger")
        job = tw.world.wait_ended(job_id, timeout=120)

    assert job["status"] == "Error", job
    message = job["parties"]["y_owner"]["message"]
    assert f"no message '{X_ROWS}' from the x_owner worker" in message, job
    assert "1 message(s) claiming to come from x_owner were rejected" in message and CHUNK_FAILS in message, job
    rejected = tw.rejections(recorder, "yorg", job_id)
    assert list(rejected) == [X_ROWS] and CHUNK_FAILS in rejected[X_ROWS]["reason"], rejected
    assert f"job {job_id}: dropped message {X_ROWS} from x_owner: chunk 0 {CHUNK_FAILS}" in tw.workers["yorg"].output
    tw.assert_no_plaintext_at_broker(recorder, shares_exchanged=False)  # the job stopped before the product


def test_a_message_sealed_for_another_seat_is_rejected_and_the_genuine_one_still_completes_the_job(
        tw: TamperWorld) -> None:
    yorg, helper, xb = tw.broker["yorg"], tw.broker["helper"], tw.broker["xorg"]
    with tw.recorder() as recorder:
        pause(tw.workers["yorg"], "messenger")
        pause(tw.workers["helper"], "messenger")
        job_id = tw.world.submit()
        yorg.wait_for(job_id, [X_ROWS])
        helper.wait_for(job_id, [X_ROWS])
        for_y_owner, for_helper = yorg.fetch(job_id, X_ROWS), helper.fetch(job_id, X_ROWS)
        assert for_y_owner != for_helper

        # The helper is handed the copy sealed for the y-owner in place of its own.
        assert helper.delete(job_id, X_ROWS) == 204
        assert xb.put(job_id, "helper", X_ROWS, for_y_owner) == 201
        resume(tw.workers["helper"], "messenger")
        rejected = wait_for(lambda: tw.rejections(recorder, "helper", job_id), "the helper's rejection")
        assert list(rejected) == [X_ROWS] and SIGNATURE_FAILS in rejected[X_ROWS]["reason"], rejected
        # Dropped and acknowledged (just after the record is written): the slot is free again.
        wait_for(lambda: X_ROWS not in helper.waiting(job_id), "the helper to acknowledge the dropped message")

        # The genuine message arrives after all (as a sender's retry would bring it): the job completes.
        assert xb.put(job_id, "helper", X_ROWS, for_helper) == 201
        resume(tw.workers["yorg"], "messenger")
        job = tw.world.wait_ended(job_id)
        assert job["status"] == "Completed", job

    expected, _ = plaintext_fit(tw.world.x, tw.world.y)
    assert np.max(np.abs(tw.weights(job_id) - expected)) <= TOLERANCE * np.max(np.abs(expected))
    assert (f"job {job_id}: dropped message {X_ROWS} from x_owner: {SIGNATURE_FAILS}"
            in tw.workers["helper"].output)
    assert tw.rejections(recorder, "yorg", job_id) == {}
    tw.assert_no_plaintext_at_broker(recorder)


def test_the_plaintext_scan_finds_a_share_a_header_or_an_input_value_stored_in_the_clear() -> None:
    import io

    share = (np.arange(1, 9, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    npy = io.BytesIO()
    np.save(npy, share)
    fingerprints = share_fingerprints([npy.getvalue()])
    values = np.array([3.14159, -271.828])
    rng = np.random.default_rng(1)
    noise = rng.bytes(4096)
    stored = {
        "clean": noise,
        "share": noise[:101] + share.tobytes() + noise[101:],  # raw array data, no header, unaligned
        "header": noise + npy.getvalue()[:10],
        "value": noise[:7] + np.float64(-271.828).tobytes() + noise[7:],
    }
    assert plaintext_leaks(stored, fingerprints, values) == [
        "a received share in share", "the .npy header magic in header", "the input value -271.828 in value"]
