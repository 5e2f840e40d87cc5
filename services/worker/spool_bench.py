"""Spool benchmark: what the programs' periodic scans cost after many jobs went through a worker.

`./scripts/bench --spool [--jobs 1000]` takes a temporary spool through JOBS whole job lifecycles as the four
programs leave them (the poller stores the spec; the runner claims it, writes its status, outbox messages and the
output seat's result, marks it done and discards its messages; the messenger marks messages sent, one of them after
the runner finished; the poller acknowledges the statuses and marks the job ended; the uploader acknowledges the
result; the poller's next cycle forgets old finished jobs), then times the scans each program makes while idle, with how often it makes them. It prints one JSON line:
per scan, the milliseconds it takes and the share of one core it costs at that rate (`core_share`: the programs'
short polls, used when the system refuses a spool watch) and at the rate of a program whose spool watch runs
(`watched_core_share`: one look per `WATCHED_POLL_SECONDS` while nothing lands in the spool); what a just
started program's first scan of the jobs costs; and what is left in the scanned folders.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from services.worker import messenger, poller, runner, uploader
from services.worker.keys import WorkerKeys
from services.worker.spool import Spool, atomic_write_bytes
from services.worker.spool_watch import WATCHED_POLL_SECONDS

REPEATS = 20


def _one_job(spool: Spool, job_id: str) -> None:
    """One job's life in the spool, in the order the programs act."""
    spool.put_job({"id": job_id, "seat": "y_owner"})
    spool.claim(job_id)
    spool.put_status(job_id, {"state": "started", "progress": 0.0})
    for k, to_seat in enumerate(("x_owner", "helper", "x_owner")):
        atomic_write_bytes(spool.outbox_path(job_id, to_seat, f"y_owner.m{k}"), b"sealed bytes")
    pending = spool.pending_outbox(job_id)
    for item in pending[:-1]:
        spool.mark_sent(item)
    spool.put_result(job_id, {"job_id": job_id, "weights": [0.0, 1.0]})
    spool.mark_done(job_id, "completed")
    spool.release_claim(job_id)
    spool.discard_messages(job_id)
    spool.mark_sent(pending[-1])  # the messenger sends the last message after the runner finished
    spool.put_status(job_id, {"state": "completed", "progress": 1.0}, source="uploader")
    spool.ack_result(job_id)
    for item in spool.pending_status():
        spool.ack_status(item)
    spool.mark_ended(job_id, "Completed")
    spool.prune_finished()  # the poller's cycle


def _time(scan: Callable[[], Any]) -> float:
    started = time.perf_counter()
    for _ in range(REPEATS):
        scan()
    return (time.perf_counter() - started) / REPEATS


def run(base: Path, jobs: int) -> dict[str, Any]:
    spool = Spool(base / "spool")
    started = time.perf_counter()
    for _ in range(jobs):
        _one_job(spool, uuid.uuid4().hex)
    lifecycle = time.perf_counter() - started
    # A program that just started has not seen any job finish: its first scan reads every finished job's markers.
    first_scan = _time(lambda: Spool(base / "spool").active_job_ids())
    the_runner = runner.Runner(spool, WorkerKeys.load_or_create(base / "state"))
    scans = {  # what each program's idle loop looks at, and how often
        "messenger_outbox": (spool.pending_outbox, messenger.IDLE_SECONDS),
        "messenger_active_jobs": (spool.active_job_ids, messenger.NO_JOBS_SECONDS),
        "runner_runnable_jobs": (the_runner.runnable, runner.SCAN_SECONDS),
        "uploader_results": (spool.pending_results, uploader.SPOOL_WATCH_SECONDS),
        "poller_status": (spool.pending_status, poller.SPOOL_WATCH_SECONDS),
    }
    figures = {}
    for name, (scan, every) in scans.items():
        seconds = _time(scan)
        watched = max(every, WATCHED_POLL_SECONDS)  # with the spool watch, an idle program looks this often
        figures[name] = {"ms": round(seconds * 1000, 3), "every_seconds": every,
                         "core_share": round(seconds / (seconds + every), 4),
                         "watched_every_seconds": watched, "watched_core_share": round(seconds / (seconds + watched), 5)}
    return {
        "jobs": jobs,
        "lifecycle_ms_per_job": round(lifecycle / jobs * 1000, 3),
        "scans": figures,
        "first_active_jobs_scan_ms": round(first_scan * 1000, 3),
        "left_in_scanned_folders": {folder: len(list((base / "spool" / folder).iterdir()))
                                    for folder in ("outbox", "status", "results", "inbox")},
        "finished_jobs_kept": len(list((base / "spool" / "jobs").iterdir())),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench --spool", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000, help="finished jobs in the spool (default 1000)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        print("error: --jobs must be at least 1", file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="cape-bench-spool-"))
    try:
        print(json.dumps(run(base, args.jobs)))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
