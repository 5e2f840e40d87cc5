"""Each server error becomes one readable `error: <message> (HTTP <status>)` line and exit 1, never a traceback."""
from __future__ import annotations

import socket

import pytest

from services.client import Cape
from services.client.errors import ApiError, CoordinatorUnreachable
from tests.support.client import one_error_line


@pytest.fixture
def two_orgs(shared_cape_server, unique_label) -> dict[str, dict]:
    return {name: shared_cape_server.create_org(unique_label(name)) for name in ("alpha", "beta")}


def test_bad_token_is_401(shared_cape_server, cape_cli, two_orgs) -> None:
    result = cape_cli("projects", "list", env={"CAPE_COORDINATOR": shared_cape_server.url,
                                               "CAPE_TOKEN": "nosuchid,c2VjcmV0c2VjcmV0"})
    assert result.exit_code == 1
    line = one_error_line(result.stderr)
    assert line.endswith("(HTTP 401)")
    assert "c2VjcmV0c2VjcmV0" not in result.stderr  # the token never shows up


def test_other_orgs_project_is_403(shared_cape_server, cape_cli, two_orgs, unique_label) -> None:
    project = unique_label("secret")
    alpha = {"CAPE_COORDINATOR": shared_cape_server.url, "CAPE_TOKEN": two_orgs["alpha"]["user_token"]}
    beta = {"CAPE_COORDINATOR": shared_cape_server.url, "CAPE_TOKEN": two_orgs["beta"]["user_token"]}
    assert cape_cli("projects", "create", project, env=alpha).exit_code == 0
    result = cape_cli("projects", "show", project, env=beta)
    assert result.exit_code == 1
    assert one_error_line(result.stderr).endswith("(HTTP 403)")
    assert result.stdout == ""


def test_unknown_job_is_404(shared_cape_server, cape_cli, two_orgs) -> None:
    env = {"CAPE_COORDINATOR": shared_cape_server.url, "CAPE_TOKEN": two_orgs["alpha"]["user_token"]}
    result = cape_cli("jobs", "status", "0" * 32, env=env)
    assert result.exit_code == 1
    assert one_error_line(result.stderr).endswith("(HTTP 404)")


def test_bad_field_is_422_naming_the_field(shared_cape_server, cape_cli, two_orgs, unique_label) -> None:
    project, beta_label = unique_label("p422"), two_orgs["beta"]["organization"]["label"]
    alpha = {"CAPE_COORDINATOR": shared_cape_server.url, "CAPE_TOKEN": two_orgs["alpha"]["user_token"]}
    beta = {"CAPE_COORDINATOR": shared_cape_server.url, "CAPE_TOKEN": two_orgs["beta"]["user_token"]}
    assert cape_cli("projects", "create", project, env=alpha).exit_code == 0
    assert cape_cli("projects", "add-org", project, beta_label, env=alpha).exit_code == 0
    assert cape_cli("dataviews", "add", project, "x", "file:///data/x.csv", "--schema", "a,b", env=alpha).exit_code == 0
    assert cape_cli("dataviews", "add", project, "y", "file:///data/y.csv", "--schema", "t", env=beta).exit_code == 0
    result = cape_cli("jobs", "submit", project, "linear-regression", "--x", "x", "--y", "y",
                      "--model-owner", "nobody", env=alpha)
    assert result.exit_code == 1
    line = one_error_line(result.stderr)
    assert line.endswith("(HTTP 422)")
    assert "model_owner" in line


def test_duplicate_label_is_409(shared_cape_server, cape_cli, two_orgs, unique_label) -> None:
    project = unique_label("twice")
    env = {"CAPE_COORDINATOR": shared_cape_server.url, "CAPE_TOKEN": two_orgs["alpha"]["user_token"]}
    assert cape_cli("projects", "create", project, env=env).exit_code == 0
    result = cape_cli("projects", "create", project, env=env)
    assert result.exit_code == 1
    line = one_error_line(result.stderr)
    assert line.endswith("(HTTP 409)") and project in line


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_connection_refused_names_the_url(cape_cli, cape_script) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    env = {"CAPE_COORDINATOR": url, "CAPE_TOKEN": "tid,c2VjcmV0"}
    expected = (f"error: cannot reach the coordinator at {url} (connection refused); check the URL "
                "(cape login --coordinator, CAPE_COORDINATOR) and that the server is running")
    for run in (cape_cli, cape_script):
        result = run("jobs", "list", "some-project", env=env)
        assert result.exit_code == 1
        assert one_error_line(result.stderr) == expected
    with pytest.raises(CoordinatorUnreachable, match="connection refused"):
        Cape(endpoint=url, token="tid,c2VjcmV0").list_projects()


def test_sdk_raises_typed_api_errors(shared_cape_server, two_orgs) -> None:
    cape = Cape(endpoint=shared_cape_server.url, token=two_orgs["alpha"]["user_token"])
    with pytest.raises(ApiError) as info:
        cape.get_project("no-such-project")
    assert info.value.status == 404 and info.value.code
    assert str(info.value).endswith("(HTTP 404)")


@pytest.mark.parametrize("url", ["127.0.0.1:8080", "ftp://127.0.0.1", "http://[::1"])
def test_malformed_coordinator_url_is_one_line(cape_cli, url: str) -> None:
    result = cape_cli("login", "--coordinator", url, "--token", "tid,c2VjcmV0")
    assert result.exit_code == 1
    assert one_error_line(result.stderr) == (
        f"error: the coordinator URL {url!r} is not valid; give it as http(s)://HOST[:PORT]"
    )


def test_a_token_given_as_the_coordinator_url_is_never_shown(cape_cli) -> None:
    """CAPE_COORDINATOR and CAPE_TOKEN swapped (they sit side by side in a .env): the error said the whole token."""
    token = "0123456789abcdef0123456789abcdef,XNKf0QmHBqVhW0N2VTB51ztGpByecVacVja6D2RcpmU="
    swapped = {"CAPE_COORDINATOR": token, "CAPE_TOKEN": "http://127.0.0.1:9"}
    for result in (cape_cli("login", "--coordinator", token, "--token", "http://127.0.0.1:9"),
                   cape_cli("projects", "list", env=swapped)):
        assert result.exit_code == 1
        assert one_error_line(result.stderr) == (
            "error: the coordinator URL looks like a token (<id>,<secret>), so it is not shown: were --coordinator "
            "and --token (or CAPE_COORDINATOR and CAPE_TOKEN) swapped? Give the URL as http(s)://HOST[:PORT]")
        assert "XNKf0Qm" not in result.stdout + result.stderr


def test_login_that_cannot_save_its_file_is_one_line(shared_cape_server, cape_cli, two_orgs, cape_home,
                                                     monkeypatch) -> None:
    """XDG_CONFIG_HOME a file, not a directory: a NotADirectoryError traceback before."""
    not_a_dir = cape_home.parent.parent.parent / "not-a-dir"
    not_a_dir.write_text("")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(not_a_dir))
    result = cape_cli("login", "--coordinator", shared_cape_server.url, "--token", two_orgs["alpha"]["user_token"])
    assert result.exit_code == 1
    assert one_error_line(result.stderr) == (
        f"error: cannot save the login in {not_a_dir}/cape/config.json: Not a directory; set XDG_CONFIG_HOME to a "
        "directory you can write, or give CAPE_COORDINATOR and CAPE_TOKEN to each command instead")


def test_a_url_of_another_service_or_with_a_password_is_said_so(cape_cli) -> None:
    """Another HTTP service at the URL answered "Unsupported method ('POST') (HTTP 501)"; with user:pw@ in the URL,
    requests sent Basic auth in place of the token."""
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:  # its lines would land in the CLI's captured stderr
            pass

    class Proxy(Quiet):  # a proxy whose coordinator is away: HTML, not Cape's error body
        def do_POST(self) -> None:
            self.send_error(502)

    results = []
    for handler in (Quiet, Proxy):
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            url = f"http://127.0.0.1:{server.server_address[1]}"
            results.append((url, cape_cli("login", "--coordinator", url, "--token", "tid,c2VjcmV0")))
        finally:
            server.shutdown()
            thread.join(timeout=5)
    (url, result), (proxy_url, proxied) = results
    assert one_error_line(proxied.stderr) == (
        f"error: Bad Gateway; the coordinator at {proxy_url} (or a proxy in front of it) is unavailable; try again "
        "shortly (HTTP 502)")
    assert result.exit_code == 1
    assert one_error_line(result.stderr) == (
        f"error: Unsupported method ('POST'); the server at {url} did not answer as a Cape coordinator does: is the "
        "URL the coordinator's base URL? (HTTP 501)")
    with_password = cape_cli("login", "--coordinator", "http://me:hunter2@127.0.0.1:9", "--token", "tid,c2VjcmV0")
    assert with_password.exit_code == 1
    assert one_error_line(with_password.stderr) == (
        "error: the coordinator URL holds a user name or password (user:password@); the token is the credential: "
        "give http(s)://HOST[:PORT]")


def test_a_route_the_coordinator_lacks_says_it_is_older_than_this_cape(shared_cape_server, two_orgs) -> None:
    """An older coordinator answered a newer cape's `cape tokens list` with "no such endpoint; see /openapi.json"."""
    cape = Cape(endpoint=shared_cape_server.url, token=two_orgs["alpha"]["user_token"])
    for method, path in (("GET", "/v1/a-route-of-a-newer-version"), ("DELETE", "/v1/projects")):
        with pytest.raises(ApiError) as caught:
            cape._session.request(method, path)
        assert str(caught.value.message) == (
            f"the coordinator at {shared_cape_server.url} has no {method} {path}: it is older than this cape; "
            "upgrade cape-server, or use the cape of its version")
    with pytest.raises(ApiError) as unknown_job:  # a 404 of the coordinator's own: as it said it
        cape.get_job("0" * 32)
    assert "older" not in str(unknown_job.value)
