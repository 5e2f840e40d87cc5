"""Fixtures for the `cape` CLI and SDK tests.

- `cape_home` (function): an empty config home (XDG_CONFIG_HOME) and no CAPE_* variables; returns the config path.
- `cape_cli` (function): runs `cape ...` in-process with click's CliRunner; `cape_cli(*args, env={...})`.
- `unique_label` (function): `unique_label("acme")` -> "acme-1a2b3c", so tests never collide on a shared server.
- `shared_cape_server` (module): one real cape-server for a test module whose tests use `unique_label`.
- `cape_script` (function): runs the installed `cape` console script in a subprocess with the same env handling.
"""
from __future__ import annotations

import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import pytest
from click.testing import CliRunner

if TYPE_CHECKING:
    from tests.support.server import CapeServer

CAPE_VARS = ("CAPE_TOKEN", "CAPE_COORDINATOR")
SCRIPT_TIMEOUT_S = 60


@dataclass
class CliResult:
    """What a `cape` run left: exit code, stdout, stderr."""

    exit_code: int
    stdout: str
    stderr: str


@pytest.fixture
def cape_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the client at an empty config home; return where `cape login` writes its file."""
    home = tmp_path / "xdg-config"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home))
    for name in CAPE_VARS:
        monkeypatch.delenv(name, raising=False)
    return home / "cape" / "config.json"


@pytest.fixture
def cape_cli(cape_home: Path) -> Callable[..., CliResult]:
    """Run the CLI in-process; `env` adds variables for that run only (None removes one)."""
    from services.client.cli import cape

    def run(*args: str, env: dict[str, str | None] | None = None, input: str | None = None) -> CliResult:
        result = CliRunner().invoke(cape, list(args), env=env or {}, input=input, catch_exceptions=False)
        return CliResult(result.exit_code, result.stdout, result.stderr)

    return run


@pytest.fixture
def cape_script(cape_home: Path) -> Callable[..., CliResult]:
    """Run the real `cape` console script of the venv in a subprocess."""
    script = Path(sys.executable).with_name("cape")
    assert script.exists(), f"the `cape` console script is missing at {script}: pip install -e ."

    def run(*args: str, env: dict[str, str] | None = None, timeout: float = SCRIPT_TIMEOUT_S) -> CliResult:
        full_env = {**os.environ, **(env or {})}
        done = subprocess.run([str(script), *args], capture_output=True, text=True, env=full_env, timeout=timeout)
        return CliResult(done.returncode, done.stdout, done.stderr)

    return run


@pytest.fixture
def unique_label() -> Callable[[str], str]:
    """Labels unique per call, for organizations and projects on a server other tests share."""
    return lambda name: f"{name}-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def shared_cape_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator["CapeServer"]:
    """A cape-server shared by one test module (starting one per test costs seconds on this machine)."""
    from tests.support.server import CapeServer  # imported late: pytest loads it as a plugin itself

    server = CapeServer(tmp_path_factory.mktemp("shared-cape-server") / "data")
    yield server
    server.stop()


def one_error_line(stderr: str) -> str:
    """The single `error: ...` line a failing command prints (no traceback, nothing else)."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert lines[0].startswith("error: ")
    return lines[0]
