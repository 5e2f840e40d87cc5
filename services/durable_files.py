"""Making a rename or an unlink durable: the directory holding it is fsynced (the file's own fsync does not
cover its name). Used by the worker's spool and the broker's message store."""
from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename or unlink inside it is durable.

    A folder already gone is not an error: its consumer took the file renamed into it, made that durable on its
    side and removed the emptied folder (the spool's `_remove_empty`), all before this fsync; nothing is left in it
    to keep.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
