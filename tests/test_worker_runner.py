"""The runner: a real three-party job over three spools and the real broker, restarts, bad data, stopped jobs."""
from __future__ import annotations

import hashlib
import json
import logging
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from services.worker.broker_client import BrokerClient
from services.worker.keys import WorkerKeys
from services.worker.messenger import Messenger
from services.worker.runner import Runner
from services.worker.spool import Spool
from tests.support.cgroups import child_memory_cgroup, join_code, oom_kill_in
from tests.support.worker_messaging import approved_job, program_env, wait_for

SEATS = ("x_owner", "y_owner", "helper")
ACCURACY = 1e-5  # the engine's bound on |weights - lstsq| for well-scaled data of this size


def write_data(folder: Path, n: int = 300, bad_cell: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    x = rng.normal(size=(n, 3)) * [1.0, 50.0, 0.02] + [0.0, 1000.0, 0.0]  # unscaled on purpose
    y = 3.0 + x @ np.array([0.5, -0.01, 40.0]) + rng.normal(scale=0.1, size=n)
    folder.mkdir(parents=True, exist_ok=True)
    np.savetxt(folder / "x.csv", x, delimiter=",", header="a,b,c", comments="", fmt="%.17g")
    lines = ["t"] + [repr(float(v)) for v in y]
    if bad_cell is not None:
        lines[bad_cell] = "n/a"
    (folder / "y.csv").write_text("\n".join(lines) + "\n")
    return x, y


def lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.linalg.lstsq(np.column_stack([np.ones(len(x)), x]), y, rcond=None)[0]


def statuses(spool, job_id) -> list[dict]:
    return [item.read() for item in spool.pending_status() if item.job_id == job_id]


@pytest.fixture
def data_job(cape_server, tmp_path):
    x, y = write_data(tmp_path / "data")
    job = approved_job(cape_server, tmp_path, x_uri=(tmp_path / "data" / "x.csv").as_uri(),
                       y_uri=str(tmp_path / "data" / "y.csv"), x_columns=("a", "b", "c"), y_column="t",
                       model_location=(tmp_path / "models").as_uri())
    for seat in job.seats.values():
        seat.spool.put_job(seat.spec)
    return job, x, y


def start_program(program: str, job, seat: str, base: Path, cgroup: Path | None = None) -> subprocess.Popen:
    """`python -m services.worker.<program>` for `seat`, logging to base/<seat>.<program>.log; in `cgroup` if given."""
    log = open(base / f"{seat}.{program}.log", "ab")
    command = [sys.executable, "-m", f"services.worker.{program}"]
    if cgroup is not None:
        command = [sys.executable, "-c", join_code(cgroup) + "import runpy\n"
                   f"runpy.run_module('services.worker.{program}', run_name='__main__', alter_sys=True)\n"]
    return subprocess.Popen(command, env=program_env(job, seat, base), stdout=log, stderr=subprocess.STDOUT)


def stop_all(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def test_three_workers_run_the_job_over_their_spools(data_job, tmp_path):
    job, x, y = data_job
    procs = []
    try:
        for seat in SEATS:
            procs += [start_program("messenger", job, seat, tmp_path), start_program("runner", job, seat, tmp_path)]
        y_spool = job.seats["y_owner"].spool
        result = wait_for(lambda: y_spool.read_result(job.id), "the output seat's result", timeout=90)
        for seat in SEATS:
            spool = job.seats[seat].spool
            wait_for(lambda spool=spool: spool.done(job.id), f"{seat}'s runner to finish")
    finally:
        stop_all(procs)

    np.testing.assert_allclose(result["weights"], lstsq(x, y), atol=ACCURACY, rtol=0)
    assert result["x_columns"] == ["a", "b", "c"]
    assert set(result["metrics"]) == {"mse_result", "r_squared_result"}
    assert result["metrics"]["r_squared_result"] > 0.99
    assert result["model_location"] == (tmp_path / "models").as_uri()
    for seat in ("x_owner", "helper"):  # only the output seat learns anything
        spool = job.seats[seat].spool
        assert spool.pending_results() == []
        done = spool.done(job.id)
        assert (done["outcome"], done["message"]) == ("completed", None)
        states = [s["state"] for s in statuses(spool, job.id)]
        assert states[0] == "started" and states[-1] == "completed"
    traffic = {seat: job.seats[seat].spool.done(job.id)["traffic"] for seat in SEATS}
    assert all(t["messages_sent"] > 0 and t["messages_received"] > 0 for t in traffic.values()), traffic
    assert traffic["x_owner"]["bytes_sent"] > x.size * 8  # its masked matrix went out sealed
    y_states = statuses(job.seats["y_owner"].spool, job.id)
    assert y_states[0]["state"] == "started" and y_states[-1]["state"] == "running"  # the uploader completes it
    for seat in SEATS:  # received messages are gone once the job is done; nothing left to send
        spool = job.seats[seat].spool
        assert not (spool.root / "inbox" / job.id).exists()
        assert not (spool.root / "outbox" / job.id).exists()  # nor anything for the messenger's scans to walk
        assert spool.pending_outbox() == [] and spool.claimed_jobs() == []
    log = (tmp_path / "x_owner.runner.log").read_text()
    assert f"job {job.id}: role finished" in log
    assert f"job {job.id}: loaded its data ({x.shape[0]} x {x.shape[1]}) in " in log  # its shape, how long it took
    assert repr(float(x[0, 0]))[:8] not in log  # no data value in the log


def _digests(outbox, pattern: str) -> dict[str, str]:
    """Message name -> sha256 of the outbox files matching `pattern`. The messenger runs meanwhile: a file it
    renames (.sealed to .sent) between the listing and the read is skipped."""
    digests = {}
    for path in outbox.glob(pattern):
        try:
            digests[path.name.rsplit(".", 1)[0]] = hashlib.sha256(path.read_bytes()).hexdigest()
        except FileNotFoundError:
            continue
    return digests


def test_a_restarted_runner_replays_its_role_and_sends_the_same_bytes(data_job, tmp_path):
    job, x, y = data_job
    stop = threading.Event()
    messengers = []
    for seat in SEATS:
        s = job.seats[seat]
        messengers.append(Messenger(s.spool, s.keys, BrokerClient(job.broker_url, s.token, stop=stop), stop,
                                    long_poll=0.5))
    threads = [threading.Thread(target=m.run, daemon=True) for m in messengers]
    runners = {seat: Runner(job.seats[seat].spool, job.seats[seat].keys) for seat in ("x_owner", "helper")}
    threads += [threading.Thread(target=r.run_job, args=(job.id,), daemon=True) for r in runners.values()]
    for thread in threads:
        thread.start()
    try:
        y = job.seats["y_owner"]
        first = Runner(y.spool, y.keys)
        outbox = y.spool.root / "outbox" / job.id
        # Stop y_owner's runner as soon as it has sealed its first message: the "crash" of this test.
        watcher = threading.Thread(target=lambda: (wait_for(lambda: list(outbox.glob("*/*")), "a sealed message"),
                                                   first.stop.set()), daemon=True)
        watcher.start()
        assert first.run_job(job.id) == "paused"
        assert y.spool.claimed_jobs() == [job.id] and y.spool.done(job.id) is None
        sealed_before = _digests(outbox, "*/*")
        assert sealed_before

        second = Runner(y.spool, y.keys)
        assert second.runnable() == [job.id]  # the claim survives: the restarted runner resumes it
        assert second.run_job(job.id) == "completed"
        # Its progress starts from 0 % again: the reports say why, to every project member watching.
        started = [u.get("message") for u in statuses(y.spool, job.id) if u["state"] == "started"]
        assert started == [None, "replaying its role after a restart"]
        sealed_after = _digests(outbox, "*/*.se*")
        for name, digest in sealed_before.items():  # not re-sealed: the broker sees one version of each name
            assert sealed_after.get(name, digest) == digest
    finally:
        stop.set()
        for runner in runners.values():
            runner.stop.set()
        for thread in threads:
            thread.join(timeout=5)
    result = y.spool.read_result(job.id)
    np.testing.assert_allclose(result["weights"], lstsq(x, y_data := np.loadtxt(tmp_path / "data" / "y.csv",
                                                                                 skiprows=1)), atol=ACCURACY, rtol=0)
    assert y_data.shape == (300,)


def test_bad_data_ends_in_an_error_status_that_says_where(cape_server, tmp_path):
    write_data(tmp_path / "data", bad_cell=42)
    job = approved_job(cape_server, tmp_path, x_uri=(tmp_path / "data" / "x.csv").as_uri(),
                       y_uri=(tmp_path / "data" / "y.csv").as_uri(), x_columns=("a", "b", "c"), y_column="t")
    y = job.seats["y_owner"]
    y.spool.put_job(y.spec)
    assert Runner(y.spool, y.keys).run_job(job.id) == "error"
    last = statuses(y.spool, job.id)[-1]
    assert last["state"] == "error"
    # The dataview is named, not its uri: job errors are shown to every project member.
    assert last["message"] == "dataview 'target': column 't' row 42: the value is not a number"
    assert y.spool.done(job.id)["outcome"] == "error"


def test_a_model_this_worker_could_not_store_is_said_before_the_data_is_loaded(cape_server, tmp_path, caplog):
    """Found by the uploader after the whole computation (at 10^6 x 32: the 256 MB masked matrix moved for nothing)."""
    from services.worker.config import WorkerConfig
    from services.worker.uploader import model_bucket

    write_data(tmp_path / "data")
    job = approved_job(cape_server, tmp_path, x_uri=(tmp_path / "data" / "x.csv").as_uri(),
                       y_uri=(tmp_path / "missing.csv").as_uri(), x_columns=("a", "b", "c"), y_column="t")
    y = job.seats["y_owner"]  # the output seat; the job names no model location and the worker has no CAPE_BUCKET
    y.spool.put_job(y.spec)
    config = WorkerConfig.from_env({"CAPE_TOKEN": "tok123,c2VjcmV0", "CAPE_COORDINATOR": "http://127.0.0.1:1",
                                    "CAPE_SPOOL_DIR": str(tmp_path / "s"), "CAPE_STATE_DIR": str(tmp_path / "st")})
    caplog.set_level(logging.ERROR, logger="cape.runner")
    runner = Runner(y.spool, y.keys, model_bucket=lambda spec: model_bucket(config, spec.task.get("model_location")))
    assert runner.run_job(job.id) == "error"
    # Its dataview (a missing file) was never read: the model's destination was the first thing looked at.
    assert statuses(y.spool, job.id)[-1]["message"] == (
        "the model owner's worker could not store the model: the job names no model location and the model "
        "owner's worker has no CAPE_BUCKET; its operator sets CAPE_BUCKET, or the job is submitted again with a "
        "model location s3://bucket[/prefix]")
    assert "set CAPE_BUCKET to s3://bucket[/prefix] or file:///dir on the model owner's worker" in caplog.text


def test_a_missing_column_is_reported_without_the_files_other_columns(cape_server, tmp_path, caplog):
    """A job's error reaches every project member; the file's header is its owner's: the report names only the
    missing column (and a name differing by case), the owner's own log the whole header."""
    write_data(tmp_path / "data")
    job = approved_job(cape_server, tmp_path, x_uri=(tmp_path / "data" / "x.csv").as_uri(),
                       y_uri=(tmp_path / "data" / "y.csv").as_uri(), x_columns=("a", "B", "c"), y_column="t")
    x = job.seats["x_owner"]
    x.spool.put_job(x.spec)
    caplog.set_level(logging.ERROR, logger="cape.runner")
    assert Runner(x.spool, x.keys).run_job(job.id) == "error"
    assert statuses(x.spool, job.id)[-1]["message"] == (
        "dataview 'features': no column 'B' (the file has 3 columns: the data owner's worker log names them); did "
        "you mean 'b'?")
    x_uri = (tmp_path / "data" / "x.csv").as_uri()  # its own log: one line, with where the file is
    assert [r.getMessage() for r in caplog.records] == [
        f"job {job.id}: error: dataview 'features' ({x_uri}): no column 'B'; the file has 'a', 'b', 'c'"]


def test_an_unforeseen_failure_is_reported_without_its_details(cape_server, tmp_path, caplog, monkeypatch):
    """Every project member reads a job's error; an exception nobody foresaw may quote a path or a data value."""
    job = approved_job(cape_server, tmp_path)
    x = job.seats["x_owner"]
    x.spool.put_job(x.spec)

    def fails(self, job_id, resumed):
        raise OSError(5, "Input/output error", "/secret/bank/x.csv row 7: 1234.5")

    monkeypatch.setattr(Runner, "_run", fails)
    caplog.set_level(logging.ERROR, logger="cape.runner")
    assert Runner(x.spool, x.keys).run_job(job.id) == "error"
    assert statuses(x.spool, job.id)[-1]["message"] == (
        "the worker's runner failed unexpectedly (OSError); the details are in that worker's runner log")
    assert "/secret/bank/x.csv row 7: 1234.5" in caplog.text  # its operator still finds what happened


@pytest.mark.parametrize("failure, said", [
    (MemoryError("Unable to allocate 8.00 MiB for an array with shape (32768, 32)"), "ran out of memory"),
    (OSError(12, "Cannot allocate memory"), "ran out of memory"),  # mmap of the loaded columns
    (RuntimeError("can't start new thread"), "could not start a thread"),  # a pids limit, or address space
    (OSError(24, "Too many open files"), "ran out of open files"),
])
def test_a_failure_for_the_workers_own_limits_names_the_limit(cape_server, tmp_path, caplog, monkeypatch, failure,
                                                              said):
    """Tried as a new user would, in a container short of memory: the job said only "failed unexpectedly
    (OSError)" (or MemoryError, RuntimeError), and nobody learned that the worker needs more memory."""
    job = approved_job(cape_server, tmp_path)
    x = job.seats["x_owner"]
    x.spool.put_job(x.spec)

    def fails(self, job_id, resumed):
        raise failure

    monkeypatch.setattr(Runner, "_run", fails)
    caplog.set_level(logging.ERROR, logger="cape.runner")
    assert Runner(x.spool, x.keys).run_job(job.id) == "error"
    message = statuses(x.spool, job.id)[-1]["message"]
    assert message.startswith(f"the worker's runner {said}; its operator ") and "submitted again" in message
    assert str(failure) not in message  # the exception's own text stays in the worker's log
    assert [r.getMessage() for r in caplog.records][0].startswith(f"job {job.id}: the runner {said} (")
    assert str(failure) in caplog.text and "Traceback" not in caplog.text


def test_a_spool_that_refuses_writes_is_said_once_and_retried_not_a_traceback_a_second(tmp_path, caplog,
                                                                                       monkeypatch):
    """A full spool volume: the claim raised out of the job thread, which the scan started again every second (600
    traceback lines in 20 s). Unit test: the volume's refusal is simulated."""
    import errno

    from services.worker import runner as runner_module
    from tests.support.worker_messaging import worker_job

    monkeypatch.setattr(runner_module, "CLAIM_RETRY_SECONDS", 0.01)
    keys = WorkerKeys.load_or_create(tmp_path / "state")
    spool = Spool(tmp_path / "spool")
    job_id = "c" * 32
    spool.put_job(worker_job({s: keys for s in ("x_owner", "y_owner", "helper")}, "helper", job_id))
    real_claim = Spool.claim
    refuse = OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Spool, "claim", lambda self, j, working=False: (_ for _ in ()).throw(refuse))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    runner = Runner(spool, keys, run_dir=run_dir)
    caplog.set_level(logging.INFO, logger="cape.runner")
    assert [runner.run_job(job_id) for _ in range(3)] == ["waiting"] * 3
    refusals = [r.getMessage() for r in caplog.records if "cannot claim" in r.getMessage()]
    assert refusals == [f"job {job_id}: cannot claim it in the spool (No space left on device); free space on the "
                        "volume of CAPE_SPOOL_DIR; trying again every 0 s"]
    assert "Traceback" not in caplog.text and not spool.is_claimed(job_id)
    # For `health` and `status`, until the poller sees a write go through.
    from services.worker import health

    assert health.SPOOL_REFUSES_WRITES.read(run_dir)["message"] == ("the runner cannot write the spool (No space "
                                                                     "left on device)")
    monkeypatch.setattr(Spool, "claim", real_claim)
    monkeypatch.setattr(Runner, "_run", lambda self, j, resumed: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")))
    assert runner.run_job(job_id) == "error"
    assert f"job {job_id}: claimed; the spool takes writes again" in caplog.text
    assert statuses(spool, job_id)[-1]["message"] == (
        "the worker's spool volume refused a write (full or read-only); its operator frees space on CAPE_SPOOL_DIR's "
        "volume, then the job is submitted again")


def test_a_missing_dataview_file_is_an_error_not_a_hang(cape_server, tmp_path, caplog):
    """The job's error names the dataview, not its file; this worker's own log names the file too: its operator
    looked there first and found only "dataview 'features': no such file"."""
    job = approved_job(cape_server, tmp_path, x_uri=(tmp_path / "nope.csv").as_uri())
    x = job.seats["x_owner"]
    x.spool.put_job(x.spec)
    caplog.set_level(logging.ERROR, logger="cape.runner")
    assert Runner(x.spool, x.keys).run_job(job.id) == "error"
    message = statuses(x.spool, job.id)[-1]["message"]
    assert "dataview 'features'" in message and "no such file" in message and "nope.csv" not in message
    own = message.replace("dataview 'features'", f"dataview 'features' ({(tmp_path / 'nope.csv').as_uri()})")
    assert caplog.messages == [f"job {job.id}: error: {own}"]


def test_a_job_the_coordinator_ended_is_abandoned(data_job):
    job, _, _ = data_job
    x = job.seats["x_owner"]  # its peers never run: x waits for them until the job is stopped
    runner = Runner(x.spool, x.keys)
    threading.Timer(1.0, x.spool.mark_ended, args=(job.id, "Stopped", "stopped by a user")).start()
    started = time.monotonic()
    assert runner.run_job(job.id) == "abandoned"
    assert time.monotonic() - started < 10
    assert x.spool.done(job.id)["message"] == "the coordinator ended the job (Stopped)"
    assert [s["state"] for s in statuses(x.spool, job.id)] == ["started"]
    assert runner.runnable() == []


def test_keys_other_than_the_registered_ones_are_refused(data_job, tmp_path):
    job, _, _ = data_job
    x = job.seats["x_owner"]
    stranger = WorkerKeys.load_or_create(tmp_path / "other-state")
    assert Runner(x.spool, stranger).run_job(job.id) == "error"
    assert "other public keys" in statuses(x.spool, job.id)[-1]["message"]


@pytest.mark.parametrize("victim", ["runner", "messenger"])
def test_kill_9_mid_job_then_restart_gives_the_same_weights(data_job, tmp_path, victim):
    """A program of the output seat is SIGKILLed as soon as the job's messages start flowing, then restarted."""
    job, x, y = data_job
    procs: dict[tuple[str, str], subprocess.Popen] = {}
    try:
        for seat in SEATS:
            for program in ("messenger", "runner"):
                procs[(seat, program)] = start_program(program, job, seat, tmp_path)
        y_spool = job.seats["y_owner"].spool
        first_message = y_spool.root / ("inbox" if victim == "messenger" else "outbox") / job.id
        wait_for(lambda: first_message.is_dir() and any(first_message.rglob("*")), "the first message", timeout=60)
        procs[("y_owner", victim)].kill()
        procs[("y_owner", victim)].wait(timeout=10)
        procs[("y_owner", victim)] = start_program(victim, job, "y_owner", tmp_path)
        result = wait_for(lambda: y_spool.read_result(job.id), "the output seat's result", timeout=90)
        wait_for(lambda: y_spool.done(job.id), "the output seat's runner to finish")
    finally:
        stop_all(list(procs.values()))
    np.testing.assert_allclose(result["weights"], lstsq(x, y), atol=ACCURACY, rtol=0)
    assert job.seats["y_owner"].spool.done(job.id)["outcome"] == "completed"


def test_a_job_ended_before_it_ran_is_closed_without_running(data_job):
    job, _, _ = data_job
    x = job.seats["x_owner"]
    x.spool.mark_ended(job.id, "Stopped", "stopped by a user")
    runner = Runner(x.spool, x.keys)
    assert runner.runnable() == []
    assert x.spool.done(job.id) == {"outcome": "abandoned", "message": "the coordinator ended the job (Stopped)"}
    assert statuses(x.spool, job.id) == []  # nothing to report: it never started here


def test_sigterm_lets_a_running_job_pause_before_the_runner_exits(data_job, tmp_path):
    """SIGTERM interrupts the runner's main loop; the job threads still get to stop their job cleanly before the
    process ends (a killed thread would leave a step half done, e.g. a finished job's messages not yet removed)."""
    job, _, _ = data_job
    x = job.seats["x_owner"]  # its peers never run: its job waits for their messages
    proc = start_program("runner", job, "x_owner", tmp_path)
    log = tmp_path / "x_owner.runner.log"
    try:
        wait_for(lambda: f"job {job.id}: loaded its data" in log.read_text(), "the job to start", timeout=60)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        stop_all([proc])
    assert f"job {job.id}: paused (the runner is stopping); it resumes on restart" in log.read_text()
    assert x.spool.claimed_jobs() == [job.id]  # a restart resumes it
    assert x.spool.done(job.id) is None


def killed_again_and_again(job, base: Path, kill, cgroup: Path | None = None) -> str:
    """Start the x-owner's runner on its job (its peers never run: the job waits for their messages, loaded), stop it
    once with SIGTERM, then `kill(proc)` it MAX_KILLS_PER_JOB times once loaded, and start it again; its log."""
    from services.worker.runner import MAX_KILLS_PER_JOB

    x = job.seats["x_owner"]
    log = base / "x_owner.runner.log"
    proc = None

    def start_and_load(times: int) -> subprocess.Popen:
        started = start_program("runner", job, "x_owner", base, cgroup)
        wait_for(lambda: log.read_text().count(f"job {job.id}: loaded its data") == times, "the job to load",
                 timeout=60)
        return started

    try:
        proc = start_and_load(1)
        proc.send_signal(signal.SIGTERM)  # a stop: replayed at the next start, not counted
        assert proc.wait(timeout=10) == 0
        for loaded in range(2, 2 + MAX_KILLS_PER_JOB):
            proc = start_and_load(loaded)
            kill(proc)
            assert proc.wait(timeout=10) == -signal.SIGKILL
            assert x.spool.done(job.id) is None
        proc = start_program("runner", job, "x_owner", base, cgroup)
        done = wait_for(lambda: x.spool.done(job.id), "the job to end", timeout=60)
    finally:
        stop_all([proc] if proc else [])
    text = log.read_text()
    assert text.count(f"job {job.id}: loaded its data") == 1 + MAX_KILLS_PER_JOB  # not loaded a fifth time
    assert done["outcome"] == "error"
    assert x.spool.claimed_jobs() == []
    return text


def test_a_job_whose_runner_keeps_being_killed_ends_in_error(data_job, tmp_path):
    """Tried as a new user would, in a container short of memory: the kernel's OOM killer killed the runner as it
    loaded the job's data, supervisord (or Docker) restarted it, it replayed the job into the same death, 25 times in
    150 s, until its partners gave up after 5 times the job's timeout; nothing said memory. A clean stop
    (SIGTERM, `docker stop`) is not counted; the third kill ends the job. Here a SIGKILL from outside kills it: where
    the memory cgroup's counter can be read, the job says that was not for lack of memory."""
    from services.worker.memory_cgroup import oom_kill_count
    from services.worker.runner import MAX_KILLS_PER_JOB

    job, _, _ = data_job
    text = killed_again_and_again(job, tmp_path, lambda proc: proc.kill())
    readable = oom_kill_count() is not None
    message = statuses(job.seats["x_owner"].spool, job.id)[-1]["message"]
    assert message.startswith(f"the worker's runner was killed {MAX_KILLS_PER_JOB} times while it worked on this job")
    assert ("never by the OOM killer" in message) == readable
    assert ("more memory" in message) == (not readable)
    cause = ("not for lack of memory (its memory cgroup counted no OOM kill)" if readable
             else "most often for lack of memory (the kernel's OOM killer)")
    for kill in range(1, MAX_KILLS_PER_JOB + 1):
        assert (f"job {job.id}: the last runner was killed while it worked on this job ({kill} of "
                f"{MAX_KILLS_PER_JOB} times before the job ends in Error), {cause}"
                ) in text
        assert ("it ends now" if kill == MAX_KILLS_PER_JOB else "the job is replayed") in text


def test_a_runner_the_oom_killer_keeps_killing_ends_its_job_saying_memory_for_certain(data_job, tmp_path):
    """The runner in a memory cgroup of its own, as in a container with --memory, killed by the kernel's OOM killer
    each time (its memory cgroup counting each): the job's error says memory for certain, not "most often"."""
    from services.worker.runner import MAX_KILLS_PER_JOB

    job, _, _ = data_job
    with child_memory_cgroup() as group:
        text = killed_again_and_again(job, tmp_path, lambda proc: oom_kill_in(group, victim=proc.pid), group)
    message = statuses(job.seats["x_owner"].spool, job.id)[-1]["message"]
    assert message.startswith(f"the worker's runner was killed {MAX_KILLS_PER_JOB} times while it worked on this "
                              "job, each time by the kernel's OOM killer (its memory cgroup's count): the job needs "
                              "more memory than the worker's container has")
    assert text.count("for lack of memory: the kernel's OOM killer killed ") == MAX_KILLS_PER_JOB
    assert "most often" not in text


def test_a_run_loop_ended_by_sigterm_still_waits_for_its_job_threads(tmp_path, monkeypatch):
    """SIGTERM's handler raises SystemExit in the main thread, inside the loop's wait; the job threads must still
    be told to stop and be waited for, since the process then exits without finalizing."""
    spool = Spool(tmp_path / "spool")
    runner = Runner(spool, WorkerKeys.load_or_create(tmp_path / "state"))
    finished = []

    def job(job_id):
        runner.stop.wait(5)  # a job waiting for a message, until the stop
        time.sleep(0.3)  # a last step that must not be cut short
        finished.append(job_id)

    def sigterm(seen, poll, at_most=None):
        raise SystemExit(0)

    monkeypatch.setattr(runner, "runnable", lambda: ["job1"])
    monkeypatch.setattr(runner, "run_job", job)
    monkeypatch.setattr(spool.changes, "wait", sigterm)
    started = time.monotonic()
    with pytest.raises(SystemExit):
        runner.run()
    assert finished == ["job1"]
    assert time.monotonic() - started < 2


def test_an_idle_runner_hands_back_its_last_jobs_memory_once(tmp_path, monkeypatch):
    """After IDLE_RELEASE_SECONDS with no job (not between back-to-back jobs), once per idle spell."""
    import threading

    from services.worker import runner as runner_module
    from services.worker.keys import WorkerKeys
    from services.worker.runner import Runner
    from services.worker.spool import Spool

    released = []
    monkeypatch.setattr(runner_module, "release_freed_memory", lambda: released.append(time.monotonic()))
    monkeypatch.setattr(runner_module, "IDLE_RELEASE_SECONDS", 0.2)
    runner = Runner(Spool(tmp_path / "spool"), WorkerKeys.load_or_create(tmp_path / "state"))
    runner.start_due()
    assert released == []  # never ran a job: nothing to give back
    finished = threading.Thread(target=lambda: None)
    finished.start()
    finished.join()
    runner._threads["job1"] = finished  # a job thread that ended
    ended_at = time.monotonic()
    runner.start_due()
    assert released == []  # not at once: the next job may follow
    time.sleep(0.25)
    runner.start_due()
    runner.start_due()
    assert len(released) == 1 and released[0] - ended_at >= 0.2


def test_a_dataview_download_says_its_progress_and_retries_on_the_seat_and_stops_with_the_job(tmp_path, monkeypatch,
                                                                                              caplog):
    """A slow store looked like a hung one: the seat said "started 0%" for minutes, the log nothing."""
    from services.worker import runner as runner_module
    from services.worker.spool_transport import JobInterrupted

    monkeypatch.setattr(runner_module, "LOAD_SAID_EVERY_SECONDS", 0.0)
    monkeypatch.setattr(runner_module, "LOAD_LOGGED_EVERY_SECONDS", 0.0)
    spool = Spool(tmp_path / "spool")
    job_id = "d" * 32
    ended: list[str] = []
    watch = runner_module._LoadWatch(spool, job_id, lambda: ended[0] if ended else None)
    caplog.set_level(logging.INFO, logger="cape.runner")
    watch.received(64 * 2**20, 256 * 2**20)
    watch.retrying("the data store is busy or unavailable (SlowDown)", 4.2)
    updates = [item.read() for item in spool.pending_status()]
    assert updates == [
        {"state": "running", "progress": 0.0, "message": "loading its data: 64 of 256 MiB"},
        {"state": "running", "progress": 0.0,
         "message": "loading its data: the data store is busy or unavailable (SlowDown); trying again"}]
    assert f"job {job_id}: loading its data: 64 of 256 MiB" in caplog.text
    assert "trying again in 4 s" in caplog.text
    ended.append("the coordinator ended the job (Stopped)")
    with pytest.raises(JobInterrupted, match="Stopped"):
        watch.received(65 * 2**20, 256 * 2**20)


def test_a_job_queued_for_a_slot_tells_its_partners_it_is_still_preparing_until_it_leaves(tmp_path):
    """Its partners, already computing, would otherwise give it up after the job's timeout (keepalive.py)."""
    from services.worker.job_spec import JobSpec
    from services.worker.keepalive import interval_for
    from services.worker.sealing import MessageAddress, SealedMessage
    from tests.support.worker_messaging import worker_job

    keys = {seat: WorkerKeys.load_or_create(tmp_path / seat / "state") for seat in SEATS}
    job_id = "a" * 32
    spool = Spool(tmp_path / "x_owner" / "spool")
    spool.put_job(worker_job(keys, "x_owner", job_id))  # its timeout is 5 s: a keep-alive every 1.25 s
    runner = Runner(spool, keys["x_owner"], max_parallel=1)
    assert runner.slots.take("other", "2025-01-01T00:00:00Z", resumed=True) is None  # its one slot is busy
    thread = threading.Thread(target=runner.run_job, args=(job_id,))
    thread.start()
    try:
        wait_for(lambda: runner.keepalives.sent >= 2, "two keep-alives", timeout=10)
    finally:
        runner.stop.set()
        spool.changes.wake()
        thread.join(timeout=10)
    sent = runner.keepalives.sent
    time.sleep(2 * interval_for(5))
    assert runner.keepalives.sent == sent  # the job left (paused by the stop): no more
    for seat in ("y_owner", "helper"):
        items = [item for item in spool.pending_outbox() if item.to_seat == seat]
        # and maybe the next one, being written as the job left
        assert [item.name for item in items][:sent] == [f"x_owner.preparing.{n}" for n in range(1, sent + 1)]
        assert len(items) <= sent + 1
        with open(items[0].path, "rb") as sealed:
            plain = SealedMessage.open_bytes(sealed.read(), MessageAddress(job_id, "x_owner", seat, items[0].name),
                                             keys[seat].encryption, JobSpec.parse(worker_job(keys, seat, job_id))
                                             .parties["x_owner"].signing_key)
        assert json.loads(plain) == {"phase": "queued at its worker: all 1 of the worker's job slots are taken by "
                                              "jobs loading their data or computing"}


def test_the_seat_says_what_this_workers_messenger_reports_during_a_long_wait(data_job, tmp_path, monkeypatch):
    """A message held on this side (the spool short of room) showed nothing on the waiting seat until the timeout:
    the seat says what this worker's own messenger reports, in the words of a wait's timeout, and not once it clears."""
    from services.worker import health, spool_transport

    monkeypatch.setattr(spool_transport, "OWN_TROUBLE_LOOK_SECONDS", 0.05)
    job, _, _ = data_job
    x = job.seats["x_owner"]  # its partners never run: it waits for their messages
    run_dir = tmp_path / "x-run"
    run_dir.mkdir()
    runner = Runner(x.spool, x.keys, run_dir=run_dir)
    thread = threading.Thread(target=runner.run_job, args=(job.id,), daemon=True)
    thread.start()
    said = "meanwhile this worker's messenger reports: the spool volume is short of room or refuses writes"

    def messages() -> list[str]:
        return [s.get("message") or "" for s in statuses(x.spool, job.id)]

    try:
        wait_for(lambda: x.spool.is_claimed(job.id), "the job to be claimed")
        health.SPOOL_SHORT_OF_ROOM.record(run_dir, "message m of job j waits at the broker")
        waiting = wait_for(lambda: next((m for m in messages() if said in m), None), "the seat to say it")
        assert waiting.startswith("waiting for the ") and " worker; " + said in waiting
        health.SPOOL_SHORT_OF_ROOM.note(run_dir, None, logging.getLogger("test"))
        wait_for(lambda: messages()[-1].startswith("waiting for the ") and said not in messages()[-1],
                 "the seat to drop it")
    finally:
        runner.stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()
    from services.worker.runner import _Progress

    progress = _Progress(x.spool, job.id)  # the wait's end puts back what the seat said before it
    progress(0.4, "computing the products")
    Runner._own_trouble_changed(progress, "y_owner", "the broker did not answer", True)
    Runner._own_trouble_changed(progress, "y_owner", None, False)
    assert statuses(x.spool, job.id)[-1] == {"state": "running", "progress": 0.4, "message": "computing the products"}
