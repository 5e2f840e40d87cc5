"""A 300 MB message through the broker without the server holding it in memory."""
from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator

import psutil

from tests.support.server import build_job_world

SIZE = 300 * 1024 * 1024
CHUNK = 1024 * 1024
RSS_GROWTH_LIMIT = 50 * 1024 * 1024


def body_chunks(digest: hashlib._Hash) -> Iterator[bytes]:
    """300 MiB of varying bytes, made chunk by chunk (the test process never holds the whole body either)."""
    block = bytes(range(256)) * (CHUNK // 256)
    for i in range(SIZE // CHUNK):
        chunk = i.to_bytes(8, "big") + block[8:]
        digest.update(chunk)
        yield chunk


class PeakRss:
    """Samples a process's RSS every 10 ms in a thread; `peak` is the largest seen."""

    def __init__(self, pid: int):
        self.process = psutil.Process(pid)
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def test_300_mb_message_streams_through_with_flat_server_memory(cape_server):
    world = build_job_world(cape_server)
    jid, sender, receiver = world["job"]["id"], world["worker"]["xorg"], world["worker"]["yorg"]
    # Warm the code paths once so the baseline includes imports and buffers, not the big body.
    sender.put(f"/broker/v1/jobs/{jid}/messages/y_owner/x_owner.warm-up", data=b"x" * CHUNK)
    receiver.get(f"/broker/v1/jobs/{jid}/messages/warm-up")
    baseline = psutil.Process(cape_server.pid).memory_info().rss

    sent = hashlib.sha256()
    received = hashlib.sha256()
    started = time.monotonic()
    with PeakRss(cape_server.pid) as rss:
        put = sender.put(f"/broker/v1/jobs/{jid}/messages/y_owner/x_owner.big", data=body_chunks(sent), timeout=120)
        assert put.status_code == 201, put.text
        listed = {m["name"]: m for m in receiver.get(f"/broker/v1/jobs/{jid}/messages").json()}
        assert listed["x_owner.big"]["size"] == SIZE
        size = 0
        with receiver.get(f"/broker/v1/jobs/{jid}/messages/x_owner.big", stream=True, timeout=120) as download:
            assert download.status_code == 200
            assert int(download.headers["content-length"]) == SIZE
            for chunk in download.iter_content(CHUNK):
                received.update(chunk)
                size += len(chunk)
    elapsed = time.monotonic() - started
    assert size == SIZE and received.hexdigest() == sent.hexdigest()
    growth = rss.peak - baseline
    assert growth < RSS_GROWTH_LIMIT, f"server RSS grew by {growth / 2**20:.1f} MiB while relaying 300 MiB"
    assert receiver.delete(f"/broker/v1/jobs/{jid}/messages/x_owner.big").status_code == 204
    print(f"300 MiB relayed in {elapsed:.1f} s; server RSS growth {growth / 2**20:.1f} MiB")
