"""The memory cgroup: found as a container shows it, its limit, and its OOM kill counter counting a real OOM kill."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from services.worker.memory_cgroup import memory_cgroup_dir, memory_limit, oom_kill_count, oom_kills_since
from services.worker.resource_limits import memory_limit_said
from services.worker.runner_deaths import MAX_KILLS_PER_JOB, kill_cause, killed_message
from tests.support.cgroups import child_memory_cgroup, join_code, oom_kill_in

V1_EVENTS = "oom_kill_disable 0\nunder_oom 0\noom_kill {}\n"
V2_EVENTS = "low 0\nhigh 0\nmax 12\noom 3\noom_kill {}\noom_group_kill 0\n"


def fake_proc(tmp_path: Path, cgroup: str, mounts: list[tuple[str, str, str, str]]) -> Path:
    """A /proc/self with `cgroup` as its cgroup file and mountinfo lines for (root, point, fstype, superopts)."""
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text(cgroup)
    lines = [f"{30 + i} 23 0:{40 + i} {root} {point} rw,relatime - {fstype} {fstype} {opts}"
             for i, (root, point, fstype, opts) in enumerate(mounts)]
    (proc / "mountinfo").write_text("\n".join(["22 1 0:21 / / rw - overlay overlay rw", *lines]) + "\n")
    return proc


def test_a_v2_container_with_its_own_cgroup_namespace_reads_memory_events(tmp_path):
    mount = tmp_path / "sys-fs-cgroup"
    mount.mkdir()
    (mount / "memory.events").write_text(V2_EVENTS.format(2))
    proc = fake_proc(tmp_path, "0::/\n", [("/", str(mount), "cgroup2", "rw,nsdelegate")])
    assert memory_cgroup_dir(proc) == mount
    assert oom_kill_count(proc) == 2
    assert memory_limit(proc) is None  # no memory.max
    (mount / "memory.max").write_text("max\n")
    assert memory_limit(proc) is None
    (mount / "memory.max").write_text("1073741824\n")
    assert memory_limit(proc) == 1 << 30


def test_a_v1_container_without_a_cgroup_namespace_finds_its_cgroup_mounted_as_the_root(tmp_path):
    mount = tmp_path / "memory"
    mount.mkdir()
    (mount / "memory.oom_control").write_text(V1_EVENTS.format(5))
    proc = fake_proc(tmp_path, "12:pids:/docker/abc\n4:memory:/docker/abc\n1:name=systemd:/docker/abc\n",
                     [("/docker/abc", str(tmp_path / "pids"), "cgroup", "rw,pids"),
                      ("/docker/abc", str(mount), "cgroup", "rw,memory")])
    assert oom_kill_count(proc) == 5
    (mount / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    assert memory_limit(proc) is None
    (mount / "memory.limit_in_bytes").write_text("536870912\n")
    assert memory_limit(proc) == 512 << 20


def test_a_hybrid_host_uses_v1_memory_not_the_unified_hierarchy_without_it(tmp_path):
    unified, memory = tmp_path / "unified", tmp_path / "memory"
    (unified / "svc").mkdir(parents=True)
    (memory / "svc").mkdir(parents=True)
    (unified / "svc" / "memory.events").write_text(V2_EVENTS.format(9))  # not read: no memory controller there
    (memory / "svc" / "memory.oom_control").write_text(V1_EVENTS.format(1))
    proc = fake_proc(tmp_path, "4:memory:/svc\n0::/svc\n",
                     [("/", str(unified), "cgroup2", "rw"), ("/", str(memory), "cgroup", "rw,memory")])
    assert memory_cgroup_dir(proc) == memory / "svc"
    assert oom_kill_count(proc) == 1


@pytest.mark.parametrize("cgroup, mounts", [
    ("4:memory:/elsewhere\n", [("/docker/abc", "{mount}", "cgroup", "rw,memory")]),  # not mounted here
    ("4:cpu:/svc\n", [("/", "{mount}", "cgroup", "rw,cpu")]),  # no memory controller
    ("0::/\n", [("/", "{mount}", "cgroup2", "rw")]),  # no counter in the directory
])
def test_no_counter_to_read_is_none_not_a_guess(tmp_path, cgroup, mounts):
    mount = tmp_path / "m"
    mount.mkdir()
    proc = fake_proc(tmp_path, cgroup, [(r, p.format(mount=mount), f, o) for r, p, f, o in mounts])
    assert oom_kill_count(proc) is None
    assert oom_kill_count(tmp_path / "no-proc") is None


def test_a_counter_that_went_down_belongs_to_a_new_container():
    assert oom_kills_since(3, 5) == 2
    assert oom_kills_since(3, 3) == 0
    assert oom_kills_since(3, 0) is None  # the container was restarted: nothing can be told
    assert oom_kills_since(None, 4) is None
    assert oom_kills_since(2, None) is None


def test_the_job_says_the_cause_only_as_far_as_the_counter_tells_it():
    all_oom = {"killed": MAX_KILLS_PER_JOB, "oom_killed": MAX_KILLS_PER_JOB, "not_oom": 0}
    assert killed_message(all_oom) == (
        f"the worker's runner was killed {MAX_KILLS_PER_JOB} times while it worked on this job, each time by the "
        "kernel's OOM killer (its memory cgroup's count): the job needs more memory than the worker's container "
        "has; its operator gives the worker (its container) more memory (README, \"Memory and other limits\"), then "
        "the job is submitted again")
    never = killed_message({"killed": 3, "oom_killed": 0, "not_oom": 3})
    assert "never by the OOM killer" in never and "more memory" not in never
    mixed = killed_message({"killed": 3, "oom_killed": 1, "not_oom": 0})
    assert "most often by the kernel's OOM killer" in mixed and "more memory" in mixed
    assert kill_cause(None) == "most often for lack of memory (the kernel's OOM killer)"
    assert kill_cause(2).startswith("for lack of memory: the kernel's OOM killer killed 2 of this worker's processes")
    assert kill_cause(0).startswith("not for lack of memory")


def test_a_real_oom_kill_in_the_workers_cgroup_is_counted_where_the_worker_reads_it():
    with child_memory_cgroup() as group:
        reader = [sys.executable, "-c", join_code(group) + "import time\n"
                  "from services.worker.memory_cgroup import oom_kill_count\n"
                  "print(oom_kill_count(), flush=True)\ninput()\nprint(oom_kill_count(), flush=True)\n"]
        proc = subprocess.Popen(reader, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "0"
            assert oom_kill_in(group) == -9
            out, _ = proc.communicate("\n", timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        assert out.strip() == "1"  # the reader itself was left alone


def test_a_memory_limit_is_said_with_the_room_it_leaves_jobs():
    assert memory_limit_said(None) == (True, "memory: no limit of its own (the machine's)")
    assert memory_limit_said(2 << 30) == (True, "memory: limit 2048 MiB, room for about 530 MB of job data in memory "
                                                "at once (rows x columns x 8 bytes, all running jobs)")
    enough, said = memory_limit_said(300 << 20)
    assert not enough
    assert said.startswith("the worker's memory limit is 300 MiB, less than an idle worker holds (about 360 MB) with "
                           "room for a job: give it at least 496 MiB")


def test_check_fails_on_a_memory_limit_too_small_for_a_worker_and_run_warns(tmp_path):
    """As `docker run --memory 300m`: `check` fails on it in its limits line; under 2 GiB it says the room left."""
    from tests.support.workers import worker_env

    env = worker_env(tmp_path, "w")
    with child_memory_cgroup() as group:
        def check() -> str:
            code = join_code(group) + "os.execvp('cape-worker', ['cape-worker', 'check'])"
            out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True,
                                 text=True, timeout=60).stdout
            return next(line for line in out.splitlines() if line[5:].startswith("limits "))

        (group / "memory.limit_in_bytes").write_text(str(300 << 20))
        assert check() == ("FAIL limits        the worker's memory limit is 300 MiB, less than an idle worker holds "
                           "(about 360 MB) with room for a job: give it at least 496 MiB, and 3.3 times each "
                           "concurrent job's data in memory more (docker run --memory; README, \"Memory and other "
                           "limits\")")
        deep = {**env, "CAPE_STATE_DIR": str(tmp_path / ("d" * 120))}  # `run` stops soon after, at the socket
        code = join_code(group) + "os.execvp('cape-worker', ['cape-worker', 'run'])"
        run = subprocess.run([sys.executable, "-c", code], env=deep, cwd=tmp_path, capture_output=True, text=True,
                             timeout=60)
        assert run.returncode == 2
        assert run.stderr.startswith("cape-worker: warning: the worker's memory limit is 300 MiB, less than an idle "
                                     "worker holds"), run.stderr
        (group / "memory.limit_in_bytes").write_text(str(2 << 30))
        assert check() == ("ok   limits        open files: at least 1024; memory: limit 2048 MiB, room for about "
                           "530 MB of job data in memory at once (rows x columns x 8 bytes, all running jobs)")
