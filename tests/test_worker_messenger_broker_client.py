"""The broker client's retries: connection errors and 5xx are retried with backoff, then reported clearly."""
from __future__ import annotations

import contextlib
import http.server
import os
import re
import socket
import threading
import time

import pytest

from services.worker import broker_client
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


def _one_connection_server(serve) -> tuple[str, threading.Thread]:  # type: ignore[no-untyped-def]
    """A raw socket server on 127.0.0.1 that hands its first connection to `serve(conn)`; its broker URL."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # small: the sender blocks when it pauses
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def run() -> None:
        with srv:
            srv.settimeout(30)
            conn, _ = srv.accept()
            with conn:
                conn.settimeout(30)
                serve(conn)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return f"http://127.0.0.1:{srv.getsockname()[1]}/broker", thread


def _read_head(conn: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, rest = data.split(b"\r\n\r\n", 1)
    return head, rest


def test_a_body_is_sent_under_the_read_timeout_not_the_connect_timeout(tmp_path, monkeypatch):
    """urllib3 sends a body under the connect timeout: with a receiver pausing longer than it, every attempt broke
    and started again from the first byte (a link under ~200 KiB/s never delivered a large message)."""
    monkeypatch.setattr(broker_client, "CONNECT_TIMEOUT", 0.5)
    body = os.urandom(1 << 20) * 24  # more than the socket buffers hold
    (tmp_path / "m.sealed").write_bytes(body)
    received: list[int] = []

    def serve(conn: socket.socket) -> None:
        head, rest = _read_head(conn)
        length = int(re.search(rb"content-length: *(\d+)", head, re.I).group(1))
        time.sleep(2.0)  # four times the connect timeout without reading
        got = len(rest)
        while got < length and (chunk := conn.recv(1 << 20)):
            got += len(chunk)
        received.append(got)
        conn.sendall(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")

    url, thread = _one_connection_server(serve)
    client = BrokerClient(url, TOKEN, attempts=1)
    started = time.monotonic()
    assert client.put("job1", "y_owner", "x_owner.r1", tmp_path / "m.sealed") is True
    assert time.monotonic() - started >= 2.0
    thread.join(timeout=10)
    assert received == [len(body)]


def test_a_send_that_stalls_is_said_as_a_stalled_link_not_a_tls_port(tmp_path, monkeypatch):
    monkeypatch.setattr(broker_client, "READ_TIMEOUT", 0.5)
    (tmp_path / "m.sealed").write_bytes(b"\0" * (24 << 20))
    release = threading.Event()
    url, thread = _one_connection_server(lambda conn: (_read_head(conn), release.wait(10)))
    client = BrokerClient(url, TOKEN, attempts=1)
    try:
        with pytest.raises(BrokerUnavailable, match="no progress in time: a slow or stalled link") as info:
            client.put("job1", "y_owner", "x_owner.r1", tmp_path / "m.sealed")
        assert "TLS" not in str(info.value)
    finally:
        release.set()
        thread.join(timeout=10)


def test_a_download_that_trickles_is_given_up_at_its_deadline(monkeypatch):
    """Each socket read waits at most the read timeout, so a body trickling a few bytes at a time never ended (and
    held the messages listed with it); the download now has a deadline from its size."""
    monkeypatch.setattr(broker_client, "MIN_DOWNLOAD_SECONDS", 1.0)
    monkeypatch.setattr(broker_client, "MIN_DOWNLOAD_BYTES_PER_SECOND", 1e6)
    done = threading.Event()

    def serve(conn: socket.socket) -> None:
        _read_head(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 100000\r\n\r\n"
                     + b"\0" * 1000)
        with contextlib.suppress(OSError):
            while not done.wait(0.1):
                conn.sendall(b"\0" * 10)

    url, thread = _one_connection_server(serve)
    client = BrokerClient(url, TOKEN, attempts=1)
    started = time.monotonic()
    try:
        with pytest.raises(BrokerUnavailable, match=r"too slow \(its 100000 bytes did not all arrive within 1 s\); "
                                                    "it is downloaded again later"):
            with client.stream("job1", "x_owner.r1", 100_000) as source:
                source.readinto(bytearray(1 << 20))
        assert time.monotonic() - started < 5
    finally:
        done.set()
        thread.join(timeout=10)


def test_a_body_without_its_length_that_ends_short_is_a_cut_not_a_message():
    """The listed size tells a proxy's close-delimited body cut halfway from a whole message."""

    def serve(conn: socket.socket) -> None:
        _read_head(conn)
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n" + b"\0" * 30_000)

    url, thread = _one_connection_server(serve)
    client = BrokerClient(url, TOKEN, attempts=1)
    with pytest.raises(BrokerUnavailable, match="ended after 30000 of its 100000 bytes"):
        with client.stream("job1", "x_owner.r1", 100_000) as source:
            while source.read(16384):
                pass
    thread.join(timeout=10)
