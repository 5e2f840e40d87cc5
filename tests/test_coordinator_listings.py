"""Long listings do not hold up other requests: their views are built on a read snapshot of their own, in a few
queries (services/coordinator/db.py `reading`, jobs.py `job_views`), and encoded off the event loop."""
from __future__ import annotations

import sqlite3
import threading
import time

import pytest

from services.coordinator.db import Database
from tests.support.server import build_job_world, newest_first

JOB = {"type": "linear_regression", "x": {"dataview": "xs", "columns": ["a", "b"]},
       "y": {"dataview": "ys", "column": "t"}, "model_owner": "yorg", "timeout": 600}


def test_a_read_snapshot_neither_waits_for_the_writer_nor_writes(tmp_path):
    db = Database(tmp_path / "coordinator.sqlite3")
    try:
        with db.transaction() as conn:
            conn.execute("INSERT INTO organizations (id, label, name, created_at) VALUES ('o1', 'a', 'A', 'now')")
        writing, written = threading.Event(), threading.Event()

        def writer() -> None:
            with db.transaction() as conn:  # holds the writer's lock for a second
                conn.execute("INSERT INTO organizations (id, label, name, created_at) VALUES ('o2', 'b', 'B', 'now')")
                writing.set()
                time.sleep(1.0)
            written.set()

        thread = threading.Thread(target=writer)
        thread.start()
        assert writing.wait(10)
        began = time.monotonic()
        with db.reading() as conn:
            labels = [row["label"] for row in conn.execute("SELECT label FROM organizations ORDER BY label")]
        assert time.monotonic() - began < 0.5 and not written.is_set()
        assert labels == ["a"]  # the last committed state, not the writer's uncommitted row
        thread.join(10)
        with db.reading() as conn:
            assert [row["label"] for row in conn.execute("SELECT label FROM organizations ORDER BY label")] == \
                ["a", "b"]
            with pytest.raises(sqlite3.OperationalError):
                conn.execute("DELETE FROM organizations")
    finally:
        db.close()


def test_a_projects_job_listing_shows_each_job_as_its_own_view_does(cape_server):
    """The listing builds its views in a few queries for all jobs (about 15 per job before); each must read as the
    job's own view, whatever its status and seats."""
    world = build_job_world(cape_server, approve=False)
    user, worker = world["user"], world["worker"]
    ids = [world["job"]["id"]] + [user["xorg"].post("/v1/projects/demo/jobs", json=JOB).json()["id"]
                                  for _ in range(40)]
    for job_id in ids[:20]:
        for label in ("xorg", "yorg"):
            assert user[label].post(f"/v1/jobs/{job_id}/approve").status_code == 200
    for job_id in ids[:10]:
        assert worker["xorg"].post(f"/v1/worker/jobs/{job_id}/report", json={"state": "started"}).status_code == 204
    for job_id in ids[30:35]:
        assert user["xorg"].post(f"/v1/jobs/{job_id}/stop").status_code == 200
    assert user["yorg"].post(f"/v1/jobs/{ids[35]}/reject", json={"reason": "no"}).status_code == 200
    listing = user["helper"].get("/v1/projects/demo/jobs")
    assert listing.status_code == 200 and listing.headers["content-type"] == "application/json"
    listed = listing.json()
    own_views = newest_first([user["helper"].get(f"/v1/jobs/{job_id}").json() for job_id in ids])
    assert listed == own_views and {job["id"] for job in listed} == set(ids)
    assert {job["status"] for job in listed} == {"Approved", "NeedsApproval", "Stopped", "Rejected"}
    assert user["helper"].get("/v1/projects/demo/jobs", params={"limit": 3}).json() == listed[:3]
    assert [p["label"] for p in user["helper"].get("/v1/projects").json()] == ["demo"]


def test_read_connections_are_reused_and_bounded_however_many_threads_read(tmp_path):
    """One read connection per thread leaked two files whenever the server's thread pool ended an idle thread."""
    import os

    db = Database(tmp_path / "coordinator.sqlite3")
    try:
        def open_files() -> int:
            return len(os.listdir("/proc/self/fd"))

        before = open_files()
        together = threading.Barrier(10)

        def read() -> None:
            with db.reading() as conn:
                conn.execute("SELECT count(*) FROM jobs").fetchone()
                together.wait(timeout=10)  # ten readers at once, each in a thread that then ends

        def round_of_readers() -> None:
            threads = [threading.Thread(target=read) for _ in range(10)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(10)

        round_of_readers()
        settled = open_files()
        for _ in range(4):
            round_of_readers()
        # The kept idle connections stay open (each holds the database, its -wal and -shm); nothing more per round.
        assert open_files() == settled and settled - before <= 4 * 3 + 2, (before, settled, open_files())
    finally:
        db.close()
