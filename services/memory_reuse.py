"""Keep freed heap memory in the process for reuse, instead of handing it back to the kernel at once.

The programs that move a job's data (the runner, the messenger, the broker) allocate and free blocks of a few MB
many times per job. glibc returns such blocks to the kernel as soon as they are freed (mmap'd chunks are unmapped;
the heap top is trimmed past 128 KB), so every next block faults its pages in again and the kernel zeroes them.
On a VM that is most of what moving 256 MB costs: the e2e bench measured the runner, messenger and broker using
10 to 25% less CPU with the thresholds below (./scripts/bench --e2e). The cost is that up to `TRIM_THRESHOLD`
of freed memory stays resident; it is reused by the next block.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value: blocks below it come from the reusable heap
TRIM_THRESHOLD = 512 << 20


def keep_freed_memory() -> bool:
    """Set glibc's malloc thresholds (once per process, before the work starts); False where there is no glibc."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt): nothing to tune
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        log.debug("malloc thresholds not accepted; freed memory goes back to the kernel as usual")
    return ok
