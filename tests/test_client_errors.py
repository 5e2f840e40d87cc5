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
