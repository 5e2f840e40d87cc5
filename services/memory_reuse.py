"""Keep freed heap memory in the process for reuse, instead of handing it back to the kernel at once.

The programs that move a job's data (the runner, the messenger, the broker) allocate and free blocks of a few MB
many times per job. glibc returns such blocks to the kernel as soon as they are freed (mmap'd chunks are unmapped;
the heap top is trimmed past 128 KB), so every next block faults its pages in again and the kernel zeroes them.
On a VM that is most of what moving 256 MB costs: the e2e bench measured the runner, messenger and broker using
10 to 25% less CPU with the thresholds below (./scripts/bench --e2e). The cost is that up to `TRIM_THRESHOLD`
of freed memory stays resident; it is reused by the next block, and `release_freed_memory` hands it back once a
program has been idle a while after its last job.

The process keeps one malloc arena: glibc gives threads that allocate at once arenas of their own, and
`malloc_trim` cannot shrink those arenas' heaps, so a runner that ran several jobs at once (a thread each) kept
hundreds of MB after it released (424 MB, against 140 MB fresh). Large blocks are allocated a few dozen times a
second at most, so the one arena's lock costs nothing measurable.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
from typing import Any

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value: blocks below it come from the reusable heap
TRIM_THRESHOLD = 512 << 20


def release_freed_memory() -> bool:
    """Hand the memory freed since the last job back to the kernel: Arrow's unused pool memory (reading a dataview),
    then glibc's (`malloc_trim`). For a program idle after a job: otherwise it keeps its largest job's peak for as
    long as it idles. False where there is no glibc."""
    arrow = sys.modules.get("pyarrow")  # only if the program read a dataview with it
    if arrow is not None:
        arrow.default_memory_pool().release_unused()
    trim = _glibc_function("malloc_trim")
    if trim is None:
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True


def _glibc_function(name: str) -> Any:
    """glibc's function `name`, or None where the C library has none (musl has neither mallopt nor malloc_trim)."""
    library = ctypes.util.find_library("c")
    if not library:
        return None
    try:
        return getattr(ctypes.CDLL(library), name)
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> bool:
    """Set glibc's malloc thresholds and its one arena (once per process, before any thread starts); False where
    there is no glibc."""
    mallopt = _glibc_function("mallopt")
    if mallopt is None:  # not glibc: nothing to tune
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = (mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
          and mallopt(_M_ARENA_MAX, 1) == 1)
    if not ok:
        log.debug("malloc thresholds not accepted; freed memory goes back to the kernel as usual")
    return ok
