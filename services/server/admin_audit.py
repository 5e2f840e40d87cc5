"""The record of `cape-server admin` changes. They act on the database directly, outside the running server and
its `cape.audit` log, so each change is appended as one line to `<data-dir>/admin-audit.log` (private to the
server's user, fsynced), naming the operating-system user who ran it. Ids, labels and emails only: never a token's
secret."""
from __future__ import annotations

import datetime
import getpass
import os
from pathlib import Path

import click

AUDIT_FILE = "admin-audit.log"


def audit_path(data_dir: Path) -> Path:
    return data_dir / AUDIT_FILE


def record(data_dir: Path, action: str) -> None:
    """Append `<UTC time> <system user> (uid N): <action>`; a line that cannot be written is said on stderr (the
    change itself is made: the database committed it first)."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    line = f"{now} {_system_user()} (uid {os.getuid()}): {action}\n"
    try:
        fd = os.open(audit_path(data_dir), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        click.echo(f"warning: the change was made, but its line in {audit_path(data_dir)} could not be written "
                   f"({exc.strerror or exc}); note it by hand: {line.strip()}", err=True)


def _system_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container's uid without a name
        return "-"
