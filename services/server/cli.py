"""`cape-server`: run the coordinator and broker (`serve`), and bootstrap identities from the shell (`admin`)."""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import socket
import sqlite3
import ssl
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import click
from pydantic import TypeAdapter, ValidationError

from services.connection_errors import ca_file_problem, connection_problem, is_loopback, plain_http_to_another_host
from services.coordinator import identity
from services.coordinator.db import Database
from services.coordinator.schemas import Email, Name, TokenDescription
from services.file_locks import lock_file
from services.server import admin_audit
from services.server.config import (
    DEFAULT_APPROVAL_TTL, DEFAULT_BODY_IDLE_SECONDS, DEFAULT_MAX_JOB_BYTES, DEFAULT_MAX_JOB_MESSAGES,
    DEFAULT_MAX_ORG_BYTES, DEFAULT_MAX_ORG_MESSAGES, DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_MESSAGE_TTL,
    DEFAULT_MIN_FREE_BYTES, DEFAULT_CREATE_RESERVE_BYTES,
    ServerConfig,
)
from services.server.error_handlers import problem_of
from services.server.errors import ApiError
from services.server.storage_trouble import is_storage_refusal
from services.sqlite_files import DatabaseUnusable
from services.tables import print_table

LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

data_dir_option = click.option(
    "--data-dir", required=True, envvar="CAPE_SERVER_DATA_DIR", show_envvar=True,
    type=click.Path(file_okay=False, path_type=Path), help="Directory of the database and message store.")

# The coordinator API's own email rule (schemas.Email), so an admin cannot bootstrap a user the API would refuse.
_EMAIL = TypeAdapter(Email)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})  # as the `cape` CLI
@click.version_option(package_name="cape-workers", prog_name="cape-server")
def main() -> None:
    """Cape's reference coordinator and broker."""


def check_data_dir(data_dir: Path) -> None:
    """Make `data_dir` (private: it holds token hashes and queued messages) and check this user can write in it,
    so a bad one is a one-line error before anything starts rather than a traceback from mkdir or sqlite.

    Files this process creates from here on are private to its user (umask 077). A directory made beforehand keeps
    its mode (it is the operator's), with a warning when other users may read it."""
    os.umask(0o077)
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=data_dir, prefix=".cape-server-probe-"):
            pass
        mode = data_dir.stat().st_mode & 0o777
    except OSError as exc:
        raise click.ClickException(f"--data-dir {data_dir} cannot be used: {exc.strerror or exc} "
                                   "(give a directory this user can create and write)") from None
    if mode & 0o077:
        click.echo(f"cape-server: warning: --data-dir {data_dir} is open to other users (mode {mode:o}); it holds "
                   f"token hashes and queued messages: chmod 700 {data_dir}", err=True)


def _email(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        return _EMAIL.validate_python(value)
    except ValidationError:
        raise click.BadParameter(f"{value!r} is not an email address (like name@example.org)") from None


def _checked(field_type: Any, what: str) -> Callable[[click.Context, click.Parameter, str | None], str | None]:
    """A click callback holding an option to the API's own rule for the field, so the admin commands cannot store
    what the API would refuse (a name with a line break breaks every table that shows it)."""
    adapter = TypeAdapter(field_type)

    def check(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return adapter.validate_python(value)
        except ValidationError as exc:
            raise click.BadParameter(f"{what} {problem_of(exc.errors()[0])}") from None

    return check


def _optional_email(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    return None if value is None else _email(ctx, param, value)


def _tls_file(ctx: click.Context, param: click.Parameter, value: str | None) -> Path | None:
    # An empty value would become Path("."), and its error would name the current directory.
    if value == "":
        raise click.BadParameter("is empty; give the PEM file's path, or leave out both --tls-cert and --tls-key "
                                 "for plain HTTP")
    return None if value is None else Path(value)


def _listen_error(host: str, port: int, exc: OSError) -> click.ClickException:
    """Point at the option to change: a name that does not resolve, or an address this machine does not have, is
    the host's fault, not the port's."""
    if isinstance(exc, socket.gaierror):
        advice = "; pick another --host"
    elif exc.errno == errno.EADDRNOTAVAIL:
        advice = " (this machine has no such address); pick another --host"
    else:
        advice = "; pick another --port"
    return click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror}{advice}")


def check_tls_files(cert: Path | None, key: Path | None) -> None:
    """Load the certificate chain and key as the server will, so a bad pair is one line naming the options before
    anything starts (uvicorn's own error is a traceback, and an encrypted key would make OpenSSL prompt for a
    passphrase on a terminal nobody watches)."""
    if (cert is None) != (key is None):
        raise click.UsageError("give both --tls-cert and --tls-key (a certificate chain and its private key), or "
                               "neither for plain HTTP")
    if cert is None or key is None:
        return

    def no_passphrase() -> bytes:
        raise click.ClickException(f"--tls-key {key} is encrypted; give the key unencrypted, in a file only this "
                                   "user can read (openssl pkey -in KEY -out KEY.plain)")

    from cryptography import x509

    contents = {}
    for option, path in (("--tls-cert", cert), ("--tls-key", key)):
        try:
            contents[option] = path.read_bytes()
        except OSError as exc:
            raise click.ClickException(f"{option} {path} cannot be read: {exc.strerror or exc}") from None
    try:
        leaf = x509.load_pem_x509_certificates(contents["--tls-cert"])[0]
    except ValueError:
        raise click.ClickException(f"--tls-cert {cert} holds no PEM certificate (-----BEGIN CERTIFICATE-----)") from None
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=no_passphrase)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise click.ClickException(f"--tls-key {key} is not the private key of the first certificate in "
                                       f"--tls-cert {cert} (the server's own certificate comes first, then its "
                                       "intermediates)") from None
        raise click.ClickException(f"--tls-key {key} is not a PEM private key, or does not load with --tls-cert "
                                   f"{cert} ({exc.reason or exc})") from None
    now = datetime.now(timezone.utc)
    if leaf.not_valid_after_utc < now:
        click.echo(f"cape-server: warning: --tls-cert {cert} expired on {leaf.not_valid_after_utc:%Y-%m-%d}; every "
                   "client will refuse it until it is renewed", err=True)
    elif leaf.not_valid_before_utc > now:
        click.echo(f"cape-server: warning: --tls-cert {cert} is not valid before "
                   f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; clients refuse it until then", err=True)
    if key.stat().st_mode & 0o077:
        click.echo(f"cape-server: warning: --tls-key {key} is open to other users; chmod 600 {key}", err=True)


def _degraded_problem(response: Any) -> str | None:
    """The `problem` of a cape-server /healthz that answered 503 `degraded` (up, with trouble), else None."""
    try:
        body = response.json() if response.status_code == 503 else None
    except ValueError:
        return None
    return str(body.get("problem")) if isinstance(body, dict) and body.get("status") == "degraded" else None


def check_coordinator_url(url: str) -> None:
    """A broker running alone asks `url` about every caller: its CA settings must load (httpx would fail at start
    with a traceback), and the operator should hear now, not from other organizations' workers, when the
    coordinator cannot be reached or trusted (a warning: it may simply start later)."""
    import httpx

    for variable, directory in (("SSL_CERT_FILE", False), ("SSL_CERT_DIR", True)):  # httpx's
        problem = ca_file_problem(os.environ[variable], directory) if os.environ.get(variable) else None
        if problem:
            raise click.ClickException(f"{variable}: {problem}")
    if plain_http_to_another_host(url):
        click.echo(f"cape-server: warning: --coordinator-url {url} is plain http:// to another machine: the broker "
                   "sends every worker's token there unencrypted; use its https:// URL", err=True)
    try:
        health = httpx.get(f"{url.rstrip('/')}/healthz", timeout=5)
        degraded = _degraded_problem(health)
        if degraded:  # it answers: the broker works with it, but its operator should know
            click.echo(f"cape-server: warning: the coordinator at {url} reports a problem: {degraded}", err=True)
            return
        health.raise_for_status()
    except httpx.HTTPError as exc:
        reason = (f"it answered {exc.response.status_code}" if isinstance(exc, httpx.HTTPStatusError)
                  else connection_problem(exc, url, "SSL_CERT_FILE"))
        click.echo(f"cape-server: warning: the coordinator at {url} does not answer now ({reason}); the broker "
                   "starts, and refuses workers (503) until it does", err=True)


# How long an idle kept-alive connection stays open. uvicorn's 5 s equalled the gap between a worker's requests
# (a job list at 10 s, a heartbeat at 15 s): a request sent as the server closed the connection failed as
# "coordinator unreachable" (13 in 560 such reuses, measured). Well above every gap the workers leave.
KEEP_ALIVE_SECONDS = 75


def _run_uvicorn(app: Any, sock: socket.socket, log_level: str, access_log: bool,
                 tls: tuple[Path, Path] | None = None) -> None:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server that also tells the app when a stop signal arrives (to release long polls)."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            begin = getattr(app.state, "begin_shutdown", None)
            if begin is not None:
                begin()
            super().handle_exit(sig, frame)

    # httptools (C) parses requests; h11, uvicorn's pure-Python default, took twice the CPU to receive a message
    # body (the broker bench). uvloop runs the event loop: a 256 MB relay took 0.47 + 0.24 CPU-s with it, 0.59 +
    # 0.32 with asyncio's own loop.
    files = {"ssl_certfile": str(tls[0]), "ssl_keyfile": str(tls[1])} if tls else {}
    Server(uvicorn.Config(app, http="httptools", loop="uvloop", log_level=log_level, access_log=access_log,
                          timeout_graceful_shutdown=3, timeout_keep_alive=KEEP_ALIVE_SECONDS, log_config=None,
                          **files)).run(sockets=[sock])


def listening_socket(host: str, port: int) -> socket.socket:
    """A bound, listening TCP socket for uvicorn.

    The protocol is given explicitly (not 0): asyncio sets TCP_NODELAY on accepted connections only when the
    listening socket's `proto` is IPPROTO_TCP, and without it every response after the first on a kept-alive
    connection waits ~40 ms for Nagle's algorithm and the client's delayed ACK.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535),
              help="Port to listen on; 0 picks a free one (printed on stdout).")
@data_dir_option
@click.option("--only", type=click.Choice(["coordinator", "broker"]), help="Run one part alone.")
@click.option("--coordinator-url", help="The coordinator a broker running alone checks job membership with.")
@click.option("--max-message-bytes", default=DEFAULT_MAX_MESSAGE_BYTES, show_default=True,
              type=click.IntRange(1), help="Largest message the broker stores.")
@click.option("--max-job-bytes", default=DEFAULT_MAX_JOB_BYTES, show_default=True, type=click.IntRange(1),
              help="Most bytes one seat of a job may have waiting at the broker for its recipients; more waits "
                   "(the workers retry).")
@click.option("--max-job-messages", default=DEFAULT_MAX_JOB_MESSAGES, show_default=True, type=click.IntRange(1),
              help="Most messages one seat of a job may have waiting at the broker for its recipients; more wait "
                   "(the workers retry).")
@click.option("--max-org-bytes", default=DEFAULT_MAX_ORG_BYTES, show_default=True, type=click.IntRange(1),
              help="Most bytes one organization may have waiting at the broker for its recipients across all its "
                   "jobs; more waits (the workers retry).")
@click.option("--max-org-messages", default=DEFAULT_MAX_ORG_MESSAGES, show_default=True, type=click.IntRange(1),
              help="Most messages one organization may have waiting at the broker for its recipients across all its "
                   "jobs; more wait (the workers retry).")
@click.option("--min-free-bytes", default=DEFAULT_MIN_FREE_BYTES, show_default=True, type=click.IntRange(0),
              help="Free space the broker keeps on the data dir's disk; a message that would use it waits.")
@click.option("--create-reserve-bytes", default=DEFAULT_CREATE_RESERVE_BYTES, show_default=True,
              type=click.IntRange(0),
              help="Free space below which the coordinator takes no new projects, dataviews, jobs, users or tokens "
                   "(running jobs go on); keep it above --min-free-bytes. 0: none.")
@click.option("--body-idle-seconds", default=DEFAULT_BODY_IDLE_SECONDS, show_default=True,
              type=click.FloatRange(min=0.1),
              help="Seconds without a byte after which the broker gives up a message being sent (and its partial "
                   "file).")
@click.option("--message-ttl", default=DEFAULT_MESSAGE_TTL, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds after which undelivered messages expire; a Started job none of whose workers reported "
                   "for as long while the server ran, and whose workers still to finish are offline, ends in Error.")
@click.option("--approval-ttl", default=DEFAULT_APPROVAL_TTL, show_default=True, type=click.FloatRange(min=0),
              help="Seconds after its submission by which every data owner must have approved a job, or it ends in "
                   "Error (an early approval would otherwise count for ever); 0: no deadline.")
@click.option("--job-sweep-seconds", default=5.0, show_default=True, type=click.FloatRange(min=0.1),
              help="How often jobs that did not start in time are ended, and ended jobs' messages dropped.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--access-log/--no-access-log", default=False, show_default=True, help="Log every request.")
@click.option("--tls-cert", envvar="CAPE_SERVER_TLS_CERT", show_envvar=True, type=click.Path(dir_okay=False),
              callback=_tls_file,
              help="Serve HTTPS with this PEM certificate chain (the server's certificate first); with --tls-key.")
@click.option("--tls-key", envvar="CAPE_SERVER_TLS_KEY", show_envvar=True, type=click.Path(dir_okay=False),
              callback=_tls_file, help="The certificate's PEM private key, unencrypted.")
def serve(host: str, port: int, data_dir: Path, only: str | None, coordinator_url: str | None,
          max_message_bytes: int, max_job_bytes: int, max_job_messages: int, max_org_bytes: int,
          max_org_messages: int, min_free_bytes: int,
          create_reserve_bytes: int, body_idle_seconds: float,
          message_ttl: float, approval_ttl: float, job_sweep_seconds: float, log_level: str, access_log: bool, tls_cert: Path | None,
          tls_key: Path | None) -> None:
    """Serve the coordinator at /v1 and the broker at /broker/v1 on one port."""
    from services.memory_reuse import keep_freed_memory
    from services.server.app import create_app

    if max_job_bytes < max_message_bytes:
        raise click.UsageError(f"--max-job-bytes ({max_job_bytes}) is below --max-message-bytes ({max_message_bytes}): "
                               "a message between the two could never be stored")
    if max_org_bytes < max_message_bytes:
        raise click.UsageError(f"--max-org-bytes ({max_org_bytes}) is below --max-message-bytes ({max_message_bytes}): "
                               "a message between the two could never be stored")
    if only == "broker" and not coordinator_url:
        raise click.UsageError("--only broker needs --coordinator-url (the coordinator that knows the jobs)")
    if only != "broker" and coordinator_url:
        raise click.UsageError("--coordinator-url is only for --only broker (otherwise the coordinator runs in this "
                               "same process)")
    if only is None and 0 < create_reserve_bytes <= min_free_bytes:
        # The reserve's point is the other way round: new jobs refused while running ones still pass messages.
        click.echo(f"cape-server: warning: --create-reserve-bytes ({create_reserve_bytes}) is not above "
                   f"--min-free-bytes ({min_free_bytes}): as the disk fills, the broker refuses the running jobs' "
                   "messages while the coordinator still takes new jobs; raise --create-reserve-bytes above it",
                   err=True)
    check_tls_files(tls_cert, tls_key)
    if tls_cert is None and not is_loopback(host):
        click.echo(f"cape-server: warning: serving plain HTTP on {host}: tokens and job details cross the network "
                   "unencrypted; give --tls-cert and --tls-key, or serve behind a TLS proxy", err=True)
    if coordinator_url:
        check_coordinator_url(coordinator_url)
    created = not data_dir.exists()
    new_database = only != "broker" and _no_database(ServerConfig(data_dir=data_dir).coordinator_db_path)
    check_data_dir(data_dir)  # before binding: no "listening" line for a server that cannot start
    # Before binding: the same command started twice is told of the other server, not of its port.
    held = lock_data_dir(data_dir, only)  # held until the process ends
    # Bind and listen ourselves so `--port 0` can report the real port before uvicorn starts serving;
    # connections made in between wait in the backlog. Before the app makes its database: a port or host
    # mistake leaves no data dir behind.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = listening_socket(host, port)
    except OSError as exc:
        with contextlib.suppress(OSError):
            for path in held.values():  # ours to remove: we hold them (another part's server may hold the other)
                path.unlink(missing_ok=True)
            if created:
                data_dir.rmdir()  # ours, and nothing else in it
        raise _listen_error(host, port, exc) from None
    if new_database:
        click.echo(f"cape-server: no database in {data_dir} yet: a new, empty one is made (no organizations; "
                   "`cape-server admin create-org` makes the first). If you meant an existing server's, stop and "
                   "give its --data-dir", err=True)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    if log_level != "debug":  # a broker alone asks its coordinator about callers: one line per request otherwise
        for library in ("httpx", "httpcore"):
            logging.getLogger(library).setLevel(logging.WARNING)
    logging.getLogger("cape.audit").setLevel(logging.INFO)  # "who did this?" is kept at any --log-level
    config = ServerConfig(data_dir=data_dir, only=only, coordinator_url=coordinator_url,  # type: ignore[arg-type]
                          max_message_bytes=max_message_bytes, max_job_bytes=max_job_bytes,
                          max_job_messages=max_job_messages, max_org_bytes=max_org_bytes,
                          max_org_messages=max_org_messages,
                          min_free_bytes=min_free_bytes, create_reserve_bytes=create_reserve_bytes,
                          body_idle_seconds=body_idle_seconds,
                          message_ttl=message_ttl, approval_ttl=approval_ttl or None,
                          job_sweep_seconds=job_sweep_seconds)
    keep_freed_memory()  # message bodies pass through in MB-sized pieces: reuse their memory
    try:
        app = create_app(config)
    except DatabaseUnusable as exc:
        raise click.ClickException(str(exc)) from None
    bound_port = sock.getsockname()[1]
    shown_host = f"[{host}]" if family == socket.AF_INET6 else host
    scheme = "https" if tls_cert else "http"
    click.echo(f"cape-server listening on {scheme}://{shown_host}:{bound_port}")
    sys.stdout.flush()
    _run_uvicorn(app, sock, log_level, access_log, (tls_cert, tls_key) if tls_cert and tls_key else None)
    for fd in held:
        os.close(fd)


def lock_data_dir(data_dir: Path, only: str | None) -> dict[int, Path]:
    """Hold `<part>.lock` in the data dir for each part served, or exit naming the server that holds one.

    Two servers on one part's data would each sweep the other's unfinished uploads at start and never wake each
    other's long polls; a coordinator and a broker running alone may share a data dir (their files differ)."""
    held: dict[int, Path] = {}  # descriptor -> its lock file
    for part in ("coordinator", "broker"):
        if only not in (None, part):
            continue
        path = data_dir / f"{part}.lock"
        fd = lock_file(path)
        if fd is None:
            other = ""
            with contextlib.suppress(OSError, ValueError):
                other = f" (pid {int(path.read_text().strip())})"
            raise click.ClickException(f"another cape-server{other} serves the {part} from --data-dir {data_dir}; "
                                       "stop it first, or give this one its own --data-dir (two servers on one "
                                       "data dir lose each other's messages in transit)")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        held[fd] = path
    return held


# --- admin --------------------------------------------------------------------------------------------------

@main.group()
def admin() -> None:
    """Bootstrap organizations, users and tokens directly in the database (like createsuperuser)."""


def _emit(result: dict[str, Any], as_json: bool, lines: list[str]) -> None:
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo("\n".join(lines))


def _warn_if_existing(email: str, existing: dict[str, Any] | None) -> None:
    """Emails are not verified: an account made earlier under this email is held by whoever got its first token."""
    if existing is None:
        return
    maker = {"organization": f"by organization {existing['created_by_organization']}'s admin",
             "server_operator": "by the server's operator"}.get(existing["made_by"], "by an unrecorded maker")
    click.echo(f"warning: {email} already had an account (made {existing['created_at']} {maker}); the token "
               "printed is a new one for it and its earlier tokens still work. If you meant another person, give "
               "another email.", err=True)


def _no_database(database: Path) -> bool:
    """Whether `database` is certainly not there. A data dir this user cannot look into is not taken for a typo:
    check_data_dir then says what is wrong with it."""
    try:
        database.stat()
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return False
    return False


def _run(data_dir: Path, action: Any, *, create: bool = False) -> Any:
    """Run `action(conn)` in one transaction on the data dir's coordinator database.

    Only `create` (create-org: how a server is bootstrapped) makes a new database, and says so on stderr; every
    other command refuses a data dir without one before making anything there, so a mistyped --data-dir is an
    error rather than a new empty database whose tokens the running server refuses."""
    database = ServerConfig(data_dir=data_dir).coordinator_db_path  # where `serve` keeps it
    new = _no_database(database)
    if new and not create:
        raise click.ClickException(f"no cape-server database in {data_dir}: is --data-dir (or CAPE_SERVER_DATA_DIR) "
                                   "the one `cape-server serve` uses? `admin create-org` makes a new one")
    check_data_dir(data_dir)
    try:
        db = Database(database)
    except DatabaseUnusable as exc:
        raise click.ClickException(str(exc)) from None
    try:
        with db.transaction() as conn:
            result = action(conn)
    except ApiError as exc:
        raise click.ClickException(exc.message) from None
    except sqlite3.OperationalError as exc:
        if not is_storage_refusal(exc):
            raise
        raise click.ClickException(f"{database} cannot be written ({exc}): its disk is full or read-only; nothing "
                                   "was changed. Free space or make it writable, then run the command again") from None
    finally:
        db.close()
    if new:
        click.echo(f"cape-server: created a new database in {data_dir} (if you meant a running server's, give the "
                   "--data-dir its `cape-server serve` uses)", err=True)
    return result


@admin.command("create-org")
@click.argument("label")
@click.option("--name", callback=_checked(Name, "the name"), help="Display name (defaults to the label).")
@click.option("--admin-email", required=True, callback=_email, help="Email of the organization's first admin.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@data_dir_option
def create_org(label: str, name: str | None, admin_email: str, as_json: bool, data_dir: Path) -> None:
    """Create an organization with its first admin; prints an organization token (for its worker) and the
    admin's user token. Keep both secret: they are shown only once."""
    if not LABEL.match(label):
        raise click.BadParameter("use letters, digits, '.', '_' or '-' (at most 64, starting with a letter or "
                                 "digit)", param_hint="LABEL")

    def action(conn: Any) -> dict[str, Any]:
        org = identity.create_organization(conn, label, name)
        user, user_token, existing = identity.add_user(conn, org["id"], admin_email, "admin",
                                                       token_for_existing=True)
        org_token = identity.issue_org_token(conn, org["id"], "created with the organization")
        return {"organization": identity.org_view(org), "user": user,
                "organization_token": org_token["token"], "user_token": user_token, "existing_account": existing}

    result = _run(data_dir, action, create=True)
    admin_audit.record(data_dir, f"created organization {label} ({result['organization']['id']}) with admin "
                                 f"{admin_email} (user {result['user']['id']}, token {_token_id(result['user_token'])})"
                                 f" and organization token {_token_id(result['organization_token'])}")
    _warn_if_existing(admin_email, result["existing_account"])
    _emit(result, as_json, [f"organization {label} ({result['organization']['id']})",
                            f"organization token (for its worker's CAPE_TOKEN): {result['organization_token']}",
                            f"admin {admin_email} user token (for `cape login`): {result['user_token']}"])


@admin.command("create-user")
@click.argument("organization")
@click.argument("email_argument", metavar="[EMAIL]", required=False, callback=_optional_email)
@click.option("--email", callback=_optional_email, help="The user's email (or give it after ORGANIZATION).")
@click.option("--role", required=True, type=click.Choice(list(identity.ROLES)))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@data_dir_option
def create_user(organization: str, email_argument: str | None, email: str | None, role: str, as_json: bool,
                data_dir: Path) -> None:
    """Add a user (by email) to an organization with a role; prints a user token for them.

    The email comes after ORGANIZATION, as in `cape orgs add-user ORG EMAIL`, or as --email."""
    if email_argument and email and email_argument != email:
        raise click.UsageError(f"two emails given ({email_argument} and --email {email}); give one")
    email = email_argument or email
    if not email:
        raise click.UsageError("give the user's email: create-user ORGANIZATION EMAIL --role ROLE")

    def action(conn: Any) -> dict[str, Any]:
        org = identity.find_organization(conn, organization)
        user, token, existing = identity.add_user(conn, org["id"], email, role, token_for_existing=True)
        return {"user": user, "organization": identity.org_view(org), "token": token, "existing_account": existing}

    result = _run(data_dir, action)
    made = f", token {_token_id(result['token'])}" if result["token"] else ""
    admin_audit.record(data_dir, f"made {email} (user {result['user']['id']}{made}) {role} of organization "
                                 f"{result['organization']['label']}")
    _warn_if_existing(email, result["existing_account"])
    _emit(result, as_json, [f"user {email} is {role} of {result['organization']['label']}",
                            f"user token: {result['token']}"])


@admin.command("create-user-token")
@click.argument("email", callback=_email)
@click.option("--description", callback=_checked(TokenDescription, "the description"),
              help="What the token is for (e.g. a new laptop).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@data_dir_option
def create_user_token(email: str, description: str | None, as_json: bool, data_dir: Path) -> None:
    """Make a new token for an existing user: one who revoked or lost theirs. Only the server's operator can: an
    organization's admin never obtains a token for another person (it carries their roles everywhere)."""
    def action(conn: Any) -> dict[str, Any]:
        user = identity.user_by_email(conn, email)
        if user is None:
            raise click.ClickException(f"no user {email}; `admin create-user ORGANIZATION {email} --role ROLE` "
                                       "makes one")
        issued = identity.issue_user_token(conn, user["id"], description or "issued by the server's operator")
        return {"user": identity.user_view(user), **issued}

    result = _run(data_dir, action)
    admin_audit.record(data_dir, f"issued user token {result['id']} to {result['user']['email']}")
    _emit(result, as_json, [f"user token for {result['user']['email']} ({result['id']}): {result['token']}"])


@admin.command("create-org-token")
@click.argument("organization")
@click.option("--description", callback=_checked(TokenDescription, "the description"),
              help="What the token is for (e.g. which worker).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@data_dir_option
def create_org_token(organization: str, description: str | None, as_json: bool, data_dir: Path) -> None:
    """Make another organization token (for a worker)."""
    def action(conn: Any) -> dict[str, Any]:
        org = identity.find_organization(conn, organization)
        issued = identity.issue_org_token(conn, org["id"], description)
        # `organization_token` as in create-org's JSON; `token` stays for scripts written against earlier versions.
        return {**issued, "organization_token": issued["token"]}

    result = _run(data_dir, action)
    admin_audit.record(data_dir, f"issued organization token {result['id']} to organization {organization}")
    _emit(result, as_json, [f"organization token {result['id']}: {result['token']}"])


@admin.command("revoke-token")
@click.argument("token_id")
@data_dir_option
def revoke_token(token_id: str, data_dir: Path) -> None:
    """Revoke a token by its id (the part before the comma)."""
    token_id = token_id.split(",", 1)[0]  # accept a whole token too, but never echo its secret
    _run(data_dir, lambda conn: identity.revoke_token(conn, token_id))
    admin_audit.record(data_dir, f"revoked token {token_id}")
    click.echo(f"revoked token {token_id}")


@admin.command("backup")
@click.argument("destination", type=click.Path(dir_okay=False, path_type=Path))
@data_dir_option
def backup(destination: Path, data_dir: Path) -> None:
    """Copy the coordinator's database to DESTINATION (a new file), consistent while the server runs.

    It holds the organizations, users, token hashes, projects, dataviews and jobs; copying coordinator.sqlite3
    itself would miss what is still in its write-ahead log. To restore: stop the server, put the copy in place as
    <data-dir>/coordinator.sqlite3 (and remove coordinator.sqlite3-wal and -shm beside it), start it. Queued
    broker messages are not in it: they live only until their job ends."""
    source = ServerConfig(data_dir=data_dir).coordinator_db_path
    if _no_database(source):
        raise click.ClickException(f"no cape-server database in {data_dir}: is --data-dir (or CAPE_SERVER_DATA_DIR) "
                                   "the one `cape-server serve` uses?")
    if destination.exists():
        raise click.ClickException(f"{destination} exists; give a new file (a backup never overwrites)")
    if not destination.parent.is_dir():
        raise click.ClickException(f"{destination.parent} is not a directory; make it first, or give another path")
    os.umask(0o077)  # token hashes: private to this user, as in the data dir
    partial = destination.with_name(f".{destination.name}.partial")
    try:
        with contextlib.closing(sqlite3.connect(source)) as src, contextlib.closing(sqlite3.connect(partial)) as dst:
            src.backup(dst)  # SQLite's online backup: the WAL's committed pages included
            counts = {table: dst.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # noqa: S608 - fixed names
                      for table in ("organizations", "users", "jobs")}
        os.replace(partial, destination)
    except (OSError, sqlite3.Error) as exc:
        partial.unlink(missing_ok=True)
        raise click.ClickException(f"cannot back up {source} to {destination}: {exc}") from None
    admin_audit.record(data_dir, f"backed up the database (token hashes included) to {destination.resolve()}")
    click.echo(f"backed up {source} to {destination}: {counts['organizations']} organizations, {counts['users']} "
               f"users, {counts['jobs']} jobs")


@admin.command("list-orgs")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@data_dir_option
def list_orgs(as_json: bool, data_dir: Path) -> None:
    """List every organization."""
    found = _run(data_dir, identity.list_organizations)
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    print_table(found, [("LABEL", lambda o: o["label"]), ("NAME", lambda o: o["name"]), ("ID", lambda o: o["id"])],
                "no organizations yet: `cape-server admin create-org` makes the first")


@admin.command("list-users")
@click.argument("organization", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@data_dir_option
def list_users(organization: str | None, as_json: bool, data_dir: Path) -> None:
    """List every user (or ORGANIZATION's members) with their roles."""
    def action(conn: Any) -> list[dict[str, Any]]:
        org_id = identity.find_organization(conn, organization)["id"] if organization else None
        return identity.list_users(conn, org_id)

    found = _run(data_dir, action)
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    print_table(found, [("EMAIL", lambda u: u["email"]), ("ROLES", lambda u: [f"{o}: {r}" for o, r in
                                                                              u["roles"].items()]),
                        ("ID", lambda u: u["id"])], "no users")


@admin.command("list-tokens")
@click.option("--org", "organization", help="An organization's worker tokens.")
@click.option("--user", "email", callback=_optional_email, help="A user's tokens.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@data_dir_option
def list_tokens(organization: str | None, email: str | None, as_json: bool, data_dir: Path) -> None:
    """List an organization's worker tokens (--org) or a user's tokens (--user): ids and dates, never secrets."""
    if (organization is None) == (email is None):
        raise click.UsageError("give --org ORGANIZATION or --user EMAIL")

    def action(conn: Any) -> list[dict[str, Any]]:
        if organization is not None:
            return identity.list_tokens(conn, org_id=identity.find_organization(conn, organization)["id"])
        return identity.list_tokens(conn, user_id=_user_id(conn, email or ""))

    found = _run(data_dir, action)
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    print_table(found, [("ID", lambda t: t["id"]), ("DESCRIPTION", lambda t: t["description"]),
                        ("CREATED", lambda t: t["created_at"]), ("LAST USED", lambda t: t["last_used_at"]),
                        ("REVOKED", lambda t: t["revoked_at"])], "no tokens")


@admin.command("revoke-user-tokens")
@click.argument("email", callback=_email)
@data_dir_option
def revoke_user_tokens(email: str, data_dir: Path) -> None:
    """Revoke every token of a user (a lost or stolen laptop); `admin create-user-token` makes a new one."""
    revoked = _run(data_dir, lambda conn: identity.revoke_user_tokens(conn, _user_id(conn, email)))
    admin_audit.record(data_dir, f"revoked {len(revoked)} token(s) of {email}" +
                       (f": {', '.join(revoked)}" if revoked else ""))
    click.echo(f"revoked {len(revoked)} token(s) of {email}" + (f": {', '.join(revoked)}" if revoked else ""))


def _token_id(token: str) -> str:
    """A token's id: the part before its secret."""
    return token.split(",", 1)[0]


def _user_id(conn: Any, email: str) -> str:
    user = identity.user_by_email(conn, email)
    if user is None:
        raise click.ClickException(f"no user {email}; `cape-server admin list-users` lists them")
    return user["id"]
