"""`cape-server serve` start-up: the announced address, bad options, an occupied port; and what the user is told
when `cape-server` (serve or admin) is given something it cannot use."""
from __future__ import annotations

import errno
import json
import os
import re
import socket
import sqlite3
import subprocess
import time
from importlib.metadata import version

import pytest
import requests

from services.coordinator import identity
from tests.support.server import cape_server_command, database_from_before

DATA_DIR_ADVICE = "(give a directory this user can create and write)"
NO_DATABASE_ADVICE = ("is --data-dir (or CAPE_SERVER_DATA_DIR) the one `cape-server serve` uses? `admin create-org` "
                      "makes a new one")
NEW_DATABASE_NOTICE = "(if you meant a running server's, give the --data-dir its `cape-server serve` uses)"


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*cape_server_command(), *args], capture_output=True, text=True, timeout=60,
                          env=None if env is None else {**os.environ, **env})


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The last line of stderr: where click puts its `Error: ...` (after any usage lines)."""
    return result.stderr.rstrip("\n").splitlines()[-1]


def test_serve_announces_its_address_and_serves_openapi(cape_server):
    assert cape_server.url.startswith("http://127.0.0.1:")
    health = requests.get(f"{cape_server.url}/healthz", timeout=10).json()
    assert health["status"] == "ok" and health["parts"] == ["coordinator", "broker"]
    assert health["version"] == version("cape-workers")
    document = requests.get(f"{cape_server.url}/openapi.json", timeout=10).json()
    assert document["info"]["title"] == "Cape server" and document["info"]["version"] == health["version"]


def test_a_kept_alive_connection_is_still_open_after_a_workers_gap_between_requests(cape_server):
    """uvicorn closed idle connections after 5 s, the gap a worker leaves between its job list and its heartbeat:
    a request sent as the server closed the connection failed as "coordinator unreachable"."""
    import http.client

    host, port = cape_server.url.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request("GET", "/healthz")
        assert connection.getresponse().read() and connection.sock is not None
        socket_used = connection.sock.getsockname()
        time.sleep(6.0)
        connection.request("GET", "/healthz")  # on the same socket: a closed one answers nothing
        response = connection.getresponse()
        assert response.status == 200 and connection.sock.getsockname() == socket_used
    finally:
        connection.close()


def test_only_coordinator_has_no_broker(start_cape_server):
    server = start_cape_server(extra_args=["--only", "coordinator"])
    assert requests.get(f"{server.url}/healthz", timeout=10).json()["parts"] == ["coordinator"]
    paths = requests.get(f"{server.url}/openapi.json", timeout=10).json()["paths"]
    assert "/broker/v1/jobs/{job}/messages" not in paths and "/v1/projects" in paths


def test_broker_alone_needs_a_coordinator_url(tmp_path):
    result = subprocess.run([*cape_server_command(), "serve", "--only", "broker", "--port", "0",
                             "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "--only broker needs --coordinator-url" in result.stderr


def test_occupied_port_is_a_clear_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = subprocess.run([*cape_server_command(), "serve", "--port", str(port), "--data-dir", str(tmp_path)],
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "pick another --port" in result.stderr


def test_a_bind_error_leaves_no_data_dir_behind(tmp_path):
    """A port or host mistake is fixed by running again: the data dir it named is not left half-made (a new one
    is removed again; an existing one gets no database)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        (tmp_path / "existing").mkdir()
        for data_dir in (tmp_path / "fresh", tmp_path / "existing"):
            result = subprocess.run([*cape_server_command(), "serve", "--port", str(port), "--data-dir",
                                     str(data_dir)], capture_output=True, text=True, timeout=60)
            assert result.returncode == 1, result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["existing"]
    assert list((tmp_path / "existing").iterdir()) == []  # no coordinator.sqlite3, no broker/


def test_data_dir_files_are_private_and_an_open_dir_is_named(tmp_path):
    """Token hashes and queued messages: files the server makes are its user's alone, and a data dir made
    beforehand with the usual mode 755 is kept (the operator's) but named in a warning."""
    data_dir = tmp_path / "made-by-operator"
    data_dir.mkdir()
    data_dir.chmod(0o755)
    result = subprocess.run([*cape_server_command(), "admin", "create-org", "acme", "--admin-email", "a@acme.example",
                             "--data-dir", str(data_dir)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        f"cape-server: warning: --data-dir {data_dir} is open to other users (mode 755); it holds token hashes and "
        f"queued messages: chmod 700 {data_dir}",
        f"cape-server: created a new database in {data_dir} {NEW_DATABASE_NOTICE}"]
    assert (data_dir.stat().st_mode & 0o777) == 0o755
    made = [p for p in data_dir.rglob("*")]
    assert made and all((p.stat().st_mode & 0o077) == 0 for p in made), [(p, oct(p.stat().st_mode)) for p in made]


def test_admin_bootstrap_makes_a_private_data_dir(tmp_path):
    data_dir = tmp_path / "fresh"
    result = subprocess.run([*cape_server_command(), "admin", "create-org", "acme", "--admin-email", "a@acme.example",
                             "--data-dir", str(data_dir)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (data_dir.stat().st_mode & 0o777) == 0o700
    lines = result.stdout.splitlines()
    assert lines[0].startswith("organization acme (") and "CAPE_TOKEN" in lines[1] and "cape login" in lines[2]


def test_accepted_connections_get_tcp_nodelay():
    """asyncio (uvicorn's loop) sets TCP_NODELAY on accepted connections only for an IPPROTO_TCP listener."""
    import asyncio

    from services.server.cli import listening_socket

    async def accepted_nodelay() -> int:
        seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                conn = transport.get_extra_info("socket")
                seen.set_result(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        sock = listening_socket("127.0.0.1", 0)
        server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
            value = await asyncio.wait_for(seen, timeout=10)
            writer.close()
            return value
        finally:
            server.close()

    assert asyncio.run(accepted_nodelay()) != 0


def test_keep_alive_requests_do_not_wait_for_delayed_acks(cape_server):
    # With Nagle's algorithm on the server's connections, each request after the first on a kept-alive connection
    # waits ~40 ms for the client's delayed ACK: 20 requests took > 0.8 s. Without it they take a few ms each.
    with requests.Session() as session:
        session.get(f"{cape_server.url}/healthz", timeout=10).raise_for_status()
        started = time.perf_counter()
        for _ in range(20):
            session.get(f"{cape_server.url}/healthz", timeout=10).raise_for_status()
        elapsed = time.perf_counter() - started
    assert elapsed < 0.6, f"20 keep-alive requests took {elapsed:.2f} s"


@pytest.mark.parametrize("command", [["admin", "create-org", "acme", "--admin-email", "a@acme.example"],
                                     ["serve", "--port", "0"]], ids=["admin", "serve"])
def test_a_data_dir_that_cannot_be_created_is_a_one_line_error(tmp_path, command):
    (tmp_path / "afile").write_text("")
    data_dir = tmp_path / "afile" / "data"  # under a regular file: fails even for root
    result = run_cli(*command, "--data-dir", str(data_dir))
    assert result.returncode == 1
    assert result.stderr == f"Error: --data-dir {data_dir} cannot be used: Not a directory {DATA_DIR_ADVICE}\n"
    assert result.stdout == ""  # in particular no "listening" line from serve


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write in any directory")
@pytest.mark.parametrize("command", [["admin", "create-org", "acme", "--admin-email", "a@acme.example"],
                                     ["serve", "--port", "0"]], ids=["admin", "serve"])
def test_a_data_dir_this_user_cannot_write_is_a_one_line_error(tmp_path, command):
    data_dir = tmp_path / "readonly"
    data_dir.mkdir(mode=0o500)
    result = run_cli(*command, "--data-dir", str(data_dir))
    assert result.returncode == 1
    assert result.stderr == f"Error: --data-dir {data_dir} cannot be used: Permission denied {DATA_DIR_ADVICE}\n"
    assert result.stdout == ""


def test_an_address_this_machine_lacks_points_at_host(tmp_path):
    address = "192.0.2.1"  # TEST-NET-1 (documentation only); binding sends nothing
    with socket.socket() as probe:
        try:
            probe.bind((address, 0))
        except OSError:
            pass
        else:
            pytest.skip(f"this machine has {address}")
    result = run_cli("serve", "--host", address, "--port", "0", "--data-dir", str(tmp_path))
    assert result.returncode == 1
    assert error_line(result) == (f"Error: cannot listen on {address}:0: {os.strerror(errno.EADDRNOTAVAIL)} "
                                  "(this machine has no such address); pick another --host")


@pytest.mark.parametrize("command, usage", [
    ([], "Usage: cape-server [OPTIONS] COMMAND [ARGS]..."),
    (["admin", "create-user"], "Usage: cape-server admin create-user [OPTIONS] ORGANIZATION [EMAIL]"),
], ids=["top", "subcommand"])
def test_dash_h_is_help(command, usage):
    result = run_cli(*command, "-h")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == usage
    assert "-h, --help" in result.stdout


@pytest.mark.parametrize("only", [[], ["--only", "coordinator"]], ids=["both", "coordinator"])
def test_coordinator_url_is_only_for_a_broker_alone(tmp_path, only):
    result = run_cli("serve", *only, "--coordinator-url", "http://127.0.0.1:9", "--port", "0",
                     "--data-dir", str(tmp_path))
    assert result.returncode == 2
    assert error_line(result) == ("Error: --coordinator-url is only for --only broker (otherwise the coordinator "
                                  "runs in this same process)")
    assert result.stdout == ""


@pytest.mark.parametrize("email", ["notanemail", "a@b@acme.example", "@acme.example", "a@"])
def test_create_user_rejects_what_is_not_an_email(tmp_path, email):
    made = run_cli("admin", "create-org", "acme", "--admin-email", "a@acme.example", "--data-dir", str(tmp_path))
    assert made.returncode == 0, made.stderr
    result = run_cli("admin", "create-user", "acme", "--email", email, "--role", "user", "--data-dir", str(tmp_path))
    assert result.returncode == 2
    assert error_line(result) == (f"Error: Invalid value for '--email': '{email}' is not an email address "
                                  "(like name@example.org)")


def test_create_user_takes_the_email_as_cape_orgs_add_user_does(tmp_path):
    """`cape orgs add-user ORG EMAIL` names the email after the organization; the admin command takes it there too."""
    made = run_cli("admin", "create-org", "acme", "--admin-email", "a@acme.example", "--data-dir", str(tmp_path))
    assert made.returncode == 0, made.stderr
    result = run_cli("admin", "create-user", "acme", "ds@acme.example", "--role", "data_scientist", "--json",
                     "--data-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["user"]["email"] == "ds@acme.example"
    same = run_cli("admin", "create-user", "acme", "op@acme.example", "--email", "op@acme.example", "--role",
                   "operator", "--data-dir", str(tmp_path))
    assert same.returncode == 0, same.stderr
    assert same.stdout.splitlines()[0] == "user op@acme.example is operator of acme"
    two = run_cli("admin", "create-user", "acme", "x@acme.example", "--email", "y@acme.example", "--role", "user",
                  "--data-dir", str(tmp_path))
    assert (two.returncode, error_line(two)) == (
        2, "Error: two emails given (x@acme.example and --email y@acme.example); give one")
    none = run_cli("admin", "create-user", "acme", "--role", "user", "--data-dir", str(tmp_path))
    assert (none.returncode, error_line(none)) == (
        2, "Error: give the user's email: create-user ORGANIZATION EMAIL --role ROLE")
    bad = run_cli("admin", "create-user", "acme", "notanemail", "--role", "user", "--data-dir", str(tmp_path))
    assert (bad.returncode, error_line(bad)) == (
        2, "Error: Invalid value for '[EMAIL]': 'notanemail' is not an email address (like name@example.org)")


def test_create_user_warns_when_the_email_already_had_an_account(tmp_path):
    """The operator issues a token for an existing account: say so, since its earlier tokens (held by whoever made
    it) still work; an email differing only in case is that same account."""
    assert run_cli("admin", "create-org", "acme", "--admin-email", "a@acme.example",
                   "--data-dir", str(tmp_path)).returncode == 0
    assert run_cli("admin", "create-org", "beta", "--admin-email", "b@beta.example",
                   "--data-dir", str(tmp_path)).returncode == 0
    result = run_cli("admin", "create-user", "beta", "A@Acme.example", "--role", "user", "--json",
                     "--data-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["user"]["email"] == "a@acme.example" and "," in out["token"]
    assert out["existing_account"]["made_by"] == "server_operator"
    assert result.stderr.startswith("warning: A@Acme.example already had an account (made ")
    assert result.stderr.rstrip().endswith(
        "by the server's operator); the token printed is a new one for it and its earlier tokens still work. If "
        "you meant another person, give another email.")
    fresh = run_cli("admin", "create-user", "beta", "c@beta.example", "--role", "user", "--data-dir", str(tmp_path))
    assert fresh.returncode == 0 and "warning" not in fresh.stderr


def test_a_database_from_before_accounts_recorded_their_maker_opens(tmp_path):
    """An earlier version's users table gains the column; two emails differing only in case do not stop the
    server (a warning, lookups take the older account)."""
    db = database_from_before(tmp_path, (
        "CREATE TABLE users (id TEXT PRIMARY KEY, email TEXT NOT NULL UNIQUE, created_at TEXT NOT NULL);"
        "INSERT INTO users VALUES ('u1', 'ann@x.example', '2026-01-01T00:00:00.000Z');"
        "INSERT INTO users VALUES ('u2', 'Ann@x.example', '2026-02-01T00:00:00.000Z');"))
    try:
        with db.transaction() as conn:
            assert identity.user_by_email(conn, "ANN@X.EXAMPLE")["id"] == "u1"
            assert identity.user_by_email(conn, "ann@x.example")["created_by_org_id"] is None
            # Made before makers were recorded: not taken for the operator's (an admin may hold its first token).
            assert identity.existing_account(conn, identity.user_by_email(conn, "ann@x.example"))["made_by"] == \
                "unknown"
    finally:
        db.close()


@pytest.mark.parametrize("given", ["option", "envvar"])
@pytest.mark.parametrize("made", ["missing", "empty"])
@pytest.mark.parametrize("command", [["create-user", "acme", "ds@acme.example", "--role", "user"],
                                     ["create-org-token", "acme"], ["revoke-token", "t_0123456789"]],
                         ids=["create-user", "create-org-token", "revoke-token"])
def test_admin_refuses_a_data_dir_without_a_database(tmp_path, command, made, given):
    """A mistyped --data-dir (or CAPE_SERVER_DATA_DIR): every admin command but create-org names the directory
    and the fix, and leaves nothing there (it used to make an empty database and say `no organization 'acme'`)."""
    data_dir = tmp_path / "typo"
    if made == "empty":
        data_dir.mkdir()
    if given == "option":
        result = run_cli("admin", *command, "--data-dir", str(data_dir))
    else:
        result = run_cli("admin", *command, env={"CAPE_SERVER_DATA_DIR": str(data_dir)})
    assert result.returncode == 1
    assert result.stderr == f"Error: no cape-server database in {data_dir}: {NO_DATABASE_ADVICE}\n"
    assert result.stdout == ""
    assert [p.name for p in tmp_path.iterdir()] == (["typo"] if made == "empty" else [])
    if made == "empty":
        assert list(data_dir.iterdir()) == []


def test_create_org_says_when_it_makes_a_new_database(tmp_path):
    """Bootstrapping a server is create-org on a new data dir; a typo'd one is noticed on stderr, not only later
    when the running server refuses the printed tokens."""
    data_dir = tmp_path / "fresh"
    first = run_cli("admin", "create-org", "acme", "--admin-email", "a@acme.example", "--data-dir", str(data_dir))
    assert first.returncode == 0, first.stderr
    assert first.stderr == f"cape-server: created a new database in {data_dir} {NEW_DATABASE_NOTICE}\n"
    second = run_cli("admin", "create-org", "beta", "--admin-email", "b@beta.example", "--data-dir", str(data_dir))
    assert (second.returncode, second.stderr) == (0, "")
    more = run_cli("admin", "create-org-token", "acme", "--data-dir", str(data_dir))
    assert (more.returncode, more.stderr) == (0, "")
    assert more.stdout.startswith("organization token ")


def test_create_org_token_json_names_the_token_as_create_org_does(cape_server):
    """`create-org --json` gives `organization_token`; so does `create-org-token --json` (and still `token`), on the
    database `serve` made, and the server takes it."""
    made = run_cli("admin", "create-org", "acme", "--admin-email", "a@acme.example", "--json",
                   "--data-dir", str(cape_server.data_dir))
    assert (made.returncode, made.stderr) == (0, "")  # the server's database: no "created a new database"
    assert "organization_token" in json.loads(made.stdout)
    result = run_cli("admin", "create-org-token", "acme", "--description", "second worker", "--json",
                     "--data-dir", str(cape_server.data_dir))
    assert (result.returncode, result.stderr) == (0, "")
    out = json.loads(result.stdout)
    assert out["organization_token"] == out["token"] and out["organization_token"].startswith(f"{out['id']},")
    login = requests.post(f"{cape_server.url}/v1/login", timeout=10,
                          headers={"Authorization": f"Bearer {out['organization_token']}"})
    assert login.status_code == 200, login.text
    assert login.json()["kind"] == "organization" and login.json()["organization"]["label"] == "acme"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may look into any directory")
def test_a_data_dir_this_user_cannot_look_into_is_a_one_line_error(tmp_path):
    """Whether the database is there cannot be told (the dir can be listed but not entered): the data dir's own
    error, not a traceback nor "no cape-server database". (Mode 0 is click's "not readable" usage error.)"""
    data_dir = tmp_path / "closed"
    made = run_cli("admin", "create-org", "acme", "--admin-email", "a@acme.example", "--data-dir", str(data_dir))
    assert made.returncode == 0, made.stderr
    data_dir.chmod(0o600)
    try:
        result = run_cli("admin", "create-org-token", "acme", "--data-dir", str(data_dir))
    finally:
        data_dir.chmod(0o700)
    assert result.returncode == 1
    assert result.stderr == f"Error: --data-dir {data_dir} cannot be used: Permission denied {DATA_DIR_ADVICE}\n"


@pytest.mark.parametrize("quota", ["--max-job-bytes", "--max-org-bytes"])
def test_serve_refuses_a_quota_below_the_message_limit(tmp_path, quota):
    result = run_cli("serve", "--port", "0", "--data-dir", str(tmp_path / "d"), "--max-message-bytes", "2000",
                     quota, "1000")
    assert result.returncode == 2 and result.stderr.strip().endswith(
        f"Error: {quota} (1000) is below --max-message-bytes (2000): a message between the two could never "
        "be stored")
    assert not (tmp_path / "d").exists()


def test_a_second_server_on_the_same_data_dir_is_refused_naming_the_first(cape_server):
    """It would sweep the first one's uploads in transit at start and never wake its long polls."""
    for only in ([], ["--only", "broker", "--coordinator-url", cape_server.url]):
        result = run_cli("serve", "--port", "0", "--data-dir", str(cape_server.data_dir), *only)
        part = "broker" if only else "coordinator"
        assert result.returncode == 1 and "listening" not in result.stdout
        assert error_line(result) == (
            f"Error: another cape-server (pid {cape_server.pid}) serves the {part} from --data-dir "
            f"{cape_server.data_dir}; stop it first, or give this one its own --data-dir (two servers on one data "
            "dir lose each other's messages in transit)")
    port = cape_server.url.rsplit(":", 1)[1]  # the same command started twice: told of the server, not the port
    again = run_cli("serve", "--port", port, "--data-dir", str(cape_server.data_dir))
    assert error_line(again).startswith(f"Error: another cape-server (pid {cape_server.pid}) serves the coordinator")
    assert requests.get(f"{cape_server.url}/healthz", timeout=10).status_code == 200
    cape_server.restart(crash=True)  # the kernel drops a killed server's lock: its successor starts
    assert requests.get(f"{cape_server.url}/healthz", timeout=10).status_code == 200


def test_serve_says_when_it_makes_a_new_empty_database(start_cape_server):
    """A mistyped --data-dir would otherwise be a second, empty server whose every token is refused."""
    server = start_cape_server()
    notice = f"cape-server: no database in {server.data_dir} yet: a new, empty one is made (no organizations"
    assert server.log_path.read_text().count(notice) == 1
    server.restart()
    assert server.log_path.read_text().count(notice) == 1  # the log is appended to: not said again


def test_a_backup_taken_while_the_server_runs_restores_what_it_held(cape_server, tmp_path):
    """Copying coordinator.sqlite3 itself misses what is still in its write-ahead log; `admin backup` does not."""
    kept = cape_server.create_org("kept")
    copy = tmp_path / "backups" / "coordinator.sqlite3"
    copy.parent.mkdir()
    result = run_cli("admin", "backup", str(copy), "--data-dir", str(cape_server.data_dir))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(f"to {copy}: 1 organizations, 1 users, 0 jobs")
    assert copy.stat().st_mode & 0o777 == 0o600  # token hashes
    later = cape_server.create_org("later")
    again = run_cli("admin", "backup", str(copy), "--data-dir", str(cape_server.data_dir))
    assert again.returncode == 1 and error_line(again) == f"Error: {copy} exists; give a new file (a backup never " \
                                                           "overwrites)"
    nowhere = run_cli("admin", "backup", str(tmp_path / "missing" / "b.sqlite3"), "--data-dir",
                      str(cape_server.data_dir))
    assert error_line(nowhere) == f"Error: {tmp_path / 'missing'} is not a directory; make it first, or give another path"
    cape_server.stop()

    restored = tmp_path / "restored"
    restored.mkdir(mode=0o700)
    (restored / "coordinator.sqlite3").write_bytes(copy.read_bytes())
    os.chmod(restored / "coordinator.sqlite3", 0o600)
    cape_server.data_dir = restored
    cape_server.start()
    login = [requests.post(f"{cape_server.url}/v1/login", timeout=10,
                           headers={"Authorization": f"Bearer {org['user_token']}"}).status_code for org in (kept, later)]
    assert login == [200, 401]  # what the backup held, and not what came after it


@pytest.mark.parametrize("command", [["serve", "--port", "0"], ["admin", "create-org-token", "acme"]])
def test_a_database_file_that_is_no_database_is_one_line(tmp_path, command):
    """A bad restore, or another file put in its place: named, with what to do, not sqlite3's traceback."""
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    (data_dir / "coordinator.sqlite3").write_bytes(os.urandom(5000))
    result = run_cli(*command, "--data-dir", str(data_dir))
    assert result.returncode == 1 and "Traceback" not in result.stderr and "listening" not in result.stdout
    assert error_line(result) == (f"Error: {data_dir / 'coordinator.sqlite3'} is not an SQLite database (a bad "
                                  "restore, or another file put in its place?); put back the copy `cape-server admin "
                                  "backup` made")


def test_a_broker_index_that_is_no_database_is_one_line(tmp_path):
    index = tmp_path / "data" / "broker" / "index.sqlite3"
    index.parent.mkdir(parents=True, mode=0o700)
    index.write_bytes(os.urandom(5000))
    result = run_cli("serve", "--port", "0", "--data-dir", str(tmp_path / "data"), "--only", "broker",
                     "--coordinator-url", "http://127.0.0.1:9")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert error_line(result) == (f"Error: {index} is not an SQLite database (a bad restore, or another file put in "
                                  f"its place?); remove it and {index.parent / 'bodies'} to start the broker empty "
                                  "(the jobs whose messages it held end at their timeout)")


def test_a_data_dir_a_newer_server_wrote_is_refused_in_one_line(tmp_path):
    """A server taken back to an older version wrote to tables it no longer knew: it said ok, and every broker
    message was a 500 (2,366 tracebacks in 2 minutes) until the jobs ended at their timeout."""
    from services.broker.store import INDEX_SCHEMA_VERSION
    from services.coordinator.db import SCHEMA_VERSION

    data_dir = tmp_path / "data"
    made = run_cli("admin", "create-org", "acme", "--admin-email", "a@acme.example", "--data-dir", str(data_dir))
    assert made.returncode == 0, made.stderr
    database = data_dir / "coordinator.sqlite3"
    with sqlite3.connect(database) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION  # stamped by the one that wrote it
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")  # as a newer server would leave it
    for command in (["admin", "list-orgs"], ["serve", "--port", "0"]):
        result = run_cli(*command, "--data-dir", str(data_dir))
        assert result.returncode == 1 and "Traceback" not in result.stderr and "listening" not in result.stdout
        assert error_line(result) == (
            f"Error: {database} was written by a newer cape-server (schema {SCHEMA_VERSION + 1}; this one knows up to "
            f"{SCHEMA_VERSION}): run that version, or put back the backup taken before the upgrade (`cape-server "
            "admin backup`, with a copy of the data dir's broker/ folder)")

    index = tmp_path / "broker-only" / "broker" / "index.sqlite3"
    index.parent.mkdir(parents=True, mode=0o700)
    with sqlite3.connect(index) as conn:
        conn.execute(f"PRAGMA user_version = {INDEX_SCHEMA_VERSION + 1}")
    result = run_cli("serve", "--port", "0", "--data-dir", str(tmp_path / "broker-only"), "--only", "broker",
                     "--coordinator-url", "http://127.0.0.1:9")
    assert result.returncode == 1 and error_line(result).startswith(
        f"Error: {index} was written by a newer cape-server (schema {INDEX_SCHEMA_VERSION + 1};")


def test_the_operator_lists_organizations_users_and_tokens_and_revokes_a_users_tokens(cape_server):
    """With shell access only: what is there, and a lost laptop's tokens revoked without knowing their ids."""
    acme = cape_server.create_org("acme")
    cape_server.create_org("beta", admin_email="ds@acme.example")
    data = ["--data-dir", str(cape_server.data_dir)]
    orgs = json.loads(run_cli("admin", "list-orgs", "--json", *data).stdout)
    assert [o["label"] for o in orgs] == ["acme", "beta"]
    users = json.loads(run_cli("admin", "list-users", "beta", "--json", *data).stdout)
    assert [(u["email"], u["roles"]) for u in users] == [("ds@acme.example", {"beta": "admin"})]
    table = run_cli("admin", "list-users", *data).stdout.splitlines()
    assert table[0].split() == ["EMAIL", "ROLES", "ID"] and len(table) == 3
    tokens = json.loads(run_cli("admin", "list-tokens", "--org", "acme", "--json", *data).stdout)
    assert [t["id"] for t in tokens] == [acme["organization_token"].split(",")[0]]
    assert acme["organization_token"].split(",")[1] not in run_cli("admin", "list-tokens", "--org", "acme",
                                                                    *data).stdout

    user_token = acme["user_token"]
    revoked = run_cli("admin", "revoke-user-tokens", "admin@acme.example", *data)
    assert revoked.returncode == 0 and revoked.stdout.strip() == (
        f"revoked 1 token(s) of admin@acme.example: {user_token.split(',')[0]}")
    assert requests.post(f"{cape_server.url}/v1/login", headers={"Authorization": f"Bearer {user_token}"},
                         timeout=10).status_code == 401
    [listed] = json.loads(run_cli("admin", "list-tokens", "--user", "admin@acme.example", "--json", *data).stdout)
    assert listed["revoked_at"] is not None
    assert error_line(run_cli("admin", "list-tokens", *data)) == "Error: give --org ORGANIZATION or --user EMAIL"
    assert error_line(run_cli("admin", "revoke-user-tokens", "nobody@acme.example", *data)) == (
        "Error: no user nobody@acme.example; `cape-server admin list-users` lists them")
    assert run_cli("--version").stdout.strip() == f"cape-server, version {version('cape-workers')}"


def test_openapi_describes_the_error_body_the_server_answers(cape_server):
    """A client generated from /openapi.json must know `{"error": {"code", "message"}}`, not FastAPI's
    `{"detail": [...]}`, and which token each part takes."""
    document = requests.get(f"{cape_server.url}/openapi.json", timeout=10).json()
    text = json.dumps(document)
    assert "HTTPValidationError" not in text
    schemas = document["components"]["schemas"]
    refs = set(re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', text))
    assert refs <= set(schemas), refs - set(schemas)
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for status in ("4XX", "5XX"):
                schema = operation["responses"][status]["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (path, method, status)
    assert set(schemas["ErrorDetail"]["required"]) == {"code", "message"}
    refused = requests.post(f"{cape_server.url}/v1/projects", json={"label": 5},
                            headers={"Authorization": "Bearer x,y"}, timeout=10)
    assert set(refused.json()) == {"error"} and set(refused.json()["error"]) == {"code", "message"}
    assert set(document["components"]["securitySchemes"]) == {"CapeToken", "WorkerToken"}


def test_a_database_on_a_disk_that_refuses_writes_is_said_as_such(tmp_path):
    """Not "run the server as its owner, or chown": the owner is this user already."""
    import resource

    def no_file_writes() -> None:  # the kernel refuses every write to a regular file, as a full disk does
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    data_dir = tmp_path / "data"
    result = subprocess.run([*cape_server_command(), "admin", "create-org", "acme", "--admin-email", "a@acme.example",
                             "--data-dir", str(data_dir)], capture_output=True, text=True, timeout=60,
                            preexec_fn=no_file_writes)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert error_line(result).startswith(f"Error: {data_dir / 'coordinator.sqlite3'} cannot be written (")
    assert error_line(result).endswith("): its disk is full or read-only; free space or make it writable, then "
                                       "try again")


def test_a_bind_error_leaves_the_lock_of_a_part_another_server_serves(start_cape_server):
    """A broker alone that cannot bind removes its own lock file only, not the one a coordinator alone holds in the
    same data dir (a third server would then have started beside that coordinator)."""
    coordinator = start_cape_server(extra_args=["--only", "coordinator"])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        result = run_cli("serve", "--port", str(taken.getsockname()[1]), "--data-dir", str(coordinator.data_dir),
                         "--only", "broker", "--coordinator-url", coordinator.url)
    assert result.returncode == 1 and "cannot listen on" in result.stderr
    assert (coordinator.data_dir / "coordinator.lock").exists()
    assert not (coordinator.data_dir / "broker.lock").exists()
    second = run_cli("serve", "--port", "0", "--data-dir", str(coordinator.data_dir), "--only", "coordinator")
    assert error_line(second).startswith(f"Error: another cape-server (pid {coordinator.pid}) serves the coordinator")


def test_admin_changes_are_recorded_in_the_data_dirs_admin_audit_log(tmp_path):
    """The API's changes are `cape.audit` lines in the server's log; the admin commands' went unrecorded."""
    import getpass

    data = ["--data-dir", str(tmp_path)]
    made = json.loads(run_cli("admin", "create-org", "acme", "--admin-email", "a@acme.example", "--json", *data).stdout)
    user = json.loads(run_cli("admin", "create-user", "acme", "ds@acme.example", "--role", "data_scientist", "--json",
                              *data).stdout)
    org_token = json.loads(run_cli("admin", "create-org-token", "acme", "--json", *data).stdout)
    again = json.loads(run_cli("admin", "create-user-token", "ds@acme.example", "--json", *data).stdout)
    assert run_cli("admin", "revoke-token", org_token["token"], *data).returncode == 0  # a whole token, secret too
    assert run_cli("admin", "revoke-user-tokens", "ds@acme.example", *data).returncode == 0
    assert run_cli("admin", "backup", str(tmp_path / "copy.sqlite3"), *data).returncode == 0
    assert run_cli("admin", "create-org-token", "nope", *data).returncode != 0  # refused: no line
    run_cli("admin", "list-users", *data)  # reads: no line

    log = tmp_path / "admin-audit.log"
    assert log.stat().st_mode & 0o777 == 0o600
    lines = log.read_text().splitlines()
    who = rf"\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\dZ {re.escape(getpass.getuser())} \(uid {os.getuid()}\): "
    ids = {name: token.split(",")[0] for name, token in [
        ("org", made["organization_token"]), ("admin", made["user_token"]), ("ds", user["token"]),
        ("org2", org_token["token"]), ("ds2", again["token"])]}
    expected = [
        f"created organization acme ({made['organization']['id']}) with admin a@acme.example (user "
        f"{made['user']['id']}, token {ids['admin']}) and organization token {ids['org']}",
        f"made ds@acme.example (user {user['user']['id']}, token {ids['ds']}) data_scientist of organization acme",
        f"issued organization token {ids['org2']} to organization acme",
        f"issued user token {ids['ds2']} to ds@acme.example",
        f"revoked token {ids['org2']}",
        f"revoked 2 token(s) of ds@acme.example: {ids['ds']}, {ids['ds2']}",
        f"backed up the database (token hashes included) to {(tmp_path / 'copy.sqlite3').resolve()}",
    ]
    assert len(lines) == len(expected)
    for line, action in zip(lines, expected):
        assert re.fullmatch(who + re.escape(action), line), line
    text = log.read_text()
    for token in (made["organization_token"], made["user_token"], user["token"], org_token["token"], again["token"]):
        assert token.split(",")[1] not in text


def test_serve_warns_of_a_create_reserve_not_above_the_brokers_reserve(tmp_path):
    """--create-reserve-bytes (2 GiB) exists so that new jobs are refused before running ones lose their messages;
    an operator raising --min-free-bytes past it got the opposite, silently. 192.0.2.1 is no address of this
    machine: the warnings come first, then the bind fails."""
    def first_line(*args: str) -> str:
        result = run_cli("serve", "--host", "192.0.2.1", "--port", "0", "--data-dir", str(tmp_path / "d"), *args)
        assert result.returncode != 0
        return result.stderr.splitlines()[0]

    assert first_line("--min-free-bytes", str(3 * 1024**3)) == (
        "cape-server: warning: --create-reserve-bytes (2147483648) is not above --min-free-bytes (3221225472): as "
        "the disk fills, the broker refuses the running jobs' messages while the coordinator still takes new jobs; "
        "raise --create-reserve-bytes above it")
    for fine in (["--min-free-bytes", str(3 * 1024**3), "--create-reserve-bytes", "0"],
                 ["--min-free-bytes", str(3 * 1024**3), "--only", "coordinator"], []):
        assert first_line(*fine).startswith("cape-server: warning: serving plain HTTP on 192.0.2.1"), fine
