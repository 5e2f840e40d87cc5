"""Idle benchmark: what a running worker costs the machine while it has no job.

`./scripts/bench --idle [--seconds 20]` starts `cape-server` on 127.0.0.1 with a temporary data dir and one
worker (`cape-worker run`, exactly as the image runs it, with the default poll interval), waits until its four
programs run and have settled, then reads the CPU time of each program and of the server over SECONDS. It prints
one JSON line: per program the share of one core it used (`core_share`), their total, the server's share (the
worker's polls and heartbeats), and whether the programs watch the spool for hand-offs (`spool_watched`: no
"cannot watch the spool" warning in the worker's log) or poll it every few milliseconds.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.worker.config import WorkerConfig
from services.worker.e2e_bench import BenchError, Server, Worker, wait_running, cpu_seconds, print_record

SETTLE_SECONDS = 2.0  # start-up work (imports, key loading, the first polls) is not idle cost


def _cpu(pids: dict[str, int]) -> dict[str, float | None]:
    return {name: cpu_seconds(pid) for name, pid in pids.items()}


def run(base: Path, seconds: float) -> dict[str, Any]:
    server = Server(base)
    try:
        org = server.create_org("idle")
        worker = Worker(base, "idle", org["organization_token"], server.url, WorkerConfig.poll_interval)
        try:
            wait_running({"idle": worker})
            time.sleep(SETTLE_SECONDS)
            pids = {**worker.program_pids(), "cape-server": server.proc.pid}
            before = _cpu(pids)
            started = time.monotonic()
            time.sleep(seconds)
            after = _cpu(pids)
            elapsed = time.monotonic() - started
            states = worker.states()
        finally:
            worker.stop()
        log = worker.log.read_text(errors="replace")
    finally:
        server.stop()
    if set(states.values()) != {"RUNNING"}:
        raise BenchError(f"a program of the worker stopped running during the measurement: {states}; see {worker.log}")
    gone = [name for name in pids if before[name] is None or after[name] is None]
    if gone:
        raise BenchError(f"{', '.join(gone)} exited during the measurement; see {worker.log}")
    share = {name: round((after[name] - before[name]) / elapsed, 4) for name in pids}  # type: ignore[operator]
    server_share = share.pop("cape-server")
    return {
        "seconds": round(elapsed, 2),
        "poll_interval_seconds": WorkerConfig.poll_interval,
        "core_share": share,
        "worker_core_share": round(sum(share.values()), 4),
        "server_core_share": server_share,
        "spool_watched": "cannot watch the spool" not in log,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench --idle", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="how long to measure (default 20)")
    args = parser.parse_args(argv)
    if not 1.0 <= args.seconds <= 3600:
        print("error: --seconds must be between 1 and 3600", file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="cape-bench-idle-"))
    return print_record(base, lambda: run(base, args.seconds), {"seconds": args.seconds})

if __name__ == "__main__":
    sys.exit(main())
