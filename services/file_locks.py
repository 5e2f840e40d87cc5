"""Advisory file locks (flock) that say which processes work on a directory: a worker's state and spool, a server's data dir."""
from __future__ import annotations

import fcntl
import os
from pathlib import Path


def lock_file(path: Path, *, shared: bool = False, wait: bool = False) -> int | None:
    """An open descriptor of `path` (made, mode 0600, if missing) holding a lock on it; None if another process
    holds a conflicting one and `wait` is off. The kernel drops the lock when the descriptor is closed or the
    process ends, however it ends; children do not inherit it (O_CLOEXEC)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd
