"""The `cape` command line: thin over the SDK; every error is one `error: ...` line on stderr and exit 1."""
from __future__ import annotations

from typing import Any

import click

from services.client.commands.auth import login, tokens, whoami
from services.client.commands.dataviews import dataviews
from services.client.commands.jobs import jobs
from services.client.commands.orgs import orgs
from services.client.commands.output import CliContext
from services.client.commands.projects import projects
from services.client.errors import ApiError, CapeError
from services.client.simulate import simulate  # the engine's `cape simulate`, in its own module
from services.process_exit import run_then_exit

EXIT_ERROR = 1
# A token exported for a worker (or an old one) silently wins over `cape login`: say so when it is refused.
ENV_TOKEN_HINT = "(CAPE_TOKEN is set in the environment and overrides your saved login)"
ENV_COORDINATOR_HINT = "(CAPE_COORDINATOR is set in the environment and overrides your saved login)"


class CapeGroup(click.Group):
    """Turns the SDK's typed errors into one readable line instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        cli = ctx.ensure_object(CliContext)  # made here so that the subcommands share it and we can read it below
        try:
            return super().invoke(ctx)
        except CapeError as exc:
            refused = isinstance(exc, ApiError) and exc.status in (401, 403)
            hints = [hint for hint, applies in ((ENV_TOKEN_HINT, cli.env_token_overrides_login),
                                                (ENV_COORDINATOR_HINT, cli.env_coordinator_overrides_login))
                     if refused and applies]
            click.echo(" ".join([f"error: {exc}", *hints]), err=True)
            ctx.exit(EXIT_ERROR)


@click.group(cls=CapeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cape-workers", prog_name="cape")
def cape() -> None:
    """Cape: projects, dataviews and privacy-preserving jobs across organizations.

    The coordinator and token come from `cape login`, overridden by CAPE_COORDINATOR and CAPE_TOKEN.
    """


for command in (login, whoami, tokens, orgs, projects, dataviews, jobs, simulate):
    cape.add_command(command)


def main() -> None:
    """Console-script entry point (`cape simulate` reads files with Arrow, see services/process_exit.py)."""
    run_then_exit(cape, prog_name="cape")
