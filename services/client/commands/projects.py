"""`cape projects create|list|show|add-org|join|remove-org|set-helper|delete`."""
from __future__ import annotations

import click

from services.client.commands.output import (
    CliContext, json_option, org_label, org_option_errors, pass_cli, print_fields, print_json, print_table,
)
from services.client.errors import BadArgument, NotAllowed
from services.client.models import Project
from services.client.sdk import Cape

# Roles of the owner organization that may delete a project (services/CONTRACTS.md, the roles table).
MANAGE_PROJECTS = frozenset({"admin", "data_scientist"})


@click.group()
def projects() -> None:
    """Projects: member organizations, helper, dataviews and jobs."""


@projects.command("create")
@click.argument("label")
@click.option("--name", help="A display name.")
@click.option("--description")
@click.option("--org", "organization", help="Your organization to own it, if more than one of yours may.")
@json_option
@pass_cli
@org_option_errors
def create(cli: CliContext, label: str, name: str | None, description: str | None, organization: str | None,
           as_json: bool) -> None:
    """Create a project owned by your organization."""
    project = cli.cape().create_project(label, name=name, description=description, organization=organization)
    _show(project, as_json, verb="Created")


@projects.command("list")
@json_option
@pass_cli
def list_projects(cli: CliContext, as_json: bool) -> None:
    """List the projects your organizations are members of."""
    found = cli.cape().list_projects()
    if as_json:
        print_json([p.data for p in found])
        return
    print_table(
        [p.data for p in found],
        [("ID", lambda p: p.get("id")), ("LABEL", lambda p: p.get("label")), ("NAME", lambda p: p.get("name")),
         ("ORGANIZATIONS", lambda p: [org_label(o) for o in p.get("organizations") or []]),
         ("HELPER", lambda p: org_label(p.get("helper")))],
        empty="No projects.",
    )


@projects.command("show")
@click.argument("project")
@json_option
@pass_cli
def show(cli: CliContext, project: str, as_json: bool) -> None:
    """Show a project (by label or id)."""
    _show(cli.cape().get_project(project), as_json)


@projects.command("add-org")
@click.argument("project")
@click.argument("org")
@json_option
@pass_cli
def add_org(cli: CliContext, project: str, org: str, as_json: bool) -> None:
    """Add organization ORG (label or id) to PROJECT. Its worker takes a job's third seat (helper, or a model owner
    that owns none of the job's data) only once ORG has joined (`cape projects join`)."""
    updated = cli.cape().get_project(project).add_org(org)
    _show(updated, as_json, verb="Updated")
    _say_if_not_joined(updated, org, as_json)


@projects.command("join")
@click.argument("project")
@click.argument("org")
@json_option
@pass_cli
def join(cli: CliContext, project: str, org: str, as_json: bool) -> None:
    """Agree, for your organization ORG (as its admin or operator), that its worker takes a job's third seat in
    PROJECT: as the helper, or as a model owner that owns none of the job's data (storing the model in its bucket).
    Jobs that need it are refused until it has joined."""
    _show(cli.cape().get_project(project).join(org), as_json, verb="Joined")


@projects.command("remove-org")
@click.argument("project")
@click.argument("org")
@pass_cli
def remove_org(cli: CliContext, project: str, org: str) -> None:
    """Take organization ORG out of PROJECT: ORG leaves (as its admin or operator), or the owner organization (its
    admin or data_scientist) removes it. Its dataviews in PROJECT go with it, and it stops being the helper; refused
    for the owner organization and while a job that has not ended gives ORG a seat."""
    found = cli.cape().get_project(project)
    going = [d.name for d in found.list_dataviews() if org in (d.data["owner"].get("label"), d.data["owner"].get("id"))]
    found.remove_org(org)
    went = f"; its dataviews there went with it: {', '.join(going)}" if going else ""
    click.echo(f"Organization {org} is no longer in project {found.label}{went}.")


@projects.command("set-helper")
@click.argument("project")
@click.argument("org", required=False)
@click.option("--none", "clear", is_flag=True, help="Remove the helper.")
@json_option
@pass_cli
def set_helper(cli: CliContext, project: str, org: str | None, clear: bool, as_json: bool) -> None:
    """Name ORG as the helper whose worker takes the third seat when the model owner is a data owner."""
    if bool(org) == clear:
        raise click.UsageError("give either ORG or --none")
    updated = cli.cape().get_project(project).set_helper(None if clear else org)
    _show(updated, as_json, verb="Updated")
    if org:
        _say_if_not_joined(updated, org, as_json)


@projects.command("delete")
@click.argument("project")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_cli
def delete(cli: CliContext, project: str, yes: bool) -> None:
    """Delete PROJECT with its dataviews and jobs (an admin or data_scientist of its owner organization)."""
    cape = cli.cape()
    found = cape.get_project(project)
    if not yes:
        _check_can_delete(cape, found)  # not after the user has said yes; the server still decides
        try:
            confirmed = click.confirm(f"Delete project {found.label} ({found.id})?")
        except click.Abort:  # end of input: nobody answered (no terminal, say); click would print "Aborted!"
            raise BadArgument(f"deleting project {found.label} needs confirmation and no answer came; answer y, "
                              "or add --yes") from None
        if not confirmed:
            click.echo("Not deleted.", err=True)
            click.get_current_context().exit(1)
    found.delete()
    click.echo(f"Deleted project {found.label} ({found.id}).")


def _check_can_delete(cape: Cape, project: Project) -> None:
    """Refuse, in the server's words, what the caller's roles in the owner organization do not allow."""
    owner = project.data.get("owner") or {}
    owner_id = owner.get("id") if isinstance(owner, dict) else owner
    if not owner_id:
        return  # nothing to check against: let the server decide
    role = (cape.login().get("roles") or {}).get(owner_id)
    if role not in MANAGE_PROJECTS:
        have = f"your role there is {role}" if role else "you are not a member of that organization"
        raise NotAllowed(f"to delete a project (owner organization) you need the role "
                         f"{' or '.join(sorted(MANAGE_PROJECTS))} in the organization ({have})")


def _say_if_not_joined(project: Project, org: str, as_json: bool) -> None:
    """On stderr: ORG's worker takes no third seat until ORG joins (its admin or operator), and how. Only the third
    seat: a data owner approves each job that uses its data, and need not join."""
    member = next((o for o in project.organizations if org in (o.get("label"), o.get("id"))), None)
    if member is not None and member.get("joined") is False and not as_json:
        click.echo(f"{org_label(member)} has not joined {project.label}: its worker takes no third seat in its jobs "
                   "(the helper's, or a model owner's that owns none of the job's data) until one of its admins or "
                   f"operators runs `cape projects join {project.label} {org_label(member)}` (a data owner need not "
                   "join).", err=True)


def _show(project: Project, as_json: bool, verb: str | None = None) -> None:
    if as_json:
        print_json(project.data)
        return
    if verb:
        click.echo(f"{verb} project {project.label}.")
    data = project.data
    print_fields([
        ("id", project.id),
        ("label", project.label),
        ("name", project.name),
        ("description", project.description),
        ("owner", org_label(data.get("owner")) if isinstance(data.get("owner"), dict) else data.get("owner")),
        ("organizations", [org_label(o) + ("" if o.get("joined", True) else " (not joined)")
                           for o in project.organizations]),
        ("helper", org_label(project.helper)),
        ("created", data.get("created_at")),
    ])
