"""A runner that died while it worked on a job: how often before the job ends, and what is said of the cause.

A job whose runner died (SIGKILL: the kernel's OOM killer, most often) is replayed from the start at the next runner
start; `MAX_KILLS_PER_JOB` deaths end it in Error. The cause is said for certain where the worker's memory cgroup
counts its OOM kills (`memory_cgroup.py`), else as the most likely one. A runner that died with the whole worker
(`docker kill`, a power loss) is not counted: three of those ended a job saying it needed more memory.
"""
from __future__ import annotations

import os
from typing import Any

from services.worker.memory_cgroup import oom_kills_said
from services.worker.spool import RUN_ID_VARIABLE

# A job whose runner died this often while working on it (SIGKILL: the kernel's OOM killer, most often) ends in
# Error: each restart replayed it into the same death, under supervisord's restarts or Docker's, until its partners
# gave up after 5 times the job's timeout, saying "give such jobs a longer timeout". One kill is normal (README).
MAX_KILLS_PER_JOB = 3
MORE_MEMORY = ("its operator gives the worker (its container) more memory (README, \"Memory and other limits\"), "
               "then the job is submitted again")


def kill_cause(oom_kills: int | None) -> str:
    """Why the last runner died, as far as the memory cgroup's OOM kill counter tells (`memory_cgroup.py`)."""
    if oom_kills is None:
        return "most often for lack of memory (the kernel's OOM killer)"
    if oom_kills:
        return f"for lack of memory: {oom_kills_said(oom_kills, 'meanwhile')}"
    return ("not for lack of memory (its memory cgroup counted no OOM kill): a SIGKILL from outside the worker, "
            "or the machine stopped")


def killed_message(kills: dict[str, int]) -> str:
    """The job's error once its runner was killed `MAX_KILLS_PER_JOB` times (`Spool.kill_counts`)."""
    said = f"the worker's runner was killed {kills['killed']} times while it worked on this job"
    if kills["oom_killed"] == kills["killed"]:
        return (f"{said}, each time by the kernel's OOM killer (its memory cgroup's count): the job needs more memory "
                f"than the worker's container has; {MORE_MEMORY}")
    if kills["not_oom"] == kills["killed"]:
        return (f"{said}, never by the OOM killer (its memory cgroup counted none): something outside the worker "
                "sends its programs SIGKILL, or the machine stops; its operator finds what, then the job is "
                "submitted again")
    return (f"{said}, without an error of its own: most often by the kernel's OOM killer, the job needing more "
            f"memory than the worker's container has; {MORE_MEMORY}")


def died_with_the_whole_worker(mark: dict[str, Any]) -> bool:
    """Whether the last runner, whose mark (`Spool.runner_starts`) this is, ran under another `cape-worker run` than
    this one: it died with the whole worker, not alone (supervisord would have restarted it under the same run)."""
    now, then = os.environ.get(RUN_ID_VARIABLE), mark.get("run")
    return bool(now and then and now != then)
