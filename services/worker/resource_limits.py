"""What a failure caused by the worker's own limits (memory, processes, open files) tells its operator, the
open-files limit below which its supervisord does not start, and what jobs a memory limit leaves room for.

Such failures reached a job's error as "the worker's runner failed unexpectedly (OSError)", or `MemoryError`,
`RuntimeError`: nothing said the container was short of memory, and no one knew to give it more. The job's
error (every project member reads it) names the limit and what its operator does; the exception's own text (an
array's size, a path) stays in the worker's log.
"""
from __future__ import annotations

import errno
import resource

# What each limit's shortage is called, and what the worker's operator does about it.
MEMORY = ("ran out of memory", "gives the worker (its container) more memory (README, \"Memory and other limits\")")
THREADS = ("could not start a thread", "raises the worker's limit on processes and threads (docker run "
           "--pids-limit) or gives it more memory (README, \"Memory and other limits\")")
OPEN_FILES = ("ran out of open files", "raises the worker's open-files limit (docker run --ulimit nofile=)")


def shortage(exc: BaseException) -> tuple[str, str] | None:
    """(what ran short, what the operator does) when `exc` says the process hit one of its limits, else None."""
    if isinstance(exc, MemoryError):  # numpy's and Arrow's allocation failures are MemoryErrors too
        return MEMORY
    if isinstance(exc, OSError) and exc.errno == errno.ENOMEM:  # mmap, fork: "Cannot allocate memory"
        return MEMORY
    if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
        return OPEN_FILES
    if isinstance(exc, RuntimeError) and "can't start new thread" in str(exc):  # EAGAIN from pthread_create
        return THREADS
    return None


MIN_OPEN_FILES = 1024  # supervisord's `minfds` default: it refuses to start below it


def open_files_problem() -> str | None:
    """Why the open-files limit stops supervisord, or None (`run` refuses, `check` fails on it). It needs
    `MIN_OPEN_FILES` and raises its own soft limit up to the hard one; below that it refused in lines of its own that
    said the limit was 1024 (it was 64) and to lower `minfds` in a configuration file the image holds."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard >= MIN_OPEN_FILES:
        return None
    return (f"the open-files limit is {hard} (ulimit -n); the worker needs at least {MIN_OPEN_FILES}: raise it "
            f"(docker run --ulimit nofile={MIN_OPEN_FILES}:{MIN_OPEN_FILES}, systemd LimitNOFILE=)")


# Measured (README, "Memory and other limits"): an idle worker holds about 360 MB, and a job about 3.3 times its
# data in memory (rows x columns x 8 bytes) more at its peak (the x-owner's runner, from CSV).
IDLE_WORKER_BYTES = 400 * 10**6
JOB_BYTES_PER_DATA_BYTE = 3.3


def memory_limit_said(limit: int | None) -> tuple[bool, str]:
    """(enough, words) for the worker's memory limit (`memory_cgroup.memory_limit`; None: none of its own): below
    `IDLE_WORKER_BYTES` it cannot be run; else how much data in memory its jobs have room for at once."""
    if limit is None:
        return True, "memory: no limit of its own (the machine's)"
    mib = limit / 2**20
    if limit < IDLE_WORKER_BYTES:
        return False, (f"the worker's memory limit is {mib:.0f} MiB, less than an idle worker holds (about 360 MB) "
                       f"with room for a job: give it at least {IDLE_WORKER_BYTES * 1.3 / 2**20:.0f} MiB, and 3.3 times "
                       "each concurrent job's data in memory more (docker run --memory; README, \"Memory and other "
                       "limits\")")
    room = (limit - IDLE_WORKER_BYTES) / JOB_BYTES_PER_DATA_BYTE
    return True, (f"memory: limit {mib:.0f} MiB, room for about {room / 10**6:.0f} MB of job data in memory at "
                  "once (rows x columns x 8 bytes, all running jobs)")
