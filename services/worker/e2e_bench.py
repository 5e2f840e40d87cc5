"""End-to-end benchmark of the appliance: one linear regression through three real workers and a real broker.

`./scripts/bench --e2e [--n N] [--d D] [--quick] [--format parquet|csv] [--poll-interval S] [--timeout S] [--jobs J]
[--keep]`
starts `cape-server` (coordinator + broker) on 127.0.0.1 with a temporary data dir, three organizations and their
workers (`cape-worker run`: supervisord and its four programs, each worker with its own spool, state and file://
bucket), writes the engine bench's data (`bench.make_data`, same seed) as files before any timing, submits the job,
approves it as both data owners and times it to Completed. Then, with the workers stopped, it times reading the
two files in one process and runs the in-memory simulation of the same data in a fresh process (the engine bench's
own case runner), and prints one JSON line: the engine bench's fields for the simulation, plus

- `e2e_seconds`: `total` (approval to Completed, from the job's own `approved_at` and `updated_at` at the
  coordinator) and its stages: approval to the runners' claims, runner start to
  the output seat's result (`runner_start_to_result`), result to Completed;
- `simulation_seconds`, `e2e_over_simulation`, `runner_over_simulation`, and `e2e_over_simulation_plus_load`
  (the workers read their files inside the end-to-end time; the simulation starts from arrays);
  `e2e_cpu_over_simulation_cpu`: the machine's CPU seconds in the job's window over the simulation's own
  (`job_cpu_seconds`), which the time ratio follows on a machine that both keep busy;
- `broker_bytes`: what each worker put at the broker (the sealed messages its runner recorded in done.json);
- `deliveries`: where a message's time goes (outbox to broker, broker to the recipient's inbox; the large blocks'
  timeline), over the messages the sampler saw in each state (a small message can pass through one between two
  samples);
- `e2e_peak_rss_bytes` and `e2e_cpu_seconds` (since start, idle polling included) of every program of every
  worker, and the server's CPU seconds, `e2e_weight_error_vs_lstsq` and the metrics' errors;
- `e2e_job_cpu_seconds`: the same CPU seconds from the approval until the bench saw Completed (at most
  STATUS_POLL_SECONDS late), this bench's own (`bench`: the sampler and the status polls), and `machine` (every
  process and the kernel's threads, from /proc/stat) beside `machine_capacity` (that window times the cores): how
  close the job came to keeping the machine busy;
- `e2e_job_disk`, in the same window: bytes written to the machine's disks, their busy seconds and the cores'
  iowait seconds. Every hand-off of a message is durable (fsync), so the large messages reach the disk three
  times: the sender's outbox, the broker, the recipient's inbox;
- with `--jobs J` (J > 1), `later_jobs`: the J - 1 jobs run after the first through the same workers, each with
  its `seconds` (approval to Completed), the machine's CPU seconds and disk figures in its window, its
  weights' error and its `over_simulation`. An appliance runs for days, so its later jobs are the common case:
  their workers have their imports done and their heaps warm.

What happens inside the workers is observed from the outside: a sampler thread looks at each worker's spool
(claims, outbox, inbox, results) every 20 ms and records when each file first appears; its own CPU time is
reported (`sampler`) so it can be seen not to load the job.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import requests

from services.worker.config import DEFAULT_POLL_INTERVAL

BIN = Path(sys.executable).parent
SEATS = {"xorg": "x_owner", "yorg": "y_owner", "helper": "helper"}
START_TIMEOUT = 60.0
HTTP_TIMEOUT = 60.0
SAMPLE_SECONDS = 0.02  # the stages' resolution; a denser sampler loads the job it measures
STATUS_POLL_SECONDS = 0.25  # how often the end is looked for; its time is the coordinator's own record
DONE_TIMEOUT = 10.0
SIMULATION_TIMEOUT = 900.0


class BenchError(RuntimeError):
    """The benchmark could not run; the message says which part failed and where its log is."""


# ---- data -----------------------------------------------------------------------------------------------------

def write_data(base: Path, n: int, d: int, fmt: str) -> tuple[np.ndarray, np.ndarray, Path, Path]:
    """The engine bench's data for (n, d), written as the x-owner's and y-owner's files (Parquet or CSV)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from services.jobs.linear_regression.bench import make_data

    x, y, _ = make_data(n, d)
    paths = []
    for owner, table in (("xorg", pa.table({f"x{i}": x[:, i] for i in range(d)})), ("yorg", pa.table({"y": y}))):
        folder = base / owner / "data"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{'x' if owner == 'xorg' else 'y'}.{fmt}"
        if fmt == "parquet":
            pq.write_table(table, path)
        else:  # pyarrow writes floats with round-trip precision
            pacsv.write_csv(table, path)
        paths.append(path)
    return x, y, paths[0], paths[1]


# ---- processes ------------------------------------------------------------------------------------------------

class Server:
    """`cape-server serve` on a free loopback port with its own data dir."""

    def __init__(self, base: Path) -> None:
        self.data_dir = base / "server"
        self.log = base / "server.log"
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(
                [str(BIN / "cape-server"), "serve", "--host", "127.0.0.1", "--port", "0", "--data-dir",
                 str(self.data_dir)], stdout=subprocess.PIPE, stderr=err, text=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        lines: queue.Queue[str] = queue.Queue()
        stdout = self.proc.stdout
        assert stdout is not None
        threading.Thread(target=lambda: [lines.put(line) for line in stdout], daemon=True).start()
        self.url = ""
        deadline = time.monotonic() + START_TIMEOUT
        while not self.url:
            try:
                line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                raise BenchError(f"cape-server did not start within {START_TIMEOUT:.0f} s; see {self.log}") from None
            if line.startswith("cape-server listening on "):
                self.url = line.split("listening on ", 1)[1].strip()

    def create_org(self, label: str) -> dict[str, Any]:
        out = subprocess.run([str(BIN / "cape-server"), "admin", "create-org", label, "--admin-email",
                              f"admin@{label}.example", "--data-dir", str(self.data_dir), "--json"],
                             capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise BenchError(f"cape-server admin create-org {label} failed: {out.stderr.strip()}")
        return json.loads(out.stdout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


class Worker:
    """`cape-worker run` for one organization, exactly as the image runs it."""

    def __init__(self, base: Path, label: str, token: str, coordinator: str, poll_interval: float) -> None:
        self.label = label
        self.folder = base / label
        self.spool = self.folder / "spool"
        self.run_dir = self.folder / "state" / "run"
        self.log = self.folder / "worker.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CAPE_", "AWS_"))}
        env.update({"CAPE_TOKEN": token, "CAPE_COORDINATOR": coordinator, "CAPE_WORKER_NAME": label,
                    "CAPE_SPOOL_DIR": str(self.spool), "CAPE_STATE_DIR": str(self.folder / "state"),
                    "CAPE_BUCKET": (self.folder / "bucket").as_uri(), "CAPE_POLL_INTERVAL": f"{poll_interval:g}",
                    "PYTHONUNBUFFERED": "1", "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"})
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:  # append mode: the four programs share the file
            self.proc = subprocess.Popen([str(BIN / "cape-worker"), "run"], env=env, stdout=out,
                                         stderr=subprocess.STDOUT, cwd=self.folder, start_new_session=True)

    def states(self) -> dict[str, str]:
        from services.worker.health import SupervisorUnavailable, program_states

        try:
            return program_states(self.run_dir)
        except SupervisorUnavailable:
            return {}

    def program_pids(self) -> dict[str, int]:
        from services.worker.health import supervisor_proxy

        infos = supervisor_proxy(self.run_dir).supervisor.getAllProcessInfo()
        return {info["name"]: info["pid"] for info in infos if info["pid"]}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


def cpu_seconds(pid: int) -> float | None:
    """A live process's CPU time so far (user + system), or None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return round((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), 2)  # utime, stime


def _cpu_ticks() -> list[int]:
    """The machine's CPU time counters since boot, all cores, in clock ticks: /proc/stat's first line (user, nice,
    system, idle, iowait, irq, softirq, steal, ...)."""
    return [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (all cores; idle and iowait excluded)."""
    fields = _cpu_ticks()
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # up to steal; minus idle, iowait


def disk_counters() -> dict[str, float]:
    """Since boot: bytes written to the machine's disks and their busy seconds (summed over disks, from
    /proc/diskstats), and the seconds cores sat idle waiting for I/O (iowait, from /proc/stat)."""
    block = Path("/sys/block")  # whole disks (their partitions' writes are counted in them); none in some sandboxes
    disks = {entry.name for entry in block.iterdir()} if block.is_dir() else set()
    written = busy = 0.0
    for line in Path("/proc/diskstats").read_text().splitlines():
        fields = line.split()
        if fields[2] in disks:
            written += int(fields[9]) * 512  # sectors written: always 512 bytes here
            busy += int(fields[12]) / 1000  # ms doing I/O
    iowait = _cpu_ticks()[4] / os.sysconf("SC_CLK_TCK")
    return {"written_bytes": written, "busy_seconds": busy, "iowait_seconds": iowait}


def disk_during(before: dict[str, float]) -> dict[str, float]:
    """What `disk_counters` grew by since `before`."""
    after = disk_counters()
    return {"written_bytes": int(after["written_bytes"] - before["written_bytes"]),
            "busy_seconds": round(after["busy_seconds"] - before["busy_seconds"], 2),
            "iowait_seconds": round(after["iowait_seconds"] - before["iowait_seconds"], 2)}


def job_cpu(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Per program (nested by worker) and per process, the CPU seconds spent between two snapshots."""
    return {key: job_cpu(value, after[key]) if isinstance(value, dict) else
            (round(after[key] - value, 2) if value is not None and after.get(key) is not None else None)
            for key, value in before.items()}


def peak_rss(pid: int) -> int | None:
    """A live process's peak resident memory (VmHWM) in bytes, or None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


# ---- watching the spools --------------------------------------------------------------------------------------

class SpoolSampler:
    """Records when files first appear in the workers' spools for one job, and the outbox files' sizes.

    Kept cheap so it does not load the job it measures: one `scandir` per folder every SAMPLE_SECONDS, names
    already seen are skipped before any string work, and a size is stat'ed once per file. `cpu_seconds` is the
    sampler thread's own CPU time, reported beside the figures."""

    def __init__(self, workers: dict[str, Worker], job_id: str) -> None:
        self.workers = workers
        self.job_id = job_id
        self.first_seen: dict[str, float] = {}  # "<label>:<kind>:<name>" -> time.time()
        self.sizes: dict[str, int] = {}  # "<label>:<to_seat>/<name>" -> sealed size (of those seen before sent)
        self.cpu_seconds = 0.0
        self.samples = 0
        self._seen_paths: set[str] = set()  # raw entry paths already recorded
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spool-sampler", daemon=True)

    def __enter__(self) -> "SpoolSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        started = time.thread_time()
        while not self._stop.is_set():
            self.sample()
            self.samples += 1
            self._stop.wait(SAMPLE_SECONDS)
        self.cpu_seconds = time.thread_time() - started

    def _see(self, key: str, now: float) -> None:
        self.first_seen.setdefault(key, now)

    def sample(self) -> None:
        now = time.time()
        job = self.job_id
        for label, worker in self.workers.items():
            spool = os.fspath(worker.spool)
            if f"{label}:claim:" not in self.first_seen and os.path.exists(f"{spool}/claims/{job}.json"):
                self._see(f"{label}:claim:", now)
            if f"{label}:result:" not in self.first_seen and any(
                    os.path.exists(path) for path in (f"{spool}/results/{job}/result.json",
                                                      f"{spool}/jobs/{job}/uploaded.json")):
                self._see(f"{label}:result:", now)
            for seat_dir in _scan(f"{spool}/outbox/{job}"):
                for entry in _scan(seat_dir.path):
                    if entry.path in self._seen_paths or entry.name.startswith("."):
                        continue
                    self._seen_paths.add(entry.path)
                    stem, _, kind = entry.name.rpartition(".")
                    self._see(f"{label}:{kind}:{seat_dir.name}/{stem}", now)
                    key = f"{label}:{seat_dir.name}/{stem}"
                    if kind == "sealed" and key not in self.sizes:  # a .sent file is emptied
                        try:
                            self.sizes[key] = entry.stat().st_size
                        except FileNotFoundError:
                            pass
            for entry in _scan(f"{spool}/inbox/{job}"):
                if entry.path not in self._seen_paths and not entry.name.startswith("."):
                    self._seen_paths.add(entry.path)
                    self._see(f"{label}:inbox:{entry.name.removesuffix('.msg')}", now)

    def times(self, label: str, kind: str) -> list[float]:
        prefix = f"{label}:{kind}:"
        return sorted(t for key, t in self.first_seen.items() if key.startswith(prefix))


def _scan(folder: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except (FileNotFoundError, NotADirectoryError):
        return []


# ---- the run --------------------------------------------------------------------------------------------------

def _call(method: str, url: str, token: str, session: requests.Session | None = None, **kwargs: Any) -> Any:
    response = (session or requests).request(method, url, headers={"Authorization": f"Bearer {token}"},
                                              timeout=HTTP_TIMEOUT, **kwargs)
    if response.status_code >= 300:
        raise BenchError(f"{method} {url} answered {response.status_code}: {response.text[:300]}")
    return response.json() if response.content else None


def create_project(url: str, user: dict[str, str], x_uri: str, y_uri: str, columns: list[str]) -> None:
    """Project `bench` of the three organizations (helper: `helper`) with the x-owner's and y-owner's dataviews."""
    _call("POST", f"{url}/v1/projects", user["xorg"], json={"label": "bench", "name": "bench"})
    _call("POST", f"{url}/v1/projects/bench/organizations", user["xorg"], json={"organization": "yorg"})
    _call("PUT", f"{url}/v1/projects/bench/helper", user["xorg"], json={"organization": "helper"})
    _call("POST", f"{url}/v1/projects/bench/organizations/helper/join", user["helper"])
    _call("POST", f"{url}/v1/projects/bench/dataviews", user["xorg"], json={
        "name": "xs", "uri": x_uri, "schema": [{"name": c, "type": "number"} for c in columns]})
    _call("POST", f"{url}/v1/projects/bench/dataviews", user["yorg"], json={
        "name": "ys", "uri": y_uri, "schema": [{"name": "y", "type": "number"}]})


def submit_job(url: str, user: dict[str, str], columns: list[str], timeout: float) -> str:
    """Submit the linear regression of project `bench` (model owner: yorg); returns the job id."""
    job = _call("POST", f"{url}/v1/projects/bench/jobs", user["xorg"], json={
        "type": "linear_regression", "x": {"dataview": "xs", "columns": columns},
        "y": {"dataview": "ys", "column": "y"}, "model_owner": "yorg", "model_location": None, "timeout": timeout})
    return str(job["id"])


def approve_job(url: str, user: dict[str, str], job_id: str, label: str) -> None:
    """Approve the job as the data owner `label` (xorg or yorg)."""
    _call("POST", f"{url}/v1/jobs/{job_id}/approve", user[label])


def run_e2e(base: Path, n: int, d: int, fmt: str, poll_interval: float, job_timeout: float,
            jobs: int = 1) -> dict[str, Any]:
    """Run the job through real workers (then `jobs - 1` more through the same workers); returns the
    end-to-end fields of the JSON line."""
    from services.jobs.linear_regression import plaintext_fit

    x, y, x_path, y_path = write_data(base, n, d, fmt)
    server = Server(base)
    workers: dict[str, Worker] = {}
    try:
        orgs = {label: server.create_org(label) for label in SEATS}
        url, user = server.url, {label: org["user_token"] for label, org in orgs.items()}
        columns = [f"x{i}" for i in range(d)]
        create_project(url, user, x_path.as_uri(), y_path.as_uri(), columns)
        for label, org in orgs.items():
            workers[label] = Worker(base, label, org["organization_token"], url, poll_interval)
        wait_running(workers)

        job_id = submit_job(url, user, columns, job_timeout)
        approve_job(url, user, job_id, "xorg")
        pids = {label: w.program_pids() for label, w in workers.items()}

        def cpu_now() -> dict[str, Any]:
            cpu: dict[str, Any] = {label: {program: cpu_seconds(pid) for program, pid in programs.items()}
                                   for label, programs in pids.items()}
            return {**cpu, "cape-server": cpu_seconds(server.proc.pid), "bench": cpu_seconds(os.getpid()),
                    "machine": machine_busy_seconds(), "window": time.monotonic()}

        with SpoolSampler(workers, job_id) as sampler:
            cpu_before, disk_before = cpu_now(), disk_counters()
            approve_job(url, user, job_id, "yorg")
            status = _wait_ended(url, user["yorg"], job_id, job_timeout + 60)
            # The coordinator's own times (same machine, same clock): exact to the millisecond, where a client's
            # polls would add their interval, or their load on the two cores if made often.
            approved, ended = _epoch(status["approved_at"]), _epoch(status["updated_at"])
            cpu_during, disk = job_cpu(cpu_before, cpu_now()), disk_during(disk_before)
            cpu_during["machine_capacity"] = round(cpu_during.pop("window") * (os.cpu_count() or 1), 2)
        if status["status"] != "Completed":
            raise BenchError(f"the job ended {status['status']}: {status.get('error')}; see the logs in {base}")
        traffic = {label: _runner_traffic(worker, job_id) for label, worker in workers.items()}
        results = _call("GET", f"{url}/v1/jobs/{job_id}/results", user["yorg"])
        peaks = {label: {program: peak_rss(pid) for program, pid in programs.items()}
                 for label, programs in pids.items()}
        cpu = {label: {program: cpu_seconds(pid) for program, pid in programs.items()}
               for label, programs in pids.items()}
        cpu["cape-server"] = cpu_seconds(server.proc.pid)
        later = [_later_job(url, user, columns, job_timeout, workers["yorg"]) for _ in range(jobs - 1)]
    finally:
        for worker in workers.values():
            if worker.proc.poll() is None:
                worker.proc.send_signal(signal.SIGTERM)
        for worker in workers.values():
            worker.stop()
        server.stop()

    # What reading the two files costs in one process (the workers do it inside the end-to-end time; the
    # simulation's own time starts from arrays in memory).
    from services.jobs.linear_regression import load_x, load_y

    started = time.perf_counter()
    load_x(x_path, [f"x{i}" for i in range(d)])
    load_y(y_path, "y")
    load_seconds = time.perf_counter() - started

    expected, expected_metrics = plaintext_fit(x, y)

    def weight_error(job: str) -> float:
        weights = np.loadtxt(workers["yorg"].folder / "bucket" / job / "regression_weights.csv", delimiter=",")
        return float(np.max(np.abs(weights - expected)) / np.max(np.abs(expected)))

    return {
        "e2e_seconds": {"total": ended - approved, **_stages(sampler, approved, ended)},
        "e2e_weight_error_vs_lstsq": weight_error(job_id),
        "e2e_metrics_error_vs_lstsq": {k: float(abs(results["metrics"][k] - v) / abs(v))
                                       for k, v in expected_metrics.items()},
        "broker_bytes": _broker_bytes(traffic),
        "deliveries": _deliveries(sampler),
        "e2e_peak_rss_bytes": peaks,
        "e2e_cpu_seconds": cpu,
        "e2e_job_cpu_seconds": cpu_during,
        "e2e_job_disk": disk,
        "load_seconds": round(load_seconds, 3),
        "data_format": fmt,
        "data_file_bytes": {"x": x_path.stat().st_size, "y": y_path.stat().st_size},
        **({"later_jobs": [{"seconds": round(seconds, 3), "machine_cpu_seconds": machine, "disk": job_disk,
                            "weight_error_vs_lstsq": weight_error(job)} for job, seconds, machine, job_disk in later]}
           if later else {}),
        "poll_interval_seconds": poll_interval,
        "sampler": {"interval_seconds": SAMPLE_SECONDS, "samples": sampler.samples,
                    "cpu_seconds": round(sampler.cpu_seconds, 3), "status_poll_seconds": STATUS_POLL_SECONDS},
    }


def _later_job(url: str, user: dict[str, str], columns: list[str], job_timeout: float,
               model_owner: Worker) -> tuple[str, float, float, dict[str, float]]:
    """One more job through workers that already ran one: (job id, seconds from approval to Completed, the
    machine's CPU seconds meanwhile, its disk figures). A long-running worker's imports and heaps are warm by
    then."""
    job_id = submit_job(url, user, columns, job_timeout)
    approve_job(url, user, job_id, "xorg")
    busy, disk_before = machine_busy_seconds(), disk_counters()
    approve_job(url, user, job_id, "yorg")
    status = _wait_ended(url, user["yorg"], job_id, job_timeout + 60)
    busy, disk = machine_busy_seconds() - busy, disk_during(disk_before)
    if status["status"] != "Completed":
        raise BenchError(f"a later job ended {status['status']}: {status.get('error')}; see the logs in "
                         f"{model_owner.folder.parent}")
    return job_id, _epoch(status["updated_at"]) - _epoch(status["approved_at"]), round(busy, 2), disk


def wait_running(workers: dict[str, Worker]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    pending = set(workers)
    while pending:
        for label in sorted(pending):
            if workers[label].proc.poll() is not None:
                raise BenchError(f"the {label} worker exited; see {workers[label].log}")
            states = workers[label].states()
            if len(states) == 4 and set(states.values()) == {"RUNNING"}:
                pending.discard(label)
        if time.monotonic() > deadline:
            raise BenchError(f"workers not running after {START_TIMEOUT:.0f} s: {sorted(pending)}")
        time.sleep(0.1)


def _epoch(timestamp: str) -> float:
    """Seconds since the epoch of an API timestamp (ISO 8601 UTC, milliseconds)."""
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


def _wait_ended(url: str, token: str, job_id: str, timeout: float) -> dict[str, Any]:
    # One kept-alive connection, every STATUS_POLL_SECONDS: the server this asks is part of what is measured.
    deadline = time.monotonic() + timeout
    with requests.Session() as session:
        while True:
            job = _call("GET", f"{url}/v1/jobs/{job_id}", token, session=session)
            if job["status"] in ("Completed", "Error", "Stopped", "Rejected"):
                return job
            if time.monotonic() > deadline:
                raise BenchError(f"job {job_id} still {job['status']} after {timeout:.0f} s")
            time.sleep(STATUS_POLL_SECONDS)


def _stages(sampler: SpoolSampler, approved: float, ended: float) -> dict[str, float]:
    """Approval to Completed, cut at what the spools showed: the runners claim the job (the poller fetched it),
    the output seat's result is written (the runner is done), and the coordinator says Completed (the uploader
    stored the model and the poller reported it)."""
    claims = [t for label in SEATS for t in sampler.times(label, "claim")]
    result = sampler.times("yorg", "result")
    stages: dict[str, float] = {}
    if claims:
        stages["approval_to_first_claim"] = min(claims) - approved
        stages["approval_to_last_claim"] = max(claims) - approved
    if claims and result:
        stages["runner_start_to_result"] = result[0] - min(claims)
    if result:
        stages["result_to_completed"] = ended - result[0]
    return {k: round(v, 3) for k, v in stages.items()}


def _deliveries(sampler: SpoolSampler) -> dict[str, Any]:
    """Per message, seconds from its sealed file appearing in the sender's outbox to the broker confirming it
    (renamed .sent: queueing behind earlier messages, then the PUT), and from there to its plaintext appearing in
    the recipient's inbox (the broker's long poll, download, verification and the inbox write)."""
    label_of = {seat: label for label, seat in SEATS.items()}
    to_broker, to_inbox, sizes = [], [], []
    for key, sealed_at in sampler.first_seen.items():
        label, kind, rest = key.split(":", 2)
        if kind != "sealed":
            continue
        to_seat, name = rest.split("/", 1)
        sent_at = sampler.first_seen.get(f"{label}:sent:{rest}")
        arrived = sampler.first_seen.get(f"{label_of.get(to_seat)}:inbox:{name}")
        if sent_at is not None and arrived is not None:
            to_broker.append(sent_at - sealed_at)
            to_inbox.append(arrived - sent_at)
            sizes.append(sampler.sizes.get(f"{label}:{rest}", 0))
    if not sizes:
        return {}
    big = np.array(sizes) >= 1 << 20

    def mean(values: list[float], where: np.ndarray) -> float | None:
        picked = np.array(values)[where]
        return round(float(picked.mean()), 3) if picked.size else None

    every = np.ones(len(sizes), dtype=bool)
    started = min(sampler.times("xorg", "claim") or [0.0])
    # The x-owner's own large messages only: the y-owner's masked vector (8 MB at n = 10^6) is sealed earlier.
    sealed = [t for key, t in sampler.first_seen.items() if key.startswith("xorg:sealed:")
              and sampler.sizes.get(key.replace(":sealed:", ":", 1), 0) >= 1 << 20]
    sent = [t for key, t in sampler.first_seen.items() if key.startswith("xorg:sent:")
            and sampler.sizes.get(key.replace(":sent:", ":", 1), 0) >= 1 << 20]
    timeline = {}
    if sealed and sent and started:
        # When the large messages (the x-owner's masked matrix blocks) moved, from the x-owner's runner start.
        timeline = {"first_sealed": min(sealed) - started, "last_sealed": max(sealed) - started,
                    "last_at_broker": max(sent) - started}
        timeline = {k: round(v, 3) for k, v in timeline.items()}
    return {"timeline_over_1MiB_from_x_owner_start": timeline,
            "messages": len(sizes), "messages_over_1MiB": int(big.sum()),
            "mean_outbox_to_broker_seconds": mean(to_broker, every),
            "mean_broker_to_inbox_seconds": mean(to_inbox, every),
            "mean_outbox_to_broker_seconds_over_1MiB": mean(to_broker, big),
            "mean_broker_to_inbox_seconds_over_1MiB": mean(to_inbox, big)}


def _runner_traffic(worker: Worker, job_id: str) -> dict[str, int]:
    """The messages the worker's runner sealed and read in the job (its done.json), waiting a little for a runner
    that is still writing it."""
    done = worker.spool / "jobs" / job_id / "done.json"
    deadline = time.monotonic() + DONE_TIMEOUT
    while not done.exists():
        if time.monotonic() > deadline:
            raise BenchError(f"the {worker.label} runner did not record its end within {DONE_TIMEOUT:.0f} s of "
                             f"Completed; see {worker.log}")
        time.sleep(0.05)
    return json.loads(done.read_bytes()).get("traffic") or {}


def _broker_bytes(traffic: dict[str, dict[str, int]]) -> dict[str, Any]:
    """What each worker put at the broker (the sealed bytes its runner wrote) and how many messages."""
    per_seat = {SEATS[label]: t.get("bytes_sent", 0) for label, t in traffic.items()}
    count = {SEATS[label]: t.get("messages_sent", 0) for label, t in traffic.items()}
    return {"per_party": per_seat, "messages": count, "total": sum(per_seat.values())}


def run_simulation(n: int, d: int) -> dict[str, Any]:
    """The engine bench's case (same data generator and seed) in a fresh process: its JSON record."""
    proc = subprocess.run([sys.executable, "-m", "services.jobs.linear_regression.bench", "--one", str(n), str(d)],
                          capture_output=True, text=True, timeout=SIMULATION_TIMEOUT)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise BenchError(f"the simulation failed: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    return json.loads(lines[-1])


def main(argv: Sequence[str] | None = None) -> int:
    """Print one JSON line for the end-to-end run and the simulation of the same data; exit 1 if it failed."""
    parser = argparse.ArgumentParser(prog="scripts/bench --e2e", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=lambda s: int(float(s)), default=10**6, help="rows (default 1e6)")
    parser.add_argument("--d", type=int, default=32, help="x columns (default 32)")
    parser.add_argument("--quick", action="store_true", help="n = 1e4 (a smoke run)")
    parser.add_argument("--format", choices=("parquet", "csv"), default="parquet", help="data files (default parquet)")
    parser.add_argument("--poll-interval", type=float, default=DEFAULT_POLL_INTERVAL,
                        help=f"the workers' CAPE_POLL_INTERVAL (default {DEFAULT_POLL_INTERVAL:g}, the worker's own)")
    parser.add_argument("--timeout", type=float, default=600.0, help="the job's timeout in seconds")
    parser.add_argument("--jobs", type=int, default=1,
                        help="jobs run one after another through the same workers (default 1); the first is the "
                             "one measured in full, the others add `later_jobs`")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, spools)")
    args = parser.parse_args(argv)
    n = 10**4 if args.quick else args.n
    if args.d < 1 or n < args.d + 2:
        parser.error("need d >= 1 and n >= d + 2")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    base = Path(tempfile.mkdtemp(prefix="cape-bench-e2e-"))

    def record() -> dict[str, Any]:
        e2e = run_e2e(base, n, args.d, args.format, args.poll_interval, args.timeout, args.jobs)
        simulation = run_simulation(n, args.d)
        simulation_seconds = simulation["seconds"]["job"]
        for later in e2e.get("later_jobs", []):
            later["over_simulation"] = round(later["seconds"] / max(simulation_seconds, 1e-9), 2)
        return {
            **simulation,
            "simulation_seconds": simulation_seconds,
            **e2e,
            "e2e_over_simulation": round(e2e["e2e_seconds"]["total"] / max(simulation_seconds, 1e-9), 2),
            "e2e_over_simulation_plus_load": round(
                e2e["e2e_seconds"]["total"] / max(simulation_seconds + e2e["load_seconds"], 1e-9), 2),
            # The two cores' work beside the simulation's: on a CPU-bound machine the time ratio follows it.
            "e2e_cpu_over_simulation_cpu": round(
                e2e["e2e_job_cpu_seconds"]["machine"] / max(simulation["job_cpu_seconds"], 1e-9), 2),
            "runner_over_simulation": round(e2e["e2e_seconds"].get("runner_start_to_result", float("nan"))
                                            / max(simulation_seconds, 1e-9), 2),
        }

    return print_record(base, record, {"n": n, "d": args.d}, keep=args.keep)


def print_record(base: Path, record: Callable[[], dict[str, Any]], identity: dict[str, Any], keep: bool = False) -> int:
    """Print `record()` as one JSON line (or `identity` and the error if the run failed) and remove `base`, unless
    asked to keep it or the run failed (its logs and spools say why); the exit code."""
    failed = True
    try:
        print(json.dumps(record()), flush=True)
        failed = False
    except (BenchError, subprocess.TimeoutExpired) as exc:
        print(json.dumps({**identity, "error": str(exc)}), flush=True)
    finally:
        if keep or failed:
            print(f"logs and spools kept in {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)
    return 1 if failed else 0

if __name__ == "__main__":
    sys.exit(main())
