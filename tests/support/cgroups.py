"""A child memory cgroup (v1) of the tests' own, where the kernel's OOM killer acts as in a container with --memory.

Only where the tests may make one (root, a writable v1 memory hierarchy, as on the project's machine); the tests
that need it skip otherwise. Processes join it by writing their pid to its cgroup.procs (`join_code`).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from services.worker.memory_cgroup import memory_cgroup_dir


@contextmanager
def child_memory_cgroup() -> Iterator[Path]:
    """A new v1 memory cgroup under this process's own, removed after (its processes must be gone by then)."""
    parent = memory_cgroup_dir()
    if parent is None or not (parent / "memory.oom_control").exists() or not os.access(parent, os.W_OK):
        pytest.skip("needs a writable cgroup v1 memory hierarchy (root), as the project's machine has")
    group = parent / f"cape-test-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        yield group
    finally:
        deadline = time.monotonic() + 10  # a killed process leaves the group once it is reaped
        while True:
            try:
                group.rmdir()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def join_code(group: Path) -> str:
    """Python that moves its own process into `group`, to run before anything else with `python -c`."""
    return f"import os; open({str(group / 'cgroup.procs')!r}, 'w').write(str(os.getpid()))\n"


def oom_kill_in(group: Path, victim: int | None = None) -> int:
    """Make the kernel's OOM killer act in `group`: its limit is set 64 MiB above what it uses now, a process of
    its own allocates past that, and the limit is lifted again; that process's exit code (-9 once killed). The
    killer's first choice (oom_score_adj 1000) is that process, or the process `victim` of the group when given;
    the group's other processes, idle, are left alone."""
    headroom = 64 << 20
    limit = int((group / "memory.usage_in_bytes").read_text()) + headroom
    code = join_code(group)
    if victim is None:
        code += "open('/proc/self/oom_score_adj', 'w').write('1000')\n"
    else:
        Path(f"/proc/{victim}/oom_score_adj").write_text("1000")
    code += f"b = bytearray({4 * headroom})\nfor i in range(0, len(b), 4096): b[i] = 1\n"
    (group / "memory.limit_in_bytes").write_text(str(limit))
    try:
        return subprocess.run([sys.executable, "-c", code], timeout=60).returncode
    finally:
        (group / "memory.limit_in_bytes").write_text("-1")
