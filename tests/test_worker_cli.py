"""`cape-worker check` against the real cape-server and a real moto server: all ok, then each bad setting gives
its own line and a non-zero exit; a misspelled variable is warned of by `check` and `run`; a secret pasted into the
wrong variable is never echoed; `check` and `status` leave nothing others can read, and `check` no missing bucket
directory made real; `cape-worker run` refuses a bad configuration, or a second worker on the same state directory
(also when two start at once), before starting anything; `status` needs only local settings, and exits 1 without
a worker; a revoked token makes the worker unhealthy; a stopped worker's claims and failed jobs' reasons show; `-h`
is `--help`."""
import contextlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time

import psutil
import pytest

from services.worker import health
from services.worker.keys import WorkerKeys
from services.worker.spool import Spool
from tests.support.aws import free_port
from tests.support.cgroups import child_memory_cgroup, join_code, oom_kill_in
from tests.support.server import Api
from tests.support.workers import worker_env


def check(env):
    result = subprocess.run(["cape-worker", "check"], env=env, capture_output=True, text=True, timeout=60)
    lines = {line[5:].split(" ", 1)[0]: line for line in result.stdout.splitlines()}
    return result.returncode, lines, result.stdout + result.stderr


@pytest.fixture(scope="module")
def acme(shared_cape_server):
    return shared_cape_server.create_org("acme")


@pytest.fixture
def cape_server(shared_cape_server):
    return shared_cape_server


@pytest.fixture
def good_env(cape_server, acme, moto, tmp_path):
    org = acme
    moto.make_bucket("acme-models")
    env = worker_env(tmp_path, "acme", CAPE_TOKEN=org["organization_token"], CAPE_COORDINATOR=cape_server.url,
                     CAPE_BUCKET="s3://acme-models/cape", CAPE_CLOUDWATCH="on", **moto.env)
    return env


def test_all_checks_ok(good_env, moto):
    code, lines, out = check(good_env)
    assert code == 0, out
    assert list(lines) == ["configuration", "spool", "state", "keys", "limits", "coordinator", "broker", "bucket",
                           "cloudwatch"]
    assert all(line.startswith("ok   ") for line in lines.values()), out
    assert "logged in as organization acme" in lines["coordinator"]
    assert "s3://acme-models/cape: wrote and deleted a test object" in lines["bucket"]
    assert moto.keys("acme-models") == []  # the test object is gone
    assert good_env["CAPE_TOKEN"].split(",")[1] not in out
    # CloudWatch: what the programs do (group and stream made if missing, one event put), so it proves their rights.
    assert lines["cloudwatch"].startswith("ok   cloudwatch    log group /cape/worker"), out
    assert lines["cloudwatch"].endswith(": wrote a test event to stream acme/check"), out
    assert moto.log_events("/cape/worker", "acme/check") == ["cape-worker check: this worker can write here"]


def test_check_passes_the_minimal_cloudwatch_policy_and_names_a_missing_right(good_env, moto):
    """The policy the check's own message recommends (no read permission) passes; one without PutLogEvents fails,
    naming the call refused."""
    iam = moto.client("iam")
    iam.create_user(UserName="logger")
    bucket = {"Effect": "Allow", "Action": ["s3:PutObject", "s3:DeleteObject"],
              "Resource": ["arn:aws:s3:::acme-models/*"]}
    key = iam.create_access_key(UserName="logger")["AccessKey"]
    env = {**good_env, "AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
    for actions, expected in ((["logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents"], "ok   "),
                              (["logs:CreateLogGroup", "logs:CreateLogStream"], "FAIL ")):
        policy = {"Version": "2012-10-17", "Statement": [bucket, {"Effect": "Allow", "Action": actions,
                                                                  "Resource": "*"}]}
        iam.put_user_policy(UserName="logger", PolicyName="worker", PolicyDocument=json.dumps(policy))
        moto.enforce_iam(True)
        try:
            code, lines, out = check(env)
        finally:
            moto.enforce_iam(False)
        assert lines["cloudwatch"].startswith(expected), out
        assert lines["bucket"].startswith("ok   "), out
    assert "CloudWatch Logs refused PutLogEvents" in lines["cloudwatch"] and "logs:PutLogEvents" in lines["cloudwatch"]
    assert key["SecretAccessKey"] not in out


def test_check_fails_when_cloudwatch_drops_its_event_for_this_machines_clock(good_env, moto, monkeypatch):
    """A clock over 2 hours ahead: CloudWatch Logs answers 200 and drops the event, as it drops every record the
    programs send; `check` said "wrote a test event"."""
    import types

    from services.worker import checks
    from services.worker.config import WorkerConfig

    ahead = time.time() + 3 * 3600
    monkeypatch.setattr(checks, "time", types.SimpleNamespace(time=lambda: ahead, gmtime=time.gmtime,
                                                               strftime=time.strftime))
    result = checks.check_cloudwatch(WorkerConfig.from_env(good_env))
    assert not result.ok, result
    said = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ahead))
    assert result.detail == (f"CloudWatch Logs dropped the test event, stamped {said} by this machine's clock, as "
                              "over 2 hours ahead of AWS's clock; set the clock right (NTP), or set CAPE_CLOUDWATCH=off")


def test_check_says_what_is_wrong_with_the_aws_settings_in_one_line(good_env, tmp_path):
    """A profile that does not exist used to be a 45-line traceback from `check` (and every program's crash)."""
    env = {k: v for k, v in good_env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    env.update(AWS_PROFILE="no-such-profile", AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_EC2_METADATA_DISABLED="true")
    code, lines, out = check(env)
    assert code == 1 and "Traceback" not in out, out
    assert lines["cloudwatch"].startswith("FAIL cloudwatch    cannot use CloudWatch Logs (ProfileNotFound: The config "
                                          "profile (no-such-profile) could not be found)"), out
    assert "ProfileNotFound" in lines["bucket"], out


@pytest.mark.parametrize("change, failing, words", [
    ({"CAPE_TOKEN": "unknown1,ZHVtbXktc2VjcmV0LWR1bW15LXNlY3JldA=="}, ["coordinator", "broker"], "refused CAPE_TOKEN"),
    ({"CAPE_COORDINATOR": "http://127.0.0.1:{port}"}, ["coordinator", "broker"], "cannot reach"),
    ({"CAPE_BROKER": "http://127.0.0.1:{port}/broker"}, ["broker"], "cannot reach"),
    ({"CAPE_BUCKET": "s3://no-such-bucket"}, ["bucket"], "does not exist"),
    ({"AWS_ENDPOINT_URL": "http://127.0.0.1:{port}"}, ["bucket", "cloudwatch"], "cannot reach"),
])
def test_each_bad_setting_gives_its_line(good_env, change, failing, words):
    port = free_port()
    env = {**good_env, **{k: v.format(port=port) for k, v in change.items()}}
    code, lines, out = check(env)
    assert code == 1, out
    assert [name for name, line in lines.items() if line.startswith("FAIL")] == failing, out
    assert all(words in lines[name] for name in failing), out
    assert env["CAPE_TOKEN"].split(",")[1] not in out


def test_broker_url_that_is_not_a_broker(good_env, cape_server):
    code, lines, out = check({**good_env, "CAPE_BROKER": cape_server.url + "/nothing-here"})
    assert code == 1
    assert lines["broker"].startswith("FAIL ") and "does not look like a Cape broker" in lines["broker"], out


def test_bucket_without_write_permission(good_env, moto):
    moto.make_bucket("readonly")
    env = {**good_env, "CAPE_BUCKET": "s3://readonly", "CAPE_CLOUDWATCH": "off", **moto.read_only_keys("readonly")}
    moto.enforce_iam(True)
    try:
        code, lines, out = check(env)
    finally:
        moto.enforce_iam(False)
    assert code == 1
    assert "access denied writing s3://readonly/" in lines["bucket"] and "s3:PutObject" in lines["bucket"], out


@pytest.mark.parametrize("change, words", [
    ({"CAPE_TOKEN": ""}, "CAPE_TOKEN: is not set"),
    ({"CAPE_COORDINATOR": "not a url"}, "CAPE_COORDINATOR: is not an http(s) URL"),
    ({"CAPE_BUCKET": "bucket-without-scheme"}, "CAPE_BUCKET: give s3://BUCKET[/PREFIX] or file:///ABSOLUTE/PATH"),
    ({"AWS_REGION": "eu west 1"}, "AWS_REGION: 'eu west 1' is not a region name (like eu-west-1)"),
    ({"CAPE_LOG_GROUP": "aws/cape"}, "CAPE_LOG_GROUP: names starting with aws/ are reserved by AWS"),
    ({"CAPE_LOG_GROUP": "/cape/" + "w" * 520}, "CAPE_LOG_GROUP: is 526 characters long; CloudWatch takes at most 512"),
])
def test_bad_configuration(tmp_path, change, words):
    env = {**worker_env(tmp_path, "w"), **change}
    code, lines, out = check(env)
    assert code == 1
    assert list(lines) == ["configuration"] and words in lines["configuration"], out
    run = subprocess.run(["cape-worker", "run"], env=env, capture_output=True, text=True, timeout=30)
    assert run.returncode == 2
    assert f"cape-worker: configuration error: {words}" in run.stderr
    assert not (tmp_path / "w" / "state" / "run").exists()  # nothing was started


def run_under_limit(env: dict[str, str], limit) -> tuple[int, str, str]:
    """`cape-worker run` with `limit()` applied in the child (a resource limit); (exit code, stdout, stderr). What it
    started is killed afterwards: without a refusal, supervisord and its programs would still be running."""
    proc = subprocess.Popen(["cape-worker", "run"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=limit, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, out, err


def test_run_says_a_state_volume_without_room_for_the_keys_in_one_line(tmp_path):
    """The keys are made by `run` before supervisord starts: on a full CAPE_STATE_DIR volume the four programs
    each failed making them, with a traceback, until FATAL (and the FATAL listener, whose marker lives there too,
    failed as well, leaving the worker running with no program). The refusal is the kernel's own: a file size limit
    fails every write past its first byte (EFBIG), as a full disk fails it (ENOSPC)."""
    env = worker_env(tmp_path, "w")
    state = tmp_path / "w" / "state"

    def no_room() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    code, out, err = run_under_limit(env, no_room)
    assert code == 2, out + err
    assert err.endswith(f"cape-worker: cannot make the worker's keys in {state}: File too large; free space on "
                        "the volume of CAPE_STATE_DIR, or make it writable\n"), err
    assert "Traceback" not in out + err and not (state / "run" / "supervisord.pid").exists()


def test_run_says_an_open_files_limit_too_low_for_supervisord_in_one_line(tmp_path):
    """Tried as a new user would, with `ulimit -n 64` (docker run --ulimit nofile=64): supervisord refused in lines
    of its own, saying the environment allowed 1024 files and to lower `minfds` in a configuration file that the
    image holds, and `cape-worker run` added nothing."""
    env = worker_env(tmp_path, "w")

    def few_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    code, out, err = run_under_limit(env, few_files)
    assert code == 2, out + err
    assert err == ("cape-worker: the open-files limit is 64 (ulimit -n); the worker needs at least 1024: raise it "
                   "(docker run --ulimit nofile=1024:1024, systemd LimitNOFILE=)\n"), out + err
    assert "minfds" not in out + err


def test_run_refuses_a_state_dir_too_deep_for_the_socket(tmp_path):
    env = worker_env(tmp_path, "w", CAPE_STATE_DIR=str(tmp_path / ("d" * 120)))
    run = subprocess.run(["cape-worker", "run"], env=env, capture_output=True, text=True, timeout=30)
    assert run.returncode == 2
    assert "CAPE_STATE_DIR is too deep for supervisord's unix socket" in run.stderr


def cape_worker(*args, env, cwd):
    """`cape-worker ARGS` in `cwd` (a folder without .env); a bounded wait."""
    return subprocess.run(["cape-worker", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60)


def test_check_with_a_user_token_fails_both_coordinator_and_broker(cape_server, acme, tmp_path):
    env = worker_env(tmp_path, "acme", CAPE_TOKEN=acme["user_token"], CAPE_COORDINATOR=cape_server.url)
    code, lines, out = check(env)
    assert code == 1, out
    assert lines["coordinator"] == ("FAIL coordinator   CAPE_TOKEN is a user token; a worker needs an organization "
                                    "token (`cape orgs create-token ORG`, as an admin of ORG)"), out
    assert lines["broker"] == ("FAIL broker        CAPE_TOKEN is a user token; a worker needs an organization "
                               "token (`cape orgs create-token ORG`, as an admin of ORG)"), out


NEW_TOKEN = "; its organization's admin creates a new one (`cape orgs create-token ORG`); set CAPE_TOKEN to it"


def test_check_tells_a_revoked_or_unknown_token_from_a_user_token_at_the_broker(cape_server, tmp_path):
    """As at the coordinator: the broker's 401 (unknown, revoked) says why and to make a new organization token."""
    org = cape_server.create_org("revoked-at-broker")
    token_id = org["organization_token"].split(",", 1)[0]
    assert Api(cape_server, org["user_token"]).delete(f"/v1/tokens/{token_id}").status_code == 204
    # In a worker operator's words, naming the token by its id (not secret): the servers' own messages are for
    # people and their tokens too (`cape tokens create`, `cape-server admin ...`).
    for token, why in ((org["organization_token"], f"token {token_id} was revoked"),
                       ("unknown1,ZHVtbXktc2VjcmV0LWR1bW15LXNlY3JldA==", "token unknown1 is not one it knows (check "
                                                                         "CAPE_TOKEN: it looks like <id>,<secret>)")):
        code, lines, out = check(worker_env(tmp_path, "w", CAPE_TOKEN=token, CAPE_COORDINATOR=cape_server.url))
        assert code == 1, out
        assert lines["broker"] == f"FAIL broker        {cape_server.url}/broker refused CAPE_TOKEN: {why}{NEW_TOKEN}"
        assert lines["coordinator"] == (f"FAIL coordinator   the coordinator at {cape_server.url} refused CAPE_TOKEN: "
                                        f"{why}{NEW_TOKEN}"), out
        assert token.split(",")[1] not in out


def test_token_hints_name_the_cli_commands(cape_server, tmp_path):
    code, lines, out = check(worker_env(tmp_path, "w", CAPE_TOKEN=""))
    assert code == 1
    assert lines["configuration"] == ("FAIL configuration CAPE_TOKEN: is not set; create an organization token "
                                      "(`cape-server admin create-org` or `cape orgs create-token ORG`) and pass it "
                                      "as CAPE_TOKEN"), out
    unknown = "unknown1,ZHVtbXktc2VjcmV0LWR1bW15LXNlY3JldA=="
    code, lines, out = check(worker_env(tmp_path, "w", CAPE_TOKEN=unknown, CAPE_COORDINATOR=cape_server.url))
    assert code == 1
    assert lines["coordinator"].endswith(NEW_TOKEN), out


@pytest.mark.parametrize("variable, suffix, base", [
    ("CAPE_COORDINATOR", "/v1", "coordinator's base URL, without /v1: {url}"),
    ("CAPE_COORDINATOR", "/v1/", "coordinator's base URL, without /v1: {url}"),
    ("CAPE_BROKER", "/broker/v1", "broker's base URL, without /v1: {url}/broker"),
])
def test_server_url_ending_in_v1(cape_server, acme, tmp_path, variable, suffix, base):
    env = worker_env(tmp_path, "acme", CAPE_TOKEN=acme["organization_token"],
                     **{"CAPE_COORDINATOR": cape_server.url, variable: cape_server.url + suffix})
    message = f"{variable}: give the {base.format(url=cape_server.url)}"
    code, lines, out = check(env)
    assert code == 1
    assert lines == {"configuration": f"FAIL configuration {message}"}, out
    run = cape_worker("run", env=env, cwd=tmp_path)
    assert (run.returncode, run.stderr) == (2, f"cape-worker: configuration error: {message}\n")


def test_env_file_that_does_not_exist(tmp_path):
    missing = tmp_path / "nonexist.env"
    env = worker_env(tmp_path, "w", CAPE_ENV_FILE=str(missing))
    message = f"CAPE_ENV_FILE: {missing} does not exist; fix the path or unset CAPE_ENV_FILE"
    result = cape_worker("check", env=env, cwd=tmp_path)
    assert (result.returncode, result.stdout) == (1, f"FAIL configuration {message}\n"), result.stderr
    for command in ("run", "status"):
        result = cape_worker(command, env=env, cwd=tmp_path)
        assert (result.returncode, result.stderr) == (2, f"cape-worker: configuration error: {message}\n")
    result = cape_worker("health", env=env, cwd=tmp_path)
    assert (result.returncode, result.stdout) == (1, f"unhealthy: {message}\n")
    assert not (tmp_path / "w" / "state" / "run").exists()  # nothing was started


def test_env_file_that_is_a_directory(tmp_path):
    env = worker_env(tmp_path, "w", CAPE_ENV_FILE=str(tmp_path))
    result = cape_worker("check", env=env, cwd=tmp_path)
    assert (result.returncode, result.stdout) == (1, f"FAIL configuration CAPE_ENV_FILE: {tmp_path} is a directory; "
                                                     "point CAPE_ENV_FILE at the .env file itself\n")


def test_env_file_fills_in_the_environment(tmp_path):
    """CAPE_ENV_FILE still works, and the default ./.env stays optional (the other tests run without one)."""
    env_file = tmp_path / "worker.env"
    env_file.write_text("CAPE_WORKER_NAME=from-file\n")
    env = {k: v for k, v in worker_env(tmp_path, "w", CAPE_ENV_FILE=str(env_file)).items() if k != "CAPE_WORKER_NAME"}
    result = cape_worker("status", env=env, cwd=tmp_path)
    assert (result.returncode, result.stderr) == (1, "")  # no worker runs
    assert result.stdout.splitlines()[0] == "worker from-file"


def test_status_needs_no_token_or_coordinator_and_exits_1_without_a_worker(tmp_path):
    env = {k: v for k, v in worker_env(tmp_path, "w").items() if k not in ("CAPE_TOKEN", "CAPE_COORDINATOR")}
    result = cape_worker("status", env=env, cwd=tmp_path)
    sock = tmp_path / "w" / "state" / "run" / "supervisor.sock"
    spool = tmp_path / "w" / "spool"
    assert (result.returncode, result.stderr) == (1, "")
    assert result.stdout.splitlines() == [
        "worker w",
        "keys: none yet (the first start makes them)",
        f"no worker is running on this state dir: no supervisord socket at {sock}; is the worker running "
        "(`cape-worker run`) with this CAPE_STATE_DIR?",
        "  poller     MISSING", "  messenger  MISSING", "  runner     MISSING", "  uploader   MISSING",
        f"jobs: {spool} does not exist (the worker makes it at start); is CAPE_SPOOL_DIR the worker's?",
    ]
    assert not (tmp_path / "w").exists()  # status made nothing
    result = cape_worker("status", env={**env, "CAPE_TOKEN": "malformed"}, cwd=tmp_path)
    assert result.returncode == 1, result.stderr  # nor a valid one: status never reads it
    assert "Exit status: 0 if a worker is running on this CAPE_STATE_DIR" in \
        " ".join(cape_worker("status", "--help", env=env, cwd=tmp_path).stdout.split())


def test_status_json_says_what_the_text_says(tmp_path):
    env = worker_env(tmp_path, "w")
    Spool(tmp_path / "w" / "spool").put_job({"id": "job-a", "seat": "x_owner", "status": "Approved"})
    result = cape_worker("status", "--json", env=env, cwd=tmp_path)
    assert result.returncode == 1
    status = json.loads(result.stdout)
    assert status["worker"] == "w" and status["running"] is False
    assert status["programs"] == {"poller": "MISSING", "messenger": "MISSING", "runner": "MISSING",
                                  "uploader": "MISSING"}
    assert status["supervisor_error"].startswith("no supervisord socket at ")
    assert (status["spool_dir"], status["spool_exists"]) == (str(tmp_path / "w" / "spool"), True)
    assert [job["id"] for job in status["jobs"]] == ["job-a"]
    assert status["key_fingerprint"] is None  # no first start yet
    keys = WorkerKeys.load_or_create(tmp_path / "w" / "state")
    fingerprint = json.loads(cape_worker("status", "--json", env=env, cwd=tmp_path).stdout)["key_fingerprint"]
    assert fingerprint == keys.fingerprint and re.fullmatch(r"SHA256:[A-Za-z0-9+/]{43}", fingerprint)
    assert f"keys: {fingerprint} (for a partner's operator whose worker says this organization's keys changed)" in \
        cape_worker("status", env=env, cwd=tmp_path).stdout.splitlines()


def test_status_says_the_oom_kills_its_memory_cgroup_counted(tmp_path):
    """`docker exec ... cape-worker status` in a container (here a memory cgroup of its own) whose processes the
    kernel's OOM killer took: it says how many, and what to do; none counted, it says nothing of memory."""
    env = worker_env(tmp_path, "w")
    with child_memory_cgroup() as group:
        def status(*args: str) -> str:
            code = join_code(group) + f"os.execvp('cape-worker', ['cape-worker', 'status', *{list(args)!r}])"
            return subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True,
                                  text=True, timeout=60).stdout

        assert json.loads(status("--json"))["oom_kills"] == 0
        assert "memory:" not in status()
        assert oom_kill_in(group) == -signal.SIGKILL
        assert json.loads(status("--json"))["oom_kills"] == 1
        assert ("memory: the kernel's OOM killer killed 1 of this worker's processes since its container started "
                "(its memory cgroup's count); give it more memory (README, \"Memory and other limits\")"
                ) in status().splitlines()


def test_status_of_a_stopped_worker_shows_claims_and_reasons(tmp_path):
    env = worker_env(tmp_path, "w")
    spool = Spool(tmp_path / "w" / "spool")
    spool.put_job({"id": "job-a", "seat": "x_owner", "status": "Started"})
    spool.claim("job-a")
    spool.put_job({"id": "job-e", "seat": "helper", "status": "Started"})
    spool.mark_done("job-e", "error", "no message 'x_owner.lr-v' arrived within 600 s")
    lines = cape_worker("status", env=env, cwd=tmp_path).stdout.splitlines()
    assert lines[-4:] == [
        f"jobs in {tmp_path / 'w' / 'spool'}: 2 (2 in progress, 0 finished)",
        "  job-a  seat=x_owner  status=Started  runner=claimed  unsent_messages=0  pending_reports=0  result=-"
        "  approved=-",
        "  job-e  seat=helper  status=Started  runner=error  unsent_messages=0  pending_reports=0  result=-"
        "  approved=-",
        "    reason: no message 'x_owner.lr-v' arrived within 600 s",
    ]


def test_status_lists_what_is_in_progress_first_then_the_most_recently_finished(tmp_path):
    """With a hundred finished jobs kept, the running one was the last of a hundred undated lines."""
    env = worker_env(tmp_path, "w")
    spool = Spool(tmp_path / "w" / "spool")
    for k in range(15):
        job = f"old-{k:02d}"
        spool.put_job({"id": job, "seat": "x_owner", "status": "Started", "approved_at": f"2026-01-{k + 1:02d}"})
        spool.mark_done(job, "completed")
        spool.mark_ended(job, "Completed")
        os.utime(spool.job_dir(job) / "ended.json", (1.7e9 + k * 3600, 1.7e9 + k * 3600))
    spool.put_job({"id": "now", "seat": "x_owner", "status": "Started", "approved_at": "2026-11-26T10:00:00.000Z"})
    spool.claim("now")
    spool.put_job({"id": "stopped", "seat": "x_owner", "status": "Started"})  # ended while the worker was down:
    spool.mark_ended("stopped", "Stopped", "stopped by its submitter")     # not in progress, though not closed
    os.utime(spool.job_dir("stopped") / "ended.json", (1.6e9, 1.6e9))
    lines = cape_worker("status", env=env, cwd=tmp_path).stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("jobs in "))
    assert lines[start].endswith(": 17 (1 in progress, 16 finished)")
    assert lines[start + 1].startswith("  now  seat=x_owner  status=Started  runner=claimed")
    assert lines[start + 1].endswith("approved=2026-11-26T10:00:00.000Z")
    listed = [line.split()[0] for line in lines[start + 2:start + 12]]
    assert listed == [f"old-{k:02d}" for k in range(14, 4, -1)]  # the ten most recently ended, newest first
    assert lines[start + 2].endswith("ended=2023-11-15T12:13:20.000Z")
    assert lines[start + 12] == "  ... and 6 earlier finished job(s) (--all lists them)"
    every = cape_worker("status", "--all", env=env, cwd=tmp_path).stdout
    assert "old-00" in every and "--all lists them" not in every
    status = json.loads(cape_worker("status", "--json", env=env, cwd=tmp_path).stdout)
    assert len(status["jobs"]) == 17 and status["jobs"][0]["id"] == "now" and status["jobs"][0]["active"] is True
    assert [job["active"] for job in status["jobs"] if job["id"] == "stopped"] == [False]


@pytest.mark.parametrize("args, usage", [
    ([], "Usage: cape-worker [OPTIONS] COMMAND [ARGS]..."),
    (["run"], "Usage: cape-worker run [OPTIONS]"),
    (["check"], "Usage: cape-worker check [OPTIONS]"),
    (["status"], "Usage: cape-worker status [OPTIONS]"),
    (["health"], "Usage: cape-worker health [OPTIONS]"),
])
def test_short_help_option(tmp_path, args, usage):
    env = worker_env(tmp_path, "w")
    short, long = (cape_worker(*args, flag, env=env, cwd=tmp_path) for flag in ("-h", "--help"))
    assert (short.returncode, short.stderr) == (0, "")
    assert short.stdout.splitlines()[0] == usage
    assert short.stdout == long.stdout
    assert "  -h, --help " in short.stdout
    assert not (tmp_path / "w").exists()  # help only: `run -h` started nothing


def kill_whole_worker(worker) -> None:
    """SIGKILL `cape-worker run`, supervisord and every program at once, as when a container is killed."""
    root = psutil.Process(worker.proc.pid)
    procs = [root, *root.children(recursive=True)]
    for proc in procs:
        proc.kill()
    _, alive = psutil.wait_procs(procs, timeout=15)
    assert not alive, alive


def test_run_refuses_while_a_worker_runs_on_the_same_state_dir(start_worker, tmp_path):
    env = worker_env(tmp_path, "w")
    first = start_worker(env)
    first.wait_running()
    run = cape_worker("run", env=env, cwd=tmp_path)
    state = tmp_path / "w" / "state"
    assert (run.returncode, run.stdout) == (2, "")
    assert run.stderr == (f"cape-worker: a worker is already running with CAPE_STATE_DIR={state} (its supervisord "
                          f"answers on {state / 'run' / 'supervisor.sock'}); stop it first\n")
    assert first.proc.poll() is None
    first.wait_running(timeout=5)


def test_run_makes_a_spool_others_could_read_private(start_worker, tmp_path):
    """An older worker made its spool 755 (job specs with dataview uris, shares, models readable by any local
    user); nothing said so, nor changed it."""
    env = worker_env(tmp_path, "w")
    spool = tmp_path / "w" / "spool"
    spool.mkdir(parents=True)
    spool.chmod(0o755)
    worker = start_worker(env)
    worker.wait_running()
    assert spool.stat().st_mode & 0o777 == 0o700
    assert f"cape-worker: {spool} was open to other users (mode 755); it is this user's alone now (700)" in \
        worker.output


def test_run_starts_over_a_killed_workers_leftover_socket(start_worker, tmp_path):
    env = worker_env(tmp_path, "w")
    first = start_worker(env)
    first.wait_running()
    kill_whole_worker(first)
    run_dir = tmp_path / "w" / "state" / "run"
    assert (run_dir / "supervisor.sock").exists() and (run_dir / "supervisord.pid").exists()  # left behind
    second = start_worker(env)
    second.wait_running()
    assert "already running" not in second.output


def test_two_runs_started_at_once_leave_one_worker(start_worker, tmp_path):
    """Both can pass the live-supervisord check before either supervisord listens: the run dir's lock decides."""
    env = worker_env(tmp_path, "w")
    workers = [start_worker(env), start_worker(env)]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and all(w.proc.poll() is None for w in workers):
        time.sleep(0.05)
    refused = [w for w in workers if w.proc.poll() is not None]
    assert len(refused) == 1, [w.output[-1000:] for w in workers]
    assert refused[0].proc.returncode == 2
    state = tmp_path / "w" / "state"
    assert f"cape-worker: a worker is already running with CAPE_STATE_DIR={state} (" in refused[0].output
    running = next(w for w in workers if w is not refused[0])
    running.wait_running()
    assert running.proc.poll() is None


def test_two_workers_cannot_share_a_spool(start_worker, tmp_path):
    """Different state dirs, one CAPE_SPOOL_DIR: they would take each other's jobs and messages."""
    first = start_worker(worker_env(tmp_path, "w1"))
    first.wait_running()
    second = start_worker(worker_env(tmp_path, "w2", CAPE_SPOOL_DIR=str(tmp_path / "w1" / "spool")))
    assert second.wait_exit(20) == 2
    spool = tmp_path / "w1" / "spool"
    assert (f"cape-worker: a worker is already running with CAPE_SPOOL_DIR={spool} (another `cape-worker run` holds "
            f"{spool / '.worker.lock'}); each worker needs its own spool") in second.output
    assert first.proc.poll() is None


def test_a_revoked_token_makes_the_worker_unhealthy(start_worker, shared_cape_server, tmp_path):
    """All four programs keep running (the poller retries), so the health check reads the poller's record: a
    refused token needs the operator. A new run starts without it (the token may be new)."""
    org = shared_cape_server.create_org("revoked")
    env = worker_env(tmp_path, "revoked", CAPE_TOKEN=org["organization_token"],
                     CAPE_COORDINATOR=shared_cape_server.url)
    worker = start_worker(env)
    worker.wait_running()
    wait_for(lambda: "logged in as organization revoked" in worker.output, worker)
    assert cape_worker("health", env=env, cwd=tmp_path).returncode == 0

    token_id = org["organization_token"].split(",", 1)[0]
    assert Api(shared_cape_server, org["user_token"]).delete(f"/v1/tokens/{token_id}").status_code == 204
    wait_for(lambda: cape_worker("health", env=env, cwd=tmp_path).returncode == 1, worker)
    result = cape_worker("health", env=env, cwd=tmp_path)
    line = f"the coordinator at {shared_cape_server.url} refused CAPE_TOKEN: token {token_id} was revoked{NEW_TOKEN}"
    assert result.stdout.startswith("unhealthy: the coordinator refuses this worker (since 20"), result.stdout
    assert result.stdout.rstrip().endswith(f"UTC): {line}"), result.stdout
    status = cape_worker("status", env=env, cwd=tmp_path)
    assert f"coordinator: the coordinator refuses this worker (since " in status.stdout
    assert json.loads(cape_worker("status", "--json", env=env, cwd=tmp_path).stdout)["login_refused"]["message"] \
        == line
    secret = org["organization_token"].split(",", 1)[1]
    assert secret not in result.stdout + status.stdout + worker.output

    worker.proc.send_signal(signal.SIGTERM)
    assert worker.wait_exit(timeout=10) == 0
    again = start_worker({**env, "CAPE_COORDINATOR": "http://127.0.0.1:9"})  # unreachable: nothing refuses
    again.wait_running()
    result = cape_worker("health", env=env, cwd=tmp_path)
    assert (result.returncode, result.stdout.split(":")[0]) == (0, "healthy"), result.stdout


def wait_for(condition, worker, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, worker.output[-2000:]
        time.sleep(0.2)


def test_misspelled_variables_are_warned_of_by_check_and_run(start_worker, tmp_path):
    """From the environment or ./.env: each is named with the variable it most resembles; `run` says so before it
    starts anything, and still starts (`status` also warns, on stderr)."""
    (tmp_path / ".env").write_text("CAPE_BUKCET=file:///srv/models\n")
    env = worker_env(tmp_path, "w", CAPE_CLOUDWACH="on", CAPE_POLL_INTERVALL="5", AWS_REGION_NAME="eu-west-1")
    warnings = [
        "CAPE_BUKCET is not a variable the worker reads, so it is ignored; did you mean CAPE_BUCKET?",
        "CAPE_CLOUDWACH is not a variable the worker reads, so it is ignored; did you mean CAPE_CLOUDWATCH?",
        "CAPE_POLL_INTERVALL is not a variable the worker reads, so it is ignored; did you mean CAPE_POLL_INTERVAL?",
        "AWS_REGION_NAME is not a variable boto3 reads, so it is ignored; did you mean AWS_REGION?",
    ]
    result = cape_worker("check", env=env, cwd=tmp_path)
    out = result.stdout.splitlines()
    assert out[0].startswith("ok   configuration ") and out[1:5] == [f"WARN variables     {w}" for w in warnings]
    worker = start_worker(env)  # its cwd is tmp_path, with the .env
    worker.wait_running()
    assert worker.output.splitlines()[:4] == [f"cape-worker: warning: {w}" for w in warnings], worker.output[:3000]
    status = cape_worker("status", env=env, cwd=tmp_path)
    assert status.returncode == 0 and "  poller     RUNNING" in status.stdout
    assert status.stderr.splitlines() == [f"cape-worker: warning: {w}" for w in warnings]


def test_a_secret_in_the_wrong_variable_is_never_echoed(tmp_path):
    token = worker_env(tmp_path, "w")["CAPE_TOKEN"]
    aws_secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    for change, variable in (({"CAPE_COORDINATOR": token}, "CAPE_COORDINATOR"),
                             ({"AWS_ENDPOINT_URL": aws_secret, "AWS_ACCESS_KEY_ID": "AKIAX",
                               "AWS_SECRET_ACCESS_KEY": aws_secret}, "AWS_ENDPOINT_URL")):
        env = worker_env(tmp_path, "w", **change)
        message = f"{variable}: is not an http(s) URL: (the value looks like a secret; not shown); use e.g. "
        code, lines, out = check(env)
        assert code == 1 and lines["configuration"].startswith(f"FAIL configuration {message}"), out
        run = cape_worker("run", env=env, cwd=tmp_path)
        assert run.returncode == 2 and run.stderr.startswith(f"cape-worker: configuration error: {message}")
        assert change[variable] not in out + run.stderr and token.split(",")[1] not in out + run.stderr
    code, lines, out = check(worker_env(tmp_path, "w", CAPE_COORDINATOR="htps://cape.example.com"))
    assert "is not an http(s) URL: 'htps://cape.example.com'; use e.g." in lines["configuration"], out  # a typo shows


def modes(folder):
    """{path: mode} of `folder` and everything under it."""
    return {path: oct(path.stat().st_mode & 0o777) for path in [folder, *folder.rglob("*")]}


def test_check_and_status_make_nothing_others_can_read(tmp_path):
    """`run` makes its folders 0700 (umask 077): `check` makes none, `status` only the spool's stage folders, 0700
    too, so whichever command comes first, no folder is world-readable (even under a umask of 022)."""
    env = worker_env(tmp_path, "w", CAPE_BUCKET="")

    def cape_worker_022(*args):
        return subprocess.run(["cape-worker", *args], env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=60, umask=0o022)

    lines = {line[5:].split(" ", 1)[0]: line for line in cape_worker_022("check").stdout.splitlines()}
    spool, state = tmp_path / "w" / "spool", tmp_path / "w" / "state"
    assert re.fullmatch(rf"ok   spool         {re.escape(str(spool))} does not exist yet; the worker will create it "
                        rf"\({re.escape(str(tmp_path))} is writable\), \d+ MiB free", lines["spool"]), lines
    assert lines["state"].startswith(f"ok   state         {state} does not exist yet;"), lines
    assert lines["keys"] == ("ok   keys          encryption_key.pem, signing_key.pem not in "
                             f"{state} yet; the worker makes them at its first start"), lines
    assert not (tmp_path / "w").exists()
    spool.mkdir(mode=0o700, parents=True)
    assert cape_worker_022("status").returncode == 1
    made = modes(spool)
    assert len(made) == 9 and set(made.values()) == {"0o700"}, made  # the spool and its 8 stage folders


def test_check_makes_no_missing_bucket_directory(tmp_path):
    """A mistyped file:// bucket is not made real: the line says it does not exist and whether the worker could
    make it; an existing one gets a test file written and removed."""
    missing = tmp_path / "nonexistent" / "deep" / "dir"
    code, lines, out = check(worker_env(tmp_path, "w", CAPE_BUCKET=missing.as_uri()))
    assert lines["bucket"] == (f"ok   bucket        {missing} does not exist yet; the worker will create it "
                               f"({tmp_path} is writable)"), out
    assert not (tmp_path / "nonexistent").exists()
    (tmp_path / "a-file").write_text("x")
    code, lines, out = check(worker_env(tmp_path, "w", CAPE_BUCKET=(tmp_path / "a-file" / "models").as_uri()))
    assert lines["bucket"] == (f"FAIL bucket        {tmp_path / 'a-file' / 'models'} does not exist and the worker "
                               f"cannot create it ({tmp_path / 'a-file'} is not a writable directory); create it, "
                               "or fix CAPE_BUCKET"), out
    bucket = tmp_path / "models"
    bucket.mkdir()
    code, lines, out = check(worker_env(tmp_path, "w", CAPE_BUCKET=bucket.as_uri()))
    assert lines["bucket"] == f"ok   bucket        {bucket.as_uri()}: exists and is writable: wrote and deleted a " \
                              "test object", out
    assert list(bucket.iterdir()) == []


def test_status_says_when_the_coordinator_is_unreachable(start_worker, tmp_path):
    """Every program stays RUNNING while the poller retries (and the worker is healthy: it catches up once the
    coordinator answers), so only status says the coordinator is down, and since when."""
    env = worker_env(tmp_path, "w")  # its CAPE_COORDINATOR, port 9 on loopback, never answers
    worker = start_worker(env)
    worker.wait_running()
    deadline = time.monotonic() + 20
    status = {}
    while time.monotonic() < deadline and not status.get("coordinator_unreachable"):
        status = json.loads(cape_worker("status", "--json", env=env, cwd=tmp_path).stdout)
        time.sleep(0.2)
    assert status["coordinator_unreachable"]["message"].startswith(
        "cannot reach the coordinator at http://127.0.0.1:9 (connection refused); check CAPE_COORDINATOR")
    lines = cape_worker("status", env=env, cwd=tmp_path).stdout.splitlines()
    assert any(line.startswith("coordinator: the coordinator is unreachable; the poller retries (since 20")
               for line in lines), lines
    assert cape_worker("health", env=env, cwd=tmp_path).returncode == 0
    # An hour on, a coordinator that moved, say: the worker is unhealthy, or it would idle for weeks unnoticed.
    run_dir = health.run_dir_from_env(env)
    record = json.loads((run_dir / health.COORDINATOR_UNREACHABLE.name).read_text())
    (run_dir / health.COORDINATOR_UNREACHABLE.name).write_text(json.dumps({**record, "since": time.time() - 3700}))
    unhealthy = cape_worker("health", env=env, cwd=tmp_path)
    assert unhealthy.returncode == 1 and unhealthy.stdout.startswith(
        "unhealthy for over 60 min: the coordinator is unreachable; the poller retries (since 20"), unhealthy.stdout
    health.COORDINATOR_UNREACHABLE.clear(run_dir)
    # The messenger's record of a broker it cannot reach (tests/test_worker_messenger.py writes it for real) is
    # said the same way, and is no health failure either.
    health.BROKER_UNREACHABLE.record(health.run_dir_from_env(env), "list messages of job j1: the broker answered "
                                                                   "502 Bad Gateway")
    status = json.loads(cape_worker("status", "--json", env=env, cwd=tmp_path).stdout)
    assert status["broker_unreachable"]["message"] == "list messages of job j1: the broker answered 502 Bad Gateway"
    lines = cape_worker("status", env=env, cwd=tmp_path).stdout.splitlines()
    assert any(line.startswith("broker: the broker is unreachable or failing; messages wait and the messenger "
                               "retries (since 20") and line.endswith("502 Bad Gateway") for line in lines), lines
    assert cape_worker("health", env=env, cwd=tmp_path).returncode == 0


def test_check_answers_within_seconds_from_an_s3_endpoint_that_never_answers(tmp_path):
    """Connections are taken (the backlog) but nothing is ever read: the uploader's own patience (60 s, three
    attempts) made `check` silent for four minutes; its lines come as each check ends."""
    import socket

    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(50)
    try:
        env = worker_env(tmp_path, "w", CAPE_BUCKET="s3://models", AWS_ACCESS_KEY_ID="a", AWS_SECRET_ACCESS_KEY="b",
                         AWS_ENDPOINT_URL=f"http://127.0.0.1:{hung.getsockname()[1]}")
        started = time.monotonic()
        code, lines, out = check(env)
        elapsed = time.monotonic() - started
    finally:
        hung.close()
    assert code == 1 and elapsed < 30, (elapsed, out)
    assert lines["bucket"].startswith("FAIL bucket        S3 failed while writing s3://models/.cape-worker-check-"), out
    assert "ReadTimeoutError" in lines["bucket"], out


def test_check_fails_a_spool_volume_with_less_room_than_the_messenger_keeps(tmp_path, monkeypatch):
    """Below 256 MiB free the messenger takes no message in: `check` passed while every job stalled. Unit test: the
    volume's free space is simulated."""
    import shutil as shutil_module
    from collections import namedtuple

    from services.worker import checks
    from services.worker.config import WorkerConfig

    config = WorkerConfig.from_env(worker_env(tmp_path, "w"))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(4 * 1024**2, 0, 4 * 1024**2))
    result = checks.check_spool(config)
    assert not result.ok and result.detail == (
        f"{config.spool_dir}'s volume has 4 MiB free; the messenger keeps 256 MiB free (messages wait at the broker "
        "below it) and a job needs room for its messages: give CAPE_SPOOL_DIR a volume with at least 512 MiB free "
        "(at n = 10^6 rows and d = 32 columns, the y-owner's worker keeps 0.26 GB of messages)")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(8 * 1024**3, 0, 2 * 1024**3))
    assert checks.check_spool(config).ok and checks.check_spool(config).detail.endswith(", 2048 MiB free")


def test_check_says_when_another_worker_of_the_organization_holds_its_seat(shared_cape_server, tmp_path):
    """Every line was ok while the coordinator refused this worker's keys (`health`: unhealthy)."""
    from services.worker.keys import WorkerKeys

    org = shared_cape_server.create_org("seat-held")
    token = org["organization_token"]
    env = worker_env(tmp_path, "second", CAPE_TOKEN=token, CAPE_COORDINATOR=shared_cape_server.url)
    code, lines, out = check(env)
    assert code == 0 and lines["coordinator"].endswith("logged in as organization seat-held"), out  # nobody yet
    first = WorkerKeys.load_or_create(tmp_path / "first-state")
    worker = Api(shared_cape_server, token)
    assert worker.put("/v1/worker/keys", json=first.public_keys()).status_code == 204
    assert worker.post("/v1/worker/heartbeat", json={"signing_public_key": first.signing_public_b64}
                       ).status_code == 204
    assert worker.get("/v1/worker/keys").json()["online"] is True
    code, lines, out = check(env)
    assert code == 1, out
    assert re.fullmatch(r"FAIL coordinator   \S+: logged in as organization seat-held, but another worker of it, with "
                        r"other keys, was heard from \d+ s ago: the coordinator would refuse this one; an organization "
                        r"runs one worker \(stop the other, or give this one the other's CAPE_STATE_DIR\)",
                        lines["coordinator"]), out
    code, lines, out = check({**env, "CAPE_STATE_DIR": str(tmp_path / "first-state")})  # the holder itself
    assert code == 0 and lines["coordinator"].endswith("logged in as organization seat-held"), out


def test_check_never_prints_a_token_pasted_into_a_url_variable(tmp_path):
    """The broker's line repeated CAPE_BROKER verbatim (a token pasted into CAPE_COORDINATOR, say)."""
    port = free_port()
    token = "0123456789abcdef0123456789abcdef,XNKf0QmHBqVhW0N2VTB51ztGpByecVacVja6D2RcpmU="
    env = worker_env(tmp_path, "w", CAPE_TOKEN=token, CAPE_COORDINATOR=f"http://127.0.0.1:{port}/{token}")
    code, lines, out = check(env)
    assert code == 1 and "broker" in lines, out
    assert "XNKf0QmHBqVhW0N2VTB51ztGpByecVacVja6D2RcpmU" not in out and "[REDACTED]" in lines["broker"], out


def test_version_says_which_version_the_worker_is():
    """`cape --version` and `cape-server --version` said it; an operator upgrading could not tell a worker's."""
    from importlib.metadata import version

    command = os.path.join(os.path.dirname(sys.executable), "cape-worker")  # the venv's, as worker_env's PATH has
    result = subprocess.run([command, "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == f"cape-worker, version {version('cape-workers')}"
