"""HTTPS: `cape-server serve --tls-cert/--tls-key` (a test CA's certificate for 127.0.0.1), a whole job through
three workers that trust that CA with REQUESTS_CA_BUNDLE, a broker running alone that reaches its coordinator
over TLS (SSL_CERT_FILE), and what the worker, the CLI and the server say when TLS is set up wrong: an untrusted
certificate, a certificate for another name, http:// to a TLS port, a missing CA file, a key that is not the
certificate's, plain HTTP to another machine."""
import json
import os
import subprocess
import time

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

    wrong_ca = other_ca(tmp_path / "other")
    untrusted = ("its TLS certificate is not trusted here (self-signed certificate in certificate chain); "
                 f"REQUESTS_CA_BUNDLE ({wrong_ca}) does not hold the CA that signed it, or the server does not send "
                 "its intermediate certificates")
    code, lines, out = check({**env, "REQUESTS_CA_BUNDLE": str(wrong_ca)})
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

    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "ca.pem").write_bytes(tls.ca.read_bytes())  # not `openssl rehash`ed: no CA is found
    give = "give the PEM file of the CA that signed the server's certificate"
    for value, problem in ((str(tmp_path / "missing.pem"), f"{str(tmp_path / 'missing.pem')!r} does not exist; {give}"),
                           (str(tls.key), f"{str(tls.key)!r} holds no PEM certificate; {give}"),
                           (f"{tls.ca} ", f"{str(tls.ca) + ' '!r} has spaces around it, which the HTTP library would "
                                          "keep; remove them"),
                           (str(tmp_path / "bare"), f"{str(tmp_path / 'bare')!r} is a directory without `openssl "
                                                    f"rehash` names, so no CA in it is found; run `openssl rehash "
                                                    f"{tmp_path / 'bare'}`, or give the CA's PEM file")):
        code, lines, out = check({**env, "REQUESTS_CA_BUNDLE": value})
        assert code == 1
        assert lines["configuration"] == f"FAIL configuration REQUESTS_CA_BUNDLE: {problem}", out
        result = subprocess.run(["cape-worker", "run"], env={**env, "REQUESTS_CA_BUNDLE": value},
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and f"REQUESTS_CA_BUNDLE: {problem}" in result.stderr


def what_a_client_hears(files, tmp_path) -> tuple[str, str]:
    """Serve with `files` (started by hand: CapeServer's own health check could not verify them either), get
    /healthz trusting their CA; returns (connection_problem's words for the refusal, the server's stderr)."""
    proc = subprocess.Popen([*cape_server_command(), "serve", "--host", "127.0.0.1", "--port", "0", "--data-dir",
                             str(tmp_path / "data"), "--tls-cert", str(files.cert), "--tls-key", str(files.key)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("cape-server listening on https://127.0.0.1:"), line
        url = line.split()[-1]
        with pytest.raises(requests.ConnectionError) as caught:
            requests.get(f"{url}/healthz", verify=str(files.ca), timeout=5)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    return connection_problem(caught.value, url), err


def test_a_certificate_for_another_name_is_named_as_such(tmp_path):
    heard, _ = what_a_client_hears(make_tls(tmp_path / "wrong", wrong_name=True), tmp_path)
    assert heard == ("its TLS certificate is not valid for this host name (IP address mismatch, certificate is not "
                     "valid for '127.0.0.1'); use the name or address the certificate was issued for")


def test_an_expired_certificate_is_said_by_the_server_at_start_and_by_its_clients(tmp_path):
    old = make_tls(tmp_path / "old", expired=True)
    heard, err = what_a_client_hears(old, tmp_path)
    assert heard == "its TLS certificate has expired (certificate has expired); the server's operator must renew it"
    assert f"cape-server: warning: --tls-cert {old.cert} expired on " in err


def test_the_cli_names_an_untrusted_certificate(tls, tls_server, cape_cli, monkeypatch, tmp_path):
    org = tls_server.create_org("acme")
    assert cape_cli("login", "--coordinator", tls_server.url, "--token", org["user_token"]).exit_code == 0
    wrong_ca = other_ca(tmp_path / "other")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(wrong_ca))
    result = cape_cli("whoami")
    assert result.exit_code != 0
    assert result.stderr.strip() == (
        f"error: cannot reach the coordinator at {tls_server.url} (its TLS certificate is not trusted here "
        f"(self-signed certificate in certificate chain); REQUESTS_CA_BUNDLE ({wrong_ca}) does not hold the CA that "
        "signed it, or the server does not send its intermediate certificates); check the URL (cape login "
        "--coordinator, CAPE_COORDINATOR) and that the server is running")
    # A file that holds no certificate at all is said so, not as an SSLError.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tls.key))
    result = cape_cli("whoami")
    assert f"(REQUESTS_CA_BUNDLE ({tls.key}) holds no CA certificate; give the CA's PEM file)" in result.stderr


def test_a_worker_that_cannot_trust_the_coordinator_is_unhealthy(tls_server, start_worker, tmp_path, monkeypatch):
    """Retrying will not fix a certificate: unlike a coordinator that is down, the health check fails, with why."""
    org = tls_server.create_org("acme")
    monkeypatch.delenv("REQUESTS_CA_BUNDLE")
    env = worker_env(tmp_path, "acme", CAPE_TOKEN=org["organization_token"], CAPE_COORDINATOR=tls_server.url)
    worker = start_worker(env)
    worker.wait_running()
    deadline = time.monotonic() + 30
    health = None
    while time.monotonic() < deadline:
        health = subprocess.run(["cape-worker", "health"], env=env, capture_output=True, text=True, timeout=30)
        if health.returncode == 1:
            break
        time.sleep(0.3)
    assert health.returncode == 1, health.stdout
    assert health.stdout.startswith("unhealthy: this worker cannot trust the coordinator's TLS (since "), health.stdout
    assert "its TLS certificate is not trusted here (self-signed certificate in certificate chain)" in health.stdout
    status = json.loads(subprocess.run(["cape-worker", "status", "--json"], env=env, capture_output=True, text=True,
                                       timeout=30).stdout)
    assert "set REQUESTS_CA_BUNDLE" in status["coordinator_untrusted"]["message"]


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
            "chain); set SSL_CERT_FILE to the PEM file of the CA that signed it, or the server does not send its "
            "intermediate certificates); try again shortly"), out
        check({**env, "CAPE_BROKER": untrusting.broker_url})
        log = untrusting.log_path.read_text()  # the broker's operator hears it, at start and once while it lasts
        assert (f"cape-server: warning: the coordinator at {tls_server.url} does not answer now (its TLS "
                "certificate is not trusted here") in log
        assert log.count(f"cannot reach the coordinator at {tls_server.url} (its TLS certificate") == 1, log
    finally:
        broker.stop()
        untrusting.stop()
    for value, problem in ((str(tmp_path / "missing.pem"), "does not exist"),
                           (str(tmp_path), "is a directory; give the CA's PEM file")):
        refused = subprocess.run([*cape_server_command(), "serve", "--port", "0", "--data-dir", str(tmp_path / "x"),
                                  "--only", "broker", "--coordinator-url", tls_server.url],
                                 env={**os.environ, "SSL_CERT_FILE": value}, capture_output=True, text=True,
                                 timeout=30)
        assert refused.returncode == 1 and "Traceback" not in refused.stderr
        assert f"SSL_CERT_FILE: {value!r} {problem}" in refused.stderr


@pytest.mark.parametrize("args, message", [
    (["--tls-cert", "{cert}"], "give both --tls-cert and --tls-key"),
    (["--tls-cert", "{missing}", "--tls-key", "{key}"], "--tls-cert {missing} cannot be read: No such file or "
                                                          "directory"),
    (["--tls-cert", "{cert}", "--tls-key", "{other_key}"], "--tls-key {other_key} is not the private key of the "
                                                           "first certificate in --tls-cert {cert} (the server's own "
                                                           "certificate comes first, then its intermediates)"),
    (["--tls-cert", "{ca_first}", "--tls-key", "{key}"], "--tls-key {key} is not the private key of the first "
                                                         "certificate in --tls-cert {ca_first}"),
    (["--tls-cert", "{key}", "--tls-key", "{key}"], "--tls-cert {key} holds no PEM certificate"),
    (["--tls-cert", "{cert}", "--tls-key", "{cert}"], "--tls-key {cert} is not a PEM private key"),
    (["--tls-cert", "{cert}", "--tls-key", "{encrypted}"], "--tls-key {encrypted} is encrypted; give the key "
                                                           "unencrypted"),
    (["--tls-cert", "", "--tls-key", "{key}"], "Invalid value for '--tls-cert' (env var: 'CAPE_SERVER_TLS_CERT'): "
                                               "is empty; give the PEM file's path"),  # not "--tls-cert . cannot ..."
])
def test_serve_refuses_bad_tls_files_in_one_line(tls, tmp_path, args, message):
    from cryptography.hazmat.primitives import serialization

    other = make_tls(tmp_path / "other")
    key = serialization.load_pem_private_key(tls.key.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"passphrase")))
    ca_first = tmp_path / "ca-first.pem"  # the chain in the wrong order
    ca_first.write_bytes(tls.ca.read_bytes() + tls.cert.read_bytes())
    paths = {"cert": tls.cert, "key": tls.key, "other_key": other.key, "missing": tmp_path / "missing.pem",
             "encrypted": encrypted, "ca_first": ca_first}
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
    with pytest.raises(ConfigError, match="REQUESTS_CA_BUNDLE: '/nonexistent/ca.pem' does not exist"):
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
