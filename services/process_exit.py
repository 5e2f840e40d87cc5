"""End a program that used Arrow without Python's interpreter finalization.

Arrow's native thread pools (CSV and Parquet reading) can abort the process while Python finalizes it: SIGABRT,
"terminate called without an active exception", after all the work is done and the exit code chosen (an open
upstream issue, apache/arrow#34314). It was seen here once in a few hundred runs of `cape simulate`. Flushing the
logs and standard streams and then leaving with os._exit skips that teardown and keeps the exit code.

The worker's other programs leave the same way for a second reason: finalization joins every executor thread, and
one blocked on the network (the messenger's download whose reply does not come) held a stop until supervisord's
SIGKILL. Each of their steps survives a kill, so nothing needs those threads to finish.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn


def exit_now(code: object, flush_logging: bool = True) -> NoReturn:
    """Flush logging handlers (watchtower's too, unless not `flush_logging`) and stdout/stderr, then end the process
    with `code`.

    `code` is as for SystemExit: None is 0, an int is the status, anything else is printed to stderr, status 1.
    """
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:
        print(code, file=sys.stderr)
        status = 1
    if flush_logging:
        logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing more can be said on it
            pass
    os._exit(status)


def run_then_exit(entry, *args, **kwargs) -> NoReturn:  # type: ignore[no-untyped-def]
    """Call `entry(*args, **kwargs)` (which may raise SystemExit, as click does) and exit with its status."""
    try:
        result = entry(*args, **kwargs)
    except SystemExit as exc:
        exit_now(exc.code)
    exit_now(result if isinstance(result, int) else 0)
