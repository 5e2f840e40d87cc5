"""The client's config file: where it lives, its mode, and the CAPE_* overrides."""
from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import pytest

from services.client.config import DEFAULT_COORDINATOR, config_path, load_config, save_config
from services.client.errors import CapeError
from services.client.sdk import Cape


def test_config_path_follows_xdg_config_home(cape_home: Path) -> None:
    assert config_path() == cape_home


def test_config_path_defaults_to_dot_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert config_path() == tmp_path / ".config" / "cape" / "config.json"


def test_saved_file_is_0600_even_with_a_permissive_umask(cape_home: Path) -> None:
    old = os.umask(0)
    try:
        path = save_config("http://127.0.0.1:1234/", "tid,c2VjcmV0")
    finally:
        os.umask(old)
    assert path == cape_home
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert json.loads(path.read_text()) == {"coordinator": "http://127.0.0.1:1234", "token": "tid,c2VjcmV0"}
    # No temporary file is left beside it.
    assert [p.name for p in path.parent.iterdir()] == ["config.json"]


def test_saving_again_replaces_the_file_and_keeps_the_mode(cape_home: Path) -> None:
    save_config("http://127.0.0.1:1", "first,AAAA")
    save_config("http://127.0.0.1:2", "second,BBBB")
    assert json.loads(cape_home.read_text())["token"] == "second,BBBB"
    assert stat.S_IMODE(cape_home.stat().st_mode) == 0o600


def test_environment_overrides_the_file(cape_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_config("http://127.0.0.1:1111", "file,AAAA")
    assert load_config() == load_config(None, None)
    assert (load_config().coordinator, load_config().token) == ("http://127.0.0.1:1111", "file,AAAA")
    monkeypatch.setenv("CAPE_TOKEN", "env,BBBB")
    monkeypatch.setenv("CAPE_COORDINATOR", "http://127.0.0.1:2222/")
    assert (load_config().coordinator, load_config().token) == ("http://127.0.0.1:2222", "env,BBBB")
    # Explicit arguments (SDK: Cape(endpoint=..., token=...)) win over both.
    explicit = load_config("http://127.0.0.1:3333", "arg,CCCC")
    assert (explicit.coordinator, explicit.token) == ("http://127.0.0.1:3333", "arg,CCCC")
    assert Cape(endpoint="http://127.0.0.1:3333").endpoint == "http://127.0.0.1:3333"


def test_without_file_or_environment_there_is_no_token(cape_home: Path) -> None:
    config = load_config()
    assert config.coordinator == DEFAULT_COORDINATOR
    assert config.token is None


def test_no_token_is_a_readable_cli_error(cape_cli) -> None:
    result = cape_cli("projects", "list")
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        "error: no token: run `cape login --coordinator URL --token TOKEN` or set CAPE_TOKEN"
    )


def test_a_corrupt_config_file_says_to_log_in_again(cape_home: Path, cape_cli) -> None:
    cape_home.parent.mkdir(parents=True)
    cape_home.write_text("{not json")
    again = "run `cape login --coordinator URL --token TOKEN`, which replaces it (or delete it)"
    with pytest.raises(CapeError, match=f"not valid JSON; {re.escape(again)}"):
        load_config()
    result = cape_cli("projects", "list")
    assert result.exit_code == 1
    assert again in result.stderr
    assert "Traceback" not in result.stderr
