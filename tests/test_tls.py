"""HTTPS: `cape-server serve --tls-cert/--tls-key` (a test CA's certificate for 127.0.0.1), a whole job through
three workers that trust that CA with REQUESTS_CA_BUNDLE, a broker running alone that reaches its coordinator
over TLS (SSL_CERT_FILE), and what the worker, the CLI and the server say when TLS is set up wrong: an untrusted
certificate, a certificate for another name, http:// to a TLS port, a missing CA file, a key that is not the
certificate's, plain HTTP to another machine."""
import subprocess

import numpy as np
import pytest
import requests

from services.connection_errors import connection_problem, is_loopback, plain_http_to_another_host
from services.jobs.linear_regression import plaintext_fit
from services.worker.config import ConfigError, WorkerConfig
from tests.support.server import CapeServer, cape_server_command
from tests.support.tls import make_tls, other_ca
from tests.support.workers import DUMMY_TOKEN, JobWorld, worker_env

TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def tls_server(tls, tmp_path, monkeypatch):
    """A cape-server on https://127.0.0.1; this process (and what it starts) trusts its CA through requests."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tls.ca))
    server = CapeServer(tmp_path / "server", extra_args=["--tls-cert", str(tls.cert), "--tls-key", str(tls.key)])
    yield server
    server.stop()


def check(env):
    result = subprocess.run(["cape-worker", "check"], env=env, capture_output=True, text=True, timeout=60)
    lines = {line[5:].split(" ", 1)[0]: line for line in result.stdout.splitlines()}
    return result.returncode, lines, result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_job_runs_through_three_workers_over_https(tls_server, start_worker, tmp_path):
    assert tls_server.url.startswith("https://127.0.0.1:")
    with pytest.raises(requests.ConnectionError):  # the port speaks TLS only
        requests.get(tls_server.url.replace("https://", "http://") + "/healthz", timeout=5)
    world = JobWorld(tls_server, tmp_path)
    workers = {label: start_worker(worker_env(tmp_path, label, CAPE_TOKEN=world.token(label),
                                              CAPE_COORDINATOR=tls_server.url))
               for label in JobWorld.LABELS}
    for worker in workers.values():
        worker.wait_running()
        assert "REQUESTS_CA_BUNDLE" in worker.env
    job = world.wait_ended(world.submit())
    assert job["status"] == "Completed", job
    weights = np.loadtxt(tmp_path / "yorg" / "bucket" / job["id"] / "regression_weights.csv", delimiter=",")
    expected, _ = plaintext_fit(world.x, world.y)
    assert np.max(np.abs(weights - expected)) / np.max(np.abs(expected)) <= TOLERANCE


def test_worker_check_says_what_is_wrong_with_tls(tls, tls_server, tmp_path):
    org = tls_server.create_org("acme")
    env = worker_env(tmp_path, "acme", CAPE_TOKEN=org["organization_token"], CAPE_COORDINATOR=tls_server.url)
    code, lines, out = check(env)
    assert lines["coordinator"].startswith(f"ok   coordinator   {tls_server.url}: logged in as organization acme"), out
    assert lines["broker"].startswith("ok   broker"), out

    untrusted = "its TLS certificate is not trusted here (self-signed certificate in certificate chain); set " \
                "REQUESTS_CA_BUNDLE to the PEM file of the CA that signed it"
    code, lines, out = check({**env, "REQUESTS_CA_BUNDLE": str(other_ca(tmp_path / "other"))})
    assert code == 1
    assert lines["coordinator"] == (f"FAIL coordinator   cannot reach the coordinator at {tls_server.url} "
                                    f"({untrusted}); check CAPE_COORDINATOR and the network"), out
    assert lines["broker"] == (f"FAIL broker        cannot reach {tls_server.url}/broker ({untrusted}); check "
                               "CAPE_BROKER (default: CAPE_COORDINATOR + /broker) and the network"), out

    plain = tls_server.url.replace("https://", "http://")
    code, lines, out = check({**env, "CAPE_COORDINATOR": plain})
    assert code == 1
    assert ("the connection closed without an answer: the server restarting, or a TLS port, whose URL must start "
            "with https://" in lines["coordinator"]), out

    for value, problem in ((str(tmp_path / "missing.pem"), "which does not exist"),
                           (str(tls.key), "which holds no PEM certificate")):
        code, lines, out = check({**env, "REQUESTS_CA_BUNDLE": value})
        assert code == 1
        assert lines["configuration"] == (f"FAIL configuration REQUESTS_CA_BUNDLE: names {value!r}, {problem}; give "
                                          "the PEM file of the CA that signed the coordinator's certificate"), out
        result = subprocess.run(["cape-worker", "run"], env={**env, "REQUESTS_CA_BUNDLE": value},
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and f"REQUESTS_CA_BUNDLE: names {value!r}, {problem}" in result.stderr


def test_a_certificate_for_another_name_is_named_as_such(tmp_path):
    wrong = make_tls(tmp_path / "wrong", wrong_name=True)
    # Started by hand: CapeServer's own health check could not verify the name either.
    proc = subprocess.Popen([*cape_server_command(), "serve", "--host", "127.0.0.1", "--port", "0", "--data-dir",
                             str(tmp_path / "data"), "--tls-cert", str(wrong.cert), "--tls-key", str(wrong.key)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("cape-server listening on https://127.0.0.1:"), line
        url = line.split()[-1]
        with pytest.raises(requests.ConnectionError) as caught:
            requests.get(f"{url}/healthz", verify=str(wrong.ca), timeout=5)
        assert connection_problem(caught.value, url) == (
            "its TLS certificate is not valid for this host name (IP address mismatch, certificate is not valid for "
            "'127.0.0.1'); use the name or address the certificate was issued for")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_the_cli_names_an_untrusted_certificate(tls, tls_server, cape_cli, monkeypatch, tmp_path):
    org = tls_server.create_org("acme")
    assert cape_cli("login", "--coordinator", tls_server.url, "--token", org["user_token"]).exit_code == 0
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(other_ca(tmp_path / "other")))
    result = cape_cli("whoami")
    assert result.exit_code != 0
    assert result.stderr.strip() == (
        f"error: cannot reach the coordinator at {tls_server.url} (its TLS certificate is not trusted here "
        "(self-signed certificate in certificate chain); set REQUESTS_CA_BUNDLE to the PEM file of the CA that "
        "signed it); check the URL (cape login --coordinator, CAPE_COORDINATOR) and that the server is running")


def test_the_cli_names_a_ca_bundle_that_is_not_there(cape_cli, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "missing.pem"))
    result = cape_cli("projects", "list", env={"CAPE_COORDINATOR": "https://127.0.0.1:9", "CAPE_TOKEN": DUMMY_TOKEN})
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        f"error: REQUESTS_CA_BUNDLE names {str(tmp_path / 'missing.pem')!r}, which is not a file (or directory) of "
        "CA certificates; give the PEM file of the CA that signed the coordinator's certificate")


def test_a_broker_running_alone_reaches_its_coordinator_over_tls(tls, tls_server, tmp_path, monkeypatch):
    """The broker asks the coordinator about every caller; httpx trusts the CA in SSL_CERT_FILE."""
    org = tls_server.create_org("acme")
    monkeypatch.setenv("SSL_CERT_FILE", str(tls.ca))
    broker = CapeServer(tmp_path / "broker", extra_args=["--only", "broker", "--coordinator-url", tls_server.url])
    monkeypatch.delenv("SSL_CERT_FILE")
    untrusting = CapeServer(tmp_path / "untrusting",
                            extra_args=["--only", "broker", "--coordinator-url", tls_server.url])
    try:
        env = worker_env(tmp_path, "acme", CAPE_TOKEN=org["organization_token"], CAPE_COORDINATOR=tls_server.url,
                         CAPE_BROKER=broker.broker_url)
        code, lines, out = check(env)
        assert lines["broker"] == f"ok   broker        {broker.broker_url} answers and accepts the token", out
        code, lines, out = check({**env, "CAPE_BROKER": untrusting.broker_url})
        assert code == 1
        assert lines["broker"] == (
            f"FAIL broker        {untrusting.broker_url} answered 503: the broker cannot reach its coordinator at "
            f"{tls_server.url} (its TLS certificate is not trusted here (self-signed certificate in certificate "
            "chain); set SSL_CERT_FILE to the PEM file of the CA that signed it); try again shortly"), out
    finally:
        broker.stop()
        untrusting.stop()


@pytest.mark.parametrize("args, message", [
    (["--tls-cert", "{cert}"], "give both --tls-cert and --tls-key"),
    (["--tls-cert", "{missing}", "--tls-key", "{key}"], "--tls-cert {missing} cannot be read: No such file or "
                                                          "directory"),
    (["--tls-cert", "{cert}", "--tls-key", "{other_key}"], "--tls-key {other_key} is not the private key of "
                                                           "--tls-cert {cert}"),
    (["--tls-cert", "{key}", "--tls-key", "{key}"], "--tls-cert {key} and --tls-key {key} do not load as a PEM "
                                                    "certificate chain and its private key"),
    (["--tls-cert", "{cert}", "--tls-key", "{encrypted}"], "--tls-key {encrypted} is encrypted; give the key "
                                                           "unencrypted"),
])
def test_serve_refuses_bad_tls_files_in_one_line(tls, tmp_path, args, message):
    from cryptography.hazmat.primitives import serialization

    other = make_tls(tmp_path / "other")
    key = serialization.load_pem_private_key(tls.key.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"passphrase")))
    paths = {"cert": tls.cert, "key": tls.key, "other_key": other.key, "missing": tmp_path / "missing.pem",
             "encrypted": encrypted}
    result = subprocess.run([*cape_server_command(), "serve", "--port", "0", "--data-dir", str(tmp_path / "data"),
                             *[a.format(**paths) for a in args]], capture_output=True, text=True, timeout=30,
                            stdin=subprocess.DEVNULL)
    assert result.returncode != 0
    assert message.format(**paths) in result.stderr
    assert "Traceback" not in result.stderr and "listening" not in result.stdout
    assert not (tmp_path / "data").exists()  # refused before anything was made


def test_a_name_that_does_not_resolve_is_said_so():
    """As requests wraps it (urllib3's NameResolutionError around socket.gaierror); no lookup is made here."""
    import socket

    import urllib3

    cause = socket.gaierror(-2, "Name or service not known")
    wrapped = requests.ConnectionError(urllib3.exceptions.MaxRetryError(None, "/v1/login", cause))
    assert connection_problem(wrapped, "https://cape.example.invalid") == (
        "the host name does not resolve; check the URL")


def test_plain_http_to_another_machine_is_warned_of():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("[::1]") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("cape.example.com") and not is_loopback("10.0.0.1")
    assert plain_http_to_another_host("http://cape.example.com") and not plain_http_to_another_host(
        "https://cape.example.com") and not plain_http_to_another_host("http://127.0.0.1:8080")
    config = WorkerConfig.from_env({"CAPE_TOKEN": DUMMY_TOKEN, "CAPE_COORDINATOR": "http://cape.example.com",
                                    "CAPE_WORKER_NAME": "w"})
    assert config.warnings() == [
        f"{variable} is plain http:// to cape.example.com, not this machine: CAPE_TOKEN and job details cross the "
        "network unencrypted (messages between workers stay end-to-end encrypted); use https://"
        for variable in ("CAPE_COORDINATOR", "CAPE_BROKER")]
    secure = WorkerConfig.from_env({"CAPE_TOKEN": DUMMY_TOKEN, "CAPE_COORDINATOR": "https://cape.example.com",
                                    "CAPE_BROKER": "http://127.0.0.1:8080/broker", "CAPE_WORKER_NAME": "w"})
    assert secure.warnings() == []
    with pytest.raises(ConfigError, match="REQUESTS_CA_BUNDLE: names '/nonexistent/ca.pem', which does not exist"):
        WorkerConfig.from_env({"CAPE_TOKEN": DUMMY_TOKEN, "CAPE_COORDINATOR": "https://cape.example.com",
                               "REQUESTS_CA_BUNDLE": "/nonexistent/ca.pem"})


def test_serve_warns_of_plain_http_on_an_address_other_machines_reach(tmp_path):
    """192.0.2.1 (TEST-NET-1) is no address of this machine: the warning comes first, then the bind fails, so no
    socket is ever opened beyond loopback."""
    result = subprocess.run([*cape_server_command(), "serve", "--host", "192.0.2.1", "--port", "0", "--data-dir",
                             str(tmp_path / "data")], capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert result.stderr.splitlines()[0] == (
        "cape-server: warning: serving plain HTTP on 192.0.2.1: tokens and job details cross the network "
        "unencrypted; give --tls-cert and --tls-key, or serve behind a TLS proxy")
    assert "cannot listen on 192.0.2.1:0" in result.stderr
    # A broker alone sends every worker's token to its coordinator: plain http:// to another machine is said too.
    result = subprocess.run([*cape_server_command(), "serve", "--host", "192.0.2.1", "--port", "0", "--data-dir",
                             str(tmp_path / "data"), "--only", "broker", "--coordinator-url",
                             "http://cape.example.org"], capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert ("cape-server: warning: --coordinator-url http://cape.example.org is plain http:// to another machine: "
            "the broker sends every worker's token there unencrypted; use its https:// URL") in result.stderr
