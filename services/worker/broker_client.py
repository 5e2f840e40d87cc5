"""HTTP client for the broker (`/broker/v1`, CONTRACTS.md), authenticated by the organization token.

Bodies are streamed from and to disk. Connection errors and 5xx answers are retried with exponential backoff and
full jitter, a bounded number of times; then `BrokerUnavailable` tells the caller to try again later. No error
message carries the token.
"""
from __future__ import annotations

import contextlib
import logging
import random
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests
import urllib3
import urllib3.connection
from requests.adapters import HTTPAdapter

from services.connection_errors import connection_problem
from services.worker.api_errors import error_of
from services.worker.spool import validate_job_id, validate_message_name, validate_seat

log = logging.getLogger(__name__)
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 60.0  # also bounds the sending of each UPLOAD_BLOCK_BYTES of a body (`_SendTimeoutConnection`)
UPLOAD_BLOCK_BYTES = 1 << 20
# A download slower than this on average is given up (and tried again later), so a trickling connection cannot hold
# a message, and the messages listed with it, for hours; the floor leaves small messages a slow start.
MIN_DOWNLOAD_BYTES_PER_SECOND = 32 * 1024
MIN_DOWNLOAD_SECONDS = 120.0


class BrokerError(RuntimeError):
    """The broker refused a request for a reason retrying will not fix (401, 403, 404, 413, ...)."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code  # the Cape server's error code; None from anything else (an older server's route, a proxy)


class BrokerUnavailable(BrokerError):
    """The broker could not be reached or kept answering 5xx: try again later."""


class BrokerConflict(BrokerError):
    """409: the broker holds other bytes under this message name."""


class BrokerClient:
    """The worker's calls to the broker at `base_url` (e.g. `http://127.0.0.1:8000/broker`)."""

    def __init__(
        self,
        base_url: str,
        token: str,
        attempts: int = 5,
        backoff_base: float = 0.2,
        backoff_cap: float = 5.0,
        stop: threading.Event | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.attempts = attempts
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.stop = stop or threading.Event()
        self._token = token
        self._local = threading.local()  # one requests.Session per thread: sessions are not thread-safe
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()

    @property
    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.mount("http://", _LargeBlocks())
            session.mount("https://", _LargeBlocks())
            session.headers["Authorization"] = f"Bearer {self._token}"
            session.headers["User-Agent"] = "cape-worker-messenger"
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def close(self) -> None:
        """Close the HTTP connections of every thread."""
        with self._lock:
            for session in self._sessions:
                session.close()
            self._sessions.clear()

    def __repr__(self) -> str:  # never show the token
        return f"BrokerClient({self.base_url!r})"

    # ---- the four broker calls ------------------------------------------------------------------------------
    def put(self, job_id: str, to_seat: str, name: str, path: Path) -> bool:
        """Store the file at `path` as message `name` for `to_seat`; True if new, False if already stored."""
        url = self._url(job_id, "messages", validate_seat(to_seat), validate_message_name(name))

        def send() -> requests.Response:
            with open(path, "rb") as body:  # reopened per attempt: a retry sends the whole body again
                return self._session.put(url, data=body, timeout=(CONNECT_TIMEOUT, READ_TIMEOUT),
                                         headers={"Content-Type": "application/octet-stream"})

        response = self._retrying(f"put message {name} for {to_seat}", send)
        if response.status_code == 409:
            raise BrokerConflict(f"the broker holds different bytes under {name!r} for {to_seat}", 409)
        self._raise_for(response, f"put message {name}")
        return response.status_code == 201

    def wait_for_messages(self, job_id: str, wait: float) -> list[dict[str, Any]]:
        """List messages waiting for this worker's seat, long-polling up to `wait` seconds (0..60)."""
        url = self._url(job_id, "messages")
        wait = max(0.0, min(60.0, wait))
        response = self._retrying(
            f"list messages of job {job_id}",
            lambda: self._session.get(url, params={"wait": f"{wait:g}"},
                                      timeout=(CONNECT_TIMEOUT, wait + READ_TIMEOUT)),
        )
        self._raise_for(response, f"list messages of job {job_id}")
        listing = response.json()
        if not isinstance(listing, list):
            raise BrokerError("the broker's message listing is not a list")
        return listing

    def wait_for_jobs_messages(self, job_ids: list[str], wait: float
                               ) -> tuple[dict[str, list[dict[str, Any]]], dict[str, dict[str, Any]]]:
        """Several jobs' listings in one long poll of up to `wait` seconds: (messages by job, the jobs the broker
        refused with their error). A broker without this endpoint answers 404 (`BrokerError.status`)."""
        url = f"{self.base_url}/v1/messages"
        wait = max(0.0, min(60.0, wait))
        params = [("job", validate_job_id(job_id)) for job_id in job_ids] + [("wait", f"{wait:g}")]
        response = self._retrying(
            f"list messages of {len(job_ids)} jobs",
            lambda: self._session.get(url, params=params, timeout=(CONNECT_TIMEOUT, wait + READ_TIMEOUT)),
        )
        self._raise_for(response, f"list messages of {len(job_ids)} jobs")
        listing = response.json()
        if not isinstance(listing, dict) or not isinstance(listing.get("jobs"), dict):
            raise BrokerError("the broker's message listing is not an object of jobs")
        return listing["jobs"], listing.get("refused") or {}

    @contextlib.contextmanager
    def stream(self, job_id: str, name: str, size: int | None = None) -> Iterator[MessageStream]:
        """Open message `name` for reading straight from the HTTP response (no copy on disk).

        A connection that breaks while reading raises `BrokerUnavailable` from `read`, never a short read, so a
        cut-off download is retried later rather than taken for a truncated (forged) message. `size` is the
        message's size as the broker listed it: a body that ends before it (a proxy that dropped the length and
        then the connection) is such a cut too, as is one that ends before its Content-Length.
        """
        url = self._url(job_id, "messages", validate_message_name(name))

        def fetch() -> requests.Response:
            return self._session.get(url, stream=True, timeout=(CONNECT_TIMEOUT, READ_TIMEOUT))

        response = self._retrying(f"download message {name}", fetch)
        with response:
            self._raise_for(response, f"download message {name}")
            response.raw.decode_content = True
            expected = size if isinstance(size, int) and size >= 0 else _content_length(response)
            stream = MessageStream(response.raw, f"download message {name}", self.base_url, expected)
            try:
                yield stream
            finally:
                stream.close()

    def delete(self, job_id: str, name: str) -> None:
        """Acknowledge message `name` (already gone counts as done)."""
        url = self._url(job_id, "messages", validate_message_name(name))
        response = self._retrying(f"delete message {name}",
                                  lambda: self._session.delete(url, timeout=(CONNECT_TIMEOUT, READ_TIMEOUT)))
        if response.status_code == 404 and error_of(response)[0] == "message_not_found":
            return  # the broker's own word (a proxy's 404 is not): the message is gone
        self._raise_for(response, f"delete message {name}")

    # ---- plumbing -------------------------------------------------------------------------------------------
    def _url(self, job_id: str, *parts: str) -> str:
        return "/".join([self.base_url, "v1", "jobs", validate_job_id(job_id), *parts])

    def _retrying(self, what: str, call) -> requests.Response:  # type: ignore[no-untyped-def]
        last = "no attempt made"
        for attempt in range(1, self.attempts + 1):
            try:
                response = call()
            except (requests.RequestException, OSError) as exc:  # OSError: requests could not load its CA file
                last = (f"cannot reach the broker at {self.base_url} ({connection_problem(exc, self.base_url)}); "
                        "check CAPE_BROKER and that the broker is running")
            else:
                if response.status_code < 500:
                    return response
                # A 507 (no room for the message yet) says why; a bare 5xx is the broker's own failure.
                last = f"the broker answered {response.status_code} {error_of(response)[1]}".rstrip()
                response.close()
            if attempt == self.attempts or self.stop.is_set():
                break
            delay = random.uniform(0, min(self.backoff_cap, self.backoff_base * 2 ** (attempt - 1)))
            log.debug("%s failed (%s); retry %d in %.2f s", what, last, attempt, delay)
            if self.stop.wait(delay):
                break
        raise BrokerUnavailable(f"{what}: {last}")

    @staticmethod
    def _raise_for(response: requests.Response, what: str) -> None:
        if response.status_code < 300:
            return
        code, detail = error_of(response)
        status = response.status_code
        hint = {401: "; check CAPE_TOKEN (an organization token)", 403: "; this organization has no seat in the job"}
        raise BrokerError(f"{what}: the broker answered {status} {detail}{hint.get(status, '')}", status, code)


def _content_length(response: requests.Response) -> int | None:
    try:
        length = int(response.headers.get("Content-Length", ""))
    except ValueError:
        return None
    return length if length >= 0 else None


class _SendTimeout:
    """urllib3 sends a request body under the *connect* timeout (the read timeout is set only once the body is
    out), and `sendall` takes it as a deadline for a whole block: 1 MiB had to leave within 5 s, so a link slower
    than ~200 KiB/s, or one pause of 5 s, restarted a large message from its first byte for ever. Each block of the
    body may take READ_TIMEOUT; connecting stays bounded by CONNECT_TIMEOUT."""

    sock: Any

    def send(self, data: Any) -> None:
        if self.sock is not None:
            self.sock.settimeout(READ_TIMEOUT)
        super().send(data)  # type: ignore[misc]


class _SendTimeoutConnection(_SendTimeout, urllib3.connection.HTTPConnection):
    pass


class _SendTimeoutHTTPSConnection(_SendTimeout, urllib3.connection.HTTPSConnection):
    pass


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _SendTimeoutConnection


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _SendTimeoutHTTPSConnection


_POOLS = {"http": _HTTPPool, "https": _HTTPSPool}


class _LargeBlocks(HTTPAdapter):
    """Send file bodies in 1 MiB reads and writes (urllib3's default, 16 KiB, costs 16x the calls for a large
    message), each under the read timeout (`_SendTimeout`)."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, blocksize=UPLOAD_BLOCK_BYTES, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:  # HTTP(S)_PROXY: the same send timeout
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if isinstance(manager, urllib3.ProxyManager):  # not SOCKS, whose pools have their own connections
            manager.pool_classes_by_scheme = _POOLS
        return manager


class MessageStream:
    """A message body being downloaded, read like a file; transport failures become `BrokerUnavailable`.

    So do a body that ends before `expected` bytes, and a download slower on average than
    MIN_DOWNLOAD_BYTES_PER_SECOND (after MIN_DOWNLOAD_SECONDS): each socket read waits at most READ_TIMEOUT, but a
    connection that trickles a few bytes a minute would otherwise hold the message (and those listed with it) for
    hours. A read blocks until its buffer is full, so the deadline is kept by a timer that shuts the socket."""

    def __init__(self, raw: urllib3.response.BaseHTTPResponse, what: str, base_url: str,
                 expected: int | None = None) -> None:
        self._raw = raw
        self._what = what
        self._base_url = base_url
        self._expected = expected
        self._allowed = MIN_DOWNLOAD_SECONDS + (expected or 0) / MIN_DOWNLOAD_BYTES_PER_SECOND
        self._too_slow = False
        self._timer = threading.Timer(self._allowed, self._give_up)
        self._timer.daemon = True
        self._timer.start()
        self.bytes_read = 0

    def read(self, size: int = -1) -> bytes:
        """Up to `size` bytes (fewer only at the end of the body, or as a stream may return them)."""
        data = self._guarded(lambda: self._raw.read(None if size < 0 else size))
        self._count(len(data), size != 0)
        return data

    def readinto(self, buffer: memoryview | bytearray) -> int:
        """Read into `buffer` (no new bytes object per read); 0 only at the end of the body."""
        count = self._guarded(lambda: self._raw.readinto(buffer))
        self._count(count, len(buffer) > 0)
        return count

    def close(self) -> None:
        self._timer.cancel()

    def _give_up(self) -> None:
        self._too_slow = True
        sock = getattr(self._raw.connection, "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the read blocked on it

    def _slow(self) -> BrokerUnavailable:
        size = f"its {self._expected} bytes" if self._expected is not None else "the body"
        return BrokerUnavailable(f"{self._what}: the download from the broker at {self._base_url} is too slow "
                                 f"({size} did not all arrive within {self._allowed:.0f} s); it is downloaded again "
                                 "later")

    def _count(self, count: int, asked: bool) -> None:
        self.bytes_read += count
        if self._too_slow:
            raise self._slow()
        if asked and not count and self._expected is not None and self.bytes_read < self._expected:
            raise BrokerUnavailable(f"{self._what}: the body from the broker at {self._base_url} ended after "
                                    f"{self.bytes_read} of its {self._expected} bytes (a connection cut on the way); "
                                    "it is downloaded again later")

    def _guarded(self, call):  # type: ignore[no-untyped-def]
        try:
            return call()
        except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as exc:
            if self._too_slow:
                raise self._slow() from None
            raise BrokerUnavailable(f"{self._what}: the connection to the broker at {self._base_url} broke "
                                    f"({type(exc).__name__}); it is downloaded again later") from None
