"""`cape jobs submit|list|status|approve|reject|stop|watch|results`."""
from __future__ import annotations

import time
from itertools import islice
from typing import Any

import click

from services.client.columns import split_columns
from services.client.commands.output import (
    CliContext, json_option, org_label, org_option_errors, pass_cli, print_fields, print_json, print_table,
)
from services.tables import cell_text
from services.client.errors import BadArgument, CapeError, ResultsUnavailable
from services.client.models import TERMINAL_STATUSES, Job
from services.client.pages import PAGE_MAX
from services.client.tasks import DEFAULT_JOB_TIMEOUT_S, VerticallyPartitionedLinearRegression, dashes_for_underscores

LIST_LIMIT = 50  # `cape jobs list` shows the most recent this many (a busy project has thousands)
# `cape jobs watch` exit codes besides 0 (Completed).
EXIT_JOB_FAILED = 1
EXIT_WATCH_TIMEOUT = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a command ended by Ctrl-C
BUSY_STATES = ("pending", "started", "running")  # a seat's worker still has its role to play


@click.group()
def jobs() -> None:
    """Jobs: submit, approve or reject, follow, and read the results."""


@jobs.command("submit", context_settings={"token_normalize_func": dashes_for_underscores})
@click.argument("project")
@click.argument("job_type", metavar="TYPE", type=click.Choice(["linear-regression"]))
@click.option("--x", "x_spec", required=True, metavar="DATAVIEW[:COL,...]",
              help="The features: a dataview (name or id) and its columns (default: all); quote a column whose "
                   "name holds a comma: 'features:\"a,b\",c'.")
@click.option("--y", "y_spec", required=True, metavar="DATAVIEW[:COL]",
              help="The target: a dataview and its column (default: its only column).")
@click.option("--model-owner", required=True, metavar="ORG", help="Organization that receives weights and metrics.")
@click.option("--model-location", metavar="s3://BUCKET[/PREFIX]|file:///PATH",
              help="Where the model owner's worker writes the weights; that worker's CAPE_BUCKET, when set, "
                   "replaces it (without either, the job ends in Error). A file:// location is written only "
                   "through CAPE_BUCKET, never from a job. Only a member of the model owner may set it.")
@click.option("--timeout", type=click.IntRange(min=1), default=DEFAULT_JOB_TIMEOUT_S, show_default=True,
              help="Seconds the three workers have to take the job after approval (a worker takes it at once, "
                   "even when it runs other jobs); also how long a worker waits for any one message of the job, "
                   "longer while the sender says it is still preparing (queued, loading its data), up to 5 times "
                   "as long.")
@click.option("--org", "organization", help="Your organization to submit for, if more than one of yours may.")
@json_option
@pass_cli
@org_option_errors
def submit(cli: CliContext, project: str, job_type: str, x_spec: str, y_spec: str, model_owner: str,
           model_location: str | None, timeout: int, organization: str | None, as_json: bool) -> None:
    """Submit a job to PROJECT; it runs once every data owner has approved it."""
    found = cli.cape().get_project(project)
    x_name, x_columns = _split_spec(x_spec, "--x")
    y_name, y_columns = _split_spec(y_spec, "--y")
    if len(y_columns) > 1:
        raise click.UsageError("--y takes one column: DATAVIEW:COLUMN")
    x_view = found.get_dataview(x_name)
    y_view = found.get_dataview(y_name)
    if not y_columns and len(y_view.column_names) != 1:
        raise BadArgument(f"--y takes one column: dataview {y_name!r} has "
                          f"{', '.join(y_view.column_names) or 'no schema'}; give --y {y_name}:COLUMN")
    if not x_columns and not x_view.column_names:
        raise BadArgument(f"dataview {x_name!r} has no schema; name the x columns: --x {x_name}:COL1,COL2")
    task = VerticallyPartitionedLinearRegression(
        x_view[x_columns] if x_columns else x_view,
        y_view[y_columns] if y_columns else y_view,
        model_owner=model_owner,
        model_location=model_location,
        timeout=timeout,
    )
    job = found.submit_job(task, organization=organization)
    if as_json:
        print_json(job.data)
        return
    click.echo(f"Submitted job {job.id} ({job.status}); each data owner approves it with `cape jobs approve {job.id}`.")


@jobs.command("list")
@click.argument("project", required=False)
@click.option("--status", "statuses", multiple=True, metavar="STATUS",
              type=click.Choice(["NeedsApproval", "Approved", "Started", "Completed", "Error", "Stopped", "Rejected"]),
              help="Only jobs with this status (repeat for several).")
@click.option("--limit", type=click.IntRange(min=0), default=LIST_LIMIT, show_default=True,
              help="Only the most recent this many (0: every job).")
@json_option
@pass_cli
def list_jobs(cli: CliContext, project: str | None, statuses: tuple[str, ...], limit: int, as_json: bool) -> None:
    """List the most recent jobs of PROJECT, or without PROJECT your jobs in every project of your organizations;
    oldest first, so the newest is nearest the prompt."""
    # One more than shown: the note below is true only if some job was left out.
    wanted, status = limit + 1 if limit else None, list(statuses) or None
    if project is None:
        found = list(islice(cli.cape().iter_jobs(status, page_size=min(wanted or PAGE_MAX, PAGE_MAX)), wanted))
        shown = (found[:limit] if limit else found)[::-1]
    else:
        found = cli.cape().get_project(project).list_jobs(status=status, limit=wanted)
        shown = found[-limit:] if limit else found
    if len(shown) < len(found):  # on stderr: said to scripts reading --json too, without touching stdout
        click.echo(f"(the {limit} most recent; there are more: raise --limit, or --limit 0 for every job)", err=True)
    if as_json:
        print_json([j.data for j in shown])
        return
    where = [] if project is not None else [("PROJECT", lambda j: j.get("project_label") or j.get("project"))]
    print_table(
        [j.data for j in shown],
        [("ID", lambda j: j.get("id")), *where, ("TYPE", lambda j: j.get("type")),
         ("STATUS", lambda j: j.get("status")), ("MODEL OWNER", lambda j: _model_owner(j)),
         ("CREATED", lambda j: j.get("created_at")), ("DATA (X / Y)", _dataviews),
         ("ERROR", lambda j: _shortened(j.get("error")))],
        empty="No jobs.",
    )


LISTED_ERROR_CHARS = 60  # `cape jobs status JOB` shows the whole message


def _dataviews(job: dict[str, Any]) -> str:
    """The job's x and y dataviews by name: which of several jobs at once is which."""
    task = job.get("task") or {}
    names = [((task.get(part) or {}).get("dataview") or {}).get("name") or "?" for part in ("x", "y")]
    return " / ".join(names)


def _shortened(text: str | None) -> str | None:
    if not text or len(text) <= LISTED_ERROR_CHARS:
        return text
    return text[:LISTED_ERROR_CHARS - 3].rstrip() + "..."


@jobs.command("status")
@click.argument("job_id")
@json_option
@pass_cli
def status(cli: CliContext, job_id: str, as_json: bool) -> None:
    """Show a job's status, approvals and each party's progress."""
    job = cli.cape().get_job(job_id)
    if as_json:
        print_json(job.data)
        return
    _print_job(job)


DECIDE_FOR = "The data owner you decide for, if you may decide for both (admin or operator in each)."


@jobs.command("approve")
@click.argument("job_id")
@click.option("--org", "organization", help=DECIDE_FOR)
@json_option
@pass_cli
@org_option_errors
def approve(cli: CliContext, job_id: str, organization: str | None, as_json: bool) -> None:
    """Approve JOB for your organization's data (one organization per approval)."""
    job = cli.cape().get_job(job_id)
    before = dict(job.data.get("approvals") or {})
    job.approve(organization)
    if as_json:
        print_json(job.data)
        return
    waiting = job.pending_approvals()
    waiting_for = f" (waiting for {', '.join(waiting)})" if waiting and job.status == "NeedsApproval" else ""
    if dict(job.data.get("approvals") or {}) == before:
        click.echo(f"Job {job.id} was already approved for that organization; nothing changed. It is "
                   f"{job.status}{waiting_for}.")
        return
    click.echo(f"Approved job {job.id}; it is now {job.status}{waiting_for}.")


@jobs.command("reject")
@click.argument("job_id")
@click.option("--reason", help="Shown to the project's members.")
@click.option("--org", "organization", help=DECIDE_FOR)
@json_option
@pass_cli
@org_option_errors
def reject(cli: CliContext, job_id: str, reason: str | None, organization: str | None, as_json: bool) -> None:
    """Reject JOB: it will not run. Rejecting a job already Rejected changes nothing (exit 0)."""
    job = cli.cape().get_job(job_id)
    unchanged = job.status == "Rejected"
    if not unchanged:
        job.reject(reason, organization)
    _decided(job, "rejected", unchanged, as_json)


@jobs.command("stop")
@click.argument("job_id")
@json_option
@pass_cli
def stop(cli: CliContext, job_id: str, as_json: bool) -> None:
    """Stop JOB; the workers abandon it. Stopping a job already Stopped changes nothing (exit 0)."""
    job = cli.cape().get_job(job_id)
    unchanged = job.status == "Stopped"
    if not unchanged:
        job.stop()
    _decided(job, "stopped", unchanged, as_json)


def _decided(job: Job, verb: str, unchanged: bool, as_json: bool) -> None:
    """What a reject or stop says; a job that was in that state before is said to be unchanged (a script that
    stops a job "to be sure" must not fail because it had stopped already)."""
    if as_json:
        print_json(job.data)
    elif unchanged:
        click.echo(f"Job {job.id} was already {job.status}; nothing changed.")
    else:
        click.echo(f"{verb.capitalize()} job {job.id}; it is now {job.status}.")


@jobs.command("watch")
@click.argument("job_id")
@click.option("--timeout", type=click.FloatRange(min=0), default=3600.0, show_default=True,
              help="Give up after this many seconds (exit 3).")
@click.option("--interval", type=click.FloatRange(min=0.05), default=2.0, show_default=True,
              help="Seconds between polls.")
@pass_cli
def watch(cli: CliContext, job_id: str, timeout: float, interval: float) -> None:
    """Show progress per party until JOB ends: exit 0 if Completed, 1 if it ended otherwise, 3 on --timeout.

    Ctrl-C stops watching (exit 130), not the job."""
    job = cli.cape().get_job(job_id)
    started = time.monotonic()
    last: list[str] = []

    def show(update: Job) -> None:
        line = _progress_line(update)
        if line != (last[0] if last else None):
            click.echo(f"[{time.monotonic() - started:6.1f}s] {line}")
            last[:] = [line]

    outage: list[str] = []

    def problem(exc: CapeError | None) -> None:
        # A coordinator restarting is no reason to stop watching (nor to exit 1, which means the job failed).
        if exc is not None and not outage:
            click.echo(f"[{time.monotonic() - started:6.1f}s] {exc}; still watching until --timeout", err=True)
            outage.append(str(exc))
        elif exc is None and outage:
            click.echo(f"[{time.monotonic() - started:6.1f}s] the coordinator answers again", err=True)
            outage.clear()

    try:
        final = job.wait(timeout=timeout, interval=interval, on_update=show, on_problem=problem)
    except KeyboardInterrupt:
        # Not click's "Aborted!" and exit 1: that reads like the job failed, and exit 1 means just that here.
        click.echo(f"stopped watching; job {job.id} goes on (cape jobs watch {job.id} to follow it again)", err=True)
        click.get_current_context().exit(EXIT_INTERRUPTED)
    if final == "Completed":
        click.echo(f"Job {job.id} completed; the model owner reads the results with `cape jobs results {job.id}`.")
        return
    if final in ("Error", "Rejected", "Stopped"):
        reason = job.data.get("error")
        click.echo(f"error: job {job.id} ended {final}" + (f": {cell_text(reason)}" if reason else ""), err=True)
        click.get_current_context().exit(EXIT_JOB_FAILED)
    click.echo(f"error: job {job.id} is still {final} after {timeout:g} s; watch again or raise --timeout", err=True)
    click.get_current_context().exit(EXIT_WATCH_TIMEOUT)


@jobs.command("results")
@click.argument("job_id")
@json_option
@pass_cli
def results(cli: CliContext, job_id: str, as_json: bool) -> None:
    """Print JOB's weights (intercept first), metrics and where the model is; model owner only.

    The model location is where the model owner's worker wrote it, which its CAPE_BUCKET decides when set."""
    job = cli.cape().get_job(job_id)
    try:
        weights, metrics = job.get_results()
    except ResultsUnavailable as exc:
        # The metrics and the location come from the coordinator: show them, and why the weights file could not
        # be read here (the model owner's bucket is often on another machine, or needs credentials this one lacks).
        raw = job.get_raw_results()
        metrics = dict(raw.get("metrics") or {})
        if as_json:
            print_json({"job": job.id, "weights": None, "names": None, "metrics": metrics,
                        "model_location": raw.get("model_location"), "weights_error": str(exc)})
        else:
            print_fields([*_metric_fields(metrics), ("model location", raw.get("model_location"))])
        raise ResultsUnavailable(f"the weights were not read: {exc}") from None
    names = ["intercept", *_x_columns(job)]
    if len(names) != len(weights):
        names = ["intercept", *(f"w{i}" for i in range(1, len(weights)))]
    if as_json:
        print_json({"job": job.id, "weights": weights.tolist(), "names": names, "metrics": metrics,
                    "model_location": job.model_location})
        return
    print_table([{"name": n, "weight": float(w)} for n, w in zip(names, weights)],
                [("TERM", lambda r: r["name"]), ("WEIGHT", lambda r: repr(r["weight"]))], empty="No weights.")
    click.echo("")
    print_fields([*_metric_fields(metrics), ("model location", job.model_location)])


def _metric_fields(metrics: dict[str, Any]) -> list[tuple[str, Any]]:
    """Metrics in full, as the weights are (six digits showed an r^2 of 0.9999996 as 1)."""
    return [(name, repr(value) if isinstance(value, float) else value) for name, value in sorted(metrics.items())]


def _split_spec(spec: str, option: str) -> tuple[str, list[str]]:
    """``name:a,b`` -> ("name", ["a", "b"]); ``name`` -> ("name", []). A column whose name holds a comma is quoted,
    as in a CSV header: ``name:"a,b",c``."""
    name, colon, columns = spec.partition(":")
    if not name.strip():
        raise BadArgument(f"{option} needs a dataview name or id before the columns: DATAVIEW[:COL,...]")
    selected = split_columns(columns, f"{option} {spec!r}") if colon else []
    if any(not c for c in selected):  # a missing name (an unset shell variable?) would be a column left out
        raise BadArgument(f"{option} {spec!r} has an empty column name; give DATAVIEW:COL1,COL2 (or DATAVIEW alone "
                          "for its schema's columns)")
    return name.strip(), selected


def _x_columns(job: Job) -> list[str]:
    task = job.data.get("task") or {}
    return list((task.get("x") or {}).get("columns") or [])


def _model_owner(job: dict[str, Any]) -> str:
    owner = job.get("model_owner") or (job.get("task") or {}).get("model_owner")
    return org_label(owner) if isinstance(owner, dict) else (owner or "-")


def _side(job: dict[str, Any], side: str, key: str) -> str:
    """``dataview: col, col`` for one side of the task."""
    part = (job.get("task") or {}).get(side) or {}
    view = part.get("dataview")
    name = view.get("name") or view.get("id") if isinstance(view, dict) else view
    columns = part.get(key)
    columns = ", ".join(columns) if isinstance(columns, list) else columns
    return f"{name or '-'}: {columns or '-'}"


def _submitter(job: dict[str, Any]) -> str:
    by = job.get("submitted_by") or {}
    org = by.get("organization")
    return f"{by.get('email') or by.get('id') or '-'}" + (f" ({org_label(org)})" if org else "")


def _progress_line(job: Job) -> str:
    parts = []
    waiting = job.pending_approvals() if job.status == "NeedsApproval" else []
    for seat, party in job.parties.items():
        progress = party.get("progress")
        percent = f" {float(progress) * 100:.0f}%" if isinstance(progress, (int, float)) else ""
        message = f" ({cell_text(party['message'])})" if party.get("message") else ""  # another org's worker's text
        state = party.get("state") or "waiting"
        # A seat that still has work while its worker is silent is why a job waits: say so, not only at timeout.
        offline = (" [worker offline]" if party.get("worker_online") is False and state in BUSY_STATES
                   and job.status not in TERMINAL_STATUSES else "")
        parts.append(f"{seat}={org_label(party.get('organization'))}:{state}{percent}{message}{offline}")
    approvals = f"  (approval waits for {', '.join(waiting)})" if waiting else ""
    return f"{job.status:<13} " + "  ".join(parts) + approvals


def _model_location(data: dict[str, Any]) -> str:
    """Where the model goes, as the caller may know it: the model owner's members see where it was stored."""
    task = data.get("task") or {}
    if task.get("model_location_shown") is False:
        return "the model owner's to know (shown to its members)"
    if data.get("model_stored_at"):
        return f"stored at {data['model_stored_at']}"
    if task.get("model_location"):
        return f"{task['model_location']} (the model owner's CAPE_BUCKET replaces it when set)"
    return "not given: the model owner's worker writes to its CAPE_BUCKET"


def _print_job(job: Job) -> None:
    data = job.data
    print_fields([
        ("id", job.id),
        ("type", data.get("type")),
        ("status", job.status),
        ("error", data.get("error")),
        ("x", _side(data, "x", "columns")),
        ("y", _side(data, "y", "column")),
        ("model owner", _model_owner(data)),
        ("model location", _model_location(data)),
        ("outputs to", data.get("outputs_to")),
        # 5: the workers' LIMIT_TIMEOUTS (services/worker/partner_wait.py; the client does not import the worker)
        ("timeout", f"{(data.get('task') or {}).get('timeout')} s (for the three workers to take the job after "
                    "approval, and for each message between them: longer while its sender says it is still "
                    "preparing, up to 5 times)"),
        ("submitted by", _submitter(data)),
        ("approvals", [f"{org}: {state}" for org, state in (data.get("approvals") or {}).items()]),
        ("created", data.get("created_at")),
        ("updated", data.get("updated_at")),
    ])
    click.echo("")
    print_table(
        [{"seat": seat, **party} for seat, party in job.parties.items()],
        [("SEAT", lambda p: p["seat"]), ("ORGANIZATION", lambda p: org_label(p.get("organization"))),
         ("STATE", lambda p: p.get("state")),
         ("PROGRESS", lambda p: f"{float(p['progress']) * 100:.0f}%"
          if isinstance(p.get("progress"), (int, float)) else None),
         ("WORKER", lambda p: {True: "online", False: "offline"}.get(p.get("worker_online"), "-")),
         ("MESSAGE", lambda p: p.get("message"))],
        empty="No parties.",
    )
