"""`scripts/bench --e2e` (services.worker.e2e_bench): a small real run through three workers, and its bad input."""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from services.worker.spool import FINISHED_JOBS_KEPT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
ROOT = Path(__file__).resolve().parents[1]


def run_bench(name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m services.worker.<name> ARGS`, as `scripts/bench` runs it."""
    return subprocess.run([sys.executable, "-m", f"services.worker.{name}", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def bench(*args: str, timeout: float = 200) -> subprocess.CompletedProcess:
    return run_bench("e2e_bench", *args, timeout=timeout)


def test_a_small_run_prints_the_engine_fields_and_the_end_to_end_figures():
    done = bench("--n", "3000", "--d", "5", "--poll-interval", "0.2", "--format", "csv", "--jobs", "2")
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])

    # The engine bench's fields, for the simulation of the same data in the same run.
    assert (record["n"], record["d"]) == (3000, 5)
    for field in ("seconds", "numpy_seconds", "bytes_sent", "peak_rss_bytes", "weight_error_vs_lstsq"):
        assert field in record
    assert record["simulation_seconds"] == record["seconds"]["job"] > 0

    # The end-to-end run: its stages add up to no more than the whole, and the ratio is the one printed.
    e2e = record["e2e_seconds"]
    assert e2e["total"] > 0
    assert e2e["approval_to_first_claim"] <= e2e["approval_to_last_claim"] < e2e["total"]
    assert 0 < e2e["runner_start_to_result"] < e2e["total"]
    assert record["e2e_over_simulation"] == round(e2e["total"] / record["simulation_seconds"], 2)

    # The workers' model is as accurate as the engine, and what went through the broker is sealed plaintext:
    # at least as many bytes per party as the simulation sent in the clear, in one message per engine message.
    assert record["e2e_weight_error_vs_lstsq"] < 1e-6
    assert all(error < 1e-6 for error in record["e2e_metrics_error_vs_lstsq"].values())
    sent = record["broker_bytes"]["per_party"]
    plain = record["bytes_sent"]
    assert sent["x_owner"] >= plain["x_owner"] and sent["y_owner"] >= plain["y_owner"]
    assert sent["x_owner"] > 3000 * 5 * 8  # the masked matrix, n x d ring elements
    assert record["broker_bytes"]["total"] == sum(sent.values())
    assert record["deliveries"]["messages"] >= 1 and record["deliveries"]["mean_broker_to_inbox_seconds"] >= 0
    assert {"runner", "messenger"} <= set(record["e2e_peak_rss_bytes"]["xorg"])

    # CPU in the job's window: every program of every worker, the server, the bench itself and the machine, which
    # covers them all and cannot exceed its capacity (the window times the cores).
    cpu = record["e2e_job_cpu_seconds"]
    assert set(cpu) == {"xorg", "yorg", "helper", "cape-server", "bench", "machine", "machine_capacity"}
    assert cpu["xorg"]["runner"] > 0 and cpu["yorg"]["messenger"] > 0 and cpu["cape-server"] > 0
    assert cpu["machine"] <= cpu["machine_capacity"] * 1.05  # clock-tick rounding
    assert cpu["machine"] >= cpu["xorg"]["runner"] + cpu["cape-server"] - 0.05
    assert record["e2e_cpu_over_simulation_cpu"] == round(cpu["machine"] / record["job_cpu_seconds"], 2)

    # The disk in the same window. Every hand-off is fsynced, so on a disk-backed temporary directory at least the
    # sender's outbox and the broker have written each sealed message to it.
    disk = record["e2e_job_disk"]
    assert set(disk) == {"written_bytes", "busy_seconds", "iowait_seconds"}
    assert disk["busy_seconds"] >= 0 and 0 <= disk["iowait_seconds"] <= cpu["machine_capacity"] * 1.05
    device = os.stat(tempfile.gettempdir()).st_dev
    if Path(f"/sys/dev/block/{os.major(device)}:{os.minor(device)}").exists():
        assert disk["written_bytes"] >= 2 * record["broker_bytes"]["total"]

    # A second job through the same workers: timed the same way, as accurate, its ratio the one printed.
    [later] = record["later_jobs"]
    assert later["seconds"] > 0 and later["machine_cpu_seconds"] > 0
    assert set(later["disk"]) == set(disk)
    assert later["weight_error_vs_lstsq"] < 1e-6
    assert later["over_simulation"] == round(later["seconds"] / record["simulation_seconds"], 2)
    assert "kept in" not in done.stderr  # the temporary directory is removed after a good run


def test_impossible_sizes_are_refused_with_a_message():
    done = bench("--n", "4", "--d", "8", timeout=60)
    assert done.returncode == 2
    assert "need d >= 1 and n >= d + 2" in done.stderr
    done = bench("--jobs", "0", timeout=60)
    assert done.returncode == 2
    assert "--jobs must be at least 1" in done.stderr


def test_the_broker_bench_relays_every_byte_and_reports_both_sides():
    done = run_bench("broker_bench", "--messages", "3", "--mib", "2")
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert (record["messages"], record["message_bytes"], record["bytes"]) == (3, 2 << 20, 3 * (2 << 20))
    for step in ("put", "download"):
        assert record[step]["wall_seconds"] > 0 and record[step]["server_cpu_seconds"] >= 0
        assert record[step]["client_cpu_seconds"] > 0
    bad = run_bench("broker_bench", "--messages", "0", timeout=60)
    assert bad.returncode == 2 and "--messages, --mib and --puts must be at least 1" in bad.stderr


def test_the_spool_bench_finds_the_scanned_folders_empty_after_the_jobs():
    done = run_bench("spool_bench", "--jobs", "200")
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["jobs"] == 200
    # Finished jobs leave nothing in the folders the programs scan while idle, so no scan grows with the history.
    assert record["left_in_scanned_folders"] == {"outbox": 0, "status": 0, "results": 0, "inbox": 0}
    assert record["finished_jobs_kept"] == FINISHED_JOBS_KEPT  # the rest were forgotten by the poller's cycle
    assert set(record["scans"]) == {"messenger_outbox", "messenger_active_jobs", "runner_runnable_jobs",
                                    "uploader_results", "poller_status"}
    for scan in record["scans"].values():
        assert scan["ms"] > 0 and 0 < scan["core_share"] < 1
        share = scan["ms"] / 1000 / (scan["ms"] / 1000 + scan["every_seconds"])  # from the rounded ms, so close
        assert abs(scan["core_share"] - share) <= 2e-4
        assert scan["watched_every_seconds"] >= scan["every_seconds"]
        assert 0 < scan["watched_core_share"] <= scan["core_share"]
    bad = run_bench("spool_bench", "--jobs", "0", timeout=60)
    assert bad.returncode == 2 and "--jobs must be at least 1" in bad.stderr


def test_an_idle_worker_watches_its_spool_and_uses_almost_no_cpu():
    done = run_bench("idle_bench", "--seconds", "4")
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["spool_watched"] is True
    assert set(record["core_share"]) == {"poller", "messenger", "runner", "uploader", "fatal_listener"}
    # Polling the spool every 10-50 ms cost an idle worker 0.06 of a core here; watching it, about 0.004.
    assert 0 <= record["worker_core_share"] < 0.03, record
    assert record["worker_core_share"] == pytest.approx(sum(record["core_share"].values()), abs=1e-3)
    bad = run_bench("idle_bench", "--seconds", "0", timeout=60)
    assert bad.returncode == 2 and "--seconds must be between 1 and 3600" in bad.stderr
