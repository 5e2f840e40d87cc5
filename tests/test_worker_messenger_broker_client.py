"""The broker client's retries: connection errors and 5xx are retried with backoff, then reported clearly."""
from __future__ import annotations

import http.server
import threading
import time

import pytest

from services.worker.broker_client import BrokerClient, BrokerConflict, BrokerUnavailable
from services.worker.spool import InvalidName
from tests.support.aws import free_port

TOKEN = "tok1,c2VjcmV0LXNlY3JldC1zZWNyZXQ="


class FlakyBroker(http.server.BaseHTTPRequestHandler):
    """Answers 503 to the first `failures` PUTs, then 201; records the bodies it got."""

    failures = 2
    bodies: list[bytes] = []
    status_after = 201

    def do_PUT(self):  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).bodies.append(body)
        status = 503 if len(type(self).bodies) <= type(self).failures else type(self).status_after
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def flaky_broker():
    FlakyBroker.bodies = []
    FlakyBroker.failures = 2
    FlakyBroker.status_after = 201
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FlakyBroker)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/broker"
    server.shutdown()
    server.server_close()


def test_5xx_is_retried_with_the_whole_body_each_time(flaky_broker, tmp_path):
    (tmp_path / "m.sealed").write_bytes(b"sealed-bytes" * 1000)
    client = BrokerClient(flaky_broker, TOKEN, attempts=5, backoff_base=0.01)
    assert client.put("job1", "y_owner", "x_owner.r1", tmp_path / "m.sealed") is True
    assert FlakyBroker.bodies == [b"sealed-bytes" * 1000] * 3


def test_409_is_a_conflict_not_a_retry(flaky_broker, tmp_path):
    FlakyBroker.failures, FlakyBroker.status_after = 0, 409
    (tmp_path / "m.sealed").write_bytes(b"x")
    with pytest.raises(BrokerConflict, match="different bytes under 'x_owner.r1'"):
        BrokerClient(flaky_broker, TOKEN, backoff_base=0.01).put("job1", "y_owner", "x_owner.r1",
                                                                tmp_path / "m.sealed")
    assert len(FlakyBroker.bodies) == 1


def test_an_unreachable_broker_is_reported_after_bounded_retries(tmp_path):
    (tmp_path / "m.sealed").write_bytes(b"x")
    client = BrokerClient(f"http://127.0.0.1:{free_port()}/broker", TOKEN, attempts=3, backoff_base=0.05)
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable, match="cannot reach the broker.*check CAPE_BROKER") as info:
        client.put("job1", "y_owner", "x_owner.r1", tmp_path / "m.sealed")
    assert time.monotonic() - started < 5
    assert "c2VjcmV0" not in str(info.value)


def test_a_stop_request_cuts_the_backoff_short(tmp_path):
    stop = threading.Event()
    client = BrokerClient(f"http://127.0.0.1:{free_port()}/broker", TOKEN, attempts=50, backoff_base=5.0, stop=stop)
    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        client.wait_for_messages("job1", wait=1)
    assert time.monotonic() - started < 3


def test_names_are_validated_before_they_reach_a_url(tmp_path):
    client = BrokerClient("http://127.0.0.1:9/broker", TOKEN)
    with pytest.raises(InvalidName, match="message name"):
        with client.stream("job1", "../../v1/jobs"):
            pass
    with pytest.raises(InvalidName, match="job id"):
        client.wait_for_messages("../x", wait=0)
    assert not (tmp_path / "x").exists()


class CutOffBroker(http.server.BaseHTTPRequestHandler):
    """Announces a 100 000-byte message body, sends part of it, then drops the connection."""

    def do_GET(self):  # noqa: N802 - http.server's naming
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", "100000")
        self.end_headers()
        self.wfile.write(b"CAPESM01" + b"\0" * 30_000)
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):
        pass


def test_a_download_cut_off_midway_is_unavailable_not_a_short_message():
    # A short read would look like a truncated (forged) message and be rejected and acknowledged; a broken
    # connection must instead leave the message at the broker for a later attempt.
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CutOffBroker)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = BrokerClient(f"http://127.0.0.1:{server.server_address[1]}/broker", TOKEN)
        with pytest.raises(BrokerUnavailable, match="connection to the broker .* broke") as info:
            with client.stream("job1", "x_owner.r1") as source:
                got = b""
                while piece := source.read(16384):
                    got += piece
        assert "c2VjcmV0" not in str(info.value)
    finally:
        server.shutdown()
        server.server_close()
