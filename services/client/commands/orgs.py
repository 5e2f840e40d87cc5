"""`cape orgs list|show|add-user|remove-user|set-role|create-token|tokens|revoke-token`."""
from __future__ import annotations

from typing import Any

import click

from services.client.commands.output import (
    CliContext, json_option, pass_cli, print_fields, print_json, print_table, print_tokens,
)
from services.client.errors import ApiError

ROLES = ("admin", "operator", "data_scientist", "user")


@click.group()
def orgs() -> None:
    """Organizations and their users and worker tokens."""


@orgs.command("list")
@json_option
@pass_cli
def list_orgs(cli: CliContext, as_json: bool) -> None:
    """List every organization (labels are public)."""
    found = cli.cape().list_organizations()
    if as_json:
        print_json([o.data for o in found])
        return
    print_table([o.data for o in found], [("ID", lambda o: o.get("id")), ("LABEL", lambda o: o.get("label")),
                                          ("NAME", lambda o: o.get("name"))], empty="No organizations.")


@orgs.command("show")
@click.argument("org")
@json_option
@pass_cli
def show(cli: CliContext, org: str, as_json: bool) -> None:
    """Show an organization; to its members, also its users and its worker (keys, last heartbeat, programs)."""
    organization = cli.cape().get_organization(org)
    try:
        users = organization.list_users()
        worker = organization.get_worker_status()
    except ApiError as exc:
        if exc.status != 403:
            raise
        users = worker = None  # not a member: the organization itself is still public
    if as_json:
        print_json({**organization.data, "users": users, "worker": worker})
        return
    print_fields([("id", organization.id), ("label", organization.label), ("name", organization.name)])
    if worker is not None:
        click.echo(worker_line(worker))
    if users is not None:
        click.echo("")
        print_table(users, [("USER", lambda u: u.get("email")), ("ROLE", lambda u: u.get("role")),
                            ("ID", lambda u: u.get("id"))], empty="No users.")


def worker_line(worker: dict[str, Any]) -> str:
    """One line on the organization's worker: keys, last heartbeat (and how long ago, by the server's clock), and
    its programs' states, which are only as recent as that heartbeat: an offline worker's are marked as such."""
    keys = "keys registered" if worker.get("registered") else "no keys registered"
    programs = ", ".join(f"{name} {state}" for name, state in (worker.get("programs") or {}).items())
    if not worker.get("last_seen"):
        return f"worker: {keys}; never heard from"
    ago = worker.get("seconds_since_seen")
    when = f"last heartbeat {worker['last_seen']}" + (f" ({ago:.0f} s ago)" if ago is not None else "")
    if worker.get("stopped_at"):
        return (f"worker: {keys}; STOPPED at {worker['stopped_at']} (it said so as it stopped)"
                + (f"; last reported: {programs}" if programs else ""))
    if worker.get("online") is False:
        return (f"worker: {keys}; {when}: OFFLINE (it heartbeats every 15 s)"
                + (f"; last reported: {programs}" if programs else ""))
    return f"worker: {keys}; {when}" + (f"; {programs}" if programs else "")


@orgs.command("add-user")
@click.argument("org")
@click.argument("email")
@click.option("--role", type=click.Choice(ROLES), default="user", show_default=True)
@click.option("--existing-account", is_flag=True,
              help="The email's account was made by another organization's admin (who got its first token): add it "
                   "all the same, having checked it is the person you mean.")
@json_option
@pass_cli
def add_user(cli: CliContext, org: str, email: str, role: str, existing_account: bool, as_json: bool) -> None:
    """Add a user to ORG (admin); prints a new user's token once (a user who exists already keeps their own)."""
    created = cli.cape().get_organization(org).add_user(email, role, existing_account=existing_account)
    if as_json:
        print_json(created)
        return
    if created.get("token") is None:
        existing = created.get("existing_account") or {}
        maker = {"organization": f"by organization {existing.get('created_by_organization')}'s admin",
                 "server_operator": "by the server's operator"}.get(existing.get("made_by"),
                                                                    "by a maker the coordinator did not record")
        click.echo(f"Added {created['user']['email']} to {org} as {role}. This email already had an account (made "
                   f"{existing.get('created_at', 'earlier')} {maker}): its own tokens now work in {org} too. Emails "
                   f"are not verified: if that is not the person you mean, `cape orgs remove-user {org} "
                   f"{created['user']['email']}`.")
        return
    click.echo(f"Added {email} to {org} as {role}. Their token (shown once, give it to them privately):")
    click.echo(created["token"])


@orgs.command("remove-user")
@click.argument("org")
@click.argument("user")
@json_option
@pass_cli
def remove_user(cli: CliContext, org: str, user: str, as_json: bool) -> None:
    """Remove USER (email or id) from ORG (admin); their tokens then carry no role in ORG."""
    organization = cli.cape().get_organization(org)
    organization.remove_user(user)
    if as_json:
        print_json({"organization": organization.label, "removed": user})
        return
    click.echo(f"Removed {user} from {organization.label}.")


@orgs.command("set-role")
@click.argument("org")
@click.argument("user")
@click.argument("role", type=click.Choice(ROLES))
@json_option
@pass_cli
def set_role(cli: CliContext, org: str, user: str, role: str, as_json: bool) -> None:
    """Change the role of USER (email or id) in ORG (admin)."""
    organization = cli.cape().get_organization(org)
    member = organization.set_role(user, role)
    if as_json:
        print_json(member)
        return
    click.echo(f"{member['email']} is now {member['role']} in {organization.label}.")


@orgs.command("create-token")
@click.argument("org")
@click.option("--description", help="What the token is for, e.g. the worker's host.")
@json_option
@pass_cli
def create_token(cli: CliContext, org: str, description: str | None, as_json: bool) -> None:
    """Create an organization token for ORG's worker (admin); prints it once."""
    created = cli.cape().get_organization(org).create_token(description)
    if as_json:
        print_json(created)
        return
    click.echo(f"Organization token {created['id']} for {org}'s worker (shown once; set it as CAPE_TOKEN):")
    click.echo(created["token"])


@orgs.command("tokens")
@click.argument("org")
@json_option
@pass_cli
def tokens(cli: CliContext, org: str, as_json: bool) -> None:
    """List ORG's worker tokens (admin): ids, descriptions, when made, last used (to the minute) and revoked; never
    secrets. The one its worker holds is the one used recently (the worker also logs its token's id)."""
    found = cli.cape().get_organization(org).list_tokens()
    if as_json:
        print_json(found)
        return
    print_tokens(found, empty="No organization tokens.")


@orgs.command("revoke-token")
@click.argument("token_id")
@pass_cli
def revoke_token(cli: CliContext, token_id: str) -> None:
    """Revoke a token at once: an organization token of an organization you administer (a worker's CAPE_TOKEN,
    say one that leaked), or your own user token. TOKEN_ID is the part before the comma; a whole token works too
    (only its id is sent)."""
    token_id = token_id.split(",", 1)[0].strip()
    if not token_id:
        raise click.BadParameter("give the token's id (the part before the comma)", param_hint="TOKEN_ID")
    cape = cli.cape()
    cape.revoke_token(token_id)
    click.echo(f"Revoked token {token_id}; whoever uses it (a worker's CAPE_TOKEN, a person's login) is refused from "
               "now on.")
    if token_id == cape.token_id:
        click.echo("warning: it was the token this command used: log in with another (`cape login --token ...`); "
                   "without one, the server's operator makes a new user token (`cape-server admin create-user-token "
                   "EMAIL`)", err=True)
