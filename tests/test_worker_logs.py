"""Worker logging: one line per event, secrets redacted, CloudWatch via moto, CloudWatch down never blocks."""
import io
import logging
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from services.worker import logs
from services.worker.config import WorkerConfig
from tests.support.aws import MOTO_KEYS, MotoAWS, free_port, start_moto_server
from tests.support.faults import answering_every_request

TOKEN = "tok123,c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0"


def config_env(**extra):
    return {"CAPE_TOKEN": TOKEN, "CAPE_COORDINATOR": "http://127.0.0.1:1", "CAPE_WORKER_NAME": "org-a",
            "CAPE_SPOOL_DIR": "/tmp/s", "CAPE_STATE_DIR": "/tmp/t", **extra}


@pytest.fixture(autouse=True)
def _restore_root_logger():
    root = logging.getLogger()
    saved = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    for handler in saved[0]:
        root.addHandler(handler)
    root.setLevel(saved[1])


def test_one_line_per_event_with_program_level_and_utc_time():
    out = io.StringIO()
    log = logs.setup("poller", WorkerConfig.from_env(config_env()), stream=out)
    log.info("fetched %d jobs", 2)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed\nsecond line")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith(" poller INFO fetched 2 jobs")
    assert time.strptime(lines[0].split(" ")[0], "%Y-%m-%dT%H:%M:%S.%fZ")
    assert " poller ERROR failed | second line | Traceback" in lines[1] and "RuntimeError: boom" in lines[1]


def test_no_token_or_secret_in_any_line():
    out = io.StringIO()
    config = WorkerConfig.from_env(config_env(AWS_ACCESS_KEY_ID="AKIAX", AWS_SECRET_ACCESS_KEY="aws-secret-value"))
    log = logs.setup("runner", config, stream=out)
    log.info("token is %s", TOKEN)
    log.warning("header Authorization: Bearer %s", "abc,def")
    log.error("secret half %s and aws %s", TOKEN.split(",")[1], "aws-secret-value")
    log.info("someone else's token otherid,QUJDREVGR0hJSktMTU5PUFFSU1RVVg== leaked")
    text = out.getvalue()
    assert "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0" not in text
    assert "aws-secret-value" not in text and "abc,def" not in text
    assert "QUJDREVGR0hJSktMTU5PUFFSU1RVVg" not in text
    assert text.count(logs.REDACTED) == 5


def test_records_reach_cloudwatch_one_stream_per_worker_and_program(moto):
    config = WorkerConfig.from_env(config_env(CAPE_CLOUDWATCH="on", CAPE_LOG_GROUP="/cape/test", **moto.env))
    log = logs.setup("uploader", config, stream=io.StringIO())
    log.info("uploaded %s", "weights")
    log.info("token %s", TOKEN)
    logging.getLogger().handlers[-1].close()  # flushes the queue, as logging.shutdown() does at exit
    messages = moto.log_events("/cape/test", "org-a/uploader")
    assert messages == ["uploader INFO uploaded weights", f"uploader INFO token {logs.REDACTED}"]


def test_a_log_group_deleted_under_a_running_program_is_made_again(moto):
    """watchtower makes a missing stream again but not a missing group: without this, every later batch was dropped
    until the worker restarted."""
    config = WorkerConfig.from_env(config_env(CAPE_CLOUDWATCH="on", CAPE_LOG_GROUP="/cape/regrow", **moto.env))
    out = io.StringIO()
    log = logs.setup("runner", config, stream=out)
    handler = logging.getLogger().handlers[-1]
    log.info("before")
    handler.flush()
    assert moto.log_events("/cape/regrow", "org-a/runner") == ["runner INFO before"]
    moto.client("logs").delete_log_group(logGroupName="/cape/regrow")
    log.info("lost with the group")  # this batch finds no group: dropped (it is on stdout), the group made again
    handler.flush()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and "made it again" not in out.getvalue():
        time.sleep(0.1)
    log.info("after")
    handler.close()
    assert moto.log_events("/cape/regrow", "org-a/runner") == ["runner INFO after"]
    assert "runner INFO CloudWatch Logs: log group /cape/regrow had been deleted; made it again" in out.getvalue()


def test_a_log_group_that_cannot_be_made_again_is_said_once(moto):
    """Without logs:CreateLogGroup any more, every batch after the deletion fails: one line says so, not one per
    batch (and no CreateLogGroup call per batch)."""
    import json

    iam = moto.client("iam")
    iam.create_user(UserName="logger")
    key = iam.create_access_key(UserName="logger")["AccessKey"]

    def allow(*actions: str) -> None:
        iam.put_user_policy(UserName="logger", PolicyName="logs", PolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": list(actions), "Resource": "*"}]}))

    allow("logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents")
    config = WorkerConfig.from_env(config_env(CAPE_CLOUDWATCH="on", CAPE_LOG_GROUP="/cape/gone", **{
        **moto.env, "AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}))
    moto.enforce_iam(True)
    out = io.StringIO()
    log = logs.setup("runner", config, stream=out)
    handler = logging.getLogger().handlers[-1]
    moto.enforce_iam(False)  # the test's own calls, as an administrator
    allow("logs:CreateLogStream", "logs:PutLogEvents")
    moto.client("logs").delete_log_group(logGroupName="/cape/gone")
    moto.enforce_iam(True)
    for batch in range(3):
        log.info("batch %d", batch)
        handler.flush()
    handler.close()
    said = [line for line in out.getvalue().splitlines() if "does not exist and could not be made" in line]
    assert len(said) == 1, out.getvalue()
    assert "make it, or allow logs:CreateLogGroup" in said[0]
    assert key["SecretAccessKey"] not in out.getvalue()


def test_aws_settings_that_cannot_make_a_client_leave_the_program_running(monkeypatch, tmp_path):
    """A missing AWS_PROFILE failed in making the boto3 client, before the guarded part: every program crashed."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    import boto3
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # as in a program: the environment read afresh
    config = WorkerConfig.from_env(config_env(CAPE_CLOUDWATCH="on", AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}"))
    out = io.StringIO()
    log = logs.setup("poller", config, stream=out)
    log.info("still here")
    assert ("CloudWatch Logs unreachable at start-up (group /cape/worker: ProfileNotFound: The config profile "
            "(no-such-profile) could not be found)") in out.getvalue()
    assert "poller INFO still here" in out.getvalue()


def test_cloudwatch_down_never_blocks_a_program():
    dead = f"http://127.0.0.1:{free_port()}"
    config = WorkerConfig.from_env(config_env(CAPE_CLOUDWATCH="on", AWS_ENDPOINT_URL=dead,
                                              AWS_ACCESS_KEY_ID="a", AWS_SECRET_ACCESS_KEY="b"))
    out = io.StringIO()
    started = time.monotonic()
    log = logs.setup("messenger", config, stream=out)
    setup_seconds = time.monotonic() - started
    started = time.monotonic()
    for i in range(200):
        log.info("event %d", i)
    emit_seconds = time.monotonic() - started
    assert "CloudWatch Logs unreachable" in out.getvalue()
    assert out.getvalue().count("messenger INFO event") == 200
    assert setup_seconds < 10 and emit_seconds < 2


def test_cloudwatch_unreachable_at_start_says_why():
    dead = f"http://127.0.0.1:{free_port()}"
    config = WorkerConfig.from_env(config_env(CAPE_CLOUDWATCH="on", AWS_ENDPOINT_URL=dead,
                                              AWS_ACCESS_KEY_ID="AKIAX", AWS_SECRET_ACCESS_KEY="aws-secret-value"))
    out = io.StringIO()
    logs.setup("messenger", config, stream=out)
    line = next(line for line in out.getvalue().splitlines() if "CloudWatch Logs unreachable" in line)
    assert line.endswith(f' messenger WARNING CloudWatch Logs unreachable at start-up (group /cape/worker: '
                         f'EndpointConnectionError: Could not connect to the endpoint URL: "{dead}/"); logging to '
                         'stdout only until it answers (tried again every 60 s)'), line


@pytest.fixture
def refusing_cloudwatch():
    """A CloudWatch Logs endpoint that refuses every request as AWS does a bad key: 400 UnrecognizedClientException."""
    import json

    body = json.dumps({"__type": "UnrecognizedClientException",
                       "message": "The security token included in the request is invalid."}).encode()
    with answering_every_request(400, body, "application/x-amz-json-1.1") as url:
        yield url


def test_cloudwatch_refusing_at_start_gives_the_aws_error_never_the_credentials(refusing_cloudwatch):
    config = WorkerConfig.from_env(config_env(CAPE_CLOUDWATCH="on", AWS_ENDPOINT_URL=refusing_cloudwatch,
                                              AWS_ACCESS_KEY_ID="AKIAX", AWS_SECRET_ACCESS_KEY="aws-secret-value"))
    out = io.StringIO()
    logs.setup("poller", config, stream=out)
    assert out.getvalue().splitlines()[0].endswith(
        " poller WARNING CloudWatch Logs unreachable at start-up (group /cape/worker: UnrecognizedClientException: "
        "The security token included in the request is invalid.); logging to stdout only until it answers (tried "
        "again every 60 s)"), out.getvalue()
    assert "aws-secret-value" not in out.getvalue()


def test_debug_level_keeps_the_libraries_debug_lines_out(tmp_path):
    """CAPE_LOG_LEVEL=DEBUG is for the worker's own lines: watchdog's line per file event, urllib3's per connection
    and botocore's per step would bury them (and go to CloudWatch too)."""
    import boto3
    import requests

    from services.worker.spool import Spool

    out = io.StringIO()
    log = logs.setup("runner", WorkerConfig.from_env(config_env(CAPE_LOG_LEVEL="DEBUG")), stream=out)
    spool = Spool(tmp_path / "spool")
    try:
        assert spool.watch("jobs")
        seen = spool.changes.generation
        spool.put_job({"id": "job-a", "seat": "x_owner", "status": "Approved"})
        deadline = time.monotonic() + 10
        while spool.changes.generation == seen and time.monotonic() < deadline:
            time.sleep(0.05)
        assert spool.changes.generation != seen  # watchdog saw the file
    finally:
        spool.changes.close()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{free_port()}/", timeout=2)
    boto3.client("s3", region_name="us-east-1", endpoint_url=f"http://127.0.0.1:{free_port()}",
                 aws_access_key_id="a", aws_secret_access_key="b")
    log.debug("own debug line")
    text = out.getvalue()
    assert "runner DEBUG own debug line" in text
    for library_line in ("in-event", "Starting new HTTP connection", "Loading JSON file", "Event choose-service-name"):
        assert library_line not in text, text


def test_cloudwatch_accepting_but_silent_endpoint_does_not_block_emit():
    """An endpoint that accepts connections and never answers: emit() stays fast, close() is bounded, and the start
    makes one attempt (botocore's max_attempts counts retries: 1 made two, holding each program's start 6 s)."""
    import socket
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(50)
    accepted = []

    def accept() -> None:
        while True:
            try:
                accepted.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.getsockname()[1]}"
        config = WorkerConfig.from_env(config_env(CAPE_CLOUDWATCH="on", AWS_ENDPOINT_URL=url,
                                                  AWS_ACCESS_KEY_ID="a", AWS_SECRET_ACCESS_KEY="b"))
        log = logs.setup("poller", config, stream=io.StringIO())
        assert len(accepted) == 1, accepted
        started = time.monotonic()
        for i in range(100):
            log.info("event %d", i)
        assert time.monotonic() - started < 2
        started = time.monotonic()
        for handler in logging.getLogger().handlers:
            handler.close()
        assert time.monotonic() - started < 15
    finally:
        server.close()
        for connection in accepted:
            connection.close()


def log_then_sigterm(program: str, lines: list[str], env: dict[str, str], cwd) -> float:
    """Run a process that logs `lines` as `program` (through `logs.setup`) and then waits; SIGTERM it once they are
    logged, as supervisord's stop does. It must exit 0; returns the seconds it took to exit."""
    script = textwrap.dedent(f"""
        import time
        from services.worker import logs
        from services.worker.config import WorkerConfig
        log = logs.setup({program!r}, WorkerConfig.from_env())
        for line in {lines!r}:
            log.info(line)
        print("READY", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env, cwd=cwd, text=True)
    try:
        deadline = time.monotonic() + 30
        line = ""
        while "READY" not in line and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "program ended before logging"
        stopping = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        return time.monotonic() - stopping
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sigterm_flushes_queued_records_to_cloudwatch(moto, tmp_path):
    """A program killed by SIGTERM (supervisord's stop) exits 0 and its queued records still arrive."""
    env = {**os.environ, **config_env(CAPE_CLOUDWATCH="on", CAPE_LOG_GROUP="/cape/sigterm", **moto.env)}
    log_then_sigterm("runner", [f"step {i}" for i in range(5)], env, tmp_path)
    assert moto.log_events("/cape/sigterm", "org-a/runner") == [f"runner INFO step {i}" for i in range(5)]


@pytest.fixture
def slow_cloudwatch(moto):
    """moto behind a forwarder that answers every PutLogEvents 1.5 s late: a CloudWatch that is slow but working,
    as a busy machine is when all of a worker's programs flush at once on a stop."""
    import http.server
    import threading

    import requests

    class Forward(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the http.server interface
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.headers.get("X-Amz-Target", "").endswith(".PutLogEvents"):
                time.sleep(1.5)
            upstream = requests.post(moto.url + self.path, data=body, timeout=30,
                                     headers={k: v for k, v in self.headers.items() if k.lower() != "host"})
            self.send_response(upstream.status_code)
            for name in ("Content-Type", "x-amzn-RequestId"):
                if name in upstream.headers:
                    self.send_header(name, upstream.headers[name])
            self.send_header("Content-Length", str(len(upstream.content)))
            self.end_headers()
            self.wfile.write(upstream.content)

        def log_message(self, *args) -> None:  # quiet
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Forward)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield moto, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_sigterm_delivers_the_last_records_to_a_slow_cloudwatch(slow_cloudwatch, tmp_path):
    moto, slow_url = slow_cloudwatch
    env = {**os.environ, **config_env(CAPE_CLOUDWATCH="on", CAPE_LOG_GROUP="/cape/slow", **moto.env),
           "AWS_ENDPOINT_URL": slow_url}
    stop_seconds = log_then_sigterm("uploader", [f"stored {i}" for i in range(3)], env, tmp_path)
    assert stop_seconds < 7  # inside supervisord's stopwaitsecs
    assert moto.log_events("/cape/slow", "org-a/uploader") == [f"uploader INFO stored {i}" for i in range(3)]


# A program whose stop unwinds into a library's cleanup that never returns (s3transfer waiting for a request in
# flight, an executor joining a stuck download).
STUCK_IN_CLEANUP = textwrap.dedent("""
    import threading, time
    from services.worker import logs
    from services.worker.config import WorkerConfig
    log = logs.setup("uploader", WorkerConfig.from_env())
    try:
        print("READY", flush=True)
        time.sleep(60)
    finally:
        log.info("cleaning up")
        threading.Event().wait()
""")


def stop_within_the_grace(script: str, cwd: Path, **extra: str) -> str:
    """Run `script` (which prints READY once set up) with the variables `extra`, SIGTERM it, check it exits 0 about
    STOP_GRACE_SECONDS later (before supervisord's SIGKILL); returns its output."""
    env = {**os.environ, **config_env(**extra)}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env, cwd=cwd, text=True)
    try:
        assert proc.stdout.readline().strip() == "READY"
        stopping = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        elapsed = time.monotonic() - stopping
        output = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert logs.STOP_GRACE_SECONDS - 0.5 < elapsed < logs.STOP_GRACE_SECONDS + logs.LEAVE_FLUSH_SECONDS + 1, elapsed
    return output


def test_a_stop_stuck_in_a_librarys_cleanup_still_ends_within_the_grace(tmp_path):
    """SIGTERM unwinds the program; when that unwinding blocks (s3transfer waiting for a request in flight, an
    executor joining a stuck download), the program still leaves, exit 0, logs flushed, before supervisord's
    SIGKILL (stopwaitsecs 7)."""
    output = stop_within_the_grace(STUCK_IN_CLEANUP, tmp_path)
    assert "uploader INFO cleaning up" in output
    assert (f"uploader WARNING still stopping after {logs.STOP_GRACE_SECONDS:.0f} s (waiting on a request in "
            "flight or on CloudWatch Logs); leaving now, the work resumes at the next start") in output


def test_a_stop_stuck_in_a_librarys_cleanup_still_gives_cloudwatch_the_last_records(moto, tmp_path):
    stop_within_the_grace(STUCK_IN_CLEANUP, tmp_path, CAPE_CLOUDWATCH="on", CAPE_LOG_GROUP="/cape/last", **moto.env)
    events = moto.log_events("/cape/last", "org-a/uploader")
    assert events[0] == "uploader INFO cleaning up", events
    assert events[1].startswith(f"uploader WARNING still stopping after {logs.STOP_GRACE_SECONDS:.0f} s"), events


def test_a_stop_stuck_flushing_a_log_handler_still_ends_within_the_grace(tmp_path):
    """CloudWatch Logs not taking the last batch holds logging.shutdown() in a handler's flush, with that handler's
    lock held: the grace's own line must not wait for that lock (it did, past supervisord's SIGKILL)."""
    script = textwrap.dedent("""
        import logging, threading, time
        from services.worker import logs
        from services.worker.config import WorkerConfig
        log = logs.setup("uploader", WorkerConfig.from_env())

        class Stuck(logging.Handler):
            def emit(self, record):
                pass

            def flush(self):
                threading.Event().wait()

        logging.getLogger().addHandler(Stuck())
        print("READY", flush=True)
        time.sleep(60)
    """)
    output = stop_within_the_grace(script, tmp_path)
    assert f"uploader WARNING still stopping after {logs.STOP_GRACE_SECONDS:.0f} s" in output


class OwnMoto(MotoAWS):
    """A moto_server process of the test's own on 127.0.0.1, which the test may stop (CloudWatch Logs going away)
    and start again on the same port (empty, as a restarted service)."""

    def __init__(self, log_path: Path) -> None:
        super().__init__(f"http://127.0.0.1:{free_port()}")
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = start_moto_server(int(self.url.rsplit(":", 1)[1]), log)

    def stop(self) -> None:
        """Gone at once, as when the network to CloudWatch is lost."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def own_moto(tmp_path):
    server = OwnMoto(tmp_path / "moto.log")
    server.start()
    yield server
    server.stop()


class Program:
    """A process that sets up logging as a worker's program does and logs in steps: each `step()` lets it log the
    next group of messages and waits (bounded) until it has. Its stdout and stderr together are `output`."""

    SCRIPT = textwrap.dedent("""
        import logging, sys, time, warnings
        from services.worker import logs
        from services.worker.config import WorkerConfig
        log = logs.setup("poller", WorkerConfig.from_env())
        cloudwatch = logging.getLogger().handlers[-1]
        for step in sys.stdin:
            for message in step.split():
                if message == "warn":
                    warnings.warn("an unrelated warning")
                elif message == "stale":  # a record from 30 days ago, as a machine whose clock is wrong makes
                    record = log.makeRecord(log.name, logging.INFO, "", 0, message, (), None)
                    record.created -= 30 * 86400
                    log.handle(record)
                    cloudwatch.flush()
                else:
                    log.info(message)
                    cloudwatch.flush()  # one batch per message: each one is delivered, or dropped, on its own
            print("DONE", flush=True)
    """)

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", self.SCRIPT], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.output = ""
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def step(self, *messages: str, seconds: float = 30) -> None:
        self.proc.stdin.write(" ".join(messages) + "\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + seconds
        while True:
            line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            assert line is not None, f"the program ended early:\n{self.output}"
            if line == "DONE\n":
                return
            self.output += line

    def end(self) -> None:
        self.proc.stdin.close()
        assert self.proc.wait(timeout=15) == 0
        while (line := self.lines.get(timeout=5)) is not None:
            self.output += line

    def __enter__(self) -> "Program":
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.proc.poll() is None:  # a failed step: do not leave the process behind
            self.proc.kill()


def test_cloudwatch_going_away_is_one_line_in_the_programs_format_not_raw_warnings(own_moto, tmp_path):
    """CloudWatch Logs stops answering while a program runs: its log says so once, in its own format, instead of
    watchtower's raw warnings for every failed batch; once CloudWatch is back it says that once too. Neither line
    is sent to CloudWatch, and other warnings are shown as before."""
    env = {**os.environ, **config_env(CAPE_CLOUDWATCH="on", CAPE_LOG_GROUP="/cape/outage", **own_moto.env)}
    with Program(env, tmp_path) as program:
        program.step("delivered")
        own_moto.stop()
        program.step("lost-1", "lost-2", "warn", "lost-3")
        own_moto.start()
        own_moto.client("logs").create_log_group(logGroupName="/cape/outage")
        program.step("back")
        program.end()
    lines = [line.split(" ", 1)[1] for line in program.output.splitlines() if " poller " in line]
    assert lines == [
        "poller INFO delivered",
        "poller INFO lost-1",
        f'poller WARNING CloudWatch Logs cannot be reached (Could not connect to the endpoint URL: "{own_moto.url}/"):'
        " each batch of records is tried 5 times and then dropped, so log group /cape/outage misses them (this log"
        " has them) until delivery works again",
        "poller INFO lost-2",
        "poller INFO lost-3",
        "poller INFO back",
        "poller INFO CloudWatch Logs delivery works again; the 3 records dropped meanwhile are only in this log",
    ]
    assert "WatchtowerWarning" not in program.output and "warnings.warn" not in program.output
    assert "UserWarning: an unrelated warning" in program.output
    assert MOTO_KEYS["AWS_SECRET_ACCESS_KEY"] not in program.output and TOKEN.split(",")[1] not in program.output
    groups = own_moto.client("logs")
    events = groups.get_log_events(logGroupName="/cape/outage", logStreamName="org-a/poller", startFromHead=True)
    assert [e["message"] for e in events["events"]] == ["poller INFO back"]


def test_records_cloudwatch_rejects_for_their_time_are_said_once(moto, tmp_path):
    """Records CloudWatch Logs rejects as too old (a wrong clock): one line naming the likely cause, no raw warning."""
    env = {**os.environ, **config_env(CAPE_CLOUDWATCH="on", CAPE_LOG_GROUP="/cape/clock", **moto.env)}
    with Program(env, tmp_path) as program:
        program.step("stale", "stale", "fresh")
        program.end()
    lines = [line.split(" ", 1)[1] for line in program.output.splitlines() if " poller " in line]
    assert lines == [
        "poller INFO stale",
        "poller WARNING CloudWatch Logs rejected records of log group /cape/clock: their time stamps are over 14 days"
        " old; check this machine's clock",
        "poller INFO stale",
        "poller INFO fresh",
    ]
    assert "WatchtowerWarning" not in program.output and "warnings.warn" not in program.output
    assert moto.log_events("/cape/clock", "org-a/poller") == ["poller INFO fresh"]


def test_each_reason_cloudwatch_gives_for_dropping_records_is_named():
    """AWS says which events it dropped and why (moto never expires any: the group's retention is AWS's alone)."""
    assert logs.rejected_for({"tooNewLogEventStartIndex": 0}) == "over 2 hours ahead of AWS's clock"
    assert logs.rejected_for({"expiredLogEventEndIndex": 3}) == "older than the log group's retention"
    assert logs.rejected_for({"tooOldLogEventEndIndex": 2, "expiredLogEventEndIndex": 3}) == (
        "over 14 days old or older than the log group's retention")
    assert logs.rejected_for({}) == "outside what it keeps"


def test_cloudwatch_down_at_start_is_tried_again_until_it_answers(moto, relay, monkeypatch):
    """The endpoint may come up after the worker (a network not up yet): the program's later records reach
    CloudWatch without a restart."""
    monkeypatch.setattr(logs, "CLOUDWATCH_RETRY_SECONDS", 0.3)
    gate = relay(int(moto.env["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]))
    gate.cut(True)
    config = WorkerConfig.from_env(config_env(CAPE_CLOUDWATCH="on", CAPE_LOG_GROUP="/cape/retry",
                                              **{**moto.env, "AWS_ENDPOINT_URL": gate.url}))
    out = io.StringIO()
    log = logs.setup("poller", config, stream=out)
    log.info("before")
    assert "logging to stdout only until it answers (tried again every 0 s)" in out.getvalue()
    gate.cut(False)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and "CloudWatch Logs answers now" not in out.getvalue():
        time.sleep(0.05)
    assert "poller INFO CloudWatch Logs answers now: logging to group /cape/retry again (earlier records are only " \
           "in stdout)" in out.getvalue()
    log.info("after")
    logging.getLogger().handlers[-1].close()  # flushes, as logging.shutdown() does at exit
    assert moto.log_events("/cape/retry", "org-a/poller") == [
        "poller INFO CloudWatch Logs answers now: logging to group /cape/retry again (earlier records are only in "
        "stdout)", "poller INFO after"]
