"""`cape login`, `cape whoami` and `cape tokens` (your own user tokens)."""
from __future__ import annotations

import sys
from typing import Any

import click

from services.client.commands.output import CliContext, json_option, pass_cli, print_fields, print_json, print_tokens
from services.client.config import TOKEN_ENV, clean_token, load_config, save_config
from services.client.errors import BadArgument
from services.client.sdk import Cape
from services.connection_errors import plain_http_to_another_host


@click.command()
@click.option("--coordinator", metavar="URL",
              help="Coordinator URL (default: CAPE_COORDINATOR, then the saved one, then http://127.0.0.1:8080).")
@click.option("--token", metavar="TOKEN",
              help=f"Your user token (default: {TOKEN_ENV}, then the saved one; prompted if none).")
def login(coordinator: str | None, token: str | None) -> None:
    """Check a token with the coordinator and save both in the config file (mode 0600)."""
    config = load_config(coordinator, token, replacing=True)
    chosen = config.token
    if not chosen:
        # Piped in (`cape login < token.txt`): read the line; a prompt without a terminal only warns that it
        # cannot hide the input.
        typed = click.prompt("Token", hide_input=True) if sys.stdin.isatty() else sys.stdin.readline()
        chosen = clean_token(typed, "the token read") or ""
        if not chosen:
            raise BadArgument("no token given: pass --token TOKEN, set CAPE_TOKEN, or type it when asked")
    identity = Cape(endpoint=config.coordinator, token=chosen).login()
    if identity.get("kind") == "organization":
        # Valid, but every command but the worker's endpoints would then answer 403: refuse it, saving nothing.
        raise BadArgument("this is an organization token, for a worker's CAPE_TOKEN; log in with a user token "
                          "(`cape-server admin create-user`, or `cape orgs add-user` by an admin)")
    path = save_config(config.coordinator, chosen)
    click.echo(f"Logged in to {config.coordinator} as {describe(identity)}; saved in {path}")
    if plain_http_to_another_host(config.coordinator):
        click.echo(f"warning: {config.coordinator} is plain http:// to another machine: your token crosses the "
                   "network unencrypted with every command; use its https:// URL", err=True)


@click.command()
@json_option
@pass_cli
def whoami(cli: CliContext, as_json: bool) -> None:
    """Show who the current token belongs to."""
    cape = cli.cape()
    identity = cape.login()
    if as_json:
        print_json(identity)
        return
    if "memberships" in identity:
        roles = [f"{m['organization']['label']}: {m['role']}" for m in identity["memberships"]]
    else:  # a coordinator from before memberships were labelled: ask for the labels
        by_id = identity.get("roles") or {}
        labels = {o.id: o.label for o in cape.list_organizations()} if by_id and identity.get("kind") == "user" else {}
        roles = [f"{labels.get(org, org)}: {role}" for org, role in by_id.items()]
    print_fields([
        ("coordinator", cape.endpoint),
        ("kind", identity.get("kind")),
        ("identity", describe(identity)),
        ("roles", roles),
    ])


def describe(identity: dict[str, Any]) -> str:
    """``alice@example.org (user token)`` or ``org-a (organization token)``: never the token. "user token", not
    "user": a person's roles are per organization, and `user` is one of them."""
    if identity.get("kind") == "organization":
        org = identity.get("organization") or {}
        return f"{org.get('label') or org.get('id', '?')} (organization token)"
    user = identity.get("user") or {}
    return f"{user.get('email') or user.get('id', '?')} (user token)"


@click.group()
def tokens() -> None:
    """Your own user tokens (an organization's worker tokens are under `cape orgs`)."""


@tokens.command("list")
@json_option
@pass_cli
def list_tokens(cli: CliContext, as_json: bool) -> None:
    """List your own user tokens: ids, descriptions, when made, last used (to the minute) and revoked; never
    secrets. The one this command uses is marked; revoke another with `cape orgs revoke-token ID`."""
    cape = cli.cape()
    found = cape.list_user_tokens()
    if as_json:
        print_json(found)
        return
    print_tokens(found, empty="No user tokens.", in_use=cape.token_id)


@tokens.command("create")
@click.option("--description", help="What the token is for (e.g. a new laptop).")
@json_option
@pass_cli
def create_token(cli: CliContext, description: str | None, as_json: bool) -> None:
    """Make another user token for yourself, with the roles of the one in use; it is shown once. Before revoking
    the token you use (`cape orgs revoke-token ID`), make its successor here."""
    issued = cli.cape().create_user_token(description)
    if as_json:
        print_json(issued)
        return
    click.echo(f"user token {issued['id']}: {issued['token']}")
    click.echo("shown once: keep it (cape login --token ...); revoke it with `cape orgs revoke-token "
               f"{issued['id']}`", err=True)
