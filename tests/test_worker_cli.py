"""`cape-worker check` against the real cape-server and a real moto server: all ok, then each bad setting gives
its own line and a non-zero exit; `cape-worker run` refuses a bad configuration before starting anything."""
import subprocess

import pytest

from tests.support.aws import free_port
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
    assert list(lines) == ["configuration", "spool", "state", "coordinator", "broker", "bucket", "cloudwatch"]
    assert all(line.startswith("ok   ") for line in lines.values()), out
    assert "logged in as organization acme" in lines["coordinator"]
    assert "s3://acme-models/cape: wrote and deleted a test object" in lines["bucket"]
    assert moto.keys("acme-models") == []  # the test object is gone
    assert good_env["CAPE_TOKEN"].split(",")[1] not in out


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
    ({"CAPE_BUCKET": "bucket-without-scheme"}, "CAPE_BUCKET: must start with s3://"),
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


def test_run_refuses_a_state_dir_too_deep_for_the_socket(tmp_path):
    env = worker_env(tmp_path, "w", CAPE_STATE_DIR=str(tmp_path / ("d" * 120)))
    run = subprocess.run(["cape-worker", "run"], env=env, capture_output=True, text=True, timeout=30)
    assert run.returncode == 2
    assert "CAPE_STATE_DIR is too deep for supervisord's unix socket" in run.stderr
