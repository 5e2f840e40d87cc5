"""How the CLI prints: aligned tables for people, ``--json`` for scripts, and the shared context."""
from __future__ import annotations

import functools
import json
from typing import Any, Callable, Sequence

import click

from services.client.errors import ApiError
from services.client.sdk import Cape
from services.tables import cell_text, print_table  # noqa: F401 - print_table: the commands' import of it

ORG_FIELD = "field 'organization'"

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


class CliContext:
    """Builds the SDK client on first use, so `cape --help` needs no configuration."""

    def __init__(self) -> None:
        self._cape: Cape | None = None

    def cape(self) -> Cape:
        if self._cape is None:
            self._cape = Cape()
        return self._cape

    @property
    def env_token_overrides_login(self) -> bool:
        """Whether the client in use took CAPE_TOKEN over a different token saved by `cape login`."""
        return self._cape is not None and self._cape.env_token_overrides_login

    @property
    def env_coordinator_overrides_login(self) -> bool:
        """Whether the client in use took CAPE_COORDINATOR over a different coordinator saved by `cape login`."""
        return self._cape is not None and self._cape.env_coordinator_overrides_login


def org_option_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """For commands with --org: the server names the body's field 'organization', which the user gives as --org."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except ApiError as exc:
            if ORG_FIELD not in exc.message:
                raise
            raise ApiError(exc.status, exc.code, exc.message.replace(ORG_FIELD, "--org")) from None

    return run


pass_cli = click.make_pass_decorator(CliContext, ensure=True)


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True, default=_jsonable))


def print_tokens(found: list[dict[str, Any]], empty: str, in_use: str | None = None) -> None:
    """A table of tokens: ids, descriptions and dates (never a secret); `in_use` marks the token of this command."""
    print_table(found, [("ID", lambda t: t.get("id") + (" (this one)" if t.get("id") == in_use else "")),
                        ("DESCRIPTION", lambda t: t.get("description") or "-"),
                        ("CREATED", lambda t: t.get("created_at")), ("LAST USED", lambda t: t.get("last_used_at") or "-"),
                        ("REVOKED", lambda t: t.get("revoked_at") or "-")],
                empty=empty)


def print_fields(pairs: Sequence[tuple[str, Any]]) -> None:
    """``key: value`` lines, keys aligned."""
    width = max(len(k) for k, _ in pairs)
    for key, value in pairs:
        click.echo(f"{key + ':':<{width + 1}} {cell_text(value)}")


def org_label(ref: dict[str, Any] | None) -> str:
    if not ref:
        return "-"
    return ref.get("label") or ref.get("id") or "-"


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot print {type(value).__name__} as JSON")
