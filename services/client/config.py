"""The user's client configuration: coordinator URL and token in a 0600 JSON file, overridden by the environment."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from services.client.errors import CapeError

DEFAULT_COORDINATOR = "http://127.0.0.1:8080"
TOKEN_ENV = "CAPE_TOKEN"
COORDINATOR_ENV = "CAPE_COORDINATOR"


@dataclass(frozen=True)
class ClientConfig:
    """Where to reach the coordinator and with which token (``None`` when unknown)."""

    coordinator: str
    token: str | None


def config_path() -> Path:
    """``$XDG_CONFIG_HOME/cape/config.json``, defaulting to ``~/.config/cape/config.json``."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "cape" / "config.json"


def load_config(endpoint: str | None = None, token: str | None = None) -> ClientConfig:
    """Resolve the configuration: explicit arguments, then CAPE_* variables, then the config file."""
    stored = _read_file(config_path())
    coordinator = endpoint or os.environ.get(COORDINATOR_ENV) or stored.get("coordinator") or DEFAULT_COORDINATOR
    chosen_token = token or os.environ.get(TOKEN_ENV) or stored.get("token") or None
    return ClientConfig(coordinator=coordinator.rstrip("/"), token=chosen_token)


def save_config(coordinator: str, token: str) -> Path:
    """Write the file atomically; it is created with mode 0600 (never readable by others, not even briefly)."""
    path = config_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump({"coordinator": coordinator.rstrip("/"), "token": token}, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _read_file(path: Path) -> dict[str, str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise CapeError(f"cannot read the config file {path}: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except ValueError:
        raise CapeError(f"the config file {path} is not valid JSON; run `cape login` again") from None
    if not isinstance(data, dict):
        raise CapeError(f"the config file {path} is not a JSON object; run `cape login` again")
    return {k: v for k, v in data.items() if isinstance(v, str)}
