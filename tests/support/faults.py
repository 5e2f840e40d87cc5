"""A TCP relay on 127.0.0.1 that can hold a reply, for fault tests that need a call to be *in flight*.

`Relay(target_port)` forwards every connection to `127.0.0.1:target_port`. `hold_reply(pattern)` arms a one-shot
trap: the next request whose request line matches `pattern` reaches the server, but the server's reply is kept
back until `release()`; `wait_held(timeout)` returns that request line once the reply is being held. A test kills
the client in between: the server did the work (stored the message, took the report, wrote the object) and the
client never heard. `retarget(port)` points new connections at a restarted server; `cut(True)` makes the server
unreachable through the relay (open connections dropped, new ones closed at once) until `cut(False)`.

`relay` fixture: `relay(target_port)` -> a started `Relay`, closed at teardown. `answering_every_request(status,
body, content_type)`: a server that answers everything the same way (an endpoint refusing, a proxy's 502).
"""
from __future__ import annotations

import contextlib
import http.server
import re
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

HOLD_BOUND_SECONDS = 60.0  # a held reply is released after this even if the test forgot to
_REQUEST_LINE = re.compile(rb"^(GET|PUT|POST|DELETE|HEAD|PATCH) [^\r\n]+")


class Relay:
    """Forwards loopback TCP connections to a target port; can hold one matching reply (see the module doc)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._pattern: re.Pattern[bytes] | None = None
        self._held = threading.Event()
        self._released = threading.Event()
        self._released.set()
        self.held_request = ""
        self._sockets: list[socket.socket] = []
        self._closed = False
        self._cut = False
        threading.Thread(target=self._accept, name=f"relay-{self.port}", daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def retarget(self, target_port: int) -> None:
        """Send new connections to `target_port` (e.g. a restarted server's new port)."""
        self.target_port = target_port

    def cut(self, on: bool) -> None:
        """While on, the server is unreachable through the relay: open connections drop, new ones close at once."""
        self._cut = on
        if on:
            for sock in list(self._sockets):
                _shutdown(sock, socket.SHUT_RDWR)

    def hold_reply(self, pattern: str) -> None:
        """Hold the reply to the next request whose request line (e.g. `PUT /path HTTP/1.1`) matches `pattern`."""
        with self._lock:
            self._pattern = re.compile(pattern.encode())
            self._held.clear()
            self._released.clear()
            self.held_request = ""

    def wait_held(self, timeout: float) -> str | None:
        """The request line whose reply is held, or None if none matched within `timeout` seconds."""
        return self.held_request if self._held.wait(timeout) else None

    def release(self) -> None:
        """Let the held reply go (to a client that may be dead by now) and disarm the trap."""
        with self._lock:
            self._pattern = None
        self._released.set()

    def close(self) -> None:
        self._closed = True
        self.release()
        for sock in [self._listener, *self._sockets]:
            try:
                sock.close()
            except OSError:
                pass

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._cut:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()  # the server is down: the client sees the connection drop, as with a dead server
                continue
            self._sockets += [client, upstream]
            last_request: list[bytes] = [b""]
            threading.Thread(target=self._requests, args=(client, upstream, last_request), daemon=True).start()
            threading.Thread(target=self._replies, args=(upstream, client, last_request), daemon=True).start()

    def _requests(self, client: socket.socket, upstream: socket.socket, last_request: list[bytes]) -> None:
        """Client -> server; remembers the request line of each request (HTTP/1.1: one at a time per connection)."""
        while True:
            data = _recv(client)
            if not data:
                break
            match = _REQUEST_LINE.match(data)
            if match:
                last_request[0] = match.group(0)
            if not _send(upstream, data):
                break
        _shutdown(upstream, socket.SHUT_WR)

    def _replies(self, upstream: socket.socket, client: socket.socket, last_request: list[bytes]) -> None:
        """Server -> client; the reply to a matching request waits until `release()`."""
        while True:
            data = _recv(upstream)
            if not data:
                break
            with self._lock:
                hold = self._pattern is not None and not self._held.is_set() and \
                    bool(self._pattern.search(last_request[0]))
                if hold:
                    self.held_request = last_request[0].decode(errors="replace")
                    self._held.set()
            if hold:
                self._released.wait(HOLD_BOUND_SECONDS)
            if not _send(client, data):
                break
        _shutdown(client, socket.SHUT_RDWR)
        _shutdown(upstream, socket.SHUT_RDWR)


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


def _send(sock: socket.socket, data: bytes) -> bool:
    try:
        sock.sendall(data)
        return True
    except OSError:
        return False


def _shutdown(sock: socket.socket, how: int) -> None:
    try:
        sock.shutdown(how)
    except OSError:
        pass


@pytest.fixture
def relay() -> Iterator[Callable[[int], Relay]]:
    """Factory: `relay(target_port)` -> a started `Relay`; all are closed at teardown."""
    started: list[Relay] = []

    def start(target_port: int) -> Relay:
        started.append(Relay(target_port))
        return started[-1]

    yield start
    for item in started:
        item.close()


@contextlib.contextmanager
def answering_every_request(status: int, body: bytes, content_type: str) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 that answers every request with `status` and `body` (after reading the request's
    body): an endpoint that refuses, or a proxy whose backend is away. Yields its base URL."""
    class Answer(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_HEAD = do_POST = do_PUT = _answer

        def log_message(self, *args: object) -> None:  # quiet
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
