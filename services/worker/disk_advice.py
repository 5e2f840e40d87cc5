"""What an operator does about a write the disk refused: a full disk needs room, a read-only one or a denied
directory needs its permissions. "Make it writable" for a full volume sent operators to chmod a writable folder."""
from __future__ import annotations

import errno

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DENIED_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.ENOENT)  # or broken


def disk_advice(exc: OSError, where: str) -> str:
    """The fix for `exc`, a refused write into `where` (e.g. "CAPE_SPOOL_DIR"), in a few words."""
    if exc.errno in FULL_ERRNOS:
        return f"free space on the volume of {where}"
    if exc.errno in DENIED_ERRNOS:
        return f"make {where} writable by this worker"
    return f"free space on the volume of {where}, or make it writable"  # a file size limit, an I/O error: either
