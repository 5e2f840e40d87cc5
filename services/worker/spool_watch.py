"""Waking a program when a file lands in the spool, so an idle worker sleeps instead of scanning every few ms.

Each program waits for hand-offs from the others (the messenger for outbox files, the runner for new jobs and
inbox messages, the uploader for results, the poller for status files). Polling for them every 10-50 ms cost an
idle worker about 6% of a core. A `SpoolWatch` started on the spool's folders (watchdog: inotify on Linux, one
instance per program) wakes waiters when a file appears there, which the spool's writers always do by a rename
or a link of a complete file, or when a program calls `wake`. Waiters still look every `WATCHED_POLL_SECONDS`,
so a missed event costs latency, never a stalled job.

Without a watch (never started, or the system refused one: a full inotify quota) `wait` sleeps the caller's own
short poll interval, as before, and is still cut short by `wake`.

Waiters use a generation number, so a file that lands while a program is scanning is not missed:

    seen = watch.generation
    if not look_for_work():
        watch.wait(seen, POLL_SECONDS)
"""
from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

from watchdog.events import FileCreatedEvent, FileMovedEvent, FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

log = logging.getLogger(__name__)
# watchdog warns when a folder made and filled at once is watched twice (its event and its scan of the new folder
# both add the watch); the watch is replaced and nothing is lost, and the warning's huge line would reach the logs.
warnings.filterwarnings("ignore", message=r"Callback with id .* already exists for watch", category=RuntimeWarning)
WATCHED_POLL_SECONDS = 1.0  # with a watch, the longest a waiter sleeps without an event
STOP_SECONDS = 2.0


class _WithoutStopRace(logging.Filter):
    """Drops watchdog's ERROR "InotifyEmitter.queue_events() called when the thread is inactive": logged when its
    emitter reads an event while the observer is being stopped (upstream's choice, watchdog#963). It only happens
    as a program stops, drops nothing we need, and an ERROR line at every such stop would alarm an operator."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "called when the thread is inactive" not in record.getMessage()


logging.getLogger("watchdog.observers.inotify").addFilter(_WithoutStopRace())


class SpoolWatch:
    """A wake-up signal for one program's waits on the spool; see the module's docstring."""

    def __init__(self, ignore: Callable[[str], bool] = lambda name: False) -> None:
        self._ignore = ignore  # names of files that never need a waiter (the writers' temporary files)
        self._changed = threading.Condition()
        self._generation = 0
        self._closed = False
        self._observer: Observer | None = None

    @property
    def watching(self) -> bool:
        """True while the file system reports changes (waits then last up to `WATCHED_POLL_SECONDS`)."""
        observer = self._observer
        if observer is None:
            return False
        if observer.is_alive() and all(emitter.is_alive() for emitter in observer.emitters):
            return True
        # Its threads ended (the spool folder itself went away, say): back to the short polls, said once.
        with self._changed:
            if self._observer is not observer:
                return False  # another waiter saw it first
            self._observer = None
        log.warning("the spool watch stopped; looking for work every few milliseconds instead")
        _stop(observer)
        return False

    @property
    def generation(self) -> int:
        """A number that grows with every change seen; take it before looking for work."""
        return self._generation

    def start(self, root: Path, stages: Iterable[str]) -> bool:
        """Watch for files landing under `root`'s `stages` folders; False, with one warning, if the system refused.

        One inotify instance for `root` (the limit on instances per user is low, 128 by default), its events
        filtered here by folder.
        """
        if self._observer is not None:
            return True
        prefixes = tuple(os.path.join(str(root), stage) + os.sep for stage in stages)
        observer = Observer()
        try:
            observer.schedule(_WakeOnArrival(self, prefixes, self._ignore), str(root), recursive=True,
                              event_filter=[FileCreatedEvent, FileMovedEvent])
            observer.start()
        except OSError as exc:
            log.warning("cannot watch the spool for changes (%s); looking for work every few milliseconds instead "
                        "(raise fs.inotify.max_user_instances or max_user_watches to fix this)",
                        exc.strerror or type(exc).__name__)
            _stop(observer)
            return False
        self._observer = observer
        return True

    def wake(self) -> None:
        """Cut every current wait short (a change the file system does not report, or stopping)."""
        with self._changed:
            self._generation += 1
            self._changed.notify_all()

    def wait(self, seen: int, poll: float, at_most: float | None = None) -> bool:
        """Return once the generation moved past `seen`, after `poll` seconds without a watch (or
        `WATCHED_POLL_SECONDS` with one), or after `at_most` seconds; True if something changed."""
        timeout = max(poll, WATCHED_POLL_SECONDS) if self.watching else poll
        if at_most is not None:
            timeout = min(timeout, at_most)
        deadline = time.monotonic() + max(0.0, timeout)
        with self._changed:
            while self._generation == seen and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
            return True

    def close(self) -> None:
        """Stop watching and release every wait, now and later (the program is stopping)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        observer, self._observer = self._observer, None
        if observer is not None:
            _stop(observer)


class _WakeOnArrival(FileSystemEventHandler):
    """Wakes the watch when a file appears (created, linked or renamed into place) under one of `prefixes`,
    except ignored names.

    A folder that appears is not itself a hand-off; watchdog watches it and reports files already in it as created.
    """

    def __init__(self, watch: SpoolWatch, prefixes: tuple[str, ...], ignore: Callable[[str], bool]) -> None:
        self.watch = watch
        self.prefixes = prefixes
        self.ignore = ignore

    def on_any_event(self, event: FileSystemEvent) -> None:
        path = os.fsdecode(event.dest_path or event.src_path)
        if not path.startswith(self.prefixes) or self.ignore(os.path.basename(path)):
            return  # another program's folder, or a writer's temporary file (its rename or link follows)
        self.watch.wake()


def _stop(observer: Observer) -> None:
    try:
        observer.stop()
        if observer.is_alive():
            observer.join(STOP_SECONDS)
    except (OSError, RuntimeError):  # never started, or its threads already ended: nothing to release
        pass
