"""A reverse proxy on 127.0.0.1 in front of a real cape-server that misbehaves as proxies on the way do.

    with FaultProxy(cape_server.url) as proxy:      # the worker's CAPE_BROKER = proxy.url + "/broker"
        proxy.cut_downloads = 1                     # the next message download: no Content-Length, cut halfway
        proxy.own_404_downloads = True              # message downloads answered with the proxy's own 404 page
        proxy.stall_downloads, proxy.stall_seconds = 1, 6.0   # the next download pauses halfway for 6 s

Everything else is passed through (one upstream request per request; HTTP/1.0, so each answer closes its
connection, as a close-delimited body needs). `requests` records (method, path, status) of every answer.
"""
from __future__ import annotations

import http.server
import re
import threading
import time
from typing import Any

import requests

_MESSAGE_BODY = re.compile(r"^/broker/v1/jobs/[^/]+/messages/[^/?]+$")
_PASSED_HEADERS = ("Authorization", "Content-Type", "Content-Length", "User-Agent")


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.cut_downloads = 0
        self.own_404_downloads = False
        self.stall_downloads = 0
        self.stall_seconds = 0.0
        self.requests: list[tuple[str, str, int]] = []
        self._lock = threading.Lock()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()

    def count(self, method: str, pattern: str, status: int | None = None) -> int:
        with self._lock:
            return sum(1 for m, path, s in self.requests
                       if m == method and re.search(pattern, path) and (status is None or s == status))

    def _take(self, counter: str) -> bool:
        """Whether the next download gets this fault (`cut_downloads` or `stall_downloads`), counting it down."""
        with self._lock:
            if getattr(self, counter) > 0:
                setattr(self, counter, getattr(self, counter) - 1)
                return True
            return False

    def _note(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.requests.append((method, path, status))


def _handler(proxy: FaultProxy) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if _MESSAGE_BODY.match(self.path) and proxy.own_404_downloads:
                page = b"<html><body><h1>404 Not Found</h1></body></html>"
                self._answer(404, {"Content-Type": "text/html", "Content-Length": str(len(page))}, page)
                return
            upstream = self._forward()
            if _MESSAGE_BODY.match(self.path) and upstream.status_code == 200 and proxy._take("cut_downloads"):
                # The length dropped (a buffering or HTTP/1.0 proxy), then the connection ended cleanly halfway.
                self._answer(200, {"Content-Type": "application/octet-stream"},
                             upstream.content[: len(upstream.content) // 2])
                return
            if _MESSAGE_BODY.match(self.path) and upstream.status_code == 200 and proxy._take("stall_downloads"):
                half = len(upstream.content) // 2
                self._answer(200, {"Content-Type": "application/octet-stream",
                                   "Content-Length": str(len(upstream.content))}, upstream.content[:half])
                self.wfile.flush()
                time.sleep(proxy.stall_seconds)
                self.wfile.write(upstream.content[half:])
                return
            self._pass(upstream)

        def do_PUT(self) -> None:  # noqa: N802
            self._pass(self._forward(self.rfile.read(int(self.headers.get("Content-Length") or 0))))

        def do_DELETE(self) -> None:  # noqa: N802
            self._pass(self._forward())

        def _forward(self, body: bytes | None = None) -> requests.Response:
            headers = {name: self.headers[name] for name in _PASSED_HEADERS if self.headers.get(name)}
            return requests.request(self.command, proxy.upstream + self.path, data=body, headers=headers,
                                    timeout=90)

        def _pass(self, upstream: requests.Response) -> None:
            headers = {"Content-Type": upstream.headers.get("Content-Type", "application/octet-stream"),
                       "Content-Length": str(len(upstream.content))}
            self._answer(upstream.status_code, headers, upstream.content)

        def _answer(self, status: int, headers: dict[str, str], body: bytes) -> None:
            proxy._note(self.command, self.path, status)
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    return Handler
