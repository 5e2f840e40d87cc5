"""This worker's memory cgroup (its container's): its memory limit, and how many of its processes the kernel's OOM
killer killed.

A program killed with SIGKILL leaves no line of its own, and the OOM killer is only its most common cause; the
`oom_kill` counter tells it for certain. It counts the processes of the cgroup that any OOM kill took, whichever
limit ran out (the container's, or the machine's): cgroup v2's `memory.events`, v1's `memory.oom_control` (kernels
since 4.13). The limit is v2's `memory.max`, v1's `memory.limit_in_bytes`. The cgroup is found from /proc/self/cgroup
and /proc/self/mountinfo, so inside a container (where its cgroup namespace shows it as the root, or where only its
own cgroup is mounted) and outside one alike. None where it cannot be read: the caller then says "most often" rather
than "certainly". A counter that went down belongs to a new container (a restart): nothing can be told from it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROC_SELF = Path("/proc/self")
NO_LIMIT_V1 = 1 << 62  # v1 writes its "no limit" as 9223372036854771712; no machine has 4 EiB


def oom_kill_count(proc: Path = PROC_SELF) -> int | None:
    """The OOM kills counted in this process's memory cgroup, or None where no counter can be read."""
    text = _cgroup_file(proc, "memory.events", "memory.oom_control")
    for line in (text or "").splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill" and value.strip().isdigit():
            return int(value)
    return None


def memory_limit(proc: Path = PROC_SELF) -> int | None:
    """This process's memory cgroup's limit in bytes; None for no limit, or none that can be read."""
    value = (_cgroup_file(proc, "memory.max", "memory.limit_in_bytes") or "").strip()
    # v2 says "max" for no limit, v1 the largest page-aligned 63-bit number
    return int(value) if value.isdigit() and int(value) < NO_LIMIT_V1 else None


def _cgroup_file(proc: Path, v2_name: str, v1_name: str) -> str | None:
    """The text of this process's memory cgroup's file of that name (v2's or v1's), or None."""
    directory = memory_cgroup_dir(proc)
    for name in (v2_name, v1_name) if directory is not None else ():
        try:
            return (directory / name).read_text()
        except OSError:
            continue
    return None


def memory_cgroup_dir(proc: Path = PROC_SELF) -> Path | None:
    """The directory of this process's memory cgroup (v1's memory hierarchy, else v2's unified one), or None."""
    try:
        memberships = (proc / "cgroup").read_text().splitlines()
        mounts = (proc / "mountinfo").read_text().splitlines()
    except OSError:
        return None
    paths = {}  # "memory" (v1) or "" (v2) -> the cgroup's path in that hierarchy
    for line in memberships:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "" or "memory" in controllers.split(","):
            paths["memory" if controllers else ""] = path
    for mount in _cgroup_mounts(mounts):
        path = paths.get("memory" if mount.v1_memory else "")
        if path is None or (not mount.v1_memory and "memory" in paths):
            continue  # v2 only where v1 has no memory hierarchy (a hybrid host's unified one has no memory)
        relative = os.path.relpath(path, mount.root)
        if relative.startswith(".."):  # a cgroup outside what is mounted here
            continue
        directory = Path(mount.point) / relative
        if directory.is_dir():
            return directory
    return None


@dataclass(frozen=True)
class _Mount:
    root: str  # the hierarchy's path mounted (a container without a cgroup namespace: its own cgroup)
    point: str
    v1_memory: bool


def _cgroup_mounts(lines: list[str]) -> list[_Mount]:
    """The cgroup mounts in mountinfo lines: `id parent dev root point options [tags] - fstype source superopts`."""
    mounts = []
    for line in lines:
        before, sep, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if not sep or len(fields) < 5 or len(tail) < 1:
            continue
        fstype, superopts = tail[0], (tail[2] if len(tail) > 2 else "")
        if fstype == "cgroup2" or (fstype == "cgroup" and "memory" in superopts.split(",")):
            mounts.append(_Mount(root=_unescape(fields[3]), point=_unescape(fields[4]), v1_memory=fstype == "cgroup"))
    return mounts


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def oom_kills_said(count: int, when: str) -> str:
    """`count` OOM kills counted `when` ("meanwhile", "since it started"), in the words every program uses."""
    return f"the kernel's OOM killer killed {count} of this worker's processes {when} (its memory cgroup's count)"


def oom_kills_since(before: int | None, now: int | None) -> int | None:
    """OOM kills counted between two readings; None when that cannot be told (unreadable, or a new container)."""
    if before is None or now is None or now < before:
        return None
    return now - before
