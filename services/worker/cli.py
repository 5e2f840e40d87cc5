"""`cape-worker`: run the appliance (`run`, the image's CMD), check its configuration and endpoints (`check`),
show its programs, a refused token and its jobs (`status`), and answer Docker's HEALTHCHECK (`health`)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, NoReturn, TypeVar

import click
from dotenv import load_dotenv

from services.file_locks import lock_file
from services.tables import cell_text
from services.worker import health as health_mod
from services.worker import reaper
from services.worker.keys import KeyFileError, WorkerKeys, check_key_files, existing_fingerprint
from services.worker.config import ConfigError, LocalConfig, WorkerConfig, env_file_path, setting_warnings
from services.worker.disk_advice import disk_advice
from services.worker.fatal_listener import UNRECORDED_FATAL_SIGNAL, marker_path, read_marker
from services.worker.memory_cgroup import memory_limit, oom_kill_count, oom_kills_said, oom_kills_since
from services.worker.outage_log import UNHEALTHY_AFTER_SECONDS
from services.worker.program import PROGRAMS_LOCK_NAME
from services.worker.resource_limits import memory_limit_said, open_files_problem
from services.worker.spool import Spool

T = TypeVar("T")
PROGRAMS = health_mod.PROGRAMS
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
LIVE_PROBE_TIMEOUT = 2.0
LOCK_NAME = "worker.lock"
FINISHED_SHOWN = 10  # `status` lists the jobs in progress, then this many finished ones (--all: every one kept)
ORPHANS_STOP_SECONDS = 10.0  # a program notices within 1 s that supervisord is gone, then stops within 4 s
CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}  # inherited by every subcommand


def supervisord_conf() -> Path:
    """conf/supervisord.conf: CAPE_WORKER_CONF (the file or its directory), else the source tree's conf/."""
    override = os.environ.get("CAPE_WORKER_CONF")
    if override:
        path = Path(override)
        return path / "supervisord.conf" if path.is_dir() else path
    return Path(__file__).resolve().parents[2] / "conf" / "supervisord.conf"


def _load_dotenv() -> None:
    """Variables from CAPE_ENV_FILE or ./.env join the environment (the environment wins), for every program.
    Raises ConfigError if CAPE_ENV_FILE names a file that cannot be read."""
    env_file = env_file_path(os.environ)
    if env_file:
        load_dotenv(env_file, override=False)


def _config_or_exit(load: Callable[[], T] = WorkerConfig.from_env) -> T:
    """`load()` after the .env file joins the environment, warning first of each CAPE_ variable the worker does not
    read (a misspelling loses its setting, and may be why `load()` fails); a configuration error ends the command
    (exit 2)."""
    try:
        _load_dotenv()
        for warning in setting_warnings(os.environ):
            click.echo(f"cape-worker: warning: {warning}", err=True)
        return load()
    except ConfigError as exc:
        click.echo(f"cape-worker: configuration error: {exc}", err=True)
        sys.exit(2)


def _for_this_user_only() -> None:
    """Everything this command and its children create is for this user alone: what the worker writes (job specs
    with dataview uris, inbox shares, results, keys) must not become readable by others, whichever command made
    its folders first."""
    os.umask(0o077)


def _make_private(folder: Path) -> None:
    """A spool or state folder others may read (made by an older worker, before the umask above, or by hand) is
    made this user's alone: it holds job specs with dataview uris, shares, models and keys."""
    mode = folder.stat().st_mode & 0o777
    if not mode & 0o077:
        return
    try:
        folder.chmod(0o700)
    except OSError as exc:
        click.echo(f"cape-worker: warning: {folder} is open to other users (mode {mode:o}) and cannot be made "
                   f"private ({exc.strerror}); chmod 700 it as its owner", err=True)
        return
    click.echo(f"cape-worker: {folder} was open to other users (mode {mode:o}); it is this user's alone now (700)",
               err=True)


def _live_supervisord(run_dir: Path) -> Path | None:
    """The socket of a supervisord that accepts connections in `run_dir`, or None. A socket file left by a worker
    that was killed refuses connections (supervisord replaces it), so only a live one counts."""
    sock = run_dir / health_mod.SOCKET_NAME
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(LIVE_PROBE_TIMEOUT)
        try:
            probe.connect(str(sock))
        except TimeoutError:
            return sock  # its listen backlog is full: busy, but alive
        except OSError:
            return None  # no socket, or a stale one (ECONNREFUSED)
    return sock


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(package_name="cape-workers", prog_name="cape-worker")  # as cape and cape-server
def main() -> None:
    """The cape worker appliance: one per organization."""


@main.command()
def run() -> None:
    """Start supervisord in the foreground with the four programs (what the Docker image runs)."""
    config = _config_or_exit()
    for warning in config.warnings():
        click.echo(f"cape-worker: warning: {warning}", err=True)
    conf = supervisord_conf()
    if not conf.is_file():
        click.echo(f"cape-worker: {conf} not found; set CAPE_WORKER_CONF to the conf/ directory", err=True)
        sys.exit(2)
    # Before anything changes: a second supervisord would only refuse once this run had removed the running
    # worker's FATAL marker, and with its own raw error.
    live = _live_supervisord(config.run_dir)
    if live is not None:
        _already_running(config, f"its supervisord answers on {live}")
    if files_problem := open_files_problem():
        click.echo(f"cape-worker: {files_problem}", err=True)
        sys.exit(2)
    enough, memory = memory_limit_said(memory_limit())
    if not enough:  # it may still run small jobs; `check` fails on it
        click.echo(f"cape-worker: warning: {memory}", err=True)
    socket_problem = health_mod.socket_path_problem(config.run_dir)  # `check` fails on it too
    if socket_problem:
        click.echo(f"cape-worker: {socket_problem}", err=True)
        sys.exit(2)
    try:  # as each program loads them: a bad one would make all four fail, restart and end FATAL
        check_key_files(config.state_dir)
    except (KeyFileError, OSError) as exc:
        click.echo(f"cape-worker: {exc if isinstance(exc, KeyFileError) else exc.strerror}; see `cape-worker check`",
                   err=True)
        sys.exit(2)
    _for_this_user_only()  # inherited by supervisord and the four programs
    try:
        config.spool_dir.mkdir(parents=True, exist_ok=True)
        config.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        config.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for folder in (config.spool_dir, config.state_dir):
            _make_private(folder)
        Spool(config.spool_dir)
    except OSError as exc:
        click.echo(f"cape-worker: cannot prepare {exc.filename}: {exc.strerror}; make CAPE_SPOOL_DIR and "
                   "CAPE_STATE_DIR writable volumes", err=True)
        sys.exit(2)
    try:  # made here once, not by the four programs: a state volume with no room for them crash-looped all four
        WorkerKeys.load_or_create(config.state_dir)
    except (KeyFileError, OSError) as exc:
        advice = disk_advice(exc if isinstance(exc, OSError) else OSError(), "CAPE_STATE_DIR")
        reason = exc if isinstance(exc, KeyFileError) else exc.strerror or exc
        click.echo(f"cape-worker: cannot make the worker's keys in {config.state_dir}: {reason}; {advice}", err=True)
        sys.exit(2)
    locks = _lock_run_dir(config)  # held until we exit; closes the race of two runs passing the check above
    oom_kills_at_start = oom_kill_count()  # what a death below is put down to
    _wait_for_earlier_programs(config)
    marker = marker_path(config.run_dir)
    marker.unlink(missing_ok=True)
    for record in health_mod.POLLER_RECORDS:
        record.clear(config.run_dir)  # the token or the network may have changed: the poller says anew
    # TZ=UTC: supervisord stamps its own lines in local time, without a zone, between the programs' UTC lines.
    env = {**os.environ, "CAPE_RUN_DIR": str(config.run_dir), "CAPE_PYTHON": sys.executable, "TZ": "UTC",
           "CAPE_RUN_PID": str(os.getpid()),
           # This run's own: a runner that finds the mark of one from another run died with the whole worker
           "CAPE_RUN_ID": uuid.uuid4().hex}
    # The FATAL listener's word when it could not write its marker (a full state volume): set before supervisord
    # starts, as the signal's default action would end this process.
    unrecorded_fatal: list[float] = []
    signal.signal(UNRECORDED_FATAL_SIGNAL, lambda _signum, _frame: unrecorded_fatal.append(time.time()))
    # supervisord is our child, not exec'd: its exit status is 0 even after a FATAL, so we read the marker.
    # Its output (and the programs', via stdout_logfile=/dev/stdout) goes through a pipe this user owns: a
    # non-root user cannot reopen a stdout pipe created by root (Docker's), and a pipe has no file offset for
    # concurrent writers to overwrite.
    read_fd, write_fd = os.pipe()
    reaper.become_subreaper()
    proc = subprocess.Popen([sys.executable, "-m", "supervisor.supervisord", "-c", str(conf)], env=env,
                            stdout=write_fd, stderr=subprocess.STDOUT)
    os.close(write_fd)
    relay = threading.Thread(target=_relay, args=(read_fd, sys.stdout.fileno()), daemon=True)
    relay.start()
    stop_requested: list[float] = []  # when the first stop signal arrived (docker stop)

    def forward(signum: int, _frame: object) -> None:
        if signum != signal.SIGHUP:
            if stop_requested:
                return  # supervisord is already stopping; a repeated signal could catch it mid-exit
            stop_requested.append(time.time())
        if proc.returncode is None:
            os.kill(proc.pid, signum)  # not proc.send_signal: its poll() could reap supervisord behind our wait

    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, forward)
    code = reaper.wait_reaping(proc)  # also reaps orphans re-parented to us (PID 1 without --init)
    # A killed supervisord leaves its programs to us: the locks stay held until they stopped too, or a new run
    # would start beside them.
    orphans_stopped = reaper.reap_remaining(ORPHANS_STOP_SECONDS)
    if not orphans_stopped:
        click.echo("cape-worker: programs of the killed supervisord are still running; stop them before the next "
                   "run", err=True)
    # supervisord is gone: a repeated stop signal must not kill us while the interpreter shuts down (it resets
    # the handlers to the default then, and our exit status would become "killed by SIGTERM").
    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    relay.join(timeout=5)
    fatal = read_marker(config.run_dir)
    if fatal is None and unrecorded_fatal:
        fatal = {"program": "? (see the fatal_listener lines above: its marker could not be written)",
                 "at": unrecorded_fatal[0]}
    for lock in locks:  # supervisord and its programs are gone: the next run may start
        os.close(lock)
    # supervisord turns a program waiting in BACKOFF into FATAL while it stops: after a stop request that is a
    # clean stop, not a failure. The listener ignores FATAL after supervisord's STOPPING event; this also covers
    # a FATAL that raced the signal.
    if fatal is not None and not (stop_requested and float(fatal.get("at") or 0) >= stop_requested[0]):
        oom = oom_kills_since(oom_kills_at_start, oom_kill_count())
        memory = (f" Out of memory: {oom_kills_said(oom, 'since it started')}; give the worker more memory (README, "
                  "\"Memory and other limits\")." if oom else "")
        click.echo(f"cape-worker: program {fatal.get('program', '?')} kept failing (FATAL); the worker stopped. "
                   f"See its log lines above; `cape-worker check` tests the configuration.{memory}", err=True)
        sys.exit(3)
    if code < 0:  # killed: by the kernel's OOM killer, most often, which leaves no line of its own
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        stopped = "its programs stopped, and" if orphans_stopped else "once its programs stopped (above),"
        click.echo(f"cape-worker: supervisord was killed by signal {name}{_kill_cause(-code, oom_kills_at_start)};"
                   f" {stopped} work already handed over resumes at the next start", err=True)
        sys.exit(128 - code)  # the shell's convention: 137 for SIGKILL
    sys.exit(code)


def _kill_cause(signum: int, oom_kills_at_start: int | None) -> str:
    """What a SIGKILL of supervisord is put down to: the memory cgroup's OOM kill counter, where it can be read."""
    if signum != signal.SIGKILL:
        return ""
    oom = oom_kills_since(oom_kills_at_start, oom_kill_count())
    if oom is None:
        return " (out of memory?)"
    if oom == 0:
        return " (not by the OOM killer: its memory cgroup counted none)"
    return (f" (out of memory: {oom_kills_said(oom, 'since it started')}; give the worker more memory, README "
            "\"Memory and other limits\")")


def _already_running(config: WorkerConfig, evidence: str) -> NoReturn:
    """Refuse a second worker on one state dir (exit 2), saying how we know one runs."""
    click.echo(f"cape-worker: a worker is already running with CAPE_STATE_DIR={config.state_dir} ({evidence}); "
               "stop it first", err=True)
    sys.exit(2)


def _lock_run_dir(config: WorkerConfig) -> list[int]:
    """Exclusive locks on the run dir's `worker.lock` and the spool's `.worker.lock`, or exit 2 if another
    `cape-worker run` holds one (two workers on one spool would take each other's jobs and messages). The kernel
    drops them when this process ends, however it ends; supervisord does not inherit them."""
    fds = []
    for path in (config.run_dir / LOCK_NAME, config.spool_dir / f".{LOCK_NAME}"):
        fd = lock_file(path)
        if fd is None:
            if path.parent == config.run_dir:
                _already_running(config, f"another `cape-worker run` holds {path}")
            click.echo(f"cape-worker: a worker is already running with CAPE_SPOOL_DIR={config.spool_dir} (another "
                       f"`cape-worker run` holds {path}); each worker needs its own spool", err=True)
            sys.exit(2)
        fds.append(fd)
    return fds


def _wait_for_earlier_programs(config: WorkerConfig) -> None:
    """Programs of a worker whose supervisord was killed hold the spool's programs lock until they stopped (within
    seconds); wait for them, or exit 2 if they do not stop."""
    path = config.spool_dir / PROGRAMS_LOCK_NAME
    deadline = time.monotonic() + ORPHANS_STOP_SECONDS
    while (probe := lock_file(path)) is None:
        if time.monotonic() >= deadline:
            click.echo(f"cape-worker: programs of an earlier worker still run on CAPE_SPOOL_DIR={config.spool_dir} "
                       f"(they hold {path}); stop them first", err=True)
            sys.exit(2)
        time.sleep(0.1)
    os.close(probe)  # drops the probe's lock: our own programs take theirs


def _relay(read_fd: int, out_fd: int) -> None:
    """Copy supervisord's pipe to our stdout until every writer has closed it; never block the writers."""
    out_ok = True
    while True:
        try:
            data = os.read(read_fd, 65536)
        except OSError:
            break
        if not data:
            break
        while out_ok and data:
            try:
                data = data[os.write(out_fd, data):]
            except OSError:
                out_ok = False  # our stdout is gone: keep draining so the programs never block
    os.close(read_fd)


@main.command()
def check() -> None:
    """Validate the configuration and reach each endpoint: one line per check, non-zero exit on failure."""
    from services.worker.checks import CheckResult, iter_checks  # boto3, numpy: not loaded for `health` (every 30 s)
    from services.worker.config import SECRET_VARIABLES
    from services.worker.logs import redact

    try:
        _load_dotenv()
    except ConfigError as exc:
        click.echo(CheckResult("configuration", False, str(exc)).line())
        sys.exit(1)
    _for_this_user_only()  # its probe and scratch files, and any folder a library makes
    ok = True
    secrets = [os.environ.get(name, "") for name in SECRET_VARIABLES]
    secrets += [secret.split(",", 1)[-1] for secret in secrets if "," in secret]  # a token's secret half alone
    for result in iter_checks(os.environ):  # each line as its check ends: a slow endpoint shows which it is
        click.echo(redact(result.line(), secrets))  # a secret pasted into a URL variable is in the broker's lines
        ok = ok and result.ok
    sys.exit(0 if ok else 1)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (every job in the spool).")
@click.option("--last", type=click.IntRange(min=0), default=FINISHED_SHOWN, show_default=True,
              help="Finished jobs to list after those in progress, most recent first.")
@click.option("--all", "show_all", is_flag=True, help="List every finished job the spool keeps.")
def status(as_json: bool, last: int, show_all: bool) -> None:
    """The four programs' states, what keeps the worker unhealthy or waiting (a token or seat the coordinator
    refuses, its TLS, a wrong CAPE_COORDINATOR, an unreachable coordinator, a spool short of room), and the jobs in
    the spool.

    Exit status: 0 if a worker is running on this CAPE_STATE_DIR (whatever its programs' states; `cape-worker
    health` judges those), 1 if no worker is running on it, 2 for a configuration error.
    """
    config = _config_or_exit(LocalConfig.from_env)  # only local state: works without CAPE_TOKEN or a coordinator
    _for_this_user_only()  # Spool() makes the spool's missing stage folders
    try:
        states = health_mod.program_states(config.run_dir)
    except health_mod.SupervisorUnavailable as exc:
        states, problem = {}, str(exc)
    else:
        problem = None
    programs = {name: states.get(name, "MISSING") for name in PROGRAMS}
    # Unreachable is the running poller's news only; a refusal stays true of a stopped worker's token.
    notes = {record: record.read(config.run_dir) if problem is None or record in health_mod.HEALTH_RECORDS else None
             for record in health_mod.POLLER_RECORDS}
    spool_exists = config.spool_dir.is_dir()
    jobs = health_mod.spool_jobs(Spool(config.spool_dir), programs["runner"] == "RUNNING") if spool_exists else []
    fingerprint, keys_line = _key_fingerprint(config.state_dir)
    oom_kills = oom_kill_count()  # `docker exec`: the container's memory cgroup, since it started
    if as_json:
        click.echo(json.dumps({"worker": config.worker_name, "running": problem is None, "programs": programs,
                               "key_fingerprint": fingerprint, "oom_kills": oom_kills,
                               "supervisor_error": problem, "login_refused": notes[health_mod.LOGIN_REFUSED],
                               "coordinator_untrusted": notes[health_mod.COORDINATOR_UNTRUSTED],
                               "coordinator_unreachable": notes[health_mod.COORDINATOR_UNREACHABLE],
                               "coordinator_misaddressed": notes[health_mod.COORDINATOR_MISADDRESSED],
                               "spool_short_of_room": notes[health_mod.SPOOL_SHORT_OF_ROOM],
                               "spool_refuses_writes": notes[health_mod.SPOOL_REFUSES_WRITES],
                               "broker_unreachable": notes[health_mod.BROKER_UNREACHABLE],
                               "spool_dir": str(config.spool_dir), "spool_exists": spool_exists, "jobs": jobs},
                              indent=2))
    else:
        _print_status(config, programs, problem, notes, spool_exists, jobs, None if show_all else last, keys_line,
                      oom_kills)
    sys.exit(0 if problem is None else 1)


def _key_fingerprint(state_dir: Path) -> tuple[str | None, str]:
    """This worker's key fingerprint (None before the first start made the keys, or unreadable), and its line."""
    try:
        found = existing_fingerprint(state_dir)
    except (KeyFileError, OSError) as exc:
        return None, f"keys: unreadable ({exc})"
    if found is None:
        return None, "keys: none yet (the first start makes them)"
    return found, f"keys: {found} (for a partner's operator whose worker says this organization's keys changed)"


def _print_status(config: LocalConfig, programs: dict[str, str], problem: str | None,
                  notes: dict[health_mod.PollerRecord, dict | None],
                  spool_exists: bool, jobs: list[dict], last: int | None, keys_line: str,
                  oom_kills: int | None) -> None:
    click.echo(f"worker {config.worker_name}")
    click.echo(keys_line)
    if oom_kills:
        click.echo(f"memory: {oom_kills_said(oom_kills, 'since its container started')}; give it more memory "
                   "(README, \"Memory and other limits\")")
    if problem:
        click.echo(f"no worker is running on this state dir: {problem}")
    for name, state in programs.items():
        click.echo(f"  {name:<10} {state}")
    for record, note in notes.items():
        if note is not None:
            click.echo(f"{record.topic}: {record.line(note)}")
    if not spool_exists:
        click.echo(f"jobs: {config.spool_dir} does not exist (the worker makes it at start); is CAPE_SPOOL_DIR the "
                   "worker's?")
        return
    active = [job for job in jobs if job["active"]]
    finished = [job for job in jobs if not job["active"]]
    click.echo(f"jobs in {config.spool_dir}: {len(jobs)} ({len(active)} in progress, {len(finished)} finished)")
    shown = finished if last is None else finished[:last]
    for job in [*active, *shown]:
        when = f"  ended={job['ended_at']}" if job["ended_at"] else f"  approved={job['approved_at'] or '-'}"
        click.echo(f"  {job['id']}  seat={job['seat']}  status={job['status']}  runner={job['runner']}"
                   f"  unsent_messages={job['unsent_messages']}  pending_reports={job['pending_reports']}"
                   f"  result={job['result']}{when}")
        if job["reason"]:  # the coordinator's words, which may quote another organization's
            click.echo(f"    reason: {cell_text(job['reason'])}")
    if len(shown) < len(finished):
        click.echo(f"  ... and {len(finished) - len(shown)} earlier finished job(s) (--all lists them)")


@main.command()
def health() -> None:
    """Exit 0 only if all four programs are RUNNING, CAPE_COORDINATOR leads to a coordinator that accepts the token
    and whose TLS is trusted, and the spool volume has room (Docker HEALTHCHECK)."""
    try:
        _load_dotenv()
    except ConfigError as exc:
        click.echo(f"unhealthy: {exc}")  # Docker reserves exit 2: unhealthy is 1 whatever the cause
        sys.exit(1)
    run_dir = health_mod.run_dir_from_env(os.environ)
    try:
        states = health_mod.program_states(run_dir)
    except health_mod.SupervisorUnavailable as exc:
        click.echo(f"unhealthy: {exc}")
        sys.exit(1)
    bad = {name: states.get(name, "MISSING") for name in PROGRAMS if states.get(name) != "RUNNING"}
    if bad:
        click.echo("unhealthy: " + ", ".join(f"{n} {s}" for n, s in bad.items()))
        sys.exit(1)
    for record in health_mod.HEALTH_RECORDS:
        note = record.read(run_dir)
        if note is not None:
            click.echo(f"unhealthy: {record.line(note)}")
            sys.exit(1)
    for record in health_mod.LASTING_HEALTH_RECORDS:
        note = record.read(run_dir)
        if note is not None and time.time() - note["since"] >= UNHEALTHY_AFTER_SECONDS:
            click.echo(f"unhealthy for over {UNHEALTHY_AFTER_SECONDS / 60:.0f} min: {record.line(note)}")
            sys.exit(1)
    click.echo("healthy: " + ", ".join(f"{n} RUNNING" for n in PROGRAMS))


if __name__ == "__main__":
    main()
