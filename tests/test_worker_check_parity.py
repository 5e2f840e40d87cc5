"""`cape-worker check` fails where `cape-worker run` then fails, with the same advice: key files others can read, a
key file that is not a key (with or without its pair), a CAPE_STATE_DIR too deep for supervisord's unix socket.
Each is run for real: `run` refuses before it starts anything (its four programs used to fail, restart and end
FATAL) and says what `check` said."""
import subprocess

import pytest

from services.worker.keys import ENCRYPTION_KEY_FILE, SIGNING_KEY_FILE, WorkerKeys
from services.worker.memory_cgroup import memory_limit
from services.worker.resource_limits import memory_limit_said
from tests.support.workers import worker_env

RUN_TIMEOUT = 30


def check_lines(env, cwd):
    result = subprocess.run(["cape-worker", "check"], env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
    return {line[5:].split(" ", 1)[0]: line for line in result.stdout.splitlines()}, result.returncode


def readable_by_others(state):
    WorkerKeys.load_or_create(state)
    (state / ENCRYPTION_KEY_FILE).chmod(0o644)
    path = state / ENCRYPTION_KEY_FILE
    return f"{path} is readable by other users (mode 644); run `chmod 600 {path}`"


def not_a_key(state):
    WorkerKeys.load_or_create(state)
    (state / SIGNING_KEY_FILE).write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
    return f"{state / SIGNING_KEY_FILE} is not a readable private key; move it away to make a new one"


def not_a_key_without_its_pair(state):
    state.mkdir(mode=0o700, parents=True)
    path = state / SIGNING_KEY_FILE
    path.write_bytes(b"not a key")
    path.chmod(0o600)
    return f"{path} is not a readable private key; move it away to make a new one"


@pytest.mark.parametrize("spoil", [readable_by_others, not_a_key, not_a_key_without_its_pair])
def test_a_key_file_run_refuses_fails_check_with_the_same_advice(start_worker, tmp_path, spoil):
    env = worker_env(tmp_path, "w")
    state = tmp_path / "w" / "state"
    message = spoil(state)
    before = sorted(state.iterdir())
    lines, code = check_lines(env, tmp_path)
    assert code == 1 and lines["keys"] == f"FAIL keys          {message}", lines
    assert sorted(state.iterdir()) == before  # check made no key
    worker = start_worker(env)
    assert worker.wait_exit(RUN_TIMEOUT) == 2, worker.output[-3000:]
    assert worker.output.strip().splitlines()[-1] == f"cape-worker: {message}; see `cape-worker check`"
    assert "supervisord" not in worker.output


def test_key_files_run_accepts_pass_check(tmp_path):
    env = worker_env(tmp_path, "w")
    state = tmp_path / "w" / "state"
    WorkerKeys.load_or_create(state)
    lines, _ = check_lines(env, tmp_path)
    assert lines["keys"] == f"ok   keys          {state}: both key files load", lines
    (state / SIGNING_KEY_FILE).unlink()
    lines, _ = check_lines(env, tmp_path)
    assert lines["keys"] == (f"ok   keys          {SIGNING_KEY_FILE} not in {state} yet; the worker makes it at its "
                             "first start"), lines
    assert not (state / SIGNING_KEY_FILE).exists()


def test_a_state_dir_too_deep_for_the_socket_fails_check_as_run_refuses_it(tmp_path):
    state = tmp_path / ("d" * 120)
    env = worker_env(tmp_path, "w", CAPE_STATE_DIR=str(state))
    run = subprocess.run(["cape-worker", "run"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert run.returncode == 2
    problem = run.stderr.removeprefix("cape-worker: ").rstrip("\n")
    assert problem.startswith("CAPE_STATE_DIR is too deep for supervisord's unix socket (")
    assert not state.exists()  # refused before making anything
    lines, code = check_lines(env, tmp_path)
    assert code == 1 and lines["state"] == f"FAIL state         {problem}", lines
    assert not state.exists()


def test_an_open_files_limit_run_refuses_fails_check_with_the_same_advice(tmp_path):
    """`check` passed every local check under `ulimit -n 64`, and `run` then refused to start."""
    import resource

    env = worker_env(tmp_path, "w")

    def few_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    run = subprocess.run(["cape-worker", "run"], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=RUN_TIMEOUT, preexec_fn=few_files)
    assert run.returncode == 2
    problem = run.stderr.removeprefix("cape-worker: ").rstrip("\n")
    checked = subprocess.run(["cape-worker", "check"], env=env, cwd=tmp_path, capture_output=True, text=True,
                             timeout=60, preexec_fn=few_files)
    lines = {line[5:].split(" ", 1)[0]: line for line in checked.stdout.splitlines()}
    assert checked.returncode == 1 and lines["limits"] == f"FAIL limits        {problem}", lines
    lines, _ = check_lines(env, tmp_path)
    memory = memory_limit_said(memory_limit())[1]  # the tests' own cgroup: most often no limit
    assert lines["limits"] == f"ok   limits        open files: at least 1024; {memory}", lines
