"""The messenger against a real cape-server: sealed messages move between workers' spools through the broker."""
from __future__ import annotations

import json
import logging
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import ed25519

from services.worker.job_spec import JobSpec
from services.worker.keepalive import KeepAlives
from services.worker.messenger import Messenger
from services.worker.sealing import MessageAddress, SealedMessage
from services.worker.spool_transport import PartnerMessageInvalid, SpoolTransport, SpoolTransportTimeout
from tests.support.fault_proxy import FaultProxy
from tests.support.worker_messaging import approved_job, program_env, wait_for

WAIT = 30.0  # bound on every wait in these tests


def start_messenger(job, seat, base: Path, broker: str | None = None) -> subprocess.Popen:
    """`seat`'s messenger program; `broker` in place of the job's broker URL (a proxy in front of it)."""
    log = open(base / f"{seat}.messenger.log", "ab")
    env = program_env(job, seat, base) | ({"CAPE_BROKER": broker} if broker else {})
    return subprocess.Popen([sys.executable, "-m", "services.worker.messenger"], env=env,
                            stdout=log, stderr=subprocess.STDOUT)


def stop_all(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        proc.wait(timeout=10)


def transport(job, seat, timeout=WAIT) -> SpoolTransport:
    s = job.seats[seat]
    return SpoolTransport(s.spool, JobSpec.parse(s.spec), s.keys, timeout=timeout)


@pytest.fixture
def job(cape_server, tmp_path):
    job = approved_job(cape_server, tmp_path)
    for seat in job.seats.values():
        seat.spool.put_job(seat.spec)
    return job


def test_messages_travel_sealed_through_the_broker(job, cape_server, tmp_path):
    x_array = np.arange(1000, dtype=np.uint64) * np.uint64(0x0101010101010101)
    helper_array = np.linspace(-1, 1, 77).reshape(7, 11)
    started = []
    try:
        # Senders first, the recipient's messenger later: the messages wait at the broker meanwhile.
        started += [start_messenger(job, "x_owner", tmp_path), start_messenger(job, "helper", tmp_path)]
        with transport(job, "x_owner") as x_sender, transport(job, "helper") as helper_sender:
            x_sender.send(1, "round1.share", x_array)
            helper_sender.send(1, "round1.share", helper_array)
        for seat in ("x_owner", "helper"):
            spool = job.seats[seat].spool
            wait_for(lambda spool=spool, seat=seat: not spool.pending_outbox()
                     and spool.outbox_has(job.id, "y_owner", f"{seat}.round1.share"),
                     f"{seat}'s message to be confirmed by the broker")

        # What the broker stores is ciphertext: the share's bytes appear nowhere in the server's data directory.
        needle = x_array.tobytes()[8:200]
        for path in cape_server.data_dir.rglob("*"):
            if path.is_file():
                assert needle not in path.read_bytes(), f"plaintext share found in {path}"

        started.append(start_messenger(job, "y_owner", tmp_path))
        receiver = transport(job, "y_owner")
        np.testing.assert_array_equal(receiver.receive(0, "round1.share"), x_array)
        got = receiver.receive(2, "round1.share")
        np.testing.assert_array_equal(got, helper_array)
        assert got.dtype == helper_array.dtype and got.shape == (7, 11)

        # Delivered messages were acknowledged: nothing waits at the broker for y_owner any more. The messenger
        # acknowledges only after the inbox file is durable, so the acknowledgement may trail the file by a moment.
        def nothing_waiting() -> bool:
            return requests.get(f"{job.broker_url}/v1/jobs/{job.id}/messages", timeout=10,
                                headers={"Authorization": f"Bearer {job.seats['y_owner'].token}"}).json() == []

        wait_for(nothing_waiting, "the y_owner messenger to acknowledge both messages", timeout=WAIT)
    finally:
        for proc in started:
            proc.send_signal(signal.SIGTERM)
        for proc in started:
            proc.wait(timeout=10)
    log = (tmp_path / "y_owner.messenger.log").read_text()
    assert "received x_owner.round1.share from x_owner" in log
    assert job.seats["y_owner"].token.split(",")[1] not in log


def test_a_download_a_proxy_cuts_short_is_fetched_again_not_dropped(job, tmp_path):
    """A proxy that drops a body's Content-Length, then the connection halfway: the short body is a cut connection
    (downloaded again), not a truncated forgery (dropped and acknowledged at the broker: the message lost)."""
    array = np.arange(300_000, dtype=np.uint64) * np.uint64(0x0101010101010101)
    y = job.seats["y_owner"]
    with FaultProxy(job.url) as proxy:
        proxy.cut_downloads = 1
        started = [start_messenger(job, "x_owner", tmp_path),
                   start_messenger(job, "y_owner", tmp_path, broker=f"{proxy.url}/broker")]
        try:
            with transport(job, "x_owner") as sender:
                sender.send(1, "block", array)
            np.testing.assert_array_equal(transport(job, "y_owner").receive(0, "block"), array)
        finally:
            stop_all(started)
    assert y.spool.rejections(job.id) == {}
    assert proxy.count("GET", r"/messages/x_owner\.block$", 200) == 2  # the cut one, then the whole one
    log = (tmp_path / "y_owner.messenger.log").read_text()
    assert "ended after 1200" in log and "of its 2400" in log and "downloaded again later" in log
    assert "dropped message" not in log


def test_a_proxys_own_404_for_a_download_is_an_error_backed_off_from(job, tmp_path):
    """Only the broker's `message_not_found` means a listed message is gone: a proxy's 404 page re-listed it
    hundreds of times a second, silently. Now it is said, backed off from, and the message comes once it passes."""
    array = np.arange(1000, dtype=np.uint64)
    with FaultProxy(job.url) as proxy:
        proxy.own_404_downloads = True
        started = [start_messenger(job, "x_owner", tmp_path),
                   start_messenger(job, "y_owner", tmp_path, broker=f"{proxy.url}/broker")]
        try:
            with transport(job, "x_owner") as sender:
                sender.send(1, "small", array)
            wait_for(lambda: proxy.count("GET", r"/messages/x_owner\.small$", 404) >= 1, "the proxy's first 404")
            time.sleep(3.0)
            refused = proxy.count("GET", r"/messages/x_owner\.small$", 404)
            assert refused <= 6, f"{refused} downloads in 3 s: not backed off"
            proxy.own_404_downloads = False
            np.testing.assert_array_equal(transport(job, "y_owner").receive(0, "small"), array)
        finally:
            stop_all(started)
    log = (tmp_path / "y_owner.messenger.log").read_text()
    assert "download message x_owner.small: the broker answered 404" in log
    assert job.seats["y_owner"].spool.rejections(job.id) == {}


def test_a_stalled_download_holds_up_no_other_message(job, tmp_path):
    """One download paused on the way (a proxy, a lossy link) delayed every other message, of every job, until it
    resumed or timed out (a minute): the receiver waited for all of a listing's downloads before listing again."""
    big, small = np.arange(200_000, dtype=np.uint64), np.arange(10, dtype=np.uint64)
    with FaultProxy(job.url) as proxy:
        proxy.stall_downloads, proxy.stall_seconds = 1, 8.0
        started = [start_messenger(job, "x_owner", tmp_path), start_messenger(job, "helper", tmp_path),
                   start_messenger(job, "y_owner", tmp_path, broker=f"{proxy.url}/broker")]
        try:
            with transport(job, "x_owner") as sender:
                sender.send(1, "big", big)
            wait_for(lambda: proxy.count("GET", r"/messages/x_owner\.big$") == 1, "the stalled download")
            sent = time.monotonic()
            with transport(job, "helper") as sender:
                sender.send(1, "small", small)
            np.testing.assert_array_equal(transport(job, "y_owner").receive(2, "small"), small)
            assert time.monotonic() - sent < 5.0  # not behind the 8 s stall
            assert not job.seats["y_owner"].spool.inbox_path(job.id, "x_owner.big").exists()
            np.testing.assert_array_equal(transport(job, "y_owner").receive(0, "big"), big)
        finally:
            stop_all(started)
    assert proxy.count("GET", r"/messages/x_owner\.big$") == 1  # the stalled one finished: not fetched twice


def test_forged_and_misaddressed_messages_are_dropped(job, tmp_path):
    helper = job.seats["helper"]
    y_spool = job.seats["y_owner"].spool
    put = lambda name, body: requests.put(  # noqa: E731 - what a misbehaving helper worker can do at the broker
        f"{job.broker_url}/v1/jobs/{job.id}/messages/y_owner/{name}", data=body, timeout=10,
        headers={"Authorization": f"Bearer {helper.token}"})
    # 1. signed with a key that is not the helper's registered one
    forged = SealedMessage.seal_bytes(b"\x93NUMPY fake", MessageAddress(job.id, "helper", "y_owner", "helper.r1"),
                                      JobSpec.parse(helper.spec).parties["y_owner"].encryption_key,
                                      ed25519.Ed25519PrivateKey.generate())
    assert put("helper.r1", forged).status_code == 201
    # 2. the helper posing as the x-owner: the broker refuses a name of another seat, and a broker that did not
    #    would still see it dropped by the receiving worker (it knows the sender's seat from the broker's listing)
    assert put("x_owner.r1", b"garbage").status_code == 422
    y_spec = JobSpec.parse(job.seats["y_owner"].spec)
    assert Messenger._misaddressed(y_spec, "x_owner.r1", "helper") == (
        "the name does not belong to the sender's seat helper")
    # 3. a genuine message of the helper, but for another slot, replayed under a new name
    genuine = SealedMessage.seal_bytes(b"data", MessageAddress(job.id, "helper", "y_owner", "helper.r0"),
                                       JobSpec.parse(helper.spec).parties["y_owner"].encryption_key,
                                       helper.keys.signing)
    assert put("helper.r2", genuine).status_code == 201

    proc = start_messenger(job, "y_owner", tmp_path)
    try:
        wait_for(lambda: len(y_spool.rejections(job.id)) == 2, "two rejections")
        rejections = y_spool.rejections(job.id)
        assert set(rejections) == {"helper.r1", "helper.r2"}
        assert "signature does not verify" in rejections["helper.r1"]["reason"]
        assert "signature does not verify" in rejections["helper.r2"]["reason"]
        for name in rejections:
            assert not y_spool.inbox_path(job.id, name).exists()
        # the runner waiting for the helper's message says why it never came
        with pytest.raises(SpoolTransportTimeout, match="rejected"):
            transport(job, "y_owner", timeout=0.3).receive(2, "r1")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    log = (tmp_path / "y_owner.messenger.log").read_text()
    assert log.count("dropped message") == 2


def test_keep_alives_are_verified_like_any_message_and_only_genuine_ones_prolong_a_wait(job, tmp_path):
    """The x-owner's runner, still preparing, seals keep-alives that reach the y-owner's inbox through the broker;
    keep-alives the helper's worker did not make (another key), altered on the way, or replayed under another name
    are dropped, logged and recorded like any message, and a wait for the helper ends at the job's timeout."""
    helper, x, y = job.seats["helper"], job.seats["x_owner"], job.seats["y_owner"]
    y_key = JobSpec.parse(helper.spec).parties["y_owner"].encryption_key
    put = lambda name, body: requests.put(  # noqa: E731 - what a misbehaving helper worker (or broker) can do
        f"{job.broker_url}/v1/jobs/{job.id}/messages/y_owner/{name}", data=body, timeout=10,
        headers={"Authorization": f"Bearer {helper.token}"}).status_code

    def sealed(name: str, signer=None) -> bytes:
        return SealedMessage.seal_bytes(b'{"phase": "queued"}', MessageAddress(job.id, "helper", "y_owner", name),
                                        y_key, signer or helper.keys.signing)

    assert put("helper.preparing.1", sealed("helper.preparing.1", ed25519.Ed25519PrivateKey.generate())) == 201
    altered = bytearray(sealed("helper.preparing.2"))
    altered[-5] ^= 1
    assert put("helper.preparing.2", bytes(altered)) == 201
    assert put("helper.preparing.3", sealed("helper.preparing.9")) == 201  # genuine, replayed under another name
    assert put("x_owner.preparing.4", sealed("x_owner.preparing.4")) == 422  # the broker: not the helper's name

    stop = threading.Event()
    keepalives = KeepAlives(x.spool, x.keys, stop)
    started = [start_messenger(job, "x_owner", tmp_path), start_messenger(job, "y_owner", tmp_path)]
    try:
        keepalives.begin(JobSpec.parse(x.spec), "loading its data: 3 of 9 MiB")
        wait_for(lambda: y.spool.inbox_path(job.id, "x_owner.preparing.1").exists(), "the x-owner's keep-alive")
        wait_for(lambda: len(y.spool.rejections(job.id)) == 3, "three rejections")
        began = time.monotonic()
        with pytest.raises(SpoolTransportTimeout, match=r"within 2 s; check that worker is running .* nothing came "
                                                        r"from it\); 3 message\(s\) claiming to come from helper "
                                                        r"were rejected"):
            transport(job, "y_owner", timeout=2.0).receive(2, "r1")
        assert time.monotonic() - began < 3.0
    finally:
        stop.set()
        stop_all(started)
    assert json.loads(y.spool.inbox_path(job.id, "x_owner.preparing.1").read_bytes()) == {
        "phase": "loading its data: 3 of 9 MiB"}
    rejections = y.spool.rejections(job.id)
    assert set(rejections) == {"helper.preparing.1", "helper.preparing.2", "helper.preparing.3"}
    assert "signature does not verify" in rejections["helper.preparing.1"]["reason"]
    assert "fails authentication" in rejections["helper.preparing.2"]["reason"]
    assert "signature does not verify" in rejections["helper.preparing.3"]["reason"]
    assert not any(name.startswith("helper.") for name in y.spool.inbox_names(job.id))
    assert (tmp_path / "y_owner.messenger.log").read_text().count("dropped message helper.preparing.") == 3


def test_a_partners_oversized_keep_alive_is_refused_unread(job, tmp_path):
    """A genuine keep-alive (the helper's own key) far larger than any a worker sends: dropped before download,
    with a trace naming its size, never written to the inbox (where the runner used to read it whole)."""
    helper, y = job.seats["helper"], job.seats["y_owner"]
    y_key = JobSpec.parse(helper.spec).parties["y_owner"].encryption_key
    body = json.dumps({"phase": "A" * (4 << 20)}).encode()
    sealed = SealedMessage.seal_bytes(body, MessageAddress(job.id, "helper", "y_owner", "helper.preparing.1"), y_key,
                                      helper.keys.signing)
    assert requests.put(f"{job.broker_url}/v1/jobs/{job.id}/messages/y_owner/helper.preparing.1", data=sealed,
                        headers={"Authorization": f"Bearer {helper.token}"}, timeout=10).status_code == 201
    started = [start_messenger(job, "y_owner", tmp_path)]
    try:
        wait_for(lambda: "helper.preparing.1" in y.spool.rejections(job.id), "the keep-alive's rejection")
    finally:
        stop_all(started)
    reason = y.spool.rejections(job.id)["helper.preparing.1"]["reason"]
    assert f"a keep-alive of {len(sealed)} bytes; keep-alives are at most" in reason
    assert "helper.preparing.1" not in y.spool.inbox_names(job.id)


def test_sigterm_stops_the_messenger_within_two_seconds(job, tmp_path):
    proc = start_messenger(job, "y_owner", tmp_path)
    try:
        log = tmp_path / "y_owner.messenger.log"
        wait_for(lambda: log.exists() and "relaying messages" in log.read_text(), "the messenger to start")
        time.sleep(0.5)  # now inside a long-poll at the broker
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - started < 2.0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)


def test_a_second_copy_of_a_received_name_is_verified(job, tmp_path):
    helper = job.seats["helper"]
    y = job.seats["y_owner"]
    y_key = JobSpec.parse(helper.spec).parties["y_owner"].encryption_key
    headers = {"Authorization": f"Bearer {helper.token}"}

    def put(name: str, body: bytes) -> int:
        return requests.put(f"{job.broker_url}/v1/jobs/{job.id}/messages/y_owner/{name}", data=body, timeout=10,
                            headers=headers).status_code

    def waiting() -> list:
        return requests.get(f"{job.broker_url}/v1/jobs/{job.id}/messages", timeout=10,
                            headers={"Authorization": f"Bearer {y.token}"}).json()

    def sealed(name: str, plaintext: bytes, signer=None) -> bytes:
        return SealedMessage.seal_bytes(plaintext, MessageAddress(job.id, "helper", "y_owner", name), y_key,
                                        signer or helper.keys.signing)

    genuine = {name: sealed(name, f"genuine {name}".encode()) for name in ("helper.r1", "helper.r2", "helper.r3")}
    proc = start_messenger(job, "y_owner", tmp_path)
    try:
        for name, body in genuine.items():
            assert put(name, body) == 201
        wait_for(lambda: all(y.spool.inbox_path(job.id, n).exists() for n in genuine) and waiting() == [],
                 "the genuine messages")
        # 1. the same message again (as after a crash before the acknowledgement): dropped quietly
        assert put("helper.r1", genuine["helper.r1"]) == 201
        # 2. a forgery under a received name, arriving after the genuine one
        assert put("helper.r2", sealed("helper.r2", b"forged", ed25519.Ed25519PrivateKey.generate())) == 201
        # 3. the sender's own key, but other content under a received name
        assert put("helper.r3", sealed("helper.r3", b"other content")) == 201
        wait_for(lambda: waiting() == [] and len(y.spool.rejections(job.id)) == 2, "the second copies")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    rejections = y.spool.rejections(job.id)
    assert set(rejections) == {"helper.r2", "helper.r3"}
    assert "second copy" in rejections["helper.r2"]["reason"]
    assert "signature does not verify" in rejections["helper.r2"]["reason"]
    assert "different message" in rejections["helper.r3"]["reason"]
    for name in genuine:  # the first, genuine message is what the runner reads
        with open(y.spool.inbox_path(job.id, name), "rb") as handle:
            assert handle.read() == f"genuine {name}".encode()
    log = (tmp_path / "y_owner.messenger.log").read_text()
    assert "dropped a second copy of helper.r1" in log
    assert "dropped message helper.r2" in log and "dropped message helper.r3" in log
    assert "other content" not in log and "forged" not in log
    # Other content under its own signature is proof the sender broke the protocol (a forgery is not): whichever copy
    # came first was used, so the job has no result to trust and ends in Error, naming that worker.
    assert rejections["helper.r3"].get("conflict") is True and "conflict" not in rejections["helper.r2"]
    with pytest.raises(PartnerMessageInvalid, match=r"^the helper worker \(organization [^)]+\) sent two different "
                                                    r"messages under the name 'helper.r3', both sealed and signed"):
        transport(job, "y_owner").check_partner()
    with pytest.raises(PartnerMessageInvalid, match="helper.r3"):
        transport(job, "y_owner").check_partner("helper.r3")
    transport(job, "y_owner").check_partner("helper.r2")  # a forgery, dropped: no reason to end the job


def test_many_messages_of_one_job_are_all_confirmed_once(job, tmp_path):
    x_spool = job.seats["x_owner"].spool
    arrays = {f"block{i}": np.full(300_000, i, dtype=np.uint64) for i in range(12)}
    started = [start_messenger(job, "x_owner", tmp_path), start_messenger(job, "y_owner", tmp_path)]
    try:
        with transport(job, "x_owner") as sender:
            for name, array in arrays.items():
                sender.send(1, name, array)
        receiver = transport(job, "y_owner")
        for name, array in arrays.items():
            np.testing.assert_array_equal(receiver.receive(0, name), array)
        wait_for(lambda: not x_spool.pending_outbox(), "every message confirmed")
    finally:
        for proc in started:
            proc.send_signal(signal.SIGTERM)
        for proc in started:
            proc.wait(timeout=10)
    sent = {p.name: p.stat().st_size for p in (x_spool.root / "outbox" / job.id / "y_owner").iterdir()}
    assert sent == {f"x_owner.{name}.sent": 0 for name in arrays}  # names kept (no re-sealing), bytes freed
    log = (tmp_path / "x_owner.messenger.log").read_text()
    assert sum(log.count(f"sent x_owner.{name} to y_owner") for name in arrays) == len(arrays)


def test_a_message_that_would_leave_the_spool_short_of_room_waits_at_the_broker(job, tmp_path, monkeypatch, caplog):
    """Inbox files stay until their job ends, so a peer could fill the spool volume: below the reserve a message
    stays at the broker (said once, looked at again after a pause, not in a tight loop) and is taken once there is
    room. The reserve is set above the volume's free space here, then lowered, instead of filling a disk."""
    import threading

    from services.worker import health
    from services.worker import messenger as messenger_module
    from services.worker.broker_client import BrokerClient

    monkeypatch.setattr(messenger_module, "ROOM_RETRY_SECONDS", 0.5)
    block = np.arange(100_000, dtype=np.uint64)
    _block_at_the_broker(job, tmp_path, block)

    class CountingBroker(BrokerClient):
        lists = 0

        def wait_for_messages(self, job_id, wait):
            CountingBroker.lists += 1
            return super().wait_for_messages(job_id, wait)

    y = job.seats["y_owner"]
    stop = threading.Event()
    run_dir = tmp_path / "y-run"
    run_dir.mkdir()
    messenger = Messenger(y.spool, y.keys, CountingBroker(job.broker_url, y.token, stop=stop), stop, long_poll=1.0,
                          reserve_bytes=y.spool.free_bytes() + 10 * 1024**3, run_dir=run_dir)
    inbox = y.spool.inbox_path(job.id, "x_owner.block")
    with caplog.at_level(logging.INFO, logger="cape.messenger"):
        _run_receiver(messenger, 1.6)
        assert not inbox.exists() and 2 <= CountingBroker.lists <= 5, CountingBroker.lists
        held = [r.getMessage() for r in caplog.records if "waits at the broker" in r.getMessage()]
        assert len(held) == 1 and held[0].startswith(f"message x_owner.block (1 MiB) of job {job.id} waits at the "
                                                     "broker: the spool volume (CAPE_SPOOL_DIR) has ")
        assert " MiB free and the messenger keeps " in held[0]
        assert health.SPOOL_SHORT_OF_ROOM.read(run_dir)["message"] == held[0]  # `health` fails, `status` says it
        listed = requests.get(f"{job.broker_url}/v1/jobs/{job.id}/messages", timeout=10,
                              headers={"Authorization": f"Bearer {y.token}"}).json()
        assert [m["name"] for m in listed] == ["x_owner.block"]  # not acknowledged: nothing lost

        messenger.reserve_bytes = 0
        messenger.stop.clear()
        _run_receiver(messenger, 1.0)
    assert inbox.exists()
    np.testing.assert_array_equal(transport(job, "y_owner").receive(0, "block"), block)
    assert f"the spool volume has room again; taking the messages of job(s) {job.id}" in caplog.text
    assert health.SPOOL_SHORT_OF_ROOM.read(run_dir) is None


def test_a_spool_that_refuses_the_inbox_file_leaves_the_message_at_the_broker_and_says_so(job, tmp_path, monkeypatch,
                                                                                        caplog):
    """A spool volume that refuses the inbox file (full, read-only, immutable; seen with `chattr +i` on inbox/): the
    receiver logged 'unexpected PermissionError' with a traceback at every retry, `health` stayed healthy, and the
    job's error blamed the sender's worker for a message the broker held all along. Now: one line, the health
    record, the message kept at the broker, and taken once the spool takes writes again."""
    import errno

    from services.worker import health
    from services.worker import messenger as messenger_module

    monkeypatch.setattr(messenger_module, "ROOM_RETRY_SECONDS", 0.3)
    block = np.arange(1000, dtype=np.uint64)
    _block_at_the_broker(job, tmp_path, block)

    y = job.seats["y_owner"]
    inbox = y.spool.inbox_path(job.id, "x_owner.block")
    real_writer = _refuse_the_inbox_file(monkeypatch, inbox, errno.EPERM, "Operation not permitted")
    messenger, run_dir = _y_owner_receiver(job, tmp_path)
    with caplog.at_level(logging.INFO, logger="cape.messenger"):
        _run_receiver(messenger, 1.5)
        assert not inbox.exists()
        assert "Traceback" not in caplog.text and "unexpected" not in caplog.text, caplog.text
        said = [r.getMessage() for r in caplog.records if "the spool cannot write it" in r.getMessage()]
        assert said == [f"message x_owner.block of job {job.id} waits at the broker: the spool cannot write it "
                        f"({inbox}: Operation not permitted); make CAPE_SPOOL_DIR writable by this worker"], caplog.text
        assert health.SPOOL_SHORT_OF_ROOM.read(run_dir)["message"] == said[0]  # `health` fails, `status` says it
        listed = requests.get(f"{job.broker_url}/v1/jobs/{job.id}/messages", timeout=10,
                              headers={"Authorization": f"Bearer {y.token}"}).json()
        assert [m["name"] for m in listed] == ["x_owner.block"]  # not acknowledged: nothing lost

        monkeypatch.setattr(messenger_module, "atomic_writer", real_writer)  # the operator made it writable
        messenger.stop.clear()
        _run_receiver(messenger, 1.0)
    np.testing.assert_array_equal(transport(job, "y_owner").receive(0, "block"), block)
    assert "the spool takes messages again" in caplog.text
    assert health.SPOOL_SHORT_OF_ROOM.read(run_dir) is None


def test_a_message_whose_inbox_the_runner_removes_as_it_finishes_is_no_refusal(job, tmp_path, monkeypatch, caplog):
    """The runner's end of a job removes its inbox folder; a message written into it at that moment failed with
    FileNotFoundError: an ERROR with a traceback in a good run, and now it would read as a spool refusing writes."""
    import errno

    from services.worker import health
    from services.worker import messenger as messenger_module

    _block_at_the_broker(job, tmp_path, np.arange(10, dtype=np.uint64))

    y = job.seats["y_owner"]
    inbox = y.spool.inbox_path(job.id, "x_owner.block")

    def finished_under_the_write(final, **kwargs):
        y.spool.mark_done(job.id, "completed")
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(final))

    monkeypatch.setattr(messenger_module, "atomic_writer", finished_under_the_write)
    messenger, run_dir = _y_owner_receiver(job, tmp_path)
    with caplog.at_level(logging.INFO, logger="cape.messenger"):
        _run_receiver(messenger, 1.0)
    assert not inbox.exists()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [], caplog.text
    assert health.SPOOL_SHORT_OF_ROOM.read(run_dir) is None


def test_a_job_description_the_spool_cannot_read_for_a_moment_is_read_again(tmp_path, monkeypatch, caplog):
    """An OSError (too many open files, say) was taken as a bad description: the job got no message for good."""
    import errno

    from services.worker.broker_client import BrokerClient
    from services.worker.keys import WorkerKeys
    from services.worker.messenger import Messenger
    from services.worker.spool import Spool
    from tests.support.worker_messaging import worker_job

    keys = {s: WorkerKeys.load_or_create(tmp_path / s) for s in ("x_owner", "y_owner", "helper")}
    spool = Spool(tmp_path / "spool")
    messenger = Messenger(spool, keys["y_owner"], BrokerClient("http://127.0.0.1:9/broker", "tokenid,c2VjcmV0"))
    spool.put_job(worker_job(keys, "y_owner", "e" * 32))
    real_read = Spool.read_job
    failures = iter([OSError(errno.EMFILE, "Too many open files")] * 2)

    def flaky(self, job_id):
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return real_read(self, job_id)

    monkeypatch.setattr(Spool, "read_job", flaky)
    with caplog.at_level("WARNING", logger="cape.messenger"):
        assert messenger.receiving_jobs() == [] and messenger.receiving_jobs() == []
        assert [spec.id for spec in messenger.receiving_jobs()] == ["e" * 32]
    assert caplog.text.count("cannot read its description from the spool (Too many open files)") == 1


def test_the_short_of_room_record_goes_when_the_held_job_ends(tmp_path):
    """A job held for room that then ended (its messages removed, room back) is never asked again: its record kept
    `health` failing until the messenger restarted."""
    from services.worker import health
    from services.worker.broker_client import BrokerClient
    from services.worker.keys import WorkerKeys
    from services.worker.messenger import Messenger
    from services.worker.spool import Spool
    from tests.support.worker_messaging import worker_job

    keys = {s: WorkerKeys.load_or_create(tmp_path / s) for s in ("x_owner", "y_owner", "helper")}
    spool, run_dir = Spool(tmp_path / "spool"), tmp_path / "run"
    run_dir.mkdir()
    messenger = Messenger(spool, keys["y_owner"], BrokerClient("http://127.0.0.1:9/broker", "tokenid,c2VjcmV0"),
                          reserve_bytes=spool.free_bytes() + 10 * 1024**3, run_dir=run_dir)
    job = worker_job(keys, "y_owner", "d" * 32)
    spool.put_job(job)
    spec = messenger.receiving_jobs()[0]
    assert messenger._room_for(spec, "x_owner.m", 1024) is False
    assert health.SPOOL_SHORT_OF_ROOM.read(run_dir) is not None
    spool.mark_ended(spec.id, "Error")
    assert messenger.receiving_jobs() == []
    assert health.SPOOL_SHORT_OF_ROOM.read(run_dir) is None


def test_receiving_jobs_keeps_only_the_active_specs_and_reports_a_bad_one_once(tmp_path, caplog):
    from services.worker.broker_client import BrokerClient
    from services.worker.keys import WorkerKeys
    from services.worker.messenger import Messenger
    from services.worker.spool import Spool

    spool = Spool(tmp_path / "spool")
    messenger = Messenger(spool, WorkerKeys.load_or_create(tmp_path / "state"),
                          BrokerClient("http://127.0.0.1:9/broker", "tokenid,c2VjcmV0"))  # never called here
    spool.put_job({"id": "bad1", "seat": "x_owner"})  # not a WorkerJob the messenger can use
    with caplog.at_level("ERROR", logger="services.worker.messenger"):
        assert messenger.receiving_jobs() == [] and messenger.receiving_jobs() == []
    assert [r.getMessage().startswith("job bad1: cannot receive its messages") for r in caplog.records] == [True]
    spool.mark_ended("bad1", "Stopped")
    assert messenger.receiving_jobs() == [] and messenger._specs == {}  # nothing kept of a job no longer active


def test_a_malformed_job_description_does_not_stop_receiving_for_the_others(tmp_path, caplog):
    """A party entry that is not an object raised AttributeError out of every pass: no job got its messages."""
    from services.worker.broker_client import BrokerClient
    from services.worker.keys import WorkerKeys
    from services.worker.messenger import Messenger
    from services.worker.spool import Spool
    from tests.support.worker_messaging import worker_job

    keys = {s: WorkerKeys.load_or_create(tmp_path / s) for s in ("x_owner", "y_owner", "helper")}
    spool = Spool(tmp_path / "spool")
    messenger = Messenger(spool, keys["x_owner"], BrokerClient("http://127.0.0.1:9/broker", "tokenid,c2VjcmV0"))
    bad = worker_job(keys, "x_owner", "a" * 32)
    bad["parties"]["helper"] = "neutral"
    spool.put_job(bad)
    spool.put_job(worker_job(keys, "x_owner", "b" * 32))
    with caplog.at_level("ERROR", logger="services.worker.messenger"):
        assert [spec.id for spec in messenger.receiving_jobs()] == ["b" * 32]
    assert [r.getMessage() for r in caplog.records] == [
        f"job {'a' * 32}: cannot receive its messages: parties.helper must be an object with the seat's "
        "organization and keys"]


def _block_at_the_broker(job, tmp_path, block: np.ndarray) -> None:
    """The x-owner's messenger puts its message "block" for the y-owner at the broker, and stops."""
    sender = start_messenger(job, "x_owner", tmp_path)
    try:
        with transport(job, "x_owner") as x_sender:
            x_sender.send(1, "block", block)
        spool = job.seats["x_owner"].spool
        wait_for(lambda: not spool.pending_outbox() and spool.outbox_has(job.id, "y_owner", "x_owner.block"),
                 "the x_owner's message to be confirmed by the broker")
    finally:
        sender.send_signal(signal.SIGTERM)
        sender.wait(timeout=10)


def _y_owner_receiver(job, tmp_path) -> tuple[Messenger, Path]:
    """An in-process messenger of the y-owner (run its receiver with `_run_receiver`) and its run dir."""
    from services.worker.broker_client import BrokerClient

    y = job.seats["y_owner"]
    run_dir = tmp_path / "y-run"
    run_dir.mkdir()
    stop = threading.Event()
    return Messenger(y.spool, y.keys, BrokerClient(job.broker_url, y.token, stop=stop), stop, long_poll=0.5,
                     run_dir=run_dir), run_dir


def _refuse_the_inbox_file(monkeypatch, inbox: Path, code: int, text: str):
    """Have the messenger's writes of `inbox` refused as a spool volume would; returns the real writer."""
    from services.worker import messenger as messenger_module
    from services.worker import spool as spool_module

    real_writer = spool_module.atomic_writer

    def refusing_writer(final, **kwargs):
        if final == inbox:
            raise PermissionError(code, text, str(final))
        return real_writer(final, **kwargs)

    monkeypatch.setattr(messenger_module, "atomic_writer", refusing_writer)
    return real_writer


def _run_receiver(messenger, seconds: float) -> None:
    import threading

    loop = threading.Thread(target=messenger.receiver_loop, daemon=True)
    loop.start()
    time.sleep(seconds)
    messenger.stop.set()
    loop.join(timeout=5)
    assert not loop.is_alive()


def test_with_several_active_jobs_the_receiver_long_polls_them_together(cape_server, tmp_path, monkeypatch):
    """Against the real broker: one long poll covers both jobs (each job in turn made ~18 lists a second)."""
    import threading
    from types import SimpleNamespace

    from services.worker.broker_client import BrokerClient
    from services.worker.keys import WorkerKeys
    from services.worker.messenger import Messenger
    from services.worker.spool import Spool
    from tests.support.server import build_job_world

    world = build_job_world(cape_server)
    second = world["user"]["yorg"].post("/v1/projects/demo/jobs", json={
        "type": "linear_regression", "x": {"dataview": "xs", "columns": ["a", "b"]},
        "y": {"dataview": "ys", "column": "t"}, "model_owner": "yorg", "timeout": 600}).json()["id"]
    for label in ("xorg", "yorg"):
        assert world["user"][label].post(f"/v1/jobs/{second}/approve").status_code == 200

    class CountingBroker(BrokerClient):
        calls: list[str] = []

        def wait_for_messages(self, job_id, wait):
            self.calls.append("one job")
            return super().wait_for_messages(job_id, wait)

        def wait_for_jobs_messages(self, job_ids, wait):
            self.calls.append("several jobs")
            return super().wait_for_jobs_messages(job_ids, wait)

    stop = threading.Event()
    broker = CountingBroker(f"{cape_server.url}/broker", world["orgs"]["yorg"]["organization_token"], stop=stop)
    messenger = Messenger(Spool(tmp_path / "spool"), WorkerKeys.load_or_create(tmp_path / "state"), broker, stop,
                          long_poll=1.0)
    jobs = [SimpleNamespace(id=world["job"]["id"]), SimpleNamespace(id=second)]
    monkeypatch.setattr(messenger, "receiving_jobs", lambda: jobs)
    _run_receiver(messenger, 2.5)
    assert "one job" not in broker.calls and 2 <= broker.calls.count("several jobs") <= 4, broker.calls


def test_a_broker_that_lists_one_job_at_a_time_is_polled_in_rounds_with_pauses(tmp_path, monkeypatch, caplog):
    """An older cape-server (no `GET /messages?job=...`): each job in turn, pausing between rounds that found
    nothing, said once."""
    from services.worker import messenger as messenger_module
    from services.worker.broker_client import BrokerClient, BrokerError

    class OlderBroker(BrokerClient):
        lists: list[tuple[str, float]] = []

        def wait_for_messages(self, job_id, wait):
            self.lists.append((job_id, wait))
            return []

        def wait_for_jobs_messages(self, job_ids, wait):
            raise BrokerError("list messages of 2 jobs: the broker answered 404 no such endpoint", 404)

    messenger, broker = _fake_broker_messenger(tmp_path, monkeypatch, OlderBroker, long_poll=1.0)
    with caplog.at_level(logging.WARNING, logger="cape.messenger"):
        _run_receiver(messenger, 0.5)
    rounds = 0.5 / messenger_module.MULTI_JOB_POLL_SECONDS
    assert {job for job, _ in broker.lists} == {"job1", "job2"}
    assert all(wait == 0.0 for _, wait in broker.lists)
    assert 4 <= len(broker.lists) <= 2 * (rounds + 2)  # not a tight loop (thousands of lists in half a second)
    assert caplog.text.count("cannot list several jobs' messages at once") == 1


def _fake_broker_messenger(tmp_path, monkeypatch, broker_class, jobs=("job1", "job2"), long_poll=0.2):
    """A Messenger over a broker class answering at once (unit test: no server), with `jobs` active."""
    import threading
    from types import SimpleNamespace

    from services.worker.keys import WorkerKeys
    from services.worker.messenger import Messenger
    from services.worker.spool import Spool

    stop = threading.Event()
    broker = broker_class("http://127.0.0.1:9/broker", "tokenid,c2VjcmV0", stop=stop)
    messenger = Messenger(Spool(tmp_path / "spool"), WorkerKeys.load_or_create(tmp_path / "state"), broker, stop,
                          long_poll=long_poll)
    monkeypatch.setattr(messenger, "receiving_jobs", lambda: [SimpleNamespace(id=job) for job in jobs])
    return messenger, broker


def test_stalled_downloads_of_several_jobs_hold_a_pass_up_once_not_once_per_job(tmp_path, monkeypatch):
    """A pass over several jobs waits for their downloads together, up to TAKE_WAIT_SECONDS: a wait per job made a
    pass with stalled downloads in three jobs last three seconds before the next listing."""
    import threading

    from services.worker import messenger as messenger_module
    from services.worker.broker_client import BrokerClient

    jobs = ("job1", "job2", "job3")

    class ListingBroker(BrokerClient):
        def wait_for_jobs_messages(self, job_ids, wait):
            return {job: [{"name": "x_owner.m", "size": 10, "from_seat": "x_owner"}] for job in job_ids}, {}

    messenger, _ = _fake_broker_messenger(tmp_path, monkeypatch, ListingBroker, jobs=jobs)
    released = threading.Event()
    started: list[str] = []

    def stalled(spec, entry):
        started.append(spec.id)
        return released.wait(10)  # a download that trickles until the test lets it finish

    monkeypatch.setattr(messenger, "_accept", stalled)
    monkeypatch.setattr(messenger_module, "TAKE_WAIT_SECONDS", 0.5)
    specs = messenger.receiving_jobs()
    try:
        began = time.monotonic()
        assert messenger.receive_many(specs, 0.0) == 0
        took = time.monotonic() - began
        assert 0.45 <= took < 0.9, took  # one wait for the three jobs (it was 1.5 s, 0.5 s per job)
        assert sorted(started) == list(jobs)
        began = time.monotonic()
        assert messenger.receive_many(specs, 0.0) == 0  # the next pass skips them, waits once again
        assert time.monotonic() - began < 0.9 and len(started) == 3  # not downloaded twice
        released.set()
        assert messenger.receive_many(specs, 0.0) == 3  # collected once they finish
    finally:
        released.set()
        messenger.stop.set()


def test_jobs_the_broker_refuses_all_are_not_asked_again_at_once(tmp_path, monkeypatch, caplog):
    """Every job refused (unknown to the broker, not this seat's): a pause as long as a long poll, not ~490
    requests a second; each refusal said once."""
    from services.worker.broker_client import BrokerClient

    class RefusingBroker(BrokerClient):
        calls = 0

        def wait_for_jobs_messages(self, job_ids, wait):
            RefusingBroker.calls += 1
            return {}, {job: {"code": "job_not_found", "message": f"no job '{job}'"} for job in job_ids}

    messenger, broker = _fake_broker_messenger(tmp_path, monkeypatch, RefusingBroker)
    with caplog.at_level(logging.WARNING, logger="cape.messenger"):
        _run_receiver(messenger, 1.0)
    assert 3 <= RefusingBroker.calls <= 7  # one per 0.2 s long poll's worth
    assert caplog.text.count("the broker refuses job job1 (job_not_found): no job 'job1'") == 1


@pytest.mark.parametrize("code, falls_back", [(None, True), ("not_found", True), ("broker_not_here", False)])
def test_only_a_broker_without_the_route_is_polled_job_by_job_and_asked_again_later(tmp_path, monkeypatch, code,
                                                                                    falls_back):
    """A 404 that is a Cape error (CAPE_BROKER at a coordinator running alone) is reported and retried, not taken
    for an older broker; an older broker is asked again after MULTI_LIST_RETRY_SECONDS."""
    from services.worker import messenger as messenger_module
    from services.worker.broker_client import BrokerClient, BrokerError

    class NoRouteBroker(BrokerClient):
        multi = 0
        single = 0

        def wait_for_jobs_messages(self, job_ids, wait):
            NoRouteBroker.multi += 1
            raise BrokerError("list messages of 2 jobs: the broker answered 404", 404, code)

        def wait_for_messages(self, job_id, wait):
            NoRouteBroker.single += 1
            return []

    monkeypatch.setattr(messenger_module, "MULTI_LIST_RETRY_SECONDS", 0.3)
    monkeypatch.setattr(messenger_module, "MAX_BACKOFF_SECONDS", 0.2)
    messenger, _ = _fake_broker_messenger(tmp_path, monkeypatch, NoRouteBroker)
    _run_receiver(messenger, 1.0)
    if falls_back:
        assert NoRouteBroker.single >= 4 and 2 <= NoRouteBroker.multi <= 5  # asked again every 0.3 s
    else:
        assert NoRouteBroker.single == 0 and NoRouteBroker.multi >= 2


def test_receiving_jobs_puts_the_runners_jobs_first(tmp_path):
    """The multi-job listing covers the first 50: a running job's spec, rewritten when it started, came last."""
    from services.worker.broker_client import BrokerClient
    from services.worker.keys import WorkerKeys
    from services.worker.messenger import Messenger
    from services.worker.spool import Spool
    from tests.support.worker_messaging import worker_job

    spool = Spool(tmp_path / "spool")
    keys = {seat: WorkerKeys.load_or_create(tmp_path / seat) for seat in ("x_owner", "y_owner", "helper")}
    for job_id, approved in (("b-job", "2026-01-02"), ("a-job", "2026-01-03"), ("c-job", "2026-01-01"),
                             ("q-job", "2026-01-01")):
        spool.put_job(worker_job(keys, "x_owner", job_id, approved))
    spool.claim("a-job", working=True)
    spool.claim("q-job")  # taken, queued for a slot: after the one working, before those not taken
    messenger = Messenger(spool, keys["x_owner"], BrokerClient("http://127.0.0.1:9/broker", "tokenid,c2VjcmV0"))
    assert [spec.id for spec in messenger.receiving_jobs()] == ["a-job", "q-job", "c-job", "b-job"]


@pytest.mark.parametrize("after_the_failure, said_again", [(0, False), (1, True)])
def test_the_broker_is_said_reachable_again_only_after_a_pass_that_reached_it(tmp_path, monkeypatch, caplog,
                                                                               after_the_failure, said_again):
    """A pass with nothing to send asks the broker nothing: it is no evidence the broker is back (the line came
    between two failures)."""
    import logging
    import threading

    from services.worker.broker_client import BrokerClient, BrokerUnavailable
    from services.worker.keys import WorkerKeys
    from services.worker.messenger import Messenger
    from services.worker.spool import Spool

    caplog.set_level(logging.INFO, logger="cape.messenger")
    stop = threading.Event()
    broker = BrokerClient("http://127.0.0.1:9/broker", "tokenid,c2VjcmV0", stop=stop)
    messenger = Messenger(Spool(tmp_path / "spool"), WorkerKeys.load_or_create(tmp_path / "state"), broker, stop)
    passes: list[int] = []

    def send_pending() -> int:  # unit test: the first pass fails, the next ones send `after_the_failure` messages
        passes.append(1)
        if len(passes) == 1:
            raise BrokerUnavailable("cannot reach the broker (test)")
        return after_the_failure

    monkeypatch.setattr(messenger, "send_pending", send_pending)
    loop = threading.Thread(target=messenger.sender_loop, daemon=True)
    loop.start()
    deadline = time.monotonic() + 10
    while len(passes) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    messenger.spool.changes.wake()
    loop.join(timeout=5)
    assert len(passes) >= 3
    assert ("sending: the broker is reachable again" in caplog.text) is said_again, caplog.text


def test_an_unavailable_broker_is_said_now_and_then_and_recorded_for_status(tmp_path, monkeypatch, caplog):
    """One warning when the broker becomes unavailable and one per STILL_FAILING_SAID_EVERY_SECONDS after (one per
    retry made an outage of hours hundreds of lines); `cape-worker status` reads the record while it lasts."""
    import threading

    from services.worker import health
    from services.worker import messenger as messenger_module
    from services.worker.broker_client import BrokerClient, BrokerUnavailable
    from services.worker.keys import WorkerKeys
    from services.worker.spool import Spool

    monkeypatch.setattr(messenger_module, "MAX_BACKOFF_SECONDS", 0.05)
    monkeypatch.setattr(messenger_module, "STILL_FAILING_SAID_EVERY_SECONDS", 0.6)
    caplog.set_level(logging.INFO, logger="cape.messenger")
    stop = threading.Event()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    broker = BrokerClient("http://127.0.0.1:9/broker", "tokenid,c2VjcmV0", stop=stop)
    messenger = Messenger(Spool(tmp_path / "spool"), WorkerKeys.load_or_create(tmp_path / "state"), broker, stop,
                          run_dir=run_dir)
    failing_until = time.monotonic() + 1.5
    tries: list[float] = []
    records: list[dict | None] = []

    def send_pending() -> int:  # unit test: the broker fails for 1.5 s, then takes a message
        now = time.monotonic()  # one reading: a try counted as failed is one that failed (it raced once in CI)
        tries.append(now)
        records.append(health.BROKER_UNREACHABLE.read(run_dir))
        if now < failing_until:
            raise BrokerUnavailable("put message x_owner.r1 for y_owner: cannot reach the broker (test)")
        return 1

    monkeypatch.setattr(messenger, "send_pending", send_pending)
    loop = threading.Thread(target=messenger.sender_loop, daemon=True)
    loop.start()
    deadline = time.monotonic() + 10
    while not caplog.text.count("reachable again") and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    messenger.spool.changes.wake()
    loop.join(timeout=5)
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(tries) >= 15 and 2 <= len(said) <= 4, (len(tries), said)
    assert said[0].startswith("sending: put message x_owner.r1 for y_owner: cannot reach the broker (test); retrying")
    assert "(failing for 1 s, " in said[-1] or "(failing for 0 s, " in said[-1]
    failed = [at for at in tries if at < failing_until]
    during_span = failed[-1] - failed[0]  # the outage as its failed tries saw it, not up to the next try
    during = [record for at, record in zip(tries, records) if at < failing_until][1:]  # the first try comes first
    assert during and all(record is not None and record["message"] == "put message x_owner.r1 for y_owner: cannot "
                          "reach the broker (test)" for record in during), during
    back = re.search(r"sending: the broker is reachable again \(after (\d+) failed tries over (\d) s\)", caplog.text)
    assert back and int(back[1]) == len(failed) and int(back[2]) == round(during_span), caplog.text
    assert health.BROKER_UNREACHABLE.read(run_dir) is None  # cleared once a put went through (read after the loop)


def test_a_refused_inbox_files_record_goes_when_its_job_ends(job, tmp_path, monkeypatch):
    """The spool refused a message's inbox file, and the job then ended (its partners gave up on this worker): no
    message of it comes any more, so none was placed to clear the record, and `health` failed on an idle worker
    whose spool was writable again until a new job brought a message in."""
    import errno

    from services.worker import health
    from services.worker import messenger as messenger_module

    monkeypatch.setattr(messenger_module, "ROOM_RETRY_SECONDS", 0.3)
    _block_at_the_broker(job, tmp_path, np.arange(10, dtype=np.uint64))

    y = job.seats["y_owner"]
    inbox = y.spool.inbox_path(job.id, "x_owner.block")
    real_writer = _refuse_the_inbox_file(monkeypatch, inbox, errno.EROFS, "Read-only file system")
    messenger, run_dir = _y_owner_receiver(job, tmp_path)
    _run_receiver(messenger, 1.0)
    assert health.SPOOL_SHORT_OF_ROOM.read(run_dir) is not None
    monkeypatch.setattr(messenger_module, "atomic_writer", real_writer)  # the operator made it writable again
    y.spool.mark_done(job.id, "error", "no message from the x_owner worker")  # meanwhile the job ended
    messenger.stop.clear()
    _run_receiver(messenger, 1.0)
    assert health.SPOOL_SHORT_OF_ROOM.read(run_dir) is None
