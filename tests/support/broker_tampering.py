"""Tools for playing a malicious broker (or a party that holds another's token) against real workers.

- `BrokerAs(server, token)`: the broker's HTTP API as one organization (list, fetch, put, delete), no raising.
- `stored_body(server, job, to_seat, name)`: the file under the broker's data dir that holds a stored message.
- `DirectoryRecorder(folders, pattern)`: a thread that copies every file matching `pattern` that appears under
  `folders` while it runs (broker bodies are deleted once acknowledged, inbox files when the job ends).
- `plaintext_leaks(blobs, plaintexts, values)`: what of the plaintexts and values is found in the stored bytes.
- `pause(worker, program)` / `resume(worker, program)`: stop and start one supervisord program of a worker.
"""
from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import requests

NPY_MAGIC = b"\x93NUMPY"
HTTP_TIMEOUT = 30


class BrokerAs:
    """The broker's API (`/broker/v1`) called with one organization's token."""

    def __init__(self, server: Any, token: str) -> None:
        self.server = server
        self.headers = {"Authorization": f"Bearer {token}"}

    def _url(self, job: str, *parts: str) -> str:
        return "/".join([self.server.broker_url, "v1", "jobs", job, "messages", *parts])

    def waiting(self, job: str) -> dict[str, dict[str, Any]]:
        """Messages waiting for this organization's seat, by name."""
        response = requests.get(self._url(job), headers=self.headers, timeout=HTTP_TIMEOUT)
        assert response.status_code == 200, response.text
        return {entry["name"]: entry for entry in response.json()}

    def fetch(self, job: str, name: str) -> bytes:
        """The stored bytes of one waiting message (not acknowledged: it stays at the broker)."""
        response = requests.get(self._url(job, name), headers=self.headers, timeout=HTTP_TIMEOUT)
        assert response.status_code == 200, response.text
        return response.content

    def put(self, job: str, to_seat: str, name: str, body: bytes) -> int:
        """PUT `body` as message `name` for `to_seat`; returns the status code."""
        return requests.put(self._url(job, to_seat, name), data=body, headers=self.headers,
                            timeout=HTTP_TIMEOUT).status_code

    def delete(self, job: str, name: str) -> int:
        return requests.delete(self._url(job, name), headers=self.headers, timeout=HTTP_TIMEOUT).status_code

    def wait_for(self, job: str, names: Iterable[str], timeout: float = 60.0) -> dict[str, dict[str, Any]]:
        """Poll until every one of `names` waits for this seat; fail with what is there after `timeout`."""
        wanted = set(names)
        deadline = time.monotonic() + timeout
        found: dict[str, dict[str, Any]] = {}
        while time.monotonic() < deadline:
            found = self.waiting(job)
            if wanted <= set(found):
                return found
            time.sleep(0.1)
        raise AssertionError(f"messages {sorted(wanted - set(found))} never reached the broker; "
                             f"waiting: {sorted(found)}")


def stored_body(server: Any, job: str, to_seat: str, name: str) -> Path:
    """The body file of a stored message, from the broker's index (read-only; the server keeps running)."""
    root = Path(server.data_dir) / "broker"
    with sqlite3.connect(f"file:{root / 'index.sqlite3'}?mode=ro", uri=True, timeout=10) as conn:
        row = conn.execute("SELECT file FROM messages WHERE job_id = ? AND to_seat = ? AND name = ?",
                           (job, to_seat, name)).fetchone()
    assert row is not None, f"the broker stores no message {name} for {to_seat}"
    return root / "bodies" / row[0]


class DirectoryRecorder:
    """Copies every file matching `pattern` under `folders` (recursively) as it appears, until stopped.

    Use as a context manager; `blobs` maps each file's path to the longest content seen.
    """

    def __init__(self, folders: Iterable[Path], pattern: str = "*", interval: float = 0.01) -> None:
        self.folders = [Path(f) for f in folders]
        self.pattern = pattern
        self.interval = interval
        self.blobs: dict[str, bytes] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="directory-recorder", daemon=True)

    def __enter__(self) -> "DirectoryRecorder":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.sweep()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sweep()
            self._stop.wait(self.interval)

    def sweep(self) -> None:
        """Copy what is there now."""
        for folder in self.folders:
            if not folder.is_dir():
                continue
            try:
                paths = list(folder.rglob(self.pattern))
            except FileNotFoundError:
                continue  # a job's folder went away mid-walk (the job ended): the next sweep sees the rest
            for path in paths:
                try:
                    data = path.read_bytes()
                except (FileNotFoundError, IsADirectoryError, PermissionError):
                    continue
                key = str(path)
                if len(data) > len(self.blobs.get(key, b"")):
                    self.blobs[key] = data


def all_files(folder: Path) -> dict[str, bytes]:
    """Every regular file under `folder` (the broker's whole data dir: bodies, uploads, index, WAL)."""
    found = {}
    for path in Path(folder).rglob("*"):
        try:
            if path.is_file():
                found[str(path)] = path.read_bytes()
        except FileNotFoundError:
            continue
    return found


def share_fingerprints(npy_files: Iterable[bytes], width: int = 16) -> set[bytes]:
    """High-entropy pieces of received plaintext arrays: the first and middle `width` bytes of each array's data
    (arrays shorter than `width` bytes, e.g. a row count, are skipped: they could match by chance)."""
    import io

    pieces = set()
    for blob in npy_files:
        array = np.lib.format.read_array(io.BytesIO(blob), allow_pickle=False)
        raw = np.ascontiguousarray(array).tobytes()
        if len(raw) < width:
            continue
        pieces.add(raw[:width])
        middle = (len(raw) // 2) // 8 * 8
        pieces.add(raw[middle:middle + width] if middle + width <= len(raw) else raw[-width:])
    return pieces


def plaintext_leaks(blobs: dict[str, bytes], fingerprints: Iterable[bytes], values: np.ndarray) -> list[str]:
    """Where the .npy magic, a share fingerprint or the raw float64 bytes of a known input value occur in `blobs`."""
    needles = [("the .npy header magic", NPY_MAGIC)]
    needles += [("a received share", piece) for piece in fingerprints]
    needles += [(f"the input value {float(v)!r}", np.float64(v).tobytes())
                for v in np.asarray(values, dtype=np.float64)]
    found = []
    for path, data in blobs.items():
        for what, needle in needles:
            if needle in data and f"{what} in {path}" not in found:
                found.append(f"{what} in {path}")
    return found


def pause(worker: Any, program: str) -> None:
    """Stop one program of a worker (supervisord keeps it stopped until `resume`)."""
    worker.supervisor().stopProcess(f"worker:{program}", True)


def resume(worker: Any, program: str) -> None:
    """Start a paused program again, if it is not running."""
    info = worker.supervisor().getProcessInfo(f"worker:{program}")
    if info["statename"] not in ("RUNNING", "STARTING"):
        worker.supervisor().startProcess(f"worker:{program}", False)
