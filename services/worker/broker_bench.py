"""Broker benchmark: what relaying a job's large messages costs the broker and the workers' broker client.

`./scripts/bench --broker [--messages 32] [--mib 8] [--puts 3]` starts `cape-server` on 127.0.0.1 with a temporary
data dir and a job of three organizations, then as the x-owner's worker puts MESSAGES sealed-size files of MIB MiB
for the y-owner (PUTS at a time, as the messenger does: `PUTS_PER_JOB`), and as the y-owner's worker downloads and
acknowledges each. It prints one JSON line: wall and CPU seconds of the server (`/proc`) and of the client (this
process) for the puts and for the downloads, and the bytes moved. The default is the e2e bench's masked matrix
(n = 10^6, d = 32): 32 blocks of 8 MiB.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from services.worker.broker_client import BrokerClient
from services.worker.e2e_bench import (SEATS, BenchError, Server, approve_job, cpu_seconds, create_project,
                                       submit_job)

SETTLE_SECONDS = 0.5  # lets the server finish its startup work before the first CPU reading


def _job(server: Server) -> tuple[str, dict[str, str]]:
    """A job whose x_owner and y_owner seats the benchmark's two clients hold; returns (job id, org tokens)."""
    orgs = {label: server.create_org(label) for label in SEATS}
    user = {label: org["user_token"] for label, org in orgs.items()}
    create_project(server.url, user, "file:///data/x.csv", "file:///data/y.csv", ["x0"])
    job_id = submit_job(server.url, user, ["x0"], timeout=600)
    for label in ("xorg", "yorg"):  # the broker takes messages only for an approved job
        approve_job(server.url, user, job_id, label)
    return job_id, {label: org["organization_token"] for label, org in orgs.items()}


def _client_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run(base: Path, messages: int, mib: int, puts: int) -> dict[str, Any]:
    files = []
    for k in range(messages):  # random bytes, like sealed messages; written before anything is timed
        path = base / f"block{k}.sealed"
        path.write_bytes(os.urandom(mib << 20))
        files.append(path)
    server = Server(base)
    try:
        job_id, tokens = _job(server)
        sender = BrokerClient(f"{server.url}/broker", tokens["xorg"])
        receiver = BrokerClient(f"{server.url}/broker", tokens["yorg"])
        time.sleep(SETTLE_SECONDS)

        def measure(step) -> dict[str, float]:  # type: ignore[no-untyped-def]
            server_cpu, client_cpu, started = cpu_seconds(server.proc.pid), _client_cpu(), time.perf_counter()
            step()
            return {"wall_seconds": round(time.perf_counter() - started, 3),
                    "server_cpu_seconds": round((cpu_seconds(server.proc.pid) or 0) - (server_cpu or 0), 3),
                    "client_cpu_seconds": round(_client_cpu() - client_cpu, 3)}

        def put_all() -> None:
            with ThreadPoolExecutor(puts) as pool:
                stored = list(pool.map(lambda k: sender.put(job_id, "y_owner", f"x_owner.block{k}", files[k]),
                                       range(messages)))
            if not all(stored):
                raise BenchError("the broker already held some of the benchmark's messages")

        received = 0

        def download_all() -> None:
            nonlocal received
            buffer = bytearray(1 << 20)
            for entry in receiver.wait_for_messages(job_id, 0):
                with receiver.stream(job_id, entry["name"], entry["size"]) as body:
                    while count := body.readinto(buffer):
                        received += count
                receiver.delete(job_id, entry["name"])

        put = measure(put_all)
        download = measure(download_all)
        sender.close()
        receiver.close()
    finally:
        server.stop()
    if received != messages * (mib << 20):
        raise BenchError(f"downloaded {received} bytes, expected {messages * (mib << 20)}")
    return {"messages": messages, "message_bytes": mib << 20, "bytes": received, "concurrent_puts": puts,
            "put": put, "download": download}


def main(argv: Sequence[str] | None = None) -> int:
    """Print one JSON line; exit 1 if the run failed."""
    parser = argparse.ArgumentParser(prog="scripts/bench --broker", description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=32, help="messages to relay (default 32)")
    parser.add_argument("--mib", type=int, default=8, help="MiB per message (default 8)")
    parser.add_argument("--puts", type=int, default=3, help="puts at a time (default 3)")
    args = parser.parse_args(argv)
    if args.messages < 1 or args.mib < 1 or args.puts < 1:
        parser.error("--messages, --mib and --puts must be at least 1")
    base = Path(tempfile.mkdtemp(prefix="cape-bench-broker-"))
    try:
        print(json.dumps(run(base, args.messages, args.mib, args.puts)), flush=True)
        return 0
    except BenchError as exc:
        print(json.dumps({"error": str(exc)}), flush=True)
        return 1
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
