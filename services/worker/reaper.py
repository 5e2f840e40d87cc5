"""Reaping orphans under `cape-worker run`, so the image is safe without an init (`docker run` without `--init`,
or Kubernetes, where `cape-worker run` is PID 1).

A process whose parent dies is re-parented to PID 1, or to the nearest ancestor marked a child subreaper (Linux,
`PR_SET_CHILD_SUBREAPER`). Nobody waits for it there unless PID 1 or that subreaper does: each one that ends stays
a zombie, holding a PID. `cape-worker run` marks itself a subreaper (so the same holds outside a container, which
is how the tests see it) and, while it waits for supervisord, reaps any other child that ends.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import subprocess
import time

PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


def become_subreaper() -> bool:
    """Ask Linux to re-parent orphaned descendants to this process; False where that is not available."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux, or no prctl: orphans go to PID 1 as usual
        return False


def wait_reaping(proc: subprocess.Popen) -> int:
    """Wait for `proc` to end, reaping every other child that ends meanwhile; `proc`'s exit code (as Popen's
    returncode: negative for a signal)."""
    while True:
        try:
            pid, status = os.wait()  # a signal handler that returns lets it resume (PEP 475)
        except ChildProcessError:  # `proc` was already reaped by one of Popen's own waits
            return proc.wait()
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode


def reap_remaining(seconds: float) -> bool:
    """For up to `seconds`, wait for the children still running: programs orphaned by a killed supervisord and
    re-parented to us, which stop within seconds (services/worker/program.py). True once none is left."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return True
        if pid == 0:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
