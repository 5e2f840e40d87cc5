"""A worker started exactly as the image starts it (`cape-worker run`, conf/supervisord.conf), under real
supervisord: four programs RUNNING, a killed program respawned, a FATAL program ends the worker non-zero,
SIGTERM stops everything within 10 s (also while a program is in BACKOFF), the heartbeat carries the programs'
states, a non-root worker whose stdout is a root-owned pipe still logs, and orphans are reaped (no init needed)."""
import contextlib
import fcntl
import json
import os
import pwd
import re
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil
import pytest

from services.worker import health
from services.worker.keys import ENCRYPTION_KEY_FILE
from services.worker.memory_cgroup import oom_kill_count
from tests.support.cgroups import child_memory_cgroup, oom_kill_in
from tests.support.workers import worker_env

pytestmark = pytest.mark.timeout(120)


def cape_worker(*args, env):
    return subprocess.run(["cape-worker", *args], env=env, capture_output=True, text=True, timeout=30)


def test_worker_lifecycle_running_respawn_and_sigterm(start_worker, tmp_path):
    """One worker: four programs RUNNING (health, status), kill -9 respawns, SIGTERM stops all within 10 s."""
    env = worker_env(tmp_path, "org-a")
    worker = start_worker(env)
    assert worker.wait_running() == {p: "RUNNING" for p in health.PROGRAMS}
    # The spool holds job specs (dataview uris), received shares and results: this user's alone.
    spool = Path(env["CAPE_SPOOL_DIR"])
    for path in [spool, *spool.rglob("*")]:
        assert path.stat().st_mode & 0o077 == 0, (path, oct(path.stat().st_mode))
    result = cape_worker("health", env=env)
    assert result.returncode == 0, result.stdout
    assert result.stdout.strip() == "healthy: poller RUNNING, messenger RUNNING, runner RUNNING, uploader RUNNING"
    result = cape_worker("status", env=env)
    assert result.returncode == 0
    for program in health.PROGRAMS:
        assert f"  {program:<10} RUNNING" in result.stdout
    assert "jobs in " in result.stdout
    # Every program's own lines reach the worker's stdout, one per event.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "poller WARNING cannot reach the coordinator" not in worker.output:
        time.sleep(0.2)
    assert "poller WARNING cannot reach the coordinator at http://127.0.0.1:9" in worker.output
    assert "uploader INFO uploading results to file://" in worker.output

    # kill -9: supervisord respawns the program; the others keep running.
    for program in ("runner", "messenger"):
        old = worker.pid(program)
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            info = worker.supervisor().getProcessInfo(f"worker:{program}")
            if info["pid"] not in (0, old) and info["statename"] in ("STARTING", "RUNNING"):
                break
            time.sleep(0.1)
        assert info["pid"] not in (0, old), info
    # While a program is STARTING again the health check says so.
    result = cape_worker("health", env=env)
    assert result.returncode == 1 and "unhealthy: " in result.stdout
    worker.wait_running()

    # SIGTERM (docker stop): every program and supervisord end within 10 s, exit 0.
    pids = [worker.pid(p) for p in health.PROGRAMS]
    supervisord_pid = int((worker.run_dir / "supervisord.pid").read_text())
    started = time.monotonic()
    worker.proc.send_signal(signal.SIGTERM)
    code = worker.wait_exit(timeout=10)
    elapsed = time.monotonic() - started
    assert code == 0, worker.output[-2000:]
    assert elapsed < 10
    for program in ("fatal_listener", *health.PROGRAMS):  # each stopped on its own, no SIGKILL, no WARN line
        assert f"INFO stopped: {program} (exit status 0)" in worker.output, worker.output[-2000:]
    for pid in [*pids, supervisord_pid]:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    result = cape_worker("health", env=worker.env)
    assert result.returncode == 1 and result.stdout.startswith("unhealthy: ")


def test_supervisords_own_lines_are_stamped_in_utc_as_the_programs_lines_are(start_worker, tmp_path):
    """Under a host's local zone (here UTC+14) supervisord's lines read 14 hours off the programs' lines."""
    env = {**worker_env(tmp_path, "org-a"), "TZ": "Pacific/Kiritimati"}
    worker = start_worker(env)
    worker.wait_running()
    stamps = re.findall(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+ INFO success: ", worker.output, re.MULTILINE)
    assert stamps, worker.output
    said = datetime.strptime(stamps[0], "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    assert abs((datetime.now(UTC) - said).total_seconds()) < 120, (stamps[0], worker.output)


def test_program_that_keeps_failing_makes_worker_exit_non_zero_saying_oom_kills_before(start_worker, tmp_path):
    """A program that keeps failing ends the worker, exit 3 (a FATAL marker that cannot be written: below). In a
    memory cgroup of its own, as in a container with --memory, whose processes the OOM killer took before (one
    killed within supervisord's start window ends FATAL): the exit says the OOM kills beside `cape-worker check`."""
    with child_memory_cgroup() as group:
        worker = start_worker(worker_env(tmp_path, "org-a"), cgroup=group)
        worker.wait_running()
        assert oom_kill_in(group) == -signal.SIGKILL
        corrupt_keys_under(worker, tmp_path, "org-a")
        assert worker.wait_exit(timeout=60) == 3, worker.output[-2000:]
    assert "not a readable private key" in worker.output
    assert ("`cape-worker check` tests the configuration. Out of memory: the kernel's OOM killer killed 1 of this "
            "worker's processes since it started (its memory cgroup's count); give the worker more memory (README, "
            "\"Memory and other limits\").") in worker.output


def corrupt_keys_under(worker, tmp_path, name):
    """Once the worker runs, its key file becomes no key and its programs are killed: each that loads the keys then
    fails at every restart. (`run` refuses such a file before it starts anything.)"""
    worker.wait_running()
    key = tmp_path / name / "state" / ENCRYPTION_KEY_FILE
    key.write_text("not a key")
    os.chmod(key, 0o600)
    for program in ("poller", "messenger", "runner", "uploader"):
        os.kill(worker.pid(program), signal.SIGKILL)


def test_sigterm_while_a_program_is_in_backoff_is_a_clean_stop(start_worker, tmp_path):
    """supervisord turns a program waiting in BACKOFF into FATAL while it stops: that is no failure, exit 0."""
    worker = start_worker(worker_env(tmp_path, "org-b"))
    corrupt_keys_under(worker, tmp_path, "org-b")
    # Catch a program entering its second BACKOFF (supervisord then waits 2 s before the next retry), so it is
    # surely still in BACKOFF when the stop begins; the listener is up by then to see the FATAL the stop causes.
    deadline = time.monotonic() + 30
    states, previous, entries = {}, {}, {}
    while time.monotonic() < deadline and max(entries.values(), default=0) < 2:
        states = worker.states()
        for program, state in states.items():
            if state == "BACKOFF" and previous.get(program) != "BACKOFF":
                entries[program] = entries.get(program, 0) + 1
        previous = states
        time.sleep(0.02)
    assert max(entries.values(), default=0) == 2 and "FATAL" not in states.values(), (entries, states)
    worker.proc.send_signal(signal.SIGTERM)
    code = worker.wait_exit(timeout=10)
    # supervisord turns the BACKOFF into FATAL while stopping; the listener ignores it ("FATAL while the worker
    # stops; ignored") when it gets the event before supervisord stops it too, and `run` ignores a marker
    # written after the stop signal.
    assert code == 0, worker.output[-2000:]
    assert "kept failing (FATAL)" not in worker.output


def test_health_fails_without_a_worker(tmp_path):
    env = worker_env(tmp_path, "nobody-here")
    result = cape_worker("health", env=env)
    assert result.returncode == 1
    assert "no supervisord socket" in result.stdout


def test_non_root_worker_with_root_owned_stdout_pipe():
    """As in `docker run` with USER: stdout is a pipe created by root; the programs' lines still come out."""
    if os.geteuid() != 0:
        pytest.skip("needs root to start a worker as another user")
    nobody = pwd.getpwnam("nobody")
    base = Path(tempfile.mkdtemp(prefix="cape-nonroot-", dir="/tmp"))  # pytest's tmp dirs are 0700 root
    os.chmod(base, 0o755)
    folder = base / "org-n"
    folder.mkdir()
    os.chown(folder, nobody.pw_uid, nobody.pw_gid)
    env = worker_env(base, "org-n", HOME=str(folder))
    proc = subprocess.Popen(["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups",
                             "cape-worker", "run"], env=env, cwd=folder, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    lines = []
    try:
        deadline = time.monotonic() + 30
        os.set_blocking(proc.stdout.fileno(), False)
        while time.monotonic() < deadline and not any("poller WARNING" in line for line in lines):
            chunk = proc.stdout.read()
            if chunk:
                lines.extend(chunk.decode(errors="replace").splitlines())
            time.sleep(0.2)
        text = "\n".join(lines)
        assert "poller WARNING cannot reach the coordinator" in text, text[-2000:]
        assert "EACCES" not in text and "Permission denied" not in text
        states = health.program_states(folder / "state" / "run")
        assert set(states) == set(health.PROGRAMS) and "FATAL" not in states.values()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        shutil.rmtree(base, ignore_errors=True)


def heartbeat_programs(server, org_id):
    """The program states of the organization's last heartbeat, as the coordinator stored them."""
    with contextlib.closing(sqlite3.connect(server.data_dir / "coordinator.sqlite3", timeout=5)) as db:
        row = db.execute("SELECT programs FROM workers WHERE org_id = ?", (org_id,)).fetchone()
    return json.loads(row[0]) if row and row[0] else None


def test_heartbeat_carries_the_programs_states(cape_server, start_worker, tmp_path):
    org = cape_server.create_org("acme")
    env = worker_env(tmp_path, "acme", CAPE_TOKEN=org["organization_token"], CAPE_COORDINATOR=cape_server.url)
    worker = start_worker(env)
    org_id = org["organization"]["id"]
    running = {p: "RUNNING" for p in health.PROGRAMS}

    def wait_for(predicate, what):
        deadline = time.monotonic() + 30
        seen = []
        while time.monotonic() < deadline:
            programs = heartbeat_programs(cape_server, org_id)
            if not seen or seen[-1] != programs:
                seen.append(programs)
            if predicate(programs):
                return
            time.sleep(0.1)
        pytest.fail(f"no heartbeat with {what}; heartbeats seen: {seen}")

    wait_for(lambda p: p == running, "all four programs RUNNING")
    os.kill(worker.pid("runner"), signal.SIGKILL)  # a respawned program is STARTING for startsecs, then RUNNING
    wait_for(lambda p: p and p["runner"] in ("STARTING", "BACKOFF") and p["poller"] == "RUNNING", "runner restarting")
    wait_for(lambda p: p == running, "runner RUNNING again")


def test_fatal_listener_ignores_fatal_once_supervisord_is_stopping(tmp_path, monkeypatch):
    from services.worker.fatal_listener import FatalListener, read_marker

    signals = []
    monkeypatch.setattr(os, "kill", lambda pid, signum: signals.append((pid, signum)))
    fatal = ({"eventname": "PROCESS_STATE_FATAL"}, "processname:runner groupname:worker from_state:BACKOFF")
    listener = FatalListener(tmp_path, supervisord_pid=4242)
    assert listener.handle(*fatal) == "runner"
    assert read_marker(tmp_path)["program"] == "runner" and signals == [(4242, signal.SIGTERM)]

    (tmp_path / "fatal").unlink()
    signals.clear()
    stopping = FatalListener(tmp_path, supervisord_pid=4242)
    assert stopping.handle({"eventname": "SUPERVISOR_STATE_CHANGE_STOPPING"}, "") is None
    assert stopping.handle(*fatal) is None
    assert read_marker(tmp_path) is None and signals == []


def test_fatal_listener_stops_the_worker_when_its_marker_cannot_be_written(tmp_path, monkeypatch, capsys):
    """A full CAPE_STATE_DIR volume (the run dir is in it): the listener's marker write failed, the listener
    crashed, and supervisord ran on with three programs FATAL and no exit (seen on a full tmpfs state dir)."""
    from services.worker.fatal_listener import FatalListener

    signals = []
    monkeypatch.setattr(os, "kill", lambda pid, signum: signals.append((pid, signum)))
    run_dir = tmp_path / "not-a-folder"
    run_dir.write_text("")  # the marker's folder refuses the write, as a full volume does
    listener = FatalListener(run_dir, supervisord_pid=4242)
    fatal = ({"eventname": "PROCESS_STATE_FATAL"}, "processname:poller groupname:worker from_state:BACKOFF")
    assert listener.handle(*fatal) == "poller"
    assert signals == [(4242, signal.SIGTERM)]
    assert f"fatal_listener: cannot record the failure in {run_dir} (" in capsys.readouterr().err


def test_repeated_stop_signals_still_end_in_a_clean_exit(start_worker, tmp_path):
    """`docker stop` then an impatient second one (or Ctrl-C pressed twice): still exit 0, never 'killed'."""
    env = worker_env(tmp_path, "org-twice")
    worker = start_worker(env)
    worker.wait_running()
    deadline = time.monotonic() + 15
    while worker.proc.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(ProcessLookupError):
            worker.proc.send_signal(signal.SIGTERM)
        time.sleep(0.005)
    assert worker.wait_exit(5) == 0


def test_run_reaps_orphans_so_the_image_needs_no_init(start_worker, tmp_path):
    """Without `docker run --init` (or under Kubernetes) `cape-worker run` is PID 1: an orphan re-parented to it
    must not stay a zombie. A program here leaves a child behind; it is re-parented to `cape-worker run` (a child
    subreaper, as PID 1 would be), and reaped when it ends."""
    conf = tmp_path / "supervisord.conf"
    orphan_pid = tmp_path / "orphan.pid"
    conf.write_text((Path(__file__).parents[1] / "conf" / "supervisord.conf").read_text() + f"""
[program:leaves_an_orphan]
command=/bin/sh -c 'sleep 1.5 & echo $! > {orphan_pid}; exit 0'
autorestart=false
startsecs=0
""")
    worker = start_worker(worker_env(tmp_path, "org-a", CAPE_WORKER_CONF=str(conf)))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (orphan_pid.exists() and orphan_pid.read_text().strip()):
        time.sleep(0.05)
    orphan = psutil.Process(int(orphan_pid.read_text()))
    parents = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and worker.proc.pid not in parents:  # the shell may not have exited yet
        with contextlib.suppress(psutil.NoSuchProcess):
            parents.append(orphan.ppid())
        time.sleep(0.05)
    assert worker.proc.pid in parents, f"the orphan's parents were {set(parents)}, not cape-worker run"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and psutil.pid_exists(orphan.pid):
        time.sleep(0.1)
    assert not psutil.pid_exists(orphan.pid), f"orphan {orphan.pid} is {orphan.status()}"  # a zombie until reaped
    assert worker.proc.poll() is None  # the worker itself goes on


def test_programs_stop_when_supervisord_is_killed(start_worker, tmp_path):
    """`kill -9` of supervisord and `cape-worker run` (outside Docker nothing else stops the programs): the four
    programs notice their parent is gone and stop, so a new `cape-worker run` does not start a second set."""
    worker = start_worker(worker_env(tmp_path, "org-killed"))
    worker.wait_running()
    programs = {name: worker.pid(name) for name in ("poller", "messenger", "runner", "uploader")}
    supervisord = [p for p in psutil.Process(worker.proc.pid).children() if "supervisord" in " ".join(p.cmdline())]
    assert len(supervisord) == 1
    os.kill(worker.proc.pid, signal.SIGKILL)
    supervisord[0].kill()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"
                                              for pid in programs.values()):
        time.sleep(0.1)
    left = {name: pid for name, pid in programs.items()
            if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"}
    assert left == {}, f"still running after supervisord was killed: {left}\n{worker.output[-2000:]}"


def test_a_killed_supervisord_is_said_and_run_exits_137(start_worker, tmp_path):
    """An OOM kill of supervisord: `run` exited 247 without a word, and the log simply stopped."""
    worker = start_worker(worker_env(tmp_path, "org-oom"))
    worker.wait_running()
    supervisord = [p for p in psutil.Process(worker.proc.pid).children() if "supervisord" in " ".join(p.cmdline())]
    supervisord[0].kill()
    assert worker.wait_exit(30) == 137
    cause = "(out of memory?)" if oom_kill_count() is None else "(not by the OOM killer: its memory cgroup counted none)"
    assert (f"cape-worker: supervisord was killed by signal SIGKILL {cause}; its programs stopped, and work "
            "already handed over resumes at the next start") in worker.output


def test_supervisord_killed_by_the_oom_killer_is_said_for_certain(start_worker, tmp_path):
    """The worker in a memory cgroup of its own, as in a container with --memory: the kernel's OOM killer takes
    supervisord; its memory cgroup's count says so, and what to do."""
    with child_memory_cgroup() as group:
        worker = start_worker(worker_env(tmp_path, "org-oom"), cgroup=group)
        worker.wait_running()
        supervisord = [p for p in psutil.Process(worker.proc.pid).children()
                       if "supervisord" in " ".join(p.cmdline())]
        oom_kill_in(group, victim=supervisord[0].pid)
        assert worker.wait_exit(30) == 137
    assert ("cape-worker: supervisord was killed by signal SIGKILL (out of memory: the kernel's OOM killer killed "
            in worker.output), worker.output[-2000:]
    assert ("of this worker's processes since it started (its memory cgroup's count); give the worker more memory, "
            "README \"Memory and other limits\"); its programs stopped") in worker.output


def test_a_new_run_waits_for_programs_still_holding_the_spool(start_worker, tmp_path, monkeypatch):
    """Programs of a killed supervisord stop within seconds, but a run started at once must not start a second set
    beside them: they hold the spool's programs lock (shared) for their lives, and a run waits for it (then gives
    up, exit 2)."""
    env = worker_env(tmp_path, "org-again")
    spool = Path(env["CAPE_SPOOL_DIR"])
    spool.mkdir(parents=True)
    held = os.open(spool / ".programs.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(held, fcntl.LOCK_SH)  # as an orphaned program does
    worker = start_worker(env)
    time.sleep(2)
    assert worker.proc.poll() is None and worker.states() == {}  # waiting: no supervisord yet
    os.close(held)
    worker.wait_running()

    worker.stop()
    held = os.open(spool / ".programs.lock", os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_SH)
    try:
        refused = start_worker(env)
        assert refused.wait_exit(20) == 2
        assert (f"cape-worker: programs of an earlier worker still run on CAPE_SPOOL_DIR={spool} (they hold "
                f"{spool / '.programs.lock'}); stop them first") in refused.output
    finally:
        os.close(held)


def test_a_programs_scratch_files_left_by_a_kill_go_when_it_starts_again(start_worker, tmp_path):
    """A runner killed while reading an s3:// dataview left part of the organization's data in tmp/ until the
    messenger happened to restart (and then only if over an hour old)."""
    env = worker_env(tmp_path, "org-a")
    scratch = Path(env["CAPE_SPOOL_DIR"]) / "tmp"
    scratch.mkdir(parents=True, mode=0o700)
    leftovers = [scratch / ".scratch-0123456789abcdef.csv.tmp", scratch / ".upload-4242-1.tmp"]
    recent = scratch / ".spec.json.tmp"  # another writer's, recent: may be in use, stays
    for path in [*leftovers, recent]:
        path.write_bytes(b"age,income\n41,52000\n")
    worker = start_worker(env)
    worker.wait_running()
    deadline = time.monotonic() + 10
    while any(path.exists() for path in leftovers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(path.exists() for path in leftovers)
    assert recent.exists()
    assert "runner INFO removed 1 partial dataview download(s) left by an earlier runner" in worker.output


def test_a_fatal_program_ends_the_worker_non_zero_even_when_its_marker_cannot_be_written(start_worker, tmp_path):
    """A full CAPE_STATE_DIR volume refused the FATAL marker: the listener stopped supervisord all the same, but
    `run` found no marker and exited 0, as after a `docker stop`, so a restart policy of on-failure (or an
    orchestrator that takes 0 for a job done) left the worker down, and no line said why it stopped."""
    worker = start_worker(worker_env(tmp_path, "org-nomark"))
    worker.wait_running()
    (tmp_path / "org-nomark" / "state" / "run" / ".fatal.tmp").mkdir()  # the marker's write fails, as on a full disk
    corrupt_keys_under(worker, tmp_path, "org-nomark")
    code = worker.wait_exit(timeout=60)
    assert code not in (None, 0), worker.output[-2000:]
    assert "fatal_listener: cannot record the failure" in worker.output
    assert "kept failing (FATAL)" in worker.output
    assert "not a readable private key" in worker.output
    assert "OOM killer" not in worker.output  # none counted (or no counter): none said
