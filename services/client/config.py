"""The user's client configuration: coordinator URL and token in a 0600 JSON file, overridden by the environment."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from services.client.errors import BadArgument, CapeError

DEFAULT_COORDINATOR = "http://127.0.0.1:8080"
TOKEN_ENV = "CAPE_TOKEN"
COORDINATOR_ENV = "CAPE_COORDINATOR"
# Paths under the coordinator's base URL: the client appends /v1/..., so a URL ending in one of them would double it.
API_SUFFIXES = ("/broker/v1", "/broker", "/v1")


@dataclass(frozen=True)
class ClientConfig:
    """Where to reach the coordinator and with which token (``None`` when unknown)."""

    coordinator: str
    token: str | None
    # The token is CAPE_TOKEN's and the config file holds another: errors about it should say so.
    env_token_overrides_login: bool = False
    # Likewise the coordinator: CAPE_COORDINATOR names another than the saved login's.
    env_coordinator_overrides_login: bool = False


def config_path() -> Path:
    """``$XDG_CONFIG_HOME/cape/config.json``, defaulting to ``~/.config/cape/config.json``."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "cape" / "config.json"


def load_config(endpoint: str | None = None, token: str | None = None, replacing: bool = False) -> ClientConfig:
    """Resolve the configuration: explicit arguments, then CAPE_* variables, then the config file.

    The file is needed only for what the arguments and variables leave open: a broken one is an error then, and
    never for `cape login` (`replacing`), which writes a new one."""
    for name, value in (("endpoint", endpoint), ("token", token)):
        if value is not None and not isinstance(value, str):
            raise BadArgument(f"{name} must be a string, not {type(value).__name__}")
    path = config_path()
    env_url, env_token = os.environ.get(COORDINATOR_ENV), os.environ.get(TOKEN_ENV)
    try:
        stored = _read_file(path)
    except CapeError:
        if not replacing and not ((endpoint or env_url) and (token or env_token)):
            raise
        stored = {}
    sources = ((endpoint, None), (env_url, COORDINATOR_ENV),
               (stored.get("coordinator"), f"the config file {path}"), (DEFAULT_COORDINATOR, None))
    coordinator, source = next((url, source) for url, source in sources if url)
    check_base_url(coordinator, source)
    token_sources = ((token, "the token given"), (env_token, TOKEN_ENV),
                     (stored.get("token"), f"the config file {path}"))
    chosen_token = next((clean_token(t, where) for t, where in token_sources if t and t.strip()), None)
    saved_token, saved_url = stored.get("token"), stored.get("coordinator")
    overrides = not token and bool(env_token) and bool(saved_token) and saved_token.strip() != env_token.strip()
    url_overrides = (not endpoint and bool(env_url) and bool(saved_url)
                     and saved_url.rstrip("/") != (env_url or "").rstrip("/"))
    return ClientConfig(coordinator=coordinator.rstrip("/"), token=chosen_token, env_token_overrides_login=overrides,
                        env_coordinator_overrides_login=url_overrides)


def clean_token(token: str | None, source: str) -> str | None:
    """The token without surrounding whitespace (a file's line break, a pasted space); one with whitespace, a
    control or a non-ASCII character inside cannot go into an HTTP header and is refused, never echoed."""
    if token is None or not token.strip():
        return None
    token = token.strip()
    if not token.isascii() or any(ch.isspace() or not ch.isprintable() for ch in token):
        raise BadArgument(f"{source}: the token holds a space, line break or other character a token never has; "
                          "copy it again, on one line (it looks like <id>,<secret>)")
    return token


def check_base_url(url: str, source: str | None = None) -> None:
    """Refuse an API path (``/v1``, ``/broker``, ``/broker/v1``) before any request: it would 404 as "no such
    endpoint". ``source`` (a variable or file) prefixes the message when the URL came from there."""
    try:
        parsed = urlparse(url)
    except ValueError:
        return  # malformed: the request says so in its own words
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        return  # likewise
    prefix = f"{source}: " if source else ""
    if "@" in parsed.netloc:  # requests would send these as Basic auth in place of the token: never echoed
        raise BadArgument(f"{prefix}the coordinator URL holds a user name or password (user:password@); the token is "
                          "the credential: give http(s)://HOST[:PORT]")
    suffix = next((s for s in API_SUFFIXES if parsed.path.rstrip("/").endswith(s)), None)
    if suffix is not None:
        base = url.rstrip("/")[:-len(suffix)]
        raise BadArgument(f"{prefix}give the coordinator's base URL, without {suffix}: {base}")


def save_config(coordinator: str, token: str) -> Path:
    """Write the file atomically; it is created with mode 0600 (never readable by others, not even briefly).
    BadArgument naming the file if it cannot be written."""
    path = config_path()
    try:
        _write_config(path, coordinator, token)
    except OSError as exc:
        raise BadArgument(f"cannot save the login in {path}: {exc.strerror or exc}; set XDG_CONFIG_HOME to a "
                          "directory you can write, or give CAPE_COORDINATOR and CAPE_TOKEN to each command "
                          "instead") from None
    return path


def _write_config(path: Path, coordinator: str, token: str) -> None:
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
        raise CapeError(f"the config file {path} is not valid JSON; run `cape login --coordinator URL --token "
                        "TOKEN`, which replaces it (or delete it)") from None
    if not isinstance(data, dict):
        raise CapeError(f"the config file {path} is not a JSON object; run `cape login --coordinator URL --token "
                        "TOKEN`, which replaces it (or delete it)")
    return {k: v for k, v in data.items() if isinstance(v, str)}
