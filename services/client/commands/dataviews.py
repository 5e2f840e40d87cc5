"""`cape dataviews add|list|show|delete`."""
from __future__ import annotations

import click

from services.client.commands.output import (
    CliContext, json_option, org_label, org_option_errors, pass_cli, print_fields, print_json, print_table,
)
from services.client.errors import ApiError
from services.client.models import DataView
from services.client.schema import parse_schema_spec, schema_from_file, schema_from_uri

# How else to give a dataview's schema, in an error about a URI it cannot be read from.
CLI_SCHEMA_OPTIONS = "--schema NAME:TYPE,... or --schema-from-file PATH, a local CSV or Parquet file"


@click.group()
def dataviews() -> None:
    """Dataviews: pointers to an organization's datasets, with their schema."""


@dataviews.command("add")
@click.argument("project")
@click.argument("name")
@click.argument("uri")
@click.option("--schema-from-file", "--schema-from-csv", "schema_path", type=click.Path(dir_okay=False),
              help="Read the columns from this local CSV's header (types guessed from its first rows) or "
                   "Parquet file's schema.")
@click.option("--schema", "spec", metavar="NAME:TYPE,...",
              help="Columns, types number|integer|string (a column without :TYPE is a number); quote an entry "
                   "whose name holds a comma: '\"a,b:number\",c'.")
@click.option("--org", "organization", help="Your organization to own it, if more than one of yours may.")
@json_option
@pass_cli
@org_option_errors
def add(cli: CliContext, project: str, name: str, uri: str, schema_path: str | None, spec: str | None,
        organization: str | None, as_json: bool) -> None:
    """Register dataset URI (s3://, file://, path) as dataview NAME of PROJECT, owned by your organization.

    Without --schema or --schema-from-file (or its older name --schema-from-csv), URI itself must be a local CSV
    or Parquet file."""
    if schema_path and spec:
        raise click.UsageError("give --schema-from-file or --schema, not both")
    notes: list[str] = []
    if spec:
        schema = parse_schema_spec(spec)
    elif schema_path:
        schema = schema_from_file(schema_path, notes)
    else:  # read here, not by the SDK, so that a failure names the CLI's options
        schema = schema_from_uri(uri, name, CLI_SCHEMA_OPTIONS, notes)
    view = cli.cape().get_project(project).create_dataview(name, uri, schema=schema, organization=organization)
    _show(view, as_json, verb="Added")
    for note in notes:
        click.echo(f"note: {note}", err=True)


@dataviews.command("list")
@click.argument("project")
@json_option
@pass_cli
def list_dataviews(cli: CliContext, project: str, as_json: bool) -> None:
    """List the dataviews of PROJECT (URIs only of your own organization's)."""
    found = cli.cape().get_project(project).list_dataviews()
    if as_json:
        print_json([v.data for v in found])
        return
    print_table(
        [v.data for v in found],
        [("ID", lambda v: v.get("id")), ("NAME", lambda v: v.get("name")),
         ("OWNER", lambda v: org_label(v.get("owner"))),
         ("COLUMNS", lambda v: [c["name"] for c in v.get("schema") or []]), ("URI", lambda v: v.get("uri"))],
        empty="No dataviews.",
    )


@dataviews.command("show")
@click.argument("refs", nargs=-1, required=True, metavar="ID | PROJECT NAME")
@json_option
@pass_cli
def show(cli: CliContext, refs: tuple[str, ...], as_json: bool) -> None:
    """Show one dataview: by id, or by its project and name (as `add` names it)."""
    _show(_find(cli, refs, "show"), as_json)


@dataviews.command("delete")
@click.argument("refs", nargs=-1, required=True, metavar="ID | PROJECT NAME")
@pass_cli
def delete(cli: CliContext, refs: tuple[str, ...]) -> None:
    """Delete a dataview of your organization: by id, or by its project and name."""
    view = _find(cli, refs, "delete")
    view.delete()
    click.echo(f"Deleted dataview {view.name} ({view.id}).")


def _find(cli: CliContext, refs: tuple[str, ...], command: str) -> DataView:
    """The dataview named by ``ID`` or by ``PROJECT NAME``."""
    if len(refs) == 2:
        return cli.cape().get_project(refs[0]).get_dataview(refs[1])
    if len(refs) != 1:
        raise click.UsageError(f"give the dataview's id, or its project and name: cape dataviews {command} "
                               "PROJECT NAME")
    try:
        return cli.cape().get_dataview(refs[0])
    except ApiError as exc:
        if exc.status != 404:
            raise
        # Often a name given alone (as `add` takes them): say how to name it instead.
        raise ApiError(exc.status, exc.code, f"no dataview with id {refs[0]!r}; give its id, or the project and "
                                             f"name: cape dataviews {command} PROJECT NAME") from None


def _show(view: DataView, as_json: bool, verb: str | None = None) -> None:
    if as_json:
        print_json(view.data)
        return
    if verb:
        click.echo(f"{verb} dataview {view.name}.")
    print_fields([
        ("id", view.id),
        ("name", view.name),
        ("project", view.data.get("project")),
        ("owner", org_label(view.owner)),
        ("uri", view.uri),
        ("schema", [f"{c['name']}:{c['type']}" for c in view.schema]),
    ])
