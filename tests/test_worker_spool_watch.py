"""The spool watch: programs sleep until another program hands them a file, on this machine's real inotify."""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest

from services.worker import spool_watch
from services.worker.spool import Spool, atomic_write_bytes, atomic_writer
from services.worker.spool_watch import SpoolWatch

LONG = 30.0  # a poll far longer than any wait below: a wait that ends early was woken by the file system


@pytest.fixture
def spool(tmp_path: Path):
    spool = Spool(tmp_path / "spool")
    assert spool.watch("outbox", "jobs")
    yield spool
    spool.changes.close()


def _write_soon(action, delay: float = 0.05) -> threading.Timer:
    timer = threading.Timer(delay, action)
    timer.start()
    return timer


def _timed_wait(watch: SpoolWatch, seen: int, poll: float = LONG, at_most: float | None = None) -> tuple[bool, float]:
    started = time.monotonic()
    changed = watch.wait(seen, poll, at_most=at_most)
    return changed, time.monotonic() - started


def test_a_file_renamed_into_a_new_job_folder_wakes_the_waiter_at_once(spool: Spool):
    for k in range(5):
        seen = spool.changes.generation
        _write_soon(lambda: atomic_write_bytes(spool.outbox_path(f"job{k}", "x_owner", "x_owner.m"), b"sealed"))
        changed, waited = _timed_wait(spool.changes, seen)
        assert changed and waited < 1.0, f"job{k}: woken after {waited:.2f} s"
    assert spool.changes.watching


def test_a_file_linked_into_place_wakes_the_waiter(spool: Spool):
    # The first-writer-wins hand-offs (inbox, outbox) appear by link(), not rename().
    seen = spool.changes.generation

    def write() -> None:
        with atomic_writer(spool.root / "jobs" / "job1" / "done.json", overwrite=False) as out:
            out.write(b"{}")

    _write_soon(write)
    changed, waited = _timed_wait(spool.changes, seen)
    assert changed and waited < 1.0


def test_a_file_that_landed_before_the_wait_is_not_missed(spool: Spool):
    seen = spool.changes.generation  # taken before looking for work, as the programs do
    atomic_write_bytes(spool.root / "jobs" / "job1" / "spec.json", b"{}")
    deadline = time.monotonic() + 2.0
    while spool.changes.generation == seen and time.monotonic() < deadline:
        time.sleep(0.01)
    changed, waited = _timed_wait(spool.changes, seen)
    assert changed and waited < 0.05


def test_temporary_files_and_other_programs_folders_do_not_wake_it(spool: Spool):
    seen = spool.changes.generation
    (spool.root / "outbox" / "job1").mkdir()
    (spool.root / "outbox" / "job1" / ".x_owner.m.0a1b2c.tmp").write_bytes(b"half a message")  # a writer at work
    atomic_write_bytes(spool.root / "inbox" / "job1" / "x_owner.m.msg", b"not watched by this program")
    atomic_write_bytes(spool.root / "results" / "job1" / "result.json", b"{}")
    changed, waited = _timed_wait(spool.changes, seen, at_most=0.5)
    assert not changed and waited >= 0.45
    assert spool.changes.generation == seen


def test_with_a_watch_an_idle_wait_lasts_the_watched_poll_not_the_short_one(spool: Spool):
    changed, waited = _timed_wait(spool.changes, spool.changes.generation, poll=0.01)
    assert not changed
    assert spool_watch.WATCHED_POLL_SECONDS - 0.05 <= waited < spool_watch.WATCHED_POLL_SECONDS + 1.0


def test_without_a_watch_a_wait_is_the_callers_short_poll(tmp_path: Path):
    watch = Spool(tmp_path / "spool").changes  # never started: the unit tests' and a refused watch's case
    assert not watch.watching
    changed, waited = _timed_wait(watch, watch.generation, poll=0.05)
    assert not changed and 0.04 <= waited < 0.5


def test_wake_ends_a_wait_and_close_ends_every_wait_now_and_later(tmp_path: Path):
    watch = SpoolWatch()
    assert watch.start(tmp_path, ["outbox"])
    seen = watch.generation
    _write_soon(watch.wake)
    changed, waited = _timed_wait(watch, seen)
    assert changed and waited < 1.0

    results: list[bool] = []
    waiters = [threading.Thread(target=lambda: results.append(watch.wait(watch.generation, LONG))) for _ in range(3)]
    for thread in waiters:
        thread.start()
    time.sleep(0.1)
    watch.close()
    for thread in waiters:
        thread.join(timeout=2.0)
    assert results == [True, True, True]
    assert not watch.watching
    changed, waited = _timed_wait(watch, watch.generation)
    assert changed and waited < 0.05


def test_a_refused_watch_is_reported_once_and_the_short_polls_go_on(tmp_path: Path, caplog):
    watch = SpoolWatch()
    with caplog.at_level("WARNING", logger="services.worker.spool_watch"):
        assert not watch.start(tmp_path / "no-such-spool", ["outbox"])
    assert not watch.watching
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "cannot watch the spool" in warnings[0] and "max_user_instances" in warnings[0]
    changed, waited = _timed_wait(watch, watch.generation, poll=0.05)
    assert not changed and waited < 0.5


def test_a_watch_whose_folder_disappears_falls_back_to_the_short_polls(tmp_path: Path, caplog):
    import shutil

    spool = Spool(tmp_path / "spool")
    assert spool.watch("outbox")
    shutil.rmtree(spool.root)  # the volume went away under the program: no event will ever come
    deadline = time.monotonic() + 5.0
    with caplog.at_level("WARNING", logger="services.worker.spool_watch"):
        while spool.changes.watching and time.monotonic() < deadline:
            time.sleep(0.05)
    assert not spool.changes.watching
    assert [r.getMessage() for r in caplog.records] == [
        "the spool watch stopped; looking for work every few milliseconds instead"]
    changed, waited = _timed_wait(spool.changes, spool.changes.generation, poll=0.05)
    assert not changed and waited < 0.5
    spool.changes.close()


def test_watchdogs_stop_race_error_stays_out_of_the_logs_and_its_other_errors_do_not(caplog):
    inotify_log = logging.getLogger("watchdog.observers.inotify")
    with caplog.at_level(logging.INFO):
        inotify_log.error("InotifyEmitter.queue_events() called when the thread is inactive")
        inotify_log.error("some other inotify failure")
    assert [r.getMessage() for r in caplog.records if r.name == inotify_log.name] == ["some other inotify failure"]
